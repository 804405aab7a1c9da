//! Churn: VM lifecycles one after the other, jailed ones, and many VMs at once; after
//! each phase nothing ember made may be left on the host: no TAP it created, jail
//! directory, cgroup, API socket file, zombie or stray process, no mount, and the host's
//! count of open files (/proc/sys/fs/file-nr) back where it started.
//!
//! Every lifecycle is the test guest (`ember_test=blk`) with a drive and a TAP, booted
//! from a config file with the API socket up; the guest resets, or is stopped through
//! the API or by SIGTERM. Failing starts (an interface that is no TAP after ember created
//! a TAP; a jailed drive that does not exist) follow each phase's timed runs, as every
//! exit path must clean up. The suite runs a few dozen lifecycles;
//! `tools/churn` runs the full counts (1,000 sequential, 200 jailed, 50 at once) on a
//! release build through the same test, with these variables:
//! `EMBER_CHURN_SEQUENTIAL`, `EMBER_CHURN_JAILED`, `EMBER_CHURN_PARALLEL`.
//! Each phase prints one `churn: ...` line with its rate (lifecycles per second).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Against hangs only: one lifecycle took over 60 s once with the load average at 66.
const T: Duration = Duration::from_secs(180);
/// What the jailed VMM runs as (as in tests/jail.rs).
const UID: u32 = 12345;
const GID: u32 = 23456;
const BAD_CONFIGURATION: i32 = ember::exit_code::BAD_CONFIGURATION;

fn count(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{var}=`{v}` is not a number")),
        Err(_) => default,
    }
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace the calling thread enters (children it spawns start in it);
/// left and deleted on drop. ember runs in it so the TAPs it creates are easy to count
/// and a failed run leaves nothing in the host's namespace.
struct NetNs {
    name: String,
    host: File,
}

impl NetNs {
    fn enter(name: String) -> NetNs {
        sh("ip", &["netns", "add", &name]);
        let host = File::open("/proc/thread-self/ns/net").expect("own netns");
        let ns = File::open(format!("/var/run/netns/{name}")).expect("open netns");
        // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let ns = NetNs { name, host };
        sh("ip", &["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// The interfaces in the namespace.
    fn links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // SAFETY: back to the namespace this thread came from, a descriptor we own.
        unsafe { libc::setns(self.host.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The least the open-file count may be off after a phase. On a shared host other
/// processes move it by hundreds within seconds (seen: +400 for over 10 s while other
/// test suites built), so the suite's few dozen lifecycles only catch a large leak here;
/// the exact checks (processes, TAPs, jails, cgroups, sockets, mounts, this process's
/// descriptors) do not depend on it. `tools/churn` sets 200, where 1,000 lifecycles make
/// a leak of one file each stand out; on an idle host 0 makes the check tight.
fn file_slack() -> i64 {
    count("EMBER_CHURN_FILE_SLACK", 1000) as i64
}

fn file_nr() -> i64 {
    let s = std::fs::read_to_string("/proc/sys/fs/file-nr").expect("file-nr");
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("file-nr format")
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

fn mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .count()
}

/// Processes whose command line holds `marker` (every ember this test starts has it in
/// its `--id`), and zombies among this process's children.
fn leftover_processes(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so split after its `)`.
        let mut f = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .unwrap_or("")
            .split_whitespace();
        let (state, ppid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        if cmdline.contains(marker) || (state == "Z" && ppid == me) {
            found.push(format!("{name} {state} {}", stat.trim()));
        }
    }
    found
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What the host looked like before a phase.
struct Baseline {
    file_nr: i64,
    own_fds: usize,
    mounts: usize,
    links: Vec<String>,
}

/// The whole test's state: namespace, scratch space, names.
struct Churn {
    ns: NetNs,
    dir: TempDir,
    /// In every ember's `--id`: how stray processes are found.
    marker: String,
    /// The parent cgroup of the jailed VMs (v1 pids hierarchy).
    cgroup: PathBuf,
    base: PathBuf,
    sockets: PathBuf,
    /// A TAP for the jailed VMs (they run unprivileged and cannot create one).
    jail_tap: String,
    tag: u32,
}

impl Churn {
    fn new() -> Churn {
        let tag = std::process::id() % 100_000;
        let ns = NetNs::enter(format!("ember-churn-{tag}"));
        let dir = TempDir::new("churn");
        let base = dir.path("jails");
        std::fs::create_dir(&base).expect("base dir");
        let sockets = dir.path("sockets");
        std::fs::create_dir(&sockets).expect("socket dir");
        let jail_tap = format!("cj{tag}");
        sh(
            "ip",
            &[
                "tuntap",
                "add",
                "dev",
                &jail_tap,
                "mode",
                "tap",
                "user",
                &UID.to_string(),
                "group",
                &GID.to_string(),
            ],
        );
        sh("ip", &["link", "set", &jail_tap, "up"]);
        Churn {
            ns,
            marker: format!("churnvm-{tag}-"),
            cgroup: PathBuf::from(format!("/sys/fs/cgroup/pids/ember-churn-{tag}")),
            base,
            sockets,
            jail_tap,
            dir,
            tag,
        }
    }

    fn baseline(&self) -> Baseline {
        // The lowest of a few samples: other processes on the host open and close files.
        let file_nr = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                file_nr()
            })
            .min()
            .unwrap_or(0);
        Baseline {
            file_nr,
            own_fds: own_fds(),
            mounts: mounts(),
            links: self.ns.links(),
        }
    }

    /// A drive image for VM slot `slot`, writable by the jailed uid.
    fn image(&self, slot: usize) -> PathBuf {
        let p = self.dir.path(&format!("disk{slot}.img"));
        if !p.exists() {
            std::fs::write(&p, vec![0u8; 64 * 512]).expect("image");
            std::os::unix::fs::chown(&p, Some(UID), Some(GID)).expect("chown image");
        }
        p
    }

    fn config(&self, name: &str, mode: &str, image: &Path, tap: &str) -> PathBuf {
        let path = self.dir.path(&format!("{name}.json"));
        let json = guest_config(
            &format!("console=ttyS0 ember_test={mode}"),
            1,
            32,
            &format!(
                r#""drives": [{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}],
                   "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}}]"#,
                image.display()
            ),
        );
        std::fs::write(&path, json).expect("config");
        path
    }

    /// Checks that the host is back to `before`; `lifecycles` sets how far the open-file
    /// count may be off (other processes on the host move it too; a leak of one file per
    /// lifecycle must show).
    fn check_clean(&self, phase: &str, before: &Baseline, lifecycles: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // Processes are reaped and TAPs go with their last descriptor, but the kernel frees
        // files and cgroups a little later: poll.
        loop {
            let stray = leftover_processes(&self.marker);
            let links = self.ns.links();
            let jails = entries(&self.base.join("ember"));
            let cgroups = subdirs(&self.cgroup);
            let socks = entries(&self.sockets);
            let fds = own_fds();
            let mnt = mounts();
            let files = file_nr();
            let slack = (lifecycles as i64 / 2).max(file_slack());
            let clean = stray.is_empty()
                && links == before.links
                && jails.is_empty()
                && cgroups.is_empty()
                && socks.is_empty()
                && fds == before.own_fds
                && mnt <= before.mounts
                && files <= before.file_nr + slack;
            if clean {
                println!(
                    "churn: {phase}: clean (open files {} before, {files} after)",
                    before.file_nr
                );
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{phase}: left behind: processes {stray:#?}, links {links:?} (before \
                     {:?}), jails {jails:?}, cgroups {cgroups:?}, sockets {socks:?}, own fds \
                     {fds} (before {}), mounts {mnt} (before {}), open files {files} (before \
                     {}, slack {slack})",
                    before.links, before.own_fds, before.mounts, before.file_nr
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One lifecycle: boot from a config file with the API up, the guest checks its disk
    /// and resets, ember exits 0 and removes its socket (and the TAP it created).
    fn sequential(&self, i: usize, config: &Path) {
        let sock = self.sockets.join(format!("s{i}.sock"));
        let id = format!("{}s{i}", self.marker);
        let o = wait(
            spawn(&[
                "--id",
                &id,
                "--api-sock",
                sock.to_str().unwrap(),
                "--config-file",
                config.to_str().unwrap(),
            ]),
            T,
        );
        check_guest(&o, &format!("lifecycle {i}"));
    }

    /// A lifecycle that fails at start: the second interface is `lo`, no TAP, after ember
    /// created the first one. The socket and that TAP must go all the same.
    fn sequential_failing(&self, i: usize, image: &Path) {
        let tap = format!("cf{}x{i}", self.tag);
        let path = self.dir.path("fail.json");
        let json = guest_config(
            "console=ttyS0 ember_test=blk",
            1,
            32,
            &format!(
                r#""drives": [{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false}}],
                   "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}},
                                          {{"iface_id": "eth1", "host_dev_name": "lo"}}]"#,
                image.display()
            ),
        );
        std::fs::write(&path, json).expect("config");
        let sock = self.sockets.join(format!("f{i}.sock"));
        let id = format!("{}f{i}", self.marker);
        let o = wait(
            spawn(&[
                "--id",
                &id,
                "--api-sock",
                sock.to_str().unwrap(),
                "--config-file",
                path.to_str().unwrap(),
            ]),
            T,
        );
        assert_eq!(
            o.code,
            Some(BAD_CONFIGURATION),
            "failing lifecycle {i}\n{o:#?}"
        );
        assert!(o.stderr.contains("`lo` cannot be used as a TAP"), "{o:#?}");
    }

    fn jailed(&self, i: usize, config: &Path) {
        let id = format!("{}j{i}", self.marker);
        let mut args = vec![
            "--jail".to_string(),
            "--id".into(),
            id.clone(),
            "--uid".into(),
            UID.to_string(),
            "--gid".into(),
            GID.to_string(),
            "--chroot-base-dir".into(),
            self.base.display().to_string(),
            "--netns".into(),
            self.ns.path().display().to_string(),
            "--cgroup".into(),
            "pids.max=64".into(),
            "--parent-cgroup".into(),
            self.cgroup
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            "--api-sock".into(),
            "/run/api.sock".into(),
            "--config-file".into(),
            config.display().to_string(),
        ];
        // Every other one is PID 1 of its own PID namespace.
        if i % 2 == 1 {
            args.push("--new-pid-ns".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = wait(spawn(&args), T);
        if config == self.missing_drive_config() {
            // The drive cannot be put in the jail: the jail was built, and must go again.
            assert_eq!(o.code, Some(BAD_CONFIGURATION), "jailed {i}\n{o:#?}");
            assert!(o.stderr.contains("cannot put"), "{o:#?}");
        } else {
            check_guest(&o, &format!("jailed lifecycle {i}"));
        }
    }

    /// A jailed VM whose drive does not exist.
    fn missing_drive_config(&self) -> PathBuf {
        self.dir.path("missing.json")
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.jail_tap])
            .status();
        // After a failed check, what the jails left too.
        for leaf in subdirs(&self.cgroup) {
            let _ = std::fs::remove_dir(self.cgroup.join(leaf));
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn check_guest(o: &Outcome, what: &str) {
    assert!(!o.timed_out, "{what} timed out\n{o:#?}");
    assert_eq!(o.code, Some(0), "{what}\n{o:#?}");
    assert!(o.has_line("blk: readback ok"), "{what}\n{o:#?}");
    assert!(o.has_line("ember-test-guest: done"), "{what}\n{o:#?}");
}

/// `PUT /actions` with `action_type` over the socket; returns the status code.
fn action(sock: &Path, action_type: &str) -> u16 {
    let mut s = UnixStream::connect(sock).expect("connect to the API");
    s.set_read_timeout(Some(T)).expect("timeout");
    let body = format!(r#"{{"action_type": "{action_type}"}}"#);
    let req = format!(
        "PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read status");
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn rate(phase: &str, n: usize, elapsed: Duration) {
    println!(
        "churn: {phase}: {n} lifecycles in {:.2} s: {:.1} lifecycles/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
}

/// A running VM of the parallel phase: its stdout lines come over a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    sock: PathBuf,
}

/// A check that fails must not leave the other VMs looping: kill and reap them.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Running {
    fn wait_line(&self, want: &str) {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.trim_end() == want => return,
                Ok(_) => {}
                Err(e) => panic!("no `{want}` from VM {}: {e:?}", self.child.id()),
            }
        }
    }
}

#[test]
fn churn_leaves_nothing_behind() {
    let sequential = count("EMBER_CHURN_SEQUENTIAL", 30);
    let jailed = count("EMBER_CHURN_JAILED", 10);
    let parallel = count("EMBER_CHURN_PARALLEL", 10);
    let c = Churn::new();

    // Sequential: each lifecycle gets a TAP of its own name, which ember creates.
    let before = c.baseline();
    let image = c.image(0);
    let start = Instant::now();
    for i in 0..sequential {
        let tap = format!("cs{}x{i}", c.tag);
        let config = c.config("seq", "blk", &image, &tap);
        c.sequential(i, &config);
    }
    rate("sequential", sequential, start.elapsed());
    // Failing starts (not in the rate): every exit path must clean up.
    let failing = sequential.div_ceil(10);
    for i in 0..failing {
        c.sequential_failing(i, &image);
    }
    c.check_clean("sequential", &before, sequential + failing);

    // Jailed: in the namespace, cgroup and TAP made for them.
    let before = c.baseline();
    let config = c.config("jail", "blk", &c.image(0), &c.jail_tap);
    let start = Instant::now();
    for i in 0..jailed {
        c.jailed(i, &config);
    }
    rate("jailed", jailed, start.elapsed());
    let missing = c.config(
        "missing",
        "blk",
        &c.dir.path("no-such-disk.img"),
        &c.jail_tap,
    );
    assert_eq!(missing, c.missing_drive_config());
    let failing = jailed.div_ceil(10);
    for i in 0..failing {
        c.jailed(jailed + i, &missing);
    }
    c.check_clean("jailed", &before, jailed + failing);

    // Parallel: all VMs run at the same time (each guest loops until stopped).
    let before = c.baseline();
    let start = Instant::now();
    let mut vms = Vec::new();
    for i in 0..parallel {
        let tap = format!("cp{}x{i}", c.tag);
        let config = c.config(&format!("par{i}"), "blk,counter", &c.image(i + 1), &tap);
        let sock = c.sockets.join(format!("p{i}.sock"));
        let id = format!("{}p{i}", c.marker);
        let mut child = spawn(&[
            "--id",
            &id,
            "--api-sock",
            sock.to_str().unwrap(),
            "--config-file",
            config.to_str().unwrap(),
        ]);
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Nobody reads stderr otherwise; a full pipe must not stall ember.
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
        });
        vms.push(Running { child, lines, sock });
    }
    for vm in &vms {
        vm.wait_line("tick 0");
    }
    // All of them up at once: one TAP each besides what was there.
    let links = c.ns.links();
    assert_eq!(
        links.len(),
        before.links.len() + parallel,
        "{parallel} VMs running: {links:?}"
    );
    // Half of them stop through the guest (Ctrl-Alt-Del, then a reset), half by SIGTERM.
    for (i, vm) in vms.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(action(&vm.sock, "SendCtrlAltDel"), 204);
        } else {
            send_signal(&vm.child, libc::SIGTERM);
        }
    }
    for (i, mut vm) in vms.into_iter().enumerate() {
        let want = if i % 2 == 0 {
            vm.wait_line("ctrl-alt-del: received");
            0
        } else {
            128 + libc::SIGTERM
        };
        let deadline = Instant::now() + T;
        let status = loop {
            if let Some(s) = vm.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = vm.child.kill();
                panic!("VM {} did not exit when stopped", vm.child.id());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(status.code(), Some(want), "VM {}", vm.child.id());
    }
    rate("parallel", parallel, start.elapsed());
    c.check_clean("parallel", &before, parallel);
}
