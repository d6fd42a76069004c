//! The AWS Lambda Runtime API (`/2018-06-01/runtime/...`), served over HTTP/1.1.
//!
//! A small blocking server: one thread per connection (a runtime normally
//! keeps a single keep-alive connection open), `httparse` for the request
//! head, `Content-Length` and chunked bodies, `Expect: 100-continue`.
//! Everything the function reports goes to a [`Sink`] as protocol messages;
//! invocations come in through [`RuntimeApi::push_invoke`].

use std::collections::{HashSet, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use sluice_protocol::{MAX_PAYLOAD, Message};

use crate::extensions::{Answer, EXTENSION_PREFIX, Extensions, Then};
use crate::telemetry::{LOGS_PATH, TELEMETRY_PATH, Telemetry};

/// Where the server sends what the function reports.
pub trait Sink: Send + Sync + 'static {
    /// Deliver one message (response, error, init error, ready).
    fn send(&self, msg: Message);
}

impl<F: Fn(Message) + Send + Sync + 'static> Sink for F {
    fn send(&self, msg: Message) {
        self(msg)
    }
}

/// One invocation waiting for the runtime's `next`.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `Lambda-Runtime-Aws-Request-Id`.
    pub request_id: String,
    /// `Lambda-Runtime-Deadline-Ms`.
    pub deadline_ms: u64,
    /// `Lambda-Runtime-Invoked-Function-Arn`.
    pub invoked_function_arn: String,
    /// `Lambda-Runtime-Trace-Id`.
    pub trace_id: String,
    /// `Lambda-Runtime-Client-Context` (omitted when empty).
    pub client_context: String,
    /// Event body (shared: the channel frame's bytes, not a copy).
    pub payload: Bytes,
}

const MAX_HEAD: usize = 64 * 1024;
const PREFIX: &str = "/2018-06-01/runtime/";

struct Queue {
    pending: VecDeque<Invocation>,
    /// The connection of a `next` waiting for an invocation: the thread that
    /// receives the invocation writes the response to it directly (one
    /// thread hand-off less on the warm path).
    parked: Option<TcpStream>,
}

struct Shared {
    queue: Mutex<Queue>,
    closed: AtomicBool,
    ready_sent: AtomicBool,
    outstanding: Mutex<HashSet<String>>,
    started: Instant,
    sink: Box<dyn Sink>,
    /// Extra `next` response headers naming this sandbox, set when the
    /// sandbox was restored from a function snapshot.
    identity: Mutex<String>,
    /// The Extensions API.
    extensions: Extensions,
    /// The Telemetry API's subscriptions.
    telemetry: Arc<Telemetry>,
    /// What `register` answers: the function's name, version and handler.
    function: Mutex<String>,
}

/// The Runtime API state shared by all connections.
#[derive(Clone)]
pub struct RuntimeApi {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RuntimeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeApi").finish_non_exhaustive()
    }
}

impl RuntimeApi {
    /// A server whose reports go to `sink`. `started` is when the runtime
    /// process was spawned (the `Ready` message reports the init time).
    pub fn new(sink: impl Sink, started: Instant) -> Self {
        Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue {
                    pending: VecDeque::new(),
                    parked: None,
                }),
                closed: AtomicBool::new(false),
                ready_sent: AtomicBool::new(false),
                outstanding: Mutex::new(HashSet::new()),
                started,
                sink: Box::new(sink),
                identity: Mutex::new(String::new()),
                extensions: Extensions::default(),
                telemetry: Arc::default(),
                function: Mutex::new("{}".into()),
            }),
        }
    }

    /// What the Extensions API's `register` answers about the function.
    pub fn set_function(&self, name: &str, version: &str, handler: &str) {
        *self.shared.function.lock().expect("function lock") = serde_json::json!({
            "functionName": name,
            "functionVersion": version,
            "handler": handler,
        })
        .to_string();
    }

    /// How many extensions have registered.
    pub fn extensions_registered(&self) -> usize {
        self.shared.extensions.registered()
    }

    /// How many extensions have registered, once more than `known` have or
    /// `timeout` passed.
    pub fn extensions_registered_after(&self, known: usize, timeout: std::time::Duration) -> usize {
        self.shared.extensions.registered_after(known, timeout)
    }

    /// An external extension's process ended.
    pub fn extension_gone(&self, name: &str) {
        let then = self.shared.extensions.gone(name);
        self.dispatch(then);
    }

    /// The sandbox stops: what telemetry is queued is delivered, then
    /// `SHUTDOWN` events go to the extensions that take them; whether any
    /// does.
    pub fn shutdown_extensions(&self) -> bool {
        self.shared.telemetry.flush();
        self.shared.extensions.shutdown()
    }

    /// The Telemetry API's subscriptions, for the log relays.
    pub(crate) fn telemetry(&self) -> Arc<Telemetry> {
        self.shared.telemetry.clone()
    }

    /// Send what the extensions released: `Ready` (with the init time) and
    /// a held result.
    fn dispatch(&self, then: Then) {
        if let Then::Send(messages) = then {
            for m in messages {
                match m {
                    Message::Ready { .. } => {
                        self.shared.ready_sent.store(true, Ordering::SeqCst);
                        let init_us = self.shared.started.elapsed().as_micros() as u64;
                        self.shared.sink.send(Message::Ready { init_us });
                    }
                    other => self.shared.sink.send(other),
                }
            }
        }
    }

    /// Queue an invocation for the next `GET .../invocation/next`.
    pub fn push_invoke(&self, inv: Invocation) {
        self.shared.telemetry.start(&inv.request_id);
        self.shared.extensions.invoke(
            &inv.request_id,
            inv.deadline_ms,
            &inv.invoked_function_arn,
            &inv.trace_id,
        );
        let mut q = self.shared.queue.lock().expect("queue lock");
        match q.parked.take() {
            Some(mut conn) => {
                drop(q);
                let reply = self.deliver(inv);
                let _ = reply.write_to(&mut conn).and_then(|()| conn.flush());
            }
            None => q.pending.push_back(inv),
        }
    }

    /// Names this sandbox in every later `next` response, in the headers
    /// `Sluice-Sandbox-Id` and `Sluice-Log-Stream` (a sluice extension: a
    /// clone restored from a function snapshot keeps the environment of
    /// the process it was cloned from, so its own identity comes this
    /// way). Control characters are dropped from both values.
    pub fn set_identity(&self, sandbox_id: &str, log_stream: &str) {
        let clean = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
        *self.shared.identity.lock().expect("identity lock") = format!(
            "Sluice-Sandbox-Id: {}\r\nSluice-Log-Stream: {}\r\n",
            clean(sandbox_id),
            clean(log_stream)
        );
    }

    /// Wake every waiting `next` and make it fail: the sandbox is going away.
    /// The accept loop ends at its next connection.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let parked = self.shared.queue.lock().expect("queue lock").parked.take();
        if let Some(mut conn) = parked {
            let _ = Self::shutdown_reply().write_to(&mut conn);
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accept connections on `listener` in a background thread.
    pub fn serve(&self, listener: TcpListener) -> io::Result<thread::JoinHandle<()>> {
        let api = self.clone();
        thread::Builder::new()
            .name("runtime-api-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if api.shared.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let api = api.clone();
                    let _ = thread::Builder::new()
                        .name("runtime-api-conn".into())
                        .spawn(move || {
                            let _ = api.handle_connection(conn);
                        });
                }
            })
    }

    fn handle_connection(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut reader = BufReader::with_capacity(16 * 1024, stream.try_clone()?);
        let mut writer = stream;
        loop {
            let Some(req) = read_request(&mut reader, &mut writer)? else {
                return Ok(());
            };
            let keep_alive = !req.close;
            if req.method == "GET"
                && req.path.trim_end_matches('/') == "/2018-06-01/runtime/invocation/next"
            {
                // `None`: parked; the response is written when the
                // invocation arrives.
                if let Some(resp) = self.next_or_park(&writer)? {
                    resp.write_to(&mut writer)?;
                    writer.flush()?;
                    if resp.close {
                        return Ok(());
                    }
                }
                if !keep_alive {
                    return Ok(());
                }
                continue;
            }
            if req.method == "GET"
                && req.path.trim_end_matches('/') == "/2020-01-01/extension/event/next"
            {
                let (answer, then) = self
                    .shared
                    .extensions
                    .next(req.extension_id.as_deref(), &writer);
                self.dispatch(then);
                if let Answer::Reply(status, reason, headers, body) = answer {
                    writer.write_all(&crate::extensions::http(status, reason, &headers, &body))?;
                    writer.flush()?;
                }
                if !keep_alive {
                    return Ok(());
                }
                continue;
            }
            let resp = self.route(req);
            resp.write_to(&mut writer)?;
            writer.flush()?;
            if !keep_alive || resp.close {
                return Ok(());
            }
        }
    }

    fn route(&self, req: Request) -> Reply {
        let path = req.path.clone();
        if let Some(rest) = path.strip_prefix(EXTENSION_PREFIX) {
            return self.extension_route(rest, req);
        }
        let bare = path
            .split('?')
            .next()
            .unwrap_or_default()
            .trim_end_matches('/');
        if bare == TELEMETRY_PATH || bare == LOGS_PATH {
            return self.subscribe(req);
        }
        let Some(rest) = path.strip_prefix(PREFIX) else {
            return Reply::json(404, "Not Found", error_json("NotFound", "unknown path"));
        };
        let rest = rest.split('?').next().unwrap_or(rest);
        let parts: Vec<&str> = rest.split('/').collect();
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["invocation", "next"]) => Reply::json(
                400,
                "Bad Request",
                error_json("InvalidRequest", "malformed next request"),
            ),
            ("POST", ["invocation", id, "response"]) => self.report(id, req, false),
            ("POST", ["invocation", id, "error"]) => self.report(id, req, true),
            ("POST", ["init", "error"]) => {
                self.shared.sink.send(Message::InitError {
                    error_type: req.error_type.unwrap_or_default(),
                    body: req.body.unwrap_or_default(),
                });
                Reply::accepted()
            }
            (_, ["invocation", "next"])
            | (_, ["invocation", _, "response" | "error"])
            | (_, ["init", "error"]) => Reply::json(
                405,
                "Method Not Allowed",
                error_json("MethodNotAllowed", "method not allowed"),
            ),
            _ => Reply::json(404, "Not Found", error_json("NotFound", "unknown path")),
        }
    }

    /// The Extensions API's requests but `event/next`.
    fn extension_route(&self, rest: &str, req: Request) -> Reply {
        let rest = rest.split('?').next().unwrap_or(rest);
        match (req.method.as_str(), rest) {
            ("POST", "register") => {
                let function = self.shared.function.lock().expect("function lock").clone();
                let answer = self.shared.extensions.register(
                    req.extension_name.as_deref(),
                    req.body.as_deref().unwrap_or_default(),
                    &function,
                );
                match answer {
                    Answer::Reply(status, reason, headers, body) => Reply {
                        bytes: crate::extensions::http(status, reason, &headers, &body),
                        body: Bytes::new(),
                        close: false,
                    },
                    Answer::Parked => unreachable!("register never parks"),
                }
            }
            ("POST", "init/error") => {
                let error_type = req
                    .error_type
                    .unwrap_or_else(|| "Extension.Unknown".to_owned());
                let body = match req.body {
                    Some(b) if serde_json::from_slice::<serde_json::Value>(&b).is_ok() => b,
                    _ => error_json(&error_type, "an extension failed to initialise"),
                };
                self.shared
                    .sink
                    .send(Message::InitError { error_type, body });
                Reply::accepted()
            }
            ("POST", "exit/error") => {
                let error_type = req.error_type.unwrap_or_default();
                let body =
                    String::from_utf8_lossy(req.body.as_deref().unwrap_or_default()).into_owned();
                self.shared.sink.send(Message::Log {
                    stream: sluice_protocol::LogStream::Agent,
                    line: format!(
                        "extension {} exits with an error: {error_type} {body}",
                        req.extension_id
                            .as_deref()
                            .and_then(|id| self.shared.extensions.name_of(id))
                            .unwrap_or_else(|| "(unregistered)".into())
                    )
                    .into_bytes(),
                });
                Reply::accepted()
            }
            (_, "register" | "init/error" | "exit/error" | "event/next") => Reply::json(
                405,
                "Method Not Allowed",
                error_json("MethodNotAllowed", "method not allowed"),
            ),
            _ => Reply::json(404, "Not Found", error_json("NotFound", "unknown path")),
        }
    }

    /// `PUT /2022-07-01/telemetry` (or the Logs API's
    /// `PUT /2020-08-15/logs`) of a registered extension.
    fn subscribe(&self, req: Request) -> Reply {
        if req.method != "PUT" {
            return Reply::json(
                405,
                "Method Not Allowed",
                error_json("MethodNotAllowed", "subscribe with PUT"),
            );
        }
        if !req
            .extension_id
            .as_deref()
            .is_some_and(|id| self.shared.extensions.known(id))
        {
            return Reply::json(
                403,
                "Forbidden",
                error_json(
                    "Extension.UnknownExtensionIdentifier",
                    "subscribing needs a registered Lambda-Extension-Identifier",
                ),
            );
        }
        match self
            .shared
            .telemetry
            .subscribe(req.body.as_deref().unwrap_or_default())
        {
            Ok(()) => Reply::json(200, "OK", b"\"OK\"".to_vec()),
            Err(why) => Reply::json(
                400,
                "Bad Request",
                error_json("ValidationError", &format!("telemetry subscription: {why}")),
            ),
        }
    }

    fn shutdown_reply() -> Reply {
        Reply::json(
            500,
            "Internal Server Error",
            error_json("Runtime.Shutdown", "sandbox is shutting down"),
        )
        .closing()
    }

    /// Answer a `next` at once if an invocation is queued, or park the
    /// connection until one arrives (`Ok(None)`).
    fn next_or_park(&self, conn: &TcpStream) -> io::Result<Option<Reply>> {
        if !self.shared.ready_sent.load(Ordering::SeqCst) {
            // `Ready` once the extensions, if any, are waiting too.
            let then = self.shared.extensions.runtime_waiting();
            self.dispatch(then);
        }
        let mut q = self.shared.queue.lock().expect("queue lock");
        if let Some(inv) = q.pending.pop_front() {
            drop(q);
            return Ok(Some(self.deliver(inv)));
        }
        if self.shared.closed.load(Ordering::SeqCst) {
            return Ok(Some(Self::shutdown_reply()));
        }
        q.parked = Some(conn.try_clone()?);
        Ok(None)
    }

    /// The `next` response for `inv`; the request id becomes answerable.
    fn deliver(&self, inv: Invocation) -> Reply {
        self.shared
            .outstanding
            .lock()
            .expect("outstanding lock")
            .insert(inv.request_id.clone());
        let mut head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: {}\r\nLambda-Runtime-Deadline-Ms: {}\r\nLambda-Runtime-Invoked-Function-Arn: {}\r\nLambda-Runtime-Trace-Id: {}\r\n",
            inv.request_id, inv.deadline_ms, inv.invoked_function_arn, inv.trace_id
        );
        if !inv.client_context.is_empty() {
            head.push_str(&format!(
                "Lambda-Runtime-Client-Context: {}\r\n",
                inv.client_context
            ));
        }
        head.push_str(&self.shared.identity.lock().expect("identity lock"));
        head.push_str(&format!("Content-Length: {}\r\n\r\n", inv.payload.len()));
        // The event is not copied behind the head: both go out in one writev.
        Reply {
            bytes: head.into_bytes(),
            body: inv.payload,
            close: false,
        }
    }

    fn report(&self, id: &str, req: Request, is_error: bool) -> Reply {
        let known = self
            .shared
            .outstanding
            .lock()
            .expect("outstanding lock")
            .remove(id);
        if !known {
            return Reply::json(
                400,
                "Bad Request",
                error_json(
                    "InvalidRequestID",
                    &format!("request id {id:?} is not awaiting a result"),
                ),
            );
        }
        let Some(body) = req.body else {
            // Too large: the payload limit was exceeded while reading.
            let error = Message::Error {
                request_id: id.to_owned(),
                error_type: "Function.ResponseSizeTooLarge".into(),
                body: error_json(
                    "Function.ResponseSizeTooLarge",
                    &format!(
                        "Response payload size exceeded maximum allowed payload size ({MAX_PAYLOAD} bytes)."
                    ),
                ),
            };
            if let Some(msg) = self.shared.extensions.result(error) {
                self.shared.sink.send(msg);
            }
            return Reply::json(
                413,
                "Payload Too Large",
                error_json("RequestEntityTooLarge", "response payload too large"),
            )
            .closing();
        };
        let msg = if is_error {
            Message::Error {
                request_id: id.to_owned(),
                error_type: req.error_type.unwrap_or_default(),
                body,
            }
        } else if let Some((error_type, body)) = req.stream_error {
            // A streamed response whose trailers say it failed midway: an
            // error, as Lambda reports it, not the part that was sent.
            Message::Error {
                request_id: id.to_owned(),
                error_type,
                body,
            }
        } else {
            Message::Response {
                request_id: id.to_owned(),
                body,
            }
        };
        self.shared
            .telemetry
            .runtime_done(id, !matches!(msg, Message::Response { .. }));
        // Held while extensions are still busy with the call.
        if let Some(msg) = self.shared.extensions.result(msg) {
            self.shared.sink.send(msg);
        }
        Reply::accepted()
    }
}

fn error_json(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::json!({"errorType": error_type, "errorMessage": message})
        .to_string()
        .into_bytes()
}

struct Reply {
    /// The head (and, for small replies, the body).
    bytes: Vec<u8>,
    /// A body sent after `bytes` (the event of a `next`), not copied into it.
    body: Bytes,
    close: bool,
}

impl Reply {
    fn json(code: u16, reason: &str, body: Vec<u8>) -> Self {
        let mut bytes = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body);
        Self {
            bytes,
            body: Bytes::new(),
            close: false,
        }
    }

    /// Write head and body with as few `writev` calls as the socket takes.
    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let (mut head, mut body) = (&self.bytes[..], &self.body[..]);
        while !head.is_empty() || !body.is_empty() {
            let n = match w.write_vectored(&[io::IoSlice::new(head), io::IoSlice::new(body)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let from_head = n.min(head.len());
            head = &head[from_head..];
            body = &body[n - from_head..];
        }
        Ok(())
    }
    fn accepted() -> Self {
        Self::json(202, "Accepted", br#"{"status":"OK"}"#.to_vec())
    }
    fn closing(mut self) -> Self {
        self.close = true;
        self
    }
}

struct Request {
    method: String,
    path: String,
    close: bool,
    error_type: Option<String>,
    /// `Lambda-Extension-Name` (Extensions API).
    extension_name: Option<String>,
    /// `Lambda-Extension-Identifier` (Extensions API).
    extension_id: Option<String>,
    /// `None` when the body exceeded [`MAX_PAYLOAD`].
    body: Option<Vec<u8>>,
    /// A streamed response that failed midway: its error type and error
    /// object, from the trailers `Lambda-Runtime-Function-Error-Type` and
    /// `Lambda-Runtime-Function-Error-Body` (base64).
    stream_error: Option<StreamError>,
}

/// The error type and error object of a streamed response that failed.
type StreamError = (String, Vec<u8>);

/// Read one request; `Ok(None)` when the peer closed the connection cleanly.
fn read_request<R: BufRead, W: Write>(r: &mut R, w: &mut W) -> io::Result<Option<Request>> {
    let mut head = Vec::with_capacity(512);
    loop {
        let before = head.len();
        let n = r
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut head)?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated head",
            ));
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        let line = &head[before..];
        if (line == b"\r\n" || line == b"\n") && before > 0 {
            break;
        }
        if (line == b"\r\n" || line == b"\n") && before == 0 {
            // Tolerate stray blank lines between requests.
            head.clear();
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request head",
            ));
        }
    }
    let method = parsed.method.unwrap_or("").to_owned();
    let path = parsed.path.unwrap_or("").to_owned();
    let http10 = parsed.version == Some(0);
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut close = http10;
    let mut expect_continue = false;
    let mut error_type = None;
    let (mut extension_name, mut extension_id) = (None, None);
    for h in parsed.headers.iter() {
        let value = String::from_utf8_lossy(h.value).trim().to_owned();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length =
                Some(value.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if h
            .name
            .eq_ignore_ascii_case("lambda-runtime-function-error-type")
            || h.name
                .eq_ignore_ascii_case("lambda-extension-function-error-type")
        {
            error_type = Some(value);
        } else if h.name.eq_ignore_ascii_case("lambda-extension-name") {
            extension_name = Some(value);
        } else if h.name.eq_ignore_ascii_case("lambda-extension-identifier") {
            extension_id = Some(value);
        }
    }
    let has_body = chunked || content_length.unwrap_or(0) > 0;
    if expect_continue && has_body {
        if content_length.is_some_and(|n| n > MAX_PAYLOAD) {
            // Do not invite a body we will refuse; the caller closes.
            return Ok(Some(Request {
                method,
                path,
                close: true,
                error_type,
                extension_name,
                extension_id,
                body: None,
                stream_error: None,
            }));
        }
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        w.flush()?;
    }
    let mut stream_error = None;
    let body = if chunked {
        let (body, error) = read_chunked(r)?;
        stream_error = error;
        body
    } else if let Some(n) = content_length {
        if n > MAX_PAYLOAD {
            // Drain (bounded by the declared length) so the reply can be read.
            io::copy(&mut r.take(n as u64), &mut io::sink())?;
            None
        } else {
            let mut b = vec![0u8; n];
            r.read_exact(&mut b)?;
            Some(b)
        }
    } else {
        Some(Vec::new())
    };
    Ok(Some(Request {
        method,
        path,
        close,
        error_type,
        extension_name,
        extension_id,
        body,
        stream_error,
    }))
}

/// A streamed response's error from its trailers, if they name one: the
/// type, and the error object (the decoded `...-Error-Body` if it is a
/// JSON object, else one made of the type and that text).
fn stream_error(trailers: &[(String, String)]) -> Option<StreamError> {
    use base64::Engine as _;
    let find = |name: &str| {
        trailers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let error_type = find("lambda-runtime-function-error-type")?.to_owned();
    let raw = find("lambda-runtime-function-error-body").unwrap_or("");
    let text = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .unwrap_or_else(|_| raw.as_bytes().to_vec());
    let body = match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(_)) => text,
        _ => error_json(&error_type, &String::from_utf8_lossy(&text)),
    };
    Some((error_type, body))
}

/// Read a chunked body; `None` if it grows past [`MAX_PAYLOAD`] (the rest is
/// still consumed, up to a hard bound, so the connection stays in sync).
/// Also the error its trailers report, for a streamed response that failed
/// midway (Lambda's response streaming).
fn read_chunked<R: BufRead>(r: &mut R) -> io::Result<(Option<Vec<u8>>, Option<StreamError>)> {
    let mut body = Vec::new();
    let mut too_large = false;
    let mut consumed: usize = 0;
    loop {
        let mut line = Vec::new();
        r.take(1024).read_until(b'\n', &mut line)?;
        let text = String::from_utf8_lossy(&line);
        let size_str = text
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        let size = usize::from_str_radix(&size_str, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers until an empty line.
            let mut trailers = Vec::new();
            loop {
                let mut t = Vec::new();
                r.take(8192).read_until(b'\n', &mut t)?;
                if t.is_empty() || t == b"\r\n" || t == b"\n" {
                    break;
                }
                if trailers.len() < 16
                    && let Some((k, v)) = String::from_utf8_lossy(&t).split_once(':')
                {
                    trailers.push((k.trim().to_owned(), v.trim().to_owned()));
                }
            }
            let body = if too_large { None } else { Some(body) };
            return Ok((body, stream_error(&trailers)));
        }
        consumed = consumed.saturating_add(size);
        if consumed > 4 * MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunked body far too large",
            ));
        }
        if too_large || body.len() + size > MAX_PAYLOAD {
            too_large = true;
            body = Vec::new();
            io::copy(&mut r.take(size as u64), &mut io::sink())?;
        } else {
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
        }
        let mut crlf = Vec::new();
        r.take(2).read_until(b'\n', &mut crlf)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn server() -> (RuntimeApi, String, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let api = RuntimeApi::new(
            move |m| {
                let _ = tx.lock().unwrap().send(m);
            },
            Instant::now(),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        api.serve(l).unwrap();
        (api, addr, rx)
    }

    fn roundtrip(stream: &mut TcpStream, req: &[u8]) -> String {
        stream.write_all(req).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" {
                if head.starts_with("HTTP/1.1 100") {
                    // Interim response: the final one follows.
                    head.clear();
                    continue;
                }
                break;
            }
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        head + &String::from_utf8(body).unwrap()
    }

    #[test]
    fn next_then_response_on_one_keepalive_connection() {
        let (api, addr, rx) = server();
        api.push_invoke(Invocation {
            request_id: "r1".into(),
            deadline_ms: 42,
            invoked_function_arn: "arn:x".into(),
            trace_id: "t".into(),
            client_context: String::new(),
            payload: Bytes::from_static(b"{\"a\":1}"),
        });
        let mut s = TcpStream::connect(&addr).unwrap();
        let got = roundtrip(
            &mut s,
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        assert!(got.contains("Lambda-Runtime-Aws-Request-Id: r1\r\n"));
        assert!(got.contains("Lambda-Runtime-Deadline-Ms: 42\r\n"));
        assert!(got.ends_with("{\"a\":1}"));
        assert!(matches!(rx.recv().unwrap(), Message::Ready { .. }));

        let got = roundtrip(
            &mut s,
            b"POST /2018-06-01/runtime/invocation/r1/response HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        );
        assert!(got.starts_with("HTTP/1.1 202"), "{got}");
        assert_eq!(
            rx.recv().unwrap(),
            Message::Response {
                request_id: "r1".into(),
                body: b"abcde".to_vec()
            }
        );
        // A second answer for the same id is refused.
        let got = roundtrip(
            &mut s,
            b"POST /2018-06-01/runtime/invocation/r1/response HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    }

    #[test]
    fn error_and_init_error_carry_the_error_type() {
        let (api, addr, rx) = server();
        api.push_invoke(Invocation {
            request_id: "r2".into(),
            deadline_ms: 1,
            invoked_function_arn: String::new(),
            trace_id: String::new(),
            client_context: "ctx".into(),
            payload: Bytes::new(),
        });
        let mut s = TcpStream::connect(&addr).unwrap();
        let got = roundtrip(
            &mut s,
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n",
        );
        assert!(got.contains("Lambda-Runtime-Client-Context: ctx\r\n"));
        let _ready = rx.recv().unwrap();
        let got = roundtrip(
            &mut s,
            b"POST /2018-06-01/runtime/invocation/r2/error HTTP/1.1\r\nLambda-Runtime-Function-Error-Type: Oops\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert!(got.contains("202 Accepted"), "{got}");
        assert_eq!(
            rx.recv().unwrap(),
            Message::Error {
                request_id: "r2".into(),
                error_type: "Oops".into(),
                body: b"{}".to_vec()
            }
        );
        let got = roundtrip(
            &mut s,
            b"POST /2018-06-01/runtime/init/error HTTP/1.1\r\nLambda-Runtime-Function-Error-Type: Init.Bad\r\nContent-Length: 1\r\n\r\nx",
        );
        assert!(got.contains("202"), "{got}");
        assert_eq!(
            rx.recv().unwrap(),
            Message::InitError {
                error_type: "Init.Bad".into(),
                body: b"x".to_vec()
            }
        );
        let got = roundtrip(&mut s, b"GET /nope HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 404"));
    }

    /// Lambda's response streaming: a chunked response whose trailers name
    /// an error failed midway, so it is an error (its error object decoded
    /// from base64), not the part of the answer that was sent; trailers
    /// without an error leave the answer as it is.
    #[test]
    fn a_streamed_response_that_fails_midway_is_an_error() {
        let (api, addr, rx) = server();
        let mut s = TcpStream::connect(&addr).unwrap();
        for id in ["s1", "s2", "s3"] {
            api.push_invoke(Invocation {
                request_id: id.into(),
                deadline_ms: 1,
                invoked_function_arn: String::new(),
                trace_id: String::new(),
                client_context: String::new(),
                payload: Bytes::new(),
            });
            roundtrip(
                &mut s,
                b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n",
            );
            if id == "s1" {
                // The runtime's first `next`: it is initialised.
                assert!(matches!(rx.recv().unwrap(), Message::Ready { .. }));
            }
        }
        let post = |id: &str, trailers: &str| {
            format!(
                "POST /2018-06-01/runtime/invocation/{id}/response HTTP/1.1\r\n\
                 Lambda-Runtime-Function-Response-Mode: streaming\r\n\
                 Trailer: Lambda-Runtime-Function-Error-Type\r\n\
                 Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{trailers}\r\n"
            )
        };
        // "disk full" and a JSON error object, base64-encoded.
        let cases = [
            (
                "s1",
                "Lambda-Runtime-Function-Error-Type: Runtime.StreamError\r\n\
                 Lambda-Runtime-Function-Error-Body: ZGlzayBmdWxs\r\n",
                Message::Error {
                    request_id: "s1".into(),
                    error_type: "Runtime.StreamError".into(),
                    body: error_json("Runtime.StreamError", "disk full"),
                },
            ),
            (
                "s2",
                "lambda-runtime-function-error-type: Oops\r\n\
                 lambda-runtime-function-error-body: eyJlcnJvclR5cGUiOiJPb3BzIn0=\r\n",
                Message::Error {
                    request_id: "s2".into(),
                    error_type: "Oops".into(),
                    body: br#"{"errorType":"Oops"}"#.to_vec(),
                },
            ),
            (
                "s3",
                "X-Other: 1\r\n",
                Message::Response {
                    request_id: "s3".into(),
                    body: b"hello".to_vec(),
                },
            ),
        ];
        for (id, trailers, expected) in cases {
            let got = roundtrip(&mut s, post(id, trailers).as_bytes());
            assert!(got.starts_with("HTTP/1.1 202"), "{got}");
            assert_eq!(rx.recv().unwrap(), expected, "{id}");
        }
    }

    #[test]
    fn oversized_response_becomes_a_size_error() {
        let (api, addr, rx) = server();
        api.push_invoke(Invocation {
            request_id: "big".into(),
            deadline_ms: 1,
            invoked_function_arn: String::new(),
            trace_id: String::new(),
            client_context: String::new(),
            payload: Bytes::new(),
        });
        let mut s = TcpStream::connect(&addr).unwrap();
        roundtrip(
            &mut s,
            b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n",
        );
        let _ready = rx.recv().unwrap();
        let n = MAX_PAYLOAD + 10;
        let mut req = format!(
            "POST /2018-06-01/runtime/invocation/big/response HTTP/1.1\r\nContent-Length: {n}\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'x', n));
        let got = roundtrip(&mut s, &req);
        assert!(got.starts_with("HTTP/1.1 413"), "{got}");
        match rx.recv().unwrap() {
            Message::Error { error_type, .. } => {
                assert_eq!(error_type, "Function.ResponseSizeTooLarge")
            }
            other => panic!("{other:?}"),
        }
    }
}
