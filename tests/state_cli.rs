//! Stateful triggers (`state = {...}`) as `sluice run` processes on a real
//! Kafka-protocol broker, with the `running-sum` example function:
//!
//! * a running sum and count per key equals the direct sum, after kill -9
//!   at two points and a restart (local checkpoint files);
//! * the same after a rebalance to a second process, which restores the
//!   partitions' state from the changelog topic;
//! * window boundaries by event time and by count, early termination on
//!   size, and a failed final invoke that blocks, then recovers.
//!
//! The broker is a `MockCluster` started by the test (or the cluster of
//! `SLUICE_TEST_KAFKA`). Tests wait by polling the checkpoints or an output
//! topic under a deadline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use sluice_state_carrier::{ChangelogStore, Checkpoint, FileStore, Store};
use sluice_test_support::kafka::TestKafka;
use sluice_test_support::{FunctionFixture, Process, Signal, agent_binary, function_fixture};

const DEADLINE: Duration = Duration::from_secs(120);

struct Sluice {
    process: Process,
}

impl Sluice {
    fn run(name: &str, pipeline: &Path) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
        command
            .env("SLUICE_AGENT", agent_binary())
            .arg("run")
            .arg(pipeline);
        Self {
            process: Process::start(name, command),
        }
    }

    fn kill(mut self) -> ExitStatus {
        self.process.signal(Signal::SIGKILL);
        self.process.finish().0
    }

    /// SIGTERM, wait; the exit status and stderr.
    fn stop(mut self) -> (ExitStatus, String) {
        self.process.signal(Signal::SIGTERM);
        let (status, _) = self.process.finish();
        (status, self.process.log())
    }
}

struct Kafka {
    broker: TestKafka,
    producer: BaseProducer,
}

impl Kafka {
    fn start(topics: &[(&str, i32)]) -> Self {
        let broker = TestKafka::start();
        for (t, p) in topics {
            broker.create_topic(&broker.name(t), *p);
        }
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.servers())
            .set("message.timeout.ms", "20000")
            .create()
            .expect("producer");
        Self { broker, producer }
    }

    fn name(&self, n: &str) -> String {
        self.broker.name(n)
    }

    fn servers(&self) -> &str {
        self.broker.servers()
    }

    fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        value: &Value,
        ts: Option<i64>,
    ) {
        let topic = self.name(topic);
        let payload = value.to_string();
        let mut rec: BaseRecord<'_, str, str> = BaseRecord::to(&topic).key(key).payload(&payload);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        if let Some(ts) = ts {
            rec = rec.timestamp(ts);
        }
        self.producer
            .send(rec)
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }

    fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(20))
            .expect("flushing the producer");
    }

    /// Every value of a one-partition output topic, read until `pred` holds.
    fn read_until(
        &self,
        topic: &str,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
        context: impl Fn() -> String,
    ) -> Vec<Value> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.servers())
            .set("group.id", self.name("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.name(topic), 0, Offset::Beginning)
            .expect("offset");
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + DEADLINE;
        let mut out = Vec::new();
        while !pred(&out) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; read {out:?}\n{}",
                context()
            );
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.expect("reading the output topic");
                out.push(
                    serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON output"),
                );
            }
        }
        out
    }
}

/// A pipeline with the `running-sum` function; `functions` adds env
/// settings per function name, `triggers` is the trigger tables.
fn write_pipeline(
    dir: &Path,
    f: &FunctionFixture,
    functions: &[(&str, &str)],
    triggers: &str,
) -> PathBuf {
    let mut text = String::new();
    for (name, env) in functions {
        text.push_str(&format!(
            "[functions.{name}]\npath = {:?}\ntimeout = \"30s\"\nenv = {{ {env} }}\n\n",
            f.dir
        ));
    }
    text.push_str(triggers);
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).expect("writing the pipeline");
    p
}

/// Trigger fields for the test's broker, with fast group timeouts.
fn cluster(kafka: &Kafka, group: &str) -> String {
    format!(
        "bootstrap_servers = \"{}\"\ngroup_id = \"{}\"\nstarting_position = \"earliest\"\nbatch_window = \"50ms\"\nretry_backoff = \"20ms\"\nproperties = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }}\n",
        kafka.servers(),
        kafka.name(group)
    )
}

/// Sum and count per key, from checkpoints.
fn folded(checkpoints: &[Checkpoint]) -> BTreeMap<String, (i64, i64)> {
    let mut out = BTreeMap::new();
    for cp in checkpoints {
        for (k, ks) in &cp.keys {
            let e = out.entry(k.clone()).or_insert((0, 0));
            e.0 += ks.state["sum"].as_i64().unwrap_or(0);
            e.1 += ks.state["count"].as_i64().unwrap_or(0);
        }
    }
    out
}

fn total_count(store: &dyn Store) -> i64 {
    folded(&store.list().unwrap_or_default())
        .values()
        .map(|v| v.1)
        .sum()
}

/// Wait until the checkpoints hold at least `n` folded records.
fn wait_count(store: &dyn Store, n: i64, what: &str, context: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let c = total_count(store);
        if c >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {c} of {n} folded\n{}",
            context()
        );
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// Records `i` in 0..n: key `k{i % keys}`, amount `i * 3 + 1`; the direct
/// sums and counts per key.
fn produce_amounts(
    kafka: &Kafka,
    topic: &str,
    range: std::ops::Range<i64>,
    keys: i64,
    sums: &mut BTreeMap<String, (i64, i64)>,
) {
    for i in range {
        let key = format!("k{}", i % keys);
        let amount = i * 3 + 1;
        kafka.produce(topic, None, &key, &json!({ "amount": amount }), None);
        let e = sums.entry(key).or_insert((0, 0));
        e.0 += amount;
        e.1 += 1;
    }
    kafka.flush();
}

/// A running sum and count per key, killed with SIGKILL twice mid-stream
/// and restarted: the checkpointed sums equal the direct sums (no record
/// folded twice, none lost), and `sluice state show` prints them.
#[test]
fn running_sum_per_key_survives_kill_9() {
    let kafka = Kafka::start(&[("in", 3)]);
    let fixture = function_fixture("running-sum");
    let tmp = tempfile::tempdir().expect("temp dir");
    let state_dir = tmp.path().join("state");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        &[("sum", "SLOW_MS = \"5\"")],
        &format!(
            "[[trigger.kafka]]\nname = \"sums\"\nfunction = \"sum\"\ntopics = [\"{}\"]\nbatch_size = 7\nstate = {{ scope = \"key\", dir = {:?} }}\n{}",
            kafka.name("in"),
            state_dir,
            cluster(&kafka, "g")
        ),
    );
    let mut direct = BTreeMap::new();
    produce_amounts(&kafka, "in", 0..400, 7, &mut direct);
    let store = FileStore::open(&state_dir).expect("state dir");

    // Kill points vary from run to run.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as i64);
    let first_kill = 40 + seed % 60;
    let second_kill = 180 + (seed / 7) % 80;
    for (run, at) in [("first run", first_kill), ("second run", second_kill)] {
        let s = Sluice::run(run, &pipeline);
        wait_count(&store, at, run, || s.process.log());
        let status = s.kill();
        assert_eq!(status.code(), None, "killed by a signal");
        assert!(
            total_count(&store) < 400,
            "{run} finished before it was killed"
        );
    }
    let s = Sluice::run("third run", &pipeline);
    wait_count(&store, 400, "every record folded", || s.process.log());
    let (status, log) = s.stop();
    assert_eq!(status.code(), Some(0), "{log}");
    let got = folded(&store.list().expect("checkpoints"));
    assert_eq!(got, direct, "per-key sums and counts");
    assert!(
        log.contains("already folded") || log.contains("state restored"),
        "{log}"
    );

    let show = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["state", "show"])
        .arg(&pipeline)
        .args(["--key", "k3"])
        .output()
        .expect("sluice state show");
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&show.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty(), "state show printed nothing");
    let sum: i64 = lines
        .iter()
        .map(|l| l["state"]["sum"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(sum, direct["k3"].0);
    assert!(
        lines
            .iter()
            .all(|l| l["key"] == "k3" && l["name"] == "sums")
    );
}

/// Process A folds alone; B joins and receives partitions, restoring their
/// state from the changelog topic; then A leaves and B folds the rest. The
/// sums in the changelog equal the direct sums.
#[test]
fn state_moves_with_its_partition_through_the_changelog() {
    let kafka = Kafka::start(&[("in", 4)]);
    let fixture = function_fixture("running-sum");
    let tmp = tempfile::tempdir().expect("temp dir");
    let changelog = kafka.name("sums-changelog");
    kafka.broker.create_topic(&changelog, 1);
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        &[("sum", "SLOW_MS = \"5\"")],
        &format!(
            "[[trigger.kafka]]\nname = \"sums\"\nfunction = \"sum\"\ntopics = [\"{}\"]\nbatch_size = 5\nstate = {{ scope = \"key\", store = \"kafka\", changelog_topic = \"{changelog}\" }}\n{}",
            kafka.name("in"),
            cluster(&kafka, "g")
        ),
    );
    let mut direct = BTreeMap::new();
    produce_amounts(&kafka, "in", 0..200, 9, &mut direct);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt
        .block_on(ChangelogStore::open(kafka.servers(), &changelog, &[]))
        .expect("changelog");

    let a = Sluice::run("A", &pipeline);
    wait_count(&store, 60, "A folding", || a.process.log());
    let b = Sluice::run("B", &pipeline);
    b.process
        .wait_line("B's assignment", |l| l.contains("partitions assigned"));
    b.process
        .wait_line("B restoring state", |l| l.contains("state restored"));
    produce_amounts(&kafka, "in", 200..300, 9, &mut direct);
    let (status, a_log) = a.stop();
    assert_eq!(status.code(), Some(0), "{a_log}");
    wait_count(&store, 300, "every record folded", || b.process.log());
    let (status, b_log) = b.stop();
    assert_eq!(status.code(), Some(0), "{b_log}");
    assert_eq!(
        folded(&store.list().expect("changelog")),
        direct,
        "A:\n{a_log}\nB:\n{b_log}"
    );
    // B restored at least one partition A had folded into.
    let restored_nonempty = b_log
        .lines()
        .any(|l| l.contains("state restored") && !l.contains("keys=0"));
    assert!(
        restored_nonempty,
        "B restored no state from the changelog:\n{b_log}"
    );
}

/// Windows: by count (4 items; the first final invoke fails once, which
/// holds the key, then succeeds), by event time (1 s windows, the last one
/// closed when the source is idle past its end), and early termination when
/// the state outgrows `max_bytes`. Each final invoke's answer lands on the
/// output topic once.
#[test]
fn windows_by_count_time_and_size() {
    let kafka = Kafka::start(&[
        ("c", 1),
        ("t", 1),
        ("e", 1),
        ("oc", 1),
        ("ot", 1),
        ("oe", 1),
    ]);
    let fixture = function_fixture("running-sum");
    let tmp = tempfile::tempdir().expect("temp dir");
    let trigger = |name: &str, f: &str, topic: &str, out: &str, state: &str| {
        format!(
            "[[trigger.kafka]]\nname = \"{name}\"\nfunction = \"{f}\"\ntopics = [\"{}\"]\noutput_topic = \"{}\"\nbatch_size = 1\nstate = {{ {state}, dir = {:?} }}\n{}\n",
            kafka.name(topic),
            kafka.name(out),
            tmp.path().join(name),
            cluster(&kafka, name)
        )
    };
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        &[
            // The sandbox's own /tmp lives as long as the warm sandbox.
            ("count", "FAIL_FINAL_ONCE = \"/tmp\""),
            ("time", ""),
            ("early", "KEEP_AMOUNTS = \"1\""),
        ],
        &[
            trigger("by-count", "count", "c", "oc", "window = 4"),
            trigger("by-time", "time", "t", "ot", "window = \"1s\""),
            trigger(
                "by-size",
                "early",
                "e",
                "oe",
                "window = \"1h\", max_bytes = 40",
            ),
        ]
        .concat(),
    );
    for i in 1..=10 {
        kafka.produce("c", Some(0), "k", &json!({ "amount": i }), None);
    }
    // 1 s windows: [0,1) holds 3 records, [1,2) 2, [2,3) 1.
    let t0: i64 = 1_700_000_000_000;
    for (dt, amount) in [
        (0, 1),
        (300, 2),
        (600, 4),
        (1200, 8),
        (1500, 16),
        (2700, 32),
    ] {
        kafka.produce(
            "t",
            Some(0),
            "k",
            &json!({ "amount": amount }),
            Some(t0 + dt),
        );
    }
    for i in 1..=12 {
        kafka.produce("e", Some(0), "k", &json!({ "amount": i }), None);
    }
    kafka.flush();
    let s = Sluice::run("windows", &pipeline);

    let oc = kafka.read_until(
        "oc",
        "two count windows",
        |v| v.len() >= 2,
        || s.process.log(),
    );
    let sums: Vec<i64> = oc.iter().map(|v| v["sum"].as_i64().unwrap()).collect();
    assert_eq!(sums, [10, 26], "count windows: {oc:?}");
    assert!(
        s.process
            .log()
            .contains("final invoke of the window failed"),
        "the first final invoke did not fail"
    );

    let ot = kafka.read_until(
        "ot",
        "three time windows",
        |v| v.len() >= 3,
        || s.process.log(),
    );
    let got: Vec<(i64, String)> = ot
        .iter()
        .map(|v| {
            (
                v["sum"].as_i64().unwrap(),
                v["window"]["start"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (7, "2023-11-14T22:13:20Z".to_owned()),
            (24, "2023-11-14T22:13:21Z".to_owned()),
            (32, "2023-11-14T22:13:22Z".to_owned()),
        ],
        "time windows"
    );

    let oe = kafka.read_until(
        "oe",
        "an early-terminated window",
        |v| !v.is_empty(),
        || s.process.log(),
    );
    assert_eq!(oe[0]["terminatedEarly"], true, "{oe:?}");
    let (status, log) = s.stop();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("final invoke of the window failed"), "{log}");
    // Nothing lost to early termination: closed windows plus the open state
    // hold every amount.
    let open = FileStore::open(&tmp.path().join("by-size"))
        .and_then(|s| s.list())
        .expect("checkpoints");
    let open_sum: i64 = open
        .iter()
        .flat_map(|cp| cp.keys.values())
        .map(|ks| ks.state["sum"].as_i64().unwrap_or(0))
        .sum();
    let total: i64 = (1..=12).sum();
    let closed = |v: &[Value]| {
        v.iter()
            .map(|w| w["sum"].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    let oe = kafka.read_until(
        "oe",
        "closed windows and the open state holding every amount",
        |v| closed(v) + open_sum >= total,
        String::new,
    );
    assert_eq!(closed(&oe) + open_sum, total, "{oe:?} + {open_sum}");
    // The count trigger's last window (9 + 10) is still open, in its state.
    let open = FileStore::open(&tmp.path().join("by-count"))
        .and_then(|s| s.list())
        .expect("checkpoints");
    assert_eq!(open[0].keys[""].state["sum"], 19);
}

/// The same fold over the same records, from a Kafka topic (`sluice run`)
/// and from a JSON lines file (`sluice backfill`, `order_key` as the key):
/// the Kafka state and the backfill's closed windows hold the same sums,
/// which are the direct sums. Running the backfill again folds nothing
/// twice.
#[test]
fn a_backfill_fold_equals_the_kafka_fold() {
    let kafka = Kafka::start(&[("in", 3)]);
    let fixture = function_fixture("running-sum");
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("payments.jsonl");
    let mut direct = BTreeMap::new();
    produce_amounts(&kafka, "in", 0..150, 5, &mut direct);
    let lines: String = (0..150i64)
        .map(|i| {
            format!(
                "{}\n",
                json!({ "key": format!("k{}", i % 5), "amount": i * 3 + 1 })
            )
        })
        .collect();
    std::fs::write(&data, lines).expect("writing the data set");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        &[("sum", "")],
        &format!(
            "[job.fold]\nfunction = \"sum\"\nsource = {data:?}\norder_key = \"key\"\nmax_items_per_call = 4\nstate = {{ scope = \"key\", dir = {:?} }}\n\n[[trigger.kafka]]\nname = \"sums\"\nfunction = \"sum\"\ntopics = [\"{}\"]\nbatch_size = 6\nstate = {{ scope = \"key\", dir = {:?} }}\n{}",
            tmp.path().join("backfill-state"),
            kafka.name("in"),
            tmp.path().join("kafka-state"),
            cluster(&kafka, "g")
        ),
    );
    let kafka_store = FileStore::open(&tmp.path().join("kafka-state")).expect("state dir");
    let s = Sluice::run("run", &pipeline);
    wait_count(&kafka_store, 150, "every record folded", || s.process.log());
    let (status, log) = s.stop();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(folded(&kafka_store.list().expect("checkpoints")), direct);

    let backfill = |what: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE_AGENT", agent_binary())
            .args(["backfill", "--quiet"])
            .arg(&pipeline)
            .arg("fold")
            .output()
            .expect("sluice backfill");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        let store = FileStore::open(&tmp.path().join("backfill-state")).expect("state dir");
        let mut results = BTreeMap::new();
        for cp in store.list().expect("checkpoints") {
            for (k, ks) in cp.keys {
                let r = ks.last_result.expect("a closed window per key");
                assert!(
                    ks.window.is_none(),
                    "the end of the input closes the window"
                );
                results.insert(
                    k,
                    (r["sum"].as_i64().unwrap(), r["count"].as_i64().unwrap()),
                );
            }
        }
        (results, summary)
    };
    let (results, summary) = backfill("first backfill");
    assert_eq!(results, direct, "backfill fold");
    assert!(
        summary.contains("items: 150 total, 150 succeeded"),
        "{summary}"
    );
    // The summary says how much of its memory the function used (the
    // sandboxes' peak, from their cgroups), as Lambda's REPORT lines do.
    assert!(
        summary.contains("memory: a sandbox used at most ")
            && summary.contains(" MB of its 128 MB"),
        "{summary}"
    );
    let (results, summary) = backfill("second backfill");
    assert_eq!(results, direct);
    assert!(
        summary.contains("0 succeeded, 0 failed, 150 skipped"),
        "a rerun folds nothing twice: {summary}"
    );
}

/// The embedded broker's records die with its process: a second `sluice
/// run` over a fresh embedded topic must not skip its records because an
/// earlier run's checkpoint holds higher offsets. It starts over, warns,
/// and folds the same sums again.
#[test]
fn an_earlier_embedded_runs_checkpoint_is_not_applied_to_a_new_broker() {
    let fixture = function_fixture("running-sum");
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("payments.jsonl");
    let lines: String = (0..20i64)
        .map(|i| format!("{}\n", json!({ "key": format!("k{}", i % 2), "amount": i })))
        .collect();
    std::fs::write(&data, lines).expect("writing the records");
    let state = tmp.path().join("state");
    let pipeline = write_pipeline(
        tmp.path(),
        &fixture,
        &[("sum", "")],
        &format!(
            "[[trigger.kafka]]\nfunction = \"sum\"\ntopics = [\"payments\"]\nstarting_position = \"earliest\"\nbatch_window = \"50ms\"\nstate = {{ scope = \"key\", dir = {state:?} }}\n"
        ),
    );
    let store = FileStore::open(&state).expect("state dir");
    let mut logs = Vec::new();
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE_AGENT", agent_binary())
            .arg("run")
            .arg(&pipeline)
            .args([
                "-q",
                "--key-field",
                "key",
                "--stop-when-idle",
                "2s",
                "--produce",
            ])
            .arg(format!("payments={}", data.display()))
            .output()
            .expect("sluice run");
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        let got = folded(&store.list().expect("checkpoints"));
        let want: BTreeMap<String, (i64, i64)> = [
            ("k0".to_owned(), ((0..20).step_by(2).sum(), 10)),
            ("k1".to_owned(), ((1..20).step_by(2).sum(), 10)),
        ]
        .into();
        assert_eq!(got, want, "{log}");
        logs.push(log);
    }
    assert!(
        logs[1].contains("earlier run's embedded broker"),
        "{}",
        logs[1]
    );
}
