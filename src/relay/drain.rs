//! Graceful shutdown as the data plane sees it: how many connections are being relayed, the
//! signal that cuts the ones still open, and the sessions to say goodbye on.
//!
//! One [`Drain`] per process, handed to every session through
//! [`SessionOptions::drain`](super::SessionOptions::drain). A relayed connection holds an
//! [`Open`] for its lifetime and selects on [`Drain::cut`]; a cut ends it through the same path
//! as any other failure (RST_STREAM upstream, TCP reset to the local socket), never with a
//! clean end of file. Sessions register themselves so that, once their connections are gone,
//! they can be closed with a GOAWAY. When to drain, for how long, and what to tell the user is
//! the caller's (see `crate::shutdown`); this module holds no timers and reads no signals.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::session::{Session, WeakSession};

/// The process's connections and sessions, and the switch that cuts them. Cheap to clone.
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Connections being relayed (or waiting for a session) now.
    open: watch::Sender<usize>,
    /// Set once: stop taking new connections (the grace period has begun).
    draining: watch::Sender<bool>,
    /// Set once: reset every connection still open.
    cut: watch::Sender<bool>,
    /// Every session started with this drain (dead ones are swept on the next register).
    sessions: Mutex<Vec<WeakSession>>,
}

/// One open connection, counted until dropped.
pub struct Open(Drain);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.inner.open.send_modify(|n| *n -= 1);
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("open", &self.open())
            .field("draining", &self.is_draining())
            .field("cut", &*self.inner.cut.borrow())
            .finish()
    }
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count a connection as open until the returned guard is dropped.
    pub fn track(&self) -> Open {
        self.inner.open.send_modify(|n| *n += 1);
        Open(self.clone())
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.inner.open.borrow()
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        let mut rx = self.inner.open.subscribe();
        // The sender lives in `self`: this cannot fail while we wait.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// The grace period begins: new connections should be refused.
    pub fn begin(&self) {
        self.inner.draining.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.draining.borrow()
    }

    /// Reset every connection still open (see [`Drain::cut`]). Also begins draining.
    pub fn cut_all(&self) {
        self.begin();
        self.inner.cut.send_replace(true);
    }

    /// Resolves when [`Drain::cut_all`] is called (at once if it was).
    pub fn cut(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.cut.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    pub(super) fn register(&self, s: WeakSession) {
        let mut sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        sessions.retain(WeakSession::alive);
        sessions.push(s);
    }

    /// Close every live session: each says goodbye (GOAWAY, WebSocket close) once its last
    /// connection is released (at once if it has none). Resolves when every goodbye has been
    /// written out (or its session died otherwise).
    pub async fn close_sessions(&self) {
        let live: Vec<Session> = {
            let sessions = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            sessions.iter().filter_map(WeakSession::upgrade).collect()
        };
        for s in &live {
            s.close();
        }
        for s in &live {
            s.written_out().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_open_connections_and_cuts_once() {
        let d = Drain::new();
        let a = d.track();
        let b = d.track();
        assert_eq!(d.open(), 2);
        let cut = d.cut();
        assert!(!d.is_draining());
        d.cut_all();
        cut.await;
        // A connection that starts watching after the cut sees it at once.
        d.cut().await;
        assert!(d.is_draining());
        drop(a);
        assert_eq!(d.open(), 1);
        let idle = d.idle();
        drop(b);
        idle.await;
        assert_eq!(d.open(), 0);
    }
}
