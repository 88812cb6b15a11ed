//! Every exported metric: its name, kind, one-line description, labels and (for histograms) its
//! explicit buckets. No metric name is spelled anywhere else; the README's metric table, the
//! dashboard and the alert rules are checked against what the binary exports.
//!
//! Naming follows Prometheus practice: `ringfwd_` prefix, base units in the name (`_seconds`,
//! `_bytes`), counters end in `_total`, constant metadata gauges end in `_info`.
//!
//! Labels are bounded: `forward` (one per forward a process runs: its name or target),
//! `direction` (`up`: from the local client towards the pod; `down`: towards the local client),
//! `protocol` (`spdy`, `websocket`, `tunnel`), `data_plane` (`epoll`, `copy`, `uring`), `outcome` and `error`
//! and `reason` (the fixed sets [`OUTCOMES`], [`SESSION_ERRORS`] and [`TARGET_REASONS`]), and
//! `pod` on the per-pod families of a `--spread` forward ([`POD_FAMILIES`]): one value per pod the
//! forward sends connections to, bounded by the target's pods, and dropped with the pod. Never a
//! per-connection label.
//!
//! The per-pod families are rendered from the forward's own per-pod state at scrape time
//! ([`super::forward`]), not through the `metrics` recorder: the recorder has no way to forget
//! a series, and the series of a pod that is gone must go with it.

/// Label keys.
pub const L_FORWARD: &str = "forward";
pub const L_DIRECTION: &str = "direction";
pub const L_PROTOCOL: &str = "protocol";
pub const L_DATA_PLANE: &str = "data_plane";
pub const L_OUTCOME: &str = "outcome";
pub const L_ERROR: &str = "error";
pub const L_VERSION: &str = "version";
pub const L_REASON: &str = "reason";
pub const L_POD: &str = "pod";

/// Values of `outcome` on [`CONNECTIONS_CLOSED`], in [`super::Outcome`] order.
pub const OUTCOMES: [&str; 7] = [
    "clean",
    "server_error",
    "reset_by_peer",
    "session_lost",
    "local_error",
    "shutdown",
    "over_limit",
];

/// Values of `error` on [`SESSIONS_FAILED`]: `setup` (the upgrade failed), `io` (the socket
/// failed), `protocol` (the peer broke the protocol), `unresponsive` (no PING answer in time),
/// `eof` (the peer closed the connection without a goodbye).
pub const SESSION_ERRORS: [&str; 5] = ["setup", "io", "protocol", "unresponsive", "eof"];

/// Values of `reason` on [`TARGET_CHANGES`], in [`super::TargetChange`] order: the forward lost
/// its pod because it is `gone` (deleted, sandbox removed) or `not_ready` (stopped running,
/// terminating, sandbox not ready); `replaced`: it forwards to a new pod now.
pub const TARGET_REASONS: [&str; 3] = ["gone", "not_ready", "replaced"];

// Counters.
pub const BYTES: &str = "ringfwd_bytes_total";
pub const CONNECTIONS_ACCEPTED: &str = "ringfwd_connections_accepted_total";
pub const CONNECTIONS_CLOSED: &str = "ringfwd_connections_closed_total";
pub const SESSIONS_OPENED: &str = "ringfwd_sessions_opened_total";
pub const SESSIONS_FAILED: &str = "ringfwd_sessions_failed_total";
pub const RECONNECTS: &str = "ringfwd_reconnects_total";
pub const TARGET_CHANGES: &str = "ringfwd_target_changes_total";
pub const POD_CONNECTIONS: &str = "ringfwd_pod_connections_total";
pub const POD_CONNECTIONS_CLOSED: &str = "ringfwd_pod_connections_closed_total";
pub const POD_BYTES: &str = "ringfwd_pod_bytes_total";
// Gauges.
pub const CONNECTIONS_ACTIVE: &str = "ringfwd_connections_active";
pub const SESSIONS_ACTIVE: &str = "ringfwd_sessions_active";
pub const SESSIONS_STALLED: &str = "ringfwd_sessions_stalled";
pub const POD_CONNECTIONS_ACTIVE: &str = "ringfwd_pod_connections_active";
pub const DATA_PLANE_INFO: &str = "ringfwd_data_plane_info";
pub const BUILD_INFO: &str = "ringfwd_build_info";
// Histograms.
pub const SESSION_SETUP: &str = "ringfwd_session_setup_seconds";
pub const FIRST_BYTE: &str = "ringfwd_connection_first_byte_seconds";
pub const STREAM_BYTES: &str = "ringfwd_stream_bytes";
pub const STREAM_DURATION: &str = "ringfwd_stream_duration_seconds";
pub const STREAM_THROUGHPUT: &str = "ringfwd_stream_throughput_bytes_per_second";
pub const PING_RTT: &str = "ringfwd_session_ping_rtt_seconds";
pub const RELAY_STALL: &str = "ringfwd_relay_stall_seconds";

/// Latency buckets (seconds), 1-2-5 steps from 100 µs to 30 s: loopback first bytes land in
/// the sub-millisecond buckets, a cluster's in the tens of milliseconds, a stuck upgrade at
/// the top.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
    10.0, 30.0,
];
/// `N` powers of 4 from `first`.
const fn powers_of_four<const N: usize>(first: f64) -> [f64; N] {
    let mut out = [0.0; N];
    let mut i = 0;
    while i < N {
        out[i] = if i == 0 { first } else { out[i - 1] * 4.0 };
        i += 1;
    }
    out
}

/// Per-stream byte counts, powers of 4 from 256 B to 64 GiB (a handshake to a database dump).
pub const SIZE_BUCKETS: &[f64] = &powers_of_four::<15>(256.0);
/// Stream lifetimes (seconds), 1 ms to 1 day.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];
/// Mean stream throughput (bytes/s), powers of 4 from 1 KiB/s to 4 GiB/s (32 Gbit/s).
pub const RATE_BUCKETS: &[f64] = &powers_of_four::<12>(1024.0);

/// What kind of metric a [`Def`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

/// One exported metric family.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const FWD_DP: &[&str] = &[L_FORWARD, L_DATA_PLANE];
const FWD_PROTO: &[&str] = &[L_FORWARD, L_PROTOCOL];

/// Every metric ringfwd exports.
pub const ALL: &[Def] = &[
    Def {
        name: BYTES,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_DIRECTION, L_DATA_PLANE],
        help: "Payload bytes relayed (up: local client to pod; down: pod to local client).",
    },
    Def {
        name: CONNECTIONS_ACCEPTED,
        kind: Kind::Counter,
        labels: FWD_DP,
        help: "Local connections accepted.",
    },
    Def {
        name: CONNECTIONS_CLOSED,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_DATA_PLANE, L_OUTCOME],
        help: "Connections ended, by outcome (clean, server_error, reset_by_peer, session_lost, local_error, shutdown, over_limit).",
    },
    Def {
        name: SESSIONS_OPENED,
        kind: Kind::Counter,
        labels: FWD_PROTO,
        help: "Upstream sessions opened.",
    },
    Def {
        name: SESSIONS_FAILED,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_PROTOCOL, L_ERROR],
        help: "Upstream sessions that could not be set up or died, by error kind.",
    },
    Def {
        name: RECONNECTS,
        kind: Kind::Counter,
        labels: FWD_PROTO,
        help: "Sessions opened to replace one that died.",
    },
    Def {
        name: TARGET_CHANGES,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_REASON],
        help: "Changes of the pod a forward goes to: lost (gone, not_ready) or replaced by a new one.",
    },
    Def {
        name: POD_CONNECTIONS,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_POD],
        help: "Local connections a --spread forward sent to each pod.",
    },
    Def {
        name: POD_CONNECTIONS_CLOSED,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_POD, L_OUTCOME],
        help: "Connections to each pod of a --spread forward that ended, by outcome.",
    },
    Def {
        name: POD_BYTES,
        kind: Kind::Counter,
        labels: &[L_FORWARD, L_POD, L_DIRECTION],
        help: "Payload bytes relayed to and from each pod of a --spread forward (up: towards the pod).",
    },
    Def {
        name: POD_CONNECTIONS_ACTIVE,
        kind: Kind::Gauge,
        labels: &[L_FORWARD, L_POD],
        help: "Connections open to each pod of a --spread forward now.",
    },
    Def {
        name: CONNECTIONS_ACTIVE,
        kind: Kind::Gauge,
        labels: FWD_DP,
        help: "Connections being relayed now.",
    },
    Def {
        name: SESSIONS_ACTIVE,
        kind: Kind::Gauge,
        labels: FWD_PROTO,
        help: "Upstream sessions alive now.",
    },
    Def {
        name: SESSIONS_STALLED,
        kind: Kind::Gauge,
        labels: FWD_PROTO,
        help: "Sessions whose reader is waiting for a slow local client now.",
    },
    Def {
        name: DATA_PLANE_INFO,
        kind: Kind::Gauge,
        labels: &[L_DATA_PLANE],
        help: "Data plane in use (value 1).",
    },
    Def {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        labels: &[L_VERSION],
        help: "ringfwd version (value 1).",
    },
    Def {
        name: SESSION_SETUP,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: FWD_PROTO,
        help: "Time to set up an upstream session (connect, upgrade, runtime URL).",
    },
    Def {
        name: FIRST_BYTE,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: FWD_DP,
        help: "Time from accepting a connection to its first byte towards the local socket.",
    },
    Def {
        name: STREAM_BYTES,
        kind: Kind::Histogram(SIZE_BUCKETS),
        labels: &[L_FORWARD, L_DIRECTION],
        help: "Bytes one connection carried in one direction.",
    },
    Def {
        name: STREAM_DURATION,
        kind: Kind::Histogram(DURATION_BUCKETS),
        labels: &[L_FORWARD],
        help: "Lifetime of one connection, accept to close.",
    },
    Def {
        name: STREAM_THROUGHPUT,
        kind: Kind::Histogram(RATE_BUCKETS),
        labels: &[L_FORWARD, L_DIRECTION],
        help: "Mean throughput of one connection over its lifetime, per direction that carried data.",
    },
    Def {
        name: PING_RTT,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: FWD_PROTO,
        help: "Round trip of a keepalive PING on an upstream session.",
    },
    Def {
        name: RELAY_STALL,
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: FWD_PROTO,
        help: "Time the session reader waited for a slow local client to take a chunk.",
    },
];

/// The per-pod families, rendered at scrape time rather than recorded (see the module docs).
pub const POD_FAMILIES: &[&str] = &[
    POD_CONNECTIONS,
    POD_CONNECTIONS_CLOSED,
    POD_BYTES,
    POD_CONNECTIONS_ACTIVE,
];

/// The definition of `name`.
pub fn def(name: &str) -> Option<&'static Def> {
    ALL.iter().find(|d| d.name == name)
}

/// Register every description with the installed recorder (the per-pod families describe
/// themselves when rendered).
pub fn describe() {
    for d in ALL.iter().filter(|d| !POD_FAMILIES.contains(&d.name)) {
        match d.kind {
            Kind::Counter => metrics::describe_counter!(d.name, d.help),
            Kind::Gauge => metrics::describe_gauge!(d.name, d.help),
            Kind::Histogram(_) => metrics::describe_histogram!(d.name, d.help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ranges() {
        assert_eq!(SIZE_BUCKETS[0], 256.0);
        assert_eq!(SIZE_BUCKETS.last(), Some(&(64.0 * (1u64 << 30) as f64)));
        assert_eq!(RATE_BUCKETS.last(), Some(&(4.0 * (1u64 << 30) as f64)));
    }

    #[test]
    fn names_follow_prometheus_practice() {
        let mut seen = std::collections::HashSet::new();
        for d in ALL {
            assert!(seen.insert(d.name), "{} defined twice", d.name);
            assert!(d.name.starts_with("ringfwd_"), "{}", d.name);
            assert!(
                d.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                d.name
            );
            assert!(!d.help.is_empty() && !d.help.contains('\n'), "{}", d.name);
            match d.kind {
                Kind::Counter => assert!(d.name.ends_with("_total"), "{}", d.name),
                Kind::Gauge => assert!(!d.name.ends_with("_total"), "{}", d.name),
                Kind::Histogram(b) => {
                    assert!(!d.name.ends_with("_total"), "{}", d.name);
                    assert!(b.len() >= 10, "{} has {} buckets", d.name, b.len());
                    assert!(b.windows(2).all(|w| w[0] < w[1]), "{} buckets", d.name);
                }
            }
            for u in ["_milliseconds", "_ms", "_kb", "_mb"] {
                assert!(!d.name.contains(u), "{}: use base units", d.name);
            }
            assert!(
                !d.labels.contains(&"peer") && !d.labels.contains(&"port"),
                "{}: no per-connection labels",
                d.name
            );
        }
    }
}
