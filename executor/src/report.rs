//! Lambda's `REPORT` line: what one invocation cost.
//!
//! Lambda ends every invocation's log with a line such as
//! `REPORT RequestId: … Duration: 2.73 ms Billed Duration: 3 ms Memory Size:
//! 128 MB Max Memory Used: 63 MB Init Duration: 170.92 ms`, and people size
//! a function's memory from it. sluice writes the same line: `sluice invoke`
//! prints it, and under `sluice run` (or a backfill) it is a `tracing` event
//! at debug level, target `sluice::report`
//! (`RUST_LOG=sluice::report=debug`).
//!
//! An initialisation that fails gets Lambda's `INIT_REPORT` line instead
//! (`INIT_REPORT Init Duration: 12.31 ms\tPhase: init\tStatus: error\tError
//! Type: Runtime.ExitError`): there was no invocation to report on.

use std::fmt;
use std::time::Duration;

use crate::InvokeError;

/// The `tracing` target of reports.
pub const REPORT_TARGET: &str = "sluice::report";

/// How one invocation that reached a sandbox ended, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportStatus {
    /// It answered.
    Done,
    /// It returned an error object of its own (Lambda's text REPORT shows
    /// no status for it, as for an answer).
    Handled {
        /// Its `errorType`.
        error_type: String,
    },
    /// The timeout killed it.
    Timeout,
    /// The sandbox failed under it: a crash, out of memory.
    Error {
        /// Lambda's error type, e.g. `Runtime.OutOfMemory`.
        error_type: String,
    },
}

impl ReportStatus {
    /// Lambda's `platform.report` status (`success`, `error`, `timeout`)
    /// and the error type, if any.
    pub fn parts(&self) -> (&'static str, Option<&str>) {
        match self {
            Self::Done => ("success", None),
            Self::Handled { error_type } | Self::Error { error_type } => {
                ("error", Some(error_type.as_str()))
            }
            Self::Timeout => ("timeout", None),
        }
    }

    /// The status of an invocation's outcome.
    pub fn of<T>(result: &Result<T, InvokeError>) -> Self {
        match result {
            Ok(_) => Self::Done,
            Err(InvokeError::Function { error_type, .. }) => Self::Handled {
                error_type: error_type.clone(),
            },
            Err(InvokeError::Timeout { .. }) => Self::Timeout,
            Err(e) => Self::Error {
                error_type: e.error_type().to_owned(),
            },
        }
    }
}

/// One invocation's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The request id given to the function.
    pub request_id: String,
    /// Function name.
    pub function: String,
    /// Time in the invocation itself.
    pub duration: Duration,
    /// Initialisation of the sandbox, when this call started it.
    pub init_duration: Option<Duration>,
    /// The function's memory limit.
    pub memory_mb: u32,
    /// The most memory the sandbox has used at once, in bytes, since it
    /// started (as Lambda's figure, it does not go down between warm calls),
    /// where the backend can tell.
    pub max_memory_used: Option<u64>,
    /// How it ended.
    pub status: ReportStatus,
}

impl Report {
    /// Lambda's billed duration: the invocation, plus initialisation on a
    /// cold start (as Lambda bills custom runtimes), rounded up to 1 ms.
    pub fn billed_ms(&self) -> u64 {
        let d = self.duration + self.init_duration.unwrap_or_default();
        d.as_nanos().div_ceil(1_000_000) as u64
    }

    /// The invocation's duration in milliseconds, to 0.01 ms (as the line
    /// shows it).
    pub fn duration_ms(&self) -> f64 {
        round_ms(self.duration)
    }

    /// The initialisation's duration in milliseconds, to 0.01 ms.
    pub fn init_duration_ms(&self) -> Option<f64> {
        self.init_duration.map(round_ms)
    }

    /// The report as a `tracing` event at debug level, target
    /// [`REPORT_TARGET`]: the line as its message, the figures as typed
    /// fields.
    pub fn trace(&self) {
        let (status, error_type) = self.status.parts();
        tracing::debug!(
            target: REPORT_TARGET,
            function = %self.function,
            request_id = %self.request_id,
            duration_ms = self.duration_ms(),
            billed_duration_ms = self.billed_ms(),
            memory_size_mb = self.memory_mb,
            max_memory_used_mb = self.max_memory_used.map(|b| b.div_ceil(1 << 20)),
            init_duration_ms = self.init_duration_ms(),
            status,
            error_type,
            "{self}"
        );
    }
}

/// Lambda's `INIT_REPORT` of a sandbox whose initialisation failed: how long
/// it ran and how it ended. (A successful initialisation shows in the first
/// call's `REPORT` as `Init Duration`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// Function name.
    pub function: String,
    /// From the sandbox's start to its failure.
    pub init_duration: Duration,
    /// [`ReportStatus::Timeout`] or [`ReportStatus::Error`].
    pub status: ReportStatus,
}

impl InitReport {
    /// The report of a sandbox start that failed with `error` after
    /// `init_duration`, if the function is the one that failed (its code
    /// exited, posted `/init/error`, ran out of time or memory); `None` for
    /// a failure of sluice's own machinery, which Lambda would not report.
    pub fn of(function: &str, init_duration: Duration, error: &InvokeError) -> Option<Self> {
        let status = match error {
            InvokeError::InitFailed { error_type, .. } if error_type == "Runtime.InitTimeout" => {
                ReportStatus::Timeout
            }
            InvokeError::InitFailed { .. }
            | InvokeError::OutOfMemory { .. }
            | InvokeError::SandboxCrashed { .. } => ReportStatus::Error {
                error_type: error.error_type().to_owned(),
            },
            InvokeError::Timeout { .. } => ReportStatus::Timeout,
            _ => return None,
        };
        Some(Self {
            function: function.to_owned(),
            init_duration,
            status,
        })
    }

    /// The initialisation's duration in milliseconds, to 0.01 ms.
    pub fn init_duration_ms(&self) -> f64 {
        round_ms(self.init_duration)
    }

    /// The report as a `tracing` event at debug level, target
    /// [`REPORT_TARGET`], as [`Report::trace`].
    pub fn trace(&self) {
        let (status, error_type) = self.status.parts();
        tracing::debug!(
            target: REPORT_TARGET,
            function = %self.function,
            init_duration_ms = self.init_duration_ms(),
            phase = "init",
            status,
            error_type,
            "{self}"
        );
    }
}

impl fmt::Display for InitReport {
    /// Lambda's layout, tab-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "INIT_REPORT Init Duration: {:.2} ms\tPhase: init",
            ms(self.init_duration)
        )?;
        match &self.status {
            ReportStatus::Timeout => write!(f, "\tStatus: timeout"),
            ReportStatus::Error { error_type } | ReportStatus::Handled { error_type } => {
                write!(f, "\tStatus: error\tError Type: {error_type}")
            }
            ReportStatus::Done => write!(f, "\tStatus: success"),
        }
    }
}

/// What [`crate::Executor::invoke_reported`] hands back: the invocation's
/// `REPORT`, or the `INIT_REPORT` of the sandbox that failed to start for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// The call reached a sandbox.
    Invocation(Report),
    /// The sandbox's initialisation failed; there was no invocation.
    Init(InitReport),
}

impl Reported {
    /// The invocation's report, if the call reached a sandbox.
    pub fn invocation(self) -> Option<Report> {
        match self {
            Self::Invocation(r) => Some(r),
            Self::Init(_) => None,
        }
    }

    /// The function reported on.
    pub fn function(&self) -> &str {
        match self {
            Self::Invocation(r) => &r.function,
            Self::Init(r) => &r.function,
        }
    }
}

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invocation(r) => r.fmt(f),
            Self::Init(r) => r.fmt(f),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round_ms(d: Duration) -> f64 {
    (ms(d) * 100.0).round() / 100.0
}

impl fmt::Display for Report {
    /// Lambda's layout, tab-separated; `Max Memory Used` is left out where
    /// the backend cannot tell.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "REPORT RequestId: {}\tDuration: {:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB",
            self.request_id,
            ms(self.duration),
            self.billed_ms(),
            self.memory_mb
        )?;
        if let Some(b) = self.max_memory_used {
            write!(f, "\tMax Memory Used: {} MB", b.div_ceil(1 << 20))?;
        }
        if let Some(i) = self.init_duration {
            write!(f, "\tInit Duration: {:.2} ms", ms(i))?;
        }
        match &self.status {
            ReportStatus::Done | ReportStatus::Handled { .. } => Ok(()),
            ReportStatus::Timeout => write!(f, "\tStatus: timeout"),
            ReportStatus::Error { error_type } => {
                write!(f, "\tStatus: error\tError Type: {error_type}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            request_id: "8e8f1c2a".into(),
            function: "echo".into(),
            duration: Duration::from_micros(2_731),
            init_duration: None,
            memory_mb: 128,
            max_memory_used: Some(63 * (1 << 20) - 5),
            status: ReportStatus::Done,
        }
    }

    #[test]
    fn a_warm_call_reads_like_lambdas_report() {
        assert_eq!(
            report().to_string(),
            "REPORT RequestId: 8e8f1c2a\tDuration: 2.73 ms\tBilled Duration: 3 ms\t\
             Memory Size: 128 MB\tMax Memory Used: 63 MB"
        );
    }

    #[test]
    fn a_cold_start_bills_its_initialisation_and_says_how_long_it_took() {
        let r = Report {
            init_duration: Some(Duration::from_micros(170_920)),
            ..report()
        };
        assert_eq!(r.billed_ms(), 174);
        assert!(
            r.to_string()
                .ends_with("Max Memory Used: 63 MB\tInit Duration: 170.92 ms"),
            "{r}"
        );
    }

    #[test]
    fn platform_failures_carry_a_status_and_unknown_memory_is_left_out() {
        let t = Report {
            status: ReportStatus::of::<()>(&Err(InvokeError::Timeout {
                function: "echo".into(),
                timeout: Duration::from_secs(3),
            })),
            max_memory_used: None,
            ..report()
        };
        assert!(
            t.to_string()
                .ends_with("Memory Size: 128 MB\tStatus: timeout"),
            "{t}"
        );
        let oom = ReportStatus::of::<()>(&Err(InvokeError::OutOfMemory {
            function: "echo".into(),
            limit_mb: 128,
        }));
        let r = Report {
            status: oom,
            ..report()
        };
        assert!(
            r.to_string()
                .ends_with("\tStatus: error\tError Type: Runtime.OutOfMemory"),
            "{r}"
        );
        let handled = ReportStatus::of::<()>(&Err(InvokeError::Function {
            function: "echo".into(),
            error_type: "ValueError".into(),
            error_message: "no".into(),
            body: Vec::new(),
        }));
        let r = Report {
            status: handled,
            ..report()
        };
        assert!(r.to_string().ends_with("Max Memory Used: 63 MB"), "{r}");
    }

    #[test]
    fn a_failed_initialisation_reads_like_lambdas_init_report() {
        let d = Duration::from_micros(12_306);
        let exited = InvokeError::InitFailed {
            function: "echo".into(),
            error_type: "Runtime.ExitError".into(),
            message: "exit status 3".into(),
        };
        assert_eq!(
            InitReport::of("echo", d, &exited).unwrap().to_string(),
            "INIT_REPORT Init Duration: 12.31 ms\tPhase: init\tStatus: error\t\
             Error Type: Runtime.ExitError"
        );
        let timed_out = InvokeError::InitFailed {
            function: "echo".into(),
            error_type: "Runtime.InitTimeout".into(),
            message: "no next within 10s".into(),
        };
        let r = InitReport::of("echo", d, &timed_out).unwrap();
        assert!(r.to_string().ends_with("\tStatus: timeout"), "{r}");
        assert_eq!(r.init_duration_ms(), 12.31);
        // sluice's own failures are not the function's initialisation.
        let ours = InvokeError::ShuttingDown;
        assert_eq!(InitReport::of("echo", d, &ours), None);
    }
}
