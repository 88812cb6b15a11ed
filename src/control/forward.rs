//! The forwarder: local listeners, and which upstream session each new connection rides on.
//!
//! SPDY can carry every connection on one session, but the servers do no flow control, so one
//! client that stops reading would freeze them all: connections take sessions from a pool
//! ([`super::pool`]), one each while their clients send, set up ahead with a fresh single-use
//! URL from the runtime each. A session that died (or was retired because a failure on it may
//! have wedged a kubelet-style server) leaves the pool. WebSocket v4 fixes the ports at
//! upgrade, so every connection gets its own session. A connection that fails is reset and
//! logged; the forward itself keeps running. Past `--max-connections` open connections a new
//! one is reset as soon as it is accepted (one log line per second at most says why).
//!
//! A runtime or cluster target follows its pod ([`super::follow`]): while the pod is gone, new
//! connections wait for its replacement (within `--connect-timeout`), and when it goes, every
//! open connection is reset (never ended cleanly: what it carried may be cut short) and the
//! sessions to it are retired.
//!
//! A `--spread` forward ([`Upstream::Pods`]) first picks the pod of each new connection
//! ([`super::spread`]), then goes on as above with that pod's route: a connector and a pool of
//! its own, so that each pod has its own sessions. With no ready pod the connection is reset at
//! once.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore, watch};

use super::ControlError;
use super::cluster::{Cluster, Follow, Spreading};
use super::cri::CriClient;
use super::follow::{TargetCell, TargetState};
use super::pool::{Pool, PoolOptions, SessionFactory};
use super::spread::{Lease, NoPod, Route, RouteFactory, Spread, Tracked};
use super::upgrade::{Protocol, Upgraded, upgrade};
// Forwarder::new and bind take it: reachable from here too.
pub use super::target::PortSpec;
use crate::metrics::{ForwardMetrics, Outcome};
use crate::proto::portforward::SpdyPortForward;
use crate::proto::ws::WsPortForward;
use crate::proto::{ConnId, PortForwardProtocol};
use crate::relay::{
    ConnOutcome, LocalConn, LogThrottle, Session, SessionOptions, also, relay_opened_conn,
};
use crate::secret::{Secret, SecretUrl, redact_url};

/// Where sessions come from.
#[derive(Clone)]
pub enum Upstream {
    /// Ask a CRI runtime for a fresh streaming URL per session.
    Cri { endpoint: String, sandbox: String },
    /// A fixed stream-server URL (`ringfwd serve`, or a URL a runtime already handed out). It
    /// may hold a token in its path: `Debug` shows it redacted, and so must anything else.
    Url(String),
    /// A pod's `portforward` subresource on the API server. With `follow`, a pod that goes
    /// away is replaced as [`super::follow::follow_cluster`] says; without, the forward stays
    /// with `pod`.
    Api {
        cluster: Cluster,
        pod: String,
        follow: Option<Follow>,
    },
    /// `--spread`: the ready pods of a target, each connection to one of them
    /// ([`super::spread`]), followed as [`super::follow::follow_spread`] says.
    Pods {
        cluster: Cluster,
        spreading: Box<Spreading>,
    },
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Cri { endpoint, sandbox } => f
                .debug_struct("Cri")
                .field("endpoint", endpoint)
                .field("sandbox", sandbox)
                .finish(),
            Upstream::Url(url) => f.debug_tuple("Url").field(&redact_url(url)).finish(),
            Upstream::Api {
                cluster,
                pod,
                follow,
            } => f
                .debug_struct("Api")
                .field("cluster", cluster)
                .field("pod", pod)
                .field("follow", follow)
                .finish(),
            Upstream::Pods { cluster, spreading } => f
                .debug_struct("Pods")
                .field("cluster", cluster)
                .field("target", &spreading.target)
                .field("selector", &spreading.selector)
                .finish(),
        }
    }
}

/// Everything a forward needs.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub upstream: Upstream,
    pub protocol: Protocol,
    /// When the API server refuses the upgrade to [`Protocol::Tunnel`], use SPDY/3.1 instead
    /// (what kubectl 1.31+ does against servers older than 1.30).
    pub fallback_to_spdy: bool,
    pub addresses: Vec<IpAddr>,
    /// Sent as `Authorization: Bearer` to an [`Upstream::Url`] (a `ringfwd serve` with a token
    /// whose URL does not carry it). CRI URLs carry their own token, the API server takes the
    /// kubeconfig's credentials.
    pub bearer: Option<Secret>,
    pub session: SessionOptions,
    /// Sessions of a multiplexed protocol (SPDY, the tunnel): see [`super::pool`].
    pub pool: PoolOptions,
    /// Where this forward's connections and sessions are counted (named after the forward).
    pub metrics: ForwardMetrics,
}

/// A bound local port and where it forwards to.
pub struct Listener {
    pub tcp: TcpListener,
    pub local: SocketAddr,
    pub remote: u16,
}

/// Sets up sessions: asks the runtime for a URL (or the API server for an upgrade), upgrades,
/// and picks the protocol and options each session runs with.
struct Connector {
    cfg: ForwardConfig,
    cri: Option<Mutex<CriClient>>,
    remote_ports: Vec<u16>,
    /// The protocol in use: the configured one, or SPDY after a fallback (shared by the
    /// connectors of a `--spread` forward's pods: one fallback is enough).
    protocol: Arc<std::sync::Mutex<Protocol>>,
    sessions_started: Arc<AtomicU64>,
    /// The pod (sandbox) sessions go to now, for a target that follows its pod.
    target: Option<TargetCell>,
}

/// The way to one pod of a `--spread` forward: a connector for it, and its own session pool
/// (multiplexed protocols).
pub struct PodRoute {
    connector: Arc<Connector>,
    pool: Option<Pool>,
}

impl PodRoute {
    /// The route to `pod` (of the forward `main` sets sessions up for), whose ports are
    /// `ports`; with `warm`, its pool starts setting sessions up now.
    fn new(main: &Connector, pod: &str, ports: &[u16], warm: bool) -> PodRoute {
        let Upstream::Pods { cluster, .. } = &main.cfg.upstream else {
            unreachable!("pod routes belong to a --spread forward");
        };
        let cfg = ForwardConfig {
            upstream: Upstream::Api {
                cluster: cluster.clone(),
                pod: pod.to_string(),
                follow: None,
            },
            protocol: main.cfg.protocol,
            fallback_to_spdy: main.cfg.fallback_to_spdy,
            addresses: main.cfg.addresses.clone(),
            bearer: None,
            session: main.cfg.session.clone(),
            pool: main.cfg.pool,
            metrics: main.cfg.metrics.clone(),
        };
        let connector = Arc::new(Connector {
            cfg,
            cri: None,
            remote_ports: ports.to_vec(),
            protocol: main.protocol.clone(),
            sessions_started: main.sessions_started.clone(),
            target: None,
        });
        let pool = connector.protocol().multiplexed().then(|| {
            let c = connector.clone();
            let make: SessionFactory = Arc::new(move || Box::pin(c.clone().new_session()));
            Pool::new(connector.cfg.pool, make)
        });
        if let (Some(p), true) = (&pool, warm) {
            p.warm_up();
        }
        PodRoute { connector, pool }
    }
}

impl Route for PodRoute {
    fn close(&self, why: &str) {
        if let Some(p) = &self.pool {
            p.close(why);
        }
    }
}

pub struct Forwarder {
    connector: Arc<Connector>,
    /// Multiplexed protocols only; WebSocket v4 sets a session up per connection. `None` for
    /// `--spread`, whose pods have a pool each.
    pool: Option<Pool>,
    /// `--spread`: the target's pods.
    spread: Option<Arc<Spread<PodRoute>>>,
    sessions_retired: AtomicU64,
    stalls: watch::Receiver<usize>,
    /// One permit per open connection (`--max-connections`).
    conn_permits: Arc<Semaphore>,
    /// Connections refused for want of room: at `--max-connections`, or every session at its
    /// stream limit.
    /// Refusals are logged at most once a second (see [`LogThrottle`]).
    refusals: LogThrottle,
    /// Connections being relayed, so that they can be reset when their pod goes away.
    open: std::sync::Mutex<HashMap<u64, (Session, ConnId)>>,
    next_open: AtomicU64,
    /// The follower and the task that reacts to a lost pod; aborted with the forwarder.
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A connection in [`Forwarder::open`] for as long as it is relayed.
struct OpenGuard<'a>(&'a Forwarder, u64);

/// A relayed connection in the list it is reset from when its pod goes away: the forward's
/// own, or its pod's (`--spread`). Held for its `Drop`.
struct Open<'a> {
    _forward: Option<OpenGuard<'a>>,
    _pod: Option<Tracked<'a, PodRoute>>,
}

/// Where a connection goes, for log lines: `port 80`, or `pod web-a port 8080` (`--spread`).
struct To<'a>(Option<&'a Lease<PodRoute>>, u16);

impl fmt::Display for To<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(l) => write!(f, "pod {} port {}", l.pod().name, l.port),
            None => write!(f, "port {}", self.1),
        }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.open_conns().remove(&self.1);
    }
}

impl Connector {
    fn protocol(&self) -> Protocol {
        *self.protocol.lock().expect("protocol lock")
    }

    /// `pod`: the pod (sandbox id) to go to, for an API or runtime target.
    async fn upgrade_with(
        &self,
        protocol: Protocol,
        ports: &[u16],
        pod: &str,
    ) -> Result<Upgraded, ControlError> {
        match &self.cfg.upstream {
            Upstream::Api { cluster, .. } | Upstream::Pods { cluster, .. } => {
                cluster.upgrade(pod, protocol, ports).await
            }
            Upstream::Url(_) => {
                let url = self.url(ports, pod).await?;
                upgrade(&url, protocol, ports, self.cfg.bearer.as_ref()).await
            }
            // The runtime's URL is the credential; a bearer meant for a serve stays here.
            Upstream::Cri { .. } => {
                upgrade(&self.url(ports, pod).await?, protocol, ports, None).await
            }
        }
    }

    /// The pod (sandbox) to set a session up to and its generation: the current one (waiting
    /// while there is none), or the configured one for a target that does not follow.
    async fn target(&self) -> (String, u64) {
        match (&self.target, &self.cfg.upstream) {
            (Some(cell), _) => cell.ready().await,
            (None, Upstream::Cri { sandbox, .. }) => (sandbox.clone(), 0),
            (None, Upstream::Api { pod, .. }) => (pod.clone(), 0),
            (None, Upstream::Url(_)) => (String::new(), 0),
            // Its pods' connectors are `Api` ones, each with its pod.
            (None, Upstream::Pods { .. }) => unreachable!("a --spread forward's own connector"),
        }
    }

    /// Upgrade a new connection, falling back from the tunnel to SPDY/3.1 when configured to
    /// and the server answers the tunnel with anything but `101`.
    async fn upgrade(
        &self,
        ports: &[u16],
        pod: &str,
    ) -> Result<(Upgraded, Protocol), ControlError> {
        let protocol = self.protocol();
        match self.upgrade_with(protocol, ports, pod).await {
            Err(e @ (ControlError::ApiRejected { .. } | ControlError::Rejected { .. }))
                if protocol == Protocol::Tunnel && self.cfg.fallback_to_spdy =>
            {
                tracing::debug!("{e}; falling back to SPDY/3.1");
                let up = self.upgrade_with(Protocol::Spdy, ports, pod).await?;
                *self.protocol.lock().expect("protocol lock") = Protocol::Spdy;
                Ok((up, Protocol::Spdy))
            }
            r => r.map(|up| (up, protocol)),
        }
    }

    async fn url(&self, ports: &[u16], sandbox: &str) -> Result<SecretUrl, ControlError> {
        match &self.cfg.upstream {
            Upstream::Url(u) => Ok(SecretUrl::new(u.clone())),
            Upstream::Cri { .. } => {
                let cri = self.cri.as_ref().expect("CRI upstream has a client");
                Ok(cri.lock().await.port_forward(sandbox, ports).await?)
            }
            Upstream::Api { .. } | Upstream::Pods { .. } => {
                unreachable!("the API server has no stream-server URL")
            }
        }
    }

    /// Upgrade for `ports` and pick the protocol and options the session will run with.
    async fn prepare_session(
        &self,
        ports: &[u16],
    ) -> Result<(Upgraded, Box<dyn PortForwardProtocol>, SessionOptions, u64), ControlError> {
        let (up, protocol, setup, generation) = loop {
            let (pod, generation) = self.target().await;
            let setup = Instant::now();
            let (up, protocol) = self.upgrade(ports, &pod).await.inspect_err(|_| {
                self.cfg
                    .metrics
                    .session_setup_failed(self.protocol().label());
                // A sandbox or pod that vanished fails setups first: have it checked now.
                if let Some(cell) = &self.target {
                    cell.suspect();
                }
            })?;
            match &self.target {
                // The pod went away (or was replaced) while this was set up: not to it.
                Some(cell) if !cell.is_current(generation) => {
                    tracing::debug!("session set up to a pod that went away meanwhile; again");
                    continue;
                }
                _ => break (up, protocol, setup, generation),
            }
        };
        let proto: Box<dyn PortForwardProtocol> = match protocol {
            Protocol::Spdy | Protocol::Tunnel if up.half_close => {
                Box::new(SpdyPortForward::client().with_immediate_eof())
            }
            Protocol::Spdy | Protocol::Tunnel => Box::new(SpdyPortForward::client()),
            Protocol::Websocket => {
                let mut seed = [0u8; 8];
                getrandom::fill(&mut seed).expect("OS randomness");
                Box::new(WsPortForward::client(ports, u64::from_le_bytes(seed)))
            }
        };
        let mut opts = self.cfg.session.clone();
        opts.forward_half_close = up.half_close;
        opts.metrics = self
            .cfg
            .metrics
            .session_set_up(protocol.label(), setup.elapsed());
        self.sessions_started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("new {} session", protocol.name());
        Ok((up, proto, opts, generation))
    }

    /// A session for every remote port of the forward (multiplexed protocols).
    async fn new_session(self: Arc<Self>) -> Result<Session, ControlError> {
        let (up, proto, opts, generation) = self.prepare_session(&self.remote_ports).await?;
        let (session, _incoming) = Session::start(up.io, up.prefix, proto, opts);
        if let Some(cell) = &self.target {
            // A session set up just before its pod went away may reach the pool after the
            // forwarder retired the others: it retires itself when the pod changes.
            let mut state = cell.subscribe();
            let mut dead = session.watch_dead();
            let s = session.clone();
            tokio::spawn(async move {
                let moved_on = |st: &TargetState| !matches!(st, TargetState::Ready { generation: g, .. } if *g == generation);
                tokio::select! {
                    _ = state.wait_for(moved_on) => s.retire(),
                    _ = dead.wait_for(|d| d.is_some()) => {}
                }
            });
        }
        Ok(session)
    }
}

impl Forwarder {
    /// Connect to the runtime and prove the target works by setting up a first session, so a
    /// wrong sandbox or an unreachable endpoint fails here, with one line, not on first use.
    pub async fn new(
        mut cfg: ForwardConfig,
        specs: &[PortSpec],
    ) -> Result<Arc<Self>, ControlError> {
        // What follows the pod, started once the first session works.
        let mut follower: Option<futures_util::future::BoxFuture<'static, ()>> = None;
        let (cri, target) = match &cfg.upstream {
            Upstream::Cri { endpoint, sandbox } => {
                let mut cri = CriClient::connect(endpoint).await?;
                // The pod it belongs to, to find its sandbox again when this one goes.
                let status = cri.pod_sandbox_status(sandbox).await?;
                let cell = TargetCell::new(&status.id, cfg.metrics.clone());
                if !status.name.is_empty() {
                    follower = Some(Box::pin(super::follow::follow_sandbox(
                        cri.clone(),
                        cell.clone(),
                        status.name,
                        status.namespace,
                    )));
                }
                (Some(Mutex::new(cri)), Some(cell))
            }
            Upstream::Api {
                cluster,
                pod,
                follow: Some(follow),
            } => {
                let cell = TargetCell::new(pod, cfg.metrics.clone());
                follower = Some(Box::pin(super::follow::follow_cluster(
                    cluster.clone(),
                    follow.clone(),
                    cell.clone(),
                )));
                (None, Some(cell))
            }
            Upstream::Url(_) | Upstream::Api { .. } | Upstream::Pods { .. } => (None, None),
        };
        let mut remote_ports: Vec<u16> = specs.iter().map(|s| s.remote).collect();
        remote_ports.sort_unstable();
        remote_ports.dedup();
        let (stalls_tx, stalls) = watch::channel(0);
        cfg.session.stalls = Some(Arc::new(stalls_tx));
        let connector = Arc::new(Connector {
            protocol: Arc::new(std::sync::Mutex::new(cfg.protocol)),
            cfg,
            cri,
            remote_ports,
            sessions_started: Arc::new(AtomicU64::new(0)),
            target,
        });
        let spread = match &connector.cfg.upstream {
            Upstream::Pods { cluster, spreading } => {
                let spread = Self::spread(&connector, spreading).await?;
                follower = Some(Box::pin(super::follow::follow_spread(
                    cluster.clone(),
                    (**spreading).clone(),
                    spread.clone(),
                )));
                Some(spread)
            }
            _ => None,
        };
        let pool = spread.is_none() && connector.protocol().multiplexed();
        let pool = pool.then(|| {
            let c = connector.clone();
            let make: SessionFactory = Arc::new(move || Box::pin(c.clone().new_session()));
            Pool::new(connector.cfg.pool, make)
        });
        match &pool {
            Some(pool) => pool.start().await?,
            // Each WebSocket connection gets its own session, and an upgrade already dials the
            // target: only check that the runtime answers. (The API server was asked for the
            // pod when the target was resolved; a --spread forward's pods were started above.)
            None if !matches!(
                connector.cfg.upstream,
                Upstream::Api { .. } | Upstream::Pods { .. }
            ) =>
            {
                let (sandbox, _) = connector.target().await;
                connector.url(&connector.remote_ports, &sandbox).await?;
            }
            None => {}
        }
        let max_connections = connector.cfg.pool.max_connections;
        let mut tasks = Vec::new();
        if let Some(f) = follower {
            tasks.push(tokio::spawn(f).abort_handle());
        }
        Ok(Arc::new_cyclic(|me: &std::sync::Weak<Forwarder>| {
            if let Some(cell) = &connector.target {
                tasks.push(
                    tokio::spawn(Self::on_target_lost(me.clone(), cell.subscribe())).abort_handle(),
                );
            }
            Forwarder {
                connector,
                pool,
                spread,
                sessions_retired: AtomicU64::new(0),
                stalls,
                open: Default::default(),
                next_open: AtomicU64::new(1),
                conn_permits: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
                refusals: LogThrottle::default(),
                tasks,
            }
        }))
    }

    /// The pod set of a `--spread` forward (its connector is `main`), seeded with the pods the
    /// target had when resolved; the first session of each ready pod is set up now, so that a
    /// target that cannot work at all (a refused port-forward) fails here, with its error.
    /// Pods that fail while others work are logged and go on trying.
    async fn spread(
        main: &Arc<Connector>,
        spreading: &Spreading,
    ) -> Result<Arc<Spread<PodRoute>>, ControlError> {
        // Pods added later start warming their pool at once; the first ones start below.
        let seeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let make: RouteFactory<PodRoute> = {
            let (main, seeded) = (main.clone(), seeded.clone());
            Box::new(move |pod, ports| {
                PodRoute::new(&main, pod, ports, seeded.load(Ordering::Relaxed))
            })
        };
        let spread = Arc::new(Spread::new(
            &spreading.target.to_string(),
            main.cfg.metrics.clone(),
            make,
        ));
        let views: Vec<_> = spreading
            .pods
            .iter()
            .map(|p| super::follow::pod_view(spreading, p))
            .collect();
        spread.seed(&views);
        seeded.store(true, Ordering::Relaxed);
        let pods = spread.pods();
        let started = futures_util::future::join_all(pods.iter().map(|p| async move {
            match &p.route.pool {
                Some(pool) => pool.start().await,
                None => Ok(()),
            }
        }))
        .await;
        if !pods.is_empty() && started.iter().all(Result::is_err) {
            let first = started.into_iter().find_map(Result::err);
            return Err(first.expect("one failed"));
        }
        for (pod, r) in pods.iter().zip(started) {
            if let (Err(e), Some(pool)) = (r, &pod.route.pool) {
                tracing::warn!("pod {}: cannot set up a session: {e}", pod.name);
                // Keep trying in the background (with the pool's backoff).
                pool.warm_up();
            }
        }
        Ok(spread)
    }

    /// A `--spread` forward's ready pods now, in name order (`None` for other forwards).
    pub fn ready_pods(&self) -> Option<Vec<String>> {
        self.spread.as_ref().map(|s| s.ready())
    }

    /// Each time the pod goes away: reset every open connection (what it carried may be cut
    /// short, so its client must not see a clean end) and retire every session to it.
    async fn on_target_lost(
        me: std::sync::Weak<Forwarder>,
        mut state: watch::Receiver<TargetState>,
    ) {
        loop {
            if state
                .wait_for(|s| matches!(s, TargetState::Waiting { .. }))
                .await
                .is_err()
            {
                return;
            }
            let Some(fwd) = me.upgrade() else { return };
            let open: Vec<(Session, ConnId)> = fwd.open_conns().values().cloned().collect();
            if !open.is_empty() {
                tracing::warn!(
                    forward = fwd.connector.cfg.metrics.name(),
                    "resetting {} open connection(s): their pod went away",
                    open.len()
                );
            }
            for (session, conn) in open {
                session.reset(conn);
            }
            for session in fwd.sessions() {
                session.retire();
            }
            drop(fwd);
            if state
                .wait_for(|s| matches!(s, TargetState::Ready { .. }))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn open_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Session, ConnId)>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the forward goes now: the pod (sandbox id) and whether it waits for a new one.
    /// `None` for a target that does not follow its pod (a URL).
    pub fn target(&self) -> Option<watch::Receiver<TargetState>> {
        self.connector.target.as_ref().map(TargetCell::subscribe)
    }

    /// The protocol sessions are opened with.
    pub fn protocol(&self) -> Protocol {
        self.connector.protocol()
    }

    /// Upstream sessions this forwarder has opened so far.
    pub fn sessions_started(&self) -> u64 {
        self.connector.sessions_started.load(Ordering::Relaxed)
    }

    /// Sessions retired after a connection failure that could wedge a kubelet-style server.
    pub fn sessions_retired(&self) -> u64 {
        self.sessions_retired.load(Ordering::Relaxed)
    }

    /// The pooled sessions taking new connections (none for WebSocket v4), of every pod for
    /// `--spread`.
    pub fn sessions(&self) -> Vec<Session> {
        let mut out = self.pool.as_ref().map(Pool::sessions).unwrap_or_default();
        for pod in self.spread.iter().flat_map(|s| s.pods()) {
            out.extend(
                pod.route
                    .pool
                    .as_ref()
                    .map(Pool::sessions)
                    .unwrap_or_default(),
            );
        }
        out
    }

    /// How many of this forward's sessions are stalled right now: their reader waits for a
    /// local client that does not read (see [`SessionOptions::stalls`]).
    pub fn stalls(&self) -> watch::Receiver<usize> {
        self.stalls.clone()
    }

    /// Bind every `spec` on every configured address. `:REMOTE` picks one free port and uses it
    /// on all addresses.
    pub async fn bind(&self, specs: &[PortSpec]) -> Result<Vec<Listener>, ControlError> {
        for ip in self
            .connector
            .cfg
            .addresses
            .iter()
            .filter(|ip| ip.is_unspecified())
        {
            tracing::warn!(
                "listening on {ip}, a wildcard address: the forward is reachable from other \
                 machines, not only this one"
            );
        }
        let mut out = Vec::new();
        for spec in specs {
            let mut local = spec.local;
            for ip in &self.connector.cfg.addresses {
                let addr = SocketAddr::new(*ip, local);
                let tcp = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ControlError::Listen {
                        addr: addr.to_string(),
                        source,
                    })?;
                let bound = tcp.local_addr().map_err(|source| ControlError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
                local = bound.port();
                out.push(Listener {
                    tcp,
                    local: bound,
                    remote: spec.remote,
                });
            }
        }
        Ok(out)
    }

    /// Accept on `l` until dropped (dropping it closes the port), relaying each connection on
    /// its own task; past `--max-connections` open ones, a new one is reset at once.
    pub async fn serve_listener(self: Arc<Self>, l: Listener) {
        let mut errors = crate::relay::AcceptErrors::default();
        let mut accepter = crate::relay::Accepter::new(&l.tcp);
        loop {
            let (tcp, peer) = match accepter.accept().await {
                Ok(accepted) => {
                    errors.accepted();
                    accepted
                }
                // Out of file descriptors and the like: transient, keep the forward up.
                Err(e) => {
                    errors.failed(&l.local, &e).await;
                    continue;
                }
            };
            match self.conn_permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let fwd = self.clone();
                    tokio::spawn(async move {
                        let outcome = fwd.handle(tcp, peer, l.remote).await;
                        drop(permit);
                        outcome
                    });
                }
                Err(_) => self.over_limit(tcp, peer, l.remote),
            }
        }
    }

    /// A connection past `--max-connections`: reset it now, count it, and say why (at most
    /// once per [`crate::relay::LOG_EVERY`]).
    fn over_limit(&self, tcp: LocalConn, peer: SocketAddr, remote: u16) {
        let max = self.connector.cfg.pool.max_connections;
        let stream = self.connector.cfg.metrics.accept(Some(peer), remote);
        crate::relay::backend::reset_on_close(&tcp);
        drop(tcp);
        let why = format!("{max} connections open (--max-connections {max})");
        if let Some(n) = self.refusals.count(Instant::now()) {
            tracing::warn!(
                "connection from {peer} to port {remote} reset: {why}{}",
                also(n)
            );
        }
        stream.finish(Outcome::OverLimit, &why);
    }

    /// Relay one accepted connection; returns how it ended.
    pub async fn handle(
        &self,
        tcp: impl Into<LocalConn>,
        peer: SocketAddr,
        remote: u16,
    ) -> ConnOutcome {
        let tcp: LocalConn = tcp.into();
        tracing::debug!("handling connection from {peer} for port {remote}");
        // Counted from here, so that a shutdown also waits for (and then cuts) connections
        // still waiting for a session.
        let drain = self.connector.cfg.session.drain.clone();
        let _open = drain.as_ref().map(|d| d.track());
        let cut = async {
            match &drain {
                Some(d) => d.cut().await,
                None => std::future::pending().await,
            }
        };
        let stream = self.connector.cfg.metrics.accept(Some(peer), remote);
        // A --spread forward picks the pod first: its route, and its own port.
        let pod = match &self.spread {
            None => None,
            Some(spread) => match spread.pick(remote) {
                Ok(lease) => {
                    stream.set_pod(lease.pod().metrics());
                    Some(lease)
                }
                Err(e) => return self.no_pod(tcp, peer, remote, stream, e),
            },
        };
        let (connector, pool, port) = match &pod {
            Some(l) => (
                &l.pod().route.connector,
                l.pod().route.pool.as_ref(),
                l.port,
            ),
            None => (&self.connector, self.pool.as_ref(), remote),
        };
        let to = To(pod.as_ref(), remote);
        let timeout = self.connector.cfg.pool.connect_timeout;
        // While the pod is gone, a new connection waits here for the next one (and its
        // session), all within `--connect-timeout`.
        // Waiting for a session is boxed: inline, its state (the pool's checkout, a session
        // setup) would make this future, which every open connection keeps for its whole
        // life, about 1 KiB larger than relaying needs.
        let (session, outcome) = match pool {
            Some(pool) => match Box::pin(async {
                tokio::select! {
                    r = tokio::time::timeout(timeout, async {
                        let generation = self.ready_generation().await;
                        pool.checkout(port).await.map(|c| (c, generation))
                    }) => r.unwrap_or(Err(ControlError::SetupTimeout(timeout))),
                    () = cut => Err(ControlError::ShuttingDown),
                }
            })
            .await
            {
                Ok(((lease, conn, inbound), generation)) => {
                    let s = lease.session().clone();
                    let _open = self.track(pod.as_ref(), &s, conn, generation);
                    let outcome = relay_opened_conn(&s, tcp, conn, inbound, lease, stream).await;
                    (s, outcome)
                }
                Err(ControlError::ShuttingDown) => {
                    crate::relay::backend::reset_on_close(&tcp);
                    stream.finish(Outcome::Shutdown, &"no session yet at shutdown");
                    return ConnOutcome::Shutdown;
                }
                Err(e @ ControlError::StreamLimit { .. }) => {
                    crate::relay::backend::reset_on_close(&tcp);
                    if let Some(n) = self.refusals.count(Instant::now()) {
                        tracing::warn!("connection from {peer} to {to} reset: {e}{}", also(n));
                    }
                    return ConnOutcome::SessionLost(e.to_string());
                }
                Err(e) => return self.no_session(tcp, peer, &to, e.to_string()),
            },
            None => {
                // One session per connection, the connection open before the server can
                // answer.
                let prepared = Box::pin(tokio::time::timeout(
                    timeout,
                    connector.prepare_session(&[port]),
                ))
                .await
                .unwrap_or(Err(ControlError::SetupTimeout(timeout)));
                let started = match prepared {
                    Ok((up, proto, opts, generation)) => {
                        Session::start_with_conn(up.io, up.prefix, proto, opts, port)
                            .map(|s| (s, generation))
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                };
                match started {
                    Ok(((s, conn, inbound), generation)) => {
                        let open = self.track(pod.as_ref(), &s, conn, generation);
                        let outcome = relay_opened_conn(&s, tcp, conn, inbound, (), stream).await;
                        drop(open);
                        s.close();
                        (s, outcome)
                    }
                    Err(e) => return self.no_session(tcp, peer, &to, e),
                }
            }
        };
        match &outcome {
            ConnOutcome::Clean { .. } => {
                tracing::debug!("connection from {peer} to {to}: {outcome}")
            }
            ConnOutcome::RemoteError { sent, .. } => {
                tracing::warn!("connection from {peer} to {to} failed, reset it: {outcome}");
                // The relay retired the session already if this can have wedged it (see
                // relay::conn); count it.
                if *sent > 0 && !session.forward_half_close() && pool.is_some() {
                    self.sessions_retired.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Counted in the one line the shutdown ends with.
            ConnOutcome::Shutdown => {
                tracing::debug!("connection from {peer} to {to} reset: {outcome}")
            }
            _ => tracing::warn!("connection from {peer} to {to} reset: {outcome}"),
        }
        let pod_failed = matches!(
            outcome,
            ConnOutcome::RemoteError { .. } | ConnOutcome::SessionLost(_)
        );
        if pod_failed && let Some(cell) = &self.connector.target {
            // A pod that went away fails connections first: have it checked now.
            cell.suspect();
        }
        if let Some(lease) = &pod {
            lease.ended(pod_failed || matches!(outcome, ConnOutcome::Upstream(_)));
        }
        outcome
    }

    /// Wait for a pod to go to (a target that follows its pod); its generation.
    async fn ready_generation(&self) -> u64 {
        match &self.connector.target {
            Some(cell) => cell.ready().await.1,
            None => 0,
        }
    }

    /// Count `conn` among the open connections while the guard lives, so that it is reset
    /// when its pod goes away; if that happened since `generation` (or since its pod was
    /// picked, `--spread`), reset it now.
    fn track<'a>(
        &'a self,
        pod: Option<&'a Lease<PodRoute>>,
        session: &Session,
        conn: ConnId,
        generation: u64,
    ) -> Open<'a> {
        if let Some(lease) = pod {
            return Open {
                _forward: None,
                _pod: Some(lease.track(session, conn)),
            };
        }
        let id = self.next_open.fetch_add(1, Ordering::Relaxed);
        self.open_conns().insert(id, (session.clone(), conn));
        if let Some(cell) = &self.connector.target
            && !cell.is_current(generation)
        {
            session.reset(conn);
        }
        Open {
            _forward: Some(OpenGuard(self, id)),
            _pod: None,
        }
    }

    fn no_session(&self, tcp: LocalConn, peer: SocketAddr, to: &To, e: String) -> ConnOutcome {
        if let Some(cell) = &self.connector.target {
            cell.suspect();
        }
        if let Some(lease) = to.0 {
            lease.ended(true);
        }
        tracing::error!("connection from {peer} to {to}: cannot open upstream session: {e}");
        crate::relay::backend::reset_on_close(&tcp);
        ConnOutcome::SessionLost(e)
    }

    /// A `--spread` forward has no pod for a new connection: reset it now, and say why (at
    /// most once per [`crate::relay::LOG_EVERY`]).
    fn no_pod(
        &self,
        tcp: LocalConn,
        peer: SocketAddr,
        remote: u16,
        stream: crate::metrics::Stream,
        e: NoPod,
    ) -> ConnOutcome {
        crate::relay::backend::reset_on_close(&tcp);
        drop(tcp);
        if let Some(n) = self.refusals.count(Instant::now()) {
            tracing::warn!(
                "connection from {peer} to port {remote} reset: {e}{}",
                also(n)
            );
        }
        stream.finish(Outcome::SessionLost, &e);
        ConnOutcome::SessionLost(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::LOG_EVERY;
    use std::time::Duration;

    #[test]
    fn refusals_are_logged_once_a_second_with_a_count() {
        let r = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(r.count(t0), Some(1));
        assert_eq!(r.count(t0 + Duration::from_millis(10)), None);
        assert_eq!(r.count(t0 + Duration::from_millis(20)), None);
        assert_eq!(r.count(t0 + LOG_EVERY), Some(3));
        assert_eq!(also(1), "");
        assert_eq!(also(3), " (and 2 more since the last such line)");
    }

    /// `{:?}` of a forward's configuration shows neither a token in the URL nor the bearer.
    #[test]
    fn config_debug_hides_secrets() {
        let cfg = ForwardConfig {
            upstream: Upstream::Url("http://127.0.0.1:1/portforward/url-token-0123456789".into()),
            protocol: Protocol::Spdy,
            fallback_to_spdy: false,
            addresses: vec![],
            bearer: Some(Secret::generate()),
            session: SessionOptions::default(),
            pool: PoolOptions::default(),
            metrics: ForwardMetrics::detached(),
        };
        let bearer = cfg.bearer.as_ref().unwrap().expose().to_string();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("url-token"), "{shown}");
        assert!(!shown.contains(&bearer), "{shown}");
        assert!(
            shown.contains("http://127.0.0.1:1/portforward/[redacted]"),
            "{shown}"
        );
        assert!(shown.contains("bearer: Some([redacted])"), "{shown}");
    }
}
