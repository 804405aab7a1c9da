//! Build-script code: compiles the seccomp policy for the target
//! (`resources/seccomp/<target>.json`, seccompiler's JSON format) into raw BPF, one file
//! per thread kind, `$OUT_DIR/seccomp/<thread>.bpf` (8-byte instructions, native endian),
//! which src/seccomp.rs includes with `include_bytes!`.

/// The thread kinds src/seccomp.rs expects a filter for.
const SECCOMP_THREADS: [&str; 3] = ["vmm", "vcpu", "api"];

/// Compiles the policy; panics with a message naming the file on any error (a build
/// script's way to fail the build).
pub fn compile_seccomp_filters() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("build script: {k} is not set"));
    let manifest = std::path::PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let target = env("TARGET");
    let out = std::path::PathBuf::from(env("OUT_DIR")).join("seccomp");
    let policy = manifest
        .join("resources/seccomp")
        .join(format!("{target}.json"));
    println!("cargo:rerun-if-changed={}", policy.display());

    let arch = match env("CARGO_CFG_TARGET_ARCH").as_str() {
        "x86_64" => seccompiler::TargetArch::x86_64,
        "aarch64" => seccompiler::TargetArch::aarch64,
        other => panic!("seccomp: no policy for architecture {other}"),
    };
    let file = std::fs::File::open(&policy)
        .unwrap_or_else(|e| panic!("seccomp: cannot open {}: {e}", policy.display()));
    let filters = seccompiler::compile_from_json(std::io::BufReader::new(file), arch)
        .unwrap_or_else(|e| panic!("seccomp: {}: {e}", policy.display()));
    std::fs::create_dir_all(&out)
        .unwrap_or_else(|e| panic!("seccomp: cannot create {}: {e}", out.display()));
    for thread in SECCOMP_THREADS {
        let program = filters
            .get(thread)
            .unwrap_or_else(|| panic!("seccomp: {} has no `{thread}` filter", policy.display()));
        let bytes: Vec<u8> = program
            .iter()
            .flat_map(|i| {
                let mut b = [0u8; 8];
                b[..2].copy_from_slice(&i.code.to_ne_bytes());
                b[2] = i.jt;
                b[3] = i.jf;
                b[4..].copy_from_slice(&i.k.to_ne_bytes());
                b
            })
            .collect();
        let path = out.join(format!("{thread}.bpf"));
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("seccomp: cannot write {}: {e}", path.display()));
    }
}
