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
