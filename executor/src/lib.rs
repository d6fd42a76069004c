//! # sluice-executor: running functions in sandboxes
//!
//! The executor turns `invoke(function, payload)` into a call of a user's
//! Lambda-Runtime-API function inside a sandbox, and back:
//!
//! 1. [`Executor::invoke`] takes a concurrency slot of the function (a
//!    semaphore of `concurrency` permits; at most `max_queue` callers wait,
//!    more are throttled).
//! 2. It reuses an idle sandbox of the same function version and tenant, or
//!    asks the [`Backend`] for a new one (a cold start: the sandbox is ready
//!    when the runtime first asks for `invocation/next`).
//! 3. The [`Sandbox`] delivers the invocation over the agent channel
//!    (`sluice-protocol`) and waits for the response, an error, the
//!    function's exit, or the timeout (which kills the sandbox). What each
//!    frame of the agent means, at a start and during an invocation, is
//!    decided in one place for both backends (`channel.rs`); a backend only
//!    says how its sandbox is written to, killed and reported.
//! 4. A healthy sandbox goes back to the warm pool (at most `max_warm` idle).
//! 5. In the background ([`Executor::spawn_maintenance`], or one
//!    [`Executor::maintain`] step at a time with an injected [`Clock`]):
//!    idle sandboxes are reaped after `idle_timeout`, `min_warm` idle ones
//!    are kept ready, capacity is started shortly before the next burst of
//!    a function whose arrivals are periodic (and extra idle sandboxes are
//!    stopped between bursts), and the pool of a function whose folder
//!    changed is dropped (see [Warm pools](#warm-pools)).
//!
//! # Warm pools
//!
//! Each function keeps idle, initialised sandboxes per tenant. A caller
//! takes the most recently used one (a *hit*, counted as a warm start) or
//! starts a new one on its own path (a *miss*, a cold start). Everything
//! else happens in [`Executor::maintain`], one step of background upkeep
//! that [`Executor::spawn_maintenance`] runs every [`PoolConfig::tick`] (and
//! as soon as a caller takes one of the last `min_warm` idle sandboxes).
//! Times come from the executor's [`Clock`], so tests drive the pool with a
//! [`ManualClock`]. One step, per function:
//!
//! 1. **Updates.** When the function folder changed (its
//!    [`FunctionSpec::version`]), the function is registered again: its idle
//!    sandboxes are stopped (`invalidated`), busy ones are stopped when their
//!    call ends, and sandboxes starting in the background are discarded.
//! 2. **Reaping.** Idle sandboxes older than `idle_timeout` are stopped,
//!    except the newest `min_warm` of the default tenant.
//! 3. **Forecast.** Arrivals are recorded per function at call time. Arrivals
//!    less than [`PoolConfig::burst_gap`] apart form a burst; the largest
//!    number of calls in flight during a burst is its demand. When the last
//!    bursts start at regular intervals (within [`PoolConfig::tolerance`] of
//!    their median, at least three bursts), the next burst is expected one
//!    period after the last, with the largest recent demand.
//! 4. **Trimming.** Between bursts of a periodic function, when the
//!    pre-warm window is still at least [`PoolConfig::trim_gap`] away, idle
//!    sandboxes beyond `min_warm` are stopped (`trimmed`): they would idle
//!    for nothing until the next burst.
//! 5. **Refill and pre-warming.** The target is `min_warm` idle sandboxes of
//!    the default tenant, raised to the forecast demand from *lead* before
//!    the expected burst until a little after it (lead = one tick plus twice
//!    the slowest initialisation seen, at most half a period), never above
//!    `max_warm` nor the function's `concurrency`. Missing sandboxes are
//!    started in the background (`refills` for `min_warm`, `prewarmed`
//!    beyond it), at most [`PoolConfig::max_parallel_starts`] at once; a hit
//!    on a pre-warmed sandbox counts as a `prewarm_hit`.
//!
//! A function whose spec has `prewarm = false` gets steps 1, 2 and the
//! `min_warm` refill only. Idle sandboxes never exceed `max_warm`: a
//! released sandbox beyond it is stopped.
//!
//! Pre-warming is Lambda's provisioned concurrency made automatic: instead
//! of a number of sandboxes fixed ahead, the timing and size of the next
//! burst are read off the last few, so a function called every minute by a
//! scheduler has warm sandboxes around its bursts and none in between. The
//! forecast is deliberately simple (median interval, all recent intervals
//! within tolerance): an irregular function gets no forecast and behaves
//! like a plain pool with `min_warm` and `idle_timeout`.
//!
//! Backends: [`process::ProcessBackend`] (namespaces, cgroups, landlock,
//! seccomp; the default where hardware KVM is missing) and
//! [`microvm::MicrovmBackend`] (a KVM microVM of `sluice-vmm` per sandbox,
//! the guest agent as its `/init`, the same protocol over a virtio-console;
//! only where the host can boot Linux guests and a guest image is built).
//! [`Routed`] sends each function to its own backend when a pipeline mixes
//! them.
//! The microVM backend restores cold starts from a snapshot of the
//! function's VM taken once its runtime first waited for an invocation
//! ([`snapshots`]), keyed by function version and guest image.

mod backend;
mod channel;
mod clock;
mod error;
mod logs;
pub mod microvm;
mod pool;
mod prewarm;
pub mod process;
pub mod report;
pub mod snapshots;
mod spec;
pub mod tail;

use std::path::PathBuf;

pub use backend::{Backend, Invocation, LogSink, Routed, Sandbox};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Fault, InvokeError, SandboxError};
pub use logs::{LogLine, LogRateLimiter, tracing_sink};
pub use pool::{
    Executor, FunctionStats, InvokeOptions, Maintenance, PoolConfig, Response, function_arn,
};
pub use report::{InitReport, REPORT_TARGET, Report, ReportStatus, Reported};
pub use sluice_protocol::{ATTACHMENT_PATH, LogStream, MAX_ATTACHMENT};
pub use spec::FunctionSpec;

/// Find the `sluice-agent` binary: `$SLUICE_AGENT`, else next to the running
/// executable (or one folder up, for test binaries in `target/*/deps`).
pub fn locate_agent() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_AGENT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("sluice-agent"), dir.parent()?.join("sluice-agent")]
        .into_iter()
        .find(|p| p.is_file())
}
