//! virtio-mmio + virtio-console conformance, Firecracker style: host code
//! plays the guest driver, laying descriptors out in guest memory and
//! talking to the transport through its MMIO registers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use sluice_vmm::devices::BusDevice;
use sluice_vmm::virtio::console::{
    ByteQueue, Console, ConsoleOutput, RX_QUEUE, TX_QUEUE, VIRTIO_ID_CONSOLE, spawn_input_pump,
};
use sluice_vmm::virtio::mmio::{INT_USED_RING, MMIO_MAGIC, MmioTransport};
use sluice_vmm::virtio::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use sluice_vmm::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 4 << 20;
const QSIZE: u16 = 16;
const BUFFERS: u64 = 0x10_0000;

fn qbase(q: usize) -> u64 {
    0x1_0000 + q as u64 * 0x4000
}

/// Shared sink for console output.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A host-side virtio driver for tests.
struct Driver {
    mem: GuestMemoryMmap,
    dev: MmioTransport<Console>,
    next_desc: [u16; 2],
    avail_idx: [u16; 2],
    used_seen: [u16; 2],
    next_buf: u64,
}

impl Driver {
    fn new(out: Box<dyn Write + Send>, input: Arc<ByteQueue>, irq: EventFd) -> Self {
        Self::with_output(ConsoleOutput::Writer(out), input, irq)
    }

    fn with_output(out: ConsoleOutput, input: Arc<ByteQueue>, irq: EventFd) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = MmioTransport::new(Console::new(out, input), mem.clone(), irq);
        Self {
            mem,
            dev,
            next_desc: [0; 2],
            avail_idx: [0; 2],
            used_seen: [0; 2],
            next_buf: BUFFERS,
        }
    }

    fn rd(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&mut self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    /// The virtio 1.x initialisation sequence; returns the final status.
    fn init(&mut self, features_hi: u32, qsize: u16) -> u32 {
        self.wr(0x70, 0);
        self.wr(0x70, STATUS_ACKNOWLEDGE);
        self.wr(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.wr(0x24, 1);
        self.wr(0x20, features_hi);
        self.wr(0x24, 0);
        self.wr(0x20, 0);
        self.wr(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if self.rd(0x70) & STATUS_FEATURES_OK == 0 {
            return self.rd(0x70);
        }
        for q in 0..2 {
            self.wr(0x30, q as u32);
            assert_eq!(self.rd(0x34), 256);
            self.wr(0x38, u32::from(qsize));
            let b = qbase(q);
            self.wr(0x80, b as u32);
            self.wr(0x84, 0);
            self.wr(0x90, (b + 0x1000) as u32);
            self.wr(0x94, 0);
            self.wr(0xa0, (b + 0x2000) as u32);
            self.wr(0xa4, 0);
            self.wr(0x44, 1);
        }
        self.wr(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        self.rd(0x70)
    }

    fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(qbase(q) + 16 * u64::from(index % QSIZE)))
            .unwrap();
    }

    fn publish(&mut self, q: usize, head: u16) {
        let avail = qbase(q) + 0x1000;
        let slot = u64::from(self.avail_idx[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
    }

    fn alloc(&mut self, data: &[u8], len: u32) -> u64 {
        let addr = self.next_buf;
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.next_buf += u64::from(len.max(1)).next_multiple_of(64);
        addr
    }

    /// Adds a chain of (data, len, writable) buffers; returns its head.
    fn add_chain(&mut self, q: usize, bufs: &[(&[u8], u32, bool)]) -> u16 {
        let head = self.next_desc[q] % QSIZE;
        for (i, (data, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc[q] + i as u16) % QSIZE;
            let addr = self.alloc(data, *len);
            let mut flags = if *writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(q, idx, addr, *len, flags, (idx + 1) % QSIZE);
        }
        self.next_desc[q] = (self.next_desc[q] + bufs.len() as u16) % QSIZE;
        self.publish(q, head);
        head
    }

    fn notify(&mut self, q: usize) {
        self.wr(0x50, q as u32);
    }

    /// New used elements (id, len) since the last call.
    fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let used = qbase(q) + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let slot = u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(used + 4 + 8 * slot))
                .unwrap();
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(used + 8 + 8 * slot))
                .unwrap();
            out.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

fn driver() -> (Driver, Sink, Arc<ByteQueue>, EventFd) {
    let sink = Sink::default();
    let input = ByteQueue::new(1 << 20);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let d = Driver::new(
        Box::new(sink.clone()),
        input.clone(),
        irq.try_clone().unwrap(),
    );
    (d, sink, input, irq)
}

const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identification_and_feature_negotiation() {
    let (mut d, ..) = driver();
    assert_eq!(d.rd(0x0), MMIO_MAGIC);
    assert_eq!(d.rd(0x4), 2);
    assert_eq!(d.rd(0x8), VIRTIO_ID_CONSOLE);
    d.wr(0x14, 1);
    assert_eq!(d.rd(0x10), 1, "VIRTIO_F_VERSION_1 offered");
    // A driver without VERSION_1 does not get FEATURES_OK.
    let status = d.init(0, QSIZE);
    assert_eq!(status & STATUS_FEATURES_OK, 0);
    assert!(!d.dev.is_activated());
    // Asking for a feature not offered fails too.
    assert_eq!(d.init(1 | 2, QSIZE) & STATUS_FEATURES_OK, 0);
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    assert!(d.dev.is_activated());
    // Reset brings everything back.
    d.wr(0x70, 0);
    assert_eq!(d.rd(0x70), 0);
    assert!(!d.dev.is_activated());
}

#[test]
fn invalid_queue_size_is_refused_at_driver_ok() {
    let (mut d, ..) = driver();
    let status = d.init(1, 12); // not a power of two
    assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!d.dev.is_activated());
}

#[test]
fn oversized_queue_num_is_not_truncated_into_a_valid_size() {
    let (mut d, ..) = driver();
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    d.wr(0x70, 0);
    d.wr(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    d.wr(0x24, 1);
    d.wr(0x20, 1);
    d.wr(
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    d.wr(0x30, 0);
    d.wr(0x38, 0x1_0010); // 65552: would truncate to 16
    d.wr(0x80, qbase(0) as u32);
    d.wr(0x90, (qbase(0) + 0x1000) as u32);
    d.wr(0xa0, (qbase(0) + 0x2000) as u32);
    d.wr(0x44, 1);
    d.wr(0x70, ALL_OK);
    assert_ne!(d.rd(0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert!(!d.dev.is_activated());
}

#[test]
fn transmit_reaches_the_host_and_interrupts() {
    let (mut d, sink, _input, irq) = driver();
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    let head = d.add_chain(TX_QUEUE, &[(b"hello ", 6, false), (b"world", 5, false)]);
    d.notify(TX_QUEUE);
    assert_eq!(*sink.0.lock().unwrap(), b"hello world");
    assert_eq!(d.used(TX_QUEUE), vec![(u32::from(head), 0)]);
    assert_eq!(d.rd(0x60) & INT_USED_RING, INT_USED_RING);
    assert_eq!(irq.read().unwrap(), 1);
    d.wr(0x64, INT_USED_RING);
    assert_eq!(d.rd(0x60), 0);
    assert_eq!(d.dev.device().stats().tx_bytes, 11);
}

#[test]
fn receive_fills_guest_buffers_in_order() {
    let (mut d, _sink, input, _irq) = driver();
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    assert_eq!(input.try_push(b"ping"), 4);
    let a = d.next_buf;
    let h1 = d.add_chain(RX_QUEUE, &[(b"", 2, true)]);
    let b = d.next_buf;
    let h2 = d.add_chain(RX_QUEUE, &[(b"", 8, true)]);
    d.notify(RX_QUEUE);
    assert_eq!(
        d.used(RX_QUEUE),
        vec![(u32::from(h1), 2), (u32::from(h2), 2)]
    );
    assert_eq!(d.read_guest(a, 2), b"pi");
    assert_eq!(d.read_guest(b, 2), b"ng");
    assert!(input.is_empty());
    assert_eq!(d.dev.device().stats().rx_bytes, 4);
}

#[test]
fn malformed_chains_are_returned_unused_without_panics() {
    let (mut d, sink, _input, _irq) = driver();
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    let q = TX_QUEUE;
    let past_end = MEM_SIZE as u64 - 4;
    let cases: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        // Buffer outside guest memory.
        vec![(0x4000_0000, 16, 0, 0)],
        // Buffer crossing the end of memory.
        vec![(past_end, 64, 0, 0)],
        // Address + length wrapping around.
        vec![(u64::MAX - 8, 64, 0, 0)],
        // Oversized length.
        vec![(BUFFERS, u32::MAX, 0, 0)],
        // Next index outside the table.
        vec![(BUFFERS, 4, VIRTQ_DESC_F_NEXT, 99)],
        // A loop: the descriptor points at itself.
        vec![(BUFFERS, 4, VIRTQ_DESC_F_NEXT, 0)],
        // Readable after writable.
        vec![
            (BUFFERS, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
            (BUFFERS, 4, 0, 0),
        ],
        // Indirect descriptors were not negotiated.
        vec![(BUFFERS, 16, VIRTQ_DESC_F_INDIRECT, 0)],
    ];
    for (i, descs) in cases.iter().enumerate() {
        for (j, &(addr, len, flags, next)) in descs.iter().enumerate() {
            d.write_desc(q, j as u16, addr, len, flags, next);
        }
        d.publish(q, 0);
        d.notify(q);
        assert_eq!(d.used(q), vec![(0, 0)], "case {i}");
        assert_eq!(d.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0, "case {i}");
    }
    assert!(sink.0.lock().unwrap().is_empty());
    assert_eq!(d.dev.device().stats().invalid_chains, cases.len() as u64);
    // The queue still works afterwards.
    d.next_desc[q] = 4;
    d.add_chain(q, &[(b"ok", 2, false)]);
    d.notify(q);
    assert_eq!(*sink.0.lock().unwrap(), b"ok");
}

#[test]
fn avail_index_running_ahead_needs_a_reset() {
    let (mut d, _sink, _input, irq) = driver();
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    d.mem
        .write_obj(QSIZE + 5, GuestAddress(qbase(TX_QUEUE) + 0x1000 + 2))
        .unwrap();
    d.notify(TX_QUEUE);
    assert_ne!(d.dev.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq.read().unwrap(), 1);
    // Once broken, notifications do nothing until reset.
    d.notify(TX_QUEUE);
    assert_eq!(d.init(1, QSIZE), ALL_OK);
}

#[test]
fn unix_socket_host_side_end_to_end() {
    let (host, vmm_side) = UnixStream::pair().unwrap();
    let input = ByteQueue::new(64);
    let irq = EventFd::new(0).unwrap();
    let mut d = Driver::new(
        Box::new(vmm_side.try_clone().unwrap()),
        input,
        irq.try_clone().unwrap(),
    );
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    // Guest -> host.
    d.add_chain(TX_QUEUE, &[(b"from guest", 10, false)]);
    d.notify(TX_QUEUE);
    let mut host_r = host.try_clone().unwrap();
    host_r
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = [0u8; 10];
    host_r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from guest");
    let _ = irq.read();
    // Host -> guest through the pump thread; 200 bytes through a 64-byte input queue.
    let dst = d.next_buf;
    d.add_chain(RX_QUEUE, &[(b"", 256, true)]);
    let mem = d.mem.clone();
    let transport = Arc::new(Mutex::new(d.dev));
    let pump = spawn_input_pump(transport.clone(), vmm_side).unwrap();
    let payload: Vec<u8> = (0..200u8).collect();
    (&host).write_all(&payload).unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        while irq.read().is_ok() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("rx interrupt");
    // The first buffer got at most what fit in the input queue; post more until all arrived.
    let mut received = Vec::new();
    let used_addr = qbase(RX_QUEUE) + 0x2000;
    let mut seen = 0u16;
    let mut next_buf = 0x30_0000u64;
    let mut bufs = vec![dst];
    let mut next_desc = 1u16;
    let mut avail_idx = 1u16;
    loop {
        let idx: u16 = mem.read_obj(GuestAddress(used_addr + 2)).unwrap();
        while seen != idx {
            let len: u32 = mem
                .read_obj(GuestAddress(used_addr + 8 + 8 * u64::from(seen % QSIZE)))
                .unwrap();
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(bufs[seen as usize]))
                .unwrap();
            received.extend_from_slice(&b);
            seen += 1;
        }
        if received.len() >= payload.len() {
            break;
        }
        // Post another 256-byte receive buffer and notify.
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&next_buf.to_le_bytes());
        raw[8..12].copy_from_slice(&256u32.to_le_bytes());
        raw[12..14].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
        mem.write_slice(
            &raw,
            GuestAddress(qbase(RX_QUEUE) + 16 * u64::from(next_desc)),
        )
        .unwrap();
        mem.write_obj(
            next_desc,
            GuestAddress(qbase(RX_QUEUE) + 0x1000 + 4 + 2 * u64::from(avail_idx % QSIZE)),
        )
        .unwrap();
        avail_idx += 1;
        mem.write_obj(avail_idx, GuestAddress(qbase(RX_QUEUE) + 0x1000 + 2))
            .unwrap();
        bufs.push(next_buf);
        next_buf += 0x1000;
        next_desc += 1;
        transport
            .lock()
            .unwrap()
            .write(0x50, &(RX_QUEUE as u32).to_le_bytes());
        rx.recv_timeout(Duration::from_secs(10))
            .expect("rx interrupt");
    }
    assert_eq!(received, payload);
    // Closing every host handle ends the pump at end of file.
    drop(host);
    drop(host_r);
    pump.join().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary descriptor tables and avail rings: the device never panics,
    /// never writes output for a chain it rejects, and returns every chain
    /// it consumed.
    #[test]
    fn arbitrary_descriptor_tables_never_panic(
        descs in proptest::collection::vec(
            (prop_oneof![Just(BUFFERS), Just(MEM_SIZE as u64 - 8), any::<u64>(), 0u64..(MEM_SIZE as u64)],
             prop_oneof![0u32..64, any::<u32>()],
             0u16..8,
             prop_oneof![0u16..QSIZE, any::<u16>()]),
            1..(QSIZE as usize)),
        heads in proptest::collection::vec(prop_oneof![0u16..QSIZE, any::<u16>()], 1..8),
    ) {
        let (mut d, sink, _input, _irq) = driver();
        prop_assert_eq!(d.init(1, QSIZE), ALL_OK);
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            d.write_desc(TX_QUEUE, i as u16, addr, len, flags, next);
        }
        for &h in &heads {
            d.publish(TX_QUEUE, h);
        }
        d.notify(TX_QUEUE);
        let used = d.used(TX_QUEUE);
        prop_assert_eq!(used.len(), heads.len());
        for (u, h) in used.iter().zip(&heads) {
            prop_assert_eq!(u.0, u32::from(*h));
            prop_assert_eq!(u.1, 0);
        }
        let stats = d.dev.device().stats();
        prop_assert!(stats.invalid_chains <= heads.len() as u64);
        prop_assert_eq!(stats.tx_bytes, sink.0.lock().unwrap().len() as u64);
    }

    /// Random register traffic on the transport never panics.
    #[test]
    fn arbitrary_register_writes_never_panic(
        ops in proptest::collection::vec((0u64..0x140, any::<u32>(), any::<bool>(), 1usize..9), 1..64)
    ) {
        let (mut d, ..) = driver();
        for (off, val, is_write, len) in ops {
            if is_write {
                let bytes = val.to_le_bytes().iter().copied().cycle().take(len).collect::<Vec<u8>>();
                d.dev.write(off, &bytes);
            } else {
                let mut b = vec![0u8; len];
                d.dev.read(off, &mut b);
            }
        }
    }
}

#[test]
fn a_full_output_queue_leaves_transmit_buffers_in_the_ring() {
    let out = ByteQueue::new(8);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut d = Driver::with_output(ConsoleOutput::Queue(out.clone()), ByteQueue::new(64), irq);
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    let heads: Vec<u16> = (0..3)
        .map(|i| d.add_chain(TX_QUEUE, &[(&[b'a' + i; 10], 10, false)]))
        .collect();
    d.notify(TX_QUEUE);
    // One chunk overshoots the 8-byte limit; the other two wait in the ring.
    assert_eq!(d.used(TX_QUEUE), vec![(u32::from(heads[0]), 0)]);
    assert_eq!(out.pop_blocking(100).unwrap(), vec![b'a'; 10]);
    // What the output pump does after each write.
    d.dev.process();
    assert_eq!(d.used(TX_QUEUE), vec![(u32::from(heads[1]), 0)]);
    assert_eq!(out.pop_blocking(100).unwrap(), vec![b'b'; 10]);
    // Once closed (VM teardown), output is dropped and nothing waits.
    out.close();
    d.dev.process();
    assert_eq!(d.used(TX_QUEUE), vec![(u32::from(heads[2]), 0)]);
    assert_eq!(out.pop_blocking(100), None);
}

#[test]
fn output_pump_to_a_host_that_never_reads_ends_on_close() {
    let (host, vmm_side) = UnixStream::pair().unwrap();
    let out = ByteQueue::new(64 * 1024);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut d = Driver::with_output(ConsoleOutput::Queue(out.clone()), ByteQueue::new(64), irq);
    assert_eq!(d.init(1, QSIZE), ALL_OK);
    let big = vec![0x55u8; 60 * 1024];
    for _ in 0..8 {
        d.add_chain(TX_QUEUE, &[(&big, big.len() as u32, false)]);
    }
    let mem = d.mem.clone();
    let transport = Arc::new(Mutex::new(d.dev));
    let pump = sluice_vmm::virtio::console::spawn_output_pump(
        transport.clone(),
        vmm_side.try_clone().unwrap(),
    )
    .unwrap();
    // Notifying never blocks, however full the socket gets.
    transport
        .lock()
        .unwrap()
        .write(0x50, &(TX_QUEUE as u32).to_le_bytes());
    let used: u16 = mem
        .read_obj(GuestAddress(qbase(TX_QUEUE) + 0x2000 + 2))
        .unwrap();
    assert!(used >= 1);
    // Teardown: shut our end, close the queue; the pump must end.
    vmm_side.shutdown(std::net::Shutdown::Both).unwrap();
    out.close();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        pump.join().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("output pump did not end");
    drop(host);
}
