//! Virtio devices over the virtio-mmio transport (version 2: virtio 1.x only).
//!
//! Every device implements [`VirtioDevice`]; [`MmioTransport`] turns it into a bus device
//! (registers at a 4 KiB MMIO window) and an event-loop subscriber (guest kicks arrive as
//! ioeventfds). Queue processing lives in the devices, apart from the event-loop glue, so
//! it can be unit-tested on plain guest memory.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_ioctls::VmFd;
use virtio_queue::Queue;

use crate::config::drive::DriveConfig;
use crate::config::net::NetworkInterfaceConfig;
use crate::devices::bus::Bus;
use crate::vm::irq::{Ioapic, IrqLine};
use crate::vm::layout::{
    VIRTIO_IRQ_BASE, VIRTIO_MMIO_MAX_DEVICES, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::vm::memory::GuestMemory;

pub use block::Block;
pub use mmio::MmioTransport;
pub use net::Net;

/// InterruptStatus bit: the device used a buffer.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("drive `{id}`: cannot open {path}: {source}")]
    OpenDisk {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("drive `{id}`: cannot find the size of {path}: {source}")]
    DiskSize {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("too many virtio devices: at most {max} fit in the MMIO space and IOAPIC pins")]
    TooManyDevices { max: u64 },
    #[error("cannot create a virtio eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot get IOAPIC pin {pin} for a virtio device: {source}")]
    IrqLine {
        pin: u32,
        source: crate::vm::irq::IrqError,
    },
    #[error("KVM refused the queue-notify ioeventfd at {addr:#x}: {source}")]
    IoEvent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("network interface `{id}`: {source}")]
    Tap { id: String, source: tap::TapError },
    #[error("cannot create an epoll instance for a network interface: {0}")]
    Epoll(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::OverlapError),
}

/// Why a device refused to start when the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("already active")]
    AlreadyActive,
    #[error("{0}")]
    Other(String),
}

/// A device's interrupt: the InterruptStatus register it shares with its transport, and
/// the irqfd that raises its IOAPIC pin.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    pub fn new(line: IrqLine) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver the device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it handled.
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a virtio device provides to the transport. Everything the guest sends reaches the
/// device through these calls, always under the transport's lock.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block, 1 for net).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads `data.len()` bytes of the configuration space at `offset`; bytes beyond the
    /// space read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (ignored by devices without writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up and the features it accepted.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// Handles a kick on queue `index`. Returns true if work is left (the drain was capped),
    /// so the caller kicks again later instead of starving other devices.
    fn process_queue(&mut self, index: usize) -> bool;
    /// Back to the state before activation (driver wrote 0 to Status).
    fn reset(&mut self);
    /// Makes everything the device acknowledged durable (block: fdatasync).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// File descriptors besides the queue kicks the device wants watched (e.g. a tap).
    fn event_sources(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of `event_sources()` (by position) is readable.
    fn process_event(&mut self, _source: usize) {}
    /// Replaces the device's backing file (PATCH /drives after start). Returns whether the
    /// config space changed, so the transport can notify the driver.
    fn update_backing(&mut self, _path: &str) -> Result<bool, String> {
        Err("this device has no backing file".into())
    }
}

/// The kernel command-line entry that tells Linux about one virtio-mmio device.
pub fn mmio_cmdline_entry(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Guest-physical base and IRQ of virtio-mmio slot `slot`.
pub fn slot_resources(slot: u32) -> Result<(u64, u32), VirtioError> {
    if u64::from(slot) >= VIRTIO_MMIO_MAX_DEVICES {
        return Err(VirtioError::TooManyDevices {
            max: VIRTIO_MMIO_MAX_DEVICES,
        });
    }
    Ok((
        VIRTIO_MMIO_START + u64::from(slot) * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + slot,
    ))
}

/// Puts `device` in the next virtio-mmio slot: transport on the MMIO bus, queue-notify
/// ioeventfds registered with KVM, IRQ from the IOAPIC. Returns the transport (it is also
/// the event-loop subscriber) and its kernel command-line entry.
pub fn attach_mmio_device(
    device: Box<dyn VirtioDevice>,
    vm: &VmFd,
    ioapic: &mut Ioapic,
    mem: &GuestMemory,
    mmio: &mut Bus,
    next_slot: &mut u32,
) -> Result<(Arc<Mutex<MmioTransport>>, String), VirtioError> {
    let (base, irq) = slot_resources(*next_slot)?;
    let line = ioapic
        .line(irq)
        .map_err(|source| VirtioError::IrqLine { pin: irq, source })?;
    let transport = MmioTransport::new(device, mem.clone(), line)?;
    transport.register_ioevents(vm, base)?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
    *next_slot += 1;
    Ok((transport, mmio_cmdline_entry(base, irq)))
}

/// The block devices of a VM, ready to be put on the event loop.
pub struct BlockDevices {
    /// Kernel command-line additions: one `virtio_mmio.device=` per drive, then
    /// `root=...` and `rw`/`ro` if a drive is the root device.
    pub cmdline: Vec<String>,
    /// The transports, in config order (each is a bus device and an event subscriber).
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
}

impl BlockDevices {
    /// The event-loop subscribers (one per device).
    pub fn subscribers(&self) -> Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>> {
        self.devices
            .iter()
            .map(|d| d.clone() as Arc<Mutex<dyn MutEventSubscriber + Send>>)
            .collect()
    }
}

/// Makes every acknowledged write durable; call on every VMM exit path.
pub fn flush_all(devices: &[Arc<Mutex<MmioTransport>>]) {
    for d in devices {
        let mut t = d.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = t.flush() {
            log::error!("cannot flush a virtio device: {e}");
        }
    }
}

/// Creates one virtio-blk device per drive, in config order, in consecutive virtio-mmio
/// slots starting at `*next_slot`. Each device gets its own clone of the guest memory
/// handle (a `GuestMemoryMmap` clone only copies the `Arc`s of its regions).
pub fn create_block_devices(
    drives: &[DriveConfig],
    vm: &VmFd,
    ioapic: &mut Ioapic,
    mem: &GuestMemory,
    mmio: &mut Bus,
    next_slot: &mut u32,
) -> Result<BlockDevices, VirtioError> {
    let mut cmdline = Vec::with_capacity(drives.len() + 2);
    let mut devices = Vec::with_capacity(drives.len());
    let mut root = Vec::new();
    for (position, drive) in drives.iter().enumerate() {
        let block = Block::new(drive)?;
        let (transport, entry) =
            attach_mmio_device(Box::new(block), vm, ioapic, mem, mmio, next_slot)?;
        log::info!("drive `{}`: virtio-blk {entry}", drive.drive_id);
        cmdline.push(entry);
        devices.push(transport);
        if drive.is_root_device {
            root = root_cmdline(drive, position);
        }
    }
    cmdline.extend(root);
    Ok(BlockDevices { cmdline, devices })
}

/// The network devices of a VM, ready to be put on the event loop.
pub struct NetDevices {
    /// Kernel command-line additions: one `virtio_mmio.device=` per interface.
    pub cmdline: Vec<String>,
    /// `(iface_id, transport)` in config order.
    pub devices: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

/// Creates one virtio-net device per network interface, in config order, in consecutive
/// virtio-mmio slots from `*next_slot` (after the drives). Each opens its TAP now, so a
/// TAP that cannot be used fails the build before the guest runs.
pub fn create_net_devices(
    ifaces: &[NetworkInterfaceConfig],
    vm: &VmFd,
    ioapic: &mut Ioapic,
    mem: &GuestMemory,
    mmio: &mut Bus,
    next_slot: &mut u32,
) -> Result<NetDevices, VirtioError> {
    let mut cmdline = Vec::with_capacity(ifaces.len());
    let mut devices = Vec::with_capacity(ifaces.len());
    for iface in ifaces {
        let metrics = Arc::new(net::NetMetrics::default());
        let dev = Net::from_config(iface, metrics.clone())?;
        let mac = dev.mac();
        let (transport, entry) =
            attach_mmio_device(Box::new(dev), vm, ioapic, mem, mmio, next_slot)?;
        metrics.register(&iface.iface_id);
        log::info!(
            "network interface `{}`: virtio-net on TAP `{}`, guest MAC {mac}{}, {entry}",
            iface.iface_id,
            iface.host_dev_name,
            if iface.guest_mac.is_none() {
                " (generated)"
            } else {
                ""
            }
        );
        cmdline.push(entry);
        devices.push((iface.iface_id.clone(), transport));
    }
    Ok(NetDevices { cmdline, devices })
}

/// `root=` and `rw`/`ro` for the root drive at `position` among the block devices. Linux
/// names virtio disks in probe order, which is command-line order: vda, vdb, ...
fn root_cmdline(drive: &DriveConfig, position: usize) -> Vec<String> {
    let root = match &drive.partuuid {
        Some(uuid) => format!("root=PARTUUID={uuid}"),
        None => format!("root=/dev/vd{}", disk_letters(position)),
    };
    let mode = if drive.is_read_only { "ro" } else { "rw" };
    vec![root, mode.to_string()]
}

/// Linux's disk suffix for index `i`: a..z, aa..zz, ...
fn disk_letters(i: usize) -> String {
    let mut n = i;
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_entry_and_slots() {
        let (base, irq) = slot_resources(0).unwrap();
        assert_eq!(
            mmio_cmdline_entry(base, irq),
            "virtio_mmio.device=4K@0xd0001000:5"
        );
        let (base, irq) = slot_resources(2).unwrap();
        assert_eq!((base, irq), (0xd000_3000, 7));
        assert!(slot_resources(VIRTIO_MMIO_MAX_DEVICES as u32).is_err());
    }

    #[test]
    fn root_entries() {
        let mut d: DriveConfig = serde_json::from_str(
            r#"{"drive_id": "r", "path_on_host": "/r", "is_root_device": true}"#,
        )
        .unwrap();
        assert_eq!(root_cmdline(&d, 1), ["root=/dev/vdb", "rw"]);
        d.is_read_only = true;
        d.partuuid = Some("0eaa91a0-01".into());
        assert_eq!(root_cmdline(&d, 0), ["root=PARTUUID=0eaa91a0-01", "ro"]);
    }

    #[test]
    fn disk_names() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
    }
}
