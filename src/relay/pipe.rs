//! Kernel pipes for splice(2): payload moves socket → pipe → socket without entering this
//! process's memory.
//!
//! This module owns the pipe file descriptors, the raw `splice` calls and the byte count of
//! what sits in a pipe. A [`Pipe`] carries one connection's payload in one direction: one side
//! splices in, the other splices the same bytes out, in order. Both sides know how much is in
//! it ([`Pipe::fill`]), so neither ever waits on the pipe itself: the producer waits for
//! [`Pipe::drained`] when it is full, the consumer only splices bytes it was told are there.
//! Waiting for the sockets is the epoll backend's ([`super::backend::epoll`]).
//!
//! A pipe holds a bounded number of page references (16 slots by default), not bytes: payload
//! spliced from a TCP socket takes a slot per socket buffer fragment, so a pipe can be "full"
//! with fewer bytes in it than its size.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Size asked for each pipe (the default is 64 KiB). More room means fewer wake-ups per GB;
/// the pages are only taken while payload is in flight. A refusal (over the per-user pipe
/// quota, `fs.pipe-user-pages-soft`) leaves the default.
pub const PIPE_SIZE: usize = 256 * 1024;

/// One direction of one connection's payload in the kernel. See the module docs.
#[derive(Debug)]
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Bytes spliced in and not yet spliced out.
    fill: AtomicUsize,
    /// Woken (one permit) whenever bytes are spliced out.
    drained: Notify,
    cap: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // Safety: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Safety: fcntl on a descriptor we own; an error leaves the pipe as it was.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        // Safety: as above; F_GETPIPE_SZ only reads.
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let cap = if cap > 0 { cap as usize } else { 64 * 1024 };
        Ok(Pipe {
            rd,
            wr,
            fill: AtomicUsize::new(0),
            drained: Notify::new(),
            cap,
        })
    }

    /// Bytes in the pipe.
    pub fn fill(&self) -> usize {
        self.fill.load(Ordering::Acquire)
    }

    /// Room left, by bytes (see the module docs for why a splice may still find it full).
    pub fn room(&self) -> usize {
        self.cap.saturating_sub(self.fill())
    }

    /// Resolves after bytes were taken out since the last wake-up (or at once if they were).
    pub async fn drained(&self) {
        self.drained.notified().await
    }

    /// One non-blocking splice of up to `len` bytes from `fd` into the pipe; `Ok(0)` is the
    /// socket's end of file.
    pub(super) fn splice_in(&self, fd: RawFd, len: usize) -> io::Result<usize> {
        let n = splice(fd, self.wr.as_raw_fd(), len, 0)?;
        self.filled(n);
        Ok(n)
    }

    /// `n` bytes were spliced in.
    fn filled(&self, n: usize) {
        self.fill.fetch_add(n, Ordering::AcqRel);
    }

    /// `n` bytes were spliced out: wake a producer waiting for room.
    fn emptied(&self, n: usize) {
        self.fill.fetch_sub(n, Ordering::AcqRel);
        self.drained.notify_one();
    }

    /// One non-blocking splice of up to `len` bytes (which must be in the pipe) out to `fd`.
    /// `more`: further payload follows at once (the kernel may hold a partial segment).
    pub(super) fn splice_out(&self, fd: RawFd, len: usize, more: bool) -> io::Result<usize> {
        debug_assert!(len <= self.fill());
        let flags = if more { libc::SPLICE_F_MORE } else { 0 };
        let n = splice(self.rd.as_raw_fd(), fd, len, flags)?;
        self.emptied(n);
        Ok(n)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize, flags: libc::c_uint) -> io::Result<usize> {
    // Safety: plain descriptors and no user memory; null offsets mean "current position",
    // which is what pipes and sockets require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags | libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What a splice into a pipe did.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceIn {
    /// Moved this many bytes (at least one).
    Moved(usize),
    /// The socket's end of file.
    Eof,
    /// The pipe has no room: wait for [`Pipe::drained`], then try again.
    Full,
}

/// Whether this kernel splices between TCP sockets and pipes (it has since 2.6.25; a seccomp
/// profile may still forbid the call).
pub fn available() -> bool {
    let Ok(p) = Pipe::new() else { return false };
    // Splicing nothing from the pipe's read end into its own write end is refused with
    // EINVAL (same pipe) where splice exists, ENOSYS/EPERM where it does not.
    match splice(p.rd.as_raw_fd(), p.wr.as_raw_fd(), 0, 0) {
        Ok(_) => true,
        Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::tests::pair;

    /// Bytes go socket → pipe → socket unchanged and in order, the fill count follows them,
    /// and a producer facing a full pipe waits for the consumer instead of failing.
    #[tokio::test]
    async fn payload_crosses_a_pipe_unchanged() {
        assert!(available());
        let (a_in, b_in) = pair().await;
        let (a_out, b_out) = pair().await;
        let pipe = std::sync::Arc::new(Pipe::new().unwrap());
        assert!(pipe.cap >= 64 * 1024);
        let total = 8 << 20;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        let (writer, reader) = crate::relay::tests::send_and_collect(a_in, b_out, &data);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let consumer = tokio::spawn({
            let pipe = pipe.clone();
            async move {
                while let Some(n) = rx.recv().await {
                    crate::relay::backend::epoll::splice_out(&a_out, &pipe, n, false)
                        .await
                        .unwrap();
                }
                drop(a_out);
            }
        });
        let (mut moved, mut full) = (0, 0);
        loop {
            let n = match crate::relay::backend::epoll::splice_in(&b_in, &pipe, 1 << 20)
                .await
                .unwrap()
            {
                SpliceIn::Moved(n) => n,
                SpliceIn::Eof => break,
                SpliceIn::Full => {
                    full += 1;
                    pipe.drained().await;
                    continue;
                }
            };
            assert!(pipe.fill() <= pipe.cap);
            moved += n;
            tx.send(n).unwrap();
        }
        assert!(
            full > 0,
            "8 MiB never filled the pipe: the consumer was not exercised"
        );
        drop(tx);
        consumer.await.unwrap();
        writer.await.unwrap();
        assert_eq!(moved, total);
        assert_eq!(pipe.fill(), 0);
        assert!(reader.await.unwrap() == data, "payload changed on the way");
    }
}
