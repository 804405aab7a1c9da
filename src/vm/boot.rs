//! Loading the kernel and initrd, and the Linux x86 boot protocol data (boot_params,
//! e820 map, command line) a 64-bit entry expects.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, HIMEM_START, MMIO_GAP_START,
    ZERO_PAGE_START,
};
use super::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image: {0}")]
    ReadKernel(std::io::Error),
    #[error(
        "kernel image is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" boot header)"
    )]
    NotAKernel,
    #[error("cannot load ELF kernel: {0}")]
    Elf(linux_loader::loader::Error),
    #[error("cannot load bzImage kernel: {0}")]
    BzImage(linux_loader::loader::Error),
    #[error("bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    BzImageNot64Bit,
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("cannot read initrd: {0}")]
    ReadInitrd(std::io::Error),
    #[error(
        "kernel command line is {len} bytes with ember's additions; the limit is {max} (boot_args {user} bytes)"
    )]
    CmdlineTooLong { len: usize, max: usize, user: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// The kernel command line used when `boot_args` is absent: the serial console, reset
/// through the i8042 on reboot (ember exits then), panic reboots, and an i8042 driver that
/// does not probe what ember does not emulate.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// A loaded kernel: where to enter it, and the bzImage setup header if it was one.
pub struct LoadedKernel {
    pub entry: u64,
    pub end: u64,
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
const XLF_KERNEL_64: u16 = 1 << 0;

/// Loads an ELF vmlinux or a bzImage, deciding by its magic bytes.
pub fn load_kernel(mem: &GuestMemory, file: &mut File) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BootError::NotAKernel,
        _ => BootError::ReadKernel(e),
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    if magic == ELF_MAGIC {
        file.seek(SeekFrom::Start(0))
            .map_err(BootError::ReadKernel)?;
        let r = Elf::load(mem, None, file, himem).map_err(BootError::Elf)?;
        return Ok(LoadedKernel {
            entry: r.kernel_load.raw_value(),
            end: r.kernel_end,
            setup_header: None,
        });
    }
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .map_err(BootError::ReadKernel)?;
    if file.read_exact(&mut magic).is_err() || magic != BZIMAGE_MAGIC {
        return Err(BootError::NotAKernel);
    }
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let r = BzImage::load(mem, None, file, himem).map_err(BootError::BzImage)?;
    let hdr = r.setup_header.ok_or(BootError::NotAKernel)?;
    if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageNot64Bit);
    }
    Ok(LoadedKernel {
        // The 64-bit entry (startup_64) is 0x200 bytes into the protected-mode code.
        entry: r.kernel_load.raw_value() + 0x200,
        end: r.kernel_end,
        setup_header: Some(hdr),
    })
}

/// Places the initrd at the highest page-aligned address below the MMIO gap (and below the
/// kernel's `initrd_addr_max`), as boot loaders do, and returns (address, size).
pub fn load_initrd(
    mem: &GuestMemory,
    file: &mut File,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let size = file.seek(SeekFrom::End(0)).map_err(BootError::ReadInitrd)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitrd)?;
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    let max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|m| *m > 1)
        .unwrap_or(0x3800_0000)
        .min(low_end);
    let limit = max;
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| BootError::ReadInitrd(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Builds the command line: the user's kernel arguments, then ember's own additions, then
/// the init arguments after any `--`, so ember's additions never reach init.
pub fn build_cmdline(boot_args: Option<&str>, additions: &[String]) -> Result<String, BootError> {
    let user = boot_args.unwrap_or(DEFAULT_BOOT_ARGS);
    let (kernel_part, init_part) = split_init_args(user);
    let mut cmdline = kernel_part.trim().to_string();
    for a in additions {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(a);
    }
    if let Some(init) = init_part {
        cmdline.push_str(" --");
        if !init.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(init.trim());
        }
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    // The limit counts the terminating NUL.
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max: CMDLINE_MAX_SIZE,
            user: user.len(),
        });
    }
    Ok(cmdline)
}

/// Splits "kernel args -- init args" at the first `--` that stands as a word.
fn split_init_args(args: &str) -> (&str, Option<&str>) {
    let mut pos = 0;
    for word in args.split(' ') {
        if word == "--" {
            return (&args[..pos], Some(&args[pos + 2..]));
        }
        pos += word.len() + 1;
    }
    (args, None)
}

#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct BootParams(boot_params);
// SAFETY: boot_params is a C struct of integers and arrays with no padding-sensitive
// invariants; every bit pattern is a valid value.
unsafe impl ByteValued for BootParams {}

const E820_RAM: u32 = 1;

/// The e820 map: base memory below the EBDA, then RAM from 1 MiB, split around the gap.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    let _ = HIGH_RAM_START;
    map
}

/// Writes the command line and boot_params (zero page).
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;

    let mut params = BootParams::default();
    let p = &mut params.0;
    if let Some(hdr) = kernel.setup_header {
        p.hdr = hdr;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.kernel_alignment = 0x0100_0000;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = bytes.len() as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem);
    for (slot, (addr, size, type_)) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additions_go_before_init_args() {
        let c =
            build_cmdline(Some("console=ttyS0 -- init arg"), &["root=/dev/vda".into()]).unwrap();
        assert_eq!(c, "console=ttyS0 root=/dev/vda -- init arg");
    }

    #[test]
    fn default_is_used_without_boot_args() {
        let c = build_cmdline(None, &[]).unwrap();
        assert_eq!(c, DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn double_dash_inside_a_word_is_not_a_separator() {
        let c = build_cmdline(Some("a=--b"), &["x".into()]).unwrap();
        assert_eq!(c, "a=--b x");
    }

    #[test]
    fn length_limit_counts_the_nul() {
        let ok = "a".repeat(CMDLINE_MAX_SIZE - 1);
        assert!(build_cmdline(Some(&ok), &[]).is_ok());
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(Some(&long), &[]),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(build_cmdline(Some(&ok), &["x".into()]).is_err());
    }

    #[test]
    fn e820_splits_around_the_gap() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(HIGH_RAM_START), 1 << 20),
        ])
        .unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, 1));
        assert_eq!(map[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START, 1));
        assert_eq!(map[2], (HIGH_RAM_START, 1 << 20, 1));
    }

    /// The loader on a real bzImage: the stripped guest kernel that tools/build-guest makes
    /// (tools/test passes its path in EMBER_BZIMAGE).
    #[test]
    fn loads_a_real_bzimage_at_its_64_bit_entry() {
        let Some(path) = std::env::var_os("EMBER_BZIMAGE") else {
            eprintln!(
                "SKIP loads_a_real_bzimage_at_its_64_bit_entry: EMBER_BZIMAGE not set (tools/test sets it)"
            );
            return;
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
        let mut f = File::open(path).unwrap();
        let k = load_kernel(&mem, &mut f).unwrap();
        let hdr = k.setup_header.expect("a bzImage has a setup header");
        assert_eq!(k.entry, u64::from(hdr.code32_start) + 0x200);
        assert!(hdr.xloadflags & XLF_KERNEL_64 != 0);
        // The protected-mode code was copied to its load address.
        let mut first = [0u8; 16];
        mem.read_slice(&mut first, GuestAddress(u64::from(hdr.code32_start)))
            .unwrap();
        assert_ne!(first, [0u8; 16]);
    }
}
