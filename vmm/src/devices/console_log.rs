//! The guest console sink: bytes from the serial port become `tracing`
//! lines (target `sluice_vmm::console`) and an optional bounded capture
//! buffer, through a token bucket so a guest cannot flood the host's logs.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use std::time::Instant;

use crate::devices::bus::lock;

/// Longest line logged before it is cut.
const MAX_LINE: usize = 1024;

/// A token bucket over bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained bytes per second.
    pub bytes_per_sec: u64,
    /// Burst size in bytes (bucket capacity).
    pub burst: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            bytes_per_sec: 64 * 1024,
            burst: 256 * 1024,
        }
    }
}

/// Captured console output, shared with the VM's owner.
#[derive(Debug, Clone, Default)]
pub struct ConsoleCapture {
    inner: Arc<(Mutex<CaptureInner>, Condvar)>,
}

#[derive(Debug, Default)]
struct CaptureInner {
    bytes: Vec<u8>,
    limit: usize,
    dropped: u64,
}

impl ConsoleCapture {
    /// Keeps at most `limit` bytes (the first ones).
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new((
                Mutex::new(CaptureInner {
                    bytes: Vec::new(),
                    limit,
                    dropped: 0,
                }),
                Condvar::new(),
            )),
        }
    }

    /// The bytes captured so far.
    pub fn bytes(&self) -> Vec<u8> {
        lock(&self.inner.0).bytes.clone()
    }

    /// Bytes refused by the rate limit so far.
    pub fn dropped(&self) -> u64 {
        lock(&self.inner.0).dropped
    }

    /// Waits until the captured output contains `needle`; `false` on timeout.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut c = lock(&self.inner.0);
        loop {
            if needle.is_empty() || c.bytes.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .inner
                .1
                .wait_timeout(c, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// A guest line as safe log text: invalid UTF-8 and control characters
/// (terminal escapes, carriage returns) become U+FFFD; tabs stay; the
/// trailing line break is dropped.
pub fn sanitize(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\r', '\n'])
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// The rate-limited console writer handed to the serial device.
pub struct ConsoleLog {
    vm: String,
    limit: RateLimit,
    tokens: f64,
    last_refill: Instant,
    line: Vec<u8>,
    dropped_since_report: u64,
    capture: ConsoleCapture,
    line_sink: Option<crate::vm::ConsoleLineSink>,
}

impl std::fmt::Debug for ConsoleLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLog")
            .field("vm", &self.vm)
            .field("limit", &self.limit)
            .field("line_sink", &self.line_sink.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsoleLog {
    /// A sink for VM `vm` limited by `limit`, capturing into `capture`.
    pub fn new(vm: impl Into<String>, limit: RateLimit, capture: ConsoleCapture) -> Self {
        Self {
            vm: vm.into(),
            limit,
            tokens: limit.burst as f64,
            last_refill: Instant::now(),
            line: Vec::new(),
            dropped_since_report: 0,
            capture,
            line_sink: None,
        }
    }

    /// Also hands every complete line to `sink`.
    pub fn with_line_sink(mut self, sink: crate::vm::ConsoleLineSink) -> Self {
        self.line_sink = Some(sink);
        self
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let secs = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.tokens =
            (self.tokens + secs * self.limit.bytes_per_sec as f64).min(self.limit.burst as f64);
    }

    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let text = sanitize(&self.line);
        tracing::info!(target: "sluice_vmm::console", vm = %self.vm, "{text}");
        if let Some(sink) = &self.line_sink {
            sink(&text);
        }
        self.line.clear();
    }

    fn accept(&mut self, byte: u8) {
        {
            let mut c = lock(&self.capture.inner.0);
            if c.bytes.len() < c.limit {
                c.bytes.push(byte);
                self.capture.inner.1.notify_all();
            }
        }
        if byte == b'\n' || self.line.len() >= MAX_LINE {
            if byte != b'\n' {
                self.line.push(byte);
            }
            self.flush_line();
        } else {
            self.line.push(byte);
        }
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        // A last line without a newline still reaches the log.
        self.flush_line();
    }
}

impl io::Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.refill();
        let allowed = (self.tokens.floor() as usize).min(buf.len());
        if allowed > 0 && self.dropped_since_report > 0 {
            tracing::warn!(target: "sluice_vmm::console", vm = %self.vm, dropped = self.dropped_since_report, "guest console output was rate-limited");
            self.dropped_since_report = 0;
        }
        for &b in &buf[..allowed] {
            self.accept(b);
        }
        self.tokens -= allowed as f64;
        let dropped = (buf.len() - allowed) as u64;
        if dropped > 0 {
            self.dropped_since_report += dropped;
            lock(&self.capture.inner.0).dropped += dropped;
        }
        // The guest never sees back-pressure: dropped bytes count as written.
        Ok(buf.len())
    }

    /// Does not cut the current line: the UART flushes after every byte,
    /// and a line is logged whole (at its newline, at 1,024 bytes,
    /// or when the VM is dropped).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn passes_bytes_within_the_limit() {
        let cap = ConsoleCapture::new(1024);
        let mut log = ConsoleLog::new("t", RateLimit::default(), cap.clone());
        log.write_all(b"hello\nworld").unwrap();
        assert_eq!(cap.bytes(), b"hello\nworld");
        assert_eq!(cap.dropped(), 0);
    }

    #[test]
    fn drops_bytes_beyond_the_burst() {
        let cap = ConsoleCapture::new(1024);
        let limit = RateLimit {
            bytes_per_sec: 1,
            burst: 10,
        };
        let mut log = ConsoleLog::new("t", limit, cap.clone());
        for _ in 0..100 {
            log.write_all(b"x").unwrap();
        }
        // At 1 byte/s, at most one more token can appear during the test.
        let kept = cap.bytes().len();
        assert!((10..=11).contains(&kept), "kept {kept}");
        assert_eq!(cap.dropped() as usize, 100 - kept);
    }

    #[test]
    fn log_text_has_no_control_characters() {
        assert_eq!(sanitize(b"ok\r\n"), "ok");
        assert_eq!(sanitize(b"\x1b[31mred\ta"), "\u{fffd}[31mred\ta");
        assert_eq!(sanitize(b"a\rb\xff"), "a\u{fffd}b\u{fffd}");
    }

    #[test]
    fn wait_for_sees_output_written_by_another_thread() {
        let cap = ConsoleCapture::new(1024);
        let mut log = ConsoleLog::new("t", RateLimit::default(), cap.clone());
        assert!(!cap.wait_for(b"ready", Duration::from_millis(10)));
        let writer = std::thread::spawn(move || log.write_all(b"booting\nready\n").unwrap());
        assert!(cap.wait_for(b"ready", Duration::from_secs(10)));
        writer.join().unwrap();
    }

    #[test]
    fn a_line_sink_gets_complete_sanitized_lines() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let mut log = ConsoleLog::new("t", RateLimit::default(), ConsoleCapture::new(0))
            .with_line_sink(Arc::new(move |l: &str| {
                seen.lock().unwrap().push(l.to_owned())
            }));
        log.write_all(b"one\r\ntw").unwrap();
        // The UART flushes after every byte: that does not cut the line.
        log.flush().unwrap();
        assert_eq!(*lines.lock().unwrap(), ["one"]);
        log.write_all(b"o\x1b\n").unwrap();
        drop(log);
        assert_eq!(*lines.lock().unwrap(), ["one", "two\u{fffd}"]);
    }

    #[test]
    fn capture_is_bounded() {
        let cap = ConsoleCapture::new(4);
        let mut log = ConsoleLog::new("t", RateLimit::default(), cap.clone());
        log.write_all(b"abcdefgh").unwrap();
        assert_eq!(cap.bytes(), b"abcd");
    }
}
