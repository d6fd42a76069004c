//! Memory and pids limits through cgroups (v1 controllers or a v2 hierarchy).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Which cgroup layout this host offers to sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// cgroup v1 with separate `memory` and `pids` hierarchies.
    V1 {
        /// e.g. `/sys/fs/cgroup/memory/sluice`.
        memory: PathBuf,
        /// e.g. `/sys/fs/cgroup/pids/sluice`.
        pids: PathBuf,
    },
    /// A cgroup v2 hierarchy with the memory and pids controllers.
    V2 {
        /// e.g. `/sys/fs/cgroup/sluice`.
        base: PathBuf,
    },
    /// No usable cgroups (not root, or controllers missing): rlimits only.
    None {
        /// Why.
        reason: String,
    },
}

impl CgroupSupport {
    /// Probe the host, creating sluice's parent cgroups.
    pub fn detect() -> Self {
        let v2_root = Path::new("/sys/fs/cgroup");
        if let Ok(ctrl) = fs::read_to_string(v2_root.join("cgroup.controllers"))
            && ctrl.contains("memory")
            && ctrl.contains("pids")
        {
            let base = v2_root.join("sluice");
            let res = (|| -> io::Result<()> {
                fs::create_dir_all(&base)?;
                enable_v2(v2_root)?;
                enable_v2(&base)
            })();
            return match res {
                Ok(()) => CgroupSupport::V2 { base },
                Err(e) => CgroupSupport::None {
                    reason: format!("cgroup v2 at {} is not writable: {e}", base.display()),
                },
            };
        }
        let memory = v2_root.join("memory");
        let pids = v2_root.join("pids");
        if memory.join("memory.limit_in_bytes").exists() && pids.join("pids.max").exists()
            || pids.join("tasks").exists() && memory.join("tasks").exists()
        {
            let (m, p) = (memory.join("sluice"), pids.join("sluice"));
            return match fs::create_dir_all(&m).and_then(|()| fs::create_dir_all(&p)) {
                Ok(()) => CgroupSupport::V1 { memory: m, pids: p },
                Err(e) => CgroupSupport::None {
                    reason: format!("cgroup v1 memory/pids not writable: {e}"),
                },
            };
        }
        CgroupSupport::None {
            reason: "no cgroup memory and pids controllers found".into(),
        }
    }

    /// Whether limits are enforced by cgroups.
    pub fn enforced(&self) -> bool {
        !matches!(self, CgroupSupport::None { .. })
    }
}

fn enable_v2(dir: &Path) -> io::Result<()> {
    let f = dir.join("cgroup.subtree_control");
    let cur = fs::read_to_string(&f).unwrap_or_default();
    if cur.contains("memory") && cur.contains("pids") {
        return Ok(());
    }
    fs::write(&f, "+memory +pids")
}

/// The cgroups of one sandbox; removed on drop (best effort; the processes
/// must be gone).
#[derive(Debug)]
pub struct SandboxCgroup {
    dirs: Vec<PathBuf>,
    oom_file: PathBuf,
    peak_file: PathBuf,
}

impl SandboxCgroup {
    /// Create the cgroups of sandbox `id` with its limits.
    pub fn create(
        support: &CgroupSupport,
        id: &str,
        memory_bytes: u64,
        max_pids: u32,
    ) -> io::Result<Option<Self>> {
        match support {
            CgroupSupport::V1 { memory, pids } => {
                let m = memory.join(id);
                let p = pids.join(id);
                fs::create_dir_all(&m)?;
                fs::create_dir_all(&p)?;
                let cg = SandboxCgroup {
                    dirs: vec![m.clone(), p.clone()],
                    oom_file: m.join("memory.oom_control"),
                    peak_file: m.join("memory.max_usage_in_bytes"),
                };
                fs::write(m.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
                let memsw = m.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    let _ = fs::write(memsw, memory_bytes.to_string());
                }
                fs::write(p.join("pids.max"), max_pids.to_string())?;
                Ok(Some(cg))
            }
            CgroupSupport::V2 { base } => {
                let d = base.join(id);
                fs::create_dir_all(&d)?;
                let cg = SandboxCgroup {
                    dirs: vec![d.clone()],
                    oom_file: d.join("memory.events"),
                    peak_file: d.join("memory.peak"),
                };
                fs::write(d.join("memory.max"), memory_bytes.to_string())?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    let _ = fs::write(swap, "0");
                }
                fs::write(d.join("pids.max"), max_pids.to_string())?;
                Ok(Some(cg))
            }
            CgroupSupport::None { .. } => Ok(None),
        }
    }

    /// Move a process into these cgroups (its children follow).
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for d in &self.dirs {
            fs::write(d.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// How many times the OOM killer fired in this sandbox.
    pub fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(&self.oom_file).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The most memory the sandbox's processes have used at once since it
    /// was created (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`: both
    /// count the page cache, `/tmp` included), or `None` where the kernel
    /// does not keep it (v2 before Linux 5.19).
    pub fn peak_memory(&self) -> Option<u64> {
        fs::read_to_string(&self.peak_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// Kill every process in the cgroup (v2 `cgroup.kill`); v1 relies on the
    /// PID namespace.
    pub fn kill_all(&self) {
        for d in &self.dirs {
            let k = d.join("cgroup.kill");
            if k.exists() {
                let _ = fs::write(k, "1");
            }
        }
    }

    /// Remove the cgroup folders; fails while processes remain.
    pub fn remove(&self) -> io::Result<()> {
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Without cgroups: the peak resident memory of the processes below `root`
/// (the sandbox's agent), summed over each one's own peak (`VmHWM` in
/// `/proc/PID/status`). An estimate: peaks reached at different times add
/// up, and processes that already ended are not counted. The process tree
/// comes from each process's parent in `/proc/PID/stat` (a scan of
/// `/proc`, so it is read only when a report wants it).
pub fn process_tree_peak_memory(root: u32) -> Option<u64> {
    if root == 0 {
        return None;
    }
    let mut children: std::collections::HashMap<u32, Vec<u32>> = Default::default();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut total = 0u64;
    let mut seen = false;
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            total += kb * 1024;
            seen = true;
        }
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    seen.then_some(total)
}
