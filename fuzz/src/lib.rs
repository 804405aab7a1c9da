//! What ember's fuzz targets share: a thread confined by one of ember's real seccomp
//! filters, fake guest memory, split queues laid out from fuzz input, and a fake TAP.
//!
//! Each target stands for the ember thread that handles its input in production (the API
//! thread parses HTTP, the VMM thread drains virtio queues, a vCPU thread writes virtio-mmio
//! registers), so the code under test runs on a [`Confined`] thread under that thread's
//! filter. libFuzzer itself stays on its own, unfiltered thread: it must write corpus
//! entries and crash files.

use std::any::Any;
use std::cell::RefCell;
use std::io;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;

use ember::devices::virtio::net::tap::NetBackend;
use ember::devices::virtio::{EventSet, Interest};
pub use ember::seccomp::ThreadKind;
pub use ember::vm::memory::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const WORKER_NAME: &str = "ember_fuzz_confined";

/// The system call a confined thread was refused (-1: none since the last job).
static FORBIDDEN: AtomicI64 = AtomicI64::new(-1);

thread_local! {
    /// Where the last panic on the confined thread happened (its hook records it).
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

type Job = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;

/// A thread running under one of ember's seccomp filters, which runs jobs for the fuzz
/// target.
///
/// A forbidden system call would make ember exit with code 148 and lose the input; here the
/// call fails with ENOSYS instead, and the job's caller panics on libFuzzer's thread, so
/// the input is saved as a crash like any other. A panic in a job is caught and raised
/// again on the caller's thread for the same reason.
///
/// `EMBER_FUZZ_NO_SECCOMP=1` runs jobs without a filter, and `EMBER_FUZZ_INLINE=1` on
/// libFuzzer's thread without a filter (to measure what the filter and the hand-over
/// cost, or to debug); neither is for real runs.
pub struct Confined {
    kind: ThreadKind,
    inline: bool,
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Result<Box<dyn Any + Send>, String>>,
}

impl Confined {
    pub fn start(kind: ThreadKind) -> Confined {
        route_confined_panics();
        let filter = ["EMBER_FUZZ_NO_SECCOMP", "EMBER_FUZZ_INLINE"]
            .iter()
            .all(|k| std::env::var_os(k).is_none_or(|v| v != "1"));
        let (jobs, jobs_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        // One malloc arena, as in ember: the allocator must not make calls the filter
        // refuses (issue 9, point 6). Before the confined thread exists, so it gets none
        // of its own.
        ember::seccomp::prepare_process();
        std::thread::Builder::new()
            .name(WORKER_NAME.into())
            .spawn(move || {
                let installed = if filter {
                    ember::seccomp::confine_current_thread(kind).map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                let _ = ready_tx.send(installed);
                while let Ok(job) = jobs_rx.recv() {
                    let result = catch_unwind(AssertUnwindSafe(job)).map_err(panic_message);
                    if done_tx.send(result).is_err() {
                        break;
                    }
                }
            })
            .expect("cannot start the confined thread");
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("cannot install the {} filter: {e}", kind.name()),
            Err(_) => panic!("the confined thread died"),
        }
        // ember's handler (installed with the filter) exits; replace it, from this
        // unconfined thread since rt_sigaction is not in the filters.
        if filter {
            catch_sigsys();
        }
        let inline = std::env::var_os("EMBER_FUZZ_INLINE").is_some_and(|v| v == "1");
        Confined {
            kind,
            inline,
            jobs,
            done,
        }
    }

    /// Runs `job` on the confined thread and returns its result. Panics (on this thread)
    /// if the job panicked or made a system call the filter forbids.
    pub fn run<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> R {
        if self.inline {
            return job();
        }
        self.jobs
            .send(Box::new(move || Box::new(job()) as Box<dyn Any + Send>))
            .expect("the confined thread is gone");
        let result = self.done.recv().expect("the confined thread is gone");
        let nr = FORBIDDEN.swap(-1, Ordering::SeqCst);
        assert!(
            nr < 0,
            "the {} thread made system call {nr}, which its seccomp filter forbids \
             (ember would exit with code 148)",
            self.kind.name()
        );
        match result {
            Ok(r) => *r
                .downcast::<R>()
                .expect("the job's result has its own type"),
            Err(message) => panic!("on the {} thread: {message}", self.kind.name()),
        }
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    let at = PANIC_AT.with(|p| p.borrow_mut().take()).unwrap_or_default();
    format!("{what} at {at}")
}

/// libfuzzer-sys's panic hook aborts on the panicking thread; on the confined thread that
/// would run libFuzzer's crash handler under the filter. There, only the place is noted and
/// the panic unwinds to `catch_unwind`.
fn route_confined_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(WORKER_NAME) {
                let at = info.location().map(|l| l.to_string());
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Offset of `si_syscall` in a SIGSYS siginfo on 64-bit Linux (as in ember's handler).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if info.is_null() || ctx.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo for SIGSYS, with si_syscall an int at a
    // fixed offset, and a valid ucontext for an SA_SIGINFO handler; the saved RAX is the
    // refused call's return value once the handler returns.
    unsafe {
        let nr = info
            .cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned();
        let _ = FORBIDDEN.compare_exchange(-1, i64::from(nr), Ordering::SeqCst, Ordering::SeqCst);
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
    }
}

fn catch_sigsys() {
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the right signature and an
    // empty mask; the old action is not needed.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    assert_eq!(rc, 0, "cannot catch SIGSYS: {}", io::Error::last_os_error());
}

/// Fake guest RAM: two 32 KiB regions with a gap between them, so descriptors can point
/// outside RAM, into the gap and across it.
pub const REGION_LEN: usize = 0x8000;
pub const HIGH_REGION: u64 = 0x1_0000;

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), REGION_LEN),
        (GuestAddress(HIGH_REGION), REGION_LEN),
    ])
    .expect("cannot map fake guest memory")
}

/// Zeroes the memory, then writes `image` from address 0 (what does not fit in the low
/// region goes on in the high one).
pub fn load_image(mem: &GuestMemory, image: &[u8]) {
    static ZERO: [u8; REGION_LEN] = [0; REGION_LEN];
    for region in mem.iter() {
        let _ = mem.write_slice(&ZERO[..region.len() as usize], region.start_addr());
    }
    let (low, high) = image.split_at(image.len().min(REGION_LEN));
    let _ = mem.write_slice(low, GuestAddress(0));
    let _ = mem.write_slice(
        &high[..high.len().min(REGION_LEN)],
        GuestAddress(HIGH_REGION),
    );
}

/// Reads fuzz input front to back; past its end every read gives zeros.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }
}

/// A split queue as a driver leaves it: taken from four bytes of input (size, flags, the
/// device's next available and next used indexes), with its descriptor table at 0 and
/// its rings right after it, as the guest lays them out in the image.
pub struct QueueSpec {
    pub size: u16,
    pub event_idx: bool,
    pub next_avail: u16,
    pub next_used: u16,
}

impl QueueSpec {
    /// Flag bit 0 of the spec's flags byte; the others are the target's.
    pub fn read(input: &mut Input, max_size: u16) -> (QueueSpec, u8) {
        let size_log2 = input.u8() % 9;
        let flags = input.u8();
        let spec = QueueSpec {
            size: (1u16 << size_log2).min(max_size),
            event_idx: flags & 1 != 0,
            next_avail: input.u16(),
            next_used: input.u16(),
        };
        (spec, flags >> 1)
    }

    pub fn avail_ring(&self) -> u64 {
        16 * u64::from(self.size)
    }

    pub fn used_ring(&self) -> u64 {
        // flags, idx, ring, used_event: 2-byte fields; the used ring is 4-byte aligned.
        (self.avail_ring() + 6 + 2 * u64::from(self.size)).next_multiple_of(4)
    }

    /// The ready queue the transport would hand the device.
    pub fn build(&self, max_size: u16, mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(max_size).expect("a valid maximum queue size");
        q.try_set_size(self.size).expect("a power of two size");
        q.try_set_desc_table_address(GuestAddress(0))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring()))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.used_ring()))
            .expect("aligned");
        q.set_event_idx(self.event_idx);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_ready(true);
        assert!(q.is_valid(mem), "the fuzz queue layout must be valid");
        q
    }
}

/// The avail ring as the device found it, to check afterwards that it took `completed`
/// chains and gave a used entry to each whose head index is inside the queue (one outside
/// cannot be returned: the used entry would name a descriptor that does not exist).
pub struct QueueCheck {
    size: u16,
    ring_addr: u64,
    ring: Vec<u8>,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
}

impl QueueCheck {
    pub fn before(spec: &QueueSpec, queue: &Queue, mem: &GuestMemory) -> QueueCheck {
        let ring_addr = spec.avail_ring() + 4;
        QueueCheck {
            size: spec.size,
            ring_addr,
            ring: Self::read_ring(spec.size, ring_addr, mem),
            next_avail: Wrapping(queue.next_avail()),
            next_used: Wrapping(queue.next_used()),
        }
    }

    fn read_ring(size: u16, addr: u64, mem: &GuestMemory) -> Vec<u8> {
        let mut ring = vec![0u8; 2 * usize::from(size)];
        mem.read_slice(&mut ring, GuestAddress(addr))
            .expect("the avail ring is in guest memory");
        ring
    }

    pub fn after(&self, queue: &Queue, mem: &GuestMemory, completed: u32) {
        let taken = Wrapping(queue.next_avail()) - self.next_avail;
        assert_eq!(
            u32::from(taken.0),
            completed % 0x1_0000,
            "chains taken from the avail ring and chains reported differ"
        );
        // A request may have written into the avail ring itself; then what was taken is
        // no longer known.
        if Self::read_ring(self.size, self.ring_addr, mem) != self.ring {
            return;
        }
        let valid = (0..taken.0)
            .filter(|i| {
                let slot = usize::from((self.next_avail.0.wrapping_add(*i)) % self.size);
                let head = u16::from_le_bytes([self.ring[2 * slot], self.ring[2 * slot + 1]]);
                head < self.size
            })
            .count();
        let used = Wrapping(queue.next_used()) - self.next_used;
        assert_eq!(
            usize::from(used.0),
            valid,
            "every chain with a valid head gets a used entry"
        );
    }
}

/// A TAP stand-in: RX frames come from the fuzz input, TX frames are counted and dropped.
#[derive(Default)]
pub struct FakeTap {
    /// What each `recv` returns, in order; after the last one, `WouldBlock`.
    pub rx: Vec<io::Result<Vec<u8>>>,
    pub sent: usize,
}

impl FakeTap {
    /// Frames as (u16 length, bytes) records; length 0 is a read of 0 bytes (end of
    /// file), 0xffff a read error.
    pub fn from_input(input: &mut Input) -> FakeTap {
        let mut rx = Vec::new();
        while !input.0.is_empty() && rx.len() < 512 {
            rx.push(match input.u16() {
                0xffff => Err(io::Error::from_raw_os_error(libc::EIO)),
                n => Ok(input.bytes(usize::from(n)).to_vec()),
            });
        }
        rx.reverse();
        FakeTap { rx, sent: 0 }
    }
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        // Only the event loop's watch of the TAP uses the descriptor; the targets drive
        // queues and registers directly and never run it.
        -1
    }
}

impl NetBackend for FakeTap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.pop() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(Err(e)) => Err(e),
            Some(Ok(frame)) => {
                // A TAP read truncates a frame larger than the buffer.
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
        }
    }

    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        self.sent += 1;
        Ok(())
    }

    fn set_offload(&mut self, _flags: libc::c_uint) -> io::Result<()> {
        Ok(())
    }
}

/// The VMM thread's event loop as a device sees it: a real epoll set the device adds its
/// fds to through `Interest`. Like event-manager it keeps a table by fd and refuses an fd
/// it already holds, so a device that closes a registered fd and reuses its number fails.
pub struct FuzzLoop {
    epoll: vmm_sys_util::epoll::Epoll,
    fds: std::collections::BTreeSet<RawFd>,
}

impl FuzzLoop {
    /// A loop watching `sources` (a device's `event_sources`) for input.
    pub fn new(sources: Vec<(RawFd, u16)>) -> FuzzLoop {
        let mut l = FuzzLoop {
            epoll: vmm_sys_util::epoll::Epoll::new().expect("epoll_create"),
            fds: Default::default(),
        };
        for (fd, source) in sources {
            l.add(fd, source, EventSet::IN).expect("a fixed source");
        }
        l
    }

    /// The fds registered now.
    pub fn fds(&self) -> Vec<RawFd> {
        self.fds.iter().copied().collect()
    }

    /// What is ready, waiting up to `ms` milliseconds.
    pub fn wait(&self, ms: i32) -> Vec<(u16, EventSet)> {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 64];
        let n = self.epoll.wait(ms, &mut events).unwrap_or(0);
        events
            .iter()
            .take(n)
            .map(|e| (e.data() as u16, e.event_set()))
            .collect()
    }
}

impl Interest for FuzzLoop {
    fn add(&mut self, fd: RawFd, source: u16, events: EventSet) -> io::Result<()> {
        if self.fds.contains(&fd) {
            return Err(io::Error::other("fd already registered"));
        }
        let ev = vmm_sys_util::epoll::EpollEvent::new(events, u64::from(source));
        self.epoll
            .ctl(vmm_sys_util::epoll::ControlOperation::Add, fd, ev)?;
        self.fds.insert(fd);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, source: u16, events: EventSet) -> io::Result<()> {
        let ev = vmm_sys_util::epoll::EpollEvent::new(events, u64::from(source));
        self.epoll
            .ctl(vmm_sys_util::epoll::ControlOperation::Modify, fd, ev)
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll.ctl(
            vmm_sys_util::epoll::ControlOperation::Delete,
            fd,
            vmm_sys_util::epoll::EpollEvent::default(),
        )?;
        self.fds.remove(&fd);
        Ok(())
    }
}

/// An event loop the device never needs here: every request succeeds and does nothing.
pub struct NoInterest;

impl Interest for NoInterest {
    fn add(&mut self, _: RawFd, _: u16, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn modify(&mut self, _: RawFd, _: u16, _: EventSet) -> io::Result<()> {
        Ok(())
    }
    fn remove(&mut self, _: RawFd) -> io::Result<()> {
        Ok(())
    }
}
