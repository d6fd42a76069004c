//! Object-store triggers, in process, with the `line-count` example
//! function in process sandboxes: each new or overwritten object is called
//! once with an S3 event and its bytes staged; hidden objects and objects
//! there before the first run are left out; failures are retried, then go
//! to the dead-letter file; too-large objects go there without a call; a
//! restart calls only what it has not recorded (and, asked to, what
//! failed); a store that cannot be
//! reached is retried at each poll, not fatal.
//!
//! Against `object_store`'s in-memory store, and against real S3, Azure
//! Blob or GCS servers when `SLUICE_TEST_S3`, `SLUICE_TEST_AZ` or
//! `SLUICE_TEST_GS` names a bucket (`scripts/test-object-stores.sh` starts
//! moto and Azurite and sets the first two). Tests wait on the function's
//! log lines under a deadline.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lambda_events::event::s3::S3Event;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use serde_json::Value;
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, LogLine, LogSink, LogStream};
use sluice_ingest::IngestError;
use sluice_ingest::kafka::Activity;
use sluice_ingest::metrics::Metrics;
use sluice_ingest::objects::{
    ObjectEnv, register_object_store, run_object_trigger, s3_event, s3_removed_event,
};
use sluice_pipeline::Pipeline;
use sluice_test_support::stores::{Remote, fresh_prefix};
use sluice_test_support::{FunctionFixture, Lines, agent_binary, function_fixture};
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(60);

/// The function's stdout lines.
#[derive(Default)]
struct Log {
    lines: Lines,
}

impl Log {
    fn sink(self: &Arc<Self>) -> LogSink {
        let log = Arc::clone(self);
        Arc::new(move |l: LogLine| {
            if l.stream == LogStream::Stdout {
                log.lines.push(l.line);
            }
        })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.snapshot()
    }

    /// Waits until `done` holds (checked at each new line and every
    /// 50 ms); panics after [`DEADLINE`].
    fn wait(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        if self
            .lines
            .wait_for(DEADLINE, |lines| done(lines).then_some(()))
            .is_none()
        {
            panic!(
                "timed out waiting for {what}; function log:\n{}",
                self.lines().join("\n")
            );
        }
    }
}

/// A running trigger.
struct Run {
    rt: tokio::runtime::Runtime,
    executor: Executor,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), IngestError>>,
    activity: Arc<Activity>,
    metrics: Arc<Metrics>,
    log: Arc<Log>,
}

impl Run {
    /// Starts the pipeline's first object-store trigger.
    fn spawn(p: &Pipeline) -> Self {
        Self::spawn_with(p, false)
    }

    /// [`Self::spawn`], with `retry_failed` as given.
    fn spawn_with(p: &Pipeline, retry_failed: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let log = Arc::new(Log::default());
        let executor = Executor::with_log_sink(
            Arc::new(ProcessBackend::new(ProcessConfig::detect(agent_binary()))),
            log.sink(),
        );
        for f in p.functions.values() {
            executor.register(sluice_ingest::function_spec(f));
        }
        let activity = Arc::new(Activity::default());
        let metrics = Metrics::new();
        let env = ObjectEnv {
            executor: executor.clone(),
            metrics: metrics.clone(),
            activity: activity.clone(),
            max_concurrency: 2,
            retry_failed,
        };
        let (stop, rx) = watch::channel(false);
        let task = rt.spawn(run_object_trigger(p.object_triggers[0].clone(), env, rx));
        Self {
            rt,
            executor,
            stop,
            task,
            activity,
            metrics,
            log,
        }
    }

    /// [`Self::spawn`], then waits for the first listing: objects put from
    /// then on are new to the trigger.
    fn start(p: &Pipeline) -> Self {
        Self::start_with(p, false)
    }

    /// [`Self::start`], with `retry_failed` as given.
    fn start_with(p: &Pipeline, retry_failed: bool) -> Self {
        let run = Self::spawn_with(p, retry_failed);
        run.log.wait("the first listing", |_| {
            run.activity.triggers_assigned.load(Ordering::SeqCst) > 0 || run.task.is_finished()
        });
        assert!(!run.task.is_finished(), "the trigger stopped at once");
        run
    }

    /// Waits until `n` objects were received and all are finished.
    fn wait_finished(&self, n: u64) {
        self.log.wait(&format!("{n} objects finished"), |_| {
            self.activity.records.load(Ordering::SeqCst) >= n
                && self.activity.backlog.load(Ordering::SeqCst) == 0
        });
    }

    /// Stops the trigger; returns the function's log lines.
    fn stop(self) -> Vec<String> {
        let _ = self.stop.send(true);
        let executor = self.executor.clone();
        let task = self.task;
        self.rt.block_on(async move {
            match tokio::time::timeout(DEADLINE, task).await {
                Err(_) => panic!("the trigger did not stop within {DEADLINE:?}"),
                Ok(r) => r.expect("trigger task").expect("run_object_trigger"),
            }
            executor.shutdown().await;
        });
        self.log.lines()
    }
}

/// The trigger settings of most tests: quick polls and retries, small
/// objects.
const QUICK: &str = r#"poll_interval = "20ms"
max_object_bytes = 64
max_retry_attempts = 1
retry_backoff = "1ms""#;

fn pipeline(dir: &Path, f: &FunctionFixture, url: &str) -> Pipeline {
    pipeline_with(dir, f, url, "")
}

/// [`pipeline`] with `extra` lines in the trigger's table.
fn pipeline_with(dir: &Path, f: &FunctionFixture, url: &str, extra: &str) -> Pipeline {
    trigger_pipeline(dir, f, url, &format!("{QUICK}\n{extra}"))
}

/// A pipeline whose trigger (`count-objects`, function `count`) watches
/// `url` with `settings` as its other lines.
fn trigger_pipeline(dir: &Path, f: &FunctionFixture, url: &str, settings: &str) -> Pipeline {
    let text = format!(
        r#"
[functions.count]
path = {path:?}

[[trigger.object_store]]
name = "count-objects"
function = "count"
url = "{url}"
{settings}
"#,
        path = f.dir,
    );
    Pipeline::parse(&text, &dir.join("pipeline.toml"))
        .unwrap_or_else(|e| panic!("{e}\n--- pipeline ---\n{text}"))
}

fn put(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, key: &str, bytes: &[u8]) {
    let (store, key, bytes) = (Arc::clone(store), ObjectPath::from(key), bytes.to_vec());
    rt.block_on(async move { store.put(&key, PutPayload::from(bytes)).await })
        .unwrap_or_else(|e| panic!("put: {e}"));
}

fn delete(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, key: &str) {
    let (store, key) = (Arc::clone(store), ObjectPath::from(key));
    rt.block_on(async move { store.delete(&key).await })
        .unwrap_or_else(|e| panic!("delete: {e}"));
}

/// Calls of `key` in the log (`KEY: N lines, M bytes`).
fn calls<'a>(lines: &'a [String], key: &str) -> Vec<&'a str> {
    let head = format!("{key}: ");
    lines.iter().filter_map(|l| l.strip_prefix(&head)).collect()
}

/// The whole scenario against `store`, whose objects are named `url`
/// followed by their key below `prefix` (`prefix` ends with `/`).
fn scenario(store: Arc<dyn ObjectStore>, url: &str, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let p = pipeline(dir.path(), &f, url);
    let io = tokio::runtime::Runtime::new().unwrap();
    let key = |k: &str| format!("{prefix}{k}");

    // There before the first run: skipped (`starting_position` "latest").
    put(&io, &store, &key("old.txt"), b"old\n");
    let run = Run::start(&p);
    put(&io, &store, &key("a.txt"), b"1\n2\n");
    put(&io, &store, &key("sub/b c.txt"), b"b\n");
    put(&io, &store, &key("bad.bin"), b"\xff\xfe");
    put(&io, &store, &key(".partial"), b"not yet\n");
    put(&io, &store, &key("sub/.hidden/x.txt"), b"x\n");
    put(&io, &store, &key("big.txt"), &[b'x'; 65]);
    run.wait_finished(4);
    // Overwritten: a new version, called again.
    put(&io, &store, &key("a.txt"), b"1\n2\n3\n");
    run.wait_finished(5);
    let first = run.stop();

    let a = key("a.txt");
    assert_eq!(
        calls(&first, &a),
        ["2 lines, 4 bytes", "3 lines, 6 bytes"],
        "{first:#?}"
    );
    // S3 events carry keys form-encoded.
    assert_eq!(
        calls(&first, &key("sub/b+c.txt")),
        ["1 lines, 2 bytes"],
        "{first:#?}"
    );
    for never in [
        "old.txt",
        ".partial",
        "sub/.hidden/x.txt",
        "big.txt",
        "bad.bin",
    ] {
        assert!(calls(&first, &key(never)).is_empty(), "{never}: {first:#?}");
    }
    assert_eq!(first.len(), 3, "{first:#?}");

    // Failures: bad.bin after its retry (2 attempts), big.txt without a call.
    let dead = std::fs::read_to_string(&p.object_triggers[0].dead_letter).unwrap();
    let dead: Vec<Value> = dead
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let of = |k: &str| {
        dead.iter()
            .find(|d| d["key"] == key(k).as_str() || d["key"] == k)
            .unwrap_or_else(|| panic!("no dead letter for {k}: {dead:#?}"))
    };
    let bad = of("bad.bin");
    assert_eq!(bad["errorType"], "NotText", "{bad}");
    assert_eq!(bad["attempts"], 2, "{bad}");
    assert_eq!(bad["function"], "count", "{bad}");
    assert_eq!(bad["size"], 2, "{bad}");
    let big = of("big.txt");
    assert_eq!(big["errorType"], "Sluice.ObjectTooLarge", "{big}");
    assert_eq!(big["attempts"], 0, "{big}");

    // Restarted: only what appeared meanwhile is called.
    put(&io, &store, &key("late.txt"), b"l\n");
    let run = Run::start(&p);
    run.wait_finished(1);
    let second = run.stop();
    assert_eq!(
        calls(&second, &key("late.txt")),
        ["1 lines, 2 bytes"],
        "{second:#?}"
    );
    assert_eq!(second.len(), 1, "{second:#?}");
    let dead = std::fs::read_to_string(&p.object_triggers[0].dead_letter).unwrap();
    assert_eq!(dead.lines().count(), 2, "{dead}");

    // `--retry-failed`: the two failed objects are tried again (and fail
    // again: two more dead letters); nothing else is called.
    let run = Run::start_with(&p, true);
    run.wait_finished(2);
    let third = run.stop();
    assert_eq!(third.len(), 0, "{third:#?}");
    let dead = std::fs::read_to_string(&p.object_triggers[0].dead_letter).unwrap();
    assert_eq!(dead.lines().count(), 4, "{dead}");
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A memory store registered under a fresh name; its URL.
fn memory_store() -> (Arc<dyn ObjectStore>, String) {
    let name = format!(
        "objects-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    register_object_store(&format!("memory://{name}"), Arc::clone(&store));
    (store, format!("memory://{name}"))
}

/// `events = ["created", "removed"]`: a deleted object is called with an
/// `ObjectRemoved:Delete` event and forgotten, so writing it again is a new
/// object; with `["removed"]` alone, writes are recorded uncalled and only
/// deletions call.
#[test]
fn deletions_call_the_function_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let (store, base) = memory_store();
    let io = tokio::runtime::Runtime::new().unwrap();
    let p = pipeline_with(
        dir.path(),
        &f,
        &format!("{base}/in/"),
        r#"events = ["created", "s3:ObjectRemoved:*"]"#,
    );
    let run = Run::start(&p);
    put(&io, &store, "in/a.txt", b"1\n");
    run.wait_finished(1);
    delete(&io, &store, "in/a.txt");
    run.wait_finished(2);
    put(&io, &store, "in/a.txt", b"1\n");
    run.wait_finished(3);
    let lines = run.stop();
    assert_eq!(
        calls(&lines, "in/a.txt"),
        ["1 lines, 2 bytes", "removed", "1 lines, 2 bytes"],
        "{lines:#?}"
    );
    // Deleted while sluice was not running: called at the restart.
    delete(&io, &store, "in/a.txt");
    let run = Run::start(&p);
    run.wait_finished(1);
    let lines = run.stop();
    assert_eq!(lines, ["in/a.txt: removed"], "{lines:#?}");

    let dir = tempfile::tempdir().unwrap();
    let p = pipeline_with(
        dir.path(),
        &f,
        &format!("{base}/only/"),
        r#"events = ["removed"]"#,
    );
    let run = Run::start(&p);
    put(&io, &store, "only/b.txt", b"b\n");
    put(&io, &store, "only/c.txt", b"c\n");
    // Written objects are recorded uncalled (counted as filtered out); a
    // deletion calls.
    let filtered = "sluice_records_filtered_total{trigger=\"count-objects\"} 2";
    run.log.wait("two objects recorded uncalled", |_| {
        run.metrics.render().contains(filtered)
    });
    delete(&io, &store, "only/b.txt");
    run.wait_finished(1);
    let lines = run.stop();
    assert_eq!(lines, ["only/b.txt: removed"], "{lines:#?}");
}

/// `results`: each successful call's response is a line of the results
/// file (the object, its version, the event type), written before the
/// object counts as handled; failed calls have none; a restart appends.
#[test]
fn responses_go_to_the_results_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let (store, base) = memory_store();
    let io = tokio::runtime::Runtime::new().unwrap();
    let p = pipeline_with(
        dir.path(),
        &f,
        &format!("{base}/res/"),
        "events = [\"created\", \"removed\"]\nresults = \"out/responses.jsonl\"",
    );
    let results = dir.path().join("out/responses.jsonl");
    let run = Run::start(&p);
    put(&io, &store, "res/a.txt", b"1\n2\n");
    put(&io, &store, "res/bad.bin", &[0xff, 0xfe]);
    run.wait_finished(2);
    delete(&io, &store, "res/a.txt");
    run.wait_finished(3);
    run.stop();
    let run = Run::start(&p);
    put(&io, &store, "res/c.txt", b"x\n");
    run.wait_finished(1);
    run.stop();

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&results)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["key"].as_str().unwrap(), l["eventName"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("res/a.txt", "ObjectCreated:Put"),
            ("res/a.txt", "ObjectRemoved:Delete"),
            ("res/c.txt", "ObjectCreated:Put"),
        ],
        "{lines:#?}"
    );
    assert_eq!(lines[0]["response"]["lines"], 2, "{lines:#?}");
    assert_eq!(lines[1]["response"]["removed"], true, "{lines:#?}");
    assert!(lines.iter().all(|l| l["version"].is_string()), "{lines:#?}");
}

/// A watched folder that goes missing (a disk not mounted) is a failed
/// listing, not the deletion of everything in it: once it is back,
/// nothing is called again, and no deletion was called.
#[test]
fn a_missing_folder_is_a_failed_listing_not_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let watched = dir.path().join("in");
    std::fs::create_dir(&watched).unwrap();
    let p = pipeline_with(
        dir.path(),
        &f,
        watched.to_str().unwrap(),
        r#"events = ["created", "removed"]"#,
    );
    let run = Run::start(&p);
    std::fs::write(watched.join("a.txt"), "a\n").unwrap();
    run.wait_finished(1);
    let away = dir.path().join("away");
    std::fs::rename(&watched, &away).unwrap();
    run.log.wait("a failed listing", |_| {
        run.metrics.render().contains("Sluice.ListingFailed")
    });
    std::fs::rename(&away, &watched).unwrap();
    // Then a new file: called once the folder lists again.
    std::fs::write(watched.join("b.txt"), "b\n").unwrap();
    run.wait_finished(2);
    let lines = run.stop();
    assert_eq!(
        lines,
        ["a.txt: 1 lines, 2 bytes", "b.txt: 1 lines, 2 bytes"],
        "{lines:#?}"
    );
}

/// A new local file is held back until it cannot be half-written (two
/// listings saw it unchanged, or it is 2 s old); with a long poll interval
/// it is looked at again once it is 2 s old, not at the next poll. (The
/// file is there before the first listing, which finds it just written.)
#[test]
fn a_new_local_file_does_not_wait_for_a_long_poll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let watched = dir.path().join("in");
    std::fs::create_dir(&watched).unwrap();
    let p = trigger_pipeline(
        dir.path(),
        &f,
        watched.to_str().unwrap(),
        "poll_interval = \"10m\"\nstarting_position = \"earliest\"",
    );
    std::fs::write(watched.join("a.txt"), "a\n").unwrap();
    let run = Run::start(&p);
    // Well before the 10 minutes of the next poll.
    run.wait_finished(1);
    let lines = run.stop();
    assert_eq!(lines, ["a.txt: 1 lines, 2 bytes"], "{lines:#?}");
}

/// The removal event is S3's, as `aws_lambda_events` reads it.
#[test]
fn the_removal_event_is_an_s3_notification() {
    let at = chrono::DateTime::from_timestamp(1_700_000_000, 5_000_000).unwrap();
    let event = s3_removed_event(
        "t",
        "eu-west-1",
        "bucket",
        "dir/a b.txt",
        "s3://bucket/dir/a b.txt",
        at,
    );
    let parsed: S3Event = serde_json::from_value(event.clone()).expect("an S3Event");
    let record = &parsed.records[0];
    assert_eq!(record.event_name.as_deref(), Some("ObjectRemoved:Delete"));
    assert_eq!(record.s3.object.key.as_deref(), Some("dir/a+b.txt"));
    assert_eq!(record.s3.object.size, None);
    assert_eq!(event["Records"][0]["eventTime"], "2023-11-14T22:13:20.005Z");
    assert!(
        event["Records"][0]["sluice"].get("payloadPath").is_none(),
        "{event}"
    );
}

/// A progress store kept for another prefix is refused, naming both: it
/// would make every object of the new prefix look new, and every one it
/// holds look deleted.
#[test]
fn a_store_of_another_prefix_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let (_store, base) = memory_store();
    let p = pipeline(dir.path(), &f, &format!("{base}/one/"));
    Run::start(&p).stop();
    let moved = pipeline(dir.path(), &f, &format!("{base}/two/"));
    let run = Run::spawn(&moved);
    let err = run
        .rt
        .block_on(async { tokio::time::timeout(DEADLINE, run.task).await })
        .expect("the trigger ends")
        .expect("trigger task")
        .expect_err("refused");
    let text = err.to_string();
    assert!(text.contains(&format!("{base}/one/")), "{text}");
    assert!(text.contains(&format!("{base}/two/")), "{text}");
    assert!(
        text.contains("give the trigger its own `progress`"),
        "{text}"
    );
}

#[test]
fn memory_store_new_and_changed_objects_are_called_once() {
    let (store, base) = memory_store();
    // Keys in events are relative to the bucket: the whole key.
    scenario(store, &format!("{base}/in/"), "in/");
}

/// The same against real servers of each cloud's protocol: the
/// environment names a bucket the test may write to (`SLUICE_TEST_S3`,
/// `SLUICE_TEST_AZ`, `SLUICE_TEST_GS`; see [`Remote`]), with the
/// credentials and endpoint in the usual variables.
fn remote_scenario(remote: Remote) {
    let Some((bucket, store)) = remote.bucket() else {
        return;
    };
    let prefix = format!("{}/", fresh_prefix("sluice-test-objects"));
    scenario(store, &format!("{bucket}/{prefix}"), &prefix);
}

#[test]
fn s3_new_and_changed_objects_are_called_once() {
    remote_scenario(Remote::S3);
}

#[test]
fn azure_new_and_changed_objects_are_called_once() {
    remote_scenario(Remote::Azure);
}

#[test]
fn gcs_new_and_changed_objects_are_called_once() {
    remote_scenario(Remote::Gcs);
}

#[test]
fn the_event_is_an_s3_notification_lambda_code_reads() {
    let meta = ObjectMeta {
        location: ObjectPath::from("in/2024/my report+final.csv"),
        last_modified: "2024-05-01T12:30:00.250Z".parse().unwrap(),
        size: 1234,
        e_tag: Some("\"9b2cf535f27731c974343645a3985328\"".into()),
        version: None,
    };
    let event = s3_event(
        "t",
        "eu-west-1",
        "landing",
        "in/2024/my report+final.csv",
        &meta,
        "s3://landing/in/2024/my report+final.csv",
    );
    let parsed: S3Event = serde_json::from_value(event.clone()).expect("S3Event");
    let r = &parsed.records[0];
    assert_eq!(r.event_source.as_deref(), Some("aws:s3"));
    assert_eq!(r.event_name.as_deref(), Some("ObjectCreated:Put"));
    assert_eq!(r.aws_region.as_deref(), Some("eu-west-1"));
    assert_eq!(r.event_time, meta.last_modified);
    assert_eq!(r.s3.bucket.name.as_deref(), Some("landing"));
    assert_eq!(r.s3.bucket.arn.as_deref(), Some("arn:aws:s3:::landing"));
    assert_eq!(
        r.s3.object.key.as_deref(),
        Some("in/2024/my+report%2Bfinal.csv")
    );
    assert_eq!(r.s3.object.size, Some(1234));
    assert_eq!(
        r.s3.object.e_tag.as_deref(),
        Some("9b2cf535f27731c974343645a3985328")
    );
    assert_eq!(r.s3.configuration_id.as_deref(), Some("t"));
    let extra = &event["Records"][0]["sluice"];
    assert_eq!(extra["object"], "s3://landing/in/2024/my report+final.csv");
    assert_eq!(extra["payloadPath"], sluice_protocol::ATTACHMENT_PATH);
}

/// An S3 endpoint that refuses connections: the trigger keeps listing at
/// each poll (counting every failure in `/metrics`) instead of stopping,
/// and still stops cleanly.
#[test]
fn a_listing_outage_is_counted_and_the_trigger_keeps_polling() {
    let name = format!(
        "outage-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&name)
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_access_key_id("k")
        .with_secret_access_key("s")
        .with_retry(object_store::RetryConfig {
            max_retries: 0,
            ..Default::default()
        })
        .build()
        .unwrap();
    register_object_store(&format!("s3://{name}"), Arc::new(store));
    let dir = tempfile::tempdir().unwrap();
    let f = function_fixture("line-count");
    let p = pipeline(dir.path(), &f, &format!("s3://{name}/in/"));
    let run = Run::spawn(&p);
    let failures = || {
        run.metrics
            .render()
            .lines()
            .filter(|l| {
                l.starts_with("sluice_function_errors_total{") && l.contains("Sluice.ListingFailed")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    run.log.wait("three failed listings", |_| {
        failures() >= 3 || run.task.is_finished()
    });
    assert!(
        !run.task.is_finished(),
        "the trigger stopped on a listing error"
    );
    assert_eq!(run.activity.triggers_assigned.load(Ordering::SeqCst), 0);
    run.stop();
}
