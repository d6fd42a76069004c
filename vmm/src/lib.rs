//! # sluice-vmm: sluice's own KVM microVM monitor
//!
//! Placeholder docs, rewritten at the end of the session.
// vmm is the one crate of the workspace allowed `unsafe` (KVM ioctls, guest
// memory mappings, signal handlers); every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

pub mod asm;
pub mod bench;
pub mod devices;
pub mod host;
pub mod initramfs;
pub mod loader;
pub mod memory;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86_64;

pub use vm::{Boot, ExitReason, Vm, VmBuilder, VmConfig, VmError, VmExit, VmState};
