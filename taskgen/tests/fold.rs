//! Stateful backfills (`BackfillConfig::state`) streaming under a small
//! `max_buffered_items` budget, against the `running-sum` example function
//! in real sandboxes. With `KEEP_AMOUNTS=1` its state keeps every amount in
//! the order it folded them, so the checkpoint shows each key's order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{Executor, FunctionSpec};
use sluice_pipeline::{StateConfig, StateScope, StateStore, StateWindow};
use sluice_state_carrier::{FileStore, Store};
use sluice_taskgen::{BackfillConfig, Format, Hooks, OrderConfig, StateOptions, Summary};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture};
use tempfile::TempDir;

const KEYS: u64 = 50;

fn executor(f: &FunctionFixture) -> Executor {
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut s = FunctionSpec::new("sum", &f.dir);
    s.timeout = Duration::from_secs(20);
    s.concurrency = 4;
    s.env = vec![("KEEP_AMOUNTS".into(), "1".into())];
    ex.register(s);
    ex
}

/// `n` lines `{"key", "amount"}` (amount: the item's number), keys spread
/// unevenly, with an unreadable line after every 1000th item. Returns the
/// file and each key's amounts in input order.
fn write_input(dir: &Path, n: u64) -> (PathBuf, BTreeMap<String, Vec<i64>>) {
    let mut text = String::new();
    let mut direct: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut x: u64 = 12345;
    for i in 0..n {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        // Squaring a uniform draw makes the low keys more frequent.
        let r = (x >> 33) % 1000;
        let key = format!("k{}", r * r * KEYS / 1_000_000);
        direct.entry(key.clone()).or_default().push(i as i64);
        text.push_str(&json!({ "key": key, "amount": i }).to_string());
        text.push('\n');
        if i % 1000 == 999 {
            text.push_str("{not json\n");
        }
    }
    let path = dir.join("in.jsonl");
    std::fs::write(&path, text).unwrap();
    (path, direct)
}

fn config(
    dir: &Path,
    source: PathBuf,
    budget: usize,
    window: Option<StateWindow>,
) -> BackfillConfig {
    BackfillConfig {
        max_items_per_call: 10,
        max_concurrency: 4,
        max_buffered_items: budget,
        progress: dir.join("progress.redb"),
        dead_letter: dir.join("dead.jsonl"),
        max_attempts: 1,
        tolerated_failure_count: None,
        order: OrderConfig {
            order_key: Some("key".into()),
            ..OrderConfig::default()
        },
        state: Some(StateOptions {
            config: StateConfig {
                scope: StateScope::Key,
                window,
                max_bytes: 16 * 1024 * 1024,
                store: StateStore::Local(dir.join("state")),
            },
            source: "backfill/fold".into(),
            servers: String::new(),
        }),
        ..BackfillConfig::new("sum", vec![source], Format::Jsonl)
    }
}

/// Per key: (the kept amounts of the last closed window, windows closed).
fn results(dir: &Path) -> BTreeMap<String, (Vec<i64>, u64)> {
    let store = FileStore::open(&dir.join("state")).unwrap();
    let mut out = BTreeMap::new();
    for cp in store.list().unwrap() {
        for (k, ks) in cp.keys {
            assert!(ks.window.is_none(), "{k}: the end closes the window");
            let r = ks.last_result.expect("a closed window");
            let amounts = r["state"]["amounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_i64().unwrap())
                .collect();
            assert_eq!(
                r["count"].as_u64().unwrap() as usize,
                r["state"]["amounts"].as_array().unwrap().len()
            );
            out.insert(k, (amounts, ks.windows_closed));
        }
    }
    out
}

async fn backfill(ex: &Executor, cfg: BackfillConfig) -> Summary {
    sluice_taskgen::run(ex, cfg, Hooks::default(), std::future::pending())
        .await
        .unwrap()
}

fn dead_lettered(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("dead.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_streams_within_the_item_budget_and_keeps_each_keys_order() {
    let dir = TempDir::new().unwrap();
    let n = 3000;
    let (source, direct) = write_input(dir.path(), n);
    assert!(direct.len() > 40, "{} keys", direct.len());
    let f = function_fixture("running-sum");
    let ex = executor(&f);

    // One window per key, closed at the end: it holds all of the key's
    // amounts, in input order.
    let budget = 100;
    let s = backfill(&ex, config(dir.path(), source.clone(), budget, None)).await;
    // The unreadable lines count as failed items.
    assert_eq!((s.items_succeeded, s.items_failed), (n, 3), "{s:?}");
    assert_eq!(s.items_total, n + 3, "{s:?}");
    assert!(
        s.peak_buffered_items > 0 && s.peak_buffered_items <= budget as u64,
        "peak {} over the budget {budget}",
        s.peak_buffered_items
    );
    let got = results(dir.path());
    let want: BTreeMap<String, (Vec<i64>, u64)> = direct
        .iter()
        .map(|(k, v)| (k.clone(), (v.clone(), 1)))
        .collect();
    assert_eq!(got, want);
    assert_eq!(dead_lettered(dir.path()).len(), 3, "the unreadable lines");

    // A rerun skips every folded item and changes nothing.
    let s = backfill(&ex, config(dir.path(), source, budget, None)).await;
    assert_eq!((s.items_succeeded, s.items_skipped), (0, n), "{s:?}");
    assert_eq!(results(dir.path()), want);
    // The dead-letter file is kept, its unreadable lines not written twice.
    assert_eq!(s.earlier_failures, 3, "{s:?}");
    assert_eq!(dead_lettered(dir.path()).len(), 3, "the unreadable lines");

    // Count windows of 7 (not a multiple of the 10 items per call): the
    // same windows with the budget as without.
    let windowed = |budget| {
        let dir = TempDir::new().unwrap();
        let (source, _) = write_input(dir.path(), n);
        let cfg = config(dir.path(), source, budget, Some(StateWindow::Count(7)));
        (dir, cfg)
    };
    let (small_dir, small) = windowed(budget);
    let s = backfill(&ex, small).await;
    assert!(s.peak_buffered_items <= budget as u64, "{s:?}");
    let (big_dir, big) = windowed(1_000_000);
    let unbounded = backfill(&ex, big).await;
    // Without the budget's flushes, each call is cut as the whole input
    // would cut it.
    assert!(
        unbounded.calls_total <= s.calls_total,
        "{unbounded:?} {s:?}"
    );
    eprintln!(
        "{n} items, {} keys: {} calls within {budget} buffered items, {} without",
        direct.len(),
        s.calls_total,
        unbounded.calls_total
    );
    ex.shutdown().await;
    let small = results(small_dir.path());
    assert_eq!(small, results(big_dir.path()));
    for (k, v) in &direct {
        let windows = v.len().div_ceil(7);
        let last = &v[(windows - 1) * 7..];
        assert_eq!(small[k], (last.to_vec(), windows as u64), "{k}");
    }
}

/// A fold moves past a call that failed for good and never calls it again,
/// so a resumed run keeps the earlier runs' dead letters (and counts them)
/// instead of starting the file afresh as a stateless re-run does; a fold
/// from scratch (no checkpoint) starts it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_fold_keeps_the_failures_it_moved_past() {
    let dir = TempDir::new().unwrap();
    let (source, _) = write_input(dir.path(), 40);
    let f = function_fixture("fail");
    let ex = executor(&f);
    let mut cfg = config(dir.path(), source, 100, None);
    cfg.max_attempts = 2;

    let s = backfill(&ex, cfg.clone()).await;
    assert_eq!((s.items_succeeded, s.items_failed), (0, 40), "{s:?}");
    assert_eq!(s.calls_retried, s.calls_failed, "one retry per call: {s:?}");
    let first = dead_lettered(dir.path());
    assert_eq!(first.len() as u64, s.calls_failed);
    assert!(first.iter().all(|d| d["attempts"] == 2), "{first:?}");

    let s = backfill(&ex, cfg.clone()).await;
    assert_eq!((s.calls_total, s.items_skipped), (0, 40), "{s:?}");
    assert_eq!(s.earlier_failures, first.len() as u64, "{s:?}");
    assert_eq!(dead_lettered(dir.path()), first, "kept as they were");

    // Without its checkpoint the fold starts over, and so does the file.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let s = backfill(&ex, cfg).await;
    ex.shutdown().await;
    assert_eq!((s.items_failed, s.earlier_failures), (40, 0), "{s:?}");
    assert_eq!(dead_lettered(dir.path()).len(), first.len());
}

/// `max_items` on a stateful job: the fold sees only the first items, and
/// each key's state holds exactly its amounts among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_over_max_items_folds_only_the_first_items() {
    let dir = TempDir::new().unwrap();
    let (source, _) = write_input(dir.path(), 300);
    let f = function_fixture("running-sum");
    let ex = executor(&f);
    let mut cfg = config(dir.path(), source.clone(), 100, None);
    cfg.max_items = Some(120);
    let s = backfill(&ex, cfg).await;
    assert_eq!((s.items_succeeded, s.items_failed), (120, 0), "{s:?}");
    // The first 120 lines are amounts 0..120 (no unreadable line before
    // the 1000th).
    let text = std::fs::read_to_string(&source).unwrap();
    let mut want: BTreeMap<String, (Vec<i64>, u64)> = BTreeMap::new();
    for line in text.lines().take(120) {
        let v: Value = serde_json::from_str(line).unwrap();
        let e = want
            .entry(v["key"].as_str().unwrap().to_owned())
            .or_insert((Vec::new(), 1));
        e.0.push(v["amount"].as_i64().unwrap());
    }
    assert_eq!(results(dir.path()), want);
    ex.shutdown().await;
}

/// `batch_input` reaches a stateful job's calls too, the final invoke of
/// each window included: a Python handler keeps every `batch_input` it
/// sees in its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folds_calls_carry_the_batch_input() {
    let dir = TempDir::new().unwrap();
    let (source, direct) = write_input(dir.path(), 60);
    let f = function_fixture("python");
    std::fs::write(
        f.dir.join("seen.py"),
        "def handler(event, context):\n    seen = (event.get('state') or {}).get('seen', [])\n    \
         seen.append(event.get('batch_input'))\n    return {'state': {'seen': seen}}\n",
    )
    .unwrap();
    let ex = Executor::new(Arc::new(ProcessBackend::new(ProcessConfig::detect(
        agent_binary(),
    ))));
    let mut spec = FunctionSpec::new("sum", &f.dir);
    spec.handler = "seen.handler".into();
    spec.timeout = Duration::from_secs(20);
    ex.register(spec);
    let mut cfg = config(dir.path(), source, 100, None);
    cfg.batch_input = json!({"run": 7}).as_object().cloned();
    let s = backfill(&ex, cfg).await;
    assert_eq!(s.items_succeeded, 60, "{s:?}");
    let store = FileStore::open(&dir.path().join("state")).unwrap();
    let mut keys = 0;
    for cp in store.list().unwrap() {
        for (k, ks) in cp.keys {
            let r = ks.last_result.expect("a closed window");
            let seen = r["state"]["seen"].as_array().unwrap().clone();
            // The key's calls (10 items each) and its final invoke.
            let calls = direct[&k].len().div_ceil(10) + 1;
            assert_eq!(seen, vec![json!({"run": 7}); calls], "{k}: {r}");
            keys += 1;
        }
    }
    assert_eq!(keys, direct.len());
    ex.shutdown().await;
}
