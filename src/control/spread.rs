//! Spreading a forward's connections over its target's ready pods (`--spread`).
//!
//! Owns the set of pods a `--spread` forward sends connections to, and the choice for each new
//! connection: among the ready pods that have the connection's port, the one with the fewest
//! open connections, ties taken in turn ([`pick`], a pure function). Each pod has a route of its
//! own (its own session pool, which the forwarder builds through the factory it hands in), so a
//! slow pod holds up only the connections sent to it.
//!
//! A pod whose connections fail (the server reports an error for them, a refused port; or no
//! session to it can be had) cools down for the session backoff ([`super::reconnect`]), longer
//! with each failure in a row: meanwhile it gets a connection only if every pod is cooling.
//! Without that, a pod that refuses at once would always have the fewest open connections and
//! draw nearly every new one. One connection that works ends the streak.
//!
//! The follower ([`super::follow::follow_spread`]) hands in the pods as the API server shows
//! them ([`Spread::update`]), and each change is one log line:
//! - a pod that turns ready takes connections from the next one on;
//! - a pod that stops being ready takes no new ones; its open ones go on (as kube-proxy leaves
//!   established connections to an endpoint that turned unready alone);
//! - a pod that is gone (deleted, terminating, stopped running, no longer matched) has its
//!   open connections reset, as a forward to one pod does when its pod goes away, its route
//!   closed, and its metric series dropped.
//!
//! With no ready pod a connection is refused ([`NoPod`]) at once; the forwarder resets it.
//! Must not touch sockets or the API server: it resets connections and closes routes only
//! through their handles.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::reconnect;
use crate::metrics::{ForwardMetrics, PodMetrics};
use crate::proto::ConnId;
use crate::relay::Session;

/// What the follower knows of one pod of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Why it can take no connection at all (`is terminating`, `is not running (phase
    /// Failed)`); `None` while it runs.
    pub lost: Option<String>,
    /// Its Ready condition is true.
    pub ready: bool,
    /// The forward's remote ports (as its listeners know them) and this pod's port for each.
    pub ports: Vec<(u16, u16)>,
    /// Why it has no port for some of them (a named port it lacks), one line each.
    pub missing: Vec<String>,
}

/// A pod's way upstream, as the forwarder built it.
pub trait Route: Send + Sync + 'static {
    /// The pod is gone (`why`): set up nothing more to it, retire what there is.
    fn close(&self, why: &str);
}

/// Builds the route to a pod: its name, and its ports (the pod's side of [`PodView::ports`]).
pub type RouteFactory<R> = Box<dyn Fn(&str, &[u16]) -> R + Send + Sync>;

/// One pod a `--spread` forward sends connections to.
pub struct Pod<R> {
    pub name: String,
    pub route: R,
    /// Forward port -> this pod's port.
    ports: HashMap<u16, u16>,
    metrics: PodMetrics,
    /// Connections picked for it and not ended yet (what [`pick`] compares).
    open: AtomicUsize,
    /// Connections being relayed to it, so that they can be reset when it goes.
    conns: Mutex<HashMap<u64, (Session, ConnId)>>,
    next_conn: AtomicU64,
    /// Set when it is gone: why.
    gone: Mutex<Option<String>>,
    /// Its connections that failed in a row, and until when it cools down.
    failing: Mutex<(u32, Option<Instant>)>,
}

impl<R> Pod<R> {
    pub fn metrics(&self) -> &PodMetrics {
        &self.metrics
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, (Session, ConnId)>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gone(&self) -> Option<String> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn failing(&self) -> MutexGuard<'_, (u32, Option<Instant>)> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cooling(&self, now: Instant) -> bool {
        self.failing().1.is_some_and(|until| until > now)
    }
}

/// A new connection's place on the pod picked for it: counted among the pod's open
/// connections for as long as it lives.
pub struct Lease<R> {
    pod: Arc<Pod<R>>,
    /// The pod's port for the connection.
    pub port: u16,
}

impl<R> Lease<R> {
    pub fn pod(&self) -> &Pod<R> {
        &self.pod
    }

    /// How the connection went for the pod: `failed` (the server reported an error for it, or
    /// no session could be had) starts or lengthens the pod's cool-down; anything else ends it.
    pub fn ended(&self, failed: bool) {
        let mut f = self.pod.failing();
        *f = if failed {
            let streak = f.0.saturating_add(1);
            let wait = reconnect::delay(streak, reconnect::draw());
            (streak, Some(Instant::now() + wait))
        } else {
            (0, None)
        };
    }

    /// Count `conn` on `session` among the pod's relayed connections while the guard lives,
    /// so that it is reset when the pod goes; if the pod went already, reset it now.
    pub fn track(&self, session: &Session, conn: ConnId) -> Tracked<'_, R> {
        let id = self.pod.next_conn.fetch_add(1, Relaxed);
        self.pod.conns().insert(id, (session.clone(), conn));
        if self.pod.gone().is_some() {
            session.reset(conn);
        }
        Tracked(&self.pod, id)
    }
}

impl<R> Drop for Lease<R> {
    fn drop(&mut self) {
        self.pod.open.fetch_sub(1, Relaxed);
    }
}

/// A connection among its pod's relayed connections (see [`Lease::track`]).
pub struct Tracked<'a, R>(&'a Pod<R>, u64);

impl<R> Drop for Tracked<'_, R> {
    fn drop(&mut self) {
        self.0.conns().remove(&self.1);
    }
}

/// Why a new connection has no pod to go to; one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPod {
    #[error("no ready pod of {0}")]
    NoneReady(String),
    #[error("none of the {ready} ready pods of {target} has a port for {port}")]
    NoPort {
        target: String,
        ready: usize,
        port: u16,
    },
}

struct State<R> {
    pods: BTreeMap<String, (Arc<Pod<R>>, bool)>,
    /// The pod picked last, for taking ties in turn.
    last: Option<String>,
}

/// The pods of one `--spread` forward; see the module docs.
pub struct Spread<R> {
    /// The target, as the log lines name it (`svc/web`).
    target: String,
    metrics: ForwardMetrics,
    make: RouteFactory<R>,
    state: Mutex<State<R>>,
}

/// A pod that can take a new connection, as [`pick`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// Connections open to it now.
    pub open: usize,
    /// Its last connections failed, and its cool-down has not run out.
    pub cooling: bool,
}

/// The index of the pod a new connection goes to among `candidates` (in name order): the
/// fewest open connections among those not cooling down (among all, if every one is); among
/// several with as few, the first after `last` (the pod picked before, by name), wrapping.
pub fn pick(candidates: &[Candidate], last: Option<&str>) -> Option<usize> {
    let key = |c: &Candidate| (c.cooling, c.open);
    let best = candidates.iter().map(key).min()?;
    let tied = || {
        candidates
            .iter()
            .enumerate()
            .filter(move |(_, c)| key(c) == best)
    };
    let after = last.and_then(|l| tied().find(|(_, c)| c.name > l));
    after.or_else(|| tied().next()).map(|(i, _)| i)
}

impl<R: Route> Spread<R> {
    pub fn new(target: &str, metrics: ForwardMetrics, make: RouteFactory<R>) -> Spread<R> {
        Spread {
            target: target.to_string(),
            metrics,
            make,
            state: Mutex::new(State {
                pods: BTreeMap::new(),
                last: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pod for a new connection to forward port `port`; see [`pick`].
    pub fn pick(&self, port: u16) -> Result<Lease<R>, NoPod> {
        let mut st = self.state();
        let ready: Vec<&Arc<Pod<R>>> = st
            .pods
            .values()
            .filter(|(_, ready)| *ready)
            .map(|(p, _)| p)
            .collect();
        if ready.is_empty() {
            return Err(NoPod::NoneReady(self.target.clone()));
        }
        let able: Vec<&Arc<Pod<R>>> = ready
            .iter()
            .copied()
            .filter(|p| p.ports.contains_key(&port))
            .collect();
        let now = Instant::now();
        let candidates: Vec<Candidate> = able
            .iter()
            .map(|p| Candidate {
                name: &p.name,
                open: p.open.load(Relaxed),
                cooling: p.cooling(now),
            })
            .collect();
        let Some(i) = pick(&candidates, st.last.as_deref()) else {
            return Err(NoPod::NoPort {
                target: self.target.clone(),
                ready: ready.len(),
                port,
            });
        };
        let pod = able[i].clone();
        pod.open.fetch_add(1, Relaxed);
        st.last = Some(pod.name.clone());
        let port = pod.ports[&port];
        Ok(Lease { pod, port })
    }

    /// The pods known now (ready or not, with open connections), in name order.
    pub fn pods(&self) -> Vec<Arc<Pod<R>>> {
        self.state().pods.values().map(|(p, _)| p.clone()).collect()
    }

    /// The names of the ready pods, in name order.
    pub fn ready(&self) -> Vec<String> {
        self.state()
            .pods
            .iter()
            .filter(|(_, (_, ready))| *ready)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The first view of the target: its ready pods, taken as they are, without a line each.
    pub fn seed(&self, views: &[PodView]) {
        self.apply(views, false);
    }

    /// The target as the API server shows it now (every pod its selector matches); see the
    /// module docs for what changes.
    pub fn update(&self, views: &[PodView]) {
        self.apply(views, true);
    }

    fn apply(&self, views: &[PodView], say: bool) {
        let mut st = self.state();
        let mut lines: Vec<(bool, String)> = Vec::new();
        let mut removed = Vec::new();
        // Gone: no longer listed, or listed as lost.
        let names: Vec<String> = st.pods.keys().cloned().collect();
        for name in names {
            let why = match views.iter().find(|v| v.name == name) {
                None => Some("is gone".to_string()),
                Some(v) => v.lost.clone(),
            };
            if let Some(why) = why
                && let Some((pod, _)) = st.pods.remove(&name)
            {
                removed.push((pod, why));
            }
        }
        for v in views.iter().filter(|v| v.lost.is_none()) {
            match st.pods.get_mut(&v.name) {
                Some((pod, ready)) if *ready != v.ready => {
                    *ready = v.ready;
                    if v.ready {
                        lines.push((false, format!("pod {} is ready again", v.name)));
                    } else {
                        let open = pod.open.load(Relaxed);
                        lines.push((
                            true,
                            format!(
                                "pod {} is not ready: no new connections to it ({open} open \
                                 go on)",
                                v.name
                            ),
                        ));
                    }
                }
                Some(_) => {}
                None if v.ready => {
                    let ports: HashMap<u16, u16> = v.ports.iter().copied().collect();
                    let mut theirs: Vec<u16> = ports.values().copied().collect();
                    theirs.sort_unstable();
                    theirs.dedup();
                    let pod = Arc::new(Pod {
                        name: v.name.clone(),
                        route: (self.make)(&v.name, &theirs),
                        ports,
                        metrics: self.metrics.pod(&v.name),
                        open: AtomicUsize::new(0),
                        conns: Mutex::new(HashMap::new()),
                        next_conn: AtomicU64::new(1),
                        gone: Mutex::new(None),
                        failing: Mutex::new((0, None)),
                    });
                    st.pods.insert(v.name.clone(), (pod, true));
                    lines.push((false, format!("pod {} is ready", v.name)));
                    for m in &v.missing {
                        lines.push((true, format!("pod {}: {m}", v.name)));
                    }
                }
                // Not ready yet: nothing to set up until it is.
                None => {}
            }
        }
        let ready = st.pods.values().filter(|(_, r)| *r).count();
        drop(st);
        for (pod, why) in &removed {
            let open: Vec<(Session, ConnId)> = {
                *pod.gone.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
                pod.conns().values().cloned().collect()
            };
            for (session, conn) in &open {
                session.reset(*conn);
            }
            pod.route.close(&format!("pod {} {why}", pod.name));
            self.metrics.forget_pod(&pod.name);
            lines.push((
                true,
                format!(
                    "pod {} {why}: reset its {} open connection{}",
                    pod.name,
                    open.len(),
                    if open.len() == 1 { "" } else { "s" }
                ),
            ));
        }
        if !say {
            return;
        }
        let now = match ready {
            0 => format!(
                "no ready pod of {}: new connections are reset until one is",
                self.target
            ),
            1 => format!("1 ready pod of {}", self.target),
            n => format!("{n} ready pods of {}", self.target),
        };
        for (warn, line) in lines {
            if warn {
                tracing::warn!(forward = self.metrics.name(), "{line}; {now}");
            } else {
                tracing::info!(forward = self.metrics.name(), "{line}; {now}");
            }
        }
    }
}

impl<R> Drop for Spread<R> {
    fn drop(&mut self) {
        // The forward is over: its pods' series go with it.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for name in st.pods.keys() {
            self.metrics.forget_pod(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn c(name: &str, open: usize) -> Candidate<'_> {
        Candidate {
            name,
            open,
            cooling: false,
        }
    }

    #[test]
    fn the_fewest_open_connections_win() {
        let cs = [c("a", 3), c("b", 1), c("c", 2)];
        assert_eq!(pick(&cs, None), Some(1));
        assert_eq!(pick(&cs, Some("b")), Some(1));
        assert_eq!(pick(&[], None), None);
    }

    #[test]
    fn ties_are_taken_in_turn() {
        let cs = [c("a", 0), c("b", 0), c("c", 0)];
        let mut last = None;
        let mut order = Vec::new();
        for _ in 0..6 {
            let i = pick(&cs, last).unwrap();
            order.push(cs[i].name);
            last = Some(cs[i].name);
        }
        assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
        // Among the tied ones only; the turn survives a pod that left (`b` was picked last).
        let cs = [c("a", 1), c("c", 0), c("d", 0)];
        assert_eq!(pick(&cs, Some("b")), Some(1));
        assert_eq!(pick(&cs, Some("d")), Some(1));
    }

    #[test]
    fn a_cooling_pod_comes_last() {
        let mut cs = [c("a", 5), c("b", 3), c("c", 0)];
        cs[2].cooling = true;
        assert_eq!(pick(&cs, None), Some(1));
        // Every pod cooling: the fewest open among them all.
        for x in &mut cs {
            x.cooling = true;
        }
        assert_eq!(pick(&cs, None), Some(2));
    }

    #[test]
    fn failed_connections_cool_a_pod_down_until_one_works() {
        let (s, _made) = spread();
        s.seed(&[view("a", true, None), view("b", true, None)]);
        let first = s.pick(80).unwrap();
        assert_eq!(first.pod().name, "a");
        first.ended(true);
        drop(first);
        // `a` has the fewest open (none, like `b`) and its turn, but it is cooling.
        let held = s.pick(80).unwrap();
        assert_eq!(held.pod().name, "b");
        assert_eq!(s.pick(80).unwrap().pod().name, "b");
        // A connection that works (to `a`, picked while every other choice is worse) ends the
        // streak.
        let a = s.pods().into_iter().find(|p| p.name == "a").unwrap();
        assert!(a.cooling(Instant::now()));
        *a.failing() = (1, None);
        let next = s.pick(80).unwrap();
        assert_eq!(next.pod().name, "a");
        next.ended(false);
        assert_eq!(*a.failing(), (0, None));
    }

    struct TestRoute(Arc<AtomicBool>);

    impl Route for TestRoute {
        fn close(&self, _why: &str) {
            self.0.store(true, Relaxed);
        }
    }

    fn view(name: &str, ready: bool, lost: Option<&str>) -> PodView {
        PodView {
            name: name.into(),
            lost: lost.map(Into::into),
            ready,
            ports: vec![(80, 8080)],
            missing: Vec::new(),
        }
    }

    /// The routes made so far: pod name, and whether it was closed.
    type Made = Arc<Mutex<Vec<(String, Arc<AtomicBool>)>>>;

    fn spread() -> (Spread<TestRoute>, Made) {
        let made = Arc::new(Mutex::new(Vec::new()));
        let log = made.clone();
        let make: RouteFactory<TestRoute> = Box::new(move |name, ports| {
            assert_eq!(ports, [8080]);
            let closed = Arc::new(AtomicBool::new(false));
            log.lock().unwrap().push((name.to_string(), closed.clone()));
            TestRoute(closed)
        });
        (
            Spread::new("svc/web", ForwardMetrics::detached(), make),
            made,
        )
    }

    #[test]
    fn connections_follow_the_ready_pods() {
        let (s, made) = spread();
        assert_eq!(s.pick(80).err(), Some(NoPod::NoneReady("svc/web".into())));
        s.seed(&[view("a", true, None), view("b", false, None)]);
        // Only ready pods get a route.
        assert_eq!(made.lock().unwrap().len(), 1);
        let one = s.pick(80).unwrap();
        assert_eq!((one.pod().name.as_str(), one.port), ("a", 8080));
        assert!(matches!(
            s.pick(81).err(),
            Some(NoPod::NoPort {
                port: 81,
                ready: 1,
                ..
            })
        ));
        // `b` turns ready: with `a` holding one connection, the next goes to `b`.
        s.update(&[view("a", true, None), view("b", true, None)]);
        assert_eq!(s.pick(80).unwrap().pod().name, "b");
        // (That lease ended at once: `b` has none open, `a` one.)
        assert_eq!(s.pick(80).unwrap().pod().name, "b");
        drop(one);
        let (x, y) = (s.pick(80).unwrap(), s.pick(80).unwrap());
        assert_ne!(x.pod().name, y.pod().name);
        // `a` stops being ready: no new connections; its route stays.
        s.update(&[view("a", false, None), view("b", true, None)]);
        assert_eq!(s.ready(), ["b"]);
        for _ in 0..3 {
            assert_eq!(s.pick(80).unwrap().pod().name, "b");
        }
        assert!(!made.lock().unwrap()[0].1.load(Relaxed));
        // `b` is deleted, `a` terminates: both routes close, nothing is left.
        s.update(&[view("a", false, Some("is terminating"))]);
        assert!(made.lock().unwrap().iter().all(|(_, c)| c.load(Relaxed)));
        assert!(s.pods().is_empty());
        assert_eq!(s.pick(80).err(), Some(NoPod::NoneReady("svc/web".into())));
        drop((x, y));
    }
}
