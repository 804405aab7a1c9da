//! The virtio-mmio register file: a sequence of guest reads and writes of any width at
//! any offset of a device's 4 KiB window (the status handshake, feature and queue
//! registers, config space, resets), as a vCPU thread delivers MMIO exits, under the vCPU
//! thread's filter. The device is a virtio-blk on a memfd or a virtio-net on a fake TAP,
//! built on the unconfined thread as ember builds devices before the vCPUs start.
//!
//! Input: device kind (bit 0: net), then 7-byte accesses: op (bit 7 write, bits 0-2 the
//! width), offset (u16, within the window), value (u32). Afterwards the window still
//! identifies itself, Status holds only bits the spec defines, and a reset followed by
//! the driver's usual start-up brings the device to DRIVER_OK.
#![no_main]

use std::fs::File;
use std::sync::Arc;

use ember::config::{CacheType, MacAddr};
use ember::devices::bus::BusDevice;
use ember::devices::ioapic::IrqLine;
use ember::devices::virtio::block::{Block, Disk};
use ember::devices::virtio::net::{Net, NetMetrics};
use ember::devices::virtio::{MmioTransport, VirtioDevice};
use ember_fuzz::{Confined, FakeTap, GuestMemory, Input, ThreadKind, guest_memory};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Widths a vCPU can hand over; 4 (the only valid one for registers) is the most common.
const WIDTHS: [usize; 8] = [4, 4, 4, 1, 2, 8, 3, 0];
/// Status bits of virtio 1.2 §2.1 that the device may show.
const STATUS_BITS: u32 = 0x01 | 0x02 | 0x04 | 0x08 | 0x40 | 0x80;

struct Target {
    vcpu: Confined,
    mem: GuestMemory,
    disk: File,
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
        let disk = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        disk.set_len(64 * 512).unwrap();
        Target {
            vcpu: Confined::start(ThreadKind::Vcpu),
            mem: guest_memory(),
            disk,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| run(t, data));
});

fn run(t: &Target, data: &[u8]) {
    let mut input = Input(data);
    let kind = input.u8();
    let device: Box<dyn VirtioDevice> = if kind & 1 == 0 {
        let file = t.disk.try_clone().unwrap();
        let cache = if kind & 2 != 0 {
            CacheType::Writeback
        } else {
            CacheType::Unsafe
        };
        Box::new(Block::from_disk(Disk::from_file(
            file,
            "fuzz",
            kind & 4 != 0,
            cache,
            64,
        )))
    } else {
        let metrics = Arc::new(NetMetrics::default());
        let mac = MacAddr([0x06, 0, 0, 0, 0, 1]);
        Box::new(Net::new("fuzz", FakeTap::default(), mac, metrics).unwrap())
    };
    let irq = IrqLine::from_eventfd(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut transport = MmioTransport::new(device, t.mem.clone(), irq).unwrap();
    let mut accesses = Vec::new();
    while input.0.len() >= 7 {
        let op = input.u8();
        let offset = u64::from(input.u16() & 0xfff);
        let value = u64::from(input.u32());
        accesses.push((op & 0x80 != 0, offset, WIDTHS[usize::from(op & 7)], value));
    }
    t.vcpu.run(move || {
        for (write, offset, width, value) in accesses {
            let bytes = (value | value << 32).to_le_bytes();
            if write {
                transport.write(offset, &bytes[..width]);
            } else {
                let mut data = [0u8; 8];
                transport.read(offset, &mut data[..width]);
            }
        }
        assert_eq!(
            read(&mut transport, 0x00),
            u32::from_le_bytes(*b"virt"),
            "MagicValue"
        );
        let status = read(&mut transport, 0x70);
        assert_eq!(status & !STATUS_BITS, 0, "Status {status:#x}");
        assert_eq!(status, transport.status());
        reset_and_start(&mut transport);
    });
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut reg = [0u8; 4];
    t.read(offset, &mut reg);
    u32::from_le_bytes(reg)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// Whatever the guest did before, a reset and the driver's usual start-up bring the
/// device back to DRIVER_OK: a guest cannot wedge its device for good.
fn reset_and_start(t: &mut MmioTransport) {
    write(t, 0x70, 0);
    assert_eq!(read(t, 0x70), 0, "Status after reset");
    assert_eq!(read(t, 0x60), 0, "InterruptStatus after reset");
    for status in [1, 3] {
        write(t, 0x70, status);
    }
    for sel in 0..2 {
        write(t, 0x14, sel);
        let offered = read(t, 0x10);
        write(t, 0x24, sel);
        write(t, 0x20, offered);
    }
    write(t, 0x70, 0xb);
    assert_eq!(read(t, 0x70), 0xb, "FEATURES_OK refused after reset");
    for q in 0..8u32 {
        write(t, 0x30, q);
        let max = read(t, 0x34);
        if max == 0 {
            break;
        }
        assert_eq!(read(t, 0x44), 0, "queue {q} ready after reset");
        let base = 0x1000 * q;
        write(t, 0x38, max.min(8));
        for (reg, value) in [(0x80, base), (0x90, base + 0x200), (0xa0, base + 0x400)] {
            write(t, reg, value);
            write(t, reg + 4, 0);
        }
        write(t, 0x44, 1);
        assert_eq!(read(t, 0x44), 1, "queue {q} refused after reset");
    }
    write(t, 0x70, 0xf);
    assert_eq!(read(t, 0x70), 0xf, "DRIVER_OK refused after reset");
    assert!(t.is_activated());
}
