//! The device manager: creates every device of a VM, gives each its bus window and IOAPIC
//! pin, collects the kernel command-line entries that describe them, and keeps them for
//! the VM's life (flush on exit, drive updates, Ctrl-Alt-Del).
//!
//! [`DeviceManager::devices`] lists every device with its kind and id: the one place that
//! knows all of them, so code that must visit each device (flush, and later snapshot and
//! restore) iterates that list instead of knowing the builder's order.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::boot_timer::BootTimer;
use super::bus::{Bus, OverlapError, SharedDevice};
use super::i8042::I8042;
use super::ioapic::{Ioapic, IrqError};
use super::rate_limiter::RateLimiter;
use super::serial::{ConsoleInput, ConsoleOut, SerialDevice};
use super::virtio::balloon::{Balloon, BalloonState};
use super::virtio::rng::{EntropyBudget, Rng, Unlimited};
use super::virtio::vsock::Vsock;
use super::virtio::{Block, MmioTransport, Net, VirtioDevice, VirtioError, net::NetMetrics};
use crate::config::MmdsConfig;
use crate::config::drive::DriveConfig;
use crate::config::net::NetworkInterfaceConfig;
use crate::config::vsock::VsockConfig;
use crate::config::{BalloonConfig, EntropyDeviceConfig};
use crate::mmds::SharedMmds;
use crate::mmds::stack::MmdsStack;
use crate::vm::layout::{
    BOOT_TIMER_SIZE, BOOT_TIMER_START, I8042_IRQ, I8042_PORT_BASE, I8042_PORT_SIZE, IOAPIC_SIZE,
    IOAPIC_START, SERIAL_IRQ, SERIAL_PORT_BASE, SERIAL_PORT_SIZE, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_MAX_DEVICES, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::vm::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error(transparent)]
    Bus(#[from] OverlapError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error("cannot create a device eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot create the balloon's statistics timer: {0}")]
    Timer(std::io::Error),
    #[error("cannot open the serial output {path}: {source}")]
    SerialOut {
        path: String,
        source: std::io::Error,
    },
    #[error("devices cannot be added once the vCPUs use the buses")]
    BusesInUse,
}

/// What a device is, as snapshot/restore and logs name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Ioapic,
    Serial,
    I8042,
    BootTimer,
    VirtioBlock,
    VirtioNet,
    VirtioVsock,
    VirtioRng,
    VirtioBalloon,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Ioapic => "ioapic",
            DeviceKind::Serial => "serial",
            DeviceKind::I8042 => "i8042",
            DeviceKind::BootTimer => "boot-timer",
            DeviceKind::VirtioBlock => "virtio-blk",
            DeviceKind::VirtioNet => "virtio-net",
            DeviceKind::VirtioVsock => "virtio-vsock",
            DeviceKind::VirtioRng => "virtio-rng",
            DeviceKind::VirtioBalloon => "virtio-balloon",
        }
    }
}

/// Which bus a device's registers are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusKind {
    Pio,
    Mmio,
}

/// One device of the VM: what it is, its id (a drive_id or iface_id for virtio devices,
/// the kind's name otherwise), where its registers are and which IOAPIC pin it raises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub id: String,
    pub bus: BusKind,
    pub base: u64,
    pub size: u64,
    pub irq: Option<u32>,
}

/// A virtio device with its identity.
struct VirtioSlot {
    kind: DeviceKind,
    id: String,
    transport: Arc<Mutex<MmioTransport>>,
}

/// Every device of one VM.
pub struct DeviceManager {
    vm: Arc<VmFd>,
    mem: GuestMemory,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    ioapic: Arc<Mutex<Ioapic>>,
    serial: Option<(Arc<Mutex<SerialDevice>>, EventFd)>,
    /// The UART again: `serial` moves to the event loop, snapshots still need it.
    uart: Option<Arc<Mutex<SerialDevice>>>,
    i8042: Option<Arc<Mutex<I8042>>>,
    virtio: Vec<VirtioSlot>,
    devices: Vec<DeviceInfo>,
    /// `virtio_mmio.device=` entries, in slot order.
    cmdline: Vec<String>,
    /// `root=` and `rw`/`ro`, after the device entries.
    root_cmdline: Vec<String>,
    /// The balloon's state, shared with its device, for the API.
    balloon: Option<Arc<Mutex<BalloonState>>>,
}

impl DeviceManager {
    /// Starts with empty buses and the IOAPIC, which every other device needs for its IRQ.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemory) -> Result<DeviceManager, DeviceError> {
        let ioapic = Arc::new(Mutex::new(Ioapic::new(vm.clone())?));
        let mut dm = DeviceManager {
            vm,
            mem,
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            ioapic: ioapic.clone(),
            serial: None,
            uart: None,
            i8042: None,
            virtio: Vec::new(),
            devices: Vec::new(),
            cmdline: Vec::new(),
            root_cmdline: Vec::new(),
            balloon: None,
        };
        dm.insert(
            DeviceKind::Ioapic,
            None,
            BusKind::Mmio,
            IOAPIC_START,
            IOAPIC_SIZE,
            None,
            ioapic,
        )?;
        Ok(dm)
    }

    /// Puts `dev` on a bus and records it.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        kind: DeviceKind,
        id: Option<&str>,
        bus: BusKind,
        base: u64,
        size: u64,
        irq: Option<u32>,
        dev: SharedDevice,
    ) -> Result<(), DeviceError> {
        let target = match bus {
            BusKind::Pio => &mut self.pio,
            BusKind::Mmio => &mut self.mmio,
        };
        // The buses are shared with the vCPUs only after every device is in place.
        Arc::get_mut(target)
            .ok_or(DeviceError::BusesInUse)?
            .insert(base, size, dev)?;
        self.devices.push(DeviceInfo {
            kind,
            id: id.unwrap_or(kind.as_str()).to_string(),
            bus,
            base,
            size,
            irq,
        });
        Ok(())
    }

    /// Devices go in before the vCPUs share the buses (see `buses`): checked before a
    /// device claims KVM resources (irqfds, ioeventfds) it could not then use.
    fn check_buses_free(&self) -> Result<(), DeviceError> {
        if Arc::strong_count(&self.pio) == 1 && Arc::strong_count(&self.mmio) == 1 {
            Ok(())
        } else {
            Err(DeviceError::BusesInUse)
        }
    }

    fn irq_line(&self, pin: u32) -> Result<super::ioapic::IrqLine, IrqError> {
        self.ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .line(pin)
    }

    /// The legacy devices: the serial console on stdout/stdin, the i8042 (whose reset
    /// command writes `reset_evt`), and the boot timer if asked for.
    /// `serial_out` (PUT /serial) replaces stdout as the console's output.
    pub fn add_legacy_devices(
        &mut self,
        reset_evt: &EventFd,
        boot_timer: bool,
        serial_out: Option<&str>,
    ) -> Result<(), DeviceError> {
        self.check_buses_free()?;
        let input_space = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let out = match serial_out {
            Some(path) => ConsoleOut::open_path(path).map_err(|source| DeviceError::SerialOut {
                path: path.to_string(),
                source,
            })?,
            None => ConsoleOut::stdout(),
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            self.irq_line(SERIAL_IRQ)?,
            out,
            input_space.try_clone().map_err(DeviceError::EventFd)?,
        )));
        self.insert(
            DeviceKind::Serial,
            None,
            BusKind::Pio,
            u64::from(SERIAL_PORT_BASE),
            u64::from(SERIAL_PORT_SIZE),
            Some(SERIAL_IRQ),
            serial.clone(),
        )?;
        self.uart = Some(serial.clone());
        self.serial = Some((serial, input_space));

        if boot_timer {
            self.insert(
                DeviceKind::BootTimer,
                None,
                BusKind::Mmio,
                BOOT_TIMER_START,
                BOOT_TIMER_SIZE,
                None,
                Arc::new(Mutex::new(BootTimer)),
            )?;
        }

        let reset = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(reset, self.irq_line(I8042_IRQ)?)));
        self.insert(
            DeviceKind::I8042,
            None,
            BusKind::Pio,
            u64::from(I8042_PORT_BASE),
            u64::from(I8042_PORT_SIZE),
            Some(I8042_IRQ),
            i8042.clone(),
        )?;
        self.i8042 = Some(i8042);
        Ok(())
    }

    /// Puts `device` in the next virtio-mmio slot: transport on the MMIO bus, queue-notify
    /// ioeventfds registered with KVM, IRQ from the IOAPIC, and its command-line entry.
    fn attach_virtio(
        &mut self,
        kind: DeviceKind,
        id: &str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<String, DeviceError> {
        self.check_buses_free()?;
        let slot = u32::try_from(self.virtio.len()).unwrap_or(u32::MAX);
        let (base, irq) = slot_resources(slot)?;
        let line = self
            .irq_line(irq)
            .map_err(|source| VirtioError::IrqLine { pin: irq, source })?;
        let transport = MmioTransport::new(device, self.mem.clone(), line)?;
        transport.register_ioevents(&self.vm, base)?;
        let transport = Arc::new(Mutex::new(transport));
        self.insert(
            kind,
            Some(id),
            BusKind::Mmio,
            base,
            VIRTIO_MMIO_SIZE,
            Some(irq),
            transport.clone(),
        )?;
        self.virtio.push(VirtioSlot {
            kind,
            id: id.to_string(),
            transport,
        });
        let entry = mmio_cmdline_entry(base, irq);
        self.cmdline.push(entry.clone());
        Ok(entry)
    }

    /// One virtio-blk device per drive, in config order (vda, vdb, ...), in consecutive
    /// virtio-mmio slots. Each device gets its own clone of the guest memory handle (a
    /// `GuestMemoryMmap` clone only copies the `Arc`s of its regions).
    pub fn add_drives(&mut self, drives: &[DriveConfig]) -> Result<(), DeviceError> {
        for (position, drive) in drives.iter().enumerate() {
            let block = Block::new(drive)?;
            let entry =
                self.attach_virtio(DeviceKind::VirtioBlock, &drive.drive_id, Box::new(block))?;
            log::info!("drive `{}`: virtio-blk {entry}", drive.drive_id);
            if drive.is_root_device {
                self.root_cmdline = root_cmdline(drive, position);
            }
        }
        Ok(())
    }

    /// One virtio-net device per interface, in config order (eth0, eth1, ...), after the
    /// drives. Each opens its TAP now, so a TAP that cannot be used fails the build before
    /// the guest runs.
    pub fn add_network_interfaces(
        &mut self,
        ifaces: &[NetworkInterfaceConfig],
        mmds: Option<(&MmdsConfig, &SharedMmds)>,
    ) -> Result<(), DeviceError> {
        for iface in ifaces {
            let metrics = Arc::new(NetMetrics::default());
            let mut dev = Net::from_config(iface, metrics.clone())?;
            if let Some((c, store)) = mmds
                && c.network_interfaces.contains(&iface.iface_id)
            {
                dev.set_mmds(MmdsStack::new(c.ipv4(), store.clone()));
                log::info!(
                    "network interface `{}`: answers MMDS requests at {}",
                    iface.iface_id,
                    c.ipv4()
                );
            }
            let mac = dev.mac();
            let entry =
                self.attach_virtio(DeviceKind::VirtioNet, &iface.iface_id, Box::new(dev))?;
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
        }
        Ok(())
    }

    /// The vsock device, after the network interfaces. Binds `uds_path` now, so a path
    /// that cannot be used fails the build before the guest runs.
    pub fn add_vsock(&mut self, config: &VsockConfig) -> Result<(), DeviceError> {
        if let Some(w) = config.reserved_cid_warning() {
            log::warn!("{w}");
        }
        let dev = Vsock::new(config.guest_cid, &config.uds_path).map_err(|source| {
            VirtioError::Vsock {
                path: config.uds_path.clone(),
                source,
            }
        })?;
        let entry = self.attach_virtio(DeviceKind::VirtioVsock, "vsock", Box::new(dev))?;
        super::virtio::vsock::metrics::VsockMetrics::register();
        log::info!(
            "vsock: guest CID {}, listening on {}, {entry}",
            config.guest_cid,
            config.uds_path
        );
        Ok(())
    }

    /// The entropy device (virtio-rng), after the network interfaces.
    pub fn add_entropy(&mut self, cfg: &EntropyDeviceConfig) -> Result<(), DeviceError> {
        // A configured rate limiter is the device's budget (its timerfd exists from here
        // on, so the event loop watches it); without one every request is served.
        let budget: Box<dyn EntropyBudget> = match &cfg.rate_limiter {
            Some(rl) => Box::new(RateLimiter::new(Some(rl)).map_err(DeviceError::EventFd)?),
            None => Box::new(Unlimited),
        };
        let dev = Rng::new(budget);
        let metrics = dev.metrics.clone();
        crate::metrics::register_section(Box::new(move || ("entropy".to_string(), metrics.json())));
        let entry = self.attach_virtio(DeviceKind::VirtioRng, "entropy", Box::new(dev))?;
        log::info!("entropy: virtio-rng {entry}");
        Ok(())
    }

    /// The balloon (virtio-balloon); its state stays reachable for the API.
    pub fn add_balloon(&mut self, cfg: &BalloonConfig) -> Result<(), DeviceError> {
        let dev = Balloon::new(cfg).map_err(DeviceError::Timer)?;
        let state = dev.state();
        let metrics = state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .metrics
            .clone();
        crate::metrics::register_section(Box::new(move || ("balloon".to_string(), metrics.json())));
        self.balloon = Some(state);
        let entry = self.attach_virtio(DeviceKind::VirtioBalloon, "balloon", Box::new(dev))?;
        log::info!("balloon: virtio-balloon {entry}");
        Ok(())
    }

    /// The balloon's shared state, if there is a balloon.
    pub fn balloon(&self) -> Option<&Arc<Mutex<BalloonState>>> {
        self.balloon.as_ref()
    }

    /// Tells the balloon's driver that the target changed.
    pub fn balloon_config_changed(&self) {
        if let Some(v) = self
            .virtio
            .iter()
            .find(|v| v.kind == DeviceKind::VirtioBalloon)
        {
            v.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_changed();
        }
    }

    /// What the kernel must be told about the devices: one `virtio_mmio.device=` per
    /// virtio device in slot order, then `root=` and `rw`/`ro` if a drive is the root.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.cmdline
            .iter()
            .chain(self.root_cmdline.iter())
            .cloned()
            .collect()
    }

    /// Every device, in creation order.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// The port and memory buses, for the vCPUs. No device can be added afterwards.
    pub fn buses(&self) -> (Arc<Bus>, Arc<Bus>) {
        (self.pio.clone(), self.mmio.clone())
    }

    /// The event-loop subscribers: console input and every virtio transport. Called once,
    /// when the VM starts: console input moves to the event loop then.
    pub fn subscribers(&mut self) -> Vec<crate::vmm::Subscriber> {
        let mut subs: Vec<crate::vmm::Subscriber> = Vec::new();
        if let Some((serial, input_space)) = self.serial.take() {
            subs.push(Arc::new(Mutex::new(ConsoleInput::new(serial, input_space))));
        }
        for v in &self.virtio {
            subs.push(v.transport.clone());
        }
        subs
    }

    /// Points drive `id` at another backing file and tells the guest about its new size.
    pub fn update_drive(&self, id: &str, path: &str) -> Result<(), String> {
        let slot = self
            .virtio
            .iter()
            .find(|v| v.kind == DeviceKind::VirtioBlock && v.id == id)
            .ok_or_else(|| format!("no drive `{id}`"))?;
        slot.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_backing(path)
    }

    /// Replaces the rate limiters of virtio device `id` of `kind` (see
    /// `VirtioDevice::update_rate_limiters`).
    pub fn update_rate_limiters(
        &self,
        kind: DeviceKind,
        id: &str,
        update: &[Option<crate::config::RateLimiterConfig>],
    ) -> Result<(), String> {
        let slot = self
            .virtio
            .iter()
            .find(|v| v.kind == kind && v.id == id)
            .ok_or_else(|| format!("no {} `{id}`", kind.as_str()))?;
        slot.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update_rate_limiters(update);
        Ok(())
    }

    /// Presses Ctrl-Alt-Del on the i8042 keyboard. False if the guest has not read earlier
    /// keys (or there is no keyboard).
    pub fn send_ctrl_alt_del(&self) -> bool {
        self.i8042.as_ref().is_some_and(|k| {
            k.lock()
                .unwrap_or_else(|p| p.into_inner())
                .send_ctrl_alt_del()
        })
    }

    /// Completes every request the guest made available to a virtio device, so that a
    /// snapshot holds none in flight.
    /// Block requests complete synchronously, so a drain leaves none behind; network
    /// frames the guest queued are sent after the restore instead (see
    /// `kick_all_queues`), since serving them may change what the event loop watches.
    pub fn drain_virtio(&self) {
        /// The drain runs outside the event loop: a device that asks to change what it
        /// watches is refused (block devices never do).
        struct NoLoop;
        impl super::virtio::Interest for NoLoop {
            fn add(
                &mut self,
                _fd: std::os::fd::RawFd,
                _source: u16,
                _events: super::virtio::EventSet,
            ) -> std::io::Result<()> {
                Err(std::io::Error::other("not on the event loop"))
            }
            fn modify(
                &mut self,
                _fd: std::os::fd::RawFd,
                _source: u16,
                _events: super::virtio::EventSet,
            ) -> std::io::Result<()> {
                Err(std::io::Error::other("not on the event loop"))
            }
            fn remove(&mut self, _fd: std::os::fd::RawFd) -> std::io::Result<()> {
                Err(std::io::Error::other("not on the event loop"))
            }
        }
        for v in self
            .virtio
            .iter()
            .filter(|v| v.kind == DeviceKind::VirtioBlock)
        {
            v.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain_queues(&mut NoLoop);
        }
    }

    /// Every device's state, for a snapshot (virtio devices in slot order).
    pub fn save_state(&self) -> crate::snapshot::devices::DevicesState {
        use crate::snapshot::devices::{DevicesState, I8042State};
        let lock = |m: &Arc<Mutex<I8042>>| m.lock().unwrap_or_else(|p| p.into_inner()).save_state();
        DevicesState {
            ioapic: self
                .ioapic
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            serial: self
                .uart
                .as_ref()
                .map(|u| u.lock().unwrap_or_else(|p| p.into_inner()).save_state()),
            i8042: self.i8042.as_ref().map(lock).unwrap_or(I8042State {
                buf: Vec::new(),
                status: 0,
                ctr: 0,
                outp: 0,
                pending: None,
            }),
            virtio: self
                .virtio
                .iter()
                .map(|v| {
                    v.transport
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .save_state()
                })
                .collect(),
        }
    }

    /// The MAC each network interface's device shows the guest, by iface_id (a
    /// generated one must stay the guest's after a restore).
    pub fn net_macs(&self) -> Vec<(String, [u8; 6])> {
        self.virtio
            .iter()
            .filter(|v| v.kind == DeviceKind::VirtioNet)
            .map(|v| {
                let mut mac = [0u8; 6];
                v.transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read_device_config(0, &mut mac);
                (v.id.clone(), mac)
            })
            .collect()
    }

    /// Puts saved device state on devices freshly built from the same configuration
    /// (before the VM starts). Every value is checked: the state file is hostile input.
    pub fn restore_state(
        &mut self,
        s: &crate::snapshot::devices::DevicesState,
    ) -> Result<(), String> {
        self.ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(&s.ioapic)?;
        if let (Some(saved), Some((serial, input_space))) = (&s.serial, &self.serial) {
            let irq = self.irq_line(SERIAL_IRQ).map_err(|e| e.to_string())?;
            let space = input_space.try_clone().map_err(|e| e.to_string())?;
            serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(saved, irq, space)?;
        }
        if let Some(k) = &self.i8042 {
            k.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(&s.i8042)?;
        }
        if s.virtio.len() != self.virtio.len() {
            return Err(format!(
                "{} virtio device states for {} devices",
                s.virtio.len(),
                self.virtio.len()
            ));
        }
        for (v, saved) in self.virtio.iter().zip(&s.virtio) {
            v.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(saved)
                .map_err(|e| format!("{} `{}`: {e}", v.kind.as_str(), v.id))?;
        }
        for v in &self.virtio {
            v.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .kick_all_queues();
        }
        Ok(())
    }

    /// Makes every acknowledged write durable; called on every VMM exit path.
    pub fn flush(&self) {
        for v in &self.virtio {
            let mut t = v.transport.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = t.flush() {
                log::error!("{} `{}`: cannot flush: {e}", v.kind.as_str(), v.id);
            }
        }
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

    /// A real VM (KVM with a split irqchip) with the legacy devices and two drives: the
    /// list names each device with its kind, id, window and pin, in creation order.
    #[test]
    fn lists_every_device_with_its_kind_and_id() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        crate::vm::irq::create_split_irqchip(&vm).unwrap();
        let mem = crate::vm::memory::create(&vm, 16, false, Default::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("ember-dm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let drives: Vec<DriveConfig> = ["root", "data"]
            .iter()
            .map(|id| {
                serde_json::from_str(&format!(
                    r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": {}}}"#,
                    disk.display(),
                    *id == "root"
                ))
                .unwrap()
            })
            .collect();

        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dm = DeviceManager::new(vm, mem).unwrap();
        dm.add_legacy_devices(&reset, true, None).unwrap();
        dm.add_drives(&drives).unwrap();

        let listed: Vec<(DeviceKind, &str, Option<u32>)> = dm
            .devices()
            .iter()
            .map(|d| (d.kind, d.id.as_str(), d.irq))
            .collect();
        assert_eq!(
            listed,
            [
                (DeviceKind::Ioapic, "ioapic", None),
                (DeviceKind::Serial, "serial", Some(SERIAL_IRQ)),
                (DeviceKind::BootTimer, "boot-timer", None),
                (DeviceKind::I8042, "i8042", Some(I8042_IRQ)),
                (DeviceKind::VirtioBlock, "root", Some(VIRTIO_IRQ_BASE)),
                (DeviceKind::VirtioBlock, "data", Some(VIRTIO_IRQ_BASE + 1)),
            ]
        );
        assert_eq!(dm.devices()[5].base, VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE);
        assert_eq!(
            dm.cmdline_entries(),
            [
                "virtio_mmio.device=4K@0xd0001000:5",
                "virtio_mmio.device=4K@0xd0002000:6",
                "root=/dev/vda",
                "rw"
            ]
        );
        assert!(dm.update_drive("nope", "/x").is_err());

        // Once the vCPUs hold the buses, nothing more can be added.
        let _buses = dm.buses();
        assert!(matches!(
            dm.add_drives(&drives[..1]),
            Err(DeviceError::BusesInUse)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn disk_names() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
    }
}
