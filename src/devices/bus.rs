//! Port-I/O and MMIO buses: address ranges mapped to devices. A vCPU thread dispatches
//! its exits here; devices know nothing of vCPUs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device on a bus: reads and writes at an offset from the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

/// Accesses that hit no device: reads return all ones, writes are dropped, both counted.
#[derive(Default)]
pub struct UnmappedCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

#[derive(Default)]
pub struct Bus {
    // Keyed by base; value is (length, device).
    devices: BTreeMap<u64, (u64, SharedDevice)>,
    pub unmapped: UnmappedCounters,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0 {
            return Err(OverlapError { base, len });
        }
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(OverlapError { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Returns false (and fills `data` with all ones) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        if let Some((offset, dev)) = self.find(addr) {
            // A device that panicked while locked is poisoned; keep serving it rather
            // than take the VMM down (its state is still memory-safe).
            let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
            d.read(offset, data);
            return true;
        }
        data.fill(0xff);
        self.unmapped.reads.fetch_add(1, Ordering::Relaxed);
        false
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        if let Some((offset, dev)) = self.find(addr) {
            let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
            d.write(offset, data);
            return true;
        }
        self.unmapped.writes.fetch_add(1, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_unmapped() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x12, 4, Arc::new(Mutex::new(Echo(1)))).is_err());
        assert!(bus.insert(0x0f, 2, Arc::new(Mutex::new(Echo(1)))).is_err());
        bus.insert(0x14, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.write(0x100, &[1]));
        assert_eq!(bus.unmapped.reads.load(Ordering::Relaxed), 1);
        assert_eq!(bus.unmapped.writes.load(Ordering::Relaxed), 1);
    }
}
