//! ember's entry point: flags, configuration, then the VMM thread's event loop.

use std::sync::{Arc, Mutex};

use ember::action::Action;
use ember::controller::Controller;
use ember::vcpu::{ExitSignal, VmExit};
use ember::vmm::{EventLoop, ProcessControl, Subscriber};
use ember::{action, api, cli, config, exit_code, jail, logger, metrics, seccomp, vmm};

/// Firecracker's default is /run/firecracker.socket.
const DEFAULT_API_SOCK: &str = "/run/ember.socket";
/// Metrics are flushed this often when a metrics path is set (Firecracker: 60 s).
const METRICS_PERIOD_MS: i32 = 60_000;

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
use event_manager::SubscriberOps;

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    ember::devices::serial::restore_terminal();
    log::error!("{msg}");
    // Also on stderr when the log goes elsewhere or is off, so a user always sees why.
    if !log::log_enabled!(log::Level::Error) || log_to_file() {
        eprintln!("ember: {msg}");
    }
    std::process::exit(code);
}

fn log_to_file() -> bool {
    std::env::args().any(|a| a == "--log-path" || a.starts_with("--log-path="))
}

fn main() {
    // Before ember opens anything: what it inherited (closed when it enters a jail).
    let inherited_fds = jail::open_fds();
    metrics::start();
    std::panic::set_hook(Box::new(|info| {
        ember::devices::serial::restore_terminal();
        eprintln!("ember: internal error: {info}");
        std::process::exit(exit_code::UNEXPECTED_ERROR);
    }));

    let args = match cli::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ember: {e}");
            std::process::exit(exit_code::ARG_PARSING);
        }
    };
    if args.help {
        print!("{}", cli::USAGE);
        return;
    }
    if args.version {
        println!("ember v{}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let level = match args.level.as_deref().map(cli::parse_level) {
        None => log::LevelFilter::Warn,
        Some(Some(l)) => l,
        Some(None) => {
            eprintln!(
                "ember: `--level`: unknown level (use Off, Error, Warning, Info, Debug or Trace)"
            );
            std::process::exit(exit_code::ARG_PARSING);
        }
    };
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".into());
    logger::init(&id, level, args.show_level, args.show_log_origin);
    if let Some(path) = &args.log_path {
        match std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            Ok(f) => logger::set_output(f),
            Err(e) => {
                eprintln!("ember: cannot open log file {}: {e}", path.display());
                std::process::exit(exit_code::ARG_PARSING);
            }
        }
    }
    if let Some(path) = &args.metrics_path
        && let Err(e) = metrics::set_output(&path.to_string_lossy())
    {
        eprintln!("ember: {e}");
        std::process::exit(exit_code::ARG_PARSING);
    }

    // The configuration file, if any: parsed and validated before anything else happens.
    let file_config = args.config_file.as_ref().map(|path| {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => fail(
                exit_code::BAD_CONFIGURATION,
                format!("cannot read config file {}: {e}", path.display()),
            ),
        };
        match config::VmConfig::from_json(&text) {
            Ok(c) => c,
            Err(e) => fail(
                exit_code::BAD_CONFIGURATION,
                format!("invalid config file {}: {e}", path.display()),
            ),
        }
    });
    if let Some(c) = &file_config {
        if let Some(l) = &c.logger
            && let Err(e) = logger::apply_config(l)
        {
            fail(exit_code::BAD_CONFIGURATION, e);
        }
        if let Some(m) = &c.metrics
            && let Err(e) = metrics::set_output(&m.metrics_path)
        {
            fail(exit_code::BAD_CONFIGURATION, e);
        }
    }
    metrics::timeline_mark(&metrics::METRICS.t_config_ready_us);

    if let Err(e) = vmm::block_stop_signals() {
        fail(
            exit_code::GENERIC_ERROR,
            format!("cannot block signals: {e}"),
        );
    }
    // Seccomp policy and jail: after the configuration is read (host paths), before any
    // thread starts (the jail forks; signals are blocked first so the supervisor can
    // forward them).
    let seccomp_config =
        seccomp::SeccompConfig::from_flags(args.no_seccomp, args.seccomp_filter.as_deref())
            .and_then(|c| seccomp::init(&c).map(|()| c));
    if let Err(e) = seccomp_config {
        fail(e.exit_code(), e);
    }
    let jail_args = match jail::JailArgs::from_cli(&args) {
        Ok(j) => j,
        Err(e) => fail(e.exit_code(), e),
    };
    // Host paths the jail imported, as (path inside the jail, path the user gave).
    let mut path_aliases = Vec::new();
    let mut file_config = file_config;
    let jail_guard = jail_args.map(|j| {
        let mut jail = match jail::Jail::prepare(&j) {
            Ok(jail) => jail,
            Err(e) => fail(e.exit_code(), e),
        };
        if let Some(c) = file_config.as_mut() {
            let mut import = |p: &mut String| match jail.import(std::path::Path::new(p)) {
                Ok(in_jail) => {
                    let in_jail = in_jail.to_string_lossy().into_owned();
                    path_aliases.push((in_jail.clone(), p.clone()));
                    *p = in_jail;
                }
                Err(e) => fail(e.exit_code(), e),
            };
            import(&mut c.boot_source.kernel_image_path);
            if let Some(p) = c.boot_source.initrd_path.as_mut() {
                import(p);
            }
            for d in &mut c.drives {
                import(&mut d.path_on_host);
            }
        }
        match jail.enter(&jail::opened_since(&inherited_fds)) {
            Ok(g) => g,
            Err(e) => fail(e.exit_code(), e),
        }
    });
    let exit = match ExitSignal::new() {
        Ok(e) => Arc::new(e),
        Err(e) => fail(
            exit_code::GENERIC_ERROR,
            format!("cannot create eventfd: {e}"),
        ),
    };
    let mut event_loop = match EventLoop::new() {
        Ok(em) => em,
        Err(e) => fail(
            exit_code::GENERIC_ERROR,
            format!("cannot create event loop: {e:?}"),
        ),
    };
    match ProcessControl::new(exit.clone()) {
        Ok(pc) => {
            let pc: Subscriber = Arc::new(Mutex::new(pc));
            event_loop.add_subscriber(pc);
        }
        Err(e) => fail(
            exit_code::GENERIC_ERROR,
            format!("cannot watch signals: {e}"),
        ),
    }

    let mut controller = Controller::new(
        id,
        file_config.clone().unwrap_or_default(),
        exit.clone(),
        args.boot_timer,
    );
    controller.path_aliases = path_aliases;
    // The API thread, unless --no-api: it only parses and forwards actions to this thread.
    let api = if args.no_api {
        None
    } else {
        let path = args
            .api_sock
            .clone()
            .unwrap_or_else(|| DEFAULT_API_SOCK.into());
        let (sender, receiver) = match action::channel() {
            Ok(c) => c,
            Err(e) => fail(
                exit_code::GENERIC_ERROR,
                format!("cannot create eventfd: {e}"),
            ),
        };
        let wake: Subscriber = Arc::new(Mutex::new(ApiWake(receiver.wake.clone())));
        event_loop.add_subscriber(wake);
        let max = args.max_payload.unwrap_or(api::DEFAULT_MAX_PAYLOAD);
        if let Err(e) = api::start(&path, sender, max) {
            fail(exit_code::GENERIC_ERROR, e);
        }
        Some((path, receiver))
    };

    if file_config.is_some()
        && let Err(e) = controller.handle(Action::InstanceStart, &mut event_loop)
    {
        if let Some((path, _)) = &api {
            api::remove_socket(path);
        }
        fail(
            exit_code::BAD_CONFIGURATION,
            format!("cannot start the VM: {}", e.message),
        );
    }

    let why = loop {
        if let Some(why) = exit.reason() {
            break why;
        }
        if let Err(e) = event_loop.run_with_timeout(METRICS_PERIOD_MS) {
            break VmExit::VmmError(format!("event loop: {e:?}"));
        }
        if let Some((_, receiver)) = &api {
            while let Ok(req) = receiver.rx.try_recv() {
                let started = std::time::Instant::now();
                let result = controller.handle(req.action, &mut event_loop);
                metrics::record_api_request(started.elapsed().as_micros() as u64, result.is_ok());
                action::answer(&req.reply, result);
            }
        }
        metrics::flush_if_due();
    };
    if let Some((path, _)) = &api {
        action::wait_for_delivery(std::time::Duration::from_millis(100));
        api::remove_socket(path);
    }
    controller.shutdown();
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
    std::process::exit(why.exit_code());
}
