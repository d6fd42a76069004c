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
//! 4. A healthy sandbox goes back to the warm pool; idle ones are reaped
//!    after `idle_timeout` ([`Executor::reap_idle`]).
//!
//! Backends: [`process::ProcessBackend`] (namespaces, cgroups, landlock,
//! seccomp; the default where hardware KVM is missing) and
//! [`microvm::MicrovmBackend`] (a KVM microVM of `sluice-vmm` per sandbox,
//! the guest agent as its `/init`, the same protocol over a virtio-console;
//! only where the host can boot Linux guests and a guest image is built).
//! [`Routed`] sends each function to its own backend when a pipeline mixes
//! them.

mod backend;
mod error;
mod logs;
pub mod microvm;
mod pool;
pub mod process;
mod spec;

use std::path::PathBuf;

pub use backend::{Backend, Invocation, LogSink, Routed, Sandbox};
pub use error::{Fault, InvokeError, SandboxError};
pub use logs::{LogLine, LogRateLimiter, tracing_sink};
pub use pool::{Executor, FunctionStats, InvokeOptions, Response};
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
