//! A TCP socket owned by an io_uring worker: the uring backend's [`Socket`].
//!
//! The socket is never registered with epoll: every byte moves through operations on the ring
//! of the worker whose tasks use it. Operations keep a clone of the handle, so the descriptor
//! stays open (its number cannot be reused by another socket) until the last operation that
//! names it has completed, even one queued for the next `io_uring_enter`.
//!
//! Between messages a local connection waits in a **multishot receive** into the ring's
//! provided buffers ([`Socket::recv_stream`]): one submission serves every message that
//! follows, each completion bringing the buffer the kernel picked. When the client starts
//! sending in bulk the relay asks for receives into buffers of its own ([`Socket::recv`]):
//! the multishot receive is cancelled first, and whatever it still took comes first, in order.
//!
//! Large DATA frames from an upstream (`ringfwd serve` sends up to 256 KiB) are spliced
//! upstream socket → pipe → local socket with `splice(2)` on the worker thread, waiting on a
//! ring poll when a socket is not ready; the socket is non-blocking so that a splice never
//! blocks the worker.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use io_uring::{cqueue, opcode, types};

use super::buf::{POOL_GROUP, PoolBuf};
use super::op::{self, MultiOp, Pooled, result};
use super::ring::{self, Brings};
use crate::proto::HEADROOM;
use crate::relay::backend::{Received, Socket};
use crate::relay::pipe::{Pipe, SpliceIn};

#[derive(Clone, Debug)]
pub struct RingSocket(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// Kept open by every operation that names it, until its last completion.
    fd: Arc<OwnedFd>,
    stream: Mutex<Stream>,
}

/// The multishot receive of a local connection and what it brought that nobody took yet.
#[derive(Default)]
struct Stream {
    op: Option<MultiOp>,
    /// Buffers a cancelled multishot receive still filled (bytes from the offset on are due
    /// before anything received later).
    pending: VecDeque<(PoolBuf, usize)>,
    /// The peer's end of file came through the multishot receive.
    eof: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("armed", &self.op.is_some())
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish()
    }
}

impl RingSocket {
    /// Take `fd`, a connected TCP socket, for the ring. It is made non-blocking: the ring's
    /// operations still wait for it (io_uring arms its own poll on EAGAIN for socket
    /// operations), and the splices, which are plain `splice(2)` calls on the worker thread
    /// (io_uring's splice runs in a kernel worker thread, which measured slower), must never
    /// block the worker.
    pub fn new(fd: OwnedFd) -> io::Result<RingSocket> {
        socket2::SockRef::from(&fd).set_nonblocking(true)?;
        Ok(RingSocket(Arc::new(Shared {
            fd: Arc::new(fd),
            stream: Mutex::new(Stream::default()),
        })))
    }

    /// A tokio socket, taken out of tokio's reactor.
    pub fn from_tokio(tcp: tokio::net::TcpStream) -> io::Result<RingSocket> {
        RingSocket::new(tcp.into_std()?.into())
    }

    pub(super) fn raw(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }

    fn stream(&self) -> MutexGuard<'_, Stream> {
        self.0.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the multishot receive, if one is armed, and keep what it still brings (in
    /// order) for the receives that follow.
    async fn stop_stream(&self) -> io::Result<()> {
        match self.stream().op.as_mut() {
            Some(op) => op.cancel(),
            None => return Ok(()),
        }
        let mut failed = None;
        loop {
            let next = std::future::poll_fn(|cx| match self.stream().op.as_mut() {
                Some(op) => op.poll_next(cx),
                None => Poll::Ready(None),
            })
            .await;
            let Some((res, flags)) = next else { break };
            let mut st = self.stream();
            if !cqueue::more(flags) {
                st.op = None;
            }
            match taken(res, flags) {
                Ok(Some(Received::Data(b))) => st.pending.push_back((b, 0)),
                Ok(Some(Received::Eof)) => st.eof = true,
                // Cancelled, or out of buffers: nothing was taken.
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                Err(e) => failed = Some(e),
            }
        }
        self.stream().op = None;
        match failed {
            Some(e) if self.stream().pending.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
}

/// A receive completion's result: a buffer it filled, the end of file, or nothing (out of
/// provided buffers).
fn taken(res: i32, flags: u32) -> io::Result<Option<Received>> {
    let pool = ring::with(|r| r.pool.clone()).ok_or_else(|| io::Error::other("no pool"))?;
    // Safety: this completion named the buffer, and it is taken once, here.
    let buf = cqueue::buffer_select(flags).map(|bid| unsafe { pool.take(bid, res.max(0) as u32) });
    match (result(res), buf) {
        (Ok(0), _) => Ok(Some(Received::Eof)),
        (Ok(_), Some(b)) => Ok(Some(Received::Data(b))),
        (Ok(_), None) => Err(io::Error::other("io_uring receive named no buffer")),
        (Err(e), _) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(None),
        (Err(e), _) => Err(e),
    }
}

/// Whether local connections wait in a multishot receive: off unless `RINGFWD_URING_MULTISHOT=1`.
/// Measured against single receives on this VM (perf/results/2026-12-06-uring-multishot.txt):
/// the same request rate with 16 connections of 64-byte messages, and bulk 3-9% slower at 3-20%
/// more CPU per GB, since each completion fills one pool buffer. A kernel before 6.0 refuses it,
/// and then it is off from the first refusal on.
fn multishot() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    (*ON.get_or_init(|| std::env::var("RINGFWD_URING_MULTISHOT").is_ok_and(|v| v == "1"))
        || FORCE_MULTISHOT.load(std::sync::atomic::Ordering::Relaxed))
        && !REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Turns multishot receives on whatever the environment says (the unit tests of that path).
pub(super) static FORCE_MULTISHOT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The kernel refused a multishot receive (EINVAL).
static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl AsFd for RingSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.fd.as_fd()
    }
}

impl Socket for RingSocket {
    async fn readable(&self) -> io::Result<()> {
        {
            let st = self.stream();
            if !st.pending.is_empty() || st.eof {
                return Ok(());
            }
        }
        op::poll(self, libc::POLLIN as u32).await.map(|_| ())
    }

    async fn recv(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        self.stop_stream().await?;
        {
            let mut st = self.stream();
            let mut n = 0;
            while n < max
                && let Some((b, off)) = st.pending.front_mut()
            {
                let data = &b.as_ref()[HEADROOM + *off..];
                let k = data.len().min(max - n);
                buf.extend_from_slice(&data[..k]);
                n += k;
                *off += k;
                if HEADROOM + *off == b.as_ref().len() {
                    st.pending.pop_front();
                }
            }
            if n > 0 || st.eof {
                return Ok(n);
            }
        }
        // The receive owns the buffer while the kernel may write into it.
        let (n, back) = op::recv(self, std::mem::take(buf), max).await;
        *buf = back;
        n
    }

    async fn recv_pooled(&self, max: usize) -> io::Result<Option<Received>> {
        Ok(match op::recv_pooled(self, max).await? {
            Pooled::Data(b) => Some(Received::Data(b)),
            Pooled::Eof => Some(Received::Eof),
            Pooled::NoBuffer => None,
        })
    }

    async fn recv_stream(&self, max: usize) -> io::Result<Option<Received>> {
        // (A multishot receive fills whole provided buffers, at most `max`'s worth each.)
        debug_assert!(max >= super::buf::POOL_BUF_LEN || !multishot());
        {
            let st = self.stream();
            if !st.pending.is_empty() {
                // Bytes a stopped multishot receive took: `recv` hands them out in order.
                return Ok(None);
            }
            if st.eof {
                return Ok(Some(Received::Eof));
            }
        }
        if !multishot() || ring::with(|r| r.pool.is_none()) {
            return self.recv_pooled(max).await;
        }
        std::future::poll_fn(|cx| {
            let mut st = self.stream();
            loop {
                if st.op.is_none() {
                    let fd = self.0.fd.clone();
                    // Safety: no memory of ours (the kernel fills pool buffers, each taken by
                    // its completion); the operation keeps the socket open until its last one.
                    st.op = Some(unsafe {
                        MultiOp::start(
                            opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), POOL_GROUP).build(),
                            Brings::Nothing,
                            Box::new(fd),
                        )
                    });
                }
                let next = st.op.as_mut().expect("armed above").poll_next(cx);
                let (res, flags) = match next {
                    Poll::Pending => return Poll::Pending,
                    // Ended without a word (its completion queue overflowed): arm another.
                    Poll::Ready(None) => {
                        st.op = None;
                        continue;
                    }
                    Poll::Ready(Some(c)) => c,
                };
                if !cqueue::more(flags) {
                    st.op = None;
                }
                let got = match taken(res, flags) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
                        Ok(None)
                    }
                    got => got,
                };
                if let Ok(Some(Received::Eof)) = got {
                    st.eof = true;
                }
                return Poll::Ready(got);
            }
        })
        .await
    }

    async fn send(&self, bufs: Vec<Bytes>, more: bool) -> (io::Result<usize>, Vec<Bytes>) {
        let flags = if more { libc::MSG_MORE } else { 0 };
        op::sendmsg(self, bufs, flags).await
    }

    async fn splice_in(&self, pipe: &Pipe, max: usize) -> io::Result<SpliceIn> {
        // Only an upstream socket splices in (the session reader), and upstream sockets never
        // wait in a multishot receive whose bytes would have to come first.
        let busy = {
            let st = self.stream();
            st.op.is_some() || !st.pending.is_empty()
        };
        if busy {
            return Err(io::Error::other(
                "splice from a socket in a multishot receive",
            ));
        }
        loop {
            let room = pipe.room();
            if room == 0 {
                return Ok(SpliceIn::Full);
            }
            match pipe.splice_in(self.raw(), max.min(room)) {
                Ok(0) => return Ok(SpliceIn::Eof),
                Ok(n) => return Ok(SpliceIn::Moved(n)),
                // A pipe with bytes in it may be out of slots, not the socket out of bytes:
                // let the consumer make room first (as the epoll backend does).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && pipe.fill() > 0 => {
                    return Ok(SpliceIn::Full);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    op::poll(self, libc::POLLIN as u32).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn splice_out(&self, pipe: &Pipe, mut len: usize, more: bool) -> io::Result<()> {
        while len > 0 {
            match pipe.splice_out(self.raw(), len, more) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => len -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    op::poll(self, libc::POLLOUT as u32).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
