//! Tiny guests on the real /dev/kvm: machine code assembled at test time,
//! run in 64-bit mode with our GDT and page tables.
//!
//! Without /dev/kvm these tests skip with a loud message; with
//! `SLUICE_REQUIRE_KVM=1` a missing /dev/kvm fails them instead.

mod common;

use common::{config, kvm_available};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use sluice_vmm::asm::Asm;
use sluice_vmm::devices::BusDevice;
use sluice_vmm::memory::{HIMEM_START, VIRTIO_MMIO_BASE};
use sluice_vmm::vcpu::{VcpuError, VcpuState};
use sluice_vmm::vm::ResetCause;
use sluice_vmm::{Boot, ExitReason, VmBuilder, VmError, VmState};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const COM1: u16 = 0x3f8;
const LONG: Duration = Duration::from_secs(20);

/// A write seen by a [`Recorder`]: offset and bytes.
type Write = (u64, Vec<u8>);

/// A device that records accesses and reports writes on a channel.
struct Recorder {
    read_value: Vec<u8>,
    writes: Sender<Write>,
    reads: u64,
}

impl Recorder {
    fn new(read_value: &[u8]) -> (Arc<Mutex<Self>>, Receiver<Write>) {
        let (tx, rx) = channel();
        (
            Arc::new(Mutex::new(Self {
                read_value: read_value.to_vec(),
                writes: tx,
                reads: 0,
            })),
            rx,
        )
    }
}

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        self.reads += 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_value.get(i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let _ = self.writes.send((offset, data.to_vec()));
    }
}

#[test]
fn serial_output_then_i8042_reset() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new()
        .print(COM1, b"OK\n")
        .i8042_reset()
        .spin()
        .finish();
    let mut vm = VmBuilder::new(config("serial"), Boot::Code(code))
        .build()
        .unwrap();
    assert_eq!(vm.state(), VmState::Created);
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(vm.console_output(), b"OK\n");
    assert_eq!(vm.state(), VmState::Exited);
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Exited));
}

#[test]
fn port_and_mmio_exits_reach_bus_devices() {
    if !kvm_available() {
        return;
    }
    let mmio_addr = VIRTIO_MMIO_BASE + 0x40;
    let code = Asm::new()
        // MMIO write then read back through the device.
        .mov_rax(mmio_addr)
        .store32_at_rax(0xdead_beef)
        .load32_from_rax()
        // Report the low byte of what the MMIO read returned on port 0x500.
        .mov_dx(0x500)
        .out_dx_al()
        // Port read from 0x501, echoed to 0x500.
        .mov_dx(0x501)
        .in_al_dx()
        .mov_dx(0x500)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let (mmio_dev, mmio_writes) = Recorder::new(&[0x42, 0, 0, 0]);
    let (pio_dev, pio_writes) = Recorder::new(&[0x77]);
    let mut vm = VmBuilder::new(config("exits"), Boot::Code(code))
        .mmio_device(VIRTIO_MMIO_BASE, 0x1000, mmio_dev.clone())
        .pio_device(0x500, 2, pio_dev.clone())
        .build()
        .unwrap();
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(
        mmio_writes.try_recv().unwrap(),
        (0x40, 0xdead_beefu32.to_le_bytes().to_vec())
    );
    assert_eq!(mmio_dev.lock().unwrap().reads, 1);
    assert_eq!(pio_writes.try_recv().unwrap(), (0, vec![0x42]));
    assert_eq!(pio_writes.try_recv().unwrap(), (0, vec![0x77]));
    assert_eq!(pio_dev.lock().unwrap().reads, 1);
}

#[test]
fn a_guest_that_spins_forever_is_stopped_by_the_timeout() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new().print(COM1, b"spin\n").spin().finish();
    let mut vm = VmBuilder::new(config("spin"), Boot::Code(code))
        .build()
        .unwrap();
    let timeout = Duration::from_millis(300);
    let exit = vm.run(timeout).unwrap();
    assert_eq!(exit.reason, ExitReason::TimedOut);
    assert!(exit.elapsed >= timeout, "{:?}", exit.elapsed);
    assert!(
        exit.elapsed < timeout + Duration::from_secs(5),
        "stop took {:?}",
        exit.elapsed
    );
    assert_eq!(vm.console_output(), b"spin\n");
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Exited));
}

#[test]
fn a_stopper_ends_a_run_from_another_thread() {
    if !kvm_available() {
        return;
    }
    let mut vm = VmBuilder::new(config("stopper"), Boot::Code(Asm::new().spin().finish()))
        .build()
        .unwrap();
    let stopper = vm.stopper();
    vm.start().unwrap();
    let (tx, rx) = channel();
    let runner = std::thread::spawn(move || {
        let exit = vm.run(Duration::from_secs(3600));
        let _ = tx.send(());
        (exit, vm)
    });
    stopper.stop();
    rx.recv_timeout(LONG)
        .expect("the stopper did not end the run");
    let (exit, vm) = runner.join().unwrap();
    assert_eq!(exit.unwrap().reason, ExitReason::Stopped);
    assert!(vm.vcpu_states().iter().all(|s| *s == VcpuState::Exited));
    // Stopping an ended VM does nothing.
    stopper.stop();
}

#[test]
fn a_triple_fault_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    // Load an IDT of limit 0 (every vector out of bounds), then fault:
    // #UD -> #GP (no gate) -> #DF (no gate) -> triple fault.
    let idtr = 0x2000u64;
    let code = Asm::new().mov_rax(idtr).lidt_at_rax().ud2().spin().finish();
    let mut vm = VmBuilder::new(config("triple"), Boot::Code(code))
        .build()
        .unwrap();
    // IDTR: limit 0, base 0.
    vm.memory()
        .write_slice(&[0u8; 10], GuestAddress(idtr))
        .unwrap();
    let err = vm.run(LONG).unwrap_err();
    match &err {
        VmError::Vcpu(VcpuError::TripleFault { vcpu: 0, .. }) => {}
        other => panic!("expected a triple fault, got {other:?}"),
    }
    assert!(err.to_string().contains("triple-faulted"), "{err}");
}

#[test]
fn pause_stops_guest_progress_and_resume_restarts_it() {
    if !kvm_available() {
        return;
    }
    // Write to port 0x500 forever.
    let a = Asm::new().mov_dx(0x500).mov_al(1);
    let top = a.here();
    let code = a.out_dx_al().jmp(top).finish();
    let (dev, writes) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("pause"), Boot::Code(code))
        .pio_device(0x500, 1, dev)
        .build()
        .unwrap();
    vm.start().unwrap();
    writes.recv_timeout(LONG).expect("the guest runs");
    vm.pause(LONG).unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(vm.vcpu_states(), &[VcpuState::Paused]);
    // Writes made before the pause took effect may still be queued; none after.
    while writes.try_recv().is_ok() {}
    assert!(
        writes.recv_timeout(Duration::from_millis(200)).is_err(),
        "a paused guest made progress"
    );
    vm.resume(LONG).unwrap();
    assert_eq!(vm.state(), VmState::Running);
    writes.recv_timeout(LONG).expect("the resumed guest runs");
    assert!(matches!(vm.pause(LONG), Ok(())));
    assert!(matches!(
        vm.pause(LONG),
        Err(VmError::InvalidState { op: "pause", .. })
    ));
    assert!(matches!(
        vm.run(LONG),
        Err(VmError::InvalidState { op: "run", .. })
    ));
    vm.stop();
    assert_eq!(vm.state(), VmState::Exited);
}

#[test]
fn ioeventfd_absorbs_the_write_without_an_exit() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new()
        .mov_dx(0x510)
        .mov_al(9)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let (dev, writes) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("ioeventfd"), Boot::Code(code))
        .pio_device(0x510, 1, dev)
        .build()
        .unwrap();
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.vm_fd()
        .register_ioevent(&evt, &IoEventAddress::Pio(0x510), NoDatamatch)
        .unwrap();
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(evt.read().unwrap(), 1);
    assert!(
        writes.try_recv().is_err(),
        "the write exited to the VMM despite the ioeventfd"
    );
}

#[test]
fn irqfd_interrupt_reaches_the_guest_handler() {
    if !kvm_available() {
        return;
    }
    const IDTR: u64 = 0x2000;
    const IDT: u64 = 0x3000;
    const VECTOR: u64 = 0x25; // PIC master offset 0x20 + IRQ 5
    const HANDLER_OFFSET: u64 = 0x200;
    let handler = Asm::new()
        .mov_dx(0x501)
        .mov_al(VECTOR as u8)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let a = pic_init_unmasking(Asm::new().mov_rax(IDTR).lidt_at_rax(), 5)
        // Tell the host we are ready, then wait for the interrupt.
        .mov_dx(0x500)
        .out_dx_al()
        .sti();
    let wait = a.here();
    let mut code = a.hlt().jmp(wait).finish();
    code.resize(HANDLER_OFFSET as usize, 0x90);
    code.extend_from_slice(&handler);

    let (ready_dev, ready) = Recorder::new(&[]);
    let (irq_dev, handled) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("irqfd"), Boot::Code(code))
        .pio_device(0x500, 1, ready_dev)
        .pio_device(0x501, 1, irq_dev)
        .build()
        .unwrap();
    write_idt(vm.memory(), IDTR, IDT, VECTOR, HIMEM_START + HANDLER_OFFSET);

    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.vm_fd().register_irqfd(&irq, 5).unwrap();
    let injector = {
        let irq = irq.try_clone().unwrap();
        std::thread::spawn(move || {
            ready.recv_timeout(LONG).expect("guest ready");
            irq.write(1).unwrap();
        })
    };
    let exit = vm.run(LONG).unwrap();
    injector.join().unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(handled.try_recv().unwrap(), (0, vec![VECTOR as u8]));
}

#[test]
fn console_output_is_rate_limited() {
    if !kvm_available() {
        return;
    }
    // 300 bytes of output against a 64-byte burst at 1 byte/s.
    let a = Asm::new().mov_dx(COM1).mov_ecx(300).mov_al(b'x');
    let top = a.here();
    let code = a
        .out_dx_al()
        .dec_ecx()
        .jnz(top)
        .i8042_reset()
        .spin()
        .finish();
    let mut cfg = config("flood");
    cfg.console_limit = sluice_vmm::devices::console_log::RateLimit {
        bytes_per_sec: 1,
        burst: 64,
    };
    let mut vm = VmBuilder::new(cfg, Boot::Code(code)).build().unwrap();
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    let kept = vm.console_output().len() as u64;
    assert!(
        kept >= 64 && kept < 64 + 1 + exit.elapsed.as_secs(),
        "kept {kept}"
    );
    assert_eq!(kept + vm.console_dropped(), 300);
}

#[test]
fn two_vcpus_run_on_named_threads_and_stop_together() {
    if !kvm_available() {
        return;
    }
    let mut cfg = config("smp");
    cfg.vcpus = 2;
    let code = Asm::new().spin().finish();
    let mut vm = VmBuilder::new(cfg, Boot::Code(code)).build().unwrap();
    vm.start().unwrap();
    vm.pause(LONG).unwrap();
    vm.resume(LONG).unwrap();
    let exit = vm.run(Duration::from_millis(100)).unwrap();
    assert_eq!(exit.reason, ExitReason::TimedOut);
    assert_eq!(vm.vcpu_states(), &[VcpuState::Exited, VcpuState::Exited]);
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

#[test]
fn a_guest_drives_the_virtio_console_over_mmio() {
    if !kvm_available() {
        return;
    }
    use sluice_vmm::virtio::console::{ByteQueue, ConsoleOutput};
    use sluice_vmm::vm::VirtioConsoleConfig;
    const DESC: u64 = 0x40000;
    const AVAIL: u64 = 0x41000;
    const USED: u64 = 0x42000;
    const BUF: u64 = 0x50000;
    let msg = b"hello from the guest over virtio\n";
    let r = |off: u64| VIRTIO_MMIO_BASE + off;
    // The driver's initialisation sequence, then a notify of transmitq0.
    let code = Asm::new()
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
        // Report InterruptStatus on port 0x500.
        .mov_rax(r(0x60))
        .load32_from_rax()
        .mov_dx(0x500)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let sink = Sink::default();
    let (dev, writes) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("virtio"), Boot::Code(code))
        .pio_device(0x500, 1, dev)
        .virtio_console(VirtioConsoleConfig {
            out: ConsoleOutput::Writer(Box::new(sink.clone())),
            input: ByteQueue::new(4096),
        })
        .build()
        .unwrap();
    // The guest's buffers: one readable descriptor, published in the avail ring.
    let m = vm.memory();
    m.write_slice(msg, GuestAddress(BUF)).unwrap();
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&BUF.to_le_bytes());
    desc[8..12].copy_from_slice(&(msg.len() as u32).to_le_bytes());
    m.write_slice(&desc, GuestAddress(DESC)).unwrap();
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();

    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(*sink.0.lock().unwrap(), msg);
    let used_idx: u16 = vm.memory().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 1);
    assert_eq!(
        writes.try_recv().unwrap(),
        (0, vec![1]),
        "InterruptStatus has the used-ring bit"
    );
    let transport = vm.virtio_console().unwrap().lock().unwrap();
    assert!(transport.is_activated());
    assert_eq!(transport.device().stats().tx_bytes, msg.len() as u64);
}

#[test]
fn benchmark_functions_measure_real_exits() {
    if !kvm_available() {
        return;
    }
    let report = sluice_vmm::bench::run(3, 2000, 8).unwrap();
    eprintln!(
        "create-to-first-exit median {:.2} ms (samples {:?}), port-exit round trip {:.2} µs, \
         pause+resume {:.1} µs, virtqueue {:.0} MB/s, vsock {:.0} MB/s (Unix socket {:.0} MB/s)",
        report.create_to_first_exit_median_ms(),
        report.create_to_first_exit_ms,
        report.port_exit_round_trip_us,
        report.pause_resume_us,
        report.virtqueue_mb_per_s,
        report.vsock_mb_per_s,
        report.unix_socket_mb_per_s
    );
    assert!(report.pause_resume_us > 0.0 && report.pause_resume_us < 1e6);
    assert_eq!(report.create_to_first_exit_ms.len(), 3);
    assert!(
        report
            .create_to_first_exit_ms
            .iter()
            .all(|ms| *ms > 0.0 && *ms < 10_000.0)
    );
    // A port exit costs at least a guest->host->guest switch; far under a second.
    assert!(report.port_exit_round_trip_us > 0.1 && report.port_exit_round_trip_us < 1e6);
    assert!(report.virtqueue_mb_per_s > 1.0);
}

/// 8259A master init (vector base 0x20) with only `irq` unmasked.
fn pic_init_unmasking(a: Asm, irq: u8) -> Asm {
    a.mov_al(0x11)
        .out_imm_al(0x20)
        .mov_al(0x20)
        .out_imm_al(0x21)
        .mov_al(0x04)
        .out_imm_al(0x21)
        .mov_al(0x01)
        .out_imm_al(0x21)
        .mov_al(!(1u8 << irq))
        .out_imm_al(0x21)
        .mov_al(0xff)
        .out_imm_al(0xa1)
}

/// Writes an IDTR at `idtr` for a 256-entry IDT at `idt` with one 64-bit
/// interrupt gate: `vector` → `target`.
fn write_idt(mem: &vm_memory::GuestMemoryMmap, idtr: u64, idt: u64, vector: u64, target: u64) {
    let mut r = [0u8; 10];
    r[..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    r[2..].copy_from_slice(&idt.to_le_bytes());
    mem.write_slice(&r, GuestAddress(idtr)).unwrap();
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(target as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&8u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
    mem.write_slice(&gate, GuestAddress(idt + vector * 16))
        .unwrap();
}

#[test]
fn virtio_console_input_reaches_the_guest_with_an_interrupt() {
    if !kvm_available() {
        return;
    }
    use sluice_vmm::virtio::console::{ByteQueue, ConsoleOutput};
    use sluice_vmm::vm::{VIRTIO_FIRST_IRQ, VirtioConsoleConfig};
    const IDTR: u64 = 0x2000;
    const IDT: u64 = 0x3000;
    const DESC: u64 = 0x40000;
    const AVAIL: u64 = 0x41000;
    const USED: u64 = 0x42000;
    const BUF: u64 = 0x50000;
    const HANDLER_OFFSET: u64 = 0x400;
    let vector = 0x20 + u64::from(VIRTIO_FIRST_IRQ);
    let r = |off: u64| VIRTIO_MMIO_BASE + off;
    // Handler: report InterruptStatus on port 0x501, acknowledge, reset.
    let handler = Asm::new()
        .mov_rax(r(0x60))
        .load32_from_rax()
        .mov_dx(0x501)
        .out_dx_al()
        .write32(r(0x64), 1)
        .i8042_reset()
        .spin()
        .finish();
    let a = pic_init_unmasking(
        Asm::new().mov_rax(IDTR).lidt_at_rax(),
        VIRTIO_FIRST_IRQ as u8,
    )
    .write32(r(0x70), 0)
    .write32(r(0x70), 3)
    .write32(r(0x24), 1)
    .write32(r(0x20), 1)
    .write32(r(0x24), 0)
    .write32(r(0x20), 0)
    .write32(r(0x70), 0xb)
    .write32(r(0x30), 0) // receiveq0
    .write32(r(0x38), 16)
    .write32(r(0x80), DESC as u32)
    .write32(r(0x90), AVAIL as u32)
    .write32(r(0xa0), USED as u32)
    .write32(r(0x44), 1)
    .write32(r(0x70), 0xf)
    .write32(r(0x50), 0)
    .sti();
    let wait = a.here();
    let mut code = a.hlt().jmp(wait).finish();
    assert!(code.len() <= HANDLER_OFFSET as usize);
    code.resize(HANDLER_OFFSET as usize, 0x90);
    code.extend_from_slice(&handler);

    let input = ByteQueue::new(4096);
    assert_eq!(input.try_push(b"ping from host"), 14);
    let (dev, handled) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("virtio-rx"), Boot::Code(code))
        .pio_device(0x501, 1, dev)
        .virtio_console(VirtioConsoleConfig {
            out: ConsoleOutput::Writer(Box::new(std::io::sink())),
            input: input.clone(),
        })
        .build()
        .unwrap();
    let m = vm.memory();
    write_idt(m, IDTR, IDT, vector, HIMEM_START + HANDLER_OFFSET);
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&BUF.to_le_bytes());
    desc[8..12].copy_from_slice(&64u32.to_le_bytes());
    desc[12..14].copy_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    m.write_slice(&desc, GuestAddress(DESC)).unwrap();
    m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();

    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(
        handled.try_recv().unwrap(),
        (0, vec![1]),
        "the interrupt handler saw the used-ring bit"
    );
    let mut got = [0u8; 14];
    vm.memory().read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(&got, b"ping from host");
    let used_len: u32 = vm.memory().read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!(used_len, 14);
    assert!(input.is_empty());
    let transport = vm.virtio_console().unwrap().lock().unwrap();
    assert_eq!(
        transport.interrupt_status(),
        0,
        "the guest acknowledged the interrupt"
    );
}

struct Panics;

impl BusDevice for Panics {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        panic!("device model bug");
    }
}

#[test]
fn a_panicking_device_fails_the_run_instead_of_hanging_it() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new().mov_dx(0x500).out_dx_al().spin().finish();
    let mut vm = VmBuilder::new(config("panic"), Boot::Code(code))
        .pio_device(0x500, 1, Arc::new(Mutex::new(Panics)))
        .build()
        .unwrap();
    let err = vm.run(LONG).unwrap_err();
    match err {
        VmError::Vcpu(VcpuError::Panicked { vcpu: 0, message }) => {
            assert_eq!(message, "device model bug")
        }
        other => panic!("expected a vCPU panic, got {other:?}"),
    }
    assert_eq!(vm.vcpu_states(), &[VcpuState::Exited]);
}

#[test]
fn serial_input_is_read_by_the_guest_and_echoed() {
    if !kvm_available() {
        return;
    }
    // Poll LSR.DR, read RBR, echo to THR, until a newline.
    let a = Asm::new();
    let top = a.here();
    let code = a
        .mov_dx(COM1 + 5)
        .in_al_dx()
        .test_al(1)
        .jz(top)
        .mov_dx(COM1)
        .in_al_dx()
        .out_dx_al()
        .cmp_al(b'\n')
        .jnz(top)
        .i8042_reset()
        .spin()
        .finish();
    let mut vm = VmBuilder::new(config("echo"), Boot::Code(code))
        .build()
        .unwrap();
    assert_eq!(vm.console_input(b"echo me\n"), 8);
    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    assert_eq!(vm.console_output(), b"echo me\n");
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_a_clear_error_under_pvm() {
    if !kvm_available() {
        return;
    }
    // mov ecx, 0xff; popcnt eax, ecx; report al on port 0x500; reset.
    let prefix = Asm::new().mov_ecx(0xff);
    let popcnt_at = HIMEM_START + prefix.here() as u64;
    let code = prefix
        .raw(&[0xf3, 0x0f, 0xb8, 0xc1])
        .mov_dx(0x500)
        .out_dx_al()
        .i8042_reset()
        .spin()
        .finish();
    let (dev, writes) = Recorder::new(&[]);
    let mut vm = VmBuilder::new(config("popcnt"), Boot::Code(code))
        .pio_device(0x500, 1, dev)
        .build()
        .unwrap();
    let result = vm.run(LONG);
    if sluice_vmm::host::probe().kvm_module.as_deref() == Some("kvm_pvm") {
        // kvm_pvm emulates guest code and has no POPCNT.
        match result {
            Err(VmError::Vcpu(VcpuError::Internal {
                vcpu: 0,
                suberror: 1,
                rip,
                ..
            })) => assert_eq!(rip, popcnt_at),
            other => panic!("expected an emulation failure at {popcnt_at:#x}, got {other:?}"),
        }
        assert!(writes.try_recv().is_err());
    } else {
        // Hardware virtualization runs it: popcnt(0xff) = 8.
        assert_eq!(result.unwrap().reason, ExitReason::Reset(ResetCause::I8042));
        assert_eq!(writes.try_recv().unwrap(), (0, vec![8]));
    }
}

#[test]
fn agent_channel_carries_bytes_both_ways_over_a_unix_socket() {
    if !kvm_available() {
        return;
    }
    use sluice_vmm::vm::VIRTIO_FIRST_IRQ;
    use std::io::{Read, Write};
    const IDTR: u64 = 0x2000;
    const IDT: u64 = 0x3000;
    const HANDLER_OFFSET: u64 = 0x600;
    // Per queue: descriptors, avail ring, used ring, buffer.
    let rings = |q: u64| {
        (
            0x40000 + q * 0x4000,
            0x41000 + q * 0x4000,
            0x42000 + q * 0x4000,
            0x60000 + q * 0x1000,
        )
    };
    let r = |off: u64| VIRTIO_MMIO_BASE + off;
    let msg = b"hello host, this is the guest";
    // Interrupt handler: acknowledge, transmit the prepared buffer, reset.
    let handler = Asm::new()
        .write32(r(0x64), 1)
        .write32(r(0x50), 1)
        .i8042_reset()
        .spin()
        .finish();
    let mut a = pic_init_unmasking(
        Asm::new().mov_rax(IDTR).lidt_at_rax(),
        VIRTIO_FIRST_IRQ as u8,
    )
    .write32(r(0x70), 0)
    .write32(r(0x70), 3)
    .write32(r(0x24), 1)
    .write32(r(0x20), 1)
    .write32(r(0x24), 0)
    .write32(r(0x20), 0)
    .write32(r(0x70), 0xb);
    for q in 0..2u64 {
        let (desc, avail, used, _) = rings(q);
        a = a
            .write32(r(0x30), q as u32)
            .write32(r(0x38), 16)
            .write32(r(0x80), desc as u32)
            .write32(r(0x90), avail as u32)
            .write32(r(0xa0), used as u32)
            .write32(r(0x44), 1);
    }
    let a = a.write32(r(0x70), 0xf).write32(r(0x50), 0).sti();
    let wait = a.here();
    let mut code = a.hlt().jmp(wait).finish();
    assert!(code.len() <= HANDLER_OFFSET as usize);
    code.resize(HANDLER_OFFSET as usize, 0x90);
    code.extend_from_slice(&handler);

    let (builder, mut host) = VmBuilder::new(config("agent-channel"), Boot::Code(code))
        .agent_channel()
        .unwrap();
    let mut vm = builder.build().unwrap();
    let m = vm.memory();
    write_idt(
        m,
        IDTR,
        IDT,
        0x20 + u64::from(VIRTIO_FIRST_IRQ),
        HIMEM_START + HANDLER_OFFSET,
    );
    // receiveq0: one 64-byte writable buffer; transmitq0: the message.
    for (q, len, flags, data) in [
        (0u64, 64u32, 2u16, &b""[..]),
        (1, msg.len() as u32, 0, &msg[..]),
    ] {
        let (desc, avail, _, buf) = rings(q);
        m.write_slice(data, GuestAddress(buf)).unwrap();
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&buf.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&d, GuestAddress(desc)).unwrap();
        m.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    }
    host.write_all(b"hello agent").unwrap();
    // The device returns the transmit buffer (an interrupt, after which the
    // guest resets) as soon as it is activated: wait until the input pump
    // has queued the host's bytes, or they may miss the run.
    let input = vm
        .virtio_console()
        .unwrap()
        .lock()
        .unwrap()
        .device()
        .input()
        .clone();
    let deadline = std::time::Instant::now() + LONG;
    while input.len() < b"hello agent".len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the input pump never queued the bytes"
        );
        std::thread::yield_now();
    }

    let exit = vm.run(LONG).unwrap();
    assert_eq!(exit.reason, ExitReason::Reset(ResetCause::I8042));
    let (_, _, rx_used, rx_buf) = rings(0);
    let len: u32 = vm.memory().read_obj(GuestAddress(rx_used + 8)).unwrap();
    let mut got = vec![0u8; len as usize];
    vm.memory()
        .read_slice(&mut got, GuestAddress(rx_buf))
        .unwrap();
    assert_eq!(got, b"hello agent");
    host.set_read_timeout(Some(LONG)).unwrap();
    let mut back = vec![0u8; msg.len()];
    host.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn dropping_a_vm_ends_a_blocked_agent_channel() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    // The guest never posts receive buffers.
    let (builder, host) = VmBuilder::new(
        config("blocked-channel"),
        Boot::Code(Asm::new().spin().finish()),
    )
    .agent_channel()
    .unwrap();
    let mut vm = builder.build().unwrap();
    vm.start().unwrap();
    // More than the input queue holds: the pump ends up waiting for room.
    let writer = std::thread::spawn(move || {
        let chunk = vec![7u8; 64 * 1024];
        let mut host = host;
        for _ in 0..8 {
            if host.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (done_tx, done_rx) = channel();
    std::thread::spawn(move || {
        drop(vm);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(LONG)
        .expect("dropping the VM hung on the agent channel");
    writer.join().unwrap();
}
