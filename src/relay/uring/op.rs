//! Operations in flight as futures, and the socket operations the relay uses.
//!
//! [`Op`] is one submission and its completion: it owns what the kernel uses (buffers, iovecs,
//! the socket handle) and hands it back with the result. Dropped before its completion, it
//! moves all of that into its slot and queues a cancel (see [`super::ring`]). [`MultiOp`] is a
//! multishot submission (a completion per result). Only [`Op::start`] and [`MultiOp::start`]
//! are unsafe; every function after them is a safe wrapper whose types carry the promises:
//! buffers are [`IoBuf`]s, sockets are [`RingSocket`]s whose descriptor an operation keeps
//! open.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types};

use super::buf::{IoBuf, IoBufMut, POOL_BUF_LEN, POOL_GROUP, PoolBuf};
use super::ring::{self, Brings, Slot};
use super::socket::RingSocket;

/// One operation in flight: resolves to its result, its completion flags and what it kept.
///
/// A dropped operation is cancelled, but it may complete before the cancel reaches it (an
/// entry queued and dropped in the same loop turn always can): a receive dropped early may
/// have taken bytes that are then lost. Drop one only when the socket's input no longer
/// matters (the relay drops receives only when it ends the connection or the session).
pub(super) struct Op<T: 'static> {
    slot: usize,
    /// `None` once the result was taken.
    keep: Option<T>,
}

impl<T: Send + 'static> Op<T> {
    /// Queue the entry `entry` builds (its `user_data` is set here) on this worker's ring.
    ///
    /// # Safety
    /// Every pointer in the entry must point into heap memory that `keep` owns and that stays
    /// in place when `keep` is moved (an [`IoBuf`], a `Box`), or into memory that outlives the
    /// operation; every descriptor it names by number must be kept open by `keep`.
    pub(super) unsafe fn start(mut keep: T, entry: impl FnOnce(&mut T) -> squeue::Entry) -> Op<T> {
        let e = entry(&mut keep);
        ring::with(|r| {
            let slot = r.take_slot(Slot::Waiting(None));
            // Safety: the caller's promise; `keep` goes into this Op, and into the slot if
            // the Op is dropped first.
            unsafe { r.push(&e.user_data(slot as u64)) };
            Op {
                slot,
                keep: Some(keep),
            }
        })
    }

    /// The raw result (negative: an errno), the completion's flags and what the operation
    /// kept.
    pub(super) fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<(i32, u32, T)> {
        let slot = self.slot;
        let done = ring::with(|r| match r.slot(slot) {
            Slot::Done(res, flags) => {
                let done = (*res, *flags);
                r.free_slot(slot);
                Some(done)
            }
            Slot::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *w = Some(cx.waker().clone());
                }
                None
            }
            Slot::Free | Slot::Abandoned(..) | Slot::Stream(..) => {
                unreachable!("slot of a live single operation")
            }
        });
        match done {
            Some((res, flags)) => {
                let keep = self.keep.take().expect("polled after completion");
                Poll::Ready((res, flags, keep))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: Send + Unpin + 'static> Future for Op<T> {
    type Output = (io::Result<u32>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_done(cx).map(|(res, _, keep)| (result(res), keep))
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(keep) = self.keep.take() else { return };
        let slot = self.slot;
        let mut keep = Some(keep);
        // What the operation kept is dropped after the ring is let go of (a socket handle
        // closes its descriptor then).
        let done = ring::try_with(|r| {
            let done = match r.slot(slot) {
                Slot::Done(_, flags) => Some(*flags),
                Slot::Waiting(_) => None,
                Slot::Free | Slot::Abandoned(..) | Slot::Stream(..) => {
                    unreachable!("slot of a live single operation")
                }
            };
            match done {
                Some(flags) => {
                    r.give_back(flags);
                    r.free_slot(slot);
                    keep.take()
                }
                None => {
                    let k = keep.take().expect("kept until dropped");
                    *r.slot(slot) = Slot::Abandoned(Box::new(k), Brings::Nothing);
                    r.cancel(slot);
                    None
                }
            }
        });
        drop(done);
        if let Some(k) = keep {
            // Dropped off its worker (a thread ending): never free what the kernel may use.
            std::mem::forget(k);
        }
    }
}

/// A raw result as `io::Result`.
pub(super) fn result(res: i32) -> io::Result<u32> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as u32)
    }
}

/// A multishot operation: one submission, then a completion per result for as long as the
/// kernel keeps it armed. [`MultiOp::poll_next`] says `None` after the last one.
pub(super) struct MultiOp {
    slot: usize,
    brings: Brings,
    ended: bool,
    /// What the entry names (its socket), kept until the last completion (in the slot once
    /// this value is dropped).
    keep: Option<Box<dyn std::any::Any + Send>>,
}

impl MultiOp {
    /// Queue the multishot entry `entry`. `brings`: whether its successful completions are new
    /// descriptors (closed here if nobody takes them).
    ///
    /// # Safety
    /// As [`Op::start`]: every pointer in the entry points into `keep` or into memory that
    /// outlives the operation, and `keep` holds open every descriptor it names.
    pub(super) unsafe fn start(
        entry: squeue::Entry,
        brings: Brings,
        keep: Box<dyn std::any::Any + Send>,
    ) -> MultiOp {
        ring::with(|r| {
            let slot = r.take_slot(Slot::Stream(None, Default::default()));
            // Safety: the caller's promise.
            unsafe { r.push(&entry.user_data(slot as u64)) };
            MultiOp {
                slot,
                brings,
                ended: false,
                keep: Some(keep),
            }
        })
    }

    /// Ask the kernel to stop it: the completions it still posts (and a last one) come to
    /// [`poll_next`](Self::poll_next) as before.
    pub(super) fn cancel(&mut self) {
        if !self.ended {
            ring::with(|r| r.cancel(self.slot));
        }
    }

    /// The next completion's result and flags; `None` once the last one has been taken.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(i32, u32)>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let got = ring::with(|r| {
            let slot = self.slot;
            let Slot::Stream(waker, queue) = r.slot(slot) else {
                unreachable!("slot of a live multishot operation")
            };
            let got = queue.pop_front();
            if got.is_none() && !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            if got.is_some_and(|(_, flags)| !cqueue::more(flags)) {
                r.free_slot(slot);
                self.ended = true;
            }
            got
        });
        match got {
            Some(c) => Poll::Ready(Some(c)),
            None => Poll::Pending,
        }
    }
}

impl Drop for MultiOp {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let (slot, brings) = (self.slot, self.brings);
        let mut keep = Some(self.keep.take().unwrap_or_else(|| Box::new(())));
        ring::try_with(|r| {
            let kept = keep.take().expect("taken once");
            let queued = match std::mem::replace(r.slot(slot), Slot::Abandoned(kept, brings)) {
                Slot::Stream(_, queue) => queue,
                _ => unreachable!("slot of a live multishot operation"),
            };
            let mut last = false;
            for (res, flags) in queued {
                if brings == Brings::Descriptors && res >= 0 {
                    // Safety: accepted, never handed out: ours to close.
                    drop(unsafe {
                        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(res)
                    });
                }
                r.give_back(flags);
                last |= !cqueue::more(flags);
            }
            if last {
                r.free_slot(slot);
            } else {
                r.cancel(slot);
            }
        });
        if let Some(k) = keep {
            // Dropped off its worker: never close what the kernel may still use.
            std::mem::forget(k);
        }
    }
}

/// An operation that would block (a non-blocking socket: io_uring then answers EAGAIN) waits
/// for the socket on the ring; any other error is returned.
async fn wait_or_fail(sock: &RingSocket, e: io::Error, events: i16) -> io::Result<()> {
    if e.kind() != io::ErrorKind::WouldBlock {
        return Err(e);
    }
    poll(sock, events as u32).await.map(|_| ())
}

/// Wait until `sock` has one of `events` (poll(2) bits); the kernel's answer.
pub async fn poll(sock: &RingSocket, events: u32) -> io::Result<u32> {
    // Safety: the entry points at no memory; the socket handle keeps the descriptor open.
    let op = unsafe {
        Op::start(sock.clone(), |s| {
            opcode::PollAdd::new(types::Fd(s.raw()), events).build()
        })
    };
    op.await.0
}

/// Receive up to `max` bytes into the spare capacity of `buf` (which must have that much);
/// they are appended. The buffer comes back with the result.
pub async fn recv<B: IoBufMut + Unpin>(
    sock: &RingSocket,
    mut buf: B,
    max: usize,
) -> (io::Result<usize>, B) {
    let max = max.min(buf.spare()) as u32;
    loop {
        // Safety: at most `max` bytes into `buf`'s spare capacity, which stays in place while
        // the operation owns `buf`; the handle keeps the socket open.
        let op = unsafe {
            Op::start((sock.clone(), buf), |(s, b)| {
                opcode::Recv::new(types::Fd(s.raw()), b.spare_ptr(), max).build()
            })
        };
        let (res, (_, b)) = op.await;
        buf = b;
        match res {
            Ok(n) => {
                // Safety: the kernel wrote `n` bytes at the start of the spare capacity.
                unsafe { buf.advance_init(n as usize) };
                return (Ok(n as usize), buf);
            }
            Err(e) => {
                if let Err(e) = wait_or_fail(sock, e, libc::POLLIN).await {
                    return (Err(e), buf);
                }
            }
        }
    }
}

/// What [`recv_pooled`] got.
pub enum Pooled {
    Data(PoolBuf),
    /// The peer's end of file.
    Eof,
    /// Nothing received: the ring has no provided buffer now (all are out, or none could be
    /// registered). Wait for the socket and receive into a buffer of your own.
    NoBuffer,
}

/// Receive up to `max` bytes (at most [`POOL_BUF_LEN`]) into a buffer the kernel picks from
/// the ring's pool when bytes arrive: a receive that waits for a quiet client holds none.
pub async fn recv_pooled(sock: &RingSocket, max: usize) -> io::Result<Pooled> {
    let Some(pool) = ring::with(|r| r.pool.clone()) else {
        return Ok(Pooled::NoBuffer);
    };
    let max = max.min(POOL_BUF_LEN) as u32;
    loop {
        // Safety: the kernel writes into a buffer of the registered pool it picks (owned by
        // the PoolBuf made from the completion, or given back by the slot); the handle keeps
        // the socket open.
        let mut op = unsafe {
            Op::start(sock.clone(), |s| {
                opcode::Recv::new(types::Fd(s.raw()), std::ptr::null_mut(), max)
                    .buf_group(POOL_GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
            })
        };
        let (res, flags, _) = std::future::poll_fn(|cx| op.poll_done(cx)).await;
        // Safety: this completion named the buffer, and it is taken once, here.
        let buf =
            cqueue::buffer_select(flags).map(|bid| unsafe { pool.take(bid, res.max(0) as u32) });
        return match (result(res), buf) {
            (Ok(0), _) => Ok(Pooled::Eof),
            (Ok(_), Some(buf)) => Ok(Pooled::Data(buf)),
            (Ok(_), None) => Err(io::Error::other("io_uring receive named no buffer")),
            (Err(e), _) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Pooled::NoBuffer),
            (Err(e), _) => match wait_or_fail(sock, e, libc::POLLIN).await {
                Ok(()) => continue,
                Err(e) => Err(e),
            },
        };
    }
}

/// One `send` of `buf` with `flags` (MSG_NOSIGNAL is added); how many bytes it took. The
/// buffer comes back with the result.
pub async fn send<B: IoBuf + Unpin>(
    sock: &RingSocket,
    buf: B,
    flags: i32,
) -> (io::Result<usize>, B) {
    let mut buf = buf;
    loop {
        // Safety: the send reads `buf`'s bytes, in place while the operation owns it; the
        // handle keeps the socket open.
        let op = unsafe {
            Op::start((sock.clone(), buf), |(s, b)| {
                opcode::Send::new(types::Fd(s.raw()), b.stable_ptr(), b.bytes_init() as u32)
                    .flags(flags | libc::MSG_NOSIGNAL)
                    .build()
            })
        };
        let (res, (_, b)) = op.await;
        buf = b;
        match res {
            Ok(n) => return (Ok(n as usize), buf),
            Err(e) => {
                if let Err(e) = wait_or_fail(sock, e, libc::POLLOUT).await {
                    return (Err(e), buf);
                }
            }
        }
    }
}

/// The buffers and headers of one `sendmsg`, boxed so that the message header and the
/// iovecs stay in place while the operation moves.
struct Gather {
    bufs: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// Safety: the raw pointers in `iov` and `msg` point into `bufs` and `iov`, which this value
// owns; moving it to another thread moves their owner with them.
unsafe impl Send for Gather {}

/// One `sendmsg` of `bufs` in order (MSG_NOSIGNAL is added); how many bytes it took. The
/// buffers come back with the result (so their vector can be used again).
pub async fn sendmsg(
    sock: &RingSocket,
    bufs: Vec<Bytes>,
    flags: i32,
) -> (io::Result<usize>, Vec<Bytes>) {
    let mut g = Box::new(Gather {
        iov: Vec::with_capacity(bufs.len()),
        bufs,
        // Safety: a zeroed msghdr is valid (no name, no control data).
        msg: unsafe { std::mem::zeroed() },
    });
    loop {
        g.iov.clear();
        let Gather { bufs, iov, msg } = &mut *g;
        iov.extend(bufs.iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        let flags = (flags | libc::MSG_NOSIGNAL) as u32;
        // Safety: the entry points at the boxed msghdr, which points at the boxed iovecs,
        // which point into the boxed buffers: all in place while the operation owns the box;
        // the handle keeps the socket open.
        let op = unsafe {
            Op::start((sock.clone(), g), |(s, g)| {
                opcode::SendMsg::new(types::Fd(s.raw()), &g.msg)
                    .flags(flags)
                    .build()
            })
        };
        let (res, (_, back)) = op.await;
        g = back;
        match res {
            Ok(n) => return (Ok(n as usize), std::mem::take(&mut g.bufs)),
            Err(e) => {
                if let Err(e) = wait_or_fail(sock, e, libc::POLLOUT).await {
                    return (Err(e), std::mem::take(&mut g.bufs));
                }
            }
        }
    }
}
