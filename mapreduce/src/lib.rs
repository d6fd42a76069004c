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
//! - **Re-running** a killed job starts from scratch on a fresh shuffle
//!   topic and gives the same output.
//!
//! Groups are held in memory per reducer (no spilling yet).

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
use sluice_taskgen::distributed::KafkaSettings;
use sluice_taskgen::{BackfillError, Input, Limits, PayloadFormat};
use thiserror::Error;
use tokio::sync::{Semaphore, watch};

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
}

impl MapReduceError {
    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            MapReduceError::Input(e) => e.fault(),
            MapReduceError::Kafka { .. } | MapReduceError::Output { .. } => Fault::External,
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
    /// Output folder.
    pub output: PathBuf,
    /// How map calls carry their items (Arrow for Parquet sources).
    pub payload: PayloadFormat,
    /// What the reducers write.
    pub output_format: OutputFormat,
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
    /// The output files, one per reducer.
    pub output_files: Vec<PathBuf>,
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
    let consumer = partition_consumer(kafka, topic, p)?;
    let (_tx, total) = watch::channel(Some(tasks));
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        collect_partition(&consumer, &topic, p, &total, &AtomicBool::new(false))
    })
    .await
    .map_err(|e| MapReduceError::Config(format!("collecting partition {p} panicked: {e}")))?
}

/// A consumer reading partition `p` of `topic` from its start.
fn partition_consumer(
    kafka: &KafkaSettings,
    topic: &str,
    p: i32,
) -> Result<BaseConsumer, MapReduceError> {
    let consumer: BaseConsumer = kafka
        .client()
        .set("group.id", format!("{topic}-reducer-{p}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| kafka_err(format!("creating reducer {p}'s consumer"), e))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Beginning)
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
        found: String::from_utf8_lossy(&payload[..payload.len().min(120)]).into_owned(),
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
    let (outcome, attempts) =
        sluice_taskgen::invoke_with_retries(executor, function, &payload, max_attempts, |_, _| {
            progress.retries.fetch_add(1, Ordering::Relaxed);
        })
        .await;
    let response = outcome.map_err(|e| MapReduceError::Reduce {
        function: kind,
        partition,
        attempts,
        error: e.to_string(),
    })?;
    records(function, &response.payload)
}

/// Runs the job; the shuffle topic must exist with `reduce_partitions`
/// partitions (see [`shuffle_topic`]).
///
/// # Errors
/// See [`MapReduceError`]; the output folder may hold some part files then.
pub async fn run(
    executor: &Executor,
    kafka: &KafkaSettings,
    cfg: MapReduceConfig,
    topic: &str,
    progress: Arc<Progress>,
) -> Result<Summary, MapReduceError> {
    if cfg.reduce_partitions < 1 || cfg.items_per_split == 0 || cfg.groups_per_call == 0 {
        return Err(MapReduceError::Config(
            "reduce partitions, items per split and groups per call must be at least 1".into(),
        ));
    }
    if cfg.payload == PayloadFormat::Arrow && cfg.input.format != sluice_taskgen::Format::Parquet {
        return Err(MapReduceError::Config(format!(
            "payload \"arrow\" needs Parquet sources, not {}",
            cfg.input.format
        )));
    }
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.output).map_err(|source| MapReduceError::Output {
        path: cfg.output.clone(),
        source,
    })?;
    let producer: FutureProducer = kafka
        .client()
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create()
        .map_err(|e| kafka_err("creating the shuffle producer", e))?;

    // Reducers start at once and wait for their partition to complete.
    let (total_tx, total_rx) = watch::channel::<Option<u64>>(None);
    let stop = Arc::new(AtomicBool::new(false));
    let mut reducers = tokio::task::JoinSet::new();
    for p in 0..cfg.reduce_partitions {
        let (ex, kafka, cfg, topic) = (
            executor.clone(),
            kafka.clone(),
            cfg.clone(),
            topic.to_owned(),
        );
        let (total, stop, progress) = (total_rx.clone(), Arc::clone(&stop), Arc::clone(&progress));
        reducers.spawn(async move {
            reduce_partition(&ex, &kafka, &cfg, &topic, p, total, stop, &progress).await
        });
    }

    let result = map_phase(executor, &producer, &cfg, topic, &progress).await;
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
    if let Some(e) = first_error {
        return Err(e);
    }
    outputs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Summary {
        map_tasks: tasks,
        items,
        shuffle_records: progress.shuffle_records.load(Ordering::Relaxed),
        keys: outputs.iter().map(|o| o.1).sum(),
        output_records: outputs.iter().map(|o| o.2).sum(),
        retries: progress.retries.load(Ordering::Relaxed),
        output_files: outputs.into_iter().map(|o| o.0).collect(),
        duration: started.elapsed(),
    })
}

/// Reads the splits and runs the map tasks, `max_concurrency` at once;
/// returns the number of tasks and of input items.
async fn map_phase(
    executor: &Executor,
    producer: &FutureProducer,
    cfg: &MapReduceConfig,
    topic: &str,
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
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (ex, producer, cfg, topic, progress) = (
            executor.clone(),
            producer.clone(),
            cfg.clone(),
            topic.to_owned(),
            Arc::clone(progress),
        );
        tasks.spawn(async move {
            let r = map_task(&ex, &producer, &cfg, &topic, task, &split, &progress).await;
            drop(permit);
            r
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
async fn map_task(
    executor: &Executor,
    producer: &FutureProducer,
    cfg: &MapReduceConfig,
    topic: &str,
    task: u64,
    split: &sluice_taskgen::Split,
    progress: &Progress,
) -> Result<(), MapReduceError> {
    let (outcome, attempts) = sluice_taskgen::invoke_with_retries(
        executor,
        &cfg.map,
        &split.payload,
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
    let mut last_error = None;
    for attempt in 1..=cfg.max_attempts.max(1) {
        if attempt > 1 {
            progress.retries.fetch_add(1, Ordering::Relaxed);
        }
        match publish(producer, cfg, topic, task, attempt, &out).await {
            Ok(()) => {
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
    producer: &FutureProducer,
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

/// Consumes partition `p` until every map task's marker is in, then reduces
/// it and writes its part file; returns (file, keys, records).
#[allow(clippy::too_many_arguments)]
async fn reduce_partition(
    executor: &Executor,
    kafka: &KafkaSettings,
    cfg: &MapReduceConfig,
    topic: &str,
    p: i32,
    total: watch::Receiver<Option<u64>>,
    stop: Arc<AtomicBool>,
    progress: &Progress,
) -> Result<(PathBuf, u64, u64), MapReduceError> {
    let consumer = partition_consumer(kafka, topic, p)?;
    let topic_name = topic.to_owned();
    // Polling blocks: it runs on a blocking thread.
    let groups = tokio::task::spawn_blocking(move || {
        collect_partition(&consumer, &topic_name, p, &total, &stop)
    })
    .await
    .map_err(|e| MapReduceError::Config(format!("reducer {p} panicked: {e}")))??;

    let path = cfg.output.join(format!("part-{p:05}.jsonl"));
    let tmp = cfg.output.join(format!(".part-{p:05}.jsonl.tmp"));
    let out_err = |source| MapReduceError::Output {
        path: tmp.clone(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(out_err)?);
    let refs: Vec<(&String, &Vec<Value>)> = groups.iter().collect();
    let mut written = 0u64;
    for chunk in refs.chunks(cfg.groups_per_call.max(1)) {
        let out = call_groups(
            executor,
            &cfg.reduce,
            "reduce",
            p,
            chunk,
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
            jsonl_to_parquet(&tmp, &parquet)?;
            let _ = std::fs::remove_file(&tmp);
            parquet
        }
    };
    progress.reducers_done.fetch_add(1, Ordering::Relaxed);
    Ok((path, groups.len() as u64, written))
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

/// A partition's values by key, counting each map task's first marked
/// attempt only; returns once all `total` tasks are marked.
fn collect_partition(
    consumer: &BaseConsumer,
    topic: &str,
    p: i32,
    total: &watch::Receiver<Option<u64>>,
    stop: &AtomicBool,
) -> Result<BTreeMap<String, Vec<Value>>, MapReduceError> {
    let mut pending: HashMap<(u64, u32), Vec<(String, Value)>> = HashMap::new();
    let mut accepted: HashSet<u64> = HashSet::new();
    let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    loop {
        if let Some(n) = *total.borrow()
            && accepted.len() as u64 >= n
        {
            return Ok(groups);
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(groups);
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
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
                    groups.entry(k).or_default().push(v);
                }
                pending.retain(|(t, _), _| *t != rec.t);
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
