//! Producing records: on-failure topics, output topics, and `--produce`.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::client_log::LoggedContext;
use crate::IngestError;

/// One record to produce.
#[derive(Debug, Clone, Default)]
pub struct OutRecord {
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition; `None`: the producer's partitioner picks (by key).
    pub partition: Option<i32>,
}

/// A producer whose sends are awaited until the broker acknowledged them.
#[derive(Clone)]
pub struct Sink {
    producer: FutureProducer<LoggedContext>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").finish_non_exhaustive()
    }
}

impl Sink {
    /// An idempotent producer for `servers` with extra client properties;
    /// `trigger` names it in errors and logs.
    pub fn new(
        trigger: &str,
        servers: &str,
        properties: &[(String, String)],
    ) -> Result<Self, IngestError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", servers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000");
        for (k, v) in properties {
            cfg.set(k, v);
        }
        let context = LoggedContext::new(format!("{trigger} producer"), servers);
        let producer = cfg
            .create_with_context(context)
            .map_err(|source| IngestError::Kafka {
                trigger: trigger.to_owned(),
                what: "creating the producer".into(),
                source: Box::new(source),
            })?;
        Ok(Self { producer })
    }

    /// Produce all records to `topic` and wait for every acknowledgement.
    pub async fn send_all(&self, topic: &str, records: &[OutRecord]) -> Result<(), KafkaError> {
        let mut futures = std::collections::VecDeque::with_capacity(records.len());
        for r in records {
            let mut rec = future_record(topic, r);
            // Enqueue now (the delivery is awaited below); on a full local
            // queue, wait for the oldest deliveries and try again.
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        futures.push_back(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        match futures.pop_front() {
                            Some(f) => check(f.await)?,
                            None => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        for f in futures {
            check(f.await)?;
        }
        Ok(())
    }
}

/// The rdkafka record for `r`, borrowing its bytes.
pub(super) fn future_record<'a>(topic: &'a str, r: &'a OutRecord) -> FutureRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = &r.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(v) = &r.value {
        rec = rec.payload(v.as_slice());
    }
    if let Some(p) = r.partition {
        rec = rec.partition(p);
    }
    rec
}

pub(super) fn check<E>(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<(), KafkaError> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// What [`produce_file`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Records produced (the file's non-empty lines).
    pub records: usize,
    /// With a key field: records loaded without a key, because their line is
    /// not a JSON object or has no such field.
    pub unkeyed: usize,
    /// The first of those: its 1-based line and why it has no key.
    pub first_unkeyed: Option<(usize, &'static str)>,
}

/// Load a JSON-lines file into `topic`: every non-empty line is one record
/// value, verbatim, its bytes as they are (so malformed lines, even ones
/// that are not UTF-8, can be loaded on purpose). With
/// `key_field`, a line that is a JSON object with that field gets it as key
/// (strings as-is, other values as JSON text); the others are loaded without
/// a key and counted, so that a misspelt field does not silently spread a
/// key's records over partitions.
pub async fn produce_file(
    servers: &str,
    topic: &str,
    path: &std::path::Path,
    key_field: Option<&str>,
) -> Result<Loaded, IngestError> {
    let text = std::fs::read(path).map_err(|e| IngestError::Load {
        file: path.display().to_string(),
        line: 0,
        message: e.to_string(),
    })?;
    let sink = Sink::new("--produce", servers, &[])?;
    let (records, mut loaded) = file_records(&text, key_field);
    for chunk in records.chunks(10_000) {
        sink.send_all(topic, chunk)
            .await
            .map_err(|e| IngestError::Load {
                file: path.display().to_string(),
                line: 0,
                message: format!("producing to {topic}: {e}"),
            })?;
    }
    loaded.records = records.len();
    Ok(loaded)
}

/// The records of a JSON-lines file's bytes (see [`produce_file`]), and
/// what became of `key_field`.
fn file_records(text: &[u8], key_field: Option<&str>) -> (Vec<OutRecord>, Loaded) {
    let mut records = Vec::new();
    let mut loaded = Loaded {
        records: 0,
        unkeyed: 0,
        first_unkeyed: None,
    };
    // A UTF-8 byte order mark (Windows tools write one) is not data.
    let text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let key = match key_field {
            None => None,
            Some(field) => match record_key(line, field) {
                Ok(key) => Some(key),
                Err(why) => {
                    loaded.unkeyed += 1;
                    loaded.first_unkeyed.get_or_insert((index + 1, why));
                    None
                }
            },
        };
        records.push(OutRecord {
            key,
            value: Some(line.to_vec()),
            headers: vec![],
            partition: None,
        });
    }
    loaded.records = records.len();
    (records, loaded)
}

/// The key `field` gives the JSON object on `line`, or why there is none.
fn record_key(line: &[u8], field: &str) -> Result<Vec<u8>, &'static str> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|_| "not JSON")?;
    let object = value.as_object().ok_or("not a JSON object")?;
    match object.get(field) {
        None | Some(serde_json::Value::Null) => Err("no such field"),
        Some(serde_json::Value::String(s)) => Ok(s.clone().into_bytes()),
        Some(other) => Ok(other.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::{file_records, record_key};

    #[test]
    fn a_files_lines_become_records_keyed_by_the_field() {
        let text = b"\xef\xbb\xbf{\"k\":\"a\"}\r\n\n{\"n\":1}\nnot json\n\xff\xfe bytes\n";
        let (records, loaded) = file_records(text, Some("k"));
        let values: Vec<&[u8]> = records
            .iter()
            .map(|r| r.value.as_deref().unwrap())
            .collect();
        // The byte order mark and the CR are not data; blank lines are no
        // records; lines without a key are loaded anyway.
        // A line that is not UTF-8 is loaded as its bytes.
        assert_eq!(
            values,
            [
                &br#"{"k":"a"}"#[..],
                br#"{"n":1}"#,
                b"not json",
                b"\xff\xfe bytes"
            ]
        );
        assert_eq!(records[0].key.as_deref(), Some(&b"a"[..]));
        assert!(records[1].key.is_none() && records[2].key.is_none());
        assert_eq!((loaded.records, loaded.unkeyed), (4, 3));
        assert_eq!(loaded.first_unkeyed, Some((3, "no such field")));
        let (_, loaded) = file_records(text, None);
        assert_eq!((loaded.records, loaded.unkeyed), (4, 0));
    }

    #[test]
    fn a_key_comes_from_a_json_objects_field_or_says_why_not() {
        assert_eq!(record_key(br#"{"k":"a"}"#, "k"), Ok(b"a".to_vec()));
        assert_eq!(record_key(br#"{"k":7}"#, "k"), Ok(b"7".to_vec()));
        assert_eq!(
            record_key(br#"{"k":{"x":1}}"#, "k"),
            Ok(br#"{"x":1}"#.to_vec())
        );
        assert_eq!(record_key(br#"{"n":1}"#, "k"), Err("no such field"));
        assert_eq!(record_key(br#"{"k":null}"#, "k"), Err("no such field"));
        assert_eq!(record_key(b"[1]", "k"), Err("not a JSON object"));
        assert_eq!(record_key(br#"{"k":"#, "k"), Err("not JSON"));
    }
}
