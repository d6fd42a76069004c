//! `sluice backfill`: call a function on every item of existing data sets.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_executor::Fault;
use sluice_pipeline::{
    BackfillJob, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_BYTES_PER_CALL, DEFAULT_MAX_ITEMS_PER_CALL,
};
use sluice_taskgen::{
    ArrowCompression, BackfillConfig, BackfillError, FileDependency, Format, Hooks, Input, Limits,
    OrderConfig, PayloadFormat, StateOptions, Summary, TickHook,
};

use sluice_ingest::kafka::EmbeddedBroker;
use sluice_ingest::metrics::{JobProgress, Metrics};
use sluice_pipeline::BootstrapServers;
use sluice_taskgen::distributed::{self, KafkaSettings, MAX_TASK_BYTES};

use crate::exit;

/// The options of `sluice backfill`; each overrides the job's setting.
#[derive(Debug, clap::Args)]
pub struct BackfillOptions {
    /// Function name (required without a JOB).
    #[arg(long, short)]
    pub function: Option<String>,
    /// Source file, glob pattern or object_store URL (sorted). Repeatable;
    /// replaces the job's sources.
    #[arg(long)]
    pub source: Vec<String>,
    /// parquet, csv (with header), jsonl, json (a document holding an array
    /// of items), text, or avro (an Avro container file, each record an
    /// item; default: from the first source's extension); or
    /// objects: each file or object is one call,
    /// its bytes staged at /run/sluice/payload and the event's item
    /// {"Key", "Size", "LastModified", "Etag", "url"}.
    #[arg(long)]
    pub format: Option<Format>,
    /// Keep only these columns (comma-separated); Parquet reads only them.
    #[arg(long, value_delimiter = ',')]
    pub columns: Vec<String>,
    /// How calls carry their items: json (`{"items": [...]}`, the default),
    /// arrow (`{"arrow": "<base64 Arrow IPC stream>"}`, Parquet only) or
    /// parquet (`{"parquet": "<base64 Parquet file>"}`: whole row groups,
    /// column chunks copied as they are; Parquet only).
    #[arg(long)]
    pub payload: Option<PayloadFormat>,
    /// With `--payload arrow`: none (the default), lz4 or zstd compression
    /// of the Arrow IPC buffers (the function's Arrow reader must support it).
    #[arg(long)]
    pub arrow_compression: Option<ArrowCompression>,
    /// With a columnar payload: stage it as a read-only file in the sandbox
    /// and send `{"parquet_file": "/run/sluice/payload"}` (or `arrow_file`)
    /// instead of base64 in the event.
    #[arg(long)]
    pub payload_file: bool,
    /// CSV field delimiter (default `,`).
    #[arg(long)]
    pub csv_delimiter: Option<char>,
    /// Column names of CSV files without a header line, comma-separated
    /// (`--csv-headers id,name,amount`): each file's first line is then an
    /// item (default: the first line is the header).
    #[arg(long, value_delimiter = ',')]
    pub csv_headers: Option<Vec<String>>,
    /// Items per call (default 100; 1 to 100,000).
    #[arg(long, value_parser = items_per_call)]
    pub max_items_per_call: Option<usize>,
    /// Bytes of items (as JSON) per call (default 6,000,000, the most).
    #[arg(long, value_parser = bytes_per_call)]
    pub max_bytes_per_call: Option<usize>,
    /// Calls in flight (default: the function's concurrency; 1 to 1,000).
    #[arg(long, value_parser = concurrency)]
    pub max_concurrency: Option<usize>,
    /// Progress database (default: `.sluice-backfill-<hash>.redb` next to
    /// the first source file).
    #[arg(long)]
    pub progress: Option<PathBuf>,
    /// Dead-letter JSON lines file (default: the progress path with
    /// .dead.jsonl).
    #[arg(long)]
    pub dead_letter: Option<PathBuf>,
    /// Keep each successful call's response: one JSON line per call,
    /// {"call_id", "source", "first_item", "count", "response"}, written
    /// before the call counts as done (default: responses are not kept).
    /// An object-store URL (s3://BUCKET/KEY, gs://, az://) gets the whole
    /// file when the job ends; until then it is kept next to the progress
    /// store.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Attempts per call for retryable errors (default 3; 1 to 100).
    #[arg(long, value_parser = attempts)]
    pub max_attempts: Option<u32>,
    /// Stop with exit code 3 once more calls than this have failed.
    #[arg(long)]
    pub tolerated_failure_count: Option<u64>,
    /// Stop with exit code 3 once more than this percentage of the items
    /// has failed (0 to 100).
    #[arg(long)]
    pub tolerated_failure_percentage: Option<f64>,
    /// Items with the same value of this field run one after another
    /// (file, then row order); different keys run in parallel.
    #[arg(long, value_name = "FIELD")]
    pub order_key: Option<String>,
    /// Field holding each item's id (with --depends-on-column).
    #[arg(long, value_name = "FIELD", requires = "depends_on_column")]
    pub id_column: Option<String>,
    /// Field naming the id (or JSON list of ids) an item depends on: it
    /// runs only after those succeeded. A first pass reads only the ids;
    /// cycles, duplicate and missing ids are reported before anything runs;
    /// then the input is read once per dependency level.
    #[arg(long, value_name = "FIELD", requires = "id_column")]
    pub depends_on_column: Option<String>,
    /// With --order-key or dependencies: the most items held at once in
    /// calls being filled per key or waiting for their key (default
    /// 100000). Reaching it cuts the oldest partial calls short and pauses
    /// reading; a resume must use the same value. A stateful job holds at
    /// most N items read and not yet folded.
    #[arg(long, value_name = "N", value_parser = buffered_items)]
    pub max_buffered_items: Option<usize>,
    /// FILES=PREREQ[,PREREQ...]: files matching the glob FILES start only
    /// once the files matching each PREREQ glob fully succeeded (globs
    /// without `/` match file names). Repeatable; replaces the job's.
    #[arg(long, value_name = "FILES=PREREQS")]
    pub file_depends_on: Vec<String>,
    /// Call only the first N items (file then row order), as a Distributed
    /// Map's MaxItems: to try a function on a sample (1 to 100,000,000).
    /// Its progress is kept apart from a run over everything.
    #[arg(long, value_name = "N", value_parser = max_items)]
    pub max_items: Option<u64>,
    /// A JSON object every call's event carries as "batch_input" (Step
    /// Functions' BatchInput), e.g. '{"run_date": "2026-12-01"}'; replaces
    /// the job's.
    #[arg(long, value_name = "JSON", value_parser = batch_input)]
    pub batch_input: Option<serde_json::Map<String, serde_json::Value>>,
    /// With --format json: the JSON pointer of the array of items in each
    /// document, e.g. /data/orders (default: the document is the array).
    #[arg(long, value_name = "POINTER")]
    pub items_pointer: Option<String>,
    /// With --format objects: larger objects are not fetched, they go to
    /// the dead-letter file (default 67,108,864; 1 to 134,217,728).
    #[arg(long, value_name = "BYTES", value_parser = object_bytes)]
    pub max_object_bytes: Option<u64>,
    /// Print files, row groups, item and call counts (and dependency
    /// levels with the ordering options); call nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Do not print the function's log lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// Publish the calls to Kafka for `sluice worker` processes instead of
    /// calling the function here; needs a JOB (it names the topics).
    #[arg(long, requires = "job")]
    pub distributed: bool,
    /// With --distributed: the Kafka cluster (default: the job's
    /// `bootstrap_servers`, "embedded" by default: a broker in this process).
    #[arg(long, requires = "distributed")]
    pub bootstrap_servers: Option<String>,
    /// Serve Prometheus metrics at this address (e.g. 127.0.0.1:9464) while
    /// the backfill runs: calls and items by outcome, retries, items
    /// expected, call durations and warm pools, labelled with the job's
    /// name (the function's without a job).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

/// A number flag within the range the pipeline file allows for the same
/// setting, so that a flag cannot do what the file refuses (0 items per
/// call, 0 calls in flight).
fn in_range<T>(text: &str, range: std::ops::RangeInclusive<T>) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
    T::Err: std::fmt::Display,
{
    let n: T = text.parse().map_err(|e| format!("{e}"))?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is out of range: expected {}..={}",
            range.start(),
            range.end()
        ))
    }
}

fn items_per_call(text: &str) -> Result<usize, String> {
    let r = sluice_pipeline::MAX_ITEMS_PER_CALL_RANGE;
    in_range(text, *r.start() as usize..=*r.end() as usize)
}

fn bytes_per_call(text: &str) -> Result<usize, String> {
    in_range(text, sluice_pipeline::MAX_BYTES_PER_CALL_RANGE)
}

pub(crate) fn concurrency(text: &str) -> Result<usize, String> {
    let r = sluice_pipeline::CONCURRENCY_RANGE;
    in_range(text, *r.start() as usize..=*r.end() as usize)
}

fn attempts(text: &str) -> Result<u32, String> {
    in_range(text, sluice_pipeline::MAX_ATTEMPTS_RANGE)
}

fn object_bytes(text: &str) -> Result<u64, String> {
    in_range(text, sluice_pipeline::MAX_OBJECT_BYTES_RANGE)
}

pub(crate) fn max_items(text: &str) -> Result<u64, String> {
    in_range(text, sluice_pipeline::MAX_ITEMS_RANGE).map(u64::from)
}

/// `--batch-input`: a JSON object of at most the size a job's may have.
fn batch_input(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(o)) => {
            let size = serde_json::Value::Object(o.clone()).to_string().len();
            if size > sluice_pipeline::MAX_BATCH_INPUT_BYTES {
                return Err(format!(
                    "{size} bytes as JSON: at most {} (it goes into every call)",
                    sluice_pipeline::MAX_BATCH_INPUT_BYTES
                ));
            }
            Ok(o)
        }
        Ok(other) => Err(format!(
            "expected a JSON object, e.g. '{{\"run_date\": \"2026-12-01\"}}', not {other}"
        )),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

fn buffered_items(text: &str) -> Result<usize, String> {
    in_range(text, sluice_pipeline::MAX_BUFFERED_ITEMS_RANGE)
}

/// A backfill's settings: the job's (if any), overridden by the flags.
#[derive(Debug)]
pub struct Settings {
    pub function: String,
    pub patterns: Vec<String>,
    pub format: Option<Format>,
    pub columns: Option<Vec<String>>,
    pub csv_delimiter: u8,
    pub csv_headers: Option<Vec<String>>,
    pub limits: Limits,
    pub max_concurrency: Option<usize>,
    pub progress: Option<PathBuf>,
    pub dead_letter: Option<PathBuf>,
    pub results: Option<PathBuf>,
    pub max_attempts: u32,
    pub tolerated_failure_count: Option<u64>,
    pub tolerated_failure_percentage: Option<f64>,
    pub order: OrderConfig,
    pub max_buffered_items: usize,
    pub payload: PayloadFormat,
    pub payload_file: bool,
    pub arrow_compression: ArrowCompression,
    pub file_dependencies: Vec<FileDependency>,
    pub batch_input: Option<serde_json::Map<String, serde_json::Value>>,
    pub max_items: Option<u64>,
    pub max_object_bytes: u64,
    pub items_pointer: Option<String>,
}

/// Merges the job and the flags; the message says what is missing or wrong.
pub fn settings(job: Option<&BackfillJob>, o: &BackfillOptions) -> Result<Settings, String> {
    let function = o
        .function
        .clone()
        .or_else(|| job.map(|j| j.function.clone()))
        .ok_or("--function is required without a JOB")?;
    let patterns = if o.source.is_empty() {
        job.map(|j| j.sources.clone())
            .ok_or("--source is required without a JOB")?
    } else {
        o.source.clone()
    };
    let csv_delimiter = match o.csv_delimiter {
        Some(c) if c.is_ascii() && !matches!(c, '"' | '\n' | '\r') => c as u8,
        Some(c) => {
            return Err(format!(
                "--csv-delimiter {c:?}: expected one ASCII character other than a quote or a line break"
            ));
        }
        None => job.map_or(b',', |j| j.csv_delimiter),
    };
    let csv_headers = match &o.csv_headers {
        Some(names) => {
            let twice = names
                .iter()
                .enumerate()
                .find(|(i, n)| names[..*i].contains(n));
            if let Some((_, name)) = twice {
                return Err(format!(
                    "--csv-headers names column {name:?} twice: items are objects keyed by \
                     column name"
                ));
            }
            if names.iter().any(String::is_empty) {
                return Err(format!(
                    "--csv-headers {}: a column name is empty",
                    names.join(",")
                ));
            }
            Some(names.clone())
        }
        None => job.and_then(|j| j.csv_headers.clone()),
    };
    if let Some(p) = o.tolerated_failure_percentage
        && !(0.0..=100.0).contains(&p)
    {
        return Err(format!(
            "--tolerated-failure-percentage {p}: expected 0 to 100"
        ));
    }
    let order = if o.order_key.is_some() || o.id_column.is_some() {
        OrderConfig {
            order_key: o.order_key.clone(),
            id_column: o.id_column.clone(),
            depends_on_column: o.depends_on_column.clone(),
        }
    } else {
        job.map_or_else(OrderConfig::default, |j| OrderConfig {
            order_key: j.order_key.clone(),
            id_column: j.id_column.clone(),
            depends_on_column: j.depends_on_column.clone(),
        })
    };
    let max_buffered_items = o
        .max_buffered_items
        .or(job.map(|j| j.max_buffered_items))
        .unwrap_or(sluice_taskgen::DEFAULT_MAX_BUFFERED_ITEMS);
    let format = o.format.or(job.and_then(|j| j.format));
    Ok(Settings {
        function,
        patterns,
        format,
        columns: if o.columns.is_empty() {
            job.and_then(|j| j.columns.clone())
        } else {
            Some(o.columns.clone())
        },
        csv_delimiter,
        csv_headers,
        limits: Limits {
            items: o
                .max_items_per_call
                .or(job.map(|j| j.max_items_per_call as usize))
                // Objects are called one at a time.
                .unwrap_or(if format == Some(Format::Objects) {
                    1
                } else {
                    DEFAULT_MAX_ITEMS_PER_CALL as usize
                })
                .max(1),
            bytes: o
                .max_bytes_per_call
                .or(job.map(|j| j.max_bytes_per_call))
                .unwrap_or(DEFAULT_MAX_BYTES_PER_CALL)
                .max(1),
        },
        max_concurrency: o
            .max_concurrency
            .or(job.and_then(|j| j.max_concurrency.map(|c| c as usize))),
        progress: o.progress.clone().or(job.and_then(|j| j.progress.clone())),
        dead_letter: o
            .dead_letter
            .clone()
            .or(job.and_then(|j| j.dead_letter.clone())),
        results: o.results.clone().or(job.and_then(|j| j.results.clone())),
        max_attempts: o
            .max_attempts
            .or(job.map(|j| j.max_attempts))
            .unwrap_or(DEFAULT_MAX_ATTEMPTS)
            .max(1),
        tolerated_failure_count: o
            .tolerated_failure_count
            .or(job.and_then(|j| j.tolerated_failure_count)),
        tolerated_failure_percentage: o
            .tolerated_failure_percentage
            .or(job.and_then(|j| j.tolerated_failure_percentage)),
        order,
        max_buffered_items,
        payload: o.payload.or(job.map(|j| j.payload)).unwrap_or_default(),
        payload_file: o.payload_file || job.is_some_and(|j| j.payload_file),
        arrow_compression: o
            .arrow_compression
            .or(job.map(|j| j.arrow_compression))
            .unwrap_or_default(),
        max_items: o.max_items.or(job.and_then(|j| j.max_items)),
        items_pointer: o
            .items_pointer
            .clone()
            .or_else(|| job.and_then(|j| j.items_pointer.clone())),
        max_object_bytes: o
            .max_object_bytes
            .or(job.map(|j| j.max_object_bytes))
            .unwrap_or(sluice_pipeline::DEFAULT_MAX_OBJECT_BYTES),
        batch_input: o
            .batch_input
            .clone()
            .or_else(|| job.and_then(|j| j.batch_input.clone())),
        file_dependencies: if o.file_depends_on.is_empty() {
            job.map(|j| {
                j.file_dependencies
                    .iter()
                    .map(|(files, after)| FileDependency {
                        files: files.clone(),
                        after: after.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
        } else {
            o.file_depends_on
                .iter()
                .map(|spec| {
                    let (files, after) = spec
                        .split_once('=')
                        .filter(|(f, a)| !f.is_empty() && !a.is_empty())
                        .ok_or_else(|| {
                            format!("--file-depends-on {spec:?}: expected FILES=PREREQ[,PREREQ...]")
                        })?;
                    Ok(FileDependency {
                        files: files.to_owned(),
                        after: after.split(',').map(str::to_owned).collect(),
                    })
                })
                .collect::<Result<_, String>>()?
        },
    })
}

pub fn print_summary(s: &Summary) {
    println!(
        "calls: {} total, {} succeeded, {} failed, {} retries, {} skipped (already done)",
        s.calls_total, s.calls_succeeded, s.calls_failed, s.calls_retried, s.calls_skipped
    );
    println!(
        "items: {} total, {} succeeded, {} failed, {} skipped",
        s.items_total, s.items_succeeded, s.items_failed, s.items_skipped
    );
    if s.peak_buffered_items > 0 {
        println!(
            "scheduler: at most {} items buffered at once",
            s.peak_buffered_items
        );
    }
    if s.earlier_failures > 0 {
        println!(
            "earlier runs: {} failures kept in the dead-letter file (the fold moved past them and does not call them again)",
            s.earlier_failures
        );
    }
    if s.items_without_order_key > 0 {
        println!(
            "order_key: {} items had no value for it (a misspelt key?)",
            s.items_without_order_key
        );
    }
    println!(
        "duration: {:.2?}, {:.1} items/s{}",
        s.duration,
        s.items_per_second(),
        if s.interrupted { " (interrupted)" } else { "" }
    );
}

/// One line of progress for a terminal: a bar with percentage and ETA when
/// the item count is known up front, else the counters alone.
pub fn progress_bar(s: &Summary) -> String {
    const WIDTH: usize = 24;
    let done = s.items_succeeded + s.items_failed + s.items_skipped;
    let rate = s.items_per_second();
    let failures = if s.items_failed > 0 {
        format!(" · {} failed", s.items_failed)
    } else {
        String::new()
    };
    match s.items_expected.filter(|&n| n > 0) {
        Some(total) => {
            let frac = (done as f64 / total as f64).clamp(0.0, 1.0);
            let filled = (frac * WIDTH as f64).round() as usize;
            let eta = if rate > 0.0 && done < total {
                let secs = (total - done) as f64 / rate;
                humantime::format_duration(Duration::from_secs(secs.ceil() as u64)).to_string()
            } else {
                "-".to_owned()
            };
            format!(
                "[{}{}] {:>3.0}% {done}/{total} items · {rate:.0} items/s · ETA {eta}{failures}",
                "=".repeat(filled),
                " ".repeat(WIDTH - filled),
                frac * 100.0
            )
        }
        None => format!(
            "{done} items · {} calls · {rate:.0} items/s{failures}",
            s.calls_succeeded + s.calls_failed + s.calls_skipped
        ),
    }
}

pub fn error_code(e: &BackfillError) -> u8 {
    match e {
        BackfillError::TooManyFailures { .. } => exit::INVOKE_FAILED,
        e if e.fault() == Fault::User => exit::USAGE,
        _ => exit::INVOKE_FAILED,
    }
}

/// `--dry-run`: files, row groups, items and calls (and dependency levels).
/// The sources and input `--max-items N` leaves (what a run does when it
/// starts), for the dry run's plan.
async fn sample(
    n: u64,
    (order, file_dependencies, payload): (&OrderConfig, &[FileDependency], PayloadFormat),
    sources: Vec<PathBuf>,
    input: Input,
) -> Result<(Vec<PathBuf>, Input), u8> {
    if let Err(e) = sluice_taskgen::check_max_items(n, order, file_dependencies, payload) {
        crate::log_error!("{e}");
        return Err(exit::USAGE);
    }
    let limited = tokio::task::spawn_blocking(move || {
        sluice_taskgen::limit_items(&sources, &input, n).map(|sample| {
            let input = Input {
                cap: sample.cap,
                ..input
            };
            (sample.sources, input)
        })
    })
    .await;
    match limited {
        Ok(Ok(kept)) => Ok(kept),
        Ok(Err(e)) => {
            crate::log_error!("{e}");
            Err(exit::INVOKE_FAILED)
        }
        Err(e) => {
            crate::log_error!("reading the sources: {e}");
            Err(exit::INVOKE_FAILED)
        }
    }
}

/// Prints the plan of calls over `sources` (also MapReduce's map tasks);
/// the exit code.
pub(crate) async fn dry_run(
    sources: &[PathBuf],
    input: &Input,
    (limits, payload): (Limits, PayloadFormat),
    (order, max_buffered_items): (&OrderConfig, usize),
    file_dependencies: &[FileDependency],
) -> u8 {
    let per_call = limits.items;
    if !file_dependencies.is_empty() {
        match sluice_taskgen::file_levels(sources, file_dependencies) {
            Ok((levels, _)) => {
                for (i, files) in levels.iter().enumerate() {
                    let names: Vec<String> =
                        files.iter().map(|f| f.display().to_string()).collect();
                    println!("file level {i}: {}", names.join(", "));
                }
            }
            Err(e) => {
                crate::log_error!("{e}");
                return error_code(&e);
            }
        }
    }
    let plans = match sluice_taskgen::plan_payload(sources, input, limits, payload) {
        Ok(plans) => plans,
        Err(e) => {
            crate::log_error!("{e}");
            return error_code(&e);
        }
    };
    let (mut items, mut calls, mut bad) = (0, 0, 0);
    for f in &plans {
        let groups = f.row_groups.as_ref().map_or(String::new(), |g| {
            format!(
                ", {} row groups ({})",
                g.len(),
                g.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            )
        });
        // With ordering options, calls are formed across files (below).
        let file_calls = if order.is_active() {
            String::new()
        } else {
            format!(", {} calls", f.calls)
        };
        println!(
            "{}: {} items, {} unreadable{file_calls}{groups}",
            f.file.display(),
            f.items,
            f.bad_items,
        );
        items += f.items;
        calls += f.calls;
        bad += f.bad_items;
    }
    if !order.is_active() {
        println!(
            "total: {} files, {items} items, {bad} unreadable, {calls} calls of up to {per_call} items",
            plans.len()
        );
        return exit::OK;
    }
    println!(
        "total: {} files, {items} items, {bad} unreadable",
        plans.len()
    );
    match sluice_taskgen::plan_order(sources, input, limits, order, max_buffered_items).await {
        Ok(levels) => {
            let calls: u64 = levels.iter().map(|l| l.calls).sum();
            for l in &levels {
                let keys = match (&order.order_key, l.unkeyed) {
                    (None, _) => String::new(),
                    (Some(_), 0) => format!(", {} keys", l.keys),
                    (Some(k), n) => format!(
                        ", {} keys, {n} items without a value for order_key {k:?} (a misspelt key?)",
                        l.keys
                    ),
                };
                println!(
                    "level {}: {} items, {} calls{keys}",
                    l.level, l.items, l.calls
                );
            }
            println!(
                "{} dependency levels, {calls} calls of up to {per_call} items",
                levels.len()
            );
            exit::OK
        }
        Err(e) => {
            crate::log_error!("{e}");
            error_code(&e)
        }
    }
}

/// The pipeline, job and merged settings, the backfill configuration and
/// what `--dry-run` needs; or the exit code after printing the error.
pub struct Prepared {
    pub pipeline: sluice_pipeline::Pipeline,
    pub job: Option<BackfillJob>,
    pub cfg: BackfillConfig,
}

/// Loads the pipeline and job, merges the flags and resolves the sources.
/// With `--dry-run`, prints the plan and returns its exit code.
pub async fn prepare(
    pipeline: &Path,
    job: Option<&str>,
    args: &BackfillOptions,
) -> Result<Prepared, u8> {
    let p = super::load_pipeline(pipeline)?;
    let job = match job {
        None => None,
        Some(name) => match p.job(name) {
            Ok(job) => Some(job.clone()),
            Err(e) => {
                crate::log_error!("{e}");
                return Err(exit::USAGE);
            }
        },
    };
    let set = settings(job.as_ref(), args).map_err(|e| {
        crate::log_error!("{e}");
        exit::USAGE
    })?;
    let fconf = p.function(&set.function).map_err(|e| {
        crate::log_error!("{e}");
        exit::USAGE
    })?;
    let sources = sluice_taskgen::resolve_sources(&set.patterns).map_err(|e| {
        crate::log_error!("{e}");
        error_code(&e)
    })?;
    let first = set.patterns.first().map_or("", String::as_str);
    let Some(format) = set
        .format
        .or_else(|| sluice_taskgen::format_of(&set.patterns, &sources))
    else {
        crate::log_error!(
            "cannot tell the format of {first:?} from its extension; give --format \
             (parquet, csv, jsonl, json or text; objects to call the function on each file whole)"
        );
        return Err(exit::USAGE);
    };
    let input = Input {
        format,
        columns: set.columns,
        csv_delimiter: set.csv_delimiter,
        csv_headers: set.csv_headers,
        arrow_compression: set.arrow_compression,
        cap: None,
        items_pointer: set.items_pointer,
    };
    if let Some(hint) = sluice_taskgen::suspect_csv_delimiter(&sources, &input) {
        // How to type it: a tab needs the shell's $'\t' and TOML's "\t".
        let (flag, toml) = match hint.likely {
            '\t' => ("$'\\t'".to_owned(), "\\t".to_owned()),
            c => (format!("'{c}'"), c.to_string()),
        };
        crate::log_warn!(
            "{}: the CSV header reads as one column, {:?}, with the delimiter {:?}, so every row would be one field of that name; if the fields are separated by {:?}, give --csv-delimiter {flag} (csv_delimiter = \"{toml}\" in the job)",
            hint.file.display(),
            hint.header,
            char::from(input.csv_delimiter),
            hint.likely,
        );
    }
    let mut limits = set.limits;
    if args.distributed && limits.bytes > MAX_TASK_BYTES {
        // A task must fit in one Kafka message.
        limits.bytes = MAX_TASK_BYTES;
    }
    let progress = set.progress.unwrap_or_else(|| {
        let p = sluice_taskgen::default_progress_path(&sources, format, &set.function, limits);
        // A sample keeps its progress apart from a run over everything.
        match set.max_items {
            Some(n) => p.with_extension(format!("first-{n}.redb")),
            None => p,
        }
    });
    let dead_letter = set
        .dead_letter
        .unwrap_or_else(|| sluice_taskgen::default_dead_letter_path(&progress));
    if args.dry_run {
        let (sources, input) = match set.max_items {
            None => (sources, input),
            Some(n) => match sample(
                n,
                (&set.order, &set.file_dependencies, set.payload),
                sources,
                input,
            )
            .await
            {
                Ok(kept) => kept,
                Err(code) => return Err(code),
            },
        };
        let code = dry_run(
            &sources,
            &input,
            (limits, set.payload),
            (&set.order, set.max_buffered_items),
            &set.file_dependencies,
        )
        .await;
        if code != exit::OK {
            return Err(code);
        }
        // Checked as a run checks it before calling anything.
        let results = match set.results.as_deref().map(sluice_taskgen::results_target) {
            None => "not kept (give --results or results = to keep them)".to_owned(),
            Some(Ok(r)) if sluice_taskgen::is_remote(&r) => format!(
                "kept in {}, uploaded to {} when the job ends",
                sluice_taskgen::local_results_path(&progress).display(),
                r.display()
            ),
            Some(Ok(r)) => format!("in {}", r.display()),
            Some(Err(e)) => {
                crate::log_error!("{e}");
                return Err(exit::USAGE);
            }
        };
        // What a run would skip, or why it would not start.
        let done = match sluice_taskgen::calls_done(&progress) {
            Ok(None) => "new".to_owned(),
            Ok(Some(n)) => format!("{n} calls done by earlier runs: a run skips them"),
            Err(BackfillError::ProgressInUse { .. }) => {
                "in use: a backfill with this store is running".to_owned()
            }
            Err(e) => format!("unreadable: {e}"),
        };
        println!(
            "progress in {} ({done}), failed items in {}, responses {results}",
            progress.display(),
            dead_letter.display(),
        );
        return Err(code);
    }
    let cfg = BackfillConfig {
        max_concurrency: set
            .max_concurrency
            .unwrap_or(fconf.concurrency as usize)
            .max(1),
        function: set.function,
        sources,
        input,
        max_items_per_call: limits.items,
        max_bytes_per_call: limits.bytes,
        progress,
        dead_letter,
        results: set.results,
        max_attempts: set.max_attempts,
        tolerated_failure_count: set.tolerated_failure_count,
        tolerated_failure_percentage: set.tolerated_failure_percentage,
        order: set.order,
        payload: set.payload,
        payload_file: set.payload_file,
        file_dependencies: set.file_dependencies,
        max_buffered_items: set.max_buffered_items,
        batch_input: set.batch_input,
        max_items: set.max_items,
        max_object_bytes: set.max_object_bytes,
        state: job.as_ref().and_then(|j| {
            j.state.clone().map(|config| StateOptions {
                config,
                source: format!("backfill/{}", j.name),
                servers: match &j.bootstrap_servers {
                    sluice_pipeline::BootstrapServers::Servers(s) => s.clone(),
                    sluice_pipeline::BootstrapServers::Embedded => String::new(),
                },
            })
        }),
    };
    if let Some(st) = &cfg.state {
        if args.distributed {
            crate::log_error!(
                "a stateful job folds its items in order in one process: --distributed does not apply"
            );
            return Err(exit::USAGE);
        }
        if st.servers.is_empty()
            && matches!(st.config.store, sluice_pipeline::StateStore::Changelog(_))
        {
            crate::log_error!(
                "job {}: state store \"kafka\" needs the job's bootstrap_servers (the embedded broker's data would be gone when the backfill ends)",
                job.as_ref().map_or("", |j| j.name.as_str())
            );
            return Err(exit::USAGE);
        }
    }
    Ok(Prepared {
        pipeline: p,
        job,
        cfg,
    })
}

/// Progress on stderr: a bar redrawn in place on a terminal, periodic log
/// lines otherwise. Returns the hook and whether it draws on a terminal.
pub fn progress_hook() -> ((Duration, TickHook), bool) {
    if std::io::stderr().is_terminal() {
        (
            (
                Duration::from_millis(200),
                Arc::new(|s: &Summary| eprint!("\r\x1b[K{}", progress_bar(s))),
            ),
            true,
        )
    } else {
        (
            (
                Duration::from_secs(2),
                Arc::new(|s: &Summary| {
                    crate::log_plain!(
                        "backfill: {} calls done ({} failed, {} skipped), {} items, {:.1} items/s",
                        s.calls_succeeded,
                        s.calls_failed,
                        s.calls_skipped,
                        s.items_succeeded,
                        s.items_per_second()
                    );
                }),
            ),
            false,
        )
    }
}

/// A backfill's hooks: the progress display (and whether it is a
/// terminal's), and with `--metrics-addr` the job's `sluice_job_*` series,
/// the durations of `executor`'s successful calls and its warm pools,
/// served until the returned sender is dropped.
async fn hooks(
    metrics_addr: Option<&str>,
    job: &str,
    executor: Option<&sluice_executor::Executor>,
) -> Result<(Hooks, bool, Option<tokio::sync::watch::Sender<bool>>), u8> {
    let ((every, show), terminal) = progress_hook();
    let Some(addr) = metrics_addr else {
        let hooks = Hooks {
            on_tick: Some((every, show)),
            ..Hooks::default()
        };
        return Ok((hooks, terminal, None));
    };
    let registry = Metrics::new();
    if let Some(ex) = executor {
        registry.watch_executor(ex.clone());
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    super::serve_metrics(addr, registry.clone(), stopped).await?;
    let (on_tick, on_response) = (registry.clone(), registry);
    let (job, name) = (job.to_owned(), job.to_owned());
    let tick: TickHook = Arc::new(move |s: &Summary| {
        // Before the progress line: what the line says is scraped already.
        on_tick.set_job_progress(&job, &job_progress(s));
        show(s);
    });
    let hooks = Hooks {
        on_tick: Some((every, tick)),
        on_response: executor.map(|_| {
            let hook: sluice_taskgen::ResponseHook =
                Arc::new(move |_: &str, r: &sluice_executor::Response| {
                    on_response.observe_job_call(&name, r.duration.as_secs_f64());
                });
            hook
        }),
    };
    Ok((hooks, terminal, Some(stop)))
}

/// A summary as the job's metrics.
fn job_progress(s: &Summary) -> JobProgress {
    JobProgress {
        calls: [s.calls_succeeded, s.calls_failed, s.calls_skipped],
        items: [s.items_succeeded, s.items_failed, s.items_skipped],
        retries: s.calls_retried,
        items_expected: s.items_expected,
    }
}

/// The exit code of a finished run, after printing its summary: 0 when
/// every call succeeded, 1 when some failed within the tolerated failures,
/// 3 when the job stopped on failures or was interrupted.
pub fn conclude(
    result: Result<Summary, BackfillError>,
    dead_letter: &Path,
    results: Option<&Path>,
    memory: Option<super::MemoryUse>,
) -> u8 {
    match result {
        Ok(s) => {
            print_summary(&s);
            if let Some(m) = memory {
                println!("{m}");
            }
            match results {
                // An object store gets them when the job ends.
                Some(url) if s.interrupted && sluice_taskgen::is_remote(url) => {
                    crate::log_plain!("responses go to {} when the job ends", url.display());
                }
                Some(results) => crate::log_plain!(
                    "responses are in {} (a line per successful call)",
                    results.display()
                ),
                None => {}
            }
            if s.items_failed > 0 || s.earlier_failures > 0 {
                crate::log_plain!("failed items are in {}", dead_letter.display());
                exit::FUNCTION_ERROR
            } else if s.interrupted {
                exit::INVOKE_FAILED
            } else {
                exit::OK
            }
        }
        Err(e) => {
            if let BackfillError::TooManyFailures { summary, .. } = &e {
                print_summary(summary);
            }
            crate::log_error!("{e}");
            error_code(&e)
        }
    }
}

/// Runs the backfill (see [`conclude`] for the exit codes).
pub async fn run(pipeline: PathBuf, job: Option<String>, args: BackfillOptions) -> u8 {
    let prepared = match prepare(&pipeline, job.as_deref(), &args).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    if args.distributed {
        return coordinate(&pipeline, prepared, &args).await;
    }
    let ex = match super::executor_for(
        &prepared.pipeline,
        crate::logs::function_log_sink(args.quiet),
    ) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let name = prepared
        .job
        .as_ref()
        .map_or(&prepared.cfg.function, |j| &j.name)
        .clone();
    let (hooks, terminal, _metrics) =
        match hooks(args.metrics_addr.as_deref(), &name, Some(&ex)).await {
            Ok(h) => h,
            Err(code) => {
                ex.shutdown().await;
                return code;
            }
        };
    let dead_letter = prepared.cfg.dead_letter.clone();
    let results = prepared.cfg.results.clone();
    let shutdown = super::stop_requested();
    let function = prepared.cfg.function.clone();
    let memory_mb = prepared
        .pipeline
        .function(&function)
        .map_or(0, |f| f.memory_mb);
    let result = sluice_taskgen::run(&ex, prepared.cfg, hooks, shutdown).await;
    ex.shutdown().await;
    if terminal {
        eprint!("\r\x1b[K");
    }
    let memory = ex
        .stats(&function)
        .ok()
        .and_then(|st| super::MemoryUse::of(&st, memory_mb));
    conclude(result, &dead_letter, results.as_deref(), memory)
}

/// The Kafka cluster: `--bootstrap-servers`, else the job's; an embedded
/// broker is started in this process when that says "embedded" (returned so
/// that it lives as long as the caller needs it).
pub fn kafka_for(
    flag: Option<&str>,
    job: Option<&BackfillJob>,
) -> Result<(KafkaSettings, Option<EmbeddedBroker>), String> {
    let configured = job.map_or(BootstrapServers::Embedded, |j| j.bootstrap_servers.clone());
    let servers = match (flag, configured) {
        (Some("embedded"), _) | (None, BootstrapServers::Embedded) => None,
        (Some(s), _) => Some(s.to_owned()),
        (None, BootstrapServers::Servers(s)) => Some(s),
    };
    match servers {
        // The job's properties (security, SASL) are for its own cluster;
        // the embedded broker takes none.
        Some(servers) => Ok((
            KafkaSettings {
                servers,
                properties: job
                    .map(|j| j.properties.clone().into_iter().collect())
                    .unwrap_or_default(),
            },
            None,
        )),
        None => {
            let broker = EmbeddedBroker::start(1).map_err(|e| e.to_string())?;
            Ok((
                KafkaSettings {
                    servers: broker.bootstrap_servers().to_owned(),
                    properties: Vec::new(),
                },
                Some(broker),
            ))
        }
    }
}

/// `--distributed`: publish the calls and wait for the workers' results.
async fn coordinate(pipeline: &Path, prepared: Prepared, args: &BackfillOptions) -> u8 {
    let job = prepared
        .job
        .as_ref()
        .expect("clap requires a JOB with --distributed");
    let (kafka, embedded) = match kafka_for(args.bootstrap_servers.as_deref(), Some(job)) {
        Ok(k) => k,
        Err(e) => {
            crate::log_error!("{e}");
            return exit::INVOKE_FAILED;
        }
    };
    if let Some(broker) = &embedded {
        for topic in [
            distributed::tasks_topic(&job.name),
            distributed::results_topic(&job.name),
        ] {
            if let Err(e) = broker.create_topic(&topic, distributed::TASK_PARTITIONS) {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
        }
        crate::log_note!(
            "embedded Kafka broker at {servers} (in this process; its data is temporary); \
             start workers with: sluice worker {} {} --bootstrap-servers {servers}",
            pipeline.display(),
            job.name,
            servers = kafka.servers,
        );
    }
    crate::log_note!(
        "publishing the calls of job {} to {} and waiting for results on {}",
        job.name,
        distributed::tasks_topic(&job.name),
        distributed::results_topic(&job.name)
    );
    let (hooks, terminal, _metrics) =
        match hooks(args.metrics_addr.as_deref(), &job.name, None).await {
            Ok(h) => h,
            Err(code) => return code,
        };
    let dead_letter = prepared.cfg.dead_letter.clone();
    let results = prepared.cfg.results.clone();
    let shutdown = super::stop_requested();
    let result = distributed::coordinate(prepared.cfg, &job.name, &kafka, hooks, shutdown).await;
    if terminal {
        eprint!("\r\x1b[K");
    }
    drop(embedded);
    conclude(result, &dead_letter, results.as_deref(), None)
}

#[cfg(test)]
mod tests {
    use super::kafka_for;
    use sluice_pipeline::Pipeline;

    /// A job's librdkafka properties go to its own cluster (the job's or
    /// `--bootstrap-servers`), never to the embedded broker.
    #[test]
    fn a_jobs_properties_reach_its_external_cluster_only() {
        let dir = tempfile::tempdir().unwrap();
        let function = dir.path().join("f");
        std::fs::create_dir(&function).unwrap();
        let bootstrap = function.join("bootstrap");
        std::fs::write(&bootstrap, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            &bootstrap,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let text = "[functions.f]\npath = \"f\"\n\n[job.j]\nfunction = \"f\"\nsource = \"x.csv\"\n\
                    bootstrap_servers = \"kafka-1:9092\"\nproperties = { \"client.id\" = \"nightly\" }\n";
        let p = Pipeline::parse(text, &dir.path().join("pipeline.toml")).unwrap();
        let job = p.job("j").unwrap();
        let want = vec![("client.id".to_owned(), "nightly".to_owned())];

        let (kafka, embedded) = kafka_for(None, Some(job)).unwrap();
        assert_eq!(
            (kafka.servers.as_str(), &kafka.properties),
            ("kafka-1:9092", &want)
        );
        assert!(embedded.is_none());
        let (kafka, _) = kafka_for(Some("kafka-2:9092"), Some(job)).unwrap();
        assert_eq!(
            (kafka.servers.as_str(), &kafka.properties),
            ("kafka-2:9092", &want)
        );
        let (kafka, embedded) = kafka_for(Some("embedded"), Some(job)).unwrap();
        assert!(embedded.is_some() && kafka.properties.is_empty());
    }
}
