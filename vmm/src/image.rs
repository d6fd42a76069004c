//! The guest image: a minimal kernel built from Debian's `linux-source`
//! package with the config fragment kept in this repository
//! ([`KERNEL_CONFIG_FRAGMENT`], `vmm/guest/kernel.config`), and an
//! initramfs whose `/init` is the static guest agent.
//!
//! ```text
//!  <home>/kernel/src/linux-source-<ver>/     unpacked once from /usr/src/linux-source-<ver>.tar.xz
//!  <home>/kernel/build/<ver>/                make O=… tinyconfig + merge_config.sh + olddefconfig
//!                                            (shared by every fragment: rebuilds are incremental)
//!  <home>/kernel/<key>/{bzImage,vmlinux,config}  key = hash(fragment, source version)
//!  <home>/images/<key>/{kernel,initramfs.cpio}   key = hash(kernel bytes, agent bytes)
//! ```
//!
//! A cached kernel is used as is; building one takes tens of minutes on
//! two cores, so tests cover the configuration checks, the cache keys, the
//! static-binary check and the initramfs, and the full build is proven by
//! hand (`sluice image build`) rather than in CI.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::initramfs::{
    CpioError, GUEST_LAYERS_ROOT, GUEST_TASK_ROOT, folder_archive, guest_initramfs,
};
use crate::vm::Boot;

/// The kernel configuration fragment merged over `make tinyconfig`.
pub const KERNEL_CONFIG_FRAGMENT: &str = include_str!("../guest/kernel.config");
/// The guest kernel's command line (the VMM appends its virtio-mmio
/// devices): serial console, reboot through the i8042 on panic or at the
/// agent's end, no PS/2 probing.
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux quiet";
/// Where Debian's `linux-source-<ver>` package puts its tarball.
pub const DEBIAN_SOURCE_DIR: &str = "/usr/src";

/// Errors building a guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No `linux-source-*.tar.xz` in the source directory.
    #[error(
        "no linux-source-*.tar.xz in {dir} (user/host setup: `apt-get install linux-source` \
         or `apt-get download linux-source-<ver> && dpkg -x`, or pass --kernel; no retry)"
    )]
    NoKernelSource {
        /// The directory searched.
        dir: PathBuf,
    },
    /// A file could not be read or written.
    #[error("cannot {op} {path}: {source} (host problem; retry may help if transient)")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A build step failed.
    #[error(
        "`{step}` failed ({status}); see {log} (external tool failure; retry only after fixing it)"
    )]
    Step {
        /// The command.
        step: String,
        /// Its exit status.
        status: String,
        /// The log file with its output.
        log: PathBuf,
    },
    /// The merged configuration lost options the fragment asks for (a
    /// dependency is missing in the fragment or the kernel lacks them).
    #[error(
        "the kernel configuration lacks {missing:?} from the fragment \
         (internal: fix vmm/guest/kernel.config; no retry)"
    )]
    ConfigMismatch {
        /// `CONFIG_*=y` options of the fragment not set in `.config`.
        missing: Vec<String>,
    },
    /// The agent is dynamically linked, so it cannot be `/init`.
    #[error(
        "{path} is dynamically linked; /init must be static (user: build it with \
         RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p sluice-agent \
         --target x86_64-unknown-linux-gnu; no retry)"
    )]
    AgentNotStatic {
        /// The agent binary.
        path: PathBuf,
    },
    /// The agent is not an x86-64 ELF executable.
    #[error("{path} is not an x86-64 ELF executable: {why} (user error; no retry)")]
    AgentNotElf {
        /// The agent binary.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The initramfs could not be written.
    #[error(transparent)]
    Cpio(#[from] CpioError),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A 64-bit FNV-1a hash of length-prefixed parts, as 16 hex digits: stable
/// across builds and platforms (a cache key, not a security measure).
pub fn cache_key(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for p in parts {
        eat(&(p.len() as u64).to_le_bytes());
        eat(p);
    }
    format!("{h:016x}")
}

/// A kernel source tarball from Debian's `linux-source-<ver>` package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    /// The tarball.
    pub tarball: PathBuf,
    /// Its version (`6.1` for `linux-source-6.1.tar.xz`).
    pub version: String,
}

/// The newest `linux-source-<ver>.tar.xz` in `dir` (by version order).
pub fn find_kernel_source(dir: &Path) -> Result<KernelSource, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|_| ImageError::NoKernelSource {
        dir: dir.to_path_buf(),
    })?;
    let mut found: Vec<KernelSource> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .strip_prefix("linux-source-")?
                .strip_suffix(".tar.xz")?
                .to_string();
            Some(KernelSource {
                tarball: e.path(),
                version,
            })
        })
        .collect();
    let key = |v: &str| -> Vec<u64> {
        v.split(['.', '-'])
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    found.sort_by_key(|s| key(&s.version));
    found.pop().ok_or_else(|| ImageError::NoKernelSource {
        dir: dir.to_path_buf(),
    })
}

/// The `CONFIG_*=y` options of `fragment` that `config` (a `.config`) does
/// not set to `y`.
pub fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let set: std::collections::HashSet<&str> = config
        .lines()
        .filter_map(|l| l.strip_suffix("=y"))
        .collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_suffix("=y"))
        .filter(|opt| !set.contains(opt))
        .map(String::from)
        .collect()
}

/// Where the guest image pieces live under a sluice home directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    /// The sluice home directory.
    pub home: PathBuf,
}

impl ImageLayout {
    /// The layout under `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self { home: home.into() }
    }

    /// Unpacked sources of `version`.
    pub fn source_tree(&self, version: &str) -> PathBuf {
        self.home
            .join("kernel/src")
            .join(format!("linux-source-{version}"))
    }

    /// The out-of-tree build directory of `version`.
    pub fn build_dir(&self, version: &str) -> PathBuf {
        self.home.join("kernel/build").join(version)
    }

    /// The cache key of a kernel built from `version` with `fragment`.
    pub fn kernel_key(fragment: &str, version: &str) -> String {
        cache_key(&[b"kernel", fragment.as_bytes(), version.as_bytes()])
    }

    /// The directory of the cached kernel for `key`.
    pub fn kernel_dir(&self, key: &str) -> PathBuf {
        self.home.join("kernel").join(key)
    }

    /// The directory of the image (kernel + initramfs) for `key`.
    pub fn image_dir(&self, key: &str) -> PathBuf {
        self.home.join("images").join(key)
    }

    /// The most recently assembled complete image in the cache (the one the
    /// last `sluice image build` made or found), if any.
    pub fn latest_image(&self) -> Option<GuestImage> {
        let rd = std::fs::read_dir(self.home.join("images")).ok()?;
        rd.filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let dir = e.path();
                let image = GuestImage {
                    kernel: dir.join("kernel"),
                    initramfs: dir.join("initramfs.cpio"),
                    cached: true,
                };
                let modified = std::fs::metadata(&image.initramfs).ok()?.modified().ok()?;
                image.kernel.is_file().then_some((modified, image))
            })
            .max_by_key(|(modified, _)| *modified)
            .map(|(_, image)| image)
    }
}

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltKernel {
    /// The compressed kernel (bzImage).
    pub bzimage: PathBuf,
    /// The uncompressed kernel (ELF vmlinux), what images boot: no
    /// decompression at boot.
    pub vmlinux: PathBuf,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Time spent building (zero when cached).
    pub build_time: Duration,
}

/// Options of [`build_kernel`].
#[derive(Debug, Clone)]
pub struct KernelBuildOptions {
    /// The source tarball.
    pub source: KernelSource,
    /// The configuration fragment.
    pub fragment: String,
    /// `make -j` jobs.
    pub jobs: usize,
    /// Run make under `nice -n 19`.
    pub nice: bool,
}

fn run_step(cmd: &mut Command, log: &Path) -> Result<(), ImageError> {
    let step = format!("{cmd:?}");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err("open", log))?;
    let err = out.try_clone().map_err(io_err("open", log))?;
    tracing::info!(target: "sluice_vmm::image", step, "kernel build step");
    let status = cmd
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(io_err("run a build step logging to", log))?;
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Step {
            step,
            status: status.to_string(),
            log: log.to_path_buf(),
        })
    }
}

/// The cached kernel for `opts`, building it first when missing: unpack
/// the sources (once per version), `make tinyconfig`, merge the fragment
/// with `scripts/kconfig/merge_config.sh`, `make olddefconfig`, check
/// that every `=y` option of the fragment survived, `make bzImage`, and
/// copy the result into the cache (through a rename, so a cached kernel is
/// always complete).
pub fn build_kernel(
    layout: &ImageLayout,
    opts: &KernelBuildOptions,
) -> Result<BuiltKernel, ImageError> {
    let version = &opts.source.version;
    let key = ImageLayout::kernel_key(&opts.fragment, version);
    let dir = layout.kernel_dir(&key);
    let bzimage = dir.join("bzImage");
    let vmlinux = dir.join("vmlinux");
    if bzimage.is_file() && vmlinux.is_file() {
        return Ok(BuiltKernel {
            bzimage,
            vmlinux,
            cached: true,
            build_time: Duration::ZERO,
        });
    }
    let started = Instant::now();
    let src = layout.source_tree(version);
    let build = layout.build_dir(version);
    std::fs::create_dir_all(&build).map_err(io_err("create", &build))?;
    let log = build.join("sluice-build.log");
    if !src.join("Makefile").is_file() {
        let parent = src.parent().unwrap_or(&layout.home).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        run_step(
            Command::new("tar")
                .arg("-xf")
                .arg(&opts.source.tarball)
                .arg("-C")
                .arg(&parent),
            &log,
        )?;
    }
    let fragment_path = build.join("sluice.config");
    std::fs::write(&fragment_path, &opts.fragment).map_err(io_err("write", &fragment_path))?;
    let make = |args: &[&str]| {
        let mut c = if opts.nice {
            let mut c = Command::new("nice");
            c.args(["-n", "19", "make"]);
            c
        } else {
            Command::new("make")
        };
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", build.display()))
            .args(args);
        c
    };
    run_step(&mut make(&["tinyconfig"]), &log)?;
    let dot_config = build.join(".config");
    run_step(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .arg("-m")
            .arg("-O")
            .arg(&build)
            .arg(&dot_config)
            .arg(&fragment_path),
        &log,
    )?;
    run_step(&mut make(&["olddefconfig"]), &log)?;
    let merged = std::fs::read_to_string(&dot_config).map_err(io_err("read", &dot_config))?;
    let missing = missing_options(&opts.fragment, &merged);
    if !missing.is_empty() {
        return Err(ImageError::ConfigMismatch { missing });
    }
    run_step(
        &mut make(&[&format!("-j{}", opts.jobs.max(1)), "bzImage"]),
        &log,
    )?;
    let tmp = layout.home.join("kernel").join(format!(".{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    for (from, to) in [
        (build.join("arch/x86/boot/bzImage"), "bzImage"),
        (build.join("vmlinux"), "vmlinux"),
        (dot_config.clone(), "config"),
    ] {
        std::fs::copy(&from, tmp.join(to)).map_err(io_err("copy", &from))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io_err("rename into", &dir))?;
    let build_time = started.elapsed();
    tracing::info!(target: "sluice_vmm::image", ?build_time, kernel = %bzimage.display(), "guest kernel built");
    Ok(BuiltKernel {
        bzimage,
        vmlinux,
        cached: false,
        build_time,
    })
}

/// Checks that `path` is a statically linked x86-64 ELF executable (no
/// `PT_INTERP` program header), as `/init` must be.
pub fn check_static_agent(path: &Path) -> Result<(), ImageError> {
    let not_elf = |why: &str| ImageError::AgentNotElf {
        path: path.to_path_buf(),
        why: why.into(),
    };
    let mut f = std::fs::File::open(path).map_err(io_err("open", path))?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)
        .map_err(|_| not_elf("shorter than an ELF header"))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(not_elf("not a little-endian 64-bit ELF file"));
    }
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let u64_at = |b: &[u8], at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    // e_type EXEC (2) or DYN (3, static-pie), e_machine x86-64 (62).
    if !matches!(u16_at(&head, 16), 2 | 3) || u16_at(&head, 18) != 62 {
        return Err(not_elf("not an x86-64 executable"));
    }
    let phoff = u64_at(&head, 32);
    let phentsize = u64::from(u16_at(&head, 54));
    let phnum = u64::from(u16_at(&head, 56));
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return Err(not_elf("bad program headers"));
    }
    let mut ph = vec![0u8; (phentsize * phnum) as usize];
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|_| not_elf("program headers past the end of the file"))?;
    const PT_INTERP: u32 = 3;
    let has_interp = ph
        .chunks(phentsize as usize)
        .any(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]) == PT_INTERP);
    if has_interp {
        return Err(ImageError::AgentNotStatic {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// A guest image ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (a copy of the built vmlinux or the given kernel).
    pub kernel: PathBuf,
    /// The initramfs (cpio newc, the agent as `/init`).
    pub initramfs: PathBuf,
    /// Whether both were already in the cache.
    pub cached: bool,
}

impl GuestImage {
    /// The boot of a guest running the function in `function_dir`: the
    /// image's kernel and [`GUEST_CMDLINE`], and its initramfs followed by
    /// an archive of the folder at `/var/task`, then one of each of the
    /// function's `layers` at `/opt`, in order. Linux unpacks the archives
    /// one after another, a file of a later one replacing the same path of
    /// an earlier one: a later layer's files win, as in Lambda.
    pub fn boot_function(
        &self,
        function_dir: &Path,
        layers: &[PathBuf],
    ) -> Result<Boot, ImageError> {
        let mut initramfs =
            std::fs::read(&self.initramfs).map_err(io_err("read", &self.initramfs))?;
        initramfs.extend(folder_archive(function_dir, GUEST_TASK_ROOT)?);
        for layer in layers {
            initramfs.extend(folder_archive(layer, GUEST_LAYERS_ROOT)?);
        }
        Ok(Boot::Linux {
            kernel: self.kernel.clone(),
            cmdline: GUEST_CMDLINE.into(),
            initramfs: Some(initramfs),
        })
    }
}

/// Puts `kernel` and an initramfs with `agent` as `/init` into the image
/// cache, keyed by both files' bytes.
pub fn assemble_image(
    layout: &ImageLayout,
    kernel: &Path,
    agent: &Path,
) -> Result<GuestImage, ImageError> {
    check_static_agent(agent)?;
    let kernel_bytes = std::fs::read(kernel).map_err(io_err("read", kernel))?;
    let agent_bytes = std::fs::read(agent).map_err(io_err("read", agent))?;
    let key = cache_key(&[b"image", &kernel_bytes, &agent_bytes]);
    let dir = layout.image_dir(&key);
    let image = GuestImage {
        kernel: dir.join("kernel"),
        initramfs: dir.join("initramfs.cpio"),
        cached: true,
    };
    if image.kernel.is_file() && image.initramfs.is_file() {
        return Ok(image);
    }
    let cpio = guest_initramfs(&agent_bytes, &[])?;
    let tmp = layout.home.join("images").join(format!(".{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    std::fs::write(tmp.join("kernel"), &kernel_bytes).map_err(io_err("write", &tmp))?;
    std::fs::write(tmp.join("initramfs.cpio"), &cpio).map_err(io_err("write", &tmp))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io_err("rename into", &dir))?;
    Ok(GuestImage {
        cached: false,
        ..image
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_asks_for_what_the_guest_needs() {
        for opt in [
            "CONFIG_64BIT",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_DEVTMPFS",
            "CONFIG_INET",
        ] {
            assert!(
                KERNEL_CONFIG_FRAGMENT
                    .lines()
                    .any(|l| l == format!("{opt}=y")),
                "{opt} missing"
            );
        }
        assert!(KERNEL_CONFIG_FRAGMENT.contains("CONFIG_MODULES=n"));
    }

    #[test]
    fn cache_keys_follow_fragment_and_version() {
        let a = ImageLayout::kernel_key("CONFIG_X=y\n", "6.1");
        assert_eq!(a, ImageLayout::kernel_key("CONFIG_X=y\n", "6.1"));
        assert_ne!(
            a,
            ImageLayout::kernel_key("CONFIG_X=y\nCONFIG_Y=y\n", "6.1")
        );
        assert_ne!(a, ImageLayout::kernel_key("CONFIG_X=y\n", "6.12"));
        // Length prefixes: moving bytes between parts changes the key.
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(a.len(), 16);
        // FNV-1a of the empty input is its offset basis: the hash is stable.
        assert_eq!(cache_key(&[]), "cbf29ce484222325");
    }

    #[test]
    fn missing_options_are_reported() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=n\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\n";
        assert_eq!(missing_options(fragment, config), vec!["CONFIG_B"]);
        assert!(missing_options(fragment, "CONFIG_A=y\nCONFIG_B=y\n").is_empty());
    }

    #[test]
    fn the_newest_kernel_source_is_found() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_kernel_source(dir.path()),
            Err(ImageError::NoKernelSource { .. })
        ));
        for name in [
            "linux-source-6.1.tar.xz",
            "linux-source-6.12.tar.xz",
            "linux-source-6.9.tar.xz",
            "linux-config-6.1",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let s = find_kernel_source(dir.path()).unwrap();
        assert_eq!(s.version, "6.12");
        assert_eq!(s.tarball, dir.path().join("linux-source-6.12.tar.xz"));
    }

    #[test]
    fn a_cached_kernel_is_used_without_building() {
        let home = tempfile::tempdir().unwrap();
        let layout = ImageLayout::new(home.path());
        let opts = KernelBuildOptions {
            source: KernelSource {
                tarball: home.path().join("does-not-exist.tar.xz"),
                version: "6.1".into(),
            },
            fragment: KERNEL_CONFIG_FRAGMENT.into(),
            jobs: 2,
            nice: true,
        };
        // Nothing cached: the build starts and fails at unpacking.
        assert!(matches!(
            build_kernel(&layout, &opts),
            Err(ImageError::Step { .. })
        ));
        let dir = layout.kernel_dir(&ImageLayout::kernel_key(KERNEL_CONFIG_FRAGMENT, "6.1"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bzImage"), b"kernel").unwrap();
        // Half a cache entry is not an entry.
        assert!(build_kernel(&layout, &opts).is_err());
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        let k = build_kernel(&layout, &opts).unwrap();
        assert!(k.cached);
        assert_eq!(
            (k.bzimage, k.vmlinux),
            (dir.join("bzImage"), dir.join("vmlinux"))
        );
    }

    #[test]
    fn only_static_x86_64_executables_can_be_init() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(
            check_static_agent(&text),
            Err(ImageError::AgentNotElf { .. })
        ));
        // Debian's dash is dynamically linked, its ldconfig static-pie.
        let dash = Path::new("/bin/dash");
        if dash.exists() {
            assert!(matches!(
                check_static_agent(dash),
                Err(ImageError::AgentNotStatic { .. })
            ));
        }
        let ldconfig = Path::new("/sbin/ldconfig");
        if ldconfig.exists() {
            check_static_agent(ldconfig).unwrap();
        }
    }

    #[test]
    fn an_image_puts_the_agent_at_init_and_is_cached() {
        let ldconfig = Path::new("/sbin/ldconfig");
        if !ldconfig.exists() {
            eprintln!("*** SKIPPED: no static /sbin/ldconfig to stand in for the agent ***");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let layout = ImageLayout::new(home.path());
        let kernel = home.path().join("bzImage-in");
        std::fs::write(&kernel, b"not really a kernel").unwrap();
        let first = assemble_image(&layout, &kernel, ldconfig).unwrap();
        assert!(!first.cached);
        assert_eq!(
            std::fs::read(&first.kernel).unwrap(),
            b"not really a kernel"
        );
        let cpio = std::fs::read(&first.initramfs).unwrap();
        assert_eq!(&cpio[..6], b"070701");
        let agent = std::fs::read(ldconfig).unwrap();
        assert_eq!(
            cpio,
            guest_initramfs(&agent, &[]).unwrap(),
            "the initramfs is the deterministic guest layout"
        );
        let again = assemble_image(&layout, &kernel, ldconfig).unwrap();
        assert!(again.cached);
        assert_eq!(again.initramfs, first.initramfs);
        // A function's boot: the image's initramfs, then its folder.
        let fdir = home.path().join("fn");
        std::fs::create_dir(&fdir).unwrap();
        std::fs::write(fdir.join("bootstrap"), b"run").unwrap();
        let Boot::Linux {
            kernel: k,
            cmdline,
            initramfs: Some(initrd),
        } = first.boot_function(&fdir, &[]).unwrap()
        else {
            panic!("not a Linux boot");
        };
        assert_eq!((k, cmdline.as_str()), (first.kernel.clone(), GUEST_CMDLINE));
        assert_eq!(&initrd[..cpio.len()], &cpio[..]);
        let function = folder_archive(&fdir, GUEST_TASK_ROOT).unwrap();
        assert_eq!(&initrd[cpio.len()..], &function[..]);
        // With layers: each one's archive at /opt after the function's, in
        // the order given.
        let layers: Vec<PathBuf> = ["a", "b"]
            .iter()
            .map(|name| {
                let dir = home.path().join(name);
                std::fs::create_dir_all(dir.join("bin")).unwrap();
                std::fs::write(dir.join("bin/tool"), name.as_bytes()).unwrap();
                dir
            })
            .collect();
        let Boot::Linux {
            initramfs: Some(layered),
            ..
        } = first.boot_function(&fdir, &layers).unwrap()
        else {
            panic!("not a Linux boot");
        };
        let mut expected = cpio.clone();
        expected.extend(&function);
        for layer in &layers {
            let archive = folder_archive(layer, GUEST_LAYERS_ROOT).unwrap();
            assert!(
                archive
                    .windows(b"opt/bin/tool".len())
                    .any(|w| w == b"opt/bin/tool")
            );
            expected.extend(archive);
        }
        assert_eq!(layered, expected);
        assert_eq!(layout.latest_image(), Some(again.clone()));
        // Another kernel is another image, and the latest one (the first
        // one's time is set back: file times can be one timer tick coarse).
        std::fs::File::options()
            .write(true)
            .open(&first.initramfs)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        std::fs::write(&kernel, b"another kernel").unwrap();
        let other = assemble_image(&layout, &kernel, ldconfig).unwrap();
        assert!(!other.cached);
        assert_ne!(other.initramfs, first.initramfs);
        let latest = layout.latest_image().unwrap();
        assert_eq!(latest.initramfs, other.initramfs);
        // An empty cache has none.
        assert_eq!(
            ImageLayout::new(home.path().join("none")).latest_image(),
            None
        );
    }
}
