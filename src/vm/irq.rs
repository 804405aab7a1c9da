//! Interrupts: a split irqchip.
//!
//! Why: a full in-kernel irqchip (PIC + IOAPIC, and more with the PIT) adds 15-25 ms to
//! every VM teardown on our hosts (docs/ARCHITECTURE.md, host notes). ember exists for VM
//! churn, so it keeps only the LAPIC in KVM (KVM_CAP_SPLIT_IRQCHIP, teardown ~0.2 ms) and emulates
//! the IOAPIC itself (`devices::ioapic`). There is no PIC and no PIT: the guest keeps time
//! with kvmclock and the LAPIC TSC-deadline timer (see cpuid.rs).

use kvm_bindings::{KVM_CAP_SPLIT_IRQCHIP, kvm_enable_cap};
use kvm_ioctls::VmFd;

use super::layout::IOAPIC_NUM_PINS;

#[derive(Debug, thiserror::Error)]
#[error("KVM cannot create a split irqchip: {0}")]
pub struct SplitIrqchipError(kvm_ioctls::Error);

/// Enables the split irqchip: LAPICs in KVM, `IOAPIC_NUM_PINS` routes reserved for ember's IOAPIC.
pub fn create_split_irqchip(vm: &VmFd) -> Result<(), SplitIrqchipError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = u64::from(IOAPIC_NUM_PINS);
    vm.enable_cap(&cap).map_err(SplitIrqchipError)
}
