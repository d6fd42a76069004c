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

/// The first steps of a real kernel, which work even under `kvm_pvm`
/// emulation (about 20 s here): the kernel prints, through early printk on
/// our serial port, its banner, the command line we loaded and the E820 map
/// from our zero page. That checks the ELF/bzImage loading, boot params,
/// command line and 64-bit entry against a real kernel. Needs
/// `SLUICE_GUEST_KERNEL` (`scripts/fetch-guest-kernel.sh` unpacks Debian's
/// cloud kernel); the run may then end in any way (under emulation the
/// kernel later hits an instruction KVM cannot emulate).
#[test]
fn linux_kernel_reads_our_command_line_and_e820_map() {
    const CMDLINE: &str = "earlyprintk=serial,ttyS0,115200 console=ttyS0 reboot=k panic=-1 noxsave";
    let Some(kernel) = std::env::var_os("SLUICE_GUEST_KERNEL").map(PathBuf::from) else {
        skip("SLUICE_GUEST_KERNEL is not set (path of a bzImage or vmlinux)");
        return;
    };
    if !sluice_vmm::host::probe().can_run_tiny_guests() {
        skip("/dev/kvm is not usable");
        return;
    }
    let boot = Boot::Linux {
        kernel,
        cmdline: CMDLINE.into(),
        initramfs: None,
    };
    let config = VmConfig {
        name: "linux-banner".into(),
        mem_size: 256 << 20,
        console_capture: 1 << 20,
        ..VmConfig::default()
    };
    let mut vm = VmBuilder::new(config, boot).build().unwrap();
    vm.start().unwrap();
    // At most three minutes of (possibly emulated) boot, until the kernel
    // has printed the E820 map we gave it (its last RAM range ends at 256 MiB).
    let seen = vm.wait_for_console(b"0x000000000fffffff] usable", Duration::from_secs(180));
    let outcome = vm.run(Duration::ZERO).map(|e| e.reason);
    let console = String::from_utf8_lossy(&vm.console_output()).into_owned();
    eprintln!("kernel run ended with {outcome:?}; console:\n{console}");
    assert!(
        seen,
        "the kernel did not print our E820 map within 180 s:\n{console}"
    );
    assert!(console.contains("Linux version"), "{console}");
    assert!(
        console.contains(&format!("Command line: {CMDLINE}")),
        "{console}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{console}"
    );
}

/// The built guest image end to end: the kernel from `sluice image build`
/// boots with the agent as `/init`, which mounts its file systems, opens
/// `/dev/hvc0` (our virtio-console) and answers the host's `Start` frame
/// over the agent channel. The function folder (at `/var/task`, appended
/// to the initramfs) has no `bootstrap`, so the agent reports the init
/// error a process sandbox would. Needs hardware KVM and
/// `SLUICE_GUEST_IMAGE` (an image folder with `kernel` and
/// `initramfs.cpio`, printed by `sluice image build`).
#[test]
fn the_guest_image_boots_the_agent_which_answers_over_the_agent_channel() {
    use sluice_protocol::{DEFAULT_MAX_FRAME, Message, StartConfig, read_message, write_message};
    use sluice_vmm::image::GuestImage;
    use std::io::BufReader;

    let host = sluice_vmm::host::probe();
    if !host.can_boot_linux() {
        skip(&host.linux_blockers().join("; "));
        return;
    }
    let Some(dir) = std::env::var_os("SLUICE_GUEST_IMAGE").map(PathBuf::from) else {
        skip("SLUICE_GUEST_IMAGE is not set (an image folder from `sluice image build`)");
        return;
    };
    let image = GuestImage {
        kernel: dir.join("kernel"),
        initramfs: dir.join("initramfs.cpio"),
        cached: true,
    };
    let function = tempfile::tempdir().unwrap();
    std::fs::write(function.path().join("README"), b"no bootstrap here").unwrap();
    let config = VmConfig {
        name: "guest-image".into(),
        mem_size: 256 << 20,
        console_capture: 1 << 20,
        ..VmConfig::default()
    };
    let (builder, channel) =
        VmBuilder::new(config, image.boot_function(function.path(), &[]).unwrap())
            .agent_channel()
            .unwrap();
    let mut vm = builder.build().unwrap();
    vm.start().unwrap();
    channel
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut w = channel.try_clone().unwrap();
    let mut r = BufReader::new(channel);
    let start = StartConfig {
        function_name: "guest".into(),
        function_version: "1".into(),
        memory_mb: 128,
        handler: "h.main".into(),
        log_group: "g".into(),
        log_stream: "s".into(),
        function_dir: "/var/task".into(),
        task_root: "/var/task".into(),
        root_dir: String::new(),
        runtime_layers: vec![],
        layers: vec![],
        tmp_mb: 16,
        rlimit_nproc: 0,
        rlimit_as_bytes: 0,
        runtime_api_port: 0,
        env: vec![],
        run_as: None,
        isolate: false,
    };
    write_message(&mut w, &Message::Start(Box::new(start))).unwrap();
    let answer = read_message(&mut r, DEFAULT_MAX_FRAME);
    let console = String::from_utf8_lossy(&vm.console_output()).into_owned();
    match answer {
        Ok(Some(Message::InitError { error_type, .. })) => {
            assert_eq!(
                error_type, "Runtime.InvalidEntrypoint",
                "console:\n{console}"
            )
        }
        other => panic!("unexpected answer {other:?}; console:\n{console}"),
    }
    write_message(&mut w, &Message::Shutdown).unwrap();
    // The agent reboots the guest (reboot=k): an i8042 reset.
    let exit = vm.run(Duration::from_secs(60)).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
}
