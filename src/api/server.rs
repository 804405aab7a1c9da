//! The connection server: one thread, one poll(2) loop over the listener, the shutdown
//! eventfd and every connection. It accepts, closes idle and stalled connections (on
//! their timeouts, and oldest first when the connection limit is reached, so a new client
//! is always served), and at shutdown sends what it owes and stops.

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::Limits;
use super::conn::Conn;
use crate::action::ActionSender;

/// At most this many connections are accepted per wakeup, so a flood of new clients
/// cannot keep the existing ones waiting.
const ACCEPT_BATCH: usize = 64;
/// At shutdown, responses still buffered get this long to reach their clients.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(200);

pub(super) struct Server {
    pub listener: UnixListener,
    pub stop: Arc<EventFd>,
    pub sender: ActionSender,
    pub limits: Limits,
    pub conns: Vec<Conn>,
}

impl Server {
    /// The thread body: returns when `stop` is signalled.
    pub fn run(mut self) {
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
            // Without its filter the API thread must not serve: no API rather than an
            // unconfined one.
            log::error!("{e}");
            return;
        }
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut accept_backoff = false;
        loop {
            // Slot 0 is the listener, slot 1 the stop eventfd; slot i + 2 is conns[i].
            fds.clear();
            fds.push(pollfd(
                self.listener.as_raw_fd(),
                if accept_backoff { 0 } else { libc::POLLIN },
            ));
            fds.push(pollfd(self.stop.as_raw_fd(), libc::POLLIN));
            for c in &self.conns {
                fds.push(pollfd(c.fd(), c.poll_events(self.limits.max_payload)));
            }
            let now = Instant::now();
            // After EMFILE and the like, retry accepting a little later rather than spin.
            let mut wait = accept_backoff.then_some(Duration::from_millis(100));
            accept_backoff = false;
            if let Some(d) = self.conns.iter().map(|c| c.deadline(&self.limits)).min() {
                let left = d.saturating_duration_since(now);
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
            if self.conns.iter().any(Conn::has_ready_requests) {
                wait = Some(Duration::ZERO);
            }
            if poll(&mut fds, wait).is_err() {
                continue;
            }
            if fds.get(1).is_some_and(|s| s.revents != 0) {
                self.finish();
                return;
            }
            let now = Instant::now();
            for (conn, pfd) in self.conns.iter_mut().zip(fds.iter().skip(2)) {
                if pfd.revents != 0 || conn.has_ready_requests() {
                    conn.on_event(pfd.revents, &self.sender, &self.limits, now);
                }
                if !conn.dead && conn.deadline(&self.limits) <= now {
                    log::debug!("API server: closing a connection that made no progress");
                    conn.dead = true;
                }
            }
            // Dropping a Conn closes its socket.
            self.conns.retain(|c| !c.dead);
            if fds.first().is_some_and(|l| l.revents & libc::POLLIN != 0) {
                accept_backoff = self.accept(now);
            }
        }
    }

    /// Accepts waiting clients, closing the oldest connections to make room. Returns true
    /// to back off after a resource error.
    fn accept(&mut self, now: Instant) -> bool {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("API server: dropping a connection: {e}");
                        continue;
                    }
                    if self.conns.len() >= self.limits.max_connections {
                        self.evict_oldest();
                    }
                    self.conns.push(Conn::new(stream, now));
                }
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
        false
    }

    /// Closes the connection that is closing already or has gone longest without
    /// answering a request. No connection is in the middle of being answered here (the
    /// thread answers one request at a time), so none loses a response it was owed.
    fn evict_oldest(&mut self) {
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.eviction_key())
            .map(|(i, _)| i);
        if let Some(i) = oldest {
            log::debug!(
                "API server: {} connections open; closing the oldest idle or stalled one",
                self.conns.len()
            );
            self.conns.swap_remove(i);
        }
    }

    /// Shutdown: no more requests are read; buffered responses get `SHUTDOWN_FLUSH` to go
    /// out, then every connection closes (the socket file is the caller's to remove).
    fn finish(mut self) {
        let until = Instant::now() + SHUTDOWN_FLUSH;
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            self.conns.retain(|c| !c.dead && c.pending_out() > 0);
            let now = Instant::now();
            if self.conns.is_empty() || now >= until {
                return;
            }
            fds.clear();
            fds.extend(self.conns.iter().map(|c| pollfd(c.fd(), libc::POLLOUT)));
            if poll(&mut fds, Some(until - now)).is_err() {
                continue;
            }
            for (conn, pfd) in self.conns.iter_mut().zip(&fds) {
                if pfd.revents & libc::POLLOUT != 0 {
                    conn.flush();
                } else if pfd.revents != 0 {
                    conn.dead = true;
                }
            }
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2) with an optional timeout, rounded up so that a deadline is past when it
/// returns. EINTR is an error the caller retries; other errors pause briefly first.
fn poll(fds: &mut [libc::pollfd], wait: Option<Duration>) -> Result<usize, ()> {
    let timeout = wait.map_or(-1, |w| {
        let ms = if w.is_zero() {
            0
        } else {
            w.as_millis().saturating_add(1)
        };
        i32::try_from(ms).unwrap_or(i32::MAX)
    });
    // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structs that
    // outlives the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    usize::try_from(n).map_err(|_| {
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            log::error!("API server: poll failed: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::{DEFAULT_MAX_PAYLOAD, remove_socket, start};
    use crate::action::{Action, ActionError, ActionOk, ActionResult, ActionSender};
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, mpsc};
    use std::time::{Duration, Instant};

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
        let r = c.call("GET /pmem/p0 HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 400);
        assert!(
            r.body.contains("ember does not support the pmem device"),
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
    fn stop_sends_what_is_owed_joins_and_removes_the_socket() {
        let _g = lock();
        let path = sock_path();
        let (sender, receiver) = crate::action::channel().unwrap();
        let server = start(&path, sender, DEFAULT_MAX_PAYLOAD).unwrap();
        let mut idle = Client::new(&path);
        // A request the VMM never takes: stop must not wait for it forever. It is
        // answered with an error, or (if stop came first) never read.
        let mut waiting = Client::new(&path);
        waiting.send(b"GET / HTTP/1.1\r\n\r\n");
        std::thread::sleep(Duration::from_millis(100));
        server.stop(receiver);
        assert!(!path.exists());
        if let Some(r) = waiting.recv() {
            assert_eq!(r.status, 500);
            assert!(waiting.recv().is_none());
        }
        assert!(idle.recv().is_none());
    }
}
