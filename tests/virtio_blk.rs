//! virtio-blk end to end: the test guest (`ember_test=blk`) drives each disk through
//! virtio-mmio and reports CRCs, the device ID and request statuses; the host side checks
//! them against the image files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;

/// CRC-32 as zlib computes it (reflected, polynomial 0xedb88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32_matches_zlib() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}

/// An image of `sectors` sectors whose bytes differ from sector to sector.
fn make_image(path: &Path, sectors: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..sectors * SECTOR)
        .map(|_| {
            // xorshift32: cheap, deterministic, not the guest's write pattern.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).expect("write image");
    data
}

/// What the guest writes to sector 1: byte i = (i*7+3) & 0xff.
fn guest_pattern() -> Vec<u8> {
    (0..SECTOR).map(|i| ((i * 7 + 3) & 0xff) as u8).collect()
}

/// Both I/O engines: every behaviour below holds for each.
const ENGINES: [&str; 2] = ["Sync", "Async"];

fn drive_json(id: &str, path: &Path, root: bool, ro: bool, cache: &str) -> String {
    drive_on("Sync", id, path, root, ro, cache)
}

fn drive_on(engine: &str, id: &str, path: &Path, root: bool, ro: bool, cache: &str) -> String {
    format!(
        r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": {root},
             "is_read_only": {ro}, "cache_type": "{cache}", "io_engine": "{engine}"}}"#,
        path.display()
    )
}

fn blk_config(drives: &[String]) -> String {
    guest_config(
        "console=ttyS0 ember_test=blk",
        1,
        128,
        &format!(r#""drives": [{}]"#, drives.join(", ")),
    )
}

/// The guest's `blk:` lines for the device at `base`, up to the next device.
fn device_lines(o: &Outcome, base: u64) -> Vec<String> {
    let start = format!("blk: device {base:#x}");
    o.stdout
        .lines()
        .map(str::trim_end)
        .skip_while(|l| *l != start)
        .skip(1)
        .take_while(|l| l.starts_with("blk: ") && !l.starts_with("blk: device "))
        .map(String::from)
        .collect()
}

fn has(lines: &[String], want: &str, o: &Outcome) {
    assert!(
        lines.iter().any(|l| l == want),
        "missing `{want}` in {lines:#?}\n{o:#?}"
    );
}

fn expect_crcs(lines: &[String], image: &[u8], o: &Outcome) {
    let sectors = image.len() / SECTOR;
    let first = image.get(..SECTOR).expect("sector 0");
    let last = image.get((sectors - 1) * SECTOR..).expect("last sector");
    has(
        lines,
        &format!("blk: sector0 crc={:#010x}", crc32(first)),
        o,
    );
    has(lines, &format!("blk: last crc={:#010x}", crc32(last)), o);
}

#[test]
fn read_write_flush_and_id_on_a_writeback_drive() {
    for engine in ENGINES {
        read_write_flush_and_id(engine);
    }
}

fn read_write_flush_and_id(engine: &str) {
    let dir = TempDir::new("blk-rw");
    let img = dir.path("disk.img");
    let image = make_image(&img, 64, 0x1234_5678);
    let metrics = dir.path("metrics.json");
    let o = run_config(
        &blk_config(&[drive_on(engine, "data0", &img, false, false, "Writeback")]),
        &["--metrics-path", metrics.to_str().unwrap()],
        T,
    );
    o.assert_ok();
    // Per-drive counters in the metrics written at exit.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let b = &m["block_data0"];
    assert!(b["read_count"].as_u64().unwrap() >= 3, "{m}");
    assert!(
        b["read_bytes"].as_u64().unwrap() >= 3 * SECTOR as u64,
        "{m}"
    );
    assert_eq!(b["write_count"].as_u64(), Some(1), "{m}");
    assert_eq!(b["write_bytes"].as_u64(), Some(SECTOR as u64), "{m}");
    assert_eq!(b["flush_count"].as_u64(), Some(1), "{m}");
    assert!(
        o.stdout.contains("virtio_mmio.device=4K@0xd0001000:5"),
        "{o:#?}"
    );
    let lines = device_lines(&o, 0xd000_1000);
    has(&lines, "blk: capacity=64 ro=0", &o);
    expect_crcs(&lines, &image, &o);
    has(&lines, "blk: id=data0", &o);
    has(&lines, "blk: write status=0", &o);
    has(&lines, "blk: readback ok", &o);
    has(&lines, "blk: flush status=0", &o);
    assert!(o.has_line("ember-test-guest: done"), "{o:#?}");

    // On the host after exit: sector 1 holds the guest's pattern, the rest is untouched.
    let after = std::fs::read(&img).expect("read image");
    assert_eq!(after.len(), image.len());
    assert!(after.get(SECTOR..2 * SECTOR) == Some(&guest_pattern()[..]));
    assert!(after.get(..SECTOR) == image.get(..SECTOR));
    assert!(after.get(2 * SECTOR..) == image.get(2 * SECTOR..));
}

#[test]
fn read_only_root_drive_refuses_writes_and_names_vdb() {
    let dir = TempDir::new("blk-ro");
    let data = dir.path("data.img");
    let root = dir.path("root.img");
    let data_image = make_image(&data, 16, 0xdead_beef);
    // A partial last sector: the guest sees only whole sectors.
    let mut root_image = make_image(&root, 33, 0x0bad_cafe);
    root_image.extend_from_slice(&[0x55; 100]);
    std::fs::write(&root, &root_image).expect("write root image");
    let o = run_config(
        &blk_config(&[
            drive_json("data", &data, false, false, "Unsafe"),
            // Async on a read-only drive refuses writes the same way.
            drive_on("Async", "rootfs", &root, true, true, "Unsafe"),
        ]),
        &[],
        T,
    );
    o.assert_ok();
    let cmdline = o
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_default();
    for want in [
        "virtio_mmio.device=4K@0xd0001000:5",
        "virtio_mmio.device=4K@0xd0002000:6",
        "root=/dev/vdb",
        " ro",
    ] {
        assert!(cmdline.contains(want), "`{want}` not in `{cmdline}`");
    }

    let rw = device_lines(&o, 0xd000_1000);
    has(&rw, "blk: capacity=16 ro=0", &o);
    expect_crcs(&rw, &data_image, &o);
    has(&rw, "blk: write status=0", &o);
    has(&rw, "blk: flush status=0", &o);

    let ro = device_lines(&o, 0xd000_2000);
    has(&ro, "blk: capacity=33 ro=1", &o);
    expect_crcs(&ro, root_image.get(..33 * SECTOR).unwrap_or_default(), &o);
    has(&ro, "blk: id=rootfs", &o);
    has(&ro, "blk: write status=1", &o);
    has(&ro, "blk: readback mismatch", &o);
    has(&ro, "blk: flush status=0", &o);
    assert!(
        std::fs::read(&root).expect("read root") == root_image,
        "read-only image changed"
    );
}

#[test]
fn partuuid_root_goes_on_the_command_line() {
    let dir = TempDir::new("blk-partuuid");
    let img = dir.path("root.img");
    make_image(&img, 8, 7);
    let drive = format!(
        r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true,
             "partuuid": "0eaa91a0-01"}}"#,
        img.display()
    );
    let o = run_config(&blk_config(&[drive]), &[], T);
    o.assert_ok();
    let cmdline = o
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .unwrap_or_default();
    assert!(
        cmdline.contains("root=PARTUUID=0eaa91a0-01 rw"),
        "{cmdline}"
    );
}

#[test]
fn missing_disk_is_a_configuration_error() {
    let o = run_config(
        &blk_config(&[drive_json(
            "gone",
            Path::new("/nonexistent/disk.img"),
            false,
            false,
            "Unsafe",
        )]),
        &[],
        T,
    );
    assert!(!o.timed_out, "{o:#?}");
    assert_eq!(o.code, Some(ember::exit_code::BAD_CONFIGURATION), "{o:#?}");
    assert!(o.stderr.contains("/nonexistent/disk.img"), "{o:#?}");
    assert!(!o.stderr.contains("panicked"), "{o:#?}");
}

/// Nothing acknowledged is lost: once the guest saw its write complete (and flushed), a
/// SIGTERM, SIGINT or SIGKILL (here while the guest keeps running) leaves the data in the
/// host file, on either engine.
#[test]
fn acknowledged_writes_survive_sigterm_sigint_and_sigkill() {
    let cases = [
        (libc::SIGTERM, "Unsafe"),
        (libc::SIGINT, "Writeback"),
        (libc::SIGKILL, "Writeback"),
    ];
    for (engine, (sig, cache)) in ENGINES
        .iter()
        .flat_map(|e| cases.iter().map(move |c| (*e, *c)))
    {
        let dir = TempDir::new("durable");
        let img = dir.path("disk.img");
        let mut image = make_image(&img, 64, 7);
        let cfg = dir.path("vm.json");
        std::fs::write(
            &cfg,
            guest_config(
                "console=ttyS0 ember_test=blk,counter",
                1,
                128,
                &format!(
                    r#""drives": [{}]"#,
                    drive_on(engine, "data0", &img, false, false, cache)
                ),
            ),
        )
        .unwrap();
        let mut child = spawn(&["--no-api", "--config-file", cfg.to_str().unwrap()]);
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        // The write completed in the guest's eyes once it read the pattern back, and the
        // flush after it was answered.
        assert!(read_until(&mut out, T, |l| l == "blk: readback ok").is_some());
        assert!(read_until(&mut out, T, |l| l == "blk: flush status=0").is_some());
        assert!(read_until(&mut out, T, |l| l.starts_with("tick")).is_some());
        send_signal(&child, sig);
        let status = child.wait().unwrap();
        if sig == libc::SIGKILL {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(sig), "{engine}");
        } else {
            assert_eq!(status.code(), Some(128 + sig), "{engine}");
        }
        image[SECTOR..2 * SECTOR].copy_from_slice(&guest_pattern());
        assert!(
            std::fs::read(&img).unwrap() == image,
            "{engine}: host file differs after signal {sig}"
        );
    }
}

/// A loop device over a scratch file, detached on drop: its /sys/block statistics count
/// the flushes that reach the disk.
struct LoopDevice(String);

impl LoopDevice {
    fn new(file: &Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Flush requests completed (field 16 of /sys/block/<dev>/stat, Linux 5.5 and later).
    fn flushes(&self) -> u64 {
        let name = Path::new(&self.0).file_name().expect("device name");
        let stat = std::fs::read_to_string(Path::new("/sys/block").join(name).join("stat"))
            .expect("loop device statistics");
        let f: Vec<&str> = stat.split_whitespace().collect();
        f.get(15).and_then(|n| n.parse().ok()).expect("flush count")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Writeback passes the guest's flush to the disk (fdatasync); Unsafe completes it
/// without one. Counted at the disk while the guest still runs, after its flush.
#[test]
fn only_writeback_flushes_reach_the_disk() {
    let cases = [("Writeback", true), ("Unsafe", false)];
    for (engine, (cache, reaches)) in ENGINES
        .iter()
        .flat_map(|e| cases.iter().map(move |c| (*e, *c)))
    {
        let dir = TempDir::new("flushes");
        let backing = dir.path("backing.img");
        make_image(&backing, 64, 3);
        let dev = LoopDevice::new(&backing);
        let cfg = dir.path("vm.json");
        std::fs::write(
            &cfg,
            guest_config(
                "console=ttyS0 ember_test=blk,counter",
                1,
                128,
                &format!(
                    r#""drives": [{}]"#,
                    drive_on(engine, "data0", Path::new(&dev.0), false, false, cache)
                ),
            ),
        )
        .unwrap();
        let before = dev.flushes();
        let mut child = spawn(&["--no-api", "--config-file", cfg.to_str().unwrap()]);
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let flushed = read_until(&mut out, T, |l| l.starts_with("blk: flush status="));
        let ticking = read_until(&mut out, T, |l| l.starts_with("tick"));
        let during = dev.flushes() - before;
        send_signal(&child, libc::SIGTERM);
        let status = child.wait().unwrap();
        let what = format!("{engine} {cache}");
        assert_eq!(flushed.as_deref(), Some("blk: flush status=0"), "{what}");
        assert!(ticking.is_some(), "{what}: the guest stopped");
        assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{what}");
        if reaches {
            assert!(
                during >= 1,
                "{what}: the guest's flush did not reach the disk"
            );
        } else {
            assert_eq!(during, 0, "{what}: a flush reached the disk");
        }
    }
}

/// The test guest's benchmark keeps 16 requests in flight, 4 KiB and 1 MiB, reads then
/// writes, and checks that every used entry names a chain it has in flight and that each
/// status is 0. On Async they complete in whatever order the kernel finishes them.
#[test]
fn sixteen_requests_in_flight_on_both_engines() {
    for engine in ENGINES {
        let dir = TempDir::new("blk-depth");
        let img = dir.path("disk.img");
        make_image(&img, 8192, 11); // 4 MiB
        let metrics = dir.path("metrics.json");
        let o = run_config(
            &guest_config(
                "console=ttyS0 ember_test=blkbench",
                1,
                128,
                &format!(
                    r#""drives": [{}]"#,
                    drive_on(engine, "data0", &img, false, false, "Writeback")
                ),
            ),
            &["--metrics-path", metrics.to_str().unwrap()],
            T,
        );
        o.assert_ok();
        assert!(!o.stdout.contains("blk-bench: error"), "{engine}: {o:#?}");
        for want in [
            "read 4096 ",
            "read 1048576 ",
            "write 4096 ",
            "write 1048576 ",
        ] {
            assert!(
                o.stdout.contains(&format!("blk-bench: {want}")),
                "{engine}: no `{want}` line\n{o:#?}"
            );
        }
        assert!(o.has_line("blk-bench: flush status=0"), "{engine}: {o:#?}");
        let text = std::fs::read_to_string(&metrics).unwrap();
        let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let b = &m["block_data0"];
        // 1024 + 4 requests each way over the 4 MiB.
        assert_eq!(b["read_count"].as_u64(), Some(1028), "{engine}: {m}");
        assert_eq!(b["write_count"].as_u64(), Some(1028), "{engine}: {m}");
        assert_eq!(b["failed_requests"].as_u64(), Some(0), "{engine}: {m}");
    }
}

/// A seccomp filter for the spawned ember that answers io_uring_setup with ENOSYS, as a
/// kernel built without io_uring does.
fn without_io_uring() -> seccompiler::BpfProgram {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .expect("filter");
    filter.try_into().expect("bpf")
}

/// On a host whose kernel has no io_uring, `io_engine: "Async"` is refused where
/// Firecracker refuses it, at `PUT /drives`, with a message that names the way out; a
/// config file that asks for it exits 152. Sync drives work as ever.
#[test]
fn async_without_io_uring_is_refused_clearly() {
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("blk-nouring");
    let img = dir.path("disk.img");
    make_image(&img, 16, 5);
    let spawn_without = |args: &[&str]| {
        let bpf = without_io_uring();
        let mut cmd = std::process::Command::new(EMBER);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec the closure only makes two system calls on
        // memory prepared before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let prog = libc::sock_fprog {
                    len: bpf.len() as u16,
                    filter: bpf.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const _) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawn ember")
    };

    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        blk_config(&[drive_on("Async", "data0", &img, false, false, "Unsafe")]),
    )
    .unwrap();
    let o = wait(
        spawn_without(&["--no-api", "--config-file", cfg.to_str().unwrap()]),
        T,
    );
    assert_eq!(o.code, Some(ember::exit_code::BAD_CONFIGURATION), "{o:#?}");
    assert!(
        o.stderr.contains("io_engine Async needs io_uring")
            && o.stderr.contains("use io_engine Sync"),
        "{o:#?}"
    );

    let sock = dir.path("api.sock");
    let child = spawn_without(&["--api-sock", sock.to_str().unwrap()]);
    assert!(wait_for(T, Duration::from_millis(10), || sock.exists()));
    let async_drive = drive_on("Async", "data0", &img, false, false, "Unsafe");
    let (status, body) = http(&sock, "PUT", "/drives/data0", Some(&async_drive)).expect("answer");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("io_engine Async needs io_uring"), "{body}");
    let sync_drive = drive_on("Sync", "data0", &img, false, false, "Unsafe");
    let (status, body) = http(&sock, "PUT", "/drives/data0", Some(&sync_drive)).expect("answer");
    assert_eq!(status, 204, "{body}");
    send_signal(&child, libc::SIGTERM);
    let o = wait(child, T);
    assert_eq!(o.code, Some(128 + libc::SIGTERM), "{o:#?}");
}

/// `snap <n> ...` lines of the snap guest: `n`.
fn snap_n(line: &str) -> Option<u64> {
    line.strip_prefix("snap ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// PATCH /drives on a running Async drive: what is in flight finishes on the old file,
/// the ring's registered file becomes the new one (the one register call the VMM
/// thread's seccomp filter and the ring's restrictions allow), and the guest's later
/// writes land there.
#[test]
fn patch_drive_moves_an_async_drive_to_a_new_file() {
    let dir = TempDir::new("blk-patch");
    let (old, new) = (dir.path("old.img"), dir.path("new.img"));
    for p in [&old, &new] {
        std::fs::write(p, vec![0u8; 1 << 20]).unwrap();
    }
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        guest_config(
            "console=ttyS0 ember_test=snap",
            1,
            64,
            &format!(
                r#""drives": [{}]"#,
                drive_on("Async", "d0", &old, false, false, "Writeback")
            ),
        ),
    )
    .unwrap();
    let sock = dir.path("api.sock");
    let mut child = spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
    ]);
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let first = read_until(&mut out, T, |l| snap_n(l).is_some_and(|n| n >= 3)).expect("snap 3");
    let n0 = snap_n(&first).unwrap();
    let body = format!(
        r#"{{"drive_id": "d0", "path_on_host": "{}"}}"#,
        new.display()
    );
    let (status, answer) = http(&sock, "PATCH", "/drives/d0", Some(&body)).expect("answer");
    assert_eq!(status, 204, "{answer}");
    let later = read_until(&mut out, T, |l| {
        snap_n(l).is_some_and(|n| n >= n0 + 5) && l.contains("disk=ok")
    })
    .expect("the guest's disk works after the swap");
    let n1 = snap_n(&later).unwrap();
    send_signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(snap_sector(&new, n1), format!("snap {n1}"));
    assert_eq!(snap_sector(&old, n0), format!("snap {n0}"));
    assert_ne!(snap_sector(&old, n1), format!("snap {n1}"));
}
