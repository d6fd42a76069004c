//! An address bus (one for port I/O, one for MMIO) dispatching guest
//! accesses to devices by address range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a [`Bus`]. `offset` is relative to the base it was inserted at.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
        /// The existing device's base.
        other_base: u64,
        /// The existing device's length.
        other_len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices keyed by base address.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let end = base + len;
        // The device starting at or before `base`, and the first one after it.
        let before = self.devices.range(..=base).next_back();
        let after = self.devices.range(base..).next();
        for (other_base, (other_len, _)) in before.into_iter().chain(after) {
            if *other_base < end && base < other_base + other_len {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: *other_base,
                    other_len: *other_len,
                });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr..addr+size`, with the offset of `addr` in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Dispatches a read; `false` if no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a device that panicked
/// keeps its last state; the VM goes on).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b, [3]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.read(0x3f7, &mut b));
        // An access straddling the end is not dispatched.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert_eq!(a.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x9), (0x10f, 4), (0x0, 0x200)] {
            assert!(
                matches!(
                    bus.insert(base, len, Arc::new(Mutex::new(Recorder::default()))),
                    Err(BusError::Overlap {
                        other_base: 0x100,
                        ..
                    })
                ),
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(
            bus.insert(0x0, 0, Arc::new(Mutex::new(Recorder::default()))),
            Err(BusError::InvalidRange { base: 0, len: 0 })
        );
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.insert(0xf0, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
    }
}
