//! Emulated devices: the port-I/O and MMIO [`bus`], the 16550A [`serial`]
//! console (vm-superio) writing to a rate-limited [`console_log`], and the
//! [`i8042`] controller whose reset command shuts the VM down.

pub mod bus;
pub mod console_log;
pub mod i8042;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};
