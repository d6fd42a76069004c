//! `sluice bench state`: what carrying state costs.
//!
//! For each state size, in the same run and with the same function and
//! sandbox:
//! - **stateless**: calls of a one-record Kafka event (the baseline);
//! - **stateful**: the same event with the state fields, the response's
//!   state folded and the partition's checkpoint saved (fsync, rename)
//!   after every call, as a stateful trigger does;
//! - **checkpoint**: the save alone (its share of a stateful call);
//! - **recovery**: loading and verifying a partition's checkpoint holding
//!   100 keys of that state size (what a restarted or newly assigned node
//!   does before it processes anything).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_executor::LogLine;
use sluice_pipeline::{StateConfig, StateScope, StateStore};
use sluice_state_carrier::{Checkpoint, FileStore, Item, KeyState, Step, Store};

use crate::exit;

fn event(value: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
    format!(
        r#"{{"eventSource":"SelfManagedKafka","bootstrapServers":"bench","records":{{"bench-0":[{{"topic":"bench","partition":0,"offset":0,"timestamp":0,"timestampType":"CREATE_TIME","value":"{b64}","headers":[]}}]}}}}"#
    )
    .into_bytes()
}

/// Run the benchmark with `function` (the `running-sum` example) of
/// `pipeline`, `calls` calls per measurement.
pub async fn run(pipeline: &Path, function: &str, calls: usize) -> u8 {
    let (p, _) = match super::load_function(pipeline, function) {
        Ok(pf) => pf,
        Err(code) => return code,
    };
    let ex = match super::executor_for(&p, Arc::new(|_l: LogLine| {})) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            crate::log_error!("temporary folder: {e}");
            return exit::INVOKE_FAILED;
        }
    };
    let record = event(br#"{"amount": 3}"#);
    println!("sluice bench state: function {function}, {calls} calls per figure");
    println!(
        "{:>10} {:>14} {:>14} {:>8} {:>16} {:>22}",
        "state", "stateless/s", "stateful/s", "ratio", "checkpoint µs", "recovery (100 keys)"
    );
    for size in [1024usize, 100 * 1024] {
        let spec = StateConfig {
            scope: StateScope::Partition,
            window: None,
            max_bytes: 16 * 1024 * 1024,
            store: StateStore::Local(dir.path().join(format!("s{size}"))),
        };
        let store = match FileStore::open(&dir.path().join(format!("s{size}"))) {
            Ok(s) => s,
            Err(e) => {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
        };
        // Warm the sandbox.
        for _ in 0..20 {
            if let Err(e) = ex.invoke(function, record.clone()).await {
                crate::log_error!("invoke failed: {e}");
                return exit::INVOKE_FAILED;
            }
        }
        let t0 = Instant::now();
        for _ in 0..calls {
            if let Err(e) = ex.invoke(function, record.clone()).await {
                crate::log_error!("invoke failed: {e}");
                return exit::INVOKE_FAILED;
            }
        }
        let stateless = calls as f64 / t0.elapsed().as_secs_f64();

        let mut ks = KeyState {
            state: json!({ "sum": 0, "count": 0, "pad": "x".repeat(size) }),
            ..KeyState::default()
        };
        let mut cp = Checkpoint::new("bench/bench/0");
        let mut save_time = Duration::ZERO;
        let t0 = Instant::now();
        for i in 0..calls {
            let items = [Item {
                offset: i as i64,
                timestamp_ms: 0,
            }];
            let Step::Invoke { window, .. } = ks.step(&spec, &items) else {
                crate::log_error!("a window closed in a run without windows");
                return exit::INVOKE_FAILED;
            };
            let payload = ks.add_to_event(record.clone(), None, &window, false, false);
            let resp = match ex.invoke(function, payload).await {
                Ok(r) => r,
                Err(e) => {
                    crate::log_error!("invoke failed: {e}");
                    return exit::INVOKE_FAILED;
                }
            };
            if let Err(e) = ks.fold(&spec, window, &items, &resp.payload) {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
            cp.keys.insert(String::new(), ks.clone());
            cp.seq += 1;
            let s0 = Instant::now();
            if let Err(e) = store.save(&cp) {
                crate::log_error!("{e}");
                return exit::INVOKE_FAILED;
            }
            save_time += s0.elapsed();
        }
        let stateful = calls as f64 / t0.elapsed().as_secs_f64();
        if ks.state["count"] != json!(calls) {
            crate::log_error!("the state lost calls: {}", ks.state["count"]);
            return exit::INVOKE_FAILED;
        }

        // Recovery: a checkpoint of 100 such keys, loaded and verified.
        let mut big = Checkpoint::new("bench/bench/1");
        for k in 0..100 {
            big.keys.insert(format!("key-{k}"), ks.clone());
        }
        if let Err(e) = store.save(&big) {
            crate::log_error!("{e}");
            return exit::INVOKE_FAILED;
        }
        let t0 = Instant::now();
        let rounds = 5;
        for _ in 0..rounds {
            match store.load("bench/bench/1") {
                Ok(Some(c)) if c.keys.len() == 100 => {}
                other => {
                    crate::log_error!("recovery read back {other:?}");
                    return exit::INVOKE_FAILED;
                }
            }
        }
        let recovery = t0.elapsed() / rounds;
        println!(
            "{:>8}KiB {:>14.0} {:>14.0} {:>8.2} {:>16.0} {:>15.1?} ({:.1} MB)",
            size / 1024,
            stateless,
            stateful,
            stateful / stateless,
            save_time.as_micros() as f64 / calls as f64,
            recovery,
            big.encode().len() as f64 / 1e6,
        );
    }
    ex.shutdown().await;
    exit::OK
}
