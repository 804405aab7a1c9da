//! Devices: plain structs behind the bus trait; they know nothing of vCPUs.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod boot_timer;
