//! The boot-timer device (Firecracker's): the guest writes the magic value 123 at offset 0
//! when it considers itself booted; ember records and logs the time since process start.

use super::bus::BusDevice;
use crate::metrics::{METRICS, timeline_mark_once};

const MAGIC_BOOT_COMPLETE: u8 = 123;

#[derive(Default)]
pub struct BootTimer;

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC_BOOT_COMPLETE) {
            timeline_mark_once(&METRICS.boot_timeline_us.guest_boot_timer);
            let us = METRICS
                .boot_timeline_us
                .guest_boot_timer
                .load(std::sync::atomic::Ordering::Relaxed);
            log::info!(
                "Guest-boot-time = {us:>6} us {:>4} ms (since process start)",
                us / 1000
            );
        }
    }
}
