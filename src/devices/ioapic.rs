//! The IOAPIC, emulated in ember, and the interrupt lines (irqfds) devices raise.
//!
//! Why ember emulates it: see `vm::irq` (a split irqchip keeps VM teardown cheap). Each
//! IOAPIC pin is an irqfd on the GSI of the same number; the GSI's route is an MSI that
//! ember recomputes whenever the guest programs the pin's redirection entry. A device
//! interrupt is therefore one eventfd write, delivered by KVM straight to the LAPIC with
//! no exit to ember.

use std::sync::Arc;

use kvm_bindings::{KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::bus::BusDevice;
use crate::vm::layout::{IOAPIC_NUM_PINS, LAPIC_START};

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM refused irqfd for GSI {1}: {0}")]
    Irqfd(kvm_ioctls::Error, u32),
    #[error("the IOAPIC has no pin {0}")]
    NoSuchPin(u32),
}

/// An interrupt line a device raises: an irqfd. Edge semantics: each trigger is one interrupt.
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
    pub fn try_clone(&self) -> std::io::Result<IrqLine> {
        self.0.try_clone().map(IrqLine)
    }
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
    /// Wraps an eventfd the caller registered as an irqfd (or, in unit tests, any eventfd).
    pub fn from_eventfd(evt: EventFd) -> IrqLine {
        IrqLine(evt)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;
const REG_ID: u32 = 0x00;
const REG_VER: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_REDIR_BASE: u32 = 0x10;
/// Version 0x11 (82093AA), maximum redirection entry in bits 23:16.
const IOAPIC_VERSION: u32 = 0x11 | ((IOAPIC_NUM_PINS - 1) << 16);
const RTE_MASKED: u64 = 1 << 16;
/// Guest-writable bits of a redirection entry (delivery status and remote IRR are read-only).
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// The IOAPIC, emulated in ember (MMIO at layout::IOAPIC_START).
pub struct Ioapic {
    vm: Arc<VmFd>,
    ioregsel: u32,
    id: u32,
    redirection: [u64; IOAPIC_NUM_PINS as usize],
    /// Pins wired to a device, each with its irqfd. Only those get one: every irqfd
    /// costs an SRCU grace period when the VM is torn down.
    lines: Vec<Option<IrqLine>>,
}

impl Ioapic {
    /// Creates the IOAPIC with every pin masked, as at reset.
    pub fn new(vm: Arc<VmFd>) -> Result<Ioapic, IrqError> {
        Ok(Ioapic {
            vm,
            ioregsel: 0,
            id: 0,
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS as usize],
            lines: (0..IOAPIC_NUM_PINS).map(|_| None).collect(),
        })
    }

    /// A handle on pin `pin`'s line (an irqfd on GSI `pin`), for the device wired to it.
    pub fn line(&mut self, pin: u32) -> Result<IrqLine, IrqError> {
        let slot = self
            .lines
            .get_mut(pin as usize)
            .ok_or(IrqError::NoSuchPin(pin))?;
        if slot.is_none() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            self.vm
                .register_irqfd(&evt, pin)
                .map_err(|e| IrqError::Irqfd(e, pin))?;
            *slot = Some(IrqLine(evt));
        }
        slot.as_ref()
            .ok_or(IrqError::NoSuchPin(pin))?
            .try_clone()
            .map_err(IrqError::EventFd)
    }

    /// The registers, for a snapshot.
    pub fn save_state(&self) -> crate::snapshot::devices::IoapicState {
        crate::snapshot::devices::IoapicState {
            ioregsel: self.ioregsel,
            id: self.id,
            redirection: self.redirection.to_vec(),
        }
    }

    /// Puts saved registers back and reprograms KVM's routes from them.
    pub fn restore_state(
        &mut self,
        s: &crate::snapshot::devices::IoapicState,
    ) -> Result<(), String> {
        if s.redirection.len() != self.redirection.len() {
            return Err(format!(
                "IOAPIC: {} redirection entries, expected {}",
                s.redirection.len(),
                self.redirection.len()
            ));
        }
        self.ioregsel = s.ioregsel & 0xff;
        self.id = s.id & 0x0f00_0000;
        for (dst, src) in self.redirection.iter_mut().zip(&s.redirection) {
            *dst = src & (RTE_WRITABLE | RTE_MASKED);
        }
        self.update_routes();
        Ok(())
    }

    fn read_reg(&self) -> u32 {
        match self.ioregsel {
            REG_ID => self.id,
            REG_VER => IOAPIC_VERSION,
            REG_ARB => self.id,
            r if r >= REG_REDIR_BASE => {
                let idx = ((r - REG_REDIR_BASE) / 2) as usize;
                let high = (r - REG_REDIR_BASE) % 2 == 1;
                match self.redirection.get(idx) {
                    Some(v) if high => (v >> 32) as u32,
                    Some(v) => *v as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, value: u32) {
        match self.ioregsel {
            REG_ID => self.id = value & 0x0f00_0000,
            r if r >= REG_REDIR_BASE => {
                let idx = ((r - REG_REDIR_BASE) / 2) as usize;
                let high = (r - REG_REDIR_BASE) % 2 == 1;
                let Some(entry) = self.redirection.get_mut(idx) else {
                    return;
                };
                let old = *entry;
                let new = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                *entry = (old & !RTE_WRITABLE) | (new & RTE_WRITABLE);
                if *entry != old {
                    self.update_routes();
                }
            }
            _ => {}
        }
    }

    /// Rebuilds KVM's GSI routing from the redirection table: one MSI route per unmasked pin.
    fn update_routes(&self) {
        let entries: Vec<kvm_irq_routing_entry> = self
            .redirection
            .iter()
            .enumerate()
            .filter(|(_, rte)| *rte & RTE_MASKED == 0)
            .map(|(pin, rte)| msi_route(pin as u32, *rte))
            .collect();
        let routing = match KvmIrqRouting::from_entries(&entries) {
            Ok(r) => r,
            Err(e) => {
                log::error!("cannot build IOAPIC routing table: {e:?}");
                return;
            }
        };
        if let Err(e) = self.vm.set_gsi_routing(&routing) {
            log::error!("KVM refused the IOAPIC routing table: {e}");
        }
    }
}

/// The MSI that delivers what redirection entry `rte` describes.
fn msi_route(gsi: u32, rte: u64) -> kvm_irq_routing_entry {
    let vector = (rte & 0xff) as u32;
    let delivery_mode = ((rte >> 8) & 0x7) as u32;
    let dest_mode_logical = (rte >> 11) & 1;
    let dest = ((rte >> 56) & 0xff) as u32;
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = LAPIC_START as u32 | (dest << 12) | ((dest_mode_logical as u32) << 2);
    e.u.msi.address_hi = 0;
    // Edge-triggered: devices signal each event once through their irqfd, so the LAPIC
    // need not report EOIs back for a level line.
    e.u.msi.data = vector | (delivery_mode << 8);
    e
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_reg(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (d, s) in data.iter_mut().zip(bytes.iter()) {
            *d = *s;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        for (d, s) in raw.iter_mut().zip(data.iter()) {
            *d = *s;
        }
        let value = u32::from_le_bytes(raw);
        match offset {
            IOREGSEL => self.ioregsel = value & 0xff,
            IOWIN => self.write_reg(value),
            // Edge-triggered routes need no EOI handling.
            IOEOI => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_route_from_rte() {
        // Vector 0x31, fixed delivery, physical destination 2.
        let rte = 0x31u64 | (2u64 << 56);
        let e = msi_route(4, rte);
        // SAFETY: the entry was built as an MSI route; reading the msi member is what was written.
        let msi = unsafe { e.u.msi };
        assert_eq!(msi.address_lo, 0xfee0_2000);
        assert_eq!(msi.data, 0x31);
        assert_eq!(e.gsi, 4);
    }
}
