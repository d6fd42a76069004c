//! A minimal i8042 keyboard controller: enough for Linux's `reboot=k`
//! path. Writing `0xFE` (pulse reset line) to the command port resets the
//! machine, which for a sluice microVM means: shut it down.

use std::sync::mpsc::Sender;

use crate::devices::BusDevice;
use crate::vm::{ResetCause, VmEvent};

/// Port of the data register (`0x60`); the device spans `0x60..=0x64`.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Size of the port range.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command/status port `0x64` within the range.
const COMMAND_OFFSET: u64 = 4;
/// The "pulse output line 0 low" command: CPU reset.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; sends [`VmEvent::Reset`] on a reset command.
#[derive(Debug)]
pub struct I8042 {
    events: Sender<VmEvent>,
    resets: u64,
}

impl I8042 {
    /// A controller reporting resets on `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        Self { events, resets: 0 }
    }

    /// How many reset commands the guest issued.
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.resets += 1;
            // The receiver is gone only when the VM is being torn down.
            let _ = self.events.send(VmEvent::Reset(ResetCause::I8042));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn reset_command_sends_a_reset_event() {
        let (tx, rx) = channel();
        let mut dev = I8042::new(tx);
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(rx.try_recv().is_err(), "the data port must not reset");
        dev.write(COMMAND_OFFSET, &[0xd1]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(
            rx.try_recv(),
            Ok(VmEvent::Reset(ResetCause::I8042))
        ));
        assert_eq!(dev.resets(), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
