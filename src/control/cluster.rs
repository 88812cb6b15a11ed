//! The API-server path: kubeconfig, kubectl-style targets, and the port-forward upgrade.
//!
//! This module owns everything `kubectl port-forward` does before bytes flow: loading the
//! kubeconfig (every auth kind the `kube` crate supports: client certificates, bearer tokens,
//! token files, exec plugins, OIDC), turning `svc/NAME`, `deploy/NAME`, ... into one pod the way
//! kubectl picks it, translating named and service ports into container ports, and upgrading
//! `POST /api/v1/namespaces/NS/pods/NAME/portforward` to a multiplexed byte stream. Following
//! the target's pods while a forward runs is [`super::follow`]'s; the target and port grammar
//! is [`super::target`]'s; what runs on the stream is the relay's business.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::ControlError;
use super::target::{Kind, LocalPort, PortRequest, PortSpec, RemotePort, Target};
use super::upgrade::{Protocol, Upgraded, error_message, prepare};
use crate::relay::TunnelIo;

/// Where to find the cluster: kubectl's global flags.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `--kubeconfig`; otherwise `KUBECONFIG` (a list, merged), otherwise `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub cluster: Option<String>,
    pub user: Option<String>,
    /// `-n`; otherwise the context's namespace, otherwise `default`.
    pub namespace: Option<String>,
    /// How long a workload target (`svc/`, `deploy/`, ...) may have no pod before we give up,
    /// as kubectl's `--pod-running-timeout`. Zero: do not wait.
    pub pod_running_timeout: Duration,
}

/// A client for the cluster and the namespace targets live in.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    pub server: String,
    pub pod_running_timeout: Duration,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("server", &self.server)
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// The process-wide TLS provider is ring's: kube builds its rustls config from the default.
/// Idempotent; call before building a client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// kube's default client stack (TLS from the kubeconfig, base URI, auth, extra headers,
/// retries of overloaded responses), on a connector whose sockets have TCP keepalive: the
/// port-forward upgrade holds its connection for as long as the forward runs, and a NAT or load
/// balancer on the way must not forget it while it is idle, nor a vanished API server hold it
/// forever. `kube::Client::try_from` offers no way to set this. Proxies in the kubeconfig are
/// refused, as they were by the default stack built without kube's proxy features.
fn client_with_keepalive(config: kube::Config) -> Result<kube::Client, kube::Error> {
    use kube::client::ConfigExt;
    use tower::ServiceBuilder;

    if let Some(proxy) = &config.proxy_url {
        return Err(kube::Error::ProxyProtocolUnsupported {
            proxy_url: Box::new(proxy.clone()),
        });
    }
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(crate::relay::KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(crate::relay::KEEPALIVE_INTERVAL));
    http.set_keepalive_retries(Some(crate::relay::KEEPALIVE_PROBES));
    let https = config.rustls_https_connector_with_connector(http)?;
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

impl Cluster {
    pub async fn connect(opts: &ClusterOptions) -> Result<Cluster, ControlError> {
        install_crypto_provider();
        let bad = |e: &dyn fmt::Display| ControlError::Kubeconfig(e.to_string());
        let kubeconfig = match &opts.kubeconfig {
            Some(p) => Kubeconfig::read_from(p).map_err(|e| {
                ControlError::Kubeconfig(format!("cannot read {}: {e}", p.display()))
            })?,
            None => Kubeconfig::read().map_err(|e| bad(&e))?,
        };
        let options = KubeConfigOptions {
            context: opts.context.clone(),
            cluster: opts.cluster.clone(),
            user: opts.user.clone(),
        };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| bad(&e))?;
        let namespace = opts
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string();
        let client = client_with_keepalive(config).map_err(|e| bad(&e))?;
        Ok(Cluster {
            client,
            namespace,
            server,
            pod_running_timeout: opts.pod_running_timeout,
        })
    }

    /// One line for a failed API call, kubectl's way for errors the server sent.
    pub(super) fn api_error(&self, e: kube::Error) -> ControlError {
        match e {
            kube::Error::Api(s) if !s.message.is_empty() => {
                let reason = if s.reason.is_empty() {
                    format!("HTTP {}", s.code)
                } else {
                    s.reason.clone()
                };
                ControlError::Api(format!("Error from server ({reason}): {}", s.message))
            }
            kube::Error::Api(s) => {
                ControlError::Api(format!("Error from server: HTTP {} {}", s.code, s.reason))
            }
            e => {
                let chain = error_chain(&e);
                match auth_failure(&e) {
                    Some(a) => {
                        // kube checks an OIDC issuer's certificate against the system's roots
                        // only; it ignores the kubeconfig's idp-certificate-authority(-data),
                        // which kubectl uses.
                        let oidc = matches!(a, kube::client::AuthError::Oidc(_));
                        let hint = if oidc && chain.contains("certificate") {
                            "; kube checks the OIDC issuer's certificate against the system's \
                             roots (or the PEM file in SSL_CERT_FILE), not \
                             idp-certificate-authority"
                        } else {
                            ""
                        };
                        ControlError::Api(format!(
                            "cannot get credentials for the API server {}: {chain}{hint}",
                            self.server
                        ))
                    }
                    None => ControlError::Api(format!(
                        "cannot reach the API server {}: {chain}",
                        self.server
                    )),
                }
            }
        }
    }

    async fn get<K>(&self, name: &str) -> Result<K, ControlError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + k8s_openapi::serde::de::DeserializeOwned
            + fmt::Debug,
        K::DynamicType: Default,
    {
        Api::<K>::namespaced(self.client.clone(), &self.namespace)
            .get(name)
            .await
            .map_err(|e| self.api_error(e))
    }

    /// The label selector (in query syntax) of a target that names several pods, and for
    /// `svc/` the service (its ports translate to container ports).
    async fn selector_of(
        &self,
        target: &Target,
    ) -> Result<(String, Option<Service>), ControlError> {
        let workload = |sel: Option<LabelSelector>| selector_string(sel);
        Ok(match target.kind {
            Kind::Pod => unreachable!("a pod is named, not selected"),
            Kind::Selector => (target.name.clone(), None),
            Kind::Service => {
                let svc: Service = self.get(&target.name).await?;
                let labels = svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.selector.clone())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        ControlError::Target(format!(
                            "service {} has no selector, so no pod to forward to",
                            target.name
                        ))
                    })?;
                (match_labels(&labels), Some(svc))
            }
            Kind::Deployment => {
                let d: Deployment = self.get(&target.name).await?;
                (workload(d.spec.map(|s| s.selector))?, None)
            }
            Kind::ReplicaSet => {
                let rs: ReplicaSet = self.get(&target.name).await?;
                (workload(rs.spec.map(|s| s.selector))?, None)
            }
            Kind::StatefulSet => {
                let s: StatefulSet = self.get(&target.name).await?;
                (workload(s.spec.map(|s| s.selector))?, None)
            }
        })
    }

    /// Resolve `target` to one pod, and `ports` to container port numbers on it.
    pub async fn resolve(
        &self,
        target: &Target,
        ports: &[PortRequest],
    ) -> Result<Resolved, ControlError> {
        let mut selector = None;
        let (pod, candidates, service) = match target.kind {
            Kind::Pod => (self.get::<Pod>(&target.name).await?, 1, None),
            _ => {
                let (sel, service) = self.selector_of(target).await?;
                let (pod, n) = self.pick_pod(target, selector.insert(sel)).await?;
                (pod, n, service)
            }
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        if phase != "Running" {
            return Err(ControlError::Target(format!(
                "pod {}/{name} is not running (phase {phase}): cannot forward to it",
                self.namespace
            )));
        }
        let ports = ports
            .iter()
            .map(|p| translate_port(p, &pod, service.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Resolved {
            pod: name,
            ready: pod_ready(&pod),
            candidates,
            ports,
            follow: Follow {
                target: target.clone(),
                selector,
            },
        })
    }

    /// Resolve `target` to the pods its selector matches, for `--spread`: every ready one
    /// takes connections, each on its own port for a `[LOCAL:]REMOTE` ([`Spreading::view`]).
    /// The forward's listeners know a port as the service port (`svc/`), the number asked for,
    /// or a port name as the most active pod has it (`deploy/`, `rs/`, `sts/`, `-l`). Waits for
    /// a first pod as [`resolve`](Self::resolve) does, not for a ready one.
    pub async fn resolve_spread(
        &self,
        target: &Target,
        requests: &[PortRequest],
    ) -> Result<Spreading, ControlError> {
        Spreading::check_target(target)?;
        let (selector, service) = self.selector_of(target).await?;
        let pods = self.wait_for_pods(target, &selector).await?;
        let first = pods
            .iter()
            .max_by_key(|p| activity(p))
            .expect("waited for one");
        let specs = requests
            .iter()
            .map(|r| match &service {
                Some(svc) => service_port(r, svc),
                None => translate_port(r, first, None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Spreading {
            target: target.clone(),
            namespace: self.namespace.clone(),
            selector,
            service,
            requests: requests.to_vec(),
            specs,
            pods,
        })
    }

    /// The pod kubectl would pick among those `selector` matches: the most "active" one
    /// (assigned, running, ready, ready longest, fewest restarts, oldest); and how many match.
    async fn pick_pod(
        &self,
        target: &Target,
        selector: &str,
    ) -> Result<(Pod, usize), ControlError> {
        let pods = self.wait_for_pods(target, selector).await?;
        let n = pods.len();
        let pod = pods.into_iter().max_by_key(activity);
        Ok((pod.expect("waited for one"), n))
    }

    /// The pods `selector` matches, at least one: while none matches, wait for one to appear,
    /// up to [`Cluster::pod_running_timeout`], as kubectl does (a deployment just applied, a
    /// statefulset scaled up from zero).
    async fn wait_for_pods(
        &self,
        target: &Target,
        selector: &str,
    ) -> Result<Vec<Pod>, ControlError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.namespace);
        let deadline = tokio::time::Instant::now() + self.pod_running_timeout;
        let mut said = false;
        loop {
            let pods = api
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| self.api_error(e))?;
            if !pods.items.is_empty() {
                return Ok(pods.items);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let waited = if said {
                    format!(
                        " after waiting {:?} (--pod-running-timeout)",
                        self.pod_running_timeout
                    )
                } else {
                    String::new()
                };
                return Err(ControlError::Target(format!(
                    "no pods in namespace {} match {target} (selector {selector}){waited}",
                    self.namespace
                )));
            }
            if !said {
                tracing::info!(
                    "no pod matches {target} (selector {selector}) yet; waiting up to {:?}",
                    self.pod_running_timeout
                );
                said = true;
            }
            // Watch from the list's version until something matching is added or changes, then
            // list again (the choice is made among all pods, not the first event's).
            let rv = pods.metadata.resource_version.unwrap_or_default();
            // The server closes a watch after its timeout; the API caps it below 295 s.
            let server_timeout = left.as_secs().clamp(1, 290) as u32;
            let wp = WatchParams::default()
                .labels(selector)
                .timeout(server_timeout);
            let appeared = async {
                let events = api.watch(&wp, &rv).await.map_err(|e| self.api_error(e))?;
                let mut events = std::pin::pin!(events);
                while let Some(ev) = events.try_next().await.map_err(|e| self.api_error(e))? {
                    // A pod added or changed, or an error event (410 Gone and the like): list
                    // again.
                    if let WatchEvent::Added(_) | WatchEvent::Modified(_) | WatchEvent::Error(_) =
                        ev
                    {
                        return Ok(());
                    }
                }
                Ok::<(), ControlError>(())
            };
            // On the deadline the next turn lists once more and gives up.
            if let Ok(r) = tokio::time::timeout(left, appeared).await {
                r?;
            }
        }
    }

    /// Upgrade a port-forward request for `pod` to `protocol`. `ports` only matter to
    /// `websocket`, which fixes them at upgrade.
    pub async fn upgrade(
        &self,
        pod: &str,
        protocol: Protocol,
        ports: &[u16],
    ) -> Result<Upgraded, ControlError> {
        let mut path = format!(
            "/api/v1/namespaces/{}/pods/{pod}/portforward",
            self.namespace
        );
        if protocol == Protocol::Websocket {
            let q: Vec<String> = ports.iter().map(|p| format!("ports={p}")).collect();
            path.push('?');
            path.push_str(&q.join("&"));
        }
        let (builder, ask) = prepare(protocol, &path);
        let req = builder
            .body(kube::client::Body::empty())
            .map_err(|e| ControlError::Api(format!("building the request for {path}: {e}")))?;
        let resp = self.client.send(req).await.map_err(|e| self.api_error(e))?;
        let status = resp.status();
        if status != http::StatusCode::SWITCHING_PROTOCOLS {
            let body = match resp.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Default::default(),
            };
            return Err(ControlError::ApiRejected {
                pod: format!("{}/{pod}", self.namespace),
                protocol: protocol.name(),
                status: status.as_u16(),
                message: error_message(&body),
            });
        }
        let half_close = ask.check(resp.headers())?;
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ControlError::Api(format!("upgrading {path}: {e}")))?;
        let io = TokioIo::new(up);
        let io: Box<dyn crate::relay::UpstreamIo> = match protocol {
            Protocol::Tunnel => {
                let mut seed = [0u8; 8];
                getrandom::fill(&mut seed).expect("OS randomness");
                Box::new(TunnelIo::new(io, &[], u64::from_le_bytes(seed)))
            }
            _ => Box::new(io),
        };
        Ok(Upgraded {
            io: io.into(),
            prefix: Default::default(),
            half_close,
        })
    }
}

/// The credential failure behind `e`, if that is what it is (kube reports it directly or
/// wrapped in its service stack's error).
fn auth_failure(e: &kube::Error) -> Option<&kube::client::AuthError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(a) = c.downcast_ref::<kube::client::AuthError>() {
            return Some(a);
        }
        cur = c.source();
    }
    None
}

/// An error and its causes on one line (`client error (Connect): tcp connect error: ...`),
/// without the wrapper names (`ServiceError:`) that say nothing to a user.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

/// Sort key for kubectl's choice among a workload's pods (its `ActivePods` order, reversed):
/// larger is better.
pub(super) fn activity(p: &Pod) -> impl Ord + use<> {
    use std::cmp::Reverse;
    let spec_node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    let status = p.status.clone().unwrap_or_default();
    let phase = match status.phase.as_deref() {
        Some("Running") => 2,
        Some("Unknown") => 1,
        Some("Pending") => 0,
        _ => -1,
    };
    let ready_cond = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True");
    let ready_since = ready_cond.and_then(|c| c.last_transition_time.clone());
    let restarts = status
        .container_statuses
        .iter()
        .flatten()
        .map(|c| c.restart_count)
        .max()
        .unwrap_or(0);
    let created = p.metadata.creation_timestamp.clone();
    (
        spec_node.is_some_and(|n| !n.is_empty()),
        phase,
        ready_cond.is_some(),
        ready_since.map(Reverse),
        Reverse(restarts),
        created.map(Reverse),
    )
}

pub(super) fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn match_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A workload's `LabelSelector` in the query syntax.
fn selector_string(sel: Option<LabelSelector>) -> Result<String, ControlError> {
    let sel = sel.unwrap_or_default();
    let mut parts = Vec::new();
    if let Some(m) = &sel.match_labels
        && !m.is_empty()
    {
        parts.push(match_labels(m));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => {
                return Err(ControlError::Target(format!(
                    "unsupported label selector operator {op:?}"
                )));
            }
        });
    }
    if parts.is_empty() {
        return Err(ControlError::Target(
            "the workload has an empty selector".into(),
        ));
    }
    Ok(parts.join(","))
}

/// A pod's container port called `name`.
fn named_container_port(pod: &Pod, name: &str) -> Result<u16, ControlError> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .ok_or_else(|| {
            ControlError::Target(format!(
                "pod {} has no container port named {name:?}",
                pod.metadata.name.as_deref().unwrap_or_default()
            ))
        })
}

/// The port of `svc` that `req` names (by number or name), its number, and its targetPort.
fn find_service_port<'a>(
    req: &PortRequest,
    svc: &'a Service,
) -> Result<(u16, Option<&'a IntOrString>), ControlError> {
    let svc_name = svc.metadata.name.as_deref().unwrap_or_default();
    let sp = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| match &req.remote {
            RemotePort::Number(n) => p.port == i32::from(*n),
            RemotePort::Name(name) => p.name.as_deref() == Some(name),
        })
        .ok_or_else(|| {
            ControlError::Target(format!("service {svc_name} has no port {}", req.remote))
        })?;
    Ok((
        u16::try_from(sp.port).unwrap_or_default(),
        sp.target_port.as_ref(),
    ))
}

fn local_port(req: &PortRequest, same: u16) -> u16 {
    match req.local {
        LocalPort::Same => same,
        LocalPort::Any => 0,
        LocalPort::Port(p) => p,
    }
}

/// `req` as a `--spread` forward of a service listens for it: the local port (the service
/// port, unless given), and the service port as the remote one (each pod has its own target
/// port for it).
fn service_port(req: &PortRequest, svc: &Service) -> Result<PortSpec, ControlError> {
    let (port, _) = find_service_port(req, svc)?;
    Ok(PortSpec {
        local: local_port(req, port),
        remote: port,
    })
}

/// kubectl's translation of one `[LOCAL:]REMOTE` to a local and a container port: a named
/// remote is a container port of the pod, or for a service, a service port whose targetPort
/// (a number, or a name looked up on the pod) is the container port. Without a local part, the
/// local port is the service port (for a service) or the container port.
fn translate_port(
    req: &PortRequest,
    pod: &Pod,
    svc: Option<&Service>,
) -> Result<PortSpec, ControlError> {
    let (remote, same_local) = match svc {
        None => {
            let remote = match &req.remote {
                RemotePort::Number(n) => *n,
                RemotePort::Name(name) => named_container_port(pod, name)?,
            };
            (remote, remote)
        }
        Some(svc) => {
            let svc_name = svc.metadata.name.as_deref().unwrap_or_default();
            let (svc_port, target_port) = find_service_port(req, svc)?;
            let remote = match target_port {
                None | Some(IntOrString::Int(0)) => svc_port,
                Some(IntOrString::Int(n)) => u16::try_from(*n).map_err(|_| {
                    ControlError::Target(format!("service {svc_name}: bad targetPort {n}"))
                })?,
                Some(IntOrString::String(name)) => named_container_port(pod, name)?,
            };
            (remote, svc_port)
        }
    };
    Ok(PortSpec {
        local: local_port(req, same_local),
        remote,
    })
}

/// A target resolved to a pod.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub pod: String,
    pub ready: bool,
    /// How many pods the target matched.
    pub candidates: usize,
    /// Local and container ports, in the order requested.
    pub ports: Vec<PortSpec>,
    /// What to follow when the pod goes away.
    pub follow: Follow,
}

/// What a forward to a cluster target follows when its pod goes away
/// ([`super::follow::follow_cluster`]).
#[derive(Debug, Clone)]
pub struct Follow {
    pub target: Target,
    /// A workload's label selector, in query syntax; `None` for a `pod/` target.
    pub selector: Option<String>,
}

/// A target resolved for `--spread`: its pods, and how each pod's ports are found.
#[derive(Debug, Clone)]
pub struct Spreading {
    pub target: Target,
    pub namespace: String,
    /// The label selector of its pods, in query syntax.
    pub selector: String,
    service: Option<Service>,
    requests: Vec<PortRequest>,
    /// What the forward listens on: the local port and the remote port as its listeners
    /// know it, in the order requested.
    pub specs: Vec<PortSpec>,
    /// The pods the selector matched when resolved.
    pub pods: Vec<Pod>,
}

impl Spreading {
    /// Whether `target` names several pods, as `--spread` needs.
    pub fn check_target(target: &Target) -> Result<(), ControlError> {
        match target.kind {
            Kind::Pod => Err(ControlError::Target(format!(
                "--spread needs a target with several pods (svc/, deploy/, rs/, sts/ or -l \
                 SELECTOR), not {target}"
            ))),
            _ => Ok(()),
        }
    }

    /// `pod`'s own port for each of the forward's ports (a named port looked up on it, as
    /// kubectl does for one pod), as `(forward's port, pod's port)`; and why it has none for
    /// some, one line each.
    pub fn ports_on(&self, pod: &Pod) -> (Vec<(u16, u16)>, Vec<String>) {
        let mut ports = Vec::new();
        let mut missing = Vec::new();
        for (req, spec) in self.requests.iter().zip(&self.specs) {
            match translate_port(req, pod, self.service.as_ref()) {
                Ok(p) => ports.push((spec.remote, p.remote)),
                Err(e) => missing.push(format!(
                    "{e}: connections to port {} go to the other pods",
                    spec.remote
                )),
            }
        }
        (ports, missing)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, ContainerStatus, PodCondition, PodSpec, PodStatus, ServicePort,
        ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    pub(in crate::control) fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    /// A pod with container ports `http` (8080) and `metrics` (9090).
    pub(in crate::control) fn pod(
        name: &str,
        phase: &str,
        ready_since: Option<&str>,
        restarts: i32,
        created: &str,
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(t(created)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![
                        ContainerPort {
                            name: Some("http".into()),
                            container_port: 8080,
                            ..Default::default()
                        },
                        ContainerPort {
                            name: Some("metrics".into()),
                            container_port: 9090,
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: ready_since.map(|s| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: Some(t(s)),
                        ..Default::default()
                    }]
                }),
                container_statuses: Some(vec![ContainerStatus {
                    restart_count: restarts,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn best(pods: Vec<Pod>) -> String {
        pods.into_iter()
            .max_by_key(activity)
            .unwrap()
            .metadata
            .name
            .unwrap()
    }

    #[test]
    fn picks_like_kubectl() {
        let old = "2026-01-01T00:00:00Z";
        let new = "2026-06-01T00:00:00Z";
        // Running beats pending, ready beats not ready.
        assert_eq!(
            best(vec![
                pod("pending", "Pending", None, 0, old),
                pod("running", "Running", None, 0, new),
            ]),
            "running"
        );
        assert_eq!(
            best(vec![
                pod("unready", "Running", None, 0, old),
                pod("ready", "Running", Some(new), 0, new),
            ]),
            "ready"
        );
        // Ready longer wins; then fewer restarts; then older.
        assert_eq!(
            best(vec![
                pod("recent", "Running", Some(new), 0, old),
                pod("long", "Running", Some(old), 0, new),
            ]),
            "long"
        );
        assert_eq!(
            best(vec![
                pod("flappy", "Running", Some(old), 5, old),
                pod("steady", "Running", Some(old), 0, new),
            ]),
            "steady"
        );
        assert_eq!(
            best(vec![
                pod("young", "Running", Some(old), 0, new),
                pod("elder", "Running", Some(old), 0, old),
            ]),
            "elder"
        );
    }

    fn svc(ports: Vec<(Option<&str>, i32, Option<IntOrString>)>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, port, target_port)| ServicePort {
                            name: name.map(Into::into),
                            port,
                            target_port,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ports_translate_like_kubectl() {
        let pod = pod("p", "Running", None, 0, "2026-01-01T00:00:00Z");
        let tr = |spec: &str, svc: Option<&Service>| {
            translate_port(&spec.parse().unwrap(), &pod, svc).map(|p| (p.local, p.remote))
        };
        // Pods: names are container ports; no local part means the same number.
        assert_eq!(tr("http", None).unwrap(), (8080, 8080));
        assert_eq!(tr("9000:metrics", None).unwrap(), (9000, 9090));
        assert_eq!(tr(":http", None).unwrap(), (0, 8080));
        assert!(tr("grpc", None).unwrap_err().to_string().contains("grpc"));
        // Services: the service port maps to its targetPort; a named targetPort is looked
        // up on the pod; no local part means the service port.
        let s = svc(vec![
            (Some("http"), 80, Some(IntOrString::String("http".into()))),
            (Some("admin"), 81, Some(IntOrString::Int(9090))),
            (Some("plain"), 82, None),
        ]);
        assert_eq!(tr("80", Some(&s)).unwrap(), (80, 8080));
        assert_eq!(tr("8000:http", Some(&s)).unwrap(), (8000, 8080));
        assert_eq!(tr("http", Some(&s)).unwrap(), (80, 8080));
        assert_eq!(tr(":admin", Some(&s)).unwrap(), (0, 9090));
        assert_eq!(tr("82", Some(&s)).unwrap(), (82, 82));
        assert!(
            tr("8080", Some(&s))
                .unwrap_err()
                .to_string()
                .contains("no port 8080")
        );
    }

    #[test]
    fn selectors_render_in_query_syntax() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "fe".to_string()),
            ])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "In".into(),
                values: Some(vec!["a".into(), "b".into()]),
            }]),
        };
        assert_eq!(
            selector_string(Some(sel)).unwrap(),
            "app=web,tier=fe,env in (a,b)"
        );
        assert!(selector_string(None).is_err());
    }

    /// A cluster from a kubeconfig with a bearer token: `{:?}` of it (and of a forward's
    /// upstream holding it) shows the server, never the token.
    /// A cluster client from a one-context kubeconfig (in `dir`) for `server` and `user`.
    async fn connect_to(dir: &tempfile::TempDir, server: &str, user: &str) -> Cluster {
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: k, cluster: {{server: '{server}'}}}}]\n\
                 users: [{{name: u, user: {user}}}]\n\
                 contexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n"
            ),
        )
        .unwrap();
        Cluster::connect(&ClusterOptions {
            kubeconfig: Some(path),
            ..ClusterOptions::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn debug_hides_kubeconfig_credentials() {
        const TOKEN: &str = "kubeconfig-bearer-0123456789abcdef";
        let dir = tempfile::tempdir().unwrap();
        let cluster = connect_to(
            &dir,
            "https://127.0.0.1:6443",
            &format!("{{token: {TOKEN}}}"),
        )
        .await;
        let upstream = super::super::forward::Upstream::Api {
            cluster: cluster.clone(),
            pod: "p".into(),
            follow: None,
        };
        for shown in [format!("{cluster:?}"), format!("{upstream:?}")] {
            assert!(!shown.contains(TOKEN), "{shown}");
            assert!(shown.contains("127.0.0.1:6443"), "{shown}");
        }
    }

    /// The API-server connection a forward holds for hours has TCP keepalive on: the client's
    /// own socket to a listener here, found among the process's sockets by its peer address.
    #[tokio::test]
    async fn api_server_socket_has_keepalive() {
        use std::os::fd::BorrowedFd;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = l.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cluster = connect_to(&dir, &format!("http://{server}"), "{}").await;
        // The request waits for an answer that never comes; its socket is open meanwhile.
        let call = tokio::spawn(async move { cluster.upgrade("p", Protocol::Spdy, &[80]).await });
        let (mut accepted, _) = l.accept().await.unwrap();
        // The request's first bytes: the client has set its socket up by then.
        let mut first = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut accepted, &mut first)
            .await
            .unwrap();
        assert_eq!(&first, b"POST");
        let mut found = 0;
        for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
            let Ok(fd) = entry.unwrap().file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // Safety: the fd is open for the duration of this check (the request that owns
            // it is still waiting), and it is only borrowed for getsockopt.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&fd);
            let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
            if peer != Some(server) {
                continue;
            }
            found += 1;
            assert!(sock.keepalive().unwrap(), "no SO_KEEPALIVE");
            assert_eq!(
                sock.tcp_keepalive_time().unwrap(),
                crate::relay::KEEPALIVE_IDLE
            );
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                crate::relay::KEEPALIVE_INTERVAL
            );
            assert_eq!(
                sock.tcp_keepalive_retries().unwrap(),
                crate::relay::KEEPALIVE_PROBES
            );
            assert!(sock.tcp_nodelay().unwrap());
        }
        assert_eq!(found, 1, "the client's socket to {server}");
        call.abort();
    }
}
