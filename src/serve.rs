//! `ringfwd serve`: the stream-server side of the port-forward protocols.
//!
//! Accepts HTTP/1.1 upgrades to SPDY/3.1 (`portforward.k8s.io`) and WebSocket
//! (`v4.channel.k8s.io`), and dials each requested port on localhost, either in our own network
//! namespace or in another one (`--netns`), entered with `setns` on a dedicated thread the way
//! containerd enters a pod's namespace. Unlike kubelet/containerd it passes a half-close on to
//! the target and says so in the upgrade response ([`HALF_CLOSE_HEADER`]).
//!
//! Also owns who may connect ([`Access`]): with a token, every request must present it, as
//! `Authorization: Bearer TOKEN` or in the path the way CRI stream servers hand out URLs
//! (`/portforward/TOKEN`), or it gets `401`; and [`check_listen`] refuses a non-loopback
//! address without one.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming as Body;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::control::HALF_CLOSE_HEADER;
use crate::control::upgrade::{PORT_FORWARD_PROTOCOL, SPDY_UPGRADE, STREAM_PROTOCOL_HEADER};
use crate::metrics::{ForwardMetrics, Outcome};
use crate::proto::PortForwardProtocol;
use crate::proto::portforward::SpdyPortForward;
use crate::proto::ws::{WsPortForward, handshake};
use crate::relay::{Incoming, Session, SessionOptions, relay_server_conn};
use crate::secret::{Secret, redact_url};

/// Errors of `serve` before it accepts anything.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {addr} without authentication: it is not a loopback address, so \
         anyone who can reach it could connect to any port in the target's network namespace; \
         add --token-file PATH or --generate-token"
    )]
    Unauthenticated { addr: SocketAddr },
}

/// Who may use the server.
#[derive(Clone, Debug)]
pub enum Access {
    /// Anyone who can connect: only ever on loopback (see [`check_listen`]).
    Open,
    /// Requests that present this token.
    Token(Arc<Secret>),
}

/// The path prefix under which a request may carry the token (`/portforward/TOKEN`), as CRI
/// stream servers hand out URLs.
pub const TOKEN_PATH_PREFIX: &str = "/portforward/";

/// Why a request was turned away (logged at debug, never with what it presented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Neither an `Authorization: Bearer` header nor a `/portforward/TOKEN` path.
    NoToken,
    /// A token that is not ours.
    WrongToken,
}

impl Access {
    /// Whether `req` may go on. Both places a token can be are checked, each in constant time,
    /// and either one matching is enough.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), Denied> {
        let Access::Token(token) = self else {
            return Ok(());
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()));
        let in_path = req
            .uri()
            .path()
            .strip_prefix(TOKEN_PATH_PREFIX)
            .filter(|t| !t.is_empty())
            .map(str::as_bytes);
        if bearer.is_none() && in_path.is_none() {
            return Err(Denied::NoToken);
        }
        let by_header = bearer.is_some_and(|t| token.matches(t));
        let by_path = in_path.is_some_and(|t| token.matches(t));
        if by_header || by_path {
            Ok(())
        } else {
            Err(Denied::WrongToken)
        }
    }
}

/// The credentials of an `Authorization: Bearer CREDENTIALS` header (the scheme is
/// case-insensitive, RFC 9110 section 11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Denied::NoToken => "authentication required (no token)",
            Denied::WrongToken => "authentication failed (wrong token)",
        })
    }
}

impl Denied {
    /// The `401` answer: one line saying what is missing, never what was presented.
    fn response(self) -> Response<Full<Bytes>> {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            &format!(
                "{self}: send `Authorization: Bearer TOKEN` or use the URL {TOKEN_PATH_PREFIX}TOKEN"
            ),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"ringfwd\""),
        );
        r
    }
}

/// Refuse to serve on a non-loopback address without a token: whoever reaches the port could
/// dial any port in the target's network namespace. On loopback a token is optional (tests and
/// `ringfwd bench` run open there), and enforced when given.
pub fn check_listen(addr: SocketAddr, access: &Access) -> Result<(), ServeError> {
    match access {
        Access::Open if !addr.ip().to_canonical().is_loopback() => {
            Err(ServeError::Unauthenticated { addr })
        }
        _ => Ok(()),
    }
}

/// How targets are reached.
#[derive(Clone)]
pub enum Dialer {
    /// `localhost:PORT` in our own network namespace.
    Local,
    /// `localhost:PORT` inside the namespace at this path.
    Netns(Arc<NetnsDialer>),
}

impl Dialer {
    pub fn netns(path: &Path) -> io::Result<Dialer> {
        Ok(Dialer::Netns(Arc::new(NetnsDialer::start(path)?)))
    }

    /// Dial localhost:`port`, IPv4 first then IPv6 (as containerd does). The error text is what
    /// the client will see on the connection's error stream.
    pub async fn dial(&self, port: u16) -> Result<TcpStream, String> {
        match self {
            Dialer::Local => {
                let v4 = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await;
                match v4 {
                    Ok(s) => Ok(s),
                    Err(e4) => TcpStream::connect((Ipv6Addr::LOCALHOST, port))
                        .await
                        .map_err(|e6| {
                            format!("failed to connect to localhost:{port}: IPv4: {e4} IPv6: {e6}")
                        }),
                }
            }
            Dialer::Netns(d) => d.dial(port).await,
        }
    }
}

type DialRequest = (u16, oneshot::Sender<Result<std::net::TcpStream, String>>);

/// A thread living in another network namespace that connects sockets for us. A socket keeps
/// the namespace it was created in, so the stream works from any thread afterwards.
pub struct NetnsDialer {
    path: PathBuf,
    tx: std::sync::mpsc::Sender<DialRequest>,
}

impl NetnsDialer {
    fn start(path: &Path) -> io::Result<NetnsDialer> {
        let file = std::fs::File::open(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<DialRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let shown = path.display().to_string();
        std::thread::Builder::new().name("rf-netns".into()).spawn(move || {
            use std::os::fd::AsRawFd;
            // Safety: setns on a valid, open namespace fd; it only changes this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let _ = ready_tx.send(if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) });
            if rc != 0 {
                return;
            }
            for (port, reply) in rx {
                let v4 = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port));
                let res = v4.or_else(|e4| {
                    std::net::TcpStream::connect((Ipv6Addr::LOCALHOST, port)).map_err(|e6| {
                        format!(
                            "failed to connect to localhost:{port} inside namespace {shown:?}, IPv4: {e4} IPv6: {e6}"
                        )
                    })
                });
                let _ = reply.send(res);
            }
        })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread died"))??;
        Ok(NetnsDialer {
            path: path.to_path_buf(),
            tx,
        })
    }

    async fn dial(&self, port: u16) -> Result<TcpStream, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((port, reply))
            .map_err(|_| format!("netns {:?} dialer stopped", self.path))?;
        let s = rx
            .await
            .map_err(|_| format!("netns {:?} dialer stopped", self.path))??;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        TcpStream::from_std(s).map_err(|e| e.to_string())
    }
}

/// The connections this process serves to targets, counted as the forward `serve`. Created on
/// first use, after the CLI installed the recorder.
fn metrics() -> &'static ForwardMetrics {
    static SERVE: LazyLock<ForwardMetrics> = LazyLock::new(|| ForwardMetrics::server("serve"));
    &SERVE
}

/// Serve port-forward upgrades on `listener`, to anyone who can connect, until the task is
/// dropped. [`serve_with`] takes a token.
pub async fn serve(listener: TcpListener, dialer: Dialer, opts: SessionOptions) -> io::Result<()> {
    serve_with(listener, dialer, opts, Access::Open).await
}

/// Serve port-forward upgrades on `listener` to requests `access` lets in, until the task is
/// dropped.
pub async fn serve_with(
    listener: TcpListener,
    dialer: Dialer,
    opts: SessionOptions,
    access: Access,
) -> io::Result<()> {
    let mut errors = crate::relay::AcceptErrors::default();
    let local = listener.local_addr()?;
    let mut accepter = crate::relay::Accepter::new(&listener);
    loop {
        // Out of descriptors and the like: transient, keep serving.
        let (tcp, peer) = match accepter.accept().await {
            Ok(accepted) => {
                errors.accepted();
                accepted
            }
            Err(e) => {
                errors.failed(&local, &e).await;
                continue;
            }
        };
        // The upgrade is HTTP, on tokio; the session then moves the socket where it runs.
        let tcp = match tcp.into_tokio() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!("connection from {peer}: {e}");
                continue;
            }
        };
        crate::relay::tune_socket(&tcp);
        let dialer = dialer.clone();
        let opts = opts.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = match access.check(&req) {
                    Ok(()) => handle(req, dialer.clone(), opts.clone()),
                    Err(denied) => {
                        tracing::debug!(
                            "refused {} {} from {peer}: {denied}",
                            req.method(),
                            redact_url(req.uri().path())
                        );
                        denied.response()
                    }
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("http connection from {peer}: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r
}

fn handle(req: Request<Body>, dialer: Dialer, opts: SessionOptions) -> Response<Full<Bytes>> {
    let hdr = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let upgrade = hdr(header::UPGRADE.as_str());
    if upgrade.eq_ignore_ascii_case(SPDY_UPGRADE) {
        if !hdr(STREAM_PROTOCOL_HEADER)
            .split(',')
            .any(|p| p.trim() == PORT_FORWARD_PROTOCOL)
        {
            return reply(
                StatusCode::FORBIDDEN,
                "unsupported X-Stream-Protocol-Version: want portforward.k8s.io",
            );
        }
        let mut resp = reply(StatusCode::SWITCHING_PROTOCOLS, "");
        *resp.body_mut() = Full::new(Bytes::new());
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, SPDY_UPGRADE.parse().unwrap());
        h.insert(
            STREAM_PROTOCOL_HEADER,
            PORT_FORWARD_PROTOCOL.parse().unwrap(),
        );
        h.insert(HALF_CLOSE_HEADER, "1".parse().unwrap());
        let opts = SessionOptions {
            metrics: metrics().session("spdy"),
            ..opts
        };
        tokio::spawn(run_session(
            req,
            Box::new(SpdyPortForward::server()),
            dialer,
            opts,
        ));
        return resp;
    }
    if upgrade.eq_ignore_ascii_case("websocket") && req.method() == Method::GET {
        let ports: Result<Vec<u16>, _> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.strip_prefix("port="))
            .map(|p| p.parse::<u16>())
            .collect();
        let ports = match ports {
            Ok(p) if !p.is_empty() => p,
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "websocket port-forward needs ?port=N query parameters",
                );
            }
        };
        let offered = hdr(header::SEC_WEBSOCKET_PROTOCOL.as_str());
        let chosen = handshake::select_subprotocol(&offered, &[handshake::PROTOCOL_V4_CHANNEL]);
        if !offered.trim().is_empty() && chosen.is_none() {
            return reply(
                StatusCode::BAD_REQUEST,
                "unsupported websocket subprotocol: want v4.channel.k8s.io",
            );
        }
        let key = hdr(header::SEC_WEBSOCKET_KEY.as_str());
        if key.is_empty() {
            return reply(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
        }
        let mut resp = reply(StatusCode::SWITCHING_PROTOCOLS, "");
        *resp.body_mut() = Full::new(Bytes::new());
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            handshake::accept_key(&key).parse().unwrap(),
        );
        if let Some(p) = chosen {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        let opts = SessionOptions {
            metrics: metrics().session("websocket"),
            ..opts
        };
        tokio::spawn(run_session(
            req,
            Box::new(WsPortForward::server(&ports)),
            dialer,
            opts,
        ));
        return resp;
    }
    reply(
        StatusCode::BAD_REQUEST,
        "expected an upgrade to SPDY/3.1 (portforward.k8s.io) or websocket",
    )
}

async fn run_session(
    req: Request<Body>,
    proto: Box<dyn PortForwardProtocol>,
    dialer: Dialer,
    opts: SessionOptions,
) {
    let upgraded = match hyper::upgrade::on(req).await {
        Ok(u) => u,
        Err(e) => return tracing::debug!("upgrade failed: {e}"),
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
        return tracing::error!("upgraded connection is not TCP");
    };
    let (session, mut incoming) =
        Session::start(parts.io.into_inner(), parts.read_buf, proto, opts);
    while let Some(Incoming {
        conn,
        port,
        inbound,
    }) = incoming.recv().await
    {
        if session.draining() {
            // Shutting down: the connections already open finish, no new ones start.
            session.fail(conn, "ringfwd serve is shutting down");
            continue;
        }
        let session = session.clone();
        let dialer = dialer.clone();
        let stream = metrics().accept(None, port);
        let open = session.track();
        tokio::spawn(async move {
            let _open = open;
            match dialer.dial(port).await {
                Ok(tcp) => {
                    let outcome = relay_server_conn(&session, tcp, conn, inbound, stream).await;
                    tracing::debug!("forwarded connection to port {port}: {outcome}");
                }
                Err(msg) => {
                    tracing::debug!("{msg}");
                    session.fail(conn, &msg);
                    stream.finish(Outcome::LocalError, &msg);
                }
            }
        });
    }
}

/// Bind `addr` for `serve`, printing the URL clients use.
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, String)> {
    let l = TcpListener::bind(addr).await?;
    let url = format!("http://{}/portforward", l.local_addr()?);
    Ok((l, url))
}

/// Bind a listener on 127.0.0.1:0 inside the network namespace at `netns`. A socket keeps the
/// namespace it was created in, so only the creating thread needs to enter it.
pub fn listen_in_netns(netns: &Path) -> io::Result<std::net::TcpListener> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsRawFd;
            // Safety: setns on a valid, open namespace fd; it only changes this scoped thread,
            // which ends right after binding.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Secret {
        Secret::generate()
    }

    fn request(path: &str, authorization: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(Method::POST).uri(path);
        if let Some(a) = authorization {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn token_in_header_or_path() {
        let t = token();
        let access = Access::Token(Arc::new(t.clone()));
        let tok = t.expose();
        let ok = |path: &str, auth: Option<&str>| access.check(&request(path, auth));
        assert_eq!(ok("/portforward", Some(&format!("Bearer {tok}"))), Ok(()));
        assert_eq!(ok("/anything", Some(&format!("bearer  {tok} "))), Ok(()));
        assert_eq!(ok(&format!("/portforward/{tok}"), None), Ok(()));
        assert_eq!(ok(&format!("/portforward/{tok}?port=80"), None), Ok(()));
        // Either place right is enough.
        assert_eq!(
            ok(&format!("/portforward/{tok}"), Some("Bearer nope")),
            Ok(())
        );

        assert_eq!(ok("/portforward", None), Err(Denied::NoToken));
        assert_eq!(ok("/portforward/", None), Err(Denied::NoToken));
        assert_eq!(
            ok("/portforward", Some(&format!("Basic {tok}"))),
            Err(Denied::NoToken)
        );
        assert_eq!(
            ok("/portforward", Some("Bearer nope")),
            Err(Denied::WrongToken)
        );
        assert_eq!(ok("/portforward/nope", None), Err(Denied::WrongToken));
        assert_eq!(ok(&format!("/other/{tok}"), None), Err(Denied::NoToken));
        assert_eq!(
            ok(&format!("/portforward/{tok}/x"), None),
            Err(Denied::WrongToken)
        );

        assert_eq!(Access::Open.check(&request("/", None)), Ok(()));
    }

    #[test]
    fn denial_is_401_with_a_bearer_challenge() {
        let r = Denied::WrongToken.response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn access_debug_hides_the_token() {
        let t = token();
        let shown = format!("{:?}", Access::Token(Arc::new(t.clone())));
        assert!(!shown.contains(t.expose()), "{shown}");
        assert_eq!(shown, "Token([redacted])");
    }

    #[test]
    fn off_loopback_needs_a_token() {
        let with = Access::Token(Arc::new(token()));
        for addr in [
            "127.0.0.1:0",
            "127.0.0.2:1",
            "[::1]:0",
            "[::ffff:127.0.0.1]:0",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert!(check_listen(addr, &Access::Open).is_ok(), "{addr}");
            assert!(check_listen(addr, &with).is_ok(), "{addr}");
        }
        for addr in ["0.0.0.0:0", "[::]:0", "10.1.2.3:80", "[2001:db8::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let e = check_listen(addr, &Access::Open).unwrap_err().to_string();
            assert!(
                e.contains("--token-file") && e.contains(&addr.to_string()),
                "{e}"
            );
            assert!(check_listen(addr, &with).is_ok(), "{addr}");
        }
    }
}
