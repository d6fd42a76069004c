//! The executor: functions, their concurrency limits and their warm pools.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_protocol::MAX_PAYLOAD;
use tokio::sync::{Semaphore, watch};

use crate::backend::{Backend, Invocation, LogSink, Sandbox};
use crate::logs::tracing_sink;
use crate::{FunctionSpec, InvokeError};

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Tenant (default: the function's). Sandboxes never cross tenants.
    pub tenant: Option<String>,
    /// `Lambda-Runtime-Client-Context` (JSON).
    pub client_context: Option<String>,
}

/// A successful invocation.
#[derive(Debug, Clone)]
pub struct Response {
    /// What the function returned.
    pub payload: Vec<u8>,
    /// The request id given to the function.
    pub request_id: String,
    /// Whether a new sandbox was started for it.
    pub cold_start: bool,
    /// Initialisation time of that new sandbox.
    pub init_duration: Option<Duration>,
    /// Time spent in the invocation itself.
    pub duration: Duration,
}

/// Counters of one function, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionStats {
    /// Invocations that reached a sandbox.
    pub invocations: u64,
    /// Of those, failed ones.
    pub errors: u64,
    /// New sandboxes started.
    pub cold_starts: u64,
    /// Invocations served by an idle sandbox.
    pub warm_starts: u64,
    /// Calls rejected because the queue was full.
    pub throttles: u64,
    /// Sandboxes removed by the idle reaper.
    pub reaped: u64,
    /// Idle sandboxes now.
    pub idle: usize,
    /// Busy sandboxes now.
    pub busy: usize,
    /// Highest number of simultaneously busy sandboxes seen.
    pub peak_busy: usize,
}

struct Idle {
    sandbox: Box<dyn Sandbox>,
    since: Instant,
}

struct FunctionState {
    spec: FunctionSpec,
    version: String,
    permits: Arc<Semaphore>,
    waiting: AtomicU32,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    busy: AtomicUsize,
    peak_busy: AtomicUsize,
    invocations: AtomicU64,
    errors: AtomicU64,
    cold: AtomicU64,
    warm: AtomicU64,
    throttles: AtomicU64,
    reaped: AtomicU64,
}

impl FunctionState {
    fn new(spec: FunctionSpec) -> Self {
        Self {
            version: spec.version(),
            permits: Arc::new(Semaphore::new(spec.concurrency.max(1) as usize)),
            spec,
            waiting: AtomicU32::new(0),
            idle: Mutex::new(HashMap::new()),
            busy: AtomicUsize::new(0),
            peak_busy: AtomicUsize::new(0),
            invocations: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            cold: AtomicU64::new(0),
            warm: AtomicU64::new(0),
            throttles: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
        }
    }

    fn idle_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_idle(&self, tenant: &str) -> Option<Box<dyn Sandbox>> {
        let mut idle = self.idle_lock();
        let list = idle.get_mut(tenant)?;
        // Most recently used first: its caches are warmest.
        while let Some(i) = list.pop() {
            if i.sandbox.is_reusable() {
                return Some(i.sandbox);
            }
        }
        None
    }

    fn idle_count(&self) -> usize {
        self.idle_lock().values().map(Vec::len).sum()
    }

    /// Make room for a new sandbox: busy + idle never exceeds `concurrency`,
    /// so evict the oldest idle sandbox (of another tenant) if needed.
    fn evict_for_new(&self) -> Vec<Box<dyn Sandbox>> {
        let mut out = Vec::new();
        let limit = self.spec.concurrency.max(1) as usize;
        let mut idle = self.idle_lock();
        loop {
            let total: usize =
                idle.values().map(Vec::len).sum::<usize>() + self.busy.load(Ordering::SeqCst);
            if total < limit {
                break;
            }
            let oldest = idle
                .iter()
                .filter_map(|(t, v)| v.first().map(|i| (t.clone(), i.since)))
                .min_by_key(|(_, s)| *s);
            let Some((tenant, _)) = oldest else { break };
            if let Some(list) = idle.get_mut(&tenant) {
                out.push(list.remove(0).sandbox);
            }
        }
        out
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    functions: RwLock<HashMap<String, Arc<FunctionState>>>,
    logs: LogSink,
    shutting_down: AtomicBool,
    seq: AtomicU64,
    /// Sandboxes being stopped in the background; `shutdown` waits for them.
    stopping: Mutex<tokio::task::JoinSet<()>>,
}

/// Invokes functions in sandboxes from a [`Backend`], with per-function
/// concurrency limits, bounded waiting and warm reuse per function version
/// and tenant.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backend", &self.inner.backend.name())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor on `backend`, logging function output through `tracing`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self::with_log_sink(backend, Arc::new(tracing_sink))
    }

    /// An executor whose function log lines go to `logs`.
    pub fn with_log_sink(backend: Arc<dyn Backend>, logs: LogSink) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                functions: RwLock::new(HashMap::new()),
                logs,
                shutting_down: AtomicBool::new(false),
                seq: AtomicU64::new(0),
                stopping: Mutex::new(tokio::task::JoinSet::new()),
            }),
        }
    }

    /// Add or update a function. A changed function (settings or files) gets
    /// a new version: its idle sandboxes of the old version are stopped.
    pub fn register(&self, spec: FunctionSpec) {
        let state = Arc::new(FunctionState::new(spec));
        let old = {
            let mut map = self
                .inner
                .functions
                .write()
                .unwrap_or_else(|p| p.into_inner());
            match map.get(&state.spec.name) {
                Some(cur) if cur.version == state.version => return,
                _ => map.insert(state.spec.name.clone(), state),
            }
        };
        if let Some(old) = old {
            let stale: Vec<_> = old.idle_lock().drain().flat_map(|(_, v)| v).collect();
            for i in stale {
                self.stop_in_background(i.sandbox);
            }
        }
    }

    fn state(&self, name: &str) -> Result<Arc<FunctionState>, InvokeError> {
        let map = self
            .inner
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner());
        map.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<_> = map.keys().cloned().collect();
            known.sort();
            InvokeError::UnknownFunction {
                name: name.to_owned(),
                known: known.join(", "),
            }
        })
    }

    /// Invoke `function` with `payload` as its default tenant.
    pub async fn invoke(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Response, InvokeError> {
        self.invoke_with(function, payload, InvokeOptions::default())
            .await
    }

    /// Invoke with options.
    pub async fn invoke_with(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
        opts: InvokeOptions,
    ) -> Result<Response, InvokeError> {
        let payload = payload.into();
        let state = self.state(function)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(InvokeError::PayloadTooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD,
            });
        }
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(InvokeError::ShuttingDown);
        }
        let spec = &state.spec;
        let _permit = match state.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if state.waiting.fetch_add(1, Ordering::SeqCst) >= spec.max_queue {
                    state.waiting.fetch_sub(1, Ordering::SeqCst);
                    state.throttles.fetch_add(1, Ordering::Relaxed);
                    return Err(InvokeError::Throttled {
                        function: spec.name.clone(),
                        concurrency: spec.concurrency,
                        max_queue: spec.max_queue,
                    });
                }
                let p = state.permits.clone().acquire_owned().await;
                state.waiting.fetch_sub(1, Ordering::SeqCst);
                p.map_err(|_| InvokeError::ShuttingDown)?
            }
        };
        let tenant = opts.tenant.unwrap_or_else(|| spec.tenant.clone());

        let (mut sandbox, cold_start) = match state.take_idle(&tenant) {
            Some(sb) => {
                state.warm.fetch_add(1, Ordering::Relaxed);
                (sb, false)
            }
            None => {
                for old in state.evict_for_new() {
                    self.stop_in_background(old);
                }
                state.cold.fetch_add(1, Ordering::Relaxed);
                let sb = match self
                    .inner
                    .backend
                    .start(spec, &tenant, self.inner.logs.clone())
                    .await
                {
                    Ok(sb) => sb,
                    Err(e) => {
                        state.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                };
                (sb, true)
            }
        };

        let request_id = self.request_id();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let inv = Invocation {
            trace_id: format!(
                "Root=1-{:08x}-{};Sampled=0",
                now_ms / 1000,
                &request_id.replace('-', "")[..24]
            ),
            request_id: request_id.clone(),
            deadline_ms: now_ms + spec.timeout.as_millis() as u64,
            invoked_function_arn: format!(
                "arn:aws:lambda:sluice-local:000000000000:function:{}",
                spec.name
            ),
            client_context: opts.client_context.unwrap_or_default(),
            payload,
        };
        let busy = state.busy.fetch_add(1, Ordering::SeqCst) + 1;
        state.peak_busy.fetch_max(busy, Ordering::SeqCst);
        state.invocations.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = sandbox.invoke(inv, spec.timeout).await;
        let duration = started.elapsed();
        state.busy.fetch_sub(1, Ordering::SeqCst);
        if result.is_err() {
            state.errors.fetch_add(1, Ordering::Relaxed);
        }
        let init = cold_start.then(|| sandbox.init_duration());
        self.release(&state, &tenant, sandbox);
        result.map(|payload| Response {
            payload,
            request_id,
            cold_start,
            init_duration: init,
            duration,
        })
    }

    fn release(&self, state: &Arc<FunctionState>, tenant: &str, sandbox: Box<dyn Sandbox>) {
        let current = self
            .state(&state.spec.name)
            .map(|s| Arc::ptr_eq(&s, state))
            .unwrap_or(false);
        if sandbox.is_reusable() && current && !self.inner.shutting_down.load(Ordering::SeqCst) {
            state
                .idle_lock()
                .entry(tenant.to_owned())
                .or_default()
                .push(Idle {
                    sandbox,
                    since: Instant::now(),
                });
        } else {
            self.stop_in_background(sandbox);
        }
    }

    fn stop_in_background(&self, sandbox: Box<dyn Sandbox>) {
        let mut set = self
            .inner
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Forget finished ones so the set does not grow.
        while set.try_join_next().is_some() {}
        set.spawn(sandbox.shutdown());
    }

    fn request_id(&self) -> String {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut x =
            t ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = || {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let (a, b) = (next(), next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn all_states(&self) -> Vec<Arc<FunctionState>> {
        let map = self
            .inner
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    /// Stop idle sandboxes that have been idle for at least their function's
    /// `idle_timeout` at `now`. Returns how many were stopped.
    pub async fn reap_idle(&self, now: Instant) -> usize {
        let states = self.all_states();
        let mut reaped = Vec::new();
        for st in states {
            let mut idle = st.idle_lock();
            for list in idle.values_mut() {
                let (old, keep): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|i| now.saturating_duration_since(i.since) >= st.spec.idle_timeout);
                *list = keep;
                st.reaped.fetch_add(old.len() as u64, Ordering::Relaxed);
                reaped.extend(old);
            }
        }
        let n = reaped.len();
        for i in reaped {
            i.sandbox.shutdown().await;
        }
        n
    }

    /// Run [`Self::reap_idle`] every `period` until `shutdown` turns true.
    pub fn spawn_reaper(
        &self,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => { this.reap_idle(Instant::now()).await; }
                    r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
                }
            }
        })
    }

    /// Counters of a function.
    pub fn stats(&self, function: &str) -> Result<FunctionStats, InvokeError> {
        let st = self.state(function)?;
        Ok(FunctionStats {
            invocations: st.invocations.load(Ordering::Relaxed),
            errors: st.errors.load(Ordering::Relaxed),
            cold_starts: st.cold.load(Ordering::Relaxed),
            warm_starts: st.warm.load(Ordering::Relaxed),
            throttles: st.throttles.load(Ordering::Relaxed),
            reaped: st.reaped.load(Ordering::Relaxed),
            idle: st.idle_count(),
            busy: st.busy.load(Ordering::SeqCst),
            peak_busy: st.peak_busy.load(Ordering::SeqCst),
        })
    }

    /// Refuse new calls and stop every idle sandbox. Busy sandboxes stop when
    /// their invocation ends.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let states = self.all_states();
        for st in states {
            let idle: Vec<_> = st.idle_lock().drain().flat_map(|(_, v)| v).collect();
            for i in idle {
                i.sandbox.shutdown().await;
            }
        }
        let mut set = std::mem::take(
            &mut *self
                .inner
                .stopping
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        while set.join_next().await.is_some() {}
    }
}
