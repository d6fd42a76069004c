//! How the binary writes logs: sluice's own `tracing` events, the functions'
//! output, and Lambda's `REPORT` lines, as text for a terminal or as one
//! JSON object per line for a log pipeline (`--log-format json`, like
//! Lambda's JSON log format).
//!
//! Function output does not go through the `SLUICE_LOG` filter: it is the
//! user's, shown unless `--quiet`, in either format.

use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use sluice_executor::{InitReport, LogLine, LogSink, LogStream, Report, Reported};

/// The format of everything written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people: `[function] line` for function output.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`
    /// and the event's fields (tracing-subscriber's flattened JSON).
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Set the format once, before anything is logged; installs the `tracing`
/// subscriber (`SLUICE_LOG` filter directives, default
/// `warn,sluice_ingest=info`).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sluice_ingest=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// A JSON log line shaped like the `tracing` subscriber's, in its order:
/// `timestamp`, `level`, `message`, the fields, `target`.
fn json_line(level: &str, target: &str, message: &str, fields: &[(&str, Value)]) -> String {
    let mut out = String::with_capacity(128 + message.len());
    let mut push = |key: &str, value: &Value| {
        out.push(if out.is_empty() { '{' } else { ',' });
        out.push_str(&Value::from(key).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    };
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    push("timestamp", &now.into());
    push("level", &level.into());
    push("message", &message.into());
    for (k, v) in fields {
        push(k, v);
    }
    push("target", &target.into());
    out.push('}');
    out
}

/// How a message of sluice's own is introduced in text (`error: `,
/// `sluice: warning: `, `sluice: `, or nothing) and its level in JSON.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// `error: ...`, level ERROR.
    Error,
    /// `sluice: warning: ...`, level WARN.
    Warning,
    /// `sluice: ...`, level INFO.
    Note,
    /// The message as it is, level INFO.
    Plain,
}

/// Write one message of sluice's own to stderr (see the `log_*!` macros):
/// as before in text, a JSON object with target `sluice` in JSON.
pub fn write(kind: Kind, message: &str) {
    match format() {
        LogFormat::Text => match kind {
            Kind::Error => eprintln!("error: {message}"),
            Kind::Warning => eprintln!("sluice: warning: {message}"),
            Kind::Note => eprintln!("sluice: {message}"),
            Kind::Plain => eprintln!("{message}"),
        },
        LogFormat::Json => {
            let level = match kind {
                Kind::Error => "ERROR",
                Kind::Warning => "WARN",
                Kind::Note | Kind::Plain => "INFO",
            };
            eprintln!("{}", json_line(level, "sluice", message, &[]));
        }
    }
}

/// `error: MESSAGE` on stderr (an ERROR object with `--log-format json`).
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::logs::write($crate::logs::Kind::Error, &format!($($arg)*)) };
}

/// `sluice: warning: MESSAGE` on stderr (a WARN object in JSON).
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::logs::write($crate::logs::Kind::Warning, &format!($($arg)*)) };
}

/// `sluice: MESSAGE` on stderr (an INFO object in JSON).
#[macro_export]
macro_rules! log_note {
    ($($arg:tt)*) => { $crate::logs::write($crate::logs::Kind::Note, &format!($($arg)*)) };
}

/// `MESSAGE` on stderr as it is (an INFO object in JSON).
#[macro_export]
macro_rules! log_plain {
    ($($arg:tt)*) => { $crate::logs::write($crate::logs::Kind::Plain, &format!($($arg)*)) };
}

/// Write one line of a function's output (agent lines go to `tracing` at
/// debug level, target `sluice::agent`).
pub fn print_function_line(line: LogLine) {
    let stream = match line.stream {
        LogStream::Agent => {
            tracing::debug!(target: "sluice::agent", function = %line.function, "{}", line.line);
            return;
        }
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    };
    match format() {
        LogFormat::Text => eprintln!("[{}] {}", line.function, line.line),
        LogFormat::Json => {
            let fields = [
                ("function", Value::from(line.function)),
                ("tenant", line.tenant.into()),
                ("stream", stream.into()),
            ];
            eprintln!(
                "{}",
                json_line("INFO", "sluice::function", &line.line, &fields)
            );
        }
    }
}

/// The functions' output on stderr, or nowhere with `--quiet`.
pub fn function_log_sink(quiet: bool) -> LogSink {
    if quiet {
        Arc::new(|_l: LogLine| {})
    } else {
        Arc::new(print_function_line)
    }
}

/// Lambda's REPORT line of one invocation (or the INIT_REPORT of a failed
/// initialisation): `[function] REPORT ...`, or a JSON object with the
/// figures as typed fields, named as the `sluice::report` tracing event
/// names them under `sluice run`.
pub fn print_report(r: &Reported) {
    match format() {
        LogFormat::Text => eprintln!("[{}] {r}", r.function()),
        LogFormat::Json => {
            let fields = match r {
                Reported::Invocation(r) => report_fields(r),
                Reported::Init(r) => init_report_fields(r),
            };
            eprintln!(
                "{}",
                json_line("INFO", "sluice::report", &r.to_string(), &fields)
            );
        }
    }
}

fn report_fields(r: &Report) -> Vec<(&'static str, Value)> {
    let (status, error_type) = r.status.parts();
    let mut fields = vec![
        ("function", Value::from(r.function.as_str())),
        ("request_id", r.request_id.as_str().into()),
        ("duration_ms", json!(r.duration_ms())),
        ("billed_duration_ms", r.billed_ms().into()),
        ("memory_size_mb", r.memory_mb.into()),
    ];
    if let Some(b) = r.max_memory_used {
        fields.push(("max_memory_used_mb", b.div_ceil(1 << 20).into()));
    }
    if let Some(i) = r.init_duration_ms() {
        fields.push(("init_duration_ms", json!(i)));
    }
    fields.push(("status", status.into()));
    if let Some(e) = error_type {
        fields.push(("error_type", e.into()));
    }
    fields
}

fn init_report_fields(r: &InitReport) -> Vec<(&'static str, Value)> {
    let (status, error_type) = r.status.parts();
    let mut fields = vec![
        ("function", Value::from(r.function.as_str())),
        ("init_duration_ms", json!(r.init_duration_ms())),
        ("phase", "init".into()),
        ("status", status.into()),
    ];
    if let Some(e) = error_type {
        fields.push(("error_type", e.into()));
    }
    fields
}
