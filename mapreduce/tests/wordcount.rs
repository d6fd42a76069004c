//! Word count over text already on the machine (this repository's sources
//! and docs, and the Rust toolchain's docs when installed), through real
//! sandboxes and a real Kafka-protocol broker; the output equals a direct
//! count.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec};
use sluice_ingest::kafka::EmbeddedBroker;
use sluice_mapreduce::{
    MapReduceConfig, Progress, RunState, Summary, partition_of, shuffle_record, shuffle_topic,
};
use sluice_taskgen::Format;
use sluice_taskgen::distributed::KafkaSettings;
use sluice_test_support::stores::{Remote, fresh_prefix};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture};
use tempfile::TempDir;

/// Text files of the corpus, sorted.
fn corpus() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md"]
        .iter()
        .map(|f| root.join(f))
        .collect();
    for dir in ["taskgen/src", "ingest/src/kafka", "pipeline/src"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    if let Ok(out) = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
    {
        let docs = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("share/doc");
        for f in ["rust/README.md", "cargo/README.md", "clippy/README.md"] {
            if docs.join(f).is_file() {
                files.push(docs.join(f));
            }
        }
    }
    files.sort();
    files.iter().map(|f| f.canonicalize().unwrap()).collect()
}

/// The word count the job must reproduce (the function's tokenization).
fn direct_count(files: &[PathBuf]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for f in files {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        for word in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
    }
    counts
}

/// How a word count runs.
struct Case {
    partitions: i32,
    combine: bool,
    items_per_split: usize,
    groups_per_call: usize,
    /// `WORDCOUNT_CRASH_EVERY` of the map and the reduce function: the
    /// function's process exits in the middle of every Nth call it serves.
    crash_map_every: Option<u32>,
    crash_reduce_every: Option<u32>,
    reduce_memory_bytes: usize,
    max_concurrency: usize,
    /// Resume as generation 2 of a run whose generation 1 was killed while
    /// publishing map task 0: its records are in the topic, its marker not.
    killed_while_publishing: bool,
    /// `output` as an object-store prefix: the store, and the prefix's URL.
    upload: Option<(Arc<dyn ObjectStore>, String)>,
}

impl Case {
    fn new(partitions: i32) -> Self {
        Self {
            partitions,
            combine: false,
            items_per_split: 200,
            groups_per_call: 500,
            crash_map_every: None,
            crash_reduce_every: None,
            reduce_memory_bytes: sluice_mapreduce::DEFAULT_REDUCE_MEMORY_BYTES,
            max_concurrency: 2,
            killed_while_publishing: false,
            upload: None,
        }
    }
}

fn executor(f: &FunctionFixture, case: &Case) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    for (name, handler, crash) in [
        ("wc-map", "map", case.crash_map_every),
        ("wc-reduce", "reduce", case.crash_reduce_every),
    ] {
        let mut s = FunctionSpec::new(name, &f.dir);
        s.handler = handler.into();
        s.timeout = Duration::from_secs(30);
        s.concurrency = 2;
        if let Some(n) = crash {
            s.env.push(("WORDCOUNT_CRASH_EVERY".into(), n.to_string()));
            // One sandbox: a retried call goes to the fresh sandbox that
            // replaced the crashed one, whose first call succeeds.
            s.concurrency = 1;
        }
        ex.register(s);
    }
    ex
}

/// Runs word count; returns the counts read back from the part files, and
/// the summary.
async fn wordcount(files: &[PathBuf], case: &Case) -> (BTreeMap<String, u64>, Summary) {
    let f = function_fixture("wordcount");
    let ex = executor(&f, case);
    let broker = EmbeddedBroker::start(1).unwrap();
    let topic = shuffle_topic("wordcount", sluice_mapreduce::run_id());
    broker.create_topic(&topic, case.partitions).unwrap();
    let kafka = KafkaSettings {
        servers: broker.bootstrap_servers().to_owned(),
        properties: Vec::new(),
    };
    let out = TempDir::new().unwrap();
    let cfg = MapReduceConfig {
        job: "wordcount".into(),
        sources: files.to_vec(),
        input: Format::Text.into(),
        items_per_split: case.items_per_split,
        map: "wc-map".into(),
        combine: case.combine.then(|| "wc-reduce".to_owned()),
        reduce: "wc-reduce".into(),
        reduce_partitions: case.partitions,
        groups_per_call: case.groups_per_call,
        max_concurrency: case.max_concurrency,
        max_attempts: 2,
        output: out.path().join("counts"),
        output_url: case.upload.as_ref().map(|(_, url)| url.clone()),
        payload: sluice_taskgen::PayloadFormat::Json,
        payload_file: false,
        output_format: sluice_mapreduce::OutputFormat::Jsonl,
        reduce_memory_bytes: case.reduce_memory_bytes,
    };
    let mut state = RunState::fresh(&cfg, &kafka.servers, &topic, Vec::new(), false).unwrap();
    if case.killed_while_publishing {
        let producer: FutureProducer = kafka.client().create().unwrap();
        for key in ["stale-a", "stale-b", "the"] {
            // Task 0, generation 1's first publishing attempt.
            let body = shuffle_record(0, 1001, Some(key), json!(1000));
            let p = partition_of(key, case.partitions);
            let record = FutureRecord::<str, [u8]>::to(&topic)
                .partition(p)
                .key(key)
                .payload(&body);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
        state.generation = 2;
    }
    let progress = Arc::new(Progress::default());
    let summary = sluice_mapreduce::run(&ex, &kafka, cfg, state, progress)
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(summary.output_files.len(), case.partitions as usize);
    assert!(out.path().join("counts/_SUCCESS").is_file());
    // No temporary or spilled files are left.
    let left: Vec<_> = std::fs::read_dir(out.path().join("counts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let mut counts = BTreeMap::new();
    let mut parts = Vec::new();
    for file in &summary.output_files {
        parts.push(std::fs::read_to_string(file).unwrap());
    }
    if let Some((store, url)) = &case.upload {
        parts = uploaded_parts(store.as_ref(), url, &summary).await;
    }
    for part in &parts {
        for line in part.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap().to_owned();
            // Each key is reduced once, by one reducer.
            assert!(
                counts.insert(key, v["value"].as_u64().unwrap()).is_none(),
                "{line}"
            );
        }
    }
    assert_eq!(summary.keys, counts.len() as u64);
    (counts, summary)
}

/// The part files under the prefix `url`, in order, checked to be the
/// summary's, with `_SUCCESS` and nothing else next to them.
async fn uploaded_parts(store: &dyn ObjectStore, url: &str, summary: &Summary) -> Vec<String> {
    let prefix = ObjectPath::from(url.split_once("://").unwrap().1.split_once('/').unwrap().1);
    let mut names: Vec<String> = store
        .list_with_delimiter(Some(&prefix))
        .await
        .unwrap()
        .objects
        .iter()
        .map(|o| o.location.filename().unwrap().to_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = summary
        .output_files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        summary.uploaded,
        want.iter()
            .map(|n| format!("{url}/{n}"))
            .collect::<Vec<_>>()
    );
    let parts_only = want.clone();
    want.push("_SUCCESS".into());
    want.sort();
    assert_eq!(names, want, "under {url}");
    let mut parts = Vec::new();
    for (name, local) in parts_only.iter().zip(&summary.output_files) {
        let bytes = store
            .get(&prefix.child(name.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(bytes, std::fs::read(local).unwrap(), "{name}");
        parts.push(String::from_utf8(bytes.to_vec()).unwrap());
    }
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_equals_a_direct_count() {
    let files = corpus();
    let want = direct_count(&files);
    assert!(
        want.len() > 1000,
        "a corpus of {} words is too small",
        want.len()
    );
    let (got, summary) = wordcount(&files, &Case::new(4)).await;
    assert_eq!(got, want);
    assert_eq!(summary.retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combiner_does_not_change_the_result() {
    let files = corpus();
    let mut case = Case::new(2);
    case.combine = true;
    let (got, _) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
}

/// Map calls whose process exits mid-call are retried on a fresh sandbox;
/// a crashed call published nothing, so nothing is counted twice. (One
/// call at a time: the retry is the fresh sandbox's first call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_tasks_that_crash_once_are_retried_without_changing_the_result() {
    let files = corpus();
    let mut case = Case::new(2);
    case.items_per_split = 60;
    case.max_concurrency = 1;
    case.crash_map_every = Some(2);
    let (got, summary) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
    assert!(summary.map_tasks >= 4, "{summary:?}");
    // Every second call crashed: about half the tasks were retried.
    assert!(summary.retries >= summary.map_tasks / 2, "{summary:?}");
}

/// A reduce function whose process exits in the middle of a reducer's
/// calls (after it answered some groups) is called again for the groups of
/// the crashed call; the part file holds every key once. (One reducer, so
/// that the retry is the fresh sandbox's first call.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_that_crashes_mid_way_is_rerun_and_its_output_is_complete() {
    let files = corpus();
    let mut case = Case::new(1);
    case.groups_per_call = 40;
    case.crash_reduce_every = Some(3);
    let (got, summary) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
    // The reducer makes more than 3 calls: some crashed mid-way.
    assert!(got.len() > 3 * 40, "{} keys", got.len());
    assert!(summary.retries >= 1, "{summary:?}");
}

/// With a reduce memory budget of a few KiB, reducers spill many sorted
/// runs to disk and merge them: the result is the in-memory one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_reduce_memory_budget_spills_sorted_runs_without_changing_the_result() {
    let files = corpus();
    let mut case = Case::new(2);
    case.items_per_split = 50;
    case.reduce_memory_bytes = 16 << 10;
    let (got, summary) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
    assert!(summary.spills >= 4, "{summary:?}");
}

/// A resumed run (generation 2) on a topic holding records of map task 0
/// that the killed generation 1 published without their end-of-map marker:
/// the resumed run publishes task 0 again under its own attempt number, and
/// the stale records never count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_killed_run_published_without_their_marker_never_count() {
    let files = corpus();
    let mut case = Case::new(2);
    case.killed_while_publishing = true;
    let (got, _) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
}

/// `output` as an object-store prefix: the part files and then `_SUCCESS`
/// go there. An earlier run's output under it, with more part files than
/// this run writes, is replaced: its `_SUCCESS` and extra part go.
async fn output_to(store: Arc<dyn ObjectStore>, url: String) {
    let prefix = ObjectPath::from(url.split_once("://").unwrap().1.split_once('/').unwrap().1);
    for name in ["part-00000.jsonl", "part-00002.jsonl", "_SUCCESS"] {
        store
            .put(&prefix.child(name), "stale".into())
            .await
            .unwrap();
    }
    let files = corpus();
    let mut case = Case::new(2);
    case.upload = Some((store, url));
    // `wordcount` reads the counts from the store (`uploaded_parts`).
    let (got, _) = wordcount(&files[..3], &case).await;
    assert_eq!(got, direct_count(&files[..3]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_an_object_store_prefix() {
    let store = Arc::new(InMemory::new());
    sluice_ingest::objects::register_object_store("memory://mapreduce", store.clone());
    output_to(store, "memory://mapreduce/out/counts".into()).await;
}

/// The same against real servers (`scripts/test-object-stores.sh` starts
/// moto and Azurite; see [`Remote`]).
async fn output_to_remote(remote: Remote) {
    let Some((bucket, store)) = remote.bucket() else {
        return;
    };
    output_to(
        store,
        format!("{bucket}/{}/counts", fresh_prefix("sluice-mapreduce")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_s3() {
    output_to_remote(Remote::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_azure() {
    output_to_remote(Remote::Azure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_gcs() {
    output_to_remote(Remote::Gcs).await;
}
