//! Applies `Action`s on the VMM thread: the pre-boot configuration, InstanceStart, and
//! the running VM's controls. The API and the config file both come through here.

use std::sync::{Arc, Mutex};

use crate::action::{Action, ActionError, ActionOk, ActionResult};
use crate::builder;
use crate::config::{self, CpuConfigSource, MachineConfig, StaticCpuTemplate, VmConfig};
use crate::devices::manager::DeviceKind;
use crate::metrics::{METRICS, timeline_mark};
use crate::mmds::{self, Mmds, MmdsError, SharedMmds};
use crate::vcpu::{ExitSignal, VmExit};
use crate::vmm::{EventLoop, Vmm};

/// Firecracker's wording, so SDKs that match on it keep working.
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const NO_BALLOON: &str = "No balloon device found.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    NotStarted,
    Running,
    Paused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

pub struct Controller {
    pub id: String,
    pub config: VmConfig,
    pub vmm: Option<Vmm>,
    state: State,
    exit: Arc<ExitSignal>,
    boot_timer: bool,
    /// Files a jail imported, as (path inside the jail, path the user gave): GET
    /// /vm/config reports paths as the user gave them.
    pub path_aliases: Vec<(String, String)>,
    /// The metadata store: the API's, and the MMDS-enabled interfaces' once started.
    pub mmds: SharedMmds,
    /// `--profile-boot`: set up at start, taken by InstanceStart.
    pub profile: Option<crate::profile::ProfileSetup>,
    /// The running boot profile, finished (its report written) at shutdown if no marker
    /// or time limit ended it before.
    profiler: Option<Arc<Mutex<crate::profile::BootProfiler>>>,
    /// The VM made ahead of InstanceStart or a snapshot load (`prepare`).
    prepared: Option<builder::Prepared>,
}

/// Firecracker opens the files a PUT names when it is applied, so a wrong path fails that
/// request rather than InstanceStart; ember checks the same way (and the builder opens
/// them again at InstanceStart).
fn check_openable(what: &str, path: &str, write: bool) -> Result<(), ActionError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map(drop)
        .map_err(|e| {
            ActionError::bad_request(format!("The {what} file {path} cannot be opened: {e}"))
        })
}

fn seccomp_error(e: crate::seccomp::SeccompError) -> builder::BuildError {
    builder::BuildError::Io(std::io::Error::other(e.to_string()))
}

fn json(v: serde_json::Value) -> ActionResult {
    Ok(ActionOk::Json(v.to_string()))
}

fn bad(e: impl std::fmt::Display) -> ActionError {
    ActionError::bad_request(e.to_string())
}

/// Firecracker answers a store that would exceed `--mmds-size-limit` with 413.
fn mmds_error(e: MmdsError) -> ActionError {
    match e {
        MmdsError::DataStoreLimitExceeded => ActionError {
            status: 413,
            message: format!("MMDS limit exceeded error: {e}"),
        },
        e => ActionError::bad_request(format!("MMDS error: {e}")),
    }
}

impl Controller {
    pub fn new(
        id: String,
        config: VmConfig,
        exit: Arc<ExitSignal>,
        boot_timer: bool,
    ) -> Controller {
        Controller {
            id,
            config,
            vmm: None,
            state: State::NotStarted,
            exit,
            boot_timer,
            path_aliases: Vec::new(),
            mmds: Mmds::shared(crate::api::DEFAULT_MAX_PAYLOAD),
            profile: None,
            profiler: None,
            prepared: None,
        }
    }

    /// Everything a clean stop owes: device data made durable, the terminal restored.
    pub fn shutdown(&mut self) {
        if let Some(vmm) = &self.vmm {
            vmm.flush();
        }
        if let Some(p) = &self.profiler {
            p.lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish("the VM stopped");
        }
        crate::devices::serial::restore_terminal();
    }

    /// The configuration with jail-imported paths shown as the user gave them.
    fn reported_config(&self) -> VmConfig {
        let mut c = self.config.clone();
        let unalias = |p: &mut String| {
            if let Some((_, host)) = self.path_aliases.iter().find(|(j, _)| j == p) {
                p.clone_from(host);
            }
        };
        unalias(&mut c.boot_source.kernel_image_path);
        if let Some(p) = c.boot_source.initrd_path.as_mut() {
            unalias(p);
        }
        for d in &mut c.drives {
            unalias(&mut d.path_on_host);
        }
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    fn pre_boot(&self) -> Result<(), ActionError> {
        match self.state {
            State::NotStarted => Ok(()),
            _ => Err(ActionError::bad_request(NOT_AFTER_START)),
        }
    }

    fn running(&self) -> Result<&Vmm, ActionError> {
        self.vmm
            .as_ref()
            .ok_or_else(|| ActionError::bad_request(NOT_BEFORE_START))
    }

    /// Makes the VM and asks KVM for its CPUID now, while the host agent is still
    /// configuring through the API, so that InstanceStart (or a snapshot load) does not
    /// wait for them. A failure is only logged: the start then makes its own and reports
    /// the error there.
    pub fn prepare(&mut self) {
        if self.state != State::NotStarted || self.prepared.is_some() {
            return;
        }
        let started = std::time::Instant::now();
        match builder::Prepared::new() {
            Ok(p) => {
                self.prepared = Some(p);
                log::info!(
                    "VM prepared ahead of InstanceStart (KVM_CREATE_VM, supported CPUID) in {} us",
                    started.elapsed().as_micros()
                );
            }
            Err(e) => log::debug!("cannot prepare the VM ahead of InstanceStart: {e}"),
        }
    }

    /// Builds and starts the VM from the current configuration.
    pub fn start_instance(
        &mut self,
        event_loop: &mut EventLoop,
    ) -> Result<(), builder::BuildError> {
        timeline_mark(&METRICS.boot_timeline_us.instance_start);
        if let Some(c) = &self.config.mmds_config {
            mmds::lock(&self.mmds).configure(c.version, c.imds_compat);
        }
        let opts = builder::BuildOptions {
            boot_timer: self.boot_timer,
            mmds: self.mmds.clone(),
        };
        let built = builder::build(&self.config, &opts, self.exit.clone(), self.prepared.take())?;
        // Before any vCPU thread exists: a filter that cannot be installed fails the start
        // here, with no guest running.
        crate::seccomp::check().map_err(seccomp_error)?;
        crate::devices::serial::stdin_raw_mode();
        if let (Some(setup), Some(boot_vcpu)) = (self.profile.take(), built.controls.first()) {
            let p = crate::profile::BootProfiler::new(
                setup,
                &self.config.boot_source.kernel_image_path,
                built.mem.clone(),
                boot_vcpu.clone(),
            )?;
            let p = Arc::new(Mutex::new(p));
            let sub: crate::vmm::Subscriber = p.clone();
            event_manager::SubscriberOps::add_subscriber(event_loop, sub);
            self.profiler = Some(p);
        }
        let vmm = Vmm::start(built, event_loop).map_err(builder::BuildError::Io)?;
        self.vmm = Some(vmm);
        self.state = State::Running;
        // Every other thread is running with its own filter: the VMM thread's comes last,
        // as filters are inherited by threads started later. Should it still fail, the
        // guest is stopped, so the state and the VM agree.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vmm) {
            self.exit.stop(VmExit::VmmError(e.to_string()));
            return Err(seccomp_error(e));
        }
        Ok(())
    }

    /// Restores a VM from a snapshot in this (pre-boot) process. On error nothing has
    /// changed: the controller is still pre-boot and may be configured or loaded again.
    pub fn load_snapshot(
        &mut self,
        params: &crate::config::snapshot::LoadSnapshotParams,
        event_loop: &mut EventLoop,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        timeline_mark(&METRICS.boot_timeline_us.instance_start);
        let state = crate::snapshot::read_state(&params.snapshot_path)?;
        // The snapshot keeps the interface's mmds-config, not the store (as Firecracker):
        // the restored VM answers from this process's store (`--metadata`, `PUT /mmds`).
        if let Some(c) = &state.config.mmds_config {
            mmds::lock(&self.mmds).configure(c.version, c.imds_compat);
        }
        let opts = builder::BuildOptions {
            boot_timer: self.boot_timer,
            mmds: self.mmds.clone(),
        };
        let (built, mut config) = crate::snapshot::restore(
            state,
            params,
            &opts,
            self.exit.clone(),
            self.prepared.take(),
        )?;
        timeline_mark(&METRICS.boot_timeline_us.vm_built);
        crate::devices::serial::stdin_raw_mode();
        let vmm = Vmm::start_with(built, event_loop, !params.resume_vm)
            .map_err(|e| crate::snapshot::SnapshotError::Build(builder::BuildError::Io(e)))?;
        crate::seccomp::install(crate::seccomp::ThreadKind::Vmm).map_err(|e| {
            crate::snapshot::SnapshotError::Build(builder::BuildError::Io(std::io::Error::other(
                e.to_string(),
            )))
        })?;
        config.logger = self.config.logger.take();
        config.metrics = self.config.metrics.take();
        self.config = config;
        self.vmm = Some(vmm);
        self.state = if params.resume_vm {
            State::Running
        } else {
            State::Paused
        };
        log::info!(
            "restored from {} ({})",
            params.snapshot_path,
            if params.resume_vm {
                "running"
            } else {
                "paused"
            }
        );
        Ok(())
    }

    /// Takes a machine configuration whose `cpu_template` says what to do with the CPU
    /// template: absent keeps whatever is set (static or custom), "None" clears it, a
    /// name sets that static template in place of any custom one. A template this host
    /// cannot take is refused here rather than at InstanceStart.
    fn set_machine_config(&mut self, mut m: MachineConfig) -> ActionResult {
        let mut candidate = self.config.clone();
        if m.cpu_template.is_some() {
            candidate.cpu_config = None;
        }
        m.cpu_template = m.static_template();
        candidate.machine_config = m;
        crate::vm::cpu_template::check_host(&candidate).map_err(bad)?;
        self.config = candidate;
        Ok(ActionOk::NoContent)
    }

    pub fn handle(&mut self, action: Action, event_loop: &mut EventLoop) -> ActionResult {
        match action {
            Action::GetInstanceInfo => json(serde_json::json!({
                "id": self.id,
                "state": self.state.as_str(),
                "vmm_version": crate::FIRECRACKER_API_VERSION,
                "app_name": "ember",
                "ember_version": crate::EMBER_VERSION,
            })),
            Action::GetVersion => json(serde_json::json!({
                "firecracker_version": crate::FIRECRACKER_API_VERSION,
                "ember_version": crate::EMBER_VERSION,
            })),
            Action::GetMachineConfig => Ok(ActionOk::Json(
                serde_json::to_string(&self.config.machine_config).map_err(bad)?,
            )),
            Action::GetVmConfig => Ok(ActionOk::Json(self.reported_config().to_json())),
            Action::PutBootSource(b) => {
                self.pre_boot()?;
                b.validate().map_err(bad)?;
                check_openable("kernel", &b.kernel_image_path, false)?;
                if let Some(initrd) = &b.initrd_path {
                    check_openable("initrd", initrd, false)?;
                }
                self.config.boot_source = b;
                Ok(ActionOk::NoContent)
            }
            Action::PutMachineConfig(mut m) => {
                self.pre_boot()?;
                m.validate().map_err(bad)?;
                // As in Firecracker, a PUT without cpu_template keeps the template set
                // before (static or custom); "None" clears it.
                if m.cpu_template.is_none() {
                    m.cpu_template = self.config.machine_config.cpu_template;
                }
                self.set_machine_config(m)
            }
            Action::PatchMachineConfig(u) => {
                self.pre_boot()?;
                if u.is_empty() {
                    return Err(ActionError::bad_request(
                        "PATCH /machine-config needs at least one field to change",
                    ));
                }
                let mut m = u.apply(&self.config.machine_config).map_err(bad)?;
                // apply() turned "None" into no template; say it was asked for.
                if u.cpu_template.is_some() && m.cpu_template.is_none() {
                    m.cpu_template = Some(StaticCpuTemplate::None);
                }
                self.set_machine_config(m)
            }
            Action::PutCpuConfig(t) => {
                self.pre_boot()?;
                let mut candidate = self.config.clone();
                candidate.cpu_config = Some(CpuConfigSource::Template(t));
                candidate.machine_config.cpu_template = None;
                crate::vm::cpu_template::check_host(&candidate).map_err(bad)?;
                self.config = candidate;
                Ok(ActionOk::NoContent)
            }
            Action::PutDrive(d) => {
                self.pre_boot()?;
                d.validate().map_err(bad)?;
                check_openable("drive", &d.path_on_host, !d.is_read_only)?;
                if d.io_engine == config::IoEngine::Async {
                    // Firecracker sets the drive's io_uring up at this PUT, so a host that
                    // cannot run one is refused here, not at InstanceStart.
                    crate::devices::virtio::block::Disk::open(&d)
                        .map(drop)
                        .map_err(bad)?;
                }
                config::drive::insert_drive(&mut self.config.drives, d).map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::PatchDrive(u) => {
                let vmm = self.running()?;
                u.validate().map_err(bad)?;
                // Check the id before touching the device, so the config and the VM agree.
                let mut drives = self.config.drives.clone();
                u.apply(&mut drives).map_err(bad)?;
                if let Some(path) = &u.path_on_host {
                    vmm.devices.update_drive(&u.drive_id, path).map_err(bad)?;
                }
                if u.rate_limiter.is_some() {
                    let new = drives
                        .iter()
                        .find(|d| d.drive_id == u.drive_id)
                        .map(|d| d.rate_limiter.unwrap_or_default());
                    vmm.devices
                        .update_rate_limiters(DeviceKind::VirtioBlock, &u.drive_id, &[new])
                        .map_err(bad)?;
                }
                self.config.drives = drives;
                Ok(ActionOk::NoContent)
            }
            Action::PatchNetworkInterface(u) => {
                let vmm = self.running()?;
                let mut ifaces = self.config.network_interfaces.clone();
                u.apply(&mut ifaces).map_err(bad)?;
                let iface = ifaces.iter().find(|i| i.iface_id == u.iface_id);
                // Only the limiters the request names change (and start full).
                let pick = |asked: bool, cfg: Option<config::RateLimiterConfig>| {
                    asked.then(|| cfg.unwrap_or_default())
                };
                let new = [
                    pick(
                        u.rx_rate_limiter.is_some(),
                        iface.and_then(|i| i.rx_rate_limiter),
                    ),
                    pick(
                        u.tx_rate_limiter.is_some(),
                        iface.and_then(|i| i.tx_rate_limiter),
                    ),
                ];
                vmm.devices
                    .update_rate_limiters(DeviceKind::VirtioNet, &u.iface_id, &new)
                    .map_err(bad)?;
                self.config.network_interfaces = ifaces;
                Ok(ActionOk::NoContent)
            }
            Action::PutNetworkInterface(n) => {
                self.pre_boot()?;
                config::net::insert_network_interface(&mut self.config.network_interfaces, n)
                    .map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::PutLogger(l) => {
                self.pre_boot()?;
                l.validate().map_err(bad)?;
                crate::logger::apply_config(&l).map_err(bad)?;
                self.config.logger = Some(l);
                Ok(ActionOk::NoContent)
            }
            Action::PutVsock(v) => {
                self.pre_boot()?;
                v.validate().map_err(bad)?;
                v.check_host_path().map_err(bad)?;
                self.config.vsock = Some(v);
                Ok(ActionOk::NoContent)
            }
            Action::PutMetrics(m) => {
                self.pre_boot()?;
                m.validate().map_err(bad)?;
                m.apply(&self.id).map_err(bad)?;
                self.config.metrics = Some(m);
                Ok(ActionOk::NoContent)
            }
            Action::InstanceStart => {
                self.pre_boot()?;
                if self.config.boot_source.kernel_image_path.is_empty() {
                    return Err(ActionError::bad_request(
                        "Cannot start microvm without kernel configuration: PUT /boot-source first.",
                    ));
                }
                self.config.validate().map_err(bad)?;
                self.start_instance(event_loop).map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::SendCtrlAltDel => {
                let vmm = self.running()?;
                if vmm.devices.send_ctrl_alt_del() {
                    Ok(ActionOk::NoContent)
                } else {
                    Err(ActionError::bad_request(
                        "the guest's keyboard buffer is full: it has not read earlier keys",
                    ))
                }
            }
            Action::FlushMetrics => {
                crate::metrics::flush().map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::Pause => {
                let vmm = self.running()?;
                if self.state == State::Running {
                    vmm.pause();
                    self.state = State::Paused;
                }
                Ok(ActionOk::NoContent)
            }
            Action::GetBalloon => match &self.config.balloon {
                Some(b) => Ok(ActionOk::Json(serde_json::to_string(b).map_err(bad)?)),
                None => Err(ActionError::bad_request(NO_BALLOON)),
            },
            Action::GetBalloonStats => {
                let vmm = self.running()?;
                let state = vmm.devices.balloon().ok_or_else(|| bad(NO_BALLOON))?;
                let report = state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .stats_report()
                    .map_err(bad)?;
                Ok(ActionOk::Json(serde_json::to_string(&report).map_err(bad)?))
            }
            Action::PutBalloon(b) => {
                self.pre_boot()?;
                b.validate(self.config.machine_config.mem_size_mib as u64)
                    .map_err(bad)?;
                self.config.balloon = Some(b);
                Ok(ActionOk::NoContent)
            }
            Action::PatchBalloon(u) => {
                let vmm = self.running()?;
                let state = vmm.devices.balloon().ok_or_else(|| bad(NO_BALLOON))?;
                if config::balloon::check_amount(
                    u.amount_mib,
                    self.config.machine_config.mem_size_mib as u64,
                )
                .is_err()
                {
                    return Err(bad("Amount of pages requested is too large."));
                }
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_target_mib(u.amount_mib);
                vmm.devices.balloon_config_changed();
                if let Some(b) = self.config.balloon.as_mut() {
                    b.amount_mib = u.amount_mib;
                }
                Ok(ActionOk::NoContent)
            }
            Action::PatchBalloonStats(u) => {
                let vmm = self.running()?;
                let state = vmm.devices.balloon().ok_or_else(|| bad(NO_BALLOON))?;
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .set_stats_interval(u.stats_polling_interval_s)
                    .map_err(bad)?;
                if let Some(b) = self.config.balloon.as_mut() {
                    b.stats_polling_interval_s = u.stats_polling_interval_s;
                }
                Ok(ActionOk::NoContent)
            }
            Action::PutEntropy(e) => {
                self.pre_boot()?;
                e.validate().map_err(bad)?;
                self.config.entropy = Some(e);
                Ok(ActionOk::NoContent)
            }
            Action::PutSerial(s) => {
                self.pre_boot()?;
                s.validate().map_err(bad)?;
                self.config.serial = Some(s);
                Ok(ActionOk::NoContent)
            }
            Action::CreateSnapshot(p) => {
                let vmm = self.running()?;
                if self.state != State::Paused {
                    return Err(ActionError::bad_request(
                        "Cannot create a snapshot of a running microVM: pause it first (PATCH /vm {\"state\": \"Paused\"}).",
                    ));
                }
                p.validate().map_err(bad)?;
                crate::snapshot::create(vmm, &self.config, &p).map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::LoadSnapshot(p) => {
                self.pre_boot()?;
                let c = &self.config;
                if !c.boot_source.kernel_image_path.is_empty()
                    || !c.drives.is_empty()
                    || !c.network_interfaces.is_empty()
                    || c.machine_config != VmConfig::default().machine_config
                    || c.cpu_config.is_some()
                {
                    return Err(ActionError::bad_request(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    ));
                }
                p.validate().map_err(bad)?;
                self.load_snapshot(&p, event_loop).map_err(bad)?;
                Ok(ActionOk::NoContent)
            }
            Action::Resume => {
                let vmm = self.running()?;
                if self.state == State::Paused {
                    vmm.resume();
                    self.state = State::Running;
                }
                Ok(ActionOk::NoContent)
            }
            Action::GetMmds => Ok(ActionOk::Json(mmds::lock(&self.mmds).data().to_string())),
            Action::PutMmds(v) => {
                mmds::lock(&self.mmds).put(v).map_err(mmds_error)?;
                Ok(ActionOk::NoContent)
            }
            Action::PatchMmds(v) => {
                mmds::lock(&self.mmds).patch(&v).map_err(mmds_error)?;
                Ok(ActionOk::NoContent)
            }
            Action::PutMmdsConfig(c) => {
                self.pre_boot()?;
                c.validate(&self.config.network_interfaces).map_err(bad)?;
                mmds::lock(&self.mmds).configure(c.version, c.imds_compat);
                self.config.mmds_config = Some(c);
                Ok(ActionOk::NoContent)
            }
        }
    }
}
