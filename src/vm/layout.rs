//! Every guest-physical address, I/O port and IRQ number ember uses, in one place.
//!
//! The low 1 MiB follows the PC conventions Linux expects (boot structures below the
//! EBDA, MP table at the top of base memory). Above it, RAM is contiguous up to the
//! 32-bit MMIO gap; RAM that does not fit below the gap continues at 4 GiB.

/// Guest-physical address of the GDT ember builds for long mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// Guest-physical address of the (empty) IDT loaded at entry; the guest installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"); its address is passed to the kernel in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU: below the zero page, above the GDT.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, and `BOOT_PD_COUNT` page directories of 2 MiB
/// pages. They map the first `BOOT_PD_COUNT` GiB, enough for any kernel image and its
/// early allocations; a guest that needs more maps it itself (Linux builds its own tables).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Four page directories (0xb000..0xf000) map the first 4 GiB: all RAM below the gap
/// and the MMIO gap itself, so early guest code can reach devices without mapping them.
pub const BOOT_PD_COUNT: u64 = 4;
/// Kernel command line. 0x20000 is where Linux's own boot protocol puts it; it leaves room
/// for the maximum length below the EBDA.
pub const CMDLINE_START: u64 = 0x20000;
/// The longest command line ember accepts, including the terminating NUL (Linux x86's
/// COMMAND_LINE_SIZE is 2048).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and table: in the last KiB of base memory, where Linux scans.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of usable base memory: the EBDA and legacy ROM/VGA holes follow (not RAM).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels and initrds load at or above 1 MiB (HIMEM).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap: [MMIO_GAP_START, 4 GiB). Same start as Firecracker, so guest
/// images and tools that poke the boot timer at 0xd000_0000 work unchanged.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// RAM beyond what fits below the gap starts here.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// Boot-timer device (Firecracker-compatible: the guest writes 123 at offset 0).
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// virtio-mmio devices: one 4 KiB window each, in order of creation.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// At most this many virtio devices (their IRQs must stay below the IOAPIC's 24 pins).
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 18;

/// IOAPIC (emulated by ember; see vm/irq.rs) and LAPIC (in KVM) MMIO bases.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC pins (GSIs 0..24).
pub const IOAPIC_NUM_PINS: u32 = 24;

/// Legacy ports and IRQs.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_SIZE: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT_BASE: u16 = 0x60;
/// The i8042 covers 0x60..=0x64 (data at 0x60, command/status at 0x64).
pub const I8042_PORT_SIZE: u16 = 5;
pub const I8042_IRQ: u32 = 1;
/// First IRQ handed to virtio-mmio devices (0-4 are the legacy devices above).
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// KVM_SET_TSS_ADDR needs three pages of guest-physical space that is neither RAM nor a
/// device: near the top of 4 GiB, above the LAPIC (Firecracker's choice too).
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
