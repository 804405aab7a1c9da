//! A frame-pointer walk of a guest stack, read through the guest's own page tables.
//!
//! Everything read here is guest memory, written by the guest: hostile input. Each read
//! is a checked vm-memory access of at most 8 bytes after a page-table walk of at most
//! five checked reads; the walk stops at the first address that does not translate, is
//! not aligned, does not move up the stack, or whose return address does not follow a
//! call instruction. So a sample costs a bounded number of reads, and garbage in a
//! register (a kernel built without frame pointers) ends the walk rather than inventing
//! frames.

use vm_memory::{Bytes, GuestAddress};

use crate::vm::memory::GuestMemory;

/// The deepest stack a sample records.
pub const MAX_FRAMES: usize = 48;
/// Frames further apart than this are not one stack (Linux kernel stacks are 16 KiB;
/// interrupt stacks are separate, and the walk stops at the switch).
const MAX_FRAME_GAP: u64 = 64 << 10;

const CR0_PG: u64 = 1 << 31;
const CR4_LA57: u64 = 1 << 12;
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The paging state a walk needs (from KVM_GET_SREGS).
#[derive(Clone, Copy, Debug)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
}

impl Paging {
    /// The guest-physical address of the guest-virtual `va`, if the guest maps it.
    pub fn translate(&self, mem: &GuestMemory, va: u64) -> Option<u64> {
        if self.cr0 & CR0_PG == 0 {
            return Some(va);
        }
        let levels: u32 = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        // Non-canonical addresses do not translate.
        let bits = 12 + 9 * levels;
        let top = (va as i64) >> (bits - 1);
        if top != 0 && top != -1 {
            return None;
        }
        let mut table = self.cr3 & PTE_ADDR;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let index = (va >> shift) & 0x1ff;
            let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
            if entry & PTE_PRESENT == 0 {
                return None;
            }
            // 1 GiB (level 3) and 2 MiB (level 2) pages end the walk early.
            if level == 1 || ((level == 2 || level == 3) && entry & PTE_LARGE != 0) {
                let page_mask = (1u64 << shift) - 1;
                return Some((entry & PTE_ADDR & !page_mask) | (va & page_mask));
            }
            table = entry & PTE_ADDR;
        }
        None
    }

    fn read_u64(&self, mem: &GuestMemory, va: u64) -> Option<u64> {
        // 8-aligned, so the value never straddles two pages.
        if !va.is_multiple_of(8) {
            return None;
        }
        mem.read_obj(GuestAddress(self.translate(mem, va)?)).ok()
    }

    /// The `N` bytes ending just before `va`, page by page.
    fn read_before<const N: usize>(&self, mem: &GuestMemory, va: u64) -> Option<[u8; N]> {
        let start = va.checked_sub(N as u64)?;
        let mut out = [0u8; N];
        for (i, b) in out.iter_mut().enumerate() {
            let pa = self.translate(mem, start + i as u64)?;
            *b = mem.read_obj(GuestAddress(pa)).ok()?;
        }
        Some(out)
    }
}

/// Whether the instruction just before `ret` is a call: a direct `call rel32`, or an
/// indirect `call` (opcode FF /2) of 2, 3, 6 or 7 bytes. Return addresses that fail this
/// are not return addresses.
fn follows_call(bytes: &[u8; 7]) -> bool {
    let ff2 = |at: usize| bytes[at] == 0xff && bytes.get(at + 1).is_some_and(|m| (m >> 3) & 7 == 2);
    bytes[2] == 0xe8 || ff2(5) || ff2(4) || ff2(1) || ff2(0)
}

/// Whether `ret` is an address just after a call instruction.
fn is_return_address(mem: &GuestMemory, paging: &Paging, ret: u64) -> bool {
    paging
        .read_before::<7>(mem, ret)
        .is_some_and(|b| follows_call(&b))
}

/// Appends the return addresses of the stack at `rsp` / `rbp` to `stack` (innermost
/// first), up to MAX_FRAMES entries in all.
///
/// The value at the top of the stack comes first when it is a return address: then the
/// sample was taken in a function that has no frame of its own (a leaf compiled without
/// one, which gcc does even with -fno-omit-frame-pointer, or any function before its
/// `push %rbp`), whose caller the frame chain would skip. In a function with a frame, the
/// top of the stack holds its locals or saved registers, which are rarely addresses just
/// after a call instruction. Then the frame-pointer chain from `rbp`.
pub fn frames(mem: &GuestMemory, paging: &Paging, rsp: u64, rbp: u64, stack: &mut Vec<u64>) {
    if let Some(top) = paging.read_u64(mem, rsp)
        && is_return_address(mem, paging, top)
    {
        stack.push(top);
    }
    let mut fp = rbp;
    while stack.len() < MAX_FRAMES && fp != 0 {
        let (Some(next), Some(ret)) = (
            paging.read_u64(mem, fp),
            fp.checked_add(8).and_then(|a| paging.read_u64(mem, a)),
        ) else {
            break;
        };
        if !is_return_address(mem, paging, ret) {
            break;
        }
        stack.push(ret);
        if next <= fp || next - fp > MAX_FRAME_GAP {
            break;
        }
        fp = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// Page tables at 0x1000.. mapping virtual 0xffff_8000_0000_0000 + x to x (2 MiB
    /// pages for the first 4 MiB), and identity otherwise unmapped.
    fn tables(m: &GuestMemory) -> Paging {
        let va: u64 = 0xffff_8000_0000_0000;
        let (pml4, pdpt, pd) = (0x1000u64, 0x2000u64, 0x3000u64);
        let i4 = (va >> 39) & 0x1ff;
        m.write_obj(pdpt | 3, GuestAddress(pml4 + i4 * 8)).unwrap();
        m.write_obj(pd | 3, GuestAddress(pdpt)).unwrap();
        m.write_obj(0x83u64, GuestAddress(pd)).unwrap();
        m.write_obj(0x20_0083u64, GuestAddress(pd + 8)).unwrap();
        Paging {
            cr0: CR0_PG,
            cr3: pml4,
            cr4: 0,
        }
    }

    #[test]
    fn translation_follows_the_tables_and_refuses_the_rest() {
        let m = mem();
        let p = tables(&m);
        let base = 0xffff_8000_0000_0000u64;
        assert_eq!(p.translate(&m, base + 0x12345), Some(0x12345));
        assert_eq!(p.translate(&m, base + 0x30_0000), Some(0x30_0000));
        assert_eq!(p.translate(&m, base + 0x40_0000), None);
        assert_eq!(p.translate(&m, 0x1000), None);
        assert_eq!(
            p.translate(&m, 0x0000_8000_0000_0000),
            None,
            "non-canonical"
        );
        let off = Paging { cr0: 0, ..p };
        assert_eq!(off.translate(&m, 0x1234), Some(0x1234));
    }

    #[test]
    fn walk_follows_a_chain_and_stops_at_garbage() {
        let m = mem();
        let p = tables(&m);
        let base = 0xffff_8000_0000_0000u64;
        // Code: two call sites (e8 rel32) ending at 0x100005 and 0x100105.
        m.write_obj(0xe8u8, GuestAddress(0x10_0000)).unwrap();
        m.write_obj(0xe8u8, GuestAddress(0x10_0100)).unwrap();
        // Frames at 0x8000 -> 0x8040 -> 0x8080 (whose return address is no call site).
        let frame = |at: u64, next: u64, ret: u64| {
            m.write_obj(next, GuestAddress(at)).unwrap();
            m.write_obj(ret, GuestAddress(at + 8)).unwrap();
        };
        frame(0x8000, base + 0x8040, base + 0x10_0005);
        frame(0x8040, base + 0x8080, base + 0x10_0105);
        frame(0x8080, base + 0x80c0, base + 0x10_0200);
        let mut stack = vec![1];
        frames(&m, &p, 0, base + 0x8000, &mut stack);
        assert_eq!(stack, vec![1, base + 0x10_0005, base + 0x10_0105]);
        // A frameless leaf: its return address on top of the stack comes first.
        m.write_obj(0xe8u8, GuestAddress(0x10_0300)).unwrap();
        m.write_obj(base + 0x10_0305, GuestAddress(0x7ff0)).unwrap();
        let mut stack = vec![1];
        frames(&m, &p, base + 0x7ff0, base + 0x8000, &mut stack);
        assert_eq!(
            stack,
            vec![1, base + 0x10_0305, base + 0x10_0005, base + 0x10_0105]
        );
        // A loop (frame pointing at itself) ends after one frame.
        frame(0x9000, base + 0x9000, base + 0x10_0005);
        let mut stack = vec![];
        frames(&m, &p, 0, base + 0x9000, &mut stack);
        assert_eq!(stack.len(), 1);
        // Random values never panic and never exceed the cap.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut stack = vec![];
            frames(&m, &p, x.rotate_left(7), x, &mut stack);
            frames(
                &m,
                &p,
                base + (x & 0x3f_fff8),
                base + (x & 0x3f_fff8),
                &mut stack,
            );
            assert!(stack.len() <= MAX_FRAMES);
        }
    }

    #[test]
    fn call_sites() {
        assert!(follows_call(&[0, 0, 0xe8, 1, 2, 3, 4]));
        assert!(follows_call(&[0, 0, 0, 0, 0, 0xff, 0xd0])); // call *%rax
        assert!(follows_call(&[0, 0xff, 0x15, 0, 0, 0, 0])); // call *disp32(%rip)
        assert!(!follows_call(&[0, 0, 0, 0, 0, 0xff, 0xe0])); // jmp *%rax
        assert!(!follows_call(&[0; 7]));
    }
}
