//! The one virtqueue driver every device's unit tests use: it writes descriptors and avail
//! entries into plain guest memory as a guest driver would, and reads the used ring back.
//! Layout from `base`: descriptor table, driver (avail) area one page on, device (used)
//! area two pages on, so queues of up to 256 entries fit in three pages.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::vm::memory::GuestMemory;

/// Guest memory of `size` bytes from address 0.
pub fn memory(size: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// One split virtqueue as the driver side sees it, and the device side's `Queue`.
pub struct TestQueue {
    base: u64,
    size: u16,
    /// The driver's next avail index (free running).
    pub avail_idx: u16,
    /// What the device is given at activation.
    pub queue: Queue,
}

impl TestQueue {
    /// A ready queue of `size` entries with its rings at `base`.
    pub fn new(mem: &GuestMemory, base: u64, size: u16) -> TestQueue {
        let mut queue = Queue::new(size).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(base))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(base + 0x1000))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(base + 0x2000))
            .unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        TestQueue {
            base,
            size,
            avail_idx: 0,
            queue,
        }
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
        let d = self.base + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(flags as u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Makes chain `head` available.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.base + 0x1000 + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the avail index as a (possibly lying) driver would.
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.base + 0x1000 + 2))
            .unwrap();
    }

    /// (id, len) of used entry `i`.
    pub fn used(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let e = self.base + 0x2000 + 4 + u64::from(i % self.size) * 8;
        (
            mem.read_obj(GuestAddress(e)).unwrap(),
            mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).unwrap()
    }
}

/// An event loop for device unit tests: an epoll set standing for the VMM thread's, which
/// the device reaches through `Interest`, and which the test waits on and dispatches. Like
/// the real loop (event-manager), it keeps a table by fd and refuses an fd it already has,
/// so a device that closes an fd without removing it first fails its tests.
pub struct TestLoop {
    epoll: vmm_sys_util::epoll::Epoll,
    fds: std::collections::BTreeSet<std::os::fd::RawFd>,
}

impl TestLoop {
    /// A loop watching `sources` (a device's `event_sources`) for input.
    pub fn new(sources: Vec<(std::os::fd::RawFd, u16)>) -> TestLoop {
        use super::Interest;
        let mut l = TestLoop {
            epoll: vmm_sys_util::epoll::Epoll::new().unwrap(),
            fds: Default::default(),
        };
        for (fd, source) in sources {
            l.watch(fd, source).unwrap();
        }
        l
    }

    /// The fds being watched.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        self.fds.iter().copied().collect()
    }

    /// What is ready, waiting up to `ms` milliseconds.
    pub fn wait(&self, ms: i32) -> Vec<(u16, super::EventSet)> {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 64];
        let n = self.epoll.wait(ms, &mut events).unwrap();
        events
            .iter()
            .take(n)
            .map(|e| (e.data() as u16, e.event_set()))
            .collect()
    }
}

impl super::Interest for TestLoop {
    fn add(
        &mut self,
        fd: std::os::fd::RawFd,
        source: u16,
        events: super::EventSet,
    ) -> std::io::Result<()> {
        if self.fds.contains(&fd) {
            return Err(std::io::Error::other("fd already registered"));
        }
        let ev = vmm_sys_util::epoll::EpollEvent::new(events, u64::from(source));
        self.epoll
            .ctl(vmm_sys_util::epoll::ControlOperation::Add, fd, ev)?;
        self.fds.insert(fd);
        Ok(())
    }

    fn modify(
        &mut self,
        fd: std::os::fd::RawFd,
        source: u16,
        events: super::EventSet,
    ) -> std::io::Result<()> {
        let ev = vmm_sys_util::epoll::EpollEvent::new(events, u64::from(source));
        self.epoll
            .ctl(vmm_sys_util::epoll::ControlOperation::Modify, fd, ev)
    }

    fn remove(&mut self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        self.epoll.ctl(
            vmm_sys_util::epoll::ControlOperation::Delete,
            fd,
            vmm_sys_util::epoll::EpollEvent::default(),
        )?;
        self.fds.remove(&fd);
        Ok(())
    }
}
