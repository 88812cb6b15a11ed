//! SPDY/3 header blocks (draft 3, 2.6.10): the name/value block format and its zlib compression.
//!
//! A session has exactly one compression context per direction, primed with the SPDY/3
//! dictionary and carried across every header block of the session (each block ends with a
//! `Z_SYNC_FLUSH`). Losing one block therefore desynchronises the rest: every received block
//! must be decompressed, even for a stream that is about to be refused.
//!
//! Decompression is incremental and bounded: a block that inflates past
//! [`MAX_HEADER_BLOCK_LEN`] is an error after at most that many bytes of output, so a
//! decompression bomb costs us nothing.

use bytes::{BufMut, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};

use super::SpdyError;
use super::dictionary::{DICTIONARY, DICTIONARY_ADLER32};
use super::frame::MAX_CONTROL_FRAME_LEN;

/// Largest decompressed header block, in either direction. Port-forward blocks are about 60
/// bytes; 32 KiB fits any sane peer and keeps a bomb cheap.
pub const MAX_HEADER_BLOCK_LEN: usize = 32 * 1024;

/// Largest compressed header block we accept: what is left of a control frame after the
/// SYN_STREAM fields (the largest fixed part, 10 bytes).
pub const MAX_COMPRESSED_HEADER_BLOCK_LEN: usize = MAX_CONTROL_FRAME_LEN - 10;

/// Most name/value pairs in one block (after splitting NUL-joined values). A bound on the
/// allocations one block can cause; port-forward uses 3.
pub const MAX_HEADERS: usize = 256;

// What we compress must fit in one control frame even if deflate expands it (stored blocks
// add 5 bytes per 64 KiB, plus the zlib header and the sync-flush marker).
const _: () = assert!(MAX_HEADER_BLOCK_LEN + 64 <= MAX_COMPRESSED_HEADER_BLOCK_LEN);

/// Inflate output is produced in steps of this many bytes, so the limit check runs before any
/// allocation beyond it.
const INFLATE_STEP: usize = 4096;

/// Name/value pairs of a header block, in wire order. Names are lower-case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a pair; the name is lower-cased (SPDY requires lower-case names on the wire).
    pub fn push(&mut self, name: &str, value: impl Into<String>) {
        self.entries.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Builder form of [`push`](Self::push).
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.push(name, value);
        self
    }

    /// First value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The uncompressed block: u32 count, then u32-length-prefixed name and value. Repeated
    /// names are merged into one NUL-separated value, because moby/spdystream rejects a block
    /// with a repeated name.
    fn serialize(&self, out: &mut Vec<u8>) {
        let mut names: Vec<&str> = Vec::new();
        for (n, _) in &self.entries {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        out.extend_from_slice(&(names.len() as u32).to_be_bytes());
        for name in names {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            let len_at = out.len();
            out.extend_from_slice(&[0; 4]);
            let mut first = true;
            for (_, v) in self.entries.iter().filter(|(n, _)| n == name) {
                if !first {
                    out.push(0);
                }
                first = false;
                out.extend_from_slice(v.as_bytes());
            }
            let vlen = (out.len() - len_at - 4) as u32;
            out[len_at..len_at + 4].copy_from_slice(&vlen.to_be_bytes());
        }
    }

    /// Parse an uncompressed block. Lenient where it costs nothing: upper-case names are
    /// lower-cased and invalid UTF-8 is replaced, but lengths must add up exactly.
    pub fn parse_block(block: &[u8]) -> Result<Headers, SpdyError> {
        let mut rest = block;
        let mut take = |n: usize| -> Result<&[u8], SpdyError> {
            if rest.len() < n {
                return Err(SpdyError::MalformedHeaderBlock(
                    "length runs past the end of the block",
                ));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u32_of = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let count = u32_of(take(4)?);
        if count > MAX_HEADERS {
            return Err(SpdyError::TooManyHeaders { max: MAX_HEADERS });
        }
        let mut headers = Headers::new();
        for _ in 0..count {
            let name_len = u32_of(take(4)?);
            let name = take(name_len)?;
            if name.is_empty() {
                return Err(SpdyError::MalformedHeaderBlock("empty header name"));
            }
            let name = String::from_utf8_lossy(name).to_ascii_lowercase();
            let value_len = u32_of(take(4)?);
            let value = take(value_len)?;
            for part in value.split(|&b| b == 0) {
                if headers.entries.len() == MAX_HEADERS {
                    return Err(SpdyError::TooManyHeaders { max: MAX_HEADERS });
                }
                headers
                    .entries
                    .push((name.clone(), String::from_utf8_lossy(part).into_owned()));
            }
        }
        if !rest.is_empty() {
            return Err(SpdyError::MalformedHeaderBlock(
                "bytes after the last header",
            ));
        }
        Ok(headers)
    }
}

impl<N: AsRef<str>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.push(n.as_ref(), v);
        }
        h
    }
}

/// The outgoing side of a session's header compression: a zlib stream primed with the SPDY/3
/// dictionary, as every peer expects, made of *stored* (uncompressed) deflate blocks.
///
/// A real compressor costs about 380 KiB per session (zlib's window and hash tables), which a
/// forward with 32 sessions pays 32 times for header blocks of about 60 bytes each. A stored
/// block is valid deflate that any inflater reads, so each header block goes out as one stored
/// block followed by the empty stored block a `Z_SYNC_FLUSH` writes (`00 00 00 ff ff`): byte
/// for byte the shape of a flushed block, without the compressor.
pub struct HeaderEncoder {
    /// The zlib header (with the dictionary's id) goes before the first block only.
    started: bool,
    plain: Vec<u8>,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        Self::new()
    }
}

/// zlib header: CM 8 (deflate), CINFO 7 (32 KiB window), FDICT set, FLEVEL 0; FCHECK makes
/// the pair a multiple of 31 (0x7820 = 31 * 992).
const ZLIB_HEADER_WITH_DICT: [u8; 2] = [0x78, 0x20];

/// The empty stored block that ends a `Z_SYNC_FLUSH`.
const SYNC_FLUSH: [u8; 5] = [0x00, 0x00, 0x00, 0xff, 0xff];

impl HeaderEncoder {
    pub fn new() -> Self {
        HeaderEncoder {
            started: false,
            plain: Vec::new(),
        }
    }

    /// Encode `headers` as the next block of this session and append it to `out`.
    ///
    /// The size checks run first, so an error leaves the context untouched and the session
    /// usable.
    pub fn encode(&mut self, headers: &Headers, out: &mut BytesMut) -> Result<(), SpdyError> {
        self.plain.clear();
        headers.serialize(&mut self.plain);
        if self.plain.len() > MAX_HEADER_BLOCK_LEN {
            return Err(SpdyError::HeaderBlockTooLarge {
                max: MAX_HEADER_BLOCK_LEN,
            });
        }
        if headers.len() > MAX_HEADERS {
            return Err(SpdyError::TooManyHeaders { max: MAX_HEADERS });
        }
        if !self.started {
            out.extend_from_slice(&ZLIB_HEADER_WITH_DICT);
            out.extend_from_slice(&DICTIONARY_ADLER32.to_be_bytes());
            self.started = true;
        }
        // One stored block holds up to 65,535 bytes; a header block is at most 32 KiB.
        const _: () = assert!(MAX_HEADER_BLOCK_LEN <= u16::MAX as usize);
        let len = self.plain.len() as u16;
        out.put_u8(0x00); // BFINAL 0, BTYPE 00 (stored), then padding to the byte
        out.put_u16_le(len);
        out.put_u16_le(!len);
        out.extend_from_slice(&self.plain);
        out.extend_from_slice(&SYNC_FLUSH);
        Ok(())
    }
}

/// The incoming decompression context of a session.
pub struct HeaderDecoder {
    inflate: Decompress,
    plain: Vec<u8>,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecoder {
    pub fn new() -> Self {
        HeaderDecoder {
            inflate: Decompress::new(true),
            plain: Vec::new(),
        }
    }

    /// Decompress the next block of this session and parse it. Any error is session-fatal:
    /// the shared context is out of step with the peer's.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        if block.len() > MAX_COMPRESSED_HEADER_BLOCK_LEN {
            return Err(SpdyError::HeaderBlockTooLarge {
                max: MAX_COMPRESSED_HEADER_BLOCK_LEN,
            });
        }
        self.plain.clear();
        let mut input = block;
        let mut step = [0u8; INFLATE_STEP];
        loop {
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let result = self
                .inflate
                .decompress(input, &mut step, FlushDecompress::Sync);
            let consumed = (self.inflate.total_in() - in0) as usize;
            let produced = (self.inflate.total_out() - out0) as usize;
            input = &input[consumed..];
            if self.plain.len() + produced > MAX_HEADER_BLOCK_LEN {
                return Err(SpdyError::HeaderBlockTooLarge {
                    max: MAX_HEADER_BLOCK_LEN,
                });
            }
            self.plain.extend_from_slice(&step[..produced]);
            match result {
                Ok(Status::StreamEnd) => {
                    // The peer ended its zlib stream; nothing may follow in this block, and
                    // the next block will fail to inflate.
                    if !input.is_empty() {
                        return Err(SpdyError::HeaderCompression(
                            "data after the end of the zlib stream".into(),
                        ));
                    }
                    break;
                }
                Ok(_) => {
                    if input.is_empty() && produced < step.len() {
                        break;
                    }
                    if consumed == 0 && produced == 0 {
                        // No progress with input left: truncated or corrupt.
                        return Err(SpdyError::HeaderCompression(
                            "inflate made no progress".into(),
                        ));
                    }
                }
                Err(e) => match e.needs_dictionary() {
                    Some(_) => {
                        // zlib checks the DICTID against the dictionary's Adler-32 itself.
                        self.inflate.set_dictionary(DICTIONARY).map_err(|e| {
                            SpdyError::HeaderCompression(format!("dictionary rejected: {e}"))
                        })?;
                    }
                    None => return Err(SpdyError::HeaderCompression(e.to_string())),
                },
            }
        }
        Headers::parse_block(&self.plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn pf_headers(kind: &str, port: u16, req: u32) -> Headers {
        Headers::new()
            .with("streamtype", kind)
            .with("port", port.to_string())
            .with("requestid", req.to_string())
    }

    #[test]
    fn dictionary_is_the_spec_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        let mut c = Compress::new(Compression::default(), true);
        assert_eq!(c.set_dictionary(DICTIONARY).unwrap(), DICTIONARY_ADLER32);
        assert!(DICTIONARY.starts_with(b"\x00\x00\x00\x07options\x00\x00\x00\x04head"));
        assert!(DICTIONARY.ends_with(b"utf-,*,enq=0."));
        // The two line-start spaces survive the literal's line continuations.
        assert!(DICTIONARY.windows(5).any(|w| w == b"Mon, "));
        assert_eq!(DICTIONARY.iter().filter(|&&b| b == b' ').count(), 40);
    }

    #[test]
    fn block_wire_format() {
        // Hand-computed: count 2; "port"="8080"; "x"= "a\0b" (merged repeat).
        let h = Headers::new()
            .with("Port", "8080")
            .with("x", "a")
            .with("X", "b");
        let mut plain = Vec::new();
        h.serialize(&mut plain);
        assert_eq!(
            plain,
            b"\0\0\0\x02\0\0\0\x04port\0\0\0\x048080\0\0\0\x01x\0\0\0\x03a\0b".to_vec()
        );
        let back = Headers::parse_block(&plain).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            vec![("port", "8080"), ("x", "a"), ("x", "b")]
        );
        assert_eq!(back.get("PORT"), Some("8080"));
    }

    #[test]
    fn upper_case_names_lowered() {
        let back = Headers::parse_block(b"\0\0\0\x01\0\0\0\x04PoRt\0\0\0\x0280").unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), vec![("port", "80")]);
    }

    #[test]
    fn malformed_blocks_rejected() {
        for bad in [
            &b""[..],
            b"\0\0\0",
            b"\0\0\0\x01",
            b"\0\0\0\x01\0\0\0\x00\0\0\0\0",         // empty name
            b"\0\0\0\x01\0\0\0\x05port\0\0\0\0",     // name runs over
            b"\0\0\0\x01\0\0\0\x04port\0\0\0\x09ab", // value runs over
            b"\0\0\0\x00x",                          // trailing byte
            b"\xff\xff\xff\xff",                     // absurd count
        ] {
            assert!(Headers::parse_block(bad).is_err(), "{bad:?}");
        }
        // NUL splitting cannot multiply entries past the limit.
        let mut many = b"\0\0\0\x01\0\0\0\x01a".to_vec();
        many.extend_from_slice(&(1000u32).to_be_bytes());
        many.extend_from_slice(&[0u8; 1000]);
        assert!(matches!(
            Headers::parse_block(&many),
            Err(SpdyError::TooManyHeaders { .. })
        ));
    }

    #[test]
    fn round_trip_across_blocks() {
        let mut enc = HeaderEncoder::new();
        let mut dec = HeaderDecoder::new();
        for i in 0..50u32 {
            let h = pf_headers(
                if i % 2 == 0 { "error" } else { "data" },
                8000 + i as u16,
                i / 2,
            );
            let mut out = BytesMut::new();
            enc.encode(&h, &mut out).unwrap();
            if i == 0 {
                // zlib header with FDICT set, then DICTID = the spec dictionary's Adler-32.
                assert_eq!(out[0], 0x78);
                assert_eq!(out[1] & 0x20, 0x20);
                assert_eq!(
                    u32::from_be_bytes(out[2..6].try_into().unwrap()),
                    DICTIONARY_ADLER32
                );
            }
            // Every block ends with a sync flush marker.
            assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
            assert_eq!(dec.decode(&out).unwrap(), h);
        }
        // Empty block.
        let mut out = BytesMut::new();
        enc.encode(&Headers::new(), &mut out).unwrap();
        assert!(dec.decode(&out).unwrap().is_empty());
    }

    /// Blocks compressed by an independent zlib (C zlib through Python's
    /// `zlib.compressobj(9, zdict=DICTIONARY)`, flushed with `Z_SYNC_FLUSH` per block, the same
    /// format Go's `zlib.NewWriterLevelDict` in moby/spdystream produces): the error- and
    /// data-stream headers kubectl sends for its first connection, in one shared context.
    #[test]
    fn decodes_independently_compressed_blocks() {
        const ERROR_BLOCK: &[u8] = &[
            0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70, 0x3a, 0x2b, 0x29, 0x4a,
            0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86, 0x14, 0xcb, 0x45, 0xe0,
            0x1c, 0x60, 0x61, 0x60, 0x61, 0x00, 0xa4, 0x39, 0x8b, 0x20, 0xd1, 0x98, 0x09, 0x4a,
            0xde, 0x8c, 0x06, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        const DATA_BLOCK: &[u8] = &[
            0xc2, 0xaa, 0x19, 0x54, 0x0e, 0x25, 0x12, 0xd6, 0x0b, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let mut dec = HeaderDecoder::new();
        assert_eq!(
            dec.decode(ERROR_BLOCK).unwrap(),
            pf_headers("error", 8080, 0)
        );
        assert_eq!(dec.decode(DATA_BLOCK).unwrap(), pf_headers("data", 8080, 0));
    }

    #[test]
    fn decompression_bomb_rejected() {
        // 1 MiB of one repeated byte inside a single value compresses to ~1 KiB.
        let mut enc = Compress::new(Compression::best(), true);
        enc.set_dictionary(DICTIONARY).unwrap();
        let mut plain = b"\0\0\0\x01\0\0\0\x01a".to_vec();
        plain.extend_from_slice(&(1u32 << 20).to_be_bytes());
        plain.resize(plain.len() + (1 << 20), b'x');
        let mut bomb = Vec::with_capacity(1 << 16);
        enc.compress_vec(&plain, &mut bomb, FlushCompress::Sync)
            .unwrap();
        assert!(bomb.len() < 8 * 1024, "bomb is {} bytes", bomb.len());
        let mut dec = HeaderDecoder::new();
        assert!(matches!(
            dec.decode(&bomb),
            Err(SpdyError::HeaderBlockTooLarge { .. })
        ));
    }

    #[test]
    fn oversize_outgoing_block_leaves_context_usable() {
        let mut enc = HeaderEncoder::new();
        let mut dec = HeaderDecoder::new();
        let big = Headers::new().with("x", "y".repeat(MAX_HEADER_BLOCK_LEN));
        let mut out = BytesMut::new();
        assert!(enc.encode(&big, &mut out).is_err());
        assert!(out.is_empty());
        let h = Headers::new().with("a", "b");
        enc.encode(&h, &mut out).unwrap();
        assert_eq!(dec.decode(&out).unwrap(), h);
    }

    #[test]
    fn garbage_rejected() {
        let mut dec = HeaderDecoder::new();
        assert!(dec.decode(b"not zlib at all").is_err());
        // Right header, wrong dictionary id.
        let mut dec = HeaderDecoder::new();
        assert!(
            dec.decode(&[0x78, 0xbb, 0xdf, 0xa2, 0x51, 0xb2, 0x62, 0x60])
                .is_err()
        );
        // Truncated mid-block: fails to parse (no sync point reached).
        let mut enc = HeaderEncoder::new();
        let mut out = BytesMut::new();
        enc.encode(&pf_headers("data", 1, 1), &mut out).unwrap();
        let mut dec = HeaderDecoder::new();
        assert!(dec.decode(&out[..out.len() - 6]).is_err());
    }

    #[test]
    fn fuzz_entry_point_on_random_and_mutated_blocks() {
        let mut rng = super::super::fuzz::Rng::new(11);
        let mut enc = HeaderEncoder::new();
        let mut valid = BytesMut::new();
        enc.encode(&pf_headers("data", 80, 1), &mut valid).unwrap();
        for _ in 0..2000 {
            let mut input: Vec<u8> = valid.to_vec();
            let at = rng.below(input.len());
            input[at] ^= 1 << rng.below(8);
            input.truncate(rng.below(input.len() + 1).max(at + 1));
            super::super::fuzz::header_block(&input);
            let noise: Vec<u8> = (0..rng.below(100)).map(|_| rng.below(256) as u8).collect();
            super::super::fuzz::header_block(&noise);
        }
    }
}
