//! Word count over text already on the machine (this repository's sources
//! and docs, and the Rust toolchain's docs when installed), through real
//! sandboxes and a real Kafka-protocol broker; the output equals a direct
//! count.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec};
use sluice_ingest::kafka::EmbeddedBroker;
use sluice_mapreduce::{MapReduceConfig, Progress, shuffle_topic};
use sluice_taskgen::Format;
use sluice_taskgen::distributed::KafkaSettings;
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

fn executor(f: &FunctionFixture) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    for (name, handler) in [("wc-map", "map"), ("wc-reduce", "reduce")] {
        let mut s = FunctionSpec::new(name, &f.dir);
        s.handler = handler.into();
        s.timeout = Duration::from_secs(30);
        s.concurrency = 2;
        ex.register(s);
    }
    ex
}

/// Runs word count with `partitions` reducers (and a combiner if asked);
/// returns the counts read back from the part files.
async fn wordcount(files: &[PathBuf], partitions: i32, combine: bool) -> BTreeMap<String, u64> {
    let f = function_fixture("wordcount");
    let ex = executor(&f);
    let broker = EmbeddedBroker::start(1).unwrap();
    let topic = shuffle_topic("wordcount", sluice_mapreduce::run_id());
    broker.create_topic(&topic, partitions).unwrap();
    let kafka = KafkaSettings {
        servers: broker.bootstrap_servers().to_owned(),
        properties: Vec::new(),
    };
    let out = TempDir::new().unwrap();
    let cfg = MapReduceConfig {
        job: "wordcount".into(),
        sources: files.to_vec(),
        input: Format::Text.into(),
        items_per_split: 200,
        map: "wc-map".into(),
        combine: combine.then(|| "wc-reduce".to_owned()),
        reduce: "wc-reduce".into(),
        reduce_partitions: partitions,
        groups_per_call: 500,
        max_concurrency: 2,
        max_attempts: 2,
        output: out.path().join("counts"),
        payload: sluice_taskgen::PayloadFormat::Json,
        output_format: sluice_mapreduce::OutputFormat::Jsonl,
    };
    let progress = Arc::new(Progress::default());
    let summary = sluice_mapreduce::run(&ex, &kafka, cfg, &topic, progress)
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(summary.output_files.len(), partitions as usize);
    let mut counts = BTreeMap::new();
    for file in &summary.output_files {
        for line in std::fs::read_to_string(file).unwrap().lines() {
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
    counts
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
    let got = wordcount(&files, 4, false).await;
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_combiner_does_not_change_the_result() {
    let files = corpus();
    let got = wordcount(&files[..3], 2, true).await;
    assert_eq!(got, direct_count(&files[..3]));
}
