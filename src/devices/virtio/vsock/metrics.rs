//! The `vsock` metrics section (Firecracker's name and counter names where they exist).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct VsockMetrics {
    /// Connections opened (either side), closed, and reset by ember.
    pub conns_added: AtomicU64,
    pub conns_removed: AtomicU64,
    pub conns_killed: AtomicU64,
    /// Host connections closed before reaching the guest: a bad or oversized CONNECT
    /// line, or the connection limit.
    pub conns_refused: AtomicU64,
    /// Packets and payload bytes to the guest (rx) and from it (tx).
    pub rx_packets_count: AtomicU64,
    pub rx_bytes_count: AtomicU64,
    pub tx_packets_count: AtomicU64,
    pub tx_bytes_count: AtomicU64,
    /// TX chains dropped as malformed.
    pub tx_malformed: AtomicU64,
    /// Event-queue buffers that could not take the transport-reset event.
    pub ev_queue_event_fails: AtomicU64,
}

/// One vsock device per VM, so one set of counters per process.
pub static METRICS: VsockMetrics = VsockMetrics {
    conns_added: AtomicU64::new(0),
    conns_removed: AtomicU64::new(0),
    conns_killed: AtomicU64::new(0),
    conns_refused: AtomicU64::new(0),
    rx_packets_count: AtomicU64::new(0),
    rx_bytes_count: AtomicU64::new(0),
    tx_packets_count: AtomicU64::new(0),
    tx_bytes_count: AtomicU64::new(0),
    tx_malformed: AtomicU64::new(0),
    ev_queue_event_fails: AtomicU64::new(0),
};

pub fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

impl VsockMetrics {
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "conns_added": g(&self.conns_added),
            "conns_removed": g(&self.conns_removed),
            "conns_killed": g(&self.conns_killed),
            "conns_refused": g(&self.conns_refused),
            "rx_packets_count": g(&self.rx_packets_count),
            "rx_bytes_count": g(&self.rx_bytes_count),
            "tx_packets_count": g(&self.tx_packets_count),
            "tx_bytes_count": g(&self.tx_bytes_count),
            "tx_malformed": g(&self.tx_malformed),
            "ev_queue_event_fails": g(&self.ev_queue_event_fails),
        })
    }

    /// Adds the counters to the metrics output (once per process).
    pub fn register() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            crate::metrics::register_section(Box::new(|| ("vsock".to_string(), METRICS.json())));
        });
    }
}
