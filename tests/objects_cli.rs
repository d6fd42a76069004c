//! `sluice run` with an object-store trigger on a local folder, as
//! processes: files written after the start are called, hidden ones and
//! ones without the `suffix` are not, and a second run of the same trigger is refused; `kill -9` mid-run
//! then a restart calls every file at least once; a folder that does not
//! exist is a usage error. Tests wait on the
//! processes' stderr lines under a deadline.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use sluice_test_support::{Process, Signal, agent_binary, function_fixture};

fn sluice(name: &str, pipeline: &Path, args: &[&str]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command
        .env("SLUICE_AGENT", agent_binary())
        .arg("run")
        .arg(pipeline)
        .args(args);
    Process::start(name, command)
}

/// A pipeline watching `dir/in` with the `line-count` function (one call
/// at a time); `extra` adds trigger fields.
fn write_pipeline(dir: &Path, extra: &str) -> std::path::PathBuf {
    let f = function_fixture("line-count");
    let path = dir.join("pipeline.toml");
    std::fs::create_dir_all(dir.join("in")).unwrap();
    std::fs::write(
        &path,
        format!(
            "[functions.count]\npath = {:?}\nconcurrency = 1\n\n[[trigger.object_store]]\nfunction = \"count\"\nurl = \"in\"\npoll_interval = \"20ms\"\n{extra}\n",
            f.dir
        ),
    )
    .unwrap();
    // The fixture's folder must outlive the pipeline's runs.
    std::mem::forget(f);
    path
}

/// Keys the function reported (`[count] KEY: N lines, M bytes`).
fn called(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("[count] "))
        .filter_map(|l| l.split_once(": ").map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn files_written_while_running_are_called_and_hidden_or_other_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(dir.path(), "suffix = \".csv\"");
    let input = dir.path().join("in");
    std::fs::write(input.join("before.csv"), "there first\n").unwrap();
    let mut run = sluice("run", &pipeline, &[]);
    run.wait_line("the existing file skipped", |l| {
        l.contains("1 object already under") && l.contains("starting_position")
    });
    std::fs::write(input.join(".upload.csv"), "half\n").unwrap();
    std::fs::write(input.join("notes.txt"), "not a .csv\n").unwrap();
    // Written in place, in two writes: called once, whole.
    let mut file = std::fs::File::create(input.join("orders.csv")).unwrap();
    file.write_all(b"id\n1\n").unwrap();
    file.write_all(b"2\n").unwrap();
    drop(file);
    run.wait_line("orders.csv called", |l| {
        l == "[count] orders.csv: 3 lines, 7 bytes"
    });
    // A second run of the same trigger is refused: one process per
    // trigger (its progress store is a local file).
    let mut second = sluice("second", &pipeline, &[]);
    let (status, _) = second.finish();
    let second_log = second.log();
    assert_eq!(status.code(), Some(2), "{second_log}");
    assert!(
        second_log.contains("in use by another sluice run"),
        "{second_log}"
    );
    run.signal(Signal::SIGTERM);
    let (status, _) = run.finish();
    let log = run.log();
    assert!(status.success(), "{log}");
    assert_eq!(called(&run.stderr()), ["orders.csv"], "{log}");
}

#[test]
fn kill_9_mid_run_then_restart_calls_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(dir.path(), "starting_position = \"earliest\"");
    let want: BTreeSet<String> = (0..100).map(|i| format!("f{i:03}.txt")).collect();
    for name in &want {
        std::fs::write(dir.path().join("in").join(name), format!("{name}\n")).unwrap();
    }
    let mut first = sluice("first", &pipeline, &[]);
    first.wait_line("a first call", |l| l.starts_with("[count] f"));
    first.signal(Signal::SIGKILL);
    first.finish();
    let first_log = first.log();
    let before = called(&first.stderr());
    assert!(
        before.len() < want.len(),
        "the kill came too late to test anything\n{first_log}"
    );

    let mut second = sluice("second", &pipeline, &["--stop-when-idle", "1s"]);
    let (status, _) = second.finish();
    let second_log = second.log();
    assert!(status.success(), "{second_log}");
    let after = called(&second.stderr());
    let seen: BTreeSet<String> = before.iter().chain(&after).cloned().collect();
    assert_eq!(
        seen, want,
        "first run:\n{first_log}\nsecond run:\n{second_log}"
    );
    // What the first run made durable is not called again: only its last
    // calls, those the kill caught before their outcome was committed (the
    // call under way, and those finished while a group commit was being
    // written), are repeated. The function's calls run one at a time, so
    // they are a tail of the first run's.
    let again: BTreeSet<&String> = after.iter().filter(|k| before.contains(k)).collect();
    if let Some(first_again) = before.iter().position(|k| again.contains(k)) {
        let tail: BTreeSet<&String> = before[first_again..].iter().collect();
        assert_eq!(
            again, tail,
            "an earlier, committed call was repeated\nfirst run:\n{first_log}\nsecond run:\n{second_log}"
        );
    }
}

/// `enabled = false` (Lambda's disabled event source mapping): `sluice run`
/// leaves the trigger alone, and runs it when it is named with `--trigger`;
/// an unknown name is a usage error that lists the triggers.
#[test]
fn a_disabled_trigger_runs_only_when_named() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "starting_position = \"earliest\"\nenabled = false",
    );
    std::fs::write(dir.path().join("in/a.txt"), "one\ntwo\n").unwrap();
    for (name, args, expected) in [
        ("all disabled", &[][..], "every trigger has enabled = false"),
        ("unknown", &["--trigger", "count"][..], "--trigger count: "),
    ] {
        let mut run = sluice(name, &pipeline, args);
        let (status, _) = run.finish();
        let log = run.log();
        assert_eq!(status.code(), Some(2), "{name}: {log}");
        assert!(
            log.contains(expected) && log.contains("count-objects-1"),
            "{name}: {log}"
        );
        assert!(called(&run.stderr()).is_empty(), "{log}");
    }
    let mut run = sluice(
        "named",
        &pipeline,
        &["--trigger", "count-objects-1", "--stop-when-idle", "1s"],
    );
    let (status, _) = run.finish();
    let log = run.log();
    assert!(status.success(), "{log}");
    assert_eq!(called(&run.stderr()), ["a.txt"], "{log}");
}

#[test]
fn a_folder_that_does_not_exist_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(dir.path(), "");
    // `sluice validate` lists the trigger (it does not look at the folder).
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.arg("validate").arg(&pipeline);
    let mut validate = Process::start("validate", command);
    let (status, out) = validate.finish();
    assert!(status.success(), "{}", validate.log());
    assert!(
        out.contains("trigger count-objects-1: objects under ") && out.contains("-> count"),
        "{out}"
    );
    std::fs::remove_dir(dir.path().join("in")).unwrap();
    let mut run = sluice("run", &pipeline, &[]);
    let (status, _) = run.finish();
    let log = run.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("cannot watch this folder") && log.contains("/in"),
        "{log}"
    );
    // `--produce` needs a Kafka trigger.
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let data = dir.path().join("r.jsonl");
    std::fs::write(&data, "{}\n").unwrap();
    let mut run = sluice(
        "produce",
        &pipeline,
        &["--produce", &format!("t={}", data.display())],
    );
    let (status, _) = run.finish();
    let log = run.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("no Kafka trigger of"), "{log}");
}

#[test]
fn a_failed_file_goes_to_the_dead_letter_file_and_retry_failed_calls_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "starting_position = \"earliest\"\nmax_retry_attempts = 1\nretry_backoff = \"1ms\"",
    );
    std::fs::write(dir.path().join("in/ok.txt"), "fine\n").unwrap();
    std::fs::write(dir.path().join("in/bad.bin"), b"\xff\xfe").unwrap();
    let dead = dir
        .path()
        .join(".sluice-state/count-objects-1.dead-letter.jsonl");
    for (round, args) in [
        (1, &["--stop-when-idle", "1s"][..]),
        (2, &["--stop-when-idle", "1s"][..]),
        (3, &["--stop-when-idle", "1s", "--retry-failed"][..]),
    ] {
        let mut run = sluice("run", &pipeline, args);
        let (status, _) = run.finish();
        let log = run.log();
        assert!(status.success(), "round {round}: {log}");
        let want_ok = if round == 1 { vec!["ok.txt"] } else { vec![] };
        assert_eq!(called(&run.stderr()), want_ok, "round {round}: {log}");
        let lines = std::fs::read_to_string(&dead).unwrap();
        // Round 2 calls nothing; round 3 calls bad.bin again.
        let want = if round == 3 { 2 } else { 1 };
        assert_eq!(lines.lines().count(), want, "round {round}: {lines}\n{log}");
        assert!(lines.contains("\"errorType\":\"NotText\""), "{lines}");
        assert!(lines.contains("\"attempts\":2"), "{lines}");
    }
}
