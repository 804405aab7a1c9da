//! virtio-net end to end: each test makes its own network namespace with a TAP in it,
//! runs ember inside (`ip netns exec`), and talks to the guest through an AF_PACKET
//! socket on the TAP. The test guest (`ember_test=net`) sends one broadcast frame of
//! ethertype 0x88b5 and reports the first such frame it receives.

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);
const ETHERTYPE: u16 = 0x88b5;
const GUEST_PING: &[u8] = b"ember-test-guest ping";
const BAD_CONFIGURATION: i32 = ember::exit_code::BAD_CONFIGURATION;

/// A network namespace, deleted (with the TAPs in it) on drop.
struct NetNs {
    name: String,
}

/// A name unique to this process and call: tests run in parallel, and in parallel with
/// other test binaries.
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

impl NetNs {
    fn new() -> NetNs {
        let name = unique("ember-net-");
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A TAP device that is up, named uniquely (at most 15 bytes).
    fn add_tap(&self) -> String {
        let tap = unique("et");
        assert!(tap.len() <= 15, "{tap}");
        self.exec(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap"]);
        self.exec(&["ip", "link", "set", &tap, "up"]);
        tap
    }

    /// `ip netns exec <ns> <prefix...> ember <args>` with stdout/stderr piped.
    fn spawn_ember(&self, prefix: &[&str], args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(prefix)
            .arg(EMBER)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ember")
    }

    /// Runs ember on `config` inside the namespace.
    fn run_ember(&self, config: &str, prefix: &[&str], timeout: Duration) -> Outcome {
        let dir = TempDir::new("net");
        let path = dir.path("vm.json");
        std::fs::write(&path, config).expect("write config");
        let p = path.to_string_lossy().into_owned();
        wait(
            self.spawn_ember(prefix, &["--no-api", "--config-file", &p]),
            timeout,
        )
    }

    /// An AF_PACKET socket for ethertype 0x88b5 on `ifname`, in this namespace.
    fn packet_socket(&self, ifname: &str) -> PacketSocket {
        let path = format!("/var/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        // setns changes only the calling thread's namespace; a socket keeps the namespace
        // it was created in, so it works from any thread afterwards.
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on an fd we own; affects only this short-lived thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            PacketSocket::open(&ifname)
        })
        .join()
        .expect("packet socket thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

fn sockaddr(ifindex: i32, dst: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = [0u8; 8];
    addr[..6].copy_from_slice(&dst);
    libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ETHERTYPE.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: addr,
    }
}

impl PacketSocket {
    fn open(ifname: &str) -> PacketSocket {
        let name = CString::new(ifname).expect("ifname");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: plain socket creation; the fd is owned right after.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETHERTYPE.to_be()),
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sa = sockaddr(ifindex, [0; 6]);
        // SAFETY: `sa` is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd, ifindex }
    }

    /// The next 0x88b5 frame, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) };
            if n <= 0 {
                continue;
            }
            // SAFETY: recv into a buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
    }

    fn send(&self, frame: &[u8]) {
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let sa = sockaddr(self.ifindex, dst);
        // SAFETY: the frame and `sa` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// A 60-byte 0x88b5 frame from the host to `dst`.
fn host_frame(dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(60.max(f.len()), 0);
    f
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).expect("hex"))
        .collect();
    m.copy_from_slice(&parts);
    m
}

fn iface_json(id: &str, tap: &str, mac: Option<&str>) -> String {
    match mac {
        Some(m) => {
            format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}", "guest_mac": "{m}"}}"#)
        }
        None => format!(r#"{{"iface_id": "{id}", "host_dev_name": "{tap}"}}"#),
    }
}

fn net_config(ifaces: &[String]) -> String {
    guest_config(
        "console=ttyS0 ember_test=net",
        1,
        128,
        &format!(r#""network-interfaces": [{}]"#, ifaces.join(", ")),
    )
}

/// Checks the guest's broadcast frame as the host got it; returns its source MAC.
fn check_guest_frame(f: &[u8]) -> [u8; 6] {
    assert_eq!(f.len(), 60, "{f:02x?}");
    assert_eq!(f[..6], [0xff; 6], "not broadcast: {f:02x?}");
    assert_eq!(f[12..14], ETHERTYPE.to_be_bytes());
    assert!(f[14..].starts_with(GUEST_PING), "{f:02x?}");
    assert!(f[14 + GUEST_PING.len()..].iter().all(|b| *b == 0));
    let mut src = [0u8; 6];
    src.copy_from_slice(&f[6..12]);
    src
}

/// Runs the guest with `ifaces` (TAP name, MAC) in `ns`; for each interface, takes the
/// guest's frame from the TAP and answers with a frame carrying `reply` + index.
fn exchange(ns: &NetNs, ifaces: &[(String, Option<&str>)]) -> (Outcome, Vec<[u8; 6]>) {
    let sockets: Vec<PacketSocket> = ifaces.iter().map(|(t, _)| ns.packet_socket(t)).collect();
    let json: Vec<String> = ifaces
        .iter()
        .enumerate()
        .map(|(i, (tap, mac))| iface_json(&format!("eth{i}"), tap, *mac))
        .collect();
    let dir = TempDir::new("net");
    let path = dir.path("vm.json");
    std::fs::write(&path, net_config(&json)).expect("write config");
    let p = path.to_string_lossy().into_owned();
    let child = ns.spawn_ember(&[], &["--no-api", "--config-file", &p]);
    // The guest runs its devices one after the other, each waiting up to 5 s for a reply.
    let mut macs = Vec::new();
    for (i, s) in sockets.iter().enumerate() {
        let Some(f) = s.recv(T) else {
            let o = wait(child, Duration::from_secs(1));
            panic!("no frame from the guest on interface {i}\n{o:#?}");
        };
        let src = check_guest_frame(&f);
        s.send(&host_frame(
            src,
            format!("ember-test-host pong {i}").as_bytes(),
        ));
        macs.push(src);
    }
    (wait(child, T), macs)
}

#[test]
fn guest_and_host_exchange_frames() {
    let ns = NetNs::new();
    let tap = ns.add_tap();
    let (o, macs) = exchange(&ns, &[(tap, Some("06:00:ac:10:00:02"))]);
    o.assert_ok();
    assert_eq!(macs, [[6, 0, 0xac, 0x10, 0, 2]]);
    assert!(o.has_line("net: device 0xd0001000"), "{o:#?}");
    assert!(o.has_line("net: mac=06:00:ac:10:00:02"), "{o:#?}");
    assert!(o.has_line("net: sent"), "{o:#?}");
    assert!(
        o.has_line("net: received 60 ember-test-host pong 0"),
        "{o:#?}"
    );
    assert!(o.has_line("ember-test-guest: done"), "{o:#?}");
}

#[test]
fn two_interfaces_one_with_a_generated_mac() {
    let ns = NetNs::new();
    let (tap0, tap1) = (ns.add_tap(), ns.add_tap());
    let (o, macs) = exchange(&ns, &[(tap0, Some("06:00:00:00:00:07")), (tap1, None)]);
    o.assert_ok();
    let cmdline = o
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_default();
    for want in [
        "virtio_mmio.device=4K@0xd0001000:5",
        "virtio_mmio.device=4K@0xd0002000:6",
    ] {
        assert!(cmdline.contains(want), "`{want}` not in `{cmdline}`");
    }
    // The generated MAC: locally administered unicast, what the guest read and used.
    let generated = macs[1];
    assert_eq!(generated[0] & 3, 2, "{generated:02x?}");
    let shown: Vec<[u8; 6]> = o
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("net: mac="))
        .map(|m| parse_mac(m.trim_end()))
        .collect();
    assert_eq!(shown, macs, "{o:#?}");
    assert_eq!(macs[0], [6, 0, 0, 0, 0, 7]);
    for i in 0..2 {
        let want = format!("net: received 60 ember-test-host pong {i}");
        assert!(o.has_line(&want), "missing `{want}`\n{o:#?}");
    }
}

#[test]
fn net_after_block_devices_takes_the_next_slot() {
    let ns = NetNs::new();
    let tap = ns.add_tap();
    let dir = TempDir::new("net-blk");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).expect("write image");
    let config = guest_config(
        "console=ttyS0 ember_test=net",
        1,
        128,
        &format!(
            r#""drives": [{{"drive_id": "d", "path_on_host": "{}", "is_root_device": false}}],
                "network-interfaces": [{}]"#,
            img.display(),
            iface_json("eth0", &tap, Some("06:00:00:00:00:01"))
        ),
    );
    let o = ns.run_ember(&config, &[], T);
    o.assert_ok();
    assert!(o.has_line("net: device 0xd0002000"), "{o:#?}");
    assert!(o.has_line("net: sent"), "{o:#?}");
}

#[test]
fn missing_tap_is_created() {
    let ns = NetNs::new();
    let tap = unique("en");
    let o = ns.run_ember(
        &net_config(&[iface_json("eth0", &tap, Some("06:00:00:00:00:01"))]),
        &[],
        T,
    );
    o.assert_ok();
    assert!(o.has_line("net: sent"), "{o:#?}");
    // Nobody answers on a TAP that is down.
    assert!(o.has_line("net: timeout"), "{o:#?}");
}

fn assert_bad_config(o: &Outcome, want: &str) {
    assert!(!o.timed_out, "{o:#?}");
    assert_eq!(o.code, Some(BAD_CONFIGURATION), "{o:#?}");
    assert!(o.stderr.contains(want), "`{want}` not in stderr\n{o:#?}");
    assert!(!o.stderr.contains("panicked"), "{o:#?}");
    assert!(!o.stdout.contains("ember-test-guest: hello"), "{o:#?}");
}

#[test]
fn tap_that_cannot_be_created_is_a_configuration_error() {
    let ns = NetNs::new();
    let tap = unique("en");
    // Root without CAP_NET_ADMIN (dropped from the bounding and inheritable sets, so
    // exec does not give it back) may not create a TAP.
    let o = ns.run_ember(
        &net_config(&[iface_json("eth0", &tap, None)]),
        &[
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
        ],
        T,
    );
    assert_bad_config(
        &o,
        &format!(
            "network interface `eth0`: TAP device `{tap}` does not exist and cannot be created"
        ),
    );
}

#[test]
fn interface_that_is_no_tap_is_a_configuration_error() {
    let ns = NetNs::new();
    let o = ns.run_ember(&net_config(&[iface_json("eth0", "lo", None)]), &[], T);
    assert_bad_config(&o, "`lo` cannot be used as a TAP device");
}

#[test]
fn invalid_mac_is_a_configuration_error() {
    let o = run_config(
        &net_config(&[iface_json("eth0", "tap0", Some("06:00:ac:10:00"))]),
        &[],
        T,
    );
    assert_bad_config(&o, "invalid MAC address `06:00:ac:10:00`");
    let o = run_config(
        &net_config(&[iface_json("eth0", "tap0", Some("01:00:5e:00:00:01"))]),
        &[],
        T,
    );
    assert_bad_config(&o, "guest_mac 01:00:5e:00:00:01 is a multicast address");
}

#[test]
fn duplicate_iface_id_is_a_configuration_error() {
    let o = run_config(
        &net_config(&[
            iface_json("eth0", "tap0", None),
            iface_json("eth0", "tap1", None),
        ]),
        &[],
        T,
    );
    assert_bad_config(
        &o,
        "network-interfaces[1].iface_id `eth0` is used by more than one network interface",
    );
}

#[test]
fn long_host_dev_name_is_a_configuration_error() {
    let o = run_config(
        &net_config(&[iface_json("eth0", "tap0123456789abc", None)]),
        &[],
        T,
    );
    assert_bad_config(&o, "host_dev_name `tap0123456789abc` is invalid");
}

/// The stripped Linux guest gets an address from dnsmasq over virtio-net (`ip=dhcp`).
#[test]
fn linux_guest_gets_a_dhcp_lease() {
    let (Ok(vmlinux), Ok(rootfs)) = (
        std::env::var("EMBER_VMLINUX"),
        std::env::var("EMBER_ROOTFS"),
    ) else {
        skip(
            "linux_guest_gets_a_dhcp_lease",
            "EMBER_VMLINUX or EMBER_ROOTFS not set (tools/test sets them from tools/build-guest)",
        );
        return;
    };
    let ns = NetNs::new();
    let tap = ns.add_tap();
    ns.exec(&["ip", "addr", "add", "192.168.77.1/24", "dev", &tap]);
    let dir = TempDir::new("dhcp");
    // The guest writes to its root: work on a copy.
    let root = dir.path("rootfs.ext4");
    std::fs::copy(&rootfs, &root).expect("copy rootfs");
    let leases = dir.path("leases");
    let leasefile = format!("--dhcp-leasefile={}", leases.display());
    let mut dnsmasq = Command::new("ip")
        .args(["netns", "exec", &ns.name, "dnsmasq", "--no-daemon"])
        .args([
            &format!("--interface={tap}"),
            "--bind-interfaces",
            "--except-interface=lo",
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--dhcp-range=192.168.77.50,192.168.77.59,255.255.255.0,1h",
            &leasefile,
            &format!("--pid-file={}", dir.path("dnsmasq.pid").display()),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dnsmasq (Debian package dnsmasq-base)");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _dnsmasq = Kill(&mut dnsmasq);
    let config = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{vmlinux}",
              "boot_args": "console=ttyS0 reboot=k panic=1 ip=dhcp"}},
            "drives": [{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true}}],
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}},
            "network-interfaces": [{}]}}"#,
        root.display(),
        iface_json("eth0", &tap, Some("06:00:c0:a8:4d:02"))
    );
    let dir2 = TempDir::new("dhcp-cfg");
    let cfg = dir2.path("vm.json");
    std::fs::write(&cfg, config).expect("write config");
    let cfg = cfg.to_string_lossy().into_owned();
    let mut child = ns.spawn_ember(&[], &["--no-api", "--config-file", &cfg]);
    // Lines go through a channel so a silent guest cannot block the test past its
    // deadline: about 30 s on an idle PVM host, but minutes when the two cores are busy.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut log = Vec::new();
    // Linux prints `IP-Config: Complete:` and then the lease on the next line.
    let mut complete_at = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        log.push(line.trim_end().to_string());
        if complete_at.is_none() && line.contains("IP-Config: Complete:") {
            complete_at = Some(log.len());
        }
        if complete_at.is_some_and(|i| log.len() >= i + 2) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = log.join("\n");
    let lease = complete_at
        .and_then(|i| log.lines().nth(i))
        .unwrap_or_default();
    assert!(
        log.contains("Sending DHCP requests")
            && lease.contains("hwaddr=06:00:c0:a8:4d:02")
            && lease.contains("ipaddr=192.168.77.5"),
        "no DHCP lease in the guest's log:\n{log}"
    );
}
