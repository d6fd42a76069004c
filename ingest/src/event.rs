//! Lambda's Kafka event format: the JSON event a batch of records is
//! delivered as, the partial batch response a function may return, the view
//! of a record event filters match against, and the headers of a record sent
//! to an on-failure topic.
//!
//! The event is the one AWS documents for Amazon MSK (`aws:kafka`) and
//! self-managed Kafka (`SelfManagedKafka`):
//!
//! ```json
//! {"eventSource":"SelfManagedKafka","bootstrapServers":"b1:9092,b2:9092",
//!  "records":{"mytopic-0":[{"topic":"mytopic","partition":0,"offset":15,
//!    "timestamp":1545084650987,"timestampType":"CREATE_TIME",
//!    "key":"<base64>","value":"<base64>",
//!    "headers":[{"headerKey":[104,101,97,100,101,114]}]}]}}
//! ```
//!
//! Header values are arrays of *signed* bytes, as Lambda (a Java service)
//! sends them: the byte `0xC3` is `-61`. The official runtimes' event types
//! read them so (`Vec<i8>` in `aws_lambda_events`, `int8` in Go, `sbyte` in
//! .NET). A header whose value is null is sent as an empty array (the event
//! types have no null there). A record without a key or value has no `key`
//! or `value` field (Lambda omits them for tombstones).

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::record::Record;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// `batchItemFailures` is present but is neither an array nor null.
    #[error("batchItemFailures is not an array (found {found})")]
    MalformedBatchItemFailures {
        /// JSON type found instead.
        found: &'static str,
    },
    /// An entry of `batchItemFailures` has no usable `itemIdentifier`.
    #[error("batchItemFailures[{index}] has no string or number itemIdentifier")]
    MissingItemIdentifier {
        /// Position in `batchItemFailures`.
        index: usize,
    },
    /// An item identifier that names no record of the batch (or is not in a
    /// form sluice accepts).
    #[error("item identifier {identifier:?} matches no record of the batch")]
    UnknownItemIdentifier {
        /// The identifier as the function returned it.
        identifier: String,
    },
    /// A bare offset was returned for a batch holding several partitions.
    #[error(
        "item identifier {identifier:?} is a bare offset but the batch spans {partitions} partitions; use \"<topic>-<partition>@<offset>\""
    )]
    AmbiguousOffset {
        /// The identifier as the function returned it.
        identifier: String,
        /// Number of partitions the batch holds.
        partitions: usize,
    },
    /// A record's value is not JSON (for event filtering).
    #[error("value of record {topic}-{partition}@{offset} is not JSON: {source}")]
    ValueNotJson {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Where the records of an event come from.
#[derive(Debug, Clone, Copy)]
pub struct EventSource<'a> {
    /// `"SelfManagedKafka"` or `"aws:kafka"`.
    pub event_source: &'a str,
    /// The cluster ARN (`aws:kafka` only); the field is omitted when `None`.
    pub event_source_arn: Option<&'a str>,
    /// Comma-separated bootstrap servers.
    pub bootstrap_servers: &'a str,
}

/// Build the JSON event for a batch.
///
/// Records may span several topics and partitions: they are grouped under
/// `"<topic>-<partition>"` keys, in the order each partition first appears,
/// keeping record order within each partition.
///
/// The JSON is written straight into one buffer sized up front: keys and
/// values are base64-encoded in place (base64 needs no JSON escaping),
/// numbers are formatted without `fmt`, and strings are escaped only when
/// they hold a character that needs it.
pub fn kafka_event(source: &EventSource, records: &[Record]) -> Vec<u8> {
    let b64 = |n: usize| n.div_ceil(3) * 4;
    let estimate = 160
        + source.bootstrap_servers.len()
        + source.event_source_arn.map_or(0, str::len)
        + records
            .iter()
            .map(|r| {
                150 + r.topic.len()
                    + r.key.as_ref().map_or(0, |k| b64(k.len()) + 8)
                    + r.value.as_ref().map_or(0, |v| b64(v.len()) + 10)
                    + r.headers
                        .iter()
                        .map(|(k, v)| k.len() + 8 + v.as_ref().map_or(0, |v| v.len() * 5))
                        .sum::<usize>()
            })
            .sum::<usize>();
    let mut out = Vec::with_capacity(estimate);
    out.extend_from_slice(b"{\"eventSource\":");
    json_str(&mut out, source.event_source);
    if let Some(arn) = source.event_source_arn {
        out.extend_from_slice(b",\"eventSourceArn\":");
        json_str(&mut out, arn);
    }
    out.extend_from_slice(b",\"bootstrapServers\":");
    json_str(&mut out, source.bootstrap_servers);
    out.extend_from_slice(b",\"records\":{");
    for (i, (topic, partition, recs)) in group(records).iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(&mut out, &format!("{topic}-{partition}"));
        out.extend_from_slice(b":[");
        // What every record of the group starts with, written once.
        let mut prefix = b"{\"topic\":".to_vec();
        json_str(&mut prefix, topic);
        prefix.extend_from_slice(b",\"partition\":");
        push_int(&mut prefix, i64::from(*partition));
        for (j, r) in recs.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&prefix);
            record_json(&mut out, r);
        }
        out.push(b']');
    }
    out.extend_from_slice(b"}}");
    out
}

/// Records grouped by partition, in first-appearance order.
pub(crate) fn group(records: &[Record]) -> Vec<(&str, i32, Vec<&Record>)> {
    let mut groups: Vec<(&str, i32, Vec<&Record>)> = Vec::new();
    let mut index: HashMap<(&str, i32), usize> = HashMap::new();
    for r in records {
        // Batches mostly hold one partition: check the last group first.
        let last = groups.len().checked_sub(1);
        let i = match last {
            Some(l) if groups[l].0 == &*r.topic && groups[l].1 == r.partition => l,
            _ => *index.entry((&*r.topic, r.partition)).or_insert_with(|| {
                groups.push((&*r.topic, r.partition, Vec::new()));
                groups.len() - 1
            }),
        };
        groups[i].2.push(r);
    }
    groups
}

/// A record's JSON after its group's `{"topic":...,"partition":N`.
fn record_json(out: &mut Vec<u8>, r: &Record) {
    out.extend_from_slice(b",\"offset\":");
    push_int(out, r.offset);
    out.extend_from_slice(b",\"timestamp\":");
    push_int(out, r.timestamp_ms);
    out.extend_from_slice(b",\"timestampType\":\"");
    out.extend_from_slice(r.timestamp_type.as_lambda_str().as_bytes());
    out.push(b'"');
    if let Some(k) = &r.key {
        out.extend_from_slice(b",\"key\":");
        push_base64(out, k);
    }
    if let Some(v) = &r.value {
        out.extend_from_slice(b",\"value\":");
        push_base64(out, v);
    }
    out.extend_from_slice(b",\"headers\":[");
    for (i, (k, v)) in r.headers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        json_str(out, k);
        out.extend_from_slice(b":[");
        for (j, &b) in v.as_deref().unwrap_or(&[]).iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            // Signed, as Lambda (a Java service) sends header bytes.
            push_int(out, i64::from(i8::from_ne_bytes([b])));
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
}

/// A JSON string: copied as is when nothing in it needs escaping.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if let Err(e) = serde_json::to_writer(&mut *out, s) {
        // Writing a string into a Vec cannot fail.
        unreachable!("serializing a JSON string failed: {e}");
    }
}

/// A JSON string holding `bytes` in standard base64 (SIMD where the CPU
/// has it: for small records this is most of an event's encoding).
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    base64_simd::STANDARD.encode_append(bytes, out);
    out.push(b'"');
}

/// A decimal integer, without going through `fmt`.
fn push_int(out: &mut Vec<u8>, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// The item identifier sluice documents for a record:
/// `"<topic>-<partition>@<offset>"`.
pub fn item_identifier(r: &Record) -> String {
    format!("{}-{}@{}", r.topic, r.partition, r.offset)
}

/// A record a function reported as failed: `(topic, partition, offset)`.
pub type FailedRecord = (String, i32, i64);

/// Parse a function's response as a partial batch response,
/// `{"batchItemFailures":[{"itemIdentifier":"..."}]}`.
///
/// Item identifiers are `"<topic>-<partition>@<offset>"`, or, when the batch
/// holds a single partition, a bare offset (a JSON integer or a string of
/// digits).
///
/// Returns `Ok(None)` when the response is not a partial batch response (not
/// JSON, not an object, or no `batchItemFailures` key), otherwise the failed
/// records as `(topic, partition, offset)` in the order the function listed
/// them, without duplicates. A null or empty `batchItemFailures` means every
/// record succeeded. An identifier naming no record of the batch, or an
/// entry without an identifier, is an error: the function reported
/// something it was not given, and the whole batch counts as failed.
pub fn parse_batch_item_failures(
    response: &[u8],
    batch: &[Record],
) -> Result<Option<Vec<FailedRecord>>, EventError> {
    let Ok(Value::Object(mut response)) = serde_json::from_slice::<Value>(response) else {
        return Ok(None);
    };
    let Some(failures) = response.remove("batchItemFailures") else {
        return Ok(None);
    };
    let failures = match failures {
        Value::Null => return Ok(Some(Vec::new())),
        Value::Array(a) => a,
        other => {
            return Err(EventError::MalformedBatchItemFailures {
                found: json_type(&other),
            });
        }
    };
    if failures.is_empty() {
        return Ok(Some(Vec::new()));
    }

    let known: HashSet<(&str, i32, i64)> = batch
        .iter()
        .map(|r| (&*r.topic, r.partition, r.offset))
        .collect();
    let partitions: HashSet<(&str, i32)> = known.iter().map(|&(t, p, _)| (t, p)).collect();
    let topics: HashSet<&str> = partitions.iter().map(|&(t, _)| t).collect();

    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (index, failure) in failures.iter().enumerate() {
        let id = failure.get("itemIdentifier");
        let (identifier, bare) = match id {
            Some(Value::String(s)) => (s.clone(), is_digits(s).then(|| s.parse().ok()).flatten()),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(o) => (n.to_string(), Some(o)),
                None => {
                    return Err(EventError::UnknownItemIdentifier {
                        identifier: n.to_string(),
                    });
                }
            },
            _ => return Err(EventError::MissingItemIdentifier { index }),
        };
        let coords = if let Some(offset) = bare {
            if partitions.len() > 1 {
                return Err(EventError::AmbiguousOffset {
                    identifier,
                    partitions: partitions.len(),
                });
            }
            partitions
                .iter()
                .next()
                .map(|&(t, p)| (t, p, offset))
                .filter(|c| known.contains(c))
        } else {
            parse_identifier(&identifier).and_then(|(t, p, o)| {
                let &t = topics.get(t)?;
                known.get(&(t, p, o)).copied()
            })
        };
        let Some(coords) = coords else {
            return Err(EventError::UnknownItemIdentifier { identifier });
        };
        if seen.insert(coords) {
            out.push((coords.0.to_owned(), coords.1, coords.2));
        }
    }
    Ok(Some(out))
}

/// Split `"<topic>-<partition>@<offset>"`.
fn parse_identifier(id: &str) -> Option<(&str, i32, i64)> {
    let (tp, offset) = id.rsplit_once('@')?;
    let (topic, partition) = tp.rsplit_once('-')?;
    if topic.is_empty() || !is_digits(partition) || !is_digits(offset) {
        return None;
    }
    Some((topic, partition.parse().ok()?, offset.parse().ok()?))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// "an array", "a number"...: what a JSON value is, for messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The JSON view of a record that event filters match against:
/// `{"topic","partition","offset","timestamp","key","value"}`, and what
/// its value was.
#[derive(Debug)]
pub struct FilterView {
    /// The record's fields. `key` is the key as a UTF-8 string, or null when
    /// absent or not UTF-8; `value` is the value parsed as JSON (null for a
    /// record without a value), or its text when it is not JSON.
    pub view: Value,
    /// What `value` holds.
    pub value: ValueForm,
}

/// What a record's value is to event filters.
#[derive(Debug)]
pub enum ValueForm {
    /// JSON (or no value): match with `Pattern::matches`.
    Json,
    /// UTF-8 text that is not JSON, in the view as a string: match with
    /// `Pattern::matches_plain_text` (Lambda's plain-string messages).
    Text(EventError),
    /// Bytes that are not UTF-8, in the view as text with replacement
    /// characters; only a filter that does not read `value` can judge them.
    Binary(EventError),
}

/// Builds the [`FilterView`] of a record. The caller decides what a value
/// that is not JSON means (see [`ValueForm`]).
pub fn filter_view(r: &Record) -> FilterView {
    let (value, form) = match &r.value {
        None => (Value::Null, ValueForm::Json),
        Some(v) => match serde_json::from_slice(v) {
            Ok(value) => (value, ValueForm::Json),
            Err(source) => {
                let error = EventError::ValueNotJson {
                    topic: r.topic.to_string(),
                    partition: r.partition,
                    offset: r.offset,
                    source,
                };
                match std::str::from_utf8(v) {
                    Ok(text) => (Value::String(text.to_owned()), ValueForm::Text(error)),
                    Err(_) => (
                        Value::String(String::from_utf8_lossy(v).into_owned()),
                        ValueForm::Binary(error),
                    ),
                }
            }
        },
    };
    let key = r
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
        .map_or(Value::Null, |k| Value::String(k.to_owned()));
    let mut m = serde_json::Map::with_capacity(6);
    m.insert("topic".into(), Value::String(r.topic.to_string()));
    m.insert("partition".into(), r.partition.into());
    m.insert("offset".into(), r.offset.into());
    m.insert("timestamp".into(), r.timestamp_ms.into());
    m.insert("key".into(), key);
    m.insert("value".into(), value);
    FilterView {
        view: Value::Object(m),
        value: form,
    }
}

/// Why a record is sent to an on-failure topic.
#[derive(Debug, Clone, Copy)]
pub struct FailureInfo<'a> {
    /// Function name.
    pub function: &'a str,
    /// Error type (e.g. the function's `errorType`, or a sluice reason).
    pub error_type: &'a str,
    /// Error message.
    pub error_message: &'a str,
    /// Invocations attempted.
    pub attempts: u32,
}

/// Header names sluice adds to a record sent to an on-failure topic.
pub mod failure_header {
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "sluice.source.topic";
    /// Source partition (decimal).
    pub const SOURCE_PARTITION: &str = "sluice.source.partition";
    /// Source offset (decimal).
    pub const SOURCE_OFFSET: &str = "sluice.source.offset";
    /// Source timestamp, milliseconds since the Unix epoch (decimal).
    pub const SOURCE_TIMESTAMP: &str = "sluice.source.timestamp";
    /// Function name.
    pub const FUNCTION: &str = "sluice.function";
    /// Error type.
    pub const ERROR_TYPE: &str = "sluice.error.type";
    /// Error message.
    pub const ERROR_MESSAGE: &str = "sluice.error.message";
    /// Invocations attempted (decimal).
    pub const ATTEMPTS: &str = "sluice.attempts";
    /// When the record was given up on, RFC 3339 UTC with milliseconds.
    pub const FAILED_AT: &str = "sluice.failed.at";
}

/// Headers for a record sent to an on-failure topic: its coordinates and
/// the failure (values UTF-8), followed by the record's own headers in order
/// (a null header value becomes empty).
pub fn failure_headers(r: &Record, info: &FailureInfo) -> Vec<(String, Vec<u8>)> {
    use failure_header as h;
    let mut out = Vec::with_capacity(9 + r.headers.len());
    let mut push = |k: &str, v: String| out.push((k.to_owned(), v.into_bytes()));
    push(h::SOURCE_TOPIC, r.topic.to_string());
    push(h::SOURCE_PARTITION, r.partition.to_string());
    push(h::SOURCE_OFFSET, r.offset.to_string());
    push(h::SOURCE_TIMESTAMP, r.timestamp_ms.to_string());
    push(h::FUNCTION, info.function.to_owned());
    push(h::ERROR_TYPE, info.error_type.to_owned());
    push(h::ERROR_MESSAGE, info.error_message.to_owned());
    push(h::ATTEMPTS, info.attempts.to_string());
    push(h::FAILED_AT, rfc3339_utc(SystemTime::now()));
    out.extend(
        r.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default())),
    );
    out
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (times before the epoch print as the epoch).
pub(crate) fn rfc3339_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_known_instants() {
        let at = |ms: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_545_084_650_987), "2018-12-17T22:10:50.987Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[test]
    fn integers_and_strings() {
        let mut out = Vec::new();
        for n in [0, 7, 9, -1, 10, 99, -128, i64::MAX, i64::MIN] {
            out.clear();
            push_int(&mut out, n);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), n.to_string());
        }
        out.clear();
        json_str(&mut out, "a\"b\\c\n\u{1}é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn identifier_forms() {
        assert_eq!(parse_identifier("a-b-3@17"), Some(("a-b", 3, 17)));
        assert_eq!(parse_identifier("t-0@"), None);
        assert_eq!(parse_identifier("-0@1"), None);
        assert_eq!(parse_identifier("t-0-1"), None);
        assert_eq!(parse_identifier("t-+1@2"), None);
    }
}
