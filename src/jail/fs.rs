//! The jail's files on the host: the locked `<base>/ember/<id>` directory, the root with
//! its device nodes, host files put in it, and, in the VMM, the switch of `/` into it.

use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{JailArgs, JailError};

/// Device nodes the VMM needs: (host path, path in the jail, required).
const DEVICES: [(&str, &str, bool); 3] = [
    ("/dev/kvm", "dev/kvm", true),
    // Only needed with a network interface; a host without TUN still runs VMs.
    ("/dev/net/tun", "dev/net/tun", false),
    ("/dev/urandom", "dev/urandom", false),
];

pub(super) fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn last_err<T>() -> std::io::Result<T> {
    Err(std::io::Error::last_os_error())
}

/// Opens the network namespace and joins it now, while ember is single-threaded and
/// before it opens anything that lives in a network namespace (the TAP).
pub(super) fn open_netns(path: &Path) -> Result<OwnedFd, JailError> {
    let err = |source| JailError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    // SAFETY: setns on a descriptor we own; it fails cleanly (EINVAL) if the file is not a
    // network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(f.into())
}

fn mkdir(path: &Path, mode: u32) -> std::io::Result<()> {
    match DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

/// Creates `<base>/ember/<id>` (and `<base>` itself if only it is missing) and takes the
/// jail's lock. A jail whose lock is free is stale (its ember died without cleanup): its
/// contents are removed. A held lock means in use: nothing is touched.
///
/// `engine_root`: the jail root belongs to the engine that started the jailer form (it put
/// the kernel, drives and config there, maybe as bind mounts), so only what ember itself
/// makes in it (`root/dev`) counts as stale.
pub(super) fn create_and_lock(
    base: &Path,
    dir: &Path,
    id: &str,
    engine_root: bool,
) -> Result<OwnedFd, JailError> {
    let base_err = |source| JailError::BaseDir {
        path: base.to_path_buf(),
        source,
    };
    if !base.exists() {
        // Only the base itself: creating its parents would create things outside it.
        mkdir(base, 0o755).map_err(base_err)?;
    }
    if let Some(exec_dir) = dir.parent() {
        mkdir(exec_dir, 0o755).map_err(base_err)?;
    }
    mkdir(dir, 0o755).map_err(base_err)?;
    let lock_path = dir.join(".lock");
    // The lock file can be removed by the ember that holds it (its cleanup) just after we
    // opened it: then we hold a lock on a deleted file, so check and retry.
    for _ in 0..3 {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(base_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::WouldBlock {
                return Err(JailError::InUse {
                    id: id.into(),
                    lock: lock_path,
                });
            }
            return Err(JailError::setup(format!("flock {}", lock_path.display()))(
                e,
            ));
        }
        let same = match (f.metadata(), std::fs::symlink_metadata(&lock_path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            continue;
        }
        if engine_root {
            remove_stale_dev(dir)?;
        } else {
            remove_stale(dir)?;
        }
        return Ok(f.into());
    }
    Err(JailError::InUse {
        id: id.into(),
        lock: lock_path,
    })
}

/// The device nodes a dead ember left in an engine's jail root.
fn remove_stale_dev(dir: &Path) -> Result<(), JailError> {
    let dev = dir.join("root/dev");
    match std::fs::symlink_metadata(&dev) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&dev)
            .map_err(JailError::setup(format!("remove stale {}", dev.display()))),
        _ => Ok(()),
    }
}

/// What ember made in an engine's jail: the device nodes, the pid files (`ember.pid` and
/// the jailer's `root/<exec name>.pid`) and the lock; the root and the rest are the
/// engine's to remove (they may be bind mounts of its files).
pub(super) fn remove_own_files(dir: &Path, exec_name: &str) {
    let _ = std::fs::remove_dir_all(dir.join("root/dev"));
    let _ = std::fs::remove_file(dir.join("root").join(format!("{exec_name}.pid")));
    for f in ["ember.pid", ".lock"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Removes what a dead ember left in its jail directory (all but the lock).
fn remove_stale(dir: &Path) -> Result<(), JailError> {
    let entries =
        std::fs::read_dir(dir).map_err(JailError::setup(format!("read {}", dir.display())))?;
    for e in entries.flatten() {
        if e.file_name() == ".lock" {
            continue;
        }
        let p = e.path();
        log::info!("removing {} left by an earlier ember", p.display());
        let r = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        r.map_err(JailError::setup(format!("remove stale {}", p.display())))?;
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Builds the jail root: `/dev` with the device nodes (owned by uid/gid, mode 0600) and
/// the API socket's directory (writable by uid/gid so the VMM can bind the socket).
pub(super) fn build_root(root: &Path, args: &JailArgs) -> Result<(), JailError> {
    let setup = |what: &str, p: &Path| JailError::setup(format!("{what} {}", p.display()));
    for d in [root.to_path_buf(), root.join("dev"), root.join("dev/net")] {
        mkdir(&d, 0o755).map_err(setup("mkdir", &d))?;
        // Not the umask's choice: the VMM must be able to walk these.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
            .map_err(setup("chmod", &d))?;
    }
    for (host, rel, required) in DEVICES {
        let meta = match std::fs::metadata(host) {
            Ok(m) if m.file_type().is_char_device() => m,
            Ok(_) | Err(_) if !required => {
                log::warn!("{host} is missing on the host: the jail has none");
                continue;
            }
            Ok(_) => {
                return Err(JailError::setup(format!("{host} on the host"))(
                    std::io::Error::other("not a character device"),
                ));
            }
            Err(e) => return Err(setup("stat", Path::new(host))(e)),
        };
        let node = root.join(rel);
        let c = cstr(&node).map_err(setup("mknod", &node))?;
        // SAFETY: mknod with a valid NUL-terminated path; the device number is the host's.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) } != 0 {
            return Err(setup("mknod", &node)(std::io::Error::last_os_error()));
        }
        chown(&node, args.uid, args.gid).map_err(setup("chown", &node))?;
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600))
            .map_err(setup("chmod", &node))?;
    }
    // The API socket's directory (Firecracker's default socket lives in /run).
    let sock_dir = args
        .api_sock
        .as_deref()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/run"));
    let rel = sock_dir.strip_prefix("/").unwrap_or(sock_dir);
    let mut p = root.to_path_buf();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => p.push(n),
            _ => {
                return Err(JailError::Arg(format!(
                    "--api-sock {}: use a plain absolute path (no `..`)",
                    sock_dir.display()
                )));
            }
        }
        mkdir(&p, 0o755).map_err(setup("mkdir", &p))?;
    }
    // The last directory (the root itself for a socket directly in `/`) belongs to the VMM.
    chown(&p, args.uid, args.gid).map_err(setup("chown", &p))?;
    Ok(())
}

/// Puts `host` in the jail root. Returns its path in the jail and, when it could not be
/// hard-linked, the host path to bind-mount onto the placeholder.
pub(super) fn import_file(
    root: &Path,
    host: &Path,
    index: usize,
) -> Result<(PathBuf, Option<PathBuf>), JailError> {
    let err = |source| JailError::Import {
        path: host.to_path_buf(),
        source,
    };
    let src = std::fs::canonicalize(host).map_err(err)?;
    let meta = std::fs::metadata(&src).map_err(err)?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }
    let name = src
        .file_name()
        .ok_or_else(|| err(std::io::Error::new(ErrorKind::InvalidInput, "no file name")))?;
    let mut in_jail = PathBuf::from("/").join(name);
    let mut dst = root.join(name);
    if dst.symlink_metadata().is_ok() {
        // Two files with one name (or a name the jail uses, like `dev`).
        let mut n = std::ffi::OsString::from(format!("{index}-"));
        n.push(name);
        in_jail = PathBuf::from("/").join(&n);
        dst = root.join(&n);
    }
    let (s, d) = (cstr(&src).map_err(err)?, cstr(&dst).map_err(err)?);
    // SAFETY: linkat with valid NUL-terminated paths.
    if unsafe { libc::linkat(libc::AT_FDCWD, s.as_ptr(), libc::AT_FDCWD, d.as_ptr(), 0) } == 0 {
        return Ok((in_jail, None));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Another filesystem, or a link the kernel refuses: bind-mount instead, which
        // works across filesystems and for device nodes.
        Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK) => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)
                .map_err(err)?;
            Ok((in_jail, Some(src)))
        }
        _ => Err(err(e)),
    }
}

fn mount(src: Option<&Path>, dst: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    let s = src.map(cstr).transpose()?;
    let d = cstr(dst)?;
    // SAFETY: valid NUL-terminated paths (or NULL source), no fs type, no data.
    let rc = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            d.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 { last_err() } else { Ok(()) }
}

/// In the VMM, in its own mount namespace: stops mount events from flowing back to the
/// host, makes the jail root a mount point (pivot_root needs one) and bind-mounts the
/// files that could not be hard-linked.
pub(super) fn mount_root(root: &Path, binds: &[(PathBuf, PathBuf)]) -> Result<(), JailError> {
    mount(None, Path::new("/"), libc::MS_SLAVE | libc::MS_REC)
        .map_err(JailError::setup("make / a slave mount"))?;
    mount(Some(root), root, libc::MS_BIND | libc::MS_REC)
        .map_err(JailError::setup(format!("bind-mount {}", root.display())))?;
    for (src, dst) in binds {
        mount(Some(src), dst, libc::MS_BIND).map_err(JailError::setup(format!(
            "bind-mount {} onto {}",
            src.display(),
            dst.display()
        )))?;
    }
    Ok(())
}

/// Makes the jail root `/` and detaches the old root, so nothing outside the jail is
/// reachable from this mount namespace (pivot_root(".", ".") as in pivot_root(2)'s notes:
/// the old root is stacked on the new one and unmounted at once, with no directory to
/// create in the jail).
pub(super) fn pivot_into(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root)
        .map_err(JailError::setup(format!("chdir {}", root.display())))?;
    let dot = c".";
    // SAFETY: pivot_root with two valid NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::setup("pivot_root")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: umount2 of the stacked old root with a valid path.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::setup("detach the old root")(
            std::io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(JailError::setup("chdir /"))
}

/// Removes the jail directory (the supervisor, after the VMM exited).
pub(super) fn remove_jail_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => log::debug!("removed {}", dir.display()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => log::warn!("cannot remove {}: {e}", dir.display()),
    }
}
