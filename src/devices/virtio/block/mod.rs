//! The virtio-blk device: feature bits, config space and the one request queue, glued to
//! a [`Disk`] that parses requests and moves their bytes (see `disk.rs`).

mod disk;
mod uring;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};

pub use disk::{BlockMetrics, CONFIG_LEN, Disk, QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE};
pub use uring::UringError;

use super::{ActivateError, EventSet, Interest, VirtioDevice, VirtioError, VirtioInterrupt, Work};
use crate::config::drive::DriveConfig;
use crate::config::rate_limiter::RateLimiterConfig;
use crate::devices::rate_limiter::RateLimiter;
use crate::snapshot::devices::DeviceState;
use crate::vm::memory::GuestMemory;

/// Event source: the rate limiter's timer.
const SOURCE_LIMITER: u16 = 0;
/// Event source: the Async engine's completion eventfd.
const SOURCE_COMPLETION: u16 = 1;

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-blk device: a disk and, once the driver started it, its queue.
pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
}

impl Block {
    pub fn new(drive: &DriveConfig) -> Result<Block, VirtioError> {
        let mut disk = Disk::open(drive)?;
        // Every drive has a limiter (and its timerfd) from the start, so PATCH can switch
        // one on at run time without new file descriptors or event-loop changes.
        disk.limiter =
            Some(RateLimiter::new(drive.rate_limiter.as_ref()).map_err(VirtioError::EventFd)?);
        if disk.completion_fd().is_some() {
            log::info!("drive `{}`: io_engine Async (io_uring)", drive.drive_id);
        }
        let metrics = disk.metrics.clone();
        let key = format!("block_{}", drive.drive_id);
        crate::metrics::register_section(Box::new(move || (key.clone(), metrics.json())));
        Ok(Block::from_disk(disk))
    }

    pub fn from_disk(disk: Disk) -> Block {
        Block {
            config: disk.config_space(),
            disk,
            active: None,
        }
    }

    /// Tells the driver about used entries, unless it asked not to hear of them.
    fn notify(active: &mut Active, done: u32) {
        if done > 0 && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.disk.features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *d = at.and_then(|a| self.config.get(a)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::metrics::inc(&crate::metrics::METRICS.virtio.config_writes_ignored);
        log::debug!("virtio-blk: config write at {offset:#x} ignored (nothing is writable)");
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
        let Some(active) = self.active.as_mut().filter(|_| index == 0) else {
            return Work::Done;
        };
        let (done, work) = self.disk.process_queue(&active.mem, &mut active.queue);
        Block::notify(active, done);
        work
    }

    /// Requests in flight on the host finish first (the kernel may still be writing
    /// into guest memory the driver is about to reuse); their answers are dropped.
    fn reset(&mut self) {
        self.disk.abandon(self.active.as_ref().map(|a| &a.mem));
        self.active = None;
    }

    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        let limiter = self.disk.limiter.as_ref().map(|l| (l.fd(), SOURCE_LIMITER));
        let completion = self.disk.completion_fd().map(|fd| (fd, SOURCE_COMPLETION));
        limiter.into_iter().chain(completion).collect()
    }

    /// The rate limiter's timer fired: serve what it held back. Or the Async engine
    /// completed requests: answer them, and serve the chains that waited for a slot.
    fn process_event(&mut self, source: u16, _: EventSet, interest: &mut dyn Interest) -> Work {
        match source {
            SOURCE_LIMITER => {
                let fired = self.disk.limiter.as_mut().is_some_and(|l| l.timer_fired());
                if !fired {
                    return Work::Done;
                }
                self.process_queue(0, interest)
            }
            SOURCE_COMPLETION => {
                let Some(active) = self.active.as_mut() else {
                    // Reset: what was in flight was waited for and dropped.
                    self.disk.abandon(None);
                    return Work::Done;
                };
                let (done, throttled) = self.disk.complete(&active.mem, &mut active.queue);
                Block::notify(active, done);
                // Through a re-kick, so the transport's checks (a failed or broken
                // device) apply as to any kick.
                if throttled { Work::More } else { Work::Done }
            }
            _ => Work::Done,
        }
    }

    fn settle(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let (done, throttled) = self.disk.settle(&active.mem, &mut active.queue);
        Block::notify(active, done);
        throttled
    }

    fn update_rate_limiters(&mut self, update: &[Option<RateLimiterConfig>]) {
        if let (Some(Some(cfg)), Some(l)) = (update.first(), self.disk.limiter.as_mut()) {
            l.set(cfg);
        }
    }

    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn save_device_state(&self) -> Option<DeviceState> {
        self.disk
            .limiter
            .as_ref()
            .map(|l| DeviceState::Block { limiter: l.save() })
    }

    fn restore_device_state(&mut self, state: Option<&DeviceState>) -> Result<(), String> {
        match (state, self.disk.limiter.as_mut()) {
            (None, _) => Ok(()),
            (Some(DeviceState::Block { limiter }), Some(l)) => {
                l.restore(limiter).map_err(|e| format!("rate limiter: {e}"))
            }
            (Some(DeviceState::Block { limiter }), None) if *limiter == Default::default() => {
                Ok(())
            }
            _ => Err("the saved state is not a drive's".into()),
        }
    }

    /// Requests in flight complete first: an acknowledged write is in the file before
    /// the fdatasync.
    fn flush(&mut self) -> std::io::Result<()> {
        self.settle();
        self.disk.flush()
    }

    fn update_backing(&mut self, path: &str) -> Result<bool, String> {
        let new = Disk::reopen(&self.disk, path).map_err(|e| e.to_string())?;
        // What the guest wrote to the old file stays there, requests in flight included.
        self.settle();
        self.disk
            .flush()
            .map_err(|e| format!("cannot flush the old backing file: {e}"))?;
        if let Some(u) = self.disk.uring.as_mut() {
            u.replace_file(&new.file)
                .map_err(|e| format!("cannot give the new backing file to io_uring: {e}"))?;
        }
        self.disk.file = new.file;
        self.disk.capacity = new.capacity;
        let config = self.disk.config_space();
        let changed = config != self.config;
        self.config = config;
        Ok(changed)
    }
}
