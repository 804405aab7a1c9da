//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), shared by every virtio device.
//!
//! The guest programs the device through 32-bit registers in a 4 KiB window; the device's
//! configuration space starts at 0x100. Queue kicks (writes to QueueNotify) are caught by
//! KVM as ioeventfds, one per queue with the queue index as datamatch, so a kick costs the
//! vCPU no exit to ember; the event loop reads the eventfd and runs the device.
//!
//! Everything here is driven by the guest, so nothing trusts it: odd-sized or unaligned
//! register accesses are ignored, state transitions out of order are refused, and a driver
//! that misbehaves only breaks its own device (it never activates, or needs a reset).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Interest, VirtioDevice, VirtioError, VirtioInterrupt, Work};
use crate::devices::bus::BusDevice;
use crate::devices::ioapic::IrqLine;
use crate::metrics::{METRICS, inc};
use crate::vm::memory::GuestMemory;

/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver: the same value QEMU and Firecracker use.
const VENDOR_ID: u32 = 0x554d_4551;

// Register offsets (virtio 1.2 §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: the offset the queue ioeventfds watch.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE_START: u64 = 0x100;
/// The rest of the 4 KiB window.
const CONFIG_SPACE_END: u64 = 0x1000;

const STATUS_INIT_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// One queue as the driver programs it through the registers; turned into a
/// `virtio_queue::Queue` when the driver marks it ready.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
    /// The driver wrote an invalid size; the queue cannot become ready until a reset.
    bad_size: bool,
}

impl QueueConfig {
    fn new(max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// The queue this configuration describes, if its size and alignments are valid and
    /// its rings lie in guest RAM.
    fn build(&self, mem: &GuestMemory) -> Option<Queue> {
        if self.bad_size {
            return None;
        }
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// A virtio device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    /// One kick eventfd per queue (registered as ioeventfds by `register_ioevents`).
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    /// Set by the transport when activation failed; cleared by a reset.
    needs_reset: bool,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `mem` is the guest memory its queues will live in, `irq` the line
    /// its interrupts leave through.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: IrqLine,
    ) -> Result<MmioTransport, VirtioError> {
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|m| QueueConfig::new(*m))
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioError::EventFd)?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            needs_reset: false,
            config_generation: 0,
            activated: false,
        })
    }

    /// Registers each queue's kick eventfd with KVM: a 4-byte write of the queue index to
    /// QueueNotify at `base` signals it without a vCPU exit.
    pub fn register_ioevents(&self, vm: &VmFd, base: u64) -> Result<(), VirtioError> {
        let addr = base + REG_QUEUE_NOTIFY;
        for (index, evt) in self.queue_evts.iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), index as u32)
                .map_err(|source| VirtioError::IoEvent { addr, source })?;
        }
        Ok(())
    }

    /// The kick eventfd of each queue.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.needs_reset {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Makes what the device acknowledged durable (see `VirtioDevice::flush`).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.device.flush()
    }

    /// Swaps the device's backing file; when its config space changed (a new size), the
    /// config generation moves on and a running driver gets a config-change interrupt.
    pub fn update_backing(&mut self, path: &str) -> Result<(), String> {
        if self.device.update_backing(path)? {
            self.config_changed();
        }
        Ok(())
    }

    /// Replaces the device's rate limiters (see `VirtioDevice::update_rate_limiters`).
    pub fn update_rate_limiters(&mut self, update: &[Option<crate::config::RateLimiterConfig>]) {
        self.device.update_rate_limiters(update);
    }

    /// Whether the device may serve its queues: running, and neither failed nor broken.
    fn serving(&self) -> bool {
        self.activated && self.status & VIRTIO_CONFIG_S_FAILED == 0 && !self.needs_reset
    }

    /// The device's configuration space changed on the host's side (a new balloon
    /// target): the generation moves on and a running driver hears of it.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.activated {
            self.interrupt.signal_config_change();
        }
    }

    /// Runs queue `index` after a kick, if the device is running.
    pub fn process_queue(&mut self, index: usize, interest: &mut dyn Interest) {
        if !self.serving() {
            return;
        }
        let work = self.device.process_queue(index, interest);
        self.after(work, Some(index));
    }

    /// Runs device event source `source` (a TAP, a wake eventfd).
    pub fn process_event(&mut self, source: u16, events: EventSet, interest: &mut dyn Interest) {
        // A reset or failed device still hears its sources, so it can drop its interest.
        let work = self.device.process_event(source, events, interest);
        self.after(work, None);
    }

    fn after(&mut self, work: Work, queue: Option<usize>) {
        match work {
            Work::Done => {}
            // Work left after a capped drain: come back to it after other events.
            // A device event (a rate limiter's timer) that left queue work re-kicks
            // every queue: the device's kick handler knows which have work.
            Work::More => {
                let evts = match queue {
                    Some(i) => self.queue_evts.get(i..=i).unwrap_or_default(),
                    None => &self.queue_evts[..],
                };
                for e in evts {
                    if let Err(e) = e.write(1) {
                        log::error!("cannot re-kick a virtio queue: {e}");
                    }
                }
            }
            Work::Broken => self.set_needs_reset(),
        }
    }

    /// The device cannot go on until the driver resets it (virtio 1.2 §2.1.2): the
    /// driver learns it from the Status register after a config-change interrupt. The
    /// device stops now (it drops its queues and, on the event loop, its own sources
    /// such as a TAP), so nothing reaches the broken rings meanwhile.
    fn set_needs_reset(&mut self) {
        if !self.needs_reset {
            inc(&METRICS.virtio.needs_reset);
            log::debug!("virtio: device needs a reset");
        }
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.needs_reset = true;
        self.interrupt.signal_config_change();
    }

    /// Completes every request the driver made available, so that a snapshot holds no
    /// request in flight: each queue is served until it is empty, then what the device
    /// still has in flight on the host (virtio-blk's Async engine) is waited for and
    /// answered; requests that waited for room in the engine are served in another round.
    /// Only for devices that never change what the event loop watches while serving a
    /// queue (virtio-blk): `interest` is not the event loop's.
    pub fn drain_queues(&mut self, interest: &mut dyn Interest) {
        for _ in 0..64 {
            for index in 0..self.queues.len() {
                let _ = self.queue_evts.get(index).map(|e| e.read());
                self.process_queue(index, interest);
                // A capped drain re-kicked the queue: keep going until it is empty.
                let mut rounds = 0;
                while rounds < 64 && self.queue_evts.get(index).is_some_and(|e| e.read().is_ok()) {
                    self.process_queue(index, interest);
                    rounds += 1;
                }
            }
            if !self.activated || !self.device.settle() {
                break;
            }
        }
    }

    /// After a restore: one kick on every queue of a running device, so requests the
    /// driver made available before the snapshot but no device served yet (a kick the
    /// old process had not read) are served now.
    pub fn kick_all_queues(&self) {
        if !self.activated {
            return;
        }
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                log::error!("cannot kick a restored virtio queue: {e}");
            }
        }
    }

    /// The transport's registers and the device's queue progress, for a snapshot.
    pub fn save_state(&self) -> crate::snapshot::devices::VirtioState {
        use crate::snapshot::devices::{QueueConfigState, QueueProgress, VirtioState};
        VirtioState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueConfigState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    driver: q.driver,
                    device: q.device,
                    bad_size: q.bad_size,
                })
                .collect(),
            status: self.status,
            needs_reset: self.needs_reset,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            progress: self
                .device
                .queue_progress()
                .iter()
                .map(|q| QueueProgress {
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx_enabled,
                })
                .collect(),
            device: self.device.save_device_state(),
        }
    }

    /// Puts a saved transport state back on a freshly built device of the same kind and,
    /// if the driver had started it, starts it again at the saved queue positions. Every
    /// field is checked as if the guest had written it: the state file is hostile input.
    pub fn restore_state(
        &mut self,
        s: &crate::snapshot::devices::VirtioState,
    ) -> Result<(), String> {
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(format!(
                "virtio device type {} in the snapshot where the configuration makes a type {kind}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "virtio type {kind}: {} queues in the snapshot, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let offered = self.device.avail_features() | (1 << VIRTIO_F_VERSION_1);
        if s.driver_features & !offered != 0 {
            return Err(format!(
                "virtio type {kind}: driver features {:#x} include some the device does not offer",
                s.driver_features
            ));
        }
        let known = STATUS_INIT_SEQUENCE
            .iter()
            .fold(VIRTIO_CONFIG_S_FAILED, |a, b| a | b);
        if s.status & !known != 0 {
            return Err(format!(
                "virtio type {kind}: status {:#x} has unknown bits",
                s.status
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (mine, saved) in self.queues.iter().zip(&s.queues) {
            if saved.max_size != mine.max_size {
                return Err(format!(
                    "virtio type {kind}: queue maximum {} where the device has {}",
                    saved.max_size, mine.max_size
                ));
            }
            let q = QueueConfig {
                max_size: mine.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
                bad_size: saved.bad_size,
            };
            if q.ready && q.build(&self.mem).is_none() {
                return Err(format!(
                    "virtio type {kind}: a ready queue with invalid size or rings"
                ));
            }
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.status = s.status;
        self.needs_reset = s.needs_reset;
        self.config_generation = s.config_generation;
        self.interrupt.ack(u32::MAX);
        self.interrupt.status.fetch_or(
            s.interrupt_status & (super::VIRTIO_MMIO_INT_VRING | super::VIRTIO_MMIO_INT_CONFIG),
            std::sync::atomic::Ordering::SeqCst,
        );
        self.device
            .restore_device_state(s.device.as_ref())
            .map_err(|e| format!("virtio type {kind}: {e}"))?;
        if !s.activated {
            return Ok(());
        }
        if s.progress.len() != self.queues.len() {
            return Err(format!(
                "virtio type {kind}: active with {} queue positions for {} queues",
                s.progress.len(),
                self.queues.len()
            ));
        }
        let mut live = Vec::with_capacity(self.queues.len());
        for (cfg, p) in self.queues.iter().zip(&s.progress) {
            let mut q = cfg
                .build(&self.mem)
                .filter(|_| cfg.ready)
                .ok_or_else(|| format!("virtio type {kind}: active with a queue not ready"))?;
            q.set_next_avail(p.next_avail);
            q.set_next_used(p.next_used);
            q.set_event_idx(p.event_idx_enabled);
            live.push(q);
        }
        self.device
            .activate(
                self.mem.clone(),
                live,
                self.interrupt.clone(),
                self.driver_features,
            )
            .map_err(|e| format!("virtio type {kind}: cannot start the device again: {e}"))?;
        self.activated = true;
        self.device.restored();
        Ok(())
    }

    /// Reads the device's configuration space (snapshot: the MAC a net device uses).
    pub fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may change it now: after FEATURES_OK, before
    /// DRIVER_OK, and while the queue is not ready.
    fn writable_queue(&mut self) -> Option<&mut QueueConfig> {
        let setup =
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        if self.status != setup {
            inc(&METRICS.virtio.bad_queue_configs);
            log::debug!(
                "virtio: queue register written in status {:#x}; ignored",
                self.status
            );
            return None;
        }
        self.queues
            .get_mut(self.queue_sel as usize)
            .filter(|q| !q.ready)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let f = self.device.avail_features() | (1 << VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc as u32),
            REG_QUEUE_DESC_HIGH => self.selected_queue().map_or(0, |q| (q.desc >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| q.driver as u32),
            REG_QUEUE_DRIVER_HIGH => self.selected_queue().map_or(0, |q| (q.driver >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| q.device as u32),
            REG_QUEUE_DEVICE_HIGH => self.selected_queue().map_or(0, |q| (q.device >> 32) as u32),
            // No shared memory regions: the spec wants length -1 for a region that does
            // not exist.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => 0,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => {
                // Features are only negotiable between DRIVER and FEATURES_OK.
                if self.status != VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER {
                    inc(&METRICS.virtio.bad_status_writes);
                    log::debug!(
                        "virtio: DriverFeatures written in status {:#x}; ignored",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, value),
                    1 => set_high(&mut self.driver_features, value),
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.writable_queue() {
                    let ok =
                        value <= u32::from(q.max_size) && value != 0 && value.is_power_of_two();
                    if ok {
                        q.size = value as u16;
                        q.bad_size = false;
                    } else {
                        inc(&METRICS.virtio.bad_queue_configs);
                        log::debug!("virtio: invalid queue size {value} (max {})", q.max_size);
                        q.bad_size = true;
                    }
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(value),
            REG_QUEUE_NOTIFY => {
                // Reaches here only when the ioeventfd did not catch it (another width or
                // no ioeventfd): hand it to the event loop all the same.
                log::debug!("virtio: queue {value} notified through an MMIO exit");
                match self.queue_evts.get(value as usize).map(|e| e.write(1)) {
                    Some(Ok(())) => {}
                    Some(Err(e)) => log::error!("cannot signal virtio queue {value}: {e}"),
                    None => inc(&METRICS.virtio.bad_notifies),
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| set_low(&mut q.desc, value)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| set_high(&mut q.desc, value)),
            REG_QUEUE_DRIVER_LOW => self.update_queue(|q| set_low(&mut q.driver, value)),
            REG_QUEUE_DRIVER_HIGH => self.update_queue(|q| set_high(&mut q.driver, value)),
            REG_QUEUE_DEVICE_LOW => self.update_queue(|q| set_low(&mut q.device, value)),
            REG_QUEUE_DEVICE_HIGH => self.update_queue(|q| set_high(&mut q.device, value)),
            REG_SHM_SEL => {}
            _ => {
                inc(&METRICS.virtio.bad_register_accesses);
                log::debug!("virtio: write to read-only or unknown register {offset:#x}");
            }
        }
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if let Some(q) = self.writable_queue() {
            f(q);
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let mem = self.mem.clone();
        let Some(q) = self.writable_queue() else {
            // Writing 0 to an already ready queue before DRIVER_OK takes it back.
            if value == 0
                && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
                && let Some(q) = self.queues.get_mut(self.queue_sel as usize)
            {
                q.ready = false;
            }
            return;
        };
        if value == 0 {
            q.ready = false;
        } else if value == 1 {
            if q.build(&mem).is_some() {
                q.ready = true;
            } else {
                inc(&METRICS.virtio.bad_queue_configs);
                log::debug!(
                    "virtio: queue refused: size {} (max {}), desc {:#x}, driver {:#x}, device {:#x} \
                     must be a power of two and aligned rings in guest RAM",
                    q.size,
                    q.max_size,
                    q.desc,
                    q.driver,
                    q.device
                );
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up on the device: stop serving its queues until a reset.
            log::debug!("virtio: driver set FAILED (status {value:#x})");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if self.status & VIRTIO_CONFIG_S_FAILED != 0 || self.needs_reset {
            return;
        }
        // NEEDS_RESET is the device's bit; a driver echoing it back changes nothing.
        let value = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value == self.status {
            return;
        }
        // The only allowed change: add the next bit of the init sequence.
        let next = STATUS_INIT_SEQUENCE
            .iter()
            .find(|b| self.status & **b == 0)
            .copied();
        let Some(next) = next.filter(|b| value == self.status | b) else {
            inc(&METRICS.virtio.bad_status_writes);
            log::debug!(
                "virtio: status {:#x} -> {value:#x} is out of order; ignored",
                self.status
            );
            return;
        };
        match next {
            // Refused: the driver reads Status back and finds FEATURES_OK unset.
            VIRTIO_CONFIG_S_FEATURES_OK if !self.features_acceptable() => {
                inc(&METRICS.virtio.bad_status_writes);
                return;
            }
            VIRTIO_CONFIG_S_DRIVER_OK if !self.activate() => {
                self.set_needs_reset();
                return;
            }
            _ => {}
        }
        self.status = value;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features() | (1 << VIRTIO_F_VERSION_1);
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            log::debug!("virtio: driver accepted features {unknown:#x} that were not offered");
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::debug!(
                "virtio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
            );
            return false;
        }
        true
    }

    /// DRIVER_OK: every queue must be ready; then the device starts.
    fn activate(&mut self) -> bool {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, cfg) in self.queues.iter().enumerate() {
            match cfg.build(&self.mem).filter(|_| cfg.ready) {
                Some(q) => queues.push(q),
                None => {
                    log::debug!("virtio: DRIVER_OK with queue {i} not ready; device not started");
                    return false;
                }
            }
        }
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.driver_features,
        ) {
            Ok(()) => {
                self.activated = true;
                true
            }
            Err(e) => {
                log::debug!("virtio: device activation failed: {e}");
                false
            }
        }
    }

    /// Status 0: back to the state at creation.
    fn reset(&mut self) {
        if self.activated {
            inc(&METRICS.virtio.active_resets);
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.needs_reset = false;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.interrupt.clear();
        // Kicks that arrived before the reset are for queues that no longer exist.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
    }
}

impl MmioTransport {
    /// Whether a config-space access is well formed and within the device's space;
    /// counts the ones that are not (beyond the end they still read as 0).
    fn config_ok(&self, offset: u64, len: usize) -> bool {
        let end = (CONFIG_SPACE_START as usize).saturating_add(self.device.config_len());
        let within = offset
            .checked_add(len as u64)
            .is_some_and(|e| e <= end as u64);
        if offset < CONFIG_SPACE_END && config_access(offset, len) {
            if !within {
                inc(&METRICS.virtio.config_out_of_range);
                log::debug!("virtio: {len}-byte config access at {offset:#x} beyond its end");
            }
            true
        } else {
            inc(&METRICS.virtio.config_out_of_range);
            log::debug!("virtio: ignored {len}-byte config access at {offset:#x}");
            false
        }
    }
}

/// Registers are 32 bits wide and naturally aligned; anything else is ignored.
fn register_access(offset: u64, len: usize) -> bool {
    len == 4 && offset.is_multiple_of(4)
}

/// The configuration space takes 1, 2, 4 (and 8) byte accesses aligned to their size.
fn config_access(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8) && offset.is_multiple_of(len as u64)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < CONFIG_SPACE_START {
            if register_access(offset, data.len()) {
                data.copy_from_slice(&self.read_register(offset).to_le_bytes());
            } else {
                inc(&METRICS.virtio.bad_register_accesses);
                log::debug!("virtio: ignored {}-byte read at {offset:#x}", data.len());
            }
        } else if self.config_ok(offset, data.len()) {
            self.device.read_config(offset - CONFIG_SPACE_START, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < CONFIG_SPACE_START {
            if !register_access(offset, data.len()) {
                inc(&METRICS.virtio.bad_register_accesses);
                log::debug!("virtio: ignored {}-byte write at {offset:#x}", data.len());
                return;
            }
            let mut raw = [0u8; 4];
            raw.copy_from_slice(data);
            self.write_register(offset, u32::from_le_bytes(raw));
        } else if self.config_ok(offset, data.len()) {
            self.device.write_config(offset - CONFIG_SPACE_START, data);
        }
    }
}

/// What an event on a transport's fds means: a kick on a queue, or one of the device's
/// own sources. Encoded in the 32-bit epoll data by `to_data` / `from_data` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Queue(u16),
    Device(u16),
}

impl Token {
    const DEVICE: u32 = 1 << 16;

    fn to_data(self) -> u32 {
        match self {
            Token::Queue(i) => u32::from(i),
            Token::Device(s) => Token::DEVICE | u32::from(s),
        }
    }

    fn from_data(data: u32) -> Option<Token> {
        let low = u16::try_from(data & 0xffff).ok()?;
        match data >> 16 {
            0 => Some(Token::Queue(low)),
            1 => Some(Token::Device(low)),
            _ => None,
        }
    }
}

/// A device's view of the event loop: its fds tagged as its own sources.
struct LoopInterest<'a, 'b> {
    ops: &'a mut EventOps<'b>,
}

fn loop_error(e: event_manager::Error) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

impl Interest for LoopInterest<'_, '_> {
    fn add(&mut self, fd: RawFd, source: u16, events: EventSet) -> std::io::Result<()> {
        let data = Token::Device(source).to_data();
        self.ops
            .add(Events::with_data_raw(fd, data, events))
            .map_err(loop_error)
    }

    fn modify(&mut self, fd: RawFd, source: u16, events: EventSet) -> std::io::Result<()> {
        let data = Token::Device(source).to_data();
        self.ops
            .modify(Events::with_data_raw(fd, data, events))
            .map_err(loop_error)
    }

    fn remove(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.ops.remove(Events::empty_raw(fd)).map_err(loop_error)
    }
}

impl MutEventSubscriber for MmioTransport {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut interest = LoopInterest { ops };
        match Token::from_data(events.data()) {
            Some(Token::Queue(i)) => {
                let Some(evt) = self.queue_evts.get(usize::from(i)) else {
                    log::error!("virtio: event for queue {i}, which does not exist");
                    return;
                };
                // Non-blocking read: a spurious wakeup just finds nothing. The value is
                // the number of kicks since the last read.
                if let Ok(kicks) = evt.read() {
                    METRICS
                        .virtio
                        .queue_notifies
                        .fetch_add(kicks, std::sync::atomic::Ordering::Relaxed);
                    self.process_queue(usize::from(i), &mut interest);
                }
            }
            Some(Token::Device(s)) => self.process_event(s, events.event_set(), &mut interest),
            None => log::error!("virtio: event with unknown token {:#x}", events.data()),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queues = self.queue_evts.iter().enumerate().map(|(i, e)| {
            (
                e.as_raw_fd(),
                Token::Queue(u16::try_from(i).unwrap_or(u16::MAX)),
            )
        });
        let sources = self
            .device
            .event_sources()
            .into_iter()
            .map(|(fd, s)| (fd, Token::Device(s)));
        let all: Vec<_> = queues.chain(sources).collect();
        for (fd, token) in all {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token.to_data(), EventSet::IN)) {
                log::error!("virtio: cannot watch event source {token:?}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::virtio::{ActivateError, VIRTIO_MMIO_INT_CONFIG};

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Probe {
        activations: Arc<Mutex<Vec<(u64, usize)>>>,
        resets: Arc<Mutex<u32>>,
        kicks: Arc<Mutex<Vec<usize>>>,
        /// What the next kick reports.
        work: Arc<Mutex<Option<Work>>>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            2
        }
        fn avail_features(&self) -> u64 {
            1 << 9
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn config_len(&self) -> usize {
            8
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = 0x1122_3344_5566_7788u64.to_le_bytes();
            for (i, d) in data.iter_mut().enumerate() {
                *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
            acked_features: u64,
        ) -> Result<(), ActivateError> {
            self.activations
                .lock()
                .unwrap()
                .push((acked_features, queues.len()));
            Ok(())
        }
        fn process_queue(&mut self, index: usize, _interest: &mut dyn Interest) -> Work {
            self.kicks.lock().unwrap().push(index);
            self.work.lock().unwrap().take().unwrap_or(Work::Done)
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    /// Tests run devices without an event loop.
    struct NoLoop;

    impl Interest for NoLoop {
        fn add(&mut self, _fd: RawFd, _source: u16, _ev: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn modify(&mut self, _fd: RawFd, _source: u16, _ev: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn remove(&mut self, _fd: RawFd) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn tokens_round_trip() {
        for t in [
            Token::Queue(0),
            Token::Queue(7),
            Token::Device(0),
            Token::Device(3),
        ] {
            assert_eq!(Token::from_data(t.to_data()), Some(t));
        }
        assert_eq!(Token::from_data(2 << 16), None);
    }

    /// A transport around a `Probe`, and a handle on what the probe records.
    fn transport() -> (MmioTransport, Probe) {
        let probe = Probe::default();
        let seen = Probe {
            activations: probe.activations.clone(),
            resets: probe.resets.clone(),
            kicks: probe.kicks.clone(),
            work: probe.work.clone(),
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = IrqLine::from_eventfd(EventFd::new(EFD_NONBLOCK).unwrap());
        (MmioTransport::new(Box::new(probe), mem, irq).unwrap(), seen)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = ACK_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;

    fn negotiate(t: &mut MmioTransport, low: u32) {
        wr(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(t, REG_STATUS, ACK_DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, low);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, 1);
        wr(t, REG_STATUS, FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, size: u32, desc: u64) {
        wr(t, REG_QUEUE_SEL, 0);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, desc as u32);
        wr(t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        wr(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        wr(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        wr(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 2);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1 << 9);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut t, ..) = transport();
        let mut b2 = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b8 = [0xffu8; 8];
        t.read(REG_MAGIC, &mut b8);
        assert_eq!(b8, [0; 8]);
        t.read(0x0f0, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.read(0xfff, &mut [0u8; 4]);
        t.read(u64::MAX - 1, &mut [0u8; 4]);
        t.write(REG_STATUS, &[1, 0]);
        t.write(u64::MAX, &[1, 0, 0, 0]);
        t.write(0x1000, &[1, 0, 0, 0]);
        t.read(REG_MAGIC, &mut []);
        t.write(REG_STATUS, &[]);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // Config space: two 32-bit halves of a u64, and a byte.
        assert_eq!(rd(&mut t, 0x100), 0x5566_7788);
        assert_eq!(rd(&mut t, 0x104), 0x1122_3344);
        let mut b1 = [0u8; 1];
        t.read(0x101, &mut b1);
        assert_eq!(b1, [0x77]);
        t.read(0x101, &mut b2);
        assert_eq!(b2, [0, 0]);
        assert_eq!(rd(&mut t, 0x200), 0);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, ..) = transport();
        // Without VERSION_1: refused.
        wr(&mut t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, ACK_DRIVER);
        wr(&mut t, REG_STATUS, FEATURES_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ACK_DRIVER);
        // A feature not offered: refused.
        wr(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1 << 3);
        assert_eq!(rd(&mut t, REG_STATUS), ACK_DRIVER);
        // Offered ones: accepted.
        wr(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1 << 9);
        assert_eq!(rd(&mut t, REG_STATUS), FEATURES_OK);
        // Features cannot change after FEATURES_OK.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 1 << 3);
        assert_eq!(t.driver_features, (1 << 9) | (1 << 32));
    }

    #[test]
    fn status_out_of_order_is_ignored() {
        let (mut t, ..) = transport();
        wr(&mut t, REG_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        wr(&mut t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            &mut t,
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
    }

    #[test]
    fn queue_setup_and_activation() {
        let (mut t, seen) = transport();
        let (activations, resets, kicks) = (seen.activations, seen.resets, seen.kicks);
        negotiate(&mut t, 1 << 9);
        // Size not a power of two: the queue cannot become ready.
        setup_queue(&mut t, 12, 0x1000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // Larger than the maximum.
        setup_queue(&mut t, 32, 0x1000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // Rings outside guest RAM.
        setup_queue(&mut t, 8, 0x1_0000_0000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // Misaligned descriptor table.
        setup_queue(&mut t, 8, 0x1008);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // DRIVER_OK without a ready queue: device needs a reset, never activates.
        wr(&mut t, REG_STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 2);
        assert!(activations.lock().unwrap().is_empty());

        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        negotiate(&mut t, 1 << 9);
        setup_queue(&mut t, 8, 0x1000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        // A ready queue's registers are frozen.
        wr(&mut t, REG_QUEUE_NUM, 4);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM), 8);
        // Kicks before DRIVER_OK do nothing.
        t.process_queue(0, &mut NoLoop);
        assert!(kicks.lock().unwrap().is_empty());
        wr(&mut t, REG_STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
        );
        assert_eq!(
            *activations.lock().unwrap(),
            vec![((1 << 9) | (1 << 32), 1)]
        );
        // A notify that KVM did not catch goes through the eventfd.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 5);
        t.process_queue(0, &mut NoLoop);
        assert_eq!(*kicks.lock().unwrap(), vec![0]);
        // Queue registers after DRIVER_OK are ignored.
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);

        // FAILED stops the device serving kicks.
        let st = rd(&mut t, REG_STATUS);
        wr(&mut t, REG_STATUS, st | VIRTIO_CONFIG_S_FAILED);
        t.process_queue(0, &mut NoLoop);
        assert_eq!(kicks.lock().unwrap().len(), 1);

        // Reset: initial state.
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(*resets.lock().unwrap(), 1);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM), 16);
        assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0);
    }

    #[test]
    fn broken_ring_needs_reset() {
        let (mut t, seen) = transport();
        negotiate(&mut t, 1 << 9);
        setup_queue(&mut t, 8, 0x1000);
        wr(&mut t, REG_STATUS, FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        assert!(t.is_activated());
        // Capped drain: the queue is kicked again.
        *seen.work.lock().unwrap() = Some(Work::More);
        t.process_queue(0, &mut NoLoop);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        // Broken ring: the device stops, the driver sees NEEDS_RESET and a config
        // interrupt, and kicks are ignored until it resets the device.
        *seen.work.lock().unwrap() = Some(Work::Broken);
        t.process_queue(0, &mut NoLoop);
        assert_eq!(*seen.resets.lock().unwrap(), 1);
        assert!(!t.is_activated());
        assert_eq!(
            rd(&mut t, REG_STATUS),
            FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 2);
        t.process_queue(0, &mut NoLoop);
        assert_eq!(seen.kicks.lock().unwrap().len(), 2);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(*seen.resets.lock().unwrap(), 1);
    }

    #[test]
    fn interrupt_ack() {
        let (mut t, ..) = transport();
        t.interrupt.signal_used_queue();
        t.interrupt.signal_config_change();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 3);
        wr(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 2);
    }
}
