//! The SPDY-in-WebSocket tunnel (`SPDY/3.1+portforward.k8s.io`) as a byte stream.
//!
//! [`TunnelIo`] wraps the upgraded API-server connection and drives the sans-IO
//! [`WsTunnel`]: what the session writes goes out as one masked binary message per write, and
//! what the session reads is the concatenated payload of the server's binary messages. The
//! session on top runs plain SPDY, unchanged, as it would over TCP; message boundaries carry no
//! meaning. Pings from the server are answered; a close from the server ends the stream.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proto::HEADROOM;
use crate::proto::ws::WsTunnel;

/// Largest message one write becomes. The session's writes are batches of SPDY frames; this
/// bounds the buffer a batch is masked into.
pub const MAX_TUNNEL_MESSAGE: usize = super::READ_BUF;

/// How much wire input is read at once.
const WIRE_READ: usize = 64 * 1024;

/// Normal closure, RFC 6455 section 7.4.1.
const CLOSE_NORMAL: u16 = 1000;

/// A SPDY byte stream carried in WebSocket binary messages over `IO`.
pub struct TunnelIo<IO> {
    io: IO,
    ws: WsTunnel,
    /// Wire bytes read but not yet decoded (a partial frame).
    wire: BytesMut,
    /// Decoded SPDY bytes not yet handed to the reader.
    plain: BytesMut,
    /// Framed bytes not yet written.
    out: BytesMut,
    wire_eof: bool,
    close_sent: bool,
    /// The writing task is waiting for the socket to take [`Self::out`]. The reading task must
    /// not poll the socket for writing then: a tokio socket remembers one write waker, and the
    /// reader's would replace the writer's, stalling it. It hands its pongs to the writer.
    writer_waiting: Option<std::task::Waker>,
    /// The reading task queued control frames it could not send yet and the writer was idle:
    /// the reader finishes them when the socket wakes it.
    control_pending: bool,
}

impl<IO> TunnelIo<IO> {
    /// `prefix`: wire bytes that arrived with the upgrade response.
    pub fn new(io: IO, prefix: &[u8], mask_seed: u64) -> Self {
        let mut wire = BytesMut::with_capacity(WIRE_READ * 2);
        wire.extend_from_slice(prefix);
        TunnelIo {
            io,
            ws: WsTunnel::client(mask_seed),
            wire,
            plain: BytesMut::new(),
            out: BytesMut::with_capacity(MAX_TUNNEL_MESSAGE + HEADROOM),
            wire_eof: false,
            close_sent: false,
            writer_waiting: None,
            control_pending: false,
        }
    }

    fn queue_control(&mut self) {
        while let Some(b) = self.ws.poll_transmit() {
            self.out.extend_from_slice(&b);
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("websocket tunnel: {e}"))
}

impl<IO: AsyncWrite + Unpin> TunnelIo<IO> {
    /// Write out everything framed so far.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// [`poll_drain`](Self::poll_drain) for the writing side: remembers when it waits.
    fn poll_drain_writer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.poll_drain(cx);
        self.writer_waiting = r.is_pending().then(|| cx.waker().clone());
        r
    }

    /// From the reading side: get queued control frames going without stealing the writer's
    /// wake-up. If the writer waits on the socket, it sends them with its own bytes.
    fn push_control(&mut self, cx: &mut Context<'_>) {
        self.control_pending = false;
        if self.out.is_empty() {
            return;
        }
        match &self.writer_waiting {
            Some(w) => w.wake_by_ref(),
            // The socket wakes this task when it takes more; an error shows on the next write.
            None => {
                let _ = self.poll_drain(cx);
                self.control_pending = !self.out.is_empty();
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TunnelIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.control_pending {
            this.push_control(cx);
        }
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.ws.peer_close().is_some() || this.wire_eof {
                // End of the SPDY stream. A close reply still queued goes out if it can.
                this.push_control(cx);
                return Poll::Ready(Ok(()));
            }
            this.wire.reserve(WIRE_READ);
            let n = {
                let spare = this.wire.spare_capacity_mut();
                let mut rb = ReadBuf::uninit(spare);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                rb.filled().len()
            };
            if n == 0 {
                this.wire_eof = true;
            } else {
                // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
                unsafe { this.wire.set_len(this.wire.len() + n) };
            }
            this.ws
                .decode(&mut this.wire, &mut this.plain)
                .map_err(invalid)?;
            this.queue_control();
            // Pongs and close replies.
            this.push_control(cx);
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TunnelIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain_writer(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let total = bufs
            .iter()
            .map(|b| b.len())
            .sum::<usize>()
            .min(MAX_TUNNEL_MESSAGE);
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        // One copy, into the output buffer behind room for the header; masked in place there.
        this.out.clear();
        this.out.extend_from_slice(&[0u8; HEADROOM]);
        let mut left = total;
        for b in bufs {
            let take = b.len().min(left);
            this.out.extend_from_slice(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        let start = this
            .ws
            .encode_in_place(&mut this.out, total)
            .map_err(invalid)?;
        this.out.advance(start);
        this.queue_control();
        // Accepted: the bytes are ours now. Start sending; the next call finishes.
        let _ = this.poll_drain_writer(cx)?;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain_writer(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain_writer(cx))?;
        if !this.close_sent {
            this.close_sent = true;
            // Fails only if the server closed first; its close was answered already.
            if this.ws.close(CLOSE_NORMAL, "").is_ok() {
                this.queue_control();
            }
            ready!(this.poll_drain_writer(cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ws::frame::{Message, Opcode, Role, WsCodec};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// The server end: a WebSocket codec in server role over the other half of a duplex pipe.
    async fn server_read_all(
        mut io: tokio::io::DuplexStream,
        codec: &mut WsCodec,
    ) -> (Vec<u8>, bool) {
        let mut wire = BytesMut::new();
        let mut data = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            while let Some(m) = codec.read(&mut wire).unwrap() {
                match m {
                    Message::Binary(b) => data.extend_from_slice(&b),
                    Message::Close(_) => return (data, true),
                    other => panic!("unexpected {other:?}"),
                }
            }
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                return (data, false);
            }
            wire.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn writes_become_masked_messages_and_shutdown_sends_close() {
        let (client, server) = duplex(1 << 20);
        let mut t = TunnelIo::new(client, &[], 7);
        let big: Vec<u8> = (0..MAX_TUNNEL_MESSAGE + 1000).map(|i| i as u8).collect();
        let h = tokio::spawn(async move {
            let mut codec = WsCodec::new(Role::Server, 0);
            server_read_all(server, &mut codec).await
        });
        t.write_all(b"hello ").await.unwrap();
        t.write_all(&big).await.unwrap();
        t.shutdown().await.unwrap();
        let (data, closed) = h.await.unwrap();
        let mut want = b"hello ".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(data, want);
        assert!(closed, "shutdown must send a close frame");
    }

    #[tokio::test]
    async fn reads_join_messages_split_anywhere_and_answer_pings() {
        let (client, mut server) = duplex(1 << 20);
        let mut srv = WsCodec::new(Role::Server, 0);
        let mut wire = BytesMut::new();
        for (op, p) in [
            (Opcode::Binary, &b"abc"[..]),
            (Opcode::Ping, &b"p1"[..]),
            (Opcode::Binary, &b""[..]),
            (Opcode::Binary, &b"defgh"[..]),
        ] {
            srv.send(op, p).unwrap();
            while let Some(b) = srv.poll_transmit() {
                wire.extend_from_slice(&b);
            }
        }
        // The first two bytes arrive with the upgrade response.
        let mut t = TunnelIo::new(client, &wire[..2], 1);
        let rest = wire[2..].to_vec();
        let feeder = tokio::spawn(async move {
            for chunk in rest.chunks(3) {
                server.write_all(chunk).await.unwrap();
            }
            srv.close(1000, "bye").unwrap();
            while let Some(b) = srv.poll_transmit() {
                server.write_all(&b).await.unwrap();
            }
            // The pong and the close reply come back.
            let mut codec = WsCodec::new(Role::Server, 0);
            let mut wire = BytesMut::new();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while got.len() < 2 {
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "tunnel closed before answering: {got:?}");
                wire.extend_from_slice(&buf[..n]);
                while let Some(m) = codec.read(&mut wire).unwrap() {
                    got.push(m);
                }
            }
            got
        });
        let mut data = Vec::new();
        t.read_to_end(&mut data).await.unwrap();
        assert_eq!(data, b"abcdefgh");
        t.flush().await.unwrap();
        let got = feeder.await.unwrap();
        assert!(
            matches!(&got[0], Message::Pong(p) if &p[..] == b"p1"),
            "{got:?}"
        );
        assert!(matches!(&got[1], Message::Close(_)), "{got:?}");
    }

    /// A ping that arrives while the writer waits for a full socket: the pong must not take
    /// the writer's wake-up (a socket remembers one write waker), or the upload stalls.
    #[tokio::test(flavor = "current_thread")]
    async fn pong_while_the_writer_is_blocked_does_not_stall_it() {
        let (client, mut server) = duplex(64 * 1024);
        let (mut rd, mut wr) = tokio::io::split(TunnelIo::new(client, &[], 3));
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        let want = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        // One scheduler turn: on this runtime the writer runs until the pipe is full.
        tokio::task::yield_now().await;
        assert!(!writer.is_finished());
        let mut srv = WsCodec::new(Role::Server, 0);
        srv.send(Opcode::Ping, b"are you there").unwrap();
        while let Some(b) = srv.poll_transmit() {
            server.write_all(&b).await.unwrap();
        }
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        tokio::task::yield_now().await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            let (mut data, mut pong, mut wire) = (Vec::new(), false, BytesMut::new());
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                while let Some(m) = srv.read(&mut wire).unwrap() {
                    match m {
                        Message::Binary(b) => data.extend_from_slice(&b),
                        Message::Pong(_) => pong = true,
                        Message::Close(_) => return (data, pong),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "client went away");
                wire.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the writer stalled after the pong");
        writer.await.unwrap();
        reader.abort();
        assert!(got.1, "no pong");
        assert!(got.0 == want, "data changed");
    }

    /// A ping that arrives while the writer is idle and the socket is full: the reader sends
    /// the pong itself once the socket takes bytes again, without waiting for a write.
    #[tokio::test]
    async fn pong_goes_out_when_the_socket_drains_with_the_writer_idle() {
        const PIPE: usize = 4096;
        let (client, mut server) = duplex(PIPE);
        let (mut rd, mut wr) = tokio::io::split(TunnelIo::new(client, &[], 5));
        // One message of exactly the pipe's size (8 bytes of header with the mask): the pipe
        // is full and the writer is idle.
        let payload = vec![7u8; PIPE - 8];
        wr.write_all(&payload).await.unwrap();
        wr.flush().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let mut srv = WsCodec::new(Role::Server, 0);
        srv.send(Opcode::Ping, b"still there?").unwrap();
        while let Some(b) = srv.poll_transmit() {
            server.write_all(&b).await.unwrap();
        }
        // On this single-threaded runtime the reader now reads the ping and finds no room for
        // the pong; only then does the server start reading.
        tokio::task::yield_now().await;
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let (mut msgs, mut wire) = (Vec::new(), BytesMut::new());
            let mut buf = vec![0u8; PIPE];
            loop {
                while let Some(m) = srv.read(&mut wire).unwrap() {
                    if matches!(m, Message::Pong(_)) {
                        return msgs;
                    }
                    msgs.push(m);
                }
                let n = server.read(&mut buf).await.unwrap();
                assert!(n > 0, "client went away");
                wire.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the pong never left while the writer was idle");
        reader.abort();
        assert!(matches!(&got[..], [Message::Binary(b)] if b[..] == payload[..]));
    }
}
