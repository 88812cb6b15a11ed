//! The command line, shared by the `ringfwd` and `kubectl-ringfwd` binaries: parses
//! arguments, sets up logging, and hands off to the library. `ringfwd TYPE/NAME PORTS` is
//! `kubectl port-forward`; `forward`, `up` (many forwards from a file), `serve`, `bench` and
//! `completion` are subcommands.
//! Errors become one line on stderr and a non-zero exit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};

use crate::control::cluster::{Cluster, ClusterOptions, Spreading};
use crate::control::config::{self, ForwardTarget};
use crate::control::forward::{ForwardConfig, Forwarder, Listener, Upstream};
use crate::control::pool::{self, PoolOptions};
use crate::control::target::{Kind, PortRequest, PortSpec, Target};
use crate::control::upgrade::Protocol;
use crate::metrics::ForwardMetrics;
use crate::relay::{DataPlane, Drain, SessionOptions};
use crate::secret::{Secret, redact_url};
use crate::shutdown::{self, Signals};
use crate::{bench, metrics, parse_duration, serve, status};

const ABOUT: &str = "Forward one or more local ports to a pod, fast, and keep the forward up.";

const LONG_ABOUT: &str = "\
Forward one or more local ports to a pod, fast, and keep the forward up.

 Use resource type/name such as deploy/mydeployment to select a pod. Resource type defaults to
'pod' if omitted. For svc/, deploy/, rs/ and sts/ the most active matching pod is selected
(running, ready, ready longest, fewest restarts), as kubectl does, and named.

 Unlike kubectl, one failed connection (a refused port, a reset) resets that connection only;
the forward stays up. A connection cut short by a broken session is reset, never ended cleanly.";

const EXAMPLES: &str = "\
Examples:
  # Listen on ports 5000 and 6000 locally, forwarding to ports 5000 and 6000 in the pod
  ringfwd pod/mypod 5000 6000                # kubectl port-forward pod/mypod 5000 6000

  # Listen on 8080 locally, forwarding to the service's port named http in a pod it selects
  ringfwd svc/myservice 8080:http            # kubectl port-forward svc/myservice 8080:http

  # Listen on port 8888 locally, forwarding to 5000 in a pod of the deployment
  ringfwd deploy/mydeployment 8888:5000      # kubectl port-forward deploy/mydeployment 8888:5000

  # Spread connections over every ready pod of the service (a load test reaches them all)
  ringfwd svc/myservice 8080:http --spread

  # Spread over the pods a label selector matches, in namespace shop
  ringfwd -n shop -l app=web --spread 8080:80

  # Listen on port 8888 on all addresses, forwarding to 5000 in the pod
  ringfwd --address 0.0.0.0 pod/mypod 8888:5000

  # Listen on a random local port, forwarding to 5000 in the pod (the port is printed)
  ringfwd pod/mypod :5000

  # Without a cluster: forward through a container runtime, or measure the built-in tunnel
  ringfwd forward --runtime-endpoint unix:///run/containerd/containerd.sock SANDBOX_ID 8080:80
  ringfwd bench

Usage:
  ringfwd TYPE/NAME [options] [LOCAL_PORT:]REMOTE_PORT [...[LOCAL_PORT_N:]REMOTE_PORT_N]
  ringfwd -l SELECTOR --spread [options] [LOCAL_PORT:]REMOTE_PORT [...]";

#[derive(Parser)]
#[command(
    name = "ringfwd",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "ringfwd TYPE/NAME [options] [LOCAL_PORT:]REMOTE_PORT [...]\n       ringfwd -l SELECTOR --spread [options] [LOCAL_PORT:]REMOTE_PORT [...]\n       ringfwd <forward|up|serve|bench|completion> ..."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Command>,
    #[command(flatten)]
    pf: PortForwardArgs,
    #[command(flatten)]
    obs: ObsArgs,
}

/// Observability, for every command.
#[derive(Args)]
struct ObsArgs {
    /// Serve Prometheus metrics (/metrics) and the open streams as JSON (/streams) on this
    /// address; a bare port means 127.0.0.1:PORT. Off by default.
    #[arg(long, global = true, value_name = "ADDR", value_parser = metrics::http::parse_addr, help_heading = "Observability")]
    metrics_addr: Option<SocketAddr>,
    /// No live status line (it is only drawn when stderr is a terminal).
    #[arg(short, long, global = true, help_heading = "Observability")]
    quiet: bool,
    /// -v logs each connection's end (bytes, duration, outcome); -vv everything at debug level.
    #[arg(short, long, global = true, action = ArgAction::Count, help_heading = "Observability")]
    verbose: u8,
    /// How payload moves: `epoll` splices it between plain TCP sockets (stream servers, serve)
    /// without copying; `copy` copies it; `auto` is epoll where splice(2) is allowed.
    #[arg(long, global = true, value_enum, default_value = "auto", env = crate::relay::DATA_PLANE_ENV, help_heading = "Data plane")]
    data_plane: DataPlane,
}

/// `kubectl port-forward` through the API server.
#[derive(Args)]
struct PortForwardArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, a list, merged; then ~/.kube/config).
    #[arg(long, value_name = "PATH", help_heading = "Cluster")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, help_heading = "Cluster")]
    context: Option<String>,
    /// The kubeconfig cluster to use.
    #[arg(long, help_heading = "Cluster")]
    cluster: Option<String>,
    /// The kubeconfig user to use.
    #[arg(long, help_heading = "Cluster")]
    user: Option<String>,
    /// The namespace of the target (default: the context's, then `default`).
    #[arg(short = 'n', long, help_heading = "Cluster")]
    namespace: Option<String>,
    /// How long to wait (like 5s, 2m or 3h) for a pod of a svc/deploy/rs/sts target to appear
    /// when none matches yet.
    #[arg(long, default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
    pod_running_timeout: Duration,
    /// How to talk to the API server: `auto` tries the WebSocket tunnel and falls back to
    /// SPDY/3.1 when the server refuses it (as kubectl 1.31+; KUBECTL_PORT_FORWARD_WEBSOCKETS=false
    /// makes `auto` mean `spdy`, as it does for kubectl).
    #[arg(long, value_enum, default_value = "auto")]
    protocol: ApiProtocol,
    /// Addresses to listen on (comma separated). Only IP addresses or `localhost`, which binds
    /// both 127.0.0.1 and ::1 (::1 only where the host has IPv6).
    #[arg(long, default_value = "localhost", value_delimiter = ',')]
    address: Vec<String>,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
    /// Send each new connection to one of the target's ready pods, the one with the fewest
    /// open connections (ties in turn), instead of to one pod; follow the pods as they become
    /// ready, stop being ready or go. For svc/, deploy/, rs/, sts/ or -l.
    #[arg(long)]
    spread: bool,
    /// With --spread: the pods this label selector matches (`app=web,tier!=db`), in the
    /// namespace, instead of TYPE/NAME.
    #[arg(short = 'l', long, value_name = "SELECTOR", requires = "spread")]
    selector: Option<String>,
    /// pod/NAME (or just NAME), svc/NAME, deploy/NAME, rs/NAME or sts/NAME.
    #[arg(value_name = "TYPE/NAME", required_unless_present = "selector")]
    target: Option<String>,
    /// `8080` (same port locally), `8080:80`, `:80` (a free local port, printed), `8080:http`
    /// (a named container port, or for svc/ a service port).
    #[arg(
        value_name = "[LOCAL_PORT:]REMOTE_PORT",
        required_unless_present = "selector"
    )]
    ports: Vec<String>,
}

/// `--protocol` towards the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ApiProtocol {
    Auto,
    Tunnel,
    Spdy,
    Websocket,
}

#[derive(Subcommand)]
enum Command {
    /// Forward one or more local ports to a pod through a container runtime's stream server.
    ///
    /// Examples:
    ///   ringfwd forward --runtime-endpoint unix:///run/containerd/containerd.sock SANDBOX_ID 8080:80
    ///   ringfwd forward --url http://127.0.0.1:10350/portforward :5432
    #[command(verbatim_doc_comment)]
    Forward(ForwardArgs),
    /// Run every forward described in a TOML file, in one process.
    ///
    /// A file that does not validate starts nothing. A forward that cannot start (its target
    /// cannot be resolved, its local port is taken, its runtime does not answer) is logged with
    /// its name and the others keep running; the exit is non-zero only if none could start.
    ///
    /// Example:
    ///   ringfwd up -f forwards.toml     (see examples/forwards/ and the README)
    #[command(verbatim_doc_comment)]
    Up(UpArgs),
    /// Serve the port-forward protocols (SPDY/3.1 and WebSocket v4), dialling targets on
    /// localhost or inside a network namespace.
    Serve(ServeArgs),
    /// Measure a tunnel: throughput, CPU per GB, connect and echo latency. With no arguments it
    /// runs everything in-process on loopback (no cluster needed).
    ///
    /// With --connections N: request/response on N connections (the shape of a load test):
    /// requests per second, latency, and CPU per request of the forwarder and of the server,
    /// each in its own process.
    ///
    /// Examples:
    ///   ringfwd bench
    ///   ringfwd bench --connections 16 --message 64 --duration 10s --plot rr.svg
    ///   ringfwd bench --connections 16 --runtime-endpoint unix:///run/containerd/containerd.sock \
    ///       SANDBOX_ID --targets-netns /var/run/netns/NAME
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Examples:
    ///   source <(ringfwd completion bash)
    ///   ringfwd completion zsh > "${fpath[1]}/_ringfwd"
    #[command(verbatim_doc_comment)]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct SessionArgs {
    /// Send a PING after this long without hearing from upstream.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// Declare the upstream session dead after this long without hearing from it; its
    /// connections are reset and the next connection opens a new session.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ping_timeout: Duration,
    /// After a local client half-closes, hold its FIN back from a server that would cut the
    /// reply short (kubelet, containerd) until the server has sent nothing for this long.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    half_close_quiet: Duration,
    /// The longest a half-close is held back while the server keeps sending.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    half_close_hold: Duration,
}

/// How many upstream sessions one forward uses (SPDY and the tunnel; WebSocket v4 uses one per
/// connection).
#[derive(Args)]
struct PoolArgs {
    /// Most upstream sessions at once. Each connection gets a session to itself while its client
    /// sends, so that one client that stops reading cannot freeze the others; past this bound
    /// new connections share the least-used session instead (refused only when every session
    /// is at its stream limit).
    #[arg(long, default_value_t = pool::DEFAULT_MAX_SESSIONS, value_parser = at_least_one, value_name = "N")]
    max_sessions: usize,
    /// Most connections open at once; one more is accepted and reset at once (logged at most
    /// once a second).
    #[arg(long, default_value_t = pool::DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one, value_name = "N")]
    max_connections: usize,
    /// Sessions kept set up ahead, so that a new connection does not wait for one.
    #[arg(long, default_value_t = pool::DEFAULT_WARM_SESSIONS, value_name = "N")]
    warm_sessions: usize,
    /// Longest a new connection waits for an upstream session (a runtime or API server that
    /// does not answer); it is then reset, with one log line saying why.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a whole number of at least 1")),
        Ok(n) => Ok(n),
    }
}

impl PoolArgs {
    fn options(&self) -> PoolOptions {
        PoolOptions {
            max_connections: self.max_connections,
            max_sessions: self.max_sessions,
            warm_sessions: self.warm_sessions,
            connect_timeout: self.connect_timeout,
        }
    }
}

#[derive(Args)]
struct ForwardArgs {
    /// CRI runtime endpoint (unix:///run/containerd/containerd.sock); the first argument is then
    /// the pod sandbox id.
    #[arg(long, conflicts_with = "url")]
    runtime_endpoint: Option<String>,
    /// A stream-server URL to use directly (e.g. one printed by `ringfwd serve`); a token in
    /// its path (`/portforward/TOKEN`) is presented as it is.
    #[arg(long)]
    url: Option<String>,
    /// Send the token in this file as `Authorization: Bearer` (for a `ringfwd serve` with
    /// --token-file, when the URL does not carry it).
    #[arg(long, value_name = "PATH", conflicts_with = "runtime_endpoint")]
    token_file: Option<PathBuf>,
    /// Upgrade protocol.
    #[arg(long, value_enum, default_value = "spdy")]
    protocol: Protocol,
    /// Local addresses to listen on (comma-separated IPs or `localhost`).
    #[arg(long, default_value = "localhost", value_delimiter = ',')]
    address: Vec<String>,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    pool: PoolArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
    /// [SANDBOX_ID] [LOCAL:]REMOTE ...
    #[arg(required = true)]
    args: Vec<String>,
}

#[derive(Args)]
struct UpArgs {
    /// The forwards file (TOML): one [[forward]] table per forward.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: PathBuf,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Anything but loopback needs --token-file or --generate-token.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Require the token in this file from every client (`Authorization: Bearer TOKEN`, or the
    /// URL path /portforward/TOKEN): at least 16 of A-Z a-z 0-9 - . _ ~ (`openssl rand -hex 32`).
    #[arg(long, value_name = "PATH", conflicts_with = "generate_token")]
    token_file: Option<PathBuf>,
    /// Require a random token, made now and printed in the URL clients should use.
    #[arg(long)]
    generate_token: bool,
    /// Dial targets inside this network namespace (e.g. /var/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

/// What SIGINT/SIGTERM does.
#[derive(Args)]
struct ShutdownArgs {
    /// On SIGINT/SIGTERM, stop accepting and give open connections this long to finish; then
    /// reset the rest and exit non-zero. A second signal stops at once.
    #[arg(long, default_value = shutdown::DEFAULT_GRACE, value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
}

fn addresses(list: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for a in list {
        match a.as_str() {
            "localhost" => out.extend([
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]),
            s => {
                out.push(s.parse().map_err(|_| {
                    format!("invalid --address {s:?}: not an IP address or localhost")
                })?)
            }
        }
    }
    Ok(out)
}

fn session_opts(a: &SessionArgs, drain: &Drain) -> SessionOptions {
    SessionOptions {
        ping_interval: a.ping_interval,
        ping_timeout: a.ping_timeout,
        half_close_quiet: a.half_close_quiet,
        half_close_hold: a.half_close_hold,
        drain: Some(drain.clone()),
        ..SessionOptions::default()
    }
}

async fn forward(a: ForwardArgs) -> Result<(), String> {
    let mut rest = a.args.as_slice();
    let upstream = match (&a.runtime_endpoint, &a.url) {
        (Some(ep), None) => {
            let (sandbox, ports) = rest.split_first().ok_or("missing sandbox id")?;
            rest = ports;
            Upstream::Cri {
                endpoint: ep.clone(),
                sandbox: sandbox.clone(),
            }
        }
        (None, Some(url)) => Upstream::Url(url.clone()),
        _ => {
            return Err(
                "say where to forward: --runtime-endpoint ENDPOINT SANDBOX_ID, or --url URL".into(),
            );
        }
    };
    if rest.is_empty() {
        return Err("no ports to forward: give at least one [LOCAL:]REMOTE".into());
    }
    let specs: Vec<PortSpec> = rest
        .iter()
        .map(|s| s.parse::<PortSpec>())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let name = match &upstream {
        Upstream::Cri { sandbox, .. } => sandbox.chars().take(12).collect(),
        // The forward's name is shown and exported as a metric label: never with a token.
        Upstream::Url(url) => redact_url(url),
        Upstream::Api { pod, .. } => pod.clone(),
        Upstream::Pods { spreading, .. } => spreading.target.to_string(),
    };
    let drain = Drain::new();
    let cfg = Common {
        addresses: listen_addresses(&a.address)?,
        bearer: a
            .token_file
            .as_deref()
            .map(Secret::from_file)
            .transpose()
            .map_err(|e| e.to_string())?,
        session: session_opts(&a.session, &drain),
        pool: a.pool.options(),
        metrics: ForwardMetrics::new(&name),
    }
    .into_config(upstream, a.protocol);
    let fwd = Forwarder::new(cfg, &specs)
        .await
        .map_err(|e| e.to_string())?;
    run_forward(fwd, &specs, &drain, a.shutdown.grace).await
}

fn listen_addresses(list: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut addrs = addresses(list)?;
    // `localhost` binds ::1 only where the host has IPv6.
    if list.iter().any(|s| s == "localhost") && std::net::TcpListener::bind("[::1]:0").is_err() {
        addrs.retain(|ip| ip.is_ipv4());
    }
    Ok(addrs)
}

/// `ringfwd TYPE/NAME PORTS`: resolve the target through the API server, then forward.
async fn port_forward(a: PortForwardArgs) -> Result<(), String> {
    // With -l there is no TYPE/NAME: what clap took for one is the first port.
    let (target, ports): (Target, Vec<&String>) = match &a.selector {
        Some(sel) => (
            Target::selector(sel).map_err(|e| e.to_string())?,
            a.target.iter().chain(&a.ports).collect(),
        ),
        None => {
            let target = a.target.as_deref().ok_or("missing TYPE/NAME")?;
            let target = target.parse().map_err(|e: ControlErr| e.to_string())?;
            (target, a.ports.iter().collect())
        }
    };
    if ports.is_empty() {
        return Err("no ports to forward: give at least one [LOCAL_PORT:]REMOTE_PORT".into());
    }
    let shown = match target.kind {
        Kind::Selector => target.to_string(),
        _ => a.target.clone().unwrap_or_default(),
    };
    let name = match &a.namespace {
        Some(ns) => format!("{ns}/{shown}"),
        None => shown,
    };
    let requests: Vec<PortRequest> = ports
        .iter()
        .map(|s| s.parse::<PortRequest>())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let drain = Drain::new();
    let common = Common {
        addresses: listen_addresses(&a.address)?,
        bearer: None,
        session: session_opts(&a.session, &drain),
        pool: a.pool.options(),
        metrics: ForwardMetrics::new(&name),
    };
    let protocol = match a.protocol {
        ApiProtocol::Auto => None,
        ApiProtocol::Tunnel => Some(Protocol::Tunnel),
        ApiProtocol::Spdy => Some(Protocol::Spdy),
        ApiProtocol::Websocket => Some(Protocol::Websocket),
    };
    let options = ClusterOptions {
        kubeconfig: a.kubeconfig,
        context: a.context,
        cluster: a.cluster,
        user: a.user,
        namespace: a.namespace,
        pod_running_timeout: a.pod_running_timeout,
    };
    let how = ClusterForward {
        target: &target,
        requests: &requests,
        protocol,
        spread: a.spread,
    };
    let (fwd, specs) = cluster_forwarder(&options, how, common, "").await?;
    run_forward(fwd, &specs, &drain, a.shutdown.grace).await
}

/// What a forward to a cluster target is asked to do.
struct ClusterForward<'a> {
    target: &'a Target,
    requests: &'a [PortRequest],
    /// `None` is `--protocol auto`.
    protocol: Option<Protocol>,
    /// `--spread`: every ready pod, not one.
    spread: bool,
}

/// What every forward has besides its upstream.
struct Common {
    addresses: Vec<IpAddr>,
    /// A bearer token for a stream-server URL (`--token-file`).
    bearer: Option<Secret>,
    session: SessionOptions,
    pool: PoolOptions,
    metrics: ForwardMetrics,
}

impl Common {
    /// A forward to `upstream` over `protocol`, without a fallback to SPDY/3.1.
    fn into_config(self, upstream: Upstream, protocol: Protocol) -> ForwardConfig {
        ForwardConfig {
            upstream,
            protocol,
            fallback_to_spdy: false,
            addresses: self.addresses,
            bearer: self.bearer,
            session: self.session,
            pool: self.pool,
            metrics: self.metrics,
        }
    }
}

/// Resolve a cluster target to a pod (printing which, for a workload; each line starts with
/// `prefix`), or to its pods with `--spread` (printing the ready ones), and set up its
/// forwarder.
async fn cluster_forwarder(
    options: &ClusterOptions,
    how: ClusterForward<'_>,
    common: Common,
    prefix: &str,
) -> Result<(Arc<Forwarder>, Vec<PortSpec>), String> {
    let ClusterForward {
        target,
        requests,
        protocol,
        spread,
    } = how;
    if spread {
        // Before any cluster call: the target alone says it.
        Spreading::check_target(target).map_err(|e| e.to_string())?;
    }
    let cluster = Cluster::connect(options).await.map_err(|e| e.to_string())?;
    let websockets_off = std::env::var("KUBECTL_PORT_FORWARD_WEBSOCKETS")
        .is_ok_and(|v| v.eq_ignore_ascii_case("false"));
    let (protocol, fallback_to_spdy) = match protocol {
        None if websockets_off => (Protocol::Spdy, false),
        None => (Protocol::Tunnel, true),
        Some(p) => (p, false),
    };
    if spread {
        let spreading = cluster
            .resolve_spread(target, requests)
            .await
            .map_err(|e| e.to_string())?;
        let specs = spreading.specs.clone();
        let upstream = Upstream::Pods {
            cluster,
            spreading: Box::new(spreading),
        };
        let cfg = ForwardConfig {
            fallback_to_spdy,
            ..common.into_config(upstream, protocol)
        };
        let fwd = Forwarder::new(cfg, &specs)
            .await
            .map_err(|e| e.to_string())?;
        let ready = fwd.ready_pods().unwrap_or_default();
        match ready.len() {
            0 => println!(
                "{prefix}Spreading connections over the ready pods of {target}: none is ready yet \
                 (connections are reset until one is)"
            ),
            n => println!(
                "{prefix}Spreading connections over {n} ready pod{} of {target}: {}",
                if n == 1 { "" } else { "s" },
                ready.join(", ")
            ),
        }
        return Ok((fwd, specs));
    }
    let resolved = cluster
        .resolve(target, requests)
        .await
        .map_err(|e| e.to_string())?;
    if !matches!(target.kind, Kind::Pod) {
        println!(
            "{prefix}Selected pod {} for {target} ({}; {} matching pods)",
            resolved.pod,
            if resolved.ready {
                "ready"
            } else {
                "running, not ready"
            },
            resolved.candidates,
        );
    }
    let upstream = Upstream::Api {
        cluster,
        pod: resolved.pod.clone(),
        follow: Some(resolved.follow.clone()),
    };
    let cfg = ForwardConfig {
        fallback_to_spdy,
        ..common.into_config(upstream, protocol)
    };
    let fwd = Forwarder::new(cfg, &resolved.ports)
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!(
        "port-forward to pod {} over {}",
        resolved.pod,
        fwd.protocol().name()
    );
    Ok((fwd, resolved.ports))
}

type ControlErr = crate::control::ControlError;

/// Bind every spec and print kubectl's `Forwarding from` lines, each after `prefix`.
async fn bind_and_say(
    fwd: &Forwarder,
    specs: &[PortSpec],
    prefix: &str,
) -> Result<Vec<Listener>, String> {
    let listeners = fwd.bind(specs).await.map_err(|e| e.to_string())?;
    // One write for all of a forward's lines, so that forwards starting side by side (`up`)
    // do not interleave theirs.
    let lines: String = listeners
        .iter()
        .map(|l| format!("{prefix}Forwarding from {} -> {}\n", l.local, l.remote))
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut out, lines.as_bytes());
    // Scripts wait for these lines: do not leave them in a pipe buffer.
    let _ = std::io::Write::flush(&mut out);
    Ok(listeners)
}

/// Bind, print kubectl's `Forwarding from` lines, and relay until SIGINT/SIGTERM; then shut
/// down gracefully (see [`shutdown`]).
async fn run_forward(
    fwd: Arc<Forwarder>,
    specs: &[PortSpec],
    drain: &Drain,
    grace: Duration,
) -> Result<(), String> {
    let mut signals = Signals::new()?;
    let listeners = bind_and_say(&fwd, specs, "").await?;
    // The live view (if on) starts below them.
    status::show();
    let mut serving = tokio::task::JoinSet::new();
    for l in listeners {
        serving.spawn(fwd.clone().serve_listener(l));
    }
    signals.recv().await;
    // Stop accepting: the listeners close as their tasks end.
    serving.shutdown().await;
    let ended = shutdown::drain(drain, grace, &mut signals).await;
    status::finish();
    ended.into_result(grace)
}

/// `ringfwd up -f FILE`: validate the whole file (a problem refuses it before anything starts),
/// then start every forward side by side. A forward that cannot start is logged with its name
/// and the rest keep running; only if none starts is that an error.
async fn up(a: UpArgs) -> Result<(), String> {
    let file = a.file.display().to_string();
    let text = std::fs::read_to_string(&a.file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mut cfg = config::parse(&text).map_err(|e| {
        let n = e.0.len();
        let problems = if n == 1 { "problem" } else { "problems" };
        format!(
            "{file}: {n} {problems}, no forward started\n{}",
            e.in_file(&file)
        )
    })?;
    // A relative kubeconfig path is relative to the file, not to wherever `up` was started.
    let dir = a.file.parent().unwrap_or(std::path::Path::new(""));
    for f in &mut cfg.forwards {
        if let ForwardTarget::Cluster { options, .. } = &mut f.target
            && let Some(k) = options.kubeconfig.as_mut()
            && k.is_relative()
        {
            *k = dir.join(&*k);
        }
    }
    let total = cfg.forwards.len();
    let grace = a.shutdown.grace;
    let drain = Drain::new();
    let mut signals = Signals::new()?;
    let mut starting = tokio::task::JoinSet::new();
    for f in cfg.forwards {
        let drain = drain.clone();
        starting.spawn(async move {
            let prefix = format!("{}: ", f.name);
            start_configured(&f, &prefix, &drain)
                .await
                .inspect_err(|e| tracing::error!("forward {:?} did not start: {e}", f.name))
                .ok()
        });
    }
    // Every listener of every forward that started; dropping a task closes its port.
    let mut serving = tokio::task::JoinSet::new();
    let mut failed = 0;
    let signalled = loop {
        tokio::select! {
            started = starting.join_next() => match started {
                Some(Ok(Some((fwd, listeners)))) => {
                    for l in listeners {
                        serving.spawn(fwd.clone().serve_listener(l));
                    }
                }
                Some(_) => failed += 1,
                None => break false,
            },
            () = signals.recv() => break true,
        }
    };
    if !signalled {
        if failed == total {
            return Err(format!(
                "{file}: none of its {total} forwards could start (see above)"
            ));
        }
        if failed > 0 {
            tracing::warn!(
                "{} of {total} forwards running; {failed} could not start",
                total - failed
            );
        }
        status::show();
        signals.recv().await;
    }
    // Stop accepting, and starting.
    starting.shutdown().await;
    serving.shutdown().await;
    let ended = shutdown::drain(&drain, grace, &mut signals).await;
    status::finish();
    ended.into_result(grace)
}

/// Set up one forward of an `up` file and bind its ports.
async fn start_configured(
    f: &config::Forward,
    prefix: &str,
    drain: &Drain,
) -> Result<(Arc<Forwarder>, Vec<Listener>), String> {
    let common = Common {
        addresses: listen_addresses(&f.addresses)?,
        // A stream-server URL in a file carries its token in the path.
        bearer: None,
        session: SessionOptions {
            drain: Some(drain.clone()),
            ..f.session.options()
        },
        pool: f.pool,
        metrics: ForwardMetrics::new(&f.name),
    };
    let (fwd, specs) = match &f.target {
        ForwardTarget::Cluster {
            target,
            spread,
            ports,
            options,
            protocol,
        } => {
            let how = ClusterForward {
                target,
                requests: ports,
                protocol: *protocol,
                spread: *spread,
            };
            cluster_forwarder(options, how, common, prefix).await?
        }
        ForwardTarget::Runtime {
            endpoint,
            sandbox,
            ports,
            protocol,
        } => {
            let upstream = Upstream::Cri {
                endpoint: endpoint.clone(),
                sandbox: sandbox.clone(),
            };
            let fwd = Forwarder::new(common.into_config(upstream, *protocol), ports)
                .await
                .map_err(|e| e.to_string())?;
            (fwd, ports.clone())
        }
        ForwardTarget::Url {
            url,
            ports,
            protocol,
        } => {
            let upstream = Upstream::Url(url.clone());
            let fwd = Forwarder::new(common.into_config(upstream, *protocol), ports)
                .await
                .map_err(|e| e.to_string())?;
            (fwd, ports.clone())
        }
    };
    let listeners = bind_and_say(&fwd, &specs, prefix).await?;
    Ok((fwd, listeners))
}

/// Start what `--metrics-addr` and the live view need, before any forward exists (handles taken
/// before the recorder is installed record nothing).
async fn observe(metrics_addr: Option<SocketAddr>, live: bool) -> Result<(), String> {
    if let Some(addr) = metrics_addr {
        if addr.ip().is_unspecified() {
            tracing::warn!(
                "metrics on {}, a wildcard address: /metrics and /streams (targets, ports, \
                 byte counts) are readable from other machines, with no authentication",
                addr.ip()
            );
        }
        let bound = metrics::http::start(addr)
            .await
            .map_err(|e| e.to_string())?;
        println!("Metrics on http://{bound}/metrics");
    }
    if metrics_addr.is_some() || live {
        metrics::spawn_sampler(Duration::from_secs(1), move |forwards| {
            if live {
                status::draw(forwards);
            }
        });
    }
    Ok(())
}

async fn serve_cmd(a: ServeArgs) -> Result<(), String> {
    let token = match (&a.token_file, a.generate_token) {
        (Some(path), _) => Some(Secret::from_file(path).map_err(|e| e.to_string())?),
        (None, true) => Some(Secret::generate()),
        (None, false) => None,
    };
    let access = match &token {
        Some(t) => serve::Access::Token(Arc::new(t.clone())),
        None => serve::Access::Open,
    };
    serve::check_listen(a.listen, &access).map_err(|e| e.to_string())?;
    let dialer = match &a.netns {
        Some(p) => serve::Dialer::netns(p)
            .map_err(|e| format!("cannot enter network namespace {}: {e}", p.display()))?,
        None => serve::Dialer::Local,
    };
    if a.listen.ip().is_unspecified() {
        tracing::warn!(
            "listening on {}, a wildcard address: serve is reachable from other machines, \
             not only this one",
            a.listen.ip()
        );
    }
    let mut signals = Signals::new()?;
    let (listener, url) = serve::bind(a.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    match token.filter(|_| a.generate_token) {
        // The one place a token is printed: the user asked for one to be made and needs it.
        Some(t) => println!("Serving port-forward on {url}/{}", t.expose()),
        None => println!("Serving port-forward on {url}"),
    }
    let drain = Drain::new();
    let opts = SessionOptions {
        forward_half_close: true,
        ..session_opts(&a.session, &drain)
    };
    tokio::select! {
        r = serve::serve_with(listener, dialer, opts, access) => return r.map_err(|e| e.to_string()),
        () = signals.recv() => {}
    }
    // The listener is closed (dropped with `serve_with`); sessions take no new connections.
    shutdown::drain(&drain, a.shutdown.grace, &mut signals)
        .await
        .into_result(a.shutdown.grace)
}

/// Entry point of both binaries. Invoked as `kubectl-ringfwd` (a kubectl plugin), help and
/// usage say `kubectl ringfwd`.
/// Raise the soft limit on open files to the hard one. Every forwarded connection holds a
/// socket (two through `serve`), and the usual soft limit of 1,024 would refuse connections
/// long before the hard limit or the machine runs short (Go programs, kubectl among them, do
/// the same at start-up).
fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit writes one rlimit into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 || r.rlim_cur >= r.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: r.rlim_max,
        rlim_max: r.rlim_max,
    };
    // Safety: setrlimit reads one rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!("open files limit stays at {}: {e}", r.rlim_cur);
    }
}

pub fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let as_plugin = std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("kubectl-"));
    let mut cmd = Cli::command();
    if as_plugin {
        cmd = cmd
            .name("kubectl ringfwd")
            .bin_name("kubectl ringfwd")
            .override_usage(
                "kubectl ringfwd TYPE/NAME [options] [LOCAL_PORT:]REMOTE_PORT [...]\n       \
                 kubectl ringfwd <forward|up|serve|bench|completion> ...",
            )
            .after_help(EXAMPLES.replace("  ringfwd ", "  kubectl ringfwd "));
    }
    let matches = cmd.get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let default_filter = match cli.obs.verbose {
        0 => "ringfwd=info",
        1 => "ringfwd=info,ringfwd::conn=debug",
        2 => "ringfwd=debug",
        _ => "ringfwd=trace",
    };
    tracing_subscriber::fmt()
        .with_writer(status::Stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    raise_open_files_limit();
    match crate::relay::select_data_plane(cli.obs.data_plane) {
        Ok(d) => tracing::debug!("data plane: {}", d.name()),
        Err(e) => return fail(&e.to_string()),
    }
    let metrics_addr = cli.obs.metrics_addr;
    // The live view is for forwards; serve and bench print their own output.
    let live = status::enabled(cli.obs.quiet)
        && matches!(cli.cmd, None | Some(Command::Forward(_) | Command::Up(_)));
    let res = match cli.cmd {
        Some(Command::Bench(a)) => bench::run(a, metrics_addr),
        Some(Command::Completion { shell }) => {
            let name = if as_plugin {
                "kubectl-ringfwd"
            } else {
                "ringfwd"
            };
            clap_complete::generate(shell, &mut Cli::command(), name, &mut std::io::stdout());
            Ok(())
        }
        cmd => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("rf-client")
                .build();
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => return fail(&format!("cannot start runtime: {e}")),
            };
            rt.block_on(async move {
                observe(metrics_addr, live).await?;
                match cmd {
                    Some(Command::Forward(a)) => forward(a).await,
                    Some(Command::Up(a)) => up(a).await,
                    Some(Command::Serve(a)) => serve_cmd(a).await,
                    None => port_forward(cli.pf).await,
                    Some(Command::Bench(_) | Command::Completion { .. }) => unreachable!(),
                }
            })
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}
