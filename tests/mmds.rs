//! The metadata service end to end: the API (`/mmds`, `/mmds/config`, `--metadata`,
//! `--mmds-size-limit`) and the test guest's ARP + TCP + HTTP client (`ember_test=mmds`)
//! fetching metadata over a virtio-net interface whose TAP lives in a network namespace
//! of the test's own; an AF_PACKET socket on each TAP records what reaches the host.

mod common;

use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(90);
const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

const METADATA: &str = r#"{"latest": {"meta-data": {
    "ami-id": "ami-12345678",
    "network": {"interfaces": {"macs": {"02:29:96:8f:6a:2d": {"device-number": "13345342"}}}},
    "placement": {"availability-zone": "us-east-1a"}}}}"#;

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted (with its TAPs) on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> NetNs {
        let name = unique("ember-mmds-");
        run("ip", &["netns", "add", &name]);
        NetNs { name }
    }

    fn add_tap(&self) -> String {
        let tap = unique("em");
        assert!(tap.len() <= 15, "{tap}");
        for args in [
            &["ip", "tuntap", "add", "dev", &tap, "mode", "tap"][..],
            &["ip", "link", "set", &tap, "up"][..],
        ] {
            let mut all = vec!["netns", "exec", &self.name];
            all.extend_from_slice(args);
            run("ip", &all);
        }
        tap
    }

    fn spawn_ember(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, EMBER])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember")
    }

    /// Records every frame the guest sends out of `ifname` until dropped.
    fn capture(&self, ifname: &str) -> Capture {
        let path = format!("/var/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on an fd we own; affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let fd = packet_socket(&ifname);
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                    continue;
                }
                // SAFETY: recv into our own buffer of its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    f.lock().unwrap().push(buf[..n as usize].to_vec());
                }
            }
        });
        ready_rx.recv().expect("capture ready");
        Capture {
            frames,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Frames the guest sent on one TAP (host side: outgoing packets of the interface).
struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("capture thread");
        }
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: we own the new fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    assert!(ifindex > 0, "no interface {ifname}");
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: proto,
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: bind with a sockaddr_ll of its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

fn is_arp_for(f: &[u8], ip: [u8; 4]) -> bool {
    f.len() >= 42 && f[12..14] == [8, 6] && f[38..42] == ip
}

fn is_ipv4_to(f: &[u8], ip: [u8; 4]) -> bool {
    f.len() >= 34 && f[12..14] == [8, 0] && f[30..34] == ip
}

fn iface(id: &str, tap: &str) -> String {
    format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}"}}"#)
}

fn lines_with(o: &Outcome, prefix: &str) -> Vec<String> {
    o.stdout
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.trim_end().to_string())
        .collect()
}

#[test]
fn v1_listings_json_patch_and_other_traffic() {
    let ns = NetNs::new();
    let (tap0, tap1) = (ns.add_tap(), ns.add_tap());
    let (cap0, cap1) = (ns.capture(&tap0), ns.capture(&tap1));
    let dir = TempDir::new("mmds");
    let meta = dir.path("meta.json");
    std::fs::write(&meta, METADATA).unwrap();
    let cfg = dir.path("vm.json");
    let config = guest_config(
        "console=ttyS0 ember_test=mmds mmds_script=v1",
        1,
        128,
        &format!(
            r#""network-interfaces": [{}, {}],
               "mmds-config": {{"network_interfaces": ["eth0"]}}"#,
            iface("eth0", &tap0),
            iface("eth1", &tap1)
        ),
    );
    std::fs::write(&cfg, config).unwrap();
    let sock = dir.path("api.sock");
    let mut child = ns.spawn_ember(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
    ]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    let waiting = read_until(&mut out, T, |l| {
        seen.push(l.to_string());
        l == "mmds: waiting for patch"
    });
    assert!(
        waiting.is_some(),
        "guest never waited for the patch: {seen:#?}"
    );
    wait_for_socket(&sock, T);
    let patch = r#"{"latest": {"meta-data": {"patched": "yes"}}}"#;
    assert_eq!(curl(&sock, "PATCH", "/mmds", Some(patch)).0, 204);
    let rest = {
        let mut rest = Vec::new();
        read_until(&mut out, T, |l| {
            rest.push(l.to_string());
            l == "ember-test-guest: done"
        });
        rest
    };
    // The API keeps ember alive after the guest ends: stop it.
    let _ = child.kill();
    let _ = child.wait();
    let all: Vec<String> = seen.into_iter().chain(rest).collect();
    let o = Outcome {
        code: Some(0),
        stdout: all.join("\n"),
        stderr: String::new(),
        timed_out: false,
    };
    assert_eq!(
        lines_with(&o, "mmds: "),
        [
            "mmds: device 0xd0001000",
            "mmds: arp 06:01:23:45:67:01",
            "mmds: listing -> 200 ami-id|network/|placement/",
            "mmds: key -> 200 ami-12345678",
            "mmds: nested -> 200 13345342",
            r#"mmds: json -> 200 {"availability-zone":"us-east-1a"}"#,
            "mmds: missing -> 404 Resource not found: /latest/nope.",
            "mmds: waiting for patch",
            "mmds: patched -> 200 yes",
            "mmds: sent udp to 169.254.169.253",
            "mmds: device 0xd0002000",
            "mmds: no arp reply",
        ],
        "{o:#?}"
    );
    assert!(o.has_line("ember-test-guest: done"), "{o:#?}");
    let f0 = cap0.finish();
    let f1 = cap1.finish();
    // Nothing for the MMDS reached the TAP of the MMDS interface; other traffic did.
    assert!(
        !f0.iter()
            .any(|f| is_arp_for(f, MMDS_IP) || is_ipv4_to(f, MMDS_IP)),
        "an MMDS frame reached the TAP"
    );
    assert!(
        f0.iter().any(|f| is_ipv4_to(f, [169, 254, 169, 253])
            && f.windows(16).any(|w| w == b"ember-mmds-other")),
        "the UDP frame to another address did not reach the TAP ({} frames)",
        f0.len()
    );
    // The interface without MMDS passed the ARP request on, unanswered.
    assert!(
        f1.iter().any(|f| is_arp_for(f, MMDS_IP)),
        "the second interface's ARP request did not reach its TAP"
    );
}

#[test]
fn v2_token_flow_at_another_address() {
    let ns = NetNs::new();
    let tap = ns.add_tap();
    let cap = ns.capture(&tap);
    let dir = TempDir::new("mmds");
    let meta = dir.path("meta.json");
    std::fs::write(&meta, METADATA).unwrap();
    let cfg = dir.path("vm.json");
    let config = guest_config(
        "console=ttyS0 ember_test=mmds mmds_script=v2 mmds_ip=169.254.170.2",
        1,
        128,
        &format!(
            r#""network-interfaces": [{}],
               "mmds-config": {{"version": "V2", "network_interfaces": ["eth0"],
                                "ipv4_address": "169.254.170.2"}}"#,
            iface("eth0", &tap)
        ),
    );
    std::fs::write(&cfg, config).unwrap();
    let child = ns.spawn_ember(&[
        "--no-api",
        "--config-file",
        cfg.to_str().unwrap(),
        "--metadata",
        meta.to_str().unwrap(),
    ]);
    let o = wait(child, T);
    o.assert_ok();
    assert_eq!(
        lines_with(&o, "mmds: "),
        [
            "mmds: device 0xd0001000",
            "mmds: arp 06:01:23:45:67:01",
            "mmds: no token -> 401 No MMDS token provided. Use `X-metadata-token` or \
             `X-aws-ec2-metadata-token` header to specify the session token.",
            "mmds: token 1s -> 200 (token)",
            "mmds: with token -> 200 ami-12345678",
            "mmds: wrong token -> 401 MMDS token not valid.",
            "mmds: expired token -> 401 MMDS token not valid.",
            "mmds: ec2 header -> 200 ami-id|network/|placement/",
            "mmds: keep-alive 1 -> 200 ami-12345678",
            "mmds: keep-alive 2 -> 200 ami-12345678",
        ],
        "{o:#?}"
    );
    let frames = cap.finish();
    let ip = [169, 254, 170, 2];
    assert!(
        !frames
            .iter()
            .any(|f| is_arp_for(f, ip) || is_ipv4_to(f, ip)),
        "an MMDS frame reached the TAP"
    );
}

#[test]
fn api_store_config_and_limits() {
    let dir = TempDir::new("mmds");
    let sock = dir.path("api.sock");
    let mut child = spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--mmds-size-limit",
        "100",
    ]);
    wait_for_socket(&sock, T);
    assert_eq!(curl(&sock, "GET", "/mmds", None), (200, "null".into()));
    let (s, b) = curl(&sock, "PATCH", "/mmds", Some(r#"{"a": "b"}"#));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("The MMDS data store is not initialized."), "{b}");
    assert_eq!(
        curl(&sock, "PUT", "/mmds", Some(r#"{"a": {"b": "c"}, "d": 1}"#)).0,
        204
    );
    assert_eq!(
        curl(
            &sock,
            "PATCH",
            "/mmds",
            Some(r#"{"a": {"x": "y"}, "d": null}"#)
        )
        .0,
        204
    );
    assert_eq!(
        curl(&sock, "GET", "/mmds", None),
        (200, r#"{"a":{"b":"c","x":"y"}}"#.into())
    );
    let big = format!(r#"{{"k": "{}"}}"#, "v".repeat(100));
    let (s, b) = curl(&sock, "PUT", "/mmds", Some(&big));
    assert_eq!(s, 413, "{b}");
    assert!(b.contains("The MMDS patch request doesn't fit."), "{b}");
    assert_eq!(curl(&sock, "PATCH", "/mmds", Some(&big)).0, 413);
    assert_eq!(curl(&sock, "PUT", "/mmds", Some("{not json")).0, 400);
    let (s, b) = curl(
        &sock,
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"]}"#),
    );
    assert_eq!(s, 400);
    assert!(
        b.contains("does not correspond to any existing network interface"),
        "{b}"
    );
    let net = r#"{"iface_id": "eth0", "host_dev_name": "tap-mmds-x"}"#;
    assert_eq!(
        curl(&sock, "PUT", "/network-interfaces/eth0", Some(net)).0,
        204
    );
    let (s, b) = curl(
        &sock,
        "PUT",
        "/mmds/config",
        Some(r#"{"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}"#),
    );
    assert_eq!(s, 400);
    assert!(
        b.contains("The MMDS IPv4 address is not link local."),
        "{b}"
    );
    let cfg = r#"{"version": "V2", "network_interfaces": ["eth0"], "imds_compat": true}"#;
    assert_eq!(curl(&sock, "PUT", "/mmds/config", Some(cfg)).0, 204);
    let (s, b) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        v["mmds-config"],
        serde_json::json!({"version": "V2", "network_interfaces": ["eth0"], "imds_compat": true})
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bad_metadata_files_are_configuration_errors() {
    let dir = TempDir::new("mmds");
    let meta = dir.path("meta.json");
    std::fs::write(&meta, "{not json").unwrap();
    let sock = dir.path("api.sock");
    let m = meta.to_str().unwrap();
    let s = sock.to_str().unwrap();
    let o = wait(spawn(&["--api-sock", s, "--metadata", m]), T);
    assert_eq!(o.code, Some(ember::exit_code::BAD_CONFIGURATION), "{o:#?}");
    assert!(o.stderr.contains("not valid JSON"), "{o:#?}");
    std::fs::write(&meta, METADATA).unwrap();
    let o = wait(
        spawn(&["--api-sock", s, "--metadata", m, "--mmds-size-limit", "10"]),
        T,
    );
    assert_eq!(o.code, Some(ember::exit_code::BAD_CONFIGURATION), "{o:#?}");
    assert!(o.stderr.contains("--mmds-size-limit"), "{o:#?}");
}
