//! Control plane: everything that happens before bytes flow and when a session must be replaced.
//!
//! Owns what a user names (targets and ports, [`target`]), cluster access through the API
//! server ([`cluster`]), the CRI client ([`cri`]), the HTTP upgrade to SPDY/3.1 or WebSocket
//! ([`upgrade`]), following the pod (or pods) a forward goes to as they come and go
//! ([`follow`]), the forwarder ([`forward`]): local listeners, which pod a new connection goes
//! to with `--spread` ([`spread`]) and the session pool ([`pool`]): which session it goes to,
//! and when to set one up; and the `ringfwd up` file ([`config`]): its schema, parsing and
//! validation. It never copies payload bytes: that is [`crate::relay`].

pub mod cluster;
pub mod config;
pub mod cri;
pub mod follow;
pub mod forward;
pub mod pool;
pub mod reconnect;
pub mod spread;
pub mod target;
pub mod upgrade;

/// Response header by which `ringfwd serve` says it passes a half-close on to the target
/// (kubelet and containerd do not, see [`crate::relay::SessionOptions::forward_half_close`]).
pub const HALF_CLOSE_HEADER: &str = "x-ringfwd-half-close";

/// Errors of the control plane: each is one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Cri(#[from] cri::CriError),
    /// `url` fields hold URLs already redacted ([`crate::secret::redact_url`]).
    #[error("invalid URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to stream server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP error talking to stream server {url}: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("stream server refused the upgrade to {protocol}: HTTP {status}: {body}")]
    Rejected {
        protocol: &'static str,
        status: u16,
        body: String,
    },
    #[error(
        "stream server {url} refused authentication (HTTP 401: {body}): give its token with \
         --token-file PATH or in the URL (/portforward/TOKEN)"
    )]
    Unauthorized { url: String, body: String },
    #[error("stream server answered the upgrade without {what}")]
    BadUpgrade { what: String },
    #[error("invalid port spec {spec:?}: {reason}")]
    BadPortSpec { spec: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A failed API call, already one line (kubectl's `Error from server (Reason): message`).
    #[error("{0}")]
    Api(String),
    /// A target that cannot be forwarded to: unknown type, no pod, not running, no such port.
    #[error("{0}")]
    Target(String),
    #[error(
        "API server refused to port-forward to pod {pod} ({protocol}): {message} (HTTP {status})"
    )]
    ApiRejected {
        pod: String,
        protocol: &'static str,
        status: u16,
        message: String,
    },
    #[error(
        "no upstream session within {0:?} (--connect-timeout): the runtime or API server did not answer"
    )]
    SetupTimeout(std::time::Duration),
    #[error(
        "all {sessions} upstream sessions are at their stream limit (--max-sessions {sessions}): \
         raise --max-sessions, or lower --max-connections"
    )]
    StreamLimit { sessions: usize },
    #[error("shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Relay(#[from] crate::relay::RelayError),
    #[error("{0}")]
    Proto(#[from] crate::proto::ProtoError),
}
