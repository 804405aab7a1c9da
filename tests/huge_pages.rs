//! `machine-config.huge_pages`: guest RAM on 2 MiB hugetlbfs pages (`2M`), on transparent
//! huge pages (`Transparent`), and the error when the host's pool cannot give them. Each
//! test boots the test guest and looks at ember's guest RAM mapping in /proc/PID/smaps.

mod common;

use std::io::BufReader;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn config(dir: &TempDir, mem_mib: u64, huge_pages: &str, mode: &str) -> String {
    let path = dir.path("vm.json");
    let guest = guest();
    std::fs::write(
        &path,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{guest}", "boot_args": "console=ttyS0 ember_test={mode}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "huge_pages": "{huge_pages}"}}}}"#
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// ember with the API and a config file, running the guest until its second tick.
fn start_ticking(dir: &TempDir, config: &str) -> (Child, std::path::PathBuf) {
    let sock = dir.path("api.sock");
    let mut child = Command::new(EMBER)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--config-file", config])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ember");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    assert!(
        read_until(&mut out, T, |l| l.starts_with("tick 1")).is_some(),
        "the guest never ticked"
    );
    // Keep the console drained: the guest goes on ticking.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, sock)
}

/// The smaps entry of the mapping of exactly `size_kib` (guest RAM: nothing else in ember
/// has that size), as (field, value in kB) pairs.
fn guest_ram_smaps(pid: u32, size_kib: u64) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut current: Vec<(String, u64)> = Vec::new();
    let mut found = None;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let Some(key) = it.next() else { continue };
        if !key.ends_with(':') {
            if current.contains(&("Size".to_string(), size_kib)) {
                found = Some(std::mem::take(&mut current));
            }
            current.clear();
            continue;
        }
        let value = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        current.push((key.trim_end_matches(':').to_string(), value));
    }
    if current.contains(&("Size".to_string(), size_kib)) {
        found = Some(current);
    }
    found.unwrap_or_else(|| panic!("no mapping of {size_kib} kB in ember's smaps:\n{smaps}"))
}

fn field(smaps: &[(String, u64)], name: &str) -> u64 {
    smaps
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {smaps:?}"))
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// `2M`: guest RAM is one hugetlbfs mapping of 2 MiB pages, reserved from the pool when
/// the VM is built and taken from it as the guest touches memory; the API reports it; the
/// pages go back when ember exits.
#[test]
fn hugetlbfs_2m_backs_guest_ram() {
    let dir = TempDir::new("hp-2m");
    let _pages = HugePagesReserved::new(16);
    let free_before = meminfo("HugePages_Free:");
    let cfg = config(&dir, 32, "2M", "counter");
    let (child, sock) = start_ticking(&dir, &cfg);

    let ram = guest_ram_smaps(child.id(), 32 << 10);
    assert_eq!(field(&ram, "KernelPageSize"), 2048, "{ram:?}");
    let used = free_before - meminfo("HugePages_Free:");
    assert!(
        (1..=16).contains(&used),
        "the guest took {used} huge pages from the pool"
    );
    // The rest of the VM's 16 pages stay reserved for it.
    assert!(meminfo("HugePages_Rsvd:") >= 16 - used);

    let mc: serde_json::Value =
        serde_json::from_str(&http_ok(&sock, "GET", "/machine-config", None)).unwrap();
    assert_eq!(mc["huge_pages"], "2M", "{mc}");
    let vc: serde_json::Value =
        serde_json::from_str(&http_ok(&sock, "GET", "/vm/config", None)).unwrap();
    assert_eq!(vc["machine-config"]["huge_pages"], "2M", "{vc}");

    stop(child);
    assert_eq!(meminfo("HugePages_Free:"), free_before);
}

/// `Transparent`: guest RAM is an anonymous mapping advised MADV_HUGEPAGE, so the kernel
/// may back it with huge pages even where THP is `madvise` only; the guest runs to its end.
#[test]
fn transparent_huge_pages_boot() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        skip(
            "transparent_huge_pages_boot",
            "transparent huge pages are off on this host (`never` or no THP)",
        );
        return;
    }
    let dir = TempDir::new("hp-thp");
    let cfg = config(&dir, 64, "Transparent", "counter");
    let (child, sock) = start_ticking(&dir, &cfg);
    let ram = guest_ram_smaps(child.id(), 64 << 10);
    assert_eq!(field(&ram, "THPeligible"), 1, "{ram:?}");
    let mc: serde_json::Value =
        serde_json::from_str(&http_ok(&sock, "GET", "/machine-config", None)).unwrap();
    assert_eq!(mc["huge_pages"], "Transparent", "{mc}");
    stop(child);

    let cfg = config(&dir, 64, "Transparent", "basic");
    let args = ["--no-api", "--config-file", cfg.as_str()];
    let out = wait(spawn(&args), T);
    out.assert_ok();
    assert!(out.has_line("ember-test-guest: done"), "{out:#?}");
}

/// A pool too small for the VM: the build fails at once with a message that says how many
/// pages are missing and how to reserve them, through the config file (exit 152) and the
/// API (400, ember still pre-boot). A size that is no multiple of 2 MiB is refused.
#[test]
fn unavailable_huge_pages_are_a_clear_error() {
    let _lock = huge_pages_lock();
    let avail = meminfo("HugePages_Free:").saturating_sub(meminfo("HugePages_Rsvd:"));
    let mem_mib = (avail + 4) * 2;
    let dir = TempDir::new("hp-none");
    let cfg = config(&dir, mem_mib, "2M", "basic");
    let out = wait(spawn(&["--no-api", "--config-file", cfg.as_str()]), T);
    assert_eq!(out.code, Some(152), "{out:#?}");
    assert!(
        out.stderr.contains(&format!(
            "this VM needs {}; reserve them as root with",
            avail + 4
        )) && out.stderr.contains("/proc/sys/vm/nr_hugepages"),
        "{}",
        out.stderr
    );

    let sock = dir.path("api.sock");
    let mut child = Command::new(EMBER)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(T, Duration::from_millis(5), || Path::new(&sock).exists()));
    let guest = guest();
    http_ok(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(r#"{{"kernel_image_path": "{guest}"}}"#)),
    );
    let (status, e) = http(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 33, "huge_pages": "2M"}"#),
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(e.contains("multiple of 2"), "{e}");
    http_ok(
        &sock,
        "PUT",
        "/machine-config",
        Some(&format!(
            r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "huge_pages": "2M"}}"#
        )),
    );
    let (status, e) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    )
    .unwrap();
    assert_eq!(status, 400, "{e}");
    assert!(e.contains("nr_hugepages"), "{e}");
    // Still pre-boot: the same VM on 4 KiB pages starts.
    http_ok(
        &sock,
        "PATCH",
        "/machine-config",
        Some(r#"{"huge_pages": "None"}"#),
    );
    let (status, e) = http(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    )
    .unwrap();
    assert_eq!(status, 204, "{e}");
    let _ = child.kill();
    let _ = child.wait();
}
