//! The Intel MultiProcessor table (MP spec 1.4) that tells Linux how many
//! CPUs there are and how ISA interrupts reach the IOAPIC. Placed in the
//! last KiB of base memory ([`MPTABLE_START`]), which Linux scans for `_MP_`.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the table starts (the last KiB below 640 KiB; not RAM in our E820).
pub const MPTABLE_START: u64 = 0x9fc00;
/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// IOAPIC input pins described.
pub const IOAPIC_PINS: u8 = 24;
/// Most CPUs that fit in the 1 KiB window.
pub const MAX_CPUS: u8 = 32;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More CPUs than the table window holds.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_CPUS})")]
    TooManyCpus(u8),
    /// Zero CPUs.
    #[error("an MP table needs at least one CPU")]
    NoCpus,
    /// Guest memory does not cover the table.
    #[error("cannot write the MP table at {MPTABLE_START:#x}: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table bytes for `cpus` CPUs, starting at [`MPTABLE_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // The IOAPIC.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    count += 1;
    // ISA IRQ n → IOAPIC pin n (flags 0: conforming polarity and trigger).
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_IRQ_SRC_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of all CPUs.
    entries.extend_from_slice(&[4, MP_IRQ_SRC_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_SRC_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let config_addr = MPTABLE_START as u32 + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC);
    header.push(0); // checksum, below
    header.extend_from_slice(b"SLUICE  ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&config_addr.to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut table = floating;
    table.extend_from_slice(&config);
    Ok(table)
}

/// Writes the table for `cpus` CPUs into `mem`.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn structures_checksum_to_zero_and_point_at_each_other() {
        for cpus in [1u8, 2, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let physptr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(u64::from(physptr), MPTABLE_START + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            assert!(
                MPTABLE_START + t.len() as u64 <= 0xa0000,
                "fits below 640 KiB"
            );
        }
    }

    #[test]
    fn processors_are_enabled_and_cpu0_boots() {
        let t = build(3).unwrap();
        let entries = &t[16 + 44..];
        for id in 0..3usize {
            let e = &entries[id * 20..id * 20 + 20];
            assert_eq!(e[0], 0, "processor entry");
            assert_eq!(e[1], id as u8, "APIC id");
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, id == 0);
        }
        // The IOAPIC entry follows the bus entry, with id cpus + 1.
        let ioapic = &entries[60 + 8..60 + 16];
        assert_eq!((ioapic[0], ioapic[1]), (2, 4));
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            IO_APIC_DEFAULT_PHYS_BASE
        );
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(matches!(build(0), Err(MptableError::NoCpus)));
        assert!(matches!(
            build(MAX_CPUS + 1),
            Err(MptableError::TooManyCpus(33))
        ));
    }

    #[test]
    fn is_written_into_guest_memory() {
        let mem = crate::memory::create_guest_memory(4 << 20).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
