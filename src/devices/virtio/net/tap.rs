//! A host TAP device opened through /dev/net/tun: the backend of virtio-net.
//!
//! The TAP carries a 12-byte virtio-net header (virtio 1.x, `num_buffers` included) in
//! front of every frame in both directions, so offloads (checksum, TSO) pass between the
//! guest and the host kernel without ember touching the packets. The fd is non-blocking:
//! the event loop reads it when epoll says so and never waits on it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::config::net::MAX_HOST_DEV_NAME_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// Size of the virtio-net header on the TAP: `struct virtio_net_hdr_mrg_rxbuf`, the only
/// layout a VERSION_1 driver uses.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded, and /dev/net/tun present?)")]
    OpenTun(io::Error),
    #[error("TAP device name `{0}` is longer than {MAX_HOST_DEV_NAME_LEN} bytes")]
    Name(String),
    #[error(
        "TAP device `{name}` does not exist and cannot be created, or belongs to another \
         user ({source}); create it with `ip tuntap add dev {name} mode tap` or run ember \
         with CAP_NET_ADMIN"
    )]
    NotPermitted { name: String, source: io::Error },
    #[error("TAP device `{name}` is in use by another process ({source})")]
    Busy { name: String, source: io::Error },
    #[error(
        "`{name}` cannot be used as a TAP device ({source}): an interface of that name \
         exists and is not a TAP (a TUN device or another kind)"
    )]
    NotATap { name: String, source: io::Error },
    #[error("cannot open or create TAP device `{name}`: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("TAP device `{name}`: cannot set the virtio-net header size: {source}")]
    VnetHdr { name: String, source: io::Error },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    /// The rest of the 24-byte union.
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP device `name`, creating it if it does not exist (that needs
    /// CAP_NET_ADMIN; a TAP created here disappears when ember exits). The TAP is set up
    /// for 12-byte virtio-net headers and no offloads (see [`Tap::set_offload`]). An
    /// empty `name` creates a new TAP that the kernel names (as Firecracker allows);
    /// [`Tap::name`] then gives the kernel's name.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.len() > MAX_HOST_DEV_NAME_LEN {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        // The name is at most IFNAMSIZ - 1 bytes, so the last byte stays NUL.
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads (and may update) one `struct ifreq`; `req` has its
        // layout and size (40 bytes) and lives across the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if r < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotPermitted { name, source },
                Some(libc::EBUSY) => TapError::Busy { name, source },
                Some(libc::EINVAL) => TapError::NotATap { name, source },
                _ => TapError::SetIff { name, source },
            });
        }
        // The kernel writes the device's name back (the one it chose for an empty name).
        let given: Vec<u8> = req
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&given).into_owned(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which outlives the call.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if r < 0 {
            return Err(TapError::VnetHdr {
                name: tap.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // A TAP kept from an earlier user may still have offloads on: until the guest
        // negotiates them, it must get only plain frames.
        if let Err(e) = tap.set_offload(0) {
            log::warn!("TAP `{}`: cannot clear offloads: {e}", tap.name);
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// TUNSETOFFLOAD: which offloaded packets (TUN_F_*) the kernel may hand us, i.e.
    /// what the guest's driver accepted to receive.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// What virtio-net needs from its host side: whole frames (virtio-net header first) in
/// and out, an fd to watch, and the receive offloads. The TAP is the real one; tests use
/// a datagram socket pair.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sets the receive offloads (TUN_F_* flags).
    fn set_offload(&mut self, flags: libc::c_uint) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A TAP write takes the whole frame or fails; it never writes part of it.
        let n = self.file.write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }

    fn set_offload(&mut self, flags: libc::c_uint) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn bad_names() {
        assert!(matches!(
            Tap::open("a-very-long-tap-name"),
            Err(TapError::Name(_))
        ));
    }

    /// An empty name (Firecracker accepts it) makes a TAP the kernel names; the name is
    /// read back. Needs root and /dev/net/tun, as every test host has.
    #[test]
    fn empty_name_gets_a_kernel_named_tap() {
        let tap = Tap::open("").expect("a kernel-named TAP (root and /dev/net/tun needed)");
        assert!(!tap.name().is_empty(), "no name read back");
        assert!(
            std::path::Path::new("/sys/class/net")
                .join(tap.name())
                .exists(),
            "{} is not a network device",
            tap.name()
        );
    }

    #[test]
    fn existing_non_tap_is_refused() {
        // "lo" exists in every network namespace and is no TAP: TUNSETIFF refuses it
        // with EINVAL (the test machines have /dev/net/tun and root, so no other error
        // may stand in for that one).
        match Tap::open("lo") {
            Err(TapError::NotATap { name, source }) => {
                assert_eq!(name, "lo");
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}");
            }
            Err(e) => panic!("`lo` refused for another reason: {e}"),
            Ok(_) => panic!("`lo` opened as a TAP"),
        }
    }
}
