//! virtio-vsock conformance, Firecracker style: host code plays the guest
//! driver, laying descriptors and packets out in real guest memory
//! (`GuestMemoryMmap`) and talking to the device through its virtio-mmio
//! registers, while real host processes' sockets (Unix streams in a temp
//! folder) sit on the other side and the real `vsock-mux` thread moves data.
//! Waits are on the device's interrupt eventfd or on blocking socket reads,
//! each with a generous deadline that only bounds a failing test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use sluice_vmm::devices::BusDevice;
use sluice_vmm::virtio::mmio::MmioTransport;
use sluice_vmm::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use sluice_vmm::virtio::vsock::{
    CONN_BUF_SIZE, EVENT_QUEUE, HDR_LEN, HOST_CID, Muxer, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, PacketHeader, RX_QUEUE, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TX_QUEUE, TYPE_STREAM, VIRTIO_ID_VSOCK, Vsock, VsockConfig, VsockTransport,
    spawn_muxer, wait_readable,
};
use sluice_vmm::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 8 << 20;
const QSIZE: u16 = 64;
const BUFFERS: u64 = 0x10_0000;
const GUEST_CID: u64 = 3;
/// Deadline for one expected event; only reached when a test fails.
const WAIT: Duration = Duration::from_secs(20);
/// The guest's receive buffer as advertised in its packets.
const GUEST_BUF: u32 = 64 * 1024;

fn qbase(q: usize) -> u64 {
    0x1_0000 + q as u64 * 0x4000
}

/// A host-side virtio-vsock driver: what the guest kernel's driver does.
struct Guest {
    mem: GuestMemoryMmap,
    dev: VsockTransport,
    irq: EventFd,
    _mux: Muxer,
    next_desc: [u16; 3],
    avail_idx: [u16; 3],
    used_seen: [u16; 3],
    next_buf: u64,
    /// rx descriptor head → buffer address.
    rx_bufs: std::collections::HashMap<u16, u64>,
    /// Used rx elements not yet looked at.
    rx_ready: std::collections::VecDeque<(u32, u32)>,
    /// Payload bytes the guest consumed (all connections), for fwd_cnt.
    fwd_cnt: u32,
    _dir: tempfile::TempDir,
    uds: PathBuf,
}

impl Guest {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let vsock = Vsock::new(&VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(MmioTransport::new(
            vsock,
            mem.clone(),
            irq.try_clone().unwrap(),
        )));
        let mux = spawn_muxer(dev.clone()).unwrap();
        let mut g = Self {
            mem,
            dev,
            irq,
            _mux: mux,
            next_desc: [0; 3],
            avail_idx: [0; 3],
            used_seen: [0; 3],
            next_buf: BUFFERS,
            rx_bufs: Default::default(),
            rx_ready: Default::default(),
            fwd_cnt: 0,
            _dir: dir,
            uds,
        };
        g.init();
        g
    }

    fn rd(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.lock().unwrap().read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(&self, off: u64, v: u32) {
        self.dev.lock().unwrap().write(off, &v.to_le_bytes());
    }

    fn init(&mut self) {
        assert_eq!(self.rd(0x08), VIRTIO_ID_VSOCK);
        let mut cid = [0u8; 8];
        self.dev.lock().unwrap().read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
        self.wr(0x70, STATUS_ACKNOWLEDGE);
        self.wr(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.wr(0x24, 1);
        self.wr(0x20, 1);
        self.wr(0x24, 0);
        self.wr(0x20, 0);
        self.wr(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        for q in 0..3 {
            self.wr(0x30, q as u32);
            assert_eq!(self.rd(0x34), 256);
            self.wr(0x38, u32::from(QSIZE));
            let b = qbase(q);
            self.wr(0x80, b as u32);
            self.wr(0x90, (b + 0x1000) as u32);
            self.wr(0xa0, (b + 0x2000) as u32);
            self.wr(0x44, 1);
        }
        self.wr(
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(self.dev.lock().unwrap().is_activated());
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

    fn alloc(&mut self, data: &[u8], len: u32) -> u64 {
        let addr = self.next_buf;
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.next_buf += u64::from(len.max(1)).next_multiple_of(64);
        assert!(self.next_buf < MEM_SIZE as u64, "test ran out of buffers");
        addr
    }

    /// Adds a chain of (data, len, writable) buffers and notifies; returns
    /// its head and the buffers' addresses.
    fn add_chain(&mut self, q: usize, bufs: &[(&[u8], u32, bool)]) -> (u16, Vec<u64>) {
        let head = self.next_desc[q] % QSIZE;
        let mut addrs = Vec::new();
        for (i, (data, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc[q] + i as u16) % QSIZE;
            let addr = self.alloc(data, *len);
            addrs.push(addr);
            let mut flags = if *writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(q, idx, addr, *len, flags, (idx + 1) % QSIZE);
        }
        self.next_desc[q] = (self.next_desc[q] + bufs.len() as u16) % QSIZE;
        let avail = qbase(q) + 0x1000;
        let slot = u64::from(self.avail_idx[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
        self.wr(0x50, q as u32);
        (head, addrs)
    }

    /// Posts `n` receive buffers (header and 4 KiB payload in two
    /// descriptors, as Linux does).
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let (head, addrs) =
                self.add_chain(RX_QUEUE, &[(&[], HDR_LEN as u32, true), (&[], 4096, true)]);
            self.rx_bufs.insert(head, addrs[0]);
            // The payload descriptor directly follows the header's buffer.
            assert_eq!(addrs[1], addrs[0] + 64);
        }
    }

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

    /// Waits for the device's interrupt (or fails after [`WAIT`]).
    fn wait_irq(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            wait_readable(&self.irq, left).unwrap(),
            "no interrupt from the vsock device within {WAIT:?}"
        );
        let _ = self.irq.read();
    }

    /// The next packet the device put in the receive queue.
    fn recv(&mut self) -> (PacketHeader, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let fresh = self.used(RX_QUEUE);
            self.rx_ready.extend(fresh);
            if let Some((id, len)) = self.rx_ready.pop_front() {
                let addr = self.rx_bufs[&(id as u16)];
                assert!(
                    len as usize >= HDR_LEN,
                    "rx buffer returned with {len} bytes"
                );
                let mut h = [0u8; HDR_LEN];
                self.mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
                let hdr = PacketHeader::from_bytes(&h);
                assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
                let mut payload = vec![0u8; hdr.len as usize];
                self.mem
                    .read_slice(&mut payload, GuestAddress(addr + 64))
                    .unwrap();
                assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
                assert_eq!(hdr.type_, TYPE_STREAM);
                self.fwd_cnt += hdr.len;
                // Linux refills right away.
                self.post_rx(1);
                return (hdr, payload);
            }
            self.wait_irq(deadline);
        }
    }

    /// Sends a packet from guest port `src` to host port `dst`.
    fn send(&mut self, src: u32, dst: u32, op: u16, flags: u32, payload: &[u8]) {
        self.send_with_credit(src, dst, op, flags, payload, GUEST_BUF, self.fwd_cnt);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_with_credit(
        &mut self,
        src: u32,
        dst: u32,
        op: u16,
        flags: u32,
        payload: &[u8],
        buf_alloc: u32,
        fwd_cnt: u32,
    ) {
        let hdr = PacketHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        };
        let bytes = hdr.to_bytes();
        if payload.is_empty() {
            self.add_chain(TX_QUEUE, &[(&bytes, HDR_LEN as u32, false)]);
        } else {
            self.add_chain(
                TX_QUEUE,
                &[
                    (&bytes, HDR_LEN as u32, false),
                    (payload, payload.len() as u32, false),
                ],
            );
        }
    }

    fn invalid_packets(&self) -> u64 {
        self.dev.lock().unwrap().device().stats().invalid_packets
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().device().connection_count()
    }

    /// A host process connects to guest port `port`; returns the host
    /// stream and the host port the device chose.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.uds).unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        writeln!(host, "CONNECT {port}").unwrap();
        let (req, _) = self.recv();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(req.dst_port, port);
        self.send(port, req.src_port, OP_RESPONSE, 0, &[]);
        let mut line = String::new();
        BufReader::new(&host).read_line(&mut line).unwrap();
        assert_eq!(line, format!("OK {}\n", req.src_port));
        (host, req.src_port)
    }
}

fn read_exact(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn host_connects_and_data_flows_both_ways() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(52);
    host.write_all(b"hello guest").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, hport, 52));
    assert_eq!(data, b"hello guest");
    assert_eq!(rw.buf_alloc, CONN_BUF_SIZE);
    g.send(52, hport, OP_RW, 0, b"hello host");
    assert_eq!(read_exact(&mut host, 10), b"hello host");
    let stats = g.dev.lock().unwrap().device().stats();
    assert_eq!(
        (stats.rx_bytes, stats.tx_bytes, stats.connections),
        (11, 10, 1)
    );
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new();
    g.post_rx(8);
    let listener = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
    g.send(1025, 5000, OP_REQUEST, 0, &[]);
    let (resp, _) = g.recv();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 5000, 1025)
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    g.send(1025, 5000, OP_RW, 0, b"ping");
    assert_eq!(read_exact(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let (rw, data) = g.recv();
    assert_eq!(
        (rw.op, rw.dst_port, data.as_slice()),
        (OP_RW, 1025, &b"pong"[..])
    );
}

#[test]
fn guest_connect_without_a_listener_is_reset() {
    let mut g = Guest::new();
    g.post_rx(4);
    g.send(1025, 6000, OP_REQUEST, 0, &[]);
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 6000, 1025));
    assert_eq!(g.connections(), 0);
    // Data for a connection that does not exist is reset too.
    g.send(1026, 6001, OP_RW, 0, b"x");
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 1026));
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut g = Guest::new();
    g.post_rx(8);
    let mut host = UnixStream::connect(&g.uds).unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = g.recv();
    let hport = req.src_port;
    // The guest accepts with an 8-byte receive buffer.
    g.send_with_credit(77, hport, OP_RESPONSE, 0, &[], 8, 0);
    let mut line = String::new();
    BufReader::new(&host).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {hport}\n"));
    host.write_all(b"0123456789abcdefghij").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"01234567"[..]));
    // Out of credit: the guest asks what the device consumed, the device
    // answers, and nothing more arrives until the guest frees its buffer.
    g.send_with_credit(77, hport, OP_CREDIT_REQUEST, 0, &[], 8, 0);
    let (cu, data) = g.recv();
    assert_eq!(
        (cu.op, cu.buf_alloc, data.len()),
        (OP_CREDIT_UPDATE, CONN_BUF_SIZE, 0)
    );
    // The guest consumed 8 bytes: 8 more may come.
    g.send_with_credit(77, hport, OP_CREDIT_UPDATE, 0, &[], 8, 8);
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"89abcdef"[..]));
    g.send_with_credit(77, hport, OP_CREDIT_UPDATE, 0, &[], 8, 16);
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"ghij"[..]));
}

#[test]
fn device_announces_credit_as_it_forwards_guest_data() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(9);
    let chunk = vec![7u8; 32 * 1024];
    // A quarter of the device's buffer forwarded triggers a credit update
    // carrying the forwarded count.
    let sent = (CONN_BUF_SIZE / 4) as usize;
    for _ in 0..sent / chunk.len() {
        g.send(9, hport, OP_RW, 0, &chunk);
    }
    assert_eq!(read_exact(&mut host, sent), vec![7u8; sent]);
    let (cu, _) = g.recv();
    assert_eq!(cu.op, OP_CREDIT_UPDATE);
    assert_eq!(cu.fwd_cnt, sent as u32);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(10);
    // The host reads nothing, so the device's buffer (its advertised
    // credit) fills once the socket's own buffer is full; the packet that
    // goes beyond it resets the connection.
    let chunk = vec![1u8; 60 * 1024];
    let mut sent = 0usize;
    while g.connections() == 1 {
        g.send(10, hport, OP_RW, 0, &chunk);
        sent += chunk.len();
        assert!(sent < 4 << 20, "no reset after {sent} bytes");
    }
    // Credit updates may come first; the reset follows.
    let mut op = g.recv().0.op;
    while op == OP_CREDIT_UPDATE {
        op = g.recv().0.op;
    }
    assert_eq!(op, OP_RST);
    assert_eq!(g.connections(), 0);
    // The host sees its connection end after the bytes that were written.
    host.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(got.len() < sent && got.iter().all(|&b| b == 1));
}

#[test]
fn guest_shutdown_resets_and_closes_the_host_side() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(11);
    g.send(11, hport, OP_RW, 0, b"last words");
    g.send(11, hport, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    let (rst, _) = g.recv();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 11));
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words");
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_half_close_shuts_the_host_write_side() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(12);
    g.send(12, hport, OP_RW, 0, b"request");
    g.send(12, hport, OP_SHUTDOWN, SHUTDOWN_SEND, &[]);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    // The other direction still works.
    host.write_all(b"reply").unwrap();
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"reply"[..]));
}

#[test]
fn host_close_sends_shutdown_and_guest_rst_ends_the_connection() {
    let mut g = Guest::new();
    g.post_rx(8);
    let (mut host, hport) = g.host_connect(13);
    host.write_all(b"bye").unwrap();
    drop(host);
    let (rw, data) = g.recv();
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"bye"[..]));
    let (sd, _) = g.recv();
    assert_eq!(sd.op, OP_SHUTDOWN);
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(g.connections(), 1);
    g.send(13, hport, OP_RST, 0, &[]);
    // The device handles the tx notify synchronously.
    assert_eq!(g.connections(), 0);
}

#[test]
fn bad_handshakes_are_dropped() {
    let g = Guest::new();
    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'9'; 64]] {
        let mut host = UnixStream::connect(&g.uds).unwrap();
        host.set_read_timeout(Some(WAIT)).unwrap();
        host.write_all(line).unwrap();
        let mut rest = Vec::new();
        // The device closes the stream without an answer (a reset when it
        // left bytes unread).
        match host.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert_eq!(g.connections(), 0);
}

#[test]
fn malformed_tx_packets_are_returned_unused() {
    let mut g = Guest::new();
    // Shorter than a header.
    g.add_chain(TX_QUEUE, &[(&[0u8; 10], 10, false)]);
    // A header claiming more payload than the chain holds.
    let hdr = PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1,
        dst_port: 2,
        len: 1000,
        type_: TYPE_STREAM,
        op: OP_RW,
        ..Default::default()
    };
    g.add_chain(TX_QUEUE, &[(&hdr.to_bytes(), HDR_LEN as u32, false)]);
    // A buffer outside guest memory.
    let head = g.next_desc[TX_QUEUE];
    g.write_desc(TX_QUEUE, head, 1 << 40, 64, 0, 0);
    g.next_desc[TX_QUEUE] += 1;
    let avail = qbase(TX_QUEUE) + 0x1000;
    let slot = u64::from(g.avail_idx[TX_QUEUE] % QSIZE);
    g.mem
        .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
        .unwrap();
    g.avail_idx[TX_QUEUE] += 1;
    g.mem
        .write_obj(g.avail_idx[TX_QUEUE], GuestAddress(avail + 2))
        .unwrap();
    g.wr(0x50, TX_QUEUE as u32);
    let used = g.used(TX_QUEUE);
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(g.invalid_packets(), 3);
    assert_eq!(g.rd(0x70) & 0x40, 0, "the device must not need a reset");
}

#[test]
fn transport_reset_event_after_restore() {
    let mut g = Guest::new();
    g.post_rx(4);
    let (_host, _) = g.host_connect(14);
    g.dev.lock().unwrap().device_mut().transport_reset();
    assert_eq!(g.connections(), 0);
    let (head, addrs) = g.add_chain(EVENT_QUEUE, &[(&[0xff; 4], 4, true)]);
    let used = g.used(EVENT_QUEUE);
    assert_eq!(used, vec![(u32::from(head), 4)]);
    let mut id = [0u8; 4];
    g.mem.read_slice(&mut id, GuestAddress(addrs[0])).unwrap();
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
}

#[test]
fn many_connections_carry_their_own_data() {
    let mut g = Guest::new();
    g.post_rx(16);
    let mut hosts = Vec::new();
    for port in 100..110 {
        hosts.push((port, g.host_connect(port)));
    }
    for (port, (host, _)) in &mut hosts {
        host.write_all(format!("to {port}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < hosts.len() {
        let (rw, data) = g.recv();
        assert_eq!(rw.op, OP_RW);
        seen.insert(rw.dst_port, String::from_utf8(data).unwrap());
    }
    for (port, (host, hport)) in &mut hosts {
        assert_eq!(seen[port], format!("to {port}"));
        g.send(*port, *hport, OP_RW, 0, format!("from {port}").as_bytes());
        let want = format!("from {port}");
        assert_eq!(read_exact(host, want.len()), want.as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary bytes as a transmitted packet never panic the device or
    /// make it need a reset; every chain comes back.
    #[test]
    fn arbitrary_tx_packets_are_handled(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..8)
    ) {
        let mut g = Guest::new();
        g.post_rx(4);
        for p in &packets {
            g.add_chain(TX_QUEUE, &[(p, p.len() as u32, false)]);
        }
        prop_assert_eq!(g.used(TX_QUEUE).len(), packets.len());
        prop_assert_eq!(g.rd(0x70) & 0x40, 0);
    }
}

/// The device on /dev/kvm with a tiny guest as the driver: the guest
/// initialises the device through MMIO exits, connects to host port 5000
/// (a host listener at `<uds>_5000`), sends a greeting, and resets the VM
/// once two packets (the device's RESPONSE and the host's reply) are in its
/// receive ring; interrupts reach KVM through the device's irqfd.
#[test]
fn a_tiny_guest_connects_to_the_host_over_vsock_on_kvm() {
    use common::{config, kvm_available};
    use sluice_vmm::asm::Asm;
    use sluice_vmm::vm::{ResetCause, VSOCK_MMIO_BASE};
    use sluice_vmm::{Boot, ExitReason, VmBuilder};
    if !kvm_available() {
        return;
    }
    const RX: [u64; 3] = [0x40000, 0x41000, 0x42000];
    const TX: [u64; 3] = [0x43000, 0x44000, 0x45000];
    const PKT: u64 = 0x50000;
    const RXBUF: u64 = 0x60000;
    let greeting = b"hello from the guest";
    let r = |off: u64| VSOCK_MMIO_BASE + off;
    let mut a = Asm::new()
        .write32(r(0x70), 0)
        .write32(r(0x70), 1)
        .write32(r(0x70), 3)
        .write32(r(0x24), 1)
        .write32(r(0x20), 1) // VIRTIO_F_VERSION_1
        .write32(r(0x24), 0)
        .write32(r(0x20), 0)
        .write32(r(0x70), 0xb);
    for (q, [desc, avail, used]) in [(0u32, RX), (1, TX)] {
        a = a
            .write32(r(0x30), q)
            .write32(r(0x38), 16)
            .write32(r(0x80), desc as u32)
            .write32(r(0x90), avail as u32)
            .write32(r(0xa0), used as u32)
            .write32(r(0x44), 1);
    }
    let a = a
        .write32(r(0x70), 0xf)
        .write32(r(0x50), RX_QUEUE as u32)
        .write32(r(0x50), TX_QUEUE as u32);
    let wait = a.here();
    let code = a
        .mov_rax(RX[2] + 2)
        .load32_from_rax()
        .cmp_al(2)
        .jnz(wait)
        .i8042_reset()
        .spin()
        .finish();

    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut vm = VmBuilder::new(config("vsock-guest"), Boot::Code(code))
        .vsock(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.clone(),
        })
        .build()
        .unwrap();
    let m = vm.memory();
    let desc = |q: &[u64; 3], i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&d, GuestAddress(q[0] + 16 * i)).unwrap();
    };
    let hdr = |op: u16, len: u32| PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 1025,
        dst_port: 5000,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    };
    m.write_slice(&hdr(OP_REQUEST, 0).to_bytes(), GuestAddress(PKT))
        .unwrap();
    m.write_slice(
        &hdr(OP_RW, greeting.len() as u32).to_bytes(),
        GuestAddress(PKT + 0x100),
    )
    .unwrap();
    m.write_slice(greeting, GuestAddress(PKT + 0x200)).unwrap();
    desc(&TX, 0, PKT, HDR_LEN as u32, 0, 0);
    desc(&TX, 1, PKT + 0x100, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, 2);
    desc(&TX, 2, PKT + 0x200, greeting.len() as u32, 0, 0);
    for (slot, head) in [0u16, 1].into_iter().enumerate() {
        m.write_obj(head, GuestAddress(TX[1] + 4 + 2 * slot as u64))
            .unwrap();
    }
    m.write_obj(2u16, GuestAddress(TX[1] + 2)).unwrap();
    for i in 0..4u16 {
        desc(
            &RX,
            u64::from(i),
            RXBUF + 0x1000 * u64::from(i),
            4096,
            VIRTQ_DESC_F_WRITE,
            0,
        );
        m.write_obj(i, GuestAddress(RX[1] + 4 + 2 * u64::from(i)))
            .unwrap();
    }
    m.write_obj(4u16, GuestAddress(RX[1] + 2)).unwrap();

    vm.start().unwrap();
    assert!(
        wait_readable(&listener, WAIT).unwrap(),
        "the guest's connection did not reach the host listener"
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(read_exact(&mut host, greeting.len()), greeting);
    host.write_all(b"hi guest").unwrap();
    let exit = vm.run(Duration::from_secs(60)).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));

    let m = vm.memory();
    let packet = |i: u64| {
        let mut h = [0u8; HDR_LEN];
        m.read_slice(&mut h, GuestAddress(RXBUF + 0x1000 * i))
            .unwrap();
        let h = PacketHeader::from_bytes(&h);
        let mut payload = vec![0u8; h.len as usize];
        m.read_slice(
            &mut payload,
            GuestAddress(RXBUF + 0x1000 * i + HDR_LEN as u64),
        )
        .unwrap();
        (h, payload)
    };
    let (resp, _) = packet(0);
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 5000, 1025)
    );
    let (rw, data) = packet(1);
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"hi guest"[..]));
    let stats = vm.virtio_vsock().unwrap().lock().unwrap().device().stats();
    assert_eq!((stats.tx_bytes, stats.rx_bytes), (greeting.len() as u64, 8));
}

/// Signals the host when the guest writes its port.
struct Marker(std::sync::mpsc::Sender<u8>);

impl BusDevice for Marker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let _ = self.0.send(data[0]);
    }
}

/// A snapshot keeps the device's transport (queues, CID); a restored
/// device tells the guest its connections are gone with a transport-reset
/// event in the event queue, which the guest sees and acts on. A clone with
/// another CID is refused.
#[test]
fn a_restored_vsock_device_sends_the_guest_a_transport_reset() {
    use common::{config, kvm_available};
    use sluice_vmm::asm::Asm;
    use sluice_vmm::vm::{ResetCause, VSOCK_MMIO_BASE};
    use sluice_vmm::{Boot, ExitReason, Snapshot, SnapshotError, VmBuilder, VmError};
    if !kvm_available() {
        return;
    }
    const EVQ: [u64; 3] = [0x40000, 0x41000, 0x42000];
    const EVBUF: u64 = 0x50000;
    let r = |off: u64| VSOCK_MMIO_BASE + off;
    let a = Asm::new()
        .write32(r(0x70), 0)
        .write32(r(0x70), 1)
        .write32(r(0x70), 3)
        .write32(r(0x24), 1)
        .write32(r(0x20), 1)
        .write32(r(0x24), 0)
        .write32(r(0x20), 0)
        .write32(r(0x70), 0xb)
        .write32(r(0x30), EVENT_QUEUE as u32)
        .write32(r(0x38), 16)
        .write32(r(0x80), EVQ[0] as u32)
        .write32(r(0x90), EVQ[1] as u32)
        .write32(r(0xa0), EVQ[2] as u32)
        .write32(r(0x44), 1)
        .write32(r(0x70), 0xf)
        .write32(r(0x50), EVENT_QUEUE as u32)
        .mov_dx(0x500)
        .mov_al(1)
        .out_dx_al();
    let wait = a.here();
    let code = a
        .mov_rax(EVQ[2] + 2)
        .load32_from_rax()
        .cmp_al(1)
        .jnz(wait)
        .i8042_reset()
        .spin()
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let vsock = |name: &str, cid: u64| VsockConfig {
        guest_cid: cid,
        uds_path: dir.path().join(name),
    };
    let (tx, ready) = std::sync::mpsc::channel();
    let mut source = VmBuilder::new(config("vsock-source"), Boot::Code(code))
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .vsock(vsock("source.sock", GUEST_CID))
        .build()
        .unwrap();
    let m = source.memory();
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&EVBUF.to_le_bytes());
    d[8..12].copy_from_slice(&4u32.to_le_bytes());
    d[12..14].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
    m.write_slice(&d, GuestAddress(EVQ[0])).unwrap();
    m.write_obj(1u16, GuestAddress(EVQ[1] + 2)).unwrap();
    m.write_obj(0xffff_ffffu32, GuestAddress(EVBUF)).unwrap();
    source.start().unwrap();
    assert_eq!(ready.recv_timeout(WAIT).unwrap(), 1);
    source.pause(WAIT).unwrap();
    // No event in the source: its device was never restored.
    let used: u16 = source.memory().read_obj(GuestAddress(EVQ[2] + 2)).unwrap();
    assert_eq!(used, 0);
    let snap_dir = dir.path().join("snap");
    source.snapshot(&snap_dir).unwrap();
    source.stop();
    let snap = Arc::new(Snapshot::load(&snap_dir).unwrap());
    let saved = snap.state().virtio_vsock.as_ref().expect("vsock state");
    assert_eq!(saved.guest_cid, GUEST_CID);
    assert!(saved.transport.activated);
    assert_eq!(saved.transport.queues[EVENT_QUEUE].next_avail, 0);

    let other_cid = VmBuilder::restore(config("vsock-bad-clone"), snap.clone())
        .vsock(vsock("bad.sock", GUEST_CID + 1))
        .build();
    assert!(matches!(
        other_cid,
        Err(VmError::Snapshot(SnapshotError::Devices(ref m))) if m.contains("CID")
    ));
    let without = VmBuilder::restore(config("vsock-no-device"), snap.clone()).build();
    assert!(matches!(
        without,
        Err(VmError::Snapshot(SnapshotError::Devices(_)))
    ));

    let (tx, _ready) = std::sync::mpsc::channel();
    let mut clone = VmBuilder::restore(config("vsock-clone"), snap)
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .vsock(vsock("clone.sock", GUEST_CID))
        .build()
        .unwrap();
    let exit = clone.run(Duration::from_secs(60)).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    let event: u32 = clone.memory().read_obj(GuestAddress(EVBUF)).unwrap();
    assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
}

/// The throughput measurement behind `sluice bench vm` moves every byte
/// through the device (it fails if any is missing or the stream stalls)
/// and measures its baseline in the same run.
#[test]
fn the_vsock_benchmark_moves_all_bytes() {
    let (vsock, unix) = sluice_vmm::bench::vsock_throughput(8 << 20).unwrap();
    eprintln!(
        "vsock host->guest {:.0} MB/s, Unix socket pair {:.0} MB/s",
        vsock / 1e6,
        unix / 1e6
    );
    assert!(vsock > 0.0 && unix > 0.0);
}
