//! Turns a validated configuration into a running VM: the one builder both the config
//! file and the API go through.

use std::fs::File;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::exit_code;
use crate::metrics::{METRICS, timeline_mark};
use crate::vcpu::{ExitSignal, Vcpu, VcpuControl};
use crate::vm::layout::*;
use crate::vm::{boot, cpuid, irq, memory, mptable, regs};

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
    Irq(#[from] irq::IrqError),
    #[error("cannot create an eventfd or thread: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::OverlapError),
    #[error(transparent)]
    Virtio(#[from] crate::devices::virtio::VirtioError),
}

impl BuildError {
    /// Errors the user can fix in the configuration exit with BAD_CONFIGURATION, as in
    /// Firecracker; host and KVM failures with GENERIC_ERROR.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::OpenFile { .. }
            | BuildError::Kernel { .. }
            | BuildError::Boot(_)
            | BuildError::Virtio(crate::devices::virtio::VirtioError::OpenDisk { .. })
            | BuildError::Virtio(crate::devices::virtio::VirtioError::DiskSize { .. })
            | BuildError::Virtio(crate::devices::virtio::VirtioError::TooManyDevices { .. })
            | BuildError::Virtio(crate::devices::virtio::VirtioError::Tap { .. })
            | BuildError::Memory(memory::MemoryError::TooLarge(_))
            | BuildError::Memory(memory::MemoryError::Mmap { .. }) => exit_code::BAD_CONFIGURATION,
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
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub reset_evt: EventFd,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub serial_input_space: EventFd,
    pub i8042: Arc<Mutex<I8042>>,
    pub ioapic: Arc<Mutex<irq::Ioapic>>,
    /// virtio-mmio transports (block devices), in slot order.
    pub virtio: Vec<Arc<Mutex<crate::devices::virtio::MmioTransport>>>,
    /// The block devices by drive_id, for PATCH /drives.
    pub drives: Vec<(String, Arc<Mutex<crate::devices::virtio::MmioTransport>>)>,
    pub vcpus: Vec<Vcpu>,
    pub controls: Vec<Arc<VcpuControl>>,
    pub cmdline: String,
}

/// Boot arguments that keep Linux off the instructions a PVM host cannot emulate in guest
/// kernel mode: XSAVE/XRSTOR, POPCNT and SMAP's CLAC/STAC.
pub const PVM_BOOT_ARGS: &[&str] = &["noxsave", "clearcpuid=popcnt,smap"];

/// Build choices that come from the command line rather than the configuration.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub boot_timer: bool,
}

/// Builds the VM described by `config` (already validated).
pub fn build(
    config: &VmConfig,
    opts: &BuildOptions,
    exit: Arc<ExitSignal>,
) -> Result<BuiltVm, BuildError> {
    let mc = &config.machine_config;
    let vcpu_count = mc.vcpu_count;

    // Files first: a typo in a path should fail before any KVM work.
    let mut kernel_file = open("kernel image", &config.boot_source.kernel_image_path)?;
    let mut initrd_file = match &config.boot_source.initrd_path {
        Some(p) => Some(open("initrd", p)?),
        None => None,
    };

    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let vm = Arc::new(kvm.create_vm().map_err(BuildError::CreateVm)?);
    irq::create_split_irqchip(&vm)?;
    // Intel VMX needs three pages for the real-mode TSS; see layout.rs.
    vm.set_tss_address(TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;

    let mem = memory::create(&vm, mc.mem_size_mib as u64, mc.track_dirty_pages)?;

    let kernel =
        boot::load_kernel(&mem, &mut kernel_file).map_err(|source| BuildError::Kernel {
            path: config.boot_source.kernel_image_path.clone(),
            source,
        })?;
    let initrd = match initrd_file.as_mut() {
        Some(f) => Some(boot::load_initrd(&mem, f, &kernel)?),
        None => None,
    };

    // Devices.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let ioapic = Arc::new(Mutex::new(irq::Ioapic::new(vm.clone())?));
    mmio.insert(IOAPIC_START, IOAPIC_SIZE, ioapic.clone())?;
    let (serial_irq, kbd_irq) = {
        let mut io = ioapic.lock().unwrap_or_else(|p| p.into_inner());
        (io.line(SERIAL_IRQ)?, io.line(I8042_IRQ)?)
    };
    let serial_input_space = EventFd::new(EFD_NONBLOCK)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        ConsoleOut::stdout(),
        serial_input_space.try_clone()?,
    )));
    pio.insert(
        u64::from(SERIAL_PORT_BASE),
        u64::from(SERIAL_PORT_SIZE),
        serial.clone(),
    )?;
    if opts.boot_timer {
        mmio.insert(
            BOOT_TIMER_START,
            BOOT_TIMER_SIZE,
            Arc::new(Mutex::new(crate::devices::boot_timer::BootTimer)),
        )?;
    }
    let reset_evt = EventFd::new(EFD_NONBLOCK)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(reset_evt.try_clone()?, kbd_irq)));
    pio.insert(
        u64::from(I8042_PORT_BASE),
        u64::from(I8042_PORT_SIZE),
        i8042.clone(),
    )?;

    // virtio devices: drives first, in config order (vda, vdb, ...).
    let mut next_virtio_slot = 0;
    let block = {
        let mut io = ioapic.lock().unwrap_or_else(|p| p.into_inner());
        crate::devices::virtio::create_block_devices(
            &config.drives,
            &vm,
            &mut io,
            &mem,
            &mut mmio,
            &mut next_virtio_slot,
        )?
    };

    // Then network interfaces, in config order (eth0, eth1, ...).
    let net = {
        let mut io = ioapic.lock().unwrap_or_else(|p| p.into_inner());
        crate::devices::virtio::create_net_devices(
            &config.network_interfaces,
            &vm,
            &mut io,
            &mem,
            &mut mmio,
            &mut next_virtio_slot,
        )?
    };

    // Command line: ember's additions, then boot params.
    let mut additions = block.cmdline.clone();
    additions.extend(net.cmdline.iter().cloned());
    let pvm = crate::vm::is_pvm_host();
    if pvm {
        // PVM runs guest kernel code without CPUID faulting on some hosts, so the CPUID
        // masks alone may not reach the guest: the boot arguments make Linux avoid the
        // instructions PVM cannot emulate (see ENVIRONMENT.md) whatever CPUID says.
        additions.extend(PVM_BOOT_ARGS.iter().map(|a| a.to_string()));
        log::info!(
            "PVM host (/sys/module/kvm_pvm): hiding {} in the guest's CPUID and adding `{}` to the command line",
            cpuid::PVM_MASKS,
            PVM_BOOT_ARGS.join(" ")
        );
    }
    let cmdline = boot::build_cmdline(config.boot_source.boot_args.as_deref(), &additions)?;
    boot::write_boot_params(&mem, &kernel, &cmdline, initrd)?;
    mptable::setup(&mem, vcpu_count)?;
    regs::write_boot_tables(&mem)?;

    // vCPUs.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
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
            },
        );
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
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
    timeline_mark(&METRICS.t_vm_built_us);
    log::info!("kernel command line: {cmdline}");

    Ok(BuiltVm {
        vm,
        mem,
        pio,
        mmio,
        exit,
        reset_evt,
        serial,
        serial_input_space,
        i8042,
        ioapic,
        drives: config
            .drives
            .iter()
            .map(|d| d.drive_id.clone())
            .zip(block.devices.iter().cloned())
            .collect(),
        virtio: block
            .devices
            .into_iter()
            .chain(net.devices.into_iter().map(|(_, t)| t))
            .collect(),
        vcpus,
        controls,
        cmdline,
    })
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
