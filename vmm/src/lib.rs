//! # sluice-vmm: the microVM monitor (not built yet)
//!
//! This crate will own sluice's own virtual machine monitor on `kvm-ioctls`,
//! `kvm-bindings`, `vm-memory` and `linux-loader`: guest memory layout, 64-bit
//! Linux boot (ELF vmlinux and bzImage, boot params, command line, initramfs),
//! CPUID and MSR set-up, the in-kernel irqchip and PIT, a rate-limited serial
//! console, one named `std::thread` per vCPU driven by an explicit state
//! machine, virtio-mmio devices (virtio-vsock or virtio-console carrying the
//! guest agent's framed channel), pause/resume, and snapshot/restore of
//! initialised function VMs. It will be the only crate allowed to contain
//! `unsafe` code, each block with a `// SAFETY:` comment.
//!
//! Nothing is implemented yet: the process sandbox in `sluice-executor` runs
//! functions today (see issues "vmm" and "Snapshots and pools").
