//! `/init` of a microVM guest: the agent as PID 1 of the guest kernel.
//!
//! The kernel unpacks the initramfs (`sluice image build` puts the static
//! agent at `/init`) and runs it with nothing mounted. The agent mounts
//! `/proc`, `/sys`, `/dev` (devtmpfs), `/tmp` and `/run`, brings the
//! loopback interface up (the Runtime API listens on `127.0.0.1`), then serves as in
//! the process sandbox but without isolation (the VM is the sandbox) over
//! the virtio console [`GUEST_CHANNEL`], and reboots the guest when the
//! host ends the session (with `reboot=k` the VMM sees an i8042 reset and
//! the VM exits).

use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};

use crate::supervisor::{Channel, ENTROPY_SINK, run_stage0};

/// The agent channel inside a guest: the first virtio console port.
pub const GUEST_CHANNEL: &str = "/dev/hvc0";

/// What `/init` mounts: (source, target, file system type, flags).
pub const GUEST_MOUNTS: &[(&str, &str, &str, MsFlags)] = &[
    (
        "proc",
        "/proc",
        "proc",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    ),
    ("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID),
    (
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    ),
    (
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
    ),
];

/// Mounts [`GUEST_MOUNTS`]; returns the targets that failed, with why
/// (logged: a guest without `/sys` still serves, and the static nodes of
/// the initramfs stand in for a missing devtmpfs).
pub fn mount_guest_filesystems() -> Vec<(String, nix::Error)> {
    let mut failed = Vec::new();
    for (source, target, fstype, flags) in GUEST_MOUNTS {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(*source), *target, Some(*fstype), *flags, None::<&str>) {
            eprintln!("sluice-agent(init): cannot mount {fstype} on {target}: {e}");
            failed.push(((*target).to_string(), e));
        }
    }
    failed
}

/// Runs as `/init`: mounts, serves on `channel`, then reboots the guest.
/// Returns only if the reboot fails (e.g. when tested inside a PID
/// namespace), with the agent's exit code.
pub fn run_init(channel: Channel) -> u8 {
    mount_guest_filesystems();
    // A fresh kernel's `lo` is down; the function reaches the Runtime API
    // on 127.0.0.1.
    if let Err(e) = crate::netlink::loopback_up() {
        eprintln!("sluice-agent(init): cannot bring lo up: {e}");
    }
    let code = run_stage0(channel, std::path::Path::new(ENTROPY_SINK), true);
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("sluice-agent(init): reboot failed: {e}");
    code
}
