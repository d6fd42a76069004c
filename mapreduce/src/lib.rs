//! # sluice-mapreduce: MapReduce with a partitioned Kafka topic as the shuffle
//!
//! ```text
//!  data set ──splits──▶ map (+ combine) ──records──▶ shuffle topic, R partitions ──▶ reducer p
//!  (taskgen readers)    function calls      keyed by reduce key (partition =       groups by key,
//!                                           hash(key) mod R), then an end-of-map    calls reduce,
//!                                           marker per map task and partition       writes part-p
//! ```
//!
//! - **Splits** are cut exactly as `sluice backfill` cuts calls
//!   ([`sluice_taskgen::splits`]); each is one map call, retried while its
//!   error is retryable. The map function answers
//!   `{"records": [{"key": "...", "value": ...}, ...]}`.
//! - **Combine** (optional) gets the map output grouped by key, with the
//!   reduce contract, before anything is published.
//! - **Shuffle**: a topic per run (`sluice-mr-JOB-RUN`) with one partition
//!   per reducer. Records carry `(map task, attempt, key, value)`; after a
//!   task's records, an end-of-map marker `(task, attempt)` goes to every
//!   partition. A task whose publishing failed is published again with the
//!   next attempt number.
//! - **Reducers**, one per partition, consume from the start of their
//!   partition as soon as the job starts. A task's records count only once
//!   its marker arrived, and only for the first attempt marked, so a retried
//!   map task is never counted twice. A partition is complete when every map
//!   task's marker is in: the reducer then calls the reduce function with
//!   `{"groups": [{"key", "values": [...]}, ...]}`, up to `groups_per_call`
//!   groups in key order, and writes the records it answers to
//!   `part-PPPPP.jsonl` (`{"key": ..., "value": ...}` per line, written to a
//!   temporary name and renamed), readable by DuckDB and pandas.
//! - **Faults.** A map call that fails (the function's process crashed,
//!   timed out, answered an error) is retried with the same split while its
//!   error is retryable; only a successful call's records are published, so
//!   a crashed call leaves nothing in the shuffle. A reduce call is retried
//!   the same way with the same groups; its answer is written only once it
//!   succeeded.
//! - **Killed runs** ([`RunState`]). On an external cluster the run's
//!   state (its shuffle topic, the map tasks whose records and markers are
//!   acknowledged, the reducers whose part file is written) is saved to
//!   [`STATE_FILE`] in the output folder as the run goes. Running the same
//!   job again (same settings and inputs, topic still there) resumes it: done
//!   map tasks and reducers are skipped, the other reducers read their
//!   partition again from its start. Each resumption is a new *generation*,
//!   part of the attempt number on every record, so records a killed run
//!   published without their marker never count. A fresh run on an
//!   existing topic (`sluice mapreduce --shuffle-topic`) reads each
//!   partition from its end offset at the start ([`end_offsets`]), so
//!   earlier runs' records never count either. With the embedded broker
//!   the shuffle dies with the process, and a run always starts from
//!   scratch. A fresh run first removes the part, temporary and state files
//!   of earlier runs, so outputs never mix; a finished run leaves
//!   [`SUCCESS_FILE`].
//! - **Memory.** A reducer holds its groups in memory up to
//!   `reduce_memory_bytes` (keys and values sized as JSON), then writes them
//!   as a sorted run (`.spill-P-N.tmp`, one `[key, [values]]` JSON line per
//!   key) to the output folder and starts again; at the end the runs and
//!   what is in memory are merged in key order, each key's values in arrival
//!   order, so spilling never changes what the reduce function sees. (A map
//!   task's records wait in memory until its marker arrives.)
//! - **Object-store output** (`upload.rs`). With
//!   [`MapReduceConfig::output_url`], the output folder is a local staging
//!   folder; once every reducer is done the part files are uploaded under
//!   the prefix, an earlier run's leftovers there removed, and `_SUCCESS`
//!   put last. The state file goes only after that, so a run whose upload
//!   failed resumes (on an external cluster) with nothing left but the
//!   upload.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_executor::{Executor, Fault};
use sluice_ingest::kafka::LoggedContext;
use sluice_taskgen::distributed::KafkaSettings;
use sluice_taskgen::{BackfillError, Input, Limits, PayloadFormat};
use thiserror::Error;
use tokio::sync::{Semaphore, watch};

mod upload;

/// Why a MapReduce job failed.
#[derive(Debug, Error)]
pub enum MapReduceError {
    /// A setting is out of range (user).
    #[error("invalid option: {0}")]
    Config(String),
    /// The input could not be read (see the wrapped error's fault).
    #[error(transparent)]
    Input(#[from] BackfillError),
    /// The shuffle's Kafka cluster failed (external; a re-run may help).
    #[error("Kafka: {what}: {message}")]
    Kafka {
        /// What was being done.
        what: String,
        /// The client's message.
        message: String,
    },
    /// A map call failed after its retries (the function's fault).
    #[error("map call {split} failed after {attempts} attempts: {error}")]
    Map {
        /// The split's id.
        split: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// A reduce or combine call failed after its retries.
    #[error("{function} call for partition {partition} failed after {attempts} attempts: {error}")]
    Reduce {
        /// `reduce` or `combine`.
        function: &'static str,
        /// The shuffle partition.
        partition: i32,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// A function answered something that is not `{"records": [...]}`.
    #[error(
        "{function} answered {found}, not {{\"records\": [{{\"key\": ..., \"value\": ...}}, ...]}}"
    )]
    BadResponse {
        /// The function.
        function: String,
        /// The start of what it answered.
        found: String,
    },
    /// Unreadable input lines (the job does not run on partial input).
    #[error("{count} unreadable input lines, the first: {first}")]
    Unreadable {
        /// How many.
        count: usize,
        /// The first one, with `file:line`.
        first: String,
    },
    /// The output could not be written.
    #[error("{}: {source}", path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The output could not be uploaded to its object store (running the
    /// job again uploads it again).
    #[error("uploading the output to {url}: {message}")]
    Upload {
        /// The `output` prefix.
        url: String,
        /// What went wrong.
        message: String,
    },
}

impl MapReduceError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            MapReduceError::Input(e) => e.fault(),
            MapReduceError::Kafka { .. }
            | MapReduceError::Output { .. }
            | MapReduceError::Upload { .. } => Fault::External,
            MapReduceError::Config(_)
            | MapReduceError::Map { .. }
            | MapReduceError::Reduce { .. }
            | MapReduceError::BadResponse { .. }
            | MapReduceError::Unreadable { .. } => Fault::User,
        }
    }
}

/// A MapReduce job.
#[derive(Debug, Clone)]
pub struct MapReduceConfig {
    /// The job's name (part of the shuffle topic's name).
    pub job: String,
    /// Input files, in order.
    pub sources: Vec<PathBuf>,
    /// How to read them.
    pub input: Input,
    /// Items per map split.
    pub items_per_split: usize,
    /// Map function.
    pub map: String,
    /// Optional combine function.
    pub combine: Option<String>,
    /// Reduce function.
    pub reduce: String,
    /// Reducers (shuffle partitions).
    pub reduce_partitions: i32,
    /// Key groups per reduce call.
    pub groups_per_call: usize,
    /// Calls in flight (map calls; reduce calls per reducer run one at a time).
    pub max_concurrency: usize,
    /// Attempts per call for retryable errors.
    pub max_attempts: u32,
    /// Output folder (the staging folder with `output_url`).
    pub output: PathBuf,
    /// An object-store prefix (`s3://BUCKET/PREFIX`) the part files and
    /// `_SUCCESS` are uploaded to once every reducer is done.
    pub output_url: Option<String>,
    /// How map calls carry their items (Arrow for Parquet sources).
    pub payload: PayloadFormat,
    /// Stage a columnar payload as a file that the map call's event names
    /// (see `sluice_taskgen::BackfillConfig::payload_file`).
    pub payload_file: bool,
    /// What the reducers write.
    pub output_format: OutputFormat,
    /// Bytes of grouped values a reducer holds in memory (keys and values
    /// as JSON) before it sorts them and spills a run to disk.
    pub reduce_memory_bytes: usize,
}

/// The default of [`MapReduceConfig::reduce_memory_bytes`]: 256 MiB.
pub const DEFAULT_REDUCE_MEMORY_BYTES: usize = 256 << 20;

/// The file of a run's durable progress in the output folder.
pub const STATE_FILE: &str = ".sluice-mapreduce.json";
/// The file a successful run leaves in the output folder (as Hadoop does).
pub const SUCCESS_FILE: &str = "_SUCCESS";

/// A finished reducer, as the run state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReducerDone {
    /// Its part file.
    pub file: PathBuf,
    /// Keys reduced.
    pub keys: u64,
    /// Records written.
    pub records: u64,
}

/// A run's progress: its shuffle topic, and the map tasks and reducers
/// finished. Saved to [`STATE_FILE`] as the run goes when the shuffle is
/// durable (an external cluster), so that a killed run can be resumed on
/// the same topic; with an embedded broker the shuffle dies with the
/// process and a run always starts from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The shuffle topic.
    pub topic: String,
    /// Its cluster's bootstrap servers.
    pub servers: String,
    /// The job's settings and its inputs' sizes and times: a resumed run
    /// must be the same job.
    pub job: Value,
    /// Where the run's records start in each partition (the topic's end
    /// when the run started: records of earlier runs never count).
    pub start_offsets: Vec<i64>,
    /// 1 for a fresh run, +1 for each resumption; part of every record's
    /// attempt number, so records a killed run left without their marker
    /// are never matched with a later run's marker.
    pub generation: u32,
    /// Map tasks whose records and markers are all acknowledged.
    pub maps_done: std::collections::BTreeSet<u64>,
    /// Reducers whose part file is written.
    pub reducers_done: BTreeMap<i32, ReducerDone>,
    /// Whether to save this state as the run goes.
    #[serde(skip)]
    pub durable: bool,
}

impl RunState {
    /// A fresh run on `topic`, whose partitions it reads from
    /// `start_offsets` (missing ones: from the start; see [`end_offsets`]):
    /// removes the output folder's part files,
    /// temporary files, success marker and state of earlier runs (so that
    /// outputs of runs never mix), and saves the new state when `durable`.
    ///
    /// # Errors
    /// The output folder cannot be cleared or written.
    pub fn fresh(
        cfg: &MapReduceConfig,
        servers: &str,
        topic: &str,
        start_offsets: Vec<i64>,
        durable: bool,
    ) -> Result<RunState, MapReduceError> {
        std::fs::create_dir_all(&cfg.output).map_err(|source| MapReduceError::Output {
            path: cfg.output.clone(),
            source,
        })?;
        for entry in std::fs::read_dir(&cfg.output).map_err(|source| MapReduceError::Output {
            path: cfg.output.clone(),
            source,
        })? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("part-")
                || name.starts_with(".part-")
                || name.starts_with(".spill-")
                || name == SUCCESS_FILE
                || name == STATE_FILE
            {
                std::fs::remove_file(entry.path()).map_err(|source| MapReduceError::Output {
                    path: entry.path(),
                    source,
                })?;
            }
        }
        let state = RunState {
            topic: topic.to_owned(),
            servers: servers.to_owned(),
            job: fingerprint(cfg),
            start_offsets,
            generation: 1,
            maps_done: Default::default(),
            reducers_done: BTreeMap::new(),
            durable,
        };
        state.save(&cfg.output)?;
        Ok(state)
    }

    /// The saved state of an earlier run of this same job (same settings,
    /// inputs and cluster) that did not finish, if any.
    pub fn resumable(cfg: &MapReduceConfig, servers: &str) -> Option<RunState> {
        let text = std::fs::read(cfg.output.join(STATE_FILE)).ok()?;
        let state: RunState = serde_json::from_slice(&text).ok()?;
        (state.servers == servers && state.job == fingerprint(cfg)).then_some(state)
    }

    /// This state resumed: the next generation, saved.
    ///
    /// # Errors
    /// The state cannot be written.
    pub fn resume(mut self, cfg: &MapReduceConfig) -> Result<RunState, MapReduceError> {
        self.generation += 1;
        self.durable = true;
        self.reducers_done.retain(|_, r| r.file.is_file());
        // The killed run's temporary and spilled files are of no use.
        if let Ok(dir) = std::fs::read_dir(&cfg.output) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".part-") || name.starts_with(".spill-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        self.save(&cfg.output)?;
        Ok(self)
    }

    /// Writes the state (to a temporary name, then renamed) when durable.
    fn save(&self, output: &Path) -> Result<(), MapReduceError> {
        if !self.durable {
            return Ok(());
        }
        let path = output.join(STATE_FILE);
        let tmp = output.join(format!("{STATE_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(self).expect("the run state serializes");
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| MapReduceError::Output { path, source })
    }

    /// The attempt number of publishing attempt `attempt` in this run.
    fn attempt(&self, attempt: u32) -> u32 {
        self.generation
            .saturating_mul(1000)
            .saturating_add(attempt.min(999))
    }
}

/// What makes two runs the same job: settings, and each input's size and
/// modification time.
fn fingerprint(cfg: &MapReduceConfig) -> Value {
    let sources: Vec<Value> = cfg
        .sources
        .iter()
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            let modified = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string());
            json!([p, meta.map(|m| m.len()), modified])
        })
        .collect();
    json!({
        "sources": sources,
        "input": format!("{:?}", cfg.input),
        "items_per_split": cfg.items_per_split,
        "map": cfg.map,
        "combine": cfg.combine,
        "reduce": cfg.reduce,
        "reduce_partitions": cfg.reduce_partitions,
        "groups_per_call": cfg.groups_per_call,
        "payload": format!("{:?}", cfg.payload),
        "output_format": format!("{:?}", cfg.output_format),
    })
}

/// The run state shared by a run's tasks, saved as they finish.
struct Checkpoint {
    output: PathBuf,
    state: std::sync::Mutex<RunState>,
}

impl Checkpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn map_done(&self, task: u64) -> Result<(), MapReduceError> {
        let mut s = self.lock();
        s.maps_done.insert(task);
        s.save(&self.output)
    }

    fn reducer_done(&self, p: i32, done: ReducerDone) -> Result<(), MapReduceError> {
        let mut s = self.lock();
        s.reducers_done.insert(p, done);
        s.save(&self.output)
    }
}

/// Counters of a run, updated as it goes (for progress views).
#[derive(Debug, Default)]
pub struct Progress {
    /// Map splits read so far.
    pub splits: AtomicU64,
    /// Map tasks done (published with their markers).
    pub maps_done: AtomicU64,
    /// Records published to the shuffle.
    pub shuffle_records: AtomicU64,
    /// Reducers whose partition is complete and written.
    pub reducers_done: AtomicU64,
    /// Map calls retried, and map tasks published again.
    pub retries: AtomicU64,
    /// Set once every split has been read.
    pub splits_final: AtomicBool,
    /// Sorted runs reducers spilled to disk.
    pub spills: AtomicU64,
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Map tasks (splits).
    pub map_tasks: u64,
    /// Input items.
    pub items: u64,
    /// Records published to the shuffle.
    pub shuffle_records: u64,
    /// Distinct keys reduced.
    pub keys: u64,
    /// Records written.
    pub output_records: u64,
    /// Map and reduce calls retried.
    pub retries: u64,
    /// Sorted runs reducers spilled to disk (past `reduce_memory_bytes`).
    pub spills: u64,
    /// The output files, one per reducer.
    pub output_files: Vec<PathBuf>,
    /// With [`MapReduceConfig::output_url`]: the URLs they were uploaded
    /// to, in the same order.
    pub uploaded: Vec<String>,
    /// Map tasks and reducers an earlier, killed run of this job had
    /// finished (not run again).
    pub resumed: (u64, u64),
    /// Wall time.
    pub duration: Duration,
}

/// One shuffle record (Kafka value); markers have no key.
#[derive(Debug, Serialize, Deserialize)]
struct Shuffled {
    /// Map task (split number).
    t: u64,
    /// Publishing attempt of the task.
    a: u32,
    /// Reduce key; `None` for an end-of-map marker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    v: Value,
}

/// The bytes of a shuffle record: `key`'s `value` from map task `task`'s
/// publishing attempt `attempt`, or (without a key) the task's end-of-map
/// marker.
pub fn shuffle_record(task: u64, attempt: u32, key: Option<&str>, value: Value) -> Vec<u8> {
    serde_json::to_vec(&Shuffled {
        t: task,
        a: attempt,
        k: key.map(str::to_owned),
        v: value,
    })
    .expect("a shuffle record serializes")
}

/// Reads partition `p` of `topic` until `tasks` map tasks are marked, as a
/// reducer does, and returns the values by key.
///
/// # Errors
/// Kafka errors.
pub async fn collect(
    kafka: &KafkaSettings,
    topic: &str,
    p: i32,
    tasks: u64,
) -> Result<BTreeMap<String, Vec<Value>>, MapReduceError> {
    let consumer = partition_consumer(kafka, topic, p, None)?;
    let (_tx, total) = watch::channel(Some(tasks));
    let topic = topic.to_owned();
    let grouped = tokio::task::spawn_blocking(move || {
        let spill = Spill {
            budget: usize::MAX,
            dir: PathBuf::from("."),
            progress: None,
        };
        collect_partition(
            &consumer,
            &topic,
            p,
            &total,
            &AtomicBool::new(false),
            &spill,
        )
    })
    .await
    .map_err(|e| MapReduceError::Config(format!("collecting partition {p} panicked: {e}")))??;
    Ok(grouped.memory)
}

/// A consumer reading partition `p` of `topic` from its start.
fn partition_consumer(
    kafka: &KafkaSettings,
    topic: &str,
    p: i32,
    start: Option<i64>,
) -> Result<BaseConsumer<LoggedContext>, MapReduceError> {
    let context = LoggedContext::new(format!("reducer {p} consumer"), kafka.servers.as_str());
    let consumer: BaseConsumer<LoggedContext> = kafka
        .client()
        .set("group.id", format!("{topic}-reducer-{p}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A reducer waits on the last end-of-map markers: a broker that holds
        // an empty fetch for librdkafka's default 500 ms (the embedded one
        // does, even when records arrive meanwhile) would add that to every
        // job.
        .set("fetch.wait.max.ms", "10")
        // Offset 0 of a log that starts later (retention) means its start.
        .set("auto.offset.reset", "earliest")
        .create_with_context(context)
        .map_err(|e| kafka_err(format!("creating reducer {p}'s consumer"), e))?;
    let mut tpl = TopicPartitionList::new();
    // An explicit offset, not `Beginning`: librdkafka looks a logical offset
    // up with ListOffsets, and retries that only after 500 ms when the
    // partition's leader is not known yet, as on a topic just created.
    let offset = Offset::Offset(start.unwrap_or(0).max(0));
    tpl.add_partition_offset(topic, p, offset)
        .map_err(|e| kafka_err(format!("assigning partition {p}"), e))?;
    consumer
        .assign(&tpl)
        .map_err(|e| kafka_err(format!("assigning partition {p}"), e))?;
    Ok(consumer)
}

/// The shuffle topic of a run.
pub fn shuffle_topic(job: &str, run: u64) -> String {
    format!("sluice-mr-{job}-{run}")
}

/// The partition of `key`: FNV-1a, stable across processes and versions.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i32::try_from(h % u64::try_from(partitions.max(1)).unwrap_or(1)).unwrap_or(0)
}

fn kafka_err(what: impl Into<String>, e: impl std::fmt::Display) -> MapReduceError {
    MapReduceError::Kafka {
        what: what.into(),
        message: e.to_string(),
    }
}

/// `{"records": [{"key", "value"}, ...]}` from a function's response.
fn records(function: &str, payload: &[u8]) -> Result<Vec<(String, Value)>, MapReduceError> {
    let bad = || MapReduceError::BadResponse {
        function: function.to_owned(),
        found: if payload.len() > 120 {
            format!(
                "{}… ({} bytes)",
                String::from_utf8_lossy(&payload[..120]),
                payload.len()
            )
        } else {
            String::from_utf8_lossy(payload).into_owned()
        },
    };
    let v: Value = serde_json::from_slice(payload).map_err(|_| bad())?;
    let list = v.get("records").and_then(Value::as_array).ok_or_else(bad)?;
    list.iter()
        .map(|r| {
            let key = match r.get("key") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => return Err(bad()),
                Some(other) => other.to_string(),
            };
            Ok((key, r.get("value").cloned().unwrap_or(Value::Null)))
        })
        .collect()
}

/// Calls `function` (reduce contract) on `groups`; returns its records.
async fn call_groups(
    executor: &Executor,
    function: &str,
    kind: &'static str,
    partition: i32,
    groups: &[(&String, &Vec<Value>)],
    max_attempts: u32,
    progress: &Progress,
) -> Result<Vec<(String, Value)>, MapReduceError> {
    let payload = json!({
        "groups": groups
            .iter()
            .map(|(k, vs)| json!({"key": k, "values": vs}))
            .collect::<Vec<_>>(),
        "batch": {"partition": partition},
    })
    .to_string();
    let (outcome, attempts) = sluice_taskgen::invoke_with_retries(
        executor,
        function,
        &payload,
        None,
        max_attempts,
        |_, _| {
            progress.retries.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await;
    let response = outcome.map_err(|e| MapReduceError::Reduce {
        function: kind,
        partition,
        attempts,
        error: e.to_string(),
    })?;
    records(function, &response.payload)
}

/// Runs the job on `state`'s shuffle topic, which must exist with
/// `reduce_partitions` partitions (see [`shuffle_topic`] and
/// [`RunState`]): map tasks and reducers the state records as done are
/// not run again. On success the output folder gets [`SUCCESS_FILE`] and
/// loses [`STATE_FILE`].
///
/// # Errors
/// See [`MapReduceError`]; the output folder may hold some part files then.
pub async fn run(
    executor: &Executor,
    kafka: &KafkaSettings,
    cfg: MapReduceConfig,
    state: RunState,
    progress: Arc<Progress>,
) -> Result<Summary, MapReduceError> {
    if cfg.reduce_partitions < 1 || cfg.items_per_split == 0 || cfg.groups_per_call == 0 {
        return Err(MapReduceError::Config(
            "reduce partitions, items per split and groups per call must be at least 1".into(),
        ));
    }
    sluice_taskgen::check_columnar(cfg.payload, &cfg.input)
        .and_then(|()| sluice_taskgen::check_payload_file(cfg.payload, cfg.payload_file))
        .map_err(|e| MapReduceError::Config(e.to_string()))?;
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.output).map_err(|source| MapReduceError::Output {
        path: cfg.output.clone(),
        source,
    })?;
    let resumed = (
        state.maps_done.len() as u64,
        state.reducers_done.len() as u64,
    );
    let topic = state.topic.clone();
    let topic = topic.as_str();
    let checkpoint = Arc::new(Checkpoint {
        output: cfg.output.clone(),
        state: std::sync::Mutex::new(state),
    });
    let context = LoggedContext::new("shuffle producer", kafka.servers.as_str());
    let producer: FutureProducer<LoggedContext> = kafka
        .client()
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create_with_context(context)
        .map_err(|e| kafka_err("creating the shuffle producer", e))?;

    // Reducers start at once and wait for their partition to complete.
    let (total_tx, total_rx) = watch::channel::<Option<u64>>(None);
    let stop = Arc::new(AtomicBool::new(false));
    let mut reducers = tokio::task::JoinSet::new();
    for p in 0..cfg.reduce_partitions {
        if let Some(done) = checkpoint.lock().reducers_done.get(&p).cloned() {
            progress.reducers_done.fetch_add(1, Ordering::Relaxed);
            reducers.spawn(async move { Ok((done.file, done.keys, done.records)) });
            continue;
        }
        let (ex, kafka, cfg, topic) = (
            executor.clone(),
            kafka.clone(),
            cfg.clone(),
            topic.to_owned(),
        );
        let (total, stop, progress) = (total_rx.clone(), Arc::clone(&stop), Arc::clone(&progress));
        let checkpoint = Arc::clone(&checkpoint);
        let start = checkpoint
            .lock()
            .start_offsets
            .get(usize::try_from(p).unwrap_or(0))
            .copied();
        reducers.spawn(async move {
            let out = reduce_partition(&ex, &kafka, &cfg, &topic, p, start, total, stop, &progress)
                .await?;
            checkpoint.reducer_done(
                p,
                ReducerDone {
                    file: out.0.clone(),
                    keys: out.1,
                    records: out.2,
                },
            )?;
            Ok(out)
        });
    }

    let result = map_phase(executor, &producer, &cfg, &checkpoint, &progress).await;
    let (tasks, items) = match result {
        Ok(counts) => counts,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            while reducers.join_next().await.is_some() {}
            return Err(e);
        }
    };
    let _ = total_tx.send(Some(tasks));
    let mut outputs = Vec::new();
    let mut first_error = None;
    while let Some(r) = reducers.join_next().await {
        match r {
            Ok(Ok(out)) => outputs.push(out),
            Ok(Err(e)) => {
                stop.store(true, Ordering::SeqCst);
                first_error.get_or_insert(e);
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                first_error
                    .get_or_insert(MapReduceError::Config(format!("a reducer panicked: {e}")));
            }
        }
    }
    // Every record is acknowledged: nothing is left for the close to flush.
    close_in_background(producer);
    if let Some(e) = first_error {
        return Err(e);
    }
    outputs.sort_by(|a, b| a.0.cmp(&b.0));
    let uploaded = match &cfg.output_url {
        Some(url) => {
            let files: Vec<PathBuf> = outputs.iter().map(|o| o.0.clone()).collect();
            upload::upload(&files, url).await?
        }
        None => Vec::new(),
    };
    let success = cfg.output.join(SUCCESS_FILE);
    std::fs::write(&success, b"").map_err(|source| MapReduceError::Output {
        path: success,
        source,
    })?;
    let state_file = cfg.output.join(STATE_FILE);
    if state_file.exists() {
        std::fs::remove_file(&state_file).map_err(|source| MapReduceError::Output {
            path: state_file,
            source,
        })?;
    }
    Ok(Summary {
        map_tasks: tasks,
        items,
        shuffle_records: progress.shuffle_records.load(Ordering::Relaxed),
        keys: outputs.iter().map(|o| o.1).sum(),
        output_records: outputs.iter().map(|o| o.2).sum(),
        retries: progress.retries.load(Ordering::Relaxed),
        spills: progress.spills.load(Ordering::Relaxed),
        output_files: outputs.into_iter().map(|o| o.0).collect(),
        uploaded,
        resumed,
        duration: started.elapsed(),
    })
}

/// Reads the splits and runs the map tasks, `max_concurrency` at once;
/// returns the number of tasks and of input items.
async fn map_phase(
    executor: &Executor,
    producer: &FutureProducer<LoggedContext>,
    cfg: &MapReduceConfig,
    checkpoint: &Arc<Checkpoint>,
    progress: &Arc<Progress>,
) -> Result<(u64, u64), MapReduceError> {
    let limits = Limits {
        items: cfg.items_per_split,
        bytes: sluice_pipeline::DEFAULT_MAX_BYTES_PER_CALL,
    };
    let mut splits = sluice_taskgen::splits(
        cfg.sources.clone(),
        cfg.input.clone(),
        limits,
        cfg.payload,
        cfg.payload_file,
        cfg.max_concurrency,
    );
    let permits = Arc::new(Semaphore::new(cfg.max_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let (mut n, mut items) = (0u64, 0u64);
    let mut error = None;
    while let Some(split) = splits.recv().await {
        let split = match split {
            Ok(s) => s,
            Err(e) => {
                error = Some(e.into());
                break;
            }
        };
        if let Some(bad) = split.unreadable.first() {
            error = Some(MapReduceError::Unreadable {
                count: split.unreadable.len(),
                first: bad.to_string(),
            });
            break;
        }
        if split.count == 0 {
            continue;
        }
        let task = n;
        n += 1;
        items += split.count as u64;
        progress.splits.fetch_add(1, Ordering::Relaxed);
        if checkpoint.lock().maps_done.contains(&task) {
            progress.maps_done.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (ex, producer, cfg, checkpoint, progress) = (
            executor.clone(),
            producer.clone(),
            cfg.clone(),
            Arc::clone(checkpoint),
            Arc::clone(progress),
        );
        tasks.spawn(async move {
            map_task(
                &ex,
                &producer,
                &cfg,
                &checkpoint,
                task,
                split,
                permit,
                &progress,
            )
            .await
        });
        // Stop early on a failed task.
        while let Some(done) = tasks.try_join_next() {
            if let Ok(Err(e)) = done {
                error.get_or_insert(e);
            }
        }
        if error.is_some() {
            break;
        }
    }
    progress.splits_final.store(true, Ordering::SeqCst);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            error.get_or_insert(e);
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok((n, items)),
    }
}

/// One map task: the map call (and combine), then its records and markers,
/// published again with the next attempt number if publishing failed.
/// `invoking` (a map slot) and the split's payload are let go once the
/// calls are done, so the next map call need not wait for the shuffle's
/// acknowledgements.
#[allow(clippy::too_many_arguments)]
async fn map_task(
    executor: &Executor,
    producer: &FutureProducer<LoggedContext>,
    cfg: &MapReduceConfig,
    checkpoint: &Checkpoint,
    task: u64,
    split: sluice_taskgen::Split,
    invoking: tokio::sync::OwnedSemaphorePermit,
    progress: &Progress,
) -> Result<(), MapReduceError> {
    let (outcome, attempts) = sluice_taskgen::invoke_with_retries(
        executor,
        &cfg.map,
        &split.payload,
        split.attachment.clone(),
        cfg.max_attempts,
        |_, _| {
            progress.retries.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await;
    let response = outcome.map_err(|e| MapReduceError::Map {
        split: split.id.clone(),
        attempts,
        error: e.to_string(),
    })?;
    let mut out = records(&cfg.map, &response.payload)?;
    if let Some(combine) = &cfg.combine {
        let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (k, v) in out {
            groups.entry(k).or_default().push(v);
        }
        let refs: Vec<(&String, &Vec<Value>)> = groups.iter().collect();
        out = Vec::new();
        for chunk in refs.chunks(cfg.groups_per_call.max(1)) {
            out.extend(
                call_groups(
                    executor,
                    combine,
                    "combine",
                    -1,
                    chunk,
                    cfg.max_attempts,
                    progress,
                )
                .await?,
            );
        }
    }
    drop((split, invoking));
    let (topic, first) = {
        let s = checkpoint.lock();
        (s.topic.clone(), s.attempt(0))
    };
    let mut last_error = None;
    for attempt in 1..=cfg.max_attempts.max(1) {
        if attempt > 1 {
            progress.retries.fetch_add(1, Ordering::Relaxed);
        }
        match publish(producer, cfg, &topic, task, first + attempt, &out).await {
            Ok(()) => {
                checkpoint.map_done(task)?;
                progress
                    .shuffle_records
                    .fetch_add(out.len() as u64, Ordering::Relaxed);
                progress.maps_done.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| MapReduceError::Config("no attempt made".into())))
}

/// Publishes a task's records, then its marker to every partition, and
/// waits for every acknowledgement.
async fn publish(
    producer: &FutureProducer<LoggedContext>,
    cfg: &MapReduceConfig,
    topic: &str,
    task: u64,
    attempt: u32,
    out: &[(String, Value)],
) -> Result<(), MapReduceError> {
    let what = || format!("publishing map task {task} to {topic}");
    let mut pending = std::collections::VecDeque::new();
    let bodies = out
        .iter()
        .map(|(k, v)| {
            let body = Shuffled {
                t: task,
                a: attempt,
                k: Some(k.clone()),
                v: v.clone(),
            };
            (
                partition_of(k, cfg.reduce_partitions),
                Some(k.as_str()),
                body,
            )
        })
        .chain((0..cfg.reduce_partitions).map(|p| {
            let marker = Shuffled {
                t: task,
                a: attempt,
                k: None,
                v: Value::Null,
            };
            (p, None, marker)
        }));
    for (partition, key, body) in bodies {
        let body = shuffle_record(body.t, body.a, body.k.as_deref(), body.v);
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .partition(partition)
            .payload(&body);
        if let Some(k) = key {
            record = record.key(k);
        }
        // Enqueue; on a full local queue, wait for the oldest deliveries.
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if let Some(f) = pending.pop_front() {
                        check(f.await, &what)?;
                    }
                }
                Err((e, _)) => return Err(kafka_err(what(), e)),
            }
        }
    }
    for f in pending {
        check(f.await, &what)?;
    }
    Ok(())
}

/// The outcome of one delivery.
fn check(
    delivery: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    what: &impl Fn() -> String,
) -> Result<(), MapReduceError> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(kafka_err(what(), e)),
        Err(_) => Err(kafka_err(what(), "the producer went away")),
    }
}

/// Threads closing Kafka clients that finished runs left behind.
static CLOSING: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Drops a Kafka client on a thread of its own: closing one takes
/// librdkafka about 100 ms (its threads time out their system calls),
/// which a job whose records are all in and acknowledged need not wait
/// for. [`wait_for_closed_clients`] waits for these threads.
fn close_in_background<C: Send + 'static>(client: C) {
    // If no thread starts, the closure, and the client with it, is
    // dropped here.
    if let Ok(closing) = std::thread::Builder::new()
        .name("kafka-close".into())
        .spawn(move || drop(client))
    {
        CLOSING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(closing);
    }
}

/// Waits until the Kafka clients of finished runs, closed in the
/// background, are closed: call it before stopping an embedded broker they
/// talk to (or they log its connections failing), and before timing
/// another run.
pub fn wait_for_closed_clients() {
    let closing = std::mem::take(
        &mut *CLOSING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for c in closing {
        let _ = c.join();
    }
}

/// Consumes partition `p` until every map task's marker is in, then reduces
/// it and writes its part file; returns (file, keys, records).
#[allow(clippy::too_many_arguments)]
async fn reduce_partition(
    executor: &Executor,
    kafka: &KafkaSettings,
    cfg: &MapReduceConfig,
    topic: &str,
    p: i32,
    start: Option<i64>,
    total: watch::Receiver<Option<u64>>,
    stop: Arc<AtomicBool>,
    progress: &Arc<Progress>,
) -> Result<(PathBuf, u64, u64), MapReduceError> {
    let consumer = partition_consumer(kafka, topic, p, start)?;
    let topic_name = topic.to_owned();
    let spill = Spill {
        budget: cfg.reduce_memory_bytes.max(1),
        dir: cfg.output.clone(),
        progress: Some(Arc::clone(progress)),
    };
    // Polling blocks: it runs on a blocking thread.
    let (grouped, consumer) = tokio::task::spawn_blocking(move || {
        let grouped = collect_partition(&consumer, &topic_name, p, &total, &stop, &spill);
        (grouped, consumer)
    })
    .await
    .map_err(|e| MapReduceError::Config(format!("reducer {p} panicked: {e}")))?;
    close_in_background(consumer);
    let grouped = grouped?;
    let mut groups = grouped.merged()?;

    let path = cfg.output.join(format!("part-{p:05}.jsonl"));
    let tmp = cfg.output.join(format!(".part-{p:05}.jsonl.tmp"));
    let out_err = |source| MapReduceError::Output {
        path: tmp.clone(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(out_err)?);
    let (mut written, mut keys) = (0u64, 0u64);
    loop {
        let chunk = groups
            .by_ref()
            .take(cfg.groups_per_call.max(1))
            .collect::<Result<Vec<_>, _>>()?;
        if chunk.is_empty() {
            break;
        }
        keys += chunk.len() as u64;
        let refs: Vec<(&String, &Vec<Value>)> = chunk.iter().map(|(k, vs)| (k, vs)).collect();
        let out = call_groups(
            executor,
            &cfg.reduce,
            "reduce",
            p,
            &refs,
            cfg.max_attempts,
            progress,
        )
        .await?;
        for (k, v) in out {
            serde_json::to_writer(&mut file, &json!({"key": k, "value": v}))
                .map_err(|e| out_err(e.into()))?;
            file.write_all(b"\n").map_err(out_err)?;
            written += 1;
        }
    }
    drop(groups);
    file.flush().map_err(out_err)?;
    drop(file);
    let path = match cfg.output_format {
        OutputFormat::Jsonl => {
            std::fs::rename(&tmp, &path).map_err(|source| MapReduceError::Output {
                path: path.clone(),
                source,
            })?;
            path
        }
        OutputFormat::Parquet => {
            let parquet = path.with_extension("parquet");
            let tmp_parquet = cfg.output.join(format!(".part-{p:05}.parquet.tmp"));
            jsonl_to_parquet(&tmp, &tmp_parquet)?;
            std::fs::rename(&tmp_parquet, &parquet).map_err(|source| MapReduceError::Output {
                path: parquet.clone(),
                source,
            })?;
            let _ = std::fs::remove_file(&tmp);
            parquet
        }
    };
    progress.reducers_done.fetch_add(1, Ordering::Relaxed);
    Ok((path, keys, written))
}

/// Converts a reducer's JSON lines to Parquet, with the schema inferred
/// from the records (`key`, and `value`'s fields as columns when it is an
/// object).
fn jsonl_to_parquet(jsonl: &Path, parquet: &Path) -> Result<(), MapReduceError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| MapReduceError::Output {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let open = || {
        std::fs::File::open(jsonl)
            .map(std::io::BufReader::new)
            .map_err(|source| MapReduceError::Output {
                path: jsonl.to_path_buf(),
                source,
            })
    };
    let (schema, _) =
        arrow_json::reader::infer_json_schema(open()?, None).map_err(|e| err(jsonl, &e))?;
    let schema = Arc::new(schema);
    let reader = arrow_json::ReaderBuilder::new(Arc::clone(&schema))
        .build(open()?)
        .map_err(|e| err(jsonl, &e))?;
    let file = std::fs::File::create(parquet).map_err(|source| MapReduceError::Output {
        path: parquet.to_path_buf(),
        source,
    })?;
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, schema, None).map_err(|e| err(parquet, &e))?;
    for batch in reader {
        let batch = batch.map_err(|e| err(jsonl, &e))?;
        writer.write(&batch).map_err(|e| err(parquet, &e))?;
    }
    writer.close().map_err(|e| err(parquet, &e))?;
    Ok(())
}

pub use sluice_pipeline::OutputFormat;

/// A reducer's values by key: sorted runs spilled to disk, and what is
/// still in memory.
#[derive(Debug, Default)]
pub struct Grouped {
    /// Values by key not spilled.
    pub memory: BTreeMap<String, Vec<Value>>,
    /// Spilled runs, oldest first: one `[key, [values...]]` JSON line per
    /// key, in key order.
    pub runs: Vec<PathBuf>,
}

impl Grouped {
    /// The groups in key order, each key's values in arrival order (runs
    /// merged); spilled runs are deleted once read.
    ///
    /// # Errors
    /// A run cannot be read.
    pub fn merged(self) -> Result<MergedGroups, MapReduceError> {
        let mut sources: Vec<GroupSource> = Vec::new();
        for run in &self.runs {
            let file = std::fs::File::open(run).map_err(|source| MapReduceError::Output {
                path: run.clone(),
                source,
            })?;
            let path = run.clone();
            let lines = std::io::BufRead::lines(std::io::BufReader::new(file));
            sources.push(Box::new(lines.map(move |line| {
                let line = line.map_err(|source| MapReduceError::Output {
                    path: path.clone(),
                    source,
                })?;
                serde_json::from_str(&line).map_err(|e| MapReduceError::Output {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })
            })));
        }
        sources.push(Box::new(self.memory.into_iter().map(Ok)));
        let mut merged = MergedGroups {
            heads: Vec::with_capacity(sources.len()),
            sources,
            runs: self.runs,
        };
        for i in 0..merged.sources.len() {
            let head = merged.sources[i].next().transpose()?;
            merged.heads.push(head);
        }
        Ok(merged)
    }
}

/// A sorted source of groups: a spilled run, or what stayed in memory.
type GroupSource = Box<dyn Iterator<Item = Result<(String, Vec<Value>), MapReduceError>> + Send>;

/// The groups of a [`Grouped`], merged in key order.
pub struct MergedGroups {
    sources: Vec<GroupSource>,
    heads: Vec<Option<(String, Vec<Value>)>>,
    runs: Vec<PathBuf>,
}

impl Iterator for MergedGroups {
    type Item = Result<(String, Vec<Value>), MapReduceError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Few runs: a linear scan for the smallest head is enough.
        let key = self
            .heads
            .iter()
            .filter_map(|h| h.as_ref().map(|(k, _)| k))
            .min()?
            .clone();
        let mut values = Vec::new();
        for i in 0..self.heads.len() {
            if self.heads[i].as_ref().is_some_and(|(k, _)| *k == key) {
                let (_, vs) = self.heads[i].take().expect("checked above");
                values.extend(vs);
                match self.sources[i].next().transpose() {
                    Ok(head) => self.heads[i] = head,
                    Err(e) => return Some(Err(e)),
                }
            }
        }
        Some(Ok((key, values)))
    }
}

impl Drop for MergedGroups {
    fn drop(&mut self) {
        for run in &self.runs {
            let _ = std::fs::remove_file(run);
        }
    }
}

/// Where a reducer spills, and past which size.
struct Spill {
    budget: usize,
    dir: PathBuf,
    progress: Option<Arc<Progress>>,
}

/// A value's share of a reducer's memory budget: its JSON size and the
/// bookkeeping around it.
fn value_bytes(v: &Value) -> usize {
    const OVERHEAD: usize = 32;
    OVERHEAD
        + match v {
            Value::Null | Value::Bool(_) | Value::Number(_) => 8,
            Value::String(s) => s.len() + 2,
            other => other.to_string().len(),
        }
}

/// Writes `groups` (sorted) as a spilled run of partition `p`.
fn spill_run(
    groups: &BTreeMap<String, Vec<Value>>,
    dir: &Path,
    p: i32,
    n: usize,
) -> Result<PathBuf, MapReduceError> {
    let path = dir.join(format!(".spill-{p:05}-{n:05}.tmp"));
    let err = |source| MapReduceError::Output {
        path: path.clone(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(err)?);
    for group in groups {
        serde_json::to_writer(&mut file, &group).map_err(|e| err(e.into()))?;
        file.write_all(b"\n").map_err(err)?;
    }
    file.flush().map_err(err)?;
    Ok(path)
}

/// A partition's values by key, counting each map task's first marked
/// attempt only; returns once all `total` tasks are marked. Past
/// `spill.budget` bytes of grouped values, the groups are written to a
/// sorted run on disk and memory starts again.
fn collect_partition(
    consumer: &BaseConsumer<LoggedContext>,
    topic: &str,
    p: i32,
    total: &watch::Receiver<Option<u64>>,
    stop: &AtomicBool,
    spill: &Spill,
) -> Result<Grouped, MapReduceError> {
    let mut pending: HashMap<(u64, u32), Vec<(String, Value)>> = HashMap::new();
    let mut accepted: HashSet<u64> = HashSet::new();
    let mut grouped = Grouped::default();
    let mut bytes = 0usize;
    loop {
        if let Some(n) = *total.borrow()
            && accepted.len() as u64 >= n
        {
            return Ok(grouped);
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(grouped);
        }
        // Short, so that the map phase's end (`total`) is seen soon.
        let Some(m) = consumer.poll(Duration::from_millis(10)) else {
            continue;
        };
        let m = m.map_err(|e| kafka_err(format!("reading partition {p} of {topic}"), e))?;
        let Some(Ok(rec)) = m.payload().map(serde_json::from_slice::<Shuffled>) else {
            tracing::warn!(
                partition = p,
                offset = m.offset(),
                "skipping a record that is not a shuffle record"
            );
            continue;
        };
        if accepted.contains(&rec.t) {
            continue; // a later attempt of a task already counted
        }
        match rec.k {
            Some(k) => pending.entry((rec.t, rec.a)).or_default().push((k, rec.v)),
            None => {
                accepted.insert(rec.t);
                for (k, v) in pending.remove(&(rec.t, rec.a)).unwrap_or_default() {
                    bytes += value_bytes(&v);
                    match grouped.memory.get_mut(&k) {
                        Some(vs) => vs.push(v),
                        None => {
                            bytes += k.len() + 64;
                            grouped.memory.insert(k, vec![v]);
                        }
                    }
                }
                pending.retain(|(t, _), _| *t != rec.t);
                if bytes > spill.budget {
                    let run = spill_run(&grouped.memory, &spill.dir, p, grouped.runs.len())?;
                    tracing::debug!(partition = p, bytes, run = %run.display(), "spilled a sorted run");
                    grouped.runs.push(run);
                    grouped.memory.clear();
                    bytes = 0;
                    if let Some(progress) = &spill.progress {
                        progress.spills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// The shuffle topic's folder-independent name for this run, from the
/// clock (a re-run gets a fresh topic).
pub fn run_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether `path` holds part files of an earlier run (for messages).
pub fn has_parts(path: &Path) -> bool {
    std::fs::read_dir(path).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("part-")))
    })
}

/// The number of partitions of `topic`, `None` when it does not exist
/// (blocks for at most `timeout`).
///
/// # Errors
/// Kafka errors.
pub fn topic_partitions(
    kafka: &KafkaSettings,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, MapReduceError> {
    let consumer: BaseConsumer = kafka
        .client()
        .create()
        .map_err(|e| kafka_err("creating a metadata client", e))?;
    let meta = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_err(format!("reading the metadata of {topic}"), e))?;
    Ok(meta
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
}

/// The end offset of each of `topic`'s first `partitions` partitions: where
/// a fresh run on an existing topic starts reading.
///
/// # Errors
/// Kafka errors.
pub fn end_offsets(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<Vec<i64>, MapReduceError> {
    let consumer: BaseConsumer = kafka
        .client()
        .create()
        .map_err(|e| kafka_err("creating a metadata client", e))?;
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, timeout)
                .map(|(_, high)| high)
                .map_err(|e| kafka_err(format!("reading the end of {topic}/{p}"), e))
        })
        .collect()
}
