//! The `ringfwd` command line: parses arguments, sets up logging, and hands off to the library.
//! Errors become one line on stderr and a non-zero exit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringfwd::control::forward::{ForwardConfig, Forwarder, PortSpec, Upstream};
use ringfwd::control::upgrade::Protocol;
use ringfwd::relay::SessionOptions;
use ringfwd::{bench, parse_duration, serve};

#[derive(Parser)]
#[command(
    name = "ringfwd",
    version,
    about = "Forward local ports into a pod, fast, and keep the forward up."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
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
    /// Serve the port-forward protocols (SPDY/3.1 and WebSocket v4), dialling targets on
    /// localhost or inside a network namespace.
    Serve(ServeArgs),
    /// Measure a tunnel: throughput, CPU per GB, connect and echo latency. With no arguments it
    /// runs everything in-process on loopback (no cluster needed).
    Bench(bench::BenchArgs),
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
}

#[derive(Args)]
struct ForwardArgs {
    /// CRI runtime endpoint (unix:///run/containerd/containerd.sock); the first argument is then
    /// the pod sandbox id.
    #[arg(long, conflicts_with = "url")]
    runtime_endpoint: Option<String>,
    /// A stream-server URL to use directly (e.g. one printed by `ringfwd serve`).
    #[arg(long)]
    url: Option<String>,
    /// Upgrade protocol.
    #[arg(long, value_enum, default_value = "spdy")]
    protocol: Protocol,
    /// Local addresses to listen on (comma-separated IPs or `localhost`).
    #[arg(long, default_value = "localhost", value_delimiter = ',')]
    address: Vec<String>,
    #[command(flatten)]
    session: SessionArgs,
    /// [SANDBOX_ID] [LOCAL:]REMOTE ...
    #[arg(required = true)]
    args: Vec<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Dial targets inside this network namespace (e.g. /var/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    #[command(flatten)]
    session: SessionArgs,
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

fn session_opts(a: &SessionArgs) -> SessionOptions {
    SessionOptions {
        ping_interval: a.ping_interval,
        ping_timeout: a.ping_timeout,
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
    let mut addrs = addresses(&a.address)?;
    // `localhost` binds ::1 only where the host has IPv6.
    if a.address.iter().any(|s| s == "localhost") && std::net::TcpListener::bind("[::1]:0").is_err()
    {
        addrs.retain(|ip| ip.is_ipv4());
    }
    let cfg = ForwardConfig {
        upstream,
        protocol: a.protocol,
        addresses: addrs,
        session: session_opts(&a.session),
    };
    let fwd = Forwarder::new(cfg, &specs)
        .await
        .map_err(|e| e.to_string())?;
    let listeners = fwd.bind(&specs).await.map_err(|e| e.to_string())?;
    for l in &listeners {
        println!("Forwarding from {} -> {}", l.local, l.remote);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(fwd.clone().serve_listener(l));
    }
    tokio::select! {
        _ = tasks.join_next() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

async fn serve_cmd(a: ServeArgs) -> Result<(), String> {
    let dialer = match &a.netns {
        Some(p) => serve::Dialer::netns(p)
            .map_err(|e| format!("cannot enter network namespace {}: {e}", p.display()))?,
        None => serve::Dialer::Local,
    };
    let (listener, url) = serve::bind(a.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", a.listen))?;
    println!("Serving port-forward on {url}");
    let opts = SessionOptions {
        forward_half_close: true,
        ..session_opts(&a.session)
    };
    tokio::select! {
        r = serve::serve(listener, dialer, opts) => r.map_err(|e| e.to_string()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ringfwd=info".into()),
        )
        .init();
    let res = match cli.cmd {
        Command::Bench(a) => bench::run(a),
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
                match cmd {
                    Command::Forward(a) => forward(a).await,
                    Command::Serve(a) => serve_cmd(a).await,
                    Command::Bench(_) => unreachable!(),
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
