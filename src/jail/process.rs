//! The process side of the jail: the fork into supervisor and VMM, the PID namespace,
//! daemonizing, descriptor sweep, rlimits and the drop of privileges.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{Jail, JailError, JailGuard, fs};

/// Signals the supervisor forwards to the VMM (stop requests, terminal hang-up) and
/// SIGCHLD, which tells it the VMM is gone. Blocked before the fork so none can kill the
/// supervisor in between; the VMM gets the caller's mask back.
const SUPERVISOR_SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGCHLD,
];

fn os_err(what: &str) -> JailError {
    JailError::setup(what)(std::io::Error::last_os_error())
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

fn block(signals: &[libc::c_int]) -> Result<libc::sigset_t, JailError> {
    let set = signal_set(signals);
    // SAFETY: a zeroed sigset_t is a valid out-parameter.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set pointers.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) } != 0 {
        return Err(os_err("block signals"));
    }
    Ok(old)
}

fn set_mask(mask: &libc::sigset_t) {
    // SAFETY: restoring a mask read by pthread_sigmask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) };
}

enum Fork {
    Parent(libc::pid_t),
    Child,
}

fn fork() -> Result<Fork, JailError> {
    // SAFETY: ember is single-threaded here (checked by the caller), so the child's copy
    // of the address space has no lock held by a vanished thread.
    match unsafe { libc::fork() } {
        -1 => Err(os_err("fork")),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// fork and unshare(CLONE_NEWNS) need a single-threaded process.
fn check_single_threaded() -> Result<(), JailError> {
    let n = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if n != 1 {
        return Err(JailError::setup("enter the jail")(std::io::Error::other(
            format!(
                "ember already runs {n} threads; the jail must be entered before any thread starts"
            ),
        )));
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe"));
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A wait status as a shell reports it.
fn exit_code_of(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        crate::exit_code::SIGNAL_BASE + libc::WTERMSIG(status)
    } else {
        crate::exit_code::UNEXPECTED_ERROR
    }
}

fn wait_exit_code(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return exit_code_of(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
            return crate::exit_code::UNEXPECTED_ERROR;
        }
    }
}

fn redirect_stdio_to_null() -> Result<(), JailError> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(JailError::setup("open /dev/null"))?;
    dup_stdio(null.as_raw_fd())
}

fn dup_stdio(fd: RawFd) -> Result<(), JailError> {
    for target in 0..3 {
        // SAFETY: dup2 between descriptors we own.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(os_err("redirect stdio"));
        }
    }
    Ok(())
}

pub(super) fn enter(jail: &mut Jail, keep_fds: &[RawFd]) -> Result<JailGuard, JailError> {
    check_single_threaded()?;
    let old_mask = block(&SUPERVISOR_SIGNALS)?;
    let daemonize = jail.args.daemonize;

    // --daemonize: the command returns once the VMM is jailed (exit 0), or with the
    // supervisor's exit code if jailing fails (the VMM's error reaches the terminal
    // first: stdio moves to /dev/null only once the jail is complete). Firecracker's
    // jailer with --new-pid-ns returns at once too (it exits after cloning the VMM into
    // the new namespace; engines then find the VMM through `<exec>.pid`), so the jailer
    // command line does the same there, keeping stdio and the session.
    let detach = daemonize || (jail.args.new_pid_ns && jail.args.engine_root);
    // As Firecracker's jailer does: a session leader's exit would send SIGHUP to its
    // session, so the process left behind starts its own.
    // SAFETY: getsid(0) and getpid have no preconditions.
    let session_leader = unsafe { libc::getsid(0) == libc::getpid() };
    let mut ready = None;
    if detach {
        let (r, w) = pipe()?;
        match fork()? {
            Fork::Parent(supervisor) => {
                jail.armed = false;
                drop(w);
                let mut byte = [0u8; 1];
                let mut r = std::fs::File::from(r);
                let code = loop {
                    match r.read(&mut byte) {
                        Ok(1) => break crate::exit_code::OK,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        _ => break wait_exit_code(supervisor),
                    }
                };
                std::process::exit(code);
            }
            Fork::Child => {
                drop(r);
                // SAFETY: setsid has no preconditions; the child of a fork is never a
                // process group leader, so it succeeds.
                if (daemonize || session_leader) && unsafe { libc::setsid() } < 0 {
                    return Err(os_err("setsid"));
                }
                ready = Some(w);
            }
        }
    }

    if jail.args.new_pid_ns {
        // The next child is PID 1 of a new PID namespace; this process stays outside.
        // SAFETY: unshare with a valid flag.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(os_err("unshare(CLONE_NEWPID)"));
        }
    }
    // SAFETY: getpid has no preconditions.
    let supervisor = unsafe { libc::getpid() };
    match fork()? {
        Fork::Parent(vmm) => {
            drop(ready);
            supervise(jail, vmm)
        }
        Fork::Child => {
            set_mask(&old_mask);
            // From here on the supervisor owns the cleanup.
            jail.armed = false;
            become_vmm(jail, keep_fds, ready, supervisor)
        }
    }
}

/// The process the user started, after the fork: forwards stop signals, waits for the
/// VMM, cleans up and exits with the VMM's exit code. Never returns.
fn supervise(jail: &mut Jail, vmm: libc::pid_t) -> ! {
    let pid_file = jail.dir.join("ember.pid");
    if let Err(e) = std::fs::write(&pid_file, format!("{vmm}\n")) {
        log::warn!("cannot write {}: {e}", pid_file.display());
    }
    log::info!(
        "jail {}: VMM pid {vmm}, root {}",
        jail.args.id,
        jail.root.display()
    );
    if jail.args.daemonize {
        let _ = redirect_stdio_to_null();
    }
    let set = signal_set(&SUPERVISOR_SIGNALS);
    let code = loop {
        let mut status = 0;
        // SAFETY: waitpid on our child with a valid status pointer; WNOHANG never blocks.
        if unsafe { libc::waitpid(vmm, &mut status, libc::WNOHANG) } == vmm {
            break exit_code_of(status);
        }
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; the set is initialised.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigwaitinfo(&set, &mut info)
        };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill of our own child, which has not been reaped yet.
            unsafe { libc::kill(vmm, sig) };
        }
    };
    jail.cleanup();
    std::process::exit(code);
}

/// The VMM side: its own mount namespace, cgroup, limits, the jail as `/`, no extra
/// descriptors, the unprivileged uid/gid and no way back (no_new_privs).
fn become_vmm(
    jail: &mut Jail,
    keep_fds: &[RawFd],
    ready: Option<OwnedFd>,
    supervisor: libc::pid_t,
) -> Result<JailGuard, JailError> {
    let args = jail.args.clone();
    // The supervisor stays in the host's mount namespace to clean up.
    // SAFETY: unshare with a valid flag, single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_err("unshare(CLONE_NEWNS)"));
    }
    fs::mount_root(&jail.root, &jail.binds)?;
    jail.cgroup.join()?;
    set_rlimits(&args.resource_limits)?;

    let null = if args.daemonize {
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(JailError::setup("open /dev/null"))?,
        )
    } else {
        None
    };
    // The namespace was joined in prepare; its descriptor is not needed any more.
    jail.netns = None;
    let lock = jail
        .lock
        .take()
        .ok_or_else(|| JailError::setup("lock")(std::io::Error::other("lock already taken")))?;
    let mut keep: Vec<RawFd> = keep_fds.to_vec();
    keep.push(lock.as_raw_fd());
    keep.extend(ready.as_ref().map(|r| r.as_raw_fd()));
    keep.extend(null.as_ref().map(|n| n.as_raw_fd()));
    close_other_fds(&keep)?;
    write_exec_pid_file(jail)?;

    fs::pivot_into(&jail.root)?;
    drop_privileges(args.uid, args.gid)?;
    // The parent-death signal is cleared by a credential change, so set it after: if
    // the supervisor is killed, the VMM goes too (a later ember cleans the stale jail).
    // SAFETY: prctl with valid arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(os_err("PR_SET_PDEATHSIG"));
    }
    // SAFETY: getppid has no preconditions. In a new PID namespace the parent is
    // invisible (0): nothing to compare.
    let parent = unsafe { libc::getppid() };
    if !args.new_pid_ns && parent != supervisor {
        return Err(JailError::setup("enter the jail")(std::io::Error::other(
            "the supervisor exited",
        )));
    }
    // SAFETY: prctl with valid arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_err("PR_SET_NO_NEW_PRIVS"));
    }
    if let Some(null) = null {
        dup_stdio(null.as_raw_fd())?;
    }
    if let Some(r) = ready {
        let _ = std::fs::File::from(r).write_all(&[0]);
    }
    log::info!(
        "jailed: uid {} gid {}, root {}",
        args.uid,
        args.gid,
        jail.root.display()
    );
    Ok(JailGuard {
        id: args.id.clone(),
        host_dir: jail.dir.clone(),
        files: std::mem::take(&mut jail.files),
        _lock: lock,
    })
}

/// `<root>/<exec name>.pid`, as Firecracker's jailer writes it (the pid alone, no newline):
/// the VMM's pid as the host sees it, also in a new PID namespace, where getpid says 1.
/// The host's /proc is still mounted here and answers in its own namespace. Written before
/// the VMM reports itself jailed, so a caller that returns with --daemonize or
/// --new-pid-ns finds it.
fn write_exec_pid_file(jail: &Jail) -> Result<(), JailError> {
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse::<u32>().ok()))
        // SAFETY: getpid has no preconditions.
        .unwrap_or_else(|| unsafe { libc::getpid() }.unsigned_abs());
    let path = jail.root.join(format!("{}.pid", jail.args.exec_name));
    // A stale file from an earlier VMM of this jail (the lock says none is running).
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, pid.to_string())
        .map_err(JailError::setup(format!("write {}", path.display())))
}

fn set_rlimits(limits: &super::ResourceLimits) -> Result<(), JailError> {
    let mut all = vec![(libc::RLIMIT_NOFILE, limits.no_file, "no-file")];
    if let Some(f) = limits.fsize {
        all.push((libc::RLIMIT_FSIZE, f, "fsize"));
    }
    for (resource, n, name) in all {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: setrlimit with a valid rlimit.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(os_err(&format!("setrlimit {name}={n}")));
        }
    }
    Ok(())
}

/// Closes every descriptor but 0, 1, 2 and `keep`, whoever opened it (inherited ones
/// included): close_range over the gaps between the kept ones.
fn close_other_fds(keep: &[RawFd]) -> Result<(), JailError> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|f| u32::try_from(*f).ok())
        .chain([0, 1, 2])
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from = 0u32;
    for k in keep.iter().copied().chain([u32::MAX]) {
        if k > from {
            let last = if k == u32::MAX { u32::MAX } else { k - 1 };
            // SAFETY: close_range closes descriptors only; none of them is used by Rust
            // objects we keep (the caller lists those in `keep`).
            if unsafe { libc::syscall(libc::SYS_close_range, from, last, 0) } != 0 {
                return Err(os_err("close_range"));
            }
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: plain credential calls with valid arguments; the group list is empty.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_err("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(os_err(&format!("setresgid {gid}")));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(os_err(&format!("setresuid {uid}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        assert_eq!(exit_code_of(0), 0);
        assert_eq!(exit_code_of(148 << 8), 148);
        assert_eq!(exit_code_of(libc::SIGKILL), 128 + 9);
    }
}
