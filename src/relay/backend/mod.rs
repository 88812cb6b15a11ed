//! The small interface the relay is written against: how one TCP socket's bytes move.
//!
//! [`conn`](super::conn) (a forwarded connection's two halves) and [`session`](super::session)
//! (a plain TCP upstream's reader and writer) are written once, against [`Socket`]; each
//! backend says only how bytes move:
//! - [`copy`]: tokio's epoll reactor, every byte through user memory (`--data-plane copy`, and
//!   everything on the `epoll` plane that is not spliced);
//! - [`epoll`]: the same sockets, plus splice(2) through a pipe (`--data-plane epoll`);
//! - [`crate::relay::uring`]: a socket owned by an io_uring worker, never registered with
//!   epoll (`--data-plane uring`).
//!
//! The relay never asks which backend runs: a backend that cannot do something (splice, a
//! receive into a buffer picked on arrival) says so through the defaults below, and the relay
//! takes the plain path.

pub mod copy;
pub mod epoll;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;

use bytes::{Bytes, BytesMut};

use super::pipe::{Pipe, SpliceIn};
use super::uring::PoolBuf;

/// What a receive into a buffer picked on arrival got.
pub enum Received {
    Data(PoolBuf),
    /// The peer's end of file.
    Eof,
}

/// One TCP socket of the data plane (a local client, a dialled target, an upstream session's
/// connection), as the relay uses it. Every method takes `&self`: a connection's two halves
/// use the socket at once.
pub trait Socket: AsFd + Send + Sync + 'static {
    /// Wait until the socket has bytes (or an end, or an error) to receive, holding no buffer.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Receive up to `max` bytes (waiting for at least one), appended to `buf`, which the
    /// caller has made room in. `Ok(0)` is the peer's end of file.
    fn recv(
        &self,
        buf: &mut BytesMut,
        max: usize,
    ) -> impl Future<Output = io::Result<usize>> + Send;

    /// Receive up to `max` bytes into a buffer picked when they arrive, so that a socket
    /// waiting for a quiet peer holds none. `Ok(None)`: not now or not here (no such
    /// buffers, or none free); wait with [`readable`](Self::readable) and [`recv`](Self::recv).
    fn recv_pooled(
        &self,
        _max: usize,
    ) -> impl Future<Output = io::Result<Option<Received>>> + Send {
        std::future::ready(Ok(None))
    }

    /// [`recv_pooled`](Self::recv_pooled) for a socket that receives message after message
    /// (a local connection between messages): the backend may keep one receive armed for all
    /// of them (io_uring's multishot receive). Mixing it with [`recv`](Self::recv) keeps the
    /// bytes in order.
    fn recv_stream(&self, max: usize) -> impl Future<Output = io::Result<Option<Received>>> + Send {
        self.recv_pooled(max)
    }

    /// One send of as much of `bufs`, in order, as the socket takes (waiting for room for at
    /// least one byte); how many bytes. `more`: further bytes follow at once (the kernel may
    /// hold back a partial segment). The buffers come back with the result.
    fn send(
        &self,
        bufs: Vec<Bytes>,
        more: bool,
    ) -> impl Future<Output = (io::Result<usize>, Vec<Bytes>)> + Send;

    /// Move up to `max` bytes the socket has into `pipe`, without reading them (waiting for at
    /// least one). Backends that cannot splice return `Unsupported` (the relay does not ask
    /// them: see [`crate::relay::Session::can_splice`]).
    fn splice_in(
        &self,
        _pipe: &Pipe,
        _max: usize,
    ) -> impl Future<Output = io::Result<SpliceIn>> + Send {
        std::future::ready(Err(io::ErrorKind::Unsupported.into()))
    }

    /// Move exactly `len` bytes, which are in `pipe`, to the socket. As `splice_in`.
    fn splice_out(
        &self,
        _pipe: &Pipe,
        _len: usize,
        _more: bool,
    ) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Err(io::ErrorKind::Unsupported.into()))
    }
}

/// Send every byte of `bufs` in order, as few sends as the socket allows (the buffers are
/// consumed). `more`: further bytes follow at once.
pub async fn send_all<S: Socket>(sock: &S, mut bufs: Vec<Bytes>, more: bool) -> io::Result<()> {
    loop {
        bufs.retain(|b| !b.is_empty());
        if bufs.is_empty() {
            return Ok(());
        }
        let (n, back) = sock.send(bufs, more).await;
        bufs = back;
        let mut n = n?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for b in bufs.iter_mut() {
            if n >= b.len() {
                n -= b.len();
                done += 1;
            } else {
                bytes::Buf::advance(b, n);
                break;
            }
        }
        bufs.drain(..done);
    }
}

/// Shut the socket's write side: the peer reads an end of file once everything sent has
/// arrived.
pub fn shutdown_write(sock: &(impl AsFd + ?Sized)) -> io::Result<()> {
    socket2::SockRef::from(&sock.as_fd()).shutdown(std::net::Shutdown::Write)
}

/// Close with a TCP reset instead of a FIN (SO_LINGER 0): for a transfer that broke, which
/// must never look like a clean end.
pub fn reset_on_close(sock: &(impl AsFd + ?Sized)) {
    let _ = socket2::SockRef::from(&sock.as_fd()).set_linger(Some(std::time::Duration::ZERO));
}

/// Whether a socket that just read end of file was reset rather than closed. Linux reports a
/// received reset once, to whichever read or write asks first; a read after that sees end of
/// file. With our side still open, a peer's clean close leaves the socket in CLOSE_WAIT; a
/// reset leaves it CLOSED (seen on the io_uring plane: the blocked send to an aborting target
/// took the error and the read that followed found 0, which would have passed the abort on as
/// a clean end).
pub fn reset_by_peer(sock: &(impl AsFd + ?Sized)) -> bool {
    const TCP_CLOSE: u8 = 7;
    use std::os::fd::AsRawFd;
    // Safety: a zeroed tcp_info is valid; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // Safety: a valid socket, and `info`/`len` as above.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    r == 0 && info.tcpi_state == TCP_CLOSE
}

/// Whether the peer has hung up (end of file or reset) where nothing has read it yet.
pub fn hung_up(sock: &(impl AsFd + ?Sized)) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: sock.as_fd().as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // Safety: one valid pollfd, and a zero timeout (the call does not wait).
    let ready = unsafe { libc::poll(&mut p, 1, 0) };
    ready == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
