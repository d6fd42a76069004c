//! `sluice mapreduce PIPELINE JOB` as a user runs it.

use std::process::Command;

use sluice_test_support::{agent_binary, function_fixture};
use tempfile::TempDir;

#[test]
fn mapreduce_job_writes_part_files_and_names_bad_jobs() {
    let dir = TempDir::new().unwrap();
    let f = function_fixture("wordcount");
    std::fs::write(dir.path().join("in.txt"), "a b a\nB c\n\nA\n").unwrap();
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[functions.m]\npath = {p:?}\nhandler = \"map\"\n\n\
             [functions.r]\npath = {p:?}\nhandler = \"reduce\"\n\n\
             [job.wc]\nkind = \"mapreduce\"\nsource = \"in.txt\"\nmap = \"m\"\nreduce = \"r\"\n\
             reduce_partitions = 2\nmax_items_per_call = 2\noutput = \"out\"\n",
            p = f.dir.display().to_string()
        ),
    )
    .unwrap();
    let run = |job: &str| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .env("SLUICE_AGENT", agent_binary())
            .arg("mapreduce")
            .arg(&pipeline)
            .arg(job)
            .output()
            .unwrap()
    };
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
    assert_eq!(
        lines,
        [
            r#"{"key":"a","value":3}"#,
            r#"{"key":"b","value":2}"#,
            r#"{"key":"c","value":1}"#
        ]
    );

    let out = run("nope");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no job named \"nope\" with kind = \"mapreduce\"; MapReduce jobs: wc"),
        "{stderr}"
    );
}
