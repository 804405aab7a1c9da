//! The host side of the vsock device: Firecracker's hybrid Unix-socket protocol.
//!
//! - Host-initiated: a host process connects to `uds_path` and writes `CONNECT <port>\n`
//!   (the keyword in any case); ember asks the guest for a connection to that port from a
//!   local port it allocates, and once the guest accepts, writes `OK <local port>\n` and
//!   relays bytes. A guest that refuses (RST) or does not answer within 2 s gets the host
//!   connection closed. A malformed or oversized line closes that connection only.
//! - Guest-initiated: a guest connecting to CID 2 port P reaches the listener at
//!   `<uds_path>_<P>`; if none accepts right away, the guest gets an RST.
//!
//! Every host socket is non-blocking and watched by the VMM thread's event loop, which the
//! muxer reaches through the device's `Interest` (as virtio-net does with its TAP): a host
//! peer never blocks the event loop, and interest in each socket follows what the
//! connection can do now (see `Conn::interest`), so a stalled peer costs no wakeups. Each
//! watched stream gets a source number of its own; the fixed sources come first.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{Conn, RxPacket, State};
use super::metrics::{METRICS, inc};
use super::packet::*;
use crate::devices::virtio::{EventSet, Interest};

/// Firecracker's limit on open connections.
pub const MAX_CONNECTIONS: usize = 1023;
/// Host connections still writing their `CONNECT` line; more are closed at once.
const MAX_PENDING_PREAMBLES: usize = 64;
/// The longest `CONNECT <port>\n` line accepted (Firecracker's buffer).
const MAX_PREAMBLE_LEN: usize = 32;
/// RSTs for packets that match no connection, waiting for RX buffers; beyond this the
/// guest's socket finds out by its own timeout.
const MAX_PENDING_RSTS: usize = 256;
/// How long accepting pauses after it failed for want of resources.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Local ports for host-initiated connections: Firecracker's range [2^30, 2^31).
const LOCAL_PORT_FIRST: u32 = 1 << 30;

/// Event sources: the listener, the timer, the wake eventfd, then host streams.
pub const SOURCE_LISTENER: u16 = 0;
pub const SOURCE_TIMER: u16 = 1;
pub const SOURCE_WAKE: u16 = 2;
const FIRST_STREAM_SOURCE: u16 = 3;

type Key = (u32, u32);

pub struct Muxer {
    guest_cid: u64,
    uds_path: String,
    listener: UnixListener,
    timer: TimerFd,
    timer_at: Option<Instant>,
    /// Written to have the event loop run the device (from a vCPU thread or a capped pass).
    wake: EventFd,
    conns: HashMap<Key, Conn>,
    /// Host stream fd -> its connection, and the events registered for it.
    by_fd: HashMap<RawFd, (Key, EventSet)>,
    /// Host connections that have not finished their `CONNECT` line.
    preambles: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    /// Connections with packets for the guest, each once.
    rxq: VecDeque<Key>,
    rsts: VecDeque<Key>,
    last_local_port: u32,
    /// accept failed for want of descriptors or memory: the listener is out of the event
    /// loop (it would stay readable and spin it) until this time.
    listener_retry_at: Option<Instant>,
    /// Watched host streams: source number -> fd, and back.
    fd_of_source: HashMap<u16, RawFd>,
    source_of_fd: HashMap<RawFd, u16>,
    last_source: u16,
    /// The device was reset on a vCPU thread, which cannot reach the event loop: the
    /// connections close on the event loop's next pass (`settle`).
    reset_pending: bool,
}

impl Muxer {
    /// Binds `uds_path` (replacing a stale socket file).
    pub fn new(guest_cid: u64, uds_path: &str) -> std::io::Result<Muxer> {
        crate::config::vsock::check_uds_path(uds_path).map_err(std::io::Error::other)?;
        match std::fs::remove_file(uds_path) {
            Ok(()) => log::info!("vsock: replaced the stale socket {uds_path}"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let timer = TimerFd::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_string(),
            listener,
            timer,
            timer_at: None,
            wake,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            preambles: HashMap::new(),
            rxq: VecDeque::new(),
            rsts: VecDeque::new(),
            last_local_port: LOCAL_PORT_FIRST - 1,
            listener_retry_at: None,
            fd_of_source: HashMap::new(),
            source_of_fd: HashMap::new(),
            last_source: FIRST_STREAM_SOURCE - 1,
            reset_pending: false,
        })
    }

    /// The sources the event loop watches for input from the start.
    pub fn event_sources(&self) -> Vec<(RawFd, u16)> {
        vec![
            (self.listener.as_raw_fd(), SOURCE_LISTENER),
            (self.timer.as_raw_fd(), SOURCE_TIMER),
            (self.wake.as_raw_fd(), SOURCE_WAKE),
        ]
    }

    /// Watches a host stream under a new source number.
    fn watch_stream(
        &mut self,
        fd: RawFd,
        events: EventSet,
        interest: &mut dyn Interest,
    ) -> std::io::Result<()> {
        // At most MAX_CONNECTIONS + MAX_PENDING_PREAMBLES streams: a free number exists.
        let mut source = None;
        for _ in FIRST_STREAM_SOURCE..=u16::MAX {
            self.last_source = self
                .last_source
                .checked_add(1)
                .unwrap_or(FIRST_STREAM_SOURCE);
            if !self.fd_of_source.contains_key(&self.last_source) {
                source = Some(self.last_source);
                break;
            }
        }
        let source = source.ok_or_else(|| std::io::Error::other("no free source number"))?;
        interest.add(fd, source, events)?;
        self.fd_of_source.insert(source, fd);
        self.source_of_fd.insert(fd, source);
        Ok(())
    }

    /// Takes a host stream out of the event loop; before it is closed.
    fn unwatch_stream(&mut self, fd: RawFd, interest: &mut dyn Interest) {
        if let Some(source) = self.source_of_fd.remove(&fd) {
            self.fd_of_source.remove(&source);
            if let Err(e) = interest.remove(fd) {
                log::error!("vsock: cannot stop watching a host stream: {e}");
            }
        }
    }

    /// Closes the connections of a reset (see `reset`); first thing on every pass.
    pub fn settle(&mut self, interest: &mut dyn Interest) {
        if !std::mem::take(&mut self.reset_pending) {
            return;
        }
        let fds: Vec<RawFd> = self.by_fd.keys().copied().collect();
        for fd in fds {
            self.unwatch_stream(fd, interest);
        }
        self.by_fd.clear();
        self.conns.clear();
    }

    pub fn uds_path(&self) -> &str {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Has the event loop call back soon; safe from any thread (an eventfd write).
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            log::error!("vsock: cannot wake the event loop: {e}");
        }
    }

    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Drops every connection (device reset). This runs on a vCPU thread, which cannot
    /// reach the event loop: the streams are taken out of it and closed by `settle` on the
    /// loop's next pass, which the wake brings at once; until then nothing is sent either
    /// way. The listener stays: host processes can connect again after the driver comes
    /// back.
    pub fn reset(&mut self) {
        self.reset_pending = true;
        self.rxq.clear();
        self.rsts.clear();
        self.wake();
    }

    /// Handles `events` on source `source`.
    pub fn process_event(&mut self, source: u16, events: EventSet, interest: &mut dyn Interest) {
        self.settle(interest);
        match source {
            SOURCE_LISTENER => self.accept(interest),
            SOURCE_TIMER => {
                // Reading clears the readable state; the count does not matter.
                let mut b = [0u8; 8];
                // SAFETY: reading 8 bytes into a local buffer from our timerfd.
                unsafe { libc::read(self.timer.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                self.timer_at = None;
                self.expire(interest);
                self.resume_listener(interest);
            }
            SOURCE_WAKE => {
                let _ = self.wake.read();
            }
            source => {
                let Some(fd) = self.fd_of_source.get(&source).copied() else {
                    // A stream closed since the loop collected its events.
                    log::debug!("vsock: event for unknown source {source}");
                    return;
                };
                if self.preambles.contains_key(&fd) {
                    self.read_preamble(fd, interest);
                } else if let Some((key, _)) = self.by_fd.get(&fd).copied() {
                    self.mutate(key, |c| c.notify(events), interest);
                }
            }
        }
    }

    fn accept(&mut self, interest: &mut dyn Interest) {
        for _ in 0..MAX_PENDING_PREAMBLES {
            // SAFETY: accept4 on our listening socket with null address arguments.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::Interrupted {
                    // EMFILE, ENFILE, ENOMEM...: the connection stays in the backlog; try
                    // again later rather than spin on a listener that stays readable.
                    log::warn!("vsock: cannot accept a host connection: {e}; retrying in 100 ms");
                    let _ = interest.remove(self.listener.as_raw_fd());
                    self.listener_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            if self.conns.len() >= MAX_CONNECTIONS || self.preambles.len() >= MAX_PENDING_PREAMBLES
            {
                log::warn!(
                    "vsock: {} connections open, {} host connections waiting: refusing a new one",
                    self.conns.len(),
                    self.preambles.len()
                );
                inc(&METRICS.conns_refused, 1);
                continue;
            }
            if let Err(e) = self.watch_stream(fd, EventSet::IN, interest) {
                log::warn!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.preambles
                .insert(fd, (stream, Vec::with_capacity(MAX_PREAMBLE_LEN)));
        }
    }

    fn resume_listener(&mut self, interest: &mut dyn Interest) {
        if self.listener_retry_at.is_some_and(|t| t <= Instant::now()) {
            self.listener_retry_at = None;
            let fd = self.listener.as_raw_fd();
            if let Err(e) = interest.add(fd, SOURCE_LISTENER, EventSet::IN) {
                log::error!("vsock: cannot watch the listener again: {e}");
            }
        }
    }

    /// Reads a `CONNECT` line byte by byte, so the bytes after it stay in the socket for
    /// the guest.
    fn read_preamble(&mut self, fd: RawFd, interest: &mut dyn Interest) {
        let Some((stream, line)) = self.preambles.get_mut(&fd) else {
            return;
        };
        let mut done = None;
        loop {
            let mut b = [0u8; 1];
            match stream.read(&mut b) {
                Ok(0) => {
                    done = Some(Err("closed before its CONNECT line"));
                    break;
                }
                Ok(_) => {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        done = Some(parse_connect(line).ok_or("sent a malformed CONNECT line"));
                        break;
                    }
                    if line.len() >= MAX_PREAMBLE_LEN {
                        done = Some(Err("sent no CONNECT line in 32 bytes"));
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    done = Some(Err("failed before its CONNECT line"));
                    break;
                }
            }
        }
        let Some(result) = done else {
            return;
        };
        self.unwatch_stream(fd, interest);
        let Some((stream, _)) = self.preambles.remove(&fd) else {
            return;
        };
        match result {
            Ok(port) => {
                if self.conns.len() >= MAX_CONNECTIONS {
                    log::warn!(
                        "vsock: {MAX_CONNECTIONS} connections open: refusing CONNECT {port}"
                    );
                    return;
                }
                let local = self.allocate_local_port();
                log::debug!("vsock: host connects to guest port {port} from {local}");
                self.add(Conn::local_init(stream, local, port), interest);
            }
            Err(why) => {
                inc(&METRICS.conns_refused, 1);
                log::info!("vsock: a host connection {why}; closed")
            }
        }
    }

    /// Firecracker's allocation: round robin over [2^30, 2^31), skipping ports in use.
    fn allocate_local_port(&mut self) -> u32 {
        loop {
            self.last_local_port = ((self.last_local_port + 1) & !(1 << 31)) | LOCAL_PORT_FIRST;
            let p = self.last_local_port;
            if !self.conns.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    fn add(&mut self, conn: Conn, interest: &mut dyn Interest) {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream().as_raw_fd();
        let has_rx = conn.has_pending_rx();
        inc(&METRICS.conns_added, 1);
        if let Some(old) = self.conns.remove(&key) {
            // A guest reusing a port pair still open: the old one goes.
            let old_fd = old.stream().as_raw_fd();
            self.by_fd.remove(&old_fd);
            self.unwatch_stream(old_fd, interest);
        }
        self.conns.insert(key, conn);
        self.by_fd.insert(fd, (key, EventSet::empty()));
        if has_rx {
            self.rxq.push_back(key);
        }
        self.update_interest(key, interest);
    }

    fn remove(&mut self, key: Key, interest: &mut dyn Interest) {
        if let Some(c) = self.conns.remove(&key) {
            inc(&METRICS.conns_removed, 1);
            let fd = c.stream().as_raw_fd();
            self.by_fd.remove(&fd);
            self.unwatch_stream(fd, interest);
        }
    }

    /// Runs `f` on a connection, then brings the bookkeeping up to date: the `OK` line when
    /// a host-initiated connection is accepted, the RX queue, the event loop's interest.
    fn mutate(&mut self, key: Key, f: impl FnOnce(&mut Conn), interest: &mut dyn Interest) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let had_rx = c.has_pending_rx();
        let before = c.state();
        f(c);
        if before == State::LocalInit && c.state() == State::Established {
            let line = format!("OK {}\n", c.local_port);
            match c.write_raw(line.as_bytes()) {
                Ok(n) if n == line.len() => {}
                _ => {
                    log::info!("vsock: cannot write OK to a host connection; reset");
                    c.kill();
                }
            }
        }
        if before != State::Killed && c.state() == State::Killed {
            inc(&METRICS.conns_killed, 1);
        }
        if !had_rx && c.has_pending_rx() {
            self.rxq.push_back(key);
        }
        self.update_interest(key, interest);
    }

    /// Brings the event loop's interest in a connection's stream up to what it can do
    /// now. No events means out of the loop: an fd in it reports errors and hangups even
    /// with no events.
    fn update_interest(&mut self, key: Key, interest: &mut dyn Interest) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let fd = c.stream().as_raw_fd();
        let want = c.interest();
        let Some((_, have)) = self.by_fd.get_mut(&fd) else {
            return;
        };
        if *have == want {
            return;
        }
        let have = *have;
        let r = match (have.is_empty(), want.is_empty()) {
            (true, false) => self.watch_stream(fd, want, interest),
            (false, true) => {
                self.unwatch_stream(fd, interest);
                Ok(())
            }
            _ => match self.source_of_fd.get(&fd) {
                Some(source) => interest.modify(fd, *source, want),
                None => Ok(()),
            },
        };
        match r {
            Ok(()) => {
                if let Some((_, have)) = self.by_fd.get_mut(&fd) {
                    *have = want;
                }
            }
            Err(e) => log::error!("vsock: cannot watch a host stream: {e}"),
        }
    }

    fn enqueue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts.push_back((local_port, peer_port));
        }
    }

    /// A packet the guest sent; `data` is its payload.
    pub fn send_pkt(&mut self, hdr: &Header, data: &[u8], interest: &mut dyn Interest) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            log::debug!(
                "vsock: packet from CID {} to CID {} dropped",
                hdr.src_cid,
                hdr.dst_cid
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.enqueue_rst(key.0, key.1);
            }
            return;
        }
        if self.conns.contains_key(&key) {
            if hdr.op == OP_RST {
                log::debug!("vsock: guest reset {}:{}", key.0, key.1);
                self.remove(key, interest);
                return;
            }
            self.mutate(key, |c| c.send_pkt(hdr, data), interest);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.connect_to_host(hdr, interest),
            OP_RST => {}
            _ => self.enqueue_rst(key.0, key.1),
        }
    }

    /// The guest asks for host port P: connect to `<uds_path>_<P>` without blocking.
    fn connect_to_host(&mut self, hdr: &Header, interest: &mut dyn Interest) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::info!("vsock: {MAX_CONNECTIONS} connections open: guest request refused");
            self.enqueue_rst(hdr.dst_port, hdr.src_port);
            return;
        }
        let path = format!("{}_{}", self.uds_path, hdr.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                log::debug!("vsock: guest port {} connected to {path}", hdr.src_port);
                self.add(
                    Conn::peer_init(stream, hdr.dst_port, hdr.src_port, hdr),
                    interest,
                );
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {path} refused: {e}");
                self.enqueue_rst(hdr.dst_port, hdr.src_port);
            }
        }
    }

    /// The next packet for the guest, its payload read into `buf`.
    pub fn recv_pkt(
        &mut self,
        buf: &mut [u8],
        interest: &mut dyn Interest,
    ) -> Option<(Header, usize)> {
        if let Some((local, peer)) = self.rsts.pop_front() {
            let h = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                src_port: local,
                dst_port: peer,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            };
            return Some((h, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let before = c.state();
            let Some(pkt): Option<RxPacket> = c.recv_pkt(buf) else {
                self.update_interest(key, interest);
                continue;
            };
            let hdr = c.header(self.guest_cid, pkt);
            if pkt.op == OP_RST {
                self.remove(key, interest);
            } else {
                if c.has_pending_rx() {
                    self.rxq.push_back(key);
                }
                if before == State::Killed {
                    self.remove(key, interest);
                } else {
                    self.update_interest(key, interest);
                }
            }
            return Some((hdr, pkt.len));
        }
        None
    }

    /// Resets connections whose request or shutdown timed out.
    fn expire(&mut self, interest: &mut dyn Interest) {
        let now = Instant::now();
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expiry.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            log::debug!("vsock: {}:{} timed out; reset", key.0, key.1);
            self.mutate(key, |c| c.kill(), interest);
        }
    }

    /// Points the timer at the earliest request or shutdown deadline (after every pass:
    /// delivering a REQUEST or a SHUTDOWN to the guest starts one).
    pub fn arm_timer(&mut self) {
        let next = self
            .conns
            .values()
            .filter_map(|c| c.expiry)
            .chain(self.listener_retry_at)
            .min();
        if next == self.timer_at {
            return;
        }
        let r = match next {
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer.
                self.timer
                    .reset(d.max(std::time::Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.timer_at = next,
            Err(e) => log::error!("vsock: cannot arm the connection timer: {e}"),
        }
    }
}

/// `CONNECT <port>\n`, the keyword in any case (Firecracker parses it so).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.split_whitespace();
    let keyword = words.next()?;
    if !keyword.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    // SAFETY: creating a socket; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nothing else owns; the stream closes it on every path.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un and its size is passed with it.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // EAGAIN: the listener's backlog is full. Waiting would block the guest, so the
        // guest hears "refused" as it would from a busy Linux listener.
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::TestLoop;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect(b"connect 52\n"), Some(52));
        assert_eq!(parse_connect(b"CoNnEcT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"  CONNECT   7  \r\n"), Some(7));
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT x\n",
            b"LISTEN 5\n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    fn temp_path(tag: &str) -> (std::path::PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("ember-vsock-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock").to_string_lossy().into_owned();
        (dir, path)
    }

    /// Runs the muxer's events until `done` says so (the host client is another socket).
    fn pump(m: &mut Muxer, lp: &mut TestLoop, mut done: impl FnMut(&mut Muxer) -> bool) {
        // Up to 10 s: the request timeout under test is 2 s.
        for _ in 0..2000 {
            for (source, ev) in lp.wait(5) {
                m.process_event(source, ev, lp);
            }
            if done(m) {
                return;
            }
        }
        panic!("the muxer never got there");
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Header::default()
        }
    }

    #[test]
    fn host_connect_ok_line_and_request_timeout() {
        use std::io::Write;
        let (dir, path) = temp_path("hostconn");
        let mut m = Muxer::new(3, &path).unwrap();
        let lp = &mut TestLoop::new(m.event_sources());
        let mut buf = vec![0u8; 4096];
        // The line may arrive in pieces.
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"conn").unwrap();
        pump(&mut m, lp, |m| !m.preambles.is_empty());
        client.write_all(b"ect 52\n").unwrap();
        pump(&mut m, lp, |m| m.has_rx());
        let (h, len) = m.recv_pkt(&mut buf, lp).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid, len),
            (OP_REQUEST, 1 << 30, 52, 3, 0)
        );
        m.send_pkt(&guest(OP_RESPONSE, 52, 1 << 30), &[], lp);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        m.send_pkt(&guest(OP_RW, 52, 1 << 30), b"", lp);
        m.send_pkt(
            &{
                let mut h = guest(OP_RW, 52, 1 << 30);
                h.len = 3;
                h
            },
            b"abc",
            lp,
        );
        let mut got = [0u8; 3];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");

        // A guest that never answers: after the request timeout the host connection is
        // closed and the guest gets an RST.
        let mut silent = UnixStream::connect(&path).unwrap();
        silent.write_all(b"CONNECT 53\n").unwrap();
        pump(&mut m, lp, |m| m.has_rx());
        let (h, _) = m.recv_pkt(&mut buf, lp).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_REQUEST, 53));
        m.arm_timer();
        assert!(m.timer_at.is_some());
        pump(&mut m, lp, |m| m.has_rx());
        let (h, _) = m.recv_pkt(&mut buf, lp).unwrap();
        assert_eq!((h.op, h.dst_port), (OP_RST, 53));
        let mut rest = Vec::new();
        silent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(m.connection_count(), 1);

        // Packets for no connection are answered with an RST; an RST is not.
        m.send_pkt(&guest(OP_RW, 9, 9), &[], lp);
        m.send_pkt(&guest(OP_RST, 9, 10), &[], lp);
        let (h, _) = m.recv_pkt(&mut buf, lp).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 9, 9));
        assert!(m.recv_pkt(&mut buf, lp).is_none());
        // A packet from another CID is dropped.
        let mut h = guest(OP_REQUEST, 1, 2);
        h.src_cid = 4;
        m.send_pkt(&h, &[], lp);
        assert!(!m.has_rx());
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn local_ports_round_robin_in_firecrackers_range() {
        let dir = std::env::temp_dir().join(format!("ember-vsock-mux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock").to_string_lossy().into_owned();
        let mut m = Muxer::new(3, &path).unwrap();
        assert_eq!(m.allocate_local_port(), 1 << 30);
        assert_eq!(m.allocate_local_port(), (1 << 30) + 1);
        m.last_local_port = u32::MAX >> 1;
        assert_eq!(m.allocate_local_port(), 1 << 30);
        // A stale socket file is replaced, a live one refused.
        drop(m);
        let m = Muxer::new(3, &path).unwrap();
        assert!(Muxer::new(3, &path).is_err());
        drop(m);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
