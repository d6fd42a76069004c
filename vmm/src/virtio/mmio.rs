//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::QueueState;
use super::{
    Queue, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VirtioDevice,
};
use crate::devices::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The transport version implemented.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("SLCE").
pub const VENDOR_ID: u32 = 0x4543_4c53;
/// Interrupt status bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// The kernel command-line entry declaring a device at `base` with `irq`.
pub fn cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// The transport's registers and queues, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    /// Virtio device id of the device behind it.
    pub device_type: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the driver set DRIVER_OK and the device was activated.
    pub activated: bool,
    /// Each queue.
    pub queues: Vec<QueueState>,
}

/// A virtio device behind the MMIO register interface; put it on the MMIO
/// bus and register its `irq` eventfd as an irqfd.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: AtomicU32,
    config_generation: u32,
    irq: EventFd,
    activated: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, which will read and write `mem` and raise `irq`.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m))
            .collect();
        Self {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: AtomicU32::new(0),
            config_generation: 0,
            irq,
            activated: false,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (e.g. to feed host input).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Registers and queues, for a snapshot (device-internal buffers are
    /// host-side and not included).
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status(),
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self.queues.iter().map(Queue::state).collect(),
        }
    }

    /// Restores [`MmioTransport::state`] on a fresh transport of the same
    /// device type (re-activating the device if the driver had), checking
    /// that the queues match the device and fit in guest memory.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), String> {
        if s.device_type != self.device.device_type() {
            return Err(format!(
                "virtio device type {} in the snapshot, {} here",
                s.device_type,
                self.device.device_type()
            ));
        }
        let max: Vec<u16> = self.queues.iter().map(|q| q.max_size).collect();
        let saved: Vec<u16> = s.queues.iter().map(|q| q.max_size).collect();
        if max != saved {
            return Err(format!(
                "virtio queue sizes {saved:?} in the snapshot, {max:?} here"
            ));
        }
        let queues: Vec<Queue> = s.queues.iter().map(Queue::from_state).collect();
        for (i, q) in queues.iter().enumerate() {
            if q.ready && s.activated {
                q.validate(&self.mem)
                    .map_err(|e| format!("virtio queue {i}: {e}"))?;
            }
        }
        self.queues = queues;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.interrupt_status
            .store(s.interrupt_status, Ordering::Release);
        self.config_generation = s.config_generation;
        self.activated = s.activated;
        if s.activated {
            self.device.activate(s.driver_features);
        }
        Ok(())
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    /// Whether the driver completed initialisation.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Lets the device do pending work (after a notify, or when host-side
    /// input arrived) and interrupts the guest if buffers were used.
    pub fn process(&mut self) {
        if !self.activated || self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return;
        }
        match self.device.process(&self.mem, &mut self.queues) {
            Ok(true) => self.signal_used(),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, device = self.device.device_type(), "virtio device needs a reset");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt_status.fetch_or(INT_CONFIG, Ordering::AcqRel);
                let _ = self.irq.write(1);
            }
        }
    }

    fn signal_used(&self) {
        self.interrupt_status
            .fetch_or(INT_USED_RING, Ordering::AcqRel);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot signal the virtio interrupt");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::Release);
        self.activated = false;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // FEATURES_OK only sticks if the driver accepted VERSION_1 and nothing
        // we did not offer.
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.device_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && !self.activated {
            let ok = value & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                && value & STATUS_FAILED == 0;
            let queues_ok = self
                .queues
                .iter()
                .filter(|q| q.ready)
                .all(|q| q.validate(&self.mem).is_ok());
            if ok && queues_ok {
                self.activated = true;
                self.device.activate(self.driver_features);
            } else {
                value |= STATUS_DEVICE_NEEDS_RESET;
            }
        }
        self.status = value;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::Acquire),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        // Queue layout may only change before DRIVER_OK.
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        let set_low = |a: &mut GuestAddress, v: u32| a.0 = (a.0 & !0xffff_ffff) | u64::from(v);
        let set_high =
            |a: &mut GuestAddress, v: u32| a.0 = (a.0 & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self
                .driver_features_sel
            {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected_queue() {
                    // Out-of-range sizes stay invalid (0) instead of being truncated.
                    q.size = u16::try_from(value).unwrap_or(0);
                }
            }
            REG_QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            REG_QUEUE_DESC_LOW if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_low(&mut q.desc_table, value)),
            REG_QUEUE_DESC_HIGH if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_high(&mut q.desc_table, value)),
            REG_QUEUE_DRIVER_LOW if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_low(&mut q.avail_ring, value)),
            REG_QUEUE_DRIVER_HIGH if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_high(&mut q.avail_ring, value)),
            REG_QUEUE_DEVICE_LOW if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_low(&mut q.used_ring, value)),
            REG_QUEUE_DEVICE_HIGH if configurable => self
                .selected_queue()
                .into_iter()
                .for_each(|q| set_high(&mut q.used_ring, value)),
            REG_QUEUE_NOTIFY => {
                if (value as usize) < self.queues.len() {
                    self.process();
                }
            }
            REG_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::AcqRel);
            }
            REG_STATUS => self.set_status(value),
            _ => tracing::trace!(offset, value, "ignored virtio-mmio register write"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::trace!(
                offset,
                len = data.len(),
                "ignored unaligned virtio-mmio write"
            );
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, value);
    }
}
