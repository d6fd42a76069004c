//! A Lambda function that misbehaves on request, for sandbox and executor tests.
//!
//! Start-up, driven by the environment:
//! - `MISBEHAVE_INIT=exit`: print to stderr and exit with status 3 during init;
//! - `MISBEHAVE_INIT=sleep`: sleep 60 s before polling for events (init timeout);
//! - `MISBEHAVE_CHILD=bomb`: internal, a fork-bomb child (see `fork_bomb_child`).
//!
//! Each event is `{"action": ..., ...}`:
//! - `echo` (also when there is no action): return the event;
//! - `loop`: spin forever;
//! - `sleep` + `ms`: sleep, then return `{"slept_ms": ms}`;
//! - `alloc` + `mb`: allocate and touch that many MiB, keep them, return `{"allocated_mb": mb}`;
//! - `read_file` + `path`: return `{"content": ...}`, or error `ReadFailed`;
//! - `file_digest` + `path`: return `{"len": bytes, "sum": sum of the bytes}`, or error `ReadFailed`;
//! - `write_file` + `path` + `content`: write it, `{"written": path}` or error `WriteFailed`;
//! - `connect` + `addr`: TCP connect (2 s timeout), `{"connected": true}` or error `ConnectFailed`;
//! - `fork_bomb`: spawn copies of itself that spawn copies of themselves, then wait forever;
//! - `panic`: panic in the handler;
//! - `exit` + `code`: exit the process mid-invocation;
//! - `env`: return the environment variables as a JSON object;
//! - `big_response` + `mb`: return a string of that many MiB.
//!
//! Any other action is answered with error `UnknownAction`.
//!
//! ## Kafka mode
//!
//! With `MISBEHAVE_KAFKA=<mode>` set, an event holding a `records` object is
//! treated as Lambda's Kafka event (`records`: `"topic-partition"` → list of
//! records with a base64 `value`). The function first writes its own record
//! of the batch to stderr: one line `BATCH <records> <outcome>` (`ok`,
//! `fail` or `partial:<failed items>`), then one line per record,
//! `SEEN <topic>-<partition>@<offset> <value>` (the value decoded, lossily
//! as UTF-8). Modes:
//! - `echo`: return the event;
//! - `poison`: fail (`Poison`) if any value contains `poison`, else echo;
//! - `flaky`: fail (`Flaky`) the first time a batch starting at a given
//!   record is seen (remembered by this process), echo the second time;
//! - `partial`: return `{"batchItemFailures": [...]}` naming the records
//!   whose value contains `partial` and that this process sees for the first
//!   time (an empty list when there are none);
//! - `slow`: sleep `MISBEHAVE_SLOW_MS` (default 200) ms, then echo.
//!
//! Events without a `records` object keep the actions above.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lambda_runtime::{Diagnostic, Error, LambdaEvent, service_fn};
use serde_json::{Map, Value, json};

const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;

fn main() -> Result<(), Error> {
    if std::env::var("MISBEHAVE_CHILD").as_deref() == Ok("bomb") {
        fork_bomb_child();
    }
    match std::env::var("MISBEHAVE_INIT").as_deref() {
        Ok("exit") => {
            eprintln!("misbehave: exiting during init (MISBEHAVE_INIT=exit)");
            std::process::exit(3);
        }
        Ok("sleep") => {
            eprintln!("misbehave: sleeping 60 s during init (MISBEHAVE_INIT=sleep)");
            std::thread::sleep(Duration::from_secs(60));
        }
        _ => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(lambda_runtime::run(service_fn(handler)))
}

fn error(error_type: &str, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        error_type: error_type.into(),
        error_message: message.into(),
    }
}

fn u64_field(event: &Value, name: &str) -> Result<u64, Diagnostic> {
    event.get(name).and_then(Value::as_u64).ok_or_else(|| {
        error(
            "InvalidEvent",
            format!("field {name:?} must be a non-negative integer"),
        )
    })
}

fn str_field<'a>(event: &'a Value, name: &str) -> Result<&'a str, Diagnostic> {
    event
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| error("InvalidEvent", format!("field {name:?} must be a string")))
}

fn mib_bytes(mb: u64) -> Result<usize, Diagnostic> {
    usize::try_from(mb)
        .ok()
        .and_then(|mb| mb.checked_mul(MIB))
        .ok_or_else(|| error("InvalidEvent", format!("{mb} MiB is too large")))
}

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Diagnostic> {
    let event = event.payload;
    if let Ok(mode) = std::env::var("MISBEHAVE_KAFKA")
        && event.get("records").is_some_and(Value::is_object)
    {
        return kafka_handler(&mode, event).await;
    }
    let action = event
        .get("action")
        .and_then(Value::as_str)
        .unwrap_or("echo");
    match action {
        "echo" => Ok(event),
        "loop" => loop {
            std::hint::spin_loop();
        },
        "sleep" => {
            let ms = u64_field(&event, "ms")?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!({ "slept_ms": ms }))
        }
        "alloc" => {
            let mb = u64_field(&event, "mb")?;
            let mut block = vec![0u8; mib_bytes(mb)?];
            // Write one byte per page so the memory is really committed, not
            // just reserved (a zeroed allocation maps pages lazily).
            for offset in (0..block.len()).step_by(PAGE) {
                block[offset] = 1;
            }
            // Keep it for the life of the process.
            std::hint::black_box(block).leak();
            Ok(json!({ "allocated_mb": mb }))
        }
        "read_file" => {
            let path = str_field(&event, "path")?;
            match std::fs::read(path) {
                Ok(bytes) => Ok(json!({ "content": String::from_utf8_lossy(&bytes) })),
                Err(e) => Err(error("ReadFailed", format!("{path}: {e}"))),
            }
        }
        "file_digest" => {
            let path = str_field(&event, "path")?;
            match std::fs::read(path) {
                Ok(bytes) => Ok(json!({
                    "len": bytes.len(),
                    "sum": bytes.iter().map(|&b| u64::from(b)).sum::<u64>(),
                })),
                Err(e) => Err(error("ReadFailed", format!("{path}: {e}"))),
            }
        }
        "write_file" => {
            let path = str_field(&event, "path")?;
            let content = str_field(&event, "content")?;
            match std::fs::write(path, content) {
                Ok(()) => Ok(json!({ "written": path })),
                Err(e) => Err(error("WriteFailed", format!("{path}: {e}"))),
            }
        }
        "connect" => {
            let addr = str_field(&event, "addr")?;
            let parsed: SocketAddr = addr
                .parse()
                .map_err(|e| error("ConnectFailed", format!("{addr}: {e}")))?;
            match TcpStream::connect_timeout(&parsed, Duration::from_secs(2)) {
                Ok(_stream) => Ok(json!({ "connected": true })),
                Err(e) => Err(error("ConnectFailed", format!("{addr}: {e}"))),
            }
        }
        "fork_bomb" => {
            spawn_self();
            std::future::pending().await
        }
        "panic" => panic!("misbehave: panic requested"),
        "exit" => {
            let code = event.get("code").and_then(Value::as_i64).unwrap_or(1);
            eprintln!("misbehave: exiting with status {code} mid-invocation");
            std::process::exit(i32::try_from(code).unwrap_or(1));
        }
        "env" => {
            let vars: Map<String, Value> = std::env::vars_os()
                .map(|(k, v)| {
                    (
                        k.to_string_lossy().into_owned(),
                        Value::String(v.to_string_lossy().into_owned()),
                    )
                })
                .collect();
            Ok(Value::Object(vars))
        }
        "big_response" => {
            let mb = u64_field(&event, "mb")?;
            Ok(Value::String("x".repeat(mib_bytes(mb)?)))
        }
        other => Err(error("UnknownAction", format!("unknown action {other:?}"))),
    }
}

/// One record of a Kafka event: `(topic-partition@offset, decoded value)`.
struct KafkaRecord {
    id: String,
    value: String,
}

fn kafka_records(event: &Value) -> Result<Vec<KafkaRecord>, Diagnostic> {
    let mut out = Vec::new();
    let groups = event
        .get("records")
        .and_then(Value::as_object)
        .ok_or_else(|| error("InvalidEvent", "records must be an object"))?;
    for (tp, list) in groups {
        let list = list
            .as_array()
            .ok_or_else(|| error("InvalidEvent", format!("records[{tp:?}] is not an array")))?;
        for r in list {
            let offset = r
                .get("offset")
                .and_then(Value::as_i64)
                .ok_or_else(|| error("InvalidEvent", format!("a record of {tp} has no offset")))?;
            let value = match r.get("value").and_then(Value::as_str) {
                Some(b64) => {
                    let bytes = STANDARD
                        .decode(b64)
                        .map_err(|e| error("InvalidEvent", format!("{tp}@{offset}: {e}")))?;
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                None => String::new(),
            };
            out.push(KafkaRecord {
                id: format!("{tp}@{offset}"),
                value,
            });
        }
    }
    Ok(out)
}

/// What this process has seen: batch starts (`flaky`) or failed items
/// (`partial`).
static REMEMBERED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Remember `id`; true if it is new.
fn remember(id: &str) -> bool {
    let mut seen = REMEMBERED.lock().unwrap_or_else(PoisonError::into_inner);
    seen.get_or_insert_with(HashSet::new).insert(id.to_owned())
}

/// Write this process's record of a batch to stderr (see the module docs).
fn log_batch(records: &[KafkaRecord], outcome: &str) {
    use std::io::Write as _;
    let mut text = format!("BATCH {} {outcome}\n", records.len());
    for r in records {
        let value = r.value.replace(['\n', '\r'], " ");
        text.push_str(&format!("SEEN {} {value}\n", r.id));
    }
    // One write, so the lines of a batch stay together.
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

async fn kafka_handler(mode: &str, event: Value) -> Result<Value, Diagnostic> {
    let records = kafka_records(&event)?;
    match mode {
        "echo" => {
            log_batch(&records, "ok");
            Ok(event)
        }
        "poison" => {
            if let Some(bad) = records.iter().find(|r| r.value.contains("poison")) {
                log_batch(&records, "fail");
                Err(error("Poison", format!("poison record {}", bad.id)))
            } else {
                log_batch(&records, "ok");
                Ok(event)
            }
        }
        "flaky" => {
            let start = records.first().map(|r| r.id.as_str()).unwrap_or("");
            if remember(start) {
                log_batch(&records, "fail");
                Err(error(
                    "Flaky",
                    format!("first delivery of the batch at {start}"),
                ))
            } else {
                log_batch(&records, "ok");
                Ok(event)
            }
        }
        "partial" => {
            let failed: Vec<Value> = records
                .iter()
                .filter(|r| r.value.contains("partial") && remember(&r.id))
                .map(|r| json!({ "itemIdentifier": r.id }))
                .collect();
            log_batch(&records, &format!("partial:{}", failed.len()));
            Ok(json!({ "batchItemFailures": failed }))
        }
        "slow" => {
            let ms = std::env::var("MISBEHAVE_SLOW_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(200);
            log_batch(&records, "ok");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(event)
        }
        other => Err(error(
            "UnknownAction",
            format!("unknown MISBEHAVE_KAFKA mode {other:?}"),
        )),
    }
}

/// Path of this executable, to spawn copies of it.
fn self_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .or_else(|| std::env::args_os().next().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// Spawns one fork-bomb child; returns whether it was started.
fn spawn_self() -> bool {
    Command::new(self_exe())
        .env("MISBEHAVE_CHILD", "bomb")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .is_ok()
}

/// A fork-bomb child: start two more copies of itself, retrying until both
/// are running (spawns fail once a process limit is hit), then sleep forever.
fn fork_bomb_child() -> ! {
    let mut started = 0;
    while started < 2 {
        if spawn_self() {
            started += 1;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
