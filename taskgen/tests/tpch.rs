//! TPC-H `lineitem` at scale factor 0.01 (generated with `tpchgen-arrow`,
//! written as Parquet in several files and row groups), backfilled from an
//! object store through the echo function; the sums of `l_quantity` and
//! `l_extendedprice` over the echoed items must match a direct Arrow
//! computation over the same files, to the cent.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::Decimal128Array;
use arrow_array::cast::AsArray;
use arrow_array::types::Decimal128Type;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, Response};
use sluice_taskgen::{BackfillConfig, Format, Hooks};
use sluice_test_support::{agent_binary, function_fixture};
use tempfile::TempDir;

const SCALE_FACTOR: f64 = 0.01;
const FILES: i32 = 3;
const ROW_GROUP_ROWS: usize = 7_000;
const ITEMS_PER_CALL: usize = 500;

/// Writes `lineitem` as `FILES` Parquet files (one generator part each).
fn write_lineitem(dir: &std::path::Path) -> Vec<PathBuf> {
    sluice_test_support::tpch::write_lineitem(dir, SCALE_FACTOR, FILES, ROW_GROUP_ROWS)
}

/// `files` copied to a new in-memory object store registered at `base`
/// (`memory://NAME`), under `tpch/`; their URLs.
async fn in_memory_store(files: &[PathBuf], base: &str) -> Vec<PathBuf> {
    let store = Arc::new(InMemory::new());
    for file in files {
        let name = file.file_name().unwrap().to_str().unwrap();
        store
            .put(
                &ObjectPath::from(format!("tpch/{name}")),
                std::fs::read(file).unwrap().into(),
            )
            .await
            .unwrap();
    }
    sluice_taskgen::register_object_store(base, store);
    let sources = sluice_taskgen::resolve_sources(&[format!("{base}/tpch/*.parquet")]).unwrap();
    assert_eq!(sources.len(), files.len());
    sources
}

/// The sums of `l_quantity` and `l_extendedprice` (cents) that `arrow-sum`
/// answers, added up, and the rows of each call.
type ArrowSums = Arc<Mutex<(i128, i128, Vec<u64>)>>;

/// Hooks collecting what `arrow-sum` answers into [`ArrowSums`]; only the
/// projected columns may reach the function.
fn arrow_sum_hooks() -> (Hooks, ArrowSums) {
    let sums: ArrowSums = Arc::new(Mutex::new((0, 0, Vec::new())));
    let sink = Arc::clone(&sums);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |_: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            let keys: Vec<&String> = v["sums"].as_object().unwrap().keys().collect();
            assert_eq!(keys, ["l_extendedprice", "l_quantity"], "{v}");
            let exact = |k: &str| v["sums"][k].as_str().unwrap().parse::<i128>().unwrap();
            let mut s = sink.lock().unwrap();
            s.0 += exact("l_quantity");
            s.1 += exact("l_extendedprice");
            s.2.push(v["rows"].as_u64().unwrap());
        })),
        on_tick: None,
    };
    (hooks, sums)
}

/// An executor running the workspace function `name` (2 at once); the
/// fixture's folder lives as long as the returned fixture.
fn executor(name: &str) -> (sluice_test_support::FunctionFixture, Executor) {
    let f = function_fixture(name);
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut spec = FunctionSpec::new(name, &f.dir);
    spec.timeout = Duration::from_secs(30);
    spec.concurrency = 2;
    ex.register(spec);
    (f, ex)
}

/// Sums of `l_quantity` and `l_extendedprice` in cents, and the row count,
/// read directly with Arrow.
fn arrow_sums(files: &[PathBuf]) -> (i128, i128, u64) {
    let (mut quantity, mut price, mut rows) = (0i128, 0i128, 0u64);
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows() as u64;
            let cents = |name: &str| -> i128 {
                let column: &Decimal128Array = batch
                    .column_by_name(name)
                    .unwrap()
                    .as_primitive::<Decimal128Type>();
                assert_eq!(column.scale(), 2, "{name}");
                column.iter().map(|v| v.unwrap()).sum()
            };
            quantity += cents("l_quantity");
            price += cents("l_extendedprice");
        }
    }
    (quantity, price, rows)
}

/// A decimal as echoed (a JSON string such as `"21168.23"` or a number), in
/// cents, exactly.
fn cents(v: &Value) -> i128 {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a decimal: {other}"),
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    assert!(fraction.len() <= 2, "more than cents: {text}");
    let value =
        whole.parse::<i128>().unwrap() * 100 + format!("{fraction:0<2}").parse::<i128>().unwrap();
    if negative { -value } else { value }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lineitem_sums_match_arrow_to_the_cent() {
    let dir = TempDir::new().unwrap();
    let files = write_lineitem(dir.path());
    let (want_quantity, want_price, want_rows) = arrow_sums(&files);
    assert!(want_rows > 50_000, "{want_rows} rows");

    // The same files behind an object store URL.
    let sources = in_memory_store(&files, "memory://tpch-sf001").await;
    assert_eq!(sources.len(), FILES as usize);
    let plan = sluice_taskgen::plan(
        &sources,
        &Format::Parquet.into(),
        sluice_taskgen::Limits {
            items: ITEMS_PER_CALL,
            bytes: usize::MAX,
        },
    )
    .unwrap();
    assert_eq!(plan.iter().map(|p| p.items).sum::<u64>(), want_rows);
    assert!(
        plan.iter()
            .all(|p| p.row_groups.as_ref().unwrap().len() > 1)
    );
    let want_calls: u64 = plan.iter().map(|p| p.calls).sum();

    let (_f, ex) = executor("echo");

    let sums = Arc::new(Mutex::new((0i128, 0i128, 0u64)));
    let sink = Arc::clone(&sums);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |_: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).unwrap();
            let mut s = sink.lock().unwrap();
            for item in v["items"].as_array().unwrap() {
                s.0 += cents(&item["l_quantity"]);
                s.1 += cents(&item["l_extendedprice"]);
                s.2 += 1;
            }
        })),
        on_tick: None,
    };
    let cfg = BackfillConfig {
        max_items_per_call: ITEMS_PER_CALL,
        max_concurrency: 2,
        progress: dir.path().join("progress.redb"),
        dead_letter: dir.path().join("dead.jsonl"),
        max_attempts: 3,
        tolerated_failure_count: Some(0),
        order: Default::default(),
        ..BackfillConfig::new("echo", sources, Format::Parquet)
    };
    let summary = sluice_taskgen::run(&ex, cfg, hooks, std::future::pending())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(
        (summary.calls_succeeded, summary.items_succeeded),
        (want_calls, want_rows)
    );
    let (quantity, price, rows) = *sums.lock().unwrap();
    assert_eq!(rows, want_rows);
    assert_eq!(quantity, want_quantity, "l_quantity in cents");
    assert_eq!(price, want_price, "l_extendedprice in cents");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_payloads_with_projected_columns_sum_to_the_cent() {
    arrow_payload_sums(sluice_taskgen::ArrowCompression::None).await;
}

/// The same with LZ4- and Zstandard-compressed IPC buffers, which the
/// function's Arrow reader decompresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_arrow_payloads_sum_to_the_cent() {
    arrow_payload_sums(sluice_taskgen::ArrowCompression::Lz4).await;
    arrow_payload_sums(sluice_taskgen::ArrowCompression::Zstd).await;
}

async fn arrow_payload_sums(compression: sluice_taskgen::ArrowCompression) {
    let dir = TempDir::new().unwrap();
    let files = write_lineitem(dir.path());
    let (want_quantity, want_price, want_rows) = arrow_sums(&files);

    let (_f, ex) = executor("arrow-sum");

    let (hooks, sums) = arrow_sum_hooks();
    let mut cfg = BackfillConfig::new("arrow-sum", files, Format::Parquet);
    cfg.input.columns = Some(vec!["l_quantity".into(), "l_extendedprice".into()]);
    cfg.payload = sluice_taskgen::PayloadFormat::Arrow;
    cfg.input.arrow_compression = compression;
    cfg.max_items_per_call = 1000;
    cfg.max_concurrency = 2;
    cfg.tolerated_failure_count = Some(0);
    cfg.progress = dir.path().join("progress.redb");
    cfg.dead_letter = dir.path().join("dead.jsonl");
    let summary = sluice_taskgen::run(&ex, cfg, hooks, std::future::pending())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!(summary.items_succeeded, want_rows);
    let (quantity, price, calls) = sums.lock().unwrap().clone();
    assert_eq!(calls.iter().sum::<u64>(), want_rows);
    assert_eq!(quantity, want_quantity, "l_quantity in cents");
    assert_eq!(price, want_price, "l_extendedprice in cents");
}

/// `payload = "parquet"` from an object store: calls carry whole row groups
/// (two of 7,000 rows within 15,000 rows per call) of the chosen columns
/// only, fetched by byte range and never decoded on the host, in the event
/// or (`payload_file`) as a file in the sandbox; the function's sums equal
/// Arrow's to the cent, and the plan counts the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_payloads_carry_whole_row_groups_and_sum_to_the_cent() {
    let dir = TempDir::new().unwrap();
    let files = write_lineitem(dir.path());
    let (want_quantity, want_price, want_rows) = arrow_sums(&files);
    let sources = in_memory_store(&files, "memory://tpch-parquet-payload").await;
    let mut input: sluice_taskgen::Input = Format::Parquet.into();
    input.columns = Some(vec!["l_quantity".into(), "l_extendedprice".into()]);
    let limits = sluice_taskgen::Limits {
        items: 15_000,
        bytes: sluice_pipeline::DEFAULT_MAX_BYTES_PER_CALL,
    };
    let plan = sluice_taskgen::plan_payload(
        &sources,
        &input,
        limits,
        sluice_taskgen::PayloadFormat::Parquet,
    )
    .unwrap();
    let want_calls: u64 = plan.iter().map(|p| p.calls).sum();
    // About 20,000 rows per file: groups of 7,000, 7,000 and the rest.
    assert_eq!(want_calls, 2 * FILES as u64, "{plan:?}");

    let (_f, ex) = executor("arrow-sum");
    // In the event (base64), then staged as a file the event names.
    for payload_file in [false, true] {
        let (hooks, sums) = arrow_sum_hooks();
        let mut cfg = BackfillConfig::new("arrow-sum", sources.clone(), Format::Parquet);
        cfg.input = input.clone();
        cfg.payload = sluice_taskgen::PayloadFormat::Parquet;
        cfg.payload_file = payload_file;
        cfg.max_items_per_call = limits.items;
        cfg.max_concurrency = 2;
        cfg.tolerated_failure_count = Some(0);
        cfg.progress = dir.path().join(format!("progress-{payload_file}.redb"));
        cfg.dead_letter = dir.path().join(format!("dead-{payload_file}.jsonl"));
        let summary = sluice_taskgen::run(&ex, cfg, hooks, std::future::pending())
            .await
            .unwrap();
        assert_eq!(
            (summary.calls_succeeded, summary.items_succeeded),
            (want_calls, want_rows),
            "payload_file = {payload_file}"
        );
        let (quantity, price, calls) = sums.lock().unwrap().clone();
        assert_eq!(calls.iter().sum::<u64>(), want_rows);
        assert_eq!(
            calls
                .iter()
                .filter(|&&rows| rows == 2 * ROW_GROUP_ROWS as u64)
                .count(),
            FILES as usize,
            "one call of two whole row groups per file: {calls:?}"
        );
        assert_eq!(quantity, want_quantity, "l_quantity in cents");
        assert_eq!(price, want_price, "l_extendedprice in cents");
    }
    ex.shutdown().await;
}
