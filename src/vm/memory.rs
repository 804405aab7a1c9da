//! Guest RAM: anonymous mappings registered with KVM, split around the 32-bit MMIO gap.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};

use super::layout::{HIGH_RAM_START, MMIO_GAP_START};
use crate::config::HugePages;

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
    #[error(
        "cannot map {size_mib} MiB of guest memory with 2 MiB huge pages ({source}): the host \
         has {free} free 2 MiB huge pages and this VM needs {need}; reserve them as root with \
         `echo $(( $(cat /proc/sys/vm/nr_hugepages) + {need} )) > /proc/sys/vm/nr_hugepages` \
         (or hugepages=N on the host's kernel command line), or use huge_pages \"None\" or \
         \"Transparent\""
    )]
    HugePagesUnavailable {
        size_mib: u64,
        free: u64,
        need: u64,
        source: std::io::Error,
    },
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    MapRegion {
        size_mib: u64,
        source: vm_memory::mmap::MmapRegionError,
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
    huge_pages: HugePages,
) -> Result<GuestMemory, MemoryError> {
    let bytes = mem_mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::TooLarge(mem_mib))?;
    let ranges = ram_ranges(bytes)
        .into_iter()
        .map(|(a, len)| usize::try_from(len).map(|len| (a, len)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| MemoryError::TooLarge(mem_mib))?;
    let mem = map_anonymous(&ranges, huge_pages)?;
    register(vm, &mem, track_dirty_pages)?;
    Ok(mem)
}

/// Maps anonymous guest RAM for `ranges`, backed by the pages `huge_pages` asks for.
pub fn map_anonymous(
    ranges: &[(GuestAddress, usize)],
    huge_pages: HugePages,
) -> Result<GuestMemory, MemoryError> {
    let size_mib = ranges.iter().map(|(_, len)| *len as u64).sum::<u64>() >> 20;
    if huge_pages != HugePages::Hugetlbfs2M {
        let mem = GuestMemory::from_ranges(ranges)
            .map_err(|source| MemoryError::Mmap { size_mib, source })?;
        if huge_pages == HugePages::Transparent {
            warn_if_thp_off();
            for region in mem.iter() {
                advise_huge(region.as_ptr(), region.len() as usize);
            }
        }
        return Ok(mem);
    }
    // MAP_HUGETLB without MAP_NORESERVE: the kernel reserves every huge page now, so a
    // pool too small fails here with ENOMEM instead of a SIGBUS when the guest first
    // touches a page the pool cannot give (what MAP_NORESERVE would risk).
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(true)
            .build()
            .map_err(|source| match source {
                vm_memory::mmap::MmapRegionError::Mmap(e) => MemoryError::HugePagesUnavailable {
                    size_mib,
                    free: free_huge_pages_2m().unwrap_or(0),
                    need: size_mib.div_ceil(2),
                    source: e,
                },
                source => MemoryError::MapRegion { size_mib, source },
            })?;
        let region = vm_memory::GuestRegionMmap::new(mapping, addr)
            .ok_or(MemoryError::TooLarge(size_mib))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|_| MemoryError::TooLarge(size_mib))
}

/// Asks the kernel for transparent huge pages on one mapping of guest RAM. A refusal
/// (THP `never`, or a kernel without THP) leaves 4 KiB pages, which work the same: it is
/// logged, not an error.
pub fn advise_huge(addr: *mut u8, len: usize) {
    // SAFETY: [addr, addr + len) is one live mapping of guest RAM; MADV_HUGEPAGE changes
    // only how the kernel backs it, never its contents.
    let r = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        log::warn!(
            "huge_pages Transparent: madvise(MADV_HUGEPAGE) failed ({}); guest memory stays \
             on 4 KiB pages",
            std::io::Error::last_os_error()
        );
    }
}

/// madvise(MADV_HUGEPAGE) succeeds even where THP is `never`: say that the advice is moot.
pub fn warn_if_thp_off() {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    if mode.as_deref().map_or(true, |m| m.contains("[never]")) {
        log::warn!(
            "huge_pages Transparent: transparent huge pages are off on this host (`never` or \
             missing in /sys/kernel/mm/transparent_hugepage/enabled); guest memory stays on \
             4 KiB pages"
        );
    }
}

/// 2 MiB huge pages a new mapping can still reserve: free in the pool and not promised to
/// a mapping already (`HugePages_Free` - `HugePages_Rsvd` of /proc/meminfo, whose default
/// huge page size is 2 MiB on x86-64).
pub fn free_huge_pages_2m() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("HugePages_Free:")?.saturating_sub(field("HugePages_Rsvd:")?))
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
