//! Pipeline files: parsing and validating `pipeline.toml`.
//!
//! A pipeline file declares the functions sluice can run. Each function is a
//! folder holding an executable `bootstrap` (a Lambda custom runtime) plus the
//! limits and environment of the sandbox it runs in:
//!
//! ```toml
//! [functions.echo]
//! path = "functions/echo"   # required; relative to the pipeline file's folder
//! memory_mb = 256           # everything else is optional
//! timeout = "10s"
//! env = { GREETING = "hi" }
//! ```
//!
//! # Fields of `[functions.NAME]`
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `path` | required | folder with an executable `bootstrap` |
//! | `memory_mb` | [`DEFAULT_MEMORY_MB`] | [`MEMORY_MB_RANGE`] (Lambda's) |
//! | `timeout` | [`DEFAULT_TIMEOUT`] | [`TIMEOUT_RANGE`] |
//! | `init_timeout` | [`DEFAULT_INIT_TIMEOUT`] | [`TIMEOUT_RANGE`] |
//! | `concurrency` | [`DEFAULT_CONCURRENCY`] | [`CONCURRENCY_RANGE`] |
//! | `max_queue` | [`DEFAULT_MAX_QUEUE`] | [`MAX_QUEUE_RANGE`] (0: reject at once) |
//! | `idle_timeout` | [`DEFAULT_IDLE_TIMEOUT`] | [`IDLE_TIMEOUT_RANGE`] |
//! | `env` | empty | keys `[A-Za-z_][A-Za-z0-9_]*`, not [`RESERVED_ENV_KEYS`] |
//! | `tenant` | [`DEFAULT_TENANT`] | `[A-Za-z0-9_-]{1,64}` |
//! | `backend` | `"auto"` | `"auto"`, `"process"` (`"microvm"` is not built yet) |
//! | `handler` | [`DEFAULT_HANDLER`] | 1 to 128 characters, no whitespace |
//! | `max_processes` | [`DEFAULT_MAX_PROCESSES`] | [`MAX_PROCESSES_RANGE`] |
//! | `tmp_mb` | [`DEFAULT_TMP_MB`] | [`TMP_MB_RANGE`] |
//!
//! Durations use [`humantime`] syntax: `"500ms"`, `"3s"`, `"15m"`, `"1h 30m"`.
//! Function names follow Lambda's rule, `[A-Za-z0-9_-]{1,64}`.
//!
//! Any other key or section, at any level, is an error; `[[trigger.*]]` and
//! `[job.*]` sections are not part of the format yet.
//!
//! # Errors
//!
//! Loading works in two steps: serde deserializes the text into raw structs
//! (with `deny_unknown_fields` and [`serde_spanned::Spanned`] values), then a
//! validation step checks ranges, names and the function folders. Every error
//! is a [`PipelineError`]; those tied to a place in the file display as
//! `FILE:LINE:COL: MESSAGE` (FILE as the caller gave it, 1-based line and
//! column) and name the field as a dotted path such as
//! `functions.echo.memory_mb`, the offending value, and what was expected.

mod error;
mod raw;
mod span;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{Location, PathProblem, PipelineError};

/// Default `memory_mb`: Lambda's smallest size.
pub const DEFAULT_MEMORY_MB: u32 = 128;
/// Allowed `memory_mb`, in megabytes (Lambda's limits).
pub const MEMORY_MB_RANGE: RangeInclusive<u32> = 128..=10240;
/// Default `timeout` for one invocation: 3 seconds, as in Lambda.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default `init_timeout` for starting the runtime: 10 seconds, as in Lambda.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Allowed `timeout` and `init_timeout`: 1ms to 15 minutes (Lambda's maximum).
pub const TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(900);
/// Default `concurrency`: at most 4 invocations at once.
pub const DEFAULT_CONCURRENCY: u32 = 4;
/// Allowed `concurrency`.
pub const CONCURRENCY_RANGE: RangeInclusive<u32> = 1..=1000;
/// Default `max_queue`: 64 callers may wait beyond `concurrency`.
pub const DEFAULT_MAX_QUEUE: u32 = 64;
/// Allowed `max_queue`; 0 rejects callers at once when all slots are busy.
pub const MAX_QUEUE_RANGE: RangeInclusive<u32> = 0..=100_000;
/// Default `idle_timeout`: a warm sandbox is reaped after 5 idle minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Allowed `idle_timeout`: 1ms to 24 hours.
pub const IDLE_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
/// Default `tenant`.
pub const DEFAULT_TENANT: &str = "default";
/// Default `handler`, passed to the runtime as `_HANDLER`.
pub const DEFAULT_HANDLER: &str = "bootstrap";
/// Default `max_processes` (the sandbox's pids limit).
pub const DEFAULT_MAX_PROCESSES: u32 = 1024;
/// Allowed `max_processes`.
pub const MAX_PROCESSES_RANGE: RangeInclusive<u32> = 1..=65536;
/// Default `tmp_mb`: size of the writable `/tmp`, as in Lambda.
pub const DEFAULT_TMP_MB: u32 = 512;
/// Allowed `tmp_mb`, in megabytes (Lambda's ephemeral storage maximum).
pub const TMP_MB_RANGE: RangeInclusive<u32> = 1..=10240;

/// Environment keys a function may not set: Lambda's documented reserved
/// runtime variables, which the sandbox sets itself.
pub const RESERVED_ENV_KEYS: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
    "TZ",
];

/// A validated pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// The pipeline file, as given by the caller.
    pub file: PathBuf,
    /// The declared functions, by name.
    pub functions: BTreeMap<String, FunctionConfig>,
}

/// One validated `[functions.NAME]` table, with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionConfig {
    /// The function's name (`[A-Za-z0-9_-]{1,64}`).
    pub name: String,
    /// The function folder, absolute and canonical; it holds an executable
    /// `bootstrap`.
    pub path: PathBuf,
    /// Memory limit in megabytes. Default [`DEFAULT_MEMORY_MB`].
    pub memory_mb: u32,
    /// Time limit of one invocation. Default [`DEFAULT_TIMEOUT`].
    pub timeout: Duration,
    /// Time limit for the runtime to start and ask for its first event.
    /// Default [`DEFAULT_INIT_TIMEOUT`].
    pub init_timeout: Duration,
    /// Maximum concurrent invocations. Default [`DEFAULT_CONCURRENCY`].
    pub concurrency: u32,
    /// Callers allowed to wait beyond `concurrency`; 0 rejects at once.
    /// Default [`DEFAULT_MAX_QUEUE`].
    pub max_queue: u32,
    /// A warm sandbox idle this long is reaped. Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Extra environment variables. Default empty.
    pub env: BTreeMap<String, String>,
    /// Tenant the function belongs to. Default [`DEFAULT_TENANT`].
    pub tenant: String,
    /// Sandbox backend. Default [`Backend::Auto`].
    pub backend: Backend,
    /// Value of `_HANDLER`. Default [`DEFAULT_HANDLER`].
    pub handler: String,
    /// Process (pids) limit. Default [`DEFAULT_MAX_PROCESSES`].
    pub max_processes: u32,
    /// Size of the writable `/tmp`, in megabytes. Default [`DEFAULT_TMP_MB`].
    pub tmp_mb: u32,
}

/// Which sandbox runs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// Let sluice choose (`"auto"`). The default.
    #[default]
    Auto,
    /// Sandboxed processes (`"process"`).
    Process,
    /// MicroVMs (`"microvm"`); not available in this build, so validation
    /// rejects it for now.
    Microvm,
}

impl Backend {
    /// The name used in pipeline files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Process => "process",
            Self::Microvm => "microvm",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Pipeline {
    /// Reads, parses and validates the pipeline file at `path`.
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as the contents of `file`.
    ///
    /// `file` is used in error messages exactly as given, and relative
    /// function paths are resolved against its parent folder (the current
    /// folder if it has none). The function folders must exist.
    pub fn parse(text: &str, file: &Path) -> Result<Pipeline, PipelineError> {
        let functions = raw::parse(text, file)?;
        Ok(Pipeline {
            file: file.to_path_buf(),
            functions,
        })
    }

    /// The function called `name`; the error lists the declared names.
    pub fn function(&self, name: &str) -> Result<&FunctionConfig, PipelineError> {
        self.functions
            .get(name)
            .ok_or_else(|| PipelineError::UnknownFunction {
                file: self.file.clone(),
                name: name.to_owned(),
                declared: self.functions.keys().cloned().collect(),
            })
    }
}
