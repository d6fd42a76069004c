//! What the executor needs to know about a function.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A function: a folder with an executable `bootstrap`, and its settings.
///
/// Defaults follow Lambda: 128 MiB, 3 s timeout, 10 s init timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// Function name (`AWS_LAMBDA_FUNCTION_NAME`).
    pub name: String,
    /// Absolute path of the function folder.
    pub dir: PathBuf,
    /// Memory limit in MiB (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`).
    pub memory_mb: u32,
    /// Invocation timeout.
    pub timeout: Duration,
    /// Time allowed from start to the runtime's first `next`.
    pub init_timeout: Duration,
    /// Maximum concurrent invocations (and so sandboxes).
    pub concurrency: u32,
    /// Callers allowed to wait for a slot beyond `concurrency`; more are
    /// rejected with [`crate::InvokeError::Throttled`].
    pub max_queue: u32,
    /// A warm sandbox idle for this long is reaped.
    pub idle_timeout: Duration,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Default tenant: sandboxes are never shared across tenants.
    pub tenant: String,
    /// `_HANDLER`.
    pub handler: String,
    /// Maximum processes and threads inside the sandbox.
    pub max_processes: u32,
    /// Size of the writable `/tmp`, MiB.
    pub tmp_mb: u32,
    /// vCPUs of a microVM sandbox (the process backend ignores it).
    /// Default 1.
    pub vcpus: u8,
    /// Idle sandboxes of the default tenant kept ready, started in the
    /// background (at most `max_warm`). Default 0.
    pub min_warm: u32,
    /// Most idle sandboxes kept; beyond it a released sandbox is stopped.
    /// Default `u32::MAX`: bounded by `concurrency` only.
    pub max_warm: u32,
    /// Whether to start sandboxes ahead of bursts when arrivals are
    /// periodic, and stop extra idle ones between bursts. Default true.
    pub prewarm: bool,
    /// Whether the microVM backend restores cold starts from a snapshot of
    /// the function's initialised VM (see [`crate::snapshots`]); the
    /// process backend ignores it. Default true.
    pub snapshot: bool,
    /// Whether the process backend runs each sandbox of the function (its
    /// agent and everything the runtime starts) on one CPU of its own
    /// choosing, the least used of those sluice may run on (see
    /// [`crate::process::CpuPlacer`]). A microVM's vCPU threads are not
    /// pinned. Default false.
    pub pin_cpu: bool,
    /// Layer folders (Lambda layers), in order: the sandbox sees them
    /// merged read-only at `/opt`, a later layer's files over an earlier
    /// one's. Default none.
    pub layers: Vec<PathBuf>,
}

impl FunctionSpec {
    /// A spec with Lambda's defaults.
    pub fn new(name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            dir: dir.into(),
            memory_mb: 128,
            timeout: Duration::from_secs(3),
            init_timeout: Duration::from_secs(10),
            concurrency: 4,
            max_queue: 64,
            idle_timeout: Duration::from_secs(300),
            env: Vec::new(),
            tenant: "default".into(),
            handler: "bootstrap".into(),
            max_processes: 1024,
            tmp_mb: 512,
            vcpus: 1,
            min_warm: 0,
            max_warm: u32::MAX,
            prewarm: true,
            snapshot: true,
            pin_cpu: false,
            layers: Vec::new(),
        }
    }

    /// A version string that changes when the settings or the files of
    /// the folder or its layers (names, sizes, modification times) change.
    /// Sandboxes are reused only for the same version.
    pub fn version(&self) -> String {
        let mut h = DefaultHasher::new();
        format!("{self:?}").hash(&mut h);
        for dir in std::iter::once(&self.dir).chain(&self.layers) {
            hash_dir(dir, &mut h, 0);
        }
        format!("{:016x}", h.finish())
    }
}

fn hash_dir(dir: &Path, h: &mut DefaultHasher, depth: usize) {
    if depth > 8 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        e.file_name().hash(h);
        let Ok(meta) = e.metadata() else { continue };
        meta.len().hash(h);
        if let Ok(m) = meta.modified() {
            m.hash(h);
        }
        if meta.is_dir() {
            hash_dir(&e.path(), h, depth + 1);
        }
    }
}
