//! Prometheus metrics of the pollers and the `/metrics` endpoint.
//!
//! A small registry of atomics rendered in the text exposition format 0.0.4;
//! no metrics crate. Series are created on first use; series of a revoked
//! partition's lag are removed with [`Metrics::remove_partition`]. The
//! warm pools of an executor given to [`Metrics::watch_executor`] are read
//! at render time (`sluice_pool_*` and `sluice_function_max_memory_used_bytes`,
//! per function). Backfills (local runs, coordinators and `sluice worker`)
//! count their calls and items per job (`sluice_job_*`).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Upper bounds of the invoke-duration histogram buckets, in seconds.
pub const INVOKE_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every record succeeded.
    Success,
    /// The function reported some records as failed (partial batch response).
    PartialFailure,
    /// The whole batch failed.
    Failed,
}

impl BatchOutcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchOutcome::Success => "success",
            BatchOutcome::PartialFailure => "partial_failure",
            BatchOutcome::Failed => "failed",
        }
    }
}

/// Series of one metric family, keyed by label values (in the family's
/// label order), kept sorted so output is stable.
struct Family<V> {
    series: RwLock<BTreeMap<Vec<String>, V>>,
}

impl<V: Default> Family<V> {
    fn new() -> Self {
        Family {
            series: RwLock::new(BTreeMap::new()),
        }
    }

    /// Run `f` on the series with these label values, creating it if needed.
    fn with<R>(&self, labels: &[&str], f: impl FnOnce(&V) -> R) -> R {
        let key: Vec<String> = labels.iter().map(|&l| l.to_owned()).collect();
        {
            let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(v) = series.get(&key) {
                return f(v);
            }
        }
        let mut series = self.series.write().unwrap_or_else(PoisonError::into_inner);
        f(series.entry(key).or_default())
    }

    fn remove(&self, labels: &[&str]) {
        let key: Vec<String> = labels.iter().map(|&l| l.to_owned()).collect();
        self.series
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
    }

    fn for_each(&self, mut f: impl FnMut(&[String], &V) -> fmt::Result) -> fmt::Result {
        let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
        for (k, v) in series.iter() {
            f(k, v)?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket of [`INVOKE_BUCKETS`].
    buckets: [AtomicU64; INVOKE_BUCKETS.len()],
    /// Observations above the last bound.
    overflow: AtomicU64,
    /// Sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl Histogram {
    fn observe(&self, v: f64) {
        match INVOKE_BUCKETS.iter().position(|&b| v <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        // The closure always returns Some, so this cannot fail.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }
}

/// A trigger's counters, summed over its partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriggerTotals {
    /// Records consumed.
    pub records: u64,
    /// Records the filters dropped.
    pub filtered: u64,
    /// Batches retried.
    pub retries: u64,
    /// Records written to the on-failure destination.
    pub dead_lettered: u64,
}

/// A backfill job's counters so far, as its run's summary has them (see
/// [`Metrics::set_job_progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Calls that succeeded, failed (gave up) and were skipped (done by an
    /// earlier run).
    pub calls: [u64; 3],
    /// Items of those calls (failed includes unreadable items).
    pub items: [u64; 3],
    /// Attempts beyond the first.
    pub retries: u64,
    /// Items the input holds, when known.
    pub items_expected: Option<u64>,
}

/// How a job's call ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The function succeeded.
    Succeeded,
    /// The call gave up (its items are dead-lettered).
    Failed,
    /// An earlier run had done it.
    Skipped,
}

impl CallOutcome {
    const ALL: [CallOutcome; 3] = [
        CallOutcome::Succeeded,
        CallOutcome::Failed,
        CallOutcome::Skipped,
    ];

    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Succeeded => "succeeded",
            CallOutcome::Failed => "failed",
            CallOutcome::Skipped => "skipped",
        }
    }
}

/// The metrics of a sluice process. `Send + Sync`; share as `Arc<Metrics>`.
pub struct Metrics {
    records_in: Family<AtomicU64>,
    records_filtered: Family<AtomicU64>,
    batches: Family<AtomicU64>,
    retries: Family<AtomicU64>,
    dlq: Family<AtomicU64>,
    function_errors: Family<AtomicU64>,
    lag: Family<AtomicI64>,
    invoke: Family<Histogram>,
    checkpoints: Family<AtomicU64>,
    checkpoint_micros: Family<AtomicU64>,
    windows_closed: Family<AtomicU64>,
    pauses: Family<AtomicU64>,
    kafka_errors: Family<AtomicU64>,
    job_calls: Family<AtomicU64>,
    job_items: Family<AtomicU64>,
    job_retries: Family<AtomicU64>,
    job_items_expected: Family<AtomicI64>,
    job_call_duration: Family<Histogram>,
    executor: RwLock<Option<sluice_executor::Executor>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const RECORDS_IN: &str = "sluice_records_in_total";
const RECORDS_FILTERED: &str = "sluice_records_filtered_total";
const BATCHES: &str = "sluice_batches_total";
const RETRIES: &str = "sluice_retries_total";
const DLQ: &str = "sluice_dlq_records_total";
const FUNCTION_ERRORS: &str = "sluice_function_errors_total";
const LAG: &str = "sluice_partition_lag";
const INVOKE: &str = "sluice_invoke_duration_seconds";
const CHECKPOINTS: &str = "sluice_state_checkpoints_total";
const CHECKPOINT_MICROS: &str = "sluice_state_checkpoint_microseconds_total";
const WINDOWS_CLOSED: &str = "sluice_state_windows_closed_total";
const PAUSES: &str = "sluice_partition_pauses_total";
const KAFKA_ERRORS: &str = "sluice_kafka_client_errors_total";
const JOB_CALLS: &str = "sluice_job_calls_total";
const JOB_ITEMS: &str = "sluice_job_items_total";
const JOB_RETRIES: &str = "sluice_job_retries_total";
const JOB_ITEMS_EXPECTED: &str = "sluice_job_items_expected";
const JOB_CALL_DURATION: &str = "sluice_job_call_duration_seconds";

impl Metrics {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Metrics {
            records_in: Family::new(),
            records_filtered: Family::new(),
            batches: Family::new(),
            retries: Family::new(),
            dlq: Family::new(),
            function_errors: Family::new(),
            lag: Family::new(),
            invoke: Family::new(),
            checkpoints: Family::new(),
            checkpoint_micros: Family::new(),
            windows_closed: Family::new(),
            pauses: Family::new(),
            kafka_errors: Family::new(),
            job_calls: Family::new(),
            job_items: Family::new(),
            job_retries: Family::new(),
            job_items_expected: Family::new(),
            job_call_duration: Family::new(),
            executor: RwLock::new(None),
        })
    }

    /// Export the pool state and counters of `executor`'s functions.
    pub fn watch_executor(&self, executor: sluice_executor::Executor) {
        *self
            .executor
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(executor);
    }

    /// `n` records consumed from a partition.
    pub fn records_in(&self, trigger: &str, topic: &str, partition: i32, n: u64) {
        let p = partition.to_string();
        self.records_in
            .with(&[trigger, topic, &p], |c| c.fetch_add(n, Ordering::Relaxed));
    }

    /// `n` records dropped by the trigger's filters.
    pub fn records_filtered(&self, trigger: &str, n: u64) {
        self.records_filtered
            .with(&[trigger], |c| c.fetch_add(n, Ordering::Relaxed));
    }

    /// A batch ended with `outcome`.
    pub fn batch(&self, trigger: &str, outcome: BatchOutcome) {
        self.batches.with(&[trigger, outcome.as_str()], |c| {
            c.fetch_add(1, Ordering::Relaxed)
        });
    }

    /// A batch (or part of one) is retried.
    pub fn retry(&self, trigger: &str) {
        self.retries
            .with(&[trigger], |c| c.fetch_add(1, Ordering::Relaxed));
    }

    /// `n` records written to the on-failure destination.
    pub fn dlq_write(&self, trigger: &str, n: u64) {
        self.dlq
            .with(&[trigger], |c| c.fetch_add(n, Ordering::Relaxed));
    }

    /// An invocation failed with `error_type`.
    pub fn function_error(&self, trigger: &str, error_type: &str) {
        self.function_errors.with(&[trigger, error_type], |c| {
            c.fetch_add(1, Ordering::Relaxed)
        });
    }

    /// A stateful trigger saved a checkpoint, taking `elapsed`.
    pub fn state_checkpoint(&self, trigger: &str, elapsed: std::time::Duration) {
        self.checkpoints
            .with(&[trigger], |c| c.fetch_add(1, Ordering::Relaxed));
        self.checkpoint_micros.with(&[trigger], |c| {
            c.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed)
        });
    }

    /// A stateful trigger closed a window (`early`: the state outgrew
    /// `max_bytes`).
    pub fn window_closed(&self, trigger: &str, early: bool) {
        let early = if early { "true" } else { "false" };
        self.windows_closed
            .with(&[trigger, early], |c| c.fetch_add(1, Ordering::Relaxed));
    }

    /// A partition was paused: its lane held too many unfinished records.
    pub fn partition_paused(&self, trigger: &str, topic: &str, partition: i32) {
        let p = partition.to_string();
        self.pauses
            .with(&[trigger, topic, &p], |c| c.fetch_add(1, Ordering::Relaxed));
    }

    /// The trigger's consumer reported a client error (`error`: its code,
    /// such as `AllBrokersDown`), whether or not the log showed it.
    pub fn kafka_client_error(&self, trigger: &str, error: &str) {
        self.kafka_errors
            .with(&[trigger, error], |c| c.fetch_add(1, Ordering::Relaxed));
    }

    /// Pauses of all partitions of a trigger so far.
    pub fn pauses(&self, trigger: &str) -> u64 {
        Self::total(&self.pauses, trigger)
    }

    /// What a trigger has done so far, for the summary `sluice run` ends
    /// with.
    pub fn trigger_totals(&self, trigger: &str) -> TriggerTotals {
        TriggerTotals {
            records: Self::total(&self.records_in, trigger),
            filtered: Self::total(&self.records_filtered, trigger),
            retries: Self::total(&self.retries, trigger),
            dead_lettered: Self::total(&self.dlq, trigger),
        }
    }

    /// A counter family's sum over the label sets of `trigger`.
    fn total(family: &Family<AtomicU64>, trigger: &str) -> u64 {
        let mut n = 0;
        let _ = family.for_each(|labels, c| {
            if labels.first().map(String::as_str) == Some(trigger) {
                n += c.load(Ordering::Relaxed);
            }
            Ok(())
        });
        n
    }

    /// Consumer lag of a partition (high watermark minus next offset).
    pub fn set_lag(&self, trigger: &str, topic: &str, partition: i32, lag: i64) {
        let p = partition.to_string();
        self.lag
            .with(&[trigger, topic, &p], |g| g.store(lag, Ordering::Relaxed));
    }

    /// Drop a revoked partition's lag series.
    pub fn remove_partition(&self, trigger: &str, topic: &str, partition: i32) {
        let p = partition.to_string();
        self.lag.remove(&[trigger, topic, &p]);
    }

    /// A backfill's counters so far (a local run's or a coordinator's, from
    /// its summary): they replace the job's series.
    pub fn set_job_progress(&self, job: &str, p: &JobProgress) {
        for (i, outcome) in CallOutcome::ALL.iter().enumerate() {
            let labels = [job, outcome.as_str()];
            self.job_calls
                .with(&labels, |c| c.store(p.calls[i], Ordering::Relaxed));
            self.job_items
                .with(&labels, |c| c.store(p.items[i], Ordering::Relaxed));
        }
        self.job_retries
            .with(&[job], |c| c.store(p.retries, Ordering::Relaxed));
        if let Some(n) = p.items_expected {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.job_items_expected
                .with(&[job], |g| g.store(n, Ordering::Relaxed));
        }
    }

    /// A worker finished a call of `job` with `items` items after
    /// `retries` retries.
    pub fn job_call(&self, job: &str, outcome: CallOutcome, items: u64, retries: u64) {
        let labels = [job, outcome.as_str()];
        self.job_calls
            .with(&labels, |c| c.fetch_add(1, Ordering::Relaxed));
        self.job_items
            .with(&labels, |c| c.fetch_add(items, Ordering::Relaxed));
        self.job_retries
            .with(&[job], |c| c.fetch_add(retries, Ordering::Relaxed));
    }

    /// A successful call of `job` took `seconds` in its function (NaN is
    /// ignored).
    pub fn observe_job_call(&self, job: &str, seconds: f64) {
        if !seconds.is_nan() {
            self.job_call_duration.with(&[job], |h| h.observe(seconds));
        }
    }

    /// One invocation took `seconds` (NaN is ignored).
    pub fn observe_invoke(&self, trigger: &str, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        self.invoke.with(&[trigger], |h| h.observe(seconds));
    }

    /// Upper bounds (bucket edges, seconds) of the p50 and p99 invocation
    /// durations of a trigger; `None` before the first observation.
    pub fn invoke_quantiles(&self, trigger: &str) -> Option<(f64, f64)> {
        self.invoke.with(&[trigger], |h| {
            let counts: Vec<u64> = h
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
            let total: u64 = counts.iter().sum::<u64>() + h.overflow.load(Ordering::Relaxed);
            if total == 0 {
                return None;
            }
            let at = |q: f64| {
                let want = (q * total as f64).ceil() as u64;
                let mut acc = 0;
                for (i, c) in counts.iter().enumerate() {
                    acc += c;
                    if acc >= want {
                        return INVOKE_BUCKETS[i];
                    }
                }
                f64::INFINITY
            };
            Some((at(0.5), at(0.99)))
        })
    }

    /// All metrics in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) -> fmt::Result {
        counter(
            out,
            RECORDS_IN,
            "Records consumed from Kafka.",
            &["trigger", "topic", "partition"],
            &self.records_in,
        )?;
        counter(
            out,
            RECORDS_FILTERED,
            "Records dropped by event filters.",
            &["trigger"],
            &self.records_filtered,
        )?;
        counter(
            out,
            BATCHES,
            "Batches delivered to functions, by outcome.",
            &["trigger", "outcome"],
            &self.batches,
        )?;
        counter(out, RETRIES, "Batch retries.", &["trigger"], &self.retries)?;
        counter(
            out,
            DLQ,
            "Records written to the on-failure destination.",
            &["trigger"],
            &self.dlq,
        )?;
        counter(
            out,
            FUNCTION_ERRORS,
            "Failed invocations, by error type.",
            &["trigger", "error_type"],
            &self.function_errors,
        )?;

        counter(
            out,
            CHECKPOINTS,
            "State checkpoints saved by stateful triggers.",
            &["trigger"],
            &self.checkpoints,
        )?;
        counter(
            out,
            CHECKPOINT_MICROS,
            "Time spent saving state checkpoints, in microseconds.",
            &["trigger"],
            &self.checkpoint_micros,
        )?;
        counter(
            out,
            WINDOWS_CLOSED,
            "Windows closed by a final invoke, by early termination.",
            &["trigger", "early"],
            &self.windows_closed,
        )?;

        counter(
            out,
            PAUSES,
            "Partitions paused because their lane held too many unfinished records (backpressure).",
            &["trigger", "topic", "partition"],
            &self.pauses,
        )?;

        counter(
            out,
            KAFKA_ERRORS,
            "Errors the trigger's Kafka consumer reported (a broker down, a failed transport), by error code; the log shows the first of each kind, then one per 30 s.",
            &["trigger", "error"],
            &self.kafka_errors,
        )?;

        header(out, LAG, "Consumer lag per partition, in records.", "gauge")?;
        self.lag.for_each(|labels, g| {
            sample(
                out,
                LAG,
                &["trigger", "topic", "partition"],
                labels,
                None,
                g.load(Ordering::Relaxed),
            )
        })?;

        histogram(
            out,
            INVOKE,
            "Duration of function invocations.",
            "trigger",
            &self.invoke,
        )?;
        counter(
            out,
            JOB_CALLS,
            "Calls of backfill jobs, by outcome (skipped: done by an earlier run).",
            &["job", "outcome"],
            &self.job_calls,
        )?;
        counter(
            out,
            JOB_ITEMS,
            "Items of backfill jobs' calls, by outcome (failed includes unreadable items).",
            &["job", "outcome"],
            &self.job_items,
        )?;
        counter(
            out,
            JOB_RETRIES,
            "Retried attempts of backfill jobs' calls.",
            &["job"],
            &self.job_retries,
        )?;
        header(
            out,
            JOB_ITEMS_EXPECTED,
            "Items a backfill job's input holds, when known before it is read.",
            "gauge",
        )?;
        self.job_items_expected.for_each(|labels, g| {
            sample(
                out,
                JOB_ITEMS_EXPECTED,
                &["job"],
                labels,
                None,
                g.load(Ordering::Relaxed),
            )
        })?;
        histogram(
            out,
            JOB_CALL_DURATION,
            "Duration of backfill jobs' successful calls in their function.",
            "job",
            &self.job_call_duration,
        )?;
        self.render_pools(out)
    }

    fn render_pools(&self, out: &mut String) -> fmt::Result {
        let executor = self
            .executor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(executor) = executor else {
            return Ok(());
        };
        let stats = executor.all_stats();
        for (name, help, kind, value) in POOL_SERIES {
            header(out, name, help, kind)?;
            for (function, st) in &stats {
                if let Some(v) = value(st) {
                    sample(
                        out,
                        name,
                        &["function"],
                        std::slice::from_ref(function),
                        None,
                        v,
                    )?;
                }
            }
        }
        Ok(())
    }
}

type PoolValue = fn(&sluice_executor::FunctionStats) -> Option<String>;

/// Pool series per function: name, help, type, value (`None`: no sample).
const POOL_SERIES: [(&str, &str, &str, PoolValue); 15] = [
    (
        "sluice_pool_idle_sandboxes",
        "Idle initialised sandboxes.",
        "gauge",
        |s| Some(s.idle.to_string()),
    ),
    (
        "sluice_pool_busy_sandboxes",
        "Sandboxes running an invocation.",
        "gauge",
        |s| Some(s.busy.to_string()),
    ),
    (
        "sluice_pool_starting_sandboxes",
        "Sandboxes being started in the background.",
        "gauge",
        |s| Some(s.starting.to_string()),
    ),
    (
        "sluice_pool_burst_period_seconds",
        "Detected interval between bursts of calls (only when periodic).",
        "gauge",
        |s| s.period.map(|p| format_float(p.as_secs_f64())),
    ),
    (
        "sluice_pool_hits_total",
        "Invocations served by an idle sandbox (warm starts).",
        "counter",
        |s| Some(s.warm_starts.to_string()),
    ),
    (
        "sluice_pool_misses_total",
        "Invocations that started a sandbox on their own path (cold starts).",
        "counter",
        |s| Some(s.cold_starts.to_string()),
    ),
    (
        "sluice_pool_prewarm_hits_total",
        "Hits on sandboxes started ahead of an expected burst.",
        "counter",
        |s| Some(s.prewarm_hits.to_string()),
    ),
    (
        "sluice_pool_refills_total",
        "Sandboxes started in the background to keep min_warm ready.",
        "counter",
        |s| Some(s.refills.to_string()),
    ),
    (
        "sluice_pool_prewarmed_total",
        "Sandboxes started in the background ahead of an expected burst.",
        "counter",
        |s| Some(s.prewarmed.to_string()),
    ),
    (
        "sluice_pool_reaped_total",
        "Idle sandboxes stopped after idle_timeout.",
        "counter",
        |s| Some(s.reaped.to_string()),
    ),
    (
        "sluice_pool_trimmed_total",
        "Idle sandboxes stopped between bursts.",
        "counter",
        |s| Some(s.trimmed.to_string()),
    ),
    (
        "sluice_pool_invalidated_total",
        "Idle sandboxes stopped because the function was updated.",
        "counter",
        |s| Some(s.invalidated.to_string()),
    ),
    (
        "sluice_pool_start_failures_total",
        "Background sandbox starts that failed.",
        "counter",
        |s| Some(s.start_failures.to_string()),
    ),
    (
        "sluice_pool_throttles_total",
        "Calls rejected because the function's queue was full.",
        "counter",
        |s| Some(s.throttles.to_string()),
    ),
    (
        "sluice_function_max_memory_used_bytes",
        "The most memory one of the function's sandboxes has used at once (Lambda's Max Memory Used; read at most once a second).",
        "gauge",
        |s| s.max_memory_used.map(|b| b.to_string()),
    ),
];

fn counter(
    out: &mut String,
    name: &str,
    help: &str,
    label_names: &[&str],
    family: &Family<AtomicU64>,
) -> fmt::Result {
    header(out, name, help, "counter")?;
    family.for_each(|labels, c| {
        sample(
            out,
            name,
            label_names,
            labels,
            None,
            c.load(Ordering::Relaxed),
        )
    })
}

/// A histogram family with one label, in [`INVOKE_BUCKETS`].
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    family: &Family<Histogram>,
) -> fmt::Result {
    header(out, name, help, "histogram")?;
    let bucket = format!("{name}_bucket");
    let sum = format!("{name}_sum");
    let count = format!("{name}_count");
    family.for_each(|labels, h| {
        let mut cumulative = 0u64;
        for (bound, b) in INVOKE_BUCKETS.iter().zip(&h.buckets) {
            cumulative += b.load(Ordering::Relaxed);
            sample(
                out,
                &bucket,
                &[label],
                labels,
                Some(&format_float(*bound)),
                cumulative,
            )?;
        }
        cumulative += h.overflow.load(Ordering::Relaxed);
        sample(out, &bucket, &[label], labels, Some("+Inf"), cumulative)?;
        let s = f64::from_bits(h.sum.load(Ordering::Relaxed));
        sample(out, &sum, &[label], labels, None, format_float(s))?;
        sample(out, &count, &[label], labels, None, cumulative)
    })
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) -> fmt::Result {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    writeln!(out)?;
    writeln!(out, "# TYPE {name} {kind}")
}

fn sample(
    out: &mut String,
    name: &str,
    label_names: &[&str],
    label_values: &[String],
    le: Option<&str>,
    value: impl fmt::Display,
) -> fmt::Result {
    out.push_str(name);
    let mut labels = label_names
        .iter()
        .copied()
        .zip(label_values.iter().map(String::as_str))
        .chain(le.map(|le| ("le", le)))
        .peekable();
    if labels.peek().is_some() {
        out.push('{');
        for (i, (k, v)) in labels.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    writeln!(out, " {value}")
}

/// Escape a label value: backslash, double quote and line feed.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A float as Prometheus writes it (`+Inf`, `-Inf`, `NaN`, else Rust's
/// shortest round-trip form).
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

/// Longest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request and take the response.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `GET /metrics` (and `HEAD`; 404 for other paths, 405 for other
/// methods) on an already-bound listener until `shutdown` resolves.
/// HTTP/1.1, one request per connection (`Connection: close`). When
/// `shutdown` resolves the listener is closed and connections still being
/// served are dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut connections = JoinSet::new();
    crate::accept_until(
        "metrics endpoint",
        listener,
        shutdown,
        &mut connections,
        |stream, peer| {
            let metrics = Arc::clone(&metrics);
            async move {
                match tokio::time::timeout(CONNECTION_TIMEOUT, handle(stream, &metrics)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection failed"),
                    Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                }
            }
        },
    )
    .await;
    connections.shutdown().await;
    Ok(())
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break Some(i);
        }
        if buf.len() > MAX_REQUEST_HEAD {
            break None;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(());
            }
            break None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };

    let request_line = head_len.and_then(|n| {
        let head = std::str::from_utf8(&buf[..n]).ok()?;
        let line = head.split("\r\n").next()?;
        let mut parts = line.split(' ');
        let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
        (parts.next().is_none() && version.starts_with("HTTP/1.")).then_some((method, target))
    });

    let (status, extra, body, send_body) = match request_line {
        None => ("400 Bad Request", "", "bad request\n".to_owned(), true),
        Some((method, target)) => {
            let path = target.split_once('?').map_or(target, |(p, _)| p);
            match (method, path) {
                ("GET", "/metrics") => ("200 OK", "", metrics.render(), true),
                ("HEAD", "/metrics") => ("200 OK", "", metrics.render(), false),
                (_, "/metrics") => (
                    "405 Method Not Allowed",
                    "Allow: GET, HEAD\r\n",
                    "method not allowed\n".to_owned(),
                    true,
                ),
                _ => ("404 Not Found", "", "not found\n".to_owned(), true),
            }
        }
    };
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// One sample line: name, labels (unescaped), value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }

    fn parse_value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            s => s.parse().unwrap_or_else(|_| panic!("bad value {s:?}")),
        }
    }

    /// Parse and validate exposition-format text; returns the samples with
    /// the family (from `# TYPE`) each belongs to.
    fn parse_exposition(text: &str) -> (HashMap<String, String>, Vec<Sample>) {
        assert!(text.ends_with('\n'), "text must end with a newline");
        let mut types = HashMap::new();
        let mut helps = HashMap::new();
        let mut current: Option<(String, String)> = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("HELP text");
                assert!(is_name(name, true), "{line}");
                assert!(
                    helps.insert(name.to_owned(), ()).is_none(),
                    "dup HELP {name}"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE kind");
                assert!(is_name(name, true), "{line}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(helps.contains_key(name), "HELP before TYPE for {name}");
                assert!(types.insert(name.to_owned(), kind.to_owned()).is_none());
                current = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            // name
            let end = line.find(['{', ' ']).expect("sample without value");
            let name = &line[..end];
            assert!(is_name(name, true), "{line}");
            let (family, kind) = current.as_ref().expect("sample before TYPE");
            let ok = if kind == "histogram" {
                [
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ]
                .contains(&name.to_owned())
            } else {
                name == family
            };
            assert!(ok, "sample {name} outside its family {family}");
            let mut rest = &line[end..];
            let mut labels = Vec::new();
            if let Some(r) = rest.strip_prefix('{') {
                let mut chars = r.char_indices().peekable();
                loop {
                    // label name up to '='
                    let start = chars.peek().expect("label").0;
                    let mut eq = None;
                    for (i, c) in chars.by_ref() {
                        if c == '=' {
                            eq = Some(i);
                            break;
                        }
                    }
                    let lname = &r[start..eq.expect("=")];
                    assert!(is_name(lname, false), "label name {lname:?} in {line}");
                    assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("unterminated label value").1 {
                            '"' => break,
                            '\\' => match chars.next().expect("escape").1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                c => panic!("bad escape \\{c} in {line}"),
                            },
                            '\n' => panic!("raw newline"),
                            c => value.push(c),
                        }
                    }
                    labels.push((lname.to_owned(), value));
                    match chars.next().expect("after label").1 {
                        ',' => continue,
                        '}' => {
                            let i = chars.peek().map_or(r.len(), |x| x.0);
                            rest = &r[i..];
                            break;
                        }
                        c => panic!("unexpected {c:?} in {line}"),
                    }
                }
            }
            let value = rest.strip_prefix(' ').expect("space before value");
            assert!(!value.contains(' '), "timestamps are not used: {line}");
            samples.push((name.to_owned(), labels, parse_value(value)));
        }
        (types, samples)
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pool_series_follow_the_executor() {
        use sluice_executor::process::{ProcessBackend, ProcessConfig};
        use sluice_executor::{Executor, FunctionSpec};
        let f = sluice_test_support::function_fixture("echo");
        let backend =
            ProcessBackend::new(ProcessConfig::detect(sluice_test_support::agent_binary()));
        let ex = Executor::new(Arc::new(backend));
        ex.register(FunctionSpec::new("echo", &f.dir));
        let m = Metrics::new();
        m.watch_executor(ex.clone());
        for p in ["1", "2", "3"] {
            assert_eq!(ex.invoke("echo", p).await.unwrap().payload, p.as_bytes());
        }
        let text = m.render();
        let (types, samples) = parse_exposition(&text);
        assert_eq!(types["sluice_pool_idle_sandboxes"], "gauge");
        assert_eq!(types["sluice_pool_hits_total"], "counter");
        let v = |name: &str| {
            let found = find(&samples, name, &[("function", "echo")]);
            assert_eq!(found.len(), 1, "{name}:\n{text}");
            found[0].2
        };
        assert_eq!(v("sluice_pool_misses_total"), 1.0);
        assert_eq!(v("sluice_pool_hits_total"), 2.0);
        assert_eq!(v("sluice_pool_idle_sandboxes"), 1.0);
        assert_eq!(v("sluice_pool_busy_sandboxes"), 0.0);
        assert_eq!(v("sluice_pool_prewarmed_total"), 0.0);
        // The first call read the sandbox's peak memory (from its cgroup).
        assert_eq!(types["sluice_function_max_memory_used_bytes"], "gauge");
        let peak = v("sluice_function_max_memory_used_bytes");
        assert!(peak > 0.0 && peak < 128.0 * 1048576.0, "{text}");
        assert!(
            find(&samples, "sluice_pool_burst_period_seconds", &[]).is_empty(),
            "no period before a pattern:\n{text}"
        );
        ex.shutdown().await;
    }

    #[test]
    fn render_is_valid_exposition_format() {
        let m = Metrics::new();
        let nasty = "we\"ird\\trig\nger";
        m.records_in("t1", "orders", 0, 5);
        m.records_in("t1", "orders", 0, 2);
        m.records_in("t1", "orders", 1, 1);
        m.records_in(nasty, "x", 3, 9);
        m.records_filtered("t1", 4);
        m.batch("t1", BatchOutcome::Success);
        m.batch("t1", BatchOutcome::Success);
        m.batch("t1", BatchOutcome::PartialFailure);
        m.batch("t1", BatchOutcome::Failed);
        m.retry("t1");
        m.dlq_write("t1", 3);
        m.function_error("t1", "Runtime.Timeout");
        m.function_error("t1", "Handled \"oops\"");
        m.set_lag("t1", "orders", 0, 42);
        m.set_lag("t1", "orders", 1, 7);
        m.set_lag("t1", "orders", 1, 8);
        for s in [0.0001, 0.0005, 0.003, 0.2, 0.2, 1.0, 45.0, 61.0, 1000.0] {
            m.observe_invoke("t1", s);
        }
        m.observe_invoke("t1", f64::NAN);
        m.observe_invoke(nasty, 0.01);
        m.state_checkpoint("t1", std::time::Duration::from_micros(250));
        m.state_checkpoint("t1", std::time::Duration::from_micros(750));
        m.window_closed("t1", false);
        m.window_closed("t1", true);
        m.window_closed("t1", true);
        m.partition_paused("t1", "orders", 1);
        m.partition_paused("t1", "orders", 1);
        m.partition_paused("t2", "orders", 0);
        m.kafka_client_error("t1", "AllBrokersDown");
        m.kafka_client_error("t1", "AllBrokersDown");
        m.kafka_client_error("t1", "BrokerTransportFailure");

        let text = m.render();
        let (types, samples) = parse_exposition(&text);

        assert_eq!(types["sluice_records_in_total"], "counter");
        assert_eq!(types["sluice_partition_lag"], "gauge");
        assert_eq!(types["sluice_invoke_duration_seconds"], "histogram");
        for name in [
            "sluice_records_filtered_total",
            "sluice_batches_total",
            "sluice_retries_total",
            "sluice_dlq_records_total",
            "sluice_function_errors_total",
            "sluice_partition_pauses_total",
            "sluice_kafka_client_errors_total",
        ] {
            assert_eq!(types[name], "counter", "{name}");
        }
        assert_eq!(m.pauses("t1"), 2);
        assert_eq!(m.pauses("t2"), 1);
        assert_eq!(m.pauses("t3"), 0);

        let v = |name: &str, labels: &[(&str, &str)]| {
            let found = find(&samples, name, labels);
            assert_eq!(found.len(), 1, "{name} {labels:?}:\n{text}");
            found[0].2
        };
        assert_eq!(
            v(
                "sluice_records_in_total",
                &[("trigger", "t1"), ("topic", "orders"), ("partition", "0")]
            ),
            7.0
        );
        assert_eq!(
            v(
                "sluice_records_in_total",
                &[("trigger", nasty), ("partition", "3")]
            ),
            9.0
        );
        assert_eq!(
            v("sluice_records_filtered_total", &[("trigger", "t1")]),
            4.0
        );
        assert_eq!(
            v(
                "sluice_partition_pauses_total",
                &[("trigger", "t1"), ("topic", "orders"), ("partition", "1")]
            ),
            2.0
        );
        assert_eq!(
            v(
                "sluice_kafka_client_errors_total",
                &[("trigger", "t1"), ("error", "AllBrokersDown")]
            ),
            2.0
        );
        assert_eq!(
            v("sluice_state_checkpoints_total", &[("trigger", "t1")]),
            2.0
        );
        assert_eq!(
            v(
                "sluice_state_checkpoint_microseconds_total",
                &[("trigger", "t1")]
            ),
            1000.0
        );
        assert_eq!(
            v(
                "sluice_state_windows_closed_total",
                &[("trigger", "t1"), ("early", "true")]
            ),
            2.0
        );
        assert_eq!(
            v(
                "sluice_batches_total",
                &[("trigger", "t1"), ("outcome", "success")]
            ),
            2.0
        );
        assert_eq!(
            v(
                "sluice_batches_total",
                &[("trigger", "t1"), ("outcome", "partial_failure")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "sluice_batches_total",
                &[("trigger", "t1"), ("outcome", "failed")]
            ),
            1.0
        );
        assert_eq!(v("sluice_retries_total", &[("trigger", "t1")]), 1.0);
        assert_eq!(v("sluice_dlq_records_total", &[("trigger", "t1")]), 3.0);
        assert_eq!(
            v(
                "sluice_function_errors_total",
                &[("error_type", "Handled \"oops\"")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "sluice_partition_lag",
                &[("topic", "orders"), ("partition", "1")]
            ),
            8.0
        );
        // Label order as declared.
        assert!(text.contains(
            "sluice_records_in_total{trigger=\"we\\\"ird\\\\trig\\nger\",topic=\"x\",partition=\"3\"} 9\n"
        ));

        // Histogram: buckets in order, cumulative, +Inf last and == _count.
        let buckets = find(
            &samples,
            "sluice_invoke_duration_seconds_bucket",
            &[("trigger", "t1")],
        );
        assert_eq!(buckets.len(), INVOKE_BUCKETS.len() + 1);
        let les: Vec<f64> = buckets
            .iter()
            .map(|(_, l, _)| parse_value(&l.iter().find(|(k, _)| k == "le").expect("le").1))
            .collect();
        let mut expected_les = INVOKE_BUCKETS.to_vec();
        expected_les.push(f64::INFINITY);
        assert_eq!(les, expected_les);
        let counts: Vec<f64> = buckets.iter().map(|s| s.2).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts[0], 2.0); // 0.0001 and 0.0005 (le is inclusive)
        assert_eq!(counts[INVOKE_BUCKETS.len() - 1], 7.0); // <= 60
        let count = v("sluice_invoke_duration_seconds_count", &[("trigger", "t1")]);
        assert_eq!(count, 9.0);
        assert_eq!(*counts.last().expect("+Inf"), count);
        let sum = v("sluice_invoke_duration_seconds_sum", &[("trigger", "t1")]);
        assert!((sum - 1107.4036).abs() < 1e-9, "{sum}");
        assert_eq!(
            v(
                "sluice_invoke_duration_seconds_count",
                &[("trigger", nasty)]
            ),
            1.0
        );
    }

    #[test]
    fn remove_partition_drops_lag_only() {
        let m = Metrics::new();
        m.records_in("t", "a", 0, 1);
        m.set_lag("t", "a", 0, 5);
        m.set_lag("t", "a", 1, 6);
        m.remove_partition("t", "a", 0);
        let (_, samples) = parse_exposition(&m.render());
        assert!(find(&samples, "sluice_partition_lag", &[("partition", "0")]).is_empty());
        assert_eq!(
            find(&samples, "sluice_partition_lag", &[("partition", "1")]).len(),
            1
        );
        assert_eq!(
            find(&samples, "sluice_records_in_total", &[("partition", "0")]).len(),
            1
        );
    }

    #[test]
    fn empty_registry_renders_headers_only() {
        let text = Metrics::new().render();
        let (types, samples) = parse_exposition(&text);
        assert_eq!(types.len(), 18);
        assert!(samples.is_empty());
    }

    /// A backfill's summary replaces its job's series; a worker's calls add
    /// to them.
    #[test]
    fn job_series_follow_summaries_and_worker_calls() {
        let m = Metrics::new();
        let mut p = JobProgress {
            calls: [3, 1, 2],
            items: [30, 10, 20],
            retries: 4,
            items_expected: Some(100),
        };
        m.set_job_progress("daily", &p);
        p.calls[0] = 5;
        p.items[0] = 50;
        m.set_job_progress("daily", &p);
        m.job_call("remote", CallOutcome::Succeeded, 10, 0);
        m.job_call("remote", CallOutcome::Succeeded, 7, 2);
        m.job_call("remote", CallOutcome::Failed, 3, 1);
        m.observe_job_call("remote", 0.003);
        m.observe_job_call("remote", 0.2);
        let text = m.render();
        let (types, samples) = parse_exposition(&text);
        assert_eq!(types["sluice_job_calls_total"], "counter");
        assert_eq!(types["sluice_job_items_expected"], "gauge");
        assert_eq!(types["sluice_job_call_duration_seconds"], "histogram");
        let value = |name: &str, labels: &[(&str, &str)]| {
            let found = find(&samples, name, labels);
            assert_eq!(found.len(), 1, "{name} {labels:?}:\n{text}");
            found[0].2
        };
        let calls = "sluice_job_calls_total";
        assert_eq!(
            value(calls, &[("job", "daily"), ("outcome", "succeeded")]),
            5.0
        );
        assert_eq!(
            value(calls, &[("job", "daily"), ("outcome", "skipped")]),
            2.0
        );
        assert_eq!(
            value(
                "sluice_job_items_total",
                &[("job", "daily"), ("outcome", "succeeded")]
            ),
            50.0
        );
        assert_eq!(
            value("sluice_job_items_expected", &[("job", "daily")]),
            100.0
        );
        assert_eq!(
            value(calls, &[("job", "remote"), ("outcome", "succeeded")]),
            2.0
        );
        assert_eq!(
            value(
                "sluice_job_items_total",
                &[("job", "remote"), ("outcome", "failed")]
            ),
            3.0
        );
        assert_eq!(value("sluice_job_retries_total", &[("job", "remote")]), 3.0);
        assert_eq!(
            value(
                "sluice_job_call_duration_seconds_count",
                &[("job", "remote")]
            ),
            2.0
        );
        assert_eq!(
            value(
                "sluice_job_call_duration_seconds_bucket",
                &[("job", "remote"), ("le", "0.005")]
            ),
            1.0
        );
    }

    #[test]
    fn concurrent_updates_are_counted() {
        let m = Metrics::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..1000 {
                        m.records_in("t", "a", i % 3, 1);
                        m.observe_invoke("t", 0.5);
                    }
                });
            }
        });
        let (_, samples) = parse_exposition(&m.render());
        let total: f64 = find(&samples, "sluice_records_in_total", &[("trigger", "t")])
            .iter()
            .map(|s| s.2)
            .sum();
        assert_eq!(total, 4000.0);
        let sum = find(&samples, "sluice_invoke_duration_seconds_sum", &[])[0].2;
        assert_eq!(sum, 2000.0);
    }

    async fn request(addr: std::net::SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8(out).expect("utf-8 response")
    }

    fn split_response(resp: &str) -> (&str, Vec<(String, String)>, &str) {
        let (head, body) = resp.split_once("\r\n\r\n").expect("head");
        let mut lines = head.split("\r\n");
        let status = lines.next().expect("status line");
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header");
                (k.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        (status, headers, body)
    }

    fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn serves_metrics_until_shutdown() {
        let m = Metrics::new();
        m.records_in("t", "a", 0, 3);
        m.observe_invoke("t", 0.02);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::clone(&m), async move {
            let _ = stopped.await;
        }));

        let resp = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (status, headers, body) = split_response(&resp);
        assert_eq!(status, "HTTP/1.1 200 OK");
        let ct = header_value(&headers, "content-type").expect("content-type");
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert_eq!(header_value(&headers, "connection"), Some("close"));
        assert_eq!(
            header_value(&headers, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert_eq!(body, m.render());
        assert!(
            body.contains("sluice_records_in_total{trigger=\"t\",topic=\"a\",partition=\"0\"} 3\n")
        );

        let resp = request(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");

        let resp = request(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        let (status, _, body) = split_response(&resp);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "");

        let resp = request(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");

        let resp = request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(
            resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{resp}"
        );

        let resp = request(addr, "garbage\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");

        // A connection that is open but silent when shutdown comes does not
        // hold the server up.
        let _idle = TcpStream::connect(addr).await.expect("connect");

        stop.send(()).expect("server running");
        server.await.expect("join").expect("serve");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
