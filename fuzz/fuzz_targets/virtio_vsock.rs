//! virtio-vsock packets: the guest's TX chains into the muxer (requests to a host
//! listener, data, credit, shutdowns, resets, packets for nobody) and the muxer's packets
//! into the guest's RX buffers, with host peers that write, and event loop passes between
//! them, as the VMM thread runs them, under its filter. The host streams are registered in
//! a real epoll set through the device's `Interest`, as in ember.
//!
//! Input: flags (bit 0: a host client connects to the device's socket and writes the
//! line that follows, up to 32 bytes after a length byte), the RX queue spec and the TX
//! queue spec (see `QueueSpec`; the TX table and rings start at `TX_BASE`), the
//! length of the guest memory image (u16) and the image, then up to 32 steps of one byte
//! each (see `Step`). Afterwards a reset leaves only the device's three fixed sources in
//! the event loop: no stream closed while still registered, none leaked.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use ember::devices::ioapic::IrqLine;
use ember::devices::virtio::vsock::{QUEUE_SIZE as QUEUE_MAX, Vsock};
use ember::devices::virtio::{VirtioDevice, VirtioInterrupt};
use ember_fuzz::{
    Confined, FuzzLoop, GuestMemory, Input, QueueSpec, ThreadKind, guest_memory, load_image,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The host port the guest can connect to (`<uds>_1024` listens).
const HOST_PORT: u32 = 1024;
const MAX_STEPS: usize = 32;
/// Where the TX queue's table starts: past the RX queue's rings at their largest.
const TX_BASE: u64 = 0x2800;
const RX: usize = 0;
const TX: usize = 1;

struct Target {
    vmm: Confined,
    mem: GuestMemory,
    uds: String,
    host: UnixListener,
}

thread_local! {
    static TARGET: Target = Target::new();
}

impl Target {
    fn new() -> Target {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock").to_string_lossy().into_owned();
        let host_path = format!("{uds}_{HOST_PORT}");
        let _ = std::fs::remove_file(&host_path);
        let host = UnixListener::bind(&host_path).unwrap();
        host.set_nonblocking(true).unwrap();
        Target {
            vmm: Confined::start(ThreadKind::Vmm),
            mem: guest_memory(),
            uds,
            host,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| run(t, data));
});

fn run(t: &Target, data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let line_len = usize::from(input.u8() % 33);
    let line = input.bytes(line_len).to_vec();
    let (rx_spec, _) = QueueSpec::read(&mut input, QUEUE_MAX);
    let (tx_spec, _) = QueueSpec::read(&mut input, QUEUE_MAX);
    let image_len = usize::from(input.u16());
    load_image(&t.mem, input.bytes(image_len));
    let steps: Vec<u8> = input.rest().iter().take(MAX_STEPS).copied().collect();

    // Built on this (unconfined) thread, as ember builds devices before the vCPUs start.
    let mut dev = Vsock::new(3, &t.uds).unwrap();
    let rx = rx_spec.build(QUEUE_MAX, &t.mem);
    let tx = moved(tx_spec.build(QUEUE_MAX, &t.mem), &tx_spec, &t.mem);
    let event = Queue::new(QUEUE_MAX).unwrap();
    let irq = IrqLine::from_eventfd(EventFd::new(EFD_NONBLOCK).unwrap());
    dev.activate(
        t.mem.clone(),
        vec![rx, tx, event],
        Arc::new(VirtioInterrupt::new(irq)),
        1 << 32,
    )
    .unwrap();
    let client = if flags & 1 != 0 {
        let mut c = UnixStream::connect(&t.uds).unwrap();
        c.set_nonblocking(true).unwrap();
        let _ = c.write(&line);
        Some(c)
    } else {
        None
    };
    let host = t.host.try_clone().unwrap();
    // ember creates its event loop before the VMM thread's filter is installed.
    let mut lp = FuzzLoop::new(dev.event_sources());

    t.vmm.run(move || {
        let mut peers: Vec<UnixStream> = client.into_iter().collect();
        for step in steps {
            match Step::from(step) {
                Step::Kick(q) => {
                    dev.process_queue(q, &mut lp);
                }
                Step::Loop => {
                    for (source, events) in lp.wait(0) {
                        dev.process_event(source, events, &mut lp);
                    }
                }
                Step::HostWrite(n) => {
                    accept_all(&host, &mut peers);
                    for p in &mut peers {
                        let _ = p.write(&[0x5a; 4096][..n]);
                    }
                }
                Step::HostRead => {
                    let mut buf = [0u8; 4096];
                    for p in &mut peers {
                        let _ = p.read(&mut buf);
                    }
                }
                Step::HostClose => {
                    peers.pop();
                }
                Step::Reset => dev.reset(),
            }
        }
        // The host peers go, then a reset and a few passes of the loop close every
        // connection (and every host connection that was still writing its CONNECT line,
        // which a reset keeps, sees its end): only the listener, the timer and the wake
        // eventfd stay registered.
        drop(peers);
        dev.reset();
        for _ in 0..4 {
            for (source, events) in lp.wait(0) {
                dev.process_event(source, events, &mut lp);
            }
        }
        dev.process_queue(RX, &mut lp);
        assert_eq!(lp.fds().len(), 3, "event loop fds after a reset");
        drop(dev);
    });
    // Connections the guest asked for and no step accepted.
    while let Ok((s, _)) = t.host.accept() {
        drop(s);
    }
}

enum Step {
    Kick(usize),
    Loop,
    HostWrite(usize),
    HostRead,
    HostClose,
    Reset,
}

impl From<u8> for Step {
    fn from(b: u8) -> Step {
        match b % 16 {
            0..=4 => Step::Kick(TX),
            5..=7 => Step::Kick(RX),
            8..=10 => Step::Loop,
            11 => Step::HostWrite(1 + usize::from(b >> 4) * 256),
            12 => Step::HostRead,
            13 => Step::HostClose,
            14 => Step::Reset,
            _ => Step::Kick(3 + usize::from(b >> 4)),
        }
    }
}

fn accept_all(host: &UnixListener, peers: &mut Vec<UnixStream>) {
    while let Ok((s, _)) = host.accept() {
        let _ = s.set_nonblocking(true);
        peers.push(s);
    }
}

/// The same queue with its table and rings from `TX_BASE`, so RX and TX do not share them.
fn moved(mut q: Queue, spec: &QueueSpec, mem: &GuestMemory) -> Queue {
    q.set_ready(false);
    q.try_set_desc_table_address(GuestAddress(TX_BASE)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(TX_BASE + spec.avail_ring()))
        .unwrap();
    q.try_set_used_ring_address(GuestAddress(TX_BASE + spec.used_ring()))
        .unwrap();
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}
