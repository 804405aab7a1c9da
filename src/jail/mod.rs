//! The jail: ember confines itself, in one process image, the way Firecracker's jailer
//! confines Firecracker (mount namespace + pivot_root, optional PID namespace, network
//! namespace, cgroups, rlimits, device nodes, uid/gid drop, no_new_privs), without exec'ing
//! a second binary.
//!
//! Layout on the host: `<base>/ember/<id>/` holds `.lock` (flock'ed for the VMM's life:
//! that, not the directory, says "in use"), `ember.pid` (the VMM's pid) and `root/` (the
//! VMM's `/`). A path given to the jailed ember (e.g. `--api-sock /run/api.sock`) is
//! inside the jail: on the host it is `<base>/ember/<id>/root/run/api.sock`.
//!
//! Firecracker's jailer command line (`cli::parse_jailer`) uses the same machinery with
//! Firecracker's layout, `<base>/<basename of --exec-file>/<id>/root` (default base
//! `/srv/jailer`), and an `engine_root`: the engine may have filled the root before, so
//! ember enters the jail before reading anything and leaves the root's contents alone.
//!
//! Process model: `enter` forks. The process the user started stays outside the jail as a
//! supervisor (root, in the host namespaces): it forwards stop signals to the VMM, waits
//! for it, then removes the jail tree and the cgroup and exits with the VMM's exit code.
//! That is the only way to clean up on every exit path: a cgroup can only be removed once
//! its last process is gone, and the jailed VMM can no longer see (nor has the rights to
//! remove) `<base>/ember/<id>`. The child becomes the VMM; with `--new-pid-ns` it is PID 1
//! of a new PID namespace. With `--daemonize` one more fork lets the command return once
//! the VMM is jailed (exit 0) or with the jail's error code; the jailer command line does
//! the same with `--new-pid-ns`, as Firecracker's jailer exits once it has started the VMM
//! in the new namespace. Either way the VMM's host pid is in `root/<exec name>.pid`, where
//! Firecracker's jailer writes it.
//!
//! Exit codes: validation errors (bad flag, invalid id, jail in use, base dir not
//! writable, missing uid/gid, unusable netns) exit with 153 (`ARG_PARSING`), as every other
//! command-line error; Firecracker's jailer exits 1 for all of its errors, which tells a
//! caller less. A host file named in the config that cannot be put in the jail is 152
//! (`BAD_CONFIGURATION`); a failure of the host while building the jail is 1.

mod cgroup;
mod fs;
mod process;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

pub use cgroup::CgroupVersion;

use crate::exit_code;

/// Where jails are built when `--chroot-base-dir` is not given.
pub const DEFAULT_BASE_DIR: &str = "/srv/ember";
/// The same for Firecracker's jailer command line (its default).
pub const JAILER_DEFAULT_BASE_DIR: &str = "/srv/jailer";
/// Firecracker's jailer default for RLIMIT_NOFILE.
pub const DEFAULT_NO_FILE: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("{0}")]
    Arg(String),
    #[error("--id `{0}` is not 1-64 ASCII letters, digits and hyphens")]
    InvalidId(String),
    #[error(
        "jail `{id}` is in use by another ember (lock {} is held); pick another --id or stop that ember",
        lock.display()
    )]
    InUse { id: String, lock: PathBuf },
    #[error(
        "--chroot-base-dir {}: cannot create the jail there: {source}; give a writable directory",
        path.display()
    )]
    BaseDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--netns {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--jail needs root (namespaces, device nodes, cgroups and the uid/gid drop need it)")]
    NotRoot,
    #[error("cannot put {} in the jail: {source}", path.display())]
    Import {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup: {0}")]
    Cgroup(String),
    #[error("jail: {what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
}

impl JailError {
    /// See the module documentation for the table.
    pub fn exit_code(&self) -> i32 {
        match self {
            JailError::Arg(_)
            | JailError::InvalidId(_)
            | JailError::InUse { .. }
            | JailError::BaseDir { .. }
            | JailError::Netns { .. } => exit_code::ARG_PARSING,
            JailError::Import { .. } => exit_code::BAD_CONFIGURATION,
            JailError::NotRoot | JailError::Cgroup(_) | JailError::Setup { .. } => {
                exit_code::GENERIC_ERROR
            }
        }
    }

    pub(crate) fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
        let what = what.into();
        move |source| JailError::Setup { what, source }
    }
}

/// Resource limits applied to the VMM (Firecracker's `--resource-limit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceLimits {
    /// RLIMIT_FSIZE: the largest file the VMM may write, in bytes.
    pub fsize: Option<u64>,
    /// RLIMIT_NOFILE: one more than the highest descriptor number the VMM may open.
    pub no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            fsize: None,
            no_file: DEFAULT_NO_FILE,
        }
    }
}

/// Everything `--jail` and its companion flags ask for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailArgs {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base_dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    pub cgroup_version: CgroupVersion,
    /// `FILE=VALUE` pairs, e.g. ("cpu.max", "50000 100000").
    pub cgroups: Vec<(String, String)>,
    pub parent_cgroup: Option<String>,
    pub resource_limits: ResourceLimits,
    pub daemonize: bool,
    /// The API socket path (in the jail): its directory is made writable by uid/gid so the
    /// jailed VMM can bind the socket there.
    pub api_sock: Option<PathBuf>,
    /// The jail directory's middle name: `ember`, or with the jailer command line the
    /// basename of `--exec-file`, as Firecracker's jailer lays it out.
    pub exec_name: String,
    /// Started through the jailer command line: the engine prepared the jail root and owns
    /// it (see `fs::create_and_lock`); paths ember is given are inside it.
    pub engine_root: bool,
}

/// The flags as the command line gave them (strings), before validation. `cli::Args`
/// carries the same fields; see `JailArgs::from_cli`.
#[derive(Debug, Default, Clone)]
pub struct JailFlags<'a> {
    pub jail: bool,
    pub id: Option<&'a str>,
    pub uid: Option<&'a str>,
    pub gid: Option<&'a str>,
    pub chroot_base_dir: Option<&'a Path>,
    pub netns: Option<&'a Path>,
    pub new_pid_ns: bool,
    pub cgroup_version: Option<&'a str>,
    pub cgroups: &'a [String],
    pub parent_cgroup: Option<&'a str>,
    pub resource_limits: &'a [String],
    pub daemonize: bool,
    pub api_sock: Option<&'a Path>,
    /// The jailer command line's `--exec-file` (which must be this ember).
    pub exec_file: Option<&'a Path>,
}

impl JailArgs {
    /// Validates the jail flags of a command line. `Ok(None)`: no `--jail`.
    pub fn from_cli(args: &crate::cli::Args) -> Result<Option<JailArgs>, JailError> {
        JailArgs::from_flags(&JailFlags {
            jail: args.jail,
            id: args.id.as_deref(),
            uid: args.uid.as_deref(),
            gid: args.gid.as_deref(),
            chroot_base_dir: args.chroot_base_dir.as_deref(),
            netns: args.netns.as_deref(),
            new_pid_ns: args.new_pid_ns,
            cgroup_version: args.cgroup_version.as_deref(),
            cgroups: &args.cgroups,
            parent_cgroup: args.parent_cgroup.as_deref(),
            resource_limits: &args.resource_limits,
            daemonize: args.daemonize,
            api_sock: args.api_sock.as_deref(),
            exec_file: args.exec_file.as_deref(),
        })
    }

    pub fn from_flags(f: &JailFlags) -> Result<Option<JailArgs>, JailError> {
        if !f.jail {
            let stray = [
                ("--uid", f.uid.is_some()),
                ("--gid", f.gid.is_some()),
                ("--chroot-base-dir", f.chroot_base_dir.is_some()),
                ("--netns", f.netns.is_some()),
                ("--new-pid-ns", f.new_pid_ns),
                ("--cgroup-version", f.cgroup_version.is_some()),
                ("--cgroup", !f.cgroups.is_empty()),
                ("--parent-cgroup", f.parent_cgroup.is_some()),
                ("--resource-limit", !f.resource_limits.is_empty()),
                ("--daemonize", f.daemonize),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                return Err(JailError::Arg(format!("`{flag}` needs --jail")));
            }
            return Ok(None);
        }
        let id =
            f.id.ok_or_else(|| JailError::Arg("--jail needs --id".into()))?;
        if !crate::cli::valid_id(id) {
            return Err(JailError::InvalidId(id.into()));
        }
        let num = |flag: &str, v: Option<&str>| -> Result<u32, JailError> {
            let v = v.ok_or_else(|| JailError::Arg(format!("--jail needs {flag}")))?;
            v.parse::<u32>()
                .map_err(|_| JailError::Arg(format!("`{flag}`: `{v}` is not a number")))
        };
        let uid = num("--uid", f.uid)?;
        let gid = num("--gid", f.gid)?;
        let cgroup_version = match f.cgroup_version {
            None | Some("1") => CgroupVersion::V1,
            Some("2") => CgroupVersion::V2,
            Some(v) => {
                return Err(JailError::Arg(format!(
                    "`--cgroup-version`: `{v}` is not 1 or 2"
                )));
            }
        };
        let cgroups = f
            .cgroups
            .iter()
            .map(|c| cgroup::parse_setting(c))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(p) = f.parent_cgroup {
            cgroup::check_parent(p)?;
        }
        let mut resource_limits = ResourceLimits::default();
        for r in f.resource_limits {
            let bad = || {
                JailError::Arg(format!(
                    "`--resource-limit`: `{r}` is not fsize=BYTES or no-file=COUNT"
                ))
            };
            let (k, v) = r.split_once('=').ok_or_else(bad)?;
            let n = v.parse::<u64>().map_err(|_| bad())?;
            match k {
                "fsize" => resource_limits.fsize = Some(n),
                "no-file" => resource_limits.no_file = n,
                _ => return Err(bad()),
            }
        }
        if let Some(s) = f.api_sock
            && !s.is_absolute()
        {
            return Err(JailError::Arg(format!(
                "`--api-sock` {}: with --jail the path must be absolute (it is inside the jail)",
                s.display()
            )));
        }
        let (exec_name, default_base) = match f.exec_file {
            Some(bin) => (check_exec_file(bin)?, JAILER_DEFAULT_BASE_DIR),
            None => ("ember".to_string(), DEFAULT_BASE_DIR),
        };
        let chroot_base_dir = f
            .chroot_base_dir
            .map_or_else(|| PathBuf::from(default_base), Path::to_path_buf);
        if !chroot_base_dir.is_absolute() {
            return Err(JailError::Arg(format!(
                "`--chroot-base-dir` {}: the path must be absolute",
                chroot_base_dir.display()
            )));
        }
        Ok(Some(JailArgs {
            id: id.into(),
            uid,
            gid,
            chroot_base_dir,
            netns: f.netns.map(Path::to_path_buf),
            new_pid_ns: f.new_pid_ns,
            cgroup_version,
            cgroups,
            // Firecracker's jailer puts its cgroups under the exec file's name by default.
            parent_cgroup: f
                .parent_cgroup
                .map(Into::into)
                .or_else(|| f.exec_file.map(|_| exec_name.clone())),
            resource_limits,
            daemonize: f.daemonize,
            api_sock: f.api_sock.map(Path::to_path_buf),
            exec_name,
            engine_root: f.exec_file.is_some(),
        }))
    }

    /// `<base>/<exec name>/<id>`: the directory the jail owns on the host.
    pub fn jail_dir(&self) -> PathBuf {
        self.chroot_base_dir.join(&self.exec_name).join(&self.id)
    }
}

/// The jailer command line's `--exec-file` must be this ember (the same file, or a copy
/// of it): ember jails itself in-process and cannot run another binary. Returns the
/// basename that names the jail directory.
fn check_exec_file(bin: &Path) -> Result<String, JailError> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| JailError::Arg(format!("--exec-file {}: {why}", bin.display()));
    let name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| bad("has no file name".into()))?
        .to_string();
    let given = std::fs::metadata(bin).map_err(|e| bad(e.to_string()))?;
    let me = std::fs::metadata("/proc/self/exe").map_err(|e| bad(e.to_string()))?;
    let same_file = given.dev() == me.dev() && given.ino() == me.ino();
    let same_bytes = || -> bool {
        given.len() == me.len()
            && matches!(
                (std::fs::read(bin), std::fs::read("/proc/self/exe")),
                (Ok(a), Ok(b)) if a == b
            )
    };
    if !(same_file || same_bytes()) {
        return Err(bad(
            "is not this ember: ember's jailer runs ember itself, in-process; point the \
             engine's VMM path at ember"
                .into(),
        ));
    }
    Ok(name)
}

/// The descriptors open in this process now (from /proc/self/fd). Taken first thing in
/// main, it names the inherited descriptors; `opened_since` then gives the keep-list for
/// `enter`: everything ember itself opened since.
pub fn open_fds() -> Vec<RawFd> {
    let mut fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    // The directory stream's own descriptor is listed too; it is closed by now.
    // SAFETY: F_GETFD only queries a descriptor number.
    fds.retain(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0);
    fds.sort_unstable();
    fds
}

/// The descriptors open now that were not in `inherited` (see `open_fds`).
pub fn opened_since(inherited: &[RawFd]) -> Vec<RawFd> {
    open_fds()
        .into_iter()
        .filter(|fd| !inherited.contains(fd))
        .collect()
}

/// A host file made visible in the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedFile {
    /// The path as the user gave it (what GET /vm/config reports).
    pub host: PathBuf,
    /// The path the jailed VMM opens.
    pub in_jail: PathBuf,
}

/// A jail that is built on disk and locked but not entered yet: the place to put host
/// files into it (`import`). Dropping it removes what it built.
pub struct Jail {
    args: JailArgs,
    dir: PathBuf,
    root: PathBuf,
    lock: Option<OwnedFd>,
    netns: Option<OwnedFd>,
    cgroup: cgroup::Cgroup,
    files: Vec<ImportedFile>,
    /// Files that could not be hard-linked (another filesystem): bind-mounted onto their
    /// placeholder in the jail once the VMM has its own mount namespace.
    binds: Vec<(PathBuf, PathBuf)>,
    /// Whether Drop removes the jail tree (only the process that owns the cleanup).
    armed: bool,
}

impl Jail {
    /// Validates the host side, creates and locks `<base>/ember/<id>` and builds the jail
    /// root. Nothing outside the base dir is created (except the cgroup, in `enter`).
    pub fn prepare(args: &JailArgs) -> Result<Jail, JailError> {
        if !crate::cli::valid_id(&args.id) {
            return Err(JailError::InvalidId(args.id.clone()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        let netns = match &args.netns {
            Some(p) => Some(fs::open_netns(p)?),
            None => None,
        };
        let dir = args.jail_dir();
        let lock = fs::create_and_lock(&args.chroot_base_dir, &dir, &args.id, args.engine_root)?;
        let root = dir.join("root");
        let mut jail = Jail {
            args: args.clone(),
            dir,
            root,
            lock: Some(lock),
            netns,
            cgroup: cgroup::Cgroup::default(),
            files: Vec::new(),
            binds: Vec::new(),
            armed: true,
        };
        fs::build_root(&jail.root, args)?;
        jail.cgroup = cgroup::Cgroup::plan(args)?;
        Ok(jail)
    }

    /// Makes a host file (kernel, initrd, drive) visible in the jail and returns its path
    /// there. A hard link when possible (same filesystem); otherwise an empty placeholder
    /// that the file is bind-mounted onto inside the VMM's mount namespace. Ownership and
    /// mode stay those of the host file (a hard link shares the inode): the file must be
    /// readable (drives: writable) by --uid/--gid, as with Firecracker's jailer.
    pub fn import(&mut self, host: &Path) -> Result<PathBuf, JailError> {
        if let Some(f) = self.files.iter().find(|f| f.host == host) {
            return Ok(f.in_jail.clone());
        }
        let (in_jail, bind) = fs::import_file(&self.root, host, self.files.len())?;
        if let Some(src) = bind {
            self.binds.push((
                src,
                self.root
                    .join(in_jail.strip_prefix("/").unwrap_or(&in_jail)),
            ));
        }
        self.files.push(ImportedFile {
            host: host.to_path_buf(),
            in_jail: in_jail.clone(),
        });
        Ok(in_jail)
    }

    /// Enters the jail. Returns in the VMM process only; the process that called it
    /// becomes the supervisor (see the module documentation) and exits with the VMM's exit
    /// code after cleaning up. Call it while ember has exactly one thread.
    ///
    /// `keep_fds`: descriptors ember opened before the jail and still needs (log file,
    /// metrics file, ...); every other descriptor above 2 is closed.
    pub fn enter(mut self, keep_fds: &[RawFd]) -> Result<JailGuard, JailError> {
        process::enter(&mut self, keep_fds)
    }

    /// Removes the cgroup and the jail tree (the supervisor's last act; also Drop's).
    fn cleanup(&mut self) {
        self.armed = false;
        self.cgroup.remove();
        if self.args.engine_root {
            fs::remove_own_files(&self.dir, &self.args.exec_name);
        } else {
            fs::remove_jail_dir(&self.dir);
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if self.armed {
            self.cleanup();
        }
    }
}

/// Held by the jailed VMM for its whole life.
pub struct JailGuard {
    id: String,
    host_dir: PathBuf,
    files: Vec<ImportedFile>,
    /// The flock that marks the jail in use; released when the VMM exits.
    _lock: OwnedFd,
}

impl JailGuard {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `<base>/ember/<id>` on the host (for messages: the VMM cannot open it).
    pub fn host_dir(&self) -> &Path {
        &self.host_dir
    }

    /// The host files put in the jail, with their paths there.
    pub fn files(&self) -> &[ImportedFile] {
        &self.files
    }

    /// Where a path inside the jail is on the host (for messages and docs).
    pub fn host_path_of(&self, in_jail: &Path) -> PathBuf {
        let rel = in_jail.strip_prefix("/").unwrap_or(in_jail);
        self.host_dir.join("root").join(rel)
    }

    /// Call before the VMM exits. The jail tree and the cgroup are removed by the
    /// supervisor once this process is gone (a cgroup cannot be removed while the VMM is
    /// in it, and the tree is outside the VMM's root); this only says so in the log, so
    /// main's exit path reads the same with and without a jail.
    pub fn cleanup(self) {
        log::debug!(
            "jail {}: {} will be removed by the supervisor",
            self.id,
            self.host_dir.display()
        );
    }

    /// The lock descriptor (to keep across a later descriptor sweep).
    pub fn lock_fd(&self) -> RawFd {
        self._lock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> JailFlags<'static> {
        JailFlags {
            jail: true,
            id: Some("vm-1"),
            uid: Some("123"),
            gid: Some("456"),
            ..Default::default()
        }
    }

    #[test]
    fn minimal_jail_args() {
        let a = JailArgs::from_flags(&flags()).unwrap().unwrap();
        assert_eq!((a.uid, a.gid), (123, 456));
        assert_eq!(a.chroot_base_dir, PathBuf::from(DEFAULT_BASE_DIR));
        assert_eq!(a.jail_dir(), PathBuf::from("/srv/ember/ember/vm-1"));
        assert_eq!(
            a.resource_limits,
            ResourceLimits {
                fsize: None,
                no_file: 2048
            }
        );
        assert_eq!(a.cgroup_version, CgroupVersion::V1);
    }

    #[test]
    fn no_jail_no_jail_flags() {
        let f = JailFlags::default();
        assert_eq!(JailArgs::from_flags(&f).unwrap(), None);
        let f = JailFlags {
            daemonize: true,
            ..Default::default()
        };
        assert!(matches!(JailArgs::from_flags(&f), Err(JailError::Arg(_))));
    }

    #[test]
    fn bad_jail_args_are_argument_errors() {
        let cases: Vec<JailFlags> = vec![
            JailFlags {
                id: None,
                ..flags()
            },
            JailFlags {
                id: Some("a_b"),
                ..flags()
            },
            JailFlags {
                uid: None,
                ..flags()
            },
            JailFlags {
                gid: Some("x"),
                ..flags()
            },
            JailFlags {
                cgroup_version: Some("3"),
                ..flags()
            },
            JailFlags {
                parent_cgroup: Some("../x"),
                ..flags()
            },
            JailFlags {
                parent_cgroup: Some("/abs"),
                ..flags()
            },
            JailFlags {
                chroot_base_dir: Some(Path::new("rel")),
                ..flags()
            },
            JailFlags {
                api_sock: Some(Path::new("rel.sock")),
                ..flags()
            },
        ];
        for c in cases {
            let e = JailArgs::from_flags(&c).unwrap_err();
            assert_eq!(e.exit_code(), exit_code::ARG_PARSING, "{c:?}: {e}");
        }
        let bad_cgroup = ["nocolon".to_string()];
        let e = JailArgs::from_flags(&JailFlags {
            cgroups: &bad_cgroup,
            ..flags()
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), exit_code::ARG_PARSING);
        for r in ["fsize", "fsize=x", "stack=1"] {
            let r = [r.to_string()];
            let e = JailArgs::from_flags(&JailFlags {
                resource_limits: &r,
                ..flags()
            })
            .unwrap_err();
            assert_eq!(e.exit_code(), exit_code::ARG_PARSING);
        }
    }

    #[test]
    fn settings_parse() {
        let c = [
            "cpu.max=50000 100000".to_string(),
            "pids.max=10".to_string(),
        ];
        let r = ["fsize=1000".to_string(), "no-file=64".to_string()];
        let a = JailArgs::from_flags(&JailFlags {
            cgroups: &c,
            resource_limits: &r,
            cgroup_version: Some("2"),
            parent_cgroup: Some("a/b"),
            ..flags()
        })
        .unwrap()
        .unwrap();
        assert_eq!(a.cgroups[0], ("cpu.max".into(), "50000 100000".into()));
        assert_eq!(
            a.resource_limits,
            ResourceLimits {
                fsize: Some(1000),
                no_file: 64
            }
        );
        assert_eq!(a.cgroup_version, CgroupVersion::V2);
    }
}
