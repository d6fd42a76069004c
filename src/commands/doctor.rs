//! `sluice doctor`: what this machine can run, and why not.

use std::fs;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_executor::process::CgroupSupport;
use sluice_executor::{Executor, FunctionSpec, InvokeError, LogLine};

use crate::exit;

fn report(ok: bool, what: &str, detail: &str) {
    println!("[{}] {what}: {detail}", if ok { " ok " } else { "warn" });
}

/// The KVM tier of this host (from the VMM's own probe): whether Linux
/// microVM guests can boot, and why not.
pub fn kvm_status() -> (bool, String) {
    let host = sluice_vmm::host::probe();
    if host.can_boot_linux() {
        return (
            true,
            format!(
                "hardware KVM ({}): Linux microVM guests can boot",
                host.kvm_module.as_deref().unwrap_or("vmx/svm")
            ),
        );
    }
    let tier = if host.can_run_tiny_guests() {
        "tiny guests run (the VMM's tests do), but Linux guests cannot boot: "
    } else {
        "the microVM backend cannot run here: "
    };
    (false, format!("{tier}{}", host.linux_blockers().join("; ")))
}

/// The sluice home directory: `$SLUICE_HOME`, else `~/.sluice`.
pub fn sluice_home() -> PathBuf {
    std::env::var_os("SLUICE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".sluice")))
        .unwrap_or_else(|| PathBuf::from(".sluice"))
}

/// Run every check; exit 0 when the process sandbox works.
pub async fn run(kafka: Option<&str>) -> u8 {
    println!("sluice doctor");
    let (kvm_ok, kvm) = kvm_status();
    report(kvm_ok, "KVM", &kvm);

    let userns = fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    report(
        userns > 0,
        "user namespaces",
        &format!("max_user_namespaces = {userns}"),
    );

    let cg = CgroupSupport::detect();
    let cg_detail = match &cg {
        CgroupSupport::V1 { memory, pids } => format!(
            "v1 memory ({}) and pids ({})",
            memory.display(),
            pids.display()
        ),
        CgroupSupport::V2 { base } => format!("v2 at {}", base.display()),
        CgroupSupport::None { reason } => format!("{reason}; falling back to rlimits (weaker)"),
    };
    report(cg.enforced(), "cgroups", &cg_detail);

    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let seccomp = status.lines().any(|l| l.starts_with("Seccomp:"));
    report(
        seccomp,
        "seccomp",
        if seccomp {
            "filters supported"
        } else {
            "not supported by this kernel"
        },
    );

    let lsm = fs::read_to_string("/sys/kernel/security/lsm").ok();
    let landlock_listed = lsm.as_deref().map(|l| l.contains("landlock"));

    let (agent_ok, agent_detail) = agent_build();
    report(agent_ok, "agent", &agent_detail);

    // The real test: start a sandbox whose bootstrap exits at once.
    let (sandbox_ok, agent_lines) = sandbox_smoke_test().await;
    let landlock_detail = agent_lines
        .iter()
        .find(|l| l.contains("landlock"))
        .cloned()
        .or_else(|| {
            landlock_listed.map(|b| {
                if b {
                    "listed in the kernel's LSMs".into()
                } else {
                    "not enabled in this kernel".into()
                }
            })
        })
        .unwrap_or_else(|| "unknown".into());
    report(
        landlock_detail.contains("enforced") && !landlock_detail.contains("not"),
        "landlock",
        &landlock_detail,
    );
    match &sandbox_ok {
        Ok(()) => report(
            true,
            "process sandbox",
            "namespaces, private root, seccomp and limits set up; functions can run",
        ),
        Err(e) => report(false, "process sandbox", e),
    }
    let wake = tokio::task::spawn_blocking(|| sluice_executor::process::measure_wake_cost(2000))
        .await
        .ok()
        .flatten();
    report(
        true,
        "CPU wake-ups",
        &match wake {
            Some(w) => format!(
                "a pipe round trip between two threads takes {:.1} µs across CPUs, {:.1} µs on one: {}",
                w.across.as_secs_f64() * 1e6,
                w.same.as_secs_f64() * 1e6,
                if w.pinning_helps() {
                    "waking another CPU is dear here; `pin_cpu = true` may halve small calls' latency (`sluice bench invoke` measures both)"
                } else {
                    "cheap enough that `pin_cpu` is unlikely to help"
                }
            ),
            None => "one CPU to run on: `pin_cpu` changes nothing".into(),
        },
    );

    let images = sluice_home().join("images");
    let has_image = fs::read_dir(&images)
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.path().join("initramfs.cpio").is_file())
        })
        .unwrap_or(false);
    report(
        has_image,
        "guest image",
        &if has_image {
            format!("found in {}", images.display())
        } else {
            format!("none in {} (run `sluice image build`)", images.display())
        },
    );

    match kafka {
        None => report(true, "Kafka", "not checked (pass --kafka HOST:PORT)"),
        Some(addr) => {
            let reachable = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)));
            match reachable {
                Some(Ok(_)) => report(true, "Kafka", &format!("{addr} accepts connections")),
                Some(Err(e)) => report(false, "Kafka", &format!("{addr}: {e}")),
                None => report(false, "Kafka", &format!("{addr}: cannot resolve")),
            }
        }
    }
    let backend = match sluice_executor::microvm::MicrovmConfig::detect(&sluice_home()).check() {
        Ok(_) => "microvm".to_owned(),
        Err(e) => format!("process ({e})"),
    };
    println!("backend for `backend = \"auto\"`: {backend}");
    if sandbox_ok.is_ok() {
        exit::OK
    } else {
        exit::UNSUPPORTED
    }
}

/// Whether the agent sluice would start comes from this build: its
/// `--version` names the protocol it speaks.
fn agent_build() -> (bool, String) {
    let Some(agent) = sluice_executor::locate_agent() else {
        return (
            false,
            "no sluice-agent next to sluice (build it with `cargo build --workspace`, or set SLUICE_AGENT)".into(),
        );
    };
    let ours = format!("{:016x}", sluice_protocol::PROTOCOL_FINGERPRINT);
    let out = match std::process::Command::new(&agent).arg("--version").output() {
        Ok(o) => o,
        Err(e) => return (false, format!("{}: {e}", agent.display())),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs = text
        .split("(protocol ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .filter(|_| out.status.success());
    match theirs {
        Some(t) if t == ours => (
            true,
            format!("{} speaks this build's protocol ({ours})", agent.display()),
        ),
        Some(t) => (
            false,
            format!(
                "{} speaks protocol {t}, this sluice {ours}: they come from different builds (build both with `cargo build --release --workspace`)",
                agent.display()
            ),
        ),
        None => (
            false,
            format!(
                "{} does not say which protocol it speaks (built before `sluice-agent --version`): the sandbox check below shows whether it works with this sluice; build both with `cargo build --release --workspace` to be sure",
                agent.display()
            ),
        ),
    }
}

async fn sandbox_smoke_test() -> (Result<(), String>, Vec<String>) {
    let backend = match super::process_backend() {
        Ok(b) => b,
        Err(e) => return (Err(format!("{e:#}")), vec![]),
    };
    let dir = match tempdir_0755() {
        Ok(d) => d,
        Err(e) => return (Err(format!("temp folder: {e}")), vec![]),
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let lines = lines.clone();
        Arc::new(move |l: LogLine| {
            if let Ok(mut v) = lines.lock() {
                v.push(l.line);
            }
        })
    };
    let ex = Executor::with_log_sink(Arc::new(backend), sink);
    ex.register(FunctionSpec::new("doctor", &dir));
    let res = ex.invoke("doctor", "{}").await;
    let _ = fs::remove_dir_all(&dir);
    let out = lines.lock().map(|v| v.clone()).unwrap_or_default();
    match res {
        // The bootstrap exits 0 during init: the sandbox itself worked.
        Err(InvokeError::InitFailed { error_type, .. }) if error_type == "Runtime.ExitError" => {
            (Ok(()), out)
        }
        Ok(_) => (Ok(()), out),
        Err(e) => (Err(e.to_string()), out),
    }
}

fn tempdir_0755() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sluice-doctor-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
    let b = dir.join("bootstrap");
    fs::write(&b, "#!/bin/sh\nexit 0\n")?;
    fs::set_permissions(&b, fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}
