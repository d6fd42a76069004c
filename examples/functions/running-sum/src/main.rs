//! A stateful fold for sluice's state carrier, as plain `lambda_runtime`
//! code: the running sum and count of the `amount` of every record, per
//! window.
//!
//! Each call gets the state the previous call returned (`{}` at the start
//! of a window) and answers `{"state": {"sum": S, "count": N}}` (other
//! fields of the state are carried unchanged). The final
//! invoke of a window (`isFinalInvokeForWindow: true`, no records) answers
//! the window's result: `{"state": …, "key": …, "sum": S, "count": N,
//! "window": {…}, "terminatedEarly": bool}`.
//!
//! Records come as Lambda's Kafka event (`records`, base64 values) or as a
//! backfill call (`items`); an amount is the value's `amount` field (a
//! number or a numeric string) or the value itself when it is a number.
//!
//! Test knobs, by environment: `KEEP_AMOUNTS=1` also keeps every amount in
//! the state (so that it grows); `FAIL_FINAL_ONCE=DIR` fails the first
//! final invoke (leaving a marker file in DIR); `SLOW_MS=N` sleeps N ms in
//! every call.

use base64::Engine;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

fn amount(v: &Value) -> Option<i64> {
    let a = v.get("amount").unwrap_or(v);
    a.as_i64()
        .or_else(|| a.as_f64().map(|f| f as i64))
        .or_else(|| a.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The amounts of the event's records or items, in order.
fn amounts(event: &Value) -> Result<Vec<i64>, Error> {
    let mut out = Vec::new();
    if let Some(parts) = event["records"].as_object() {
        for recs in parts.values() {
            for r in recs.as_array().into_iter().flatten() {
                let raw = r["value"].as_str().unwrap_or_default();
                let bytes = base64::engine::general_purpose::STANDARD.decode(raw)?;
                let v: Value = serde_json::from_slice(&bytes)?;
                out.push(amount(&v).ok_or_else(|| format!("no amount in {v}"))?);
            }
        }
    }
    for item in event["items"].as_array().into_iter().flatten() {
        out.push(amount(item).ok_or_else(|| format!("no amount in {item}"))?);
    }
    Ok(out)
}

fn handle(event: &Value) -> Result<Value, Error> {
    if let Some(ms) = std::env::var("SLOW_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let mut state = event["state"].clone();
    if !state.is_object() {
        state = json!({});
    }
    let sum = state["sum"].as_i64().unwrap_or(0);
    let count = state["count"].as_i64().unwrap_or(0);
    if event["isFinalInvokeForWindow"] == json!(true) {
        if let Ok(dir) = std::env::var("FAIL_FINAL_ONCE") {
            let marker = std::path::Path::new(&dir).join("final-failed");
            if !marker.exists() {
                std::fs::write(&marker, b"1")?;
                return Err("failing the first final invoke (FAIL_FINAL_ONCE)".into());
            }
        }
        return Ok(json!({
            "state": state,
            "key": event["stateKey"],
            "sum": sum,
            "count": count,
            "window": event["window"],
            "terminatedEarly": event["isWindowTerminatedEarly"],
        }));
    }
    let new = amounts(event)?;
    // Other fields of the state are carried as they are.
    let mut next = state.clone();
    next["sum"] = json!(sum + new.iter().sum::<i64>());
    next["count"] = json!(count + new.len() as i64);
    if std::env::var_os("KEEP_AMOUNTS").is_some() {
        let mut kept: Vec<Value> = state["amounts"].as_array().cloned().unwrap_or_default();
        kept.extend(new.into_iter().map(Value::from));
        next["amounts"] = Value::Array(kept);
    }
    Ok(json!({ "state": next }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        handle(&event.payload)
    }))
    .await
}
