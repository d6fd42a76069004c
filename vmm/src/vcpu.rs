//! One vCPU = one named `std::thread` running `KVM_RUN` in a loop, driven
//! by an explicit state machine:
//!
//! ```text
//!  Created ──Run──▶ Running ──Pause──▶ Paused ──Run──▶ Running
//!     │                │                  │
//!     └──────Stop──────┴───Stop / guest stop / error──┴──▶ Exited
//! ```
//!
//! Commands arrive on an `mpsc` channel. A running vCPU sits inside
//! `KVM_RUN`, so a command is followed by a *kick*: the signal
//! [`kick_signal`] sent to the thread. Its handler sets `immediate_exit`
//! in the thread's `kvm_run` page, so `KVM_RUN` returns `EINTR` whether
//! the signal lands inside the ioctl or just before it (no lost wake-up);
//! the loop then reads its commands.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::devices::Bus;
use crate::snapshot::{SnapshotError, VcpuSnapshot, save_vcpu};
use crate::vm::{VmEvent, VmState};

/// The states of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Thread started, guest not entered yet.
    Created,
    /// Running guest code.
    Running,
    /// Stopped between two `KVM_RUN`s, waiting for `Run` or `Stop`.
    Paused,
    /// The thread is finishing; no more guest code runs.
    Exited,
}

/// How long a new vCPU thread polls for its vCPU and then for its first
/// command before it sleeps on the channel. `build` is normally followed
/// by `start` at once, and waking a sleeping thread on an idle CPU cost
/// 1-3 ms on the nested-virtualization hosts we measured (the CPU itself
/// sleeps in the outer hypervisor), more than a whole restore.
pub const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(3);

/// Receives from `rx`, polling for up to `spin` before blocking.
fn recv_spinning<T>(rx: &Receiver<T>, spin: Duration) -> Result<T, RecvError> {
    let deadline = Instant::now() + spin;
    loop {
        match rx.try_recv() {
            Ok(v) => return Ok(v),
            Err(TryRecvError::Disconnected) => return Err(RecvError),
            Err(TryRecvError::Empty) if Instant::now() < deadline => std::hint::spin_loop(),
            Err(TryRecvError::Empty) => return rx.recv(),
        }
    }
}

/// Reply to [`VcpuCommand::Save`].
pub type SaveReply = Sender<Result<Box<VcpuSnapshot>, SnapshotError>>;

/// Commands to a vCPU thread.
#[derive(Debug, Clone)]
pub enum VcpuCommand {
    /// Start or resume.
    Run,
    /// Stop running guest code until the next `Run`.
    Pause,
    /// Leave the run loop for good.
    Stop,
    /// Read the vCPU's state for a snapshot (only while `Created` or
    /// `Paused`; a running vCPU answers with an error). The MSRs read are
    /// `msr_index` (`KVM_GET_MSR_INDEX_LIST`).
    Save {
        /// MSRs to read.
        msr_index: Arc<[u32]>,
        /// Where the state goes.
        reply: SaveReply,
    },
}

/// Why a vCPU stopped on the guest's own account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_EXIT_SHUTDOWN`: on x86 a triple fault (an exception while
    /// delivering a double fault), or a shutdown cycle.
    #[error("vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN) at rip={rip:#x}")]
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Guest instruction pointer, if it could be read.
        rip: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR`, e.g. an instruction KVM could not emulate.
    #[error("vCPU {vcpu}: KVM internal error, suberror {suberror} ({what}) at rip={rip:#x}")]
    Internal {
        /// The vCPU.
        vcpu: u8,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Its meaning.
        what: &'static str,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused the guest state.
    #[error("vCPU {vcpu}: VM entry failed, hardware reason {reason:#x}")]
    FailEntry {
        /// The vCPU.
        vcpu: u8,
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {exit}")]
    UnexpectedExit {
        /// The vCPU.
        vcpu: u8,
        /// Debug form of the exit.
        exit: String,
    },
    /// The vCPU thread panicked (a bug in a device model or the VMM).
    #[error("vCPU {vcpu} thread panicked: {message}")]
    Panicked {
        /// The vCPU.
        vcpu: u8,
        /// The panic message.
        message: String,
    },
    /// `KVM_RUN` itself failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {errno}")]
    Run {
        /// The vCPU.
        vcpu: u8,
        /// The errno.
        errno: i32,
    },
}

/// How a vCPU run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// It was told to stop.
    Stopped,
    /// The guest halted with interrupts off, or asked for power-off / reset
    /// (`KVM_EXIT_HLT`, `KVM_EXIT_SYSTEM_EVENT`).
    GuestStop(&'static str),
    /// The guest failed.
    Failed(VcpuError),
}

thread_local! {
    // The kvm_run page of the vCPU owned by this thread, for the kick handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Clears this thread's `KVM_RUN_PTR` when dropped.
struct ClearKvmRunPtr;

impl Drop for ClearKvmRunPtr {
    fn drop(&mut self) {
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = KVM_RUN_PTR.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer is the kvm_run mmap of the VcpuFd owned by this
        // thread; it is set right after the thread takes ownership of the fd and
        // cleared before the fd (and its mapping) is dropped. Only this thread
        // and the kernel access the page, and a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*ptr).immediate_exit), 1) };
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

static HANDLER: Once = Once::new();

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    let mut result = Ok(());
    HANDLER.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

/// The VM side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    /// Hands the thread its vCPU; dropped (ending a thread that never got
    /// one) by [`VcpuHandle::attach`] or on stop.
    setup: Option<Sender<Vcpu>>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread `"{vm}-vcpu{id}"` before its vCPU exists: it waits
    /// for [`VcpuHandle::attach`], then runs in state `Created`. A VM
    /// starts its vCPU threads first, so thread creation and scheduling
    /// overlap the KVM set-up instead of adding to it (a restore spends
    /// well under a millisecond in ioctls; a new thread's first run took
    /// longer than that on a busy host). If the handle is dropped before
    /// `attach`, the thread ends without running anything.
    pub fn start(vm_name: &str, id: u8, events: Sender<VmEvent>) -> std::io::Result<VcpuHandle> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (setup_tx, setup_rx) = std::sync::mpsc::channel::<Vcpu>();
        let thread = std::thread::Builder::new()
            .name(format!("{vm_name}-vcpu{id}"))
            .spawn(move || {
                let Ok(vcpu) = recv_spinning(&setup_rx, SPIN_BEFORE_SLEEP) else {
                    return;
                };
                let run =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run_loop(rx)));
                if let Err(panic) = run {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    let _ = events.send(VmEvent::VcpuState {
                        vcpu: id,
                        state: VcpuState::Exited,
                    });
                    let _ = events.send(VmEvent::VcpuStopped {
                        vcpu: id,
                        stop: VcpuStop::Failed(VcpuError::Panicked { vcpu: id, message }),
                    });
                }
            })?;
        Ok(VcpuHandle {
            id,
            commands: tx,
            setup: Some(setup_tx),
            thread: Some(thread),
        })
    }

    /// Gives the thread its configured vCPU (its id must match).
    pub fn attach(&mut self, vcpu: Vcpu) {
        debug_assert_eq!(vcpu.id, self.id);
        if let Some(setup) = self.setup.take() {
            // Err only if the thread is gone (it panicked before recv).
            let _ = setup.send(vcpu);
        }
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends `cmd` and, unless it is `Run` or `Save` (only waiting
    /// threads act on them, and they wait on the channel), kicks the
    /// thread out of `KVM_RUN`. A thread that has already exited ignores it.
    pub fn send(&self, cmd: VcpuCommand) {
        let kick = matches!(cmd, VcpuCommand::Pause | VcpuCommand::Stop);
        if self.commands.send(cmd).is_ok()
            && kick
            && let Some(t) = &self.thread
        {
            // ESRCH only if the thread already finished: nothing to kick.
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop_and_join(&mut self) {
        self.setup.take();
        self.send(VcpuCommand::Stop);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!(vcpu = self.id, "vCPU thread panicked");
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a vCPU thread needs.
pub struct Vcpu {
    /// Index.
    pub id: u8,
    /// The KVM vCPU, already configured.
    pub fd: VcpuFd,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where state changes and stops are reported.
    pub events: Sender<VmEvent>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

enum Step {
    Continue,
    Interrupted,
    Stop(VcpuStop),
}

impl Vcpu {
    /// Starts the thread `"{vm}-vcpu{id}"` in state `Created`.
    pub fn spawn(self, vm_name: &str) -> std::io::Result<VcpuHandle> {
        let mut handle = VcpuHandle::start(vm_name, self.id, self.events.clone())?;
        handle.attach(self);
        Ok(handle)
    }

    fn report(&self, state: VcpuState) {
        tracing::trace!(vcpu = self.id, ?state, "vCPU state");
        let _ = self.events.send(VmEvent::VcpuState {
            vcpu: self.id,
            state,
        });
    }

    fn run_loop(mut self, commands: Receiver<VcpuCommand>) {
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        // Locals drop before parameters, so this clears the kick handler's
        // pointer before `self.fd` (and its kvm_run mapping) goes away, on
        // return and on unwinding alike.
        let _clear = ClearKvmRunPtr;
        let mut state = VcpuState::Created;
        self.report(state);
        let mut first = true;
        let stop = loop {
            let spin = if std::mem::take(&mut first) {
                SPIN_BEFORE_SLEEP
            } else {
                Duration::ZERO
            };
            match state {
                VcpuState::Created | VcpuState::Paused => match recv_spinning(&commands, spin) {
                    Ok(VcpuCommand::Run) => {
                        state = VcpuState::Running;
                        self.report(state);
                    }
                    Ok(VcpuCommand::Pause) => {}
                    Ok(VcpuCommand::Save { msr_index, reply }) => {
                        let _ = reply.send(self.save(&msr_index));
                    }
                    Ok(VcpuCommand::Stop) | Err(_) => break VcpuStop::Stopped,
                },
                VcpuState::Running => {
                    match commands.try_recv() {
                        Ok(VcpuCommand::Pause) => {
                            state = VcpuState::Paused;
                            self.report(state);
                            continue;
                        }
                        Ok(VcpuCommand::Stop) | Err(TryRecvError::Disconnected) => {
                            break VcpuStop::Stopped;
                        }
                        Ok(VcpuCommand::Save { reply, .. }) => {
                            let _ = reply.send(Err(SnapshotError::InvalidState {
                                state: VmState::Running,
                            }));
                        }
                        Ok(VcpuCommand::Run) | Err(TryRecvError::Empty) => {}
                    }
                    match self.run_once() {
                        Step::Continue | Step::Interrupted => {}
                        Step::Stop(stop) => break stop,
                    }
                }
                VcpuState::Exited => break VcpuStop::Stopped,
            }
        };
        self.report(VcpuState::Exited);
        let _ = self.events.send(VmEvent::VcpuStopped {
            vcpu: self.id,
            stop,
        });
    }

    /// Saves the state of this (not running) vCPU. First an entry with
    /// `immediate_exit` set lets KVM finish the instruction of the last
    /// exit (e.g. store the data of a port read in RAX) without running
    /// guest code, so the saved registers are the instruction's result.
    fn save(&mut self, msr_index: &[u32]) -> Result<Box<VcpuSnapshot>, SnapshotError> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(errno) if errno == libc::EINTR || errno == libc::EAGAIN => {}
            Ok(()) => tracing::warn!(
                vcpu = self.id,
                "KVM_RUN with immediate_exit returned an exit"
            ),
            Err(errno) => {
                return Err(SnapshotError::Kvm {
                    ioctl: "KVM_RUN (immediate exit)",
                    source: kvm_ioctls::Error::new(errno),
                });
            }
        }
        save_vcpu(&self.fd, msr_index).map(Box::new)
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn run_once(&mut self) -> Step {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Step::Interrupted;
            }
            Err(e) => {
                return Step::Stop(VcpuStop::Failed(VcpuError::Run {
                    vcpu: id,
                    errno: e.errno(),
                }));
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!(vcpu = id, port, "write to an unclaimed port");
                }
                Step::Continue
            }
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    tracing::trace!(vcpu = id, addr, "write to unclaimed MMIO");
                }
                Step::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            VcpuExit::Hlt => Step::Stop(VcpuStop::GuestStop("hlt")),
            VcpuExit::SystemEvent(kind, _) => Step::Stop(VcpuStop::GuestStop(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => "system event: shutdown",
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => "system event: reset",
                _ => "system event",
            })),
            VcpuExit::Shutdown => Step::Stop(VcpuStop::Failed(VcpuError::TripleFault {
                vcpu: id,
                rip: self.rip(),
            })),
            VcpuExit::InternalError => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
                // filled the `internal` member of the union.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
                    kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
                        "exception while delivering an exception"
                    }
                    kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
                    _ => "unknown",
                };
                Step::Stop(VcpuStop::Failed(VcpuError::Internal {
                    vcpu: id,
                    suberror,
                    what,
                    rip: self.rip(),
                }))
            }
            VcpuExit::FailEntry(reason, _) => {
                Step::Stop(VcpuStop::Failed(VcpuError::FailEntry { vcpu: id, reason }))
            }
            VcpuExit::Intr => Step::Interrupted,
            other => {
                let exit = format!("{other:?}");
                Step::Stop(VcpuStop::Failed(VcpuError::UnexpectedExit {
                    vcpu: id,
                    exit,
                }))
            }
        }
    }
}
