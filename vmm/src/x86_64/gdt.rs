//! Global Descriptor Table entries and their `kvm_segment` form.

use kvm_bindings::kvm_segment;

/// The GDT loaded at boot: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff), // code: present, DPL 0, execute/read, accessed, L=1, G=1
    gdt_entry(0xc093, 0, 0xfffff), // data: present, DPL 0, read/write, accessed, D/B=1, G=1
    gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS, G=1
];

/// Selector index of each boot segment.
pub const CODE_INDEX: u8 = 1;
/// Data segment index.
pub const DATA_INDEX: u8 = 2;
/// TSS index.
pub const TSS_INDEX: u8 = 3;

/// Packs `flags` (access byte in bits 0..8, flags nibble in bits 12..16),
/// `base` and `limit` into one 8-byte descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

/// The `kvm_segment` KVM expects for descriptor `entry` at GDT index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = limit(entry);
    kvm_segment {
        base: base(entry),
        // With G=1 the limit is in 4 KiB units.
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let s = kvm_segment_from_gdt(BOOT_GDT[1], CODE_INDEX);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.db, 0);
        assert_eq!(s.dpl, 0);
        assert_eq!(s.present, 1);
        assert_eq!(s.s, 1);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = kvm_segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.g, 0);
        assert_eq!(s.selector, 40);
        assert_eq!(s.type_, 3);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }
}
