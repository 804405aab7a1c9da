//! virtio-balloon (virtio 1.2 §5.5) as Firecracker has it: the host sets a target size,
//! the guest inflates by handing pages over (inflate queue), deflates by taking them
//! back (deflate queue), answers statistics requests (stats queue) and, with page
//! reporting, tells the host which free pages it may take (reporting queue).
//!
//! Pages handed over are returned to the host with `madvise(MADV_DONTNEED)`: guest RAM
//! is a private anonymous mapping, so the host frees them and the guest finds zeroed
//! pages when it touches them again. Deflating therefore needs no work from the host.
//!
//! Everything the guest sends is hostile. A page number is used only if its whole page
//! lies inside one guest RAM region; repeating a page releases it again (harmless); one
//! descriptor yields at most `MAX_PAGES_PER_DESC` page numbers and one statistics buffer
//! at most `MAX_STATS` entries. Whatever it says, a guest can only release its own memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::timerfd::TimerFd;

use super::queue::{self, BrokenRing};
use super::{ActivateError, EventSet, Interest, VirtioDevice, VirtioInterrupt, Work};
use crate::config::BalloonConfig;
use crate::snapshot::devices::{BalloonDeviceState, DeviceState};
use crate::vm::memory::GuestMemory;

pub const QUEUE_SIZE: u16 = 256;
/// The balloon's unit: page numbers are guest-physical addresses shifted by 12.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
pub const PAGES_PER_MIB: u32 = 256;
/// Linux sends at most 256 page numbers per request (VIRTIO_BALLOON_ARRAY_PFNS_MAX).
pub const MAX_PAGES_PER_DESC: usize = 256;
/// Tags 0..=15 are defined; a buffer larger than this many entries is read only this far.
pub const MAX_STATS: usize = 32;
/// One statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY_BYTES: usize = 10;

/// The highest statistics tag defined (VIRTIO_BALLOON_S_DIRECT_RECLAIM).
const MAX_TAG: u16 = 15;

const F_STATS_VQ: u32 = 1;
const F_DEFLATE_ON_OOM: u32 = 2;
const F_PAGE_REPORTING: u32 = 5;

/// The guest's statistics, named as Firecracker's GET /balloon/statistics names them;
/// absent until the guest has reported the tag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oom_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc_stall: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_reclaim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_reclaim: Option<u64>,
}

impl GuestStats {
    /// Records one (tag, value) pair; unknown tags are ignored, as the spec asks.
    pub fn update(&mut self, tag: u16, val: u64) {
        if let Some(slot) = self.slot(tag) {
            *slot = Some(val);
        }
    }

    /// The (tag, value) pairs reported so far, by tag (for a snapshot).
    pub fn pairs(&self) -> Vec<(u16, u64)> {
        let mut all = self.clone();
        (0..=MAX_TAG)
            .filter_map(|t| all.slot(t).and_then(|v| *v).map(|v| (t, v)))
            .collect()
    }

    fn slot(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kill,
            11 => &mut self.alloc_stall,
            12 => &mut self.async_scan,
            13 => &mut self.direct_scan,
            14 => &mut self.async_reclaim,
            15 => &mut self.direct_reclaim,
            _ => return None,
        })
    }
}

/// GET /balloon/statistics: Firecracker's `BalloonStats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStatsReport {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(flatten)]
    pub guest: GuestStats,
}

/// Counters, named as Firecracker's balloon metrics are.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    pub inflate_count: AtomicU64,
    pub deflate_count: AtomicU64,
    pub stats_updates_count: AtomicU64,
    pub stats_update_fails: AtomicU64,
    /// Pages released with madvise (inflate and reporting).
    pub released_pages: AtomicU64,
    /// Page numbers refused: outside guest RAM.
    pub refused_pages: AtomicU64,
}

impl BalloonMetrics {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "inflate_count": g(&self.inflate_count),
            "deflate_count": g(&self.deflate_count),
            "stats_updates_count": g(&self.stats_updates_count),
            "stats_update_fails": g(&self.stats_update_fails),
            "released_pages": g(&self.released_pages),
            "refused_pages": g(&self.refused_pages),
        })
    }
}

/// What the device and the API share: the target the host set, what the guest reports.
#[derive(Debug)]
pub struct BalloonState {
    pub target_pages: u32,
    /// The `actual` field the driver writes to the configuration space.
    pub actual_pages: u32,
    pub stats: GuestStats,
    pub stats_interval_s: u16,
    /// Present when statistics were enabled at creation (they cannot be switched on or
    /// off later, as in Firecracker); fires every `stats_interval_s`.
    timer: Option<TimerFd>,
    /// The stats buffer the guest last filled, held until the next statistics request.
    stats_head: Option<u16>,
    pub metrics: Arc<BalloonMetrics>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonApiError {
    #[error("Statistics for the balloon device are not enabled")]
    StatsDisabled,
    #[error("Statistics cannot be enabled/disabled after activation.")]
    StatsChange,
    #[error("cannot set the statistics timer: {0}")]
    Timer(String),
}

impl BalloonState {
    /// Sets the target (the caller tells the driver the configuration changed).
    pub fn set_target_mib(&mut self, mib: u32) {
        self.target_pages = mib.saturating_mul(PAGES_PER_MIB);
    }

    /// PATCH /balloon/statistics: a new interval, never 0 <-> non-zero.
    pub fn set_stats_interval(&mut self, secs: u16) -> Result<(), BalloonApiError> {
        let timer = match (&mut self.timer, secs) {
            (None, 0) => return Ok(()),
            (None, _) | (Some(_), 0) => return Err(BalloonApiError::StatsChange),
            (Some(t), _) => t,
        };
        arm(timer, secs).map_err(|e| BalloonApiError::Timer(e.to_string()))?;
        self.stats_interval_s = secs;
        Ok(())
    }

    pub fn stats_report(&self) -> Result<BalloonStatsReport, BalloonApiError> {
        if self.timer.is_none() {
            return Err(BalloonApiError::StatsDisabled);
        }
        Ok(BalloonStatsReport {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            target_mib: self.target_pages / PAGES_PER_MIB,
            actual_mib: self.actual_pages / PAGES_PER_MIB,
            guest: self.stats.clone(),
        })
    }
}

fn arm(timer: &mut TimerFd, secs: u16) -> std::io::Result<()> {
    let d = Duration::from_secs(u64::from(secs));
    timer.reset(d, Some(d)).map_err(std::io::Error::from)
}

struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Balloon {
    state: Arc<Mutex<BalloonState>>,
    features: u64,
    queue_sizes: Vec<u16>,
    stats_queue: Option<usize>,
    report_queue: Option<usize>,
    timer_fd: Option<RawFd>,
    active: Option<Active>,
}

/// num_pages (the target, host-written) and actual (driver-written), le32 each.
const CONFIG_LEN: usize = 8;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;

impl Balloon {
    /// A balloon for `cfg` (validated); the state is shared with the API through
    /// [`Balloon::state`].
    pub fn new(cfg: &BalloonConfig) -> std::io::Result<Balloon> {
        let mut features = 1u64 << VIRTIO_F_VERSION_1;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        // Queues are numbered in order over the features the device offers (virtio-mmio
        // drivers skip the queues of features they do not use).
        let mut timer = None;
        let mut stats_queue = None;
        if cfg.stats_polling_interval_s > 0 {
            features |= 1 << F_STATS_VQ;
            stats_queue = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
            let mut t = TimerFd::new().map_err(std::io::Error::from)?;
            // Non-blocking: reading it when it has not fired must not stall the event loop.
            // SAFETY: fcntl on the timer's own descriptor; the result is checked.
            if unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            arm(&mut t, cfg.stats_polling_interval_s)?;
            timer = Some(t);
        }
        if cfg.deflate_on_oom {
            features |= 1 << F_DEFLATE_ON_OOM;
        }
        let mut report_queue = None;
        if cfg.free_page_reporting {
            features |= 1 << F_PAGE_REPORTING;
            report_queue = Some(queue_sizes.len());
            queue_sizes.push(QUEUE_SIZE);
        }
        let timer_fd = timer.as_ref().map(|t| t.as_raw_fd());
        let mut state = BalloonState {
            target_pages: 0,
            actual_pages: 0,
            stats: GuestStats::default(),
            stats_interval_s: cfg.stats_polling_interval_s,
            timer,
            stats_head: None,
            metrics: Arc::new(BalloonMetrics::default()),
        };
        state.set_target_mib(cfg.amount_mib);
        Ok(Balloon {
            state: Arc::new(Mutex::new(state)),
            features,
            queue_sizes,
            stats_queue,
            report_queue,
            timer_fd,
            active: None,
        })
    }

    pub fn state(&self) -> Arc<Mutex<BalloonState>> {
        self.state.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BalloonState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let s = self.lock();
        let mut c = [0u8; CONFIG_LEN];
        c[..4].copy_from_slice(&s.target_pages.to_le_bytes());
        c[4..].copy_from_slice(&s.actual_pages.to_le_bytes());
        c
    }

    /// Inflate or deflate: every request is a list of le32 page numbers.
    fn process_pages(&mut self, index: usize) -> Work {
        let Some(a) = self.active.as_mut() else {
            return Work::Done;
        };
        let metrics = self
            .state
            .lock()
            .map_or_else(|p| p.into_inner().metrics.clone(), |s| s.metrics.clone());
        let Some(queue) = a.queues.get_mut(index) else {
            return Work::Done;
        };
        let mut done = 0;
        let work = loop {
            let chain = match queue::pop(queue, &a.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Work::Done,
                Err(BrokenRing) => break Work::Broken,
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_SIZE)).collect();
            let pfns = read_pfns(&a.mem, &descs);
            if index == INFLATE {
                metrics.inflate_count.fetch_add(1, Ordering::Relaxed);
                let (released, refused) = release_pfns(&a.mem, &pfns);
                metrics
                    .released_pages
                    .fetch_add(released, Ordering::Relaxed);
                metrics.refused_pages.fetch_add(refused, Ordering::Relaxed);
            } else {
                // The guest takes its pages back by touching them: nothing to do here.
                metrics.deflate_count.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = queue.add_used(&a.mem, head, 0) {
                log::debug!("virtio-balloon: cannot complete chain {head}: {e}");
            }
            done += 1;
            if done >= usize::from(QUEUE_SIZE) {
                break queue::left(queue, &a.mem);
            }
        };
        if done > 0 {
            a.interrupt.signal_used_queue();
        }
        work
    }

    /// Free page reporting: each descriptor is a free range of guest memory.
    fn process_reports(&mut self, index: usize) -> Work {
        let Some(a) = self.active.as_mut() else {
            return Work::Done;
        };
        let metrics = self
            .state
            .lock()
            .map_or_else(|p| p.into_inner().metrics.clone(), |s| s.metrics.clone());
        let Some(queue) = a.queues.get_mut(index) else {
            return Work::Done;
        };
        let mut done = 0;
        let work = loop {
            let chain = match queue::pop(queue, &a.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Work::Done,
                Err(BrokenRing) => break Work::Broken,
            };
            let head = chain.head_index();
            for d in chain.take(usize::from(QUEUE_SIZE)) {
                if release_range(&a.mem, d.addr().0, u64::from(d.len())) {
                    metrics
                        .released_pages
                        .fetch_add(u64::from(d.len()) / PAGE_SIZE, Ordering::Relaxed);
                } else {
                    metrics.refused_pages.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Err(e) = queue.add_used(&a.mem, head, 0) {
                log::debug!("virtio-balloon: cannot complete report {head}: {e}");
            }
            done += 1;
            if done >= usize::from(QUEUE_SIZE) {
                break queue::left(queue, &a.mem);
            }
        };
        if done > 0 {
            a.interrupt.signal_used_queue();
        }
        work
    }

    /// The guest filled its stats buffer: read it and keep the buffer for the next
    /// request.
    fn process_stats(&mut self, index: usize) -> Work {
        let Some(a) = self.active.as_mut() else {
            return Work::Done;
        };
        let Some(queue) = a.queues.get_mut(index) else {
            return Work::Done;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut returned = false;
        let mut work = Work::Done;
        // At most a ring's worth: each chain taken returns the one held before.
        for _ in 0..queue.size() {
            let chain = match queue::pop(queue, &a.mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(BrokenRing) => {
                    work = Work::Broken;
                    break;
                }
            };
            let head = chain.head_index();
            // A driver sends one buffer at a time; an earlier one still held goes back.
            if let Some(old) = state.stats_head.replace(head) {
                let _ = queue.add_used(&a.mem, old, 0);
                returned = true;
            }
            let descs: Vec<Descriptor> = chain.take(usize::from(QUEUE_SIZE)).collect();
            let Some(d) = descs.first().filter(|d| !d.is_write_only()) else {
                state
                    .metrics
                    .stats_update_fails
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let entries = (d.len() as usize / STAT_ENTRY_BYTES).min(MAX_STATS);
            let mut buf = vec![0u8; entries * STAT_ENTRY_BYTES];
            if a.mem
                .read_slice(&mut buf, GuestAddress(d.addr().0))
                .is_err()
            {
                state
                    .metrics
                    .stats_update_fails
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            for e in buf.chunks_exact(STAT_ENTRY_BYTES) {
                let (tag, val) = e.split_at(2);
                let tag = u16::from_le_bytes([tag[0], tag[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(val);
                state.stats.update(tag, u64::from_le_bytes(v));
            }
            state
                .metrics
                .stats_updates_count
                .fetch_add(1, Ordering::Relaxed);
        }
        if returned {
            a.interrupt.signal_used_queue();
        }
        work
    }

    /// The statistics timer fired: hand the held buffer back, which asks for new figures.
    fn request_stats(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = state.timer.as_mut() {
            // Readable (the event loop said so): this does not block.
            let _ = t.wait();
        }
        let (Some(a), Some(q)) = (self.active.as_mut(), self.stats_queue) else {
            return;
        };
        let Some(head) = state.stats_head.take() else {
            return;
        };
        if let Some(queue) = a.queues.get_mut(q) {
            if let Err(e) = queue.add_used(&a.mem, head, 0) {
                log::debug!("virtio-balloon: cannot return the stats buffer: {e}");
            }
            a.interrupt.signal_used_queue();
        }
    }
}

/// The page numbers in a request's device-readable descriptors, at most
/// `MAX_PAGES_PER_DESC` from each.
fn read_pfns(mem: &GuestMemory, descs: &[Descriptor]) -> Vec<u32> {
    let mut pfns = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let n = (d.len() as usize / 4).min(MAX_PAGES_PER_DESC);
        let mut buf = vec![0u8; n * 4];
        if mem.read_slice(&mut buf, GuestAddress(d.addr().0)).is_err() {
            continue;
        }
        pfns.extend(
            buf.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    pfns
}

/// Releases the pages, merged into runs of consecutive numbers. Returns (released,
/// refused) page counts.
pub fn release_pfns(mem: &GuestMemory, pfns: &[u32]) -> (u64, u64) {
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let (mut released, mut refused) = (0u64, 0u64);
    let mut i = 0;
    while let Some(&start) = sorted.get(i) {
        let mut run = 1u64;
        while sorted.get(i + run as usize) == Some(&(start.wrapping_add(run as u32))) {
            run += 1;
        }
        let addr = u64::from(start) << PAGE_SHIFT;
        // A run may cross from one RAM region into a hole: try it whole, then page by page.
        if release_range(mem, addr, run * PAGE_SIZE) {
            released += run;
        } else {
            for p in 0..run {
                if release_range(mem, addr + p * PAGE_SIZE, PAGE_SIZE) {
                    released += 1;
                } else {
                    refused += 1;
                }
            }
        }
        i += run as usize;
    }
    (released, refused)
}

/// Gives `len` bytes of guest memory at `addr` back to the host, if the range is
/// page-aligned and inside one RAM region.
pub fn release_range(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return false;
    }
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return false;
    };
    let offset = addr - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return false;
    }
    let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) else {
        return false;
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    if region.file_offset().is_some() {
        // RAM restored from a snapshot's memory file (MAP_PRIVATE): MADV_DONTNEED would
        // only drop the private copies, and the guest would read the file's pages again,
        // not zeros. A fresh anonymous mapping over the range frees the copies and reads
        // as zero, as released RAM of a booted VM does (Firecracker does the same).
        // SAFETY: [host, host + len) lies inside one live mapping of guest RAM owned by
        // `mem` (checked above), so MAP_FIXED replaces only guest RAM, with memory of the
        // same size and protection; KVM follows the change through its MMU notifier.
        let r = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            log::debug!(
                "virtio-balloon: mmap over {addr:#x}: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        return true;
    }
    // SAFETY: [host, host + len) lies inside one live mapping of guest RAM owned by
    // `mem` (checked above). MADV_DONTNEED on that private anonymous mapping only drops
    // its pages: later accesses by the guest or the VMM read zeros, never freed memory.
    let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if r != 0 {
        log::debug!(
            "virtio-balloon: madvise at {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Only `actual` (bytes 4..8) is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut config = self.config_bytes();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                return;
            };
            if (4..8).contains(&o)
                && let Some(slot) = config.get_mut(o)
            {
                *slot = *b;
            }
        }
        self.lock().actual_pages = u32::from_le_bytes([config[4], config[5], config[6], config[7]]);
    }

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
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize, _interest: &mut dyn Interest) -> Work {
        match index {
            INFLATE | DEFLATE => self.process_pages(index),
            i if Some(i) == self.stats_queue => self.process_stats(i),
            i if Some(i) == self.report_queue => self.process_reports(i),
            _ => Work::Done,
        }
    }

    fn reset(&mut self) {
        self.active = None;
        let mut s = self.lock();
        s.stats_head = None;
        s.actual_pages = 0;
    }

    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        self.timer_fd.map(|fd| (fd, 0)).into_iter().collect()
    }

    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> Option<DeviceState> {
        let s = self.lock();
        Some(DeviceState::Balloon(BalloonDeviceState {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            stats_head: s.stats_head,
            stats: s.stats.pairs(),
        }))
    }

    /// The target and statistics interval come from the snapshot's configuration (the
    /// API keeps it current); the rest is checked against this device: a held
    /// statistics buffer needs a statistics queue and a head index within it.
    fn restore_device_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        let saved = match state {
            None => return Ok(()),
            Some(DeviceState::Balloon(b)) => b,
            Some(_) => return Err("the saved state is not a balloon's".into()),
        };
        let mut s = self.lock();
        if saved.target_pages != s.target_pages {
            return Err(format!(
                "a target of {} pages where the configuration's amount_mib makes {}",
                saved.target_pages, s.target_pages
            ));
        }
        if let Some(head) = saved.stats_head {
            let size = self
                .stats_queue
                .and_then(|q| self.queue_sizes.get(q))
                .ok_or("a held statistics buffer, but statistics are not enabled")?;
            if head >= *size {
                return Err(format!(
                    "held statistics buffer {head} is outside the {size}-entry queue"
                ));
            }
        }
        if saved.stats.len() > usize::from(MAX_TAG) + 1 {
            return Err(format!("{} statistics entries", saved.stats.len()));
        }
        let mut stats = GuestStats::default();
        for (tag, val) in &saved.stats {
            let slot = stats
                .slot(*tag)
                .ok_or_else(|| format!("unknown statistics tag {tag}"))?;
            *slot = Some(*val);
        }
        s.actual_pages = saved.actual_pages;
        s.stats_head = saved.stats_head;
        s.stats = stats;
        Ok(())
    }

    fn process_event(&mut self, _source: u16, _: EventSet, _interest: &mut dyn Interest) -> Work {
        self.request_stats();
        Work::Done
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    use super::super::testing::{TestQueue, memory};
    use super::*;
    use crate::devices::ioapic::IrqLine;

    struct NoInterest;
    impl Interest for NoInterest {
        fn add(&mut self, _: RawFd, _: u16, _: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn modify(&mut self, _: RawFd, _: u16, _: EventSet) -> std::io::Result<()> {
            Ok(())
        }
        fn remove(&mut self, _: RawFd) -> std::io::Result<()> {
            Ok(())
        }
    }

    const MEM: usize = 0x40_0000;

    fn config(stats: u16, reporting: bool) -> BalloonConfig {
        BalloonConfig {
            amount_mib: 1,
            deflate_on_oom: true,
            stats_polling_interval_s: stats,
            free_page_hinting: false,
            free_page_reporting: reporting,
        }
    }

    /// A started balloon with one test queue per device queue, rings from 0x10000 on.
    fn started(cfg: &BalloonConfig) -> (Balloon, GuestMemory, Vec<TestQueue>) {
        let mem = memory(MEM);
        let mut dev = Balloon::new(cfg).unwrap();
        let mut tqs: Vec<TestQueue> = (0..dev.queue_max_sizes().len())
            .map(|i| TestQueue::new(&mem, 0x1_0000 + i as u64 * 0x4000, 16))
            .collect();
        let queues = tqs
            .iter_mut()
            .map(|t| std::mem::replace(&mut t.queue, Queue::new(16).unwrap()))
            .collect();
        let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(evt)));
        dev.activate(mem.clone(), queues, irq, 0).unwrap();
        (dev, mem, tqs)
    }

    fn touch(mem: &GuestMemory, addr: u64) {
        mem.write_obj(0xabu8, GuestAddress(addr)).unwrap();
    }

    fn byte(mem: &GuestMemory, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn features_queues_and_config_follow_the_settings() {
        let b = Balloon::new(&config(0, false)).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(b.avail_features() & (1 << F_STATS_VQ), 0);
        assert!(b.event_sources().is_empty());
        let b = Balloon::new(&config(5, true)).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_eq!((b.stats_queue, b.report_queue), (Some(2), Some(3)));
        assert_ne!(b.avail_features() & (1 << F_PAGE_REPORTING), 0);
        assert_eq!(b.event_sources().len(), 1);

        let mut b = Balloon::new(&config(0, false)).unwrap();
        let mut c = [0u8; 4];
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c), 256, "1 MiB target in 4 KiB pages");
        // num_pages is the host's; actual is the driver's.
        b.write_config(0, &7u32.to_le_bytes());
        b.write_config(4, &9u32.to_le_bytes());
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c), 256);
        assert_eq!(b.lock().actual_pages, 9);
        // Beyond the space, and at offsets that overflow: zeros, no panic.
        b.read_config(u64::MAX, &mut c);
        assert_eq!(c, [0; 4]);
        b.write_config(u64::MAX - 1, &[1, 2, 3, 4]);
    }

    #[test]
    fn inflate_releases_only_guest_pages_whatever_the_guest_says() {
        let (mut b, mem, mut q) = started(&config(0, false));
        for p in [0x20u64, 0x21, 0x30] {
            touch(&mem, p << PAGE_SHIFT);
        }
        touch(&mem, 0x22 << PAGE_SHIFT);
        // Pages 0x20, 0x21 (twice), 0x30; then lies: beyond RAM, the last u32.
        let pfns: [u32; 6] = [0x20, 0x21, 0x21, 0x30, 0x40_0000, u32::MAX];
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(0x8000)).unwrap();
        q[0].desc(&mem, 0, 0x8000, bytes.len() as u32, 0, 0);
        q[0].publish(&mem, 0);
        // A descriptor claiming 4 GiB of page numbers: read up to the cap only.
        q[0].desc(&mem, 1, 0x8000, u32::MAX, 0, 0);
        q[0].publish(&mem, 1);
        // And one outside memory altogether.
        q[0].desc(&mem, 2, 0xffff_ffff_f000, 4096, 0, 0);
        q[0].publish(&mem, 2);
        assert_eq!(b.process_queue(INFLATE, &mut NoInterest), Work::Done);
        assert_eq!(q[0].used_idx(&mem), 3);
        for p in [0x20u64, 0x21, 0x30] {
            assert_eq!(byte(&mem, p << PAGE_SHIFT), 0, "page {p:#x} released");
        }
        assert_eq!(
            byte(&mem, 0x22 << PAGE_SHIFT),
            0xab,
            "a page not named stays"
        );
        let m = b.lock().metrics.clone();
        assert_eq!(m.inflate_count.load(Ordering::Relaxed), 3);
        // The two lies, read twice (the capped read of the huge descriptor sees them too).
        assert_eq!(m.refused_pages.load(Ordering::Relaxed), 4);

        // Deflate needs no host work; the guest finds zeroed pages.
        q[1].desc(&mem, 0, 0x8000, 8, 0, 0);
        q[1].publish(&mem, 0);
        assert_eq!(b.process_queue(DEFLATE, &mut NoInterest), Work::Done);
        assert_eq!(q[1].used_idx(&mem), 1);
        assert_eq!(m.deflate_count.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn release_range_checks_bounds_and_alignment() {
        let mem = memory(MEM);
        assert!(release_range(&mem, 0x1000, 0x1000));
        assert!(!release_range(&mem, 0x1001, 0x1000), "unaligned");
        assert!(!release_range(&mem, 0x1000, 0x800), "partial page");
        assert!(!release_range(&mem, 0, 0), "empty");
        assert!(
            !release_range(&mem, MEM as u64 - 0x1000, 0x2000),
            "past RAM"
        );
        assert!(!release_range(&mem, !0xfffu64, 0x1000));
        assert!(!release_range(&mem, 0x1000, !0xfffu64), "overflow");
        assert_eq!(release_pfns(&mem, &[1, 2, 3, 1, 0x40_0000]), (3, 1));
    }

    #[test]
    fn statistics_are_read_held_and_returned_by_the_timer() {
        let (mut b, mem, mut q) = started(&config(1, false));
        let mut buf = Vec::new();
        for (tag, val) in [(5u16, 128u64 << 20), (4, 64 << 20), (99, 1)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&val.to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(0x8000)).unwrap();
        q[2].desc(&mem, 0, 0x8000, buf.len() as u32, 0, 0);
        q[2].publish(&mem, 0);
        assert_eq!(b.process_queue(2, &mut NoInterest), Work::Done);
        assert_eq!(q[2].used_idx(&mem), 0, "held until the next request");
        {
            let s = b.lock();
            let r = s.stats_report().unwrap();
            assert_eq!(r.guest.total_memory, Some(128 << 20));
            assert_eq!(r.guest.free_memory, Some(64 << 20));
            assert_eq!(r.guest.swap_in, None);
            assert_eq!((r.target_pages, r.target_mib), (256, 1));
        }
        // A writable buffer is no statistics buffer: counted as a failure.
        q[2].desc(&mem, 1, 0x8000, 20, VRING_DESC_F_WRITE, 0);
        q[2].publish(&mem, 1);
        b.process_queue(2, &mut NoInterest);
        assert_eq!(q[2].used_idx(&mem), 1, "the earlier buffer went back");
        let m = b.lock().metrics.clone();
        assert_eq!(m.stats_update_fails.load(Ordering::Relaxed), 1);
        // The interval can change, but statistics cannot be switched off.
        let mut s = b.lock();
        assert_eq!(s.set_stats_interval(0), Err(BalloonApiError::StatsChange));
        s.set_stats_interval(3).unwrap();
        assert_eq!(s.stats_interval_s, 3);
    }

    #[test]
    fn without_statistics_they_cannot_be_read_or_enabled() {
        let b = Balloon::new(&config(0, false)).unwrap();
        let mut s = b.lock();
        assert_eq!(s.stats_report(), Err(BalloonApiError::StatsDisabled));
        assert_eq!(s.set_stats_interval(1), Err(BalloonApiError::StatsChange));
        s.set_stats_interval(0).unwrap();
        s.set_target_mib(u32::MAX);
        assert_eq!(s.target_pages, u32::MAX, "saturates");
    }

    #[test]
    fn free_page_reports_are_released() {
        let (mut b, mem, mut q) = started(&config(0, true));
        touch(&mem, 0x5_0000);
        q[2].desc(&mem, 0, 0x5_0000, 0x2000, VRING_DESC_F_WRITE, 0);
        q[2].publish(&mem, 0);
        assert_eq!(b.process_queue(2, &mut NoInterest), Work::Done);
        assert_eq!(byte(&mem, 0x5_0000), 0);
        assert_eq!(q[2].used_idx(&mem), 1);
    }
}
