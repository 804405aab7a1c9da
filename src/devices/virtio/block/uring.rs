//! The `Async` I/O engine: a drive's reads, writes and flushes go through an io_uring, as
//! in Firecracker. The VMM thread submits requests while it drains the virtqueue and
//! reaps their completions when the ring's eventfd (watched by the event loop) fires, so a
//! slow request no longer holds up the ones behind it, and requests complete out of order.
//!
//! What the guest cannot make it do:
//! - Touch anything but its own memory and its own disk. Buffers are translated through
//!   vm-memory (a buffer outside guest RAM fails its request before anything is
//!   submitted); byte ranges are checked against the disk's size by the caller; and the
//!   ring itself is locked down before it is enabled (io_uring restrictions): only readv,
//!   writev, fsync and nop, only on the one registered file (fixed file 0), and of the
//!   register calls only the file update that `PATCH /drives` needs.
//! - Hold more than [`SLOTS`] requests in flight: when every slot is busy the device
//!   stops taking chains off the ring until a completion frees one (Firecracker's
//!   "io engine throttled").
//!
//! Ordering: a flush is submitted with IOSQE_IO_DRAIN, so it starts only after every
//! request submitted before it completed, and the requests after it wait for it. A flush
//! therefore completes only after the writes the guest made available before it.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::register::Restriction;
use io_uring::squeue::{Entry, Flags};
use io_uring::{IoUring, Probe, opcode, types};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::vm::memory::GuestMemory;

/// Requests in flight at most: the queue's size, so a full ring of one-descriptor chains
/// never waits on the engine. The completion queue is twice as large (io_uring's
/// default), so completions can never overflow it.
pub const SLOTS: usize = super::disk::QUEUE_SIZE as usize;

/// `IORING_REGISTER_FILES_UPDATE` (not exported by the io-uring crate).
const REGISTER_FILES_UPDATE: u8 = 6;

/// What a request asks of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// fdatasync (Writeback), or only the ordering (Unsafe, read-only drives): a nop.
    Flush {
        sync: bool,
    },
}

/// One request in flight: what to tell the guest when it completes.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    head: u16,
    op: Option<Op>,
    req_type: u32,
    status_addr: GuestAddress,
    /// File offset of the next byte to move.
    offset: u64,
    /// Bytes to move in all, and moved so far (a short transfer is resubmitted).
    total: usize,
    done: usize,
    /// Host buffers not yet filled or written, as the kernel is given them.
    iovecs: Vec<libc::iovec>,
    /// The guest ranges of a read, marked dirty for diff snapshots when it completes.
    ranges: Vec<(GuestAddress, usize)>,
}

// SAFETY: the iovecs point into guest memory, which the engine keeps mapped (it holds a
// `GuestMemory`) while any request is in flight; a slot is only reached through the
// engine, which is used by one thread at a time (under the transport's lock).
unsafe impl Send for Slot {}

/// A request the engine finished: the device writes `status`, then a used entry for
/// `head` of `written` bytes (data the device put in the chain, plus the status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub head: u16,
    pub req_type: u32,
    pub status_addr: GuestAddress,
    /// Ok(bytes moved), or the error that failed the request.
    pub result: Result<usize, i32>,
    pub op: Op,
}

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring_setup failed: {0}")]
    Setup(std::io::Error),
    #[error("this kernel's io_uring lacks {0}")]
    Opcode(&'static str),
    #[error("cannot register the file, eventfd or restrictions with io_uring: {0}")]
    Register(std::io::Error),
    #[error("cannot create the completion eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A drive's io_uring, its completion eventfd and its request slots.
pub struct Uring {
    ring: IoUring,
    completion: EventFd,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Requests pushed to the submission queue and not yet completed.
    in_flight: usize,
    /// Pushed since the last io_uring_enter.
    unsubmitted: usize,
    /// Keeps the guest memory the in-flight buffers point into mapped.
    mem: Option<GuestMemory>,
    submit_log: super::super::LogOnce,
    /// Completions taken off the ring (reused buffer).
    cqes: Vec<(u64, i32)>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// A ring for `file`: created disabled, the file and eventfd registered, then locked
    /// down with restrictions and enabled.
    pub fn new(file: &File) -> Result<Uring, UringError> {
        let ring: IoUring = IoUring::builder()
            .setup_r_disabled()
            .build(SLOTS as u32)
            .map_err(UringError::Setup)?;
        let sub = ring.submitter();
        let mut probe = Probe::new();
        sub.register_probe(&mut probe)
            .map_err(UringError::Register)?;
        for (code, name) in [
            (opcode::Readv::CODE, "readv"),
            (opcode::Writev::CODE, "writev"),
            (opcode::Fsync::CODE, "fsync"),
            (opcode::Nop::CODE, "nop"),
        ] {
            if !probe.is_supported(code) {
                return Err(UringError::Opcode(name));
            }
        }
        let completion = EventFd::new(EFD_NONBLOCK).map_err(UringError::EventFd)?;
        sub.register_files(&[file.as_raw_fd()])
            .map_err(UringError::Register)?;
        sub.register_eventfd(completion.as_raw_fd())
            .map_err(UringError::Register)?;
        let mut restrictions = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Nop::CODE),
            Restriction::sqe_flags_allowed(Flags::IO_DRAIN.bits()),
            Restriction::sqe_flags_required(Flags::FIXED_FILE.bits()),
            Restriction::register_op(REGISTER_FILES_UPDATE),
        ];
        sub.register_restrictions(&mut restrictions)
            .map_err(UringError::Register)?;
        sub.register_enable_rings().map_err(UringError::Register)?;
        let slots = (0..SLOTS).map(|_| Slot::default()).collect();
        let free = (0..SLOTS as u16).rev().collect();
        Ok(Uring {
            ring,
            completion,
            slots,
            free,
            in_flight: 0,
            unsubmitted: 0,
            mem: None,
            submit_log: Default::default(),
            cqes: Vec::with_capacity(SLOTS),
        })
    }

    /// The eventfd the kernel signals when requests complete.
    pub fn completion_fd(&self) -> std::os::fd::RawFd {
        self.completion.as_raw_fd()
    }

    /// Clears the completion eventfd (before reaping, so no completion goes unseen).
    pub fn clear_event(&self) {
        let _ = self.completion.read();
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Points fixed file 0 at `file` (PATCH /drives). Nothing may be in flight.
    pub fn replace_file(&mut self, file: &File) -> std::io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()])
            .map(drop)
    }

    /// Queues a read or write of `ranges` (guest memory, already checked to be RAM by the
    /// caller's chain walk; translated here) at byte `offset`, or a flush. Returns false,
    /// submitting nothing, when a range is not guest RAM. The caller checked that the
    /// engine is not full.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        mem: &GuestMemory,
        head: u16,
        req_type: u32,
        op: Op,
        status_addr: GuestAddress,
        offset: u64,
        ranges: &[(GuestAddress, usize)],
    ) -> bool {
        let Some(&index) = self.free.last() else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(usize::from(index)) else {
            return false;
        };
        slot.iovecs.clear();
        slot.ranges.clear();
        let mut total = 0usize;
        if matches!(op, Op::Read | Op::Write) {
            for &(addr, len) in ranges {
                for s in mem.get_slices(addr, len) {
                    let Ok(s) = s else {
                        return false;
                    };
                    slot.iovecs.push(libc::iovec {
                        iov_base: s.ptr_guard_mut().as_ptr().cast(),
                        iov_len: s.len(),
                    });
                }
                total = total.saturating_add(len);
            }
            if op == Op::Read {
                slot.ranges.extend_from_slice(ranges);
            }
        }
        slot.busy = true;
        slot.head = head;
        slot.op = Some(op);
        slot.req_type = req_type;
        slot.status_addr = status_addr;
        slot.offset = offset;
        slot.total = total;
        slot.done = 0;
        self.free.pop();
        if self.mem.is_none() {
            self.mem = Some(mem.clone());
        }
        if self.enqueue(index) {
            return true;
        }
        if let Some(slot) = self.slots.get_mut(usize::from(index)) {
            slot.busy = false;
        }
        self.free.push(index);
        false
    }

    /// Puts slot `index`'s (remaining) transfer on the submission queue; false if it
    /// could not.
    fn enqueue(&mut self, index: u16) -> bool {
        let Some(slot) = self.slots.get(usize::from(index)) else {
            return false;
        };
        let file = types::Fixed(0);
        let iov_count = u32::try_from(slot.iovecs.len()).unwrap_or(u32::MAX);
        let entry: Entry = match slot.op {
            Some(Op::Read) => opcode::Readv::new(file, slot.iovecs.as_ptr(), iov_count)
                .offset(slot.offset)
                .build(),
            Some(Op::Write) => opcode::Writev::new(file, slot.iovecs.as_ptr(), iov_count)
                .offset(slot.offset)
                .build(),
            Some(Op::Flush { sync: true }) => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(Flags::IO_DRAIN),
            Some(Op::Flush { sync: false }) | None => {
                opcode::Nop::new().build().flags(Flags::IO_DRAIN)
            }
        };
        let entry = entry.flags(Flags::FIXED_FILE).user_data(u64::from(index));
        // The submission queue has SLOTS entries and at most SLOTS requests are ever in
        // flight, so there is always room; should a push still fail, submit and retry.
        for _ in 0..2 {
            // SAFETY: the entry's iovec array lives in the slot, which is neither changed
            // nor reused until its completion is reaped, and the buffers it names are
            // guest memory that `self.mem` keeps mapped until then (`Drop` waits for
            // every request in flight).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                self.unsubmitted += 1;
                return true;
            }
            self.submit();
        }
        log::error!("virtio-blk: io_uring submission queue full; request failed");
        false
    }

    /// Hands what was queued to the kernel (one io_uring_enter for a whole batch).
    pub fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = 0,
            // Left in the queue: the next submit or wait hands them over.
            Err(e) => {
                let level = self.submit_log.level();
                log::log!(level, "virtio-blk: io_uring submission failed: {e}");
            }
        }
    }

    /// Takes every completion the kernel posted; a short transfer is queued again for
    /// the rest (the caller submits it), so only whole requests come back. No system
    /// call: this only reads the completion ring.
    pub fn reap(&mut self, mem: &GuestMemory, out: &mut Vec<Finished>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            let Ok(index) = u16::try_from(user_data) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(usize::from(index)).filter(|s| s.busy) else {
                log::error!("virtio-blk: io_uring completion for unknown request {user_data}");
                continue;
            };
            self.in_flight = self.in_flight.saturating_sub(1);
            let op = slot.op.unwrap_or(Op::Flush { sync: false });
            let result = match (op, usize::try_from(res)) {
                (_, Err(_)) => Err(-res),
                (Op::Read | Op::Write, Ok(n)) => {
                    slot.done = slot.done.saturating_add(n);
                    if n > 0 && slot.done < slot.total {
                        advance(&mut slot.iovecs, n);
                        slot.offset = slot.offset.saturating_add(n as u64);
                        // Handed over by the caller's next submit or wait.
                        if self.enqueue(index) {
                            continue;
                        }
                        Err(libc::EIO)
                    } else if slot.done < slot.total {
                        // End of file under a request the size check allowed: the file
                        // shrank behind ember's back.
                        Err(libc::EIO)
                    } else {
                        Ok(slot.done)
                    }
                }
                (Op::Flush { .. }, Ok(_)) => Ok(0),
            };
            let Some(slot) = self.slots.get_mut(usize::from(index)) else {
                continue;
            };
            if op == Op::Read && result.is_ok() {
                for &(addr, len) in &slot.ranges {
                    for s in mem.get_slices(addr, len).flatten() {
                        s.bitmap().mark_dirty(0, s.len());
                    }
                }
            }
            slot.busy = false;
            out.push(Finished {
                head: slot.head,
                req_type: slot.req_type,
                status_addr: slot.status_addr,
                result,
                op,
            });
            self.free.push(index);
        }
        self.cqes = cqes;
    }

    /// Waits until nothing is in flight, collecting what completes into `out`.
    pub fn wait_all(&mut self, mem: &GuestMemory, out: &mut Vec<Finished>) {
        // Each round waits for one completion at least; a round that cannot wait (the
        // kernel refuses io_uring_enter) gives up rather than spin.
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!("virtio-blk: cannot wait for io_uring completions: {e}");
                    return;
                }
            }
            self.reap(mem, out);
        }
    }
}

/// Drops the first `n` bytes from `iovecs` (after a short transfer).
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for v in iovecs.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            whole += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iovecs.drain(..whole);
}

impl Drop for Uring {
    /// The kernel may still be moving bytes into guest memory and reading the iovec
    /// arrays: wait for it before either goes away.
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        if let Some(mem) = self.mem.clone() {
            let mut sink = Vec::new();
            self.wait_all(&mem, &mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_drops_whole_and_partial_buffers() {
        let mut buf = [0u8; 64];
        let base = buf.as_mut_ptr();
        let iov = |off: usize, len: usize| libc::iovec {
            iov_base: base.wrapping_add(off).cast(),
            iov_len: len,
        };
        let mut v = vec![iov(0, 16), iov(16, 16), iov(32, 32)];
        advance(&mut v, 20);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].iov_base, base.wrapping_add(20).cast());
        assert_eq!(v[0].iov_len, 12);
        advance(&mut v, 12);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 32);
    }
}
