//! The Linux x86 zero page (`boot_params`) with its E820 memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::memory::{EBDA_START, HIMEM_START, ZERO_PAGE_START};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// Too many E820 entries.
    #[error("the E820 map would need more than {E820_MAX} entries")]
    E820Full,
    /// Writing the zero page failed.
    #[error("cannot write the zero page at {ZERO_PAGE_START:#x}: {0}")]
    Write(#[source] linux_loader::configurator::Error),
}

/// Where the command line and initramfs are, for the zero page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Its length without the NUL.
    pub cmdline_len: u32,
    /// Guest address and size of the initramfs, if any.
    pub initramfs: Option<(u64, u32)>,
}

/// The E820 map of `mem`: low RAM up to the EBDA, then each RAM region
/// from 1 MiB on (the MMIO gap is simply absent).
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Builds the zero page for a kernel whose (optional) setup header was read
/// from its bzImage.
pub fn build_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    info: &BootInfo,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.hdr.cmdline_size = info.cmdline_len;
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    let map = e820_map(mem);
    if map.len() > E820_MAX {
        return Err(BootParamsError::E820Full);
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    params: &boot_params,
) -> Result<(), BootParamsError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(BootParamsError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MMIO_GAP_END, MMIO_GAP_START, create_guest_memory};
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_low_and_high_ram() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map.len(), 2);
        assert_eq!((map[0].addr, map[0].size), (0, EBDA_START));
        assert_eq!(
            (map[1].addr, map[1].size),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        assert!(map.iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn e820_skips_the_mmio_gap() {
        let map = e820_map(
            &GuestMemoryMmap::from_ranges(&crate::memory::ram_ranges(MMIO_GAP_START + (16 << 20)))
                .unwrap(),
        );
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!((map[2].addr, map[2].size), (MMIO_GAP_END, 16 << 20));
    }

    #[test]
    fn zero_page_holds_cmdline_initramfs_and_map() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let info = BootInfo {
            cmdline_addr: 0x20000,
            cmdline_len: 11,
            initramfs: Some((0x1f0_0000, 0x1234)),
        };
        let hdr = setup_header {
            version: 0x20f,
            ..Default::default()
        };
        let params = build_boot_params(&mem, Some(hdr), &info).unwrap();
        write_boot_params(&mem, &params).unwrap();
        let back: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        // Copy packed fields before comparing them.
        let (ptr, size, rd, rds, magic, flag, ver, loader) = (
            back.hdr.cmd_line_ptr,
            back.hdr.cmdline_size,
            back.hdr.ramdisk_image,
            back.hdr.ramdisk_size,
            back.hdr.header,
            back.hdr.boot_flag,
            back.hdr.version,
            back.hdr.type_of_loader,
        );
        assert_eq!((ptr, size), (0x20000, 11));
        assert_eq!((rd, rds), (0x1f0_0000, 0x1234));
        assert_eq!(
            (magic, flag, ver, loader),
            (KERNEL_HDR_MAGIC, 0xaa55, 0x20f, 0xff)
        );
        assert_eq!(back.e820_entries, 2);
        // Raw check of the e820 count at its documented offset 0x1e8.
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(b[0], 2);
    }
}
