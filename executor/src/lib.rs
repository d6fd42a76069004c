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
//!    function's exit, or the timeout (which kills the sandbox).
//! 4. A healthy sandbox goes back to the warm pool (at most `max_warm` idle).
//! 5. In the background ([`Executor::spawn_maintenance`], or one
//!    [`Executor::maintain`] step at a time with an injected [`Clock`]):
//!    idle sandboxes are reaped after `idle_timeout`, `min_warm` idle ones
//!    are kept ready, capacity is started shortly before the next burst of
//!    a function whose arrivals are periodic (and extra idle sandboxes are
//!    stopped between bursts), and the pool of a function whose folder
//!    changed is dropped. The pool module's docs describe the forecast.
//!
//! Backends: [`process::ProcessBackend`] (namespaces, cgroups, landlock,
//! seccomp; the default where hardware KVM is missing). The microVM backend
//! will implement the same traits.

mod backend;
mod clock;
mod error;
mod logs;
mod pool;
mod prewarm;
pub mod process;
mod spec;

use std::path::PathBuf;

pub use backend::{Backend, Invocation, LogSink, Sandbox};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Fault, InvokeError, SandboxError};
pub use logs::{LogLine, LogRateLimiter, tracing_sink};
pub use pool::{Executor, FunctionStats, InvokeOptions, Maintenance, PoolConfig, Response};
pub use sluice_protocol::LogStream;
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
