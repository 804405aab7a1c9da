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
//! (the guest posting buffers) resumes it. To switch the TAP's interest on and off without
//! access to the event loop, the device watches the TAP through its own epoll instance
//! and hands the event loop that epoll fd, which is readable exactly while a watched TAP
//! is (or the wake eventfd below is).
//!
//! Threads: activation and reset arrive as MMIO writes on a vCPU thread, whose seccomp
//! filter allows no epoll calls; they only change state and write the wake eventfd, and
//! the event loop (VMM thread) then adds or removes the TAP. Queue work runs only on the
//! event loop.
//!
//! Queue processing ([`Frames`]) works on plain guest memory and any [`NetBackend`], so
//! tests drive it with a socket pair instead of a TAP.

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
use vm_memory::{Address, Bytes};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::tap::{NetBackend, Tap, VNET_HDR_LEN};
use super::{ActivateError, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::config::net::{MacAddr, NetworkInterfaceConfig};
use crate::vm::memory::GuestMemory;

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
        })
    }

    /// Adds these counters to the metrics output as `net_<iface_id>` (Firecracker's name).
    pub fn register(self: &Arc<Self>, iface_id: &str) {
        let m = self.clone();
        let key = format!("net_{iface_id}");
        crate::metrics::register_section(Box::new(move || (key.clone(), m.json())));
    }
}

fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// How an RX pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more to read.
    Drained,
    /// The pass reached its cap; the backend may hold more.
    Capped,
    /// A frame is waiting and the guest posted no buffer: stop reading the backend until
    /// the guest posts some.
    NoBuffers,
    /// The backend failed (TAP gone); reading it again would fail the same way.
    Broken,
}

/// The result of one RX pass: used entries added, and why it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPass {
    pub used: u32,
    pub state: RxState,
}

/// Queue processing for one interface, apart from the device and event-loop glue: frames
/// from the backend into RX chains, TX chains out to the backend.
pub struct Frames {
    id: String,
    /// The frame read from the backend and not yet delivered: `rx_buf[..len]`.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    metrics: Arc<NetMetrics>,
}

impl Frames {
    pub fn new(id: &str, metrics: Arc<NetMetrics>) -> Frames {
        Frames {
            id: id.to_string(),
            rx_pending: None,
            // Zeroed allocations come from untouched pages: an idle interface costs no RSS.
            rx_buf: vec![0; MAX_FRAME_LEN],
            tx_buf: vec![0; MAX_FRAME_LEN],
            metrics,
        }
    }

    /// Whether a frame read from the backend waits for a guest buffer.
    pub fn has_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Forgets the waiting frame (device reset: the guest's buffers are gone).
    pub fn clear(&mut self) {
        self.rx_pending = None;
    }

    /// Moves frames from `backend` into the RX queue, one frame per chain, at most one
    /// queue's worth per pass so a flooded TAP cannot hold the event loop.
    pub fn process_rx<B: NetBackend + ?Sized>(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        backend: &mut B,
    ) -> RxPass {
        let mut used = 0u32;
        for _ in 0..queue.size() {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match backend.recv(&mut self.rx_buf) {
                    // A TAP never reads 0 bytes; a backend that does is at its end.
                    Ok(0) => {
                        inc(&self.metrics.rx_tap_errors, 1);
                        log::error!("net `{}`: the TAP reported end of file", self.id);
                        return RxPass {
                            used,
                            state: RxState::Broken,
                        };
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return RxPass {
                            used,
                            state: RxState::Drained,
                        };
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        inc(&self.metrics.rx_tap_errors, 1);
                        log::error!("net `{}`: cannot read from the TAP: {e}", self.id);
                        return RxPass {
                            used,
                            state: RxState::Broken,
                        };
                    }
                },
            };
            let Some(frame) = self.rx_buf.get_mut(..len).filter(|_| len >= VNET_HDR_LEN) else {
                log::debug!("net `{}`: {len}-byte read from the TAP; dropped", self.id);
                inc(&self.metrics.rx_dropped, 1);
                self.rx_pending = None;
                continue;
            };
            self.rx_pending = Some(len);
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return RxPass {
                    used,
                    state: RxState::NoBuffers,
                };
            };
            self.rx_pending = None;
            // Without VIRTIO_NET_F_MRG_RXBUF a frame always takes exactly one buffer; the
            // TAP leaves this field of the header alone.
            if let Some(nb) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
                nb.copy_from_slice(&1u16.to_le_bytes());
            }
            let head = chain.head_index();
            let written = match write_chain(mem, chain, frame, usize::from(queue.size())) {
                Ok(()) => {
                    inc(&self.metrics.rx_frames, 1);
                    inc(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                    len as u32
                }
                Err(why) => {
                    log::debug!(
                        "net `{}`: RX chain {head} {why}; {len}-byte frame dropped",
                        self.id
                    );
                    inc(&self.metrics.rx_dropped, 1);
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                log::debug!("net `{}`: cannot complete RX chain {head}: {e}", self.id);
            }
            used += 1;
        }
        RxPass {
            used,
            state: RxState::Capped,
        }
    }

    /// Sends every frame the driver made available, at most one queue's worth per pass.
    /// A malformed chain loses its frame only. Returns (chains completed, work left).
    pub fn process_tx<B: NetBackend + ?Sized>(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        backend: &mut B,
    ) -> (u32, bool) {
        let mut used = 0u32;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return (used, false);
            };
            let head = chain.head_index();
            match gather_chain(mem, chain, &mut self.tx_buf, usize::from(queue.size())) {
                Ok(len) => {
                    let frame = self.tx_buf.get(..len).unwrap_or_default();
                    match backend.send(frame) {
                        Ok(()) => {
                            inc(&self.metrics.tx_frames, 1);
                            inc(&self.metrics.tx_bytes, (len - VNET_HDR_LEN) as u64);
                        }
                        Err(e) => {
                            inc(&self.metrics.tx_tap_errors, 1);
                            log::debug!(
                                "net `{}`: the TAP refused a {len}-byte frame: {e}",
                                self.id
                            );
                        }
                    }
                }
                Err(why) => {
                    inc(&self.metrics.tx_malformed, 1);
                    log::debug!("net `{}`: TX chain {head} {why}; dropped", self.id);
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::debug!("net `{}`: cannot complete TX chain {head}: {e}", self.id);
            }
            used += 1;
        }
        let more = queue
            .avail_idx(mem, Ordering::Acquire)
            .map(|idx| idx.0 != queue.next_avail())
            .unwrap_or(false);
        (used, more)
    }
}

/// Copies `frame` into the device-writable buffers of `chain`.
fn write_chain(
    mem: &GuestMemory,
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    frame: &[u8],
    max_descs: usize,
) -> Result<(), &'static str> {
    let mut done = 0usize;
    for d in chain.take(max_descs) {
        if !d.is_write_only() {
            return Err("has a device-readable descriptor");
        }
        let rest = frame.get(done..).unwrap_or_default();
        let n = rest.len().min(d.len() as usize);
        let part = rest.get(..n).unwrap_or_default();
        if mem.write_slice(part, d.addr()).is_err() {
            return Err("points outside guest memory");
        }
        done += n;
        if done == frame.len() {
            return Ok(());
        }
    }
    Err("is too small for the frame")
}

/// Gathers the frame a TX chain holds into `buf`; returns its length (header included).
fn gather_chain(
    mem: &GuestMemory,
    chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    buf: &mut [u8],
    max_descs: usize,
) -> Result<usize, &'static str> {
    let mut len = 0usize;
    let mut count = 0usize;
    let mut dangling = false;
    for d in chain {
        count += 1;
        if count > max_descs {
            return Err("has more descriptors than the queue");
        }
        if d.is_write_only() {
            return Err("has a device-writable descriptor");
        }
        let end = len
            .checked_add(d.len() as usize)
            .filter(|e| *e <= MAX_FRAME_LEN)
            .ok_or("holds more than 65562 bytes")?;
        let dst = buf.get_mut(len..end).ok_or("holds more than 65562 bytes")?;
        if !dst.is_empty() && mem.read_slice(dst, d.addr()).is_err() {
            return Err("points outside guest memory");
        }
        // Overflow of the address is a buffer outside guest memory as well.
        if d.addr().checked_add(u64::from(d.len())).is_none() {
            return Err("points outside guest memory");
        }
        len = end;
        dangling = d.has_next();
    }
    // The iterator stops at a next index outside the table or after a queue's worth of
    // descriptors: a last descriptor that still points on means a loop or a bad index.
    if dangling {
        return Err("loops or has a bad next index");
    }
    if len < VNET_HDR_LEN {
        return Err("is shorter than the virtio-net header");
    }
    Ok(len)
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
    /// Watches the backend while RX may proceed, and `wake` always; its fd is the
    /// device's event source.
    epoll: Epoll,
    watching: bool,
    /// Written on a vCPU thread (activation, reset) so the event loop brings the TAP's
    /// interest up to date.
    wake: EventFd,
    wake_pending: bool,
    /// A read error was logged: later ones go to debug (a hostile or broken TAP could
    /// otherwise flood the log on every RX kick).
    rx_broken: bool,
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
        Net::new(&iface.iface_id, tap, mac, metrics).map_err(VirtioError::Epoll)
    }
}

impl<B: NetBackend> Net<B> {
    pub fn new(id: &str, backend: B, mac: MacAddr, metrics: Arc<NetMetrics>) -> io::Result<Net<B>> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        Ok(Net {
            id: id.to_string(),
            backend,
            frames: Frames::new(id, metrics),
            config,
            epoll,
            watching: false,
            wake,
            wake_pending: false,
            rx_broken: false,
            active: None,
        })
    }

    pub fn mac(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.config[..6]);
        MacAddr(m)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether the event loop hears about frames waiting in the backend.
    pub fn is_watching(&self) -> bool {
        self.watching
    }

    /// Adds the backend to, or removes it from, the device's epoll set. Removing rather
    /// than masking: an fd in the set reports errors and hangups even with no events.
    fn watch(&mut self, on: bool) {
        if on == self.watching {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let r = if on {
            self.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
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
    fn run_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            self.watch(false);
            return;
        };
        let pass = self
            .frames
            .process_rx(&active.mem, &mut active.rx, &mut self.backend);
        if pass.used > 0 && active.rx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        match pass.state {
            RxState::Drained | RxState::Capped => {
                self.rx_broken = false;
                self.watch(true);
            }
            RxState::NoBuffers => self.watch(false),
            RxState::Broken => {
                if !self.rx_broken {
                    log::error!(
                        "net `{}`: receiving stopped until the guest posts RX buffers again",
                        self.id
                    );
                }
                self.rx_broken = true;
                self.watch(false);
            }
        }
    }

    fn run_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let (used, more) = self
            .frames
            .process_tx(&active.mem, &mut active.tx, &mut self.backend);
        if used > 0 && active.tx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
        more
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *d = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only by legacy drivers, which ember does not serve.
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
            log::warn!(
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

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            // The guest posted RX buffers: deliver what waits, and resume reading the TAP.
            RX_QUEUE => {
                self.run_rx();
                false
            }
            TX_QUEUE => self.run_tx(),
            _ => false,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.frames.clear();
        // The event loop stops watching the TAP when it finds the device inactive.
        self.wake_event_loop();
        if let Err(e) = self.backend.set_offload(0) {
            log::warn!("net `{}`: cannot clear TAP offloads: {e}", self.id);
        }
    }

    fn event_sources(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_event(&mut self, source: usize) {
        if source == 0 {
            if self.wake_pending {
                self.wake_pending = false;
                let _ = self.wake.read();
            }
            self.run_rx();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::ioapic::IrqLine;

    const MEM_SIZE: u64 = 0x40_0000;
    const QSIZE: u16 = 16;
    /// Rings of queue q at 0x1000 + q * 0x3000 (desc, avail, used: one page each).
    const RINGS: u64 = 0x1000;
    const BUFS: u64 = 0x10_0000;
    const BUF_SIZE: u64 = 0x1_0000;

    /// A datagram socket pair standing in for the TAP: `peer` is the host network.
    struct Pair {
        ours: UnixDatagram,
        offload: Option<libc::c_uint>,
        fail_recv: bool,
    }

    impl AsRawFd for Pair {
        fn as_raw_fd(&self) -> RawFd {
            self.ours.as_raw_fd()
        }
    }

    impl NetBackend for Pair {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_recv {
                return Err(io::Error::from_raw_os_error(libc::EBADFD));
            }
            self.ours.recv(buf)
        }
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.ours.send(frame).map(|_| ())
        }
        fn set_offload(&mut self, flags: libc::c_uint) -> io::Result<()> {
            self.offload = Some(flags);
            Ok(())
        }
    }

    fn pair() -> (Pair, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (
            Pair {
                ours: a,
                offload: None,
                fail_recv: false,
            },
            b,
        )
    }

    /// One virtqueue as a driver sees it.
    struct Vq {
        index: u64,
        avail_idx: u16,
        queue: Queue,
    }

    impl Vq {
        fn new(mem: &GuestMemory, index: u64) -> Vq {
            let base = RINGS + index * 0x3000;
            let mut queue = Queue::new(QSIZE).unwrap();
            queue
                .try_set_desc_table_address(GuestAddress(base))
                .unwrap();
            queue
                .try_set_avail_ring_address(GuestAddress(base + 0x1000))
                .unwrap();
            queue
                .try_set_used_ring_address(GuestAddress(base + 0x2000))
                .unwrap();
            queue.set_ready(true);
            assert!(queue.is_valid(mem));
            Vq {
                index,
                avail_idx: 0,
                queue,
            }
        }
        fn base(&self) -> u64 {
            RINGS + self.index * 0x3000
        }
        fn desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let d = self.base() + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags as u16, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % QSIZE);
            mem.write_obj(head, GuestAddress(self.base() + 0x1000 + 4 + slot * 2))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.base() + 0x1000 + 2))
                .unwrap();
        }
        /// (id, len) of used entry `i`.
        fn used(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
            let e = self.base() + 0x2000 + 4 + u64::from(i % QSIZE) * 8;
            (
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(self.base() + 0x2000 + 2))
                .unwrap()
        }
        /// A one-descriptor RX buffer at descriptor `i`, buffer `i`.
        fn post_rx(&mut self, mem: &GuestMemory, i: u16, len: u32) {
            self.desc(mem, i, buf(i), len, VRING_DESC_F_WRITE, 0);
            self.publish(mem, i);
        }
    }

    fn buf(i: u16) -> u64 {
        BUFS + u64::from(i) * BUF_SIZE
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// A frame as the TAP gives it: a virtio-net header (num_buffers 0) and `payload`
    /// after an Ethernet header.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// What the guest should find: the frame with num_buffers = 1.
    fn delivered(f: &[u8]) -> Vec<u8> {
        let mut d = f.to_vec();
        d[10] = 1;
        d
    }

    fn frames() -> (Frames, Arc<NetMetrics>) {
        let m = Arc::new(NetMetrics::default());
        (Frames::new("eth0", m.clone()), m)
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

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

    #[test]
    fn rx_one_frame_per_chain() {
        let mem = memory();
        let mut rx = Vq::new(&mem, 0);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        let a = frame(b"first");
        let z = frame(&[0x5a; 1500]);
        peer.send(&a).unwrap();
        peer.send(&z).unwrap();
        rx.post_rx(&mem, 0, 2048);
        // The second buffer is a chain: 12 header bytes, then the rest.
        rx.desc(
            &mem,
            1,
            buf(1),
            12,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            2,
        );
        rx.desc(&mem, 2, buf(2), 2048, VRING_DESC_F_WRITE, 0);
        rx.publish(&mem, 1);
        rx.post_rx(&mem, 3, 2048);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!(
            pass,
            RxPass {
                used: 2,
                state: RxState::Drained
            }
        );
        assert_eq!(rx.used(&mem, 0), (0, a.len() as u32));
        assert_eq!(read(&mem, buf(0), a.len()), delivered(&a));
        assert_eq!(rx.used(&mem, 1), (1, z.len() as u32));
        assert_eq!(read(&mem, buf(1), 12), delivered(&z)[..12]);
        assert_eq!(read(&mem, buf(2), z.len() - 12), z[12..]);
        assert_eq!(rx.used_idx(&mem), 2);
        assert_eq!(get(&m.rx_frames), 2);
        assert_eq!(get(&m.rx_bytes), (a.len() + z.len() - 24) as u64);
        assert!(!f.has_pending());
    }

    #[test]
    fn rx_frames_wait_for_buffers() {
        let mem = memory();
        let mut rx = Vq::new(&mem, 0);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        for i in 0..3u8 {
            peer.send(&frame(&[b'a' + i; 20])).unwrap();
        }
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!(pass.state, RxState::NoBuffers);
        assert_eq!(pass.used, 0);
        assert!(f.has_pending());
        rx.post_rx(&mem, 0, 2048);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (1, RxState::NoBuffers));
        rx.post_rx(&mem, 1, 2048);
        rx.post_rx(&mem, 2, 2048);
        rx.post_rx(&mem, 3, 2048);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (2, RxState::Drained));
        // In order, none lost.
        for i in 0..3u16 {
            assert_eq!(rx.used(&mem, i).0, u32::from(i));
            let got = read(&mem, buf(i) + 26, 20);
            assert_eq!(got, vec![b'a' + i as u8; 20]);
        }
        assert_eq!(get(&m.rx_dropped), 0);
        assert_eq!(get(&m.rx_frames), 3);
    }

    #[test]
    fn rx_bad_chains_drop_their_frame_only() {
        let mem = memory();
        let mut rx = Vq::new(&mem, 0);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        for _ in 0..4 {
            peer.send(&frame(&[7; 100])).unwrap();
        }
        let good = frame(b"good");
        peer.send(&good).unwrap();
        rx.post_rx(&mem, 0, 50); // too small
        rx.desc(&mem, 1, buf(1), 2048, 0, 0); // device-readable
        rx.publish(&mem, 1);
        rx.desc(&mem, 2, MEM_SIZE - 16, 2048, VRING_DESC_F_WRITE, 0); // off the end
        rx.publish(&mem, 2);
        rx.desc(&mem, 3, u64::MAX - 8, 2048, VRING_DESC_F_WRITE, 0); // wraps
        rx.publish(&mem, 3);
        rx.post_rx(&mem, 4, 2048);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (5, RxState::Drained));
        for i in 0..4 {
            assert_eq!(rx.used(&mem, i), (u32::from(i), 0));
        }
        assert_eq!(rx.used(&mem, 4), (4, good.len() as u32));
        assert_eq!(read(&mem, buf(4), good.len()), delivered(&good));
        assert_eq!(get(&m.rx_dropped), 4);
        assert_eq!(get(&m.rx_frames), 1);
    }

    #[test]
    fn rx_short_reads_and_caps() {
        let mem = memory();
        let mut rx = Vq::new(&mem, 0);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        peer.send(&[1, 2, 3]).unwrap();
        for _ in 0..QSIZE + 2 {
            peer.send(&frame(b"x")).unwrap();
        }
        for i in 0..QSIZE {
            rx.post_rx(&mem, i, 2048);
        }
        // The short read is dropped (and counts against the cap); a queue's worth of
        // iterations per pass.
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (QSIZE as u32 - 1, RxState::Capped));
        assert_eq!(get(&m.rx_dropped), 1);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (1, RxState::NoBuffers));
    }

    #[test]
    fn tx_gathers_chains() {
        let mem = memory();
        let mut tx = Vq::new(&mem, 1);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        let one = frame(b"one descriptor");
        mem.write_slice(&one, GuestAddress(buf(0))).unwrap();
        tx.desc(&mem, 0, buf(0), one.len() as u32, 0, 0);
        tx.publish(&mem, 0);
        // Header, then the frame in two pieces.
        let three = frame(&[0x33; 3000]);
        mem.write_slice(&three[..12], GuestAddress(buf(1))).unwrap();
        mem.write_slice(&three[12..1000], GuestAddress(buf(2)))
            .unwrap();
        mem.write_slice(&three[1000..], GuestAddress(buf(3)))
            .unwrap();
        tx.desc(&mem, 1, buf(1), 12, VRING_DESC_F_NEXT, 2);
        tx.desc(&mem, 2, buf(2), 988, VRING_DESC_F_NEXT, 3);
        tx.desc(&mem, 3, buf(3), (three.len() - 1000) as u32, 0, 0);
        tx.publish(&mem, 1);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (2, false));
        let mut got = vec![0u8; MAX_FRAME_LEN];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], one[..]);
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], three[..]);
        assert_eq!(tx.used(&mem, 0), (0, 0));
        assert_eq!(tx.used(&mem, 1), (1, 0));
        assert_eq!(get(&m.tx_frames), 2);
        assert_eq!(get(&m.tx_bytes), (one.len() + three.len() - 24) as u64);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (0, false));
    }

    #[test]
    fn tx_malformed_chains_are_dropped_alone() {
        let mem = memory();
        let mut tx = Vq::new(&mem, 1);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        // Too long: 40000 + 30000 bytes.
        tx.desc(&mem, 0, buf(0), 40000, VRING_DESC_F_NEXT, 1);
        tx.desc(&mem, 1, buf(1), 30000, 0, 0);
        tx.publish(&mem, 0);
        // Device-writable.
        tx.desc(&mem, 2, buf(2), 100, VRING_DESC_F_WRITE, 0);
        tx.publish(&mem, 2);
        // Outside guest memory.
        tx.desc(&mem, 3, MEM_SIZE - 50, 100, 0, 0);
        tx.publish(&mem, 3);
        // Shorter than the header.
        tx.desc(&mem, 4, buf(4), 11, 0, 0);
        tx.publish(&mem, 4);
        // A loop: 5 -> 6 -> 5.
        tx.desc(&mem, 5, buf(5), 20, VRING_DESC_F_NEXT, 6);
        tx.desc(&mem, 6, buf(6), 20, VRING_DESC_F_NEXT, 5);
        tx.publish(&mem, 5);
        // A next index outside the table.
        tx.desc(&mem, 7, buf(7), 100, VRING_DESC_F_NEXT, 999);
        tx.publish(&mem, 7);
        // Exactly the limit is fine.
        let big = frame(&vec![0x42; MAX_FRAME_LEN - VNET_HDR_LEN - 14]);
        mem.write_slice(&big, GuestAddress(buf(8))).unwrap();
        tx.desc(&mem, 8, buf(8), big.len() as u32, 0, 0);
        tx.publish(&mem, 8);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (7, false));
        assert_eq!(get(&m.tx_malformed), 6);
        assert_eq!(get(&m.tx_frames), 1);
        let mut got = vec![0u8; MAX_FRAME_LEN + 10];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(n, MAX_FRAME_LEN);
        assert!(peer.recv(&mut got).is_err());
        assert_eq!(tx.used_idx(&mem), 7);
    }

    #[test]
    fn tx_cap_leaves_work() {
        let mem = memory();
        let mut tx = Vq::new(&mem, 1);
        let (mut f, m) = frames();
        let (mut b, peer) = pair();
        let fr = frame(b"x");
        mem.write_slice(&fr, GuestAddress(buf(0))).unwrap();
        tx.desc(&mem, 0, buf(0), fr.len() as u32, 0, 0);
        // The same head over and over (harmless: each send completes before the next).
        for _ in 0..QSIZE {
            tx.publish(&mem, 0);
        }
        assert_eq!(
            f.process_tx(&mem, &mut tx.queue, &mut b),
            (QSIZE as u32, false)
        );
        tx.publish(&mem, 0);
        tx.publish(&mem, 0);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (2, false));
        assert_eq!(get(&m.tx_frames), u64::from(QSIZE) + 2);
        let mut got = [0u8; 64];
        let mut n = 0;
        while peer.recv(&mut got).is_ok() {
            n += 1;
        }
        assert_eq!(n, QSIZE + 2);
        // A driver claiming more entries than the ring holds gets nothing processed.
        mem.write_obj(
            tx.avail_idx.wrapping_add(QSIZE + 1),
            GuestAddress(tx.base() + 0x1000 + 2),
        )
        .unwrap();
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (0, false));
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
        let q = |i| Vq::new(mem, i).queue;
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
            vec![Vq::new(&mem, 0).queue],
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
        let ep = net.event_sources()[0];
        assert!(readable(ep));
        net.process_event(0);
        assert!(net.is_watching());
        assert!(!readable(ep));
        net.reset();
        assert_eq!(net.backend().offload, Some(0));
        assert!(readable(ep));
        net.process_event(0);
        assert!(!net.is_watching());
        assert!(!readable(ep));
    }

    #[test]
    fn tap_interest_follows_rx_buffers() {
        let mem = memory();
        let (mut net, evt, peer) = device();
        let ep = net.event_sources()[0];
        // Not active: nothing watched, nothing readable.
        peer.send(&frame(b"early")).unwrap();
        assert!(!readable(ep));
        activate(&mut net, &mem, &evt, bit(VIRTIO_F_VERSION_1));
        assert!(readable(ep));
        peer.send(&frame(b"second")).unwrap();
        // The event loop wakes up; no RX buffers: one frame is held, the TAP is not
        // watched although more wait in it, and no interrupt is raised.
        net.process_event(0);
        assert!(!net.is_watching());
        assert!(!readable(ep));
        assert!(evt.read().is_err());
        // The guest posts one buffer and kicks: the held frame goes in, an interrupt
        // follows, and the TAP stays unwatched (the second frame is now held).
        let mut rx = Vq::new(&mem, 0);
        rx.post_rx(&mem, 0, 2048);
        // The device's own copy of the queue was set up the same way.
        net.process_queue(RX_QUEUE);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(rx.used_idx(&mem), 1);
        assert_eq!(read(&mem, buf(0) + 26, 5), b"early");
        assert!(!net.is_watching());
        rx.post_rx(&mem, 1, 2048);
        net.process_queue(RX_QUEUE);
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(read(&mem, buf(1) + 26, 6), b"second");
        // Everything delivered: watching again, quiet until the next frame.
        assert!(net.is_watching());
        assert!(!readable(ep));
        peer.send(&frame(b"third")).unwrap();
        assert!(readable(ep));
        // A kick with nothing to do raises no interrupt.
        rx.post_rx(&mem, 2, 2048);
        net.process_event(0);
        assert_eq!(evt.read().unwrap(), 1);
        net.process_queue(RX_QUEUE);
        assert!(evt.read().is_err());
        // TX through the device, one interrupt.
        let tx = Vq::new(&mem, 1);
        let fr = frame(b"out");
        mem.write_slice(&fr, GuestAddress(buf(5))).unwrap();
        tx.desc(&mem, 0, buf(5), fr.len() as u32, 0, 0);
        let mut tx = tx;
        tx.publish(&mem, 0);
        assert!(!net.process_queue(TX_QUEUE));
        assert_eq!(evt.read().unwrap(), 1);
        let mut got = [0u8; 128];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], fr[..]);
    }

    #[test]
    fn broken_backend_stops_watching() {
        let mem = memory();
        let (mut net, evt, peer) = device();
        activate(&mut net, &mem, &evt, bit(VIRTIO_F_VERSION_1));
        net.process_event(0);
        assert!(net.is_watching());
        peer.send(&frame(b"x")).unwrap();
        net.backend.fail_recv = true;
        net.process_event(0);
        assert!(!net.is_watching());
        assert!(evt.read().is_err());
        // An RX kick tries again; once the backend works, frames flow.
        net.backend.fail_recv = false;
        let mut rx = Vq::new(&mem, 0);
        rx.post_rx(&mem, 0, 2048);
        net.process_queue(RX_QUEUE);
        assert!(net.is_watching());
        assert_eq!(evt.read().unwrap(), 1);
    }
}
