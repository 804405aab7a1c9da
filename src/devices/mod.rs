//! Devices: plain structs behind the bus trait; they know nothing of vCPUs.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod ioapic;
pub mod manager;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;
