//! Intel MultiProcessor table (spec 1.4): how a guest without ACPI learns its CPUs, its
//! IOAPIC and how ISA interrupts reach it.

use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::layout::{IOAPIC_NUM_PINS, IOAPIC_START, LAPIC_START, MPTABLE_START};
use super::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3: u8,
    feature4: u8,
    feature5: u8,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIntsrc {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: each of these is a packed, plain-old-data struct of integers and byte arrays:
// every bit pattern is valid and there is no padding.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIntsrc {}

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_SRC_INT: u8 = 0;
const MP_IRQ_SRC_NMI: u8 = 1;
const MP_IRQ_SRC_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const MPC_APIC_USABLE: u8 = 1;
/// Processor signature (family 6) and features (FPU, APIC) as the spec wants them filled.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

/// Sum of all bytes, so that a checksum byte can make the total zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// The MP table's size for `cpus` processors, so the layout can be checked statically.
pub const fn table_size(cpus: usize) -> usize {
    std::mem::size_of::<MpfIntel>()
        + std::mem::size_of::<MpcTable>()
        + cpus * std::mem::size_of::<MpcCpu>()
        + std::mem::size_of::<MpcBus>()
        + std::mem::size_of::<MpcIoapic>()
        + IOAPIC_NUM_PINS as usize * std::mem::size_of::<MpcIntsrc>()
        + 2 * std::mem::size_of::<MpcIntsrc>()
}

// The table for the largest VM must fit in the last KiB of base memory.
const _: () = assert!(table_size(32) <= 1024);

/// Builds the MP table for `cpus` vCPUs (APIC IDs 0..cpus) at MPTABLE_START.
pub fn setup(mem: &GuestMemory, cpus: u8) -> Result<(), MptableError> {
    if cpus > 32 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus + 1;
    let mut body: Vec<u8> = Vec::with_capacity(1024);
    for cpu in 0..cpus {
        let e = MpcCpu {
            type_: MP_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        };
        body.extend_from_slice(e.as_slice());
    }
    let bus = MpcBus {
        type_: MP_BUS,
        busid: 0,
        bustype: *b"ISA   ",
    };
    body.extend_from_slice(bus.as_slice());
    let ioapic = MpcIoapic {
        type_: MP_IOAPIC,
        apicid: ioapic_id,
        apicver: APIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    };
    body.extend_from_slice(ioapic.as_slice());
    // Every IOAPIC pin is an ISA interrupt with the bus's default polarity and trigger
    // (active high, edge), identity-mapped: IRQ n arrives on pin n.
    for pin in 0..IOAPIC_NUM_PINS as u8 {
        let e = MpcIntsrc {
            type_: MP_INTSRC,
            irqtype: MP_IRQ_SRC_INT,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: pin,
            dstapic: ioapic_id,
            dstirq: pin,
        };
        body.extend_from_slice(e.as_slice());
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, to all LAPICs.
    for (irqtype, lint) in [(MP_IRQ_SRC_EXTINT, 0u8), (MP_IRQ_SRC_NMI, 1u8)] {
        let e = MpcIntsrc {
            type_: MP_LINTSRC,
            irqtype,
            irqflag: 0,
            srcbus: 0,
            srcbusirq: 0,
            dstapic: 0xff,
            dstirq: lint,
        };
        body.extend_from_slice(e.as_slice());
    }

    let mpf_size = std::mem::size_of::<MpfIntel>() as u64;
    let table_addr = MPTABLE_START + mpf_size;
    let mut header = MpcTable {
        signature: *b"PCMP",
        length: (std::mem::size_of::<MpcTable>() + body.len()) as u16,
        spec: 4,
        checksum: 0,
        oem: *b"EMBER   ",
        productid: *b"000000000000",
        oemptr: 0,
        oemsize: 0,
        oemcount: (u16::from(cpus)) + 1 + 1 + IOAPIC_NUM_PINS as u16 + 2,
        lapic: LAPIC_START as u32,
        reserved: 0,
    };
    let sum = checksum(header.as_slice()).wrapping_add(checksum(&body));
    header.checksum = 0u8.wrapping_sub(sum);

    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: table_addr as u32,
        length: 1,
        specification: 4,
        ..Default::default()
    };
    mpf.checksum = 0u8.wrapping_sub(checksum(mpf.as_slice()));

    mem.write_obj(mpf, GuestAddress(MPTABLE_START))?;
    mem.write_obj(header, GuestAddress(table_addr))?;
    mem.write_slice(
        &body,
        GuestAddress(table_addr + std::mem::size_of::<MpcTable>() as u64),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_are_zero_and_cpus_counted() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 4).unwrap();
        let mpf: MpfIntel = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(checksum(mpf.as_slice()), 0);
        let table: MpcTable = mem.read_obj(GuestAddress({ mpf.physptr } as u64)).unwrap();
        let mut raw = vec![0u8; table.length as usize];
        mem.read_slice(&mut raw, GuestAddress({ mpf.physptr } as u64))
            .unwrap();
        assert_eq!(checksum(&raw), 0);
        let cpus = raw[44..]
            .chunks(20)
            .take_while(|c| c[0] == MP_PROCESSOR)
            .count();
        assert_eq!(cpus, 4);
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(setup(&mem, 33).is_err());
    }
}
