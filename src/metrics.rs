//! Metrics: static atomic counters, flushed as one JSON object per line (Firecracker's
//! format), and the boot timeline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

use serde::Serialize;

/// Every counter, declared once: the struct's shape is the JSON's shape (serde writes an
/// atomic as its current value). Timeline values are microseconds since `start()`; 0
/// means "not reached".
#[derive(Default, Serialize)]
pub struct Metrics {
    pub api_server: ApiMetrics,
    pub vcpu: VcpuMetrics,
    pub uart: UartMetrics,
    pub virtio: VirtioMetrics,
    pub boot_timeline_us: Timeline,
}

/// API request accounting, and Firecracker's start-up times.
#[derive(Default, Serialize)]
pub struct ApiMetrics {
    /// Firecracker's: monotonic µs from `--start-time-us` (the launch, as a jailer
    /// records it) to the API being ready; 0 without `--start-time-us`.
    pub process_startup_time_us: AtomicU64,
    /// Firecracker's: CPU µs spent from `--start-time-cpu-us` to the API being ready,
    /// plus `--parent-cpu-time-us`; 0 without `--start-time-cpu-us`.
    pub process_startup_time_cpu_us: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub latency_us_total: AtomicU64,
    pub latency_us_max: AtomicU64,
}

/// vCPU exits, and guest accesses no device answered.
#[derive(Default, Serialize)]
pub struct VcpuMetrics {
    pub exits_io: AtomicU64,
    pub exits_mmio: AtomicU64,
    pub exits_other: AtomicU64,
    pub pio_unmapped_reads: AtomicU64,
    pub pio_unmapped_writes: AtomicU64,
    pub mmio_unmapped_reads: AtomicU64,
    pub mmio_unmapped_writes: AtomicU64,
}

/// The serial console.
#[derive(Default, Serialize)]
pub struct UartMetrics {
    pub out_bytes: AtomicU64,
    /// Bytes the guest wrote that nobody read in time (see devices/serial.rs).
    pub dropped_out_bytes: AtomicU64,
    pub in_bytes: AtomicU64,
}

/// What virtio drivers did wrong, across all devices: each counter is a guest-triggered
/// condition that is logged at debug level only (a guest could flood a louder log).
#[derive(Default, Serialize)]
pub struct VirtioMetrics {
    /// Register accesses of the wrong size or alignment, or at no register.
    pub bad_register_accesses: AtomicU64,
    /// Config-space accesses of a bad size, or beyond the device's config space.
    pub config_out_of_range: AtomicU64,
    /// Writes to read-only config fields.
    pub config_writes_ignored: AtomicU64,
    /// Queue registers written out of turn, queue sizes that are no power of two or too
    /// large, rings outside guest RAM or misaligned.
    pub bad_queue_configs: AtomicU64,
    /// Status writes out of order, refused features.
    pub bad_status_writes: AtomicU64,
    /// Times a device set DEVICE_NEEDS_RESET (failed activation, broken ring).
    pub needs_reset: AtomicU64,
    /// Avail indexes further ahead than the ring holds.
    pub avail_index_jumps: AtomicU64,
    /// Queue notifications received (a storm shows here), and those naming no queue.
    pub queue_notifies: AtomicU64,
    pub bad_notifies: AtomicU64,
    /// Resets of a running device (a request may have been in flight).
    pub active_resets: AtomicU64,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The boot timeline, in microseconds since process start.
#[derive(Default, Serialize)]
pub struct Timeline {
    /// Always 0: the origin, written so readers see the whole timeline.
    #[serde(serialize_with = "zero")]
    pub process_start: (),
    /// From the launch (`--start-time-us`, CLOCK_MONOTONIC µs) to `process_start`: the
    /// exec, dynamic loading and runtime set-up before `main`. 0 without the flag.
    pub launch_to_main: AtomicU64,
    pub api_ready: AtomicU64,
    pub config_ready: AtomicU64,
    pub instance_start: AtomicU64,
    /// The build's phases, in order: KVM_CREATE_VM done, guest RAM mapped and registered,
    /// kernel loaded, devices created, boot data (command line, boot params, MP table)
    /// written; `vm_built` follows the vCPUs' set-up (CPUID, MSRs, LAPIC, registers).
    pub vm_created: AtomicU64,
    pub memory_ready: AtomicU64,
    pub kernel_loaded: AtomicU64,
    pub devices_ready: AtomicU64,
    pub boot_data_ready: AtomicU64,
    pub vm_built: AtomicU64,
    pub first_vcpu_run: AtomicU64,
    pub first_serial_output: AtomicU64,
    pub guest_boot_timer: AtomicU64,
    /// The VMM thread saw why the VM stops (reset, shutdown, signal, error).
    pub vm_stopped: AtomicU64,
    /// vCPU threads joined and devices shut down; what remains is the process exit,
    /// where the kernel tears the VM down.
    pub shutdown_done: AtomicU64,
}

fn zero<S: serde::Serializer>(_: &(), s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(0)
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

static START: OnceLock<Instant> = OnceLock::new();

/// CLOCK_MONOTONIC µs at `start()`, to place `process_start` against `--start-time-us`.
static START_MONOTONIC_US: AtomicU64 = AtomicU64::new(0);

/// Marks process start (the first thing main does).
pub fn start() {
    let _ = START.get_or_init(Instant::now);
    START_MONOTONIC_US.store(clock_us(libc::CLOCK_MONOTONIC), Ordering::Relaxed);
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
    let t = &METRICS.boot_timeline_us;
    let fmt = |v: &AtomicU64| match v.load(Ordering::Relaxed) {
        0 => "-".to_string(),
        us => format!("{:.3}ms", us as f64 / 1000.0),
    };
    format!(
        "boot timeline (since process start): api ready {}, config ready {}, instance start {}, vm built {}, first vcpu run {}, first serial output {}, guest boot-timer {}",
        fmt(&t.api_ready),
        fmt(&t.config_ready),
        fmt(&t.instance_start),
        fmt(&t.vm_built),
        fmt(&t.first_vcpu_run),
        fmt(&t.first_serial_output),
        fmt(&t.guest_boot_timer),
    )
}

/// Firecracker's start-time inputs (`--start-time-us`, `--start-time-cpu-us`,
/// `--parent-cpu-time-us`), as a jailer passes them.
#[derive(Debug, Default, Clone, Copy)]
pub struct StartTimes {
    /// CLOCK_MONOTONIC µs when the launch began.
    pub start_time_us: Option<u64>,
    /// The launching process's CPU time (µs) at that point.
    pub start_time_cpu_us: Option<u64>,
    /// CPU time (µs) the launcher spent before handing over.
    pub parent_cpu_time_us: Option<u64>,
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000)
}

/// CLOCK_MONOTONIC now, in µs (the clock of `--start-time-us`).
pub fn monotonic_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// Records Firecracker's `process_startup_time_us` and `process_startup_time_cpu_us`:
/// called once the API is ready (or, without the API, once the VM is configured).
pub fn report_start_times(t: &StartTimes) {
    if let Some(start) = t.start_time_us {
        let main = START_MONOTONIC_US.load(Ordering::Relaxed);
        METRICS
            .boot_timeline_us
            .launch_to_main
            .store(main.saturating_sub(start), Ordering::Relaxed);
        let delta = clock_us(libc::CLOCK_MONOTONIC).saturating_sub(start);
        METRICS
            .api_server
            .process_startup_time_us
            .store(delta, Ordering::Relaxed);
    }
    if let Some(start_cpu) = t.start_time_cpu_us {
        let delta = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
            .saturating_sub(start_cpu)
            .saturating_add(t.parent_cpu_time_us.unwrap_or(0));
        METRICS
            .api_server
            .process_startup_time_cpu_us
            .store(delta, Ordering::Relaxed);
    }
}

/// Opens a log or metrics output as Firecracker does: a file (created if missing,
/// appended to) or a named pipe. Never blocks: a FIFO is opened read-write and
/// non-blocking, so its reader may come later (engines open it after starting ember) and
/// a reader that falls behind costs dropped lines, never a stalled VMM or guest.
pub fn open_output(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// What the metrics line carries besides the counters (Firecracker's `emit_id` and
/// `properties`).
#[derive(Default)]
struct Extras {
    id: Option<String>,
    properties: Option<serde_json::Map<String, serde_json::Value>>,
}

static EXTRAS: std::sync::Mutex<Extras> = std::sync::Mutex::new(Extras {
    id: None,
    properties: None,
});

/// Adds the instance id (`emit_id`) and fixed properties to every metrics line.
pub fn set_extras(
    id: Option<String>,
    properties: Option<serde_json::Map<String, serde_json::Value>>,
) {
    let mut e = EXTRAS.lock().unwrap_or_else(|p| p.into_inner());
    e.id = id;
    e.properties = properties;
}

static OUTPUT: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Sets where metrics lines go (a file or named pipe: see `open_output`).
pub fn set_output(path: &str) -> std::io::Result<()> {
    let f = open_output(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot open metrics_path {path}: {e}"))
    })?;
    *OUTPUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    Ok(())
}

pub fn record_api_request(latency_us: u64, ok: bool) {
    let api = &METRICS.api_server;
    api.requests.fetch_add(1, Ordering::Relaxed);
    if !ok {
        api.errors.fetch_add(1, Ordering::Relaxed);
    }
    api.latency_us_total
        .fetch_add(latency_us, Ordering::Relaxed);
    api.latency_us_max.fetch_max(latency_us, Ordering::Relaxed);
}

/// Extra per-device sections (virtio devices register a closure producing their JSON).
type Section = Box<dyn Fn() -> (String, serde_json::Value) + Send>;
static SECTIONS: std::sync::Mutex<Vec<Section>> = std::sync::Mutex::new(Vec::new());

pub fn register_section(f: Section) {
    SECTIONS.lock().unwrap_or_else(|p| p.into_inner()).push(f);
}

/// The current metrics as one JSON object.
pub fn snapshot() -> serde_json::Value {
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut v = serde_json::to_value(&*METRICS).unwrap_or_else(|e| {
        log::error!("cannot serialise the metrics: {e}");
        serde_json::json!({})
    });
    if let Some(obj) = v.as_object_mut() {
        obj.insert("utc_timestamp_ms".into(), wall_ms.into());
        let extras = EXTRAS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = &extras.id {
            obj.insert("id".into(), id.clone().into());
        }
        if let Some(props) = &extras.properties {
            obj.insert("properties".into(), props.clone().into());
        }
        drop(extras);
        for s in SECTIONS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (k, val) = s();
            obj.insert(k, val);
        }
    }
    v
}

/// Writes one metrics line, if a metrics output is set. A full pipe drops the line
/// (counted as an error by the caller's log), as a FIFO nobody reads must not stall ember.
pub fn flush() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = OUTPUT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = out.as_mut() {
        let mut line = snapshot().to_string();
        line.push('\n');
        // One write: a line up to PIPE_BUF reaches a FIFO whole or not at all.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON keys users and tests read (Firecracker-style sections).
    #[test]
    fn snapshot_has_the_documented_shape() {
        let v = snapshot();
        let keys = |section: &str| -> Vec<String> {
            let mut k: Vec<String> = v[section]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            k.sort();
            k
        };
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert_eq!(
            keys("api_server"),
            [
                "errors",
                "latency_us_max",
                "latency_us_total",
                "process_startup_time_cpu_us",
                "process_startup_time_us",
                "requests"
            ]
        );
        assert_eq!(
            keys("vcpu"),
            [
                "exits_io",
                "exits_mmio",
                "exits_other",
                "mmio_unmapped_reads",
                "mmio_unmapped_writes",
                "pio_unmapped_reads",
                "pio_unmapped_writes"
            ]
        );
        assert_eq!(keys("uart"), ["dropped_out_bytes", "in_bytes", "out_bytes"]);
        assert_eq!(
            keys("boot_timeline_us"),
            [
                "api_ready",
                "boot_data_ready",
                "config_ready",
                "devices_ready",
                "first_serial_output",
                "first_vcpu_run",
                "guest_boot_timer",
                "instance_start",
                "kernel_loaded",
                "launch_to_main",
                "memory_ready",
                "process_start",
                "shutdown_done",
                "vm_built",
                "vm_created",
                "vm_stopped"
            ]
        );
        assert_eq!(v["boot_timeline_us"]["process_start"], 0);
    }
}
