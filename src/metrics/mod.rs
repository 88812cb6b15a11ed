//! Observability: what the relay counts, and everything ringfwd exports about it.
//!
//! Owns the metric definitions ([`names`], the only place a metric is named), the per-connection
//! statistics a data plane bumps ([`StreamStats`]), the per-forward and per-session handles
//! those are folded into ([`ForwardMetrics`], [`SessionMetrics`]), the Prometheus recorder and
//! the `--metrics-addr` endpoint ([`http`]).
//!
//! How the hot path stays cheap: the relay never touches the `metrics` facade. Per chunk it
//! adds to two plain atomics of its own connection's [`StreamStats`]. Those are folded into the
//! exported counters (whose labelled handles each forward registered once) when a scrape
//! renders, once a second while the sampler runs (endpoint or live view on), and when the
//! stream ends; histograms are observed once per stream or session event (first byte, end,
//! setup, PING answer, stall). An io_uring data plane bumps the same struct.
//!
//! Without `--metrics-addr` no recorder is installed and the facade handles are no-ops; the
//! in-process histogram copies ([`histogram`]) still fill, for `ringfwd bench`.

pub mod forward;
pub mod histogram;
pub mod http;
pub mod names;
pub mod stream;

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub use forward::{
    ForwardMetrics, ForwardSnapshot, PodMetrics, SessionMetrics, StreamSnapshot, fold_all,
    open_streams, render_pods, sample_all,
};
pub use stream::{Stream, StreamStats};

/// The data plane whose numbers these are (the `data_plane` label).
pub fn data_plane() -> &'static str {
    crate::relay::data_plane().name()
}

/// How a connection ended, as counted (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished with end of file.
    Clean = 0,
    /// The server reported an error for the connection (a refused port, a target that closed).
    ServerError = 1,
    /// The peer reset the connection.
    ResetByPeer = 2,
    /// The upstream session died under it, or none could be had.
    SessionLost = 3,
    /// The local socket failed.
    LocalError = 4,
    /// Still open when a graceful shutdown ran out of time, reset.
    Shutdown = 5,
    /// Reset at once: the forward had `--max-connections` open.
    OverLimit = 6,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        names::OUTCOMES[self as usize]
    }
}

/// A change of the pod a forward goes to, as counted (the `reason` label of
/// `ringfwd_target_changes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetChange {
    /// The pod (or sandbox) was deleted.
    Gone = 0,
    /// It still exists but stopped running, is terminating, or its sandbox is not ready.
    NotReady = 1,
    /// The forward goes to a new pod (or sandbox) now.
    Replaced = 2,
}

impl TargetChange {
    pub fn label(self) -> &'static str {
        names::TARGET_REASONS[self as usize]
    }
}

/// Errors of the observability layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("invalid histogram buckets: {0}")]
    Buckets(#[from] BuildError),
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
    #[error("cannot listen for metrics on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Install the Prometheus recorder as the process's global recorder, with every histogram's
/// explicit buckets and every description; set the info gauges. Create forwards afterwards.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let mut builder = PrometheusBuilder::new();
    for d in names::ALL {
        if let names::Kind::Histogram(buckets) = d.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(d.name.to_string()), buckets)?;
        }
    }
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    names::describe();
    metrics::gauge!(names::BUILD_INFO, names::L_VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(names::DATA_PLANE_INFO, names::L_DATA_PLANE => data_plane()).set(1.0);
    Ok(handle)
}

/// Sample every forward every `every` on the current runtime (fold into the exported
/// counters, update current rates), handing each sample to `on_sample` (the live view).
pub fn spawn_sampler(
    every: Duration,
    mut on_sample: impl FnMut(&[ForwardSnapshot]) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            on_sample(&sample_all());
        }
    });
}
