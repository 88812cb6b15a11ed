//! One worker's io_uring and the state of every operation in it.
//!
//! A ring belongs to the thread that made it (a worker, see [`super::worker`]) and lives in a
//! thread-local, so nothing here locks. Operations queue their entries during a loop turn; the
//! kernel sees them all in the turn's one `io_uring_enter`, which also waits for completions.
//! Each operation has a slot in a slab; its index is the entry's `user_data`, so a completion
//! finds its operation in one lookup.
//!
//! The rule that makes this sound: **whatever an operation hands the kernel stays alive until
//! its completion arrives.** An operation's future owns its buffers and its socket handle; a
//! future dropped before its completion moves them into its slot ([`Slot::Abandoned`]) and
//! asks the kernel to cancel, and the slot lets go of them only at the last completion.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::buf::Pool;

/// Submission queue entries per ring. When it is full mid-turn the queue is submitted (without
/// waiting) and filling goes on.
const SQ_ENTRIES: u32 = 512;
/// Completion queue entries; the kernel keeps overflowing completions (`FEAT_NODROP`).
const CQ_ENTRIES: u32 = 8192;

/// user_data of an entry whose completion nobody waits for (a cancel request).
pub(super) const IGNORE: u64 = u64::MAX;
/// user_data of the worker's wake-up read (see [`super::worker`]).
pub(super) const WAKE: u64 = u64::MAX - 1;

/// One operation's place in the ring. A multishot operation (accept, receive) completes once
/// per result; every completion but its last carries `IORING_CQE_F_MORE`, and a slot is freed
/// only at the last.
pub(super) enum Slot {
    Free,
    /// In flight; the waker of the future waiting for it.
    Waiting(Option<Waker>),
    /// Completed with this result and these completion flags; its future has not taken it.
    Done(i32, u32),
    /// A multishot operation in flight: the completions its future has not taken yet.
    Stream(Option<Waker>, VecDeque<(i32, u32)>),
    /// In flight, its future gone: what the kernel may still use, freed at the last
    /// completion; descriptors its completions bring (an accept's) are closed, provided
    /// buffers they name go back.
    Abandoned(#[allow(dead_code)] Box<dyn Any>, Brings),
}

/// Whether an operation's successful completions bring a new descriptor that nobody else will
/// close once its future is gone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Brings {
    Nothing,
    Descriptors,
}

/// What the kernel under this ring can do, found at setup.
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (6.1): completion work runs
    /// only when this thread asks for completions, never interrupting it.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19): no interrupt to run completion work.
    pub coop_taskrun: bool,
    /// A minimum-wait timeout on `io_uring_enter` (6.12): wait for a batch of completions,
    /// but no longer than this for more than one.
    pub min_wait: bool,
    /// Provided buffers registered as a ring.
    pub provided_buffers: bool,
}

pub(super) struct Ring {
    // Dropped before `pool`: the kernel lets go of the buffers with the ring.
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The provided buffers (`None` where the kernel cannot register them).
    pub(super) pool: Option<Arc<Pool>>,
    pub(super) features: Features,
    /// Operations whose last completion has not come (for the leak check on drop).
    in_flight: usize,
    /// Completions being dispatched (kept to reuse its allocation).
    cqes: Vec<cqueue::Entry>,
}

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// Run `f` on this thread's ring. Panics off a worker thread: operations are started and
/// polled only by the tasks of the worker that owns their ring.
pub(super) fn with<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        f(r.as_mut()
            .expect("an io_uring operation used off its worker thread"))
    })
}

/// [`with`], or `None` off a worker thread (a future dropped where it cannot be cancelled).
pub(super) fn try_with<R>(f: impl FnOnce(&mut Ring) -> R) -> Option<R> {
    RING.with(|r| r.try_borrow_mut().ok()?.as_mut().map(f))
}

/// Make this thread's ring (a worker thread, once).
pub(super) fn install() -> io::Result<Features> {
    let ring = Ring::setup()?;
    let features = ring.features;
    RING.with(|r| *r.borrow_mut() = Some(ring));
    Ok(features)
}

impl Ring {
    fn setup() -> io::Result<Ring> {
        // The most the kernel offers, then less: DEFER_TASKRUN needs 6.1, COOP_TASKRUN 5.19.
        // SUBMIT_ALL: an entry the kernel refuses does not hold back the ones behind it.
        let attempts: [(bool, bool); 3] = [(true, true), (false, true), (false, false)];
        let mut last = None;
        for (defer, coop) in attempts {
            let mut b = IoUring::builder();
            b.setup_cqsize(CQ_ENTRIES).setup_submit_all();
            if defer {
                b.setup_single_issuer().setup_defer_taskrun();
            }
            if coop {
                b.setup_coop_taskrun();
            }
            match b.build(SQ_ENTRIES) {
                Ok(uring) => {
                    let mut features = Features {
                        defer_taskrun: defer,
                        coop_taskrun: coop,
                        min_wait: uring.params().is_feature_min_timeout(),
                        provided_buffers: false,
                    };
                    let pool = match Pool::new() {
                        // Safety: the Ring keeps the pool until its IoUring is dropped (the
                        // field order), or leaks it (Drop).
                        Ok(p) => match unsafe { p.register(&uring) } {
                            Ok(()) => Some(Arc::new(p)),
                            Err(e) => {
                                tracing::debug!("io_uring provided buffers not registered: {e}");
                                None
                            }
                        },
                        Err(_) => None,
                    };
                    features.provided_buffers = pool.is_some();
                    let ring = Ring {
                        uring,
                        slots: Vec::new(),
                        free: Vec::new(),
                        pool,
                        features,
                        in_flight: 0,
                        cqes: Vec::with_capacity(256),
                    };
                    return Ok(ring);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
    }

    /// A free slot (or a new one), now in state `state`.
    pub(super) fn take_slot(&mut self, state: Slot) -> usize {
        self.in_flight += 1;
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

    pub(super) fn free_slot(&mut self, slot: usize) {
        self.in_flight -= 1;
        self.slots[slot] = Slot::Free;
        self.free.push(slot);
    }

    pub(super) fn slot(&mut self, slot: usize) -> &mut Slot {
        &mut self.slots[slot]
    }

    /// Queue `entry`; it reaches the kernel with this turn's enter (or sooner, if the queue
    /// is full).
    ///
    /// # Safety
    /// Whatever `entry` points at must stay valid until its completion (see the module docs);
    /// a descriptor it names by number must stay open until then.
    pub(super) unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // Safety: the caller's promise, passed on.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return;
            }
            // Full: hand the kernel what is queued, without waiting, and go on.
            if let Err(e) = self.enter(0, None, None) {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    /// Queue a cancel of the operation in `slot` (its completion comes back, ECANCELED, to
    /// the slot).
    pub(super) fn cancel(&mut self, slot: usize) {
        let cancel = opcode::AsyncCancel::new(slot as u64)
            .build()
            .user_data(IGNORE);
        // Safety: a cancel points at no memory.
        unsafe { self.push(&cancel) };
    }

    /// Submit everything queued and wait: for `want` completions (0: do not wait), but for
    /// no longer than `timeout`; with `min_wait`, return after that long once at least one
    /// completion is there. Completions stay in the queue for [`reap`](Self::reap).
    pub(super) fn enter(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        min_wait: Option<Duration>,
    ) -> io::Result<()> {
        let to_submit = self.uring.submission().len() as u32;
        let ts = timeout.map(|t| {
            types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos())
        });
        let mut args = types::SubmitArgs::new();
        if let Some(m) = min_wait.filter(|_| self.features.min_wait) {
            args = args.min_wait_usec(m.as_micros().min(u32::MAX as u128) as u32);
        }
        // GETEVENTS always: with DEFER_TASKRUN the kernel posts completions only when asked.
        let flags = ENTER_GETEVENTS | ENTER_EXT_ARG;
        let r = match &ts {
            Some(ts) => {
                let args = args.timespec(ts);
                // Safety: `args` (and the timespec it points to) live across the call.
                unsafe {
                    self.uring
                        .submitter()
                        .enter(to_submit, want, flags, Some(&args))
                }
            }
            // Safety: as above.
            None => unsafe {
                self.uring
                    .submitter()
                    .enter(to_submit, want, flags, Some(&args))
            },
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Move every completion into its slot, the wakers of the futures waiting for them into
    /// `wakers`; how many completions there were, and whether the worker's wake-up read was
    /// one of them.
    pub(super) fn reap(&mut self, wakers: &mut Vec<Waker>) -> (usize, bool) {
        let mut woke_worker = false;
        let mut count = 0;
        // Copied out (into a vector kept between reaps) so that the slots can change.
        let mut done = std::mem::take(&mut self.cqes);
        done.clear();
        done.extend(self.uring.completion());
        for cqe in done.drain(..) {
            count += 1;
            let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            if ud == IGNORE {
                continue;
            }
            if ud == WAKE {
                woke_worker = true;
                continue;
            }
            let slot = ud as usize;
            match &mut self.slots[slot] {
                Slot::Waiting(w) => {
                    wakers.extend(w.take());
                    self.slots[slot] = Slot::Done(res, flags);
                }
                Slot::Stream(w, queue) => {
                    wakers.extend(w.take());
                    queue.push_back((res, flags));
                }
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
        self.cqes = done;
        (count, woke_worker)
    }

    /// A completion nobody takes: the provided buffer it names (if any) goes back.
    pub(super) fn give_back(&self, flags: u32) {
        if let (Some(bid), Some(pool)) = (cqueue::buffer_select(flags), &self.pool) {
            // Safety: the completion named this buffer of the pool's group, and nobody else
            // takes it; dropping the PoolBuf gives it back.
            drop(unsafe { pool.take(bid, 0) });
        }
    }

    /// Operations in flight (their last completion not yet here).
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// `io_uring_enter` flags (the io-uring crate keeps its constants private).
const ENTER_GETEVENTS: u32 = 1;
const ENTER_EXT_ARG: u32 = 8;

impl Drop for Ring {
    fn drop(&mut self) {
        // Cancel what is still in flight and give the kernel a moment to say so; whatever
        // still has no completion then is leaked, never freed under the kernel's feet.
        if self.in_flight > 0 {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(IGNORE);
            // Safety: a cancel points at no memory.
            unsafe { self.push(&cancel) };
            let mut wakers = Vec::new();
            for _ in 0..10 {
                let _ = self.enter(1, Some(Duration::from_millis(5)), None);
                self.reap(&mut wakers);
                if self.in_flight == 0 {
                    break;
                }
            }
        }
        if self.in_flight > 0 {
            std::mem::forget(std::mem::take(&mut self.slots));
            // A receive still in flight may yet pick one of the provided buffers.
            std::mem::forget(self.pool.take());
        }
    }
}
