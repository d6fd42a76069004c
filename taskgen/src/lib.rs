//! # sluice-taskgen: data sets to task calls (`sluice backfill`)
//!
//! This crate turns existing data sets into function calls so that every item
//! is handled **at least once**, across crashes and restarts:
//!
//! ```text
//! files (paths, globs; sorted)          reader thread             dispatcher (tokio)
//!  Parquet / CSV / JSONL / text  ──▶  items → calls of ≤ N  ──▶  bounded channel ──▶ Semaphore(C)
//!                                     (file, then row order)                         │
//!                                                                  Executor::invoke ◀┘ (retries)
//!                                                                    │ ok          │ gave up
//!                                                       redb progress store   dead-letter JSONL
//! ```
//!
//! - **Sources** are local files (plain paths or `glob` patterns, expanded
//!   and sorted) or `object_store` URLs: `file://`, `s3://`, `gs://`,
//!   `az://` (credentials from the environment), `memory://` (tests); a
//!   prefix lists every object below it, a glob in the last segment filters.
//! - **Items**: Parquet rows as JSON objects (through `arrow-json`, in
//!   column order; without `order_key` or dependencies the text `arrow-json`
//!   writes goes into the call as it is, no `serde_json::Value` per row), CSV
//!   records as objects of strings keyed by the header, JSON lines (one value
//!   per non-blank line), JSON documents (each element of the array at the
//!   top or at [`Input::items_pointer`], streamed), text lines (one JSON
//!   string per line). A line that
//!   cannot be read (malformed JSON, bad CSV record, invalid UTF-8) is a
//!   *failed item*: it goes to the dead-letter file with its `file:line`.
//!   [`Input::columns`] keeps only some fields (Parquet reads only those
//!   columns); CSV takes another delimiter. With [`Format::Objects`] each
//!   file or object is one item (`{"Key", "Size", "LastModified", "Etag",
//!   "url"}`, Distributed Map's S3 object listing), called alone with its
//!   bytes fetched by the call and staged in the sandbox
//!   (`{"items": [item], "object_file": "/run/sluice/payload", "batch"}`).
//! - **Calls** start at an item index of one file and hold up to
//!   `max_items_per_call` items and `max_bytes_per_call` bytes of items'
//!   JSON, so the same input always gives the same calls. The payload is
//!   `{"items": [...], "batch": {"source", "first_item", "count", "call_id"}}`
//!   (or, with [`PayloadFormat::Arrow`], `{"arrow": "<base64 Arrow IPC
//!   stream>", "batch": {...}}`) and the call id is `"<file>#<first>"`. The
//!   progress store remembers how calls were cut and refuses another cut.
//! - **Progress**: each successful call id is committed to an embedded
//!   [`redb`] database before the call counts as done (successes that
//!   finish together share one transaction: group commit); running the same
//!   backfill again skips those calls. A call interrupted in flight is simply
//!   called again: at least once, not exactly once.
//! - **Failures**: a call is tried up to `max_attempts` times while its error
//!   is [`InvokeError::retryable`]; then its items go to the dead-letter file
//!   and it counts as failed. Past `tolerated_failure_count` failed calls
//!   (unreadable items count as one each), or `tolerated_failure_percentage`
//!   of the items, the job stops with [`BackfillError::TooManyFailures`].
//! - **Distributed** ([`distributed`]): the same calls published to a Kafka
//!   topic for `sluice worker` processes, results recorded in the same
//!   progress store.
//! - **Order and dependencies** ([`OrderConfig`], module `schedule`): with
//!   an `order_key`, items of one key run one after another (keys in
//!   parallel); with `id_column` + `depends_on_column`, an item runs only
//!   after the items it depends on succeeded (else it is dead-lettered as
//!   `Sluice.DependencyFailed`). An order key alone streams the input once,
//!   cutting calls per key; dependencies first read only the id fields
//!   (reporting duplicate ids, missing ids and cycles before any call), then
//!   read the input once per dependency level (see [`plan_order`] for
//!   `--dry-run`).
//! - **Memory** stays bounded: in the streaming mode a reader thread feeds a
//!   channel of `max_concurrency` calls, and at most `max_concurrency` calls
//!   run; with ordering options the scheduler holds at most
//!   [`BackfillConfig::max_buffered_items`] items besides the calls in
//!   flight (the dependency mode also keeps a level and the dependency
//!   edges of every item, never the items). Stateful backfills
//!   ([`StateOptions`], module `fold`) stream too: items read and not yet
//!   folded stay within `max_buffered_items`.

pub mod distributed;
mod fold;
mod progress;
mod read;
mod source;
mod splice;

pub use progress::calls_done;
pub use source::{is_remote, register_object_store, results_target};
mod schedule;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use bytes::Bytes;
use serde_json::{Value, json};
use sluice_executor::{Executor, Fault, InvokeError, Response};
use thiserror::Error;
use tokio::sync::{Semaphore, mpsc};

use progress::{DeadLetter, Progress};
use read::Item;
pub use schedule::{LevelPlan, OrderConfig, plan_levels, plan_order};

/// Input format of the source files (the pipeline crate's [`DataFormat`](sluice_pipeline::DataFormat)).
pub use sluice_pipeline::DataFormat as Format;
pub use sluice_pipeline::{ArrowCompression, PayloadFormat};

/// How items are read from the source files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The files' format.
    pub format: Format,
    /// Fields kept in each item; `None`: all. Parquet reads only these
    /// columns from storage; CSV and JSON objects drop the other keys. A
    /// column missing from a Parquet or CSV file is an error naming the file;
    /// a JSON line that is not an object is a failed item naming its line
    /// (and one with none of the columns, sent as `{}`, is logged once per
    /// file as a likely misspelling).
    pub columns: Option<Vec<String>>,
    /// CSV field delimiter. Default `b','`.
    pub csv_delimiter: u8,
    /// Column names of CSV files that have no header line (their first
    /// line is an item); `None` (the default): each file's first line is
    /// its header.
    pub csv_headers: Option<Vec<String>>,
    /// How Arrow payloads are compressed. Default none.
    pub arrow_compression: ArrowCompression,
    /// Read only the first items of one file (the last file `max_items`
    /// reaches into, see [`limit_items`]). Default none.
    pub cap: Option<ItemCap>,
    /// With [`Format::Json`]: the JSON pointer of the array of items in
    /// each document. Default none: the top level.
    pub items_pointer: Option<String>,
}

impl From<Format> for Input {
    fn from(format: Format) -> Self {
        Input {
            format,
            columns: None,
            csv_delimiter: b',',
            csv_headers: None,
            arrow_compression: ArrowCompression::None,
            cap: None,
            items_pointer: None,
        }
    }
}

/// The first `items` items of `file` are read, and no more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemCap {
    /// The file.
    pub file: PathBuf,
    /// Items read from it (counting unreadable ones, which are failed items).
    pub items: u64,
}

impl Input {
    /// How many items of `file` are read: `None` for all of them.
    pub(crate) fn cap_of(&self, file: &Path) -> Option<u64> {
        self.cap
            .as_ref()
            .filter(|c| c.file == file)
            .map(|c| c.items)
    }
}

/// What [`limit_items`] keeps: the files, the cap of the last one, and how
/// many items that is (`max_items`, or fewer if the sources hold fewer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The sources the limit reaches into, in order.
    pub sources: Vec<PathBuf>,
    /// The last one's cap, if only its first items are needed.
    pub cap: Option<ItemCap>,
    /// Items in all.
    pub items: u64,
}

/// The sources `max_items` keeps: files in order until their items reach
/// `max_items`, the last one capped ([`Input::cap`]) if only its first
/// items are needed. Items are counted as the backfill reads them
/// (unreadable ones too); Parquet files are counted from their metadata,
/// the others by reading them, up to the file that reaches the limit.
pub fn limit_items(
    sources: &[PathBuf],
    input: &Input,
    max_items: u64,
) -> Result<Sample, BackfillError> {
    let mut kept = Vec::new();
    let mut before = 0u64;
    for file in sources {
        kept.push(file.clone());
        let left = max_items.saturating_sub(before);
        let items = match input.format {
            Format::Parquet => read::parquet_rows(file)?,
            // Counting stops once the file has more than is left.
            _ => {
                let mut n = 0u64;
                read::read_file_json(
                    file,
                    &Input {
                        cap: None,
                        ..input.clone()
                    },
                    &mut |_, _| {
                        n += 1;
                        if n > left {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    },
                )?;
                n
            }
        };
        if items >= left {
            let cap = (items > left).then(|| ItemCap {
                file: file.clone(),
                items: left,
            });
            return Ok(Sample {
                sources: kept,
                cap,
                items: max_items,
            });
        }
        before += items;
    }
    Ok(Sample {
        sources: kept,
        cap: None,
        items: before,
    })
}

/// An item that could not be read.
#[derive(Debug, Clone, Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ItemError {
    /// Source file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: u64,
    /// What is wrong with it.
    pub message: String,
    /// The line as read (lossy UTF-8).
    pub raw: String,
}

/// Why a backfill could not run or stopped.
#[derive(Debug, Error)]
pub enum BackfillError {
    /// A `--source` glob pattern is invalid.
    #[error("invalid source pattern {pattern:?}: {message}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// What the glob parser said.
        message: String,
    },
    /// A `--source` matches no file.
    #[error("no file matches {pattern:?}")]
    NoFiles {
        /// The path or pattern.
        pattern: String,
    },
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Config(String),
    /// A source file cannot be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A Parquet file is invalid or cannot be decoded.
    #[error("{}: Parquet: {message}", file.display())]
    Parquet {
        /// The file.
        file: PathBuf,
        /// The decoder's message.
        message: String,
    },
    /// An Avro file is invalid or cannot be decoded (`record`: the 1-based
    /// record the decoder stopped at, 0 for the file's header).
    #[error("{}: Avro{}: {message}", file.display(), if *record == 0 { String::new() } else { format!(", record {record}") })]
    Avro {
        /// The file.
        file: PathBuf,
        /// Where the decoder stopped.
        record: u64,
        /// The decoder's message.
        message: String,
    },
    /// With `payload = "parquet"`, one row group's chosen columns do not fit
    /// in a call (row groups are never cut).
    #[error(
        "{}: row group {row_group} ({rows} rows) takes {bytes} bytes in a call with the chosen columns, over max_bytes_per_call = {limit}: row groups are never cut, so write the file with smaller row groups, choose fewer columns, or use payload \"arrow\""
    , file.display())]
    RowGroupTooLarge {
        /// The file.
        file: PathBuf,
        /// Index of the row group in the file.
        row_group: usize,
        /// Its rows.
        rows: u64,
        /// Its chosen column chunks, base64-encoded.
        bytes: u64,
        /// The call size limit.
        limit: usize,
    },
    /// `columns` names a column the file does not have.
    #[error("{}: no column {column:?} (columns: {})", file.display(), available.join(", "))]
    MissingColumn {
        /// The file.
        file: PathBuf,
        /// The missing column.
        column: String,
        /// The file's columns.
        available: Vec<String>,
    },
    /// An ordering option (`order_key`, `id_column`, `depends_on_column`)
    /// names a column a file does not have: nothing would be ordered by it.
    #[error("{option} {column:?}: {} has no such column (columns: {})", file.display(), available.join(", "))]
    OrderColumnMissing {
        /// The option.
        option: &'static str,
        /// The file.
        file: PathBuf,
        /// The column it names.
        column: String,
        /// The file's columns.
        available: Vec<String>,
    },
    /// Talking to the Kafka cluster of a distributed job failed (external;
    /// running again may help).
    #[error("Kafka: {what}: {message}")]
    Kafka {
        /// What was being done.
        what: String,
        /// The client's message.
        message: String,
    },
    /// A JSON document (`format = "json"`) cannot be read any further.
    #[error("{}:{line}: JSON: {message}", file.display())]
    Json {
        /// The file.
        file: PathBuf,
        /// 1-based line where reading stopped.
        line: u64,
        /// The parser's message.
        message: String,
    },
    /// A CSV file cannot be read any further.
    #[error("{}:{line}: CSV: {message}", file.display())]
    Csv {
        /// The file.
        file: PathBuf,
        /// 1-based line where reading stopped.
        line: u64,
        /// The parser's message.
        message: String,
    },
    /// The progress database failed.
    #[error("progress store {}: {source}", path.display())]
    Progress {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<redb::Error>,
    },
    /// The progress store cannot be created where it goes (by default next
    /// to the first source file, whose folder may be read-only).
    #[error(
        "progress store {}: cannot be created there ({source}); choose a writable place \
         with --progress (or `progress = \"...\"` in the job)",
        path.display()
    )]
    ProgressNotWritable {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Another run holds the progress store (one run per store at a time:
    /// two would call the same items).
    #[error(
        "progress store {} is in use by another run of this backfill (a store takes one run at \
         a time); wait for that run or stop it (Ctrl-C finishes its calls in flight), or give \
         this one another --progress",
        path.display()
    )]
    ProgressInUse {
        /// The database file.
        path: PathBuf,
    },
    /// The progress store was written by a run that cut calls differently
    /// (items or bytes per call, ordering): resuming from it could skip
    /// items never called.
    #[error(
        "progress store {} belongs to a run with calls cut as {stored:?}, not {wanted:?}; \
         use the same options, or another --progress file to start afresh",
        path.display()
    )]
    ProgressLayout {
        /// The database file.
        path: PathBuf,
        /// The layout it was written with.
        stored: String,
        /// The layout of this run.
        wanted: String,
    },
    /// The dead-letter file cannot be written.
    #[error("dead-letter file {}: {source}", path.display())]
    DeadLetter {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The results file cannot be read (to resume) or written.
    #[error("results file {}: {source}", path.display())]
    Results {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Duplicate ids, a dependency on a missing item, or a cycle (found
    /// before anything runs; the message names the ids and their `file:row`).
    #[error("{0}")]
    Dependencies(String),
    /// The state store of a stateful job failed (or holds a checkpoint
    /// that cannot be trusted).
    #[error("state: {0}")]
    State(#[from] sluice_state_carrier::StateError),
    /// A window's final invoke kept failing: the job stops, the window stays
    /// open in the checkpoint, and a rerun tries it again.
    #[error("the final invoke of key {key:?}'s window failed {attempts} times: {error}")]
    FinalInvokeFailed {
        /// The state key (`""` for the partition scope).
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// More calls failed than tolerated; the job stopped.
    #[error(
        "stopped: {failed} failed calls exceed {tolerated} (last: {last_error}); see {}",
        dead_letter.display()
    )]
    TooManyFailures {
        /// Failed calls (and unreadable items) so far.
        failed: u64,
        /// What was tolerated, e.g. `the 3 tolerated` or `1.5% of 2000 items`.
        tolerated: String,
        /// The last failure.
        last_error: String,
        /// Where the failed items went.
        dead_letter: PathBuf,
        /// Counters when the job stopped.
        summary: Box<Summary>,
    },
}

impl BackfillError {
    /// Who is at fault: [`Fault::User`] for bad options, input files and
    /// failing functions; [`Fault::External`] for I/O and storage errors.
    pub fn fault(&self) -> Fault {
        match self {
            BackfillError::BadPattern { .. }
            | BackfillError::NoFiles { .. }
            | BackfillError::Config(_)
            | BackfillError::Parquet { .. }
            | BackfillError::Avro { .. }
            | BackfillError::MissingColumn { .. }
            | BackfillError::OrderColumnMissing { .. }
            | BackfillError::RowGroupTooLarge { .. }
            | BackfillError::Csv { .. }
            | BackfillError::Json { .. }
            | BackfillError::Dependencies(_)
            | BackfillError::ProgressLayout { .. }
            | BackfillError::ProgressNotWritable { .. }
            | BackfillError::ProgressInUse { .. }
            | BackfillError::TooManyFailures { .. }
            | BackfillError::FinalInvokeFailed { .. } => Fault::User,
            BackfillError::State(e) => match e.fault() {
                sluice_state_carrier::Fault::User => Fault::User,
                sluice_state_carrier::Fault::External => Fault::External,
                sluice_state_carrier::Fault::Data => Fault::Internal,
            },
            BackfillError::Read { .. }
            | BackfillError::Progress { .. }
            | BackfillError::Kafka { .. }
            | BackfillError::DeadLetter { .. }
            | BackfillError::Results { .. } => Fault::External,
        }
    }
}

/// How many items go into one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Items per call (at least 1).
    pub items: usize,
    /// Bytes of the items' JSON per call; a single larger item still makes
    /// a call of its own.
    pub bytes: usize,
}

impl Limits {
    /// Whether a call holding `count` items of `bytes` is full before an
    /// item of `next` bytes.
    fn full(self, count: usize, bytes: usize, next: usize) -> bool {
        count >= self.items.max(1) || bytes.saturating_add(next) > self.bytes
    }
}

/// Length of `v` as compact JSON, without building the text.
pub(crate) fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing to a counter cannot fail, and a `Value` always serializes.
    let _ = serde_json::to_writer(&mut c, v);
    c.0 + 1 // the separating comma
}

/// What to backfill and how.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// Registered function to call.
    pub function: String,
    /// Source files, in order (see [`resolve_sources`]).
    pub sources: Vec<PathBuf>,
    /// Format, columns and CSV options.
    pub input: Input,
    /// Items per call (at least 1).
    pub max_items_per_call: usize,
    /// Bytes of items (as JSON) per call.
    pub max_bytes_per_call: usize,
    /// Calls in flight at once (at least 1).
    pub max_concurrency: usize,
    /// The redb progress database (see [`default_progress_path`]).
    pub progress: PathBuf,
    /// Dead-letter JSON lines file.
    pub dead_letter: PathBuf,
    /// JSON-lines file of each successful call's response (see
    /// `progress::result_line`); `None`: responses are not kept. Not
    /// with `state`.
    pub results: Option<PathBuf>,
    /// Attempts per call (at least 1).
    pub max_attempts: u32,
    /// Failed calls allowed before the job stops; `None`: no limit.
    pub tolerated_failure_count: Option<u64>,
    /// Failed items allowed, in percent of all items; `None`: no limit.
    /// Checked during the run against the item count known up front
    /// (Parquet metadata, or the id pass with item dependencies), and at
    /// the end against the items read.
    pub tolerated_failure_percentage: Option<f64>,
    /// Order keys and dependencies (default: none, file-then-row order).
    pub order: OrderConfig,
    /// How calls carry their items (default JSON; Arrow for Parquet sources
    /// in file-then-row order).
    pub payload: PayloadFormat,
    /// With a columnar payload: stage it as a file in the sandbox
    /// ([`sluice_executor::ATTACHMENT_PATH`]) that the event names
    /// (`{"parquet_file": ...}` or `{"arrow_file": ...}`) instead of
    /// carrying it in base64 (default false). Not with `--distributed`.
    pub payload_file: bool,
    /// Files that start only after other files fully succeeded (default
    /// none). See [`file_levels`].
    pub file_dependencies: Vec<FileDependency>,
    /// State carried from call to call (default none). See [`StateOptions`].
    pub state: Option<StateOptions>,
    /// With `order_key` or item dependencies: the most items the scheduler
    /// holds at once — in calls being filled per key and in calls waiting
    /// for their key's previous call — before it cuts the oldest partial
    /// calls short and stops reading (default
    /// [`DEFAULT_MAX_BUFFERED_ITEMS`], at least 1). It decides how calls are
    /// cut, so it is part of the layout kept in the progress store. A
    /// stateful backfill holds at most this many items read and not yet
    /// folded (queued per key or in calls in flight).
    pub max_buffered_items: usize,
    /// A JSON object every call's event carries as `"batch_input"` (Step
    /// Functions Distributed Map's `BatchInput`): parameters all calls
    /// share. Default none.
    pub batch_input: Option<serde_json::Map<String, Value>>,
    /// Call only the first this many items of the sources, in file then
    /// row order (Step Functions Distributed Map's `MaxItems`): to try a
    /// function on a sample. Applied when the run starts ([`limit_items`]);
    /// part of the layout kept in the progress store. Not with
    /// dependencies or `payload = "parquet"`. Default none: every item.
    pub max_items: Option<u64>,
    /// With [`Format::Objects`]: larger objects are not fetched; their call
    /// is dead-lettered as `Sluice.ObjectTooLarge` (default
    /// [`sluice_pipeline::DEFAULT_MAX_OBJECT_BYTES`], at most the sandbox's
    /// attachment limit).
    pub max_object_bytes: u64,
}

/// Default [`BackfillConfig::max_buffered_items`] (the pipeline crate's):
/// 100 000 items (about 100 MB of 1 KB items), room for a partial call of
/// 100 items for each of 1 000 keys.
pub use sluice_pipeline::DEFAULT_MAX_BUFFERED_ITEMS;

/// A stateful backfill (`state = {...}` on the job): items are folded in
/// input order (per `order_key` value with the key scope), each call
/// carrying the state the previous one returned (Lambda's tumbling-window
/// contract, see `sluice_state_carrier`). The checkpoint (state and the
/// position of the last folded item, per key) is the job's progress: a
/// resumed job skips the items already folded. Windows are counts, or none
/// (one window closed at the end of the input); every window ends with a
/// final invoke whose answer is kept as the key's `last_result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateOptions {
    /// The job's `state` table.
    pub config: sluice_pipeline::StateConfig,
    /// The checkpoint's source name, e.g. `backfill/JOB`.
    pub source: String,
    /// The Kafka cluster of a changelog store.
    pub servers: String,
}

/// Files matching `files` are called only after every call of the files
/// matching each of `after` succeeded; otherwise their calls are
/// dead-lettered as `Sluice.DependencyFailed`. A pattern without `/`
/// matches file names, one with `/` whole paths (or URLs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDependency {
    /// Glob of the dependent files.
    pub files: String,
    /// Globs of the files they wait for.
    pub after: Vec<String>,
}

/// Whether glob `pattern` matches `source` (its file name if the pattern
/// has no `/`).
fn matches_source(pattern: &glob::Pattern, raw: &str, source: &Path) -> bool {
    if raw.contains('/') {
        pattern.matches(&source.display().to_string())
    } else {
        source
            .file_name()
            .is_some_and(|n| pattern.matches(&n.to_string_lossy()))
    }
}

/// Sources in dependency levels: level 0 waits for nothing, level n for
/// files of lower levels; each level keeps the sources' order, and every
/// source lands in exactly one level. Also returns, per dependent source,
/// the sources it waits for.
///
/// # Errors
/// A pattern that matches no source, a file waiting for itself, or a cycle
/// ([`BackfillError::Dependencies`], naming the files).
#[allow(clippy::type_complexity)]
pub fn file_levels(
    sources: &[PathBuf],
    deps: &[FileDependency],
) -> Result<(Vec<Vec<PathBuf>>, HashMap<PathBuf, Vec<PathBuf>>), BackfillError> {
    let compile = |raw: &str| {
        glob::Pattern::new(raw).map_err(|e| BackfillError::BadPattern {
            pattern: raw.to_owned(),
            message: e.to_string(),
        })
    };
    let matching = |raw: &str| -> Result<Vec<PathBuf>, BackfillError> {
        let p = compile(raw)?;
        let found: Vec<PathBuf> = sources
            .iter()
            .filter(|s| matches_source(&p, raw, s))
            .cloned()
            .collect();
        if found.is_empty() {
            return Err(BackfillError::Dependencies(format!(
                "file dependency pattern {raw:?} matches none of the sources"
            )));
        }
        Ok(found)
    };
    let mut waits: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
    for d in deps {
        let files = matching(&d.files)?;
        for after in &d.after {
            for pre in matching(after)? {
                for f in &files {
                    if *f == pre {
                        return Err(BackfillError::Dependencies(format!(
                            "{} would wait for itself ({:?} after {after:?})",
                            f.display(),
                            d.files
                        )));
                    }
                    let w = waits.entry(f.clone()).or_default();
                    if !w.contains(&pre) {
                        w.push(pre.clone());
                    }
                }
            }
        }
    }
    let mut level: HashMap<&PathBuf, usize> = HashMap::new();
    let mut remaining: Vec<&PathBuf> = sources.iter().collect();
    let mut current = 0;
    while !remaining.is_empty() {
        let ready: Vec<&PathBuf> = remaining
            .iter()
            .copied()
            .filter(|s| {
                waits.get(*s).is_none_or(|pre| {
                    pre.iter()
                        .all(|p| level.get(p).is_some_and(|l| *l < current))
                })
            })
            .collect();
        if ready.is_empty() {
            let stuck: Vec<String> = remaining.iter().map(|s| s.display().to_string()).collect();
            return Err(BackfillError::Dependencies(format!(
                "file dependencies form a cycle among: {}",
                stuck.join(", ")
            )));
        }
        for s in &ready {
            level.insert(s, current);
        }
        remaining.retain(|s| !ready.contains(s));
        current += 1;
    }
    let mut levels = vec![Vec::new(); current];
    for s in sources {
        levels[level[s]].push(s.clone());
    }
    Ok((levels, waits))
}

impl BackfillConfig {
    /// A configuration with the documented defaults (the pipeline crate's
    /// `DEFAULT_*` constants): 100 items and 6 MB per call, 4 calls in
    /// flight, 3 attempts, no failure limit, file-then-row order, the
    /// progress store from [`default_progress_path`] and the dead-letter
    /// file next to it.
    pub fn new(function: &str, sources: Vec<PathBuf>, input: impl Into<Input>) -> Self {
        let input = input.into();
        let limits = Limits {
            // Objects are called one at a time.
            items: if input.format == Format::Objects {
                1
            } else {
                sluice_pipeline::DEFAULT_MAX_ITEMS_PER_CALL as usize
            },
            bytes: sluice_pipeline::DEFAULT_MAX_BYTES_PER_CALL,
        };
        let progress = default_progress_path(&sources, input.format, function, limits);
        BackfillConfig {
            function: function.to_owned(),
            dead_letter: default_dead_letter_path(&progress),
            results: None,
            progress,
            sources,
            input,
            max_items_per_call: limits.items,
            max_bytes_per_call: limits.bytes,
            max_concurrency: sluice_pipeline::DEFAULT_CONCURRENCY as usize,
            max_attempts: sluice_pipeline::DEFAULT_MAX_ATTEMPTS,
            tolerated_failure_count: None,
            tolerated_failure_percentage: None,
            order: OrderConfig::default(),
            payload: PayloadFormat::Json,
            payload_file: false,
            file_dependencies: Vec::new(),
            state: None,
            max_buffered_items: DEFAULT_MAX_BUFFERED_ITEMS,
            batch_input: None,
            max_items: None,
            max_object_bytes: sluice_pipeline::DEFAULT_MAX_OBJECT_BYTES,
        }
    }

    /// How calls are cut, as stored with the progress: what makes call ids
    /// mean the same items.
    fn layout(&self) -> String {
        let o = &self.order;
        // Arrow calls are cut by item count only.
        let bytes = match self.payload {
            PayloadFormat::Json => self.max_bytes_per_call.to_string(),
            PayloadFormat::Arrow => "arrow".to_owned(),
            // Whole row groups within both limits.
            PayloadFormat::Parquet => format!("parquet {}", self.max_bytes_per_call),
        };
        let mut layout = format!(
            "items={} bytes={bytes} order_key={:?} id_column={:?} depends_on={:?}",
            self.max_items_per_call, o.order_key, o.id_column, o.depends_on_column
        );
        // Without a header line, a file's first line is an item: every item
        // after it moves by one.
        if let Some(headers) = &self.input.csv_headers {
            layout.push_str(&format!(" csv_headers={headers:?}"));
        }
        // The budget cuts calls only with ordering options.
        if o.is_active() && self.state.is_none() {
            layout.push_str(&format!(" buffered={}", self.max_buffered_items));
        }
        // Plain JSON calls measure items by the text read (Parquet rows as
        // arrow-json writes them, JSON lines as they are), not re-written:
        // a store cut the older way is refused rather than misread.
        if !o.is_active() && self.state.is_none() && self.payload == PayloadFormat::Json {
            layout.push_str(" sizes=text");
        }
        // A sample's last call may be cut short by the limit: the same call
        // id would hold fewer items than in a run over everything.
        if let Some(n) = self.max_items {
            layout.push_str(&format!(" max_items={n}"));
        }
        // A call per object, not per line of it.
        if self.input.format == Format::Objects {
            layout.push_str(" objects");
        }
        // Other items, in another order.
        if let Some(pointer) = &self.input.items_pointer {
            layout.push_str(&format!(" items_pointer={pointer:?}"));
        }
        layout
    }

    /// Items and bytes per call.
    pub fn limits(&self) -> Limits {
        Limits {
            items: self.max_items_per_call,
            bytes: self.max_bytes_per_call,
        }
    }
}

/// Counters of a backfill run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Calls seen (including skipped ones).
    pub calls_total: u64,
    /// Calls that succeeded in this run.
    pub calls_succeeded: u64,
    /// Calls that gave up (items dead-lettered).
    pub calls_failed: u64,
    /// Retry attempts (beyond the first) made.
    pub calls_retried: u64,
    /// Calls skipped because an earlier run completed them.
    pub calls_skipped: u64,
    /// Items seen (including skipped and unreadable ones).
    pub items_total: u64,
    /// Items in calls that succeeded in this run.
    pub items_succeeded: u64,
    /// Items dead-lettered (failed calls and unreadable items).
    pub items_failed: u64,
    /// Items in skipped calls.
    pub items_skipped: u64,
    /// Wall time so far.
    pub duration: Duration,
    /// Whether the run was stopped by the shutdown signal before the end.
    pub interrupted: bool,
    /// Items the input holds, when known before reading it all (Parquet
    /// metadata; the id pass with item dependencies): for progress bars.
    pub items_expected: Option<u64>,
    /// With `order_key` or item dependencies: the most items the scheduler
    /// held at once (partial and waiting calls); in a stateful backfill, the
    /// most items read and not yet folded. Never above
    /// [`BackfillConfig::max_buffered_items`]; 0 in the other modes.
    pub peak_buffered_items: u64,
    /// With `order_key`: items without a value for it (no field, null, an
    /// empty string or an object). They run in no particular order (in a
    /// stateful job, they share the empty key's state). Many of them often
    /// mean a misspelt key in JSON lines, whose fields are not checked
    /// before the run.
    pub items_without_order_key: u64,
    /// Stateful jobs: failures of earlier runs of the fold, kept in the
    /// dead-letter file (a fold does not call them again).
    pub earlier_failures: u64,
}

impl Summary {
    /// Items handled (succeeded) per second.
    pub fn items_per_second(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.items_succeeded as f64 / secs
        } else {
            0.0
        }
    }
}

/// Callback with a successful call's id and response.
pub type ResponseHook = Arc<dyn Fn(&str, &Response) + Send + Sync>;
/// Callback with the counters so far.
pub type TickHook = Arc<dyn Fn(&Summary) + Send + Sync>;

/// Optional observers of a run.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Called after each successful call has been recorded.
    pub on_response: Option<ResponseHook>,
    /// Called every `.0` with the counters so far.
    pub on_tick: Option<(Duration, TickHook)>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("on_response", &self.on_response.is_some())
            .field("on_tick", &self.on_tick.as_ref().map(|t| t.0))
            .finish()
    }
}

/// Record batches as a JSON array of row objects (for dead-letter lines).
fn rows_json(rows: &[RecordBatch]) -> Value {
    let mut writer = arrow_json::ArrayWriter::new(Vec::new());
    let converted = rows
        .iter()
        .try_for_each(|b| writer.write(b))
        .and_then(|()| writer.finish());
    match converted {
        Ok(()) => serde_json::from_slice(&writer.into_inner()).unwrap_or(Value::Null),
        Err(e) => json!(format!("rows not convertible to JSON: {e}")),
    }
}

/// The rows of a staged columnar payload (`parquet_file` or `arrow_file`,
/// as [`Call::event`] names the field) as JSON, for dead-letter lines.
pub(crate) fn attachment_rows(field: &str, bytes: &[u8]) -> Value {
    let batches = if field == "parquet_file" {
        splice::decode(bytes)
    } else {
        arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
            .map_err(|e| e.to_string())
    };
    match batches {
        Ok(b) => rows_json(&b),
        Err(e) => json!(format!("rows not readable: {e}")),
    }
}

/// Expands paths and glob patterns into existing files: each pattern's
/// matches sorted, patterns in the order given, duplicates dropped, paths
/// made absolute (call ids contain them).
pub fn resolve_sources(patterns: &[String]) -> Result<Vec<PathBuf>, BackfillError> {
    let mut out: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let found = match source::resolve(pattern)? {
            Some(found) => found,
            None => local_files(pattern)?,
        };
        for f in found {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// The local files `pattern` names, canonical and sorted: every file below
/// it for a folder (as for an object-store prefix), else the files its
/// glob matches. None is an error.
fn local_files(pattern: &str) -> Result<Vec<PathBuf>, BackfillError> {
    let mut found = Vec::new();
    if Path::new(pattern).is_dir() {
        files_below(Path::new(pattern), &mut found)?;
    } else {
        let paths = glob::glob(pattern).map_err(|e| BackfillError::BadPattern {
            pattern: pattern.to_owned(),
            message: e.to_string(),
        })?;
        for p in paths {
            let p = p.map_err(|e| BackfillError::Read {
                file: e.path().to_path_buf(),
                source: std::io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            if p.is_file() {
                let abs = std::fs::canonicalize(&p)
                    .map_err(|source| BackfillError::Read { file: p, source })?;
                found.push(abs);
            }
        }
    }
    if found.is_empty() {
        return Err(BackfillError::NoFiles {
            pattern: pattern.to_owned(),
        });
    }
    found.sort();
    Ok(found)
}

/// The format of a data set from its names: the first pattern's extension,
/// else (a folder, a prefix) the first resolved file's.
pub fn format_of(patterns: &[String], sources: &[PathBuf]) -> Option<Format> {
    patterns
        .first()
        .and_then(|p| Format::from_extension(p))
        .or_else(|| {
            sources
                .first()
                .and_then(|f| Format::from_extension(&f.to_string_lossy()))
        })
}

/// The files below `dir`, at any depth, canonical, skipping hidden names
/// (such as the progress store sluice keeps next to the data).
fn files_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BackfillError> {
    let failed = |source| BackfillError::Read {
        file: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            files_below(&path, out)?;
        } else if path.is_file() {
            out.push(
                std::fs::canonicalize(&path).map_err(|source| BackfillError::Read {
                    file: path.clone(),
                    source,
                })?,
            );
        }
    }
    Ok(())
}

/// `<first source's folder>/.sluice-backfill-<hash>.redb`, the hash covering
/// sources, format, function and batch size: the same command finds the same
/// store, a different one does not.
pub fn default_progress_path(
    sources: &[PathBuf],
    format: Format,
    function: &str,
    limits: Limits,
) -> PathBuf {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for s in sources {
        feed(s.as_os_str().as_encoded_bytes());
    }
    feed(format.name().as_bytes());
    feed(function.as_bytes());
    feed(limits.items.to_string().as_bytes());
    feed(limits.bytes.to_string().as_bytes());
    let dir = sources
        .first()
        .filter(|s| !source::is_remote(s))
        .and_then(|s| s.parent())
        .unwrap_or(Path::new("."));
    dir.join(format!(".sluice-backfill-{h:016x}.redb"))
}

/// Where responses bound for an object store are kept first: `X.redb` →
/// `X.results.jsonl` next to the progress store.
pub fn local_results_path(progress: &Path) -> PathBuf {
    progress.with_extension("results.jsonl")
}

/// The dead-letter path next to a progress store: `X.redb` → `X.dead.jsonl`.
pub fn default_dead_letter_path(progress: &Path) -> PathBuf {
    progress.with_extension("dead.jsonl")
}

/// One source file as `--dry-run` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePlan {
    /// The file.
    pub file: PathBuf,
    /// Rows per row group (Parquet only).
    pub row_groups: Option<Vec<i64>>,
    /// Readable items.
    pub items: u64,
    /// Unreadable items.
    pub bad_items: u64,
    /// Calls the items make.
    pub calls: u64,
}

/// Rows of all sources from Parquet metadata, without reading data (with
/// [`Format::Objects`], the number of objects); `None` for other formats.
pub fn expected_items(sources: &[PathBuf], input: &Input) -> Result<Option<u64>, BackfillError> {
    if input.format == Format::Objects {
        return Ok(Some(sources.len() as u64));
    }
    if input.format != Format::Parquet {
        return Ok(None);
    }
    let mut total = 0u64;
    for file in sources {
        let rows = read::parquet_rows(file)?;
        total += input.cap_of(file).map_or(rows, |cap| cap.min(rows));
    }
    Ok(Some(total))
}

/// A CSV source that looks read with the wrong delimiter: its header is
/// one column whose name holds another common delimiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelimiterHint {
    /// The file whose header was read.
    pub file: PathBuf,
    /// That header, as one column.
    pub header: String,
    /// The delimiter the header probably uses.
    pub likely: char,
}

/// With CSV sources, reads the first file's header and returns a
/// [`DelimiterHint`] when it parses as a single column containing `;`, `,`,
/// a tab or `|` (other than the delimiter in use): every row would then be
/// one field named after the whole header, which no function expects.
/// `None` for other formats, plausible headers, or a header that cannot be
/// read (the run itself reports that).
#[must_use]
pub fn suspect_csv_delimiter(sources: &[PathBuf], input: &Input) -> Option<DelimiterHint> {
    // Given column names are not read from the file.
    if input.format != Format::Csv || input.csv_headers.is_some() {
        return None;
    }
    let file = sources.first()?;
    let header = match read::field_names(file, input) {
        Ok(Some(fields)) if fields.len() == 1 => fields.into_iter().next()?,
        _ => return None,
    };
    let likely = [';', ',', '\t', '|']
        .into_iter()
        .filter(|&c| u8::try_from(c).ok() != Some(input.csv_delimiter))
        .max_by_key(|&c| header.matches(c).count())
        .filter(|&c| header.contains(c))?;
    Some(DelimiterHint {
        file: file.clone(),
        header,
        likely,
    })
}

/// Reads every source without calling anything (calls cut as JSON
/// payloads cut them).
pub fn plan(
    sources: &[PathBuf],
    input: &Input,
    limits: Limits,
) -> Result<Vec<FilePlan>, BackfillError> {
    plan_payload(sources, input, limits, PayloadFormat::Json)
}

/// Like [`plan`], with calls cut as `payload` cuts them (Parquet payloads:
/// from the metadata alone).
pub fn plan_payload(
    sources: &[PathBuf],
    input: &Input,
    limits: Limits,
    payload: PayloadFormat,
) -> Result<Vec<FilePlan>, BackfillError> {
    check_input(input)?;
    check_columnar(payload, input)?;
    let mut plans = Vec::new();
    for file in sources {
        if payload == PayloadFormat::Parquet {
            let (rows, calls) = splice::plan(file, input.columns.as_deref(), limits)?;
            plans.push(FilePlan {
                file: file.clone(),
                items: rows.iter().sum(),
                row_groups: Some(
                    rows.iter()
                        .map(|&n| i64::try_from(n).unwrap_or(0))
                        .collect(),
                ),
                bad_items: 0,
                calls,
            });
            continue;
        }
        let row_groups = match input.format {
            Format::Parquet => Some(read::parquet_row_groups(file)?),
            _ => None,
        };
        let (mut items, mut bad_items, mut calls) = (0, 0, 0);
        let mut splitter = Splitter::new(String::new(), limits);
        read::read_file_json(file, input, &mut |index, item| {
            match &item {
                Item::Value(_) | Item::Json(_) => items += 1,
                Item::Bad(_) => bad_items += 1,
            }
            if let Some(call) = splitter.push(index, item)
                && !call.is_empty()
            {
                calls += 1;
            }
            ControlFlow::Continue(())
        })?;
        if splitter.finish().is_some_and(|c| !c.is_empty()) {
            calls += 1;
        }
        plans.push(FilePlan {
            file: file.clone(),
            row_groups,
            items,
            bad_items,
            calls,
        });
    }
    Ok(plans)
}

/// One call as the reader hands it over.
#[derive(Debug)]
struct Call {
    source: String,
    first: u64,
    items: Vec<Value>,
    /// Items as JSON text, comma-separated (the body of a JSON array), and
    /// how many (read with [`read::read_file_json`]; then `items` is empty).
    json: String,
    json_count: usize,
    bad: Vec<ItemError>,
    /// With `payload = "arrow"`: the call's rows (and no `items`).
    rows: Vec<RecordBatch>,
    /// With `payload = "parquet"`: the call's row groups (and no `items`).
    parquet: Option<splice::Spliced>,
    /// How `rows` are compressed in the payload.
    compression: ArrowCompression,
    /// With [`Format::Objects`], once fetched: the object's bytes, staged
    /// as a file for the call.
    object: Option<Bytes>,
}

impl Call {
    fn new(source: String, first: u64) -> Call {
        Call {
            source,
            first,
            items: Vec::new(),
            json: String::new(),
            json_count: 0,
            bad: Vec::new(),
            rows: Vec::new(),
            parquet: None,
            compression: ArrowCompression::None,
            object: None,
        }
    }

    fn id(&self) -> String {
        format!("{}#{}", self.source, self.first)
    }

    /// Readable items (JSON values, JSON texts or Arrow rows).
    fn len(&self) -> usize {
        self.items.len()
            + self.json_count
            + self.rows.iter().map(RecordBatch::num_rows).sum::<usize>()
            + self.parquet.as_ref().map_or(0, |p| p.rows)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items as JSON (Arrow rows converted), for the dead-letter file.
    fn items_json(&self) -> Value {
        if self.json_count > 0 {
            let mut items: Vec<Value> = serde_json::from_str(&format!("[{}]", self.json))
                .unwrap_or_else(|e| vec![json!(format!("items not readable as JSON: {e}"))]);
            items.extend(self.items.iter().cloned());
            return Value::Array(items);
        }
        let decoded;
        let rows = match &self.parquet {
            Some(p) => match splice::decode(&p.bytes) {
                Ok(batches) => {
                    decoded = batches;
                    &decoded
                }
                Err(e) => return json!(format!("rows not readable: {e}")),
            },
            None if self.rows.is_empty() => return Value::Array(self.items.clone()),
            None => &self.rows,
        };
        rows_json(rows)
    }

    /// The event and, with `as_file` and a columnar payload, its attachment:
    /// `{"parquet_file": "<path>", "batch": {...}}` (or `"arrow_file"`)
    /// with the Parquet file or Arrow IPC stream staged at that path in the
    /// sandbox; otherwise [`Call::payload`] and no attachment.
    fn event(
        &self,
        id: &str,
        extra: serde_json::Map<String, Value>,
        as_file: bool,
    ) -> (String, Option<Bytes>) {
        if let Some(object) = &self.object {
            let mut event = json!({
                "items": self.items,
                "object_file": sluice_executor::ATTACHMENT_PATH,
            });
            event["batch"] = self.batch(id, extra);
            return (event.to_string(), Some(object.clone()));
        }
        if !as_file || (self.rows.is_empty() && self.parquet.is_none()) {
            return (self.payload(id, extra), None);
        }
        let (field, data) = match &self.parquet {
            Some(p) => ("parquet_file", p.bytes.clone()),
            None => (
                "arrow_file",
                Bytes::from(read::ipc_stream(&self.rows, self.compression)),
            ),
        };
        let mut event = json!({ field: sluice_executor::ATTACHMENT_PATH });
        event["batch"] = self.batch(id, extra);
        (event.to_string(), Some(data))
    }

    /// The `batch` object of the event.
    fn batch(&self, id: &str, extra: serde_json::Map<String, Value>) -> Value {
        let mut batch = serde_json::Map::new();
        batch.insert("source".into(), json!(self.source));
        batch.insert("first_item".into(), json!(self.first));
        batch.insert("count".into(), json!(self.len()));
        batch.insert("call_id".into(), json!(id));
        batch.extend(extra);
        Value::Object(batch)
    }

    /// The event a function receives for this call:
    /// `{"items": [...], "batch": {"source", "first_item", "count", "call_id", ...extra}}`,
    /// or with Arrow rows `{"arrow": "<base64 IPC stream>", "batch": {...}}`,
    /// or with Parquet row groups `{"parquet": "<base64 file>", "batch": {...}}`.
    fn payload(&self, id: &str, extra: serde_json::Map<String, Value>) -> String {
        let batch = self.batch(id, extra);
        if self.json_count > 0 && self.items.is_empty() {
            // The items' text goes in as it is.
            let batch = batch.to_string();
            let mut out = String::with_capacity(self.json.len() + batch.len() + 24);
            out.push_str("{\"items\":[");
            out.push_str(&self.json);
            out.push_str("],\"batch\":");
            out.push_str(&batch);
            out.push('}');
            return out;
        }
        let columnar = !self.rows.is_empty() || self.parquet.is_some();
        if !columnar && self.json_count == 0 {
            return json!({ "items": self.items, "batch": batch }).to_string();
        }
        if !columnar {
            return json!({ "items": self.items_json(), "batch": batch }).to_string();
        }
        // Written by hand: the base64 text needs no JSON escaping, and
        // serde_json would check each of its bytes (megabytes per call).
        use base64::Engine;
        let ipc;
        let (field, bytes) = match &self.parquet {
            Some(p) => ("parquet", &p.bytes[..]),
            None => {
                ipc = read::ipc_stream(&self.rows, self.compression);
                ("arrow", ipc.as_slice())
            }
        };
        let batch = batch.to_string();
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4 + batch.len() + 24);
        out.push_str("{\"");
        out.push_str(field);
        out.push_str("\":\"");
        base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut out);
        out.push_str("\",\"batch\":");
        out.push_str(&batch);
        out.push('}');
        out
    }
}

/// Cuts the items of one file into calls: a call starts at an item index
/// and ends when it holds `limits.items` items (readable or not) or the
/// next readable item would take it past `limits.bytes`. The same input
/// always gives the same calls, so call ids are stable across runs.
struct Splitter {
    source: String,
    limits: Limits,
    current: Option<Call>,
    /// Items (readable or not) and JSON bytes in `current`.
    count: usize,
    bytes: usize,
}

impl Splitter {
    fn new(source: String, limits: Limits) -> Self {
        Splitter {
            source,
            limits,
            current: None,
            count: 0,
            bytes: 0,
        }
    }

    /// Adds item `index`; returns the call it completed, if any.
    fn push(&mut self, index: u64, item: Item) -> Option<Call> {
        let size = match &item {
            Item::Value(v) => json_size(v),
            Item::Json(text) => text.len(),
            Item::Bad(_) => 0,
        };
        let mut done = None;
        if self.current.is_some() && self.limits.full(self.count, self.bytes, size) {
            done = self.finish();
        }
        let call = self
            .current
            .get_or_insert_with(|| Call::new(self.source.clone(), index));
        match item {
            Item::Value(v) => call.items.push(v),
            Item::Json(text) => {
                if call.json_count > 0 {
                    call.json.push(',');
                }
                call.json.push_str(&text);
                call.json_count += 1;
            }
            Item::Bad(e) => call.bad.push(e),
        }
        self.count += 1;
        self.bytes += size;
        done
    }

    /// The call being filled, if any.
    fn finish(&mut self) -> Option<Call> {
        self.count = 0;
        self.bytes = 0;
        self.current.take()
    }
}

/// `payload_file` needs a columnar payload.
pub fn check_payload_file(payload: PayloadFormat, payload_file: bool) -> Result<(), BackfillError> {
    if payload_file && !payload.is_columnar() {
        return Err(BackfillError::Config(format!(
            "payload_file stages a columnar payload as a file: set payload = \"parquet\" or \"arrow\", not {:?}",
            payload.name()
        )));
    }
    Ok(())
}

/// A columnar payload needs Parquet sources.
pub fn check_columnar(payload: PayloadFormat, input: &Input) -> Result<(), BackfillError> {
    if payload.is_columnar() && input.format != Format::Parquet {
        return Err(BackfillError::Config(format!(
            "payload {:?} needs Parquet sources, not {}",
            payload.name(),
            input.format
        )));
    }
    Ok(())
}

/// Options that do not fit the format.
/// `max_items` takes the first items in file then row order, which only a
/// run in that order can honour.
pub fn check_max_items(
    max_items: u64,
    order: &OrderConfig,
    file_dependencies: &[FileDependency],
    payload: PayloadFormat,
) -> Result<(), BackfillError> {
    if max_items == 0 {
        return Err(BackfillError::Config(
            "max_items 0: at least 1 item must be called".into(),
        ));
    }
    if order.id_column.is_some() || !file_dependencies.is_empty() {
        return Err(BackfillError::Config(
            "max_items takes the first items in file order, which dependencies reorder: \
             leave out max_items or the dependencies"
                .into(),
        ));
    }
    if payload == PayloadFormat::Parquet {
        return Err(BackfillError::Config(
            "max_items may end inside a row group, and payload \"parquet\" sends whole row \
             groups: use payload \"arrow\" or \"json\""
                .into(),
        ));
    }
    Ok(())
}

fn check_input(input: &Input) -> Result<(), BackfillError> {
    if input.columns.is_some() && input.format == Format::Text {
        return Err(BackfillError::Config(
            "columns cannot be chosen for text sources (each line is one string)".into(),
        ));
    }
    if let Some(pointer) = input.items_pointer.as_deref()
        && !pointer.starts_with('/')
    {
        return Err(BackfillError::Config(format!(
            "items_pointer {pointer:?} is not a JSON pointer: it starts with `/`, e.g. \"/data/orders\""
        )));
    }
    if input.items_pointer.is_some() && input.format != Format::Json {
        return Err(BackfillError::Config(format!(
            "items_pointer points into a JSON document: it needs format \"json\", not {}",
            input.format
        )));
    }
    if input.columns.is_some() && input.format == Format::Objects {
        return Err(BackfillError::Config(
            "columns cannot be chosen for format \"objects\" (each object is passed whole)".into(),
        ));
    }
    Ok(())
}

/// `format = "objects"` calls the function once per object, its bytes
/// staged as a file: options about batches of items, their order or state
/// do not apply.
pub fn check_objects(cfg: &BackfillConfig) -> Result<(), BackfillError> {
    if cfg.input.format != Format::Objects {
        return Ok(());
    }
    let conflict = |what: String| {
        Err(BackfillError::Config(format!(
            "format \"objects\" calls the function once per object, its bytes staged as a \
             file: {what}"
        )))
    };
    if cfg.max_items_per_call != 1 {
        return conflict(format!(
            "max_items_per_call {} does not apply (leave it out or give 1)",
            cfg.max_items_per_call
        ));
    }
    if cfg.order.is_active() {
        return conflict("order_key and item dependencies do not apply".into());
    }
    if cfg.state.is_some() {
        return conflict("state does not apply".into());
    }
    let limit = sluice_pipeline::MAX_OBJECT_BYTES_RANGE;
    if !limit.contains(&cfg.max_object_bytes) {
        return conflict(format!(
            "max_object_bytes {} is not within {}..={}",
            cfg.max_object_bytes,
            limit.start(),
            limit.end()
        ));
    }
    Ok(())
}

/// Like [`reader`] for `payload = "arrow"`: each call holds up to
/// `limits.items` Parquet rows as record batches, and fewer when the file's
/// first batch says that many rows would take more than `limits.bytes` once
/// base64-encoded (the same file always gives the same calls).
fn arrow_reader(
    sources: Vec<PathBuf>,
    input: Input,
    limits: Limits,
    tx: mpsc::Sender<Result<Call, BackfillError>>,
) {
    read::send_each(&sources, &tx, |_, file, send| {
        let source = file.display().to_string();
        let call = |first| Call {
            compression: input.arrow_compression,
            ..Call::new(source.clone(), first)
        };
        let mut current = call(0);
        let mut index = 0u64;
        let mut per_call = 0usize;
        read::read_parquet_batches(
            file,
            input.columns.as_deref(),
            input.cap_of(file),
            &mut |batch| {
                if per_call == 0 && batch.num_rows() > 0 {
                    // Bytes per row in memory (an upper bound of the IPC size),
                    // times 4/3 for base64.
                    let row = (batch.get_array_memory_size() / batch.num_rows()).max(1) * 4 / 3 + 1;
                    per_call = limits.items.max(1).min((limits.bytes / row).max(1));
                }
                let mut offset = 0;
                while offset < batch.num_rows() {
                    let take = (per_call - current.len()).min(batch.num_rows() - offset);
                    current.rows.push(batch.slice(offset, take));
                    offset += take;
                    index += take as u64;
                    if current.len() == per_call {
                        send(std::mem::replace(&mut current, call(index)))?;
                    }
                }
                ControlFlow::Continue(())
            },
        )?;
        if !current.is_empty() {
            let _ = send(current);
        }
        Ok(())
    });
}

/// Like [`reader`] for `payload = "parquet"`: each call holds whole row
/// groups of a file, the chosen columns' chunks copied as they are.
fn parquet_reader(
    sources: Vec<PathBuf>,
    input: Input,
    limits: Limits,
    tx: mpsc::Sender<Result<Call, BackfillError>>,
) {
    read::send_each(&sources, &tx, |_, file, send| {
        let source = file.display().to_string();
        splice::read_spliced(file, input.columns.as_deref(), limits, &mut |s| {
            let first = s.first;
            send(Call {
                parquet: Some(s),
                ..Call::new(source.clone(), first)
            })
        })
    });
}

/// Reads all sources on the current (blocking) thread, sending calls until
/// the receiver goes away.
fn reader(
    sources: Vec<PathBuf>,
    input: Input,
    limits: Limits,
    tx: mpsc::Sender<Result<Call, BackfillError>>,
) {
    read::send_each(&sources, &tx, |_, file, send| {
        let mut splitter = Splitter::new(file.display().to_string(), limits);
        read::read_file_json(
            file,
            &input,
            &mut |index, item| match splitter.push(index, item) {
                Some(done) => send(done),
                None => ControlFlow::Continue(()),
            },
        )?;
        if let Some(done) = splitter.finish() {
            let _ = send(done);
        }
        Ok(())
    });
}

/// Shared state of a run.
struct Run {
    /// `None` for a distributed coordinator, whose workers call the function.
    executor: Option<Executor>,
    cfg: BackfillConfig,
    progress: Progress,
    dead: DeadLetter,
    summary: Mutex<Summary>,
    started: Instant,
    /// Failures so far and the last one's message.
    failures: Mutex<(u64, String)>,
    stop: AtomicBool,
    /// First storage error met by a call task.
    fatal: Mutex<Option<BackfillError>>,
    /// Sources with a failed call or unreadable item (for file dependencies).
    failed_sources: Mutex<HashSet<String>>,
    hooks: Hooks,
    /// `cfg.batch_input` as JSON text, written once.
    batch_input: Option<String>,
    /// `cfg.results` when it is an object-store URL: the responses are
    /// kept in a local file next to the progress store and uploaded there
    /// when the run ends ([`upload_results`]).
    results_upload: Option<PathBuf>,
}

impl Run {
    /// Checks the configuration and opens the progress store and the
    /// dead-letter file.
    fn start(
        executor: Option<Executor>,
        mut cfg: BackfillConfig,
        hooks: Hooks,
    ) -> Result<Arc<Run>, BackfillError> {
        if cfg.max_items_per_call == 0
            || cfg.max_bytes_per_call == 0
            || cfg.max_concurrency == 0
            || cfg.max_attempts == 0
        {
            return Err(BackfillError::Config(
                "max items and bytes per call, max concurrency and max attempts must be at least 1"
                    .into(),
            ));
        }
        if cfg.max_buffered_items == 0 {
            return Err(BackfillError::Config(
                "max_buffered_items 0: the scheduler must hold at least 1 item".into(),
            ));
        }
        if let Some(p) = cfg.tolerated_failure_percentage
            && !(0.0..=100.0).contains(&p)
        {
            return Err(BackfillError::Config(format!(
                "tolerated failure percentage {p} is not between 0 and 100"
            )));
        }
        check_input(&cfg.input)?;
        check_objects(&cfg)?;
        check_payload_file(cfg.payload, cfg.payload_file)?;
        if cfg.payload.is_columnar() {
            check_columnar(cfg.payload, &cfg.input)?;
            if cfg.order.is_active() {
                return Err(BackfillError::Config(format!(
                    "payload {:?} cannot be combined with order_key or dependencies",
                    cfg.payload.name()
                )));
            }
        }
        if let Some(st) = &cfg.state {
            if cfg.payload.is_columnar() {
                return Err(BackfillError::Config(format!(
                    "a stateful job sends JSON items: payload {:?} does not apply",
                    cfg.payload.name()
                )));
            }
            if !cfg.file_dependencies.is_empty() || cfg.order.id_column.is_some() {
                return Err(BackfillError::Config(
                    "a stateful job folds items in input order: file and item dependencies do not apply".into(),
                ));
            }
            if st.config.scope == sluice_pipeline::StateScope::Key && cfg.order.order_key.is_none()
            {
                return Err(BackfillError::Config(
                    "state scope \"key\" needs order_key: the field whose value is the key".into(),
                ));
            }
        }
        if !cfg.file_dependencies.is_empty() && cfg.order.is_active() {
            return Err(BackfillError::Config(
                "file dependencies cannot be combined with order_key or item dependencies".into(),
            ));
        }
        // With max_items, the items are counted up front: the progress bar
        // has its total whatever the format.
        let mut sampled = None;
        if let Some(n) = cfg.max_items {
            check_max_items(n, &cfg.order, &cfg.file_dependencies, cfg.payload)?;
            let sample = limit_items(&cfg.sources, &cfg.input, n)?;
            cfg.sources = sample.sources;
            cfg.input.cap = sample.cap;
            sampled = Some(sample.items);
        }
        file_levels(&cfg.sources, &cfg.file_dependencies)?;
        // Before the progress store exists: a misspelt column must not
        // leave a store that refuses the corrected command.
        cfg.order.check_columns(&cfg.sources, &cfg.input)?;
        let expected = match sampled {
            Some(n) => Some(n),
            None => expected_items(&cfg.sources, &cfg.input)?,
        };
        if cfg.input.csv_headers.is_some() && cfg.input.format != Format::Csv {
            return Err(BackfillError::Config(format!(
                "CSV column names are given (csv_headers), but the format is {}",
                cfg.input.format.name()
            )));
        }
        if cfg.results.is_some() && cfg.state.is_some() {
            return Err(BackfillError::Config(
                "a stateful job's output is its state, not each call's response: \
                 results cannot be kept"
                    .into(),
            ));
        }
        // Responses bound for an object store are kept next to the progress
        // store first, with the same guarantees as a local results file.
        cfg.results = cfg
            .results
            .as_deref()
            .map(source::results_target)
            .transpose()?;
        let results_upload = cfg.results.clone().filter(|r| source::is_remote(r));
        let local_results = match &results_upload {
            Some(_) => Some(local_results_path(&cfg.progress)),
            None => cfg.results.clone(),
        };
        let progress = Progress::open(&cfg.progress, &cfg.layout(), local_results.as_deref())?;
        Ok(Arc::new(Run {
            executor,
            // A fold never calls a failed call again: keep its record
            // (run_folded starts the file afresh if the fold does).
            dead: if cfg.state.is_some() {
                DeadLetter::keeping(&cfg.dead_letter)?
            } else {
                DeadLetter::new(&cfg.dead_letter)?
            },
            progress,
            summary: Mutex::new(Summary {
                items_expected: expected,
                ..Summary::default()
            }),
            started: Instant::now(),
            failures: Mutex::new((0, String::new())),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
            failed_sources: Mutex::new(HashSet::new()),
            hooks,
            batch_input: cfg
                .batch_input
                .as_ref()
                .map(|o| Value::Object(o.clone()).to_string()),
            results_upload,
            cfg,
        }))
    }

    fn snapshot(&self) -> Summary {
        let mut s = self
            .summary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s.duration = self.started.elapsed();
        s
    }

    fn update(&self, f: impl FnOnce(&mut Summary)) {
        f(&mut self.summary.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The order key of `item` (`index` of `source`), counting and, the
    /// first time, logging an item without one (see
    /// [`Summary::items_without_order_key`]).
    pub(crate) fn order_key_of(&self, item: &Value, source: &str, index: u64) -> Option<String> {
        let name = self.cfg.order.order_key.as_ref()?;
        let key = schedule::scalar(item.get(name));
        if key.is_none() {
            let mut first = false;
            self.update(|s| {
                first = s.items_without_order_key == 0;
                s.items_without_order_key += 1;
            });
            if first {
                tracing::warn!(
                    order_key = %name,
                    source,
                    item = index,
                    "an item has no value for order_key: items without one are not ordered by key (a stateful job gives them one shared state); the summary counts them"
                );
            }
        }
        key
    }

    fn set_expected_items(&self, n: u64) {
        self.update(|s| s.items_expected = Some(n));
    }

    /// What the tolerated failures were exceeded by, if they were: failed
    /// calls past `tolerated_failure_count`, or failed items past
    /// `tolerated_failure_percentage` of `total` items.
    fn over_tolerance(&self, failed_calls: u64, total: Option<u64>) -> Option<String> {
        if let Some(t) = self.cfg.tolerated_failure_count
            && failed_calls > t
        {
            return Some(format!("the {t} tolerated"));
        }
        if let (Some(pct), Some(total)) = (self.cfg.tolerated_failure_percentage, total)
            && total > 0
        {
            let failed_items = self.snapshot().items_failed;
            if failed_items as f64 * 100.0 > pct * total as f64 {
                return Some(format!(
                    "the tolerated {pct}% of {total} items ({failed_items} items failed)"
                ));
            }
        }
        None
    }

    fn fail(&self, e: BackfillError) {
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Counts a failure of `source`; stops the job when past the tolerated
    /// failures.
    fn failure(&self, source: &str, message: String) {
        self.failed_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(source.to_owned());
        let failed = {
            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            f.0 += 1;
            f.1 = message;
            f.0
        };
        let expected = self.snapshot().items_expected;
        if self.over_tolerance(failed, expected).is_some() {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// Dead-letters unreadable items.
    fn bad_items(&self, call: &Call) {
        for bad in &call.bad {
            let record = json!({
                "call_id": format!("{}#{}", call.source, call.first),
                "source": call.source,
                "line": bad.line,
                "items": [bad.raw],
                "error_type": "Sluice.UnreadableItem",
                "error": bad.to_string(),
                "attempts": 0,
            });
            if let Err(e) = self.dead.write(&record) {
                self.fail(e);
                return;
            }
            self.update(|s| s.items_failed += 1);
            self.failure(&call.source, bad.to_string());
        }
    }

    /// Counts a call read from the sources and dead-letters its unreadable
    /// items; says whether it still needs calling (it has items and an
    /// earlier run has not completed it).
    fn admit(&self, call: &Call) -> Result<bool, BackfillError> {
        let count = call.len() as u64;
        self.update(|s| s.items_total += count + call.bad.len() as u64);
        self.bad_items(call);
        if call.is_empty() {
            return Ok(false);
        }
        self.update(|s| s.calls_total += 1);
        if self.progress.succeeded(&call.id())? {
            self.update(|s| {
                s.calls_skipped += 1;
                s.items_skipped += count;
            });
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes back what [`Run::admit`] counted for a call that an
    /// interruption kept from starting: the summary counts only calls that
    /// ran (its unreadable items stay counted, as they were dead-lettered).
    fn not_started(&self, call: &Call) {
        let count = call.len() as u64;
        self.update(|s| {
            s.calls_total -= 1;
            s.items_total -= count;
        });
    }

    /// Invokes one call with retries and records the outcome; `invoking`
    /// is released once the function succeeded, before the success is
    /// durable.
    async fn call(&self, call: Call, invoking: tokio::sync::OwnedSemaphorePermit) {
        let id = call.id();
        self.invoke_call(&id, call, serde_json::Map::new(), Some(invoking))
            .await;
    }

    /// `event` (a JSON object's text) with the job's `"batch_input"`, if it
    /// has one, added as the last field.
    fn with_batch_input(&self, mut event: String) -> String {
        if let Some(input) = &self.batch_input
            && event.ends_with('}')
        {
            event.pop();
            if !event.trim_end().ends_with('{') {
                event.push(',');
            }
            event.push_str("\"batch_input\":");
            event.push_str(input);
            event.push('}');
        }
        event
    }

    /// Invokes `call` as `id` (with `extra` fields in `batch`) with retries,
    /// records the outcome and says whether it succeeded. `invoking`, if
    /// any, is dropped as soon as the function has succeeded, or once a
    /// failure is recorded.
    async fn invoke_call(
        &self,
        id: &str,
        call: Call,
        extra: serde_json::Map<String, Value>,
        invoking: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> bool {
        let count = call.len() as u64;
        let mut call = call;
        if self.cfg.input.format == Format::Objects
            && let Err(not) = self.fetch_object(&mut call).await
        {
            drop(invoking);
            let items = call.items_json();
            self.dead_letter(
                &call.source,
                id,
                items,
                not.error_type,
                &not.message,
                0,
                count,
            );
            return false;
        }
        let (payload, attachment) = call.event(id, extra, self.cfg.payload_file);
        let payload = self.with_batch_input(payload);
        let executor = self
            .executor
            .as_ref()
            .expect("runs that call functions have an executor");
        let (outcome, attempts) = invoke_with_retries(
            executor,
            &self.cfg.function,
            &payload,
            attachment,
            self.cfg.max_attempts,
            |attempt, e| {
                self.update(|s| s.calls_retried += 1);
                tracing::debug!(call = %id, attempt, error = %e, "retrying");
            },
        )
        .await;
        match outcome {
            Ok(response) => {
                // The next call need not wait for this one's commit. A
                // failure keeps its place until it is counted, so that a
                // job past its tolerated failures starts no other call.
                drop(invoking);
                let result = self.progress.keeps_results().then(|| {
                    progress::result_line(id, &call.source, call.first, count, &response.payload)
                });
                let ok = self.succeeded(id, attempts, count, result).await;
                if ok && let Some(hook) = &self.hooks.on_response {
                    hook(id, &response);
                }
                ok
            }
            Err(e) => {
                let items = call.items_json();
                self.dead_letter(
                    &call.source,
                    id,
                    items,
                    e.error_type(),
                    &e.to_string(),
                    attempts,
                    count,
                );
                false
            }
        }
    }

    /// Fetches the object of a `format = "objects"` call into it, and
    /// completes its item ([`source::Fetched::describe`]).
    async fn fetch_object(&self, call: &mut Call) -> Result<(), source::NotFetched> {
        let fetched =
            source::fetch_object(Path::new(&call.source), self.cfg.max_object_bytes).await?;
        if let Some(item) = call.items.first_mut() {
            fetched.describe(item);
        }
        call.object = Some(fetched.bytes);
        Ok(())
    }

    /// Records a successful call durably and counts it; false (and the run
    /// stops) if the progress store failed.
    async fn succeeded(
        &self,
        id: &str,
        attempts: u32,
        count: u64,
        result: Option<Vec<u8>>,
    ) -> bool {
        let success = progress::Success {
            call_id: id.to_owned(),
            attempts: u64::from(attempts),
            result,
        };
        if let Err(e) = self.progress.record(success).await {
            self.fail(e);
            return false;
        }
        self.update(|s| {
            s.calls_succeeded += 1;
            s.items_succeeded += count;
        });
        true
    }

    /// Dead-letters a call not made because a call it requires failed.
    fn dependency_failed(&self, call: &Call, id: &str, what_failed: &str) {
        let count = call.len() as u64;
        let message = format!("{id}: not called: {what_failed} failed");
        let record = json!({
            "call_id": id,
            "source": call.source,
            "items": call.items_json(),
            "error_type": "Sluice.DependencyFailed",
            "error": message,
            "attempts": 0,
        });
        if let Err(err) = self.dead.write(&record) {
            self.fail(err);
            return;
        }
        self.update(|s| {
            s.calls_failed += 1;
            s.items_failed += count;
        });
        self.failure(&call.source, message);
    }

    /// Dead-letters a call that failed `attempts` times with `error`.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        source: &str,
        id: &str,
        items: Value,
        error_type: &str,
        error: &str,
        attempts: u32,
        count: u64,
    ) {
        let record = json!({
            "call_id": id,
            "source": source,
            "items": items,
            "error_type": error_type,
            "error": error,
            "attempts": attempts,
        });
        if let Err(err) = self.dead.write(&record) {
            self.fail(err);
            return;
        }
        self.update(|s| {
            s.calls_failed += 1;
            s.items_failed += count;
        });
        self.failure(source, format!("{id}: {error}"));
    }
}

/// Invokes `function` with `payload` (and `attachment`, staged as a file
/// in the sandbox) up to `max_attempts` times while the error is retryable
/// (backing off 50 ms × attempt), calling `on_retry` before each retry.
/// Returns the outcome and the attempts made.
pub async fn invoke_with_retries(
    executor: &Executor,
    function: &str,
    payload: &str,
    attachment: Option<Bytes>,
    max_attempts: u32,
    on_retry: impl Fn(u32, &InvokeError),
) -> (Result<Response, InvokeError>, u32) {
    let max_attempts = max_attempts.max(1);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let opts = sluice_executor::InvokeOptions {
            attachment: attachment.clone(),
            ..Default::default()
        };
        match executor.invoke_with(function, payload, opts).await {
            Ok(r) => return (Ok(r), attempt),
            Err(e) if e.retryable() && attempt < max_attempts => {
                on_retry(attempt, &e);
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(e) => return (Err(e), attempt),
        }
    }
}

/// Runs a backfill: reads `cfg.sources`, calls `cfg.function` through
/// `executor`, and returns the counters. Resolving `shutdown` stops
/// dispatching new calls; calls in flight finish and are recorded, and the
/// summary says `interrupted`.
///
/// # Errors
/// [`BackfillError::TooManyFailures`] past the tolerated failures; reading,
/// progress-store and dead-letter errors.
pub async fn run(
    executor: &Executor,
    cfg: BackfillConfig,
    hooks: Hooks,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, BackfillError> {
    let run = Run::start(Some(executor.clone()), cfg, hooks)?;
    let result = run_started(&run, shutdown).await;
    upload_results(&run, result).await
}

/// The calls of a started run, in the order its options ask for.
async fn run_started(
    run: &Arc<Run>,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, BackfillError> {
    let run = Arc::clone(run);
    if run.cfg.state.is_some() {
        let ticker = start_ticker(&run);
        let mut shutdown = std::pin::pin!(shutdown);
        let result = fold::run_folded(&run, shutdown.as_mut()).await;
        if let Some(t) = ticker {
            t.abort();
        }
        return match result {
            Ok(interrupted) => conclude(&run, interrupted, None),
            Err(e) => conclude(&run, false, Some(e)),
        };
    }
    if run.cfg.order.is_active() {
        let ticker = start_ticker(&run);
        let mut shutdown = std::pin::pin!(shutdown);
        let result = schedule::run_ordered(&run, shutdown.as_mut()).await;
        if let Some(t) = ticker {
            t.abort();
        }
        return match result {
            Ok(interrupted) => conclude(&run, interrupted, None),
            Err(e) => conclude(&run, false, Some(e)),
        };
    }
    let (levels, waits) = file_levels(&run.cfg.sources, &run.cfg.file_dependencies)?;
    let ticker = start_ticker(&run);
    let mut shutdown = std::pin::pin!(shutdown);
    let (mut interrupted, mut read_error) = (false, None);
    for files in levels {
        // A file whose prerequisites did not all succeed is not called.
        let failed = run
            .failed_sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let blocked: HashMap<String, String> = files
            .iter()
            .filter_map(|f| {
                let bad = waits
                    .get(f)?
                    .iter()
                    .find(|p| failed.contains(&p.display().to_string()))?;
                Some((
                    f.display().to_string(),
                    format!("the file {} it waits for", bad.display()),
                ))
            })
            .collect();
        (interrupted, read_error) = stream(&run, files, &blocked, shutdown.as_mut()).await;
        if interrupted || read_error.is_some() || run.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    conclude(&run, interrupted, read_error)
}

/// Streams the calls of `sources` through the function, at most
/// `max_concurrency` at once; calls of a `blocked` file (source → what
/// failed) are dead-lettered instead. Returns whether `shutdown` interrupted
/// it and the read error that stopped it, if any.
async fn stream<S: Future<Output = ()>>(
    run: &Arc<Run>,
    sources: Vec<PathBuf>,
    blocked: &HashMap<String, String>,
    mut shutdown: std::pin::Pin<&mut S>,
) -> (bool, Option<BackfillError>) {
    let concurrency = run.cfg.max_concurrency;
    let (tx, mut rx) = mpsc::channel(concurrency);
    let reader = spawn_reader(run, sources, tx);
    let permits = Arc::new(Semaphore::new(concurrency));
    // A call leaves `permits` once the function succeeded, and this once
    // its success is recorded: the next call need not wait for the
    // previous one's commit, and a slow disk still bounds the calls
    // waiting for theirs.
    let unrecorded = Arc::new(Semaphore::new(concurrency.saturating_mul(4)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut interrupted = false;
    let mut read_error = None;
    loop {
        if run.stop.load(Ordering::SeqCst) {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let next = tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            next = rx.recv() => next,
        };
        let call = match next {
            None => break,
            Some(Err(e)) => {
                read_error = Some(e);
                break;
            }
            Some(Ok(call)) => call,
        };
        match run.admit(&call) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                run.fail(e);
                break;
            }
        }
        if let Some(what) = blocked.get(&call.source) {
            run.dependency_failed(&call, &call.id(), what);
            continue;
        }
        let recording = tokio::select! {
            biased;
            () = &mut shutdown => { run.not_started(&call); interrupted = true; break; }
            p = Arc::clone(&unrecorded).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => { run.not_started(&call); interrupted = true; break; }
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
        };
        if run.stop.load(Ordering::SeqCst) {
            run.not_started(&call);
            break;
        }
        let run = Arc::clone(run);
        tasks.spawn(async move {
            run.call(call, permit).await;
            drop(recording);
        });
    }
    drop(rx);
    while tasks.join_next().await.is_some() {}
    let _ = reader.await;
    (interrupted, read_error)
}

/// Reads `sources` (on the current, blocking thread), sending calls to
/// `tx`: rows as JSON items, Arrow batches or Parquet row groups.
fn read_calls(
    payload: PayloadFormat,
    sources: Vec<PathBuf>,
    input: Input,
    limits: Limits,
    tx: mpsc::Sender<Result<Call, BackfillError>>,
) {
    match payload {
        PayloadFormat::Json => reader(sources, input, limits, tx),
        PayloadFormat::Arrow => arrow_reader(sources, input, limits, tx),
        PayloadFormat::Parquet => parquet_reader(sources, input, limits, tx),
    }
}

/// Reads `sources` on a blocking thread, sending calls to `tx`.
fn spawn_reader(
    run: &Run,
    sources: Vec<PathBuf>,
    tx: mpsc::Sender<Result<Call, BackfillError>>,
) -> tokio::task::JoinHandle<()> {
    let (input, limits) = (run.cfg.input.clone(), run.cfg.limits());
    let payload = run.cfg.payload;
    tokio::task::spawn_blocking(move || read_calls(payload, sources, input, limits, tx))
}

/// One call of a data set as another box uses it (MapReduce's map splits):
/// its id, origin, item count, the function's event, and the unreadable
/// lines it covered.
#[derive(Debug)]
pub struct Split {
    /// `"<file>#<first item>"`.
    pub id: String,
    /// The source file.
    pub source: String,
    /// Index of its first item in the file.
    pub first: u64,
    /// Readable items.
    pub count: usize,
    /// `{"items": [...], "batch": {...}}` (or a columnar payload's event).
    pub payload: String,
    /// The columnar payload, when it goes as a file (`payload_file`).
    pub attachment: Option<Bytes>,
    /// Lines that could not be read.
    pub unreadable: Vec<ItemError>,
}

/// Reads `sources` on a blocking thread and sends their calls, cut as a
/// backfill cuts them, as [`Split`]s (at most `buffer` ahead of the
/// receiver). Arrow payloads need Parquet sources.
pub fn splits(
    sources: Vec<PathBuf>,
    input: Input,
    limits: Limits,
    payload: PayloadFormat,
    payload_file: bool,
    buffer: usize,
) -> mpsc::Receiver<Result<Split, BackfillError>> {
    let (tx, mut calls) = mpsc::channel(buffer.max(1));
    let (out, rx) = mpsc::channel(buffer.max(1));
    tokio::task::spawn_blocking(move || read_calls(payload, sources, input, limits, tx));
    tokio::spawn(async move {
        while let Some(next) = calls.recv().await {
            let split = next.map(|call| {
                let id = call.id();
                let (payload, attachment) = call.event(&id, serde_json::Map::new(), payload_file);
                Split {
                    payload,
                    attachment,
                    count: call.len(),
                    id,
                    source: call.source,
                    first: call.first,
                    unreadable: call.bad,
                }
            });
            if out.send(split).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Calls the tick hook periodically until aborted.
fn start_ticker(run: &Arc<Run>) -> Option<tokio::task::JoinHandle<()>> {
    run.hooks.on_tick.clone().map(|(every, hook)| {
        let run = Arc::clone(run);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.tick().await;
            loop {
                interval.tick().await;
                hook(&run.snapshot());
            }
        })
    })
}

/// With `results` at an object-store URL: once a run has ended (not
/// interrupted, not stopped by an error of its own; past its tolerated
/// failures counts as ended), the local results file, which holds a line
/// for every call that ever succeeded, is uploaded whole to the URL
/// (Distributed Map's `ResultWriter`). A failed upload is the run's error.
pub(crate) async fn upload_results(
    run: &Run,
    result: Result<Summary, BackfillError>,
) -> Result<Summary, BackfillError> {
    let Some(url) = &run.results_upload else {
        return result;
    };
    let ended = match &result {
        Ok(s) => !s.interrupted,
        Err(e) => matches!(e, BackfillError::TooManyFailures { .. }),
    };
    if ended {
        source::upload(&local_results_path(&run.cfg.progress), url).await?;
    }
    result
}

/// The outcome of a finished run.
fn conclude(
    run: &Run,
    interrupted: bool,
    read_error: Option<BackfillError>,
) -> Result<Summary, BackfillError> {
    let mut summary = run.snapshot();
    summary.interrupted = interrupted;
    if let Some(e) = read_error {
        return Err(e);
    }
    if let Some(e) = run.fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let (failed, last_error) = run
        .failures
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // The percentage is of the item count known up front; without one, of
    // every item read (unless interrupted: then the count is incomplete).
    let total = summary
        .items_expected
        .or((!interrupted).then_some(summary.items_total));
    if let Some(tolerated) = run.over_tolerance(failed, total) {
        return Err(BackfillError::TooManyFailures {
            failed,
            tolerated,
            last_error,
            dead_letter: run.cfg.dead_letter.clone(),
            summary: Box::new(summary),
        });
    }
    Ok(summary)
}
