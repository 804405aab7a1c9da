//! The KVM VM: memory, boot structures, CPUs and interrupts.

pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;

/// True on a PVM host (KVM served by the kvm_pvm module, see docs/ARCHITECTURE.md): guests need
/// some CPU features hidden there.
pub fn is_pvm_host() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
