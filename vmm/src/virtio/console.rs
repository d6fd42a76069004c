//! virtio-console (device id 3) with one port: `receiveq0` carries host
//! bytes to the guest, `transmitq0` guest bytes to the host. It carries
//! the guest agent's framed channel (`/dev/hvc0` in the guest).
//!
//! Host input goes through a [`ByteQueue`] (bounded; a writer blocks
//! while it is full) so a guest that posts no receive buffers cannot make
//! the host buffer without limit. Guest output goes either straight to a
//! writer or, for the agent channel, into another bounded [`ByteQueue`]
//! drained by [`spawn_output_pump`]: when that queue is full the device
//! leaves transmit buffers in the ring (virtio's own back-pressure), so a
//! host that stops reading never blocks a vCPU.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;

use super::{Queue, QueueError, VIRTIO_F_VERSION_1, VirtioDevice, mmio::MmioTransport};
use crate::devices::bus::lock;

/// Virtio device id of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Index of `receiveq0` (host → guest).
pub const RX_QUEUE: usize = 0;
/// Index of `transmitq0` (guest → host).
pub const TX_QUEUE: usize = 1;
/// Size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit chain (longer chains are cut).
pub const MAX_TX_CHAIN: usize = 4 << 20;

/// Counters of a console device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Bytes sent by the guest.
    pub tx_bytes: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Malformed descriptor chains returned unused.
    pub invalid_chains: u64,
}

/// A bounded byte queue between a device and a host thread.
#[derive(Debug)]
pub struct ByteQueue {
    bytes: Mutex<VecDeque<u8>>,
    space: Condvar,
    limit: usize,
    closed: std::sync::atomic::AtomicBool,
}

impl ByteQueue {
    /// A queue holding at most `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            bytes: Mutex::new(VecDeque::new()),
            space: Condvar::new(),
            limit: limit.max(1),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Wakes and fails every blocked and future [`ByteQueue::push_blocking`]
    /// (the VM is going away).
    pub fn close(&self) {
        let _q = lock(&self.bytes);
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.space.notify_all();
    }

    /// Whether [`ByteQueue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Free room in bytes (0 when full).
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.len())
    }

    /// Appends all of `data` even past the limit (a producer that checked
    /// [`ByteQueue::room`] first overshoots by at most one chunk); wakes
    /// [`ByteQueue::pop_blocking`].
    pub fn push_all(&self, data: &[u8]) {
        let mut q = lock(&self.bytes);
        q.extend(data);
        self.space.notify_all();
    }

    /// Takes up to `max` bytes, waiting for some; `None` once closed and empty.
    pub fn pop_blocking(&self, max: usize) -> Option<Vec<u8>> {
        let mut q = lock(&self.bytes);
        loop {
            if !q.is_empty() {
                let n = q.len().min(max.max(1));
                let out = q.drain(..n).collect();
                self.space.notify_all();
                return Some(out);
            }
            if self.is_closed() {
                return None;
            }
            q = self.space.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Appends as much of `data` as fits; returns how much.
    pub fn try_push(&self, data: &[u8]) -> usize {
        let mut q = lock(&self.bytes);
        let n = data.len().min(self.limit - q.len());
        q.extend(&data[..n]);
        n
    }

    /// Appends all of `data`, waiting for room; `false` if the queue was
    /// closed first (the rest of `data` is dropped).
    pub fn push_blocking(&self, mut data: &[u8]) -> bool {
        let mut q = lock(&self.bytes);
        while !data.is_empty() {
            while q.len() >= self.limit {
                if self.is_closed() {
                    return false;
                }
                q = self.space.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            let n = data.len().min(self.limit - q.len());
            q.extend(&data[..n]);
            data = &data[n..];
        }
        true
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        lock(&self.bytes).len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where guest output goes.
pub enum ConsoleOutput {
    /// Written at once on the vCPU thread (tests, logs, `io::sink()`).
    Writer(Box<dyn Write + Send>),
    /// Queued for a host thread ([`spawn_output_pump`]); full means
    /// back-pressure on the guest.
    Queue(Arc<ByteQueue>),
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Writer(_) => f.write_str("ConsoleOutput::Writer"),
            Self::Queue(q) => f.debug_tuple("ConsoleOutput::Queue").field(q).finish(),
        }
    }
}

/// The console device model.
pub struct Console {
    out: ConsoleOutput,
    input: Arc<ByteQueue>,
    stats: ConsoleStats,
    acked_features: u64,
    queue_sizes: [u16; 2],
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console sending guest output to `out` and reading host input from `input`.
    pub fn new(out: ConsoleOutput, input: Arc<ByteQueue>) -> Self {
        Self {
            out,
            input,
            stats: ConsoleStats::default(),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }

    /// Counters.
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// The host input queue.
    pub fn input(&self) -> &Arc<ByteQueue> {
        &self.input
    }

    /// The output queue, if output is queued.
    pub fn output_queue(&self) -> Option<&Arc<ByteQueue>> {
        match &self.out {
            ConsoleOutput::Queue(q) => Some(q),
            ConsoleOutput::Writer(_) => None,
        }
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            if let ConsoleOutput::Queue(out) = &self.out
                && out.room() == 0
                && !out.is_closed()
            {
                // Back-pressure: the rest stays in the ring until the pump
                // makes room and calls `process` again.
                return Ok(used);
            }
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(used),
                Err(QueueError::InvalidChain { head, reason }) => {
                    tracing::warn!(head, %reason, "virtio-console: malformed transmit chain");
                    self.stats.invalid_chains += 1;
                    q.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let data = chain.read_all(mem, MAX_TX_CHAIN)?;
            match &mut self.out {
                ConsoleOutput::Writer(w) => {
                    if let Err(e) = w.write_all(&data).and_then(|()| w.flush()) {
                        tracing::warn!(error = %e, bytes = data.len(), "virtio-console: host side gone; output dropped");
                    }
                }
                // A closed queue (VM going away) drops the bytes.
                ConsoleOutput::Queue(out) if out.is_closed() => {}
                ConsoleOutput::Queue(out) => out.push_all(&data),
            }
            self.stats.tx_bytes += data.len() as u64;
            q.add_used(mem, chain.head, 0)?;
            used = true;
        }
    }

    fn process_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        let mut used = false;
        let mut input = lock(&self.input.bytes);
        while !input.is_empty() {
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(QueueError::InvalidChain { head, reason }) => {
                    tracing::warn!(head, %reason, "virtio-console: malformed receive chain");
                    self.stats.invalid_chains += 1;
                    q.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let take = (chain.writable_len().min(u64::from(u32::MAX)) as usize).min(input.len());
            let data: Vec<u8> = input.drain(..take).collect();
            let n = chain.write_all(mem, &data)?;
            self.stats.rx_bytes += n as u64;
            q.add_used(mem, chain.head, n as u32)?;
            used = true;
        }
        drop(input);
        self.input.space.notify_all();
        Ok(used)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: all zero (no size, one port).
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn process(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, QueueError> {
        let mut used = false;
        if let Some(q) = queues.get_mut(TX_QUEUE).filter(|q| q.ready) {
            used |= self.process_tx(mem, q)?;
        }
        if let Some(q) = queues.get_mut(RX_QUEUE).filter(|q| q.ready) {
            used |= self.process_rx(mem, q)?;
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

/// Starts the named thread `virtio-console-out` writing the console's
/// output queue to `writer` (e.g. the VMM end of a Unix socket) and letting
/// the device take more transmit buffers after each write. It ends when the
/// queue is closed and drained, or when `writer` fails (the queue is then
/// closed, so later output is dropped).
pub fn spawn_output_pump<W: Write + Send + 'static>(
    transport: Arc<Mutex<MmioTransport<Console>>>,
    mut writer: W,
) -> std::io::Result<JoinHandle<()>> {
    let queue = lock(&transport).device().output_queue().cloned();
    std::thread::Builder::new()
        .name("virtio-console-out".into())
        .spawn(move || {
            let Some(queue) = queue else { return };
            while let Some(data) = queue.pop_blocking(64 * 1024) {
                if let Err(e) = writer.write_all(&data).and_then(|()| writer.flush()) {
                    tracing::debug!(error = %e, "virtio-console output ended");
                    queue.close();
                }
                // Room again: take the transmit buffers left in the ring.
                lock(&transport).process();
            }
        })
}

/// Starts the named thread `virtio-console-in` copying `reader` (e.g. the
/// host end of a Unix socket) into the console's input and delivering it.
/// It ends at end of file or on a read error.
pub fn spawn_input_pump<R: Read + Send + 'static>(
    transport: Arc<Mutex<MmioTransport<Console>>>,
    mut reader: R,
) -> std::io::Result<JoinHandle<()>> {
    let input = lock(&transport).device().input().clone();
    std::thread::Builder::new()
        .name("virtio-console-in".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "virtio-console input ended");
                        break;
                    }
                };
                // Deliver what fits now, then wait for room for the rest.
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let pushed = input.try_push(rest);
                    rest = &rest[pushed..];
                    lock(&transport).process();
                    if !rest.is_empty() && pushed == 0 {
                        if !input.push_blocking(&rest[..1]) {
                            return;
                        }
                        rest = &rest[1..];
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn try_push_stops_at_the_limit() {
        let q = ByteQueue::new(4);
        assert_eq!(q.try_push(b"abcdef"), 4);
        assert_eq!(q.try_push(b"g"), 0);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn close_releases_a_writer_waiting_for_room() {
        let q = ByteQueue::new(2);
        assert_eq!(q.try_push(b"ab"), 2);
        let (tx, rx) = channel();
        let writer = {
            let q = q.clone();
            std::thread::spawn(move || tx.send(q.push_blocking(b"c")).unwrap())
        };
        q.close();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(false));
        writer.join().unwrap();
        assert_eq!(q.len(), 2);
    }
}
