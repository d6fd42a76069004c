//! x86_64 machine set-up: GDT, identity page tables and long-mode registers
//! ([`regs`]), CPUID ([`cpuid`]), boot MSRs ([`msr`]), the local APIC
//! ([`regs::setup_lapic`]), the Linux zero page with its E820 map
//! ([`boot_params`]) and the MP table listing CPUs and the IOAPIC
//! ([`mptable`]).

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod regs;
