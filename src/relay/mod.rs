//! Data plane: moves bytes between local TCP connections and one multiplexed upstream session.
//!
//! This module owns the sockets and the tasks that drive a sans-IO [`PortForwardProtocol`]
//! (from [`crate::proto`]): [`session`] runs the upstream connection (one reader, one writer,
//! one keepalive timer) and [`conn`] relays one forwarded connection in both directions with
//! half-close, reset and error semantics. It does not know how a session was set up (that is
//! [`crate::control`]) nor what is exported as metrics: each connection bumps the plain atomics
//! of its [`crate::metrics::StreamStats`], each session reports to its
//! [`crate::metrics::SessionMetrics`].
//!
//! Backend: this is the epoll backend (tokio). Everything that touches a socket is here, so an
//! io_uring backend can replace these files without touching protocol or control code.
//!
//! [`PortForwardProtocol`]: crate::proto::PortForwardProtocol

pub mod conn;
pub mod session;
pub mod tunnel;

use std::time::Duration;

pub use conn::{ConnOutcome, relay_opened_conn, relay_server_conn};
pub use session::{Inbound, Incoming, Session, SessionOptions};
pub use tunnel::TunnelIo;

/// This data plane, as the `data_plane` metric label names it.
pub const DATA_PLANE: &str = "tokio";

/// An upstream byte stream: a plain TCP socket from a stream server, or an upgraded (TLS, maybe
/// tunnelled) connection through the API server.
pub trait UpstreamIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// Size of the buffer one local connection reads into. Large, because bulk transfers (dumps)
/// are what users push through a forward, and each read becomes one upstream frame.
pub const READ_BUF: usize = 256 * 1024;

/// Upstream bytes buffered for one local connection before the session reader waits for that
/// connection's client to catch up. The peer does no flow control (moby/spdystream never sends
/// WINDOW_UPDATE), so a slow client can only be throttled by no longer reading the session.
pub const CONN_QUEUE_FRAMES: usize = 64;

/// Bytes of local data one session lets sit in its write queue before readers wait.
pub const SESSION_WRITE_BUDGET: usize = 8 * 1024 * 1024;

/// Default interval between keepalive PINGs on an idle session.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Default time without any byte from upstream after which a session is declared dead.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for [`SessionOptions::half_close_hold`]: the longest a half-close is held back while
/// the server keeps sending (kubelet/containerd close the connection one second after it).
pub const DEFAULT_HALF_CLOSE_HOLD: Duration = Duration::from_secs(30);

/// Default for [`SessionOptions::half_close_quiet`]: a held half-close goes out once the
/// server has sent nothing for this long (kubectl ends such a connection after one second).
pub const DEFAULT_HALF_CLOSE_QUIET: Duration = Duration::from_secs(1);

/// How long a session we closed keeps reading (and discarding) for the peer's own close, so
/// that our last bytes reach it instead of being cut off by a TCP reset.
pub const LINGER: Duration = Duration::from_secs(5);

/// TCP keepalive on every socket a forward holds (local clients, targets, stream servers):
/// probes after this long idle, so a NAT or load balancer on the way keeps the connection, and
/// a peer that vanished without a FIN or RST (a laptop that slept, a rebooted node) is noticed
/// (after [`KEEPALIVE_INTERVAL`] x [`KEEPALIVE_PROBES`] more) instead of holding its
/// connection forever.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_PROBES: u32 = 6;

/// Disable Nagle and switch TCP keepalive on (see [`KEEPALIVE_IDLE`]). Best effort: a socket
/// that refuses either still works.
pub fn tune_socket(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// Errors of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("upstream protocol error: {0}")]
    Proto(#[from] crate::proto::ProtoError),
    #[error("upstream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream closed the session")]
    UpstreamClosed,
    #[error("upstream stopped answering (no data or PING reply for {0:?})")]
    Unresponsive(Duration),
    #[error("upstream ended the session: {0}")]
    GoAway(String),
    #[error("session is closed")]
    SessionClosed,
}

impl RelayError {
    /// What kind of failure ended a session (the `error` label of
    /// `ringfwd_sessions_failed_total`); `None` for an orderly end.
    pub fn failure_kind(&self) -> Option<&'static str> {
        match self {
            RelayError::Proto(_) => Some("protocol"),
            RelayError::Io(_) => Some("io"),
            RelayError::UpstreamClosed => Some("eof"),
            RelayError::Unresponsive(_) => Some("unresponsive"),
            RelayError::GoAway(_) | RelayError::SessionClosed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_keepalive_and_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let s = socket2::SockRef::from(&c);
        assert!(!s.keepalive().unwrap());
        tune_socket(&c);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(s.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(s.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert!(c.nodelay().unwrap());
    }
}
