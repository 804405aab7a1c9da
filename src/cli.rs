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
  --api-sock PATH                   serve the HTTP API on this Unix socket (default /run/firecracker.socket)
  --no-api                          no API; needs --config-file
  --config-file FILE                boot from a JSON file in Firecracker's schema
  --restore FILE                    restore a snapshot at start: FILE holds a PUT /snapshot/load body
  --id ID                           instance id (1-64 letters, digits, hyphens; default anonymous-instance)
  --level LEVEL                     log level: Off, Error, Warning, Info, Debug, Trace (default Warning)
  --log-path PATH                   write the log here instead of stderr
  --show-level                      prefix log lines with their level
  --show-log-origin                 prefix log lines with file:line
  --module MODULE                   log only records from this module path (e.g. ember::devices)
  --metrics-path PATH               write metrics (JSON lines) here
  --boot-timer                      add the boot-timer device (guest writes 123 at 0xd0000000)
  --http-api-max-payload-size N     largest accepted API body in bytes (default 51200)
  --start-time-us US                when the launch began (wall clock, µs since the epoch; set by jailers)
  --start-time-cpu-us US            the launcher's CPU time at that point (µs)
  --parent-cpu-time-us US           CPU time the launcher spent before starting ember (µs)
  --metadata FILE                   fill the MMDS store from this JSON file at start
  --mmds-size-limit BYTES           largest MMDS store (default: the API body limit)
  --enable-pci                      accepted; ember's devices are on virtio-mmio (warning)
  --snapshot-version                print the snapshot format version and exit
  --describe-snapshot FILE          print the format version of a snapshot file and exit
  --profile-boot FILE               profile the guest's boot: top functions to FILE, folded stacks to FILE.folded
  --profile-boot-hz N               samples per second of the boot vCPU (1-10000, default 97)
  --profile-boot-until MARKER|SECONDS  stop at this console text, or after SECONDS (default: when the VM stops; 600 s at most)
  --profile-boot-symbols VMLINUX    name samples with this ELF's symbols (default: the kernel image's, if an ELF)
  --profile-boot-stacks             walk the guest's frame pointers (a kernel built with CONFIG_FRAME_POINTER)
  --version                         print the version and exit
  --help                            print this help and exit

Jail (see src/jail/mod.rs; as Firecracker's jailer where they overlap). ember also takes
Firecracker's jailer command line itself, when started as `jailer` or as `ember jailer`:
  jailer --id ID --exec-file BIN --uid U --gid G [jail options] -- [ember options]
  --jail                            confine ember: namespaces, pivot_root, cgroups, rlimits, uid/gid
  --uid UID, --gid GID              the user and group ember drops to (required with --jail)
  --chroot-base-dir DIR             jails are built in DIR/ember/ID/root (default /srv/ember)
  --netns PATH                      join this network namespace (e.g. /var/run/netns/NAME)
  --new-pid-ns                      run the VMM as PID 1 of a new PID namespace (jailer form: the
                                    command returns once the VMM is jailed, as Firecracker's jailer)
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
    /// A `PUT /snapshot/load` body applied at start, before the API serves.
    pub restore: Option<PathBuf>,
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
    pub module: Option<String>,
    /// Firecracker's boot-time inputs, as a jailer passes them (see `metrics::StartTimes`).
    pub start_time_us: Option<u64>,
    pub start_time_cpu_us: Option<u64>,
    pub parent_cpu_time_us: Option<u64>,
    /// MMDS inputs: the store's contents at start and its size limit.
    pub metadata: Option<PathBuf>,
    pub mmds_size_limit: Option<usize>,
    pub enable_pci: bool,
    pub snapshot_version: bool,
    pub describe_snapshot: Option<PathBuf>,
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
    /// Set by the jailer form only (`parse_jailer`): the binary the jailer was asked to
    /// run. ember runs itself in the jail, so this names the jail directory
    /// (`<base>/<basename>/<id>`) and must be this ember.
    pub exec_file: Option<PathBuf>,
    /// The jailer's old `--node N` (NUMA node), which Kata still passes: ignored with a
    /// warning (placement is the cgroups' job, `--cgroup cpuset.mems=N`).
    pub jailer_node: Option<String>,
    /// Started with Firecracker's jailer command line (`cli::jailer_invocation`):
    /// `--version` and `--help` answer as the jailer does.
    pub jailer_form: bool,
    /// `--profile-boot*` (src/profile): the profile asked for, checked by `parse`.
    pub profile: Option<crate::profile::ProfileOptions>,
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
        "--no-api needs --config-file or --restore: without the API, a file is the only way to configure the VM"
    )]
    NoApiWithoutConfig,
    #[error(
        "--config-file and --restore exclude each other: a restored VM takes its configuration from the snapshot"
    )]
    ConfigAndRestore,
}

/// The `--profile-boot*` flags as given, before they are checked together.
#[derive(Default)]
struct ProfileFlags {
    out: Option<PathBuf>,
    hz: Option<u32>,
    until: Option<crate::profile::Until>,
    symbols: Option<PathBuf>,
    stacks: bool,
}

impl ProfileFlags {
    fn finish(self) -> Result<Option<crate::profile::ProfileOptions>, ArgError> {
        let Some(out) = self.out else {
            let stray = [
                ("--profile-boot-hz", self.hz.is_some()),
                ("--profile-boot-until", self.until.is_some()),
                ("--profile-boot-symbols", self.symbols.is_some()),
                ("--profile-boot-stacks", self.stacks),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                return Err(ArgError::Invalid {
                    flag: flag.to_string(),
                    why: "needs --profile-boot FILE".into(),
                });
            }
            return Ok(None);
        };
        if out.as_os_str().is_empty() {
            return Err(ArgError::Invalid {
                flag: "--profile-boot".into(),
                why: "needs a file name".into(),
            });
        }
        Ok(Some(crate::profile::ProfileOptions {
            out,
            hz: self.hz.unwrap_or(crate::profile::DEFAULT_HZ),
            until: self.until.unwrap_or(crate::profile::Until::Stop),
            symbols: self.symbols,
            stacks: self.stacks,
        }))
    }
}

/// Checks an instance id: 1-64 characters, ASCII letters, digits and hyphens.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub fn parse<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, ArgError> {
    let mut a = Args::default();
    let mut profile = ProfileFlags::default();
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
            "--restore" => a.restore = Some(value(&mut it)?.into()),
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
            "--module" => a.module = Some(value(&mut it)?),
            "--start-time-us" => a.start_time_us = Some(number(&flag, &value(&mut it)?)?),
            "--start-time-cpu-us" => a.start_time_cpu_us = Some(number(&flag, &value(&mut it)?)?),
            "--parent-cpu-time-us" => a.parent_cpu_time_us = Some(number(&flag, &value(&mut it)?)?),
            "--metadata" => a.metadata = Some(value(&mut it)?.into()),
            "--mmds-size-limit" => {
                let n = number(&flag, &value(&mut it)?)?;
                a.mmds_size_limit = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "--enable-pci" => switch(&mut a.enable_pci)?,
            "--snapshot-version" => switch(&mut a.snapshot_version)?,
            "--describe-snapshot" => a.describe_snapshot = Some(value(&mut it)?.into()),
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
            "--profile-boot" => profile.out = Some(value(&mut it)?.into()),
            "--profile-boot-hz" => {
                let v = value(&mut it)?;
                let hz = crate::profile::parse_hz(&v).map_err(|why| ArgError::Invalid {
                    flag: flag.clone(),
                    why,
                })?;
                profile.hz = Some(hz);
            }
            "--profile-boot-until" => {
                let v = value(&mut it)?;
                let until = crate::profile::parse_until(&v).map_err(|why| ArgError::Invalid {
                    flag: flag.clone(),
                    why,
                })?;
                profile.until = Some(until);
            }
            "--profile-boot-symbols" => profile.symbols = Some(value(&mut it)?.into()),
            "--profile-boot-stacks" => switch(&mut profile.stacks)?,
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    a.profile = profile.finish()?;
    let informational = a.help || a.version || a.snapshot_version || a.describe_snapshot.is_some();
    if a.no_api && a.config_file.is_none() && a.restore.is_none() && !informational {
        return Err(ArgError::NoApiWithoutConfig);
    }
    if a.config_file.is_some() && a.restore.is_some() {
        return Err(ArgError::ConfigAndRestore);
    }
    Ok(a)
}

fn number(flag: &str, v: &str) -> Result<u64, ArgError> {
    v.parse::<u64>().map_err(|_| ArgError::Invalid {
        flag: flag.to_string(),
        why: format!("`{v}` is not a non-negative integer"),
    })
}

/// Whether ember was started as Firecracker's jailer: under the name `jailer` (a link
/// named so, as engines configure a `jailer_path`) or as `ember jailer ...`. Returns the
/// arguments that follow.
pub fn jailer_invocation(argv0: &str, rest: &[String]) -> Option<Vec<String>> {
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    if name == "jailer" {
        Some(rest.to_vec())
    } else if rest.first().map(String::as_str) == Some("jailer") {
        Some(rest.iter().skip(1).cloned().collect())
    } else {
        None
    }
}

/// Parses Firecracker's jailer command line, `--id ID --exec-file BIN --uid U --gid G
/// [jail flags] -- [VMM flags]`, into the same `Args` as `ember --jail ...`. The VMM
/// flags are ember's (Firecracker's) own; the jailer's appended `--id` and start times
/// are taken from the jailer's side, as Firecracker's jailer passes them on.
pub fn parse_jailer<I: IntoIterator<Item = String>>(argv: I) -> Result<Args, ArgError> {
    let argv: Vec<String> = argv.into_iter().collect();
    let split = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let (jailer, vmm) = argv.split_at(split);
    let mut a = parse(vmm.iter().skip(1).cloned())?;
    if a.jail || a.uid.is_some() || a.gid.is_some() || a.chroot_base_dir.is_some() {
        return Err(ArgError::Invalid {
            flag: "--".into(),
            why: "jail flags go before `--`, the VMM's flags after it".into(),
        });
    }
    a.jailer_form = true;
    let mut seen = std::collections::HashSet::new();
    let mut it = jailer.iter().cloned();
    let vmm_id = a.id.take();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !seen.insert(flag.clone()) && !REPEATABLE.contains(&flag.as_str()) {
            return Err(ArgError::Duplicate(flag));
        }
        let mut value = || -> Result<String, ArgError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .ok_or_else(|| ArgError::MissingValue(flag.clone())),
            }
        };
        match flag.as_str() {
            "--id" => {
                let id = value()?;
                if !valid_id(&id) {
                    return Err(ArgError::Invalid {
                        flag,
                        why: format!("`{id}` is not 1-64 ASCII letters, digits and hyphens"),
                    });
                }
                a.id = Some(id);
            }
            "--exec-file" => a.exec_file = Some(value()?.into()),
            "--uid" => a.uid = Some(value()?),
            "--gid" => a.gid = Some(value()?),
            "--chroot-base-dir" => a.chroot_base_dir = Some(value()?.into()),
            "--netns" => a.netns = Some(value()?.into()),
            "--cgroup-version" => a.cgroup_version = Some(value()?),
            "--cgroup" => a.cgroups.push(value()?),
            "--parent-cgroup" => a.parent_cgroup = Some(value()?),
            "--resource-limit" => a.resource_limits.push(value()?),
            // An old jailer flag (NUMA node) that engines such as Kata still pass; ember
            // leaves placement to the cgroup settings (`--cgroup cpuset.mems=N`).
            "--node" => a.jailer_node = Some(value()?),
            "--daemonize" if inline.is_none() => a.daemonize = true,
            "--new-pid-ns" if inline.is_none() => a.new_pid_ns = true,
            "--daemonize" | "--new-pid-ns" => return Err(ArgError::UnexpectedValue(flag)),
            "--help" | "-h" => a.help = true,
            "--version" | "-V" => a.version = true,
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    if a.help || a.version {
        return Ok(a);
    }
    for (flag, missing) in [
        ("--id", a.id.is_none()),
        ("--exec-file", a.exec_file.is_none()),
        ("--uid", a.uid.is_none()),
        ("--gid", a.gid.is_none()),
    ] {
        if missing {
            return Err(ArgError::MissingValue(format!("jailer {flag}")));
        }
    }
    if let (Some(v), Some(j)) = (&vmm_id, &a.id)
        && v != j
    {
        return Err(ArgError::Invalid {
            flag: "--id".into(),
            why: format!("the jailer's `{j}` and the VMM's `{v}` differ"),
        });
    }
    a.jail = true;
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

    /// Every Firecracker flag is accepted (issue 14), with its value kept.
    #[test]
    fn every_firecracker_flag() {
        let a = p(&[
            "--api-sock",
            "/s",
            "--id",
            "vm-1",
            "--seccomp-filter",
            "/f",
            "--start-time-us",
            "12",
            "--start-time-cpu-us",
            "3",
            "--parent-cpu-time-us",
            "4",
            "--config-file",
            "/c",
            "--metadata",
            "/m.json",
            "--mmds-size-limit",
            "1024",
            "--log-path",
            "/l",
            "--level",
            "Info",
            "--module",
            "ember::api",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            "/mx",
            "--boot-timer",
            "--http-api-max-payload-size",
            "100",
            "--enable-pci",
        ])
        .unwrap();
        assert_eq!(
            (a.start_time_us, a.start_time_cpu_us, a.parent_cpu_time_us),
            (Some(12), Some(3), Some(4))
        );
        assert_eq!(a.mmds_size_limit, Some(1024));
        assert_eq!(a.metadata.unwrap().to_str(), Some("/m.json"));
        assert_eq!(a.module.as_deref(), Some("ember::api"));
        assert!(a.enable_pci && a.boot_timer && a.show_level && a.show_log_origin);
        assert!(
            p(&["--no-seccomp", "--no-api", "--config-file", "c"])
                .unwrap()
                .no_seccomp
        );
        assert!(p(&["--version"]).unwrap().version);
        assert!(p(&["--snapshot-version"]).unwrap().snapshot_version);
        assert!(
            p(&["--describe-snapshot", "/s"])
                .unwrap()
                .describe_snapshot
                .is_some()
        );
        assert!(matches!(
            p(&["--start-time-us", "x"]),
            Err(ArgError::Invalid { .. })
        ));
    }

    #[test]
    fn jailer_command_line() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            jailer_invocation("/usr/bin/jailer", &argv(&["--id", "a"])),
            Some(argv(&["--id", "a"]))
        );
        assert_eq!(
            jailer_invocation("ember", &argv(&["jailer", "--id", "a"])),
            Some(argv(&["--id", "a"]))
        );
        assert_eq!(jailer_invocation("ember", &argv(&["--id", "a"])), None);
        let a = parse_jailer(argv(&[
            "--id",
            "vm1",
            "--node",
            "0",
            "--exec-file",
            "/usr/bin/ember",
            "--uid",
            "0",
            "--gid",
            "0",
            "--chroot-base-dir",
            "/run/kata",
            "--daemonize",
            "--netns",
            "/var/run/netns/n",
            "--cgroup",
            "cpu.max=1",
            "--cgroup",
            "memory.max=2",
            "--",
            "--config-file",
            "/fc.json",
            "--id",
            "vm1",
            "--start-time-us",
            "5",
        ]))
        .unwrap();
        assert!(a.jail && a.daemonize);
        assert_eq!(a.id.as_deref(), Some("vm1"));
        assert_eq!(a.exec_file.unwrap().to_str(), Some("/usr/bin/ember"));
        assert_eq!(a.cgroups.len(), 2);
        assert_eq!(a.config_file.unwrap().to_str(), Some("/fc.json"));
        assert_eq!(a.start_time_us, Some(5));
        // What the jailer needs.
        assert!(matches!(
            parse_jailer(argv(&["--id", "a", "--uid", "0", "--gid", "0"])),
            Err(ArgError::MissingValue(_))
        ));
        assert!(matches!(
            parse_jailer(argv(&[
                "--id",
                "a",
                "--exec-file",
                "/e",
                "--uid",
                "0",
                "--gid",
                "0",
                "--bogus"
            ])),
            Err(ArgError::Unknown(_))
        ));
        // The two ids must agree; VMM flags after `--` are ember's.
        assert!(
            parse_jailer(argv(&[
                "--id",
                "a",
                "--exec-file",
                "/e",
                "--uid",
                "0",
                "--gid",
                "0",
                "--",
                "--id",
                "b"
            ]))
            .is_err()
        );
        assert!(matches!(
            parse_jailer(argv(&[
                "--id",
                "a",
                "--exec-file",
                "/e",
                "--uid",
                "0",
                "--gid",
                "0",
                "--",
                "--bogus"
            ])),
            Err(ArgError::Unknown(_))
        ));
    }

    #[test]
    fn errors() {
        assert!(matches!(p(&["--bogus"]), Err(ArgError::Unknown(_))));
        assert!(matches!(
            p(&["--config-file"]),
            Err(ArgError::MissingValue(_))
        ));
        assert_eq!(p(&["--no-api"]).unwrap_err(), ArgError::NoApiWithoutConfig);
        assert!(p(&["--no-api", "--restore", "load.json"]).is_ok());
        assert_eq!(
            p(&["--config-file", "a", "--restore", "b"]).unwrap_err(),
            ArgError::ConfigAndRestore
        );
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
