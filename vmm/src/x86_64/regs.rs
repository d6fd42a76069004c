//! Boot-time vCPU registers: GDT, identity-mapped page tables, long-mode
//! special registers, general registers, FPU and local APIC LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX, kvm_segment_from_gdt};
use crate::memory::{GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START};

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Local APIC register offsets and delivery modes used for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write the {what} at guest address {addr:#x}: {source}")]
    WriteMemory {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU register ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        /// The ioctl's name.
        ioctl: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

fn ioctl(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { ioctl, source }
}

/// How many GiB the boot page tables identity-map: all of the 32-bit
/// space, so tiny guests reach the MMIO gap too.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

/// Writes identity page tables mapping the first 4 GiB with 2 MiB pages
/// (one page directory per GiB, at `PDE_START + i * 4 KiB`).
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    // Present | writable.
    write(mem, "PML4", PML4_START, PDPTE_START | 0x03)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        write(mem, "PDPT", PDPTE_START + gib * 8, pd | 0x03)?;
        for i in 0..512u64 {
            // Present | writable | page size (2 MiB).
            let addr = (gib << 30) | (i << 21);
            write(mem, "page directory", pd + i * 8, addr | 0x83)?;
        }
    }
    Ok(())
}

/// Writes the boot GDT and a null IDT.
pub fn setup_gdt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "GDT", GDT_START + 8 * i as u64, *entry)?;
    }
    write(mem, "IDT", IDT_START, 0u64)
}

/// Long-mode special registers on top of `sregs` (as read from a fresh vCPU):
/// flat segments from the boot GDT, paging with our identity map, PAE, LME/LMA.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes GDT and page tables into `mem` and puts `vcpu` in 64-bit mode.
pub fn setup_long_mode(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    setup_gdt(mem)?;
    setup_page_tables(mem)?;
    let sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(ioctl("KVM_SET_SREGS"))
}

/// The general registers at boot: `rip` = entry, `rsp`/`rbp` = stack,
/// `rsi` = zero page (Linux boot protocol), only the reserved RFLAGS bit set.
pub fn boot_regs(entry: u64, stack: u64, rsi: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi,
        ..Default::default()
    }
}

/// Sets the general registers (see [`boot_regs`]).
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, stack: u64, rsi: u64) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry, stack, rsi))
        .map_err(ioctl("KVM_SET_REGS"))
}

/// Sets the x87 control word and MXCSR to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("KVM_SET_FPU"))
}

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    u32::from_le_bytes([
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC BIOS does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = create_guest_memory(4 << 20).unwrap();
        setup_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpte3, (PDE_START + 0x3000) | 3);
        let top: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(top, (0xffe0_0000) | 0x83);
    }

    #[test]
    fn long_mode_bits_are_set() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.ss.selector, 16);
        assert_eq!(s.gdt.limit, 31);
    }

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(with_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0xdead_beef);
    }
}
