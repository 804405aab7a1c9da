//! The guest boot profiler (`--profile-boot FILE`): samples the boot vCPU's instruction
//! pointer at a fixed rate until a serial-console marker, a time limit or the VM's stop,
//! names the samples with the kernel's symbols, and writes a table of the top functions
//! (FILE) and folded stacks for flame-graph tools (FILE.folded).
//!
//! No thread is added (ember runs API, VMM and vCPU threads only). A timerfd on the VMM
//! thread's event loop ticks at the sampling rate; each tick marks a sample as wanted and
//! kicks vCPU 0 as a pause does (`immediate_exit` plus the kick signal), so KVM_RUN
//! returns. The vCPU thread, which owns its vCPU fd, then reads its own registers
//! (KVM_GET_REGS, and KVM_GET_SREGS for a stack walk) and records the sample before it
//! re-enters the guest. Reading another thread's vCPU registers from the VMM thread
//! would race with KVM_RUN on that fd; this way every ioctl stays on the thread that owns
//! the vCPU, and both are already in the seccomp allowlists. docs/ARCHITECTURE.md says
//! more.

pub mod symbols;
pub mod walk;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use crate::vcpu::VcpuControl;
use crate::vm::memory::GuestMemory;
use symbols::Symbols;

/// Default rate. Each sample is a vCPU exit, which costs about 0.3 ms of host CPU on the
/// PVM development hosts (BENCHMARKS.md): 97 Hz keeps that near 10% there, and still
/// gives thousands of samples over a Linux boot. On hardware KVM an exit costs a few
/// microseconds and `--profile-boot-hz 997` is cheap. A prime, so sampling does not run
/// in step with a guest timer at 100, 250 or 1000 Hz and keep landing in its handler.
pub const DEFAULT_HZ: u32 = 97;
pub const MAX_HZ: u32 = 10_000;
/// Sampling never runs longer than this, whatever the stop condition.
pub const MAX_SECONDS: f64 = 600.0;
/// Distinct stacks kept; further new ones are counted as dropped (bounded memory).
const MAX_STACKS: usize = 1 << 17;
/// Rows in the top-functions table, and in the top-instructions table under it.
const TOP_ROWS: usize = 40;
const TOP_INSTRUCTIONS: usize = 20;
const MAX_MARKER: usize = 256;

/// When sampling ends (besides the VM stopping and MAX_SECONDS).
#[derive(Clone, Debug, PartialEq)]
pub enum Until {
    /// The first time these bytes appear on the serial console.
    Marker(String),
    Seconds(f64),
    /// Only when the VM stops.
    Stop,
}

/// What the `--profile-boot*` flags ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileOptions {
    pub out: PathBuf,
    pub hz: u32,
    pub until: Until,
    pub symbols: Option<PathBuf>,
    pub stacks: bool,
}

/// Parses `--profile-boot-hz`'s value.
pub fn parse_hz(v: &str) -> Result<u32, String> {
    match v.parse::<u32>() {
        Ok(n) if (1..=MAX_HZ).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{v}` is not a sampling rate from 1 to {MAX_HZ} (samples per second)"
        )),
    }
}

/// Parses `--profile-boot-until`'s value: a number of seconds (`30`, `2.5`, `30s`), or
/// else a marker text to wait for on the serial console.
pub fn parse_until(v: &str) -> Result<Until, String> {
    let num = v.strip_suffix('s').unwrap_or(v);
    if !num.is_empty() && num.bytes().all(|c| c.is_ascii_digit() || c == b'.') {
        return match num.parse::<f64>() {
            Ok(s) if s > 0.0 && s <= MAX_SECONDS => Ok(Until::Seconds(s)),
            _ => Err(format!(
                "`{v}` is not a time limit above 0 and at most {MAX_SECONDS} seconds"
            )),
        };
    }
    if v.is_empty() || v.len() > MAX_MARKER {
        return Err(format!(
            "a marker must be 1 to {MAX_MARKER} bytes of console output"
        ));
    }
    Ok(Until::Marker(v.to_string()))
}

/// Where `--profile-boot FILE`'s folded stacks go.
pub fn folded_path(out: &std::path::Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".folded");
    PathBuf::from(p)
}

/// What a profile needs before the VM exists: its output files (created at start so a
/// bad path is a start-up error, and written later under the VMM thread's seccomp
/// filter without opening anything) and the symbols of `--profile-boot-symbols`.
pub struct ProfileSetup {
    pub opts: ProfileOptions,
    table: File,
    folded: File,
    symbols: Option<(Symbols, String)>,
}

impl ProfileSetup {
    pub fn new(opts: ProfileOptions) -> Result<ProfileSetup, String> {
        let create = |p: &std::path::Path| {
            File::create(p)
                .map_err(|e| format!("--profile-boot: cannot create {}: {e}", p.display()))
        };
        let table = create(&opts.out)?;
        let folded = create(&folded_path(&opts.out))?;
        let symbols = match &opts.symbols {
            Some(p) => {
                let path = p.to_string_lossy().into_owned();
                let s = Symbols::load(&path).map_err(|e| format!("--profile-boot-symbols: {e}"))?;
                if s.is_empty() {
                    return Err(format!(
                        "--profile-boot-symbols: {path} has no function symbols"
                    ));
                }
                Some((s, path))
            }
            None => None,
        };
        Ok(ProfileSetup {
            opts,
            table,
            folded,
            symbols,
        })
    }
}

/// Samples as the vCPU thread records them: stacks of raw guest addresses, innermost
/// first, with their counts.
#[derive(Default)]
struct Store {
    stacks: HashMap<Vec<u64>, u64>,
    dropped: u64,
}

/// Shared by the VMM thread (which asks for samples) and vCPU 0 (which takes them).
pub struct Sampler {
    pending: AtomicBool,
    active: AtomicBool,
    stacks: bool,
    mem: GuestMemory,
    store: Mutex<Store>,
    samples: AtomicU64,
    failed: AtomicU64,
    cost_ns: AtomicU64,
}

impl Sampler {
    /// Marks a sample as wanted; false once sampling has ended.
    pub fn request(&self) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        self.pending.store(true, Ordering::Release);
        true
    }

    /// Called by the vCPU thread after each exit: takes the sample if one is wanted.
    pub fn take_if_pending(&self, fd: &VcpuFd) {
        // A plain load first: this runs after every exit, and most exits want no sample.
        if !self.pending.load(Ordering::Acquire)
            || !self.pending.swap(false, Ordering::AcqRel)
            || !self.active.load(Ordering::Acquire)
        {
            return;
        }
        let t0 = Instant::now();
        let Ok(regs) = fd.get_regs() else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut stack = Vec::with_capacity(if self.stacks { 16 } else { 1 });
        stack.push(regs.rip);
        if self.stacks
            && let Ok(s) = fd.get_sregs()
        {
            let paging = walk::Paging {
                cr0: s.cr0,
                cr3: s.cr3,
                cr4: s.cr4,
            };
            walk::frames(&self.mem, &paging, regs.rsp, regs.rbp, &mut stack);
        }
        {
            let mut st = self.store.lock().unwrap_or_else(|p| p.into_inner());
            let full = st.stacks.len() >= MAX_STACKS;
            match st.stacks.get_mut(&stack) {
                Some(n) => *n += 1,
                None if full => st.dropped += 1,
                None => {
                    st.stacks.insert(stack, 1);
                }
            }
        }
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.cost_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Watches the serial output for the stop marker. The UART writes on the vCPU thread;
/// a match writes `evt`, which the VMM thread's event loop reads.
struct MarkerWatch {
    needle: Vec<u8>,
    window: Vec<u8>,
    evt: EventFd,
    seen: bool,
}

impl MarkerWatch {
    fn new(needle: &[u8], evt: EventFd) -> MarkerWatch {
        MarkerWatch {
            needle: needle.to_vec(),
            window: Vec::with_capacity(needle.len()),
            evt,
            seen: false,
        }
    }

    /// Feeds console bytes; on the first match, writes the eventfd. True once matched.
    fn feed(&mut self, buf: &[u8]) -> bool {
        for &b in buf {
            if self.seen {
                break;
            }
            if self.window.len() == self.needle.len() {
                self.window.remove(0);
            }
            self.window.push(b);
            if self.window == self.needle {
                self.seen = true;
                let _ = self.evt.write(1);
            }
        }
        self.seen
    }
}

static WATCHING: AtomicBool = AtomicBool::new(false);
static WATCH: Mutex<Option<MarkerWatch>> = Mutex::new(None);

/// Console output, from the UART: feeds the marker watch when one is set. One VM per
/// process, so one watch.
pub fn serial_output(buf: &[u8]) {
    if !WATCHING.load(Ordering::Relaxed) {
        return;
    }
    let mut g = WATCH.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = g.as_mut()
        && w.feed(buf)
    {
        WATCHING.store(false, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Token {
    Tick = 1,
    Marker = 2,
}

/// The VMM thread's side: the sampling timer, the stop conditions, and the report.
pub struct BootProfiler {
    setup: Option<ProfileSetup>,
    sampler: Arc<Sampler>,
    control: Arc<VcpuControl>,
    timer: TimerFd,
    marker_evt: Option<EventFd>,
    symbols: Option<(Symbols, String)>,
    symbols_note: String,
    started: Instant,
    limit: Duration,
    ticks: u64,
    missed: u64,
}

impl BootProfiler {
    /// Sets up sampling of the boot vCPU (`control`) for a VM whose kernel image is
    /// `kernel`. Called before the vCPU threads start.
    pub fn new(
        mut setup: ProfileSetup,
        kernel: &str,
        mem: GuestMemory,
        control: Arc<VcpuControl>,
    ) -> std::io::Result<BootProfiler> {
        let (symbols, symbols_note) = match setup.symbols.take() {
            Some((s, p)) => {
                let note = format!("symbols from {p} ({} functions)", s.len());
                (Some((s, p)), note)
            }
            None if Symbols::is_elf(kernel) => match Symbols::load(kernel) {
                Ok(s) if !s.is_empty() => {
                    let note = format!("symbols from {kernel} ({} functions)", s.len());
                    (Some((s, kernel.to_string())), note)
                }
                Ok(_) => (
                    None,
                    format!("{kernel} has no function symbols: raw addresses"),
                ),
                Err(e) => (None, format!("no symbols ({e}): raw addresses")),
            },
            None => (
                None,
                format!(
                    "{kernel} is no ELF image (a bzImage?) and carries no symbols: raw addresses; pass the matching vmlinux with --profile-boot-symbols"
                ),
            ),
        };
        if symbols.is_none() {
            log::warn!("--profile-boot: {symbols_note}");
        }
        let sampler = Arc::new(Sampler {
            pending: AtomicBool::new(false),
            active: AtomicBool::new(true),
            stacks: setup.opts.stacks,
            mem,
            store: Mutex::new(Store::default()),
            samples: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cost_ns: AtomicU64::new(0),
        });
        control.set_sampler(sampler.clone());
        let marker_evt = match &setup.opts.until {
            Until::Marker(m) => {
                let evt = EventFd::new(EFD_NONBLOCK)?;
                *WATCH.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(MarkerWatch::new(m.as_bytes(), evt.try_clone()?));
                WATCHING.store(true, Ordering::Relaxed);
                Some(evt)
            }
            _ => None,
        };
        let limit = match setup.opts.until {
            Until::Seconds(s) => Duration::from_secs_f64(s),
            _ => Duration::from_secs_f64(MAX_SECONDS),
        };
        let mut timer = TimerFd::new().map_err(std::io::Error::from)?;
        // Non-blocking: a tick epoll reported in the same batch as the marker finds the
        // timer disarmed by `finish`, and a blocking read would then never return.
        // SAFETY: fcntl on a descriptor the TimerFd owns; the result is checked.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let period = Duration::from_nanos(1_000_000_000 / u64::from(setup.opts.hz.max(1)));
        timer
            .reset(period, Some(period))
            .map_err(std::io::Error::from)?;
        Ok(BootProfiler {
            setup: Some(setup),
            sampler,
            control,
            timer,
            marker_evt,
            symbols,
            symbols_note,
            started: Instant::now(),
            limit,
            ticks: 0,
            missed: 0,
        })
    }

    fn tick(&mut self) {
        // Expirations since the last read: more than one means the VMM thread was late.
        // None (EAGAIN) once `finish` has disarmed the timer.
        let Ok(n) = self.timer.wait() else { return };
        if self.setup.is_none() || n == 0 {
            return;
        }
        self.ticks += n;
        self.missed += n.saturating_sub(1);
        if self.started.elapsed() >= self.limit {
            let why = format!("time limit {:.1} s", self.limit.as_secs_f64());
            self.finish(&why);
        } else if self.sampler.request() {
            self.control.kick_for_sample();
        }
    }

    /// Ends sampling and writes the report, once (later calls do nothing).
    pub fn finish(&mut self, why: &str) {
        let Some(setup) = self.setup.take() else {
            return;
        };
        self.sampler.active.store(false, Ordering::Release);
        WATCHING.store(false, Ordering::Relaxed);
        let _ = self.timer.clear();
        let elapsed = self.started.elapsed();
        let store =
            std::mem::take(&mut *self.sampler.store.lock().unwrap_or_else(|p| p.into_inner()));
        let report = Report {
            stacks: &store.stacks,
            dropped: store.dropped,
            symbols: self.symbols.as_ref().map(|s| &s.0),
        };
        let samples = self.sampler.samples.load(Ordering::Relaxed);
        let cost = Duration::from_nanos(self.sampler.cost_ns.load(Ordering::Relaxed));
        let header = format!(
            "# ember boot profile: {samples} samples of vCPU 0 at {} Hz over {:.3} s, until {why}\n\
             # {}\n\
             # sampling cost on the vCPU thread: {:.1} ms ({:.1} us per sample, registers{}); \
             ticks {}, missed {}, failed reads {}, stacks dropped {}\n",
            setup.opts.hz,
            elapsed.as_secs_f64(),
            self.symbols_note,
            cost.as_secs_f64() * 1e3,
            if samples > 0 {
                cost.as_secs_f64() * 1e6 / samples as f64
            } else {
                0.0
            },
            if setup.opts.stacks {
                " and frame-pointer walk"
            } else {
                ""
            },
            self.ticks,
            self.missed,
            self.sampler.failed.load(Ordering::Relaxed),
            store.dropped,
        );
        let ProfileSetup {
            mut table,
            mut folded,
            opts,
            ..
        } = setup;
        let table_text = header + &report.table();
        let written = table
            .write_all(table_text.as_bytes())
            .and_then(|_| folded.write_all(report.folded().as_bytes()));
        match written {
            Ok(()) => log::info!(
                "boot profile: {samples} samples over {:.3} s (until {why}) written to {} and {}",
                elapsed.as_secs_f64(),
                opts.out.display(),
                folded_path(&opts.out).display()
            ),
            Err(e) => log::error!("boot profile: cannot write {}: {e}", opts.out.display()),
        }
    }
}

impl MutEventSubscriber for BootProfiler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            d if d == Token::Tick as u32 => self.tick(),
            d if d == Token::Marker as u32 => {
                if let Some(e) = &self.marker_evt {
                    let _ = e.read();
                }
                if let Until::Marker(m) = self
                    .setup
                    .as_ref()
                    .map(|s| s.opts.until.clone())
                    .unwrap_or(Until::Stop)
                {
                    self.finish(&format!("marker {m:?}"));
                }
            }
            d => log::warn!("unexpected event token {d}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.timer,
            Token::Tick as u32,
            EventSet::IN,
        )) {
            log::error!("boot profile: cannot watch the sampling timer: {e}");
        }
        if let Some(evt) = &self.marker_evt
            && let Err(e) = ops.add(Events::with_data(evt, Token::Marker as u32, EventSet::IN))
        {
            log::error!("boot profile: cannot watch the marker: {e}");
        }
    }
}

/// Turns raw samples into the two outputs.
struct Report<'a> {
    stacks: &'a HashMap<Vec<u64>, u64>,
    dropped: u64,
    symbols: Option<&'a Symbols>,
}

impl Report<'_> {
    /// A frame's name: its function, or its address. Return addresses (every frame but
    /// the innermost) are looked up one byte back, inside the call instruction, so a
    /// call that ends a function names that function.
    fn name(&self, addr: u64, innermost: bool) -> String {
        let at = if innermost {
            addr
        } else {
            addr.wrapping_sub(1)
        };
        match self.symbols.and_then(|s| s.lookup(at)) {
            Some(n) => n.to_string(),
            None => format!("{addr:#x}"),
        }
    }

    /// Folded stacks, outermost frame first, merged by name, largest first.
    fn folded_counts(&self) -> Vec<(String, u64)> {
        let mut merged: HashMap<String, u64> = HashMap::new();
        for (stack, n) in self.stacks {
            let names: Vec<String> = stack
                .iter()
                .enumerate()
                .rev()
                .map(|(i, a)| self.name(*a, i == 0))
                .collect();
            *merged.entry(names.join(";")).or_default() += n;
        }
        if self.dropped > 0 {
            merged.insert("[dropped: too many distinct stacks]".into(), self.dropped);
        }
        let mut v: Vec<_> = merged.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    fn folded(&self) -> String {
        self.folded_counts()
            .iter()
            .map(|(s, n)| format!("{s} {n}\n"))
            .collect()
    }

    /// The top functions by samples in them (self), with samples under them (total)
    /// when stacks were walked.
    fn table(&self) -> String {
        let mut own: HashMap<String, u64> = HashMap::new();
        let mut total: HashMap<String, u64> = HashMap::new();
        let mut all = 0u64;
        for (stack, n) in self.stacks {
            all += n;
            let names: Vec<String> = stack
                .iter()
                .enumerate()
                .map(|(i, a)| self.name(*a, i == 0))
                .collect();
            if let Some(first) = names.first() {
                *own.entry(first.clone()).or_default() += n;
            }
            let mut seen: Vec<&String> = Vec::new();
            for name in &names {
                if !seen.contains(&name) {
                    seen.push(name);
                    *total.entry(name.clone()).or_default() += n;
                }
            }
        }
        let mut rows: Vec<_> = own.into_iter().collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let pct = |n: u64| {
            if all == 0 {
                0.0
            } else {
                100.0 * n as f64 / all as f64
            }
        };
        let mut out = format!(
            "{:>8} {:>6} {:>8} {:>6}  function\n",
            "self", "%", "total", "%"
        );
        for (name, n) in rows.iter().take(TOP_ROWS) {
            let t = total.get(name).copied().unwrap_or(*n);
            out += &format!("{n:>8} {:>5.1}% {t:>8} {:>5.1}%  {name}\n", pct(*n), pct(t));
        }
        // Where inside the functions: the hottest sampled instructions, as function+offset
        // (what to look at in `objdump -d` of the image).
        let mut leaves: HashMap<u64, u64> = HashMap::new();
        for (stack, n) in self.stacks {
            if let Some(a) = stack.first() {
                *leaves.entry(*a).or_default() += n;
            }
        }
        let mut leaves: Vec<_> = leaves.into_iter().collect();
        leaves.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out += &format!("\n{:>8} {:>6}  instruction\n", "samples", "%");
        for (addr, n) in leaves.iter().take(TOP_INSTRUCTIONS) {
            let at = match self.symbols.and_then(|s| s.lookup_offset(*addr)) {
                Some((name, off)) => format!("{name}+{off:#x}"),
                None => String::new(),
            };
            out += &format!("{n:>8} {:>5.1}%  {addr:#x} {at}\n", pct(*n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_seconds_or_a_marker() {
        assert_eq!(parse_until("30"), Ok(Until::Seconds(30.0)));
        assert_eq!(parse_until("2.5s"), Ok(Until::Seconds(2.5)));
        assert_eq!(
            parse_until("VFS: Mounted root"),
            Ok(Until::Marker("VFS: Mounted root".into()))
        );
        assert!(parse_until("0").is_err());
        assert!(parse_until("1.2.3").is_err());
        assert!(parse_until("601").is_err());
        assert!(parse_until("").is_err());
        assert!(parse_until(&"x".repeat(300)).is_err());
        assert_eq!(parse_hz("997"), Ok(997));
        assert!(parse_hz("0").is_err());
        assert!(parse_hz("100000").is_err());
        assert!(parse_hz("fast").is_err());
    }

    #[test]
    fn report_names_merges_and_orders() {
        let syms = Symbols::from_entries(vec![
            (0x1000, 0x100, "main".into()),
            (0x2000, 0x100, "outer".into()),
            (0x3000, 0x100, "hot".into()),
        ]);
        let mut stacks = HashMap::new();
        // The return address 0x2100 is one past outer's end: still outer's call.
        stacks.insert(vec![0x3010, 0x2100, 0x1050], 5);
        stacks.insert(vec![0x3020, 0x2100, 0x1050], 3);
        stacks.insert(vec![0x2010, 0x1050], 2);
        stacks.insert(vec![0x9999], 1);
        let r = Report {
            stacks: &stacks,
            dropped: 0,
            symbols: Some(&syms),
        };
        let folded = r.folded();
        assert_eq!(folded, "main;outer;hot 8\nmain;outer 2\n0x9999 1\n");
        let table = r.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("hot") && lines[1].trim_start().starts_with("8 "));
        assert!(
            lines[2].contains("outer") && lines[2].contains(" 10 "),
            "{table}"
        );
    }

    #[test]
    fn marker_is_found_across_writes() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut w = MarkerWatch::new(b"Mounted root", evt.try_clone().unwrap());
        assert!(!w.feed(b"VFS: Mount"));
        assert!(evt.read().is_err());
        assert!(w.feed(b"ed root (ext4)\n"));
        assert_eq!(evt.read().unwrap(), 1);
        // Once only.
        assert!(w.feed(b"Mounted root"));
        assert!(evt.read().is_err());
    }
}
