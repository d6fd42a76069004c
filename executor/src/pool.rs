//! The executor: functions, their concurrency limits and their warm pools.
//! See the crate docs, [Warm pools](crate#warm-pools), for pool upkeep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_protocol::{MAX_ATTACHMENT, MAX_PAYLOAD};
use tokio::sync::{Notify, Semaphore, watch};

use crate::backend::{Backend, Invocation, LogSink, Sandbox};
use crate::clock::{Clock, SystemClock};
use crate::logs::tracing_sink;
use crate::prewarm::{Arrivals, Phase};
use crate::report::{InitReport, REPORT_TARGET, Report, ReportStatus, Reported};
use crate::tail::{LogTap, Tapped};
use crate::{FunctionSpec, InvokeError};

/// How often [`FunctionStats::max_memory_used`] is refreshed.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of pool upkeep, shared by all functions of an executor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// Period of [`Executor::spawn_maintenance`]. Default 1 s.
    pub tick: Duration,
    /// Arrivals closer than this belong to one burst. Default 1 s.
    pub burst_gap: Duration,
    /// Allowed deviation of burst intervals from their median, as a fraction
    /// of the period. Default 0.25.
    pub tolerance: f64,
    /// Idle sandboxes beyond `min_warm` are stopped between bursts only when
    /// the next pre-warm is at least this far away. Default 10 s.
    pub trim_gap: Duration,
    /// Background starts running at once, over all functions. Default 8.
    pub max_parallel_starts: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            burst_gap: Duration::from_secs(1),
            tolerance: 0.25,
            trim_gap: Duration::from_secs(10),
            max_parallel_starts: 8,
        }
    }
}

/// The ARN a function is invoked as (`Lambda-Runtime-Invoked-Function-Arn`):
/// sluice's region and a zero account.
pub fn function_arn(name: &str) -> String {
    format!("arn:aws:lambda:sluice-local:000000000000:function:{name}")
}

/// Per-call options.
#[derive(Debug, Clone, Default)]
pub struct InvokeOptions {
    /// Tenant (default: the function's). Sandboxes never cross tenants.
    pub tenant: Option<String>,
    /// `Lambda-Runtime-Client-Context` (JSON).
    pub client_context: Option<String>,
    /// Bytes the sandbox stages as a read-only file at
    /// [`sluice_protocol::ATTACHMENT_PATH`] for this invocation only (at
    /// most [`sluice_protocol::MAX_ATTACHMENT`]): a large columnar payload
    /// that the event names instead of carrying it in base64.
    pub attachment: Option<bytes::Bytes>,
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

/// Counters and pool state of one function, for metrics and tests. Counters
/// survive function updates (a new version keeps counting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionStats {
    /// Invocations that reached a sandbox.
    pub invocations: u64,
    /// Of those, failed ones.
    pub errors: u64,
    /// New sandboxes started on a caller's path (pool misses).
    pub cold_starts: u64,
    /// Invocations served by an idle sandbox (pool hits).
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
    /// Sandboxes being started in the background now.
    pub starting: usize,
    /// Sandboxes started in the background to keep `min_warm` idle.
    pub refills: u64,
    /// Sandboxes started in the background ahead of an expected burst.
    pub prewarmed: u64,
    /// Pool hits served by a pre-warmed sandbox.
    pub prewarm_hits: u64,
    /// Idle sandboxes stopped between bursts.
    pub trimmed: u64,
    /// Idle sandboxes stopped because the function was updated.
    pub invalidated: u64,
    /// Background starts that failed.
    pub start_failures: u64,
    /// The most memory any one of its sandboxes has used at once, in bytes
    /// (Lambda's "Max Memory Used"), where the backend can tell: read at
    /// most once a second, so it may lag a little behind.
    pub max_memory_used: Option<u64>,
    /// Interval between bursts, when the arrivals are periodic.
    pub period: Option<Duration>,
}

/// What one [`Executor::maintain`] step did, over all functions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Idle sandboxes stopped because their function was updated.
    pub invalidated: usize,
    /// Idle sandboxes stopped after `idle_timeout`.
    pub reaped: usize,
    /// Idle sandboxes stopped between bursts.
    pub trimmed: usize,
    /// Sandboxes whose background start began.
    pub started: usize,
}

/// How an idle sandbox came to be in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Released after an invocation.
    Released,
    /// Started in the background for `min_warm`.
    Refill,
    /// Started in the background ahead of a burst.
    Prewarm,
}

struct Idle {
    sandbox: Box<dyn Sandbox>,
    since: Instant,
    origin: Origin,
}

/// What a function keeps across versions: counters and arrival history.
#[derive(Default)]
struct Shared {
    busy: AtomicUsize,
    in_flight: AtomicUsize,
    peak_busy: AtomicUsize,
    invocations: AtomicU64,
    errors: AtomicU64,
    cold: AtomicU64,
    warm: AtomicU64,
    throttles: AtomicU64,
    reaped: AtomicU64,
    refills: AtomicU64,
    prewarmed: AtomicU64,
    prewarm_hits: AtomicU64,
    trimmed: AtomicU64,
    invalidated: AtomicU64,
    start_failures: AtomicU64,
    /// The most memory any of the function's sandboxes has used, in bytes
    /// (0: not known yet).
    max_memory_used: AtomicU64,
    /// When a sandbox's memory was last read for [`FunctionStats`]: at most
    /// once a second, since reading it costs system calls on the hot path.
    memory_sampled: Mutex<Option<Instant>>,
    arrivals: Mutex<Arrivals>,
}

impl Shared {
    /// Read a sandbox's peak memory into the function's (a few system
    /// calls: not on every call's path).
    fn note_memory(&self, sandbox: &dyn Sandbox) -> Option<u64> {
        let m = sandbox.max_memory_used();
        if let Some(b) = m {
            self.max_memory_used.fetch_max(b, Ordering::Relaxed);
        }
        m
    }

    /// Whether the peak memory is due to be read again (and, if so, the
    /// time of that reading is noted).
    fn memory_sample_due(&self, now: Instant) -> bool {
        let mut last = self
            .memory_sampled
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < MEMORY_SAMPLE_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, Arrivals> {
        self.arrivals.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a call as in flight from its arrival until it returns.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> (Self, usize) {
        let n = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        (Self(shared), n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct FunctionState {
    spec: FunctionSpec,
    version: String,
    permits: Arc<Semaphore>,
    waiting: AtomicU32,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    /// Background starts under way.
    starting: AtomicUsize,
    /// Slowest initialisation seen for this version, in microseconds.
    init_max_us: AtomicU64,
    shared: Arc<Shared>,
}

impl FunctionState {
    fn new(spec: FunctionSpec, version: String, shared: Arc<Shared>) -> Self {
        Self {
            version,
            permits: Arc::new(Semaphore::new(spec.concurrency.max(1) as usize)),
            spec,
            waiting: AtomicU32::new(0),
            idle: Mutex::new(HashMap::new()),
            starting: AtomicUsize::new(0),
            init_max_us: AtomicU64::new(0),
            shared,
        }
    }

    fn idle_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn concurrency(&self) -> usize {
        self.spec.concurrency.max(1) as usize
    }

    /// Most idle sandboxes kept: `max_warm`, at most `concurrency`.
    fn max_warm(&self) -> usize {
        (self.spec.max_warm as usize).min(self.concurrency())
    }

    /// Idle sandboxes of the default tenant kept ready: `min_warm`, at most
    /// [`Self::max_warm`].
    fn min_warm(&self) -> usize {
        (self.spec.min_warm as usize).min(self.max_warm())
    }

    fn note_init(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.init_max_us.fetch_max(us, Ordering::Relaxed);
    }

    fn take_idle(&self, tenant: &str) -> Option<(Box<dyn Sandbox>, Origin, usize)> {
        let mut idle = self.idle_lock();
        let list = idle.get_mut(tenant)?;
        // Most recently used first: its caches are warmest.
        while let Some(i) = list.pop() {
            if i.sandbox.is_reusable() {
                return Some((i.sandbox, i.origin, list.len()));
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
        let limit = self.concurrency();
        let mut idle = self.idle_lock();
        loop {
            let total: usize = idle.values().map(Vec::len).sum::<usize>()
                + self.shared.busy.load(Ordering::SeqCst);
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

    /// Take out idle sandboxes idle for `idle_timeout` at `now`, keeping the
    /// newest `min_warm` of the default tenant.
    fn expired(&self, now: Instant) -> Vec<Idle> {
        let keep = self.min_warm();
        let mut out = Vec::new();
        let mut idle = self.idle_lock();
        for (tenant, list) in idle.iter_mut() {
            let protected = if *tenant == self.spec.tenant {
                keep.min(list.len())
            } else {
                0
            };
            let candidates = list.len() - protected;
            let mut kept = Vec::with_capacity(list.len());
            for (n, i) in list.drain(..).enumerate() {
                if n < candidates
                    && now.saturating_duration_since(i.since) >= self.spec.idle_timeout
                {
                    out.push(i);
                } else {
                    kept.push(i);
                }
            }
            *list = kept;
        }
        out
    }

    /// Take out idle sandboxes beyond `min_warm` (default tenant) and all of
    /// other tenants, oldest first.
    fn trim(&self) -> Vec<Idle> {
        let keep = self.min_warm();
        let mut out = Vec::new();
        let mut idle = self.idle_lock();
        for (tenant, list) in idle.iter_mut() {
            let keep = if *tenant == self.spec.tenant { keep } else { 0 };
            let excess = list.len().saturating_sub(keep);
            out.extend(list.drain(..excess));
        }
        out
    }

    fn stats(&self, tolerance: f64) -> FunctionStats {
        let s = &self.shared;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FunctionStats {
            invocations: load(&s.invocations),
            errors: load(&s.errors),
            cold_starts: load(&s.cold),
            warm_starts: load(&s.warm),
            throttles: load(&s.throttles),
            reaped: load(&s.reaped),
            idle: self.idle_count(),
            busy: s.busy.load(Ordering::SeqCst),
            peak_busy: s.peak_busy.load(Ordering::SeqCst),
            starting: self.starting.load(Ordering::SeqCst),
            refills: load(&s.refills),
            prewarmed: load(&s.prewarmed),
            prewarm_hits: load(&s.prewarm_hits),
            trimmed: load(&s.trimmed),
            invalidated: load(&s.invalidated),
            start_failures: load(&s.start_failures),
            max_memory_used: Some(load(&s.max_memory_used)).filter(|&b| b > 0),
            period: s.arrivals().forecast(tolerance).map(|f| f.period),
        }
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    functions: RwLock<HashMap<String, Arc<FunctionState>>>,
    logs: LogSink,
    clock: Arc<dyn Clock>,
    pool: PoolConfig,
    shutting_down: AtomicBool,
    seq: AtomicU64,
    /// Wakes the maintenance task early (a pool fell below `min_warm`, a
    /// function was registered).
    wake: Notify,
    /// Bumped whenever pool state changes, for [`Executor::wait_until`].
    changed: watch::Sender<u64>,
    /// Bounds background starts ([`PoolConfig::max_parallel_starts`]).
    start_permits: Arc<Semaphore>,
    /// Sandboxes being stopped or started in the background; `shutdown`
    /// waits for them.
    background: Mutex<tokio::task::JoinSet<()>>,
}

/// Invokes functions in sandboxes from a [`Backend`], with per-function
/// concurrency limits, bounded waiting and warm pools per function version
/// and tenant (see [Warm pools](crate#warm-pools)).
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("backend", &self.inner.backend.name())
            .field("pool", &self.inner.pool)
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
        Self::with_options(backend, logs, Arc::new(SystemClock), PoolConfig::default())
    }

    /// An executor with its own clock and pool settings.
    pub fn with_options(
        backend: Arc<dyn Backend>,
        logs: LogSink,
        clock: Arc<dyn Clock>,
        pool: PoolConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                functions: RwLock::new(HashMap::new()),
                logs,
                clock,
                pool,
                shutting_down: AtomicBool::new(false),
                seq: AtomicU64::new(0),
                wake: Notify::new(),
                changed: watch::Sender::new(0),
                start_permits: Arc::new(Semaphore::new(pool.max_parallel_starts.max(1))),
                background: Mutex::new(tokio::task::JoinSet::new()),
            }),
        }
    }

    /// Whether a function called `name` is registered.
    pub fn is_registered(&self, name: &str) -> bool {
        self.state(name).is_ok()
    }

    /// The registered function `name`, with its version (a hash of its
    /// settings and files).
    pub fn function(&self, name: &str) -> Option<(FunctionSpec, String)> {
        self.state(name)
            .ok()
            .map(|s| (s.spec.clone(), s.version.clone()))
    }

    /// The names of the registered functions, sorted.
    pub fn function_names(&self) -> Vec<String> {
        let map = self
            .inner
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort();
        names
    }

    /// Add or update a function. A changed function (settings or files) gets
    /// a new version: its idle sandboxes of the old version are stopped, and
    /// its counters and arrival history carry over.
    pub fn register(&self, spec: FunctionSpec) {
        let version = spec.version();
        let old = {
            let mut map = self
                .inner
                .functions
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let old = map.get(&spec.name).cloned();
            if old.as_ref().is_some_and(|o| o.version == version) {
                return;
            }
            let shared = old.as_ref().map(|o| o.shared.clone()).unwrap_or_default();
            let state = Arc::new(FunctionState::new(spec, version, shared));
            map.insert(state.spec.name.clone(), state);
            old
        };
        if let Some(old) = old {
            let stale: Vec<_> = old.idle_lock().drain().flat_map(|(_, v)| v).collect();
            old.shared
                .invalidated
                .fetch_add(stale.len() as u64, Ordering::Relaxed);
            tracing::info!(
                function = %old.spec.name,
                old_version = %old.version,
                invalidated = stale.len(),
                "function updated; its idle sandboxes are stopped"
            );
            for i in stale {
                self.stop_in_background(i.sandbox);
            }
        }
        self.pool_changed();
        self.inner.wake.notify_one();
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

    fn is_current(&self, state: &Arc<FunctionState>) -> bool {
        self.state(&state.spec.name)
            .map(|s| Arc::ptr_eq(&s, state))
            .unwrap_or(false)
    }

    fn pool_changed(&self) {
        self.inner.changed.send_modify(|g| *g = g.wrapping_add(1));
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
        self.invoke_inner(function, payload.into(), opts, &mut None, &mut None)
            .await
    }

    /// Invoke with options, and also hand back Lambda's `REPORT` of the
    /// invocation when it reached a sandbox, or the `INIT_REPORT` of the
    /// sandbox whose initialisation failed for it (nothing when the call
    /// was refused or throttled, or sluice's own machinery failed).
    pub async fn invoke_reported(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
        opts: InvokeOptions,
    ) -> (Result<Response, InvokeError>, Option<Reported>) {
        let mut report = Some(None);
        let result = self
            .invoke_inner(function, payload.into(), opts, &mut report, &mut None)
            .await;
        (result, report.flatten())
    }

    /// Invoke with options, and also hand back the tail of the invocation's
    /// log, as Lambda's `LogType=Tail` does: its last
    /// [`TAIL_BYTES`](crate::tail::TAIL_BYTES), from `START` to the
    /// `REPORT` line, after the initialisation's lines on a cold start; or
    /// the failed initialisation's lines and its `INIT_REPORT`. `None` when
    /// the call never reached a sandbox (refused, throttled).
    pub async fn invoke_tailed(
        &self,
        function: &str,
        payload: impl Into<Vec<u8>>,
        opts: InvokeOptions,
    ) -> (Result<Response, InvokeError>, Option<String>) {
        let mut tail = Some(None);
        let result = self
            .invoke_inner(function, payload.into(), opts, &mut None, &mut tail)
            .await;
        (result, tail.flatten())
    }

    /// The invocation; `report` and `tail` are `Some` when the caller wants
    /// them back (they are filled in if the call reached a sandbox).
    async fn invoke_inner(
        &self,
        function: &str,
        payload: Vec<u8>,
        opts: InvokeOptions,
        report: &mut Option<Option<Reported>>,
        tail: &mut Option<Option<String>>,
    ) -> Result<Response, InvokeError> {
        let state = self.state(function)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(InvokeError::PayloadTooLarge {
                size: payload.len(),
                limit: MAX_PAYLOAD,
            });
        }
        if let Some(a) = &opts.attachment
            && a.len() > MAX_ATTACHMENT
        {
            return Err(InvokeError::PayloadTooLarge {
                size: a.len(),
                limit: MAX_ATTACHMENT,
            });
        }
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(InvokeError::ShuttingDown);
        }
        let shared = &state.shared;
        let (_in_flight, in_flight) = InFlight::enter(shared);
        shared
            .arrivals()
            .record(self.inner.clock.now(), in_flight, self.inner.pool.burst_gap);
        let spec = &state.spec;
        let _permit = match state.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if state.waiting.fetch_add(1, Ordering::SeqCst) >= spec.max_queue {
                    state.waiting.fetch_sub(1, Ordering::SeqCst);
                    shared.throttles.fetch_add(1, Ordering::Relaxed);
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

        let mut init_lines = None;
        let (mut sandbox, cold_start) = match state.take_idle(&tenant) {
            Some((sb, origin, left)) => {
                shared.warm.fetch_add(1, Ordering::Relaxed);
                if origin == Origin::Prewarm {
                    shared.prewarm_hits.fetch_add(1, Ordering::Relaxed);
                }
                if tenant == spec.tenant && left < state.min_warm() {
                    self.inner.wake.notify_one();
                }
                if tail.is_some()
                    && let Some(tap) = sb.log_tap()
                {
                    tap.arm();
                }
                (sb, false)
            }
            None => {
                for old in state.evict_for_new() {
                    self.stop_in_background(old);
                }
                shared.cold.fetch_add(1, Ordering::Relaxed);
                let starting = Instant::now();
                let (started, tap) = self.start_sandbox(spec, &tenant, tail.is_some()).await;
                let sb = match started {
                    Ok(sb) => sb,
                    Err(e) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        let init = InitReport::of(&spec.name, starting.elapsed(), &e);
                        if let Some(r) = &init {
                            r.trace();
                        }
                        if let Some(slot) = tail {
                            let lines = tap.take().unwrap_or_default();
                            *slot = Some(crate::tail::init_tail(&lines, init.as_ref()));
                        }
                        if let (Some(slot), Some(r)) = (report, init) {
                            *slot = Some(Reported::Init(r));
                        }
                        return Err(e);
                    }
                };
                state.note_init(sb.init_duration());
                // The initialisation's lines go before `START`.
                if tail.is_some() {
                    init_lines = tap.take();
                    tap.arm();
                }
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
            invoked_function_arn: function_arn(&spec.name),
            client_context: opts.client_context.unwrap_or_default(),
            payload,
            attachment: opts.attachment,
        };
        let busy = shared.busy.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_busy.fetch_max(busy, Ordering::SeqCst);
        shared.invocations.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = sandbox.invoke(inv, spec.timeout).await;
        let duration = started.elapsed();
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        if result.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        let init = cold_start.then(|| sandbox.init_duration());
        let traced = tracing::enabled!(target: REPORT_TARGET, tracing::Level::DEBUG);
        let wanted = report.is_some() || tail.is_some() || traced;
        let max_memory_used = if wanted || shared.memory_sample_due(self.inner.clock.now()) {
            shared.note_memory(sandbox.as_ref())
        } else {
            None
        };
        let lines = tail
            .is_some()
            .then(|| sandbox.log_tap().and_then(LogTap::take))
            .flatten();
        self.release(&state, &tenant, sandbox);
        if wanted {
            let r = Report {
                request_id: request_id.clone(),
                function: spec.name.clone(),
                duration,
                init_duration: init,
                memory_mb: spec.memory_mb,
                max_memory_used,
                status: ReportStatus::of(&result),
            };
            r.trace();
            if let Some(slot) = tail {
                *slot = Some(crate::tail::invocation_tail(
                    init_lines.as_deref().unwrap_or_default(),
                    lines.as_deref().unwrap_or_default(),
                    &r,
                ));
            }
            if let Some(slot) = report {
                *slot = Some(Reported::Invocation(r));
            }
        }
        result.map(|payload| Response {
            payload,
            request_id,
            cold_start,
            init_duration: init,
            duration,
        })
    }

    /// Start a sandbox for `spec` and `tenant` on the backend, its log lines
    /// through a tap ([`crate::tail`]); `armed` when the call that starts it
    /// wants a tail, which then begins with the initialisation's lines.
    async fn start_sandbox(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        armed: bool,
    ) -> (Result<Box<dyn Sandbox>, InvokeError>, Arc<LogTap>) {
        let tap = Arc::new(LogTap::default());
        if armed {
            tap.arm();
        }
        let started = self
            .inner
            .backend
            .start(spec, tenant, tap.sink(self.inner.logs.clone()))
            .await;
        let tapped = started.map(|inner| {
            Box::new(Tapped {
                inner,
                tap: tap.clone(),
            }) as Box<dyn Sandbox>
        });
        (tapped, tap)
    }

    fn release(&self, state: &Arc<FunctionState>, tenant: &str, sandbox: Box<dyn Sandbox>) {
        let keep = sandbox.is_reusable()
            && self.is_current(state)
            && !self.inner.shutting_down.load(Ordering::SeqCst);
        let rejected = if keep {
            let mut idle = state.idle_lock();
            if idle.values().map(Vec::len).sum::<usize>() < state.max_warm() {
                idle.entry(tenant.to_owned()).or_default().push(Idle {
                    sandbox,
                    since: self.inner.clock.now(),
                    origin: Origin::Released,
                });
                None
            } else {
                Some(sandbox)
            }
        } else {
            Some(sandbox)
        };
        if let Some(sandbox) = rejected {
            state.shared.note_memory(sandbox.as_ref());
            self.stop_in_background(sandbox);
        }
        self.pool_changed();
    }

    fn spawn_background(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self
            .inner
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Forget finished ones so the set does not grow.
        while set.try_join_next().is_some() {}
        set.spawn(task);
    }

    fn stop_in_background(&self, sandbox: Box<dyn Sandbox>) {
        self.spawn_background(sandbox.shutdown());
    }

    /// Start a sandbox of `state`'s default tenant off the callers' path and
    /// put it in the pool, if it is still wanted when ready.
    fn start_in_background(&self, state: &Arc<FunctionState>, origin: Origin) {
        state.starting.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        let st = state.clone();
        let permits = self.inner.start_permits.clone();
        self.spawn_background(async move {
            // The semaphore is never closed.
            let _permit = permits.acquire_owned().await;
            if this.inner.shutting_down.load(Ordering::SeqCst) || !this.is_current(&st) {
                st.starting.fetch_sub(1, Ordering::SeqCst);
                this.pool_changed();
                return;
            }
            let (started, _) = this.start_sandbox(&st.spec, &st.spec.tenant, false).await;
            match started {
                Ok(sb) => {
                    st.note_init(sb.init_duration());
                    let rejected = {
                        let mut idle = st.idle_lock();
                        let total = idle.values().map(Vec::len).sum::<usize>();
                        let wanted = this.is_current(&st)
                            && !this.inner.shutting_down.load(Ordering::SeqCst)
                            && total < st.max_warm()
                            && total + st.shared.busy.load(Ordering::SeqCst) < st.concurrency();
                        st.starting.fetch_sub(1, Ordering::SeqCst);
                        if wanted {
                            idle.entry(st.spec.tenant.clone()).or_default().push(Idle {
                                sandbox: sb,
                                since: this.inner.clock.now(),
                                origin,
                            });
                            let counter = match origin {
                                Origin::Prewarm => &st.shared.prewarmed,
                                _ => &st.shared.refills,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            None
                        } else {
                            Some(sb)
                        }
                    };
                    if let Some(sb) = rejected {
                        sb.shutdown().await;
                    }
                }
                Err(e) => {
                    st.starting.fetch_sub(1, Ordering::SeqCst);
                    st.shared.start_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        function = %st.spec.name,
                        fault = ?e.fault(),
                        error = %e,
                        "background sandbox start failed"
                    );
                }
            }
            this.pool_changed();
        });
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
    /// `idle_timeout` at `now` (keeping `min_warm` of each function). Returns
    /// how many were stopped.
    pub async fn reap_idle(&self, now: Instant) -> usize {
        let mut reaped = Vec::new();
        for st in self.all_states() {
            let old = st.expired(now);
            st.shared
                .reaped
                .fetch_add(old.len() as u64, Ordering::Relaxed);
            reaped.extend(old);
        }
        let n = reaped.len();
        for i in reaped {
            i.sandbox.shutdown().await;
        }
        if n > 0 {
            self.pool_changed();
        }
        n
    }

    /// One step of pool upkeep at the clock's current time: invalidate
    /// updated functions, reap, trim between bursts, refill and pre-warm
    /// (see [Warm pools](crate#warm-pools)). Starts run in the background; this
    /// returns once they are under way.
    pub async fn maintain(&self) -> Maintenance {
        let mut report = Maintenance::default();
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return report;
        }
        for st in self.all_states() {
            let pooled =
                st.min_warm() > 0 || st.starting.load(Ordering::SeqCst) > 0 || st.idle_count() > 0;
            if pooled && st.spec.version() != st.version {
                let before = st.shared.invalidated.load(Ordering::Relaxed);
                self.register(st.spec.clone());
                let after = st.shared.invalidated.load(Ordering::Relaxed);
                report.invalidated += (after - before) as usize;
            }
        }
        report.reaped = self.reap_idle(self.inner.clock.now()).await;

        let now = self.inner.clock.now();
        let pool = self.inner.pool;
        let mut trimmed = Vec::new();
        for st in self.all_states() {
            let forecast = if st.spec.prewarm {
                st.shared.arrivals().forecast(pool.tolerance)
            } else {
                None
            };
            let lead = pool.tick
                + Duration::from_micros(st.init_max_us.load(Ordering::Relaxed)).saturating_mul(2);
            let min = st.min_warm();
            let mut target = min;
            if let Some(f) = forecast {
                match f.phase(now, lead, pool.burst_gap, pool.tolerance) {
                    Phase::Prewarm => target = target.max(f.demand),
                    Phase::Gap(left) if left >= pool.trim_gap => {
                        let out = st.trim();
                        st.shared
                            .trimmed
                            .fetch_add(out.len() as u64, Ordering::Relaxed);
                        trimmed.extend(out);
                    }
                    Phase::Gap(_) | Phase::Other => {}
                }
            }
            let target = target.min(st.max_warm());
            let (ready, total) = {
                let idle = st.idle_lock();
                let ready = idle.get(&st.spec.tenant).map_or(0, Vec::len);
                (ready, idle.values().map(Vec::len).sum::<usize>())
            };
            let starting = st.starting.load(Ordering::SeqCst);
            let busy = st.shared.busy.load(Ordering::SeqCst);
            let room = st.concurrency().saturating_sub(busy + total + starting);
            let have = ready + starting;
            let n = target.saturating_sub(have).min(room);
            for k in 0..n {
                let origin = if have + k < min {
                    Origin::Refill
                } else {
                    Origin::Prewarm
                };
                self.start_in_background(&st, origin);
            }
            report.started += n;
        }
        report.trimmed = trimmed.len();
        for i in trimmed {
            i.sandbox.shutdown().await;
        }
        if report != Maintenance::default() {
            tracing::debug!(
                invalidated = report.invalidated,
                reaped = report.reaped,
                trimmed = report.trimmed,
                started = report.started,
                "pool maintenance"
            );
            self.pool_changed();
        }
        report
    }

    /// Run [`Self::maintain`] every [`PoolConfig::tick`], and early when a
    /// pool needs a refill, until `shutdown` turns true.
    pub fn spawn_maintenance(
        &self,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.inner.pool.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if *shutdown.borrow() {
                    return;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    () = this.inner.wake.notified() => {}
                    r = shutdown.changed() => if r.is_err() { return },
                }
                if *shutdown.borrow() {
                    return;
                }
                this.maintain().await;
            }
        })
    }

    /// Counters of a function.
    pub fn stats(&self, function: &str) -> Result<FunctionStats, InvokeError> {
        Ok(self.state(function)?.stats(self.inner.pool.tolerance))
    }

    /// Counters of every function, by name.
    pub fn all_stats(&self) -> Vec<(String, FunctionStats)> {
        let mut out: Vec<_> = self
            .all_states()
            .iter()
            .map(|st| (st.spec.name.clone(), st.stats(self.inner.pool.tolerance)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Wait until `function`'s stats satisfy `pred`: checked now and after
    /// every pool change (a sandbox started, taken, released or stopped).
    pub async fn wait_until(
        &self,
        function: &str,
        mut pred: impl FnMut(&FunctionStats) -> bool,
    ) -> Result<FunctionStats, InvokeError> {
        let mut changed = self.inner.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let st = self.stats(function)?;
            if pred(&st) {
                return Ok(st);
            }
            // The sender lives as long as `self`.
            if changed.changed().await.is_err() {
                return Err(InvokeError::ShuttingDown);
            }
        }
    }

    /// Refuse new calls and stop every idle sandbox. Busy sandboxes stop when
    /// their invocation ends; background starts are waited for and stopped.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let states = self.all_states();
        for st in states {
            let idle: Vec<_> = st.idle_lock().drain().flat_map(|(_, v)| v).collect();
            for i in idle {
                st.shared.note_memory(i.sandbox.as_ref());
                i.sandbox.shutdown().await;
            }
        }
        // Tasks may add others (a start stopping what it started): repeat
        // until none is left.
        loop {
            let mut set = std::mem::take(
                &mut *self
                    .inner
                    .background
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if set.is_empty() {
                break;
            }
            while set.join_next().await.is_some() {}
        }
        self.pool_changed();
    }
}
