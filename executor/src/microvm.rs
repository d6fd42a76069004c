//! The microVM sandbox backend: every sandbox is a KVM microVM of our own
//! VMM (`sluice-vmm`) booting the guest image built by `sluice image build`
//! (kernel + initramfs with the static agent as `/init`), with the
//! function's folder appended to the initramfs at `/var/task`, the
//! function's `memory_mb` as guest RAM and one vCPU.
//!
//! ```text
//!  MicrovmBackend::start ─▶ MicrovmSandbox::boot(setup, make_vm)
//!     spawn_blocking: VmBuilder (+ agent_channel, + console_lines) .build()
//!     thread "<vm>-run": Vm::run ──▶ end (reset / guest stop / vCPU fault / stopped)
//!                                     sent to the sandbox, then the VM is dropped,
//!                                     which closes the agent channel
//!     host end of the agent channel (Unix socket ⇄ virtio-console ⇄ /dev/hvc0)
//!        write: Start, Invoke, Shutdown frames (sluice-protocol)
//!        read task: frames → sandbox; Log frames → rate-limited LogSink
//!     serial console lines ─▶ the same rate limiter and LogSink (stream `agent`)
//! ```
//!
//! The sandbox speaks exactly the protocol of the process backend, minus the
//! `Unshared`/`Proceed` step (the VM is the sandbox, `isolate = false`). An
//! invocation timeout stops the VM ([`sluice_vmm::vm::VmStopper`]); a VM
//! that ends by itself (the guest rebooted, a vCPU faulted or
//! triple-faulted) closes the channel, and the sandbox reports
//! [`InvokeError::SandboxCrashed`] with the VM's end as its detail and
//! stops being reusable, so the pool starts a new one.
//!
//! **Function snapshots** ([`crate::snapshots`], unless the function's
//! `snapshot` is off): [`MicrovmSandbox::start`] with a [`SnapshotPlan`]
//! restores a cold start from the function's cached snapshot when there
//! is one (a clone with a new agent channel, sent a `Restored` frame with
//! its own [`CloneIdentity`] — fresh seed, sandbox id, log stream — and
//! answering `Ready`), and otherwise boots, waits for `Ready`, and has the
//! VM's run thread pause, snapshot and resume it
//! ([`sluice_vmm::vm::VmSnapshotter`]) into the cache before using it.
//! [`MicrovmSandbox::origin`] tells which happened.
//!
//! Where it lives: here, in the executor, depending on `sluice-vmm`. The
//! VMM knows nothing of functions, invocations or pools, and the executor's
//! traits, errors and log sink stay in one crate with both backends; the
//! dependency points one way (executor → vmm → KVM), and the binary only
//! picks a backend ([`MicrovmBackend::new`] refuses hosts that cannot boot
//! Linux guests, with the host probe's reasons).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_protocol::{LogStream, Message, SEED_LEN, StartConfig, encode};
use sluice_vmm::host::HostSupport;
use sluice_vmm::image::{GuestImage, ImageLayout};
use sluice_vmm::vm::{ConsoleLineSink, ResetCause, VmSnapshotter, VmStopper};
use sluice_vmm::{ExitReason, Snapshot, VmBuilder, VmConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, Invocation, LogSink, Sandbox};
use crate::channel::{
    AgentEnd, FrameResult, InitEnd, admit_line, init_end, invoke_over, read_frames, recv_until,
    sandbox_err, write_parts,
};
use crate::logs::LogRateLimiter;
use crate::snapshots::{SnapshotCache, SnapshotKey, image_identity};
use crate::{FunctionSpec, InvokeError, SandboxError};

/// `LAMBDA_TASK_ROOT` inside the guest, where the function's folder is
/// unpacked from the initramfs.
pub const GUEST_TASK_ROOT: &str = "/var/task";

/// The longest a sandbox VM may live; the pool reaps idle sandboxes long
/// before (this only bounds [`sluice_vmm::Vm::run`]).
pub const MAX_VM_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long [`Sandbox::shutdown`] waits for the guest to reboot after the
/// `Shutdown` frame before stopping the VM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a function snapshot may take (pause, write, resume).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the microVM backend cannot be used on this host.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// The host probe says Linux guests cannot boot here.
    #[error(
        "the microVM backend cannot run on this host: Linux guests cannot boot here \
         ({reasons}) (host setup, not a sluice bug; no retry: run on a server with \
         hardware KVM, or use backend = \"process\")"
    )]
    HostCannotBootLinux {
        /// The probe's reasons, joined with `; `.
        reasons: String,
    },
    /// No guest image has been built.
    #[error("no microVM guest image in {dir} (user setup: run `sluice image build`; no retry)")]
    NoGuestImage {
        /// Where images are looked for.
        dir: PathBuf,
    },
}

impl MicrovmError {
    /// Who is at fault: the host's or the user's set-up, never the function.
    pub fn fault(&self) -> crate::Fault {
        crate::Fault::External
    }

    /// Whether trying again can help: never without changing the host.
    pub fn retryable(&self) -> bool {
        false
    }
}

/// Settings of the microVM backend.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// What this host can run ([`sluice_vmm::host::probe`]).
    pub host: HostSupport,
    /// The guest image, if one is built.
    pub image: Option<GuestImage>,
    /// Where images are looked for (for messages).
    pub images_dir: PathBuf,
    /// Log lines per second a sandbox may emit (agent frames and serial
    /// console together; bursts up to 10 times this).
    pub log_lines_per_sec: u32,
    /// Where function snapshots are cached ([`crate::snapshots`]).
    pub snapshots_dir: PathBuf,
}

impl MicrovmConfig {
    /// This host's probe and the newest image under the sluice home
    /// directory `home` (see [`ImageLayout::latest_image`]).
    pub fn detect(home: &Path) -> Self {
        let layout = ImageLayout::new(home);
        Self {
            host: sluice_vmm::host::probe(),
            image: layout.latest_image(),
            images_dir: home.join("images"),
            log_lines_per_sec: 200,
            snapshots_dir: home.join("snapshots"),
        }
    }

    /// Whether sandboxes can boot with these settings: the host can boot
    /// Linux guests and an image exists. This is what `backend = "auto"`
    /// asks before it picks the microVM backend.
    pub fn check(&self) -> Result<&GuestImage, MicrovmError> {
        if !self.host.can_boot_linux() {
            return Err(MicrovmError::HostCannotBootLinux {
                reasons: self.host.linux_blockers().join("; "),
            });
        }
        self.image
            .as_ref()
            .ok_or_else(|| MicrovmError::NoGuestImage {
                dir: self.images_dir.clone(),
            })
    }
}

/// VM names are `sbx<pid>-<n>`: unique in this process, short enough for
/// the vCPU thread names (`<vm>-vcpu0`).
static NEXT_VM: AtomicU64 = AtomicU64::new(0);

/// The microVM sandbox backend.
#[derive(Debug)]
pub struct MicrovmBackend {
    cfg: MicrovmConfig,
    image: GuestImage,
    image_id: String,
    snapshots: SnapshotCache,
}

impl MicrovmBackend {
    /// A backend with these settings, or why this host cannot run it.
    pub fn new(cfg: MicrovmConfig) -> Result<Self, MicrovmError> {
        let image = cfg.check()?.clone();
        let image_id = image_identity(&image);
        let snapshots = SnapshotCache::new(&cfg.snapshots_dir);
        Ok(Self {
            cfg,
            image,
            image_id,
            snapshots,
        })
    }

    /// The settings.
    pub fn config(&self) -> &MicrovmConfig {
        &self.cfg
    }
}

#[async_trait]
impl Backend for MicrovmBackend {
    fn name(&self) -> &'static str {
        "microvm"
    }

    async fn start(
        &self,
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
    ) -> Result<Box<dyn Sandbox>, InvokeError> {
        let setup = SandboxSetup::new(
            spec,
            tenant,
            logs,
            spec.vcpus.max(1),
            self.cfg.log_lines_per_sec,
        );
        let plan = spec.snapshot.then(|| SnapshotPlan {
            cache: self.snapshots.clone(),
            key: SnapshotKey::new(
                &spec.name,
                &spec.version(),
                &self.image_id,
                setup.vm_config().mem_size,
                setup.vcpus,
            ),
        });
        let image = self.image.clone();
        let dir = spec.dir.clone();
        let layers = spec.layers.clone();
        let make_vm = move |config| {
            let boot = image
                .boot_function(&dir, &layers)
                .map_err(|e| SandboxError::Vm {
                    what: format!("preparing the guest image for {}", dir.display()),
                    message: e.to_string(),
                })?;
            Ok(VmBuilder::new(config, boot))
        };
        let sb = MicrovmSandbox::start(setup, make_vm, plan).await?;
        Ok(Box::new(sb))
    }
}

/// What a sandbox VM is started with.
#[derive(Clone)]
pub struct SandboxSetup {
    /// The function.
    pub spec: FunctionSpec,
    /// The tenant.
    pub tenant: String,
    /// The VM's name (unique per process; names its threads).
    pub vm_name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Log lines per second (see [`MicrovmConfig::log_lines_per_sec`]).
    pub log_lines_per_sec: u32,
    /// Where log lines go.
    pub logs: LogSink,
}

impl std::fmt::Debug for SandboxSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxSetup")
            .field("function", &self.spec.name)
            .field("tenant", &self.tenant)
            .field("vm_name", &self.vm_name)
            .finish_non_exhaustive()
    }
}

impl SandboxSetup {
    /// A setup with a fresh VM name.
    pub fn new(
        spec: &FunctionSpec,
        tenant: &str,
        logs: LogSink,
        vcpus: u8,
        log_lines_per_sec: u32,
    ) -> Self {
        let n = NEXT_VM.fetch_add(1, Ordering::Relaxed);
        Self {
            spec: spec.clone(),
            tenant: tenant.to_owned(),
            vm_name: format!("sbx{}-{n}", std::process::id()),
            vcpus,
            log_lines_per_sec,
            logs,
        }
    }

    /// The VM settings: the function's memory, the setup's vCPUs.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            name: self.vm_name.clone(),
            vcpus: self.vcpus,
            mem_size: u64::from(self.spec.memory_mb) << 20,
            ..VmConfig::default()
        }
    }

    /// The function's environment: with snapshots, its runtime may be
    /// restored into many VMs, as Lambda's SnapStart, whose
    /// `AWS_LAMBDA_INITIALIZATION_TYPE` it gets; then the pipeline's `env`.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::with_capacity(self.spec.env.len() + 1);
        if self.spec.snapshot {
            env.push((
                "AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(),
                "snap-start".to_owned(),
            ));
        }
        env.extend(self.spec.env.iter().cloned());
        env
    }

    /// The `Start` frame's configuration: the VM is the sandbox, so no
    /// isolation, no host paths and no rlimits; the function's folder is
    /// [`GUEST_TASK_ROOT`].
    pub fn start_config(&self) -> StartConfig {
        let spec = &self.spec;
        StartConfig {
            function_name: spec.name.clone(),
            function_version: "$LATEST".into(),
            memory_mb: spec.memory_mb,
            handler: spec.handler.clone(),
            log_group: format!("/aws/lambda/{}", spec.name),
            log_stream: format!("{}/[$LATEST]{}", self.tenant, self.vm_name),
            function_dir: GUEST_TASK_ROOT.into(),
            task_root: GUEST_TASK_ROOT.into(),
            root_dir: String::new(),
            runtime_layers: Vec::new(),
            // In the initramfs, at /opt (`GuestImage::boot_function`).
            layers: Vec::new(),
            tmp_mb: spec.tmp_mb,
            rlimit_nproc: 0,
            rlimit_as_bytes: 0,
            runtime_api_port: 9001,
            env: self.env(),
            run_as: None,
            isolate: false,
        }
    }
}

/// Which function snapshot a start may restore from or store into.
#[derive(Debug, Clone)]
pub struct SnapshotPlan {
    /// The cache.
    pub cache: SnapshotCache,
    /// The function's key in it.
    pub key: SnapshotKey,
}

/// How a sandbox came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Booted; no snapshot was stored (none asked, or storing failed).
    Booted,
    /// Booted, and its VM was snapshotted into the cache once `Ready`.
    BootedAndSnapshotted,
    /// Restored from a cached function snapshot.
    Restored,
}

/// The identity a restored clone was given in its `Restored` frame.
#[derive(Clone, PartialEq, Eq)]
pub struct CloneIdentity {
    /// The entropy sent for the guest's pool.
    pub seed: [u8; SEED_LEN],
    /// The clone's sandbox id: 32 lowercase hex digits, random.
    pub sandbox_id: String,
    /// `<tenant>/[$LATEST]<sandbox id>`.
    pub log_stream: String,
    /// The host's wall clock when the identity was made, just before its
    /// frame is sent (ns since the Unix epoch): the guest agent sets the
    /// clone's clock to it, as the clone's clock is the snapshot's.
    pub unix_time_ns: u64,
}

impl std::fmt::Debug for CloneIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The seed stays out of logs.
        f.debug_struct("CloneIdentity")
            .field("sandbox_id", &self.sandbox_id)
            .field("log_stream", &self.log_stream)
            .finish_non_exhaustive()
    }
}

impl CloneIdentity {
    /// A fresh identity from the host's random source for a clone of
    /// `tenant`'s sandbox.
    pub fn fresh(tenant: &str) -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; SEED_LEN + 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let mut seed = [0u8; SEED_LEN];
        seed.copy_from_slice(&bytes[..SEED_LEN]);
        let sandbox_id: String = bytes[SEED_LEN..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Ok(Self {
            seed,
            log_stream: format!("{tenant}/[$LATEST]{sandbox_id}"),
            sandbox_id,
            unix_time_ns,
        })
    }

    /// The frame that hands it to the agent.
    pub fn message(&self) -> Message {
        Message::Restored {
            seed: self.seed,
            sandbox_id: self.sandbox_id.clone(),
            log_stream: self.log_stream.clone(),
            unix_time_ns: self.unix_time_ns,
        }
    }
}

/// How a VM run ended, in words for crash reports.
fn describe_end(end: &Result<ExitReason, String>) -> String {
    match end {
        Ok(ExitReason::Reset(ResetCause::I8042)) => {
            "the guest rebooted (i8042 reset: the agent ended or the kernel panicked)".into()
        }
        Ok(ExitReason::GuestStop(why)) => format!("the guest stopped its vCPU ({why})"),
        Ok(ExitReason::TimedOut) => format!("the VM ran past {MAX_VM_LIFETIME:?}"),
        Ok(ExitReason::Stopped) => "the VM was stopped by the host".into(),
        Err(e) => format!("the VM failed: {e}"),
    }
}

/// One running microVM sandbox.
pub struct MicrovmSandbox {
    function: String,
    vm_name: String,
    writer: OwnedWriteHalf,
    rx: mpsc::Receiver<FrameResult>,
    stopper: VmStopper,
    snapshotter: VmSnapshotter,
    origin: Origin,
    identity: Option<CloneIdentity>,
    ended: Option<oneshot::Receiver<String>>,
    end: Option<String>,
    monitor: Option<std::thread::JoinHandle<()>>,
    dead: bool,
    init: Duration,
    init_timeout: Duration,
    /// The guest's RAM (kept mapped while the sandbox lives), for
    /// [`Sandbox::max_memory_used`].
    memory: sluice_vmm::GuestMemoryMmap,
}

impl std::fmt::Debug for MicrovmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicrovmSandbox")
            .field("function", &self.function)
            .field("vm", &self.vm_name)
            .field("origin", &self.origin)
            .field("dead", &self.dead)
            .finish()
    }
}

impl MicrovmSandbox {
    /// Builds the VM that `make_vm` describes (given the setup's
    /// [`VmConfig`]; called on a blocking thread), adds the agent channel
    /// and the console log, runs it on the thread `<vm>-run`, sends the
    /// `Start` frame and waits for the agent's `Ready` within the
    /// function's init timeout (boot included). No snapshot is used.
    pub async fn boot<F>(setup: SandboxSetup, make_vm: F) -> Result<Self, InvokeError>
    where
        F: FnOnce(VmConfig) -> Result<VmBuilder, SandboxError> + Send + 'static,
    {
        Self::start(setup, make_vm, None).await
    }

    /// A sandbox for `setup`, using function snapshots as `plan` says:
    ///
    /// * a loadable snapshot of `plan.key` in the cache: a clone is
    ///   restored from it, with a new agent channel; it gets a
    ///   [`Message::Restored`] frame with its own [`CloneIdentity`] and
    ///   must answer `Ready` within the init timeout. A clone that cannot
    ///   be built falls back to a boot; one that does not answer fails
    ///   this start; both remove the entry.
    /// * otherwise: [`MicrovmSandbox::boot`], then the VM is paused,
    ///   snapshotted into the cache and resumed (a failure to store is
    ///   logged; the sandbox is used either way).
    pub async fn start<F>(
        setup: SandboxSetup,
        make_vm: F,
        plan: Option<SnapshotPlan>,
    ) -> Result<Self, InvokeError>
    where
        F: FnOnce(VmConfig) -> Result<VmBuilder, SandboxError> + Send + 'static,
    {
        let started = Instant::now();
        let function = setup.spec.name.clone();
        if let Some(plan) = &plan {
            let (cache, key) = (plan.cache.clone(), plan.key.clone());
            let found = tokio::task::spawn_blocking(move || cache.lookup(&key))
                .await
                .ok()
                .flatten();
            if let Some(snap) = found {
                match Self::restore(&setup, snap, started).await {
                    Ok(sb) => return Ok(sb),
                    Err((built, error)) => {
                        tracing::warn!(function = %function, %error,
                            "a clone of the function snapshot failed; removing the snapshot");
                        let (cache, key) = (plan.cache.clone(), plan.key.clone());
                        let _ = tokio::task::spawn_blocking(move || cache.remove(&key)).await;
                        if built {
                            return Err(error);
                        }
                    }
                }
            }
        }
        let mut sb = Self::launch(&setup, make_vm).await?;
        let start = encode(&Message::Start(Box::new(setup.start_config())));
        sb.handshake(&start, started, &setup.tenant).await?;
        if let Some(plan) = plan {
            sb.store_snapshot(plan).await;
        }
        Ok(sb)
    }

    /// Restores a clone of `snap`. On failure, whether the clone was built
    /// (its agent did not answer) or not (the VM could not be created).
    async fn restore(
        setup: &SandboxSetup,
        snap: Arc<Snapshot>,
        started: Instant,
    ) -> Result<Self, (bool, InvokeError)> {
        let function = setup.spec.name.clone();
        let identity = CloneIdentity::fresh(&setup.tenant).map_err(|source| {
            let e = SandboxError::Host {
                what: "reading /dev/urandom for a clone's identity".into(),
                source,
            };
            (false, sandbox_err(&function, e))
        })?;
        let mut sb = Self::launch(setup, move |config| Ok(VmBuilder::restore(config, snap)))
            .await
            .map_err(|e| (false, e))?;
        sb.origin = Origin::Restored;
        let frame = encode(&identity.message());
        sb.identity = Some(identity);
        sb.handshake(&frame, started, &setup.tenant)
            .await
            .map_err(|e| (true, e))?;
        Ok(sb)
    }

    /// Pauses the VM, snapshots it into the cache and resumes it.
    async fn store_snapshot(&mut self, plan: SnapshotPlan) {
        let snapshotter = self.snapshotter.clone();
        let stored = tokio::task::spawn_blocking(move || {
            plan.cache.store(&plan.key, |dir| {
                snapshotter.snapshot(dir, SNAPSHOT_TIMEOUT).map(|_| ())
            })
        })
        .await;
        match stored {
            Ok(Ok(dir)) => {
                self.origin = Origin::BootedAndSnapshotted;
                tracing::debug!(function = %self.function, vm = %self.vm_name, dir = %dir.display(), "function snapshot taken");
            }
            Ok(Err(error)) => {
                tracing::warn!(function = %self.function, vm = %self.vm_name, %error, "cannot store the function snapshot; later cold starts boot")
            }
            Err(error) => {
                tracing::warn!(function = %self.function, %error, "the snapshot task failed")
            }
        }
    }

    /// How this sandbox came to be.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The identity a restored clone was given (`None` for a booted VM).
    pub fn identity(&self) -> Option<&CloneIdentity> {
        self.identity.as_ref()
    }

    /// Builds the VM `make_vm` describes with the agent channel and the
    /// console log, and runs it on the thread `<vm>-run`.
    async fn launch<F>(setup: &SandboxSetup, make_vm: F) -> Result<Self, InvokeError>
    where
        F: FnOnce(VmConfig) -> Result<VmBuilder, SandboxError> + Send + 'static,
    {
        let function = setup.spec.name.clone();
        let limiter = Arc::new(LogRateLimiter::new(setup.log_lines_per_sec));
        let meta = Arc::new((function.clone(), setup.tenant.clone()));
        let console: ConsoleLineSink = {
            let (logs, limiter, meta) = (setup.logs.clone(), limiter.clone(), meta.clone());
            Arc::new(move |line: &str| {
                admit_line(&logs, &limiter, &meta, LogStream::Agent, line.as_bytes())
            })
        };
        let config = setup.vm_config();
        let built = tokio::task::spawn_blocking(move || {
            let builder = make_vm(config)?.console_lines(console);
            let vm_err = |what: &str| {
                let what = what.to_owned();
                move |e: sluice_vmm::VmError| SandboxError::Vm {
                    what,
                    message: e.to_string(),
                }
            };
            let (builder, channel) = builder
                .agent_channel()
                .map_err(vm_err("creating the agent channel"))?;
            let vm = builder.build().map_err(vm_err("building the VM"))?;
            Ok::<_, SandboxError>((vm, channel))
        })
        .await
        .map_err(|e| {
            sandbox_err(
                &function,
                SandboxError::Vm {
                    what: "building the VM".into(),
                    message: format!("the build task failed: {e}"),
                },
            )
        })?;
        let (mut vm, channel) = built.map_err(|e| sandbox_err(&function, e))?;
        let stopper = vm.stopper();
        let snapshotter = vm.snapshotter();
        let memory = vm.memory().clone();
        let (end_tx, ended) = oneshot::channel();
        let vm_name = setup.vm_name.clone();
        let monitor = std::thread::Builder::new()
            .name(format!("{vm_name}-run"))
            .spawn(move || {
                let end = vm.run(MAX_VM_LIFETIME).map(|e| e.reason);
                let end = end.map_err(|e| e.to_string());
                let text = describe_end(&end);
                tracing::debug!(vm = %vm_name, end = %text, "sandbox VM ended");
                // The end first, then the drop that closes the channel: whoever
                // sees the channel close finds the reason waiting.
                let _ = end_tx.send(text);
                drop(vm);
            })
            .map_err(|source| {
                sandbox_err(
                    &function,
                    SandboxError::Host {
                        what: "spawning the VM's run thread".into(),
                        source,
                    },
                )
            })?;
        let channel = to_tokio(channel).map_err(|source| {
            stopper.stop();
            sandbox_err(
                &function,
                SandboxError::Host {
                    what: "registering the agent channel".into(),
                    source,
                },
            )
        })?;
        let (reader, writer) = channel.into_split();
        let (tx, rx) = mpsc::channel(64);
        let on_violation = {
            let stopper = stopper.clone();
            move || stopper.stop()
        };
        tokio::spawn(read_frames(
            reader,
            tx,
            setup.logs.clone(),
            limiter,
            meta,
            on_violation,
        ));
        Ok(MicrovmSandbox {
            function,
            vm_name: setup.vm_name.clone(),
            writer,
            rx,
            stopper,
            snapshotter,
            origin: Origin::Booted,
            identity: None,
            ended: Some(ended),
            end: None,
            monitor: Some(monitor),
            dead: false,
            init: Duration::ZERO,
            init_timeout: setup.spec.init_timeout,
            memory,
        })
    }

    /// Sends `frame` (`Start` or `Restored`) and waits for `Ready` until
    /// the init timeout counted from `started`; kills the VM on failure.
    async fn handshake(
        &mut self,
        frame: &[u8],
        started: Instant,
        tenant: &str,
    ) -> Result<(), InvokeError> {
        let deadline = started + self.init_timeout;
        self.write_frame(frame, &[]).await?;
        match recv_until(&mut self.rx, deadline).await {
            Some(Ok(Message::Ready { init_us })) => {
                self.init = started.elapsed();
                tracing::debug!(function = %self.function, %tenant, vm = %self.vm_name, origin = ?self.origin, init_us, init = ?self.init, "microVM sandbox ready");
                Ok(())
            }
            other => Err(self.init_failure(other).await),
        }
    }

    /// Writes one frame given as its head and its body (see
    /// [`write_parts`]).
    async fn write_frame(&mut self, head: &[u8], body: &[u8]) -> Result<(), InvokeError> {
        if write_parts(&mut self.writer, head, body).await.is_err() {
            self.kill();
            return Err(self.crash_error("the agent channel closed").await);
        }
        Ok(())
    }

    fn kill(&mut self) {
        self.stopper.stop();
        self.dead = true;
    }

    /// How the VM ended (waits briefly for its run thread to say).
    async fn vm_end(&mut self) -> String {
        if let Some(end) = &self.end {
            return end.clone();
        }
        let end = match self.ended.take() {
            Some(rx) => match tokio::time::timeout(SHUTDOWN_GRACE, rx).await {
                Ok(Ok(end)) => end,
                _ => "the VM did not report its end".into(),
            },
            None => "the VM did not report its end".into(),
        };
        self.end = Some(end.clone());
        end
    }

    async fn crash_error(&mut self, context: &str) -> InvokeError {
        self.kill();
        let end = self.vm_end().await;
        InvokeError::SandboxCrashed {
            function: self.function.clone(),
            detail: format!("{context} ({end})"),
        }
    }

    async fn init_failure(&mut self, got: Option<FrameResult>) -> InvokeError {
        let function = self.function.clone();
        let init_failed = |error_type: &str, message: String| InvokeError::InitFailed {
            function: function.clone(),
            error_type: error_type.into(),
            message,
        };
        let err = match init_end(&function, got) {
            InitEnd::TimedOut => init_failed(
                "Runtime.InitTimeout",
                if self.origin == Origin::Restored {
                    "the restored guest did not answer its Restored frame within the init timeout"
                        .into()
                } else {
                    "the guest did not boot and ask for an invocation within the init timeout"
                        .into()
                },
            ),
            InitEnd::Exited(how) => init_failed("Runtime.ExitError", how),
            InitEnd::ChannelClosed => {
                self.kill();
                let end = self.vm_end().await;
                init_failed(
                    "Runtime.ExitError",
                    format!("the VM ended during init ({end})"),
                )
            }
            InitEnd::Failed(e) => e,
        };
        self.kill();
        err
    }

    /// Waits for the run thread (after the VM was stopped or ended).
    async fn join_monitor(&mut self) {
        if let Some(t) = self.monitor.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

fn to_tokio(s: StdUnixStream) -> std::io::Result<tokio::net::UnixStream> {
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

#[async_trait]
impl AgentEnd for MicrovmSandbox {
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
        MicrovmSandbox::write_frame(self, head, body).await
    }

    fn kill(&mut self) {
        MicrovmSandbox::kill(self)
    }

    async fn crash_error(&mut self, context: &str) -> InvokeError {
        MicrovmSandbox::crash_error(self, context).await
    }
}

#[async_trait]
impl Sandbox for MicrovmSandbox {
    async fn invoke(&mut self, inv: Invocation, timeout: Duration) -> Result<Vec<u8>, InvokeError> {
        invoke_over(self, inv, timeout).await
    }

    fn is_reusable(&self) -> bool {
        !self.dead
    }

    fn init_duration(&self) -> Duration {
        self.init
    }

    /// The guest RAM it has touched (its pages present in the VMM's
    /// mappings): what the guest kernel, the agent and the function use,
    /// page cache included, as a VM's peak.
    fn max_memory_used(&self) -> Option<u64> {
        sluice_vmm::memory::resident_bytes(&self.memory).ok()
    }

    async fn shutdown(mut self: Box<Self>) {
        if !self.dead {
            // The agent stops the function and reboots the guest: the VM
            // ends by itself; stop it if it does not.
            let _ = self.writer.write_all(&encode(&Message::Shutdown)).await;
            let _ = self.writer.flush().await;
            if let Some(rx) = self.ended.take() {
                match tokio::time::timeout(SHUTDOWN_GRACE, rx).await {
                    Ok(Ok(end)) => self.end = Some(end),
                    _ => self.stopper.stop(),
                }
            }
        }
        self.kill();
        self.join_monitor().await;
    }
}

impl Drop for MicrovmSandbox {
    fn drop(&mut self) {
        // The run thread drops the VM (joining its vCPUs) once stopped.
        self.stopper.stop();
    }
}
