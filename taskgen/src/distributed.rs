//! Distributed backfills over Kafka: `sluice backfill --distributed` (the
//! coordinator) and `sluice worker` (any number of them, anywhere).
//!
//! ```text
//!  coordinator                        Kafka                          workers (a consumer group)
//!  sources → calls ──publish──▶ sluice-backfill-JOB-tasks ──▶ invoke (retries) ─┐
//!  progress store ◀──record──── sluice-backfill-JOB-results ◀──publish result ──┘
//! ```
//!
//! - The coordinator reads the sources exactly as a local run does (same
//!   calls, same call ids, same progress store), skips calls an earlier run
//!   completed, and publishes each remaining call as a task keyed by its call
//!   id. At most [`MAX_OUTSTANDING`] tasks are unanswered at once, so the
//!   coordinator never runs far ahead of the workers.
//! - Workers consume the tasks topic in the group `sluice-backfill-JOB-workers`,
//!   invoke the job's function with retries, publish a result (with the
//!   items of a failed call, for the dead-letter file), and only then commit
//!   the task's offset: a worker killed mid-task leaves it uncommitted, and
//!   after the rebalance another worker calls it again (at least once).
//! - The coordinator consumes the results topic (group
//!   `sluice-backfill-JOB-coordinator`), records successes in the progress
//!   store and failures in the dead-letter file, then commits the result's
//!   offset. It finishes when every published task has a result. Killed, it
//!   is simply run again: completed calls are skipped, the rest published
//!   again (a duplicate result is harmless).
//! - A kept response too large for one result message (Kafka's default
//!   limit is about 1 MB; a response may be Lambda's 6 MB) is published in
//!   pieces, which the coordinator puts back together (`Pieces`).
//!
//! - With `format = "objects"` a task carries the object's item, not its
//!   bytes: the worker fetches the object (so workers must reach the
//!   sources: object-store URLs with their credentials, or a file system
//!   they share at the same path), completes the item and stages the bytes
//!   for the call, as a local run does. An object over `max_object_bytes`
//!   or unreadable is a failed result without a call.
//! - With `payload_file`, a task carries the columnar payload (base64 in
//!   the task, within [`MAX_TASK_BYTES`]) and the worker stages it as the
//!   call's file; a failed call's rows come back as JSON rows.
//! - Workers given [`Metrics`] count their calls per job (`sluice_job_*`),
//!   for `sluice worker --metrics-addr`.
//!
//! Ordering options (`order_key`, dependencies) need one scheduler that sees
//! every item; they are refused in distributed mode.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_executor::Executor;
use sluice_ingest::kafka::{LoggedContext, OffsetTracker, OutRecord, Sink};
use sluice_ingest::metrics::{CallOutcome, Metrics};
use tokio::sync::mpsc;

use crate::{BackfillConfig, BackfillError, Hooks, Run, Summary};

/// Partitions of the tasks and results topics the coordinator creates: the
/// most workers that can share one job.
pub const TASK_PARTITIONS: i32 = 8;
/// Tasks published and not yet answered, at most.
pub const MAX_OUTSTANDING: usize = 1024;
/// Largest task: Kafka's default `message.max.bytes` is about 1 MB, so a
/// distributed job's calls are cut at this many bytes of items.
pub const MAX_TASK_BYTES: usize = 900_000;

/// How long topic creation may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The topic carrying a job's calls.
pub fn tasks_topic(job: &str) -> String {
    format!("sluice-backfill-{job}-tasks")
}

/// The topic carrying the outcomes of a job's calls.
pub fn results_topic(job: &str) -> String {
    format!("sluice-backfill-{job}-results")
}

/// The Kafka cluster of a distributed job.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub servers: String,
    /// Extra librdkafka properties (security, SASL).
    pub properties: Vec<(String, String)>,
}

impl KafkaSettings {
    /// A client configuration for this cluster.
    pub fn client(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.servers);
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    fn consumer(&self, group: &str) -> ClientConfig {
        let mut cfg = self.client();
        cfg.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("topic.metadata.refresh.interval.ms", "1000");
        cfg
    }

    fn sink(&self, what: &str) -> Result<Sink, BackfillError> {
        Sink::new(what, &self.servers, &self.properties).map_err(|e| BackfillError::Kafka {
            what: format!("creating the {what} producer"),
            message: e.to_string(),
        })
    }
}

fn kafka_error(what: impl Into<String>, e: &KafkaError) -> BackfillError {
    BackfillError::Kafka {
        what: what.into(),
        message: e.to_string(),
    }
}

/// One call, as published on the tasks topic.
#[derive(Debug, Serialize, Deserialize)]
struct Task {
    job: String,
    call_id: String,
    function: String,
    max_attempts: u32,
    source: String,
    count: u64,
    /// The function's event, as a local run would send it.
    payload: String,
    /// The call's first item (for the results file).
    #[serde(default)]
    first_item: u64,
    /// Whether the coordinator keeps responses (`results`): the worker
    /// then sends the response back with the result.
    #[serde(default)]
    keep_response: bool,
    /// With `format = "objects"`: the worker fetches the object (`source`)
    /// if it has at most this many bytes, completes the event's item and
    /// stages the bytes for the call.
    #[serde(default)]
    object_bytes: Option<u64>,
    /// With `payload_file`: the columnar payload (base64) the worker stages
    /// as a file for the call, at the path the event names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attachment: Option<String>,
}

/// The outcome of one task, as published on the results topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TaskResult {
    call_id: String,
    source: String,
    count: u64,
    ok: bool,
    attempts: u32,
    /// Failed calls: the error type and message, and the call's items.
    #[serde(default)]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    items: Value,
    /// Successful calls of a job that keeps responses: the response.
    #[serde(default)]
    response: Option<String>,
    /// The call's first item.
    #[serde(default)]
    first_item: u64,
    /// Which worker answered (host and pid), for the logs.
    worker: String,
    /// A response too large for one result message comes in parts: this
    /// message's `response` is one piece of it ([`split_response`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part: Option<Part>,
}

/// Where a piece of a split response belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Part {
    /// This piece's place, from 0.
    index: u32,
    /// How many pieces the response has.
    of: u32,
    /// Tells one publication of the call's result from another (a call a
    /// rebalance gave two workers is answered twice, pieces interleaved).
    nonce: String,
}

/// Whether `topic` exists on the cluster (a metadata request, which does
/// not create it).
async fn topic_exists(kafka: &KafkaSettings, topic: &str) -> Result<bool, BackfillError> {
    let mut cfg = kafka.client();
    cfg.set("allow.auto.create.topics", "false");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = cfg
            .create()
            .map_err(|e| kafka_error("creating a metadata client", &e))?;
        let md = client
            .fetch_metadata(Some(&topic), ADMIN_TIMEOUT)
            .map_err(|e| kafka_error(format!("reading the metadata of {topic}"), &e))?;
        Ok(md
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
    })
    .await
    .map_err(|e| BackfillError::Kafka {
        what: "reading topic metadata".into(),
        message: e.to_string(),
    })?
}

/// Creates the job's topics if they do not exist yet, with
/// [`TASK_PARTITIONS`] partitions and the cluster's default replication.
pub async fn ensure_topics(kafka: &KafkaSettings, job: &str) -> Result<(), BackfillError> {
    for topic in [tasks_topic(job), results_topic(job)] {
        ensure_topic(kafka, &topic, TASK_PARTITIONS).await?;
    }
    Ok(())
}

/// Creates `topic` with `partitions` partitions (and the cluster's default
/// replication) unless it exists.
pub async fn ensure_topic(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: i32,
) -> Result<(), BackfillError> {
    if topic_exists(kafka, topic).await? {
        return Ok(());
    }
    let names = [topic.to_owned()];
    let admin: AdminClient<DefaultClientContext> = kafka
        .client()
        .create()
        .map_err(|e| kafka_error("creating the admin client", &e))?;
    let options = AdminOptions::new()
        .request_timeout(Some(ADMIN_TIMEOUT))
        .operation_timeout(Some(ADMIN_TIMEOUT));
    for replication in [-1, 1] {
        tracing::debug!(replication, "creating topics");
        let topics: Vec<NewTopic<'_>> = names
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(replication)))
            .collect();
        let results = admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| kafka_error("creating the job's topics", &e))?;
        let mut retry = false;
        tracing::debug!(?results, "created topics");
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // Older brokers (and the embedded one) want an explicit
                // replication factor instead of "the broker's default".
                Err((_, RDKafkaErrorCode::InvalidReplicationFactor)) if replication < 0 => {
                    retry = true;
                }
                Err((topic, code)) => {
                    return Err(BackfillError::Kafka {
                        what: format!("creating topic {topic}"),
                        message: code.to_string(),
                    });
                }
            }
        }
        if !retry {
            break;
        }
    }
    Ok(())
}

/// A consumer polled on its own thread: messages arrive on `rx`; offsets to
/// commit go to `commits`. Dropping `stop`-flagged pollers commits what was
/// asked and closes the consumer on that thread.
struct Poller {
    rx: mpsc::Receiver<OwnedMessage>,
    commits: std::sync::mpsc::Sender<(String, i32, i64)>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(
        name: &str,
        cfg: &ClientConfig,
        topics: &[String],
        buffer: usize,
    ) -> Result<Poller, BackfillError> {
        let servers = cfg.get("bootstrap.servers").unwrap_or_default();
        let context = LoggedContext::new(format!("{name} consumer"), servers);
        let consumer: BaseConsumer<LoggedContext> = cfg
            .create_with_context(context)
            .map_err(|e| kafka_error(format!("creating the {name} consumer"), &e))?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&refs)
            .map_err(|e| kafka_error(format!("subscribing to {}", topics.join(", ")), &e))?;
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let (commits, commit_rx) = std::sync::mpsc::channel::<(String, i32, i64)>();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("sluice-{name}-poll"))
            .spawn(move || {
                let commit = |mode: CommitMode| {
                    let mut tpl = TopicPartitionList::new();
                    let mut any = false;
                    while let Ok((topic, partition, next)) = commit_rx.try_recv() {
                        // Later requests for a partition replace earlier ones.
                        let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
                        any = true;
                    }
                    if any && let Err(e) = consumer.commit(&tpl, mode) {
                        tracing::warn!(error = %e, "committing offsets failed; the records will be delivered again");
                    }
                };
                while !flag.load(Ordering::SeqCst) {
                    commit(CommitMode::Async);
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) if tx.blocking_send(m.detach()).is_err() => break,
                        Some(Err(e)) => consumer.context().log.error(&e, ""),
                        Some(Ok(_)) | None => {}
                    }
                }
                commit(CommitMode::Sync);
                consumer.unsubscribe();
            })
            .map_err(|e| BackfillError::Kafka {
                what: "starting the poll thread".into(),
                message: e.to_string(),
            })?;
        Ok(Poller {
            rx,
            commits,
            stop,
            thread: Some(thread),
        })
    }

    fn commit(&self, topic: &str, partition: i32, next: i64) {
        let _ = self.commits.send((topic.to_owned(), partition, next));
    }

    /// Commits what was asked, closes the consumer and waits for the thread.
    async fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.rx.close();
        // Unblock a poll thread waiting to hand over a message.
        while self.rx.try_recv().is_ok() {}
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Runs `cfg` as a distributed job: publishes its calls as tasks for
/// `sluice worker` processes and records their results. Returns when every
/// call has a result (or `shutdown` resolves: tasks already published stay
/// in the topic, and the next run publishes what is not recorded as done).
///
/// # Errors
/// Ordering options (not supported distributed), Kafka errors, and what a
/// local [`crate::run`] reports.
pub async fn coordinate(
    cfg: BackfillConfig,
    job: &str,
    kafka: &KafkaSettings,
    hooks: Hooks,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, BackfillError> {
    if cfg.order.is_active() || !cfg.file_dependencies.is_empty() {
        return Err(BackfillError::Config(
            "order_key and dependencies need a single scheduler: they cannot be used with \
             --distributed"
                .into(),
        ));
    }
    ensure_topics(kafka, job).await?;
    let run = Run::start(None, cfg, hooks)?;
    let (tasks, results) = (tasks_topic(job), results_topic(job));
    let sink = kafka.sink("task")?;
    let mut polled = Poller::start(
        "results",
        &kafka.consumer(&format!("sluice-backfill-{job}-coordinator")),
        std::slice::from_ref(&results),
        1024,
    )?;
    let (tx, mut calls) = mpsc::channel(run.cfg.max_concurrency.max(16));
    let reader = crate::spawn_reader(&run, run.cfg.sources.clone(), tx);
    let ticker = crate::start_ticker(&run);

    let mut outstanding: HashSet<String> = HashSet::new();
    let mut pieces = Pieces::default();
    let mut reading = true;
    let mut interrupted = false;
    let mut read_error = None;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        if run.stop.load(Ordering::SeqCst) || (!reading && outstanding.is_empty()) {
            break;
        }
        let room = reading && outstanding.len() < MAX_OUTSTANDING;
        tokio::select! {
            biased;
            () = &mut shutdown => { interrupted = true; break; }
            Some(m) = polled.rx.recv() => {
                record_result(&run, &m, &mut outstanding, &mut pieces).await;
                polled.commit(m.topic(), m.partition(), m.offset() + 1);
            }
            next = calls.recv(), if room => match next {
                None => reading = false,
                Some(Err(e)) => { read_error = Some(e); break; }
                Some(Ok(call)) => match run.admit(&call) {
                    Ok(false) => {}
                    Ok(true) => {
                        let id = call.id();
                        let (payload, attachment) =
                            call.event(&id, serde_json::Map::new(), run.cfg.payload_file);
                        let task = Task {
                            job: job.to_owned(),
                            call_id: id.clone(),
                            function: run.cfg.function.clone(),
                            max_attempts: run.cfg.max_attempts,
                            source: call.source.clone(),
                            count: call.len() as u64,
                            payload: run.with_batch_input(payload),
                            first_item: call.first,
                            keep_response: run.progress.keeps_results(),
                            object_bytes: (run.cfg.input.format == crate::Format::Objects)
                                .then_some(run.cfg.max_object_bytes),
                            attachment: attachment.map(|a| BASE64.encode(a)),
                        };
                        let record = OutRecord {
                            key: Some(id.clone().into_bytes()),
                            value: Some(serde_json::to_vec(&task).expect("a task serializes")),
                            headers: Vec::new(),
                            partition: None,
                        };
                        if let Err(e) = sink.send_all(&tasks, &[record]).await {
                            run.fail(kafka_error(format!("publishing {id} to {tasks}"), &e));
                            break;
                        }
                        outstanding.insert(id);
                    }
                    Err(e) => { run.fail(e); break; }
                },
            },
        }
    }
    drop(calls);
    if let Some(t) = ticker {
        t.abort();
    }
    polled.close().await;
    let _ = reader.await;
    let result = crate::conclude(&run, interrupted, read_error);
    crate::upload_results(&run, result).await
}

/// Records one result message; a result of a call this run did not publish
/// (an earlier run's, or a duplicate) still marks a success as done.
async fn record_result(
    run: &Run,
    m: &OwnedMessage,
    outstanding: &mut HashSet<String>,
    pieces: &mut Pieces,
) {
    let parsed = m
        .payload()
        .map(serde_json::from_slice::<TaskResult>)
        .transpose();
    let r = match parsed {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => {
            tracing::warn!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "ignoring a result that is not a sluice task result"
            );
            return;
        }
    };
    let Some(r) = pieces.add(r) else {
        return;
    };
    let ours = outstanding.remove(&r.call_id);
    if r.attempts > 1 && ours {
        run.update(|s| s.calls_retried += u64::from(r.attempts - 1));
    }
    if r.ok {
        let result = run.progress.keeps_results().then(|| {
            let response = r.response.as_deref().unwrap_or("null");
            crate::progress::result_line(
                &r.call_id,
                &r.source,
                r.first_item,
                r.count,
                response.as_bytes(),
            )
        });
        if ours {
            run.succeeded(&r.call_id, r.attempts, r.count, result).await;
        } else if !matches!(run.progress.succeeded(&r.call_id), Ok(true)) {
            // An earlier run's call, answered only now (a call answered
            // twice is recorded, and has its results line, once).
            let success = crate::progress::Success {
                call_id: r.call_id.clone(),
                attempts: u64::from(r.attempts),
                result,
            };
            if let Err(e) = run.progress.record(success).await {
                run.fail(e);
            }
        }
    } else if ours {
        tracing::debug!(call = %r.call_id, worker = %r.worker, "call failed");
        run.dead_letter(
            &r.source,
            &r.call_id,
            r.items,
            r.error_type.as_deref().unwrap_or("Sluice.Unknown"),
            r.error.as_deref().unwrap_or("no error message"),
            r.attempts,
            r.count,
        );
    }
}

/// A result message's largest size with a response in it: librdkafka's
/// default `message.max.bytes` (1,000,000), less room for the rest.
const MAX_RESULT_BYTES: usize = 900_000;

/// The most pieces a result may come in: a 6 MB response whose every
/// character JSON escapes sixfold needs about 45; a message claiming more
/// is not a sluice worker's (and must not make the coordinator allocate
/// for them).
const MAX_PIECES: usize = 1024;

/// The longest error message a failed result carries.
const MAX_ERROR_BYTES: usize = 16 * 1024;

/// The pieces of split responses the coordinator has seen, by call id and
/// publication, until a publication is whole. A coordinator that restarts
/// between the pieces of a call has committed the first ones: that call is
/// not recorded as done, so it is published again and answered whole.
#[derive(Default)]
struct Pieces {
    calls: HashMap<String, HashMap<String, Vec<Option<TaskResult>>>>,
    /// Calls put together: later pieces of theirs (another publication's)
    /// are dropped, not kept.
    whole: HashSet<String>,
}

impl Pieces {
    /// `r` itself if it is whole; the whole result once `r` completes its
    /// publication; `None` while pieces are missing.
    fn add(&mut self, mut r: TaskResult) -> Option<TaskResult> {
        let Some(part) = r.part.take() else {
            return Some(r);
        };
        let of = part.of.max(1) as usize;
        let index = part.index as usize;
        if index >= of || of > MAX_PIECES {
            tracing::warn!(call = %r.call_id, index, of, "ignoring a result piece out of range");
            return None;
        }
        let call_id = r.call_id.clone();
        if self.whole.contains(&call_id) {
            return None;
        }
        let publications = self.calls.entry(call_id.clone()).or_default();
        let slots = publications
            .entry(part.nonce)
            .or_insert_with(|| (0..of).map(|_| None).collect());
        if slots.len() != of {
            tracing::warn!(call = %call_id, "ignoring a result piece whose count disagrees");
            return None;
        }
        slots[index] = Some(r);
        if slots.iter().any(Option::is_none) {
            return None;
        }
        // Whole: the other publications of this call are no longer needed.
        let slots = std::mem::take(slots);
        self.calls.remove(&call_id);
        self.whole.insert(call_id);
        let mut parts = slots.into_iter().flatten();
        let mut whole = parts.next()?;
        let mut response = whole.response.take().unwrap_or_default();
        for p in parts {
            response.push_str(p.response.as_deref().unwrap_or_default());
        }
        whole.response = Some(response);
        Some(whole)
    }
}

/// `result` as the messages that carry it: itself, or, when its response
/// would make a message over [`MAX_RESULT_BYTES`], pieces that each fit,
/// with a piece of the response (cut between characters) and the rest of
/// the result, tagged with the [`Part`] the coordinator reassembles them by
/// ([`Pieces`]). Responses are at most Lambda's 6 MB, so a few pieces.
fn split_response(mut result: TaskResult, nonce: &str) -> Vec<TaskResult> {
    let size = |r: &TaskResult| serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
    if size(&result) <= MAX_RESULT_BYTES {
        return vec![result];
    }
    if let Some(error) = &mut result.error
        && error.len() > MAX_ERROR_BYTES
    {
        // A function's error message may be megabytes: the dead-letter
        // file gets its start (the task's items fit a message already).
        let cut = floor_char_boundary(error, MAX_ERROR_BYTES);
        let dropped = error.len() - cut;
        error.truncate(cut);
        error.push_str(&format!("... ({dropped} more bytes)"));
    }
    if result.response.is_none() {
        return vec![result];
    }
    let response = result.response.take().unwrap_or_default();
    // What the rest of a piece's message takes, with the widest part.
    result.response = Some(String::new());
    result.part = Some(Part {
        index: u32::MAX,
        of: u32::MAX,
        nonce: nonce.to_owned(),
    });
    // Room for a piece as a JSON string (the empty one's quotes counted).
    let room = MAX_RESULT_BYTES.saturating_sub(size(&result)) + 2;
    let escaped = |piece: &str| serde_json::to_string(piece).map_or(usize::MAX, |s| s.len());
    let mut pieces = Vec::new();
    let mut text = response.as_str();
    while !text.is_empty() {
        // Escaping lengthens a piece (quotes, backslashes, control
        // characters): shrink it in proportion until it fits.
        let mut cut = floor_char_boundary(text, room);
        loop {
            let len = escaped(&text[..cut]);
            if len <= room || cut == 0 {
                break;
            }
            cut = floor_char_boundary(text, cut * room / len);
        }
        if cut == 0 {
            // One character always fits.
            cut = text.chars().next().map_or(text.len(), char::len_utf8);
        }
        pieces.push(&text[..cut]);
        text = &text[cut..];
    }
    let of = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| TaskResult {
            response: Some(piece.to_owned()),
            part: Some(Part {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                of,
                nonce: nonce.to_owned(),
            }),
            ..result.clone()
        })
        .collect()
}

/// The largest character boundary of `s` at or before `at`
/// (`str::floor_char_boundary`, newer than the crate's MSRV).
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut at = at.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A tag no other publication of a result has: the worker, the time and a
/// count.
fn publication_nonce(worker: &str) -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    format!("{worker}-{nanos}-{n}")
}

/// The items of a failed call for the dead-letter file: JSON items, or the
/// base64 rows of an Arrow or Parquet call.
fn item_payload(payload: &str) -> Value {
    serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|mut v| {
            v.get_mut("items")
                .map(Value::take)
                .or_else(|| v.get_mut("arrow").map(Value::take))
                .or_else(|| v.get_mut("parquet").map(Value::take))
        })
        .unwrap_or(Value::Null)
}

/// The rows of a failed call whose columnar payload was staged as a file,
/// as JSON (as a local run's dead-letter line has them).
fn staged_items(payload: &str, file: &[u8]) -> Value {
    let field = serde_json::from_str::<Value>(payload)
        .ok()
        .and_then(|v| {
            ["parquet_file", "arrow_file"]
                .into_iter()
                .find(|f| v.get(f).is_some())
        })
        .unwrap_or("arrow_file");
    crate::attachment_rows(field, file)
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Tasks whose function call succeeded.
    pub succeeded: u64,
    /// Tasks whose function call failed (reported to the coordinator).
    pub failed: u64,
    /// Task messages that were not sluice tasks (skipped).
    pub malformed: u64,
}

/// A worker's settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs to serve (their tasks topics).
    pub jobs: Vec<String>,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Stop once no task arrived or finished for this long.
    pub stop_when_idle: Option<Duration>,
    /// Where the worker counts its calls per job (`sluice_job_*`), if
    /// anywhere.
    pub metrics: Option<Arc<Metrics>>,
}

/// Serves the tasks of `cfg.jobs` until `shutdown` resolves (or the worker
/// has been idle for `stop_when_idle`): invokes each task's function through
/// `executor`, publishes the result, then commits the task.
///
/// # Errors
/// Kafka errors setting up the consumer or producer.
pub async fn work(
    executor: &Executor,
    kafka: &KafkaSettings,
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<WorkerSummary, BackfillError> {
    if cfg.jobs.is_empty() {
        return Err(BackfillError::Config(
            "a worker needs at least one job".into(),
        ));
    }
    for job in &cfg.jobs {
        ensure_topics(kafka, job).await?;
    }
    let topics: Vec<String> = cfg.jobs.iter().map(|j| tasks_topic(j)).collect();
    let sink = kafka.sink("result")?;
    let concurrency = cfg.concurrency.max(1);
    let mut polled = Poller::start(
        "tasks",
        &kafka.consumer(&format!("sluice-backfill-{}-workers", cfg.jobs.join("+"))),
        &topics,
        concurrency,
    )?;
    let worker = format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut trackers: HashMap<(String, i32), OffsetTracker> = HashMap::new();
    let mut summary = WorkerSummary::default();
    let mut in_flight = 0usize;
    let mut last_activity = Instant::now();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let idle_left = cfg
            .stop_when_idle
            .map(|d| d.saturating_sub(last_activity.elapsed()));
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(done) = done_rx.recv() => {
                in_flight -= 1;
                last_activity = Instant::now();
                finish(done, &mut summary, &mut trackers, &polled);
            }
            m = polled.rx.recv(), if in_flight < concurrency => {
                let Some(m) = m else { break };
                last_activity = Instant::now();
                in_flight += 1;
                trackers
                    .entry((m.topic().to_owned(), m.partition()))
                    .or_default()
                    .dispatched(m.offset());
                let (ex, sink, worker, done) =
                    (executor.clone(), sink.clone(), worker.clone(), done_tx.clone());
                let metrics = cfg.metrics.clone();
                tokio::spawn(async move {
                    let outcome = handle_task(&ex, &sink, &worker, &m, metrics.as_deref()).await;
                    let _ = done.send((m.topic().to_owned(), m.partition(), m.offset(), outcome));
                });
            }
            () = tokio::time::sleep(idle_left.unwrap_or(IDLE_NEVER)), if idle_left.is_some() && in_flight == 0 => break,
        }
    }
    // Let calls in flight finish and commit them.
    while in_flight > 0 {
        let Some(done) = done_rx.recv().await else {
            break;
        };
        in_flight -= 1;
        finish(done, &mut summary, &mut trackers, &polled);
    }
    polled.close().await;
    Ok(summary)
}

/// Counts a finished task and commits what its partition allows.
fn finish(
    (topic, partition, offset, outcome): Done,
    summary: &mut WorkerSummary,
    trackers: &mut HashMap<(String, i32), OffsetTracker>,
    polled: &Poller,
) {
    match outcome {
        Outcome::Succeeded => summary.succeeded += 1,
        Outcome::Failed => summary.failed += 1,
        Outcome::Malformed => summary.malformed += 1,
        // Not answered: the offset stays uncommitted, so the task is
        // delivered again after a restart or rebalance.
        Outcome::Unanswered => return,
    }
    let t = trackers.entry((topic.clone(), partition)).or_default();
    t.finished(offset);
    if let Some(next) = t.take_committable() {
        polled.commit(&topic, partition, next);
    }
}

/// A finished task: topic, partition, offset and outcome.
type Done = (String, i32, i64, Outcome);

/// Stands for "no idle limit" in a `sleep`.
const IDLE_NEVER: Duration = Duration::from_secs(24 * 3600);

/// What became of one task message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeded,
    Failed,
    /// Not a sluice task: logged and committed.
    Malformed,
    /// The result could not be published: not committed.
    Unanswered,
}

async fn handle_task(
    executor: &Executor,
    sink: &Sink,
    worker: &str,
    m: &OwnedMessage,
    metrics: Option<&Metrics>,
) -> Outcome {
    let task: Task = match m.payload().map(serde_json::from_slice) {
        Some(Ok(t)) => t,
        _ => {
            tracing::error!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "skipping a message that is not a sluice task"
            );
            return Outcome::Malformed;
        }
    };
    let staged = match task.attachment.as_deref().map(|a| BASE64.decode(a)) {
        None => None,
        Some(Ok(bytes)) => Some(bytes::Bytes::from(bytes)),
        Some(Err(e)) => {
            tracing::error!(call = %task.call_id, error = %e, "skipping a task whose attachment is not base64");
            return Outcome::Malformed;
        }
    };
    let (payload, attachment) = match task.object_bytes {
        None => (task.payload.clone(), staged),
        Some(limit) => match object_event(&task, limit).await {
            Ok(staged) => staged,
            Err(not) => {
                let result = TaskResult {
                    call_id: task.call_id.clone(),
                    source: task.source.clone(),
                    count: task.count,
                    ok: false,
                    attempts: 0,
                    error_type: Some(not.error_type.to_owned()),
                    error: Some(not.message),
                    items: item_payload(&task.payload),
                    response: None,
                    first_item: task.first_item,
                    worker: worker.to_owned(),
                    part: None,
                };
                if let Some(m) = metrics {
                    m.job_call(&task.job, CallOutcome::Failed, task.count, 0);
                }
                return publish(sink, &task, vec![result]).await;
            }
        },
    };
    let (outcome, attempts) = crate::invoke_with_retries(
        executor,
        &task.function,
        &payload,
        attachment.clone(),
        task.max_attempts,
        |attempt, e| tracing::debug!(call = %task.call_id, attempt, error = %e, "retrying"),
    )
    .await;
    if let Some(m) = metrics {
        let retries = u64::from(attempts.saturating_sub(1));
        match &outcome {
            Ok(response) => {
                m.job_call(&task.job, CallOutcome::Succeeded, task.count, retries);
                m.observe_job_call(&task.job, response.duration.as_secs_f64());
            }
            Err(_) => m.job_call(&task.job, CallOutcome::Failed, task.count, retries),
        }
    }
    let result = match &outcome {
        Ok(response) => TaskResult {
            call_id: task.call_id.clone(),
            source: task.source.clone(),
            count: task.count,
            ok: true,
            attempts,
            error_type: None,
            error: None,
            items: Value::Null,
            response: task
                .keep_response
                .then(|| String::from_utf8_lossy(&response.payload).into_owned()),
            first_item: task.first_item,
            worker: worker.to_owned(),
            part: None,
        },
        Err(e) => TaskResult {
            call_id: task.call_id.clone(),
            source: task.source.clone(),
            count: task.count,
            ok: false,
            attempts,
            error_type: Some(e.error_type().to_owned()),
            error: Some(e.to_string()),
            items: match attachment.as_deref().filter(|_| task.attachment.is_some()) {
                Some(file) => staged_items(&payload, file),
                None => item_payload(&payload),
            },
            response: None,
            first_item: task.first_item,
            worker: worker.to_owned(),
            part: None,
        },
    };
    let nonce = publication_nonce(worker);
    publish(sink, &task, split_response(result, &nonce)).await
}

/// The event of an objects task, with the object fetched: its item
/// completed (`Size`, `LastModified`, `Etag`) and `"object_file"` naming
/// where the bytes are staged, as a local run sends it.
async fn object_event(
    task: &Task,
    limit: u64,
) -> Result<(String, Option<bytes::Bytes>), crate::source::NotFetched> {
    let fetched = crate::source::fetch_object(std::path::Path::new(&task.source), limit).await?;
    let Ok(mut event) = serde_json::from_str::<Value>(&task.payload) else {
        return Ok((task.payload.clone(), Some(fetched.bytes)));
    };
    if let Some(item) = event.get_mut("items").and_then(|i| i.get_mut(0)) {
        fetched.describe(item);
    }
    event["object_file"] = sluice_executor::ATTACHMENT_PATH.into();
    Ok((event.to_string(), Some(fetched.bytes)))
}

/// Publishes a task's result (one message, or the pieces of a split
/// response, all keyed by the call id: one partition, in order); the
/// task's outcome, or `Unanswered` if the result could not be published
/// (then the task stays uncommitted).
async fn publish(sink: &Sink, task: &Task, results: Vec<TaskResult>) -> Outcome {
    let ok = results.iter().all(|r| r.ok);
    let records: Vec<OutRecord> = results
        .iter()
        .map(|r| OutRecord {
            key: Some(task.call_id.clone().into_bytes()),
            value: Some(serde_json::to_vec(r).expect("a result serializes")),
            headers: Vec::new(),
            partition: None,
        })
        .collect();
    if let Err(e) = sink.send_all(&results_topic(&task.job), &records).await {
        tracing::error!(call = %task.call_id, error = %e, "cannot publish the result; the task stays uncommitted");
        return Outcome::Unanswered;
    }
    if ok {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(response: Option<String>) -> TaskResult {
        TaskResult {
            call_id: "c1".into(),
            source: "data/in.jsonl".into(),
            count: 100,
            ok: true,
            attempts: 1,
            error_type: None,
            error: None,
            items: Value::Null,
            response,
            first_item: 7,
            worker: "host-1".into(),
            part: None,
        }
    }

    /// A response JSON escaping lengthens: quotes and backslashes twice,
    /// control characters six times, multi-byte characters cut nowhere.
    fn awkward(bytes: usize) -> String {
        let unit = "\"é\\x\u{1}ü€😀 plain text ";
        unit.repeat(bytes / unit.len() + 1)
    }

    #[test]
    fn a_small_response_is_one_message() {
        let r = result(Some("{\"ok\":true}".into()));
        let pieces = split_response(r.clone(), "n");
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].part, None);
        let mut seen = Pieces::default();
        let whole = seen.add(pieces.into_iter().next().unwrap()).unwrap();
        assert_eq!(whole.response, r.response);
    }

    #[test]
    fn a_large_response_is_split_into_messages_that_fit_and_put_back_together() {
        let text = awkward(5_900_000);
        let pieces = split_response(result(Some(text.clone())), "w-1");
        assert!(pieces.len() > 6, "{} pieces", pieces.len());
        for p in &pieces {
            let bytes = serde_json::to_vec(p).unwrap().len();
            assert!(bytes <= MAX_RESULT_BYTES, "{bytes} bytes");
            assert_eq!((p.first_item, p.count), (7, 100));
        }
        // Pieces in any order, and pieces of another publication of the
        // same call (a call answered twice) interleaved with them.
        let other = split_response(result(Some(awkward(2_000_000))), "w-2");
        let mut seen = Pieces::default();
        let mut order: Vec<TaskResult> = pieces.into_iter().rev().collect();
        let last = order.remove(0);
        for (i, p) in order.into_iter().enumerate() {
            assert!(seen.add(p).is_none());
            if let Some(o) = other.get(i + 1) {
                assert!(seen.add(o.clone()).is_none());
            }
        }
        let whole = seen.add(last).expect("the last piece completes it");
        assert_eq!(whole.part, None);
        assert_eq!(whole.response.as_deref(), Some(text.as_str()));
        assert_eq!((whole.call_id.as_str(), whole.first_item), ("c1", 7));
        // The other publication's pieces were dropped with it, and its
        // later ones are not kept.
        assert!(seen.add(other[0].clone()).is_none());
        assert!(seen.calls.is_empty());
    }

    /// A failed call's staged Arrow stream or Parquet file comes back as
    /// JSON rows for the dead-letter file, as a local run writes them.
    #[test]
    fn staged_payloads_of_failed_calls_are_dead_lettered_as_rows() {
        use arrow_array::{ArrayRef, Int64Array, RecordBatch};
        let batch =
            RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef)])
                .unwrap();
        let stream =
            crate::read::ipc_stream(std::slice::from_ref(&batch), crate::ArrowCompression::None);
        let mut parquet = Vec::new();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(&mut parquet, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let rows = serde_json::json!([{"n": 1}, {"n": 2}]);
        let event = |field: &str| format!("{{\"{field}\":\"/run/sluice/payload\",\"batch\":{{}}}}");
        assert_eq!(staged_items(&event("arrow_file"), &stream), rows);
        assert_eq!(staged_items(&event("parquet_file"), &parquet), rows);
        let broken = staged_items(&event("parquet_file"), b"not parquet");
        assert!(
            broken.as_str().unwrap().starts_with("rows not readable"),
            "{broken}"
        );
    }

    #[test]
    fn pieces_out_of_range_are_ignored() {
        let mut seen = Pieces::default();
        for (index, of) in [(3, 2), (0, u32::MAX)] {
            let mut r = result(Some("x".into()));
            r.part = Some(Part {
                index,
                of,
                nonce: "n".into(),
            });
            assert!(seen.add(r).is_none());
        }
        assert!(seen.calls.is_empty());
    }

    #[test]
    fn a_huge_error_message_is_cut_to_fit() {
        let mut r = result(None);
        r.ok = false;
        r.error = Some(awkward(3_000_000));
        let pieces = split_response(r, "n");
        assert_eq!(pieces.len(), 1);
        let error = pieces[0].error.as_deref().unwrap();
        assert!(error.len() < MAX_ERROR_BYTES + 64, "{}", error.len());
        assert!(error.ends_with("more bytes)"), "{error}");
        assert!(serde_json::to_vec(&pieces[0]).unwrap().len() <= MAX_RESULT_BYTES);
    }
}
