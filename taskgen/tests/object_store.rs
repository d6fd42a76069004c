//! Sources behind `object_store` URLs: `memory://` (an `InMemory` store the
//! test fills and registers) and `file://`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use base64::Engine;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, Response};
use sluice_taskgen::{BackfillConfig, BackfillError, Format, Hooks};
use sluice_test_support::stores::{Remote, fresh_prefix};
use sluice_test_support::{agent_binary, function_fixture};
use tempfile::TempDir;

/// A fresh `InMemory` store registered as `memory://<name>`, filled with
/// `objects`.
async fn memory_store(name: &str, objects: &[(&str, Vec<u8>)]) -> Arc<InMemory> {
    let store = Arc::new(InMemory::new());
    for (path, bytes) in objects {
        store
            .put(&ObjectPath::from(*path), bytes.clone().into())
            .await
            .unwrap();
    }
    sluice_taskgen::register_object_store(&format!("memory://{name}"), store.clone());
    store
}

fn resolve(patterns: &[&str]) -> Result<Vec<String>, BackfillError> {
    let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    sluice_taskgen::resolve_sources(&patterns)
        .map(|v| v.iter().map(|p| p.display().to_string()).collect())
}

fn parquet_bytes(rows: i64, row_group: usize) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(0..rows)) as ArrayRef,
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("n{i}")),
            )),
        ],
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_size(row_group)
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

#[tokio::test]
async fn prefixes_list_everything_below_and_globs_filter_the_last_segment() {
    memory_store(
        "listing",
        &[
            ("data/b.jsonl", b"{}\n".to_vec()),
            ("data/a.jsonl", b"{}\n".to_vec()),
            ("data/c.csv", b"x\n1\n".to_vec()),
            ("data/sub/d.jsonl", b"{}\n".to_vec()),
            ("other/e.jsonl", b"{}\n".to_vec()),
        ],
    )
    .await;
    assert_eq!(
        resolve(&["memory://listing/data/"]).unwrap(),
        [
            "memory://listing/data/a.jsonl",
            "memory://listing/data/b.jsonl",
            "memory://listing/data/c.csv",
            "memory://listing/data/sub/d.jsonl",
        ]
    );
    assert_eq!(
        resolve(&["memory://listing/data/*.jsonl"]).unwrap(),
        [
            "memory://listing/data/a.jsonl",
            "memory://listing/data/b.jsonl"
        ]
    );
    // One object; a prefix without a trailing slash; duplicates dropped.
    assert_eq!(
        resolve(&[
            "memory://listing/other/e.jsonl",
            "memory://listing/data/sub",
            "memory://listing/data/[ab].jsonl",
            "memory://listing/data/a.jsonl",
        ])
        .unwrap(),
        [
            "memory://listing/other/e.jsonl",
            "memory://listing/data/sub/d.jsonl",
            "memory://listing/data/a.jsonl",
            "memory://listing/data/b.jsonl",
        ]
    );
}

#[tokio::test]
async fn url_errors_name_the_url() {
    memory_store("errors", &[("x/a.jsonl", b"{}\n".to_vec())]).await;
    let e = resolve(&["memory://errors/x/*.parquet"]).unwrap_err();
    assert!(matches!(e, BackfillError::NoFiles { .. }), "{e}");
    assert!(e.to_string().contains("memory://errors/x/*.parquet"), "{e}");

    let e = resolve(&["memory://errors/*/a.jsonl"]).unwrap_err();
    assert!(matches!(e, BackfillError::BadPattern { .. }), "{e}");

    let e = resolve(&["ftp://host/a.jsonl"]).unwrap_err();
    assert!(e.to_string().contains("unsupported URL scheme"), "{e}");

    let missing = vec![PathBuf::from("memory://errors/x/gone.jsonl")];
    let e = sluice_taskgen::plan(&missing, &Format::Jsonl.into(), limits(10)).unwrap_err();
    assert!(matches!(e, BackfillError::Read { .. }), "{e}");
    assert!(
        e.to_string().starts_with("memory://errors/x/gone.jsonl: "),
        "{e}"
    );

    let missing = vec![PathBuf::from("memory://errors/x/gone.parquet")];
    let e = sluice_taskgen::plan(&missing, &Format::Parquet.into(), limits(10)).unwrap_err();
    assert!(
        e.to_string().contains("memory://errors/x/gone.parquet"),
        "{e}"
    );
}

#[tokio::test]
async fn plan_reads_every_format_from_memory() {
    memory_store(
        "plan",
        &[
            ("t.parquet", parquet_bytes(2_500, 1_000)),
            ("t.csv", b"a,b\n1,2\n3\n4,5\n".to_vec()),
            // A quote never closed: one bad record, not a field to the end.
            ("open.csv", b"a,b\n1,2\n3,\"x\n4,5\n".to_vec()),
            ("t.jsonl", b"{\"a\":1}\n\nnot json\r\n[2]\n".to_vec()),
            ("t.txt", b"one\r\ntwo\n\xff\n".to_vec()),
        ],
    )
    .await;
    let plan = |name: &str, format: Format| {
        let sources = vec![PathBuf::from(format!("memory://plan/{name}"))];
        let p = sluice_taskgen::plan(&sources, &format.into(), limits(10)).unwrap();
        (
            p[0].row_groups.clone(),
            p[0].items,
            p[0].bad_items,
            p[0].calls,
        )
    };
    assert_eq!(
        plan("t.parquet", Format::Parquet),
        (Some(vec![1000, 1000, 500]), 2500, 0, 250)
    );
    assert_eq!(plan("t.csv", Format::Csv), (None, 2, 1, 1));
    assert_eq!(plan("open.csv", Format::Csv), (None, 1, 1, 1));
    assert_eq!(plan("t.jsonl", Format::Jsonl), (None, 2, 1, 1));
    assert_eq!(plan("t.txt", Format::Text), (None, 2, 1, 1));
}

#[test]
fn file_urls_are_local_paths() {
    let dir = TempDir::new().unwrap();
    for name in ["b.jsonl", "a.jsonl", "c.csv"] {
        std::fs::write(dir.path().join(name), "{}\n").unwrap();
    }
    let local = resolve(&[&format!("{}/*.jsonl", dir.path().display())]).unwrap();
    let url = resolve(&[&format!("file://{}/*.jsonl", dir.path().display())]).unwrap();
    assert_eq!(local, url);
    assert_eq!(local.len(), 2);
    assert!(!local[0].contains("://"));
    let e = resolve(&[&format!("file://{}/*.parquet", dir.path().display())]).unwrap_err();
    assert!(e.to_string().contains("file://"), "{e}");
}

/// A local folder is a source as an object-store prefix is: every file
/// below it, sorted, hidden ones (such as the progress store kept next to
/// the data) left out; its format is its first file's.
#[test]
fn a_folder_is_every_file_below_it() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("2024/01")).unwrap();
    for name in [
        "b.jsonl",
        "2024/01/a.jsonl",
        ".sluice-backfill-x.redb",
        "2024/.hidden",
    ] {
        std::fs::write(data.join(name), "{}\n").unwrap();
    }
    let base = data.canonicalize().unwrap().display().to_string();
    let want = [format!("{base}/2024/01/a.jsonl"), format!("{base}/b.jsonl")];
    for pattern in [data.display().to_string(), format!("{}/", data.display())] {
        assert_eq!(resolve(&[&pattern]).unwrap(), want, "{pattern}");
    }
    let patterns = [data.display().to_string()];
    let sources = sluice_taskgen::resolve_sources(&patterns).unwrap();
    assert_eq!(
        sluice_taskgen::format_of(&patterns, &sources),
        Some(Format::Jsonl)
    );
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let e = resolve(&[&dir.path().join("empty").display().to_string()]).unwrap_err();
    assert!(e.to_string().contains("no file matches"), "{e}");
}

fn config(dir: &Path, sources: Vec<PathBuf>, format: Format) -> BackfillConfig {
    BackfillConfig {
        max_items_per_call: 100,
        max_concurrency: 2,
        progress: dir.join("progress.redb"),
        dead_letter: dir.join("dead.jsonl"),
        max_attempts: 3,
        tolerated_failure_count: None,
        order: Default::default(),
        ..BackfillConfig::new("echo", sources, format)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_parquet_and_jsonl_from_memory() {
    let store = Arc::new(InMemory::new());
    sluice_taskgen::register_object_store("memory://run", store.clone());
    backfill_reads_parquet_and_jsonl(store.clone(), "memory://run").await;
    backfill_calls_each_object(store, "memory://run").await;
}

/// The same against real servers of each cloud's protocol: the
/// environment names a bucket the test may write to (`SLUICE_TEST_S3`,
/// `SLUICE_TEST_AZ`, `SLUICE_TEST_GS`; see [`Remote`]), with the
/// credentials and endpoint in the variables `sluice backfill` users give
/// (`scripts/test-object-stores.sh` starts moto and Azurite and sets the
/// first two; a real bucket works too). Objects go under a fresh prefix, so
/// runs never meet.
async fn backfill_from(remote: Remote) {
    let Some((bucket, store)) = remote.bucket() else {
        return;
    };
    let prefix = fresh_prefix("sluice-test");
    let base = format!("{bucket}/{prefix}");
    let store = Arc::new(object_store::prefix::PrefixStore::new(store, prefix));
    backfill_reads_parquet_and_jsonl(store.clone(), &base).await;
    backfill_calls_each_object(store, &base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_parquet_and_jsonl_from_s3() {
    backfill_from(Remote::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_parquet_and_jsonl_from_azure() {
    backfill_from(Remote::Azure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_reads_parquet_and_jsonl_from_gcs() {
    backfill_from(Remote::Gcs).await;
}

/// Puts a Parquet file (1,234 rows in row groups of 500) and a JSON-lines
/// file (250 lines) under `base/in/` of `store`, then backfills them
/// through the echo function as JSON items and as spliced Parquet row
/// groups: every row reaches the function exactly once.
async fn backfill_reads_parquet_and_jsonl(store: Arc<dyn ObjectStore>, base: &str) {
    let lines: String = (0..250).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    for (path, bytes) in [
        ("in/a.parquet", parquet_bytes(1_234, 500)),
        ("in/b.jsonl", lines.into_bytes()),
    ] {
        store
            .put(&ObjectPath::from(path), bytes.into())
            .await
            .unwrap();
    }
    let sources = sluice_taskgen::resolve_sources(&[format!("{base}/in/")]).unwrap();
    let names: Vec<String> = sources.iter().map(|p| p.display().to_string()).collect();
    let (a, b) = (format!("{base}/in/a.parquet"), format!("{base}/in/b.jsonl"));
    assert_eq!(names, [a.clone(), b.clone()]);
    let progress =
        sluice_taskgen::default_progress_path(&sources, Format::Jsonl, "echo", limits(100));
    assert_eq!(progress.parent(), Some(Path::new(".")));

    let f = function_fixture("echo");
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut spec = FunctionSpec::new("echo", &f.dir);
    spec.timeout = Duration::from_secs(10);
    spec.concurrency = 2;
    ex.register(spec);

    let dir = TempDir::new().unwrap();
    let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let sink = Arc::clone(&got);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |id: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            sink.lock().unwrap().push((id.to_owned(), v));
        })),
        on_tick: None,
    };
    let parquet = vec![sources[0].clone()];
    let s = sluice_taskgen::run(
        &ex,
        config(dir.path(), parquet.clone(), Format::Parquet),
        hooks.clone(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!((s.calls_succeeded, s.items_succeeded), (13, 1234));
    let jsonl = vec![sources[1].clone()];
    let mut cfg = config(dir.path(), jsonl, Format::Jsonl);
    cfg.progress = dir.path().join("progress-jsonl.redb");
    // Responses go to the store when the job ends (Distributed Map's
    // ResultWriter), kept next to the progress store until then.
    let results = format!("{base}/out/results.jsonl");
    cfg.results = Some(PathBuf::from(&results));
    let s = sluice_taskgen::run(&ex, cfg, hooks.clone(), std::future::pending())
        .await
        .unwrap();
    assert_eq!((s.calls_succeeded, s.items_succeeded), (3, 250));
    let uploaded = store
        .get(&ObjectPath::from("out/results.jsonl"))
        .await
        .unwrap_or_else(|e| panic!("{results}: {e}"))
        .bytes()
        .await
        .unwrap();
    let local = std::fs::read(sluice_taskgen::local_results_path(
        &dir.path().join("progress-jsonl.redb"),
    ))
    .unwrap();
    assert_eq!(uploaded, local);
    let mut firsts: Vec<u64> = std::str::from_utf8(&uploaded)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["first_item"]
                .as_u64()
                .unwrap()
        })
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts, [0, 100, 200]);

    let mut ids: Vec<i64> = Vec::new();
    let mut ns: Vec<i64> = Vec::new();
    for (id, v) in got.lock().unwrap().drain(..) {
        assert_eq!(v["batch"]["call_id"], json!(id));
        for item in v["items"].as_array().unwrap() {
            if id.starts_with(&format!("{a}#")) {
                ids.push(item["id"].as_i64().unwrap());
                assert_eq!(item["name"], json!(format!("n{}", item["id"])));
            } else {
                assert!(id.starts_with(&format!("{b}#")), "{id}");
                ns.push(item["n"].as_i64().unwrap());
            }
        }
    }
    ids.sort_unstable();
    ns.sort_unstable();
    assert_eq!(ids, (0..1234).collect::<Vec<_>>());
    assert_eq!(ns, (0..250).collect::<Vec<_>>());

    // Whole row groups, their column chunks fetched by range and copied
    // as they are: the echoed Parquet files hold every row once.
    let mut cfg = config(dir.path(), parquet, Format::Parquet);
    cfg.progress = dir.path().join("progress-spliced.redb");
    cfg.payload = sluice_taskgen::PayloadFormat::Parquet;
    cfg.max_items_per_call = 1000;
    let s = sluice_taskgen::run(&ex, cfg, hooks, std::future::pending())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.calls_succeeded, s.items_succeeded), (2, 1234), "{s:?}");
    let mut ids: Vec<i64> = Vec::new();
    for (_, v) in got.lock().unwrap().drain(..) {
        let file = base64::engine::general_purpose::STANDARD
            .decode(v["parquet"].as_str().unwrap())
            .unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
            bytes::Bytes::from(file),
            1024,
        )
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            ids.extend(column.values().iter().copied());
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..1234).collect::<Vec<_>>());
}

/// Puts two text objects under `base/objects/` and backfills them with
/// `format = "objects"` through the line-count function: each call gets
/// one object's bytes, and its item the object's key, size and ETag.
async fn backfill_calls_each_object(store: Arc<dyn ObjectStore>, base: &str) {
    for (path, text) in [("objects/a.txt", "1\n2\n3\n"), ("objects/b.txt", "only\n")] {
        store
            .put(&ObjectPath::from(path), text.as_bytes().to_vec().into())
            .await
            .unwrap();
    }
    let sources = sluice_taskgen::resolve_sources(&[format!("{base}/objects/")]).unwrap();
    let f = function_fixture("line-count");
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut spec = FunctionSpec::new("line-count", &f.dir);
    spec.timeout = Duration::from_secs(10);
    ex.register(spec);
    let dir = TempDir::new().unwrap();
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&got);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |_: &str, r: &Response| {
            sink.lock()
                .unwrap()
                .push(serde_json::from_slice(&r.payload).unwrap());
        })),
        on_tick: None,
    };
    let cfg = BackfillConfig {
        progress: dir.path().join("objects.redb"),
        dead_letter: dir.path().join("objects.dead.jsonl"),
        results: Some(dir.path().join("objects.results.jsonl")),
        ..BackfillConfig::new("line-count", sources, Format::Objects)
    };
    let s = sluice_taskgen::run(&ex, cfg, hooks, std::future::pending())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.calls_succeeded, s.items_failed), (2, 0), "{s:?}");
    let mut answers = got.lock().unwrap().clone();
    answers.sort_by_key(|a| a["key"].as_str().unwrap_or_default().to_owned());
    // Every store gives an ETag (the item's `Etag`, as the listing has it).
    for a in &mut answers {
        let etag = a.as_object_mut().unwrap().remove("etag");
        assert!(
            etag.as_ref()
                .and_then(Value::as_str)
                .is_some_and(|e| !e.is_empty()),
            "{a}: {etag:?}"
        );
    }
    let key = |name: &str| {
        let url = format!("{base}/objects/{name}");
        url.split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, key)| key.to_owned())
            .unwrap()
    };
    assert_eq!(
        answers,
        [
            json!({"key": key("a.txt"), "lines": 3, "bytes": 6, "size": 6}),
            json!({"key": key("b.txt"), "lines": 1, "bytes": 5, "size": 5}),
        ]
    );
}

/// At most `items` items per call, no byte limit.
fn limits(items: usize) -> sluice_taskgen::Limits {
    sluice_taskgen::Limits {
        items,
        bytes: usize::MAX,
    }
}

/// `results` is checked before anything runs: a URL must name one object
/// of a known store, and a `file://` URL is the local file it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_urls_are_checked_before_anything_runs() {
    let dir = TempDir::new().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"n\":1}\n{\"n\":2}\n").unwrap();
    let f = function_fixture("echo");
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    ex.register(FunctionSpec::new("echo", &f.dir));
    let with_results = |results: &str| BackfillConfig {
        results: Some(PathBuf::from(results)),
        ..config(dir.path(), vec![input.clone()], Format::Jsonl)
    };
    for (results, expected) in [
        ("memory://results/out/", "names a bucket or a prefix"),
        ("memory://results", "names a bucket or a prefix"),
        ("ftp://host/results.jsonl", "unknown scheme \"ftp\""),
        ("file://elsewhere/results.jsonl", "must name a local path"),
    ] {
        let e = sluice_taskgen::run(
            &ex,
            with_results(results),
            Hooks::default(),
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, BackfillError::Config(_)), "{results}: {e}");
        let text = e.to_string();
        assert!(text.contains(results) && text.contains(expected), "{text}");
        // Refused before the progress store was made.
        assert!(!dir.path().join("progress.redb").exists(), "{results}");
    }

    let local = dir.path().join("results.jsonl");
    let s = sluice_taskgen::run(
        &ex,
        with_results(&format!("file://{}", local.display())),
        Hooks::default(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(s.calls_succeeded, 1);
    let kept = std::fs::read_to_string(&local).unwrap();
    assert_eq!(kept.lines().count(), 1, "{kept}");
    let line: Value = serde_json::from_str(kept.trim()).unwrap();
    assert_eq!(line["count"], 2, "{line}");
}
