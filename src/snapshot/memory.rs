//! Guest memory in a snapshot: written to the memory file region after region, and
//! mapped back MAP_PRIVATE so clones of one snapshot share its page cache and copy only
//! the pages they write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, WriteVolatile,
};

use crate::vm::memory::{GuestMemory, ram_ranges};

/// Page size of KVM's dirty log.
pub const PAGE_SIZE: u64 = 4096;

/// One guest RAM region and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionState {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot {what} the memory file {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the memory file {path} is {len} bytes; the snapshot's {mib} MiB of guest memory need {need}"
    )]
    TooShort {
        path: String,
        len: u64,
        need: u64,
        mib: u64,
    },
    #[error(
        "the snapshot's memory layout {found:?} is not the one {mib} MiB of guest RAM has ({expected:?})"
    )]
    Layout {
        found: Vec<RegionState>,
        expected: Vec<RegionState>,
        mib: u64,
    },
    #[error("cannot map the memory file: {0}")]
    Map(String),
    #[error("KVM_GET_DIRTY_LOG on slot {slot}: {source} (diff snapshots need track_dirty_pages)")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// The regions of `mem_mib` MiB of guest RAM, laid out back to back in the file.
pub fn layout_for(mem_mib: u64) -> Vec<RegionState> {
    let mut offset = 0;
    ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, size)| {
            let r = RegionState {
                guest_addr: a.raw_value(),
                size,
                file_offset: offset,
            };
            offset += size;
            r
        })
        .collect()
}

/// Checks a snapshot's layout against its machine configuration.
pub fn check_layout(found: &[RegionState], mem_mib: u64) -> Result<(), MemoryFileError> {
    let expected = layout_for(mem_mib);
    if found != expected.as_slice() {
        return Err(MemoryFileError::Layout {
            found: found.to_vec(),
            expected,
            mib: mem_mib,
        });
    }
    Ok(())
}

fn io(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> MemoryFileError {
    let path = path.to_string();
    move |source| MemoryFileError::Io { what, path, source }
}

/// Forgets which pages were written so far (KVM's log and ember's bitmap): the next Diff
/// snapshot holds what changes after this point.
pub fn reset_dirty(vm: &VmFd, mem: &GuestMemory, layout: &[RegionState], track: bool) {
    for (slot, (region, r)) in mem.iter().zip(layout).enumerate() {
        std::ops::Deref::deref(region).bitmap().reset();
        if track && let Err(e) = vm.get_dirty_log(slot as u32, r.size as usize) {
            log::warn!("KVM_GET_DIRTY_LOG on slot {slot}: {e}");
        }
    }
}

/// Writes every page of guest memory to `path` (a Full snapshot).
pub fn save_full(
    mem: &GuestMemory,
    layout: &[RegionState],
    path: &str,
) -> Result<(), MemoryFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("create", path))?;
    for (region, r) in mem.iter().zip(layout) {
        let slice = region
            .get_slice(MemoryRegionAddress(0), r.size as usize)
            .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        file.write_all_volatile(&slice)
            .map_err(|e| io("write", path)(std::io::Error::other(e.to_string())))?;
    }
    file.sync_data().map_err(io("sync", path))?;
    Ok(())
}

/// Writes the pages KVM logged as dirty since the last snapshot (or since the restore)
/// into `path` at their place; the file is sized to the whole layout, the other pages
/// are holes (read as zeros), to be merged onto the base with `ember snapshot-merge`.
pub fn save_diff(
    vm: &VmFd,
    mem: &GuestMemory,
    layout: &[RegionState],
    path: &str,
) -> Result<u64, MemoryFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io("create", path))?;
    let total: u64 = layout.iter().map(|r| r.size).sum();
    file.set_len(total).map_err(io("size", path))?;
    let mut written = 0u64;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (slot, (region, r)) in mem.iter().zip(layout).enumerate() {
        let kvm_log = vm
            .get_dirty_log(slot as u32, r.size as usize)
            .map_err(|source| MemoryFileError::DirtyLog {
                slot: slot as u32,
                source,
            })?;
        // KVM logs the guest's writes; ember's own (virtio buffers, used rings) are in
        // the region's bitmap.
        let ours = std::ops::Deref::deref(region).bitmap().get_and_reset();
        let words = kvm_log.len().max(ours.len());
        for word_index in 0..words {
            let mut bits = kvm_log.get(word_index).copied().unwrap_or(0)
                | ours.get(word_index).copied().unwrap_or(0);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let index = word_index as u64 * 64 + bit;
                let at = index * PAGE_SIZE;
                if at >= r.size {
                    break;
                }
                let slice = region
                    .get_slice(MemoryRegionAddress(at), PAGE_SIZE as usize)
                    .map_err(|e| MemoryFileError::Map(e.to_string()))?;
                slice.copy_to(&mut page[..]);
                file.write_all_at(&page, r.file_offset + at)
                    .map_err(io("write", path))?;
                written += 1;
            }
        }
    }
    file.sync_data().map_err(io("sync", path))?;
    Ok(written)
}

/// Maps `path` as guest memory with MAP_PRIVATE: reads come from the page cache shared by
/// every VM restored from the same file; the first write to a page copies it for this VM
/// alone. The file must not change while VMs use it (their unwritten pages would change
/// under them).
pub fn map_file(
    path: &str,
    layout: &[RegionState],
    mem_mib: u64,
) -> Result<GuestMemory, MemoryFileError> {
    let file = File::open(path).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    let need = layout
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if len < need {
        return Err(MemoryFileError::TooShort {
            path: path.to_string(),
            len,
            need,
            mib: mem_mib,
        });
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(layout.len());
    for r in layout {
        let mapping = MmapRegionBuilder::new_with_bitmap(
            r.size as usize,
            AtomicBitmap::with_len(r.size as usize),
        )
        .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| MemoryFileError::Map("region wraps the address space".into()))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryFileError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_back_to_back() {
        let l = layout_for(4096);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].file_offset, 0);
        assert_eq!(l[1].file_offset, l[0].size);
        assert_eq!(l[1].guest_addr, 1 << 32);
        assert!(check_layout(&l, 4096).is_ok());
        assert!(check_layout(&l, 128).is_err());
    }

    #[test]
    fn save_and_map_back() {
        let dir = std::env::temp_dir().join(format!("ember-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem").to_string_lossy().into_owned();
        let layout = layout_for(2);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        use vm_memory::Bytes;
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1234)).unwrap();
        save_full(&mem, &layout, &path).unwrap();
        let back = map_file(&path, &layout, 2).unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        // A write stays private to the mapping.
        back.write_obj(1u32, GuestAddress(0x1234)).unwrap();
        let again = map_file(&path, &layout, 2).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        // Too short a file is named.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let e = map_file(&path, &layout, 2).unwrap_err().to_string();
        assert!(e.contains("is 100 bytes"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
