//! The Linux-guest tier: boots a real kernel. It needs hardware KVM (vmx or
//! svm; not `kvm_pvm`) and a microVM kernel in `SLUICE_GUEST_KERNEL`
//! (bzImage or vmlinux with serial 8250 console and virtio-mmio).
//!
//! Where that is missing the test skips with a loud message;
//! `SLUICE_REQUIRE_HW_KVM=1` turns the skip into a failure.

use std::path::PathBuf;
use std::time::Duration;

use sluice_vmm::vm::ResetCause;
use sluice_vmm::{Boot, ExitReason, VmBuilder, VmConfig};

fn skip(why: &str) {
    if std::env::var("SLUICE_REQUIRE_HW_KVM").as_deref() == Ok("1") {
        panic!("SLUICE_REQUIRE_HW_KVM=1 but the Linux-guest tier cannot run: {why}");
    }
    eprintln!("\n*** SKIPPED: Linux-guest tier: {why} ***\n");
}

#[test]
fn linux_kernel_boots_to_its_banner_and_reboots_through_the_i8042() {
    let host = sluice_vmm::host::probe();
    if !host.can_boot_linux() {
        skip(&host.linux_blockers().join("; "));
        return;
    }
    let Some(kernel) = std::env::var_os("SLUICE_GUEST_KERNEL").map(PathBuf::from) else {
        skip("SLUICE_GUEST_KERNEL is not set (path of a microVM bzImage or vmlinux)");
        return;
    };
    // No root file system: the kernel panics after mounting fails, and
    // panic=-1 with reboot=k reboots at once through the i8042.
    let boot = Boot::Linux {
        kernel,
        cmdline: "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux".into(),
        initramfs: None,
    };
    let config = VmConfig {
        name: "linux".into(),
        mem_size: 256 << 20,
        console_capture: 1 << 20,
        ..VmConfig::default()
    };
    let mut vm = VmBuilder::new(config, boot).build().unwrap();
    let exit = vm.run(Duration::from_secs(60)).unwrap();
    let console = String::from_utf8_lossy(&vm.console_output()).into_owned();
    assert!(
        console.contains("Linux version"),
        "no kernel banner on the console:\n{console}"
    );
    assert_eq!(
        exit.reason,
        ExitReason::Reset(ResetCause::I8042),
        "console:\n{console}"
    );
}
