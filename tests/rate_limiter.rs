//! Rate limiters end to end: the test guest's `blkbench` times its reads and writes of two
//! drives, one limited, one not, in the same VM; the limited one holds its rate within
//! 10% and the other runs far above it.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const MIB: f64 = 1_048_576.0;

/// `blk-bench: <op> <size> <MiB/s> <requests>` lines of the device at `base`, as
/// (op, size, MiB/s).
fn bench_lines(stdout: &str, base: &str) -> Vec<(String, u64, f64)> {
    let mut mine = false;
    let mut out = Vec::new();
    for l in stdout.lines() {
        if let Some(b) = l.strip_prefix("blk-bench: device ") {
            mine = b.trim() == base;
            continue;
        }
        let w: Vec<&str> = l.split_whitespace().collect();
        if mine && let ["blk-bench:", op @ ("read" | "write"), size, rate, _] = w[..] {
            out.push((op.to_string(), size.parse().unwrap(), rate.parse().unwrap()));
        }
    }
    out
}

#[test]
fn a_drive_limit_holds_and_its_neighbour_is_not_slowed() {
    let dir = TempDir::new("rl-blk");
    let (free, slow) = (dir.path("free.img"), dir.path("slow.img"));
    // 4 MiB: the bench moves the whole disk in each of its four runs.
    let n_bytes: u64 = 4 << 20;
    std::fs::write(&free, vec![0u8; n_bytes as usize]).unwrap();
    std::fs::write(&slow, vec![0u8; n_bytes as usize]).unwrap();
    // 1 MiB/s: a 2 MiB bucket refilled every 2 s. Twice the largest request, so
    // tokens that trickle in while a refused request waits for the limiter's 100 ms
    // timer stay in the bucket (a bucket only as big as a request would cap them away,
    // and a stream of such requests would then run below the rate, as in Firecracker).
    let (size, refill_ms) = (2u64 << 20, 2000u64);
    let rate = size as f64 * 1000.0 / refill_ms as f64;
    let drive = |id: &str, p: &std::path::Path, rl: &str| {
        format!(
            r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false{rl}}}"#,
            p.display()
        )
    };
    let limited = format!(
        r#", "rate_limiter": {{"bandwidth": {{"size": {size}, "refill_time": {refill_ms}}},
                               "ops": {{"size": 100000, "refill_time": 1000}}}}"#
    );
    let cfg = guest_config(
        "console=ttyS0 ember_test=blkbench",
        1,
        128,
        &format!(
            r#""drives": [{}, {}]"#,
            drive("free", &free, ""),
            drive("slow", &slow, &limited)
        ),
    );
    let metrics = dir.path("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    let cfg = cfg.trim_end().trim_end_matches('}').to_string()
        + &format!(
            r#", "metrics": {{"metrics_path": "{}"}}}}"#,
            metrics.display()
        );
    let o = run_config(&cfg, &[], T);
    o.assert_ok();

    // Firecracker's buckets refill lazily: the first refill after the bucket sat full for
    // a refill time fills it again, so the first run can move up to 2 * `size` at once
    // (4 MiB here: all of it). Each later run starts with the bucket drained by the one
    // before, and must keep to the rate: never above it by more than 10%. Below it only
    // when the guest itself cannot keep up: with 1 MiB requests it has 10x headroom even
    // in a debug build on a loaded host, so those runs are held within 10% both ways; its
    // 4 KiB runs (a few MiB/s at best here) get a looser floor.
    let expected = rate / MIB;
    let slow_runs = bench_lines(&o.stdout, "0xd0002000");
    assert_eq!(slow_runs.len(), 4, "{}", o.stdout);
    for (op, req, got) in slow_runs.iter().skip(1) {
        let floor = if *req >= 1 << 20 { 0.9 } else { 0.75 };
        assert!(
            *got <= expected * 1.1 && *got >= expected * floor,
            "limited drive, {op} in {req}-byte requests: {got} MiB/s, limit {expected:.2}\n{}",
            o.stdout
        );
    }
    let free_runs = bench_lines(&o.stdout, "0xd0001000");
    assert_eq!(free_runs.len(), 4, "{}", o.stdout);
    // The unlimited drive is not held to its neighbour's limit. (A debug build on a
    // loaded 2-core host moves 4 KiB requests at a few MiB/s: compare with the limit,
    // not with a figure from another run.)
    for (op, req, got) in &free_runs {
        assert!(
            *got > 2.0 * expected,
            "unlimited drive, {op} in {req}-byte requests: {got} MiB/s is not clearly above \
             the neighbour's limit of {expected:.2}\n{}",
            o.stdout
        );
    }
    // The throttled events are counted, for the limited drive only.
    let m = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
    let throttled =
        |id: &str| last[format!("block_{id}")]["rate_limiter_throttled_events"].as_u64();
    assert!(throttled("slow").unwrap() > 0, "{m}");
    assert_eq!(throttled("free"), Some(0), "{m}");
}
