//! Snapshots: the state of a paused VM written to a state file and a memory file, and a
//! VM rebuilt from them in a fresh ember process.
//!
//! `format` is the state file's framing (magic, versions, checksum), `vcpu` and
//! `devices` what each part of the VM contributes, `memory` the memory file.

pub mod devices;
pub mod format;
pub mod memory;
pub mod merge;
pub mod uffd;
pub mod vcpu;

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{KVM_CLOCK_REALTIME, KVM_MAX_CPUID_ENTRIES, kvm_clock_data};
use serde::{Deserialize, Serialize};

use crate::builder::{self, BuildError, BuildOptions, BuiltVm};
use crate::config::snapshot::{
    CreateSnapshotParams, LoadSnapshotParams, MemBackendType, SnapshotType,
};
use crate::config::{HugePages, VmConfig};
use crate::vcpu::{ExitSignal, Vcpu, VcpuControl};
use crate::vmm::Vmm;
use devices::DevicesState;
use format::pod;
use memory::RegionState;
use vcpu::VcpuState;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Everything a snapshot holds besides guest memory.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicrovmState {
    /// The configuration the VM was built from (generated MACs filled in; no logger or
    /// metrics: those belong to the process, not the VM).
    pub config: VmConfig,
    pub memory: Vec<RegionState>,
    #[serde(with = "pod")]
    pub clock: kvm_clock_data,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} the state file {path}: {source}")]
    StateIo {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    Format {
        path: String,
        source: format::FormatError,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryFileError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuStateError),
    #[error("vCPU {0} did not answer the state request (is it stuck?)")]
    VcpuTimeout(usize),
    #[error("KVM_GET_CLOCK: {0}")]
    GetClock(kvm_ioctls::Error),
    #[error("KVM_SET_CLOCK: {0}")]
    SetClock(kvm_ioctls::Error),
    #[error("the snapshot is inconsistent: {0}")]
    Invalid(String),
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{0}")]
    Unsupported(String),
}

/// Reads one vCPU's state on its own (paused) thread.
fn save_vcpu(
    control: &VcpuControl,
    index: usize,
    msr_list: &Arc<Vec<u32>>,
) -> Result<VcpuState, SnapshotError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let msrs = msr_list.clone();
    let task = move |fd: &mut kvm_ioctls::VcpuFd| {
        let _ = tx.send(vcpu::save(fd, index as u8, &msrs));
    };
    // A vCPU asked to pause parks at its next exit; give it a moment if it has not yet.
    let mut task: crate::vcpu::VcpuTask = Box::new(task);
    let mut sent = false;
    for _ in 0..500 {
        match control.run_task(task) {
            Ok(()) => {
                sent = true;
                break;
            }
            Err(t) => {
                task = t;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    if !sent {
        return Err(SnapshotError::VcpuTimeout(index));
    }
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| SnapshotError::VcpuTimeout(index))?
        .map_err(SnapshotError::Vcpu)
}

/// Takes a snapshot of a paused VM: state file and memory file.
pub fn create(
    vmm: &Vmm,
    config: &VmConfig,
    params: &CreateSnapshotParams,
) -> Result<(), SnapshotError> {
    let started = std::time::Instant::now();
    // Requests the guest made available complete now, so none is in flight in the file.
    vmm.devices.drain_virtio();
    let mut vcpus = Vec::with_capacity(vmm.controls.len());
    for (i, c) in vmm.controls.iter().enumerate() {
        vcpus.push(save_vcpu(c, i, &vmm.msr_list)?);
    }
    let clock = vmm.vm.get_clock().map_err(SnapshotError::GetClock)?;
    let mut config = config.clone();
    config.logger = None;
    config.metrics = None;
    // A generated MAC must stay the guest's after a restore.
    for (id, mac) in vmm.devices.net_macs() {
        if let Some(iface) = config
            .network_interfaces
            .iter_mut()
            .find(|i| i.iface_id == id)
        {
            iface.guest_mac = Some(crate::config::MacAddr(mac));
        }
    }
    let devices = vmm.devices.save_state();
    let layout = memory::layout_for(config.machine_config.mem_size_mib as u64);
    let state = MicrovmState {
        config,
        memory: layout.clone(),
        clock,
        vcpus,
        devices,
    };
    let bytes = format::encode(&state).map_err(|source| SnapshotError::Format {
        path: params.snapshot_path.clone(),
        source,
    })?;
    match params.snapshot_type {
        SnapshotType::Full => {
            memory::save_full(&vmm.mem, &layout, &params.mem_file_path)?;
            let track = state.config.machine_config.track_dirty_pages;
            memory::reset_dirty(&vmm.vm, &vmm.mem, &layout, track);
        }
        SnapshotType::Diff => {
            if !state.config.machine_config.track_dirty_pages {
                return Err(SnapshotError::Unsupported(
                    "a Diff snapshot needs dirty page tracking: set machine-config track_dirty_pages (or track_dirty_pages at load)".into(),
                ));
            }
            let pages = memory::save_diff(&vmm.vm, &vmm.mem, &layout, &params.mem_file_path)?;
            log::info!("diff snapshot: {pages} dirty pages");
        }
    }
    std::fs::write(&params.snapshot_path, &bytes).map_err(|source| SnapshotError::StateIo {
        what: "write",
        path: params.snapshot_path.clone(),
        source,
    })?;
    log::info!(
        "snapshot {} ({} bytes of state) and {} written in {} us",
        params.snapshot_path,
        bytes.len(),
        params.mem_file_path,
        started.elapsed().as_micros()
    );
    Ok(())
}

/// Reads and checks a state file.
pub fn read_state(path: &str) -> Result<MicrovmState, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::StateIo {
        what: "read",
        path: path.to_string(),
        source,
    })?;
    format::decode(&bytes).map_err(|source| SnapshotError::Format {
        path: path.to_string(),
        source,
    })
}

/// Reads a state file's header and checks its checksum, for `ember --describe-snapshot`:
/// unlike `read_state`, a file written by another ember version is described, not refused.
pub fn describe_state(path: &str) -> Result<format::Description, SnapshotError> {
    use std::io::Read;
    let io = |source| SnapshotError::StateIo {
        what: "read",
        path: path.to_string(),
        source,
    };
    // Bounded: a path to a guest memory file by mistake must not be read whole. One byte
    // past the largest state file makes an oversized file fail as such.
    let limit = format::MAX_FILE_LEN + 1;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit).read_to_end(&mut bytes))
        .map_err(io)?;
    format::describe(&bytes).map_err(|source| SnapshotError::Format {
        path: path.to_string(),
        source,
    })
}

/// Checks what the body's parser cannot: counts and sizes that must agree with each
/// other and with the configuration.
pub fn validate(state: &MicrovmState) -> Result<(), SnapshotError> {
    let invalid = |m: String| Err(SnapshotError::Invalid(m));
    let c = &state.config;
    c.machine_config
        .validate()
        .map_err(|e| SnapshotError::Invalid(format!("machine-config: {e}")))?;
    if state.vcpus.len() != usize::from(c.machine_config.vcpu_count) {
        return invalid(format!(
            "{} vCPU states for vcpu_count {}",
            state.vcpus.len(),
            c.machine_config.vcpu_count
        ));
    }
    memory::check_layout(&state.memory, c.machine_config.mem_size_mib as u64)?;
    // One per drive and interface, then the vsock, balloon and entropy devices, in the
    // builder's order.
    let devices = c.drives.len()
        + c.network_interfaces.len()
        + usize::from(c.vsock.is_some())
        + usize::from(c.balloon.is_some())
        + usize::from(c.entropy.is_some());
    if state.devices.virtio.len() != devices {
        return invalid(format!(
            "{} virtio device states for the {devices} virtio devices of its configuration",
            state.devices.virtio.len()
        ));
    }
    if let Some(v) = &c.vsock {
        v.validate()
            .map_err(|e| SnapshotError::Invalid(format!("vsock: {e}")))?;
    }
    if let Some(b) = &c.balloon {
        b.validate(c.machine_config.mem_size_mib as u64)
            .map_err(|e| SnapshotError::Invalid(format!("balloon: {e}")))?;
    }
    if let Some(e) = &c.entropy {
        e.validate()
            .map_err(|e| SnapshotError::Invalid(format!("entropy: {e}")))?;
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        if v.cpuid.is_empty() || v.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return invalid(format!("vCPU {i} has {} CPUID entries", v.cpuid.len()));
        }
        if v.msrs.len() > kvm_bindings::KVM_MAX_MSR_ENTRIES {
            return invalid(format!("vCPU {i} has {} MSRs", v.msrs.len()));
        }
    }
    Ok(())
}

/// Rebuilds a VM from a snapshot; its vCPUs are ready to run but not started.
pub fn restore(
    mut state: MicrovmState,
    params: &LoadSnapshotParams,
    opts: &BuildOptions,
    exit: Arc<ExitSignal>,
    prepared: Option<builder::Prepared>,
) -> Result<(BuiltVm, VmConfig), SnapshotError> {
    validate(&state)?;
    let backend = params
        .backend()
        .map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    for o in &params.network_overrides {
        let Some(iface) = state
            .config
            .network_interfaces
            .iter_mut()
            .find(|i| i.iface_id == o.iface_id)
        else {
            return Err(SnapshotError::Invalid(format!(
                "network_overrides: the snapshot has no network interface `{}`",
                o.iface_id
            )));
        };
        iface.host_dev_name.clone_from(&o.host_dev_name);
    }
    if let Some(o) = &params.vsock_override {
        let Some(vsock) = state.config.vsock.as_mut() else {
            return Err(SnapshotError::Invalid(
                "vsock_override: the snapshot has no vsock device".into(),
            ));
        };
        vsock.uds_path.clone_from(&o.uds_path);
    }
    let track = params.track_dirty();
    state.config.machine_config.track_dirty_pages = track;
    let config = state.config.clone();
    let mem_mib = config.machine_config.mem_size_mib as u64;

    let builder::Prepared { kvm, vm, supported } = builder::Prepared::take_or_new(prepared)?;
    let host = vcpu::host_cpuid(supported.as_slice());
    // Bits the VM's CPU template set were the user's choice, accepted at boot on a host
    // that may lack them (as Firecracker accepts them): they do not stop a restore.
    let template = crate::vm::cpu_template::selected(&config);
    for (i, v) in state.vcpus.iter().enumerate() {
        let mut shown = v.cpuid.clone();
        if let Some(t) = &template {
            crate::vm::cpu_template::clear_forced_bits(t, &mut shown);
        }
        vcpu::check_cpuid(&shown, &host)
            .map_err(|e| SnapshotError::Unsupported(format!("vCPU {i}: {e}")))?;
    }
    vcpu::check_xsave_size(&vm).map_err(SnapshotError::Unsupported)?;

    // The restored VM keeps the page size it was snapshotted with, as in Firecracker.
    let huge_pages = config.machine_config.huge_pages;
    let (mem, uffd) = match backend.backend_type {
        MemBackendType::File => {
            if huge_pages == HugePages::Hugetlbfs2M {
                // A MAP_PRIVATE file mapping cannot be made of hugetlbfs pages.
                return Err(SnapshotError::Unsupported(
                    "a snapshot of a VM with huge_pages \"2M\" cannot be restored by mapping \
                     the memory file: use the Uffd backend"
                        .into(),
                ));
            }
            let mem = memory::map_file(&backend.backend_path, &state.memory, mem_mib)?;
            if huge_pages == HugePages::Transparent {
                crate::vm::memory::warn_if_thp_off();
                for region in mem.iter() {
                    crate::vm::memory::advise_huge(region.as_ptr(), region.len() as usize);
                }
            }
            (mem, None)
        }
        MemBackendType::Uffd => {
            let ranges: Vec<_> = state
                .memory
                .iter()
                .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.size as usize))
                .collect();
            let mem = crate::vm::memory::map_anonymous(&ranges, huge_pages)
                .map_err(|e| SnapshotError::Device(e.to_string()))?;
            let b = uffd::connect(
                &mem,
                &state.memory,
                &backend.backend_path,
                huge_pages.page_size(),
            )
            .map_err(SnapshotError::Unsupported)?;
            (mem, Some(b))
        }
    };
    crate::vm::memory::register(&vm, &mem, track).map_err(BuildError::Memory)?;

    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::Io)?;
    let mut devices = builder::create_devices(&config, opts, &vm, &mem, &reset_evt)?;
    devices
        .restore_state(&state.devices)
        .map_err(SnapshotError::Device)?;
    let (pio, mmio) = devices.buses();
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    let mut controls = Vec::with_capacity(state.vcpus.len());
    for (index, saved) in state.vcpus.iter().enumerate() {
        let fd = vm
            .create_vcpu(index as u64)
            .map_err(|source| BuildError::KvmCall {
                what: "KVM_CREATE_VCPU",
                source,
            })?;
        vcpu::restore(&fd, index as u8, saved)?;
        let control = Arc::new(VcpuControl::default());
        controls.push(control.clone());
        vcpus.push(Vcpu {
            fd,
            index: index as u8,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            control,
        });
    }
    // Last: kvmclock goes on from the saved value (or, with clock_realtime, from it
    // plus the wall-clock time since the snapshot).
    let mut clock = state.clock;
    clock.flags = if params.clock_realtime {
        clock.flags & KVM_CLOCK_REALTIME
    } else {
        0
    };
    vm.set_clock(&clock).map_err(SnapshotError::SetClock)?;
    let built = BuiltVm {
        vm,
        mem,
        devices,
        exit,
        reset_evt,
        vcpus,
        controls,
        cmdline: String::new(),
        msr_list: {
            // A template's MSRs stay saved in the next snapshot too.
            let mut list = builder::msr_list(&kvm);
            crate::vm::cpu_template::extend_msr_list(&config, &mut list);
            list
        },
        keep_alive: match uffd {
            Some(b) => vec![Box::new(b)],
            None => Vec::new(),
        },
        threads: Vec::new(),
    };
    Ok((built, config))
}
