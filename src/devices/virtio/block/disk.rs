//! virtio-blk requests and the disk they reach: a host file, read and written with pread/pwrite (never mmap: a
//! disk image the guest can reach through our address space is one bug away from a host
//! memory corruption, and a truncated file would turn into SIGBUS).
//!
//! With the `Sync` engine requests complete synchronously, in the order the driver made
//! them available; with `Async` (`uring.rs`) reads, writes and flushes are submitted to an
//! io_uring and complete when the kernel says so, in any order. Either way a write is in
//! the file before its used entry is published, so nothing acknowledged is lost once
//! `flush` (fdatasync) has run; the VMM calls it on every exit path.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestMemory as _, Permissions};

use super::uring::{Finished, Op, Uring};
use crate::config::drive::{CacheType, DriveConfig, IoEngine};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::queue::{self, Work};
use crate::devices::virtio::{LogOnce, VirtioError};
use crate::vm::memory::GuestMemory;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Queue size offered to the driver (the one queue's maximum).
pub const QUEUE_SIZE: u16 = 256;
/// Header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u32 = 16;
/// Data segments per request: the descriptors left once header and status are counted.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bounce buffer between guest memory and the file, per chunk.
const CHUNK: usize = 64 * 1024;
/// virtio_blk_config: capacity (u64), size_max (u32), seg_max (u32), geometry (4 bytes),
/// blk_size (u32).
pub const CONFIG_LEN: usize = 24;

/// The backing file and what the device says about it; the part of the device that
/// handles requests, testable without a transport.
pub struct Disk {
    id: String,
    pub(super) file: File,
    read_only: bool,
    cache_type: CacheType,
    /// Size in 512-byte sectors (a partial last sector is not exposed).
    pub(super) capacity: u64,
    buf: Vec<u8>,
    pub(super) metrics: Arc<BlockMetrics>,
    /// Host I/O failures recur on every request the guest repeats: logged loudly once.
    io_log: LogOnce,
    /// The drive's `rate_limiter` (None only for disks built without a device, in tests).
    pub(super) limiter: Option<RateLimiter>,
    /// The `Async` engine's ring; None for `Sync`.
    pub(super) uring: Option<Uring>,
    /// Every engine slot was busy: chains wait on the ring until a completion frees one.
    engine_throttled: bool,
    /// Completions reaped and not yet turned into used entries (reused buffer).
    finished: Vec<Finished>,
    /// A request's data buffers as guest ranges (reused buffer).
    ranges: Vec<(vm_memory::GuestAddress, usize)>,
}

/// Per-drive counters, in the metrics output as `block_<drive_id>` (Firecracker's name).
#[derive(Default)]
pub struct BlockMetrics {
    pub read_count: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_count: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_count: AtomicU64,
    /// Requests that completed with IOERR or UNSUPP (malformed, out of range, refused).
    pub failed_requests: AtomicU64,
    /// Chains returned unanswered: no writable status byte, a loop, more descriptors
    /// than the queue holds.
    pub invalid_chains: AtomicU64,
    /// Times the rate limiter held a request back (Firecracker's name).
    pub rate_limiter_throttled_events: AtomicU64,
    /// Times the Async engine had every slot in flight and requests waited on the ring
    /// (Firecracker's name).
    pub io_engine_throttled_events: AtomicU64,
}

impl BlockMetrics {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "read_count": g(&self.read_count),
            "read_bytes": g(&self.read_bytes),
            "write_count": g(&self.write_count),
            "write_bytes": g(&self.write_bytes),
            "flush_count": g(&self.flush_count),
            "failed_requests": g(&self.failed_requests),
            "invalid_chains": g(&self.invalid_chains),
            "rate_limiter_throttled_events": g(&self.rate_limiter_throttled_events),
            "io_engine_throttled_events": g(&self.io_engine_throttled_events),
        })
    }

    /// Counts one finished request of `req_type` that moved `bytes`.
    fn record(&self, req_type: u32, status: u8, bytes: u64) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        if u32::from(status) != VIRTIO_BLK_S_OK {
            add(&self.failed_requests, 1);
            return;
        }
        match req_type {
            VIRTIO_BLK_T_IN => {
                add(&self.read_count, 1);
                add(&self.read_bytes, bytes);
            }
            VIRTIO_BLK_T_OUT => {
                add(&self.write_count, 1);
                add(&self.write_bytes, bytes);
            }
            VIRTIO_BLK_T_FLUSH => add(&self.flush_count, 1),
            _ => {}
        }
    }
}

/// How a chain was dealt with: answered now with this many bytes written into it, or
/// handed to the Async engine, which answers it when the kernel completes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    Now(u32),
    Submitted,
}

/// Where a request's answer goes: its chain's head and its status byte.
#[derive(Debug, Clone, Copy)]
struct Reply {
    head: u16,
    status_addr: vm_memory::GuestAddress,
}

/// What one request did: its status, and how many bytes the device wrote into the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u32) -> Outcome {
        Outcome {
            status: status as u8,
            written: 0,
        }
    }
}

const IOERR: Outcome = Outcome {
    status: VIRTIO_BLK_S_IOERR as u8,
    written: 0,
};

/// The data bytes a request moves, for the rate limiter's bandwidth bucket: the data
/// buffers of a read or write (Firecracker charges those only); 0 for other requests and
/// for chains too broken to parse, which fail without touching the disk.
fn request_bytes(mem: &GuestMemory, chain: &DescriptorChain<&GuestMemory>) -> u64 {
    let Ok(mut reader) = chain.clone().reader(mem) else {
        return 0;
    };
    let readable = reader.available_bytes();
    let mut t = [0u8; 4];
    if reader.read_exact(&mut t).is_err() {
        return 0;
    }
    match u32::from_le_bytes(t) {
        VIRTIO_BLK_T_IN => chain
            .clone()
            .writer(mem)
            .map_or(0, |w| w.available_bytes().saturating_sub(1) as u64),
        VIRTIO_BLK_T_OUT => readable.saturating_sub(HEADER_LEN as usize) as u64,
        _ => 0,
    }
}

/// Opens a drive's file (read-only drives with O_RDONLY, so not even a bug here can write
/// to them) and returns it with its size in whole sectors.
fn open_backing(id: &str, path: &str, read_only: bool) -> Result<(File, u64), VirtioError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| VirtioError::OpenDisk {
            id: id.to_string(),
            path: path.to_string(),
            source,
        })?;
    // Seeking to the end also sizes block devices, whose metadata length is 0.
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|source| VirtioError::DiskSize {
            id: id.to_string(),
            path: path.to_string(),
            source,
        })?;
    if len % SECTOR_SIZE != 0 {
        log::warn!(
            "drive `{id}`: {path} is {len} bytes, not a multiple of {SECTOR_SIZE}; the guest \
             does not see the last {} bytes",
            len % SECTOR_SIZE
        );
    }
    Ok((file, len >> SECTOR_SHIFT))
}

impl Disk {
    /// Opens the drive's file: read-only drives with O_RDONLY, so not even a bug here can
    /// write to them.
    pub fn open(drive: &DriveConfig) -> Result<Disk, VirtioError> {
        let (file, sectors) =
            open_backing(&drive.drive_id, &drive.path_on_host, drive.is_read_only)?;
        let mut disk = Disk::from_file(
            file,
            &drive.drive_id,
            drive.is_read_only,
            drive.cache_type,
            sectors,
        );
        if drive.io_engine == IoEngine::Async {
            disk.use_async()?;
        }
        Ok(disk)
    }

    /// Switches to the Async engine: an io_uring for this disk's file.
    pub fn use_async(&mut self) -> Result<(), VirtioError> {
        let ring = Uring::new(&self.file).map_err(|source| VirtioError::IoUring {
            id: self.id.clone(),
            source,
        })?;
        self.uring = Some(ring);
        Ok(())
    }

    /// The Async engine's completion eventfd, for the event loop.
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.uring.as_ref().map(Uring::completion_fd)
    }

    /// Requests the Async engine has in flight (0 for Sync).
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, Uring::in_flight)
    }

    /// The same drive on another file (PATCH /drives after start).
    pub(super) fn reopen(&self, path: &str) -> Result<Disk, VirtioError> {
        let (file, sectors) = open_backing(&self.id, path, self.read_only)?;
        Ok(Disk::from_file(
            file,
            &self.id,
            self.read_only,
            self.cache_type,
            sectors,
        ))
    }

    pub fn from_file(
        file: File,
        id: &str,
        read_only: bool,
        cache_type: CacheType,
        capacity: u64,
    ) -> Disk {
        Disk {
            id: id.to_string(),
            file,
            read_only,
            cache_type,
            capacity,
            buf: Vec::new(),
            metrics: Arc::default(),
            io_log: LogOnce::default(),
            limiter: None,
            uring: None,
            engine_throttled: false,
            finished: Vec::new(),
            ranges: Vec::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX);
        // Firecracker's rule (and the drive config's contract): only a Writeback drive
        // tells the guest it has a cache worth flushing.
        if self.cache_type == CacheType::Writeback {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    pub(super) fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// fdatasync: what was written reaches the disk.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Drains `queue`: at most one queue's worth of chains, so a driver that refills the
    /// ring as fast as we drain it cannot keep the event loop here. Returns (chains
    /// completed, work left).
    pub fn process_queue(&mut self, mem: &GuestMemory, queue: &mut Queue) -> (u32, Work) {
        let (done, work) = self.take_chains(mem, queue);
        // One io_uring_enter for everything this drain queued.
        if let Some(u) = self.uring.as_mut() {
            u.submit();
        }
        (done, work)
    }

    fn take_chains(&mut self, mem: &GuestMemory, queue: &mut Queue) -> (u32, Work) {
        let mut done = 0u32;
        for _ in 0..queue.size() {
            if self.uring.as_ref().is_some_and(Uring::is_full) {
                // Bounded in flight: the next completion brings the device back here
                // (`Block::process_event`).
                if !self.engine_throttled {
                    self.engine_throttled = true;
                    self.metrics
                        .io_engine_throttled_events
                        .fetch_add(1, Ordering::Relaxed);
                }
                return (done, Work::Done);
            }
            let chain = match queue::pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => return (done, Work::Done),
                Err(queue::BrokenRing) => return (done, Work::Broken),
            };
            if let Some(limiter) = self.limiter.as_mut().filter(|l| l.is_active())
                && !limiter.consume_request(request_bytes(mem, &chain))
            {
                // The request stays on the ring; the limiter's timer brings the device
                // back to it (`Block::process_event`).
                queue.go_to_previous_position();
                self.metrics
                    .rate_limiter_throttled_events
                    .fetch_add(1, Ordering::Relaxed);
                return (done, Work::Done);
            }
            let head = chain.head_index();
            match self.handle_chain(mem, chain, usize::from(queue.size())) {
                Handled::Now(written) => {
                    self.add_used(mem, queue, head, written);
                    done += 1;
                }
                Handled::Submitted => {}
            }
        }
        // The cap was reached: tell the caller whether the driver left more behind.
        (done, queue::left(queue, mem))
    }

    fn add_used(&self, mem: &GuestMemory, queue: &mut Queue, head: u16, written: u32) {
        if let Err(e) = queue.add_used(mem, head, written) {
            log::debug!(
                "virtio-blk `{}`: cannot complete chain {head}: {e}",
                self.id
            );
        }
    }

    /// The Async engine's completion eventfd fired: answers every request the kernel
    /// completed. Returns the chains answered, and whether requests wait on the ring for
    /// a free slot (the caller then drains the queue again).
    pub fn complete(&mut self, mem: &GuestMemory, queue: &mut Queue) -> (u32, bool) {
        let Some(u) = self.uring.as_mut() else {
            return (0, false);
        };
        u.clear_event();
        let mut finished = std::mem::take(&mut self.finished);
        u.reap(mem, &mut finished);
        // The rest of short transfers.
        u.submit();
        let done = self.answer(mem, queue, &mut finished);
        self.finished = finished;
        (done, std::mem::take(&mut self.engine_throttled))
    }

    /// Waits for every request in flight and answers it (a snapshot, a new backing file,
    /// the VMM's exit). Returns as `complete` does.
    pub fn settle(&mut self, mem: &GuestMemory, queue: &mut Queue) -> (u32, bool) {
        let Some(u) = self.uring.as_mut() else {
            return (0, false);
        };
        let mut finished = std::mem::take(&mut self.finished);
        u.wait_all(mem, &mut finished);
        u.clear_event();
        let done = self.answer(mem, queue, &mut finished);
        self.finished = finished;
        (done, std::mem::take(&mut self.engine_throttled))
    }

    /// Waits for every request in flight and forgets it: the driver reset the device, so
    /// its rings are no longer ours to write (virtio 1.2 §2.1.2), but the kernel must be
    /// done with guest memory before the driver reuses it.
    pub fn abandon(&mut self, mem: Option<&GuestMemory>) {
        self.engine_throttled = false;
        let Some(u) = self.uring.as_mut() else {
            return;
        };
        let Some(mem) = mem else {
            u.clear_event();
            return;
        };
        let mut finished = std::mem::take(&mut self.finished);
        u.wait_all(mem, &mut finished);
        u.clear_event();
        finished.clear();
        self.finished = finished;
    }

    /// Writes each finished request's status byte and used entry.
    fn answer(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        finished: &mut Vec<Finished>,
    ) -> u32 {
        let mut done = 0;
        for f in finished.drain(..) {
            let outcome = match f.result {
                Ok(n) => Outcome {
                    status: VIRTIO_BLK_S_OK as u8,
                    written: if f.op == Op::Read {
                        u32::try_from(n).unwrap_or(u32::MAX)
                    } else {
                        0
                    },
                },
                Err(errno) => {
                    let level = self.io_log.level();
                    let what = match f.op {
                        Op::Read => "read",
                        Op::Write => "write",
                        Op::Flush { .. } => "flush",
                    };
                    log::log!(
                        level,
                        "virtio-blk `{}`: {what} failed: {}",
                        self.id,
                        std::io::Error::from_raw_os_error(errno)
                    );
                    IOERR
                }
            };
            let bytes = f.result.unwrap_or(0) as u64;
            self.metrics.record(f.req_type, outcome.status, bytes);
            // The status byte was checked writable when the request was taken; the guest
            // cannot unmap its own RAM, so this only fails on a broken invariant.
            let written = match mem.write_obj(outcome.status, f.status_addr) {
                Ok(()) => outcome.written.saturating_add(1),
                Err(_) => 0,
            };
            self.add_used(mem, queue, f.head, written);
            done += 1;
        }
        done
    }

    /// Whether the rate limiter holds requests back until its timer fires.
    pub fn is_throttled(&self) -> bool {
        self.limiter.as_ref().is_some_and(|l| l.is_blocked())
    }

    /// Runs one request; returns the bytes written into the chain (for the used entry).
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        max_len: usize,
    ) -> Handled {
        let head = chain.head_index();
        let shape = queue::shape(chain.clone(), max_len);
        // The status byte is the last byte of the chain; a looping or over-long chain
        // has no last descriptor.
        let status_addr = chain
            .clone()
            .take(max_len)
            .last()
            .filter(|d| !shape.truncated && d.is_write_only() && d.len() >= 1)
            .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
            .filter(|a| mem.check_range(*a, 1, Permissions::Write));
        let Some(status_addr) = status_addr else {
            // Debug, not warn: a hostile guest could otherwise flood the log.
            self.metrics.invalid_chains.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "virtio-blk `{}`: request without a writable status byte{}; dropped",
                self.id,
                if shape.truncated {
                    " (looping or over-long chain)"
                } else {
                    ""
                }
            );
            return Handled::Now(0);
        };
        let reply = Reply { head, status_addr };
        let outcome = if shape.readable == 0 || shape.misordered {
            self.refuse("the header is not device-readable, or follows writable buffers")
        } else {
            match self.handle_request(mem, chain, reply, max_len) {
                Some(outcome) => outcome,
                None => return Handled::Submitted,
            }
        };
        if mem.write_obj(outcome.status, status_addr).is_err() {
            return Handled::Now(0);
        }
        Handled::Now(outcome.written.saturating_add(1))
    }

    /// A request that fails with IOERR, counted and logged at debug level.
    fn refuse(&self, why: &str) -> Outcome {
        log::debug!("virtio-blk `{}`: {why}", self.id);
        self.metrics.failed_requests.fetch_add(1, Ordering::Relaxed);
        IOERR
    }

    /// Header, then data, then status, through virtio-queue's `Reader` (the readable
    /// part: header and written data) and `Writer` (the writable part: read data and the
    /// status byte, which `handle_chain` writes). Both refuse buffers outside guest
    /// memory and lengths that overflow. None: the Async engine took the request.
    fn handle_request(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        reply: Reply,
        max_len: usize,
    ) -> Option<Outcome> {
        let walk = chain.clone();
        let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => return Some(self.refuse("a buffer lies outside guest memory")),
        };
        let mut raw = [0u8; HEADER_LEN as usize];
        if reader.read_exact(&mut raw).is_err() {
            return Some(self.refuse("the request header is short"));
        }
        // Everything the device writes before the status byte.
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return Some(self.refuse("no status byte"));
        };
        if writer.split_at(data_len).is_err() {
            return Some(self.refuse("no status byte"));
        }
        let (type_bytes, rest) = raw.split_at(4);
        let sector_bytes = rest.get(4..12).unwrap_or_default();
        let req_type = u32::from_le_bytes(type_bytes.try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(sector_bytes.try_into().unwrap_or_default());
        let device_writes = matches!(req_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        let (wrong_way, bytes) = if device_writes {
            (reader.available_bytes(), data_len)
        } else {
            (data_len, reader.available_bytes())
        };
        if wrong_way != 0
            && matches!(
                req_type,
                VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID
            )
        {
            return Some(self.refuse("a data buffer has the wrong direction"));
        }
        if self.uring.is_some() {
            match req_type {
                VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                    return self.submit_rw(mem, walk, reply, req_type, sector, bytes, max_len);
                }
                VIRTIO_BLK_T_FLUSH => return self.submit_flush(mem, reply),
                _ => {}
            }
        }
        let outcome = match req_type {
            VIRTIO_BLK_T_IN => self.read(sector, &mut writer),
            VIRTIO_BLK_T_OUT => self.write(sector, &mut reader),
            VIRTIO_BLK_T_FLUSH => self.flush_request(),
            VIRTIO_BLK_T_GET_ID => self.get_id(&mut writer),
            other => {
                log::debug!("virtio-blk `{}`: unsupported request type {other}", self.id);
                Outcome::status(VIRTIO_BLK_S_UNSUPP)
            }
        };
        self.metrics.record(req_type, outcome.status, bytes as u64);
        Some(outcome)
    }

    /// Async: a read or write of `bytes` at `sector` through the chain's data buffers
    /// (after the header for a write, before the status byte for a read), handed to the
    /// engine. Some(outcome) when it fails before anything is submitted.
    #[allow(clippy::too_many_arguments)]
    fn submit_rw(
        &mut self,
        mem: &GuestMemory,
        walk: DescriptorChain<&GuestMemory>,
        reply: Reply,
        req_type: u32,
        sector: u64,
        bytes: usize,
        max_len: usize,
    ) -> Option<Outcome> {
        let write = req_type == VIRTIO_BLK_T_OUT;
        let now = |disk: &Disk, outcome: Outcome| {
            disk.metrics.record(req_type, outcome.status, bytes as u64);
            Some(outcome)
        };
        if write && self.read_only {
            let level = self.io_log.level();
            log::log!(
                level,
                "virtio-blk `{}`: write to a read-only drive refused",
                self.id
            );
            return now(self, IOERR);
        }
        let Some(offset) = self.check_range(sector, bytes) else {
            return now(self, IOERR);
        };
        if bytes == 0 {
            return now(self, Outcome::status(VIRTIO_BLK_S_OK));
        }
        let mut ranges = std::mem::take(&mut self.ranges);
        ranges.clear();
        let (mut skip, mut take) = (if write { HEADER_LEN as usize } else { 0 }, bytes);
        let mut fits = true;
        for d in walk.take(max_len) {
            if d.is_write_only() == write || take == 0 {
                continue;
            }
            let len = d.len() as usize;
            let s = skip.min(len);
            skip -= s;
            let n = (len - s).min(take);
            if n == 0 {
                continue;
            }
            let Some(addr) = d.addr().checked_add(s as u64) else {
                fits = false;
                break;
            };
            ranges.push((addr, n));
            take -= n;
        }
        let op = if write { Op::Write } else { Op::Read };
        let pushed = fits
            && take == 0
            && self.uring.as_mut().is_some_and(|u| {
                u.push(
                    mem,
                    reply.head,
                    req_type,
                    op,
                    reply.status_addr,
                    offset,
                    &ranges,
                )
            });
        self.ranges = ranges;
        if !pushed {
            let outcome = self.refuse("a buffer lies outside guest memory");
            return Some(outcome);
        }
        None
    }

    /// Async: a flush, ordered after every request before it and before every one after
    /// it. Only a Writeback drive's flush reaches the disk, as with Sync.
    fn submit_flush(&mut self, mem: &GuestMemory, reply: Reply) -> Option<Outcome> {
        let sync = self.cache_type == CacheType::Writeback && !self.read_only;
        let pushed = self.uring.as_mut().is_some_and(|u| {
            u.push(
                mem,
                reply.head,
                VIRTIO_BLK_T_FLUSH,
                Op::Flush { sync },
                reply.status_addr,
                0,
                &[],
            )
        });
        if pushed {
            None
        } else {
            Some(self.refuse("the I/O engine refused the flush"))
        }
    }

    /// The byte offset in the file of `bytes` from `sector` on, if they are whole
    /// sectors within the disk.
    fn check_range(&self, sector: u64, bytes: usize) -> Option<u64> {
        let total = bytes as u64;
        if !total.is_multiple_of(SECTOR_SIZE) {
            log::debug!(
                "virtio-blk `{}`: {total} bytes is not a whole number of sectors",
                self.id
            );
            return None;
        }
        let end = sector.checked_add(total >> SECTOR_SHIFT)?;
        if end > self.capacity {
            log::debug!(
                "virtio-blk `{}`: sectors {sector}..{end} beyond the disk ({} sectors)",
                self.id,
                self.capacity
            );
            return None;
        }
        Some(sector << SECTOR_SHIFT)
    }

    /// Allocates the bounce buffer on first use (idle drives cost no memory).
    fn chunk_buf(&mut self) {
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
    }

    /// Reads from the file into the chain's data buffers, a chunk at a time.
    fn read<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        sector: u64,
        writer: &mut Writer<'_, B>,
    ) -> Outcome {
        let total = writer.available_bytes();
        let Some(mut offset) = self.check_range(sector, total) else {
            return IOERR;
        };
        self.chunk_buf();
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = self.buf.get_mut(..n).unwrap_or_default();
            if self.file.read_exact_at(buf, offset).is_err() || writer.write_all(buf).is_err() {
                let level = self.io_log.level();
                log::log!(
                    level,
                    "virtio-blk `{}`: read at byte {offset} failed",
                    self.id
                );
                return IOERR;
            }
            left -= n;
            offset += n as u64;
        }
        Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            written: u32::try_from(total).unwrap_or(u32::MAX),
        }
    }

    /// Writes the chain's data buffers to the file, a chunk at a time.
    fn write<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        sector: u64,
        reader: &mut Reader<'_, B>,
    ) -> Outcome {
        if self.read_only {
            log::debug!(
                "virtio-blk `{}`: write to a read-only drive refused",
                self.id
            );
            return IOERR;
        }
        let total = reader.available_bytes();
        let Some(mut offset) = self.check_range(sector, total) else {
            return IOERR;
        };
        self.chunk_buf();
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            let buf = self.buf.get_mut(..n).unwrap_or_default();
            if reader.read_exact(buf).is_err() || self.file.write_all_at(buf, offset).is_err() {
                let level = self.io_log.level();
                log::log!(
                    level,
                    "virtio-blk `{}`: write at byte {offset} failed",
                    self.id
                );
                return IOERR;
            }
            left -= n;
            offset += n as u64;
        }
        Outcome::status(VIRTIO_BLK_S_OK)
    }

    fn flush_request(&mut self) -> Outcome {
        match self.cache_type {
            // Unsafe: the guest was told nothing about a cache; flushes cost nothing.
            CacheType::Unsafe => Outcome::status(VIRTIO_BLK_S_OK),
            CacheType::Writeback => match self.flush() {
                Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
                Err(e) => {
                    let level = self.io_log.level();
                    log::log!(level, "virtio-blk `{}`: fdatasync failed: {e}", self.id);
                    IOERR
                }
            },
        }
    }

    /// GET_ID: the drive id, truncated to 20 bytes, NUL padded (as much as fits).
    fn get_id<B: vm_memory::bitmap::BitmapSlice>(&mut self, writer: &mut Writer<'_, B>) -> Outcome {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (d, s) in id.iter_mut().zip(self.id.bytes()) {
            *d = s;
        }
        let n = id.len().min(writer.available_bytes());
        let part = id.get(..n).unwrap_or_default();
        if n == 0 || writer.write_all(part).is_err() {
            return IOERR;
        }
        Outcome {
            status: VIRTIO_BLK_S_OK as u8,
            written: n as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::VirtioDevice;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::testing::{TestQueue, memory};

    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x10000;
    const STATUS: u64 = 0x5000;
    const MEM_SIZE: u64 = 0x10_0000;
    const QSIZE: u16 = 16;

    /// The shared test driver on one queue at 0x1000, with blk requests on top.
    struct Driver {
        mem: GuestMemory,
        vq: TestQueue,
    }

    impl Driver {
        fn new() -> Driver {
            let mem = memory(MEM_SIZE as usize);
            let vq = TestQueue::new(&mem, 0x1000, QSIZE);
            Driver { mem, vq }
        }

        fn desc(&self, index: u16, addr: u64, len: u32, flags: u32, next: u16) {
            self.vq.desc(&self.mem, index, addr, len, flags, next);
        }

        fn publish(&mut self, head: u16) {
            self.vq.publish(&self.mem, head);
        }

        /// header + optional data + status, at descriptors 0, 1, 2.
        fn request(&mut self, req_type: u32, sector: u64, data_len: u32, data_writable: bool) {
            self.mem.write_obj(req_type, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.desc(0, HDR, 16, VRING_DESC_F_NEXT, 1);
            let mut next = 1;
            if data_len > 0 {
                let flags = VRING_DESC_F_NEXT | if data_writable { VRING_DESC_F_WRITE } else { 0 };
                self.desc(1, DATA, data_len, flags, 2);
                next = 2;
            }
            self.desc(next, STATUS, 1, VRING_DESC_F_WRITE, 0);
            if data_len == 0 {
                self.desc(0, HDR, 16, VRING_DESC_F_NEXT, 1);
            }
            self.publish(0);
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        /// (id, len) of used entry `i`.
        fn used(&self, i: u16) -> (u32, u32) {
            self.vq.used(&self.mem, i)
        }

        fn used_idx(&self) -> u16 {
            self.vq.used_idx(&self.mem)
        }

        /// A kick alone: the chains answered at once.
        fn run_no_wait(&mut self, disk: &mut Disk) -> (u32, Work) {
            disk.process_queue(&self.mem, &mut self.vq.queue)
        }

        /// A kick, then (Async) waiting for what it submitted: the chains answered.
        fn run(&mut self, disk: &mut Disk) -> (u32, Work) {
            let (done, work) = disk.process_queue(&self.mem, &mut self.vq.queue);
            let (more, _) = disk.settle(&self.mem, &mut self.vq.queue);
            (done + more, work)
        }
    }

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(i: usize) -> u8 {
        (i * 31 % 251) as u8
    }

    const ENGINES: [IoEngine; 2] = [IoEngine::Sync, IoEngine::Async];

    /// A disk of `sectors` sectors with known content, on the Sync engine.
    fn disk(sectors: u64, read_only: bool, cache: CacheType) -> (Disk, TempFile) {
        disk_on(IoEngine::Sync, sectors, read_only, cache)
    }

    /// The same on `engine`.
    fn disk_on(
        engine: IoEngine,
        sectors: u64,
        read_only: bool,
        cache: CacheType,
    ) -> (Disk, TempFile) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ember-blk-{}-{n}.img", std::process::id()));
        let content: Vec<u8> = (0..(sectors * SECTOR_SIZE) as usize).map(pattern).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&content)
            .unwrap();
        let drive = DriveConfig {
            drive_id: "disk0".into(),
            partuuid: None,
            is_root_device: false,
            cache_type: cache,
            is_read_only: read_only,
            path_on_host: path.to_string_lossy().into_owned(),
            rate_limiter: Default::default(),
            io_engine: engine,
            socket: Default::default(),
        };
        (Disk::open(&drive).unwrap(), TempFile(path))
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const ERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn features_and_config() {
        let (d, _f) = disk(8, true, CacheType::Writeback);
        assert_eq!(d.capacity(), 8);
        let f = d.features();
        assert!(f & (1 << VIRTIO_F_VERSION_1) != 0);
        assert!(f & (1 << VIRTIO_BLK_F_RO) != 0);
        assert!(f & (1 << VIRTIO_BLK_F_FLUSH) != 0);
        let b = Block::from_disk(d);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut far = [0xffu8; 4];
        b.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        let (d, _f) = disk(1, false, CacheType::Unsafe);
        assert_eq!(
            d.features() & ((1 << VIRTIO_BLK_F_RO) | (1 << VIRTIO_BLK_F_FLUSH)),
            0
        );
    }

    #[test]
    fn read_and_write() {
        for engine in ENGINES {
            let (mut d, f) = disk_on(engine, 8, false, CacheType::Writeback);
            let mut drv = Driver::new();
            drv.request(VIRTIO_BLK_T_IN, 2, 1024, true);
            assert_eq!(drv.run(&mut d), (1, Work::Done));
            assert_eq!(drv.status(), OK);
            assert_eq!(drv.used(0), (0, 1025));
            let mut got = vec![0u8; 1024];
            drv.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
            let want: Vec<u8> = (1024..2048).map(pattern).collect();
            assert_eq!(got, want);

            let data: Vec<u8> = (0..512).map(|i| (i % 7) as u8).collect();
            drv.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
            drv.request(VIRTIO_BLK_T_OUT, 7, 512, false);
            assert_eq!(drv.run(&mut d), (1, Work::Done));
            assert_eq!(drv.status(), OK);
            assert_eq!(drv.used(1), (0, 1));
            let host = std::fs::read(&f.0).unwrap();
            assert_eq!(host.get(7 * 512..), Some(&data[..]));

            drv.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
            drv.run(&mut d);
            assert_eq!(drv.status(), OK);
            assert_eq!(drv.used_idx(), 3);
        }
    }

    #[test]
    fn large_read_crosses_chunks() {
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 400, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            drv.request(VIRTIO_BLK_T_IN, 1, 150 * 512, true);
            drv.run(&mut d);
            assert_eq!(drv.status(), OK);
            let mut got = vec![0u8; 150 * 512];
            drv.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
            let want: Vec<u8> = (512..151 * 512).map(pattern).collect();
            assert!(got == want);
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        for engine in ENGINES {
            let (mut d, f) = disk_on(engine, 4, true, CacheType::Unsafe);
            let before = std::fs::read(&f.0).unwrap();
            let mut drv = Driver::new();
            drv.mem
                .write_slice(&[0xaa; 512], GuestAddress(DATA))
                .unwrap();
            drv.request(VIRTIO_BLK_T_OUT, 0, 512, false);
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            assert_eq!(std::fs::read(&f.0).unwrap(), before);
            // Reads still work.
            drv.request(VIRTIO_BLK_T_IN, 3, 512, true);
            drv.run(&mut d);
            assert_eq!(drv.status(), OK);
        }
    }

    #[test]
    fn out_of_range_and_malformed() {
        for engine in ENGINES {
            let (mut d, f) = disk_on(engine, 4, false, CacheType::Unsafe);
            let before = std::fs::read(&f.0).unwrap();
            let mut drv = Driver::new();
            let cases: [(u32, u64, u32, bool); 6] = [
                (VIRTIO_BLK_T_IN, 4, 512, true),        // just past the end
                (VIRTIO_BLK_T_IN, 3, 1024, true),       // crosses the end
                (VIRTIO_BLK_T_IN, u64::MAX, 512, true), // sector overflow
                (VIRTIO_BLK_T_OUT, 4, 512, false),      // write past the end
                (VIRTIO_BLK_T_IN, 0, 100, true),        // not whole sectors
                (VIRTIO_BLK_T_IN, 0, 512, false),       // read into a device-readable buffer
            ];
            for (t, sector, len, w) in cases {
                drv.request(t, sector, len, w);
                drv.run(&mut d);
                assert_eq!(drv.status(), ERR, "type {t} sector {sector} len {len}");
            }
            // Write with a device-writable data buffer.
            drv.request(VIRTIO_BLK_T_OUT, 0, 512, true);
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            // Data outside guest RAM.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.desc(
                1,
                MEM_SIZE - 256,
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            );
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            assert_eq!(std::fs::read(&f.0).unwrap(), before);
            assert_eq!(drv.used_idx(), 8);
        }
    }

    #[test]
    fn short_header_unknown_type_and_bad_status() {
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 4, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            // Header of 8 bytes.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.desc(0, HDR, 8, VRING_DESC_F_NEXT, 1);
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            // Header the device should write.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.desc(0, HDR, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            // Unknown type (DISCARD).
            drv.request(11, 0, 0, false);
            drv.run(&mut d);
            assert_eq!(drv.status(), UNSUPP);
            // Status not writable: nothing written, the chain still comes back.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.desc(2, STATUS, 1, 0, 0);
            drv.run(&mut d);
            assert_eq!(drv.status(), 0xff);
            assert_eq!(drv.used(3), (0, 0));
            // Only a status descriptor.
            drv.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            drv.desc(0, STATUS, 1, VRING_DESC_F_WRITE, 0);
            drv.publish(0);
            drv.run(&mut d);
            assert_eq!(drv.status(), ERR);
            assert_eq!(drv.used_idx(), 5);
        }
    }

    #[test]
    fn looping_chain_fails_alone() {
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 4, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            // Status descriptor points back at the header.
            drv.desc(2, STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
            drv.run(&mut d);
            assert_eq!(drv.used_idx(), 1);
            assert_eq!(drv.status(), 0xff);
            // Next index out of the table.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.desc(1, DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 99);
            drv.run(&mut d);
            assert_eq!(drv.used_idx(), 2);
            // The device still serves good requests afterwards.
            drv.request(VIRTIO_BLK_T_IN, 0, 512, true);
            drv.run(&mut d);
            assert_eq!(drv.status(), OK);
        }
    }

    #[test]
    fn get_id() {
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 1, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            drv.mem
                .write_slice(&[0xee; 32], GuestAddress(DATA))
                .unwrap();
            drv.request(VIRTIO_BLK_T_GET_ID, 0, 20, true);
            drv.run(&mut d);
            assert_eq!(drv.status(), OK);
            let mut id = [0u8; 32];
            drv.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
            assert_eq!(&id[..6], b"disk0\0");
            assert_eq!(id[19], 0);
            assert_eq!(id[20], 0xee);
            assert_eq!(drv.used(0), (0, 21));
        }
    }

    #[test]
    fn flush_modes() {
        for engine in ENGINES {
            for cache in [CacheType::Unsafe, CacheType::Writeback] {
                let (mut d, _f) = disk_on(engine, 1, false, cache);
                // Only Writeback offers a cache to flush (the fdatasync that a Writeback flush
                // makes is counted at the disk in tests/virtio_blk.rs).
                let offered = d.features() & (1 << VIRTIO_BLK_F_FLUSH) != 0;
                assert_eq!(offered, cache == CacheType::Writeback, "{cache:?}");
                let mut drv = Driver::new();
                drv.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
                drv.run(&mut d);
                assert_eq!(drv.status(), OK);
                d.flush().unwrap();
            }
        }
    }

    #[test]
    fn full_ring_and_bad_avail_index() {
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 1, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            drv.request(VIRTIO_BLK_T_FLUSH, 0, 0, false);
            // A full ring (the same head published again and again: harmless, as each
            // request completes before the next is read).
            for _ in 1..QSIZE {
                drv.publish(0);
            }
            assert_eq!(drv.run(&mut d), (QSIZE as u32, Work::Done));
            assert_eq!(drv.used_idx(), QSIZE);
            assert_eq!(drv.run(&mut d), (0, Work::Done));
            // A driver claiming more entries than the ring holds: nothing is processed, and
            // the device reports the ring broken (the transport then sets NEEDS_RESET).
            drv.vq
                .set_avail_idx(&drv.mem, drv.vq.avail_idx.wrapping_add(QSIZE + 1));
            assert_eq!(drv.run(&mut d), (0, Work::Broken));
        }
    }

    /// Chain `k` (descriptors 3k..3k+2): header at HDR + 32k, data at DATA + 4 KiB * k,
    /// status at STATUS + k; published, not yet run.
    fn chain(drv: &mut Driver, k: u16, req_type: u32, sector: u64, len: u32, writable: bool) {
        let (d, kk) = (3 * k, u64::from(k));
        let hdr = HDR + 32 * kk;
        drv.mem.write_obj(req_type, GuestAddress(hdr)).unwrap();
        drv.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        drv.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        drv.mem
            .write_obj(0xffu8, GuestAddress(STATUS + kk))
            .unwrap();
        drv.desc(d, hdr, 16, VRING_DESC_F_NEXT, d + 1);
        let flags = VRING_DESC_F_NEXT | if writable { VRING_DESC_F_WRITE } else { 0 };
        let (next, last) = if len > 0 { (d + 1, d + 2) } else { (d, d + 1) };
        if len > 0 {
            drv.desc(next, DATA + 4096 * kk, len, flags, last);
        }
        drv.desc(last, STATUS + kk, 1, VRING_DESC_F_WRITE, 0);
        if len == 0 {
            drv.desc(d, hdr, 16, VRING_DESC_F_NEXT, last);
        }
        drv.publish(d);
    }

    fn status_of(drv: &Driver, k: u64) -> u8 {
        drv.mem.read_obj(GuestAddress(STATUS + k)).unwrap()
    }

    /// Async answers a request when the kernel completes it: a GET_ID made available
    /// after a read is answered first, and each used entry names its own chain with its
    /// own length.
    #[test]
    fn async_requests_complete_out_of_order() {
        let (mut d, _f) = disk_on(IoEngine::Async, 64, false, CacheType::Unsafe);
        let mut drv = Driver::new();
        chain(&mut drv, 0, VIRTIO_BLK_T_IN, 8, 4096, true);
        chain(&mut drv, 1, VIRTIO_BLK_T_GET_ID, 0, 20, true);
        chain(&mut drv, 2, VIRTIO_BLK_T_IN, 16, 1024, true);
        chain(&mut drv, 3, 11, 0, 0, false); // DISCARD: unsupported
        let (done, work) = d.process_queue(&drv.mem, &mut drv.vq.queue);
        assert_eq!((done, work), (2, Work::Done));
        assert_eq!(d.in_flight(), 2);
        assert_eq!(drv.used(0), (3, 21));
        assert_eq!(drv.used(1), (9, 1));
        assert_eq!(status_of(&drv, 3), UNSUPP);
        assert_eq!(d.settle(&drv.mem, &mut drv.vq.queue), (2, false));
        assert_eq!(drv.used_idx(), 4);
        let mut late: Vec<(u32, u32)> = vec![drv.used(2), drv.used(3)];
        late.sort();
        assert_eq!(late, vec![(0, 4097), (6, 1025)]);
        for (k, sector, len) in [(0u64, 8usize, 4096usize), (2, 16, 1024)] {
            assert_eq!(status_of(&drv, k), OK);
            let mut got = vec![0u8; len];
            drv.mem
                .read_slice(&mut got, GuestAddress(DATA + 4096 * k))
                .unwrap();
            let want: Vec<u8> = (sector * 512..sector * 512 + len).map(pattern).collect();
            assert!(got == want, "chain {k}");
        }
        assert_eq!(d.metrics.read_count.load(Ordering::Relaxed), 2);
        assert_eq!(d.metrics.read_bytes.load(Ordering::Relaxed), 5120);
    }

    /// A flush is answered only after the writes made available before it, and the
    /// write after it only after the flush.
    #[test]
    fn async_flush_waits_for_earlier_writes() {
        for cache in [CacheType::Writeback, CacheType::Unsafe] {
            let (mut d, f) = disk_on(IoEngine::Async, 64, false, cache);
            let mut drv = Driver::new();
            for k in 0..6u64 {
                drv.mem
                    .write_slice(&[k as u8 + 1; 4096], GuestAddress(DATA + 4096 * k))
                    .unwrap();
            }
            for k in 0..3u16 {
                chain(&mut drv, k, VIRTIO_BLK_T_OUT, 8 * u64::from(k), 4096, false);
            }
            chain(&mut drv, 3, VIRTIO_BLK_T_FLUSH, 0, 0, false);
            chain(&mut drv, 4, VIRTIO_BLK_T_OUT, 40, 4096, false);
            assert_eq!(drv.run(&mut d), (5, Work::Done));
            let order: Vec<u32> = (0..5).map(|i| drv.used(i).0).collect();
            let flush_at = order.iter().position(|h| *h == 9).unwrap();
            assert_eq!(flush_at, 3, "{cache:?}: used order {order:?}");
            assert_eq!(order[4], 12, "{cache:?}: used order {order:?}");
            assert!((0..5).all(|k| status_of(&drv, k) == OK));
            let host = std::fs::read(&f.0).unwrap();
            assert!(
                host[8 * 512 * 2..8 * 512 * 2 + 4096]
                    .iter()
                    .all(|b| *b == 3)
            );
            assert!(host[40 * 512..40 * 512 + 4096].iter().all(|b| *b == 5));
        }
    }

    /// A driver that reuses descriptor heads can make the device take more chains than
    /// its ring holds; the engine keeps at most SLOTS of them in flight, and takes the
    /// rest after completions free slots.
    #[test]
    fn async_in_flight_is_bounded() {
        let (mut d, _f) = disk_on(IoEngine::Async, 8, false, CacheType::Unsafe);
        let mut drv = Driver::new();
        chain(&mut drv, 0, VIRTIO_BLK_T_FLUSH, 0, 0, false);
        let mut taken = 1;
        let rounds = super::super::uring::SLOTS / usize::from(QSIZE) + 1;
        for _ in 0..rounds {
            while drv.vq.avail_idx.wrapping_sub(drv.vq.queue.next_avail()) < QSIZE {
                drv.publish(0);
                taken += 1;
            }
            assert_eq!(drv.run_no_wait(&mut d), (0, Work::Done));
        }
        assert_eq!(d.in_flight(), super::super::uring::SLOTS);
        assert!(taken > super::super::uring::SLOTS);
        assert_eq!(
            d.metrics.io_engine_throttled_events.load(Ordering::Relaxed),
            1
        );
        // Completions free the slots; the caller then serves the ring again.
        let (done, throttled) = d.settle(&drv.mem, &mut drv.vq.queue);
        assert_eq!(
            (done as usize, throttled),
            (super::super::uring::SLOTS, true)
        );
        let (done, work) = drv.run(&mut d);
        assert_eq!(done as usize, taken - super::super::uring::SLOTS);
        assert_eq!(work, Work::Done);
        assert_eq!(usize::from(drv.used_idx()), taken);
    }

    /// A read through several data descriptors lands in each, and the pages it filled
    /// are in the memory's dirty bitmap (for Diff snapshots), as with Sync.
    #[test]
    fn async_multi_segment_read_marks_pages_dirty() {
        use vm_memory::GuestMemoryBackend;
        use vm_memory::bitmap::Bitmap;
        for engine in ENGINES {
            let (mut d, _f) = disk_on(engine, 64, false, CacheType::Unsafe);
            let mut drv = Driver::new();
            chain(&mut drv, 0, VIRTIO_BLK_T_IN, 4, 512, true);
            // Data: 512 bytes at DATA, then 1024 at DATA + 64 KiB, then the status.
            drv.desc(1, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 3);
            drv.desc(
                3,
                DATA + 0x1_0000,
                1024,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            );
            for r in drv.mem.iter() {
                std::ops::Deref::deref(r).bitmap().reset();
            }
            assert_eq!(drv.run(&mut d), (1, Work::Done));
            assert_eq!(drv.used(0), (0, 1537), "{engine:?}");
            let mut a = vec![0u8; 512];
            let mut b = vec![0u8; 1024];
            drv.mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
            drv.mem
                .read_slice(&mut b, GuestAddress(DATA + 0x1_0000))
                .unwrap();
            assert!(
                a == (2048..2560).map(pattern).collect::<Vec<_>>(),
                "{engine:?}"
            );
            assert!(
                b == (2560..3584).map(pattern).collect::<Vec<_>>(),
                "{engine:?}"
            );
            let region = drv.mem.iter().next().unwrap();
            let dirty = |addr: u64| {
                std::ops::Deref::deref(region)
                    .bitmap()
                    .dirty_at(addr as usize)
            };
            assert!(dirty(DATA) && dirty(DATA + 0x1_0000), "{engine:?}");
            assert!(!dirty(DATA + 0x2_0000), "{engine:?}");
        }
    }

    /// A device reset waits for what is in flight and answers none of it.
    #[test]
    fn async_reset_abandons_requests_in_flight() {
        let (mut d, _f) = disk_on(IoEngine::Async, 64, false, CacheType::Unsafe);
        let mut drv = Driver::new();
        chain(&mut drv, 0, VIRTIO_BLK_T_IN, 0, 4096, true);
        assert_eq!(drv.run_no_wait(&mut d), (0, Work::Done));
        d.abandon(Some(&drv.mem));
        assert_eq!(d.in_flight(), 0);
        assert_eq!(drv.used_idx(), 0);
        assert_eq!(d.complete(&drv.mem, &mut drv.vq.queue), (0, false));
    }
}
