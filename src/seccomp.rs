//! Per-thread seccomp filters. The allowlists live in
//! `resources/seccomp/x86_64-unknown-linux-gnu.json` (seccompiler's JSON format); the
//! build script compiles them to BPF in OUT_DIR (build_support/seccomp.rs) and they are
//! included here. `--seccomp-filter FILE` replaces them with a policy in the same format,
//! compiled at start-up; `--no-seccomp` turns them off.
//!
//! A system call outside a thread's list ends ember as in Firecracker: the filter's action
//! is `trap`, and the SIGSYS handler writes the call's number to stderr (and to the log
//! file, see `set_report_fd`) and exits with code 148.
//!
//! Filters are inherited by threads created after them and stack with their own, so each
//! thread installs its filter first thing, and the VMM thread (main) installs its own
//! only after it has started every other thread (as Firecracker does).
//!
//! ## What the libraries under a filter may do
//!
//! A filter must fit everything a thread's code does, including what the C library and
//! std do on its behalf. Each such behaviour is allowed, prevented or impossible here:
//!
//! | behaviour (thread) | how it is handled |
//! |---|---|
//! | glibc malloc in a thread's own arena: a new arena (`sched_getaffinity` once more than 8 exist), trimming a non-main heap (opens `/proc/sys/vm/overcommit_memory` the first time) | impossible: `prepare_process` limits malloc to its one main arena before any thread starts, so every thread allocates from the `brk` heap or with `mmap` |
//! | main-arena malloc: `brk`, `mmap`/`munmap`/`mremap` for large blocks, `madvise`, lock waits (`futex`) | allowed in every filter |
//! | formatting (`format!`, serde_json) | no system calls |
//! | error messages (`io::Error` shown through glibc's `strerror_r`) | no system calls: ember never calls `setlocale`, so glibc stays in the C locale and loads no message catalogue |
//! | log timestamps | computed from `clock_gettime` by hand, never `localtime` (which would open `/etc/localtime`) |
//! | logging (all threads): the logger's lock, `clock_gettime` (vDSO, or the call), `write` to stderr or the log file opened before | allowed in every filter; the log file is opened by the VMM thread (which may `openat`) |
//! | thread exit (API, vCPU): std frees the signal stack (`sigaltstack`, `munmap`), glibc frees TLS and `madvise`s the stack, blocks signals (`rt_sigprocmask`), `exit` | allowed in the API and vCPU filters; the VMM thread joins them and unmaps their stacks (`munmap`) |
//! | process exit from any thread (`std::process::exit`, the panic hook): `write`, `exit_group` | allowed in every filter |
//! | new threads, `fork`, `exec`, opening files from the API or a vCPU thread | prevented: nothing does it after the filters are on (vCPU and API threads are started before the VMM thread's filter, which forbids `clone`) |
//! | a panic on any thread: the panic hook restores the terminal (`ioctl` TCGETS and TCSETS on stdin), writes to stderr and exits with 2 | allowed: each filter has those two on fd 0; the hook exits before the unwinder or `abort` (`tgkill`) would run |
//! | `abort` from elsewhere (glibc's heap-corruption check, a stack overflow) | not allowed (`tgkill`): ends ember with 148 instead of 134, still a crash with a message |
//!
//! `tests/api_hostile.rs` drives each thread's heavy paths with the real filters on.
//!
//! Test hook (tests only, not a user interface): when the environment variable
//! `EMBER_TEST_FORBIDDEN_SYSCALL` names a thread kind (`vmm`, `vcpu`, `api`), that thread
//! makes a forbidden system call (getpgid, number 121) right after installing its filter,
//! so tests can check the SIGSYS path end to end. When `EMBER_TEST_PANIC` names one, that
//! thread panics under its filter: the VMM and vCPU threads right after installing it, the
//! API thread when asked for `/ember-test-panic` (after InstanceStart, so the panic hook
//! finds a terminal to restore).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{BpfProgram, sock_filter};

/// The threads that get a filter; the names are the keys of the JSON policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, devices, API actions.
    Vmm,
    /// One per vCPU: KVM_RUN and exits.
    Vcpu,
    /// The HTTP API server.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which filters to use (from `--no-seccomp` / `--seccomp-filter`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeccompConfig {
    /// The policy built into ember.
    #[default]
    Builtin,
    /// No filters at all.
    Disabled,
    /// A policy file in seccompiler's JSON format, with a filter for each thread kind.
    File(PathBuf),
}

impl SeccompConfig {
    pub fn from_flags(
        no_seccomp: bool,
        file: Option<&Path>,
    ) -> Result<SeccompConfig, SeccompError> {
        match (no_seccomp, file) {
            (true, Some(_)) => Err(SeccompError::Conflict),
            (true, None) => Ok(SeccompConfig::Disabled),
            (false, Some(f)) => Ok(SeccompConfig::File(f.to_path_buf())),
            (false, None) => Ok(SeccompConfig::Builtin),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("--no-seccomp and --seccomp-filter cannot be used together")]
    Conflict,
    #[error("--seccomp-filter {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--seccomp-filter {}: {why}", path.display())]
    Compile { path: PathBuf, why: String },
    #[error("--seccomp-filter {}: no filter for the `{thread}` thread", path.display())]
    MissingThread { path: PathBuf, thread: &'static str },
    #[error("seccomp filters were already chosen")]
    AlreadyInitialised,
    #[error("the built-in seccomp filter for `{0}` is malformed (a build problem)")]
    BadBuiltin(&'static str),
    #[error("cannot install the seccomp filter of the `{thread}` thread: {why}")]
    Install { thread: &'static str, why: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

impl SeccompError {
    /// Errors in the flags or the policy file are command-line errors (153); a failure
    /// to install is a host problem (1).
    pub fn exit_code(&self) -> i32 {
        match self {
            SeccompError::Conflict
            | SeccompError::Read { .. }
            | SeccompError::Compile { .. }
            | SeccompError::MissingThread { .. } => crate::exit_code::ARG_PARSING,
            _ => crate::exit_code::GENERIC_ERROR,
        }
    }
}

/// The built-in filters, compiled by the build script.
const BUILTIN: [(&str, &[u8]); 3] = [
    (
        "vmm",
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vmm.bpf")),
    ),
    (
        "vcpu",
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/vcpu.bpf")),
    ),
    (
        "api",
        include_bytes!(concat!(env!("OUT_DIR"), "/seccomp/api.bpf")),
    ),
];

/// None: seccomp disabled. Otherwise one program per ThreadKind, in ThreadKind order.
type Filters = Option<[BpfProgram; 3]>;

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Where the SIGSYS handler also writes its message (the log file), besides stderr.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    /// The kind of the current thread, for the SIGSYS message (read in the handler: a
    /// const-initialised Cell is a plain TLS load).
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Decodes the build script's output: BPF instructions of 8 bytes, native endian.
fn decode(name: &'static str, bytes: &[u8]) -> Result<BpfProgram, SeccompError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
        return Err(SeccompError::BadBuiltin(name));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn builtin() -> Result<[BpfProgram; 3], SeccompError> {
    let [(a, ab), (b, bb), (c, cb)] = BUILTIN;
    Ok([decode(a, ab)?, decode(b, bb)?, decode(c, cb)?])
}

/// Compiles a policy file (seccompiler JSON) for this target.
pub fn compile_file(path: &Path) -> Result<[BpfProgram; 3], SeccompError> {
    let file = std::fs::File::open(path).map_err(|source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut map = seccompiler::compile_from_json(std::io::BufReader::new(file), target_arch())
        .map_err(|e| SeccompError::Compile {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    let mut take = |kind: ThreadKind| {
        map.remove(kind.name())
            .ok_or_else(|| SeccompError::MissingThread {
                path: path.to_path_buf(),
                thread: kind.name(),
            })
    };
    Ok([
        take(ThreadKind::Vmm)?,
        take(ThreadKind::Vcpu)?,
        take(ThreadKind::Api)?,
    ])
}

fn target_arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "aarch64")]
    return seccompiler::TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    seccompiler::TargetArch::x86_64
}

/// Makes the process fit for its filters: call before any other thread starts.
///
/// glibc gives each new thread its own malloc arena (up to 8 per core). Freeing memory in
/// such an arena can trim its heap, and the first trim opens
/// `/proc/sys/vm/overcommit_memory`, a call no thread's filter allows, least of all the API
/// thread's; a ninth arena makes glibc call `sched_getaffinity`. With one arena, every
/// thread allocates from the main heap (`brk`, and `mmap` for large blocks), whose trimming
/// only calls `brk`. ember's threads allocate little and rarely at the same time, so one
/// arena's lock costs nothing measurable.
pub fn prepare_process() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: mallopt only sets a malloc parameter; M_ARENA_MAX with a positive value
        // is valid at any time and takes effect for threads that have no arena yet.
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        if ok != 1 {
            log::warn!("cannot limit malloc to one arena (mallopt failed)");
        }
    });
}

/// Installs the built-in filter of `thread` on the calling thread, whatever `init` chose.
/// For code that runs ember's parts outside ember (fuzz targets, tests) and wants them
/// confined exactly as in ember: call `prepare_process` before the process starts any
/// thread (a thread that allocated before it keeps its own arena), then this, first thing
/// in the thread that will run them. A forbidden call then ends the process with exit
/// code 148 and a message on stderr naming the call.
pub fn confine_current_thread(thread: ThreadKind) -> Result<(), SeccompError> {
    prepare_process();
    let programs = builtin()?;
    apply(thread, &programs[thread.index()])
}

/// Chooses the filters. Call once, early (a policy file is read from the host, before the
/// jail); without a call, `install` uses the built-in policy.
pub fn init(config: &SeccompConfig) -> Result<(), SeccompError> {
    prepare_process();
    let filters = match config {
        SeccompConfig::Builtin => Some(builtin()?),
        SeccompConfig::Disabled => None,
        SeccompConfig::File(p) => Some(compile_file(p)?),
    };
    FILTERS
        .set(filters)
        .map_err(|_| SeccompError::AlreadyInitialised)
}

/// Also write the SIGSYS message to this descriptor (the log file). -1: stderr only.
pub fn set_report_fd(fd: RawFd) {
    REPORT_FD.store(fd, Ordering::Relaxed);
}

/// Whether filters are on (false after `--no-seccomp`).
pub fn enabled() -> bool {
    matches!(FILTERS.get(), Some(Some(_)) | None)
}

/// The chosen filters (None: turned off).
fn filters() -> Result<&'static Filters, SeccompError> {
    Ok(match FILTERS.get() {
        Some(f) => f,
        // Not initialised: on by default (a thread never runs unconfined by omission),
        // except in this crate's unit tests, whose threads share the test harness.
        None if cfg!(test) => &None,
        None => {
            prepare_process();
            let _ = FILTERS.set(Some(builtin()?));
            FILTERS.get().unwrap_or(&None)
        }
    })
}

/// The kernel's limit on a classic BPF program's length (BPF_MAXINSNS).
const MAX_INSTRUCTIONS: usize = 4096;

/// Checks, before any vCPU thread starts, what `install` could otherwise find only once
/// the guest runs: the filters are chosen and decoded, each has a length the kernel
/// accepts, and the SIGSYS handler is in place. A failure then fails InstanceStart with
/// no guest running.
pub fn check() -> Result<(), SeccompError> {
    let Some(programs) = filters()? else {
        return Ok(());
    };
    for thread in ThreadKind::ALL {
        let len = programs.get(thread.index()).map_or(0, |p| p.len());
        if !(1..=MAX_INSTRUCTIONS).contains(&len) {
            return Err(SeccompError::Install {
                thread: thread.name(),
                why: format!(
                    "the filter has {len} instructions; the kernel takes 1 to {MAX_INSTRUCTIONS}"
                ),
            });
        }
    }
    install_sigsys_handler()
}

/// Installs the current thread's filter. Call first thing in the thread, before it
/// handles any input (for the VMM thread: after it has started the other threads).
pub fn install(thread: ThreadKind) -> Result<(), SeccompError> {
    let Some(programs) = filters()? else {
        return Ok(());
    };
    apply(thread, &programs[thread.index()])
}

fn apply(thread: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    KIND.with(|k| k.set(thread as u8));
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        thread: thread.name(),
        why: e.to_string(),
    })?;
    log::debug!("seccomp filter installed ({} instructions)", program.len());
    test_hook(thread);
    Ok(())
}

/// See the module documentation: tests only.
fn test_hook(thread: ThreadKind) {
    if std::env::var_os("EMBER_TEST_FORBIDDEN_SYSCALL").is_some_and(|v| v == thread.name()) {
        log::warn!("EMBER_TEST_FORBIDDEN_SYSCALL: calling getpgid, which the filter forbids");
        // SAFETY: getpgid(0) has no side effects; the filter traps it.
        unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    }
    if thread != ThreadKind::Api {
        test_panic(thread);
    }
}

/// See the module documentation: tests only.
pub fn test_panic(thread: ThreadKind) {
    if std::env::var_os("EMBER_TEST_PANIC").is_some_and(|v| v == thread.name()) {
        panic!("EMBER_TEST_PANIC: the {} thread panics", thread.name());
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static DONE: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and an empty mask.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = sigsys_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e)))
}

/// Offset of `si_syscall` in a SIGSYS siginfo on 64-bit Linux: si_signo, si_errno,
/// si_code, padding (4 x i32), then `_sigsys { void *_call_addr; int _syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Formats `n` in decimal into `buf`, returning the digits (no allocation).
fn fmt_decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Builds the message in a fixed buffer: only async-signal-safe work.
fn sigsys_message(kind: u8, nr: i64, out: &mut [u8; 160]) -> &[u8] {
    let thread: &[u8] = match kind {
        0 => b"vmm",
        1 => b"vcpu",
        2 => b"api",
        _ => b"unknown",
    };
    let mut digits = [0u8; 20];
    let num: &[u8] = if nr < 0 {
        b"?"
    } else {
        fmt_decimal(nr as u64, &mut digits)
    };
    let parts: [&[u8]; 5] = [
        b"ember: the ",
        thread,
        b" thread made system call ",
        num,
        b", which its seccomp filter forbids; exiting with code 148\n",
    ];
    let mut len = 0;
    for p in parts {
        let end = (len + p.len()).min(out.len());
        let n = end - len;
        out[len..end].copy_from_slice(&p[..n]);
        len = end;
    }
    &out[..len]
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at a
        // fixed offset in it.
        i64::from(unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        })
    };
    let kind = KIND.try_with(Cell::get).unwrap_or(u8::MAX);
    let mut buf = [0u8; 160];
    let msg = sigsys_message(kind, nr, &mut buf);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), msg.len());
        let fd = REPORT_FD.load(Ordering::Relaxed);
        if fd > libc::STDERR_FILENO {
            libc::write(fd, msg.as_ptr().cast(), msg.len());
        }
        libc::_exit(crate::exit_code::BAD_SYSCALL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_filters_decode() {
        let f = builtin().unwrap();
        for (p, kind) in f.iter().zip(ThreadKind::ALL) {
            assert!(p.len() > 10, "{}", kind.name());
        }
    }

    #[test]
    fn message_is_formatted_by_hand() {
        let mut buf = [0u8; 160];
        let m = sigsys_message(1, 121, &mut buf);
        assert_eq!(
            std::str::from_utf8(m).unwrap(),
            "ember: the vcpu thread made system call 121, which its seccomp filter forbids; exiting with code 148\n"
        );
        let mut d = [0u8; 20];
        assert_eq!(fmt_decimal(0, &mut d), b"0");
        assert_eq!(fmt_decimal(u64::MAX, &mut d), b"18446744073709551615");
    }

    #[test]
    fn flags() {
        assert_eq!(
            SeccompConfig::from_flags(false, None).unwrap(),
            SeccompConfig::Builtin
        );
        assert_eq!(
            SeccompConfig::from_flags(true, None).unwrap(),
            SeccompConfig::Disabled
        );
        assert!(SeccompConfig::from_flags(true, Some(Path::new("f"))).is_err());
    }

    #[test]
    fn policy_file_compiles_and_needs_every_thread() {
        let dir = std::env::temp_dir().join(format!("ember-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        let one =
            r#"{"default_action":"trap","filter_action":"allow","filter":[{"syscall":"read"}]}"#;
        std::fs::write(
            &good,
            format!(r#"{{"vmm":{one},"vcpu":{one},"api":{one}}}"#),
        )
        .unwrap();
        assert!(compile_file(&good).is_ok());
        let partial = dir.join("partial.json");
        std::fs::write(&partial, format!(r#"{{"vmm":{one}}}"#)).unwrap();
        assert!(matches!(
            compile_file(&partial),
            Err(SeccompError::MissingThread { .. })
        ));
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"vmm":{"default_action":"trap"}}"#).unwrap();
        assert_eq!(
            compile_file(&bad).unwrap_err().exit_code(),
            crate::exit_code::ARG_PARSING
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
