//! Issue 2: booting the test guest from a config file.

mod common;

use std::io::BufReader;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn boots_one_vcpu_128m_and_exits_zero_on_reset() {
    let o = run_config(&guest_config("console=ttyS0", 1, 128, ""), &[], T);
    o.assert_ok();
    assert!(o.has_line("ember-test-guest: hello"), "{o:#?}");
    // With boot_args given and no devices, the line is what we asked plus the host's
    // compatibility arguments.
    assert!(
        o.has_line(&format!("cmdline: console=ttyS0{}", host_args())),
        "{o:#?}"
    );
    assert!(o.has_line("mptable: cpus=1"), "{o:#?}");
    assert!(o.has_line("e820: 0x0 0x9fc00 1"), "{o:#?}");
    assert!(o.has_line("e820: 0x100000 0x8000000 1"), "{o:#?}");
    assert!(o.has_line("lastpage: ok 0x7fff000"), "{o:#?}");
    assert!(o.has_line("ember-test-guest: done"), "{o:#?}");
    // Where no device lives, reads are all ones and nothing is fatal.
    assert!(o.has_line("unmapped: port=0xff mmio=0xffffffff"), "{o:#?}");
}

/// The arguments ember adds on this host (PVM hosts need some, see builder.rs).
fn host_args() -> String {
    if ember::vm::is_pvm_host() {
        format!(" {}", ember::builder::PVM_BOOT_ARGS.join(" "))
    } else {
        String::new()
    }
}

#[test]
fn unmapped_accesses_are_counted() {
    let dir = TempDir::new("unmapped");
    let metrics = dir.path("m.json");
    let o = run_config(
        &guest_config("console=ttyS0", 1, 128, ""),
        &["--metrics-path", metrics.to_str().unwrap()],
        T,
    );
    o.assert_ok();
    let m: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    for k in [
        "pio_unmapped_reads",
        "pio_unmapped_writes",
        "mmio_unmapped_reads",
        "mmio_unmapped_writes",
    ] {
        assert!(m["vcpu"][k].as_u64().unwrap() >= 1, "{k}: {m}");
    }
}

#[test]
fn four_vcpus_in_mp_table_with_per_vcpu_cpuid() {
    let o = run_config(
        &guest_config("console=ttyS0", 4, 128, ""),
        &["--level", "Debug"],
        T,
    );
    o.assert_ok();
    assert!(o.has_line("mptable: cpus=4"), "{o:#?}");
    // Host side: KVM's LAPIC ID and the CPUID leaves 1 and 0xb of each vCPU.
    for i in 0..4 {
        let want = format!(
            "vcpu {i}: lapic_id={i} cpuid_1_apic_id={i} cpuid_b_x2apic_id={i} tsc_deadline=true"
        );
        assert!(o.stderr.contains(&want), "missing `{want}`\n{o:#?}");
    }
}

#[test]
fn four_gib_puts_ram_on_both_sides_of_the_gap() {
    let o = run_config(&guest_config("console=ttyS0", 1, 4096, ""), &[], T);
    o.assert_ok();
    assert!(o.has_line("e820: 0x100000 0xd0000000 1"), "{o:#?}");
    assert!(o.has_line("e820: 0x100000000 0x130000000 1"), "{o:#?}");
    assert!(o.has_line("lastpage: ok 0x12ffff000"), "{o:#?}");
}

#[test]
fn default_boot_args_are_documented_ones() {
    let guest = guest();
    let cfg = format!(r#"{{"boot-source": {{"kernel_image_path": "{guest}"}}}}"#);
    let o = run_config(&cfg, &[], T);
    o.assert_ok();
    assert!(
        o.has_line(&format!(
            "cmdline: {}{}",
            ember::vm::boot::DEFAULT_BOOT_ARGS,
            host_args()
        )),
        "{o:#?}"
    );
}

#[test]
fn triple_fault_exits_nonzero_naming_exit_and_rip() {
    let o = run_config(
        &guest_config("console=ttyS0 ember_test=triplefault", 1, 128, ""),
        &[],
        T,
    );
    assert!(!o.timed_out);
    assert_eq!(o.code, Some(ember::exit_code::GENERIC_ERROR), "{o:#?}");
    assert!(o.stderr.contains("triple fault"), "{o:#?}");
    assert!(o.stderr.contains("KVM_EXIT_SHUTDOWN"), "{o:#?}");
    assert!(o.stderr.contains("guest RIP 0x"), "{o:#?}");
}

fn bad_config(config: &str, needle: &str) {
    let o = run_config(config, &[], T);
    assert!(!o.timed_out);
    assert_eq!(o.code, Some(ember::exit_code::BAD_CONFIGURATION), "{o:#?}");
    assert!(
        o.stderr.contains(needle),
        "expected `{needle}` in stderr\n{o:#?}"
    );
    assert!(!o.stderr.contains("panicked"), "{o:#?}");
}

#[test]
fn missing_kernel_is_a_configuration_error() {
    bad_config(
        r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#,
        "/nonexistent/vmlinux",
    );
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    let dir = TempDir::new("nokernel");
    let p = dir.path("junk");
    std::fs::write(&p, vec![0x42u8; 4096]).unwrap();
    bad_config(
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
            p.display()
        ),
        "neither an ELF vmlinux nor a bzImage",
    );
    // Too short to hold any header at all.
    std::fs::write(&p, b"x").unwrap();
    bad_config(
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
            p.display()
        ),
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn invalid_machine_config_values_are_refused() {
    bad_config(&guest_config("", 1, 0, ""), "mem_size_mib");
    bad_config(&guest_config("", 0, 128, ""), "vcpu_count");
    bad_config(&guest_config("", 33, 128, ""), "vcpu_count");
}

#[test]
fn malformed_json_and_unknown_fields_are_refused() {
    bad_config("{\"boot-source\": ", "line");
    bad_config(
        &guest_config("", 1, 128, r#""logger": {"bogus": 1}"#),
        "bogus",
    );
    // A top-level key ember does not know is ignored with a warning, as Firecracker
    // ignores it (issue 14).
    let o = run_config(
        &guest_config("console=ttyS0", 1, 128, r#""bogus": 1"#),
        &[],
        T,
    );
    o.assert_ok();
    assert!(o.stderr.contains("`bogus` ignored"), "{o:#?}");
    bad_config(
        &guest_config("", 1, 128, r#""balloon": {"amount_mib": 1}"#),
        "balloon",
    );
}

#[test]
fn bad_arguments_exit_153() {
    let o = wait(spawn(&["--no-such-flag"]), T);
    assert_eq!(o.code, Some(ember::exit_code::ARG_PARSING), "{o:#?}");
    assert!(o.stderr.contains("--no-such-flag"), "{o:#?}");
    let o = wait(spawn(&["--no-api"]), T);
    assert_eq!(o.code, Some(ember::exit_code::ARG_PARSING), "{o:#?}");
}

#[test]
fn command_line_over_the_limit_is_refused() {
    let long = "a".repeat(2100);
    bad_config(&guest_config(&long, 1, 128, ""), "command line");
}

/// The guest keeps printing; nobody reads stdout. The vCPU must not stall: bytes beyond
/// what the pipe holds are dropped and counted, and SIGTERM still stops ember promptly.
#[test]
fn unread_stdout_never_stalls_and_sigterm_stops_cleanly() {
    let dir = TempDir::new("stall");
    let cfg = dir.path("vm.json");
    let metrics = dir.path("metrics.json");
    let sock = dir.path("api.sock");
    std::fs::write(
        &cfg,
        guest_config("console=ttyS0 ember_test=flood", 1, 128, ""),
    )
    .unwrap();
    let mut child = spawn(&[
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        cfg.to_str().unwrap(),
        "--metrics-path",
        metrics.to_str().unwrap(),
    ]);
    // Never read stdout; shrink the pipe to one page so it fills at once.
    let stdout = child.stdout.take().unwrap();
    // SAFETY: F_SETPIPE_SZ on the pipe's read end, which we own.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&stdout),
            libc::F_SETPIPE_SZ,
            4096,
        )
    };
    // Poll the metrics (FlushMetrics over the API) until drops show: the guest kept
    // running past a full pipe. How long that takes depends on the host's load only.
    let start = std::time::Instant::now();
    let dropped = loop {
        assert!(start.elapsed() < T, "no dropped bytes counted within {T:?}");
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
            continue;
        };
        let body = r#"{"action_type": "FlushMetrics"}"#;
        let req = format!(
            "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = std::io::Write::write_all(&mut s, req.as_bytes());
        let mut resp = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut resp);
        let Some(last) = std::fs::read_to_string(&metrics)
            .ok()
            .and_then(|t| t.lines().last().map(str::to_string))
        else {
            continue;
        };
        let m: serde_json::Value = serde_json::from_str(&last).unwrap();
        let d = m["uart"]["dropped_out_bytes"].as_u64().unwrap_or(0);
        if d > 0 {
            break d;
        }
    };
    assert!(dropped > 0);
    send_signal(&child, libc::SIGTERM);
    let o = wait_keep_stdout(child, T);
    drop(stdout);
    assert!(!o.0, "ember did not stop after SIGTERM");
    assert_eq!(o.1, Some(128 + libc::SIGTERM));
    assert!(!sock.exists());
}

fn wait_keep_stdout(mut child: std::process::Child, timeout: Duration) -> (bool, Option<i32>) {
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (false, s.code());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return (true, None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigint_stops_cleanly_while_guest_runs() {
    let dir = TempDir::new("sigint");
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        guest_config("console=ttyS0 ember_test=counter", 2, 128, ""),
    )
    .unwrap();
    let mut child = spawn(&["--no-api", "--config-file", cfg.to_str().unwrap()]);
    let mut r = BufReader::new(child.stdout.take().unwrap());
    assert!(read_until(&mut r, T, |l| l.starts_with("tick ")).is_some());
    send_signal(&child, libc::SIGINT);
    let (timed_out, code) = wait_keep_stdout(child, T);
    assert!(!timed_out);
    assert_eq!(code, Some(128 + libc::SIGINT));
}
