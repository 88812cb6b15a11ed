//! The HTTP/1.1 upgrade that turns a port-forward request into a raw multiplexed byte stream.
//!
//! Two places answer it. A stream server (a CRI runtime hands out
//! `http://HOST:PORT/portforward/TOKEN`; `ringfwd serve` listens on any URL) is reached over
//! plain TCP by [`upgrade`], which takes the socket back out of hyper together with any bytes
//! hyper read past the response, so the relay owns the socket directly, and presents a token
//! to a `ringfwd serve` that wants one. The API server is
//! reached through the `kube` client (TLS, auth) by [`crate::control::cluster`]; both build the
//! request with [`prepare`] and check the answer with [`Ask::check`].
//!
//! The asks: SPDY/3.1 is a `POST` with `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version:
//! portforward.k8s.io`; WebSocket is a `GET` with `Upgrade: websocket` and subprotocol
//! `v4.channel.k8s.io` (ports in the query) or, for the API server's KEP-4006 tunnel,
//! `SPDY/3.1+portforward.k8s.io`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ControlError, HALF_CLOSE_HEADER};
use crate::proto::ws::handshake;
use crate::relay::UpstreamConn;
use crate::secret::{Secret, SecretUrl};

/// Which upgrade to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// SPDY/3.1 with `X-Stream-Protocol-Version: portforward.k8s.io`: one session, many
    /// connections.
    Spdy,
    /// WebSocket `v4.channel.k8s.io`: one session per connection, ports fixed at upgrade.
    Websocket,
    /// SPDY/3.1 carried in WebSocket binary messages (`SPDY/3.1+portforward.k8s.io`), what the
    /// API server offers since Kubernetes 1.30. Not spoken by stream servers.
    Tunnel,
}

impl Protocol {
    /// Several connections share one session.
    pub fn multiplexed(self) -> bool {
        self != Protocol::Websocket
    }

    /// The `protocol` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Spdy => "spdy",
            Protocol::Websocket => "websocket",
            Protocol::Tunnel => "tunnel",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Spdy => "SPDY/3.1",
            Protocol::Websocket => "websocket v4.channel.k8s.io",
            Protocol::Tunnel => "websocket SPDY/3.1+portforward.k8s.io",
        }
    }
}

pub const SPDY_UPGRADE: &str = "SPDY/3.1";
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
pub const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

/// An upgraded connection, ready for a session.
pub struct Upgraded {
    pub io: UpstreamConn,
    /// Bytes read from the connection after the 101 response.
    pub prefix: Bytes,
    /// The server passes a half-close on to the target.
    pub half_close: bool,
}

/// What an upgrade asked for, to check the server's answer against.
pub struct Ask {
    pub protocol: Protocol,
    ws_key: Option<String>,
}

/// Method, URI and upgrade headers for asking `path_and_query` to switch to `protocol`; the
/// caller adds `Host`, auth and a body.
pub fn prepare(protocol: Protocol, path_and_query: &str) -> (http::request::Builder, Ask) {
    let builder = Request::builder()
        .uri(path_and_query)
        .header(header::CONNECTION, "Upgrade");
    let ws = |b: http::request::Builder, subprotocol: &str| {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("OS randomness");
        let hs = handshake::client_handshake(nonce, &[subprotocol]);
        let mut b = b.method(Method::GET);
        for (name, value) in &hs.headers {
            if !name.eq_ignore_ascii_case("connection") {
                b = b.header(*name, value);
            }
        }
        (b, Some(hs.key))
    };
    let (builder, ws_key) = match protocol {
        Protocol::Spdy => (
            builder
                .method(Method::POST)
                .header(header::UPGRADE, SPDY_UPGRADE)
                .header(STREAM_PROTOCOL_HEADER, PORT_FORWARD_PROTOCOL),
            None,
        ),
        Protocol::Websocket => ws(builder, handshake::PROTOCOL_V4_CHANNEL),
        Protocol::Tunnel => ws(builder, handshake::PROTOCOL_SPDY_TUNNEL),
    };
    (builder, Ask { protocol, ws_key })
}

impl Ask {
    /// Check the headers of a `101` answer; returns whether the server passes a half-close on
    /// to the target.
    pub fn check(&self, headers: &HeaderMap) -> Result<bool, ControlError> {
        let hdr = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match self.protocol {
            Protocol::Spdy => {
                if !hdr(header::UPGRADE.as_str())
                    .is_some_and(|u| u.eq_ignore_ascii_case(SPDY_UPGRADE))
                {
                    return Err(ControlError::BadUpgrade {
                        what: "Upgrade: SPDY/3.1".into(),
                    });
                }
            }
            Protocol::Websocket | Protocol::Tunnel => {
                let want = if self.protocol == Protocol::Tunnel {
                    handshake::PROTOCOL_SPDY_TUNNEL
                } else {
                    handshake::PROTOCOL_V4_CHANNEL
                };
                let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
                handshake::validate_response(
                    101,
                    pairs,
                    self.ws_key.as_deref().unwrap_or_default(),
                    &[want],
                )
                .map_err(|e| ControlError::BadUpgrade {
                    what: format!("a valid websocket answer ({e})"),
                })?;
            }
        }
        Ok(hdr(HALF_CLOSE_HEADER).is_some_and(|v| v == "1"))
    }
}

/// The one line worth showing from an error body: a Kubernetes `Status` message, or the text.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(m) = v.get("message").and_then(|m| m.as_str())
    {
        return m.to_string();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    text.lines().next().unwrap_or_default().to_string()
}

/// Upgrade the stream-server `url` to `protocol`, presenting `bearer` (if any) as
/// `Authorization: Bearer`. `ports` is used by WebSocket only (query `port=`). Errors show the
/// URL redacted: it may carry a token.
pub async fn upgrade(
    url: &SecretUrl,
    protocol: Protocol,
    ports: &[u16],
    bearer: Option<&Secret>,
) -> Result<Upgraded, ControlError> {
    let shown = url.to_string();
    let bad = |reason: &str| ControlError::BadUrl {
        url: shown.clone(),
        reason: reason.into(),
    };
    let uri: Uri = url
        .expose()
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
    crate::relay::tune_socket(&tcp);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|source| ControlError::Http {
            url: shown.clone(),
            source,
        })?;
    tokio::spawn(conn.with_upgrades());

    let mut path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    if protocol == Protocol::Websocket {
        path.push(if path.contains('?') { '&' } else { '?' });
        path.push_str(&handshake::port_query(ports));
    }
    let (mut builder, ask) = prepare(protocol, &path);
    if let Some(token) = bearer {
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
            .map_err(|_| bad("the token is not a valid header value"))?;
        // Keeps it out of the header map's Debug, and out of HPACK tables were this HTTP/2.
        value.set_sensitive(true);
        builder = builder.header(header::AUTHORIZATION, value);
    }
    let req = builder
        .header(header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| bad(&e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| ControlError::Http {
            url: shown.clone(),
            source,
        })?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED.as_u16() {
            return Err(ControlError::Unauthorized {
                url: shown,
                body: error_message(&body),
            });
        }
        return Err(ControlError::Rejected {
            protocol: protocol.name(),
            status,
            body: error_message(&body),
        });
    }
    let half_close = ask.check(resp.headers())?;
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|source| ControlError::Http {
            url: shown.clone(),
            source,
        })?;
    let parts =
        upgraded
            .downcast::<TokioIo<TcpStream>>()
            .map_err(|_| ControlError::BadUpgrade {
                what: "a plain TCP connection".into(),
            })?;
    Ok(Upgraded {
        io: UpstreamConn::Tcp(parts.io.into_inner()),
        prefix: parts.read_buf,
        half_close,
    })
}
