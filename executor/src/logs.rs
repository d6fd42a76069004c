//! Function log lines, and the rate limit that keeps a chatty or hostile
//! function from flooding the host's logs.

use std::sync::Mutex;
use std::time::Instant;

use sluice_protocol::LogStream;

/// One line a function (or its agent) wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Function name.
    pub function: String,
    /// Tenant of the sandbox.
    pub tenant: String,
    /// Where it came from.
    pub stream: LogStream,
    /// The text (lossily decoded UTF-8).
    pub line: String,
}

impl LogLine {
    pub(crate) fn new(function: &str, tenant: &str, stream: LogStream, line: &[u8]) -> Self {
        Self {
            function: function.to_owned(),
            tenant: tenant.to_owned(),
            stream,
            line: String::from_utf8_lossy(line).into_owned(),
        }
    }

    pub(crate) fn dropped(function: &str, tenant: &str, n: u64) -> Self {
        Self {
            function: function.to_owned(),
            tenant: tenant.to_owned(),
            stream: LogStream::Agent,
            line: format!("sluice: {n} log lines dropped (rate limit)"),
        }
    }
}

/// The default sink: `tracing` events under the `sluice::function` target.
pub fn tracing_sink(line: LogLine) {
    let stream = match line.stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Agent => "agent",
    };
    tracing::info!(target: "sluice::function", function = %line.function, tenant = %line.tenant, stream, "{}", line.line);
}

/// A token bucket: `rate` lines per second, bursts up to `10 * rate`.
#[derive(Debug)]
pub struct LogRateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogRateLimiter {
    /// A limiter of `rate` lines per second.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            burst: rate * 10.0,
            state: Mutex::new(Bucket {
                tokens: rate * 10.0,
                last: Instant::now(),
                dropped: 0,
            }),
        }
    }

    /// `Some(dropped_since_last_admit)` if this line may be logged, `None` if
    /// it must be dropped.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// Lines dropped since the last one admitted, now counted as reported
    /// (for a summary when the source of the lines stops).
    pub fn take_dropped(&self) -> u64 {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut b.dropped)
    }

    /// [`Self::admit`] at an injected time.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now.max(b.last);
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.dropped))
        } else {
            b.dropped += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_limits_then_reports_drops() {
        let l = LogRateLimiter::new(10);
        let t0 = Instant::now();
        let admitted = (0..150).filter(|_| l.admit_at(t0).is_some()).count();
        assert_eq!(admitted, 100);
        // One second later, 10 more tokens; the first admit reports 50 drops.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.admit_at(t1), Some(50));
        assert_eq!(l.admit_at(t1), Some(0));
        // Dropped lines not yet reported by an admitted one can be taken.
        let dropped = (0..20).filter(|_| l.admit_at(t1).is_none()).count() as u64;
        assert_eq!(dropped, 12);
        assert_eq!(l.take_dropped(), 12);
        assert_eq!(l.take_dropped(), 0);
    }
}
