//! Per-connection statistics: the one struct a data plane bumps.
//!
//! A relay (the tokio one today, an io_uring one later) gets a [`Stream`] for each connection
//! and, per chunk, only adds to the plain atomics of its [`StreamStats`]. No label lookup, no
//! shared counter: the owning forward folds these numbers into the exported counters and
//! histograms at scrape time, once a second while a live view or the endpoint is on, and when
//! the stream ends ([`Stream::finish`]).

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::Outcome;
use super::forward::{ForwardInner, PodInner, PodMetrics};

/// Byte counts and timings of one relayed connection. Directions are the relay's own: `up` is
/// what it read from its local socket and sent into the session, `down` what it wrote to the
/// local socket.
#[derive(Debug)]
pub struct StreamStats {
    pub(super) id: u64,
    pub(super) port: u16,
    pub(super) peer: Option<SocketAddr>,
    pub(super) started: Instant,
    up: AtomicU64,
    down: AtomicU64,
    /// Nanoseconds from `started` to the first byte written to the local socket, plus one
    /// (0: none yet).
    first_byte_ns: AtomicU64,
    /// What has been added to the exported counters so far.
    pub(super) folded: [AtomicU64; 2],
    pub(super) first_byte_reported: AtomicBool,
    /// Last sample (time, up, down) and the rates derived from it, for `/streams`.
    pub(super) sample: Mutex<(Instant, u64, u64)>,
    pub(super) rate: [AtomicU64; 2],
    /// The pod a `--spread` forward sent it to, once picked.
    pub(super) pod: OnceLock<Arc<PodInner>>,
}

impl StreamStats {
    pub(super) fn new(id: u64, port: u16, peer: Option<SocketAddr>) -> Self {
        let now = Instant::now();
        StreamStats {
            id,
            port,
            peer,
            started: now,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            first_byte_ns: AtomicU64::new(0),
            folded: [AtomicU64::new(0), AtomicU64::new(0)],
            first_byte_reported: AtomicBool::new(false),
            sample: Mutex::new((now, 0, 0)),
            rate: [AtomicU64::new(0), AtomicU64::new(0)],
            pod: OnceLock::new(),
        }
    }

    /// `n` bytes read from the local socket and handed to the session.
    #[inline]
    pub fn add_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Relaxed);
    }

    /// `n` bytes written to the local socket. The first call with `n > 0` marks the first byte.
    #[inline]
    pub fn add_down(&self, n: usize) {
        if self.down.fetch_add(n as u64, Relaxed) == 0 && n > 0 {
            let ns = self.started.elapsed().as_nanos() as u64;
            self.first_byte_ns.store(ns + 1, Relaxed);
        }
    }

    pub fn up(&self) -> u64 {
        self.up.load(Relaxed)
    }

    pub fn down(&self) -> u64 {
        self.down.load(Relaxed)
    }

    /// Time from accept to the first byte towards the local socket, once there was one.
    pub fn first_byte(&self) -> Option<Duration> {
        match self.first_byte_ns.load(Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns - 1)),
        }
    }

    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
}

/// One open connection of a forward. Hand it to the relay; the relay calls [`finish`] with
/// the outcome. A stream dropped unfinished never reached a relay (no upstream session could
/// be had, or its task was cancelled) and counts as `session_lost`.
///
/// [`finish`]: Stream::finish
pub struct Stream {
    stats: Arc<StreamStats>,
    fwd: Arc<ForwardInner>,
    finished: bool,
}

impl Stream {
    pub(super) fn new(stats: Arc<StreamStats>, fwd: Arc<ForwardInner>) -> Self {
        Stream {
            stats,
            fwd,
            finished: false,
        }
    }

    /// A stream that belongs to no forward (library users and tests that relay directly).
    pub fn detached(port: u16) -> Self {
        super::ForwardMetrics::detached().accept(None, port)
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// The connection goes to `pod` (a `--spread` forward picked it): counted there from now
    /// on, and shown with it. Once per stream; a second call changes nothing.
    pub fn set_pod(&self, pod: &PodMetrics) {
        if self.stats.pod.get().is_none() {
            let _ = self.stats.pod.set(pod.attach());
        }
    }

    /// The connection ended: fold its numbers in, count the outcome, log it (`-v`).
    pub fn finish(mut self, outcome: Outcome, detail: &dyn Display) {
        self.finished = true;
        self.fwd.end(&self.stats, outcome, detail);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.finished {
            self.fwd
                .end(&self.stats, Outcome::SessionLost, &"no upstream session");
        }
    }
}
