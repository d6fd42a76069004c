//! virtio over MMIO: the split [`queue`] with validated descriptor chains,
//! the virtio-mmio (version 2) register [`mmio`] transport, and the
//! [`console`] device that carries the guest agent's byte stream.
//!
//! Devices are declared to Linux on the command line
//! (`virtio_mmio.device=4K@0xd0000000:5`, see [`mmio::cmdline_entry`]).

pub mod console;
pub mod mmio;
pub mod queue;
pub mod vsock;

use vm_memory::GuestMemoryMmap;

pub use queue::{ChainError, DescriptorChain, Queue, QueueError};

/// Feature bit: virtio 1.x (mandatory for virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest has a driver.
pub const STATUS_DRIVER: u32 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is done.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Device status: the driver gave up.
pub const STATUS_FAILED: u32 = 0x80;

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (3 = console, 19 = vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (must include [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK with `features` negotiated.
    fn activate(&mut self, features: u64);
    /// Processes whatever work is possible on `queues`; returns whether any
    /// buffer was returned to the driver (an interrupt is then due).
    fn process(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, QueueError>;
    /// The driver reset the device.
    fn reset(&mut self);
}
