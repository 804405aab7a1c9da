//! Issue 5: the API with real clients (curl over the Unix socket, and a Rust client),
//! driving real VMs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// An ember serving its API; killed and reaped on drop.
struct Ember {
    child: Child,
    sock: PathBuf,
    _dir: TempDir,
}

impl Ember {
    fn start(extra: &[&str]) -> Ember {
        let dir = TempDir::new("api");
        let sock = dir.path("api.sock");
        let mut args = vec!["--api-sock", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = spawn(&args);
        wait_for_socket(&sock, T);
        Ember {
            child,
            sock,
            _dir: dir,
        }
    }

    fn stdout(&mut self) -> BufReader<std::process::ChildStdout> {
        BufReader::new(self.child.stdout.take().unwrap())
    }
}

impl Ember {
    /// A request that must succeed with 204.
    fn ok(&self, method: &str, path: &str, body: &str) {
        let (status, resp) = curl(&self.sock, method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {resp}");
    }

    /// PUT /actions with this action type, which must succeed.
    fn action(&self, action_type: &str) {
        self.ok(
            "PUT",
            "/actions",
            &format!(r#"{{"action_type": "{action_type}"}}"#),
        );
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client over one keep-alive connection (the Rust client).
struct Client {
    stream: BufReader<UnixStream>,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        Client {
            stream: BufReader::new(s),
        }
    }

    fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).unwrap();
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut b = vec![0u8; len];
        self.stream.read_exact(&mut b).unwrap();
        (status, String::from_utf8_lossy(&b).into_owned())
    }
}

fn boot_source(args: &str) -> String {
    let guest = guest();
    format!(r#"{{"kernel_image_path": "{guest}", "boot_args": "console=ttyS0 {args}"}}"#)
}

#[test]
fn full_boot_through_the_api_with_curl() {
    let mut e = Ember::start(&[]);
    let (s, b) = curl(&e.sock, "GET", "/", None);
    assert_eq!(s, 200);
    assert!(b.contains("\"state\":\"Not started\""), "{b}");
    e.ok("PUT", "/boot-source", &boot_source(""));
    e.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    let (s, b) = curl(&e.sock, "GET", "/machine-config", None);
    assert_eq!(s, 200);
    assert!(b.contains("\"vcpu_count\":2"), "{b}");
    // io_engine is always reported: Sync when not given, as Firecracker does.
    let dir = TempDir::new("api-drives");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    for p in [&a, &b] {
        std::fs::write(p, vec![0u8; 4096]).unwrap();
    }
    e.ok(
        "PUT",
        "/drives/a",
        &format!(
            r#"{{"drive_id": "a", "path_on_host": "{}", "is_root_device": false}}"#,
            a.display()
        ),
    );
    e.ok(
        "PUT",
        "/drives/b",
        &format!(
            r#"{{"drive_id": "b", "path_on_host": "{}", "is_root_device": false, "io_engine": "Async"}}"#,
            b.display()
        ),
    );
    let (s, b) = curl(&e.sock, "GET", "/vm/config", None);
    assert_eq!(s, 200);
    assert!(b.contains("\"boot-source\"") && b.contains(guest()), "{b}");
    let cfg: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(cfg["drives"][0]["io_engine"], "Sync", "{b}");
    assert_eq!(cfg["drives"][1]["io_engine"], "Async", "{b}");
    let mut out = e.stdout();
    e.action("InstanceStart");
    assert!(read_until(&mut out, T, |l| l == "mptable: cpus=2").is_some());
    assert!(read_until(&mut out, T, |l| l == "ember-test-guest: done").is_some());
    // The guest reset: ember exits 0 and removes its socket.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = e.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < T);
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!e.sock.exists(), "socket left behind");
}

#[test]
fn pause_stops_guest_progress_and_resume_restarts_it() {
    let mut e = Ember::start(&[]);
    let mut c = Client::connect(&e.sock);
    assert_eq!(
        c.request(
            "PUT",
            "/boot-source",
            Some(&boot_source("ember_test=counter"))
        )
        .0,
        204
    );
    assert_eq!(
        c.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    let out = e.stdout();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while !rx.recv_timeout(T).unwrap().starts_with("tick") {}
    assert_eq!(
        c.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
        204
    );
    let (s, b) = c.request("GET", "/", None);
    assert_eq!(s, 200);
    assert!(b.contains("\"Paused\""), "{b}");
    // Whatever was printed before the pause took effect drains quickly; then nothing.
    std::thread::sleep(Duration::from_millis(200));
    while rx.try_recv().is_ok() {}
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "the guest made progress while paused"
    );
    assert_eq!(
        c.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let next = rx.recv_timeout(T).unwrap();
    assert!(next.starts_with("tick"), "{next}");
    let (_, b) = c.request("GET", "/", None);
    assert!(b.contains("\"Running\""), "{b}");
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest() {
    let mut e = Ember::start(&[]);
    e.ok("PUT", "/boot-source", &boot_source("ember_test=counter"));
    let mut out = e.stdout();
    e.action("InstanceStart");
    assert!(read_until(&mut out, T, |l| l.starts_with("tick")).is_some());
    e.action("SendCtrlAltDel");
    assert!(read_until(&mut out, T, |l| l == "ctrl-alt-del: received").is_some());
    let status = e.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

fn assert_fault(resp: (u16, String), status: u16, needle: &str) {
    assert_eq!(resp.0, status, "{resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.1).unwrap_or_else(|_| panic!("{resp:?}"));
    let msg = v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("{resp:?}"));
    assert!(msg.contains(needle), "`{needle}` not in {msg:?}");
}

#[test]
fn every_error_case_answers_fault_message() {
    let e = Ember::start(&[]);
    let s = &e.sock;
    assert_fault(
        curl(s, "PUT", "/boot-source", Some("{\"kernel_image_path\": ")),
        400,
        "",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#),
        ),
        400,
        "bogus",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": "two", "mem_size_mib": 64}"#),
        ),
        400,
        "invalid type",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 33, "mem_size_mib": 64}"#),
        ),
        400,
        "vcpu_count",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#),
        ),
        400,
        "",
    );
    assert_fault(curl(s, "GET", "/no/such/path", None), 400, "");
    assert_fault(curl(s, "DELETE", "/machine-config", None), 400, "");
    assert_fault(
        curl(
            s,
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 3, "uds_path": ""}"#),
        ),
        400,
        "uds_path must not be empty",
    );
    assert_fault(
        curl(s, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#)),
        400,
        "before starting",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        ),
        400,
        "before starting",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        400,
        "kernel",
    );
    assert_fault(
        curl(s, "PUT", "/actions", Some(r#"{"action_type": "Explode"}"#)),
        400,
        "",
    );
    // A body over the limit: 413 without reading it whole.
    let big = format!("{{\"kernel_image_path\": \"{}\"}}", "a".repeat(60_000));
    assert_eq!(curl(s, "PUT", "/boot-source", Some(&big)).0, 413);
    // Wrong state: pre-boot-only resources after InstanceStart.
    e.ok("PUT", "/boot-source", &boot_source("ember_test=counter"));
    e.action("InstanceStart");
    assert_fault(
        curl(s, "PUT", "/boot-source", Some(&boot_source(""))),
        400,
        "after starting",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        ),
        400,
        "after starting",
    );
    assert_fault(
        curl(
            s,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        400,
        "after starting",
    );
}

/// Half a request, and a client that never reads: neither stalls other clients nor the VM.
#[test]
fn stuck_clients_do_not_stall_others() {
    let e = Ember::start(&[]);
    let mut half = UnixStream::connect(&e.sock).unwrap();
    half.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"ker")
        .unwrap();
    let mut greedy = UnixStream::connect(&e.sock).unwrap();
    let many = "GET /vm/config HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    // Written from a thread: the server stops reading this client once its output backs up.
    let writer = std::thread::spawn(move || {
        let _ = greedy.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = greedy.write_all(many.as_bytes());
        greedy
    });
    let start = Instant::now();
    let (s, _) = curl(&e.sock, "GET", "/", None);
    assert_eq!(s, 200);
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(writer.join());
    drop(half);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn hundreds_of_dropped_connections_leak_no_descriptors() {
    let e = Ember::start(&[]);
    let _ = curl(&e.sock, "GET", "/", None);
    let before = open_fds(e.child.id());
    for i in 0..300 {
        let mut s = UnixStream::connect(&e.sock).unwrap();
        if i % 3 == 0 {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n");
        } else if i % 3 == 1 {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
        }
        drop(s);
    }
    // Let the server notice the hang-ups.
    let (s, _) = curl(&e.sock, "GET", "/", None);
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(300));
    let after = open_fds(e.child.id());
    assert!(
        after <= before + 1,
        "descriptors: {before} before, {after} after"
    );
}

#[test]
fn config_file_with_api_stays_up_to_inspect_and_pause() {
    let dir = TempDir::new("cfgapi");
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        guest_config("console=ttyS0 ember_test=counter", 1, 64, ""),
    )
    .unwrap();
    let mut e = Ember::start(&["--config-file", cfg.to_str().unwrap()]);
    let mut out = e.stdout();
    assert!(read_until(&mut out, T, |l| l.starts_with("tick")).is_some());
    let (s, b) = curl(&e.sock, "GET", "/", None);
    assert_eq!(s, 200);
    assert!(b.contains("\"Running\""), "{b}");
    e.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, b) = curl(&e.sock, "GET", "/", None);
    assert!(b.contains("\"Paused\""), "{b}");
    // SIGTERM while paused stops cleanly and removes the socket.
    send_signal(&e.child, libc::SIGTERM);
    let status = e.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!e.sock.exists());
}

#[test]
fn sigterm_before_start_removes_the_socket() {
    let mut e = Ember::start(&[]);
    send_signal(&e.child, libc::SIGTERM);
    let status = e.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!e.sock.exists());
}

#[test]
fn a_live_socket_is_not_stolen() {
    let e = Ember::start(&[]);
    let o = wait(spawn(&["--api-sock", e.sock.to_str().unwrap()]), T);
    assert_ne!(o.code, Some(0), "{o:#?}");
    assert!(o.stderr.contains("another process"), "{o:#?}");
    // The first one still answers.
    assert_eq!(curl(&e.sock, "GET", "/", None).0, 200);
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = TempDir::new("stale");
    let sock = dir.path("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut child = spawn(&["--api-sock", sock.to_str().unwrap()]);
    let start = Instant::now();
    while curl(&sock, "GET", "/", None).0 != 200 {
        assert!(start.elapsed() < T);
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn metrics_and_boot_timer() {
    let dir = TempDir::new("metrics");
    let metrics = dir.path("metrics.json");
    let mut e = Ember::start(&["--boot-timer"]);
    e.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    e.ok(
        "PUT",
        "/boot-source",
        &boot_source("ember_test=boottimer,counter"),
    );
    let mut out = e.stdout();
    e.action("InstanceStart");
    assert!(read_until(&mut out, T, |l| l.starts_with("tick")).is_some());
    e.action("FlushMetrics");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last = text.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    let t = &v["boot_timeline_us"];
    for k in [
        "api_ready",
        "instance_start",
        "vm_built",
        "first_vcpu_run",
        "first_serial_output",
        "guest_boot_timer",
    ] {
        assert!(t[k].as_u64().unwrap_or(0) > 0, "{k} missing in {last}");
    }
    assert!(v["api_server"]["requests"].as_u64().unwrap() >= 3, "{last}");
    assert!(v["vcpu"]["exits_io"].as_u64().unwrap() > 0, "{last}");
}

#[test]
fn patch_drive_swaps_the_backing_file_after_start() {
    let dir = TempDir::new("patchdrive");
    let a = dir.path("a.img");
    let b = dir.path("b.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![1u8; 2 << 20]).unwrap();
    let e = Ember::start(&[]);
    let s = &e.sock;
    let drive = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        a.display()
    );
    let patch = |p: &Path| {
        format!(
            r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
            p.display()
        )
    };
    e.ok("PUT", "/drives/data", &drive);
    // PATCH is for a running VM only, as in Firecracker.
    assert_fault(
        curl(s, "PATCH", "/drives/data", Some(&patch(&b))),
        400,
        "before starting",
    );
    e.ok("PUT", "/boot-source", &boot_source("ember_test=counter"));
    e.action("InstanceStart");
    assert_fault(
        curl(s, "PUT", "/drives/data", Some(&drive)),
        400,
        "after starting",
    );
    e.ok("PATCH", "/drives/data", &patch(&b));
    let (_, cfg) = curl(s, "GET", "/vm/config", None);
    assert!(cfg.contains(b.to_str().unwrap()), "{cfg}");
    assert_fault(
        curl(
            s,
            "PATCH",
            "/drives/data",
            Some(&patch(&dir.path("missing.img"))),
        ),
        400,
        "missing.img",
    );
    assert_fault(
        curl(
            s,
            "PATCH",
            "/drives/nosuch",
            Some(r#"{"drive_id": "nosuch", "path_on_host": "/x"}"#),
        ),
        400,
        "nosuch",
    );
    // A failed swap leaves the configuration as it was.
    let (_, cfg) = curl(s, "GET", "/vm/config", None);
    assert!(cfg.contains(b.to_str().unwrap()), "{cfg}");
}

/// Rate limiters through the API: set with the drive, replaced on the running VM by
/// PATCH (a bucket left out stays, one of size 0 goes), reported by GET /vm/config.
#[test]
fn patch_rate_limiters_after_start() {
    let dir = TempDir::new("patchrl");
    let a = dir.path("a.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    let e = Ember::start(&[]);
    let s = &e.sock;
    e.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false,
                 "rate_limiter": {{"ops": {{"size": 100, "refill_time": 1000}}}}}}"#,
            a.display()
        ),
    );
    let bw = r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 4096, "one_time_burst": 8192, "refill_time": 10}}}"#;
    assert_fault(
        curl(s, "PATCH", "/drives/data", Some(bw)),
        400,
        "before starting",
    );
    let upd = r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#;
    assert_fault(
        curl(s, "PATCH", "/network-interfaces/eth0", Some(upd)),
        400,
        "before starting",
    );
    e.ok("PUT", "/boot-source", &boot_source("ember_test=counter"));
    e.action("InstanceStart");
    e.ok("PATCH", "/drives/data", bw);
    let (_, cfg) = curl(s, "GET", "/vm/config", None);
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let rl = &v["drives"][0]["rate_limiter"];
    assert_eq!(rl["ops"]["size"], 100, "{cfg}");
    assert_eq!(rl["bandwidth"]["one_time_burst"], 8192, "{cfg}");
    e.ok(
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#,
    );
    let (_, cfg) = curl(s, "GET", "/vm/config", None);
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let rl = &v["drives"][0]["rate_limiter"];
    assert!(rl["ops"].is_null(), "{cfg}");
    assert_eq!(rl["bandwidth"]["size"], 4096, "{cfg}");
    assert_fault(
        curl(s, "PATCH", "/network-interfaces/eth0", Some(upd)),
        400,
        "eth0",
    );
    assert_fault(
        curl(
            s,
            "PATCH",
            "/drives/data",
            Some(r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1}}}"#),
        ),
        400,
        "refill_time",
    );
}

/// A guest that ends at once (here: a triple fault right after hello) still lets the
/// client that started it see its 204 before ember exits.
#[test]
fn instance_start_is_answered_even_when_the_guest_ends_at_once() {
    for _ in 0..5 {
        let e = Ember::start(&[]);
        e.ok(
            "PUT",
            "/boot-source",
            &boot_source("ember_test=triplefault"),
        );
        e.action("InstanceStart");
    }
}

/// Issue 17: with the API, the VMM thread makes the VM and reads KVM's CPUID while the
/// agent is still configuring, and InstanceStart builds on that VM.
#[test]
fn the_vm_is_prepared_while_the_agent_configures() {
    let dir = TempDir::new("api-prepared");
    let log = dir.path("ember.log");
    std::fs::write(&log, "").unwrap();
    let mut e = Ember::start(&["--level", "Info", "--log-path", log.to_str().unwrap()]);
    e.ok("PUT", "/boot-source", &boot_source(""));
    let mut out = e.stdout();
    e.action("InstanceStart");
    assert!(read_until(&mut out, T, |l| l == "ember-test-guest: done").is_some());
    let _ = e.child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in the log:\n{text}"))
    };
    assert!(
        at("VM prepared ahead of InstanceStart") < at("kernel command line:"),
        "{text}"
    );
}
