//! The stripped Linux guest, snapshotted right after it mounts its root over virtio-blk,
//! restores in a new ember process and carries on: its init runs (system calls through
//! the PVM shim on these hosts), writes its file and reboots, and the restored ember exits
//! 0 on that reset. The test guest's tests in tests/snapshot.rs check the timer,
//! interrupt and queue state exactly.
//!
//! tools/test passes the artifacts as EMBER_VMLINUX and EMBER_ROOTFS; without them the
//! test prints a SKIP line. A Linux boot takes minutes on a loaded PVM host: each phase
//! has LINUX_TIMEOUT.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const LINUX_TIMEOUT: Duration = Duration::from_secs(900);
const ROOT_MOUNTED: &str = "EXT4-fs (vda): mounted filesystem";

const TEST: &str = "linux_restores_after_root_mount";

fn artifact(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skip(
                TEST,
                &format!("{var} not set (tools/test sets it from tools/build-guest)"),
            );
            None
        }
    }
}

struct Proc {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(EMBER)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = collect_stdout(&mut child);
        Proc { child, out }
    }

    fn wait_for(&self, what: &str) -> bool {
        let start = Instant::now();
        while start.elapsed() < LINUX_TIMEOUT {
            if self.out.lock().unwrap().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "-w", "%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-d", body])
        .arg(format!("http://localhost{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn linux_restores_after_root_mount() {
    let Some(kernel) = artifact("EMBER_VMLINUX") else {
        return;
    };
    let Some(rootfs) = artifact("EMBER_ROOTFS") else {
        return;
    };
    let dir = TempDir::new("snap-linux");
    let image = dir.path("rootfs.ext4");
    std::fs::copy(&rootfs, &image).unwrap();
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{kernel}",
                  "boot_args": "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}},
                "drives": [{{"drive_id": "rootfs", "path_on_host": "{}",
                             "is_root_device": true, "is_read_only": false}}]}}"#,
            image.display()
        ),
    )
    .unwrap();
    let sock = dir.path("a.sock");
    let first = Proc::start(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
    ]);
    assert!(
        first.wait_for(ROOT_MOUNTED),
        "no root mount:\n{}",
        first.out.lock().unwrap()
    );
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    // init takes seconds to reach its reboot after the mount, so the first VM is still
    // up when the pause comes.
    assert_eq!(
        curl(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#),
        "204",
        "cannot pause:\n{}",
        first.out.lock().unwrap()
    );
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    assert_eq!(curl(&sock, "PUT", "/snapshot/create", &body), "204");
    let before = first.out.lock().unwrap().clone();
    drop(first);

    let sock = dir.path("b.sock");
    let mut second = Proc::start(&["--api-sock", sock.to_str().unwrap()]);
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        sock.exists(),
        "the second ember's API socket never appeared"
    );
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        mem.display()
    );
    assert_eq!(curl(&sock, "PUT", "/snapshot/load", &load), "204");
    // The restored guest goes on: init runs, writes its file and reboots (reboot=k), and
    // the restored ember exits 0 on that reset (a triple fault exits non-zero).
    let start = Instant::now();
    let went_on = loop {
        match second.child.try_wait().unwrap() {
            Some(status) => break status.code() == Some(0),
            None if start.elapsed() > LINUX_TIMEOUT => break false,
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let after = second.out.lock().unwrap().clone();
    assert!(
        went_on,
        "the restored guest did not run on to its reboot (exit {:?})\nbefore:\n{before}\nafter:\n{after}",
        second.child.try_wait()
    );
    assert!(
        format!("{before}{after}").contains("ember-guest-init: wrote /ember-init.done"),
        "init never finished\nbefore:\n{before}\nafter:\n{after}"
    );
    for bad in ["Oops", "BUG:", "general protection fault"] {
        assert!(
            !after.contains(bad),
            "the restored kernel broke ({bad})\nbefore:\n{before}\nafter:\n{after}"
        );
    }
}
