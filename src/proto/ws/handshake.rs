//! Pure helpers for the WebSocket HTTP/1.1 upgrade (RFC 6455 §4) and the subprotocol names.
//!
//! This module owns the handshake's arithmetic and header rules only: it builds the header list
//! a client sends and checks the server's `101` answer. The HTTP exchange itself (hyper, TLS,
//! auth) lives in the control plane; nothing here does I/O or reads randomness (the 16 key bytes
//! come from the caller).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

use super::WsError;

/// The GUID RFC 6455 §1.3 appends to `Sec-WebSocket-Key` before hashing.
pub const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only `Sec-WebSocket-Version` RFC 6455 defines (§4.1).
pub const WS_VERSION: &str = "13";

/// Kubernetes port-forward channel protocol, binary messages: one channel byte, then payload.
pub const PROTOCOL_V4_CHANNEL: &str = "v4.channel.k8s.io";

/// The same protocol as text messages: channel as an ASCII digit (`'0' + channel`), payload in
/// standard base64. For peers that can't send binary messages.
pub const PROTOCOL_V4_BASE64_CHANNEL: &str = "v4.base64.channel.k8s.io";

/// KEP-4006 tunnel: binary messages carry a raw SPDY/3.1 port-forward byte stream.
pub const PROTOCOL_SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

/// `Sec-WebSocket-Accept` for a given `Sec-WebSocket-Key` (§4.2.2 step 5.4):
/// base64(SHA-1(key + GUID)).
pub fn accept_key(sec_websocket_key: &str) -> String {
    let mut h = Sha1::new();
    h.update(sec_websocket_key.trim().as_bytes());
    h.update(WS_GUID.as_bytes());
    STANDARD.encode(h.finalize())
}

/// `Sec-WebSocket-Key` from 16 random bytes the caller drew (§4.1: "a randomly selected
/// 16-byte value that has been base64-encoded").
pub fn generate_key(nonce: [u8; 16]) -> String {
    STANDARD.encode(nonce)
}

/// Query string naming the ports of a `v4.channel.k8s.io` session: `port=80&port=443`. The
/// order fixes the channels: the i-th port gets channels 2i and 2i+1.
pub fn port_query(ports: &[u16]) -> String {
    let mut q = String::new();
    for (i, p) in ports.iter().enumerate() {
        if i > 0 {
            q.push('&');
        }
        q.push_str("port=");
        q.push_str(&p.to_string());
    }
    q
}

/// Headers a client adds to its `GET` to ask for an upgrade (besides `Host` and auth, which
/// belong to the HTTP client), and the key to check the answer against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandshake {
    /// The `Sec-WebSocket-Key` sent; pass it to [`validate_response`].
    pub key: String,
    pub headers: Vec<(&'static str, String)>,
}

/// Build the upgrade request headers for `protocols` (most preferred first; may be empty).
pub fn client_handshake(nonce: [u8; 16], protocols: &[&str]) -> ClientHandshake {
    let key = generate_key(nonce);
    let mut headers = vec![
        ("Connection", "Upgrade".to_owned()),
        ("Upgrade", "websocket".to_owned()),
        ("Sec-WebSocket-Version", WS_VERSION.to_owned()),
        ("Sec-WebSocket-Key", key.clone()),
    ];
    if !protocols.is_empty() {
        headers.push(("Sec-WebSocket-Protocol", protocols.join(", ")));
    }
    ClientHandshake { key, headers }
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Check a server's answer to [`client_handshake`] (§4.1, the client's checks 1-6): status 101,
/// `Upgrade: websocket`, `Connection: Upgrade`, the right `Sec-WebSocket-Accept`, and a
/// subprotocol that was offered. Returns the chosen subprotocol (`None`: the server picked
/// none). Header names are matched case-insensitively; values that are not UTF-8 never match.
pub fn validate_response<'a>(
    status: u16,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    sent_key: &str,
    offered: &[&str],
) -> Result<Option<String>, WsError> {
    if status != 101 {
        return Err(WsError::Handshake(format!("status {status}, expected 101")));
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, None);
    let mut protocol: Option<String> = None;
    for (name, value) in headers {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= value.trim().eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            if accept.is_some() {
                return Err(WsError::Handshake("repeated Sec-WebSocket-Accept".into()));
            }
            accept = Some(value.trim().to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // §4.1: the server selects one value; a list or a repeat is not a selection.
            if protocol.is_some() || value.contains(',') {
                return Err(WsError::Handshake(
                    "more than one Sec-WebSocket-Protocol".into(),
                ));
            }
            protocol = Some(value.trim().to_owned());
        }
    }
    if !upgrade {
        return Err(WsError::Handshake("missing Upgrade: websocket".into()));
    }
    if !connection {
        return Err(WsError::Handshake("missing Connection: Upgrade".into()));
    }
    let want = accept_key(sent_key);
    match accept {
        Some(a) if a == want => {}
        Some(a) => {
            return Err(WsError::Handshake(format!(
                "Sec-WebSocket-Accept {a:?}, expected {want:?}"
            )));
        }
        None => return Err(WsError::Handshake("missing Sec-WebSocket-Accept".into())),
    }
    match protocol {
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if offered.contains(&p.as_str()) => Ok(Some(p)),
        Some(p) => Err(WsError::Handshake(format!(
            "server chose subprotocol {p:?}, not offered"
        ))),
        None => Ok(None),
    }
}

/// Server side: the first of our `supported` subprotocols (in our preference order) that the
/// client listed in its `Sec-WebSocket-Protocol` header value(s).
pub fn select_subprotocol<'s>(client_offer: &str, supported: &[&'s str]) -> Option<&'s str> {
    supported
        .iter()
        .copied()
        .find(|s| client_offer.split(',').any(|t| t.trim() == *s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_accept_example() {
        // RFC 6455 §1.3 (and §4.2.2). Checked independently: base64(sha1(key + GUID)).
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // The RFC's key is the base64 of this very nonce.
        assert_eq!(
            generate_key(*b"the sample nonce"),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn query() {
        assert_eq!(port_query(&[]), "");
        assert_eq!(port_query(&[80, 8080]), "port=80&port=8080");
    }

    fn ok_headers(key: &str) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("upgrade", b"WebSocket".to_vec()),
            ("Connection", b"keep-alive, upgrade".to_vec()),
            ("Sec-WebSocket-Accept", accept_key(key).into_bytes()),
        ]
    }

    fn check(
        status: u16,
        h: &[(&'static str, Vec<u8>)],
        key: &str,
    ) -> Result<Option<String>, WsError> {
        validate_response(
            status,
            h.iter().map(|(n, v)| (*n, v.as_slice())),
            key,
            &[PROTOCOL_V4_CHANNEL, PROTOCOL_V4_BASE64_CHANNEL],
        )
    }

    #[test]
    fn client_handshake_round_trip() {
        let hs = client_handshake(
            *b"the sample nonce",
            &[PROTOCOL_V4_CHANNEL, PROTOCOL_V4_BASE64_CHANNEL],
        );
        assert_eq!(hs.key, "dGhlIHNhbXBsZSBub25jZQ==");
        let get = |n: &str| {
            hs.headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("Upgrade"), Some("websocket"));
        assert_eq!(get("Connection"), Some("Upgrade"));
        assert_eq!(get("Sec-WebSocket-Version"), Some("13"));
        assert_eq!(get("Sec-WebSocket-Key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        let offer = get("Sec-WebSocket-Protocol").unwrap();
        assert_eq!(offer, "v4.channel.k8s.io, v4.base64.channel.k8s.io");
        // The server side picks by its own preference.
        assert_eq!(
            select_subprotocol(offer, &[PROTOCOL_V4_BASE64_CHANNEL, PROTOCOL_V4_CHANNEL]),
            Some(PROTOCOL_V4_BASE64_CHANNEL)
        );
        assert_eq!(select_subprotocol(offer, &[PROTOCOL_SPDY_TUNNEL]), None);
        assert!(
            !client_handshake([0; 16], &[])
                .headers
                .iter()
                .any(|(k, _)| k.contains("Protocol"))
        );

        let key = hs.key;
        assert_eq!(check(101, &ok_headers(&key), &key), Ok(None));
        let mut h = ok_headers(&key);
        h.push(("Sec-WebSocket-Protocol", b"v4.channel.k8s.io".to_vec()));
        assert_eq!(check(101, &h, &key), Ok(Some(PROTOCOL_V4_CHANNEL.into())));
    }

    #[test]
    fn bad_responses() {
        let key = generate_key([1; 16]);
        assert!(check(403, &ok_headers(&key), &key).is_err());
        assert!(check(101, &ok_headers(&key), &generate_key([2; 16])).is_err());
        for drop in 0..3 {
            let mut h = ok_headers(&key);
            h.remove(drop);
            assert!(check(101, &h, &key).is_err(), "without header {drop}");
        }
        let mut h = ok_headers(&key);
        h.push((
            "Sec-WebSocket-Protocol",
            PROTOCOL_SPDY_TUNNEL.as_bytes().to_vec(),
        ));
        assert!(check(101, &h, &key).is_err());
        let mut h = ok_headers(&key);
        h.push((
            "Sec-WebSocket-Protocol",
            b"v4.channel.k8s.io, v4.base64.channel.k8s.io".to_vec(),
        ));
        assert!(check(101, &h, &key).is_err());
    }
}
