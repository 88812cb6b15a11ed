//! CRI (`runtime.v1.RuntimeService`) client: the way ringfwd asks a container runtime
//! (containerd, CRI-O) for a port-forward streaming URL, and the few sandbox calls the
//! integration fixtures need (run, status, stop, remove, list, version).
//!
//! Owns: the hand-written protobuf messages (only the fields we use, with the field numbers
//! of `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`; prost skips the rest), the gRPC channel
//! over the runtime's unix socket, and the mapping of gRPC failures to [`CriError`].
//! Must not touch: the streaming protocols spoken at the returned URL (`crate::proto`) or
//! the relay. No protoc and no build script: the unary calls are written the way tonic's
//! generated code writes them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, GrpcMethod, Status};

use crate::secret::SecretUrl;

/// The CRI service every call goes to.
const SERVICE: &str = "runtime.v1.RuntimeService";

/// How long to wait for the runtime socket to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Upper bound on any single call. RunPodSandbox is the slow one (image unpack, runc, CNI);
/// kubelet allows it 4 minutes, we stop well before a user would give up on a hung runtime.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The CRI API version we speak, sent in `VersionRequest`.
const CRI_API_VERSION: &str = "v1";

/// Errors from talking to the container runtime. Each renders as one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The runtime socket could not be reached (missing, permission denied, not a CRI server).
    #[error("cannot reach container runtime at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    /// The runtime does not know this pod sandbox id.
    #[error("pod sandbox {sandbox:?} not found in the container runtime")]
    NotFound { sandbox: String },
    /// The runtime answered the call with an error.
    #[error("CRI {method} failed ({}): {}", code_name(status.code()), status.message())]
    Rpc {
        method: &'static str,
        status: Status,
    },
    /// The runtime answered, but with something we cannot use.
    #[error("CRI {method} returned an unusable response: {reason}")]
    BadResponse {
        method: &'static str,
        reason: String,
    },
}

/// Hand-written subset of the runtime.v1 messages. Field numbers are from the CRI API
/// definition and must never be changed; fields we do not use are omitted (prost skips them).
pub mod proto {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionRequest {
        #[prost(string, tag = "1")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct VersionResponse {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(string, tag = "2")]
        pub runtime_name: String,
        #[prost(string, tag = "3")]
        pub runtime_version: String,
        #[prost(string, tag = "4")]
        pub runtime_api_version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxMetadata {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub uid: String,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(uint32, tag = "4")]
        pub attempt: u32,
    }

    /// `LinuxPodSandboxConfig`. A sandbox needs the message present (`linux: {}`), not filled.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinuxPodSandboxConfig {
        #[prost(string, tag = "1")]
        pub cgroup_parent: String,
        #[prost(map = "string, string", tag = "3")]
        pub sysctls: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxConfig {
        #[prost(message, optional, tag = "1")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(string, tag = "2")]
        pub hostname: String,
        #[prost(string, tag = "3")]
        pub log_directory: String,
        #[prost(map = "string, string", tag = "6")]
        pub labels: HashMap<String, String>,
        #[prost(map = "string, string", tag = "7")]
        pub annotations: HashMap<String, String>,
        #[prost(message, optional, tag = "8")]
        pub linux: Option<LinuxPodSandboxConfig>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub config: Option<PodSandboxConfig>,
        #[prost(string, tag = "2")]
        pub runtime_handler: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RunPodSandboxResponse {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// Request of StopPodSandbox, RemovePodSandbox (same shape: `pod_sandbox_id = 1`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxIdRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
    }

    /// StopPodSandboxResponse and RemovePodSandboxResponse are empty messages.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(bool, tag = "2")]
        pub verbose: bool,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum PodSandboxState {
        SandboxReady = 0,
        SandboxNotready = 1,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxNetworkStatus {
        #[prost(string, tag = "1")]
        pub ip: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatus {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(message, optional, tag = "5")]
        pub network: Option<PodSandboxNetworkStatus>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStatusResponse {
        #[prost(message, optional, tag = "1")]
        pub status: Option<PodSandboxStatus>,
        /// Runtime-specific JSON, only filled when `verbose` was set. containerd puts its
        /// sandbox info (pid, OCI runtime spec with the netns path) under the key `"info"`.
        #[prost(map = "string, string", tag = "2")]
        pub info: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxStateValue {
        #[prost(enumeration = "PodSandboxState", tag = "1")]
        pub state: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandboxFilter {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub state: Option<PodSandboxStateValue>,
        #[prost(map = "string, string", tag = "3")]
        pub label_selector: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxRequest {
        #[prost(message, optional, tag = "1")]
        pub filter: Option<PodSandboxFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodSandbox {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub metadata: Option<PodSandboxMetadata>,
        #[prost(enumeration = "PodSandboxState", tag = "3")]
        pub state: i32,
        #[prost(int64, tag = "4")]
        pub created_at: i64,
        #[prost(map = "string, string", tag = "5")]
        pub labels: HashMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodSandboxResponse {
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<PodSandbox>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PortForwardRequest {
        #[prost(string, tag = "1")]
        pub pod_sandbox_id: String,
        #[prost(int32, repeated, tag = "2")]
        pub port: Vec<i32>,
    }

    /// Its `url` is a credential: `Debug` shows it redacted.
    #[derive(Clone, PartialEq, prost::Message)]
    #[prost(skip_debug)]
    pub struct PortForwardResponse {
        #[prost(string, tag = "1")]
        pub url: String,
    }

    impl std::fmt::Debug for PortForwardResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PortForwardResponse")
                .field("url", &crate::secret::redact_url(&self.url))
                .finish()
        }
    }
}

pub use proto::{LinuxPodSandboxConfig, PodSandbox, PodSandboxConfig, PodSandboxMetadata};

impl PodSandboxConfig {
    /// The least a runtime accepts: metadata, hostname = name, a log directory and `linux: {}`.
    pub fn minimal(name: &str, namespace: &str, uid: &str, log_directory: &str) -> Self {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.to_owned(),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: log_directory.to_owned(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }
}

/// Whether a sandbox is running (`SANDBOX_READY`) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxState {
    Ready,
    NotReady,
}

/// What ringfwd and the fixtures need from PodSandboxStatus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxStatus {
    pub id: String,
    pub state: SandboxState,
    /// The pod's name and namespace from the sandbox metadata (empty if the runtime sent none).
    pub name: String,
    pub namespace: String,
    /// Pod IP, if the runtime set up networking.
    pub ip: Option<String>,
    /// Path of the sandbox's network namespace (containerd: `/var/run/netns/cni-...`), from
    /// the verbose info; `None` if the runtime does not report it.
    pub netns: Option<PathBuf>,
    /// PID of the sandbox (pause) process, from the verbose info.
    pub pid: Option<u32>,
}

/// One RPC of RuntimeService: its name (for errors and tracing) and its HTTP/2 path.
struct Method {
    name: &'static str,
    path: &'static str,
}

macro_rules! method {
    ($name:literal) => {
        Method {
            name: $name,
            path: concat!("/runtime.v1.RuntimeService/", $name),
        }
    };
}

const VERSION: Method = method!("Version");
const RUN_POD_SANDBOX: Method = method!("RunPodSandbox");
const STOP_POD_SANDBOX: Method = method!("StopPodSandbox");
const REMOVE_POD_SANDBOX: Method = method!("RemovePodSandbox");
const POD_SANDBOX_STATUS: Method = method!("PodSandboxStatus");
const LIST_POD_SANDBOX: Method = method!("ListPodSandbox");
const PORT_FORWARD: Method = method!("PortForward");

/// A connection to a CRI runtime over its unix socket. Cheap to clone (shares the channel).
#[derive(Clone, Debug)]
pub struct CriClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl CriClient {
    /// Connects to `endpoint`: `unix:///run/containerd/containerd.sock` or a bare socket path.
    /// Fails with [`CriError::Connect`] if the socket does not accept a connection.
    pub async fn connect(endpoint: &str) -> Result<Self, CriError> {
        let connect_err = |source| CriError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        };
        let path = socket_path(endpoint).map_err(connect_err)?;
        // The URI is a placeholder that tonic requires; the connector below ignores it.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| connect_err(root_io_error(&e)))?;
        Ok(CriClient {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// Asks the runtime for a streaming URL that forwards to `ports` of the sandbox. The URL is
    /// single-use and short-lived: ask again for every new streaming session. It is a
    /// credential (`/portforward/TOKEN`), hence a [`SecretUrl`], which prints redacted.
    ///
    /// Naming the ports matters: containerd's WebSocket port-forward only works for ports
    /// named here; SPDY takes the port per stream.
    pub async fn port_forward(
        &mut self,
        sandbox_id: &str,
        ports: &[u16],
    ) -> Result<SecretUrl, CriError> {
        let req = proto::PortForwardRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            port: ports.iter().map(|&p| i32::from(p)).collect(),
        };
        let resp: proto::PortForwardResponse = self
            .call_for_sandbox(&PORT_FORWARD, sandbox_id, req)
            .await?;
        if resp.url.is_empty() {
            return Err(CriError::BadResponse {
                method: PORT_FORWARD.name,
                reason: "empty url".into(),
            });
        }
        Ok(SecretUrl::new(resp.url))
    }

    /// Creates and starts a pod sandbox; returns its id once the runtime reports it ready.
    pub async fn run_pod_sandbox(&mut self, cfg: PodSandboxConfig) -> Result<String, CriError> {
        let req = proto::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        };
        let resp: proto::RunPodSandboxResponse = self
            .call(&RUN_POD_SANDBOX, req)
            .await
            .map_err(|status| rpc_error(&RUN_POD_SANDBOX, status))?;
        if resp.pod_sandbox_id.is_empty() {
            return Err(CriError::BadResponse {
                method: RUN_POD_SANDBOX.name,
                reason: "empty pod_sandbox_id".into(),
            });
        }
        Ok(resp.pod_sandbox_id)
    }

    /// State, IP, network namespace path and pause PID of a sandbox (asks for verbose info).
    pub async fn pod_sandbox_status(&mut self, id: &str) -> Result<SandboxStatus, CriError> {
        let req = proto::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: true,
        };
        let resp: proto::PodSandboxStatusResponse =
            self.call_for_sandbox(&POD_SANDBOX_STATUS, id, req).await?;
        let Some(status) = resp.status else {
            return Err(CriError::BadResponse {
                method: POD_SANDBOX_STATUS.name,
                reason: "no status".into(),
            });
        };
        let info = resp.info.get("info").map(String::as_str).unwrap_or("");
        let meta = status.metadata.unwrap_or_default();
        Ok(SandboxStatus {
            name: meta.name,
            namespace: meta.namespace,
            state: if status.state == proto::PodSandboxState::SandboxReady as i32 {
                SandboxState::Ready
            } else {
                SandboxState::NotReady
            },
            ip: status.network.map(|n| n.ip).filter(|ip| !ip.is_empty()),
            netns: netns_from_info(info),
            pid: pid_from_info(info),
            id: status.id,
        })
    }

    /// Whether a sandbox is ready, without the verbose info (cheap enough to ask every second).
    pub async fn pod_sandbox_state(&mut self, id: &str) -> Result<SandboxState, CriError> {
        let req = proto::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        };
        let resp: proto::PodSandboxStatusResponse =
            self.call_for_sandbox(&POD_SANDBOX_STATUS, id, req).await?;
        Ok(match resp.status {
            Some(s) if s.state == proto::PodSandboxState::SandboxReady as i32 => {
                SandboxState::Ready
            }
            _ => SandboxState::NotReady,
        })
    }

    /// Stops the sandbox's processes and releases its network. Idempotent in the runtime.
    pub async fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let req = proto::PodSandboxIdRequest {
            pod_sandbox_id: id.to_owned(),
        };
        let _: proto::Empty = self.call_for_sandbox(&STOP_POD_SANDBOX, id, req).await?;
        Ok(())
    }

    /// Removes a (stopped) sandbox. Idempotent in the runtime.
    pub async fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let req = proto::PodSandboxIdRequest {
            pod_sandbox_id: id.to_owned(),
        };
        let _: proto::Empty = self.call_for_sandbox(&REMOVE_POD_SANDBOX, id, req).await?;
        Ok(())
    }

    /// All sandboxes the runtime knows, optionally only those carrying every label in `labels`.
    pub async fn list_pod_sandboxes(
        &mut self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<PodSandbox>, CriError> {
        let req = proto::ListPodSandboxRequest {
            filter: Some(proto::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let resp: proto::ListPodSandboxResponse = self
            .call(&LIST_POD_SANDBOX, req)
            .await
            .map_err(|status| rpc_error(&LIST_POD_SANDBOX, status))?;
        Ok(resp.items)
    }

    /// The sandboxes in state `SANDBOX_READY` (the runtime filters).
    pub async fn ready_pod_sandboxes(&mut self) -> Result<Vec<PodSandbox>, CriError> {
        let req = proto::ListPodSandboxRequest {
            filter: Some(proto::PodSandboxFilter {
                state: Some(proto::PodSandboxStateValue {
                    state: proto::PodSandboxState::SandboxReady as i32,
                }),
                ..Default::default()
            }),
        };
        let resp: proto::ListPodSandboxResponse = self
            .call(&LIST_POD_SANDBOX, req)
            .await
            .map_err(|status| rpc_error(&LIST_POD_SANDBOX, status))?;
        Ok(resp.items)
    }

    /// Runtime name and version, e.g. `containerd 1.6.20~ds1 (CRI v1)`. Also the cheapest
    /// "is the runtime up" probe.
    pub async fn version(&mut self) -> Result<String, CriError> {
        let req = proto::VersionRequest {
            version: CRI_API_VERSION.to_owned(),
        };
        let resp: proto::VersionResponse = self
            .call(&VERSION, req)
            .await
            .map_err(|status| rpc_error(&VERSION, status))?;
        Ok(format!(
            "{} {} (CRI {})",
            resp.runtime_name, resp.runtime_version, resp.runtime_api_version
        ))
    }

    /// A call about one sandbox: an unknown id becomes [`CriError::NotFound`].
    async fn call_for_sandbox<Req, Resp>(
        &mut self,
        method: &Method,
        sandbox: &str,
        req: Req,
    ) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + 'static,
        Resp: prost::Message + Default + Send + 'static,
    {
        self.call(method, req).await.map_err(|status| {
            if is_not_found(&status) {
                CriError::NotFound {
                    sandbox: sandbox.to_owned(),
                }
            } else {
                rpc_error(method, status)
            }
        })
    }

    /// One unary call, as tonic's generated clients make it.
    async fn call<Req, Resp>(&mut self, method: &Method, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + 'static,
        Resp: prost::Message + Default + Send + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("runtime connection lost: {}", chain(&e))))?;
        let mut request = tonic::Request::new(req);
        request
            .extensions_mut()
            .insert(GrpcMethod::new(SERVICE, method.name));
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let resp = self
            .grpc
            .unary(request, PathAndQuery::from_static(method.path), codec)
            .await
            .map_err(with_cause)?;
        Ok(resp.into_inner())
    }
}

fn rpc_error(method: &Method, status: Status) -> CriError {
    CriError::Rpc {
        method: method.name,
        status,
    }
}

/// containerd answers an unknown sandbox id with NotFound; older runtimes and CRI-O have used
/// Unknown with a "not found" message, so accept both.
fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
        || (status.code() == Code::Unknown && status.message().contains("not found"))
}

/// `unix:///path`, `unix:/path` or a bare path, to the socket path.
fn socket_path(endpoint: &str) -> Result<PathBuf, std::io::Error> {
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "only unix:// endpoints are supported",
        ));
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty socket path",
        ));
    }
    Ok(PathBuf::from(path))
}

/// tonic wraps the connector's io::Error in two layers of transport errors whose own messages
/// say only "transport error"; dig out the io::Error so the user sees "No such file or
/// directory" or "Permission denied".
fn root_io_error(err: &(dyn std::error::Error + 'static)) -> std::io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return std::io::Error::new(io.kind(), io.to_string());
        }
        cur = e.source();
    }
    std::io::Error::other(chain(err))
}

/// A transport failure arrives as `Unknown: "transport error"` with the cause hidden in the
/// error source; put the cause into the message so the one-line error says what happened.
fn with_cause(status: Status) -> Status {
    let Some(cause) = std::error::Error::source(&status) else {
        return status;
    };
    let cause = chain(cause);
    let message = if cause.contains(status.message()) {
        cause
    } else {
        format!("{}: {cause}", status.message())
    };
    Status::new(status.code(), message)
}

/// An error and its sources, joined with ": ", skipping repeats (hyper and tonic often wrap
/// an error in one whose message already includes it).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !msg.ends_with(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        cur = e.source();
    }
    msg
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The network namespace path in containerd's verbose sandbox info: the OCI runtime spec
/// lists it as `{"type":"network","path":"/var/run/netns/cni-..."}`. A targeted scan instead
/// of a JSON parser: the project has no JSON dependency and Go's encoder emits this object
/// compactly, `type` before `path`.
fn netns_from_info(info: &str) -> Option<PathBuf> {
    const KEY: &str = r#"{"type":"network","path":""#;
    let start = info.find(KEY)? + KEY.len();
    let len = info[start..].find('"')?;
    let path = &info[start..start + len];
    (!path.is_empty() && !path.contains('\\')).then(|| PathBuf::from(path))
}

/// The sandbox process PID in containerd's verbose sandbox info (`"pid":1234`).
fn pid_from_info(info: &str) -> Option<u32> {
    const KEY: &str = r#""pid":"#;
    let start = info.find(KEY)? + KEY.len();
    let digits: &str = &info[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok().filter(|&pid| pid != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn port_forward_response_debug_hides_the_token() {
        let resp = proto::PortForwardResponse {
            url: "http://127.0.0.1:4242/portforward/Sing1eUseT0ken".into(),
        };
        let shown = format!("{resp:?}");
        assert!(!shown.contains("Sing1eUseT0ken"), "{shown}");
        assert!(
            shown.contains("127.0.0.1:4242/portforward/[redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn port_forward_request_wire_format() {
        // pod_sandbox_id = 1 (string), port = 2 (packed repeated int32).
        let req = proto::PortForwardRequest {
            pod_sandbox_id: "ab".into(),
            port: vec![80, 8080],
        };
        assert_eq!(
            req.encode_to_vec(),
            [0x0a, 2, b'a', b'b', 0x12, 3, 80, 0x90, 0x3f]
        );
    }

    #[test]
    fn minimal_config_sends_empty_linux_message() {
        let cfg = PodSandboxConfig::minimal("p", "ns", "u", "/l");
        let bytes = cfg.encode_to_vec();
        // Field 8, length-delimited, zero length: `linux: {}` must be on the wire.
        assert!(bytes.ends_with(&[0x42, 0]), "{bytes:?}");
    }

    #[test]
    fn status_response_decodes_state_and_info() {
        let resp = proto::PodSandboxStatusResponse {
            status: Some(proto::PodSandboxStatus {
                id: "x".into(),
                state: proto::PodSandboxState::SandboxNotready as i32,
                ..Default::default()
            }),
            info: [("info".to_owned(), "{}".to_owned())].into(),
        };
        let back = proto::PodSandboxStatusResponse::decode(&resp.encode_to_vec()[..]).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn endpoint_forms() {
        let want = PathBuf::from("/run/containerd/containerd.sock");
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            want
        );
        assert_eq!(
            socket_path("unix:/run/containerd/containerd.sock").unwrap(),
            want
        );
        assert_eq!(
            socket_path("/run/containerd/containerd.sock").unwrap(),
            want
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://").is_err());
    }

    #[test]
    fn info_scanning() {
        let info = r#"{"pid":4242,"processStatus":"running","runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"ipc"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}}"#;
        assert_eq!(
            netns_from_info(info),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        assert_eq!(pid_from_info(info), Some(4242));
        assert_eq!(netns_from_info("{}"), None);
        assert_eq!(pid_from_info(r#"{"pid":0}"#), None);
    }

    #[test]
    fn not_found_mapping() {
        assert!(is_not_found(&Status::not_found("sandbox x: not found")));
        assert!(is_not_found(&Status::unknown(
            "failed to find sandbox: not found"
        )));
        assert!(!is_not_found(&Status::internal("boom")));
    }

    #[tokio::test]
    async fn connect_error_is_one_clear_line() {
        let err = CriClient::connect("unix:///nonexistent/ringfwd-test.sock")
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "cannot reach container runtime at unix:///nonexistent/ringfwd-test.sock: "
            ) && msg.contains("No such file"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }
}
