//! A function for object-store triggers (`[[trigger.object_store]]`) and
//! backfills of objects (`format = "objects"`): counts the lines of each
//! object.
//!
//! Plain AWS Lambda code for an S3 trigger: the event is an S3 event
//! notification, read with `aws_lambda_events`' `S3Event`. On Lambda the
//! function would fetch the object itself; a sluice sandbox has no network,
//! so sluice fetches it and stages its bytes at `/run/sluice/payload` (the
//! path the event's `sluice.payloadPath` names) for the invocation.
//!
//! It answers `{"key": ..., "bytes": ..., "lines": ...}` and prints the
//! same as a log line. An object that is not UTF-8 text fails with a
//! `NotText` error, so the trigger retries it and then writes it to its
//! dead-letter file. A deletion (`ObjectRemoved:*`, with `events =
//! ["created", "removed"]` on the trigger) prints `KEY: removed`.
//!
//! A backfill's event names the object as its one item, as Step Functions
//! Distributed Map's S3 object listing does (`{"items": [{"Key", "Size",
//! "LastModified", "Etag", "url"}], "object_file": PATH, "batch": {...}}`);
//! the answer then also has the item's `size`, which should equal `bytes`,
//! and its `etag` (`null` for a local file).

use aws_lambda_events::s3::S3Event;
use lambda_runtime::{Diagnostic, Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

/// Where sluice stages the object (see the crate docs).
const DEFAULT_PAYLOAD: &str = "/run/sluice/payload";

/// An error with a short, stable `errorType` callers can match on.
fn failure(error_type: &str, message: String) -> Diagnostic {
    Diagnostic {
        error_type: error_type.into(),
        error_message: message,
    }
}

/// Counts the lines of the object at `path`, named `key` in messages.
fn count(key: &str, path: &str) -> Result<Value, Diagnostic> {
    let bytes = std::fs::read(path).map_err(|e| failure("NoObject", format!("{path}: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        failure(
            "NotText",
            format!("{key}: not UTF-8 text (at byte {})", e.valid_up_to()),
        )
    })?;
    let lines = text.lines().count();
    println!("{key}: {lines} lines, {} bytes", bytes.len());
    Ok(json!({"key": key, "bytes": bytes.len(), "lines": lines}))
}

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    // A backfill of objects: the item is the object, its bytes at `object_file`.
    if let Some(item) = event.payload["items"].get(0) {
        let key = item["Key"].as_str().unwrap_or_default();
        let path = event.payload["object_file"]
            .as_str()
            .unwrap_or(DEFAULT_PAYLOAD);
        let mut answer = count(key, path)?;
        answer["size"] = item["Size"].clone();
        answer["etag"] = item["Etag"].clone();
        return Ok(answer);
    }
    let path = event.payload["Records"][0]["sluice"]["payloadPath"]
        .as_str()
        .unwrap_or(DEFAULT_PAYLOAD)
        .to_owned();
    let s3: S3Event = serde_json::from_value(event.payload)
        .map_err(|e| failure("NotAnS3Event", e.to_string()))?;
    let record = s3
        .records
        .first()
        .ok_or_else(|| failure("NotAnS3Event", "an S3 event without records".into()))?;
    let key = record.s3.object.key.clone().unwrap_or_default();
    if record
        .event_name
        .as_deref()
        .is_some_and(|e| e.starts_with("ObjectRemoved:"))
    {
        println!("{key}: removed");
        return Ok(json!({"key": key, "removed": true}));
    }
    count(&key, &path)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
