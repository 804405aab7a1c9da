//! Issue 9, point 1: tools/build-guest on a fresh machine (an empty EMBER_CACHE) exits 0
//! and prints the paths of what it built. The kernel compile (minutes) is replaced by
//! EMBER_KERNEL_FROM, pointing at the kernel tools/test already built (the script checks
//! it like a fresh build); the root file system is really built.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;

fn build_guest(cache: &Path, kernel_from: &Path, args: &[&str]) -> Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/build-guest"))
        .args(args)
        .env("EMBER_CACHE", cache)
        .env("EMBER_KERNEL_FROM", kernel_from)
        .output()
        .expect("run tools/build-guest")
}

/// The `name=path` lines, in order; paths are plain here (no characters that need quoting).
fn paths(out: &Output) -> Vec<(String, PathBuf)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not name=path: {l:?}"));
            (k.to_string(), PathBuf::from(v))
        })
        .collect()
}

fn debugfs_cat(image: &Path, file: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs cat {file} failed");
    out.stdout
}

#[test]
fn cold_cache_build_exits_zero_and_prints_the_paths() {
    let Some(vmlinux) = std::env::var_os("EMBER_VMLINUX").filter(|v| !v.is_empty()) else {
        common::skip(
            "cold_cache_build_exits_zero_and_prints_the_paths",
            "EMBER_VMLINUX not set (tools/test sets it; this test takes the kernel from \
             there instead of compiling one)",
        );
        return;
    };
    let kernel_from = Path::new(&vmlinux)
        .parent()
        .expect("kernel dir")
        .to_path_buf();
    let dir = TempDir::new("build-guest");
    let cache = dir.path("cache");
    assert!(!cache.exists());

    let out = build_guest(&cache, &kernel_from, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cold build-guest failed ({}); stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("rootfs: built"),
        "rootfs not built:\n{stderr}"
    );
    let got = paths(&out);
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["vmlinux", "bzimage", "config", "rootfs"]);
    for (name, p) in &got {
        assert!(
            p.starts_with(cache.join("guest")),
            "{name}={} is not in the cache",
            p.display()
        );
        assert!(p.is_file(), "{name}={} does not exist", p.display());
    }
    assert_eq!(
        std::fs::read(&got[0].1).unwrap(),
        std::fs::read(&vmlinux).unwrap(),
        "vmlinux differs from the kernel it was taken from"
    );

    // The image holds the recipe's init and the busybox it runs with.
    let rootfs = &got[3].1;
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/guest/rootfs");
    assert_eq!(
        debugfs_cat(rootfs, "/sbin/init"),
        std::fs::read(recipe.join("sbin/init")).unwrap()
    );
    assert_eq!(
        debugfs_cat(rootfs, "/bin/busybox"),
        std::fs::read("/bin/busybox").unwrap()
    );

    // A second run and --print find it all cached and print the same paths.
    for args in [&[][..], &["--print"][..]] {
        let again = build_guest(&cache, &kernel_from, args);
        assert!(
            again.status.success(),
            "build-guest {args:?}: {}",
            again.status
        );
        assert_eq!(paths(&again), got, "build-guest {args:?}");
        assert!(
            !String::from_utf8_lossy(&again.stderr).contains("built"),
            "build-guest {args:?} rebuilt something"
        );
    }
}
