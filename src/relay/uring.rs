//! The io_uring backend: one ring per worker thread, and the few socket operations the relay
//! needs (wait for readable, receive, send, splice) as futures that own what the kernel uses.
//!
//! This module owns the rings, the raw submission entries and the rule that makes them sound:
//! **whatever an operation hands the kernel stays alive until its completion arrives.** An
//! [`Op`] owns its buffer, its iovecs, its pipe and a duplicate of its socket's descriptor (so a
//! closed socket's number, reused by another socket, can never be what a queued splice picks
//! up: splices run later in a kernel worker, and linked entries take their file only when they
//! run). A future dropped before its completion (a cancelled or reset connection) moves all of
//! that into its slot in the ring, asks the kernel to cancel, and the slot frees it only when
//! the completion comes back.
//!
//! Completions are reaped in three places: right after each submission (most socket operations
//! complete inline, so the future is ready on its first poll), when a waiting future is polled,
//! and by a reaper task that sleeps on an eventfd registered with the ring (tokio's epoll
//! reactor wakes it). The control plane stays on tokio; only the byte moves of a connection go
//! through the ring of the thread that runs it.

use std::any::Any;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, opcode, squeue, types};
use tokio::io::unix::AsyncFd;

use super::pipe::Pipe;

/// Submission queue entries per ring; the completion queue is [`CQ_ENTRIES`] (and the kernel
/// keeps overflowing completions instead of dropping them).
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

/// user_data of an entry whose completion nobody waits for (a cancel request).
const IGNORE: u64 = u64::MAX;
/// Marks the first entry of a linked pair (the poll before a splice): only the last entry's
/// completion is the operation's result (a failed head completes the rest with ECANCELED).
const LINK_HEAD: u64 = 1 << 62;

/// A socket descriptor an operation can keep open until its completion (a `dup` of the
/// connection's socket: the same socket, closed when the last holder lets go).
#[derive(Clone, Debug)]
pub struct SockFd(Arc<OwnedFd>);

impl SockFd {
    pub fn dup(fd: &impl AsFd) -> io::Result<SockFd> {
        Ok(SockFd(Arc::new(fd.as_fd().try_clone_to_owned()?)))
    }

    fn raw(&self) -> types::Fd {
        types::Fd(self.0.as_raw_fd())
    }
}

enum Slot {
    Free,
    /// In flight; the waker of the future waiting for it.
    Waiting(Option<Waker>),
    /// Completed with this result; the future has not taken it yet.
    Done(i32),
    /// In flight, its future gone: what the kernel may still use, freed at the completion.
    Abandoned(#[allow(dead_code)] Box<dyn Any + Send>),
}

struct Inner {
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    skip_success: bool,
}

/// One io_uring instance (one per worker thread, see [`Ring::current`]).
pub struct Ring {
    inner: Mutex<Inner>,
    /// The reaper task still runs (it ends with its tokio runtime).
    reaping: Arc<AtomicBool>,
}

thread_local! {
    static RING: std::cell::RefCell<Option<Arc<Ring>>> = const { std::cell::RefCell::new(None) };
}

impl Ring {
    /// This thread's ring, set up on first use (with its reaper task on the current tokio
    /// runtime). A thread that outlives its runtime (a test, `block_on` after `block_on`)
    /// gets a new ring whose reaper runs on the current one.
    pub fn current() -> io::Result<Arc<Ring>> {
        RING.with(|r| {
            let mut r = r.borrow_mut();
            match &*r {
                Some(ring) if ring.reaping.load(Ordering::Acquire) => Ok(ring.clone()),
                _ => {
                    let ring = Ring::setup()?;
                    *r = Some(ring.clone());
                    Ok(ring)
                }
            }
        })
    }

    fn setup() -> io::Result<Arc<Ring>> {
        let uring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        let skip_success = uring.params().is_feature_skip_cqe_on_success();
        // Safety: eventfd has no memory arguments; a negative result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: eventfd just returned this descriptor and nothing else owns it.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        uring.submitter().register_eventfd(efd.as_raw_fd())?;
        let ring = Arc::new(Ring {
            inner: Mutex::new(Inner {
                uring,
                slots: Vec::new(),
                free: Vec::new(),
                skip_success,
            }),
            reaping: Arc::new(AtomicBool::new(true)),
        });
        /// Marks the ring unreaped when the reaper task ends or is dropped with its runtime.
        struct Reaping(Arc<AtomicBool>);
        impl Drop for Reaping {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let reaping = Reaping(ring.reaping.clone());
        // Safety: an OwnedFd returns the same open descriptor for as long as it lives, and
        // the AsyncFd owns it.
        let efd = unsafe { AsyncFd::register(efd) }.map_err(|e| io::Error::other(e.to_string()))?;
        let weak = Arc::downgrade(&ring);
        tokio::spawn(async move {
            let _reaping = reaping;
            loop {
                let Ok(mut ready) = efd.readable().await else {
                    return;
                };
                let mut count = [0u8; 8];
                // Safety: reads 8 bytes into a local array (resets the counter; EAGAIN if
                // another reap got there first, which is fine).
                unsafe { libc::read(efd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                ready.clear_ready();
                match weak.upgrade() {
                    Some(ring) => ring.reap(),
                    None => return,
                }
            }
        });
        Ok(ring)
    }

    /// Move every completion into its slot and wake the futures waiting for them.
    fn reap(&self) {
        let wakers = {
            let mut inner = self.inner.lock().unwrap();
            inner.reap()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Queue `entries` (built for the slot's user_data) and submit them; `keep` is what they
    /// point into, handed back with the result.
    ///
    /// Safety: every pointer in `entries` must point into `keep` (or into memory that lives at
    /// least as long), which must not move or change while the operation is in flight.
    unsafe fn start<T: Send + 'static>(
        self: &Arc<Self>,
        keep: T,
        entries: impl FnOnce(&T, u64, bool) -> Vec<squeue::Entry>,
    ) -> Op<T> {
        let (slot, wakers) = {
            let mut inner = self.inner.lock().unwrap();
            let slot = match inner.free.pop() {
                Some(s) => s,
                None => {
                    inner.slots.push(Slot::Free);
                    inner.slots.len() - 1
                }
            };
            inner.slots[slot] = Slot::Waiting(None);
            let skip = inner.skip_success;
            let sqes = entries(&keep, slot as u64, skip);
            let pushed = inner.push(&sqes);
            if let Err(e) = pushed {
                inner.slots[slot] = Slot::Done(-e.raw_os_error().unwrap_or(libc::EIO));
            }
            (slot, inner.reap())
        };
        for w in wakers {
            w.wake();
        }
        Op {
            ring: self.clone(),
            slot,
            keep: Some(keep),
            link: false,
        }
    }
}

impl Inner {
    /// Push `sqes` (kept together, so a link is never split) and submit.
    fn push(&mut self, sqes: &[squeue::Entry]) -> io::Result<()> {
        loop {
            let room = {
                let sq = self.uring.submission();
                sq.capacity() - sq.len()
            };
            if room >= sqes.len() {
                break;
            }
            self.submit()?;
        }
        for e in sqes {
            // Safety: the caller of `Ring::start` guarantees what the entry points to lives
            // until its completion; there is room (checked above).
            unsafe { self.uring.submission().push(e) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        self.submit()
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Completions are backed up: move them out, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.uring.completion().sync();
                    if self.uring.completion().is_empty() {
                        return Err(e);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self) -> Vec<Waker> {
        let mut wakers = Vec::new();
        let mut done = Vec::new();
        for cqe in self.uring.completion() {
            let ud = cqe.user_data();
            if ud == IGNORE || ud & LINK_HEAD != 0 {
                continue;
            }
            done.push((ud as usize, cqe.result()));
        }
        for (slot, res) in done {
            match std::mem::replace(&mut self.slots[slot], Slot::Done(res)) {
                Slot::Waiting(w) => wakers.extend(w),
                Slot::Abandoned(_) => {
                    self.slots[slot] = Slot::Free;
                    self.free.push(slot);
                }
                Slot::Free | Slot::Done(_) => {
                    debug_assert!(false, "completion for slot {slot} that was not in flight")
                }
            }
        }
        wakers
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Cancel what is still in flight and give the kernel a moment to say so; whatever
        // still has no completion then is leaked, never freed under the kernel's feet.
        let in_flight = |s: &Vec<Slot>| s.iter().any(|s| matches!(s, Slot::Abandoned(_)));
        if in_flight(&self.slots) {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(IGNORE);
            let _ = self.push(&[cancel]);
            for _ in 0..10 {
                let ts = types::Timespec::new().nsec(5_000_000);
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = self.uring.submitter().submit_with_args(1, &args);
                let _ = self.reap();
                if !in_flight(&self.slots) {
                    break;
                }
            }
        }
        if in_flight(&self.slots) {
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// One operation in flight: resolves to its result and what it kept alive.
pub struct Op<T: Send + 'static> {
    ring: Arc<Ring>,
    slot: usize,
    keep: Option<T>,
    link: bool,
}

impl<T: Send + Unpin + 'static> Future for Op<T> {
    type Output = (io::Result<u32>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (res, wakers) = {
            let mut inner = self.ring.inner.lock().unwrap();
            let wakers = inner.reap();
            let res = match &mut inner.slots[self.slot] {
                Slot::Done(r) => Some(*r),
                Slot::Waiting(w) => {
                    match w {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *w = Some(cx.waker().clone()),
                    }
                    None
                }
                Slot::Free | Slot::Abandoned(_) => unreachable!("slot of a live operation"),
            };
            if res.is_some() {
                inner.slots[self.slot] = Slot::Free;
                let slot = self.slot;
                inner.free.push(slot);
            }
            (res, wakers)
        };
        for w in wakers {
            w.wake();
        }
        match res {
            Some(r) => {
                let keep = self.keep.take().expect("polled after completion");
                let r = if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as u32)
                };
                Poll::Ready((r, keep))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(keep) = self.keep.take() else { return };
        let mut inner = self.ring.inner.lock().unwrap();
        if let Slot::Done(_) = inner.slots[self.slot] {
            inner.slots[self.slot] = Slot::Free;
            inner.free.push(self.slot);
            return;
        }
        inner.slots[self.slot] = Slot::Abandoned(Box::new(keep));
        let ud = self.slot as u64;
        let mut cancels = vec![opcode::AsyncCancel::new(ud).build().user_data(IGNORE)];
        if self.link {
            cancels.push(
                opcode::AsyncCancel::new(ud | LINK_HEAD)
                    .build()
                    .user_data(IGNORE),
            );
        }
        // A failed cancel submission only means the operation runs to its (harmless) end;
        // its slot keeps everything alive until then.
        let _ = inner.push(&cancels);
        // Most cancels complete inside that submit: free their slots (and close the socket
        // duplicates they hold) now, not when the reaper next runs.
        let wakers = inner.reap();
        drop(inner);
        for w in wakers {
            w.wake();
        }
    }
}

/// Whether io_uring works here and has every operation this backend uses (a kernel may be too
/// old, `kernel.io_uring_disabled` set, or a seccomp profile may refuse io_uring_setup).
pub fn available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let uring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
            let mut probe = io_uring::Probe::new();
            uring
                .submitter()
                .register_probe(&mut probe)
                .map_err(|e| format!("io_uring probe: {e}"))?;
            for (code, name) in [
                (opcode::PollAdd::CODE, "POLL_ADD"),
                (opcode::Recv::CODE, "RECV"),
                (opcode::Send::CODE, "SEND"),
                (opcode::SendMsg::CODE, "SENDMSG"),
                (opcode::Splice::CODE, "SPLICE"),
                (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
            ] {
                if !probe.is_supported(code) {
                    return Err(format!("this kernel's io_uring has no {name}"));
                }
            }
            Ok(())
        })
        .clone()
}

fn ring() -> io::Result<Arc<Ring>> {
    Ring::current()
}

/// Wait until `fd` has one of `events` (poll(2) bits); the kernel's answer.
pub async fn poll(fd: &SockFd, events: u32) -> io::Result<u32> {
    let keep = fd.clone();
    // Safety: the entry points at no memory; `keep` holds the descriptor open.
    let op = unsafe {
        ring()?.start(keep, |k, ud, _| {
            vec![opcode::PollAdd::new(k.raw(), events).build().user_data(ud)]
        })
    };
    op.await.0
}

/// Receive up to `max` bytes into the spare capacity of `buf` (grown to fit); the bytes are
/// appended. The receive owns a split-off tail of `buf`'s allocation while in flight.
pub async fn recv(fd: &SockFd, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    loop {
        buf.reserve(max);
        let len = buf.len();
        let tail = buf.split_off(len);
        // `buf` ends where `tail` starts: nothing but the receive writes into `tail`.
        // Safety: the receive writes into `tail`'s spare capacity (at least `max` bytes), which
        // the operation owns until its completion.
        let op = unsafe {
            ring()?.start((fd.clone(), tail), |(k, tail), ud, _| {
                vec![
                    opcode::Recv::new(k.raw(), tail.as_ptr().cast_mut(), max as u32)
                        .build()
                        .user_data(ud),
                ]
            })
        };
        let (res, (_, mut tail)) = op.await;
        match res {
            Ok(n) => {
                // Safety: the kernel wrote `n` bytes at the start of the tail.
                unsafe { tail.set_len(n as usize) };
                buf.unsplit(tail);
                return Ok(n as usize);
            }
            Err(e) => {
                buf.unsplit(tail);
                wait_or_fail(fd, e, libc::POLLIN).await?;
            }
        }
    }
}

/// The socket is non-blocking (tokio's, shared through the `dup`), and io_uring respects
/// that: an operation that would block completes with EAGAIN instead of waiting (seen on a
/// full local socket: a send failed a transfer with "Resource temporarily unavailable"). Wait
/// for the socket on the ring, then the caller tries again; any other error is returned.
async fn wait_or_fail(fd: &SockFd, e: io::Error, events: i16) -> io::Result<()> {
    if e.kind() != io::ErrorKind::WouldBlock {
        return Err(e);
    }
    poll(fd, events as u32).await.map(|_| ())
}

/// One `send` of `bytes` with `flags` (MSG_NOSIGNAL is added), waiting for room; how many
/// bytes it took.
pub async fn send(fd: &SockFd, bytes: Bytes, flags: i32) -> io::Result<usize> {
    loop {
        // Safety: the send reads `bytes`, owned by the operation until its completion.
        let op = unsafe {
            ring()?.start((fd.clone(), bytes.clone()), |(k, b), ud, _| {
                vec![
                    opcode::Send::new(k.raw(), b.as_ptr(), b.len() as u32)
                        .flags(flags | libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(ud),
                ]
            })
        };
        match op.await.0 {
            Ok(n) => return Ok(n as usize),
            Err(e) => wait_or_fail(fd, e, libc::POLLOUT).await?,
        }
    }
}

/// The buffers and headers of one `sendmsg`, at a fixed heap address.
struct Gather {
    /// What the iovecs point into (only read by the kernel).
    #[allow(dead_code)]
    bufs: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}
// Safety: the raw pointers in `iov` and `msg` point into `bufs` and `iov`, which this value
// owns; moving it to another thread moves their owner with them.
unsafe impl Send for Gather {}

/// One `sendmsg` of `bufs` in order (MSG_NOSIGNAL is added), waiting for room; how many
/// bytes it took.
pub async fn sendmsg(fd: &SockFd, bufs: Vec<Bytes>, flags: i32) -> io::Result<usize> {
    loop {
        match sendmsg_once(fd, bufs.clone(), flags).await {
            Ok(n) => return Ok(n),
            Err(e) => wait_or_fail(fd, e, libc::POLLOUT).await?,
        }
    }
}

async fn sendmsg_once(fd: &SockFd, bufs: Vec<Bytes>, flags: i32) -> io::Result<usize> {
    let mut g = Box::new(Gather {
        iov: bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect(),
        bufs,
        // Safety: a zeroed msghdr is valid (no name, no control data).
        msg: unsafe { std::mem::zeroed() },
    });
    g.msg.msg_iov = g.iov.as_mut_ptr();
    g.msg.msg_iovlen = g.iov.len();
    // Safety: the msghdr and the iovecs and buffers it points to live in the box, owned by
    // the operation until its completion; the kernel only reads them.
    let op = unsafe {
        ring()?.start((fd.clone(), g), |(k, g), ud, _| {
            vec![
                opcode::SendMsg::new(k.raw(), &g.msg)
                    .flags((flags | libc::MSG_NOSIGNAL) as u32)
                    .build()
                    .user_data(ud),
            ]
        })
    };
    op.await.0.map(|n| n as usize)
}

/// Which way a [`splice`] moves bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    /// Socket → pipe.
    In,
    /// Pipe → socket.
    Out,
}

/// One splice of up to `len` bytes between the socket and `pipe`, linked behind a poll for the
/// socket's readiness, so no kernel worker waits on an idle socket. Non-blocking: "would
/// block" comes back as such (a pipe out of slots, a spurious wake-up).
pub async fn splice(
    fd: &SockFd,
    pipe: &Arc<Pipe>,
    dir: Dir,
    len: usize,
    more: bool,
) -> io::Result<usize> {
    let (sock, pipe_in, pipe_out) = (fd.0.as_raw_fd(), pipe.write_fd(), pipe.read_fd());
    let (from, to, events): (RawFd, RawFd, u32) = match dir {
        Dir::In => (sock, pipe_in, libc::POLLIN as u32),
        Dir::Out => (pipe_out, sock, libc::POLLOUT as u32),
    };
    let flags =
        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
    // Safety: no user memory; `keep` holds the socket and both pipe ends open until the
    // completion.
    let mut op = unsafe {
        ring()?.start((fd.clone(), pipe.clone()), |(k, _), ud, skip| {
            let mut head = squeue::Flags::IO_LINK;
            if skip {
                head |= squeue::Flags::SKIP_SUCCESS;
            }
            vec![
                opcode::PollAdd::new(k.raw(), events)
                    .build()
                    .flags(head)
                    .user_data(ud | LINK_HEAD),
                opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len as u32)
                    .flags(flags)
                    .build()
                    .user_data(ud),
            ]
        })
    };
    op.link = true;
    op.await.0.map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::tests::pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Receive and send go through the ring: bytes arrive intact, a receive waits for data
    /// that is not there yet, and `recv` appends after what the buffer already held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recv_and_send_through_the_ring() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        let (mut a, b) = pair().await;
        let fb = SockFd::dup(&b).unwrap();
        let waiting = tokio::spawn({
            let fb = fb.clone();
            async move {
                let mut buf = BytesMut::from(&b"head:"[..]);
                let n = recv(&fb, &mut buf, 1024).await.unwrap();
                (n, buf)
            }
        });
        tokio::task::yield_now().await;
        a.write_all(b"hello").await.unwrap();
        let (n, buf) = waiting.await.unwrap();
        assert_eq!(n, 5);
        assert_eq!(&buf[..], b"head:hello");
        let sent = sendmsg(
            &fb,
            vec![Bytes::from_static(b"one "), Bytes::from_static(b"two")],
            0,
        )
        .await
        .unwrap();
        assert_eq!(sent, 7);
        let sent = send(&fb, Bytes::from_static(b"!"), 0).await.unwrap();
        assert_eq!(sent, 1);
        let mut got = [0u8; 8];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two!");
        drop(b);
        drop(fb);
        assert_eq!(a.read(&mut got).await.unwrap(), 0, "socket stayed open");
    }

    /// tokio's sockets are non-blocking and io_uring respects that: a receive on an empty
    /// socket and a send into a full one must wait for the socket, not fail with EAGAIN.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn operations_wait_on_a_non_blocking_socket() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        let short = std::time::Duration::from_millis(200);
        let (mut a, b) = pair().await;
        let fb = SockFd::dup(&b).unwrap();
        let mut buf = BytesMut::new();
        let r = tokio::time::timeout(short, recv(&fb, &mut buf, 64)).await;
        assert!(r.is_err(), "a receive on an empty socket ended: {r:?}");
        // Nobody reads `a`: the send fills both socket buffers and must then wait.
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let mut sent = 0usize;
        let filled = tokio::time::timeout(short * 5, async {
            loop {
                sent += send(&fb, chunk.clone(), 0).await.unwrap();
            }
        })
        .await;
        assert!(filled.is_err());
        assert!(sent > 0);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; sent];
            a.read_exact(&mut got).await.unwrap();
            got.iter().all(|&x| x == 7)
        });
        assert!(reader.await.unwrap(), "bytes changed on the way");
    }

    /// Receives dropped while in flight (the way a reset connection drops them) are cancelled:
    /// their buffers stay with the ring until the kernel lets go, the ring's slots come back,
    /// and the socket keeps working for the next receive.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_receives_free_their_slots() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        let (mut a, b) = pair().await;
        let fb = SockFd::dup(&b).unwrap();
        for _ in 0..1000 {
            let mut buf = BytesMut::new();
            let r = tokio::time::timeout(
                std::time::Duration::from_micros(1),
                recv(&fb, &mut buf, 64 * 1024),
            )
            .await;
            assert!(r.is_err(), "a receive completed with nothing sent");
        }
        let ring = Ring::current().unwrap();
        a.write_all(b"after").await.unwrap();
        let mut buf = BytesMut::new();
        let n = recv(&fb, &mut buf, 64).await.unwrap();
        assert_eq!(&buf[..n], b"after");
        // Every cancelled receive completed (ECANCELED) and gave its slot back.
        ring.reap();
        let inner = ring.inner.lock().unwrap();
        let busy = inner
            .slots
            .iter()
            .filter(|s| !matches!(s, Slot::Free))
            .count();
        assert!(busy <= 1, "{busy} slots still held after the cancels");
    }

    /// A thread whose runtime ended gets a ring reaped on its next runtime: a receive that
    /// has to wait for its data still completes.
    #[test]
    fn a_ring_follows_the_runtime_of_its_thread() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        for round in 0..3 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (mut a, b) = pair().await;
                let fb = SockFd::dup(&b).unwrap();
                let waiting = tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    recv(&fb, &mut buf, 64).await.unwrap();
                    buf
                });
                tokio::task::yield_now().await;
                a.write_all(b"x").await.unwrap();
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: the receive was never reaped"))
                    .unwrap();
                assert_eq!(&got[..], b"x");
            });
        }
    }

    /// Splice through a pipe both ways, each behind its poll: socket → pipe → socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_behind_a_poll() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        let (a_in, b_in) = pair().await;
        let (a_out, b_out) = pair().await;
        let (fin, fout) = (SockFd::dup(&b_in).unwrap(), SockFd::dup(&a_out).unwrap());
        let pipe = Arc::new(Pipe::new().unwrap());
        let data: Vec<u8> = (0..4 << 20).map(|i| (i * 13 % 251) as u8).collect();
        let (writer, reader) = crate::relay::tests::send_and_collect(a_in, b_out, &data);
        loop {
            let n = match splice(&fin, &pipe, Dir::In, 64 * 1024, false).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            };
            let mut left = n;
            while left > 0 {
                match splice(&fout, &pipe, Dir::Out, left, false).await {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        drop((fout, a_out));
        writer.await.unwrap();
        assert!(reader.await.unwrap() == data, "payload changed on the way");
    }
}
