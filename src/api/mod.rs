//! The Firecracker-compatible API: HTTP/1.1 over a Unix socket, served by one thread.
//!
//! The thread only parses requests (`http`), maps them to an `Action` (`routes`), sends it
//! to the VMM thread and writes the answer back; it never touches the VM. All connections
//! share one poll(2) loop with non-blocking sockets and per-connection buffers, so a client
//! that sends half a request, or never reads its responses, holds only its own buffers.

pub mod http;
pub mod routes;

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::action::{ActionOk, ActionSender};

/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// Past this many open connections the listener is left unpolled, so new clients wait in
/// the kernel's backlog instead of costing buffers.
const MAX_CONNECTIONS: usize = 256;
/// While this much output waits for a client, its further requests are not read: a client
/// that pipelines without reading slows only itself.
const HIGH_WATER: usize = 64 * 1024;
/// Output buffered for one client beyond which it is dropped. With `HIGH_WATER` only one
/// oversized response can get here.
const OUTPUT_CAP: usize = 1024 * 1024;
/// Bytes read from one connection per wakeup, so one fast writer cannot starve the rest.
const READ_BUDGET: usize = 64 * 1024;
/// After an error that ends a connection (413, bad framing), input still in flight is read
/// and thrown away, up to this much, so the client sees the response rather than a broken
/// pipe while it is still sending its body.
const DRAIN_LIMIT: usize = 1024 * 1024;
/// How long such a connection may keep sending before it is closed anyway.
const DRAIN_TIME: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "another process is serving the API socket {0}; stop it or choose another --api-sock path"
    )]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --api-sock path")]
    NotASocket(PathBuf),
    #[error("cannot check the existing API socket {0}: {1}")]
    Probe(PathBuf, #[source] std::io::Error),
    #[error("cannot remove the stale API socket {0}: {1}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("cannot bind the API socket {0}: {1}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Binds the API socket at `path` and starts the `ember_api` thread serving it. Requests
/// with a body over `max_payload` bytes get 413.
///
/// A socket file left by a dead process is replaced; one that a live process answers is an
/// error, as is any other kind of file at `path`.
pub fn start(
    path: &Path,
    sender: ActionSender,
    max_payload: usize,
) -> Result<JoinHandle<()>, ApiError> {
    let listener = bind(path)?;
    crate::metrics::timeline_mark(&crate::metrics::METRICS.boot_timeline_us.api_ready);
    listener
        .set_nonblocking(true)
        .map_err(|e| ApiError::Bind(path.to_path_buf(), e))?;
    log::info!("API server listening on {}", path.display());
    let server = Server {
        listener,
        sender,
        max_payload,
        conns: Vec::new(),
    };
    std::thread::Builder::new()
        .name("ember_api".into())
        .spawn(move || server.run())
        .map_err(ApiError::Spawn)
}

/// Removes the API socket at exit. Only a socket is removed, and a missing one is fine.
pub fn remove_socket(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove the API socket {}: {e}", path.display());
            }
        }
        Ok(_) => log::warn!("{} is no longer a socket; left in place", path.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot check the API socket {}: {e}", path.display()),
    }
}

fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiError::NotASocket(owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::SocketInUse(owned())),
            // Nobody listens: the file is left over from a process that died.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                log::info!("replacing the stale API socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| ApiError::RemoveStale(owned(), e))?;
            }
            Err(e) => return Err(ApiError::Probe(owned(), e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::Probe(owned(), e)),
    }
    UnixListener::bind(path).map_err(|e| ApiError::Bind(owned(), e))
}

struct Server {
    listener: UnixListener,
    sender: ActionSender,
    max_payload: usize,
    conns: Vec<Conn>,
}

impl Server {
    fn run(mut self) {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
            // Without its filter the API thread must not serve: no API rather than an
            // unconfined one.
            log::error!("{e}");
            return;
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut accept_backoff = false;
        loop {
            // Slot 0 is the listener; slot i + 1 is self.conns[i].
            fds.clear();
            let listen = !accept_backoff && self.conns.len() < MAX_CONNECTIONS;
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: if listen { libc::POLLIN } else { 0 },
                revents: 0,
            });
            for c in &self.conns {
                fds.push(libc::pollfd {
                    fd: c.stream.as_raw_fd(),
                    events: c.poll_events(),
                    revents: 0,
                });
            }
            // After EMFILE and the like, retry accepting a little later rather than spin.
            let mut wait = accept_backoff.then_some(Duration::from_millis(100));
            accept_backoff = false;
            let now = Instant::now();
            if let Some(d) = self.conns.iter().filter_map(Conn::deadline).min() {
                let left = d.saturating_duration_since(now);
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
            // Rounded up, so that a deadline is past when poll returns.
            let timeout = wait.map_or(-1, |w| {
                i32::try_from(w.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            });
            // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs that
            // outlives the call; poll only writes their `revents` fields.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("API server: poll failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            let now = Instant::now();
            for (conn, pfd) in self.conns.iter_mut().zip(fds.iter().skip(1)) {
                if pfd.revents != 0 {
                    conn.on_event(pfd.revents, &self.sender, self.max_payload);
                }
                if conn.deadline().is_some_and(|d| d <= now) {
                    conn.dead = true;
                }
            }
            // Dropping a Conn closes its socket.
            self.conns.retain(|c| !c.dead);
            if fds.first().is_some_and(|l| l.revents & libc::POLLIN != 0) {
                accept_backoff = self.accept();
            }
        }
    }

    /// Accepts every waiting client (up to the limit). Returns true to back off after a
    /// resource error.
    fn accept(&mut self) -> bool {
        while self.conns.len() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) => match stream.set_nonblocking(true) {
                    Ok(()) => self.conns.push(Conn::new(stream)),
                    Err(e) => log::warn!("API server: dropping a connection: {e}"),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e)
                    if e.kind() == ErrorKind::Interrupted
                        || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    log::warn!("API server: cannot accept a connection: {e}");
                    return true;
                }
            }
        }
        log::warn!("API server: {MAX_CONNECTIONS} connections open; new ones wait");
        false
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading and answering requests.
    Open,
    /// No more requests: send what is buffered, then close (or drain first, if `drain`).
    Closing { drain: bool },
    /// Output sent and our side shut down; discarding input until EOF or the drain limit.
    Draining { discarded: usize, until: Instant },
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    /// `inbuf` must hold this many bytes before parsing again is worth it.
    need: usize,
    /// Whether `100 Continue` went out for the request being received.
    continue_sent: bool,
    out: Vec<u8>,
    out_pos: usize,
    read_eof: bool,
    phase: Phase,
    dead: bool,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            need: 0,
            continue_sent: false,
            out: Vec::new(),
            out_pos: 0,
            read_eof: false,
            phase: Phase::Open,
            dead: false,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Draining { until, .. } => Some(until),
            _ => None,
        }
    }

    fn pending_out(&self) -> usize {
        self.out.len().saturating_sub(self.out_pos)
    }

    fn wants_read(&self) -> bool {
        match self.phase {
            Phase::Open => !self.read_eof && self.pending_out() < HIGH_WATER,
            Phase::Closing { .. } => false,
            Phase::Draining { .. } => true,
        }
    }

    fn poll_events(&self) -> libc::c_short {
        let mut ev = 0;
        if self.wants_read() {
            ev |= libc::POLLIN;
        }
        if self.pending_out() > 0 {
            ev |= libc::POLLOUT;
        }
        ev
    }

    fn on_event(&mut self, revents: libc::c_short, sender: &ActionSender, max_payload: usize) {
        if revents & libc::POLLNVAL != 0 {
            self.dead = true;
            return;
        }
        // On hang-up or error, a read or a write reports what happened (EOF, EPIPE), so
        // both are tried and the connection ends up closed or making progress.
        let trouble = revents & (libc::POLLHUP | libc::POLLERR) != 0;
        if revents & libc::POLLIN != 0 || trouble {
            self.on_readable(max_payload);
        }
        self.process(sender, max_payload);
        if revents & libc::POLLOUT != 0 || trouble || self.pending_out() > 0 {
            self.flush();
        }
        // Room in the output again: answer requests that waited in `inbuf`.
        if !self.dead && self.phase == Phase::Open && !self.inbuf.is_empty() {
            self.process(sender, max_payload);
            self.flush();
        }
        self.settle();
    }

    fn on_readable(&mut self, max_payload: usize) {
        if !self.wants_read() {
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        // Enough for one whole request; more would only queue behind a paused connection.
        let inbuf_limit = http::MAX_HEAD_BYTES.saturating_add(max_payload);
        while budget > 0 {
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
                        _ => {
                            self.inbuf.extend_from_slice(data);
                            if self.inbuf.len() >= inbuf_limit {
                                return;
                            }
                        }
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

    /// Answers every whole request in `inbuf`, in order, while output has room.
    fn process(&mut self, sender: &ActionSender, max_payload: usize) {
        while !self.dead
            && self.phase == Phase::Open
            && self.pending_out() < HIGH_WATER
            && !self.inbuf.is_empty()
            && self.inbuf.len() >= self.need
        {
            match http::parse(&self.inbuf, max_payload) {
                http::Parsed::Partial {
                    need,
                    expect_continue,
                } => {
                    self.need = need.unwrap_or(self.inbuf.len().saturating_add(1));
                    if expect_continue && !self.continue_sent {
                        self.out.extend_from_slice(http::CONTINUE);
                        self.continue_sent = true;
                    }
                    return;
                }
                http::Parsed::Complete { request, len } => {
                    self.inbuf.drain(..len.min(self.inbuf.len()));
                    self.need = 0;
                    self.continue_sent = false;
                    let (status, body, answered_by_vmm) = handle(&request, sender);
                    let close = !request.keep_alive;
                    http::write_response(&mut self.out, status, body.as_deref(), close);
                    // Out now rather than at the next poll: the VMM may be about to exit
                    // (a guest that reset at once) and waits only for this.
                    self.flush();
                    if answered_by_vmm {
                        crate::action::answer_delivered();
                    }
                    if close {
                        self.phase = Phase::Closing { drain: false };
                    }
                }
                http::Parsed::Error(e) => {
                    log::warn!("API request refused ({}): {}", e.status, e.message);
                    let body = http::fault_body(&e.message);
                    http::write_response(&mut self.out, e.status, Some(&body), true);
                    self.inbuf = Vec::new();
                    self.phase = Phase::Closing { drain: true };
                }
            }
            if self.pending_out() > OUTPUT_CAP {
                log::warn!("API client is not reading its responses; dropping it");
                self.dead = true;
            }
        }
    }

    fn flush(&mut self) {
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
        if self.pending_out() == 0 {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= HIGH_WATER {
            // Keep the buffer from growing at the front while a slow reader catches up.
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
    }

    /// Moves to the next phase once the output allows it.
    fn settle(&mut self) {
        if self.dead || self.pending_out() > 0 {
            return;
        }
        match self.phase {
            Phase::Open => {
                if self.read_eof {
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
                        until: Instant::now() + DRAIN_TIME,
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

/// One request to one response: (status, JSON body).
/// Answers one request; the flag says whether the VMM thread answered it.
fn handle(request: &http::Request, sender: &ActionSender) -> (u16, Option<String>, bool) {
    log::info!(
        "The API server received a {} request on {}.",
        request.method,
        request.path
    );
    if !request.body.is_empty() {
        log::debug!("Request body: {}", String::from_utf8_lossy(&request.body));
    }
    let mut via_vmm = false;
    let result = routes::route(&request.method, &request.path, &request.body).and_then(|action| {
        via_vmm = true;
        sender.call(action)
    });
    let (status, body) = match result {
        Ok(ActionOk::NoContent) => (204, None),
        Ok(ActionOk::Json(body)) => (200, Some(body)),
        Err(e) => {
            log::warn!(
                "API {} {} failed ({}): {}",
                request.method,
                request.path,
                e.status,
                e.message
            );
            // A status outside the error range would confuse clients into success.
            let status = if (400..=599).contains(&e.status) {
                e.status
            } else {
                500
            };
            (status, Some(http::fault_body(&e.message)))
        }
    };
    (status, body, via_vmm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{Action, ActionError, ActionResult};
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, mpsc};

    /// Tests that count descriptors must not overlap with the others opening sockets.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn lock() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sock_path() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("ember-api-{}-{n}.sock", std::process::id()))
    }

    /// The other end of the action channel: answers like a VMM would, and reports what
    /// it received.
    fn fake_vmm() -> (ActionSender, mpsc::Receiver<Action>) {
        let (sender, receiver) = crate::action::channel().unwrap();
        let (seen_tx, seen_rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(req) = receiver.rx.recv() {
                let _ = receiver.wake.read();
                let reply: ActionResult = match &req.action {
                    Action::GetInstanceInfo => Ok(ActionOk::Json(
                        r#"{"id":"anonymous-instance","state":"Not started"}"#.into(),
                    )),
                    Action::GetVersion => {
                        Ok(ActionOk::Json(r#"{"firecracker_version":"1.0"}"#.into()))
                    }
                    Action::InstanceStart => Err(ActionError::bad_request("no boot source")),
                    Action::FlushMetrics => Err(ActionError {
                        status: 500,
                        message: "flush failed".into(),
                    }),
                    _ => Ok(ActionOk::NoContent),
                };
                let _ = seen_tx.send(req.action.clone());
                let _ = req.reply.send(reply);
            }
        });
        (sender, seen_rx)
    }

    fn server() -> (PathBuf, mpsc::Receiver<Action>) {
        let path = sock_path();
        let (sender, seen) = fake_vmm();
        start(&path, sender, DEFAULT_MAX_PAYLOAD).unwrap();
        (path, seen)
    }

    struct Client {
        s: UnixStream,
        buf: Vec<u8>,
    }

    #[derive(Debug)]
    struct Resp {
        status: u16,
        head: String,
        body: String,
    }

    impl Client {
        fn new(path: &Path) -> Client {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            Client { s, buf: Vec::new() }
        }

        fn send(&mut self, raw: &[u8]) {
            self.s.write_all(raw).unwrap();
        }

        /// Reads one response; None at EOF.
        fn recv(&mut self) -> Option<Resp> {
            loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
                    let status: u16 = head[9..12].parse().unwrap();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.parse().unwrap());
                    while self.buf.len() < end + 4 + len {
                        self.fill()?;
                    }
                    let body =
                        String::from_utf8(self.buf[end + 4..end + 4 + len].to_vec()).unwrap();
                    self.buf.drain(..end + 4 + len);
                    return Some(Resp { status, head, body });
                }
                self.fill()?;
            }
        }

        fn fill(&mut self) -> Option<()> {
            let mut b = [0u8; 4096];
            match self.s.read(&mut b) {
                Ok(0) => None,
                Ok(n) => {
                    self.buf.extend_from_slice(&b[..n]);
                    Some(())
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
                Err(e) => panic!("read: {e}"),
            }
        }

        fn call(&mut self, raw: &str) -> Resp {
            self.send(raw.as_bytes());
            self.recv().expect("connection closed")
        }
    }

    fn put(path: &str, body: &str) -> String {
        format!(
            "PUT {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn serves_requests_with_keep_alive() {
        let _g = lock();
        let (path, seen) = server();
        let mut c = Client::new(&path);
        let r = c.call("GET / HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
        assert!(r.head.contains("Content-Type: application/json"), "{r:?}");
        assert!(r.body.contains("anonymous-instance"));
        assert_eq!(seen.recv().unwrap(), Action::GetInstanceInfo);

        let r = c.call(&put("/boot-source", r#"{"kernel_image_path": "/k"}"#));
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert!(matches!(seen.recv().unwrap(), Action::PutBootSource(_)));

        let r = c.call(&put("/actions", r#"{"action_type": "InstanceStart"}"#));
        assert_eq!(r.status, 400);
        assert_eq!(r.body, r#"{"fault_message":"no boot source"}"#);
        let r = c.call(&put("/actions", r#"{"action_type": "FlushMetrics"}"#));
        assert_eq!(r.status, 500);

        let r = c.call(&put(
            "/machine-config",
            r#"{"vcpu_count": true, "mem_size_mib": 1}"#,
        ));
        assert_eq!(r.status, 400);
        assert!(r.body.contains("invalid type: boolean `true`"), "{r:?}");
        let r = c.call("GET /balloon HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 400);
        assert!(
            r.body.contains("ember does not support the balloon device"),
            "{r:?}"
        );
        let r = c.call("DELETE / HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 400);

        // Connection: close is honoured after the response.
        let r = c.call("GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(r.status, 200);
        assert!(r.head.contains("Connection: close"));
        assert!(c.recv().is_none());
        drop(c);
        remove_socket(&path);
        assert!(!path.exists());
    }

    #[test]
    fn pipelined_and_byte_by_byte() {
        let _g = lock();
        let (path, _seen) = server();
        let mut c = Client::new(&path);
        let mut all = String::new();
        all.push_str("GET /version HTTP/1.1\r\n\r\n");
        all.push_str(&put("/vm", r#"{"state": "Paused"}"#));
        all.push_str("GET / HTTP/1.1\r\n\r\n");
        c.send(all.as_bytes());
        assert_eq!(c.recv().unwrap().status, 200);
        assert_eq!(c.recv().unwrap().status, 400); // PUT /vm: only PATCH exists
        assert_eq!(c.recv().unwrap().status, 200);
        for b in put("/metrics", r#"{"metrics_path": "/m"}"#).bytes() {
            c.send(&[b]);
        }
        assert_eq!(c.recv().unwrap().status, 204);
        remove_socket(&path);
    }

    #[test]
    fn half_requests_and_slow_readers_do_not_stall_others() {
        let _g = lock();
        let (path, _seen) = server();
        let mut half = Client::new(&path);
        half.send(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"kernel");

        // A client that pipelines far more than HIGH_WATER of responses and never reads.
        let greedy = UnixStream::connect(&path).unwrap();
        let writer = {
            let mut g = greedy.try_clone().unwrap();
            std::thread::spawn(move || {
                let req = b"GET /version HTTP/1.1\r\n\r\n";
                let many: Vec<u8> = req
                    .iter()
                    .copied()
                    .cycle()
                    .take(req.len() * 20000)
                    .collect();
                // Blocks once the server stops reading; fails when the test ends.
                let _ = g.write_all(&many);
            })
        };
        std::thread::sleep(Duration::from_millis(300));

        let t = Instant::now();
        let mut other = Client::new(&path);
        assert_eq!(other.call("GET / HTTP/1.1\r\n\r\n").status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        half.send(b"_image_path\": \"/k\"}");
        assert_eq!(half.recv().unwrap().status, 204);

        // The greedy client still gets its responses, in order, when it reads.
        let mut g = Client {
            s: greedy,
            buf: Vec::new(),
        };
        g.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for _ in 0..100 {
            assert_eq!(g.recv().unwrap().status, 200);
        }
        // The writer holds a clone of the socket: shut it down to unblock the writer.
        let _ = g.s.shutdown(std::net::Shutdown::Both);
        let _ = writer.join();
        remove_socket(&path);
    }

    #[test]
    fn payload_too_large_and_chunked_close_the_connection() {
        let _g = lock();
        let (path, seen) = server();
        // Refused from the headers, before the body is sent.
        let mut c = Client::new(&path);
        c.send(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n");
        let r = c.recv().unwrap();
        assert_eq!(r.status, 413);
        assert!(r.body.contains("51201"), "{r:?}");
        assert!(c.recv().is_none());

        // A client that sends its whole oversized body first still reads the answer.
        let mut c = Client::new(&path);
        let mut big = b"PUT /drives/a HTTP/1.1\r\nContent-Length: 400000\r\n\r\n".to_vec();
        big.resize(big.len() + 400_000, b'x');
        let mut w = c.s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&big).is_ok());
        assert_eq!(c.recv().unwrap().status, 413);
        assert!(
            writer.join().unwrap(),
            "the server closed before the body was sent"
        );
        assert!(c.recv().is_none());

        let mut c = Client::new(&path);
        let r = c.call("PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1c\r\n{\"action_type\": \"FlushMetrics\"}\r\n0\r\n\r\n");
        assert_eq!(r.status, 411);
        assert!(c.recv().is_none());
        // None of these reached the VMM.
        assert!(seen.try_recv().is_err());
        remove_socket(&path);
    }

    #[test]
    fn expect_continue() {
        let _g = lock();
        let (path, _seen) = server();
        let mut c = Client::new(&path);
        let body = r#"{"log_path": "/l"}"#;
        c.send(
            format!(
                "PUT /logger HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(c.recv().unwrap().status, 100);
        c.send(body.as_bytes());
        assert_eq!(c.recv().unwrap().status, 204);
        remove_socket(&path);
    }

    fn socket_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    }

    #[test]
    fn many_connections_leak_no_descriptors() {
        let _g = lock();
        let (path, _seen) = server();
        // Let the server thread settle before counting.
        assert_eq!(
            Client::new(&path).call("GET / HTTP/1.1\r\n\r\n").status,
            200
        );
        std::thread::sleep(Duration::from_millis(100));
        let baseline = socket_fds();
        for round in 0..3 {
            let mut clients = Vec::new();
            for i in 0..200 {
                let mut c = Client::new(&path);
                match i % 5 {
                    0 => {}
                    1 => c.send(b"GET /vers"),
                    2 => c.send(b"GET / HTTP/1.1\r\n\r\n"),
                    3 => c.send(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
                    _ => c.send(b"garbage\r\n\r\n"),
                }
                clients.push(c);
            }
            if round == 0 {
                // Read some answers so those connections are mid-keep-alive when dropped.
                for c in clients.iter_mut().skip(2).step_by(5) {
                    assert_eq!(c.recv().unwrap().status, 200);
                }
            }
            drop(clients);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut now = socket_fds();
        while now > baseline && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = socket_fds();
        }
        assert!(now <= baseline, "{now} sockets open, {baseline} before");
        remove_socket(&path);
    }

    #[test]
    fn socket_file_handling() {
        let _g = lock();
        // A live socket is refused.
        let (path, _seen) = server();
        let (sender, _s) = fake_vmm();
        assert!(matches!(
            start(&path, sender, DEFAULT_MAX_PAYLOAD),
            Err(ApiError::SocketInUse(_))
        ));
        remove_socket(&path);

        // A stale one (its listener is gone) is replaced.
        let stale = sock_path();
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let (sender, _s) = fake_vmm();
        start(&stale, sender, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(
            Client::new(&stale).call("GET / HTTP/1.1\r\n\r\n").status,
            200
        );
        remove_socket(&stale);

        // Anything else is left alone.
        let file = sock_path();
        std::fs::write(&file, "precious").unwrap();
        let (sender, _s) = fake_vmm();
        let e = start(&file, sender, DEFAULT_MAX_PAYLOAD).unwrap_err();
        assert!(matches!(e, ApiError::NotASocket(_)), "{e}");
        remove_socket(&file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
        std::fs::remove_file(&file).unwrap();
    }
}
