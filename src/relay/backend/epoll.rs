//! The epoll backend's splices: payload moves socket → pipe → socket in the kernel, never
//! through this process's memory, with tokio's reactor saying when a socket is ready. The
//! sockets are the [`super::copy`] backend's; this adds [`Socket::splice_in`] and
//! [`Socket::splice_out`](super::Socket::splice_out) for them.
//!
//! A pipe holds a bounded number of page references, not bytes (see [`crate::relay::pipe`]),
//! so "would block" while splicing into a pipe that has bytes in it means "wait for the
//! consumer", never "the socket is empty" (which would clear the socket's readiness and could
//! wait forever for data that is already there).

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

#[allow(unused_imports)]
use super::Socket;
use crate::relay::pipe::{Pipe, SpliceIn};

/// Move up to `len` bytes the socket has (at least one, waiting for them) into `pipe`.
pub async fn splice_in(tcp: &TcpStream, pipe: &Pipe, len: usize) -> io::Result<SpliceIn> {
    let fd = tcp.as_raw_fd();
    let done = |n| match n {
        0 => SpliceIn::Eof,
        n => SpliceIn::Moved(n),
    };
    loop {
        let room = pipe.room();
        if room == 0 {
            return Ok(SpliceIn::Full);
        }
        let want = len.min(room);
        tcp.readable().await?;
        if pipe.fill() > 0 {
            // "Would block" is ambiguous here (empty socket or pipe out of slots): keep the
            // socket's readiness and let the consumer make room.
            match pipe.splice_in(fd, want) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(SpliceIn::Full),
                r => return r.map(done),
            }
        }
        // An empty pipe has every slot free: "would block" means the socket is empty.
        match tcp.try_io(Interest::READABLE, || pipe.splice_in(fd, want)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r.map(done),
        }
    }
}

/// Move exactly `len` bytes, which are in `pipe`, to the socket, waiting for it to take them.
/// `more`: further payload follows at once.
pub async fn splice_out(
    tcp: &TcpStream,
    pipe: &Pipe,
    mut len: usize,
    more: bool,
) -> io::Result<()> {
    let fd = tcp.as_raw_fd();
    while len > 0 {
        tcp.writable().await?;
        match tcp.try_io(Interest::WRITABLE, || pipe.splice_out(fd, len, more)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
