//! Lambda's `LogType=Tail`: the last 4 KB of one invocation's log, handed
//! back with its result (the AWS SDKs' `LogResult`, base64 in the
//! `X-Amz-Log-Result` header).
//!
//! Every sandbox the pool starts has a [`LogTap`] between it and the log
//! sink: idle unless a call that wants a tail arms it, for that call only
//! (a sandbox runs one call at a time). The agent sends a function's lines
//! ahead of its answer, so the tail holds everything the function wrote
//! before it answered; a cold start's tail begins with the initialisation's
//! lines, as Lambda's does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::InvokeError;
use crate::backend::{Invocation, LogSink, Sandbox};
use crate::logs::LogLine;
use crate::report::{InitReport, Report};

/// How much of the log a tail keeps: Lambda's 4 KB.
pub const TAIL_BYTES: usize = 4096;

/// The lines a sandbox writes while armed.
#[derive(Debug, Default)]
pub struct LogTap {
    kept: Mutex<Option<String>>,
}

impl LogTap {
    /// Keep the lines from now on (dropping any kept before).
    pub(crate) fn arm(&self) {
        *self.lock() = Some(String::new());
    }

    /// What was kept since [`Self::arm`], and stop keeping.
    pub(crate) fn take(&self) -> Option<String> {
        self.lock().take()
    }

    fn record(&self, line: &LogLine) {
        if let Some(kept) = self.lock().as_mut() {
            kept.push_str(&line.line);
            kept.push('\n');
            // Only the end is ever shown: cut the front now and then.
            if kept.len() > 4 * TAIL_BYTES {
                let cut = floor_char_boundary(kept, kept.len() - TAIL_BYTES);
                kept.drain(..cut);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `logs`, with the lines also kept here while armed.
    pub(crate) fn sink(self: &Arc<Self>, logs: LogSink) -> LogSink {
        let tap = self.clone();
        Arc::new(move |line: LogLine| {
            tap.record(&line);
            logs(line);
        })
    }
}

/// A sandbox with its tap.
pub(crate) struct Tapped {
    pub(crate) inner: Box<dyn Sandbox>,
    pub(crate) tap: Arc<LogTap>,
}

#[async_trait]
impl Sandbox for Tapped {
    async fn invoke(&mut self, inv: Invocation, timeout: Duration) -> Result<Vec<u8>, InvokeError> {
        self.inner.invoke(inv, timeout).await
    }

    fn is_reusable(&self) -> bool {
        self.inner.is_reusable()
    }

    fn init_duration(&self) -> Duration {
        self.inner.init_duration()
    }

    fn max_memory_used(&self) -> Option<u64> {
        self.inner.max_memory_used()
    }

    fn log_tap(&self) -> Option<&LogTap> {
        Some(&self.tap)
    }

    async fn shutdown(self: Box<Self>) {
        self.inner.shutdown().await
    }
}

/// The tail of an invocation's log as Lambda shows it: a cold start's
/// initialisation lines (`init`), `START`, the call's lines, `END` and the
/// `REPORT` line, cut to the last [`TAIL_BYTES`].
pub(crate) fn invocation_tail(init: &str, lines: &str, report: &Report) -> String {
    let id = &report.request_id;
    cut(format!(
        "{init}START RequestId: {id} Version: $LATEST\n{lines}END RequestId: {id}\n{report}\n"
    ))
}

/// The tail of a failed initialisation: its lines and the `INIT_REPORT`.
pub(crate) fn init_tail(lines: &str, report: Option<&InitReport>) -> String {
    match report {
        Some(r) => cut(format!("{lines}{r}\n")),
        None => cut(lines.to_owned()),
    }
}

fn cut(mut log: String) -> String {
    if log.len() > TAIL_BYTES {
        // No character cut in two: the tail may be a few bytes shorter.
        let from = ceil_char_boundary(&log, log.len() - TAIL_BYTES);
        log.drain(..from);
    }
    log
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::ReportStatus;
    use sluice_protocol::LogStream;

    fn line(text: &str) -> LogLine {
        LogLine {
            function: "f".into(),
            tenant: "t".into(),
            stream: LogStream::Stdout,
            line: text.into(),
        }
    }

    #[test]
    fn keeps_lines_only_while_armed() {
        let tap = Arc::new(LogTap::default());
        let seen = Arc::new(Mutex::new(0));
        let s = seen.clone();
        let sink = tap.sink(Arc::new(move |_| *s.lock().unwrap() += 1));
        sink(line("before"));
        tap.arm();
        sink(line("one"));
        sink(line("two"));
        assert_eq!(tap.take().as_deref(), Some("one\ntwo\n"));
        sink(line("after"));
        assert_eq!(tap.take(), None);
        assert_eq!(
            *seen.lock().unwrap(),
            4,
            "every line still reaches the sink"
        );
    }

    #[test]
    fn a_long_log_keeps_its_end_whole_characters_only() {
        let tap = Arc::new(LogTap::default());
        let sink = tap.sink(Arc::new(|_| {}));
        tap.arm();
        for i in 0..2000 {
            sink(line(&format!("é line {i}")));
        }
        let kept = tap.take().unwrap();
        assert!(kept.len() <= 4 * TAIL_BYTES + 16, "{}", kept.len());
        assert!(kept.ends_with("é line 1999\n"));

        let report = Report {
            request_id: "r-1".into(),
            function: "f".into(),
            duration: Duration::from_millis(3),
            init_duration: None,
            memory_mb: 128,
            max_memory_used: None,
            status: ReportStatus::Done,
        };
        let tail = invocation_tail("", &kept, &report);
        assert!(
            tail.len() <= TAIL_BYTES && tail.len() > TAIL_BYTES - 4,
            "{}",
            tail.len()
        );
        assert!(tail.ends_with(&format!("é line 1999\nEND RequestId: r-1\n{report}\n")));

        let short = invocation_tail("init\n", "hello\n", &report);
        assert_eq!(
            short,
            format!(
                "init\nSTART RequestId: r-1 Version: $LATEST\nhello\nEND RequestId: r-1\n{report}\n"
            )
        );
    }
}
