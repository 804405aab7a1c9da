//! virtio-blk requests: whatever the guest left in its descriptor table and rings (fake
//! guest memory with a gap, see ember_fuzz) drained by `Disk::process_queue` through
//! virtio-queue, under the VMM thread's filter, as the event loop does after a kick.
//!
//! Input: queue spec (size, flags, next avail, next used; see `QueueSpec`), then the
//! guest memory image from address 0. Flags beyond the queue's: read-only, writeback,
//! Async engine (io_uring: the requests it takes are submitted to the kernel, then waited
//! for and answered, as before a snapshot).
//! Afterwards every chain taken with a valid head index has a used entry, the file did not grow, and a read-only
//! disk is unchanged.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;

use ember::config::CacheType;
use ember::devices::virtio::Work;
use ember::devices::virtio::block::{Disk, QUEUE_SIZE, SECTOR_SIZE};
use ember_fuzz::{
    Confined, GuestMemory, Input, QueueCheck, QueueSpec, ThreadKind, guest_memory, load_image,
};
use libfuzzer_sys::fuzz_target;

/// 16 sectors and a partial one the guest does not see.
const FILE_LEN: usize = 16 * SECTOR_SIZE as usize + 100;

struct Target {
    vmm: Confined,
    mem: GuestMemory,
    file: File,
    pattern: Vec<u8>,
}

thread_local! {
    static TARGET: Target = Target::new();
}

impl Target {
    fn new() -> Target {
        // SAFETY: the name is a NUL-terminated string; memfd_create returns a new
        // descriptor (checked below) that the File takes ownership of.
        let fd = unsafe { libc::memfd_create(c"ember-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Every sector starts with its own number, so reads return telling data.
        let pattern: Vec<u8> = (0..FILE_LEN)
            .map(|i| (i / SECTOR_SIZE as usize) as u8 ^ i as u8)
            .collect();
        Target {
            vmm: Confined::start(ThreadKind::Vmm),
            mem: guest_memory(),
            file,
            pattern,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| run(t, data));
});

fn run(t: &Target, data: &[u8]) {
    let mut input = Input(data);
    let (spec, flags) = QueueSpec::read(&mut input, QUEUE_SIZE);
    let read_only = flags & 1 != 0;
    let cache = if flags & 2 != 0 {
        CacheType::Writeback
    } else {
        CacheType::Unsafe
    };
    load_image(&t.mem, input.rest());
    t.file.set_len(FILE_LEN as u64).unwrap();
    t.file.write_all_at(&t.pattern, 0).unwrap();

    let mut queue = spec.build(QUEUE_SIZE, &t.mem);
    let check = QueueCheck::before(&spec, &queue, &t.mem);
    let file = t.file.try_clone().unwrap();
    let mem = t.mem.clone();
    let mut disk = Disk::from_file(
        file,
        "fuzz",
        read_only,
        cache,
        FILE_LEN as u64 / SECTOR_SIZE,
    );
    // The ring is set up here, as ember sets drives up before the VMM thread's filter.
    if flags & 4 != 0 {
        disk.use_async().expect("io_uring");
    }
    let (queue, completed) = t.vmm.run(move || {
        let mut completed = 0;
        // A few kicks' worth: a capped drain asks to be run again.
        for _ in 0..4 {
            let (done, work) = disk.process_queue(&mem, &mut queue);
            completed += done;
            let (settled, _) = disk.settle(&mem, &mut queue);
            completed += settled;
            if work != Work::More {
                break;
            }
        }
        (queue, completed)
    });
    check.after(&queue, &t.mem, completed);

    let len = t.file.metadata().unwrap().len();
    assert_eq!(len, FILE_LEN as u64, "a request wrote past the disk's end");
    if read_only {
        let mut now = vec![0u8; FILE_LEN];
        t.file.read_exact_at(&mut now, 0).unwrap();
        assert!(now == t.pattern, "a read-only disk was written");
    }
}
