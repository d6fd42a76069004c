//! `on_failure` as a folder or object store prefix: Lambda's S3 on-failure
//! destination for Kafka event source mappings.
//!
//! Each failed batch is written, per partition, as one JSON object: Lambda's
//! invocation record (`requestContext`, `responseContext`, `version`,
//! `timestamp`, `KafkaBatchInfo`) with the Kafka event the function was
//! called with as `payload`, and the failure as sluice saw it under
//! `sluice`. The key is
//! `PREFIX/TRIGGER/TOPIC-PARTITION/YYYY/MM/DD/FIRST-LAST.json` (the date of
//! the first record, the offsets of the first and last): the same failed
//! records give the same key, so a write retried after a crash replaces
//! the object instead of adding a second one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use serde_json::{Value, json};

use crate::error::IngestError;
use crate::event::{self, EventSource, FailureInfo, rfc3339_utc};
use crate::objects::{local_prefix, split, store_for};
use crate::record::Record;

/// Where a trigger's failed records go as objects.
pub(crate) struct FailureObjects {
    store: Arc<dyn ObjectStore>,
    /// Keys start with it (the URL's key, or the local folder's path).
    prefix: Option<ObjectPath>,
    /// How people see a key: the URL base or `/` for local paths.
    shown: String,
    trigger: String,
}

impl FailureObjects {
    /// The destination of `trigger`'s `on_failure` (a URL of a known
    /// scheme, or an absolute local folder, made if missing).
    pub(crate) fn open(trigger: &str, url: &str) -> Result<Self, IngestError> {
        let config = |message: String| IngestError::Config {
            trigger: trigger.to_owned(),
            message: format!("on_failure {url}: {message}"),
        };
        if let Some(u) = split(url) {
            let store = store_for(&u).map_err(config)?;
            let key = u.key.trim_matches('/');
            return Ok(FailureObjects {
                store,
                prefix: (!key.is_empty()).then(|| ObjectPath::from(key)),
                shown: format!("{}/", u.base()),
                trigger: trigger.to_owned(),
            });
        }
        let folder = PathBuf::from(url);
        std::fs::create_dir_all(&folder)
            .map_err(|e| config(format!("cannot make the folder: {e}")))?;
        let (_, prefix) = local_prefix(folder).map_err(config)?;
        Ok(FailureObjects {
            store: Arc::new(object_store::local::LocalFileSystem::new()),
            prefix: Some(prefix),
            shown: "/".into(),
            trigger: trigger.to_owned(),
        })
    }

    /// Writes `recs` (one failure) as one object per partition; returns
    /// the objects' names.
    pub(crate) async fn write(
        &self,
        recs: &[Record],
        info: &FailureInfo<'_>,
        source: &EventSource<'_>,
    ) -> object_store::Result<Vec<String>> {
        let mut names = Vec::new();
        for (_, _, group) in event::group(recs) {
            let key = self.key(&group);
            let body = invocation_record(&group, info, source);
            // A `Value` always serializes.
            let bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
            self.store.put(&key, bytes.into()).await?;
            names.push(format!("{}{key}", self.shown));
        }
        Ok(names)
    }

    /// `PREFIX/TRIGGER/TOPIC-PARTITION/YYYY/MM/DD/FIRST-LAST.json`.
    fn key(&self, group: &[&Record]) -> ObjectPath {
        let (first, last) = (group[0], group[group.len() - 1]);
        let date = rfc3339_utc(at_ms(first.timestamp_ms));
        let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
        let name = format!(
            "{}/{}-{}/{y}/{m}/{d}/{}-{}.json",
            self.trigger, first.topic, first.partition, first.offset, last.offset
        );
        let mut path = self.prefix.clone().unwrap_or_default();
        for part in name.split('/') {
            path = path.child(part);
        }
        path
    }
}

fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Lambda's `requestContext.condition` for a failure.
fn condition(error_type: &str) -> &'static str {
    match error_type {
        "Sluice.RecordExpired" => "RecordAgeExceeded",
        // Never given to the function: not JSON for a filter, too large.
        "Sluice.MalformedRecord" | "Sluice.RecordTooLarge" => "RecordRejected",
        _ => "RetryAttemptsExhausted",
    }
}

/// One partition's failed records as Lambda's invocation record.
fn invocation_record(group: &[&Record], info: &FailureInfo<'_>, source: &EventSource<'_>) -> Value {
    let (first, last) = (group[0], group[group.len() - 1]);
    let records: Vec<Record> = group.iter().map(|r| (*r).clone()).collect();
    let payload: Value = serde_json::from_slice(&event::kafka_event(source, &records))
        .unwrap_or_else(|e| json!(format!("the event could not be rebuilt: {e}")));
    json!({
        "version": "1.0",
        "timestamp": rfc3339_utc(SystemTime::now()),
        "requestContext": {
            "functionArn": format!(
                "arn:aws:lambda:sluice-local:000000000000:function:{}",
                info.function
            ),
            "condition": condition(info.error_type),
            "approximateInvokeCount": info.attempts,
        },
        "responseContext": {
            "statusCode": 200,
            "executedVersion": "$LATEST",
            "functionError": info.error_type,
        },
        "KafkaBatchInfo": {
            "batchSize": group.len(),
            "topic": &*first.topic,
            "partition": first.partition,
            "startOffset": first.offset,
            "endOffset": last.offset,
            "approximateArrivalOfFirstRecord": rfc3339_utc(at_ms(first.timestamp_ms)),
            "approximateArrivalOfLastRecord": rfc3339_utc(at_ms(last.timestamp_ms)),
        },
        "sluice": {
            "function": info.function,
            "errorType": info.error_type,
            "errorMessage": info.error_message,
            "attempts": info.attempts,
        },
        "payload": payload,
    })
}
