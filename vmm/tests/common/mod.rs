//! Helpers shared by the tests that run guests on /dev/kvm.

use sluice_vmm::VmConfig;

/// Whether /dev/kvm can be used; without it the caller skips (with a loud
/// message), and with `SLUICE_REQUIRE_KVM=1` the test fails instead.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("SLUICE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("SLUICE_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            eprintln!(
                "\n*** SKIPPED: /dev/kvm cannot be opened ({e}); KVM tests did not run ***\n"
            );
            false
        }
    }
}

/// A one-vCPU VM with 16 MiB of memory.
pub fn config(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        mem_size: 16 << 20,
        ..VmConfig::default()
    }
}
