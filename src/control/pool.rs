//! The session pool of one forward: which upstream session a new connection rides on.
//!
//! The servers we talk to do no flow control (kubelet, containerd and the API server all use
//! moby/spdystream, which never sends WINDOW_UPDATE). The only brake on one connection whose
//! local client stops reading is to stop reading its whole session, which freezes every other
//! connection on it. So, as an HTTP/1.1 client pool does for a protocol without per-request
//! flow control, a connection checks a session out for itself while its client is sending, and
//! sessions are set up ahead so that a new connection does not wait for one:
//!
//! - a new connection takes an **idle** session (no connection checked out on it, reader not
//!   stalled, below its stream limit), the one given back last: its tasks (and the server's)
//!   are the warmest (through containerd this measured a new connection's first byte at
//!   0.96 ms p50, against 1.03 ms when picking the one with the fewest lingering connections;
//!   perf/2026-12-01-isolation.md);
//! - with none idle and fewer than `max_sessions` sessions, it gets a **new** one;
//! - at the bound it **shares** the least-used session that is not stalled (and, if all are,
//!   the least-used one): it can then be slowed by a neighbour, as every connection is with
//!   kubectl; only when every session is at its stream limit is it refused (reset, with an
//!   error naming `--max-sessions`), rather than left waiting;
//! - a connection gives its session back once its local client has finished sending (the
//!   relay drops the [`Lease`]); what the server still sends drains on the same session;
//! - after each checkout the pool sets sessions up in the background until `warm_sessions`
//!   are idle again; idle sessions beyond twice that are closed once they have been idle for
//!   [`IDLE_EXPIRY`] (so a burst does not set up and tear down sessions over and over);
//! - a session that dies, or is retired, leaves the pool at once;
//! - a closed pool (its pod is gone, [`Pool::close`]) retires its sessions, takes no
//!   connection and retires any session still being set up as soon as it is ready.
//!
//! The choice itself is [`pick`], a pure function over what the pool knows of each session.
//! This module owns the pool's bookkeeping only: setting a session up is the forwarder's
//! (through the `SessionFactory` it hands in), relaying is [`crate::relay`]'s.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::ControlError;
use crate::proto::ConnId;
use crate::relay::{Inbound, Session};

/// Default for [`PoolOptions::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 32;
/// Default for [`PoolOptions::warm_sessions`].
pub const DEFAULT_WARM_SESSIONS: usize = 2;

/// Idle sessions beyond the reserve are closed after this long unused.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(10);

/// Default for [`PoolOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default for [`PoolOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of one forward: its sessions, and the connections riding on them.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Most local connections open at once; one more is accepted and reset at once (the
    /// forwarder enforces it, WebSocket v4 included).
    pub max_connections: usize,
    /// Most upstream sessions at once. At the bound connections share sessions.
    pub max_sessions: usize,
    /// Idle sessions kept ready for new connections (0: set one up per connection on demand).
    pub warm_sessions: usize,
    /// Longest a connection waits for a session (setting one up included, backoff after
    /// failures included); then it is reset. Also bounds the first session at start.
    pub connect_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            warm_sessions: DEFAULT_WARM_SESSIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl PoolOptions {
    /// Idle sessions kept when connections give theirs back.
    fn max_idle(&self) -> usize {
        (2 * self.warm_sessions).max(1)
    }
}

/// What the pool knows of one session when it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Connections that have it checked out (their clients still sending).
    pub users: usize,
    /// More connections it can open (its stream limit).
    pub capacity: usize,
    /// Its reader waits for a slow local client.
    pub stalled: bool,
    /// Connections still open on it, draining ones included.
    pub conns: usize,
    /// How long it has been idle (zero while in use).
    pub idle_for: Duration,
}

/// Where a new connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// An idle session, to itself.
    Idle(usize),
    /// A new session.
    Create,
    /// At the bound: an existing session, shared.
    Share(usize),
    /// Every session is at its stream limit and a session being set up will take it: wait.
    Wait,
    /// Every session is at its stream limit and no more may be set up: refuse the connection.
    Full,
}

/// The pool's choice for a new connection; see the module docs for the order.
pub fn pick(slots: &[SlotView], creating: usize, max_sessions: usize) -> Pick {
    let idle = slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.users == 0 && !s.stalled && s.capacity > 0)
        .min_by_key(|(_, s)| s.idle_for);
    if let Some((i, _)) = idle {
        return Pick::Idle(i);
    }
    if slots.len() + creating < max_sessions.max(1) {
        return Pick::Create;
    }
    let least_used = |stalled_ok: bool| {
        slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.capacity > 0 && (stalled_ok || !s.stalled))
            .min_by_key(|(_, s)| (s.users, s.conns))
            .map(|(i, _)| i)
    };
    match least_used(false).or_else(|| least_used(true)) {
        Some(i) => Pick::Share(i),
        None if creating > 0 => Pick::Wait,
        None => Pick::Full,
    }
}

/// Sets up one new session.
pub type SessionFactory =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Session, ControlError>> + Send + Sync>;

struct Slot {
    session: Session,
    users: usize,
    /// When the last user gave it back.
    idle_since: Instant,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    /// Sessions being set up (for checkouts and for the warm reserve).
    creating: usize,
    /// Setups that failed in a row, and when the next may start ([`super::reconnect`]).
    failures: u32,
    retry_at: Option<Instant>,
}

/// Counts a setup in [`State::creating`] for as long as it runs, also when the waiting
/// connection gives up (its future is dropped mid-setup).
struct Creating<'a>(&'a Inner);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.lock().creating -= 1;
    }
}

struct Inner {
    opts: PoolOptions,
    make: SessionFactory,
    state: Mutex<State>,
    /// A session was added, given back or lost: checkouts waiting at [`Pick::Wait`] retry.
    changed: Notify,
    /// Set by [`Pool::close`]; why, for the checkouts it refuses.
    closed: Mutex<Option<String>>,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// One connection's hold on its session. Dropping it gives the session back to the pool.
pub struct Lease {
    pool: Arc<Inner>,
    session: Session,
}

impl Lease {
    pub fn session(&self) -> &Session {
        &self.session
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        let Some(i) = st.slots.iter().position(|s| s.session.same(&self.session)) else {
            return;
        };
        st.slots[i].users -= 1;
        if st.slots[i].users == 0 {
            st.slots[i].idle_since = Instant::now();
        }
        drop(st);
        self.pool.changed.notify_waiters();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set up one session (already counted in `creating`), after the backoff that earlier
    /// failures ask for. Failures and successes move the backoff.
    async fn make(&self) -> Result<Session, ControlError> {
        let _creating = Creating(self);
        let retry_at = self.lock().retry_at;
        if let Some(at) = retry_at {
            tokio::time::sleep_until(at.into()).await;
        }
        let made = (self.make)().await;
        let mut st = self.lock();
        match &made {
            Ok(_) => {
                if st.failures > 0 {
                    tracing::info!(
                        "upstream session set up again after {} failures",
                        st.failures
                    );
                }
                st.failures = 0;
                st.retry_at = None;
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let wait = super::reconnect::delay(st.failures, super::reconnect::draw());
                st.retry_at = Some(Instant::now() + wait);
                tracing::debug!(
                    "session setup failed ({} in a row), next try in {wait:?}: {e}",
                    st.failures
                );
            }
        }
        made
    }

    /// Close idle sessions beyond the reserve that have not been used for [`IDLE_EXPIRY`]; the
    /// reserve keeps those with the fewest lingering connections.
    fn expire_idle(&self, now: Instant) {
        let mut st = self.lock();
        let mut idle: Vec<usize> = (0..st.slots.len())
            .filter(|&i| st.slots[i].users == 0)
            .collect();
        idle.sort_by_key(|&i| st.slots[i].session.active_conns());
        let mut expired: Vec<usize> = idle
            .into_iter()
            .skip(self.opts.max_idle())
            .filter(|&i| now.duration_since(st.slots[i].idle_since) >= IDLE_EXPIRY)
            .collect();
        expired.sort_unstable_by(|a, b| b.cmp(a));
        for i in expired {
            // Ends once its draining connections are done.
            st.slots.remove(i).session.retire();
        }
    }
}

impl Pool {
    pub fn new(opts: PoolOptions, make: SessionFactory) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                opts,
                make,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                closed: Mutex::new(None),
            }),
        }
    }

    pub fn options(&self) -> PoolOptions {
        self.inner.opts
    }

    /// Set up the first session now (so a wrong target fails at start, with its error) and
    /// the rest of the warm reserve in the background.
    pub async fn start(&self) -> Result<(), ControlError> {
        self.inner.lock().creating += 1;
        let timeout = self.inner.opts.connect_timeout;
        let s = tokio::time::timeout(timeout, self.inner.make())
            .await
            .map_err(|_| ControlError::SetupTimeout(timeout))??;
        self.add(s, 0);
        self.warm_up();
        Ok(())
    }

    /// Set the warm reserve up in the background, and expire idle sessions from now on (what
    /// [`start`](Self::start) does after its first session, for a pool that must not wait).
    pub fn warm_up(&self) {
        self.refill();
        let pool: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_EXPIRY / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(p) => p.expire_idle(Instant::now()),
                    None => return,
                }
            }
        });
    }

    /// Close the pool for good (`why`: one line, for the connections it refuses from now on):
    /// its sessions are retired (they end once their connections are done; resetting those is
    /// the caller's), and a session still being set up is retired when it is ready.
    pub fn close(&self, why: &str) {
        *self.inner.closed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        let slots = std::mem::take(&mut self.inner.lock().slots);
        for s in slots {
            s.session.retire();
        }
        self.inner.changed.notify_waiters();
    }

    fn closed(&self) -> Option<String> {
        self.inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sessions in the pool (alive and taking connections).
    pub fn sessions(&self) -> Vec<Session> {
        self.prune();
        self.inner
            .lock()
            .slots
            .iter()
            .map(|s| s.session.clone())
            .collect()
    }

    /// Open a connection to `port` on a session picked for it; see the module docs.
    pub async fn checkout(
        &self,
        port: u16,
    ) -> Result<(Lease, ConnId, crate::relay::queue::Receiver<Inbound>), ControlError> {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(why) = self.closed() {
                return Err(ControlError::Target(why));
            }
            self.prune();
            let choice = {
                let mut st = self.inner.lock();
                let now = Instant::now();
                let views: Vec<SlotView> = st
                    .slots
                    .iter()
                    .map(|s| SlotView {
                        users: s.users,
                        capacity: s.session.conn_capacity(),
                        stalled: s.session.is_stalled(),
                        conns: s.session.active_conns(),
                        idle_for: now.saturating_duration_since(s.idle_since),
                    })
                    .collect();
                let choice = pick(&views, st.creating, self.inner.opts.max_sessions);
                match choice {
                    Pick::Idle(i) | Pick::Share(i) => match st.slots[i].session.open(port) {
                        Ok((conn, inbound)) => {
                            st.slots[i].users += 1;
                            let lease = Lease {
                                pool: self.inner.clone(),
                                session: st.slots[i].session.clone(),
                            };
                            drop(st);
                            self.refill();
                            return Ok((lease, conn, inbound));
                        }
                        Err(e) => {
                            // Lost between the look and the open: it leaves the pool.
                            tracing::debug!("session refused a new connection: {e}");
                            st.slots.remove(i).session.retire();
                            continue;
                        }
                    },
                    Pick::Create => st.creating += 1,
                    Pick::Full => {
                        return Err(ControlError::StreamLimit {
                            sessions: st.slots.len(),
                        });
                    }
                    Pick::Wait => {}
                }
                choice
            };
            match choice {
                Pick::Create => {
                    let session = self.inner.make().await?;
                    if let Some(why) = self.closed() {
                        session.retire();
                        return Err(ControlError::Target(why));
                    }
                    let (conn, inbound) = session.open(port)?;
                    self.add(session.clone(), 1);
                    let lease = Lease {
                        pool: self.inner.clone(),
                        session,
                    };
                    self.refill();
                    return Ok((lease, conn, inbound));
                }
                Pick::Wait => changed.await,
                Pick::Idle(_) | Pick::Share(_) | Pick::Full => unreachable!("handled above"),
            }
        }
    }

    fn add(&self, session: Session, users: usize) {
        if self.closed().is_some() {
            // Its pod went while it was set up: its connection (if any) is reset by the caller.
            session.retire();
            return;
        }
        self.inner.lock().slots.push(Slot {
            session: session.clone(),
            users,
            idle_since: Instant::now(),
        });
        // Leave the pool when it dies, so that the reserve is made good at once.
        let pool = Arc::downgrade(&self.inner);
        let mut dead = session.watch_dead();
        tokio::spawn(async move {
            let _ = dead.wait_for(|d| d.is_some()).await;
            if let Some(inner) = pool.upgrade() {
                let pool = Pool { inner };
                pool.prune();
                pool.refill();
                pool.inner.changed.notify_waiters();
            }
        });
        self.inner.changed.notify_waiters();
    }

    /// Drop sessions that died or were retired (their connections go on without the pool).
    fn prune(&self) {
        self.inner.lock().slots.retain(|s| s.session.is_usable());
    }

    /// Start setting up sessions until `warm_sessions` are idle or being set up.
    fn refill(&self) {
        if self.closed().is_some() {
            return;
        }
        let opts = self.inner.opts;
        let mut st = self.inner.lock();
        let idle = st
            .slots
            .iter()
            .filter(|s| s.users == 0 && s.session.is_usable() && !s.session.is_stalled())
            .count();
        let mut want = opts.warm_sessions.saturating_sub(idle + st.creating);
        while want > 0 && st.slots.len() + st.creating < opts.max_sessions {
            st.creating += 1;
            want -= 1;
            let pool = self.clone();
            tokio::spawn(async move {
                match pool.inner.make().await {
                    Ok(s) => pool.add(s, 0),
                    // The next connection tries again (and reports the error to its client).
                    Err(e) => {
                        tracing::debug!("setting up a spare session failed: {e}");
                        pool.inner.changed.notify_waiters();
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(users: usize, capacity: usize, stalled: bool, conns: usize) -> SlotView {
        SlotView {
            users,
            capacity,
            stalled,
            conns,
            idle_for: Duration::from_secs(1),
        }
    }

    #[test]
    fn an_idle_session_comes_first_the_one_given_back_last() {
        let mut slots = [
            slot(1, 9, false, 1),
            slot(0, 9, false, 5),
            slot(0, 9, false, 2),
        ];
        slots[1].idle_for = Duration::from_millis(1);
        assert_eq!(pick(&slots, 0, 8), Pick::Idle(1));
    }

    #[test]
    fn a_stalled_or_full_idle_session_is_skipped() {
        let slots = [slot(0, 9, true, 1), slot(0, 0, false, 2048)];
        assert_eq!(pick(&slots, 0, 8), Pick::Create);
    }

    #[test]
    fn busy_sessions_mean_a_new_one_below_the_bound() {
        let slots = [slot(1, 9, false, 1), slot(2, 9, false, 2)];
        assert_eq!(pick(&slots, 0, 3), Pick::Create);
        // Sessions already being set up count against the bound.
        assert_eq!(pick(&slots, 1, 3), Pick::Share(0));
    }

    #[test]
    fn at_the_bound_share_the_least_used_session_that_is_not_stalled() {
        let slots = [
            slot(1, 9, true, 1),
            slot(3, 9, false, 3),
            slot(2, 9, false, 9),
        ];
        assert_eq!(pick(&slots, 0, 3), Pick::Share(2));
        // All stalled: still never fail.
        let slots = [slot(2, 9, true, 2), slot(1, 9, true, 1)];
        assert_eq!(pick(&slots, 0, 2), Pick::Share(1));
    }

    #[test]
    fn a_session_at_its_stream_limit_takes_no_connection() {
        let slots = [slot(0, 0, false, 2048), slot(5, 1, false, 5)];
        assert_eq!(pick(&slots, 0, 2), Pick::Share(1));
        let slots = [slot(0, 0, false, 2048), slot(5, 0, false, 2048)];
        assert_eq!(pick(&slots, 0, 2), Pick::Full);
        assert_eq!(pick(&slots, 0, 3), Pick::Create);
        // One being set up (past the bound only when the bound was lowered) takes it.
        assert_eq!(pick(&slots, 1, 2), Pick::Wait);
    }

    #[test]
    fn no_sessions_yet() {
        assert_eq!(pick(&[], 0, 1), Pick::Create);
        assert_eq!(pick(&[], 1, 1), Pick::Wait);
        // A bound of zero is taken as one.
        assert_eq!(pick(&[], 0, 0), Pick::Create);
    }
}
