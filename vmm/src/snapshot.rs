//! Snapshots of a paused VM and restores (clones) from them.
//!
//! A snapshot is a directory with two files:
//!
//! * [`STATE_FILE`]: every piece of VM state KVM and our devices expose,
//!   in a versioned binary format:
//!
//!   ```text
//!   offset  size  field
//!   0       8     magic "SLUICEVM"
//!   8       4     format version (little endian), SNAPSHOT_VERSION
//!   12      8     body length in bytes
//!   20      4     CRC-32 (IEEE) of bytes 0..20 and of the body
//!   24      ...   body: memory layout, KVM clock, PIC master/slave, IOAPIC,
//!                 PIT, per vCPU {CPUID, MSRs (every one KVM_GET_MSR_INDEX_LIST
//!                 names that KVM let us read), regs, sregs, FPU, xsave, xcrs,
//!                 LAPIC, mp_state, vcpu events, debug regs}, serial UART,
//!                 virtio-mmio transport and queue indexes of the
//!                 virtio-console, virtio-vsock guest CID and transport
//!                 (version 2; vsock connections are not saved)
//!   ```
//!
//!   KVM structures are stored as their raw `repr(C)` bytes, each with a
//!   length prefix; a file from a build whose layouts differ fails with
//!   [`SnapshotError::Malformed`] (and the version number is bumped when we
//!   change the layout on purpose). A file that is truncated, corrupt or of
//!   another version is rejected before anything is restored.
//! * [`MEMORY_FILE`]: guest RAM, region after region, written sparsely
//!   (pages of zeros are holes).
//!
//! [`Snapshot::load`] reads and checks the state once; each
//! [`crate::VmBuilder::restore`] then maps the memory file `MAP_PRIVATE`:
//! clones share the page cache and copy a page only when they write it,
//! and never write to the file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vm_superio::serial::SerialState;

use crate::virtio::mmio::TransportState;
use crate::virtio::queue::QueueState;
use crate::vm::VmState;

/// First bytes of a state file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"SLUICEVM";
/// The state-file format this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 2;
/// Bytes before the body.
pub const HEADER_LEN: usize = 24;
/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "vm.mem";
/// Largest body accepted (a state file is a few tens of KiB per vCPU).
pub const MAX_BODY_LEN: u64 = 64 << 20;
/// How long a paused vCPU thread may take to answer a save request.
pub const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(10);

const PAGE: usize = 4096;

/// Errors taking, loading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with [`SNAPSHOT_MAGIC`].
    #[error("{path} is not a sluice VM snapshot (magic {found:02x?})")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first bytes.
        found: Vec<u8>,
    },
    /// The file has another format version.
    #[error(
        "{path} has snapshot format version {found}; this build reads version {supported} only"
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file is shorter than its header says.
    #[error("{path} is truncated: {what} needs {expected} bytes, the file has {found}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is cut off.
        what: &'static str,
        /// Bytes needed.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("{path} is corrupt: checksum {found:#010x}, header says {expected:#010x}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the contents.
        found: u32,
    },
    /// The body passed the checksum but does not decode (a layout this
    /// build does not know, or a writer bug).
    #[error("{path}: malformed snapshot: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The memory file does not match the state file.
    #[error("memory file {path} has {found} bytes; the snapshot's RAM is {expected} bytes")]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Bytes of RAM in the snapshot.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// Guest memory could not be mapped from the memory file.
    #[error("cannot map guest memory from {path}: {what}")]
    Mmap {
        /// The memory file.
        path: PathBuf,
        /// Cause.
        what: String,
    },
    /// A KVM ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Kvm {
        /// The ioctl.
        ioctl: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A KVM list (CPUID, MSRs) could not be built.
    #[error("cannot build the {what} list: {error:?}")]
    Fam {
        /// Which list.
        what: &'static str,
        /// Cause.
        error: vmm_sys_util::fam::Error,
    },
    /// Only paused (or never started) VMs can be snapshotted.
    #[error("cannot snapshot a VM that is {state:?}; pause it first")]
    InvalidState {
        /// The VM's state.
        state: VmState,
    },
    /// A vCPU thread did not answer.
    #[error("vCPU {vcpu} did not answer the save request within {timeout:?}")]
    VcpuTimeout {
        /// The vCPU.
        vcpu: u8,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vCPU thread has exited (the guest stopped it, or it failed), so
    /// its state cannot be read.
    #[error("vCPU {vcpu} has exited; its state cannot be saved")]
    VcpuExited {
        /// The vCPU.
        vcpu: u8,
    },
    /// The devices of the VM being restored do not match the snapshot's.
    #[error("the snapshot's devices do not match the restored VM: {0}")]
    Devices(String),
    /// A [`crate::vm::VmSnapshotter`] asked a VM whose run has ended (or
    /// did not answer in time); nothing was written.
    #[error("the VM's run did not take the snapshot: {why}")]
    NotRunning {
        /// What happened.
        why: String,
    },
    /// Pausing or resuming the VM around the snapshot failed.
    #[error("pausing or resuming the VM around the snapshot failed: {0}")]
    PauseResume(String),
}

fn kvm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { ioctl, source }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { op, path, source }
}

// ---------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected, as zlib's crc32).

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Running CRC-32: start with `!0`, feed bytes, finish with `!crc`.
fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32 (IEEE) of `parts` concatenated.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    !parts.iter().fold(!0, |c, p| crc32_update(c, p))
}

// ---------------------------------------------------------------------------
// Plain-old-data encoding of KVM structures.

/// # Safety
///
/// Implementors are `repr(C)` types without implicit padding for which
/// every bit pattern is a valid value, so they can be viewed as bytes and
/// built from arbitrary bytes.
unsafe trait Pod: Sized {}

// SAFETY: all of these are bindgen `repr(C)` structs of integers and
// integer arrays (kvm_irqchip: a union of such) with explicit padding
// fields; kvm-bindings derives zerocopy's IntoBytes + FromBytes for each of
// them under its `serde` feature, which proves the absence of implicit
// padding. kvm_fpu (no derive upstream) is 8 x 16 + 2 + 2 + 1 + 1 + 2 bytes
// (136, 8-aligned) then two u64, 16 x 16 bytes, two u32: 416 bytes with no
// gap, asserted below.
unsafe impl Pod for kvm_regs {}
// SAFETY: see above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: see above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: see above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: see above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: see above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: see above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: see above.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: see above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: see above.
unsafe impl Pod for kvm_clock_data {}
// SAFETY: see above.
unsafe impl Pod for kvm_cpuid_entry2 {}

const _: () = assert!(std::mem::size_of::<kvm_fpu>() == 416);

fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so all size_of::<T>() bytes behind
    // the reference are initialised; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn pod_from_bytes<T: Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), std::mem::size_of::<T>());
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: the destination is size_of::<T>() writable bytes that do not
    // overlap `bytes`, and any bit pattern is a valid `T: Pod`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len());
        v.assume_init()
    }
}

fn pod_zeroed<T: Pod>() -> T {
    // SAFETY: all-zero bytes are a valid `T: Pod`.
    unsafe { std::mem::zeroed() }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn pod<T: Pod>(&mut self, v: &T) {
        self.bytes(pod_bytes(v));
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "{what}: {n} bytes wanted at offset {}, body has {}",
                self.pos,
                self.buf.len()
            )),
        }
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self, what: &str) -> Result<bool, String> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("{what}: {v} is not a boolean")),
        }
    }
    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    /// A list count, checked against the bytes left (each item takes at
    /// least `min_item` bytes) so a bad count cannot make us allocate much.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize, String> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item) > self.buf.len() - self.pos {
            return Err(format!("{what}: count {n} exceeds the body"));
        }
        Ok(n)
    }
    fn pod<T: Pod>(&mut self, what: &str) -> Result<T, String> {
        let b = self.bytes(what)?;
        if b.len() != std::mem::size_of::<T>() {
            return Err(format!(
                "{what}: {} bytes stored, this build's layout has {}",
                b.len(),
                std::mem::size_of::<T>()
            ));
        }
        Ok(pod_from_bytes(b))
    }
}

// ---------------------------------------------------------------------------
// The state model.

/// One guest RAM region and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegionState {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// The state of one vCPU.
pub struct VcpuSnapshot {
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSR values: each MSR of `KVM_GET_MSR_INDEX_LIST` that KVM let us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs of the index list that `KVM_GET_MSRS` refused (not saved).
    pub unreadable_msrs: Vec<u32>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy view; xsave below is authoritative).
    pub fpu: kvm_fpu,
    /// The XSAVE area.
    pub xsave: Box<kvm_xsave>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMM.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("rip", &self.regs.rip)
            .field("cpuid_entries", &self.cpuid.len())
            .field("msrs", &self.msrs.len())
            .field("unreadable_msrs", &self.unreadable_msrs)
            .finish_non_exhaustive()
    }
}

/// The whole state of a paused VM except its RAM.
pub struct SnapshotState {
    /// Bytes of guest RAM.
    pub mem_size: u64,
    /// RAM regions and their place in the memory file.
    pub regions: Vec<MemoryRegionState>,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP` chip ids 0, 1, 2).
    pub irqchips: [kvm_irqchip; 3],
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// Each vCPU.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The COM1 UART, including unread input bytes.
    pub serial: SerialState,
    /// The virtio-console transport and its queues, if the VM had one.
    pub virtio_console: Option<TransportState>,
    /// The virtio-vsock device, if the VM had one. Its connections are
    /// host sockets and are not saved: a restored device sends the guest a
    /// transport-reset event.
    pub virtio_vsock: Option<VsockSnapshot>,
}

/// A virtio-vsock device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSnapshot {
    /// The guest's context id (the restored VM must use the same).
    pub guest_cid: u64,
    /// Transport registers and queues.
    pub transport: TransportState,
}

impl std::fmt::Debug for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotState")
            .field("mem_size", &self.mem_size)
            .field("regions", &self.regions)
            .field("vcpus", &self.vcpus)
            .field("virtio_console", &self.virtio_console)
            .field("virtio_vsock", &self.virtio_vsock)
            .finish_non_exhaustive()
    }
}

fn encode_vcpu(w: &mut Writer, v: &VcpuSnapshot) {
    w.u32(v.cpuid.len() as u32);
    for e in &v.cpuid {
        w.pod(e);
    }
    w.u32(v.msrs.len() as u32);
    for m in &v.msrs {
        w.u32(m.index);
        w.u64(m.data);
    }
    w.u32(v.unreadable_msrs.len() as u32);
    for &i in &v.unreadable_msrs {
        w.u32(i);
    }
    w.pod(&v.regs);
    w.pod(&v.sregs);
    w.pod(&v.fpu);
    w.pod(v.xsave.as_ref());
    w.pod(&v.xcrs);
    w.pod(&v.lapic);
    w.pod(&v.mp_state);
    w.pod(&v.events);
    w.pod(&v.debugregs);
}

fn decode_vcpu(r: &mut Reader<'_>) -> Result<VcpuSnapshot, String> {
    let n = r.count("cpuid count", 4)?;
    let cpuid = (0..n)
        .map(|_| r.pod("cpuid entry"))
        .collect::<Result<_, _>>()?;
    let n = r.count("msr count", 12)?;
    let mut msrs = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.u32("msr index")?;
        let data = r.u64("msr value")?;
        msrs.push(kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
    }
    let n = r.count("unreadable msr count", 4)?;
    let unreadable_msrs = (0..n)
        .map(|_| r.u32("unreadable msr"))
        .collect::<Result<_, _>>()?;
    Ok(VcpuSnapshot {
        cpuid,
        msrs,
        unreadable_msrs,
        regs: r.pod("regs")?,
        sregs: r.pod("sregs")?,
        fpu: r.pod("fpu")?,
        xsave: Box::new(r.pod("xsave")?),
        xcrs: r.pod("xcrs")?,
        lapic: r.pod("lapic")?,
        mp_state: r.pod("mp_state")?,
        events: r.pod("vcpu events")?,
        debugregs: r.pod("debugregs")?,
    })
}

fn encode_queue(w: &mut Writer, q: &QueueState) {
    w.u16(q.max_size);
    w.u16(q.size);
    w.u8(u8::from(q.ready));
    w.u64(q.desc_table);
    w.u64(q.avail_ring);
    w.u64(q.used_ring);
    w.u16(q.next_avail);
    w.u16(q.next_used);
}

fn decode_queue(r: &mut Reader<'_>) -> Result<QueueState, String> {
    Ok(QueueState {
        max_size: r.u16("queue max size")?,
        size: r.u16("queue size")?,
        ready: r.bool("queue ready")?,
        desc_table: r.u64("queue descriptor table")?,
        avail_ring: r.u64("queue available ring")?,
        used_ring: r.u64("queue used ring")?,
        next_avail: r.u16("queue next available")?,
        next_used: r.u16("queue next used")?,
    })
}

fn encode_transport(w: &mut Writer, t: Option<&TransportState>) {
    let Some(t) = t else {
        w.u8(0);
        return;
    };
    w.u8(1);
    w.u32(t.device_type);
    w.u32(t.queue_sel);
    w.u32(t.device_features_sel);
    w.u32(t.driver_features_sel);
    w.u64(t.driver_features);
    w.u32(t.status);
    w.u32(t.interrupt_status);
    w.u32(t.config_generation);
    w.u8(u8::from(t.activated));
    w.u32(t.queues.len() as u32);
    for q in &t.queues {
        encode_queue(w, q);
    }
}

fn decode_transport(r: &mut Reader<'_>, what: &str) -> Result<Option<TransportState>, String> {
    if !r.bool(&format!("{what} present"))? {
        return Ok(None);
    }
    let device_type = r.u32("virtio device type")?;
    let queue_sel = r.u32("queue select")?;
    let device_features_sel = r.u32("device features select")?;
    let driver_features_sel = r.u32("driver features select")?;
    let driver_features = r.u64("driver features")?;
    let status = r.u32("device status")?;
    let interrupt_status = r.u32("interrupt status")?;
    let config_generation = r.u32("config generation")?;
    let activated = r.bool("activated")?;
    let n = r.count("queue count", 29)?;
    let queues = (0..n).map(|_| decode_queue(r)).collect::<Result<_, _>>()?;
    Ok(Some(TransportState {
        device_type,
        queue_sel,
        device_features_sel,
        driver_features_sel,
        driver_features,
        status,
        interrupt_status,
        config_generation,
        activated,
        queues,
    }))
}

impl SnapshotState {
    /// The body of the state file.
    fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.mem_size);
        w.u32(self.regions.len() as u32);
        for r in &self.regions {
            w.u64(r.guest_addr);
            w.u64(r.len);
            w.u64(r.file_offset);
        }
        w.pod(&self.clock);
        for chip in &self.irqchips {
            w.pod(chip);
        }
        w.pod(&self.pit);
        w.u32(self.vcpus.len() as u32);
        for v in &self.vcpus {
            encode_vcpu(&mut w, v);
        }
        let s = &self.serial;
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            w.u8(b);
        }
        w.bytes(&s.in_buffer);
        encode_transport(&mut w, self.virtio_console.as_ref());
        match &self.virtio_vsock {
            None => w.u8(0),
            Some(v) => {
                w.u8(1);
                w.u64(v.guest_cid);
                encode_transport(&mut w, Some(&v.transport));
            }
        }
        w.0
    }

    fn decode_body(body: &[u8]) -> Result<Self, String> {
        let mut r = Reader { buf: body, pos: 0 };
        let mem_size = r.u64("memory size")?;
        let n = r.count("region count", 24)?;
        let mut regions = Vec::with_capacity(n);
        for _ in 0..n {
            regions.push(MemoryRegionState {
                guest_addr: r.u64("region address")?,
                len: r.u64("region length")?,
                file_offset: r.u64("region file offset")?,
            });
        }
        if regions.iter().map(|r| r.len).sum::<u64>() != mem_size {
            return Err(format!(
                "regions {regions:?} do not add up to {mem_size} bytes"
            ));
        }
        let clock = r.pod("kvm clock")?;
        let irqchips = [r.pod("PIC master")?, r.pod("PIC slave")?, r.pod("IOAPIC")?];
        let pit = r.pod("PIT")?;
        let n = r.count("vCPU count", 1)?;
        if n == 0 || n >= usize::from(u8::MAX) {
            return Err(format!("{n} vCPUs"));
        }
        let vcpus = (0..n)
            .map(|_| decode_vcpu(&mut r))
            .collect::<Result<_, _>>()?;
        let mut s = [0u8; 9];
        for b in &mut s {
            *b = r.u8("serial register")?;
        }
        let serial = SerialState {
            baud_divisor_low: s[0],
            baud_divisor_high: s[1],
            interrupt_enable: s[2],
            interrupt_identification: s[3],
            line_control: s[4],
            line_status: s[5],
            modem_control: s[6],
            modem_status: s[7],
            scratch: s[8],
            in_buffer: r.bytes("serial input")?.to_vec(),
        };
        let virtio_console = decode_transport(&mut r, "virtio-console")?;
        let virtio_vsock = if r.bool("virtio-vsock present")? {
            let guest_cid = r.u64("vsock guest CID")?;
            let transport = decode_transport(&mut r, "virtio-vsock")?
                .ok_or_else(|| "virtio-vsock without its transport".to_string())?;
            Some(VsockSnapshot {
                guest_cid,
                transport,
            })
        } else {
            None
        };
        if r.pos != body.len() {
            return Err(format!(
                "{} bytes left over after the last field",
                body.len() - r.pos
            ));
        }
        Ok(Self {
            mem_size,
            regions,
            clock,
            irqchips,
            pit,
            vcpus,
            serial,
            virtio_console,
            virtio_vsock,
        })
    }

    /// The complete state file: header and body.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut head = Vec::with_capacity(HEADER_LEN + body.len());
        head.extend_from_slice(&SNAPSHOT_MAGIC);
        head.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        head.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let crc = crc32(&[&head, &body]);
        head.extend_from_slice(&crc.to_le_bytes());
        head.extend_from_slice(&body);
        head
    }

    /// Checks and decodes a state file read from `path` (for messages).
    /// Magic, version, length and checksum are all checked before the body
    /// is decoded.
    pub fn decode(path: &Path, file: &[u8]) -> Result<Self, SnapshotError> {
        let path_buf = || path.to_path_buf();
        let magic_len = file.len().min(SNAPSHOT_MAGIC.len());
        if file[..magic_len] != SNAPSHOT_MAGIC[..magic_len] {
            return Err(SnapshotError::BadMagic {
                path: path_buf(),
                found: file[..magic_len].to_vec(),
            });
        }
        if file.len() < HEADER_LEN {
            return Err(SnapshotError::Truncated {
                path: path_buf(),
                what: "the header",
                expected: HEADER_LEN as u64,
                found: file.len() as u64,
            });
        }
        let le32 =
            |at: usize| u32::from_le_bytes([file[at], file[at + 1], file[at + 2], file[at + 3]]);
        let version = le32(8);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path_buf(),
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&file[12..20]);
        let body_len = u64::from_le_bytes(len);
        if body_len > MAX_BODY_LEN {
            return Err(SnapshotError::Malformed {
                path: path_buf(),
                what: format!("body length {body_len} exceeds {MAX_BODY_LEN}"),
            });
        }
        let expected_len = HEADER_LEN as u64 + body_len;
        if (file.len() as u64) < expected_len {
            return Err(SnapshotError::Truncated {
                path: path_buf(),
                what: "the body",
                expected: expected_len,
                found: file.len() as u64,
            });
        }
        if (file.len() as u64) > expected_len {
            return Err(SnapshotError::Malformed {
                path: path_buf(),
                what: format!("{} bytes after the body", file.len() as u64 - expected_len),
            });
        }
        let body = &file[HEADER_LEN..];
        let expected = le32(20);
        let found = crc32(&[&file[..20], body]);
        if found != expected {
            return Err(SnapshotError::Checksum {
                path: path_buf(),
                expected,
                found,
            });
        }
        Self::decode_body(body).map_err(|what| SnapshotError::Malformed {
            path: path_buf(),
            what,
        })
    }
}

// ---------------------------------------------------------------------------
// vCPU and VM state through KVM.

fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), SnapshotError> {
    let mut values = Vec::with_capacity(index.len());
    let mut unreadable = Vec::new();
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|error| SnapshotError::Fam { what: "MSR", error })?;
        // KVM_GET_MSRS stops at the first MSR it refuses.
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        values.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            unreadable.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok((values, unreadable))
}

/// Sets `entries`, skipping those KVM refuses; returns the refused indexes.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, SnapshotError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let msrs =
            Msrs::from_entries(chunk).map_err(|error| SnapshotError::Fam { what: "MSR", error })?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            refused.push(chunk[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(refused)
}

/// Reads the state of a vCPU that is not running (its thread is between
/// two `KVM_RUN`s). `msr_index` is `KVM_GET_MSR_INDEX_LIST`.
pub fn save_vcpu(fd: &VcpuFd, msr_index: &[u32]) -> Result<VcpuSnapshot, SnapshotError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let (msrs, unreadable_msrs) = read_msrs(fd, msr_index)?;
    if !unreadable_msrs.is_empty() {
        tracing::debug!(?unreadable_msrs, "KVM refused to read some listed MSRs");
    }
    Ok(VcpuSnapshot {
        cpuid,
        msrs,
        unreadable_msrs,
        regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        fpu: fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?,
        xsave: Box::new(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?),
        xcrs: fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
        lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
    })
}

/// Restores a vCPU saved by [`save_vcpu`] on a new, not yet run vCPU;
/// returns the MSRs KVM refused to set (logged, not fatal: they were in
/// KVM's list but this vCPU's CPUID does not expose them).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<Vec<u32>, SnapshotError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|error| SnapshotError::Fam {
        what: "CPUID",
        error,
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    fd.set_fpu(&s.fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (the 4 KiB legacy area that
    // KVM_GET_XSAVE filled); KVM_SET_XSAVE reads exactly that many bytes.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let refused = write_msrs(fd, &s.msrs)?;
    if !refused.is_empty() {
        tracing::debug!(?refused, "KVM refused to restore some MSRs");
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

/// Reads the VM-wide KVM state: clock, PICs, IOAPIC, PIT.
pub(crate) fn save_vm(
    vm_fd: &VmFd,
) -> Result<(kvm_clock_data, [kvm_irqchip; 3], kvm_pit_state2), SnapshotError> {
    let mut chips: [kvm_irqchip; 3] = [pod_zeroed(), pod_zeroed(), pod_zeroed()];
    for (id, chip) in chips.iter_mut().enumerate() {
        chip.chip_id = id as u32;
        vm_fd
            .get_irqchip(chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    }
    let pit = vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    let clock = vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    Ok((clock, chips, pit))
}

/// Restores the VM-wide state on a VM whose irqchip and PIT exist.
pub(crate) fn restore_vm(vm_fd: &VmFd, s: &SnapshotState) -> Result<(), SnapshotError> {
    vm_fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    for chip in &s.irqchips {
        vm_fd
            .set_irqchip(chip)
            .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    // The guest's clock continues from the snapshot: no KVM_CLOCK_REALTIME
    // adjustment for the time the snapshot sat on disk.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm_fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Memory.

/// Writes guest RAM to `path`, region after region, leaving pages of zeros
/// as holes; returns the layout for the state file. The data goes to a
/// new file renamed over `path` at the end: clones of an earlier snapshot
/// may have the old file mapped `MAP_PRIVATE`, and their pages not yet
/// copied would change if the file were rewritten in place.
pub(crate) fn write_memory(
    mem: &GuestMemoryMmap,
    final_path: &Path,
) -> Result<Vec<MemoryRegionState>, SnapshotError> {
    let tmp = final_path.with_extension("mem.tmp");
    let path = tmp.as_path();
    let file = File::create(path).map_err(io_err("create", path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err("resize", path))?;
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for region in mem.iter() {
        let base = region.start_addr();
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(base.0 + done))
                .map_err(|e| SnapshotError::Mmap {
                    path: path.to_path_buf(),
                    what: e.to_string(),
                })?;
            // Write runs of non-zero pages.
            let mut page = 0;
            while page < n {
                let end = (page + PAGE).min(n);
                if chunk[page..end].iter().all(|&b| b == 0) {
                    page = end;
                    continue;
                }
                let mut run_end = end;
                while run_end < n {
                    let next = (run_end + PAGE).min(n);
                    if chunk[run_end..next].iter().all(|&b| b == 0) {
                        break;
                    }
                    run_end = next;
                }
                file.write_all_at(&chunk[page..run_end], file_offset + done + page as u64)
                    .map_err(io_err("write", path))?;
                page = run_end;
            }
            done += n as u64;
        }
        regions.push(MemoryRegionState {
            guest_addr: base.0,
            len,
            file_offset,
        });
        file_offset += len;
    }
    file.sync_all().map_err(io_err("sync", path))?;
    std::fs::rename(path, final_path).map_err(io_err("rename", path))?;
    Ok(regions)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash never leaves a half-written state file under the final name.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_data().map_err(io_err("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", &tmp))
}

/// What [`crate::Vm::snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file.
    pub memory_path: PathBuf,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// MSRs of KVM's list that could not be read, per vCPU.
    pub unreadable_msrs: Vec<Vec<u32>>,
}

/// A loaded, checked snapshot, ready to restore any number of clones.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    memory_path: PathBuf,
    memory: Arc<File>,
    state: SnapshotState,
}

impl Snapshot {
    /// Reads `dir`'s state file, checks magic, version, length and
    /// checksum, decodes it, and opens the memory file (which must be as
    /// large as the snapshot's RAM).
    pub fn load(dir: &Path) -> Result<Self, SnapshotError> {
        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path).map_err(io_err("read", &state_path))?;
        let state = SnapshotState::decode(&state_path, &bytes)?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(io_err("open", &memory_path))?;
        let found = memory
            .metadata()
            .map_err(io_err("stat", &memory_path))?
            .len();
        if found != state.mem_size {
            return Err(SnapshotError::MemorySize {
                path: memory_path,
                expected: state.mem_size,
                found,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            memory_path,
            memory: Arc::new(memory),
            state,
        })
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The decoded state.
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    /// Maps the memory file copy-on-write (`MAP_PRIVATE`): reads come from
    /// the page cache shared by every clone, a write copies the page for
    /// this mapping only, and the file never changes.
    pub fn map_memory(&self) -> Result<GuestMemoryMmap, SnapshotError> {
        let mmap_err = |what: String| SnapshotError::Mmap {
            path: self.memory_path.clone(),
            what,
        };
        let mut regions = Vec::with_capacity(self.state.regions.len());
        for r in &self.state.regions {
            let mapping = MmapRegion::build(
                Some(FileOffset::from_arc(self.memory.clone(), r.file_offset)),
                r.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| mmap_err(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| mmap_err(format!("region {r:?} overflows the address space")))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| mmap_err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> SnapshotState {
        let regs = kvm_regs {
            rip: 0x10_0042,
            rcx: 7,
            ..Default::default()
        };
        let mut xsave: kvm_xsave = pod_zeroed();
        xsave.region[3] = 0xabcd;
        let vcpu = VcpuSnapshot {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x1234,
                ..Default::default()
            }],
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            unreadable_msrs: vec![0x4b56_4d00],
            regs,
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            xsave: Box::new(xsave),
            xcrs: kvm_xcrs::default(),
            lapic: pod_zeroed(),
            mp_state: kvm_mp_state::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
        };
        let mut chips: [kvm_irqchip; 3] = [pod_zeroed(), pod_zeroed(), pod_zeroed()];
        for (i, c) in chips.iter_mut().enumerate() {
            c.chip_id = i as u32;
        }
        SnapshotState {
            mem_size: 16 << 20,
            regions: vec![MemoryRegionState {
                guest_addr: 0,
                len: 16 << 20,
                file_offset: 0,
            }],
            clock: kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
            irqchips: chips,
            pit: kvm_pit_state2::default(),
            vcpus: vec![vcpu],
            serial: SerialState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 2,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: b"typed".to_vec(),
            },
            virtio_console: Some(TransportState {
                device_type: 3,
                queue_sel: 1,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 1 << 32,
                status: 0xf,
                interrupt_status: 1,
                config_generation: 0,
                activated: true,
                queues: vec![QueueState {
                    max_size: 256,
                    size: 16,
                    ready: true,
                    desc_table: 0x4_0000,
                    avail_ring: 0x4_1000,
                    used_ring: 0x4_2000,
                    next_avail: 5,
                    next_used: 4,
                }],
            }),
            virtio_vsock: Some(VsockSnapshot {
                guest_cid: 7,
                transport: TransportState {
                    device_type: 19,
                    queue_sel: 2,
                    device_features_sel: 1,
                    driver_features_sel: 0,
                    driver_features: 1 << 32,
                    status: 0xf,
                    interrupt_status: 0,
                    config_generation: 0,
                    activated: true,
                    queues: Vec::new(),
                },
            }),
        }
    }

    const P: &str = "/snap/vm.state";

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
    }

    #[test]
    fn state_round_trips() {
        let s = sample_state();
        let file = s.encode();
        assert_eq!(&file[..8], b"SLUICEVM");
        let d = SnapshotState::decode(Path::new(P), &file).unwrap();
        assert_eq!(d.vcpus[0].regs, s.vcpus[0].regs);
        assert_eq!(d.vcpus[0].xsave.region[3], 0xabcd);
        assert_eq!(d.vcpus[0].cpuid[0].eax, 0x1234);
        assert_eq!(d.vcpus[0].msrs[0].data, 99);
        assert_eq!(d.vcpus[0].unreadable_msrs, vec![0x4b56_4d00]);
        assert_eq!(d.clock.clock, 123_456);
        assert_eq!(d.irqchips[2].chip_id, 2);
        assert_eq!(d.serial, s.serial);
        assert_eq!(d.virtio_console, s.virtio_console);
        assert_eq!(d.virtio_vsock, s.virtio_vsock);
        assert_eq!(d.regions, s.regions);
        // Deterministic: encoding the decoded state gives the same bytes.
        assert_eq!(d.encode(), file);
    }

    #[test]
    fn every_flipped_body_byte_is_a_checksum_error() {
        let file = sample_state().encode();
        // Every 97th byte, to keep the test fast; the CRC catches any
        // single-byte change.
        for at in (HEADER_LEN..file.len()).step_by(97) {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(
                    SnapshotState::decode(Path::new(P), &bad),
                    Err(SnapshotError::Checksum { .. })
                ),
                "byte {at}"
            );
        }
        // The length field is covered too: shrinking it is a checksum error
        // or a "bytes after the body" error, never a decode.
        let mut bad = file.clone();
        bad[12] ^= 0x01;
        assert!(SnapshotState::decode(Path::new(P), &bad).is_err());
    }

    #[test]
    fn truncated_files_are_rejected() {
        let file = sample_state().encode();
        for len in [0, 5, 8, 20, HEADER_LEN, HEADER_LEN + 10, file.len() - 1] {
            match SnapshotState::decode(Path::new(P), &file[..len]) {
                Err(SnapshotError::Truncated { found, .. }) => assert_eq!(found, len as u64),
                other => panic!("length {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_magic_and_version_are_rejected() {
        let file = sample_state().encode();
        let mut bad = file.clone();
        bad[0] = b'X';
        assert!(matches!(
            SnapshotState::decode(Path::new(P), &bad),
            Err(SnapshotError::BadMagic { .. })
        ));
        let mut bad = file.clone();
        // Version 1 (before virtio-vsock was saved) is refused.
        bad[8..12].copy_from_slice(&1u32.to_le_bytes());
        match SnapshotState::decode(Path::new(P), &bad) {
            Err(e @ SnapshotError::UnsupportedVersion { .. }) => {
                assert!(matches!(
                    e,
                    SnapshotError::UnsupportedVersion {
                        found: 1,
                        supported: SNAPSHOT_VERSION,
                        ..
                    }
                ));
                assert!(e.to_string().contains("version 1"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let mut long = file.clone();
        long.push(0);
        assert!(matches!(
            SnapshotState::decode(Path::new(P), &long),
            Err(SnapshotError::Malformed { .. })
        ));
    }

    #[test]
    fn a_body_with_a_valid_checksum_but_a_bad_layout_is_malformed() {
        // A writer bug or another layout: the checksum passes, decoding fails.
        let mut w = Writer::default();
        w.u64(16 << 20);
        w.u32(1);
        w.u64(0);
        w.u64(16 << 20);
        w.u64(0);
        w.bytes(&[0u8; 3]); // a clock of the wrong size
        let body = w.0;
        let mut file = Vec::new();
        file.extend_from_slice(&SNAPSHOT_MAGIC);
        file.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let crc = crc32(&[&file, &body]);
        file.extend_from_slice(&crc.to_le_bytes());
        file.extend_from_slice(&body);
        match SnapshotState::decode(Path::new(P), &file) {
            Err(SnapshotError::Malformed { what, .. }) => {
                assert!(what.contains("kvm clock"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }
}
