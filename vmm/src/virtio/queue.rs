//! A split virtqueue (virtio 1.x, section 2.7) read from guest memory, with
//! every descriptor chain validated before a device sees it.
//!
//! A chain is rejected (and still consumed, so the driver gets it back with
//! length 0) when a descriptor index is out of the table, the chain is
//! longer than the queue (a loop), a buffer falls outside guest memory or
//! wraps, the total length overflows, a device-readable buffer follows a
//! device-writable one, or it uses indirect descriptors (not offered).

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Avail ring flag: the driver does not want interrupts.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest total chain length accepted (guards `u32` used lengths).
pub const MAX_CHAIN_BYTES: u64 = u32::MAX as u64;

/// Errors reading a virtqueue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue's configuration (size, alignment, ring placement) is invalid.
    #[error("virtqueue is misconfigured: {0}")]
    Misconfigured(&'static str),
    /// Reading or writing a ring failed (address outside guest memory).
    #[error("virtqueue ring access at {addr:#x} failed")]
    RingAccess {
        /// The guest address.
        addr: u64,
    },
    /// The driver's avail index moved more than the queue size ahead.
    #[error("avail index {avail_idx} is {ahead} entries ahead of the device (queue size {size})")]
    AvailIndexTooFarAhead {
        /// The driver's index.
        avail_idx: u16,
        /// How far ahead.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor chain is invalid; it has been consumed and must be
    /// returned to the driver with [`Queue::add_used`] (length 0).
    #[error("descriptor chain at head {head} is invalid: {reason}")]
    InvalidChain {
        /// The chain's head index.
        head: u16,
        /// Why.
        reason: ChainError,
    },
}

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index is outside the table.
    #[error("descriptor index {index} out of range (queue size {size})")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// More descriptors than the queue size: the chain loops.
    #[error("chain longer than the queue size {size} (loop)")]
    TooLong {
        /// Queue size.
        size: u16,
    },
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutOfRange {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The buffers add up to more than [`MAX_CHAIN_BYTES`].
    #[error("chain is longer than {MAX_CHAIN_BYTES} bytes")]
    TooManyBytes,
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// Indirect descriptors were not negotiated.
    #[error("indirect descriptor used but not negotiated")]
    Indirect,
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescriptorChain {
    /// Head index (to hand back with [`Queue::add_used`]).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Buffer>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buffer>,
}

impl DescriptorChain {
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Reads the readable buffers, at most `limit` bytes.
    pub fn read_all(&self, mem: &GuestMemoryMmap, limit: usize) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::with_capacity(self.readable_len().min(limit as u64) as usize);
        for b in &self.readable {
            let take = (b.len as usize).min(limit - out.len());
            let start = out.len();
            out.resize(start + take, 0);
            mem.read_slice(&mut out[start..], b.addr)
                .map_err(|_| QueueError::RingAccess { addr: b.addr.0 })?;
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Writes as much of `data` as fits in the writable buffers; returns
    /// the byte count written.
    pub fn write_all(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, QueueError> {
        let mut done = 0;
        for b in &self.writable {
            if done == data.len() {
                break;
            }
            let n = (b.len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], b.addr)
                .map_err(|_| QueueError::RingAccess { addr: b.addr.0 })?;
            done += n;
        }
        Ok(done)
    }
}

/// A queue's configuration and ring positions, for snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Whether the driver configured it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
}

/// A split virtqueue as configured by the driver.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Set by the driver when the queue is configured.
    pub ready: bool,
    /// Descriptor table.
    pub desc_table: GuestAddress,
    /// Available ring ("driver area").
    pub avail_ring: GuestAddress,
    /// Used ring ("device area").
    pub used_ring: GuestAddress,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
}

impl Queue {
    /// An unconfigured queue of at most `max_size` entries.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
        }
    }

    /// Configuration and ring positions, for a snapshot.
    pub fn state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table.0,
            avail_ring: self.avail_ring.0,
            used_ring: self.used_ring.0,
            next_avail: self.next_avail.0,
            next_used: self.next_used.0,
        }
    }

    /// A queue as saved by [`Queue::state`].
    pub fn from_state(s: &QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: GuestAddress(s.desc_table),
            avail_ring: GuestAddress(s.avail_ring),
            used_ring: GuestAddress(s.used_ring),
            next_avail: Wrapping(s.next_avail),
            next_used: Wrapping(s.next_used),
        }
    }

    /// Back to the unconfigured state.
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Checks the driver's configuration against guest memory.
    pub fn validate(&self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let size = u64::from(self.size);
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return Err(QueueError::Misconfigured(
                "size is 0, above the maximum or not a power of 2",
            ));
        }
        if !self.desc_table.0.is_multiple_of(16)
            || !self.avail_ring.0.is_multiple_of(2)
            || !self.used_ring.0.is_multiple_of(4)
        {
            return Err(QueueError::Misconfigured("ring misaligned"));
        }
        for (addr, len, what) in [
            (
                self.desc_table,
                16 * size,
                "descriptor table outside guest memory",
            ),
            (
                self.avail_ring,
                6 + 2 * size,
                "avail ring outside guest memory",
            ),
            (
                self.used_ring,
                6 + 8 * size,
                "used ring outside guest memory",
            ),
        ] {
            if !mem.check_range(addr, len as usize) {
                return Err(QueueError::Misconfigured(what));
            }
        }
        Ok(())
    }

    fn read_u16(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(addr)
            .map(u16::from_le)
            .map_err(|_| QueueError::RingAccess { addr: addr.0 })
    }

    /// Whether the driver asked not to be interrupted.
    pub fn interrupts_suppressed(&self, mem: &GuestMemoryMmap) -> bool {
        Self::read_u16(mem, self.avail_ring).is_ok_and(|f| f & VIRTQ_AVAIL_F_NO_INTERRUPT != 0)
    }

    /// Takes the next available chain, if any. An invalid chain is consumed
    /// and reported as [`QueueError::InvalidChain`].
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<DescriptorChain>, QueueError> {
        let avail_idx = Self::read_u16(mem, self.avail_ring.unchecked_add(2))?;
        // Read ring entries only after seeing the index that publishes them.
        fence(Ordering::Acquire);
        let ahead = (Wrapping(avail_idx) - self.next_avail).0;
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailIndexTooFarAhead {
                avail_idx,
                ahead,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let head = Self::read_u16(mem, self.avail_ring.unchecked_add(4 + 2 * slot))?;
        self.next_avail += 1;
        self.parse_chain(mem, head)
            .map(Some)
            .map_err(|reason| QueueError::InvalidChain { head, reason })
    }

    fn parse_chain(&self, mem: &GuestMemoryMmap, head: u16) -> Result<DescriptorChain, ChainError> {
        let mut chain = DescriptorChain {
            head,
            ..Default::default()
        };
        let mut index = head;
        let mut total = 0u64;
        for _ in 0..self.size {
            if index >= self.size {
                return Err(ChainError::IndexOutOfRange {
                    index,
                    size: self.size,
                });
            }
            let at = self.desc_table.unchecked_add(16 * u64::from(index));
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, at)
                .map_err(|_| ChainError::BufferOutOfRange {
                    addr: at.0,
                    len: 16,
                })?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let in_memory = addr.checked_add(u64::from(len)).is_some()
                && (len == 0 || mem.check_range(GuestAddress(addr), len as usize));
            if !in_memory {
                return Err(ChainError::BufferOutOfRange { addr, len });
            }
            total += u64::from(len);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TooManyBytes);
            }
            let buffer = Buffer {
                addr: GuestAddress(addr),
                len,
            };
            if flags & VIRTQ_DESC_F_WRITE != 0 {
                chain.writable.push(buffer);
            } else if chain.writable.is_empty() {
                chain.readable.push(buffer);
            } else {
                return Err(ChainError::ReadableAfterWritable);
            }
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
        Err(ChainError::TooLong { size: self.size })
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used.0 % self.size);
        let elem = self.used_ring.unchecked_add(4 + 8 * slot);
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        raw[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&raw, elem)
            .map_err(|_| QueueError::RingAccess { addr: elem.0 })?;
        self.next_used += 1;
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        let idx_addr = self.used_ring.unchecked_add(2);
        mem.write_obj(self.next_used.0.to_le(), idx_addr)
            .map_err(|_| QueueError::RingAccess { addr: idx_addr.0 })
    }
}
