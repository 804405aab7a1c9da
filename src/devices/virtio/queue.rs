//! Taking chains off a virtqueue the way every device here must: without trusting the
//! driver's avail index, and without virtio-queue's own `error!` on a bad one (a guest
//! could flood the log with it on every kick).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{TestQueue, memory};

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
