//! `sluice_taskgen::run` against real sandboxes (the echo and fail example
//! functions): formats, resume after an interruption, dead letters.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, Response};
use sluice_taskgen::{BackfillConfig, BackfillError, Format, Hooks, Summary};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture, sluice_binary};
use tempfile::TempDir;

fn executor(name: &str, f: &FunctionFixture, concurrency: u32) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut s = FunctionSpec::new(name, &f.dir);
    s.timeout = Duration::from_secs(10);
    s.concurrency = concurrency;
    ex.register(s);
    ex
}

fn config(dir: &Path, function: &str, sources: Vec<PathBuf>, format: Format) -> BackfillConfig {
    BackfillConfig {
        max_items_per_call: 10,
        max_concurrency: 2,
        progress: dir.join("progress.redb"),
        dead_letter: dir.join("dead.jsonl"),
        max_attempts: 3,
        tolerated_failure_count: None,
        order: Default::default(),
        ..BackfillConfig::new(function, sources, format)
    }
}

/// Hooks that keep every response, by call id (a list: a call may repeat).
/// Responses by call id, in arrival order.
type Collected = Arc<Mutex<Vec<(String, Value)>>>;

fn collector() -> (Hooks, Collected) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&got);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |id: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).expect("echo returns JSON");
            sink.lock().unwrap().push((id.to_owned(), v));
        })),
        on_tick: None,
    };
    (hooks, got)
}

fn items_of(got: &[(String, Value)]) -> Vec<Value> {
    got.iter()
        .flat_map(|(_, v)| v["items"].as_array().unwrap().clone())
        .collect()
}

fn never() -> std::future::Pending<()> {
    std::future::pending()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_sums_match_a_direct_arrow_sum() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    let batch = write_lineitem(&path, 2_000);
    let want_q = arrow_sum(&batch, "l_quantity");
    let want_p = arrow_sum(&batch, "l_extendedprice");

    let sources =
        sluice_taskgen::resolve_sources(&[dir.path().join("*.parquet").display().to_string()])
            .unwrap();
    let mut cfg = config(dir.path(), "echo", sources.clone(), Format::Parquet);
    cfg.max_items_per_call = 100;
    let plan = sluice_taskgen::plan(&sources, &Format::Parquet.into(), limits(100)).unwrap();
    assert_eq!(plan[0].row_groups, Some(vec![700, 700, 600]));
    assert_eq!((plan[0].items, plan[0].calls), (2000, 20));

    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);
    let (hooks, got) = collector();
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!(
        (s.calls_total, s.calls_succeeded, s.calls_failed),
        (20, 20, 0)
    );
    assert_eq!(s.items_succeeded, 2000);
    let got = got.lock().unwrap();
    let items = items_of(&got);
    assert_eq!(items.len(), 2000);
    let sum = |k: &str| items.iter().map(|i| i[k].as_f64().unwrap()).sum::<f64>();
    assert!(
        (sum("l_quantity") - want_q).abs() < 1e-6,
        "{} vs {want_q}",
        sum("l_quantity")
    );
    assert!(
        (sum("l_extendedprice") - want_p).abs() < 1e-3,
        "{} vs {want_p}",
        sum("l_extendedprice")
    );
    // The batch header describes the call.
    let (id, first) = got.iter().find(|(id, _)| id.ends_with("#700")).unwrap();
    assert_eq!(first["batch"]["call_id"], json!(id));
    assert_eq!(first["batch"]["first_item"], json!(700));
    assert_eq!(first["batch"]["count"], json!(100));
    assert_eq!(first["items"][0]["l_shipmode"], json!("MODE0"));
}

/// Writes `rows` rows of `l_quantity`, `l_extendedprice`, `l_shipmode` in
/// row groups of 700, and returns them.
fn write_lineitem(path: &Path, rows: usize) -> RecordBatch {
    let quantity: Vec<f64> = (0..rows).map(|i| ((i * 7) % 50 + 1) as f64).collect();
    let price: Vec<f64> = (0..rows)
        .map(|i| ((i * 7919) % 100_000) as f64 / 100.0 + 900.0)
        .collect();
    let mode: Vec<String> = (0..rows).map(|i| format!("MODE{}", i % 7)).collect();
    let schema = Arc::new(Schema::new(vec![
        Field::new("l_quantity", DataType::Float64, false),
        Field::new("l_extendedprice", DataType::Float64, false),
        Field::new("l_shipmode", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Float64Array::from(quantity.clone())) as ArrayRef,
            Arc::new(Float64Array::from(price.clone())),
            Arc::new(StringArray::from(mode)),
        ],
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_size(700)
        .build();
    let mut writer =
        ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    batch
}

fn arrow_sum(batch: &RecordBatch, column: &str) -> f64 {
    let col = batch.column_by_name(column).unwrap();
    let col = col.as_any().downcast_ref::<Float64Array>().unwrap();
    col.iter().map(|v| v.unwrap()).sum()
}

fn write_jsonl(path: &Path, n: usize) {
    let text: String = (0..n).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_resumes_and_calls_every_item() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("in.jsonl");
    write_jsonl(&path, 1000);
    let sources = sluice_taskgen::resolve_sources(&[path.display().to_string()]).unwrap();
    let cfg = config(dir.path(), "echo", sources, Format::Jsonl);
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);

    // Run 1: stop after 20 successful calls.
    let (mut hooks, got1) = collector();
    let stop = Arc::new(tokio::sync::Notify::new());
    let inner = hooks.on_response.take().unwrap();
    let (count, notify) = (Arc::new(Mutex::new(0)), Arc::clone(&stop));
    hooks.on_response = Some(Arc::new(move |id: &str, r: &Response| {
        inner(id, r);
        let mut c = count.lock().unwrap();
        *c += 1;
        if *c == 20 {
            notify.notify_one();
        }
    }));
    let stopped = Arc::clone(&stop);
    let s1 = sluice_taskgen::run(
        &ex,
        cfg.clone(),
        hooks,
        async move { stopped.notified().await },
    )
    .await
    .unwrap();
    assert!(s1.interrupted);
    assert!(
        s1.calls_succeeded >= 20 && s1.calls_succeeded < 100,
        "{s1:?}"
    );

    // Run 2: the rest.
    let (hooks, got2) = collector();
    let s2 = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert!(!s2.interrupted);
    assert_eq!(s2.calls_total, 100);
    assert_eq!(s2.calls_skipped, s1.calls_succeeded);
    assert_eq!(s2.calls_succeeded + s2.calls_skipped, 100);

    let mut per_item: HashMap<i64, usize> = HashMap::new();
    for v in items_of(&got1.lock().unwrap())
        .into_iter()
        .chain(items_of(&got2.lock().unwrap()))
    {
        *per_item.entry(v["n"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(per_item.len(), 1000, "every item at least once");
    // In-flight calls finish before an interrupted run returns: exactly once.
    assert!(per_item.values().all(|&c| c == 1));

    // Run 3: nothing left.
    let s3 = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s3.calls_skipped, s3.calls_succeeded), (100, 0));
    assert_eq!(s3.items_skipped, 1000);
}

fn dead_letters(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_calls_go_to_the_dead_letter_file_and_can_stop_the_job() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("in.jsonl");
    write_jsonl(&path, 25);
    let sources = sluice_taskgen::resolve_sources(&[path.display().to_string()]).unwrap();
    let f = function_fixture("fail");
    let ex = executor("fail", &f, 2);

    let mut cfg = config(dir.path(), "fail", sources, Format::Jsonl);
    cfg.max_attempts = 2;
    let s = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap();
    assert_eq!((s.calls_total, s.calls_failed, s.calls_retried), (3, 3, 3));
    assert_eq!(s.items_failed, 25);
    let dead = dead_letters(&cfg.dead_letter);
    assert_eq!(dead.len(), 3);
    let mut items = Vec::new();
    for d in &dead {
        assert_eq!(d["error_type"], json!("OrderRejected"), "{d}");
        assert_eq!(d["attempts"], json!(2));
        assert!(
            d["call_id"]
                .as_str()
                .unwrap()
                .starts_with(d["source"].as_str().unwrap())
        );
        assert!(
            d["error"].as_str().unwrap().contains("order rejected"),
            "{d}"
        );
        items.extend(
            d["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["n"].as_i64().unwrap()),
        );
    }
    items.sort();
    assert_eq!(items, (0..25).collect::<Vec<_>>());

    // Failed calls are not recorded as done: a second run tries them again,
    // and with no failure tolerated it stops at the first.
    cfg.dead_letter = dir.path().join("dead2.jsonl");
    cfg.max_concurrency = 1;
    cfg.tolerated_failure_count = Some(0);
    match sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never()).await {
        Err(BackfillError::TooManyFailures {
            failed,
            tolerated,
            summary,
            ..
        }) => {
            assert_eq!((failed, tolerated.as_str()), (1, "the 0 tolerated"));
            assert_eq!(summary.calls_failed, 1);
            assert_eq!(summary.calls_skipped, 0);
        }
        other => panic!("expected TooManyFailures, got {other:?}"),
    }
    ex.shutdown().await;
    assert_eq!(dead_letters(&cfg.dead_letter).len(), 1);
}

async fn echo_items(dir: &Path, file: &Path, format: Format) -> (Summary, Vec<Value>) {
    let sources = sluice_taskgen::resolve_sources(&[file.display().to_string()]).unwrap();
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);
    let (hooks, got) = collector();
    let mut cfg = config(dir, "echo", sources, format);
    cfg.max_items_per_call = 2;
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    let mut got = got.lock().unwrap().clone();
    got.sort_by_key(|(_, v)| v["batch"]["first_item"].as_u64().unwrap());
    (s, items_of(&got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_and_text_items() {
    let dir = TempDir::new().unwrap();
    let csv = dir.path().join("a.csv");
    let mut text = b"id,name\n1,\"Smith, J\"\n2,Lee\n3\n4,Ng\n5,\"O, k\",extra\n6,".to_vec();
    text.extend_from_slice(b"Bj\xf8rn\n7,Li\n");
    std::fs::write(&csv, text).unwrap();
    let (s, items) = echo_items(dir.path(), &csv, Format::Csv).await;
    assert_eq!(
        items,
        vec![
            json!({"id": "1", "name": "Smith, J"}),
            json!({"id": "2", "name": "Lee"}),
            json!({"id": "4", "name": "Ng"}),
            json!({"id": "7", "name": "Li"}),
        ]
    );
    assert_eq!((s.items_total, s.items_failed), (7, 3));
    // Each bad record is a failed item named by file and line that keeps
    // its text: too few fields, too many, a field that is not UTF-8.
    let dead = dead_letters(&dir.path().join("dead.jsonl"));
    let file = csv.canonicalize().unwrap();
    let got: Vec<(String, Value)> = dead
        .iter()
        .map(|d| (d["error"].as_str().unwrap().to_owned(), d["items"].clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                format!("{}:4: 1 fields where the header has 2", file.display()),
                json!(["3"])
            ),
            (
                format!("{}:6: 3 fields where the header has 2", file.display()),
                json!(["5,\"O, k\",extra"])
            ),
            (
                format!("{}:7: field `name` is not valid UTF-8", file.display()),
                json!(["6,Bj\u{fffd}rn"])
            ),
        ]
    );

    // A stray quote: the csv reader would take the field it opens to run
    // to the end of the file, folding the later records into it. The record
    // is a failed item that keeps the file's text from its start; a quoted
    // field over two lines and a quote inside a field are fine.
    let dir = TempDir::new().unwrap();
    let csv = dir.path().join("b.csv");
    let text = "id,note\n1,\"two\nlines\"\n2,5\"3 inch\n3,\"oops\n4,x\n5,y\n";
    std::fs::write(&csv, text).unwrap();
    let (s, items) = echo_items(dir.path(), &csv, Format::Csv).await;
    assert_eq!(
        items,
        vec![
            json!({"id": "1", "note": "two\nlines"}),
            json!({"id": "2", "note": "5\"3 inch"}),
        ]
    );
    assert_eq!((s.items_total, s.items_failed), (3, 1));
    let dead = dead_letters(&dir.path().join("dead.jsonl"));
    let file = csv.canonicalize().unwrap();
    assert_eq!(
        dead[0]["error"],
        format!(
            "{}:5: the quoted field opened on line 5 is never closed (the file ends inside it)",
            file.display()
        )
    );
    assert_eq!(dead[0]["items"], json!(["3,\"oops\n4,x\n5,y\n"]));
    // The same with CRLF line breaks.
    let dir = TempDir::new().unwrap();
    let csv = dir.path().join("c.csv");
    std::fs::write(&csv, "id,note\r\n1,a\r\n2,\"oops\r\n3,b\r\n").unwrap();
    let (s, _) = echo_items(dir.path(), &csv, Format::Csv).await;
    assert_eq!((s.items_total, s.items_failed), (2, 1));
    let dead = dead_letters(&dir.path().join("dead.jsonl"));
    let file = csv.canonicalize().unwrap();
    assert_eq!(
        dead[0]["error"],
        format!(
            "{}:3: the quoted field opened on line 3 is never closed (the file ends inside it)",
            file.display()
        )
    );
    assert_eq!(dead[0]["items"], json!(["2,\"oops\r\n3,b\r\n"]));

    let dir = TempDir::new().unwrap();
    let text = dir.path().join("a.txt");
    std::fs::write(&text, "first line\n\n{\"not\": \"parsed\"}\n").unwrap();
    let (s, items) = echo_items(dir.path(), &text, Format::Text).await;
    assert_eq!(
        items,
        vec![
            json!("first line"),
            json!(""),
            json!("{\"not\": \"parsed\"}")
        ]
    );
    assert_eq!((s.calls_succeeded, s.items_failed), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_json_line_is_a_failed_item_named_by_file_and_line() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, "{\"n\":0}\n\n{\"n\":1}\n{\"n\": oops}\n{\"n\":2}\n").unwrap();
    let (s, items) = echo_items(dir.path(), &file, Format::Jsonl).await;
    assert_eq!(
        items,
        vec![json!({"n": 0}), json!({"n": 1}), json!({"n": 2})]
    );
    assert_eq!(
        (s.items_total, s.items_succeeded, s.items_failed),
        (4, 3, 1)
    );
    let dead = dead_letters(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1);
    // The file's line, and the column within it (not serde_json's "line 1").
    let want = format!(
        "{}:4: expected value at column 7",
        file.canonicalize().unwrap().display()
    );
    assert_eq!(dead[0]["error"].as_str().unwrap(), want, "{}", dead[0]);
    assert_eq!(dead[0]["items"], json!(["{\"n\": oops}"]));
}

/// `DIR/pipeline.toml` declaring `f` as function `echo`.
fn echo_pipeline(dir: &Path, f: &FunctionFixture) -> PathBuf {
    let pipeline = dir.join("pipeline.toml");
    let text = format!(
        "[functions.echo]\npath = {:?}\n",
        f.dir.display().to_string()
    );
    std::fs::write(&pipeline, text).unwrap();
    pipeline
}

#[test]
fn cli_dry_run_and_backfill() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_jsonl(&data.join("a.jsonl"), 15);
    write_jsonl(&data.join("b.jsonl"), 5);
    let f = function_fixture("echo");
    let pipeline = echo_pipeline(dir.path(), &f);
    let glob = data.join("*.jsonl").display().to_string();
    let run = |extra: &[&str]| {
        let out = Command::new(sluice_binary())
            .env("SLUICE_AGENT", agent_binary())
            .args(["backfill", "-p"])
            .arg(&pipeline)
            .args([
                "-f",
                "echo",
                "--format",
                "jsonl",
                "--max-items-per-call",
                "10",
                "--source",
            ])
            .arg(&glob)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("total: 2 files, 20 items, 0 unreadable, 3 calls"),
        "{out}"
    );
    // Where a run would keep its outputs.
    assert!(out.contains("responses not kept (give --results"), "{out}");
    assert!(out.contains(".redb (new), failed items in"), "{out}");
    let (code, out, err) = run(&["--dry-run", "--results", "out/r.jsonl"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("responses in out/r.jsonl"), "{out}");
    // An object-store URL: kept next to the progress store, uploaded at the
    // end; one that names no object is refused before anything runs.
    let (code, out, err) = run(&["--dry-run", "--results", "memory://out/r.jsonl"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(".results.jsonl, uploaded to memory://out/r.jsonl when the job ends"),
        "{out}"
    );
    let (code, _, err) = run(&["--dry-run", "--results", "memory://out/"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("results memory://out/: names a bucket or a prefix"),
        "{err}"
    );
    // Flags keep to the ranges the pipeline file allows.
    let (code, _, err) = run(&["--dry-run", "--max-concurrency", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("'--max-concurrency <MAX_CONCURRENCY>': 0 is out of range: expected 1..=1000"),
        "{err}"
    );

    let (code, out, err) = run(&["-q"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("calls: 3 total, 3 succeeded, 0 failed, 0 retries, 0 skipped"),
        "{out}"
    );
    let (code, out, err) = run(&["-q"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 skipped"), "{out}");
    // A dry run says what a run would skip.
    let (code, out, err) = run(&["--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("(3 calls done by earlier runs: a run skips them)"),
        "{out}"
    );
    // The default progress store lives next to the data.
    assert!(std::fs::read_dir(&data).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".sluice-backfill-")
    }),);
}

/// At most `items` items per call, no byte limit.
fn limits(items: usize) -> sluice_taskgen::Limits {
    sluice_taskgen::Limits {
        items,
        bytes: usize::MAX,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_are_projected_and_a_missing_column_names_the_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    write_lineitem(&path, 50);
    let sources = vec![path.clone()];
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);
    let (hooks, got) = collector();
    let mut cfg = config(dir.path(), "echo", sources.clone(), Format::Parquet);
    cfg.input.columns = Some(vec!["l_shipmode".into(), "l_quantity".into()]);
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert_eq!(s.items_succeeded, 50);
    let items = items_of(&got.lock().unwrap());
    // Only the projected columns, in the file's column order.
    let keys: Vec<&String> = items[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["l_quantity", "l_shipmode"], "{}", items[0]);

    cfg.input.columns = Some(vec!["l_discount".into()]);
    cfg.progress = dir.path().join("p2.redb");
    let e = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::MissingColumn { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("no column \"l_discount\" (columns: l_quantity, l_extendedprice, l_shipmode)"),
        "{msg}"
    );

    // CSV: another delimiter, and a projection.
    let csv = dir.path().join("people.csv");
    std::fs::write(&csv, "id;name;city\n1;Ann;Oslo\n2;Bo;Rome\n").unwrap();
    let (hooks, got) = collector();
    let mut cfg = config(dir.path(), "echo", vec![csv.clone()], Format::Csv);
    cfg.progress = dir.path().join("p3.redb");
    cfg.input.csv_delimiter = b';';
    cfg.input.columns = Some(vec!["name".into()]);
    sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert_eq!(
        items_of(&got.lock().unwrap()),
        vec![json!({"name": "Ann"}), json!({"name": "Bo"})]
    );
    cfg.input.columns = Some(vec!["zip".into()]);
    cfg.progress = dir.path().join("p4.redb");
    let e = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("no column \"zip\" (columns: id, name, city)"),
        "{e}"
    );

    // JSON lines: objects keep the chosen fields (an object without them
    // becomes {}); a line that is not an object is a failed item, named.
    let jsonl = dir.path().join("mixed.jsonl");
    std::fs::write(&jsonl, "{\"name\":\"A\",\"x\":1}\n[1]\n{\"x\":2}\n7\n").unwrap();
    let (hooks, got) = collector();
    let mut cfg = config(dir.path(), "echo", vec![jsonl.clone()], Format::Jsonl);
    cfg.progress = dir.path().join("p5.redb");
    cfg.dead_letter = dir.path().join("dead5.jsonl");
    cfg.input.columns = Some(vec!["name".into()]);
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    assert_eq!(
        items_of(&got.lock().unwrap()),
        vec![json!({"name": "A"}), json!({})]
    );
    assert_eq!((s.items_total, s.items_failed), (4, 2));
    let errors: Vec<String> = dead_letters(&dir.path().join("dead5.jsonl"))
        .iter()
        .map(|d| d["error"].as_str().unwrap().to_owned())
        .collect();
    let file = jsonl.display();
    assert_eq!(
        errors,
        [
            format!(
                "{file}:2: an array is not a JSON object, so `columns` cannot choose fields from it"
            ),
            format!(
                "{file}:4: a number is not a JSON object, so `columns` cannot choose fields from it"
            ),
        ]
    );
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_cut_by_bytes_and_the_plan_agrees() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("in.jsonl");
    // 20 items of 30 bytes as compact JSON, and one of 500 bytes.
    let mut text: String = (0..20)
        .map(|i| format!("{{\"n\":{i:>2},\"pad\":\"{}\"}}\n", "x".repeat(14)))
        .collect();
    text.push_str(&format!("{{\"big\":\"{}\"}}\n", "y".repeat(490)));
    std::fs::write(&path, text).unwrap();
    let limits = sluice_taskgen::Limits {
        items: 10,
        bytes: 100,
    };
    // 31 bytes each with the separator: 3 per call; the big one alone.
    let plan =
        sluice_taskgen::plan(std::slice::from_ref(&path), &Format::Jsonl.into(), limits).unwrap();
    assert_eq!((plan[0].items, plan[0].calls), (21, 8));

    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);
    let (hooks, got) = collector();
    let mut cfg = config(dir.path(), "echo", vec![path], Format::Jsonl);
    cfg.max_bytes_per_call = 100;
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.calls_succeeded, s.items_succeeded), (8, 21));
    let mut got = got.lock().unwrap().clone();
    got.sort_by_key(|(_, v)| v["batch"]["first_item"].as_u64().unwrap());
    let counts: Vec<u64> = got
        .iter()
        .map(|(_, v)| v["batch"]["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [3, 3, 3, 3, 3, 3, 2, 1]);

    // A store written with other limits is refused: its call ids would
    // name other items.
    cfg.max_bytes_per_call = 1000;
    let e = sluice_taskgen::run(&executor("echo", &f, 1), cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::ProgressLayout { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tolerated_failure_percentage_stops_the_job() {
    let dir = TempDir::new().unwrap();
    // Parquet: the item count is known up front, so the job stops as soon
    // as more than 10 % of the items failed: after the third call of 100.
    let path = dir.path().join("lineitem.parquet");
    write_lineitem(&path, 2_000);
    let f = function_fixture("fail");
    let ex = executor("fail", &f, 1);
    let mut cfg = config(dir.path(), "fail", vec![path], Format::Parquet);
    cfg.max_items_per_call = 100;
    cfg.max_concurrency = 1;
    cfg.max_attempts = 1;
    cfg.tolerated_failure_percentage = Some(10.0);
    match sluice_taskgen::run(&ex, cfg, Hooks::default(), never()).await {
        Err(BackfillError::TooManyFailures {
            tolerated, summary, ..
        }) => {
            assert_eq!(
                tolerated,
                "the tolerated 10% of 2000 items (300 items failed)"
            );
            assert_eq!(
                (summary.calls_failed, summary.items_expected),
                (3, Some(2000))
            );
        }
        other => panic!("expected TooManyFailures, got {other:?}"),
    }
    ex.shutdown().await;

    // JSON lines: checked at the end, against every item read; 1 bad line
    // of 20 is 5 %.
    let path = dir.path().join("in.jsonl");
    let mut text: String = (0..19).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    text.push_str("{oops\n");
    std::fs::write(&path, text).unwrap();
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 1);
    let mut cfg = config(dir.path(), "echo", vec![path], Format::Jsonl);
    cfg.progress = dir.path().join("p2.redb");
    cfg.tolerated_failure_percentage = Some(5.0);
    let s = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap();
    assert_eq!((s.items_total, s.items_failed), (20, 1));
    cfg.progress = dir.path().join("p3.redb");
    cfg.tolerated_failure_percentage = Some(4.9);
    let e = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("exceed the tolerated 4.9% of 20 items"),
        "{e}"
    );
    ex.shutdown().await;
}

/// A pipeline file in `dir` with the echo function and `[job.replay]`
/// calling it with `job`'s settings; the fixture must outlive its use.
fn echo_job(dir: &Path, job: &str) -> (FunctionFixture, PathBuf) {
    let f = function_fixture("echo");
    let pipeline = dir.join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.echo]\npath = {:?}\n\n[job.replay]\nfunction = \"echo\"\n{job}",
            f.dir.display().to_string()
        ),
    )
    .unwrap();
    (f, pipeline)
}

/// `sluice backfill PIPELINE ARGS...`: exit code, stdout, stderr.
fn backfill_cli(pipeline: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(sluice_binary())
        .env("SLUICE_AGENT", agent_binary())
        .arg("backfill")
        .arg(pipeline)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_runs_a_job_of_the_pipeline_and_flags_override_it() {
    let dir = TempDir::new().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    write_jsonl(&dir.path().join("data/a.jsonl"), 12);
    let (_f, pipeline) = echo_job(
        dir.path(),
        "source = \"data/*.jsonl\"\nmax_items_per_call = 5\nprogress = \"replay.redb\"\n",
    );
    let run = |args: &[&str]| backfill_cli(&pipeline, args);
    // The job's settings (format from the extension, 5 items per call)...
    let (code, out, err) = run(&["replay", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("total: 1 files, 12 items, 0 unreadable, 3 calls of up to 5 items"),
        "{out}"
    );
    // ...overridden by a flag.
    let (code, out, err) = run(&["replay", "--dry-run", "--max-items-per-call", "12"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 calls of up to 12 items"), "{out}");
    // A real run keeps its progress where the job says, relative to the
    // pipeline file.
    let (code, out, err) = run(&["replay", "-q"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("calls: 3 total, 3 succeeded"), "{out}");
    assert!(dir.path().join("replay.redb").exists());
    // Errors name what is wrong.
    let (code, _, err) = run(&["nightly"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no job named \"nightly\"; declared jobs: replay"),
        "{err}"
    );
    let (code, _, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--function is required without a JOB"),
        "{err}"
    );
}

/// A job's `batch_input` reaches every call; `--batch-input` replaces it,
/// and what is not a JSON object is refused before anything runs.
#[test]
fn cli_batch_input_from_the_job_or_the_flag() {
    let dir = TempDir::new().unwrap();
    write_jsonl(&dir.path().join("a.jsonl"), 7);
    let (_f, pipeline) = echo_job(
        dir.path(),
        "source = \"a.jsonl\"\nmax_items_per_call = 3\n\
         batch_input = { run_date = 2026-12-01, dry = false }\n",
    );
    let run = |args: &[&str], results: &str| {
        let results_path = dir.path().join(results).display().to_string();
        let progress = dir
            .path()
            .join(format!("{results}.redb"))
            .display()
            .to_string();
        let mut all = vec![
            "replay",
            "-q",
            "--results",
            &results_path,
            "--progress",
            &progress,
        ];
        all.extend_from_slice(args);
        let (_, out, err) = backfill_cli(&pipeline, &all);
        let lines = std::fs::read_to_string(dir.path().join(results)).unwrap_or_default();
        let inputs: Vec<Value> = lines
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["response"]["batch_input"].clone())
            .collect();
        (out, err, inputs)
    };
    let (out, err, inputs) = run(&[], "job.jsonl");
    assert!(out.contains("calls: 3 total, 3 succeeded"), "{out}{err}");
    assert_eq!(
        inputs,
        vec![json!({"run_date": "2026-12-01", "dry": false}); 3],
        "{out}{err}"
    );
    let (out, err, inputs) = run(&["--batch-input", r#"{"dry": true}"#], "flag.jsonl");
    assert!(out.contains("calls: 3 total, 3 succeeded"), "{out}{err}");
    assert_eq!(inputs, vec![json!({"dry": true}); 3]);
    let (out, err, inputs) = run(&["--batch-input", "[1]"], "bad.jsonl");
    assert!(
        err.contains("expected a JSON object") && out.is_empty() && inputs.is_empty(),
        "{out}{err}"
    );
}

/// `--max-items N` as a user tries a function on a sample first: the dry
/// run plans the sample, the run calls it, and its progress is kept apart,
/// so the full run afterwards calls everything.
#[test]
fn cli_max_items_tries_a_sample_first() {
    let dir = TempDir::new().unwrap();
    write_jsonl(&dir.path().join("a.jsonl"), 12);
    let (_f, pipeline) = echo_job(dir.path(), "source = \"a.jsonl\"\nmax_items_per_call = 5\n");
    let run = |args: &[&str]| {
        let mut all = vec!["replay", "-q"];
        all.extend_from_slice(args);
        let (code, out, err) = backfill_cli(&pipeline, &all);
        (code, format!("{out}{err}"))
    };
    let (code, out) = run(&["--max-items", "7", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("total: 1 files, 7 items, 0 unreadable, 2 calls of up to 5 items"),
        "{out}"
    );
    assert!(
        out.contains(".first-7.redb"),
        "its own progress store: {out}"
    );
    let (code, out) = run(&["--max-items", "7"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("items: 7 total, 7 succeeded"), "{out}");
    let (code, out) = run(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("items: 12 total, 12 succeeded, 0 failed, 0 skipped"),
        "{out}"
    );
    let (code, out) = run(&["--max-items", "0"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("0 is out of range"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_parquet_file_is_a_clear_error_naming_it() {
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("a.parquet");
    write_lineitem(&good, 10);
    // A truncated copy: the footer that says where everything is is gone.
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("b.parquet");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let sources = vec![good, bad.clone()];
    let e = sluice_taskgen::plan(&sources, &Format::Parquet.into(), limits(10)).unwrap_err();
    assert!(matches!(e, BackfillError::Parquet { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}: Parquet: ", bad.display())),
        "{e}"
    );
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 1);
    let e = sluice_taskgen::run(
        &ex,
        config(dir.path(), "echo", sources, Format::Parquet),
        Hooks::default(),
        never(),
    )
    .await
    .unwrap_err();
    ex.shutdown().await;
    assert!(
        e.to_string()
            .starts_with(&format!("{}: Parquet: ", bad.display())),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_calls_are_cut_to_fit_the_byte_limit() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    write_lineitem(&path, 2_000);
    let f = function_fixture("arrow-sum");
    let ex = executor("arrow-sum", &f, 2);
    let (hooks, got) = collector();
    let mut cfg = config(dir.path(), "arrow-sum", vec![path], Format::Parquet);
    cfg.payload = sluice_taskgen::PayloadFormat::Arrow;
    cfg.max_items_per_call = 2_000;
    cfg.max_bytes_per_call = 20_000;
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!(s.items_succeeded, 2_000);
    assert!(s.calls_succeeded > 2, "{} calls", s.calls_succeeded);
    let got = got.lock().unwrap();
    let rows: u64 = got.iter().map(|(_, v)| v["rows"].as_u64().unwrap()).sum();
    assert_eq!(rows, 2_000);
    assert!(got.iter().all(|(_, v)| v["rows"].as_u64().unwrap() < 2_000));
}

/// Parquet rows travel as the JSON text arrow writes (never rebuilt as
/// values): a failed call still dead-letters each row whole, as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_parquet_rows_are_dead_lettered_whole() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    let batch = write_lineitem(&path, 150);
    let sources = sluice_taskgen::resolve_sources(&[path.display().to_string()]).unwrap();
    let f = function_fixture("fail");
    let ex = executor("fail", &f, 2);
    let mut cfg = config(dir.path(), "fail", sources, Format::Parquet);
    cfg.max_items_per_call = 100;
    cfg.max_attempts = 1;
    let s = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.calls_total, s.calls_failed, s.items_failed), (2, 2, 150));
    let rows: Vec<Value> = dead_letters(&cfg.dead_letter)
        .into_iter()
        .flat_map(|d| d["items"].as_array().unwrap().clone())
        .collect();
    assert_eq!(rows.len(), 150);
    let total = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>();
    assert!((total("l_quantity") - arrow_sum(&batch, "l_quantity")).abs() < 1e-6);
    assert!((total("l_extendedprice") - arrow_sum(&batch, "l_extendedprice")).abs() < 1e-3);
    assert!(
        rows.iter()
            .all(|r| r["l_shipmode"].as_str().unwrap().starts_with("MODE"))
    );
}

/// `payload = "parquet"`: a failed call dead-letters its rows as JSON (the
/// row groups decoded again), with only the chosen columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_parquet_payload_rows_are_dead_lettered_as_json() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    // Row groups of 700 rows: 700, 700, 100.
    let batch = write_lineitem(&path, 1_500);
    let f = function_fixture("fail");
    let ex = executor("fail", &f, 2);
    let mut cfg = config(dir.path(), "fail", vec![path], Format::Parquet);
    cfg.payload = sluice_taskgen::PayloadFormat::Parquet;
    cfg.input.columns = Some(vec!["l_quantity".into(), "l_shipmode".into()]);
    cfg.max_items_per_call = 1_000;
    cfg.max_attempts = 1;
    let s = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap();
    ex.shutdown().await;
    // Whole row groups within 1,000 rows: 700, then 700 + 100.
    assert_eq!(
        (s.calls_total, s.calls_failed, s.items_failed),
        (2, 2, 1_500)
    );
    let dead = dead_letters(&cfg.dead_letter);
    let mut counts: Vec<usize> = dead
        .iter()
        .map(|d| d["items"].as_array().unwrap().len())
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [700, 800]);
    let rows: Vec<Value> = dead
        .iter()
        .flat_map(|d| d["items"].as_array().unwrap().clone())
        .collect();
    let total: f64 = rows.iter().map(|r| r["l_quantity"].as_f64().unwrap()).sum();
    assert!((total - arrow_sum(&batch, "l_quantity")).abs() < 1e-6);
    assert!(rows.iter().all(|r| r.get("l_extendedprice").is_none()));
    assert!(
        rows.iter()
            .all(|r| r["l_shipmode"].as_str().unwrap().starts_with("MODE"))
    );
}

/// Row groups are never cut: one over `max_bytes_per_call` is an error
/// naming the file and the group, before any call (and in the plan).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_group_over_the_byte_limit_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("lineitem.parquet");
    write_lineitem(&path, 1_500);
    let f = function_fixture("arrow-sum");
    let ex = executor("arrow-sum", &f, 2);
    let mut cfg = config(dir.path(), "arrow-sum", vec![path.clone()], Format::Parquet);
    cfg.payload = sluice_taskgen::PayloadFormat::Parquet;
    cfg.max_items_per_call = 1_000;
    cfg.max_bytes_per_call = 1_000;
    let e = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap_err();
    ex.shutdown().await;
    let text = e.to_string();
    assert!(
        matches!(
            e,
            sluice_taskgen::BackfillError::RowGroupTooLarge {
                row_group: 0,
                rows: 700,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("lineitem.parquet"), "{text}");
    assert!(text.contains("max_bytes_per_call = 1000"), "{text}");
    let plan = sluice_taskgen::plan_payload(
        &[path],
        &Format::Parquet.into(),
        sluice_taskgen::Limits {
            items: 1_000,
            bytes: 1_000,
        },
        sluice_taskgen::PayloadFormat::Parquet,
    );
    assert!(
        matches!(
            plan,
            Err(sluice_taskgen::BackfillError::RowGroupTooLarge { .. })
        ),
        "{plan:?}"
    );
}

/// A CSV file read with the wrong delimiter has a one-column header that
/// holds the real one: `suspect_csv_delimiter` names it, and stays quiet
/// for a real one-column file, the right delimiter and other formats.
#[test]
fn a_csv_header_read_as_one_column_suggests_its_delimiter() {
    let dir = TempDir::new().unwrap();
    let hint = |text: &str, delimiter: u8, format: Format| {
        let file = dir.path().join("h.csv");
        std::fs::write(&file, text).unwrap();
        let mut input = sluice_taskgen::Input::from(format);
        input.csv_delimiter = delimiter;
        sluice_taskgen::suspect_csv_delimiter(&[file], &input).map(|h| (h.header, h.likely))
    };
    assert_eq!(
        hint("id;name;amount\n1;a;2\n", b',', Format::Csv),
        Some(("id;name;amount".to_owned(), ';'))
    );
    assert_eq!(
        hint("id\tname\n1\ta\n", b',', Format::Csv),
        Some(("id\tname".to_owned(), '\t'))
    );
    assert_eq!(
        hint("a,b,c\n1,2,3\n", b';', Format::Csv),
        Some(("a,b,c".to_owned(), ','))
    );
    assert_eq!(hint("id;name\n1;a\n", b';', Format::Csv), None);
    assert_eq!(hint("name\nann\n", b',', Format::Csv), None);
    assert_eq!(hint("id,name\n1,a\n", b',', Format::Csv), None);
    assert_eq!(hint("id;name\n", b',', Format::Jsonl), None);

    // The command says so before running, and how to fix it.
    let file = dir.path().join("semi.csv");
    std::fs::write(&file, "id;name\n1;a\n").unwrap();
    let f = function_fixture("echo");
    let pipeline = echo_pipeline(dir.path(), &f);
    let out = Command::new(sluice_binary())
        .args(["backfill", "-p"])
        .arg(&pipeline)
        .args(["-f", "echo", "--dry-run", "--source"])
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("semi.csv: the CSV header reads as one column, \"id;name\"")
            && err.contains("give --csv-delimiter ';' (csv_delimiter = \";\" in the job)"),
        "{err}"
    );
}

/// `progress` and `dead_letter` in folders that do not exist yet: both are
/// made before the first call, so the first failure has somewhere to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_dead_letter_folders_are_made() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("in.jsonl");
    std::fs::write(&path, "{\"n\":1}\nnot json\n").unwrap();
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 1);
    let mut cfg = config(dir.path(), "echo", vec![path], Format::Jsonl);
    cfg.progress = dir.path().join("state/runs/progress.redb");
    cfg.dead_letter = dir.path().join("failed/dead.jsonl");
    let s = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.items_total, s.items_failed), (2, 1));
    assert!(dir.path().join("state/runs/progress.redb").is_file());
    assert_eq!(dead_letters(&dir.path().join("failed/dead.jsonl")).len(), 1);
}

/// A second run on a progress store another run holds is refused with an
/// error that says so and what to do, before anything is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_store_in_use_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("in.jsonl");
    write_jsonl(&path, 3);
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 1);
    let cfg = config(dir.path(), "echo", vec![path], Format::Jsonl);
    // What the other run's open store looks like to this one: redb's lock.
    let held = redb::Database::create(&cfg.progress).unwrap();
    let e = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::ProgressInUse { .. }), "{e}");
    assert!(e.to_string().contains("is in use by another run"), "{e}");
    drop(held);
    let s = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(s.items_succeeded, 3);
}

/// `batch_input` (Distributed Map's `BatchInput`): every call's event
/// carries it next to its items, whatever the payload: JSON items in file
/// order, under `order_key`, and a columnar payload staged as a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_carries_the_batch_input() {
    let dir = TempDir::new().unwrap();
    let lines = dir.path().join("a.jsonl");
    write_jsonl(&lines, 25);
    let parquet = dir.path().join("lineitem.parquet");
    write_lineitem(&parquet, 1_500);
    let input = json!({"run_date": "2026-12-01", "limits": {"max": 3}});
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);
    let cases = [
        ("plain", lines.clone(), Format::Jsonl, None, false),
        ("keyed", lines, Format::Jsonl, Some("n"), false),
        ("file", parquet, Format::Parquet, None, true),
    ];
    for (name, source, format, order_key, as_file) in cases {
        let (hooks, got) = collector();
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        let mut cfg = config(&sub, "echo", vec![source], format);
        cfg.batch_input = input.as_object().cloned();
        cfg.order.order_key = order_key.map(str::to_owned);
        if as_file {
            cfg.payload = sluice_taskgen::PayloadFormat::Arrow;
            cfg.payload_file = true;
            cfg.max_items_per_call = 500;
        }
        let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
        assert_eq!(s.calls_failed, 0, "{name}");
        let got = got.lock().unwrap();
        assert_eq!(got.len() as u64, s.calls_succeeded, "{name}");
        for (id, event) in got.iter() {
            assert_eq!(event["batch_input"], input, "{name} {id}: {event}");
            assert_eq!(event["batch"]["call_id"], json!(id), "{name}: {event}");
        }
        if as_file {
            assert!(got.iter().all(|(_, e)| e["arrow_file"].is_string()));
        } else {
            assert_eq!(items_of(&got).len(), 25, "{name}");
        }
    }
    ex.shutdown().await;
}

/// `max_items` (Distributed Map's `MaxItems`): only the first N items, in
/// file then row order, are called, whatever the path they take: JSON items
/// across a file boundary (an unreadable line counts as an item), Parquet
/// rows as JSON and as Arrow, and under `order_key`. The limit is part of
/// the progress store's layout: a store of one sample refuses another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_items_calls_only_the_first_items() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    write_jsonl(&a, 20);
    let mut text: String = (100..120).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    text.insert_str(0, "{not json\n");
    std::fs::write(&b, text).unwrap();
    let parquet = dir.path().join("lineitem.parquet");
    let rows = write_lineitem(&parquet, 1_500);
    let f = function_fixture("echo");
    let ex = executor("echo", &f, 2);

    // JSON lines: all 20 of a.jsonl, then b's unreadable line and 4 more.
    let (hooks, got) = collector();
    let mut cfg = config(
        &dir.path().join("lines"),
        "echo",
        vec![a.clone(), b.clone()],
        Format::Jsonl,
    );
    cfg.max_items = Some(25);
    cfg.max_items_per_call = 7;
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert_eq!(
        (s.items_total, s.items_succeeded, s.items_failed),
        (25, 24, 1),
        "{s:?}"
    );
    // Counted up front, so a terminal shows a total and an ETA.
    assert_eq!(s.items_expected, Some(25), "{s:?}");
    let mut got = got.lock().unwrap().clone();
    got.sort_by_key(|(id, _)| id.clone());
    let mut seen: Vec<u64> = items_of(&got)
        .iter()
        .map(|v| v["n"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    let want: Vec<u64> = (0..20).chain(100..104).collect();
    assert_eq!(seen, want);
    // A resume with the same limit has nothing left to do; another limit
    // would cut calls differently and is refused by name.
    let s = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap();
    assert_eq!(s.items_succeeded, 0, "{s:?}");
    cfg.max_items = Some(30);
    match sluice_taskgen::run(&ex, cfg, Hooks::default(), never()).await {
        Err(BackfillError::ProgressLayout { .. }) => {}
        other => panic!("expected a layout refusal, got {other:?}"),
    }

    // Parquet rows, as JSON items and as Arrow record batches (the limit
    // falls inside the second row group of 700).
    for (name, payload) in [
        ("rows", sluice_taskgen::PayloadFormat::Json),
        ("arrow", sluice_taskgen::PayloadFormat::Arrow),
    ] {
        let (hooks, got) = collector();
        let mut cfg = config(
            &dir.path().join(name),
            "echo",
            vec![parquet.clone()],
            Format::Parquet,
        );
        cfg.max_items = Some(1_234);
        cfg.max_items_per_call = 500;
        cfg.payload = payload;
        let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
        assert_eq!(
            (s.items_total, s.items_succeeded),
            (1_234, 1_234),
            "{name}: {s:?}"
        );
        assert_eq!(
            s.items_expected,
            Some(1_234),
            "{name}: from the metadata, capped"
        );
        let got = got.lock().unwrap();
        let counts: u64 = got
            .iter()
            .map(|(_, v)| v["batch"]["count"].as_u64().unwrap())
            .sum();
        assert_eq!(counts, 1_234, "{name}");
        if payload == sluice_taskgen::PayloadFormat::Json {
            let mut sum = 0.0;
            for item in items_of(&got) {
                sum += item["l_quantity"].as_f64().unwrap();
            }
            let direct = arrow_sum(&rows.slice(0, 1_234), "l_quantity");
            assert!((sum - direct).abs() < 1e-6, "{sum} vs {direct}");
        }
    }

    // Under order_key: the same first items, keyed.
    let (hooks, got) = collector();
    let mut cfg = config(&dir.path().join("keyed"), "echo", vec![a, b], Format::Jsonl);
    cfg.max_items = Some(9);
    cfg.order.order_key = Some("n".into());
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    assert_eq!(s.items_succeeded, 9, "{s:?}");
    let mut seen: Vec<u64> = items_of(&got.lock().unwrap())
        .iter()
        .map(|v| v["n"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..9).collect::<Vec<u64>>());

    // Whole row groups cannot stop inside one: refused before anything runs.
    let mut cfg = config(
        &dir.path().join("groups"),
        "echo",
        vec![parquet],
        Format::Parquet,
    );
    cfg.max_items = Some(10);
    cfg.payload = sluice_taskgen::PayloadFormat::Parquet;
    let e = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("whole row groups"), "{e}");
    ex.shutdown().await;
}

/// A JSON document holding an array (Distributed Map's JSON item reader):
/// the format from the `.json` extension, each element one item; a
/// document of JSON lines named `.json` reads as JSON lines. From the CLI,
/// `--items-pointer` picks a nested array, and a broken document stops the
/// job naming its file and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_hold_arrays_of_items() {
    let dir = TempDir::new().unwrap();
    let doc = dir.path().join("orders.json");
    std::fs::write(
        &doc,
        "[\n {\"id\": 1, \"amount\": 5.5},\n {\"id\": 2, \"amount\": 7},\n {\"id\": 3, \"amount\": 1}\n]\n",
    )
    .unwrap();
    let sources = vec![doc.display().to_string()];
    let format = sluice_taskgen::format_of(&sources, std::slice::from_ref(&doc)).unwrap();
    assert_eq!(format, Format::Json);
    let (s, items) = echo_items(dir.path(), &doc, format).await;
    assert_eq!((s.calls_succeeded, s.items_succeeded), (2, 3), "{s:?}");
    assert_eq!(
        items,
        [
            json!({"id": 1, "amount": 5.5}),
            json!({"id": 2, "amount": 7}),
            json!({"id": 3, "amount": 1})
        ]
    );
    let lines = dir.path().join("lines.json");
    std::fs::write(&lines, "{\"id\": 1}\n{\"id\": 2}\n").unwrap();
    let sub = TempDir::new().unwrap();
    let (s, items) = echo_items(sub.path(), &lines, Format::Json).await;
    assert_eq!(s.items_succeeded, 2, "{s:?}");
    assert_eq!(items, [json!({"id": 1}), json!({"id": 2})]);

    // The CLI: a nested array, then a broken document.
    std::fs::write(
        dir.path().join("export.json"),
        "{\"exported\": \"2026-12-01\",\n \"data\": {\"orders\": [{\"id\": 1}, {\"id\": 2}, {\"id\": 3}]}}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.json"),
        "[\n{\"id\": 1},\n{\"id\": ]\n",
    )
    .unwrap();
    let (_f, pipeline) = echo_job(
        dir.path(),
        "source = \"export.json\"\nitems_pointer = \"/data/orders\"\nprogress = \"export.redb\"\n",
    );
    let (code, out, err) = backfill_cli(&pipeline, &["replay", "-q"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("items: 3 total, 3 succeeded"), "{out}");
    let broken = dir.path().join("broken.json").display().to_string();
    let progress = dir.path().join("broken.redb").display().to_string();
    let (code, out, err) = backfill_cli(
        &pipeline,
        &["replay", "-q", "--source", &broken, "--progress", &progress],
    );
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("broken.json:3: JSON: expected value at column 8"),
        "{out}{err}"
    );
    // A pointer without its leading `/` would silently mean the top level.
    let (code, out, err) = backfill_cli(&pipeline, &["replay", "-q", "--items-pointer", "data"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("items_pointer \"data\" is not a JSON pointer"),
        "{out}{err}"
    );
}
