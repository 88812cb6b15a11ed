//! RFC 6455 framing: frame headers, masking, and [`WsCodec`], the message-level state machine.
//!
//! This module owns the wire format below the application protocol: it validates every received
//! header (RSV bits, opcodes, masking direction, control-frame rules, length limits), reassembles
//! fragmented messages, answers pings and runs the close handshake. It knows nothing about
//! channels or ports ([`super::channel`]) and never reads the OS: client masking keys come from
//! [`MaskRng`], seeded by the caller.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    MAX_CLOSE_REASON, MAX_CONTROL_PAYLOAD, MAX_FRAME_PAYLOAD, MAX_HEADER_LEN, MAX_MESSAGE_SIZE,
    WsError,
};

/// Which end of the connection this side is. RFC 6455 §5.1: a client masks every frame it sends
/// and a server must not mask; each side fails the connection on the wrong kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// Frame opcodes defined by RFC 6455 §5.2 (everything else is reserved and fatal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(v: u8) -> Result<Self, WsError> {
        Ok(match v {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            other => return Err(WsError::UnknownOpcode(other)),
        })
    }

    /// Control frames have the high bit of the opcode set (§5.5).
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header occupies on the wire (2..=14).
    pub header_len: usize,
}

/// Parse the header at the front of `buf`: `Ok(None)` when more bytes are needed. Validates
/// everything that can be checked from the header alone (RSV bits, opcode, control-frame size
/// and fragmentation, the 64-bit length's most significant bit). Non-minimal length encodings
/// are accepted: the "MUST" of §5.2 binds the sender and rejecting them buys nothing.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    // §5.2: RSV1-3 MUST be 0 unless an extension defining them was negotiated; we negotiate none.
    if b0 & 0x70 != 0 {
        return Err(WsError::ReservedBits(b0 & 0x70));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_u8(b0 & 0x0F)?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        // §5.5: control frames are at most 125 bytes and MUST NOT be fragmented.
        if len7 as usize > MAX_CONTROL_PAYLOAD {
            // 126/127 mean an extended length follows; the exact figure doesn't matter.
            return Err(WsError::ControlTooLong(len7 as usize));
        }
        if !fin {
            return Err(WsError::FragmentedControl);
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            // §5.2: "the most significant bit MUST be 0".
            if l >> 63 != 0 {
                return Err(WsError::FrameTooLarge {
                    len: l,
                    max: MAX_FRAME_PAYLOAD,
                });
            }
            (l, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let k = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// Length of the header [`encode_header`] writes for this payload length.
pub fn header_len(payload_len: usize, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    base + if masked { 4 } else { 0 }
}

/// Write a frame header with the minimal length encoding into `dst`; returns its length.
pub fn encode_header(
    dst: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload_len: usize,
) -> usize {
    dst[0] = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = match payload_len {
        0..=125 => {
            dst[1] = mbit | payload_len as u8;
            2
        }
        126..=0xFFFF => {
            dst[1] = mbit | 126;
            dst[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            dst[1] = mbit | 127;
            dst[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        }
    };
    if let Some(k) = mask {
        dst[pos..pos + 4].copy_from_slice(&k);
        pos += 4;
    }
    pos
}

/// XOR `data` with the masking key (§5.3), starting at key position 0. Works eight bytes at a
/// time: this runs over every byte the server receives and every byte the client sends.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, hence of 4: key position 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Append a whole frame (copying `payload`) to `out`, masking it when `mask` is given.
pub fn encode_frame(
    out: &mut BytesMut,
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    let mut hdr = [0u8; MAX_HEADER_LEN];
    let hl = encode_header(&mut hdr, fin, opcode, mask, payload.len());
    out.reserve(hl + payload.len());
    out.put_slice(&hdr[..hl]);
    let start = out.len();
    out.put_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[start..], k);
    }
}

/// Whether `code` may appear in a close frame (§7.4.1, §7.4.2): the defined codes an endpoint
/// may send, and 3000-4999 (registered and private use). 1005, 1006 and 1015 are reserved for
/// reporting and never go on the wire; 1004 and 1012-1014 are unassigned by RFC 6455.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// Masking-key source for the client role: xorshift64*. RFC 6455 §5.3 wants keys an
/// intermediary cannot predict; the caller seeds this from OS randomness (`getrandom`), which
/// keeps this module free of the OS and its tests deterministic.
#[derive(Debug, Clone)]
pub struct MaskRng(u64);

impl MaskRng {
    pub fn new(seed: u64) -> Self {
        // xorshift is stuck at 0; any fixed non-zero constant will do.
        MaskRng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_key(&mut self) -> [u8; 4] {
        ((self.next_u64() >> 32) as u32).to_ne_bytes()
    }
}

/// A received close frame. `code` 1005 means the peer sent no status (§7.1.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// A complete message (or control frame) from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Bytes),
    /// Validated UTF-8.
    Text(Bytes),
    /// Already answered: a pong is queued.
    Ping(Bytes),
    Pong(Bytes),
    /// The peer started or answered the close handshake; our reply (if due) is queued.
    Close(CloseFrame),
}

/// RFC 6455 message layer for one connection, either role. Feed received bytes to
/// [`read`](Self::read); drain control frames (pongs, close replies) with
/// [`poll_transmit`](Self::poll_transmit); frame data in place with
/// [`frame_in_place`](Self::frame_in_place) or by copy with [`send`](Self::send).
pub struct WsCodec {
    role: Role,
    rng: MaskRng,
    /// Opcode and payload so far of a fragmented message in progress.
    frag: Option<(Opcode, BytesMut)>,
    tx: BytesMut,
    close_sent: bool,
    close_received: bool,
}

impl WsCodec {
    /// `mask_seed` seeds the masking keys (client role only; ignored by the server role).
    pub fn new(role: Role, mask_seed: u64) -> Self {
        WsCodec {
            role,
            rng: MaskRng::new(mask_seed),
            frag: None,
            tx: BytesMut::new(),
            close_sent: false,
            close_received: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// We sent (or queued) a close: no more data may be sent.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// The peer sent a close: it sends nothing more.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    fn next_mask(&mut self) -> Option<[u8; 4]> {
        match self.role {
            Role::Client => Some(self.rng.next_key()),
            Role::Server => None,
        }
    }

    fn queue(&mut self, opcode: Opcode, payload: &[u8]) {
        let mask = self.next_mask();
        encode_frame(&mut self.tx, true, opcode, mask, payload);
    }

    /// Control frames queued for sending, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.tx.is_empty() {
            None
        } else {
            Some(self.tx.split().freeze())
        }
    }

    /// Queue a whole data message (one frame, payload copied).
    pub fn send(&mut self, opcode: Opcode, payload: &[u8]) -> Result<(), WsError> {
        if self.close_sent {
            return Err(WsError::Closed);
        }
        self.queue(opcode, payload);
        Ok(())
    }

    /// Queue a ping; silently dropped once closing (a pong could not come back anyway).
    pub fn ping(&mut self, payload: &[u8]) {
        debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        if !self.close_sent {
            self.queue(
                Opcode::Ping,
                &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
            );
        }
    }

    /// Start (or answer) the close handshake. A no-op when a close was already sent. The reason
    /// is cut to [`MAX_CLOSE_REASON`] bytes at a character boundary.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        if !is_valid_close_code(code) {
            return Err(WsError::InvalidCloseCode(code));
        }
        if self.close_sent {
            return Ok(());
        }
        let mut cut = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut p = [0u8; MAX_CONTROL_PAYLOAD];
        p[..2].copy_from_slice(&code.to_be_bytes());
        p[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
        self.queue(Opcode::Close, &p[..2 + cut]);
        self.close_sent = true;
        Ok(())
    }

    /// Frame the payload at `buf[start..end]` as one final frame in place: the header goes right
    /// before `start` (there must be [`header_len`] bytes of room) and the client role masks the
    /// payload in place. Returns the offset where the frame starts.
    pub fn frame_in_place(
        &mut self,
        opcode: Opcode,
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> Result<usize, WsError> {
        if self.close_sent {
            return Err(WsError::Closed);
        }
        let len = end - start;
        let mask = self.next_mask();
        let mut hdr = [0u8; MAX_HEADER_LEN];
        let hl = encode_header(&mut hdr, true, opcode, mask, len);
        assert!(
            start >= hl,
            "frame_in_place: {start} bytes of headroom, header needs {hl}"
        );
        buf[start - hl..start].copy_from_slice(&hdr[..hl]);
        if let Some(k) = mask {
            apply_mask(&mut buf[start..end], k);
        }
        Ok(start - hl)
    }

    /// Consume whole frames from the front of `buf` and return the next complete message, or
    /// `Ok(None)` when more bytes are needed (a partial frame stays in `buf`, which is grown to
    /// fit it). Unfragmented data messages are zero-copy slices of `buf`. After the peer's close
    /// everything further is discarded. On error a close with [`WsError::close_code`] is queued
    /// (best effort) and the connection must be dropped after flushing it.
    pub fn read(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        match self.read_inner(buf) {
            Ok(m) => Ok(m),
            Err(e) => {
                if !self.close_sent {
                    let _ = self.close(e.close_code(), "");
                }
                Err(e)
            }
        }
    }

    fn read_inner(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            if self.close_received {
                // §5.5.1: nothing follows a close; whatever does is garbage.
                buf.clear();
                return Ok(None);
            }
            let Some(h) = parse_header(buf)? else {
                return Ok(None);
            };
            match (self.role, h.mask.is_some()) {
                (Role::Client, true) => return Err(WsError::MaskedFromServer),
                (Role::Server, false) => return Err(WsError::UnmaskedFromClient),
                _ => {}
            }
            if h.payload_len > MAX_FRAME_PAYLOAD as u64 {
                return Err(WsError::FrameTooLarge {
                    len: h.payload_len,
                    max: MAX_FRAME_PAYLOAD,
                });
            }
            let len = h.payload_len as usize;
            let total = h.header_len + len;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                return Ok(None);
            }
            if let Some(k) = h.mask {
                apply_mask(&mut buf[h.header_len..total], k);
            }
            buf.advance(h.header_len);
            let payload = buf.split_to(len);
            match h.opcode {
                Opcode::Continuation => {
                    let Some((_, acc)) = self.frag.as_mut() else {
                        return Err(WsError::UnexpectedContinuation);
                    };
                    if acc.len() + len > MAX_MESSAGE_SIZE {
                        return Err(WsError::MessageTooLarge {
                            len: acc.len() + len,
                            max: MAX_MESSAGE_SIZE,
                        });
                    }
                    acc.extend_from_slice(&payload);
                    if h.fin {
                        let (op, acc) = self.frag.take().expect("checked above");
                        return data_message(op, acc.freeze()).map(Some);
                    }
                }
                Opcode::Text | Opcode::Binary => {
                    if self.frag.is_some() {
                        return Err(WsError::ExpectedContinuation);
                    }
                    if h.fin {
                        return data_message(h.opcode, payload.freeze()).map(Some);
                    }
                    self.frag = Some((h.opcode, payload));
                }
                Opcode::Ping => {
                    if !self.close_sent {
                        self.queue(Opcode::Pong, &payload);
                    }
                    return Ok(Some(Message::Ping(payload.freeze())));
                }
                Opcode::Pong => return Ok(Some(Message::Pong(payload.freeze()))),
                Opcode::Close => {
                    let cf = parse_close(&payload)?;
                    self.close_received = true;
                    if !self.close_sent {
                        // §5.5.1: reply with a close, echoing the status code. 1005 means none was
                        // given, so the reply carries none either.
                        if cf.code == 1005 {
                            self.queue(Opcode::Close, &[]);
                            self.close_sent = true;
                        } else {
                            self.close(cf.code, "")?;
                        }
                    }
                    return Ok(Some(Message::Close(cf)));
                }
            }
        }
    }
}

fn data_message(op: Opcode, payload: Bytes) -> Result<Message, WsError> {
    if op == Opcode::Text {
        std::str::from_utf8(&payload).map_err(|_| WsError::InvalidUtf8)?;
        Ok(Message::Text(payload))
    } else {
        Ok(Message::Binary(payload))
    }
}

/// Parse and validate a close payload (§5.5.1, §7.4).
fn parse_close(p: &[u8]) -> Result<CloseFrame, WsError> {
    match p.len() {
        0 => Ok(CloseFrame {
            code: 1005,
            reason: String::new(),
        }),
        1 => Err(WsError::InvalidClosePayload),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            if !is_valid_close_code(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok(CloseFrame {
                code,
                reason: reason.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn read_all(c: &mut WsCodec, bytes: &[u8]) -> Result<Vec<Message>, WsError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(m) = c.read(&mut buf)? {
            out.push(m);
        }
        Ok(out)
    }

    fn frame(fin: bool, op: Opcode, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode_frame(&mut b, fin, op, mask, payload);
        b.to_vec()
    }

    // RFC 6455 §5.7 examples.
    const UNMASKED_HELLO: &[u8] = &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    const MASKED_HELLO: &[u8] = &[
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];

    #[test]
    fn rfc_golden_encode() {
        assert_eq!(frame(true, Opcode::Text, None, b"Hello"), UNMASKED_HELLO);
        assert_eq!(
            frame(true, Opcode::Text, Some(RFC_MASK), b"Hello"),
            MASKED_HELLO
        );
        // Fragmented unmasked text "Hel" + "lo".
        assert_eq!(
            frame(false, Opcode::Text, None, b"Hel"),
            [0x01, 0x03, 0x48, 0x65, 0x6c]
        );
        assert_eq!(
            frame(true, Opcode::Continuation, None, b"lo"),
            [0x80, 0x02, 0x6c, 0x6f]
        );
        // Unmasked ping, masked pong.
        assert_eq!(
            frame(true, Opcode::Ping, None, b"Hello"),
            [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
        );
        assert_eq!(
            frame(true, Opcode::Pong, Some(RFC_MASK), b"Hello"),
            [
                0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        // 256 bytes and 64 KiB binary, unmasked.
        let f = frame(true, Opcode::Binary, None, &[0u8; 256]);
        assert_eq!(&f[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(f.len(), 4 + 256);
        let f = frame(true, Opcode::Binary, None, &vec![0u8; 65536]);
        assert_eq!(&f[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.len(), 10 + 65536);
    }

    #[test]
    fn rfc_golden_decode() {
        let mut c = WsCodec::new(Role::Client, 1);
        assert_eq!(
            read_all(&mut c, UNMASKED_HELLO).unwrap(),
            [Message::Text("Hello".into())]
        );
        let mut s = WsCodec::new(Role::Server, 0);
        assert_eq!(
            read_all(&mut s, MASKED_HELLO).unwrap(),
            [Message::Text("Hello".into())]
        );
        let mut c = WsCodec::new(Role::Client, 1);
        let mut two = vec![0x01, 0x03, 0x48, 0x65, 0x6c];
        two.extend([0x80, 0x02, 0x6c, 0x6f]);
        assert_eq!(
            read_all(&mut c, &two).unwrap(),
            [Message::Text("Hello".into())]
        );
        let h = parse_header(&[0x82, 0x7E, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!((h.payload_len, h.header_len), (256, 4));
        let h = parse_header(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (65536, 10));
    }

    #[test]
    fn masking_direction_enforced() {
        let mut c = WsCodec::new(Role::Client, 1);
        assert_eq!(
            read_all(&mut c, MASKED_HELLO),
            Err(WsError::MaskedFromServer)
        );
        let mut s = WsCodec::new(Role::Server, 0);
        assert_eq!(
            read_all(&mut s, UNMASKED_HELLO),
            Err(WsError::UnmaskedFromClient)
        );
        // The failing side queued a close 1002 (server: unmasked).
        let tx = s.poll_transmit().unwrap();
        assert_eq!(&tx[..], [0x88, 0x02, 0x03, 0xEA]);
    }

    #[test]
    fn header_violations() {
        assert_eq!(
            parse_header(&[0xC1, 0x00]),
            Err(WsError::ReservedBits(0x40))
        );
        assert_eq!(parse_header(&[0x83, 0x00]), Err(WsError::UnknownOpcode(3)));
        assert_eq!(
            parse_header(&[0x8B, 0x00]),
            Err(WsError::UnknownOpcode(0xB))
        );
        // Oversize control frame (126 => 16-bit length follows) and fragmented ping.
        assert_eq!(
            parse_header(&[0x89, 0x7E, 0, 126]),
            Err(WsError::ControlTooLong(126))
        );
        assert_eq!(parse_header(&[0x09, 0x00]), Err(WsError::FragmentedControl));
        let big = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            parse_header(&big),
            Err(WsError::FrameTooLarge { .. })
        ));
        // Incomplete headers.
        assert_eq!(parse_header(&[0x82]), Ok(None));
        assert_eq!(parse_header(&[0x82, 0x7E, 0]), Ok(None));
        assert_eq!(
            parse_header(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 1, 0, 1, 2, 3]),
            Ok(None)
        );
    }

    #[test]
    fn oversize_frame_closes_1009() {
        let mut c = WsCodec::new(Role::Client, 1);
        let len = (MAX_FRAME_PAYLOAD as u64 + 1).to_be_bytes();
        let mut f = vec![0x82, 0x7F];
        f.extend(len);
        assert!(matches!(
            read_all(&mut c, &f),
            Err(WsError::FrameTooLarge { .. })
        ));
        let tx = c.poll_transmit().unwrap();
        // Masked close: decode it with a server codec.
        let mut s = WsCodec::new(Role::Server, 0);
        let m = read_all(&mut s, &tx).unwrap();
        assert_eq!(
            m,
            [Message::Close(CloseFrame {
                code: 1009,
                reason: String::new()
            })]
        );
    }

    #[test]
    fn fragmented_message_too_large() {
        let mut c = WsCodec::new(Role::Client, 1);
        let chunk = vec![0u8; MAX_MESSAGE_SIZE / 2 + 1];
        let mut w = frame(false, Opcode::Binary, None, &chunk);
        w.extend(frame(true, Opcode::Continuation, None, &chunk));
        assert!(matches!(
            read_all(&mut c, &w),
            Err(WsError::MessageTooLarge { .. })
        ));
    }

    #[test]
    fn fragmentation_with_interleaved_ping() {
        let mut c = WsCodec::new(Role::Client, 7);
        let mut w = frame(false, Opcode::Binary, None, b"ab");
        w.extend(frame(true, Opcode::Ping, None, b"p1"));
        w.extend(frame(false, Opcode::Continuation, None, b"cd"));
        w.extend(frame(true, Opcode::Pong, None, b"x"));
        w.extend(frame(true, Opcode::Continuation, None, b"ef"));
        let m = read_all(&mut c, &w).unwrap();
        assert_eq!(
            m,
            [
                Message::Ping("p1".into()),
                Message::Pong("x".into()),
                Message::Binary("abcdef".into())
            ]
        );
        // The automatic pong is masked and carries the ping's payload.
        let tx = c.poll_transmit().unwrap();
        let mut s = WsCodec::new(Role::Server, 0);
        let mut b = BytesMut::from(&tx[..]);
        let h = parse_header(&b).unwrap().unwrap();
        assert_eq!(h.opcode, Opcode::Pong);
        assert!(h.mask.is_some());
        b.clear();
        assert_eq!(read_all(&mut s, &tx).unwrap(), [Message::Pong("p1".into())]);
    }

    #[test]
    fn continuation_errors() {
        let mut c = WsCodec::new(Role::Client, 1);
        let w = frame(true, Opcode::Continuation, None, b"x");
        assert_eq!(read_all(&mut c, &w), Err(WsError::UnexpectedContinuation));
        let mut c = WsCodec::new(Role::Client, 1);
        let mut w = frame(false, Opcode::Binary, None, b"x");
        w.extend(frame(true, Opcode::Binary, None, b"y"));
        assert_eq!(read_all(&mut c, &w), Err(WsError::ExpectedContinuation));
    }

    #[test]
    fn text_must_be_utf8() {
        let mut c = WsCodec::new(Role::Client, 1);
        let w = frame(true, Opcode::Text, None, &[0xff, 0xfe]);
        assert_eq!(read_all(&mut c, &w), Err(WsError::InvalidUtf8));
        // A UTF-8 sequence split across fragments is fine.
        let mut c = WsCodec::new(Role::Client, 1);
        let mut w = frame(false, Opcode::Text, None, &[0xc3]);
        w.extend(frame(true, Opcode::Continuation, None, &[0xa9]));
        assert_eq!(read_all(&mut c, &w).unwrap(), [Message::Text("é".into())]);
    }

    #[test]
    fn close_codes() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            let mut c = WsCodec::new(Role::Client, 1);
            let mut p = code.to_be_bytes().to_vec();
            p.extend(b"bye");
            let m = read_all(&mut c, &frame(true, Opcode::Close, None, &p)).unwrap();
            assert_eq!(
                m,
                [Message::Close(CloseFrame {
                    code,
                    reason: "bye".into()
                })]
            );
            // Our reply echoes the code.
            let tx = c.poll_transmit().unwrap();
            let mut s = WsCodec::new(Role::Server, 0);
            let m = read_all(&mut s, &tx).unwrap();
            assert_eq!(
                m,
                [Message::Close(CloseFrame {
                    code,
                    reason: String::new()
                })]
            );
            assert!(c.close_sent() && c.close_received());
            assert_eq!(c.send(Opcode::Binary, b"x"), Err(WsError::Closed));
        }
        for code in [
            0u16, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2999, 5000, 65535,
        ] {
            let mut c = WsCodec::new(Role::Client, 1);
            let w = frame(true, Opcode::Close, None, &code.to_be_bytes());
            assert_eq!(
                read_all(&mut c, &w),
                Err(WsError::InvalidCloseCode(code)),
                "{code}"
            );
            assert_eq!(c.close(code, ""), Err(WsError::InvalidCloseCode(code)));
        }
        let mut c = WsCodec::new(Role::Client, 1);
        assert_eq!(
            read_all(&mut c, &frame(true, Opcode::Close, None, &[3])),
            Err(WsError::InvalidClosePayload)
        );
        let mut c = WsCodec::new(Role::Client, 1);
        let w = frame(true, Opcode::Close, None, &[0x03, 0xE8, 0xff]);
        assert_eq!(read_all(&mut c, &w), Err(WsError::InvalidUtf8));
        // Empty close: reported as 1005, answered with an empty close.
        let mut c = WsCodec::new(Role::Client, 1);
        let m = read_all(&mut c, &frame(true, Opcode::Close, None, &[])).unwrap();
        assert_eq!(
            m,
            [Message::Close(CloseFrame {
                code: 1005,
                reason: String::new()
            })]
        );
        let tx = c.poll_transmit().unwrap();
        assert_eq!(&tx[..2], [0x88, 0x80]);
    }

    #[test]
    fn close_initiated_locally() {
        let mut s = WsCodec::new(Role::Server, 0);
        let long = "é".repeat(100); // 200 bytes: cut to 123 at a char boundary (122)
        s.close(1001, &long).unwrap();
        let tx = s.poll_transmit().unwrap();
        assert_eq!(tx.len(), 2 + 2 + 122);
        // A second close is a no-op; the peer's reply does not trigger another.
        s.close(1000, "").unwrap();
        assert!(s.poll_transmit().is_none());
        let mut c = WsCodec::new(Role::Client, 3);
        let m = read_all(&mut c, &tx).unwrap();
        assert!(matches!(
            &m[..],
            [Message::Close(CloseFrame { code: 1001, .. })]
        ));
        let reply = c.poll_transmit().unwrap();
        let m = read_all(&mut s, &reply).unwrap();
        assert!(matches!(
            &m[..],
            [Message::Close(CloseFrame { code: 1001, .. })]
        ));
        assert!(s.poll_transmit().is_none());
        // Anything after the close is discarded.
        assert_eq!(read_all(&mut s, MASKED_HELLO).unwrap(), []);
    }

    #[test]
    fn mask_matches_naive() {
        let mut rng = MaskRng::new(42);
        for len in 0..100 {
            let key = rng.next_key();
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let naive: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, naive);
        }
    }

    /// A mixed stream of frames from a server: data, fragments, pings, pongs.
    fn sample_stream(rng: &mut MaskRng, mask: bool) -> Vec<u8> {
        let mut w = Vec::new();
        let mut key = || if mask { Some(rng.next_key()) } else { None };
        let sizes = [0usize, 1, 125, 126, 127, 300, 65535, 65536, 70000];
        for (i, &n) in sizes.iter().enumerate() {
            let p: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            w.extend(frame(true, Opcode::Binary, key(), &p));
            if i % 3 == 0 {
                w.extend(frame(false, Opcode::Binary, key(), &p[..n / 2]));
                w.extend(frame(true, Opcode::Ping, key(), b"pi"));
                w.extend(frame(true, Opcode::Continuation, key(), &p[n / 2..]));
            }
        }
        w.extend(frame(true, Opcode::Text, key(), "héllo".as_bytes()));
        w.extend(frame(true, Opcode::Pong, key(), b"po"));
        w.extend(frame(true, Opcode::Close, key(), &[0x03, 0xE8, b'o', b'k']));
        w
    }

    fn feed_chunks(role: Role, w: &[u8], cuts: &[usize]) -> (Vec<Message>, Vec<u8>) {
        let mut c = WsCodec::new(role, 5);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut prev = 0;
        for &cut in cuts.iter().chain(std::iter::once(&w.len())) {
            buf.extend_from_slice(&w[prev..cut]);
            prev = cut;
            while let Some(m) = c.read(&mut buf).unwrap() {
                out.push(m);
            }
        }
        let mut tx = Vec::new();
        while let Some(b) = c.poll_transmit() {
            tx.extend_from_slice(&b);
        }
        (out, tx)
    }

    #[test]
    fn every_split_gives_same_messages() {
        for (role, mask) in [(Role::Client, false), (Role::Server, true)] {
            let mut rng = MaskRng::new(9);
            let w = sample_stream(&mut rng, mask);
            let whole = feed_chunks(role, &w, &[]);
            assert_eq!(whole.0.len(), 9 + 3 * 2 + 3);
            // Byte by byte.
            let cuts: Vec<usize> = (1..w.len()).collect();
            assert_eq!(feed_chunks(role, &w, &cuts), whole);
            // Every two-piece split around the small frames, sampled over the large ones.
            let step = (w.len() / 200).max(1) | 1; // odd: hits varied offsets within frames
            for cut in (0..=w.len()).step_by(step).chain(0..600) {
                assert_eq!(
                    feed_chunks(role, &w, &[cut.min(w.len())]),
                    whole,
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn round_trip_random() {
        let mut rng = MaskRng::new(0xDEAD_BEEF);
        for _ in 0..200 {
            let len = match rng.next_u64() % 4 {
                0 => (rng.next_u64() % 130) as usize,
                1 => 65530 + (rng.next_u64() % 10) as usize,
                _ => (rng.next_u64() % 5000) as usize,
            };
            let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            for role in [Role::Client, Role::Server] {
                let peer = if role == Role::Client {
                    Role::Server
                } else {
                    Role::Client
                };
                let mut tx = WsCodec::new(role, rng.next_u64());
                let mut buf = vec![0u8; MAX_HEADER_LEN + len];
                buf[MAX_HEADER_LEN..].copy_from_slice(&payload);
                let end = buf.len();
                let off = tx
                    .frame_in_place(Opcode::Binary, &mut buf, MAX_HEADER_LEN, end)
                    .unwrap();
                let mut rx = WsCodec::new(peer, 0);
                let m = read_all(&mut rx, &buf[off..]).unwrap();
                assert_eq!(m, [Message::Binary(payload.clone().into())]);
                tx.send(Opcode::Binary, &payload).unwrap();
                let q = tx.poll_transmit().unwrap();
                assert_eq!(
                    read_all(&mut rx, &q).unwrap(),
                    [Message::Binary(payload.clone().into())]
                );
            }
        }
    }

    #[test]
    fn zero_copy_slices_input() {
        let mut c = WsCodec::new(Role::Client, 1);
        let w = frame(true, Opcode::Binary, None, &[7u8; 1000]);
        let mut buf = BytesMut::from(&w[..]);
        let base = buf.as_ptr() as usize;
        let Some(Message::Binary(b)) = c.read(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!(b.as_ptr() as usize, base + 4);
    }
}
