//! `sluice mapreduce PIPELINE JOB` as a user runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_ingest::kafka::EmbeddedBroker;
use sluice_test_support::{FunctionFixture, Process, Signal, agent_binary, function_fixture};
use tempfile::TempDir;

/// The part files' lines, sorted, of a word count of `in.txt` ("a b a\nB
/// c\n\nA\n").
const IN_TXT_COUNTS: [&str; 3] = [
    r#"{"key":"a","value":3}"#,
    r#"{"key":"b","value":2}"#,
    r#"{"key":"c","value":1}"#,
];

#[test]
fn mapreduce_job_writes_part_files_and_names_bad_jobs() {
    let dir = TempDir::new().unwrap();
    let f = function_fixture("wordcount");
    std::fs::write(dir.path().join("in.txt"), "a b a\nB c\n\nA\n").unwrap();
    let pipeline = word_count_pipeline(
        dir.path(),
        &f,
        &format!("{}max_items_per_call = 2\n", word_count_job("wc", "out")),
    );
    let run = |job: &str| run_job(&pipeline, job, &[]);
    // The plan first: map tasks as a backfill's calls, then the reduce side.
    let out = run_job(&pipeline, "wc", &["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("total: 1 files, 4 items, 0 unreadable, 2 calls of up to 2 items"),
        "{stdout}"
    );
    assert!(
        stdout.contains("map: the calls above are the map tasks (m); reduce: 2 partitions"),
        "{stdout}"
    );
    assert!(!dir.path().join("out").exists(), "a dry run writes nothing");
    let out = run("wc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("map: 2 tasks over 4 items"), "{stdout}");
    assert!(stdout.contains("reduce: 3 keys into 3 records"), "{stdout}");
    let mut lines: Vec<String> = (0..2)
        .flat_map(|p| {
            std::fs::read_to_string(dir.path().join(format!("out/part-{p:05}.jsonl")))
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.sort();
    assert_eq!(lines, IN_TXT_COUNTS);

    // A sample of the first two lines ("a b a", "B c"), from the flag,
    // then from the job; its output replaces the whole run's.
    let out = run_job(&pipeline, "wc", &["--max-items", "2"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("a sample: the first 2 items, in 1 of 1 files (max_items)"),
        "{stderr}"
    );
    assert!(stdout.contains("map: 1 tasks over 2 items"), "{stdout}");
    let sample: BTreeMap<String, u64> = (0..2)
        .flat_map(|p| {
            std::fs::read_to_string(dir.path().join(format!("out/part-{p:05}.jsonl")))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (
                        v["key"].as_str().unwrap().to_owned(),
                        v["value"].as_u64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        sample,
        BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 1)])
    );
    let text = std::fs::read_to_string(&pipeline).unwrap();
    std::fs::write(&pipeline, format!("{text}max_items = 1\n")).unwrap();
    let out = run("wc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("map: 1 tasks over 1 items"), "{stdout}");

    let out = run("nope");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no job named \"nope\" with kind = \"mapreduce\"; MapReduce jobs: wc"),
        "{stderr}"
    );
}

/// `dir/pipeline.toml`: the word-count functions `m` and `r` (`f`), then
/// `jobs`.
fn word_count_pipeline(dir: &Path, f: &FunctionFixture, jobs: &str) -> PathBuf {
    let pipeline = dir.join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.m]\npath = {p:?}\nhandler = \"map\"\n\n\
             [functions.r]\npath = {p:?}\nhandler = \"reduce\"\n\n{jobs}",
            p = f.dir.display().to_string()
        ),
    )
    .unwrap();
    pipeline
}

/// A word-count job `name` over `in.txt` with 2 reducers, into `output`.
fn word_count_job(name: &str, output: &str) -> String {
    format!(
        "[job.{name}]\nkind = \"mapreduce\"\nsource = \"in.txt\"\nmap = \"m\"\nreduce = \"r\"\n\
         reduce_partitions = 2\noutput = {output:?}\n"
    )
}

/// `sluice mapreduce PIPELINE JOB ARGS...`, run to its end.
fn run_job(pipeline: &Path, job: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_AGENT", agent_binary())
        .arg("mapreduce")
        .arg(pipeline)
        .arg(job)
        .args(args)
        .output()
        .unwrap()
}

/// A word-count job over 40 lines (4 map tasks, 2 reducers, one group per
/// reduce call); `hang` is the map function's and the reduce function's
/// `env` (`WORDCOUNT_HANG_ITEM`, `WORDCOUNT_HANG_KEY`), `servers` the
/// shuffle's cluster (`None`: embedded).
fn write_job(dir: &Path, f: &Path, hang: (&str, &str), servers: Option<&str>) {
    if !dir.join("in.txt").exists() {
        let lines: Vec<String> = (0..40)
            .map(|i| format!("w{} w{} common zz{}", i % 7, i % 3, i % 2))
            .collect();
        std::fs::write(dir.join("in.txt"), lines.join("\n") + "\n").unwrap();
    }
    let servers = servers.map_or(String::new(), |s| format!("bootstrap_servers = {s:?}\n"));
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            "[functions.m]\npath = {p:?}\nhandler = \"map\"\ntimeout = \"600s\"\nenv = {{ WORDCOUNT_HANG_ITEM = {m:?} }}\n\n\
             [functions.r]\npath = {p:?}\nhandler = \"reduce\"\ntimeout = \"600s\"\nenv = {{ WORDCOUNT_HANG_KEY = {r:?} }}\n\n\
             [job.wc]\nkind = \"mapreduce\"\nsource = \"in.txt\"\nmap = \"m\"\nreduce = \"r\"\n\
             reduce_partitions = 2\nmax_items_per_call = 10\ngroups_per_call = 1\noutput = \"out\"\n{servers}",
            p = f.display().to_string(),
            m = hang.0,
            r = hang.1,
        ),
    )
    .unwrap();
}

/// `sluice mapreduce`, shuffling through `topic` when given.
fn mapreduce(dir: &Path, topic: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env("SLUICE_AGENT", agent_binary())
        .arg("mapreduce")
        .arg(dir.join("pipeline.toml"))
        .arg("wc");
    if let Some(t) = topic {
        c.arg("--shuffle-topic").arg(t);
    }
    c
}

/// Starts the job and SIGKILLs it once a stderr progress line holds `when`.
fn kill_when(dir: &Path, topic: Option<&str>, when: &str) {
    let mut p = Process::start("sluice mapreduce", mapreduce(dir, topic));
    p.wait_line(when, |l| l.contains(when));
    p.signal(Signal::SIGKILL);
    let (status, _) = p.finish();
    assert!(!status.success());
}

/// Runs the job to its end; returns stdout and stderr.
fn finish(dir: &Path, topic: Option<&str>) -> (String, String) {
    let out = mapreduce(dir, topic).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    (stdout, stderr)
}

/// The counts of the output folder, after checking it holds the two part
/// files, `_SUCCESS`, and nothing else (no temporary or state files).
fn output(dir: &Path) -> BTreeMap<String, u64> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["_SUCCESS", "part-00000.jsonl", "part-00001.jsonl"]);
    let mut counts = BTreeMap::new();
    for p in 0..2 {
        let text = std::fs::read_to_string(dir.join(format!("out/part-{p:05}.jsonl"))).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = v["key"].as_str().unwrap().to_owned();
            assert!(
                counts.insert(key, v["value"].as_u64().unwrap()).is_none(),
                "{line}"
            );
        }
    }
    counts
}

/// The count of the input, directly.
fn direct(dir: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for w in std::fs::read_to_string(dir.join("in.txt"))
        .unwrap()
        .split_whitespace()
    {
        *counts.entry(w.to_owned()).or_default() += 1;
    }
    counts
}

/// On an external cluster, a run killed in its map phase and one killed in
/// its reduce phase (one reducer done, the other mid-way) are resumed on
/// the same shuffle topic: finished map tasks and reducers are not run
/// again, and the output is the direct count.
#[test]
fn a_killed_run_on_a_kafka_cluster_is_resumed_with_the_same_result() {
    let dir = TempDir::new().unwrap();
    let f = function_fixture("wordcount");
    let broker = EmbeddedBroker::start(1).unwrap();
    let servers = Some(broker.bootstrap_servers());
    // The test's broker is a mock cluster, which cannot create topics on
    // request: the job shuffles through a topic made beforehand.
    broker.create_topic("wc-shuffle", 2).unwrap();
    let topic = Some("wc-shuffle");
    // The map task of lines 0..10 never answers: kill after the other 3.
    write_job(dir.path(), &f.dir, ("w0 w0 common zz0", ""), servers);
    kill_when(dir.path(), topic, "map: 3/4 splits");
    assert!(dir.path().join("out/.sluice-mapreduce.json").is_file());
    // The map phase ends; the reduce call of key zz1 never answers: kill
    // once the other reducer is done.
    write_job(dir.path(), &f.dir, ("", "zz1"), servers);
    kill_when(dir.path(), topic, "reduce: 1/2 partitions done");
    write_job(dir.path(), &f.dir, ("", ""), servers);
    let (stdout, stderr) = finish(dir.path(), topic);
    assert!(stderr.contains("sluice: resuming an unfinished run (4 map tasks and 1 reducers done; attempt generation 3)"), "{stderr}");
    assert!(stdout.contains("map: 4 tasks over 40 items"), "{stdout}");
    assert!(
        stdout.contains("resumed: 4 map tasks and 1 reducers were done by an earlier run"),
        "{stdout}"
    );
    assert_eq!(output(dir.path()), direct(dir.path()));
    // A run after a finished one starts afresh, from the topic's end (the
    // records of the earlier run do not count), with the same result.
    let (stdout, _) = finish(dir.path(), topic);
    assert!(!stdout.contains("resumed"), "{stdout}");
    assert_eq!(output(dir.path()), direct(dir.path()));
    // Other input on the same topic: the earlier runs' records (the same
    // map task numbers and attempts) are before the new run's start.
    let mut text = std::fs::read_to_string(dir.path().join("in.txt")).unwrap();
    text = text.replace("common", "other");
    std::fs::write(dir.path().join("in.txt"), text).unwrap();
    let (stdout, _) = finish(dir.path(), topic);
    assert!(!stdout.contains("resumed"), "{stdout}");
    let counts = output(dir.path());
    assert_eq!(counts, direct(dir.path()));
    assert!(!counts.contains_key("common"), "{counts:?}");
}

/// With the embedded broker the shuffle dies with the process: a run killed
/// mid-way (one reducer done, the other mid-way) is run again from scratch,
/// replacing the partial output, with the same result.
#[test]
fn a_killed_run_on_the_embedded_broker_is_rerun_from_scratch_with_the_same_result() {
    let dir = TempDir::new().unwrap();
    let f = function_fixture("wordcount");
    write_job(dir.path(), &f.dir, ("", "zz1"), None);
    kill_when(dir.path(), None, "reduce: 1/2 partitions done");
    write_job(dir.path(), &f.dir, ("", ""), None);
    let (stdout, stderr) = finish(dir.path(), None);
    assert!(
        stderr.contains("holds part files of an earlier run; this run replaces them"),
        "{stderr}"
    );
    assert!(!stdout.contains("resumed"), "{stdout}");
    assert!(stdout.contains("map: 4 tasks over 40 items"), "{stdout}");
    assert_eq!(output(dir.path()), direct(dir.path()));
}

/// `output` as an S3 prefix, against a real S3-protocol server
/// (`SLUICE_TEST_S3`, set by `scripts/test-object-stores.sh`): the part
/// files and `_SUCCESS` are uploaded and the summary names their URLs; a
/// bucket that does not exist fails the job after the reducers (exit 3),
/// naming the URL, and the staged output stays.
#[test]
fn mapreduce_output_goes_to_an_s3_prefix() {
    use sluice_test_support::stores::{Remote, fresh_prefix, read_object};

    let Some((bucket, store)) = Remote::S3.bucket() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let f = function_fixture("wordcount");
    std::fs::write(dir.path().join("in.txt"), "a b a\nB c\n\nA\n").unwrap();
    let prefix = fresh_prefix("sluice-mapreduce-cli");
    let pipeline = word_count_pipeline(
        dir.path(),
        &f,
        &format!(
            "{}\n{}",
            word_count_job("wc", &format!("{bucket}/{prefix}/counts/")),
            word_count_job("lost", "s3://sluice-no-such-bucket/counts/")
        ),
    );
    let run = |job: &str| run_job(&pipeline, job, &[]);
    let out = run("wc");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    for p in 0..2 {
        assert!(
            stdout.contains(&format!(
                "output: {bucket}/{prefix}/counts/part-{p:05}.jsonl"
            )),
            "{stdout}"
        );
    }
    let staged = dir.path().join(".sluice-state/mapreduce-wc");
    assert!(
        stdout.contains(&format!("(staged in {})", staged.display())),
        "{stdout}"
    );

    let mut lines: Vec<String> = Vec::new();
    for p in 0..2 {
        let bytes = read_object(
            store.as_ref(),
            &format!("{prefix}/counts/part-{p:05}.jsonl"),
        );
        lines.extend(String::from_utf8_lossy(&bytes).lines().map(str::to_owned));
    }
    lines.sort();
    assert_eq!(lines, IN_TXT_COUNTS);
    read_object(store.as_ref(), &format!("{prefix}/counts/_SUCCESS"));

    let out = run("lost");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("uploading the output to s3://sluice-no-such-bucket/counts: "),
        "{stderr}"
    );
    assert!(
        dir.path()
            .join(".sluice-state/mapreduce-lost/part-00000.jsonl")
            .is_file()
    );
}
