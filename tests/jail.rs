//! The jail and the seccomp filters, end to end: a jailed ember boots the test guest and
//! the tests look at it from the host (/proc), then stop it and check the cleanup. These
//! need root and namespaces, which the test machines have.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");
const UID: u32 = 12345;
const GID: u32 = 23456;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A directory under /tmp, removed (with everything in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ember-jail-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Everything under `dir`, relative, sorted: to show nothing appeared or vanished.
fn listing(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn config(dir: &Path, mode: &str) -> PathBuf {
    let path = dir.join("vm.json");
    let guest = common::guest();
    let json = format!(
        r#"{{"boot-source":{{"kernel_image_path":"{guest}","boot_args":"ember_test={mode}"}},
            "machine-config":{{"vcpu_count":2,"mem_size_mib":64}}}}"#
    );
    std::fs::write(&path, json).unwrap();
    path
}

fn jail_args<'a>(base: &'a Path, id: &'a str) -> Vec<String> {
    vec![
        "--jail".into(),
        "--id".into(),
        id.into(),
        "--uid".into(),
        UID.to_string(),
        "--gid".into(),
        GID.to_string(),
        "--chroot-base-dir".into(),
        base.display().to_string(),
    ]
}

/// A running ember whose stdout lines arrive on a channel.
struct Ember {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Ember {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Ember {
        let mut cmd = Command::new(EMBER);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ember {
            child,
            lines,
            stderr,
        }
    }

    /// Waits for a stdout line containing `what`.
    fn wait_line(&self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(what) => return,
                Ok(_) => {}
                Err(e) => panic!("no `{what}` from the guest: {e:?}"),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill of our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the exit; returns (exit code, stderr).
    fn finish(mut self) -> (i32, String) {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ember did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr.join().unwrap();
        (status.code().unwrap_or(-1), err)
    }
}

fn run(args: &[String], env: &[(&str, &str)]) -> (i32, String) {
    Ember::spawn(args, env).finish()
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn vmm_pid(jail_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(jail_dir.join("ember.pid")).unwrap();
    text.trim().parse().unwrap()
}

/// The cgroup v2 mount point, from /proc/mounts.
fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// Waits until the VMM's vCPU threads exist and every thread has its seccomp filter.
fn wait_until_started(pid: i32) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let statuses: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
                    .collect()
            })
            .unwrap_or_default();
        let has = |name: &str| statuses.iter().any(|s| status_field(s, "Name:") == name);
        if has("ember_vcpu0")
            && has("ember_vcpu1")
            && statuses.iter().all(|s| status_field(s, "Seccomp:") == "2")
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks a running jailed VMM from the host, for every thread.
fn check_confined(pid: i32, jail_dir: &Path) {
    let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let names: Vec<String> = tasks
        .iter()
        .map(|t| {
            std::fs::read_to_string(t.join("comm"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    for n in ["ember", "ember_vcpu0", "ember_vcpu1"] {
        assert!(names.iter().any(|x| x == n), "no thread {n} in {names:?}");
    }
    for t in &tasks {
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let who = t.display();
        assert_eq!(status_field(&status, "Seccomp:"), "2", "{who}");
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{who}");
        let uids = format!("{UID}\t{UID}\t{UID}\t{UID}");
        let gids = format!("{GID}\t{GID}\t{GID}\t{GID}");
        assert_eq!(status_field(&status, "Uid:"), uids, "{who}");
        assert_eq!(status_field(&status, "Gid:"), gids, "{who}");
        assert_eq!(status_field(&status, "Groups:"), "", "{who}");
        assert_eq!(
            status_field(&status, "CapEff:"),
            "0000000000000000",
            "{who}"
        );
    }
    let root = std::fs::metadata(format!("/proc/{pid}/root")).unwrap();
    let jail_root = std::fs::metadata(jail_dir.join("root")).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail_root.dev(), jail_root.ino()));
    let ns = |p: &str| std::fs::read_link(p).unwrap();
    assert_ne!(ns(&format!("/proc/{pid}/ns/mnt")), ns("/proc/self/ns/mnt"));
    // Only what ember opened itself: no descriptor of the test harness leaks in.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(
            t.starts_with("anon_inode:")
                || t.starts_with("pipe:")
                || t.starts_with("/dev/")
                || t.ends_with("/.lock")
                // --daemonize: the host's /dev/null, opened before the old root was detached.
                || t == "/null",
            "unexpected descriptor {} -> {t}",
            fd.path().display()
        );
    }
}

#[test]
fn jailed_vm_is_confined_and_cleaned_up() {
    let tmp = TempDir::new("confined");
    let base = tmp.path().join("base");
    let id = format!("confined-{}", std::process::id());
    let parent = format!("ember-test-{}", std::process::id());
    let cfg = config(tmp.path(), "counter");
    let mut args = jail_args(&base, &id);
    args.extend(
        [
            "--resource-limit",
            "no-file=1000",
            "--resource-limit",
            "fsize=1000000",
            "--cgroup",
            "pids.max=64",
            "--parent-cgroup",
            &parent,
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let ember = Ember::spawn(&args, &[]);
    ember.wait_line("tick 2");
    let jail_dir = base.join("ember").join(&id);
    let pid = vmm_pid(&jail_dir);
    assert_ne!(
        pid,
        ember.child.id() as i32,
        "the VMM is the supervisor's child"
    );
    check_confined(pid, &jail_dir);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1000 "))
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains(" 1000000 "))
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let leaf = format!("/{parent}/{id}");
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":pids:") && l.ends_with(&leaf)),
        "{cgroups}"
    );
    let pids_dir = Path::new("/sys/fs/cgroup/pids").join(&parent);
    assert_eq!(
        std::fs::read_to_string(pids_dir.join(&id).join("pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    // The guest file is in the jail, and the VMM reads it there.
    let name = Path::new(common::guest()).file_name().unwrap();
    assert!(jail_dir.join("root").join(name).exists());

    ember.signal(libc::SIGTERM);
    let (code, err) = ember.finish();
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(!jail_dir.exists(), "jail tree left behind");
    assert!(!pids_dir.join(&id).exists(), "cgroup left behind");
    assert_eq!(listing(&base), [PathBuf::from("ember")]);
    std::fs::remove_dir(&pids_dir).unwrap();
}

#[test]
fn pid_namespace_and_cgroup_v2() {
    let tmp = TempDir::new("pidns");
    let base = tmp.path().join("base");
    let id = format!("pidns-{}", std::process::id());
    let parent = format!("ember-test-v2-{}", std::process::id());
    let cfg = config(tmp.path(), "counter");
    let mut args = jail_args(&base, &id);
    args.extend(
        [
            "--new-pid-ns",
            "--cgroup-version",
            "2",
            "--cgroup",
            "cgroup.max.descendants=3",
            "--parent-cgroup",
            &parent,
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let ember = Ember::spawn(&args, &[]);
    ember.wait_line("tick 2");
    let jail_dir = base.join("ember").join(&id);
    let pid = vmm_pid(&jail_dir);
    check_confined(pid, &jail_dir);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // NSpid: the host's pid, then 1 in its own namespace.
    assert_eq!(status_field(&status, "NSpid:"), format!("{pid}\t1"));
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups.lines().any(|l| l == format!("0::/{parent}/{id}")),
        "{cgroups}"
    );
    let cg = cgroup2_mount().join(&parent);
    let v = std::fs::read_to_string(cg.join(&id).join("cgroup.max.descendants")).unwrap();
    assert_eq!(v.trim(), "3");

    ember.signal(libc::SIGTERM);
    let (code, err) = ember.finish();
    assert_eq!(code, 128 + libc::SIGTERM, "{err}");
    assert!(!jail_dir.exists());
    assert!(!cg.join(&id).exists());
    std::fs::remove_dir(&cg).unwrap();
}

#[test]
fn daemonize_returns_and_the_supervisor_cleans_up() {
    let tmp = TempDir::new("daemon");
    let base = tmp.path().join("base");
    let id = format!("daemon-{}", std::process::id());
    let cfg = config(tmp.path(), "counter");
    let mut args = jail_args(&base, &id);
    args.extend(
        [
            "--daemonize",
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let (code, err) = run(&args, &[]);
    assert_eq!(code, 0, "{err}");
    let jail_dir = base.join("ember").join(&id);
    let pid = vmm_pid(&jail_dir);
    // --daemonize returns once the VMM is jailed, before it has built the VM: wait until
    // every thread runs under its filter (the VMM thread installs its own last).
    wait_until_started(pid);
    // Stops the VM even if a check fails (nothing else waits for it).
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill with a pid read from the jail's pid file; at worst ESRCH.
            unsafe { libc::kill(self.0, libc::SIGTERM) };
        }
    }
    let stop = Stop(pid);
    check_confined(pid, &jail_dir);
    drop(stop);
    let deadline = Instant::now() + TIMEOUT;
    while jail_dir.exists() {
        assert!(Instant::now() < deadline, "the supervisor did not clean up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn forbidden_syscall_exits_148_with_its_number() {
    let tmp = TempDir::new("sigsys");
    let cfg = config(tmp.path(), "counter");
    for thread in ["vmm", "vcpu"] {
        let args = ["--no-api", "--config-file", cfg.to_str().unwrap()].map(String::from);
        let (code, err) = run(&args, &[("EMBER_TEST_FORBIDDEN_SYSCALL", thread)]);
        assert_eq!(code, 148, "{thread}: {err}");
        assert!(
            err.contains(&format!("the {thread} thread made system call 121")),
            "{thread}: {err}"
        );
    }
    let sock = tmp.path().join("api.sock");
    let args = ["--api-sock", sock.to_str().unwrap()].map(String::from);
    let (code, err) = run(&args, &[("EMBER_TEST_FORBIDDEN_SYSCALL", "api")]);
    assert_eq!(code, 148, "api: {err}");
    assert!(err.contains("the api thread made system call 121"), "{err}");

    // Jailed: the supervisor reports the VMM's code and still cleans up.
    let base = tmp.path().join("base");
    let id = format!("sigsys-{}", std::process::id());
    let mut args = jail_args(&base, &id);
    args.extend(["--no-api", "--config-file", cfg.to_str().unwrap()].map(String::from));
    let (code, err) = run(&args, &[("EMBER_TEST_FORBIDDEN_SYSCALL", "vcpu")]);
    assert_eq!(code, 148, "{err}");
    assert!(err.contains("system call 121"), "{err}");
    assert_eq!(listing(&base), [PathBuf::from("ember")]);
}

#[test]
fn seccomp_can_be_turned_off() {
    let tmp = TempDir::new("noseccomp");
    let cfg = config(tmp.path(), "counter");
    let args = [
        "--no-seccomp",
        "--no-api",
        "--config-file",
        cfg.to_str().unwrap(),
    ]
    .map(String::from);
    let ember = Ember::spawn(&args, &[("EMBER_TEST_FORBIDDEN_SYSCALL", "vcpu")]);
    ember.wait_line("tick 1");
    let pid = ember.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Seccomp:"), "0");
    ember.signal(libc::SIGTERM);
    assert_eq!(ember.finish().0, 128 + libc::SIGTERM);
}

#[test]
fn invalid_id_and_missing_uid_are_argument_errors() {
    let tmp = TempDir::new("badargs");
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let cfg = config(tmp.path(), "counter");
    let tail = ["--no-api", "--config-file", cfg.to_str().unwrap()].map(String::from);

    let mut args = jail_args(&base, "bad_id");
    args.extend(tail.clone());
    let (code, err) = run(&args, &[]);
    assert_eq!(code, 153, "{err}");
    assert!(
        err.contains("bad_id") && err.contains("letters, digits and hyphens"),
        "{err}"
    );

    let mut args = jail_args(&base, "x".repeat(65).as_str());
    args.extend(tail.clone());
    assert_eq!(run(&args, &[]).0, 153);

    let mut args = jail_args(&base, "no-uid");
    args.drain(3..5);
    args.extend(tail.clone());
    let (code, err) = run(&args, &[]);
    assert_eq!(code, 153, "{err}");
    assert!(err.contains("--uid"), "{err}");

    let (code, err) = run(&["--uid".into(), "1".into()], &[]);
    assert_eq!(code, 153, "{err}");
    assert!(err.contains("needs --jail"), "{err}");

    assert!(listing(&base).is_empty(), "{:?}", listing(&base));
}

#[test]
fn a_jail_in_use_is_refused_and_left_alone() {
    let tmp = TempDir::new("inuse");
    let base = tmp.path().join("base");
    let id = format!("inuse-{}", std::process::id());
    let cfg = config(tmp.path(), "counter");
    let mut args = jail_args(&base, &id);
    args.extend(["--no-api", "--config-file", cfg.to_str().unwrap()].map(String::from));
    let first = Ember::spawn(&args, &[]);
    first.wait_line("tick 1");
    let before = listing(&base);

    let (code, err) = run(&args, &[]);
    assert_eq!(code, 153, "{err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(listing(&base), before, "the second ember touched the jail");
    first.wait_line("tick");

    first.signal(libc::SIGTERM);
    assert_eq!(first.finish().0, 128 + libc::SIGTERM);
    assert_eq!(listing(&base), [PathBuf::from("ember")]);
}

/// A read-only bind mount of a directory onto itself, undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> ReadOnly {
        let sh = |args: &[&str]| {
            let ok = Command::new("mount").args(args).status().unwrap().success();
            assert!(ok, "mount {args:?}");
        };
        let d = dir.to_str().unwrap();
        sh(&["--bind", d, d]);
        let ro = ReadOnly(dir.to_path_buf());
        sh(&["-o", "remount,bind,ro", d]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_base_dir_is_an_argument_error() {
    let tmp = TempDir::new("robase");
    let base = tmp.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(base.join("keep"), "x").unwrap();
    let cfg = config(tmp.path(), "counter");
    let outside = listing(tmp.path());
    {
        let _ro = ReadOnly::new(&base);
        let mut args = jail_args(&base, "ro-base");
        args.extend(["--no-api", "--config-file", cfg.to_str().unwrap()].map(String::from));
        let (code, err) = run(&args, &[]);
        assert_eq!(code, 153, "{err}");
        assert!(err.contains("cannot create the jail there"), "{err}");
        assert!(err.contains(base.to_str().unwrap()), "{err}");
    }
    assert_eq!(listing(tmp.path()), outside);
}
