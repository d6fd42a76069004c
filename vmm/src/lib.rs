//! # sluice-vmm: sluice's own KVM microVM monitor
//!
//! This crate runs guests on `/dev/kvm` with `kvm-ioctls`/`kvm-bindings`,
//! guest memory from `vm-memory`, kernels loaded by `linux-loader` and a
//! 16550A UART from `vm-superio`. It is the one crate of the workspace
//! allowed `unsafe` code; every block carries a `// SAFETY:` comment.
//!
//! ## The box
//!
//! ```text
//!  VmBuilder::new(VmConfig, Boot).pio_device(..).mmio_device(..).agent_channel()?.build()
//!    │  KVM_CREATE_VM, TSS, in-kernel irqchip (PIC+IOAPIC+LAPIC) and PIT
//!    │  guest RAM (memory.rs: layout, MMIO gap below 4 GiB)
//!    │  Boot::Code: raw 64-bit code at 1 MiB        Boot::Linux: loader.rs (ELF/bzImage,
//!    │                                                cmdline, initramfs, zero page + E820,
//!    │                                                MP table)
//!    │  devices: port bus {COM1 serial → rate-limited console, i8042}, MMIO bus {virtio-mmio}
//!    │  per vCPU: CPUID (KVM_GET_SUPPORTED_CPUID, patched), MSRs, long mode (GDT,
//!    │  4 GiB identity map), regs, FPU, LAPIC LINT0/1; one named thread "{vm}-vcpu{N}"
//!    ▼
//!  Vm: start / pause / resume / stop / run(timeout) → VmExit { reason, elapsed } | VmError
//!    │
//!    │  paused: vm.snapshot(dir) → dir/vm.state (versioned, CRC-32) + dir/vm.mem (sparse RAM)
//!    ▼
//!  Snapshot::load(dir)? ──Arc──▶ VmBuilder::restore(config, snap).guest_write(seed_addr, seed).build()?
//!                                  (RAM = vm.mem mapped MAP_PRIVATE; all state set before the
//!                                   vCPU threads get their fds) ──▶ Vm::start resumes the guest
//! ```
//!
//! * [`vcpu`]: each vCPU thread is a state machine `Created → Running ⇄
//!   Paused → Exited`, commanded over an `mpsc` channel. A command is
//!   followed by a kick (a real-time signal whose handler sets
//!   `immediate_exit` in the thread's `kvm_run`), so a vCPU leaves
//!   `KVM_RUN` promptly; pause, stop and timeouts use it.
//! * [`vm`]: the VM waits on one event channel fed by vCPU threads and
//!   devices. An i8042 reset (`0xFE` to port `0x64`) ends the run with
//!   [`ExitReason::Reset`]; a triple fault, an emulation failure or a failed
//!   entry is a typed [`vcpu::VcpuError`]; a timeout stops the vCPUs and
//!   returns [`ExitReason::TimedOut`].
//! * [`devices`]: a range-checked [`devices::Bus`]; the serial console
//!   writes to `tracing` (target `sluice_vmm::console`) and a bounded
//!   capture through a token bucket, so a guest cannot flood the host's logs.
//! * [`virtio`]: virtio-mmio version 2 transport, a split virtqueue that
//!   validates every descriptor chain (bounds, loops, lengths, ordering,
//!   no indirect) and returns bad ones unused, and a virtio-console.
//!   [`VmBuilder::agent_channel`] makes it the guest agent's channel: the
//!   host gets one end of a Unix socket pair; pump threads move bytes
//!   between the other end and bounded queues, and a full output queue
//!   leaves transmit buffers in the ring, so a slow host never blocks a
//!   vCPU. Its interrupt is an irqfd; Linux finds it through
//!   `virtio_mmio.device=4K@0xd0000000:5`.
//! * [`snapshot`]: [`Vm::snapshot`] on a paused VM writes guest RAM
//!   (zero pages as holes) and a state file: magic, format version, body
//!   length and a CRC-32, then the memory layout, KVM clock, PIC
//!   master/slave, IOAPIC, PIT, and per vCPU CPUID, every MSR of
//!   `KVM_GET_MSR_INDEX_LIST` KVM lets us read (refusals recorded), regs,
//!   sregs, FPU, xsave, xcrs, LAPIC, mp_state, vCPU events and debug
//!   registers (saved by the vCPU's own thread after an `immediate_exit`
//!   entry completes the last exit's instruction), plus the serial UART
//!   (registers and unread input) and the virtio-mmio transport with its
//!   queue indexes. [`Snapshot::load`] rejects a bad magic, another
//!   version, a truncated or corrupt file or a memory file of the wrong
//!   size with a typed [`SnapshotError`] before anything is restored.
//!   [`VmBuilder::restore`] maps the memory file `MAP_PRIVATE`, so any
//!   number of clones share its page cache and copy only the pages they
//!   write; [`VmBuilder::guest_write`] gives each clone its identity (a
//!   seed the guest reads after it resumes). vCPU threads are started
//!   first in `build`, so their start-up overlaps the KVM set-up, and
//!   poll briefly for their first command
//!   ([`vcpu::SPIN_BEFORE_SLEEP`]) instead of sleeping at once.
//! * [`virtio::vsock`]: virtio-vsock emulated in the VMM with a hybrid
//!   Unix-socket host side (`CONNECT <port>` in, `<uds>_<port>` out),
//!   credit-based flow control and a `vsock-mux` polling thread;
//!   [`VmBuilder::vsock`] puts it at `0xd0001000`, IRQ 6.
//! * [`initramfs`]: a deterministic cpio newc writer and the guest image
//!   layout (static agent as `/init`).
//! * [`image`]: the guest kernel built from Debian's `linux-source` with
//!   `guest/kernel.config`, cached by hash, and the image (kernel +
//!   initramfs) behind `sluice image build`.
//! * [`host`]: whether this host can run tiny guests and boot Linux
//!   (hardware virtualization vs. `kvm_pvm` emulation), for `sluice doctor`.
//! * [`asm`] and [`bench`](mod@bench): a tiny x86-64 code builder for test guests, and
//!   the measurements behind `benches/vm.rs` (including
//!   [`bench::snapshot_restore`]: restore-to-running next to a fresh boot
//!   of the same guest, clones per second, memory per idle clone).
//!
//! Not built yet: identity for Linux clones (vmgenid, reseeding the
//! guest's RNG), the host-side queues of the agent channel in a snapshot
//! (bytes the host wrote that the device has not yet put in the guest's
//! ring, or guest output the pump has not yet sent, are not saved),
//! vsock connections in a snapshot (a restored device resets them), and
//! clone pools for the `microvm` executor backend (which lives in
//! `sluice-executor` and uses [`Vm::stopper`] and
//! [`VmBuilder::console_lines`] from here).

// vmm is the one crate of the workspace allowed `unsafe` (KVM ioctls, guest
// memory mappings, signal handlers); every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

pub mod asm;
pub mod bench;
pub mod devices;
pub mod host;
pub mod image;
pub mod initramfs;
pub mod loader;
pub mod memory;
pub mod scripted;
pub mod snapshot;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86_64;

pub use snapshot::{Snapshot, SnapshotError, SnapshotInfo};
pub use vm::{Boot, ExitReason, Vm, VmBuilder, VmConfig, VmError, VmExit, VmState};
/// Guest RAM as `vm-memory` maps it (re-exported for users of [`Vm::memory`]).
pub use vm_memory::GuestMemoryMmap;
