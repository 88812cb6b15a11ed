//! Following a forward's pod when it goes away: which pod (or runtime sandbox) the forward goes
//! to now, noticing that it is gone, and finding its replacement.
//!
//! Owns the forward's [`TargetCell`]: the pod or sandbox the forwarder sets sessions up to, and
//! whether it is waiting for one. A follower task writes it, the forwarder reads it: new
//! sessions wait while it says [`TargetState::Waiting`], and on that transition the forwarder
//! resets every open connection and retires its sessions ([`super::forward`]). Each change is
//! one log line and one count of `ringfwd_target_changes_total`.
//!
//! - Runtime targets ([`follow_sandbox`]): the CRI has no watch in containerd 1.6 (its
//!   `GetContainerEvents` stream came with CRI v1.26 and containerd 1.7, and says nothing of
//!   sandboxes being removed), so the current sandbox's state is asked every
//!   [`SANDBOX_CHECK`] and at once when a connection or a session setup failed; while waiting,
//!   the ready sandboxes are listed again with a backoff capped at [`RELIST_MAX`]. A ready
//!   sandbox with the same pod name and namespace (the newest) replaces the old one.
//! - Cluster targets are watched, not polled: see `Cluster::follow` ([`super::cluster`]); the
//!   choice of the new pod is [`pick_replacement`] there.
//!
//! Must not touch sessions or connections itself: that is the forwarder's.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::cri::{CriClient, CriError, PodSandbox, SandboxState};
use super::reconnect;
use crate::metrics::{ForwardMetrics, TargetChange};

/// How often a runtime target's sandbox is checked while it is ready.
pub const SANDBOX_CHECK: Duration = Duration::from_secs(1);
/// Longest pause between two listings while waiting for a new sandbox.
pub const RELIST_MAX: Duration = Duration::from_secs(1);

/// The pod (a pod name, or a sandbox id for a runtime target) a forward goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetState {
    /// Sessions are set up to `pod`; `generation` counts the switches so far.
    Ready { pod: String, generation: u64 },
    /// `was` is gone: new connections wait (up to `--connect-timeout`) for a replacement.
    Waiting { was: String, generation: u64 },
}

impl TargetState {
    /// The pod now, or the one that went away.
    pub fn pod(&self) -> &str {
        match self {
            TargetState::Ready { pod, .. } => pod,
            TargetState::Waiting { was, .. } => was,
        }
    }
}

/// A forward's current target, shared by the forwarder and its follower. Cheap to clone.
#[derive(Clone)]
pub struct TargetCell {
    state: Arc<watch::Sender<TargetState>>,
    /// Something failed that may mean the target is gone: check now.
    suspect: Arc<Notify>,
    metrics: ForwardMetrics,
}

impl TargetCell {
    pub fn new(pod: &str, metrics: ForwardMetrics) -> TargetCell {
        let (tx, _) = watch::channel(TargetState::Ready {
            pod: pod.to_owned(),
            generation: 0,
        });
        TargetCell {
            state: Arc::new(tx),
            suspect: Arc::new(Notify::new()),
            metrics,
        }
    }

    pub fn current(&self) -> TargetState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<TargetState> {
        self.state.subscribe()
    }

    /// The pod to set a session up to, and its generation; waits while there is none.
    pub async fn ready(&self) -> (String, u64) {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, TargetState::Ready { .. }))
            .await
            .expect("the cell holds its sender");
        match &*state {
            TargetState::Ready { pod, generation } => (pod.clone(), *generation),
            TargetState::Waiting { .. } => unreachable!("waited for Ready"),
        }
    }

    /// Whether `generation` is still the one sessions should go to.
    pub fn is_current(&self, generation: u64) -> bool {
        matches!(&*self.state.borrow(), TargetState::Ready { generation: g, .. } if *g == generation)
    }

    /// A connection or setup failed in a way a vanished pod would explain: have it checked.
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// The target is gone (`why` says how, as one line); new connections wait from now on.
    pub fn lost(&self, change: TargetChange, why: &str) {
        let changed = self.state.send_if_modified(|s| match s {
            TargetState::Ready { pod, generation } => {
                *s = TargetState::Waiting {
                    was: std::mem::take(pod),
                    generation: *generation,
                };
                true
            }
            TargetState::Waiting { .. } => false,
        });
        if changed {
            tracing::warn!(forward = self.metrics.name(), "{why}");
            self.metrics.target_change(change);
        }
    }

    /// Sessions go to `pod` from now on; `what` names it for the log (`pod web-8f2`).
    pub fn replaced(&self, pod: &str, what: &str) {
        let mut was = String::new();
        self.state.send_modify(|s| {
            let generation = match s {
                TargetState::Ready { generation, .. } | TargetState::Waiting { generation, .. } => {
                    *generation
                }
            };
            was = s.pod().to_owned();
            *s = TargetState::Ready {
                pod: pod.to_owned(),
                generation: generation + 1,
            };
        });
        tracing::info!(
            forward = self.metrics.name(),
            "now forwarding to {what} (was {})",
            short(&was)
        );
        self.metrics.target_change(TargetChange::Replaced);
    }
}

/// A runtime sandbox id as people show it (12 characters); pod names pass unchanged.
pub fn short(id: &str) -> &str {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        &id[..12]
    } else {
        id
    }
}

/// The sandbox that replaces `old`: ready, same pod name and namespace, not `old`; the newest
/// if several are.
pub fn pick_sandbox<'a>(
    ready: &'a [PodSandbox],
    name: &str,
    namespace: &str,
    old: &str,
) -> Option<&'a PodSandbox> {
    ready
        .iter()
        .filter(|s| s.id != old)
        .filter(|s| {
            s.metadata
                .as_ref()
                .is_some_and(|m| m.name == name && m.namespace == namespace)
        })
        .max_by_key(|s| s.created_at)
}

/// Follow a runtime target: see the module docs. Runs until the forward is dropped (the task
/// is aborted) — it never gives up on its own: connections are bounded by `--connect-timeout`.
pub async fn follow_sandbox(mut cri: CriClient, cell: TargetCell, name: String, namespace: String) {
    let pod = format!("{namespace}/{name}");
    loop {
        let (id, _) = cell.ready().await;
        let lost = loop {
            tokio::select! {
                _ = tokio::time::sleep(SANDBOX_CHECK) => {}
                _ = cell.suspect.notified() => {}
            }
            match cri.pod_sandbox_state(&id).await {
                Ok(SandboxState::Ready) => {}
                Ok(SandboxState::NotReady) => break (TargetChange::NotReady, "is not ready"),
                Err(CriError::NotFound { .. }) => break (TargetChange::Gone, "is gone"),
                // The runtime itself is unreachable: sessions fail (and back off) on their
                // own; that says nothing about the sandbox.
                Err(e) => tracing::debug!("checking sandbox {}: {e}", short(&id)),
            }
        };
        cell.lost(
            lost.0,
            &format!(
                "sandbox {} of pod {pod} {}; waiting for a ready sandbox of pod {pod}",
                short(&id),
                lost.1
            ),
        );
        let mut tries = 0u32;
        loop {
            match cri.ready_pod_sandboxes().await {
                Ok(list) => {
                    if let Some(sb) = pick_sandbox(&list, &name, &namespace, &id) {
                        cell.replaced(&sb.id, &format!("sandbox {} of pod {pod}", short(&sb.id)));
                        break;
                    }
                }
                Err(e) => tracing::debug!("listing sandboxes: {e}"),
            }
            tries = tries.saturating_add(1);
            let wait = reconnect::delay(tries, reconnect::draw()).min(RELIST_MAX);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::cri::PodSandboxMetadata;

    fn sb(id: &str, name: &str, ns: &str, created_at: i64) -> PodSandbox {
        PodSandbox {
            id: id.into(),
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                namespace: ns.into(),
                ..Default::default()
            }),
            created_at,
            ..Default::default()
        }
    }

    #[test]
    fn the_newest_ready_sandbox_of_the_same_pod_replaces_the_old_one() {
        let list = [
            sb("old", "web", "shop", 1),
            sb("other-ns", "web", "dev", 9),
            sb("other-pod", "db", "shop", 9),
            sb("new", "web", "shop", 5),
            sb("newer", "web", "shop", 7),
        ];
        let pick = |old| pick_sandbox(&list, "web", "shop", old).map(|s| s.id.as_str());
        assert_eq!(pick("old"), Some("newer"));
        assert_eq!(pick("newer"), Some("new"));
        assert_eq!(pick_sandbox(&list[..3], "web", "shop", "old"), None);
        assert_eq!(pick_sandbox(&[], "web", "shop", "old"), None);
    }

    #[tokio::test]
    async fn lost_then_replaced() {
        let cell = TargetCell::new("a", ForwardMetrics::detached());
        assert_eq!(cell.ready().await, ("a".into(), 0));
        assert!(cell.is_current(0));
        cell.lost(TargetChange::Gone, "a is gone");
        // Said once: a second loss of the same pod changes nothing.
        cell.lost(TargetChange::NotReady, "a is gone");
        assert_eq!(
            cell.current(),
            TargetState::Waiting {
                was: "a".into(),
                generation: 0
            }
        );
        assert!(!cell.is_current(0));
        let waiter = tokio::spawn({
            let cell = cell.clone();
            async move { cell.ready().await }
        });
        cell.replaced("b", "pod b");
        assert_eq!(waiter.await.unwrap(), ("b".into(), 1));
        assert!(cell.is_current(1) && !cell.is_current(0));
    }

    #[test]
    fn sandbox_ids_are_shown_short() {
        let id = "a".repeat(64);
        assert_eq!(short(&id), "aaaaaaaaaaaa");
        assert_eq!(short("web-7d9"), "web-7d9");
    }
}
