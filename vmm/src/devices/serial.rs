//! The COM1 16550A UART (vm-superio), its interrupt as an eventfd that KVM
//! injects on IRQ 4 (irqfd), its output into a [`ConsoleLog`].

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::devices::console_log::ConsoleLog;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 port count.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1 IRQ line.
pub const COM1_IRQ: u32 = 4;

/// An eventfd as vm-superio's interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial device on the port bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleLog>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleLog) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// A UART in the state `state` (from a snapshot).
    pub fn from_state(
        irq: EventFd,
        out: ConsoleLog,
        state: &vm_superio::serial::SerialState,
    ) -> Result<Self, String> {
        Serial::from_state(
            state,
            EventFdTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map(|serial| Self { serial })
        .map_err(|e| format!("serial: {e:?}"))
    }

    /// Registers and unread input, for a snapshot.
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_PORT_LEN {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < COM1_PORT_LEN
            && let Err(e) = self.serial.write(offset as u8, data[0])
        {
            tracing::debug!(error = %e, "serial write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::console_log::{ConsoleCapture, RateLimit};

    #[test]
    fn transmitted_bytes_reach_the_console_and_raise_the_irq() {
        let cap = ConsoleCapture::new(64);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleLog::new("t", RateLimit::default(), cap.clone()),
        );
        // Enable the THR-empty interrupt (IER bit 1), then send "hi".
        dev.write(1, &[0x02]);
        dev.write(0, b"h");
        dev.write(0, b"i");
        assert_eq!(cap.bytes(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        // LSR reports the transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn input_is_readable_from_the_data_register() {
        let cap = ConsoleCapture::new(64);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, ConsoleLog::new("t", RateLimit::default(), cap));
        assert_eq!(dev.enqueue_input(b"k"), 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, *b"k");
    }
}
