//! virtio-rng (virtio 1.2 §5.4): one queue of device-writable buffers, filled from the
//! host's `getrandom(2)`. Linux registers the device as a hwrng ("virtio_rng.0") and
//! mixes what it reads into its own pool.
//!
//! Every buffer the guest offers is checked through vm-memory; a buffer outside guest
//! memory completes with length 0, and one request fills at most `MAX_REQUEST_BYTES`.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::queue::{self, BrokenRing};
use super::{ActivateError, EventSet, Interest, VirtioDevice, VirtioInterrupt, Work};
use crate::devices::rate_limiter::RateLimiter;
use crate::snapshot::devices::{DeviceState, LimiterState};
use crate::vm::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// Bytes one request may take: Linux asks for at most a page at a time; a guest that
/// offers a huge chain gets this much, so one kick cannot keep the VMM busy for long.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// How many bytes the device may hand out now; the rate limiter's seam.
///
/// The device asks before each request and, when refused, leaves the request (and the
/// rest of the queue) in the ring: `process_queue` then reports no work left, and whoever
/// owns the budget re-kicks the queue when it refills (a timer on the event loop, with
/// Firecracker's token buckets). Without a configured limit the budget is [`Unlimited`].
pub trait EntropyBudget: Send {
    /// True if `bytes` may be served now (and are then counted as spent).
    fn consume(&mut self, bytes: u64) -> bool;
    /// The timer that signals a refill, watched on the event loop (none: never refuses).
    fn timer_fd(&self) -> Option<RawFd> {
        None
    }
    /// The timer fired: true if requests held back may be served again.
    fn timer_fired(&mut self) -> bool {
        false
    }
    /// The buckets' levels, for a snapshot (none: nothing is limited).
    fn save(&self) -> Option<LimiterState> {
        None
    }
    /// Puts saved levels back (see `RateLimiter::restore`).
    fn restore(&mut self, saved: Option<&LimiterState>) -> Result<(), String> {
        match saved {
            None => Ok(()),
            Some(_) => Err("a rate limiter level, but no rate limiter is configured".into()),
        }
    }
}

/// Firecracker's token buckets: each request takes one op and the bytes it asks for.
impl EntropyBudget for RateLimiter {
    fn consume(&mut self, bytes: u64) -> bool {
        !self.is_active() || self.consume_request(bytes)
    }

    fn timer_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }

    fn timer_fired(&mut self) -> bool {
        RateLimiter::timer_fired(self)
    }

    fn save(&self) -> Option<LimiterState> {
        Some(RateLimiter::save(self))
    }

    fn restore(&mut self, saved: Option<&LimiterState>) -> Result<(), String> {
        match saved {
            Some(s) => RateLimiter::restore(self, s),
            None => Err("no level for the configured rate limiter".into()),
        }
    }
}

/// Event source: the budget's refill timer.
const SOURCE_BUDGET: u16 = 0;

/// No limit: every request is served.
pub struct Unlimited;

impl EntropyBudget for Unlimited {
    fn consume(&mut self, _bytes: u64) -> bool {
        true
    }
}

/// Counters for the metrics file, named as Firecracker's entropy metrics are.
#[derive(Debug, Default)]
pub struct EntropyMetrics {
    pub entropy_event_count: AtomicU64,
    pub entropy_bytes: AtomicU64,
    pub host_rng_fails: AtomicU64,
    pub entropy_event_fails: AtomicU64,
}

impl EntropyMetrics {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "entropy_event_count": g(&self.entropy_event_count),
            "entropy_bytes": g(&self.entropy_bytes),
            "host_rng_fails": g(&self.host_rng_fails),
            "entropy_event_fails": g(&self.entropy_event_fails),
        })
    }
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Rng {
    active: Option<Active>,
    budget: Box<dyn EntropyBudget>,
    pub metrics: Arc<EntropyMetrics>,
}

impl Rng {
    pub fn new(budget: Box<dyn EntropyBudget>) -> Rng {
        Rng {
            active: None,
            budget,
            metrics: Arc::new(EntropyMetrics::default()),
        }
    }
}

/// Fills `buf` from the host's getrandom; false if the host could not.
fn host_random(buf: &mut [u8]) -> bool {
    // Under the fuzzer (fuzz/fuzz_targets/virtio_rng.rs) only the first bytes come from the
    // host, the rest stay zero: the same system call under the same filter, and the guest's
    // descriptors handled alike, without the host's ChaCha making most of each execution.
    #[cfg(fuzzing)]
    let buf = {
        let n = buf.len().min(64);
        buf.get_mut(..n).unwrap_or_default()
    };
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the valid, writable
        // buffer `rest`; its result is checked.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

/// Serves one request: fills its device-writable descriptors (in order, up to
/// `MAX_REQUEST_BYTES`) with random bytes. Returns the bytes written, or None when the
/// budget refused the request (which must then stay in the ring).
fn serve(
    mem: &GuestMemory,
    descs: &[Descriptor],
    budget: &mut dyn EntropyBudget,
    metrics: &EntropyMetrics,
) -> Option<u32> {
    let wanted = descs
        .iter()
        .filter(|d| d.is_write_only())
        .fold(0u32, |acc, d| acc.saturating_add(d.len()))
        .min(MAX_REQUEST_BYTES);
    if wanted == 0 {
        return Some(0);
    }
    if !budget.consume(u64::from(wanted)) {
        return None;
    }
    let mut bytes = vec![0u8; wanted as usize];
    if !host_random(&mut bytes) {
        metrics.host_rng_fails.fetch_add(1, Ordering::Relaxed);
        return Some(0);
    }
    let mut written = 0u32;
    for d in descs.iter().filter(|d| d.is_write_only()) {
        let Some(chunk) = bytes.get(written as usize..) else {
            break;
        };
        let take = chunk.len().min(d.len() as usize);
        let Some(part) = chunk.get(..take) else {
            break;
        };
        if take == 0 {
            break;
        }
        if mem.write_slice(part, GuestAddress(d.addr().0)).is_err() {
            // Outside guest memory: what was written so far stands.
            metrics.entropy_event_fails.fetch_add(1, Ordering::Relaxed);
            break;
        }
        written += take as u32;
    }
    metrics
        .entropy_bytes
        .fetch_add(u64::from(written), Ordering::Relaxed);
    Some(written)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_len(&self) -> usize {
        0
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Some(queue) = queues.into_iter().next().filter(|_| got == 1) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize, _interest: &mut dyn Interest) -> Work {
        let Some(a) = self.active.as_mut().filter(|_| index == 0) else {
            return Work::Done;
        };
        self.metrics
            .entropy_event_count
            .fetch_add(1, Ordering::Relaxed);
        let size = a.queue.size();
        let mut done = 0u32;
        let mut work = Work::More;
        for _ in 0..size {
            let chain = match queue::pop(&mut a.queue, &a.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    work = Work::Done;
                    break;
                }
                Err(BrokenRing) => {
                    work = Work::Broken;
                    break;
                }
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(usize::from(size)).collect();
            let Some(written) = serve(&a.mem, &descs, self.budget.as_mut(), &self.metrics) else {
                // Out of budget: give the chain back; the budget's owner re-kicks.
                a.queue.go_to_previous_position();
                work = Work::Done;
                break;
            };
            if let Err(e) = a.queue.add_used(&a.mem, head, written) {
                log::debug!("virtio-rng: cannot complete chain {head}: {e}");
            }
            done += 1;
        }
        if done > 0 && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used_queue();
        }
        if work == Work::More {
            work = queue::left(&a.queue, &a.mem);
        }
        work
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> Option<DeviceState> {
        Some(DeviceState::Rng {
            limiter: self.budget.save(),
        })
    }

    fn restore_device_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        match state {
            None => Ok(()),
            Some(DeviceState::Rng { limiter }) => self
                .budget
                .restore(limiter.as_ref())
                .map_err(|e| format!("rate limiter: {e}")),
            Some(_) => Err("the saved state is not an entropy device's".into()),
        }
    }

    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        self.budget
            .timer_fd()
            .map(|fd| vec![(fd, SOURCE_BUDGET)])
            .unwrap_or_default()
    }

    /// The budget's timer fired: serve what it held back.
    fn process_event(&mut self, source: u16, _: EventSet, interest: &mut dyn Interest) -> Work {
        if source != SOURCE_BUDGET || !self.budget.timer_fired() {
            return Work::Done;
        }
        self.process_queue(0, interest)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use super::super::testing::{TestQueue, memory};
    use super::*;
    use crate::devices::ioapic::IrqLine;

    struct Never;
    impl EntropyBudget for Never {
        fn consume(&mut self, _: u64) -> bool {
            false
        }
    }

    struct NoInterest;
    impl Interest for NoInterest {
        fn add(&mut self, _: std::os::fd::RawFd, _: u16, _: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn modify(&mut self, _: std::os::fd::RawFd, _: u16, _: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn remove(&mut self, _: std::os::fd::RawFd) -> std::io::Result<()> {
            Ok(())
        }
    }

    const MEM: usize = 0x10_0000;

    /// Runs the chain set up by `setup` (descriptor 0 is the head) through a device;
    /// returns the used entries and the device.
    fn run(
        setup: impl FnOnce(&GuestMemory, &TestQueue),
        budget: Box<dyn EntropyBudget>,
    ) -> (Vec<(u32, u32)>, Rng) {
        let mem = memory(MEM);
        let mut q = TestQueue::new(&mem, 0x1000, 16);
        setup(&mem, &q);
        q.publish(&mem, 0);
        let mut rng = Rng::new(budget);
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(evt)));
        rng.activate(
            mem.clone(),
            vec![std::mem::replace(&mut q.queue, Queue::new(16).unwrap())],
            irq,
            0,
        )
        .unwrap();
        assert_eq!(rng.process_queue(0, &mut NoInterest), Work::Done);
        let used = (0..q.used_idx(&mem)).map(|i| q.used(&mem, i)).collect();
        (used, rng)
    }

    #[test]
    fn fills_writable_buffers() {
        let (used, rng) = run(
            |m, q| {
                q.desc(m, 0, 0x8000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1);
                q.desc(m, 1, 0x9000, 32, VRING_DESC_F_WRITE, 0);
            },
            Box::new(Unlimited),
        );
        assert_eq!(used, [(0, 48)]);
        assert_eq!(rng.metrics.entropy_bytes.load(Ordering::Relaxed), 48);
        let mut buf = [0u8; 32];
        rng.active
            .as_ref()
            .unwrap()
            .mem
            .read_slice(&mut buf, GuestAddress(0x9000))
            .unwrap();
        assert_ne!(buf, [0u8; 32], "random bytes, not zeros");
    }

    #[test]
    fn token_buckets_hold_requests_back() {
        let cfg: crate::config::RateLimiterConfig =
            serde_json::from_str(r#"{"ops": {"size": 1, "refill_time": 60000}}"#).unwrap();
        let mut limiter = RateLimiter::new(Some(&cfg)).unwrap();
        // The one op of the bucket is spent: the next request waits for the timer.
        assert!(EntropyBudget::consume(&mut limiter, 16));
        let (used, mut rng) = run(
            |m, q| q.desc(m, 0, 0x8000, 16, VRING_DESC_F_WRITE, 0),
            Box::new(limiter),
        );
        assert_eq!(used, []);
        assert_eq!(rng.event_sources().len(), 1, "the refill timer is watched");
        // Not fired yet: nothing is served.
        assert_eq!(
            rng.process_event(SOURCE_BUDGET, EventSet::IN, &mut NoInterest),
            Work::Done
        );
        assert_eq!(rng.metrics.entropy_bytes.load(Ordering::Relaxed), 0);
        // A fast refill: once the limiter's timer fires, the held request is served.
        let cfg: crate::config::RateLimiterConfig =
            serde_json::from_str(r#"{"ops": {"size": 1, "refill_time": 1}}"#).unwrap();
        let mut limiter = RateLimiter::new(Some(&cfg)).unwrap();
        assert!(EntropyBudget::consume(&mut limiter, 16));
        assert!(
            !EntropyBudget::consume(&mut limiter, 16),
            "blocked until the timer"
        );
        let (used, mut rng) = run(
            |m, q| q.desc(m, 0, 0x8000, 16, VRING_DESC_F_WRITE, 0),
            Box::new(limiter),
        );
        assert_eq!(used, []);
        // Against a hang only: the timer is armed for REFILL_TIMER.
        std::thread::sleep(crate::devices::rate_limiter::REFILL_TIMER * 3);
        assert_eq!(
            rng.process_event(SOURCE_BUDGET, EventSet::IN, &mut NoInterest),
            Work::Done
        );
        assert_eq!(rng.metrics.entropy_bytes.load(Ordering::Relaxed), 16);
        // Without a limit there is nothing to watch.
        let (_, rng) = run(|_, _| {}, Box::new(Unlimited));
        assert!(rng.event_sources().is_empty());
    }

    #[test]
    fn hostile_buffers_change_nothing_outside() {
        // Outside guest memory, and huge: nothing written, the VMM still fine.
        let (used, _) = run(
            |m, q| q.desc(m, 0, 0xffff_ffff_0000, u32::MAX, VRING_DESC_F_WRITE, 0),
            Box::new(Unlimited),
        );
        assert_eq!(used, [(0, 0)]);
        // Straddling the end of memory: refused whole.
        let (used, _) = run(
            |m, q| q.desc(m, 0, MEM as u64 - 0x1000, 0x2000, VRING_DESC_F_WRITE, 0),
            Box::new(Unlimited),
        );
        assert_eq!(used, [(0, 0)]);
        // A read-only buffer gets nothing.
        let (used, _) = run(|m, q| q.desc(m, 0, 0x8000, 64, 0, 0), Box::new(Unlimited));
        assert_eq!(used, [(0, 0)]);
    }

    #[test]
    fn a_refusing_budget_leaves_the_request_queued() {
        let (used, rng) = run(
            |m, q| q.desc(m, 0, 0x8000, 64, VRING_DESC_F_WRITE, 0),
            Box::new(Never),
        );
        assert!(used.is_empty());
        assert_eq!(rng.active.as_ref().map(|a| a.queue.next_avail()), Some(0));
    }
}
