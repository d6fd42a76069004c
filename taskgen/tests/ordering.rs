//! Order keys and dependencies (`sluice_taskgen::OrderConfig`) against real
//! sandboxes, with 16 calls in flight. The order is observed through the
//! response hook (called when a call has succeeded and been recorded); the
//! function sleeps as long as an item's `ms` field says, so that calls run
//! in parallel would finish out of order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec, Response};
use sluice_taskgen::{BackfillConfig, BackfillError, Format, Hooks, LevelPlan, OrderConfig};
use sluice_test_support::{FunctionFixture, agent_binary, script_fixture};
use tempfile::TempDir;

/// A bash runtime: sleeps `ms` (the last `"ms":N` of the event), fails when
/// the event holds `"fail":true`, else returns the event.
const SLOW_ECHO: &str = r#"#!/bin/bash
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  curl -sS -D /tmp/headers -o /tmp/event "$API/invocation/next" || exit 1
  ID=
  while IFS= read -r line; do
    line=${line%$'\r'}
    if [[ ${line,,} == lambda-runtime-aws-request-id:* ]]; then
      ID=${line#*:}
      ID=${ID// /}
    fi
  done </tmp/headers
  event=$(</tmp/event)
  if [[ $event =~ \"ms\":([0-9]+) ]]; then
    sleep "$(printf '0.%03d' "${BASH_REMATCH[1]}")"
  fi
  if [[ $event == *'"fail":true'* ]]; then
    curl -sS -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Test.Failed' \
      --data-binary '{"errorType":"Test.Failed","errorMessage":"asked to fail"}' \
      "$API/invocation/$ID/error"
  else
    curl -sS -o /dev/null -X POST --data-binary @/tmp/event "$API/invocation/$ID/response"
  fi
done
"#;

fn executor(f: &FunctionFixture) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut s = FunctionSpec::new("slow", &f.dir);
    s.timeout = Duration::from_secs(20);
    s.concurrency = 16;
    ex.register(s);
    ex
}

fn config(
    dir: &Path,
    sources: Vec<PathBuf>,
    per_call: usize,
    order: OrderConfig,
) -> BackfillConfig {
    BackfillConfig {
        max_items_per_call: per_call,
        max_concurrency: 16,
        progress: dir.join("progress.redb"),
        dead_letter: dir.join("dead.jsonl"),
        max_attempts: 1,
        tolerated_failure_count: None,
        order,
        ..BackfillConfig::new("slow", sources, Format::Jsonl)
    }
}

/// Completed calls in the order they completed: (call id, event received).
type Completed = Arc<Mutex<Vec<(String, Value)>>>;

fn recorder() -> (Hooks, Completed) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&got);
    let hooks = Hooks {
        on_response: Some(Arc::new(move |id: &str, r: &Response| {
            let v: Value = serde_json::from_slice(&r.payload).expect("the function echoes JSON");
            sink.lock().unwrap().push((id.to_owned(), v));
        })),
        on_tick: None,
    };
    (hooks, got)
}

/// Items in the order their calls completed.
fn items_in_order(got: &Completed) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|(_, v)| v["items"].as_array().unwrap().clone())
        .collect()
}

fn write_jsonl(dir: &Path, name: &str, items: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = items.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn never() -> std::future::Pending<()> {
    std::future::pending()
}

fn keyed() -> OrderConfig {
    OrderConfig {
        order_key: Some("user".into()),
        ..OrderConfig::default()
    }
}

fn with_deps() -> OrderConfig {
    OrderConfig {
        order_key: None,
        id_column: Some("id".into()),
        depends_on_column: Some("after".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_items_run_one_after_another_and_keys_in_parallel() {
    let dir = TempDir::new().unwrap();
    // 4 users × 6 events, interleaved over two files; earlier events of a
    // user take longer, so running them in parallel would reorder them.
    let users = ["ann", "bob", "cyd", "dan"];
    let mut first = Vec::new();
    let mut second = Vec::new();
    for seq in 0..6u64 {
        for u in users {
            let item = json!({"user": u, "seq": seq, "ms": 20 + (5 - seq) * 25});
            if seq < 3 { &mut first } else { &mut second }.push(item);
        }
    }
    let sources = vec![
        write_jsonl(dir.path(), "a.jsonl", &first),
        write_jsonl(dir.path(), "b.jsonl", &second),
    ];
    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let cfg = config(dir.path(), sources.clone(), 1, keyed());
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    assert_eq!(
        (s.calls_total, s.calls_succeeded, s.calls_failed),
        (24, 24, 0)
    );
    assert_eq!((s.items_succeeded, s.items_without_order_key), (24, 0));

    let done = items_in_order(&got);
    assert_eq!(done.len(), 24);
    for u in users {
        let seqs: Vec<u64> = done
            .iter()
            .filter(|i| i["user"] == u)
            .map(|i| i["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (0..6).collect::<Vec<_>>(), "order of {u}: {done:?}");
    }
    // Keys ran side by side: the first four completions are not all one user.
    let first_users: std::collections::HashSet<_> =
        done[..4].iter().map(|i| i["user"].clone()).collect();
    assert!(
        first_users.len() > 1,
        "keys ran one after another: {done:?}"
    );
    // The payload says which key a call is for.
    for (_, v) in got.lock().unwrap().iter() {
        assert_eq!(v["batch"]["key"], v["items"][0]["user"]);
    }

    // Same input, same settings: same call ids, so a second run skips all.
    let (hooks, again) = recorder();
    let cfg = config(dir.path(), sources, 1, keyed());
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!(
        (s.calls_total, s.calls_skipped, s.calls_succeeded),
        (24, 24, 0)
    );
    assert!(again.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_run_after_their_dependencies_and_not_after_a_failed_one() {
    let dir = TempDir::new().unwrap();
    // Dependencies are slow and listed after their dependents.
    let items = vec![
        json!({"id": "report", "after": ["sum-a", "sum-b"], "ms": 0}),
        json!({"id": "sum-a", "after": "load-a", "ms": 10}),
        json!({"id": "sum-b", "after": "load-b", "ms": 10}),
        json!({"id": "load-a", "after": null, "ms": 250}),
        json!({"id": "load-b", "after": "", "ms": 200}),
        json!({"id": "solo", "ms": 0}),
        // A failing branch: its dependents are not called.
        json!({"id": "broken", "fail": true}),
        json!({"id": "child", "after": "broken"}),
        json!({"id": "grandchild", "after": ["child", "load-a"]}),
    ];
    let first = write_jsonl(dir.path(), "a.jsonl", &items[..5]);
    let second = write_jsonl(dir.path(), "b.jsonl", &items[5..]);
    let sources = vec![first, second];

    let levels =
        sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(1), &with_deps())
            .await
            .unwrap();
    let level = |level, items, calls| LevelPlan {
        level,
        items,
        calls,
        keys: 0,
        unkeyed: 0,
    };
    assert_eq!(
        levels,
        vec![level(0, 4, 4), level(1, 3, 3), level(2, 2, 2)],
        "{levels:?}"
    );

    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let cfg = config(dir.path(), sources, 1, with_deps());
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!(
        (s.calls_total, s.calls_succeeded, s.calls_failed),
        (9, 6, 3)
    );
    assert_eq!((s.items_succeeded, s.items_failed), (6, 3));

    let done: Vec<String> = items_in_order(&got)
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    let at = |id: &str| {
        done.iter()
            .position(|d| d == id)
            .unwrap_or_else(|| panic!("{id} did not run: {done:?}"))
    };
    assert!(at("load-a") < at("sum-a"), "{done:?}");
    assert!(at("load-b") < at("sum-b"), "{done:?}");
    assert!(
        at("sum-a") < at("report") && at("sum-b") < at("report"),
        "{done:?}"
    );
    assert_eq!(done.len(), 6, "{done:?}");
    for (_, v) in got.lock().unwrap().iter() {
        let want = match v["items"][0]["id"].as_str().unwrap() {
            "report" => 2,
            "sum-a" | "sum-b" => 1,
            _ => 0,
        };
        assert_eq!(v["batch"]["level"], want, "{v}");
    }

    let dead: Vec<Value> = std::fs::read_to_string(dir.path().join("dead.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kind = |id: &str| {
        dead.iter()
            .find(|d| d["items"][0]["id"] == id)
            .map(|d| d["error_type"].as_str().unwrap().to_owned())
    };
    assert_eq!(kind("broken").as_deref(), Some("Test.Failed"), "{dead:?}");
    assert_eq!(kind("child").as_deref(), Some("Sluice.DependencyFailed"));
    assert_eq!(
        kind("grandchild").as_deref(),
        Some("Sluice.DependencyFailed")
    );
    assert_eq!(dead.len(), 3, "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_is_reported_before_any_call() {
    let dir = TempDir::new().unwrap();
    let items = vec![
        json!({"id": "free"}),
        json!({"id": "a", "after": "c"}),
        json!({"id": "b", "after": ["a"]}),
        json!({"id": "c", "after": "b"}),
    ];
    let sources = vec![write_jsonl(dir.path(), "jobs.jsonl", &items)];
    let err = sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(1), &with_deps())
        .await
        .unwrap_err();
    assert!(matches!(err, BackfillError::Dependencies(_)), "{err:?}");

    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let cfg = config(dir.path(), sources, 1, with_deps());
    let err = sluice_taskgen::run(&ex, cfg, hooks, never())
        .await
        .unwrap_err();
    ex.shutdown().await;
    let msg = err.to_string();
    assert!(msg.contains("cycle"), "{msg}");
    for place in [
        "a (",
        "b (",
        "c (",
        "jobs.jsonl:2",
        "jobs.jsonl:3",
        "jobs.jsonl:4",
    ] {
        assert!(msg.contains(place), "{place} missing from {msg}");
    }
    assert!(!msg.contains("free"), "{msg}");
    assert!(got.lock().unwrap().is_empty(), "a call ran");
    assert!(!dir.path().join("dead.jsonl").exists());
}

/// An ordering option that names a column a CSV or Parquet file lacks (a
/// misspelt name), or one left out of the chosen columns, would order
/// nothing: the dry run and the run refuse it before any call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordering_column_missing_from_a_file_is_reported_before_any_call() {
    use std::sync::Arc as A;

    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use parquet::arrow::ArrowWriter;

    let dir = TempDir::new().unwrap();
    let csv = dir.path().join("jobs.csv");
    std::fs::write(&csv, "id,user\n1,ann\n2,bo\n").unwrap();
    let parquet = dir.path().join("jobs.parquet");
    let batch = RecordBatch::try_from_iter([
        ("id", A::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        (
            "user",
            A::new(StringArray::from(vec!["ann", "bo"])) as ArrayRef,
        ),
    ])
    .unwrap();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&parquet).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();

    let typo = OrderConfig {
        order_key: Some("usr".into()),
        ..OrderConfig::default()
    };
    let dep_typo = OrderConfig {
        order_key: Some("user".into()),
        id_column: Some("id".into()),
        depends_on_column: Some("after".into()),
    };
    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    for (file, format) in [(&csv, Format::Csv), (&parquet, Format::Parquet)] {
        for (order, option, column) in [
            (&typo, "order_key", "usr"),
            (&dep_typo, "depends_on_column", "after"),
        ] {
            let sources = vec![file.clone()];
            let want = format!(
                "{option} \"{column}\": {} has no such column (columns: id, user)",
                file.display()
            );
            let err = sluice_taskgen::plan_levels(&sources, &format.into(), limits(1), order)
                .await
                .unwrap_err();
            assert!(
                matches!(err, BackfillError::OrderColumnMissing { .. }),
                "{err:?}"
            );
            assert_eq!(err.to_string(), want);
            let mut cfg = config(dir.path(), sources, 1, order.clone());
            cfg.input.format = format;
            let err = sluice_taskgen::run(&ex, cfg, hooks.clone(), never())
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), want);
        }
    }
    // The key exists, but the chosen columns leave it out of the items.
    let mut cfg = config(dir.path(), vec![csv.clone()], 1, keyed());
    cfg.input.format = Format::Csv;
    cfg.input.columns = Some(vec!["id".into()]);
    let err = sluice_taskgen::run(&ex, cfg, hooks, never())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid option: order_key \"user\" is not among the chosen columns (id): the items would not carry it"
    );
    assert!(got.lock().unwrap().is_empty(), "a call ran");

    // JSON lines are not checked before the run (their items may differ):
    // the summary counts the items without a key (no field, an empty one).
    let dir = TempDir::new().unwrap();
    let items = [
        json!({"user": "ann"}),
        json!({"usr": "bo"}),
        json!({"user": ""}),
        json!({"user": "ann"}),
    ];
    let sources = vec![write_jsonl(dir.path(), "mixed.jsonl", &items)];
    let levels = sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(1), &keyed())
        .await
        .unwrap();
    assert_eq!((levels[0].keys, levels[0].unkeyed), (1, 2), "{levels:?}");
    let (hooks, _) = recorder();
    let s = sluice_taskgen::run(&ex, config(dir.path(), sources, 1, keyed()), hooks, never())
        .await
        .unwrap();
    ex.shutdown().await;
    assert_eq!((s.items_succeeded, s.items_without_order_key), (4, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dependency_or_duplicate_id_is_reported_before_any_call() {
    let dir = TempDir::new().unwrap();
    let items = vec![json!({"id": 1}), json!({"id": 2, "after": [1, 7]})];
    let sources = vec![write_jsonl(dir.path(), "jobs.jsonl", &items)];
    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let cfg = config(dir.path(), sources.clone(), 1, with_deps());
    let err = sluice_taskgen::run(&ex, cfg, hooks.clone(), never())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("missing id \"7\""), "{msg}");
    assert!(msg.contains("jobs.jsonl:2"), "{msg}");
    assert!(!msg.contains("misspelt"), "{msg}");
    assert!(got.lock().unwrap().is_empty(), "a call ran");
    // No item has the id column at all: the message says so.
    let misspelt = OrderConfig {
        id_column: Some("ident".into()),
        ..with_deps()
    };
    let err = sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(1), &misspelt)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no item has a value for id_column \"ident\" (a misspelt name?)"),
        "{err}"
    );

    let dup = vec![json!({"id": "x"}), json!({"id": "y"}), json!({"id": "x"})];
    let sources = vec![write_jsonl(dir.path(), "dup.jsonl", &dup)];
    let cfg = config(dir.path(), sources, 1, with_deps());
    let err = sluice_taskgen::run(&ex, cfg, hooks, never())
        .await
        .unwrap_err();
    ex.shutdown().await;
    let msg = err.to_string();
    assert!(
        msg.contains("duplicate id \"x\"")
            && msg.contains("dup.jsonl:1")
            && msg.contains("dup.jsonl:3"),
        "{msg}"
    );
    assert!(got.lock().unwrap().is_empty(), "a call ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_never_mix_keys_or_levels() {
    let dir = TempDir::new().unwrap();
    let mut items = Vec::new();
    for n in 0..10u64 {
        let user = if n % 3 == 0 { "ann" } else { "bob" };
        let after = if n >= 5 { json!(n - 5) } else { Value::Null };
        items.push(json!({"id": n, "after": after, "user": user}));
    }
    let sources = vec![write_jsonl(dir.path(), "mix.jsonl", &items)];
    let order = OrderConfig {
        order_key: Some("user".into()),
        ..with_deps()
    };
    let levels = sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(4), &order)
        .await
        .unwrap();
    // Level 0: ids 0..5 (ann: 0, 3; bob: 1, 2, 4); level 1: ids 5..10
    // (ann: 6, 9; bob: 5, 7, 8).
    let want = |level| LevelPlan {
        level,
        items: 5,
        calls: 2,
        keys: 2,
        unkeyed: 0,
    };
    assert_eq!(levels, vec![want(0), want(1)]);

    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let cfg = config(dir.path(), sources, 4, order);
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!((s.calls_total, s.calls_succeeded), (4, 4));
    let got = got.lock().unwrap();
    for (_, v) in got.iter() {
        let items = v["items"].as_array().unwrap();
        assert!(items.iter().all(|i| i["user"] == v["batch"]["key"]), "{v}");
    }
    // Each user's level-0 call completed before its level-1 call.
    let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    for (_, v) in got.iter() {
        if v["batch"]["level"] == 1 {
            let key = &v["batch"]["key"];
            let me = got.iter().position(|(_, w)| w == v).unwrap();
            let before = got
                .iter()
                .position(|(_, w)| w["batch"]["level"] == 0 && &w["batch"]["key"] == key)
                .unwrap();
            assert!(before < me, "{ids:?}");
        }
    }
}

/// At most `items` items per call, no byte limit.
fn limits(items: usize) -> sluice_taskgen::Limits {
    sluice_taskgen::Limits {
        items,
        bytes: usize::MAX,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_start_after_the_files_they_depend_on_succeeded() {
    use sluice_taskgen::FileDependency;
    let dir = TempDir::new().unwrap();
    // a.jsonl's calls are slow: were c.jsonl not waiting, it would finish first.
    let a = write_jsonl(
        dir.path(),
        "a.jsonl",
        &vec![json!({"f": "a", "ms": 300}); 4],
    );
    let b = write_jsonl(
        dir.path(),
        "b.jsonl",
        &vec![json!({"f": "b", "ms": 100}); 4],
    );
    let c = write_jsonl(dir.path(), "c.jsonl", &vec![json!({"f": "c"}); 4]);
    let f = script_fixture(SLOW_ECHO);
    let ex = executor(&f);
    let (hooks, got) = recorder();
    let mut cfg = config(
        dir.path(),
        vec![c.clone(), a.clone(), b.clone()],
        1,
        OrderConfig::default(),
    );
    cfg.file_dependencies = vec![FileDependency {
        files: "c.jsonl".into(),
        after: vec!["a.jsonl".into(), "b.jsonl".into()],
    }];
    let (levels, _) = sluice_taskgen::file_levels(&cfg.sources, &cfg.file_dependencies).unwrap();
    assert_eq!(levels, vec![vec![a.clone(), b.clone()], vec![c.clone()]]);
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert_eq!(s.items_succeeded, 12);
    let order: Vec<String> = items_in_order(&got)
        .iter()
        .map(|v| v["f"].as_str().unwrap().to_owned())
        .collect();
    let first_c = order.iter().position(|f| f == "c").unwrap();
    assert!(
        order[..first_c].iter().filter(|f| *f != "c").count() == 8,
        "c started before a and b finished: {order:?}"
    );

    // A failed call in a.jsonl: c.jsonl is not called, b.jsonl is.
    let a = write_jsonl(
        dir.path(),
        "a.jsonl",
        &[json!({"f": "a"}), json!({"f": "a", "fail": true})],
    );
    let (hooks, got) = recorder();
    cfg.sources = vec![c, a, b];
    cfg.progress = dir.path().join("p2.redb");
    cfg.dead_letter = dir.path().join("dead2.jsonl");
    let s = sluice_taskgen::run(&ex, cfg.clone(), hooks, never())
        .await
        .unwrap();
    assert_eq!((s.items_succeeded, s.items_failed), (5, 5));
    assert!(items_in_order(&got).iter().all(|v| v["f"] != "c"));
    let dead: Vec<Value> = std::fs::read_to_string(&cfg.dead_letter)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let blocked: Vec<&Value> = dead
        .iter()
        .filter(|d| d["error_type"] == "Sluice.DependencyFailed")
        .collect();
    assert_eq!(blocked.len(), 4, "{dead:?}");
    assert!(
        blocked[0]["error"]
            .as_str()
            .unwrap()
            .contains("a.jsonl it waits for failed"),
        "{}",
        blocked[0]
    );

    // Cycles and patterns matching nothing are refused before any call.
    cfg.file_dependencies = vec![
        FileDependency {
            files: "a.jsonl".into(),
            after: vec!["c.jsonl".into()],
        },
        FileDependency {
            files: "c.jsonl".into(),
            after: vec!["a.jsonl".into()],
        },
    ];
    cfg.progress = dir.path().join("p3.redb");
    let e = sluice_taskgen::run(&ex, cfg.clone(), Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("file dependencies form a cycle among"),
        "{e}"
    );
    cfg.file_dependencies = vec![FileDependency {
        files: "z*.jsonl".into(),
        after: vec!["a.jsonl".into()],
    }];
    let e = sluice_taskgen::run(&ex, cfg, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("\"z*.jsonl\" matches none of the sources"),
        "{e}"
    );
    ex.shutdown().await;
}

/// The echo example function (fast: thousands of calls) as `echo`.
fn echo_executor(f: &FunctionFixture) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut s = FunctionSpec::new("echo", &f.dir);
    s.timeout = Duration::from_secs(20);
    s.concurrency = 16;
    ex.register(s);
    ex
}

/// `n` items `{"user", "seq"}` over `keys` users, unevenly spread (some
/// users are far more frequent), `seq` counting each user's items.
fn keyed_items(n: usize, keys: usize) -> Vec<Value> {
    let mut seq = vec![0u64; keys];
    (0..n)
        .map(|i| {
            // Squaring skews the spread; the mix of i keeps it irregular.
            let r = (i.wrapping_mul(2_654_435_761) >> 7) % (keys * keys);
            let k = (r as f64).sqrt() as usize % keys;
            seq[k] += 1;
            json!({"user": format!("u{k}"), "seq": seq[k] - 1})
        })
        .collect()
}

/// Per user, the `seq` of the items in the order their calls completed.
fn seqs_by_user(items: &[Value]) -> std::collections::HashMap<String, Vec<u64>> {
    let mut by: std::collections::HashMap<String, Vec<u64>> = std::collections::HashMap::new();
    for i in items {
        by.entry(i["user"].as_str().unwrap().to_owned())
            .or_default()
            .push(i["seq"].as_u64().unwrap());
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_keyed_input_keeps_each_keys_order_within_the_item_budget() {
    let dir = TempDir::new().unwrap();
    let (n, keys, budget) = (200_000, 300, 10_000);
    let items = keyed_items(n, keys);
    // Two files: a key's items continue from one file into the next.
    let sources = vec![
        write_jsonl(dir.path(), "a.jsonl", &items[..n / 2]),
        write_jsonl(dir.path(), "b.jsonl", &items[n / 2..]),
    ];
    let mut cfg = config(dir.path(), sources.clone(), 100, keyed());
    cfg.function = "echo".into();
    cfg.max_buffered_items = budget;
    // 300 keys × up to 99 items in partial calls exceed the budget: some
    // calls are cut short, and the plan (no call made) agrees with the run.
    let plan = sluice_taskgen::plan_order(
        &sources,
        &Format::Jsonl.into(),
        limits(100),
        &keyed(),
        budget,
    )
    .await
    .unwrap();
    assert_eq!(plan.len(), 1);
    assert_eq!((plan[0].items, plan[0].keys), (n as u64, keys as u64));
    assert!(plan[0].calls > (n / 100) as u64, "{plan:?}");

    let f = sluice_test_support::function_fixture("echo");
    let ex = echo_executor(&f);
    let (hooks, got) = recorder();
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!(
        (s.calls_total, s.calls_succeeded, s.calls_failed),
        (plan[0].calls, plan[0].calls, 0),
        "{s:?}"
    );
    assert_eq!(s.items_succeeded, n as u64);
    eprintln!(
        "{n} items, {keys} keys: {} calls, peak {} buffered items of {budget}",
        s.calls_total, s.peak_buffered_items
    );
    assert!(
        s.peak_buffered_items > 0 && s.peak_buffered_items <= budget as u64,
        "peak {} over the budget {budget}",
        s.peak_buffered_items
    );
    let done = items_in_order(&got);
    assert_eq!(done.len(), n);
    let by = seqs_by_user(&done);
    assert_eq!(by.len(), keys);
    for (user, seqs) in &by {
        assert!(
            seqs.iter().enumerate().all(|(i, &s)| s == i as u64),
            "{user} out of order: {seqs:?}"
        );
    }
    for (_, v) in got.lock().unwrap().iter() {
        let items = v["items"].as_array().unwrap();
        assert!(items.iter().all(|i| i["user"] == v["batch"]["key"]), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_keyed_backfill_resumes_in_order() {
    let dir = TempDir::new().unwrap();
    let (n, keys, budget) = (20_000, 50, 1_000);
    let items = keyed_items(n, keys);
    let sources = vec![write_jsonl(dir.path(), "in.jsonl", &items)];
    let mut cfg = config(dir.path(), sources.clone(), 10, keyed());
    cfg.function = "echo".into();
    cfg.max_buffered_items = budget;
    let f = sluice_test_support::function_fixture("echo");
    let ex = echo_executor(&f);

    // Run 1: interrupted through the shutdown future after 200 calls.
    let (mut hooks, got1) = recorder();
    let inner = hooks.on_response.take().unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let (count, notify) = (Arc::new(Mutex::new(0)), Arc::clone(&stop));
    hooks.on_response = Some(Arc::new(move |id: &str, r: &Response| {
        inner(id, r);
        let mut c = count.lock().unwrap();
        *c += 1;
        if *c == 200 {
            notify.notify_one();
        }
    }));
    let stopped = Arc::clone(&stop);
    let s1 = sluice_taskgen::run(&ex, cfg.clone(), hooks, async move {
        stopped.notified().await;
    })
    .await
    .unwrap();
    assert!(s1.interrupted, "{s1:?}");
    assert!(s1.items_succeeded < n as u64, "{s1:?}");
    assert!(s1.peak_buffered_items <= budget as u64, "{s1:?}");

    // Another budget would cut other calls: refused.
    let mut other = cfg.clone();
    other.max_buffered_items = budget + 1;
    let e = sluice_taskgen::run(&ex, other, Hooks::default(), never())
        .await
        .unwrap_err();
    assert!(matches!(e, BackfillError::ProgressLayout { .. }), "{e:?}");

    // Run 2: the rest; the calls of run 1 are skipped by id.
    let (hooks, got2) = recorder();
    let s2 = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert!(!s2.interrupted);
    assert_eq!(s2.calls_skipped, s1.calls_succeeded, "{s1:?} {s2:?}");
    assert_eq!(s2.items_skipped + s2.items_succeeded, n as u64, "{s2:?}");
    assert!(s2.peak_buffered_items <= budget as u64, "{s2:?}");

    // Per key, run 1 did a prefix and run 2 the rest, each in order.
    let first = seqs_by_user(&items_in_order(&got1));
    let second = seqs_by_user(&items_in_order(&got2));
    let total = seqs_by_user(&items);
    for (user, all) in &total {
        let mut seen = first.get(user).cloned().unwrap_or_default();
        seen.extend(second.get(user).cloned().unwrap_or_default());
        assert_eq!(&seen, all, "{user}: run 1 then run 2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_level_input_runs_level_by_level_as_before() {
    let dir = TempDir::new().unwrap();
    // 600 items over two files; item i depends on up to two earlier or
    // later items, which makes about six levels.
    let n = 600u64;
    let deps_of = |i: u64| -> Vec<u64> {
        let mut d = Vec::new();
        if !i.is_multiple_of(5) {
            d.push((i * 7 + 3) % n);
        }
        if i.is_multiple_of(3) && i > 0 {
            d.push(i - 1);
        }
        d
    };
    // Levels as the test computes them, keeping the graph acyclic by
    // dropping dependencies on items that are not "earlier" in the order
    // (i + 300) % n.
    let rank = |i: u64| (i + 300) % n;
    let deps: Vec<Vec<u64>> = (0..n)
        .map(|i| {
            deps_of(i)
                .into_iter()
                .filter(|&j| rank(j) < rank(i))
                .collect()
        })
        .collect();
    let mut by_rank: Vec<u64> = (0..n).collect();
    by_rank.sort_by_key(|&i| rank(i));
    let mut level = vec![0u64; n as usize];
    for &i in &by_rank {
        level[i as usize] = deps[i as usize]
            .iter()
            .map(|&j| level[j as usize] + 1)
            .max()
            .unwrap_or(0);
    }
    let items: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "id": format!("i{i}"),
                "after": deps[i as usize].iter().map(|j| format!("i{j}")).collect::<Vec<_>>(),
                "user": format!("u{}", i % 7),
            })
        })
        .collect();
    let half = (n / 2) as usize;
    let sources = vec![
        write_jsonl(dir.path(), "a.jsonl", &items[..half]),
        write_jsonl(dir.path(), "b.jsonl", &items[half..]),
    ];
    let order = OrderConfig {
        order_key: Some("user".into()),
        ..with_deps()
    };
    // Calls as before: per (level, key), in file/row order, 4 items each.
    let mut groups: std::collections::BTreeMap<(u64, u64), Vec<u64>> = Default::default();
    for i in 0..n {
        groups
            .entry((level[i as usize], i % 7))
            .or_default()
            .push(i);
    }
    let mut want_ids = std::collections::BTreeSet::new();
    for ((lvl, _), members) in &groups {
        for chunk in members.chunks(4) {
            let (file, row) = if chunk[0] < n / 2 {
                (&sources[0], chunk[0])
            } else {
                (&sources[1], chunk[0] - n / 2)
            };
            want_ids.insert(format!(
                "{}#{row}@L{lvl}n{}k=user",
                file.display(),
                chunk.len()
            ));
        }
    }
    let levels = level.iter().max().unwrap() + 1;
    assert!(levels >= 4, "a multi-level input: {levels} levels");
    let plan = sluice_taskgen::plan_levels(&sources, &Format::Jsonl.into(), limits(4), &order)
        .await
        .unwrap();
    assert_eq!(plan.len() as u64, levels);
    assert_eq!(
        plan.iter().map(|l| l.calls).sum::<u64>(),
        want_ids.len() as u64
    );

    let f = sluice_test_support::function_fixture("echo");
    let ex = echo_executor(&f);
    let (hooks, got) = recorder();
    let mut cfg = config(dir.path(), sources.clone(), 4, order.clone());
    cfg.function = "echo".into();
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    assert_eq!((s.items_succeeded, s.calls_failed), (n, 0), "{s:?}");
    let got_ids: std::collections::BTreeSet<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(got_ids, want_ids);
    // Each item ran after every item it depends on, at its level.
    let done = items_in_order(&got);
    let at: std::collections::HashMap<String, usize> = got
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .flat_map(|(c, (_, v))| {
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |i| (i["id"].as_str().unwrap().to_owned(), c))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(done.len() as u64, n);
    for i in 0..n {
        for j in &deps[i as usize] {
            assert!(
                at[&format!("i{j}")] < at[&format!("i{i}")],
                "i{i} ran before i{j}"
            );
        }
    }
    for (_, v) in got.lock().unwrap().iter() {
        let lvl = v["batch"]["level"].as_u64().unwrap();
        for i in v["items"].as_array().unwrap() {
            let id: u64 = i["id"].as_str().unwrap()[1..].parse().unwrap();
            assert_eq!(level[id as usize], lvl, "{i}");
        }
    }

    // A budget of 50 items: smaller calls, same order guarantees, and the
    // scheduler never holds more than 50 items.
    let (hooks, got) = recorder();
    let mut cfg = config(dir.path(), sources, 4, order);
    cfg.function = "echo".into();
    cfg.max_buffered_items = 50;
    cfg.progress = dir.path().join("small.redb");
    let s = sluice_taskgen::run(&ex, cfg, hooks, never()).await.unwrap();
    ex.shutdown().await;
    assert_eq!((s.items_succeeded, s.calls_failed), (n, 0), "{s:?}");
    assert!(s.peak_buffered_items <= 50, "{s:?}");
    let at: std::collections::HashMap<String, usize> = got
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .flat_map(|(c, (_, v))| {
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |i| (i["id"].as_str().unwrap().to_owned(), c))
                .collect::<Vec<_>>()
        })
        .collect();
    for i in 0..n {
        for j in &deps[i as usize] {
            assert!(
                at[&format!("i{j}")] < at[&format!("i{i}")],
                "i{i} ran before i{j}"
            );
        }
    }
}
