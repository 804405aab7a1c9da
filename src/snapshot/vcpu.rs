//! One vCPU's architectural state: what KVM holds for it, saved on its own thread while
//! the VM is paused and set again, in an order KVM accepts, before a restored vCPU first
//! runs.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::format::pod;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The size of `struct kvm_xsave`: KVM_SET_XSAVE reads more than this only when the
/// guest may use dynamically enabled state (AMX), which ember never permits.
pub const XSAVE_SIZE: usize = size_of::<kvm_xsave>();

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrState {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM keeps for one vCPU that the guest can observe.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    #[serde(with = "pod::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    #[serde(with = "pod")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "pod")]
    pub regs: kvm_regs,
    #[serde(with = "pod")]
    pub sregs: kvm_sregs,
    #[serde(with = "pod")]
    pub xsave: kvm_xsave,
    /// None when the host has no XSAVE (KVM_GET_XCRS fails).
    #[serde(default, with = "opt_xcrs")]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(with = "pod")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "pod")]
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrState>,
    #[serde(with = "pod")]
    pub events: kvm_vcpu_events,
}

mod opt_xcrs {
    use kvm_bindings::kvm_xcrs;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::pod;

    pub fn serialize<S: Serializer>(v: &Option<kvm_xcrs>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => s.serialize_some(&pod::to_hex(pod::as_bytes(x))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<kvm_xcrs>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        pod::from_hex(&s)
            .and_then(|b| pod::from_bytes(&b))
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("xcrs: wrong size or not hex"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM refused MSR {msr:#x} ({set} of {total} set)")]
    Msr {
        index: u8,
        msr: u32,
        set: usize,
        total: usize,
    },
    #[error("vCPU {index}: {0}", index = .1)]
    Invalid(String, u8),
}

fn kvm(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        index,
        what,
        source,
    }
}

/// Finishes an I/O or MMIO exit KVM is still waiting to complete: with immediate_exit
/// set, KVM_RUN completes it (the guest's IN gets its value, the instruction retires)
/// and returns EINTR without entering the guest. The state read afterwards is the one
/// after the instruction, which is what the restored vCPU must resume from.
pub fn complete_pending_exit(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => log::warn!("completing a pending exit: KVM_RUN: {e}"),
        Ok(exit) => log::warn!("completing a pending exit: unexpected exit {exit:?}"),
    }
    fd.set_kvm_immediate_exit(0);
}

/// Reads the values of `msr_list` KVM accepts for this vCPU; an MSR KVM lists but will
/// not read on this host is left out (KVM_GET_MSRS stops at the first it cannot read).
fn save_msrs(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Vec<MsrState>, VcpuStateError> {
    let mut out = Vec::with_capacity(msr_list.len());
    let mut rest = msr_list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|i| kvm_msr_entry {
                index: *i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| VcpuStateError::Invalid(format!("MSR list: {e:?}"), index))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm(index, "KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| MsrState {
            index: e.index,
            data: e.data,
        }));
        // Entry n could not be read: skip it and go on with the others.
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(out)
}

/// Saves the state of a vCPU that is not running (its own thread, paused).
pub fn save(fd: &mut VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    complete_pending_exit(fd);
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm(index, "KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: fd.get_mp_state().map_err(kvm(index, "KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(kvm(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm(index, "KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm(index, "KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd
            .get_debug_regs()
            .map_err(kvm(index, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(kvm(index, "KVM_GET_LAPIC"))?,
        msrs: save_msrs(fd, index, msr_list)?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm(index, "KVM_GET_VCPU_EVENTS"))?,
    })
}

/// The MSRs in the order KVM needs them: the TSC first (later writes are relative to
/// it), the TSC deadline last (KVM drops a deadline set before the TSC and the LAPIC).
pub fn msrs_in_set_order(msrs: &[MsrState]) -> Vec<kvm_msr_entry> {
    let rank = |i: u32| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut v: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    v.sort_by_key(|e| rank(e.index));
    v
}

/// Sets a saved state on a fresh vCPU, before its first KVM_RUN. The order is the one
/// ENVIRONMENT.md measured: CPUID first (SREGS and APIC_BASE are refused without it),
/// LAPIC before the MSRs (or the TSC deadline is silently dropped), XSAVE rather than
/// FPU (XMM state would be lost).
pub fn restore(fd: &VcpuFd, index: u8, s: &VcpuState) -> Result<(), VcpuStateError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| {
        VcpuStateError::Invalid(format!("CPUID of {} entries: {e:?}", s.cpuid.len()), index)
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(kvm(index, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(kvm(index, "KVM_SET_SREGS"))?;
    // SAFETY: the caller checked that KVM_CAP_XSAVE2 reports at most XSAVE_SIZE bytes
    // (see `check_xsave_size`), so KVM reads no further than the kvm_xsave we pass.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm(index, "KVM_SET_XSAVE"))?;
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm(index, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(kvm(index, "KVM_SET_LAPIC"))?;
    let entries = msrs_in_set_order(&s.msrs);
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| VcpuStateError::Invalid(format!("{} MSRs: {e:?}", entries.len()), index))?;
    let set = fd.set_msrs(&msrs).map_err(kvm(index, "KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(VcpuStateError::Msr {
            index,
            msr: entries.get(set).map_or(0, |e| e.index),
            set,
            total: entries.len(),
        });
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Refuses a host whose KVM_SET_XSAVE would read more than a `kvm_xsave`.
pub fn check_xsave_size(vm: &kvm_ioctls::VmFd) -> Result<(), String> {
    let size = vm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > 0 && size as usize > XSAVE_SIZE {
        return Err(format!(
            "this host's KVM needs {size}-byte XSAVE buffers (dynamic XSAVE state); ember saves {XSAVE_SIZE}"
        ));
    }
    Ok(())
}

/// CPUID leaves whose bits say what the guest may use: every bit a snapshot's vCPU saw
/// set there must be one this host can offer.
const FEATURE_LEAVES: &[(u32, u32)] = &[(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];
/// Bits of leaf 1 ECX ember sets itself whatever the host says (hypervisor, TSC deadline).
const LEAF1_ECX_OURS: u32 = (1 << 31) | (1 << 24);
/// Leaf 1 EDX bit 28 (HTT) ember sets for multi-vCPU guests.
const LEAF1_EDX_OURS: u32 = 1 << 28;

/// What this host can show a guest: KVM's supported CPUID with the CPU's own bits added.
/// KVM emulates some features the CPU lacks (and reports them as supported); a PVM host
/// reports a narrow supported set but lets the guest see the CPU's own CPUID, which is
/// what its vCPUs then report and what a snapshot made there holds.
pub fn host_cpuid(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut out = supported.to_vec();
    for &(function, index) in FEATURE_LEAVES {
        let raw = std::arch::x86_64::__cpuid_count(function, index);
        let indexed = function == 7 || function == 0xd;
        match out
            .iter_mut()
            .find(|e| e.function == function && (!indexed || e.index == index))
        {
            Some(e) => {
                e.eax |= raw.eax;
                e.ebx |= raw.ebx;
                e.ecx |= raw.ecx;
                e.edx |= raw.edx;
            }
            None => out.push(kvm_cpuid_entry2 {
                function,
                index,
                eax: raw.eax,
                ebx: raw.ebx,
                ecx: raw.ecx,
                edx: raw.edx,
                ..Default::default()
            }),
        }
    }
    out
}

/// Checks that the host can offer every CPU feature the snapshot's guest was shown;
/// the error names the leaf, register and bits missing.
pub fn check_cpuid(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Result<(), String> {
    for &(function, index) in FEATURE_LEAVES {
        // Leaves 1 and 0x8000_0001 have no subleaves: their index field means nothing.
        let indexed = function == 7 || function == 0xd;
        let matches =
            |e: &&kvm_cpuid_entry2| e.function == function && (!indexed || e.index == index);
        let Some(s) = saved.iter().find(matches) else {
            continue;
        };
        let h = host.iter().find(matches).copied().unwrap_or_default();
        let (mut ours_ecx, mut ours_edx) = (0, 0);
        if function == 1 {
            ours_ecx = LEAF1_ECX_OURS;
            ours_edx = LEAF1_EDX_OURS;
        }
        let regs = [
            ("EAX", s.eax, h.eax, 0),
            ("EBX", s.ebx, h.ebx, 0),
            ("ECX", s.ecx, h.ecx, ours_ecx),
            ("EDX", s.edx, h.edx, ours_edx),
        ];
        for (name, want, have, ours) in regs {
            // Leaf 1 EAX is the family/model/stepping, EBX the APIC ID: not features.
            if function == 1 && (name == "EAX" || name == "EBX") {
                continue;
            }
            if function == 0xd && name != "EAX" {
                continue;
            }
            let missing = want & !have & !ours;
            if missing != 0 {
                return Err(format!(
                    "the snapshot's CPU offered features this host cannot: CPUID leaf {function:#x} \
                     subleaf {index} {name} bits {missing:#010x}"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn msr_order_tsc_first_deadline_last() {
        let m = |index| MsrState { index, data: 1 };
        let v = msrs_in_set_order(&[
            m(MSR_IA32_TSC_DEADLINE),
            m(0x174),
            m(MSR_IA32_TSC),
            m(0x4b56_4d01),
        ]);
        let order: Vec<u32> = v.iter().map(|e| e.index).collect();
        assert_eq!(
            order,
            [MSR_IA32_TSC, 0x174, 0x4b56_4d01, MSR_IA32_TSC_DEADLINE]
        );
    }

    #[test]
    fn cpuid_the_host_lacks_is_named() {
        let host = [leaf(1, 0, 0b0110, 0), leaf(7, 0, 0, 0)];
        assert!(check_cpuid(&[leaf(1, 0, 0b0010 | LEAF1_ECX_OURS, 0)], &host).is_ok());
        let e = check_cpuid(&[leaf(1, 0, 0b1000, 0)], &host).unwrap_err();
        assert!(e.contains("leaf 0x1 subleaf 0 ECX bits 0x00000008"), "{e}");
        let e = check_cpuid(&[leaf(7, 0, 0, 1 << 4)], &host).unwrap_err();
        assert!(e.contains("leaf 0x7 subleaf 0 EDX"), "{e}");
        // A leaf the host does not have at all offers nothing.
        let e = check_cpuid(&[leaf(0x8000_0001, 0, 1, 0)], &host).unwrap_err();
        assert!(e.contains("0x80000001"), "{e}");
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = VcpuState {
            cpuid: vec![leaf(1, 0, 5, 6)],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs: kvm_regs {
                rip: 0xffff_8000_0000_1234,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: None,
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![MsrState {
                index: 0x10,
                data: 42,
            }],
            events: Default::default(),
        };
        let j = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&j).unwrap();
        assert_eq!(back.regs.rip, s.regs.rip);
        assert_eq!(back.cpuid[0].edx, 6);
        assert_eq!(back.mp_state.mp_state, 3);
        assert_eq!(back.msrs, s.msrs);
        assert!(back.xcrs.is_none());
    }
}
