//! The Kubernetes `v4.channel.k8s.io` port-forward channel protocol over [`WsCodec`], both roles,
//! as a [`PortForwardProtocol`].
//!
//! Protocol facts (kubelet/containerd `wsstream`):
//! - The ports are fixed by the handshake (`?port=P` repeated). Port `i` owns channel `2i`
//!   (data) and `2i + 1` (error); its [`ConnId`] is `i`. The connections exist as soon as the
//!   WebSocket does: the server dials every port right away.
//! - Every binary message is one channel byte followed by payload.
//! - The server's first bytes on every channel are the port, 2 bytes little-endian; the client
//!   consumes and checks them (they are not data). The client sends no such prefix.
//! - Error-channel payload is text describing why that port's connection failed.
//! - There is no per-channel half-close or reset: a connection ends when the whole WebSocket
//!   closes. [`close_write`](PortForwardProtocol::close_write) and
//!   [`reset`](PortForwardProtocol::reset) therefore only change local state (further
//!   `frame_data` on that conn fails; after a reset its incoming data is dropped). The relay ends
//!   the session with [`goaway`](PortForwardProtocol::goaway) once every conn is done.
//! - `v4.base64.channel.k8s.io` (client role, [`Encoding::Base64`]): text messages, channel as
//!   `'0' + channel`, payload in standard base64. Sending copies (base64 expands the payload, so
//!   it can't be framed in place).
//!
//! This module owns the channel mapping and port bookkeeping; framing is [`super::frame`]'s.

use std::collections::VecDeque;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Buf, Bytes, BytesMut};

use super::frame::{Message, Opcode, Role, WsCodec};
use super::{MAX_PORTS, MAX_SEND_PAYLOAD, WsError};
use crate::proto::{ConnId, Event, HEADROOM, PortForwardProtocol, ProtoError};

/// How channel messages are carried: the negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `v4.channel.k8s.io` (also what servers speak when no subprotocol was negotiated).
    Binary,
    /// `v4.base64.channel.k8s.io`.
    Base64,
}

#[derive(Debug, Default)]
struct PortState {
    port: u16,
    /// Client: `open` handed this conn out.
    claimed: bool,
    /// Client: port-prefix bytes seen so far on [data, error] channels (0..=2) and their value.
    prefix_len: [u8; 2],
    prefix: [[u8; 2]; 2],
    write_closed: bool,
    /// Reset locally, or (client) failed with an error message: drop further data.
    dead: bool,
    /// Eof (or Error) already reported.
    read_done: bool,
    /// Server: `finish` was called.
    finished: bool,
}

/// A `v4.channel.k8s.io` port-forward session; see the module docs for the protocol.
pub struct WsPortForward {
    codec: WsCodec,
    encoding: Encoding,
    ports: Vec<PortState>,
    /// Events decided before the next message is parsed (server `Incoming`, close fan-out).
    pending: VecDeque<Event>,
    next_ping: u32,
    goaway_seen: bool,
}

impl WsPortForward {
    /// Server role: the only end-of-data signal v4 has is the end of the WebSocket, so once
    /// no port has anything left to send, close it (kubelet does the same when its forward
    /// returns). The client sees end of file on every port.
    fn close_when_done(&mut self) {
        if self.role() == Role::Server
            && !self.codec.close_sent()
            && self.ports.iter().all(|p| p.write_closed)
        {
            let _ = self.codec.close(1000, "");
        }
    }

    fn new(role: Role, ports: &[u16], mask_seed: u64, encoding: Encoding) -> Result<Self, WsError> {
        if ports.len() > MAX_PORTS {
            return Err(WsError::TooManyPorts(ports.len()));
        }
        Ok(WsPortForward {
            codec: WsCodec::new(role, mask_seed),
            encoding,
            ports: ports
                .iter()
                .map(|&port| PortState {
                    port,
                    ..Default::default()
                })
                .collect(),
            pending: VecDeque::new(),
            next_ping: 1,
            goaway_seen: false,
        })
    }

    /// Client role, `v4.channel.k8s.io`. `ports` in the order of the handshake's `port=`
    /// parameters; `mask_seed` seeds the masking keys (seed it from OS randomness).
    /// Panics past [`MAX_PORTS`] ports (the handshake could not have named them either).
    pub fn client(ports: &[u16], mask_seed: u64) -> Self {
        Self::client_with(ports, mask_seed, Encoding::Binary).expect("too many ports")
    }

    /// Client role with the encoding the handshake negotiated.
    pub fn client_with(ports: &[u16], mask_seed: u64, encoding: Encoding) -> Result<Self, WsError> {
        Self::new(Role::Client, ports, mask_seed, encoding)
    }

    /// Server role (`v4.channel.k8s.io`, binary only). The port prefixes of every channel are
    /// queued for [`poll_transmit`](PortForwardProtocol::poll_transmit) at once, and one
    /// [`Event::Incoming`] per port is returned by the first
    /// [`handle_input`](PortForwardProtocol::handle_input) calls (an empty buffer will do).
    /// Panics past [`MAX_PORTS`] ports.
    pub fn server(ports: &[u16]) -> Self {
        let mut s = Self::new(Role::Server, ports, 0, Encoding::Binary).expect("too many ports");
        for (i, &port) in ports.iter().enumerate() {
            s.pending.push_back(Event::Incoming {
                conn: i as ConnId,
                port,
            });
            for ch in [2 * i as u8, 2 * i as u8 + 1] {
                let [lo, hi] = port.to_le_bytes();
                s.codec
                    .send(Opcode::Binary, &[ch, lo, hi])
                    .expect("fresh codec is open");
            }
        }
        s
    }

    /// The ports of this session, by [`ConnId`].
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().map(|p| p.port)
    }

    fn role(&self) -> Role {
        self.codec.role()
    }

    fn port_mut(&mut self, conn: ConnId) -> Result<&mut PortState, ProtoError> {
        self.ports
            .get_mut(conn as usize)
            .ok_or(ProtoError::UnknownConn(conn))
    }

    /// Turn one message into at most one event.
    fn on_message(&mut self, msg: Message) -> Result<Option<Event>, WsError> {
        let (channel, mut data) = match msg {
            Message::Ping(_) => return Ok(None),
            Message::Pong(p) => {
                // Only 4-byte payloads are ours; anything else is an unsolicited pong (§5.5.3).
                return Ok(<[u8; 4]>::try_from(&p[..]).ok().map(|id| Event::Pong {
                    id: u32::from_be_bytes(id),
                }));
            }
            Message::Close(cf) => {
                for (i, p) in self.ports.iter_mut().enumerate() {
                    if !p.read_done && !p.dead {
                        self.pending.push_back(Event::Eof { conn: i as ConnId });
                    }
                    p.read_done = true;
                }
                let message = if cf.reason.is_empty() {
                    format!("websocket closed ({})", cf.code)
                } else {
                    format!("websocket closed ({}): {}", cf.code, cf.reason)
                };
                self.pending.push_back(Event::GoAway { message });
                self.goaway_seen = true;
                return Ok(None);
            }
            Message::Text(t) if self.encoding == Encoding::Base64 => {
                if t.is_empty() {
                    return Ok(None);
                }
                let ch = t[0].wrapping_sub(b'0');
                let decoded = STANDARD.decode(&t[1..]).map_err(|_| WsError::Base64)?;
                (ch, Bytes::from(decoded))
            }
            // v4 peers send binary; a text message in binary mode is read the same way.
            Message::Binary(mut b) | Message::Text(mut b) => {
                if b.is_empty() {
                    // No channel byte: nothing to deliver; tolerate it.
                    return Ok(None);
                }
                let ch = b[0];
                b.advance(1);
                (ch, b)
            }
        };
        let idx = (channel / 2) as usize;
        let sub = (channel % 2) as usize;
        let role = self.role();
        let Some(p) = self.ports.get_mut(idx) else {
            return Err(WsError::UnknownChannel(channel));
        };
        if role == Role::Client && p.prefix_len[sub] < 2 {
            // The server's first 2 bytes per channel are the port; normally a message of their
            // own, but nothing forbids them sharing or splitting messages.
            let got = p.prefix_len[sub] as usize;
            let take = (2 - got).min(data.len());
            p.prefix[sub][got..got + take].copy_from_slice(&data[..take]);
            data.advance(take);
            p.prefix_len[sub] += take as u8;
            if p.prefix_len[sub] == 2 {
                let port = u16::from_le_bytes(p.prefix[sub]);
                if port != p.port {
                    return Err(WsError::PortMismatch {
                        channel,
                        expected: p.port,
                        got: port,
                    });
                }
            }
        }
        if data.is_empty() || p.dead {
            return Ok(None);
        }
        let conn = idx as ConnId;
        if sub == 0 {
            if p.read_done {
                return Ok(None);
            }
            return Ok(Some(Event::Data { conn, data }));
        }
        match role {
            Role::Client => {
                p.dead = true;
                p.read_done = true;
                p.write_closed = true;
                Ok(Some(Event::Error {
                    conn,
                    message: String::from_utf8_lossy(&data).into_owned(),
                }))
            }
            // Clients have nothing to say on an error channel; ignore it as kubelet does.
            Role::Server => Ok(None),
        }
    }
}

impl PortForwardProtocol for WsPortForward {
    fn handle_input(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtoError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            let Some(msg) = self.codec.read(buf)? else {
                return Ok(None);
            };
            if let Some(ev) = self.on_message(msg).inspect_err(|e| {
                // Channel-level errors are fatal too: tell the peer why (best effort).
                let _ = self.codec.close(e.close_code(), "");
            })? {
                return Ok(Some(ev));
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.codec.poll_transmit()
    }

    fn open(&mut self, port: u16) -> Result<ConnId, ProtoError> {
        if self.role() != Role::Client {
            return Err(ProtoError::Unsupported("open on a server"));
        }
        if self.goaway_seen || self.codec.close_sent() {
            return Err(WsError::Closed.into());
        }
        let i = self
            .ports
            .iter()
            .position(|p| p.port == port && !p.claimed)
            .ok_or_else(|| {
                ProtoError::PortForward(format!(
                    "port {port} was not requested in the handshake or is already in use \
                 (v4.channel.k8s.io carries one connection per requested port)"
                ))
            })?;
        self.ports[i].claimed = true;
        Ok(i as ConnId)
    }

    fn frame_data(
        &mut self,
        conn: ConnId,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, ProtoError> {
        let max = self.max_payload();
        let encoding = self.encoding;
        let p = self.port_mut(conn)?;
        if p.write_closed {
            return Err(ProtoError::WriteClosed(conn));
        }
        if len > max || buf.len() < HEADROOM + len {
            return Err(ProtoError::PayloadTooLarge { len, max });
        }
        let channel = 2 * conn as u8;
        if encoding == Encoding::Base64 {
            let mut text = Vec::with_capacity(1 + len.div_ceil(3) * 4);
            text.push(b'0' + channel);
            text.extend_from_slice(STANDARD.encode(&buf[HEADROOM..HEADROOM + len]).as_bytes());
            self.codec.send(Opcode::Text, &text)?;
            // Nothing left to send from `buf`: the frame went to the transmit queue.
            return Ok(HEADROOM + len);
        }
        buf[HEADROOM - 1] = channel;
        Ok(self
            .codec
            .frame_in_place(Opcode::Binary, buf, HEADROOM - 1, HEADROOM + len)?)
    }

    fn max_payload(&self) -> usize {
        MAX_SEND_PAYLOAD
    }

    fn close_write(&mut self, conn: ConnId) -> Result<(), ProtoError> {
        // v4 has no per-channel half-close: the peer cannot be told. Only local state changes,
        // until the server has nothing left to send at all (see `close_when_done`).
        self.port_mut(conn)?.write_closed = true;
        self.close_when_done();
        Ok(())
    }

    fn reset(&mut self, conn: ConnId) {
        // No per-channel reset either: stop sending and drop what still arrives.
        if let Some(p) = self.ports.get_mut(conn as usize) {
            p.write_closed = true;
            p.dead = true;
        }
        self.close_when_done();
    }

    fn fail(&mut self, conn: ConnId, message: &str) {
        if self.role() != Role::Server {
            return;
        }
        let Some(p) = self.ports.get_mut(conn as usize) else {
            return;
        };
        if p.dead {
            return;
        }
        p.dead = true;
        p.write_closed = true;
        let mut m = Vec::with_capacity(1 + message.len());
        m.push(2 * conn as u8 + 1);
        m.extend_from_slice(message.as_bytes());
        // Fails only once closing, when the peer can't hear it anyway.
        let _ = self.codec.send(Opcode::Binary, &m);
        self.close_when_done();
    }

    fn finish(&mut self, conn: ConnId) {
        // Nothing goes on the wire: error channels end with the WebSocket.
        if let Some(p) = self.ports.get_mut(conn as usize) {
            p.finished = true;
            p.write_closed = true;
        }
        self.close_when_done();
    }

    fn ping(&mut self) -> u32 {
        let id = self.next_ping;
        self.next_ping = self.next_ping.wrapping_add(1);
        self.codec.ping(&id.to_be_bytes());
        id
    }

    fn goaway(&mut self) {
        let _ = self.codec.close(1000, "");
    }

    /// The ports are fixed at the upgrade: no connection can be added.
    fn conn_capacity(&self) -> usize {
        0
    }

    fn half_close_on_wire(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ws::frame::{MaskRng, encode_frame};

    fn drain(s: &mut WsPortForward) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = s.poll_transmit() {
            v.extend_from_slice(&b);
        }
        v
    }

    fn events(s: &mut WsPortForward, wire: &[u8]) -> Result<Vec<Event>, ProtoError> {
        let mut buf = BytesMut::from(wire);
        let mut out = Vec::new();
        while let Some(e) = s.handle_input(&mut buf)? {
            out.push(e);
        }
        Ok(out)
    }

    fn events_bytewise(s: &mut WsPortForward, wire: &[u8]) -> Vec<Event> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(e) = s.handle_input(&mut buf).unwrap() {
                out.push(e);
            }
        }
        out
    }

    fn send(s: &mut WsPortForward, conn: ConnId, data: &[u8]) -> Result<Vec<u8>, ProtoError> {
        let mut buf = vec![0u8; HEADROOM + data.len()];
        buf[HEADROOM..].copy_from_slice(data);
        let off = s.frame_data(conn, &mut buf, data.len())?;
        let mut out = drain(s);
        out.extend_from_slice(&buf[off..]);
        Ok(out)
    }

    fn data(conn: ConnId, d: &[u8]) -> Event {
        Event::Data {
            conn,
            data: Bytes::copy_from_slice(d),
        }
    }

    #[test]
    fn back_to_back() {
        let ports = [8080u16, 9090];
        let mut c = WsPortForward::client(&ports, 77);
        let mut s = WsPortForward::server(&ports);
        // Server: Incoming for every port, before any input.
        assert_eq!(
            events(&mut s, &[]).unwrap(),
            [
                Event::Incoming {
                    conn: 0,
                    port: 8080
                },
                Event::Incoming {
                    conn: 1,
                    port: 9090
                }
            ]
        );
        // Client: prefixes are consumed silently.
        let prefixes = drain(&mut s);
        assert_eq!(&prefixes[..5], [0x82, 0x03, 0x00, 0x90, 0x1f]);
        assert_eq!(events(&mut c, &prefixes).unwrap(), []);
        assert_eq!(c.open(9090).unwrap(), 1);
        assert_eq!(c.open(8080).unwrap(), 0);
        assert!(c.open(8080).is_err());
        assert!(c.open(1).is_err());
        // Data both ways.
        let w = send(&mut c, 0, b"GET / HTTP/1.1\r\n").unwrap();
        assert_eq!(w[1] & 0x80, 0x80, "client frames are masked");
        assert_eq!(
            events(&mut s, &w).unwrap(),
            [data(0, b"GET / HTTP/1.1\r\n")]
        );
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let w = send(&mut c, 1, &big).unwrap();
        assert_eq!(events(&mut s, &w).unwrap(), [data(1, &big)]);
        let w = send(&mut s, 1, b"pong").unwrap();
        assert_eq!(w[1] & 0x80, 0, "server frames are not masked");
        assert_eq!(events(&mut c, &w).unwrap(), [data(1, b"pong")]);
        // Ping both ways.
        let id = c.ping();
        let w = drain(&mut c);
        assert_eq!(events(&mut s, &w).unwrap(), []);
        assert_eq!(
            events(&mut c, &drain(&mut s)).unwrap(),
            [Event::Pong { id }]
        );
        let id2 = s.ping();
        assert_ne!(id, 0);
        events(&mut c, &drain(&mut s)).unwrap();
        assert_eq!(
            events(&mut s, &drain(&mut c)).unwrap(),
            [Event::Pong { id: id2 }]
        );
        // An error on port 1 kills conn 1 only.
        s.fail(1, "dial tcp 127.0.0.1:9090: connection refused");
        assert!(matches!(
            send(&mut s, 1, b"x"),
            Err(ProtoError::WriteClosed(1))
        ));
        assert_eq!(
            events(&mut c, &drain(&mut s)).unwrap(),
            [Event::Error {
                conn: 1,
                message: "dial tcp 127.0.0.1:9090: connection refused".into()
            }]
        );
        assert!(matches!(
            send(&mut c, 1, b"x"),
            Err(ProtoError::WriteClosed(1))
        ));
        let w = send(&mut s, 0, b"still here").unwrap();
        assert_eq!(events(&mut c, &w).unwrap(), [data(0, b"still here")]);
        // Half-close is local only.
        c.close_write(0).unwrap();
        assert!(c.poll_transmit().is_none());
        assert!(matches!(
            send(&mut c, 0, b"x"),
            Err(ProtoError::WriteClosed(0))
        ));
        assert!(matches!(c.close_write(5), Err(ProtoError::UnknownConn(5))));
        // The server ends the session: Eof for the live conn, then GoAway; client echoes close.
        s.finish(0);
        s.goaway();
        assert_eq!(
            events(&mut c, &drain(&mut s)).unwrap(),
            [
                Event::Eof { conn: 0 },
                Event::GoAway {
                    message: "websocket closed (1000)".into()
                }
            ]
        );
        assert!(c.open(8080).is_err());
        let reply = drain(&mut c);
        assert!(!reply.is_empty());
        assert_eq!(
            events(&mut s, &reply).unwrap(),
            // conn 1 was failed: it already ended, so no Eof for it.
            [
                Event::Eof { conn: 0 },
                Event::GoAway {
                    message: "websocket closed (1000)".into()
                }
            ]
        );
        assert!(
            drain(&mut s).is_empty(),
            "close already sent: no second close"
        );
    }

    /// The server's whole output for a scripted session, fed at once and byte by byte.
    #[test]
    fn client_split_invariance() {
        let ports = [1u16, 2, 3];
        let mut s = WsPortForward::server(&ports);
        events(&mut s, &[]).unwrap();
        let mut wire = drain(&mut s);
        let mut rng = MaskRng::new(3);
        for k in 0..40 {
            let n = (rng.next_u64() % 3000) as usize;
            let payload: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let conn = if k > 20 { k % 2 } else { k % 3 } as ConnId;
            wire.extend(send(&mut s, conn, &payload).unwrap());
            if k == 20 {
                s.ping();
                s.fail(2, "boom");
            }
        }
        s.goaway();
        wire.extend(drain(&mut s));
        let mut c1 = WsPortForward::client(&ports, 1);
        let whole = events(&mut c1, &wire).unwrap();
        let mut c2 = WsPortForward::client(&ports, 1);
        assert_eq!(events_bytewise(&mut c2, &wire), whole);
        assert_eq!(
            drain(&mut c1),
            drain(&mut c2),
            "same pong and close replies"
        );
        assert!(whole.contains(&Event::Error {
            conn: 2,
            message: "boom".into()
        }));
        assert!(matches!(whole.last(), Some(Event::GoAway { .. })));
    }

    #[test]
    fn server_split_invariance() {
        let ports = [10u16, 20];
        let mut c = WsPortForward::client(&ports, 5);
        let mut wire = Vec::new();
        for k in 0..30u32 {
            let payload: Vec<u8> = (0..k * 37).map(|i| i as u8).collect();
            if !payload.is_empty() {
                wire.extend(send(&mut c, k % 2, &payload).unwrap());
            }
        }
        c.ping();
        c.goaway();
        wire.extend(drain(&mut c));
        let mut s1 = WsPortForward::server(&ports);
        let whole = events(&mut s1, &wire).unwrap();
        let mut s2 = WsPortForward::server(&ports);
        assert_eq!(events_bytewise(&mut s2, &wire), whole);
        assert_eq!(whole.len(), 2 + 29 + 3);
    }

    fn server_frame(payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_frame(&mut b, true, Opcode::Binary, None, payload);
        b.to_vec()
    }

    #[test]
    fn prefix_rules() {
        // Wrong port in a prefix.
        let mut c = WsPortForward::client(&[80], 1);
        let e = events(&mut c, &server_frame(&[0, 81, 0])).unwrap_err();
        assert!(matches!(
            e,
            ProtoError::Ws(WsError::PortMismatch {
                channel: 0,
                expected: 80,
                got: 81
            })
        ));
        // Prefix split across messages and sharing a message with data.
        let mut c = WsPortForward::client(&[0x1234], 1);
        let mut w = server_frame(&[0, 0x34]);
        w.extend(server_frame(&[0, 0x12, b'h', b'i']));
        assert_eq!(events(&mut c, &w).unwrap(), [data(0, b"hi")]);
        // Unknown channel.
        let mut c = WsPortForward::client(&[80], 1);
        let e = events(&mut c, &server_frame(&[2, 80, 0])).unwrap_err();
        assert!(matches!(e, ProtoError::Ws(WsError::UnknownChannel(2))));
        // The failing client queued a close 1002.
        assert!(!drain(&mut c).is_empty());
    }

    #[test]
    fn zero_copy_data() {
        let mut c = WsPortForward::client(&[80], 1);
        events(&mut c, &server_frame(&[0, 80, 0])).unwrap();
        let mut buf = BytesMut::from(&server_frame(&[0; 301])[..]);
        let base = buf.as_ptr() as usize;
        let Some(Event::Data { data, .. }) = c.handle_input(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(data.len(), 300);
        assert_eq!(data.as_ptr() as usize, base + 4 + 1);
    }

    #[test]
    fn reset_drops_data_and_frame_limits() {
        let mut c = WsPortForward::client(&[80], 1);
        events(&mut c, &server_frame(&[0, 80, 0])).unwrap();
        c.reset(0);
        c.reset(99);
        assert_eq!(events(&mut c, &server_frame(&[0, 1, 2])).unwrap(), []);
        let mut c = WsPortForward::client(&[80], 1);
        let mut buf = vec![0u8; HEADROOM + MAX_SEND_PAYLOAD + 1];
        assert!(matches!(
            c.frame_data(0, &mut buf, MAX_SEND_PAYLOAD + 1),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            c.frame_data(1, &mut buf, 1),
            Err(ProtoError::UnknownConn(1))
        ));
        let off = c.frame_data(0, &mut buf, MAX_SEND_PAYLOAD).unwrap();
        assert_eq!(off, HEADROOM - 1 - 14);
        let mut s = WsPortForward::server(&[80]);
        assert!(matches!(s.open(80), Err(ProtoError::Unsupported(_))));
        c.goaway();
        assert!(matches!(
            c.frame_data(0, &mut buf, 1),
            Err(ProtoError::Ws(WsError::Closed))
        ));
    }

    #[test]
    fn base64_client() {
        let b64 = |ch: u8, p: &[u8]| {
            let mut t = vec![b'0' + ch];
            t.extend(STANDARD.encode(p).as_bytes());
            let mut b = BytesMut::new();
            encode_frame(&mut b, true, Opcode::Text, None, &t);
            b.to_vec()
        };
        let mut c = WsPortForward::client_with(&[80, 443], 1, Encoding::Base64).unwrap();
        let mut w = Vec::new();
        for (ch, port) in [(0, 80u16), (1, 80), (2, 443), (3, 443)] {
            w.extend(b64(ch, &port.to_le_bytes()));
        }
        w.extend(b64(2, b"hello"));
        w.extend(b64(1, b"oops"));
        assert_eq!(
            events(&mut c, &w).unwrap(),
            [
                data(1, b"hello"),
                Event::Error {
                    conn: 0,
                    message: "oops".into()
                }
            ]
        );
        // Sending: a text frame in the transmit queue, nothing left in the buffer.
        let out = send(&mut c, 1, b"hi there").unwrap();
        let mut srv = WsCodec::new(Role::Server, 0);
        let mut b = BytesMut::from(&out[..]);
        let m = srv.read(&mut b).unwrap().unwrap();
        assert_eq!(
            m,
            Message::Text(Bytes::from(format!("2{}", STANDARD.encode(b"hi there"))))
        );
        assert!(b.is_empty());
        let mut bad = BytesMut::new();
        encode_frame(&mut bad, true, Opcode::Text, None, b"0!!!");
        assert!(events(&mut c, &bad).is_err());
    }

    #[test]
    fn too_many_ports() {
        let ports: Vec<u16> = (0..129).collect();
        assert!(WsPortForward::client_with(&ports, 1, Encoding::Binary).is_err());
        let ports: Vec<u16> = (0..128).collect();
        let mut s = WsPortForward::server(&ports);
        let mut c = WsPortForward::client(&ports, 1);
        assert_eq!(events(&mut s, &[]).unwrap().len(), 128);
        assert_eq!(events(&mut c, &drain(&mut s)).unwrap(), []);
        let w = send(&mut s, 127, b"last").unwrap();
        assert_eq!(events(&mut c, &w).unwrap(), [data(127, b"last")]);
    }
}
