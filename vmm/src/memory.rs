//! Guest physical memory: the layout of a sluice microVM and its creation on
//! `vm-memory`'s [`GuestMemoryMmap`].
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)            0x0000_9000  PML4
//! 0x0000_0520  IDT (one null entry)       0x0000_a000  PDPT
//! 0x0000_7000  zero page (boot_params)    0x0000_b000  4 PDs (4 x 512 x 2 MiB = 4 GiB identity map)
//! 0x0002_0000  kernel command line        0x0010_0000  kernel / tiny guest code (HIMEM_START)
//! 0x0009_fc00  top of low RAM (EBDA)      MMIO_GAP_START..4 GiB  devices (virtio-mmio, LAPIC, IOAPIC)
//! ```
//!
//! RAM larger than [`MMIO_GAP_START`] is split in two regions around the
//! MMIO gap, so devices never alias RAM.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

/// The GDT built by [`crate::x86_64`].
pub const GDT_START: u64 = 0x500;
/// The (empty) IDT loaded at boot.
pub const IDT_START: u64 = 0x520;
/// The zero page (`boot_params`) of a Linux boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages), up to 0xf000.
pub const PDE_START: u64 = 0xb000;
/// Initial stack pointer of the boot vCPU (grows down below the boot structures).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux's `COMMAND_LINE_SIZE` on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: low RAM ends here in the E820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels (and tiny guests) are loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (768 MiB below 4 GiB).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM's TSS (three pages) lives at the very top of the gap, below the IOAPIC.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Smallest guest accepted: room for the boot structures and a little code.
pub const MIN_MEM_SIZE: u64 = 2 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is below [`MIN_MEM_SIZE`] or not a multiple of 4 KiB.
    #[error(
        "guest memory size {size:#x} is invalid: it must be a multiple of 4 KiB and at least {min:#x}"
    )]
    InvalidSize {
        /// Requested size in bytes.
        size: u64,
        /// The smallest size accepted.
        min: u64,
    },
    /// mmap of the guest memory failed.
    #[error("cannot map {size:#x} bytes of guest memory: {source}")]
    Mmap {
        /// Requested size in bytes.
        size: u64,
        /// Cause from vm-memory.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical RAM ranges for `size` bytes of RAM, skipping the MMIO gap.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Maps `size` bytes of anonymous guest RAM laid out by [`ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < MIN_MEM_SIZE || !size.is_multiple_of(4096) {
        return Err(MemoryError::InvalidSize {
            size,
            min: MIN_MEM_SIZE,
        });
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(size))
        .map_err(|source| MemoryError::Mmap { size, source })
}

/// Total RAM in bytes of `mem`.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// How much of `mem` has been touched: its pages present (or swapped out)
/// in this process's page tables, from `/proc/self/pagemap` (its flags are
/// readable without privileges). The guest's own accesses fault pages into
/// these same mappings, and a guest does not hand memory back (no
/// balloon), so the figure only grows: the VM's peak, Lambda's "Max
/// Memory Used". A restored clone (a private file mapping) counts only the
/// pages it touched, not the snapshot's pages sitting in the page cache.
pub fn resident_bytes(mem: &GuestMemoryMmap) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    const PAGE: u64 = 4096;
    /// Bit 63: present; bit 62: swapped.
    const TOUCHED: u64 = 3 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; 8 * 4096];
    let mut total = 0;
    for region in mem.iter() {
        // The address only: nothing is read or written through it.
        let start = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(std::io::Error::other)? as u64;
        let pages = region.len() / PAGE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(4096);
            let entries = &mut buf[..(n * 8) as usize];
            pagemap.read_exact_at(entries, (start / PAGE + done) * 8)?;
            total += entries
                .chunks_exact(8)
                .filter(|e| {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(e);
                    u64::from_le_bytes(word) & TOUCHED != 0
                })
                .count() as u64
                * PAGE;
            done += n;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_bytes_counts_the_pages_touched_and_only_grows() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(64 << 20).unwrap();
        let untouched = resident_bytes(&mem).unwrap();
        assert!(untouched < 1 << 20, "{untouched}");
        // 300 pages written, spread over the RAM.
        for i in 0..300u64 {
            mem.write_slice(&[1], GuestAddress(i * 3 * 4096 + 17))
                .unwrap();
        }
        let touched = resident_bytes(&mem).unwrap();
        assert!(
            touched >= untouched + 300 * 4096,
            "{untouched} then {touched}"
        );
        assert!(
            touched < untouched + 320 * 4096,
            "{untouched} then {touched}"
        );
        // Reading them again touches nothing new.
        let mut b = [0u8; 1];
        mem.read_slice(&mut b, GuestAddress(17)).unwrap();
        assert_eq!(resident_bytes(&mem).unwrap(), touched);
    }

    #[test]
    fn small_memory_is_one_region() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(ram_size(&mem), 16 << 20);
        assert_eq!(mem.last_addr(), GuestAddress((16 << 20) - 1));
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 4 << 30);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            create_guest_memory(4096),
            Err(MemoryError::InvalidSize { size: 4096, .. })
        ));
        assert!(matches!(
            create_guest_memory((16 << 20) + 1),
            Err(MemoryError::InvalidSize { .. })
        ));
    }
}
