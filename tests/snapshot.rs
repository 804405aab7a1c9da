//! Snapshot and restore of real VMs: the test guest's `snap` mode keeps state the host
//! can follow (a counter in guest memory, a LAPIC timer's tick count, a virtio-blk queue
//! in use with a disk write sequence, a tag read from the serial input).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// An ember process serving the API, its console output collected as it arrives.
struct Ember {
    child: Child,
    sock: PathBuf,
    out: Arc<Mutex<String>>,
    stdin: Option<ChildStdin>,
}

impl Ember {
    fn start(dir: &TempDir, name: &str, config: Option<&Path>) -> Ember {
        let sock = dir.path(&format!("{name}.sock"));
        let mut cmd = Command::new(EMBER);
        cmd.arg("--api-sock").arg(&sock);
        if let Some(c) = config {
            cmd.arg("--config-file").arg(c);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ember");
        let out = collect_stdout(&mut child);
        let stdin = child.stdin.take();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < T, "ember's API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ember {
            child,
            sock,
            out,
            stdin,
        }
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        // The socket file appears at bind(), a moment before listen().
        let start = Instant::now();
        let mut s = loop {
            match UnixStream::connect(&self.sock) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < T => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("connect: {e}"),
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
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
        r.read_exact(&mut b).unwrap();
        (status, String::from_utf8_lossy(&b).into_owned())
    }

    fn ok(&self, method: &str, path: &str, body: &str) {
        let (status, answer) = self.request(method, path, body);
        assert_eq!(
            status,
            204,
            "{method} {path} {body}: {answer}\nconsole:\n{}",
            self.output()
        );
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the console has a complete `snap <n>` line with n >= `n`.
    fn wait_counter(&self, n: u64) -> Vec<Line> {
        let start = Instant::now();
        loop {
            let lines = snap_lines(&self.output());
            if lines.last().is_some_and(|l| l.n >= n) {
                return lines;
            }
            assert!(
                start.elapsed() < T,
                "no `snap {n}` line; console:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn snapshot(&self, state: &Path, mem: &Path) {
        self.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        self.ok(
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                state.display(),
                mem.display()
            ),
        );
    }

    fn load(&self, state: &Path, mem: &Path, resume: bool) {
        self.ok("PUT", "/snapshot/load", &load_body(state, mem, resume));
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": {resume}}}"#,
        state.display(),
        mem.display()
    )
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    n: u64,
    ticks: u64,
    disk: String,
    tag: String,
}

/// The complete `snap <n> ticks=<t> disk=<d> tag=<tag>` lines of a console.
fn snap_lines(out: &str) -> Vec<Line> {
    let complete = match out.rfind('\n') {
        Some(i) => &out[..i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("snap ")?;
            let mut it = rest.split(' ');
            let n = it.next()?.parse().ok()?;
            let ticks = it.next()?.strip_prefix("ticks=")?.parse().ok()?;
            let disk = it.next()?.strip_prefix("disk=")?.to_string();
            let tag = it.next().and_then(|t| t.strip_prefix("tag="))?.to_string();
            Some(Line {
                n,
                ticks,
                disk,
                tag,
            })
        })
        .collect()
}

fn snap_config(dir: &TempDir, vcpus: u32, mem_mib: u64, disk: Option<&Path>) -> PathBuf {
    let drives = disk
        .map(|d| {
            format!(
                r#""drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false}}]"#,
                d.display()
            )
        })
        .unwrap_or_default();
    let config = guest_config("console=ttyS0 ember_test=snap", vcpus, mem_mib, &drives);
    let path = dir.path("vm.json");
    std::fs::write(&path, config).unwrap();
    path
}

/// The console of the original run and of the restored one joined where the snapshot cut
/// them: the counter must go on by exactly one per line, with no line lost or repeated.
fn assert_continues(before: &str, after: &str) -> (Vec<Line>, Vec<Line>) {
    let joined = format!("{before}{after}");
    let all = snap_lines(&joined);
    for w in all.windows(2) {
        assert_eq!(
            w[1].n,
            w[0].n + 1,
            "the counter jumped\nbefore:\n{before}\nafter:\n{after}"
        );
        assert!(
            w[1].ticks >= w[0].ticks,
            "the timer's tick count went back\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    (snap_lines(before), all)
}

/// Boots the snap guest on 2 vCPUs with a disk, snapshots it mid-run, restores it in a
/// new ember process: counter, timer, disk queue and disk contents carry on exactly.
#[test]
fn restore_continues_exactly() {
    let dir = TempDir::new("snap-restore");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = snap_config(&dir, 2, 64, Some(&disk));
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));

    let first = Ember::start(&dir, "a", Some(&config));
    first.wait_counter(3);
    first.snapshot(&state, &mem);
    let before = first.output();
    drop(first);
    let last = snap_lines(&before).last().cloned().expect("a snap line");

    let second = Ember::start(&dir, "b", None);
    second.load(&state, &mem, true);
    second.wait_counter(last.n + 5);
    let (_, all) = assert_continues(&before, &second.output());
    let after: Vec<&Line> = all.iter().filter(|l| l.n > last.n).collect();
    assert!(after.len() >= 5, "{all:?}");
    for l in &all {
        assert_eq!(l.disk, "ok", "{all:?}");
    }
    // The timer still fires after the restore.
    let end = all.last().unwrap();
    assert!(end.ticks > last.ticks + 5, "timer stopped: {all:?}");
    // The disk holds the latest write of the restored guest.
    second.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let now = snap_lines(&second.output()).last().unwrap().n;
    assert_eq!(snap_sector(&disk, now), format!("snap {now}"));
    // The state file says what it holds: 2 vCPUs.
    let text = std::fs::read(&state).unwrap();
    let body = String::from_utf8_lossy(&text);
    assert!(body.contains(r#""vcpu_count":2"#), "{}", &body[..200]);
}

/// A drive whose ops limiter allows one request per 50 ms: every disk write of the snap
/// guest past the first waits for the limiter's timerfd. The restored guest's writes go on
/// only if the restored drive registered that timerfd again; its limiter starts from the
/// configuration the snapshot holds (nothing of the bucket is saved).
#[test]
fn rate_limited_drive_goes_on_after_restore() {
    let dir = TempDir::new("snap-limiter");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drives = format!(
        r#""drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false,
            "rate_limiter": {{"ops": {{"size": 1, "refill_time": 50}}}}}}]"#,
        disk.display()
    );
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config("console=ttyS0 ember_test=snap", 1, 64, &drives),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));

    let first = Ember::start(&dir, "a", Some(&config));
    first.wait_counter(3);
    first.snapshot(&state, &mem);
    let before = first.output();
    drop(first);
    let last = snap_lines(&before).last().cloned().expect("a snap line");

    let second = Ember::start(&dir, "b", None);
    second.load(&state, &mem, true);
    second.wait_counter(last.n + 5);
    let (_, all) = assert_continues(&before, &second.output());
    for l in &all {
        assert_eq!(l.disk, "ok", "{all:?}");
    }
    let (status, vm_config) = second.request("GET", "/vm/config", "");
    assert_eq!(status, 200, "{vm_config}");
    assert!(
        vm_config.contains(r#""refill_time": 50"#),
        "the restored drive lost its limiter: {vm_config}"
    );
}

/// Waits until the console has a whole line (one its newline ended) for which `pred`
/// holds; returns it.
fn wait_console(e: &Ember, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let out = e.output();
        let whole = out.rfind('\n').map_or("", |end| &out[..end]);
        if let Some(l) = whole.lines().find(|l| pred(l)) {
            return l.to_string();
        }
        assert!(start.elapsed() < T, "no {what} line; console:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to guest port `port` through the hybrid vsock socket at `uds` as Kata and
/// the Go SDK do (`CONNECT <port>\n`, then a line starting `OK `).
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap_or_else(|e| panic!("connect {uds:?}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 && s.read(&mut b).unwrap_or(0) == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    assert!(line.starts_with("OK "), "reply to CONNECT {port}: {line:?}");
    s
}

/// Writes `msg` and reads it back from the guest's echo port.
fn vsock_echo(s: &mut UnixStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// A VM with vsock: snapshotted with a host connection open, restored twice from the
/// same files. The restored guest gets the transport-reset event on its event queue and
/// drops the connection the old process held; new host-initiated connections work, on
/// `vsock_override`'s socket when one is given, else on the snapshot's `uds_path`.
#[test]
fn vsock_restore_resets_the_transport() {
    let dir = TempDir::new("snap-vsock");
    let uds = dir.path("a.vsock");
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config(
            "console=ttyS0 ember_test=vsock",
            1,
            128,
            &format!(
                r#""vsock": {{"guest_cid": 3, "uds_path": "{}"}}"#,
                uds.display()
            ),
        ),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));

    let a = Ember::start(&dir, "a", Some(&config));
    wait_console(&a, "vsock: ready", |l| l == "vsock: ready");
    let mut held = vsock_connect(&uds, 1024);
    vsock_echo(&mut held, b"before the snapshot");
    a.snapshot(&state, &mem);
    drop(a);
    // The old process is gone, and with it the host side of the connection.
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);

    // Restored with another socket path.
    let moved = dir.path("b.vsock");
    let b = Ember::start(&dir, "b", None);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}},
            "resume_vm": true, "vsock_override": {{"uds_path": "{}"}}}}"#,
        state.display(),
        mem.display(),
        moved.display()
    );
    b.ok("PUT", "/snapshot/load", &body);
    let reset = wait_console(&b, "transport reset", |l| {
        l.starts_with("vsock: transport reset")
    });
    assert_eq!(reset, "vsock: transport reset dropped=1 cid=3");
    let mut s = vsock_connect(&moved, 1024);
    vsock_echo(&mut s, b"after the restore");
    let mut again = vsock_connect(&moved, 1024);
    vsock_echo(&mut again, b"and once more");
    assert!(
        UnixStream::connect(&uds).is_err(),
        "the old uds_path still answers"
    );
    let (_, cfg) = b.request("GET", "/vm/config", "");
    assert!(cfg.contains("b.vsock") && !cfg.contains("a.vsock"), "{cfg}");
    // The one the guest dropped never reaches the new process either.
    drop(b);

    // Restored again from the same files, without an override: the snapshot's uds_path
    // (its stale socket file replaced) serves again.
    let c = Ember::start(&dir, "c", None);
    c.load(&state, &mem, true);
    wait_console(&c, "transport reset", |l| {
        l == "vsock: transport reset dropped=1 cid=3"
    });
    let mut s = vsock_connect(&uds, 1024);
    vsock_echo(&mut s, b"the old path works again");

    // An override for a snapshot without vsock, or a path a Unix socket cannot take.
    let plain = snap_config(&dir, 1, 32, None);
    let (ps, pm) = (dir.path("plain.state"), dir.path("plain.mem"));
    let d = Ember::start(&dir, "d", Some(&plain));
    d.wait_counter(1);
    d.snapshot(&ps, &pm);
    drop(d);
    let e = Ember::start(&dir, "e", None);
    for (over, want) in [
        (
            format!("{}", dir.path("x.vsock").display()),
            "no vsock device",
        ),
        (format!("/{}", "x".repeat(200)), "uds_path"),
    ] {
        let body = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "vsock_override": {{"uds_path": "{over}"}}}}"#,
            ps.display(),
            pm.display()
        );
        let (status, answer) = e.request("PUT", "/snapshot/load", &body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains(want), "want `{want}` in {answer}");
    }
}

/// A balloon VM (test guest mode `balloon`, statistics every second) inflated to 4 MiB,
/// snapshotted and restored: GET /balloon keeps the target, the statistics report keeps
/// the driver's `actual` and the guest's figures, the held statistics buffer comes back
/// (new statistics arrive), and a new target is followed: inflation goes on.
#[test]
fn balloon_restore_keeps_its_state_and_inflates_on() {
    let dir = TempDir::new("snap-balloon");
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config(
            "console=ttyS0 ember_test=balloon",
            1,
            64,
            r#""balloon": {"amount_mib": 4, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        ),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    wait_console(&a, "balloon: actual=1024", |l| l == "balloon: actual=1024");
    wait_console(&a, "balloon: stats=2", |l| l == "balloon: stats=2");
    a.snapshot(&state, &mem);
    let (_, stats_before) = a.request("GET", "/balloon/statistics", "");
    let before = a.output();
    drop(a);
    let last_stats = before
        .lines()
        .filter_map(|l| l.strip_prefix("balloon: stats="))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap();

    let b = Ember::start(&dir, "b", None);
    b.load(&state, &mem, true);
    let (status, balloon) = b.request("GET", "/balloon", "");
    assert_eq!(status, 200, "{balloon}");
    assert!(
        balloon.contains(r#""amount_mib":4"#)
            && balloon.contains(r#""stats_polling_interval_s":1"#),
        "{balloon}"
    );
    let (status, stats) = b.request("GET", "/balloon/statistics", "");
    assert_eq!(status, 200, "{stats}");
    for want in [
        r#""target_pages":1024"#,
        r#""actual_pages":1024"#,
        r#""total_memory":134217728"#,
    ] {
        assert!(
            stats.contains(want),
            "want {want} in {stats} (before: {stats_before})"
        );
    }
    // The held statistics buffer is handed back by the restored timer.
    let next = format!("balloon: stats={}", last_stats + 1);
    wait_console(&b, &next, |l| l == next);
    // A new target: the guest inflates on, and the report follows.
    b.ok("PATCH", "/balloon", r#"{"amount_mib": 8}"#);
    wait_console(&b, "balloon: actual=2048", |l| l == "balloon: actual=2048");
    let (_, balloon) = b.request("GET", "/balloon", "");
    assert!(balloon.contains(r#""amount_mib":8"#), "{balloon}");
    assert!(wait_for(T, Duration::from_millis(50), || {
        b.request("GET", "/balloon/statistics", "")
            .1
            .contains(r#""actual_pages":2048"#)
    }));
    // And back to empty: every page given up reads as zero in the restored process too.
    b.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    wait_console(&b, "balloon: deflated", |l| {
        l == "balloon: deflated=2048 zeroed=2048"
    });
}

/// An entropy device behind a rate limiter (one request per 200 ms) next to the snap
/// guest: restored, it keeps serving random bytes, each request held back by the
/// restored limiter until its timer fires, and GET /vm/config still names the limiter.
#[test]
fn entropy_device_serves_after_restore() {
    let dir = TempDir::new("snap-entropy");
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config(
            "console=ttyS0 ember_test=snap",
            1,
            64,
            r#""entropy": {"rate_limiter": {"ops": {"size": 1, "refill_time": 200}}}"#,
        ),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(3);
    a.snapshot(&state, &mem);
    let before = a.output();
    drop(a);
    let rng_lines = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("snap-rng "))
            .map(str::to_string)
            .collect()
    };
    assert!(!rng_lines(&before).is_empty(), "{before}");
    // The state file holds the limiter's bucket level.
    let body = String::from_utf8_lossy(&std::fs::read(&state).unwrap()).into_owned();
    assert!(
        body.contains(r#""Rng":{"limiter":{"bandwidth":null,"ops":{"budget""#),
        "{body}"
    );

    let b = Ember::start(&dir, "b", None);
    b.load(&state, &mem, true);
    let last = snap_lines(&before).last().unwrap().n;
    b.wait_counter(last + 5);
    let after = rng_lines(&b.output());
    assert!(after.len() >= 4, "{after:?}");
    for l in &after {
        assert!(
            l.ends_with(" len=16 differ=1"),
            "{after:?}\nbefore: {before}"
        );
    }
    let (_, cfg) = b.request("GET", "/vm/config", "");
    assert!(cfg.contains(r#""refill_time": 200"#), "{cfg}");
}

/// A console sent to a file (`serial.serial_out_path`) stays there after a restore: the
/// restored UART keeps the configured output instead of falling back to stdout.
#[test]
fn serial_output_file_is_kept_after_restore() {
    let dir = TempDir::new("snap-serial");
    let console = dir.path("console.out");
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config(
            "console=ttyS0 ember_test=snap",
            1,
            32,
            &format!(
                r#""serial": {{"serial_out_path": "{}"}}"#,
                console.display()
            ),
        ),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let last_in_file = || {
        let text = std::fs::read(&console).unwrap_or_default();
        snap_lines(&String::from_utf8_lossy(&text))
            .iter()
            .map(|l| l.n)
            .max()
    };
    let a = Ember::start(&dir, "a", Some(&config));
    assert!(wait_for(T, Duration::from_millis(20), || last_in_file()
        .is_some_and(|n| n >= 2)));
    a.snapshot(&state, &mem);
    drop(a);
    let last = last_in_file().unwrap();
    let b = Ember::start(&dir, "b", None);
    b.load(&state, &mem, true);
    assert!(
        wait_for(T, Duration::from_millis(20), || last_in_file()
            .is_some_and(|n| n >= last + 3)),
        "the restored console never reached {}: {:?}",
        console.display(),
        last_in_file()
    );
    assert!(snap_lines(&b.output()).is_empty(), "{}", b.output());
}

/// snapshot -> restore -> snapshot -> restore, the second restore resumed through the
/// API after loading paused.
#[test]
fn chain_of_snapshots() {
    let dir = TempDir::new("snap-chain");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = snap_config(&dir, 1, 64, Some(&disk));
    let (s1, m1) = (dir.path("1.state"), dir.path("1.mem"));
    let (s2, m2) = (dir.path("2.state"), dir.path("2.mem"));

    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(2);
    a.snapshot(&s1, &m1);
    let out_a = a.output();
    drop(a);

    let b = Ember::start(&dir, "b", None);
    b.load(&s1, &m1, false);
    // Loaded paused: nothing runs until Resumed.
    std::thread::sleep(Duration::from_millis(300));
    assert!(snap_lines(&b.output()).is_empty(), "{}", b.output());
    let (_, info) = b.request("GET", "/", "");
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    b.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let n = snap_lines(&out_a).last().unwrap().n;
    b.wait_counter(n + 3);
    b.snapshot(&s2, &m2);
    let out_b = b.output();
    drop(b);

    let c = Ember::start(&dir, "c", None);
    c.load(&s2, &m2, true);
    let m = snap_lines(&format!("{out_a}{out_b}")).last().unwrap().n;
    c.wait_counter(m + 3);
    let (_, all) = assert_continues(&format!("{out_a}{out_b}"), &c.output());
    assert!(all.iter().all(|l| l.disk == "ok"), "{all:?}");
    // GET /vm/config of the restored VM is the snapshot's configuration.
    let (_, cfg) = c.request("GET", "/vm/config", "");
    assert!(
        cfg.contains("ember_test=snap") && cfg.contains("disk.img"),
        "{cfg}"
    );
}

/// 50 clones of one snapshot run at once on one MAP_PRIVATE memory file: each gets its
/// own tag through its console and sees only its own memory writes (its counter and its
/// tag); the memory file is unchanged.
#[test]
fn fifty_clones_share_one_memory_file() {
    let dir = TempDir::new("snap-clones");
    let config = snap_config(&dir, 1, 32, None);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "orig", Some(&config));
    a.wait_counter(1);
    a.snapshot(&state, &mem);
    let base = snap_lines(&a.output()).last().unwrap().n;
    drop(a);
    let mem_before = std::fs::read(&mem).unwrap();

    let mut clones: Vec<Ember> = (0..50)
        .map(|i| {
            let e = Ember::start(&dir, &format!("c{i}"), None);
            e.load(&state, &mem, true);
            e
        })
        .collect();
    for (i, c) in clones.iter_mut().enumerate() {
        let tag = format!("clone{i}\n");
        c.stdin.as_mut().unwrap().write_all(tag.as_bytes()).unwrap();
    }
    for (i, c) in clones.iter().enumerate() {
        let want = format!("clone{i}");
        let start = Instant::now();
        loop {
            let lines = snap_lines(&c.output());
            if let Some(l) = lines.iter().find(|l| !l.tag.is_empty()) {
                assert_eq!(l.tag, want, "clone {i}: {lines:?}");
                // Its own counter: it starts after the snapshot's and steps by one.
                assert!(lines.first().unwrap().n > base);
                for w in lines.windows(2) {
                    assert_eq!(w[1].n, w[0].n + 1, "clone {i}: {lines:?}");
                }
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "clone {i} never showed its tag:\n{}",
                c.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(clones);
    assert!(
        std::fs::read(&mem).unwrap() == mem_before,
        "a clone wrote to the shared memory file"
    );
}

/// A failed load answers 400 with the reason and leaves ember pre-boot: a good load in
/// the same process then works.
#[test]
fn bad_loads_are_refused_and_leave_ember_pre_boot() {
    let dir = TempDir::new("snap-bad");
    let config = snap_config(&dir, 1, 32, None);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "orig", Some(&config));
    a.wait_counter(1);
    // Not paused: refused.
    let (status, e) = a.request(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    assert_eq!(status, 400);
    assert!(e.contains("pause it first"), "{e}");
    a.snapshot(&state, &mem);
    // Loading into a VM that runs: refused.
    let (status, e) = a.request("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(status, 400);
    assert!(e.contains("not supported after starting"), "{e}");
    drop(a);

    let good = std::fs::read(&state).unwrap();
    let b = Ember::start(&dir, "b", None);
    let bad = dir.path("bad.state");
    let try_load = |bytes: &[u8], mem: &Path, want: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let (status, e) = b.request("PUT", "/snapshot/load", &load_body(&bad, mem, true));
        assert_eq!(status, 400, "{e}");
        assert!(e.contains(want), "want `{want}` in {e}");
    };
    try_load(&good[..good.len() / 2], &mem, "truncated");
    let mut flipped = good.clone();
    let last = flipped.len() - 10;
    flipped[last] ^= 1;
    try_load(&flipped, &mem, "checksum");
    try_load(b"GIF89a", &mem, "truncated");
    try_load(
        b"GIF89a and some more bytes here",
        &mem,
        "not an ember snapshot",
    );
    let short_mem = dir.path("short.mem");
    std::fs::write(&short_mem, b"x").unwrap();
    try_load(&good, &short_mem, "is 1 bytes");
    try_load(
        &good,
        &dir.path("missing.mem"),
        "cannot open the memory file",
    );
    let (status, e) = b.request("PUT", "/snapshot/load", r#"{"snapshot_path": "/x"}"#);
    assert_eq!(status, 400);
    assert!(e.contains("mem_backend"), "{e}");
    // Still pre-boot: the good snapshot loads.
    b.load(&state, &mem, true);
    b.wait_counter(snap_lines(&b.output()).first().map_or(0, |l| l.n) + 2);

    // Configured boot resources first: refused, as in Firecracker.
    let c = Ember::start(&dir, "c", None);
    c.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "{}"}}"#, guest()),
    );
    let (status, e) = c.request("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(status, 400);
    assert!(e.contains("boot-specific resources"), "{e}");
}

/// Full snapshot, more guest work, Diff snapshot; the diff merged onto the base memory
/// file restores the Diff snapshot's state exactly (including the pages ember itself
/// wrote: disk reads and used rings).
#[test]
fn diff_snapshot_merged_onto_its_base() {
    let dir = TempDir::new("snap-diff");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 ember_test=snap"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}},
                "drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false}}]}}"#,
            guest(),
            disk.display()
        ),
    )
    .unwrap();
    let (s1, base) = (dir.path("full.state"), dir.path("full.mem"));
    let (s2, diff) = (dir.path("diff.state"), dir.path("diff.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(2);
    a.snapshot(&s1, &base);
    a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let n = snap_lines(&a.output()).last().unwrap().n;
    a.wait_counter(n + 4);
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    a.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Diff", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            s2.display(),
            diff.display()
        ),
    );
    let before = a.output();
    drop(a);
    // A diff holds far fewer pages than the 64 MiB of RAM.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&diff).unwrap().blocks() * 512
    };
    assert!(allocated < 16 << 20, "{allocated} bytes in the diff");

    let out = Command::new(EMBER)
        .args(["snapshot-merge", "--base"])
        .arg(&base)
        .arg("--diff")
        .arg(&diff)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let b = Ember::start(&dir, "b", None);
    b.load(&s2, &base, true);
    let last = snap_lines(&before).last().unwrap().n;
    b.wait_counter(last + 3);
    let (_, all) = assert_continues(&before, &b.output());
    assert!(all.iter().all(|l| l.disk == "ok"), "{all:?}");
}

/// A page-fault handler of our own, written to Firecracker's handshake: it accepts one
/// connection, receives the userfaultfd and the region list, and fills each page on first
/// touch from the memory file. Returns the number of pages it served when told to stop.
struct UffdHandler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(u64, String), String>>>,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

impl UffdHandler {
    fn start(socket: &Path, mem_file: &Path) -> UffdHandler {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        let file = std::fs::File::open(mem_file).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 4096];
            let (n, fd) = stream
                .recv_with_fd(&mut buf[..])
                .map_err(|e| format!("recv: {e}"))?;
            let uffd = fd.ok_or("no userfaultfd received")?;
            let json = String::from_utf8_lossy(&buf[..n]).into_owned();
            let regions: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
            let regions: Vec<(u64, u64, u64, u64)> = regions
                .as_array()
                .ok_or("not an array")?
                .iter()
                .map(|r| {
                    let page = r["page_size"].as_u64().unwrap();
                    assert!(page == 4096 || page == 2 << 20, "{r}");
                    // Bytes despite the name, as Firecracker sends it.
                    assert_eq!(r["page_size_kib"].as_u64().unwrap(), page);
                    (
                        r["base_host_virt_addr"].as_u64().unwrap(),
                        r["size"].as_u64().unwrap(),
                        r["offset"].as_u64().unwrap(),
                        page,
                    )
                })
                .collect();
            let len = file.metadata().unwrap().len() as usize;
            // SAFETY: a read-only private mapping of the whole memory file.
            let src = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(src, libc::MAP_FAILED);
            let mut served = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                    continue;
                }
                let mut msg = [0u8; 32];
                // SAFETY: reading one uffd_msg into a buffer of its size.
                let r = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
                if r != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
                    continue;
                }
                let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap());
                let Some((base, _, offset, page)) = regions
                    .iter()
                    .find(|(b, s, _, _)| addr >= *b && addr < b + s)
                else {
                    return Err(format!("fault outside the regions at {addr:#x}"));
                };
                // Whole host pages: a region of huge pages is filled 2 MiB at a time.
                let addr = addr & !(page - 1);
                let mut copy = UffdioCopy {
                    dst: addr,
                    src: src as u64 + offset + (addr - base),
                    len: *page,
                    mode: 0,
                    copy: 0,
                };
                // SAFETY: UFFDIO_COPY with one uffdio_copy.
                unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, &mut copy) };
                served += 1;
            }
            Ok((served, json))
        });
        UffdHandler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, String) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

/// The Uffd backend: ember hands its userfaultfd and regions to a handler of our own
/// (Firecracker's handshake), which serves every page; the guest continues exactly.
#[test]
fn uffd_backend_with_a_handler_of_our_own() {
    let dir = TempDir::new("snap-uffd");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = snap_config(&dir, 1, 64, Some(&disk));
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(2);
    a.snapshot(&state, &mem);
    let before = a.output();
    drop(a);

    let sock = dir.path("uffd.sock");
    let handler = UffdHandler::start(&sock, &mem);
    let b = Ember::start(&dir, "b", None);
    b.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            sock.display()
        ),
    );
    let last = snap_lines(&before).last().unwrap().n;
    b.wait_counter(last + 3);
    let (_, all) = assert_continues(&before, &b.output());
    assert!(all.iter().all(|l| l.disk == "ok"), "{all:?}");
    drop(b);
    let (served, json) = handler.finish();
    assert!(served > 10, "the handler served {served} pages");
    assert!(json.contains("page_size_kib"), "{json}");

    // No handler at the socket: 400, ember stays pre-boot.
    let c = Ember::start(&dir, "c", None);
    let (status, e) = c.request(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}}}"#,
            state.display(),
            dir.path("nobody.sock").display()
        ),
    );
    assert_eq!(status, 400);
    assert!(e.contains("page-fault handler"), "{e}");
}

/// A VM on 2 MiB hugetlbfs pages (`huge_pages` "2M") snapshots like any other; as in
/// Firecracker, its restore keeps the huge pages, so the File backend (a MAP_PRIVATE file
/// mapping, which hugetlbfs pages cannot be) is refused and the Uffd backend is the way:
/// the handler is told 2 MiB pages and fills them whole, and the guest continues exactly.
#[test]
fn huge_pages_snapshot_restores_through_uffd() {
    let dir = TempDir::new("snap-huge");
    let _pages = HugePagesReserved::new(32);
    let guest = guest();
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{guest}", "boot_args": "console=ttyS0 ember_test=snap"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}}}}"#
        ),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(2);
    a.snapshot(&state, &mem);
    let before = a.output();
    drop(a);

    let b = Ember::start(&dir, "b", None);
    let (status, e) = b.request("PUT", "/snapshot/load", &load_body(&state, &mem, true));
    assert_eq!(status, 400, "{e}");
    assert!(e.contains("use the Uffd backend"), "{e}");

    let sock = dir.path("uffd.sock");
    let handler = UffdHandler::start(&sock, &mem);
    b.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            sock.display()
        ),
    );
    let last = snap_lines(&before).last().unwrap().n;
    b.wait_counter(last + 3);
    assert_continues(&before, &b.output());
    let vc: serde_json::Value =
        serde_json::from_str(&http_ok(&b.sock, "GET", "/vm/config", None)).unwrap();
    assert_eq!(vc["machine-config"]["huge_pages"], "2M", "{vc}");
    drop(b);
    let (served, json) = handler.finish();
    assert!(served >= 1, "the handler served {served} pages");
    assert!(json.contains(r#""page_size":2097152"#), "{json}");
}

/// `ember --no-api --restore FILE`: the PUT /snapshot/load body from a file, no API round
/// trip; a bad file exits with the bad-configuration code and says why.
#[test]
fn restore_flag_starts_without_the_api() {
    let dir = TempDir::new("snap-flag");
    let config = snap_config(&dir, 1, 32, None);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(1);
    a.snapshot(&state, &mem);
    let before = a.output();
    drop(a);

    let load = dir.path("load.json");
    std::fs::write(&load, load_body(&state, &mem, true)).unwrap();
    let mut child = Command::new(EMBER)
        .args(["--no-api", "--restore"])
        .arg(&load)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let last = snap_lines(&before).last().unwrap().n;
    let mut after = String::new();
    let got = read_until(&mut reader, T, |l| {
        after.push_str(l);
        after.push('\n');
        snap_lines(&after).last().is_some_and(|x| x.n >= last + 2)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.is_some(), "restored guest did not go on:\n{after}");
    assert_continues(&before, &after);

    std::fs::write(
        &load,
        r#"{"snapshot_path": "/nonexistent", "mem_file_path": "/x"}"#,
    )
    .unwrap();
    let out = Command::new(EMBER)
        .args(["--no-api", "--restore"])
        .arg(&load)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(152), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the state file /nonexistent"),
        "{err}"
    );
}

/// `--snapshot-version` and `--describe-snapshot`, Firecracker's flags: the format version
/// first and alone on its line (as Firecracker prints its snapshot data format version),
/// exit 0; a file that is no state file, or a damaged one, is a clear error with exit 1.
#[test]
fn snapshot_version_and_describe_snapshot() {
    use ember::snapshot::format::{EMBER_VERSION, FORMAT_VERSION};
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(EMBER).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let v = format!("v{FORMAT_VERSION}");

    let (code, out, err) = run(&["--snapshot-version".as_ref()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.lines().next(), Some(v.as_str()), "{out}");
    assert!(out.contains(&format!("ember v{EMBER_VERSION}")), "{out}");

    let dir = TempDir::new("snap-describe");
    let config = snap_config(&dir, 1, 32, None);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let a = Ember::start(&dir, "a", Some(&config));
    a.wait_counter(1);
    a.snapshot(&state, &mem);
    drop(a);
    let describe = |p: &Path| run(&["--describe-snapshot".as_ref(), p.as_os_str()]);

    let (code, out, err) = describe(&state);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.lines().next(), Some(v.as_str()), "{out}");
    assert!(
        out.contains(&format!(
            "written by ember v{EMBER_VERSION}; this ember can restore it"
        )),
        "{out}"
    );

    // Damaged copies of the state file (another ember's file is in format.rs's tests).
    let bytes = std::fs::read(&state).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        (
            "flipped",
            {
                let mut b = bytes.clone();
                *b.last_mut().unwrap() ^= 1;
                b
            },
            "checksum",
        ),
    ];
    for (name, content, want) in cases {
        let p = dir.path(name);
        std::fs::write(&p, content).unwrap();
        let (code, out, err) = describe(&p);
        assert_eq!(code, Some(1), "{name}: {out}{err}");
        assert!(out.is_empty(), "{name}: {out}");
        assert!(
            err.contains("--describe-snapshot") && err.contains(want),
            "{name}: {err}"
        );
    }
    // The memory file by mistake, and a missing file.
    let (code, _, err) = describe(&mem);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not an ember snapshot state file"), "{err}");
    let (code, _, err) = describe(&dir.path("missing"));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot read the state file"), "{err}");
}

/// A scratch ext4 file system (16 MiB, loop-mounted on `<dir>/mnt`) that can be frozen:
/// writes to a frozen file system wait in the kernel until it is thawed. Thawed and
/// unmounted (which frees the loop device) on drop.
struct FreezableFs {
    mnt: PathBuf,
}

impl FreezableFs {
    fn new(dir: &TempDir) -> FreezableFs {
        let img = dir.path("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(16 << 20))
            .unwrap();
        let mnt = dir.path("mnt");
        std::fs::create_dir(&mnt).unwrap();
        for (cmd, args) in [
            ("mkfs.ext4", vec!["-q", "-F", img.to_str().unwrap()]),
            (
                "mount",
                vec!["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
            ),
        ] {
            let st = Command::new(cmd).args(&args).status().expect(cmd);
            assert!(st.success(), "{cmd} {args:?}: {st}");
        }
        FreezableFs { mnt }
    }

    fn freeze(&self, on: bool) {
        let flag = if on { "-f" } else { "-u" };
        let st = Command::new("fsfreeze")
            .arg(flag)
            .arg(&self.mnt)
            .status()
            .expect("fsfreeze");
        assert!(st.success(), "fsfreeze {flag}: {st}");
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        // A ring's files are let go by the kernel a moment after its process exits.
        wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            Command::new("umount")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }
}

/// io_engine Async: a disk write the kernel has not finished when the VM is paused is
/// waited for and answered before the state is saved, as Firecracker drains its io_uring
/// before a snapshot. The drive's file system is frozen, so the snap guest's write is
/// held in flight; the snapshot finishes only once it is thawed, and the restored guest
/// finds its write answered and its data on the disk.
#[test]
fn async_write_in_flight_completes_before_the_snapshot() {
    let dir = TempDir::new("snap-async");
    let fs = FreezableFs::new(&dir);
    let disk = fs.mnt.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let drives = format!(
        r#""drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": false,
            "cache_type": "Writeback", "io_engine": "Async"}}]"#,
        disk.display()
    );
    let config = dir.path("vm.json");
    std::fs::write(
        &config,
        guest_config("console=ttyS0 ember_test=snap", 1, 64, &drives),
    )
    .unwrap();
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));

    let first = Ember::start(&dir, "a", Some(&config));
    first.wait_counter(3);
    fs.freeze(true);
    // The guest writes every ~100 ms: its next write is now held in the kernel.
    std::thread::sleep(Duration::from_millis(400));
    let stuck = snap_lines(&first.output())
        .last()
        .cloned()
        .expect("a snap line");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        snap_lines(&first.output()).last().map(|l| l.n),
        Some(stuck.n),
        "the guest went on while its disk was frozen"
    );
    first.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    std::thread::scope(|s| {
        let create = s.spawn(|| first.request("PUT", "/snapshot/create", &body));
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            !create.is_finished(),
            "the snapshot did not wait for the write in flight"
        );
        fs.freeze(false);
        let (status, answer) = create.join().unwrap();
        assert_eq!(status, 204, "{answer}");
    });
    let before = first.output();
    drop(first);
    // The write held in flight reached the file before the state was saved.
    assert_eq!(
        snap_sector(&disk, stuck.n + 1),
        format!("snap {}", stuck.n + 1)
    );

    let second = Ember::start(&dir, "b", None);
    second.load(&state, &mem, true);
    second.wait_counter(stuck.n + 4);
    let (_, all) = assert_continues(&before, &second.output());
    for l in &all {
        assert_eq!(l.disk, "ok", "{all:?}");
    }
}
