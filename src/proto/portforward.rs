//! The Kubernetes port-forward protocol (`portforward.k8s.io`) over SPDY/3.1, both roles.
//!
//! Each forwarded connection is a pair of SPDY streams opened by the client, tied together by
//! the same `port` and `requestid` headers:
//! - an **error stream** (`streamtype: error`), which the client half-closes at once and on
//!   which the server writes plain text if forwarding fails;
//! - a **data stream** (`streamtype: data`) carrying the bytes both ways.
//!
//! This module owns that pairing, the per-connection half-close bookkeeping and the mapping to
//! [`Event`]s; [`super::spdy`] owns the frames, and the relay owns sockets and time. A failure
//! of one connection (error text, reset) never ends the session.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::spdy::{Headers, Role, Session, SpdyError, SpdyEvent, Stats, StreamId, goaway, rst};
use super::{ConnId, Event, HEADROOM, PortForwardProtocol, ProtoError};

/// Largest payload per DATA frame we send. The SPDY length field allows 16 MiB, but the Go peer
/// reads each frame into one allocation; 256 KiB matches the relay's largest read and keeps
/// frames interleavable between connections.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Most error-stream text kept per connection (client role), and most we write (server role).
/// Real messages are one line ("error forwarding port 80 to pod ...: connection refused").
pub const MAX_ERROR_MESSAGE: usize = 16 * 1024;

/// Server role: most data a client may send on a data stream before its error stream arrives
/// (we cannot announce the connection until both are there). Real clients send none.
pub const MAX_EARLY_DATA: usize = 256 * 1024;

/// Server role: most connections waiting for their second stream. Bounds the state a client can
/// make us hold with unpaired streams.
pub const MAX_PENDING_PAIRS: usize = 1024;

/// Header names and values of the protocol (k8s.io/api/core/v1 `PortHeader` etc.).
pub const HEADER_STREAM_TYPE: &str = "streamtype";
pub const HEADER_PORT: &str = "port";
pub const HEADER_REQUEST_ID: &str = "requestid";
pub const STREAM_TYPE_ERROR: &str = "error";
pub const STREAM_TYPE_DATA: &str = "data";

/// Subprotocol named in the `X-Stream-Protocol-Version` upgrade header.
pub const PROTOCOL_NAME: &str = "portforward.k8s.io";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Error,
    Data,
}

/// How the server pairs a connection's two streams: by `requestid`, or, for clients too old to
/// send one, by stream id (the data stream is the client's next stream after the error stream,
/// i.e. id + 2, as kubelet pairs them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PairKey {
    Request(String),
    Legacy(StreamId),
}

/// Server role: a connection waiting for its second stream.
#[derive(Debug)]
enum Pending {
    Half(ConnId),
    /// The first stream was rejected; the second gets the same treatment when it arrives.
    Rejected(String),
}

#[derive(Debug, Default)]
struct Conn {
    port: u16,
    error: Option<StreamId>,
    data: Option<StreamId>,
    /// Client role: text received on the error stream so far.
    error_text: Vec<u8>,
    /// Client role: an [`Event::Error`] was reported; later events for the connection are
    /// dropped (it is dead to the relay).
    failed: bool,
    /// Client role: the data stream ended but the error stream has not; the end of file is
    /// held until the error stream says whether the connection failed.
    eof_held: bool,
    /// Client role: the error stream ended with no text.
    error_clean: bool,
    /// [`Event::Incoming`] was emitted (server) / always true (client).
    announced: bool,
    /// Server role: events received before the pair was complete.
    early: Vec<Event>,
    early_bytes: usize,
    pair_key: Option<PairKey>,
}

/// The port-forward protocol over one SPDY session; see the module docs.
pub struct SpdyPortForward {
    session: Session,
    conns: HashMap<ConnId, Conn>,
    streams: HashMap<StreamId, (ConnId, Kind)>,
    pending: HashMap<PairKey, Pending>,
    /// Client: the next `requestid`. Server: the next locally assigned connection id.
    next_conn: ConnId,
    events: VecDeque<Event>,
    /// Client role: report a data-stream end of file only once the error stream has ended
    /// cleanly. kubelet/containerd close the data stream *before* writing the error text
    /// (containerd's portForward defers `stream.Close()`), so an end of file on the data stream
    /// alone does not mean the transfer succeeded.
    eof_waits_for_error_stream: bool,
}

fn parse_port(value: Option<&str>) -> Result<u16, String> {
    let Some(s) = value else {
        return Err(format!("{HEADER_PORT:?} header is required"));
    };
    match s.parse::<u16>() {
        Ok(0) => Err(format!("port {s:?} must be > 0")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("unable to parse {s:?} as a port")),
    }
}

/// At most [`MAX_ERROR_MESSAGE`] bytes of `msg`, cut at a character boundary.
fn truncate_message(msg: &str) -> &str {
    if msg.len() <= MAX_ERROR_MESSAGE {
        return msg;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

fn goaway_message(last_good_stream_id: StreamId, status: u32) -> String {
    let what = match status {
        goaway::OK => "ok",
        goaway::PROTOCOL_ERROR => "protocol error",
        goaway::INTERNAL_ERROR => "internal error",
        _ => "unknown status",
    };
    format!("GOAWAY: {what} (status {status}, last good stream {last_good_stream_id})")
}

impl SpdyPortForward {
    /// The side that runs `kubectl port-forward`: opens connections.
    pub fn client() -> Self {
        Self::new(Role::Client)
    }

    /// Client role against a server that reports errors before ending the data stream and
    /// keeps the error stream open until both directions are done (`ringfwd serve`): report end
    /// of file as soon as the data stream ends.
    pub fn with_immediate_eof(mut self) -> Self {
        self.eof_waits_for_error_stream = false;
        self
    }

    /// The side that kubelet / the CRI stream server plays: accepts connections.
    pub fn server() -> Self {
        Self::new(Role::Server)
    }

    pub fn new(role: Role) -> Self {
        SpdyPortForward {
            session: Session::new(role),
            conns: HashMap::new(),
            streams: HashMap::new(),
            pending: HashMap::new(),
            next_conn: 0,
            events: VecDeque::new(),
            eof_waits_for_error_stream: true,
        }
    }

    pub fn role(&self) -> Role {
        self.session.role()
    }

    /// The underlying SPDY session (stream counts, GOAWAY state).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Frame and byte counters of the session.
    pub fn stats(&self) -> Stats {
        self.session.stats()
    }

    /// Connections still tracked (announced or waiting for their second stream).
    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    fn is_client(&self) -> bool {
        self.session.role() == Role::Client
    }

    /// Drop all state of a connection (its streams must already be closed or reset).
    fn forget(&mut self, conn_id: ConnId) -> Option<Conn> {
        let conn = self.conns.remove(&conn_id)?;
        for sid in [conn.error, conn.data].into_iter().flatten() {
            self.streams.remove(&sid);
        }
        if let Some(key) = &conn.pair_key
            && matches!(self.pending.get(key), Some(Pending::Half(c)) if *c == conn_id)
        {
            self.pending.remove(key);
        }
        Some(conn)
    }

    /// Forget a connection once the session no longer tracks either of its streams.
    fn gc(&mut self, conn_id: ConnId) {
        let Some(conn) = self.conns.get(&conn_id) else {
            return;
        };
        let live = [conn.error, conn.data]
            .into_iter()
            .flatten()
            .any(|sid| self.session.is_open(sid));
        if !live {
            self.forget(conn_id);
        }
    }

    /// Reset whatever is still open of a connection and forget it.
    fn abort(&mut self, conn_id: ConnId) -> Option<Conn> {
        let conn = self.forget(conn_id)?;
        for sid in [conn.error, conn.data].into_iter().flatten() {
            if self.session.is_open(sid) {
                self.session.reset(sid, rst::CANCEL);
            }
        }
        Some(conn)
    }

    /// Deliver an event for a connection, or hold it until the connection is announced.
    fn emit(&mut self, conn_id: ConnId, ev: Event) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.announced {
            self.events.push_back(ev);
            return;
        }
        if let Event::Data { data, .. } = &ev {
            conn.early_bytes += data.len();
        }
        conn.early.push(ev);
        if conn.early_bytes > MAX_EARLY_DATA {
            // Never announced, so the relay never hears of it.
            self.abort(conn_id);
        }
    }

    /// Client role: the connection failed with the error text received so far.
    fn report_error(&mut self, conn_id: ConnId) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        if conn.failed {
            return;
        }
        conn.failed = true;
        let message = String::from_utf8_lossy(&conn.error_text).into_owned();
        self.events.push_back(Event::Error {
            conn: conn_id,
            message,
        });
    }

    fn on_event(&mut self, ev: SpdyEvent) {
        match ev {
            SpdyEvent::SynStream {
                stream_id, headers, ..
            } => {
                if self.is_client() {
                    // Port-forward servers never open streams.
                    self.session.reset(stream_id, rst::REFUSED_STREAM);
                } else {
                    self.on_syn_stream(stream_id, &headers);
                }
            }
            SpdyEvent::SynReply { stream_id, fin, .. }
            | SpdyEvent::Headers { stream_id, fin, .. } => {
                if fin {
                    self.on_data(stream_id, Bytes::new(), true);
                }
            }
            SpdyEvent::Data {
                stream_id,
                data,
                fin,
            } => self.on_data(stream_id, data, fin),
            SpdyEvent::Reset { stream_id, .. } => self.on_reset(stream_id),
            SpdyEvent::Pong { id } => self.events.push_back(Event::Pong { id }),
            SpdyEvent::GoAway {
                last_good_stream_id,
                status,
            } => self.events.push_back(Event::GoAway {
                message: goaway_message(last_good_stream_id, status),
            }),
            // No flow control: see the session docs.
            SpdyEvent::Settings { .. } | SpdyEvent::WindowUpdate { .. } => {}
        }
    }

    fn on_data(&mut self, stream_id: StreamId, data: Bytes, fin: bool) {
        let Some(&(conn_id, kind)) = self.streams.get(&stream_id) else {
            return;
        };
        let client = self.is_client();
        let wait_for_error_stream = client && self.eof_waits_for_error_stream;
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        match kind {
            Kind::Data => {
                if !conn.failed {
                    let text_pending = client && !conn.error_text.is_empty();
                    let hold = fin && !text_pending && wait_for_error_stream && !conn.error_clean;
                    if hold {
                        conn.eof_held = true;
                    }
                    if !data.is_empty() {
                        self.emit(
                            conn_id,
                            Event::Data {
                                conn: conn_id,
                                data,
                            },
                        );
                    }
                    if fin {
                        // Text on the error stream means the connection failed, even if its
                        // FIN has not arrived yet.
                        if text_pending {
                            self.report_error(conn_id);
                        } else if !hold {
                            self.emit(conn_id, Event::Eof { conn: conn_id });
                        }
                    }
                }
            }
            Kind::Error if client => {
                if !conn.failed {
                    let room = MAX_ERROR_MESSAGE - conn.error_text.len();
                    conn.error_text
                        .extend_from_slice(&data[..data.len().min(room)]);
                    let full = conn.error_text.len() >= MAX_ERROR_MESSAGE;
                    if full || (fin && !conn.error_text.is_empty()) {
                        self.report_error(conn_id);
                    } else if fin {
                        conn.error_clean = true;
                        if std::mem::take(&mut conn.eof_held) {
                            self.emit(conn_id, Event::Eof { conn: conn_id });
                        }
                    }
                }
            }
            // The client half-closes its error stream at once; anything on it is ignored.
            Kind::Error => {}
        }
        self.gc(conn_id);
    }

    fn on_reset(&mut self, stream_id: StreamId) {
        let Some(&(conn_id, _)) = self.streams.get(&stream_id) else {
            return;
        };
        if let Some(conn) = self.abort(conn_id)
            && conn.announced
            && !conn.failed
        {
            self.events.push_back(Event::Reset { conn: conn_id });
        }
    }

    /// Server role: turn away one stream. An error stream is accepted so the client can read
    /// why; a data stream is reset.
    fn reject_stream(&mut self, stream_id: StreamId, kind: Kind, message: &str, replied: bool) {
        match kind {
            Kind::Error => {
                if !replied {
                    let _ = self.session.reply(stream_id, &Headers::new(), false);
                }
                let _ =
                    self.session
                        .send_data(stream_id, truncate_message(message).as_bytes(), true);
            }
            Kind::Data => self.session.reset(stream_id, rst::REFUSED_STREAM),
        }
    }

    /// Server role: a client opened a stream; pair it with its partner.
    fn on_syn_stream(&mut self, stream_id: StreamId, headers: &Headers) {
        let kind = match headers.get(HEADER_STREAM_TYPE) {
            Some(STREAM_TYPE_ERROR) => Kind::Error,
            Some(STREAM_TYPE_DATA) => Kind::Data,
            _ => {
                // Without a type there is nothing to pair it with.
                self.session.reset(stream_id, rst::REFUSED_STREAM);
                return;
            }
        };
        let key = match headers.get(HEADER_REQUEST_ID) {
            Some(id) => PairKey::Request(id.to_owned()),
            None => PairKey::Legacy(match kind {
                Kind::Error => stream_id,
                Kind::Data => stream_id.wrapping_sub(2),
            }),
        };
        let port = parse_port(headers.get(HEADER_PORT));

        match self.pending.remove(&key) {
            Some(Pending::Rejected(message)) => {
                self.reject_stream(stream_id, kind, &message, false)
            }
            Some(Pending::Half(conn_id)) => {
                let Some(conn) = self.conns.get(&conn_id) else {
                    self.session.reset(stream_id, rst::REFUSED_STREAM);
                    return;
                };
                let (taken, partner) = match kind {
                    Kind::Error => (conn.error.is_some(), conn.data.map(|s| (s, Kind::Data))),
                    Kind::Data => (conn.data.is_some(), conn.error.map(|s| (s, Kind::Error))),
                };
                if taken {
                    // A second stream of the same type for one request: refuse the newcomer.
                    self.pending.insert(key, Pending::Half(conn_id));
                    self.session.reset(stream_id, rst::REFUSED_STREAM);
                    return;
                }
                let port = match port {
                    Ok(p) if p == conn.port => Ok(p),
                    Ok(p) => Err(format!(
                        "port {p} does not match port {} of the paired stream",
                        conn.port
                    )),
                    Err(m) => Err(m),
                };
                match port {
                    Err(message) => {
                        self.forget(conn_id);
                        self.reject_stream(stream_id, kind, &message, false);
                        if let Some((sid, k)) = partner {
                            self.reject_stream(sid, k, &message, true);
                        }
                    }
                    Ok(port) => {
                        let _ = self.session.reply(stream_id, &Headers::new(), false);
                        self.streams.insert(stream_id, (conn_id, kind));
                        let conn = self.conns.get_mut(&conn_id).expect("checked above");
                        match kind {
                            Kind::Error => conn.error = Some(stream_id),
                            Kind::Data => conn.data = Some(stream_id),
                        }
                        conn.pair_key = None;
                        conn.announced = true;
                        conn.early_bytes = 0;
                        let early = std::mem::take(&mut conn.early);
                        self.events.push_back(Event::Incoming {
                            conn: conn_id,
                            port,
                        });
                        self.events.extend(early);
                        self.gc(conn_id);
                    }
                }
            }
            None => match port {
                Err(message) => {
                    self.reject_stream(stream_id, kind, &message, false);
                    if self.pending.len() < MAX_PENDING_PAIRS {
                        self.pending.insert(key, Pending::Rejected(message));
                    }
                }
                Ok(port) => {
                    if self.pending.len() >= MAX_PENDING_PAIRS {
                        self.session.reset(stream_id, rst::REFUSED_STREAM);
                        return;
                    }
                    let conn_id = self.next_conn;
                    self.next_conn = self.next_conn.wrapping_add(1);
                    let mut conn = Conn {
                        port,
                        pair_key: Some(key.clone()),
                        ..Conn::default()
                    };
                    match kind {
                        Kind::Error => conn.error = Some(stream_id),
                        Kind::Data => conn.data = Some(stream_id),
                    }
                    self.conns.insert(conn_id, conn);
                    self.streams.insert(stream_id, (conn_id, kind));
                    self.pending.insert(key, Pending::Half(conn_id));
                    let _ = self.session.reply(stream_id, &Headers::new(), false);
                }
            },
        }
    }

    /// The data stream of an announced connection.
    fn data_stream(&self, conn_id: ConnId) -> Result<StreamId, ProtoError> {
        match self.conns.get(&conn_id) {
            Some(Conn {
                announced: true,
                data: Some(sid),
                ..
            }) => Ok(*sid),
            _ => Err(ProtoError::UnknownConn(conn_id)),
        }
    }
}

fn write_error(conn: ConnId, e: SpdyError) -> ProtoError {
    match e {
        SpdyError::StreamClosed(_) | SpdyError::UnknownStream(_) => ProtoError::WriteClosed(conn),
        e => ProtoError::Spdy(e),
    }
}

impl PortForwardProtocol for SpdyPortForward {
    fn handle_input(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtoError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(Some(ev));
            }
            match self.session.handle_input(buf)? {
                Some(ev) => self.on_event(ev),
                None => return Ok(None),
            }
        }
    }

    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.session.poll_transmit()
    }

    /// Opens the error stream (half-closed at once) and the data stream. Payload may be framed
    /// right away; SPDY does not require waiting for the SYN_REPLYs.
    fn open(&mut self, port: u16) -> Result<ConnId, ProtoError> {
        if !self.is_client() {
            return Err(ProtoError::Unsupported(
                "opening a connection on the server side",
            ));
        }
        if port == 0 {
            return Err(ProtoError::PortForward("port 0 cannot be forwarded".into()));
        }
        let conn_id = self.next_conn;
        let headers = |kind: &str| {
            Headers::new()
                .with(HEADER_STREAM_TYPE, kind)
                .with(HEADER_PORT, port.to_string())
                .with(HEADER_REQUEST_ID, conn_id.to_string())
        };
        let error = self.session.open(&headers(STREAM_TYPE_ERROR), true)?;
        self.next_conn = self.next_conn.wrapping_add(1);
        let data = match self.session.open(&headers(STREAM_TYPE_DATA), false) {
            Ok(sid) => sid,
            Err(e) => {
                self.session.reset(error, rst::CANCEL);
                return Err(e.into());
            }
        };
        self.streams.insert(error, (conn_id, Kind::Error));
        self.streams.insert(data, (conn_id, Kind::Data));
        self.conns.insert(
            conn_id,
            Conn {
                port,
                error: Some(error),
                data: Some(data),
                announced: true,
                ..Conn::default()
            },
        );
        Ok(conn_id)
    }

    fn frame_data(
        &mut self,
        conn: ConnId,
        buf: &mut [u8],
        len: usize,
    ) -> Result<usize, ProtoError> {
        if len > MAX_PAYLOAD {
            return Err(ProtoError::PayloadTooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        if buf.len() < HEADROOM + len {
            return Err(ProtoError::PortForward(format!(
                "frame buffer of {} bytes cannot hold {HEADROOM} bytes of headroom and {len} of payload",
                buf.len()
            )));
        }
        let sid = self.data_stream(conn)?;
        let header = self
            .session
            .data_header(sid, len, false)
            .map_err(|e| write_error(conn, e))?;
        let start = HEADROOM - header.len();
        buf[start..HEADROOM].copy_from_slice(&header);
        Ok(start)
    }

    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }

    fn payload_in_progress(&self) -> Option<(ConnId, usize)> {
        let (sid, left) = self.session.data_in_progress()?;
        let &(conn_id, kind) = self.streams.get(&sid)?;
        let conn = self.conns.get(&conn_id)?;
        (kind == Kind::Data && conn.announced && !conn.failed).then_some((conn_id, left))
    }

    fn payload_moved(&mut self, n: usize) -> Result<(), ProtoError> {
        if self.payload_in_progress().is_none() {
            return Err(ProtoError::Unsupported(
                "moving payload that is not a connection's",
            ));
        }
        if let Some(ev) = self.session.data_moved(n)? {
            self.on_event(ev);
        }
        Ok(())
    }

    fn read_hint(&self, buffered: &[u8]) -> Option<usize> {
        Some(self.session.read_hint(buffered))
    }

    fn payload_header(&mut self, conn: ConnId, len: usize) -> Result<Option<Bytes>, ProtoError> {
        if len > MAX_PAYLOAD {
            return Err(ProtoError::PayloadTooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        let sid = self.data_stream(conn)?;
        let header = self
            .session
            .data_header(sid, len, false)
            .map_err(|e| write_error(conn, e))?;
        Ok(Some(Bytes::copy_from_slice(&header)))
    }

    /// FIN on the data stream. On the server the error stream stays open, so a later
    /// [`fail`](PortForwardProtocol::fail) can still report; [`finish`](PortForwardProtocol::finish)
    /// closes it.
    fn close_write(&mut self, conn: ConnId) -> Result<(), ProtoError> {
        let sid = self.data_stream(conn)?;
        self.session
            .send_data(sid, &[], true)
            .map_err(|e| write_error(conn, e))?;
        self.gc(conn);
        Ok(())
    }

    fn reset(&mut self, conn: ConnId) {
        self.abort(conn);
    }

    /// Server role: the text and FIN on the error stream, then FIN on the data stream (kubelet's
    /// order). No-op on the client and for unknown connections.
    fn fail(&mut self, conn: ConnId, message: &str) {
        if self.is_client() {
            return;
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let (error, data) = (c.error, c.data);
        if let Some(sid) = error.filter(|&s| self.session.can_send(s)) {
            let _ = self
                .session
                .send_data(sid, truncate_message(message).as_bytes(), true);
        }
        if let Some(sid) = data.filter(|&s| self.session.can_send(s)) {
            let _ = self.session.send_data(sid, &[], true);
        }
        self.gc(conn);
    }

    /// Server role: FIN on the (empty) error stream. No-op on the client.
    fn finish(&mut self, conn: ConnId) {
        if self.is_client() {
            return;
        }
        let Some(error) = self.conns.get(&conn).and_then(|c| c.error) else {
            return;
        };
        if self.session.can_send(error) {
            let _ = self.session.send_data(error, &[], true);
        }
        self.gc(conn);
    }

    fn ping(&mut self) -> u32 {
        self.session.ping()
    }

    fn goaway(&mut self) {
        self.session.goaway(goaway::OK);
    }

    /// Each connection opens two streams.
    fn conn_capacity(&self) -> usize {
        if self.session.goaway_received() {
            return 0;
        }
        self.session.streams_we_can_open() / 2
    }
}

#[cfg(test)]
mod tests {
    use super::super::spdy::frame::{ControlFrame, data_header};
    use super::super::spdy::fuzz::Rng;
    use super::*;

    /// Two port-forward endpoints wired back to back through in-memory byte queues.
    struct Wire {
        c: SpdyPortForward,
        s: SpdyPortForward,
        to_s: BytesMut,
        to_c: BytesMut,
    }

    impl Wire {
        fn new() -> Self {
            Wire {
                // Our own server keeps the error stream open until both directions are done.
                c: SpdyPortForward::client().with_immediate_eof(),
                s: SpdyPortForward::server(),
                to_s: BytesMut::new(),
                to_c: BytesMut::new(),
            }
        }

        /// Move bytes and collect events until both sides are quiet.
        fn pump(&mut self) -> (Vec<Event>, Vec<Event>) {
            let (mut ce, mut se) = (Vec::new(), Vec::new());
            loop {
                let mut moved = false;
                while let Some(b) = self.c.poll_transmit() {
                    self.to_s.extend_from_slice(&b);
                    moved = true;
                }
                while let Some(b) = self.s.poll_transmit() {
                    self.to_c.extend_from_slice(&b);
                    moved = true;
                }
                while let Some(ev) = self.s.handle_input(&mut self.to_s).unwrap() {
                    se.push(ev);
                    moved = true;
                }
                while let Some(ev) = self.c.handle_input(&mut self.to_c).unwrap() {
                    ce.push(ev);
                    moved = true;
                }
                if !moved {
                    return (ce, se);
                }
            }
        }

        fn send(&mut self, from_client: bool, conn: ConnId, payload: &[u8]) {
            let (p, out) = if from_client {
                (&mut self.c, &mut self.to_s)
            } else {
                (&mut self.s, &mut self.to_c)
            };
            while let Some(b) = p.poll_transmit() {
                out.extend_from_slice(&b);
            }
            let mut buf = vec![0u8; HEADROOM + payload.len()];
            buf[HEADROOM..].copy_from_slice(payload);
            let start = p.frame_data(conn, &mut buf, payload.len()).unwrap();
            out.extend_from_slice(&buf[start..]);
        }
    }

    fn data(conn: ConnId, d: &[u8]) -> Event {
        Event::Data {
            conn,
            data: Bytes::copy_from_slice(d),
        }
    }

    #[test]
    fn back_to_back_session() {
        let mut w = Wire::new();
        let conns: Vec<ConnId> = [80, 81, 82].iter().map(|&p| w.c.open(p).unwrap()).collect();
        assert_eq!(conns, vec![0, 1, 2]);
        let (ce, se) = w.pump();
        assert!(ce.is_empty(), "{ce:?}");
        assert_eq!(
            se,
            vec![
                Event::Incoming { conn: 0, port: 80 },
                Event::Incoming { conn: 1, port: 81 },
                Event::Incoming { conn: 2, port: 82 }
            ]
        );

        // Data both ways on every connection.
        for &c in &conns {
            w.send(true, c, format!("ping {c}").as_bytes());
            w.send(false, c, format!("pong {c}").as_bytes());
        }
        let (ce, se) = w.pump();
        assert_eq!(
            ce,
            conns
                .iter()
                .map(|&c| data(c, format!("pong {c}").as_bytes()))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            se,
            conns
                .iter()
                .map(|&c| data(c, format!("ping {c}").as_bytes()))
                .collect::<Vec<_>>()
        );

        // Server fails connection 1: the client sees exactly one Error, others unaffected.
        w.s.fail(1, "error forwarding port 81: connection refused");
        w.send(false, 0, b"still here");
        let (ce, se) = w.pump();
        assert_eq!(
            ce,
            vec![
                Event::Error {
                    conn: 1,
                    message: "error forwarding port 81: connection refused".into()
                },
                data(0, b"still here"),
            ]
        );
        assert!(se.is_empty());
        // The client closes the failed connection; it is gone on both sides.
        w.c.close_write(1).unwrap();
        let (ce, se) = w.pump();
        assert!(ce.is_empty());
        assert_eq!(se, vec![Event::Eof { conn: 1 }]);
        assert!(matches!(
            w.c.frame_data(1, &mut [0; 32], 1),
            Err(ProtoError::UnknownConn(1))
        ));
        assert_eq!(w.c.conn_count(), 2);
        assert_eq!(w.s.conn_count(), 2);

        // Half-close: client -> server EOF, the server can still send, then closes cleanly.
        w.c.close_write(0).unwrap();
        assert!(matches!(
            w.c.close_write(0),
            Err(ProtoError::WriteClosed(0))
        ));
        let mut buf = [0u8; HEADROOM + 1];
        assert!(matches!(
            w.c.frame_data(0, &mut buf, 1),
            Err(ProtoError::WriteClosed(0))
        ));
        let (_, se) = w.pump();
        assert_eq!(se, vec![Event::Eof { conn: 0 }]);
        w.send(false, 0, b"after your eof");
        w.s.close_write(0).unwrap();
        let (ce, _) = w.pump();
        assert_eq!(ce, vec![data(0, b"after your eof"), Event::Eof { conn: 0 }]);
        // The server's error stream is still open until finish(); then both forget the conn.
        assert_eq!(w.s.conn_count(), 2);
        w.s.finish(0);
        let (ce, se) = w.pump();
        assert!(ce.is_empty() && se.is_empty(), "{ce:?} {se:?}");
        assert_eq!(w.s.conn_count(), 1);
        assert_eq!(w.c.conn_count(), 1);

        // Reset from the client.
        w.c.reset(2);
        w.c.reset(2); // unknown now: ignored
        let (ce, se) = w.pump();
        assert!(ce.is_empty());
        assert_eq!(se, vec![Event::Reset { conn: 2 }]);
        assert_eq!((w.c.conn_count(), w.s.conn_count()), (0, 0));
        assert_eq!(
            (w.c.session().stream_count(), w.s.session().stream_count()),
            (0, 0)
        );

        // Ping both ways; GOAWAY.
        let id = w.c.ping();
        let sid = w.s.ping();
        let (ce, se) = w.pump();
        assert_eq!(ce, vec![Event::Pong { id }]);
        assert_eq!(se, vec![Event::Pong { id: sid }]);
        w.s.goaway();
        let (ce, _) = w.pump();
        assert!(matches!(&ce[..], [Event::GoAway { message }] if message.contains("ok")));
        assert!(w.c.open(80).is_err());
    }

    #[test]
    fn server_resets_reach_client() {
        let mut w = Wire::new();
        let c = w.c.open(8080).unwrap();
        w.pump();
        w.s.reset(c);
        let (ce, _) = w.pump();
        assert_eq!(ce, vec![Event::Reset { conn: c }]);
        assert_eq!((w.c.conn_count(), w.s.conn_count()), (0, 0));
    }

    #[test]
    fn frame_data_layout_and_limits() {
        let mut p = SpdyPortForward::client();
        let c = p.open(80).unwrap();
        let mut buf = vec![0xaau8; HEADROOM + 3];
        let start = p.frame_data(c, &mut buf, 3).unwrap();
        assert_eq!(start, HEADROOM - 8);
        // Stream 3 is conn 0's data stream (1 is its error stream).
        assert_eq!(&buf[start..HEADROOM], &data_header(3, 0, 3));
        assert_eq!(p.max_payload(), MAX_PAYLOAD);
        let mut big = vec![0u8; HEADROOM + MAX_PAYLOAD + 1];
        assert!(matches!(
            p.frame_data(c, &mut big, MAX_PAYLOAD + 1),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        assert!(p.frame_data(c, &mut big, MAX_PAYLOAD).is_ok());
        assert!(p.frame_data(c, &mut [0u8; 4], 3).is_err());
        assert!(matches!(
            p.frame_data(9, &mut buf, 1),
            Err(ProtoError::UnknownConn(9))
        ));
        assert!(matches!(p.open(0), Err(ProtoError::PortForward(_))));
        // Role checks.
        let mut s = SpdyPortForward::server();
        assert!(matches!(s.open(80), Err(ProtoError::Unsupported(_))));
        p.fail(c, "ignored on the client");
        p.finish(c);
        assert!(p.poll_transmit().is_some()); // the SYN_STREAMs only
        assert!(p.poll_transmit().is_none());
    }

    #[test]
    fn client_wire_format() {
        // The client's two SYN_STREAMs, decoded by a raw server session.
        let mut p = SpdyPortForward::client();
        p.open(5432).unwrap();
        let mut wire = BytesMut::from(&p.poll_transmit().unwrap()[..]);
        let mut raw = Session::new(Role::Server);
        let want = |kind: &str| {
            Headers::new()
                .with("streamtype", kind)
                .with("port", "5432")
                .with("requestid", "0")
        };
        assert_eq!(
            raw.handle_input(&mut wire).unwrap(),
            Some(SpdyEvent::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                headers: want("error"),
                fin: true,
                unidirectional: false
            })
        );
        assert_eq!(
            raw.handle_input(&mut wire).unwrap(),
            Some(SpdyEvent::SynStream {
                stream_id: 3,
                associated_id: 0,
                priority: 0,
                headers: want("data"),
                fin: false,
                unidirectional: false
            })
        );
    }

    /// A raw SPDY client talking to the port-forward server.
    struct RawClient {
        raw: Session,
        s: SpdyPortForward,
        wire: BytesMut,
    }

    impl RawClient {
        fn new() -> Self {
            RawClient {
                raw: Session::new(Role::Client),
                s: SpdyPortForward::server(),
                wire: BytesMut::new(),
            }
        }
        fn open(&mut self, h: &[(&str, &str)], fin: bool) -> StreamId {
            let headers: Headers = h.iter().copied().collect();
            self.raw.open(&headers, fin).unwrap()
        }
        fn events(&mut self) -> Vec<Event> {
            while let Some(b) = self.raw.poll_transmit() {
                self.wire.extend_from_slice(&b);
            }
            let mut out = Vec::new();
            while let Some(ev) = self.s.handle_input(&mut self.wire).unwrap() {
                out.push(ev);
            }
            out
        }
        /// What the server sent back, as raw SPDY events.
        fn replies(&mut self) -> Vec<SpdyEvent> {
            let mut back = BytesMut::new();
            while let Some(b) = self.s.poll_transmit() {
                back.extend_from_slice(&b);
            }
            let mut out = Vec::new();
            while let Some(ev) = self.raw.handle_input(&mut back).unwrap() {
                out.push(ev);
            }
            out
        }
    }

    #[test]
    fn server_pairs_in_either_order() {
        let mut r = RawClient::new();
        // Data stream first, with early data, then the error stream.
        let d = r.open(
            &[("streamtype", "data"), ("port", "80"), ("requestid", "7")],
            false,
        );
        r.raw.send_data(d, b"early", false).unwrap();
        assert_eq!(r.events(), vec![]);
        r.open(
            &[("streamtype", "error"), ("port", "80"), ("requestid", "7")],
            true,
        );
        assert_eq!(
            r.events(),
            vec![Event::Incoming { conn: 0, port: 80 }, data(0, b"early")]
        );
        let replies = r.replies();
        assert_eq!(
            replies
                .iter()
                .filter(|e| matches!(e, SpdyEvent::SynReply { .. }))
                .count(),
            2
        );
        // Legacy client without requestid: paired by stream id (error N, data N + 2).
        let e = r.open(&[("streamtype", "error"), ("port", "81")], true);
        let d = r.open(&[("streamtype", "data"), ("port", "81")], false);
        assert_eq!(d, e + 2);
        assert_eq!(r.events(), vec![Event::Incoming { conn: 1, port: 81 }]);
        r.raw.send_data(d, b"x", true).unwrap();
        assert_eq!(r.events(), vec![data(1, b"x"), Event::Eof { conn: 1 }]);
    }

    #[test]
    fn server_rejects_bad_streams_without_dying() {
        let mut r = RawClient::new();
        // Missing port on the error stream: it gets the text and a FIN; its data stream a RST.
        let e = r.open(&[("streamtype", "error"), ("requestid", "1")], true);
        let d = r.open(&[("streamtype", "data"), ("requestid", "1")], false);
        // Unknown stream type: reset.
        let x = r.open(
            &[("streamtype", "bogus"), ("port", "1"), ("requestid", "2")],
            false,
        );
        // Port mismatch between the two streams of a request.
        let e3 = r.open(
            &[("streamtype", "error"), ("port", "90"), ("requestid", "3")],
            true,
        );
        let d3 = r.open(
            &[("streamtype", "data"), ("port", "91"), ("requestid", "3")],
            false,
        );
        // A good one after all that.
        r.open(
            &[("streamtype", "error"), ("port", "99"), ("requestid", "4")],
            true,
        );
        r.open(
            &[("streamtype", "data"), ("port", "99"), ("requestid", "4")],
            false,
        );
        assert_eq!(r.events(), vec![Event::Incoming { conn: 1, port: 99 }]);
        let replies = r.replies();
        let text = |sid| {
            replies
                .iter()
                .find_map(|ev| match ev {
                    SpdyEvent::Data {
                        stream_id,
                        data,
                        fin: true,
                    } if *stream_id == sid => Some(String::from_utf8(data.to_vec()).unwrap()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let reset = |sid| {
            replies
                .iter()
                .any(|ev| matches!(ev, SpdyEvent::Reset { stream_id, .. } if *stream_id == sid))
        };
        assert!(
            text(e).contains("\"port\" header is required"),
            "{replies:?}"
        );
        assert!(reset(d) && reset(x) && reset(d3), "{replies:?}");
        assert!(text(e3).contains("does not match"), "{replies:?}");
        assert_eq!(r.s.conn_count(), 1);
    }

    /// A raw SPDY server feeding the port-forward client, for error-stream semantics.
    fn client_with_raw_server(n: u16) -> (SpdyPortForward, Session, BytesMut) {
        let mut c = SpdyPortForward::client();
        let mut raw = Session::new(Role::Server);
        for i in 0..n {
            c.open(8000 + i).unwrap();
        }
        let mut wire = BytesMut::from(&c.poll_transmit().unwrap()[..]);
        while let Some(ev) = raw.handle_input(&mut wire).unwrap() {
            let SpdyEvent::SynStream { stream_id, .. } = ev else {
                panic!("{ev:?}")
            };
            raw.reply(stream_id, &Headers::new(), false).unwrap();
        }
        (c, raw, BytesMut::new())
    }

    fn feed(c: &mut SpdyPortForward, raw: &mut Session) -> Vec<Event> {
        let mut wire = BytesMut::new();
        while let Some(b) = raw.poll_transmit() {
            wire.extend_from_slice(&b);
        }
        let mut out = Vec::new();
        while let Some(ev) = c.handle_input(&mut wire).unwrap() {
            out.push(ev);
        }
        out
    }

    /// A relay that splices: only a connection's data-stream payload may be moved; error text
    /// still goes through the parser; a FIN on moved payload still waits for the error stream.
    #[test]
    fn client_payload_moved_by_the_relay() {
        let (mut c, mut raw, _) = client_with_raw_server(1);
        assert_eq!(feed(&mut c, &mut raw), vec![]);
        let mut wire = BytesMut::new();
        // Header only: the parser stops inside the payload.
        let h = raw.data_header(3, 1000, true).unwrap();
        wire.extend_from_slice(&h);
        assert_eq!(c.read_hint(&wire), Some(1), "a DATA header: parse it");
        assert_eq!(c.handle_input(&mut wire).unwrap(), None);
        assert_eq!(c.payload_in_progress(), Some((0, 1000)));
        assert_eq!(c.read_hint(&wire), Some(1000 + 8));
        c.payload_moved(600).unwrap();
        assert_eq!(c.payload_in_progress(), Some((0, 400)));
        c.payload_moved(400).unwrap();
        // containerd's order: data FIN first, then the error stream: no Eof before it.
        assert_eq!(c.handle_input(&mut wire).unwrap(), None);
        assert_eq!(c.payload_in_progress(), None);
        assert!(c.payload_moved(1).is_err());
        // Error-stream text is never handed out for moving.
        let h = raw.data_header(1, 4, false).unwrap();
        wire.extend_from_slice(&h);
        assert_eq!(c.handle_input(&mut wire).unwrap(), None);
        assert_eq!(c.payload_in_progress(), None);
        wire.extend_from_slice(b"oops");
        assert_eq!(c.handle_input(&mut wire).unwrap(), None);
        raw.send_data(1, b"", true).unwrap();
        assert_eq!(
            feed(&mut c, &mut raw),
            vec![Event::Error {
                conn: 0,
                message: "oops".into()
            }]
        );
        // Headers for spliced upload payload are the DATA headers frame_data writes.
        let (mut c, _raw, _) = client_with_raw_server(1);
        let h = c.payload_header(0, 70_000).unwrap().unwrap();
        assert_eq!(&h[..], &[0, 0, 0, 3, 0, 1, 0x11, 0x70]);
        assert!(c.payload_header(9, 1).is_err());
        assert!(c.payload_header(0, MAX_PAYLOAD + 1).is_err());
    }

    #[test]
    fn client_holds_eof_until_error_stream_ends() {
        // conn 0: streams 1 (error), 3 (data); conn 1: 5, 7.
        let (mut c, mut raw, _) = client_with_raw_server(2);
        assert_eq!(feed(&mut c, &mut raw), vec![]);
        // containerd closes the data stream before writing the error: no Eof may escape.
        raw.send_data(3, b"partial", true).unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![data(0, b"partial")]);
        raw.send_data(1, b"connection reset by peer", true).unwrap();
        assert_eq!(
            feed(&mut c, &mut raw),
            vec![Event::Error {
                conn: 0,
                message: "connection reset by peer".into()
            }]
        );
        // A clean error stream releases the held end of file.
        raw.send_data(7, b"all", true).unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![data(1, b"all")]);
        raw.send_data(5, b"", true).unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![Event::Eof { conn: 1 }]);
    }

    #[test]
    fn client_error_stream_semantics() {
        // conn 0: streams 1 (error), 3 (data); conn 1: 5, 7; conn 2: 9, 11; conn 3: 13, 15.
        let (mut c, mut raw, _) = client_with_raw_server(4);
        assert_eq!(feed(&mut c, &mut raw), vec![]);
        // conn 0: text in two frames, then FIN: one Error with all of it.
        raw.send_data(1, b"error forwarding ", false).unwrap();
        raw.send_data(1, b"port 8000", true).unwrap();
        // conn 1: empty error stream FIN is clean; data then EOF.
        raw.send_data(5, b"", true).unwrap();
        raw.send_data(7, b"hi", true).unwrap();
        // conn 2: text, then data FIN without error FIN: Error, not Eof.
        raw.send_data(9, b"broken pipe", false).unwrap();
        raw.send_data(11, b"", true).unwrap();
        // conn 3: RST of the data stream.
        raw.reset(15, rst::CANCEL);
        assert_eq!(
            feed(&mut c, &mut raw),
            vec![
                Event::Error {
                    conn: 0,
                    message: "error forwarding port 8000".into()
                },
                data(1, b"hi"),
                Event::Eof { conn: 1 },
                Event::Error {
                    conn: 2,
                    message: "broken pipe".into()
                },
                Event::Reset { conn: 3 },
            ]
        );
        // conn 2's late error FIN reports nothing more.
        // (conn 4, opened below, covers containerd's order: data FIN first, then the text.)
        raw.send_data(9, b" more", true).unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![]);
        // The reset conn's other stream was reset by us.
        let mut back = BytesMut::new();
        while let Some(b) = c.poll_transmit() {
            back.extend_from_slice(&b);
        }
        let mut want = BytesMut::new();
        ControlFrame::RstStream {
            stream_id: 13,
            status: rst::CANCEL,
        }
        .encode(&mut want);
        assert_eq!(back, want);
    }

    #[test]
    fn client_error_text_is_bounded() {
        let (mut c, mut raw, _) = client_with_raw_server(1);
        raw.send_data(1, &vec![b'e'; MAX_ERROR_MESSAGE - 1], false)
            .unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![]);
        raw.send_data(1, b"xyz", false).unwrap();
        let evs = feed(&mut c, &mut raw);
        let [Event::Error { conn: 0, message }] = &evs[..] else {
            panic!("{evs:?}")
        };
        assert_eq!(message.len(), MAX_ERROR_MESSAGE);
        assert!(message.ends_with("ex"));
        raw.send_data(1, b"more", true).unwrap();
        assert_eq!(feed(&mut c, &mut raw), vec![]);
    }

    #[test]
    fn server_fail_writes_in_kubelet_order() {
        let mut r = RawClient::new();
        r.open(
            &[("streamtype", "error"), ("port", "80"), ("requestid", "0")],
            true,
        );
        r.open(
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
            false,
        );
        assert_eq!(r.events(), vec![Event::Incoming { conn: 0, port: 80 }]);
        r.replies();
        r.s.fail(0, &"é".repeat(MAX_ERROR_MESSAGE)); // truncated at a char boundary
        let replies = r.replies();
        let [
            SpdyEvent::Data {
                stream_id: 1,
                data: text,
                fin: true,
            },
            SpdyEvent::Data {
                stream_id: 3,
                data: empty,
                fin: true,
            },
        ] = &replies[..]
        else {
            panic!("{replies:?}")
        };
        assert_eq!(text.len(), MAX_ERROR_MESSAGE);
        assert!(std::str::from_utf8(text).is_ok());
        assert!(empty.is_empty());
        // Data stream FIN from the client ends the conn.
        assert_eq!(r.s.conn_count(), 1);
        r.raw.send_data(3, b"", true).unwrap();
        assert_eq!(r.events(), vec![Event::Eof { conn: 0 }]);
        assert_eq!(r.s.conn_count(), 0);
    }

    #[test]
    fn server_early_data_is_bounded() {
        let mut r = RawClient::new();
        let d = r.open(
            &[("streamtype", "data"), ("port", "80"), ("requestid", "0")],
            false,
        );
        r.raw
            .send_data(d, &vec![0u8; MAX_EARLY_DATA + 1], false)
            .unwrap();
        assert_eq!(r.events(), vec![]);
        assert_eq!(r.s.conn_count(), 0);
        // The late error stream is then a fresh half pair, never announced on its own.
        r.open(
            &[("streamtype", "error"), ("port", "80"), ("requestid", "0")],
            true,
        );
        assert_eq!(r.events(), vec![]);
    }

    /// The client's view of a recorded server byte stream is the same at every split.
    #[test]
    fn client_events_independent_of_splits() {
        let (mut c0, mut raw, _) = client_with_raw_server(3);
        raw.send_data(3, b"hello", false).unwrap();
        raw.send_data(1, b"oops", true).unwrap();
        raw.send_data(7, &[9u8; 700], true).unwrap();
        raw.send_data(5, b"", true).unwrap();
        let _ = raw.ping();
        raw.reset(11, rst::CANCEL);
        raw.goaway(goaway::OK);
        let mut input = Vec::new();
        while let Some(b) = raw.poll_transmit() {
            input.extend_from_slice(&b);
        }
        let _ = c0.poll_transmit();
        let run = |cuts: &[usize]| {
            let mut c = SpdyPortForward::client();
            for i in 0..3 {
                c.open(8000 + i).unwrap();
            }
            let _ = c.poll_transmit();
            let mut buf = BytesMut::new();
            let mut evs: Vec<Event> = Vec::new();
            let mut last = 0;
            for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
                buf.extend_from_slice(&input[last..cut]);
                last = cut;
                while let Some(ev) = c.handle_input(&mut buf).unwrap() {
                    if let (Event::Data { conn, data }, Some(Event::Data { conn: pc, data: pd })) =
                        (&ev, evs.last_mut())
                        && conn == pc
                    {
                        *pd = [&pd[..], &data[..]].concat().into();
                        continue;
                    }
                    evs.push(ev);
                }
            }
            let mut tx = Vec::new();
            while let Some(b) = c.poll_transmit() {
                tx.extend_from_slice(&b);
            }
            (evs, tx)
        };
        let whole = run(&[]);
        assert_eq!(
            whole.0,
            vec![
                data(0, b"hello"),
                Event::Error {
                    conn: 0,
                    message: "oops".into()
                },
                data(1, &[9u8; 700]),
                Event::Eof { conn: 1 },
                Event::Reset { conn: 2 },
                Event::GoAway {
                    message: goaway_message(11, goaway::OK)
                },
            ]
        );
        for cut in 0..=input.len() {
            assert_eq!(run(&[cut]), whole, "cut {cut}");
        }
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            let mut cuts: Vec<usize> = (0..rng.below(12))
                .map(|_| rng.below(input.len() + 1))
                .collect();
            cuts.sort();
            assert_eq!(run(&cuts), whole);
        }
        let bytes_by_byte: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(&bytes_by_byte), whole);
    }

    /// Many connections with random interleaved operations: the session never errors, every
    /// byte arrives in order, and everything is forgotten at the end.
    #[test]
    fn random_traffic_property() {
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let mut w = Wire::new();
            let n = 1 + rng.below(8);
            let conns: Vec<ConnId> = (0..n).map(|i| w.c.open(1000 + i as u16).unwrap()).collect();
            w.pump();
            let mut sent_c: Vec<Vec<u8>> = vec![Vec::new(); n];
            let mut sent_s: Vec<Vec<u8>> = vec![Vec::new(); n];
            let (mut got_c, mut got_s) = (vec![Vec::new(); n], vec![Vec::new(); n]);
            for _ in 0..200 {
                let i = rng.below(n);
                let len = 1 + rng.below(3000);
                let payload: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                let from_client = rng.below(2) == 0;
                w.send(from_client, conns[i], &payload);
                if from_client {
                    &mut sent_c[i]
                } else {
                    &mut sent_s[i]
                }
                .extend_from_slice(&payload);
                if rng.below(5) == 0 {
                    let (ce, se) = w.pump();
                    for (evs, got) in [(ce, &mut got_c), (se, &mut got_s)] {
                        for ev in evs {
                            let Event::Data { conn, data } = ev else {
                                panic!("{ev:?}")
                            };
                            got[conn as usize].extend_from_slice(&data);
                        }
                    }
                }
            }
            for &c in &conns {
                w.c.close_write(c).unwrap();
                w.s.close_write(c).unwrap();
                w.s.finish(c);
            }
            let (ce, se) = w.pump();
            for (evs, got) in [(ce, &mut got_c), (se, &mut got_s)] {
                for ev in evs {
                    match ev {
                        Event::Data { conn, data } => got[conn as usize].extend_from_slice(&data),
                        Event::Eof { .. } => {}
                        other => panic!("{other:?}"),
                    }
                }
            }
            assert_eq!(got_s, sent_c);
            assert_eq!(got_c, sent_s);
            assert_eq!((w.c.conn_count(), w.s.conn_count()), (0, 0));
            assert_eq!(
                (w.c.session().stream_count(), w.s.session().stream_count()),
                (0, 0)
            );
        }
    }
}
