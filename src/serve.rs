//! `ringfwd serve`: the stream-server side of the port-forward protocols.
//!
//! Accepts HTTP/1.1 upgrades to SPDY/3.1 (`portforward.k8s.io`) and WebSocket
//! (`v4.channel.k8s.io`), and dials each requested port on localhost, either in our own network
//! namespace or in another one (`--netns`), entered with `setns` on a dedicated thread the way
//! containerd enters a pod's namespace. Unlike kubelet/containerd it passes a half-close on to
//! the target and says so in the upgrade response ([`HALF_CLOSE_HEADER`]).

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

/// Serve port-forward upgrades on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, dialer: Dialer, opts: SessionOptions) -> io::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        crate::relay::tune_socket(&tcp);
        let dialer = dialer.clone();
        let opts = opts.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let dialer = dialer.clone();
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(handle(req, dialer, opts)) }
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
        let session = session.clone();
        let dialer = dialer.clone();
        let stream = metrics().accept(None, port);
        tokio::spawn(async move {
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
