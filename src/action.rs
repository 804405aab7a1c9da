//! The whole control surface: every request the API or the config file can make is one
//! `Action`, applied by the VMM thread, answered with an `ActionResult`.

use std::sync::mpsc::{Receiver, Sender, SyncSender};

use vmm_sys_util::eventfd::EventFd;

use crate::config::snapshot::{CreateSnapshotParams, LoadSnapshotParams};
use crate::config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig, CustomCpuTemplate,
    DriveConfig, DriveUpdate, EntropyDeviceConfig, LoggerConfig, MachineConfig,
    MachineConfigUpdate, MetricsConfig, MmdsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdate,
    SerialConfig, VsockConfig,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// GET /
    GetInstanceInfo,
    /// GET /version
    GetVersion,
    /// GET /machine-config
    GetMachineConfig,
    /// GET /vm/config
    GetVmConfig,
    PutBootSource(BootSourceConfig),
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    /// PUT /cpu-config: a custom CPU template.
    PutCpuConfig(CustomCpuTemplate),
    /// PUT /drives/{id}: the id in the path must equal the body's drive_id (checked by the API).
    PutDrive(DriveConfig),
    PatchDrive(DriveUpdate),
    PutNetworkInterface(NetworkInterfaceConfig),
    /// PATCH /network-interfaces/{id}: rate limiters, after start.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    /// PUT /vsock
    PutVsock(VsockConfig),
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    /// GET /mmds
    GetMmds,
    /// PUT /mmds: replaces the store.
    PutMmds(serde_json::Value),
    /// PATCH /mmds: a JSON merge patch.
    PatchMmds(serde_json::Value),
    PutMmdsConfig(MmdsConfig),
    /// GET /balloon
    GetBalloon,
    /// GET /balloon/statistics
    GetBalloonStats,
    PutBalloon(BalloonConfig),
    /// PATCH /balloon: a new target size (after start).
    PatchBalloon(BalloonUpdate),
    /// PATCH /balloon/statistics: a new polling interval (after start).
    PatchBalloonStats(BalloonStatsUpdate),
    PutEntropy(EntropyDeviceConfig),
    PutSerial(SerialConfig),
    /// PUT /snapshot/create
    CreateSnapshot(CreateSnapshotParams),
    /// PUT /snapshot/load
    LoadSnapshot(LoadSnapshotParams),
}

/// A successful answer: 204 with no body, or 200 with a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionOk {
    NoContent,
    Json(String),
}

/// A refused action: the HTTP status and Firecracker's `fault_message`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionError {
    pub status: u16,
    pub message: String,
}

impl ActionError {
    pub fn bad_request(message: impl Into<String>) -> ActionError {
        ActionError {
            status: 400,
            message: message.into(),
        }
    }
}

pub type ActionResult = Result<ActionOk, ActionError>;

/// One request from the API thread to the VMM thread.
pub struct ActionRequest {
    pub action: Action,
    pub reply: SyncSender<ActionResult>,
}

/// The API thread's end: send an action, wake the VMM thread, wait for the answer.
#[derive(Clone)]
pub struct ActionSender {
    tx: Sender<ActionRequest>,
    wake: std::sync::Arc<EventFd>,
}

impl ActionSender {
    pub fn new(tx: Sender<ActionRequest>, wake: std::sync::Arc<EventFd>) -> ActionSender {
        ActionSender { tx, wake }
    }

    /// Sends `action` and blocks until the VMM thread answers.
    pub fn call(&self, action: Action) -> ActionResult {
        let (reply, rx) = std::sync::mpsc::sync_channel(1);
        let gone = || ActionError {
            status: 500,
            message: "the VMM thread is not running (ember is stopping)".into(),
        };
        self.tx
            .send(ActionRequest { action, reply })
            .map_err(|_| gone())?;
        self.wake.write(1).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

/// The VMM thread's end.
pub struct ActionReceiver {
    pub rx: Receiver<ActionRequest>,
    pub wake: std::sync::Arc<EventFd>,
}

/// Sends the answer to a request (VMM thread). A client that has gone meanwhile is no error.
pub fn answer(reply: &SyncSender<ActionResult>, result: ActionResult) {
    let _ = reply.send(result);
}

pub fn channel() -> std::io::Result<(ActionSender, ActionReceiver)> {
    let wake = std::sync::Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?);
    let (tx, rx) = std::sync::mpsc::channel();
    Ok((
        ActionSender::new(tx, wake.clone()),
        ActionReceiver { rx, wake },
    ))
}
