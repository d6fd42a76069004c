//! `sluice backfill --distributed` publishing calls to the Kafka broker it
//! embeds, and `sluice worker` processes consuming them in a group.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sluice_test_support::{
    FunctionFixture, Process, Signal, agent_binary, function_fixture, metric_sum, scrape,
    script_fixture,
};

/// A custom runtime that logs each call's id and takes 300 ms to answer.
const SLOW: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  EVENT=$(curl -sS -D /tmp/headers "$API/invocation/next")
  ID=$(grep -i '^lambda-runtime-aws-request-id:' /tmp/headers | tr -d '\r' | cut -d' ' -f2)
  echo "TASK $(grep -o '"call_id":"[^"]*"' <<<"$EVENT")" >&2
  sleep 0.3
  curl -sS -X POST "$API/invocation/$ID/response" -d '{}' >/dev/null
done
"#;
/// A custom runtime whose every response is about 1.4 MB of JSON that
/// escaping lengthens further (400,000 quotes, 300,000 two-byte
/// characters), and names the call's first item: more than one result
/// message can carry.
const HUGE: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
QUOTES=$(head -c 400000 /dev/zero | tr '\0' q | sed 's/q/\\"/g')
ACCENTS=$(head -c 300000 /dev/zero | tr '\0' x | sed 's/x/é/g')
while true; do
  EVENT=$(curl -sS -D /tmp/headers "$API/invocation/next")
  ID=$(grep -i '^lambda-runtime-aws-request-id:' /tmp/headers | tr -d '\r' | cut -d' ' -f2)
  FIRST=$(grep -o '"n":[0-9]*' <<<"$EVENT" | head -1 | cut -d: -f2)
  printf '{"first":%s,"quotes":"%s","accents":"%s"}' "$FIRST" "$QUOTES" "$ACCENTS" \
    | curl -sS -X POST "$API/invocation/$ID/response" --data-binary @- >/dev/null
done
"#;
use tempfile::TempDir;

fn sluice(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env("SLUICE_AGENT", agent_binary()).args(args);
    c
}

/// A pipeline with an `echo` and a `fail` function and a job for each over
/// `data/*.jsonl` (300 items); the function folders live as long as the
/// returned fixtures.
fn setup(dir: &Path) -> (PathBuf, [FunctionFixture; 4]) {
    std::fs::create_dir(dir.join("data")).unwrap();
    let items: String = (0..300).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    std::fs::write(dir.join("data/in.jsonl"), items).unwrap();
    let (echo, fail, slow, huge) = (
        function_fixture("echo"),
        function_fixture("fail"),
        script_fixture(SLOW),
        script_fixture(HUGE),
    );
    let pipeline = dir.join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.echo]\npath = {:?}\n\n[functions.fail]\npath = {:?}\n\n\
             [job.replay]\nfunction = \"echo\"\nsource = \"data/*.jsonl\"\n\
             max_items_per_call = 10\nprogress = \"replay.redb\"\n\
             results = \"replay-results.jsonl\"\nbatch_input = {{ run = 7 }}\n\n\
             [job.reject]\nfunction = \"fail\"\nsource = \"data/*.jsonl\"\n\
             max_items_per_call = 50\nmax_attempts = 2\nprogress = \"reject.redb\"\n\n\
             [functions.slow]\npath = {:?}\n\n\
             [job.crawl]\nfunction = \"slow\"\nsource = \"data/*.jsonl\"\n\
             max_items_per_call = 10\nprogress = \"crawl.redb\"\n\n\
             [functions.huge]\npath = {:?}\n\n\
             [job.bloat]\nfunction = \"huge\"\nsource = \"data/*.jsonl\"\n\
             max_items_per_call = 100\nprogress = \"bloat.redb\"\n\
             results = \"bloat-results.jsonl\"\n",
            echo.dir.display().to_string(),
            fail.dir.display().to_string(),
            slow.dir.display().to_string(),
            huge.dir.display().to_string()
        ),
    )
    .unwrap();
    (pipeline, [echo, fail, slow, huge])
}

/// Starts the coordinator of `job` and returns it with its broker address.
fn coordinator(pipeline: &Path, job: &str) -> (Process, String) {
    let p = pipeline.to_str().unwrap();
    let c = Process::start(
        "coordinator",
        sluice(&["backfill", p, job, "--distributed"]),
    );
    let line = c.wait_line("the broker address", |l| l.contains("--bootstrap-servers "));
    let addr = line
        .rsplit_once("--bootstrap-servers ")
        .unwrap()
        .1
        .trim()
        .to_owned();
    (c, addr)
}

fn worker(name: &str, pipeline: &Path, job: &str, addr: &str) -> Process {
    worker_with(name, pipeline, job, addr, &[])
}

fn worker_with(name: &str, pipeline: &Path, job: &str, addr: &str, extra: &[&str]) -> Process {
    let p = pipeline.to_str().unwrap();
    let mut args = vec!["worker", p, job, "--bootstrap-servers", addr, "-q"];
    args.extend_from_slice(extra);
    Process::start(name, sluice(&args))
}

/// Stops a worker with SIGTERM (as systemd or a container runtime would)
/// and returns the tasks it reported done.
fn stop(mut w: Process) -> u64 {
    w.signal(Signal::SIGTERM);
    let (status, out) = w.finish();
    assert!(status.success(), "{out}\n{}", w.log());
    let line = out
        .lines()
        .find(|l| l.starts_with("worker: "))
        .unwrap_or_else(|| panic!("no summary in {out:?}\n{}", w.log()));
    let n = |word: &str| -> u64 {
        let before = line.split(word).next().unwrap();
        before.split_whitespace().last().unwrap().parse().unwrap()
    };
    n(" tasks succeeded") + n(" failed")
}

#[test]
fn two_workers_process_every_call_and_a_rerun_skips_them() {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let (mut coord, addr) = coordinator(&pipeline, "replay");
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let w1 = worker_with("worker 1", &pipeline, "replay", &addr, &metrics);
    let w2 = worker_with("worker 2", &pipeline, "replay", &addr, &metrics);
    let (status, out) = coord.finish();
    assert!(status.success(), "{out}\n{}", coord.log());
    assert!(
        out.contains("calls: 30 total, 30 succeeded, 0 failed"),
        "{out}"
    );
    assert!(out.contains("items: 300 total, 300 succeeded"), "{out}");
    // Each worker's /metrics counts the calls it made, as its summary does.
    let succeeded = |w: &Process| {
        let text = scrape(&w.metrics_address());
        let job = ("job", "replay");
        let items = metric_sum(&text, "sluice_job_items_total", &[job]);
        let calls = metric_sum(
            &text,
            "sluice_job_calls_total",
            &[job, ("outcome", "succeeded")],
        );
        assert_eq!(items, calls * 10, "{text}");
        assert!(
            text.contains("sluice_job_call_duration_seconds_count{job=\"replay\"}"),
            "{text}"
        );
        calls
    };
    let scraped = succeeded(&w1) + succeeded(&w2);
    // Every call was answered by one of the workers (a call may be answered
    // twice after a rebalance: at least once).
    let done = stop(w1) + stop(w2);
    assert!(done >= 30, "workers reported {done} tasks");
    // (A call a rebalance gave both may be counted after the scrape.)
    assert!((30..=done).contains(&scraped), "{scraped} of {done}");
    // The workers sent each response back: one results line per call, with
    // the echo function's answer (its event: the call's items).
    let text = std::fs::read_to_string(dir.path().join("replay-results.jsonl")).unwrap();
    let mut firsts: Vec<u64> = text
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let first = r["first_item"].as_u64().unwrap();
            let items = r["response"]["items"].as_array().unwrap();
            assert_eq!(items.len(), 10, "{l}");
            assert_eq!(items[0]["n"], first, "{l}");
            assert_eq!(r["count"], 10, "{l}");
            // The job's batch_input travelled in the task.
            assert_eq!(
                r["response"]["batch_input"],
                serde_json::json!({"run": 7}),
                "{l}"
            );
            first
        })
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts, (0..30).map(|c| c * 10).collect::<Vec<u64>>());

    // The progress store is the local one: a second run has nothing to do.
    let (mut again, _) = coordinator(&pipeline, "replay");
    let (status, out) = again.finish();
    assert!(status.success(), "{out}\n{}", again.log());
    assert!(out.contains("30 skipped (already done)"), "{out}");
}

/// Runs `job`, whose `calls` calls all fail, with one worker; checks the
/// exit code (1: failures within the tolerance) and the summary; returns
/// the folder and the coordinator's dead-letter records.
fn all_calls_fail(job: &str, calls: usize) -> (TempDir, Vec<Value>) {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let (mut coord, addr) = coordinator(&pipeline, job);
    let w = worker("worker", &pipeline, job, &addr);
    let (status, out) = coord.finish();
    assert_eq!(status.code(), Some(1), "{out}\n{}", coord.log());
    assert!(
        out.contains(&format!(
            "calls: {calls} total, 0 succeeded, {calls} failed"
        )),
        "{out}"
    );
    stop(w);
    let dead: Vec<Value> = std::fs::read_to_string(dir.path().join(format!("{job}.dead.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), calls);
    (dir, dead)
}

/// With `results`, a response larger than a result message comes back in
/// pieces and is put together: the results file has it whole.
#[test]
fn a_response_larger_than_a_result_message_comes_back_whole() {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let (mut coord, addr) = coordinator(&pipeline, "bloat");
    let w = worker("worker", &pipeline, "bloat", &addr);
    let (status, out) = coord.finish();
    assert!(status.success(), "{out}\n{}", coord.log());
    assert!(
        out.contains("calls: 3 total, 3 succeeded, 0 failed"),
        "{out}"
    );
    stop(w);
    let text = std::fs::read_to_string(dir.path().join("bloat-results.jsonl")).unwrap();
    let mut firsts: Vec<u64> = text
        .lines()
        .map(|l| {
            assert!(l.len() > 1_000_000, "{} bytes", l.len());
            let r: Value = serde_json::from_str(l).unwrap();
            let first = r["first_item"].as_u64().unwrap();
            let response = &r["response"];
            assert_eq!(response["first"], first);
            let quotes = response["quotes"].as_str().unwrap();
            assert_eq!(quotes.len(), 400_000);
            assert!(quotes.bytes().all(|b| b == b'"'));
            let accents = response["accents"].as_str().unwrap();
            assert_eq!(accents.chars().count(), 300_000);
            assert!(accents.chars().all(|c| c == 'é'));
            first
        })
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts, [0, 100, 200]);
}

#[test]
fn failed_calls_come_back_to_the_coordinator_s_dead_letter_file() {
    // Exit 1: calls failed, within the (unlimited) tolerance.
    let (_dir, dead) = all_calls_fail("reject", 6);
    let mut items: Vec<i64> = Vec::new();
    for d in &dead {
        assert_eq!(d["error_type"], "OrderRejected", "{d}");
        assert_eq!(d["attempts"], 2, "{d}");
        items.extend(
            d["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["n"].as_i64().unwrap()),
        );
    }
    items.sort_unstable();
    assert_eq!(items, (0..300).collect::<Vec<_>>());
}

#[test]
fn a_killed_worker_s_tasks_are_taken_over_by_another() {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let (mut coord, addr) = coordinator(&pipeline, "crawl");
    let p = pipeline.to_str().unwrap();
    let first = Process::start(
        "worker 1",
        sluice(&[
            "worker",
            p,
            "crawl",
            "--bootstrap-servers",
            &addr,
            "--concurrency",
            "1",
        ]),
    );
    // Killed in the middle of its first task: that task is not committed.
    first.wait_line("a task started", |l| l.contains("TASK"));
    first.signal(Signal::SIGKILL);
    let second = worker("worker 2", &pipeline, "crawl", &addr);
    let (status, out) = coord.finish();
    assert!(status.success(), "{out}\n{}", coord.log());
    // The coordinator waits for a result of every call it published, so the
    // call killed in flight was taken over and called again.
    assert!(
        out.contains("calls: 30 total, 30 succeeded, 0 failed"),
        "{out}"
    );
    assert!(stop(second) > 0);
}

/// A local backfill stopped with SIGTERM (or SIGINT) finishes its calls in
/// flight, prints its summary, exits 3 (interrupted); the same command
/// then calls only what had not succeeded.
#[test]
fn sigterm_stops_a_backfill_cleanly_and_the_rerun_finishes_it() {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let p = pipeline.to_str().unwrap();
    let mut run = Process::start("backfill", sluice(&["backfill", p, "crawl"]));
    run.wait_line("a first call", |l| l.contains("TASK "));
    run.signal(Signal::SIGTERM);
    let (status, out) = run.finish();
    assert_eq!(status.code(), Some(3), "{out}\n{}", run.log());
    assert!(out.contains("(interrupted)"), "{out}");
    let done = |out: &str, word: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with("calls: ")).unwrap();
        let before = line.split(word).next().unwrap();
        before.split_whitespace().last().unwrap().parse().unwrap()
    };
    let first = done(&out, " succeeded");
    assert!(first < 30, "stopped early: {out}");
    // The calls in flight finished; none was counted without running.
    assert_eq!(done(&out, " total"), first, "{out}");

    let mut again = Process::start("rerun", sluice(&["backfill", p, "crawl"]));
    let (status, out) = again.finish();
    assert_eq!(status.code(), Some(0), "{out}\n{}", again.log());
    assert_eq!(done(&out, " skipped"), first, "{out}");
    assert_eq!(done(&out, " succeeded"), 30 - first, "{out}");
}

/// `format = "objects"` distributed: a task carries the object's item, and
/// the worker fetches the object, stages it and completes the item; an
/// object over `max_object_bytes` fails without a call, and the function's
/// own failure (not text) is dead-lettered by the coordinator.
#[test]
fn workers_fetch_the_objects_of_their_tasks() {
    let dir = TempDir::new().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    for (name, text) in [
        ("a.txt", "1\n"),
        ("b.txt", "1\n2\n"),
        ("c.txt", "1\n2\n3\n"),
    ] {
        std::fs::write(objects.join(name), text).unwrap();
    }
    std::fs::write(objects.join("d.bin"), [0xff, 0x00]).unwrap();
    std::fs::write(objects.join("e.txt"), "x".repeat(2000)).unwrap();
    let count = function_fixture("line-count");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.count]\npath = {:?}\n\n[job.count]\nfunction = \"count\"\n\
             source = \"objects/\"\nformat = \"objects\"\nmax_object_bytes = 1000\n\
             max_attempts = 1\nprogress = \"count.redb\"\nresults = \"count.jsonl\"\n",
            count.dir.display().to_string()
        ),
    )
    .unwrap();
    let (mut coord, addr) = coordinator(&pipeline, "count");
    let w = worker("worker", &pipeline, "count", &addr);
    let (status, out) = coord.finish();
    assert_eq!(status.code(), Some(1), "{out}\n{}", coord.log());
    assert!(
        out.contains("calls: 5 total, 3 succeeded, 2 failed"),
        "{out}"
    );
    stop(w);
    let text = std::fs::read_to_string(dir.path().join("count.jsonl")).unwrap();
    let mut answers: Vec<(String, u64, u64, u64)> = text
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            let a = &r["response"];
            let key = a["key"].as_str().unwrap();
            let name = key.rsplit('/').next().unwrap().to_owned();
            let n = |f: &str| a[f].as_u64().unwrap_or_else(|| panic!("{f} in {l}"));
            (name, n("lines"), n("bytes"), n("size"))
        })
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            ("a.txt".to_owned(), 1, 2, 2),
            ("b.txt".to_owned(), 2, 4, 4),
            ("c.txt".to_owned(), 3, 6, 6)
        ]
    );
    let mut dead: Vec<Value> = std::fs::read_to_string(dir.path().join("count.dead.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    dead.sort_by_key(|d| d["call_id"].as_str().unwrap().to_owned());
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0]["error_type"], "NotText", "{dead:?}");
    assert_eq!(dead[0]["items"][0]["Size"], 2, "{dead:?}");
    assert_eq!(dead[1]["error_type"], "Sluice.ObjectTooLarge", "{dead:?}");
    assert_eq!(dead[1]["attempts"], 0, "{dead:?}");
}

/// `sluice backfill --metrics-addr` serves the job's counters while it
/// runs (here a local run of the slow function, stopped by SIGTERM).
#[test]
fn a_backfill_serves_its_job_metrics_while_it_runs() {
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let p = pipeline.to_str().unwrap();
    let mut run = Process::start(
        "backfill",
        sluice(&[
            "backfill",
            p,
            "crawl",
            "--metrics-addr",
            "127.0.0.1:0",
            "-q",
        ]),
    );
    let addr = run.metrics_address();
    // The progress line (every 2 s off a terminal) follows the metrics'
    // update.
    let line = run.wait_line("a progress line with calls done", |l| {
        l.starts_with("backfill: ") && !l.starts_with("backfill: 0 calls")
    });
    let done: u64 = line["backfill: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let text = scrape(&addr);
    let calls = metric_sum(
        &text,
        "sluice_job_calls_total",
        &[("job", "crawl"), ("outcome", "succeeded")],
    );
    assert!(calls >= done, "{line}\n{text}");
    assert!(
        text.contains("sluice_job_call_duration_seconds_count{job=\"crawl\"}"),
        "{text}"
    );
    assert!(
        text.contains("sluice_pool_busy_sandboxes{function=\"slow\"}"),
        "{text}"
    );
    run.signal(Signal::SIGTERM);
    let (status, out) = run.finish();
    // Interrupted: exit 3, the calls made so far recorded.
    assert_eq!(status.code(), Some(3), "{out}\n{}", run.log());
}

/// `payload_file` distributed: a task carries the columnar payload, and the
/// worker stages it as a file for the call, as a local run does (Arrow
/// streams and spliced Parquet row groups): every row is summed once.
#[test]
fn workers_stage_columnar_payloads_as_files() {
    let dir = TempDir::new().unwrap();
    let files = sluice_test_support::tpch::write_lineitem(dir.path(), 0.001, 1, 1_000);
    let sum = function_fixture("arrow-sum");
    let job = |name: &str, payload: &str| {
        format!(
            "[job.{name}]\nfunction = \"sum\"\nsource = {:?}\npayload = \"{payload}\"\n\
             payload_file = true\ncolumns = [\"l_quantity\"]\nmax_items_per_call = 1000\n\
             progress = \"{name}.redb\"\nresults = \"{name}.jsonl\"\n\n",
            files[0].display().to_string()
        )
    };
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.sum]\npath = {:?}\n\n{}{}",
            sum.dir.display().to_string(),
            job("arrow", "arrow"),
            job("parquet", "parquet")
        ),
    )
    .unwrap();
    let mut totals = Vec::new();
    for name in ["arrow", "parquet"] {
        let (mut coord, addr) = coordinator(&pipeline, name);
        let w = worker("worker", &pipeline, name, &addr);
        let (status, out) = coord.finish();
        assert!(status.success(), "{out}\n{}", coord.log());
        stop(w);
        let items: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("items: "))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        let (mut rows, mut quantity) = (0, 0.0);
        for line in std::fs::read_to_string(dir.path().join(format!("{name}.jsonl")))
            .unwrap()
            .lines()
        {
            let r: Value = serde_json::from_str(line).unwrap();
            rows += r["response"]["rows"].as_u64().unwrap();
            let q = &r["response"]["sums"]["l_quantity"];
            quantity += q
                .as_f64()
                .or_else(|| q.as_str()?.parse().ok())
                .unwrap_or_else(|| panic!("{line}"));
        }
        assert_eq!(rows, items, "{name}: {out}");
        totals.push((rows, quantity));
    }
    assert!(totals[0].0 > 5_000, "{totals:?}");
    assert_eq!(totals[0], totals[1]);
}

/// A distributed job's `results` at an S3 URL (`SLUICE_TEST_S3`, set by
/// `scripts/test-object-stores.sh`): the coordinator uploads the responses
/// the workers sent back when the job ends.
#[test]
fn a_coordinator_uploads_results_to_s3() {
    use sluice_test_support::stores::{Remote, fresh_prefix, read_object};

    let Some((bucket, store)) = Remote::S3.bucket() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let (pipeline, _functions) = setup(dir.path());
    let key = format!("{}/results.jsonl", fresh_prefix("sluice-distributed"));
    let text = std::fs::read_to_string(&pipeline).unwrap();
    std::fs::write(
        &pipeline,
        text.replace(
            "results = \"replay-results.jsonl\"",
            &format!("results = \"{bucket}/{key}\""),
        ),
    )
    .unwrap();
    let (mut coord, addr) = coordinator(&pipeline, "replay");
    let w = worker("worker", &pipeline, "replay", &addr);
    let (status, out) = coord.finish();
    assert!(status.success(), "{out}\n{}", coord.log());
    stop(w);
    let bytes = read_object(store.as_ref(), &key);
    let lines: Vec<Value> = String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    assert!(lines.iter().all(|l| l["count"] == 10), "{lines:?}");
}
