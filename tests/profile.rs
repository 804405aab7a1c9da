//! Issue 17 point 3: the guest boot profiler (`--profile-boot`), on the test guest's
//! `profile` mode, which spins in `profile_hot` (called from `profile_outer`) for 1.5 s.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(90);

/// `self % total % function` rows after the `#` header lines and the column line.
fn table_rows(table: &str) -> Vec<(u64, u64, String)> {
    table
        .lines()
        .filter(|l| !l.starts_with('#'))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 5, "table row `{l}`");
            (
                f[0].parse().unwrap(),
                f[2].parse().unwrap(),
                f[4].to_string(),
            )
        })
        .collect()
}

/// `a;b;c N` lines.
fn folded_lines(folded: &str) -> Vec<(Vec<String>, u64)> {
    folded
        .lines()
        .map(|l| {
            let (stack, n) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("folded line `{l}`"));
            let frames: Vec<String> = stack.split(';').map(str::to_string).collect();
            assert!(
                frames.iter().all(|f| !f.is_empty() && !f.contains(' ')),
                "`{l}`"
            );
            (
                frames,
                n.parse().unwrap_or_else(|_| panic!("count in `{l}`")),
            )
        })
        .collect()
}

#[test]
fn samples_land_in_the_hot_function_with_its_callers() {
    let dir = TempDir::new("profile");
    let out = dir.path("boot.prof");
    let o = run_config(
        &guest_config("console=ttyS0 ember_test=profile", 1, 128, ""),
        &[
            "--profile-boot",
            out.to_str().unwrap(),
            "--profile-boot-hz",
            "997",
            "--profile-boot-until",
            "profile: done",
            "--profile-boot-stacks",
            "--level",
            "Info",
        ],
        T,
    );
    o.assert_ok();
    assert!(o.stdout.contains("profile: done rounds="), "{o:#?}");
    let table = std::fs::read_to_string(&out).unwrap();
    let folded = std::fs::read_to_string(dir.path("boot.prof.folded")).unwrap();
    assert!(
        table.starts_with("# ember boot profile: ")
            && table.contains(" at 997 Hz ")
            && table.contains("until marker \"profile: done\""),
        "{table}"
    );
    assert!(table.contains("symbols from"), "{table}");
    let rows = table_rows(&table);
    let all: u64 = folded_lines(&folded).iter().map(|(_, n)| n).sum();
    // 1.5 s at 997 Hz: several hundred samples even on a loaded host.
    assert!(all >= 100, "only {all} samples\n{table}");
    // Most of them in the hot function, named from the guest ELF's symbols.
    let (hot_self, _, top) = &rows[0];
    assert_eq!(top, "profile_hot", "{table}");
    assert!(*hot_self * 2 > all, "{table}");
    // The frame-pointer walk finds its callers: profile_outer's total covers the hot
    // function's samples.
    let outer = rows.iter().find(|r| r.2 == "profile_outer");
    let hot_stacks: u64 = folded_lines(&folded)
        .iter()
        .filter(|(f, _)| f.ends_with(&["profile_outer".to_string(), "profile_hot".to_string()]))
        .map(|(_, n)| n)
        .sum();
    assert!(hot_stacks * 10 >= hot_self * 9, "{folded}");
    assert!(
        folded
            .lines()
            .any(|l| l.contains("guest_main;profile_outer;profile_hot ")),
        "{folded}"
    );
    if let Some((_, total, _)) = outer {
        assert!(*total >= hot_stacks, "{table}");
    }
    assert!(o.stderr.contains("boot profile: "), "{}", o.stderr);
    // The hottest instructions, as addresses with function+offset.
    let insns = table
        .split("instruction\n")
        .nth(1)
        .unwrap_or_else(|| panic!("{table}"));
    let first = insns.lines().next().unwrap();
    assert!(
        first.contains(" 0x10") && first.contains("profile_hot+0x"),
        "{table}"
    );
}

#[test]
fn without_stacks_frames_are_functions_and_a_time_limit_ends_it() {
    let dir = TempDir::new("profile-flat");
    let out = dir.path("p");
    let o = run_config(
        &guest_config("console=ttyS0 ember_test=profile", 1, 128, ""),
        &[
            "--profile-boot",
            out.to_str().unwrap(),
            "--profile-boot-hz",
            "200",
            "--profile-boot-until",
            "0.5s",
        ],
        T,
    );
    o.assert_ok();
    let table = std::fs::read_to_string(&out).unwrap();
    assert!(
        table.contains("at 200 Hz") && table.contains("until time limit 0.5 s"),
        "{table}"
    );
    let folded = std::fs::read_to_string(dir.path("p.folded")).unwrap();
    let lines = folded_lines(&folded);
    assert!(lines.iter().all(|(f, _)| f.len() == 1), "{folded}");
    let all: u64 = lines.iter().map(|(_, n)| n).sum();
    // At most 0.5 s at 200 Hz (and a few ticks of slack), at least some.
    assert!((1..=110).contains(&all), "{all} samples\n{table}");
}

#[test]
fn bad_profile_flags_are_clear_errors() {
    let dir = TempDir::new("profile-bad");
    let cfg = guest_config("console=ttyS0", 1, 128, "");
    let out = dir.path("p");
    let o = out.to_str().unwrap();
    let notelf = dir.path("notelf");
    std::fs::write(&notelf, b"MZ...").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--profile-boot-hz", "100"],
            "needs --profile-boot FILE",
        ),
        (
            vec!["--profile-boot", o, "--profile-boot-hz", "0"],
            "sampling rate",
        ),
        (
            vec!["--profile-boot", o, "--profile-boot-hz", "lots"],
            "sampling rate",
        ),
        (
            vec!["--profile-boot", o, "--profile-boot-until", "0"],
            "time limit",
        ),
        (
            vec!["--profile-boot", o, "--profile-boot-until", ""],
            "marker",
        ),
        (
            vec!["--profile-boot", "/nonexistent-dir/p"],
            "cannot create /nonexistent-dir/p",
        ),
        (
            vec![
                "--profile-boot",
                o,
                "--profile-boot-symbols",
                notelf.to_str().unwrap(),
            ],
            "not an ELF64 image",
        ),
        (vec!["--profile-boot"], "needs a value"),
    ];
    for (args, want) in cases {
        let o = run_config(&cfg, &args, T);
        assert_eq!(o.code, Some(153), "{args:?}: {o:#?}");
        assert!(
            o.stderr.contains(want),
            "{args:?}: want `{want}` in {}",
            o.stderr
        );
        assert!(
            !o.stdout.contains("ember-test-guest: hello"),
            "{args:?} booted"
        );
    }
}

/// A bzImage has no symbol table: the log says so and the samples are raw addresses. With
/// `--profile-boot-symbols` naming the matching vmlinux, that file's symbols are loaded.
/// The VM runs on after its 2-second profile and is killed.
#[test]
fn a_bzimage_gives_raw_addresses_unless_a_vmlinux_is_named() {
    let Some(bz) = std::env::var("EMBER_BZIMAGE")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        skip(
            "profile bzImage",
            "EMBER_BZIMAGE not set (tools/test sets it from tools/build-guest)",
        );
        return;
    };
    let vmlinux = std::env::var("EMBER_VMLINUX")
        .ok()
        .filter(|v| !v.is_empty());
    let dir = TempDir::new("profile-bz");
    let cfg = dir.path("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{bz}", "boot_args": "console=ttyS0"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}}}"#
        ),
    )
    .unwrap();
    let mut runs = vec![(dir.path("raw"), None)];
    if let Some(v) = &vmlinux {
        runs.push((dir.path("named"), Some(v.clone())));
    }
    for (out, symbols) in runs {
        let mut args = vec![
            "--no-api".to_string(),
            "--config-file".into(),
            cfg.to_str().unwrap().into(),
            "--profile-boot".into(),
            out.to_str().unwrap().into(),
            "--profile-boot-until".into(),
            "2".into(),
            "--level".into(),
            "Info".into(),
        ];
        if let Some(s) = &symbols {
            args.extend(["--profile-boot-symbols".into(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn(&args);
        let written = wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
            std::fs::read_to_string(&out).is_ok_and(|t| t.contains("function\n"))
        });
        send_signal(&child, libc::SIGTERM);
        let o = wait(child, T);
        assert!(written, "no profile within 60 s: {o:#?}");
        let table = std::fs::read_to_string(&out).unwrap();
        assert!(table.contains("until time limit 2.0 s"), "{table}");
        match &symbols {
            None => {
                assert!(table.contains("is no ELF image (a bzImage?)"), "{table}");
                assert!(o.stderr.contains("--profile-boot-symbols"), "{}", o.stderr);
                let folded = std::fs::read_to_string(format!("{}.folded", out.display())).unwrap();
                assert!(
                    folded.lines().all(|l| l.starts_with("0x")),
                    "raw addresses expected: {folded}"
                );
            }
            Some(v) => assert!(table.contains(&format!("symbols from {v} (")), "{table}"),
        }
    }
}
