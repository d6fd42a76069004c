//! Warm pools against real sandboxes: background refill to `min_warm`, idle
//! reaping, the `max_warm` bound, pre-warming ahead of periodic bursts and
//! invalidation on a function update. Time is a [`ManualClock`] driven by
//! the test; maintenance steps are run explicitly (or by the background task
//! when that is what is tested) and the tests wait on pool changes, never on
//! wall-clock time. The calls of a burst meet at a barrier in front of their
//! sandboxes ([`Gate`]), so they overlap however loaded the machine is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sluice_executor::process::{ProcessBackend, ProcessConfig};
use sluice_executor::{
    Backend, Clock, Executor, FunctionSpec, FunctionStats, Invocation, InvokeError, LogLine,
    LogSink, ManualClock, PoolConfig, Response, Sandbox,
};
use sluice_test_support::{FunctionFixture, agent_binary, function_fixture, script_fixture};
use tokio::sync::{Barrier, watch};

/// Upper bound on waiting for a pool condition: a hang guard, not a timing
/// assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// While set, every invocation waits here before it reaches its sandbox, so
/// the calls of a burst all hold a sandbox at once. Without it, on a loaded
/// machine, the first call of a burst can be answered before the second one
/// takes a sandbox, and the second then (rightly) reuses the first one's:
/// not the burst the test means.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<Option<Arc<Barrier>>>>);

impl Gate {
    /// Run `calls` (`n` invocations) with all `n` holding a sandbox at once.
    async fn together<T>(&self, n: usize, calls: impl std::future::Future<Output = T>) -> T {
        *self.0.lock().unwrap() = Some(Arc::new(Barrier::new(n)));
        let out = calls.await;
        *self.0.lock().unwrap() = None;
        out
    }

    fn barrier(&self) -> Option<Arc<Barrier>> {
        self.0.lock().unwrap().clone()
    }
}

/// The process backend, its sandboxes behind [`Gate`].
struct Gated {
    backend: ProcessBackend,
    gate: Gate,
}

#[async_trait]
impl Backend for Gated {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError> {
        let sandbox = self.backend.start(spec, tenant, logs).await?;
        Ok(Box::new(GatedSandbox {
            sandbox,
            gate: self.gate.clone(),
        }))
    }
}

struct GatedSandbox {
    sandbox: Box<dyn Sandbox>,
    gate: Gate,
}

#[async_trait]
impl Sandbox for GatedSandbox {
    async fn invoke(&mut self, inv: Invocation, timeout: Duration) -> Result<Vec<u8>, InvokeError> {
        if let Some(b) = self.gate.barrier() {
            b.wait().await;
        }
        self.sandbox.invoke(inv, timeout).await
    }

    fn is_reusable(&self) -> bool {
        self.sandbox.is_reusable()
    }

    fn init_duration(&self) -> Duration {
        self.sandbox.init_duration()
    }

    async fn shutdown(self: Box<Self>) {
        self.sandbox.shutdown().await;
    }
}

fn executor(clock: &ManualClock) -> (Executor, Gate) {
    let gate = Gate::default();
    let backend = Gated {
        backend: ProcessBackend::new(ProcessConfig::detect(agent_binary())),
        gate: gate.clone(),
    };
    let ex = Executor::with_options(
        Arc::new(backend),
        Arc::new(|_l: LogLine| {}),
        Arc::new(clock.clone()),
        PoolConfig::default(),
    );
    (ex, gate)
}

fn spec(name: &str, f: &FunctionFixture) -> FunctionSpec {
    let mut s = FunctionSpec::new(name, &f.dir);
    s.timeout = Duration::from_secs(10);
    s.init_timeout = Duration::from_secs(30);
    s
}

async fn wait(
    ex: &Executor,
    function: &str,
    what: &str,
    pred: impl FnMut(&FunctionStats) -> bool,
) -> FunctionStats {
    match tokio::time::timeout(HANG_GUARD, ex.wait_until(function, pred)).await {
        Ok(r) => r.expect("stats"),
        Err(_) => panic!(
            "{what}: not reached; stats now {:?}",
            ex.stats(function).unwrap()
        ),
    }
}

/// Two calls arriving together; whether each started a new sandbox.
async fn burst(ex: &Executor, gate: &Gate, function: &str) -> [bool; 2] {
    let (a, b) = gate
        .together(2, async {
            tokio::join!(ex.invoke(function, "[1]"), ex.invoke(function, "[2]"))
        })
        .await;
    let check = |r: Result<Response, _>, want: &str| {
        let r = r.expect("invoke");
        assert_eq!(r.payload, want.as_bytes());
        r.cold_start
    };
    [check(a, "[1]"), check(b, "[2]")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_pattern_gets_warm_sandboxes_ahead_of_each_burst() {
    let f = function_fixture("echo");
    let clock = ManualClock::new();
    let (ex, gate) = executor(&clock);
    let mut s = spec("echo", &f);
    s.concurrency = 4;
    // Shorter than the period: without pre-warming every burst starts cold.
    s.idle_timeout = Duration::from_secs(20);
    ex.register(s);
    let t0 = clock.now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let period = 60;

    // Bursts every 60 s: until three bursts show the pattern, each is cold
    // and its sandboxes are reaped before the next one.
    for k in 0..3 {
        clock.set(at(k * period));
        assert_eq!(burst(&ex, &gate, "echo").await, [true, true], "burst {k}");
        clock.set(at(k * period + 30));
        let m = ex.maintain().await;
        assert_eq!((m.reaped, m.started), (2, 0), "after burst {k}: {m:?}");
    }
    let st = ex.stats("echo").unwrap();
    assert_eq!(st.cold_starts, 6, "{st:?}");
    assert_eq!(st.period, Some(Duration::from_secs(period)), "{st:?}");

    for k in 3..6 {
        // One tick before the expected burst: capacity is started in the
        // background, as many sandboxes as the bursts needed at once.
        clock.set(at(k * period - 1));
        let m = ex.maintain().await;
        assert_eq!(m.started, 2, "before burst {k}: {m:?}");
        wait(&ex, "echo", "pre-warmed sandboxes ready", |st| {
            st.idle == 2 && st.starting == 0
        })
        .await;
        clock.set(at(k * period));
        assert_eq!(burst(&ex, &gate, "echo").await, [false, false], "burst {k}");
        // Between bursts, the idle sandboxes are stopped early (the next
        // pre-warm is far away) instead of idling until `idle_timeout`.
        clock.set(at(k * period + 15));
        let m = ex.maintain().await;
        assert_eq!((m.trimmed, m.reaped, m.started), (2, 0, 0), "{m:?}");
        assert_eq!(ex.stats("echo").unwrap().idle, 0);
    }
    let st = ex.stats("echo").unwrap();
    assert_eq!(st.cold_starts, 6, "no cold start once the pattern is known");
    assert_eq!((st.prewarmed, st.prewarm_hits, st.warm_starts), (6, 6, 6));
    assert_eq!((st.trimmed, st.reaped), (6, 6));
    assert_eq!(st.invocations, 12);
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prewarm_a_periodic_pattern_stays_cold() {
    let f = function_fixture("echo");
    let clock = ManualClock::new();
    let (ex, gate) = executor(&clock);
    let mut s = spec("echo", &f);
    s.idle_timeout = Duration::from_secs(20);
    s.prewarm = false;
    ex.register(s);
    let t0 = clock.now();
    for k in 0..5u64 {
        clock.set(t0 + Duration::from_secs(k * 60 - u64::from(k > 0)));
        assert_eq!(ex.maintain().await.started, 0);
        clock.set(t0 + Duration::from_secs(k * 60));
        assert_eq!(burst(&ex, &gate, "echo").await, [true, true], "burst {k}");
        clock.set(t0 + Duration::from_secs(k * 60 + 30));
        assert_eq!(ex.maintain().await.reaped, 2);
    }
    let st = ex.stats("echo").unwrap();
    assert_eq!((st.cold_starts, st.prewarmed, st.trimmed), (10, 0, 0));
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_warm_is_refilled_in_the_background_and_idle_sandboxes_are_reaped() {
    let f = function_fixture("echo");
    let clock = ManualClock::new();
    let (ex, gate) = executor(&clock);
    let mut s = spec("echo", &f);
    s.concurrency = 4;
    s.min_warm = 1;
    s.max_warm = 3;
    s.idle_timeout = Duration::from_secs(60);
    s.prewarm = false;
    ex.register(s);

    // The background task fills the pool before any call.
    let (stop, stop_rx) = watch::channel(false);
    let task = ex.spawn_maintenance(stop_rx);
    let st = wait(&ex, "echo", "min_warm refill", |st| {
        st.idle == 1 && st.refills == 1
    })
    .await;
    assert_eq!((st.invocations, st.cold_starts), (0, 0), "{st:?}");
    stop.send(true).unwrap();
    task.await.unwrap();
    wait(&ex, "echo", "no start under way", |st| st.starting == 0).await;
    let idle_before = ex.stats("echo").unwrap().idle;

    // The first call is a hit on the refilled sandbox.
    let r = ex.invoke("echo", "{}").await.unwrap();
    assert!(!r.cold_start);

    // Four calls at once: the idle ones are hits, the rest start cold; at
    // most `max_warm` = 3 are kept afterwards.
    let (a, b, c, d) = gate
        .together(4, async {
            tokio::join!(
                ex.invoke("echo", "1"),
                ex.invoke("echo", "2"),
                ex.invoke("echo", "3"),
                ex.invoke("echo", "4")
            )
        })
        .await;
    for r in [a, b, c, d] {
        r.unwrap();
    }
    let st = ex.stats("echo").unwrap();
    assert_eq!(st.idle, 3, "{st:?}");
    assert_eq!(st.warm_starts + st.cold_starts, 5, "{st:?}");
    assert_eq!(st.warm_starts, 1 + idle_before as u64, "{st:?}");

    // Injected time: not idle long enough, then long enough; the newest
    // `min_warm` one is kept.
    clock.advance(Duration::from_secs(30));
    assert_eq!(ex.maintain().await.reaped, 0);
    clock.advance(Duration::from_secs(31));
    let m = ex.maintain().await;
    assert_eq!((m.reaped, m.started), (2, 0), "{m:?}");
    clock.advance(Duration::from_secs(3600));
    assert_eq!(ex.maintain().await.reaped, 0, "min_warm is never reaped");
    let st = ex.stats("echo").unwrap();
    assert_eq!((st.idle, st.reaped), (1, 2), "{st:?}");
    assert!(!ex.invoke("echo", "{}").await.unwrap().cold_start);
    ex.shutdown().await;
}

const COUNTER: &str = r#"#!/bin/bash
# Counts its invocations in /tmp: shows whether a sandbox was reused.
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  H=$(mktemp)
  curl -sS -D "$H" -o /tmp/event "$API/invocation/next"
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$H" | cut -d: -f2 | tr -d '[:space:]')
  N=$(( $(cat /tmp/count 2>/dev/null || echo 0) + 1 ))
  echo "$N" > /tmp/count
  curl -sS -X POST "$API/invocation/$ID/response" -d "{\"count\": $N, \"version\": \"$(cat "$LAMBDA_TASK_ROOT/VERSION")\"}" >/dev/null
done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_update_invalidates_its_pool() {
    let f = script_fixture(COUNTER);
    std::fs::write(f.dir.join("VERSION"), "1").unwrap();
    let clock = ManualClock::new();
    let (ex, _) = executor(&clock);
    let mut s = spec("counter", &f);
    s.min_warm = 1;
    ex.register(s);
    let call = || async {
        let r = ex.invoke("counter", "{}").await.unwrap();
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        (
            v["count"].as_u64().unwrap(),
            v["version"].as_str().unwrap().to_owned(),
        )
    };

    assert_eq!(ex.maintain().await.started, 1);
    wait(&ex, "counter", "refill", |st| {
        st.idle == 1 && st.starting == 0
    })
    .await;
    assert_eq!(call().await, (1, "1".into()));
    assert_eq!(call().await, (2, "1".into()), "the sandbox is reused");

    // A new version of the function folder (a file's size changes).
    std::fs::write(f.dir.join("VERSION"), "22").unwrap();
    let m = ex.maintain().await;
    assert_eq!((m.invalidated, m.started), (1, 1), "{m:?}");
    wait(&ex, "counter", "refill of the new version", |st| {
        st.idle == 1 && st.starting == 0
    })
    .await;
    // Served by a fresh sandbox of the new version, never the old one.
    assert_eq!(call().await, (1, "22".into()));
    let st = ex.stats("counter").unwrap();
    assert_eq!((st.invalidated, st.refills, st.cold_starts), (1, 2, 0));
    // Nothing changed since: nothing more is invalidated.
    assert_eq!(ex.maintain().await.invalidated, 0);
    ex.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_warming_never_exceeds_max_warm() {
    let f = function_fixture("echo");
    let clock = ManualClock::new();
    let (ex, gate) = executor(&clock);
    let mut s = spec("echo", &f);
    s.concurrency = 4;
    s.max_warm = 1;
    s.idle_timeout = Duration::from_secs(20);
    ex.register(s);
    let t0 = clock.now();
    for k in 0..3u64 {
        clock.set(t0 + Duration::from_secs(k * 60));
        burst(&ex, &gate, "echo").await;
        clock.set(t0 + Duration::from_secs(k * 60 + 30));
        ex.maintain().await;
    }
    // The bursts needed two sandboxes, but at most one is kept idle.
    clock.set(t0 + Duration::from_secs(179));
    assert_eq!(ex.maintain().await.started, 1);
    let st = wait(&ex, "echo", "pre-warm", |st| st.starting == 0).await;
    assert_eq!((st.idle, st.prewarmed), (1, 1), "{st:?}");
    clock.set(t0 + Duration::from_secs(180));
    let cold = burst(&ex, &gate, "echo").await;
    assert_eq!(cold.iter().filter(|c| !**c).count(), 1, "{cold:?}");
    assert!(ex.stats("echo").unwrap().idle <= 1);
    ex.shutdown().await;
}
