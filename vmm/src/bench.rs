//! Measurements for `sluice bench vm` and `benches/vm.rs`: tiny-guest VM
//! create-to-first-exit, port-exit round trip, virtqueue throughput,
//! virtio-vsock stream throughput against a Unix socket pair, and
//! snapshot restore ([`snapshot_restore`]: restore-to-running next to a
//! fresh boot of the same guest, clones per second, memory per idle clone).

use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::asm::Asm;
use crate::devices::BusDevice;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::virtio::console::{ByteQueue, Console, ConsoleOutput, TX_QUEUE};
use crate::virtio::{Queue, QueueError, VirtioDevice};
use crate::{Boot, ExitReason, Vm, VmBuilder, VmConfig, VmError};

/// The port tiny benchmark guests write to.
pub const BENCH_PORT: u64 = 0x510;

/// [`sum_guest`] writes its loop counter (`out dx, eax`) here each round.
pub const SUM_PROGRESS_PORT: u16 = 0x520;
/// [`sum_guest`] writes the low 32 bits of its identity seed here at the end.
pub const SUM_SEED_PORT: u16 = 0x521;
/// [`sum_guest`] writes the low 32 bits of its sum here, then resets.
pub const SUM_RESULT_PORT: u16 = 0x522;
/// Port range to claim for [`sum_guest`]'s three ports (its 4-byte writes
/// to the last one end at offset 6).
pub const SUM_PORTS_LEN: u64 = 8;
/// Where [`sum_guest`] reads its identity seed (a u64) after its loop: a
/// clone gets its own with [`crate::VmBuilder::guest_write`].
pub const SUM_SEED_ADDR: u64 = 0x5000;
/// Where [`sum_guest`] stores the seed it read (u64) and its sum (u64, +8).
pub const SUM_OUT_ADDR: u64 = 0x6000;

/// A tiny guest that sums `n + (n-1) + ... + 1` in RBX, writing the loop
/// counter to [`SUM_PROGRESS_PORT`] every round (so it can be paused and
/// snapshotted mid-way and its progress followed); then it reads its
/// identity seed from [`SUM_SEED_ADDR`], stores seed and sum at
/// [`SUM_OUT_ADDR`], reports them on [`SUM_SEED_PORT`] and
/// [`SUM_RESULT_PORT`] and resets the machine.
pub fn sum_guest(n: u32) -> Vec<u8> {
    let a = Asm::new()
        .mov_ecx(n.max(1))
        .zero_ebx()
        .mov_dx(SUM_PROGRESS_PORT);
    let top = a.here();
    a.add_rbx_rcx()
        .mov_eax_ecx()
        .out_dx_eax()
        .dec_ecx()
        .jnz(top)
        .mov_rax(SUM_SEED_ADDR)
        .load64_from_rax()
        .mov_rdi(SUM_OUT_ADDR)
        .store_rax_at_rdi(0)
        .store_rbx_at_rdi(8)
        .mov_dx(SUM_SEED_PORT)
        .out_dx_eax()
        .mov_eax_ebx()
        .mov_dx(SUM_RESULT_PORT)
        .out_dx_eax()
        .i8042_reset()
        .spin()
        .finish()
}

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest did not reach its first exit in time.
    #[error("the guest made no port exit within {0:?}")]
    NoExit(Duration),
    /// The guest ended in an unexpected way.
    #[error("unexpected end of the benchmark guest: {0:?}")]
    UnexpectedExit(ExitReason),
    /// The virtqueue rejected the benchmark's buffers.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Taking or loading the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// /proc/self/status or /proc/meminfo could not be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Records the time of each write.
struct Stamp {
    times: std::sync::mpsc::Sender<Instant>,
}

impl BusDevice for Stamp {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        let _ = self.times.send(Instant::now());
    }
}

fn stamp_device() -> (Arc<Mutex<Stamp>>, Receiver<Instant>) {
    let (tx, rx) = channel();
    (Arc::new(Mutex::new(Stamp { times: tx })), rx)
}

fn bench_config(name: &str) -> VmConfig {
    VmConfig {
        name: name.into(),
        mem_size: 16 << 20,
        ..VmConfig::default()
    }
}

/// Time from the start of VM creation (KVM_CREATE_VM, memory, vCPU set-up,
/// thread start) to the guest's first port exit reaching a device.
pub fn create_to_first_exit() -> Result<Duration, BenchError> {
    let code = Asm::new()
        .mov_dx(BENCH_PORT as u16)
        .out_dx_al()
        .spin()
        .finish();
    let (dev, times) = stamp_device();
    let t0 = Instant::now();
    let mut vm = VmBuilder::new(bench_config("bench-first-exit"), Boot::Code(code))
        .pio_device(BENCH_PORT, 1, dev)
        .build()?;
    vm.start()?;
    let limit = Duration::from_secs(10);
    let first = times
        .recv_timeout(limit)
        .map_err(|_| BenchError::NoExit(limit))?;
    vm.stop();
    Ok(first.duration_since(t0))
}

/// Mean time of one guest `out` to a VMM device and back into the guest,
/// over `exits` exits of a loop that does nothing else.
pub fn port_exit_round_trip(exits: u32) -> Result<Duration, BenchError> {
    let exits = exits.max(2);
    let a = Asm::new().mov_dx(BENCH_PORT as u16).mov_ecx(exits);
    let top = a.here();
    let code = a
        .out_dx_al()
        .dec_ecx()
        .jnz(top)
        .i8042_reset()
        .spin()
        .finish();
    let (dev, times) = stamp_device();
    let mut vm = VmBuilder::new(bench_config("bench-pio"), Boot::Code(code))
        .pio_device(BENCH_PORT, 1, dev)
        .build()?;
    let exit = vm.run(Duration::from_secs(120))?;
    if !matches!(exit.reason, ExitReason::Reset(_)) {
        return Err(BenchError::UnexpectedExit(exit.reason));
    }
    let stamps: Vec<Instant> = times.try_iter().collect();
    let (first, last) = match (stamps.first(), stamps.last()) {
        (Some(f), Some(l)) if stamps.len() == exits as usize => (*f, *l),
        _ => return Err(BenchError::NoExit(exit.elapsed)),
    };
    Ok(last.duration_since(first) / (exits - 1))
}

/// Mean time of [`crate::Vm::pause`] plus [`crate::Vm::resume`] (all vCPUs out of
/// `KVM_RUN` and acknowledged, then running again) on a spinning guest.
pub fn pause_resume(rounds: u32) -> Result<Duration, BenchError> {
    let code = Asm::new().spin().finish();
    let mut vm = VmBuilder::new(bench_config("bench-pause"), Boot::Code(code)).build()?;
    vm.start()?;
    let limit = Duration::from_secs(10);
    let rounds = rounds.max(1);
    let start = Instant::now();
    for _ in 0..rounds {
        vm.pause(limit)?;
        vm.resume(limit)?;
    }
    let per_round = start.elapsed() / rounds;
    vm.stop();
    Ok(per_round)
}

/// Bytes per second moved through a virtio-console transmit queue in
/// `buf_size` buffers (descriptor parsing, validation, copy out of guest
/// memory, used-ring update), `total` bytes in all.
pub fn virtqueue_throughput(buf_size: u32, total: u64) -> Result<f64, BenchError> {
    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x2_0000;
    const USED: u64 = 0x3_0000;
    const BUF: u64 = 0x10_0000;
    let mem_size = (BUF + u64::from(buf_size)).next_multiple_of(4096) as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)])
        .map_err(|e| BenchError::Vm(VmError::Config(e.to_string())))?;
    let fill: Vec<u8> = (0..buf_size).map(|i| i as u8).collect();
    mem.write_slice(&fill, GuestAddress(BUF))
        .map_err(|e| BenchError::Vm(VmError::Config(e.to_string())))?;
    let mut console = Console::new(
        ConsoleOutput::Writer(Box::new(std::io::sink())),
        ByteQueue::new(1),
    );
    let mut queues = vec![Queue::new(256), Queue::new(256)];
    let q = &mut queues[TX_QUEUE];
    q.size = 256;
    q.desc_table = GuestAddress(DESC);
    q.avail_ring = GuestAddress(AVAIL);
    q.used_ring = GuestAddress(USED);
    q.ready = true;
    let write = |addr: u64, v: &[u8]| {
        mem.write_slice(v, GuestAddress(addr))
            .map_err(|e| BenchError::Vm(VmError::Config(e.to_string())))
    };
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&BUF.to_le_bytes());
    desc[8..12].copy_from_slice(&buf_size.to_le_bytes());
    for i in 0..256u64 {
        write(DESC + 16 * i, &desc)?;
        write(AVAIL + 4 + 2 * i, &(i as u16).to_le_bytes())?;
    }
    let rounds = total.div_ceil(u64::from(buf_size)).max(1);
    let mut avail_idx = 0u16;
    let start = Instant::now();
    for _ in 0..rounds {
        avail_idx = avail_idx.wrapping_add(1);
        write(AVAIL + 2, &avail_idx.to_le_bytes())?;
        console.process(&mem, &mut queues)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = console.stats().tx_bytes;
    if moved != rounds * u64::from(buf_size) {
        return Err(BenchError::Queue(QueueError::Misconfigured(
            "benchmark buffers were not all consumed",
        )));
    }
    Ok(moved as f64 / secs)
}

/// Host-to-guest stream throughput of the virtio-vsock device, bytes per
/// second, next to a plain Unix socket pair moving the same bytes in the
/// same run (the baseline): a host thread connects to the device's socket
/// (`CONNECT`), and host code playing the guest driver accepts, receives
/// `total` bytes in 64 KiB receive buffers through the real `vsock-mux`
/// thread, and returns credit as it consumes them. Returns (vsock,
/// baseline).
pub fn vsock_throughput(total: u64) -> Result<(f64, f64), BenchError> {
    use crate::devices::BusDevice;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::vsock::{
        HDR_LEN, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, PacketHeader,
        TYPE_STREAM, Vsock, VsockConfig, spawn_muxer, wait_readable,
    };
    use std::io::{Read, Write};
    use vmm_sys_util::eventfd::EventFd;

    const QS: u16 = 128;
    const RX: u64 = 0x1_0000;
    const TX: u64 = 0x2_0000;
    const TXBUF: u64 = 0x3_0000;
    const RXBUF: u64 = 0x10_0000;
    const CHUNK: u32 = 64 * 1024;
    const SLOT: u64 = (HDR_LEN as u64 + CHUNK as u64).next_multiple_of(4096);
    const CID: u64 = 3;
    const BUF_ALLOC: u32 = 4 << 20;
    let fail = |what: String| BenchError::Vm(VmError::Config(what));
    let io = |e: std::io::Error| fail(format!("vsock benchmark I/O: {e}"));
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (RXBUF + SLOT * u64::from(QS)) as usize)])
            .map_err(|e| fail(e.to_string()))?;
    let uds = std::env::temp_dir().join(format!(
        "sluice-bench-vsock-{}-{:?}.sock",
        std::process::id(),
        Instant::now()
    ));
    let dev = Vsock::new(&VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
    })
    .map_err(VmError::from)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    let t = Arc::new(Mutex::new(MmioTransport::new(
        dev,
        mem.clone(),
        irq.try_clone().map_err(VmError::EventFd)?,
    )));
    let _mux = spawn_muxer(t.clone()).map_err(VmError::from)?;
    let wr = |off: u64, v: u32| crate::devices::bus::lock(&t).write(off, &v.to_le_bytes());
    for st in [0, 1, 3] {
        wr(0x70, st);
    }
    wr(0x24, 1);
    wr(0x20, 1);
    wr(0x24, 0);
    wr(0x20, 0);
    wr(0x70, 0xb);
    for (q, base) in [(0u32, RX), (1, TX)] {
        wr(0x30, q);
        wr(0x38, u32::from(QS));
        wr(0x80, base as u32);
        wr(0x90, (base + 0x1000) as u32);
        wr(0xa0, (base + 0x2000) as u32);
        wr(0x44, 1);
    }
    wr(0x70, 0xf);
    let w = |addr: u64, b: &[u8]| {
        mem.write_slice(b, GuestAddress(addr))
            .map_err(|e| fail(e.to_string()))
    };
    let desc = |q: u64, i: u64, addr: u64, len: u32, flags: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        w(q + 16 * i, &d)
    };
    // Every rx descriptor i is one 64 KiB + header buffer, posted once and
    // re-posted when consumed.
    for i in 0..u64::from(QS) {
        desc(RX, i, RXBUF + SLOT * i, HDR_LEN as u32 + CHUNK, 2)?;
        w(RX + 0x1000 + 4 + 2 * i, &(i as u16).to_le_bytes())?;
    }
    let mut rx_avail = QS;
    w(RX + 0x1000 + 2, &rx_avail.to_le_bytes())?;
    wr(0x50, 0);
    let (mut tx_idx, mut rx_used_seen) = (0u16, 0u16);
    let mut send = |hdr: PacketHeader| -> Result<(), BenchError> {
        let slot = u64::from(tx_idx % QS);
        w(TXBUF + 64 * slot, &hdr.to_bytes())?;
        desc(TX, slot, TXBUF + 64 * slot, HDR_LEN as u32, 0)?;
        w(TX + 0x1000 + 4 + 2 * slot, &(slot as u16).to_le_bytes())?;
        tx_idx = tx_idx.wrapping_add(1);
        w(TX + 0x1000 + 2, &tx_idx.to_le_bytes())?;
        wr(0x50, 1);
        Ok(())
    };

    let writer = std::thread::Builder::new()
        .name("bench-vsock-host".into())
        .spawn({
            let uds = uds.clone();
            move || -> std::io::Result<Instant> {
                let mut s = std::os::unix::net::UnixStream::connect(&uds)?;
                s.write_all(b"CONNECT 1\n")?;
                let mut ok = [0u8; 1];
                while s.read(&mut ok)? == 1 && ok[0] != b'\n' {}
                let chunk = vec![0x5a_u8; CHUNK as usize];
                let started = Instant::now();
                let mut left = total;
                while left > 0 {
                    let n = left.min(u64::from(CHUNK)) as usize;
                    s.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                Ok(started)
            }
        })
        .map_err(io)?;
    let mut received = 0u64;
    let mut fwd = 0u32;
    let mut peer = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while received < total {
        let used_idx: u16 = mem
            .read_obj(GuestAddress(RX + 0x2000 + 2))
            .map_err(|e| fail(e.to_string()))?;
        if used_idx == rx_used_seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_readable(&irq, left).map_err(io)? {
                return Err(fail("vsock benchmark stalled".into()));
            }
            let _ = irq.read();
            continue;
        }
        while rx_used_seen != used_idx {
            let slot = u64::from(rx_used_seen % QS);
            let id: u32 = mem
                .read_obj(GuestAddress(RX + 0x2000 + 4 + 8 * slot))
                .map_err(|e| fail(e.to_string()))?;
            rx_used_seen = rx_used_seen.wrapping_add(1);
            let mut h = [0u8; HDR_LEN];
            mem.read_slice(&mut h, GuestAddress(RXBUF + SLOT * u64::from(id)))
                .map_err(|e| fail(e.to_string()))?;
            let hdr = PacketHeader::from_bytes(&h);
            let reply = |op, fwd_cnt| PacketHeader {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op,
                buf_alloc: BUF_ALLOC,
                fwd_cnt,
                ..Default::default()
            };
            match hdr.op {
                OP_REQUEST => {
                    peer = Some(hdr.src_port);
                    send(reply(OP_RESPONSE, fwd))?;
                }
                OP_RW if peer == Some(hdr.src_port) => {
                    received += u64::from(hdr.len);
                    let before = fwd;
                    fwd = fwd.wrapping_add(hdr.len);
                    if fwd / (BUF_ALLOC / 4) != before / (BUF_ALLOC / 4) {
                        send(reply(OP_CREDIT_UPDATE, fwd))?;
                    }
                }
                _ => {}
            }
            w(
                RX + 0x1000 + 4 + 2 * u64::from(rx_avail % QS),
                &(id as u16).to_le_bytes(),
            )?;
            rx_avail = rx_avail.wrapping_add(1);
        }
        w(RX + 0x1000 + 2, &rx_avail.to_le_bytes())?;
        wr(0x50, 0);
        if Instant::now() > deadline {
            return Err(fail("vsock benchmark stalled".into()));
        }
    }
    let started = writer
        .join()
        .map_err(|_| fail("vsock benchmark writer panicked".into()))?
        .map_err(io)?;
    let vsock = received as f64 / started.elapsed().as_secs_f64();

    // Baseline: the same bytes through a Unix socket pair, read in 64 KiB.
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().map_err(io)?;
    let started = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk = vec![0x5a_u8; CHUNK as usize];
        let mut left = total;
        while left > 0 {
            let n = left.min(u64::from(CHUNK)) as usize;
            a.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut buf = vec![0u8; CHUNK as usize];
    let mut got = 0u64;
    while got < total {
        match b.read(&mut buf).map_err(io)? {
            0 => break,
            n => got += n as u64,
        }
    }
    writer
        .join()
        .map_err(|_| fail("baseline writer panicked".into()))?
        .map_err(io)?;
    let baseline = got as f64 / started.elapsed().as_secs_f64();
    Ok((vsock, baseline))
}

/// Summary of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct VmBenchReport {
    /// create-to-first-exit samples, milliseconds, sorted.
    pub create_to_first_exit_ms: Vec<f64>,
    /// Port-exit round trip, microseconds.
    pub port_exit_round_trip_us: f64,
    /// Pause + resume of a one-vCPU VM, microseconds.
    pub pause_resume_us: f64,
    /// Virtqueue throughput with 1 MiB buffers, MB/s (10^6 bytes).
    pub virtqueue_mb_per_s: f64,
    /// Host-to-guest virtio-vsock stream throughput, MB/s.
    pub vsock_mb_per_s: f64,
    /// A Unix socket pair moving the same bytes in the same run, MB/s.
    pub unix_socket_mb_per_s: f64,
}

impl VmBenchReport {
    /// Median create-to-first-exit in ms.
    pub fn create_to_first_exit_median_ms(&self) -> f64 {
        let v = &self.create_to_first_exit_ms;
        if v.is_empty() { 0.0 } else { v[v.len() / 2] }
    }
}

/// Runs the measurements: `vms` VM creations, `exits` port exits, 100
/// pause/resume rounds, `mib` MiB through the virtqueue.
pub fn run(vms: usize, exits: u32, mib: u64) -> Result<VmBenchReport, BenchError> {
    let mut samples = Vec::with_capacity(vms);
    for _ in 0..vms.max(1) {
        samples.push(create_to_first_exit()?.as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    let rt = port_exit_round_trip(exits)?;
    let pr = pause_resume(100)?;
    let bps = virtqueue_throughput(1 << 20, mib << 20)?;
    let (vsock, unix) = vsock_throughput(mib << 20)?;
    Ok(VmBenchReport {
        create_to_first_exit_ms: samples,
        port_exit_round_trip_us: rt.as_secs_f64() * 1e6,
        pause_resume_us: pr.as_secs_f64() * 1e6,
        virtqueue_mb_per_s: bps / 1e6,
        vsock_mb_per_s: vsock / 1e6,
        unix_socket_mb_per_s: unix / 1e6,
    })
}

/// Summary of [`snapshot_restore`].
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreBenchReport {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Time to write the snapshot (state + sparse memory file), ms.
    pub snapshot_ms: f64,
    /// Restore-to-running samples (from a loaded [`Snapshot`] to the
    /// restored guest's first port exit), ms, sorted.
    pub restore_ms: Vec<f64>,
    /// Of which [`VmBuilder::build`] (map memory, create the VM, set all
    /// state, spawn the vCPU threads), ms, sorted; the rest is
    /// [`Vm::start`] up to the guest's first exit.
    pub restore_build_ms: Vec<f64>,
    /// Fresh create-and-boot samples of the same guest and RAM (to its
    /// first port exit), ms, sorted, taken interleaved with `restore_ms`.
    pub fresh_ms: Vec<f64>,
    /// Clones kept alive at once for the memory measurement.
    pub idle_clones: usize,
    /// Clones restored to running (and paused) per second while
    /// `idle_clones` were created one after another.
    pub clones_per_sec: f64,
    /// Growth of this process's VmRSS per idle clone, KiB.
    pub rss_per_clone_kib: f64,
    /// Drop of the host's MemAvailable per idle clone, KiB (includes
    /// kernel memory such as KVM's per-VM and per-vCPU structures, but
    /// also whatever else the host did meanwhile).
    pub mem_available_per_clone_kib: f64,
}

/// The `p`-quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl RestoreBenchReport {
    /// One paragraph of figures.
    pub fn summary(&self) -> String {
        let q = |v: &[f64], p| percentile(v, p);
        format!(
            "{} MiB tiny guest: snapshot {:.1} ms; restore-to-running p50 {:.3} ms p99 {:.3} ms \
             ({} samples; build alone p50 {:.3} ms) vs fresh create-and-boot p50 {:.3} ms p99 {:.3} ms; \
             {:.0} clones/s; {} idle clones: {:.0} KiB VmRSS and {:.0} KiB MemAvailable per clone \
             (extrapolated to 1,000 clones: {:.2} GiB / {:.2} GiB)",
            self.mem_mib,
            self.snapshot_ms,
            q(&self.restore_ms, 0.5),
            q(&self.restore_ms, 0.99),
            self.restore_ms.len(),
            q(&self.restore_build_ms, 0.5),
            q(&self.fresh_ms, 0.5),
            q(&self.fresh_ms, 0.99),
            self.clones_per_sec,
            self.idle_clones,
            self.rss_per_clone_kib,
            self.mem_available_per_clone_kib,
            self.rss_per_clone_kib * 1000.0 / (1 << 20) as f64,
            self.mem_available_per_clone_kib * 1000.0 / (1 << 20) as f64,
        )
    }
}

fn proc_kib(path: &'static str, key: &str) -> Result<u64, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|source| BenchError::Proc { path, source })?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .ok_or_else(|| BenchError::Proc {
            path,
            source: std::io::Error::other(format!("no {key} line")),
        })
}

fn sum_ports_stamp() -> (Arc<Mutex<Stamp>>, Receiver<Instant>) {
    stamp_device()
}

/// Builds (`build`), starts and waits for the first port exit of a VM;
/// returns it, the time from `t0` to that exit, and the time `build` took.
fn to_first_exit(
    t0: Instant,
    build: impl FnOnce(Arc<Mutex<Stamp>>) -> Result<Vm, VmError>,
) -> Result<(Vm, Duration, Duration), BenchError> {
    let (dev, times) = sum_ports_stamp();
    let mut vm = build(dev)?;
    let built = t0.elapsed();
    vm.start()?;
    let limit = Duration::from_secs(10);
    let first = times
        .recv_timeout(limit)
        .map_err(|_| BenchError::NoExit(limit))?;
    Ok((vm, first.duration_since(t0), built))
}

/// A snapshot of a running [`sum_guest`] (looping for ever) to restore
/// from, and the same guest to boot fresh, for restore benchmarks.
#[derive(Debug)]
pub struct RestoreBench {
    snap: Arc<Snapshot>,
    mem_mib: u64,
    code: Vec<u8>,
}

impl RestoreBench {
    /// Boots a `mem_mib` MiB [`sum_guest`], pauses it after its first
    /// exit, snapshots it into `dir` and loads the snapshot; returns the
    /// bench and the milliseconds [`Vm::snapshot`] took.
    pub fn new(dir: &std::path::Path, mem_mib: u64) -> Result<(Self, f64), BenchError> {
        let code = sum_guest(u32::MAX);
        let (mut source, _, _) = fresh_sum_guest(mem_mib, &code)?;
        source.pause(Duration::from_secs(10))?;
        let t0 = Instant::now();
        source.snapshot(dir)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        drop(source);
        let snap = Arc::new(Snapshot::load(dir)?);
        Ok((
            Self {
                snap,
                mem_mib,
                code,
            },
            ms,
        ))
    }

    fn config(&self, name: &str) -> VmConfig {
        sum_config(name, self.mem_mib)
    }

    /// A clone with identity `seed`, from [`VmBuilder::restore`] to its
    /// first port exit; returns it, that time, and the time `build` took.
    pub fn restore_to_running(
        &self,
        name: &str,
        seed: u64,
    ) -> Result<(Vm, Duration, Duration), BenchError> {
        to_first_exit(Instant::now(), |dev| {
            VmBuilder::restore(self.config(name), self.snap.clone())
                .pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, dev)
                .guest_write(SUM_SEED_ADDR, &seed.to_le_bytes())
                .build()
        })
    }

    /// The same guest created and booted from scratch, to its first port
    /// exit; returns it, that time, and the time `build` took.
    pub fn fresh_to_running(&self) -> Result<(Vm, Duration, Duration), BenchError> {
        fresh_sum_guest(self.mem_mib, &self.code)
    }
}

fn sum_config(name: &str, mem_mib: u64) -> VmConfig {
    VmConfig {
        name: name.into(),
        mem_size: mem_mib << 20,
        ..VmConfig::default()
    }
}

fn fresh_sum_guest(mem_mib: u64, code: &[u8]) -> Result<(Vm, Duration, Duration), BenchError> {
    to_first_exit(Instant::now(), |dev| {
        VmBuilder::new(
            sum_config("bench-fresh", mem_mib),
            Boot::Code(code.to_vec()),
        )
        .pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, dev)
        .build()
    })
}

/// Snapshot/restore figures for a `mem_mib` MiB tiny guest ([`sum_guest`]
/// looping for ever): the guest runs, is paused and snapshotted into
/// `dir`; then `samples` restores-to-running (from the loaded snapshot to
/// the clone's first port exit) alternate with as many fresh
/// create-and-boots of the same guest (to its first port exit); then
/// `idle_clones` clones are restored, run to their first exit and paused,
/// all kept alive, for clones per second and memory per idle clone.
pub fn snapshot_restore(
    dir: &std::path::Path,
    mem_mib: u64,
    samples: usize,
    idle_clones: usize,
) -> Result<RestoreBenchReport, BenchError> {
    let limit = Duration::from_secs(10);
    let (bench, snapshot_ms) = RestoreBench::new(dir, mem_mib)?;
    let mut restore_ms = Vec::with_capacity(samples);
    let mut restore_build_ms = Vec::with_capacity(samples);
    let mut fresh_ms = Vec::with_capacity(samples);
    for i in 0..samples.max(1) {
        let (vm, t, _) = bench.fresh_to_running()?;
        drop(vm);
        fresh_ms.push(t.as_secs_f64() * 1e3);
        let (vm, t, built) = bench.restore_to_running("bench-restore", i as u64)?;
        drop(vm);
        restore_ms.push(t.as_secs_f64() * 1e3);
        restore_build_ms.push(built.as_secs_f64() * 1e3);
    }
    restore_ms.sort_by(f64::total_cmp);
    restore_build_ms.sort_by(f64::total_cmp);
    fresh_ms.sort_by(f64::total_cmp);

    let rss0 = proc_kib("/proc/self/status", "VmRSS:")?;
    let avail0 = proc_kib("/proc/meminfo", "MemAvailable:")?;
    let mut clones = Vec::with_capacity(idle_clones);
    let t0 = Instant::now();
    for i in 0..idle_clones {
        let (mut vm, _, _) = bench.restore_to_running(&format!("idle{i}"), i as u64)?;
        vm.pause(limit)?;
        clones.push(vm);
    }
    let secs = t0.elapsed().as_secs_f64();
    let rss1 = proc_kib("/proc/self/status", "VmRSS:")?;
    let avail1 = proc_kib("/proc/meminfo", "MemAvailable:")?;
    drop(clones);
    let n = idle_clones.max(1) as f64;
    Ok(RestoreBenchReport {
        mem_mib,
        snapshot_ms,
        restore_ms,
        restore_build_ms,
        fresh_ms,
        idle_clones,
        clones_per_sec: idle_clones as f64 / secs.max(1e-9),
        rss_per_clone_kib: rss1.saturating_sub(rss0) as f64 / n,
        mem_available_per_clone_kib: avail0.saturating_sub(avail1) as f64 / n,
    })
}
