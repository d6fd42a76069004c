//! virtio-vsock (device id 19) emulated in the VMM, with a Unix socket on
//! the host side in the style of Firecracker's hybrid vsock (these hosts
//! have no `/dev/vhost-vsock`).
//!
//! * Host-initiated: a host process connects to the Unix socket at
//!   `uds_path`, writes `CONNECT <port>\n`, and once the guest accepts gets
//!   `OK <host port>\n`; the rest of the stream is the connection.
//! * Guest-initiated: a guest connection to host port `P` (CID 2) is
//!   forwarded to a Unix socket the host listens on at `<uds_path>_P`.
//!
//! Queues: `rx` (0) carries packets to the guest, `tx` (1) from it, `event`
//! (2) the transport-reset event sent after a snapshot restore (host-side
//! sockets do not survive one). Every packet starts with the 44-byte
//! [`PacketHeader`]. Each connection follows the virtio-vsock stream state
//! machine (REQUEST → RESPONSE → RW / CREDIT_UPDATE / CREDIT_REQUEST →
//! SHUTDOWN → RST) with credit-based flow control both ways: the device
//! reads from a host socket only as much as the guest has buffer space for
//! (`buf_alloc - (rx_cnt - fwd_cnt)`), and buffers at most
//! [`CONN_BUF_SIZE`] bytes of guest data per connection, which it
//! advertises; a guest that overruns that credit gets its connection reset.
//!
//! All host sockets are non-blocking, so neither a vCPU thread (which runs
//! [`VirtioDevice::process`] on a queue notify) nor the `vsock-mux` thread
//! ([`spawn_muxer`], which polls the host sockets) ever waits on a host
//! process.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    DescriptorChain, Queue, QueueError, VIRTIO_F_VERSION_1, VirtioDevice, mmio::MmioTransport,
};
use crate::devices::bus::lock;

/// Virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Index of the receive queue (host → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → host).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Size offered for each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload accepted in one packet (Linux sends at most 64 KiB).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Bytes of guest data buffered per connection: the credit the device
/// advertises (`buf_alloc`).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Most connections at once; further requests are reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// Longest accepted `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// First port given to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most queued resets for unknown connections (more are dropped).
pub const MAX_PENDING_RESETS: usize = 256;

/// Socket type: stream (the only one supported).
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Shutdown of one or both directions (see `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit announcement.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for a credit announcement.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// Event id of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The virtio-vsock packet header (little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for [`OP_SHUTDOWN`]).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a transmitted packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain holds fewer readable bytes than a header.
    #[error("chain has {readable} readable bytes, less than a {HDR_LEN}-byte header")]
    ShortHeader {
        /// Readable bytes.
        readable: u64,
    },
    /// The header's payload length exceeds [`MAX_PKT_PAYLOAD`] or the chain.
    #[error("payload length {len} exceeds the chain's {available} bytes or {MAX_PKT_PAYLOAD}")]
    BadLength {
        /// Length in the header.
        len: u32,
        /// Readable bytes after the header.
        available: u64,
    },
}

/// Parses a transmitted packet: header and payload, all checked against
/// the chain before anything is used.
pub fn parse_packet(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain,
) -> Result<Result<(PacketHeader, Vec<u8>), PacketError>, QueueError> {
    let readable = chain.readable_len();
    if readable < HDR_LEN as u64 {
        return Ok(Err(PacketError::ShortHeader { readable }));
    }
    let raw = chain.read_all(mem, HDR_LEN)?;
    let mut h = [0u8; HDR_LEN];
    h.copy_from_slice(&raw);
    let hdr = PacketHeader::from_bytes(&h);
    let available = readable - HDR_LEN as u64;
    if hdr.len > MAX_PKT_PAYLOAD || u64::from(hdr.len) > available {
        return Ok(Err(PacketError::BadLength {
            len: hdr.len,
            available,
        }));
    }
    let all = chain.read_all(mem, HDR_LEN + hdr.len as usize)?;
    Ok(Ok((hdr, all[HDR_LEN..].to_vec())))
}

/// Counters of a vsock device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockStats {
    /// Payload bytes from the guest written to host sockets.
    pub tx_bytes: u64,
    /// Payload bytes from host sockets delivered to the guest.
    pub rx_bytes: u64,
    /// Malformed descriptor chains or packets returned unused.
    pub invalid_packets: u64,
    /// Connections established (either direction).
    pub connections: u64,
    /// Resets sent to the guest.
    pub resets_sent: u64,
}

/// Host side of a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host processes connect to; guest connections to
    /// port `P` go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// Errors setting up a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX`).
    #[error("guest CID {0} is reserved; use 3 or more (user error, no retry)")]
    ReservedCid(u64),
    /// The host socket cannot be created.
    #[error("cannot listen on {path}: {source} (retry may help if the path is in use)")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An eventfd or thread cannot be created.
    #[error("cannot set up the vsock device: {0} (host resources; retry may help)")]
    Setup(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST to be sent or sent, waiting for RESPONSE.
    LocalInit { request_sent: bool },
    /// Data flows.
    Established,
}

/// (host port, guest port).
type ConnKey = (u32, u32);

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// Control operations due to the guest.
    need_response: bool,
    need_credit_update: bool,
    need_shutdown: bool,
    need_rst: bool,
    /// The guest's buffer and consumption, from its last packet.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Payload bytes from the guest written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Guest data not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// Host data read and waiting for an rx buffer.
    to_guest: Vec<u8>,
    /// The host socket reached end of file.
    host_eof: bool,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// The host socket's write side was shut down.
    host_write_closed: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Self {
            stream,
            state,
            need_response: false,
            need_credit_update: false,
            need_shutdown: false,
            need_rst: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            to_host: VecDeque::new(),
            to_guest: Vec::new(),
            host_eof: false,
            peer_shutdown: 0,
            host_write_closed: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_host_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.need_rst
            && !self.host_eof
            && self.to_guest.is_empty()
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Writes buffered guest data to the host socket; returns whether the
    /// connection must be reset (the host side failed).
    fn flush_to_host(&mut self) -> bool {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => {
                    self.to_host.clear();
                    return true;
                }
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host socket write failed");
                    self.to_host.clear();
                    return true;
                }
            }
        }
        if (self.fwd_cnt - self.fwd_cnt_sent).0 >= CONN_BUF_SIZE / 4 {
            self.need_credit_update = true;
        }
        if self.to_host.is_empty()
            && self.peer_shutdown & SHUTDOWN_SEND != 0
            && !self.host_write_closed
        {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_closed = true;
        }
        false
    }

    /// Reads what the guest has credit for; returns whether anything new
    /// is due to the guest.
    fn read_from_host(&mut self) -> bool {
        if !self.wants_host_read() {
            return false;
        }
        let want = self.peer_credit().min(MAX_PKT_PAYLOAD) as usize;
        let mut buf = vec![0u8; want];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.need_shutdown = true;
                    return true;
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.to_guest = buf;
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock: host socket read failed");
                    self.need_rst = true;
                    return true;
                }
            }
        }
    }
}

/// A host connection still sending its `CONNECT <port>\n` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock device model.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    handshakes: Vec<Handshake>,
    conns: HashMap<ConnKey, Conn>,
    /// Resets for packets that match no connection.
    resets: VecDeque<PacketHeader>,
    next_local_port: u32,
    /// Written when the set of sockets to poll may have changed.
    wake: EventFd,
    reset_event_pending: bool,
    stats: VsockStats,
    acked_features: u64,
    queue_sizes: [u16; 3],
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn would_block_ok<T>(r: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Vsock {
    /// A device for `config`; binds the host socket at `config.uds_path`
    /// (which must not exist).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid <= HOST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: config.uds_path.clone(),
            source,
        };
        let listener = UnixListener::bind(&config.uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Setup)?;
        Ok(Self {
            guest_cid: config.guest_cid,
            uds_path: config.uds_path.clone(),
            listener,
            handshakes: Vec::new(),
            conns: HashMap::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            wake,
            reset_event_pending: false,
            stats: VsockStats::default(),
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Counters.
    pub fn stats(&self) -> VsockStats {
        self.stats
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// After a snapshot restore: host sockets are gone, so every guest
    /// connection is dropped and the guest is told with a transport-reset
    /// event (as soon as it has an event buffer).
    pub fn transport_reset(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.resets.clear();
        self.reset_event_pending = true;
        self.poke();
    }

    fn poke(&self) {
        let _ = self.wake.write(1);
    }

    /// File descriptors and `poll` events the muxer must wait on (the wake
    /// eventfd comes first).
    pub fn poll_set(&self) -> Vec<(RawFd, i16)> {
        let mut set = vec![
            (self.wake.as_raw_fd(), libc::POLLIN),
            (self.listener.as_raw_fd(), libc::POLLIN),
        ];
        for h in &self.handshakes {
            set.push((h.stream.as_raw_fd(), libc::POLLIN));
        }
        for c in self.conns.values().filter(|c| !c.need_rst) {
            let mut ev = 0;
            if c.wants_host_read() {
                ev |= libc::POLLIN;
            }
            if !c.to_host.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                set.push((c.stream.as_raw_fd(), ev));
            }
        }
        set
    }

    /// Clears the wake eventfd (the muxer calls this after waking).
    pub fn clear_wake(&self) {
        let _ = self.wake.read();
    }

    /// Does all host-side I/O that is possible without blocking: accepts
    /// connections, reads `CONNECT` lines, reads host data the guest has
    /// credit for and writes buffered guest data. Returns whether anything
    /// is now due to the guest.
    pub fn host_io(&mut self) -> bool {
        let mut due = self.reset_event_pending;
        loop {
            match would_block_ok(self.listener.accept()) {
                Ok(Some((stream, _))) => {
                    if self.handshakes.len() >= MAX_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        tracing::warn!("vsock: too many pending host connections; dropping one");
                        continue;
                    }
                    self.handshakes.push(Handshake {
                        stream,
                        line: Vec::new(),
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept failed");
                    break;
                }
            }
        }
        let mut i = 0;
        while i < self.handshakes.len() {
            match self.read_handshake(i) {
                Some(Some(port)) => {
                    let h = self.handshakes.swap_remove(i);
                    due |= self.host_connect(h.stream, port);
                }
                Some(None) => {
                    self.handshakes.swap_remove(i);
                }
                None => i += 1,
            }
        }
        for c in self.conns.values_mut() {
            if !c.to_host.is_empty() && c.flush_to_host() {
                c.need_rst = true;
            }
            due |= c.need_rst || c.need_credit_update;
            due |= c.read_from_host();
        }
        due
    }

    /// `Some(Some(port))`: complete line; `Some(None)`: drop the stream;
    /// `None`: not complete yet.
    fn read_handshake(&mut self, i: usize) -> Option<Option<u32>> {
        let h = &mut self.handshakes[i];
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the newline (connection data) is
        // consumed here.
        loop {
            match h.stream.read(&mut byte) {
                Ok(0) => return Some(None),
                Ok(_) if byte[0] == b'\n' => {
                    let port = parse_connect_line(&h.line);
                    if port.is_none() {
                        tracing::warn!(line = %String::from_utf8_lossy(&h.line), "vsock: bad host handshake");
                    }
                    return Some(port);
                }
                Ok(_) if h.line.len() >= MAX_CONNECT_LINE => return Some(None),
                Ok(_) => h.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(None),
            }
        }
    }

    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) -> bool {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                peer_port,
                "vsock: too many connections; host connect refused"
            );
            return false;
        }
        let mut local = self.next_local_port;
        while self.conns.keys().any(|&(l, _)| l == local) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        self.conns.insert(
            (local, peer_port),
            Conn::new(
                stream,
                ConnState::LocalInit {
                    request_sent: false,
                },
            ),
        );
        true
    }

    fn queue_reset(&mut self, hdr: &PacketHeader) {
        if hdr.op == OP_RST || self.resets.len() >= MAX_PENDING_RESETS {
            return;
        }
        self.resets.push_back(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    /// Handles one packet from the guest.
    fn handle_tx(&mut self, hdr: PacketHeader, payload: Vec<u8>) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(?hdr, "vsock: packet with a foreign CID dropped");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            self.queue_reset(&hdr);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_REQUEST {
            self.guest_connect(&hdr, key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.queue_reset(&hdr);
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (hdr.op, c.state) {
            (OP_RST, _) => {
                self.conns.remove(&key);
            }
            (OP_RESPONSE, ConnState::LocalInit { .. }) => {
                let ok = format!("OK {}\n", key.0);
                match c.stream.write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => {
                        c.state = ConnState::Established;
                        self.stats.connections += 1;
                    }
                    _ => c.need_rst = true,
                }
            }
            (OP_RW, ConnState::Established) => {
                if c.peer_shutdown & SHUTDOWN_SEND != 0
                    || c.to_host.len() + payload.len() > CONN_BUF_SIZE as usize
                {
                    tracing::warn!(
                        host_port = key.0,
                        guest_port = key.1,
                        "vsock: guest sent beyond its credit or after shutdown; reset"
                    );
                    c.need_rst = true;
                    return;
                }
                self.stats.tx_bytes += payload.len() as u64;
                c.to_host.extend(payload);
                if c.flush_to_host() {
                    c.need_rst = true;
                }
            }
            (OP_CREDIT_REQUEST, ConnState::Established) => c.need_credit_update = true,
            (OP_CREDIT_UPDATE, ConnState::Established) => {}
            (OP_SHUTDOWN, ConnState::Established) => {
                c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both directions closed: deliver what we can, then reset.
                    let _ = c.flush_to_host();
                    c.need_rst = true;
                } else if c.flush_to_host() {
                    c.need_rst = true;
                }
            }
            _ => {
                tracing::debug!(?hdr, "vsock: unexpected packet; connection reset");
                c.need_rst = true;
            }
        }
    }

    fn guest_connect(&mut self, hdr: &PacketHeader, key: ConnKey) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.queue_reset(hdr);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), hdr.dst_port);
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            Ok(_) | Err(_) => {
                tracing::debug!(path, "vsock: guest connect refused: no host listener");
                self.queue_reset(hdr);
                return;
            }
        };
        let mut c = Conn::new(stream, ConnState::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.need_response = true;
        self.conns.insert(key, c);
        self.stats.connections += 1;
    }

    fn header_for(&self, key: ConnKey, c: &Conn, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: c.fwd_cnt.0,
        }
    }

    /// The next packet due to the guest with room for `room` payload bytes;
    /// updates the connection as if it was sent.
    fn next_rx_packet(&mut self, room: usize) -> Option<(PacketHeader, Vec<u8>)> {
        if let Some(rst) = self.resets.pop_front() {
            self.stats.resets_sent += 1;
            return Some((rst, Vec::new()));
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let c = &self.conns[&key];
            let rw = if c.state == ConnState::Established {
                c.to_guest.len().min(room).min(c.peer_credit() as usize)
            } else {
                0
            };
            let (op, payload) = if c.need_rst {
                (OP_RST, Vec::new())
            } else if c.state
                == (ConnState::LocalInit {
                    request_sent: false,
                })
            {
                (OP_REQUEST, Vec::new())
            } else if c.need_response {
                (OP_RESPONSE, Vec::new())
            } else if rw > 0 {
                (OP_RW, c.to_guest[..rw].to_vec())
            } else if c.need_shutdown && c.to_guest.is_empty() {
                (OP_SHUTDOWN, Vec::new())
            } else if c.need_credit_update {
                (OP_CREDIT_UPDATE, Vec::new())
            } else {
                continue;
            };
            let mut hdr = self.header_for(key, c, op);
            hdr.len = payload.len() as u32;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.fwd_cnt_sent = c.fwd_cnt;
            c.need_credit_update = false;
            match op {
                OP_RST => {
                    self.conns.remove(&key);
                    self.stats.resets_sent += 1;
                }
                OP_REQUEST => c.state = ConnState::LocalInit { request_sent: true },
                OP_RESPONSE => c.need_response = false,
                OP_RW => {
                    c.to_guest.drain(..payload.len());
                    c.rx_cnt += payload.len() as u32;
                    self.stats.rx_bytes += payload.len() as u64;
                }
                OP_SHUTDOWN => {
                    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    c.need_shutdown = false;
                }
                _ => {}
            }
            return Some((hdr, payload));
        }
        None
    }

    fn process_tx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(used),
                Err(QueueError::InvalidChain { head, reason }) => {
                    tracing::warn!(head, %reason, "virtio-vsock: malformed transmit chain");
                    self.stats.invalid_packets += 1;
                    q.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match parse_packet(mem, &chain)? {
                Ok((hdr, payload)) => self.handle_tx(hdr, payload),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-vsock: malformed packet");
                    self.stats.invalid_packets += 1;
                }
            }
            q.add_used(mem, chain.head, 0)?;
            used = true;
        }
    }

    fn process_rx(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            if !self.has_rx_work() {
                return Ok(used);
            }
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(used),
                Err(QueueError::InvalidChain { head, reason }) => {
                    tracing::warn!(head, %reason, "virtio-vsock: malformed receive chain");
                    self.stats.invalid_packets += 1;
                    q.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let room = chain.writable_len().saturating_sub(HDR_LEN as u64);
            if chain.writable_len() < HDR_LEN as u64 {
                self.stats.invalid_packets += 1;
                q.add_used(mem, chain.head, 0)?;
                used = true;
                continue;
            }
            let room = room.min(u64::from(MAX_PKT_PAYLOAD)) as usize;
            let Some((hdr, payload)) = self.next_rx_packet(room) else {
                // Nothing fits after all: hand the buffer back unused by
                // rewinding is not possible, so return it empty.
                q.add_used(mem, chain.head, 0)?;
                return Ok(true);
            };
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(&payload);
            let n = chain.write_all(mem, &bytes)?;
            q.add_used(mem, chain.head, n as u32)?;
            used = true;
        }
    }

    fn has_rx_work(&self) -> bool {
        !self.resets.is_empty()
            || self.conns.values().any(|c| {
                c.need_rst
                    || c.need_response
                    || c.need_credit_update
                    || (c.need_shutdown && c.to_guest.is_empty())
                    || c.state
                        == (ConnState::LocalInit {
                            request_sent: false,
                        })
                    || (!c.to_guest.is_empty()
                        && c.state == ConnState::Established
                        && c.peer_credit() > 0)
            })
    }

    fn process_event(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> Result<bool, QueueError> {
        if !self.reset_event_pending {
            return Ok(false);
        }
        let chain = match q.pop(mem) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(false),
            Err(QueueError::InvalidChain { head, .. }) => {
                self.stats.invalid_packets += 1;
                q.add_used(mem, head, 0)?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let n = chain.write_all(mem, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
        q.add_used(mem, chain.head, n as u32)?;
        if n == 4 {
            self.reset_event_pending = false;
        }
        Ok(true)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The socket file would make the next bind of this path fail.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn process(&mut self, mem: &GuestMemoryMmap, queues: &mut [Queue]) -> Result<bool, QueueError> {
        let mut used = false;
        let before = self.poll_signature();
        if let Some(q) = queues.get_mut(TX_QUEUE).filter(|q| q.ready) {
            used |= self.process_tx(mem, q)?;
        }
        if let Some(q) = queues.get_mut(EVENT_QUEUE).filter(|q| q.ready) {
            used |= self.process_event(mem, q)?;
        }
        if let Some(q) = queues.get_mut(RX_QUEUE).filter(|q| q.ready) {
            used |= self.process_rx(mem, q)?;
        }
        if self.poll_signature() != before {
            self.poke();
        }
        Ok(used)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.conns.clear();
        self.handshakes.clear();
        self.resets.clear();
        self.reset_event_pending = false;
    }
}

impl Vsock {
    /// What the muxer's poll set depends on, to tell it to rebuild only
    /// when needed.
    fn poll_signature(&self) -> Vec<(RawFd, bool, bool)> {
        let mut s: Vec<_> = self
            .conns
            .values()
            .map(|c| {
                (
                    c.stream.as_raw_fd(),
                    c.wants_host_read(),
                    !c.to_host.is_empty(),
                )
            })
            .collect();
        s.sort_unstable();
        s
    }
}

/// A vsock transport as placed on the MMIO bus.
pub type VsockTransport = Arc<Mutex<MmioTransport<Vsock>>>;

/// The running `vsock-mux` thread; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct Muxer {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("vsock-mux thread panicked");
        }
    }
}

/// Starts the named thread `vsock-mux`: it polls the device's host sockets
/// and lets the device move data whenever one is ready.
pub fn spawn_muxer(transport: VsockTransport) -> Result<Muxer, VsockError> {
    let wake = lock(&transport)
        .device()
        .wake
        .try_clone()
        .map_err(VsockError::Setup)?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("vsock-mux".into())
            .spawn(move || mux_loop(&transport, &stop))
            .map_err(VsockError::Setup)?
    };
    Ok(Muxer {
        stop,
        wake,
        thread: Some(thread),
    })
}

fn mux_loop(transport: &VsockTransport, stop: &AtomicBool) {
    loop {
        {
            let mut t = lock(transport);
            t.device_mut().clear_wake();
            if t.device_mut().host_io() {
                t.process();
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        let mut fds: Vec<libc::pollfd> = lock(transport)
            .device()
            .poll_set()
            .into_iter()
            .map(|(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid, exclusively borrowed array of
        // `fds.len()` pollfd structs for the duration of the call. The fds
        // may be closed by another thread meanwhile; poll then reports
        // POLLNVAL for them, which only makes us loop once more.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                tracing::error!(error = %e, "vsock-mux: poll failed; stopping");
                return;
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Waits until `fd` is readable (e.g. a device's interrupt eventfd, for a
/// host-side driver); `false` on timeout.
pub fn wait_readable(fd: &impl AsRawFd, timeout: std::time::Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid, exclusively borrowed pollfd for the duration
        // of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = PacketHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 80,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 17,
        };
        assert_eq!(PacketHeader::from_bytes(&h.to_bytes()), h);
        assert_eq!(&h.to_bytes()[16..20], &1234u32.to_le_bytes());
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect_line(b"connect 52"), None);
    }

    #[test]
    fn reserved_cids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            let e = Vsock::new(&VsockConfig {
                guest_cid: cid,
                uds_path: dir.path().join("v.sock"),
            })
            .unwrap_err();
            assert!(matches!(e, VsockError::ReservedCid(c) if c == cid));
        }
    }
}
