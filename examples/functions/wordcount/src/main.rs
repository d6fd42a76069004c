//! Word count for `sluice mapreduce`, as plain `lambda_runtime` code. The
//! function's `handler` setting (Lambda's `_HANDLER`) picks the role:
//!
//! - `map`: `{"items": ["a line", ...]}` → `{"records": [{"key": "word",
//!   "value": count}, ...]}`, words lowercased and split at anything that is
//!   not a letter or a digit;
//! - `reduce` (also fit as a combiner): `{"groups": [{"key": "word",
//!   "values": [n, ...]}, ...]}` → `{"records": [{"key": "word", "value":
//!   sum}, ...]}`.
//!
//! Fault injection for tests: with `WORDCOUNT_CRASH_EVERY=N`, the process
//! exits (status 70) in the middle of every Nth call it serves, before
//! answering; the executor then starts a fresh sandbox, whose count starts
//! again, so a retried call succeeds when `N` is at least 2 and the function
//! runs one sandbox at a time. With `WORDCOUNT_HANG_ITEM=LINE`, a map call
//! holding that line never answers; with `WORDCOUNT_HANG_KEY=WORD`, neither
//! does a reduce call holding that key's group (for tests that kill a job
//! mid-way).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

fn map(event: &Value) -> Value {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in event["items"].as_array().into_iter().flatten() {
        let Some(line) = line.as_str() else { continue };
        for word in line
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
    }
    json!({"records": counts.into_iter().map(|(k, n)| json!({"key": k, "value": n})).collect::<Vec<_>>()})
}

fn reduce(event: &Value) -> Value {
    let records: Vec<Value> = event["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let sum: u64 = g["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .sum();
            json!({"key": g["key"], "value": sum})
        })
        .collect();
    json!({ "records": records })
}

/// Whether the event holds the item or the group key to hang on.
fn hangs(event: &Value, item: Option<&str>, key: Option<&str>) -> bool {
    let holds = |list: &str, field: Option<&str>, want: Option<&str>| {
        want.is_some_and(|want| {
            event[list].as_array().into_iter().flatten().any(|v| {
                let v = field.map_or(v, |f| &v[f]);
                v.as_str() == Some(want)
            })
        })
    };
    holds("items", None, item) || holds("groups", Some("key"), key)
}

/// Calls served by this process.
static CALLS: AtomicU64 = AtomicU64::new(0);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let role = std::env::var("_HANDLER").unwrap_or_default();
    let crash_every: Option<u64> = std::env::var("WORDCOUNT_CRASH_EVERY")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0);
    let hang_item = std::env::var("WORDCOUNT_HANG_ITEM").ok();
    let hang_key = std::env::var("WORDCOUNT_HANG_KEY").ok();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let role = role.clone();
        let hang = hangs(&event.payload, hang_item.as_deref(), hang_key.as_deref());
        async move {
            if hang {
                eprintln!("wordcount: hanging (WORDCOUNT_HANG_ITEM or WORDCOUNT_HANG_KEY)");
                std::future::pending::<()>().await;
            }
            let call = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
            if crash_every.is_some_and(|n| call.is_multiple_of(n)) {
                eprintln!("wordcount: crashing in call {call} (WORDCOUNT_CRASH_EVERY)");
                std::process::exit(70);
            }
            match role.as_str() {
                "map" => Ok(map(&event.payload)),
                "reduce" | "combine" => Ok(reduce(&event.payload)),
                other => Err(Error::from(format!(
                    "unknown handler {other:?}: set handler = \"map\" or \"reduce\""
                ))),
            }
        }
    }))
    .await
}
