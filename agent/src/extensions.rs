//! Lambda's Extensions API (`/2020-01-01/extension/`), served beside the
//! Runtime API: what external extensions (executables in the layers'
//! `/opt/extensions/`, started before `bootstrap`) and internal ones (code
//! in the runtime's own process) use to follow the sandbox's lifecycle.
//!
//! * `POST register` (`Lambda-Extension-Name`, `{"events": ["INVOKE",
//!   "SHUTDOWN"]}`) answers a `Lambda-Extension-Identifier`; only during
//!   initialisation, as in Lambda.
//! * `GET event/next` (with that identifier) waits for the next event:
//!   `INVOKE` (request id, deadline, ARN, tracing) for every call, or
//!   `SHUTDOWN` (`spindown`, a deadline) when the sandbox stops.
//! * `POST init/error` fails the initialisation with the extension's error
//!   type; `POST exit/error` is logged.
//!
//! Subscriptions to the Telemetry API are `crate::telemetry`'s.
//!
//! The phases wait for the extensions as Lambda's do: the sandbox is ready
//! once the runtime *and* every registered extension have asked for their
//! next event, and a call's result is relayed once every extension that
//! takes `INVOKE` events has asked for its next one (so a call answers
//! after its extensions are done with it, and its timeout covers them;
//! Lambda answers the caller earlier and bills the extensions' time). With
//! no extension registered, nothing of this is on a call's path but one
//! atomic load.

use std::collections::VecDeque;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_protocol::Message;

/// The path prefix of the Extensions API.
pub const EXTENSION_PREFIX: &str = "/2020-01-01/extension/";

/// How long extensions have to end after a `SHUTDOWN` event: what is left
/// of the host's 500 ms grace once the runtime was stopped.
pub const SHUTDOWN_GRACE_MS: u64 = 300;

/// One registered extension.
struct Extension {
    id: String,
    name: String,
    invoke: bool,
    shutdown: bool,
    /// Events not yet taken by a `next`.
    events: VecDeque<String>,
    /// Its `next`, waiting for an event.
    parked: Option<TcpStream>,
    /// Has asked for its next event since the last one it was given.
    idle: bool,
    /// Its process ended (an external extension).
    gone: bool,
}

impl Extension {
    fn settled(&self) -> bool {
        self.idle || self.gone
    }
}

#[derive(Default)]
struct State {
    list: Vec<Extension>,
    /// The runtime has asked for its first invocation.
    runtime_waiting: bool,
    /// `Ready` was sent: registration is over.
    ready: bool,
    /// A call's result, held until its extensions are done with it.
    held: Option<Message>,
}

/// What a [`Extensions`] method asks its caller to do once the lock is
/// released.
#[must_use]
pub(crate) enum Then {
    /// Nothing.
    Nothing,
    /// Send these messages to the host, in order.
    Send(Vec<Message>),
}

/// The Extensions API's state.
#[derive(Default)]
pub(crate) struct Extensions {
    state: Mutex<State>,
    /// Signalled on every registration.
    registering: Condvar,
    /// Whether any extension takes `INVOKE` events (read on every call).
    any_invoke: AtomicBool,
    seq: AtomicU64,
}

/// An answer to an Extensions API request.
pub(crate) enum Answer {
    /// Status, reason, extra headers, JSON body.
    Reply(u16, &'static str, Vec<(&'static str, String)>, Vec<u8>),
    /// A `next` parked until an event comes.
    Parked,
}

fn error(status: u16, reason: &'static str, error_type: &str, message: &str) -> Answer {
    let body = serde_json::json!({"errorType": error_type, "errorMessage": message});
    Answer::Reply(status, reason, Vec::new(), body.to_string().into_bytes())
}

impl Extensions {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pid = std::process::id();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (t >> 32) as u32,
            (t >> 16) as u16,
            n & 0xfff,
            pid & 0xfff,
            (t as u64 ^ n.rotate_left(24)) & 0xffff_ffff_ffff
        )
    }

    /// `POST register`: `function` is the JSON answered (function name,
    /// version, handler).
    pub(crate) fn register(&self, name: Option<&str>, body: &[u8], function: &str) -> Answer {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return error(
                400,
                "Bad Request",
                "InvalidRequest",
                "the Lambda-Extension-Name header is missing",
            );
        };
        let events: Vec<String> = match serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("events").cloned())
            .map(serde_json::from_value::<Vec<String>>)
        {
            Some(Ok(events)) => events,
            Some(Err(_)) | None if body.is_empty() => Vec::new(),
            _ => {
                return error(
                    400,
                    "Bad Request",
                    "InvalidRequest",
                    r#"expected {"events": ["INVOKE", "SHUTDOWN"]}"#,
                );
            }
        };
        if let Some(bad) = events.iter().find(|e| *e != "INVOKE" && *e != "SHUTDOWN") {
            return error(
                400,
                "Bad Request",
                "InvalidRequest",
                &format!("unknown event {bad:?}: expected INVOKE or SHUTDOWN"),
            );
        }
        let mut st = self.lock();
        if st.ready {
            return error(
                403,
                "Forbidden",
                "Extension.InvalidState",
                "extensions register during initialisation only",
            );
        }
        let id = self.id();
        let invoke = events.iter().any(|e| e == "INVOKE");
        st.list.push(Extension {
            id: id.clone(),
            name: name.to_owned(),
            invoke,
            shutdown: events.iter().any(|e| e == "SHUTDOWN"),
            events: VecDeque::new(),
            parked: None,
            idle: false,
            gone: false,
        });
        if invoke {
            self.any_invoke.store(true, Ordering::SeqCst);
        }
        drop(st);
        self.registering.notify_all();
        Answer::Reply(
            200,
            "OK",
            vec![("Lambda-Extension-Identifier", id)],
            function.as_bytes().to_vec(),
        )
    }

    /// Whether `id` is a registered extension's.
    pub(crate) fn known(&self, id: &str) -> bool {
        self.name_of(id).is_some()
    }

    /// The name the extension `id` registered with.
    pub(crate) fn name_of(&self, id: &str) -> Option<String> {
        self.lock()
            .list
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.name.clone())
    }

    /// How many extensions registered so far.
    pub(crate) fn registered(&self) -> usize {
        self.lock().list.len()
    }

    /// How many extensions registered, once more than `known` have or
    /// `timeout` passed.
    pub(crate) fn registered_after(&self, known: usize, timeout: Duration) -> usize {
        let st = self.lock();
        let (st, _) = self
            .registering
            .wait_timeout_while(st, timeout, |st| st.list.len() <= known)
            .unwrap_or_else(|p| p.into_inner());
        st.list.len()
    }

    /// `GET event/next` of extension `id` on `conn`: an event at once, or
    /// parked. Also what settling this extension releases (`Ready`, a
    /// held result).
    pub(crate) fn next(&self, id: Option<&str>, conn: &TcpStream) -> (Answer, Then) {
        let mut st = self.lock();
        let Some(i) = id.and_then(|id| st.list.iter().position(|e| e.id == id)) else {
            return (
                error(
                    403,
                    "Forbidden",
                    "Extension.UnknownExtensionIdentifier",
                    "unknown Lambda-Extension-Identifier",
                ),
                Then::Nothing,
            );
        };
        let ext = &mut st.list[i];
        if let Some(event) = ext.events.pop_front() {
            // Taking an event is not settling: it has work.
            ext.idle = false;
            return (event_answer(event), Then::Nothing);
        }
        ext.idle = true;
        ext.parked = conn.try_clone().ok();
        let then = Self::released(&mut st);
        (Answer::Parked, then)
    }

    /// The runtime asked for its first invocation: `Ready` once the
    /// extensions have too.
    pub(crate) fn runtime_waiting(&self) -> Then {
        let mut st = self.lock();
        st.runtime_waiting = true;
        Self::released(&mut st)
    }

    /// What the extensions' settling releases.
    fn released(st: &mut State) -> Then {
        let settled = st.list.iter().all(Extension::settled);
        if !settled {
            return Then::Nothing;
        }
        let mut out = Vec::new();
        if st.runtime_waiting && !st.ready {
            st.ready = true;
            // The `init_us` is filled in by the caller.
            out.push(Message::Ready { init_us: 0 });
        }
        if st.ready
            && let Some(held) = st.held.take()
        {
            out.push(held);
        }
        if out.is_empty() {
            Then::Nothing
        } else {
            Then::Send(out)
        }
    }

    /// A call arrives: an `INVOKE` event for each extension that takes
    /// them.
    pub(crate) fn invoke(&self, request_id: &str, deadline_ms: u64, arn: &str, trace_id: &str) {
        if !self.any_invoke.load(Ordering::SeqCst) {
            return;
        }
        let event = serde_json::json!({
            "eventType": "INVOKE",
            "deadlineMs": deadline_ms,
            "requestId": request_id,
            "invokedFunctionArn": arn,
            "tracing": {"type": "X-Amzn-Trace-Id", "value": trace_id},
        })
        .to_string();
        let mut st = self.lock();
        for ext in st.list.iter_mut().filter(|e| e.invoke && !e.gone) {
            ext.idle = false;
            deliver(ext, event.clone());
        }
    }

    /// The runtime's result of a call: `Some` to send it now, `None` when it
    /// is held until the extensions are done with the call.
    pub(crate) fn result(&self, msg: Message) -> Option<Message> {
        if !self.any_invoke.load(Ordering::SeqCst) {
            return Some(msg);
        }
        let mut st = self.lock();
        if st.list.iter().all(Extension::settled) {
            return Some(msg);
        }
        st.held = Some(msg);
        None
    }

    /// The sandbox stops: a `SHUTDOWN` event for each extension that takes
    /// them; whether any does.
    pub(crate) fn shutdown(&self) -> bool {
        let deadline = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            + SHUTDOWN_GRACE_MS;
        let event = serde_json::json!({
            "eventType": "SHUTDOWN",
            "shutdownReason": "spindown",
            "deadlineMs": deadline,
        })
        .to_string();
        let mut st = self.lock();
        let mut any = false;
        for ext in st.list.iter_mut().filter(|e| e.shutdown && !e.gone) {
            any = true;
            deliver(ext, event.clone());
        }
        any
    }

    /// An external extension's process ended: it is no longer waited for.
    /// What that releases.
    pub(crate) fn gone(&self, name: &str) -> Then {
        let mut st = self.lock();
        for ext in st.list.iter_mut().filter(|e| e.name == name) {
            ext.gone = true;
            ext.parked = None;
        }
        Self::released(&mut st)
    }
}

/// Give `event` to `ext`: to its parked `next`, or queued for its next one.
fn deliver(ext: &mut Extension, event: String) {
    match ext.parked.take() {
        Some(mut conn) => {
            if let Answer::Reply(status, reason, headers, body) = event_answer(event) {
                let _ = conn
                    .write_all(&http(status, reason, &headers, &body))
                    .and_then(|()| conn.flush());
            }
        }
        None => ext.events.push_back(event),
    }
}

fn event_answer(event: String) -> Answer {
    let id = format!("{:x}", crc_like(event.as_bytes()));
    Answer::Reply(
        200,
        "OK",
        vec![("Lambda-Extension-Event-Identifier", id)],
        event.into_bytes(),
    )
}

/// A short, stable identifier of an event's text.
fn crc_like(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An HTTP/1.1 answer with a JSON body.
pub(crate) fn http(
    status: u16,
    reason: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(a: Answer) -> u16 {
        match a {
            Answer::Reply(status, ..) => status,
            Answer::Parked => 0,
        }
    }

    #[test]
    fn registration_is_checked_and_closes_with_readiness() {
        let x = Extensions::default();
        assert_eq!(status(x.register(None, b"{}", "{}")), 400);
        assert_eq!(
            status(x.register(Some("a"), br#"{"events": ["LOGS"]}"#, "{}")),
            400
        );
        assert_eq!(status(x.register(Some("a"), b"not json", "{}")), 400);
        let ok = x.register(Some("a"), br#"{"events": ["SHUTDOWN"]}"#, r#"{"f":1}"#);
        match ok {
            Answer::Reply(200, _, headers, body) => {
                assert_eq!(headers[0].0, "Lambda-Extension-Identifier");
                assert_eq!(body, br#"{"f":1}"#);
            }
            _ => panic!("registration refused"),
        }
        // Not ready while the extension has not asked for an event.
        assert!(matches!(x.runtime_waiting(), Then::Nothing));
        assert_eq!(x.registered(), 1);
        // It ends instead: nothing is waited for any more.
        match x.gone("a") {
            Then::Send(m) => assert!(matches!(m[..], [Message::Ready { .. }])),
            Then::Nothing => panic!("not ready"),
        }
        assert_eq!(
            status(x.register(Some("late"), br#"{"events": []}"#, "{}")),
            403
        );
        // Without an extension that takes INVOKE events, results pass.
        let msg = Message::Shutdown;
        assert!(x.result(msg).is_some());
    }
}
