//! Cgroups for the VMM, as Firecracker's jailer: `<mount>/<parent>/<id>` with the
//! `--cgroup FILE=VALUE` settings written into it, the VMM moved in before it drops root.
//! v2: one hierarchy; the controllers the settings need are enabled in every ancestor's
//! `cgroup.subtree_control`. v1 (best effort): one directory per controller hierarchy the
//! settings name; cpuset's cpus/mems are copied from the parent (a cpuset cgroup with
//! empty ones accepts no process).

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use super::{JailArgs, JailError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Where an instance's cgroup goes when `--parent-cgroup` is not given.
const DEFAULT_PARENT: &str = "ember";

/// Parses `FILE=VALUE` (e.g. `cpu.max=50000 100000`).
pub(super) fn parse_setting(s: &str) -> Result<(String, String), JailError> {
    let bad = || {
        JailError::Arg(format!(
            "`--cgroup`: `{s}` is not FILE=VALUE with FILE a cgroup file such as pids.max"
        ))
    };
    let (file, value) = s.split_once('=').ok_or_else(bad)?;
    let ok_file = file.contains('.')
        && !file.starts_with('.')
        && !file.contains("..")
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok_file || value.is_empty() {
        return Err(bad());
    }
    Ok((file.into(), value.into()))
}

/// A parent cgroup is a relative path of plain names.
pub(super) fn check_parent(p: &str) -> Result<(), JailError> {
    let path = Path::new(p);
    if p.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(JailError::Arg(format!(
            "`--parent-cgroup` `{p}`: give a relative path of plain names (no `/` at the start, no `.` or `..`)"
        )));
    }
    Ok(())
}

fn controller(file: &str) -> &str {
    file.split('.').next().unwrap_or(file)
}

/// The mount points of a filesystem type, with their mount options.
fn mounts(fstype: &str) -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, mnt, ty, opts, ..] if *ty == fstype => Some((
                    PathBuf::from(mnt.replace("\\040", " ")),
                    opts.split(',').map(String::from).collect(),
                )),
                _ => None,
            }
        })
        .collect()
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, format!("{value}\n")).map_err(|e| {
        JailError::Cgroup(format!("cannot write `{value}` to {}: {e}", path.display()))
    })
}

fn mkdir(path: &Path) -> Result<bool, JailError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(JailError::Cgroup(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

/// The cgroup directories of one instance (one for v2, one per hierarchy for v1).
#[derive(Debug, Default)]
pub(super) struct Cgroup {
    leaves: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the instance's cgroup(s) and writes the settings. Nothing is created when
    /// neither `--cgroup` nor `--parent-cgroup` is given.
    pub(super) fn plan(args: &JailArgs) -> Result<Cgroup, JailError> {
        let mut cg = Cgroup::default();
        if args.cgroups.is_empty() && args.parent_cgroup.is_none() {
            return Ok(cg);
        }
        let parent = args.parent_cgroup.as_deref().unwrap_or(DEFAULT_PARENT);
        let r = match args.cgroup_version {
            CgroupVersion::V2 => cg.create_v2(parent, args),
            CgroupVersion::V1 => cg.create_v1(parent, args),
        };
        if let Err(e) = r {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// A leftover of a killed ember with the same id (we hold the jail's lock) is removed
    /// first, so settings start from the parent's defaults.
    fn new_leaf(&mut self, leaf: PathBuf) -> Result<(), JailError> {
        if leaf.is_dir() {
            let _ = std::fs::remove_dir(&leaf);
        }
        mkdir(&leaf)?;
        self.leaves.push(leaf);
        Ok(())
    }

    fn create_v2(&mut self, parent: &str, args: &JailArgs) -> Result<(), JailError> {
        let mnt = mounts("cgroup2")
            .into_iter()
            .next()
            .map(|m| m.0)
            .ok_or_else(|| {
                JailError::Cgroup("no cgroup2 filesystem is mounted; use --cgroup-version 1".into())
            })?;
        let mut controllers: Vec<&str> = args
            .cgroups
            .iter()
            .map(|(f, _)| controller(f))
            .filter(|c| *c != "cgroup")
            .collect();
        controllers.sort_unstable();
        controllers.dedup();
        // Each ancestor of the leaf must delegate the controllers to its children.
        let mut dir = mnt.clone();
        let mut levels = vec![mnt.clone()];
        for c in Path::new(parent).components() {
            dir.push(c);
            mkdir(&dir)?;
            levels.push(dir.clone());
        }
        for level in &levels {
            let control = level.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            for c in &controllers {
                if !enabled.split_whitespace().any(|e| e == *c) {
                    write(&control, &format!("+{c}"))?;
                }
            }
        }
        let leaf = dir.join(&args.id);
        self.new_leaf(leaf.clone())?;
        for (file, value) in &args.cgroups {
            write(&leaf.join(file), value)?;
        }
        Ok(())
    }

    fn create_v1(&mut self, parent: &str, args: &JailArgs) -> Result<(), JailError> {
        let hierarchies = mounts("cgroup");
        for (file, value) in &args.cgroups {
            let ctl = controller(file);
            let (mnt, _) = hierarchies
                .iter()
                .find(|(_, opts)| opts.iter().any(|o| o == ctl))
                .ok_or_else(|| {
                    JailError::Cgroup(format!(
                        "{file}: no cgroup v1 hierarchy has the `{ctl}` controller (try --cgroup-version 2)"
                    ))
                })?;
            let mut dir = mnt.clone();
            for c in Path::new(parent).components() {
                let up = dir.clone();
                dir.push(c);
                if mkdir(&dir)? && ctl == "cpuset" {
                    inherit_cpuset(&up, &dir)?;
                }
            }
            let leaf = dir.join(&args.id);
            if !self.leaves.contains(&leaf) {
                self.new_leaf(leaf.clone())?;
                if ctl == "cpuset" {
                    inherit_cpuset(&dir, &leaf)?;
                }
            }
            write(&leaf.join(file), value)?;
        }
        Ok(())
    }

    /// In the VMM: moves the calling process into its cgroup(s). "0" means the writer.
    pub(super) fn join(&self) -> Result<(), JailError> {
        for leaf in &self.leaves {
            write(&leaf.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// Removes the leaves (the VMM has exited). The kernel may report the cgroup busy for
    /// a moment after its last process was reaped, hence the short retry.
    pub(super) fn remove(&mut self) {
        for leaf in self.leaves.drain(..).rev() {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&leaf) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if tries < 50 && e.raw_os_error() == Some(libc::EBUSY) => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        log::warn!("cannot remove cgroup {}: {e}", leaf.display());
                        break;
                    }
                }
            }
        }
    }
}

fn inherit_cpuset(parent: &Path, child: &Path) -> Result<(), JailError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let mine = std::fs::read_to_string(child.join(f)).unwrap_or_default();
        if mine.trim().is_empty() {
            let theirs = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
            write(&child.join(f), theirs.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        assert_eq!(
            parse_setting("cpu.max=50000 100000").unwrap(),
            ("cpu.max".to_string(), "50000 100000".to_string())
        );
        for bad in ["x", "pids.max=", "nodot=1", "../x.y=1", "a/b.c=1", ".x=1"] {
            assert!(parse_setting(bad).is_err(), "{bad}");
        }
        assert_eq!(controller("memory.high"), "memory");
    }

    #[test]
    fn parents() {
        assert!(check_parent("a/b").is_ok());
        for bad in ["", "/a", "a/../b", "./a"] {
            assert!(check_parent(bad).is_err(), "{bad}");
        }
    }
}
