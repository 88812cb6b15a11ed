//! The `SPDY/3.1+portforward.k8s.io` tunnel (KEP-4006), client role, sans-IO.
//!
//! The API server accepts a WebSocket upgrade with this subprotocol and then carries a raw
//! SPDY/3.1 port-forward byte stream in binary messages, both ways. Message boundaries mean
//! nothing: a SPDY frame may span messages and one message may hold several frames. This
//! adapter only unwraps and wraps those bytes (plus pings, pongs and the close handshake); the
//! SPDY session on top is [`crate::proto::spdy`]'s and knows nothing of WebSocket.

use bytes::{Bytes, BytesMut};

use super::WsError;
use super::frame::{CloseFrame, Message, Opcode, Role, WsCodec};
use crate::proto::HEADROOM;

/// Client side of the tunnel: WebSocket bytes from the API server in, SPDY bytes out, and back.
pub struct WsTunnel {
    codec: WsCodec,
    peer_close: Option<CloseFrame>,
    last_pong: Option<Bytes>,
}

impl WsTunnel {
    /// `mask_seed` seeds the masking keys (seed it from OS randomness).
    pub fn client(mask_seed: u64) -> Self {
        WsTunnel {
            codec: WsCodec::new(Role::Client, mask_seed),
            peer_close: None,
            last_pong: None,
        }
    }

    /// Unwrap every complete message at the front of `wire`, appending binary payloads to `out`
    /// (the SPDY byte stream). A partial frame stays in `wire`. Pings are answered (drain
    /// [`poll_transmit`](Self::poll_transmit)); a close from the server is answered and
    /// recorded in [`peer_close`](Self::peer_close), and nothing after it is read. Text
    /// messages are a protocol error here: the tunnel carries bytes only.
    pub fn decode(&mut self, wire: &mut BytesMut, out: &mut BytesMut) -> Result<(), WsError> {
        while let Some(msg) = self.codec.read(wire)? {
            match msg {
                Message::Binary(b) => out.extend_from_slice(&b),
                Message::Text(_) => {
                    let _ = self.codec.close(WsError::UnexpectedText.close_code(), "");
                    return Err(WsError::UnexpectedText);
                }
                Message::Ping(_) => {}
                Message::Pong(p) => self.last_pong = Some(p),
                Message::Close(cf) => self.peer_close = Some(cf),
            }
        }
        Ok(())
    }

    /// Append queued control frames, then `payload` as one masked binary message, to `out`.
    /// Copies `payload`; see [`encode_in_place`](Self::encode_in_place) to avoid that.
    pub fn encode(&mut self, payload: &[u8], out: &mut BytesMut) -> Result<(), WsError> {
        self.codec.send(Opcode::Binary, payload)?;
        while let Some(b) = self.codec.poll_transmit() {
            out.extend_from_slice(&b);
        }
        Ok(())
    }

    /// Frame `buf[HEADROOM..HEADROOM + len]` as one binary message in place (header written in
    /// front, payload masked) and return the offset where it starts: send
    /// `buf[offset..HEADROOM + len]`, after whatever [`poll_transmit`](Self::poll_transmit)
    /// holds.
    pub fn encode_in_place(&mut self, buf: &mut [u8], len: usize) -> Result<usize, WsError> {
        self.codec
            .frame_in_place(Opcode::Binary, buf, HEADROOM, HEADROOM + len)
    }

    /// Control frames (pongs, close replies, pings) to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.codec.poll_transmit()
    }

    /// Queue a ping (at most 125 bytes of payload); its pong shows up in
    /// [`take_pong`](Self::take_pong).
    pub fn ping(&mut self, payload: &[u8]) {
        self.codec.ping(payload);
    }

    /// Payload of the latest pong received, if any since the last call.
    pub fn take_pong(&mut self) -> Option<Bytes> {
        self.last_pong.take()
    }

    /// Start the close handshake (e.g. 1000 once the SPDY session is done).
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        self.codec.close(code, reason)
    }

    /// The server's close, once received: the SPDY stream has ended.
    pub fn peer_close(&self) -> Option<&CloseFrame> {
        self.peer_close.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ws::frame::{MaskRng, encode_frame};

    fn server_msg(op: Opcode, p: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_frame(&mut b, true, op, None, p);
        b.to_vec()
    }

    fn server_read(s: &mut WsCodec, wire: &[u8]) -> Vec<Message> {
        let mut b = BytesMut::from(wire);
        let mut v = Vec::new();
        while let Some(m) = s.read(&mut b).unwrap() {
            v.push(m);
        }
        assert!(b.is_empty());
        v
    }

    #[test]
    fn decode_concatenates_any_split() {
        // A fake SPDY stream cut into messages of random sizes, with pings in between.
        let mut rng = MaskRng::new(11);
        let stream: Vec<u8> = (0..20_000).map(|_| rng.next_u64() as u8).collect();
        let mut wire = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let n = ((rng.next_u64() % 3000) as usize).min(stream.len() - pos);
            wire.extend(server_msg(Opcode::Binary, &stream[pos..pos + n]));
            if n.is_multiple_of(5) {
                wire.extend(server_msg(Opcode::Ping, b"hb"));
            }
            pos += n;
        }
        wire.extend(server_msg(Opcode::Close, &1000u16.to_be_bytes()));
        for step in [wire.len(), 1, 7, 1000] {
            let mut t = WsTunnel::client(1);
            let (mut w, mut out) = (BytesMut::new(), BytesMut::new());
            for chunk in wire.chunks(step) {
                w.extend_from_slice(chunk);
                t.decode(&mut w, &mut out).unwrap();
            }
            assert_eq!(&out[..], &stream[..], "step {step}");
            assert_eq!(t.peer_close().map(|c| c.code), Some(1000));
            // Pongs and the close reply are masked and well-formed.
            let mut s = WsCodec::new(Role::Server, 0);
            let mut tx = Vec::new();
            while let Some(b) = t.poll_transmit() {
                tx.extend_from_slice(&b);
            }
            let m = server_read(&mut s, &tx);
            assert!(matches!(m.last(), Some(Message::Close(_))));
            assert!(
                m[..m.len() - 1]
                    .iter()
                    .all(|m| *m == Message::Pong("hb".into()))
            );
        }
    }

    #[test]
    fn encode_both_ways() {
        let mut t = WsTunnel::client(99);
        let mut s = WsCodec::new(Role::Server, 0);
        let mut out = BytesMut::new();
        t.ping(b"1234");
        t.encode(b"\x80\x03\x00\x01", &mut out).unwrap();
        assert_eq!(out[1] & 0x80, 0x80);
        let m = server_read(&mut s, &out);
        assert_eq!(
            m,
            [
                Message::Ping("1234".into()),
                Message::Binary(Bytes::from_static(b"\x80\x03\x00\x01"))
            ]
        );
        // The server's pong comes back through decode.
        let mut w = BytesMut::from(&s.poll_transmit().unwrap()[..]);
        let mut spdy = BytesMut::new();
        t.decode(&mut w, &mut spdy).unwrap();
        assert!(spdy.is_empty());
        assert_eq!(t.take_pong(), Some("1234".into()));
        // In place.
        let payload = vec![5u8; 70_000];
        let mut buf = vec![0u8; HEADROOM + payload.len()];
        buf[HEADROOM..].copy_from_slice(&payload);
        let off = t.encode_in_place(&mut buf, payload.len()).unwrap();
        assert_eq!(off, HEADROOM - 14);
        assert_eq!(
            server_read(&mut s, &buf[off..]),
            [Message::Binary(payload.into())]
        );
        t.close(1000, "done").unwrap();
        assert!(t.encode(b"x", &mut out).is_err());
    }

    #[test]
    fn text_is_rejected() {
        let mut t = WsTunnel::client(1);
        let mut w = BytesMut::from(&server_msg(Opcode::Text, b"hi")[..]);
        assert_eq!(
            t.decode(&mut w, &mut BytesMut::new()),
            Err(WsError::UnexpectedText)
        );
        assert!(t.poll_transmit().is_some());
    }
}
