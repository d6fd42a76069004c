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
//! * `Event`: 202 at once; the call runs in the background, retried (twice
//!   by default, [`AsyncConfig::max_retry_attempts`]) with backoff as Lambda
//!   retries asynchronous calls, and a call that still fails is logged with
//!   its request id and error, and recorded in Lambda's destination
//!   record format in [`AsyncConfig::on_failure`], if set (a call older
//!   than [`AsyncConfig::max_event_age`] is given up there too, and a call
//!   that succeeds is recorded in [`AsyncConfig::on_success`]);
//! * `DryRun`: 204 if the function exists.
//!
//! `ListFunctions`, `GetFunction` and `GetFunctionConfiguration` (`GET
//! /2015-03-31/functions/[NAME[/configuration]]`) describe the pipeline's
//! functions as Lambda's `FunctionConfiguration` (`provided.al2023`,
//! `$LATEST`, handler, timeout, memory, layers; no environment).
//!
//! `InvokeWithResponseStream` (`POST
//! /2021-11-15/functions/{FunctionName}/response-streaming-invocations`,
//! `RequestResponse` or `DryRun`) answers with an AWS event stream: the
//! response as one `PayloadChunk`, then `InvokeComplete` (the error's type
//! and message as `ErrorCode` and `ErrorDetails` when the function failed,
//! `LogResult` with `LogType=Tail`). A function that streams its response
//! (`Lambda-Runtime-Function-Response-Mode: streaming`) is answered whole,
//! when it finishes: the sandbox's channel carries whole responses.
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
/// Retries of an asynchronous (`Event`) call that failed, at most: Lambda's
/// `MaximumRetryAttempts` range, 0 to 2 (its default, 2).
pub const MAX_RETRY_ATTEMPTS: u32 = 2;
/// Wait before an `Event` call's first retry, doubled for the next.
const EVENT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// `Event` calls accepted and not finished, at most; past it an `Event`
/// request is throttled (429), so a flood cannot grow memory without bound.
pub const MAX_EVENTS_IN_FLIGHT: usize = 1024;

/// How asynchronous (`Event`) calls end, as a Lambda function's
/// `EventInvokeConfig` sets it.
#[derive(Debug, Clone)]
pub struct AsyncConfig {
    /// Retries of a failed call (0 to [`MAX_RETRY_ATTEMPTS`]).
    pub max_retry_attempts: u32,
    /// A call not started (or retried) within this age of its acceptance
    /// is given up (Lambda's `MaximumEventAgeInSeconds`, default 6 hours).
    pub max_event_age: Duration,
    /// Where a call that failed for good, or grew too old, is recorded, one
    /// JSON object per line in Lambda's destination record format
    /// (appended); `None`: only logged.
    pub on_failure: Option<std::path::PathBuf>,
    /// Where a call that succeeded is recorded, likewise (Lambda's
    /// `OnSuccess` destination); `None`: not recorded.
    pub on_success: Option<std::path::PathBuf>,
}

/// Lambda's default and largest `MaximumEventAgeInSeconds`: 6 hours.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(6 * 3600);

impl Default for AsyncConfig {
    fn default() -> Self {
        Self {
            max_retry_attempts: MAX_RETRY_ATTEMPTS,
            max_event_age: MAX_EVENT_AGE,
            on_failure: None,
            on_success: None,
        }
    }
}

/// Serves the Invoke API on `listener` until `shutdown` resolves; then
/// stops accepting, lets requests in progress and `Event` calls already
/// accepted finish, and returns.
pub async fn serve(
    listener: TcpListener,
    executor: Executor,
    config: AsyncConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let api = Arc::new(Api {
        executor,
        events: tokio::sync::Mutex::new(JoinSet::new()),
        config: Arc::new(config),
        failures: Arc::new(tokio::sync::Mutex::new(())),
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
    config: Arc<AsyncConfig>,
    /// Held while a failure record is appended (one line at a time).
    failures: Arc<tokio::sync::Mutex<()>>,
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
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: u16, reason: &'static str, body: Vec<u8>) -> Self {
        Self {
            status,
            reason,
            content_type: "application/json",
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
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.reason,
            self.content_type,
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
        if request.method == "GET"
            && let Some(reply) = self.describe(path)
        {
            return reply;
        }
        let invoke = path
            .strip_prefix("/2015-03-31/functions/")
            .and_then(|rest| rest.strip_suffix("/invocations"));
        let streamed = path
            .strip_prefix("/2021-11-15/functions/")
            .and_then(|rest| rest.strip_suffix("/response-streaming-invocations"));
        let streaming = streamed.is_some();
        let name = match (request.method.as_str(), invoke.or(streamed)) {
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
                     (POST /2015-03-31/functions/{FunctionName}/invocations) and \
                     InvokeWithResponseStream \
                     (POST /2021-11-15/functions/{FunctionName}/response-streaming-invocations) only",
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
        let kinds: &[&str] = if streaming {
            &["RequestResponse"]
        } else {
            &["RequestResponse", "Event"]
        };
        if !kinds.contains(&kind.as_str()) {
            let expected = if streaming {
                "RequestResponse or DryRun"
            } else {
                "RequestResponse, Event or DryRun"
            };
            return Reply::error(
                400,
                "Bad Request",
                "InvalidParameterValueException",
                &format!("X-Amz-Invocation-Type {kind:?}: expected {expected}"),
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
                EventCall {
                    executor: self.executor.clone(),
                    config: self.config.clone(),
                    failures: self.failures.clone(),
                    accepted: tokio::time::Instant::now(),
                },
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
        let log = log.map(|l| base64::engine::general_purpose::STANDARD.encode(l));
        if streaming {
            return streamed_reply(result, log);
        }
        let reply = match result {
            Ok(r) => Reply::new(200, "OK", r.payload)
                .with("X-Amz-Executed-Version", "$LATEST")
                .with("x-amzn-RequestId", r.request_id),
            Err(e) => error_reply(&e),
        };
        match log {
            Some(log) => reply.with("X-Amz-Log-Result", log),
            None => reply,
        }
    }
}

impl Api {
    /// `ListFunctions`, `GetFunction` and `GetFunctionConfiguration`, for
    /// the SDKs and tools that look a function up before calling it; `None`
    /// for another path.
    fn describe(&self, path: &str) -> Option<Reply> {
        let rest = path.strip_prefix("/2015-03-31/functions")?;
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        if rest.is_empty() {
            let functions: Vec<_> = self
                .executor
                .function_names()
                .iter()
                .filter_map(|name| self.configuration(name))
                .collect();
            let body = serde_json::json!({ "Functions": functions }).to_string();
            return Some(Reply::new(200, "OK", body.into_bytes()));
        }
        let (segment, configuration_only) = match rest.strip_suffix("/configuration") {
            Some(segment) => (segment, true),
            None if !rest.contains('/') => (rest, false),
            None => return None,
        };
        let name = function_name(&percent_decode(segment));
        let Some(configuration) = self.configuration(&name) else {
            return Some(Reply::error(
                404,
                "Not Found",
                "ResourceNotFoundException",
                &format!("Function not found: {}", function_arn(&name)),
            ));
        };
        let body = if configuration_only {
            configuration
        } else {
            let dir = self
                .executor
                .function(&name)
                .map(|(spec, _)| spec.dir.display().to_string())
                .unwrap_or_default();
            serde_json::json!({
                "Configuration": configuration,
                "Code": { "RepositoryType": "Local", "Location": format!("file://{dir}") },
            })
        };
        Some(Reply::new(200, "OK", body.to_string().into_bytes()))
    }

    /// Lambda's `FunctionConfiguration` of a registered function. Its
    /// environment is left out: the API is not authenticated.
    fn configuration(&self, name: &str) -> Option<serde_json::Value> {
        let (spec, version) = self.executor.function(name)?;
        let modified = std::fs::metadata(&spec.dir)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| std::time::SystemTime::now());
        let layers: Vec<_> = spec
            .layers
            .iter()
            .map(|l| {
                let layer = l.file_name().unwrap_or_default().to_string_lossy();
                serde_json::json!({
                    "Arn": format!("arn:aws:lambda:sluice-local:000000000000:layer:{layer}:1"),
                    "CodeSize": 0,
                })
            })
            .collect();
        Some(serde_json::json!({
            "FunctionName": spec.name,
            "FunctionArn": function_arn(&spec.name),
            "Runtime": "provided.al2023",
            "Role": "arn:aws:iam::000000000000:role/sluice",
            "Handler": spec.handler,
            "CodeSize": 0,
            "Description": format!("{} (sluice)", spec.dir.display()),
            "Timeout": spec.timeout.as_secs_f64().ceil() as u64,
            "MemorySize": spec.memory_mb,
            "LastModified": chrono::DateTime::<chrono::Utc>::from(modified)
                .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
                .to_string(),
            "CodeSha256": version,
            "Version": "$LATEST",
            "TracingConfig": { "Mode": "PassThrough" },
            "Layers": layers,
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Zip",
            "Architectures": [match std::env::consts::ARCH {
                "aarch64" => "arm64",
                other => other,
            }],
            "EphemeralStorage": { "Size": spec.tmp_mb },
        }))
    }
}

/// What an asynchronous call needs besides its request.
struct EventCall {
    executor: Executor,
    config: Arc<AsyncConfig>,
    /// Held while a destination record is appended (one line at a time).
    failures: Arc<tokio::sync::Mutex<()>>,
    /// When the request was accepted (for `max_event_age`).
    accepted: tokio::time::Instant,
}

impl EventCall {
    /// Append `record` to `file`, if there is one.
    async fn record(
        &self,
        file: Option<&std::path::Path>,
        name: &str,
        id: &str,
        record: serde_json::Value,
    ) {
        let Some(path) = file else { return };
        let _held = self.failures.lock().await;
        if let Err(io) = append_line(path, &record) {
            tracing::error!(function = %name, request = %id, file = %path.display(), error = %io, "cannot record the asynchronous call");
        }
    }
}

/// An asynchronous call: tried once and retried up to
/// `max_retry_attempts` times while the failure is one a retry can mend
/// (the function's errors included, as Lambda retries them), and not once
/// it is older than `max_event_age`; a call that still fails is logged,
/// and recorded in the on-failure file if there is one; a call that
/// succeeds, in the on-success file.
async fn event_call(call: EventCall, name: String, body: Vec<u8>, opts: InvokeOptions, id: String) {
    let attempts = 1 + call.config.max_retry_attempts.min(MAX_RETRY_ATTEMPTS);
    let mut wait = EVENT_RETRY_BACKOFF;
    let mut last: Option<serde_json::Value> = None;
    for attempt in 1..=attempts {
        if call.accepted.elapsed() > call.config.max_event_age {
            tracing::error!(function = %name, request = %id, attempts = attempt - 1, "asynchronous call given up: older than the maximum event age");
            let record = destination_record(&name, &id, attempt - 1, &body, Outcome::Expired(last));
            call.record(call.config.on_failure.as_deref(), &name, &id, record)
                .await;
            return;
        }
        match call
            .executor
            .invoke_with(&name, body.clone(), opts.clone())
            .await
        {
            Ok(r) => {
                let record =
                    destination_record(&name, &id, attempt, &body, Outcome::Success(&r.payload));
                call.record(call.config.on_success.as_deref(), &name, &id, record)
                    .await;
                return;
            }
            Err(e) if attempt < attempts && e.retryable() => {
                tracing::info!(function = %name, request = %id, attempt, error = %e, "asynchronous call failed; retrying in {wait:?}");
                last = Some(error_object(&e));
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => {
                tracing::error!(function = %name, request = %id, attempts = attempt, error = %e, error_type = e.error_type(), "asynchronous call failed for good");
                let record = destination_record(
                    &name,
                    &id,
                    attempt,
                    &body,
                    Outcome::Failed(error_object(&e)),
                );
                call.record(call.config.on_failure.as_deref(), &name, &id, record)
                    .await;
                return;
            }
        }
    }
}

/// How an asynchronous call ended, for its destination record.
enum Outcome<'a> {
    /// The function's response.
    Success(&'a [u8]),
    /// Its last error object, retries exhausted.
    Failed(serde_json::Value),
    /// Too old to be tried again; the last error object, if it was tried.
    Expired(Option<serde_json::Value>),
}

/// Lambda's error object of a failed call.
fn error_object(e: &InvokeError) -> serde_json::Value {
    function_error(e).unwrap_or_else(
        || serde_json::json!({"errorType": e.error_type(), "errorMessage": e.to_string()}),
    )
}

/// Lambda's destination record of an asynchronous call (the format of its
/// `OnSuccess` and `OnFailure` destinations).
fn destination_record(
    name: &str,
    id: &str,
    attempts: u32,
    body: &[u8],
    outcome: Outcome<'_>,
) -> serde_json::Value {
    let json = |bytes: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned().into())
    };
    let (condition, response) = match outcome {
        Outcome::Success(payload) => ("Success", Some(json(payload))),
        Outcome::Failed(error) => ("RetriesExhausted", Some(error)),
        Outcome::Expired(error) => ("EventAgeExceeded", error),
    };
    let mut record = serde_json::json!({
        "version": "1.0",
        "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "requestContext": {
            "requestId": id,
            "functionArn": format!("{}:$LATEST", function_arn(name)),
            "condition": condition,
            "approximateInvokeCount": attempts,
        },
        "requestPayload": json(body),
    });
    if let Some(response) = response {
        let mut context = serde_json::json!({"statusCode": 200, "executedVersion": "$LATEST"});
        if condition != "Success" {
            context["functionError"] = "Unhandled".into();
        }
        record["responseContext"] = context;
        record["responsePayload"] = response;
    }
    record
}

/// Append one JSON line to `path`, creating it if needed.
fn append_line(path: &std::path::Path, record: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut line = record.to_string();
    line.push('\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}

/// How Lambda answers an invocation that did not succeed.
fn error_reply(e: &InvokeError) -> Reply {
    if let Some(error) = function_error(e) {
        return unhandled(error);
    }
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
        _ => Reply::error(
            500,
            "Internal Server Error",
            "ServiceException",
            &e.to_string(),
        ),
    }
}

/// Lambda's error object (`errorType`, `errorMessage`, and what the
/// function added) for the function's own failures, which Lambda answers
/// with 200; `None` for the service's errors.
fn function_error(e: &InvokeError) -> Option<serde_json::Value> {
    match e {
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
            Some(serde_json::Value::Object(error))
        }
        InvokeError::Timeout { .. }
        | InvokeError::InitFailed { .. }
        | InvokeError::OutOfMemory { .. }
        | InvokeError::SandboxCrashed { .. } => Some(serde_json::json!({
            "errorType": e.error_type(),
            "errorMessage": e.to_string(),
        })),
        _ => None,
    }
}

/// The answer to `InvokeWithResponseStream`: an AWS event stream of the
/// response as one `PayloadChunk` (the sandbox's channel carries whole
/// responses: a streaming function's chunks arrive together when it
/// finishes), then `InvokeComplete`, with the error's type and message in
/// `ErrorCode` and `ErrorDetails` when the function failed. The service's
/// errors are the same as `Invoke`'s.
fn streamed_reply(
    result: Result<sluice_executor::Response, InvokeError>,
    log: Option<String>,
) -> Reply {
    let (payload, request_id, error) = match result {
        Ok(r) => (Some(r.payload), Some(r.request_id), None),
        Err(e) => match function_error(&e) {
            Some(error) => (None, None, Some(error)),
            None => return error_reply(&e),
        },
    };
    let mut body = Vec::new();
    if let Some(payload) = payload.filter(|p| !p.is_empty()) {
        eventstream::event(
            &mut body,
            "PayloadChunk",
            "application/octet-stream",
            &payload,
        );
    }
    let mut complete = serde_json::Map::new();
    if let Some(error) = &error {
        let field = |k: &str| error.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        complete.insert("ErrorCode".into(), field("errorType").into());
        complete.insert("ErrorDetails".into(), field("errorMessage").into());
    }
    if let Some(log) = log {
        complete.insert("LogResult".into(), log.into());
    }
    let complete = serde_json::Value::Object(complete).to_string();
    eventstream::event(
        &mut body,
        "InvokeComplete",
        "application/json",
        complete.as_bytes(),
    );
    let mut reply = Reply::new(200, "OK", body).with("X-Amz-Executed-Version", "$LATEST");
    reply.content_type = "application/vnd.amazon.eventstream";
    match request_id {
        Some(id) => reply.with("x-amzn-RequestId", id),
        None => reply,
    }
}

/// AWS's event stream framing (`application/vnd.amazon.eventstream`), as
/// the SDKs read a streamed response.
mod eventstream {
    /// Append one event message: `:message-type` `event`, its
    /// `:event-type` and `:content-type`, and `payload`. A message is its
    /// total length and its headers' length (big-endian `u32`s), the CRC-32
    /// of those 8 bytes, the headers, the payload, and the CRC-32 of all
    /// that came before.
    pub(super) fn event(out: &mut Vec<u8>, event_type: &str, content_type: &str, payload: &[u8]) {
        let mut headers = Vec::new();
        for (name, value) in [
            (":event-type", event_type),
            (":content-type", content_type),
            (":message-type", "event"),
        ] {
            headers.push(name.len() as u8);
            headers.extend_from_slice(name.as_bytes());
            headers.push(STRING);
            headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
            headers.extend_from_slice(value.as_bytes());
        }
        let total = 12 + headers.len() + payload.len() + 4;
        let start = out.len();
        out.extend_from_slice(&(total as u32).to_be_bytes());
        out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        let prelude_crc = crc32fast::hash(&out[start..start + 8]);
        out.extend_from_slice(&prelude_crc.to_be_bytes());
        out.extend_from_slice(&headers);
        out.extend_from_slice(payload);
        let message_crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&message_crc.to_be_bytes());
    }

    /// The header value type of a string.
    const STRING: u8 = 7;

    #[cfg(test)]
    mod tests {
        /// The layout, checked field by field.
        #[test]
        fn a_message_is_prelude_headers_payload_and_crcs() {
            let mut out = Vec::new();
            super::event(
                &mut out,
                "PayloadChunk",
                "application/octet-stream",
                b"hello",
            );
            let total = u32::from_be_bytes(out[0..4].try_into().unwrap()) as usize;
            let headers = u32::from_be_bytes(out[4..8].try_into().unwrap()) as usize;
            assert_eq!(total, out.len());
            assert_eq!(
                u32::from_be_bytes(out[8..12].try_into().unwrap()),
                crc32fast::hash(&out[..8])
            );
            assert_eq!(&out[12..13], &[11]);
            assert_eq!(&out[13..24], b":event-type");
            assert_eq!(out[24], 7);
            assert_eq!(&out[25..27], &12u16.to_be_bytes());
            assert_eq!(&out[27..39], b"PayloadChunk");
            assert_eq!(&out[12 + headers..total - 4], b"hello");
            assert_eq!(
                u32::from_be_bytes(out[total - 4..].try_into().unwrap()),
                crc32fast::hash(&out[..total - 4])
            );
        }
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
    fn destination_records_say_how_the_call_ended() {
        let ok = destination_record("f", "r1", 1, br#"{"a":1}"#, Outcome::Success(b"[2]"));
        assert_eq!(ok["requestContext"]["condition"], "Success");
        assert_eq!(ok["requestContext"]["approximateInvokeCount"], 1);
        assert_eq!(ok["requestPayload"], serde_json::json!({"a": 1}));
        assert_eq!(ok["responsePayload"], serde_json::json!([2]));
        assert!(ok["responseContext"].get("functionError").is_none());

        let error = serde_json::json!({"errorType": "E", "errorMessage": "m"});
        let failed = destination_record("f", "r2", 3, b"not json", Outcome::Failed(error.clone()));
        assert_eq!(failed["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(failed["requestPayload"], "not json");
        assert_eq!(failed["responseContext"]["functionError"], "Unhandled");
        assert_eq!(failed["responsePayload"], error);

        let old = destination_record("f", "r3", 0, b"{}", Outcome::Expired(None));
        assert_eq!(old["requestContext"]["condition"], "EventAgeExceeded");
        assert_eq!(old["requestContext"]["approximateInvokeCount"], 0);
        assert!(old.get("responsePayload").is_none() && old.get("responseContext").is_none());
        let retried =
            destination_record("f", "r4", 1, b"{}", Outcome::Expired(Some(error.clone())));
        assert_eq!(retried["responsePayload"], error);
    }

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
