//! WebSocket transport for port-forwarding, sans-IO.
//!
//! This module owns everything ringfwd speaks over WebSocket and nothing else: it never touches a
//! socket, a clock or the OS (masking keys come from a caller-seeded generator).
//!
//! Layout:
//! - [`frame`]: RFC 6455 framing: frame headers, masking, and [`WsCodec`], a message-level state
//!   machine (fragment reassembly, automatic pongs, the close handshake).
//! - [`handshake`]: pure helpers for the HTTP/1.1 upgrade (`Sec-WebSocket-Key`/`-Accept`,
//!   subprotocol negotiation) and the subprotocol names.
//! - [`channel`]: the Kubernetes `v4.channel.k8s.io` (and client-side `v4.base64.channel.k8s.io`)
//!   port-forward channel protocol as [`WsPortForward`], an implementation of
//!   [`PortForwardProtocol`](crate::proto::PortForwardProtocol).
//! - [`tunnel`]: [`WsTunnel`], the `SPDY/3.1+portforward.k8s.io` (KEP-4006) adapter that turns
//!   binary WebSocket messages into a plain SPDY byte stream and back.

pub mod channel;
pub mod frame;
pub mod handshake;
pub mod tunnel;

pub use channel::{Encoding, WsPortForward};
pub use frame::{CloseFrame, MaskRng, Message, Opcode, Role, WsCodec};
pub use handshake::{
    PROTOCOL_SPDY_TUNNEL, PROTOCOL_V4_BASE64_CHANNEL, PROTOCOL_V4_CHANNEL, accept_key,
    client_handshake, generate_key, port_query, select_subprotocol, validate_response,
};
pub use tunnel::WsTunnel;

/// Largest payload of one received frame we buffer. Frames are parsed whole so data messages
/// can be handed out as zero-copy slices; 16 MiB is far above what any Kubernetes peer sends
/// (32 KiB-ish writes) yet bounds memory a hostile peer can pin. Beyond it: close 1009.
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;

/// Largest reassembled fragmented message. Same reasoning as [`MAX_FRAME_PAYLOAD`]; RFC 6455
/// §10.4 asks endpoints to limit message size. Beyond it: close 1009.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Largest control-frame payload: RFC 6455 §5.5, "All control frames MUST have a payload length
/// of 125 bytes or less".
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest close reason: a close payload is a 2-byte code plus the reason, within
/// [`MAX_CONTROL_PAYLOAD`] (RFC 6455 §5.5.1).
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// Longest frame header: 2 bytes, 8-byte extended length, 4-byte masking key (RFC 6455 §5.2).
pub const MAX_HEADER_LEN: usize = 14;

/// Largest data payload one [`WsPortForward::frame_data`](crate::proto::PortForwardProtocol::frame_data)
/// call frames (excluding the channel byte). Kubernetes' `wsstream` peers read whole messages
/// with a 32 MiB cap (`golang.org/x/net/websocket`), and we as a server accept
/// [`MAX_FRAME_PAYLOAD`]; 1 MiB stays well under both and keeps per-frame latency small.
pub const MAX_SEND_PAYLOAD: usize = 1 << 20;

/// Most ports one `v4.channel.k8s.io` session can carry: the channel id is one byte and port `i`
/// uses channels `2i` and `2i + 1`, so `i <= 127`.
pub const MAX_PORTS: usize = 128;

/// Errors of the WebSocket layer. All are fatal for the session; [`WsError::close_code`] says
/// which close code the session queued (best effort) before reporting it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("reserved bits set in frame header (0x{0:02x}); no extension was negotiated")]
    ReservedBits(u8),
    #[error("unknown opcode 0x{0:x}")]
    UnknownOpcode(u8),
    #[error("server sent a masked frame")]
    MaskedFromServer,
    #[error("client sent an unmasked frame")]
    UnmaskedFromClient,
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(usize),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    #[error("message of {len} bytes exceeds the limit of {max}")]
    MessageTooLarge { len: usize, max: usize },
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    #[error("close frame with a 1-byte payload")]
    InvalidClosePayload,
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("the WebSocket is closing; nothing more may be sent")]
    Closed,
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("message on unknown channel {0}")]
    UnknownChannel(u8),
    #[error("channel {channel} announced port {got}, expected {expected}")]
    PortMismatch {
        channel: u8,
        expected: u16,
        got: u16,
    },
    #[error("invalid base64 in a v4.base64 message")]
    Base64,
    #[error("unexpected text message")]
    UnexpectedText,
    #[error("{0} ports requested; v4.channel.k8s.io carries at most 128")]
    TooManyPorts(usize),
}

impl WsError {
    /// The close code RFC 6455 §7.4.1 assigns to this failure.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::InvalidUtf8 | WsError::Base64 => 1007,
            WsError::FrameTooLarge { .. } | WsError::MessageTooLarge { .. } => 1009,
            WsError::UnexpectedText => 1003,
            _ => 1002,
        }
    }
}
