//! The relay over loopback sockets, two hops: a client talks to a `Forwarder` listening on
//! 127.0.0.1:0, which tunnels to an in-process `ringfwd serve`, which dials the targets
//! (`ringfwd bench`'s source and sink, also on 127.0.0.1:0).
//!
//! Each iteration opens a new connection and moves [`bytes`] (64 MiB unless
//! `RINGFWD_BENCH_BYTES` says otherwise) down (from the source) or up (to the sink, which
//! answers once it has everything); the figure is payload bytes per second of wall time.
//! `loopback/direct` is the same client talking to the targets without a relay: the ceiling.
//!
//! Groups are named `relay/<backend>`, with `<protocol>/<direction>` inside. The data plane
//! is a [`Backend`]: `epoll` (splice between plain TCP sockets) and `copy` (read/write through
//! user memory), both on tokio's epoll reactor, and `uring` (the sessions and their
//! connections on io_uring worker threads that own their sockets).
//!
//! The load (client and targets) and the system under test (serve and forwarder) each run on
//! a runtime of their own, as they would in separate processes.
//!
//! Run: `cargo bench --bench relay` (about a minute), or e.g. `cargo bench --bench relay --
//! relay/epoll/spdy` for a subset.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use ringfwd::bench::{TargetPorts, start_targets};
use ringfwd::control::forward::{ForwardConfig, Forwarder, PortSpec, Upstream};
use ringfwd::control::pool::PoolOptions;
use ringfwd::control::upgrade::Protocol;
use ringfwd::relay::SessionOptions;
use ringfwd::serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

const IO_BUF: usize = 256 * 1024;

fn bytes() -> u64 {
    std::env::var("RINGFWD_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20)
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Where the client connects for each target.
#[derive(Clone, Copy)]
struct Entry {
    source: SocketAddr,
    sink: SocketAddr,
}

impl Entry {
    fn direct(t: TargetPorts) -> Entry {
        let at = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Entry {
            source: at(t.source),
            sink: at(t.sink),
        }
    }
}

/// A data plane to measure. `start` sets up a `ringfwd serve` and a forward through it to
/// the targets, running on the backend's own threads, and returns where to connect.
trait Backend {
    fn name(&self) -> &'static str;
    fn start(&mut self, protocol: Protocol, targets: TargetPorts) -> Entry;
}

/// A data plane: tokio's epoll reactor splicing or copying, or io_uring rings.
struct Tokio {
    rt: Runtime,
    splice: bool,
    ring: bool,
}

impl Backend for Tokio {
    fn name(&self) -> &'static str {
        match (self.ring, self.splice) {
            (true, _) => "uring",
            (false, true) => "epoll",
            (false, false) => "copy",
        }
    }

    fn start(&mut self, protocol: Protocol, targets: TargetPorts) -> Entry {
        self.rt.block_on(async {
            let (l, url) = serve::bind((Ipv4Addr::LOCALHOST, 0).into())
                .await
                .expect("serve: bind");
            let session = SessionOptions {
                splice: self.splice,
                ring: self.ring,
                ..SessionOptions::default()
            };
            let opts = SessionOptions {
                forward_half_close: true,
                ..session.clone()
            };
            tokio::spawn(serve::serve(l, serve::Dialer::Local, opts));
            let specs = [targets.source, targets.sink].map(|remote| PortSpec { local: 0, remote });
            let cfg = ForwardConfig {
                upstream: Upstream::Url(url),
                protocol,
                fallback_to_spdy: false,
                addresses: vec![Ipv4Addr::LOCALHOST.into()],
                bearer: None,
                session,
                pool: PoolOptions::default(),
                metrics: ringfwd::metrics::ForwardMetrics::detached(),
            };
            let fwd = Forwarder::new(cfg, &specs).await.expect("forwarder");
            let mut ls = fwd.bind(&specs).await.expect("forwarder: bind");
            let entry = Entry {
                source: ls[0].local,
                sink: ls[1].local,
            };
            for l in ls.drain(..) {
                tokio::spawn(fwd.clone().serve_listener(l));
            }
            entry
        })
    }
}

fn backends() -> Vec<Box<dyn Backend>> {
    let mut out: Vec<Box<dyn Backend>> = Vec::new();
    if ringfwd::relay::splice_available() {
        out.push(Box::new(Tokio {
            rt: runtime("sut-epoll"),
            splice: true,
            ring: false,
        }));
    }
    out.push(Box::new(Tokio {
        rt: runtime("sut-copy"),
        splice: false,
        ring: false,
    }));
    match ringfwd::relay::uring::available() {
        Ok(()) => out.push(Box::new(Tokio {
            rt: runtime("sut-uring"),
            splice: false,
            ring: true,
        })),
        Err(why) => eprintln!("relay/uring skipped: {why}"),
    }
    out
}

/// Ask the source for `n` bytes and read them all.
async fn download(at: SocketAddr, n: u64, buf: &mut [u8]) {
    let mut s = TcpStream::connect(at).await.expect("download: connect");
    s.set_nodelay(true).unwrap();
    s.write_u64_le(n).await.unwrap();
    let mut got = 0u64;
    while got < n {
        let k = s.read(buf).await.expect("download: read");
        assert!(k > 0, "download: end of file after {got} of {n} bytes");
        got += k as u64;
    }
}

/// Send `n` bytes to the sink and wait for its count.
async fn upload(at: SocketAddr, n: u64, buf: &[u8]) {
    let mut s = TcpStream::connect(at).await.expect("upload: connect");
    s.set_nodelay(true).unwrap();
    s.write_u64_le(n).await.unwrap();
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await.expect("upload: write");
        left -= k as u64;
    }
    assert_eq!(s.read_u64_le().await.expect("upload: reply"), n);
}

/// `down` and `up` cases for one way in.
fn transfers(g: &mut BenchmarkGroup<'_, WallTime>, load: &Runtime, prefix: &str, e: Entry) {
    let n = bytes();
    // Every iteration is a whole transfer: ten of them per case, not criterion's 55.
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(n));
    let mut buf = vec![0x5au8; IO_BUF];
    g.bench_function(format!("{prefix}down"), |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                load.block_on(download(e.source, n, &mut buf));
            }
            t0.elapsed()
        })
    });
    g.bench_function(format!("{prefix}up"), |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                load.block_on(upload(e.sink, n, &buf));
            }
            t0.elapsed()
        })
    });
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let load = runtime("load");
    let targets = load
        .block_on(start_targets(None))
        .expect("start bench targets");

    let mut g = c.benchmark_group("loopback/direct");
    transfers(&mut g, &load, "", Entry::direct(targets));
    g.finish();

    for mut backend in backends() {
        let mut g = c.benchmark_group(format!("relay/{}", backend.name()));
        for (name, protocol) in [("spdy", Protocol::Spdy), ("websocket", Protocol::Websocket)] {
            let e = backend.start(protocol, targets);
            transfers(&mut g, &load, &format!("{name}/"), e);
        }
        g.finish();
    }
    c.final_summary();
}
