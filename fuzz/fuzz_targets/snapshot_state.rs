//! The snapshot state file, as `PUT /snapshot/load` reads it: `format::decode` (header,
//! checksum, JSON body), `snapshot::validate` (counts and sizes against the
//! configuration), the CPUID check against this host (without first clearing the bits a
//! CPU template forces, which may read a template file), and every device state that can be
//! put back without a VM: the UART, the i8042 and the virtio-mmio transports of the
//! virtio-blk, virtio-rng and virtio-balloon devices the configuration names (with their
//! rate limiter levels, the balloon's sizes and held buffer), each then kicked once on
//! every queue. Network and vsock devices need a TAP or a socket and are left out; their
//! transports run the same code.
//!
//! Input: one mode byte, then the state file. A checksum almost never survives a
//! mutation, so mode bit 0 writes the right body length and checksum before decoding
//! (reaching the body's parser and the checks after it), and bit 1 writes this ember's
//! version into the header first. With neither bit the file is taken as it is.
//!
//! `EMBER_FUZZ_TRACE=1` prints how far each input got (to check that seeds reach the
//! device restores).
//!
//! Checks: no panic, no forbidden system call (parsing and restoring run under the VMM
//! thread's filter); `describe` agrees with `decode`; an accepted state encodes to a file
//! that decodes and encodes to the same bytes.
#![no_main]

use std::sync::OnceLock;

use ember::config::drive::DriveConfig;
use ember::devices::i8042::I8042;
use ember::devices::ioapic::IrqLine;
use ember::devices::rate_limiter::RateLimiter;
use ember::devices::serial::{ConsoleOut, SerialDevice};
use ember::devices::virtio::balloon::Balloon;
use ember::devices::virtio::rng::{EntropyBudget, Rng, Unlimited};
use ember::devices::virtio::{Block, MmioTransport, VirtioDevice};
use ember::snapshot::format::{self, EMBER_VERSION};
use ember::snapshot::{MicrovmState, validate, vcpu};
use ember_fuzz::{Confined, GuestMemory, NoInterest, ThreadKind, guest_memory};
use kvm_bindings::kvm_cpuid_entry2;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

thread_local! {
    static VMM: Confined = Confined::start(ThreadKind::Vmm);
}

/// Guest memory as large as this at most is mapped for a state's layout (untouched pages
/// cost nothing); larger layouts get the small fake memory, whose rings are all invalid.
const MAX_MAPPED_MIB: u64 = 256;

/// The host's CPUID as a restore compares it (KVM's supported list), read once.
fn host_cpuid() -> &'static [kvm_cpuid_entry2] {
    static HOST: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    HOST.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu::host_cpuid(supported.as_slice())
    })
}

/// The disk every drive of a fuzzed configuration opens (its path is never used).
fn disk_path() -> &'static str {
    static DISK: OnceLock<String> = OnceLock::new();
    DISK.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("ember-fuzz-disk-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).expect("write the fuzz disk");
        p.to_string_lossy().into_owned()
    })
}

fn trace(what: std::fmt::Arguments<'_>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("EMBER_FUZZ_TRACE").is_some_and(|v| v == "1")) {
        eprintln!("snapshot_state: {what}");
    }
}

/// Rewrites the version, body length and checksum of a format-1 file as `mode` asks.
fn reseal(data: &[u8], mode: u8) -> Vec<u8> {
    let mut file = data.to_vec();
    if file.len() < 14 {
        return file;
    }
    let vlen = usize::from(u16::from_le_bytes([file[12], file[13]]));
    if mode & 2 != 0 && file.len() >= 14 + vlen {
        let v = EMBER_VERSION.as_bytes();
        file.splice(
            12..14 + vlen,
            (v.len() as u16)
                .to_le_bytes()
                .into_iter()
                .chain(v.iter().copied()),
        );
    }
    let vlen = usize::from(u16::from_le_bytes([file[12], file[13]]));
    let covered = 14 + vlen + 8;
    if mode & 1 != 0 && file.len() >= covered + 4 {
        let body_len = (file.len() - covered - 4) as u64;
        file[covered - 8..covered].copy_from_slice(&body_len.to_le_bytes());
        let crc = format::crc32_update(format::crc32(&file[..covered]), &file[covered + 4..]);
        file[covered..covered + 4].copy_from_slice(&crc.to_le_bytes());
    }
    file
}

fn irq() -> IrqLine {
    IrqLine::from_eventfd(EventFd::new(0).expect("eventfd"))
}

/// Memory for the state's layout when it is small enough, else the fake memory.
fn memory_for(state: &MicrovmState) -> GuestMemory {
    let total: u64 = state.memory.iter().map(|r| r.size).sum();
    if total <= MAX_MAPPED_MIB << 20 {
        let ranges: Vec<_> = state
            .memory
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
            .collect();
        if let Ok(m) = GuestMemory::from_ranges(&ranges) {
            return m;
        }
    }
    guest_memory()
}

/// The virtio devices the configuration names, in the builder's order, built here on
/// libFuzzer's thread (they open files and eventfds, as the builder does before the
/// filter is installed). `None` for the ones this target cannot build.
fn build_virtio(state: &MicrovmState, mem: &GuestMemory) -> Vec<Option<MmioTransport>> {
    let c = &state.config;
    let mut devices: Vec<Option<Box<dyn VirtioDevice>>> = Vec::new();
    for d in &c.drives {
        let drive = DriveConfig {
            path_on_host: disk_path().to_string(),
            ..d.clone()
        };
        devices.push(
            Block::new(&drive)
                .ok()
                .map(|b| Box::new(b) as Box<dyn VirtioDevice>),
        );
    }
    devices.extend(c.network_interfaces.iter().map(|_| None));
    if c.vsock.is_some() {
        devices.push(None);
    }
    if let Some(b) = &c.balloon {
        devices.push(
            Balloon::new(b)
                .ok()
                .map(|b| Box::new(b) as Box<dyn VirtioDevice>),
        );
    }
    if let Some(e) = &c.entropy {
        let budget: Option<Box<dyn EntropyBudget>> = match &e.rate_limiter {
            Some(rl) => RateLimiter::new(Some(rl))
                .ok()
                .map(|l| Box::new(l) as Box<dyn EntropyBudget>),
            None => Some(Box::new(Unlimited)),
        };
        devices.push(budget.map(|b| Box::new(Rng::new(b)) as Box<dyn VirtioDevice>));
    }
    devices
        .into_iter()
        .map(|d| d.and_then(|d| MmioTransport::new(d, mem.clone(), irq()).ok()))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let file = reseal(file, mode);
    let host = host_cpuid();
    VMM.with(|vmm| {
        let bytes = file.clone();
        let state = vmm.run(move || parse(&bytes, host));
        let Some(state) = state else {
            return;
        };
        // The devices a restore would build, then their saved state put back.
        let mem = memory_for(&state);
        let virtio = build_virtio(&state, &mem);
        let i8042 = I8042::new(EventFd::new(0).expect("eventfd"), irq());
        let space = EventFd::new(0).expect("eventfd");
        let serial_irq = irq();
        vmm.run(move || restore_devices(&state, virtio, i8042, serial_irq, space));
    });
});

/// Decodes and checks a state file as a load does; Some when a restore would go on to
/// build the VM.
fn parse(file: &[u8], host: &[kvm_cpuid_entry2]) -> Option<Box<MicrovmState>> {
    let described = format::describe(file);
    let state = match format::decode::<MicrovmState>(file) {
        Ok(s) => s,
        Err(e) => {
            trace(format_args!("refused: {e}"));
            return None;
        }
    };
    let d = described.expect("describe refused a file decode accepted");
    assert!(
        d.loadable(),
        "decode accepted a file describe calls not loadable"
    );
    // What ember writes back (a snapshot of the restored VM) reads back the same.
    let again = format::encode(&state).expect("encode an accepted state");
    let back: MicrovmState = format::decode(&again).expect("decode what encode wrote");
    assert_eq!(
        format::encode(&back).expect("encode again"),
        again,
        "a state does not survive encode and decode"
    );
    if let Err(e) = validate(&state) {
        trace(format_args!("invalid: {e}"));
        return None;
    }
    for v in &state.vcpus {
        if let Err(e) = vcpu::check_cpuid(&v.cpuid, host) {
            trace(format_args!("CPUID: {e}"));
            return None;
        }
    }
    Some(Box::new(state))
}

fn restore_devices(
    state: &MicrovmState,
    virtio: Vec<Option<MmioTransport>>,
    mut i8042: I8042,
    serial_irq: IrqLine,
    space: EventFd,
) {
    let d = &state.devices;
    if let Err(e) = i8042.restore_state(&d.i8042) {
        trace(format_args!("i8042: {e}"));
    }
    if let Some(s) = &d.serial
        && let Err(e) = SerialDevice::from_state(s, serial_irq, ConsoleOut::Sink, space)
    {
        trace(format_args!("{e}"));
    }
    assert_eq!(virtio.len(), d.virtio.len(), "validate let a count through");
    for (t, saved) in virtio.into_iter().zip(&d.virtio) {
        let Some(mut t) = t else {
            trace(format_args!("type {}: not built here", saved.device_type));
            continue;
        };
        if let Err(e) = t.restore_state(saved) {
            trace(format_args!("type {}: {e}", saved.device_type));
            continue;
        }
        trace(format_args!(
            "type {}: restored, active {}",
            saved.device_type, saved.activated
        ));
        // The restored device serves whatever its queues hold (zeroed memory here).
        t.kick_all_queues();
        for q in 0..saved.queues.len() {
            t.process_queue(q, &mut NoInterest);
        }
    }
}
