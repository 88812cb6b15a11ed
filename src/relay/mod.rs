//! Data plane: moves bytes between local TCP connections and one multiplexed upstream session.
//!
//! This module owns the sockets and the tasks that drive a sans-IO [`PortForwardProtocol`]
//! (from [`crate::proto`]): [`session`] runs the upstream connection (one reader, one writer,
//! one keepalive timer) and [`conn`] relays one forwarded connection in both directions with
//! half-close, reset and error semantics; [`drain`] counts the connections and cuts them at the
//! end of a graceful shutdown. It does not know how a session was set up (that is
//! [`crate::control`]) nor what is exported as metrics: each connection bumps the plain atomics
//! of its [`crate::metrics::StreamStats`], each session reports to its
//! [`crate::metrics::SessionMetrics`].
//!
//! Backend: this is the epoll backend (tokio). Everything that touches a socket is here, so an
//! io_uring backend can replace these files without touching protocol or control code.
//!
//! [`PortForwardProtocol`]: crate::proto::PortForwardProtocol

pub mod backend;
pub mod conn;
pub mod drain;
pub mod pipe;
pub mod queue;
pub mod session;
pub mod tunnel;
pub mod uring;

use std::time::Duration;

pub use conn::{ConnOutcome, relay_opened_conn, relay_server_conn};
pub use drain::Drain;
pub use session::{Inbound, Incoming, Session, SessionOptions};
pub use tunnel::TunnelIo;

/// How payload moves between local sockets and upstream sessions. One per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataPlane {
    /// `epoll` where splice(2) works, else `copy` (with one log line saying why). Never
    /// `uring`, which measured slower than `epoll` on every row (perf/2026-12-02-uring.md).
    Auto,
    /// The epoll reactor (tokio); bulk payload to and from plain TCP upstreams (stream servers,
    /// `ringfwd serve`) moves with splice(2) through pipes, never through user memory; small
    /// messages and a server's small DATA frames (containerd's) are copied, which measured
    /// cheaper. TLS and WebSocket upstreams are copied.
    Epoll,
    /// The epoll reactor, every payload copied through user memory (what `epoll` falls back to,
    /// and a baseline to measure it against).
    Copy,
    /// io_uring: a ring per worker thread moves the bytes of local sockets and plain TCP
    /// upstreams (receives and sends through user memory: the ring's splice costs a kernel
    /// thread hop per frame and measured slower, see perf/). TLS and WebSocket upstreams stay
    /// on the epoll reactor.
    Uring,
}

impl DataPlane {
    /// The `data_plane` metric label and log name.
    pub fn name(self) -> &'static str {
        match self {
            DataPlane::Auto => "auto",
            DataPlane::Epoll => "epoll",
            DataPlane::Copy => "copy",
            DataPlane::Uring => "uring",
        }
    }
}

static DATA_PLANE: std::sync::OnceLock<DataPlane> = std::sync::OnceLock::new();

/// Environment variable that picks the data plane where no `--data-plane` flag did (the test
/// suite runs once per data plane this way).
pub const DATA_PLANE_ENV: &str = "RINGFWD_DATA_PLANE";

/// Settle this process's data plane: `Auto` probes for io_uring, then for splice(2). Asking for `Epoll` where
/// splice is refused (an old kernel, a seccomp profile) is an error naming the way out. The
/// first call wins; later ones return what it chose.
pub fn select_data_plane(want: DataPlane) -> Result<DataPlane, RelayError> {
    let chosen = match want {
        // uring measured ahead of epoll on bulk and on request/response, through `serve` and
        // through containerd (README, Data plane); a refused io_uring (a container's default
        // seccomp profile, `kernel.io_uring_disabled`) is normal, so it falls back quietly.
        DataPlane::Auto if uring::available().is_ok() => DataPlane::Uring,
        DataPlane::Auto if splice_available() => DataPlane::Epoll,
        DataPlane::Auto => {
            tracing::warn!(
                "splice(2) is not available here (kernel or seccomp profile): payload is copied (data plane \"copy\")"
            );
            DataPlane::Copy
        }
        DataPlane::Epoll if !splice_available() => {
            return Err(RelayError::Unavailable(
                "data plane \"epoll\" needs splice(2), which this kernel or seccomp profile refuses; use --data-plane copy or auto".into(),
            ));
        }
        DataPlane::Uring => match uring::available() {
            Ok(()) => DataPlane::Uring,
            Err(why) => {
                return Err(RelayError::Unavailable(format!(
                    "data plane \"uring\" is not available here ({why}); use --data-plane epoll or auto"
                )));
            }
        },
        other => other,
    };
    Ok(*DATA_PLANE.get_or_init(|| chosen))
}

/// This process's data plane: as selected, else from [`DATA_PLANE_ENV`], else `Auto`.
pub fn data_plane() -> DataPlane {
    if let Some(d) = DATA_PLANE.get() {
        return *d;
    }
    let want = std::env::var(DATA_PLANE_ENV)
        .ok()
        .and_then(|v| <DataPlane as clap::ValueEnum>::from_str(&v, true).ok())
        .unwrap_or(DataPlane::Auto);
    select_data_plane(want)
        .unwrap_or_else(|_| select_data_plane(DataPlane::Auto).unwrap_or(DataPlane::Copy))
}

/// An upstream byte stream: a plain TCP socket from a stream server, or an upgraded (TLS, maybe
/// tunnelled) connection through the API server.
pub trait UpstreamIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> UpstreamIo for T {}

/// An upstream connection as a session gets it.
pub enum UpstreamConn {
    /// Plain TCP (a stream server, `ringfwd serve`): payload may be spliced.
    Tcp(tokio::net::TcpStream),
    /// Anything else (TLS to an API server, the WebSocket tunnel, an in-memory pipe): payload
    /// is copied.
    Stream(Box<dyn UpstreamIo>),
}

impl From<tokio::net::TcpStream> for UpstreamConn {
    fn from(tcp: tokio::net::TcpStream) -> Self {
        UpstreamConn::Tcp(tcp)
    }
}

impl From<Box<dyn UpstreamIo>> for UpstreamConn {
    fn from(io: Box<dyn UpstreamIo>) -> Self {
        UpstreamConn::Stream(io)
    }
}

/// Whether splice(2) works here (checked once; a seccomp profile may forbid it).
pub fn splice_available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(pipe::available)
}

/// Size of the buffer one local connection reads into. Large, because bulk transfers (dumps)
/// are what users push through a forward, and each read becomes one upstream frame.
pub const READ_BUF: usize = 256 * 1024;

/// Whether a spliced session splices the upload too (local socket -> pipe -> upstream), not only
/// the download. `RINGFWD_SPLICE_UPLOAD=1|0`; by default on the `epoll` plane only: there it
/// measured at half of ringfwd's CPU per GB uploading through containerd with containerd and the
/// whole machine no busier than copying (`perf/results/2026-12-06-epoll-upload-splice.md`); on
/// `uring` the copied upload is the cheaper one for containerd (`perf/2026-12-06-data-plane.md`).
pub fn upload_splice() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match std::env::var("RINGFWD_SPLICE_UPLOAD").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => data_plane() == DataPlane::Epoll,
    })
}

/// Payloads shorter than this are copied even where they could be spliced: for a small
/// message the pipe costs more syscalls than the copy saves (an interactive protocol, an echo).
/// A connection's upload switches to splice once a read fills [`SMALL_READ`].
pub const SPLICE_MIN: usize = 16 * 1024;

/// Downloaded payload is spliced only from frames with at least this much left when the
/// reader reaches them; a session whose frames are smaller reads them freely and copies. Two
/// `compare.sh` runs through containerd (DATA frames of at most 32 KiB) measured the copy
/// plane at 0.46-0.48 CPU-s/GB downloading against the splice's 0.60-0.61 (and 0.78 against
/// 0.90 on another VM); `ringfwd serve`'s frames (up to 256 KiB) are cheaper spliced.
pub const DOWN_SPLICE_MIN: usize = 64 * 1024;

/// What a connection in copy mode reads at once before it decides the client is sending in
/// bulk and switches to splice.
pub const SMALL_READ: usize = 64 * 1024;

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

/// A repeated warning (a refused connection, a failed accept) logged at most once per
/// [`LOG_EVERY`]; the line counts those in between, so a flood cannot flood the log.
#[derive(Default)]
pub struct LogThrottle {
    /// When the last line went out, and how many occurrences since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

/// See [`LogThrottle`].
pub const LOG_EVERY: Duration = Duration::from_secs(1);

impl LogThrottle {
    /// Count one occurrence; `Some(n)` when a line is due, `n` counting this one and those
    /// since the last line.
    pub fn count(&self, now: std::time::Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 += 1;
        if st.0.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return None;
        }
        let n = st.1;
        *st = (Some(now), 0);
        Some(n)
    }
}

/// `" (and N-1 more since the last such line)"` when a throttled line stands for `n`.
pub fn also(n: u64) -> String {
    match n {
        0 | 1 => String::new(),
        n => format!(" (and {} more since the last such line)", n - 1),
    }
}

/// A listener's failed accepts (out of descriptors, most often). The connection waits in the
/// kernel's backlog meanwhile, so the listener stays up: it waits before the next accept,
/// from [`ACCEPT_BACKOFF_MIN`] doubling up to [`ACCEPT_BACKOFF_MAX`], and logs through a
/// [`LogThrottle`]. Retrying at once would spin a core and flood the log while nothing
/// changes (seen: a warning every 20 µs).
pub struct AcceptErrors {
    backoff: Duration,
    log: LogThrottle,
}

pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            backoff: ACCEPT_BACKOFF_MIN,
            log: LogThrottle::default(),
        }
    }
}

impl AcceptErrors {
    /// An accept succeeded.
    pub fn accepted(&mut self) {
        self.backoff = ACCEPT_BACKOFF_MIN;
    }

    /// An accept on `listener` failed with `e`: say so (now and then) and wait.
    pub async fn failed(&mut self, listener: &impl std::fmt::Display, e: &std::io::Error) {
        if let Some(n) = self.log.count(std::time::Instant::now()) {
            tracing::warn!("accept on {listener}: {e}{}", also(n));
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// An accepted local connection: a tokio socket, or (on the io_uring plane) a socket that was
/// never registered with tokio's reactor, for a worker's ring to take.
#[derive(Debug)]
pub enum LocalConn {
    Tokio(tokio::net::TcpStream),
    Fd(std::os::fd::OwnedFd),
}

impl LocalConn {
    /// As a tokio socket (registered with its reactor).
    pub fn into_tokio(self) -> std::io::Result<tokio::net::TcpStream> {
        match self {
            LocalConn::Tokio(tcp) => Ok(tcp),
            LocalConn::Fd(fd) => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(std)
            }
        }
    }

    /// For an io_uring worker (out of tokio's reactor, if it was in it).
    pub fn into_ring(self) -> std::io::Result<uring::RingSocket> {
        match self {
            LocalConn::Tokio(tcp) => uring::RingSocket::from_tokio(tcp),
            LocalConn::Fd(fd) => uring::RingSocket::new(fd),
        }
    }

    /// Close it with a TCP reset, not a FIN (a connection refused after it was accepted).
    pub fn reset(self) {
        backend::reset_on_close(&self);
    }
}

impl std::os::fd::AsFd for LocalConn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            LocalConn::Tokio(tcp) => tcp.as_fd(),
            LocalConn::Fd(fd) => fd.as_fd(),
        }
    }
}

impl From<tokio::net::TcpStream> for LocalConn {
    fn from(tcp: tokio::net::TcpStream) -> Self {
        LocalConn::Tokio(tcp)
    }
}

/// Takes a listener's connections: on the io_uring plane through one multishot accept armed
/// on a worker's ring (a completion per connection, no readiness round trip and no `accept4`
/// call each; the sockets never enter tokio's reactor), elsewhere, or where the kernel refuses
/// multishot accepts (before 5.19), through tokio's.
pub struct Accepter<'a> {
    listener: &'a tokio::net::TcpListener,
    ring: Option<uring::RingAccepts>,
    use_ring: bool,
}

impl<'a> Accepter<'a> {
    pub fn new(listener: &'a tokio::net::TcpListener) -> Self {
        Accepter {
            listener,
            ring: None,
            use_ring: data_plane() == DataPlane::Uring,
        }
    }

    /// The next connection and its peer (unspecified if it has already gone: its relay then
    /// finds the reset).
    pub async fn accept(&mut self) -> std::io::Result<(LocalConn, std::net::SocketAddr)> {
        while self.use_ring {
            let accepts = match &mut self.ring {
                Some(a) => a,
                None => match uring::worker::pick()
                    .and_then(|w| uring::RingAccepts::start(w, self.listener))
                {
                    Ok(a) => self.ring.insert(a),
                    Err(e) => {
                        self.ring_refused(&e);
                        break;
                    }
                },
            };
            match accepts.next().await {
                uring::Accepted::Conn(fd) => {
                    let peer = socket2::SockRef::from(&fd)
                        .peer_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                    return Ok((LocalConn::Fd(fd), peer));
                }
                uring::Accepted::Unsupported(e) => {
                    self.ring = None;
                    self.ring_refused(&e);
                }
                // It ended with this error (out of descriptors, say): the next call arms
                // another.
                uring::Accepted::Failed(e) => return Err(e),
            }
        }
        let (tcp, peer) = self.listener.accept().await?;
        Ok((LocalConn::Tokio(tcp), peer))
    }

    fn ring_refused(&mut self, e: &std::io::Error) {
        let local = self.listener.local_addr().ok();
        tracing::info!(
            "listener {local:?}: no multishot accept on this kernel's io_uring ({e}): accepting through epoll"
        );
        self.use_ring = false;
    }
}

/// Disable Nagle and switch TCP keepalive on (see [`KEEPALIVE_IDLE`]). Best effort: a socket
/// that refuses either still works.
pub fn tune_socket(sock: impl std::os::fd::AsFd) {
    let s = socket2::SockRef::from(&sock);
    let _ = s.set_tcp_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = s.set_tcp_keepalive(&ka);
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
    #[error("{0}")]
    Unavailable(String),
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
            RelayError::GoAway(_) | RelayError::SessionClosed | RelayError::Unavailable(_) => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two ends of a loopback TCP connection (client, server).
    pub(crate) async fn pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Write `data` into `into` and then end it; read `out` to its end. Join the first, and
    /// the second returns what it read.
    pub(crate) fn send_and_collect(
        mut into: tokio::net::TcpStream,
        mut out: tokio::net::TcpStream,
        data: &[u8],
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::task::JoinHandle<Vec<u8>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let data = data.to_vec();
        let writer = tokio::spawn(async move {
            into.write_all(&data).await.unwrap();
            into.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            out.read_to_end(&mut got).await.unwrap();
            got
        });
        (writer, reader)
    }

    #[tokio::test]
    async fn sockets_get_keepalive_and_nodelay() {
        let (c, _s) = pair().await;
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
