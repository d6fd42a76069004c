//! Lambda's Invoke API over HTTP (`sluice serve`): what `sam local
//! start-lambda` serves, so that AWS SDKs, the AWS CLI (`aws lambda invoke
//! --endpoint-url`) and tools that call Lambda invoke sluice's functions.
//!
//! `POST /2015-03-31/functions/{FunctionName}/invocations`, the name plain,
//! `NAME:QUALIFIER` or a function ARN (the qualifier is ignored: every
//! function is `$LATEST`), with `X-Amz-Invocation-Type`:
//!
//! * `RequestResponse` (the default): 200 with the function's response, or
//!   200 with `X-Amz-Function-Error: Unhandled` and Lambda's error object
//!   (`errorType`, `errorMessage`) when the function failed, timed out, ran
//!   out of memory or could not start, as Lambda answers;
//! * `Event`: 202 at once; the call runs in the background, retried twice
//!   with backoff as Lambda retries asynchronous calls, and a call that
//!   still fails is logged with its request id and error;
//! * `DryRun`: 204 if the function exists.
//!
//! Errors are the service's, with `x-amzn-ErrorType`: 404
//! `ResourceNotFoundException`, 429 `TooManyRequestsException` (the
//! function's `concurrency` and `max_queue` are full), 413
//! `RequestTooLargeException` (over 6 MB), 400
//! `InvalidRequestContentException` (a body that is not JSON, a client
//! context that is not base64 JSON). `X-Amz-Client-Context` reaches the
//! function as Lambda's client context. Requests are not authenticated
//! (SDKs sign them; the signature is not checked): listen on loopback.
//! `X-Amz-Log-Type: Tail` on a `RequestResponse` call answers with the last
//! 4 KB of the call's log in `X-Amz-Log-Result` (base64; the SDKs'
//! `LogResult`): `START`, what the function wrote, `END` and `REPORT`, as
//! Lambda shows it. The function's output goes to sluice's log as well.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use sluice_executor::{Executor, InvokeError, InvokeOptions, function_arn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Largest request body: Lambda's synchronous payload limit.
pub const MAX_REQUEST_BYTES: usize = sluice_protocol::MAX_PAYLOAD;
/// Longest request head.
const MAX_HEAD: usize = 64 * 1024;
/// A kept-alive connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(60);
/// Attempts of an asynchronous (`Event`) call: Lambda's first try and two
/// retries.
const EVENT_ATTEMPTS: u32 = 3;
/// Wait before an `Event` call's first retry, doubled for the next.
const EVENT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// `Event` calls accepted and not finished, at most; past it an `Event`
/// request is throttled (429), so a flood cannot grow memory without bound.
pub const MAX_EVENTS_IN_FLIGHT: usize = 1024;

/// Serves the Invoke API on `listener` until `shutdown` resolves; then
/// stops accepting, lets requests in progress and `Event` calls already
/// accepted finish, and returns.
pub async fn serve(
    listener: TcpListener,
    executor: Executor,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let api = Arc::new(Api {
        executor,
        events: tokio::sync::Mutex::new(JoinSet::new()),
    });
    // Tells kept-alive connections to close once their request is answered.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    crate::accept_until(
        "invoke API",
        listener,
        shutdown,
        &mut connections,
        |stream, peer| {
            let api = Arc::clone(&api);
            let stop = stop_rx.clone();
            async move {
                if let Err(e) = api.connection(stream, stop).await {
                    tracing::debug!(%peer, error = %e, "invoke API connection ended");
                }
            }
        },
    )
    .await;
    // Requests being answered finish; idle connections close at once.
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
    let mut events = api.events.lock().await;
    while events.join_next().await.is_some() {}
    Ok(())
}

struct Api {
    executor: Executor,
    /// `Event` calls accepted and not finished.
    events: tokio::sync::Mutex<JoinSet<()>>,
}

/// One parsed request.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One answer.
struct Reply {
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, reason: &'static str, body: Vec<u8>) -> Self {
        Self {
            status,
            reason,
            headers: Vec::new(),
            body,
        }
    }

    /// A service error: `x-amzn-ErrorType` and `{"Type", "message"}`.
    fn error(status: u16, reason: &'static str, kind: &str, message: &str) -> Self {
        let body = serde_json::json!({"Type": "User", "message": message}).to_string();
        let mut r = Self::new(status, reason, body.into_bytes());
        r.headers.push(("x-amzn-ErrorType", kind.to_owned()));
        r
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    async fn write_to(&self, stream: &mut TcpStream, close: bool) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.status,
            self.reason,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&self.body).await?;
        stream.flush().await
    }
}

impl Api {
    /// Requests of one kept-alive connection, one after another, until the
    /// peer closes it, it idles for [`IDLE`], or the server stops (a request
    /// already begun is still read and answered).
    async fn connection(
        &self,
        mut stream: TcpStream,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        let mut buf = Vec::with_capacity(4096);
        loop {
            if buf.is_empty() {
                // Between requests: wait for the next one's first bytes.
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                    ready = tokio::time::timeout(IDLE, stream.readable()) => {
                        if ready.is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            let request =
                match tokio::time::timeout(IDLE, read_request(&mut stream, &mut buf)).await {
                    Err(_) | Ok(Ok(None)) => return Ok(()),
                    Ok(Err(reply)) => {
                        // A request that cannot be read: answered, then closed.
                        return reply.write_to(&mut stream, true).await;
                    }
                    Ok(Ok(Some(r))) => r,
                };
            let close = request.close;
            let reply = self.answer(request).await;
            reply.write_to(&mut stream, close).await?;
            if close {
                return Ok(());
            }
        }
    }

    async fn answer(&self, request: Request) -> Reply {
        let path = request.path.split('?').next().unwrap_or_default();
        let name = match (
            request.method.as_str(),
            path.strip_prefix("/2015-03-31/functions/")
                .and_then(|rest| rest.strip_suffix("/invocations")),
        ) {
            ("POST", Some(name)) => function_name(&percent_decode(name)),
            (_, Some(_)) => {
                return Reply::error(
                    405,
                    "Method Not Allowed",
                    "UnknownOperationException",
                    "Invoke is POST",
                );
            }
            _ => {
                return Reply::error(
                    404,
                    "Not Found",
                    "UnknownOperationException",
                    "Unknown operation: sluice serves Invoke \
                     (POST /2015-03-31/functions/{FunctionName}/invocations) only",
                );
            }
        };
        if !self.executor.is_registered(&name) {
            return Reply::error(
                404,
                "Not Found",
                "ResourceNotFoundException",
                &format!("Function not found: {}", function_arn(&name)),
            );
        }
        let kind = request
            .header("X-Amz-Invocation-Type")
            .unwrap_or("RequestResponse")
            .to_owned();
        if kind == "DryRun" {
            return Reply::new(204, "No Content", Vec::new());
        }
        if !matches!(kind.as_str(), "RequestResponse" | "Event") {
            return Reply::error(
                400,
                "Bad Request",
                "InvalidParameterValueException",
                &format!(
                    "X-Amz-Invocation-Type {kind:?}: expected RequestResponse, Event or DryRun"
                ),
            );
        }
        let client_context = request.header("X-Amz-Client-Context").map(client_context);
        let tail = match request.header("X-Amz-Log-Type") {
            None | Some("None") => false,
            Some("Tail") => true,
            Some(other) => {
                return Reply::error(
                    400,
                    "Bad Request",
                    "InvalidParameterValueException",
                    &format!("X-Amz-Log-Type {other:?}: expected None or Tail"),
                );
            }
        };
        let body = if request.body.is_empty() {
            b"{}".to_vec()
        } else {
            request.body
        };
        if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
            return Reply::error(
                400,
                "Bad Request",
                "InvalidRequestContentException",
                "Could not parse request body into json",
            );
        }
        let client_context = match client_context {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(message)) => {
                return Reply::error(
                    400,
                    "Bad Request",
                    "InvalidRequestContentException",
                    message,
                );
            }
        };
        let opts = InvokeOptions {
            client_context,
            ..Default::default()
        };
        if kind == "Event" {
            let mut events = self.events.lock().await;
            while events.try_join_next().is_some() {}
            if events.len() >= MAX_EVENTS_IN_FLIGHT {
                return Reply::error(
                    429,
                    "Too Many Requests",
                    "TooManyRequestsException",
                    &format!("{MAX_EVENTS_IN_FLIGHT} asynchronous calls are waiting or running"),
                );
            }
            let id = uuid_like();
            events.spawn(event_call(
                self.executor.clone(),
                name,
                body,
                opts,
                id.clone(),
            ));
            return Reply::new(202, "Accepted", Vec::new()).with("x-amzn-RequestId", id);
        }
        let (result, log) = if tail {
            self.executor.invoke_tailed(&name, body, opts).await
        } else {
            (self.executor.invoke_with(&name, body, opts).await, None)
        };
        let reply = match result {
            Ok(r) => Reply::new(200, "OK", r.payload)
                .with("X-Amz-Executed-Version", "$LATEST")
                .with("x-amzn-RequestId", r.request_id),
            Err(e) => error_reply(&e),
        };
        match log {
            Some(log) => reply.with(
                "X-Amz-Log-Result",
                base64::engine::general_purpose::STANDARD.encode(log),
            ),
            None => reply,
        }
    }
}

/// An asynchronous call: tried up to [`EVENT_ATTEMPTS`] times while the
/// failure is one a retry can mend; a call that still fails is logged.
async fn event_call(
    executor: Executor,
    name: String,
    body: Vec<u8>,
    opts: InvokeOptions,
    id: String,
) {
    let mut wait = EVENT_RETRY_BACKOFF;
    for attempt in 1..=EVENT_ATTEMPTS {
        match executor
            .invoke_with(&name, body.clone(), opts.clone())
            .await
        {
            Ok(_) => return,
            Err(e) if attempt < EVENT_ATTEMPTS && e.retryable() => {
                tracing::info!(function = %name, request = %id, attempt, error = %e, "asynchronous call failed; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                tracing::error!(function = %name, request = %id, attempts = attempt, error = %e, error_type = e.error_type(), "asynchronous call failed for good");
                return;
            }
        }
    }
}

/// How Lambda answers an invocation that did not succeed.
fn error_reply(e: &InvokeError) -> Reply {
    match e {
        InvokeError::UnknownFunction { name, .. } => Reply::error(
            404,
            "Not Found",
            "ResourceNotFoundException",
            &format!("Function not found: {}", function_arn(name)),
        ),
        InvokeError::Throttled { .. } => Reply::error(
            429,
            "Too Many Requests",
            "TooManyRequestsException",
            "Rate Exceeded.",
        ),
        InvokeError::PayloadTooLarge { size, limit } => Reply::error(
            413,
            "Request Entity Too Large",
            "RequestTooLargeException",
            &format!(
                "{size} byte payload is too large for the RequestResponse invocation type (limit {limit} bytes)"
            ),
        ),
        InvokeError::Sandbox { .. } | InvokeError::ShuttingDown => Reply::error(
            500,
            "Internal Server Error",
            "ServiceException",
            &e.to_string(),
        ),
        // The function's own failures: 200, and Lambda's error object.
        InvokeError::Function {
            error_type,
            error_message,
            body,
            ..
        } => {
            let mut error = match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            error.insert("errorType".into(), error_type.clone().into());
            error.insert("errorMessage".into(), error_message.clone().into());
            unhandled(serde_json::Value::Object(error))
        }
        InvokeError::Timeout { .. }
        | InvokeError::InitFailed { .. }
        | InvokeError::OutOfMemory { .. }
        | InvokeError::SandboxCrashed { .. } => unhandled(serde_json::json!({
            "errorType": e.error_type(),
            "errorMessage": e.to_string(),
        })),
    }
}

fn unhandled(error: serde_json::Value) -> Reply {
    Reply::new(200, "OK", error.to_string().into_bytes())
        .with("X-Amz-Function-Error", "Unhandled")
        .with("X-Amz-Executed-Version", "$LATEST")
}

/// `X-Amz-Client-Context`: base64 of a JSON object, given to the function
/// as its JSON text.
fn client_context(header: &str) -> Result<String, &'static str> {
    const BAD: &str = "Client context must be a valid Base64-encoded JSON object.";
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(header.trim())
        .map_err(|_| BAD)?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(_)) => String::from_utf8(bytes).map_err(|_| BAD),
        _ => Err(BAD),
    }
}

/// The function's name from a `FunctionName` path segment: `NAME`,
/// `NAME:QUALIFIER`, or an ARN `arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`.
fn function_name(segment: &str) -> String {
    let name = match segment.split_once(":function:") {
        Some((_, rest)) => rest,
        None => segment,
    };
    name.split(':').next().unwrap_or(name).to_owned()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A request id in the usual UUID shape (random, version 4 bits set).
fn uuid_like() -> String {
    let mut b = [0u8; 16];
    getrandom_or_time(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn getrandom_or_time(b: &mut [u8; 16]) {
    use std::io::Read as _;
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&t.to_le_bytes());
    }
}

/// Reads one request into `buf` (which keeps what follows it): `Ok(None)`
/// when the peer closed the connection between requests; `Err` with the
/// reply for a request that cannot be taken.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Request>, Reply> {
    let bad = |message: &str| {
        Reply::error(
            400,
            "Bad Request",
            "InvalidRequestContentException",
            message,
        )
    };
    let io = |_: std::io::Error| bad("the connection failed");
    let mut chunk = [0u8; 16 * 1024];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Reply::error(
                431,
                "Request Header Fields Too Large",
                "InvalidRequestContentException",
                "request head too large",
            ));
        }
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(bad("the request ended early"))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("malformed request")),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let path = req.path.unwrap_or_default().to_owned();
    let http10 = req.version == Some(0);
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    if find("Transfer-Encoding").is_some() {
        return Err(Reply::error(
            411,
            "Length Required",
            "InvalidRequestContentException",
            "send the body with a Content-Length",
        ));
    }
    let length: usize = match find("Content-Length") {
        None => 0,
        Some(v) => v.parse().map_err(|_| bad("bad Content-Length"))?,
    };
    if length > MAX_REQUEST_BYTES {
        return Err(Reply::error(
            413,
            "Request Entity Too Large",
            "RequestTooLargeException",
            &format!(
                "Request must be smaller than {MAX_REQUEST_BYTES} bytes for the InvokeFunction operation"
            ),
        ));
    }
    if find("Expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(io)?;
    }
    let close = http10 || find("Connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
    buf.drain(..head_len);
    while buf.len() < length {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("the request body ended early"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_come_plain_qualified_or_as_arns() {
        assert_eq!(function_name("echo"), "echo");
        assert_eq!(function_name("echo:$LATEST"), "echo");
        assert_eq!(
            function_name("arn:aws:lambda:us-east-1:123456789012:function:echo:prod"),
            "echo"
        );
        assert_eq!(percent_decode("arn%3Aaws%3Alambda"), "arn:aws:lambda");
    }

    #[test]
    fn client_context_is_base64_of_a_json_object() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(r#"{"custom":{"a":1}}"#);
        assert_eq!(client_context(&b64).unwrap(), r#"{"custom":{"a":1}}"#);
        assert!(client_context("not base64!").is_err());
        let list = base64::engine::general_purpose::STANDARD.encode("[1]");
        assert!(client_context(&list).is_err());
    }
}
