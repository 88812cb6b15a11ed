//! `ringfwd bench`: a load generator and the targets it talks to.
//!
//! Embedded mode (no arguments) runs `serve`, the targets and a forwarder in this process on
//! loopback; with `--runtime-endpoint` or `--url` it measures that real tunnel instead. Each
//! role runs on its own tokio runtime with its own thread name, so CPU time is read per role
//! from `/proc/self/task` and "CPU seconds per GB" means the forwarder's own threads, not the
//! load generator's.
//!
//! `--connections N` measures the load-test shape instead (request/response on N
//! connections, [`rr`]), with the forwarder and the embedded serve in child processes.
//!
//! Target protocols (all on plain TCP, simple enough to serve from any pod):
//! - source: read a u64 LE count, send that many bytes, close;
//! - sink: read a u64 LE count, read that many bytes, answer the count as u64 LE, close;
//! - echo: send back everything.
//!
//! Count-first framing is deliberate: kubelet/containerd never pass a half-close on to the pod,
//! so a target cannot rely on seeing end of file.
//!
//! Latency percentiles of the forward (first byte, session setup, stalls) are read from the
//! in-process copies of the exported histograms ([`crate::metrics::histogram`]), so they are
//! the numbers a dashboard shows for the run; `--plot` draws them with the throughput over time
//! ([`crate::plot`]).

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use crate::control::forward::{ForwardConfig, Forwarder, PortSpec, Upstream};
use crate::control::pool::PoolOptions;
use crate::control::upgrade::Protocol;
use crate::metrics::ForwardMetrics;
use crate::metrics::histogram::LocalHistogram;
use crate::relay::SessionOptions;
use crate::secret::redact_url;
use crate::{parse_duration, plot, serve};

pub mod rr;

const CHUNK: usize = 256 * 1024;
/// Thread name prefix of the uring data plane's workers (src/relay/uring/worker.rs).
const URING_WORKERS: &str = "rf-uring";

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Bytes per throughput run, each direction (e.g. 1GiB, 256MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub bytes: u64,
    /// New connections to time (time to first byte).
    #[arg(long, default_value_t = 200)]
    pub connects: usize,
    /// 1-byte echo round trips to time on one open connection.
    #[arg(long, default_value_t = 2000)]
    pub echoes: usize,
    /// Upgrade protocol for the tunnel.
    #[arg(long, value_enum, default_value = "spdy")]
    pub protocol: Protocol,
    /// Measure a real tunnel through this CRI runtime endpoint (needs SANDBOX_ID).
    #[arg(long, requires = "sandbox", conflicts_with = "url")]
    pub runtime_endpoint: Option<String>,
    /// Measure a real tunnel through this stream-server URL.
    #[arg(long)]
    pub url: Option<String>,
    /// Pod sandbox id, with --runtime-endpoint.
    pub sandbox: Option<String>,
    /// Start the targets inside this network namespace (the pod's; needs root).
    #[arg(long, conflicts_with = "target_ports")]
    pub targets_netns: Option<PathBuf>,
    /// Targets already running in the pod: SOURCE,SINK,ECHO ports.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    pub target_ports: Option<Vec<u16>>,
    /// Draw throughput over time and the latency distributions into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// With --metrics-addr: keep serving the endpoint this long after the run (like 30s), so a
    /// scraper sees the final numbers.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub linger: Option<Duration>,
    #[command(flatten)]
    pub rr: rr::RrArgs,
}

/// Parse `1GiB`, `256MiB`, `64KiB`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid size {s:?} (try 1GiB or 256MiB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return Err(format!("invalid size unit in {s:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("size {s:?} out of range"))
}

fn runtime(name: &str, threads: usize) -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start {name} runtime: {e}"))
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`, and by
/// the io_uring kernel workers they started (`iou-wrk-TID`: a splice on the ring runs there,
/// so leaving them out would flatter the `uring` data plane).
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    // Safety: sysconf(3) only reads a configuration value; it takes no pointers.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    // (tid, name, utime + stime ticks) of every thread.
    let threads: Vec<(String, String, u64)> = dir
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (open, close) = (stat.find('(')?, stat.rfind(')')?);
            // Fields after the name: state is field 3; utime and stime are fields 14 and 15.
            let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
            let field = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            Some((
                stat[..open].trim().to_string(),
                stat[open + 1..close].to_string(),
                field(11) + field(12),
            ))
        })
        .collect();
    let ours: std::collections::HashSet<&str> = threads
        .iter()
        .filter(|(_, name, _)| name.starts_with(prefix))
        .map(|(tid, _, _)| tid.as_str())
        .collect();
    let ticks: u64 = threads
        .iter()
        .filter(|(tid, name, _)| {
            ours.contains(tid.as_str())
                || name
                    .strip_prefix("iou-wrk-")
                    .is_some_and(|parent| ours.contains(parent))
        })
        .map(|(_, _, t)| t)
        .sum();
    ticks as f64 / tick
}

/// Ports of the three bench targets.
#[derive(Debug, Clone, Copy)]
pub struct TargetPorts {
    pub source: u16,
    pub sink: u16,
    pub echo: u16,
}

/// Start source, sink and echo on 127.0.0.1:0 (inside `netns` if given) on the current runtime.
pub async fn start_targets(netns: Option<&std::path::Path>) -> std::io::Result<TargetPorts> {
    Ok(start_counted_targets(netns, None).await?.0)
}

/// [`start_targets`], on `bind`'s port 0 when given (outside any `netns`), and the count of
/// bytes the echo target has answered (read, and about to send back).
pub async fn start_counted_targets(
    netns: Option<&std::path::Path>,
    bind: Option<IpAddr>,
) -> std::io::Result<(TargetPorts, Arc<AtomicU64>)> {
    let echoed = Arc::new(AtomicU64::new(0));
    let mut ports = [0u16; 3];
    for (i, port) in ports.iter_mut().enumerate() {
        let std_l = match (netns, bind) {
            (Some(ns), _) => serve::listen_in_netns(ns)?,
            (None, Some(ip)) => std::net::TcpListener::bind((ip, 0))?,
            (None, None) => std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?,
        };
        std_l.set_nonblocking(true)?;
        let l = TcpListener::from_std(std_l)?;
        *port = l.local_addr()?.port();
        let echoed = echoed.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let echoed = echoed.clone();
                tokio::spawn(async move {
                    let _ = match i {
                        0 => source(s).await,
                        1 => sink(s).await,
                        _ => echo(s, &echoed).await,
                    };
                });
            }
        });
    }
    Ok((
        TargetPorts {
            source: ports[0],
            sink: ports[1],
            echo: ports[2],
        },
        echoed,
    ))
}

fn pattern() -> Vec<u8> {
    // Not all zeros, so a transfer that drops or shifts bytes changes what arrives.
    (0..CHUNK)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect()
}

async fn source(mut s: TcpStream) -> std::io::Result<()> {
    let n = s.read_u64_le().await?;
    let buf = pattern();
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    s.shutdown().await
}

async fn sink(mut s: TcpStream) -> std::io::Result<()> {
    let n = s.read_u64_le().await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < n {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    s.write_u64_le(got).await?;
    s.shutdown().await
}

async fn echo(mut s: TcpStream, echoed: &AtomicU64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        // Counted before the answer leaves: once a client has its whole response, the count
        // includes it.
        echoed.fetch_add(n as u64, Ordering::SeqCst);
        s.write_all(&buf[..n]).await?;
    }
}

struct Progress {
    label: &'static str,
    total: u64,
    start: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn new(label: &'static str, total: u64) -> Self {
        let now = Instant::now();
        Progress {
            label,
            total,
            start: now,
            last: now,
            tty: std::io::stderr().is_terminal(),
        }
    }
    fn update(&mut self, done: u64) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let rate = done as f64 * 8.0 / self.start.elapsed().as_secs_f64() / 1e9;
        let line = format!(
            "[{}] {:.0} / {:.0} MiB  {:.2} Gbit/s",
            self.label,
            done as f64 / 1048576.0,
            self.total as f64 / 1048576.0,
            rate
        );
        if self.tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    fn done(&self) {
        if self.tty {
            eprint!("\r{:60}\r", "");
        }
    }
}

async fn download(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("download: connect: {e}"))?;
    let t0 = Instant::now();
    s.write_u64_le(n)
        .await
        .map_err(|e| format!("download: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut p = Progress::new("download", n);
    loop {
        let k = s
            .read(&mut buf)
            .await
            .map_err(|e| format!("download broke after {got} bytes: {e}"))?;
        if k == 0 {
            break;
        }
        got += k as u64;
        p.update(got);
    }
    p.done();
    if got != n {
        return Err(format!("download: got {got} bytes, want {n}"));
    }
    Ok(t0.elapsed())
}

async fn upload(addr: SocketAddr, n: u64) -> Result<Duration, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("upload: connect: {e}"))?;
    let t0 = Instant::now();
    s.write_u64_le(n)
        .await
        .map_err(|e| format!("upload: {e}"))?;
    let buf = pattern();
    let mut sent = 0u64;
    let mut p = Progress::new("upload", n);
    while sent < n {
        let k = (n - sent).min(CHUNK as u64) as usize;
        s.write_all(&buf[..k])
            .await
            .map_err(|e| format!("upload broke after {sent} bytes: {e}"))?;
        sent += k as u64;
        p.update(sent);
    }
    let got = s
        .read_u64_le()
        .await
        .map_err(|e| format!("upload: no acknowledgement: {e}"))?;
    p.done();
    if got != n {
        return Err(format!("upload: sink got {got} bytes, want {n}"));
    }
    Ok(t0.elapsed())
}

async fn connects(addr: SocketAddr, count: usize) -> Result<Vec<Duration>, String> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        s.write_u64_le(1)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.read_u8()
            .await
            .map_err(|e| format!("connect: no first byte: {e}"))?;
        out.push(t0.elapsed());
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .map_err(|e| format!("connect: {e}"))?;
    }
    Ok(out)
}

async fn echoes(addr: SocketAddr, count: usize) -> Result<Vec<Duration>, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("echo: connect: {e}"))?;
    s.set_nodelay(true).ok();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let b = i as u8;
        let t0 = Instant::now();
        s.write_all(&[b]).await.map_err(|e| format!("echo: {e}"))?;
        let got = s.read_u8().await.map_err(|e| format!("echo: {e}"))?;
        out.push(t0.elapsed());
        if got != b {
            return Err(format!("echo: sent {b}, got {got}"));
        }
    }
    Ok(out)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// p50 and p99 in milliseconds of an in-process histogram copy, and its count.
fn hist_ms(h: &LocalHistogram) -> (f64, f64, u64) {
    let q = |p| h.quantile(p).map_or(f64::NAN, |s| s * 1e3);
    (q(0.5), q(0.99), h.count())
}

/// Results of one bench run.
#[derive(Debug, Clone)]
pub struct Report {
    pub mode: String,
    pub bytes: u64,
    pub download: Duration,
    pub upload: Duration,
    pub client_cpu_down: f64,
    pub client_cpu_up: f64,
    pub serve_cpu: Option<(f64, f64)>,
    /// Embedded: the data plane's own worker threads (`rf-uring-*`), which the in-process
    /// forward and serve share, so neither's figure can hold them. (Measuring a real tunnel,
    /// they serve only the forward and are in the client's figure.)
    pub shared_workers_cpu: Option<(f64, f64)>,
    /// Time to first byte of the forward's connections, from
    /// `ringfwd_connection_first_byte_seconds`: p50, p99 (ms), count.
    pub first_byte_ms: (f64, f64, u64),
    /// From `ringfwd_session_setup_seconds`.
    pub setup_ms: (f64, f64, u64),
    /// From `ringfwd_relay_stall_seconds`.
    pub stall_ms: (f64, f64, u64),
    /// Client-side 1-byte echo round trips: p50, p99 (ms), count.
    pub echo_ms: (f64, f64, usize),
    /// Bytes relayed `[up, down]` sampled over the run (seconds since start), for `--plot`.
    pub series: Vec<(f64, [u64; 2])>,
    /// The echo round trips, sorted.
    pub echo: Vec<Duration>,
    /// Bucket bounds and counts of the first-byte histogram.
    pub first_byte_hist: (&'static [f64], Vec<u64>),
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = self.bytes as f64 / 1e9;
        let gbit = |d: Duration| self.bytes as f64 * 8.0 / d.as_secs_f64() / 1e9;
        writeln!(
            f,
            "ringfwd bench: {}, data plane {} ({:.2} GiB each way)",
            self.mode,
            crate::relay::data_plane().name(),
            self.bytes as f64 / (1u64 << 30) as f64
        )?;
        writeln!(f, "{:<34} value", "metric")?;
        writeln!(
            f,
            "{:<34} {:.2} Gbit/s ({:.2} s)",
            "download throughput",
            gbit(self.download),
            self.download.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:<34} {:.2} Gbit/s ({:.2} s)",
            "upload throughput",
            gbit(self.upload),
            self.upload.as_secs_f64()
        )?;
        writeln!(
            f,
            "{:<34} {:.2} s/GB down, {:.2} s/GB up",
            "client CPU per GB",
            self.client_cpu_down / gb,
            self.client_cpu_up / gb
        )?;
        if let Some((d, u)) = self.serve_cpu {
            writeln!(
                f,
                "{:<34} {:.2} s/GB down, {:.2} s/GB up",
                "serve CPU per GB",
                d / gb,
                u / gb
            )?;
        }
        if let Some((d, u)) = self.shared_workers_cpu {
            writeln!(
                f,
                "{:<34} {:.2} s/GB down, {:.2} s/GB up (shared by client and serve; \
                 bench --connections runs them apart)",
                "data-plane workers CPU per GB",
                d / gb,
                u / gb
            )?;
        }
        writeln!(
            f,
            "{:<34} {:.3} / {:.3} ms ({} connections, histogram)",
            "new connection TTFB p50 / p99",
            self.first_byte_ms.0,
            self.first_byte_ms.1,
            self.first_byte_ms.2
        )?;
        writeln!(
            f,
            "{:<34} {:.3} / {:.3} ms ({} sessions, histogram)",
            "session setup p50 / p99", self.setup_ms.0, self.setup_ms.1, self.setup_ms.2
        )?;
        if self.stall_ms.2 > 0 {
            writeln!(
                f,
                "{:<34} {:.3} / {:.3} ms ({} stalls, histogram)",
                "slow-reader stall p50 / p99", self.stall_ms.0, self.stall_ms.1, self.stall_ms.2
            )?;
        }
        write!(
            f,
            "{:<34} {:.3} / {:.3} ms ({} round trips)",
            "1-byte echo RTT p50 / p99", self.echo_ms.0, self.echo_ms.1, self.echo_ms.2
        )
    }
}

/// Run the benchmark described by `a`; prints the table. With `metrics_addr`, the metrics
/// endpoint runs on its own runtime for the whole run (and `--linger` after it).
pub fn run(a: BenchArgs, metrics_addr: Option<SocketAddr>) -> Result<(), String> {
    if a.rr.targets_only {
        return rr::run_targets(a.targets_netns.as_deref(), a.rr.targets_bind);
    }
    if a.rr.connections.is_some() {
        return rr::run(&a, metrics_addr);
    }
    let metrics_rt = match metrics_addr {
        Some(addr) => {
            let rt = runtime("rf-metrics", 1)?;
            let bound = rt
                .block_on(crate::metrics::http::start(addr))
                .map_err(|e| e.to_string())?;
            rt.spawn(async { crate::metrics::spawn_sampler(Duration::from_secs(1), |_| {}) });
            println!("Metrics on http://{bound}/metrics");
            Some(rt)
        }
        None => None,
    };
    let report = measure(&a)?;
    println!("{report}");
    if metrics_rt.is_some() {
        // The endpoint's own threads (scrapes, folding, sampler): not in the client's CPU.
        println!(
            "{:<34} {:.3} s",
            "metrics endpoint CPU",
            thread_cpu_seconds("rf-metrics")
        );
    }
    if let Some(path) = &a.plot {
        plot::bench_svg(path, &report)?;
        println!("Plot written to {}", path.display());
    }
    if let (Some(_rt), Some(linger)) = (&metrics_rt, a.linger) {
        // Scripts and tests wait for the table: do not leave it in a pipe buffer.
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::thread::sleep(linger);
    }
    Ok(())
}

/// Run the benchmark and return its figures.
pub fn measure(a: &BenchArgs) -> Result<Report, String> {
    let targets_rt = runtime("rf-target", 1)?;
    let serve_rt = runtime("rf-serve", 2)?;
    let client_rt = runtime("rf-client", 2)?;
    let load_rt = runtime("rf-load", 1)?;

    let external = a.runtime_endpoint.is_some() || a.url.is_some();
    let targets = match &a.target_ports {
        Some(p) => TargetPorts {
            source: p[0],
            sink: p[1],
            echo: p[2],
        },
        None => targets_rt
            .block_on(start_targets(a.targets_netns.as_deref()))
            .map_err(|e| format!("cannot start bench targets: {e}"))?,
    };
    let (upstream, mode) = match (&a.runtime_endpoint, &a.url) {
        (Some(ep), _) => {
            let sb = a
                .sandbox
                .clone()
                .ok_or("--runtime-endpoint needs a SANDBOX_ID")?;
            (
                Upstream::Cri {
                    endpoint: ep.clone(),
                    sandbox: sb.clone(),
                },
                format!("CRI {ep} sandbox {sb}"),
            )
        }
        (None, Some(url)) => (
            Upstream::Url(url.clone()),
            format!("stream server {}", redact_url(url)),
        ),
        (None, None) => {
            let url = serve_rt.block_on(async {
                let (l, url) = serve::bind((Ipv4Addr::LOCALHOST, 0).into()).await?;
                let opts = SessionOptions {
                    forward_half_close: true,
                    ..SessionOptions::default()
                };
                tokio::spawn(serve::serve(l, serve::Dialer::Local, opts));
                Ok::<_, std::io::Error>(url)
            });
            let url = url.map_err(|e| format!("cannot start embedded serve: {e}"))?;
            (
                Upstream::Url(url),
                "embedded (ringfwd serve on loopback)".to_string(),
            )
        }
    };
    let mode = format!("{mode}, protocol {:?}", a.protocol).to_lowercase();
    let specs: Vec<PortSpec> = [targets.source, targets.sink, targets.echo]
        .iter()
        .map(|&p| PortSpec {
            local: 0,
            remote: p,
        })
        .collect();
    let fwd_metrics = ForwardMetrics::new("bench");
    let cfg = ForwardConfig {
        upstream,
        protocol: a.protocol,
        fallback_to_spdy: false,
        addresses: vec![Ipv4Addr::LOCALHOST.into()],
        bearer: None,
        session: SessionOptions::default(),
        pool: PoolOptions::default(),
        metrics: fwd_metrics.clone(),
    };
    let local: Vec<SocketAddr> = client_rt.block_on(async {
        let fwd: Arc<Forwarder> = Forwarder::new(cfg, &specs)
            .await
            .map_err(|e| e.to_string())?;
        let ls = fwd.bind(&specs).await.map_err(|e| e.to_string())?;
        let addrs = ls.iter().map(|l| l.local).collect();
        for l in ls {
            tokio::spawn(fwd.clone().serve_listener(l));
        }
        Ok::<_, String>(addrs)
    })?;

    // The uring plane's workers (one set per process) carry the relays of forward and serve
    // alike: with serve embedded they are a share of their own, else the forward's.
    let cpu = || {
        let workers = thread_cpu_seconds(URING_WORKERS);
        let client = thread_cpu_seconds("rf-client");
        (
            if external { client + workers } else { client },
            thread_cpu_seconds("rf-serve"),
            workers,
        )
    };
    let sampling = Arc::new(AtomicBool::new(a.plot.is_some()));
    let sampler = {
        let (sampling, fm) = (sampling.clone(), fwd_metrics.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut series = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                series.push((t0.elapsed().as_secs_f64(), fm.totals()));
                std::thread::sleep(Duration::from_millis(50));
            }
            series
        })
    };
    let (c0, s0, w0) = cpu();
    let down = load_rt.block_on(download(local[0], a.bytes));
    let (c1, s1, w1) = cpu();
    let transfers = down.and_then(|d| Ok((d, load_rt.block_on(upload(local[1], a.bytes))?)));
    let (c2, s2, w2) = cpu();
    // Stop the sampler whether or not the transfers worked.
    sampling.store(false, Ordering::Relaxed);
    let series = sampler.join().map_err(|_| "bench sampler panicked")?;
    let (download, upload) = transfers?;
    load_rt.block_on(connects(local[0], a.connects))?;
    let mut echo = load_rt.block_on(echoes(local[2], a.echoes))?;
    echo.sort();
    let sessions = fwd_metrics.session(a.protocol.label());
    let first_byte = fwd_metrics.first_byte();
    let report = Report {
        mode,
        bytes: a.bytes,
        download,
        upload,
        client_cpu_down: c1 - c0,
        client_cpu_up: c2 - c1,
        serve_cpu: (!external).then_some((s1 - s0, s2 - s1)),
        shared_workers_cpu: (!external && w2 > w0).then_some((w1 - w0, w2 - w1)),
        first_byte_ms: hist_ms(first_byte),
        setup_ms: hist_ms(sessions.setup()),
        stall_ms: hist_ms(sessions.stall()),
        echo_ms: (pct(&echo, 0.5), pct(&echo, 0.99), echo.len()),
        series,
        echo,
        first_byte_hist: (first_byte.bounds(), first_byte.counts()),
    };
    // Runtimes drop here; their tasks (listeners, sessions) end with them.
    load_rt.shutdown_background();
    client_rt.shutdown_background();
    serve_rt.shutdown_background();
    targets_rt.shutdown_background();
    Ok(report)
}
