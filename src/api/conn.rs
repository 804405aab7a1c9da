//! One API connection: its buffers and the state machine that reads requests, answers them
//! in order and closes. Non-blocking throughout, so a client that sends half a request or
//! never reads its responses holds only its own buffers, never the API thread.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{Limits, dispatch, http};
use crate::action::ActionSender;

/// While this much output waits for a client, its further requests are not read: a client
/// that pipelines without reading slows only itself.
const HIGH_WATER: usize = 64 * 1024;
/// Output buffered for one client beyond which it is dropped. With `HIGH_WATER` only one
/// oversized response can get here.
const OUTPUT_CAP: usize = 1024 * 1024;
/// Bytes read from one connection per wakeup, so one fast writer cannot starve the rest.
const READ_BUDGET: usize = 64 * 1024;
/// Requests answered for one connection per wakeup, so a client that pipelines many cannot
/// keep the others waiting; the rest are answered on the next turn.
const REQUESTS_PER_TURN: usize = 8;
/// After an error that ends a connection (413, bad framing), input still in flight is read
/// and thrown away, up to this much, so the client sees the response rather than a broken
/// pipe while it is still sending its body.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// How long such a connection may keep sending before it is closed anyway.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Buffers above this size are given back to the allocator once empty, so an idle
/// connection costs a socket and a few hundred bytes whatever it sent before.
const KEEP_CAPACITY: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and answering requests.
    Open,
    /// No more requests: send what is buffered, then close (or drain first, if `drain`).
    Closing { drain: bool },
    /// Output sent and our side shut down; discarding input until EOF or the drain limit.
    Draining { discarded: usize, until: Instant },
}

pub(super) struct Conn {
    stream: UnixStream,
    /// Input; the first `consumed` bytes are answered requests, dropped once per wakeup.
    inbuf: Vec<u8>,
    consumed: usize,
    /// The unanswered input must hold this many bytes before parsing again is worth it.
    need: usize,
    /// Whether `100 Continue` went out for the request being received.
    continue_sent: bool,
    out: Vec<u8>,
    out_pos: usize,
    read_eof: bool,
    phase: Phase,
    pub dead: bool,
    /// Whether a request is under way: input not yet answered, or output not yet sent.
    busy: bool,
    /// When the connection was accepted, last answered a request, or last changed between
    /// idle and busy: its timeouts count from here, and the oldest is closed first when
    /// the connection limit is reached. Bytes alone do not move it, so a client that
    /// sends a request one byte at a time cannot keep a slot forever.
    since: Instant,
}

impl Conn {
    pub fn new(stream: UnixStream, now: Instant) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            consumed: 0,
            need: 0,
            continue_sent: false,
            out: Vec::new(),
            out_pos: 0,
            read_eof: false,
            phase: Phase::Open,
            dead: false,
            busy: false,
            since: now,
        }
    }

    pub fn fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    fn unanswered(&self) -> &[u8] {
        self.inbuf.get(self.consumed..).unwrap_or_default()
    }

    pub fn pending_out(&self) -> usize {
        self.out.len().saturating_sub(self.out_pos)
    }

    /// When the connection is closed unless it makes progress.
    pub fn deadline(&self, limits: &Limits) -> Instant {
        match self.phase {
            Phase::Draining { until, .. } => until,
            Phase::Closing { .. } => self.since + limits.request_timeout,
            Phase::Open if self.busy => self.since + limits.request_timeout,
            Phase::Open => self.since + limits.idle_timeout,
        }
    }

    /// Order in which connections are closed to make room: those already closing, then the
    /// one that has gone longest without answering a request.
    pub fn eviction_key(&self) -> (bool, Instant) {
        (self.phase == Phase::Open, self.since)
    }

    /// Whether whole requests wait in the buffer that the output has room to answer now.
    pub fn has_ready_requests(&self) -> bool {
        !self.dead
            && self.phase == Phase::Open
            && self.pending_out() < HIGH_WATER
            && !self.unanswered().is_empty()
            && self.unanswered().len() >= self.need
    }

    fn wants_read(&self, max_payload: usize) -> bool {
        match self.phase {
            Phase::Open => {
                // Enough for one whole request; more would only queue behind it.
                let limit = http::MAX_HEAD_BYTES.saturating_add(max_payload);
                !self.read_eof && self.pending_out() < HIGH_WATER && self.unanswered().len() < limit
            }
            Phase::Closing { .. } => false,
            Phase::Draining { .. } => true,
        }
    }

    pub fn poll_events(&self, max_payload: usize) -> libc::c_short {
        let mut ev = 0;
        if self.wants_read(max_payload) {
            ev |= libc::POLLIN;
        }
        if self.pending_out() > 0 {
            ev |= libc::POLLOUT;
        }
        ev
    }

    /// Does what `revents` (possibly none, for requests already buffered) allows.
    pub fn on_event(
        &mut self,
        revents: libc::c_short,
        sender: &ActionSender,
        limits: &Limits,
        now: Instant,
    ) {
        if revents & libc::POLLNVAL != 0 {
            self.dead = true;
            return;
        }
        // On hang-up or error, a read or a write reports what happened (EOF, EPIPE), so
        // both are tried and the connection ends up closed or making progress.
        let trouble = revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if revents & libc::POLLIN != 0 || trouble {
            self.on_readable(limits.max_payload);
        }
        self.process(sender, limits.max_payload, now);
        if revents & libc::POLLOUT != 0 || trouble || self.pending_out() > 0 {
            self.flush();
        }
        self.compact();
        self.settle(now);
    }

    fn on_readable(&mut self, max_payload: usize) {
        let mut chunk = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 && self.wants_read(max_payload) {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.read_eof = true;
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    let data = chunk.get(..n).unwrap_or_default();
                    match &mut self.phase {
                        Phase::Draining { discarded, .. } => {
                            *discarded = discarded.saturating_add(n);
                            if *discarded > DRAIN_LIMIT {
                                self.dead = true;
                                return;
                            }
                        }
                        _ => self.inbuf.extend_from_slice(data),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("API connection read error: {e}");
                    self.dead = true;
                    return;
                }
            }
        }
    }

    /// Answers the whole requests in the buffer, in order, while output has room, up to
    /// `REQUESTS_PER_TURN`.
    fn process(&mut self, sender: &ActionSender, max_payload: usize, now: Instant) {
        for _ in 0..REQUESTS_PER_TURN {
            if !self.has_ready_requests() {
                return;
            }
            match http::parse(self.unanswered(), max_payload) {
                http::Parsed::Partial {
                    need,
                    expect_continue,
                } => {
                    let have = self.unanswered().len();
                    self.need = need.unwrap_or(have.saturating_add(1));
                    if expect_continue && !self.continue_sent {
                        self.out.extend_from_slice(http::CONTINUE);
                        self.continue_sent = true;
                    }
                    return;
                }
                http::Parsed::Complete { request, len } => {
                    self.consumed = self.consumed.saturating_add(len).min(self.inbuf.len());
                    self.need = 0;
                    self.continue_sent = false;
                    self.since = now;
                    let response = dispatch::handle(&request, sender);
                    let close = !request.keep_alive;
                    http::write_response(
                        &mut self.out,
                        response.status,
                        response.body.as_deref(),
                        close,
                    );
                    // Out now rather than at the next poll: the client is waiting for it.
                    self.flush();
                    if close {
                        self.phase = Phase::Closing { drain: false };
                    }
                }
                http::Parsed::Error(e) => {
                    log::warn!("API request refused ({}): {}", e.status, e.message);
                    let body = http::fault_body(&e.message);
                    http::write_response(&mut self.out, e.status, Some(&body), true);
                    self.inbuf = Vec::new();
                    self.consumed = 0;
                    self.phase = Phase::Closing { drain: true };
                }
            }
            if self.pending_out() > OUTPUT_CAP {
                log::warn!("API client is not reading its responses; dropping it");
                self.dead = true;
            }
        }
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) {
        while self.pending_out() > 0 && !self.dead {
            let pending = self.out.get(self.out_pos..).unwrap_or_default();
            match send_no_sigpipe(&self.stream, pending) {
                Ok(0) => self.dead = true,
                Ok(n) => self.out_pos = self.out_pos.saturating_add(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("API connection write error: {e}");
                    self.dead = true;
                }
            }
        }
    }

    /// Drops answered input and sent output, and gives large empty buffers back.
    fn compact(&mut self) {
        if self.consumed > 0 {
            self.inbuf.drain(..self.consumed.min(self.inbuf.len()));
            self.consumed = 0;
        }
        if self.pending_out() == 0 {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= HIGH_WATER {
            // Keep the buffer from growing at the front while a slow reader catches up.
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        if self.inbuf.is_empty() && self.inbuf.capacity() > KEEP_CAPACITY {
            self.inbuf = Vec::new();
        }
        if self.out.is_empty() && self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
    }

    /// Moves to the next phase once the output allows it, and restarts the clock when a
    /// request begins or the last one is fully answered.
    fn settle(&mut self, now: Instant) {
        let busy = !self.inbuf.is_empty() || self.pending_out() > 0;
        if busy != self.busy {
            self.busy = busy;
            self.since = now;
        }
        if self.dead || self.pending_out() > 0 {
            return;
        }
        match self.phase {
            Phase::Open => {
                // A client that half-closed after pipelining still gets every answer.
                if self.read_eof && !self.has_ready_requests() {
                    self.dead = true;
                }
            }
            Phase::Closing { drain } => {
                if drain && !self.read_eof {
                    // Our FIN tells the client the response is complete; its remaining
                    // body is read and dropped until it closes.
                    let _ = self.stream.shutdown(std::net::Shutdown::Write);
                    self.phase = Phase::Draining {
                        discarded: 0,
                        until: now + DRAIN_TIME,
                    };
                } else {
                    self.dead = true;
                }
            }
            Phase::Draining { .. } => {
                if self.read_eof {
                    self.dead = true;
                }
            }
        }
    }
}

/// `write` that reports a vanished client as EPIPE instead of raising SIGPIPE, whatever
/// the process's SIGPIPE disposition is.
fn send_no_sigpipe(stream: &UnixStream, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which is valid for reads for the
    // whole call; the descriptor belongs to `stream`, which is open while borrowed.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}
