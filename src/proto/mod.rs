//! Sans-IO port-forward protocols: bytes in, events out, bytes to send queued.
//!
//! This module owns every wire format ringfwd speaks upstream: SPDY/3.1 framing and header
//! compression ([`spdy`]), the Kubernetes port-forward stream pairing on top of it
//! ([`portforward`]), RFC 6455 WebSocket framing and the `v4.channel.k8s.io` channel protocol
//! ([`ws`]). It must not touch a socket, a clock, an async runtime, kube or metrics: callers
//! feed it received bytes and drain what it wants sent. Time (PING deadlines) lives in the
//! relay, which calls [`PortForwardProtocol::ping`] and matches [`Event::Pong`].
//!
//! Both protocols present the same face to the relay, [`PortForwardProtocol`]: a multiplexed
//! session of byte-stream connections, each addressed by a [`ConnId`].

pub mod portforward;
pub mod spdy;
pub mod ws;

use bytes::{Bytes, BytesMut};

/// A forwarded connection within one session (the port-forward `requestid` for SPDY; the port
/// index for WebSocket v4).
pub type ConnId = u32;

/// Bytes a caller must leave free in front of a payload passed to
/// [`PortForwardProtocol::frame_data`]: the largest header either protocol writes there
/// (WebSocket: 14 header bytes + 1 channel byte; SPDY: 8).
pub const HEADROOM: usize = 16;

/// What a session reports to the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Server role: a client asked for a new connection to `port`; replies are queued.
    Incoming { conn: ConnId, port: u16 },
    /// Payload for a connection, in order. Never empty.
    Data { conn: ConnId, data: Bytes },
    /// The peer will send no more on this connection (data stream FIN / channel end).
    Eof { conn: ConnId },
    /// Client role: the server reported an error for this connection only (text of its error
    /// stream or error channel). The connection is dead; the session is not.
    Error { conn: ConnId, message: String },
    /// The peer reset this connection (RST_STREAM on either of its streams).
    Reset { conn: ConnId },
    /// Answer to a PING this side sent.
    Pong { id: u32 },
    /// The peer is ending the session (GOAWAY, WebSocket close); no new connections.
    GoAway { message: String },
}

/// One multiplexed port-forward session, either role, either protocol.
///
/// Outgoing bytes are produced two ways: control frames are queued inside the session and
/// drained with [`poll_transmit`](Self::poll_transmit); payload is framed in place in the
/// caller's buffer with [`frame_data`](Self::frame_data) so it is never copied. A caller must
/// send everything in the order the session produced it (drain `poll_transmit` after every
/// call that may queue, before sending the next framed payload).
pub trait PortForwardProtocol: Send {
    /// Consume received bytes from the front of `buf` and return the next event, or `Ok(None)`
    /// when more input is needed. Errors are fatal for the whole session.
    fn handle_input(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtoError>;

    /// Bytes queued for sending (control frames, replies, FINs, resets), if any.
    fn poll_transmit(&mut self) -> Option<Bytes>;

    /// Client role: open a new connection to `port` in the pod.
    fn open(&mut self, port: u16) -> Result<ConnId, ProtoError>;

    /// Frame `len` payload bytes that sit at `buf[HEADROOM..HEADROOM + len]`: writes the header
    /// (and masks, where the protocol wants it) in place and returns the offset where the frame
    /// starts; send `buf[offset..HEADROOM + len]`. `len` must not exceed [`Self::max_payload`].
    fn frame_data(&mut self, conn: ConnId, buf: &mut [u8], len: usize)
    -> Result<usize, ProtoError>;

    /// Largest payload one [`frame_data`](Self::frame_data) call accepts.
    fn max_payload(&self) -> usize;

    /// This side will send no more on `conn` (half-close). Queues what the protocol needs.
    fn close_write(&mut self, conn: ConnId) -> Result<(), ProtoError>;

    /// Abort `conn` (RST_STREAM both streams). Never fails: unknown connections are ignored.
    fn reset(&mut self, conn: ConnId);

    /// Server role: report `message` on the connection's error stream and end it.
    fn fail(&mut self, conn: ConnId, message: &str);

    /// Server role: the connection ended cleanly in both directions; close its error stream.
    fn finish(&mut self, conn: ConnId);

    /// Queue a PING and return its id; the answer comes back as [`Event::Pong`].
    fn ping(&mut self) -> u32;

    /// Queue a session end (GOAWAY / WebSocket close).
    fn goaway(&mut self);

    /// Client role: how many more connections [`open`](Self::open) would accept now (the
    /// session's concurrent-stream limit minus what is open, lingering half-closed streams
    /// included). A caller picking among sessions skips one at zero instead of failing.
    fn conn_capacity(&self) -> usize {
        usize::MAX
    }

    /// Moving payload without reading it (splice). The input is inside a payload for `conn`
    /// that would be delivered as [`Event::Data`]: returns the connection and how many bytes of
    /// it are left. A caller may move up to that many bytes from its input straight to the
    /// connection and report them with [`payload_moved`](Self::payload_moved), instead of
    /// reading them into the buffer it passes to [`handle_input`](Self::handle_input). `None`
    /// when the protocol cannot allow it (masked or channel-tagged payload).
    fn payload_in_progress(&self) -> Option<(ConnId, usize)> {
        None
    }

    /// `n` bytes of the payload [`payload_in_progress`](Self::payload_in_progress) reported
    /// were moved by the caller. Events it causes (an end of file) come from the next
    /// [`handle_input`](Self::handle_input).
    fn payload_moved(&mut self, _n: usize) -> Result<(), ProtoError> {
        Err(ProtoError::Unsupported("moving payload outside the parser"))
    }

    /// For a caller that moves payload itself: how many bytes to read next into the buffer
    /// holding `buffered` so that no payload it could move is pulled in (the rest of a frame
    /// header, a control frame). `None`: read as much as convenient.
    fn read_hint(&self, _buffered: &[u8]) -> Option<usize> {
        None
    }

    /// The frame header for `len` payload bytes on `conn` that the caller sends right after it
    /// without the protocol seeing them (spliced). `None` when the protocol must see the
    /// payload to frame it (WebSocket masks it).
    fn payload_header(&mut self, _conn: ConnId, _len: usize) -> Result<Option<Bytes>, ProtoError> {
        Ok(None)
    }

    /// Whether [`close_write`](Self::close_write) reaches the peer. WebSocket v4 has no
    /// half-close on the wire: a relay must end such a connection itself.
    fn half_close_on_wire(&self) -> bool {
        true
    }
}

/// Errors of the protocol layer. Session-fatal unless a method says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("spdy: {0}")]
    Spdy(#[from] spdy::SpdyError),
    #[error("websocket: {0}")]
    Ws(#[from] ws::WsError),
    #[error("unknown connection {0}")]
    UnknownConn(ConnId),
    #[error("connection {0} is closed for writing")]
    WriteClosed(ConnId),
    #[error("payload of {len} bytes exceeds the frame limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("{0} is not supported in this role or protocol")]
    Unsupported(&'static str),
    #[error("port-forward: {0}")]
    PortForward(String),
}
