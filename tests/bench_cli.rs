//! `sluice bench kafka`, `objects` and `invoke` as a user runs them: short
//! runs end to end, so that the benchmarks cannot rot unnoticed, and their
//! flags' errors.

use std::process::{Command, Output};

use sluice_test_support::{FunctionFixture, agent_binary, function_fixture};

fn bench_kafka(pipeline: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        // The agent must sit next to the sluice binary (same target folder).
        .env("SLUICE_AGENT", agent_binary())
        .args(["bench", "kafka", "-p"])
        .arg(pipeline)
        .args(["-f", "echo"])
        .args(extra)
        .output()
        .expect("running sluice bench kafka")
}

/// A pipeline with the echo function; the fixture must outlive its use.
fn echo_pipeline(dir: &std::path::Path) -> (FunctionFixture, std::path::PathBuf) {
    let echo = function_fixture("echo");
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, format!("[functions.echo]\npath = {:?}\n", echo.dir))
        .expect("writing the pipeline");
    (echo, p)
}

/// A small run (a few hundred records, one batch size) prints the figures
/// of each part: sluice against the plain consumer, backpressure, latency;
/// a `--property` reaches the trigger's consumer (a 5 ms fetch wait keeps
/// the latency probes short), and `--pin-cpu` the function.
#[test]
fn a_short_kafka_bench_prints_its_figures() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_echo, p) = echo_pipeline(tmp.path());
    let out = bench_kafka(
        &p,
        &[
            "-n",
            "600",
            "--batch-sizes",
            "50",
            "--property",
            "fetch.wait.max.ms=5",
            "--pin-cpu",
            "true",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("600 records of") && stdout.contains("function echo (pin_cpu)"),
        "the header names the records and the pinning: {stdout}"
    );
    assert!(
        stdout.contains("trigger consumer properties: fetch.wait.max.ms=5"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("sluice run, batch_size 50"))
        .unwrap_or_else(|| panic!("no figures for batch size 50: {stdout}"));
    for part in [
        "records/s (best of 5)",
        "plain consumer",
        "median",
        "partitions paused",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert!(
        stdout.contains("end-to-end latency, one record at a time (n=100)"),
        "{stdout}"
    );
}

/// A property sluice manages itself (offsets are committed by sluice) is
/// refused as a usage error naming it, as in a pipeline file.
#[test]
fn a_managed_property_is_refused_with_its_name() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_echo, p) = echo_pipeline(tmp.path());
    let out = bench_kafka(
        &p,
        &[
            "-n",
            "10",
            "--batch-sizes",
            "10",
            "--property",
            "enable.auto.commit=true",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("enable.auto.commit"), "{stderr}");

    let out = bench_kafka(&p, &["--property", "no-equals-sign"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not KEY=VALUE"), "{stderr}");
}

/// A short `sluice bench invoke` measures warm calls both ways, unpinned
/// and with `pin_cpu`, and prints their ratio.
#[test]
fn a_short_invoke_bench_measures_pinned_and_unpinned_sandboxes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_echo, p) = echo_pipeline(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_AGENT", agent_binary())
        .args(["bench", "invoke", "-p"])
        .arg(&p)
        .args(["-f", "echo", "-n", "20", "--spawn-iterations", "3"])
        .output()
        .expect("running sluice bench invoke");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for want in [
        "warm invoke (sandbox, pooled)            n=20 ",
        "warm invoke (sandbox, pooled, pin_cpu)   n=20 ",
        "ratio warm p50 unpinned / pinned (pin_cpu): ",
        "targets (pin_cpu = false): warm p50",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
}

fn bench_objects(pipeline: &std::path::Path, function: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_AGENT", agent_binary())
        .args(["bench", "objects", "-p"])
        .arg(pipeline)
        .args(["-f", function])
        .args(extra)
        .output()
        .expect("running sluice bench objects")
}

/// `sluice bench objects` end to end on a small folder: the three figures,
/// the ratio and the latency are printed.
#[test]
fn a_short_objects_bench_prints_its_figures() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_echo, p) = echo_pipeline(tmp.path());
    let out = bench_objects(&p, "echo", &["-n", "10", "--size", "100", "--rounds", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10 objects of 100 bytes"),
        "the header names the objects: {stdout}"
    );
    for part in [
        "list + read with object_store alone",
        "direct calls, bytes staged, no trigger",
        "% of direct calls, median of rounds",
        "what the trigger adds per object",
        "latency, one object at a time (n=10, poll_interval 100ms): written to done p50",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from {stdout}");
    }
}

/// A function that fails makes the bench fail with the error type, rather
/// than print a rate of failures; a URL that is not an object store is a
/// usage error.
#[test]
fn an_objects_bench_of_a_failing_function_fails() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fail = function_fixture("fail");
    let p = tmp.path().join("pipeline.toml");
    std::fs::write(&p, format!("[functions.fail]\npath = {:?}\n", fail.dir))
        .expect("writing the pipeline");
    let out = bench_objects(&p, "fail", &["-n", "5", "--rounds", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("error: direct call of"), "{stderr}");

    let out = bench_objects(&p, "fail", &["--url", "ftp://somewhere/x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--url \"ftp://somewhere/x\""), "{stderr}");
}

/// Against a real S3-protocol server (`SLUICE_TEST_S3`, set by
/// `scripts/test-object-stores.sh`): the bench writes its objects below `--url`, runs,
/// and deletes them again.
#[test]
fn s3_objects_bench_runs_and_cleans_up() {
    use futures::StreamExt;
    use object_store::ObjectStore;

    let Ok(bucket) = std::env::var("SLUICE_TEST_S3") else {
        eprintln!("skipped: SLUICE_TEST_S3 is not set (scripts/test-object-stores.sh sets it)");
        return;
    };
    let bucket = bucket.trim_end_matches('/');
    let tmp = tempfile::tempdir().expect("temp dir");
    let (_echo, p) = echo_pipeline(tmp.path());
    let url = format!("{bucket}/sluice-test-bench");
    let out = bench_objects(&p, "echo", &["--url", &url, "-n", "10", "--rounds", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "10 objects of 1024 bytes under {url}/sluice-bench-objects-"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("% of direct calls"), "{stdout}");
    assert!(
        stdout.contains("latency, one object at a time (n=10"),
        "{stdout}"
    );

    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_url(bucket)
        .build()
        .expect("S3 from the environment");
    let left = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let prefix = object_store::path::Path::from("sluice-test-bench");
        store.list(Some(&prefix)).collect::<Vec<_>>().await.len()
    });
    assert_eq!(left, 0, "the bench left {left} objects under {url}");
}
