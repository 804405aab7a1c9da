//! The Uffd memory backend, with Firecracker's handshake so page-fault handlers written
//! for Firecracker serve ember unchanged: guest memory is anonymous and registered with a
//! userfaultfd (missing-page mode); ember connects to the handler's Unix socket and sends
//! the userfaultfd (SCM_RIGHTS) with a JSON array describing each guest region:
//! `{"base_host_virt_addr", "size", "offset" (in the memory file), "page_size",
//! "page_size_kib"}`. The handler then fills each page on first touch (UFFDIO_COPY).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::memory::RegionState;
use crate::vm::memory::GuestMemory;

// From <linux/userfaultfd.h> (x86_64).
const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// One guest region as Firecracker describes it to its page-fault handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GuestRegionUffdMapping {
    pub base_host_virt_addr: u64,
    pub size: usize,
    pub offset: u64,
    pub page_size: usize,
    /// Deprecated in Firecracker and, despite its name, the page size in bytes: that is
    /// what Firecracker sends in it, and what existing handlers read.
    pub page_size_kib: usize,
}

/// What must live as long as the VM: the userfaultfd and the connection to the handler
/// (a handler may watch it to learn that the VM is gone).
pub struct UffdBackend {
    pub uffd: File,
    pub socket: UnixStream,
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Registers `mem` (anonymous) with a new userfaultfd and hands it to the handler
/// listening at `socket_path`.
pub fn connect(
    mem: &GuestMemory,
    layout: &[RegionState],
    socket_path: &str,
    page_size: usize,
) -> Result<UffdBackend, String> {
    // SAFETY: userfaultfd(2) takes only flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(os_err(
            "userfaultfd (ember must run as root or with vm.unprivileged_userfaultfd=1)",
        ));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let uffd = unsafe { File::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api, which `api` is.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(os_err("UFFDIO_API"));
    }
    let mut mappings = Vec::with_capacity(layout.len());
    for (region, r) in mem.iter().zip(layout) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| format!("guest region at {:#x}: {e}", r.guest_addr))?;
        let mut reg = UffdioRegister {
            start: host as u64,
            len: r.size,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register; the range is a
        // live anonymous mapping owned by `mem`.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } != 0 {
            return Err(os_err("UFFDIO_REGISTER"));
        }
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: host as u64,
            size: r.size as usize,
            offset: r.file_offset,
            page_size,
            page_size_kib: page_size,
        });
    }
    let body = serde_json::to_vec(&mappings).map_err(|e| e.to_string())?;
    let socket = UnixStream::connect(socket_path)
        .map_err(|e| format!("cannot connect to the page-fault handler at {socket_path}: {e}"))?;
    socket
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|e| format!("cannot send the userfaultfd to {socket_path}: {e}"))?;
    Ok(UffdBackend { uffd, socket })
}
