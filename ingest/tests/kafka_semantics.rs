//! Lambda's Kafka event-source-mapping semantics, end to end in one process:
//! a Kafka-protocol broker (a `MockCluster` the test starts, or the external
//! cluster of `SLUICE_TEST_KAFKA`, see `sluice_test_support::kafka`),
//! [`run_trigger`] and real sandboxes running the `misbehave` test function
//! in Kafka mode (`MISBEHAVE_KAFKA`).
//!
//! Tests use short topic and group names (`in`, `dlq`, `g`); on an external
//! cluster [`Kafka`] maps them to unique ones ([`TestKafka::name`]), in its
//! own methods and in the trigger settings of [`Setup::pipeline`].
//!
//! What the function saw is its own record, the `BATCH`/`SEEN` lines it
//! writes to stderr (collected through the executor's log sink); what left
//! sluice is read back from the on-failure and output topics; progress is
//! the consumer group's committed offsets. Tests wait by polling (the log,
//! a consumer, the trigger's activity counters) under a deadline.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, LogLine, LogSink, LogStream};
use sluice_ingest::IngestError;
use sluice_ingest::kafka::{Activity, TriggerEnv, run_trigger};
use sluice_ingest::metrics::Metrics;
use sluice_pipeline::{BootstrapServers, Pipeline};
use sluice_test_support::kafka::TestKafka;
use sluice_test_support::stores::{Remote, fresh_prefix};
use sluice_test_support::{FunctionFixture, Lines, agent_binary, function_fixture};
use tempfile::TempDir;
use tokio::sync::watch;

/// Longest wait for an expected outcome (a first group join takes ~3 s on
/// the mock cluster, a rebalance longer).
const DEADLINE: Duration = Duration::from_secs(60);

/// Trigger settings most tests share: read what is already there, short
/// batch window and retry backoff.
const QUICK: &str = r#"
starting_position = "earliest"
batch_window = "100ms"
retry_backoff = "10ms"
"#;

// ---------------------------------------------------------------------------
// The function's record of what it saw.

/// One record as the function saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    topic: String,
    partition: i32,
    offset: i64,
    value: String,
}

/// One invocation as the function saw it.
#[derive(Debug, Clone)]
struct Batch {
    /// `ok`, `fail` or `partial:<n>`.
    outcome: String,
    expected: usize,
    records: Vec<Seen>,
}

impl Batch {
    fn ok(&self) -> bool {
        self.outcome != "fail"
    }

    fn offsets(&self) -> Vec<i64> {
        self.records.iter().map(|r| r.offset).collect()
    }

    fn partition(&self) -> i32 {
        let p = self.records[0].partition;
        assert!(
            self.records.iter().all(|r| r.partition == p),
            "a batch spans partitions: {self:?}"
        );
        p
    }
}

/// Function log lines, to wait on.
#[derive(Default)]
struct Log {
    lines: Lines,
}

impl Log {
    fn sink(self: &Arc<Self>) -> LogSink {
        let me = self.clone();
        Arc::new(move |l: LogLine| {
            if l.stream != LogStream::Agent {
                me.lines.push(l.line);
            }
        })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.snapshot()
    }

    /// Complete batches, in the order the function saw them.
    fn batches(&self) -> Vec<Batch> {
        parse_batches(&self.lines())
    }

    /// Wait until `pred` holds for the batches seen so far; false at the
    /// deadline. Also wakes up every 50 ms so callers may poll other state.
    fn wait(&self, timeout: Duration, pred: impl Fn(&[Batch]) -> bool) -> bool {
        self.lines
            .wait_for(timeout, |lines| pred(&parse_batches(lines)).then_some(()))
            .is_some()
    }

    fn wait_or_panic(&self, what: &str, pred: impl Fn(&[Batch]) -> bool) -> Vec<Batch> {
        if !self.wait(DEADLINE, &pred) {
            panic!(
                "timed out after {DEADLINE:?} waiting for: {what}\nfunction log:\n{}",
                self.lines().join("\n")
            );
        }
        self.batches()
    }
}

fn parse_batches(lines: &[String]) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("BATCH ") {
            let (n, outcome) = rest.split_once(' ').expect("BATCH <n> <outcome>");
            out.push(Batch {
                outcome: outcome.to_owned(),
                expected: n.parse().expect("BATCH <n>"),
                records: Vec::new(),
            });
        } else if let Some(rest) = l.strip_prefix("SEEN ") {
            let (id, value) = rest.split_once(' ').unwrap_or((rest, ""));
            let (tp, offset) = id.rsplit_once('@').expect("SEEN <tp>@<offset>");
            let (topic, partition) = tp.rsplit_once('-').expect("SEEN <topic>-<partition>");
            out.last_mut()
                .expect("a SEEN line before any BATCH line")
                .records
                .push(Seen {
                    topic: topic.to_owned(),
                    partition: partition.parse().expect("partition"),
                    offset: offset.parse().expect("offset"),
                    value: value.to_owned(),
                });
        }
    }
    if out.last().is_some_and(|b| b.records.len() < b.expected) {
        out.pop();
    }
    out
}

/// Values of the records seen in successful batches, in order.
fn delivered(batches: &[Batch]) -> Vec<String> {
    batches
        .iter()
        .filter(|b| b.ok())
        .flat_map(|b| b.records.iter().map(|r| r.value.clone()))
        .collect()
}

/// Values of every record seen, in order (retries included).
fn seen_values(batches: &[Batch]) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.value.clone()))
        .collect()
}

// ---------------------------------------------------------------------------
// The broker.

struct Kafka {
    broker: TestKafka,
    /// The test's topic names (as the test spells them).
    topics: Vec<String>,
    servers: String,
    producer: BaseProducer,
}

/// A record to produce.
#[derive(Default)]
struct Out<'a> {
    partition: i32,
    key: Option<&'a str>,
    value: &'a [u8],
    headers: &'a [(&'a str, &'a str)],
    timestamp: Option<i64>,
}

impl Kafka {
    fn start(topics: &[(&str, i32)]) -> Self {
        let broker = TestKafka::start();
        for (t, p) in topics {
            broker.create_topic(&broker.name(t), *p);
        }
        let servers = broker.servers().to_owned();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &servers)
            .set("message.timeout.ms", "20000")
            .create()
            .expect("producer");
        Self {
            topics: topics.iter().map(|(t, _)| (*t).to_owned()).collect(),
            broker,
            servers,
            producer,
        }
    }

    /// The broker's name for the test's topic or group `name`.
    fn name(&self, name: &str) -> String {
        self.broker.name(name)
    }

    /// Trigger settings with the test's topic names (quoted) replaced by
    /// the broker's.
    fn map_topics(&self, trigger: &str) -> String {
        let mut out = trigger.to_owned();
        for t in &self.topics {
            out = out.replace(&format!("\"{t}\""), &format!("\"{}\"", self.name(t)));
        }
        out
    }

    fn client(&self, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", self.name(group))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer")
    }

    fn send(&self, topic: &str, r: Out<'_>) {
        let topic = &self.name(topic);
        let mut headers = OwnedHeaders::new();
        for (k, v) in r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .partition(r.partition)
            .payload(r.value)
            .headers(headers);
        if let Some(k) = r.key {
            rec = rec.key(k);
        }
        if let Some(ts) = r.timestamp {
            rec = rec.timestamp(ts);
        }
        self.producer
            .send(rec)
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    /// Produce a plain record.
    fn produce(&self, topic: &str, partition: i32, key: Option<&str>, value: &str) {
        self.send(
            topic,
            Out {
                partition,
                key,
                value: value.as_bytes(),
                ..Out::default()
            },
        );
    }

    fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(20))
            .expect("flushing the producer");
    }

    fn end_offsets(&self, topic: &str, partitions: i32) -> Vec<i64> {
        let c = self.client("sluice-test-watermarks");
        let topic = &self.name(topic);
        (0..partitions)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("watermarks of {topic}-{p}: {e}"))
                    .1
            })
            .collect()
    }

    /// The group's committed offsets (-1 when none). The consumer asking is
    /// never subscribed, so it does not join the group.
    fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
        let c = self.client(group);
        let topic = &self.name(topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// Every record of a topic (all partitions), read from the beginning up
    /// to the current end.
    fn read_all(&self, topic: &str, partitions: i32) -> Vec<OwnedMessage> {
        let want: i64 = self.end_offsets(topic, partitions).iter().sum();
        self.read_until(topic, partitions, |m| m.len() as i64 >= want)
    }

    /// Read a topic from the beginning until `pred` holds for what was read.
    fn read_until(
        &self,
        topic: &str,
        partitions: i32,
        pred: impl Fn(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let c = self.client("sluice-test-reader");
        let topic = &self.name(topic);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("offset");
        }
        c.assign(&tpl).expect("assign");
        let deadline = Instant::now() + DEADLINE;
        let mut out = Vec::new();
        while !pred(&out) {
            assert!(
                Instant::now() < deadline,
                "timed out reading {topic}: got {} records",
                out.len()
            );
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push(m.detach()),
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }
}

fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
}

fn text(b: Option<&[u8]>) -> String {
    String::from_utf8_lossy(b.unwrap_or_default()).into_owned()
}

// ---------------------------------------------------------------------------
// The trigger.

/// A pipeline with one function `f` (the misbehave function in Kafka `mode`,
/// one sandbox at a time unless `function` says otherwise) and one trigger
/// on `servers` in consumer group `group`; `trigger` adds fields.
fn pipeline(
    dir: &Path,
    f: &FunctionFixture,
    mode: &str,
    function: &str,
    servers: &str,
    group: &str,
    trigger: &str,
) -> Pipeline {
    let text = format!(
        r#"
[functions.f]
path = {path:?}
timeout = "30s"
env = {{ MISBEHAVE_KAFKA = "{mode}", MISBEHAVE_SLOW_MS = "50" }}
{function}

[[trigger.kafka]]
function = "f"
bootstrap_servers = "{servers}"
group_id = "{group}"
{trigger}

[trigger.kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"#,
        path = f.dir,
    );
    let file = dir.join("pipeline.toml");
    Pipeline::parse(&text, &file).unwrap_or_else(|e| panic!("{e}\n--- pipeline ---\n{text}"))
}

/// A running trigger.
struct Run {
    rt: tokio::runtime::Runtime,
    executor: Executor,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), IngestError>>>,
    log: Arc<Log>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    trigger: String,
}

impl Run {
    fn start(p: &Pipeline) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let log = Arc::new(Log::default());
        let mut cfg = ProcessConfig::detect(agent_binary());
        cfg.log_lines_per_sec = 100_000;
        let executor = Executor::with_log_sink(Arc::new(ProcessBackend::new(cfg)), log.sink());
        for f in p.functions.values() {
            executor.register(sluice_ingest::function_spec(f));
        }
        let trigger = p.kafka_triggers[0].clone();
        let BootstrapServers::Servers(servers) = trigger.bootstrap_servers.clone() else {
            panic!("tests use the mock cluster's address");
        };
        let activity = Arc::new(Activity::default());
        let metrics = Metrics::new();
        let env = TriggerEnv {
            executor: executor.clone(),
            metrics: metrics.clone(),
            servers,
            activity: activity.clone(),
            // Low, so that partitions are paused and resumed in these tests.
            max_buffered_records: 1000,
        };
        let (stop, rx) = watch::channel(false);
        let name = trigger.name.clone();
        let task = rt.spawn(run_trigger(trigger, env, rx));
        Self {
            rt,
            executor,
            stop,
            task: Some(task),
            log,
            activity,
            metrics,
            trigger: name,
        }
    }

    /// Wait until `n` records were received and every received record is
    /// finished (processed, filtered out or in the on-failure topic).
    fn wait_all_finished(&self, n: u64) {
        let done = || {
            self.activity.records.load(Ordering::SeqCst) >= n
                && self.activity.backlog.load(Ordering::SeqCst) == 0
        };
        if !self.log.wait(DEADLINE, |_| done()) {
            panic!(
                "timed out: received {} of {n} records, {} unfinished\nfunction log:\n{}",
                self.activity.records.load(Ordering::SeqCst),
                self.activity.backlog.load(Ordering::SeqCst),
                self.log.lines().join("\n")
            );
        }
    }

    /// Graceful shutdown: drain, commit, stop the sandboxes.
    fn stop(mut self) -> Arc<Log> {
        let _ = self.stop.send(true);
        let task = self.task.take().expect("running");
        let executor = self.executor.clone();
        self.rt.block_on(async move {
            match tokio::time::timeout(DEADLINE, task).await {
                Err(_) => panic!("the trigger did not stop within {DEADLINE:?}"),
                Ok(r) => r.expect("trigger task").expect("run_trigger"),
            }
            executor.shutdown().await;
        });
        self.log.clone()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // A failed test: at least stop the poll thread.
        let _ = self.stop.send(true);
    }
}

/// Everything a test needs: broker, function folder, temp dir.
struct Setup {
    kafka: Kafka,
    fixture: FunctionFixture,
    tmp: TempDir,
}

impl Setup {
    fn new(topics: &[(&str, i32)]) -> Self {
        Self {
            kafka: Kafka::start(topics),
            fixture: function_fixture("misbehave"),
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn pipeline(&self, mode: &str, function: &str, group: &str, trigger: &str) -> Pipeline {
        pipeline(
            self.tmp.path(),
            &self.fixture,
            mode,
            function,
            &self.kafka.servers,
            &self.kafka.name(group),
            &self.kafka.map_topics(trigger),
        )
    }
}

/// Produce `probe-<p>-<n>` records (timestamped now) to partitions
/// `0..partitions` of `in` until the function has seen one of each
/// partition: the consumer is then reading every partition.
fn probe_until_seen(kafka: &Kafka, run: &Run, partitions: i32) {
    let deadline = Instant::now() + DEADLINE;
    let mut n = 0;
    loop {
        let seen: Vec<String> = seen_values(&run.log.batches());
        let missing: Vec<i32> = (0..partitions)
            .filter(|p| !seen.iter().any(|v| v.starts_with(&format!("probe-{p}-"))))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no probe record was seen in partitions {missing:?}; function log:\n{}",
            run.log.lines().join("\n")
        );
        for p in &missing {
            kafka.produce("in", *p, None, &format!("probe-{p}-{n}"));
        }
        kafka.flush();
        n += 1;
        run.log.wait(Duration::from_millis(500), |b| {
            let seen = seen_values(b);
            missing
                .iter()
                .all(|p| seen.iter().any(|v| v.starts_with(&format!("probe-{p}-"))))
        });
    }
}

// ---------------------------------------------------------------------------
// Tests.

/// Every batch fails once, then succeeds: per partition, batches are
/// retried (identical) before any later record of the partition, successful
/// deliveries are in offset order and cover each record once, and the
/// committed offsets reach the end.
#[test]
fn retries_keep_per_partition_order() {
    let s = Setup::new(&[("in", 3)]);
    for i in 0..60 {
        s.kafka
            .produce("in", i % 3, Some(&format!("k{i}")), &format!("r{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "flaky",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\nbatch_size = 5\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.log
        .wait_or_panic("60 records delivered successfully", |b| {
            delivered(b).len() >= 60
        });
    run.wait_all_finished(60);
    let log = run.stop();
    let batches = log.batches();

    for partition in 0..3 {
        let mine: Vec<&Batch> = batches
            .iter()
            .filter(|b| b.partition() == partition)
            .collect();
        let mut next = 0;
        for pair in mine.chunks(2) {
            let [first, retry] = pair else {
                panic!("partition {partition}: a batch without its retry: {pair:?}");
            };
            assert_eq!(first.outcome, "fail", "partition {partition}: {mine:#?}");
            assert_eq!(retry.outcome, "ok", "partition {partition}: {mine:#?}");
            assert_eq!(
                first.offsets(),
                retry.offsets(),
                "partition {partition}: the retry is not the same batch"
            );
            let len = first.records.len() as i64;
            assert!(len <= 5, "batch larger than batch_size: {first:?}");
            assert_eq!(
                first.offsets(),
                (next..next + len).collect::<Vec<_>>(),
                "partition {partition}: records out of order or skipped: {mine:#?}"
            );
            next += len;
        }
        assert_eq!(next, 20, "partition {partition}: {mine:#?}");
    }
    assert_eq!(s.kafka.committed("g", "in", 3), vec![20, 20, 20]);
}

/// A record that keeps failing goes to the on-failure topic once its retries
/// are used up, with the failure in headers and its own key, value and
/// headers; the records after it are delivered.
#[test]
fn exhausted_retries_go_to_the_on_failure_topic_with_metadata() {
    let s = Setup::new(&[("in", 1), ("dlq", 1)]);
    for i in 0..10 {
        let value = if i == 4 {
            "poison-4".to_owned()
        } else {
            format!("r{i}")
        };
        let key = format!("k{i}");
        let trace = format!("t-{i}");
        s.kafka.send(
            "in",
            Out {
                key: Some(&key),
                value: value.as_bytes(),
                headers: &[("trace", &trace)],
                ..Out::default()
            },
        );
    }
    s.kafka.flush();
    let p = s.pipeline(
        "poison",
        "concurrency = 1",
        "g",
        &format!(
            "topics = [\"in\"]\nbatch_size = 1\nmax_retry_attempts = 1\non_failure = \"dlq\"\n{QUICK}"
        ),
    );
    let run = Run::start(&p);
    run.log
        .wait_or_panic("the 9 good records", |b| delivered(b).len() >= 9);
    run.wait_all_finished(10);
    let log = run.stop();

    let batches = log.batches();
    let good: Vec<String> = (0..10)
        .filter(|i| *i != 4)
        .map(|i| format!("r{i}"))
        .collect();
    assert_eq!(delivered(&batches), good);
    let poison_seen = seen_values(&batches)
        .iter()
        .filter(|v| *v == "poison-4")
        .count();
    assert_eq!(poison_seen, 2, "one attempt and one retry: {batches:#?}");

    let dlq = s.kafka.read_all("dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let m = &dlq[0];
    assert_eq!(text(m.key()), "k4");
    assert_eq!(text(m.payload()), "poison-4");
    let h = |n: &str| header(m, n).unwrap_or_else(|| panic!("header {n} missing: {m:?}"));
    assert_eq!(h("sluice.function"), "f");
    assert_eq!(h("sluice.error.type"), "Poison");
    assert!(
        h("sluice.error.message").contains(&format!("poison record {}-0@4", s.kafka.name("in"))),
        "{}",
        h("sluice.error.message")
    );
    assert_eq!(h("sluice.attempts"), "2");
    assert_eq!(h("sluice.source.topic"), s.kafka.name("in"));
    assert_eq!(h("sluice.source.partition"), "0");
    assert_eq!(h("sluice.source.offset"), "4");
    assert!(h("sluice.failed.at").ends_with('Z'));
    assert_eq!(h("trace"), "t-4", "the record's own header is kept");
    assert_eq!(s.kafka.committed("g", "in", 1), vec![10]);
}

/// Produces `r0`..`r{n-1}` to partition 0 of `in`, with `poison-{at}` in
/// place of record `at` (the `poison` mode fails on it), and flushes.
fn produce_with_poison(kafka: &Kafka, n: usize, at: usize) {
    for i in 0..n {
        let v = if i == at {
            format!("poison-{i}")
        } else {
            format!("r{i}")
        };
        kafka.produce("in", 0, None, &v);
    }
    kafka.flush();
}

/// With bisection and no retries, a batch of 8 holding one poison record is
/// split until the poison record is alone; only it goes to the on-failure
/// topic.
#[test]
fn bisect_isolates_the_poison_record() {
    let s = Setup::new(&[("in", 1), ("dlq", 1)]);
    produce_with_poison(&s.kafka, 16, 5);
    let p = s.pipeline(
        "poison",
        "concurrency = 1",
        "g",
        r#"topics = ["in"]
starting_position = "earliest"
batch_size = 8
batch_window = "5s"
bisect_batch_on_error = true
max_retry_attempts = 0
on_failure = "dlq"
"#,
    );
    let run = Run::start(&p);
    run.log
        .wait_or_panic("the 15 good records", |b| delivered(b).len() >= 15);
    run.wait_all_finished(16);
    let log = run.stop();

    let batches = log.batches();
    let good: Vec<String> = (0..16)
        .filter(|i| *i != 5)
        .map(|i| format!("r{i}"))
        .collect();
    assert_eq!(delivered(&batches), good, "{batches:#?}");
    let sequence: Vec<(String, Vec<i64>)> = batches
        .iter()
        .map(|b| (b.outcome.clone(), b.offsets()))
        .collect();
    let step = |o: &str, r: std::ops::Range<i64>| (o.to_owned(), r.collect::<Vec<_>>());
    assert_eq!(
        sequence,
        vec![
            step("fail", 0..8),
            step("ok", 0..4),
            step("fail", 4..8),
            step("fail", 4..6),
            step("ok", 4..5),
            step("fail", 5..6),
            step("ok", 6..8),
            step("ok", 8..16),
        ]
    );
    let dlq = s.kafka.read_all("dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(text(dlq[0].payload()), "poison-5");
    assert_eq!(
        header(&dlq[0], "sluice.source.offset").as_deref(),
        Some("5")
    );
    assert_eq!(
        header(&dlq[0], "sluice.error.type").as_deref(),
        Some("Poison")
    );
    assert_eq!(header(&dlq[0], "sluice.attempts").as_deref(), Some("1"));
    assert_eq!(s.kafka.committed("g", "in", 1), vec![16]);
}

/// `on_failure` as a folder (Lambda's S3 on-failure destination, here a
/// `file://` URL): the poison record isolated by bisection is written as one
/// JSON object, Lambda's invocation record with the event the function got,
/// named after its partition and offsets; offsets are committed after it.
#[test]
fn exhausted_records_go_to_an_object_store_destination() {
    let s = Setup::new(&[("in", 1)]);
    produce_with_poison(&s.kafka, 8, 5);
    let dlq = s.tmp.path().join("dlq");
    let p = s.pipeline(
        "poison",
        "concurrency = 1",
        "g",
        &format!(
            r#"topics = ["in"]
starting_position = "earliest"
batch_size = 8
batch_window = "5s"
bisect_batch_on_error = true
max_retry_attempts = 0
on_failure = "file://{}/"
"#,
            dlq.display()
        ),
    );
    let run = Run::start(&p);
    run.wait_all_finished(8);
    let log = run.stop();
    assert_eq!(delivered(&log.batches()).len(), 7);
    assert_eq!(s.kafka.committed("g", "in", 1), vec![8]);

    // One object: <trigger>/<topic>-0/YYYY/MM/DD/5-5.json.
    let mut objects = Vec::new();
    let mut stack = vec![dlq.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                objects.push(path);
            }
        }
    }
    assert_eq!(objects.len(), 1, "{objects:?}");
    let rel = objects[0].strip_prefix(&dlq).unwrap().display().to_string();
    let topic = s.kafka.name("in");
    assert!(
        rel.starts_with(&format!("{}/{topic}-0/", p.kafka_triggers[0].name)),
        "{rel}"
    );
    assert!(rel.ends_with("/5-5.json"), "{rel}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&objects[0]).unwrap()).unwrap();
    assert_eq!(record["version"], "1.0");
    assert_eq!(
        record["requestContext"]["condition"],
        "RetryAttemptsExhausted"
    );
    assert_eq!(record["requestContext"]["approximateInvokeCount"], 1);
    assert_eq!(record["responseContext"]["functionError"], "Poison");
    let info = &record["KafkaBatchInfo"];
    assert_eq!(
        (
            info["topic"].as_str(),
            info["partition"].as_i64(),
            info["startOffset"].as_i64(),
            info["endOffset"].as_i64(),
            info["batchSize"].as_u64()
        ),
        (Some(topic.as_str()), Some(0), Some(5), Some(5), Some(1)),
        "{record:#}"
    );
    assert_eq!(record["sluice"]["errorType"], "Poison");
    assert!(
        record["sluice"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("poison record"),
        "{record:#}"
    );
    // The event the function was called with, as Lambda's Kafka event.
    let event: aws_lambda_events::event::kafka::KafkaEvent =
        serde_json::from_value(record["payload"].clone()).expect("a KafkaEvent");
    let recs = &event.records[&format!("{topic}-0")];
    assert_eq!(recs.len(), 1);
    use base64::Engine;
    let value = base64::engine::general_purpose::STANDARD
        .decode(recs[0].value.as_deref().unwrap())
        .unwrap();
    assert_eq!(value, b"poison-5");
    assert_eq!(recs[0].offset, 5);
}

/// The same destination on real S3 and Azure servers (see
/// `sluice_test_support::stores`): a record that exhausts its retries
/// becomes one object below the prefix.
fn remote_failure_destination(remote: Remote) {
    let Some((bucket, store)) = remote.bucket() else {
        return;
    };
    let prefix = fresh_prefix("sluice-test-dlq");
    let s = Setup::new(&[("in", 1)]);
    produce_with_poison(&s.kafka, 3, 1);
    let p = s.pipeline(
        "poison",
        "concurrency = 1",
        "g",
        &format!(
            "topics = [\"in\"]\nbatch_size = 1\n\
             max_retry_attempts = 0\non_failure = \"{bucket}/{prefix}/\"\n{QUICK}"
        ),
    );
    let run = Run::start(&p);
    run.wait_all_finished(3);
    drop(run.stop());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listed: Vec<_> = rt.block_on(async {
        use futures::TryStreamExt;
        store
            .list(Some(&object_store::path::Path::from(prefix.as_str())))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    });
    assert_eq!(listed.len(), 1, "{listed:?}");
    let key = listed[0].location.to_string();
    assert!(key.ends_with("/1-1.json"), "{key}");
    let bytes = rt.block_on(async {
        store
            .get(&listed[0].location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
    });
    let record: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(record["KafkaBatchInfo"]["startOffset"], 1, "{record:#}");
    assert_eq!(s.kafka.committed("g", "in", 1), vec![3]);
}

#[test]
fn s3_failure_destination() {
    remote_failure_destination(Remote::S3);
}

#[test]
fn azure_failure_destination() {
    remote_failure_destination(Remote::Azure);
}

/// A partial batch response re-delivers exactly the failed items, before
/// the next records of the partition.
#[test]
fn partial_batch_response_redelivers_only_failed_items() {
    let s = Setup::new(&[("in", 1)]);
    let partial = [2, 5, 9];
    for i in 0..12 {
        let v = if partial.contains(&i) {
            format!("partial-{i}")
        } else {
            format!("r{i}")
        };
        s.kafka.produce("in", 0, None, &v);
    }
    s.kafka.flush();
    let p = s.pipeline(
        "partial",
        "concurrency = 1",
        "g",
        r#"topics = ["in"]
starting_position = "earliest"
batch_size = 6
batch_window = "5s"
retry_backoff = "10ms"
report_batch_item_failures = true
"#,
    );
    let run = Run::start(&p);
    run.wait_all_finished(12);
    let log = run.stop();

    let batches = log.batches();
    let sequence: Vec<(String, Vec<i64>)> = batches
        .iter()
        .map(|b| (b.outcome.clone(), b.offsets()))
        .collect();
    assert_eq!(
        sequence,
        vec![
            ("partial:2".to_owned(), (0..6).collect()),
            ("partial:0".to_owned(), vec![2, 5]),
            ("partial:1".to_owned(), (6..12).collect()),
            ("partial:0".to_owned(), vec![9]),
        ],
        "{batches:#?}"
    );
    assert_eq!(s.kafka.committed("g", "in", 1), vec![12]);
}

/// Produces `values` to partition 0 of `in`, runs the `echo` function over
/// them with `filter` (a TOML value) and the on-failure topic `dlq` until
/// every record is finished, and returns the setup and the values the
/// function got.
fn run_filtered(values: &[&str], filter: &str) -> (Setup, Vec<String>) {
    let s = Setup::new(&[("in", 1), ("dlq", 1)]);
    for v in values {
        s.kafka.produce("in", 0, None, v);
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\non_failure = \"dlq\"\nfilter = {filter}\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.wait_all_finished(values.len() as u64);
    let log = run.stop();
    let got = delivered(&log.batches());
    (s, got)
}

/// Only records matching the filters (a list: any may match, as Lambda's
/// `FilterCriteria.Filters`) reach the function; a record the filter cannot
/// read (not JSON, while the filter expects JSON fields) goes to the
/// on-failure topic; filtered records are committed too.
#[test]
fn filter_skips_records_and_sends_malformed_ones_to_the_on_failure_topic() {
    let values = [
        r#"{"type":"order","n":0}"#,
        r#"{"type":"refund","n":1}"#,
        r#"{"type":"order","n":2}"#,
        "not json {",
        r#"{"type":"order","n":4}"#,
        r#"{"n":5}"#,
        r#"{"type":"refund","n":6}"#,
        r#"{"type":"refund","n":7}"#,
    ];
    let (s, delivered) = run_filtered(
        &values,
        "[{ value = { type = [\"order\"] } }, { value = { n = [6] } }]",
    );
    assert_eq!(delivered, vec![values[0], values[2], values[4], values[6]]);
    let dlq = s.kafka.read_all("dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(text(dlq[0].payload()), "not json {");
    assert_eq!(
        header(&dlq[0], "sluice.error.type").as_deref(),
        Some("Sluice.MalformedRecord")
    );
    assert_eq!(
        header(&dlq[0], "sluice.source.offset").as_deref(),
        Some("3")
    );
    assert_eq!(
        s.kafka.committed("g", "in", 1),
        vec![values.len() as i64],
        "filtered records at the end are committed"
    );
}

/// Lambda's plain-string Kafka messages: with a pattern on the whole value,
/// a value that is not JSON is matched as a string (here Lambda's own
/// example, `anything-but "error"`); nothing goes to the on-failure topic.
#[test]
fn plain_string_values_are_filtered_as_strings() {
    let values = ["all good", "error", "ok {", "\"error\"", "error 2"];
    let (s, delivered) = run_filtered(&values, "{ value = [{ anything-but = [\"error\"] }] }");
    // `"error"` is the JSON string error: filtered out like the plain one.
    assert_eq!(delivered, vec![values[0], values[2], values[4]]);
    assert!(s.kafka.read_all("dlq", 1).is_empty());
    assert_eq!(s.kafka.committed("g", "in", 1), vec![values.len() as i64]);
}

/// A record larger than max_batch_bytes never reaches the function: it goes
/// to the on-failure topic.
#[test]
fn oversized_record_goes_to_the_on_failure_topic() {
    let s = Setup::new(&[("in", 1), ("dlq", 1)]);
    let big = "x".repeat(2000);
    for v in ["small-0", big.as_str(), "small-2", "small-3"] {
        s.kafka.produce("in", 0, None, v);
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\non_failure = \"dlq\"\nmax_batch_bytes = 1000\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.wait_all_finished(4);
    let log = run.stop();

    assert_eq!(
        delivered(&log.batches()),
        vec!["small-0", "small-2", "small-3"]
    );
    let dlq = s.kafka.read_all("dlq", 1);
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0].payload().map(<[u8]>::len), Some(2000));
    assert_eq!(
        header(&dlq[0], "sluice.error.type").as_deref(),
        Some("Sluice.RecordTooLarge")
    );
    assert_eq!(
        header(&dlq[0], "sluice.source.offset").as_deref(),
        Some("1")
    );
    assert_eq!(s.kafka.committed("g", "in", 1), vec![4]);
}

/// `latest`: records produced before the group first joined are never seen;
/// those produced once it reads are.
#[test]
fn starting_position_latest_skips_earlier_records() {
    let s = Setup::new(&[("in", 1)]);
    for i in 0..5 {
        s.kafka.produce("in", 0, None, &format!("before-{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        "topics = [\"in\"]\nstarting_position = \"latest\"\nbatch_window = \"50ms\"\n",
    );
    let run = Run::start(&p);
    // A probe produced before the group's offsets were reset to the end is
    // (rightly) never seen: probe until one is.
    probe_until_seen(&s.kafka, &run, 1);
    for i in 0..5 {
        s.kafka.produce("in", 0, None, &format!("after-{i}"));
    }
    s.kafka.flush();
    run.log.wait_or_panic("the records produced after", |b| {
        seen_values(b)
            .iter()
            .filter(|v| v.starts_with("after-"))
            .count()
            >= 5
    });
    let log = run.stop();
    let seen = seen_values(&log.batches());
    assert!(
        !seen.iter().any(|v| v.starts_with("before-")),
        "records produced before the first join were delivered: {seen:?}"
    );
    let after: Vec<&String> = seen.iter().filter(|v| v.starts_with("after-")).collect();
    assert_eq!(
        after,
        vec!["after-0", "after-1", "after-2", "after-3", "after-4"]
    );
}

/// `earliest`: a new group reads everything already in the topic.
#[test]
fn starting_position_earliest_reads_everything() {
    let s = Setup::new(&[("in", 2)]);
    for i in 0..10 {
        s.kafka.produce("in", i % 2, None, &format!("r{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.wait_all_finished(10);
    let log = run.stop();
    let mut seen = delivered(&log.batches());
    seen.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    want.sort();
    assert_eq!(seen, want);
}

/// A timestamp: a new group starts at the first record at or after it.
///
/// Fails against the mock cluster (which is also sluice's embedded broker):
/// it answers every ListOffsets-by-timestamp with -1, which
/// `seek_to_timestamp` (ingest/src/kafka/mod.rs) turns into a seek to the
/// end, so every record already in the topic is skipped.
#[test]
fn starting_position_timestamp_starts_at_the_first_later_record() {
    // 2024-01-01T00:00:00Z
    const CUT: i64 = 1_704_067_200_000;
    let s = Setup::new(&[("in", 2)]);
    for p in 0..2 {
        for i in 0..4 {
            let v = format!("old-{p}-{i}");
            s.kafka.send(
                "in",
                Out {
                    partition: p,
                    value: v.as_bytes(),
                    timestamp: Some(CUT - 60_000 + i64::from(i)),
                    ..Out::default()
                },
            );
        }
        for i in 0..4 {
            let v = format!("new-{p}-{i}");
            s.kafka.send(
                "in",
                Out {
                    partition: p,
                    value: v.as_bytes(),
                    timestamp: Some(CUT + 1000 * i64::from(i)),
                    ..Out::default()
                },
            );
        }
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        "topics = [\"in\"]\nstarting_position = \"2024-01-01T00:00:00Z\"\nbatch_window = \"50ms\"\n",
    );
    let run = Run::start(&p);
    // Records produced now (after the cut) are read whatever the position
    // found for the cut; once one is seen in each partition, everything
    // before it in the partition has been read.
    probe_until_seen(&s.kafka, &run, 2);
    let log = run.stop();
    let mut seen: Vec<String> = seen_values(&log.batches())
        .into_iter()
        .filter(|v| !v.starts_with("probe-"))
        .collect();
    seen.sort();
    let mut want: Vec<String> = (0..2)
        .flat_map(|p| (0..4).map(move |i| format!("new-{p}-{i}")))
        .collect();
    want.sort();
    assert_eq!(seen, want, "exactly the records at or after the cut");
}

/// After a graceful shutdown, the same group resumes at its committed
/// offsets: a second run sees exactly the records produced in between.
#[test]
fn restart_resumes_at_committed_offsets() {
    let s = Setup::new(&[("in", 2)]);
    for i in 0..10 {
        s.kafka.produce("in", i % 2, None, &format!("first-{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.wait_all_finished(10);
    let first = run.stop();
    assert_eq!(delivered(&first.batches()).len(), 10);

    for i in 0..7 {
        s.kafka.produce("in", i % 2, None, &format!("second-{i}"));
    }
    s.kafka.flush();
    let run = Run::start(&p);
    run.wait_all_finished(7);
    let second = run.stop();
    let mut seen = seen_values(&second.batches());
    seen.sort();
    let mut want: Vec<String> = (0..7).map(|i| format!("second-{i}")).collect();
    want.sort();
    assert_eq!(seen, want, "the second run sees exactly the new records");
    assert_eq!(s.kafka.committed("g", "in", 2), vec![9, 8]);
}

/// With parallelization_factor 4 on one partition, batches run
/// concurrently but records with the same key are processed in offset order
/// (observed through the output topic: a sub-lane writes a batch's output
/// before invoking its next batch).
#[test]
fn parallelization_keeps_per_key_order() {
    let s = Setup::new(&[("in", 1), ("out", 1)]);
    let mut x: u32 = 12345;
    let mut keys = Vec::new();
    for i in 0..80 {
        // A fixed pseudo-random key sequence.
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let key = format!("k{}", (x >> 16) % 8);
        s.kafka.produce("in", 0, Some(&key), &format!("v{i}"));
        keys.push(key);
    }
    s.kafka.flush();
    let p = s.pipeline(
        "slow",
        "concurrency = 4",
        "g",
        &format!(
            "topics = [\"in\"]\nbatch_size = 3\nparallelization_factor = 4\noutput_topic = \"out\"\n{QUICK}"
        ),
    );
    let run = Run::start(&p);
    run.wait_all_finished(80);
    let stats = run.executor.stats("f").expect("stats");
    run.stop();

    let out = s.kafka.read_all("out", 1);
    let mut order: Vec<(String, i64)> = Vec::new();
    for m in &out {
        let event: serde_json::Value =
            serde_json::from_slice(m.payload().unwrap_or_default()).expect("an echoed event");
        for list in event["records"].as_object().expect("records").values() {
            for r in list.as_array().expect("record list") {
                let key = base64_decode(r["key"].as_str().expect("key"));
                order.push((key, r["offset"].as_i64().expect("offset")));
            }
        }
    }
    assert_eq!(order.len(), 80, "each record once: {order:?}");
    let mut per_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (k, o) in &order {
        per_key.entry(k.clone()).or_default().push(*o);
    }
    for (k, offsets) in &per_key {
        let want: Vec<i64> = (0..80).filter(|i| keys[*i as usize] == *k).collect();
        assert_eq!(offsets, &want, "key {k}: processed out of order");
    }
    assert!(
        stats.peak_busy >= 2,
        "parallelization_factor 4 never ran two batches at once: {stats:?}"
    );
    assert_eq!(s.kafka.committed("g", "in", 1), vec![80]);
}

/// After a graceful shutdown the group's committed offset of every
/// partition is its end offset, including records the filter skipped last.
#[test]
fn graceful_shutdown_commits_end_offsets() {
    let s = Setup::new(&[("in", 3)]);
    for i in 0..30 {
        // The last records of every partition are filtered out.
        let v = if i >= 24 {
            format!(r#"{{"skip":{i}}}"#)
        } else {
            format!(r#"{{"keep":{i}}}"#)
        };
        s.kafka.produce("in", i % 3, None, &v);
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!(
            "topics = [\"in\"]\nfilter = {{ value = {{ keep = [{{ exists = true }}] }} }}\n{QUICK}"
        ),
    );
    let run = Run::start(&p);
    run.wait_all_finished(30);
    let log = run.stop();
    assert_eq!(delivered(&log.batches()).len(), 24);
    let end = s.kafka.end_offsets("in", 3);
    assert_eq!(end, vec![10, 10, 10]);
    assert_eq!(s.kafka.committed("g", "in", 3), end);
}

/// More records than a lane buffers (with `max_buffered_records = 1000` the
/// poll thread pauses the partition at 1000 unfinished records and resumes it
/// at 500): all are processed, in
/// order, and committed.
#[test]
fn backlog_pause_and_resume_loses_nothing() {
    let s = Setup::new(&[("in", 1)]);
    for i in 0..3000 {
        s.kafka.produce("in", 0, None, &format!("r{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 1",
        "g",
        &format!("topics = [\"in\"]\nbatch_size = 100\n{QUICK}"),
    );
    let run = Run::start(&p);
    run.wait_all_finished(3000);
    // The first poll burst alone (1,024 records) reaches the high water.
    let pauses = run.metrics.pauses(&run.trigger);
    assert!(pauses >= 1, "the partition was never paused");
    assert!(
        run.metrics.render().contains(&format!(
            "sluice_partition_pauses_total{{trigger=\"{}\",topic=\"in\",partition=\"0\"}} {pauses}",
            run.trigger
        )),
        "{}",
        run.metrics.render()
    );
    let log = run.stop();
    let want: Vec<String> = (0..3000).map(|i| format!("r{i}")).collect();
    assert_eq!(delivered(&log.batches()), want);
    assert_eq!(s.kafka.committed("g", "in", 1), vec![3000]);
}

fn base64_decode(s: &str) -> String {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64");
    String::from_utf8(bytes).expect("UTF-8")
}

/// `exactly_once = true`: outputs are produced through a transactional
/// producer, with the input offsets sent to each transaction. What the mock
/// broker can verify: every record's output arrives exactly once, and the
/// transactions commit (a failure would abort and retry forever). What it
/// cannot: it neither hides aborted records from `read_committed` readers
/// nor shows transactional offsets as the group's committed offsets.
#[test]
fn exactly_once_produces_each_output_once_through_transactions() {
    let s = Setup::new(&[("in", 2), ("out", 1)]);
    for i in 0..20 {
        s.kafka.produce("in", i % 2, None, &format!("v{i}"));
    }
    s.kafka.flush();
    let p = s.pipeline(
        "echo",
        "concurrency = 2",
        "g",
        &format!(
            "topics = [\"in\"]\nbatch_size = 4\noutput_topic = \"out\"\nexactly_once = true\n{QUICK}"
        ),
    );
    let run = Run::start(&p);
    run.wait_all_finished(20);
    run.stop();
    let out = s.kafka.read_until("out", 1, |m| {
        m.iter()
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
                    .map(|e| {
                        e["records"].as_object().map_or(0, |r| {
                            r.values().map(|l| l.as_array().map_or(0, Vec::len)).sum()
                        })
                    })
                    .unwrap_or(0)
            })
            .sum::<usize>()
            >= 20
    });
    let mut values = Vec::new();
    for m in &out {
        let event: serde_json::Value =
            serde_json::from_slice(m.payload().unwrap_or_default()).expect("an echoed event");
        for list in event["records"].as_object().expect("records").values() {
            for r in list.as_array().expect("record list") {
                values.push(base64_decode(r["value"].as_str().expect("value")));
            }
        }
    }
    values.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
    want.sort();
    assert_eq!(values, want, "each output exactly once");
}
