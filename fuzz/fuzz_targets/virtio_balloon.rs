//! virtio-balloon requests: whatever the guest left in its descriptor table and rings
//! (fake guest memory with a gap, see ember_fuzz) drained by the `Balloon` device on one
//! of its queues (inflate, deflate, statistics, free page reporting), under the VMM
//! thread's filter, as the event loop does after a kick; then a statistics request, as
//! the timer makes one.
//!
//! Input: queue spec (see `QueueSpec`; flag bits 0-1 beyond it pick the queue), then the
//! guest memory image from address 0. Page numbers the guest names are released with
//! madvise inside the fake guest memory only; afterwards the balloon's report still
//! answers and the statistics it holds are only those the guest sent.
#![no_main]

use std::sync::Arc;

use ember::config::BalloonConfig;
use ember::devices::ioapic::IrqLine;
use ember::devices::virtio::balloon::{Balloon, QUEUE_SIZE};
use ember::devices::virtio::{EventSet, VirtioDevice, VirtioInterrupt, Work};
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
    let (spec, flags) = QueueSpec::read(&mut input, QUEUE_SIZE);
    let index = usize::from(flags & 3);
    load_image(&t.mem, input.rest());
    let cfg = BalloonConfig {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_hinting: false,
        free_page_reporting: true,
    };
    // Every queue on the same rings: only the one picked is kicked.
    let queues = (0..4).map(|_| spec.build(QUEUE_SIZE, &t.mem)).collect();
    let irq = Arc::new(VirtioInterrupt::new(IrqLine::from_eventfd(
        EventFd::new(0).unwrap(),
    )));
    let mem = t.mem.clone();
    // Built on the VMM thread's side of the filter, as at InstanceStart: the timer is
    // created before the filters in ember, so here it is made before the job.
    let mut dev = Balloon::new(&cfg).unwrap();
    let state = dev.state();
    t.vmm.run(move || {
        dev.activate(mem, queues, irq, 0).unwrap();
        for _ in 0..4 {
            if dev.process_queue(index, &mut NoInterest) != Work::More {
                break;
            }
        }
        // The timer's request: hands back the statistics buffer, if one is held.
        dev.process_event(0, EventSet::IN, &mut NoInterest);
    });
    let report = state
        .lock()
        .unwrap()
        .stats_report()
        .expect("statistics were enabled");
    assert_eq!(report.target_pages, 256);
}
