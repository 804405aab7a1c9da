//! Hostile guests: the test guest (`ember_test=hostile`) attacks the first virtio-blk
//! device (and a virtio-net device's TX queue) with what a malicious driver could do:
//! looping and over-long chains, addresses outside guest memory and across the memory
//! gap, overflowing lengths, avail-index jumps, bad queue sizes, notify storms, accesses
//! at every MMIO offset and size, config reads past the end, resets mid-request. After
//! each attack it reads from a second drive (the bystander) and, after a reset, from the
//! attacked one. ember must stay up, only the attacked device may fail (or ask for a
//! reset), and the metrics must count what happened.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
/// DEVICE_NEEDS_RESET in the Status register.
const NEEDS_RESET: u64 = 0x40;

fn drive(id: &str, path: &Path, engine: &str) -> String {
    format!(
        r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false,
             "is_read_only": false, "io_engine": "{engine}"}}"#,
        path.display()
    )
}

/// Boots the hostile guest on two drives (and a TAP ember creates, if `tap` is given)
/// with `mem_mib` of RAM; returns the run and the metrics written at exit.
fn attack(
    tag: &str,
    attacks: &str,
    mem_mib: u64,
    tap: Option<&str>,
    engine: &str,
) -> (Outcome, serde_json::Value) {
    let dir = TempDir::new(tag);
    let (victim, bystander) = (dir.path("victim.img"), dir.path("bystander.img"));
    for p in [&victim, &bystander] {
        std::fs::write(p, vec![0x5au8; 64 * 512]).expect("write image");
    }
    let mut extra = format!(
        r#""drives": [{}, {}]"#,
        drive("victim", &victim, engine),
        drive("bystander", &bystander, engine)
    );
    if let Some(tap) = tap {
        extra.push_str(&format!(
            r#", "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}"}}]"#
        ));
    }
    let mut args = "console=ttyS0 ember_test=hostile".to_string();
    if !attacks.is_empty() {
        args.push_str(&format!(" ember_hostile={attacks}"));
    }
    let metrics = dir.path("metrics.json");
    let o = run_config(
        &guest_config(&args, 1, mem_mib, &extra),
        &["--metrics-path", metrics.to_str().unwrap()],
        T,
    );
    o.assert_ok();
    assert!(o.has_line("hostile: end"), "{o:#?}");
    assert!(o.has_line("ember-test-guest: done"), "{o:#?}");
    assert!(!o.stdout.contains("hostile: error"), "{o:#?}");
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let m = serde_json::from_str(text.lines().last().expect("a metrics line")).expect("json");
    (o, m)
}

/// The value of `key=` on the guest's line starting with `prefix`.
fn field(o: &Outcome, prefix: &str, key: &str) -> String {
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line `{prefix}...`\n{o:#?}"));
    let want = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&want))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
        .to_string()
}

/// The attacked device's Status after attack `name`; asserts the bystander and the
/// attacked device (after a reset) both read successfully.
fn verdict(o: &Outcome, name: &str) -> u64 {
    let prefix = format!("hostile: {name} status=");
    assert_eq!(
        field(o, &prefix, "other"),
        "0",
        "bystander after {name}\n{o:#?}"
    );
    assert_eq!(
        field(o, &prefix, "self"),
        "0",
        "victim after reset, {name}\n{o:#?}"
    );
    let st = field(o, &prefix, "status");
    u64::from_str_radix(st.trim_start_matches("0x"), 16).expect("hex status")
}

fn counter(m: &serde_json::Value, section: &str, key: &str) -> u64 {
    m[section][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {section}.{key} in {m}"))
}

/// On either I/O engine: with Async, a buffer the guest points outside its memory is
/// refused before anything reaches io_uring, and the resets in the middle of requests
/// wait (on the vCPU thread, under its seccomp filter) for what the kernel has in flight.
#[test]
fn hostile_driver_fails_only_its_own_device() {
    for engine in ["Sync", "Async"] {
        hostile_driver_on(engine);
    }
}

fn hostile_driver_on(engine: &str) {
    let tap = format!("eh{}", std::process::id() % 100_000);
    let (o, m) = attack("hostile", "", 128, Some(&tap), engine);

    // Chains that loop or outgrow the queue come back unanswered.
    for name in ["loop", "long", "long-indirect"] {
        let prefix = format!("hostile: {name} used=");
        assert_eq!(field(&o, &prefix, "used"), "1", "{name}\n{o:#?}");
        assert_eq!(field(&o, &prefix, "len"), "0", "{name}\n{o:#?}");
        assert_eq!(field(&o, &prefix, "req"), "255", "{name}\n{o:#?}");
    }
    assert!(counter(&m, "block_victim", "invalid_chains") >= 3, "{m}");
    // Buffers outside guest memory, across its end, and lengths that overflow: IOERR.
    assert_eq!(field(&o, "hostile: outside-header used=", "req"), "1");
    assert_eq!(field(&o, "hostile: outside-data", "req"), "1");
    assert_eq!(field(&o, "hostile: gap at=", "req"), "1");
    assert_eq!(field(&o, "hostile: overflow wrap", "req"), "1", "{o:#?}");
    assert!(counter(&m, "block_victim", "failed_requests") >= 4, "{m}");
    // A chain of more than 4 GiB (one descriptor of 2^32 - 1 bytes after the header, or
    // two of 2 GiB) is no chain at all (virtio 1.2 §2.7.5): returned unanswered.
    for what in ["max", "sum"] {
        assert_eq!(
            field(&o, &format!("hostile: overflow {what}"), "req"),
            "255",
            "{o:#?}"
        );
    }
    assert!(counter(&m, "block_victim", "invalid_chains") >= 5, "{m}");
    // An avail index past the ring: nothing is processed, the device needs a reset.
    assert_eq!(field(&o, "hostile: availjump used=", "used"), "0");
    assert_eq!(verdict(&o, "availjump") & NEEDS_RESET, NEEDS_RESET);
    assert!(counter(&m, "virtio", "avail_index_jumps") >= 1, "{m}");
    // Queue sizes that are no power of two, 0, or too large never become ready.
    for size in [6, 0, 1024, 3] {
        assert_eq!(field(&o, &format!("hostile: qsize {size} "), "ready"), "0");
    }
    assert_eq!(verdict(&o, "qsize") & NEEDS_RESET, NEEDS_RESET);
    assert!(counter(&m, "virtio", "bad_queue_configs") >= 4, "{m}");
    assert!(counter(&m, "virtio", "needs_reset") >= 3, "{m}");
    // A notify storm: the one request completes once; the notifies are counted (those
    // still pending in the ioeventfd when the VM stops may not be, seen on a loaded host).
    assert_eq!(field(&o, "hostile: storm used=", "used"), "1");
    assert_eq!(field(&o, "hostile: storm used=", "req"), "0");
    assert!(counter(&m, "virtio", "queue_notifies") >= 9_000, "{m}");
    assert!(counter(&m, "virtio", "bad_notifies") >= 1_000, "{m}");
    // Every MMIO offset at every size, and config reads past its end.
    assert!(counter(&m, "virtio", "bad_register_accesses") >= 900, "{m}");
    assert_eq!(field(&o, "hostile: config", "nonzero"), "0");
    assert!(counter(&m, "virtio", "config_out_of_range") >= 1_000, "{m}");
    assert!(counter(&m, "virtio", "config_writes_ignored") >= 1, "{m}");
    // Resets in the middle of requests.
    assert_eq!(field(&o, "hostile: reset rounds=", "rounds"), "50");
    assert!(counter(&m, "virtio", "active_resets") >= 50, "{m}");
    // The net device: a looping TX chain is dropped, a TX avail jump needs a reset.
    assert_eq!(field(&o, "hostile: net-loop used=", "used"), "1");
    assert!(counter(&m, "net_eth0", "tx_malformed") >= 1, "{m}");
    assert_eq!(field(&o, "hostile: net-availjump used=", "used"), "0");
    assert_eq!(verdict(&o, "net") & NEEDS_RESET, NEEDS_RESET);

    // Whatever the attack, the bystander kept working and the victim recovered.
    for name in [
        "loop", "long", "outside", "gap", "overflow", "mmio", "config", "storm", "reset",
    ] {
        verdict(&o, name);
    }
    // The bystander saw only good requests.
    assert_eq!(counter(&m, "block_bystander", "failed_requests"), 0, "{m}");
    assert_eq!(counter(&m, "block_bystander", "invalid_chains"), 0, "{m}");
}

/// With RAM up to the MMIO gap (and on above 4 GiB), a buffer that starts in RAM and
/// runs into the gap fails its request and nothing else (on the Async engine, whose
/// buffers are handed to the kernel; Sync's run in the test above).
#[test]
fn buffer_across_the_memory_gap_fails_alone() {
    // 3456 MiB: low RAM ends at the gap (0xd000_0000), 128 MiB continue above 4 GiB.
    let (o, m) = attack("hostile-gap", "gap", 3456, None, "Async");
    assert_eq!(field(&o, "hostile: gap at=", "at"), "0xcfffff00", "{o:#?}");
    assert_eq!(field(&o, "hostile: gap at=", "req"), "1", "{o:#?}");
    verdict(&o, "gap");
    assert!(counter(&m, "block_victim", "failed_requests") >= 1, "{m}");
}
