//! Command-line flags, named as Firecracker's where they overlap.
//!
//! Parsed by hand rather than with an argument crate: the grammar is one flat list of
//! `--flag [value]` / `--flag=value` pairs with Firecracker's spelling and its errors
//! (duplicates refused, a few flags repeatable), which a crate would have to be bent to
//! reproduce, and the parser stays on the start-up path's budget with no dependency.

use std::path::PathBuf;

pub const USAGE: &str = "\
ember: a minimal KVM microVM monitor (Firecracker-compatible API and config file)

Usage: ember [--api-sock PATH | --no-api] [--config-file FILE] [options]

Options:
  --api-sock PATH                   serve the HTTP API on this Unix socket (default /run/ember.socket)
  --no-api                          no API; needs --config-file
  --config-file FILE                boot from a JSON file in Firecracker's schema
  --id ID                           instance id (1-64 letters, digits, hyphens; default anonymous-instance)
  --level LEVEL                     log level: Off, Error, Warning, Info, Debug, Trace (default Warning)
  --log-path PATH                   write the log here instead of stderr
  --show-level                      prefix log lines with their level
  --show-log-origin                 prefix log lines with file:line
  --metrics-path PATH               write metrics (JSON lines) here
  --boot-timer                      add the boot-timer device (guest writes 123 at 0xd0000000)
  --http-api-max-payload-size N     largest accepted API body in bytes (default 51200)
  --version                         print the version and exit
  --help                            print this help and exit

Jail (see src/jail/mod.rs; as Firecracker's jailer where they overlap):
  --jail                            confine ember: namespaces, pivot_root, cgroups, rlimits, uid/gid
  --uid UID, --gid GID              the user and group ember drops to (required with --jail)
  --chroot-base-dir DIR             jails are built in DIR/ember/ID/root (default /srv/ember)
  --netns PATH                      join this network namespace (e.g. /var/run/netns/NAME)
  --new-pid-ns                      run the VMM as PID 1 of a new PID namespace
  --cgroup-version 1|2              cgroup version for --cgroup (default 1)
  --cgroup FILE=VALUE               write VALUE to the instance cgroup's FILE (repeatable)
  --parent-cgroup NAME              parent of the instance cgroup (default ember)
  --resource-limit fsize=N|no-file=N  set RLIMIT_FSIZE / RLIMIT_NOFILE (repeatable; no-file default 2048)
  --daemonize                       return once the VMM is jailed; its stdio goes to /dev/null
  --no-seccomp                      do not install seccomp filters
  --seccomp-filter FILE             seccomp policy (seccompiler JSON) instead of the built-in one
";

#[derive(Debug, Default, Clone)]
pub struct Args {
    pub api_sock: Option<PathBuf>,
    pub no_api: bool,
    pub config_file: Option<PathBuf>,
    pub id: Option<String>,
    pub level: Option<String>,
    pub log_path: Option<PathBuf>,
    pub show_level: bool,
    pub show_log_origin: bool,
    pub metrics_path: Option<PathBuf>,
    pub boot_timer: bool,
    pub max_payload: Option<usize>,
    pub version: bool,
    pub help: bool,
    // Jail and seccomp (src/jail, src/seccomp.rs): stored as given, validated by
    // jail::JailArgs::from_cli and seccomp::SeccompConfig::from_flags.
    pub jail: bool,
    pub uid: Option<String>,
    pub gid: Option<String>,
    pub chroot_base_dir: Option<PathBuf>,
    pub netns: Option<PathBuf>,
    pub new_pid_ns: bool,
    pub cgroup_version: Option<String>,
    pub cgroups: Vec<String>,
    pub parent_cgroup: Option<String>,
    pub resource_limits: Vec<String>,
    pub daemonize: bool,
    pub no_seccomp: bool,
    pub seccomp_filter: Option<PathBuf>,
}

/// Flags that may be given more than once.
const REPEATABLE: [&str; 2] = ["--cgroup", "--resource-limit"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    #[error("unknown argument `{0}` (see --help)")]
    Unknown(String),
    #[error("`{0}` needs a value")]
    MissingValue(String),
    #[error("`{0}` takes no value")]
    UnexpectedValue(String),
    #[error("`{flag}`: {why}")]
    Invalid { flag: String, why: String },
    #[error("`{0}` given twice")]
    Duplicate(String),
    #[error(
        "--no-api needs --config-file: without the API, the file is the only way to configure the VM"
    )]
    NoApiWithoutConfig,
}

/// Checks an instance id: 1-64 characters, ASCII letters, digits and hyphens.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, ArgError> {
    let mut a = Args::default();
    let mut seen = std::collections::HashSet::new();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !seen.insert(flag.clone()) && !REPEATABLE.contains(&flag.as_str()) {
            return Err(ArgError::Duplicate(flag));
        }
        let value = |it: &mut I::IntoIter| -> Result<String, ArgError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .ok_or_else(|| ArgError::MissingValue(flag.clone())),
            }
        };
        let switch = |on: &mut bool| -> Result<(), ArgError> {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(flag.clone()));
            }
            *on = true;
            Ok(())
        };
        match flag.as_str() {
            "--api-sock" => a.api_sock = Some(value(&mut it)?.into()),
            "--no-api" => switch(&mut a.no_api)?,
            "--config-file" => a.config_file = Some(value(&mut it)?.into()),
            "--id" => {
                let id = value(&mut it)?;
                if !valid_id(&id) {
                    return Err(ArgError::Invalid {
                        flag,
                        why: format!("`{id}` is not 1-64 ASCII letters, digits and hyphens"),
                    });
                }
                a.id = Some(id);
            }
            "--level" => a.level = Some(value(&mut it)?),
            "--log-path" => a.log_path = Some(value(&mut it)?.into()),
            "--show-level" => switch(&mut a.show_level)?,
            "--show-log-origin" => switch(&mut a.show_log_origin)?,
            "--metrics-path" => a.metrics_path = Some(value(&mut it)?.into()),
            "--boot-timer" => switch(&mut a.boot_timer)?,
            "--http-api-max-payload-size" => {
                let v = value(&mut it)?;
                let n = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(ArgError::Invalid {
                        flag: flag.clone(),
                        why: format!("`{v}` is not a positive number of bytes"),
                    })?;
                a.max_payload = Some(n);
            }
            "--version" | "-V" => switch(&mut a.version)?,
            "--help" | "-h" => switch(&mut a.help)?,
            // Jail and seccomp.
            "--jail" => switch(&mut a.jail)?,
            "--uid" => a.uid = Some(value(&mut it)?),
            "--gid" => a.gid = Some(value(&mut it)?),
            "--chroot-base-dir" => a.chroot_base_dir = Some(value(&mut it)?.into()),
            "--netns" => a.netns = Some(value(&mut it)?.into()),
            "--new-pid-ns" => switch(&mut a.new_pid_ns)?,
            "--cgroup-version" => a.cgroup_version = Some(value(&mut it)?),
            "--cgroup" => a.cgroups.push(value(&mut it)?),
            "--parent-cgroup" => a.parent_cgroup = Some(value(&mut it)?),
            "--resource-limit" => a.resource_limits.push(value(&mut it)?),
            "--daemonize" => switch(&mut a.daemonize)?,
            "--no-seccomp" => switch(&mut a.no_seccomp)?,
            "--seccomp-filter" => a.seccomp_filter = Some(value(&mut it)?.into()),
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    if a.no_api && a.config_file.is_none() && !a.help && !a.version {
        return Err(ArgError::NoApiWithoutConfig);
    }
    Ok(a)
}

/// Parses a Firecracker log level name (case-insensitive; "Warn" accepted too).
pub fn parse_level(s: &str) -> Option<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(log::LevelFilter::Off),
        "error" => Some(log::LevelFilter::Error),
        "warning" | "warn" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, ArgError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_with_and_without_equals() {
        let a = p(&["--no-api", "--config-file=vm.json", "--level", "Debug"]).unwrap();
        assert!(a.no_api);
        assert_eq!(a.config_file.unwrap().to_str(), Some("vm.json"));
        assert_eq!(a.level.as_deref(), Some("Debug"));
    }

    #[test]
    fn errors() {
        assert!(matches!(p(&["--bogus"]), Err(ArgError::Unknown(_))));
        assert!(matches!(
            p(&["--config-file"]),
            Err(ArgError::MissingValue(_))
        ));
        assert_eq!(p(&["--no-api"]).unwrap_err(), ArgError::NoApiWithoutConfig);
        assert!(matches!(p(&["--id", "a_b"]), Err(ArgError::Invalid { .. })));
        assert!(matches!(
            p(&["--id", "a", "--id", "b"]),
            Err(ArgError::Duplicate(_))
        ));
        assert!(matches!(
            p(&["--no-api=1", "--config-file", "x"]),
            Err(ArgError::UnexpectedValue(_))
        ));
    }
}
