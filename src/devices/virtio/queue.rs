//! Taking chains off a virtqueue the way every device here must: without trusting the
//! driver's avail index, and without virtio-queue's own `error!` on a bad one (a guest
//! could flood the log with it on every kick).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::vm::memory::GuestMemory;

/// How a drain of a queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing is left for now.
    Done,
    /// The drain reached its cap with chains left: run again after other events.
    More,
    /// The driver broke the ring (its avail index claims more chains than the ring holds,
    /// or the ring is unreadable): the device stops using the queue and needs a reset.
    Broken,
}

/// The driver's avail index is not within a ring's size of the device's: the device
/// cannot tell which entries are real (virtio 1.2 §2.7.13.3), so it needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenRing;

/// Available chains not yet taken: `Err` when the avail index is unreadable or moved
/// further than the ring holds (counted in the `virtio` metrics).
pub fn pending(queue: &Queue, mem: &GuestMemory) -> Result<u16, BrokenRing> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| BrokenRing)?;
    let n = (avail - Wrapping(queue.next_avail())).0;
    if n > queue.size() {
        crate::metrics::inc(&crate::metrics::METRICS.virtio.avail_index_jumps);
        log::debug!(
            "virtio: avail index {} is {n} ahead of {} in a ring of {}",
            avail.0,
            queue.next_avail(),
            queue.size()
        );
        return Err(BrokenRing);
    }
    Ok(n)
}

/// The next available chain, `None` if there is none.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, BrokenRing> {
    if pending(queue, mem)? == 0 {
        return Ok(None);
    }
    // `pending` checked what `iter` would refuse, so an error here is a ring that changed
    // under us: the same verdict.
    let mut iter = queue.iter(mem).map_err(|_| BrokenRing)?;
    Ok(iter.next())
}

/// After a capped drain: whether chains are left, or the ring broke meanwhile.
pub fn left(queue: &Queue, mem: &GuestMemory) -> Work {
    match pending(queue, mem) {
        Ok(0) => Work::Done,
        Ok(_) => Work::More,
        Err(BrokenRing) => Work::Broken,
    }
}

/// What a walk over a chain's descriptors found. virtio-queue's `Reader` and `Writer`
/// each follow one direction and end silently at a loop or a bad next index, so a device
/// checks the shape of a chain before it moves any bytes through them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub readable: usize,
    pub writable: usize,
    /// A device-readable descriptor after a device-writable one (virtio 1.2 §2.7.4.2).
    pub misordered: bool,
    /// More than `max` descriptors, or a last one that still points on: a loop or a
    /// next index outside the table.
    pub truncated: bool,
}

/// Walks at most `max` + 1 descriptors of `chain`.
pub fn shape(chain: impl Iterator<Item = Descriptor>, max: usize) -> Shape {
    let mut s = Shape::default();
    let mut count = 0usize;
    let mut dangling = false;
    for d in chain.take(max.saturating_add(1)) {
        count += 1;
        if d.is_write_only() {
            s.writable += 1;
        } else {
            s.readable += 1;
            s.misordered |= s.writable > 0;
        }
        dangling = d.has_next();
    }
    s.truncated = count > max || dangling;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{TestQueue, memory};

    #[test]
    fn chain_shapes() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        let (n, w) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
        let mem = memory(0x10_0000);
        let mut q = TestQueue::new(&mem, 0x1000, 8);
        let walk = |q: &mut TestQueue, head| {
            q.publish(&mem, head);
            let chain = pop(&mut q.queue, &mem).unwrap().unwrap();
            shape(chain, 8)
        };
        q.desc(&mem, 0, 0x8000, 16, n, 1);
        q.desc(&mem, 1, 0x9000, 16, w, 0);
        let ok = Shape {
            readable: 1,
            writable: 1,
            ..Shape::default()
        };
        assert_eq!(walk(&mut q, 0), ok);
        // Writable, then readable.
        q.desc(&mem, 2, 0x9000, 16, n | w, 3);
        q.desc(&mem, 3, 0x8000, 16, 0, 0);
        assert!(walk(&mut q, 2).misordered);
        // A loop, and a next index past the table.
        q.desc(&mem, 4, 0x8000, 16, n, 5);
        q.desc(&mem, 5, 0x8000, 16, n, 4);
        assert!(walk(&mut q, 4).truncated);
        q.desc(&mem, 6, 0x8000, 16, n, 8);
        assert!(walk(&mut q, 6).truncated);
    }

    #[test]
    fn avail_index_is_checked() {
        let mem = memory(0x10_0000);
        let mut q = TestQueue::new(&mem, 0x1000, 8);
        assert_eq!(pop(&mut q.queue, &mem).map(|c| c.is_some()), Ok(false));
        q.desc(&mem, 0, 0x8000, 16, 0, 0);
        q.publish(&mem, 0);
        assert_eq!(pending(&q.queue, &mem), Ok(1));
        assert!(pop(&mut q.queue, &mem).unwrap().is_some());
        assert_eq!(left(&q.queue, &mem), Work::Done);
        // Eight ahead is a full ring; nine cannot be.
        q.set_avail_idx(&mem, 9);
        assert_eq!(left(&q.queue, &mem), Work::More);
        q.set_avail_idx(&mem, 10);
        assert_eq!(
            pop(&mut q.queue, &mem).map(|c| c.is_some()),
            Err(BrokenRing)
        );
        assert_eq!(left(&q.queue, &mem), Work::Broken);
    }
}
