//! Turns a validated configuration into a running VM: the one builder both the config
//! file and the API go through.

use std::fs::File;
use std::sync::Arc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::VmConfig;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::virtio::VirtioError;
use crate::exit_code;
use crate::metrics::{METRICS, timeline_mark};
use crate::vcpu::{ExitSignal, Vcpu, VcpuControl, VcpuThread};
use crate::vm::layout::*;
use crate::vm::{boot, cpu_template, cpuid, irq, memory, mptable, regs};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot open {what} {path}: {source}")]
    OpenFile {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    Kernel {
        path: String,
        source: boot::BootError,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Irqchip(#[from] irq::SplitIrqchipError),
    #[error("cannot create an eventfd or thread: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    CpuTemplate(#[from] cpu_template::CpuTemplateError),
}

impl BuildError {
    /// Errors the user can fix in the configuration exit with BAD_CONFIGURATION, as in
    /// Firecracker; host and KVM failures with GENERIC_ERROR.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::OpenFile { .. }
            | BuildError::Kernel { .. }
            | BuildError::Boot(_)
            | BuildError::Devices(DeviceError::Virtio(
                VirtioError::OpenDisk { .. }
                | VirtioError::DiskSize { .. }
                // io_engine Async on a host without io_uring: the fix is `Sync`.
                | VirtioError::IoUring { .. }
                | VirtioError::TooManyDevices { .. }
                | VirtioError::Tap { .. }
                | VirtioError::Vsock { .. },
            ))
            | BuildError::Devices(DeviceError::SerialOut { .. })
            | BuildError::CpuTemplate(
                cpu_template::CpuTemplateError::Vendor { .. }
                | cpu_template::CpuTemplateError::Model { .. }
                | cpu_template::CpuTemplateError::Leaf { .. }
                | cpu_template::CpuTemplateError::Capability(_)
                | cpu_template::CpuTemplateError::Msr(_)
                | cpu_template::CpuTemplateError::Rejected(_),
            )
            | BuildError::Memory(memory::MemoryError::TooLarge(_))
            | BuildError::Memory(memory::MemoryError::Mmap { .. })
            | BuildError::Memory(memory::MemoryError::HugePagesUnavailable { .. }) => {
                exit_code::BAD_CONFIGURATION
            }
            _ => exit_code::GENERIC_ERROR,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmCall { what, source }
}

fn open(what: &'static str, path: &str) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::OpenFile {
        what,
        path: path.to_string(),
        source,
    })
}

/// A built VM whose vCPUs have not started yet.
pub struct BuiltVm {
    pub vm: Arc<VmFd>,
    pub mem: memory::GuestMemory,
    pub devices: DeviceManager,
    pub exit: Arc<ExitSignal>,
    /// Written by the i8042 when the guest asks for a reset.
    pub reset_evt: EventFd,
    pub vcpus: Vec<Vcpu>,
    pub controls: Vec<Arc<VcpuControl>>,
    pub cmdline: String,
    /// The MSRs a snapshot saves for each vCPU.
    pub msr_list: Vec<u32>,
    /// What must live as long as the VM besides the above (a Uffd backend's descriptor
    /// and handler connection).
    pub keep_alive: Vec<Box<dyn std::any::Any + Send>>,
    /// vCPU threads started while the VM was built, in vCPU order (may be fewer than the
    /// vCPUs, or none: the rest get a thread when the VM starts).
    pub threads: Vec<VcpuThread>,
}

/// Boot arguments that keep Linux off the instructions a PVM host cannot emulate in guest
/// kernel mode (XSAVE/XRSTOR, POPCNT, SMAP's CLAC/STAC, and CMPXCHG16B, which SLUB uses),
/// and switch on the guest kernel's system-call shim (resources/guest/patches/0003; other
/// kernels ignore it).
pub const PVM_BOOT_ARGS: &[&str] = &[
    "noxsave",
    "clearcpuid=popcnt,smap,cx16",
    "ember.pvm_syscall=1",
];

/// Build choices that come from the command line rather than the configuration.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub boot_timer: bool,
    /// The metadata store the interfaces of `mmds-config` answer from.
    pub mmds: crate::mmds::SharedMmds,
}

/// The KVM work of a build that needs no configuration: the VM (split irqchip, TSS) and
/// the CPUID KVM supports on this host (KVM_GET_SUPPORTED_CPUID alone is ~0.35 ms here).
/// With the API, the VMM thread does it while the host agent is still configuring the VM
/// (`Controller::prepare`), so InstanceStart and a snapshot load start from it.
pub struct Prepared {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub supported: kvm_bindings::CpuId,
}

impl Prepared {
    pub fn new() -> Result<Prepared, BuildError> {
        let (kvm, vm) = create_vm()?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Prepared { kvm, vm, supported })
    }

    /// `prepared`, or a new one made now.
    pub fn take_or_new(prepared: Option<Prepared>) -> Result<Prepared, BuildError> {
        match prepared {
            Some(p) => Ok(p),
            None => Prepared::new(),
        }
    }
}

/// Builds the VM described by `config` (already validated), phase by phase, on the
/// prepared VM if there is one.
pub fn build(
    config: &VmConfig,
    opts: &BuildOptions,
    exit: Arc<ExitSignal>,
    prepared: Option<Prepared>,
) -> Result<BuiltVm, BuildError> {
    let mut files = open_boot_files(config)?;
    // Before any KVM work, as a bad file path is: a template this CPU cannot take.
    cpu_template::check_host(config)?;
    let template = cpu_template::selected(config);
    if template.is_some() {
        log::info!("CPU template: {}", cpu_template::describe(config));
    }
    let mc = &config.machine_config;
    // First, so that the threads' start-up runs alongside the build (see VcpuThread). A
    // thread that cannot be had now is made when the VM starts.
    let threads: Vec<VcpuThread> = (0..mc.vcpu_count)
        .map_while(|i| VcpuThread::spawn(i).ok())
        .collect();
    let Prepared { kvm, vm, supported } = Prepared::take_or_new(prepared)?;
    let t = &METRICS.boot_timeline_us;
    timeline_mark(&t.vm_created);
    if mc.huge_pages == crate::config::HugePages::Hugetlbfs2M && config.balloon.is_some() {
        // As in Firecracker: the balloon works, but it hands back 4 KiB pages, which cannot
        // be released from a mapping of 2 MiB pages.
        log::warn!(
            "balloon with huge_pages \"2M\": inflating restricts the guest but frees no host \
             memory"
        );
    }
    let mem = memory::create(
        &vm,
        mc.mem_size_mib as u64,
        mc.track_dirty_pages,
        mc.huge_pages,
    )?;
    timeline_mark(&t.memory_ready);
    let (kernel, initrd) = load_kernel(config, &mem, &mut files)?;
    timeline_mark(&t.kernel_loaded);
    let reset_evt = EventFd::new(EFD_NONBLOCK)?;
    let devices = create_devices(config, opts, &vm, &mem, &reset_evt)?;
    timeline_mark(&t.devices_ready);
    let pvm = crate::vm::is_pvm_host();
    let cmdline = write_boot_data(config, &mem, &kernel, initrd, &devices, pvm)?;
    timeline_mark(&t.boot_data_ready);
    let (vcpus, controls) = create_vcpus(
        &kvm,
        supported,
        &vm,
        (mc.vcpu_count, mc.smt),
        &kernel,
        &devices,
        &exit,
        pvm,
        template.as_ref(),
    )?;
    timeline_mark(&METRICS.boot_timeline_us.vm_built);
    log::info!("kernel command line: {cmdline}");
    let mut msr_list = msr_list(&kvm);
    cpu_template::extend_msr_list(config, &mut msr_list);
    Ok(BuiltVm {
        vm,
        mem,
        devices,
        exit,
        reset_evt,
        vcpus,
        controls,
        cmdline,
        msr_list,
        keep_alive: Vec::new(),
        threads,
    })
}

/// The MSRs KVM can save and restore on this host (for snapshots).
pub fn msr_list(kvm: &Kvm) -> Vec<u32> {
    match kvm.get_msr_index_list() {
        Ok(l) => l.as_slice().to_vec(),
        Err(e) => {
            log::warn!("KVM_GET_MSR_INDEX_LIST: {e}; snapshots will hold no MSRs");
            Vec::new()
        }
    }
}

/// The files a boot reads from the host.
struct BootFiles {
    kernel: File,
    initrd: Option<File>,
}

/// Phase 1: opens the kernel and initrd first, so a typo in a path fails before any KVM
/// work.
fn open_boot_files(config: &VmConfig) -> Result<BootFiles, BuildError> {
    let kernel = open("kernel image", &config.boot_source.kernel_image_path)?;
    let initrd = match &config.boot_source.initrd_path {
        Some(p) => Some(open("initrd", p)?),
        None => None,
    };
    Ok(BootFiles { kernel, initrd })
}

/// Phase 2: the KVM VM, with a split irqchip (see vm/irq.rs).
pub fn create_vm() -> Result<(Kvm, Arc<VmFd>), BuildError> {
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(BuildError::CreateVm)?);
    irq::create_split_irqchip(&vm)?;
    // Intel VMX needs three pages for the real-mode TSS; see layout.rs.
    vm.set_tss_address(TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    Ok((kvm, vm))
}

/// Phase 3 (after guest memory): the kernel and initrd in guest memory.
fn load_kernel(
    config: &VmConfig,
    mem: &memory::GuestMemory,
    files: &mut BootFiles,
) -> Result<(boot::LoadedKernel, Option<(u64, u64)>), BuildError> {
    let kernel =
        boot::load_kernel(mem, &mut files.kernel).map_err(|source| BuildError::Kernel {
            path: config.boot_source.kernel_image_path.clone(),
            source,
        })?;
    let initrd = match files.initrd.as_mut() {
        Some(f) => Some(boot::load_initrd(mem, f, &kernel)?),
        None => None,
    };
    Ok((kernel, initrd))
}

/// Phase 4: every device, on its bus with its IRQ: legacy devices, then drives in config
/// order (vda, vdb, ...), then network interfaces in config order (eth0, eth1, ...).
pub fn create_devices(
    config: &VmConfig,
    opts: &BuildOptions,
    vm: &Arc<VmFd>,
    mem: &memory::GuestMemory,
    reset_evt: &EventFd,
) -> Result<DeviceManager, BuildError> {
    let mut devices = DeviceManager::new(vm.clone(), mem.clone())?;
    let serial_out = config
        .serial
        .as_ref()
        .and_then(|s| s.serial_out_path.as_deref());
    devices.add_legacy_devices(reset_evt, opts.boot_timer, serial_out)?;
    devices.add_drives(&config.drives)?;
    let mmds = config.mmds_config.as_ref().map(|c| (c, &opts.mmds));
    devices.add_network_interfaces(&config.network_interfaces, mmds)?;
    if let Some(v) = &config.vsock {
        devices.add_vsock(v)?;
    }
    if let Some(b) = &config.balloon {
        devices.add_balloon(b)?;
    }
    if let Some(e) = &config.entropy {
        devices.add_entropy(e)?;
    }
    if log::log_enabled!(log::Level::Debug) {
        for d in devices.devices() {
            log::debug!(
                "device {} `{}`: {:?} {:#x}+{:#x}, irq {:?}",
                d.kind.as_str(),
                d.id,
                d.bus,
                d.base,
                d.size,
                d.irq
            );
        }
    }
    Ok(devices)
}

/// Phase 5: what the kernel reads at boot: the command line (the user's, then the
/// devices' entries and the PVM workarounds), boot_params, the MP table and the page
/// tables and GDT of the 64-bit entry. Returns the command line.
fn write_boot_data(
    config: &VmConfig,
    mem: &memory::GuestMemory,
    kernel: &boot::LoadedKernel,
    initrd: Option<(u64, u64)>,
    devices: &DeviceManager,
    pvm: bool,
) -> Result<String, BuildError> {
    let mut additions = devices.cmdline_entries();
    if pvm {
        // PVM runs guest kernel code without CPUID faulting on some hosts, so the CPUID
        // masks alone may not reach the guest: the boot arguments make Linux avoid the
        // instructions PVM cannot emulate (see docs/ARCHITECTURE.md, host notes) whatever CPUID says.
        additions.extend(PVM_BOOT_ARGS.iter().map(|a| a.to_string()));
        log::info!(
            "PVM host (/sys/module/kvm_pvm): hiding {} in the guest's CPUID and adding `{}` to the command line",
            cpuid::PVM_MASKS,
            PVM_BOOT_ARGS.join(" ")
        );
    }
    let cmdline = boot::build_cmdline(config.boot_source.boot_args.as_deref(), &additions)?;
    boot::write_boot_params(mem, kernel, &cmdline, initrd)?;
    mptable::setup(mem, config.machine_config.vcpu_count)?;
    regs::write_boot_tables(mem)?;
    Ok(boot::cmdline_text(&cmdline))
}

/// Phase 6: the vCPUs, each with its CPUID (the CPU template's, then ember's per-vCPU
/// adjustments), the template's MSRs and the boot registers; the boot CPU at the
/// kernel's entry. They share the device manager's buses; no device can be added after
/// this.
#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    kvm: &Kvm,
    mut supported: kvm_bindings::CpuId,
    vm: &VmFd,
    (vcpu_count, smt): (u8, bool),
    kernel: &boot::LoadedKernel,
    devices: &DeviceManager,
    exit: &Arc<ExitSignal>,
    pvm: bool,
    template: Option<&crate::config::CustomCpuTemplate>,
) -> Result<(Vec<Vcpu>, Vec<Arc<VcpuControl>>), BuildError> {
    if let Some(t) = template {
        supported = cpu_template::apply_cpuid(t, &supported)?;
    }
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let (pio, mmio) = devices.buses();
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    let mut controls = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(
            &supported,
            cpuid::CpuidParams {
                cpu_index: index,
                cpu_count: vcpu_count,
                tsc_deadline,
                pvm_host: pvm,
                smt,
            },
        );
        fd.set_cpuid2(&cpuid).map_err(|e| match template {
            Some(_) => BuildError::CpuTemplate(cpu_template::CpuTemplateError::Rejected(e)),
            None => BuildError::KvmCall {
                what: "KVM_SET_CPUID2",
                source: e,
            },
        })?;
        if let Some(t) = template {
            cpu_template::apply_msrs(t, &fd)?;
        }
        regs::setup_cpu_common(&fd)?;
        if index == 0 {
            regs::setup_boot_cpu(&fd, kernel.entry)?;
        }
        if log::log_enabled!(log::Level::Debug) {
            log_vcpu_identity(&fd, index);
        }
        let control = Arc::new(VcpuControl::default());
        controls.push(control.clone());
        vcpus.push(Vcpu {
            fd,
            index,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
            control,
        });
    }
    Ok((vcpus, controls))
}

/// Logs the APIC ID KVM holds and the IDs the vCPU's CPUID reports, so a test can check
/// per-vCPU identity from the host side.
fn log_vcpu_identity(fd: &kvm_ioctls::VcpuFd, index: u8) {
    let lapic = regs::lapic_id(fd);
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).ok();
    let find = |f: u32, i: u32| {
        cpuid.as_ref().and_then(|c| {
            c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
        })
    };
    let leaf1_apic = find(1, 0).map(|e| e.ebx >> 24);
    let leafb_x2apic = find(0xb, 0).map(|e| e.edx);
    let tsc_deadline = find(1, 0).map(|e| e.ecx & (1 << 24) != 0);
    log::debug!(
        "vcpu {index}: lapic_id={} cpuid_1_apic_id={} cpuid_b_x2apic_id={} tsc_deadline={}",
        opt(lapic),
        opt(leaf1_apic),
        opt(leafb_x2apic),
        opt(tsc_deadline)
    );
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}
