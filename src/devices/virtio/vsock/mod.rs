//! virtio-vsock (stream sockets) backed by Firecracker's hybrid Unix-socket protocol.
//!
//! Three queues: RX (packets to the guest), TX (packets from the guest) and the event
//! queue, which only carries the transport-reset event a snapshot restore sends (the
//! driver's buffers there are held, never used, until then). The device keeps no state a
//! restore could not rebuild: connections are closed by a reset, the listener stays.
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
use super::{ActivateError, VirtioDevice, VirtioInterrupt};
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

struct Active {
    mem: GuestMemory,
    rx: Queue,
    tx: Queue,
    _event: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Payload staging, one packet at a time.
    buf: Vec<u8>,
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
        })
    }

    /// Moves every packet the guest made available to the muxer, at most a queue's worth
    /// per pass. Returns whether work is left.
    fn run_tx(&mut self) -> bool {
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
                                self.muxer.send_pkt(&hdr, d)
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
    fn run_rx(&mut self) {
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
                .recv_pkt(self.buf.get_mut(..room).unwrap_or_default())
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
            _event: event,
            interrupt,
        });
        log::debug!("vsock: active, guest CID {}", self.guest_cid);
        // Host connections may already wait for the guest.
        self.muxer.wake();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let more = match index {
            RX_QUEUE => {
                self.run_rx();
                false
            }
            TX_QUEUE => {
                let more = self.run_tx();
                // Answers (responses, credit updates, data now allowed) go out at once.
                self.run_rx();
                more
            }
            EVENT_QUEUE => false,
            _ => false,
        };
        self.muxer.arm_timer();
        more
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn event_sources(&self) -> Vec<RawFd> {
        vec![self.muxer.epoll_fd()]
    }

    fn process_event(&mut self, source: usize) {
        if source == 0 {
            self.muxer.process_events();
            self.run_rx();
            self.muxer.arm_timer();
        }
    }
}
