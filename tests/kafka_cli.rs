//! `sluice run` as processes: crash recovery (kill -9 mid-batch, restart),
//! two processes sharing a consumer group (one is killed, the other takes
//! over), and the embedded broker with `--produce` and `--stop-when-idle`.
//!
//! The broker is a `MockCluster` started by the test process (the `sluice`
//! processes connect to its address), or the external cluster of
//! `SLUICE_TEST_KAFKA` (`sluice_test_support::kafka`; topic and group names
//! are then made unique per test by [`Kafka::name`]). Tests wait by polling a consumer or
//! the processes' stderr lines under a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_test_support::kafka::TestKafka;
use sluice_test_support::{
    FunctionFixture, Process, Signal, agent_binary, function_fixture, metric_sum, scrape,
};

/// Longest wait for one expected outcome (joins, rebalances after a member
/// vanished, processing).
const DEADLINE: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// `sluice run` processes.

/// A running `sluice run` (killed when dropped).
struct Sluice {
    process: Process,
    status: Option<ExitStatus>,
}

impl Sluice {
    fn start(name: &'static str, args: &[&str], pipeline: &Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .env("SLUICE_AGENT", agent_binary())
            .arg("run")
            .arg(pipeline)
            .args(args);
        Self {
            process: Process::start(name, command),
            status: None,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) {
        self.process.wait_line(what, pred);
    }

    fn signal(&self, sig: Signal) {
        self.process.signal(sig);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let (status, _) = self.process.finish();
        self.status = Some(status);
        status
    }

    /// Record values the function saw, from its `SEEN` lines (`[f] SEEN
    /// in-0@3 value`).
    fn seen(&self) -> Vec<(String, String)> {
        self.process
            .stderr()
            .iter()
            .filter_map(|l| l.split_once("SEEN ").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(id, v)| (id.to_owned(), v.to_owned()))
            .collect()
    }

    /// Asserts that the function saw exactly `want`'s values, each once,
    /// in any order.
    /// Some stderr line satisfies `pred`; the whole log otherwise.
    fn assert_logged(&self, pred: impl Fn(&str) -> bool) {
        assert!(
            self.process.stderr().iter().any(|l| pred(l)),
            "{}",
            self.log()
        );
    }

    fn assert_saw_each_once<S: AsRef<str>>(&self, want: &[S]) {
        let mut seen: Vec<String> = self.seen().into_iter().map(|(_, v)| v).collect();
        seen.sort();
        let mut want: Vec<&str> = want.iter().map(AsRef::as_ref).collect();
        want.sort_unstable();
        assert_eq!(seen, want, "each record processed once\n{}", self.log());
    }
}

// ---------------------------------------------------------------------------
// The broker.

struct Kafka {
    broker: TestKafka,
    servers: String,
    producer: BaseProducer,
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
            broker,
            servers,
            producer,
        }
    }

    /// The broker's name for the test's topic or group `name`.
    fn name(&self, name: &str) -> String {
        self.broker.name(name)
    }

    fn produce(&self, topic: &str, partition: i32, value: &str) {
        let topic = &self.name(topic);
        let rec: BaseRecord<'_, str, str> =
            BaseRecord::to(topic).partition(partition).payload(value);
        self.producer
            .send(rec)
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(20))
            .expect("flushing the producer");
    }

    /// A reader of a one-partition output topic holding echoed Kafka events.
    fn output_reader(&self, topic: &str) -> OutputReader {
        let topic = &self.name(topic);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", self.name("sluice-test-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .expect("offset");
        consumer.assign(&tpl).expect("assign");
        OutputReader {
            consumer,
            counts: BTreeMap::new(),
            events: 0,
        }
    }
}

/// Reads echoed events from an output topic and counts the record values
/// they carry.
struct OutputReader {
    consumer: BaseConsumer,
    /// Decoded record value → times seen in the output.
    counts: BTreeMap<String, usize>,
    events: usize,
}

impl OutputReader {
    /// Read until `pred` holds for the counts; panics at the deadline with
    /// `context()` in the message.
    fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&BTreeMap<String, usize>) -> bool,
        context: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + DEADLINE;
        while !pred(&self.counts) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {} distinct records in {} events\n{}",
                self.counts.len(),
                self.events,
                context()
            );
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    self.events += 1;
                    let event: serde_json::Value =
                        serde_json::from_slice(m.payload().unwrap_or_default())
                            .expect("an echoed Kafka event");
                    for list in event["records"].as_object().expect("records").values() {
                        for r in list.as_array().expect("a record list") {
                            let b64 = r["value"].as_str().expect("value");
                            let v = STANDARD.decode(b64).expect("base64");
                            let v = String::from_utf8(v).expect("UTF-8");
                            *self.counts.entry(v).or_default() += 1;
                        }
                    }
                }
                Some(Err(e)) => panic!("reading the output topic: {e}"),
                None => {}
            }
        }
    }
}

fn has_all(counts: &BTreeMap<String, usize>, want: &[String]) -> bool {
    want.iter().all(|v| counts.contains_key(v))
}

/// A pipeline file with function `f` (misbehave in Kafka `mode`) and one
/// trigger on topic `input`; `trigger` adds fields.
fn write_pipeline(
    dir: &Path,
    f: &FunctionFixture,
    mode: &str,
    input: &str,
    trigger: &str,
) -> PathBuf {
    let text = format!(
        r#"
[functions.f]
path = {path:?}
timeout = "30s"
env = {{ MISBEHAVE_KAFKA = "{mode}", MISBEHAVE_SLOW_MS = "300" }}

[[trigger.kafka]]
function = "f"
topics = ["{input}"]
{trigger}
"#,
        path = f.dir,
    );
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).expect("writing the pipeline");
    p
}

/// Trigger fields for the test's broker (group `group`, output topic
/// `out`), with fast group timeouts.
fn external(kafka: &Kafka, group: &str) -> String {
    format!(
        r#"bootstrap_servers = "{servers}"
group_id = "{group}"
starting_position = "earliest"
batch_window = "50ms"
output_topic = "{out}"

[trigger.kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"#,
        servers = kafka.servers,
        group = kafka.name(group),
        out = kafka.name("out"),
    )
}

fn values(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

// ---------------------------------------------------------------------------
// Tests.

/// kill -9 while batches are in flight, then restart with the same group:
/// every record reaches the output topic (at least once), and SIGTERM then
/// drains and exits 0.
#[test]
fn kill_9_mid_batch_then_restart_loses_nothing() {
    let kafka = Kafka::start(&[("in", 3), ("out", 1)]);
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let want = values("r", 200);
    for (i, v) in want.iter().enumerate() {
        kafka.produce("in", (i % 3) as i32, v);
    }
    kafka.flush();
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "slow",
        &kafka.name("in"),
        &format!("batch_size = 5\n{}", external(&kafka, "g")),
    );
    let mut out = kafka.output_reader("out");

    let mut first = Sluice::start("first run", &[], &pipeline);
    out.until("some output", |c| !c.is_empty(), || first.log());
    first.signal(Signal::SIGKILL);
    let status = first.wait_exit();
    assert_eq!(status.code(), None, "killed by a signal");
    let before = out.counts.len();
    assert!(
        before < want.len(),
        "the first run finished before it was killed; nothing was tested"
    );
    // The function logs a batch when it starts it: more records seen than
    // output means batches were in flight at the kill.
    assert!(
        first.seen().len() > before,
        "no batch was in flight when the first run was killed"
    );

    let mut second = Sluice::start("second run", &[], &pipeline);
    out.until(
        "every record in the output",
        |c| has_all(c, &want),
        || format!("{}\n{}", first.log(), second.log()),
    );
    second.signal(Signal::SIGTERM);
    let status = second.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", second.log());
    second.wait_line("the final count", |l| l.contains("stopped after"));
    let extra: Vec<&String> = out.counts.keys().filter(|v| !want.contains(v)).collect();
    assert!(extra.is_empty(), "unexpected records: {extra:?}");
}

/// Two processes share the group (4 partitions) and both process records;
/// after one is killed, the other takes over its partitions and processes
/// every later record.
#[test]
fn two_processes_share_partitions_and_take_over_after_a_kill() {
    let kafka = Kafka::start(&[("in", 4), ("out", 1)]);
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        &kafka.name("in"),
        &format!("batch_size = 10\n{}", external(&kafka, "g")),
    );
    let mut out = kafka.output_reader("out");

    let mut a = Sluice::start("A", &[], &pipeline);
    a.wait_line("A's first assignment", |l| {
        l.contains("partitions assigned")
    });
    let mut b = Sluice::start("B", &[], &pipeline);
    b.wait_line("B's assignment", |l| l.contains("partitions assigned"));

    let first = values("a", 100);
    for (i, v) in first.iter().enumerate() {
        kafka.produce("in", (i % 4) as i32, v);
    }
    kafka.flush();
    out.until(
        "the first records",
        |c| has_all(c, &first),
        || format!("{}\n{}", a.log(), b.log()),
    );
    let by_a = a.seen();
    let by_b = b.seen();
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "both processes should have processed records: A {} B {}\n{}\n{}",
        by_a.len(),
        by_b.len(),
        a.log(),
        b.log()
    );
    let partitions = |seen: &[(String, String)]| -> BTreeSet<String> {
        seen.iter()
            .filter_map(|(id, _)| id.split_once('@').map(|(tp, _)| tp.to_owned()))
            .collect()
    };
    assert!(
        partitions(&by_a).is_disjoint(&partitions(&by_b)),
        "A and B processed the same partitions: A {:?} B {:?}",
        partitions(&by_a),
        partitions(&by_b)
    );

    b.signal(Signal::SIGKILL);
    assert_eq!(b.wait_exit().code(), None, "killed by a signal");
    let second = values("b", 100);
    for (i, v) in second.iter().enumerate() {
        kafka.produce("in", (i % 4) as i32, v);
    }
    kafka.flush();
    out.until(
        "the records produced after the kill",
        |c| has_all(c, &second),
        || format!("{}\n{}", a.log(), b.log()),
    );
    let by_a: BTreeSet<String> = a.seen().into_iter().map(|(_, v)| v).collect();
    let missing: Vec<&String> = second.iter().filter(|v| !by_a.contains(*v)).collect();
    assert!(missing.is_empty(), "A did not process {missing:?}");

    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit().code(), Some(0), "{}", a.log());
}

/// `sluice run` on the embedded broker with `data` loaded into topic `in`
/// (`--produce`), stopping once idle for 1 s.
fn produce_and_run(pipeline: &Path, data: &Path) -> Sluice {
    produce_to(pipeline, "in", data, &[])
}

/// `sluice run --produce TOPIC=DATA --stop-when-idle 1s`, plus `extra`.
fn produce_to(pipeline: &Path, topic: &str, data: &Path, extra: &[&str]) -> Sluice {
    let produce = format!("{topic}={}", data.display());
    let mut args = vec!["--produce", &produce, "--stop-when-idle", "1s"];
    args.extend_from_slice(extra);
    Sluice::start("sluice run", &args, pipeline)
}

/// The embedded broker: `--produce` loads a file, `--stop-when-idle` stops
/// once everything was processed; the exit code is 0 and the count is
/// reported.
#[test]
fn embedded_broker_produce_and_stop_when_idle() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "starting_position = \"earliest\"\nbatch_window = \"50ms\"\n",
    );
    let data = tmp.path().join("records.jsonl");
    let lines: Vec<String> = (0..25).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    std::fs::write(&data, lines.join("\n") + "\n").expect("writing records");

    let mut run = produce_and_run(&pipeline, &data);
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", run.log());
    run.assert_logged(|l| l.contains("loaded 25 records"));
    run.assert_logged(|l| l.contains("stopped after 25 records"));
    // What the function cost: its calls, and the most memory a sandbox
    // used (from its cgroup).
    run.assert_logged(|l| {
        l.starts_with("sluice: function f: ")
            && l.contains(" invocations, 0 errors, ")
            && l.contains("memory: a sandbox used at most ")
    });
    let log = run.process.stderr();
    assert!(!log.iter().any(|l| l.contains("warning")), "{}", run.log());
    run.assert_saw_each_once(&lines);
}

/// `--key-field` on lines that cannot give a key (no such field, not JSON):
/// they are loaded anyway, without a key, and sluice says how many and
/// names the first by line, instead of silently spreading a key's records
/// over partitions (as a misspelt field would).
#[test]
fn records_loaded_without_their_key_field_are_called_out() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "starting_position = \"earliest\"\nbatch_window = \"50ms\"\n",
    );
    let data = tmp.path().join("records.jsonl");
    let lines = [r#"{"k":"a","n":1}"#, r#"{"n":2}"#, r#"{"k":"a","#];
    std::fs::write(&data, lines.join("\n") + "\n").expect("writing records");
    let mut run = produce_to(&pipeline, "in", &data, &["--key-field", "k"]);
    assert_eq!(run.wait_exit().code(), Some(0), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains("warning: --key-field k: 2 of 3 records were loaded without a key")
            && log.contains("records.jsonl:2: no such field"),
        "{log}"
    );
    run.assert_saw_each_once(&lines);
}

/// A trigger that cannot start (here: a SASL mechanism this librdkafka
/// build lacks, which only creating the client finds) stops the run with
/// its error and a non-zero exit code, not a quiet exit 0.
#[test]
fn a_trigger_that_cannot_start_fails_the_run() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "[trigger.kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"GSSAPI\"\n",
    );
    let mut run = Sluice::start("sluice run", &["--stop-when-idle", "1s"], &pipeline);
    assert_eq!(run.wait_exit().code(), Some(3), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains("error: trigger f-1: creating the consumer")
            && log.contains("GSSAPI")
            && log.contains("a trigger stopped"),
        "{log}"
    );
}

/// `--produce` mistakes: a file that does not exist is a usage error
/// before any broker starts; a topic no trigger reads is loaded with a
/// warning naming the topics the triggers do read.
#[test]
fn produce_mistakes_are_called_out() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "starting_position = \"earliest\"\n",
    );
    let missing = tmp.path().join("missing.jsonl");
    let mut run = Sluice::start(
        "sluice run",
        &["--produce", &format!("in={}", missing.display())],
        &pipeline,
    );
    assert_eq!(run.wait_exit().code(), Some(2), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains(&format!(
            "error: --produce in={}: No such file",
            missing.display()
        )) && !log.contains("embedded Kafka broker at"),
        "{log}"
    );

    let data = tmp.path().join("records.jsonl");
    std::fs::write(&data, "{\"n\":1}\n").expect("writing records");
    let mut run = produce_to(&pipeline, "inn", &data, &[]);
    assert_eq!(run.wait_exit().code(), Some(0), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains(
            "reads topic \"inn\" (they read: in), so nothing here will process these records"
        ),
        "{log}"
    );
    assert!(log.contains("stopped after 0 records"), "{log}");
}

/// A trigger left at `starting_position = "latest"` (the default) skips
/// what `--produce` loaded before it joined: sluice says so, naming the
/// trigger and the setting, instead of leaving an idle run unexplained.
#[test]
fn records_loaded_before_a_latest_trigger_joins_are_called_out() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(tmp.path(), &fixture, "echo", "in", "");
    let data = tmp.path().join("records.jsonl");
    std::fs::write(&data, "{\"n\":1}\n{\"n\":2}\n").expect("writing records");
    let mut run = produce_and_run(&pipeline, &data);
    assert_eq!(run.wait_exit().code(), Some(0), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains("warning: trigger f-1 reads in from its latest offset")
            && log.contains("the 2 records just loaded will not reach it")
            && log.contains("starting_position = \"earliest\""),
        "{log}"
    );
    assert!(log.contains("stopped after 0 records"), "{log}");
    assert!(run.seen().is_empty(), "{}", run.log());
}

/// A file bigger than the embedded broker keeps per partition: the broker
/// would drop the oldest records before anything reads them, so
/// `--produce` fails with a message saying so, naming the file, and runs
/// nothing (exit 2), instead of processing only the newest records.
#[test]
fn a_file_past_the_embedded_brokers_retention_is_refused_not_half_processed() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "starting_position = \"earliest\"\npartitions = 1\n",
    );
    let data = tmp.path().join("big.jsonl");
    // About 7 MiB into one partition (the broker keeps 5 MiB).
    let pad = "x".repeat(1000);
    let lines: Vec<String> = (0..7000)
        .map(|i| format!(r#"{{"n":{i},"pad":"{pad}"}}"#))
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").expect("writing records");

    let mut run = produce_and_run(&pipeline, &data);
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(2), "{}", run.log());
    let log = run.process.stderr().join("\n");
    assert!(
        log.contains("big.jsonl") && log.contains("keeps at most 5 MiB per partition"),
        "{log}"
    );
    assert!(
        run.seen().is_empty(),
        "nothing was processed: {}",
        run.log()
    );
}

/// A broker that cannot be reached: librdkafka reports it at every retry
/// (here every few milliseconds), and the log must still say it a few
/// times only, naming the servers, while `/metrics` counts every report;
/// SIGTERM still stops the run cleanly.
#[test]
fn an_unreachable_broker_is_reported_without_flooding_the_log() {
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let servers = format!("127.0.0.1:{port}");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        &format!(
            "bootstrap_servers = \"{servers}\"\ngroup_id = \"g\"\n\
             [trigger.kafka.properties]\n\
             \"reconnect.backoff.ms\" = \"1\"\n\"reconnect.backoff.max.ms\" = \"5\"\n"
        ),
    );
    let mut run = Sluice::start(
        "sluice run (no broker)",
        &["--metrics-addr", "127.0.0.1:0"],
        &pipeline,
    );
    let addr = run.process.metrics_address();
    let deadline = Instant::now() + DEADLINE;
    let mut errors = 0;
    while errors < 200 {
        assert!(
            Instant::now() < deadline,
            "only {errors} client errors counted\n{}",
            run.log()
        );
        errors = metric_sum(&scrape(&addr), "sluice_kafka_client_errors_total", &[]);
    }
    run.signal(Signal::SIGTERM);
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", run.log());
    let log = run.process.stderr();
    let said = log
        .iter()
        .filter(|l| l.contains(&format!("no Kafka broker of {servers} can be reached")))
        .count();
    assert!(said >= 1, "the outage is named\n{}", run.log());
    let about_it = log.iter().filter(|l| l.contains(&servers)).count();
    assert!(
        about_it <= 10,
        "{about_it} lines about the broker for {errors} errors\n{}",
        run.log()
    );
}

/// A topic full of records a filter cannot read, with no on-failure topic:
/// each is skipped with an error line, but the lines are rate-limited per
/// trigger (a burst, then a few a second), and the run says at its end how
/// many it held back, so the count of skipped records is not lost.
#[test]
fn a_flood_of_skipped_records_does_not_flood_the_log() {
    const RECORDS: usize = 1_000;
    let fixture = function_fixture("misbehave");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        "echo",
        "in",
        "starting_position = \"earliest\"\nbatch_window = \"50ms\"\n\
         filter = { value = { n = [1] } }\n",
    );
    let data = tmp.path().join("records.txt");
    let lines: Vec<String> = (0..RECORDS).map(|i| format!("not json {i}")).collect();
    std::fs::write(&data, lines.join("\n") + "\n").expect("writing records");

    let started = Instant::now();
    let mut run = produce_and_run(&pipeline, &data);
    let status = run.wait_exit();
    let took = started.elapsed().as_secs() + 1;
    assert_eq!(status.code(), Some(0), "{}", run.log());
    let log = run.process.stderr();
    let skipped = log
        .iter()
        .filter(|l| l.contains("record skipped (no on_failure destination configured)"))
        .count() as u64;
    // The burst (10 x the rate), then the rate, over the whole run.
    let most = 10 * 10 + 10 * took;
    assert!(
        (1..=most).contains(&skipped),
        "{skipped} lines for {RECORDS} skipped records in {took} s\n{}",
        run.log()
    );
    let held: u64 = log
        .iter()
        .filter_map(|l| l.split("held_back=").nth(1))
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        log.iter()
            .any(|l| l.contains("log lines about failed batches and records were held back")),
        "{}",
        run.log()
    );
    assert_eq!(
        skipped + held,
        RECORDS as u64,
        "every skipped record is shown or counted as held back\n{}",
        run.log()
    );
}

/// A plain Lambda handler in Python (`examples/functions/python`) as a
/// Kafka-triggered function: it reads Lambda's Kafka event (base64 values),
/// sees every record once, and reports the one record that is not UTF-8
/// text in `batchItemFailures`, which goes to the on-failure topic alone.
#[test]
fn a_python_handler_reads_kafka_batches_and_reports_failed_items() {
    let fixture = function_fixture("python");
    let tmp = tempfile::tempdir().expect("temp dir");
    let pipeline = tmp.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[functions.py]
path = {path:?}
handler = "handler.handler"
timeout = "30s"

[[trigger.kafka]]
function = "py"
topics = ["in"]
starting_position = "earliest"
batch_window = "50ms"
report_batch_item_failures = true
max_retry_attempts = 1
retry_backoff = "1ms"
on_failure = "in-failed"
"#,
            path = fixture.dir
        ),
    )
    .expect("writing the pipeline");
    let data = tmp.path().join("lines.txt");
    let lines: Vec<String> = (0..20).map(|i| format!("line {i} of the file")).collect();
    let mut bytes = lines.join("\n").into_bytes();
    bytes.extend_from_slice(b"\n\xff\xfe not text\n");
    std::fs::write(&data, bytes).expect("writing records");

    let mut run = produce_and_run(&pipeline, &data);
    let status = run.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", run.log());
    run.assert_saw_each_once(&lines);
    run.assert_logged(|l| {
        l.contains("records written to the on-failure destination") && l.contains("records=1")
    });
    run.assert_logged(|l| l.contains("stopped after 21 records"));
    // The summary says where the failed record went.
    run.assert_logged(|l| {
        l.contains(
            "trigger py-1: 21 records, 0 filtered out, retries 1, \
             1 to the on-failure destination in-failed",
        )
    });
}
