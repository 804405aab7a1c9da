//! Issue 9 (points 2 and 6): the API under hostile or careless clients, against a real
//! ember process with real Unix-socket clients, and every thread's heavy paths with the
//! real seccomp filters on.
//!
//! Timings are printed, not asserted (they belong to benchmarks); every wait has a
//! generous limit against hangs, which is what a stalled API would hit.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Against hangs only.
const HANG: Duration = Duration::from_secs(20);

/// An ember serving its API, its stderr in a file; killed and reaped on drop.
struct Ember {
    child: Child,
    sock: PathBuf,
    dir: TempDir,
}

impl Ember {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Ember {
        Ember::start_with(extra, env, Stdio::null())
    }

    fn start_with(extra: &[&str], env: &[(&str, &str)], stdin: Stdio) -> Ember {
        let dir = TempDir::new("hostile");
        let sock = dir.path("api.sock");
        let stderr = std::fs::File::create(dir.path("stderr")).unwrap();
        let mut cmd = Command::new(EMBER);
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn ember");
        let mut e = Ember { child, sock, dir };
        let start = Instant::now();
        while UnixStream::connect(&e.sock).is_err() {
            e.assert_alive();
            assert!(start.elapsed() < HANG, "API socket never came up");
            std::thread::sleep(Duration::from_millis(2));
        }
        e
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path("stderr")).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("ember exited: {status}\n{}", self.stderr());
        }
    }

    fn status_kib(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGTERM, then the exit code (143 when every thread stopped cleanly).
    fn terminate(self) -> (Option<i32>, String) {
        send_signal(&self.child, libc::SIGTERM);
        self.exit_code()
    }

    /// Waits for ember to exit: its exit code and stderr.
    fn exit_code(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < HANG, "ember did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        (status.code(), self.stderr())
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on its own thread; panics if it has not finished within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// One connection; reads responses framed by Content-Length.
struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn new(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(HANG)).unwrap();
        Client { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).unwrap();
    }

    /// The next response as (status, body); None at EOF or reset.
    fn recv(&mut self) -> Option<(u16, String)> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while self.buf.len() < end + 4 + len {
                    self.fill()?;
                }
                let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                self.buf.drain(..end + 4 + len);
                return Some((status, body));
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Option<()> {
        let mut b = [0u8; 16384];
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

    fn call(&mut self, raw: &str) -> (u16, String) {
        self.send(raw.as_bytes());
        self.recv().expect("connection closed")
    }
}

fn request(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn put(path: &str, body: &str) -> String {
    request("PUT", path, body)
}

const GET_ROOT: &str = "GET / HTTP/1.1\r\n\r\n";
const GET_VERSION: &str = "GET /version HTTP/1.1\r\n\r\n";

/// A new client's GET /: must be answered (within the hang limit); returns how long it took.
fn fresh_get(sock: &Path, what: &str) -> Duration {
    let sock = sock.to_path_buf();
    let t = within(HANG, what, move || {
        let start = Instant::now();
        let mut c = Client::new(&sock);
        let (status, body) = c.call(GET_ROOT);
        assert_eq!(status, 200, "{body}");
        start.elapsed()
    });
    eprintln!("{what}: a new client's GET / answered in {t:?}");
    t
}

/// True if the peer closed `s` (EOF or reset) within `limit`; false if it is still open.
fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn a_thousand_idle_connections_do_not_lock_out_a_new_client() {
    let mut e = Ember::start(&[], &[]);
    let sock = e.sock.clone();
    let mut idle = within(HANG, "opening 1000 connections", move || {
        (0..1000)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect::<Vec<_>>()
    });
    fresh_get(&e.sock, "1000 idle connections");
    e.assert_alive();
    // The oldest were closed to make room; the newest are still open.
    assert!(
        closed_within(&mut idle[0], HANG),
        "the oldest connection is still open"
    );
    assert!(
        !closed_within(&mut idle[999], Duration::from_millis(200)),
        "the newest idle connection was closed"
    );
    let fds = e.fds();
    assert!(fds < 200, "ember holds {fds} descriptors");
    // Every open connection still works.
    let mut last = Client {
        s: idle.pop().unwrap(),
        buf: Vec::new(),
    };
    last.s.set_read_timeout(Some(HANG)).unwrap();
    assert_eq!(last.call(GET_VERSION).0, 200);
}

#[test]
fn ten_half_requests_do_not_delay_a_new_one_and_still_complete() {
    let mut e = Ember::start(&[], &[]);
    // A kernel that exists: PUT /boot-source opens it (as Firecracker does).
    let body = format!(
        r#"{{"kernel_image_path": "{}"{}}}"#,
        guest(),
        " ".repeat(2000)
    );
    let req = put("/boot-source", &body);
    let (first, rest) = req.split_at(req.len() / 2);
    let mut halves: Vec<Client> = (0..10)
        .map(|_| {
            let mut c = Client::new(&e.sock);
            c.send(first.as_bytes());
            c
        })
        .collect();
    fresh_get(&e.sock, "ten half requests");
    for c in &mut halves {
        c.send(rest.as_bytes());
        assert_eq!(c.recv().unwrap().0, 204);
    }
    e.assert_alive();
}

#[test]
fn byte_at_a_time_clients_are_served_and_do_not_block_others() {
    let mut e = Ember::start(&[], &[]);
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let sock = e.sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(&sock);
                for _ in 0..3 {
                    let body = format!(r#"{{"kernel_image_path": "{}"}}"#, guest());
                    for b in put("/boot-source", &body).bytes() {
                        c.send(&[b]);
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    assert_eq!(c.recv().unwrap().0, 204);
                }
            })
        })
        .collect();
    for _ in 0..10 {
        fresh_get(&e.sock, "eight byte-at-a-time clients");
    }
    for w in writers {
        within(HANG, "byte-at-a-time client", move || w.join().unwrap());
    }
    e.assert_alive();
}

#[test]
fn pipelined_requests_are_answered_in_order_without_starving_others() {
    let mut e = Ember::start(&[], &[]);
    let n = 3000;
    let mut c = Client::new(&e.sock);
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let all: String = (0..n)
            .map(|i| if i % 2 == 0 { GET_ROOT } else { GET_VERSION })
            .collect();
        w.write_all(all.as_bytes()).unwrap();
    });
    fresh_get(&e.sock, "a client pipelining 3000 requests");
    for i in 0..n {
        let (status, body) = c
            .recv()
            .unwrap_or_else(|| panic!("EOF after {i} responses"));
        assert_eq!(status, 200);
        let expected = if i % 2 == 0 {
            "\"state\""
        } else {
            "firecracker_version"
        };
        assert!(body.contains(expected), "response {i} out of order: {body}");
    }
    writer.join().unwrap();
    // Pipelined requests after a half-close are all answered, then the connection ends.
    let mut c = Client::new(&e.sock);
    c.send(GET_ROOT.repeat(50).as_bytes());
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    for i in 0..50 {
        assert_eq!(c.recv().unwrap_or_else(|| panic!("EOF after {i}")).0, 200);
    }
    assert!(c.recv().is_none());
    e.assert_alive();
}

#[test]
fn a_client_that_never_reads_is_bounded_and_closed() {
    let mut e = Ember::start(&[], &[("EMBER_TEST_API_TIMEOUT_MS", "2000")]);
    fresh_get(&e.sock, "warm-up");
    let rss_before = e.rss_kib();
    let greedy = UnixStream::connect(&e.sock).unwrap();
    let mut w = greedy.try_clone().unwrap();
    // Far more responses than any buffer holds: ember stops reading, then closes it.
    let writer = std::thread::spawn(move || {
        w.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let many = "GET /vm/config HTTP/1.1\r\n\r\n".repeat(200_000);
        w.write_all(many.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(500));
    fresh_get(&e.sock, "a client that never reads");
    let grown = e.rss_kib().saturating_sub(rss_before);
    eprintln!("RSS grew by {grown} KiB with a client that never reads");
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    let result = within(HANG, "the non-reading client's writes", move || {
        writer.join().unwrap()
    });
    let err = result.expect_err("all 5 MB were accepted from a client that reads nothing");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
        ),
        "the non-reading client was not closed: {err}"
    );
    drop(greedy);
    e.assert_alive();
}

#[test]
fn requests_on_a_closing_connection_go_unanswered_and_block_no_one() {
    let mut e = Ember::start(&[], &[]);
    // After `Connection: close`, later pipelined requests are not answered.
    let mut c = Client::new(&e.sock);
    c.send(
        format!(
            "GET / HTTP/1.1\r\nConnection: close\r\n\r\n{}",
            GET_VERSION.repeat(100)
        )
        .as_bytes(),
    );
    assert_eq!(c.recv().unwrap().0, 200);
    assert!(c.recv().is_none());

    // After a framing error (413), the body still in flight is read and dropped, the
    // client sees the 413, and the connection ends.
    let mut c = Client::new(&e.sock);
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 900000\r\n\r\n");
        let _ = w.write_all(&vec![b'x'; 900_000]);
        let _ = w.write_all(put("/boot-source", "{}").as_bytes());
    });
    assert_eq!(c.recv().unwrap().0, 413);
    assert!(c.recv().is_none());
    within(HANG, "the 413 client's writes", move || {
        writer.join().unwrap()
    });

    // Clients that send many requests and hang up without reading.
    for _ in 0..50 {
        let mut s = UnixStream::connect(&e.sock).unwrap();
        let _ = s.write_all(GET_ROOT.repeat(200).as_bytes());
    }
    fresh_get(&e.sock, "after closing connections");
    e.assert_alive();
}

#[test]
fn idle_and_stalled_connections_time_out_active_ones_do_not() {
    let mut e = Ember::start(&[], &[("EMBER_TEST_API_TIMEOUT_MS", "1000")]);
    let mut idle = UnixStream::connect(&e.sock).unwrap();
    // Half a request, then one more byte every 100 ms: bytes do not extend its time.
    let slow = UnixStream::connect(&e.sock).unwrap();
    let mut w = slow.try_clone().unwrap();
    let dripper = std::thread::spawn(move || {
        let req = put(
            "/boot-source",
            &format!(r#"{{"kernel_image_path": "{}"}}"#, "k".repeat(500)),
        );
        for b in req.bytes() {
            if w.write_all(&[b]).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    // An active client, one request every 100 ms for 1.5 s, keeps its connection.
    let mut active = Client::new(&e.sock);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(active.call(GET_ROOT).0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed_within(&mut idle, HANG),
        "the idle connection was not closed"
    );
    let mut slow = slow;
    assert!(
        closed_within(&mut slow, HANG),
        "the dripping connection was not closed"
    );
    assert!(
        within(HANG, "dripping client", move || dripper.join().unwrap()),
        "the dripping client sent its whole request"
    );
    e.assert_alive();
}

/// The reproducer of issue 9 point 6: unfinished ~49 KB bodies whose clients hang up
/// made glibc trim a per-thread malloc arena, whose first trim opens a /proc file the API
/// thread's filter forbids: exit 148. Also big finished bodies and 413s.
#[test]
fn unfinished_big_bodies_do_not_trip_the_api_filter() {
    let mut e = Ember::start(&[], &[]);
    for round in 0..20 {
        let mut conns: Vec<UnixStream> = (0..3)
            .map(|_| {
                let mut s = UnixStream::connect(&e.sock).unwrap();
                let mut req =
                    b"PUT /boot-source HTTP/1.1\r\nContent-Length: 51000\r\n\r\n".to_vec();
                req.resize(req.len() + 49_000 + round * 37, b'x');
                s.write_all(&req).unwrap();
                s
            })
            .collect();
        if round % 2 == 0 {
            let mut c = Client::new(&e.sock);
            // Near the limit, with a kernel that exists (PUT /boot-source opens it).
            let body = format!(
                r#"{{"kernel_image_path": "{}"{}}}"#,
                guest(),
                " ".repeat(50_000)
            );
            assert_eq!(c.call(&put("/boot-source", &body)).0, 204);
            let big = format!("{{\"x\": \"{}\"}}", "y".repeat(60_000));
            assert_eq!(c.call(&put("/boot-source", &big)).0, 413);
        }
        std::thread::sleep(Duration::from_millis(20));
        conns.clear();
        std::thread::sleep(Duration::from_millis(20));
        e.assert_alive();
    }
    fresh_get(&e.sock, "after unfinished bodies");
    let (code, stderr) = e.terminate();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

fn unique_tap() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "eh{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every thread under its real filter, on its heavy paths at once: the vCPUs run virtio
/// set-up and I/O and print continuously; the VMM thread serves disk I/O, re-opens a
/// drive, writes metrics, pauses and resumes; the API thread takes a storm of good, bad,
/// oversized and abandoned requests; all of them log at debug level. Then SIGTERM stops
/// them all (thread exit and joins under the filters). Any forbidden call would end ember
/// with 148.
#[test]
fn every_thread_survives_its_heavy_paths_with_filters_on() {
    let dir = TempDir::new("heavy");
    let disk_a = dir.path("a.img");
    let disk_b = dir.path("b.img");
    std::fs::write(&disk_a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&disk_b, vec![0u8; 1 << 20]).unwrap();
    let log = dir.path("ember.log");
    let metrics = dir.path("metrics.json");
    let tap = unique_tap();
    let mut e = Ember::start(
        &["--level", "Debug", "--log-path", log.to_str().unwrap()],
        &[],
    );
    let mut c = Client::new(&e.sock);
    let mut ok = |req: String| {
        let (status, body) = c.call(&req);
        assert_eq!(status, 204, "{req}: {body}");
    };
    ok(put(
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 ember_test=blk,net,counter"}}"#,
            guest()
        ),
    ));
    ok(put(
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    ));
    ok(put(
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            disk_a.display()
        ),
    ));
    ok(put(
        "/network-interfaces/eth0",
        &format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}"}}"#),
    ));
    ok(put(
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    ));
    ok(put("/actions", r#"{"action_type": "InstanceStart"}"#));

    let storm: Vec<_> = (0..4)
        .map(|t| {
            let sock = e.sock.clone();
            let (a, b) = (disk_a.clone(), disk_b.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(&sock);
                for i in 0..60 {
                    let r = match (t + i) % 8 {
                        0 => c.call("GET /vm/config HTTP/1.1\r\n\r\n"),
                        1 => c.call(&put("/actions", r#"{"action_type": "FlushMetrics"}"#)),
                        2 => {
                            let path = if i % 2 == 0 { &b } else { &a };
                            let body = format!(
                                r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
                                path.display()
                            );
                            c.call(&request("PATCH", "/drives/data", &body))
                        }
                        3 => {
                            let state = if i % 2 == 0 { "Paused" } else { "Resumed" };
                            c.call(&request(
                                "PATCH",
                                "/vm",
                                &format!(r#"{{"state": "{state}"}}"#),
                            ))
                        }
                        4 => c.call(&put("/machine-config", r#"{"vcpu_count": "x"}"#)),
                        5 => {
                            let mut s = UnixStream::connect(&sock).unwrap();
                            let mut req =
                                b"PUT /logger HTTP/1.1\r\nContent-Length: 50000\r\n\r\n".to_vec();
                            req.resize(req.len() + 40_000, b'x');
                            let _ = s.write_all(&req);
                            // And one that hangs up on its answers: write errors, logged
                            // with their strerror text.
                            let mut s = UnixStream::connect(&sock).unwrap();
                            let _ = s.write_all(GET_ROOT.repeat(50).as_bytes());
                            (200, String::new())
                        }
                        6 => c.call(&put("/boot-source", &"z".repeat(60_000))),
                        _ => c.call(GET_ROOT),
                    };
                    assert!(r.0 != 0 && r.0 != 500, "{r:?}");
                    if r.0 == 413 {
                        c = Client::new(&sock);
                    }
                }
                // Leave it resumed.
                c.call(&request("PATCH", "/vm", r#"{"state": "Resumed"}"#));
            })
        })
        .collect();
    for s in storm {
        within(Duration::from_secs(120), "the request storm", move || {
            s.join().unwrap()
        });
    }
    e.assert_alive();
    // The guest, paused often during the storm, finishes its disk test now.
    let start = Instant::now();
    loop {
        assert_eq!(
            Client::new(&e.sock)
                .call(&put("/actions", r#"{"action_type": "FlushMetrics"}"#))
                .0,
            204
        );
        let m = std::fs::read_to_string(&metrics).unwrap();
        let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
        if last["block_data"]["write_count"].as_u64() > Some(0) {
            break;
        }
        assert!(
            start.elapsed() < HANG,
            "the guest never wrote its disk: {last}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, stderr) = e.terminate();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = Command::new("ip").args(["link", "del", &tap]).output();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}\n{logged}");
    assert!(!logged.contains("seccomp filter forbids"), "{logged}");
    // The guest did its I/O and kept printing under the vCPU filter.
    assert!(logged.contains(":ember_vcpu"), "no vCPU log lines");
    let m = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    // The guest's disk I/O (vCPU notifies, VMM-thread I/O), its frame (TAP write) and its
    // serial output all happened under the filters.
    assert!(
        last["block_data"]["read_count"].as_u64() > Some(0),
        "{last}"
    );
    assert!(
        last["block_data"]["write_count"].as_u64() > Some(0),
        "{last}"
    );
    assert!(last["vcpu"]["exits_mmio"].as_u64() > Some(0), "{last}");
    assert!(last["uart"]["out_bytes"].as_u64() > Some(0), "{last}");
    assert!(
        last["api_server"]["requests"].as_u64() > Some(100),
        "{last}"
    );
}

/// A resume followed at once by a pause used to find the vCPU thread still in its pause
/// wait, which then never acknowledged the new pause: the VMM thread waited forever and
/// the API answered no one again.
#[test]
fn rapid_pause_and_resume_never_hang_the_vmm() {
    let mut e = Ember::start(&[], &[]);
    let mut c = Client::new(&e.sock);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 ember_test=counter"}}"#,
        guest()
    );
    assert_eq!(c.call(&put("/boot-source", &boot)).0, 204);
    assert_eq!(
        c.call(&put(
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 64}"#
        ))
        .0,
        204
    );
    assert_eq!(
        c.call(&put("/actions", r#"{"action_type": "InstanceStart"}"#))
            .0,
        204
    );
    let patch = |state: &str| request("PATCH", "/vm", &format!(r#"{{"state": "{state}"}}"#));
    let cycles = patch("Paused") + &patch("Resumed");
    within(HANG, "300 pause/resume cycles", move || {
        for i in 0..300 {
            c.send(cycles.as_bytes());
            assert_eq!(c.recv().unwrap_or_else(|| panic!("EOF at {i}")).0, 204);
            assert_eq!(c.recv().unwrap_or_else(|| panic!("EOF at {i}")).0, 204);
        }
    });
    fresh_get(&e.sock, "after pause/resume cycles");
    e.assert_alive();
}

/// A pseudo-terminal: ember gets the slave as stdin and puts it in raw mode at start.
struct Pty {
    master: std::os::fd::OwnedFd,
    slave: std::os::fd::OwnedFd,
}

impl Pty {
    fn new() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two descriptors on success; name, termios and winsize
        // may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        unsafe {
            Pty {
                master: std::os::fd::OwnedFd::from_raw_fd(m),
                slave: std::os::fd::OwnedFd::from_raw_fd(s),
            }
        }
    }

    fn stdin(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().unwrap())
    }

    /// Whether line editing and echo are on (as before ember's raw mode).
    fn cooked(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr on an open fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open; `t` is valid for writes.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0);
        t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
    }
}

/// A panic on any thread goes through the panic hook under that thread's filter: the
/// terminal is restored and ember exits with 2 (not 148, with the terminal left raw).
#[test]
fn a_panic_on_any_thread_restores_the_terminal_under_its_filter() {
    for thread in ["vcpu", "vmm", "api"] {
        let pty = Pty::new();
        assert!(pty.cooked());
        let e = Ember::start_with(&[], &[("EMBER_TEST_PANIC", thread)], pty.stdin());
        let mut c = Client::new(&e.sock);
        let boot = format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 ember_test=counter"}}"#,
            guest()
        );
        assert_eq!(c.call(&put("/boot-source", &boot)).0, 204);
        // The vCPU and VMM threads panic during InstanceStart (the answer may not come).
        c.send(put("/actions", r#"{"action_type": "InstanceStart"}"#).as_bytes());
        if thread == "api" {
            assert_eq!(c.recv().unwrap().0, 204);
            assert!(!pty.cooked(), "ember did not put the terminal in raw mode");
            c.send(b"GET /ember-test-panic HTTP/1.1\r\n\r\n");
        }
        let (code, stderr) = e.exit_code();
        assert_eq!(code, Some(2), "{thread}: {stderr}");
        assert!(stderr.contains("EMBER_TEST_PANIC"), "{thread}: {stderr}");
        assert!(pty.cooked(), "{thread}: the terminal was left in raw mode");
        drop(pty.master);
    }
}
