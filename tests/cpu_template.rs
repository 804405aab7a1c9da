//! CPU templates on real VMs: the test guest's `cpuid` mode prints the CPUID (and MSRs)
//! it sees, and each test compares that with a run without a template.
//!
//! The expectations are written here from Firecracker's template definitions, not taken
//! from ember's tables, so a wrong table fails. On a PVM host (ours) the guest kernel sees
//! its own CPU's values in some registers whatever KVM holds (leaves 7 and 0xd; leaf 1
//! ECX and EDX keep the CPU's bits set): there a register must show either the
//! template's value or exactly the untemplated one; the registers KVM serves there (leaf
//! 1 EAX, leaves 0x8000_0001 and 0x8000_0008) must always show the template's value.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// (leaf, subleaf) -> [eax, ebx, ecx, edx], from the guest's `cpuid:` lines (the last
/// complete report in `out`).
type Cpuid = BTreeMap<(u32, u32), [u32; 4]>;

fn parse_cpuid(out: &str) -> Cpuid {
    let mut reports = Vec::new();
    let mut current = Cpuid::new();
    for line in out.lines() {
        let Some(rest) = line.trim_end().strip_prefix("cpuid: ") else {
            continue;
        };
        if rest == "end" {
            reports.push(std::mem::take(&mut current));
            continue;
        }
        let v: Vec<u32> = rest
            .split(' ')
            .filter_map(|w| u32::from_str_radix(w, 16).ok())
            .collect();
        if let [leaf, sub, a, b, c, d] = v[..] {
            current.insert((leaf, sub), [a, b, c, d]);
        }
    }
    reports
        .pop()
        .unwrap_or_else(|| panic!("no cpuid report in:\n{out}"))
}

fn parse_msr(out: &str, addr: u32) -> u64 {
    let prefix = format!("msr: {addr:x} ");
    out.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"))
}

const EAX: usize = 0;
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

/// One register change: (leaf, subleaf, register, bits set by the template, their value).
type Change = (u32, u32, usize, u32, u32);

/// Firecracker's T2A template (static_cpu_templates/t2a.rs), register by register.
const T2A: &[Change] = &[
    (1, 0, EAX, 0x0fff_3fff, 0x0003_06f2),
    (1, 0, ECX, 0x0004_cdfc, 0),
    (1, 0, EDX, 0xe864_1080, 0x0000_1080),
    (7, 0, EBX, 0xffef_da14, 0x0000_0200),
    (7, 0, ECX, 0x4041_5f5e, 0),
    (7, 0, EDX, 0x0000_011c, 0),
    (0xd, 0, EAX, 0x0000_02f8, 0),
    (0xd, 1, EAX, 0x0000_000e, 0),
    (0x8000_0001, 0, ECX, 0x2000_01c4, 0),
    (0x8000_0001, 0, EDX, 0x0640_0000, 0),
    (0x8000_0008, 0, EBX, 0x001c_0205, 0x001c_0004),
];

/// Registers KVM serves to the guest kernel even on a PVM host.
const ALWAYS_KVM: &[(u32, u32, usize)] = &[
    (1, 0, EAX),
    (0x8000_0001, 0, ECX),
    (0x8000_0001, 0, EDX),
    (0x8000_0008, 0, EBX),
];

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Checks that `got` is `base` with exactly `changes` applied (see the module comment for
/// what a PVM host may leave as it was). Returns the registers the host kept as they were.
fn assert_template(base: &Cpuid, got: &Cpuid, changes: &[Change]) -> Vec<String> {
    let mut kept = Vec::new();
    for (&key, regs) in base {
        let seen = got
            .get(&key)
            .unwrap_or_else(|| panic!("leaf {key:x?} missing from {got:x?}"));
        for r in 0..4 {
            let mut want = regs[r];
            for &(leaf, sub, reg, mask, value) in changes {
                if (leaf, sub, reg) == (key.0, key.1, r) {
                    want = (want & !mask) | value;
                }
            }
            let name = format!(
                "leaf {:#x} subleaf {} {}",
                key.0,
                key.1,
                ["eax", "ebx", "ecx", "edx"][r]
            );
            if seen[r] == want {
                continue;
            }
            let always = ALWAYS_KVM.contains(&(key.0, key.1, r));
            if pvm_host() && !always && seen[r] == regs[r] {
                kept.push(name);
                continue;
            }
            panic!(
                "{name}: guest sees {:#010x}, want {want:#010x} (untemplated {:#010x})",
                seen[r], regs[r]
            );
        }
    }
    kept
}

fn config(boot_args: &str, machine_extra: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {boot_args}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64{machine_extra}}}{extra}}}"#,
        guest()
    )
}

const ARGS: &str = "ember_test=cpuid ember_rdmsr=0x277";

fn baseline() -> (Cpuid, u64) {
    let out = run_config(&config(ARGS, "", ""), &[], T);
    out.assert_ok();
    (parse_cpuid(&out.stdout), parse_msr(&out.stdout, 0x277))
}

fn host_vendor() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_default()
}

/// ember serving the API on a fresh socket, console collected.
struct Ember {
    child: Child,
    sock: PathBuf,
    out: Arc<Mutex<String>>,
}

impl Ember {
    fn start(dir: &TempDir, name: &str, config: Option<&Path>) -> Ember {
        let sock = dir.path(&format!("{name}.sock"));
        let mut cmd = Command::new(EMBER);
        cmd.arg("--api-sock").arg(&sock);
        if let Some(c) = config {
            cmd.arg("--config-file").arg(c);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ember");
        let out = collect_stdout(&mut child);
        assert!(
            wait_for(T, Duration::from_millis(5), || http(
                &sock, "GET", "/", None
            )
            .is_some()),
            "ember's API never answered"
        );
        Ember { child, sock, out }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let body = (!body.is_empty()).then_some(body);
        http(&self.sock, method, path, body).unwrap_or_else(|| panic!("{method} {path}: no answer"))
    }

    fn ok(&self, method: &str, path: &str, body: &str) -> String {
        let (status, answer) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path} {body}: {status} {answer}"
        );
        answer
    }

    fn refused(&self, method: &str, path: &str, body: &str) -> String {
        let (status, answer) = self.call(method, path, body);
        assert_eq!(status, 400, "{method} {path} {body}: {answer}");
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        v["fault_message"].as_str().unwrap_or_default().to_string()
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the console holds `count` complete cpuid reports.
    fn wait_reports(&self, count: usize) -> String {
        let ok = wait_for(T, Duration::from_millis(20), || {
            self.output().matches("cpuid: end\n").count() >= count
        });
        assert!(ok, "fewer than {count} cpuid reports:\n{}", self.output());
        self.output()
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// T2A through the API (this host is an AMD Milan), checked from inside the guest; and
/// what the API reports of the template before and after a custom one replaces it.
#[test]
fn t2a_changes_exactly_its_bits() {
    if host_vendor() != "AuthenticAMD" {
        skip(
            "t2a_changes_exactly_its_bits",
            "T2A is an AMD template; this host is not AMD",
        );
        return;
    }
    let (base, _) = baseline();
    let dir = TempDir::new("t2a");
    let e = Ember::start(&dir, "a", None);
    e.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {ARGS}"}}"#,
            guest()
        ),
    );
    // A custom template first: the static one replaces it.
    e.ok("PUT", "/cpu-config", r#"{"cpuid_modifiers": []}"#);
    let vm: serde_json::Value = serde_json::from_str(&e.ok("GET", "/vm/config", "")).unwrap();
    assert_eq!(
        vm["cpu-config"]["cpuid_modifiers"],
        serde_json::json!([]),
        "{vm}"
    );
    e.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2A"}"#,
    );
    let mc: serde_json::Value = serde_json::from_str(&e.ok("GET", "/machine-config", "")).unwrap();
    assert_eq!(mc["cpu_template"], "T2A", "{mc}");
    let vm: serde_json::Value = serde_json::from_str(&e.ok("GET", "/vm/config", "")).unwrap();
    assert_eq!(vm["machine-config"]["cpu_template"], "T2A", "{vm}");
    assert!(vm["cpu-config"].is_null(), "{vm}");
    // A PATCH that does not name the template keeps it.
    e.ok("PATCH", "/machine-config", r#"{"mem_size_mib": 64}"#);
    e.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let out = e.wait_reports(1);
    let kept = assert_template(&base, &parse_cpuid(&out), T2A);
    if !kept.is_empty() {
        // Straight to the stream, past libtest's capture (as common::skip does).
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "NOTE t2a_changes_exactly_its_bits: this PVM host showed the guest its own CPU's {}",
            kept.join(", ")
        );
    }
}

/// A custom template from a file named in the config file: CPUID bits set and cleared,
/// and an MSR (PAT) changed; the guest sees each.
#[test]
fn custom_template_from_a_file_changes_exactly_its_bits() {
    let (base, pat) = baseline();
    let dir = TempDir::new("custom");
    let template = dir.path("template.json");
    std::fs::write(
        &template,
        r#"{
          "kvm_capabilities": ["!171"],
          "cpuid_modifiers": [
            {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
             "modifiers": [{"register": "eax", "bitmap": "0b0101"}]},
            {"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
             "modifiers": [{"register": "ecx", "bitmap": "0b0xx_xxx1_xx"},
                           {"register": "edx", "bitmap": "0b0000_0xxx_xxxx_xxxx_xxxx_xxxx_xxxx_xxxx"}]},
            {"leaf": "0x80000008", "subleaf": "0x0", "flags": 0,
             "modifiers": [{"register": "ebx", "bitmap": "0b1x0"}]},
            {"leaf": "0x7", "subleaf": "0x0", "flags": 1,
             "modifiers": [{"register": "ebx", "bitmap": "0b0_xxxx_xxxx"}]}
          ],
          "msr_modifiers": [{"addr": "0x277", "bitmap": "0b101"}]
        }"#,
    )
    .unwrap();
    let cfg = config(
        ARGS,
        "",
        &format!(r#""cpu-config": "{}""#, template.display()),
    );
    let out = run_config(&cfg, &[], T);
    out.assert_ok();
    let changes: &[Change] = &[
        (1, 0, EAX, 0xf, 0b0101),
        (0x8000_0001, 0, ECX, 0x104, 0x004),
        (0x8000_0001, 0, EDX, 0xf800_0000, 0),
        (0x8000_0008, 0, EBX, 0b101, 0b100),
        (7, 0, EBX, 0x100, 0),
    ];
    assert_template(&base, &parse_cpuid(&out.stdout), changes);
    assert_eq!(parse_msr(&out.stdout, 0x277), (pat & !0b111) | 0b101);
}

/// A template for the other vendor is refused by the API at PUT and by the config file at
/// start, with the reason; so are templates KVM cannot take, and malformed ones.
#[test]
fn templates_this_host_cannot_take_are_refused() {
    let vendor = host_vendor();
    let (refused, family): (&[&str], &str) = match vendor.as_str() {
        "AuthenticAMD" => (&["T2", "T2S", "T2CL", "C3"], "Intel"),
        "GenuineIntel" => (&["T2A"], "AMD"),
        other => {
            skip(
                "templates_this_host_cannot_take_are_refused",
                &format!("CPU vendor `{other}`"),
            );
            return;
        }
    };
    let dir = TempDir::new("refused");
    let e = Ember::start(&dir, "a", None);
    for t in refused {
        let m = e.refused(
            "PUT",
            "/machine-config",
            &format!(r#"{{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "{t}"}}"#),
        );
        let want = format!("cpu_template `{t}` is for {family} CPUs");
        assert!(m.starts_with(&want), "{m}");
        assert!(m.contains(&format!("this host's CPU is {vendor}")), "{m}");
        let m = e.refused(
            "PATCH",
            "/machine-config",
            &format!(r#"{{"cpu_template": "{t}"}}"#),
        );
        assert!(m.starts_with(&want), "{m}");
    }
    // Nothing was kept of the refusals.
    let mc: serde_json::Value = serde_json::from_str(&e.ok("GET", "/machine-config", "")).unwrap();
    assert!(mc.get("cpu_template").is_none(), "{mc}");

    for (body, want) in [
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "eax", "bitmap": "0b1021"}]}]}"#,
            "`2` is not 0, 1, x or _",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "eax", "bitmap": "0b111111111111111111111111111111111"}]}]}"#,
            "more than 32 bits",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "r8", "bitmap": "0b1"}]}]}"#,
            "unknown CPUID register `r8`",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "12", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
            "`12` needs a 0x (hexadecimal) or 0b (binary) prefix",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x4abcdef0", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#,
            "cpuid_modifiers[0]: leaf 0x4abcdef0 subleaf 0x0 is not in the CPUID KVM supports on this host",
        ),
        (
            r#"{"kvm_capabilities": ["4000000"]}"#,
            "this host's KVM lacks capability 4000000",
        ),
        (r#"{"vcpu_features": []}"#, "unknown field `vcpu_features`"),
        ("7", "invalid type: integer `7`"),
    ] {
        let m = e.refused("PUT", "/cpu-config", body);
        assert!(m.contains(want), "{body}\n got: {m}\nwant: {want}");
    }
    let vm: serde_json::Value = serde_json::from_str(&e.ok("GET", "/vm/config", "")).unwrap();
    assert!(vm["cpu-config"].is_null(), "{vm}");

    // An MSR KVM does not know is found when the vCPUs exist: InstanceStart says so, and
    // ember stays ready for a corrected template.
    e.ok(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
            guest()
        ),
    );
    e.ok(
        "PUT",
        "/cpu-config",
        r#"{"msr_modifiers": [{"addr": "0xdeadbeef", "bitmap": "0b1"}]}"#,
    );
    let m = e.refused("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(
        m.contains("MSR 0xdeadbeef is not supported by KVM on this host"),
        "{m}"
    );
    // "None" clears a custom template too (as in Firecracker).
    e.ok("PATCH", "/machine-config", r#"{"cpu_template": "None"}"#);
    let vm: serde_json::Value = serde_json::from_str(&e.ok("GET", "/vm/config", "")).unwrap();
    assert!(vm["cpu-config"].is_null(), "{vm}");
    e.ok("PUT", "/cpu-config", "{}");
    e.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);

    // The config file: exit 152 (bad configuration) with the reason.
    let out = run_config(
        &config("", &format!(r#", "cpu_template": "{}""#, refused[0]), ""),
        &[],
        T,
    );
    assert_eq!(out.code, Some(152), "{out:#?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains(&format!(
            "cpu_template `{}` is for {family} CPUs",
            refused[0]
        )),
        "{all}"
    );
    let bad_leaf = r#""cpu-config": {"cpuid_modifiers": [{"leaf": "0x4abcdef0", "subleaf": "0x0", "flags": 0, "modifiers": []}]}"#;
    let out = run_config(&config("", "", bad_leaf), &[], T);
    assert_eq!(out.code, Some(152), "{out:#?}");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("leaf 0x4abcdef0 subleaf 0x0 is not in the CPUID"),
        "{all}"
    );
    let out = run_config(
        &config("", "", r#""cpu-config": {"cpuid_modifiers": 1}"#),
        &[],
        T,
    );
    assert_eq!(out.code, Some(152), "{out:#?}");
}

/// A VM restored from a snapshot keeps its template's CPUID, and the restored ember
/// reports the template: T2A, and a custom template that shows the guest a feature this
/// host lacks (SVM), which must not stop the restore on the host that booted it.
#[test]
fn restored_vm_keeps_its_template() {
    if host_vendor() != "AuthenticAMD" {
        skip(
            "restored_vm_keeps_its_template",
            "T2A is an AMD template; this host is not AMD",
        );
        return;
    }
    let (base, _) = baseline();
    let svm = r#""cpu-config": {"cpuid_modifiers": [{"leaf": "0x80000001", "subleaf": "0x0",
        "flags": 0, "modifiers": [{"register": "ecx", "bitmap": "0b1xx"}]}]}"#;
    let cases: [(&str, &str, &[Change]); 2] = [
        (r#", "cpu_template": "T2A""#, "", T2A),
        ("", svm, &[(0x8000_0001, 0, ECX, 0b100, 0b100)]),
    ];
    for (machine, extra, changes) in cases {
        let dir = TempDir::new("snap");
        let cfg = dir.path("vm.json");
        std::fs::write(&cfg, config("ember_test=cpuid,snap", machine, extra)).unwrap();
        let (state, mem) = (dir.path("state"), dir.path("mem"));
        {
            let a = Ember::start(&dir, "a", Some(&cfg));
            let out = a.wait_reports(2);
            assert_template(&base, &parse_cpuid(&out), changes);
            a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
            a.ok(
                "PUT",
                "/snapshot/create",
                &format!(
                    r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                    state.display(),
                    mem.display()
                ),
            );
        }
        let b = Ember::start(&dir, "b", None);
        b.ok(
            "PUT",
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
                state.display(),
                mem.display()
            ),
        );
        // Reports made after the restore: the console of `b` starts there.
        let out = b.wait_reports(2);
        assert_template(&base, &parse_cpuid(&out), changes);
        let mc: serde_json::Value =
            serde_json::from_str(&b.ok("GET", "/machine-config", "")).unwrap();
        let vm: serde_json::Value = serde_json::from_str(&b.ok("GET", "/vm/config", "")).unwrap();
        if machine.is_empty() {
            assert!(mc.get("cpu_template").is_none(), "{mc}");
            assert_eq!(
                vm["cpu-config"]["cpuid_modifiers"][0]["leaf"], "0x80000001",
                "{vm}"
            );
        } else {
            assert_eq!(mc["cpu_template"], "T2A", "{mc}");
        }
    }
}

/// `machine-config.smt` as Firecracker accepts it: two vCPUs become two threads of one
/// core in the topology leaf the guest reads; an odd count above one is refused.
#[test]
fn smt_pairs_two_vcpus_on_one_core() {
    let cfg = |vcpus: u8| {
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {ARGS}"}},
                "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": 64, "smt": true}}}}"#,
            guest()
        )
    };
    let out = run_config(&cfg(2), &[], T);
    out.assert_ok();
    let got = parse_cpuid(&out.stdout);
    let smt = got
        .get(&(0xb, 0))
        .unwrap_or_else(|| panic!("no leaf 0xb in {got:x?}"));
    assert_eq!((smt[0], smt[1]), (1, 2), "leaf 0xb level 0 (SMT): {smt:x?}");
    // Leaf 1: two logical processors in the package.
    let leaf1 = got.get(&(1, 0)).copied().unwrap_or_default();
    assert_eq!((leaf1[1] >> 16) & 0xff, 2, "leaf 1: {leaf1:x?}");
    let out = run_config(&cfg(3), &[], T);
    assert_eq!(out.code, Some(152), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("vcpu_count must be 1 or an even number when smt is true, got 3"),
        "{}",
        out.stderr
    );
}
