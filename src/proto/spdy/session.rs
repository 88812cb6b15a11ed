//! The SPDY/3.1 session state machine (sans-IO): stream ids, stream half-close state, PING,
//! GOAWAY and the shared header compression contexts.
//!
//! Input: [`Session::handle_input`] consumes bytes from the front of the caller's buffer and
//! returns at most one [`SpdyEvent`]. DATA payload is never buffered here: whatever part of a
//! DATA frame is in the buffer is split off and handed out zero-copy, so a 16 MiB frame costs no
//! more memory than a 1 KiB one. Control frames are buffered whole, up to
//! [`MAX_CONTROL_FRAME_LEN`].
//!
//! Output: control frames are queued in an internal buffer drained by
//! [`Session::poll_transmit`]; DATA headers come from [`Session::data_header`] so the caller
//! writes them in front of its own payload buffer.
//!
//! Flow control is deliberately absent: moby/spdystream (containerd, kubelet, the API server)
//! never sends WINDOW_UPDATE and ignores windows, so waiting for one would deadlock. Received
//! WINDOW_UPDATE and SETTINGS are reported, never enforced.

use std::collections::{HashMap, VecDeque};

use bytes::{Buf, Bytes, BytesMut};

use super::SpdyError;
use super::frame::{
    ControlFrame, FLAG_FIN, FLAG_UNIDIRECTIONAL, FRAME_HEADER_LEN, FrameHeader,
    MAX_CONTROL_FRAME_LEN, MAX_DATA_PAYLOAD, MAX_STREAM_ID, Setting, VERSION, data_header, goaway,
    rst,
};
use super::headers::{HeaderDecoder, HeaderEncoder, Headers};

/// A SPDY stream id (31 bits; odd = opened by the client, even = by the server).
pub type StreamId = u32;

/// Most streams the peer may have open at once; a SYN_STREAM past it is refused with
/// RST_STREAM(REFUSED_STREAM). Each forwarded connection uses two streams, so this allows 2048
/// concurrent connections per session while bounding the state a peer can make us keep. We hold
/// ourselves to the same number for streams we open.
pub const MAX_CONCURRENT_STREAMS: usize = 4096;

/// How many stream ids we remember having reset. Frames the peer had in flight for them are
/// dropped silently instead of each drawing another RST_STREAM (the spec forbids answering a
/// RST with a RST, and a storm of them helps no one).
pub const RECENT_RESETS: usize = 256;

/// Which end of the session we are; decides the parity of stream and ping ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Odd stream ids, odd ping ids.
    Client,
    /// Even stream ids, even ping ids.
    Server,
}

/// What the session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpdyEvent {
    /// The peer opened a stream (already accepted; refused ones never show up).
    SynStream {
        stream_id: StreamId,
        associated_id: StreamId,
        priority: u8,
        headers: Headers,
        fin: bool,
        unidirectional: bool,
    },
    /// The peer accepted a stream we opened.
    SynReply {
        stream_id: StreamId,
        headers: Headers,
        fin: bool,
    },
    /// Extra headers on a stream.
    Headers {
        stream_id: StreamId,
        headers: Headers,
        fin: bool,
    },
    /// A piece of a DATA frame, in order. `fin` is set on the last piece of a FIN frame only;
    /// `data` is empty only for an empty FIN frame.
    Data {
        stream_id: StreamId,
        data: Bytes,
        fin: bool,
    },
    /// The stream is gone: reset by the peer (`by_peer`), or by us because the peer broke a
    /// stream rule (the RST_STREAM is already queued).
    Reset {
        stream_id: StreamId,
        status: u32,
        by_peer: bool,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    WindowUpdate {
        stream_id: StreamId,
        delta: u32,
    },
    /// The answer to a PING we sent.
    Pong {
        id: u32,
    },
    GoAway {
        last_good_stream_id: StreamId,
        status: u32,
    },
}

/// Plain counters the caller may read at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    /// All bytes consumed from input / produced for output (headers and payload).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// DATA payload only.
    pub data_bytes_in: u64,
    pub data_bytes_out: u64,
    pub resets_in: u64,
    pub resets_out: u64,
}

#[derive(Debug)]
struct Stream {
    /// We may still send on it.
    local_open: bool,
    /// The peer may still send on it.
    remote_open: bool,
    /// We opened it.
    ours: bool,
    /// SYN_REPLY sent (peer's stream) or received (ours).
    replied: bool,
}

/// Where the input parser is.
#[derive(Debug, Clone, Copy)]
enum ReadState {
    /// At a frame boundary.
    Header,
    /// Inside a DATA frame's payload; `deliver` false means skip it.
    Data {
        stream_id: StreamId,
        remaining: usize,
        fin: bool,
        deliver: bool,
    },
}

/// One SPDY/3.1 session. See the module docs.
pub struct Session {
    role: Role,
    streams: HashMap<StreamId, Stream>,
    /// Open streams by initiator, for the concurrency limits.
    ours_open: usize,
    theirs_open: usize,
    next_stream_id: StreamId,
    last_peer_stream_id: StreamId,
    next_ping_id: u32,
    encoder: HeaderEncoder,
    decoder: HeaderDecoder,
    tx: BytesMut,
    read: ReadState,
    recent_resets: VecDeque<StreamId>,
    goaway_sent: bool,
    goaway_received: bool,
    failed: bool,
    stats: Stats,
}

impl Session {
    pub fn new(role: Role) -> Self {
        let first = match role {
            Role::Client => 1,
            Role::Server => 2,
        };
        Session {
            role,
            streams: HashMap::new(),
            ours_open: 0,
            theirs_open: 0,
            next_stream_id: first,
            last_peer_stream_id: 0,
            next_ping_id: first,
            encoder: HeaderEncoder::new(),
            decoder: HeaderDecoder::new(),
            tx: BytesMut::new(),
            read: ReadState::Header,
            recent_resets: VecDeque::new(),
            goaway_sent: false,
            goaway_received: false,
            failed: false,
            stats: Stats::default(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Streams currently tracked (open in at least one direction).
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Streams this side may still open before [`MAX_CONCURRENT_STREAMS`] (zero after a GOAWAY
    /// either way).
    pub fn streams_we_can_open(&self) -> usize {
        if self.goaway_sent || self.goaway_received {
            return 0;
        }
        MAX_CONCURRENT_STREAMS - self.ours_open
    }

    /// The stream is still tracked: open in at least one direction and not reset.
    pub fn is_open(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    /// We may still send on the stream.
    pub fn can_send(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| s.local_open)
    }

    /// The peer sent GOAWAY: open no more streams.
    pub fn goaway_received(&self) -> bool {
        self.goaway_received
    }

    fn is_ours(&self, id: StreamId) -> bool {
        (id % 2 == 1) == (self.role == Role::Client)
    }

    /// The id was opened at some point (so a frame for it now means "closed", not "never").
    fn was_opened(&self, id: StreamId) -> bool {
        if self.is_ours(id) {
            id < self.next_stream_id
        } else {
            id <= self.last_peer_stream_id
        }
    }

    fn remove_stream(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&id)?;
        if s.ours {
            self.ours_open -= 1;
        } else {
            self.theirs_open -= 1;
        }
        Some(s)
    }

    fn close_local(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.local_open = false;
            if !s.remote_open {
                self.remove_stream(id);
            }
        }
    }

    fn close_remote(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.remote_open = false;
            if !s.local_open {
                self.remove_stream(id);
            }
        }
    }

    fn queue(&mut self, frame: &ControlFrame) {
        let before = self.tx.len();
        frame.encode(&mut self.tx);
        self.stats.frames_out += 1;
        self.stats.bytes_out += (self.tx.len() - before) as u64;
    }

    fn queue_rst(&mut self, stream_id: StreamId, status: u32) {
        self.queue(&ControlFrame::RstStream { stream_id, status });
        self.stats.resets_out += 1;
        self.remember_reset(stream_id);
    }

    fn remember_reset(&mut self, id: StreamId) {
        if self.recent_resets.contains(&id) {
            return;
        }
        if self.recent_resets.len() == RECENT_RESETS {
            self.recent_resets.pop_front();
        }
        self.recent_resets.push_back(id);
    }

    /// A frame for a stream we do not track: answer with one RST_STREAM, unless we already
    /// reset that id (then the frame was in flight and is dropped).
    fn stray(&mut self, id: StreamId) {
        if self.recent_resets.contains(&id) {
            return;
        }
        let status = if self.was_opened(id) {
            rst::STREAM_ALREADY_CLOSED
        } else {
            rst::INVALID_STREAM
        };
        self.queue_rst(id, status);
    }

    /// The peer broke a rule of a live stream: reset it and tell the caller.
    fn kill(&mut self, stream_id: StreamId, status: u32) -> SpdyEvent {
        self.remove_stream(stream_id);
        self.queue_rst(stream_id, status);
        SpdyEvent::Reset {
            stream_id,
            status,
            by_peer: false,
        }
    }

    /// Record a session-fatal error: queue a GOAWAY for the caller to flush, refuse more input.
    fn fatal(&mut self, e: SpdyError) -> SpdyError {
        self.failed = true;
        if !self.goaway_sent {
            self.goaway_sent = true;
            let last = self.last_peer_stream_id;
            self.queue(&ControlFrame::GoAway {
                last_good_stream_id: last,
                status: goaway::PROTOCOL_ERROR,
            });
        }
        e
    }

    /// Consume bytes from the front of `buf`; return the next event, or `None` when `buf` holds
    /// no complete event. An error is fatal for the session (a GOAWAY is queued for sending).
    pub fn handle_input(&mut self, buf: &mut BytesMut) -> Result<Option<SpdyEvent>, SpdyError> {
        if self.failed {
            return Err(SpdyError::Failed);
        }
        match self.input(buf) {
            Ok(ev) => Ok(ev),
            Err(e) => Err(self.fatal(e)),
        }
    }

    fn input(&mut self, buf: &mut BytesMut) -> Result<Option<SpdyEvent>, SpdyError> {
        loop {
            if let ReadState::Data {
                stream_id,
                remaining,
                fin,
                deliver,
            } = self.read
            {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = remaining.min(buf.len());
                let data = buf.split_to(n).freeze();
                let remaining = remaining - n;
                self.stats.bytes_in += n as u64;
                self.stats.data_bytes_in += n as u64;
                self.read = if remaining == 0 {
                    ReadState::Header
                } else {
                    ReadState::Data {
                        stream_id,
                        remaining,
                        fin,
                        deliver,
                    }
                };
                // The caller may have reset the stream between two pieces of one frame.
                if deliver && self.streams.contains_key(&stream_id) {
                    let fin = fin && remaining == 0;
                    if fin {
                        self.close_remote(stream_id);
                    }
                    return Ok(Some(SpdyEvent::Data {
                        stream_id,
                        data,
                        fin,
                    }));
                }
                continue;
            }

            if buf.len() < FRAME_HEADER_LEN {
                return Ok(None);
            }
            let header = FrameHeader::parse(buf[..FRAME_HEADER_LEN].try_into().expect("8 bytes"));
            match header {
                FrameHeader::Control {
                    version,
                    kind,
                    flags,
                    len,
                } => {
                    if version != VERSION {
                        return Err(SpdyError::UnsupportedVersion(version));
                    }
                    if len > MAX_CONTROL_FRAME_LEN {
                        return Err(SpdyError::ControlFrameTooLarge {
                            len,
                            max: MAX_CONTROL_FRAME_LEN,
                        });
                    }
                    let total = FRAME_HEADER_LEN + len;
                    if buf.len() < total {
                        buf.reserve(total - buf.len());
                        return Ok(None);
                    }
                    let mut frame = buf.split_to(total).freeze();
                    frame.advance(FRAME_HEADER_LEN);
                    self.stats.frames_in += 1;
                    self.stats.bytes_in += total as u64;
                    let frame = ControlFrame::parse(kind, flags, frame)?;
                    if let Some(ev) = self.on_control(frame)? {
                        return Ok(Some(ev));
                    }
                }
                FrameHeader::Data {
                    stream_id,
                    flags,
                    len,
                } => {
                    if stream_id == 0 {
                        return Err(SpdyError::StreamIdViolation {
                            id: 0,
                            reason: "DATA on stream 0",
                        });
                    }
                    buf.advance(FRAME_HEADER_LEN);
                    self.stats.frames_in += 1;
                    self.stats.bytes_in += FRAME_HEADER_LEN as u64;
                    let fin = flags & FLAG_FIN != 0;
                    let mut event = None;
                    let deliver = match self.streams.get(&stream_id) {
                        Some(s) if s.remote_open => true,
                        Some(_) => {
                            // DATA after the peer's own FIN: a stream error (draft 3, 2.2.2).
                            event = Some(self.kill(stream_id, rst::STREAM_ALREADY_CLOSED));
                            false
                        }
                        None => {
                            self.stray(stream_id);
                            false
                        }
                    };
                    if len > 0 {
                        self.read = ReadState::Data {
                            stream_id,
                            remaining: len,
                            fin,
                            deliver,
                        };
                    } else if deliver && fin {
                        self.close_remote(stream_id);
                        return Ok(Some(SpdyEvent::Data {
                            stream_id,
                            data: Bytes::new(),
                            fin: true,
                        }));
                    }
                    if event.is_some() {
                        return Ok(event);
                    }
                }
            }
        }
    }

    /// The DATA payload the parser is inside of, if it will be delivered: its stream and the
    /// bytes of it not yet consumed. A caller that can move payload without reading it (splice)
    /// moves up to that many bytes itself and reports them with [`data_moved`](Self::data_moved).
    pub fn data_in_progress(&self) -> Option<(StreamId, usize)> {
        match self.read {
            ReadState::Data {
                stream_id,
                remaining,
                deliver: true,
                ..
            } if self.streams.contains_key(&stream_id) => Some((stream_id, remaining)),
            _ => None,
        }
    }

    /// `n` bytes of the payload [`data_in_progress`](Self::data_in_progress) reported went to
    /// their destination without passing through [`handle_input`](Self::handle_input). Returns
    /// the event `handle_input` would have returned for them, with empty `data` (it matters only
    /// when it carries the frame's FIN). Moving more than is left is a caller bug and is refused.
    pub fn data_moved(&mut self, n: usize) -> Result<Option<SpdyEvent>, SpdyError> {
        let Some((stream_id, remaining)) = self.data_in_progress() else {
            return Err(SpdyError::Misuse("payload moved outside a DATA frame"));
        };
        if n > remaining {
            return Err(SpdyError::Misuse("moved more payload than the frame holds"));
        }
        let ReadState::Data { fin, .. } = self.read else {
            unreachable!("data_in_progress checked the state")
        };
        self.stats.bytes_in += n as u64;
        self.stats.data_bytes_in += n as u64;
        let remaining = remaining - n;
        if remaining > 0 {
            self.read = ReadState::Data {
                stream_id,
                remaining,
                fin,
                deliver: true,
            };
            return Ok(None);
        }
        self.read = ReadState::Header;
        if fin {
            self.close_remote(stream_id);
        }
        Ok(fin.then_some(SpdyEvent::Data {
            stream_id,
            data: Bytes::new(),
            fin,
        }))
    }

    /// How many bytes to read next so that no payload a caller could move itself is pulled
    /// into its buffer: up to the end of the next frame header (or of the control frame it
    /// starts), or to the end of a payload that is not delivered plus the header after it.
    /// `buffered` is what the caller holds unconsumed.
    pub fn read_hint(&self, buffered: &[u8]) -> usize {
        let have = buffered.len();
        match self.read {
            ReadState::Data { remaining, .. } => {
                (remaining + FRAME_HEADER_LEN).saturating_sub(have).max(1)
            }
            ReadState::Header if have < FRAME_HEADER_LEN => FRAME_HEADER_LEN - have,
            ReadState::Header => {
                let h: &[u8; FRAME_HEADER_LEN] =
                    buffered[..FRAME_HEADER_LEN].try_into().expect("8 bytes");
                match FrameHeader::parse(h) {
                    FrameHeader::Control { len, .. } => {
                        (FRAME_HEADER_LEN + len).saturating_sub(have).max(1)
                    }
                    FrameHeader::Data { .. } => 1,
                }
            }
        }
    }

    fn on_control(&mut self, frame: ControlFrame) -> Result<Option<SpdyEvent>, SpdyError> {
        Ok(match frame {
            ControlFrame::SynStream {
                stream_id,
                associated_id,
                priority,
                flags,
                header_block,
                ..
            } => {
                // Always inflate first: the compression context spans the whole session.
                let headers = self.decoder.decode(&header_block)?;
                if stream_id == 0 {
                    return Err(SpdyError::StreamIdViolation {
                        id: 0,
                        reason: "SYN_STREAM for stream 0",
                    });
                }
                if self.is_ours(stream_id) {
                    return Err(SpdyError::StreamIdViolation {
                        id: stream_id,
                        reason: "peer used our stream id parity",
                    });
                }
                if stream_id <= self.last_peer_stream_id {
                    return Err(SpdyError::StreamIdViolation {
                        id: stream_id,
                        reason: "stream ids must increase",
                    });
                }
                self.last_peer_stream_id = stream_id;
                if self.goaway_sent || self.theirs_open >= MAX_CONCURRENT_STREAMS {
                    self.queue_rst(stream_id, rst::REFUSED_STREAM);
                    return Ok(None);
                }
                let fin = flags & FLAG_FIN != 0;
                let unidirectional = flags & FLAG_UNIDIRECTIONAL != 0;
                if !(fin && unidirectional) {
                    self.streams.insert(
                        stream_id,
                        Stream {
                            local_open: !unidirectional,
                            remote_open: !fin,
                            ours: false,
                            replied: false,
                        },
                    );
                    self.theirs_open += 1;
                }
                Some(SpdyEvent::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    headers,
                    fin,
                    unidirectional,
                })
            }
            ControlFrame::SynReply {
                stream_id,
                flags,
                header_block,
            } => {
                let headers = self.decoder.decode(&header_block)?;
                if stream_id == 0 {
                    return Err(SpdyError::StreamIdViolation {
                        id: 0,
                        reason: "SYN_REPLY for stream 0",
                    });
                }
                let fin = flags & FLAG_FIN != 0;
                match self.streams.get_mut(&stream_id) {
                    Some(s) if s.ours && !s.replied => {
                        s.replied = true;
                        if fin {
                            self.close_remote(stream_id);
                        }
                        Some(SpdyEvent::SynReply {
                            stream_id,
                            headers,
                            fin,
                        })
                    }
                    // A second reply, or a reply to the peer's own stream (draft 3, 2.6.2).
                    Some(s) if s.ours => Some(self.kill(stream_id, rst::STREAM_IN_USE)),
                    Some(_) => Some(self.kill(stream_id, rst::PROTOCOL_ERROR)),
                    None => {
                        self.stray(stream_id);
                        None
                    }
                }
            }
            ControlFrame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                let headers = self.decoder.decode(&header_block)?;
                let fin = flags & FLAG_FIN != 0;
                match self.streams.get(&stream_id) {
                    Some(s) if s.remote_open => {
                        if fin {
                            self.close_remote(stream_id);
                        }
                        Some(SpdyEvent::Headers {
                            stream_id,
                            headers,
                            fin,
                        })
                    }
                    Some(_) => Some(self.kill(stream_id, rst::STREAM_ALREADY_CLOSED)),
                    None => {
                        self.stray(stream_id);
                        None
                    }
                }
            }
            ControlFrame::RstStream { stream_id, status } => {
                self.stats.resets_in += 1;
                // Never answer a RST with a RST; one for an unknown stream is just dropped.
                self.remember_reset(stream_id);
                self.remove_stream(stream_id).map(|_| SpdyEvent::Reset {
                    stream_id,
                    status,
                    by_peer: true,
                })
            }
            ControlFrame::Settings { flags, entries } => {
                Some(SpdyEvent::Settings { flags, entries })
            }
            ControlFrame::Ping { id } => {
                if (id % 2 == 1) == (self.role == Role::Client) {
                    Some(SpdyEvent::Pong { id })
                } else {
                    self.queue(&ControlFrame::Ping { id });
                    None
                }
            }
            ControlFrame::GoAway {
                last_good_stream_id,
                status,
            } => {
                self.goaway_received = true;
                Some(SpdyEvent::GoAway {
                    last_good_stream_id,
                    status,
                })
            }
            ControlFrame::WindowUpdate { stream_id, delta } => {
                Some(SpdyEvent::WindowUpdate { stream_id, delta })
            }
            ControlFrame::Unknown { .. } => None,
        })
    }

    /// Open a stream (SYN_STREAM). `fin` half-closes it at once (we will send nothing on it).
    pub fn open(&mut self, headers: &Headers, fin: bool) -> Result<StreamId, SpdyError> {
        if self.goaway_sent || self.goaway_received {
            return Err(SpdyError::GoingAway);
        }
        if self.ours_open >= MAX_CONCURRENT_STREAMS {
            return Err(SpdyError::TooManyStreams {
                max: MAX_CONCURRENT_STREAMS,
            });
        }
        let stream_id = self.next_stream_id;
        if stream_id > MAX_STREAM_ID {
            return Err(SpdyError::StreamIdsExhausted);
        }
        let mut block = BytesMut::new();
        self.encoder.encode(headers, &mut block)?;
        let flags = if fin { FLAG_FIN } else { 0 };
        self.queue(&ControlFrame::SynStream {
            stream_id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            flags,
            header_block: block.freeze(),
        });
        self.next_stream_id += 2;
        self.streams.insert(
            stream_id,
            Stream {
                local_open: !fin,
                remote_open: true,
                ours: true,
                replied: false,
            },
        );
        self.ours_open += 1;
        Ok(stream_id)
    }

    /// Accept a stream the peer opened (SYN_REPLY). `fin` half-closes it.
    pub fn reply(
        &mut self,
        stream_id: StreamId,
        headers: &Headers,
        fin: bool,
    ) -> Result<(), SpdyError> {
        match self.streams.get(&stream_id) {
            None => return Err(SpdyError::UnknownStream(stream_id)),
            Some(s) if s.ours || s.replied || !s.local_open => {
                return Err(SpdyError::StreamClosed(stream_id));
            }
            Some(_) => {}
        }
        let mut block = BytesMut::new();
        self.encoder.encode(headers, &mut block)?;
        let flags = if fin { FLAG_FIN } else { 0 };
        self.queue(&ControlFrame::SynReply {
            stream_id,
            flags,
            header_block: block.freeze(),
        });
        if let Some(s) = self.streams.get_mut(&stream_id) {
            s.replied = true;
        }
        if fin {
            self.close_local(stream_id);
        }
        Ok(())
    }

    /// Abort a stream (RST_STREAM) and forget it. A stream we already reset is not reset again.
    pub fn reset(&mut self, stream_id: StreamId, status: u32) {
        let known = self.remove_stream(stream_id).is_some();
        if known || !self.recent_resets.contains(&stream_id) {
            self.queue_rst(stream_id, status);
        }
    }

    /// Check and record a DATA frame of `len` payload bytes on `stream_id`, and return its
    /// 8-byte header for the caller to send in front of the payload. `fin` (with `len` 0 for a
    /// bare half-close) ends our side of the stream. No flow-control window is consulted.
    pub fn data_header(
        &mut self,
        stream_id: StreamId,
        len: usize,
        fin: bool,
    ) -> Result<[u8; 8], SpdyError> {
        if len > MAX_DATA_PAYLOAD {
            return Err(SpdyError::PayloadTooLarge {
                len,
                max: MAX_DATA_PAYLOAD,
            });
        }
        match self.streams.get(&stream_id) {
            None => return Err(SpdyError::UnknownStream(stream_id)),
            Some(s) if !s.local_open => return Err(SpdyError::StreamClosed(stream_id)),
            Some(_) => {}
        }
        if fin {
            self.close_local(stream_id);
        }
        self.stats.frames_out += 1;
        self.stats.bytes_out += (FRAME_HEADER_LEN + len) as u64;
        self.stats.data_bytes_out += len as u64;
        Ok(data_header(stream_id, if fin { FLAG_FIN } else { 0 }, len))
    }

    /// Queue a DATA frame with a copy of `data` (for small payloads such as error text; bulk
    /// payload should use [`data_header`](Self::data_header) and avoid the copy).
    pub fn send_data(
        &mut self,
        stream_id: StreamId,
        data: &[u8],
        fin: bool,
    ) -> Result<(), SpdyError> {
        let header = self.data_header(stream_id, data.len(), fin)?;
        self.tx.extend_from_slice(&header);
        self.tx.extend_from_slice(data);
        Ok(())
    }

    /// Queue a PING; the answer comes back as [`SpdyEvent::Pong`] with the returned id.
    pub fn ping(&mut self) -> u32 {
        let id = self.next_ping_id;
        // Ids keep our parity and skip 0 on wrap-around (moby/spdystream rejects PING 0).
        self.next_ping_id = match id.wrapping_add(2) {
            0 => 2,
            n => n,
        };
        self.queue(&ControlFrame::Ping { id });
        id
    }

    /// Queue a GOAWAY (once); no streams are opened or accepted afterwards.
    pub fn goaway(&mut self, status: u32) {
        if self.goaway_sent {
            return;
        }
        self.goaway_sent = true;
        let last = self.last_peer_stream_id;
        self.queue(&ControlFrame::GoAway {
            last_good_stream_id: last,
            status,
        });
    }

    /// Everything queued for sending since the last call, if anything.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.tx.is_empty() {
            None
        } else {
            Some(self.tx.split().freeze())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fuzz::{Rng, push_merged};
    use super::super::headers::MAX_HEADER_BLOCK_LEN;
    use super::*;

    fn drain(s: &mut Session) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = s.poll_transmit() {
            out.extend_from_slice(&b);
        }
        out
    }

    /// Feed `input` in pieces cut at `cuts`; collect events (DATA pieces merged per frame
    /// boundary so splits compare equal), the final error and what was transmitted.
    fn run(role: Role, input: &[u8], cuts: &[usize]) -> (Vec<SpdyEvent>, Option<String>, Vec<u8>) {
        let mut s = Session::new(role);
        let mut buf = BytesMut::new();
        let mut events: Vec<SpdyEvent> = Vec::new();
        let mut tx = Vec::new();
        let mut last = 0;
        let mut err = None;
        'outer: for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[last..cut]);
            last = cut;
            loop {
                match s.handle_input(&mut buf) {
                    Ok(Some(ev)) => push_merged(&mut events, ev),
                    Ok(None) => break,
                    Err(e) => {
                        err = Some(e.to_string());
                        break 'outer;
                    }
                }
            }
        }
        tx.extend(drain(&mut s));
        (events, err, tx)
    }

    fn client_frames() -> (Vec<u8>, Vec<SpdyEvent>) {
        // A server talking to a client: reply to streams 1 and 3, data, ping, etc.
        let mut server = Session::new(Role::Server);
        let mut client = Session::new(Role::Client);
        let h = Headers::new().with("streamtype", "data").with("port", "80");
        let s1 = client.open(&h, false).unwrap();
        let s3 = client.open(&h, true).unwrap();
        let mut wire = BytesMut::from(&drain(&mut client)[..]);
        while let Some(_ev) = server.handle_input(&mut wire).unwrap() {}
        server.reply(s1, &Headers::new(), false).unwrap();
        server
            .reply(s3, &Headers::new().with("x", "y"), false)
            .unwrap();
        server.send_data(s1, b"hello", false).unwrap();
        server.send_data(s3, &[7u8; 3000], true).unwrap();
        let ping = server.ping();
        assert_eq!(ping, 2);
        let mut out = drain(&mut server);
        // A peer PING (odd) answer comes back as Pong; a server-initiated one (even) is echoed.
        ControlFrame::Ping { id: 1 }.encode(&mut BytesMut::new());
        let mut extra = BytesMut::new();
        ControlFrame::Ping { id: 1 }.encode(&mut extra);
        ControlFrame::Settings {
            flags: 0,
            entries: vec![Setting {
                flags: 0,
                id: 4,
                value: 10,
            }],
        }
        .encode(&mut extra);
        ControlFrame::WindowUpdate {
            stream_id: 1,
            delta: 100,
        }
        .encode(&mut extra);
        // Unknown control type 10 (CREDENTIAL) with a 4-byte body: skipped.
        extra.extend_from_slice(&[0x80, 0x03, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
        extra.extend_from_slice(&data_header(s1, FLAG_FIN, 0));
        // DATA for a stream that never existed: RST queued, payload skipped, not fatal.
        extra.extend_from_slice(&data_header(99, 0, 4));
        extra.extend_from_slice(b"junk");
        ControlFrame::RstStream {
            stream_id: 3,
            status: rst::CANCEL,
        }
        .encode(&mut extra);
        ControlFrame::GoAway {
            last_good_stream_id: 0,
            status: 0,
        }
        .encode(&mut extra);
        out.extend_from_slice(&extra);
        let expected = vec![
            SpdyEvent::SynReply {
                stream_id: 1,
                headers: Headers::new(),
                fin: false,
            },
            SpdyEvent::SynReply {
                stream_id: 3,
                headers: Headers::new().with("x", "y"),
                fin: false,
            },
            SpdyEvent::Data {
                stream_id: 1,
                data: Bytes::from_static(b"hello"),
                fin: false,
            },
            SpdyEvent::Data {
                stream_id: 3,
                data: Bytes::from(vec![7u8; 3000]),
                fin: true,
            },
            // The server's PING 2 is echoed (see tx), not reported.
            SpdyEvent::Pong { id: 1 },
            SpdyEvent::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 0,
                    id: 4,
                    value: 10,
                }],
            },
            SpdyEvent::WindowUpdate {
                stream_id: 1,
                delta: 100,
            },
            SpdyEvent::Data {
                stream_id: 1,
                data: Bytes::new(),
                fin: true,
            },
            // Stream 3 is closed both ways by now: its RST is dropped, no event.
            SpdyEvent::GoAway {
                last_good_stream_id: 0,
                status: 0,
            },
        ];
        (out, expected)
    }

    /// A client session that already opened streams 1 and 3 (their SYN_STREAMs are only needed
    /// for the state, so they are produced and discarded here).
    fn primed_client() -> Session {
        let mut c = Session::new(Role::Client);
        let h = Headers::new().with("streamtype", "data").with("port", "80");
        c.open(&h, false).unwrap();
        c.open(&h, true).unwrap();
        drain(&mut c);
        c
    }

    fn run_primed(input: &[u8], cuts: &[usize]) -> (Vec<SpdyEvent>, Option<String>, Vec<u8>) {
        let mut s = primed_client();
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut last = 0;
        let mut err = None;
        'outer: for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[last..cut]);
            last = cut;
            loop {
                match s.handle_input(&mut buf) {
                    Ok(Some(ev)) => push_merged(&mut events, ev),
                    Ok(None) => break,
                    Err(e) => {
                        err = Some(e.to_string());
                        break 'outer;
                    }
                }
            }
        }
        (events, err, drain(&mut s))
    }

    #[test]
    fn client_sees_expected_events() {
        let (input, expected) = client_frames();
        let (events, err, tx) = run_primed(&input, &[]);
        assert_eq!(err, None);
        assert_eq!(events, expected);
        // tx: echo of PING 2, then RST_STREAM(99, INVALID_STREAM).
        let mut want = BytesMut::new();
        ControlFrame::Ping { id: 2 }.encode(&mut want);
        ControlFrame::RstStream {
            stream_id: 99,
            status: rst::INVALID_STREAM,
        }
        .encode(&mut want);
        assert_eq!(tx, want.to_vec());
    }

    #[test]
    fn every_split_point_gives_same_events() {
        let (input, expected) = client_frames();
        let (_, _, want_tx) = run_primed(&input, &[]);
        for cut in 0..=input.len() {
            let (events, err, tx) = run_primed(&input, &[cut]);
            assert_eq!(err, None, "cut {cut}");
            assert_eq!(events, expected, "cut {cut}");
            assert_eq!(tx, want_tx, "cut {cut}");
        }
        // Byte by byte.
        let cuts: Vec<usize> = (1..input.len()).collect();
        let (events, err, tx) = run_primed(&input, &cuts);
        assert_eq!((events, err, tx), (expected.clone(), None, want_tx.clone()));
        // Random multi-way splits.
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let mut cuts: Vec<usize> = (0..rng.below(20))
                .map(|_| rng.below(input.len() + 1))
                .collect();
            cuts.sort();
            let (events, err, tx) = run_primed(&input, &cuts);
            assert_eq!((events, err, tx), (expected.clone(), None, want_tx.clone()));
        }
    }

    #[test]
    fn data_is_streamed_not_buffered() {
        let mut s = primed_client();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&data_header(1, FLAG_FIN, 10_000_000));
        buf.extend_from_slice(&[1u8; 1000]);
        let ev = s.handle_input(&mut buf).unwrap().unwrap();
        assert_eq!(
            ev,
            SpdyEvent::Data {
                stream_id: 1,
                data: Bytes::from(vec![1u8; 1000]),
                fin: false
            }
        );
        assert!(buf.is_empty());
        assert_eq!(s.handle_input(&mut buf).unwrap(), None);
        buf.extend_from_slice(&vec![2u8; 10_000_000 - 1000]);
        let ev = s.handle_input(&mut buf).unwrap().unwrap();
        let SpdyEvent::Data {
            data, fin: true, ..
        } = ev
        else {
            panic!("{ev:?}")
        };
        assert_eq!(data.len(), 10_000_000 - 1000);
        assert!(s.is_open(1)); // our side still open
        assert!(s.can_send(1));
    }

    /// A caller that splices payload: the hint never reaches into a payload, what it moves is
    /// accounted as if read, the FIN comes with the last moved byte, and the next frame parses.
    #[test]
    fn payload_moved_by_the_caller() {
        let mut s = primed_client();
        let mut ping = BytesMut::new();
        ControlFrame::Ping { id: 8 }.encode(&mut ping);
        let mut buf = BytesMut::new();
        assert_eq!(s.read_hint(&buf), FRAME_HEADER_LEN);
        buf.extend_from_slice(&ping[..3]);
        assert_eq!(s.read_hint(&buf), FRAME_HEADER_LEN - 3);
        buf.extend_from_slice(&ping[3..8]);
        assert_eq!(
            s.read_hint(&buf),
            ping.len() - 8,
            "the rest of the control frame"
        );
        buf.extend_from_slice(&ping[8..]);
        assert!(s.handle_input(&mut buf).unwrap().is_none()); // the peer's PING: answered
        assert!(s.data_in_progress().is_none());
        buf.extend_from_slice(&data_header(1, FLAG_FIN, 5000));
        buf.extend_from_slice(&[9u8; 100]);
        assert!(matches!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Data {
                stream_id: 1,
                fin: false,
                ..
            })
        ));
        assert_eq!(s.data_in_progress(), Some((1, 4900)));
        assert!(s.data_moved(4901).is_err(), "more than the frame holds");
        assert_eq!(s.data_moved(900).unwrap(), None);
        assert_eq!(s.data_in_progress(), Some((1, 4000)));
        assert_eq!(
            s.data_moved(4000).unwrap(),
            Some(SpdyEvent::Data {
                stream_id: 1,
                data: Bytes::new(),
                fin: true
            })
        );
        assert!(s.data_in_progress().is_none());
        assert!(s.data_moved(1).is_err(), "outside a frame");
        assert_eq!(s.stats().data_bytes_in, 5000);
        // The peer's FIN closed its side: a second frame on stream 1 is not ours to move.
        buf.extend_from_slice(&data_header(1, 0, 10));
        let _ = s.handle_input(&mut buf).unwrap();
        assert!(s.data_in_progress().is_none());
        assert_eq!(
            s.read_hint(&buf),
            10 + FRAME_HEADER_LEN,
            "skip it, then a header"
        );
    }

    #[test]
    fn server_accepts_and_refuses_streams() {
        let mut c = Session::new(Role::Client);
        let mut s = Session::new(Role::Server);
        let h = Headers::new().with("a", "b");
        for _ in 0..3 {
            c.open(&h, false).unwrap();
        }
        let mut wire = BytesMut::from(&drain(&mut c)[..]);
        for id in [1, 3, 5] {
            match s.handle_input(&mut wire).unwrap() {
                Some(SpdyEvent::SynStream {
                    stream_id,
                    headers,
                    fin: false,
                    ..
                }) => {
                    assert_eq!(stream_id, id);
                    assert_eq!(headers, h);
                }
                other => panic!("{other:?}"),
            }
        }
        // Reply twice is refused locally.
        s.reply(1, &Headers::new(), false).unwrap();
        assert!(s.reply(1, &Headers::new(), false).is_err());
        assert!(s.reply(2, &Headers::new(), false).is_err());
        // After our GOAWAY, new peer streams are refused (but their headers still inflated, so
        // the next block still decodes).
        s.goaway(goaway::OK);
        c.open(&h, false).unwrap();
        c.open(&h, false).unwrap();
        let mut wire = BytesMut::from(&drain(&mut c)[..]);
        assert_eq!(s.handle_input(&mut wire).unwrap(), None);
        assert!(wire.is_empty());
        let mut want = BytesMut::new();
        ControlFrame::SynReply {
            stream_id: 1,
            flags: 0,
            header_block: Bytes::new(),
        }
        .encode(&mut want);
        let tx = drain(&mut s);
        // SYN_REPLY(1) (block is compressed: skip exact compare), GOAWAY, RST 7, RST 9.
        let mut tail = BytesMut::new();
        ControlFrame::GoAway {
            last_good_stream_id: 5,
            status: 0,
        }
        .encode(&mut tail);
        ControlFrame::RstStream {
            stream_id: 7,
            status: rst::REFUSED_STREAM,
        }
        .encode(&mut tail);
        ControlFrame::RstStream {
            stream_id: 9,
            status: rst::REFUSED_STREAM,
        }
        .encode(&mut tail);
        assert!(tx.ends_with(&tail), "{tx:?}");
        assert!(s.open(&h, false).is_err());
    }

    #[test]
    fn concurrency_limit_refuses() {
        let mut c = Session::new(Role::Client);
        let mut s = Session::new(Role::Server);
        let h = Headers::new();
        let mut wire = BytesMut::new();
        for _ in 0..MAX_CONCURRENT_STREAMS {
            c.open(&h, false).unwrap();
        }
        wire.extend_from_slice(&drain(&mut c));
        let mut accepted = 0;
        while let Some(ev) = s.handle_input(&mut wire).unwrap() {
            assert!(matches!(ev, SpdyEvent::SynStream { .. }));
            accepted += 1;
        }
        assert_eq!(accepted, MAX_CONCURRENT_STREAMS);
        assert!(
            c.open(&h, false).is_err(),
            "client enforces the same limit on itself"
        );
        // Forge one more SYN_STREAM with the client's compressor: refused, not fatal.
        let mut block = BytesMut::new();
        c.encoder.encode(&h, &mut block).unwrap();
        let id = 2 * MAX_CONCURRENT_STREAMS as u32 + 1;
        ControlFrame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            slot: 0,
            flags: 0,
            header_block: block.freeze(),
        }
        .encode(&mut wire);
        drain(&mut s);
        assert_eq!(s.handle_input(&mut wire).unwrap(), None);
        let mut want = BytesMut::new();
        ControlFrame::RstStream {
            stream_id: id,
            status: rst::REFUSED_STREAM,
        }
        .encode(&mut want);
        assert_eq!(drain(&mut s), want.to_vec());
    }

    #[test]
    fn fatal_errors() {
        let fatal = |role: Role, bytes: &[u8]| {
            let mut s = Session::new(role);
            let mut buf = BytesMut::from(bytes);
            let r = loop {
                match s.handle_input(&mut buf) {
                    Ok(Some(_)) => continue,
                    other => break other,
                }
            };
            assert!(r.is_err(), "{bytes:?} gave {r:?}");
            // A GOAWAY(PROTOCOL_ERROR) is queued, and the session stays failed.
            let tx = drain(&mut s);
            assert_eq!(&tx[..4], &[0x80, 0x03, 0x00, 0x07]);
            assert_eq!(&tx[tx.len() - 4..], &[0, 0, 0, 1]);
            assert!(s.handle_input(&mut BytesMut::new()).is_err());
        };
        // Version 2 PING.
        fatal(
            Role::Client,
            &[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1],
        );
        // Oversize control frame: rejected from the header alone.
        let len = MAX_CONTROL_FRAME_LEN + 1;
        fatal(
            Role::Client,
            &[
                0x80,
                0x03,
                0x00,
                0x01,
                0,
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
            ],
        );
        // DATA on stream 0.
        fatal(Role::Client, &[0, 0, 0, 0, 0, 0, 0, 0]);
        // Malformed PING length.
        fatal(Role::Client, &[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 2, 0, 0]);
        // SYN_STREAM with garbage header block.
        fatal(
            Role::Server,
            &[
                0x80, 0x03, 0x00, 0x01, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad,
            ],
        );
        // A client receiving an odd (client-parity) stream id.
        let mut c = Session::new(Role::Client);
        c.open(&Headers::new(), false).unwrap();
        fatal(Role::Client, &drain(&mut c));
    }

    #[test]
    fn repeated_stream_id_is_fatal() {
        let mut c = Session::new(Role::Client);
        let mut wire = BytesMut::new();
        for _ in 0..2 {
            let mut block = BytesMut::new();
            c.encoder.encode(&Headers::new(), &mut block).unwrap();
            ControlFrame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                slot: 0,
                flags: 0,
                header_block: block.freeze(),
            }
            .encode(&mut wire);
        }
        let mut s = Session::new(Role::Server);
        assert!(matches!(
            s.handle_input(&mut wire),
            Ok(Some(SpdyEvent::SynStream { stream_id: 1, .. }))
        ));
        assert!(matches!(
            s.handle_input(&mut wire),
            Err(SpdyError::StreamIdViolation { id: 1, .. })
        ));
    }

    #[test]
    fn data_after_fin_resets_stream() {
        let mut s = primed_client();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&data_header(1, FLAG_FIN, 1));
        buf.extend_from_slice(b"a");
        buf.extend_from_slice(&data_header(1, 0, 2));
        buf.extend_from_slice(b"bc");
        buf.extend_from_slice(&data_header(1, 0, 2));
        buf.extend_from_slice(b"de");
        assert!(matches!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Data { fin: true, .. })
        ));
        assert_eq!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Reset {
                stream_id: 1,
                status: rst::STREAM_ALREADY_CLOSED,
                by_peer: false
            })
        );
        // Further frames for the reset stream are dropped without another RST.
        assert_eq!(s.handle_input(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
        let mut want = BytesMut::new();
        ControlFrame::RstStream {
            stream_id: 1,
            status: rst::STREAM_ALREADY_CLOSED,
        }
        .encode(&mut want);
        assert_eq!(drain(&mut s), want.to_vec());
        assert!(!s.is_open(1));
    }

    #[test]
    fn local_reset_drops_in_flight_frames_silently() {
        let mut s = primed_client();
        s.reset(1, rst::CANCEL);
        s.reset(1, rst::CANCEL); // idempotent
        let mut want = BytesMut::new();
        ControlFrame::RstStream {
            stream_id: 1,
            status: rst::CANCEL,
        }
        .encode(&mut want);
        assert_eq!(drain(&mut s), want.to_vec());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&data_header(1, 0, 3));
        buf.extend_from_slice(b"xyz");
        assert_eq!(s.handle_input(&mut buf).unwrap(), None);
        assert!(s.poll_transmit().is_none());
        assert!(s.data_header(1, 1, false).is_err());
    }

    #[test]
    fn reset_mid_frame_stops_delivery() {
        let mut s = primed_client();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&data_header(1, 0, 6));
        buf.extend_from_slice(b"abc");
        assert!(matches!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Data { .. })
        ));
        s.reset(1, rst::CANCEL);
        buf.extend_from_slice(b"def");
        buf.extend_from_slice(&data_header(3, 0, 1));
        buf.extend_from_slice(b"g");
        assert_eq!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Data {
                stream_id: 3,
                data: Bytes::from_static(b"g"),
                fin: false
            })
        );
    }

    #[test]
    fn data_header_tracks_send_state() {
        let mut s = primed_client();
        assert_eq!(
            s.data_header(1, 5, false).unwrap(),
            [0, 0, 0, 1, 0, 0, 0, 5]
        );
        assert!(matches!(
            s.data_header(1, MAX_DATA_PAYLOAD + 1, false),
            Err(SpdyError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            s.data_header(3, 1, false),
            Err(SpdyError::StreamClosed(3))
        )); // opened with FIN
        assert!(matches!(
            s.data_header(5, 1, false),
            Err(SpdyError::UnknownStream(5))
        ));
        assert_eq!(s.data_header(1, 0, true).unwrap(), [0, 0, 0, 1, 1, 0, 0, 0]);
        assert!(matches!(
            s.data_header(1, 0, true),
            Err(SpdyError::StreamClosed(1))
        ));
        // Peer FIN on 1 now closes it both ways: dropped.
        let mut buf = BytesMut::from(&data_header(1, FLAG_FIN, 0)[..]);
        assert!(matches!(
            s.handle_input(&mut buf).unwrap(),
            Some(SpdyEvent::Data { fin: true, .. })
        ));
        assert!(!s.is_open(1));
        let st = s.stats();
        assert_eq!(st.data_bytes_out, 5);
        assert_eq!(st.frames_in, 1);
    }

    #[test]
    fn ping_ids_and_echo() {
        let mut c = Session::new(Role::Client);
        let mut s = Session::new(Role::Server);
        assert_eq!(c.ping(), 1);
        assert_eq!(c.ping(), 3);
        assert_eq!(s.ping(), 2);
        let mut wire = BytesMut::from(&drain(&mut c)[..]);
        assert_eq!(s.handle_input(&mut wire).unwrap(), None);
        let mut back = BytesMut::from(&drain(&mut s)[..]);
        // The server's own PING 2 first (echoed by the client), then its echoes of 1 and 3.
        assert_eq!(
            c.handle_input(&mut back).unwrap(),
            Some(SpdyEvent::Pong { id: 1 })
        );
        assert_eq!(
            c.handle_input(&mut back).unwrap(),
            Some(SpdyEvent::Pong { id: 3 })
        );
        assert_eq!(c.handle_input(&mut back).unwrap(), None);
        let mut want = BytesMut::new();
        ControlFrame::Ping { id: 2 }.encode(&mut want);
        assert_eq!(drain(&mut c), want.to_vec());
        let mut c = Session::new(Role::Client);
        c.next_ping_id = u32::MAX;
        assert_eq!(c.ping(), u32::MAX);
        assert_eq!(c.ping(), 1);
        let mut s = Session::new(Role::Server);
        s.next_ping_id = u32::MAX - 1;
        assert_eq!(s.ping(), u32::MAX - 1);
        assert_eq!(s.ping(), 2);
    }

    #[test]
    fn pong_round_trip() {
        let mut c = Session::new(Role::Client);
        let mut s = Session::new(Role::Server);
        let id = c.ping();
        let mut wire = BytesMut::from(&drain(&mut c)[..]);
        assert_eq!(s.handle_input(&mut wire).unwrap(), None);
        let mut back = BytesMut::from(&drain(&mut s)[..]);
        assert_eq!(
            c.handle_input(&mut back).unwrap(),
            Some(SpdyEvent::Pong { id })
        );
    }

    #[test]
    fn oversize_headers_refused_locally() {
        let mut c = Session::new(Role::Client);
        let big = Headers::new().with("x", "y".repeat(MAX_HEADER_BLOCK_LEN));
        assert!(c.open(&big, false).is_err());
        assert!(c.poll_transmit().is_none());
        assert_eq!(c.open(&Headers::new(), false).unwrap(), 1);
    }

    #[test]
    fn random_input_never_panics() {
        let (valid, _) = client_frames();
        let mut rng = Rng::new(42);
        for i in 0..3000 {
            let mut input = valid.clone();
            // Flip, insert or truncate a few bytes of a valid stream.
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(input.len());
                match rng.below(3) {
                    0 => input[at] ^= 1 << rng.below(8),
                    1 => input.insert(at, rng.below(256) as u8),
                    _ => input.truncate(at.max(1)),
                }
            }
            let role = if i % 2 == 0 {
                Role::Client
            } else {
                Role::Server
            };
            let cuts: Vec<usize> = {
                let mut c: Vec<usize> = (0..rng.below(5))
                    .map(|_| rng.below(input.len() + 1))
                    .collect();
                c.sort();
                c
            };
            let whole = run(role, &input, &[]);
            let split = run(role, &input, &cuts);
            assert_eq!(whole, split, "input {input:?} cuts {cuts:?}");
        }
        for _ in 0..500 {
            let input: Vec<u8> = (0..rng.below(200)).map(|_| rng.below(256) as u8).collect();
            super::super::fuzz::session_input(&input);
        }
    }
}
