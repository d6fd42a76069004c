//! Snapshot and restore on the real /dev/kvm: a tiny guest summing a
//! series is paused mid-way and snapshotted; restored VMs (one, and 100
//! clones) continue to the right result, each with its own identity;
//! clones' memory writes stay private; damaged snapshots are rejected.
//!
//! Without /dev/kvm these tests skip with a loud message; with
//! `SLUICE_REQUIRE_KVM=1` a missing /dev/kvm fails them instead.

mod common;

use common::{config, kvm_available};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_vmm::bench::{
    SUM_OUT_ADDR, SUM_PORTS_LEN, SUM_PROGRESS_PORT, SUM_RESULT_PORT, SUM_SEED_ADDR, SUM_SEED_PORT,
    sum_guest,
};
use sluice_vmm::devices::BusDevice;
use sluice_vmm::snapshot::{MEMORY_FILE, SNAPSHOT_VERSION, STATE_FILE};
use sluice_vmm::vm::ResetCause;
use sluice_vmm::{
    Boot, ExitReason, Snapshot, SnapshotError, Vm, VmBuilder, VmConfig, VmError, VmState,
};
use vm_memory::{Bytes, GuestAddress};

const LONG: Duration = Duration::from_secs(60);

/// What the sum guest reported on one of its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Report {
    Progress(u32),
    Seed(u32),
    Result(u32),
}

/// The sum guest's three ports.
struct Ports(Sender<Report>);

impl BusDevice for Ports {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        let port = SUM_PROGRESS_PORT + offset as u16;
        let r = match port {
            SUM_PROGRESS_PORT => Report::Progress(v),
            SUM_SEED_PORT => Report::Seed(v),
            SUM_RESULT_PORT => Report::Result(v),
            other => panic!("write to unexpected port {other:#x}"),
        };
        let _ = self.0.send(r);
    }
}

fn ports() -> (Arc<Mutex<Ports>>, Receiver<Report>) {
    let (tx, rx) = channel();
    (Arc::new(Mutex::new(Ports(tx))), rx)
}

fn with_ports(b: VmBuilder) -> (VmBuilder, Receiver<Report>) {
    let (dev, rx) = ports();
    (
        b.pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, dev),
        rx,
    )
}

fn sum(n: u32) -> u32 {
    n * (n + 1) / 2
}

/// Runs the sum guest for `n` rounds until it reported `before_pause`
/// progress writes, pauses it, and returns the VM with the last counter
/// value it reported (every write made before the pause is drained).
fn run_and_pause(name: &str, n: u32, before_pause: u32) -> (Vm, Receiver<Report>, u32) {
    let (b, rx) = with_ports(VmBuilder::new(config(name), Boot::Code(sum_guest(n))));
    let mut vm = b.build().unwrap();
    vm.start().unwrap();
    let mut last = 0;
    for _ in 0..before_pause {
        match rx.recv_timeout(LONG).expect("the guest makes progress") {
            Report::Progress(v) => last = v,
            other => panic!("unexpected {other:?} before the pause"),
        }
    }
    vm.pause(LONG).unwrap();
    while let Ok(r) = rx.try_recv() {
        match r {
            Report::Progress(v) => last = v,
            other => panic!("unexpected {other:?} before the pause"),
        }
    }
    assert!(last > 1 && last < n, "paused at counter {last} of {n}");
    (vm, rx, last)
}

/// Runs `vm` to its reset and checks everything the sum guest reported:
/// progress continues from `resume_from`, then `seed` and the sum of `n`.
fn finish_and_check(vm: &mut Vm, rx: &Receiver<Report>, n: u32, resume_from: u32, seed: u64) {
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    let reports: Vec<Report> = rx.try_iter().collect();
    let mut expected: Vec<Report> = (1..resume_from).rev().map(Report::Progress).collect();
    expected.push(Report::Seed(seed as u32));
    expected.push(Report::Result(sum(n)));
    assert_eq!(
        reports.len(),
        expected.len(),
        "reports: {:?}",
        &reports[..reports.len().min(5)]
    );
    assert_eq!(reports, expected);
    let mut out = [0u8; 16];
    vm.memory()
        .read_slice(&mut out, GuestAddress(SUM_OUT_ADDR))
        .unwrap();
    assert_eq!(u64::from_le_bytes(out[..8].try_into().unwrap()), seed);
    assert_eq!(
        u64::from_le_bytes(out[8..].try_into().unwrap()),
        u64::from(sum(n))
    );
}

fn file_bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, at).unwrap();
    buf
}

#[test]
fn a_vm_snapshotted_mid_computation_continues_to_the_right_result_after_restore() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let (mut source, source_rx, last) = run_and_pause("snap-source", N, 300);
    let info = source.snapshot(dir.path()).unwrap();
    assert_eq!(source.state(), VmState::Paused);
    assert!(info.state_bytes > 4096, "{info:?}");
    assert_eq!(info.memory_path, dir.path().join(MEMORY_FILE));
    assert_eq!(
        std::fs::metadata(&info.memory_path).unwrap().len(),
        16 << 20
    );

    // The source itself resumes after the snapshot and finishes (seed 0).
    source.resume(LONG).unwrap();
    finish_and_check(&mut source, &source_rx, N, last, 0);

    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    assert_eq!(snap.state().vcpus.len(), 1);
    assert!(
        !snap.state().vcpus[0].msrs.is_empty(),
        "no MSR was saved from KVM's list"
    );
    let seed = 0x5eed_c10e_0000_0001u64;
    let (b, rx) = with_ports(
        VmBuilder::restore(config("snap-restored"), snap.clone())
            .guest_write(SUM_SEED_ADDR, &seed.to_le_bytes()),
    );
    let mut restored = b.build().unwrap();
    assert_eq!(restored.state(), VmState::Created);
    eprintln!(
        "MSRs saved: {}; unreadable at snapshot: {:x?}; refused at restore: {:x?}",
        snap.state().vcpus[0].msrs.len(),
        info.unreadable_msrs,
        restored.refused_msrs()
    );
    assert_eq!(restored.refused_msrs().len(), 1);
    finish_and_check(&mut restored, &rx, N, last, seed);

    // Neither the host's seed write nor the guest's stores reached the file.
    assert_eq!(
        file_bytes(&info.memory_path, SUM_SEED_ADDR, 8),
        vec![0u8; 8]
    );
    assert_eq!(
        file_bytes(&info.memory_path, SUM_OUT_ADDR, 16),
        vec![0u8; 16]
    );
    // The guest code is in the file.
    assert_eq!(
        file_bytes(&info.memory_path, sluice_vmm::memory::HIMEM_START, 8),
        sum_guest(N)[..8].to_vec()
    );
}

#[test]
fn a_hundred_clones_of_one_snapshot_each_reach_the_result_with_their_own_identity() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 2000;
    const CLONES: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let (mut source, _rx, last) = run_and_pause("clone-source", N, 10);
    source.snapshot(dir.path()).unwrap();
    drop(source);
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());

    // All clones exist at the same time, so a write by one would be seen
    // by the others if their memory were shared.
    let mut clones = Vec::with_capacity(CLONES);
    for i in 0..CLONES {
        let seed = 0x1d00_0000_0000_0000u64 | (i as u64 * 7919 + 1);
        let (b, rx) = with_ports(
            VmBuilder::restore(config(&format!("clone{i}")), snap.clone())
                .guest_write(SUM_SEED_ADDR, &seed.to_le_bytes()),
        );
        let mut vm = b.build().unwrap();
        vm.start().unwrap();
        clones.push((vm, rx, seed));
    }
    let mut seen = HashSet::new();
    for (vm, rx, seed) in &mut clones {
        finish_and_check(vm, rx, N, last, *seed);
        assert!(seen.insert(*seed as u32), "two clones reported one seed");
    }
    // After all ran: each clone's memory holds its own seed only.
    for (vm, _, seed) in &clones {
        let mut out = [0u8; 8];
        vm.memory()
            .read_slice(&mut out, GuestAddress(SUM_OUT_ADDR))
            .unwrap();
        assert_eq!(u64::from_le_bytes(out), *seed);
    }
    assert_eq!(
        file_bytes(&dir.path().join(MEMORY_FILE), SUM_OUT_ADDR, 16),
        vec![0u8; 16]
    );
}

#[test]
fn a_host_write_into_one_clone_is_invisible_to_another_and_to_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut source, _rx, _) = run_and_pause("cow-source", 1000, 10);
    source.snapshot(dir.path()).unwrap();
    drop(source);
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    let a = VmBuilder::restore(config("cow-a"), snap.clone())
        .pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, ports().0)
        .build()
        .unwrap();
    let b = VmBuilder::restore(config("cow-b"), snap.clone())
        .pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, ports().0)
        .build()
        .unwrap();
    let addr = GuestAddress(0x80_0000);
    let code_addr = GuestAddress(sluice_vmm::memory::HIMEM_START);
    let mut code_b = [0u8; 4];
    b.memory().read_slice(&mut code_b, code_addr).unwrap();
    a.memory().write_slice(b"AAAA", addr).unwrap();
    a.memory()
        .write_slice(b"\xf4\xf4\xf4\xf4", code_addr)
        .unwrap();
    let mut seen = [0u8; 4];
    b.memory().read_slice(&mut seen, addr).unwrap();
    assert_eq!(&seen, &[0; 4]);
    b.memory().read_slice(&mut seen, code_addr).unwrap();
    assert_eq!(seen, code_b, "a write to a file-backed page leaked");
    let mem = dir.path().join(MEMORY_FILE);
    assert_eq!(file_bytes(&mem, addr.0, 4), vec![0; 4]);
    assert_eq!(file_bytes(&mem, code_addr.0, 4), code_b.to_vec());
}

/// Copies a snapshot directory so one file can be damaged.
fn copy_snapshot(from: &Path, to: &Path) {
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn corrupt_truncated_and_wrong_version_snapshots_are_rejected() {
    if !kvm_available() {
        return;
    }
    let good = tempfile::tempdir().unwrap();
    let (mut source, _rx, _) = run_and_pause("reject-source", 1000, 10);
    source.snapshot(good.path()).unwrap();
    let state = std::fs::read(good.path().join(STATE_FILE)).unwrap();
    Snapshot::load(good.path()).expect("the undamaged snapshot loads");

    let damaged = |edit: &dyn Fn(&Path)| {
        let d = tempfile::tempdir().unwrap();
        copy_snapshot(good.path(), d.path());
        edit(d.path());
        Snapshot::load(d.path()).map(|_| ())
    };
    // One flipped bit in the middle of the state.
    let corrupt = damaged(&|d| {
        let mut s = state.clone();
        let mid = s.len() / 2;
        s[mid] ^= 0x10;
        std::fs::write(d.join(STATE_FILE), s).unwrap();
    });
    assert!(
        matches!(corrupt, Err(SnapshotError::Checksum { .. })),
        "{corrupt:?}"
    );
    let truncated = damaged(&|d| {
        std::fs::write(d.join(STATE_FILE), &state[..state.len() - 100]).unwrap();
    });
    assert!(
        matches!(truncated, Err(SnapshotError::Truncated { .. })),
        "{truncated:?}"
    );
    let version = damaged(&|d| {
        let mut s = state.clone();
        s[8..12].copy_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
        std::fs::write(d.join(STATE_FILE), s).unwrap();
    });
    match version {
        Err(SnapshotError::UnsupportedVersion {
            found, supported, ..
        }) => {
            assert_eq!(found, SNAPSHOT_VERSION + 1);
            assert_eq!(supported, SNAPSHOT_VERSION);
        }
        other => panic!("{other:?}"),
    }
    let magic = damaged(&|d| {
        std::fs::write(d.join(STATE_FILE), b"not a snapshot at all, just text").unwrap();
    });
    assert!(
        matches!(magic, Err(SnapshotError::BadMagic { .. })),
        "{magic:?}"
    );
    let short_memory = damaged(&|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(MEMORY_FILE))
            .unwrap();
        f.set_len(8 << 20).unwrap();
    });
    assert!(
        matches!(
            short_memory,
            Err(SnapshotError::MemorySize {
                expected: 16777216,
                found: 8388608,
                ..
            })
        ),
        "{short_memory:?}"
    );
    let missing = damaged(&|d| std::fs::remove_file(d.join(STATE_FILE)).unwrap());
    assert!(
        matches!(missing, Err(SnapshotError::Io { op: "read", .. })),
        "{missing:?}"
    );

    // A running VM cannot be snapshotted.
    source.resume(LONG).unwrap();
    let running = source.snapshot(tempfile::tempdir().unwrap().path());
    assert!(
        matches!(
            running,
            Err(SnapshotError::InvalidState {
                state: VmState::Running
            })
        ),
        "{running:?}"
    );
    source.stop();

    // A restored VM must have the snapshot's devices.
    let snap = Arc::new(Snapshot::load(good.path()).unwrap());
    let (with_console, _host) = VmBuilder::restore(config("mismatch"), snap)
        .agent_channel()
        .unwrap();
    match with_console.build() {
        Err(VmError::Snapshot(SnapshotError::Devices(msg))) => {
            assert!(msg.contains("virtio-console"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_restore_benchmark_measures_real_restores() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = sluice_vmm::bench::snapshot_restore(dir.path(), 16, 5, 10).unwrap();
    eprintln!("{}", report.summary());
    assert_eq!(report.restore_ms.len(), 5);
    assert_eq!(report.fresh_ms.len(), 5);
    assert!(
        report
            .restore_ms
            .iter()
            .all(|ms| *ms > 0.0 && *ms < 10_000.0)
    );
    assert!(report.fresh_ms.iter().all(|ms| *ms > 0.0 && *ms < 10_000.0));
    assert!(report.restore_ms.windows(2).all(|w| w[0] <= w[1]), "sorted");
    assert_eq!(report.idle_clones, 10);
    assert!(report.clones_per_sec > 0.0);
    assert!(report.snapshot_ms > 0.0);
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A port device that reports each write.
struct Marker(Sender<u8>);

impl BusDevice for Marker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let _ = self.0.send(data[0]);
    }
}

#[test]
fn a_restored_virtio_console_continues_from_the_saved_queue_indexes() {
    if !kvm_available() {
        return;
    }
    use sluice_vmm::asm::Asm;
    use sluice_vmm::memory::VIRTIO_MMIO_BASE;
    use sluice_vmm::virtio::console::{ByteQueue, ConsoleOutput};
    use sluice_vmm::vm::VirtioConsoleConfig;
    const DESC: u64 = 0x40000;
    const AVAIL: u64 = 0x41000;
    const USED: u64 = 0x42000;
    const BUF1: u64 = 0x50000;
    const BUF2: u64 = 0x51000;
    const FLAG: u64 = 0x52000;
    let (msg1, msg2) = (
        &b"first buffer, before the snapshot\n"[..],
        &b"second, after\n"[..],
    );
    let r = |off: u64| VIRTIO_MMIO_BASE + off;
    // Initialise the device, send buffer 0, tell the host, then wait for
    // FLAG (set only in the clone) before publishing buffer 1.
    let a = Asm::new()
        .write32(r(0x70), 0)
        .write32(r(0x70), 1)
        .write32(r(0x70), 3)
        .write32(r(0x24), 1)
        .write32(r(0x20), 1) // VIRTIO_F_VERSION_1
        .write32(r(0x24), 0)
        .write32(r(0x20), 0)
        .write32(r(0x70), 0xb)
        .write32(r(0x30), 1)
        .write32(r(0x38), 16)
        .write32(r(0x80), DESC as u32)
        .write32(r(0x84), 0)
        .write32(r(0x90), AVAIL as u32)
        .write32(r(0x94), 0)
        .write32(r(0xa0), USED as u32)
        .write32(r(0xa4), 0)
        .write32(r(0x44), 1)
        .write32(r(0x70), 0xf)
        .write32(r(0x50), 1)
        .mov_dx(0x500)
        .mov_al(1)
        .out_dx_al();
    let wait = a.here();
    let code = a
        .mov_rax(FLAG)
        .load32_from_rax()
        .test_al(1)
        .jz(wait)
        // avail.flags = 0, avail.idx = 2; notify transmitq0.
        .write32(AVAIL, 2 << 16)
        .write32(r(0x50), 1)
        .i8042_reset()
        .spin()
        .finish();
    let console = |sink: &Sink| VirtioConsoleConfig {
        out: ConsoleOutput::Writer(Box::new(sink.clone())),
        input: ByteQueue::new(4096),
    };
    let marker = || {
        let (tx, rx) = channel();
        (Arc::new(Mutex::new(Marker(tx))), rx)
    };

    let sink1 = Sink::default();
    let (dev, ready) = marker();
    let mut source = VmBuilder::new(config("virtio-source"), Boot::Code(code))
        .pio_device(0x500, 1, dev)
        .virtio_console(console(&sink1))
        .build()
        .unwrap();
    let m = source.memory();
    for (i, (buf, msg)) in [(BUF1, msg1), (BUF2, msg2)].into_iter().enumerate() {
        m.write_slice(msg, GuestAddress(buf)).unwrap();
        let mut desc = [0u8; 16];
        desc[0..8].copy_from_slice(&buf.to_le_bytes());
        desc[8..12].copy_from_slice(&(msg.len() as u32).to_le_bytes());
        m.write_slice(&desc, GuestAddress(DESC + 16 * i as u64))
            .unwrap();
        m.write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * i as u64))
            .unwrap();
    }
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    source.start().unwrap();
    assert_eq!(ready.recv_timeout(LONG).unwrap(), 1);
    source.pause(LONG).unwrap();
    assert_eq!(*sink1.0.lock().unwrap(), msg1);
    let dir = tempfile::tempdir().unwrap();
    source.snapshot(dir.path()).unwrap();
    source.stop();
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    let saved = snap.state().virtio_console.as_ref().expect("virtio state");
    assert!(saved.activated);
    assert_eq!(
        (saved.queues[1].next_avail, saved.queues[1].next_used),
        (1, 1)
    );

    let sink2 = Sink::default();
    let (dev, _ready) = marker();
    let mut clone = VmBuilder::restore(config("virtio-clone"), snap)
        .pio_device(0x500, 1, dev)
        .virtio_console(console(&sink2))
        .guest_write(FLAG, &[1])
        .build()
        .unwrap();
    assert!(
        clone
            .virtio_console()
            .unwrap()
            .lock()
            .unwrap()
            .is_activated()
    );
    let exit = clone.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    // Only the second buffer: the device resumed at available index 1 and
    // wrote used entry 1 after the saved one.
    assert_eq!(*sink2.0.lock().unwrap(), msg2);
    let used_idx: u16 = clone.memory().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2);
}

#[test]
fn unread_serial_input_and_uart_registers_survive_a_restore() {
    if !kvm_available() {
        return;
    }
    use sluice_vmm::asm::Asm;
    const COM1: u16 = 0x3f8;
    const FLAG: u64 = 0x52000;
    // Scratch register := 'Z'; tell the host; wait for FLAG (clone only);
    // echo serial input up to a newline; print the scratch register.
    let a = Asm::new()
        .mov_dx(COM1 + 7)
        .mov_al(b'Z')
        .out_dx_al()
        .mov_dx(0x500)
        .out_dx_al();
    let wait = a.here();
    let a = a.mov_rax(FLAG).load32_from_rax().test_al(1).jz(wait);
    let echo = a.here();
    let code = a
        .mov_dx(COM1 + 5)
        .in_al_dx()
        .test_al(1)
        .jz(echo)
        .mov_dx(COM1)
        .in_al_dx()
        .out_dx_al()
        .cmp_al(b'\n')
        .jnz(echo)
        .mov_dx(COM1 + 7)
        .in_al_dx()
        .mov_dx(COM1)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let (tx, ready) = channel();
    let mut source = VmBuilder::new(config("serial-source"), Boot::Code(code))
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .build()
        .unwrap();
    source.start().unwrap();
    assert_eq!(ready.recv_timeout(LONG).unwrap(), b'Z');
    source.pause(LONG).unwrap();
    // Queued while paused: the source never reads it, the clone must.
    assert_eq!(source.console_input(b"kept\n"), 5);
    let dir = tempfile::tempdir().unwrap();
    source.snapshot(dir.path()).unwrap();
    source.stop();
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    assert_eq!(snap.state().serial.in_buffer, b"kept\n");
    assert_eq!(snap.state().serial.scratch, b'Z');

    let (tx, _ready) = channel();
    let mut clone = VmBuilder::restore(config("serial-clone"), snap)
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .guest_write(FLAG, &[1])
        .build()
        .unwrap();
    let exit = clone.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(clone.console_output(), b"kept\nZ");
}

#[test]
fn pic_programming_and_the_kvm_clock_are_restored() {
    if !kvm_available() {
        return;
    }
    use kvm_bindings::kvm_clock_data;
    use sluice_vmm::asm::Asm;
    const FLAG: u64 = 0x52000;
    // ICW1-4 with vector base 0x28, then IMR 0x5a; tell the host; wait for
    // FLAG (clone only); report the PIC's IMR as read back from port 0x21.
    let a = Asm::new()
        .mov_al(0x11)
        .out_imm_al(0x20)
        .mov_al(0x28)
        .out_imm_al(0x21)
        .mov_al(0x04)
        .out_imm_al(0x21)
        .mov_al(0x01)
        .out_imm_al(0x21)
        .mov_al(0x5a)
        .out_imm_al(0x21)
        .mov_dx(0x500)
        .out_dx_al();
    let wait = a.here();
    let code = a
        .mov_rax(FLAG)
        .load32_from_rax()
        .test_al(1)
        .jz(wait)
        .mov_dx(0x21)
        .in_al_dx()
        .mov_dx(0x500)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let (tx, ready) = channel();
    let mut source = VmBuilder::new(config("pic-source"), Boot::Code(code))
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .build()
        .unwrap();
    source.start().unwrap();
    assert_eq!(ready.recv_timeout(LONG).unwrap(), 0x5a);
    source.pause(LONG).unwrap();
    // A clock far from a new VM's, to tell a restored clock from a fresh one.
    const CLOCK: u64 = 1000 * 1_000_000_000;
    source
        .vm_fd()
        .set_clock(&kvm_clock_data {
            clock: CLOCK,
            ..Default::default()
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    source.snapshot(dir.path()).unwrap();
    source.stop();
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());

    let (tx, imr) = channel();
    let mut clone = VmBuilder::restore(config("pic-clone"), snap)
        .pio_device(0x500, 1, Arc::new(Mutex::new(Marker(tx))))
        .guest_write(FLAG, &[1])
        .build()
        .unwrap();
    let clock = clone.vm_fd().get_clock().unwrap().clock;
    assert!(
        (CLOCK..CLOCK + 60 * 1_000_000_000).contains(&clock),
        "restored clock {clock}"
    );
    let exit = clone.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(
        imr.try_recv().unwrap(),
        0x5a,
        "the PIC's mask after restore"
    );
    // A new VM's clock starts near zero.
    let fresh = VmBuilder::new(config("clock-fresh"), Boot::Code(Vec::new()))
        .build()
        .unwrap();
    assert!(fresh.vm_fd().get_clock().unwrap().clock < CLOCK);
}

#[test]
fn snapshotting_again_into_a_directory_leaves_clones_of_the_old_snapshot_intact() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _rx, _) = run_and_pause("resnap-first", 1000, 10);
    first
        .memory()
        .write_slice(b"old!", GuestAddress(0x70_0000))
        .unwrap();
    first.snapshot(dir.path()).unwrap();
    first.stop();
    let old = Arc::new(Snapshot::load(dir.path()).unwrap());
    let clone = VmBuilder::restore(config("resnap-clone"), old)
        .pio_device(u64::from(SUM_PROGRESS_PORT), SUM_PORTS_LEN, ports().0)
        .build()
        .unwrap();

    let (mut second, _rx, _) = run_and_pause("resnap-second", 1000, 10);
    second
        .memory()
        .write_slice(b"new!", GuestAddress(0x70_0000))
        .unwrap();
    second.snapshot(dir.path()).unwrap();
    second.stop();

    let mut seen = [0u8; 4];
    clone
        .memory()
        .read_slice(&mut seen, GuestAddress(0x70_0000))
        .unwrap();
    assert_eq!(
        &seen, b"old!",
        "the clone's unwritten page changed under it"
    );
    let new = Snapshot::load(dir.path()).unwrap();
    new.map_memory()
        .unwrap()
        .read_slice(&mut seen, GuestAddress(0x70_0000))
        .unwrap();
    assert_eq!(&seen, b"new!");
}

#[test]
fn a_two_vcpu_vm_is_snapshotted_and_restored_with_both_vcpus() {
    if !kvm_available() {
        return;
    }
    const N: u32 = 2000;
    let two = |name: &str| VmConfig {
        vcpus: 2,
        ..config(name)
    };
    // vCPU 0 runs the sum guest; vCPU 1 waits for INIT/SIPI in its LAPIC.
    let (b, rx) = with_ports(VmBuilder::new(two("smp-source"), Boot::Code(sum_guest(N))));
    let mut source = b.build().unwrap();
    source.start().unwrap();
    let mut last = 0;
    for _ in 0..10 {
        if let Report::Progress(v) = rx.recv_timeout(LONG).unwrap() {
            last = v;
        }
    }
    source.pause(LONG).unwrap();
    for r in rx.try_iter() {
        if let Report::Progress(v) = r {
            last = v;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let info = source.snapshot(dir.path()).unwrap();
    assert_eq!(info.unreadable_msrs.len(), 2);
    source.stop();
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    let vcpus = &snap.state().vcpus;
    assert_eq!(vcpus.len(), 2);
    // The boot vCPU is in the loop; the other never left its reset state.
    assert_ne!(vcpus[0].regs.rip, vcpus[1].regs.rip);
    assert_ne!(vcpus[0].mp_state.mp_state, vcpus[1].mp_state.mp_state);

    let (b, rx) =
        with_ports(VmBuilder::restore(config("smp-clone"), snap).guest_write(SUM_SEED_ADDR, &[7]));
    let mut clone = b.build().unwrap();
    assert_eq!(clone.vcpu_states().len(), 2);
    assert_eq!(clone.refused_msrs().len(), 2);
    finish_and_check(&mut clone, &rx, N, last, 7);
}

#[test]
fn a_snapshotter_saves_a_vm_while_another_thread_runs_it() {
    if !kvm_available() {
        return;
    }
    // Rounds enough that the guest is still running when the snapshot is
    // asked for, however long this thread waits for a core after its 300th
    // report (with 2,000 the guest once finished first on a loaded machine).
    const N: u32 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let (b, rx) = with_ports(VmBuilder::new(
        config("live-source"),
        Boot::Code(sum_guest(N)),
    ));
    let mut vm = b.build().unwrap();
    let snapshotter = vm.snapshotter();
    let runner = std::thread::Builder::new()
        .name("live-source-run".into())
        .spawn(move || vm.run(LONG).unwrap())
        .unwrap();
    for _ in 0..300 {
        assert!(matches!(
            rx.recv_timeout(LONG).unwrap(),
            Report::Progress(_)
        ));
    }
    let info = snapshotter.snapshot(dir.path(), LONG).unwrap();
    assert_eq!(info.state_path, dir.path().join(STATE_FILE));
    // The source resumed after the snapshot and finished.
    let exit = runner.join().unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert!(rx.try_iter().any(|r| r == Report::Result(sum(N))));
    // Its run is over: a later request says so instead of hanging.
    match snapshotter.snapshot(dir.path(), LONG) {
        Err(SnapshotError::NotRunning { .. }) => {}
        other => panic!("expected NotRunning, got {other:?}"),
    }
    // A clone continues from the paused counter down to the right sum.
    let snap = Arc::new(Snapshot::load(dir.path()).unwrap());
    let (b, rx) =
        with_ports(VmBuilder::restore(config("live-clone"), snap).guest_write(SUM_SEED_ADDR, &[9]));
    let mut clone = b.build().unwrap();
    let exit = clone.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    let reports: Vec<Report> = rx.try_iter().collect();
    let Some(Report::Progress(first)) = reports.first().copied() else {
        panic!("the clone reported {:?} first", reports.first());
    };
    assert!(first > 1 && first < N - 299, "resumed at {first}");
    let mut expected: Vec<Report> = (1..=first).rev().map(Report::Progress).collect();
    expected.push(Report::Seed(9));
    expected.push(Report::Result(sum(N)));
    assert_eq!(reports, expected);
}
