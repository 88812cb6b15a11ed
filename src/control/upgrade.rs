//! The HTTP/1.1 upgrade that turns a stream-server URL into a raw multiplexed byte stream.
//!
//! A CRI runtime hands out `http://HOST:PORT/portforward/TOKEN`; `ringfwd serve` listens on any
//! URL. We POST with `Upgrade: SPDY/3.1` (or GET with `Upgrade: websocket` and subprotocol
//! `v4.channel.k8s.io`), expect `101`, and take the TCP socket back out of hyper together with
//! any bytes hyper already read past the response, so the relay owns the socket directly.

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ControlError, HALF_CLOSE_HEADER};
use crate::proto::ws::handshake;

/// Which upgrade to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// SPDY/3.1 with `X-Stream-Protocol-Version: portforward.k8s.io`: one session, many
    /// connections.
    Spdy,
    /// WebSocket `v4.channel.k8s.io`: one session per connection, ports fixed at upgrade.
    Websocket,
}

pub const SPDY_UPGRADE: &str = "SPDY/3.1";
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
pub const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// An upgraded connection, ready for a session.
pub struct Upgraded {
    pub io: TcpStream,
    /// Bytes read from the socket after the 101 response.
    pub prefix: Bytes,
    /// The server passes a half-close on to the target.
    pub half_close: bool,
}

/// Upgrade `url` to `protocol`. `ports` is used by WebSocket only (query `port=`).
pub async fn upgrade(
    url: &str,
    protocol: Protocol,
    ports: &[u16],
) -> Result<Upgraded, ControlError> {
    let bad = |reason: &str| ControlError::BadUrl {
        url: url.to_string(),
        reason: reason.into(),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad(
            "only http:// stream-server URLs are supported (TLS streaming off)",
        ));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    let addr = format!(
        "{}:{}",
        authority.host().trim_matches(['[', ']']),
        authority.port_u16().unwrap_or(80)
    );
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|source| ControlError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| ControlError::Http {
            url: url.into(),
            source,
        })?;
    tokio::spawn(conn.with_upgrades());

    let mut path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let builder = Request::builder()
        .header(header::HOST, authority.as_str())
        .header(header::CONNECTION, "Upgrade");
    let (req, ws_key) = match protocol {
        Protocol::Spdy => (
            builder
                .method(Method::POST)
                .uri(&path)
                .header(header::UPGRADE, SPDY_UPGRADE)
                .header(STREAM_PROTOCOL_HEADER, PORT_FORWARD_PROTOCOL),
            None,
        ),
        Protocol::Websocket => {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str(&handshake::port_query(ports));
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).expect("OS randomness");
            let hs = handshake::client_handshake(nonce, &[handshake::PROTOCOL_V4_CHANNEL]);
            let mut b = builder.method(Method::GET).uri(&path);
            for (name, value) in &hs.headers {
                if !name.eq_ignore_ascii_case("connection") {
                    b = b.header(*name, value);
                }
            }
            (b, Some(hs.key))
        }
    };
    let req = req
        .body(Empty::<Bytes>::new())
        .expect("request is well-formed");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| ControlError::Http {
            url: url.into(),
            source,
        })?;
    let proto_name = match protocol {
        Protocol::Spdy => "SPDY/3.1",
        Protocol::Websocket => "websocket",
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body = String::from_utf8_lossy(&body).trim().to_string();
        return Err(ControlError::Rejected {
            protocol: proto_name,
            status,
            body,
        });
    }
    let hdr = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    match protocol {
        Protocol::Spdy => {
            if !hdr(header::UPGRADE.as_str()).is_some_and(|u| u.eq_ignore_ascii_case(SPDY_UPGRADE))
            {
                return Err(ControlError::BadUpgrade {
                    what: "Upgrade: SPDY/3.1".into(),
                });
            }
        }
        Protocol::Websocket => {
            let headers = resp
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes()));
            handshake::validate_response(
                101,
                headers,
                ws_key.as_deref().unwrap_or_default(),
                &[handshake::PROTOCOL_V4_CHANNEL],
            )
            .map_err(|e| ControlError::BadUpgrade {
                what: format!("a valid websocket answer ({e})"),
            })?;
        }
    }
    let half_close = hdr(HALF_CLOSE_HEADER).is_some_and(|v| v == "1");
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|source| ControlError::Http {
            url: url.into(),
            source,
        })?;
    let parts =
        upgraded
            .downcast::<TokioIo<TcpStream>>()
            .map_err(|_| ControlError::BadUpgrade {
                what: "a plain TCP connection".into(),
            })?;
    Ok(Upgraded {
        io: parts.io.into_inner(),
        prefix: parts.read_buf,
        half_close,
    })
}
