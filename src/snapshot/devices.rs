//! Device state in a snapshot: plain serde types, one per device, validated when they are
//! put back (the state file is hostile input, so a restored device checks every field a
//! guest could not have produced).

use serde::{Deserialize, Serialize};

/// ember's IOAPIC: the register select, the ID and every redirection entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicState {
    pub ioregsel: u32,
    pub id: u32,
    pub redirection: Vec<u64>,
}

/// The 8250 UART (vm-superio's `SerialState`, field for field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> SerialState {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The i8042 controller and its keyboard buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    pub buf: Vec<u8>,
    pub status: u8,
    pub ctr: u8,
    pub outp: u8,
    pub pending: Option<u8>,
}

/// One queue as the driver programmed it through the transport's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfigState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub bad_size: bool,
}

/// Where a running device is in a queue (virtio-queue's `QueueState` indexes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueProgress {
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

/// A virtio-mmio transport and, if the driver started it, its device's queue progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioState {
    /// The virtio device ID (2 block, 1 net): checked against the device rebuilt from the
    /// configuration.
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfigState>,
    pub status: u32,
    pub needs_reset: bool,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub activated: bool,
    /// One per queue when activated, empty otherwise.
    pub progress: Vec<QueueProgress>,
    /// What the device itself keeps beyond its queues (rate limiter buckets, the
    /// balloon's sizes); absent for devices that keep nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceState>,
}

/// Device-specific state, one variant per kind of device that keeps any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DeviceState {
    /// virtio-blk: its drive's rate limiter.
    Block {
        limiter: LimiterState,
    },
    /// virtio-net: its RX and TX rate limiters.
    Net {
        rx: LimiterState,
        tx: LimiterState,
    },
    /// virtio-rng: its rate limiter, if one is configured.
    Rng {
        limiter: Option<LimiterState>,
    },
    Balloon(BalloonDeviceState),
    /// virtio-vsock keeps no state of its own: connections are closed by a restore (the
    /// driver hears of it through the transport-reset event) and the listener is bound
    /// again, at `vsock_override`'s path if one is given.
    Vsock {},
}

/// One token bucket's level: what Firecracker's snapshots keep too. The bucket's size,
/// burst and refill time come from the configuration in the same state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketState {
    /// Tokens in the bucket.
    pub budget: u64,
    /// What is left of the one-time burst.
    pub one_time_burst: u64,
    /// Nanoseconds since the bucket last refilled: the part of a token accumulated.
    pub elapsed_ns: u64,
}

/// A rate limiter's buckets; `None` where the configuration has no such bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimiterState {
    pub bandwidth: Option<BucketState>,
    pub ops: Option<BucketState>,
}

/// The balloon beyond its configuration (which holds the target and the statistics
/// interval as last set through the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonDeviceState {
    /// The target in 4 KiB pages, as the driver reads it in the config space.
    pub target_pages: u32,
    /// The driver's `actual` field.
    pub actual_pages: u32,
    /// The statistics buffer the driver last filled, held until the next request.
    pub stats_head: Option<u16>,
    /// The last statistics the guest reported, as (tag, value) pairs.
    pub stats: Vec<(u16, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub ioapic: IoapicState,
    pub serial: Option<SerialState>,
    pub i8042: I8042State,
    /// In slot order: drives first, then network interfaces, as the builder creates them.
    pub virtio: Vec<VirtioState>,
}
