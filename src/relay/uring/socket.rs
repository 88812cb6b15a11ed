//! A TCP socket owned by an io_uring worker: the uring backend's [`Socket`].
//!
//! The socket is never registered with epoll: every byte moves through operations on the ring
//! of the worker whose tasks use it. Operations keep a clone of the handle, so the descriptor
//! stays open (its number cannot be reused by another socket) until the last operation that
//! names it has completed, even one queued for the next `io_uring_enter`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::op::{self, Pooled};
use crate::relay::backend::{Received, Socket};

#[derive(Clone, Debug)]
pub struct RingSocket(Arc<OwnedFd>);

impl RingSocket {
    /// Take `fd`, a connected TCP socket, for the ring. It is made blocking: io_uring then
    /// waits for it in the kernel instead of answering EAGAIN.
    pub fn new(fd: OwnedFd) -> io::Result<RingSocket> {
        socket2::SockRef::from(&fd).set_nonblocking(false)?;
        Ok(RingSocket(Arc::new(fd)))
    }

    /// A tokio socket, taken out of tokio's reactor.
    pub fn from_tokio(tcp: tokio::net::TcpStream) -> io::Result<RingSocket> {
        RingSocket::new(tcp.into_std()?.into())
    }

    pub(super) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for RingSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Socket for RingSocket {
    async fn readable(&self) -> io::Result<()> {
        op::poll(self, libc::POLLIN as u32).await.map(|_| ())
    }

    async fn recv(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
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

    async fn send(&self, bufs: Vec<Bytes>, more: bool) -> (io::Result<usize>, Vec<Bytes>) {
        let flags = if more { libc::MSG_MORE } else { 0 };
        op::sendmsg(self, bufs, flags).await
    }
}
