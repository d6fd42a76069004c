//! What this host can run: the facts `sluice doctor` reports.
//!
//! `/dev/kvm` may exist without hardware virtualization: under `kvm_pvm`
//! (KVM on a cloud VM without nested VMX/SVM) every guest instruction is
//! emulated, which runs tiny hand-written guests but not Linux.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The virtualization support of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSupport {
    /// `/dev/kvm` opened; the error otherwise.
    pub kvm: Result<(), String>,
    /// `/proc/cpuinfo` has the `vmx` or `svm` flag.
    pub hardware_virtualization: bool,
    /// The loaded KVM vendor module (`kvm_intel`, `kvm_amd`, `kvm_pvm`), if any.
    pub kvm_module: Option<String>,
    /// Capabilities the VMM relies on that KVM lacks.
    pub missing_caps: Vec<&'static str>,
}

impl HostSupport {
    /// Whether tiny guests (our own code) can run: `/dev/kvm` works and has
    /// the capabilities we need.
    pub fn can_run_tiny_guests(&self) -> bool {
        self.kvm.is_ok() && self.missing_caps.is_empty()
    }

    /// Whether Linux guests can boot: tiny guests run and the CPU exposes
    /// hardware virtualization (not `kvm_pvm` emulation).
    pub fn can_boot_linux(&self) -> bool {
        self.can_run_tiny_guests()
            && self.hardware_virtualization
            && self.kvm_module.as_deref() != Some("kvm_pvm")
    }

    /// Why Linux guests cannot boot here (empty if they can).
    pub fn linux_blockers(&self) -> Vec<String> {
        let mut why = Vec::new();
        if let Err(e) = &self.kvm {
            why.push(format!("/dev/kvm is not usable: {e}"));
        }
        if !self.missing_caps.is_empty() {
            why.push(format!("KVM lacks {}", self.missing_caps.join(", ")));
        }
        if !self.hardware_virtualization {
            why.push("the CPU has no vmx/svm flag: no hardware virtualization (nested virtualization off?)".into());
        }
        if self.kvm_module.as_deref() == Some("kvm_pvm") {
            why.push(
                "KVM is kvm_pvm: guest code is emulated (~1 µs per instruction) and the emulator \
                 lacks instructions Linux needs (CMPXCHG16B, XRSTOR, ...)"
                    .into(),
            );
        }
        why
    }
}

/// The `vmx`/`svm` flag in a `/proc/cpuinfo` text.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The first loaded KVM vendor module under `sys_module` (`/sys/module`).
pub fn kvm_vendor_module(sys_module: &Path) -> Option<String> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| sys_module.join(m).exists())
        .map(str::to_owned)
}

/// Probes this host.
pub fn probe() -> HostSupport {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let (kvm, missing_caps) = match Kvm::new() {
        Ok(kvm) => {
            let missing = [
                (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
                (Cap::Irqfd, "KVM_CAP_IRQFD"),
                (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
                (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
                (Cap::Pit2, "KVM_CAP_PIT2"),
            ]
            .into_iter()
            .filter(|(cap, _)| !kvm.check_extension(*cap))
            .map(|(_, name)| name)
            .collect();
            (Ok(()), missing)
        }
        Err(e) => (Err(e.to_string()), Vec::new()),
    };
    HostSupport {
        kvm,
        hardware_virtualization: cpuinfo_has_hw_virt(&cpuinfo),
        kvm_module: kvm_vendor_module(Path::new("/sys/module")),
        missing_caps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vmx_and_svm_flags_only_in_flags_lines() {
        assert!(cpuinfo_has_hw_virt(
            "processor : 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_hw_virt("flags : svm lm\n"));
        assert!(!cpuinfo_has_hw_virt(
            "flags : fpu vmxe\nmodel name : vmx svm\n"
        ));
    }

    #[test]
    fn pvm_blocks_linux_with_reasons() {
        let pvm = HostSupport {
            kvm: Ok(()),
            hardware_virtualization: false,
            kvm_module: Some("kvm_pvm".into()),
            missing_caps: vec![],
        };
        assert!(pvm.can_run_tiny_guests());
        assert!(!pvm.can_boot_linux());
        let why = pvm.linux_blockers().join("\n");
        assert!(why.contains("vmx/svm") && why.contains("kvm_pvm"), "{why}");
        let hw = HostSupport {
            hardware_virtualization: true,
            kvm_module: Some("kvm_intel".into()),
            ..pvm
        };
        assert!(hw.can_boot_linux());
        assert!(hw.linux_blockers().is_empty());
    }

    #[test]
    fn vendor_module_lookup() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kvm_vendor_module(dir.path()), None);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(kvm_vendor_module(dir.path()).as_deref(), Some("kvm_pvm"));
    }

    #[test]
    fn probe_agrees_with_this_host() {
        let s = probe();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        assert_eq!(s.hardware_virtualization, cpuinfo_has_hw_virt(&cpuinfo));
        assert_eq!(
            s.kvm.is_ok(),
            Path::new("/dev/kvm").exists() && Kvm::new().is_ok()
        );
        assert_eq!(s.can_boot_linux(), s.linux_blockers().is_empty());
    }
}
