//! The i8042 keyboard controller: CPU reset (through vm-superio's device) and just enough
//! of the controller and a keyboard for Linux's i8042/atkbd drivers and for
//! SendCtrlAltDel to reach the guest.

use std::collections::VecDeque;

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::devices::ioapic::IrqLine;

/// Trigger for vm-superio's reset event.
pub struct ResetTrigger(pub EventFd);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_I8042_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const SB_SYSTEM_FLAG: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;

/// Set-2 scancodes of Ctrl, Alt, Del (pressed), as Firecracker sends them.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const BUF_SIZE: usize = 16;

pub struct I8042 {
    reset: I8042Device<ResetTrigger>,
    irq: IrqLine,
    buf: VecDeque<u8>,
    status: u8,
    ctr: u8,
    outp: u8,
    /// The controller command waiting for its data byte.
    pending: Option<u8>,
}

impl I8042 {
    pub fn new(reset_evt: EventFd, irq: IrqLine) -> I8042 {
        I8042 {
            reset: I8042Device::new(ResetTrigger(reset_evt)),
            irq,
            buf: VecDeque::with_capacity(BUF_SIZE),
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            ctr: CTR_KBD_INT,
            outp: 0,
            pending: None,
        }
    }

    /// The controller's registers and keyboard buffer, for a snapshot.
    pub fn save_state(&self) -> crate::snapshot::devices::I8042State {
        crate::snapshot::devices::I8042State {
            buf: self.buf.iter().copied().collect(),
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending: self.pending,
        }
    }

    pub fn restore_state(
        &mut self,
        s: &crate::snapshot::devices::I8042State,
    ) -> Result<(), String> {
        if s.buf.len() > BUF_SIZE {
            return Err(format!(
                "i8042: {} buffered bytes, at most {BUF_SIZE}",
                s.buf.len()
            ));
        }
        if s.pending
            .is_some_and(|p| p != CMD_WRITE_CTR && p != CMD_WRITE_OUTP)
        {
            return Err("i8042: a pending command that takes no data".into());
        }
        self.buf = s.buf.iter().copied().collect();
        self.status = s.status;
        self.ctr = s.ctr;
        self.outp = s.outp;
        self.pending = s.pending;
        Ok(())
    }

    fn push(&mut self, byte: u8) -> bool {
        if self.buf.len() >= BUF_SIZE {
            return false;
        }
        self.buf.push_back(byte);
        self.status |= SB_OUT_DATA_AVAIL;
        true
    }

    fn raise(&self) {
        if self.ctr & CTR_KBD_INT != 0 {
            let _ = self.irq.trigger();
        }
    }

    /// Injects Ctrl-Alt-Del key presses. Returns false if the buffer had no room.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if self.buf.len() + CTRL_ALT_DEL.len() > BUF_SIZE {
            return false;
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.raise();
        true
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_I8042_CMD_DATA;
        match cmd {
            CMD_READ_CTR => {
                let ctr = self.ctr;
                self.push(ctr);
            }
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_READ_OUTP => {
                let outp = self.outp;
                self.push(outp);
            }
            CMD_SELF_TEST => {
                self.push(0x55);
            }
            CMD_TEST_KBD | CMD_TEST_AUX => {
                self.push(0x00);
            }
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLE,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLE,
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.write(COMMAND as u8, cmd) {
                    log::error!("i8042: cannot signal guest reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_I8042_CMD_DATA;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTP) => self.outp = byte,
            _ => {
                // A byte for the keyboard: acknowledge it (and report a reset as passed).
                self.push(KBD_ACK);
                if byte == 0xff {
                    self.push(KBD_RESET_OK);
                }
                self.raise();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA => {
                let v = self.buf.pop_front().unwrap_or(0);
                if self.buf.is_empty() {
                    self.status &= !SB_OUT_DATA_AVAIL;
                }
                v
            }
            COMMAND => self.status,
            _ => 0xff,
        };
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA => self.data(byte),
            COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn dev() -> (I8042, EventFd) {
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = crate::devices::ioapic::IrqLine::from_eventfd(irq_evt);
        (I8042::new(reset.try_clone().unwrap(), irq), reset)
    }

    #[test]
    fn reset_command_signals() {
        let (mut d, reset) = dev();
        d.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn ctrl_alt_del_is_readable() {
        let (mut d, _) = dev();
        assert!(d.send_ctrl_alt_del());
        let mut got = vec![];
        let mut b = [0u8];
        loop {
            d.read(COMMAND, &mut b);
            if b[0] & SB_OUT_DATA_AVAIL == 0 {
                break;
            }
            d.read(DATA, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, CTRL_ALT_DEL);
    }

    #[test]
    fn ctr_round_trip() {
        let (mut d, _) = dev();
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x47]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        let mut b = [0u8];
        d.read(DATA, &mut b);
        assert_eq!(b[0], 0x47);
    }
}
