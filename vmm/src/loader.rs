//! Loading a Linux guest: kernel (ELF `vmlinux` or bzImage, detected by
//! magic), command line and initramfs, then the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{
    BzImage, Cmdline, Elf, KernelLoader, bootparam::setup_header, load_cmdline,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::memory::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START};
use crate::x86_64::boot_params::{BootInfo, BootParamsError, build_boot_params, write_boot_params};

/// A command line for sluice's microVM kernels: serial console, reboot
/// (and so VM shutdown) through the i8042 on panic, no PCI probing, no
/// keyboard or mouse behind the i8042.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Highest address an initramfs may end at (`initrd_addr_max` of old kernels).
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Offset of the 64-bit entry point from a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage, or linux-loader refused it.
    #[error("cannot load kernel {path} as {format}: {source}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line {cmdline:?}: {reason}")]
    Cmdline {
        /// The command line.
        cmdline: String,
        /// Why.
        reason: String,
    },
    /// The initramfs does not fit below the kernel's limit.
    #[error(
        "initramfs of {size} bytes does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address allowed.
        limit: u64,
    },
    /// Writing the initramfs into guest memory failed.
    #[error("cannot copy the initramfs into guest memory: {0}")]
    InitramfsCopy(#[source] vm_memory::GuestMemoryError),
    /// Building the zero page failed.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
}

/// What a loaded kernel needs to be started.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
}

/// Which kind of kernel image a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed `vmlinux`.
    Elf,
    /// A `bzImage`.
    BzImage,
}

/// Detects ELF (`\x7fELF`) or bzImage (`HdrS` at 0x202).
pub fn detect_format<F: Read + Seek>(image: &mut F) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < head.len() {
        let r = image.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    image.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Some(KernelFormat::Elf))
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Some(KernelFormat::BzImage))
    } else {
        Ok(None)
    }
}

/// Loads the kernel at `path` into `mem` at or above 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, LoaderError> {
    let io = |source| LoaderError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let format = detect_format(&mut file).map_err(io)?;
    let kernel_err = |format, source| LoaderError::Kernel {
        path: path.to_owned(),
        format,
        source,
    };
    match format {
        Some(KernelFormat::Elf) => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| kernel_err("ELF", e))?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                setup_header: None,
            })
        }
        Some(KernelFormat::BzImage) | None => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| kernel_err("bzImage", e))?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

/// Parses `cmdline` and writes it at [`CMDLINE_START`]; returns its length.
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, LoaderError> {
    let bad = |reason: String| LoaderError::Cmdline {
        cmdline: cmdline.to_owned(),
        reason,
    };
    let parsed = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(|e| bad(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &parsed).map_err(|e| bad(e.to_string()))?;
    let len = parsed
        .as_cstring()
        .map_err(|e| bad(e.to_string()))?
        .as_bytes()
        .len();
    Ok(len as u32)
}

/// Places `initramfs` at the highest page-aligned address below 896 MiB,
/// the MMIO gap and the end of RAM, above the kernel; returns its address.
pub fn load_initramfs(
    mem: &GuestMemoryMmap,
    initramfs: &[u8],
    kernel_end: u64,
) -> Result<u64, LoaderError> {
    let size = initramfs.len() as u64;
    let limit = (mem.last_addr().0 + 1)
        .min(MMIO_GAP_START)
        .min(INITRD_ADDR_MAX + 1);
    let too_large = LoaderError::InitramfsTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(LoaderError::InitramfsTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.write_slice(initramfs, GuestAddress(addr))
        .map_err(LoaderError::InitramfsCopy)?;
    Ok(addr)
}

/// Loads kernel, command line and initramfs and writes the zero page;
/// returns the kernel (whose `entry` the boot vCPU starts at, with `rsi`
/// pointing at the zero page).
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    cmdline: &str,
    initramfs: Option<&[u8]>,
) -> Result<LoadedKernel, LoaderError> {
    let loaded = load_kernel(mem, kernel)?;
    let cmdline_len = load_command_line(mem, cmdline)?;
    let initramfs = match initramfs {
        Some(bytes) => Some((
            load_initramfs(mem, bytes, loaded.kernel_end)?,
            bytes.len() as u32,
        )),
        None => None,
    };
    let info = BootInfo {
        cmdline_addr: CMDLINE_START,
        cmdline_len,
        initramfs,
    };
    let params = build_boot_params(mem, loaded.setup_header, &info)?;
    write_boot_params(mem, &params)?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{ZERO_PAGE_START, create_guest_memory};
    use linux_loader::loader::bootparam::boot_params;
    use std::io::Write;

    /// A minimal ELF64 executable with one PT_LOAD segment of `code` at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"\x7fELF");
        v.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        v.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        v.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        v.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        v.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        v.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        assert_eq!(v.len(), 64);
        v.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        v.extend_from_slice(&5u32.to_le_bytes()); // R+X
        v.extend_from_slice(&120u64.to_le_bytes()); // p_offset
        v.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
        v.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
        v.extend_from_slice(&(code.len() as u64).to_le_bytes());
        v.extend_from_slice(&(code.len() as u64).to_le_bytes());
        v.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(v.len(), 120);
        v.extend_from_slice(code);
        v
    }

    /// A minimal bzImage: 1 setup sector + boot sector, then `payload`.
    fn tiny_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 1024];
        v[0x1f1] = 1; // setup_sects
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        v[0x211] = 1; // loadflags: LOADED_HIGH
        v[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes()); // code32_start
        v.extend_from_slice(payload);
        v
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn elf_kernel_is_loaded_at_its_physical_address() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let f = file_with(&tiny_elf(0x20_0000, b"\x90\x90\xf4"));
        let k = load_kernel(&mem, f.path()).unwrap();
        assert_eq!(k.entry, 0x20_0000);
        assert_eq!(k.kernel_end, 0x20_0003);
        assert!(k.setup_header.is_none());
        let mut b = [0u8; 3];
        mem.read_slice(&mut b, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&b, b"\x90\x90\xf4");
    }

    #[test]
    fn bzimage_kernel_enters_at_startup_64() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let f = file_with(&tiny_bzimage(&payload));
        let k = load_kernel(&mem, f.path()).unwrap();
        assert_eq!(k.entry, HIMEM_START + 0x200);
        assert_eq!(k.kernel_end, HIMEM_START + 4096);
        let hdr = k.setup_header.unwrap();
        let version = hdr.version;
        assert_eq!(version, 0x020f);
        let mut b = vec![0u8; 4096];
        mem.read_slice(&mut b, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(b, payload);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let f = file_with(&[0u8; 4096]);
        let err = load_kernel(&mem, f.path()).unwrap_err();
        assert!(
            matches!(
                err,
                LoaderError::Kernel {
                    format: "bzImage",
                    ..
                }
            ),
            "{err}"
        );
        let missing = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(missing, LoaderError::Io { .. }));
    }

    #[test]
    fn command_line_is_nul_terminated_and_bounded() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let len = load_command_line(&mem, "console=ttyS0 reboot=k panic=1").unwrap();
        assert_eq!(len, 30);
        let mut b = [0u8; 31];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0 reboot=k panic=1\0");
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            load_command_line(&mem, &long),
            Err(LoaderError::Cmdline { .. })
        ));
    }

    #[test]
    fn default_command_line_fits_and_parses() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let len = load_command_line(&mem, DEFAULT_CMDLINE).unwrap();
        assert_eq!(len as usize, DEFAULT_CMDLINE.len());
        assert!(DEFAULT_CMDLINE.contains("reboot=k"));
    }

    #[test]
    fn initramfs_goes_to_the_top_of_ram_page_aligned() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let data = vec![0xabu8; 5000];
        let addr = load_initramfs(&mem, &data, 0x20_0000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 5000 <= 16 << 20);
        assert!(addr + 5000 + 4096 > 16 << 20);
        let mut b = vec![0u8; 5000];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        assert_eq!(b, data);
        let huge = vec![0u8; 15 << 20];
        assert!(matches!(
            load_initramfs(&mem, &huge, 0x20_0000),
            Err(LoaderError::InitramfsTooLarge { .. })
        ));
    }

    #[test]
    fn load_linux_fills_the_zero_page() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let f = file_with(&tiny_bzimage(&[0x90; 512]));
        let k = load_linux(&mem, f.path(), "console=ttyS0", Some(b"070701")).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (cmd, cmdsz, rd, rdsz) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!((cmd as u64, cmdsz), (CMDLINE_START, 13));
        assert_eq!(rdsz, 6);
        assert!(u64::from(rd) >= k.kernel_end);
        let mut b = [0u8; 6];
        mem.read_slice(&mut b, GuestAddress(u64::from(rd))).unwrap();
        assert_eq!(&b, b"070701");
    }
}
