//! virtio-net requests: RX (frames from a fake TAP into the guest's buffers) or TX (the
//! guest's chains gathered into frames) through virtio-queue, as the event loop runs them,
//! under the VMM thread's filter.
//!
//! Input: queue spec (see `QueueSpec`; flag bit 0 beyond it picks TX), the length of the
//! guest memory image (u16) and the image, then for RX the frames the TAP returns (see
//! `FakeTap::from_input`). Afterwards every chain taken with a valid head index has a used entry.
#![no_main]

use std::sync::Arc;

use ember::devices::virtio::Work;
use ember::devices::virtio::net::{Frames, NetMetrics, QUEUE_SIZE as QUEUE_MAX, RxState};
use ember_fuzz::{
    Confined, FakeTap, GuestMemory, Input, QueueCheck, QueueSpec, ThreadKind, guest_memory,
    load_image,
};
use libfuzzer_sys::fuzz_target;

struct Target {
    vmm: Confined,
    mem: GuestMemory,
}

thread_local! {
    static TARGET: Target = Target {
        vmm: Confined::start(ThreadKind::Vmm),
        mem: guest_memory(),
    };
}

fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| run(t, data));
});

fn run(t: &Target, data: &[u8]) {
    let mut input = Input(data);
    let (spec, flags) = QueueSpec::read(&mut input, QUEUE_MAX);
    let tx = flags & 1 != 0;
    let image_len = usize::from(input.u16());
    load_image(&t.mem, input.bytes(image_len));
    let mut tap = FakeTap::from_input(&mut input);
    let mut queue = spec.build(QUEUE_MAX, &t.mem);
    let check = QueueCheck::before(&spec, &queue, &t.mem);
    let mem = t.mem.clone();
    let (queue, completed) = t.vmm.run(move || {
        let mut frames = Frames::new("fuzz", Arc::new(NetMetrics::default()));
        let mut completed = 0;
        for _ in 0..4 {
            let (used, again) = if tx {
                let (used, work) = frames.process_tx(&mem, &mut queue, &mut tap);
                (used, work == Work::More)
            } else {
                let pass = frames.process_rx(&mem, &mut queue, &mut tap);
                (pass.used, pass.state == RxState::Capped)
            };
            completed += used;
            if !again {
                break;
            }
        }
        (queue, completed)
    });
    check.after(&queue, &t.mem, completed);
}
