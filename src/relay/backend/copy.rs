//! The copy backend: tokio's epoll reactor drives the socket, and every byte goes through user
//! memory (one `recv` into a buffer, one `sendmsg` of many buffers). This is the whole of
//! `--data-plane copy`, and the part of the `epoll` plane that is not spliced ([`super::epoll`]
//! adds the splices to the same sockets).

use std::io;
use std::os::fd::AsRawFd;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Socket;
use crate::relay::pipe::{Pipe, SpliceIn};

/// iovecs one `sendmsg` takes at most (the rest goes in the next).
const MAX_IOV: usize = 64;

impl Socket for TcpStream {
    async fn readable(&self) -> io::Result<()> {
        // A peek, not tokio's readiness: that can be spurious (tokio reports a new socket
        // ready at first), and a caller that then allocates a buffer for a receive that finds
        // nothing holds it while it waits (seen as 2,863 of 3,000 idle connections holding 64
        // KiB). A poll function, not `peek()`: its future is 150-230 bytes that every idle
        // connection would carry.
        let mut one = [0u8; 1];
        std::future::poll_fn(|cx| self.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut one)))
            .await
            .map(|_| ())
    }

    async fn recv(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        loop {
            std::future::poll_fn(|cx| self.poll_read_ready(cx)).await?;
            match self.try_read_buf(&mut (&mut *buf).limit(max)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }

    async fn send(&self, bufs: Vec<Bytes>, more: bool) -> (io::Result<usize>, Vec<Bytes>) {
        let flags = libc::MSG_NOSIGNAL
            | match more || bufs.len() > MAX_IOV {
                true => libc::MSG_MORE,
                false => 0,
            };
        loop {
            if let Err(e) = std::future::poll_fn(|cx| self.poll_write_ready(cx)).await {
                return (Err(e), bufs);
            }
            match self.try_io(Interest::WRITABLE, || sendmsg(self, &bufs, flags)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return (r, bufs),
            }
        }
    }

    fn splice_in(
        &self,
        pipe: &Pipe,
        max: usize,
    ) -> impl Future<Output = io::Result<SpliceIn>> + Send {
        super::epoll::splice_in(self, pipe, max)
    }

    fn splice_out(
        &self,
        pipe: &Pipe,
        len: usize,
        more: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        super::epoll::splice_out(self, pipe, len, more)
    }
}

/// One non-blocking `sendmsg` of up to [`MAX_IOV`] of `bufs`.
fn sendmsg(tcp: &TcpStream, bufs: &[Bytes], flags: i32) -> io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    let n = bufs.len().min(MAX_IOV);
    for (v, b) in iov.iter_mut().zip(bufs) {
        *v = libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
    }
    // Safety: a zeroed msghdr is valid (no name, no control data); `iov` points at live
    // slices of `bufs`, which outlive this call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n;
    // Safety: a valid socket and the msghdr above; the kernel only reads the buffers.
    let sent = unsafe { libc::sendmsg(tcp.as_raw_fd(), &msg, flags) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}
