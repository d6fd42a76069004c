//! The host end of the agent channel, shared by the backends: frames read
//! from the agent (whatever carries them: a child's stdout, a VM's
//! virtio-console), log frames through the rate limiter into the log sink,
//! the rest queued for the sandbox.

use std::sync::Arc;

use sluice_protocol::{DEFAULT_MAX_FRAME, FrameDecoder, LogStream, Message};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use crate::SandboxError;
use crate::backend::LogSink;
use crate::logs::{LogLine, LogRateLimiter};

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
