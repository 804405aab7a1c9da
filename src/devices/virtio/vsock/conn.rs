//! One vsock connection between a guest socket and a host Unix stream: its state machine
//! and credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! Flow control bounds what ember holds in both directions:
//! - guest → host: ember tells the guest it has `TX_BUF_SIZE` bytes of buffer
//!   (`buf_alloc`) and how many it has passed on (`fwd_cnt`). Bytes the host peer does
//!   not take yet wait in `tx_buf`, which the guest's credit caps at `TX_BUF_SIZE`; a guest
//!   that sends beyond its credit loses the connection (RST).
//! - host → guest: ember reads from the host stream only into a guest RX buffer it already
//!   holds and only as much as the guest's credit allows, so nothing is buffered here; a
//!   guest that stops reading leaves the bytes in the host socket, whose writer blocks.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::*;

/// Receive buffer ember advertises per connection, and the most it holds for a host peer
/// that does not read (Firecracker's value).
pub const TX_BUF_SIZE: u32 = 64 * 1024;
/// ember tells the guest about freed buffer space once its view is this close to empty.
const CREDIT_UPDATE_THRESHOLD: u32 = 4 * 1024;
/// How long the guest has to answer a connection request, and to finish a shutdown,
/// before ember resets the connection (Firecracker's values).
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(2000);
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(2000);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to send) to the guest, no answer yet.
    LocalInit,
    /// Guest-initiated: the host socket is connected, RESPONSE to send.
    PeerInit,
    Established,
    /// The host peer closed its stream; SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed,
    /// The guest sent SHUTDOWN: it will receive no more (`rcv`) / send no more (`send`).
    PeerClosed {
        rcv: bool,
        send: bool,
    },
    /// Reset: an RST is due to the guest, then the connection goes.
    Killed,
}

/// Packets a connection owes the guest, in the order it sends them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending {
    rst: bool,
    response: bool,
    request: bool,
    /// The host stream may have bytes (or an end) to pass on.
    rw: bool,
    credit_update: bool,
}

impl Pending {
    fn any(&self) -> bool {
        self.rst || self.response || self.request || self.rw || self.credit_update
    }
}

/// A packet for the guest: its op, flags and how many bytes of the scratch buffer it
/// carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxPacket {
    pub op: u16,
    pub flags: u32,
    pub len: usize,
}

pub struct Conn {
    pub local_port: u32,
    pub peer_port: u32,
    state: State,
    stream: UnixStream,
    tx_buf: VecDeque<u8>,
    /// Bytes passed on to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The guest's buffer and what it has consumed of what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    last_fwd_cnt_to_peer: Wrapping<u32>,
    pending: Pending,
    pub expiry: Option<Instant>,
    /// Our half of the host stream is shut down (the guest will send nothing more).
    host_write_shut: bool,
}

impl Conn {
    /// A guest-initiated connection whose host socket is connected.
    pub fn peer_init(stream: UnixStream, local_port: u32, peer_port: u32, hdr: &Header) -> Conn {
        let mut c = Conn::new(stream, local_port, peer_port, State::PeerInit);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending.response = true;
        c
    }

    /// A host-initiated connection (after its `CONNECT` line).
    pub fn local_init(stream: UnixStream, local_port: u32, peer_port: u32) -> Conn {
        let mut c = Conn::new(stream, local_port, peer_port, State::LocalInit);
        c.pending.request = true;
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Conn {
        Conn {
            local_port,
            peer_port,
            state,
            stream,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_fwd_cnt_to_peer: Wrapping(0),
            pending: Pending::default(),
            expiry: None,
            host_write_shut: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn has_pending_rx(&self) -> bool {
        self.pending.any()
    }

    /// Resets the connection: an RST goes to the guest, what the host was owed is dropped.
    pub fn kill(&mut self) {
        self.state = State::Killed;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        self.tx_buf = VecDeque::new();
        self.expiry = None;
    }

    /// Writes raw bytes to the host stream outside flow control (the `OK` line).
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.stream.write(bytes)
    }

    fn peer_credit(&self) -> u32 {
        (Wrapping(self.peer_buf_alloc) - (self.rx_cnt - self.peer_fwd_cnt)).0
    }

    fn peer_needs_credit_update(&self) -> bool {
        let seen_free = Wrapping(TX_BUF_SIZE) - (self.fwd_cnt - self.last_fwd_cnt_to_peer);
        seen_free.0 < CREDIT_UPDATE_THRESHOLD
    }

    /// Whether bytes from the host may go to the guest in this state.
    fn may_send_to_guest(&self) -> bool {
        matches!(
            self.state,
            State::Established | State::PeerClosed { rcv: false, .. }
        )
    }

    /// The events the host stream is watched for: readable while bytes may go to the guest
    /// and none are already waiting for an RX buffer; writable while `tx_buf` holds bytes.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        if self.may_send_to_guest() && self.peer_credit() > 0 && !self.pending.rw {
            ev |= EventSet::IN;
        }
        ev
    }

    /// The host stream reported `ev`.
    pub fn notify(&mut self, ev: EventSet) {
        if ev
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
            && self.may_send_to_guest()
        {
            self.pending.rw = true;
        }
        if ev.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP)
            && !self.tx_buf.is_empty()
        {
            self.flush_tx_buf();
        }
    }

    fn flush_tx_buf(&mut self) {
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!(
                        "vsock: host stream of {}:{} refused a write: {e}",
                        self.local_port,
                        self.peer_port
                    );
                    self.kill();
                    return;
                }
            }
        }
        // The host caught up after a stall: the guest may be waiting for room for a whole
        // packet that its last view of our buffer did not have (the threshold below only
        // fires on large gaps).
        if self.tx_buf.is_empty() && self.fwd_cnt != self.last_fwd_cnt_to_peer {
            self.pending.credit_update = true;
        }
        self.after_forwarding();
    }

    /// After bytes moved to the host: credit news for the guest, and the end of a shutdown
    /// that waited for `tx_buf` to drain.
    fn after_forwarding(&mut self) {
        if !self.tx_buf.is_empty() {
            if self.peer_needs_credit_update() {
                self.pending.credit_update = true;
            }
            return;
        }
        if let State::PeerClosed { rcv, send } = self.state {
            if send && !self.host_write_shut {
                // The guest sends nothing more: the host peer reads its end of file.
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                self.host_write_shut = true;
            }
            if rcv && send {
                self.pending.rst = true;
                return;
            }
        }
        if self.peer_needs_credit_update() {
            self.pending.credit_update = true;
        }
    }

    /// A packet from the guest for this connection (RST is the muxer's business).
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.op) {
            (State::Established | State::PeerClosed { send: false, .. }, OP_RW) => {
                self.forward(data)
            }
            (State::LocalInit, OP_RESPONSE) => {
                self.state = State::Established;
                self.expiry = None;
            }
            (State::Established | State::PeerClosed { .. }, OP_SHUTDOWN) => {
                let (old_rcv, old_send) = match self.state {
                    State::PeerClosed { rcv, send } => (rcv, send),
                    _ => (false, false),
                };
                let rcv = old_rcv || hdr.flags & SHUTDOWN_RCV != 0;
                let send = old_send || hdr.flags & SHUTDOWN_SEND != 0;
                self.state = State::PeerClosed { rcv, send };
                if rcv {
                    // Bytes read from the host can no longer go anywhere.
                    self.pending.rw = false;
                }
                if rcv && send && !self.tx_buf.is_empty() && self.expiry.is_none() {
                    self.expiry = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                }
                self.after_forwarding();
            }
            (
                State::Established | State::PeerInit | State::PeerClosed { rcv: false, .. },
                OP_CREDIT_UPDATE,
            ) => {}
            (
                State::Established | State::PeerInit | State::PeerClosed { send: false, .. },
                OP_CREDIT_REQUEST,
            ) => self.pending.credit_update = true,
            (state, op) => log::debug!(
                "vsock: packet op {op} dropped on {}:{} in state {state:?}",
                self.local_port,
                self.peer_port
            ),
        }
    }

    /// Data from the guest: straight to the host stream, the rest into `tx_buf`.
    fn forward(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            log::debug!(
                "vsock: guest sent beyond its credit on {}:{}; reset",
                self.local_port,
                self.peer_port
            );
            self.kill();
            return;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            while written < data.len() {
                match self.stream.write(data.get(written..).unwrap_or_default()) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::debug!(
                            "vsock: host stream of {}:{} refused a write: {e}",
                            self.local_port,
                            self.peer_port
                        );
                        self.kill();
                        return;
                    }
                }
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf
            .extend(data.get(written..).unwrap_or_default().iter().copied());
        self.after_forwarding();
    }

    /// The next packet for the guest, its data (if any) read into `buf`. None when the
    /// connection owes the guest nothing.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        let pkt = |op, len| Some(RxPacket { op, flags: 0, len });
        if self.pending.rst {
            self.pending = Pending::default();
            self.state = State::Killed;
            return pkt(OP_RST, 0);
        }
        if self.pending.response {
            self.pending.response = false;
            self.state = State::Established;
            return pkt(OP_RESPONSE, 0);
        }
        if self.pending.request {
            self.pending.request = false;
            self.expiry = Some(Instant::now() + REQUEST_TIMEOUT);
            return pkt(OP_REQUEST, 0);
        }
        if self.pending.rw {
            if !self.may_send_to_guest() {
                self.pending.rw = false;
            } else if self.peer_credit() == 0 {
                self.pending.rw = false;
                self.last_fwd_cnt_to_peer = self.fwd_cnt;
                return pkt(OP_CREDIT_REQUEST, 0);
            } else {
                let max = buf.len().min(self.peer_credit() as usize);
                let dst = buf.get_mut(..max).unwrap_or_default();
                match self.stream.read(dst) {
                    Ok(0) => {
                        // The host peer closed: neither side sends more.
                        self.pending.rw = false;
                        self.state = State::LocalClosed;
                        self.expiry = Some(Instant::now() + SHUTDOWN_TIMEOUT);
                        self.last_fwd_cnt_to_peer = self.fwd_cnt;
                        return Some(RxPacket {
                            op: OP_SHUTDOWN,
                            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
                            len: 0,
                        });
                    }
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32);
                        self.last_fwd_cnt_to_peer = self.fwd_cnt;
                        self.pending.credit_update = false;
                        // More may wait: stay pending until a read would block.
                        return pkt(OP_RW, n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.pending.rw = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!(
                            "vsock: cannot read the host stream of {}:{}: {e}",
                            self.local_port,
                            self.peer_port
                        );
                        self.kill();
                        self.pending = Pending::default();
                        return pkt(OP_RST, 0);
                    }
                }
            }
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            self.last_fwd_cnt_to_peer = self.fwd_cnt;
            return pkt(OP_CREDIT_UPDATE, 0);
        }
        None
    }

    /// The header fields this connection puts on every packet it sends.
    pub fn header(&self, guest_cid: u64, rx: RxPacket) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: rx.len as u32,
            type_: TYPE_STREAM,
            op: rx.op,
            flags: rx.flags,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 99,
            dst_port: 1,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
            type_: TYPE_STREAM,
            ..Header::default()
        }
    }

    fn established() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Conn::peer_init(a, 1, 99, &hdr(OP_REQUEST, 0, 8192, 0));
        let mut buf = [0u8; 64];
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_RESPONSE);
        assert_eq!(c.state(), State::Established);
        (c, b)
    }

    #[test]
    fn data_both_ways_within_credit() {
        let (mut c, mut host) = established();
        c.send_pkt(&hdr(OP_RW, 0, 8192, 0), b"ping");
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        host.write_all(&[7u8; 10000]).unwrap();
        c.notify(EventSet::IN);
        let mut buf = vec![0u8; 65536];
        // The guest's credit (8192) caps the first packet.
        let p = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((p.op, p.len), (OP_RW, 8192));
        let p = c.recv_pkt(&mut buf).unwrap();
        assert_eq!(p.op, OP_CREDIT_REQUEST);
        assert!(!c.interest().contains(EventSet::IN));
        // The guest consumed everything: the rest flows.
        c.send_pkt(&hdr(OP_CREDIT_UPDATE, 0, 8192, 8192), &[]);
        assert!(c.interest().contains(EventSet::IN));
        c.notify(EventSet::IN);
        let p = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((p.op, p.len), (OP_RW, 10000 - 8192));
        assert_eq!(c.recv_pkt(&mut buf), None);
    }

    #[test]
    fn host_not_reading_fills_tx_buf_then_credit_overrun_resets() {
        let (mut c, _host) = established();
        let chunk = vec![1u8; 16384];
        let mut sent = 0usize;
        // Write until the socket and then tx_buf fill; the guest respects no credit.
        while c.state() == State::Established && sent < 16 << 20 {
            c.send_pkt(&hdr(OP_RW, 0, 8192, 0), &chunk);
            sent += chunk.len();
        }
        assert_eq!(c.state(), State::Killed);
        assert!(c.tx_buf.is_empty());
        let mut buf = [0u8; 64];
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_RST);
    }

    #[test]
    fn host_close_and_guest_shutdown() {
        let (mut c, host) = established();
        drop(host);
        c.notify(EventSet::HANG_UP);
        let mut buf = [0u8; 64];
        let p = c.recv_pkt(&mut buf).unwrap();
        assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        assert_eq!(c.state(), State::LocalClosed);
        assert!(c.expiry.is_some());

        let (mut c, mut host) = established();
        c.send_pkt(&hdr(OP_SHUTDOWN, 0, 8192, 0), &[]);
        c.send_pkt(&hdr(OP_SHUTDOWN, SHUTDOWN_SEND, 8192, 0), &[]);
        // The host reads its end of file; one more flag and ember resets.
        let mut rest = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(c.recv_pkt(&mut buf), None);
        c.send_pkt(&hdr(OP_SHUTDOWN, SHUTDOWN_RCV, 8192, 0), &[]);
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_RST);
    }

    #[test]
    fn local_init_handshake_and_credit_request() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::local_init(a, 1 << 30, 1024);
        let mut buf = [0u8; 64];
        assert_eq!(c.recv_pkt(&mut buf).unwrap().op, OP_REQUEST);
        assert!(c.expiry.is_some());
        assert_eq!(c.interest(), EventSet::empty());
        c.send_pkt(&hdr(OP_RESPONSE, 0, 4096, 0), &[]);
        assert_eq!((c.state(), c.expiry), (State::Established, None));
        assert!(c.interest().contains(EventSet::IN));
        c.send_pkt(&hdr(OP_CREDIT_REQUEST, 0, 4096, 0), &[]);
        let p = c.recv_pkt(&mut buf).unwrap();
        assert_eq!(p.op, OP_CREDIT_UPDATE);
        let h = c.header(3, p);
        assert_eq!(
            (h.buf_alloc, h.src_port, h.dst_port),
            (TX_BUF_SIZE, 1 << 30, 1024)
        );
    }
}
