//! SPDY/3.1 as the Kubernetes port-forward transport speaks it: framing, header compression and
//! the session state machine, sans-IO.
//!
//! Layout:
//! - [`frame`]: the wire layout of every frame type, parse and encode, no state.
//! - [`headers`]: header blocks, their zlib contexts and the size limits that keep them cheap.
//! - [`dictionary`]: the SPDY/3 zlib dictionary (a protocol fact).
//! - [`session`]: stream ids and states, PING/GOAWAY, the transmit queue; bytes in, events out.
//! - [`fuzz`]: entry points for the cargo-fuzz targets (and the property tests).
//!
//! Nothing here touches a socket, a clock or an async runtime. What a port-forward stream *means*
//! lives one layer up, in [`super::portforward`].

pub mod dictionary;
pub mod frame;
pub mod headers;
pub mod session;

pub use frame::{goaway, rst};
pub use headers::Headers;
pub use session::{Role, Session, SpdyEvent, Stats, StreamId};

/// Everything that can go wrong in the SPDY layer. From [`Session::handle_input`] every error is
/// session-fatal; from the sending methods an error refuses that one call only.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0} (want 3)")]
    UnsupportedVersion(u16),
    #[error("control frame of {len} bytes exceeds the limit of {max}")]
    ControlFrameTooLarge { len: usize, max: usize },
    #[error("invalid {frame} frame: {reason}")]
    InvalidFrame {
        frame: &'static str,
        reason: &'static str,
    },
    #[error("stream id {id}: {reason}")]
    StreamIdViolation { id: u32, reason: &'static str },
    #[error("header block compression: {0}")]
    HeaderCompression(String),
    #[error("header block exceeds {max} bytes")]
    HeaderBlockTooLarge { max: usize },
    #[error("header block has more than {max} headers")]
    TooManyHeaders { max: usize },
    #[error("malformed header block: {0}")]
    MalformedHeaderBlock(&'static str),
    #[error("unknown stream {0}")]
    UnknownStream(u32),
    #[error("stream {0} is closed for sending")]
    StreamClosed(u32),
    #[error("payload of {len} bytes exceeds the DATA frame limit of {max}")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("more than {max} concurrent streams")]
    TooManyStreams { max: usize },
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
    #[error("session is going away")]
    GoingAway,
    #[error("session already failed")]
    Failed,
    /// The caller broke the API's contract (a bug on our side, never the peer's).
    #[error("misuse: {0}")]
    Misuse(&'static str),
}

/// Entry points for the fuzz targets in `tests/fuzz`, also run by the unit tests. Each checks
/// more than "no panic": feeding the same bytes whole or split must give the same result.
#[doc(hidden)]
pub mod fuzz {
    use bytes::{Bytes, BytesMut};

    use super::headers::{HeaderDecoder, Headers};
    use super::session::{Role, Session, SpdyEvent};

    /// A tiny deterministic PRNG (xorshift64*) for split points and property tests; no crate.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform-ish in `0..n` (`n` > 0).
        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n.max(1) as u64) as usize
        }
    }

    /// Outcome of feeding one input: events (DATA pieces merged), error text, bytes queued.
    type Outcome = (Vec<SpdyEvent>, Option<String>, Vec<u8>);

    fn feed(role: Role, input: &[u8], rng: Option<&mut Rng>) -> Outcome {
        let mut s = Session::new(role);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut err = None;
        let mut rng = rng;
        let mut at = 0;
        'outer: while at < input.len() {
            let n = match rng.as_deref_mut() {
                Some(r) => 1 + r.below(64),
                None => input.len(),
            };
            let end = (at + n).min(input.len());
            buf.extend_from_slice(&input[at..end]);
            at = end;
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
        let mut tx = Vec::new();
        while let Some(b) = s.poll_transmit() {
            tx.extend_from_slice(&b);
        }
        (events, err, tx)
    }

    /// Merge consecutive DATA pieces of one frame run, so outcomes of split inputs compare equal.
    pub fn push_merged(events: &mut Vec<SpdyEvent>, ev: SpdyEvent) {
        if let SpdyEvent::Data {
            stream_id,
            data,
            fin,
        } = &ev
            && let Some(SpdyEvent::Data {
                stream_id: prev,
                data: pdata,
                fin: pfin,
            }) = events.last_mut()
            && prev == stream_id
            && !*pfin
        {
            let mut joined = pdata.to_vec();
            joined.extend_from_slice(data);
            *pdata = Bytes::from(joined);
            *pfin = *fin;
            return;
        }
        events.push(ev);
    }

    /// Arbitrary bytes into a client and a server session, whole and split at points drawn from
    /// the input's first byte; the outcomes must match.
    pub fn session_input(data: &[u8]) {
        let Some((&seed, input)) = data.split_first() else {
            return;
        };
        for role in [Role::Client, Role::Server] {
            let whole = feed(role, input, None);
            let split = feed(role, input, Some(&mut Rng::new(seed as u64)));
            assert_eq!(whole, split, "split changed the outcome");
        }
    }

    /// Arbitrary bytes as header blocks: one block, two blocks in one context (split at a point
    /// named by the first byte), and the uncompressed parser. Errors are fine; panics and
    /// unbounded allocation are not.
    pub fn header_block(data: &[u8]) {
        let _ = HeaderDecoder::new().decode(data);
        if let Some((&cut, rest)) = data.split_first() {
            let cut = (cut as usize).min(rest.len());
            let mut dec = HeaderDecoder::new();
            if dec.decode(&rest[..cut]).is_ok() {
                let _ = dec.decode(&rest[cut..]);
            }
        }
        let _ = Headers::parse_block(data);
    }
}
