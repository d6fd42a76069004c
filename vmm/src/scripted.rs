//! The scripted tiny guest: a hand-written program that stands in for the
//! guest agent on the virtio-console agent channel, for tests and
//! benchmarks of the host side on hosts whose `/dev/kvm` cannot boot Linux.
//!
//! It sets up the virtio-console (receive queue 0 with [`QSIZE`] buffers of
//! [`RX_BUF_LEN`] bytes at [`RX_BUFS`] posted up front, transmit queue 1),
//! then polls the receive ring: each time the host's bytes land in a
//! receive buffer it publishes the next transmit chain of its script (laid
//! out in guest memory by [`scripted_vm`]; a chain may point into a
//! receive buffer, so the host gets back what the guest received). Past
//! the script it does what [`Then`] says. Its state is all in guest
//! memory, so a snapshot of it taken between two steps restores into a
//! clone that plays the rest of the script.

use crate::asm::Asm;
use crate::memory::VIRTIO_MMIO_BASE;
use crate::{Boot, VmBuilder, VmConfig};

const RX_DESC: u64 = 0x40000;
const RX_AVAIL: u64 = 0x41000;
const RX_USED: u64 = 0x42000;
const TX_DESC: u64 = 0x44000;
const TX_AVAIL: u64 = 0x45000;
const TX_USED: u64 = 0x46000;
const SEEN: u64 = 0x48000;
const COUNTER: u64 = 0x48010;
const IDTR: u64 = 0x2000;
/// Guest address of the first receive buffer (buffer `n` is at
/// `RX_BUFS + n * RX_BUF_LEN`).
pub const RX_BUFS: u64 = 0x30_0000;
/// Bytes per receive buffer.
pub const RX_BUF_LEN: u32 = 0x1000;
const FRAMES: u64 = 0x40_0000;
/// Entries per virtqueue (and so at most `QSIZE - 1` script steps).
pub const QSIZE: u16 = 16;

/// What the guest does once its script is played.
#[derive(Debug, Clone, Copy)]
pub enum Then {
    /// Spin forever (the host's timeout must stop it).
    Spin,
    /// Reset the machine through the i8042.
    Reset,
    /// `ud2` with an empty IDT: a triple fault.
    TripleFault,
}

/// One part of a transmitted chain.
#[derive(Debug, Clone)]
pub enum Part {
    /// These bytes.
    Bytes(Vec<u8>),
    /// The first `len` bytes of receive buffer `n` (what the host's `n`th
    /// write put there).
    Received {
        /// The receive buffer.
        n: u64,
        /// Bytes of it.
        len: u32,
    },
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// The guest program: `console` written to the serial port, virtio-console set-up, then a loop that waits for the
/// receive ring's used index to move and, each time, publishes the next
/// transmit chain (or, past the script, does `then`).
pub fn guest_code(then: Then, console: &[u8]) -> Vec<u8> {
    let r = |off: u64| VIRTIO_MMIO_BASE + off;
    let mut a = Asm::new()
        .print(0x3f8, console)
        .mov_rax(IDTR)
        .lidt_at_rax()
        .write32(r(0x70), 0)
        .write32(r(0x70), 3)
        .write32(r(0x24), 1)
        .write32(r(0x20), 1) // VIRTIO_F_VERSION_1
        .write32(r(0x24), 0)
        .write32(r(0x20), 0)
        .write32(r(0x70), 0xb);
    for (q, (d, av, u)) in [(RX_DESC, RX_AVAIL, RX_USED), (TX_DESC, TX_AVAIL, TX_USED)]
        .into_iter()
        .enumerate()
    {
        a = a
            .write32(r(0x30), q as u32)
            .write32(r(0x38), u32::from(QSIZE))
            .write32(r(0x80), d as u32)
            .write32(r(0x84), 0)
            .write32(r(0x90), av as u32)
            .write32(r(0x94), 0)
            .write32(r(0xa0), u as u32)
            .write32(r(0xa4), 0)
            .write32(r(0x44), 1);
    }
    let a = a.write32(r(0x70), 0xf).write32(r(0x50), 0);
    let top = a.here();
    // Publish the next transmit chain and notify transmitq0.
    let transmit = Asm::new()
        .mov_rax(TX_AVAIL + 2)
        .raw(&[0x66, 0x83, 0x00, 0x01]) // add word [rax], 1
        .write32(r(0x50), 1)
        .finish();
    let a = a
        .mov_rax(RX_USED + 2)
        .raw(&[0x0f, 0xb7, 0x08]) // movzx ecx, word [rax]
        .mov_rax(SEEN)
        .raw(&[0x66, 0x39, 0x08]) // cmp word [rax], cx
        .jz(top)
        .raw(&[0x66, 0x89, 0x08]) // mov word [rax], cx
        .mov_rax(COUNTER)
        .raw(&[0x80, 0x28, 0x01]) // sub byte [rax], 1
        .raw(&[0x72, (transmit.len() + 2) as u8]) // jb past the script
        .raw(&transmit);
    let a = a.jmp(top);
    match then {
        Then::Spin => a.spin(),
        Then::Reset => a.i8042_reset().spin(),
        Then::TripleFault => a.ud2().spin(),
    }
    .finish()
}

/// A VM running the scripted guest: `script[k]` is transmitted after the
/// host's `k`th write.
pub fn scripted_vm(
    config: VmConfig,
    script: &[Vec<Part>],
    then: Then,
    console: &[u8],
) -> VmBuilder {
    assert!(script.len() < usize::from(QSIZE));
    let mut b = VmBuilder::new(config, Boot::Code(guest_code(then, console)))
        .guest_write(IDTR, &[0u8; 10])
        .guest_write(COUNTER, &[script.len() as u8]);
    // Every receive buffer posted up front.
    for i in 0..u64::from(QSIZE) {
        let d = desc(RX_BUFS + i * u64::from(RX_BUF_LEN), RX_BUF_LEN, 2, 0);
        b = b
            .guest_write(RX_DESC + 16 * i, &d)
            .guest_write(RX_AVAIL + 4 + 2 * i, &(i as u16).to_le_bytes());
    }
    b = b.guest_write(RX_AVAIL + 2, &QSIZE.to_le_bytes());
    // Transmit chains: the ring lists their heads; the guest moves the index.
    let mut next_desc = 0u16;
    let mut data = FRAMES;
    for (k, chain) in script.iter().enumerate() {
        let head = next_desc;
        for (j, part) in chain.iter().enumerate() {
            let (addr, len) = match part {
                Part::Bytes(bytes) => {
                    b = b.guest_write(data, bytes);
                    let at = data;
                    data += (bytes.len() as u64).next_multiple_of(64).max(64);
                    (at, bytes.len() as u32)
                }
                Part::Received { n, len } => (RX_BUFS + n * u64::from(RX_BUF_LEN), *len),
            };
            let last = j + 1 == chain.len();
            let flags = if last { 0 } else { 1 }; // VIRTQ_DESC_F_NEXT
            b = b.guest_write(
                TX_DESC + 16 * u64::from(next_desc),
                &desc(addr, len, flags, next_desc + 1),
            );
            next_desc += 1;
        }
        b = b.guest_write(TX_AVAIL + 4 + 2 * k as u64, &head.to_le_bytes());
    }
    b
}
