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
//! - Cluster targets are watched, not polled ([`follow_cluster`]); the choice of the new pod
//!   is [`pick_replacement`].
//! - A `--spread` forward follows all of its target's pods ([`follow_spread`]): it has no
//!   [`TargetCell`], it hands every change to its pod set ([`super::spread`]).
//!
//! Must not touch sessions or connections itself: that is the forwarder's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use tokio::sync::{Notify, watch};

use super::cluster::{Cluster, Follow, Spreading, activity, pod_ready};
use super::cri::{CriClient, CriError, PodSandbox, SandboxState};
use super::reconnect;
use super::spread::{PodView, Route, Spread};
use super::target::{Kind, Target};
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

/// Follow `follow`'s pods while the forward runs, writing the pod it should go to into
/// `cell`: the current pod lost (deleted, stopped running,
/// terminating) means waiting; a replacement (`pod/`: the same name Running again; a
/// workload: a Running, ready pod its selector matches, chosen as kubectl chooses) means
/// forwarding to it. Watched, not polled: every decision is made on a fresh list, and the
/// watch from that list's version says when to look again (this needs `list` and `watch`
/// on pods). Failed API calls are retried with the session backoff ([`reconnect`]);
/// the first of a streak is a warning. Runs until aborted.
pub async fn follow_cluster(cluster: Cluster, follow: Follow, cell: TargetCell) {
    let api = Api::<Pod>::namespaced(cluster.client.clone(), &cluster.namespace);
    let name_field = format!("metadata.name={}", follow.target.name);
    let (lp, wp) = match &follow.selector {
        Some(sel) => (
            ListParams::default().labels(sel),
            WatchParams::default().labels(sel),
        ),
        None => (
            ListParams::default().fields(&name_field),
            WatchParams::default().fields(&name_field),
        ),
    };
    // The server closes a watch after its timeout; the API caps it below 295 s.
    let wp = wp.timeout(290);
    let what = match follow.target.kind {
        Kind::Pod => format!("pod {} to be Running again", follow.target.name),
        _ => format!("a ready pod of {}", follow.target),
    };
    let mut failures = Failures::new(&cluster, &follow.target);
    loop {
        let state = cell.current();
        let pods = match api.list(&lp).await {
            Ok(pods) => pods,
            Err(e) => {
                failures.one_more("list", e).await;
                continue;
            }
        };
        match &state {
            TargetState::Ready { pod, .. } => {
                let current = pods
                    .items
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(pod.as_str()));
                let loss = match current {
                    None => Some((TargetChange::Gone, "is gone".to_string())),
                    Some(p) => pod_loss(p).map(|why| (TargetChange::NotReady, why)),
                };
                if let Some((change, why)) = loss {
                    cell.lost(change, &format!("pod {pod} {why}; waiting for {what}"));
                    continue;
                }
            }
            TargetState::Waiting { .. } => {
                if let Some(p) = pick_replacement(pods.items, follow.target.kind) {
                    let name = p.metadata.name.unwrap_or_default();
                    cell.replaced(&name, &format!("pod {name}"));
                    continue;
                }
            }
        }
        // Nothing to do on this list: watch from its version until a pod changes.
        let rv = pods.metadata.resource_version.unwrap_or_default();
        let changed = async {
            let events = api.watch(&wp, &rv).await?;
            let mut events = std::pin::pin!(events);
            while let Some(ev) = events.try_next().await? {
                let interesting = match (&ev, &state) {
                    // Anything may be a replacement; an error (410 Gone): list again.
                    (WatchEvent::Bookmark(_), _) => false,
                    (_, TargetState::Waiting { .. }) => true,
                    (WatchEvent::Error(_), _) => true,
                    (
                        WatchEvent::Added(p) | WatchEvent::Modified(p) | WatchEvent::Deleted(p),
                        TargetState::Ready { pod, .. },
                    ) => p.metadata.name.as_deref() == Some(pod.as_str()),
                };
                if interesting {
                    break;
                }
            }
            Ok::<(), kube::Error>(())
        };
        match changed.await {
            Ok(()) => failures.none(),
            Err(e) => failures.one_more("watch", e).await,
        }
    }
}

/// The API calls of a follower that failed in a row: the first of a streak is a warning, the
/// others are debug lines; each waits the session backoff ([`reconnect`]) before the next try.
struct Failures<'a> {
    cluster: &'a Cluster,
    target: &'a Target,
    streak: u32,
}

impl<'a> Failures<'a> {
    fn new(cluster: &'a Cluster, target: &'a Target) -> Self {
        Failures {
            cluster,
            target,
            streak: 0,
        }
    }

    /// `call` (`list`, `watch`) failed with `e`: say so, then wait.
    async fn one_more(&mut self, call: &str, e: kube::Error) {
        self.streak = self.streak.saturating_add(1);
        let e = self.cluster.api_error(e);
        if self.streak == 1 {
            tracing::warn!(
                "cannot follow the pods of {} ({call}): {e}; trying again",
                self.target
            );
        } else {
            tracing::debug!("following the pods of {} ({call}): {e}", self.target);
        }
        tokio::time::sleep(reconnect::delay(self.streak, reconnect::draw())).await;
    }

    fn none(&mut self) {
        self.streak = 0;
    }
}

/// `pod` as a `--spread` forward's pod set takes it ([`Spread::update`]): lost or running,
/// ready or not, and its own port for each of the forward's ports.
pub fn pod_view(spreading: &Spreading, pod: &Pod) -> PodView {
    let (ports, missing) = spreading.ports_on(pod);
    let lost = pod_loss(pod);
    PodView {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ready: lost.is_none() && pod_ready(pod),
        lost,
        ports,
        missing,
    }
}

/// Follow the pods of a `--spread` forward while it runs, handing every change to `spread`
/// ([`super::spread`] says what each means). Watched, not polled: a list, then the watch from
/// its version, each event applied to the pods as listed (a pod's readiness shows as soon as
/// the API server has it); when the watch ends (the server's timeout) or reports an error
/// (410 Gone), list again. Failed API calls are retried with the session backoff. Runs until
/// aborted.
pub async fn follow_spread<R: Route>(
    cluster: Cluster,
    spreading: Spreading,
    spread: Arc<Spread<R>>,
) {
    let api = Api::<Pod>::namespaced(cluster.client.clone(), &cluster.namespace);
    let lp = ListParams::default().labels(&spreading.selector);
    // The server closes a watch after its timeout; the API caps it below 295 s.
    let wp = WatchParams::default()
        .labels(&spreading.selector)
        .timeout(290);
    let mut failures = Failures::new(&cluster, &spreading.target);
    let views = |pods: &BTreeMap<String, Pod>| -> Vec<PodView> {
        pods.values().map(|p| pod_view(&spreading, p)).collect()
    };
    let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
    loop {
        let list = match api.list(&lp).await {
            Ok(list) => list,
            Err(e) => {
                failures.one_more("list", e).await;
                continue;
            }
        };
        let rv = list.metadata.resource_version.clone().unwrap_or_default();
        let mut pods: BTreeMap<String, Pod> =
            list.items.into_iter().map(|p| (name(&p), p)).collect();
        spread.update(&views(&pods));
        let watched = async {
            let events = api.watch(&wp, &rv).await?;
            let mut events = std::pin::pin!(events);
            while let Some(ev) = events.try_next().await? {
                match ev {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                        pods.insert(name(&p), p);
                    }
                    WatchEvent::Deleted(p) => {
                        pods.remove(&name(&p));
                    }
                    WatchEvent::Bookmark(_) => continue,
                    // 410 Gone and the like: list again.
                    WatchEvent::Error(_) => break,
                }
                spread.update(&views(&pods));
            }
            Ok::<(), kube::Error>(())
        };
        match watched.await {
            Ok(()) => failures.none(),
            Err(e) => failures.one_more("watch", e).await,
        }
    }
}

/// Why a pod that a forward goes to cannot take connections any more, if it cannot: it stopped
/// running or is being deleted. (Readiness is not required of the current pod: kubectl does not
/// require it either, and a flapping probe must not bounce the forward.)
pub fn pod_loss(p: &Pod) -> Option<String> {
    if p.metadata.deletion_timestamp.is_some() {
        return Some("is terminating".into());
    }
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    match phase {
        Some("Running") => None,
        other => Some(format!(
            "is not running (phase {})",
            other.unwrap_or("Unknown")
        )),
    }
}

/// The pod that replaces a lost one among `pods` (those the target's selector or name
/// matches): Running and not terminating; for a workload also ready; the one kubectl would
/// pick among several.
pub fn pick_replacement(pods: Vec<Pod>, kind: Kind) -> Option<Pod> {
    pods.into_iter()
        .filter(|p| pod_loss(p).is_none())
        .filter(|p| kind == Kind::Pod || pod_ready(p))
        .max_by_key(activity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::cluster::tests::{pod, t};
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

    #[test]
    fn a_pod_is_lost_when_it_stops_running_or_terminates() {
        let old = "2026-01-01T00:00:00Z";
        assert_eq!(pod_loss(&pod("p", "Running", None, 0, old)), None);
        assert_eq!(
            pod_loss(&pod("p", "Failed", None, 0, old)).as_deref(),
            Some("is not running (phase Failed)")
        );
        let mut terminating = pod("p", "Running", Some(old), 0, old);
        terminating.metadata.deletion_timestamp = Some(t(old));
        assert_eq!(pod_loss(&terminating).as_deref(), Some("is terminating"));
    }

    #[test]
    fn a_replacement_runs_and_for_a_workload_is_ready() {
        let old = "2026-01-01T00:00:00Z";
        let new = "2026-06-01T00:00:00Z";
        let name = |p: Option<Pod>| p.and_then(|p| p.metadata.name);
        let unready = pod("unready", "Running", None, 0, old);
        let pending = pod("pending", "Pending", None, 0, old);
        let mut going = pod("going", "Running", Some(old), 0, old);
        going.metadata.deletion_timestamp = Some(t(new));
        let ready = pod("ready", "Running", Some(new), 0, new);
        let all = vec![unready.clone(), pending.clone(), going, ready];
        assert_eq!(
            name(pick_replacement(all, Kind::Deployment)).as_deref(),
            Some("ready")
        );
        assert_eq!(
            name(pick_replacement(
                vec![unready.clone(), pending.clone()],
                Kind::Service
            )),
            None
        );
        // `pod/NAME`: Running is enough, as at start.
        assert_eq!(
            name(pick_replacement(vec![unready, pending], Kind::Pod)).as_deref(),
            Some("unready")
        );
    }
}
