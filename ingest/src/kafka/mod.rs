//! Kafka triggers: consumer groups feeding functions with Lambda's Kafka
//! event-source-mapping semantics.
//!
//! ## Threads and ownership
//! * One **poll thread** per trigger (a named `std::thread`) owns the
//!   `BaseConsumer`: it polls, detaches every message into an owned
//!   [`Record`] at once (no borrowed message outlives a poll, so dropping the
//!   consumer cannot hang on held messages), routes records to their
//!   partition's lane, and is the only place that commits, pauses and
//!   resumes. Lanes talk to it through a `Control` channel.
//! * One **lane** per assigned partition (tokio tasks): a dispatcher hashes
//!   records by key onto `parallelization_factor` sub-lanes; each sub-lane
//!   runs one batch at a time, in offset order (see `lane.rs`).
//! * Offsets are committed only up to the lowest record not yet finished
//!   (succeeded, filtered out, or durably written to the on-failure topic).
//!
//! ## Rebalances and shutdown
//! On revocation the poll thread (inside librdkafka's rebalance callback)
//! stops the revoked lanes: in-flight invocations finish, nothing new starts,
//! no further retries; then it commits what finished, synchronously, before
//! the partitions move. Newly assigned partitions start at their committed
//! offsets. Shutdown does the same for every lane, then closes the consumer.

mod client_log;
mod embedded;
mod failure_objects;
pub(crate) mod lane;
mod offsets;
mod sink;
mod stateful;
mod txn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Timestamp};
use sluice_executor::Executor;
use sluice_pipeline::{KafkaTrigger, OnFailure, StartingPosition};
use tokio::sync::watch;

pub use client_log::{KafkaLog, LoggedContext};
pub use embedded::{EmbeddedBroker, RETAINED_BYTES_PER_PARTITION};
pub use offsets::OffsetTracker;
pub use sink::{Loaded, OutRecord, Sink, produce_file};

use crate::IngestError;
use crate::metrics::Metrics;
use crate::record::{Record, TimestampType, Topic};

/// Requests from lanes to the poll thread.
#[derive(Debug)]
enum Control {
    Commit {
        topic: String,
        partition: i32,
        offset: i64,
    },
    Resume {
        topic: String,
        partition: i32,
    },
}

/// Activity counters shared by every trigger of a `sluice run`, used to
/// decide when a run is idle.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last_ms: AtomicU64,
    /// Records received and not yet finished.
    pub backlog: AtomicI64,
    /// Records received.
    pub records: AtomicU64,
    /// Triggers that received their first partition assignment.
    pub triggers_assigned: AtomicU64,
    /// When the first record was received.
    first_record: OnceLock<Instant>,
    /// Woken whenever the backlog drops to zero.
    drained: tokio::sync::Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            backlog: AtomicI64::new(0),
            records: AtomicU64::new(0),
            triggers_assigned: AtomicU64::new(0),
            first_record: OnceLock::new(),
            drained: tokio::sync::Notify::new(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::SeqCst);
    }

    /// `n` records arrived.
    pub(crate) fn received(&self, n: usize) {
        // Backlog first: whoever sees the records counted sees them
        // unfinished.
        self.backlog.fetch_add(n as i64, Ordering::SeqCst);
        self.records.fetch_add(n as u64, Ordering::SeqCst);
        self.first_record.get_or_init(Instant::now);
        self.touch();
    }

    /// `n` received records were finished, or abandoned to a rebalance.
    pub(crate) fn finished(&self, n: usize) {
        self.touch();
        if self.backlog.fetch_sub(n as i64, Ordering::SeqCst) - n as i64 <= 0 {
            self.drained.notify_waiters();
        }
    }

    /// Time since a record last arrived or finished.
    pub fn idle_for(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::SeqCst)))
    }

    /// When the first record arrived, if one did.
    pub fn first_record(&self) -> Option<Instant> {
        self.first_record.get().copied()
    }

    /// Wait until at least `records` records arrived and none is left
    /// unfinished (woken by the lanes, not by polling).
    pub async fn wait_drained(&self, records: u64) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.records.load(Ordering::SeqCst) >= records
                && self.backlog.load(Ordering::SeqCst) <= 0
            {
                return;
            }
            notified.await;
        }
    }
}

/// What lanes of one trigger share.
struct TriggerShared {
    trigger: KafkaTrigger,
    executor: Executor,
    metrics: Arc<Metrics>,
    sink: Option<Sink>,
    /// With `on_failure` as a folder or object store prefix: where failed
    /// records go.
    failure_objects: Option<failure_objects::FailureObjects>,
    /// With `exactly_once`: output and offsets in one transaction; the
    /// consumer never commits by itself.
    txn: Option<txn::Transactional>,
    servers: String,
    /// Stateful triggers: where checkpoints go.
    state_store: Option<Arc<dyn sluice_state_carrier::Store>>,
    /// The cluster the offsets belong to, recorded in checkpoints: the
    /// cluster id, or `embedded-<pid>-<time>` for this run's embedded
    /// broker (whose records die with it); empty if unknown.
    cluster_id: Mutex<String>,
    control: mpsc::Sender<Control>,
    activity: Arc<Activity>,
    runtime: tokio::runtime::Handle,
    high_water: usize,
    low_water: usize,
    /// Lines about failed batches and records (see
    /// [`crate::FAILURE_LOG_LINES_PER_SEC`]).
    failure_log: sluice_executor::LogRateLimiter,
}

/// The consumer's context: owns the lanes, runs the rebalance protocol.
struct Ctx {
    shared: Arc<TriggerShared>,
    lanes: Mutex<HashMap<(String, i32), lane::LaneHandle>>,
    control_rx: Mutex<mpsc::Receiver<Control>>,
    committed: Mutex<HashMap<(String, i32), i64>>,
    revoke_timeout: Duration,
    first_assignment: AtomicBool,
    /// Partitions revoked since the poll loop last looked, and how many
    /// revocations there were in all. Rebalance callbacks run inside
    /// `poll`, in the middle of a burst: records of the burst polled before
    /// a revocation, for a revoked partition, must not reach a lane (the
    /// partition's next owner, or this consumer after a reassignment, reads
    /// them again from the committed offset). The count lets the loop notice
    /// a revocation with a plain load per record instead of a lock.
    revoked: Mutex<Vec<(String, i32)>>,
    revocations: AtomicU64,
    /// librdkafka's logs and errors, and those `poll` returns, collapsed
    /// while they repeat (a broker that is down).
    log: KafkaLog,
}

impl ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.client_error(&error, reason);
    }
}

impl Ctx {
    /// A client error, from librdkafka's error callback or from `poll`:
    /// counted, and logged unless it repeats.
    fn client_error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        self.shared
            .metrics
            .kafka_client_error(&self.shared.trigger.name, &client_log::error_kind(error));
        self.log.error(error, reason);
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(trigger = %self.shared.trigger.name, partitions = ?parts, "partitions revoked: finishing in-flight batches");
            // Records of the current burst for these partitions are dropped
            // by the poll loop (see `revoked`).
            self.revoked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(parts.iter().cloned());
            self.revocations.fetch_add(1, Ordering::SeqCst);
            self.stop_lanes(Some(&parts));
            self.apply_control(consumer, CommitMode::Sync);
            for (t, p) in &parts {
                self.shared
                    .metrics
                    .remove_partition(&self.shared.trigger.name, t, *p);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<(String, i32)> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            tracing::info!(trigger = %self.shared.trigger.name, partitions = ?parts, "partitions assigned");
            // A timestamp starting position reads from the earliest offset
            // and finishes (commits) the records older than the cut, until the
            // first one at or after it. (Seeking by offsets_for_times would
            // read less, but the embedded broker cannot look offsets up by
            // time, and this is correct on every broker.)
            let fresh = match self.shared.trigger.starting_position {
                StartingPosition::Timestamp(_) => self.uncommitted(consumer, tpl),
                _ => Vec::new(),
            };
            {
                let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
                for (t, p) in &parts {
                    let skip_before = match self.shared.trigger.starting_position {
                        StartingPosition::Timestamp(ms) if fresh.contains(&(t.clone(), *p)) => {
                            Some(ms)
                        }
                        _ => None,
                    };
                    lanes.entry((t.clone(), *p)).or_insert_with(|| {
                        lane::spawn(self.shared.clone(), t.clone(), *p, skip_before)
                    });
                }
            }
            if let (Some(txn), Some(g)) = (&self.shared.txn, consumer.group_metadata()) {
                txn.set_group(g);
            }
            self.shared.activity.touch();
            if !self.first_assignment.swap(true, Ordering::SeqCst) {
                self.shared
                    .activity
                    .triggers_assigned
                    .fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

impl Ctx {
    /// Stop lanes (all, or those listed) and wait for them to finish their
    /// in-flight batch.
    fn stop_lanes(&self, only: Option<&[(String, i32)]>) {
        let stopped: Vec<lane::LaneHandle> = {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = match only {
                Some(list) => list.to_vec(),
                None => lanes.keys().cloned().collect(),
            };
            keys.iter().filter_map(|k| lanes.remove(k)).collect()
        };
        for l in &stopped {
            let _ = l.stop.send(true);
        }
        let deadline = Instant::now() + self.revoke_timeout;
        for l in stopped {
            let left = deadline.saturating_duration_since(Instant::now());
            if l.done.recv_timeout(left).is_err() {
                tracing::warn!(trigger = %self.shared.trigger.name, "a lane did not stop within {:?}; its records will be redelivered", self.revoke_timeout);
            }
            let backlog = l.backlog.load(Ordering::SeqCst);
            self.shared.activity.finished(backlog);
        }
    }

    /// Apply queued commits (latest offset per partition) and resumes.
    fn apply_control(&self, consumer: &BaseConsumer<Self>, mode: CommitMode) {
        let mut latest: HashMap<(String, i32), i64> = HashMap::new();
        let mut resume: Option<TopicPartitionList> = None;
        {
            let rx = self.control_rx.lock().unwrap_or_else(|p| p.into_inner());
            while let Ok(c) = rx.try_recv() {
                match c {
                    Control::Commit {
                        topic,
                        partition,
                        offset,
                    } => {
                        let e = latest.entry((topic, partition)).or_insert(offset);
                        *e = (*e).max(offset);
                    }
                    Control::Resume { topic, partition } => {
                        resume
                            .get_or_insert_with(TopicPartitionList::new)
                            .add_partition(&topic, partition);
                    }
                }
            }
        }
        if let Some(resume) = resume {
            let _ = consumer.resume(&resume);
        }
        if latest.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &latest {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                let mut c = self.committed.lock().unwrap_or_else(|p| p.into_inner());
                c.extend(latest);
            }
            Err(e) => {
                tracing::warn!(trigger = %self.shared.trigger.name, "commit failed (will be retried by later commits): {e}")
            }
        }
    }

    /// Partitions (of `tpl`) with no committed offset for this group: they
    /// start at the starting position.
    fn uncommitted(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Vec<(String, i32)> {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c
                .elements()
                .iter()
                .filter(|e| !matches!(e.offset(), Offset::Offset(_)))
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(e) => {
                tracing::warn!(
                    "reading committed offsets failed: {e}; starting every partition at the starting position"
                );
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect()
            }
        }
    }
}

/// Bytes of key and value copied into one shared buffer before a new one is
/// taken: records are slices of it, so a burst of small records costs one
/// allocation, not two per record (and one free, on whichever thread drops
/// the last slice).
const ARENA_BYTES: usize = 256 * 1024;

/// Copy `bytes` into the arena and take them out as a shared slice.
fn carve(arena: &mut BytesMut, bytes: &[u8]) -> Bytes {
    if arena.capacity() - arena.len() < bytes.len() {
        *arena = BytesMut::with_capacity(ARENA_BYTES.max(bytes.len()));
    }
    arena.extend_from_slice(bytes);
    arena.split().freeze()
}

/// Copy a message into a [`Record`] (key and value into `arena`); `topic` is
/// the last topic seen, reused while messages name the same one.
fn to_record<M: Message>(m: &M, topic: &mut Option<Topic>, arena: &mut BytesMut) -> Record {
    let (timestamp_ms, timestamp_type) = match m.timestamp() {
        Timestamp::CreateTime(t) => (t, TimestampType::CreateTime),
        Timestamp::LogAppendTime(t) => (t, TimestampType::LogAppendTime),
        Timestamp::NotAvailable => (0, TimestampType::NotAvailable),
    };
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: match topic {
            Some(t) if &**t == m.topic() => *t,
            _ => *topic.insert(Topic::new(m.topic())),
        },
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms,
        timestamp_type,
        key: m.key().map(|k| carve(arena, k)),
        value: m.payload().map(|v| carve(arena, v)),
        headers,
    }
}

/// Everything a trigger needs to run.
#[derive(Debug, Clone)]
pub struct TriggerEnv {
    /// The executor with the trigger's function registered.
    pub executor: Executor,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Resolved `bootstrap.servers` (the embedded broker's address for
    /// `"embedded"`).
    pub servers: String,
    /// Shared activity counters.
    pub activity: Arc<Activity>,
    /// Records buffered per partition (received, not finished) before the
    /// partition is paused; it resumes at half. At least a few batches per
    /// sub-lane is enforced. See [`DEFAULT_MAX_BUFFERED_RECORDS`].
    pub max_buffered_records: usize,
}

/// Default of [`TriggerEnv::max_buffered_records`]: pausing makes the next
/// fetch wait, so it should be rare.
pub const DEFAULT_MAX_BUFFERED_RECORDS: usize = 20_000;

/// Run one Kafka trigger until `shutdown` turns true, then drain and commit.
pub async fn run_trigger(
    trigger: KafkaTrigger,
    env: TriggerEnv,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let name = trigger.name.clone();
    let kerr = |what: &str| {
        let name = name.clone();
        let what = what.to_owned();
        move |source: rdkafka::error::KafkaError| IngestError::Kafka {
            trigger: name.clone(),
            what: what.clone(),
            source: Box::new(source),
        }
    };
    let props: Vec<(String, String)> = trigger
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let to_topic = matches!(trigger.on_failure, Some(OnFailure::Topic(_)));
    let sink = if to_topic || trigger.output_topic.is_some() {
        Some(Sink::new(&name, &env.servers, &props)?)
    } else {
        None
    };
    let failure_objects = match &trigger.on_failure {
        Some(OnFailure::Objects(url)) => Some(failure_objects::FailureObjects::open(&name, url)?),
        _ => None,
    };
    if trigger.exactly_once && trigger.parallelization_factor > 1 {
        return Err(IngestError::Config {
            trigger: trigger.name.clone(),
            message: "exactly_once needs parallelization_factor = 1: with concurrent batches in a partition, an output could be committed before the offsets below it".into(),
        });
    }
    let txn = if trigger.exactly_once {
        Some(txn::Transactional::start(&name, &trigger.group_id, &env.servers, &props).await?)
    } else {
        None
    };
    let state_store = match &trigger.state {
        Some(cfg) => Some(
            sluice_state_carrier::open_store(cfg, &env.servers, &props)
                .await
                .map_err(|source| IngestError::State {
                    trigger: trigger.name.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let (control_tx, control_rx) = mpsc::channel();
    let high_water = env
        .max_buffered_records
        .max(trigger.batch_size as usize * trigger.parallelization_factor.max(1) as usize * 2);
    let function_timeout = Duration::from_secs(900);
    let shared = Arc::new(TriggerShared {
        executor: env.executor.clone(),
        metrics: env.metrics.clone(),
        sink,
        failure_objects,
        txn,
        servers: env.servers.clone(),
        state_store,
        cluster_id: Mutex::new(String::new()),
        control: control_tx,
        activity: env.activity.clone(),
        runtime: tokio::runtime::Handle::current(),
        high_water,
        low_water: high_water / 2,
        failure_log: crate::failure_log(),
        trigger,
    });
    let t = &shared.trigger;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &env.servers)
        .set("group.id", &t.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "auto.offset.reset",
            match t.starting_position {
                StartingPosition::Latest => "latest",
                StartingPosition::Earliest | StartingPosition::Timestamp(_) => "earliest",
            },
        )
        .set("isolation.level", "read_committed")
        // Low latency at the end of the log (librdkafka waits 500 ms by
        // default); overridable through the trigger's properties.
        .set("fetch.wait.max.ms", "50");
    for (k, v) in &props {
        cfg.set(k, v);
    }
    let ctx = Ctx {
        shared: shared.clone(),
        lanes: Mutex::new(HashMap::new()),
        control_rx: Mutex::new(control_rx),
        committed: Mutex::new(HashMap::new()),
        revoke_timeout: function_timeout,
        first_assignment: AtomicBool::new(false),
        revoked: Mutex::new(Vec::new()),
        revocations: AtomicU64::new(0),
        log: KafkaLog::new(format!("trigger {}", t.name), env.servers.clone()),
    };
    let consumer: BaseConsumer<Ctx> = cfg
        .create_with_context(ctx)
        .map_err(kerr("creating the consumer"))?;
    if shared.state_store.is_some() {
        let id = match t.bootstrap_servers {
            sluice_pipeline::BootstrapServers::Embedded => format!(
                "embedded-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            sluice_pipeline::BootstrapServers::Servers(_) => consumer
                .client()
                .fetch_cluster_id(Duration::from_secs(10))
                .unwrap_or_default(),
        };
        *shared.cluster_id.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }
    let topics: Vec<&str> = t.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(kerr("subscribing"))?;
    tracing::info!(trigger = %t.name, topics = ?t.topics, group = %t.group_id, function = %t.function, "trigger started");
    if matches!(
        t.bootstrap_servers,
        sluice_pipeline::BootstrapServers::Embedded
    ) {
        // A first-time user sees nothing for these seconds otherwise.
        tracing::info!(trigger = %t.name, "the embedded broker assigns partitions after about 3 s (its group.initial.rebalance.delay.ms, as Kafka's default)");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let stop = stop.clone();
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("kafka-poll-{}", shared.trigger.name))
            .spawn(move || poll_loop(consumer, shared, stop))
            .map_err(|e| IngestError::Config {
                trigger: name.clone(),
                message: format!("starting the poll thread: {e}"),
            })?
    };
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || poll.join()).await;
    let held_back = shared.failure_log.take_dropped();
    if held_back > 0 {
        tracing::info!(trigger = %name, held_back, "{held_back} log lines about failed batches and records were held back (at most {} a second are written; /metrics and the on-failure topic count every one)", crate::FAILURE_LOG_LINES_PER_SEC);
    }
    tracing::info!(trigger = %name, "trigger stopped");
    Ok(())
}

/// Records taken from the consumer in one go before they are handed to their
/// lanes: per-record hand-offs (a channel send and a task wake-up each) would
/// cost more than the poll itself.
const POLL_BURST: usize = 1024;

fn poll_loop(consumer: BaseConsumer<Ctx>, shared: Arc<TriggerShared>, stop: Arc<AtomicBool>) {
    let mut last_lag = Instant::now();
    let mut topic: Option<Topic> = None;
    let mut arena = BytesMut::with_capacity(ARENA_BYTES);
    let mut polled: Vec<Record> = Vec::with_capacity(POLL_BURST);
    let mut revocations = consumer.context().revocations.load(Ordering::SeqCst);
    while !stop.load(Ordering::SeqCst) {
        // Wait for one record, then take what is already fetched (no wait).
        let mut timeout = Duration::from_millis(50);
        for _ in 0..POLL_BURST {
            let next = consumer.poll(timeout);
            let seen = consumer.context().revocations.load(Ordering::Relaxed);
            if seen != revocations {
                // A revocation ran inside that poll.
                revocations = seen;
                let ctx = consumer.context();
                let revoked =
                    std::mem::take(&mut *ctx.revoked.lock().unwrap_or_else(|p| p.into_inner()));
                drop_revoked(&revoked, &mut polled);
            }
            match next {
                Some(Ok(m)) => polled.push(to_record(&m, &mut topic, &mut arena)),
                Some(Err(e)) => consumer.context().client_error(&e, ""),
                None => break,
            }
            timeout = Duration::ZERO;
        }
        flush_polled(&consumer, &shared, &mut polled);
        consumer
            .context()
            .apply_control(&consumer, CommitMode::Async);
        if last_lag.elapsed() >= Duration::from_secs(2) {
            update_lag(&consumer, &shared);
            last_lag = Instant::now();
        }
    }
    // Graceful stop: no new batches; in-flight ones finish; commit; close.
    let ctx = consumer.context();
    ctx.stop_lanes(None);
    ctx.apply_control(&consumer, CommitMode::Sync);
    consumer.unsubscribe();
    drop(consumer);
}

/// Forget the records of `polled` whose partition is in `revoked`: their
/// lanes are gone, and they will be read again from the committed offset by
/// whoever owns the partition next.
fn drop_revoked(revoked: &[(String, i32)], polled: &mut Vec<Record>) {
    polled.retain(|r| {
        !revoked
            .iter()
            .any(|(t, p)| *p == r.partition && **t == *r.topic)
    });
}

/// Hand the records of the current burst to their lanes, one chunk per run
/// of records of the same partition (order within a partition is kept).
fn flush_polled(
    consumer: &BaseConsumer<Ctx>,
    shared: &Arc<TriggerShared>,
    polled: &mut Vec<Record>,
) {
    // Runs first, then each run moved into a chunk of its exact size;
    // `polled` keeps its capacity for the next burst.
    let runs = partition_runs(polled);
    let mut records = polled.drain(..);
    for run in runs {
        let chunk: Vec<Record> = records.by_ref().take(run).collect();
        route(consumer, shared, chunk);
    }
}

/// Lengths of the runs of consecutive records of one partition.
fn partition_runs(polled: &[Record]) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < polled.len() {
        let first = &polled[start];
        let run = polled[start..]
            .iter()
            .take_while(|r| r.partition == first.partition && r.topic == first.topic)
            .count();
        runs.push(run);
        start += run;
    }
    runs
}

/// Hand records of one partition to its lane (started if needed), and pause
/// the partition if its lane holds too many.
fn route(consumer: &BaseConsumer<Ctx>, shared: &Arc<TriggerShared>, chunk: Vec<Record>) {
    let ctx = consumer.context();
    let n = chunk.len();
    let (topic, partition) = (chunk[0].topic.to_string(), chunk[0].partition);
    let mut lanes = ctx.lanes.lock().unwrap_or_else(|p| p.into_inner());
    let lane = lanes
        .entry((topic.clone(), partition))
        .or_insert_with(|| lane::spawn(shared.clone(), topic.clone(), partition, None));
    shared
        .metrics
        .records_in(&shared.trigger.name, &topic, partition, n as u64);
    shared.activity.received(n);
    let backlog = lane.backlog.fetch_add(n, Ordering::SeqCst) + n;
    if lane.tx.send(chunk).is_err() {
        return;
    }
    if backlog >= shared.high_water && !lane.paused.swap(true, Ordering::SeqCst) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, partition);
        if let Err(e) = consumer.pause(&tpl) {
            tracing::warn!("pausing {topic}-{partition} failed: {e}");
            lane.paused.store(false, Ordering::SeqCst);
        } else {
            shared
                .metrics
                .partition_paused(&shared.trigger.name, &topic, partition);
        }
    }
}

fn update_lag(consumer: &BaseConsumer<Ctx>, shared: &Arc<TriggerShared>) {
    let ctx = consumer.context();
    let parts: Vec<(String, i32)> = ctx
        .lanes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    let committed = ctx
        .committed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (t, p) in parts {
        if let Ok((_low, high)) = consumer.fetch_watermarks(&t, p, Duration::from_millis(200)) {
            let done = committed.get(&(t.clone(), p)).copied().unwrap_or(0);
            shared
                .metrics
                .set_lag(&shared.trigger.name, &t, p, (high - done).max(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: 0,
            timestamp_type: TimestampType::CreateTime,
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_revocation_drops_only_the_revoked_partitions_records_in_a_burst() {
        let mut polled = vec![
            rec("a", 0, 1),
            rec("a", 1, 7),
            rec("b", 0, 3),
            rec("a", 0, 2),
            rec("a", 1, 8),
        ];
        drop_revoked(&[("a".into(), 0), ("b".into(), 1)], &mut polled);
        let left: Vec<(&str, i32, i64)> = polled
            .iter()
            .map(|r| (&*r.topic, r.partition, r.offset))
            .collect();
        assert_eq!(left, [("a", 1, 7), ("b", 0, 3), ("a", 1, 8)]);
    }

    #[test]
    fn a_burst_is_cut_into_one_chunk_per_run_of_a_partition() {
        let polled = [
            rec("a", 0, 1),
            rec(&String::from("a"), 0, 2), // the same name, interned once
            rec("a", 1, 5),
            rec("a", 0, 3),
        ];
        let runs = partition_runs(&polled);
        assert_eq!(runs, [2, 1, 1]);
    }
}
