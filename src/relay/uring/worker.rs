//! The worker threads of the io_uring data plane: one per core, each running one ring as its
//! only event loop, and the tasks (futures) that live on it.
//!
//! A worker owns its ring (thread-local), its tasks, its timers and a run queue. One loop turn:
//! take what other threads handed over, poll every woken task (each may queue ring operations,
//! which only fill the submission queue), fire due timers, then one `io_uring_enter` that
//! submits the whole turn's operations and waits for completions (or the next timer); each
//! completion wakes the task waiting for it. Tasks never move between workers, so a task's
//! wake-up on its own worker is a push onto a local queue, and every socket a task drives is
//! driven by this ring alone, never registered with epoll.
//!
//! Other threads (the tokio control plane) hand work over through [`Worker::spawn`]: the task
//! goes into a locked queue, and an eventfd the ring is reading wakes the worker if it sleeps.
//! Many hand-overs before the worker runs cost one wake-up. The same path carries wake-ups
//! from other threads (a tokio timer or channel waking a task of this worker).

use std::cell::{Cell, RefCell};
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::ring::{self, Features};

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Polls of woken tasks per loop turn before the ring is entered again (so that a task that
/// keeps waking itself cannot hold back completions).
const TURN_BUDGET: usize = 1024;

/// What other threads share with one worker.
pub struct Shared {
    id: usize,
    /// `io_uring_enter` calls and completions so far (for tests and measurements).
    enters: AtomicU64,
    completions: AtomicU64,
    /// Tasks handed over and tasks woken from other threads, taken at the start of a turn.
    inbox: Mutex<Inbox>,
    /// Set when something is in the inbox and the worker has not looked yet; the first
    /// sender to set it writes the eventfd.
    signalled: AtomicBool,
    efd: OwnedFd,
    /// Tasks alive on this worker (for placing new work).
    tasks: AtomicUsize,
    /// What its ring can do (set once the ring is up).
    features: OnceLock<Features>,
}

#[derive(Default)]
struct Inbox {
    spawn: Vec<BoxFuture>,
    wake: Vec<Arc<Header>>,
}

/// A task's identity, shared with its wakers.
struct Header {
    worker: &'static Shared,
    slot: usize,
    /// In a run queue already (a second wake-up before it runs changes nothing).
    queued: AtomicBool,
}

impl Wake for Header {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if CURRENT
            .with(|c| c.get())
            .is_some_and(|w| std::ptr::eq(w, self.worker))
        {
            RUN.with(|q| q.borrow_mut().push_back(self.clone()));
        } else {
            self.worker.hand_over(|inbox| inbox.wake.push(self.clone()));
        }
    }
}

struct Task {
    header: Arc<Header>,
    waker: Waker,
    /// `None` while it is being polled.
    fut: Option<BoxFuture>,
}

/// A timer of this worker: wake `waker` at `at`.
struct Timer {
    at: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    // Reversed: the heap's top is the earliest.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

thread_local! {
    /// The worker running on this thread.
    static CURRENT: Cell<Option<&'static Shared>> = const { Cell::new(None) };
    static RUN: RefCell<VecDeque<Arc<Header>>> = const { RefCell::new(VecDeque::new()) };
    static TASKS: RefCell<Slab> = const { RefCell::new(Slab { tasks: Vec::new(), free: Vec::new() }) };
    static TIMERS: RefCell<(BinaryHeap<Timer>, u64)> = const { RefCell::new((BinaryHeap::new(), 0)) };
}

struct Slab {
    tasks: Vec<Option<Task>>,
    free: Vec<usize>,
}

impl Shared {
    /// Put something in the inbox and make sure the worker looks.
    fn hand_over(&self, put: impl FnOnce(&mut Inbox)) {
        put(&mut self.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // Safety: writes 8 bytes from a local to our eventfd (a full counter, EAGAIN,
            // still leaves it readable, which is all the worker needs).
            unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

/// A worker of the data plane (cheap to copy; workers live as long as the process).
#[derive(Clone, Copy)]
pub struct Worker(&'static Shared);

impl PartialEq for Worker {
    fn eq(&self, o: &Self) -> bool {
        std::ptr::eq(self.0, o.0)
    }
}
impl Eq for Worker {}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Worker({})", self.0.id)
    }
}

impl Worker {
    /// Run `fut` on this worker. The handle gives its output; dropping the handle cancels it
    /// (the future is dropped on the worker, which cancels its operations).
    pub fn spawn<T, F>(self, fut: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = wrap(fut, tx);
        if current() == Some(self) {
            spawn_local(task);
        } else {
            self.0.hand_over(|inbox| inbox.spawn.push(task));
        }
        JoinHandle(rx)
    }

    /// Run `fut` on this worker until it ends by itself.
    pub fn spawn_detached(self, fut: BoxFuture) {
        if current() == Some(self) {
            spawn_local(fut);
        } else {
            self.0.hand_over(|inbox| inbox.spawn.push(fut));
        }
    }

    /// Tasks alive on this worker.
    pub fn load(self) -> usize {
        self.0.tasks.load(Ordering::Relaxed)
    }

    pub fn id(self) -> usize {
        self.0.id
    }

    /// `io_uring_enter` calls and operations completed so far.
    pub fn stats(self) -> (u64, u64) {
        (
            self.0.enters.load(Ordering::Relaxed),
            self.0.completions.load(Ordering::Relaxed),
        )
    }

    /// A worker of its own, outside the process's set (a test that counts what its ring
    /// does).
    #[cfg(test)]
    pub(crate) fn private() -> Worker {
        static IDS: AtomicUsize = AtomicUsize::new(1000);
        start_worker(IDS.fetch_add(1, Ordering::Relaxed)).expect("a private worker")
    }

    /// What this worker's ring can do.
    pub fn features(self) -> Features {
        self.0.features.get().copied().unwrap_or_default()
    }
}

/// A task that sends its output to `tx`, or ends early when the handle is dropped.
fn wrap<T, F>(fut: F, tx: tokio::sync::oneshot::Sender<T>) -> BoxFuture
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    // A struct, not an async block: an async block that moved `fut` into a pinned local would
    // keep room for it twice (its capture and the local), and every connection's relay lives
    // in one of these.
    Box::pin(Wrapped { fut, tx: Some(tx) })
}

pin_project_lite::pin_project! {
    struct Wrapped<F, T> {
        #[pin]
        fut: F,
        tx: Option<tokio::sync::oneshot::Sender<T>>,
    }
}

impl<F: Future<Output = T>, T> Future for Wrapped<F, T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(tx) = this.tx.as_mut() else {
            return Poll::Ready(());
        };
        if let Poll::Ready(out) = this.fut.poll(cx) {
            let _ = this.tx.take().expect("checked above").send(out);
            return Poll::Ready(());
        }
        // The handle is gone: nobody wants the output, end (dropping `fut` cancels it).
        match tx.poll_closed(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The output of a task on a worker; dropping this cancels the task.
pub struct JoinHandle<T>(tokio::sync::oneshot::Receiver<T>);

impl<T> Future for JoinHandle<T> {
    type Output = Option<T>;

    /// `None` if the task ended without output (its worker panicked).
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        Pin::new(&mut self.0).poll(cx).map(Result::ok)
    }
}

/// The worker running this thread, if it is one.
pub fn current() -> Option<Worker> {
    CURRENT.with(|c| c.get()).map(Worker)
}

/// Every worker, started on first use: one per core, or `RINGFWD_URING_WORKERS`.
pub fn workers() -> io::Result<&'static [Worker]> {
    static WORKERS: OnceLock<Result<Vec<Worker>, String>> = OnceLock::new();
    WORKERS
        .get_or_init(start_workers)
        .as_deref()
        .map_err(|e| io::Error::other(e.clone()))
}

/// The worker with the fewest tasks (the first of those, in turn).
pub fn pick() -> io::Result<Worker> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let ws = workers()?;
    let start = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut best = ws[start % ws.len()];
    for i in 1..ws.len() {
        let w = ws[(start + i) % ws.len()];
        if w.load() < best.load() {
            best = w;
        }
    }
    Ok(best)
}

fn start_workers() -> Result<Vec<Worker>, String> {
    let n = std::env::var("RINGFWD_URING_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = (0..n).map(start_worker).collect::<Result<Vec<_>, _>>()?;
    let f = out[0].features();
    tracing::debug!(
        "io_uring data plane: {n} workers (defer_taskrun {}, coop_taskrun {}, min_wait {}, provided buffers {})",
        f.defer_taskrun,
        f.coop_taskrun,
        f.min_wait,
        f.provided_buffers
    );
    Ok(out)
}

/// Start one worker thread (its ring made on it) and wait until it runs.
fn start_worker(id: usize) -> Result<Worker, String> {
    // Safety: eventfd has no memory arguments; a negative result is checked.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(format!("eventfd: {}", io::Error::last_os_error()));
    }
    // Workers live as long as the process: their shared part is never freed.
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        id,
        enters: AtomicU64::new(0),
        completions: AtomicU64::new(0),
        inbox: Mutex::new(Inbox::default()),
        signalled: AtomicBool::new(false),
        // Safety: eventfd just returned this descriptor and nothing else owns it.
        efd: unsafe { OwnedFd::from_raw_fd(efd) },
        tasks: AtomicUsize::new(0),
        features: OnceLock::new(),
    }));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("rf-uring-{id}"))
        .spawn(move || match ring::install() {
            Ok(features) => {
                let _ = shared.features.set(features);
                let _ = ready_tx.send(Ok(()));
                run(shared);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("io_uring_setup: {e}")));
            }
        })
        .map_err(|e| format!("worker thread: {e}"))?;
    ready_rx
        .recv()
        .map_err(|_| "worker thread died".to_string())??;
    Ok(Worker(shared))
}

/// Start a task on this thread's worker.
fn spawn_local(fut: BoxFuture) {
    let worker = current().expect("spawn_local off a worker").0;
    worker.tasks.fetch_add(1, Ordering::Relaxed);
    let header = TASKS.with(|t| {
        let mut t = t.borrow_mut();
        let slot = t.free.pop().unwrap_or_else(|| {
            t.tasks.push(None);
            t.tasks.len() - 1
        });
        let header = Arc::new(Header {
            worker,
            slot,
            queued: AtomicBool::new(true),
        });
        t.tasks[slot] = Some(Task {
            waker: Waker::from(header.clone()),
            header: header.clone(),
            fut: Some(fut),
        });
        header
    });
    RUN.with(|q| q.borrow_mut().push_back(header));
}

/// Poll the task `header` names, if it is still the one in its slot.
fn poll_task(header: Arc<Header>) {
    let slot = header.slot;
    let taken = TASKS.with(|t| {
        let mut t = t.borrow_mut();
        let task = t.tasks.get_mut(slot)?.as_mut()?;
        if !Arc::ptr_eq(&task.header, &header) {
            // A stale wake-up of a task that ended; its slot holds another now.
            return None;
        }
        Some((task.fut.take()?, task.waker.clone()))
    });
    let Some((mut fut, waker)) = taken else {
        return;
    };
    // Woken again from here on means polled again.
    header.queued.store(false, Ordering::Release);
    let done = fut
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_ready();
    // A finished future is dropped after the slab is let go of: its drop may start or
    // cancel operations and wake or spawn other tasks.
    let finished = TASKS.with(|t| {
        let mut t = t.borrow_mut();
        if done {
            t.tasks[slot] = None;
            t.free.push(slot);
            return Some(fut);
        }
        match t.tasks[slot].as_mut() {
            Some(task) => {
                task.fut = Some(fut);
                None
            }
            None => Some(fut),
        }
    });
    if done {
        header.worker.tasks.fetch_sub(1, Ordering::Relaxed);
    }
    drop(finished);
}

/// The worker's loop. Never returns.
fn run(shared: &'static Shared) {
    CURRENT.with(|c| c.set(Some(shared)));
    // The eventfd read that wakes a sleeping worker (its 8 bytes live as long as the thread:
    // this function never returns).
    let wake_buf: &'static mut u64 = Box::leak(Box::new(0u64));
    let arm = |buf: *mut u64| {
        let read = opcode::Read::new(types::Fd(shared.efd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(ring::WAKE);
        // Safety: the 8 bytes are leaked (live forever) and the eventfd lives as long as the
        // process.
        ring::with(|r| unsafe { r.push(&read) });
    };
    let wake_ptr: *mut u64 = wake_buf;
    arm(wake_ptr);
    let mut wakers: Vec<Waker> = Vec::new();
    let batch = wait_batch();
    loop {
        if shared.signalled.load(Ordering::Acquire) {
            shared.signalled.store(false, Ordering::SeqCst);
            let inbox =
                std::mem::take(&mut *shared.inbox.lock().unwrap_or_else(|e| e.into_inner()));
            for task in inbox.spawn {
                spawn_local(task);
            }
            RUN.with(|q| q.borrow_mut().extend(inbox.wake));
        }
        let mut polled = 0;
        while polled < TURN_BUDGET {
            let Some(h) = RUN.with(|q| q.borrow_mut().pop_front()) else {
                break;
            };
            poll_task(h);
            polled += 1;
        }
        let now = Instant::now();
        let next_timer = fire_timers(now);
        let busy = RUN.with(|q| !q.borrow().is_empty()) || shared.signalled.load(Ordering::Acquire);
        let (want, timeout, min_wait) = match busy {
            // More to run: submit this turn's operations and take what has completed.
            true => (0, None, None),
            false => (
                batch.0,
                next_timer.map(|at| at.saturating_duration_since(now)),
                batch.1,
            ),
        };
        let entered = ring::with(|r| r.enter(want, timeout, min_wait));
        shared.enters.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = entered {
            tracing::error!("io_uring_enter: {e}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (count, woke) = ring::with(|r| r.reap(&mut wakers));
        shared
            .completions
            .fetch_add(count as u64, Ordering::Relaxed);
        if woke {
            arm(wake_ptr);
        }
        for w in wakers.drain(..) {
            w.wake();
        }
    }
}

/// How a worker waits (experiment knobs): for this many completions, but returning after the
/// minimum wait once one is there.
fn wait_batch() -> (u32, Option<Duration>) {
    let n = std::env::var("RINGFWD_URING_WAIT_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let min = std::env::var("RINGFWD_URING_MIN_WAIT_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_micros);
    (n, min)
}

/// Wake every timer due at `now`; when the next one is due.
fn fire_timers(now: Instant) -> Option<Instant> {
    let mut due = Vec::new();
    let next = TIMERS.with(|t| {
        let mut t = t.borrow_mut();
        while t.0.peek().is_some_and(|top| top.at <= now) {
            due.push(t.0.pop().expect("peeked").waker);
        }
        t.0.peek().map(|top| top.at)
    });
    for w in due {
        w.wake();
    }
    next
}

/// Sleep until `at`: on a worker with the worker's timers, elsewhere with tokio's.
pub fn sleep_until(at: Instant) -> Sleep {
    match CURRENT.with(|c| c.get()) {
        Some(_) => Sleep::Worker { at, armed: false },
        None => Sleep::Tokio(Box::pin(tokio::time::sleep_until(at.into()))),
    }
}

/// See [`sleep_until`].
pub enum Sleep {
    Worker { at: Instant, armed: bool },
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut *self {
            Sleep::Tokio(s) => s.as_mut().poll(cx),
            Sleep::Worker { at, armed } => {
                if Instant::now() >= *at {
                    return Poll::Ready(());
                }
                if !*armed {
                    // Registered once: the task's waker does not change (a stale entry after
                    // an early drop is one spurious wake-up).
                    *armed = true;
                    let at = *at;
                    TIMERS.with(|t| {
                        let mut t = t.borrow_mut();
                        t.1 += 1;
                        let seq = t.1;
                        t.0.push(Timer {
                            at,
                            seq,
                            waker: cx.waker().clone(),
                        });
                    });
                }
                Poll::Pending
            }
        }
    }
}

/// `fut`, or `None` after `d`.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Option<F::Output> {
    let sleep = sleep_until(Instant::now() + d);
    tokio::pin!(fut, sleep);
    tokio::select! {
        biased;
        out = &mut fut => Some(out),
        () = &mut sleep => None,
    }
}
