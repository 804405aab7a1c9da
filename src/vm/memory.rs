//! Guest RAM: anonymous mappings registered with KVM, split around the 32-bit MMIO gap.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{HIGH_RAM_START, MMIO_GAP_START};

/// With a dirty bitmap: the pages ember itself writes (virtio buffers and rings) are not
/// in KVM's dirty log, and a Diff snapshot must hold them too.
pub type GuestMemory = GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too large for this host's address space")]
    TooLarge(u64),
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Mmap {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused guest memory region {slot}: {0}", slot = .1)]
    SetRegion(kvm_ioctls::Error, u32),
}

/// Guest-physical RAM ranges for `mem_bytes` of RAM: everything below the MMIO gap, and
/// what does not fit there from 4 GiB on.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(HIGH_RAM_START), mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Maps guest RAM in this process and registers each range with KVM as one memory slot.
pub fn create(
    vm: &VmFd,
    mem_mib: u64,
    track_dirty_pages: bool,
) -> Result<GuestMemory, MemoryError> {
    let bytes = mem_mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::TooLarge(mem_mib))?;
    let ranges = ram_ranges(bytes)
        .into_iter()
        .map(|(a, len)| usize::try_from(len).map(|len| (a, len)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::TooLarge(mem_mib))?;
    let mem = GuestMemory::from_ranges(&ranges).map_err(|source| MemoryError::Mmap {
        size_mib: mem_mib,
        source,
    })?;
    register(vm, &mem, track_dirty_pages)?;
    Ok(mem)
}

/// Registers each region of `mem` with KVM as one memory slot (slot = region index), with
/// dirty-page logging if asked.
pub fn register(vm: &VmFd, mem: &GuestMemory, track_dirty_pages: bool) -> Result<(), MemoryError> {
    let mem_mib = end_of_ram(mem) >> 20;
    let flags = if track_dirty_pages {
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::TooLarge(mem_mib))?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM: the
        // caller keeps both in the same `Vm` and drops the VM file first.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|e| MemoryError::SetRegion(e, slot))?;
    }
    Ok(())
}

/// The last guest-physical address of RAM plus one.
pub fn end_of_ram(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_ram_is_split_around_the_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(1 << 32), (4 << 30) - MMIO_GAP_START));
    }
}
