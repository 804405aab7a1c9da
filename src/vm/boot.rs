//! Loading the kernel and initrd, and the Linux x86 boot protocol data (boot_params,
//! e820 map, command line) a 64-bit entry expects.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf, load_cmdline};
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
    #[error("kernel command line (boot_args and ember's additions): {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest memory: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write boot_params into guest memory: {0}")]
    WriteBootParams(linux_loader::configurator::Error),
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
/// the init arguments after any `--`, so ember's additions never reach init. linux-loader's
/// `Cmdline` splits off the init arguments (at the first `--` word outside double quotes),
/// checks ember's additions are printable ASCII and keeps the whole line, NUL included,
/// within `CMDLINE_MAX_SIZE`.
pub fn build_cmdline(boot_args: Option<&str>, additions: &[String]) -> Result<Cmdline, BootError> {
    let user = boot_args.unwrap_or(DEFAULT_BOOT_ARGS);
    let too_long = || BootError::CmdlineTooLong {
        len: user.trim().len() + additions.iter().map(|a| a.len() + 1).sum::<usize>() + 1,
        max: CMDLINE_MAX_SIZE,
        user: user.len(),
    };
    let map = |e: CmdlineError| match e {
        CmdlineError::TooLarge | CmdlineError::InvalidCapacity => too_long(),
        e => BootError::Cmdline(e),
    };
    // Spaces around the line let a `--` at its very start or end count as the separator
    // too: linux-loader looks for " -- ".
    let mut cmdline = Cmdline::try_from(&format!(" {user} "), CMDLINE_MAX_SIZE).map_err(map)?;
    for a in additions {
        cmdline.insert_str(a).map_err(map)?;
    }
    // Refuses what the kernel cannot be given (e.g. init arguments with no kernel ones).
    cmdline.as_cstring().map_err(map)?;
    Ok(cmdline)
}

/// The command line as the guest will see it (for the log).
pub fn cmdline_text(cmdline: &Cmdline) -> String {
    cmdline
        .as_cstring()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// boot_params as guest memory takes it (linux-loader does not mark it `ByteValued`).
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a C struct of integers and arrays with no padding-sensitive
// invariants; every bit pattern is a valid value.
unsafe impl ByteValued for ZeroPage {}

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

/// Writes the command line and boot_params (zero page), through linux-loader.
pub fn write_boot_params(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::WriteCmdline)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    let mut params = ZeroPage::default();
    let p = &mut params.0;
    if let Some(hdr) = kernel.setup_header {
        p.hdr = hdr;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.kernel_alignment = 0x0100_0000;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_size as u32;
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
    let zero_page = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&zero_page, mem).map_err(BootError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(boot_args: Option<&str>, additions: &[&str]) -> String {
        let additions: Vec<String> = additions.iter().map(|a| a.to_string()).collect();
        cmdline_text(&build_cmdline(boot_args, &additions).unwrap())
    }

    #[test]
    fn additions_go_before_init_args() {
        let c = text(Some("console=ttyS0 -- init arg"), &["root=/dev/vda"]);
        assert_eq!(c, "console=ttyS0 root=/dev/vda -- init arg");
    }

    #[test]
    fn a_separator_at_either_end_still_splits() {
        assert_eq!(text(Some("-- init"), &["a=b"]), "a=b -- init");
        assert_eq!(
            text(Some("console=ttyS0 --"), &["a=b"]),
            "console=ttyS0 a=b"
        );
    }

    #[test]
    fn a_quoted_separator_is_an_argument() {
        let c = text(Some(r#"x="a -- b""#), &["a=b"]);
        assert_eq!(c, r#"x="a -- b" a=b"#);
    }

    #[test]
    fn default_is_used_without_boot_args() {
        assert_eq!(text(None, &[]), DEFAULT_BOOT_ARGS);
    }

    #[test]
    fn double_dash_inside_a_word_is_not_a_separator() {
        assert_eq!(text(Some("a=--b"), &["x"]), "a=--b x");
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
        assert!(matches!(
            build_cmdline(Some(&ok), &["x".into()]),
            Err(BootError::CmdlineTooLong { .. })
        ));
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
            // Straight to stderr: libtest hides a passing test's eprintln! output.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIP loads_a_real_bzimage_at_its_64_bit_entry: EMBER_BZIMAGE not set (tools/test sets it)\n",
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
