//! virtio-rng requests: whatever the guest left in its descriptor table and rings (fake
//! guest memory with a gap, see ember_fuzz) drained by the `Rng` device, under the VMM
//! thread's filter, as the event loop does after a kick.
//!
//! Input: queue spec (see `QueueSpec`), then the guest memory image from address 0.
//! Afterwards the device's drain ended (no panic, no forbidden system call) and it never
//! reported more work than a ring can hold.
#![no_main]

use std::sync::Arc;

use ember::devices::ioapic::IrqLine;
use ember::devices::virtio::rng::{QUEUE_SIZE, Rng, Unlimited};
use ember::devices::virtio::{VirtioDevice, VirtioInterrupt, Work};
use ember_fuzz::{
    Confined, GuestMemory, Input, NoInterest, QueueSpec, ThreadKind, guest_memory, load_image,
};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

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
    let (spec, _) = QueueSpec::read(&mut input, QUEUE_SIZE);
    load_image(&t.mem, input.rest());
    let queue = spec.build(QUEUE_SIZE, &t.mem);
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(
        EventFd::new(0).unwrap(),
    )));
    let mem = t.mem.clone();
    t.vmm.run(move || {
        let mut dev = Rng::new(Box::new(Unlimited));
        dev.activate(mem, vec![queue], irq, 0).unwrap();
        // A few kicks' worth: a capped drain asks to be run again.
        for _ in 0..4 {
            if dev.process_queue(0, &mut NoInterest) != Work::More {
                break;
            }
        }
    });
}
