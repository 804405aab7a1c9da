//! ember's entry point: flags, configuration, then the VMM thread's event loop.
//!
//! `main` only reports: `run` does the work and returns either the exit code of a VM that
//! ran, or a [`StartError`] that knows its own exit code.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ember::action::Action;
use ember::controller::Controller;
use ember::devices::serial::restore_terminal;
use ember::vcpu::{ExitSignal, VmExit};
use ember::vmm::{EventLoop, ProcessControl, Subscriber};
use ember::{action, api, cli, config, exit_code, jail, logger, metrics, seccomp, vmm};
use event_manager::SubscriberOps;

/// Firecracker's default, where engines that pass no `--api-sock` (Kata under the jailer)
/// look for the socket: inside the jail when jailed.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";
/// Metrics are flushed this often when a metrics path is set (Firecracker: 60 s).
const METRICS_PERIOD_MS: i32 = 60_000;

/// Why ember could not start (or keep) a VM, with the exit code each reason gets.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0}")]
    Args(#[from] cli::ArgError),
    #[error("`--level`: unknown level (use Off, Error, Warning, Info, Debug or Trace)")]
    Level,
    #[error("cannot open log file {}: {source}", path.display())]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    MetricsPath(std::io::Error),
    /// `--profile-boot`'s output or `--profile-boot-symbols` is unusable.
    #[error("{0}")]
    Profile(String),
    #[error("cannot read config file {}: {source}", path.display())]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {}: {source}", path.display())]
    Config {
        path: PathBuf,
        source: config::ConfigError,
    },
    /// The config file's `logger` or `metrics` section names a file ember cannot open.
    #[error("{0}")]
    ConfigOutput(std::io::Error),
    #[error("cannot block signals: {0}")]
    BlockSignals(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot create event loop: {0}")]
    EventLoop(String),
    #[error("cannot watch signals: {0}")]
    WatchSignals(std::io::Error),
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("cannot start the VM: {0}")]
    Boot(String),
    #[error("--metadata {}: {why}", path.display())]
    Metadata { path: PathBuf, why: String },
    #[error("{0}")]
    Snapshot(String),
    #[error("{0}")]
    Restore(String),
    #[error("ember snapshot-merge: {0}\n{usage}", usage = ember::snapshot::merge::USAGE)]
    Merge(#[from] ember::snapshot::merge::MergeError),
}

impl StartError {
    /// The process exit code (see the README's table).
    fn exit_code(&self) -> i32 {
        match self {
            StartError::Args(_)
            | StartError::Level
            | StartError::LogFile { .. }
            | StartError::MetricsPath(_)
            | StartError::Profile(_) => exit_code::ARG_PARSING,
            StartError::ReadConfig { .. }
            | StartError::Config { .. }
            | StartError::ConfigOutput(_)
            | StartError::Metadata { .. }
            | StartError::Boot(_)
            | StartError::Restore(_) => exit_code::BAD_CONFIGURATION,
            StartError::Snapshot(_) => exit_code::GENERIC_ERROR,
            StartError::Merge(_) => exit_code::ARG_PARSING,
            StartError::Seccomp(e) => e.exit_code(),
            StartError::Jail(e) => e.exit_code(),
            StartError::BlockSignals(_)
            | StartError::EventFd(_)
            | StartError::EventLoop(_)
            | StartError::WatchSignals(_)
            | StartError::Api(_) => exit_code::GENERIC_ERROR,
        }
    }

    /// Errors found before the logger has its configuration go to stderr only.
    fn before_logging(&self) -> bool {
        matches!(
            self,
            StartError::Args(_)
                | StartError::Merge(_)
                | StartError::Level
                | StartError::LogFile { .. }
                | StartError::MetricsPath(_)
                | StartError::Profile(_)
        )
    }
}

fn main() {
    // Before ember opens anything: what it inherited (closed when it enters a jail).
    let inherited_fds = jail::open_fds();
    metrics::start();
    std::panic::set_hook(Box::new(|info| {
        restore_terminal();
        eprintln!("ember: internal error: {info}");
        std::process::exit(exit_code::UNEXPECTED_ERROR);
    }));
    let code = match run(&inherited_fds) {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            e.exit_code()
        }
    };
    // process::exit runs no destructors: flush what --help or --version printed.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code);
}

/// Tells the user why ember stops: in the log, and on stderr when the log would not
/// reach them (off, or going to a file).
fn report(e: &StartError) {
    restore_terminal();
    if e.before_logging() {
        eprintln!("ember: {e}");
        return;
    }
    log::error!("{e}");
    if !log::log_enabled!(log::Level::Error) || logger::writes_to_file() {
        eprintln!("ember: {e}");
    }
}

/// The command line: ember's own, or Firecracker's jailer's (see `cli::jailer_invocation`).
fn parse_args() -> Result<cli::Args, StartError> {
    let argv: Vec<String> = std::env::args().collect();
    let argv0 = argv.first().map(String::as_str).unwrap_or("ember");
    let rest = argv.get(1..).unwrap_or_default();
    Ok(match cli::jailer_invocation(argv0, rest) {
        Some(jailer_args) => {
            let mut args = cli::parse_jailer(jailer_args)?;
            // Firecracker's jailer appends its own start (`--start-time-us`, and the CPU
            // times) to the VMM's flags, so the VMM's start-up metrics count from the
            // jailer's start. Here ember is that jailer: its start counts, unless the
            // engine passed the flags itself. The CPU clock restarts in the forked VMM,
            // so the CPU figure counts the VMM's own time from its fork.
            args.start_time_us.get_or_insert_with(metrics::monotonic_us);
            args.start_time_cpu_us.get_or_insert(0);
            args
        }
        None => cli::parse(rest.iter().cloned())?,
    })
}

/// `--version`: Firecracker's first line, so version gates that parse it (Kata reads the
/// second field as semver) compare the API level ember implements; then ember's own.
fn version_text() -> String {
    format!(
        "Firecracker v{api}\n\nember v{own} (implements the Firecracker v{api} API)\n",
        api = ember::FIRECRACKER_API_VERSION,
        own = ember::EMBER_VERSION,
    )
}

/// `jailer --version`: Firecracker's jailer prints `Jailer v<version>` and an empty line;
/// ember prints the Firecracker release whose jailer command line it takes, then its own
/// version as `--version` does.
fn jailer_version_text() -> String {
    format!(
        "Jailer v{api}\n\nember v{own} (implements the Firecracker v{api} jailer command line)\n",
        api = ember::FIRECRACKER_API_VERSION,
        own = ember::EMBER_VERSION,
    )
}

/// `--snapshot-version`: the state-file format version, first and alone on its line as
/// Firecracker prints its snapshot data format version; then which files this ember reads.
fn snapshot_version_text() -> String {
    use ember::snapshot::format::{EMBER_VERSION, FORMAT_VERSION};
    format!(
        "v{FORMAT_VERSION}\n\nember v{EMBER_VERSION} writes snapshot format v{FORMAT_VERSION} and restores \
         format v{FORMAT_VERSION} state files written by ember v{EMBER_VERSION}\n"
    )
}

/// `--describe-snapshot FILE`: the file's format version first, as Firecracker prints
/// its snapshot's data format version; then the ember that wrote it.
fn describe_text(d: &ember::snapshot::format::Description) -> String {
    use ember::snapshot::format::{EMBER_VERSION, FORMAT_VERSION};
    let detail = match &d.ember_version {
        Some(v) if d.loadable() => format!("written by ember v{v}; this ember can restore it"),
        Some(v) => format!(
            "written by ember v{v}; this ember (v{EMBER_VERSION}) cannot restore it: use the ember that wrote it"
        ),
        None => format!(
            "a snapshot format this ember (v{EMBER_VERSION}) does not know: it reads format v{FORMAT_VERSION}"
        ),
    };
    format!("v{}\n\n{detail}\n", d.format)
}

/// One warning line for each flag ember accepts but does not act on (yet).
fn warn_unimplemented_flags(args: &cli::Args) {
    if let Some(n) = &args.jailer_node {
        log::warn!("jailer: `--node {n}` is ignored; use --cgroup cpuset.mems=N");
    }
    if args.enable_pci {
        log::warn!(
            "--enable-pci: ember has no PCI; its devices are on virtio-mmio (the guest finds them through the kernel command line)"
        );
    }
}

/// Reads `--metadata` (JSON, as Firecracker requires) for the MMDS.
fn read_metadata(args: &cli::Args) -> Result<Option<serde_json::Value>, StartError> {
    let Some(path) = &args.metadata else {
        return Ok(None);
    };
    let bad = |why: String| StartError::Metadata {
        path: path.clone(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| bad(format!("not valid JSON: {e}")))
}

/// Runs ember to the end; returns the exit code of the VM's stop.
fn run(inherited_fds: &[i32]) -> Result<i32, StartError> {
    // `ember snapshot-merge`: an offline tool, no VM.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("snapshot-merge") {
        let rest = argv.get(1..).unwrap_or_default();
        if rest.iter().any(|a| a == "--help" || a == "-h") {
            print!("{}", ember::snapshot::merge::USAGE);
            return Ok(exit_code::OK);
        }
        let bytes = ember::snapshot::merge::run(rest)?;
        println!("merged {bytes} bytes");
        return Ok(exit_code::OK);
    }
    let args = parse_args()?;
    if args.help {
        if args.jailer_form {
            print!("{}", jailer_version_text());
        }
        print!("{}", cli::USAGE);
        return Ok(exit_code::OK);
    }
    if args.version {
        if args.jailer_form {
            print!("{}", jailer_version_text());
        } else {
            print!("{}", version_text());
        }
        return Ok(exit_code::OK);
    }
    if args.snapshot_version {
        print!("{}", snapshot_version_text());
        return Ok(exit_code::OK);
    }
    if let Some(path) = &args.describe_snapshot {
        let path = path.to_string_lossy();
        let d = ember::snapshot::describe_state(&path)
            .map_err(|e| StartError::Snapshot(format!("--describe-snapshot: {e}")))?;
        print!("{}", describe_text(&d));
        return Ok(exit_code::OK);
    }
    // Before anything starts: a profile's output files and symbols, so that a bad path
    // fails at once, and the files are open before any seccomp filter applies.
    let profile = args
        .profile
        .clone()
        .map(ember::profile::ProfileSetup::new)
        .transpose()
        .map_err(StartError::Profile)?;
    if profile.is_some() && args.restore.is_some() {
        return Err(StartError::Profile(
            "--profile-boot profiles a boot, not a restored snapshot: use it without --restore"
                .into(),
        ));
    }
    let jail_args = jail::JailArgs::from_cli(&args)?;
    let mut jail_guard = None;
    // Firecracker's jailer form: the engine prepared the jail root (kernel, drives, the
    // config file, FIFOs) and passes paths inside it, so ember enters the jail first and
    // then reads everything from there, as Firecracker does after the jailer's exec.
    if let Some(j) = jail_args.as_ref().filter(|j| j.engine_root) {
        vmm::block_stop_signals().map_err(StartError::BlockSignals)?;
        jail_guard = Some(enter_jail(j, None, &mut Vec::new(), inherited_fds)?);
    }
    let id = init_logging(&args)?;
    log::info!(
        "Running ember v{} (Firecracker v{} API)",
        ember::EMBER_VERSION,
        ember::FIRECRACKER_API_VERSION
    );
    let start_times = metrics::StartTimes {
        start_time_us: args.start_time_us,
        start_time_cpu_us: args.start_time_cpu_us,
        parent_cpu_time_us: args.parent_cpu_time_us,
    };
    let metadata = read_metadata(&args)?;
    let mut file_config = read_config_file(&args, &id)?;
    // After the config file's logger section: the warnings go where the log goes.
    warn_unimplemented_flags(&args);
    metrics::timeline_mark(&metrics::METRICS.boot_timeline_us.config_ready);

    if jail_guard.is_none() {
        vmm::block_stop_signals().map_err(StartError::BlockSignals)?;
    }
    // Seccomp policy and jail: after the configuration is read (host paths), before any
    // thread starts (the jail forks; signals are blocked first so the supervisor can
    // forward them).
    let seccomp_config =
        seccomp::SeccompConfig::from_flags(args.no_seccomp, args.seccomp_filter.as_deref())?;
    seccomp::init(&seccomp_config)?;
    // Host paths the jail imported, as (path inside the jail, path the user gave).
    let mut path_aliases = Vec::new();
    if let Some(j) = jail_args.as_ref().filter(|j| !j.engine_root) {
        jail_guard = Some(enter_jail(
            j,
            file_config.as_mut(),
            &mut path_aliases,
            inherited_fds,
        )?);
    }

    let exit = Arc::new(ExitSignal::new().map_err(StartError::EventFd)?);
    let mut event_loop = EventLoop::new().map_err(|e| StartError::EventLoop(format!("{e:?}")))?;
    let pc: Subscriber = Arc::new(Mutex::new(
        ProcessControl::new(exit.clone()).map_err(StartError::WatchSignals)?,
    ));
    event_loop.add_subscriber(pc);

    let mut controller = Controller::new(
        id,
        file_config.clone().unwrap_or_default(),
        exit.clone(),
        args.boot_timer,
    );
    controller.path_aliases = path_aliases;
    controller.profile = profile;
    controller.mmds = read_metadata_into_store(&args, metadata)?;
    // The API thread, unless --no-api: it only parses and forwards actions to this thread.
    let api = if args.no_api {
        None
    } else {
        let path = args
            .api_sock
            .clone()
            .unwrap_or_else(|| DEFAULT_API_SOCK.into());
        let (sender, receiver) = action::channel().map_err(StartError::EventFd)?;
        let wake: Subscriber = Arc::new(Mutex::new(ApiWake(receiver.wake.clone())));
        event_loop.add_subscriber(wake);
        let max = args.max_payload.unwrap_or(api::DEFAULT_MAX_PAYLOAD);
        let server = api::start(&path, sender, max)?;
        Some((server, receiver))
    };
    // Firecracker reports these once its API is up (and ember, without the API, once the
    // VM is configured).
    metrics::report_start_times(&start_times);
    // With the API and nothing to start right away, the VM itself is made while the host
    // agent configures it: once the first request is answered, so that neither the
    // agent's wait for the socket nor its first request shares the CPU with it.
    let mut prepare_pending = api.is_some() && file_config.is_none() && args.restore.is_none();

    // --restore: the body of PUT /snapshot/load, applied before the API answers anything.
    if let Some(path) = &args.restore {
        let result = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|t| {
                serde_json::from_str::<config::snapshot::LoadSnapshotParams>(&t)
                    .map_err(|e| format!("invalid --restore file {}: {e}", path.display()))
            })
            .and_then(|p| {
                controller
                    .handle(Action::LoadSnapshot(p), &mut event_loop)
                    .map_err(|e| format!("cannot restore the snapshot: {}", e.message))
            });
        if let Err(e) = result {
            if let Some((server, _)) = &api {
                api::remove_socket(server.path());
            }
            return Err(StartError::Restore(e));
        }
    }
    if file_config.is_some()
        && let Err(e) = controller.handle(Action::InstanceStart, &mut event_loop)
    {
        if let Some((server, _)) = &api {
            api::remove_socket(server.path());
        }
        return Err(StartError::Boot(e.message));
    }

    let why = loop {
        if let Some(why) = exit.reason() {
            break why;
        }
        if let Err(e) = event_loop.run_with_timeout(METRICS_PERIOD_MS) {
            break VmExit::VmmError(format!("event loop: {e:?}"));
        }
        if let Some((_, receiver)) = &api {
            let mut answered = false;
            while let Ok(req) = receiver.rx.try_recv() {
                let started = std::time::Instant::now();
                let result = controller.handle(req.action, &mut event_loop);
                metrics::record_api_request(started.elapsed().as_micros() as u64, result.is_ok());
                action::answer(&req.reply, result);
                answered = true;
            }
            if prepare_pending && answered {
                prepare_pending = false;
                controller.prepare();
            }
        }
        metrics::flush_if_due();
    };
    metrics::timeline_mark(&metrics::METRICS.boot_timeline_us.vm_stopped);
    if let Some((server, receiver)) = api {
        server.stop(receiver);
    }
    controller.shutdown();
    metrics::timeline_mark(&metrics::METRICS.boot_timeline_us.shutdown_done);
    match &why {
        VmExit::GuestReset | VmExit::GuestShutdown | VmExit::Signal(_) => {
            log::info!("VM stopped: {why}")
        }
        _ => log::error!("VM stopped: {why}"),
    }
    if why.exit_code() != 0 && !log::log_enabled!(log::Level::Error) {
        eprintln!("ember: VM stopped: {why}");
    }
    log::info!("{}", metrics::timeline_summary());
    let _ = metrics::flush();
    if let Some(g) = jail_guard {
        g.cleanup();
    }
    Ok(why.exit_code())
}

/// The logger and metrics outputs from the flags; returns the instance id.
fn init_logging(args: &cli::Args) -> Result<String, StartError> {
    let level = match args.level.as_deref().map(cli::parse_level) {
        None => log::LevelFilter::Warn,
        Some(Some(l)) => l,
        Some(None) => return Err(StartError::Level),
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".into());
    logger::init(&id, level, args.show_level, args.show_log_origin);
    if let Some(m) = &args.module {
        logger::set_module(m);
    }
    if let Some(path) = &args.log_path {
        let file = metrics::open_output(&path.to_string_lossy()).map_err(|source| {
            StartError::LogFile {
                path: path.clone(),
                source,
            }
        })?;
        logger::set_output(file);
    }
    if let Some(path) = &args.metrics_path {
        metrics::set_output(&path.to_string_lossy()).map_err(StartError::MetricsPath)?;
    }
    Ok(id)
}

/// The MMDS store, bounded by `--mmds-size-limit` (as Firecracker, the API's body limit
/// when absent), holding `--metadata`'s contents.
fn read_metadata_into_store(
    args: &cli::Args,
    metadata: Option<serde_json::Value>,
) -> Result<ember::mmds::SharedMmds, StartError> {
    let limit = args
        .mmds_size_limit
        .or(args.max_payload)
        .unwrap_or(api::DEFAULT_MAX_PAYLOAD);
    let store = ember::mmds::Mmds::shared(limit);
    if let Some(v) = metadata {
        ember::mmds::lock(&store)
            .put(v)
            .map_err(|e| StartError::Metadata {
                path: args.metadata.clone().unwrap_or_default(),
                why: format!("{e} (the store is limited to {limit} bytes by --mmds-size-limit)"),
            })?;
        log::info!("MMDS store filled from --metadata");
    }
    Ok(store)
}

/// The configuration file, if any: parsed and validated before anything else happens,
/// and its logger and metrics sections applied.
fn read_config_file(args: &cli::Args, id: &str) -> Result<Option<config::VmConfig>, StartError> {
    let Some(path) = &args.config_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|source| StartError::ReadConfig {
        path: path.clone(),
        source,
    })?;
    let (c, warnings) =
        config::VmConfig::from_json_with_warnings(&text).map_err(|source| StartError::Config {
            path: path.clone(),
            source,
        })?;
    if let Some(l) = &c.logger {
        logger::apply_config(l).map_err(StartError::ConfigOutput)?;
    }
    if let Some(m) = &c.metrics {
        m.apply(id).map_err(StartError::ConfigOutput)?;
    }
    for w in warnings {
        log::warn!("{w}");
    }
    Ok(Some(c))
}

/// Builds the jail, imports the configuration's host files into it (rewriting their
/// paths and remembering the user's in `path_aliases`), and enters it.
fn enter_jail(
    args: &jail::JailArgs,
    file_config: Option<&mut config::VmConfig>,
    path_aliases: &mut Vec<(String, String)>,
    inherited_fds: &[i32],
) -> Result<jail::JailGuard, StartError> {
    let mut jail = jail::Jail::prepare(args)?;
    if let Some(c) = file_config {
        let mut import = |p: &mut String| -> Result<(), StartError> {
            let in_jail = jail.import(std::path::Path::new(p))?;
            let in_jail = in_jail.to_string_lossy().into_owned();
            path_aliases.push((in_jail.clone(), p.clone()));
            *p = in_jail;
            Ok(())
        };
        import(&mut c.boot_source.kernel_image_path)?;
        if let Some(p) = c.boot_source.initrd_path.as_mut() {
            import(p)?;
        }
        for d in &mut c.drives {
            import(&mut d.path_on_host)?;
        }
    }
    Ok(jail.enter(&jail::opened_since(inherited_fds))?)
}

/// Wakes the event loop when the API thread has sent an action.
struct ApiWake(Arc<vmm_sys_util::eventfd::EventFd>);

impl event_manager::MutEventSubscriber for ApiWake {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        let _ = ops.add(event_manager::Events::new(
            &*self.0,
            vmm_sys_util::epoll::EventSet::IN,
        ));
    }
}
