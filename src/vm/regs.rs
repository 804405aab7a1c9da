//! Boot-CPU state for a direct 64-bit kernel entry: GDT, identity page tables, segment
//! and control registers, general registers, MSRs, FPU and LAPIC. No firmware runs: the
//! kernel's 64-bit entry point sees what a Linux boot loader would leave behind.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};
use super::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused the boot CPU state ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from its parts (the layout the CPU expects).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Null, 64-bit code, data, TSS: the same GDT Linux's own 64-bit boot path uses.
const GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With the granularity bit set the limit counts 4 KiB pages.
        limit: if g == 1 {
            ((limit as u32) << 12) | 0xfff
        } else {
            limit as u32
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(((entry >> 47) & 1) == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables (2 MiB pages over the first
/// `BOOT_PD_COUNT` GiB) into guest memory. Done once per VM, shared by every vCPU.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for pd in 0..BOOT_PD_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(PDPTE_START + pd * 8))?;
        let mut entries = [0u8; 4096];
        for (i, chunk) in entries.chunks_exact_mut(8).enumerate() {
            // Present | writable | page size (2 MiB).
            let phys = (pd << 30) | ((i as u64) << 21) | 0x83;
            chunk.copy_from_slice(&phys.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    Ok(())
}

/// Sets the boot CPU's registers for a 64-bit entry at `entry`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    let code = segment_from_gdt(GDT[1], 1);
    let data = segment_from_gdt(GDT[2], 2);
    let tss = segment_from_gdt(GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG | X86_CR0_ET) & !(1 << 30 | 1 << 29);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
    Ok(())
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MSRs, FPU and LAPIC for every vCPU (boot CPU and APs alike).
pub fn setup_cpu_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        // Fast strings, as firmware would enable.
        entry(MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back: there is no firmware to program them.
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Kvm {
        what: "build MSR list",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if set != entries.len() {
        log::debug!("KVM accepted {set} of {} boot MSRs", entries.len());
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU"))?;

    // LINT0 as ExtINT and LINT1 as NMI, as the MP spec's virtual-wire mode expects.
    let mut lapic = vcpu.get_lapic().map_err(kvm("get LAPIC"))?;
    set_lapic_reg(&mut lapic, 0x350, |v| (v & !0x700) | (7 << 8));
    set_lapic_reg(&mut lapic, 0x360, |v| (v & !0x700) | (4 << 8));
    vcpu.set_lapic(&lapic).map_err(kvm("set LAPIC"))?;
    Ok(())
}

fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, f: impl Fn(u32) -> u32) {
    let Some(bytes) = lapic.regs.get_mut(offset..offset + 4) else {
        return;
    };
    let mut raw = [0u8; 4];
    for (dst, src) in raw.iter_mut().zip(bytes.iter()) {
        *dst = *src as u8;
    }
    let new = f(u32::from_le_bytes(raw)).to_le_bytes();
    for (dst, src) in bytes.iter_mut().zip(new) {
        *dst = src as std::os::raw::c_char;
    }
}

/// The LAPIC ID KVM holds for this vCPU (bits 31:24 of the ID register).
pub fn lapic_id(vcpu: &VcpuFd) -> Option<u32> {
    let lapic = vcpu.get_lapic().ok()?;
    let bytes = lapic.regs.get(0x20..0x24)?;
    let raw = [
        bytes[0] as u8,
        bytes[1] as u8,
        bytes[2] as u8,
        bytes[3] as u8,
    ];
    Some(u32::from_le_bytes(raw) >> 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_long_mode() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.selector, 8);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.present, 1);
    }

    #[test]
    fn page_tables_identity_map_first_gigabytes() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pd3: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 8))
            .unwrap();
        assert_eq!(pd3, (3 << 30) | (1 << 21) | 0x83);
        let pdpt1: u64 = mem.read_obj(GuestAddress(PDPTE_START + 8)).unwrap();
        assert_eq!(pdpt1, (PDE_START + 0x1000) | 3);
    }
}
