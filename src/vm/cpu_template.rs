//! CPU templates: what Firecracker's static x86 templates change, whether this host can
//! take a template, and applying one to a vCPU's CPUID and MSRs.
//!
//! A template is applied to KVM's supported CPUID before ember's own per-vCPU
//! adjustments (`cpuid.rs`: topology, APIC IDs, the PVM masks), as Firecracker applies
//! its templates before its CPUID normalisation; so a template cannot break topology,
//! and the PVM masks hold whatever a template says.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::config::VmConfig;
use crate::config::cpu_template::{
    Bitmap, CpuidLeafModifier, CpuidRegister, CpuidRegisterModifier, CustomCpuTemplate,
    KvmCapability, MsrModifier, StaticCpuTemplate,
};

#[derive(Debug, thiserror::Error)]
pub enum CpuTemplateError {
    #[error("cpu_template `{template}` is for {wanted} CPUs ({models}); this host's CPU is {host}")]
    Vendor {
        template: &'static str,
        wanted: &'static str,
        models: &'static str,
        host: String,
    },
    #[error(
        "cpu_template `{template}` is for {models} CPUs only (as in Firecracker); this host's CPU is {host}"
    )]
    Model {
        template: &'static str,
        models: &'static str,
        host: String,
    },
    #[error(
        "cpu-config: cpuid_modifiers[{index}]: leaf {leaf:#x} subleaf {subleaf:#x} is not in the CPUID KVM supports on this host"
    )]
    Leaf {
        index: usize,
        leaf: u32,
        subleaf: u32,
    },
    #[error("cpu-config: kvm_capabilities: this host's KVM lacks capability {0}")]
    Capability(u32),
    #[error("cpu template: MSR {0:#x} is not supported by KVM on this host")]
    Msr(u32),
    #[error(
        "KVM refused the CPUID the CPU template makes (KVM_SET_CPUID2: {0}); a template may not \
         change what KVM checks, such as XSAVE sizes or address widths"
    )]
    Rejected(kvm_ioctls::Error),
    #[error("cannot query KVM for the CPU template: {0}")]
    Kvm(kvm_ioctls::Error),
}

/// One register change of a static template: the bits in `mask` take their value from
/// `value`, the others are the host's.
struct Change {
    leaf: u32,
    subleaf: u32,
    reg: CpuidRegister,
    mask: u32,
    value: u32,
}

const fn ch(leaf: u32, subleaf: u32, reg: CpuidRegister, mask: u32, value: u32) -> Change {
    Change {
        leaf,
        subleaf,
        reg,
        mask,
        value,
    }
}

use CpuidRegister::{Eax, Ebx, Ecx, Edx};

/// The base of T2, T2S, T2CL and T2A (an EC2 T2 instance's CPU): family 6 model 0x3f
/// stepping 2 in leaf 1; Intel-only and AMD-only feature bits that an Intel Cascade Lake
/// or an AMD Milan host would show differently are cleared so the guest sees one CPU on
/// either; ERMS, MCE and MTRR are shown.
const T2_BASE: &[Change] = &[
    // Leaf 1: the signature (stepping, model, family, extended model and family), then
    // the monitoring, virtualisation and power-management features of ECX and EDX.
    ch(1, 0, Eax, 0x0fff_3fff, 0x0003_06f2),
    ch(1, 0, Ecx, 0x0004_cdfc, 0),
    ch(1, 0, Edx, 0xe864_1080, 0x0000_1080),
    // Leaf 7: AVX-512, SGX, TSX, MPX, RDT, processor trace, SHA and newer extensions off;
    // ERMS on.
    ch(7, 0, Ebx, 0xffef_da14, 0x0000_0200),
    ch(7, 0, Ecx, 0x4041_5f5e, 0),
    ch(7, 0, Edx, 0x0000_011c, 0),
    // Leaf 0xd: no MPX, AVX-512 or PKRU state; no XSAVEC, XGETBV1 or XSAVES.
    ch(0xd, 0, Eax, 0x0000_02f8, 0),
    ch(0xd, 1, Eax, 0x0000_000e, 0),
];

/// T2 and T2S beyond the base: no PREFETCHW or MONITORX, no 1 GiB pages, no WBNOINVD.
const T2_EXT: &[Change] = &[
    ch(0x8000_0001, 0, Ecx, 0x2000_0100, 0),
    ch(0x8000_0001, 0, Edx, 0x0400_0000, 0),
    ch(0x8000_0008, 0, Ebx, 0x0000_0200, 0),
];

/// T2CL beyond the base: as T2, and also SSE4A and misaligned SSE off, and EDX bits
/// 22-26 of leaf 0x8000_0001 (MMX extensions, the MMX and FXSR mirrors, FFXSR, 1 GiB
/// pages).
const T2CL_EXT: &[Change] = &[
    ch(0x8000_0001, 0, Ecx, 0x2000_01c0, 0),
    ch(0x8000_0001, 0, Edx, 0x07c0_0000, 0),
    ch(0x8000_0008, 0, Ebx, 0x0000_0200, 0),
];

/// T2A beyond the base (an AMD Milan host made to look like T2CL): SVM, SSE4A,
/// misaligned SSE, PREFETCHW, MONITORX, MMX extensions, FFXSR, 1 GiB pages, CLZERO and
/// WBNOINVD off; in leaf 0x8000_0008 EBX, the FP error pointer, IBRS-preferred,
/// IBRS-same-mode and no-EFER.LMSLE bits on.
const T2A_EXT: &[Change] = &[
    ch(0x8000_0001, 0, Ecx, 0x2000_01c4, 0),
    ch(0x8000_0001, 0, Edx, 0x0640_0000, 0),
    ch(0x8000_0008, 0, Ebx, 0x001c_0205, 0x001c_0004),
];

/// C3 (an EC2 C3 instance's CPU, Ivy Bridge): family 6 model 0x3e stepping 4, and the
/// features newer than that CPU off.
const C3: &[Change] = &[
    ch(1, 0, Eax, 0x0fff_3fff, 0x0003_06e4),
    ch(1, 0, Ecx, 0x0040_dd3c, 0),
    ch(1, 0, Edx, 0xa864_1080, 0x0000_1080),
    ch(7, 0, Ebx, 0xffaf_dd3c, 0),
    ch(7, 0, Ecx, 0x4041_481e, 0),
    ch(7, 0, Edx, 0x0000_000c, 0),
    ch(0xd, 0, Eax, 0x0000_02f8, 0),
    ch(0xd, 1, Eax, 0x0000_000e, 0),
    ch(0x8000_0001, 0, Ecx, 0x0000_0120, 0),
    ch(0x8000_0001, 0, Edx, 0x0400_0000, 0),
];

/// IA32_ARCH_CAPABILITIES: the CPU's statement of which speculative-execution bugs it
/// is immune to. T2S states a fixed set; T2CL keeps only what Cascade Lake and Ice Lake
/// agree on.
const MSR_ARCH_CAPABILITIES: u32 = 0x10a;
const T2S_MSRS: &[(u32, u64, u64)] = &[(MSR_ARCH_CAPABILITIES, u64::MAX, 0x0c0a_0c4c)];
const T2CL_MSRS: &[(u32, u64, u64)] = &[(MSR_ARCH_CAPABILITIES, 0xffff_ffff_e2f5_1e00, 0)];

const INTEL: &[u8; 12] = b"GenuineIntel";
const AMD: &[u8; 12] = b"AuthenticAMD";

/// Leaf 1 EAX without the processor type and reserved bits: what Firecracker compares to
/// tell CPU models apart.
const SIGNATURE_MASK: u32 = 0x0fff_0fff;
const SKYLAKE: u32 = 0x0005_0654;
const CASCADE_LAKE: u32 = 0x0005_0657;
const ICE_LAKE: u32 = 0x0006_06a6;
const MILAN: u32 = 0x00a0_0f11;

struct StaticInfo {
    vendor: &'static [u8; 12],
    vendor_name: &'static str,
    models: &'static [u32],
    model_names: &'static str,
    cpuid: &'static [&'static [Change]],
    msrs: &'static [(u32, u64, u64)],
}

fn static_info(t: StaticCpuTemplate) -> Option<StaticInfo> {
    let intel = |models, model_names, cpuid, msrs| StaticInfo {
        vendor: INTEL,
        vendor_name: "Intel",
        models,
        model_names,
        cpuid,
        msrs,
    };
    Some(match t {
        StaticCpuTemplate::None => return None,
        StaticCpuTemplate::C3 => intel(
            &[SKYLAKE, CASCADE_LAKE, ICE_LAKE],
            "Intel Skylake, Cascade Lake and Ice Lake",
            &[C3],
            &[],
        ),
        StaticCpuTemplate::T2 => intel(
            &[SKYLAKE, CASCADE_LAKE, ICE_LAKE],
            "Intel Skylake, Cascade Lake and Ice Lake",
            &[T2_BASE, T2_EXT],
            &[],
        ),
        StaticCpuTemplate::T2S => intel(
            &[SKYLAKE, CASCADE_LAKE],
            "Intel Skylake and Cascade Lake",
            &[T2_BASE, T2_EXT],
            T2S_MSRS,
        ),
        StaticCpuTemplate::T2CL => intel(
            &[CASCADE_LAKE, ICE_LAKE],
            "Intel Cascade Lake and Ice Lake",
            &[T2_BASE, T2CL_EXT],
            T2CL_MSRS,
        ),
        StaticCpuTemplate::T2A => StaticInfo {
            vendor: AMD,
            vendor_name: "AMD",
            models: &[MILAN],
            model_names: "AMD Milan",
            cpuid: &[T2_BASE, T2A_EXT],
            msrs: &[],
        },
    })
}

/// A static template in the form of a custom one, so both apply through one path.
pub fn static_template(t: StaticCpuTemplate) -> CustomCpuTemplate {
    let Some(info) = static_info(t) else {
        return CustomCpuTemplate::default();
    };
    let mut out = CustomCpuTemplate::default();
    for c in info.cpuid.iter().flat_map(|part| part.iter()) {
        let modifier = CpuidRegisterModifier {
            register: c.reg,
            bitmap: Bitmap {
                mask: u64::from(c.mask),
                value: u64::from(c.value),
            },
        };
        match out
            .cpuid_modifiers
            .iter_mut()
            .find(|m| m.leaf == c.leaf && m.subleaf == c.subleaf)
        {
            Some(m) => m.modifiers.push(modifier),
            None => out.cpuid_modifiers.push(CpuidLeafModifier {
                leaf: c.leaf,
                subleaf: c.subleaf,
                flags: if c.leaf == 7 || c.leaf == 0xd {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                modifiers: vec![modifier],
            }),
        }
    }
    out.msr_modifiers = info
        .msrs
        .iter()
        .map(|&(addr, mask, value)| MsrModifier {
            addr,
            bitmap: Bitmap { mask, value },
        })
        .collect();
    out
}

/// The template a configuration selects, if any: a custom one replaces a static one.
pub fn selected(config: &VmConfig) -> Option<CustomCpuTemplate> {
    if let Some(t) = config.custom_cpu_template() {
        return Some(t.clone());
    }
    config.machine_config.static_template().map(static_template)
}

/// The template for the log: a static one's name, or the size of a custom one.
pub fn describe(config: &VmConfig) -> String {
    if let Some(t) = config.custom_cpu_template() {
        return format!(
            "custom ({} CPUID leaves, {} MSRs)",
            t.cpuid_modifiers.len(),
            t.msr_modifiers.len()
        );
    }
    match config.machine_config.static_template() {
        Some(t) => t.name().to_string(),
        None => "none".to_string(),
    }
}

/// The host CPU as leaves 0 and 1 of CPUID tell it.
struct HostCpu {
    vendor: [u8; 12],
    signature: u32,
}

impl HostCpu {
    fn read() -> HostCpu {
        let l0 = std::arch::x86_64::__cpuid(0);
        let mut vendor = [0u8; 12];
        for (chunk, reg) in vendor.chunks_mut(4).zip([l0.ebx, l0.edx, l0.ecx]) {
            chunk.copy_from_slice(&reg.to_le_bytes());
        }
        HostCpu {
            vendor,
            signature: std::arch::x86_64::__cpuid(1).eax,
        }
    }

    fn describe(&self) -> String {
        let s = self.signature;
        let family = ((s >> 8) & 0xf) + ((s >> 20) & 0xff);
        let model = ((s >> 4) & 0xf) | (((s >> 16) & 0xf) << 4);
        format!(
            "{} family {family:#x} model {model:#x} stepping {}",
            String::from_utf8_lossy(&self.vendor),
            s & 0xf
        )
    }
}

/// Whether this host can take the configuration's template: a static template's CPU
/// vendor and model (Firecracker's rule), a custom template's KVM capabilities and CPUID
/// leaves. MSRs are checked when the vCPUs exist (`apply_msrs`).
pub fn check_host(config: &VmConfig) -> Result<(), CpuTemplateError> {
    if let Some(custom) = config.custom_cpu_template() {
        let kvm = Kvm::new().map_err(CpuTemplateError::Kvm)?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuTemplateError::Kvm)?;
        return check_custom(custom, &supported, |cap| {
            kvm.check_extension_raw(cap.into()) > 0
        });
    }
    match config.machine_config.static_template() {
        Some(t) => check_static(t, &HostCpu::read()),
        None => Ok(()),
    }
}

fn check_static(t: StaticCpuTemplate, host: &HostCpu) -> Result<(), CpuTemplateError> {
    let Some(info) = static_info(t) else {
        return Ok(());
    };
    if &host.vendor != info.vendor {
        return Err(CpuTemplateError::Vendor {
            template: t.name(),
            wanted: info.vendor_name,
            models: info.model_names,
            host: host.describe(),
        });
    }
    if !info.models.contains(&(host.signature & SIGNATURE_MASK)) {
        return Err(CpuTemplateError::Model {
            template: t.name(),
            models: info.model_names,
            host: host.describe(),
        });
    }
    Ok(())
}

fn check_custom(
    t: &CustomCpuTemplate,
    supported: &CpuId,
    has_cap: impl Fn(u32) -> bool,
) -> Result<(), CpuTemplateError> {
    for cap in &t.kvm_capabilities {
        if let KvmCapability::Require(c) = cap
            && !has_cap(*c)
        {
            return Err(CpuTemplateError::Capability(*c));
        }
    }
    for (index, m) in t.cpuid_modifiers.iter().enumerate() {
        if !supported
            .as_slice()
            .iter()
            .any(|e| e.function == m.leaf && e.index == m.subleaf)
        {
            return Err(CpuTemplateError::Leaf {
                index,
                leaf: m.leaf,
                subleaf: m.subleaf,
            });
        }
    }
    Ok(())
}

/// Applies a template's CPUID changes to (a copy of) KVM's supported CPUID. Every leaf
/// it names must be there (`check_host` said so; checked again here).
pub fn apply_cpuid(t: &CustomCpuTemplate, supported: &CpuId) -> Result<CpuId, CpuTemplateError> {
    check_custom(t, supported, |_| true)?;
    let mut cpuid = supported.clone();
    for m in &t.cpuid_modifiers {
        for e in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == m.leaf && e.index == m.subleaf)
        {
            e.flags = m.flags;
            for r in &m.modifiers {
                let reg = match r.register {
                    CpuidRegister::Eax => &mut e.eax,
                    CpuidRegister::Ebx => &mut e.ebx,
                    CpuidRegister::Ecx => &mut e.ecx,
                    CpuidRegister::Edx => &mut e.edx,
                };
                // A 32-bit bitmap's mask and value fit in 32 bits (the parser's rule).
                *reg = (r.bitmap.apply(u64::from(*reg)) & u64::from(u32::MAX)) as u32;
            }
        }
    }
    Ok(cpuid)
}

/// Applies a template's MSR changes to one vCPU whose CPUID is set (KVM decides which
/// MSRs exist from it). Run before the boot MSRs are written, which win where both set
/// an MSR, as in Firecracker.
pub fn apply_msrs(t: &CustomCpuTemplate, fd: &VcpuFd) -> Result<(), CpuTemplateError> {
    if t.msr_modifiers.is_empty() {
        return Ok(());
    }
    let entries: Vec<kvm_msr_entry> = t
        .msr_modifiers
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.addr,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|_| CpuTemplateError::Kvm(kvm_ioctls::Error::new(libc::E2BIG)))?;
    let read = fd.get_msrs(&mut msrs).map_err(CpuTemplateError::Kvm)?;
    // KVM stops at the first MSR it does not know.
    if let Some(m) = t.msr_modifiers.get(read) {
        return Err(CpuTemplateError::Msr(m.addr));
    }
    for (e, m) in msrs.as_mut_slice().iter_mut().zip(&t.msr_modifiers) {
        e.data = m.bitmap.apply(e.data);
    }
    let written = fd.set_msrs(&msrs).map_err(CpuTemplateError::Kvm)?;
    match t.msr_modifiers.get(written) {
        Some(m) => Err(CpuTemplateError::Msr(m.addr)),
        None => Ok(()),
    }
}

/// Clears in `entries` the bits the template sets to 1: what is left is what the VM was
/// shown of the host's own features.
pub fn clear_forced_bits(t: &CustomCpuTemplate, entries: &mut [kvm_bindings::kvm_cpuid_entry2]) {
    for m in &t.cpuid_modifiers {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == m.leaf && e.index == m.subleaf)
        {
            for r in &m.modifiers {
                let forced = (r.bitmap.mask & r.bitmap.value & u64::from(u32::MAX)) as u32;
                match r.register {
                    CpuidRegister::Eax => e.eax &= !forced,
                    CpuidRegister::Ebx => e.ebx &= !forced,
                    CpuidRegister::Ecx => e.ecx &= !forced,
                    CpuidRegister::Edx => e.edx &= !forced,
                }
            }
        }
    }
}

/// MSRs a template sets that a snapshot must save besides KVM's list.
pub fn extend_msr_list(config: &VmConfig, list: &mut Vec<u32>) {
    if let Some(t) = selected(config) {
        for m in &t.msr_modifiers {
            if !list.contains(&m.addr) {
                list.push(m.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn host(vendor: &[u8; 12], signature: u32) -> HostCpu {
        HostCpu {
            vendor: *vendor,
            signature,
        }
    }

    #[test]
    fn static_templates_check_vendor_and_model() {
        let milan = host(AMD, 0x00a0_0f11);
        assert!(check_static(StaticCpuTemplate::T2A, &milan).is_ok());
        let e = check_static(StaticCpuTemplate::T2, &milan)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cpu_template `T2` is for Intel CPUs (Intel Skylake, Cascade Lake and Ice Lake); \
             this host's CPU is AuthenticAMD family 0x19 model 0x1 stepping 1"
        );
        let genoa = host(AMD, 0x00a1_0f11);
        let e = check_static(StaticCpuTemplate::T2A, &genoa)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is for AMD Milan CPUs only"), "{e}");
        let cascade = host(INTEL, 0x0005_0657);
        for t in [
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2S,
            StaticCpuTemplate::T2CL,
            StaticCpuTemplate::C3,
        ] {
            assert!(check_static(t, &cascade).is_ok(), "{t:?}");
        }
        let skylake = host(INTEL, 0x0005_0654);
        assert!(check_static(StaticCpuTemplate::T2CL, &skylake).is_err());
        assert!(check_static(StaticCpuTemplate::T2A, &cascade).is_err());
    }

    #[test]
    fn static_templates_as_custom_ones() {
        let t2a = static_template(StaticCpuTemplate::T2A);
        let leaves: Vec<(u32, u32, u32)> = t2a
            .cpuid_modifiers
            .iter()
            .map(|m| (m.leaf, m.subleaf, m.flags))
            .collect();
        assert_eq!(
            leaves,
            [
                (1, 0, 0),
                (7, 0, 1),
                (0xd, 0, 1),
                (0xd, 1, 1),
                (0x8000_0001, 0, 0),
                (0x8000_0008, 0, 0)
            ]
        );
        assert!(t2a.msr_modifiers.is_empty());
        let t2s = static_template(StaticCpuTemplate::T2S);
        assert_eq!(t2s.msr_modifiers[0].addr, 0x10a);
        assert_eq!(
            static_template(StaticCpuTemplate::None),
            CustomCpuTemplate::default()
        );
        // Every value bit lies inside its mask.
        for t in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2S,
            StaticCpuTemplate::T2CL,
            StaticCpuTemplate::T2A,
        ] {
            for m in static_template(t)
                .cpuid_modifiers
                .iter()
                .flat_map(|m| &m.modifiers)
            {
                assert_eq!(m.bitmap.value & !m.bitmap.mask, 0, "{t:?}");
            }
        }
    }

    fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: v,
            ebx: v,
            ecx: v,
            edx: v,
            ..Default::default()
        }
    }

    #[test]
    fn apply_changes_the_named_bits_and_refuses_missing_leaves() {
        let supported = CpuId::from_entries(&[entry(1, 0, 0xffff_0000), entry(7, 0, 0)]).unwrap();
        let t: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
                "modifiers": [{"register": "ebx", "bitmap": "0b1x1"}, {"register": "edx", "bitmap": "0b11"}]},
               {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b0000_0000_0000_0001_xxxx_xxxx_xxxx_xxxx"}]}]}"#,
        )
        .unwrap();
        let out = apply_cpuid(&t, &supported).unwrap();
        let e7 = out.as_slice()[1];
        assert_eq!((e7.ebx, e7.edx, e7.eax, e7.flags), (0b101, 0b11, 0, 1));
        let e1 = out.as_slice()[0];
        assert_eq!((e1.ecx, e1.eax), (0x0001_0000, 0xffff_0000));
        let t: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x1", "flags": 1, "modifiers": []}]}"#,
        )
        .unwrap();
        let e = apply_cpuid(&t, &supported).unwrap_err().to_string();
        assert_eq!(
            e,
            "cpu-config: cpuid_modifiers[0]: leaf 0x7 subleaf 0x1 is not in the CPUID KVM supports on this host"
        );
        let t: CustomCpuTemplate =
            serde_json::from_str(r#"{"kvm_capabilities": ["9999", "!1"]}"#).unwrap();
        let e = check_custom(&t, &supported, |c| c != 9999)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "cpu-config: kvm_capabilities: this host's KVM lacks capability 9999"
        );
    }
}
