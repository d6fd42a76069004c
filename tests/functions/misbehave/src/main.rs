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
//! - `connect` + `addr`: TCP connect (2 s timeout), `{"connected": true}` or error `ConnectFailed`;
//! - `fork_bomb`: spawn copies of itself that spawn copies of themselves, then wait forever;
//! - `panic`: panic in the handler;
//! - `exit` + `code`: exit the process mid-invocation;
//! - `env`: return the environment variables as a JSON object;
//! - `big_response` + `mb`: return a string of that many MiB.
//!
//! Any other action is answered with error `UnknownAction`.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

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
