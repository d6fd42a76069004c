//! The one error type of this crate, and the source locations it carries.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A position in a pipeline file: the file as the caller named it, and a
/// 1-based line and column (columns count characters, not bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The pipeline file, exactly as given to [`crate::Pipeline::load`] or
    /// [`crate::Pipeline::parse`].
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u32,
    /// 1-based column number, in characters.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// What is wrong with a function's `path` folder.
#[derive(Debug)]
pub enum PathProblem {
    /// Nothing exists at the resolved path.
    NotFound,
    /// The resolved path exists but could not be inspected.
    Inaccessible(std::io::Error),
    /// The resolved path is not a folder.
    NotAFolder,
    /// The folder has no `bootstrap` entry.
    NoBootstrap,
    /// `bootstrap` exists but is not a regular file.
    BootstrapNotAFile,
    /// `bootstrap` is a regular file without any execute permission bit.
    BootstrapNotExecutable,
    /// The path names a `.zip` archive that cannot be used: not a zip, a
    /// name leaving the package, too large unpacked.
    BadArchive(Box<String>),
}

/// Everything that can go wrong loading a pipeline file.
///
/// Errors with a position display as `FILE:LINE:COL: MESSAGE`, where `FILE`
/// is the path as given by the caller; the others display as `FILE: MESSAGE`.
/// Field names are written as dotted TOML paths such as
/// `functions.echo.memory_mb`.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The file could not be read.
    #[error("{}: cannot read pipeline file: {source}", file.display())]
    Read {
        /// The file, as given.
        file: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not valid TOML.
    #[error("{at}: TOML syntax error: {message}")]
    Syntax {
        /// Where the parser gave up.
        at: Location,
        /// The TOML parser's description.
        message: String,
    },

    /// A key that this version of the format does not know.
    #[error(
        "{at}: unknown field `{field}` {}{}; expected {}",
        table_name(table),
        suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default(),
        one_of(expected)
    )]
    UnknownField {
        /// Position of the unknown key.
        at: Location,
        /// Dotted path of the table holding the key; empty for the top level.
        table: String,
        /// The unknown key.
        field: String,
        /// The keys allowed in that table.
        expected: Vec<&'static str>,
        /// The closest allowed key, if one is close enough to be a typo.
        suggestion: Option<&'static str>,
    },

    /// A value of the wrong TOML type.
    #[error("{at}: `{field}` has the wrong type: expected {expected}, found {found}")]
    WrongType {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The type the field needs, e.g. `an integer`.
        expected: String,
        /// The value found, e.g. `string "big"`.
        found: String,
    },

    /// A required field is absent.
    #[error(
        "{at}: `{}` is missing the required field `{field}` ({hint})",
        table_header(table)
    )]
    MissingField {
        /// Position of the table's header.
        at: Location,
        /// Dotted path of the table, e.g. `functions.echo` or
        /// `trigger.kafka[0]`.
        table: String,
        /// The missing key.
        field: &'static str,
        /// What the field is for and how to write it.
        hint: &'static str,
    },

    /// A string that does not parse as a duration.
    #[error(
        "{at}: `{field}` = {value:?} is not a valid duration ({reason}); \
         write a number and a unit, e.g. \"500ms\", \"3s\" or \"15m\""
    )]
    BadDuration {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The string as written.
        value: String,
        /// Why it does not parse.
        reason: String,
    },

    /// An integer outside its allowed range.
    #[error("{at}: `{field}` = {value} is out of range: expected {min}..={max}{unit}")]
    OutOfRange {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value as written.
        value: i64,
        /// Smallest allowed value.
        min: u32,
        /// Largest allowed value.
        max: u32,
        /// Unit suffix for the message, e.g. ` (megabytes)`; may be empty.
        unit: &'static str,
    },

    /// A duration outside its allowed range.
    #[error(
        "{at}: `{field}` = {value:?} is out of range: expected {}..={}",
        humantime::format_duration(*min),
        humantime::format_duration(*max)
    )]
    DurationOutOfRange {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The duration as written.
        value: String,
        /// Shortest allowed duration.
        min: Duration,
        /// Longest allowed duration.
        max: Duration,
    },

    /// A function name that breaks Lambda's naming rule.
    #[error(
        "{at}: invalid function name {name:?}: {reason}; \
         names are 1 to 64 characters from A-Z, a-z, 0-9, `_` and `-`"
    )]
    BadFunctionName {
        /// Position of the name.
        at: Location,
        /// The name as written.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A string value that does not have the required shape.
    #[error("{at}: `{field}` = {value:?} is invalid: expected {expected}")]
    InvalidValue {
        /// Position of the value (or key, for `env` keys).
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value as written.
        value: String,
        /// What a valid value looks like.
        expected: &'static str,
    },

    /// An `env` key that is not a valid environment variable name.
    #[error(
        "{at}: `{field}` key {key:?} is not a valid variable name: \
         expected letters, digits and `_`, not starting with a digit"
    )]
    BadEnvKey {
        /// Position of the key.
        at: Location,
        /// Dotted path of the `env` table.
        field: String,
        /// The key as written.
        key: String,
    },

    /// An `env` key that Lambda reserves for its runtime.
    #[error(
        "{at}: `{field}` sets {key:?}, which is reserved: the Lambda runtime \
         environment sets it itself; choose another name"
    )]
    ReservedEnvKey {
        /// Position of the key.
        at: Location,
        /// Dotted path of the `env` table.
        field: String,
        /// The reserved key.
        key: String,
    },

    /// A function's `path` does not lead to a usable function folder, or
    /// one of its `layers` to a folder.
    #[error("{at}: `{field}` = {value:?}: {}", path_problem(resolved, problem))]
    BadFunctionPath {
        /// Position of the `path` value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The path as written.
        value: String,
        /// The path resolved against the pipeline file's folder.
        resolved: PathBuf,
        /// What is wrong with it.
        problem: PathProblem,
    },

    /// An integer `max_retry_attempts` that is neither -1 nor in range.
    #[error(
        "{at}: `{field}` = {value} is out of range: expected -1 (retry until the record \
         expires) or {min}..={max}"
    )]
    RetryAttemptsOutOfRange {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value as written.
        value: i64,
        /// Smallest finite value.
        min: u32,
        /// Largest finite value.
        max: u32,
    },

    /// A trigger names a function the file does not declare.
    #[error(
        "{at}: `{field}` = {name:?} is not a declared function; declared functions: {}",
        declared.join(", ")
    )]
    UndeclaredFunction {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The name as written.
        name: String,
        /// The names the file declares, sorted.
        declared: Vec<String>,
    },

    /// A string that is not a valid Kafka topic name.
    #[error(
        "{at}: `{field}` = {value:?} is not a valid Kafka topic name ({reason}); topic \
         names are 1 to 249 characters from A-Z, a-z, 0-9, `.`, `_` and `-`, and not \
         \".\" or \"..\""
    )]
    BadTopic {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field, e.g. `trigger.kafka[0].topics[1]`.
        field: String,
        /// The name as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An empty `topics` list.
    #[error(
        "{at}: `{field}` is empty; list at least one topic to consume, e.g. topics = [\"orders\"]"
    )]
    NoTopics {
        /// Position of the list.
        at: Location,
        /// Dotted path of the field.
        field: String,
    },

    /// A topic listed twice in `topics`.
    #[error("{at}: `{field}` lists {topic:?} twice")]
    DuplicateTopic {
        /// Position of the second occurrence.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The repeated topic.
        topic: String,
    },

    /// Two triggers with the same name.
    #[error(
        "{at}: trigger name {name:?}{} is already used by `{other}`; trigger names must be unique",
        if *defaulted { " (the default name of this trigger)" } else { "" }
    )]
    DuplicateTriggerName {
        /// Position of the name, or of the trigger's header if the name is
        /// the default.
        at: Location,
        /// The name.
        name: String,
        /// Whether the name is this trigger's default name.
        defaulted: bool,
        /// Dotted path of the trigger that has the name first, e.g.
        /// `trigger.kafka[0]`.
        other: String,
    },

    /// `on_failure` or `output_topic` is also a topic the trigger consumes.
    #[error(
        "{at}: `{field}` = {topic:?} is also one of the trigger's `topics`; records \
         produced there would be consumed again by this trigger, so choose another topic"
    )]
    SourceTopicReused {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The topic.
        topic: String,
    },

    /// A setting that only works together with another one.
    #[error("{at}: `{field}` = {value} requires `{required}`: {reason}")]
    Requires {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value as written in TOML, e.g. `3` or `"1h"`.
        value: String,
        /// What must also be set, e.g. `trigger.kafka[0].on_failure`.
        required: String,
        /// Why.
        reason: &'static str,
    },

    /// `retry_backoff_max` shorter than `retry_backoff`.
    #[error(
        "{at}: `{max_field}` ({}{}) is shorter than `{initial_field}` ({}); retries back off \
         from retry_backoff up to retry_backoff_max, so retry_backoff_max must be at least \
         retry_backoff",
        humantime::format_duration(*max),
        if *max_is_default { ", the default" } else { "" },
        humantime::format_duration(*initial)
    )]
    BackoffOrder {
        /// Position of `retry_backoff_max`, or of `retry_backoff` when the
        /// maximum is the default.
        at: Location,
        /// Dotted path of `retry_backoff`.
        initial_field: String,
        /// The initial backoff.
        initial: Duration,
        /// Dotted path of `retry_backoff_max`.
        max_field: String,
        /// The maximum backoff.
        max: Duration,
        /// Whether the maximum is the default (not written in the file).
        max_is_default: bool,
    },

    /// A pool setting above the one bounding it: `min_warm` above
    /// `max_warm`, or `max_warm` above `concurrency`.
    #[error(
        "{at}: `{field}` = {value} is more than `{limit_field}` ({limit}{}); {reason}",
        if *limit_is_default { ", the default" } else { "" }
    )]
    ExceedsLimit {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value.
        value: u32,
        /// Dotted path of the bounding field.
        limit_field: String,
        /// Its value.
        limit: u32,
        /// Whether that value is the default (not written in the file).
        limit_is_default: bool,
        /// Why the bound exists.
        reason: &'static str,
    },

    /// A librdkafka property that sluice sets itself.
    #[error("{at}: `{field}` sets {key:?}, which sluice manages; {advice}")]
    ManagedProperty {
        /// Position of the key.
        at: Location,
        /// Dotted path of the `properties` table.
        field: String,
        /// The property.
        key: String,
        /// What to do instead.
        advice: &'static str,
    },

    /// A property librdkafka does not know, or a value it refuses (checked
    /// when the file is loaded, not when the trigger starts).
    #[error("{at}: `{field}` sets {key:?} = {value:?}, which librdkafka refuses: {problem}")]
    KafkaProperty {
        /// Position of the key (unknown property) or value (invalid value).
        at: Location,
        /// Dotted path of the `properties` table.
        field: String,
        /// The property.
        key: String,
        /// Its value.
        value: Box<str>,
        /// librdkafka's words.
        problem: Box<str>,
    },

    /// A `bootstrap_servers` value that is not a server list.
    #[error(
        "{at}: `{field}` = {value:?} is invalid ({reason}); expected \"embedded\" or a \
         comma-separated list of host:port, e.g. \"kafka-1:9092,kafka-2:9092\""
    )]
    BadBootstrapServers {
        /// Position of the value.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A `filter` that is not a valid pattern.
    #[error("{at}: `{field}` is not a valid filter pattern: {source}")]
    BadFilter {
        /// Position of the filter table.
        at: Location,
        /// Dotted path of the field.
        field: String,
        /// What is wrong, and where in the pattern (boxed to keep the error
        /// small).
        #[source]
        source: Box<crate::filter::FilterError>,
    },

    /// A function's archive (`path` or one of its `layers`) could not be
    /// unpacked.
    #[error("{}: `{field}`: cannot unpack {source}", file.display())]
    Unpack {
        /// The pipeline file, as given.
        file: PathBuf,
        /// Dotted path of the field naming the archive.
        field: String,
        /// What went wrong.
        #[source]
        source: crate::package::PackageError,
    },

    /// Any other error reported by the TOML deserializer.
    #[error("{at}: `{field}`: {message}")]
    Invalid {
        /// Position reported by the deserializer.
        at: Location,
        /// Dotted path of the field, or `<top level>`.
        field: String,
        /// The deserializer's description.
        message: String,
    },

    /// The file declares no `[functions.NAME]` table.
    #[error(
        "{}: no functions declared; add at least one `[functions.NAME]` table with a `path`",
        file.display()
    )]
    NoFunctions {
        /// The file, as given.
        file: PathBuf,
    },

    /// [`crate::Pipeline::job`] was asked for a name the file does not declare.
    #[error(
        "{}: no job named {name:?}; declared jobs: {}",
        file.display(),
        if declared.is_empty() { "none (add a [job.NAME] table)".to_owned() } else { declared.join(", ") }
    )]
    UnknownJob {
        /// The file, as given.
        file: PathBuf,
        /// The name asked for.
        name: String,
        /// The jobs the file declares, sorted.
        declared: Vec<String>,
    },

    /// [`crate::Pipeline::function`] was asked for a name the file does not declare.
    #[error(
        "{}: no function named {name:?}; declared functions: {}",
        file.display(),
        declared.join(", ")
    )]
    UnknownFunction {
        /// The file, as given.
        file: PathBuf,
        /// The name asked for.
        name: String,
        /// The names the file declares, sorted.
        declared: Vec<String>,
    },
}

impl PipelineError {
    /// Where in the pipeline file the error is, if it has a position.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Syntax { at, .. }
            | Self::UnknownField { at, .. }
            | Self::WrongType { at, .. }
            | Self::MissingField { at, .. }
            | Self::BadDuration { at, .. }
            | Self::OutOfRange { at, .. }
            | Self::DurationOutOfRange { at, .. }
            | Self::BadFunctionName { at, .. }
            | Self::InvalidValue { at, .. }
            | Self::BadEnvKey { at, .. }
            | Self::ReservedEnvKey { at, .. }
            | Self::BadFunctionPath { at, .. }
            | Self::RetryAttemptsOutOfRange { at, .. }
            | Self::UndeclaredFunction { at, .. }
            | Self::BadTopic { at, .. }
            | Self::NoTopics { at, .. }
            | Self::DuplicateTopic { at, .. }
            | Self::DuplicateTriggerName { at, .. }
            | Self::SourceTopicReused { at, .. }
            | Self::Requires { at, .. }
            | Self::BackoffOrder { at, .. }
            | Self::ExceedsLimit { at, .. }
            | Self::ManagedProperty { at, .. }
            | Self::KafkaProperty { at, .. }
            | Self::BadBootstrapServers { at, .. }
            | Self::BadFilter { at, .. }
            | Self::Invalid { at, .. } => Some(at),
            Self::Read { .. }
            | Self::Unpack { .. }
            | Self::NoFunctions { .. }
            | Self::UnknownFunction { .. }
            | Self::UnknownJob { .. } => None,
        }
    }
}

/// A table as the reader wrote it: `[functions.echo]`, or the path of an
/// element of an array of tables such as `trigger.kafka[0]`.
fn table_header(table: &str) -> String {
    if table.ends_with(']') {
        table.to_owned()
    } else {
        format!("[{table}]")
    }
}

fn table_name(table: &str) -> String {
    if table.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in `{table}`")
    }
}

fn one_of(expected: &[&str]) -> String {
    let quoted: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
    match quoted.as_slice() {
        [one] => one.clone(),
        _ => format!("one of {}", quoted.join(", ")),
    }
}

fn path_problem(resolved: &std::path::Path, problem: &PathProblem) -> String {
    let shown = resolved.display();
    if crate::package::is_archive(resolved) {
        // A package as a `.zip` archive.
        match problem {
            PathProblem::NotFound => return format!("{shown} does not exist"),
            PathProblem::BadArchive(why) => return format!("archive {shown}: {why}"),
            PathProblem::NoBootstrap => {
                return format!(
                    "archive {shown} has no `bootstrap` at its root; a function needs an \
                     executable file named `bootstrap` (or one of its `layers`: a custom runtime)"
                );
            }
            PathProblem::BootstrapNotAFile => {
                return format!("`bootstrap` in archive {shown} is not a regular file");
            }
            PathProblem::BootstrapNotExecutable => {
                return format!(
                    "`bootstrap` in archive {shown} is not executable (`chmod +x` it before \
                     zipping)"
                );
            }
            PathProblem::Inaccessible(_) | PathProblem::NotAFolder => {}
        }
    }
    match problem {
        PathProblem::BadArchive(why) => format!("archive {shown}: {why}"),
        PathProblem::NotFound => format!("folder {shown} does not exist"),
        PathProblem::Inaccessible(e) => format!("cannot access {shown}: {e}"),
        PathProblem::NotAFolder => format!("{shown} is not a folder (nor a .zip archive)"),
        PathProblem::NoBootstrap => format!(
            "folder {shown} has no `bootstrap`; a function folder needs an executable \
             file named `bootstrap` (or one of its `layers`, at its root: a custom runtime)"
        ),
        PathProblem::BootstrapNotAFile => {
            format!(
                "{} is not a regular file",
                resolved.join("bootstrap").display()
            )
        }
        PathProblem::BootstrapNotExecutable => format!(
            "{} is not executable (run `chmod +x` on it)",
            resolved.join("bootstrap").display()
        ),
    }
}
