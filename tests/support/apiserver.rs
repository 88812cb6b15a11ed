//! A small, in-process fake Kubernetes API server that real `kubectl` (v1.32) accepts for
//! `kubectl get` and `kubectl port-forward`, and that proxies `pods/portforward` to a real
//! port-forward stream server the way kube-apiserver and kubelet do.
//!
//! Owns: an HTTPS listener on `127.0.0.1:0` with a private CA (serving certificate, client
//! certificates it mints); a background thread running its own multi-thread tokio runtime; an
//! in-memory object store of generic JSON objects with realistic builders (pods, services with
//! their Endpoints and EndpointSlice, deployments with a ReplicaSet, statefulsets); a temp dir
//! of kubeconfigs, credential plugins and kubectl caches; and any `ringfwd serve` backends it
//! was asked to start. Dropping it stops all of that. It never touches `~/.kube`.
//!
//! What it mimics (from the Kubernetes sources, not copied):
//! - Authentication: bearer tokens or x509 client certificates signed by its CA, anonymous auth
//!   off (`401` with an `Unauthorized` Status). Authorisation: a second token authenticates a
//!   "viewer" that may read everything but may not use `pods/portforward` (RBAC-style `403`).
//! - Legacy discovery (`/api`, `/apis`, APIResourceLists with short names and categories).
//!   kubectl 1.32 asks for aggregated discovery first; a plain `application/json` answer makes
//!   it fall back to legacy discovery.
//! - GET, LIST (label and field selectors) and WATCH of the stored objects.
//! - `pods/portforward` as kube-apiserver 1.30+ serves it (`pkg/registry/core/pod/rest`):
//!   * any upgrade request goes through the upgrade-aware proxy
//!     (`apimachinery/pkg/util/proxy/upgradeaware.go`): the request is re-sent to the backend
//!     (the kubelet/CRI stream server), a refusal (`>= 400`) is relayed verbatim, another
//!     non-`101` becomes a `500`, and after a `101` (relayed with the backend's headers) bytes
//!     are copied both ways until *either* direction ends, then both connections are closed
//!     (the real proxy does not pass a half-close on);
//!   * a WebSocket upgrade offering `SPDY/3.1+portforward.k8s.io` (KEP-4006) goes through the
//!     tunnelling handler (`apiserver/pkg/util/proxy/streamtunnel.go`): the backend is upgraded
//!     with plain SPDY first and only then is the client answered `101` with the tunnel
//!     subprotocol; binary WebSocket messages then carry the raw SPDY byte stream both ways.
//!
//! With [`ApiOptions::tunnel`] off it behaves like a pre-1.30 API server: the tunnel request is
//! relayed to the backend like any other upgrade, the backend refuses it, and kubectl falls back
//! to plain SPDY (its fallback condition is "the WebSocket upgrade failed").
//!
//! Deliberate simplifications: objects are only written by the test (no create/update/delete
//! over HTTP: `405`); server-side Tables (kubectl's human-readable `get`) for pods only, other
//! kinds answer with the plain object and kubectl prints NAME and AGE; no aggregated discovery;
//! a pod that is not Running is still proxied (kubectl refuses such pods itself; a real kubelet
//! would fail later).

// Protocol paths return `Err(Response)`: the HTTP answer itself. Its size is irrelevant here.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use ringfwd::proto::ws::frame::{Message, Opcode, Role, WsCodec, encode_frame};
use ringfwd::proto::ws::handshake::accept_key;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

/// The kubectl under test.
pub const KUBECTL: &str = "/usr/bin/kubectl";
/// User a good token authenticates as (may do anything).
pub const ADMIN_USER: &str = "ringfwd-admin";
/// User the "forbidden" token authenticates as (may read, may not port-forward).
pub const VIEWER_USER: &str = "ringfwd-viewer";
/// Common name of the client certificates [`Auth::ClientCert`] mints.
pub const CLIENT_CERT_USER: &str = "ringfwd-cert-user";
/// `spec.nodeName` of scheduled pods.
pub const NODE_NAME: &str = "ringfwd-node";
/// Image of the containers the builders make.
const IMAGE: &str = "ringfwd.test/target:1";
/// The KEP-4006 WebSocket subprotocol prefix (`SPDY/3.1+portforward.k8s.io`).
const TUNNEL_PREFIX: &str = "SPDY/3.1+";
/// Upgrade token of SPDY/3.1.
const SPDY_31: &str = "SPDY/3.1";
/// Header naming the stream protocol of a SPDY upgrade.
const STREAM_PROTOCOL: &str = "x-stream-protocol-version";
/// How long a closing connection may take to flush its last bytes.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Copy buffer per direction of a spliced (plain upgrade) connection.
const SPLICE_BUFFER: usize = 64 * 1024;
/// Read size of the backend side of a tunnel (kube-apiserver copies with 32 KiB buffers).
const TUNNEL_READ: usize = 32 * 1024;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Server behaviour switches.
#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// Serve the KEP-4006 WebSocket tunnel, as kube-apiserver ≥ 1.30 does (default). `false`:
    /// behave like an older API server, relaying the tunnel request to the backend like any
    /// other upgrade; the backend refuses it and kubectl falls back to plain SPDY.
    pub tunnel: bool,
    /// Minor version `/version` reports. The gcloud kubectl at `/usr/bin/kubectl` is a
    /// dispatcher that runs `kubectl.1.<minor>` when it has one.
    pub minor_version: u32,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            tunnel: true,
            minor_version: 32,
        }
    }
}

/// How a kubeconfig written by [`ApiServer::kubeconfig`] authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The good bearer token, inline.
    Token,
    /// The viewer's token: reads work, `pods/portforward` is forbidden.
    ForbiddenToken,
    /// A token the server does not know: `401`.
    BadToken,
    /// No credentials at all: `401`.
    None,
    /// The good token through `tokenFile`.
    TokenFile,
    /// A freshly minted client certificate signed by the CA.
    ClientCert,
    /// An exec credential plugin (a shell script printing an `ExecCredential`).
    Exec,
    /// The good token, no CA, `insecure-skip-tls-verify: true`.
    InsecureToken,
    /// The `oidc` auth provider with a valid ID token from this server's issuer.
    Oidc,
    /// The `oidc` auth provider with an expired ID token and a refresh token: the client must
    /// refresh at the issuer (`/oidc` on this server) before the server accepts it.
    OidcExpired,
}

/// Where a pod's port-forward requests go (the pod's kubelet, in effect).
#[derive(Clone, Debug)]
pub enum Backend {
    /// Ask this CRI runtime for a fresh one-time streaming URL per request, as kubelet does.
    Cri { endpoint: String, sandbox: String },
    /// A fixed stream-server URL, e.g. a `ringfwd serve` (see [`ApiServer::serve_backend`]).
    Url(String),
    /// Not scheduled anywhere: no `spec.nodeName`, port-forward answers `400`.
    None,
}

/// How one `pods/portforward` request was handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PfKind {
    /// KEP-4006 WebSocket tunnel carrying SPDY.
    Tunnel,
    /// Plain SPDY/3.1 upgrade relayed to the backend.
    Spdy,
    /// A non-tunnel WebSocket upgrade (e.g. `v4.channel.k8s.io`) relayed to the backend.
    WebSocket,
    /// Refused with this HTTP status (by us or by the backend).
    Rejected(u16),
}

/// One `pods/portforward` request, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PfRecord {
    pub pod: String,
    pub namespace: String,
    pub kind: PfKind,
}

/// A controller that pods can name as their owner: kind, name, uid, and labels its pods carry
/// (e.g. `pod-template-hash` for a ReplicaSet's pods).
#[derive(Clone, Debug)]
pub struct Owner {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub uid: String,
    pub pod_labels: Vec<(String, String)>,
}

/// A pod for [`ApiServer::add_pod`]. Start from [`PodDef::new`] (Running, ready, namespace
/// `default`) and adjust with the builder methods or the public fields.
#[derive(Clone, Debug)]
pub struct PodDef {
    pub name: String,
    pub namespace: String,
    pub labels: Vec<(String, String)>,
    /// `(port name, containerPort)` of the pod's only container.
    pub container_ports: Vec<(Option<String>, u16)>,
    /// `status.phase`: `Running`, `Pending`, ...
    pub phase: String,
    pub ready: bool,
    pub backend: Backend,
    pub owner: Option<Owner>,
    /// Pod IP; one from 10.244.0.0/16 when unset.
    pub ip: Option<String>,
}

impl PodDef {
    pub fn new(name: &str, backend: Backend) -> PodDef {
        PodDef {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            labels: Vec::new(),
            container_ports: Vec::new(),
            phase: "Running".to_owned(),
            ready: true,
            backend,
            owner: None,
            ip: None,
        }
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_owned();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn port(mut self, name: Option<&str>, port: u16) -> Self {
        self.container_ports.push((name.map(str::to_owned), port));
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    pub fn owner(mut self, owner: &Owner) -> Self {
        self.owner = Some(owner.clone());
        self
    }

    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.to_owned());
        self
    }
}

/// A service's `targetPort`.
#[derive(Clone, Debug)]
pub enum IntOrString {
    Int(u16),
    Str(String),
}

/// One port of a service for [`ApiServer::add_service`].
#[derive(Clone, Debug)]
pub struct ServicePortDef {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: IntOrString,
}

impl ServicePortDef {
    pub fn new(name: Option<&str>, port: u16, target_port: IntOrString) -> ServicePortDef {
        ServicePortDef {
            name: name.map(str::to_owned),
            port,
            target_port,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The server handle
// ---------------------------------------------------------------------------------------------

/// A running fake API server. See the module documentation.
pub struct ApiServer {
    state: Arc<State>,
    pki: Pki,
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    files: AtomicU64,
}

impl ApiServer {
    /// Starts a server with default options; it is listening when this returns.
    pub fn start() -> ApiServer {
        ApiServer::start_with(ApiOptions::default())
    }

    pub fn start_with(opts: ApiOptions) -> ApiServer {
        let pki = Pki::new();
        let tls = TlsAcceptor::from(pki.server_config());
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State::new(opts, addr));
        let dir = tempfile::Builder::new()
            .prefix("ringfwd-apiserver-")
            .tempdir()
            .expect("temp dir");
        let (stop, stopped) = oneshot::channel();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("fake-apiserver-rt")
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let _ = handle_tx.send(rt.handle().clone());
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = accept_loop(listener, tls, st) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("spawn server thread");
        let runtime = handle_rx.recv().expect("server runtime");
        eprintln!("fake apiserver: listening on https://{addr}");
        ApiServer {
            state,
            pki,
            dir,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
            files: AtomicU64::new(0),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.state.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// The CA certificate (PEM) the serving certificate chains to.
    pub fn ca_pem(&self) -> String {
        self.pki.ca_pem.clone()
    }

    /// The good bearer token.
    pub fn token(&self) -> String {
        self.state.token.clone()
    }

    /// The viewer's bearer token (reads only).
    pub fn forbidden_token(&self) -> String {
        self.state.forbidden_token.clone()
    }

    /// Writes a kubeconfig for this server (context namespace `default`) and returns its path.
    pub fn kubeconfig(&self, auth: Auth) -> PathBuf {
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let mut cluster = json!({ "server": self.url() });
        if auth == Auth::InsecureToken {
            cluster["insecure-skip-tls-verify"] = json!(true);
        } else {
            cluster["certificate-authority-data"] = json!(BASE64.encode(&self.pki.ca_pem));
        }
        let user = self.kubeconfig_user(auth, n);
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "ringfwd-test", "cluster": cluster }],
            "users": [{ "name": "ringfwd-test-user", "user": user }],
            "contexts": [{
                "name": "ringfwd-test",
                "context": {
                    "cluster": "ringfwd-test",
                    "user": "ringfwd-test-user",
                    "namespace": "default",
                },
            }],
            "current-context": "ringfwd-test",
            "preferences": {},
        });
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{n}-{auth:?}.json"));
        write_file(
            &path,
            &serde_json::to_string_pretty(&config).expect("json"),
            0o600,
        );
        path
    }

    fn kubeconfig_user(&self, auth: Auth, n: u64) -> Value {
        match auth {
            Auth::Token | Auth::InsecureToken => json!({ "token": self.state.token }),
            Auth::ForbiddenToken => json!({ "token": self.state.forbidden_token }),
            Auth::BadToken => json!({ "token": random_hex(16) }),
            Auth::None => json!({}),
            Auth::TokenFile => {
                let path = self.dir.path().join(format!("token-{n}"));
                write_file(&path, &self.state.token, 0o600);
                json!({ "tokenFile": path })
            }
            Auth::ClientCert => {
                let (cert, key) = self.pki.mint_client(CLIENT_CERT_USER);
                json!({
                    "client-certificate-data": BASE64.encode(cert),
                    "client-key-data": BASE64.encode(key),
                })
            }
            Auth::Exec => {
                let path = self.dir.path().join(format!("credential-plugin-{n}.sh"));
                let credential = json!({
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "kind": "ExecCredential",
                    "status": { "token": self.state.token },
                });
                let script = format!("#!/bin/sh\ncat <<'EOF'\n{credential}\nEOF\n");
                write_file(&path, &script, 0o700);
                json!({ "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": path,
                    "interactiveMode": "Never",
                }})
            }
            Auth::Oidc | Auth::OidcExpired => {
                let oidc = &self.state.oidc;
                let lifetime = if auth == Auth::Oidc { 3600 } else { -3600 };
                json!({ "auth-provider": {
                    "name": "oidc",
                    "config": {
                        "idp-issuer-url": oidc.issuer,
                        "client-id": OIDC_CLIENT_ID,
                        "client-secret": oidc.client_secret,
                        "id-token": oidc.mint(lifetime),
                        "refresh-token": oidc.refresh_token,
                        "idp-certificate-authority-data": BASE64.encode(&self.pki.ca_pem),
                    },
                }})
            }
        }
    }

    /// The CA certificate written to a PEM file (for `SSL_CERT_FILE`).
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        write_file(&path, &self.pki.ca_pem, 0o644);
        path
    }

    /// How many ID tokens the OIDC issuer has handed out for refresh tokens.
    pub fn oidc_refreshes(&self) -> u64 {
        self.state.oidc.refreshes.load(Ordering::Relaxed)
    }

    /// `kubectl --kubeconfig <fresh kubeconfig for auth>`, with its discovery cache in this
    /// server's temp dir (never `~/.kube/cache`) and stdin closed.
    pub fn kubectl(&self, auth: Auth) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig(auth))
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Starts an in-process `ringfwd serve` on 127.0.0.1:0, dialling targets in our own network
    /// namespace, on the server's runtime. Returns it as a pod backend.
    pub fn serve_backend(&self) -> Backend {
        self.serve_backend_with(ringfwd::serve::Dialer::Local)
    }

    /// Like [`serve_backend`](Self::serve_backend) with a given dialer (e.g. into a netns).
    pub fn serve_backend_with(&self, dialer: ringfwd::serve::Dialer) -> Backend {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let url = format!(
            "http://{}/portforward",
            listener.local_addr().expect("addr")
        );
        self.runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            let opts = ringfwd::relay::SessionOptions::default();
            if let Err(e) = ringfwd::serve::serve(listener, dialer, opts).await {
                eprintln!("fake apiserver: ringfwd serve backend stopped: {e}");
            }
        });
        Backend::Url(url)
    }

    /// Stores (creates or replaces) any object of a served kind. A pod stored this way has no
    /// port-forward backend until [`set_backend`](Self::set_backend). `metadata.uid`,
    /// `resourceVersion`, `creationTimestamp` and (for namespaced kinds) `namespace` are filled
    /// in. Returns the stored object.
    pub fn put(&self, obj: Value) -> Value {
        self.state.store().put(obj)
    }

    /// The stored object `resource` (plural, e.g. `pods`) `namespace/name`, if any. Use an
    /// empty namespace for cluster-scoped kinds.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resource_index(resource)?;
        self.state.store().get(r, namespace, name).cloned()
    }

    /// Deletes a stored object (watchers see `DELETED`).
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let r = resource_index(resource).expect("unknown resource");
        self.state.store().remove(r, namespace, name)
    }

    /// Adds a realistic pod (see [`PodDef`]) and records its backend.
    pub fn add_pod(&self, def: PodDef) -> Value {
        let mut store = self.state.store();
        let ip = def.ip.clone().unwrap_or_else(|| store.next_pod_ip());
        store.backends.insert(
            (def.namespace.clone(), def.name.clone()),
            def.backend.clone(),
        );
        store.put(pod_json(&def, &ip))
    }

    /// Sets an existing pod's readiness (its `Ready` and `ContainersReady` conditions and its
    /// container's `ready`), as the kubelet does when a readiness probe changes its mind;
    /// watchers see `MODIFIED`.
    pub fn set_pod_ready(&self, namespace: &str, pod: &str, ready: bool) {
        let mut store = self.state.store();
        let mut obj = store
            .get(PODS, namespace, pod)
            .unwrap_or_else(|| panic!("no pod {namespace}/{pod}"))
            .clone();
        let status = if ready { "True" } else { "False" };
        for c in obj["status"]["conditions"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            if c["type"] == "Ready" || c["type"] == "ContainersReady" {
                c["status"] = json!(status);
                c["lastTransitionTime"] = json!(now_rfc3339());
            }
        }
        for c in obj["status"]["containerStatuses"]
            .as_array_mut()
            .into_iter()
            .flatten()
        {
            c["ready"] = json!(ready);
        }
        store.put(obj);
    }

    /// Points an existing pod at another backend.
    pub fn set_backend(&self, namespace: &str, pod: &str, backend: Backend) {
        self.state
            .store()
            .backends
            .insert((namespace.to_owned(), pod.to_owned()), backend);
    }

    /// Adds a ClusterIP service; its Endpoints and EndpointSlice follow the matching pods.
    pub fn add_service(
        &self,
        name: &str,
        namespace: &str,
        selector: &[(&str, &str)],
        ports: Vec<ServicePortDef>,
    ) -> Value {
        let mut store = self.state.store();
        let ip = store.next_service_ip();
        store.put(service_json(name, namespace, selector, &ports, &ip))
    }

    /// Adds a deployment and its ReplicaSet `NAME-HASH`; returns the ReplicaSet as the owner for
    /// the pods the test adds (they need `match_labels` too, see [`PodDef::label`]).
    pub fn add_deployment(
        &self,
        name: &str,
        namespace: &str,
        match_labels: &[(&str, &str)],
        replicas: u32,
    ) -> Owner {
        let mut store = self.state.store();
        let deploy = store.put(deployment_json(name, namespace, match_labels, replicas));
        let hash = pod_template_hash();
        let rs = store.put(replicaset_json(&deploy, &hash, match_labels, replicas));
        owner_of(&rs, vec![("pod-template-hash".to_owned(), hash)])
    }

    /// Adds a statefulset; returns it as the owner for its pods.
    pub fn add_statefulset(
        &self,
        name: &str,
        namespace: &str,
        match_labels: &[(&str, &str)],
    ) -> Owner {
        let mut store = self.state.store();
        let revision = format!("{name}-{}", pod_template_hash());
        let sts = store.put(statefulset_json(name, namespace, match_labels, &revision));
        owner_of(
            &sts,
            vec![("controller-revision-hash".to_owned(), revision)],
        )
    }

    /// Every request so far: `"GET /api/v1/namespaces/default/pods?limit=500 -> 200"`.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Waits until a logged request line (see [`requests`](Self::requests)) satisfies `pred`
    /// and returns it; `None` after `timeout`. A request is logged once its response headers
    /// are ready, e.g. once a watch is subscribed.
    pub fn wait_for_request(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut log = self.state.requests.lock().unwrap();
        loop {
            if let Some(line) = log.iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            log = self
                .state
                .requests_changed
                .wait_timeout(log, left)
                .unwrap()
                .0;
        }
    }

    /// Every `pods/portforward` request so far, in order.
    pub fn portforward_log(&self) -> Vec<PfRecord> {
        self.state.portforwards.lock().unwrap().clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_file(path: &std::path::Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

/// The private CA: signs the serving certificate and client certificates.
struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = distinguished_name("ringfwd-test-ca", None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Pki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate signed by the CA: (certificate DER, key).
    fn mint(
        &self,
        cn: &str,
        org: Option<&str>,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = distinguished_name(cn, org);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.der().clone(), key)
    }

    /// A client certificate and key, both PEM.
    fn mint_client(&self, cn: &str) -> (String, String) {
        let (der, key) = self.mint(
            cn,
            Some("system:masters"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            BASE64
                .encode(der.as_ref())
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).expect("base64 is ascii"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        (pem, key.serialize_pem())
    }

    /// TLS: serving certificate for 127.0.0.1 and localhost, optional client certificates
    /// verified against the CA, ALPN `http/1.1` only, ring as the crypto provider.
    fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = self.mint(
            "ringfwd-test-apiserver",
            None,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA into root store");
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .expect("client verifier");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .expect("server certificate");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

fn distinguished_name(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

// ---------------------------------------------------------------------------------------------
// Shared state and the object store
// ---------------------------------------------------------------------------------------------

struct State {
    opts: ApiOptions,
    addr: SocketAddr,
    token: String,
    forbidden_token: String,
    oidc: OidcIssuer,
    store: Mutex<Store>,
    requests: Mutex<Vec<String>>,
    /// Signalled whenever a request is logged.
    requests_changed: Condvar,
    portforwards: Mutex<Vec<PfRecord>>,
}

impl State {
    fn new(opts: ApiOptions, addr: SocketAddr) -> State {
        let mut store = Store::new();
        for ns in ["default", "kube-system"] {
            store.put(namespace_json(ns));
        }
        State {
            opts,
            addr,
            token: random_hex(32),
            forbidden_token: random_hex(32),
            oidc: OidcIssuer::new(format!("https://{addr}/oidc")),
            store: Mutex::new(store),
            requests: Mutex::new(Vec::new()),
            requests_changed: Condvar::new(),
            portforwards: Mutex::new(Vec::new()),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_request(&self, line: String) {
        eprintln!("fake apiserver: {line}");
        self.requests.lock().unwrap().push(line);
        self.requests_changed.notify_all();
    }

    fn record_pf(&self, namespace: &str, pod: &str, kind: PfKind) {
        eprintln!("fake apiserver: portforward {namespace}/{pod}: {kind:?}");
        self.portforwards.lock().unwrap().push(PfRecord {
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            kind,
        });
    }
}

/// One served resource type.
struct ResourceType {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        categories: &[],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        categories: &["all"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
        categories: &["all"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short_names: &["ep"],
        categories: &[],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        plural: "deployments",
        singular: "deployment",
        kind: "Deployment",
        namespaced: true,
        short_names: &["deploy"],
        categories: &["all"],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        plural: "replicasets",
        singular: "replicaset",
        kind: "ReplicaSet",
        namespaced: true,
        short_names: &["rs"],
        categories: &["all"],
    },
    ResourceType {
        group: "apps",
        version: "v1",
        plural: "statefulsets",
        singular: "statefulset",
        kind: "StatefulSet",
        namespaced: true,
        short_names: &["sts"],
        categories: &["all"],
    },
    ResourceType {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
        categories: &[],
    },
];

/// API groups besides the core group, in discovery order.
const GROUPS: &[&str] = &["apps", "discovery.k8s.io"];

fn resource_index(plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.plural == plural)
}

fn resource_in(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

const NAMESPACES: usize = 0;
const PODS: usize = 1;
const SERVICES: usize = 2;

/// `(resource index, namespace or "", name)`.
type Key = (usize, String, String);

/// A change, as watchers see it.
#[derive(Clone)]
struct WatchEvent {
    resource: usize,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// Objects by key, the resourceVersion counter, and pod backends. Every write happens under
/// the store lock and is broadcast under it, so a watcher that subscribes under the lock sees
/// each change exactly once: either in its snapshot or as an event.
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    backends: HashMap<(String, String), Backend>,
    events: broadcast::Sender<WatchEvent>,
    /// The latest events (at most [`HISTORY`]), for watches that start from an older
    /// resourceVersion: a real API server replays them from its watch cache, deletions
    /// included, so a client that lists and then watches misses nothing in between.
    history: std::collections::VecDeque<(u64, WatchEvent)>,
    /// The resourceVersion just before the oldest event in `history`.
    history_from: u64,
    next_pod_ip: u32,
    next_service_ip: u32,
}

/// Events a [`Store`] keeps for replay.
const HISTORY: usize = 4096;

impl Store {
    fn new() -> Store {
        Store {
            rv: 100,
            objects: BTreeMap::new(),
            backends: HashMap::new(),
            events: broadcast::channel(1024).0,
            history: std::collections::VecDeque::new(),
            history_from: 100,
            next_pod_ip: 10,
            next_service_ip: 10,
        }
    }

    fn next_pod_ip(&mut self) -> String {
        self.next_pod_ip += 1;
        format!(
            "10.244.{}.{}",
            self.next_pod_ip / 250,
            self.next_pod_ip % 250 + 2
        )
    }

    fn next_service_ip(&mut self) -> String {
        self.next_service_ip += 1;
        format!(
            "10.96.{}.{}",
            self.next_service_ip / 250,
            self.next_service_ip % 250 + 2
        )
    }

    fn get(&self, resource: usize, namespace: &str, name: &str) -> Option<&Value> {
        let ns = if RESOURCES[resource].namespaced {
            namespace
        } else {
            ""
        };
        self.objects
            .get(&(resource, ns.to_owned(), name.to_owned()))
    }

    /// Create or replace; see [`ApiServer::put`]. Keeps Endpoints and EndpointSlices in step
    /// with pods and services.
    fn put(&mut self, obj: Value) -> Value {
        let stored = self.put_one(obj);
        let r = resource_of(&stored).expect("just stored");
        let ns = str_at(&stored, "/metadata/namespace").to_owned();
        if RESOURCES[r].namespaced {
            if self.get(NAMESPACES, "", &ns).is_none() {
                self.put_one(namespace_json(&ns));
            }
            if r == PODS || r == SERVICES {
                self.refresh_endpoints(&ns);
            }
        }
        stored
    }

    fn put_one(&mut self, mut obj: Value) -> Value {
        let r = resource_of(&obj).unwrap_or_else(|| {
            panic!(
                "fake apiserver does not serve {}/{}",
                str_at(&obj, "/apiVersion"),
                str_at(&obj, "/kind")
            )
        });
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let name = str_at(&obj, "/metadata/name").to_owned();
        assert!(!name.is_empty(), "object without metadata.name: {obj}");
        let ns = if RESOURCES[r].namespaced {
            let ns = match str_at(&obj, "/metadata/namespace") {
                "" => "default".to_owned(),
                ns => ns.to_owned(),
            };
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let key = (r, ns.clone(), name);
        let old = self.objects.get(&key);
        let meta = &mut obj["metadata"];
        for field in ["uid", "creationTimestamp"] {
            if meta.get(field).is_none_or(Value::is_null) {
                meta[field] = match (old, field) {
                    (Some(o), _) => o["metadata"][field].clone(),
                    (None, "uid") => json!(random_uid()),
                    (None, _) => json!(now_rfc3339()),
                };
            }
        }
        self.rv += 1;
        meta["resourceVersion"] = json!(self.rv.to_string());
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.objects.insert(key, obj.clone());
        self.publish(WatchEvent {
            resource: r,
            namespace: ns,
            kind,
            object: obj.clone(),
        });
        obj
    }

    /// Send `ev` (the change that made `self.rv`) to live watchers and keep it for replay.
    fn publish(&mut self, ev: WatchEvent) {
        if self.history.len() == HISTORY
            && let Some((rv, _)) = self.history.pop_front()
        {
            self.history_from = rv;
        }
        self.history.push_back((self.rv, ev.clone()));
        let _ = self.events.send(ev);
    }

    fn remove(&mut self, resource: usize, namespace: &str, name: &str) -> Option<Value> {
        let ns = if RESOURCES[resource].namespaced {
            namespace
        } else {
            ""
        };
        let mut obj = self
            .objects
            .remove(&(resource, ns.to_owned(), name.to_owned()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.publish(WatchEvent {
            resource,
            namespace: ns.to_owned(),
            kind: "DELETED",
            object: obj.clone(),
        });
        if resource == PODS || resource == SERVICES {
            self.backends.remove(&(ns.to_owned(), name.to_owned()));
            self.refresh_endpoints(ns);
        }
        Some(obj)
    }

    /// Objects of `resource` in `namespace` (all namespaces when `None`) that match.
    fn list(&self, resource: usize, namespace: Option<&str>, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, ns, _), _)| *r == resource && namespace.is_none_or(|n| n == ns))
            .map(|(_, o)| o)
            .filter(|o| filter.matches(o))
            .cloned()
            .collect()
    }

    /// Recomputes the Endpoints and EndpointSlice of every service with a selector in `ns`,
    /// writing only what changed (like the endpoint controllers).
    fn refresh_endpoints(&mut self, ns: &str) {
        let services = self.list(SERVICES, Some(ns), &Filter::default());
        for svc in services {
            let Some(selector) = svc["spec"]["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let filter = Filter {
                labels: selector
                    .iter()
                    .map(|(k, v)| LabelReq::Eq(k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect(),
                fields: Vec::new(),
            };
            let pods = self.list(PODS, Some(ns), &filter);
            let endpoints = endpoints_json(&svc, &pods);
            self.put_if_changed(endpoints);
            let slice = endpointslice_json(&svc, &pods);
            self.put_if_changed(slice);
        }
    }

    fn put_if_changed(&mut self, mut obj: Value) {
        let r = resource_of(&obj).expect("known kind");
        let old = self.get(
            r,
            str_at(&obj, "/metadata/namespace"),
            str_at(&obj, "/metadata/name"),
        );
        if let Some(old) = old {
            for f in ["uid", "creationTimestamp", "resourceVersion"] {
                obj["metadata"][f] = old["metadata"][f].clone();
            }
            if *old == obj {
                return;
            }
            obj["metadata"]["resourceVersion"] = Value::Null;
        }
        self.put_one(obj);
    }
}

fn resource_of(obj: &Value) -> Option<usize> {
    let (api_version, kind) = (str_at(obj, "/apiVersion"), str_at(obj, "/kind"));
    RESOURCES
        .iter()
        .position(|r| r.api_version() == api_version && r.kind == kind)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

/// One label selector requirement (`labels.Parse` syntax).
#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelReq {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        }
    }
}

/// One field selector requirement: `path=value`, `path==value` or `path!=value`, where path is
/// a dotted JSON path such as `metadata.name` or `status.phase`.
#[derive(Debug, Clone)]
struct FieldReq {
    pointer: String,
    value: String,
    negate: bool,
}

#[derive(Debug, Clone, Default)]
struct Filter {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn parse(query: &HashMap<String, Vec<String>>) -> Result<Filter, String> {
        let first = |k: &str| query.get(k).and_then(|v| v.first()).map(String::as_str);
        Ok(Filter {
            labels: parse_label_selector(first("labelSelector").unwrap_or(""))?,
            fields: parse_field_selector(first("fieldSelector").unwrap_or(""))?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let empty = Map::new();
        let labels = obj["metadata"]["labels"].as_object().unwrap_or(&empty);
        self.labels.iter().all(|r| r.matches(labels))
            && self.fields.iter().all(|f| {
                let actual = obj.pointer(&f.pointer).map(value_text).unwrap_or_default();
                (actual == f.value) != f.negate
            })
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    split_top_level(s)
        .into_iter()
        .map(parse_label_req)
        .collect()
}

fn parse_label_req(term: &str) -> Result<LabelReq, String> {
    let bad = || format!("unable to parse requirement: found '{term}', expected: valid selector");
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(key.trim().to_owned()));
    }
    if let Some(open) = term.find('(') {
        let close = term.rfind(')').filter(|&c| c > open).ok_or_else(bad)?;
        let values = term[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        let head = term[..open].trim();
        if let Some(key) = head.strip_suffix("notin") {
            return Ok(LabelReq::NotIn(key.trim().to_owned(), values));
        }
        if let Some(key) = head.strip_suffix("in") {
            return Ok(LabelReq::In(key.trim().to_owned(), values));
        }
        return Err(bad());
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = term.split_once(op) {
            let (k, v) = (k.trim().to_owned(), v.trim().to_owned());
            return Ok(if negate {
                LabelReq::NotEq(k, v)
            } else {
                LabelReq::Eq(k, v)
            });
        }
    }
    if term.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(LabelReq::Exists(term.to_owned()))
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    split_top_level(s)
        .into_iter()
        .map(|term| {
            for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
                if let Some((k, v)) = term.split_once(op) {
                    return Ok(FieldReq {
                        pointer: format!("/{}", k.trim().replace('.', "/")),
                        value: v.trim().to_owned(),
                        negate,
                    });
                }
            }
            Err(format!(
                "invalid selector: '{term}'; can't understand '{term}'"
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn empty() -> Body {
    Empty::new().boxed()
}

/// A response body fed by a channel (watch streams).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    h.insert("audit-id", header_value(&random_uid()));
    r
}

/// A `metav1.Status` failure. `reason` empty is Go's `StatusReasonUnknown` (omitted).
fn status_response(
    code: u16,
    reason: &str,
    message: &str,
    details: Option<Value>,
) -> Response<Body> {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "code": code,
    });
    if !reason.is_empty() {
        body["reason"] = json!(reason);
    }
    if let Some(d) = details {
        body["details"] = d;
    }
    json_response(StatusCode::from_u16(code).expect("valid status"), &body)
}

fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `NotFound` for a resource, group-qualified as the API server names it
/// (`deployments.apps "x" not found`).
fn not_found(rt: &ResourceType, name: &str) -> Response<Body> {
    let (qualified, details) = if rt.group.is_empty() {
        (
            rt.plural.to_owned(),
            json!({ "name": name, "kind": rt.plural }),
        )
    } else {
        let details = json!({ "name": name, "group": rt.group, "kind": rt.plural });
        (format!("{}.{}", rt.plural, rt.group), details)
    };
    let message = format!("{qualified} \"{name}\" not found");
    status_response(404, "NotFound", &message, Some(details))
}

fn no_such_path() -> Response<Body> {
    status_response(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

fn bad_request(message: &str) -> Response<Body> {
    status_response(400, "BadRequest", message, None)
}

fn method_not_allowed() -> Response<Body> {
    status_response(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        Some(json!({})),
    )
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn header_str(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `name=value` pairs of a query string, percent-decoded (`+` is a space, as Go encodes).
fn parse_query(query: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(percent_decode(k))
            .or_default()
            .push(percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

async fn accept_loop(listener: TcpListener, tls: TlsAcceptor, state: Arc<State>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fake apiserver: accept: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(serve_connection(tcp, peer, tls.clone(), state.clone()));
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, tls: TlsAcceptor, state: Arc<State>) {
    let stream = match tls.accept(tcp).await {
        Ok(s) => s,
        Err(e) => return eprintln!("fake apiserver: TLS handshake with {peer}: {e}"),
    };
    // Only certificates that chained to our CA get this far.
    let cert_user = stream.get_ref().1.peer_certificates().is_some();
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(state, cert_user, peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    match conn.await {
        // A client leaving in the middle of a watch stream: routine.
        Err(e) if e.is_incomplete_message() => {}
        Err(e) => eprintln!("fake apiserver: connection from {peer}: {e}"),
        Ok(()) => {}
    }
}

/// Logs the request and its status around [`route`].
async fn handle(
    state: Arc<State>,
    cert_user: bool,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let line = format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let resp = route(&state, cert_user, peer, req).await;
    state.log_request(format!("{line} -> {}", resp.status().as_u16()));
    resp
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorisation
// ---------------------------------------------------------------------------------------------

struct User {
    name: &'static str,
    may_portforward: bool,
}

/// x509 first, then bearer tokens (the union authenticator's order); nothing else, and no
/// anonymous access.
fn authenticate(
    state: &State,
    cert_user: bool,
    headers: &HeaderMap,
) -> Result<User, Response<Body>> {
    if cert_user {
        return Ok(User {
            name: CLIENT_CERT_USER,
            may_portforward: true,
        });
    }
    let token = header_str(headers, header::AUTHORIZATION)
        .strip_prefix("Bearer ")
        .map(str::trim);
    match token {
        Some(t) if t == state.token => Ok(User {
            name: ADMIN_USER,
            may_portforward: true,
        }),
        Some(t) if t == state.forbidden_token => Ok(User {
            name: VIEWER_USER,
            may_portforward: false,
        }),
        Some(t) if state.oidc.accepts(t) => Ok(User {
            name: OIDC_USER,
            may_portforward: true,
        }),
        _ => Err(status_response(401, "Unauthorized", "Unauthorized", None)),
    }
}

/// RBAC's answer for `pods/portforward` (everyone may read everything else).
fn authorize_portforward(
    user: &User,
    verb: &str,
    ns: &str,
    pod: &str,
) -> Result<(), Response<Body>> {
    if user.may_portforward {
        return Ok(());
    }
    let message = format!(
        "pods \"{pod}\" is forbidden: User \"{}\" cannot {verb} resource \"pods/portforward\" \
         in API group \"\" in the namespace \"{ns}\"",
        user.name
    );
    Err(status_response(
        403,
        "Forbidden",
        &message,
        Some(json!({ "name": pod, "kind": "pods" })),
    ))
}

/// Client id the kubeconfigs of [`Auth::Oidc`] carry.
const OIDC_CLIENT_ID: &str = "ringfwd-test";
/// The user an OIDC ID token authenticates as.
const OIDC_USER: &str = "oidc:alice";

/// A minimal OpenID provider at `/oidc` on the same server: discovery and a token endpoint
/// that trades the one refresh token for a fresh ID token. Like the real API server's OIDC
/// authenticator, the API side accepts an ID token it issued until its `exp`. (Signatures are
/// not checked here; kubectl's and kube's auth providers never check them either.)
struct OidcIssuer {
    issuer: String,
    client_secret: String,
    refresh_token: String,
    /// Issued ID tokens and their expiry (seconds since the epoch).
    issued: Mutex<HashMap<String, u64>>,
    refreshes: AtomicU64,
}

impl OidcIssuer {
    fn new(issuer: String) -> OidcIssuer {
        OidcIssuer {
            issuer,
            client_secret: random_hex(16),
            refresh_token: random_hex(32),
            issued: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
        }
    }

    /// A JWT for [`OIDC_USER`] that expires `lifetime` seconds from now (negative: expired).
    fn mint(&self, lifetime: i64) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let exp = now.saturating_add_signed(lifetime);
        let header = json!({ "alg": "RS256", "typ": "JWT" });
        let claims = json!({
            "iss": self.issuer,
            "sub": OIDC_USER,
            "aud": OIDC_CLIENT_ID,
            "iat": now,
            "exp": exp,
            "jti": random_hex(8),
        });
        let token = format!(
            "{}.{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string()),
            B64URL.encode(random_bytes::<32>()),
        );
        self.issued.lock().unwrap().insert(token.clone(), exp);
        token
    }

    fn accepts(&self, token: &str) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|&exp| exp > now)
    }
}

/// `GET /oidc/.well-known/openid-configuration` and `POST /oidc/token` (RFC 6749 refresh grant;
/// client credentials by HTTP Basic or in the form, both of which clients try).
async fn oidc_issuer(state: &State, req: Request<Incoming>) -> Response<Body> {
    let oidc = &state.oidc;
    let oauth_error =
        |status: StatusCode, error: &str| json_response(status, &json!({ "error": error }));
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/oidc/.well-known/openid-configuration") => json_response(
            StatusCode::OK,
            &json!({
                "issuer": oidc.issuer,
                "authorization_endpoint": format!("{}/auth", oidc.issuer),
                "token_endpoint": format!("{}/token", oidc.issuer),
                "jwks_uri": format!("{}/keys", oidc.issuer),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }),
        ),
        (Method::POST, "/oidc/token") => {
            let basic = header_str(req.headers(), header::AUTHORIZATION)
                .strip_prefix("Basic ")
                .and_then(|b| BASE64.decode(b.trim()).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    let (id, secret) = s.split_once(':')?;
                    Some((percent_decode(id), percent_decode(secret)))
                });
            let Ok(body) = req.into_body().collect().await else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            let form = parse_query(Some(&String::from_utf8_lossy(&body.to_bytes())));
            let field = |k: &str| form.get(k).and_then(|v| v.first()).cloned();
            let client = basic.or_else(|| Some((field("client_id")?, field("client_secret")?)));
            if client != Some((OIDC_CLIENT_ID.to_owned(), oidc.client_secret.clone())) {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
            }
            if field("grant_type").as_deref() != Some("refresh_token")
                || field("refresh_token").as_deref() != Some(oidc.refresh_token.as_str())
            {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            oidc.refreshes.fetch_add(1, Ordering::Relaxed);
            json_response(
                StatusCode::OK,
                &json!({
                    "access_token": random_hex(16),
                    "token_type": "Bearer",
                    "expires_in": 3600,
                    "id_token": oidc.mint(3600),
                    "refresh_token": oidc.refresh_token,
                }),
            )
        }
        _ => text_response(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

async fn route(
    state: &Arc<State>,
    cert_user: bool,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path().starts_with("/oidc/") {
        return oidc_issuer(state, req).await;
    }
    let user = match authenticate(state, cert_user, req.headers()) {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let is_get = req.method() == Method::GET;
    match segs.as_slice() {
        ["version"] if is_get => json_response(StatusCode::OK, &version_json(state)),
        ["api"] if is_get => json_response(StatusCode::OK, &api_versions_json(state)),
        ["apis"] if is_get => json_response(StatusCode::OK, &api_group_list_json()),
        ["api", "v1"] if is_get => json_response(StatusCode::OK, &resource_list_json("", "v1")),
        ["apis", group] if is_get && GROUPS.contains(group) => {
            json_response(StatusCode::OK, &api_group_json(group))
        }
        ["apis", group, "v1"] if is_get && GROUPS.contains(group) => {
            json_response(StatusCode::OK, &resource_list_json(group, "v1"))
        }
        ["api", "v1", rest @ ..] => resources(state, &user, peer, "", rest, req).await,
        ["apis", group, "v1", rest @ ..] if GROUPS.contains(group) => {
            let group = (*group).to_owned();
            resources(state, &user, peer, &group, rest, req).await
        }
        ["version" | "api" | "apis", ..] => method_not_allowed(),
        _ => text_response(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Paths below `/api/v1` or `/apis/GROUP/v1`.
async fn resources(
    state: &Arc<State>,
    user: &User,
    peer: SocketAddr,
    group: &str,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<Body> {
    if let ["namespaces", ns, "pods", pod, "portforward"] = rest
        && group.is_empty()
    {
        return portforward(state, user, peer, ns, pod, req).await;
    }
    if req.method() != Method::GET {
        return method_not_allowed();
    }
    let query = parse_query(req.uri().query());
    let table = header_str(req.headers(), header::ACCEPT).contains("as=Table");
    let read = |r, ns, name| read(state, r, ns, name, &query, table);
    let find = |plural: &str| resource_in(group, "v1", plural);
    match rest {
        ["namespaces", ns, plural] => match find(plural).filter(|&r| RESOURCES[r].namespaced) {
            Some(r) => read(r, Some(ns), None),
            None => no_such_path(),
        },
        ["namespaces", ns, plural, name] => match find(plural).filter(|&r| RESOURCES[r].namespaced)
        {
            Some(r) => read(r, Some(ns), Some(name)),
            None => no_such_path(),
        },
        [plural] => match find(plural) {
            Some(r) => read(r, None, None),
            None => no_such_path(),
        },
        [plural, name] => match find(plural).filter(|&r| !RESOURCES[r].namespaced) {
            Some(r) => read(r, None, Some(name)),
            None => no_such_path(),
        },
        _ => no_such_path(),
    }
}

/// GET of one object, LIST, or WATCH. `table`: the client asked for a server-side Table
/// (kubectl's human-readable output); served for pods, other kinds get the plain object.
fn read(
    state: &Arc<State>,
    r: usize,
    ns: Option<&str>,
    name: Option<&str>,
    query: &HashMap<String, Vec<String>>,
    table: bool,
) -> Response<Body> {
    let rt = &RESOURCES[r];
    let table = table && r == PODS;
    if let Some(name) = name {
        let store = state.store();
        return match store.get(r, ns.unwrap_or(""), name) {
            Some(obj) if table => {
                let rv = str_at(obj, "/metadata/resourceVersion");
                json_response(StatusCode::OK, &pod_table(std::slice::from_ref(obj), rv))
            }
            Some(obj) => json_response(StatusCode::OK, obj),
            None => not_found(rt, name),
        };
    }
    let filter = match Filter::parse(query) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    let first = |k: &str| query.get(k).and_then(|v| v.first()).map(String::as_str);
    if matches!(first("watch"), Some("true" | "1")) {
        let since = first("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = first("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs);
        return watch(state, r, ns.map(str::to_owned), filter, since, timeout);
    }
    let store = state.store();
    let items = store.list(r, ns, &filter);
    let rv = store.rv.to_string();
    if table {
        return json_response(StatusCode::OK, &pod_table(&items, &rv));
    }
    let list = json!({
        "kind": format!("{}List", rt.kind),
        "apiVersion": rt.api_version(),
        "metadata": { "resourceVersion": rv },
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

/// The pod Table kube-apiserver serves (`kubectl get pods [-o wide]` columns).
fn pod_table(pods: &[Value], resource_version: &str) -> Value {
    let column = |name: &str, priority: u8, description: &str| {
        json!({
            "name": name,
            "type": "string",
            "format": if name == "Name" { "name" } else { "" },
            "description": description,
            "priority": priority,
        })
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": resource_version },
        "columnDefinitions": [
            column("Name", 0, "Name must be unique within a namespace."),
            column("Ready", 0, "The aggregate readiness state of this pod for accepting traffic."),
            column("Status", 0, "The aggregate status of the containers in this pod."),
            column("Restarts", 0, "The number of times the containers in this pod have been restarted."),
            column("Age", 0, "CreationTimestamp is a timestamp representing the server time when this object was created."),
            column("IP", 1, "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated."),
            column("Node", 1, "NodeName is a request to schedule this pod onto a specific node."),
            column("Nominated Node", 1, "nominatedNodeName is set when this pod preempts other pods on the node."),
            column("Readiness Gates", 1, "If specified, all readiness gates will be evaluated for pod readiness."),
        ],
        "rows": pods.iter().map(pod_row).collect::<Vec<_>>(),
    })
}

fn pod_row(pod: &Value) -> Value {
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let total = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let restarts: u64 = statuses
        .iter()
        .filter_map(|c| c["restartCount"].as_u64())
        .sum();
    let waiting = statuses
        .iter()
        .find_map(|c| c["state"]["waiting"]["reason"].as_str());
    let status = waiting.unwrap_or(str_at(pod, "/status/phase"));
    let or_none = |s: &str| {
        if s.is_empty() {
            "<none>".to_owned()
        } else {
            s.to_owned()
        }
    };
    json!({
        "cells": [
            pod["metadata"]["name"],
            format!("{ready}/{total}"),
            status,
            restarts.to_string(),
            human_age(str_at(pod, "/metadata/creationTimestamp")),
            or_none(str_at(pod, "/status/podIP")),
            or_none(str_at(pod, "/spec/nodeName")),
            "<none>",
            "<none>",
        ],
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": pod["metadata"],
        },
    })
}

/// A watch stream: synthetic `ADDED` events for matching objects newer than `since`, then live
/// events, one JSON object per line, until the client goes, the timeout passes, or the server
/// stops.
fn watch(
    state: &Arc<State>,
    r: usize,
    ns: Option<String>,
    filter: Filter,
    since: u64,
    timeout: Option<Duration>,
) -> Response<Body> {
    let scope = ns.clone();
    let in_scope = move |ev: &WatchEvent| {
        ev.resource == r && scope.as_deref().is_none_or(|n| n == ev.namespace)
    };
    let (initial, mut events) = {
        let store = state.store();
        let initial: Vec<(&'static str, Value)> = if since > 0 && since >= store.history_from {
            // From a version the history covers: every change since, deletions included.
            store
                .history
                .iter()
                .filter(|(rv, ev)| *rv > since && in_scope(ev) && filter.matches(&ev.object))
                .map(|(_, ev)| (ev.kind, ev.object.clone()))
                .collect()
        } else {
            let newer = |o: &Value| {
                str_at(o, "/metadata/resourceVersion")
                    .parse::<u64>()
                    .is_ok_and(|rv| rv > since)
            };
            store
                .list(r, ns.as_deref(), &filter)
                .into_iter()
                .filter(newer)
                .map(|o| ("ADDED", o))
                .collect()
        };
        (initial, store.events.subscribe())
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let line = |kind: &str, obj: &Value| {
        Bytes::from(format!("{}\n", json!({ "type": kind, "object": obj })))
    };
    tokio::spawn(async move {
        for (kind, obj) in &initial {
            if tx.send(line(kind, obj)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
                _ = &mut deadline => return,
            };
            let ev = match ev {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if in_scope(&ev)
                && filter.matches(&ev.object)
                && tx.send(line(ev.kind, &ev.object)).await.is_err()
            {
                return;
            }
        }
    });
    let mut resp = Response::new(BoxBody::new(ChannelBody(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

fn version_json(state: &State) -> Value {
    let minor = state.opts.minor_version;
    json!({
        "major": "1",
        "minor": minor.to_string(),
        "gitVersion": format!("v1.{minor}.4"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-22T16:00:00Z",
        "goVersion": "go1.23.8",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_versions_json(state: &State) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{
            "clientCIDR": "0.0.0.0/0",
            "serverAddress": state.addr.to_string(),
        }],
    })
}

fn api_group_json(group: &str) -> Value {
    let gv = json!({ "groupVersion": format!("{group}/v1"), "version": "v1" });
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [gv],
        "preferredVersion": gv,
    })
}

fn api_group_list_json() -> Value {
    let groups: Vec<Value> = GROUPS
        .iter()
        .map(|g| {
            let mut v = api_group_json(g);
            let o = v.as_object_mut().expect("object");
            o.remove("kind");
            o.remove("apiVersion");
            v
        })
        .collect();
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups })
}

fn resource_list_json(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for rt in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut verbs = vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        if rt.namespaced {
            verbs.insert(1, "deletecollection");
        }
        let mut r = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": verbs,
        });
        if !rt.short_names.is_empty() {
            r["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            r["categories"] = json!(rt.categories);
        }
        resources.push(r);
        if rt.plural == "pods" {
            resources.push(json!({
                "name": "pods/portforward",
                "singularName": "",
                "namespaced": true,
                "kind": "PodPortForwardOptions",
                "verbs": ["create", "get"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

// ---------------------------------------------------------------------------------------------
// pods/portforward
// ---------------------------------------------------------------------------------------------

/// `GET|POST /api/v1/namespaces/NS/pods/NAME/portforward`: authorisation, pod lookup, then the
/// tunnelling handler or the upgrade-aware proxy.
async fn portforward(
    state: &Arc<State>,
    user: &User,
    peer: SocketAddr,
    ns: &str,
    pod: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let verb = match *req.method() {
        Method::POST => "create",
        Method::GET => "get",
        _ => return method_not_allowed(),
    };
    let reject = |resp: Response<Body>| {
        state.record_pf(ns, pod, PfKind::Rejected(resp.status().as_u16()));
        resp
    };
    if let Err(resp) = authorize_portforward(user, verb, ns, pod) {
        return reject(resp);
    }
    let backend = {
        let store = state.store();
        if store.get(PODS, ns, pod).is_none() {
            return reject(not_found(&RESOURCES[PODS], pod));
        }
        store
            .backends
            .get(&(ns.to_owned(), pod.to_owned()))
            .cloned()
    };
    let backend = match backend {
        Some(Backend::None) | None => {
            return reject(bad_request(&format!(
                "pod {pod} does not have a host assigned"
            )));
        }
        Some(b) => b,
    };
    let headers = req.headers();
    let (resp, kind) = if state.opts.tunnel && is_tunnel_request(headers) {
        tunnel(&backend, peer, req).await
    } else if is_upgrade_request(headers) {
        let kind = if is_websocket_request(headers) {
            PfKind::WebSocket
        } else {
            PfKind::Spdy
        };
        upgrade_proxy(&backend, peer, req, kind).await
    } else {
        (
            bad_request("Upgrade request required"),
            PfKind::Rejected(400),
        )
    };
    state.record_pf(ns, pod, kind);
    resp
}

/// `httpstream.IsUpgradeRequest`: a `Connection` header mentioning `upgrade`.
fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("upgrade"))
}

/// `wsstream.IsWebSocketRequest`.
fn is_websocket_request(headers: &HeaderMap) -> bool {
    is_upgrade_request(headers)
        && header_str(headers, header::UPGRADE).eq_ignore_ascii_case("websocket")
}

/// The subprotocols a WebSocket client offers, in order.
fn offered_subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// `wsstream.IsWebSocketRequestWithTunnelingProtocol`.
fn is_tunnel_request(headers: &HeaderMap) -> bool {
    is_websocket_request(headers)
        && offered_subprotocols(headers)
            .iter()
            .any(|p| p.starts_with(TUNNEL_PREFIX))
}

/// The stream-server URL for this request. The API server takes the ports as `ports=`
/// (`PodPortForwardOptions`) and hands them to kubelet as `port=` parameters, which kubelet
/// passes to the runtime's CRI PortForward: a fresh one-time URL from CRI with that port list,
/// or the fixed URL with `port=` parameters appended.
async fn backend_uri(backend: &Backend, client_query: Option<&str>) -> Result<Uri, String> {
    let ports: Vec<u16> = parse_query(client_query)
        .get("ports")
        .into_iter()
        .flatten()
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let url = match backend {
        Backend::Cri { endpoint, sandbox } => {
            let mut cri = ringfwd::control::cri::CriClient::connect(endpoint)
                .await
                .map_err(|e| format!("unable to reach the container runtime: {e}"))?;
            cri.port_forward(sandbox, &ports)
                .await
                .map_err(|e| format!("unable to get a port-forward URL: {e}"))?
                .expose()
                .to_string()
        }
        Backend::Url(url) if ports.is_empty() => url.clone(),
        Backend::Url(url) => {
            let q: Vec<String> = ports.iter().map(|p| format!("port={p}")).collect();
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}{}", q.join("&"))
        }
        Backend::None => return Err("pod has no backend".into()),
    };
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("bad backend URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!("unsupported backend URL {url:?}"));
    }
    Ok(uri)
}

/// The request headers as the upgrade-aware proxy forwards them: the client's, minus its
/// credentials (the authentication filter removes them) and `Host`, plus `X-Forwarded-For`.
fn forwarded_headers(headers: &HeaderMap, peer: SocketAddr) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::AUTHORIZATION);
    h.remove(header::HOST);
    h.append("x-forwarded-for", header_value(&peer.ip().to_string()));
    h
}

/// Sends the upgrade request to the backend over a fresh connection and returns its response.
async fn backend_request(
    uri: &Uri,
    method: Method,
    mut headers: HeaderMap,
) -> Result<Response<Incoming>, String> {
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let tcp = TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("error dialing backend: dial tcp {authority}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("error dialing backend: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    headers.insert(header::HOST, header_value(&authority));
    let mut req = Request::new(Empty::new());
    *req.method_mut() = method;
    *req.uri_mut() = uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .parse()
        .map_err(|e| format!("bad backend path: {e}"))?;
    *req.headers_mut() = headers;
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("error sending request: {e}"))
}

/// What the upgrade-aware proxy answers when the backend did not switch protocols: a refusal
/// (`>= 400`) verbatim, anything else as a `500`.
async fn relay_refusal(resp: Response<Incoming>) -> Response<Body> {
    let status = resp.status();
    if status.as_u16() < 400 {
        let msg = format!("invalid upgrade response: status code {}", status.as_u16());
        return status_response(500, "", &msg, None);
    }
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut out = Response::new(full(body));
    *out.status_mut() = status;
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH
            && name != header::TRANSFER_ENCODING
            && name != header::CONNECTION
        {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// The upgrade-aware proxy: relay the upgrade to the backend; after a `101`, relay the
/// backend's headers to the client and splice the two connections.
async fn upgrade_proxy(
    backend: &Backend,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    kind: PfKind,
) -> (Response<Body>, PfKind) {
    let uri = match backend_uri(backend, req.uri().query()).await {
        Ok(u) => u,
        Err(e) => return (status_response(500, "", &e, None), PfKind::Rejected(500)),
    };
    let headers = forwarded_headers(req.headers(), peer);
    let mut backend_resp = match backend_request(&uri, req.method().clone(), headers).await {
        Ok(r) => r,
        Err(e) => return (status_response(500, "", &e, None), PfKind::Rejected(500)),
    };
    if backend_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let resp = relay_refusal(backend_resp).await;
        let code = resp.status().as_u16();
        return (resp, PfKind::Rejected(code));
    }
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *resp.headers_mut() = backend_resp.headers().clone();
    let client_side = hyper::upgrade::on(&mut req);
    let backend_side = hyper::upgrade::on(&mut backend_resp);
    tokio::spawn(async move {
        match tokio::try_join!(client_side, backend_side) {
            Ok((client, backend)) => splice(client, backend).await,
            Err(e) => eprintln!("fake apiserver: upgrade failed: {e}"),
        }
    });
    (resp, kind)
}

/// Copies bytes both ways until either direction ends, then closes both connections (the
/// upgrade-aware proxy's semantics: no half-close is passed on).
async fn splice(client: Upgraded, backend: Upgraded) {
    let (cr, mut cw) = tokio::io::split(TokioIo::new(client));
    let (br, mut bw) = tokio::io::split(TokioIo::new(backend));
    let mut cr = tokio::io::BufReader::with_capacity(SPLICE_BUFFER, cr);
    let mut br = tokio::io::BufReader::with_capacity(SPLICE_BUFFER, br);
    tokio::select! {
        _ = tokio::io::copy_buf(&mut cr, &mut bw) => {}
        _ = tokio::io::copy_buf(&mut br, &mut cw) => {}
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, cw.shutdown()).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, bw.shutdown()).await;
}

/// The KEP-4006 tunnelling handler: upgrade the backend with plain SPDY first, then answer the
/// client's WebSocket handshake with the tunnel subprotocol and carry SPDY in binary messages.
async fn tunnel(
    backend: &Backend,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> (Response<Body>, PfKind) {
    let offered = offered_subprotocols(req.headers());
    let spdy_protocols: Vec<&str> = offered
        .iter()
        .filter_map(|p| p.strip_prefix(TUNNEL_PREFIX))
        .filter(|p| p.ends_with(".k8s.io"))
        .collect();
    if spdy_protocols.is_empty() {
        let msg = "unable to upgrade: no tunneling spdy protocols provided";
        return (
            text_response(StatusCode::BAD_REQUEST, msg),
            PfKind::Rejected(400),
        );
    }
    let uri = match backend_uri(backend, req.uri().query()).await {
        Ok(u) => u,
        Err(e) => return (status_response(500, "", &e, None), PfKind::Rejected(500)),
    };
    let headers = spdy_request_headers(req.headers(), peer, &spdy_protocols);
    let mut backend_resp = match backend_request(&uri, Method::POST, headers).await {
        Ok(r) => r,
        Err(e) => return (status_response(500, "", &e, None), PfKind::Rejected(500)),
    };
    if backend_resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let resp = relay_refusal(backend_resp).await;
        let code = resp.status().as_u16();
        return (resp, PfKind::Rejected(code));
    }
    let bh = backend_resp.headers();
    if !header_str(bh, header::CONNECTION)
        .to_ascii_lowercase()
        .contains("upgrade")
        || !header_str(bh, header::UPGRADE)
            .to_ascii_lowercase()
            .contains("spdy/3.1")
    {
        let msg = "unable to upgrade: missing upgrade headers in response";
        return (
            text_response(StatusCode::INTERNAL_SERVER_ERROR, msg),
            PfKind::Rejected(500),
        );
    }
    // Translate the backend's chosen protocol back into the tunnel subprotocol.
    let chosen = match header_str(bh, STREAM_PROTOCOL).trim() {
        "" => None,
        p => Some(format!("{TUNNEL_PREFIX}{p}")).filter(|t| offered.contains(t)),
    };
    let key = match check_websocket_handshake(&req) {
        Ok(k) => k,
        Err(resp) => {
            let code = resp.status().as_u16();
            return (resp, PfKind::Rejected(code));
        }
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        header_value(&accept_key(&key)),
    );
    if let Some(p) = &chosen {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, header_value(p));
    }
    let client_side = hyper::upgrade::on(&mut req);
    let backend_side = hyper::upgrade::on(&mut backend_resp);
    tokio::spawn(async move {
        match tokio::try_join!(client_side, backend_side) {
            Ok((client, backend)) => run_tunnel(client, backend).await,
            Err(e) => eprintln!("fake apiserver: tunnel upgrade failed: {e}"),
        }
    });
    (resp, PfKind::Tunnel)
}

/// `createSPDYRequest`: the WebSocket request turned into a SPDY upgrade for the backend.
fn spdy_request_headers(headers: &HeaderMap, peer: SocketAddr, protocols: &[&str]) -> HeaderMap {
    let mut h = forwarded_headers(headers, peer);
    for name in [
        header::SEC_WEBSOCKET_PROTOCOL,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::UPGRADE,
        HeaderName::from_static(STREAM_PROTOCOL),
    ] {
        h.remove(name);
    }
    h.insert(header::UPGRADE, HeaderValue::from_static(SPDY_31));
    for p in protocols {
        h.append(STREAM_PROTOCOL, header_value(p));
    }
    h
}

/// gorilla/websocket's `Upgrader` checks; returns the `Sec-WebSocket-Key`.
fn check_websocket_handshake(req: &Request<Incoming>) -> Result<String, Response<Body>> {
    let h = req.headers();
    let refuse = |status: StatusCode, why: &str| {
        let mut r = text_response(status, why);
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        Err(r)
    };
    let prefix = "websocket: the client is not using the websocket protocol:";
    if !is_upgrade_request(h) {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("{prefix} 'upgrade' token not found in 'Connection' header"),
        );
    }
    if !header_str(h, header::UPGRADE).eq_ignore_ascii_case("websocket") {
        return refuse(
            StatusCode::BAD_REQUEST,
            &format!("{prefix} 'websocket' token not found in 'Upgrade' header"),
        );
    }
    if req.method() != Method::GET {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{prefix} request method is not GET"),
        );
    }
    if header_str(h, header::SEC_WEBSOCKET_VERSION).trim() != "13" {
        return refuse(
            StatusCode::BAD_REQUEST,
            "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
        );
    }
    let key = header_str(h, header::SEC_WEBSOCKET_KEY).trim();
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 encoded value of 16-byte in length",
        );
    }
    Ok(key.to_owned())
}

/// The client side of a tunnel's writes, shared by both directions.
struct WsWriter<W> {
    io: W,
    /// A close frame went out (ours or the echo of the client's).
    close_sent: bool,
    /// A write was cut short: the stream may end mid-frame, so no close frame may follow.
    torn: bool,
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.torn = true;
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        self.torn = false;
        Ok(())
    }
}

/// Runs an established tunnel until either side ends, then closes both: a close frame (1000)
/// to the client unless one was already sent, and the backend connection.
async fn run_tunnel(client: Upgraded, backend: Upgraded) {
    let (mut cr, cw) = tokio::io::split(TokioIo::new(client));
    let (mut br, mut bw) = tokio::io::split(TokioIo::new(backend));
    let writer = tokio::sync::Mutex::new(WsWriter {
        io: cw,
        close_sent: false,
        torn: false,
    });
    let why = tokio::select! {
        why = tunnel_upstream(&mut cr, &mut bw, &writer) => why,
        why = tunnel_downstream(&mut br, &writer) => why,
    };
    eprintln!("fake apiserver: tunnel closing: {why}");
    let mut w = writer.lock().await;
    if !w.close_sent && !w.torn {
        let mut frame = BytesMut::new();
        encode_frame(
            &mut frame,
            true,
            Opcode::Close,
            None,
            &1000u16.to_be_bytes(),
        );
        let _ = tokio::time::timeout(CLOSE_GRACE, w.send(&frame)).await;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, w.io.shutdown()).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, bw.shutdown()).await;
}

/// Client → backend: unwrap binary messages into the backend's SPDY byte stream; answer pings;
/// stop at the client's close (echoed), a protocol error, a text message or end of stream.
async fn tunnel_upstream<R, B, W>(
    client: &mut R,
    backend: &mut B,
    writer: &tokio::sync::Mutex<WsWriter<W>>,
) -> String
where
    R: AsyncRead + Unpin,
    B: AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut codec = WsCodec::new(Role::Server, 0);
    let mut wire = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            let end = match codec.read(&mut wire) {
                Ok(None) => break,
                Ok(Some(Message::Binary(data))) => match backend.write_all(&data).await {
                    Ok(()) => None,
                    Err(e) => Some(format!("writing to the backend: {e}")),
                },
                Ok(Some(Message::Ping(_) | Message::Pong(_))) => None,
                Ok(Some(Message::Text(_))) => Some("client sent a text message".to_owned()),
                Ok(Some(Message::Close(cf))) => Some(format!("client closed ({})", cf.code)),
                Err(e) => Some(format!("client WebSocket error: {e}")),
            };
            if let Some(control) = codec.poll_transmit() {
                let mut w = writer.lock().await;
                if let Err(e) = w.send(&control).await {
                    return format!("writing to the client: {e}");
                }
                w.close_sent |= codec.close_sent();
            }
            if let Some(why) = end {
                return why;
            }
        }
        match client.read_buf(&mut wire).await {
            Ok(0) => return "client ended without a close frame".to_owned(),
            Err(e) => return format!("reading from the client: {e}"),
            Ok(_) => {}
        }
    }
}

/// Backend → client: every read becomes one unmasked binary message.
async fn tunnel_downstream<B, W>(
    backend: &mut B,
    writer: &tokio::sync::Mutex<WsWriter<W>>,
) -> String
where
    B: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; TUNNEL_READ];
    let mut frame = BytesMut::with_capacity(TUNNEL_READ + 16);
    loop {
        let n = match backend.read(&mut buf).await {
            Ok(0) => return "backend ended".to_owned(),
            Err(e) => return format!("reading from the backend: {e}"),
            Ok(n) => n,
        };
        frame.clear();
        encode_frame(&mut frame, true, Opcode::Binary, None, &buf[..n]);
        if let Err(e) = writer.lock().await.send(&frame).await {
            return format!("writing to the client: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Object builders
// ---------------------------------------------------------------------------------------------

fn labels_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Value {
    Value::Object(
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .collect(),
    )
}

fn owner_of(obj: &Value, pod_labels: Vec<(String, String)>) -> Owner {
    Owner {
        api_version: str_at(obj, "/apiVersion").to_owned(),
        kind: str_at(obj, "/kind").to_owned(),
        name: str_at(obj, "/metadata/name").to_owned(),
        uid: str_at(obj, "/metadata/uid").to_owned(),
        pod_labels,
    }
}

fn owner_reference(api_version: &str, kind: &str, name: &str, uid: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

fn namespace_json(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": { "kubernetes.io/metadata.name": name } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" },
    })
}

fn pod_json(def: &PodDef, ip: &str) -> Value {
    let now = now_rfc3339();
    let owner_labels = def.owner.iter().flat_map(|o| o.pod_labels.iter());
    let labels = labels_map(
        def.labels
            .iter()
            .chain(owner_labels)
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let ports: Vec<Value> = def
        .container_ports
        .iter()
        .map(|(name, port)| {
            let mut p = json!({ "containerPort": port, "protocol": "TCP" });
            if let Some(n) = name {
                p["name"] = json!(n);
            }
            p
        })
        .collect();
    let scheduled = !matches!(def.backend, Backend::None);
    let running = def.phase == "Running";
    let cond = |t: &str, ok: bool| {
        json!({
            "type": t,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": now,
        })
    };
    let state = if running {
        json!({ "running": { "startedAt": now } })
    } else {
        json!({ "waiting": { "reason": "ContainerCreating" } })
    };
    let mut container_status = json!({
        "name": "main",
        "image": IMAGE,
        "imageID": "",
        "ready": def.ready,
        "restartCount": 0,
        "started": running,
        "state": state,
    });
    if running {
        container_status["containerID"] = json!(format!("containerd://{}", random_hex(32)));
    }
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": def.name,
            "namespace": def.namespace,
            "labels": labels,
        },
        "spec": {
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "ports": ports,
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            }],
            "dnsPolicy": "ClusterFirst",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": {
            "phase": def.phase,
            "conditions": [
                cond("PodReadyToStartContainers", running),
                cond("Initialized", scheduled),
                cond("Ready", def.ready),
                cond("ContainersReady", def.ready),
                cond("PodScheduled", scheduled),
            ],
            "containerStatuses": [container_status],
            "qosClass": "BestEffort",
        },
    });
    if let Some(o) = &def.owner {
        pod["metadata"]["ownerReferences"] =
            json!([owner_reference(&o.api_version, &o.kind, &o.name, &o.uid)]);
    }
    if scheduled {
        pod["spec"]["nodeName"] = json!(NODE_NAME);
        let status = &mut pod["status"];
        status["hostIP"] = json!("10.0.0.1");
        status["hostIPs"] = json!([{ "ip": "10.0.0.1" }]);
        status["startTime"] = json!(now);
        if running {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
        }
    }
    pod
}

fn target_port_json(t: &IntOrString) -> Value {
    match t {
        IntOrString::Int(p) => json!(p),
        IntOrString::Str(s) => json!(s),
    }
}

fn service_json(
    name: &str,
    namespace: &str,
    selector: &[(&str, &str)],
    ports: &[ServicePortDef],
    ip: &str,
) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut v = json!({
                "port": p.port,
                "protocol": "TCP",
                "targetPort": target_port_json(&p.target_port),
            });
            if let Some(n) = &p.name {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let mut svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "internalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports,
            "sessionAffinity": "None",
            "type": "ClusterIP",
        },
        "status": { "loadBalancer": {} },
    });
    if !selector.is_empty() {
        svc["spec"]["selector"] = labels_map(selector.iter().copied());
    }
    svc
}

/// A service port's target on a pod: the number, or the pod's container port of that name.
fn resolve_target_port(svc_port: &Value, pod: &Value) -> Option<u64> {
    match &svc_port["targetPort"] {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => pod["spec"]["containers"]
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64()),
        _ => svc_port["port"].as_u64(),
    }
}

fn pod_is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn target_ref(pod: &Value) -> Value {
    json!({
        "kind": "Pod",
        "name": pod["metadata"]["name"],
        "namespace": pod["metadata"]["namespace"],
        "uid": pod["metadata"]["uid"],
    })
}

/// Pods that have an IP, i.e. ones the endpoint controllers would list.
fn addressable(pods: &[Value]) -> impl Iterator<Item = &Value> {
    pods.iter().filter(|p| p["status"]["podIP"].is_string())
}

fn endpoints_json(svc: &Value, pods: &[Value]) -> Value {
    let (mut ready, mut not_ready) = (Vec::new(), Vec::new());
    for pod in addressable(pods) {
        let addr = json!({
            "ip": pod["status"]["podIP"],
            "nodeName": pod["spec"]["nodeName"],
            "targetRef": target_ref(pod),
        });
        if pod_is_ready(pod) {
            ready.push(addr)
        } else {
            not_ready.push(addr)
        }
    }
    let first = addressable(pods).next();
    let ports: Vec<Value> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = resolve_target_port(p, first?)?;
            let mut v = json!({ "port": port, "protocol": "TCP" });
            if p["name"].is_string() {
                v["name"] = p["name"].clone();
            }
            Some(v)
        })
        .collect();
    let mut subset = json!({ "ports": ports });
    if !ready.is_empty() {
        subset["addresses"] = json!(ready);
    }
    if !not_ready.is_empty() {
        subset["notReadyAddresses"] = json!(not_ready);
    }
    let subsets = if first.is_some() {
        json!([subset])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": svc["metadata"]["name"],
            "namespace": svc["metadata"]["namespace"],
            "labels": svc["metadata"]["labels"].as_object().cloned().unwrap_or_default(),
        },
        "subsets": subsets,
    })
}

fn endpointslice_json(svc: &Value, pods: &[Value]) -> Value {
    let name = str_at(svc, "/metadata/name");
    let uid = str_at(svc, "/metadata/uid");
    let endpoints: Vec<Value> = addressable(pods)
        .map(|pod| {
            let ready = pod_is_ready(pod);
            json!({
                "addresses": [pod["status"]["podIP"]],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "nodeName": pod["spec"]["nodeName"],
                "targetRef": target_ref(pod),
            })
        })
        .collect();
    let first = addressable(pods).next();
    let ports: Vec<Value> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            json!({
                "name": p["name"].as_str().unwrap_or(""),
                "port": first.and_then(|pod| resolve_target_port(p, pod)),
                "protocol": "TCP",
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-{}", &uid.replace('-', "")[..5.min(uid.len())]),
            "namespace": svc["metadata"]["namespace"],
            "generateName": format!("{name}-"),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "ownerReferences": [owner_reference("v1", "Service", name, uid)],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn pod_template(labels: &Value) -> Value {
    json!({
        "metadata": { "labels": labels },
        "spec": {
            "containers": [{ "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent" }],
            "restartPolicy": "Always",
        },
    })
}

fn deployment_json(
    name: &str,
    namespace: &str,
    match_labels: &[(&str, &str)],
    replicas: u32,
) -> Value {
    let labels = labels_map(match_labels.iter().copied());
    let now = now_rfc3339();
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "generation": 1,
            "annotations": { "deployment.kubernetes.io/revision": "1" },
        },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": labels },
            "template": pod_template(&labels),
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxSurge": "25%", "maxUnavailable": "25%" },
            },
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
        },
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [
                { "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                  "lastUpdateTime": now, "lastTransitionTime": now },
                { "type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                  "lastUpdateTime": now, "lastTransitionTime": now },
            ],
        },
    })
}

fn replicaset_json(
    deploy: &Value,
    hash: &str,
    match_labels: &[(&str, &str)],
    replicas: u32,
) -> Value {
    let name = str_at(deploy, "/metadata/name");
    let labels = labels_map(
        match_labels
            .iter()
            .copied()
            .chain([("pod-template-hash", hash)]),
    );
    json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{name}-{hash}"),
            "namespace": deploy["metadata"]["namespace"],
            "labels": labels,
            "generation": 1,
            "annotations": {
                "deployment.kubernetes.io/desired-replicas": replicas.to_string(),
                "deployment.kubernetes.io/max-replicas": (replicas + replicas.div_ceil(4)).to_string(),
                "deployment.kubernetes.io/revision": "1",
            },
            "ownerReferences": [owner_reference("apps/v1", "Deployment", name, str_at(deploy, "/metadata/uid"))],
        },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": labels },
            "template": pod_template(&labels),
        },
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "fullyLabeledReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        },
    })
}

fn statefulset_json(
    name: &str,
    namespace: &str,
    match_labels: &[(&str, &str)],
    revision: &str,
) -> Value {
    let labels = labels_map(match_labels.iter().copied());
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": name, "namespace": namespace, "labels": labels, "generation": 1 },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "serviceName": name,
            "template": pod_template(&labels),
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "partition": 0 } },
            "revisionHistoryLimit": 10,
        },
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "readyReplicas": 1,
            "availableReplicas": 1,
            "currentReplicas": 1,
            "updatedReplicas": 1,
            "currentRevision": revision,
            "updateRevision": revision,
            "collisionCount": 0,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("OS randomness");
    b
}

fn random_hex(n_bytes: usize) -> String {
    let mut b = vec![0u8; n_bytes];
    getrandom::fill(&mut b).expect("OS randomness");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A version-4 UUID, as object uids are.
fn random_uid() -> String {
    let mut b: [u8; 16] = random_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// 10 characters from the alphabet Kubernetes uses for generated names and hashes.
fn pod_template_hash() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<10>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now as RFC 3339 UTC with second precision, like `metav1.Time`.
fn now_rfc3339() -> String {
    let secs = unix_now();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_rfc3339(t: &str) -> Option<u64> {
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let secs = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    u64::try_from(secs).ok()
}

/// The age of an object as the API server prints it in tables (`duration.HumanDuration`):
/// `45s`, `3m12s`, `25m`, `4h5m`, `20h`, `3d4h`, `30d`, `2y100d`.
fn human_age(created: &str) -> String {
    let Some(t) = parse_rfc3339(created) else {
        return "<unknown>".to_owned();
    };
    let s = unix_now().saturating_sub(t);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let pair = |big: u64, bu: &str, small: u64, su: &str| {
        if small == 0 {
            format!("{big}{bu}")
        } else {
            format!("{big}{bu}{small}{su}")
        }
    };
    match () {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => pair(m, "m", s % 60, "s"),
        _ if m < 180 => format!("{m}m"),
        _ if h < 8 => pair(h, "h", m % 60, "m"),
        _ if h < 48 => format!("{h}h"),
        _ if h < 192 => pair(d, "d", h % 24, "h"),
        _ if d < 730 => format!("{d}d"),
        _ if d < 2920 => pair(d / 365, "y", d % 365, "d"),
        _ => format!("{}y", d / 365),
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
