//! CPUID: what KVM supports (`KVM_GET_SUPPORTED_CPUID`), adjusted per vCPU.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Kvm, VcpuFd};

/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: TSC deadline timer (Linux uses it with the in-kernel LAPIC).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Errors configuring CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// KVM_SET_CPUID2 failed.
    #[error("KVM_SET_CPUID2 failed on vCPU {vcpu}: {source}")]
    Set {
        /// The vCPU.
        vcpu: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The CPUID KVM can offer on this host.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)
}

/// Adjusts one entry for vCPU `id` of `count`: APIC ids, logical processor
/// count, hypervisor bit, TSC deadline timer, x2APIC topology.
pub fn patch_entry(entry: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    match entry.function {
        0x1 => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors.
            entry.ebx =
                (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
            entry.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
            // EDX bit 28 (HTT) says EBX[23:16] is valid.
            if count > 1 {
                entry.edx |= 1 << 28;
            }
        }
        0xb => {
            // x2APIC id of this logical processor.
            entry.edx = u32::from(id);
        }
        _ => {}
    }
}

/// Builds the CPUID of vCPU `id` from `supported` and sets it.
pub fn setup_cpuid(vcpu: &VcpuFd, supported: &CpuId, id: u8, count: u8) -> Result<(), CpuidError> {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        patch_entry(entry, id, count);
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(|source| CpuidError::Set { vcpu: id, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0xff00_0800,
            ..Default::default()
        };
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & (1 << 28), 0);
    }

    #[test]
    fn leaf_b_carries_x2apic_id() {
        let mut e = kvm_cpuid_entry2 {
            function: 0xb,
            ..Default::default()
        };
        patch_entry(&mut e, 7, 8);
        assert_eq!(e.edx, 7);
    }
}
