//! Function symbols from an ELF64 image's symbol table (a vmlinux, the test guest), for
//! naming profile samples.
//!
//! The file is the user's and may be anything: every offset, size and count read from it
//! is checked against the file's length and against fixed caps before use, so a damaged
//! or hostile image yields an error or fewer symbols, never a panic or an unbounded read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// Caps on what is read: a Linux vmlinux with all symbols has a few MiB of each.
const MAX_SECTIONS: usize = 1 << 16;
const MAX_TABLE_BYTES: u64 = 256 << 20;
/// A symbol name longer than this is cut (Rust-mangled names can be long; C ones are not).
const MAX_NAME: usize = 256;

const SHT_SYMTAB: u32 = 2;
const SHF_EXECINSTR: u64 = 0x4;
const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;
const SHN_LORESERVE: u16 = 0xff00;

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ELF64 image (a bzImage has no symbol table: pass the matching vmlinux with --profile-boot-symbols)"
    )]
    NotElf { path: String },
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

/// Function symbols sorted by address.
#[derive(Debug, Default)]
pub struct Symbols {
    /// (start, size or 0 when the symbol has none, name)
    funcs: Vec<(u64, u64, String)>,
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads `len` bytes at `offset`, refusing ranges outside the file or above the cap.
fn read_range(f: &mut File, file_len: u64, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    if len > MAX_TABLE_BYTES {
        return Err(format!("a table of {len} bytes is larger than ember reads"));
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(format!(
            "a table at {offset:#x}+{len:#x} lies outside the file"
        ));
    }
    let mut buf = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

impl Symbols {
    /// Whether the file starts as an ELF image does (without reading it further).
    pub fn is_elf(path: &str) -> bool {
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && magic == *b"\x7fELF"
    }

    /// Loads the function symbols of the ELF64 file at `path`.
    pub fn load(path: &str) -> Result<Symbols, SymbolError> {
        let io = |source| SymbolError::Read {
            path: path.to_string(),
            source,
        };
        let bad = |why: String| SymbolError::Bad {
            path: path.to_string(),
            why,
        };
        let mut f = File::open(path).map_err(io)?;
        let file_len = f.metadata().map_err(io)?.len();
        let mut eh = [0u8; 64];
        if f.read_exact(&mut eh).is_err() || &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return Err(SymbolError::NotElf {
                path: path.to_string(),
            });
        }
        let field = |v: Option<u64>| v.ok_or_else(|| bad("truncated ELF header".into()));
        let shoff = field(le_u64(&eh, 0x28))?;
        let shentsize = field(le_u16(&eh, 0x3a).map(u64::from))?;
        let shnum = field(le_u16(&eh, 0x3c).map(u64::from))?;
        if shentsize < 64 || shnum == 0 || shnum as usize > MAX_SECTIONS {
            return Err(bad(
                "no section headers (a stripped image has no symbols)".into()
            ));
        }
        let sh = read_range(&mut f, file_len, shoff, shentsize * shnum).map_err(bad)?;
        // (type, flags, offset, size, link, entsize) of section i.
        let section = |i: usize| -> Option<(u32, u64, u64, u64, u32, u64)> {
            let b = sh.get(i * shentsize as usize..(i + 1) * shentsize as usize)?;
            Some((
                le_u32(b, 4)?,
                le_u64(b, 8)?,
                le_u64(b, 0x18)?,
                le_u64(b, 0x20)?,
                le_u32(b, 0x28)?,
                le_u64(b, 0x38)?,
            ))
        };
        let shnum = shnum as usize;
        let Some((_, _, sym_off, sym_size, link, entsize)) =
            (0..shnum).filter_map(section).find(|s| s.0 == SHT_SYMTAB)
        else {
            return Err(bad("no symbol table (stripped?)".into()));
        };
        if entsize < 24 {
            return Err(bad(format!("symbol entries of {entsize} bytes")));
        }
        let Some((_, _, str_off, str_size, _, _)) = section(link as usize) else {
            return Err(bad("the symbol table names no string table".into()));
        };
        let syms = read_range(&mut f, file_len, sym_off, sym_size).map_err(bad)?;
        let strs = read_range(&mut f, file_len, str_off, str_size).map_err(bad)?;
        let mut funcs = Vec::new();
        for e in syms.chunks_exact(entsize as usize) {
            let (Some(name), Some(value), Some(size), Some(&info), Some(shndx)) = (
                le_u32(e, 0),
                le_u64(e, 8),
                le_u64(e, 16),
                e.get(4),
                le_u16(e, 6),
            ) else {
                continue;
            };
            let kind = info & 0xf;
            if value == 0 || shndx == 0 || shndx >= SHN_LORESERVE {
                continue;
            }
            // Functions, and assembly labels without a type in executable sections
            // (Linux's entry code has some).
            let exec = section(usize::from(shndx)).is_some_and(|s| s.1 & SHF_EXECINSTR != 0);
            if !(kind == STT_FUNC || (kind == STT_NOTYPE && exec)) {
                continue;
            }
            let Some(tail) = strs.get(name as usize..) else {
                continue;
            };
            let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
            let raw = &tail[..end.min(MAX_NAME)];
            if raw.is_empty() || raw.starts_with(b".L") {
                continue;
            }
            funcs.push((value, size, clean_name(raw)));
        }
        Ok(Symbols::from_entries(funcs))
    }

    /// Symbols from (start, size, name) entries in any order.
    pub fn from_entries(mut funcs: Vec<(u64, u64, String)>) -> Symbols {
        // At one address, prefer a sized symbol (a FUNC over a label), then the first name.
        funcs.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        funcs.dedup_by_key(|s| s.0);
        Symbols { funcs }
    }

    pub fn len(&self) -> usize {
        self.funcs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }

    /// The function containing `addr`: the nearest symbol at or below it, if `addr` lies
    /// within its size (or, for a symbol without a size, before the next symbol).
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        self.lookup_offset(addr).map(|(name, _)| name)
    }

    /// As `lookup`, with `addr`'s offset into the function.
    pub fn lookup_offset(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.funcs.partition_point(|s| s.0 <= addr).checked_sub(1)?;
        let (start, size, name) = self.funcs.get(i)?;
        let inside = if *size > 0 {
            addr - start < *size
        } else {
            // Unsized labels: only up to the next symbol, and at most a page on.
            addr - start < 4096
        };
        inside.then_some((name.as_str(), addr - start))
    }
}

/// A name safe in a folded-stack line: `;` separates frames and a space the count.
fn clean_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .map(|c| {
            if c == ';' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_respects_sizes_and_gaps() {
        let s = Symbols::from_entries(vec![
            (0x2000, 0x10, "b".into()),
            (0x1000, 0x100, "a".into()),
            (0x3000, 0, "label".into()),
            (0x1000, 0, "alias".into()),
        ]);
        assert_eq!(s.lookup(0x1000), Some("a"));
        assert_eq!(s.lookup(0x10ff), Some("a"));
        assert_eq!(s.lookup(0x1100), None);
        assert_eq!(s.lookup(0x200f), Some("b"));
        assert_eq!(s.lookup(0x3fff), Some("label"));
        assert_eq!(s.lookup(0x4000), None);
        assert_eq!(s.lookup(0xfff), None);
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn names_cannot_break_folded_lines() {
        assert_eq!(clean_name(b"a;b c\n"), "a_b_c_");
    }

    #[test]
    fn damaged_files_are_errors_not_panics() {
        let dir = std::env::temp_dir().join(format!("ember-sym-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        let ps = p.to_str().unwrap();
        std::fs::write(&p, b"MZ not an elf").unwrap();
        assert!(matches!(Symbols::load(ps), Err(SymbolError::NotElf { .. })));
        // An ELF header whose section table points far past the end of the file.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        h[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        std::fs::write(&p, &h).unwrap();
        assert!(matches!(Symbols::load(ps), Err(SymbolError::Bad { .. })));
        // Every truncation of a real image fails cleanly.
        let guest = option_env!("EMBER_TEST_GUEST");
        if let Some(g) = guest.and_then(|g| std::fs::read(g).ok()) {
            let full = Symbols::load(guest.unwrap()).unwrap();
            assert!(full.len() > 10);
            for cut in (0..g.len()).step_by(g.len() / 97 + 1) {
                std::fs::write(&p, &g[..cut]).unwrap();
                let _ = Symbols::load(ps);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
