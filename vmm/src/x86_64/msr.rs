//! Model-specific registers set on every vCPU at boot.

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Errors setting MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The FAM wrapper could not be built.
    #[error("cannot build the MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM accepted only a prefix of the list.
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs; MSR {rejected:#x} was refused")]
    Partial {
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
        /// The first refused MSR index.
        rejected: u32,
    },
}

/// The boot MSR list: SYSENTER/SYSCALL state cleared, TSC zero, fast
/// strings on, MTRRs enabled with write-back default.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Sets [`boot_msr_entries`] on `vcpu`; every one must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            wanted: entries.len(),
            rejected: entries[set].index,
        });
    }
    Ok(())
}
