//! The io_uring backend: one ring per worker thread, and the few socket operations the relay
//! needs (wait for readable, receive, send, splice) as futures that own what the kernel uses.
//!
//! This module owns the rings, the raw submission entries and the rule that makes them sound:
//! **whatever an operation hands the kernel stays alive until its completion arrives.** An
//! [`Op`] owns its buffer, its iovecs and its pipe. A future dropped before its completion (a
//! cancelled or reset connection) moves all of that into its slot in the ring, asks the kernel
//! to cancel, and the slot frees it only when the completion comes back.
//!
//! Sockets are named by their descriptor number, not duplicated: an operation takes its own
//! reference to the socket when the kernel issues it, and every entry is issued inside the call
//! that queues it (the submission loop does not return with entries left in the queue, and
//! `IORING_SETUP_SUBMIT_ALL` keeps a failed entry from holding back the ones behind it). So a
//! closed socket's number, reused by another socket, can never be what a queued operation
//! picks up. The one exception is a splice linked behind its poll: a linked entry takes its
//! file only when it runs, later. Splices therefore name a duplicate, made on a connection's
//! first splice and kept by every splice in flight ([`SockFd`]). An idle connection costs one
//! descriptor, not two (10,000 of them fit under a 20,000 limit).
//!
//! A quiet local connection waits in a receive that holds no buffer: each ring registers a
//! small ring of provided buffers with the kernel, which takes one only when bytes arrive
//! ([`recv_pooled`]); the bytes are framed in place in the buffer's headroom and it goes back
//! to the ring when the frame has been written. One operation per message instead of a poll
//! and then a receive. (Receives on tokio's non-blocking sockets do wait on this kernel;
//! an EAGAIN would be answered with a poll, as for the other operations.)
//!
//! A listener takes its connections through one multishot accept ([`accept_multi`]): one
//! submission, then a completion per connection. Operations that complete more than once (that
//! one, and a zero-copy send, whose second completion says the kernel is done with the pages)
//! keep their slot until the completion without `IORING_CQE_F_MORE`; an abandoned accept
//! closes the sockets that still arrive.
//!
//! Two more ways to move bulk bytes are here, each off by default because it measured no
//! faster on loopback (perf/2026-12-02-uring-extras.md): receives into registered (fixed)
//! buffers ([`recv_fixed`], `RINGFWD_URING_FIXED=1`: no measurable change) and zero-copy
//! `sendmsg` ([`zerocopy_enabled`], `RINGFWD_URING_ZEROCOPY=1`: a third slower).
//!
//! Completions are reaped in three places: right after each submission (most socket operations
//! complete inline, so the future is ready on its first poll), when a waiting future is polled,
//! and by a reaper task that sleeps on an eventfd registered with the ring (tokio's epoll
//! reactor wakes it). The control plane stays on tokio; only the byte moves of a connection go
//! through the ring of the thread that runs it.

use std::any::Any;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use tokio::io::unix::AsyncFd;

use super::pipe::Pipe;
use crate::proto::HEADROOM;

/// Submission queue entries per ring; the completion queue is [`CQ_ENTRIES`] (and the kernel
/// keeps overflowing completions instead of dropping them).
const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

/// `IORING_CQE_F_MORE`: this completion is not the operation's last.
const CQE_F_MORE: u32 = 1 << 1;

/// user_data of an entry whose completion nobody waits for (a cancel request).
const IGNORE: u64 = u64::MAX;
/// Marks the first entry of a linked pair (the poll before a splice): only the last entry's
/// completion is the operation's result (a failed head completes the rest with ECANCELED).
const LINK_HEAD: u64 = 1 << 62;

/// A connection's socket as the ring's operations name it: its descriptor number, which the
/// owner keeps open while it starts operations through this (operations in flight hold the
/// socket themselves, see the module docs), and, from the first splice on, a duplicate that
/// linked splices name and keep open until their completion.
#[derive(Clone, Debug)]
pub struct SockFd(Arc<SockFdInner>);

#[derive(Debug)]
struct SockFdInner {
    fd: RawFd,
    dup: OnceLock<OwnedFd>,
}

impl SockFd {
    /// `sock` must stay open for as long as operations are started through this handle.
    pub fn new(sock: &impl AsRawFd) -> SockFd {
        SockFd(Arc::new(SockFdInner {
            fd: sock.as_raw_fd(),
            dup: OnceLock::new(),
        }))
    }

    /// For an entry the kernel issues inside the submitting call.
    fn raw(&self) -> types::Fd {
        types::Fd(self.0.fd)
    }

    /// For a linked entry: the duplicate, made on first use (held by this handle's clones).
    fn linked(&self) -> io::Result<RawFd> {
        if let Some(fd) = self.0.dup.get() {
            return Ok(fd.as_raw_fd());
        }
        // Safety: the owner keeps the socket open while it starts operations (`new`).
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0.fd) };
        let dup = sock.try_clone_to_owned()?;
        // Another clone may have got there first: keep theirs (ours closes).
        Ok(self.0.dup.get_or_init(|| dup).as_raw_fd())
    }

    /// Whether a linked splice made this handle duplicate its socket.
    #[cfg(test)]
    fn duplicated(&self) -> bool {
        self.0.dup.get().is_some()
    }
}

/// One operation's place in the ring. An operation may complete more than once: a multishot
/// accept posts a completion per connection, a zero-copy send its result and then a
/// notification that the kernel is done with the buffer. Every completion but the last one
/// carries `IORING_CQE_F_MORE`, and a slot is freed only at the last.
enum Slot {
    Free,
    /// In flight; the waker of the future waiting for it.
    Waiting(Option<Waker>),
    /// Completed with this result and these completion flags; the future has not taken it yet
    /// (with `F_MORE` in the flags, a last completion is still to come).
    Done(i32, u32),
    /// A multishot operation in flight: the completions its future has not taken yet.
    Stream(Option<Waker>, std::collections::VecDeque<(i32, u32)>),
    /// In flight, its future gone: what the kernel may still use, freed at the last
    /// completion; descriptors its completions bring (an accept's) are closed.
    Abandoned(#[allow(dead_code)] Box<dyn Any + Send>, Brings),
}

/// Whether an operation's successful completions bring a new descriptor (that nobody else
/// will close once its future is gone).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Brings {
    Nothing,
    Descriptors,
}

struct Inner {
    // Dropped before `pool`: the kernel lets go of the buffers with the ring.
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    skip_success: bool,
    pool: Option<Arc<Pool>>,
    /// The fixed buffers, once registered (dropped or leaked with `pool`).
    fixed: Option<Arc<Pool>>,
    /// Wakers of operations completed during a submission, for the next reap to return.
    woken: Vec<Waker>,
}

/// One io_uring instance (one per worker thread, see [`Ring::current`]).
pub struct Ring {
    inner: Mutex<Inner>,
    /// The provided buffers of [`recv_pooled`] (`None` where the kernel cannot register them).
    pool: Option<Arc<Pool>>,
    /// The fixed buffers of [`recv_fixed`], registered on first use (`None` where the kernel
    /// refused them).
    fixed: OnceLock<Option<Arc<Pool>>>,
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
        // SUBMIT_ALL: an entry the kernel refuses does not hold back the ones queued after it
        // (which name sockets by number, see the module docs).
        let uring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_submit_all()
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
        // Without provided buffers (kernels before 5.19) receives use their own buffers.
        let pool = Pool::register(&uring).ok().map(Arc::new);
        let ring = Arc::new(Ring {
            pool: pool.clone(),
            inner: Mutex::new(Inner {
                uring,
                slots: Vec::new(),
                free: Vec::new(),
                skip_success,
                pool,
                fixed: None,
                woken: Vec::new(),
            }),
            fixed: OnceLock::new(),
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

    /// This ring's fixed buffers, registered on the first call.
    fn fixed_pool(&self) -> Option<&Arc<Pool>> {
        self.fixed
            .get_or_init(|| {
                let mut inner = self.inner.lock().unwrap();
                match Pool::register_fixed(&inner.uring) {
                    Ok(pool) => {
                        let pool = Arc::new(pool);
                        inner.fixed = Some(pool.clone());
                        Some(pool)
                    }
                    Err(e) => {
                        tracing::debug!("io_uring fixed buffers not registered: {e}");
                        None
                    }
                }
            })
            .as_ref()
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
            let slot = inner.take_slot(Slot::Waiting(None));
            let skip = inner.skip_success;
            let sqes = entries(&keep, slot as u64, skip);
            let pushed = inner.push(&sqes);
            if let Err(e) = pushed {
                inner.slots[slot] = Slot::Done(-e.raw_os_error().unwrap_or(libc::EIO), 0);
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
    /// A free slot (or a new one), now in state `state`.
    fn take_slot(&mut self, state: Slot) -> usize {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::Free);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = state;
        slot
    }

    fn free_slot(&mut self, slot: usize) {
        self.slots[slot] = Slot::Free;
        self.free.push(slot);
    }

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

    /// Submit what is queued, and return only when the kernel has taken all of it: entries
    /// name sockets by number (see the module docs), so none may wait in the queue for a later
    /// submission.
    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // Completions are backed up: move them into their slots (their futures are
                // woken by the next reap), then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    let woken = self.reap();
                    self.woken.extend(woken);
                }
                // The kernel is short of memory for requests: give it a moment.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                Err(e) => return Err(e),
            }
            if self.uring.submission().is_empty() {
                return Ok(());
            }
        }
    }

    fn reap(&mut self) -> Vec<Waker> {
        let mut wakers = std::mem::take(&mut self.woken);
        let mut done = Vec::new();
        for cqe in self.uring.completion() {
            let ud = cqe.user_data();
            if ud == IGNORE || ud & LINK_HEAD != 0 {
                continue;
            }
            done.push((ud as usize, cqe.result(), cqe.flags()));
        }
        for (slot, res, flags) in done {
            match &mut self.slots[slot] {
                Slot::Waiting(w) => {
                    wakers.extend(w.take());
                    self.slots[slot] = Slot::Done(res, flags);
                }
                Slot::Stream(w, queue) => {
                    wakers.extend(w.take());
                    queue.push_back((res, flags));
                }
                // The last completion of one whose first is waiting for its future (a
                // zero-copy send's notification): nothing more to come.
                Slot::Done(_, first) if cqueue::more(*first) => *first &= !CQE_F_MORE,
                Slot::Abandoned(_, brings) => {
                    if *brings == Brings::Descriptors && res >= 0 {
                        // Safety: a successful accept completion hands us this new
                        // descriptor, and its future (the only other owner) is gone.
                        drop(unsafe { OwnedFd::from_raw_fd(res) });
                    }
                    self.give_back(flags);
                    if !cqueue::more(flags) {
                        self.free_slot(slot);
                    }
                }
                Slot::Free | Slot::Done(..) => {
                    debug_assert!(false, "completion for slot {slot} that was not in flight")
                }
            }
        }
        wakers
    }

    /// A completion nobody takes: the provided buffer it names (if any) goes back.
    fn give_back(&self, flags: u32) {
        if let (Some(bid), Some(pool)) = (cqueue::buffer_select(flags), &self.pool) {
            pool.available.fetch_sub(1, Ordering::Relaxed);
            pool.give_back(bid);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Cancel what is still in flight and give the kernel a moment to say so; whatever
        // still has no completion then is leaked, never freed under the kernel's feet.
        let in_flight = |s: &Vec<Slot>| s.iter().any(|s| matches!(s, Slot::Abandoned(..)));
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
            // A receive still in flight may yet pick one of the provided buffers (or write
            // into a fixed one).
            std::mem::forget(self.pool.take());
            std::mem::forget(self.fixed.take());
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_flags(cx).map(|(r, _, keep)| {
            (
                r,
                keep.expect("a single-completion operation hands back what it kept"),
            )
        })
    }
}

impl<T: Send + Unpin + 'static> Op<T> {
    /// The result, the completion's flags (which provided buffer it filled) and what the
    /// operation kept, which comes back unless the kernel still uses it (a completion with `F_MORE`).
    fn poll_flags(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<(io::Result<u32>, u32, Option<T>)> {
        let this = &mut *self;
        let (res, wakers) = {
            let mut inner = this.ring.inner.lock().unwrap();
            let wakers = inner.reap();
            let res = match &mut inner.slots[this.slot] {
                Slot::Done(r, f) => Some((*r, *f)),
                Slot::Waiting(w) => {
                    match w {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *w = Some(cx.waker().clone()),
                    }
                    None
                }
                Slot::Free | Slot::Abandoned(..) | Slot::Stream(..) => {
                    unreachable!("slot of a live single operation")
                }
            };
            if let Some((_, flags)) = res {
                if cqueue::more(flags) {
                    // The kernel still reads what the operation kept (a zero-copy send's
                    // buffer): the slot keeps it until the last completion.
                    let keep = this.keep.take().expect("polled after completion");
                    inner.slots[this.slot] = Slot::Abandoned(Box::new(keep), Brings::Nothing);
                } else {
                    inner.free_slot(this.slot);
                }
            }
            (res, wakers)
        };
        for w in wakers {
            w.wake();
        }
        match res {
            Some((r, flags)) => {
                let keep = self.keep.take();
                let r = if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as u32)
                };
                Poll::Ready((r, flags, keep))
            }
            None => Poll::Pending,
        }
    }
}

impl<T: Send + 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(keep) = self.keep.take() else { return };
        let mut inner = self.ring.inner.lock().unwrap();
        if let Slot::Done(_, flags) = inner.slots[self.slot] {
            inner.give_back(flags);
            if cqueue::more(flags) {
                // Its last completion is still to come: the slot keeps what the kernel uses.
                inner.slots[self.slot] = Slot::Abandoned(Box::new(keep), Brings::Nothing);
            } else {
                inner.free_slot(self.slot);
            }
            return;
        }
        inner.slots[self.slot] = Slot::Abandoned(Box::new(keep), Brings::Nothing);
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
        // splices' socket duplicates they hold) now, not when the reaper next runs.
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
            let uring: IoUring = IoUring::builder()
                .setup_submit_all()
                .build(8)
                .map_err(|e| format!("io_uring_setup: {e}"))?;
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
                (opcode::AcceptMulti::CODE, "ACCEPT"),
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
    // Safety: the entry points at no memory (the kernel takes the socket as it issues it).
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

/// Provided buffers per ring (a power of two) and the payload room of each. A receive that
/// waits for a quiet client holds none of them: the kernel takes one from the ring when bytes
/// arrive. Small, because they serve the interactive case: a receive that fills one marks
/// the client as sending in bulk, and bulk receives use a buffer of their own as large as a
/// frame. 64 x 16 KiB is 1 MiB per worker thread, touched only as far as it is used.
const POOL_BUFS: u16 = 64;
pub const POOL_BUF_LEN: usize = 16 * 1024;
const POOL_GROUP: u16 = 0;
/// Fixed (registered) buffers per ring and the payload room of each: a whole frame of the
/// SPDY plane (its largest DATA payload). Registered on a ring's first bulk receive, so idle
/// connections never make the process pay for them (8 x 256 KiB, pinned, per worker thread).
const FIXED_BUFS: u16 = 8;
pub const FIXED_BUF_LEN: usize = crate::proto::portforward::MAX_PAYLOAD;
// Every buffer keeps [`HEADROOM`] free in front of where the kernel writes, so that the frame
// header goes in front of the payload in place.

/// The buffers of one ring, [`HEADROOM`] + `buf_len` bytes each, lent out one at a time as
/// [`PoolBuf`]s. Two kinds:
/// - **provided**: [`POOL_BUFS`] small buffers registered as a buffer ring, which the kernel
///   picks from for [`recv_pooled`] (each given back to the ring's tail when dropped);
/// - **fixed**: [`FIXED_BUFS`] frame-sized buffers registered with `IORING_REGISTER_BUFFERS`
///   (pinned once, not per operation), which [`recv_fixed`] takes from a free list.
struct Pool {
    /// The ring of buffer descriptors the kernel reads (page aligned, shared with it); null
    /// for fixed buffers.
    entries: *mut types::BufRingEntry,
    entries_layout: Option<std::alloc::Layout>,
    /// The buffers themselves, `stride` bytes apart.
    mem: *mut u8,
    mem_layout: std::alloc::Layout,
    stride: usize,
    buf_len: usize,
    /// Our copy of the ring's tail; the lock orders givers on different threads.
    tail: Mutex<u16>,
    /// Fixed buffers not lent out (unused for provided ones).
    free: Mutex<Vec<u16>>,
    /// Buffers in the ring or on the free list (for tests and the buffer-leak check).
    available: std::sync::atomic::AtomicUsize,
}

// Safety: the raw pointers are to allocations this value owns; the descriptor ring is only
// written under the `tail` lock, and a buffer's bytes only by whoever holds its id (the
// kernel until the completion, then one PoolBuf).
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// `count` buffers of `buf_len` bytes after the headroom, and a descriptor ring for them
    /// if `provided`.
    fn alloc(count: u16, buf_len: usize, provided: bool) -> io::Result<Pool> {
        let stride = HEADROOM + buf_len;
        let entries_layout = provided
            .then(|| {
                std::alloc::Layout::from_size_align(
                    count as usize * std::mem::size_of::<types::BufRingEntry>(),
                    4096,
                )
            })
            .transpose()
            .map_err(io::Error::other)?;
        let mem_layout = std::alloc::Layout::from_size_align(count as usize * stride, 4096)
            .map_err(io::Error::other)?;
        // Safety: both layouts have a non-zero size; null results are checked (a null
        // `entries` without a layout is what fixed buffers have).
        let (entries, mem) = unsafe {
            (
                entries_layout.map_or(std::ptr::null_mut(), |l| {
                    std::alloc::alloc_zeroed(l).cast::<types::BufRingEntry>()
                }),
                std::alloc::alloc(mem_layout),
            )
        };
        let pool = Pool {
            entries,
            entries_layout: entries_layout.filter(|_| !entries.is_null()),
            mem,
            mem_layout,
            stride,
            buf_len,
            tail: Mutex::new(0),
            free: Mutex::new(Vec::new()),
            available: Default::default(),
        };
        if (provided && entries.is_null()) || mem.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        Ok(pool)
    }

    fn register(uring: &IoUring) -> io::Result<Pool> {
        let pool = Pool::alloc(POOL_BUFS, POOL_BUF_LEN, true)?;
        for bid in 0..POOL_BUFS {
            pool.give_back(bid);
        }
        // Safety: `entries` is a page-aligned ring of POOL_BUFS descriptors that lives as long
        // as this Pool, which the ring's Inner keeps until the ring is gone.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                pool.entries as u64,
                POOL_BUFS,
                POOL_GROUP,
                0,
            )?
        };
        Ok(pool)
    }

    /// The fixed buffers, registered with `uring` (whose Inner then keeps them until the ring
    /// is gone).
    fn register_fixed(uring: &IoUring) -> io::Result<Pool> {
        let pool = Pool::alloc(FIXED_BUFS, FIXED_BUF_LEN, false)?;
        let iov: Vec<libc::iovec> = (0..FIXED_BUFS as usize)
            .map(|i| libc::iovec {
                // Safety: inside `mem` (FIXED_BUFS strides).
                iov_base: unsafe { pool.mem.add(i * pool.stride) }.cast(),
                iov_len: pool.stride,
            })
            .collect();
        // Safety: every iovec is a buffer of this Pool, which outlives the registration (the
        // ring's Inner drops its IoUring first, or leaks this Pool).
        unsafe { uring.submitter().register_buffers(&iov)? };
        for bid in 0..FIXED_BUFS {
            pool.give_back(bid);
        }
        Ok(pool)
    }

    fn give_back(&self, bid: u16) {
        if self.entries.is_null() {
            self.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(bid);
            self.available.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        // Safety: the index is masked into the ring; at most POOL_BUFS ids exist, so the slot
        // written is one the kernel has already consumed. The buffer address is inside `mem`.
        unsafe {
            let e = &mut *self.entries.add((*tail & (POOL_BUFS - 1)) as usize);
            e.set_addr(self.mem.add(bid as usize * self.stride + HEADROOM) as u64);
            e.set_len(self.buf_len as u32);
            e.set_bid(bid);
            *tail = tail.wrapping_add(1);
            let shared =
                types::BufRingEntry::tail(self.entries).cast::<std::sync::atomic::AtomicU16>();
            (*shared).store(*tail, Ordering::Release);
        }
        self.available.fetch_add(1, Ordering::Relaxed);
    }

    /// A fixed buffer off the free list, if one is.
    fn take_fixed(self: &Arc<Self>) -> Option<PoolBuf> {
        let bid = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        self.available.fetch_sub(1, Ordering::Relaxed);
        Some(PoolBuf {
            pool: self.clone(),
            bid,
            len: 0,
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Safety: allocated in `alloc` with these layouts; the ring that could write into
        // them is gone (Inner drops its IoUring first, or leaks this Pool).
        unsafe {
            if let Some(l) = self.entries_layout {
                std::alloc::dealloc(self.entries.cast(), l);
            }
            std::alloc::dealloc(self.mem, self.mem_layout);
        }
    }
}

/// One provided buffer a receive filled: `len` bytes after [`HEADROOM`] free bytes. Goes
/// back to its ring when dropped (as `Bytes::from_owner`, when the last slice of it is).
pub struct PoolBuf {
    pool: Arc<Pool>,
    bid: u16,
    len: u32,
}

impl PoolBuf {
    /// Bytes received.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The most a receive puts in this buffer.
    pub fn capacity(&self) -> usize {
        self.pool.buf_len
    }

    /// Never true for a buffer [`recv_pooled`] returns (an end of file is [`Pooled::Eof`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The headroom and the bytes received, to frame in place.
    pub fn framed_mut(&mut self) -> &mut [u8] {
        // Safety: this PoolBuf holds the buffer's id, so nothing else reads or writes it; the
        // range is inside the buffer.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.pool.mem.add(self.bid as usize * self.pool.stride),
                HEADROOM + self.len as usize,
            )
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        // Safety: as in `framed_mut`.
        unsafe {
            std::slice::from_raw_parts(
                self.pool.mem.add(self.bid as usize * self.pool.stride),
                HEADROOM + self.len as usize,
            )
        }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.give_back(self.bid);
    }
}

/// What [`recv_pooled`] got.
pub enum Pooled {
    Data(PoolBuf),
    /// The peer's end of file.
    Eof,
    /// Nothing received: this ring has no provided buffer now (all are out, or none could be
    /// registered), or the receive would have blocked. Wait for the socket and receive into a
    /// buffer of your own.
    NoBuffer,
}

/// Start a receive of up to `max` bytes (at most [`POOL_BUF_LEN`]) that waits without holding
/// a buffer: the kernel takes one from this thread's ring when bytes arrive. The future is
/// small (an idle connection waits in it).
pub fn recv_pooled(fd: &SockFd, max: usize) -> io::Result<PooledRecv> {
    let ring = ring()?;
    if ring.pool.is_none() {
        return Ok(PooledRecv(None));
    }
    let max = max.min(POOL_BUF_LEN) as u32;
    // The kernel writes into a registered buffer it picks (owned by the PoolBuf built from
    // the completion).
    // Safety: the entry points at no memory of ours.
    let op = unsafe {
        ring.start(fd.clone(), |k, ud, _| {
            vec![
                opcode::Recv::new(k.raw(), std::ptr::null_mut(), max)
                    .buf_group(POOL_GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(ud),
            ]
        })
    };
    Ok(PooledRecv(Some(op)))
}

/// A receive started by [`recv_pooled`]. Dropped before it completes, it is cancelled; a
/// buffer the kernel filled meanwhile goes back to the ring.
pub struct PooledRecv(Option<Op<SockFd>>);

impl Future for PooledRecv {
    type Output = io::Result<Pooled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(op) = self.0.as_mut() else {
            return Poll::Ready(Ok(Pooled::NoBuffer));
        };
        let (res, flags, _) = std::task::ready!(Pin::new(&mut *op).poll_flags(cx));
        let pool = op
            .ring
            .pool
            .clone()
            .expect("a pooled receive's ring has a pool");
        let buf = cqueue::buffer_select(flags).map(|bid| {
            pool.available.fetch_sub(1, Ordering::Relaxed);
            PoolBuf { pool, bid, len: 0 }
        });
        Poll::Ready(match (res, buf) {
            (Ok(0), _) => Ok(Pooled::Eof),
            (Ok(n), Some(mut buf)) => {
                buf.len = n;
                Ok(Pooled::Data(buf))
            }
            (Ok(_), None) => Err(io::Error::other("io_uring receive named no buffer")),
            (Err(e), _)
                if e.raw_os_error() == Some(libc::ENOBUFS)
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                Ok(Pooled::NoBuffer)
            }
            (Err(e), _) => Err(e),
        })
    }
}

/// Whether bulk receives from local sockets go into the ring's fixed (registered) buffers:
/// `RINGFWD_URING_FIXED=1` (off by default, see perf/2026-12-02-uring-extras.md).
pub fn fixed_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RINGFWD_URING_FIXED").is_ok_and(|v| v == "1"))
}

/// Receive up to `max` bytes (at most [`FIXED_BUF_LEN`]) into one of this ring's fixed
/// buffers, after [`HEADROOM`] free bytes for the frame header; `None` when none is free (or
/// the kernel would not register them): receive into a buffer of your own. An empty buffer is
/// the peer's end of file.
pub async fn recv_fixed(fd: &SockFd, max: usize) -> io::Result<Option<PoolBuf>> {
    let ring = ring()?;
    let Some(mut buf) = ring.fixed_pool().and_then(|p| p.take_fixed()) else {
        return Ok(None);
    };
    let max = max.min(buf.capacity()) as u32;
    loop {
        // The read writes at most `max` bytes after the headroom of buffer `bid` (inside its
        // registered iovec). Safety: the operation owns that buffer's id until its completion.
        let op = unsafe {
            ring.start((fd.clone(), buf), |(k, b), ud, _| {
                let at = b.pool.mem.add(b.bid as usize * b.pool.stride + HEADROOM);
                vec![
                    opcode::ReadFixed::new(k.raw(), at, max, b.bid)
                        .build()
                        .user_data(ud),
                ]
            })
        };
        let (res, (_, b)) = op.await;
        buf = b;
        match res {
            Ok(n) => {
                buf.len = n;
                return Ok(Some(buf));
            }
            Err(e) => wait_or_fail(fd, e, libc::POLLIN).await?,
        }
    }
}

/// Whether large `sendmsg`s go out as zero-copy sends: `RINGFWD_URING_ZEROCOPY=1` (off by
/// default: on loopback the kernel copies a zero-copy send's pages anyway, later, see
/// perf/2026-12-02-uring-extras.md).
pub fn zerocopy_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RINGFWD_URING_ZEROCOPY").is_ok_and(|v| v == "1"))
}

/// The smallest `sendmsg` sent zero-copy: below this, pinning pages and the second
/// completion cost more than the copy they save.
const ZEROCOPY_MIN: usize = 32 * 1024;

/// The socket is non-blocking (tokio's, named by its descriptor), and io_uring respects
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
    sendmsg_as(fd, bufs, flags, zerocopy_enabled()).await
}

/// [`sendmsg`], zero-copy or not (for sends of at least [`ZEROCOPY_MIN`]).
async fn sendmsg_as(
    fd: &SockFd,
    bufs: Vec<Bytes>,
    flags: i32,
    zerocopy: bool,
) -> io::Result<usize> {
    loop {
        match sendmsg_once(fd, bufs.clone(), flags, zerocopy).await {
            Ok(n) => return Ok(n),
            Err(e) => wait_or_fail(fd, e, libc::POLLOUT).await?,
        }
    }
}

async fn sendmsg_once(
    fd: &SockFd,
    bufs: Vec<Bytes>,
    flags: i32,
    zerocopy: bool,
) -> io::Result<usize> {
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
    let zerocopy = zerocopy && g.iov.iter().map(|v| v.iov_len).sum::<usize>() >= ZEROCOPY_MIN;
    let flags = (flags | libc::MSG_NOSIGNAL) as u32;
    // A zero-copy send's last completion comes when the kernel lets go of the pages.
    // Safety: the box (msghdr, iovecs, buffers) is the operation's until its last completion.
    let mut op = unsafe {
        ring()?.start((fd.clone(), g), |(k, g), ud, _| {
            vec![match zerocopy {
                true => opcode::SendMsgZc::new(k.raw(), &g.msg)
                    .flags(flags)
                    .build()
                    .user_data(ud),
                false => opcode::SendMsg::new(k.raw(), &g.msg)
                    .flags(flags)
                    .build()
                    .user_data(ud),
            }]
        })
    };
    let (res, _, _) = std::future::poll_fn(|cx| Pin::new(&mut op).poll_flags(cx)).await;
    res.map(|n| n as usize)
}

/// A multishot accept on a listening socket: one submission, then a completion (a new,
/// non-blocking socket) per connection, for as long as it stays armed. The kernel ends it on
/// an error (out of descriptors, say) or when its completion queue overflows; [`Accepts::next`]
/// says so with `None` after handing over what came before, and the caller starts another.
///
/// Dropped (a listener closing), it is cancelled; connections accepted meanwhile are closed
/// as their completions arrive. Until the cancel completes, the kernel holds the listening
/// socket open.
pub struct Accepts {
    ring: Arc<Ring>,
    slot: usize,
    /// The last completion has been taken.
    ended: bool,
}

/// Arm a multishot accept on `listener` (which must stay open while this lives).
pub fn accept_multi(listener: &impl AsRawFd) -> io::Result<Accepts> {
    let ring = ring()?;
    let fd = listener.as_raw_fd();
    let slot = {
        let mut inner = ring.inner.lock().unwrap();
        let slot = inner.take_slot(Slot::Stream(None, Default::default()));
        let accept = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(slot as u64);
        // The entry points at no memory; the kernel takes the listener as it issues the
        // entry, inside this call.
        if let Err(e) = inner.push(&[accept]) {
            inner.free_slot(slot);
            return Err(e);
        }
        slot
    };
    Ok(Accepts {
        ring,
        slot,
        ended: false,
    })
}

impl Accepts {
    /// The next accepted socket, or the error the accept ended with; `None` once it has ended
    /// and everything before has been taken.
    pub async fn next(&mut self) -> Option<io::Result<OwnedFd>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<OwnedFd>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let (got, wakers) = {
            let mut inner = self.ring.inner.lock().unwrap();
            let wakers = inner.reap();
            let Slot::Stream(waker, queue) = &mut inner.slots[self.slot] else {
                unreachable!("slot of a live multishot operation")
            };
            let got = queue.pop_front();
            if got.is_none() && !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            if got.is_some_and(|(_, flags)| !cqueue::more(flags)) {
                debug_assert!(queue.is_empty(), "completions after the last one");
                let slot = self.slot;
                inner.free_slot(slot);
                self.ended = true;
            }
            (got, wakers)
        };
        for w in wakers {
            w.wake();
        }
        match got {
            None => Poll::Pending,
            // Safety: a successful accept completion is a new descriptor, ours alone.
            Some((res, _)) if res >= 0 => {
                Poll::Ready(Some(Ok(unsafe { OwnedFd::from_raw_fd(res) })))
            }
            // The kernel ended it without an error (its completion queue overflowed).
            Some((res, _)) if -res == libc::ECANCELED => Poll::Ready(None),
            Some((res, _)) => Poll::Ready(Some(Err(io::Error::from_raw_os_error(-res)))),
        }
    }
}

impl Drop for Accepts {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut inner = self.ring.inner.lock().unwrap();
        let queued = match std::mem::replace(
            &mut inner.slots[self.slot],
            Slot::Abandoned(Box::new(()), Brings::Descriptors),
        ) {
            Slot::Stream(_, queue) => queue,
            _ => unreachable!("slot of a live multishot operation"),
        };
        let mut last = false;
        for (res, flags) in queued {
            if res >= 0 {
                // Safety: accepted, never handed out: ours to close.
                drop(unsafe { OwnedFd::from_raw_fd(res) });
            }
            last |= !cqueue::more(flags);
        }
        if last {
            inner.free_slot(self.slot);
            return;
        }
        let cancel = opcode::AsyncCancel::new(self.slot as u64)
            .build()
            .user_data(IGNORE);
        // A failed cancel leaves the accept armed until the ring goes; what it accepts is
        // closed at each completion.
        let _ = inner.push(&[cancel]);
        let wakers = inner.reap();
        drop(inner);
        for w in wakers {
            w.wake();
        }
    }
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
    let (sock, pipe_in, pipe_out) = (fd.linked()?, pipe.write_fd(), pipe.read_fd());
    let (from, to, events): (RawFd, RawFd, u32) = match dir {
        Dir::In => (sock, pipe_in, libc::POLLIN as u32),
        Dir::Out => (pipe_out, sock, libc::POLLOUT as u32),
    };
    let flags =
        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
    // Safety: no user memory; `keep` holds the socket and both pipe ends open until the
    // completion.
    let mut op = unsafe {
        ring()?.start((fd.clone(), pipe.clone()), |_, ud, skip| {
            let mut head = squeue::Flags::IO_LINK;
            if skip {
                head |= squeue::Flags::SKIP_SUCCESS;
            }
            vec![
                opcode::PollAdd::new(types::Fd(sock), events)
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
        let fb = SockFd::new(&b);
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

    /// Buffers of this thread's ring that are in the ring (not lent to a PoolBuf or the kernel).
    fn pool_free() -> usize {
        let ring = Ring::current().unwrap();
        ring.pool
            .as_ref()
            .expect("a provided buffer ring")
            .available
            .load(Ordering::Relaxed)
    }

    /// A connected pair and a ring descriptor for the second socket; `None` (said on stderr)
    /// where io_uring is not available.
    async fn ring_pair() -> Option<(tokio::net::TcpStream, tokio::net::TcpStream, SockFd)> {
        if let Err(e) = available() {
            eprintln!("io_uring not available here: {e}");
            return None;
        }
        let (a, b) = pair().await;
        let fb = SockFd::new(&b);
        Some((a, b, fb))
    }

    /// Poll `f` once (so that its entry is submitted), then hand it back.
    async fn started<F: Future + Unpin>(mut f: F) -> F {
        std::future::poll_fn(|cx| {
            assert!(Pin::new(&mut f).poll(cx).is_pending(), "finished at once");
            Poll::Ready(())
        })
        .await;
        f
    }

    /// A receive into the provided buffers holds none while it waits, gets the bytes in one
    /// with the frame headroom in front, and the buffer goes back when dropped; a cancelled
    /// receive and an end of file give theirs back too. One thread, so one ring.
    #[tokio::test(flavor = "current_thread")]
    async fn pooled_receive_holds_no_buffer_while_it_waits() {
        let Some((mut a, _b, fb)) = ring_pair().await else {
            return;
        };
        assert_eq!(pool_free(), POOL_BUFS as usize);
        let waiting = started(recv_pooled(&fb, 1024).unwrap()).await;
        assert_eq!(
            pool_free(),
            POOL_BUFS as usize,
            "a waiting receive took a buffer"
        );
        a.write_all(b"hello").await.unwrap();
        let Pooled::Data(mut got) = waiting.await.unwrap() else {
            panic!("no data")
        };
        assert_eq!(got.len(), 5);
        assert_eq!(&got.framed_mut()[HEADROOM..], b"hello");
        assert_eq!(pool_free(), POOL_BUFS as usize - 1);
        let bytes = Bytes::from_owner(got).slice(HEADROOM..);
        assert_eq!(&bytes[..], b"hello");
        drop(bytes);
        assert_eq!(
            pool_free(),
            POOL_BUFS as usize,
            "dropped buffer not given back"
        );

        // Cancelled while waiting: nothing taken, nothing lost.
        for _ in 0..100 {
            drop(started(recv_pooled(&fb, 1024).unwrap()).await);
        }
        assert_eq!(pool_free(), POOL_BUFS as usize);
        a.write_all(b"x").await.unwrap();
        assert!(
            matches!(recv_pooled(&fb, 1024).unwrap().await.unwrap(), Pooled::Data(b) if b.len() == 1)
        );
        drop(a);
        assert!(matches!(
            recv_pooled(&fb, 1024).unwrap().await.unwrap(),
            Pooled::Eof
        ));
        assert_eq!(pool_free(), POOL_BUFS as usize);
    }

    /// With every provided buffer lent out, a receive says so (and leaves the bytes in the
    /// socket for a receive of its own); one buffer back, and pooled receives work again.
    #[tokio::test(flavor = "current_thread")]
    async fn pooled_receive_with_every_buffer_out() {
        let Some((mut a, _b, fb)) = ring_pair().await else {
            return;
        };
        let mut held = Vec::new();
        for i in 0..POOL_BUFS {
            a.write_all(&[i as u8]).await.unwrap();
            match recv_pooled(&fb, 1).unwrap().await.unwrap() {
                Pooled::Data(b) => held.push(b),
                _ => panic!("receive {i} got no buffer"),
            }
        }
        assert_eq!(pool_free(), 0);
        a.write_all(b"late").await.unwrap();
        assert!(matches!(
            recv_pooled(&fb, 1024).unwrap().await.unwrap(),
            Pooled::NoBuffer
        ));
        let mut own = BytesMut::new();
        assert_eq!(recv(&fb, &mut own, 1024).await.unwrap(), 4);
        assert_eq!(&own[..], b"late");
        held.pop();
        a.write_all(b"again").await.unwrap();
        let Pooled::Data(mut got) = recv_pooled(&fb, 1024).unwrap().await.unwrap() else {
            panic!("no buffer after one came back")
        };
        assert_eq!(&got.framed_mut()[HEADROOM..], b"again");
        drop((got, held));
        assert_eq!(pool_free(), POOL_BUFS as usize);
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
        let fb = SockFd::new(&b);
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
        let fb = SockFd::new(&b);
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
                let fb = SockFd::new(&b);
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

    /// Receives, sends and polls name the socket by its number: only a linked splice makes
    /// the handle duplicate it (10,000 idle connections must fit in 20,000 descriptors), and a
    /// socket closed under a cancelled receive does not leak its number into the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_splices_duplicate_the_socket() {
        if let Err(e) = available() {
            return eprintln!("io_uring not available here: {e}");
        }
        let (mut a, b) = pair().await;
        let fb = SockFd::new(&b);
        let idle = recv_pooled(&fb, 64).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), idle).await;
        assert!(r.is_err(), "a receive completed with nothing sent");
        send(&fb, Bytes::from_static(b"ping"), 0).await.unwrap();
        let mut got = [0u8; 4];
        a.read_exact(&mut got).await.unwrap();
        poll(&fb, libc::POLLOUT as u32).await.unwrap();
        assert!(
            !fb.duplicated(),
            "a receive, send or poll duplicated the socket"
        );
        let pipe = Arc::new(Pipe::new().unwrap());
        a.write_all(b"spliced").await.unwrap();
        let n = splice(&fb, &pipe, Dir::In, 64, false).await.unwrap();
        assert_eq!(n, 7);
        assert!(
            fb.duplicated(),
            "a linked splice named the socket by number"
        );

        // A receive in flight on a socket that is then closed (the cancel and the close in
        // either order): the next socket, likely given the same number, gets its own bytes.
        let (mut c, d) = pair().await;
        let fd = SockFd::new(&d);
        let waiting = recv_pooled(&fd, 64).unwrap();
        drop(d);
        drop(waiting);
        let (mut e, f) = pair().await;
        let ff = SockFd::new(&f);
        c.write_all(b"old").await.unwrap();
        e.write_all(b"new").await.unwrap();
        let mut buf = BytesMut::new();
        let n = recv(&ff, &mut buf, 64).await.unwrap();
        assert_eq!(&buf[..n], b"new");
    }

    /// Slots of this thread's ring that are not free.
    fn busy_slots() -> usize {
        let ring = Ring::current().unwrap();
        ring.reap();
        let inner = ring.inner.lock().unwrap();
        inner
            .slots
            .iter()
            .filter(|s| !matches!(s, Slot::Free))
            .count()
    }

    /// A listener on port 0, its address, and a multishot accept armed on it; `None` (said
    /// on stderr) where io_uring is not available.
    async fn armed_listener() -> Option<(tokio::net::TcpListener, std::net::SocketAddr, Accepts)> {
        if let Err(e) = available() {
            eprintln!("io_uring not available here: {e}");
            return None;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = accept_multi(&listener).unwrap();
        Some((listener, addr, accepts))
    }

    /// One multishot accept takes many connections, each a working non-blocking socket, and
    /// stays one operation in the ring while it does.
    #[tokio::test(flavor = "current_thread")]
    async fn one_multishot_accept_takes_every_connection() {
        let Some((_listener, addr, mut accepts)) = armed_listener().await else {
            return;
        };
        let mut clients = Vec::new();
        for i in 0..50u8 {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(&[i]).await.unwrap();
            clients.push(c);
        }
        for i in 0..50u8 {
            let fd = accepts.next().await.expect("armed").expect("accepted");
            let mut s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd)).unwrap();
            let mut got = [0u8; 1];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], i, "connections out of order");
            s.write_all(b"ok").await.unwrap();
        }
        assert_eq!(busy_slots(), 1, "one multishot accept, still armed");
        for mut c in clients {
            let mut got = [0u8; 2];
            c.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"ok");
        }
        drop(accepts);
        assert_eq!(busy_slots(), 0, "the cancelled accept kept its slot");
    }

    /// A multishot accept dropped with connections it took and nobody collected closes them
    /// (their clients see the end, nothing leaks), and the listener works again afterwards.
    #[tokio::test(flavor = "current_thread")]
    async fn dropped_accept_closes_what_it_took() {
        let Some((listener, addr, mut accepts)) = armed_listener().await else {
            return;
        };
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let taken = accepts.next().await.unwrap().unwrap();
        // Accepted by the kernel, never collected.
        let mut orphans = Vec::new();
        for _ in 0..5 {
            orphans.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Wait until the ring has taken them: the listener's backlog is empty.
        let lfd = listener.as_raw_fd();
        let took_all = || {
            let mut p = libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Safety: one valid pollfd, no wait.
            unsafe { libc::poll(&mut p, 1, 0) == 0 }
        };
        while !took_all() {
            tokio::task::yield_now().await;
        }
        drop(accepts);
        for mut o in orphans {
            let mut buf = [0u8; 1];
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), o.read(&mut buf))
                .await
                .expect("an orphaned connection stayed open");
            assert!(matches!(r, Ok(0) | Err(_)), "orphan read {r:?}");
        }
        assert_eq!(busy_slots(), 0);
        // The one collected before is still ours and open.
        let mut s = tokio::net::TcpStream::from_std(std::net::TcpStream::from(taken)).unwrap();
        s.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        first.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still");
        // And the listener takes connections again, through tokio or a new multishot accept.
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut again = accept_multi(&listener).unwrap();
        assert!(again.next().await.unwrap().is_ok());
    }

    /// Receives into the fixed buffers put the bytes after the frame headroom, give the
    /// buffer back when dropped, say `None` with every buffer out, and see the end of file.
    #[tokio::test(flavor = "current_thread")]
    async fn fixed_receives_lend_registered_buffers() {
        let Some((mut a, _b, fb)) = ring_pair().await else {
            return;
        };
        let ring = Ring::current().unwrap();
        let Some(pool) = ring.fixed_pool().cloned() else {
            return eprintln!("the kernel would not register fixed buffers here");
        };
        let free = || pool.available.load(Ordering::Relaxed);
        assert_eq!(free(), FIXED_BUFS as usize);
        let data: Vec<u8> = (0..FIXED_BUF_LEN + 1000).map(|i| (i % 253) as u8).collect();
        let writer = tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
            a
        });
        let mut held = Vec::new();
        let mut got = Vec::new();
        while got.len() < FIXED_BUF_LEN + 1000 {
            let mut b = recv_fixed(&fb, FIXED_BUF_LEN)
                .await
                .unwrap()
                .expect("a free buffer");
            assert!(!b.is_empty());
            assert_eq!(b.framed_mut().len(), HEADROOM + b.len());
            got.extend_from_slice(&b.as_ref()[HEADROOM..]);
            held.push(b);
            if held.len() == FIXED_BUFS as usize {
                break;
            }
        }
        let want: Vec<u8> = (0..got.len()).map(|i| (i % 253) as u8).collect();
        assert!(got == want, "bytes changed on the way");
        let mut a = writer.await.unwrap();
        if held.len() == FIXED_BUFS as usize {
            assert!(recv_fixed(&fb, 64).await.unwrap().is_none());
        }
        drop(held);
        assert_eq!(
            free(),
            FIXED_BUFS as usize,
            "dropped buffers not given back"
        );
        // Whatever is left, then the end.
        a.shutdown().await.unwrap();
        loop {
            let b = recv_fixed(&fb, FIXED_BUF_LEN).await.unwrap().unwrap();
            if b.is_empty() {
                break;
            }
        }
        assert_eq!(free(), FIXED_BUFS as usize);
    }

    /// A zero-copy sendmsg delivers the bytes intact, and its slot (holding the buffers)
    /// stays taken until the kernel's notification, then frees.
    #[tokio::test(flavor = "current_thread")]
    async fn zerocopy_sendmsg_keeps_buffers_until_notified() {
        let Some((mut a, _b, fb)) = ring_pair().await else {
            return;
        };
        let data: Bytes = (0..4 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 4 << 20];
            a.read_exact(&mut got).await.unwrap();
            got
        });
        let mut off = 0;
        while off < data.len() {
            let parts = vec![
                data.slice(off..(off + 100).min(data.len())),
                data.slice((off + 100).min(data.len())..(off + 256 * 1024).min(data.len())),
            ];
            off += sendmsg_as(&fb, parts, 0, true).await.unwrap();
        }
        assert!(
            reader.await.unwrap() == data[..],
            "bytes changed on the way"
        );
        // Every notification arrives (the receiver has read everything).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while busy_slots() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "a zero-copy send never notified"
            );
            tokio::task::yield_now().await;
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
        let (fin, fout) = (SockFd::new(&b_in), SockFd::new(&a_out));
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
