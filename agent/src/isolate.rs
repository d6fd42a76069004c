//! Building the process sandbox: namespaces, a private read-only root,
//! loopback networking, rlimits, landlock and seccomp.
//!
//! The agent runs in two stages because a new PID namespace only applies to
//! children, and because the host must write the user namespace's uid/gid
//! maps from outside:
//!
//! * **stage 0** (the process the host spawns). As real root it first takes a
//!   private mount namespace and assembles the sandbox root on a tmpfs at
//!   `root_dir` (runtime layers and the function folder bind-mounted
//!   read-only, the function's layers merged read-only at `/opt`, a
//!   size-limited writable `/tmp`, `/run/sluice` for
//!   invocation attachments (written by the agent), a minimal `/dev` and a
//!   synthetic `/etc`), so that it can reach folders an unprivileged uid could
//!   not traverse. It then unshares user, mount, PID, network, IPC, UTS and
//!   cgroup namespaces, sends `Unshared` and waits for `Proceed` while the
//!   host maps sandbox root to an unprivileged host uid (65534) and puts the
//!   process in its cgroups. It switches to that uid and spawns stage 1.
//!   (Without host root the order is reversed: unshare first, with the
//!   caller's own uid mapped, then build the root.)
//! * **stage 1** is PID 1 of the new PID namespace: it mounts `/proc`,
//!   pivots into the root, brings `lo` up, then restricts itself with
//!   rlimits, landlock and a seccomp filter before serving the Runtime API and
//!   starting `bootstrap`. When it exits the kernel kills every process left
//!   in the namespace, so nothing a function forks outlives its sandbox.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, chdir, pivot_root, setgroups, sethostname, setresgid, setresuid};
use sluice_protocol::{MAX_ATTACHMENT, SANDBOX_ROOT_HOST_ID, StartConfig};

/// The folder of `sluice_protocol::ATTACHMENT_PATH`.
pub const ATTACHMENT_DIR: &str = "/run/sluice";

/// A step of the sandbox set-up that failed.
#[derive(Debug)]
pub struct SetupError {
    /// What was being done.
    pub step: String,
    /// The OS error.
    pub source: io::Error,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.source)
    }
}

impl std::error::Error for SetupError {}

trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, SetupError>;
}

impl<T> Step<T> for Result<T, nix::Error> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| SetupError {
            step: what(),
            source: io::Error::from(e),
        })
    }
}

impl<T> Step<T> for Result<T, io::Error> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| SetupError {
            step: what(),
            source: e,
        })
    }
}

fn inside(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Stage 0, part 1 (host root only): a private mount namespace with the
/// sandbox root assembled at `cfg.root_dir`.
pub fn build_root_as_host_root(cfg: &StartConfig) -> Result<(), SetupError> {
    unshare(CloneFlags::CLONE_NEWNS).step(|| "unshare(CLONE_NEWNS)".into())?;
    build_root(cfg, Some(SANDBOX_ROOT_HOST_ID))
}

/// Unshare every namespace the sandbox uses, except the mount namespace
/// when it was already taken by [`build_root_as_host_root`]... it is taken
/// again so that it belongs to the new user namespace (which locks the
/// read-only bind mounts made by host root).
pub fn unshare_all() -> Result<(), SetupError> {
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .step(|| "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)".into())
}

/// After the host wrote the maps: become root of the user namespace (an
/// unprivileged uid on the host) and drop supplementary groups.
pub fn become_sandbox_root(drop_groups: bool) -> Result<(), SetupError> {
    let root_gid = Gid::from_raw(0);
    let root_uid = Uid::from_raw(0);
    setresgid(root_gid, root_gid, root_gid).step(|| "setresgid(0) in the sandbox".into())?;
    if drop_groups {
        setgroups(&[]).step(|| "setgroups([]) in the sandbox".into())?;
    }
    setresuid(root_uid, root_uid, root_uid).step(|| "setresuid(0) in the sandbox".into())
}

/// Assemble the root file system of the sandbox at `cfg.root_dir`.
/// `root_host_id`: the host uid/gid sandbox root will map to, when the
/// root is built before the user namespace exists (host root); then the
/// agent's own writable folders are given to it.
pub fn build_root(cfg: &StartConfig, root_host_id: Option<u32>) -> Result<(), SetupError> {
    let root = Path::new(&cfg.root_dir);
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| "make / private".into())?;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        nosuid,
        Some("size=16m,mode=755"),
    )
    .step(|| format!("mount tmpfs on {}", root.display()))?;

    for layer in &cfg.runtime_layers {
        let src = Path::new(layer);
        let dst = inside(root, layer);
        let meta = match fs::symlink_metadata(src) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).step(|| format!("stat runtime layer {layer}")),
        };
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).step(|| format!("mkdir {}", parent.display()))?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(src).step(|| format!("readlink {layer}"))?;
            symlink(&target, &dst).step(|| format!("symlink {}", dst.display()))?;
        } else {
            fs::create_dir_all(&dst).step(|| format!("mkdir {}", dst.display()))?;
            bind_ro(src, &dst)?;
        }
    }

    let task = inside(root, &cfg.task_root);
    fs::create_dir_all(&task).step(|| format!("mkdir {}", task.display()))?;
    bind_ro(Path::new(&cfg.function_dir), &task)?;
    mount_layers(&cfg.layers, &inside(root, LAYERS_DIR))?;

    let tmp = inside(root, "/tmp");
    fs::create_dir_all(&tmp).step(|| "mkdir /tmp".into())?;
    mount(
        Some("tmpfs"),
        &tmp,
        Some("tmpfs"),
        nosuid,
        Some(format!("size={}m,mode=1777", cfg.tmp_mb.max(1)).as_str()),
    )
    .step(|| "mount tmpfs on /tmp".into())?;

    // Invocation attachments (`sluice_protocol::ATTACHMENT_PATH`): written
    // by the agent (sandbox root), readable by the function.
    let attachments = inside(root, ATTACHMENT_DIR);
    fs::create_dir_all(&attachments).step(|| format!("mkdir {ATTACHMENT_DIR}"))?;
    mount(
        Some("tmpfs"),
        &attachments,
        Some("tmpfs"),
        nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(
            format!(
                "size={}m,mode=755{}",
                MAX_ATTACHMENT.div_ceil(1 << 20) + 1,
                root_host_id.map_or(String::new(), |id| format!(",uid={id},gid={id}"))
            )
            .as_str(),
        ),
    )
    .step(|| format!("mount tmpfs on {ATTACHMENT_DIR}"))?;

    let dev = inside(root, "/dev");
    fs::create_dir_all(&dev).step(|| "mkdir /dev".into())?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755"),
    )
    .step(|| "mount tmpfs on /dev".into())?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let src = Path::new("/dev").join(node);
        let dst = dev.join(node);
        fs::write(&dst, b"").step(|| format!("create /dev/{node}"))?;
        mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .step(|| format!("bind /dev/{node}"))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(name)).step(|| format!("symlink /dev/{name}"))?;
    }
    let shm = dev.join("shm");
    fs::create_dir_all(&shm).step(|| "mkdir /dev/shm".into())?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        nosuid | MsFlags::MS_NOEXEC,
        Some("size=64m,mode=1777"),
    )
    .step(|| "mount tmpfs on /dev/shm".into())?;
    mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .step(|| "remount /dev read-only".into())?;

    let etc = inside(root, "/etc");
    fs::create_dir_all(&etc).step(|| "mkdir /etc".into())?;
    for (name, content) in [
        (
            "passwd",
            "root:x:0:0:root:/tmp:/bin/sh\nsbx_user1051:x:993:990::/home/sbx_user1051:/sbin/nologin\n",
        ),
        ("group", "root:x:0:\n"),
        // `sandbox.localdomain`: where Lambda extensions listen for the
        // Telemetry API, as in Lambda.
        (
            "hosts",
            "127.0.0.1 localhost sandbox.localdomain sandbox\n::1 localhost\n",
        ),
        ("hostname", "sandbox\n"),
        ("resolv.conf", ""),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
        ),
    ] {
        let p = etc.join(name);
        fs::write(&p, content).step(|| format!("write /etc/{name}"))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
            .step(|| format!("chmod /etc/{name}"))?;
    }
    for d in ["/proc", "/opt", "/var/runtime"] {
        let p = inside(root, d);
        fs::create_dir_all(&p).step(|| format!("mkdir {d}"))?;
    }
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nosuid,
        None::<&str>,
    )
    .step(|| "remount the sandbox root read-only".into())?;
    Ok(())
}

/// Where the function's layers are, inside the sandbox (Lambda's `/opt`).
pub const LAYERS_DIR: &str = "/opt";

/// The function's layers at `dst`, read-only: one is bound there; several
/// are merged by a read-only overlay whose upper layers are the later
/// ones, so a later layer's file hides an earlier one's, as Lambda
/// extracts them in order.
fn mount_layers(layers: &[String], dst: &Path) -> Result<(), SetupError> {
    if layers.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dst).step(|| format!("mkdir {}", dst.display()))?;
    if let [one] = layers {
        return bind_ro(Path::new(one), dst);
    }
    // overlayfs lists lower folders topmost first, separated by `:`, in a
    // comma-separated option string: both are escaped.
    let escape = |p: &String| {
        p.chars()
            .fold(String::with_capacity(p.len()), |mut out, c| {
                if matches!(c, '\\' | ':' | ',') {
                    out.push('\\');
                }
                out.push(c);
                out
            })
    };
    let lower: Vec<String> = layers.iter().rev().map(escape).collect();
    mount(
        Some("overlay"),
        dst,
        Some("overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("lowerdir={}", lower.join(":")).as_str()),
    )
    .step(|| format!("mount the layers {layers:?} on {}", dst.display()))
}

fn bind_ro(src: &Path, dst: &Path) -> Result<(), SetupError> {
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step(|| format!("bind {} to {}", src.display(), dst.display()))?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .step(|| format!("remount {} read-only", dst.display()))
}

/// Stage 1, as PID 1 of the new PID namespace: `/proc`, pivot into the root,
/// hostname and loopback.
pub fn enter_root(cfg: &StartConfig) -> Result<(), SetupError> {
    let root = Path::new(&cfg.root_dir);
    // The root was mounted by a more privileged namespace, so it is locked
    // and pivot_root refuses it: bind it onto itself to get a mount of our
    // own (the read-only flags stay locked).
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .step(|| format!("bind {} onto itself", root.display()))?;
    let proc_dir = inside(root, "/proc");
    if let Err(e) = mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        // Some hosts mask /proc so that a new one cannot be mounted in a user
        // namespace; functions still run, without /proc.
        eprintln!("sluice-agent: /proc not available in the sandbox: {e}");
    }
    chdir(root).step(|| format!("chdir {}", root.display()))?;
    pivot_root(".", ".").step(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detach the host root".into())?;
    chdir("/").step(|| "chdir /".into())?;
    sethostname("sandbox").step(|| "sethostname".into())?;
    crate::netlink::loopback_up().step(|| "bring lo up".into())?;
    Ok(())
}

/// Resource limits that apply whether or not the host has cgroups.
pub fn apply_rlimits(cfg: &StartConfig) -> Result<(), SetupError> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).step(|| "setrlimit(CORE)".into())?;
    setrlimit(Resource::RLIMIT_NOFILE, 1024, 1024).step(|| "setrlimit(NOFILE)".into())?;
    if cfg.rlimit_nproc > 0 {
        let n = u64::from(cfg.rlimit_nproc);
        setrlimit(Resource::RLIMIT_NPROC, n, n).step(|| "setrlimit(NPROC)".into())?;
    }
    if cfg.rlimit_as_bytes > 0 {
        setrlimit(
            Resource::RLIMIT_AS,
            cfg.rlimit_as_bytes,
            cfg.rlimit_as_bytes,
        )
        .step(|| "setrlimit(AS)".into())?;
    }
    Ok(())
}

/// Landlock: read and execute the runtime layers, the function, its layers
/// and the synthetic `/etc`, read-write `/tmp`, the attachment folder and the
/// harmless devices, nothing else.
/// Best effort: kernels without landlock keep the other layers.
pub fn apply_landlock(cfg: &StartConfig) -> Result<&'static str, SetupError> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    let abi = ABI::V3;
    let mut read: Vec<String> = cfg
        .runtime_layers
        .iter()
        .filter(|p| Path::new(p).exists())
        .cloned()
        .collect();
    if !cfg.layers.is_empty() {
        read.push(LAYERS_DIR.into());
    }
    read.extend([
        cfg.task_root.clone(),
        "/etc".into(),
        "/proc".into(),
        "/dev".into(),
    ]);
    let write: Vec<&str> = ["/tmp", "/dev/null", "/dev/zero", "/dev/full", "/dev/shm"]
        .into_iter()
        .chain(Some(ATTACHMENT_DIR).filter(|d| Path::new(d).is_dir()))
        .collect();
    let err = |e: landlock::RulesetError| SetupError {
        step: "landlock".into(),
        source: io::Error::other(e.to_string()),
    };
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(&read, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(write, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "landlock fully enforced",
        RulesetStatus::PartiallyEnforced => "landlock partially enforced",
        RulesetStatus::NotEnforced => "landlock not available on this kernel",
    })
}

/// A deny-list seccomp filter: everything a function needs is allowed; the
/// syscalls that reach the kernel's most dangerous surfaces (mounting,
/// namespaces, tracing, modules, BPF, keyrings, io_uring, clock setting) fail
/// with `EPERM`, and `clone3` with `ENOSYS` so that libc falls back to `clone`,
/// whose namespace flags the filter can inspect.
pub fn apply_seccomp() -> Result<(), SetupError> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let err = |what: &str, e: String| SetupError {
        step: format!("seccomp: {what}"),
        source: io::Error::other(e),
    };
    let denied: &[i64] = &[
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_quotactl,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fsconfig,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_vhangup,
        libc::SYS_pidfd_getfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_lookup_dcookie,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in denied {
        rules.insert(nr, vec![]);
    }
    // clone with any namespace flag: one OR'ed rule per flag.
    let mut clone_rules = Vec::new();
    for flag in [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ] {
        let flag = flag as u64;
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(|e| err("clone condition", e.to_string()))?;
        clone_rules
            .push(SeccompRule::new(vec![cond]).map_err(|e| err("clone rule", e.to_string()))?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // Matched syscalls fail with EPERM, everything else is allowed.
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| err("filter", e.to_string()))?;
    let mut clone3 = BTreeMap::new();
    clone3.insert(libc::SYS_clone3, vec![]);
    let clone3_filter = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| err("clone3 filter", e.to_string()))?;
    for (what, f) in [("deny", deny), ("clone3", clone3_filter)] {
        let prog: BpfProgram = f
            .try_into()
            .map_err(|e: seccompiler::BackendError| err(what, e.to_string()))?;
        seccompiler::apply_filter(&prog).map_err(|e| err(what, e.to_string()))?;
    }
    Ok(())
}
