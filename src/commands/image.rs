//! `sluice image build`: the microVM guest image, a kernel built from
//! Debian's `linux-source` with the repository's config fragment (or a
//! given one) and an initramfs with the static agent as `/init`. The work
//! is in `sluice_vmm::image`; this is wiring and output.

use std::path::PathBuf;

use sluice_vmm::image::{
    ImageLayout, KERNEL_CONFIG_FRAGMENT, KernelBuildOptions, assemble_image, build_kernel,
    find_kernel_source,
};

use crate::commands::doctor::sluice_home;
use crate::exit;

/// Options of `sluice image build`.
#[derive(Debug, Clone, clap::Args)]
pub struct BuildArgs {
    /// Use this kernel (bzImage or vmlinux) instead of building one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The static agent to put at /init (default: sluice-agent next to
    /// sluice, or $SLUICE_AGENT). Build it with
    /// RUSTFLAGS='-C target-feature=+crt-static' cargo build --release
    /// -p sluice-agent --target x86_64-unknown-linux-gnu.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Where Debian's `linux-source-<ver>.tar.xz` is.
    #[arg(long, default_value = sluice_vmm::image::DEBIAN_SOURCE_DIR)]
    pub source_dir: PathBuf,
    /// Parallel make jobs for the kernel build (run under nice -n 19).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
}

/// Builds (or finds in the cache) the kernel and the image; prints where
/// they are.
pub fn build(args: BuildArgs) -> u8 {
    let layout = ImageLayout::new(sluice_home());
    let Some(agent) = args.agent.or_else(sluice_executor::locate_agent) else {
        crate::log_error!(
            "no sluice-agent found next to sluice; pass --agent PATH (a static build)"
        );
        return exit::USAGE;
    };
    let kernel = match args.kernel {
        Some(k) => {
            println!("kernel: {} (given)", k.display());
            k
        }
        None => {
            let source = match find_kernel_source(&args.source_dir) {
                Ok(s) => s,
                Err(e) => {
                    crate::log_error!("{e}");
                    return exit::UNSUPPORTED;
                }
            };
            println!(
                "kernel: linux-source-{} with vmm/guest/kernel.config (cache: {})",
                source.version,
                layout.home.display()
            );
            let opts = KernelBuildOptions {
                source,
                fragment: KERNEL_CONFIG_FRAGMENT.into(),
                jobs: args.jobs,
                nice: true,
            };
            match build_kernel(&layout, &opts) {
                Ok(k) => {
                    if k.cached {
                        println!("kernel: cached at {}", k.vmlinux.display());
                    } else {
                        println!(
                            "kernel: built in {:.1} s at {}",
                            k.build_time.as_secs_f64(),
                            k.vmlinux.display()
                        );
                    }
                    println!(
                        "kernel: bzImage {} bytes, vmlinux {} bytes (the image boots the vmlinux: no decompression)",
                        std::fs::metadata(&k.bzimage).map(|m| m.len()).unwrap_or(0),
                        std::fs::metadata(&k.vmlinux).map(|m| m.len()).unwrap_or(0)
                    );
                    k.vmlinux
                }
                Err(e) => {
                    crate::log_error!("{e}");
                    return exit::INVOKE_FAILED;
                }
            }
        }
    };
    match assemble_image(&layout, &kernel, &agent) {
        Ok(image) => {
            let size = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            println!(
                "image{}: kernel {} ({} bytes), initramfs {} ({} bytes, {} as /init)",
                if image.cached { " (cached)" } else { "" },
                image.kernel.display(),
                size(&image.kernel),
                image.initramfs.display(),
                size(&image.initramfs),
                agent.display()
            );
            exit::OK
        }
        Err(e) => {
            crate::log_error!("{e}");
            exit::USAGE
        }
    }
}
