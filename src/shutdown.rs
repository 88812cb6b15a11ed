//! Graceful shutdown of the long-running commands (the forwards, `up`, `serve`) on SIGINT or
//! SIGTERM.
//!
//! The caller stops accepting first (it closes its listeners), then hands over to [`drain`]:
//! open connections get `--grace` to finish by themselves; whatever is left is cut (reset
//! locally and upstream, never a clean end of file, see [`crate::relay::Drain`]); every session
//! is closed with a GOAWAY; and the result says whether anything had to be cut. A second
//! signal cuts at once. This module owns the signals and the timing; counting and cutting
//! connections is the relay's.

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::relay::Drain;

/// How long cut connections and closing sessions get to put their resets and goodbyes on the
/// wire before the process exits anyway.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// Default `--grace`.
pub const DEFAULT_GRACE: &str = "10s";

/// SIGINT and SIGTERM, caught from creation on (the default action, exiting at once, no
/// longer applies). Create it before printing that the command is ready.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub fn new() -> Result<Signals, String> {
        let catch = |kind: SignalKind| {
            signal(kind).map_err(|e| format!("cannot handle signal {}: {e}", kind.as_raw_value()))
        };
        Ok(Signals {
            int: catch(SignalKind::interrupt())?,
            term: catch(SignalKind::terminate())?,
        })
    }

    /// The next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// How a shutdown ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every connection finished by itself within the grace period.
    Clean,
    /// The grace period ran out; this many connections were reset.
    Cut(usize),
    /// A second signal; this many connections were reset.
    Interrupted(usize),
}

impl Ended {
    /// `Ok` for a clean end, else the one line to exit with.
    pub fn into_result(self, grace: Duration) -> Result<(), String> {
        match self {
            Ended::Clean => Ok(()),
            Ended::Cut(n) => Err(format!(
                "{n} {} still open after the {grace:?} grace period, reset",
                connections(n)
            )),
            Ended::Interrupted(n) => Err(format!(
                "interrupted again: stopped at once, {n} {} reset",
                connections(n)
            )),
        }
    }
}

fn connections(n: usize) -> &'static str {
    if n == 1 { "connection" } else { "connections" }
}

/// After the first signal, with the listeners closed: wait up to `grace` for the open
/// connections (or a second signal), cut the rest, close every session with a GOAWAY.
pub async fn drain(drain: &Drain, grace: Duration, signals: &mut Signals) -> Ended {
    drain.begin();
    let open = drain.open();
    tracing::info!(
        "shutting down: {open} {} open, waiting up to {grace:?}; press Ctrl-C again to stop now",
        connections(open)
    );
    let interrupted = tokio::select! {
        _ = tokio::time::timeout(grace, drain.idle()) => false,
        () = signals.recv() => true,
    };
    let left = drain.open();
    drain.cut_all();
    // The cut connections send their resets and release their sessions; then every session
    // says goodbye. Both are quick; the bound is for a peer that stopped reading.
    let _ = tokio::time::timeout(CUT_WAIT, async {
        drain.idle().await;
        drain.close_sessions().await;
    })
    .await;
    match (interrupted, left) {
        (true, n) => Ended::Interrupted(n),
        (false, 0) => Ended::Clean,
        (false, n) => Ended::Cut(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_line_counts_what_was_reset() {
        let grace = Duration::from_secs(10);
        assert_eq!(Ended::Clean.into_result(grace), Ok(()));
        assert_eq!(
            Ended::Cut(1).into_result(grace),
            Err("1 connection still open after the 10s grace period, reset".into())
        );
        assert_eq!(
            Ended::Interrupted(3).into_result(grace),
            Err("interrupted again: stopped at once, 3 connections reset".into())
        );
    }
}
