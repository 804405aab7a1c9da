//! virtio-vsock (stream sockets) backed by Firecracker's hybrid Unix-socket protocol.
//!
//! Three queues: RX (packets to the guest), TX (packets from the guest) and the event
//! queue, which only carries the transport-reset event a snapshot restore sends (the
//! driver's buffers there are held, never used, until then). The device keeps no state a
//! restore could not rebuild: connections are closed by a reset, the listener stays.
//!
//! After a restore the guest's connections have no host side any more (their host peers
//! belonged to the process that made the snapshot), so the restored device tells the
//! driver with VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the driver closes every connection and
//! reads the guest CID again. Until the driver has taken the event and handed its buffer
//! back (a kick of the event queue), nothing goes to the RX queue, so a host connection
//! made just after the restore is not closed by the reset meant for the old ones
//! (Firecracker gates RX the same way).
//!
//! `packet.rs` is the wire header, `conn.rs` one connection's state machine and flow
//! control, `muxer.rs` the host sockets and which connection a packet belongs to; this file
//! moves packets between the queues and the muxer.

pub mod conn;
pub mod metrics;
pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};

use self::metrics::{METRICS, inc};
use self::muxer::Muxer;
use self::packet::{HDR_LEN, Header};
use super::{ActivateError, EventSet, Interest, VirtioDevice, VirtioInterrupt, Work};
use crate::vm::memory::GuestMemory;

/// virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Firecracker's queue size.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// The largest payload of one packet, either way (Firecracker's and Linux's limit).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// `struct virtio_vsock_event { le32 id; }` with this id: the transport was reset.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// Where the transport-reset event of a restore is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetEvent {
    /// None owed: RX flows.
    None,
    /// Owed, waiting for an event-queue buffer (or for the event loop's first pass).
    Pending,
    /// Delivered when the driver's event-queue avail index was this; RX waits until the
    /// driver hands a buffer back (the index moves on) and kicks the event queue. (A kick
    /// alone is no answer: the restore itself kicks every queue once.)
    AwaitingAck(u16),
}

pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Payload staging, one packet at a time.
    buf: Vec<u8>,
    reset_event: ResetEvent,
}

/// A descriptor chain's buffers, checked for direction and guest memory.
struct Chain {
    head: u16,
    parts: Vec<(GuestAddress, usize)>,
    total: usize,
}

fn collect_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    writable: bool,
    max: usize,
) -> Result<Chain, (u16, &'static str)> {
    let head = chain.head_index();
    let mut parts = Vec::new();
    let mut total = 0usize;
    let mut dangling = false;
    for d in chain {
        if parts.len() >= max {
            return Err((head, "has more descriptors than the queue"));
        }
        if d.is_write_only() != writable {
            return Err((head, "has a descriptor of the wrong direction"));
        }
        let len = d.len() as usize;
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if len > 0 && !mem.check_range(d.addr(), len, access) {
            return Err((head, "points outside guest memory"));
        }
        parts.push((d.addr(), len));
        total = total.saturating_add(len);
        dangling = d.has_next();
    }
    if dangling {
        return Err((head, "loops or has a bad next index"));
    }
    Ok(Chain { head, parts, total })
}

/// Copies `src` into the chain from byte `skip` on (a chain checked by `collect_chain`).
fn write_chain(mem: &GuestMemory, chain: &Chain, mut skip: usize, mut src: &[u8]) -> bool {
    for (addr, len) in &chain.parts {
        if src.is_empty() {
            break;
        }
        if skip >= *len {
            skip -= len;
            continue;
        }
        let n = (*len - skip).min(src.len());
        let Some(at) = addr.0.checked_add(skip as u64) else {
            return false;
        };
        if mem
            .write_slice(src.get(..n).unwrap_or_default(), GuestAddress(at))
            .is_err()
        {
            return false;
        }
        src = src.get(n..).unwrap_or_default();
        skip = 0;
    }
    src.is_empty()
}

/// Reads `dst.len()` bytes from the chain from byte `skip` on.
fn read_chain(mem: &GuestMemory, chain: &Chain, mut skip: usize, dst: &mut [u8]) -> bool {
    let mut done = 0;
    for (addr, len) in &chain.parts {
        if done == dst.len() {
            break;
        }
        if skip >= *len {
            skip -= len;
            continue;
        }
        let n = (*len - skip).min(dst.len() - done);
        let Some(at) = addr.0.checked_add(skip as u64) else {
            return false;
        };
        let Some(part) = dst.get_mut(done..done + n) else {
            return false;
        };
        if mem.read_slice(part, GuestAddress(at)).is_err() {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == dst.len()
}

impl Vsock {
    /// Creates the device and binds its Unix socket (a stale socket file is replaced).
    pub fn new(guest_cid: u32, uds_path: &str) -> std::io::Result<Vsock> {
        Ok(Vsock {
            guest_cid: u64::from(guest_cid),
            muxer: Muxer::new(u64::from(guest_cid), uds_path)?,
            active: None,
            buf: vec![0u8; MAX_PKT_DATA],
            reset_event: ResetEvent::None,
        })
    }

    /// Puts the owed transport-reset event in the driver's next event-queue buffer, if
    /// it has one (else the event waits for the driver's next event-queue kick).
    fn deliver_reset_event(&mut self) {
        if self.reset_event != ResetEvent::Pending {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let size = a.event.size();
        for _ in 0..size {
            let Some(chain) = a.event.pop_descriptor_chain(&a.mem) else {
                break;
            };
            let head = chain.head_index();
            let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
            let written = match collect_chain(&a.mem, chain, true, usize::from(size)) {
                Ok(c) if c.total >= event.len() => write_chain(&a.mem, &c, 0, &event),
                Ok(_) => false,
                Err((_, why)) => {
                    log::debug!("vsock: event chain {head} {why}");
                    false
                }
            };
            let len = if written { event.len() as u32 } else { 0 };
            if let Err(e) = a.event.add_used(&a.mem, head, len) {
                log::debug!("vsock: cannot complete event chain {head}: {e}");
            }
            a.interrupt.signal_used_queue();
            if written {
                log::info!("vsock: transport reset event sent to the guest");
                let avail = a
                    .event
                    .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                    .map_or(0, |i| i.0);
                self.reset_event = ResetEvent::AwaitingAck(avail);
                return;
            }
            inc(&METRICS.ev_queue_event_fails, 1);
        }
        log::debug!("vsock: no event buffer for the transport reset yet");
    }

    /// Moves every packet the guest made available to the muxer, at most a queue's worth
    /// per pass. Returns whether work is left.
    fn run_tx(&mut self, interest: &mut dyn Interest) -> bool {
        let Some(a) = self.active.as_mut() else {
            return false;
        };
        let mut used = 0u32;
        let mut more = false;
        for _ in 0..a.tx.size() {
            let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) else {
                break;
            };
            match collect_chain(&a.mem, chain, false, usize::from(a.tx.size())) {
                Ok(c) => {
                    let mut raw = [0u8; HDR_LEN];
                    if !read_chain(&a.mem, &c, 0, &mut raw) {
                        inc(&METRICS.tx_malformed, 1);
                        log::debug!("vsock: TX chain {} shorter than a header; dropped", c.head);
                    } else {
                        let hdr = Header::from_bytes(&raw);
                        let len = hdr.len as usize;
                        let fits = len <= MAX_PKT_DATA && c.total - HDR_LEN >= len;
                        let read = self
                            .buf
                            .get_mut(..len)
                            .filter(|_| fits)
                            .is_some_and(|d| read_chain(&a.mem, &c, HDR_LEN, d));
                        match self.buf.get(..len).filter(|_| read) {
                            Some(d) => {
                                inc(&METRICS.tx_packets_count, 1);
                                inc(&METRICS.tx_bytes_count, d.len() as u64);
                                self.muxer.send_pkt(&hdr, d, interest)
                            }
                            None => {
                                inc(&METRICS.tx_malformed, 1);
                                log::debug!(
                                    "vsock: TX chain {} holds no {len}-byte payload; dropped",
                                    c.head
                                )
                            }
                        }
                    }
                    if let Err(e) = a.tx.add_used(&a.mem, c.head, 0) {
                        log::debug!("vsock: cannot complete TX chain {}: {e}", c.head);
                    }
                }
                Err((head, why)) => {
                    inc(&METRICS.tx_malformed, 1);
                    log::debug!("vsock: TX chain {head} {why}; dropped");
                    if let Err(e) = a.tx.add_used(&a.mem, head, 0) {
                        log::debug!("vsock: cannot complete TX chain {head}: {e}");
                    }
                }
            }
            used += 1;
            more = used == u32::from(a.tx.size());
        }
        if used > 0 && a.tx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        if more {
            more =
                a.tx.avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                    .map(|idx| idx.0 != a.tx.next_avail())
                    .unwrap_or(false);
        }
        more
    }

    /// Fills RX buffers with what the muxer has for the guest, a queue's worth per pass;
    /// if more is left, the wake eventfd brings the event loop back.
    fn run_rx(&mut self, interest: &mut dyn Interest) {
        if self.reset_event != ResetEvent::None {
            return;
        }
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = 0u32;
        while self.muxer.has_rx() {
            if used == u32::from(a.rx.size()) {
                self.muxer.wake();
                break;
            }
            let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) else {
                // No buffers: the guest's next RX kick resumes.
                break;
            };
            let c = match collect_chain(&a.mem, chain, true, usize::from(a.rx.size())) {
                Ok(c) if c.total >= HDR_LEN => c,
                Ok(c) => {
                    log::debug!("vsock: RX chain {} shorter than a header; skipped", c.head);
                    let _ = a.rx.add_used(&a.mem, c.head, 0);
                    used += 1;
                    continue;
                }
                Err((head, why)) => {
                    log::debug!("vsock: RX chain {head} {why}; skipped");
                    let _ = a.rx.add_used(&a.mem, head, 0);
                    used += 1;
                    continue;
                }
            };
            let room = (c.total - HDR_LEN).min(MAX_PKT_DATA);
            let Some((hdr, len)) = self
                .muxer
                .recv_pkt(self.buf.get_mut(..room).unwrap_or_default(), interest)
            else {
                a.rx.go_to_previous_position();
                break;
            };
            let data = self.buf.get(..len).unwrap_or_default();
            let ok = write_chain(&a.mem, &c, 0, &hdr.to_bytes())
                && write_chain(&a.mem, &c, HDR_LEN, data);
            if !ok {
                log::debug!("vsock: cannot write RX chain {}", c.head);
            }
            let written = if ok { (HDR_LEN + len) as u32 } else { 0 };
            if ok {
                inc(&METRICS.rx_packets_count, 1);
                inc(&METRICS.rx_bytes_count, len as u64);
            }
            if let Err(e) = a.rx.add_used(&a.mem, c.head, written) {
                log::debug!("vsock: cannot complete RX chain {}: {e}", c.head);
            }
            used += 1;
        }
        if used > 0 && a.rx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn config_len(&self) -> usize {
        8
    }

    /// `struct virtio_vsock_config { le64 guest_cid; }`
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *d = at.and_then(|a| cfg.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("vsock: config write at {offset:#x} ignored (read-only)");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event), None) = (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        self.active = Some(Active {
            mem,
            rx,
            tx,
            event,
            interrupt,
        });
        log::debug!("vsock: active, guest CID {}", self.guest_cid);
        // Host connections may already wait for the guest.
        self.muxer.wake();
        Ok(())
    }

    fn process_queue(&mut self, index: usize, interest: &mut dyn Interest) -> Work {
        self.muxer.settle(interest);
        if let (EVENT_QUEUE, ResetEvent::AwaitingAck(at), Some(a)) =
            (index, self.reset_event, self.active.as_ref())
        {
            // The driver handed an event buffer back: it has handled the reset.
            let now = a
                .event
                .avail_idx(&a.mem, std::sync::atomic::Ordering::Acquire)
                .map_or(at, |i| i.0);
            if now != at {
                self.reset_event = ResetEvent::None;
            }
        }
        self.deliver_reset_event();
        let more = match index {
            RX_QUEUE => {
                self.run_rx(interest);
                false
            }
            TX_QUEUE => {
                let more = self.run_tx(interest);
                // Answers (responses, credit updates, data now allowed) go out at once.
                self.run_rx(interest);
                more
            }
            EVENT_QUEUE => {
                self.run_rx(interest);
                false
            }
            _ => false,
        };
        self.muxer.arm_timer();
        if more { Work::More } else { Work::Done }
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset_event = ResetEvent::None;
        self.muxer.reset();
    }

    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.rx.state(), a.tx.state(), a.event.state()])
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> Option<crate::snapshot::devices::DeviceState> {
        Some(crate::snapshot::devices::DeviceState::Vsock {})
    }

    fn restore_device_state(
        &mut self,
        state: Option<&crate::snapshot::devices::DeviceState>,
    ) -> Result<(), String> {
        match state {
            None | Some(crate::snapshot::devices::DeviceState::Vsock {}) => Ok(()),
            Some(_) => Err("the saved state is not a vsock device's".into()),
        }
    }

    /// A restored running device owes the driver a transport reset: sent from the event
    /// loop's first pass, once the vCPUs' interrupt controllers hold their saved state.
    fn restored(&mut self) {
        self.reset_event = ResetEvent::Pending;
        self.muxer.wake();
    }

    /// The listener, the timer and the wake eventfd; host streams come and go through
    /// `Interest` as their connections can read or write.
    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        self.muxer.event_sources()
    }

    fn process_event(
        &mut self,
        source: u16,
        events: EventSet,
        interest: &mut dyn Interest,
    ) -> Work {
        self.muxer.process_event(source, events, interest);
        self.deliver_reset_event();
        self.run_rx(interest);
        self.muxer.arm_timer();
        Work::Done
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::packet::*;
    use super::*;
    use crate::devices::ioapic::IrqLine;

    const QSIZE: u16 = 16;
    const RINGS: u64 = 0x1000;

    use crate::devices::virtio::testing::TestLoop;
    const BUFS: u64 = 0x10_0000;

    /// One virtqueue as a driver sees it (rings of queue q at 0x1000 + q * 0x3000).
    struct Vq {
        base: u64,
        avail_idx: u16,
    }

    impl Vq {
        fn new(mem: &GuestMemory, index: u64) -> (Vq, Queue) {
            let base = RINGS + index * 0x3000;
            let mut q = Queue::new(QSIZE).unwrap();
            q.try_set_desc_table_address(GuestAddress(base)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(base + 0x1000))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(base + 0x2000))
                .unwrap();
            q.set_ready(true);
            assert!(q.is_valid(mem));
            (Vq { base, avail_idx: 0 }, q)
        }

        fn desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let d = self.base + u64::from(i) * 16;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags as u16, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % QSIZE);
            mem.write_obj(head, GuestAddress(self.base + 0x1000 + 4 + slot * 2))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x1000 + 2))
                .unwrap();
        }

        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).unwrap()
        }

        /// (id, len) of used entry `i`.
        fn used(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
            let e = self.base + 0x2000 + 4 + u64::from(i % QSIZE) * 8;
            (
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
    }

    fn buf(i: u16) -> u64 {
        BUFS + u64::from(i) * 0x1_0000
    }

    fn guest_pkt(op: u16, src_port: u32, dst_port: u32, len: u32) -> [u8; HDR_LEN] {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Header::default()
        }
        .to_bytes()
    }

    #[test]
    fn queues_survive_hostile_chains_and_carry_a_connection() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock").to_string_lossy().into_owned();
        let host = std::os::unix::net::UnixListener::bind(format!("{uds}_77")).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (mut rx, rxq) = Vq::new(&mem, 0);
        let (mut tx, txq) = Vq::new(&mem, 1);
        let (_ev, evq) = Vq::new(&mem, 2);
        let mut dev = Vsock::new(3, &uds).unwrap();
        let lp = &mut TestLoop::new(dev.event_sources());
        let irq = EventFd::new(0).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(
            irq.try_clone().unwrap(),
        )));
        dev.activate(mem.clone(), vec![rxq, txq, evq], interrupt, 0)
            .unwrap();

        // Hostile TX chains, each dropped alone: a device-writable descriptor, a chain
        // shorter than a header, a length beyond the chain, one outside guest memory,
        // and a descriptor loop.
        mem.write_slice(&guest_pkt(OP_RW, 1, 2, 0), GuestAddress(buf(0)))
            .unwrap();
        tx.desc(&mem, 0, buf(0), 44, VRING_DESC_F_WRITE, 0);
        tx.desc(&mem, 1, buf(0), 20, 0, 0);
        mem.write_slice(&guest_pkt(OP_RW, 1, 2, 1000), GuestAddress(buf(2)))
            .unwrap();
        tx.desc(&mem, 2, buf(2), 100, 0, 0);
        tx.desc(&mem, 3, 0x3f_fff0, 0x100, 0, 0);
        tx.desc(&mem, 4, buf(0), 44, VRING_DESC_F_NEXT, 5);
        tx.desc(&mem, 5, buf(0), 44, VRING_DESC_F_NEXT, 4);
        // Then a well-formed packet for a connection that does not exist.
        mem.write_slice(&guest_pkt(OP_RW, 1, 2, 0), GuestAddress(buf(12)))
            .unwrap();
        tx.desc(&mem, 9, buf(12), 44, 0, 0);
        for h in [0, 1, 2, 3, 4, 9] {
            tx.publish(&mem, h);
        }
        assert_eq!(dev.process_queue(TX_QUEUE, lp), Work::Done);
        assert_eq!(tx.used_idx(&mem), 6);

        // The driver posts RX buffers, one of them too short for a header.
        rx.desc(&mem, 0, buf(8), 16, VRING_DESC_F_WRITE, 0);
        rx.publish(&mem, 0);
        for i in 1..4u16 {
            rx.desc(&mem, i, buf(8 + i), 4096, VRING_DESC_F_WRITE, 0);
            rx.publish(&mem, i);
        }
        dev.process_queue(RX_QUEUE, lp);
        // The RW for no connection gets an RST (the short buffer is skipped); the
        // malformed ones nothing.
        assert_eq!(rx.used_idx(&mem), 2);
        assert_eq!(rx.used(&mem, 0), (0, 0));
        let (id, len) = rx.used(&mem, 1);
        assert_eq!((id, len), (1, HDR_LEN as u32));
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(buf(9))).unwrap();
        let h = Header::from_bytes(&raw);
        assert_eq!((h.op, h.src_port, h.dst_port, h.dst_cid), (OP_RST, 2, 1, 3));

        // A guest connection to port 77: the header and the data in separate descriptors.
        mem.write_slice(&guest_pkt(OP_REQUEST, 1000, 77, 0), GuestAddress(buf(6)))
            .unwrap();
        tx.desc(&mem, 6, buf(6), 44, 0, 0);
        tx.publish(&mem, 6);
        dev.process_queue(TX_QUEUE, lp);
        let (mut peer, _) = host.accept().unwrap();
        assert_eq!(rx.used_idx(&mem), 3);
        mem.read_slice(&mut raw, GuestAddress(buf(10))).unwrap();
        assert_eq!(Header::from_bytes(&raw).op, OP_RESPONSE);
        mem.write_slice(&guest_pkt(OP_RW, 1000, 77, 5), GuestAddress(buf(7)))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(buf(7) + 0x1000))
            .unwrap();
        tx.desc(&mem, 7, buf(7), 44, VRING_DESC_F_NEXT, 8);
        tx.desc(&mem, 8, buf(7) + 0x1000, 5, 0, 0);
        tx.publish(&mem, 7);
        dev.process_queue(TX_QUEUE, lp);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // And back: the host writes, the event loop's pass fills the next RX buffer.
        peer.write_all(b"world").unwrap();
        for _ in 0..100 {
            for (source, ev) in lp.wait(10) {
                dev.process_event(source, ev, lp);
            }
            if rx.used_idx(&mem) == 4 {
                break;
            }
        }
        assert_eq!(rx.used(&mem, 3), (3, HDR_LEN as u32 + 5));
        let mut data = [0u8; 5];
        mem.read_slice(&mut data, GuestAddress(buf(11) + HDR_LEN as u64))
            .unwrap();
        assert_eq!(&data, b"world");
        assert!(irq.read().unwrap() > 0);

        // A reset (on a vCPU thread, which cannot reach the event loop) closes the
        // connection on the loop's next pass, the stream taken out of the loop first.
        // One more RX buffer lets the connection find the stream empty and wait on it.
        rx.desc(&mem, 4, buf(13), 4096, VRING_DESC_F_WRITE, 0);
        rx.publish(&mem, 4);
        dev.process_queue(RX_QUEUE, lp);
        assert_eq!(lp.fds().len(), 4);
        dev.reset();
        for (source, ev) in lp.wait(1000) {
            dev.process_event(source, ev, lp);
        }
        assert_eq!(lp.fds().len(), 3);
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(UnixStream::connect(&uds).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A restored device puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in the driver's next
    /// event buffer (waiting for one if there is none) and holds RX back until the driver
    /// hands an event buffer back: a kick alone (the restore kicks every queue) is no
    /// answer.
    #[test]
    fn restore_sends_a_transport_reset_and_holds_rx_until_answered() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-reset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock").to_string_lossy().into_owned();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let (mut rx, rxq) = Vq::new(&mem, 0);
        let (mut tx, txq) = Vq::new(&mem, 1);
        let (mut ev, evq) = Vq::new(&mem, 2);
        let mut dev = Vsock::new(3, &uds).unwrap();
        let lp = &mut TestLoop::new(dev.event_sources());
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(
            EventFd::new(0).unwrap(),
        )));
        dev.activate(mem.clone(), vec![rxq, txq, evq], interrupt, 0)
            .unwrap();
        dev.restored();
        // No event buffer yet: the event waits, RX too.
        dev.process_queue(EVENT_QUEUE, lp);
        assert_eq!(ev.used_idx(&mem), 0);
        // A packet for no connection (a leftover of the old process) earns an RST, which
        // must wait for the driver's answer to the reset.
        mem.write_slice(&guest_pkt(OP_RW, 5, 6, 0), GuestAddress(buf(0)))
            .unwrap();
        tx.desc(&mem, 0, buf(0), 44, 0, 0);
        tx.publish(&mem, 0);
        rx.desc(&mem, 0, buf(1), 4096, VRING_DESC_F_WRITE, 0);
        rx.publish(&mem, 0);
        mem.write_obj(0xffff_ffffu32, GuestAddress(buf(2))).unwrap();
        ev.desc(&mem, 0, buf(2), 8, VRING_DESC_F_WRITE, 0);
        ev.publish(&mem, 0);
        ev.desc(&mem, 1, buf(3), 8, VRING_DESC_F_WRITE, 0);
        ev.publish(&mem, 1);
        dev.process_queue(TX_QUEUE, lp);
        assert_eq!(ev.used_idx(&mem), 1, "one event, in the first buffer");
        assert_eq!(ev.used(&mem, 0), (0, 4));
        let id: u32 = mem.read_obj(GuestAddress(buf(2))).unwrap();
        assert_eq!(id, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
        assert_eq!(rx.used_idx(&mem), 0, "RX before the driver answered");
        dev.process_queue(EVENT_QUEUE, lp);
        dev.process_queue(RX_QUEUE, lp);
        assert_eq!(rx.used_idx(&mem), 0, "a bare kick is no answer");
        // The driver posts its buffer back: RX flows, the RST goes out; no second event.
        ev.publish(&mem, 0);
        dev.process_queue(EVENT_QUEUE, lp);
        assert_eq!(rx.used_idx(&mem), 1);
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(buf(1))).unwrap();
        assert_eq!(Header::from_bytes(&raw).op, OP_RST);
        assert_eq!(ev.used_idx(&mem), 1);
        // A reset forgets an owed event.
        dev.restored();
        dev.reset();
        assert_eq!(dev.reset_event, ResetEvent::None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
