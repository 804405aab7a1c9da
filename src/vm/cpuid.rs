//! Per-vCPU CPUID, derived from what KVM supports on this host.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// What the CPUID of one vCPU depends on besides the host.
#[derive(Clone, Copy, Debug)]
pub struct CpuidParams {
    pub cpu_index: u8,
    pub cpu_count: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER: offer the LAPIC TSC-deadline timer, the guest's only
    /// timer besides kvmclock (there is no PIT or HPET).
    pub tsc_deadline: bool,
    /// The host is a PVM host: hide what its instruction emulation cannot run.
    pub pvm_host: bool,
    /// `machine-config.smt`: two threads per core (vCPU pairs share a core), as
    /// Firecracker describes it; otherwise one thread per core.
    pub smt: bool,
}

// Leaf 1 ECX.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_POPCNT: u32 = 1 << 23;
/// CMPXCHG16B, which SLUB's lockless fast path uses in the guest kernel.
const ECX_CX16: u32 = 1 << 13;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_MONITOR: u32 = 1 << 3;
// Leaf 1 EDX.
const EDX_HTT: u32 = 1 << 28;
// Leaf 6 EAX.
const EAX6_ARAT: u32 = 1 << 2;
// Leaf 7 subleaf 0 EBX.
const EBX7_SMAP: u32 = 1 << 20;
const EBX7_AVX2: u32 = 1 << 5;
const EBX7_AVX512F: u32 = 1 << 16;

/// Adjusts a copy of KVM's supported CPUID for one vCPU.
pub fn for_vcpu(supported: &CpuId, p: CpuidParams) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice().iter_mut() {
        adjust_entry(e, p);
    }
    cpuid
}

/// The pieces of PVM-host masking, for the log.
pub const PVM_MASKS: &str = "XSAVE/OSXSAVE/AVX, POPCNT, SMAP";

fn adjust_entry(e: &mut kvm_cpuid_entry2, p: CpuidParams) {
    let apic_id = u32::from(p.cpu_index);
    let count = u32::from(p.cpu_count);
    // Firecracker's SMT: two threads per core when there is more than one vCPU.
    let smt = p.smt && count > 1;
    let threads: u32 = if smt { 2 } else { 1 };
    match e.function {
        1 => {
            // EBX: initial APIC ID in 31:24, logical processor count in 23:16, CLFLUSH
            // line size (8 * 8 bytes) in 15:8.
            e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            e.ecx &= !ECX_MONITOR;
            if p.tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            }
            if p.pvm_host {
                e.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX | ECX_POPCNT | ECX_CX16);
            }
        }
        4 => {
            // Deterministic cache parameters: cores per package in 31:26 (minus one);
            // threads sharing the cache in 25:14 (minus one): the core's threads for the
            // per-core levels 1 and 2, every vCPU for the others.
            let level = (e.eax >> 5) & 7;
            e.eax &= 0x3fff;
            let cores = if smt { count.div_ceil(2) } else { count };
            if cores > 1 {
                e.eax |= (cores - 1) << 26;
            }
            let sharing = if level <= 2 { threads } else { count };
            e.eax |= (sharing.saturating_sub(1) & 0xfff) << 14;
        }
        6 => {
            // No power management for the guest, but ARAT (the LAPIC timer keeps running
            // in deep C-states, true of KVM's emulated LAPIC): without it Linux wants a
            // PIT for its timer, and there is none.
            e.eax = EAX6_ARAT;
            e.ecx = 0;
        }
        7 if e.index == 0 && p.pvm_host => {
            e.ebx &= !(EBX7_SMAP | EBX7_AVX2 | EBX7_AVX512F);
        }
        0xa => {
            // No vPMU: ember sets up no perf counters.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: `threads` per core, `count` logical processors per
            // package.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = u32::from(smt); // x2APIC ID bits of the thread
                    e.ebx = threads;
                    e.ecx = 1 << 8; // level 0, type SMT
                }
                1 => {
                    // Shift so that every APIC ID fits below the package boundary.
                    e.eax = 32 - count.saturating_sub(1).leading_zeros();
                    e.ebx = count;
                    e.ecx = (2 << 8) | 1; // level 1, type core
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n & 0xff; // invalid level terminates enumeration
                }
            }
        }
        0xd if p.pvm_host => {
            // No XSAVE state components when XSAVE is hidden.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0x8000_001e => {
            // AMD: threads per core (minus one) in EBX 15:8, the compute unit in 7:0.
            e.ebx = (e.ebx & !0xffff) | ((threads - 1) << 8) | ((apic_id / threads) & 0xff);
        }
        0x8000_0001 if p.pvm_host => {
            // ABM (LZCNT), a POPCNT sibling the same emulation path fails on.
            e.ecx &= !(1 << 5);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn params(i: u8, n: u8) -> CpuidParams {
        CpuidParams {
            cpu_index: i,
            cpu_count: n,
            tsc_deadline: true,
            pvm_host: true,
            smt: false,
        }
    }

    #[test]
    fn smt_pairs_vcpus_on_cores() {
        let smt = |i, n| CpuidParams {
            smt: true,
            ..params(i, n)
        };
        let mut e = leaf(0xb, 0);
        adjust_entry(&mut e, smt(3, 4));
        assert_eq!((e.eax, e.ebx, e.edx), (1, 2, 3));
        let mut e = leaf(0xb, 1);
        adjust_entry(&mut e, smt(3, 4));
        assert_eq!(e.ebx, 4);
        let mut e = leaf(4, 0);
        e.eax = 1 << 5; // L1
        adjust_entry(&mut e, smt(0, 4));
        assert_eq!((e.eax >> 14) & 0xfff, 1, "two threads share L1");
        assert_eq!(e.eax >> 26, 1, "two cores");
        let mut e = leaf(0x8000_001e, 0);
        adjust_entry(&mut e, smt(3, 4));
        assert_eq!((e.ebx >> 8) & 0xff, 1);
        assert_eq!(e.ebx & 0xff, 1);
        // One vCPU: no sibling to pair with, as Firecracker does it.
        let mut e = leaf(0xb, 0);
        adjust_entry(&mut e, smt(0, 1));
        assert_eq!((e.eax, e.ebx), (0, 1));
        // Without SMT: one thread per core.
        let mut e = leaf(0xb, 0);
        adjust_entry(&mut e, params(1, 4));
        assert_eq!((e.eax, e.ebx), (0, 1));
    }

    #[test]
    fn leaf1_carries_apic_id_and_tsc_deadline() {
        let mut e = leaf(1, 0);
        e.ecx = ECX_XSAVE | ECX_POPCNT | ECX_CX16;
        adjust_entry(&mut e, params(3, 4));
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e.ecx & (ECX_XSAVE | ECX_POPCNT | ECX_CX16), 0);
    }

    #[test]
    fn extended_topology_names_the_x2apic_id() {
        let mut e = leaf(0xb, 1);
        adjust_entry(&mut e, params(2, 4));
        assert_eq!(e.edx, 2);
        assert_eq!(e.ebx, 4);
        assert_eq!(e.eax, 2);
    }

    #[test]
    fn smap_hidden_on_pvm() {
        let mut e = leaf(7, 0);
        e.ebx = EBX7_SMAP;
        adjust_entry(&mut e, params(0, 1));
        assert_eq!(e.ebx & EBX7_SMAP, 0);
    }
}
