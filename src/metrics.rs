//! Metrics: static atomic counters, flushed as one JSON object per line (Firecracker's
//! format), and the boot timeline.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Timeline values are microseconds since `start()`; 0 means "not reached".
#[derive(Default)]
pub struct Metrics {
    pub serial_out_bytes: AtomicU64,
    pub serial_dropped_bytes: AtomicU64,
    pub serial_in_bytes: AtomicU64,
    pub pio_unmapped_reads: AtomicU64,
    pub pio_unmapped_writes: AtomicU64,
    pub mmio_unmapped_reads: AtomicU64,
    pub mmio_unmapped_writes: AtomicU64,
    pub vcpu_exits_io: AtomicU64,
    pub vcpu_exits_mmio: AtomicU64,
    pub vcpu_exits_other: AtomicU64,
    pub t_config_ready_us: AtomicU64,
    pub t_vm_built_us: AtomicU64,
    pub t_first_vcpu_run_us: AtomicU64,
    pub t_first_serial_us: AtomicU64,
    pub t_guest_boot_timer_us: AtomicU64,
    pub t_api_ready_us: AtomicU64,
    pub t_instance_start_us: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    serial_out_bytes: AtomicU64::new(0),
    serial_dropped_bytes: AtomicU64::new(0),
    serial_in_bytes: AtomicU64::new(0),
    pio_unmapped_reads: AtomicU64::new(0),
    pio_unmapped_writes: AtomicU64::new(0),
    mmio_unmapped_reads: AtomicU64::new(0),
    mmio_unmapped_writes: AtomicU64::new(0),
    vcpu_exits_io: AtomicU64::new(0),
    vcpu_exits_mmio: AtomicU64::new(0),
    vcpu_exits_other: AtomicU64::new(0),
    t_config_ready_us: AtomicU64::new(0),
    t_vm_built_us: AtomicU64::new(0),
    t_first_vcpu_run_us: AtomicU64::new(0),
    t_first_serial_us: AtomicU64::new(0),
    t_guest_boot_timer_us: AtomicU64::new(0),
    t_api_ready_us: AtomicU64::new(0),
    t_instance_start_us: AtomicU64::new(0),
};

static START: OnceLock<Instant> = OnceLock::new();

/// Marks process start (the first thing main does).
pub fn start() {
    let _ = START.get_or_init(Instant::now);
}

/// Microseconds since process start (at least 1, so that 0 can mean "never").
pub fn now_us() -> u64 {
    START
        .get()
        .map(|s| s.elapsed().as_micros() as u64)
        .unwrap_or(0)
        .max(1)
}

pub fn timeline_mark(slot: &AtomicU64) {
    slot.store(now_us(), Ordering::Relaxed);
}

/// Records the time in `slot` only the first time (a cheap load afterwards).
pub fn timeline_mark_once(slot: &AtomicU64) {
    if slot.load(Ordering::Relaxed) == 0 {
        let _ = slot.compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// One line describing the boot timeline, for the log and the demo.
pub fn timeline_summary() -> String {
    let m = &METRICS;
    let fmt = |v: &AtomicU64| match v.load(Ordering::Relaxed) {
        0 => "-".to_string(),
        us => format!("{:.3}ms", us as f64 / 1000.0),
    };
    format!(
        "boot timeline (since process start): api ready {}, config ready {}, instance start {}, vm built {}, first vcpu run {}, first serial output {}, guest boot-timer {}",
        fmt(&m.t_api_ready_us),
        fmt(&m.t_config_ready_us),
        fmt(&m.t_instance_start_us),
        fmt(&m.t_vm_built_us),
        fmt(&m.t_first_vcpu_run_us),
        fmt(&m.t_first_serial_us),
        fmt(&m.t_guest_boot_timer_us),
    )
}

static OUTPUT: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Sets where metrics lines go (a file or named pipe, opened for append).
pub fn set_output(path: &str) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open metrics_path {path}: {e}"))
        })?;
    *OUTPUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    Ok(())
}

/// API request accounting, one slot per action kind.
pub struct ApiCounters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub latency_us_total: AtomicU64,
    pub latency_us_max: AtomicU64,
}

pub static API: ApiCounters = ApiCounters {
    requests: AtomicU64::new(0),
    errors: AtomicU64::new(0),
    latency_us_total: AtomicU64::new(0),
    latency_us_max: AtomicU64::new(0),
};

pub fn record_api_request(latency_us: u64, ok: bool) {
    API.requests.fetch_add(1, Ordering::Relaxed);
    if !ok {
        API.errors.fetch_add(1, Ordering::Relaxed);
    }
    API.latency_us_total
        .fetch_add(latency_us, Ordering::Relaxed);
    API.latency_us_max.fetch_max(latency_us, Ordering::Relaxed);
}

/// Extra per-device sections (virtio devices register a closure producing their JSON).
type Section = Box<dyn Fn() -> (String, serde_json::Value) + Send>;
static SECTIONS: std::sync::Mutex<Vec<Section>> = std::sync::Mutex::new(Vec::new());

pub fn register_section(f: Section) {
    SECTIONS.lock().unwrap_or_else(|p| p.into_inner()).push(f);
}

/// The current metrics as one JSON object.
pub fn snapshot() -> serde_json::Value {
    let m = &METRICS;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut v = serde_json::json!({
        "utc_timestamp_ms": wall_ms,
        "api_server": {
            "requests": g(&API.requests),
            "errors": g(&API.errors),
            "latency_us_total": g(&API.latency_us_total),
            "latency_us_max": g(&API.latency_us_max),
        },
        "vcpu": {
            "exits_io": g(&m.vcpu_exits_io),
            "exits_mmio": g(&m.vcpu_exits_mmio),
            "exits_other": g(&m.vcpu_exits_other),
            "pio_unmapped_reads": g(&m.pio_unmapped_reads),
            "pio_unmapped_writes": g(&m.pio_unmapped_writes),
            "mmio_unmapped_reads": g(&m.mmio_unmapped_reads),
            "mmio_unmapped_writes": g(&m.mmio_unmapped_writes),
        },
        "uart": {
            "out_bytes": g(&m.serial_out_bytes),
            "dropped_out_bytes": g(&m.serial_dropped_bytes),
            "in_bytes": g(&m.serial_in_bytes),
        },
        "boot_timeline_us": {
            "process_start": 0,
            "api_ready": g(&m.t_api_ready_us),
            "config_ready": g(&m.t_config_ready_us),
            "instance_start": g(&m.t_instance_start_us),
            "vm_built": g(&m.t_vm_built_us),
            "first_vcpu_run": g(&m.t_first_vcpu_run_us),
            "first_serial_output": g(&m.t_first_serial_us),
            "guest_boot_timer": g(&m.t_guest_boot_timer_us),
        },
    });
    if let Some(obj) = v.as_object_mut() {
        for s in SECTIONS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (k, val) = s();
            obj.insert(k, val);
        }
    }
    v
}

/// Writes one metrics line, if a metrics output is set.
pub fn flush() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = OUTPUT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = out.as_mut() {
        let mut line = snapshot().to_string();
        line.push('\n');
        f.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Whether a metrics output is configured (so the periodic flush can be skipped).
pub fn has_output() -> bool {
    OUTPUT.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

static LAST_FLUSH: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// Flushes when a metrics output is set and the period (60 s, as Firecracker) has passed.
pub fn flush_if_due() {
    if !has_output() {
        return;
    }
    let mut last = LAST_FLUSH.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60));
    if due {
        *last = Some(Instant::now());
        if let Err(e) = flush() {
            log::warn!("cannot write metrics: {e}");
        }
    }
}
