//! Frame processing for one interface, apart from the device and the event loop: frames
//! from the backend into RX chains, TX chains out to the backend. Works on plain guest
//! memory and any [`NetBackend`], so tests drive it with a socket pair instead of a TAP.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::tap::{NetBackend, VNET_HDR_LEN};
use super::{MAX_FRAME_LEN, NUM_BUFFERS_OFFSET, NetMetrics};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::queue::{self, Work};
use crate::mmds::stack::MmdsStack;
use crate::vm::memory::GuestMemory;

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
    /// The driver broke the RX ring (see `queue::BrokenRing`): the device needs a reset.
    BrokenRing,
    /// The RX rate limiter holds the waiting frame back until its timer fires.
    Throttled,
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
    pub(super) metrics: Arc<NetMetrics>,
    /// The metadata service's endpoint on this interface (`mmds-config`): frames for its
    /// address go there instead of the TAP, and its frames come before the TAP's.
    pub mmds: Option<MmdsStack>,
    /// `rx_rate_limiter` and `tx_rate_limiter`; None only without a device (tests).
    pub rx_limiter: Option<RateLimiter>,
    pub tx_limiter: Option<RateLimiter>,
}

/// Takes a frame's tokens from `limiter` (none: no limit).
fn admit(limiter: &mut Option<RateLimiter>, bytes: usize) -> bool {
    match limiter.as_mut().filter(|l| l.is_active()) {
        Some(l) => l.consume_request(bytes as u64),
        None => true,
    }
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
            mmds: None,
            rx_limiter: None,
            tx_limiter: None,
        }
    }

    /// Whether the TX limiter holds frames back until its timer fires.
    pub fn tx_throttled(&self) -> bool {
        self.tx_limiter.as_ref().is_some_and(|l| l.is_blocked())
    }

    /// Whether a frame read from the backend waits for a guest buffer.
    pub fn has_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Whether the MMDS endpoint has frames for the guest.
    pub fn mmds_has_output(&self) -> bool {
        self.mmds.as_ref().is_some_and(|m| m.has_output())
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
            let mmds_frame = match (self.rx_pending, self.mmds.as_mut()) {
                (None, Some(m)) => {
                    let (hdr, rest) = self.rx_buf.split_at_mut(VNET_HDR_LEN);
                    m.write_next_frame(rest).map(|n| {
                        // No offloads in MMDS frames: their checksums are complete.
                        hdr.fill(0);
                        n + VNET_HDR_LEN
                    })
                }
                _ => None,
            };
            let len = match self.rx_pending.or(mmds_frame) {
                Some(len) => len,
                None => match backend.recv(&mut self.rx_buf) {
                    // A TAP never reads 0 bytes; a backend that does is at its end.
                    Ok(0) => {
                        inc(&self.metrics.rx_tap_errors, 1);
                        // The device reports a broken backend once; the guest's kicks retry.
                        log::debug!("net `{}`: the TAP reported end of file", self.id);
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
                        log::debug!("net `{}`: cannot read from the TAP: {e}", self.id);
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
            let chain = match queue::pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    return RxPass {
                        used,
                        state: RxState::NoBuffers,
                    };
                }
                Err(queue::BrokenRing) => {
                    return RxPass {
                        used,
                        state: RxState::BrokenRing,
                    };
                }
            };
            // Charged only once a buffer is there, so a frame waiting for buffers is not
            // charged twice; a refused frame stays pending and its chain on the ring.
            if !admit(&mut self.rx_limiter, len) {
                queue.go_to_previous_position();
                inc(&self.metrics.rx_rate_limiter_throttled, 1);
                return RxPass {
                    used,
                    state: RxState::Throttled,
                };
            }
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
    ) -> (u32, Work) {
        let mut used = 0u32;
        for _ in 0..queue.size() {
            let chain = match queue::pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return (used, Work::Done),
                Err(queue::BrokenRing) => return (used, Work::Broken),
            };
            // The frame's length (header included, as Firecracker charges it) before any
            // copy: a refused chain stays on the ring for the limiter's timer.
            let bytes = chain.clone().reader(mem).map_or(0, |r| r.available_bytes());
            if !admit(&mut self.tx_limiter, bytes) {
                queue.go_to_previous_position();
                inc(&self.metrics.tx_rate_limiter_throttled, 1);
                return (used, Work::Done);
            }
            let head = chain.head_index();
            match gather_chain(mem, chain, &mut self.tx_buf, usize::from(queue.size())) {
                Ok(len) => {
                    let frame = self.tx_buf.get(..len).unwrap_or_default();
                    let eth = frame.get(VNET_HDR_LEN..).unwrap_or_default();
                    let detoured = self.mmds.as_mut().is_some_and(|m| m.detour(eth));
                    match if detoured {
                        Ok(())
                    } else {
                        backend.send(frame)
                    } {
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
        (used, queue::left(queue, mem))
    }
}

/// Copies `frame` into the device-writable buffers of `chain`.
fn write_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    frame: &[u8],
    max_descs: usize,
) -> Result<(), &'static str> {
    let shape = queue::shape(chain.clone(), max_descs);
    if shape.truncated {
        return Err("loops or has a bad next index");
    }
    if shape.readable > 0 {
        return Err("has a device-readable descriptor");
    }
    let mut writer = chain
        .writer(mem)
        .map_err(|_| "points outside guest memory")?;
    if writer.available_bytes() < frame.len() {
        return Err("is too small for the frame");
    }
    writer
        .write_all(frame)
        .map_err(|_| "points outside guest memory")
}

/// Gathers the frame a TX chain holds into `buf`; returns its length (header included).
fn gather_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
    max_descs: usize,
) -> Result<usize, &'static str> {
    let shape = queue::shape(chain.clone(), max_descs);
    if shape.truncated {
        return Err("loops, has a bad next index or more descriptors than the queue");
    }
    if shape.writable > 0 {
        return Err("has a device-writable descriptor");
    }
    // Reader::new refuses buffers outside guest memory and lengths that overflow.
    let mut reader = chain
        .reader(mem)
        .map_err(|_| "points outside guest memory")?;
    let len = reader.available_bytes();
    if len < VNET_HDR_LEN {
        return Err("is shorter than the virtio-net header");
    }
    let dst = buf
        .get_mut(..len)
        .filter(|_| len <= MAX_FRAME_LEN)
        .ok_or("holds more than 65562 bytes")?;
    reader
        .read_exact(dst)
        .map_err(|_| "points outside guest memory")?;
    Ok(len)
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::net::UnixDatagram;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    use std::os::fd::{AsRawFd, RawFd};

    use super::*;
    use crate::devices::virtio::testing::TestQueue;

    pub const MEM_SIZE: u64 = 0x40_0000;
    pub const QSIZE: u16 = 16;
    /// Rings of queue q at 0x1000 + q * 0x3000 (desc, avail, used: one page each).
    pub const RINGS: u64 = 0x1000;
    pub const BUFS: u64 = 0x10_0000;
    pub const BUF_SIZE: u64 = 0x1_0000;

    /// A datagram socket pair standing in for the TAP: `peer` is the host network.
    pub struct Pair {
        pub ours: UnixDatagram,
        pub offload: Option<libc::c_uint>,
        pub fail_recv: bool,
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

    pub fn pair() -> (Pair, UnixDatagram) {
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

    /// Queue `index` of the shared test driver, rings at `RINGS + index * 0x3000`.
    pub fn vq(mem: &GuestMemory, index: u64) -> TestQueue {
        TestQueue::new(mem, RINGS + index * 0x3000, QSIZE)
    }

    pub trait PostRx {
        /// A one-descriptor RX buffer at descriptor `i`, buffer `i`.
        fn post_rx(&mut self, mem: &GuestMemory, i: u16, len: u32);
    }

    impl PostRx for TestQueue {
        fn post_rx(&mut self, mem: &GuestMemory, i: u16, len: u32) {
            self.desc(mem, i, buf(i), len, VRING_DESC_F_WRITE, 0);
            self.publish(mem, i);
        }
    }

    pub fn buf(i: u16) -> u64 {
        BUFS + u64::from(i) * BUF_SIZE
    }

    pub fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    /// A frame as the TAP gives it: a virtio-net header (num_buffers 0) and `payload`
    /// after an Ethernet header.
    pub fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    pub fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// What the guest should find: the frame with num_buffers = 1.
    pub fn delivered(f: &[u8]) -> Vec<u8> {
        let mut d = f.to_vec();
        d[10] = 1;
        d
    }

    pub fn frames() -> (Frames, Arc<NetMetrics>) {
        let m = Arc::new(NetMetrics::default());
        (Frames::new("eth0", m.clone()), m)
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn rx_one_frame_per_chain() {
        let mem = memory();
        let mut rx = vq(&mem, 0);
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
        let mut rx = vq(&mem, 0);
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
        let mut rx = vq(&mem, 0);
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
        let mut rx = vq(&mem, 0);
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

    /// An ARP request for the MMDS address and a frame for another address: the first
    /// is answered into the RX queue and never reaches the backend, the second goes out.
    #[test]
    fn mmds_frames_are_detoured() {
        let mem = memory();
        let mut rx = vq(&mem, 0);
        let mut tx = vq(&mem, 1);
        let (mut f, m) = frames();
        let store = crate::mmds::Mmds::shared(1024);
        let ip = crate::mmds::stack::DEFAULT_IPV4;
        f.mmds = Some(crate::mmds::stack::MmdsStack::new(ip, store));
        let (mut b, peer) = pair();
        let arp_for = |target: [u8; 4]| {
            let mut a = vec![0u8; VNET_HDR_LEN];
            a.extend_from_slice(&[0xff; 6]);
            a.extend_from_slice(&[2, 0, 0, 0, 0, 1, 8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
            a.extend_from_slice(&[2, 0, 0, 0, 0, 1, 169, 254, 1, 2, 0, 0, 0, 0, 0, 0]);
            a.extend_from_slice(&target);
            a
        };
        let ours = arp_for(ip.octets());
        let other = arp_for([169, 254, 169, 253]);
        mem.write_slice(&ours, GuestAddress(buf(0))).unwrap();
        mem.write_slice(&other, GuestAddress(buf(1))).unwrap();
        tx.desc(&mem, 0, buf(0), ours.len() as u32, 0, 0);
        tx.publish(&mem, 0);
        tx.desc(&mem, 1, buf(1), other.len() as u32, 0, 0);
        tx.publish(&mem, 1);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (2, Work::Done));
        let mut got = vec![0u8; MAX_FRAME_LEN];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], other[..]);
        assert!(
            peer.recv(&mut got).is_err(),
            "the MMDS frame reached the backend"
        );
        assert!(f.mmds_has_output());
        rx.post_rx(&mem, 2, 2048);
        let pass = f.process_rx(&mem, &mut rx.queue, &mut b);
        assert_eq!((pass.used, pass.state), (1, RxState::Drained));
        let (_, len) = rx.used(&mem, 0);
        assert_eq!(len as usize, VNET_HDR_LEN + 42);
        let reply = read(&mem, buf(2), len as usize);
        // num_buffers 1, then an ARP reply from the MMDS MAC.
        assert_eq!(reply[10], 1);
        assert_eq!(
            reply[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12],
            crate::mmds::stack::MMDS_MAC
        );
        assert_eq!(reply[VNET_HDR_LEN + 20..VNET_HDR_LEN + 22], [0, 2]);
        assert!(!f.mmds_has_output());
        assert_eq!(get(&m.tx_frames), 2);
    }

    #[test]
    fn tx_gathers_chains() {
        let mem = memory();
        let mut tx = vq(&mem, 1);
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
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (2, Work::Done));
        let mut got = vec![0u8; MAX_FRAME_LEN];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], one[..]);
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(got[..n], three[..]);
        assert_eq!(tx.used(&mem, 0), (0, 0));
        assert_eq!(tx.used(&mem, 1), (1, 0));
        assert_eq!(get(&m.tx_frames), 2);
        assert_eq!(get(&m.tx_bytes), (one.len() + three.len() - 24) as u64);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (0, Work::Done));
    }

    #[test]
    fn tx_malformed_chains_are_dropped_alone() {
        let mem = memory();
        let mut tx = vq(&mem, 1);
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
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (7, Work::Done));
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
        let mut tx = vq(&mem, 1);
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
            (QSIZE as u32, Work::Done)
        );
        tx.publish(&mem, 0);
        tx.publish(&mem, 0);
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (2, Work::Done));
        assert_eq!(get(&m.tx_frames), u64::from(QSIZE) + 2);
        let mut got = [0u8; 64];
        let mut n = 0;
        while peer.recv(&mut got).is_ok() {
            n += 1;
        }
        assert_eq!(n, QSIZE + 2);
        // A driver claiming more entries than the ring holds gets nothing processed.
        // A driver claiming more entries than the ring holds: nothing is processed, and
        // the ring is reported broken.
        tx.set_avail_idx(&mem, tx.avail_idx.wrapping_add(QSIZE + 1));
        assert_eq!(f.process_tx(&mem, &mut tx.queue, &mut b), (0, Work::Broken));
    }
}
