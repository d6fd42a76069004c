//! The host end of the agent channel, shared by the backends: frames read
//! from the agent (whatever carries them: a child's stdout, a VM's
//! virtio-console), log frames through the rate limiter into the log sink,
//! the rest queued for the sandbox; frames written to the agent; and what
//! the agent's frames mean during a start and during an invocation. Only
//! what differs between the backends (how a sandbox is killed, how it
//! ended, the words of its crash reports) stays in them.

use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::{
    DEFAULT_MAX_FRAME, ExitStatus, FrameDecoder, LogStream, Message, attachment_head, invoke_head,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::{Invocation, LogSink};
use crate::logs::{LogLine, LogRateLimiter};
use crate::{InvokeError, SandboxError};

/// A frame from the agent, or why the channel ended.
pub(crate) type FrameResult = Result<Message, SandboxError>;

/// Read frames from `reader` until it ends. A frame that cannot be decoded
/// means a hostile or broken peer: the reason is queued first, then
/// `on_violation` kills the sandbox (in that order, so that whoever sees the
/// broken channel finds the reason).
pub(crate) async fn read_frames<R: AsyncRead + Unpin>(
    mut reader: R,
    tx: mpsc::Sender<FrameResult>,
    logs: LogSink,
    limiter: Arc<LogRateLimiter>,
    meta: Arc<(String, String)>,
    on_violation: impl FnOnce(),
) {
    let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => {
                let e = match dec.finish() {
                    Ok(()) => SandboxError::ChannelClosed,
                    Err(e) => SandboxError::Protocol {
                        detail: e.to_string(),
                    },
                };
                let _ = tx.send(Err(e)).await;
                return;
            }
            Ok(n) => n,
            Err(_) => {
                let _ = tx.send(Err(SandboxError::ChannelClosed)).await;
                return;
            }
        };
        dec.push(&buf[..n]);
        loop {
            match dec.next_message() {
                Ok(None) => break,
                Ok(Some(Message::Log { stream, line })) => {
                    admit_line(&logs, &limiter, &meta, stream, &line);
                }
                Ok(Some(m)) => {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(SandboxError::Protocol {
                            detail: e.to_string(),
                        }))
                        .await;
                    on_violation();
                    return;
                }
            }
        }
    }
}

/// One log line of a sandbox (`meta`: function name and log stream name),
/// if the rate limiter lets it through; a note of the lines dropped before
/// it.
pub(crate) fn admit_line(
    logs: &LogSink,
    limiter: &LogRateLimiter,
    meta: &(String, String),
    stream: LogStream,
    line: &[u8],
) {
    if let Some(dropped) = limiter.admit() {
        if dropped > 0 {
            logs(LogLine::dropped(&meta.0, &meta.1, dropped));
        }
        logs(LogLine::new(&meta.0, &meta.1, stream, line));
    }
}

/// Writes one frame given as two consecutive parts (its head, then its
/// body as it is) with `writev`, both in one call where the pipe or socket
/// takes them: no copy of the body into a frame, and the agent wakes once
/// for the whole frame instead of waiting on the head for the rest.
pub(crate) async fn write_parts<W: AsyncWrite + Unpin>(
    writer: &mut W,
    head: &[u8],
    body: &[u8],
) -> std::io::Result<()> {
    let (mut head, mut body) = (head, body);
    while !head.is_empty() || !body.is_empty() {
        let n = writer
            .write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    writer.flush().await
}

/// The next frame from the agent, or `None` once `deadline` passed (a
/// closed channel is `ChannelClosed`).
pub(crate) async fn recv_until(
    rx: &mut mpsc::Receiver<FrameResult>,
    deadline: impl Into<Instant>,
) -> Option<FrameResult> {
    match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
        Ok(Some(m)) => Some(m),
        Ok(None) => Some(Err(SandboxError::ChannelClosed)),
        Err(_) => None,
    }
}

/// An error the sandbox of `function` reported, or found in it.
pub(crate) fn sandbox_err(function: &str, source: SandboxError) -> InvokeError {
    InvokeError::Sandbox {
        function: function.to_owned(),
        source,
    }
}

/// How a bootstrap ended, in words for error reports.
pub(crate) fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("exited with status {c}"),
        ExitStatus::Signal(s) => format!("was killed by signal {s}"),
    }
}

/// Split a Lambda error body (`{"errorType","errorMessage"}`) into type and
/// message, falling back to the header and the raw text.
pub(crate) fn parse_error_body(header_type: &str, body: &[u8]) -> (String, String) {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let t = v
        .as_ref()
        .and_then(|v| v.get("errorType"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            if header_type.is_empty() {
                "Unhandled".to_owned()
            } else {
                header_type.to_owned()
            }
        });
    let m = v
        .as_ref()
        .and_then(|v| v.get("errorMessage"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (t, m)
}

/// Why a sandbox's start ended without `Ready` (what the agent's frame, or
/// its absence, means); the backend turns the first three into its own
/// report, since only it knows how the sandbox ended.
#[derive(Debug)]
pub(crate) enum InitEnd {
    /// No frame within the init timeout.
    TimedOut,
    /// The bootstrap exited during init: how, in words.
    Exited(String),
    /// The channel closed: the sandbox itself ended.
    ChannelClosed,
    /// A complete report: the runtime's own init error, a setup failure
    /// the agent reported, or a frame the protocol does not allow here.
    Failed(InvokeError),
}

/// What `got` (the frame that came instead of `Ready`, `None` on timeout)
/// means for the start of `function`.
pub(crate) fn init_end(function: &str, got: Option<FrameResult>) -> InitEnd {
    match got {
        None => InitEnd::TimedOut,
        Some(Ok(Message::InitError { error_type, body })) => {
            let (error_type, message) = parse_error_body(&error_type, &body);
            InitEnd::Failed(InvokeError::InitFailed {
                function: function.to_owned(),
                error_type,
                message,
            })
        }
        Some(Ok(Message::Exited(status))) => {
            InitEnd::Exited(format!("bootstrap {} during init", describe(status)))
        }
        Some(Ok(Message::Fatal { message })) => {
            InitEnd::Failed(sandbox_err(function, SandboxError::Setup { message }))
        }
        Some(Ok(other)) => InitEnd::Failed(sandbox_err(
            function,
            SandboxError::Protocol {
                detail: format!("unexpected {} frame during init", other.kind_name()),
            },
        )),
        Some(Err(SandboxError::ChannelClosed)) => InitEnd::ChannelClosed,
        Some(Err(e)) => InitEnd::Failed(sandbox_err(function, e)),
    }
}

/// How waiting for the answer to an invocation ended.
#[derive(Debug)]
enum Answer {
    /// The function answered: its response, or its error. The sandbox can
    /// take the next invocation.
    Done(Result<Vec<u8>, InvokeError>),
    /// No answer within the invocation's timeout.
    TimedOut,
    /// The sandbox ended under the invocation: the crash report's context.
    Crashed(String),
    /// The agent reported a failure or broke the protocol: the sandbox
    /// cannot be trusted with another invocation.
    Broken(InvokeError),
}

/// Waits for the answer to invocation `request_id` of `function` for at
/// most `timeout`.
async fn await_answer(
    rx: &mut mpsc::Receiver<FrameResult>,
    function: &str,
    request_id: &str,
    timeout: Duration,
) -> Answer {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(got) = recv_until(rx, deadline).await else {
            return Answer::TimedOut;
        };
        return match got {
            Ok(Message::Response {
                request_id: id,
                body,
            }) if id == request_id => Answer::Done(Ok(body)),
            Ok(Message::Error {
                request_id: id,
                error_type,
                body,
            }) if id == request_id => {
                let (error_type, error_message) = parse_error_body(&error_type, &body);
                Answer::Done(Err(InvokeError::Function {
                    function: function.to_owned(),
                    error_type,
                    error_message,
                    body,
                }))
            }
            Ok(Message::Exited(status)) => Answer::Crashed(format!(
                "bootstrap {} during the invocation",
                describe(status)
            )),
            Ok(Message::Fatal { message }) => {
                Answer::Broken(sandbox_err(function, SandboxError::Setup { message }))
            }
            // Not an answer (the agent says it once per start): wait on.
            Ok(Message::Ready { .. }) => continue,
            Ok(other) => Answer::Broken(sandbox_err(
                function,
                SandboxError::Protocol {
                    detail: format!(
                        "unexpected {} frame during invocation {request_id}",
                        other.kind_name()
                    ),
                },
            )),
            Err(SandboxError::ChannelClosed) => {
                Answer::Crashed("the agent channel closed during the invocation".into())
            }
            Err(e) => Answer::Broken(sandbox_err(function, e)),
        };
    }
}

/// The host end of one sandbox's agent channel, as [`invoke_over`] needs
/// it: the backends differ only in how a frame is written, how the sandbox
/// is killed and how its crash is reported.
#[async_trait::async_trait]
pub(crate) trait AgentEnd: Send {
    /// The function the sandbox runs.
    fn function(&self) -> &str;
    /// Whether the sandbox was killed or found dead.
    fn is_dead(&self) -> bool;
    /// The frames from the agent.
    fn frames(&mut self) -> &mut mpsc::Receiver<FrameResult>;
    /// Writes one frame (head, then body); a failure kills the sandbox and
    /// says why.
    async fn write_frame(&mut self, head: &[u8], body: &[u8]) -> Result<(), InvokeError>;
    /// Kills the sandbox (at once; it is not reused).
    fn kill(&mut self);
    /// The report of a sandbox that ended (`context`: when, in words).
    async fn crash_error(&mut self, context: &str) -> InvokeError;
}

/// Runs one invocation over `sandbox`'s agent channel: its attachment,
/// then its event, each one frame written without copying the body; then
/// the answer within `timeout`. A timeout, a crash or a broken protocol
/// kills the sandbox.
pub(crate) async fn invoke_over<S: AgentEnd + ?Sized>(
    sandbox: &mut S,
    inv: Invocation,
    timeout: Duration,
) -> Result<Vec<u8>, InvokeError> {
    if sandbox.is_dead() {
        return Err(sandbox.crash_error("sandbox already dead").await);
    }
    if let Some(data) = &inv.attachment {
        sandbox
            .write_frame(&attachment_head(data.len()), data)
            .await?;
    }
    let head = invoke_head(
        &inv.request_id,
        inv.deadline_ms,
        &inv.invoked_function_arn,
        &inv.trace_id,
        &inv.client_context,
        inv.payload.len(),
    );
    sandbox.write_frame(&head, &inv.payload).await?;
    let function = sandbox.function().to_owned();
    match await_answer(sandbox.frames(), &function, &inv.request_id, timeout).await {
        Answer::Done(result) => result,
        Answer::TimedOut => {
            sandbox.kill();
            Err(InvokeError::Timeout { function, timeout })
        }
        Answer::Crashed(context) => {
            sandbox.kill();
            Err(sandbox.crash_error(&context).await)
        }
        Answer::Broken(e) => {
            sandbox.kill();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A channel holding `frames`, its sender kept open (a live agent).
    fn channel(
        frames: Vec<FrameResult>,
    ) -> (mpsc::Sender<FrameResult>, mpsc::Receiver<FrameResult>) {
        let (tx, rx) = mpsc::channel(frames.len().max(1));
        for f in frames {
            tx.try_send(f).expect("room for the frame");
        }
        (tx, rx)
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn the_answer_skips_ready_and_parses_a_function_error() {
        let body = br#"{"errorType":"Oops","errorMessage":"bad record"}"#.to_vec();
        let (_tx, mut rx) = channel(vec![
            Ok(Message::Ready { init_us: 1 }),
            Ok(Message::Error {
                request_id: "r1".into(),
                error_type: "Unhandled".into(),
                body: body.clone(),
            }),
        ]);
        match await_answer(&mut rx, "f", "r1", LONG).await {
            Answer::Done(Err(InvokeError::Function {
                function,
                error_type,
                error_message,
                body: got,
            })) => {
                assert_eq!(function, "f");
                assert_eq!(error_type, "Oops");
                assert_eq!(error_message, "bad record");
                assert_eq!(got, body);
            }
            other => panic!("expected the function's error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_to_another_request_breaks_the_sandbox() {
        let (_tx, mut rx) = channel(vec![Ok(Message::Response {
            request_id: "r0".into(),
            body: b"{}".to_vec(),
        })]);
        match await_answer(&mut rx, "f", "r1", LONG).await {
            Answer::Broken(InvokeError::Sandbox {
                source: SandboxError::Protocol { detail },
                ..
            }) => assert!(detail.contains("during invocation r1"), "{detail}"),
            other => panic!("expected a protocol violation, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_exit_or_a_closed_channel_is_a_crash_and_silence_a_timeout() {
        let (_tx, mut rx) = channel(vec![Ok(Message::Exited(ExitStatus::Signal(9)))]);
        match await_answer(&mut rx, "f", "r1", LONG).await {
            Answer::Crashed(context) => {
                assert_eq!(
                    context,
                    "bootstrap was killed by signal 9 during the invocation"
                )
            }
            other => panic!("expected a crash, got {other:?}"),
        }
        let (tx, mut rx) = channel(vec![]);
        drop(tx);
        assert!(matches!(
            await_answer(&mut rx, "f", "r1", LONG).await,
            Answer::Crashed(_)
        ));
        let (_tx, mut rx) = channel(vec![]);
        assert!(matches!(
            await_answer(&mut rx, "f", "r1", Duration::ZERO).await,
            Answer::TimedOut
        ));
    }

    #[test]
    fn init_ends_are_told_apart() {
        assert!(matches!(init_end("f", None), InitEnd::TimedOut));
        assert!(matches!(
            init_end("f", Some(Err(SandboxError::ChannelClosed))),
            InitEnd::ChannelClosed
        ));
        match init_end("f", Some(Ok(Message::Exited(ExitStatus::Code(3))))) {
            InitEnd::Exited(how) => assert_eq!(how, "bootstrap exited with status 3 during init"),
            other => panic!("expected an exit, got {other:?}"),
        }
        let body = br#"{"errorType":"Runtime.ImportModuleError","errorMessage":"no module"}"#;
        match init_end(
            "f",
            Some(Ok(Message::InitError {
                error_type: String::new(),
                body: body.to_vec(),
            })),
        ) {
            InitEnd::Failed(InvokeError::InitFailed {
                error_type,
                message,
                ..
            }) => {
                assert_eq!(error_type, "Runtime.ImportModuleError");
                assert_eq!(message, "no module");
            }
            other => panic!("expected the runtime's init error, got {other:?}"),
        }
        match init_end(
            "f",
            Some(Ok(Message::Response {
                request_id: "r".into(),
                body: vec![],
            })),
        ) {
            InitEnd::Failed(InvokeError::Sandbox {
                source: SandboxError::Protocol { detail },
                ..
            }) => assert!(detail.contains("during init"), "{detail}"),
            other => panic!("expected a protocol violation, got {other:?}"),
        }
    }

    #[test]
    fn an_error_body_that_is_not_json_keeps_the_header_type_and_the_text() {
        assert_eq!(
            parse_error_body("Crash", b"segfault"),
            ("Crash".to_owned(), "segfault".to_owned())
        );
        assert_eq!(
            parse_error_body("", b"{}"),
            ("Unhandled".to_owned(), "{}".to_owned())
        );
    }
}
