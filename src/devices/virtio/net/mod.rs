//! virtio-net backed by a host TAP device (one RX and one TX queue, no control queue).
//!
//! Frames cross between the TAP and the guest whole, with the 12-byte virtio-net header in
//! front, so checksum and segmentation offloads are the host kernel's business: ember
//! copies bytes and never parses a packet. The features offered are Firecracker's (without
//! mergeable RX buffers): the guest posts RX buffers big enough for whole frames.
//!
//! Flow control: when the guest has no RX buffer, ember keeps the one frame it already
//! read and stops watching the TAP, so further frames wait in the TAP's queue (where the
//! host kernel applies its own limits) instead of being dropped here; the RX queue kick
//! (the guest posting buffers) resumes it. The device adds and removes the TAP in the VMM
//! thread's event loop itself ([`Interest`]).
//!
//! Threads: activation and reset arrive as MMIO writes on a vCPU thread, whose seccomp
//! filter allows no epoll calls; they only change state and write the wake eventfd, and
//! the event loop (VMM thread) then adds or removes the TAP. Queue work runs only on the
//! event loop.
//!
//! Files: this one is the device (features, config space, activation, the TAP's interest);
//! `frames.rs` moves frames between queues and the backend; `tap.rs` is the TAP itself.

pub mod frames;
pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    ActivateError, EventSet, Interest, LogOnce, VirtioDevice, VirtioError, VirtioInterrupt, Work,
};
use crate::config::net::{MacAddr, NetworkInterfaceConfig};
use crate::devices::rate_limiter::RateLimiter;
use crate::mmds::stack::MmdsStack;
use crate::vm::memory::GuestMemory;
pub use frames::{Frames, RxPass, RxState};
use tap::{NetBackend, Tap};

/// Size of each queue offered to the driver (Firecracker's).
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Largest frame with its virtio-net header: a 64 KiB TSO packet with Ethernet and VLAN
/// headers plus the 12-byte header (Firecracker's limit).
pub const MAX_FRAME_LEN: usize = 65562;
/// virtio_net_config: mac[6], status (u16).
const CONFIG_LEN: usize = 8;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The device's event sources: its wake eventfd (always watched) and the TAP (while RX
/// can proceed).
const SOURCE_WAKE: u16 = 0;
const SOURCE_TAP: u16 = 1;
/// The rate limiters' timers.
const SOURCE_RX_LIMITER: u16 = 2;
const SOURCE_TX_LIMITER: u16 = 3;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features offered: Firecracker's set, minus mergeable RX buffers and event index.
pub const AVAIL_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_NET_F_STATUS);

/// The TAP offloads (TUNSETOFFLOAD) matching what the driver accepted to *receive*: the
/// kernel may then hand us packets with partial checksums or unsegmented, and the guest
/// copes. TSO and UFO need checksum offload (the kernel refuses them alone).
pub fn tap_offload(acked: u64) -> libc::c_uint {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        f |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        f |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        f |= libc::TUN_F_UFO;
    }
    f
}

/// A locally administered unicast MAC for an interface configured without one.
pub fn random_mac() -> MacAddr {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if usize::try_from(n).ok() != Some(b.len()) {
        // No entropy yet (early boot): pid and clock are unique enough for a MAC on a TAP.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let x = t ^ (u64::from(std::process::id()) << 24);
        for (i, v) in b.iter_mut().enumerate() {
            *v = (x >> (8 * i)) as u8;
        }
    }
    // Locally administered (bit 1), unicast (bit 0 clear).
    b[0] = (b[0] & 0xfc) | 0x02;
    MacAddr(b)
}

/// Counters of one network interface, reported as the `net_<iface_id>` metrics section.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest, and their bytes (without the virtio-net header).
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the TAP that the guest's buffer could not take.
    pub rx_dropped: AtomicU64,
    /// Failed TAP reads (other than "nothing to read").
    pub rx_tap_errors: AtomicU64,
    /// Frames written to the TAP, and their bytes (without the virtio-net header).
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains refused as malformed (their frame is dropped).
    pub tx_malformed: AtomicU64,
    /// Frames the TAP refused.
    pub tx_tap_errors: AtomicU64,
    /// Times a rate limiter held a frame back (Firecracker's names).
    pub rx_rate_limiter_throttled: AtomicU64,
    pub tx_rate_limiter_throttled: AtomicU64,
}

impl NetMetrics {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "rx_frames": g(&self.rx_frames),
            "rx_bytes": g(&self.rx_bytes),
            "rx_dropped": g(&self.rx_dropped),
            "rx_tap_errors": g(&self.rx_tap_errors),
            "tx_frames": g(&self.tx_frames),
            "tx_bytes": g(&self.tx_bytes),
            "tx_malformed": g(&self.tx_malformed),
            "tx_tap_errors": g(&self.tx_tap_errors),
            "rx_rate_limiter_throttled": g(&self.rx_rate_limiter_throttled),
            "tx_rate_limiter_throttled": g(&self.tx_rate_limiter_throttled),
        })
    }

    /// Adds these counters to the metrics output as `net_<iface_id>` (Firecracker's name).
    pub fn register(self: &Arc<Self>, iface_id: &str) {
        let m = self.clone();
        let key = format!("net_{iface_id}");
        crate::metrics::register_section(Box::new(move || (key.clone(), m.json())));
    }
}

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-net device.
pub struct Net<B: NetBackend = Tap> {
    id: String,
    backend: B,
    frames: Frames,
    config: [u8; CONFIG_LEN],
    /// Whether the backend is in the event loop (it is while RX may proceed).
    watching: bool,
    /// Written on a vCPU thread (activation, reset) so the event loop brings the TAP's
    /// interest up to date.
    wake: EventFd,
    wake_pending: bool,
    /// A read error was logged: later ones go to debug (a hostile or broken TAP could
    /// otherwise flood the log on every RX kick).
    rx_broken: bool,
    /// TAP offload failures recur on every activation or reset the guest makes.
    offload_log: LogOnce,
    active: Option<Active>,
}

impl Net<Tap> {
    /// Opens the interface's TAP (creating it if needed) and builds its device.
    pub fn from_config(
        iface: &NetworkInterfaceConfig,
        metrics: Arc<NetMetrics>,
    ) -> Result<Net<Tap>, VirtioError> {
        let tap = Tap::open(&iface.host_dev_name).map_err(|source| VirtioError::Tap {
            id: iface.iface_id.clone(),
            source,
        })?;
        let mac = iface.guest_mac.unwrap_or_else(random_mac);
        let mut net =
            Net::new(&iface.iface_id, tap, mac, metrics).map_err(VirtioError::NetEventFd)?;
        net.update_rate_limiters(&[iface.rx_rate_limiter, iface.tx_rate_limiter]);
        Ok(net)
    }
}

impl<B: NetBackend> Net<B> {
    pub fn new(id: &str, backend: B, mac: MacAddr, metrics: Arc<NetMetrics>) -> io::Result<Net<B>> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let wake = EventFd::new(EFD_NONBLOCK)?;
        // Both limiters (and their timerfds) exist from the start, so PATCH can switch
        // one on at run time without new file descriptors or event-loop changes.
        let mut frames = Frames::new(id, metrics);
        frames.rx_limiter = Some(RateLimiter::new(None)?);
        frames.tx_limiter = Some(RateLimiter::new(None)?);
        Ok(Net {
            id: id.to_string(),
            backend,
            frames,
            config,
            watching: false,
            wake,
            wake_pending: false,
            rx_broken: false,
            offload_log: LogOnce::default(),
            active: None,
        })
    }

    pub fn mac(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.config[..6]);
        MacAddr(m)
    }

    /// Serves the metadata service on this interface.
    pub fn set_mmds(&mut self, stack: MmdsStack) {
        self.frames.mmds = Some(stack);
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the event loop hears about frames waiting in the backend.
    pub fn is_watching(&self) -> bool {
        self.watching
    }

    /// Adds the backend to, or removes it from, the event loop. Removing rather than
    /// masking: an fd in an epoll set reports errors and hangups even with no events.
    fn watch(&mut self, on: bool, interest: &mut dyn Interest) {
        if on == self.watching {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let r = if on {
            interest.watch(fd, SOURCE_TAP)
        } else {
            interest.unwatch(fd)
        };
        match r {
            Ok(()) => self.watching = on,
            Err(e) => log::error!(
                "net `{}`: cannot {} the TAP: {e}",
                self.id,
                if on { "watch" } else { "stop watching" }
            ),
        }
    }

    /// Has the event loop call `process_event` soon (from a vCPU thread).
    fn wake_event_loop(&mut self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("net `{}`: cannot wake the event loop: {e}", self.id);
        }
        self.wake_pending = true;
    }

    /// One RX pass, then the interrupt if buffers were used, then the TAP's interest.
    fn run_rx(&mut self, interest: &mut dyn Interest) -> Work {
        let Some(active) = self.active.as_mut() else {
            self.watch(false, interest);
            return Work::Done;
        };
        let pass = self
            .frames
            .process_rx(&active.mem, &mut active.rx, &mut self.backend);
        if pass.used > 0 && active.rx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        // The pass stopped at its cap with MMDS frames left, which no TAP event announces.
        if pass.state == RxState::Capped && self.frames.mmds_has_output() {
            self.wake_event_loop();
        }
        match pass.state {
            RxState::Drained | RxState::Capped => {
                self.rx_broken = false;
                self.watch(true, interest);
            }
            // Until the guest posts buffers, or the limiter's timer fires.
            RxState::NoBuffers | RxState::Throttled => self.watch(false, interest),
            RxState::BrokenRing => {
                self.watch(false, interest);
                return Work::Broken;
            }
            RxState::Broken => {
                if !self.rx_broken {
                    log::error!(
                        "net `{}`: receiving stopped until the guest posts RX buffers again",
                        self.id
                    );
                }
                self.rx_broken = true;
                self.watch(false, interest);
            }
        }
        Work::Done
    }

    fn run_tx(&mut self) -> Work {
        let Some(active) = self.active.as_mut() else {
            return Work::Done;
        };
        let (used, work) = self
            .frames
            .process_tx(&active.mem, &mut active.tx, &mut self.backend);
        if used > 0 && active.tx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        work
    }
}

impl<B: NetBackend + 'static> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *d = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only by legacy drivers, which ember does not serve.
        crate::metrics::inc(&crate::metrics::METRICS.virtio.config_writes_ignored);
        log::debug!("net `{}`: config write at {offset:#x} ignored", self.id);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), None) = (it.next(), it.next(), it.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let offload = tap_offload(acked_features);
        if let Err(e) = self.backend.set_offload(offload) {
            // The guest only loses offloaded packets it said it could take: keep going
            // with plain frames.
            log::log!(
                self.offload_log.level(),
                "net `{}`: TUNSETOFFLOAD {offload:#x} failed: {e}; no receive offloads",
                self.id
            );
            if let Err(e) = self.backend.set_offload(0) {
                return Err(ActivateError::Other(format!(
                    "cannot clear TAP offloads: {e}"
                )));
            }
        }
        log::debug!(
            "net `{}`: active, features {acked_features:#x}, TAP offloads {offload:#x}",
            self.id
        );
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        self.rx_broken = false;
        // Frames may already wait in the TAP: the event loop starts watching it.
        self.wake_event_loop();
        Ok(())
    }

    fn process_queue(&mut self, index: usize, interest: &mut dyn Interest) -> Work {
        match index {
            // The guest posted RX buffers: deliver what waits, and resume reading the TAP.
            RX_QUEUE => self.run_rx(interest),
            TX_QUEUE => {
                let work = self.run_tx();
                // Frames the guest sent to the MMDS have answers to deliver.
                if self.frames.mmds_has_output() && self.run_rx(interest) == Work::Broken {
                    return Work::Broken;
                }
                work
            }
            _ => Work::Done,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.frames.clear();
        // The event loop stops watching the TAP when it finds the device inactive.
        self.wake_event_loop();
        if let Err(e) = self.backend.set_offload(0) {
            let level = self.offload_log.level();
            log::log!(level, "net `{}`: cannot clear TAP offloads: {e}", self.id);
        }
    }

    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        let mut v = vec![(self.wake.as_raw_fd(), SOURCE_WAKE)];
        if let Some(l) = &self.frames.rx_limiter {
            v.push((l.fd(), SOURCE_RX_LIMITER));
        }
        if let Some(l) = &self.frames.tx_limiter {
            v.push((l.fd(), SOURCE_TX_LIMITER));
        }
        v
    }

    fn update_rate_limiters(&mut self, update: &[Option<crate::config::RateLimiterConfig>]) {
        let mut it = update.iter();
        for limiter in [&mut self.frames.rx_limiter, &mut self.frames.tx_limiter] {
            if let (Some(Some(cfg)), Some(l)) = (it.next(), limiter.as_mut()) {
                l.set(cfg);
            }
        }
    }

    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state()])
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> Option<crate::snapshot::devices::DeviceState> {
        let level = |l: &Option<crate::devices::rate_limiter::RateLimiter>| {
            l.as_ref().map(|l| l.save()).unwrap_or_default()
        };
        Some(crate::snapshot::devices::DeviceState::Net {
            rx: level(&self.frames.rx_limiter),
            tx: level(&self.frames.tx_limiter),
        })
    }

    fn restore_device_state(
        &mut self,
        state: Option<&crate::snapshot::devices::DeviceState>,
    ) -> Result<(), String> {
        let (rx, tx) = match state {
            None => return Ok(()),
            Some(crate::snapshot::devices::DeviceState::Net { rx, tx }) => (rx, tx),
            Some(_) => return Err("the saved state is not a network interface's".into()),
        };
        for (name, limiter, saved) in [
            ("RX", &mut self.frames.rx_limiter, rx),
            ("TX", &mut self.frames.tx_limiter, tx),
        ] {
            match limiter.as_mut() {
                Some(l) => l.restore(saved),
                None if *saved == Default::default() => Ok(()),
                None => Err("no limiter to restore".into()),
            }
            .map_err(|e| format!("{name} rate limiter: {e}"))?;
        }
        Ok(())
    }

    fn process_event(&mut self, source: u16, _: EventSet, interest: &mut dyn Interest) -> Work {
        match source {
            SOURCE_TX_LIMITER => {
                let fired = self
                    .frames
                    .tx_limiter
                    .as_mut()
                    .is_some_and(|l| l.timer_fired());
                return if fired { self.run_tx() } else { Work::Done };
            }
            SOURCE_RX_LIMITER => {
                let fired = self
                    .frames
                    .rx_limiter
                    .as_mut()
                    .is_some_and(|l| l.timer_fired());
                if !fired {
                    return Work::Done;
                }
            }
            _ => {}
        }
        if source == SOURCE_WAKE && self.wake_pending {
            self.wake_pending = false;
            let _ = self.wake.read();
        }
        // The wake (activation, reset) and the TAP alike: run RX, which also brings the
        // TAP's interest up to date.
        self.run_rx(interest)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress};

    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    use super::frames::tests::*;
    use super::*;
    use crate::devices::ioapic::IrqLine;

    #[test]
    fn offload_follows_receive_features() {
        assert_eq!(tap_offload(0), 0);
        assert_eq!(tap_offload(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            tap_offload(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4)),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offload(
                bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
                    | bit(VIRTIO_NET_F_GUEST_UFO)
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..32 {
            let m = random_mac();
            assert_eq!(m.0[0] & 3, 2, "{m}");
        }
        assert_ne!(random_mac(), random_mac());
    }

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1
    }

    /// The event loop as far as the device sees it: a real epoll set holding the
    /// device's sources, readable exactly when the event loop would wake for it.
    struct TestLoop {
        epoll: Epoll,
    }

    impl TestLoop {
        fn new(net: &Net<Pair>) -> TestLoop {
            let mut l = TestLoop {
                epoll: Epoll::new().unwrap(),
            };
            for (fd, source) in net.event_sources() {
                l.watch(fd, source).unwrap();
            }
            l
        }

        fn fd(&self) -> RawFd {
            self.epoll.as_raw_fd()
        }
    }

    impl Interest for TestLoop {
        fn add(&mut self, fd: RawFd, source: u16, events: EventSet) -> io::Result<()> {
            let ev = EpollEvent::new(events, u64::from(source));
            self.epoll.ctl(ControlOperation::Add, fd, ev)
        }
        fn modify(&mut self, fd: RawFd, source: u16, events: EventSet) -> io::Result<()> {
            let ev = EpollEvent::new(events, u64::from(source));
            self.epoll.ctl(ControlOperation::Modify, fd, ev)
        }
        fn remove(&mut self, fd: RawFd) -> io::Result<()> {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
        }
    }

    /// A device with its interrupt eventfd (to count interrupts) and the peer socket.
    fn device() -> (Net<Pair>, EventFd, UnixDatagram) {
        let (b, peer) = pair();
        let mac = MacAddr([6, 0, 0xac, 0x10, 0, 2]);
        let net = Net::new("eth0", b, mac, Arc::new(NetMetrics::default())).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (net, evt, peer)
    }

    fn activate(net: &mut Net<Pair>, mem: &GuestMemory, evt: &EventFd, features: u64) {
        let irq = IrqLine::from_eventfd(evt.try_clone().unwrap());
        let q = |i| vq(mem, i).queue;
        net.activate(
            mem.clone(),
            vec![q(0), q(1)],
            Arc::new(VirtioInterrupt::new(irq)),
            features,
        )
        .unwrap();
    }

    #[test]
    fn config_space_and_features() {
        let (net, ..) = device();
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [6, 0, 0xac, 0x10, 0, 2, 1, 0]);
        let mut s = [0u8; 2];
        net.read_config(6, &mut s);
        assert_eq!(u16::from_le_bytes(s), 1);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let f = net.avail_features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ] {
            assert!(f & bit(b) != 0, "feature {b}");
        }
        // No mergeable RX buffers: one frame per chain.
        assert_eq!(
            f & bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF),
            0
        );
    }

    #[test]
    fn activation_sets_offloads_and_reset_clears_them() {
        let mem = memory();
        let (mut net, evt, _peer) = device();
        let bad = net.activate(
            mem.clone(),
            vec![vq(&mem, 0).queue],
            Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(
                evt.try_clone().unwrap(),
            ))),
            0,
        );
        assert!(matches!(
            bad,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        let acked = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO4);
        activate(&mut net, &mem, &evt, acked);
        assert_eq!(
            net.backend().offload,
            Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
        );
        // The TAP is watched once the event loop ran (activation is on a vCPU thread).
        assert!(!net.is_watching());
        let mut lp = TestLoop::new(&net);
        let ep = lp.fd();
        assert!(readable(ep));
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert!(net.is_watching());
        assert!(!readable(ep));
        net.reset();
        assert_eq!(net.backend().offload, Some(0));
        assert!(readable(ep));
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert!(!net.is_watching());
        assert!(!readable(ep));
    }

    #[test]
    fn tap_interest_follows_rx_buffers() {
        let mem = memory();
        let (mut net, evt, peer) = device();
        let mut lp = TestLoop::new(&net);
        let ep = lp.fd();
        // Not active: nothing watched, nothing readable.
        peer.send(&frame(b"early")).unwrap();
        assert!(!readable(ep));
        activate(&mut net, &mem, &evt, bit(VIRTIO_F_VERSION_1));
        assert!(readable(ep));
        peer.send(&frame(b"second")).unwrap();
        // The event loop wakes up; no RX buffers: one frame is held, the TAP is not
        // watched although more wait in it, and no interrupt is raised.
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert!(!net.is_watching());
        assert!(!readable(ep));
        assert!(evt.read().is_err());
        // The guest posts one buffer and kicks: the held frame goes in, an interrupt
        // follows, and the TAP stays unwatched (the second frame is now held).
        let mut rx = vq(&mem, 0);
        rx.post_rx(&mem, 0, 2048);
        // The device's own copy of the queue was set up the same way.
        net.process_queue(RX_QUEUE, &mut lp);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(rx.used_idx(&mem), 1);
        assert_eq!(read(&mem, buf(0) + 26, 5), b"early");
        assert!(!net.is_watching());
        rx.post_rx(&mem, 1, 2048);
        net.process_queue(RX_QUEUE, &mut lp);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(read(&mem, buf(1) + 26, 6), b"second");
        // Everything delivered: watching again, quiet until the next frame.
        assert!(net.is_watching());
        assert!(!readable(ep));
        peer.send(&frame(b"third")).unwrap();
        assert!(readable(ep));
        // A kick with nothing to do raises no interrupt.
        rx.post_rx(&mem, 2, 2048);
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert_eq!(evt.read().unwrap(), 1);
        net.process_queue(RX_QUEUE, &mut lp);
        assert!(evt.read().is_err());
        // TX through the device, one interrupt.
        let tx = vq(&mem, 1);
        let fr = frame(b"out");
        mem.write_slice(&fr, GuestAddress(buf(5))).unwrap();
        tx.desc(&mem, 0, buf(5), fr.len() as u32, 0, 0);
        let mut tx = tx;
        tx.publish(&mem, 0);
        assert_eq!(net.process_queue(TX_QUEUE, &mut lp), Work::Done);
        assert_eq!(evt.read().unwrap(), 1);
        let mut got = [0u8; 128];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], fr[..]);
    }

    /// A TX limiter of one frame per second: the second frame stays on the ring, the
    /// throttled event is counted, and the limiter's timer (an event source like the TAP)
    /// sends it without any kick. The RX limiter holds a frame back the same way.
    #[test]
    fn limiters_hold_frames_until_their_timer_fires() {
        use crate::config::{RateLimiterConfig, TokenBucketConfig};
        let mem = memory();
        let (mut net, evt, peer) = device();
        let one_per_s = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 100,
            }),
        };
        net.update_rate_limiters(&[Some(one_per_s), Some(one_per_s)]);
        let mut lp = TestLoop::new(&net);
        activate(&mut net, &mem, &evt, bit(VIRTIO_F_VERSION_1));
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        let mut tx = vq(&mem, 1);
        for i in 0..2u16 {
            let fr = frame(format!("tx{i}").as_bytes());
            mem.write_slice(&fr, GuestAddress(buf(5 + i))).unwrap();
            tx.desc(&mem, i, buf(5 + i), fr.len() as u32, 0, 0);
            tx.publish(&mem, i);
        }
        net.process_queue(TX_QUEUE, &mut lp);
        assert_eq!(tx.used_idx(&mem), 1);
        assert_eq!(get(&net.frames.metrics.tx_rate_limiter_throttled), 1);
        let mut got = [0u8; 128];
        assert!(peer.recv(&mut got).is_ok());
        // The timer wakes the loop; its event sends the held frame.
        let ev = wait_event(&lp);
        assert_eq!(ev, u64::from(SOURCE_TX_LIMITER));
        net.process_event(SOURCE_TX_LIMITER, EventSet::IN, &mut lp);
        assert_eq!(tx.used_idx(&mem), 2);
        assert!(peer.recv(&mut got).is_ok());

        // RX: two frames, two buffers; the second frame waits for the RX timer. (The
        // bucket is set afresh: one idle for a refill time would refill whole at once.)
        net.update_rate_limiters(&[Some(one_per_s), None]);
        let mut rx = vq(&mem, 0);
        rx.post_rx(&mem, 0, 2048);
        rx.post_rx(&mem, 1, 2048);
        peer.send(&frame(b"a")).unwrap();
        peer.send(&frame(b"b")).unwrap();
        net.process_queue(RX_QUEUE, &mut lp);
        assert_eq!(rx.used_idx(&mem), 1);
        assert!(!net.is_watching());
        assert_eq!(get(&net.frames.metrics.rx_rate_limiter_throttled), 1);
        let ev = wait_event(&lp);
        assert_eq!(ev, u64::from(SOURCE_RX_LIMITER));
        net.process_event(SOURCE_RX_LIMITER, EventSet::IN, &mut lp);
        assert_eq!(rx.used_idx(&mem), 2);
        assert_eq!(read(&mem, buf(1) + 26, 1), b"b");
    }

    /// Waits (up to 2 s) for the test loop to report an event; returns its data.
    fn wait_event(lp: &TestLoop) -> u64 {
        let mut evs = [EpollEvent::default(); 1];
        let n = lp.epoll.wait(2000, &mut evs).unwrap();
        assert_eq!(n, 1);
        evs[0].data()
    }

    #[test]
    fn broken_backend_stops_watching() {
        let mem = memory();
        let (mut net, evt, peer) = device();
        let mut lp = TestLoop::new(&net);
        activate(&mut net, &mem, &evt, bit(VIRTIO_F_VERSION_1));
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert!(net.is_watching());
        peer.send(&frame(b"x")).unwrap();
        net.backend.fail_recv = true;
        net.process_event(SOURCE_WAKE, EventSet::IN, &mut lp);
        assert!(!net.is_watching());
        assert!(evt.read().is_err());
        // An RX kick tries again; once the backend works, frames flow.
        net.backend.fail_recv = false;
        let mut rx = vq(&mem, 0);
        rx.post_rx(&mem, 0, 2048);
        net.process_queue(RX_QUEUE, &mut lp);
        assert!(net.is_watching());
        assert_eq!(evt.read().unwrap(), 1);
    }
}
