//! A microVM: [`VmBuilder`] creates the KVM VM (TSS, in-kernel irqchip and
//! PIT, guest memory, devices, configured vCPUs); [`Vm`] starts, pauses,
//! resumes and stops it, and waits for its end with a timeout.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;
use crate::devices::console_log::{ConsoleCapture, ConsoleLog, RateLimit};
use crate::devices::i8042::{I8042, I8042_DATA_PORT, I8042_PORT_LEN};
use crate::devices::serial::{COM1_IRQ, COM1_PORT, COM1_PORT_LEN, SerialDevice};
use crate::devices::{Bus, BusDevice, BusError};
use crate::loader::{LoaderError, load_linux};
use crate::memory::{
    BOOT_STACK_POINTER, HIMEM_START, KVM_TSS_ADDRESS, MemoryError, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE, ZERO_PAGE_START, create_guest_memory,
};
use crate::snapshot::{
    MEMORY_FILE, STATE_FILE, Snapshot, SnapshotError, SnapshotInfo, SnapshotState, VsockSnapshot,
    restore_vcpu, restore_vm, save_vm, write_atomically, write_memory,
};
use crate::vcpu::{
    Vcpu, VcpuCommand, VcpuError, VcpuHandle, VcpuState, VcpuStop, install_kick_handler,
};
use crate::virtio::console::{
    ByteQueue, Console, ConsoleOutput, spawn_input_pump, spawn_output_pump,
};
use crate::virtio::mmio::{MmioTransport, cmdline_entry};
use crate::virtio::vsock::{Muxer, Vsock, VsockConfig, VsockError, VsockTransport, spawn_muxer};
use crate::x86_64::cpuid::{CpuidError, setup_cpuid, supported_cpuid};
use crate::x86_64::mptable::{MptableError, setup_mptable};
use crate::x86_64::msr::{MsrError, setup_msrs};
use crate::x86_64::regs::{RegsError, setup_fpu, setup_lapic, setup_long_mode, setup_regs};

/// What the guest asked for when it reset the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// Command 0xFE on the i8042 command port.
    I8042,
}

/// Events sent to the VM by its vCPU threads and devices.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// A vCPU changed state.
    VcpuState {
        /// The vCPU.
        vcpu: u8,
        /// Its new state.
        state: VcpuState,
    },
    /// A vCPU's run loop ended.
    VcpuStopped {
        /// The vCPU.
        vcpu: u8,
        /// Why.
        stop: VcpuStop,
    },
    /// A device asked for a machine reset.
    Reset(ResetCause),
    /// A [`VmStopper`] asked the run to end.
    StopRequested,
    /// A [`VmSnapshotter`] asked the run for a snapshot.
    Snapshot(SnapshotRequest),
}

/// A snapshot asked of a running VM (see [`VmSnapshotter`]).
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    dir: PathBuf,
    reply: Sender<Result<SnapshotInfo, SnapshotError>>,
}

/// Takes a snapshot of a VM while another thread waits in its
/// [`Vm::run`]: the run pauses the vCPUs, writes the snapshot
/// ([`Vm::snapshot`]), resumes them and answers. This is how a sandbox
/// saves a guest that reached a state worth cloning without taking the VM
/// away from the thread that runs it.
#[derive(Debug, Clone)]
pub struct VmSnapshotter {
    events: Sender<VmEvent>,
}

/// How long the run may take to pause or resume the vCPUs around a
/// [`VmSnapshotter`] snapshot.
pub const LIVE_SNAPSHOT_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VmSnapshotter {
    /// Asks the run for a snapshot into `dir` and waits at most `timeout`
    /// for it. The VM runs on afterwards. Fails with
    /// [`SnapshotError::NotRunning`] if the run has ended or does not
    /// answer in time (a snapshot may then still be written later into
    /// `dir`: use a directory of its own).
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        timeout: Duration,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let (reply, answer) = channel();
        let req = SnapshotRequest {
            dir: dir.to_path_buf(),
            reply,
        };
        if self.events.send(VmEvent::Snapshot(req)).is_err() {
            return Err(SnapshotError::NotRunning {
                why: "the VM is gone".into(),
            });
        }
        match answer.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(SnapshotError::NotRunning {
                why: format!("no answer within {timeout:?}"),
            }),
            Err(RecvTimeoutError::Disconnected) => Err(SnapshotError::NotRunning {
                why: "the VM's run ended first".into(),
            }),
        }
    }
}

/// Ends a VM's [`Vm::run`] from another thread (e.g. an invocation timeout
/// while the run waits): the run returns [`ExitReason::Stopped`] after
/// stopping and joining the vCPUs. Stopping an ended VM does nothing.
#[derive(Debug, Clone)]
pub struct VmStopper {
    events: Sender<VmEvent>,
}

impl VmStopper {
    /// Asks the VM's run to end.
    pub fn stop(&self) {
        let _ = self.events.send(VmEvent::StopRequested);
    }
}

/// Receives each complete line the guest writes to its serial console
/// (sanitized, without the line break), after the console's byte rate limit.
pub type ConsoleLineSink = Arc<dyn Fn(&str) + Send + Sync>;

/// How a VM run ended (without an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine: a sluice microVM then shuts down.
    Reset(ResetCause),
    /// A vCPU stopped on the guest's request (halt with interrupts off, power-off).
    GuestStop(&'static str),
    /// The run timed out; the vCPUs were stopped.
    TimedOut,
    /// [`Vm::stop`] was called.
    Stopped,
}

/// The end of a VM run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Why it ended.
    pub reason: ExitReason,
    /// Time from [`Vm::start`] to the end.
    pub elapsed: Duration,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The VM configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Tiny-guest code could not be written.
    #[error("cannot write guest code at {addr:#x}: {source}")]
    LoadCode {
        /// Where.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// vCPU register set-up failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// CPUID set-up failed.
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    /// MSR set-up failed.
    #[error(transparent)]
    Msr(#[from] MsrError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// The virtio-vsock device cannot be set up.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The agent channel's socket could not be set up.
    #[error("cannot set up the agent channel: {0}")]
    AgentChannel(#[source] std::io::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {vcpu}: {source}")]
    Spawn {
        /// The vCPU.
        vcpu: u8,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The guest failed on a vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Restoring from a snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The operation is not allowed in the VM's current state.
    #[error("cannot {op} a VM that is {state:?}")]
    InvalidState {
        /// The operation.
        op: &'static str,
        /// The state.
        state: VmState,
    },
    /// vCPUs did not acknowledge a command in time.
    #[error("vCPUs did not reach {wanted:?} within {timeout:?}")]
    CommandTimeout {
        /// The state asked for.
        wanted: VcpuState,
        /// How long we waited.
        timeout: Duration,
    },
}

fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { ioctl, source }
}

/// What to run.
#[derive(Debug, Clone)]
pub enum Boot {
    /// Raw 64-bit code loaded at [`HIMEM_START`] and entered in long mode
    /// with our GDT and identity page tables (tiny guests, tests, benches).
    Code(Vec<u8>),
    /// A Linux kernel (ELF vmlinux or bzImage) with command line and initramfs.
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// Its command line.
        cmdline: String,
        /// The initramfs (cpio newc), if any.
        initramfs: Option<Vec<u8>>,
    },
}

/// VM settings.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Used for thread names and log fields.
    pub name: String,
    /// Number of vCPUs (1..=254; a Linux guest takes at most 32, the MP
    /// table's limit). Only vCPU 0 starts at the entry point: the others
    /// wait in the in-kernel LAPIC for INIT/SIPI from the guest.
    pub vcpus: u8,
    /// RAM in bytes.
    pub mem_size: u64,
    /// Console rate limit.
    pub console_limit: RateLimit,
    /// How many console bytes to keep for [`Vm::console_output`].
    pub console_capture: usize,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            name: "vm".into(),
            vcpus: 1,
            mem_size: 128 << 20,
            console_limit: RateLimit::default(),
            console_capture: 64 * 1024,
        }
    }
}

/// The VM's overall state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, vCPUs waiting.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// vCPUs exited.
    Exited,
}

type ExtraDevice = (u64, u64, Arc<Mutex<dyn BusDevice>>);

/// The IRQ (GSI) of the first virtio-mmio device.
pub const VIRTIO_FIRST_IRQ: u32 = 5;

/// The virtio-vsock device's MMIO window (the slot after the console's).
pub const VSOCK_MMIO_BASE: u64 = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE;
/// The virtio-vsock device's IRQ (GSI).
pub const VSOCK_IRQ: u32 = VIRTIO_FIRST_IRQ + 1;

/// A virtio-console transport as placed on the MMIO bus.
pub type ConsoleTransport = Arc<Mutex<MmioTransport<Console>>>;

/// Host ends of a virtio-console, given to [`VmBuilder::virtio_console`].
pub struct VirtioConsoleConfig {
    /// Where guest output goes.
    pub out: ConsoleOutput,
    /// Host input for the guest.
    pub input: Arc<ByteQueue>,
}

/// Bytes of host input buffered for the agent channel before the host's
/// writes block.
pub const AGENT_CHANNEL_INPUT: usize = 256 * 1024;
/// Bytes of guest output buffered for the agent channel before the guest's
/// transmit buffers wait in the ring.
pub const AGENT_CHANNEL_OUTPUT: usize = 256 * 1024;

impl std::fmt::Debug for VirtioConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioConsoleConfig")
            .finish_non_exhaustive()
    }
}

/// Builds a [`Vm`].
pub struct VmBuilder {
    config: VmConfig,
    boot: Boot,
    pio: Vec<ExtraDevice>,
    mmio: Vec<ExtraDevice>,
    console: Option<VirtioConsoleConfig>,
    vsock: Option<VsockConfig>,
    /// VMM end of the agent channel's socket, read by the input pump.
    channel: Option<UnixStream>,
    /// Restore from this snapshot instead of booting.
    restore: Option<Arc<Snapshot>>,
    /// Bytes written into guest memory before the vCPUs start.
    guest_writes: Vec<(u64, Vec<u8>)>,
    /// Also hand serial console lines to this sink.
    console_lines: Option<ConsoleLineSink>,
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A VM running `boot` with `config`.
    pub fn new(config: VmConfig, boot: Boot) -> Self {
        Self {
            config,
            boot,
            pio: Vec::new(),
            mmio: Vec::new(),
            console: None,
            vsock: None,
            channel: None,
            restore: None,
            guest_writes: Vec::new(),
            console_lines: None,
        }
    }

    /// A clone of the VM saved in `snapshot` (see [`Vm::snapshot`]): guest
    /// memory is the snapshot's memory file mapped `MAP_PRIVATE`
    /// (copy-on-write, page cache shared by all clones), and the vCPUs,
    /// irqchip, PIT, KVM clock, serial UART and virtio-console transport
    /// are in the saved state. `config` gives the name and console
    /// settings; RAM size and vCPU count come from the snapshot. Add the
    /// same extra devices (and virtio-console) as the snapshotted VM had;
    /// [`Vm::start`] resumes the guest where it was paused.
    pub fn restore(mut config: VmConfig, snapshot: Arc<Snapshot>) -> Self {
        config.mem_size = snapshot.state().mem_size;
        config.vcpus = snapshot.state().vcpus.len() as u8;
        let mut b = Self::new(config, Boot::Code(Vec::new()));
        b.restore = Some(snapshot);
        b
    }

    /// Writes `bytes` at guest-physical `addr` after the guest is loaded
    /// or restored and before any vCPU runs. This is how a clone gets its
    /// own identity: a seed or id at an address the guest reads after it
    /// resumes, so no two clones of one snapshot behave the same.
    pub fn guest_write(mut self, addr: u64, bytes: &[u8]) -> Self {
        self.guest_writes.push((addr, bytes.to_vec()));
        self
    }

    /// Adds the guest agent's channel: a virtio-console whose host side is
    /// a Unix socket. Returns the host end: what it writes reaches the
    /// guest's receive queue, what the guest transmits can be read from it.
    /// Threads `virtio-console-in` and `virtio-console-out` move bytes
    /// between the socket and the device, so a host that is slow to read
    /// or write never blocks a vCPU; they end when the VM is dropped.
    pub fn agent_channel(mut self) -> Result<(Self, UnixStream), VmError> {
        let (host, vmm) = UnixStream::pair().map_err(VmError::AgentChannel)?;
        self.console = Some(VirtioConsoleConfig {
            out: ConsoleOutput::Queue(ByteQueue::new(AGENT_CHANNEL_OUTPUT)),
            input: ByteQueue::new(AGENT_CHANNEL_INPUT),
        });
        self.channel = Some(vmm);
        Ok((self, host))
    }

    /// Adds a virtio-console at [`VIRTIO_MMIO_BASE`] on IRQ
    /// [`VIRTIO_FIRST_IRQ`]; a Linux guest finds it through the
    /// `virtio_mmio.device=` entry appended to its command line.
    pub fn virtio_console(mut self, console: VirtioConsoleConfig) -> Self {
        self.console = Some(console);
        self
    }

    /// Adds a virtio-vsock device at [`VSOCK_MMIO_BASE`] on IRQ
    /// [`VSOCK_IRQ`] whose host side is the Unix socket
    /// `config.uds_path` (see [`crate::virtio::vsock`]); the thread
    /// `vsock-mux` serves it until the VM is dropped.
    pub fn vsock(mut self, config: VsockConfig) -> Self {
        self.vsock = Some(config);
        self
    }

    /// Hands every serial console line to `sink` as well as to `tracing`
    /// (e.g. a sandbox's rate-limited function log).
    pub fn console_lines(mut self, sink: ConsoleLineSink) -> Self {
        self.console_lines = Some(sink);
        self
    }

    /// Adds a port-I/O device at `base..base+len`.
    pub fn pio_device(mut self, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.pio.push((base, len, dev));
        self
    }

    /// Adds an MMIO device at `base..base+len`.
    pub fn mmio_device(mut self, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.mmio.push((base, len, dev));
        self
    }

    /// Creates the VM; its vCPU threads wait in `Created` for [`Vm::start`].
    pub fn build(self) -> Result<Vm, VmError> {
        let config = self.config;
        // APIC id 0xff is the broadcast address.
        if config.vcpus == 0 || config.vcpus == u8::MAX {
            return Err(VmError::Config(format!("{} vCPUs", config.vcpus)));
        }
        install_kick_handler().map_err(VmError::Signal)?;
        // vCPU threads first: their start-up overlaps the set-up below.
        let (events_tx, events_rx) = channel();
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            vcpus.push(
                VcpuHandle::start(&config.name, id, events_tx.clone())
                    .map_err(|source| VmError::Spawn { vcpu: id, source })?,
            );
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let restore = self.restore.clone();
        let mem = match &restore {
            Some(snap) => snap.map_memory()?,
            None => create_guest_memory(config.mem_size)?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmError::Config(format!("guest region without host mapping: {e}")))?;
            let kregion = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `host..host+len` is a live mapping (anonymous, or the
            // snapshot's memory file mapped MAP_PRIVATE) owned by `mem`, which
            // the Vm keeps until after the VM fd is closed (field order in
            // `Vm`), so KVM never maps memory we have released.
            unsafe { vm_fd.set_user_memory_region(kregion) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // Memory slots first: KVM_SET_USER_MEMORY_REGION after the irqchip and
        // PIT exist cost 7-11 ms here instead of well under 1 ms.
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        if let Some(snap) = &restore {
            restore_vm(&vm_fd, snap.state())?;
        }

        let (entry, rsi) = match &self.boot {
            _ if restore.is_some() => (0, 0),
            Boot::Code(code) => {
                mem.write_slice(code, GuestAddress(HIMEM_START))
                    .map_err(|source| VmError::LoadCode {
                        addr: HIMEM_START,
                        source,
                    })?;
                (HIMEM_START, 0)
            }
            Boot::Linux {
                kernel,
                cmdline,
                initramfs,
            } => {
                let mut cmdline = cmdline.clone();
                if self.console.is_some() {
                    cmdline.push(' ');
                    cmdline.push_str(&cmdline_entry(VIRTIO_MMIO_BASE, VIRTIO_FIRST_IRQ));
                }
                if self.vsock.is_some() {
                    cmdline.push(' ');
                    cmdline.push_str(&cmdline_entry(VSOCK_MMIO_BASE, VSOCK_IRQ));
                }
                let k = load_linux(&mem, kernel, &cmdline, initramfs.as_deref())?;
                setup_mptable(&mem, config.vcpus)?;
                (k.entry, ZERO_PAGE_START)
            }
        };
        for (addr, bytes) in &self.guest_writes {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(|source| VmError::LoadCode {
                    addr: *addr,
                    source,
                })?;
        }

        let capture = ConsoleCapture::new(config.console_capture);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let mut serial_log =
            ConsoleLog::new(config.name.clone(), config.console_limit, capture.clone());
        if let Some(sink) = self.console_lines.clone() {
            serial_log = serial_log.with_line_sink(sink);
        }
        let serial = Arc::new(Mutex::new(match &restore {
            Some(snap) => SerialDevice::from_state(serial_irq, serial_log, &snap.state().serial)
                .map_err(SnapshotError::Devices)?,
            None => SerialDevice::new(serial_irq, serial_log),
        }));
        let mut pio = Bus::new();
        pio.insert(COM1_PORT, COM1_PORT_LEN, serial.clone())?;
        pio.insert(
            I8042_DATA_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        for (base, len, dev) in self.pio {
            pio.insert(base, len, dev)?;
        }
        let mut mmio = Bus::new();
        let mut console = None;
        if let Some(cfg) = self.console {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd
                .register_irqfd(&irq, VIRTIO_FIRST_IRQ)
                .map_err(kvm_err("KVM_IRQFD"))?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                Console::new(cfg.out, cfg.input),
                mem.clone(),
                irq,
            )));
            if let Some(saved) = restore
                .as_ref()
                .and_then(|snap| snap.state().virtio_console.as_ref())
            {
                lock(&transport)
                    .restore(saved)
                    .map_err(SnapshotError::Devices)?;
            }
            mmio.insert(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE, transport.clone())?;
            console = Some(transport);
        }
        if let Some(snap) = &restore
            && snap.state().virtio_console.is_some() != console.is_some()
        {
            return Err(SnapshotError::Devices(format!(
                "the snapshot {} a virtio-console, the restored VM {}",
                if console.is_some() { "has no" } else { "has" },
                if console.is_some() {
                    "has one"
                } else {
                    "has none"
                },
            ))
            .into());
        }
        let mut vsock = None;
        if let Some(cfg) = &self.vsock {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd
                .register_irqfd(&irq, VSOCK_IRQ)
                .map_err(kvm_err("KVM_IRQFD"))?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                Vsock::new(cfg)?,
                mem.clone(),
                irq,
            )));
            if let Some(saved) = restore
                .as_ref()
                .and_then(|snap| snap.state().virtio_vsock.as_ref())
            {
                if saved.guest_cid != cfg.guest_cid {
                    return Err(SnapshotError::Devices(format!(
                        "vsock guest CID {} in the snapshot, {} here",
                        saved.guest_cid, cfg.guest_cid
                    ))
                    .into());
                }
                let mut t = lock(&transport);
                t.restore(&saved.transport)
                    .map_err(SnapshotError::Devices)?;
                // Host sockets did not survive: the guest must drop its
                // connections.
                t.device_mut().transport_reset();
            }
            mmio.insert(VSOCK_MMIO_BASE, VIRTIO_MMIO_SIZE, transport.clone())?;
            vsock = Some(transport);
        }
        if let Some(snap) = &restore
            && snap.state().virtio_vsock.is_some() != vsock.is_some()
        {
            return Err(SnapshotError::Devices(format!(
                "the snapshot has {} virtio-vsock, the restored VM {}",
                if vsock.is_some() { "no" } else { "a" },
                if vsock.is_some() {
                    "has one"
                } else {
                    "has none"
                },
            ))
            .into());
        }
        for (base, len, dev) in self.mmio {
            mmio.insert(base, len, dev)?;
        }
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

        let cpuid = match &restore {
            Some(_) => None,
            None => Some(supported_cpuid(&kvm)?),
        };
        let mut refused_msrs = Vec::new();
        for (id, handle) in (0..config.vcpus).zip(vcpus.iter_mut()) {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            match (&restore, &cpuid) {
                (Some(snap), _) => {
                    refused_msrs.push(restore_vcpu(&fd, &snap.state().vcpus[usize::from(id)])?);
                }
                (None, Some(cpuid)) => {
                    setup_cpuid(&fd, cpuid, id, config.vcpus)?;
                    setup_msrs(&fd)?;
                    setup_long_mode(&fd, &mem)?;
                    setup_regs(&fd, entry, BOOT_STACK_POINTER, rsi)?;
                    setup_fpu(&fd)?;
                    setup_lapic(&fd)?;
                }
                (None, None) => unreachable!("CPUID is read whenever there is no snapshot"),
            }
            let vcpu = Vcpu {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events_tx.clone(),
            };
            handle.attach(vcpu);
        }
        // Last, so that no earlier failure leaves pump threads behind.
        let pumps = match (&console, &self.channel) {
            (Some(transport), Some(socket)) => start_pumps(transport, socket)?,
            _ => Vec::new(),
        };
        let muxer = match &vsock {
            Some(t) => Some(spawn_muxer(t.clone())?),
            None => None,
        };
        let vcpu_states = vec![VcpuState::Created; vcpus.len()];
        Ok(Vm {
            vcpus,
            vm_fd,
            mem,
            kvm,
            events: events_rx,
            vcpu_states,
            state: VmState::Created,
            started: None,
            outcome: None,
            capture,
            serial,
            console,
            vsock,
            muxer,
            channel: self.channel,
            pumps,
            refused_msrs,
            stopper: VmStopper { events: events_tx },
            snapshot_requests: Vec::new(),
            name: config.name,
        })
    }
}

/// Starts the agent channel's input and output pumps; on failure, stops
/// the one already started.
fn start_pumps(
    transport: &ConsoleTransport,
    socket: &UnixStream,
) -> Result<Vec<std::thread::JoinHandle<()>>, VmError> {
    let clone = || socket.try_clone().map_err(VmError::AgentChannel);
    let input = spawn_input_pump(transport.clone(), clone()?).map_err(VmError::AgentChannel)?;
    let output = clone()
        .and_then(|s| spawn_output_pump(transport.clone(), s).map_err(VmError::AgentChannel));
    match output {
        Ok(output) => Ok(vec![input, output]),
        Err(e) => {
            let _ = socket.shutdown(std::net::Shutdown::Both);
            lock(transport).device().input().close();
            let _ = input.join();
            Err(e)
        }
    }
}

/// A running (or runnable) microVM. Dropping it stops and joins its vCPUs.
pub struct Vm {
    // Field order is drop order: vCPU threads are joined first, then the VM
    // fd is closed, and only then is guest memory unmapped.
    vcpus: Vec<VcpuHandle>,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    kvm: Kvm,
    events: Receiver<VmEvent>,
    vcpu_states: Vec<VcpuState>,
    state: VmState,
    started: Option<Instant>,
    outcome: Option<Result<ExitReason, VcpuError>>,
    capture: ConsoleCapture,
    serial: Arc<Mutex<SerialDevice>>,
    console: Option<ConsoleTransport>,
    vsock: Option<VsockTransport>,
    muxer: Option<Muxer>,
    channel: Option<UnixStream>,
    pumps: Vec<std::thread::JoinHandle<()>>,
    refused_msrs: Vec<Vec<u32>>,
    stopper: VmStopper,
    /// Snapshot requests received while not in the run loop proper.
    snapshot_requests: Vec<SnapshotRequest>,
    name: String,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.name)
            .field("state", &self.state)
            .field("vcpus", &self.vcpu_states)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The KVM VM fd (e.g. to register irqfds and ioeventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// For a restored VM, the saved MSRs KVM refused to set, per vCPU
    /// (they are skipped; empty for a booted VM).
    pub fn refused_msrs(&self) -> &[Vec<u32>] {
        &self.refused_msrs
    }

    /// A handle that ends [`Vm::run`] from another thread.
    pub fn stopper(&self) -> VmStopper {
        self.stopper.clone()
    }

    /// A handle that snapshots the VM while [`Vm::run`] runs it.
    pub fn snapshotter(&self) -> VmSnapshotter {
        VmSnapshotter {
            events: self.stopper.events.clone(),
        }
    }

    /// The VM state.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The state of each vCPU as last reported.
    pub fn vcpu_states(&self) -> &[VcpuState] {
        &self.vcpu_states
    }

    /// Serial console output captured so far (after rate limiting).
    pub fn console_output(&self) -> Vec<u8> {
        self.capture.bytes()
    }

    /// Waits until the serial console output contains `needle` (the guest
    /// keeps running); `false` on timeout.
    pub fn wait_for_console(&self, needle: &[u8], timeout: Duration) -> bool {
        self.capture.wait_for(needle, timeout)
    }

    /// Console bytes dropped by the rate limit.
    pub fn console_dropped(&self) -> u64 {
        self.capture.dropped()
    }

    /// The virtio-console transport, if the VM has one (e.g. to start
    /// [`crate::virtio::console::spawn_input_pump`] or read its stats).
    pub fn virtio_console(&self) -> Option<&ConsoleTransport> {
        self.console.as_ref()
    }

    /// The virtio-vsock transport, if the VM has one.
    pub fn virtio_vsock(&self) -> Option<&VsockTransport> {
        self.vsock.as_ref()
    }

    /// Queues bytes for the guest to read from the serial port.
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_input(bytes)
    }

    /// Starts the vCPUs.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::InvalidState {
                op: "start",
                state: self.state,
            });
        }
        self.started = Some(Instant::now());
        self.broadcast(VcpuCommand::Run);
        self.state = VmState::Running;
        Ok(())
    }

    /// Pauses every vCPU and waits until each has left `KVM_RUN`.
    pub fn pause(&mut self, timeout: Duration) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::InvalidState {
                op: "pause",
                state: self.state,
            });
        }
        self.broadcast(VcpuCommand::Pause);
        self.wait_vcpus(VcpuState::Paused, timeout)?;
        self.state = VmState::Paused;
        Ok(())
    }

    /// Resumes paused vCPUs and waits until each runs again.
    pub fn resume(&mut self, timeout: Duration) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::InvalidState {
                op: "resume",
                state: self.state,
            });
        }
        self.broadcast(VcpuCommand::Run);
        self.wait_vcpus(VcpuState::Running, timeout)?;
        self.state = VmState::Running;
        Ok(())
    }

    /// Writes a snapshot of this paused (or never started) VM into `dir`
    /// (created if needed): guest RAM to [`MEMORY_FILE`], and everything
    /// else to [`STATE_FILE`] (see [`crate::snapshot`] for the format).
    /// The VM stays paused and can be resumed afterwards. Restore with
    /// [`Snapshot::load`] and [`VmBuilder::restore`]. Snapshotting into a
    /// directory that holds an older snapshot replaces it through new
    /// files and renames: clones of the old one keep their memory.
    pub fn snapshot(&mut self, dir: &std::path::Path) -> Result<SnapshotInfo, SnapshotError> {
        if !matches!(self.state, VmState::Paused | VmState::Created) {
            return Err(SnapshotError::InvalidState { state: self.state });
        }
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            op: "create",
            path: dir.to_path_buf(),
            source,
        })?;
        let msr_index: Arc<[u32]> = self
            .kvm
            .get_msr_index_list()
            .map_err(|source| SnapshotError::Kvm {
                ioctl: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .into();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let (reply, answer) = channel();
            v.send(VcpuCommand::Save {
                msr_index: msr_index.clone(),
                reply,
            });
            let timeout = crate::snapshot::VCPU_SAVE_TIMEOUT;
            let saved = answer.recv_timeout(timeout).map_err(|e| match e {
                RecvTimeoutError::Timeout => SnapshotError::VcpuTimeout {
                    vcpu: v.id(),
                    timeout,
                },
                RecvTimeoutError::Disconnected => SnapshotError::VcpuExited { vcpu: v.id() },
            })??;
            vcpus.push(*saved);
        }
        let (clock, irqchips, pit) = save_vm(&self.vm_fd)?;
        // An older snapshot in `dir` stops being loadable before its memory
        // file is replaced, so a crash never pairs old state with new RAM.
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SnapshotError::Io {
                    op: "remove",
                    path: state_path,
                    source,
                });
            }
        }
        let memory_path = dir.join(MEMORY_FILE);
        let regions = write_memory(&self.mem, &memory_path)?;
        let state = SnapshotState {
            mem_size: regions.iter().map(|r| r.len).sum(),
            regions,
            clock,
            irqchips,
            pit,
            vcpus,
            serial: lock(&self.serial).state(),
            virtio_console: self.console.as_ref().map(|t| lock(t).state()),
            virtio_vsock: self.vsock.as_ref().map(|t| {
                let t = lock(t);
                VsockSnapshot {
                    guest_cid: t.device().guest_cid(),
                    transport: t.state(),
                }
            }),
        };
        let bytes = state.encode();
        write_atomically(&state_path, &bytes)?;
        let unreadable_msrs = state
            .vcpus
            .iter()
            .map(|v| v.unreadable_msrs.clone())
            .collect();
        tracing::info!(vm = %self.name, dir = %dir.display(), state_bytes = bytes.len(), "VM snapshot written");
        Ok(SnapshotInfo {
            state_path,
            memory_path,
            state_bytes: bytes.len() as u64,
            unreadable_msrs,
        })
    }

    /// Stops and joins every vCPU.
    pub fn stop(&mut self) {
        for v in &mut self.vcpus {
            v.stop_and_join();
        }
        while let Ok(e) = self.events.try_recv() {
            self.absorb(e);
        }
        if self.outcome.is_none() {
            self.outcome = Some(Ok(ExitReason::Stopped));
        }
        self.state = VmState::Exited;
    }

    /// Starts the VM (if needed) and waits for its end, at most `timeout`
    /// after [`Vm::start`]. The vCPUs are stopped and joined on return.
    pub fn run(&mut self, timeout: Duration) -> Result<VmExit, VmError> {
        match self.state {
            VmState::Created => self.start()?,
            VmState::Running | VmState::Exited => {}
            VmState::Paused => {
                return Err(VmError::InvalidState {
                    op: "run",
                    state: self.state,
                });
            }
        }
        let started = self.started.unwrap_or_else(Instant::now);
        let deadline = started + timeout;
        while self.outcome.is_none() {
            let event = match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) => e,
                Err(RecvTimeoutError::Timeout) => {
                    tracing::info!(vm = %self.name, ?timeout, "VM timed out; stopping its vCPUs");
                    self.outcome = Some(Ok(ExitReason::TimedOut));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.outcome = Some(Ok(ExitReason::Stopped));
                    break;
                }
            };
            self.absorb(event);
            while self.outcome.is_none() && !self.snapshot_requests.is_empty() {
                let req = self.snapshot_requests.remove(0);
                let result = self.live_snapshot(&req.dir);
                let _ = req.reply.send(result);
            }
        }
        self.stop();
        let elapsed = started.elapsed();
        match &self.outcome {
            Some(Ok(reason)) => tracing::info!(vm = %self.name, ?reason, ?elapsed, "VM exited"),
            Some(Err(error)) => tracing::warn!(vm = %self.name, %error, ?elapsed, "VM failed"),
            None => {}
        }
        match self.outcome.clone() {
            Some(Ok(reason)) => Ok(VmExit { reason, elapsed }),
            Some(Err(e)) => Err(VmError::Vcpu(e)),
            None => Ok(VmExit {
                reason: ExitReason::Stopped,
                elapsed,
            }),
        }
    }

    /// Pause, snapshot, resume (for a [`VmSnapshotter`]).
    fn live_snapshot(&mut self, dir: &std::path::Path) -> Result<SnapshotInfo, SnapshotError> {
        if self.state != VmState::Running {
            return Err(SnapshotError::InvalidState { state: self.state });
        }
        self.pause(LIVE_SNAPSHOT_PAUSE_TIMEOUT)
            .map_err(|e| SnapshotError::PauseResume(e.to_string()))?;
        let result = self.snapshot(dir);
        self.resume(LIVE_SNAPSHOT_PAUSE_TIMEOUT)
            .map_err(|e| SnapshotError::PauseResume(e.to_string()))?;
        result
    }

    fn broadcast(&self, cmd: VcpuCommand) {
        for v in &self.vcpus {
            v.send(cmd.clone());
        }
    }

    /// Records an event's effect on vCPU states and the outcome.
    fn absorb(&mut self, event: VmEvent) {
        match event {
            VmEvent::VcpuState { vcpu, state } => {
                if let Some(s) = self.vcpu_states.get_mut(usize::from(vcpu)) {
                    *s = state;
                }
            }
            VmEvent::Reset(cause) => {
                self.outcome.get_or_insert(Ok(ExitReason::Reset(cause)));
            }
            VmEvent::StopRequested => {
                self.outcome.get_or_insert(Ok(ExitReason::Stopped));
            }
            VmEvent::Snapshot(req) => self.snapshot_requests.push(req),
            VmEvent::VcpuStopped { stop, .. } => match stop {
                VcpuStop::Stopped => {}
                VcpuStop::GuestStop(why) => {
                    self.outcome.get_or_insert(Ok(ExitReason::GuestStop(why)));
                }
                VcpuStop::Failed(e) => {
                    tracing::warn!(vm = %self.name, error = %e, "guest failed");
                    self.outcome.get_or_insert(Err(e));
                }
            },
        }
    }

    /// Waits until every vCPU that has not exited is in `wanted`; other
    /// events are recorded for [`Vm::run`].
    fn wait_vcpus(&mut self, wanted: VcpuState, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .vcpu_states
                .iter()
                .all(|s| *s == wanted || *s == VcpuState::Exited)
            {
                return Ok(());
            }
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) => self.absorb(e),
                Err(_) => return Err(VmError::CommandTimeout { wanted, timeout }),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        for v in &mut self.vcpus {
            v.stop_and_join();
        }
        // Stops and joins the vsock-mux thread.
        self.muxer.take();
        // Shutting our end of the socket down ends the pumps' reads and
        // writes; closing the queues ends their waits.
        if let Some(channel) = &self.channel {
            let _ = channel.shutdown(std::net::Shutdown::Both);
        }
        if let Some(console) = &self.console {
            let console = lock(console);
            console.device().input().close();
            if let Some(out) = console.device().output_queue() {
                out.close();
            }
        }
        for pump in self.pumps.drain(..) {
            if pump.join().is_err() {
                tracing::error!(vm = %self.name, "virtio-console pump thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Vm>();
        assert_send::<VmBuilder>();
    }
}
