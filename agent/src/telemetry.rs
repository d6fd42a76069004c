//! Lambda's Telemetry API (`PUT /2022-07-01/telemetry`, and the older Logs
//! API, `PUT /2020-08-15/logs`): an extension subscribes with an HTTP
//! destination inside the sandbox (`http://sandbox.localdomain:PORT`), and
//! the agent posts it batches of events as JSON arrays, as Lambda does:
//!
//! * `function` and `extension`: each line the function or an extension
//!   wrote (`{"time", "type", "record": "the line"}`);
//! * `platform`: `platform.start` (request id, version) when a call starts
//!   and `platform.runtimeDone` (request id, `success` or `failure`) when
//!   the runtime answered.
//!
//! Batches are cut by the subscription's `buffering` (`maxItems`,
//! `timeoutMs`; Lambda's defaults 10,000 and 1,000 ms); a subscriber too
//! slow to keep up loses events past its queue rather than holding the
//! function up. Before extensions get their `SHUTDOWN` event, what is
//! queued is delivered. `platform.report` and the init events are not sent:
//! the host measures those.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Paths of the subscription APIs.
pub const TELEMETRY_PATH: &str = "/2022-07-01/telemetry";
/// The older Logs API.
pub const LOGS_PATH: &str = "/2020-08-15/logs";

/// Events waiting for one subscriber, at most (more are dropped).
const QUEUE: usize = 10_000;
/// How long the flush before `SHUTDOWN` waits for the subscribers.
const FLUSH_WAIT: Duration = Duration::from_millis(100);

const PLATFORM: u8 = 1;
const FUNCTION: u8 = 2;
const EXTENSION: u8 = 4;

enum Item {
    Event(String),
    Flush(mpsc::Sender<()>),
}

struct Subscriber {
    types: u8,
    tx: mpsc::SyncSender<Item>,
}

/// The subscriptions of one sandbox.
#[derive(Default)]
pub(crate) struct Telemetry {
    subs: Mutex<Vec<Subscriber>>,
    /// Whether anyone subscribed (read for every line and call).
    any: AtomicBool,
}

impl Telemetry {
    /// A subscription request's body: `types`, `buffering`, `destination`.
    /// The reason it is refused, if it is.
    pub(crate) fn subscribe(&self, body: &[u8]) -> Result<(), String> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
        let mut types = 0;
        for t in v["types"].as_array().ok_or("`types` is missing")? {
            types |= match t.as_str() {
                Some("platform") => PLATFORM,
                Some("function") => FUNCTION,
                Some("extension") => EXTENSION,
                _ => {
                    return Err(format!(
                        "unknown type {t}: expected platform, function or extension"
                    ));
                }
            };
        }
        let uri = v["destination"]["URI"]
            .as_str()
            .ok_or("`destination.URI` is missing")?;
        let (addr, path) = destination(uri)?;
        let max_items = v["buffering"]["maxItems"].as_u64().unwrap_or(10_000).max(1) as usize;
        let timeout = Duration::from_millis(v["buffering"]["timeoutMs"].as_u64().unwrap_or(1_000));
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        thread::Builder::new()
            .name("agent-telemetry".into())
            .spawn(move || send_batches(rx, addr, &path, max_items, timeout))
            .map_err(|e| format!("starting its sender: {e}"))?;
        self.subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Subscriber { types, tx });
        self.any.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn emit(&self, kind: u8, event_type: &str, record: serde_json::Value) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let event =
            serde_json::json!({"time": now(), "type": event_type, "record": record}).to_string();
        for s in self
            .subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.types & kind != 0)
        {
            // A full queue drops the event: the function is never held up.
            let _ = s.tx.try_send(Item::Event(event.clone()));
        }
    }

    /// A line the function wrote.
    pub(crate) fn function_line(&self, line: &[u8]) {
        if self.any.load(Ordering::Relaxed) {
            self.emit(FUNCTION, "function", String::from_utf8_lossy(line).into());
        }
    }

    /// A line an extension wrote.
    pub(crate) fn extension_line(&self, line: &[u8]) {
        if self.any.load(Ordering::Relaxed) {
            self.emit(EXTENSION, "extension", String::from_utf8_lossy(line).into());
        }
    }

    /// A call starts.
    pub(crate) fn start(&self, request_id: &str) {
        if self.any.load(Ordering::Relaxed) {
            self.emit(
                PLATFORM,
                "platform.start",
                serde_json::json!({"requestId": request_id, "version": "$LATEST"}),
            );
        }
    }

    /// The runtime answered a call.
    pub(crate) fn runtime_done(&self, request_id: &str, failed: bool) {
        if self.any.load(Ordering::Relaxed) {
            let status = if failed { "failure" } else { "success" };
            self.emit(
                PLATFORM,
                "platform.runtimeDone",
                serde_json::json!({"requestId": request_id, "status": status}),
            );
        }
    }

    /// Deliver what is queued, waiting at most [`FLUSH_WAIT`].
    pub(crate) fn flush(&self) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let (done, acks) = mpsc::channel();
        let n = self
            .subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|s| s.tx.try_send(Item::Flush(done.clone())).is_ok())
            .count();
        let deadline = Instant::now() + FLUSH_WAIT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            if acks.recv_timeout(left).is_err() {
                break;
            }
        }
    }
}

/// The address and path of a destination: HTTP to the sandbox itself
/// (`sandbox.localdomain`, `sandbox`, `localhost`, `127.0.0.1`), the only
/// place a sandbox can reach.
fn destination(uri: &str) -> Result<(SocketAddr, String), String> {
    let rest = uri
        .strip_prefix("http://")
        .ok_or_else(|| format!("destination {uri:?}: only http:// is served"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("destination {uri:?}: no port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("destination {uri:?}: bad port"))?;
    match host {
        "sandbox.localdomain" | "sandbox" | "localhost" | "127.0.0.1" => {
            Ok((SocketAddr::from(([127, 0, 0, 1], port)), path))
        }
        other => Err(format!(
            "destination host {other:?}: a sandbox reaches only itself (sandbox.localdomain)"
        )),
    }
}

/// The sender of one subscription: batches of at most `max_items`, each
/// sent `timeout` after its first event at the latest.
fn send_batches(
    rx: mpsc::Receiver<Item>,
    addr: SocketAddr,
    path: &str,
    max_items: usize,
    timeout: Duration,
) {
    let mut batch: Vec<String> = Vec::new();
    let mut flushed: Vec<mpsc::Sender<()>> = Vec::new();
    loop {
        let item = if batch.is_empty() {
            match rx.recv() {
                Ok(item) => Some(item),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(timeout) {
                Ok(item) => Some(item),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    post(addr, path, &batch);
                    return;
                }
            }
        };
        match item {
            Some(Item::Event(e)) => {
                batch.push(e);
                if batch.len() < max_items {
                    continue;
                }
            }
            Some(Item::Flush(done)) => flushed.push(done),
            None => {}
        }
        if !batch.is_empty() {
            post(addr, path, &batch);
            batch.clear();
        }
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

/// POST one batch as a JSON array; a destination that does not answer
/// loses it.
fn post(addr: SocketAddr, path: &str, batch: &[String]) {
    let body = format!("[{}]", batch.join(","));
    let sent = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: sandbox.localdomain:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            addr.port(),
            body.len()
        )?;
        s.flush()?;
        // Its answer, to the end.
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        Ok(())
    });
    if let Err(e) = sent {
        eprintln!("sluice-agent: telemetry to {addr}{path}: {e}");
    }
}

/// Now as RFC 3339 with milliseconds, in UTC.
fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_in_the_sandbox() {
        let (addr, path) = destination("http://sandbox.localdomain:8080").unwrap();
        assert_eq!(
            (addr.to_string().as_str(), path.as_str()),
            ("127.0.0.1:8080", "/")
        );
        let (_, path) = destination("http://sandbox:9/logs").unwrap();
        assert_eq!(path, "/logs");
        assert!(destination("http://example.com:80").is_err());
        assert!(destination("https://sandbox:443").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = now();
        assert_eq!(t.len(), "2026-12-06T05:05:00.123Z".len(), "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T",
            "{t}"
        );
    }

    /// Events reach a destination in the sandbox, batched, and a flush
    /// delivers what is queued.
    #[test]
    fn events_are_posted_in_batches() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = Telemetry::default();
        let body = format!(
            r#"{{"types": ["function", "platform"], "buffering": {{"maxItems": 2, "timeoutMs": 25}},
                "destination": {{"protocol": "HTTP", "URI": "http://sandbox.localdomain:{port}"}}}}"#
        );
        t.subscribe(body.as_bytes()).unwrap();
        t.start("r1");
        t.function_line(b"hello");
        t.extension_line(b"not subscribed");
        t.runtime_done("r1", false);
        let mut events = Vec::new();
        while events.len() < 3 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = conn.read(&mut buf).unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some(i) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if request.len() >= i + 4 + len {
                        let batch: Vec<serde_json::Value> =
                            serde_json::from_slice(&request[i + 4..i + 4 + len]).unwrap();
                        assert!(batch.len() <= 2);
                        events.extend(batch);
                        break;
                    }
                }
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        }
        let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            ["platform.start", "function", "platform.runtimeDone"]
        );
        assert_eq!(events[1]["record"], "hello");
        assert_eq!(events[2]["record"]["status"], "success");
    }
}
