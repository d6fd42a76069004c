//! The process sandbox backend: every sandbox is a `sluice-agent` process that
//! builds its own namespaces (see `sluice_agent::isolate`), with memory and
//! pids limits from cgroups, killed with its whole process group and PID
//! namespace on timeout.

mod cgroup;
mod cpus;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getegid, geteuid};
use sluice_protocol::{Message, SANDBOX_ROOT_HOST_ID, StartConfig, encode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

pub use cgroup::{CgroupSupport, SandboxCgroup};
pub use cpus::{CpuLease, CpuPlacer, WakeCost, measure_wake_cost};

use crate::backend::{Backend, Invocation, LogSink, Sandbox};
use crate::channel::{
    AgentEnd, FrameResult, InitEnd, init_end, invoke_over, read_frames, recv_until, sandbox_err,
    write_parts,
};
use crate::logs::{LogLine, LogRateLimiter};
use crate::{FunctionSpec, InvokeError, SandboxError};

/// Host paths offered read-only inside every sandbox as its runtime base.
pub const DEFAULT_RUNTIME_LAYERS: &[&str] = &["/usr", "/bin", "/lib", "/lib64", "/sbin"];

/// Settings of the process backend.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Path of the `sluice-agent` binary.
    pub agent: PathBuf,
    /// Folder for the sandboxes' mount points.
    pub run_dir: PathBuf,
    /// Runtime layers (see [`DEFAULT_RUNTIME_LAYERS`]).
    pub runtime_layers: Vec<String>,
    /// Cgroup support found on this host.
    pub cgroups: CgroupSupport,
    /// Log lines per second a sandbox may emit (bursts up to 10 times this);
    /// the rest is counted and reported as dropped.
    pub log_lines_per_sec: u32,
}

impl ProcessConfig {
    /// Defaults for this host: cgroups probed, run folder under the temp dir.
    pub fn detect(agent: PathBuf) -> Self {
        let run_dir = std::env::temp_dir().join(format!("sluice-{}", geteuid().as_raw()));
        Self {
            agent,
            run_dir,
            runtime_layers: DEFAULT_RUNTIME_LAYERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            cgroups: CgroupSupport::detect(),
            log_lines_per_sec: 200,
        }
    }
}

/// How long a stopping sandbox's agent may take to end before it is
/// killed: extensions that take `SHUTDOWN` events get 300 ms of it, then
/// the agent relays their last lines.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(1000);

/// Size asked for the channel's pipes.
const PIPE_SIZE: i32 = 1 << 20;

/// Sandbox ids are `<host pid>-<n>`, unique in this process whatever the
/// number of backends (they name cgroups and mount points).
static NEXT_SANDBOX: AtomicU64 = AtomicU64::new(0);

/// The process sandbox backend.
#[derive(Debug)]
pub struct ProcessBackend {
    cfg: ProcessConfig,
    /// Where sandboxes of `pin_cpu` functions go; `None` when this
    /// process's CPUs could not be read (they then run unpinned).
    cpus: Option<Arc<CpuPlacer>>,
}

impl ProcessBackend {
    /// A backend with these settings. Leftovers of sluice processes that
    /// died without cleaning up (mount points, cgroups) are removed.
    pub fn new(cfg: ProcessConfig) -> Self {
        sweep_stale(&cfg);
        Self {
            cfg,
            cpus: CpuPlacer::from_affinity().map(Arc::new),
        }
    }

    /// The settings.
    pub fn config(&self) -> &ProcessConfig {
        &self.cfg
    }

    /// The placer of pinned sandboxes (`pin_cpu`), if this process's CPUs
    /// could be read.
    pub fn cpu_placer(&self) -> Option<&Arc<CpuPlacer>> {
        self.cpus.as_ref()
    }
}

fn host_err(function: &str, what: String, source: std::io::Error) -> InvokeError {
    InvokeError::Sandbox {
        function: function.to_owned(),
        source: SandboxError::Host { what, source },
    }
}

fn make_dir_0755(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
}

#[async_trait]
impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError> {
        let started = Instant::now();
        let fname = spec.name.as_str();
        let n = NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}", std::process::id(), n);
        let sandboxes = self.cfg.run_dir.join("sandboxes");
        make_dir_0755(&self.cfg.run_dir)
            .and_then(|()| make_dir_0755(&sandboxes))
            .map_err(|e| host_err(fname, format!("creating {}", sandboxes.display()), e))?;
        let root_dir = sandboxes.join(&id);
        make_dir_0755(&root_dir)
            .map_err(|e| host_err(fname, format!("creating {}", root_dir.display()), e))?;
        let memory_bytes = u64::from(spec.memory_mb) * 1024 * 1024;
        let cgroup =
            SandboxCgroup::create(&self.cfg.cgroups, &id, memory_bytes, spec.max_processes)
                .map_err(|e| host_err(fname, format!("creating cgroups for sandbox {id}"), e))?;
        let host_root = geteuid().is_root();
        let cfg = StartConfig {
            function_name: spec.name.clone(),
            function_version: "$LATEST".into(),
            memory_mb: spec.memory_mb,
            handler: spec.handler.clone(),
            log_group: format!("/aws/lambda/{}", spec.name),
            log_stream: format!("{tenant}/[$LATEST]{id}"),
            function_dir: spec.dir.to_string_lossy().into_owned(),
            task_root: "/var/task".into(),
            root_dir: root_dir.to_string_lossy().into_owned(),
            runtime_layers: self.cfg.runtime_layers.clone(),
            layers: spec
                .layers
                .iter()
                .map(|l| l.to_string_lossy().into_owned())
                .collect(),
            tmp_mb: spec.tmp_mb,
            rlimit_nproc: if cgroup.is_some() {
                0
            } else {
                spec.max_processes
            },
            // Without a memory cgroup, an address-space limit is the only
            // (crude) bound; runtimes reserve far more than they touch.
            rlimit_as_bytes: if cgroup.is_some() {
                0
            } else {
                memory_bytes.saturating_mul(8).max(1 << 30)
            },
            runtime_api_port: 9001,
            env: spec.env.clone(),
            run_as: host_root.then_some((993, 990)),
            isolate: true,
        };

        let mut child = Command::new(&self.cfg.agent)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| {
                sandbox_err(
                    fname,
                    SandboxError::Spawn {
                        agent: self.cfg.agent.display().to_string(),
                        source,
                    },
                )
            })?;
        let pid = child.id().unwrap_or(0);
        // Pinned before `Start`: stage 1 and the runtime, started later,
        // inherit the agent's CPU.
        let cpu = match (spec.pin_cpu, &self.cpus) {
            (true, Some(placer)) => placer.place().and_then(|lease| {
                match cpus::pin(pid, lease.cpu()) {
                    Ok(()) => Some(lease),
                    Err(e) => {
                        // Once per process: where pinning is refused (a
                        // container's seccomp profile), every start fails alike.
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        WARNED.call_once(|| {
                            tracing::warn!(function = fname, cpu = lease.cpu(), error = %e, "pin_cpu: sandboxes left unpinned (sched_setaffinity refused)");
                        });
                        None
                    }
                }
            }),
            _ => None,
        };
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        // Events of a few hundred KB cross in one or two pipe fills rather
        // than a context switch per 64 KiB (best effort: the size is capped
        // by /proc/sys/fs/pipe-max-size).
        for fd in [stdin.as_fd(), stdout.as_fd()] {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        let stderr = child.stderr.take().expect("piped stderr");

        let limiter = Arc::new(LogRateLimiter::new(self.cfg.log_lines_per_sec));
        let (tx, rx) = mpsc::channel(64);
        let meta = Arc::new((spec.name.clone(), tenant.to_owned()));
        tokio::spawn(read_frames(
            stdout,
            tx,
            logs.clone(),
            limiter.clone(),
            meta.clone(),
            move || {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            },
        ));
        tokio::spawn(read_agent_stderr(stderr, logs, limiter, meta));

        let mut sb = ProcessSandbox {
            function: spec.name.clone(),
            memory_mb: spec.memory_mb,
            child: Some(child),
            pid,
            stdin,
            rx,
            cgroup,
            root_dir,
            dead: false,
            init: Duration::ZERO,
            _cpu: cpu,
        };
        let init_deadline = started + spec.init_timeout;
        if let Err(e) = sb.send(&Message::Start(Box::new(cfg))).await {
            return Err(sb.abort(e).await);
        }

        // Stage 0 unshares, then waits for its uid/gid maps and cgroups.
        match recv_until(&mut sb.rx, init_deadline).await {
            Some(Ok(Message::Unshared)) => {}
            other => return Err(sb.init_failure(other).await),
        }
        if let Err(e) = write_id_maps(pid, host_root) {
            let err = host_err(fname, format!("writing uid/gid maps of pid {pid}"), e);
            return Err(sb.abort(err).await);
        }
        if let Some(Err(e)) = sb.cgroup.as_ref().map(|cg| cg.add(pid)) {
            let err = host_err(fname, format!("adding pid {pid} to its cgroups"), e);
            return Err(sb.abort(err).await);
        }
        if let Err(e) = sb.send(&Message::Proceed).await {
            return Err(sb.abort(e).await);
        }
        match recv_until(&mut sb.rx, init_deadline).await {
            Some(Ok(Message::Ready { init_us })) => {
                sb.init = started.elapsed();
                tracing::debug!(function = fname, tenant, init_us, sandbox = %sb.root_dir.display(), "sandbox ready");
                Ok(Box::new(sb))
            }
            other => Err(sb.init_failure(other).await),
        }
    }
}

/// Remove sandbox folders and cgroups named `<pid>-<n>` whose sluice process
/// `<pid>` is gone.
fn sweep_stale(cfg: &ProcessConfig) {
    let mut dirs = vec![cfg.run_dir.join("sandboxes")];
    match &cfg.cgroups {
        CgroupSupport::V1 { memory, pids } => dirs.extend([memory.clone(), pids.clone()]),
        CgroupSupport::V2 { base } => dirs.push(base.clone()),
        CgroupSupport::None { .. } => {}
    }
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            let alive = nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok();
            if !alive && e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

fn write_id_maps(pid: u32, host_root: bool) -> std::io::Result<()> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if host_root {
        // Sandbox root and the function's user map to unprivileged host ids.
        let (root, user) = (SANDBOX_ROOT_HOST_ID, SANDBOX_ROOT_HOST_ID - 1);
        std::fs::write(
            proc_dir.join("uid_map"),
            format!("0 {root} 1\n993 {user} 1\n"),
        )?;
        std::fs::write(
            proc_dir.join("gid_map"),
            format!("0 {root} 1\n990 {user} 1\n"),
        )?;
    } else {
        std::fs::write(proc_dir.join("setgroups"), "deny")?;
        std::fs::write(proc_dir.join("uid_map"), format!("0 {} 1\n", geteuid()))?;
        std::fs::write(proc_dir.join("gid_map"), format!("0 {} 1\n", getegid()))?;
    }
    Ok(())
}

async fn read_agent_stderr(
    stderr: tokio::process::ChildStderr,
    logs: LogSink,
    limiter: Arc<LogRateLimiter>,
    meta: Arc<(String, String)>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if limiter.admit().is_some() {
            logs(LogLine::new(
                &meta.0,
                &meta.1,
                sluice_protocol::LogStream::Agent,
                line.as_bytes(),
            ));
        }
    }
}

/// One running process sandbox.
pub struct ProcessSandbox {
    function: String,
    memory_mb: u32,
    child: Option<Child>,
    pid: u32,
    stdin: ChildStdin,
    rx: mpsc::Receiver<FrameResult>,
    cgroup: Option<SandboxCgroup>,
    root_dir: PathBuf,
    dead: bool,
    init: Duration,
    /// The CPU of a pinned sandbox, free again when it is dropped.
    _cpu: Option<CpuLease>,
}

impl std::fmt::Debug for ProcessSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSandbox")
            .field("function", &self.function)
            .field("pid", &self.pid)
            .field("dead", &self.dead)
            .finish()
    }
}

impl ProcessSandbox {
    async fn send(&mut self, msg: &Message) -> Result<(), InvokeError> {
        self.send_parts(&encode(msg), &[]).await
    }

    /// Write one frame given as two consecutive parts (see
    /// [`write_parts`]).
    async fn send_parts(&mut self, head: &[u8], rest: &[u8]) -> Result<(), InvokeError> {
        if write_parts(&mut self.stdin, head, rest).await.is_err() {
            self.kill();
            if let Ok(Err(e @ SandboxError::Protocol { .. })) = self.rx.try_recv() {
                self.dead = true;
                return Err(sandbox_err(&self.function, e));
            }
            return Err(self.crash_error("the agent channel closed").await);
        }
        Ok(())
    }

    fn kill(&mut self) {
        if self.pid != 0 {
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        self.dead = true;
    }

    fn oom(&self) -> bool {
        self.cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0)
    }

    async fn exit_detail(&mut self) -> String {
        if let Some(c) = self.child.as_mut()
            && let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), c.wait()).await
        {
            return format!("agent {status}");
        }
        "agent did not exit".into()
    }

    async fn crash_error(&mut self, context: &str) -> InvokeError {
        self.dead = true;
        if self.oom() {
            return InvokeError::OutOfMemory {
                function: self.function.clone(),
                limit_mb: self.memory_mb,
            };
        }
        let detail = self.exit_detail().await;
        InvokeError::SandboxCrashed {
            function: self.function.clone(),
            detail: format!("{context} ({detail})"),
        }
    }

    /// Kill, wait for the processes and remove the cgroups and mount point,
    /// then hand back `err`: used on every failed start.
    async fn abort(&mut self, err: InvokeError) -> InvokeError {
        self.kill();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait().await;
        }
        cleanup(self.cgroup.take(), self.root_dir.clone()).await;
        err
    }

    /// The sandbox ended during init: out of memory, or an exit error.
    fn init_exit(&self, message: String) -> InvokeError {
        if self.oom() {
            InvokeError::OutOfMemory {
                function: self.function.clone(),
                limit_mb: self.memory_mb,
            }
        } else {
            InvokeError::InitFailed {
                function: self.function.clone(),
                error_type: "Runtime.ExitError".into(),
                message,
            }
        }
    }

    async fn init_failure(&mut self, got: Option<FrameResult>) -> InvokeError {
        let err = match init_end(&self.function, got) {
            InitEnd::TimedOut => InvokeError::InitFailed {
                function: self.function.clone(),
                error_type: "Runtime.InitTimeout".into(),
                message: "the runtime did not ask for an invocation within the init timeout".into(),
            },
            InitEnd::Exited(how) => self.init_exit(how),
            InitEnd::ChannelClosed => {
                let detail = self.exit_detail().await;
                self.init_exit(format!("sandbox ended during init ({detail})"))
            }
            InitEnd::Failed(e) => e,
        };
        self.abort(err).await
    }
}

#[async_trait]
impl AgentEnd for ProcessSandbox {
    fn function(&self) -> &str {
        &self.function
    }

    fn is_dead(&self) -> bool {
        self.dead
    }

    fn frames(&mut self) -> &mut mpsc::Receiver<FrameResult> {
        &mut self.rx
    }

    async fn write_frame(&mut self, head: &[u8], body: &[u8]) -> Result<(), InvokeError> {
        self.send_parts(head, body).await
    }

    fn kill(&mut self) {
        ProcessSandbox::kill(self)
    }

    async fn crash_error(&mut self, context: &str) -> InvokeError {
        ProcessSandbox::crash_error(self, context).await
    }
}

#[async_trait]
impl Sandbox for ProcessSandbox {
    async fn invoke(&mut self, inv: Invocation, timeout: Duration) -> Result<Vec<u8>, InvokeError> {
        invoke_over(self, inv, timeout).await
    }

    fn is_reusable(&self) -> bool {
        !self.dead
    }

    fn init_duration(&self) -> Duration {
        self.init
    }

    fn max_memory_used(&self) -> Option<u64> {
        match &self.cgroup {
            Some(cg) => cg.peak_memory(),
            None if !self.dead => cgroup::process_tree_peak_memory(self.pid),
            None => None,
        }
    }

    async fn shutdown(mut self: Box<Self>) {
        if !self.dead {
            let _ = self.stdin.write_all(&encode(&Message::Shutdown)).await;
            let _ = self.stdin.flush().await;
        }
        if let Some(mut c) = self.child.take()
            && tokio::time::timeout(SHUTDOWN_WAIT, c.wait()).await.is_err()
        {
            self.child = Some(c);
            self.kill();
            if let Some(mut c) = self.child.take() {
                let _ = c.wait().await;
            }
        }
        self.dead = true;
        cleanup(self.cgroup.take(), self.root_dir.clone()).await;
    }
}

async fn cleanup(cgroup: Option<SandboxCgroup>, root_dir: PathBuf) {
    if let Some(cg) = cgroup {
        // Processes leave the cgroup asynchronously after SIGKILL.
        for _ in 0..50 {
            if cg.remove().is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = std::fs::remove_dir(&root_dir);
}

impl Drop for ProcessSandbox {
    fn drop(&mut self) {
        if self.child.is_none() && self.cgroup.is_none() {
            return;
        }
        self.kill();
        let child = self.child.take();
        let cgroup = self.cgroup.take();
        let root_dir = self.root_dir.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(mut c) = child {
                    let _ = c.wait().await;
                }
                cleanup(cgroup, root_dir).await;
            });
        }
    }
}
