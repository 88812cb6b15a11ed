//! SPDY/3.1 frame layout (draft 3 section 2.2, 2.6): the 8-byte frame header, the bodies of the
//! control frames, and the DATA header.
//!
//! Pure functions over bytes: no stream state and no compression. Header blocks pass through
//! here still compressed; [`super::headers`] owns zlib and [`super::session`] owns the rules
//! about which frame may arrive when.
//!
//! ```text
//! control: |1| version(15) | type(16) | flags(8) | length(24) | body...
//! data:    |0| stream-id(31)          | flags(8) | length(24) | payload...
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use super::SpdyError;

/// The only protocol version we speak. SPDY/3.1 kept the version field at 3; it differs from
/// SPDY/3 only in session flow control (which our peers ignore) and the dropped CREDENTIAL frame.
pub const VERSION: u16 = 3;

/// Every frame starts with an 8-byte header (both kinds).
pub const FRAME_HEADER_LEN: usize = 8;

/// Largest DATA payload: the length field is 24 bits (draft 3, 2.2.2).
pub const MAX_DATA_PAYLOAD: usize = 0xFF_FFFF;

/// Largest control frame body we buffer. Control frames are parsed whole, so this bounds what a
/// peer can make us hold; port-forward SYN_STREAMs are under 200 bytes, and 64 KiB leaves ample
/// room for any other peer's header block (the wire allows 16 MiB, draft 3 2.2.1).
pub const MAX_CONTROL_FRAME_LEN: usize = 64 * 1024;

/// Stream ids are 31 bits (draft 3, 2.3.2).
pub const MAX_STREAM_ID: u32 = 0x7FFF_FFFF;

/// Control frame types (draft 3, 2.6).
pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

/// DATA, SYN_STREAM, SYN_REPLY, HEADERS: the sender's last frame on this stream.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the recipient may not send on this stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS: forget persisted settings.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// RST_STREAM status codes (draft 3, 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes, as moby/spdystream (our real peer) numbers them.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// A decoded 8-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHeader {
    Control {
        version: u16,
        kind: u16,
        flags: u8,
        len: usize,
    },
    Data {
        stream_id: u32,
        flags: u8,
        len: usize,
    },
}

impl FrameHeader {
    /// Decode a frame header. Never fails: every 8-byte pattern is some header; whether it is
    /// acceptable is the session's call.
    pub fn parse(b: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        let word = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let flags = b[4];
        let len = u32::from_be_bytes([0, b[5], b[6], b[7]]) as usize;
        if word & 0x8000_0000 != 0 {
            FrameHeader::Control {
                version: ((word >> 16) & 0x7FFF) as u16,
                kind: word as u16,
                flags,
                len,
            }
        } else {
            FrameHeader::Data {
                stream_id: word,
                flags,
                len,
            }
        }
    }
}

/// The 8-byte header of a DATA frame carrying `len` payload bytes.
pub fn data_header(stream_id: u32, flags: u8, len: usize) -> [u8; FRAME_HEADER_LEN] {
    debug_assert!(stream_id <= MAX_STREAM_ID && len <= MAX_DATA_PAYLOAD);
    let id = (stream_id & MAX_STREAM_ID).to_be_bytes();
    let len = (len as u32).to_be_bytes();
    [id[0], id[1], id[2], id[3], flags, len[1], len[2], len[3]]
}

/// One SETTINGS entry (draft 3, 2.6.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    /// 24-bit setting id.
    pub id: u32,
    pub value: u32,
}

/// A control frame with its body decoded; header blocks are still compressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    SynStream {
        stream_id: u32,
        associated_id: u32,
        priority: u8,
        slot: u8,
        flags: u8,
        header_block: Bytes,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        header_block: Bytes,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        header_block: Bytes,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A type we do not know; the spec says to ignore it (draft 3, 2.2.1).
    Unknown {
        kind: u16,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn invalid(frame: &'static str, reason: &'static str) -> SpdyError {
    SpdyError::InvalidFrame { frame, reason }
}

impl ControlFrame {
    /// Decode the body of a control frame of type `kind`. `body` is exactly the frame's
    /// `length` bytes after the header.
    pub fn parse(kind: u16, flags: u8, body: Bytes) -> Result<ControlFrame, SpdyError> {
        let len = body.len();
        let exact = |frame, want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(invalid(frame, "wrong length"))
            }
        };
        Ok(match kind {
            TYPE_SYN_STREAM => {
                if len < 10 {
                    return Err(invalid("SYN_STREAM", "shorter than 10 bytes"));
                }
                ControlFrame::SynStream {
                    stream_id: be32(&body, 0) & MAX_STREAM_ID,
                    associated_id: be32(&body, 4) & MAX_STREAM_ID,
                    priority: body[8] >> 5,
                    slot: body[9],
                    flags,
                    header_block: body.slice(10..),
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                if len < 4 {
                    return Err(invalid(
                        if kind == TYPE_HEADERS {
                            "HEADERS"
                        } else {
                            "SYN_REPLY"
                        },
                        "shorter than 4 bytes",
                    ));
                }
                let stream_id = be32(&body, 0) & MAX_STREAM_ID;
                let header_block = body.slice(4..);
                if kind == TYPE_HEADERS {
                    ControlFrame::Headers {
                        stream_id,
                        flags,
                        header_block,
                    }
                } else {
                    ControlFrame::SynReply {
                        stream_id,
                        flags,
                        header_block,
                    }
                }
            }
            TYPE_RST_STREAM => {
                exact("RST_STREAM", 8)?;
                ControlFrame::RstStream {
                    stream_id: be32(&body, 0) & MAX_STREAM_ID,
                    status: be32(&body, 4),
                }
            }
            TYPE_SETTINGS => {
                if len < 4 {
                    return Err(invalid("SETTINGS", "shorter than 4 bytes"));
                }
                let count = be32(&body, 0) as usize;
                // Checked against the length before allocating: the count is peer-controlled.
                if count.checked_mul(8).and_then(|n| n.checked_add(4)) != Some(len) {
                    return Err(invalid("SETTINGS", "entry count does not match length"));
                }
                let entries = (0..count)
                    .map(|i| {
                        let at = 4 + 8 * i;
                        Setting {
                            flags: body[at],
                            id: be32(&body, at) & 0xFF_FFFF,
                            value: be32(&body, at + 4),
                        }
                    })
                    .collect();
                ControlFrame::Settings { flags, entries }
            }
            TYPE_PING => {
                exact("PING", 4)?;
                ControlFrame::Ping { id: be32(&body, 0) }
            }
            TYPE_GOAWAY => {
                exact("GOAWAY", 8)?;
                ControlFrame::GoAway {
                    last_good_stream_id: be32(&body, 0) & MAX_STREAM_ID,
                    status: be32(&body, 4),
                }
            }
            TYPE_WINDOW_UPDATE => {
                exact("WINDOW_UPDATE", 8)?;
                ControlFrame::WindowUpdate {
                    stream_id: be32(&body, 0) & MAX_STREAM_ID,
                    delta: be32(&body, 4) & 0x7FFF_FFFF,
                }
            }
            kind => ControlFrame::Unknown { kind },
        })
    }

    /// Append this frame, header included, to `out`. `Unknown` encodes as nothing.
    pub fn encode(&self, out: &mut BytesMut) {
        let head = |out: &mut BytesMut, kind: u16, flags: u8, len: usize| {
            debug_assert!(len <= 0xFF_FFFF);
            out.put_u16(0x8000 | VERSION);
            out.put_u16(kind);
            out.put_u32(((flags as u32) << 24) | len as u32);
        };
        match self {
            ControlFrame::SynStream {
                stream_id,
                associated_id,
                priority,
                slot,
                flags,
                header_block,
            } => {
                head(out, TYPE_SYN_STREAM, *flags, 10 + header_block.len());
                out.put_u32(*stream_id & MAX_STREAM_ID);
                out.put_u32(*associated_id & MAX_STREAM_ID);
                out.put_u8(priority << 5);
                out.put_u8(*slot);
                out.put_slice(header_block);
            }
            ControlFrame::SynReply {
                stream_id,
                flags,
                header_block,
            } => {
                head(out, TYPE_SYN_REPLY, *flags, 4 + header_block.len());
                out.put_u32(*stream_id & MAX_STREAM_ID);
                out.put_slice(header_block);
            }
            ControlFrame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                head(out, TYPE_HEADERS, *flags, 4 + header_block.len());
                out.put_u32(*stream_id & MAX_STREAM_ID);
                out.put_slice(header_block);
            }
            ControlFrame::RstStream { stream_id, status } => {
                head(out, TYPE_RST_STREAM, 0, 8);
                out.put_u32(*stream_id & MAX_STREAM_ID);
                out.put_u32(*status);
            }
            ControlFrame::Settings { flags, entries } => {
                head(out, TYPE_SETTINGS, *flags, 4 + 8 * entries.len());
                out.put_u32(entries.len() as u32);
                for e in entries {
                    out.put_u32(((e.flags as u32) << 24) | (e.id & 0xFF_FFFF));
                    out.put_u32(e.value);
                }
            }
            ControlFrame::Ping { id } => {
                head(out, TYPE_PING, 0, 4);
                out.put_u32(*id);
            }
            ControlFrame::GoAway {
                last_good_stream_id,
                status,
            } => {
                head(out, TYPE_GOAWAY, 0, 8);
                out.put_u32(*last_good_stream_id & MAX_STREAM_ID);
                out.put_u32(*status);
            }
            ControlFrame::WindowUpdate { stream_id, delta } => {
                head(out, TYPE_WINDOW_UPDATE, 0, 8);
                out.put_u32(*stream_id & MAX_STREAM_ID);
                out.put_u32(*delta & 0x7FFF_FFFF);
            }
            ControlFrame::Unknown { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &ControlFrame) -> Vec<u8> {
        let mut out = BytesMut::new();
        f.encode(&mut out);
        out.to_vec()
    }

    /// Encode, check the golden bytes, parse back.
    fn golden(f: ControlFrame, want: &[u8]) {
        let got = enc(&f);
        assert_eq!(got, want, "encoding of {f:?}");
        let hdr = FrameHeader::parse(got[..8].try_into().unwrap());
        let FrameHeader::Control {
            version,
            kind,
            flags,
            len,
        } = hdr
        else {
            panic!("not control: {hdr:?}")
        };
        assert_eq!(version, 3);
        assert_eq!(len, got.len() - 8);
        let back = ControlFrame::parse(kind, flags, Bytes::copy_from_slice(&got[8..])).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn golden_syn_stream() {
        // 80 03 00 01 | flags 01 | len 00 00 0d | id 5 | assoc 0 | pri 7<<5 | slot 0 | block
        golden(
            ControlFrame::SynStream {
                stream_id: 5,
                associated_id: 0,
                priority: 7,
                slot: 0,
                flags: FLAG_FIN,
                header_block: Bytes::from_static(b"abc"),
            },
            &[
                0x80, 0x03, 0x00, 0x01, 0x01, 0x00, 0x00, 0x0d, 0, 0, 0, 5, 0, 0, 0, 0, 0xe0, 0x00,
                b'a', b'b', b'c',
            ],
        );
    }

    #[test]
    fn golden_syn_reply() {
        golden(
            ControlFrame::SynReply {
                stream_id: 0x0102_0304,
                flags: 0,
                header_block: Bytes::from_static(b"z"),
            },
            &[
                0x80, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x05, 0x01, 0x02, 0x03, 0x04, b'z',
            ],
        );
    }

    #[test]
    fn golden_rst_stream() {
        golden(
            ControlFrame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            &[
                0x80, 0x03, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 3, 0, 0, 0, 5,
            ],
        );
    }

    #[test]
    fn golden_settings() {
        golden(
            ControlFrame::Settings {
                flags: FLAG_SETTINGS_CLEAR,
                entries: vec![
                    Setting {
                        flags: 1,
                        id: 4,
                        value: 100,
                    },
                    Setting {
                        flags: 0,
                        id: 7,
                        value: 65536,
                    },
                ],
            },
            &[
                0x80, 0x03, 0x00, 0x04, 0x01, 0x00, 0x00, 0x14, 0, 0, 0, 2, // count
                0x01, 0x00, 0x00, 0x04, 0, 0, 0, 100, // persist, MAX_CONCURRENT_STREAMS = 100
                0x00, 0x00, 0x00, 0x07, 0x00, 0x01, 0x00, 0x00, // INITIAL_WINDOW_SIZE = 65536
            ],
        );
    }

    #[test]
    fn golden_ping() {
        golden(
            ControlFrame::Ping { id: 0xdead_beef },
            &[
                0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef,
            ],
        );
    }

    #[test]
    fn golden_goaway() {
        golden(
            ControlFrame::GoAway {
                last_good_stream_id: 9,
                status: goaway::PROTOCOL_ERROR,
            },
            &[
                0x80, 0x03, 0x00, 0x07, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 9, 0, 0, 0, 1,
            ],
        );
    }

    #[test]
    fn golden_headers() {
        golden(
            ControlFrame::Headers {
                stream_id: 2,
                flags: FLAG_FIN,
                header_block: Bytes::from_static(b"hi"),
            },
            &[
                0x80, 0x03, 0x00, 0x08, 0x01, 0x00, 0x00, 0x06, 0, 0, 0, 2, b'h', b'i',
            ],
        );
    }

    #[test]
    fn golden_window_update() {
        golden(
            ControlFrame::WindowUpdate {
                stream_id: 0,
                delta: 0x10000,
            },
            &[
                0x80, 0x03, 0x00, 0x09, 0x00, 0x00, 0x00, 0x08, 0, 0, 0, 0, 0x00, 0x01, 0x00, 0x00,
            ],
        );
    }

    #[test]
    fn golden_data_header() {
        assert_eq!(
            data_header(1, FLAG_FIN, 0x01_0203),
            [0, 0, 0, 1, 0x01, 0x01, 0x02, 0x03]
        );
        assert_eq!(
            data_header(MAX_STREAM_ID, 0, MAX_DATA_PAYLOAD),
            [0x7f, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            FrameHeader::parse(&data_header(42, 0, 7)),
            FrameHeader::Data {
                stream_id: 42,
                flags: 0,
                len: 7
            }
        );
    }

    #[test]
    fn header_fields() {
        // Version 2 control frame of an unknown type 0xabcd with flags 0xff, length 0xffffff.
        assert_eq!(
            FrameHeader::parse(&[0x80, 0x02, 0xab, 0xcd, 0xff, 0xff, 0xff, 0xff]),
            FrameHeader::Control {
                version: 2,
                kind: 0xabcd,
                flags: 0xff,
                len: 0xFF_FFFF
            }
        );
    }

    #[test]
    fn wrong_lengths_rejected() {
        for (kind, len) in [
            (TYPE_RST_STREAM, 7),
            (TYPE_RST_STREAM, 9),
            (TYPE_PING, 8),
            (TYPE_GOAWAY, 4),
            (TYPE_WINDOW_UPDATE, 4),
            (TYPE_SYN_STREAM, 9),
            (TYPE_SYN_REPLY, 3),
            (TYPE_HEADERS, 0),
            (TYPE_SETTINGS, 3),
            (TYPE_SETTINGS, 12),
        ] {
            let body = Bytes::from(vec![0u8; len]);
            assert!(
                ControlFrame::parse(kind, 0, body).is_err(),
                "type {kind} len {len}"
            );
        }
        // A SETTINGS count that would overflow must not allocate.
        let body = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(ControlFrame::parse(TYPE_SETTINGS, 0, body).is_err());
    }

    #[test]
    fn unknown_type_is_skippable() {
        assert_eq!(
            ControlFrame::parse(10, 0, Bytes::from_static(b"cred")).unwrap(),
            ControlFrame::Unknown { kind: 10 }
        );
        assert!(enc(&ControlFrame::Unknown { kind: 10 }).is_empty());
    }
}
