//! virtio-vsock with Firecracker's hybrid Unix-socket protocol, end to end: the test guest
//! (mode `vsock`, tests/guest/vsock.c) serves ports 1024 (echo), 1025 (sink), 1026
//! (source), 1027 (accept, then reset) and 1028 (accepts, never reads), and connects to
//! the host ports named by `vsock.connect=`. Host clients here speak the protocol as
//! Kata's agent client and the Firecracker Go SDK do: write `CONNECT <port>\n`, read one
//! line, require it to start with `OK `.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const ECHO: u32 = 1024;
const SOURCE: u32 = 1026;
const RSTNOW: u32 = 1027;
const NOREAD: u32 = 1028;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

struct Vm {
    child: Child,
    dir: TempDir,
    uds: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    /// Boots the test guest with a vsock device; `boot_extra` adds guest arguments.
    /// `before` runs after the socket paths are known and before the guest boots.
    fn start(boot_extra: &str, before: impl FnOnce(&Vm)) -> Vm {
        let dir = TempDir::new("vsock");
        let uds = dir.path("v.sock");
        let config = guest_config(
            &format!("console=ttyS0 ember_test=vsock {boot_extra}"),
            1,
            128,
            &format!(
                r#""vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
                uds.display()
            ),
        );
        let cfg = dir.path("vm.json");
        std::fs::write(&cfg, config).unwrap();
        let mut vm = Vm {
            child: spawn(&["--no-api", "--config-file", cfg.to_str().unwrap()]),
            dir,
            uds,
            lines: Arc::new(Mutex::new(Vec::new())),
        };
        let out = vm.child.stdout.take().unwrap();
        let lines = vm.lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                lines.lock().unwrap().push(l);
            }
        });
        let err = vm.child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("ember: {l}");
            }
        });
        before(&vm);
        assert!(
            vm.wait_line("vsock: ready", Duration::from_secs(30)),
            "{:?}",
            vm.lines()
        );
        vm
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_line(&self, want: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.lines.lock().unwrap().iter().any(|l| l == want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).expect("connect to uds_path");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    /// Connects to guest port `port` as Kata and the Go SDK do; returns the stream and
    /// the host port from `OK <port>`.
    fn connect(&self, port: u32) -> (UnixStream, u32) {
        let mut s = self.raw();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let line = read_line(&mut s);
        let host_port = line
            .strip_prefix("OK ")
            .and_then(|p| p.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("reply to CONNECT {port}: {line:?}"));
        (s, host_port)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// One line, byte by byte, so nothing after it is consumed. Empty when the connection
/// ends first (a reset counts: ember closing a socket with unread bytes resets it).
fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading a reply line: {e}"),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Deterministic bytes: `len` of them from `seed`.
fn stream_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// FNV-1a over 8-byte words (the tail zero-padded).
fn checksum(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in data.chunks(8) {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes `data` from one thread while reading as many bytes back on this one.
fn echo(s: UnixStream, data: Arc<Vec<u8>>) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&d).map(|_| w));
    let mut r = s;
    let mut back = vec![0u8; data.len()];
    r.read_exact(&mut back).expect("read the echo");
    writer.join().unwrap().expect("write to the guest");
    back
}

#[test]
fn host_initiated_echo_and_local_ports() {
    let vm = Vm::start("", |_| {});
    let (s, p1) = vm.connect(ECHO);
    // Firecracker's local ports: from 2^30 up, one per connection.
    assert!((1 << 30..1 << 31).contains(&p1), "{p1}");
    let data = Arc::new(stream_bytes(1, 300_000));
    assert!(echo(s, data.clone()) == *data, "echo differs");
    // The keyword in any case, as Firecracker parses it.
    let mut s = vm.raw();
    s.write_all(b"connect 1024\n").unwrap();
    let line = read_line(&mut s);
    let p2: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    assert_eq!(p2, p1 + 1);
    // Bytes sent right behind the CONNECT line reach the guest too.
    let mut s = vm.raw();
    s.write_all(b"CONNECT 1024\nhello").unwrap();
    assert!(read_line(&mut s).starts_with("OK "));
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
}

#[test]
fn guest_initiated_echo_and_refusal() {
    let mut listener = None;
    let vm = Vm::start("vsock.connect=5000 vsock.connect=5001", |vm| {
        let path = format!("{}_5000", vm.uds.display());
        listener = Some(UnixListener::bind(path).unwrap());
    });
    let listener = listener.unwrap();
    listener.set_nonblocking(false).unwrap();
    let (s, _) = listener
        .accept()
        .expect("the guest connects to <uds_path>_5000");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(vm.wait_line("vsock: connected 5000", Duration::from_secs(10)));
    // Nothing listens on <uds_path>_5001: the guest gets a reset.
    assert!(
        vm.wait_line("vsock: refused 5001", Duration::from_secs(10)),
        "{:?}",
        vm.lines()
    );
    let data = Arc::new(stream_bytes(2, 1 << 20));
    let s2 = s.try_clone().unwrap();
    assert!(echo(s2, data.clone()) == *data, "echo differs");
    // The host closes: the guest hears a shutdown.
    drop(s);
    assert!(
        vm.wait_line("vsock: shutdown by host 5000", Duration::from_secs(10)),
        "{:?}",
        vm.lines()
    );
}

#[test]
fn sixty_four_connections_at_once() {
    let vm = Vm::start("", |_| {});
    let conns: Vec<_> = (0..64).map(|_| vm.connect(ECHO).0).collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let data = Arc::new(stream_bytes(100 + i as u64, 256 * 1024));
                echo(s, data.clone()) == *data
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert!(t.join().unwrap(), "connection {i}: echo differs");
    }
}

#[test]
fn sixty_four_mib_each_way_with_checksums() {
    let vm = Vm::start("", |_| {});
    const LEN: usize = 64 << 20;
    // Host -> guest -> host: the guest sends back the very buffers it received.
    let (s, _) = vm.connect(ECHO);
    let data = Arc::new(stream_bytes(7, LEN));
    let sent = checksum(&data);
    let back = echo(s, data);
    assert_eq!(checksum(&back), sent, "64 MiB echo: checksums differ");
    // Guest -> host: 64 MiB of the guest's pattern, then its end of stream.
    let (mut s, _) = vm.connect(SOURCE);
    let mut got = Vec::with_capacity(LEN);
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), LEN);
    let pattern: Vec<u8> = (0..32768u32).map(|i| (i * 7 + 3) as u8).collect();
    let want: Vec<u8> = pattern.iter().copied().cycle().take(LEN).collect();
    assert_eq!(
        checksum(&got),
        checksum(&want),
        "guest pattern: checksums differ"
    );
}

/// Writes without blocking until the socket is full; returns how much went.
fn fill(s: &mut UnixStream, limit: usize) -> usize {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 65536];
    let mut total = 0;
    let start = Instant::now();
    // Keep trying for a while: ember moves bytes on while we write.
    let mut idle_since = Instant::now();
    while total < limit && start.elapsed() < Duration::from_secs(20) {
        match s.write(&chunk) {
            Ok(n) => {
                total += n;
                idle_since = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if idle_since.elapsed() > Duration::from_millis(1500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    total
}

#[test]
fn stalled_peers_block_only_themselves_and_stay_bounded() {
    let vm = Vm::start("", |_| {});
    // A host peer that writes to the echo port and never reads its echo.
    let (mut stalled_host, _) = vm.connect(ECHO);
    // A guest application that never reads.
    let (mut stalled_guest, _) = vm.connect(NOREAD);
    let t1 = std::thread::spawn(move || {
        let n = fill(&mut stalled_host, 64 << 20);
        (stalled_host, n)
    });
    let t2 = std::thread::spawn(move || {
        let n = fill(&mut stalled_guest, 64 << 20);
        (stalled_guest, n)
    });
    // Meanwhile another connection keeps flowing.
    let (s, _) = vm.connect(ECHO);
    let data = Arc::new(stream_bytes(9, 4 << 20));
    assert!(echo(s, data.clone()) == *data, "echo beside stalled peers");
    let (_a, host_stalled_bytes) = t1.join().unwrap();
    let (_b, guest_stalled_bytes) = t2.join().unwrap();
    eprintln!(
        "accepted before blocking: host peer not reading {host_stalled_bytes} bytes, \
         guest not reading {guest_stalled_bytes} bytes"
    );
    // What ember and the guest hold is bounded by credit: the guest's 256 KiB window,
    // ember's 64 KiB buffer and the Unix socket buffers on each side (~208 KiB each
    // here): well under 1 MiB either way.
    assert!(
        host_stalled_bytes < 2 << 20,
        "a host peer that stops reading: {host_stalled_bytes} bytes accepted"
    );
    assert!(
        guest_stalled_bytes < 2 << 20,
        "a guest that stops reading: {guest_stalled_bytes} bytes accepted"
    );
    // And still other connections work.
    let (s, _) = vm.connect(ECHO);
    let data = Arc::new(stream_bytes(10, 1 << 20));
    assert!(echo(s, data.clone()) == *data, "echo after stalled peers");
}

#[test]
fn resets_bad_preambles_and_unknown_ports() {
    let vm = Vm::start("", |_| {});
    let (mut good, _) = vm.connect(ECHO);
    // The guest accepts and resets at once: OK, then the end of the stream.
    let (mut s, _) = vm.connect(RSTNOW);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Nothing listens on the guest port: closed without OK.
    let mut s = vm.raw();
    s.write_all(b"CONNECT 7777\n").unwrap();
    assert_eq!(read_line(&mut s), "");
    // Malformed and oversized preambles close only their own connection.
    for bad in [
        &b"HELLO 1024\n"[..],
        b"CONNECT x\n",
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT                                  1024\n",
    ] {
        let mut s = vm.raw();
        s.write_all(bad).unwrap();
        assert_eq!(read_line(&mut s), "", "{:?}", String::from_utf8_lossy(bad));
    }
    // A client that closes before its line.
    drop(vm.raw());
    good.write_all(b"still here").unwrap();
    let mut got = [0u8; 10];
    good.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    // The host end closes: the guest hears it and resets its side.
    drop(good);
    assert!(
        vm.wait_line("vsock: shutdown by host 1024", Duration::from_secs(10)),
        "{:?}",
        vm.lines()
    );
}

#[test]
fn at_most_1023_connections() {
    // SAFETY: raising our own soft descriptor limit to the hard one.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let vm = Vm::start("", |_| {});
    let mut conns: Vec<UnixStream> = (0..1023).map(|_| vm.connect(ECHO).0).collect();
    let mut s = vm.raw();
    s.write_all(b"CONNECT 1024\n").unwrap();
    assert_eq!(read_line(&mut s), "", "connection 1024 was accepted");
    // One closes; once ember and the guest have let it go, a new one fits.
    conns.pop();
    let start = Instant::now();
    loop {
        let mut s = vm.raw();
        s.write_all(b"CONNECT 1024\n").unwrap();
        if read_line(&mut s).starts_with("OK ") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no room after a close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_vsock_configs_exit_152() {
    let dir = TempDir::new("vsock-cfg");
    let file = dir.path("regular");
    std::fs::write(&file, b"x").unwrap();
    for (vsock, want) in [
        (
            r#"{"guest_cid": 3, "uds_path": ""}"#.to_string(),
            "uds_path must not be empty",
        ),
        (
            format!(r#"{{"guest_cid": 3, "uds_path": "/{}"}}"#, "a".repeat(120)),
            "at most 107",
        ),
        (
            format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, file.display()),
            "is not a socket",
        ),
    ] {
        let config = guest_config("console=ttyS0", 1, 64, &format!(r#""vsock": {vsock}"#));
        let out = run_config(&config, &[], Duration::from_secs(30));
        assert_eq!(out.code, Some(152), "{vsock}\n{out:#?}");
        assert!(
            out.stderr.contains(want),
            "{vsock}: want {want:?}\n{}",
            out.stderr
        );
    }
}

/// One API request with curl; returns (status, body).
fn curl(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-S",
            "--unix-socket",
            sock.to_str().unwrap(),
            "-X",
            method,
        ])
        .args([
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
        ])
        .args(if body.is_empty() {
            vec![]
        } else {
            vec!["-d", body]
        })
        .arg(format!("http://localhost{path}"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn put_vsock_through_the_api() {
    let dir = TempDir::new("vsock-api");
    let api = dir.path("api.sock");
    let uds = dir.path("v.sock");
    let file = dir.path("regular");
    std::fs::write(&file, b"x").unwrap();
    let mut child = spawn(&["--api-sock", api.to_str().unwrap()]);
    let start = Instant::now();
    while UnixStream::connect(&api).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let put = |body: &str| curl(&api, "PUT", "/vsock", body);
    // A reserved CID is accepted, as Firecracker accepts it (firecracker-containerd sends
    // 0); ember warns. A later PUT replaces the device before the boot.
    let (code, msg) = put(r#"{"guest_cid": 1, "uds_path": "/tmp/v"}"#);
    assert_eq!(code, 204, "{msg}");
    let (code, msg) = put(&format!(
        r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
        file.display()
    ));
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("is not a socket"), "{msg}");
    // A stale socket file is fine: ember replaces it.
    drop(UnixListener::bind(&uds).unwrap());
    let body = format!(
        r#"{{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "{}"}}"#,
        uds.display()
    );
    assert_eq!(put(&body).0, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 ember_test=vsock"}}"#,
        guest()
    );
    assert_eq!(curl(&api, "PUT", "/boot-source", &boot).0, 204);
    let (code, config) = curl(&api, "GET", "/vm/config", "");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(v["vsock"]["guest_cid"], 3, "{config}");
    assert_eq!(v["vsock"]["uds_path"], uds.to_str().unwrap(), "{config}");
    let (code, msg) = curl(
        &api,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(code, 204, "{msg}");
    // The guest needs a moment to set up its driver: retry until it accepts.
    let start = Instant::now();
    let mut s = loop {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        if read_line(&mut s).starts_with("OK ") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest never accepted"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    s.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let (code, msg) = put(&body);
    assert_eq!(code, 400, "{msg}");
    let _ = child.kill();
    let _ = child.wait();
    drop(dir);
}

#[test]
fn out_of_descriptors_pauses_accepting_without_spinning() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("vsock-emfile");
    let uds = dir.path("v.sock");
    let config = guest_config(
        "console=ttyS0 ember_test=vsock",
        1,
        128,
        &format!(
            r#""vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
            uds.display()
        ),
    );
    let cfg = dir.path("vm.json");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = std::process::Command::new(EMBER);
    cmd.args(["--no-api", "--config-file", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("stderr")).unwrap());
    // SAFETY: setrlimit is async-signal-safe; it limits only the child about to exec.
    unsafe {
        cmd.pre_exec(|| {
            // ember itself needs about 30 descriptors: room for a dozen connections.
            let l = libc::rlimit {
                rlim_cur: 44,
                rlim_max: 44,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Connect until one gets no OK: ember is out of descriptors.
    let start = Instant::now();
    let mut open = Vec::new();
    let waiting = loop {
        assert!(start.elapsed() < Duration::from_secs(60), "never ran out");
        let Ok(mut s) = UnixStream::connect(&uds) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        s.write_all(b"CONNECT 1024\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 3];
        match s.read_exact(&mut b) {
            Ok(()) if &b == b"OK " => {
                read_line(&mut s);
                open.push(s);
            }
            Ok(()) => panic!("unexpected reply {b:?}"),
            // Before the guest is up the connection is refused (reset); after, no answer.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(_) if !open.is_empty() => break s,
            Err(_) => {}
        }
    };
    assert!(
        open.len() >= 5,
        "only {} connections before running out",
        open.len()
    );
    // The event loop retries every 100 ms instead of spinning on a listener that stays
    // readable (every failed accept logs a line; spinning logs thousands a second).
    std::thread::sleep(Duration::from_secs(1));
    let failed = std::fs::read_to_string(dir.path("stderr"))
        .unwrap()
        .matches("cannot accept a host connection")
        .count();
    assert!(
        (1..40).contains(&failed),
        "{failed} failed accepts in about 1 s"
    );
    // Descriptors come back: the waiting connection is served.
    open.truncate(open.len() - 3);
    let mut s = waiting;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(read_line(&mut s).starts_with("OK "));
    let _ = child.kill();
    let _ = child.wait();
    drop(dir);
}
