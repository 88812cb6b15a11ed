//! Per-forward and per-session metric handles, and the registry of open streams.
//!
//! A [`ForwardMetrics`] registers its labelled handles once, when the forward is created (and
//! a [`SessionMetrics`] once per protocol the forward uses), so recording never looks a label
//! up. Every forward of the process is in one registry, which the scrape, the sampler, the
//! `/streams` endpoint and the live status line walk.
//!
//! A `--spread` forward also counts per pod ([`PodMetrics`]): plain atomics per pod, which
//! [`render_pods`] writes out at scrape time for the pods the forward still knows; a pod it
//! forgets ([`ForwardMetrics::forget_pod`]) leaves the exposition with it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, counter, gauge, histogram};

use super::histogram::LocalHistogram;
use super::names::*;
use super::stream::{Stream, StreamStats};
use super::{Outcome, TargetChange, data_plane};

const UP: usize = 0;
const DOWN: usize = 1;
const DIRECTIONS: [&str; 2] = ["up", "down"];

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An exported histogram and its in-process copy, fed together.
#[derive(Debug)]
pub struct Hist {
    exported: metrics::Histogram,
    local: LocalHistogram,
}

impl Hist {
    fn new(
        name: &'static str,
        bounds: &'static [f64],
        labels: Vec<(&'static str, String)>,
    ) -> Self {
        let labels: Vec<metrics::Label> = labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        Hist {
            exported: histogram!(name, labels),
            local: LocalHistogram::new(bounds),
        }
    }

    pub fn observe(&self, v: f64) {
        self.exported.record(v);
        self.local.observe(v);
    }

    pub fn local(&self) -> &LocalHistogram {
        &self.local
    }
}

pub(super) struct ForwardInner {
    name: Arc<str>,
    /// Served connections (`ringfwd serve`): the relay's local socket is the target, so its
    /// `up` (socket to session) travels towards the client: exported as `down`.
    server: bool,
    bytes: [Counter; 2],
    accepted: Counter,
    closed: [Counter; super::names::OUTCOMES.len()],
    active: Gauge,
    target_changes: [Counter; 3],
    first_byte: Hist,
    stream_bytes: [Hist; 2],
    duration: Hist,
    throughput: [Hist; 2],
    sessions: Mutex<Vec<SessionMetrics>>,
    /// A session of this forward died; the next one set up is a reconnect.
    lost: Arc<AtomicBool>,
    open: Mutex<HashMap<u64, Arc<StreamStats>>>,
    next_id: AtomicU64,
    /// Bytes of finished streams, exported directions.
    finished: [AtomicU64; 2],
    /// Last sample of the forward's totals and the rate derived from it.
    sample: Mutex<(Instant, [u64; 2])>,
    rate: [AtomicU64; 2],
    /// The pods a `--spread` forward sends connections to, by name.
    pods: Mutex<BTreeMap<Arc<str>, Arc<PodInner>>>,
}

/// What a `--spread` forward counted for one pod; the streams sent there share it.
#[derive(Debug)]
pub(super) struct PodInner {
    pub(super) name: Arc<str>,
    connections: AtomicU64,
    /// Streams open to it now.
    active: AtomicU64,
    closed: [AtomicU64; OUTCOMES.len()],
    /// Bytes of its finished streams, exported directions; added under the forward's `open`
    /// lock, as the streams leave it, so that a scrape counts each byte once.
    finished: [AtomicU64; 2],
}

/// The per-pod counters of one pod of a `--spread` forward. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PodMetrics(Arc<PodInner>);

impl ForwardInner {
    /// Index of the exported direction of the relay's `up` / `down`.
    fn dirs(&self) -> [usize; 2] {
        if self.server { [DOWN, UP] } else { [UP, DOWN] }
    }

    /// A stream's bytes so far, in exported directions.
    fn directed(&self, s: &StreamStats) -> [u64; 2] {
        let mut out = [0; 2];
        let d = self.dirs();
        out[d[0]] = s.up();
        out[d[1]] = s.down();
        out
    }

    /// Add what `s` relayed since the last fold to the exported counters; report its first
    /// byte once.
    fn fold(&self, s: &StreamStats) {
        let now = self.directed(s);
        for dir in [UP, DOWN] {
            // Scrape, sampler and stream end may fold at once: `fetch_max` hands each byte
            // to exactly one of them.
            let before = s.folded[dir].fetch_max(now[dir], Relaxed);
            if now[dir] > before {
                self.bytes[dir].increment(now[dir] - before);
            }
        }
        if let Some(t) = s.first_byte()
            && !s.first_byte_reported.swap(true, Relaxed)
        {
            self.first_byte.observe(t.as_secs_f64());
        }
    }

    pub(super) fn end(&self, s: &StreamStats, outcome: Outcome, detail: &dyn Display) {
        self.fold(s);
        let bytes = self.directed(s);
        let pod = s.pod.get();
        {
            let mut open = lock(&self.open);
            for dir in [UP, DOWN] {
                self.finished[dir].fetch_add(bytes[dir], Relaxed);
                if let Some(p) = pod {
                    p.finished[dir].fetch_add(bytes[dir], Relaxed);
                }
            }
            open.remove(&s.id);
        }
        if let Some(p) = pod {
            p.closed[outcome as usize].fetch_add(1, Relaxed);
            p.active.fetch_sub(1, Relaxed);
        }
        let took = s.age();
        self.closed[outcome as usize].increment(1);
        self.active.decrement(1.0);
        self.duration.observe(took.as_secs_f64());
        for dir in [UP, DOWN] {
            self.stream_bytes[dir].observe(bytes[dir] as f64);
            if bytes[dir] > 0 && !took.is_zero() {
                self.throughput[dir].observe(bytes[dir] as f64 / took.as_secs_f64());
            }
        }
        tracing::debug!(
            target: "ringfwd::conn",
            forward = %self.name,
            port = s.port,
            peer = s.peer.map(tracing::field::display),
            pod = pod.map(|p| tracing::field::display(&p.name)),
            bytes_up = bytes[UP],
            bytes_down = bytes[DOWN],
            duration = ?took,
            outcome = outcome.label(),
            "connection ended: {detail}"
        );
    }

    /// Finished plus open bytes, exported directions.
    fn totals(&self) -> [u64; 2] {
        let open = lock(&self.open);
        let mut t = [
            self.finished[UP].load(Relaxed),
            self.finished[DOWN].load(Relaxed),
        ];
        for s in open.values() {
            let b = self.directed(s);
            t[UP] += b[UP];
            t[DOWN] += b[DOWN];
        }
        t
    }

    fn open_streams(&self) -> Vec<Arc<StreamStats>> {
        lock(&self.open).values().cloned().collect()
    }

    fn sample_pods(&self) -> Vec<(Arc<str>, u64)> {
        lock(&self.pods)
            .values()
            .map(|p| (p.name.clone(), p.active.load(Relaxed)))
            .collect()
    }
}

/// Metric handles of one forward (or of `ringfwd serve`). Cheap to clone.
#[derive(Clone)]
pub struct ForwardMetrics(Arc<ForwardInner>);

impl std::fmt::Debug for ForwardMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ForwardMetrics").field(&self.0.name).finish()
    }
}

static FORWARDS: Mutex<Vec<Weak<ForwardInner>>> = Mutex::new(Vec::new());

static DETACHED: LazyLock<ForwardMetrics> = LazyLock::new(|| {
    metrics::with_local_recorder(&metrics::NoopRecorder, || {
        ForwardMetrics::build("detached", false)
    })
});

impl ForwardMetrics {
    /// Handles for the forward called `name` (its target, or `--name`). Create it after the
    /// recorder is installed ([`super::install`]): handles taken before are no-ops.
    pub fn new(name: &str) -> Self {
        Self::register(Self::build(name, false))
    }

    /// Handles for the connections `ringfwd serve` relays to its targets.
    pub fn server(name: &str) -> Self {
        Self::register(Self::build(name, true))
    }

    /// Handles that belong to no forward and are in no registry: sessions and relays driven
    /// directly (tests, library users) record nothing anyone reads.
    pub fn detached() -> Self {
        DETACHED.clone()
    }

    fn register(m: Self) -> Self {
        let mut all = lock(&FORWARDS);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&m.0));
        m
    }

    fn build(name: &str, server: bool) -> Self {
        #[allow(non_snake_case)]
        let DATA_PLANE = data_plane();
        let f = || (L_FORWARD, name.to_string());
        let dp = || (L_DATA_PLANE, DATA_PLANE.to_string());
        let dir = |d: usize| (L_DIRECTION, DIRECTIONS[d].to_string());
        let bytes = [UP, DOWN]
            .map(|d| counter!(BYTES, L_FORWARD => name.to_string(), L_DIRECTION => DIRECTIONS[d], L_DATA_PLANE => DATA_PLANE));
        let closed = OUTCOMES.map(|o| {
            counter!(CONNECTIONS_CLOSED, L_FORWARD => name.to_string(), L_DATA_PLANE => DATA_PLANE, L_OUTCOME => o)
        });
        let accepted = counter!(CONNECTIONS_ACCEPTED, L_FORWARD => name.to_string(), L_DATA_PLANE => DATA_PLANE);
        let target_changes = TARGET_REASONS
            .map(|r| counter!(TARGET_CHANGES, L_FORWARD => name.to_string(), L_REASON => r));
        let active =
            gauge!(CONNECTIONS_ACTIVE, L_FORWARD => name.to_string(), L_DATA_PLANE => DATA_PLANE);
        // Export every series from the start, at zero: rates and alerts see a forward that has
        // carried nothing yet, instead of no forward.
        for c in bytes
            .iter()
            .chain(&closed)
            .chain(&target_changes)
            .chain([&accepted])
        {
            c.increment(0);
        }
        active.set(0.0);
        ForwardMetrics(Arc::new(ForwardInner {
            name: name.into(),
            server,
            bytes,
            accepted,
            closed,
            active,
            target_changes,
            first_byte: Hist::new(FIRST_BYTE, LATENCY_BUCKETS, vec![f(), dp()]),
            stream_bytes: [UP, DOWN]
                .map(|d| Hist::new(STREAM_BYTES, SIZE_BUCKETS, vec![f(), dir(d)])),
            duration: Hist::new(STREAM_DURATION, DURATION_BUCKETS, vec![f()]),
            throughput: [UP, DOWN]
                .map(|d| Hist::new(STREAM_THROUGHPUT, RATE_BUCKETS, vec![f(), dir(d)])),
            sessions: Mutex::new(Vec::new()),
            lost: Arc::new(AtomicBool::new(false)),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            finished: [AtomicU64::new(0), AtomicU64::new(0)],
            sample: Mutex::new((Instant::now(), [0, 0])),
            rate: [AtomicU64::new(0), AtomicU64::new(0)],
            pods: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A local connection was accepted for remote `port`: count it and start its stream.
    pub fn accept(&self, peer: Option<SocketAddr>, port: u16) -> Stream {
        let id = self.0.next_id.fetch_add(1, Relaxed);
        let stats = Arc::new(StreamStats::new(id, port, peer));
        self.0.accepted.increment(1);
        self.0.active.increment(1.0);
        lock(&self.0.open).insert(id, stats.clone());
        Stream::new(stats, self.0.clone())
    }

    /// Session handles for `protocol` (`spdy`, `websocket`, `tunnel`), registered on first use.
    pub fn session(&self, protocol: &'static str) -> SessionMetrics {
        let mut all = lock(&self.0.sessions);
        if let Some(s) = all.iter().find(|s| s.0.protocol == protocol) {
            return s.clone();
        }
        let s = SessionMetrics::build(&self.0.name, protocol, self.0.lost.clone());
        all.push(s.clone());
        s
    }

    /// A session was set up in `took`; returns the handles it runs with. Counts a reconnect
    /// when the forward's previous session died.
    pub fn session_set_up(&self, protocol: &'static str, took: Duration) -> SessionMetrics {
        let s = self.session(protocol);
        s.0.setup.observe(took.as_secs_f64());
        if self.0.lost.swap(false, Relaxed) {
            s.0.reconnects.increment(1);
        }
        s
    }

    /// Setting a session up failed (connect, upgrade, runtime).
    pub fn session_setup_failed(&self, protocol: &'static str) {
        self.session(protocol).0.failed[0].increment(1);
    }

    /// The forward lost its pod, or goes to a new one.
    pub fn target_change(&self, change: TargetChange) {
        self.0.target_changes[change as usize].increment(1);
    }

    /// In-process copy of the time-to-first-byte histogram.
    pub fn first_byte(&self) -> &LocalHistogram {
        self.0.first_byte.local()
    }

    /// Bytes relayed so far, `[up, down]`, open streams included.
    pub fn totals(&self) -> [u64; 2] {
        self.0.totals()
    }

    /// The counters of pod `name` (a `--spread` forward sends connections there), exported
    /// from now on; the same ones again for a name it already counts.
    pub fn pod(&self, name: &str) -> PodMetrics {
        let mut pods = lock(&self.0.pods);
        if let Some(p) = pods.get(name) {
            return PodMetrics(p.clone());
        }
        let name: Arc<str> = name.into();
        let p = Arc::new(PodInner {
            name: name.clone(),
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
            closed: std::array::from_fn(|_| AtomicU64::new(0)),
            finished: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        pods.insert(name, p.clone());
        PodMetrics(p)
    }

    /// Pod `name` is gone: its series leave the exposition (streams still ending there count
    /// where nobody reads).
    pub fn forget_pod(&self, name: &str) {
        lock(&self.0.pods).remove(name);
    }

    /// The pods counted now and the connections open to each (as the status line shows them).
    pub fn sample_pods(&self) -> Vec<(Arc<str>, u64)> {
        self.0.sample_pods()
    }
}

impl PodMetrics {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Connections open to the pod now.
    pub fn active(&self) -> u64 {
        self.0.active.load(Relaxed)
    }

    /// Connections sent to the pod so far.
    pub fn connections(&self) -> u64 {
        self.0.connections.load(Relaxed)
    }

    /// A stream goes to this pod.
    pub(super) fn attach(&self) -> Arc<PodInner> {
        self.0.connections.fetch_add(1, Relaxed);
        self.0.active.fetch_add(1, Relaxed);
        self.0.clone()
    }
}

/// Metric handles a session records to: those of its forward and protocol. The default records
/// nothing.
#[derive(Clone, Default)]
pub struct SessionMetrics(Arc<SessionInner>);

impl std::fmt::Debug for SessionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SessionMetrics")
            .field(&self.0.protocol)
            .finish()
    }
}

struct SessionInner {
    protocol: &'static str,
    opened: Counter,
    failed: [Counter; 5],
    reconnects: Counter,
    active: Gauge,
    stalled: Gauge,
    setup: Hist,
    ping: Hist,
    stall: Hist,
    lost: Arc<AtomicBool>,
}

impl Default for SessionInner {
    fn default() -> Self {
        SessionInner {
            protocol: "",
            opened: Counter::noop(),
            failed: std::array::from_fn(|_| Counter::noop()),
            reconnects: Counter::noop(),
            active: Gauge::noop(),
            stalled: Gauge::noop(),
            setup: Hist::noop(LATENCY_BUCKETS),
            ping: Hist::noop(LATENCY_BUCKETS),
            stall: Hist::noop(LATENCY_BUCKETS),
            lost: Arc::default(),
        }
    }
}

impl Hist {
    fn noop(bounds: &'static [f64]) -> Self {
        Hist {
            exported: metrics::Histogram::noop(),
            local: LocalHistogram::new(bounds),
        }
    }
}

impl SessionMetrics {
    fn build(forward: &str, protocol: &'static str, lost: Arc<AtomicBool>) -> Self {
        let h = |name, bounds| {
            Hist::new(
                name,
                bounds,
                vec![
                    (L_FORWARD, forward.to_string()),
                    (L_PROTOCOL, protocol.to_string()),
                ],
            )
        };
        let failed = SESSION_ERRORS.map(|e| {
            counter!(SESSIONS_FAILED, L_FORWARD => forward.to_string(), L_PROTOCOL => protocol, L_ERROR => e)
        });
        let opened =
            counter!(SESSIONS_OPENED, L_FORWARD => forward.to_string(), L_PROTOCOL => protocol);
        let reconnects =
            counter!(RECONNECTS, L_FORWARD => forward.to_string(), L_PROTOCOL => protocol);
        let active =
            gauge!(SESSIONS_ACTIVE, L_FORWARD => forward.to_string(), L_PROTOCOL => protocol);
        let stalled =
            gauge!(SESSIONS_STALLED, L_FORWARD => forward.to_string(), L_PROTOCOL => protocol);
        for c in failed.iter().chain([&opened, &reconnects]) {
            c.increment(0);
        }
        active.increment(0.0);
        stalled.increment(0.0);
        SessionMetrics(Arc::new(SessionInner {
            protocol,
            opened,
            failed,
            reconnects,
            active,
            stalled,
            setup: h(SESSION_SETUP, LATENCY_BUCKETS),
            ping: h(PING_RTT, LATENCY_BUCKETS),
            stall: h(RELAY_STALL, LATENCY_BUCKETS),
            lost,
        }))
    }

    /// The session is running.
    pub fn started(&self) {
        self.0.opened.increment(1);
        self.0.active.increment(1.0);
    }

    /// The session ended: in order (`None`: we or the peer said goodbye) or failed, with one of
    /// [`SESSION_ERRORS`]. A failed session makes the forward's next session a reconnect.
    pub fn ended(&self, failure: Option<&'static str>) {
        self.0.active.decrement(1.0);
        if let Some(kind) = failure {
            let i = SESSION_ERRORS.iter().position(|e| *e == kind).unwrap_or(1);
            self.0.failed[i].increment(1);
            self.0.lost.store(true, Relaxed);
        }
    }

    /// In-process copy of `ringfwd_session_setup_seconds` for this forward and protocol.
    pub fn setup(&self) -> &LocalHistogram {
        self.0.setup.local()
    }

    /// In-process copy of `ringfwd_relay_stall_seconds` for this forward and protocol.
    pub fn stall(&self) -> &LocalHistogram {
        self.0.stall.local()
    }

    /// In-process copy of `ringfwd_session_ping_rtt_seconds` for this forward and protocol.
    pub fn ping(&self) -> &LocalHistogram {
        self.0.ping.local()
    }

    pub fn ping_rtt(&self, rtt: Duration) {
        self.0.ping.observe(rtt.as_secs_f64());
    }

    /// The session reader starts waiting for a slow local client.
    pub fn stall_begin(&self) {
        self.0.stalled.increment(1.0);
    }

    /// The wait that [`stall_begin`](Self::stall_begin) announced took `waited`.
    pub fn stall_end(&self, waited: Duration) {
        self.0.stalled.decrement(1.0);
        self.0.stall.observe(waited.as_secs_f64());
    }
}

/// One forward as the live view shows it.
#[derive(Debug, Clone)]
pub struct ForwardSnapshot {
    pub name: Arc<str>,
    pub active: usize,
    /// `[up, down]` bytes so far.
    pub bytes: [u64; 2],
    /// `[up, down]` bytes/s over the last sample period.
    pub rate: [u64; 2],
    /// A `--spread` forward's pods and the connections open to each, by name.
    pub pods: Vec<(Arc<str>, u64)>,
}

/// One open stream as `/streams` shows it.
#[derive(Debug, Clone)]
pub struct StreamSnapshot {
    pub forward: Arc<str>,
    /// The pod a `--spread` forward sent it to.
    pub pod: Option<Arc<str>>,
    pub port: u16,
    pub peer: Option<SocketAddr>,
    pub age: Duration,
    pub bytes: [u64; 2],
    pub rate: [u64; 2],
}

fn forwards() -> Vec<Arc<ForwardInner>> {
    lock(&FORWARDS).iter().filter_map(Weak::upgrade).collect()
}

/// Fold every open stream into the exported counters (before a scrape renders them).
pub fn fold_all() {
    for f in forwards() {
        for s in f.open_streams() {
            f.fold(&s);
        }
    }
}

fn per_second(now: u64, before: u64, dt: Duration) -> u64 {
    if dt.is_zero() {
        return 0;
    }
    (now.saturating_sub(before) as f64 / dt.as_secs_f64()) as u64
}

/// Fold, and update every forward's and stream's current rate from the bytes since the last
/// call. Called periodically by the sampler.
pub fn sample_all() -> Vec<ForwardSnapshot> {
    let now = Instant::now();
    let mut out = Vec::new();
    for f in forwards() {
        let streams = f.open_streams();
        for s in &streams {
            f.fold(s);
            let b = f.directed(s);
            let mut last = lock(&s.sample);
            let dt = now - last.0;
            s.rate[UP].store(per_second(b[UP], last.1, dt), Relaxed);
            s.rate[DOWN].store(per_second(b[DOWN], last.2, dt), Relaxed);
            *last = (now, b[UP], b[DOWN]);
        }
        let totals = f.totals();
        let mut last = lock(&f.sample);
        let dt = now - last.0;
        for dir in [UP, DOWN] {
            f.rate[dir].store(per_second(totals[dir], last.1[dir], dt), Relaxed);
        }
        *last = (now, totals);
        let pods = f.sample_pods();
        out.push(ForwardSnapshot {
            name: f.name.clone(),
            active: streams.len(),
            bytes: totals,
            rate: [f.rate[UP].load(Relaxed), f.rate[DOWN].load(Relaxed)],
            pods,
        });
    }
    out
}

/// Every open stream of every forward.
pub fn open_streams() -> Vec<StreamSnapshot> {
    let mut out = Vec::new();
    for f in forwards() {
        for s in f.open_streams() {
            out.push(StreamSnapshot {
                forward: f.name.clone(),
                pod: s.pod.get().map(|p| p.name.clone()),
                port: s.port,
                peer: s.peer,
                age: s.age(),
                bytes: f.directed(&s),
                rate: [s.rate[UP].load(Relaxed), s.rate[DOWN].load(Relaxed)],
            });
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.age));
    out
}

/// A label value in the text exposition: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The per-pod families of every `--spread` forward, in the text exposition format: each
/// family's `# HELP` and `# TYPE` always (a process without such a forward exports them empty),
/// then one series per pod the forward still knows (and per outcome or direction).
pub fn render_pods(out: &mut String) {
    struct Row {
        forward: Arc<str>,
        pod: Arc<PodInner>,
        /// Finished plus open bytes, exported directions.
        bytes: [u64; 2],
    }
    let mut rows = Vec::new();
    for f in forwards() {
        let pods: Vec<Arc<PodInner>> = lock(&f.pods).values().cloned().collect();
        if pods.is_empty() {
            continue;
        }
        // Under the lock streams leave it by: each byte is either open or finished here.
        let open = lock(&f.open);
        for pod in pods {
            let mut bytes = [
                pod.finished[UP].load(Relaxed),
                pod.finished[DOWN].load(Relaxed),
            ];
            for s in open.values() {
                if s.pod.get().is_some_and(|p| Arc::ptr_eq(p, &pod)) {
                    let b = f.directed(s);
                    bytes[UP] += b[UP];
                    bytes[DOWN] += b[DOWN];
                }
            }
            rows.push(Row {
                forward: f.name.clone(),
                pod,
                bytes,
            });
        }
    }
    for name in POD_FAMILIES {
        let Some(def) = super::names::def(name) else {
            continue;
        };
        let kind = match def.kind {
            super::names::Kind::Counter => "counter",
            _ => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", def.help);
        for r in &rows {
            let labels = format!(
                "{L_FORWARD}=\"{}\",{L_POD}=\"{}\"",
                label_value(&r.forward),
                label_value(&r.pod.name)
            );
            match *name {
                POD_CONNECTIONS => {
                    let n = r.pod.connections.load(Relaxed);
                    let _ = writeln!(out, "{name}{{{labels}}} {n}");
                }
                POD_CONNECTIONS_ACTIVE => {
                    let n = r.pod.active.load(Relaxed);
                    let _ = writeln!(out, "{name}{{{labels}}} {n}");
                }
                POD_CONNECTIONS_CLOSED => {
                    for (i, o) in OUTCOMES.iter().enumerate() {
                        let n = r.pod.closed[i].load(Relaxed);
                        let _ = writeln!(out, "{name}{{{labels},{L_OUTCOME}=\"{o}\"}} {n}");
                    }
                }
                POD_BYTES => {
                    for d in [UP, DOWN] {
                        let dir = DIRECTIONS[d];
                        let n = r.bytes[d];
                        let _ = writeln!(out, "{name}{{{labels},{L_DIRECTION}=\"{dir}\"}} {n}");
                    }
                }
                _ => {}
            }
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `family` for `forward` in the per-pod exposition, without the family name.
    fn series(forward: &str, family: &str) -> Vec<String> {
        let mut text = String::new();
        render_pods(&mut text);
        let fwd = format!("{L_FORWARD}=\"{}\"", label_value(forward));
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&fwd))
            .map(|l| l[family.len()..].replace(&fwd, "F"))
            .collect()
    }

    #[test]
    fn pods_are_exported_while_known_and_dropped_when_forgotten() {
        // A name of its own: every forward of the process is rendered.
        let name = "svc/\"quoted\"\nrender-test";
        let f = ForwardMetrics::new(name);
        let web_a = f.pod("web-a");
        let s = f.accept(None, 80);
        s.set_pod(&web_a);
        s.set_pod(&f.pod("web-b"));
        s.stats().add_up(100);
        s.stats().add_down(7);
        assert_eq!(
            series(name, POD_CONNECTIONS),
            ["{F,pod=\"web-a\"} 1", "{F,pod=\"web-b\"} 0"]
        );
        assert_eq!(
            series(name, POD_CONNECTIONS_ACTIVE)[0],
            "{F,pod=\"web-a\"} 1"
        );
        // Open streams' bytes count while they run, and once when they end.
        let bytes = [
            "{F,pod=\"web-a\",direction=\"up\"} 100",
            "{F,pod=\"web-a\",direction=\"down\"} 7",
        ];
        assert_eq!(series(name, POD_BYTES)[..2], bytes);
        s.finish(Outcome::ServerError, &"refused");
        assert_eq!(series(name, POD_BYTES)[..2], bytes);
        assert_eq!(
            series(name, POD_CONNECTIONS_ACTIVE)[0],
            "{F,pod=\"web-a\"} 0"
        );
        let closed = series(name, POD_CONNECTIONS_CLOSED);
        assert_eq!(closed.len(), 2 * OUTCOMES.len());
        assert!(closed.contains(&"{F,pod=\"web-a\",outcome=\"server_error\"} 1".to_string()));
        assert_eq!(f.sample_pods(), [("web-a".into(), 0), ("web-b".into(), 0)]);
        f.forget_pod("web-a");
        assert_eq!(series(name, POD_CONNECTIONS), ["{F,pod=\"web-b\"} 0"]);
        // Every family is declared, with or without series.
        let mut text = String::new();
        render_pods(&mut text);
        for family in POD_FAMILIES {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
    }
}
