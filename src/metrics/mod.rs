//! Counters the data plane bumps, and (later) the one place that names every exported metric.
//!
//! The relay only touches these plain atomics; nothing here talks to a socket or the `metrics`
//! facade, so the hot path pays one relaxed add per event.

use std::sync::atomic::AtomicU64;

/// Process-wide relay counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub sessions_opened: AtomicU64,
    pub sessions_failed: AtomicU64,
    pub conns_opened: AtomicU64,
    /// Connections the server reported an error for.
    pub conns_failed: AtomicU64,
    /// Connections reset (by either side, or because their session died).
    pub conns_reset: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

pub static COUNTERS: Counters = Counters {
    sessions_opened: AtomicU64::new(0),
    sessions_failed: AtomicU64::new(0),
    conns_opened: AtomicU64::new(0),
    conns_failed: AtomicU64::new(0),
    conns_reset: AtomicU64::new(0),
    bytes_up: AtomicU64::new(0),
    bytes_down: AtomicU64::new(0),
};
