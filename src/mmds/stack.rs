//! The MMDS endpoint on one interface: ARP replies for the MMDS address and a minimal
//! TCP server on port 80, fed with the guest's frames by the virtio-net device (TX) and
//! drained into its receive queue (RX), on the VMM thread.
//!
//! Everything it holds is bounded, whatever the guest sends: one pending ARP reply, at
//! most `MAX_RESETS` queued resets, at most `MAX_CONNECTIONS` connections (a new SYN
//! evicts the least recently active one, half-open ones first), each with a request
//! buffer of `REQ_BUF` bytes (the TCP window it advertises: bytes beyond it are not
//! acknowledged) and one answer at a time; a new answer starts only while all
//! connections together hold less than `OUT_BUDGET` bytes of unacknowledged answers.
//! There are no timers: the guest's device is the only link, which loses nothing but
//! what the guest itself drops, and a duplicate ACK or a retransmission from the guest
//! makes the endpoint send again from the last acknowledged byte.
//! Checksums of incoming segments are not verified (the guest may leave them to an
//! offload); outgoing ones are complete.

use std::net::Ipv4Addr;

use super::http::{self, Parse, Response};
use super::{SharedMmds, lock};

pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Firecracker's MMDS MAC address, locally administered.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const PORT: u16 = 80;
pub const MAX_CONNECTIONS: usize = 30;
pub const MAX_RESETS: usize = 100;
/// Largest request (headers and body) a connection buffers; Firecracker's is 2500.
pub const REQ_BUF: usize = 2500;
const OUT_BUDGET: usize = 256 * 1024;
const MSS: usize = 1460;
const DEFAULT_PEER_MSS: usize = 536;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IP_HDR: usize = 20;
const TCP_HDR: usize = 20;
const PROTO_TCP: u8 = 6;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[a, c, d, e]) => u32::from_be_bytes([a, c, d, e]),
        _ => 0,
    }
}

fn ip_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    match b.get(at..at + 4) {
        Some(&[a, c, d, e]) => Some(Ipv4Addr::new(a, c, d, e)),
        _ => None,
    }
}

/// Whether `frame` (Ethernet, no virtio header) is for the MMDS at `ip`: an ARP packet
/// asking for it, or an IPv4 packet to it. Such frames never reach the TAP.
pub fn is_mmds_frame(frame: &[u8], ip: Ipv4Addr) -> bool {
    match be16(frame, 12) {
        ETHERTYPE_ARP => ip_at(frame, ETH_HDR + 24) == Some(ip),
        ETHERTYPE_IPV4 => ip_at(frame, ETH_HDR + 16) == Some(ip),
        _ => false,
    }
}

/// Sequence-space comparisons (RFC 793 arithmetic modulo 2^32).
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn seq_le(a: u32, b: u32) -> bool {
    !seq_lt(b, a)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peer {
    ip: Ipv4Addr,
    port: u16,
}

/// A segment sent outside any connection: a reset, or the last ACK of a closed one.
#[derive(Debug)]
struct Reset {
    to: Peer,
    seq: u32,
    /// RST, RST|ACK, or ACK alone (the last ACK of a closed connection).
    flags: u8,
    ack: u32,
}

#[derive(Debug)]
struct Conn {
    peer: Peer,
    /// The peer has acknowledged our SYN.
    established: bool,
    /// Our SYN has to be (re)sent.
    syn_pending: bool,
    isn: u32,
    rcv_nxt: u32,
    /// First unacknowledged byte of `out` (after the SYN).
    snd_una: u32,
    /// Next byte to send.
    snd_nxt: u32,
    peer_window: u32,
    peer_mss: usize,
    ack_pending: bool,
    dup_acks: u8,
    req: Vec<u8>,
    /// The answer, from `snd_una` on.
    out: Vec<u8>,
    /// Close once `out` is sent: a FIN follows it.
    closing: bool,
    fin_sent: bool,
    fin_acked: bool,
    fin_received: bool,
    /// For eviction: the stack's clock at the last segment from the peer.
    last_active: u64,
}

impl Conn {
    fn done(&self) -> bool {
        self.fin_acked && self.fin_received
    }

    /// Sequence number after the last byte (or FIN) queued.
    fn snd_end(&self) -> u32 {
        let fin = u32::from(self.closing);
        self.snd_una
            .wrapping_add(self.out.len() as u32)
            .wrapping_add(fin)
    }

    fn window(&self) -> u16 {
        REQ_BUF.saturating_sub(self.req.len()) as u16
    }
}

/// Counters the interface's metrics report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    pub frames_in: u64,
    pub dropped: u64,
    pub requests: u64,
    pub connections: u64,
}

pub struct MmdsStack {
    ip: Ipv4Addr,
    mmds: SharedMmds,
    /// (guest MAC, guest IP) of the last ARP request for the MMDS address.
    arp_reply: Option<([u8; 6], [u8; 4])>,
    /// The MAC the guest sends from: the TCP answers go there.
    guest_mac: [u8; 6],
    resets: std::collections::VecDeque<Reset>,
    conns: Vec<Conn>,
    /// Round-robin start in `conns` for fairness between connections.
    cursor: usize,
    clock: u64,
    isn_seed: u32,
    pub stats: StackStats,
}

impl MmdsStack {
    pub fn new(ip: Ipv4Addr, mmds: SharedMmds) -> MmdsStack {
        let mut seed = [0u8; 4];
        // A predictable ISN only lets the guest guess its own connections' numbers.
        let _ = super::token::random_bytes(&mut seed);
        MmdsStack {
            ip,
            mmds,
            arp_reply: None,
            guest_mac: [0; 6],
            resets: Default::default(),
            conns: Vec::new(),
            cursor: 0,
            clock: 0,
            isn_seed: u32::from_le_bytes(seed),
            stats: StackStats::default(),
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Takes `frame` if it is for the MMDS; returns false (frame untouched) otherwise.
    pub fn detour(&mut self, frame: &[u8]) -> bool {
        if !is_mmds_frame(frame, self.ip) {
            return false;
        }
        self.stats.frames_in += 1;
        let ok = match be16(frame, 12) {
            ETHERTYPE_ARP => self.on_arp(frame),
            _ => self.on_ipv4(frame),
        };
        if !ok {
            self.stats.dropped += 1;
        }
        true
    }

    /// Whether frames wait to be written to the guest.
    pub fn has_output(&self) -> bool {
        self.arp_reply.is_some()
            || !self.resets.is_empty()
            || self.conns.iter().any(|c| self.conn_has_output(c))
    }

    fn on_arp(&mut self, f: &[u8]) -> bool {
        let Some(arp) = f.get(ETH_HDR..ETH_HDR + ARP_LEN) else {
            return false;
        };
        // Ethernet/IPv4 request only.
        if be16(arp, 0) != 1 || be16(arp, 2) != ETHERTYPE_IPV4 || arp.get(4..6) != Some(&[6, 4]) {
            return false;
        }
        if be16(arp, 6) != 1 {
            return false;
        }
        let (mut mac, mut ip) = ([0u8; 6], [0u8; 4]);
        mac.copy_from_slice(arp.get(8..14).unwrap_or(&[0; 6]));
        ip.copy_from_slice(arp.get(14..18).unwrap_or(&[0; 4]));
        self.arp_reply = Some((mac, ip));
        true
    }

    fn on_ipv4(&mut self, f: &[u8]) -> bool {
        let Some(ip) = f.get(ETH_HDR..) else {
            return false;
        };
        let ver_ihl = ip.first().copied().unwrap_or(0);
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        if ver_ihl >> 4 != 4 || ihl < IP_HDR || total < ihl || total > ip.len() {
            return false;
        }
        // Fragments: more-fragments set or an offset.
        if be16(ip, 6) & 0x3fff != 0 || ip.get(9) != Some(&PROTO_TCP) {
            return false;
        }
        let Some(src) = ip_at(ip, 12) else {
            return false;
        };
        let Some(tcp) = ip.get(ihl..total) else {
            return false;
        };
        let off = usize::from(tcp.get(12).copied().unwrap_or(0) >> 4) * 4;
        if tcp.len() < TCP_HDR || off < TCP_HDR || off > tcp.len() || be16(tcp, 2) != PORT {
            return false;
        }
        if let Some(m) = f.get(6..12) {
            self.guest_mac.copy_from_slice(m);
        }
        self.clock += 1;
        let peer = Peer {
            ip: src,
            port: be16(tcp, 0),
        };
        let seg = Segment {
            seq: be32(tcp, 4),
            ack: be32(tcp, 8),
            flags: tcp.get(13).copied().unwrap_or(0),
            window: u32::from(be16(tcp, 14)),
            options: tcp.get(TCP_HDR..off).unwrap_or_default(),
            data: tcp.get(off..).unwrap_or_default(),
        };
        self.on_segment(peer, &seg);
        true
    }

    fn queue_reset(&mut self, r: Reset) {
        if self.resets.len() < MAX_RESETS {
            self.resets.push_back(r);
        } else {
            self.stats.dropped += 1;
        }
    }

    fn on_segment(&mut self, peer: Peer, seg: &Segment) {
        let Some(i) = self.conns.iter().position(|c| c.peer == peer) else {
            self.on_new(peer, seg);
            return;
        };
        if seg.flags & RST != 0 {
            // Only a reset inside the window counts (RFC 5961's blind-reset rule, simply).
            let c = self.conns.get(i);
            let in_window = c.is_some_and(|c| {
                seq_le(c.rcv_nxt, seg.seq)
                    && seq_lt(seg.seq, c.rcv_nxt.wrapping_add(REQ_BUF as u32 + 1))
            });
            if in_window {
                self.conns.swap_remove(i);
            }
            return;
        }
        let clock = self.clock;
        let budget_free = self.out_total() < OUT_BUDGET;
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        c.last_active = clock;
        if seg.flags & SYN != 0 {
            // A retransmitted SYN before our SYN-ACK was acknowledged: send it again.
            if !c.established && seg.seq.wrapping_add(1) == c.rcv_nxt {
                c.syn_pending = true;
            } else {
                c.ack_pending = true;
            }
            return;
        }
        if seg.flags & ACK == 0 {
            return;
        }
        // Acknowledgement.
        if !c.established {
            if seg.ack == c.isn.wrapping_add(1) {
                c.established = true;
                c.syn_pending = false;
            } else {
                let r = Reset {
                    to: peer,
                    seq: seg.ack,
                    flags: RST,
                    ack: 0,
                };
                self.queue_reset(r);
                return;
            }
        } else if seq_lt(c.snd_una, seg.ack) && seq_le(seg.ack, c.snd_end()) {
            let acked = seg.ack.wrapping_sub(c.snd_una) as usize;
            let data = acked.min(c.out.len());
            c.out.drain(..data);
            if acked > data {
                c.fin_acked = true;
            }
            c.snd_una = seg.ack;
            if seq_lt(c.snd_nxt, c.snd_una) {
                c.snd_nxt = c.snd_una;
            }
            c.dup_acks = 0;
        } else if seg.ack == c.snd_una && seg.data.is_empty() && c.snd_nxt != c.snd_una {
            c.dup_acks = c.dup_acks.saturating_add(1);
            if c.dup_acks >= 2 {
                c.snd_nxt = c.snd_una;
                c.fin_sent = false;
                c.dup_acks = 0;
            }
        }
        c.peer_window = seg.window;
        // Data, in order only; anything else is answered with our rcv_nxt.
        let seg_len = seg.data.len() as u32 + u32::from(seg.flags & FIN != 0);
        if seg_len > 0 {
            c.ack_pending = true;
            if seg.seq == c.rcv_nxt && !c.fin_received {
                let room = REQ_BUF.saturating_sub(c.req.len());
                let take = seg.data.len().min(room);
                c.req
                    .extend_from_slice(seg.data.get(..take).unwrap_or_default());
                c.rcv_nxt = c.rcv_nxt.wrapping_add(take as u32);
                if seg.flags & FIN != 0 && take == seg.data.len() {
                    c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
                    c.fin_received = true;
                }
            } else if seq_lt(seg.seq, c.rcv_nxt) {
                // A retransmission: the guest may have lost what we sent; send it again.
                c.snd_nxt = c.snd_una;
                c.fin_sent = false;
            }
        }
        if budget_free {
            serve(&self.mmds, c, &mut self.stats);
        }
        if self.conns.get(i).is_some_and(|c| c.done()) {
            let c = self.conns.swap_remove(i);
            // Both FINs are acknowledged but ours of the peer's is still to be sent: without
            // it the peer would retransmit its FIN and get a reset for a clean close.
            if c.ack_pending {
                self.queue_reset(Reset {
                    to: peer,
                    seq: c.snd_nxt,
                    flags: ACK,
                    ack: c.rcv_nxt,
                });
            }
        }
    }

    fn on_new(&mut self, peer: Peer, seg: &Segment) {
        if seg.flags & RST != 0 {
            return;
        }
        if seg.flags & (SYN | ACK) != SYN {
            let len = seg.data.len() as u32
                + u32::from(seg.flags & FIN != 0)
                + u32::from(seg.flags & SYN != 0);
            let r = if seg.flags & ACK != 0 {
                Reset {
                    to: peer,
                    seq: seg.ack,
                    flags: RST,
                    ack: 0,
                }
            } else {
                Reset {
                    to: peer,
                    seq: 0,
                    flags: RST | ACK,
                    ack: seg.seq.wrapping_add(len),
                }
            };
            self.queue_reset(r);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            // Evict the least recently active, half-open connections first.
            if let Some(i) = self
                .conns
                .iter()
                .enumerate()
                .min_by_key(|(_, c)| (c.established, c.last_active))
                .map(|(i, _)| i)
            {
                self.conns.swap_remove(i);
            }
        }
        self.isn_seed = self
            .isn_seed
            .wrapping_mul(1_103_515_245)
            .wrapping_add(12345);
        let isn = self.isn_seed;
        self.stats.connections += 1;
        self.conns.push(Conn {
            peer,
            established: false,
            syn_pending: true,
            isn,
            rcv_nxt: seg.seq.wrapping_add(1),
            snd_una: isn.wrapping_add(1),
            snd_nxt: isn.wrapping_add(1),
            peer_window: seg.window,
            peer_mss: parse_mss(seg.options).unwrap_or(DEFAULT_PEER_MSS),
            ack_pending: false,
            dup_acks: 0,
            req: Vec::new(),
            out: Vec::new(),
            closing: false,
            fin_sent: false,
            fin_acked: false,
            fin_received: false,
            last_active: self.clock,
        });
    }

    fn out_total(&self) -> usize {
        self.conns.iter().map(|c| c.out.len()).sum()
    }

    fn conn_has_output(&self, c: &Conn) -> bool {
        if c.syn_pending || c.ack_pending {
            return true;
        }
        if !c.established {
            return false;
        }
        let in_flight = c.snd_nxt.wrapping_sub(c.snd_una) as usize;
        (in_flight < c.out.len() && (in_flight as u32) < c.peer_window)
            || (c.closing && !c.fin_sent && in_flight >= c.out.len())
    }

    /// Writes the next frame for the guest into `buf`; returns its length, or None.
    pub fn write_next_frame(&mut self, buf: &mut [u8]) -> Option<usize> {
        if let Some((mac, ip)) = self.arp_reply.take() {
            return write_arp_reply(buf, mac, ip, self.ip);
        }
        // Connections may have room to serve requests queued while the budget was spent.
        if self.out_total() < OUT_BUDGET {
            for c in self.conns.iter_mut() {
                if c.out.is_empty() && !c.req.is_empty() {
                    serve(&self.mmds, c, &mut self.stats);
                }
            }
        }
        if let Some(r) = self.resets.pop_front() {
            let hdr = TcpOut {
                to: r.to,
                seq: r.seq,
                ack: r.ack,
                flags: r.flags,
                window: 0,
                mss: false,
            };
            return self.write_tcp(buf, &hdr, &[]);
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let ready = self.conns.get(i).is_some_and(|c| self.conn_has_output(c));
            if !ready {
                continue;
            }
            self.cursor = (i + 1) % n;
            let Some(c) = self.conns.get_mut(i) else {
                continue;
            };
            let (hdr, range) = next_segment(c);
            let data = c.out.get(range).unwrap_or_default().to_vec();
            let to = c.peer;
            let hdr = TcpOut { to, ..hdr };
            return self.write_tcp(buf, &hdr, &data);
        }
        None
    }

    fn write_tcp(&self, buf: &mut [u8], t: &TcpOut, data: &[u8]) -> Option<usize> {
        let opt = if t.mss { 4 } else { 0 };
        let tcp_len = TCP_HDR + opt + data.len();
        let ip_len = IP_HDR + tcp_len;
        let frame = buf.get_mut(..ETH_HDR + ip_len)?;
        frame.fill(0);
        frame[..6].copy_from_slice(&self.guest_mac);
        frame[6..12].copy_from_slice(&MMDS_MAC);
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let (_, ip) = frame.split_at_mut(ETH_HDR);
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&self.ip.octets());
        ip[16..20].copy_from_slice(&t.to.ip.octets());
        let c = checksum(&[&ip[..IP_HDR]], 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let (iph, tcp) = ip.split_at_mut(IP_HDR);
        tcp[0..2].copy_from_slice(&PORT.to_be_bytes());
        tcp[2..4].copy_from_slice(&t.to.port.to_be_bytes());
        tcp[4..8].copy_from_slice(&t.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&t.ack.to_be_bytes());
        tcp[12] = (((TCP_HDR + opt) / 4) as u8) << 4;
        tcp[13] = t.flags;
        tcp[14..16].copy_from_slice(&t.window.to_be_bytes());
        if t.mss {
            tcp[20..24].copy_from_slice(&[2, 4, (MSS >> 8) as u8, (MSS & 0xff) as u8]);
        }
        tcp[TCP_HDR + opt..].copy_from_slice(data);
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&iph[12..20]);
        pseudo[9] = PROTO_TCP;
        pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        let c = checksum(&[&pseudo, tcp], 0);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        Some(ETH_HDR + ip_len)
    }

    /// Connections open now (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes the endpoint holds for its connections (for tests of the bounds).
    pub fn buffered(&self) -> usize {
        self.conns.iter().map(|c| c.out.len() + c.req.len()).sum()
    }
}

struct Segment<'a> {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u32,
    options: &'a [u8],
    data: &'a [u8],
}

struct TcpOut {
    to: Peer,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: bool,
}

fn parse_mss(mut o: &[u8]) -> Option<usize> {
    while let Some(&kind) = o.first() {
        match kind {
            0 => return None,
            1 => o = o.get(1..)?,
            _ => {
                let len = usize::from(*o.get(1)?);
                if len < 2 {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(usize::from(be16(o, 2)).clamp(64, MSS));
                }
                o = o.get(len..)?;
            }
        }
    }
    None
}

/// Answers the requests complete in `c.req`, one at a time (an answer waits until the
/// previous one is acknowledged), and handles what cannot be a request.
fn serve(mmds: &SharedMmds, c: &mut Conn, stats: &mut StackStats) {
    if !c.established || c.closing || !c.out.is_empty() {
        return;
    }
    match http::parse(&c.req) {
        Parse::Incomplete => {
            if c.req.len() >= REQ_BUF {
                c.out = Response::too_large().encode(true);
                c.closing = true;
                c.req.clear();
            } else if c.fin_received {
                c.closing = true;
            }
        }
        Parse::Bad(why) => {
            c.out = Response::bad_request(why).encode(true);
            c.closing = true;
            c.req.clear();
        }
        Parse::Done(req, used) => {
            stats.requests += 1;
            let close = req.wants_close() || c.fin_received;
            let resp = http::respond(&mut lock(mmds), &req);
            c.out = resp.encode(close);
            c.closing = close;
            c.req.drain(..used.min(c.req.len()));
        }
    }
}

/// The segment a connection sends next, and the part of `out` it carries.
fn next_segment(c: &mut Conn) -> (TcpOut, std::ops::Range<usize>) {
    let any = Peer {
        ip: Ipv4Addr::UNSPECIFIED,
        port: 0,
    };
    let mut t = TcpOut {
        to: any,
        seq: c.snd_nxt,
        ack: c.rcv_nxt,
        flags: ACK,
        window: c.window(),
        mss: false,
    };
    c.ack_pending = false;
    if c.syn_pending {
        c.syn_pending = false;
        t.seq = c.isn;
        t.flags = SYN | ACK;
        t.mss = true;
        return (t, 0..0);
    }
    let in_flight = c.snd_nxt.wrapping_sub(c.snd_una) as usize;
    if c.established && in_flight < c.out.len() {
        let room = (c.peer_window as usize).saturating_sub(in_flight);
        let n = (c.out.len() - in_flight).min(c.peer_mss).min(room);
        if n > 0 {
            t.flags = ACK | PSH;
            c.snd_nxt = c.snd_nxt.wrapping_add(n as u32);
            return (t, in_flight..in_flight + n);
        }
    }
    if c.established && c.closing && !c.fin_sent && in_flight >= c.out.len() {
        c.fin_sent = true;
        t.flags = ACK | FIN;
        c.snd_nxt = c.snd_nxt.wrapping_add(1);
    }
    (t, 0..0)
}

fn write_arp_reply(buf: &mut [u8], mac: [u8; 6], ip: [u8; 4], own: Ipv4Addr) -> Option<usize> {
    let f = buf.get_mut(..ETH_HDR + ARP_LEN)?;
    f[..6].copy_from_slice(&mac);
    f[6..12].copy_from_slice(&MMDS_MAC);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let a = &mut f[ETH_HDR..];
    a[0..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    a[8..14].copy_from_slice(&MMDS_MAC);
    a[14..18].copy_from_slice(&own.octets());
    a[18..24].copy_from_slice(&mac);
    a[24..28].copy_from_slice(&ip);
    Some(ETH_HDR + ARP_LEN)
}

/// The Internet checksum of the concatenated parts (each of even length but the last).
fn checksum(parts: &[&[u8]], init: u32) -> u16 {
    let mut sum = init;
    for p in parts {
        let mut it = p.chunks_exact(2);
        for w in &mut it {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = it.remainder() {
            sum += u32::from(*last) << 8;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::{Mmds, MmdsVersion};
    use serde_json::json;

    const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const GUEST_IP: [u8; 4] = [169, 254, 0, 2];

    fn stack() -> MmdsStack {
        let m = Mmds::shared(1 << 20);
        lock(&m)
            .put(json!({"latest": {"meta-data": {"id": "i-1"}}, "big": "x".repeat(5000)}))
            .unwrap();
        MmdsStack::new(DEFAULT_IPV4, m)
    }

    fn tcp(port: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR + IP_HDR + TCP_HDR];
        f[..6].copy_from_slice(&MMDS_MAC);
        f[6..12].copy_from_slice(&GUEST_MAC);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (IP_HDR + TCP_HDR + data.len()) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[23] = PROTO_TCP;
        f[26..30].copy_from_slice(&GUEST_IP);
        f[30..34].copy_from_slice(&DEFAULT_IPV4.octets());
        let t = &mut f[34..];
        t[0..2].copy_from_slice(&port.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    struct Out {
        seq: u32,
        ack: u32,
        flags: u8,
        data: Vec<u8>,
    }

    fn drain(s: &mut MmdsStack) -> Vec<Out> {
        let mut v = Vec::new();
        let mut buf = vec![0u8; 2048];
        while let Some(n) = s.write_next_frame(&mut buf) {
            let f = &buf[..n];
            if be16(f, 12) != ETHERTYPE_IPV4 {
                continue;
            }
            let ip = &f[14..];
            assert_eq!(checksum(&[&ip[..20]], 0), 0);
            let t = &ip[20..];
            let off = usize::from(t[12] >> 4) * 4;
            v.push(Out {
                seq: be32(t, 4),
                ack: be32(t, 8),
                flags: t[13],
                data: t[off..].to_vec(),
            });
            assert!(v.len() < 10_000);
        }
        v
    }

    /// Connects from `port`; returns (our next seq, the server's next seq).
    fn connect(s: &mut MmdsStack, port: u16) -> (u32, u32) {
        assert!(s.detour(&tcp(port, 1000, 0, SYN, &[])));
        let out = drain(s);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].flags, SYN | ACK);
        assert_eq!(out[0].ack, 1001);
        let srv = out[0].seq.wrapping_add(1);
        s.detour(&tcp(port, 1001, srv, ACK, &[]));
        assert!(drain(s).is_empty());
        (1001, srv)
    }

    fn fetch(s: &mut MmdsStack, port: u16, req: &str) -> String {
        let (seq, srv) = connect(s, port);
        s.detour(&tcp(port, seq, srv, ACK | PSH, req.as_bytes()));
        let mut body = Vec::new();
        let mut next = srv;
        loop {
            let out = drain(s);
            if out.is_empty() {
                break;
            }
            for o in out {
                if o.seq == next {
                    body.extend_from_slice(&o.data);
                    next = next.wrapping_add(o.data.len() as u32);
                    if o.flags & FIN != 0 {
                        next = next.wrapping_add(1);
                    }
                }
            }
            let seq = seq + req.len() as u32;
            s.detour(&tcp(port, seq, next, ACK, &[]));
        }
        String::from_utf8(body).unwrap()
    }

    #[test]
    fn arp() {
        let mut s = stack();
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&DEFAULT_IPV4.octets());
        assert!(s.detour(&f));
        let mut buf = [0u8; 64];
        let n = s.write_next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..6], &GUEST_MAC);
        assert_eq!(&buf[22..28], &MMDS_MAC);
        assert_eq!(&buf[28..32], &DEFAULT_IPV4.octets());
        assert_eq!(n, 42);
        // Another address is not ours.
        f[38..42].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!s.detour(&f));
    }

    #[test]
    fn get_and_large_answer() {
        let mut s = stack();
        let r = fetch(&mut s, 5000, "GET /latest/meta-data/id HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("\r\n\r\ni-1"), "{r}");
        let r = fetch(&mut s, 5001, "GET /big HTTP/1.0\r\n\r\n");
        assert!(r.ends_with(&"x".repeat(5000)), "{}", r.len());
        // HTTP/1.0 closes; our FIN waits for the guest's.
        s.detour(&tcp(5001, 1001 + 21, 0, FIN | ACK, &[]));
    }

    #[test]
    fn v2_over_tcp() {
        let mut s = stack();
        lock(&s.mmds).configure(MmdsVersion::V2, false);
        let r = fetch(&mut s, 6000, "GET /latest HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }

    /// The segments Linux's TCP sends for `printf 'GET …' | nc 169.254.169.254 80` (taken
    /// from a Linux 6.1 guest): a SYN with MSS, SACK, timestamp and window-scale options,
    /// the request, then its FIN after our answer and FIN. The endpoint answers, and
    /// acknowledges the guest's FIN before it forgets the connection: a peer left without
    /// that ACK retransmits its FIN and gets a reset.
    #[test]
    fn linux_client_close_is_acknowledged() {
        let mut s = stack();
        let port = 41460;
        let isn = 3_544_221_309u32;
        let mut syn = tcp(port, isn, 0, SYN, &[]);
        let opts = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 1, 2, 3, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        syn.splice(54..54, opts);
        syn[16..18].copy_from_slice(&((IP_HDR + TCP_HDR + opts.len()) as u16).to_be_bytes());
        syn[46] = (((TCP_HDR + opts.len()) / 4) << 4) as u8;
        syn[48..50].copy_from_slice(&64240u16.to_be_bytes());
        assert!(s.detour(&syn));
        let out = drain(&mut s);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].flags, out[0].ack), (SYN | ACK, isn + 1));
        let srv = out[0].seq.wrapping_add(1);
        s.detour(&tcp(port, isn + 1, srv, ACK, &[]));
        let req = "GET / HTTP/1.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n";
        s.detour(&tcp(port, isn + 1, srv, ACK | PSH, req.as_bytes()));
        let out = drain(&mut s);
        let after_req = isn + 1 + req.len() as u32;
        let answer: Vec<u8> = out.iter().flat_map(|o| o.data.clone()).collect();
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let fin = out.last().unwrap();
        assert_eq!(fin.flags & FIN, FIN, "the answer ends with our FIN");
        let our_end = fin.seq.wrapping_add(1);
        // Linux acknowledges the answer and our FIN, then sends its own FIN.
        s.detour(&tcp(port, after_req, our_end, ACK, &[]));
        assert!(drain(&mut s).is_empty());
        s.detour(&tcp(port, after_req, our_end, ACK | FIN, &[]));
        let out = drain(&mut s);
        assert_eq!(out.len(), 1, "one last ACK");
        assert_eq!(
            (out[0].flags, out[0].seq, out[0].ack),
            (ACK, our_end, after_req + 1)
        );
        assert_eq!(s.connections(), 0, "the connection is closed");
        assert!(out.iter().all(|o| o.flags & RST == 0));
    }

    #[test]
    fn hostile() {
        let mut s = stack();
        // A SYN flood keeps at most MAX_CONNECTIONS.
        for p in 0..1000u16 {
            s.detour(&tcp(p, 7, 0, SYN, &[]));
        }
        assert_eq!(s.connections(), MAX_CONNECTIONS);
        drain(&mut s);
        // Stray segments: bounded resets.
        for p in 0..1000u16 {
            s.detour(&tcp(10_000 + p, 7, 9, ACK, b"x"));
        }
        assert!(s.resets.len() <= MAX_RESETS);
        drain(&mut s);
        // An endless request: the window closes at REQ_BUF, then 413 and FIN.
        let (mut seq, srv) = connect(&mut s, 20_000);
        for _ in 0..100 {
            s.detour(&tcp(20_000, seq, srv, ACK, &[b'a'; 1000]));
            seq = seq.wrapping_add(1000);
        }
        assert!(s.buffered() <= REQ_BUF + 200);
        let out = drain(&mut s);
        assert!(out.iter().any(|o| o.data.starts_with(b"HTTP/1.1 413")));
        // Malformed frames.
        for len in 0..60 {
            let f = tcp(1, 1, 1, SYN, &[]);
            s.detour(&f[..len.min(f.len())]);
        }
        let mut f = tcp(1, 1, 1, SYN, &[]);
        f[14] = 0x4f;
        assert!(s.detour(&f));
        f[14] = 0x45;
        f[16] = 0xff;
        assert!(s.detour(&f));
    }

    /// Structured random segments (any flags, sequence numbers near and far from the
    /// connection's, any data) and raw garbage from many ports: the endpoint stays within
    /// its bounds, answers only with well-formed frames, and drains in bounded steps.
    #[test]
    fn random_segments_stay_bounded() {
        let mut s = stack();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; 2048];
        for _ in 0..20_000 {
            let r = rnd();
            let port = 1000 + (r % 40) as u16;
            let flags = (r >> 8) as u8;
            let seq = if r & (1 << 20) != 0 {
                1001
            } else {
                (r >> 24) as u32
            };
            let ack = (rnd() >> 3) as u32;
            let len = (rnd() % 1600) as usize;
            let mut data = vec![0u8; len];
            let req = b"GET /latest/meta-data/ HTTP/1.1\r\n\r\n";
            for (i, d) in data.iter_mut().enumerate() {
                *d = req.get(i % (req.len() + 3)).copied().unwrap_or(b'A');
            }
            let mut f = tcp(port, seq, ack, flags, &data);
            if r & (1 << 21) != 0 {
                let at = (rnd() as usize) % f.len();
                f[at] = rnd() as u8;
                f.truncate((rnd() as usize) % (f.len() + 1));
            }
            s.detour(&f);
            assert!(s.connections() <= MAX_CONNECTIONS);
            assert!(s.resets.len() <= MAX_RESETS);
            assert!(s.buffered() <= MAX_CONNECTIONS * REQ_BUF + OUT_BUDGET + 8192);
            for _ in 0..8 {
                let Some(n) = s.write_next_frame(&mut buf) else {
                    break;
                };
                let min = ETH_HDR + IP_HDR + TCP_HDR;
                assert!((min..=min + 4 + MSS).contains(&n));
                assert_eq!(checksum(&[&buf[ETH_HDR..ETH_HDR + IP_HDR]], 0), 0);
            }
        }
        let mut steps = 0;
        while s.write_next_frame(&mut buf).is_some() {
            steps += 1;
            assert!(steps < 1_000_000, "the endpoint never runs dry");
        }
    }

    /// The VMM thread's share of a GET (request segment in, answer and its frames out,
    /// the guest's ACK in), without the guest: `cargo test --release --lib
    /// mmds_stack_throughput -- --ignored --nocapture` (BENCHMARKS.md).
    #[test]
    #[ignore]
    fn mmds_stack_throughput() {
        let mut s = stack();
        let (mut seq, srv) = connect(&mut s, 7000);
        let req = b"GET /latest/meta-data/id HTTP/1.1\r\n\r\n";
        let mut next = srv;
        let mut buf = vec![0u8; 2048];
        let n = 200_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            s.detour(&tcp(7000, seq, next, ACK | PSH, req));
            seq = seq.wrapping_add(req.len() as u32);
            while let Some(len) = s.write_next_frame(&mut buf) {
                let ip = &buf[ETH_HDR..len];
                next = be32(&ip[IP_HDR..], 4).wrapping_add((len - ETH_HDR - 40) as u32);
            }
            s.detour(&tcp(7000, seq, next, ACK, &[]));
        }
        let el = t.elapsed();
        eprintln!(
            "mmds stack: {n} GETs in {el:?}: {:.0} req/s, {:.2} us/request",
            f64::from(n) / el.as_secs_f64(),
            el.as_secs_f64() * 1e6 / f64::from(n)
        );
        assert_eq!(s.connections(), 1);
    }

    #[test]
    fn checksums() {
        let data = [
            0x45u8, 0, 0, 0x1c, 0, 0, 0x40, 0, 0x40, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = checksum(&[&data], 0);
        let mut d = data;
        d[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&[&d], 0), 0);
    }
}
