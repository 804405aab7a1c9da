//! Shared helpers for integration tests: they boot real VMs under KVM with the ember
//! binary and the test guest (tests/guest, built by build.rs).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const EMBER: &str = env!("CARGO_BIN_EXE_ember");

/// Takes `child`'s stdout and collects it, as it arrives, into the returned string (a
/// thread reads until the pipe closes), so a test can watch the console while ember runs.
pub fn collect_stdout(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

/// The test guest image, built by build.rs. A build without a C compiler has none: the
/// tests that boot it then fail here, saying why.
pub fn guest() -> &'static str {
    match option_env!("EMBER_TEST_GUEST") {
        Some(path) => path,
        None => panic!(
            "the test guest (tests/guest) was not built: {}. Install gcc (or set EMBER_GUEST_CC) and rebuild; the build's warnings say more",
            option_env!("EMBER_TEST_GUEST_ERROR").unwrap_or("no reason recorded")
        ),
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ember-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished ember run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Outcome {
    pub fn assert_ok(&self) {
        assert!(!self.timed_out, "ember timed out\n{self:#?}");
        assert_eq!(self.code, Some(0), "ember failed\n{self:#?}");
    }
    pub fn has_line(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l.trim_end() == line)
    }
}

/// A config file for the test guest with `boot_args` and optional extra top-level JSON.
pub fn guest_config(boot_args: &str, vcpus: u32, mem_mib: u64, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    let guest = guest();
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{guest}", "boot_args": "{boot_args}"}},
            "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": {mem_mib}}}{extra}}}"#
    )
}

/// Spawns ember with `args`, stdin from /dev/null, stdout/stderr piped.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(EMBER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ember")
}

/// Waits for `child` up to `timeout`, killing it after; collects its output.
pub fn wait(mut child: Child, timeout: Duration) -> Outcome {
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Outcome {
        code: status.code(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        timed_out,
    }
}

/// Runs ember on a config file holding `config`.
pub fn run_config(config: &str, extra_args: &[&str], timeout: Duration) -> Outcome {
    let dir = TempDir::new("cfg");
    let path = dir.path("vm.json");
    std::fs::write(&path, config).expect("write config");
    let p = path.to_string_lossy().into_owned();
    let mut args = vec!["--no-api", "--config-file", p.as_str()];
    args.extend_from_slice(extra_args);
    wait(spawn(&args), timeout)
}

/// Reads lines from a child's stdout until one satisfies `pred`, or the timeout.
pub fn read_until(
    reader: &mut impl std::io::BufRead,
    timeout: Duration,
    mut pred: impl FnMut(&str) -> bool,
) -> Option<String> {
    let start = Instant::now();
    let mut line = String::new();
    while start.elapsed() < timeout {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {
                if pred(line.trim_end()) {
                    return Some(line.trim_end().to_string());
                }
            }
            Err(_) => return None,
        }
    }
    None
}

pub fn send_signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Says that `test` did not run, and why, as a `SKIP <test>: <reason>` line on stderr.
/// Written straight to the stream: libtest captures `println!`/`eprintln!` of a passing
/// test, which would hide the line from every run but `--nocapture` ones.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// One HTTP/1.1 request over a Unix socket (a fresh connection, as the Go SDK's client
/// makes for most calls); returns (status, body). `None` when nothing answers.
pub fn http(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// One request with curl over the API socket (a real client, as users and scripts drive
/// ember); returns (status, body). The status is 0 when curl got no answer.
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-S",
        "--unix-socket",
        sock.to_str().expect("socket path"),
        "-X",
        method,
    ]);
    c.args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    c.arg(format!("http://localhost{path}"));
    let out = c.stdin(Stdio::null()).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Waits until the API socket accepts a connection (the file appears at bind(), a moment
/// before listen()); panics after `timeout`.
pub fn wait_for_socket(sock: &Path, timeout: Duration) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(start.elapsed() < timeout, "API socket never came up");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Like `http`, for a request that must succeed (2xx): returns the body.
pub fn http_ok(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    match http(sock, method, path, body) {
        Some((s, b)) if (200..300).contains(&s) => b,
        other => panic!("{method} {path} {body:?}: {other:?}"),
    }
}

/// Waits until `pred` holds, polling every `every`, up to `timeout`.
pub fn wait_for(timeout: Duration, every: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if pred() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

/// Makes a named pipe (as engines do for the logger and metrics).
pub fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {}", p.display());
}

/// Opens a FIFO for reading without blocking (as Kata's fifo.OpenFifo does) and collects
/// its lines on a thread until every writer is gone or `stop` is set.
pub struct FifoReader {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FifoReader {
    pub fn open(p: &Path) -> FifoReader {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .expect("open fifo");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            let mut f = f;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match f.read(&mut chunk) {
                    Ok(0) | Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=i).collect();
                            l2.lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(&line).trim_end().to_string());
                        }
                    }
                }
            }
        });
        FifoReader { lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// A field of /proc/meminfo (`HugePages_Free:` and the like), as a number.
pub fn meminfo(field: &str) -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    m.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/proc/meminfo has no {field}"))
}

/// Held while a test counts on the host's huge page pool: tests in other threads or test
/// binaries that reserve or count huge pages wait for it.
pub fn huge_pages_lock() -> std::fs::File {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(std::env::temp_dir().join("ember-test-hugepages.lock"))
        .expect("create the huge pages lock file");
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
    f
}

/// 2 MiB huge pages reserved in the host pool for one test: /proc/sys/vm/nr_hugepages is
/// raised by `n` and set back to what it was on drop, under `huge_pages_lock`.
pub struct HugePagesReserved {
    old: u64,
    _lock: std::fs::File,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePagesReserved {
    pub fn new(n: u64) -> HugePagesReserved {
        let lock = huge_pages_lock();
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .expect("read nr_hugepages")
            .trim()
            .parse()
            .expect("nr_hugepages is a number");
        let guard = HugePagesReserved { old, _lock: lock };
        std::fs::write(NR_HUGEPAGES, (old + n).to_string())
            .expect("write /proc/sys/vm/nr_hugepages (tests run as root)");
        let avail = meminfo("HugePages_Free:").saturating_sub(meminfo("HugePages_Rsvd:"));
        assert!(
            avail >= n,
            "the host gave {avail} of {n} 2 MiB huge pages asked for (memory too fragmented?)"
        );
        guard
    }
}

impl Drop for HugePagesReserved {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// The NUL-trimmed text the snap guest's iteration `n` writes (sector 8 + n % 16).
pub fn snap_sector(disk: &Path, n: u64) -> String {
    let data = std::fs::read(disk).unwrap();
    let at = ((8 + n % 16) * 512) as usize;
    let s = &data[at..at + 512];
    let end = s.iter().position(|b| *b == 0).unwrap_or(512);
    String::from_utf8_lossy(&s[..end]).into_owned()
}
