//! The logger: Firecracker's line format ("<time> [<id>:<thread>] <message>", with the
//! level and origin when asked), to stderr or a file.

use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

pub struct Logger {
    inner: Mutex<Inner>,
}

struct Inner {
    id: String,
    show_level: bool,
    show_origin: bool,
    out: Option<std::fs::File>,
    module: Option<String>,
}

pub static LOGGER: Logger = Logger {
    inner: Mutex::new(Inner {
        id: String::new(),
        show_level: false,
        show_origin: false,
        out: None,
        module: None,
    }),
};

/// Installs the logger (idempotent) at `level`, to stderr.
pub fn init(id: &str, level: LevelFilter, show_level: bool, show_origin: bool) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    if let Ok(mut g) = LOGGER.inner.lock() {
        g.id = id.to_string();
        g.show_level = show_level;
        g.show_origin = show_origin;
    }
}

/// Redirects the log to a file (opened for append; a FIFO works too).
pub fn set_output(file: std::fs::File) {
    if let Ok(mut g) = LOGGER.inner.lock() {
        g.out = Some(file);
    }
}

/// Whether the log goes to a file (set by `--log-path` or a `logger` configuration), so
/// that a fatal error must also be shown on stderr.
pub fn writes_to_file() -> bool {
    LOGGER
        .inner
        .lock()
        .map(|g| g.out.is_some())
        .unwrap_or(false)
}

pub fn configure(level: Option<LevelFilter>, show_level: Option<bool>, show_origin: Option<bool>) {
    if let Some(l) = level {
        log::set_max_level(l);
    }
    if let Ok(mut g) = LOGGER.inner.lock() {
        if let Some(v) = show_level {
            g.show_level = v;
        }
        if let Some(v) = show_origin {
            g.show_origin = v;
        }
    }
}

/// Logs only records whose module path starts with `m`; an empty `m` logs every module
/// (Firecracker accepts an empty module).
pub fn set_module(m: &str) {
    if let Ok(mut g) = LOGGER.inner.lock() {
        g.module = (!m.is_empty()).then(|| m.to_string());
    }
}

/// Wall-clock time as RFC 3339 UTC with nanoseconds, computed without a date crate.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        now.subsec_nanos()
    )
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Ok(mut g) = self.inner.lock() else { return };
        if let Some(m) = &g.module
            && !record.module_path().unwrap_or("").starts_with(m.as_str())
        {
            return;
        }
        let thread = std::thread::current();
        let mut line = format!(
            "{} [{}:{}]",
            timestamp(),
            if g.id.is_empty() {
                "anonymous-instance"
            } else {
                &g.id
            },
            thread.name().unwrap_or("?")
        );
        if g.show_level {
            line.push_str(&format!(" :{}", record.level()));
        }
        if g.show_origin {
            line.push_str(&format!(
                " {}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!(" {}\n", record.args()));
        match g.out.as_mut() {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Applies a `logger` section or `PUT /logger` body: absent fields keep their setting.
pub fn apply_config(c: &crate::config::LoggerConfig) -> std::io::Result<()> {
    if let Some(path) = &c.log_path {
        let f = crate::metrics::open_output(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open log_path {path}: {e}"))
        })?;
        set_output(f);
    }
    configure(
        c.level.map(|l| l.to_level_filter()),
        c.show_level,
        c.show_log_origin,
    );
    if let Some(m) = &c.module {
        set_module(m);
    }
    Ok(())
}
