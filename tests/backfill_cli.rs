//! `sluice backfill` as a process, killed with SIGKILL at pseudo-random
//! points and resumed: every item is handled at least once, and the
//! dead-letter file, the results file and the final summary agree with the
//! function's own log of what it saw.
//!
//! The function is a bash script that writes one line per call to stderr
//! before answering, `SAW <first item> ok|rejected <item ids>`; `sluice
//! backfill` relays it as `[fn] SAW ...` on its own stderr, which the test
//! collects for every run. Kill points are chosen after a seeded random
//! number of such lines (`SLUICE_TEST_SEED` overrides the seed), never by
//! sleeping.
//!
//! Also: an Avro data set backfilled end to end, and a broken Avro file's
//! error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_test_support::{FunctionFixture, agent_binary, script_fixture};

/// Items in the data set.
const ITEMS: usize = 2000;
/// Items per call.
const PER_CALL: usize = 10;
/// Attempts per call (`--max-attempts`): a rejected call is tried this often.
const ATTEMPTS: usize = 2;
/// Longest wait for one run, or for the progress wanted before a kill.
const DEADLINE: Duration = Duration::from_secs(40);

/// Rejects the whole call (error) when any item says "is bad"; logs what it
/// saw first.
const FUNCTION: &str = r#"#!/bin/bash
set -euo pipefail
export LC_ALL=C
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
WORK=$(mktemp -d /tmp/fn.XXXXXX)
while true; do
  curl -sS -D "$WORK/headers" -o "$WORK/event" "$API/invocation/next"
  REQUEST_ID=
  while IFS= read -r line; do
    line=${line%$'\r'}
    if [[ ${line,,} == lambda-runtime-aws-request-id:* ]]; then
      REQUEST_ID=${line#*:}
      REQUEST_ID=${REQUEST_ID// /}
    fi
  done <"$WORK/headers"
  event=$(<"$WORK/event")
  first=$(grep -o '"first_item":[0-9]*' "$WORK/event" | head -n1 | cut -d: -f2)
  ids=$(grep -o '"id":"[^"]*"' "$WORK/event" | cut -d'"' -f4 | tr '\n' ' ')
  if [[ $event == *" is bad"* ]]; then
    echo "SAW $first rejected $ids" >&2
    curl -sS -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Rejected' \
      --data-binary '{"errorType":"Rejected","errorMessage":"a bad item"}' \
      "$API/invocation/$REQUEST_ID/error"
  else
    echo "SAW $first ok $ids" >&2
    curl -sS -o /dev/null -X POST --data-binary '{"ok":true}' \
      "$API/invocation/$REQUEST_ID/response"
  fi
done
"#;

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn item_id(i: usize) -> String {
    format!("it{i:04}")
}

/// Writes the data set; returns the indices of the bad items.
fn write_items(path: &Path, rng: &mut Rng) -> BTreeSet<usize> {
    let mut bad = BTreeSet::new();
    let mut text = String::new();
    for i in 0..ITEMS {
        let is_bad = rng.below(100) < 2;
        if is_bad {
            bad.insert(i);
        }
        let word = if is_bad { "bad" } else { "fine" };
        text.push_str(&format!(
            "{{\"id\":\"{}\",\"text\":\"item {i} is {word}\",\"n\":{i}}}\n",
            item_id(i)
        ));
    }
    std::fs::write(path, text).expect("writing the data set");
    bad
}

/// One `sluice backfill` process; stderr lines arrive on `lines`.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
}

impl Run {
    fn start(pipeline: &Path, data: &Path, progress: &Path, dead: &Path, results: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE_AGENT", agent_binary())
            .arg("backfill")
            .arg("--pipeline")
            .arg(pipeline)
            .args(["--function", "fn", "--format", "jsonl"])
            .arg("--source")
            .arg(data)
            .arg("--progress")
            .arg(progress)
            .arg("--dead-letter")
            .arg(dead)
            .arg("--results")
            .arg(results)
            .args(["--max-items-per-call", &PER_CALL.to_string()])
            .args(["--max-attempts", &ATTEMPTS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting sluice backfill");
        let pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            stderr: Vec::new(),
        }
    }

    /// Waits until `n` function log lines have been seen; false if the
    /// process ended (or the deadline passed) first.
    fn wait_saw(&mut self, n: usize) -> bool {
        let deadline = Instant::now() + DEADLINE;
        let mut seen = self.stderr.iter().filter(|l| is_saw(l)).count();
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    seen += usize::from(is_saw(&line));
                    self.stderr.push(line);
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Waits for the exit, then for every stderr line the process wrote.
    /// Sandboxes may outlive a killed sluice for a moment and hold the pipe,
    /// so the end of stderr is awaited under a deadline.
    fn finish(&mut self) -> ExitStatus {
        let status = self.child.wait().expect("waiting for sluice backfill");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stderr.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("stderr of a finished sluice backfill stayed open for {DEADLINE:?}")
                }
            }
        }
        status
    }

    fn stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut s).expect("reading stdout");
        }
        s
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_saw(line: &str) -> bool {
    line.starts_with("[fn] SAW ")
}

/// A function log line: (first item, ok?, item ids).
fn parse_saw(line: &str) -> Option<(usize, bool, Vec<String>)> {
    let rest = line.strip_prefix("[fn] SAW ")?;
    let mut words = rest.split_whitespace();
    let first = words.next()?.parse().ok()?;
    let ok = match words.next()? {
        "ok" => true,
        "rejected" => false,
        other => panic!("unexpected outcome {other:?} in {line:?}"),
    };
    Some((first, ok, words.map(str::to_owned).collect()))
}

/// The counters of a summary line such as `calls: 3 total, 2 succeeded, ...`.
fn counters(stdout: &str, prefix: &str) -> BTreeMap<String, u64> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in stdout:\n{stdout}"));
    line.split(',')
        .map(|part| {
            let mut w = part.split_whitespace();
            let n = w.next().and_then(|n| n.parse().ok());
            let name = w.next();
            match (n, name) {
                (Some(n), Some(name)) => (name.to_owned(), n),
                _ => panic!("cannot read {part:?} in {line:?}"),
            }
        })
        .collect()
}

#[test]
fn kill_9_at_random_points_then_resume_handles_every_item_and_agrees_with_the_function_log() {
    let seed = std::env::var("SLUICE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_ba5e_u64);
    eprintln!("seed {seed} (set SLUICE_TEST_SEED to repeat another)");
    let mut rng = Rng(seed.max(1));

    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("items.jsonl");
    let bad = write_items(&data, &mut rng);
    let fixture: FunctionFixture = script_fixture(FUNCTION);
    let pipeline = tmp.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.fn]\npath = {:?}\ntimeout = \"10s\"\nconcurrency = 4\n",
            fixture.dir
        ),
    )
    .expect("writing the pipeline");
    let progress = tmp.path().join("progress.redb");
    let dead = tmp.path().join("dead.jsonl");
    let results = tmp.path().join("out").join("results.jsonl");

    // What the data set implies: a call covers a fixed range of items, and
    // the function rejects every call holding a bad item.
    let calls = ITEMS.div_ceil(PER_CALL);
    let poisoned: BTreeSet<usize> = bad.iter().map(|i| i / PER_CALL * PER_CALL).collect();
    assert!(!poisoned.is_empty() && poisoned.len() < calls / 2);
    let good_items: BTreeSet<String> = (0..ITEMS)
        .filter(|i| !poisoned.contains(&(i / PER_CALL * PER_CALL)))
        .map(item_id)
        .collect();
    let dead_items: BTreeSet<String> = (0..ITEMS)
        .filter(|i| poisoned.contains(&(i / PER_CALL * PER_CALL)))
        .map(item_id)
        .collect();

    // Killed runs: each after a random number of calls seen by the function.
    let kills = 3 + rng.below(2) as usize;
    let mut all_lines: Vec<String> = Vec::new();
    for k in 0..kills {
        let mut run = Run::start(&pipeline, &data, &progress, &dead, &results);
        let wanted = 3 + rng.below(50) as usize;
        let reached = run.wait_saw(wanted);
        run.child.kill().expect("kill -9");
        let status = run.finish();
        assert!(
            reached,
            "run {k} ended (or stalled) before its function saw {wanted} calls ({status}):\n{}",
            run.stderr.join("\n")
        );
        assert_eq!(status.code(), None, "run {k} was killed by a signal");
        eprintln!(
            "run {k}: killed after {} function log lines",
            run.stderr.iter().filter(|l| is_saw(l)).count()
        );
        all_lines.append(&mut run.stderr);
    }

    // The run to completion.
    let mut last = Run::start(&pipeline, &data, &progress, &dead, &results);
    let status = last.finish();
    let stdout = last.stdout();
    let final_lines = std::mem::take(&mut last.stderr);
    let context = format!(
        "--- stdout of the final run ---\n{stdout}\n--- stderr of the final run ---\n{}",
        final_lines.join("\n")
    );
    assert_eq!(
        status.code(),
        Some(1),
        "some items failed: exit 1\n{context}"
    );

    // 1. Every good item succeeded at least once, by the function's log;
    //    no bad call ever succeeded, and calls carry the ids of their range.
    let mut ok_items = BTreeSet::new();
    let mut ok_calls_before = BTreeSet::new();
    let mut rejected_lines: BTreeMap<usize, usize> = BTreeMap::new();
    let (mut final_ok, mut final_rejected) = (Vec::new(), Vec::new());
    for (line, in_final) in all_lines
        .iter()
        .map(|l| (l, false))
        .chain(final_lines.iter().map(|l| (l, true)))
    {
        let Some((first, ok, ids)) = parse_saw(line) else {
            continue;
        };
        let expected: Vec<String> = (first..(first + PER_CALL).min(ITEMS))
            .map(item_id)
            .collect();
        assert_eq!(ids, expected, "call {first} carried other items: {line}");
        assert_eq!(
            ok,
            !poisoned.contains(&first),
            "call {first}: the function's verdict does not match the data: {line}"
        );
        if ok {
            ok_items.extend(ids);
            if in_final {
                final_ok.push(first);
            } else {
                ok_calls_before.insert(first);
            }
        } else {
            *rejected_lines.entry(first).or_default() += 1;
            if in_final {
                final_rejected.push(first);
            }
        }
    }
    let missing: Vec<&String> = good_items.difference(&ok_items).collect();
    assert!(
        missing.is_empty(),
        "{} good items never succeeded by the function's log: {:?}...\n{context}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    // 2. The dead-letter file holds exactly the items of the rejected calls.
    let text = std::fs::read_to_string(&dead).expect("reading the dead-letter file");
    let mut dead_seen: BTreeSet<String> = BTreeSet::new();
    let mut records_per_call: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines() {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("dead-letter line {line:?} is not JSON: {e}"));
        let call_id = record["call_id"].as_str().expect("call_id").to_owned();
        let first: usize = call_id
            .rsplit('#')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("call id ends in #<first>");
        assert!(
            poisoned.contains(&first),
            "call {call_id} was dead-lettered"
        );
        assert_eq!(record["error_type"], "Rejected", "{line}");
        assert_eq!(record["attempts"], ATTEMPTS as u64, "{line}");
        for item in record["items"].as_array().expect("items") {
            dead_seen.insert(item["id"].as_str().expect("item id").to_owned());
        }
        *records_per_call.entry(call_id).or_default() += 1;
    }
    eprintln!(
        "dead-letter file: {} records for {} failed calls ({} items)",
        text.lines().count(),
        records_per_call.len(),
        dead_seen.len()
    );
    assert_eq!(
        dead_seen, dead_items,
        "dead-lettered items differ from the items of the rejected calls"
    );
    // The file describes the final run: each rejected call exactly once,
    // however many killed runs came before.
    assert_eq!(
        records_per_call.len(),
        poisoned.len(),
        "every rejected call is dead-lettered"
    );
    assert!(
        records_per_call.values().all(|&n| n == 1),
        "a call is dead-lettered more than once: {records_per_call:?}"
    );
    // Every dead-letter record stands for `ATTEMPTS` rejections the function
    // logged (a killed run may have logged a rejection it never recorded).
    for (call_id, records) in &records_per_call {
        let first: usize = call_id.rsplit('#').next().unwrap().parse().unwrap();
        let logged = rejected_lines.get(&first).copied().unwrap_or(0);
        assert!(
            records * ATTEMPTS <= logged,
            "{call_id}: {records} dead-letter records but the function rejected it {logged} times"
        );
    }

    // 3. The final summary agrees with the data, the progress and the log.
    let c = counters(&stdout, "calls: ");
    let i = counters(&stdout, "items: ");
    assert_eq!(c["total"], calls as u64, "{context}");
    assert_eq!(
        c["total"],
        c["succeeded"] + c["failed"] + c["skipped"],
        "{context}"
    );
    assert_eq!(i["total"], ITEMS as u64, "{context}");
    assert_eq!(
        i["total"],
        i["succeeded"] + i["failed"] + i["skipped"],
        "{context}"
    );
    assert_eq!(c["failed"], poisoned.len() as u64, "{context}");
    assert_eq!(i["failed"], dead_items.len() as u64, "{context}");
    assert_eq!(
        c["retries"],
        c["failed"] * (ATTEMPTS as u64 - 1),
        "{context}"
    );
    assert!(c["skipped"] > 0, "the killed runs made progress\n{context}");
    // Progress lines of the final run (every 2 s) never exceed its summary
    // and never go backwards.
    let mut done = (0, 0);
    for line in final_lines
        .iter()
        .filter_map(|l| l.strip_prefix("backfill: "))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let calls_done: u64 = words[0].parse().expect("calls done");
        let items_done: u64 = words
            .iter()
            .position(|w| w.starts_with("items"))
            .and_then(|p| words[p - 1].parse().ok())
            .expect("items done");
        assert!(calls_done >= done.0 && items_done >= done.1, "{line}");
        done = (calls_done, items_done);
        assert!(
            calls_done <= c["succeeded"] && items_done <= i["succeeded"],
            "{line}"
        );
    }
    // The final run was not killed, so its log is complete: one ok line per
    // call it succeeded, ATTEMPTS rejections per failed call.
    let final_ok_set: BTreeSet<usize> = final_ok.iter().copied().collect();
    assert_eq!(
        final_ok.len(),
        final_ok_set.len(),
        "a call ran twice\n{context}"
    );
    assert_eq!(final_ok.len() as u64, c["succeeded"], "{context}");
    assert_eq!(
        final_rejected.len() as u64,
        c["failed"] * ATTEMPTS as u64,
        "{context}"
    );
    // Skipped calls are exactly the good calls the final run did not make,
    // and each of them succeeded in a killed run by the function's log.
    let good_calls: BTreeSet<usize> = (0..calls)
        .map(|c| c * PER_CALL)
        .filter(|f| !poisoned.contains(f))
        .collect();
    let skipped: BTreeSet<usize> = good_calls.difference(&final_ok_set).copied().collect();
    assert_eq!(skipped.len() as u64, c["skipped"], "{context}");
    let unseen: Vec<&usize> = skipped.difference(&ok_calls_before).collect();
    assert!(
        unseen.is_empty(),
        "calls skipped as done that the function never logged as ok: {unseen:?}\n{context}"
    );
    assert_eq!(
        i["skipped"],
        skipped
            .iter()
            .map(|f| ((f + PER_CALL).min(ITEMS) - f) as u64)
            .sum::<u64>(),
        "{context}"
    );

    // 4. The results file: exactly one line per good call, however many
    //    killed runs wrote lines of calls they never recorded as done,
    //    each with the call's items and the function's response.
    let text = std::fs::read_to_string(&results).expect("reading the results file");
    let mut result_calls: BTreeMap<usize, usize> = BTreeMap::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("results line {line:?} is not JSON: {e}"));
        let first = r["first_item"].as_u64().expect("first_item") as usize;
        assert_eq!(
            r["call_id"].as_str(),
            Some(format!("{}#{first}", data.display()).as_str()),
            "{line}"
        );
        assert_eq!(
            r["count"],
            ((first + PER_CALL).min(ITEMS) - first) as u64,
            "{line}"
        );
        assert_eq!(r["response"], serde_json::json!({ "ok": true }), "{line}");
        *result_calls.entry(first).or_default() += 1;
    }
    let twice: Vec<_> = result_calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "calls with more than one results line: {twice:?}"
    );
    assert_eq!(
        result_calls.keys().copied().collect::<BTreeSet<usize>>(),
        good_calls,
        "the results file has a line for each good call, and only for those"
    );
    assert!(
        stdout.contains("responses are in") || context.contains("responses are in"),
        "{context}"
    );
}

/// An Avro container file (Kafka Connect's S3 sink writes them) backfilled
/// as a user runs it: every record reaches the echo function once, in
/// calls of at most `--max-items-per-call`, as JSON; a file that is not
/// Avro stops the job with an error naming it.
#[test]
fn an_avro_data_set_is_backfilled_record_by_record() {
    let echo = sluice_test_support::function_fixture("echo");
    let tmp = tempfile::tempdir().unwrap();
    let schema = apache_avro::Schema::parse_str(
        r#"{"type": "record", "name": "Payment", "fields": [
            {"name": "id", "type": "long"},
            {"name": "account", "type": "string"},
            {"name": "cents", "type": "int"}]}"#,
    )
    .unwrap();
    let mut w = apache_avro::Writer::with_codec(
        &schema,
        Vec::new(),
        apache_avro::Codec::Deflate(Default::default()),
    )
    .unwrap();
    for id in 0..25i64 {
        let mut r = apache_avro::types::Record::new(&schema).unwrap();
        r.put("id", id);
        r.put("account", format!("acct-{}", id % 3));
        r.put("cents", (id * 100) as i32);
        w.append_value(r).unwrap();
    }
    let data = tmp.path().join("payments.avro");
    std::fs::write(&data, w.into_inner().unwrap()).unwrap();
    let pipeline = tmp.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!("[functions.echo]\npath = {:?}\n", echo.dir),
    )
    .unwrap();
    let results = tmp.path().join("results.jsonl");
    let backfill = |source: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE_AGENT", agent_binary())
            .args(["backfill", "-q", "-p"])
            .arg(&pipeline)
            .args([
                "--function",
                "echo",
                "--max-items-per-call",
                "10",
                "--source",
            ])
            .arg(source)
            .arg("--results")
            .arg(&results)
            .output()
            .unwrap()
    };
    let out = backfill(&data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let mut seen = Vec::new();
    let mut calls = 0;
    for line in std::fs::read_to_string(&results).unwrap().lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        let items = line["response"]["items"].as_array().unwrap().clone();
        assert!(items.len() <= 10, "{line}");
        calls += 1;
        seen.extend(items);
    }
    assert_eq!(calls, 3);
    seen.sort_by_key(|v| v["id"].as_i64());
    let want: Vec<Value> = (0..25i64)
        .map(|id| serde_json::json!({"id": id, "account": format!("acct-{}", id % 3), "cents": id * 100}))
        .collect();
    assert_eq!(seen, want);

    let broken = tmp.path().join("broken.avro");
    std::fs::write(&broken, "Obj\u{1}not really").unwrap();
    let out = backfill(&broken);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: Avro: ", broken.display())),
        "{stderr}"
    );
}
