//! Pipeline files: parsing and validating `pipeline.toml`.
//!
//! A pipeline file declares the functions sluice can run and the triggers
//! that invoke them (see [Kafka triggers](#kafka-triggers-triggerkafka)).
//! Each function is a folder holding an executable `bootstrap` (a Lambda custom runtime) plus the
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
//! | `path` | required | folder with an executable `bootstrap`, or whose topmost layer with one has it executable (a custom runtime as a layer); or a `.zip` archive of one ([`package`]) |
//! | `memory_mb` | [`DEFAULT_MEMORY_MB`] | [`MEMORY_MB_RANGE`] (Lambda's) |
//! | `timeout` | [`DEFAULT_TIMEOUT`] | [`TIMEOUT_RANGE`] |
//! | `init_timeout` | [`DEFAULT_INIT_TIMEOUT`] | [`TIMEOUT_RANGE`] |
//! | `concurrency` | [`DEFAULT_CONCURRENCY`] | [`CONCURRENCY_RANGE`] |
//! | `max_queue` | [`DEFAULT_MAX_QUEUE`] | [`MAX_QUEUE_RANGE`] (0: reject at once) |
//! | `idle_timeout` | [`DEFAULT_IDLE_TIMEOUT`] | [`IDLE_TIMEOUT_RANGE`] |
//! | `env` | empty | keys `[A-Za-z_][A-Za-z0-9_]*`, not [`RESERVED_ENV_KEYS`] |
//! | `tenant` | [`DEFAULT_TENANT`] | `[A-Za-z0-9_-]{1,64}` |
//! | `backend` | `"auto"` | `"auto"` (microVM where the host boots Linux guests and an image is built, else process), `"process"`, `"microvm"` |
//! | `handler` | [`DEFAULT_HANDLER`] | 1 to 128 characters, no whitespace |
//! | `max_processes` | [`DEFAULT_MAX_PROCESSES`] | [`MAX_PROCESSES_RANGE`] |
//! | `tmp_mb` | [`DEFAULT_TMP_MB`] | [`TMP_MB_RANGE`] |
//! | `vcpus` | [`DEFAULT_VCPUS`] | [`VCPUS_RANGE`]; the microVM backend's vCPUs (the process backend shares the host's CPUs) |
//! | `min_warm` | [`DEFAULT_MIN_WARM`] | [`WARM_RANGE`], at most `max_warm` |
//! | `max_warm` | `concurrency` | [`WARM_RANGE`], at most `concurrency` |
//! | `prewarm` | [`DEFAULT_PREWARM`] | `true` or `false` |
//! | `snapshot` | [`DEFAULT_SNAPSHOT`] | `true` or `false`; the microVM backend restores cold starts from a snapshot of the function's initialised VM (`true` with `backend = "process"` is an error) |
//! | `pin_cpu` | [`DEFAULT_PIN_CPU`] | `true` or `false`; each process sandbox runs on one CPU, the least used (lower latency where waking another CPU is dear, as in virtual machines; `true` with `backend = "microvm"` is an error) |
//! | `layers` | none | up to [`MAX_LAYERS`] folders or `.zip` archives (Lambda layers), merged read-only at `/opt` in order, a later one's files over an earlier one's |
//!
//! `min_warm` idle sandboxes are kept ready (started in the background);
//! at most `max_warm` are kept idle. With `prewarm`, sluice watches when
//! calls arrive and, when they come in regular bursts, starts sandboxes
//! shortly before the next burst and stops extra idle ones between bursts.
//!
//! Durations use [`humantime`] syntax: `"500ms"`, `"3s"`, `"15m"`, `"1h 30m"`.
//! Function names follow Lambda's rule, `[A-Za-z0-9_-]{1,64}`.
//!
//! # Kafka triggers: `[[trigger.kafka]]`
//!
//! A Kafka trigger is Lambda's Kafka event source mapping, as configuration:
//! a consumer group reads the `topics`, gathers records into batches and
//! invokes `function` with each batch.
//!
//! ```toml
//! [[trigger.kafka]]
//! function = "echo"          # required: a declared function
//! topics = ["orders"]        # required: one or more topics
//! batch_size = 500           # everything else is optional
//! filter = { value = { type = ["order"] } }
//! on_failure = "orders-dlq"
//! max_retry_attempts = 3
//! ```
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `name` | `"FUNCTION-N"` (N: the trigger's position among Kafka triggers, from 1) | `[A-Za-z0-9_-]{1,64}`, unique |
//! | `function` | required | a declared function |
//! | `topics` | required | non-empty, unique topic names `[A-Za-z0-9._-]{1,249}`, not `.` or `..` |
//! | `bootstrap_servers` | `"embedded"` (an in-process broker) | `"embedded"` or `"host:port[,host:port...]"` |
//! | `group_id` | `"sluice-FUNCTION"` | 1 to 255 characters, no control characters |
//! | `starting_position` | `"latest"` | `"earliest"`, `"latest"` or a UTC RFC 3339 timestamp (Lambda's `"TRIM_HORIZON"` and `"LATEST"` too) |
//! | `batch_size` | [`DEFAULT_BATCH_SIZE`] | [`BATCH_SIZE_RANGE`] |
//! | `batch_window` | [`DEFAULT_BATCH_WINDOW`] | [`BATCH_WINDOW_RANGE`] |
//! | `max_batch_bytes` | [`DEFAULT_MAX_BATCH_BYTES`] | [`MAX_BATCH_BYTES_RANGE`] |
//! | `filter` | none | a [`filter::Pattern`], written as a table, or an array of them (any may match) |
//! | `max_retry_attempts` | `-1` (retry until the record expires) | `-1` or [`MAX_RETRY_ATTEMPTS_RANGE`]; finite needs `on_failure` |
//! | `max_record_age` | none (no limit) | [`MAX_RECORD_AGE_RANGE`]; needs `on_failure` |
//! | `bisect_batch_on_error` | `false` | boolean |
//! | `report_batch_item_failures` | `false` | boolean |
//! | `on_failure` | none | a topic, not one of `topics`; or a folder or object store prefix as a URL (`file:///var/dlq/`, `s3://bucket/dlq/`, [`OBJECT_URL_SCHEMES`]): one JSON object per failed batch and partition, Lambda's invocation record with the event ([`OnFailure`]) |
//! | `output_topic` | none | a topic, not one of `topics` |
//! | `parallelization_factor` | [`DEFAULT_PARALLELIZATION_FACTOR`] | [`PARALLELIZATION_FACTOR_RANGE`] |
//! | `exactly_once` | `false` | boolean; `true` needs `output_topic` |
//! | `retry_backoff` | [`DEFAULT_RETRY_BACKOFF`] | [`RETRY_BACKOFF_RANGE`] |
//! | `retry_backoff_max` | [`DEFAULT_RETRY_BACKOFF_MAX`] | `retry_backoff` to [`RETRY_BACKOFF_MAX_LIMIT`] |
//! | `partitions` | [`DEFAULT_PARTITIONS`] | [`PARTITIONS_RANGE`]; used by `"embedded"` only (an external cluster's topics keep their own) |
//! | `properties` | empty | librdkafka properties (strings, integers or booleans), not [`MANAGED_KAFKA_PROPERTIES`]; librdkafka checks each when the file loads |
//! | `state` | none (stateless) | a [state table](#state-state--) |
//! | `enabled` | `true` | boolean; `false`: validated but not run by `sluice run` unless named with `--trigger` (Lambda's disabled event source mapping) |
//!
//! # Object-store triggers: `[[trigger.object_store]]`
//!
//! Lambda's S3 trigger, by polling: every object that appears under `url`
//! (or is overwritten) invokes `function` once with an S3 event
//! notification; the object's bytes are staged in the sandbox at
//! `/run/sluice/payload`.
//!
//! ```toml
//! [[trigger.object_store]]
//! function = "ingest"                  # required: a declared function
//! url = "s3://landing/incoming/"       # required: a folder or a URL
//! suffix = ".csv"                      # everything else is optional
//! ```
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `name` | `"FUNCTION-objects-N"` | `[A-Za-z0-9_-]{1,64}`, unique among all triggers |
//! | `function` | required | a declared function |
//! | `url` | required | a folder (relative to the pipeline file's), `file:///FOLDER`, or a URL of [`OBJECT_URL_SCHEMES`] |
//! | `suffix` | none (every object) | a non-empty name ending |
//! | `starting_position` | `"latest"` (objects already there are skipped) | `"earliest"`, `"latest"` or a UTC RFC 3339 timestamp (objects modified since); Lambda's `"TRIM_HORIZON"` and `"LATEST"` too |
//! | `poll_interval` | [`DEFAULT_POLL_INTERVAL`] | [`POLL_INTERVAL_RANGE`] |
//! | `max_object_bytes` | [`DEFAULT_MAX_OBJECT_BYTES`] | [`MAX_OBJECT_BYTES_RANGE`] |
//! | `max_retry_attempts` | [`DEFAULT_OBJECT_RETRY_ATTEMPTS`] | [`MAX_RETRY_ATTEMPTS_RANGE`] |
//! | `retry_backoff` | [`DEFAULT_RETRY_BACKOFF`] | [`RETRY_BACKOFF_RANGE`] |
//! | `retry_backoff_max` | [`DEFAULT_RETRY_BACKOFF_MAX`] | `retry_backoff` to [`RETRY_BACKOFF_MAX_LIMIT`] |
//! | `progress` | `.sluice-state/NAME.objects.redb` | a path (relative to the pipeline file's folder) |
//! | `dead_letter` | `.sluice-state/NAME.dead-letter.jsonl` | a path (relative to the pipeline file's folder) |
//! | `results` | none (responses are not kept) | a path: a JSON-lines file with one line per successful call, `{"object", "version", "eventName", "response"}`, written before the object counts as handled |
//! | `enabled` | `true` | boolean; `false`: validated but not run by `sluice run` unless named with `--trigger` |
//!
//! # Backfill jobs: `[job.NAME]`
//!
//! A job runs a function over an existing data set (`sluice backfill
//! PIPELINE JOB`): every item (row, record, line) at least once, resumable.
//!
//! ```toml
//! [job.reprocess-orders]
//! function = "orders"              # required: a declared function
//! source = ["data/*.parquet"]      # required: paths, globs or object_store URLs
//! max_items_per_call = 500         # everything else is optional
//! columns = ["id", "amount"]
//! tolerated_failure_percentage = 1.5
//! ```
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `kind` | `"backfill"` | `"backfill"`, or `"mapreduce"` (below) |
//! | `function` | required | a declared function |
//! | `source` | required | a path, glob or URL (`file://`, `s3://`, `gs://`, `az://`), or an array of them; relative paths are relative to the pipeline file's folder |
//! | `format` | from the first source's extension | `"parquet"`, `"csv"`, `"jsonl"`, `"json"` (a document holding an array, each element an item; one that does not start with `[` is read as JSON lines), `"text"`, `"avro"` (an Avro container file, each record an item), or `"objects"`: each file or object is one item, `{"Key", "Size", "LastModified", "Etag", "url"}` (Distributed Map's S3 object listing), called one at a time with its bytes staged read-only at `/run/sluice/payload` (the event's `"object_file"`); not with `columns`, CSV options, `order_key`, dependencies, `state`, a columnar `payload` or `max_items_per_call` over 1 |
//! | `columns` | every column | non-empty array of names; Parquet reads only these |
//! | `csv_delimiter` | `","` | one ASCII character |
//! | `csv_headers` | none (each CSV file's first line is its header) | distinct column names, one per field: the files have no header line, and their first line is an item |
//! | `max_items_per_call` | [`DEFAULT_MAX_ITEMS_PER_CALL`] | [`MAX_ITEMS_PER_CALL_RANGE`] |
//! | `max_bytes_per_call` | [`DEFAULT_MAX_BYTES_PER_CALL`] | [`MAX_BYTES_PER_CALL_RANGE`] (items' JSON size) |
//! | `max_concurrency` | the function's `concurrency` | [`CONCURRENCY_RANGE`] |
//! | `max_attempts` | [`DEFAULT_MAX_ATTEMPTS`] | [`MAX_ATTEMPTS_RANGE`] |
//! | `tolerated_failure_count` | none (no limit) | 0 or more failed calls |
//! | `tolerated_failure_percentage` | none (no limit) | 0 to 100 (% of items) |
//! | `order_key` | none | a field: items with the same value run in order |
//! | `id_column` + `depends_on_column` | none | fields: an item runs after the ids it names succeeded |
//! | `max_buffered_items` | [`DEFAULT_MAX_BUFFERED_ITEMS`] | [`MAX_BUFFERED_ITEMS_RANGE`]: with `order_key` or dependencies, items held in calls being filled or waiting for their key; with `state`, items read and not yet folded |
//! | `progress` | `.sluice-backfill-<hash>.redb` next to the first local source | a path |
//! | `dead_letter` | the progress path with `.dead.jsonl` | a path |
//! | `results` | none (responses are not kept) | a path: a JSON-lines file with one line per successful call, `{"call_id", "source", "first_item", "count", "response"}`, written before the call counts as done (not with `state`); or the URL of an object (`s3://BUCKET/KEY`, `gs://`, `az://`) the file is uploaded to, whole, when the job ends (Distributed Map's `ResultWriter`), kept next to the progress store until then |
//! | `bootstrap_servers` | `"embedded"` | as for Kafka triggers; used by `--distributed` |
//! | `properties` | empty | as for Kafka triggers; used with an external cluster (`--distributed`, `sluice worker`, MapReduce's shuffle) |
//! | `depends_on_files` | none | `{ "GLOB" = ["GLOB", ...] }`: files start after the files they name fully succeeded (globs without `/` match file names) |
//! | `payload` | `"json"` | `"json"` (`{"items": [...], "batch": {...}}`), `"arrow"` (`{"arrow": "<base64 Arrow IPC stream>", "batch": {...}}`, Parquet sources) or `"parquet"` (`{"parquet": "<base64 Parquet file>", "batch": {...}}`, Parquet sources: whole row groups, the chosen columns' chunks copied as they are, nothing decoded on the host; a call takes whole row groups within `max_items_per_call` and `max_bytes_per_call`, at least one) |
//! | `payload_file` | `false` | with `payload = "parquet"` or `"arrow"`: the Parquet file or Arrow stream is staged as a read-only file in the sandbox, at `/run/sluice/payload` until the call has answered, and the event names it: `{"parquet_file": "/run/sluice/payload", "batch": {...}}` (or `"arrow_file"`), saving the base64 and JSON work on both sides (with `--distributed`, the task carries the payload and the worker stages it) |
//! | `arrow_compression` | `"none"` | with `payload = "arrow"`: `"lz4"` or `"zstd"` compress the IPC stream's buffers (the reader must support it: pyarrow does; arrow-rs needs its `lz4`/`zstd` feature) |
//! | `state` | none (stateless) | a [state table](#state-state--); the key scope needs `order_key`; count windows only |
//! | `max_items` | none (every item) | [`MAX_ITEMS_RANGE`]: only the first items, in file then row order, are called (Distributed Map's `MaxItems`), to try a function on a sample; not with dependencies or `payload = "parquet"` |
//! | `items_pointer` | none (the document's top level) | with `format = "json"`: a JSON pointer (RFC 6901) to the array of items, e.g. `"/data/orders"` (Distributed Map's `ItemsPointer`) |
//! | `max_object_bytes` | [`DEFAULT_MAX_OBJECT_BYTES`] | [`MAX_OBJECT_BYTES_RANGE`]; with `format = "objects"`: a larger object is not fetched, it goes to the dead-letter file (`Sluice.ObjectTooLarge`) |
//! | `batch_input` | none | a table, added to every call's event as `"batch_input"` (Distributed Map's `BatchInput`): parameters every call shares, e.g. `{ run_date = "2026-12-01" }`; at most [`MAX_BATCH_INPUT_BYTES`] as JSON |
//!
//! A job with `kind = "mapreduce"` (`sluice mapreduce PIPELINE JOB`) takes
//! `source`, `format`, `columns`, `csv_delimiter`, `csv_headers`, `max_items_per_call`
//! (items per map split), `max_concurrency`, `max_attempts`, `payload`,
//! `payload_file`, `arrow_compression`, `max_items` (the map phase reads
//! only the first items: a sample, whose output replaces the folder's) and
//! `bootstrap_servers` and `properties` as above, and instead of `function`:
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `map` | required | a declared function |
//! | `combine` | none | a declared function |
//! | `reduce` | required | a declared function |
//! | `reduce_partitions` | [`DEFAULT_REDUCE_PARTITIONS`] | [`REDUCE_PARTITIONS_RANGE`] |
//! | `groups_per_call` | [`DEFAULT_GROUPS_PER_CALL`] | [`MAX_ITEMS_PER_CALL_RANGE`] |
//! | `reduce_memory_mb` | [`DEFAULT_REDUCE_MEMORY_MB`] | [`REDUCE_MEMORY_MB_RANGE`]: grouped values a reducer holds before it spills sorted runs to the output folder |
//! | `output` | required | a folder; or an object-store prefix (`s3://BUCKET/PREFIX/`, `gs://`, `az://`) the part files and then `_SUCCESS` are uploaded to when the job succeeds, staged until then in `.sluice-state/mapreduce-NAME` next to the pipeline file |
//! | `output_format` | `"jsonl"` | `"jsonl"` or `"parquet"` |
//!
//! # State: `state = { ... }`
//!
//! On a Kafka trigger or a backfill job, `state` makes sluice carry the
//! state each call returns into the next call of the same partition or key
//! (Lambda's tumbling-window contract; see `sluice-state-carrier`).
//!
//! | field | default | allowed |
//! |---|---|---|
//! | `scope` | `"partition"` | `"partition"` (one state per partition; per job in a backfill) or `"key"` (per record key; per `order_key` value) |
//! | `window` | none: never closes on Kafka, closes at the end of a backfill | a duration in [`STATE_WINDOW_RANGE`] (event-time tumbling windows) or a count in [`STATE_WINDOW_COUNT_RANGE`] |
//! | `max_bytes` | [`DEFAULT_STATE_MAX_BYTES`] | [`STATE_MAX_BYTES_RANGE`]: a larger state ends its window early |
//! | `store` | `"local"` | `"local"` (checkpoint files) or `"kafka"` (a compacted changelog topic, for scale-out) |
//! | `dir` | `.sluice-state/NAME` next to the pipeline file | a folder (`store = "local"` only) |
//! | `changelog_topic` | `sluice-state-NAME` | a topic (`store = "kafka"` only) |
//!
//! A stateful trigger cannot be `exactly_once`, nor bisect or report batch
//! item failures; the partition scope needs `parallelization_factor = 1`.
//!
//! Any other key or section, at any level, is an error. Fields inside a `[[trigger.kafka]]` table
//! are named `trigger.kafka[I].FIELD` in messages, with `I` counting from 0.
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
pub mod filter;
pub mod package;
mod raw;
pub use raw::check_name;
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
/// Default `vcpus`: one vCPU per microVM (Firecracker's default).
pub const DEFAULT_VCPUS: u32 = 1;
/// Allowed `vcpus` (Firecracker's limit).
pub const VCPUS_RANGE: RangeInclusive<u32> = 1..=32;
/// Default `min_warm`: no sandbox is kept ready before the first call.
pub const DEFAULT_MIN_WARM: u32 = 0;
/// Allowed `min_warm` and `max_warm` (also bounded by `concurrency`).
pub const WARM_RANGE: RangeInclusive<u32> = 0..=1000;
/// Default `prewarm`: start sandboxes ahead of periodic bursts.
pub const DEFAULT_PREWARM: bool = true;
/// Default `snapshot`: microVM cold starts restore a snapshot of the
/// function's initialised VM (the process backend ignores it).
pub const DEFAULT_SNAPSHOT: bool = true;
/// Default `pin_cpu`: sandboxes run on any CPU, moved by the scheduler.
pub const DEFAULT_PIN_CPU: bool = false;
/// Most `layers` a function may have (Lambda's limit).
pub const MAX_LAYERS: usize = 5;

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

/// Default `max_items_per_call` of a backfill job.
pub const DEFAULT_MAX_ITEMS_PER_CALL: u32 = 100;
/// Allowed `max_items_per_call`.
pub const MAX_ITEMS_PER_CALL_RANGE: RangeInclusive<u32> = 1..=100_000;
/// Default `max_bytes_per_call`: Lambda's 6 MB payload limit, less room for
/// the call's envelope.
pub const DEFAULT_MAX_BYTES_PER_CALL: usize = 6_000_000;
/// Allowed `max_bytes_per_call`.
pub const MAX_BYTES_PER_CALL_RANGE: RangeInclusive<usize> = 1..=6_000_000;
/// Default `max_buffered_items` of a backfill job with `order_key` or
/// dependencies: 100 000 items (about 100 MB of 1 KB items), room for a
/// partial call of 100 items for each of 1 000 keys.
pub const DEFAULT_MAX_BUFFERED_ITEMS: usize = 100_000;
/// Allowed `max_buffered_items`.
pub const MAX_BUFFERED_ITEMS_RANGE: RangeInclusive<usize> = 1..=100_000_000;

/// Where a Kafka trigger's failed records go (`on_failure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnFailure {
    /// A Kafka topic (of the trigger's cluster): one record per failed
    /// record, with the failure in its headers.
    Topic(String),
    /// An object store prefix, a URL of [`OBJECT_URL_SCHEMES`], or an
    /// absolute local folder (`file://` URLs become one): one JSON object
    /// per failed batch and partition, Lambda's invocation record for an S3
    /// on-failure destination, the event it was called with included.
    Objects(String),
}

impl OnFailure {
    /// The topic, if it is one.
    pub fn topic(&self) -> Option<&str> {
        match self {
            OnFailure::Topic(t) => Some(t),
            OnFailure::Objects(_) => None,
        }
    }
}

impl std::fmt::Display for OnFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnFailure::Topic(t) => f.write_str(t),
            OnFailure::Objects(u) => f.write_str(u),
        }
    }
}

/// Allowed `max_items` of a backfill job: 1 to 100,000,000 (Distributed
/// Map's `MaxItems` limit).
pub const MAX_ITEMS_RANGE: RangeInclusive<u32> = 1..=100_000_000;
/// Default `reduce_partitions` of a MapReduce job.
pub const DEFAULT_REDUCE_PARTITIONS: u32 = 4;
/// Allowed `reduce_partitions`.
pub const REDUCE_PARTITIONS_RANGE: RangeInclusive<u32> = 1..=256;
/// Default `groups_per_call` of a MapReduce job's reduce calls.
pub const DEFAULT_GROUPS_PER_CALL: u32 = 1000;
/// Default `reduce_memory_mb`: what a reducer holds before spilling.
pub const DEFAULT_REDUCE_MEMORY_MB: u32 = 256;
/// Allowed `reduce_memory_mb`.
pub const REDUCE_MEMORY_MB_RANGE: RangeInclusive<u32> = 1..=1_048_576;

/// Default `max_attempts` of a backfill call (for retryable errors).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Allowed `max_attempts`.
pub const MAX_ATTEMPTS_RANGE: RangeInclusive<u32> = 1..=100;

/// `bootstrap_servers` value selecting the in-process broker (the default).
pub const EMBEDDED_BOOTSTRAP_SERVERS: &str = "embedded";
/// Prefix of the default `group_id`, which is `sluice-FUNCTION`.
pub const DEFAULT_GROUP_ID_PREFIX: &str = "sluice-";
/// Default `batch_size`: records per invocation, as in Lambda.
pub const DEFAULT_BATCH_SIZE: u32 = 100;
/// Allowed `batch_size` (Lambda's limit for Kafka).
pub const BATCH_SIZE_RANGE: RangeInclusive<u32> = 1..=10_000;
/// Default `batch_window`: how long to gather records before invoking.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(500);
/// Allowed `batch_window`: 0 (invoke as soon as records arrive) to 300 seconds.
pub const BATCH_WINDOW_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(300);
/// Default `max_batch_bytes`: Lambda's 6 MB invocation payload limit.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 6_291_456;
/// Allowed `max_batch_bytes`.
pub const MAX_BATCH_BYTES_RANGE: RangeInclusive<usize> = 1..=6_291_456;
/// Allowed finite `max_retry_attempts`; `-1` (the default) means no limit.
pub const MAX_RETRY_ATTEMPTS_RANGE: RangeInclusive<u32> = 0..=10_000;
/// Allowed `max_record_age`: 1 second to 7 days. Absent means no limit.
pub const MAX_RECORD_AGE_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);
/// Default `parallelization_factor`: one concurrent batch per partition.
pub const DEFAULT_PARALLELIZATION_FACTOR: u32 = 1;
/// Allowed `parallelization_factor` (Lambda's limit).
pub const PARALLELIZATION_FACTOR_RANGE: RangeInclusive<u32> = 1..=10;
/// Default `retry_backoff`: the delay before the first retry of a batch.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Allowed `retry_backoff`.
pub const RETRY_BACKOFF_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(300);
/// Default `retry_backoff_max`: the longest delay between retries.
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest allowed `retry_backoff_max`; the smallest is `retry_backoff`.
pub const RETRY_BACKOFF_MAX_LIMIT: Duration = Duration::from_secs(900);
/// Default `partitions` of the topics the embedded broker creates.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Allowed `partitions`.
pub const PARTITIONS_RANGE: RangeInclusive<i32> = 1..=1000;

/// librdkafka properties a trigger's `properties` may not set, because
/// sluice sets them itself, with what to do instead.
pub const MANAGED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "bootstrap.servers",
        "use the trigger's `bootstrap_servers` instead",
    ),
    (
        "metadata.broker.list",
        "use the trigger's `bootstrap_servers` instead",
    ),
    ("group.id", "use the trigger's `group_id` instead"),
    (
        "enable.auto.commit",
        "sluice commits offsets itself once a batch is processed",
    ),
    (
        "enable.auto.offset.store",
        "sluice stores offsets itself once a batch is processed",
    ),
    (
        "auto.offset.reset",
        "use the trigger's `starting_position` instead",
    ),
    (
        "isolation.level",
        "sluice reads only committed records (read_committed)",
    ),
    (
        "transactional.id",
        "set the trigger's `exactly_once = true` (with an `output_topic`) instead",
    ),
];

/// A validated pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// The pipeline file, as given by the caller.
    pub file: PathBuf,
    /// The declared functions, by name.
    pub functions: BTreeMap<String, FunctionConfig>,
    /// The `[[trigger.kafka]]` tables, in file order.
    pub kafka_triggers: Vec<KafkaTrigger>,
    /// The `[[trigger.object_store]]` tables, in file order.
    pub object_triggers: Vec<ObjectTrigger>,
    /// The `[job.NAME]` tables of kind `"backfill"` (the default), by name.
    pub jobs: BTreeMap<String, BackfillJob>,
    /// The `[job.NAME]` tables of kind `"mapreduce"`, by name.
    pub mapreduce_jobs: BTreeMap<String, MapReduceJob>,
}

/// What a MapReduce job's reducers write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutputFormat {
    /// `part-NNNNN.jsonl`: `{"key": ..., "value": ...}` per line (the
    /// default).
    #[default]
    Jsonl,
    /// `part-NNNNN.parquet`: columns `key` and `value` (a struct when the
    /// values are objects), the schema inferred from the records.
    Parquet,
}

/// One validated `[job.NAME]` table of kind `"mapreduce"`, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapReduceJob {
    /// The job's name.
    pub name: String,
    /// Input paths, globs or URLs (relative ones joined to the pipeline
    /// file's folder).
    pub sources: Vec<String>,
    /// Input format; `None`: from the first source's extension.
    pub format: Option<DataFormat>,
    /// Columns kept; `None`: all.
    pub columns: Option<Vec<String>>,
    /// CSV delimiter. Default `b','`.
    pub csv_delimiter: u8,
    /// Column names of CSV files without a header line; `None` (the
    /// default): each file's first line is its header.
    pub csv_headers: Option<Vec<String>>,
    /// Function called with each split (a backfill-style call); answers
    /// `{"records": [{"key": "...", "value": ...}, ...]}`.
    pub map: String,
    /// Function called with a map task's output grouped by key before the
    /// shuffle (the reduce contract); default none.
    pub combine: Option<String>,
    /// Function called with groups `{"groups": [{"key", "values"}]}`;
    /// answers `{"records": [{"key", "value"}]}`.
    pub reduce: String,
    /// Reducers = partitions of the shuffle topic. Default
    /// [`DEFAULT_REDUCE_PARTITIONS`].
    pub reduce_partitions: u32,
    /// Key groups per reduce call. Default [`DEFAULT_GROUPS_PER_CALL`].
    pub groups_per_call: u32,
    /// MiB of grouped values a reducer holds before spilling sorted runs to
    /// disk. Default [`DEFAULT_REDUCE_MEMORY_MB`].
    pub reduce_memory_mb: u32,
    /// Items per map split. Default [`DEFAULT_MAX_ITEMS_PER_CALL`].
    pub max_items_per_call: u32,
    /// Calls in flight; `None`: the map function's concurrency.
    pub max_concurrency: Option<u32>,
    /// Attempts per call. Default [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// Output folder: `part-NNNNN.jsonl` per reducer. With
    /// [`output_url`](Self::output_url), the local folder the output is
    /// staged in.
    pub output: PathBuf,
    /// The object-store prefix (`s3://BUCKET/PREFIX`, no trailing `/`) the
    /// output goes to when the job succeeds, if `output` named one.
    pub output_url: Option<String>,
    /// The shuffle's Kafka cluster. Default embedded.
    pub bootstrap_servers: BootstrapServers,
    /// Extra librdkafka properties (security, SASL) for an external
    /// cluster, checked by librdkafka at load. Default empty.
    pub properties: BTreeMap<String, String>,
    /// How map calls carry their items. Default [`PayloadFormat::Json`].
    pub payload: PayloadFormat,
    /// Stage a columnar payload as a file the event names. Default false.
    pub payload_file: bool,
    /// Compression of Arrow payloads. Default [`ArrowCompression::None`].
    pub arrow_compression: ArrowCompression,
    /// What the reducers write. Default [`OutputFormat::Jsonl`].
    pub output_format: OutputFormat,
    /// Only the first this many items (file then row order) are mapped: a
    /// sample. Default none: all.
    pub max_items: Option<u64>,
    /// With `format = "json"`: the JSON pointer of the array of items.
    /// Default none: the document's top level.
    pub items_pointer: Option<String>,
}

/// Input format of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataFormat {
    /// Apache Parquet: each row is a JSON object.
    Parquet,
    /// CSV with a header line: each record is an object of strings.
    Csv,
    /// JSON lines: each non-blank line is a JSON value.
    Jsonl,
    /// A JSON document holding an array: each element is an item (Step
    /// Functions Distributed Map's JSON item reader), the array at the top
    /// or at `items_pointer`. A document that does not start with `[` (and
    /// no `items_pointer`) is read as JSON lines, so `.json` files of
    /// either kind work.
    Json,
    /// Text: each line is a JSON string.
    Text,
    /// Apache Avro object container files (Kafka Connect's and Hadoop's
    /// files): each record is an item, as JSON (see `taskgen`'s reader).
    Avro,
    /// Objects: each file or object is one item, called one at a time with
    /// its bytes staged as a file in the sandbox (Step Functions Distributed
    /// Map's S3 object listing, Lithops' map over a bucket). Never implied
    /// by an extension.
    Objects,
}

impl DataFormat {
    /// The name used in files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
            Self::Json => "json",
            Self::Text => "text",
            Self::Avro => "avro",
            Self::Objects => "objects",
        }
    }

    /// The format a file name's extension suggests (`.parquet`, `.csv`,
    /// `.tsv`, `.jsonl`/`.ndjson`, `.json`, `.txt`/`.log`, `.avro`), ignoring a
    /// trailing glob and a compression extension after it (`.gz`, `.zst`).
    pub fn from_extension(path: &str) -> Option<Self> {
        // `orders.jsonl.gz`: the format is the extension before the
        // compression's.
        let lower = path.to_ascii_lowercase();
        let name = [".gz", ".gzip", ".zst", ".zstd"]
            .iter()
            .find_map(|c| lower.strip_suffix(c))
            .unwrap_or(&lower);
        let ext = name.rsplit_once('.')?.1;
        match ext {
            "parquet" | "pq" => Some(Self::Parquet),
            "csv" | "tsv" => Some(Self::Csv),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            "json" => Some(Self::Json),
            "txt" | "text" | "log" => Some(Self::Text),
            "avro" => Some(Self::Avro),
            _ => None,
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "parquet" => Ok(Self::Parquet),
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "json" => Ok(Self::Json),
            "text" | "txt" => Ok(Self::Text),
            "avro" => Ok(Self::Avro),
            "objects" => Ok(Self::Objects),
            other => Err(format!(
                "unknown format {other:?} (known: parquet, csv, jsonl, json, text, avro, objects)"
            )),
        }
    }
}

/// How a backfill call carries its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PayloadFormat {
    /// `{"items": [...], "batch": {...}}`, one JSON value per item (the
    /// default).
    #[default]
    Json,
    /// `{"arrow": "<base64 Arrow IPC stream>", "batch": {...}}`: the rows as
    /// Arrow record batches, for heavy map-style functions (Parquet sources).
    Arrow,
    /// `{"parquet": "<base64 Parquet file>", "batch": {...}}`: whole row
    /// groups of a Parquet source, only the chosen columns, their column
    /// chunks copied byte for byte (the host decodes nothing; calls are
    /// row-group aligned).
    Parquet,
}

impl PayloadFormat {
    /// The name a pipeline file uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Arrow => "arrow",
            Self::Parquet => "parquet",
        }
    }

    /// Whether calls carry a Parquet source's rows in a columnar format
    /// (Arrow or Parquet), which needs Parquet sources and is cut by row
    /// count rather than by item.
    pub fn is_columnar(self) -> bool {
        self != Self::Json
    }
}

impl std::str::FromStr for PayloadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "arrow" => Ok(Self::Arrow),
            "parquet" => Ok(Self::Parquet),
            other => Err(format!(
                "unknown payload {other:?} (known: json, arrow, parquet)"
            )),
        }
    }
}

/// How the record batches of an Arrow payload are compressed (Arrow IPC's
/// own buffer compression, which pyarrow and arrow-rs with its `lz4` or
/// `zstd` feature read transparently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ArrowCompression {
    /// Uncompressed buffers (the default): any Arrow reader takes them.
    #[default]
    None,
    /// LZ4 frames: cheap to write and read, and the buffers of decimals and
    /// small integers shrink several times, so the call's bytes are copied,
    /// base64-encoded and parsed that much less (about twice as fast end to
    /// end in `sluice bench mapreduce`).
    Lz4,
    /// Zstandard: smaller than LZ4, slower to write.
    Zstd,
}

impl std::str::FromStr for ArrowCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown Arrow compression {other:?} (known: none, lz4, zstd)"
            )),
        }
    }
}

/// One validated `[job.NAME]` table of kind `"backfill"`, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillJob {
    /// The job's name (`[A-Za-z0-9_-]{1,64}`).
    pub name: String,
    /// The function called with the items; a declared function.
    pub function: String,
    /// Paths, globs or URLs; relative paths already joined to the pipeline
    /// file's folder.
    pub sources: Vec<String>,
    /// Input format; `None`: from the first source's extension.
    pub format: Option<DataFormat>,
    /// Columns (fields) kept in each item; `None`: all.
    pub columns: Option<Vec<String>>,
    /// CSV field delimiter. Default `b','`.
    pub csv_delimiter: u8,
    /// Column names of CSV files without a header line; `None` (the
    /// default): each file's first line is its header.
    pub csv_headers: Option<Vec<String>>,
    /// Items per call. Default [`DEFAULT_MAX_ITEMS_PER_CALL`].
    pub max_items_per_call: u32,
    /// Bytes of items (as JSON) per call. Default [`DEFAULT_MAX_BYTES_PER_CALL`].
    pub max_bytes_per_call: usize,
    /// Calls in flight; `None`: the function's `concurrency`.
    pub max_concurrency: Option<u32>,
    /// Attempts per call. Default [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// Failed calls tolerated before the job stops. Default none.
    pub tolerated_failure_count: Option<u64>,
    /// Failed items tolerated, in percent of all items. Default none.
    pub tolerated_failure_percentage: Option<f64>,
    /// Items with the same value of this field run in order.
    pub order_key: Option<String>,
    /// Field holding each item's id (with `depends_on_column`).
    pub id_column: Option<String>,
    /// Field naming the ids an item depends on (with `id_column`).
    pub depends_on_column: Option<String>,
    /// With `order_key` or dependencies: items the scheduler may hold.
    /// Default [`DEFAULT_MAX_BUFFERED_ITEMS`].
    pub max_buffered_items: usize,
    /// Progress database; `None`: derived from the sources.
    pub progress: Option<PathBuf>,
    /// Dead-letter file; `None`: next to the progress database.
    pub dead_letter: Option<PathBuf>,
    /// JSON-lines file of each successful call's response; `None` (the
    /// default): responses are not kept.
    pub results: Option<PathBuf>,
    /// The Kafka cluster of `--distributed` runs. Default embedded.
    pub bootstrap_servers: BootstrapServers,
    /// Extra librdkafka properties (security, SASL) for an external
    /// cluster, checked by librdkafka at load. Default empty.
    pub properties: BTreeMap<String, String>,
    /// How calls carry their items. Default [`PayloadFormat::Json`].
    pub payload: PayloadFormat,
    /// Stage a columnar payload as a file the event names. Default false.
    pub payload_file: bool,
    /// Compression of Arrow payloads. Default [`ArrowCompression::None`].
    pub arrow_compression: ArrowCompression,
    /// `(files, after)`: files matching the glob `files` start only once
    /// the files matching every glob of `after` fully succeeded. Globs with
    /// a `/` are paths (relative ones joined to the pipeline file's folder),
    /// the others match file names. Default none.
    pub file_dependencies: Vec<(String, Vec<String>)>,
    /// State carried from call to call, in item order. Default none.
    pub state: Option<StateConfig>,
    /// A JSON object added to every call's event as `"batch_input"` (Step
    /// Functions Distributed Map's `ItemBatcher.BatchInput`), at most
    /// [`MAX_BATCH_INPUT_BYTES`] as compact JSON. Default none.
    pub batch_input: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only the first this many items (file then row order) are called, as
    /// Distributed Map's `MaxItems`: a sample. Default none: all.
    pub max_items: Option<u64>,
    /// With `format = "objects"`: larger objects are not fetched (they are
    /// dead-lettered). Default [`DEFAULT_MAX_OBJECT_BYTES`].
    pub max_object_bytes: u64,
    /// With `format = "json"`: the JSON pointer of the array of items.
    /// Default none: the document's top level.
    pub items_pointer: Option<String>,
}

/// The largest `batch_input`, as compact JSON: 64 KiB, so that an event of
/// `max_bytes_per_call` items and its `batch_input` stays within the 6 MiB
/// invoke payload.
pub const MAX_BATCH_INPUT_BYTES: usize = 64 * 1024;

/// `state = { ... }` of a Kafka trigger or a backfill job: the state each
/// call returns is passed into the next call of the same partition or key
/// (Lambda's tumbling-window contract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// What one state belongs to. Default [`StateScope::Partition`].
    pub scope: StateScope,
    /// Tumbling window; `None` (the default): one window that never closes
    /// on Kafka, and closes at the end of the input in a backfill.
    pub window: Option<StateWindow>,
    /// A state larger than this (as JSON) ends its window early. Default
    /// [`DEFAULT_STATE_MAX_BYTES`] (Lambda's 1 MB).
    pub max_bytes: usize,
    /// Where checkpoints go. Default [`StateStore::Local`] under
    /// `.sluice-state/` next to the pipeline file.
    pub store: StateStore,
}

/// What one state belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StateScope {
    /// One state per Kafka partition (per backfill job).
    #[default]
    Partition,
    /// One state per record key (per value of the job's `order_key`).
    Key,
}

/// A tumbling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateWindow {
    /// Fixed intervals of event time (the record timestamp), aligned to
    /// the Unix epoch, e.g. `window = "30s"`.
    Time(Duration),
    /// Every N items, e.g. `window = 100`.
    Count(u64),
}

/// Where checkpoints of state are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StateStore {
    /// Checkpoint files in this folder (`store = "local"`, the default):
    /// one per partition, replaced atomically.
    Local(PathBuf),
    /// A compacted Kafka topic on the trigger's cluster (`store = "kafka"`),
    /// so that a node taking over a partition restores its state.
    Changelog(String),
}

/// Default of [`StateConfig::max_bytes`]: Lambda's 1 MB.
pub const DEFAULT_STATE_MAX_BYTES: usize = 1024 * 1024;
/// Allowed [`StateConfig::max_bytes`].
pub const STATE_MAX_BYTES_RANGE: RangeInclusive<usize> = 2..=16 * 1024 * 1024;
/// Allowed time windows.
pub const STATE_WINDOW_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(7 * 24 * 3600);
/// Allowed count windows.
pub const STATE_WINDOW_COUNT_RANGE: RangeInclusive<u64> = 1..=100_000_000;
/// Folder of local checkpoints, next to the pipeline file.
pub const DEFAULT_STATE_DIR: &str = ".sluice-state";

/// One validated `[[trigger.kafka]]` table, with defaults applied: Lambda's
/// Kafka event source mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTrigger {
    /// Unique name. Default `FUNCTION-N`, N being the trigger's position among
    /// the Kafka triggers, from 1.
    pub name: String,
    /// The function invoked with each batch; a declared function.
    pub function: String,
    /// Topics consumed; non-empty, no duplicates.
    pub topics: Vec<String>,
    /// The Kafka cluster. Default [`BootstrapServers::Embedded`].
    pub bootstrap_servers: BootstrapServers,
    /// Consumer group. Default `sluice-FUNCTION` (see [`DEFAULT_GROUP_ID_PREFIX`]).
    pub group_id: String,
    /// Where a new consumer group starts reading. Default
    /// [`StartingPosition::Latest`].
    pub starting_position: StartingPosition,
    /// Most records per invocation. Default [`DEFAULT_BATCH_SIZE`].
    pub batch_size: u32,
    /// Longest time to gather records before invoking. Default
    /// [`DEFAULT_BATCH_WINDOW`].
    pub batch_window: Duration,
    /// Largest batch payload, in bytes. Default [`DEFAULT_MAX_BATCH_BYTES`].
    pub max_batch_bytes: usize,
    /// Records that do not match are skipped (and committed). Default none:
    /// every record is delivered.
    pub filter: Option<filter::Pattern>,
    /// Retries of a failed batch; `None` (the default, `-1` in the file)
    /// retries until the record expires (`max_record_age`) or forever.
    pub max_retry_attempts: Option<u32>,
    /// Records older than this are not retried. Default `None`: no limit.
    pub max_record_age: Option<Duration>,
    /// Split a failed batch in two and retry the halves. Default `false`.
    pub bisect_batch_on_error: bool,
    /// The function may report the records that failed
    /// (`batchItemFailures`). Default `false`.
    pub report_batch_item_failures: bool,
    /// Where records that exhaust their retries go. Default none.
    pub on_failure: Option<OnFailure>,
    /// Topic receiving the function's responses. Default none.
    pub output_topic: Option<String>,
    /// Concurrent batches per partition. Default
    /// [`DEFAULT_PARALLELIZATION_FACTOR`].
    pub parallelization_factor: u32,
    /// Produce to `output_topic` and commit offsets in one Kafka transaction.
    /// Default `false`; `true` implies `output_topic` is set.
    pub exactly_once: bool,
    /// Delay before the first retry. Default [`DEFAULT_RETRY_BACKOFF`].
    pub retry_backoff: Duration,
    /// Longest delay between retries; at least `retry_backoff`. Default
    /// [`DEFAULT_RETRY_BACKOFF_MAX`].
    pub retry_backoff_max: Duration,
    /// Partitions of the topics the embedded broker creates. Default
    /// [`DEFAULT_PARTITIONS`]. Ignored with [`BootstrapServers::Servers`]:
    /// an external cluster's topics keep the partitions they were created
    /// with (so a pipeline can switch clusters by changing only
    /// `bootstrap_servers`).
    pub partitions: i32,
    /// Extra librdkafka properties, passed through verbatim; none of
    /// [`MANAGED_KAFKA_PROPERTIES`]. Default empty.
    pub properties: BTreeMap<String, String>,
    /// State carried from call to call. Default none (stateless).
    pub state: Option<StateConfig>,
    /// Whether `sluice run` runs it without being asked by name
    /// (`--trigger`). Default `true`.
    pub enabled: bool,
}

/// Default `poll_interval` of an object-store trigger: how often the prefix
/// is listed.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Allowed `poll_interval`.
pub const POLL_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// Default `max_object_bytes`: larger objects are not fetched; they go to
/// the dead-letter file.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 * 1024 * 1024;
/// Allowed `max_object_bytes` (the sandbox's attachment limit).
pub const MAX_OBJECT_BYTES_RANGE: RangeInclusive<u64> = 1..=128 * 1024 * 1024;
/// Default `max_retry_attempts` of an object-store trigger: Lambda's for
/// asynchronous invocations (S3 notifications).
pub const DEFAULT_OBJECT_RETRY_ATTEMPTS: u32 = 2;
/// URL schemes an object-store trigger can watch (`file://` URLs and plain
/// paths are local folders).
pub const OBJECT_URL_SCHEMES: &[&str] = &[
    "memory", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl",
];

/// One validated `[[trigger.object_store]]` table, with defaults applied:
/// Lambda's S3 trigger, by polling. Every object that appears under `url`
/// (or is overwritten) invokes `function` once, with an S3 event
/// notification as the event and the object's bytes staged in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectTrigger {
    /// Unique name. Default `FUNCTION-objects-N`, N being the trigger's
    /// position among the object-store triggers, from 1.
    pub name: String,
    /// The function invoked with each object; a declared function.
    pub function: String,
    /// The watched prefix: a URL of one of [`OBJECT_URL_SCHEMES`]
    /// (`s3://bucket/incoming/`), or an absolute local folder (relative
    /// paths and `file://` URLs are turned into one).
    pub url: String,
    /// Only objects whose name ends with this. Default none: every object
    /// (names starting with `.` are always left out).
    pub suffix: Option<String>,
    /// Which S3 event types invoke the function. Default: objects created
    /// (written) only.
    pub events: ObjectEvents,
    /// Which objects already there when the trigger first runs are
    /// processed: none ([`StartingPosition::Latest`], the default), all
    /// (`Earliest`), or those modified at or after a time (`Timestamp`).
    pub starting_position: StartingPosition,
    /// How often the prefix is listed, at most (the next listing waits until
    /// the last one's objects are all started). Default
    /// [`DEFAULT_POLL_INTERVAL`].
    pub poll_interval: Duration,
    /// Largest object fetched. Default [`DEFAULT_MAX_OBJECT_BYTES`].
    pub max_object_bytes: u64,
    /// Retries of a failed invocation. Default
    /// [`DEFAULT_OBJECT_RETRY_ATTEMPTS`].
    pub max_retry_attempts: u32,
    /// Delay before the first retry. Default [`DEFAULT_RETRY_BACKOFF`].
    pub retry_backoff: Duration,
    /// Longest delay between retries. Default [`DEFAULT_RETRY_BACKOFF_MAX`].
    pub retry_backoff_max: Duration,
    /// The store of the objects handled (redb). Default
    /// `.sluice-state/NAME.objects.redb` next to the pipeline file.
    pub progress: PathBuf,
    /// JSON lines receiving the objects whose invocations failed for good.
    /// Default `.sluice-state/NAME.dead-letter.jsonl` next to the pipeline
    /// file.
    pub dead_letter: PathBuf,
    /// JSON-lines file of each successful call's response; `None` (the
    /// default): responses are not kept.
    pub results: Option<PathBuf>,
    /// Whether `sluice run` runs it without being asked by name
    /// (`--trigger`). Default `true`.
    pub enabled: bool,
}

/// The S3 event types an object-store trigger invokes its function with
/// (`events = ["created", "removed"]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectEvents {
    /// `ObjectCreated:Put`: an object written (new, or written again).
    pub created: bool,
    /// `ObjectRemoved:Delete`: an object handled before is no longer
    /// listed.
    pub removed: bool,
}

impl ObjectEvents {
    /// What calls the function, for messages: "objects" (written),
    /// "objects written and deleted" or "objects deleted".
    pub fn what(&self) -> &'static str {
        match (self.created, self.removed) {
            (true, false) => "objects",
            (true, true) => "objects written and deleted",
            _ => "objects deleted",
        }
    }
}

impl Default for ObjectEvents {
    fn default() -> Self {
        Self {
            created: true,
            removed: false,
        }
    }
}

/// The Kafka cluster a trigger reads from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum BootstrapServers {
    /// The in-process broker (`"embedded"`). The default.
    #[default]
    Embedded,
    /// An external cluster: `host:port[,host:port...]`, as librdkafka's
    /// `bootstrap.servers` (whitespace around commas removed).
    Servers(String),
}

impl fmt::Display for BootstrapServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => f.write_str(EMBEDDED_BOOTSTRAP_SERVERS),
            Self::Servers(servers) => f.write_str(servers),
        }
    }
}

/// Where a new consumer group starts reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum StartingPosition {
    /// The oldest record still in the partition (`"earliest"`).
    Earliest,
    /// Only records produced from now on (`"latest"`). The default.
    #[default]
    Latest,
    /// The first record at or after this time, in milliseconds since the
    /// Unix epoch (an RFC 3339 timestamp in the file).
    Timestamp(i64),
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
    /// vCPUs of a microVM sandbox. Default [`DEFAULT_VCPUS`].
    pub vcpus: u32,
    /// Idle sandboxes kept ready. Default [`DEFAULT_MIN_WARM`].
    pub min_warm: u32,
    /// Most idle sandboxes kept. Default `concurrency`.
    pub max_warm: u32,
    /// Pre-warm ahead of periodic bursts. Default [`DEFAULT_PREWARM`].
    pub prewarm: bool,
    /// Restore microVM cold starts from a function snapshot. Default
    /// [`DEFAULT_SNAPSHOT`].
    pub snapshot: bool,
    /// Run each process sandbox on one CPU. Default [`DEFAULT_PIN_CPU`].
    pub pin_cpu: bool,
    /// Layer folders (Lambda layers), canonical, in the order written: the
    /// sandbox sees them merged read-only at `/opt`, a later layer's files
    /// over an earlier one's. Default none; at most [`MAX_LAYERS`].
    pub layers: Vec<PathBuf>,
}

impl FunctionConfig {
    /// The host path of the runtime's entry point: `bootstrap` in the
    /// function folder, else in the topmost layer that has one (a custom
    /// runtime shipped as a layer, at `/opt/bootstrap` in the sandbox).
    pub fn bootstrap(&self) -> PathBuf {
        let own = self.path.join("bootstrap");
        if own.symlink_metadata().is_ok() {
            return own;
        }
        self.layers
            .iter()
            .rev()
            .map(|layer| layer.join("bootstrap"))
            .find(|b| b.symlink_metadata().is_ok())
            .unwrap_or(own)
    }
}

/// Which sandbox runs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// Let sluice choose (`"auto"`). The default.
    #[default]
    Auto,
    /// Sandboxed processes (`"process"`).
    Process,
    /// MicroVMs (`"microvm"`): needs hardware KVM and a guest image;
    /// `sluice` refuses to start without them.
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
        let d = raw::parse(text, file)?;
        Ok(Pipeline {
            file: file.to_path_buf(),
            functions: d.functions,
            kafka_triggers: d.kafka_triggers,
            object_triggers: d.object_triggers,
            jobs: d.jobs,
            mapreduce_jobs: d.mapreduce_jobs,
        })
    }

    /// Unpacks every function and layer given as a `.zip` archive into
    /// `cache` (once per archive content: see [`package::unpack`]), and
    /// points the function at the unpacked folders, so that what runs
    /// sees folders only. Folders are left as they are.
    pub fn unpack_packages(&mut self, cache: &Path) -> Result<(), PipelineError> {
        for f in self.functions.values_mut() {
            let field = |name: String| format!("functions.{}.{name}", f.name);
            let mut paths = std::iter::once((field("path".into()), &mut f.path)).chain(
                f.layers
                    .iter_mut()
                    .enumerate()
                    .map(|(i, layer)| (field(format!("layers[{i}]")), layer)),
            );
            paths.try_for_each(|(field, path)| {
                if package::is_archive(path) && path.is_file() {
                    *path =
                        package::unpack(path, cache).map_err(|source| PipelineError::Unpack {
                            file: self.file.clone(),
                            field,
                            source,
                        })?;
                }
                Ok::<_, PipelineError>(())
            })?;
        }
        Ok(())
    }

    /// The job called `name`; the error lists the declared jobs.
    pub fn job(&self, name: &str) -> Result<&BackfillJob, PipelineError> {
        self.jobs
            .get(name)
            .ok_or_else(|| PipelineError::UnknownJob {
                file: self.file.clone(),
                name: name.to_owned(),
                declared: self.jobs.keys().cloned().collect(),
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
