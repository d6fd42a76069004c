//! `format = "objects"`: each file of a data set is one item, called one at
//! a time with its bytes staged in the sandbox (Step Functions Distributed
//! Map's S3 object listing, Lithops' map over a bucket), through the
//! `line-count` example function in real sandboxes. Object-store URLs are
//! covered by `tests/object_store.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, Response};
use sluice_taskgen::{BackfillConfig, BackfillError, Format, Hooks};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture, sluice_binary};
use tempfile::TempDir;

fn executor(f: &FunctionFixture) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut s = FunctionSpec::new("line-count", &f.dir);
    s.timeout = Duration::from_secs(10);
    s.concurrency = 2;
    ex.register(s);
    ex
}

/// Responses by call id.
type Collected = Arc<Mutex<Vec<(String, Value)>>>;

fn collector() -> (Hooks, Collected) {
    let got: Collected = Arc::default();
    let sink = Arc::clone(&got);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |id: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).expect("line-count answers JSON");
            sink.lock().unwrap().push((id.to_owned(), v));
        })),
        on_tick: None,
    };
    (hooks, got)
}

fn dead_letters(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `data/` with two text files (2 and 3 lines), one that is not UTF-8
/// (the function fails it) and one of 2,000 bytes (over the 1,000 bytes
/// the tests allow), and a hidden file that is not part of the data set.
fn data_set(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("a.txt"), "one\ntwo\n").unwrap();
    std::fs::write(data.join("sub/b.txt"), "x\ny\nz\n").unwrap();
    std::fs::write(data.join("c.bin"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    std::fs::write(data.join("d.txt"), "line\n".repeat(400)).unwrap();
    std::fs::write(data.join(".hidden"), "not an object of the data set\n").unwrap();
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_object_is_called_whole_and_failures_are_dead_lettered() {
    let dir = TempDir::new().unwrap();
    let data = data_set(dir.path());
    let sources =
        sluice_taskgen::resolve_sources(&[data.display().to_string()]).expect("the folder");
    assert_eq!(sources.len(), 4, "{sources:?}");
    let f = function_fixture("line-count");
    let ex = executor(&f);
    let cfg = BackfillConfig {
        max_concurrency: 2,
        max_attempts: 2,
        max_object_bytes: 1000,
        progress: dir.path().join("progress.redb"),
        dead_letter: dir.path().join("dead.jsonl"),
        ..BackfillConfig::new("line-count", sources.clone(), Format::Objects)
    };
    assert_eq!(cfg.max_items_per_call, 1, "objects go one per call");

    let (hooks, got) = collector();
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, std::future::pending())
        .await
        .unwrap();
    assert_eq!(s.items_expected, Some(4), "{s:?}");
    assert_eq!(
        (s.calls_succeeded, s.items_succeeded, s.items_failed),
        (2, 2, 2),
        "{s:?}"
    );
    let mut answers: Vec<(String, Value)> = got.lock().unwrap().drain(..).collect();
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    let a = data.join("a.txt").canonicalize().unwrap();
    let b = data.join("sub/b.txt").canonicalize().unwrap();
    let expect = |path: &Path, lines: u64, bytes: u64| {
        (
            format!("{}#0", path.display()),
            json!({"key": path.display().to_string(), "lines": lines, "bytes": bytes, "size": bytes, "etag": null}),
        )
    };
    assert_eq!(answers, [expect(&a, 2, 8), expect(&b, 3, 6)]);

    let mut dead = dead_letters(&dir.path().join("dead.jsonl"));
    dead.sort_by_key(|d| d["call_id"].as_str().unwrap().to_owned());
    assert_eq!(dead.len(), 2, "{dead:?}");
    let c = data.join("c.bin").canonicalize().unwrap();
    let d = data.join("d.txt").canonicalize().unwrap();
    // The function's own error, after its attempts; the item says which
    // object it was.
    assert_eq!(dead[0]["error_type"], "NotText", "{dead:?}");
    assert_eq!(dead[0]["attempts"], 2, "{dead:?}");
    assert_eq!(dead[0]["items"][0]["Key"], json!(c.display().to_string()));
    assert_eq!(dead[0]["items"][0]["Size"], 4);
    assert_eq!(
        dead[0]["items"][0]["url"],
        json!(format!("file://{}", c.display()))
    );
    // Too large: never fetched, never called.
    assert_eq!(dead[1]["error_type"], "Sluice.ObjectTooLarge", "{dead:?}");
    assert_eq!(dead[1]["attempts"], 0);
    assert!(
        dead[1]["error"]
            .as_str()
            .unwrap()
            .contains("is 2000 bytes, more than max_object_bytes (1000)"),
        "{dead:?}"
    );
    assert_eq!(dead[1]["items"][0]["Key"], json!(d.display().to_string()));

    // The same backfill again: what succeeded is skipped, the failed
    // objects are tried again (a larger limit lets the big one through).
    let (hooks, got) = collector();
    let again = BackfillConfig {
        max_object_bytes: 4000,
        ..cfg
    };
    let s = sluice_taskgen::run(&ex, again, hooks, std::future::pending())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(
        (s.calls_skipped, s.calls_succeeded, s.items_failed),
        (2, 1, 1),
        "{s:?}"
    );
    let answers = got.lock().unwrap().clone();
    assert_eq!(answers, [expect(&d, 400, 2000)]);
}

#[tokio::test]
async fn options_about_rows_are_refused_with_objects() {
    let dir = TempDir::new().unwrap();
    let data = data_set(dir.path());
    let sources = sluice_taskgen::resolve_sources(&[data.display().to_string()]).unwrap();
    let f = function_fixture("line-count");
    let ex = executor(&f);
    let base = BackfillConfig {
        progress: dir.path().join("progress.redb"),
        ..BackfillConfig::new("line-count", sources, Format::Objects)
    };
    let mut batched = base.clone();
    batched.max_items_per_call = 10;
    let mut ordered = base.clone();
    ordered.order.order_key = Some("Key".into());
    let mut columns = base.clone();
    columns.input.columns = Some(vec!["Key".into()]);
    let mut huge = base.clone();
    huge.max_object_bytes = 1 << 30;
    for (cfg, says) in [
        (batched, "max_items_per_call 10 does not apply"),
        (ordered, "order_key and item dependencies do not apply"),
        (columns, "columns cannot be chosen for format \"objects\""),
        (huge, "max_object_bytes 1073741824 is not within"),
    ] {
        match sluice_taskgen::run(&ex, cfg, Hooks::default(), std::future::pending()).await {
            Err(BackfillError::Config(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("expected a configuration error saying {says:?}: {other:?}"),
        }
    }
    assert!(
        !dir.path().join("progress.redb").exists(),
        "refused before a progress store is made"
    );
    ex.shutdown().await;
}

/// `sluice backfill` with a job of `format = "objects"`: the dry run counts
/// a call per object, the run calls each, and the job's checks name the
/// field at fault.
#[test]
fn cli_backfills_a_folder_of_objects() {
    let dir = TempDir::new().unwrap();
    data_set(dir.path());
    let f = function_fixture("line-count");
    let pipeline = dir.path().join("pipeline.toml");
    let write = |job: &str| {
        std::fs::write(
            &pipeline,
            format!(
                "[functions.line-count]\npath = {:?}\n\n[job.count]\nfunction = \"line-count\"\n\
                 source = \"data/\"\nformat = \"objects\"\nmax_object_bytes = 1000\n{job}",
                f.dir.display().to_string()
            ),
        )
        .unwrap();
    };
    let run = |args: &[&str]| {
        let out = Command::new(sluice_binary())
            .env("SLUICE_AGENT", agent_binary())
            .arg("backfill")
            .arg(&pipeline)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    write("");
    let (code, out) = run(&["count", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("total: 4 files, 4 items, 0 unreadable, 4 calls of up to 1 items"),
        "{out}"
    );
    // A sample is the first objects in name order.
    let (code, out) = run(&["count", "--dry-run", "--max-items", "2"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("total: 2 files, 2 items"), "{out}");
    let (code, out) = run(&["count", "-q", "--max-attempts", "1"]);
    // Two objects failed (one not text, one too large): exit code 1, as
    // for any failed items.
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("items: 4 total, 2 succeeded, 2 failed"),
        "{out}"
    );
    // The flag lets the large object through; what succeeded is done
    // already, and the object that is not text fails again.
    let (code, out) = run(&["count", "-q", "--max-object-bytes", "4000"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("calls: 4 total, 1 succeeded, 1 failed, 2 retries, 2 skipped"),
        "{out}"
    );

    write("max_items_per_call = 10\n");
    let (code, out) = run(&["count", "--dry-run"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("`job.count.max_items_per_call`: does not apply to format = \"objects\""),
        "{out}"
    );
}
