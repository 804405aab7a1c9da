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
