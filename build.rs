//! Compiles the seccomp policies, and builds the freestanding test guest (`tests/guest`)
//! with gcc.
//!
//! The guest cannot be written in Rust here: the only installed target's core library
//! uses SSE, which the PVM test hosts cannot run in the guest. Tests and tools find the
//! image through `option_env!("EMBER_TEST_GUEST")`. Keep the flags in step with
//! `tests/guest/Makefile`.
//!
//! ember itself needs no C toolchain: when the guest cannot be built (no gcc, or gcc
//! fails), the build goes on with a warning, EMBER_TEST_GUEST stays unset and
//! EMBER_TEST_GUEST_ERROR says why, so the tests that boot the guest fail with that reason.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build_support/seccomp.rs"]
mod seccomp;

const GUEST_DIR: &str = "tests/guest";
const GUEST_SOURCES: &[&str] = &[
    "start.S",
    "main.c",
    "lib.c",
    "virtio.c",
    "blk.c",
    "net.c",
    "rng.c",
    "balloon.c",
    "blkbench.c",
    "netbench.c",
    "hostile.c",
    "vsock.c",
    "mmds.c",
    "snap.c",
    "cpuid.c",
];
const GUEST_OTHER_INPUTS: &[&str] = &["guest.h", "virtio.h", "guest.ld"];
const GUEST_IMAGE: &str = "ember-test-guest";

/// Freestanding, no SSE/x87 (the guest runs with no FPU state set up and the PVM host
/// rejects several extensions), no red zone (no interrupt stack switch), linked static
/// at 1 MiB by guest.ld.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-mno-popcnt",
    "-O2",
    // Frame pointers: the boot profiler's test walks the guest's stack (tests/profile.rs).
    "-fno-omit-frame-pointer",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fno-builtin",
];
const LDFLAGS: &[&str] = &[
    "-no-pie",
    "-Wl,-T,guest.ld",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,-z,noexecstack",
];

/// Mnemonics the PVM host cannot run in a guest (docs/ARCHITECTURE.md, host notes), plus
/// traps that would hide a real fault in a test.
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "xsave", "xsaveopt", "xsavec", "xsaves", "xrstor", "xrstors", "popcnt", "clac", "stac", "int3",
    "int1", "fwait", "wait", "ud2",
];

fn main() {
    seccomp::compile_seccomp_filters();
    match build_guest() {
        Ok(image) => println!("cargo:rustc-env=EMBER_TEST_GUEST={}", image.display()),
        Err(msg) => {
            for line in msg.lines() {
                println!("cargo:warning=test guest ({GUEST_DIR}) not built: {line}");
            }
            let first = msg.lines().next().unwrap_or("unknown error");
            println!("cargo:rustc-env=EMBER_TEST_GUEST_ERROR={first}");
        }
    }
}

fn build_guest() -> Result<PathBuf, String> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let out_dir = env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?;
    let guest_dir = Path::new(&manifest_dir).join(GUEST_DIR);
    let image = Path::new(&out_dir).join(GUEST_IMAGE);

    for file in GUEST_SOURCES.iter().chain(GUEST_OTHER_INPUTS) {
        println!("cargo:rerun-if-changed={}", guest_dir.join(file).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EMBER_GUEST_CC");

    let cc = env::var("EMBER_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let output = Command::new(&cc)
        .current_dir(&guest_dir)
        .args(CFLAGS)
        .args(LDFLAGS)
        .arg("-o")
        .arg(&image)
        .args(GUEST_SOURCES)
        .output()
        .map_err(|e| format!("cannot run `{cc}` (install gcc or set EMBER_GUEST_CC): {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{cc}` exited with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // Warnings are worth seeing, but must not fail the build on another gcc version.
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo:warning=test guest: {line}");
    }
    check_instructions(&image)?;
    Ok(image)
}

/// Rejects an image with instructions the PVM host cannot run, or any x87/MMX/SSE/AVX
/// instruction, which a compiler upgrade could otherwise slip in unnoticed. Skipped (with
/// a warning) when objdump is missing.
fn check_instructions(image: &Path) -> Result<(), String> {
    let output = match Command::new("objdump").arg("-d").arg(image).output() {
        Ok(output) if output.status.success() => output,
        _ => {
            println!("cargo:warning=objdump unavailable: test guest instructions not checked");
            return Ok(());
        }
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    let bad: Vec<&str> = listing.lines().filter(|line| is_forbidden(line)).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "forbidden instructions in the image (see tests/guest/README.md):\n{}",
            bad.join("\n")
        ))
    }
}

/// One `objdump -d` line: "  addr:\tbytes\tmnemonic operands".
fn is_forbidden(line: &str) -> bool {
    let Some(insn) = line.split('\t').nth(2) else {
        return false;
    };
    let mut words = insn.split_whitespace();
    let Some(mnemonic) = words.next() else {
        return false;
    };
    let operands = words.collect::<Vec<_>>().join(" ");
    FORBIDDEN_MNEMONICS.contains(&mnemonic)
        // Every x87 mnemonic starts with 'f'; no integer one does.
        || mnemonic.starts_with('f')
        || ["%xmm", "%ymm", "%zmm", "%mm", "%st"]
            .iter()
            .any(|reg| operands.contains(reg))
}
