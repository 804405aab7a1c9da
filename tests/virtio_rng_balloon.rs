//! virtio-rng, virtio-balloon and PUT /serial end to end: the test guest
//! (`ember_test=rng`, `ember_test=balloon`) drives the devices; the host side sets the
//! balloon's target through the API and watches ember's resident memory.

mod common;

use std::io::BufReader;
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(120);

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn entropy_reaches_the_guest_and_serial_output_goes_to_a_file() {
    let dir = TempDir::new("rng");
    let out = dir.path("serial.out");
    let cfg = guest_config(
        "console=ttyS0 ember_test=rng",
        1,
        128,
        &format!(
            r#""entropy": {{"rate_limiter": null}}, "serial": {{"serial_out_path": "{}"}}"#,
            out.display()
        ),
    );
    let o = run_config(&cfg, &[], T);
    o.assert_ok();
    // The console went to the file, not to stdout.
    assert!(!o.stdout.contains("ember-test-guest: hello"), "{o:#?}");
    let serial = std::fs::read_to_string(&out).expect("serial output file");
    let has = |l: &str| serial.lines().any(|s| s.trim_end() == l);
    assert!(has("rng: len=64,64 differ=1"), "{serial}");
    // A buffer outside guest memory comes back empty, and the device goes on working.
    assert!(has("rng: outside len=0"), "{serial}");
    assert!(has("rng: after len=64 differ=1"), "{serial}");
    assert!(has("ember-test-guest: done"), "{serial}");
}

/// A token bucket of one request per refill: every request after the first waits for the
/// limiter's timer (an event source of the device), and the guest still gets them all.
#[test]
fn an_entropy_rate_limiter_holds_requests_until_its_timer() {
    let o = run_config(
        &guest_config(
            "console=ttyS0 ember_test=rng",
            1,
            128,
            r#""entropy": {"rate_limiter": {"ops": {"size": 1, "refill_time": 100}}}"#,
        ),
        &[],
        T,
    );
    o.assert_ok();
    assert!(o.has_line("rng: len=64,64 differ=1"), "{o:#?}");
    assert!(o.has_line("rng: outside len=0"), "{o:#?}");
    assert!(o.has_line("rng: after len=64 differ=1"), "{o:#?}");
    assert!(!o.stdout.contains("timed out"), "{o:#?}");
}

#[test]
fn without_an_entropy_device_the_guest_finds_none() {
    let o = run_config(
        &guest_config("console=ttyS0 ember_test=rng", 1, 128, ""),
        &[],
        T,
    );
    o.assert_ok();
    assert!(o.has_line("rng: no device"), "{o:#?}");
}

struct Ember {
    child: Child,
    sock: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_with_config(cfg: &str) -> Ember {
    let dir = TempDir::new("balloon");
    let sock = dir.path("api.sock");
    let path = dir.path("vm.json");
    std::fs::write(&path, cfg).unwrap();
    let child = spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        path.to_str().unwrap(),
    ]);
    wait_for_socket(&sock, T);
    Ember {
        child,
        sock,
        _dir: dir,
    }
}

#[test]
fn balloon_inflates_releases_memory_deflates_and_reports_statistics() {
    let cfg = guest_config(
        "console=ttyS0 ember_test=balloon",
        1,
        128,
        r#""balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    );
    let mut e = start_with_config(&cfg);
    let sock = e.sock.clone();
    let mut out = BufReader::new(e.child.stdout.take().unwrap());
    // The first line that starts with `want` (or an error line).
    let line = |out: &mut BufReader<_>, want: &str| {
        read_until(out, T, |l| l.starts_with(want) || l.contains("error"))
            .unwrap_or_else(|| panic!("no `{want}` from the guest"))
    };
    assert_eq!(line(&mut out, "balloon: ready"), "balloon: ready stats=1");
    let pid = e.child.id();
    let before = rss_kib(pid);

    // Inflate 16 MiB: the guest hands over its filled pool, ember gives it to the host.
    let (s, b) = curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#));
    assert_eq!(s, 204, "{b}");
    assert_eq!(line(&mut out, "balloon: actual="), "balloon: actual=4096");
    let after = rss_kib(pid);
    eprintln!("ember VmRSS: {before} KiB before inflating 16 MiB, {after} KiB after");
    assert!(
        after + 12 * 1024 <= before,
        "resident memory fell by {} KiB only",
        before.saturating_sub(after)
    );

    // Statistics: the 1 s timer asks, the guest answers (and counts its answers).
    line(&mut out, "balloon: stats=");
    let (s, b) = curl(&sock, "GET", "/balloon/statistics", None);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["target_pages"], 4096, "{b}");
    assert_eq!(v["target_mib"], 16, "{b}");
    assert_eq!(v["actual_pages"], 4096, "{b}");
    assert_eq!(v["actual_mib"], 16, "{b}");
    assert_eq!(v["total_memory"], 128u64 << 20, "{b}");
    assert!(v["major_faults"].as_u64().is_some(), "{b}");
    assert!(v.get("swap_in").is_none(), "{b}");

    let (s, b) = curl(&sock, "GET", "/balloon", None);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["amount_mib"], 16, "{b}");
    assert_eq!(v["stats_polling_interval_s"], 1, "{b}");
    let (s, b) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["balloon"]["amount_mib"], 16, "{b}");

    // Refusals: statistics cannot be switched off, a target beyond memory, a second PUT.
    let (s, b) = curl(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 0}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("cannot be enabled/disabled"), "{b}");
    let (s, b) = curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 200}"#));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("too large"), "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
    );
    assert_eq!(s, 400, "{b}");
    let (s, b) = curl(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 2}"#),
    );
    assert_eq!(s, 204, "{b}");

    // Deflate: every page the guest takes back reads as zero (the host released it).
    let (s, b) = curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(s, 204, "{b}");
    assert_eq!(
        line(&mut out, "balloon: deflated="),
        "balloon: deflated=4096 zeroed=4096"
    );
    // Then the guest lies about pages; ember and the guest carry on.
    assert_eq!(
        line(&mut out, "balloon: hostile sent"),
        "balloon: hostile sent pool=ok"
    );
    line(&mut out, "ember-test-guest: done");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = e.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < T,
            "ember did not exit after the guest reset"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn balloon_api_before_start() {
    let dir = TempDir::new("balloon-api");
    let sock = dir.path("api.sock");
    let mut child = spawn(&["--api-sock", sock.to_str().unwrap()]);
    wait_for_socket(&sock, T);
    let (s, b) = curl(&sock, "GET", "/balloon", None);
    assert_eq!(
        (s, b.contains("No balloon device found.")),
        (400, true),
        "{b}"
    );
    let (s, b) = curl(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 16, "deflate_on_oom": false}"#),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(&sock, "GET", "/balloon", None);
    assert_eq!(s, 200, "{b}");
    assert!(b.contains(r#""amount_mib":16"#), "{b}");
    // Run-time updates need a running VM.
    let (s, b) = curl(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib": 1}"#));
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("before starting"), "{b}");
    let (s, b) = curl(&sock, "GET", "/balloon/statistics", None);
    assert_eq!(s, 400, "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 4096, "deflate_on_oom": false}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("Requested memory should be less than 128MiB"),
        "{b}"
    );
    let (s, b) = curl(&sock, "PUT", "/entropy", Some("{}"));
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert!(b.contains("rate_limiter.ops.refill_time"), "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 1}}}"#),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(
        &sock,
        "PUT",
        "/serial",
        Some(r#"{"serial_out_path": "/tmp/x"}"#),
    );
    assert_eq!(s, 204, "{b}");
    let (s, b) = curl(&sock, "GET", "/vm/config", None);
    assert_eq!(s, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["balloon"]["amount_mib"], 16, "{b}");
    assert_eq!(v["entropy"]["rate_limiter"]["ops"]["size"], 1, "{b}");
    assert_eq!(v["serial"]["serial_out_path"], "/tmp/x", "{b}");
    let _ = child.kill();
    let _ = child.wait();
}
