//! Virtio devices over the virtio-mmio transport (version 2: virtio 1.x only).
//!
//! Every device implements [`VirtioDevice`]; [`MmioTransport`] turns it into a bus device
//! (registers at a 4 KiB MMIO window) and an event-loop subscriber (guest kicks arrive as
//! ioeventfds). Queue processing lives in the devices, apart from the event-loop glue, so
//! it can be unit-tested on plain guest memory.
//!
//! Files: this one holds the device trait, interrupts and slot allocation; `mmio.rs` the
//! transport (registers, status machine, event-loop tokens); `queue.rs` how chains are
//! taken off a ring and checked; `block/` and `net/` the devices; `testing.rs` the one
//! virtqueue driver every device's unit tests use.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
pub use vmm_sys_util::epoll::EventSet;

use crate::devices::ioapic::IrqLine;
use crate::vm::memory::GuestMemory;

pub use block::Block;
pub use mmio::MmioTransport;
pub use net::Net;
pub use queue::Work;

/// InterruptStatus bit: the device used a buffer.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("drive `{id}`: cannot open {path}: {source}")]
    OpenDisk {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("drive `{id}`: cannot find the size of {path}: {source}")]
    DiskSize {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "drive `{id}`: io_engine Async needs io_uring, and this host's kernel refused it \
         ({source}); use io_engine Sync"
    )]
    IoUring {
        id: String,
        source: block::UringError,
    },
    #[error("too many virtio devices: at most {max} fit in the MMIO space and IOAPIC pins")]
    TooManyDevices { max: u64 },
    #[error("cannot create a virtio eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot get IOAPIC pin {pin} for a virtio device: {source}")]
    IrqLine {
        pin: u32,
        source: crate::devices::ioapic::IrqError,
    },
    #[error("KVM refused the queue-notify ioeventfd at {addr:#x}: {source}")]
    IoEvent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("network interface `{id}`: {source}")]
    Tap {
        id: String,
        source: net::tap::TapError,
    },
    #[error("cannot create an eventfd for a network interface: {0}")]
    NetEventFd(std::io::Error),
    #[error("vsock: cannot listen on {path}: {source}")]
    Vsock {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::OverlapError),
}

/// Why a device refused to start when the driver set DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("already active")]
    AlreadyActive,
    #[error("{0}")]
    Other(String),
}

/// A device's interrupt: the InterruptStatus register it shares with its transport, and
/// the irqfd that raises its IOAPIC pin.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    pub fn new(line: IrqLine) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver the device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver clears the bits it handled.
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a virtio device provides to the transport. Everything the guest sends reaches the
/// device through these calls, always under the transport's lock.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block, 1 for net).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Bytes of configuration space (accesses beyond it are counted as guest errors).
    fn config_len(&self) -> usize;
    /// Reads `data.len()` bytes of the configuration space at `offset`; bytes beyond the
    /// space read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the configuration space (ignored by devices without writable fields).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up and the features it accepted.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// Handles a kick on queue `index` (on the event loop, which `interest` reaches).
    /// `Work::More` when the drain was capped, so the caller kicks again later instead of
    /// starving other devices; `Work::Broken` when the driver broke the ring.
    fn process_queue(&mut self, index: usize, interest: &mut dyn Interest) -> Work;
    /// Back to the state before activation (driver wrote 0 to Status).
    fn reset(&mut self);
    /// Makes everything the device acknowledged durable (block: fdatasync).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Completes every request the device still has in flight on the host (virtio-blk's
    /// Async engine), so that a snapshot or a new backing file finds none. True when
    /// requests wait on a queue for room in the engine: the caller serves the queues
    /// again.
    fn settle(&mut self) -> bool {
        false
    }
    /// File descriptors besides the queue kicks the device wants watched from the start,
    /// each with the source number `process_event` will get (e.g. a wake eventfd).
    fn event_sources(&self) -> Vec<(RawFd, u16)> {
        Vec::new()
    }
    /// Source `source` (from `event_sources` or `Interest::add`) reported `events` (what
    /// it was watched for, or an error or hangup, which epoll always reports).
    fn process_event(
        &mut self,
        _source: u16,
        _events: EventSet,
        _interest: &mut dyn Interest,
    ) -> Work {
        Work::Done
    }
    /// Where the running device is in each of its queues (for a snapshot); empty when
    /// the device is not active.
    fn queue_progress(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    /// The device's own state for a snapshot, beyond its queues (see
    /// `snapshot::devices::DeviceState`); None for a device that keeps none.
    fn save_device_state(&self) -> Option<crate::snapshot::devices::DeviceState> {
        None
    }
    /// Puts saved device state back on a device freshly built from the snapshot's
    /// configuration, before the transport restarts it. The state file is hostile input:
    /// every value is checked against the device. `None` (a state file without it) keeps
    /// the fresh device's state.
    fn restore_device_state(
        &mut self,
        state: Option<&crate::snapshot::devices::DeviceState>,
    ) -> Result<(), String> {
        match state {
            None => Ok(()),
            Some(_) => Err("state for another kind of device".into()),
        }
    }
    /// The transport restarted a restored device at its saved queue positions (still
    /// off the event loop; the device's wake-ups reach the loop once it runs).
    fn restored(&mut self) {}
    /// Replaces the device's backing file (PATCH /drives after start). Returns whether the
    /// config space changed, so the transport can notify the driver.
    fn update_backing(&mut self, _path: &str) -> Result<bool, String> {
        Err("this device has no backing file".into())
    }
    /// Replaces the device's rate limiters (PATCH after start), in the device's order
    /// (block: the drive's; net: RX, then TX). `None` leaves that limiter alone; a config
    /// is the limiter's whole new state (its buckets start full).
    fn update_rate_limiters(&mut self, _update: &[Option<crate::config::RateLimiterConfig>]) {}
}

/// For host-side failures a guest can make recur on every request (a disk that fails
/// writes, a TAP that refuses offloads): the first is logged as an error, later ones at
/// debug level only, so a guest cannot flood the log; counters keep the count.
#[derive(Debug, Default)]
pub struct LogOnce(bool);

impl LogOnce {
    /// The level for the next report.
    pub fn level(&mut self) -> log::Level {
        if std::mem::replace(&mut self.0, true) {
            log::Level::Debug
        } else {
            log::Level::Error
        }
    }
}

/// A device's own interest in the VMM thread's event loop: devices add, change and remove
/// file descriptors they own (a TAP while RX can proceed, a vsock host stream that has
/// bytes to take or to give) instead of running an epoll of their own. Only reachable on
/// the event loop (from `process_queue` and `process_event`).
///
/// A device removes an fd before it closes it: the loop keeps a table by fd number, and a
/// closed fd left in it would refuse the next fd to get that number.
pub trait Interest {
    /// Watch `fd` for `events` (`EventSet::IN`, `OUT` or both); `process_event(source)`
    /// runs when it is ready. Errors and hangups are reported whatever `events` says.
    fn add(&mut self, fd: RawFd, source: u16, events: EventSet) -> std::io::Result<()>;
    /// Change what an added `fd` is watched for.
    fn modify(&mut self, fd: RawFd, source: u16, events: EventSet) -> std::io::Result<()>;
    /// Stop watching `fd`.
    fn remove(&mut self, fd: RawFd) -> std::io::Result<()>;

    /// Watch `fd` for input.
    fn watch(&mut self, fd: RawFd, source: u16) -> std::io::Result<()> {
        self.add(fd, source, EventSet::IN)
    }
    /// Stop watching `fd`.
    fn unwatch(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.remove(fd)
    }
}
