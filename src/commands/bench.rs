//! `sluice bench invoke`: warm invoke round trip through the process sandbox
//! and its pool, next to spawning the same `bootstrap` for every call (the
//! baseline every warm pool must beat), in the same run.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice_agent::runtime_api::{Invocation, RuntimeApi};
use sluice_executor::LogLine;
use sluice_protocol::Message;

use crate::exit;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn line(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<38} n={:<6} p50={:>8} µs  p99={:>8} µs  max={:>8} µs",
        h.len(),
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.99),
        h.max()
    );
}

/// One call of `bootstrap` started just for it, against an in-process
/// Runtime API: spawn, init, invoke, response, kill.
fn spawn_once(
    bootstrap: &Path,
    env: &[(String, String)],
    payload: &[u8],
) -> Result<Duration, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let t0 = Instant::now();
    let api = RuntimeApi::new(
        move |m: Message| {
            if let Ok(t) = tx.lock() {
                let _ = t.send(m);
            }
        },
        t0,
    );
    api.serve(listener).map_err(|e| e.to_string())?;
    api.push_invoke(Invocation {
        request_id: "bench".into(),
        deadline_ms: u64::MAX / 2,
        invoked_function_arn: "arn:aws:lambda:sluice-local:000000000000:function:bench".into(),
        trace_id: "Root=1-0-0".into(),
        client_context: String::new(),
        payload: bytes::Bytes::copy_from_slice(payload),
    });
    let mut child = std::process::Command::new(bootstrap)
        .current_dir(bootstrap.parent().unwrap_or(Path::new("/")))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", bootstrap.display()))?;
    let result = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Message::Response { .. }) => break Ok(t0.elapsed()),
            Ok(Message::Ready { .. }) => {}
            Ok(other) => break Err(format!("unexpected {}", other.kind_name())),
            Err(_) => break Err("no response within 10 s".into()),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    api.close();
    let _ = TcpStream::connect(addr);
    result
}

/// Run the benchmark and print the figures.
pub async fn invoke(
    pipeline: &Path,
    function: &str,
    iterations: usize,
    spawn_iterations: usize,
    payload: Option<&str>,
) -> u8 {
    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let f = match p.function(function) {
        Ok(f) => f.clone(),
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let quiet: sluice_executor::LogSink = Arc::new(|_l: LogLine| {});
    let ex = match super::executor_for(&p, quiet) {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let payload = match payload {
        None => br#"{"hello":"world","n":42}"#.to_vec(),
        Some(p) => match super::invoke::read_payload(Some(p)) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::USAGE;
            }
        },
    };
    println!(
        "sluice bench invoke: function {function} ({}), payload {} bytes",
        f.path.display(),
        payload.len()
    );

    // Cold starts: a fresh sandbox each (new tenant each time).
    let mut cold = hist();
    for i in 0..10 {
        let t0 = Instant::now();
        let opts = sluice_executor::InvokeOptions {
            tenant: Some(format!("bench-cold-{i}")),
            ..Default::default()
        };
        if let Err(e) = ex.invoke_with(function, payload.clone(), opts).await {
            eprintln!("error: cold invoke failed: {e}");
            return exit::INVOKE_FAILED;
        }
        cold.record(t0.elapsed().as_micros() as u64).ok();
    }
    ex.shutdown().await;
    let ex = match super::executor_for(&p, Arc::new(|_l: LogLine| {})) {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::INVOKE_FAILED;
        }
    };

    // Warm: one sandbox reused.
    for _ in 0..100 {
        if let Err(e) = ex.invoke(function, payload.clone()).await {
            eprintln!("error: warm-up invoke failed: {e}");
            return exit::INVOKE_FAILED;
        }
    }
    let mut warm = hist();
    for _ in 0..iterations {
        let t0 = Instant::now();
        if let Err(e) = ex.invoke(function, payload.clone()).await {
            eprintln!("error: invoke failed: {e}");
            return exit::INVOKE_FAILED;
        }
        warm.record(t0.elapsed().as_micros() as u64).ok();
    }
    ex.shutdown().await;

    // Baseline: spawn the same bootstrap per call, no sandbox, no pool.
    let bootstrap = f.path.join("bootstrap");
    let mut env: Vec<(String, String)> = vec![
        ("AWS_LAMBDA_FUNCTION_NAME".into(), function.into()),
        ("AWS_LAMBDA_FUNCTION_VERSION".into(), "$LATEST".into()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(),
            f.memory_mb.to_string(),
        ),
        (
            "AWS_LAMBDA_LOG_GROUP_NAME".into(),
            format!("/aws/lambda/{function}"),
        ),
        ("AWS_LAMBDA_LOG_STREAM_NAME".into(), "bench".into()),
        ("LAMBDA_TASK_ROOT".into(), f.path.display().to_string()),
        ("_HANDLER".into(), f.handler.clone()),
    ];
    env.extend(f.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut spawn = hist();
    let pl = payload.clone();
    let spawned = tokio::task::spawn_blocking(move || -> Result<Histogram<u64>, String> {
        for _ in 0..spawn_iterations {
            let d = spawn_once(&bootstrap, &env, &pl)?;
            spawn.record(d.as_micros() as u64).ok();
        }
        Ok(spawn)
    })
    .await;
    let spawn = match spawned {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            eprintln!("error: spawn-per-call baseline failed: {e}");
            return exit::INVOKE_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };

    line("warm invoke (sandbox, pooled)", &warm);
    line("spawn bootstrap per call (baseline)", &spawn);
    line("cold start (new sandbox + invoke)", &cold);
    let w50 = warm.value_at_quantile(0.5).max(1) as f64;
    let ratio = spawn.value_at_quantile(0.5) as f64 / w50;
    println!("ratio spawn-per-call / warm (p50): {ratio:.1}x");
    println!(
        "targets: warm p50 <= 200 µs: {}; >= 10x faster than spawn-per-call: {}",
        if w50 <= 200.0 { "met" } else { "NOT met" },
        if ratio >= 10.0 { "met" } else { "NOT met" }
    );
    exit::OK
}

/// `sluice bench kafka`: records/s and latency through a no-op function at
/// several batch sizes, next to a plain rdkafka consumer doing the same no-op
/// in process (the ceiling), all against the embedded broker.
///
/// For each batch size: the function's sandboxes are started first (cold
/// starts are `sluice bench invoke`'s business), then a trigger consumes the
/// whole topic (records/s, from its first record to the last one finished,
/// offsets committed as it goes); then, with the trigger idle, single
/// records are produced one at a time and timed from the send to the end of
/// their batch (end-to-end latency, batch window included).
pub async fn kafka(pipeline: &Path, function: &str, records: usize, batch_sizes: &[u32]) -> u8 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use sluice_ingest::kafka::{self as k, Activity, EmbeddedBroker, OutRecord, Sink, TriggerEnv};
    use sluice_ingest::metrics::Metrics;
    use std::sync::atomic::Ordering;

    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    if p.function(function).is_err() {
        eprintln!("error: {}: no function {function:?}", pipeline.display());
        return exit::USAGE;
    }
    let broker = match EmbeddedBroker::start(1) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let servers = broker.bootstrap_servers().to_owned();
    let partitions = 3;
    if let Err(e) = broker.create_topic("bench", partitions) {
        eprintln!("error: {e}");
        return exit::INVOKE_FAILED;
    }
    let sink = match Sink::new("bench", &servers, &[]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let value =
        serde_json::json!({"order": 1, "customer": "c1", "amount": 12.5, "pad": "x".repeat(40)})
            .to_string()
            .into_bytes();
    let batch: Vec<OutRecord> = (0..records)
        .map(|i| OutRecord {
            key: Some(format!("k{}", i % 64).into_bytes()),
            value: Some(value.clone()),
            headers: vec![],
        })
        .collect();
    let t0 = Instant::now();
    for chunk in batch.chunks(10_000) {
        if let Err(e) = sink.send_all("bench", chunk).await {
            eprintln!("error: producing: {e}");
            return exit::INVOKE_FAILED;
        }
    }
    println!(
        "sluice bench kafka: {records} records of {} bytes in {partitions} partitions (produced in {:?}), function {function}",
        value.len(),
        t0.elapsed()
    );
    // Its polling thread is not part of what is measured.
    drop(sink);

    // Ceiling: a plain consumer in this process doing the same no-op; the
    // best of three runs (one run is short, and the machine may be busy).
    let servers2 = servers.clone();
    let plain = tokio::task::spawn_blocking(move || -> Result<Duration, String> {
        let mut best: Option<Duration> = None;
        for run in 0..PLAIN_RUNS {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &servers2)
                .set("group.id", format!("bench-plain-{run}"))
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| e.to_string())?;
            c.subscribe(&["bench"]).map_err(|e| e.to_string())?;
            let mut n = 0usize;
            let mut start = None;
            let deadline = Instant::now() + Duration::from_secs(120);
            while n < records && Instant::now() < deadline {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    start.get_or_insert_with(Instant::now);
                    std::hint::black_box(rdkafka::Message::payload(&m));
                    n += 1;
                }
            }
            let took = start.map(|s| s.elapsed()).unwrap_or_default();
            c.unsubscribe();
            if n < records {
                return Err(format!("plain consumer saw only {n} records"));
            }
            best = Some(best.map_or(took, |b| b.min(took)));
        }
        best.ok_or_else(|| "no run".to_owned())
    })
    .await;
    let plain = match plain {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            eprintln!("error: plain consumer: {e}");
            return exit::INVOKE_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let plain_rate = records as f64 / plain.as_secs_f64().max(1e-9);
    println!(
        "{:<40} {:>10.0} records/s",
        format!("plain rdkafka consumer, no-op (ceiling, best of {PLAIN_RUNS})"),
        plain_rate
    );

    let mut at_1000 = None;
    // Records in the topic: the latency probes add to it.
    let mut in_topic = records;
    for &b in batch_sizes {
        let text = format!(
            "[functions.{function}]\npath = {:?}\nconcurrency = {partitions}\n\n[[trigger.kafka]]\nfunction = {function:?}\ntopics = [\"bench\"]\nbootstrap_servers = {servers:?}\ngroup_id = \"bench-{b}\"\nstarting_position = \"earliest\"\nbatch_size = {b}\nbatch_window = \"5ms\"\n",
            p.function(function)
                .map(|f| f.path.clone())
                .unwrap_or_default()
        );
        let bp = match sluice_pipeline::Pipeline::parse(&text, Path::new("bench.toml")) {
            Ok(bp) => bp,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::INVOKE_FAILED;
            }
        };
        let ex = match super::executor_for(&bp, Arc::new(|_l: LogLine| {})) {
            Ok(ex) => ex,
            Err(e) => {
                eprintln!("error: {e:#}");
                return exit::INVOKE_FAILED;
            }
        };
        // Warm sandboxes, one per partition: cold starts are not measured.
        let mut warm = tokio::task::JoinSet::new();
        for _ in 0..partitions {
            let ex = ex.clone();
            let f = function.to_owned();
            warm.spawn(async move { ex.invoke(&f, b"{}".to_vec()).await.map(drop) });
        }
        while let Some(r) = warm.join_next().await {
            if let Ok(Err(e)) = r {
                eprintln!("error: warm-up invoke failed: {e}");
                return exit::INVOKE_FAILED;
            }
        }
        let metrics = Metrics::new();
        let activity = Arc::new(Activity::default());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let env = TriggerEnv {
            executor: ex.clone(),
            metrics: metrics.clone(),
            servers: servers.clone(),
            activity: activity.clone(),
            max_buffered_records: k::DEFAULT_MAX_BUFFERED_RECORDS,
        };
        let task = tokio::spawn(k::run_trigger(bp.kafka_triggers[0].clone(), env, rx));
        // Watch the counters from a blocking thread every 250 µs (tokio's
        // timers tick in milliseconds, coarse next to a run of ~50 ms; more
        // often would take CPU from what is measured).
        let watched = {
            let activity = activity.clone();
            tokio::task::spawn_blocking(move || -> Result<Duration, usize> {
                let deadline = Instant::now() + Duration::from_secs(300);
                let mut first: Option<Instant> = None;
                loop {
                    let seen = activity.records.load(Ordering::SeqCst) as usize;
                    if seen > 0 && first.is_none() {
                        first = Some(Instant::now());
                    }
                    if seen >= in_topic && activity.backlog.load(Ordering::SeqCst) <= 0 {
                        return Ok(first.map(|f| f.elapsed()).unwrap_or_default());
                    }
                    if Instant::now() > deadline {
                        return Err(seen);
                    }
                    std::thread::sleep(Duration::from_micros(250));
                }
            })
            .await
        };
        let took = match watched {
            Ok(Ok(d)) => d,
            Ok(Err(seen)) => {
                eprintln!("error: batch size {b}: only {seen} records after 300 s");
                return exit::INVOKE_FAILED;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return exit::INVOKE_FAILED;
            }
        };
        let (p50, p99) = metrics
            .invoke_quantiles(&bp.kafka_triggers[0].name)
            .unwrap_or((0.0, 0.0));

        // End-to-end latency: one record at a time through the idle trigger.
        let latency = latency_probes(&servers, &activity, LATENCY_PROBES).await;
        let _ = tx.send(true);
        let _ = task.await;
        ex.shutdown().await;
        let (latency, in_sluice) = match latency {
            Ok(h) => h,
            Err(e) => {
                eprintln!("error: batch size {b}: latency probe: {e}");
                return exit::INVOKE_FAILED;
            }
        };
        in_topic += LATENCY_PROBES;
        let rate = records as f64 / took.as_secs_f64().max(1e-9);
        println!(
            "{:<40} {:>10.0} records/s  ({:>5.1} % of ceiling)  batch invoke p50 <= {:.1} ms, p99 <= {:.1} ms",
            format!("sluice run, batch_size {b}"),
            rate,
            100.0 * rate / plain_rate,
            p50 * 1e3,
            p99 * 1e3
        );
        println!(
            "{:<40} end-to-end latency, one record at a time (n={}): send to done p50 {:.2} ms, p99 {:.2} ms; polled to done p50 {:.2} ms, p99 {:.2} ms",
            "",
            latency.len(),
            latency.value_at_quantile(0.5) as f64 / 1e3,
            latency.value_at_quantile(0.99) as f64 / 1e3,
            in_sluice.value_at_quantile(0.5) as f64 / 1e3,
            in_sluice.value_at_quantile(0.99) as f64 / 1e3
        );
        if b == 1000 {
            at_1000 = Some(rate / plain_rate);
        }
    }
    if let Some(r) = at_1000 {
        println!(
            "goal: >= 50 % of the plain consumer at batch 1000: {} ({:.1} %)",
            if r >= 0.5 { "met" } else { "NOT met" },
            r * 100.0
        );
    }
    drop(broker);
    exit::OK
}

/// Runs of the plain consumer (the ceiling is the best).
const PLAIN_RUNS: usize = 3;

/// Records timed one at a time for the end-to-end latency of each batch size.
const LATENCY_PROBES: usize = 100;

/// Send `n` records to the `bench` topic one at a time, each after the
/// previous one finished, and time each (µs) from its send, and from the
/// moment the trigger polled it, to the moment the trigger has no unfinished
/// record left. The first includes the broker's fetch wait (the embedded
/// broker answers a waiting fetch only at `fetch.wait.max.ms`, 50 ms).
async fn latency_probes(
    servers: &str,
    activity: &Arc<sluice_ingest::kafka::Activity>,
    n: usize,
) -> Result<(Histogram<u64>, Histogram<u64>), String> {
    use sluice_ingest::kafka::{OutRecord, Sink};
    use std::sync::atomic::Ordering;

    let sink = Sink::new("bench-probe", servers, &[("linger.ms".into(), "0".into())])
        .map_err(|e| e.to_string())?;
    let (mut h, mut polled_h) = (hist(), hist());
    for i in 0..n {
        let before = activity.records.load(Ordering::SeqCst);
        let rec = OutRecord {
            key: Some(format!("probe-{i}").into_bytes()),
            value: Some(br#"{"probe":true}"#.to_vec()),
            headers: vec![],
        };
        let t0 = Instant::now();
        sink.send_all("bench", std::slice::from_ref(&rec))
            .await
            .map_err(|e| e.to_string())?;
        // Watch the counters from a blocking thread: tokio's timers tick
        // in milliseconds, too coarse for this.
        let a = activity.clone();
        let done = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut polled = None;
            while Instant::now() < deadline {
                if a.records.load(Ordering::SeqCst) > before {
                    let p = *polled.get_or_insert_with(Instant::now);
                    if a.backlog.load(Ordering::SeqCst) <= 0 {
                        return Some((t0.elapsed(), p.elapsed()));
                    }
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            None
        })
        .await
        .map_err(|e| e.to_string())?;
        match done {
            Some((d, p)) => {
                h.record(d.as_micros() as u64).ok();
                polled_h.record(p.as_micros() as u64).ok();
            }
            None => return Err(format!("record {i} not finished within 10 s")),
        }
    }
    Ok((h, polled_h))
}

/// Writes `rows` rows (a few numeric and string columns) to a Parquet file.
fn write_bench_parquet(path: &Path, rows: usize) -> Result<u64, String> {
    use arrow_array::{Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::arrow::ArrowWriter;

    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("customer", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("quantity", DataType::Int32, false),
        Field::new("amount", DataType::Float64, false),
    ]));
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut writer =
        ArrowWriter::try_new(file, Arc::clone(&schema), None).map_err(|e| e.to_string())?;
    const CATEGORIES: [&str; 4] = ["books", "garden", "toys", "tools"];
    let mut start = 0usize;
    while start < rows {
        let n = (rows - start).min(8192);
        let ids = start..start + n;
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(ids.clone().map(|i| i as i64))),
                Arc::new(StringArray::from_iter_values(
                    ids.clone().map(|i| format!("customer-{:05}", i % 10_000)),
                )),
                Arc::new(StringArray::from_iter_values(
                    ids.clone().map(|i| CATEGORIES[i % CATEGORIES.len()]),
                )),
                Arc::new(Int32Array::from_iter_values(
                    ids.clone().map(|i| (i % 17) as i32 + 1),
                )),
                Arc::new(Float64Array::from_iter_values(
                    ids.map(|i| (i % 1000) as f64 * 0.25 + 1.5),
                )),
            ],
        )
        .map_err(|e| e.to_string())?;
        writer.write(&batch).map_err(|e| e.to_string())?;
        start += n;
    }
    writer.close().map_err(|e| e.to_string())?;
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
}

/// Reads every row of a Parquet file with arrow alone (`to_json`: also
/// turns each batch into JSON values, as backfill does); returns the rows
/// and the time taken.
fn scan_parquet(path: &Path, to_json: bool) -> Result<(usize, Duration), String> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let t0 = Instant::now();
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| e.to_string())?
        .with_batch_size(1024)
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        if to_json {
            let mut w = arrow_json::ArrayWriter::new(Vec::new());
            w.write(&batch).map_err(|e| e.to_string())?;
            w.finish().map_err(|e| e.to_string())?;
            let values: Vec<serde_json::Value> =
                serde_json::from_slice(&w.into_inner()).map_err(|e| e.to_string())?;
            rows += values.len();
            std::hint::black_box(values);
        } else {
            rows += batch.num_rows();
            std::hint::black_box(&batch);
        }
    }
    Ok((rows, t0.elapsed()))
}

/// A scratch directory removed on drop.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `sluice bench backfill`: calls/s and rows/s of `sluice backfill` over a
/// generated Parquet file through a no-op function at 1, 100 and 1,000 rows
/// per call, next to reading the same file with arrow alone (the ceiling),
/// in the same run.
pub async fn backfill(pipeline: &Path, function: &str, rows: usize) -> u8 {
    use sluice_taskgen::{BackfillConfig, Format, Hooks};

    /// Rows for 1 row per call: a call per row is slow, fewer rows suffice.
    const ROWS_AT_1: usize = 5_000;

    let p = match super::load_pipeline(pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let concurrency = match p.function(function) {
        Ok(f) => f.concurrency as usize,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    let rows = rows.max(1);
    let dir = std::env::temp_dir().join(format!("sluice-bench-backfill-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("error: {}: {e}", dir.display());
        return exit::INVOKE_FAILED;
    }
    let dir = ScratchDir(dir);
    let big = dir.0.join("rows.parquet");
    let small = dir.0.join("rows-small.parquet");
    let small_rows = rows.min(ROWS_AT_1);
    let written = tokio::task::spawn_blocking({
        let (big, small) = (big.clone(), small.clone());
        move || -> Result<u64, String> {
            let bytes = write_bench_parquet(&big, rows)?;
            write_bench_parquet(&small, small_rows)?;
            // Read once so that every measurement finds it in the page cache.
            scan_parquet(&big, false)?;
            Ok(bytes)
        }
    })
    .await;
    let bytes = match written {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            eprintln!("error: writing the Parquet file: {e}");
            return exit::INVOKE_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    println!(
        "sluice bench backfill: {rows} rows (5 columns: 3 numeric, 2 strings), {bytes} bytes of Parquet; function {function}, concurrency {concurrency}"
    );

    let scans = tokio::task::spawn_blocking({
        let big = big.clone();
        move || -> Result<[(usize, Duration); 2], String> {
            // The best of three of each: the file is small and in the page cache.
            let best = |to_json| -> Result<(usize, Duration), String> {
                let mut best = scan_parquet(&big, to_json)?;
                for _ in 0..2 {
                    let (n, d) = scan_parquet(&big, to_json)?;
                    if d < best.1 {
                        best = (n, d);
                    }
                }
                Ok(best)
            };
            Ok([best(false)?, best(true)?])
        }
    })
    .await;
    let [(scanned, scan), (jsoned, json)] = match scans {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            eprintln!("error: reading the Parquet file: {e}");
            return exit::INVOKE_FAILED;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let scan_rate = scanned as f64 / scan.as_secs_f64().max(1e-9);
    let json_rate = jsoned as f64 / json.as_secs_f64().max(1e-9);
    println!(
        "{:<44} {:>12.0} rows/s",
        "arrow scan alone (the ceiling)", scan_rate
    );
    println!(
        "{:<44} {:>12.0} rows/s  ({:>5.1} % of scan)",
        "arrow scan + rows to JSON, no calls",
        json_rate,
        100.0 * json_rate / scan_rate
    );

    let mut at_1000 = None;
    for per_call in [1usize, 100, 1000] {
        let (source, n) = if per_call == 1 {
            (&small, small_rows)
        } else {
            (&big, rows)
        };
        let ex = match super::executor_for(&p, Arc::new(|_l: LogLine| {})) {
            Ok(ex) => ex,
            Err(e) => {
                eprintln!("error: {e:#}");
                return exit::INVOKE_FAILED;
            }
        };
        // Warm the function's sandboxes first: cold starts are not measured.
        let mut warm = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let ex = ex.clone();
            let f = function.to_owned();
            warm.spawn(async move { ex.invoke(&f, b"{}".to_vec()).await.map(drop) });
        }
        while let Some(r) = warm.join_next().await {
            if let Ok(Err(e)) = r {
                eprintln!("error: warm-up invoke failed: {e}");
                return exit::INVOKE_FAILED;
            }
        }
        let cfg = BackfillConfig {
            function: function.to_owned(),
            sources: vec![source.clone()],
            format: Format::Parquet,
            max_items_per_call: per_call,
            max_concurrency: concurrency,
            progress: dir.0.join(format!("progress-{per_call}.redb")),
            dead_letter: dir.0.join(format!("dead-{per_call}.jsonl")),
            max_attempts: 1,
            tolerated_failure_count: Some(0),
            order: Default::default(),
        };
        let result = sluice_taskgen::run(&ex, cfg, Hooks::default(), std::future::pending()).await;
        ex.shutdown().await;
        let s = match result {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {per_call} rows per call: {e}");
                return exit::INVOKE_FAILED;
            }
        };
        if s.items_succeeded != n as u64 {
            eprintln!(
                "error: {per_call} rows per call: {} of {n} rows succeeded",
                s.items_succeeded
            );
            return exit::INVOKE_FAILED;
        }
        let secs = s.duration.as_secs_f64().max(1e-9);
        let rate = s.items_succeeded as f64 / secs;
        println!(
            "{:<44} {:>12.0} rows/s  ({:>5.1} % of scan, {:>5.1} % of scan + JSON)  {:>8.0} calls/s",
            format!("backfill, {per_call} rows/call ({n} rows)"),
            rate,
            100.0 * rate / scan_rate,
            100.0 * rate / json_rate,
            s.calls_succeeded as f64 / secs
        );
        if per_call == 1000 {
            at_1000 = Some(rate / scan_rate);
        }
    }
    if small_rows < rows {
        println!(
            "(1 row per call runs over the first {small_rows} rows only: a call per row is slow)"
        );
    }
    if rows < 1000 {
        println!("(fewer than 1,000 rows: the 1,000-rows-per-call figure is a single call)");
    }
    if let Some(r) = at_1000 {
        println!(
            "goal: ≥ 50 % of the scan rate at 1,000 rows per call: {} ({:.1} %)",
            if r >= 0.5 { "met" } else { "NOT met" },
            r * 100.0
        );
    }
    exit::OK
}
