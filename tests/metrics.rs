//! Observability against the real thing: the built `ringfwd` binary (`serve`, `forward`,
//! `bench`) with `--metrics-addr`, a real Prometheus (Debian's `prometheus`) scraping it, and
//! real `promtool`.
//!
//! - every panel query of `dashboards/ringfwd.json` (variables substituted) returns data from
//!   Prometheus after transfers, a slow reader, a refused port and a cut session; the per-pod
//!   row's for a `--spread` forward through the test API server (`support/apiserver.rs`) over
//!   two pods, one of which refuses;
//! - the exposition passes `promtool check metrics`; `dashboards/alerts.yml` passes
//!   `promtool check rules` (and loads into the running Prometheus) and `promtool test rules`;
//! - the dashboard, the rules and the README name only metrics the binary exports;
//! - `ringfwd bench --metrics-addr` exports every defined family, with buckets, and `--plot`
//!   writes an SVG.
//!
//! Without Prometheus installed the Prometheus-backed tests print `SKIPPED` loudly; with `CI` set
//! they fail instead (`.ci/run` installs it).

#[path = "support/apiserver.rs"]
#[allow(dead_code)]
mod apiserver;
#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use procs::{
    KillOnDrop, PortForward, Proc, closed_port, http_get, lines, next_line, serve_process,
};
use ringfwd::metrics::names;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");
/// Longest wait for anything (a scrape, a stall, Prometheus starting).
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// `/usr/bin/NAME` (or NAME on PATH), or `None` after a loud SKIPPED line; under CI a missing
/// tool is a failure.
fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: {name} is not installed (apt-get install prometheus)");
        }
        // Straight to fd 2: libtest drops captured output of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: {name} not installed (apt-get install prometheus)"
        );
    }
    found
}

/// A count of something that happens (a scrape request, bytes crossing the session's proxy)
/// that wakes whoever waits for the next one: how a test waits for state it can only look at
/// (a gauge, a query result) without sleeping. It looks again each time the system has done
/// something.
#[derive(Clone, Default)]
struct Events(Arc<(Mutex<u64>, std::sync::Condvar)>);

impl Events {
    fn bump(&self) {
        *self.0.0.lock().unwrap() += 1;
        self.0.1.notify_all();
    }

    fn seen(&self) -> u64 {
        *self.0.0.lock().unwrap()
    }

    /// Wait until one has happened after the first `seen`, failing at `end`.
    fn wait_after(&self, seen: u64, end: Instant, what: &str) {
        let mut n = self.0.0.lock().unwrap();
        while *n <= seen {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            n = self.0.1.wait_timeout(n, left).unwrap().0;
        }
    }
}

/// Ask `f` now and again after each of `events`, until it answers `Some` (for at most
/// [`DEADLINE`]).
fn poll_on<T>(events: &Events, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        let seen = events.seen();
        if let Some(v) = f() {
            return v;
        }
        events.wait_after(seen, end, what);
    }
}

/// Copy `from` to `to` until either ends, showing `seen` every chunk that crossed, then pass
/// the end on.
fn copy_watching(mut from: TcpStream, mut to: TcpStream, mut seen: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                seen(&buf[..n]);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sum of the samples of `name` whose labels contain every `labels` fragment.
fn sample_sum(exposition: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut sum = None;
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or("");
        if series_name == name && labels.iter().all(|l| series.contains(l)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    sum
}

/// Metric families the exposition declares (`# TYPE name kind`).
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The rig: targets, ringfwd serve behind a cuttable proxy, ringfwd forward with metrics
// ---------------------------------------------------------------------------------------------

/// A TCP proxy to `upstream` whose open connections can be cut at once (a network that drops
/// the forward's session).
struct Proxy {
    port: u16,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Chunks that crossed, either way (the session's data, and its PINGs every 100 ms).
    traffic: Events,
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let open = Arc::new(Mutex::new(Vec::new()));
        let registry = open.clone();
        let traffic = Events::default();
        let events = traffic.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let Ok(u) = TcpStream::connect(upstream) else {
                    continue;
                };
                registry.lock().unwrap().push(c.try_clone().unwrap());
                for (from, to) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)] {
                    let events = events.clone();
                    std::thread::spawn(move || copy_watching(from, to, |_| events.bump()));
                }
            }
        });
        Proxy {
            port,
            open,
            traffic,
        }
    }

    /// Cut every connection open now.
    fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

struct Rig {
    /// `ringfwd bench`'s targets (the source: read a u64 LE count, send that many bytes).
    _targets: tokio::runtime::Runtime,
    _serve: Proc,
    proxy: Proxy,
    forward: PortForward,
    /// Local ports: to the source target, to a port nothing listens on.
    source: u16,
    refused: u16,
    /// `host:port` of the forward's metrics endpoint.
    metrics: String,
    /// The forward's `forward` label.
    name: String,
}

impl Rig {
    fn start() -> Rig {
        let (serve, url) = serve_process("off");
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches("/portforward")
            .parse()
            .unwrap();
        let proxy = Proxy::start(addr);
        let name = format!("http://127.0.0.1:{}/portforward", proxy.port);
        let refused = closed_port();
        let targets_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let targets = targets_rt
            .block_on(ringfwd::bench::start_targets(None))
            .expect("bench targets");
        let mut cmd = Command::new(BIN);
        cmd.args(["forward", "--url", &name, "--metrics-addr", "127.0.0.1:0"])
            .args(["--ping-interval", "100ms"])
            .arg(format!(":{}", targets.source))
            .arg(format!(":{refused}"))
            .env("RUST_LOG", "off");
        let forward = PortForward::start_ports(cmd, 2).expect("ringfwd forward starts");
        let metrics = forward
            .metrics_addr()
            .expect("forward prints its metrics address before Forwarding");
        let ports = forward.forwarded();
        Rig {
            _targets: targets_rt,
            _serve: serve,
            proxy,
            source: ports[0].0,
            refused: ports[1].0,
            forward,
            metrics,
            name,
        }
    }

    fn scrape(&self) -> String {
        let (status, body) = http_get(&self.metrics, "/metrics").expect("scrape");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Connect to the source and ask for `n` bytes.
    fn request(&self, n: u64) -> TcpStream {
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, self.source)).unwrap();
        c.set_read_timeout(Some(procs::IO_TIMEOUT)).unwrap();
        c.write_all(&n.to_le_bytes()).unwrap();
        c
    }

    fn download(&self, n: u64) {
        let mut c = self.request(n);
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => got += k as u64,
                Err(e) => panic!("download broke after {got} of {n} bytes: {e}"),
            }
        }
        assert_eq!(got, n);
    }

    /// Every kind of traffic the dashboard shows: transfers, a refused port, a slow reader that
    /// stalls the session, a session cut under an open connection, and the reconnect after it.
    fn exercise(&self) {
        for _ in 0..5 {
            self.download(1 << 20);
        }
        // server_error: nothing listens on the remote port.
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, self.refused)).unwrap();
        c.set_read_timeout(Some(procs::IO_TIMEOUT)).unwrap();
        let _ = c.write_all(b"x");
        let _ = c.read(&mut [0u8; 16]);

        // A slow reader: ask for more than every buffer on the way holds and read nothing until
        // the forward reports its session reader waiting for us.
        let n = 128u64 << 20;
        let mut slow = self.request(n);
        poll_on(
            &self.proxy.traffic,
            "the session reader to stall on the slow client",
            || (sample_sum(&self.scrape(), names::SESSIONS_STALLED, &[])? >= 1.0).then_some(()),
        );
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        while got < n {
            match slow.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => got += k as u64,
                Err(e) => panic!("slow download broke after {got} bytes: {e}"),
            }
        }
        assert_eq!(got, n);

        // The network drops the session while a transfer runs: that connection is reset
        // (session_lost), the next one gets a new session (a reconnect).
        let mut cut = self.request(1 << 40);
        cut.read_exact(&mut buf[..1024]).unwrap();
        self.proxy.cut();
        while matches!(cut.read(&mut buf), Ok(k) if k > 0) {}
        for _ in 0..3 {
            self.download(1 << 20);
        }
        let m = self.scrape();
        assert!(
            sample_sum(&m, names::RECONNECTS, &[]).unwrap_or(0.0) >= 1.0,
            "no reconnect counted:\n{m}"
        );
    }
}

/// A `--spread` forward of `svc/web :80` through the test API server, over pods `web-a` (an
/// echo target) and `web-b` (its port refuses), both behind an in-process `ringfwd serve`:
/// traffic for every per-pod series, without containerd.
struct SpreadRig {
    _api: apiserver::ApiServer,
    forward: PortForward,
    metrics: String,
    /// The forward's `forward` label.
    name: String,
}

impl SpreadRig {
    fn start() -> SpreadRig {
        use apiserver::{ApiServer, Auth, IntOrString, PodDef, ServicePortDef};
        let api = ApiServer::start();
        let backend = api.serve_backend();
        for (pod, port) in [("web-a", procs::echo_server()), ("web-b", closed_port())] {
            api.add_pod(
                PodDef::new(pod, backend.clone())
                    .label("app", "web")
                    .port(Some("echo"), port),
            );
        }
        let http = ServicePortDef::new(Some("http"), 80, IntOrString::Str("echo".into()));
        api.add_service("web", "default", &[("app", "web")], vec![http]);
        let mut cmd = Command::new(BIN);
        cmd.arg("--kubeconfig")
            .arg(api.kubeconfig(Auth::Token))
            .args([
                "svc/web",
                ":80",
                "--spread",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "off");
        let forward = PortForward::start(cmd).expect("ringfwd svc/web --spread starts");
        let metrics = forward
            .metrics_addr()
            .expect("forward prints its metrics address before Forwarding");
        SpreadRig {
            _api: api,
            forward,
            metrics,
            name: "svc/web".into(),
        }
    }

    /// Connections to both pods: echoes through `web-a`, resets from `web-b`.
    fn exercise(&self) {
        let mut answered = 0;
        for _ in 0..10 {
            if procs::echo_roundtrip(self.forward.local, 64 << 10).is_ok() {
                answered += 1;
            }
        }
        assert!(answered > 0, "no connection through web-a worked");
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// A Prometheus on a free loopback port, scraping its targets every second, with the alert
/// rules loaded; killed on drop.
struct Prometheus {
    _child: KillOnDrop,
    addr: String,
    _dir: tempfile::TempDir,
    /// Scrape requests Prometheus has sent (it scrapes through a counting proxy). A scrape
    /// starts only after the one before has been stored, so the next one says the last is in.
    scrapes: Events,
}

/// A proxy to `target` that counts the `GET /metrics` requests sent through it; its address.
fn scrape_counter(target: &str, scrapes: Events) -> String {
    let target: SocketAddr = target.parse().unwrap();
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(u) = TcpStream::connect(target) else {
                continue;
            };
            let (c2, u2) = (c.try_clone().unwrap(), u.try_clone().unwrap());
            let requests = scrapes.clone();
            std::thread::spawn(move || copy_watching(u2, c2, |_| {}));
            // A request is small and written at once: its line is within one read.
            std::thread::spawn(move || {
                copy_watching(c, u, |b| {
                    for _ in b.windows(12).filter(|w| w == b"GET /metrics") {
                        requests.bump();
                    }
                })
            });
        }
    });
    addr
}

impl Prometheus {
    fn start(bin: &Path, targets: &[&str]) -> Prometheus {
        let scrapes = Events::default();
        let targets: Vec<String> = targets
            .iter()
            .map(|t| format!("'{}'", scrape_counter(t, scrapes.clone())))
            .collect();
        let targets = targets.join(", ");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {ROOT}/dashboards/alerts.yml\n\
                 scrape_configs:\n  - job_name: ringfwd\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        // Prometheus cannot listen on port 0 and say where: take a free port and try again if
        // someone else takes it first.
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", closed_port());
            let mut child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn prometheus");
            // Its log line by line: the readiness line is the event to wait for, and the end
            // of the log (it exited) is the other.
            let log = lines(child.stderr.take().unwrap(), "prometheus");
            let child = KillOnDrop(child);
            let ready = next_line(&log, DEADLINE, |l| {
                l.contains("Server is ready to receive web requests")
                    .then_some(())
            });
            let text = match ready {
                Ok(()) => {
                    return Prometheus {
                        _child: child,
                        addr,
                        _dir: dir,
                        scrapes,
                    };
                }
                Err((std::sync::mpsc::RecvTimeoutError::Disconnected, seen)) => seen.join("\n"),
                Err((std::sync::mpsc::RecvTimeoutError::Timeout, _)) => {
                    panic!("prometheus not ready after {DEADLINE:?}")
                }
            };
            assert!(
                text.contains("address already in use"),
                "prometheus exited:\n{text}"
            );
        }
        panic!("no free port for prometheus after 5 tries");
    }

    fn api(&self, target: &str) -> serde_json::Value {
        let (status, body) = http_get(&self.addr, target).expect("prometheus API");
        assert_eq!(status, 200, "{target}: {body}");
        serde_json::from_str(&body).expect("prometheus JSON")
    }

    /// Instant query: the result vector.
    fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls until `promql` returns at least one sample with a finite value.
    fn wait_for_data(&self, promql: &str) -> Vec<serde_json::Value> {
        poll_on(&self.scrapes, &format!("data for {promql}"), || {
            let r = self.query(promql);
            r.iter()
                .any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                })
                .then_some(r)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules
// ---------------------------------------------------------------------------------------------

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{ROOT}/dashboards/ringfwd.json")).unwrap();
    serde_json::from_str(&text).expect("dashboards/ringfwd.json is JSON")
}

/// `(panel title, expr)` of every panel target, rows' nested panels included.
fn panel_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let title = p["title"].as_str().unwrap_or("?").to_string();
                out.push((title, t["expr"].as_str().unwrap_or("").to_string()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// A Grafana regex variable value for `s`, inside a PromQL string.
fn regex_value(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push_str(r"\\");
        }
        out.push(c);
    }
    out
}

/// Substitute the dashboard's variables as Grafana would for `forward`, over a 5 m range.
fn substitute(expr: &str, forward: &str) -> String {
    expr.replace("$forward", &regex_value(forward))
        .replace("${forward}", &regex_value(forward))
        .replace("$__rate_interval", "5m")
        .replace("$__range", "5m")
        .replace("$__interval", "5m")
}

/// Every `ringfwd_*` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ringfwd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let before_ok = i == 0
            || !rest[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if before_ok {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Names in `used` that are not series of the exported `families` (a histogram family exports
/// `_bucket`, `_sum` and `_count`).
fn unexported(used: &BTreeSet<String>, families: &[(String, String)]) -> Vec<String> {
    used.iter()
        .filter(|n| {
            !families.iter().any(|(f, kind)| {
                *n == f
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| **n == format!("{f}{s}")))
            })
        })
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The issue's main check: a real Prometheus scrapes a forward that carried every kind of
/// traffic, and every panel of the dashboard shows data for it.
#[test]
fn prometheus_scrapes_and_every_dashboard_panel_has_data() {
    let test = "prometheus_scrapes_and_every_dashboard_panel_has_data";
    let Some(bin) = tool_or_skip("prometheus", test) else {
        return;
    };
    let rig = Rig::start();
    let spread = SpreadRig::start();
    let prom = Prometheus::start(&bin, &[&rig.metrics, &spread.metrics]);
    poll_on(
        &prom.scrapes,
        "prometheus's first scrape of both forwards",
        || {
            let t = prom.api("/api/v1/targets");
            let up = t["data"]["activeTargets"].as_array()?;
            (up.len() == 2 && up.iter().all(|t| t["health"] == "up")).then_some(())
        },
    );
    rig.exercise();
    spread.exercise();

    // The last numbers were scraped: the reconnect and a PING round trip are in.
    let f = regex_value(&rig.name);
    prom.wait_for_data(&format!("{}{{forward=~\"{f}\"}} > 0", names::RECONNECTS));
    prom.wait_for_data(&format!(
        "{}_count{{forward=~\"{f}\"}} > 0",
        names::PING_RTT
    ));
    let sf = regex_value(&spread.name);
    prom.wait_for_data(&format!(
        "{}{{forward=~\"{sf}\",pod=\"web-b\",outcome=\"server_error\"}} > 0",
        names::POD_CONNECTIONS_CLOSED
    ));

    // The forward variable's query offers this forward.
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let fwd_var = vars
        .iter()
        .find(|v| v["name"] == "forward")
        .expect("a forward variable");
    let def = fwd_var["definition"].as_str().unwrap();
    let metric = def
        .strip_prefix("label_values(")
        .and_then(|r| r.split(',').next())
        .expect("label_values(METRIC, forward)");
    let values = prom.api(&format!(
        "/api/v1/label/forward/values?match[]={}",
        url_encode(metric)
    ));
    assert!(
        values["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == rig.name.as_str()),
        "{def} does not offer {}: {values}",
        rig.name
    );

    let queries = panel_queries(&d);
    assert!(queries.len() >= 19, "only {} panel queries", queries.len());
    // The per-pod row shows --spread forwards: its panels are asked about the spread one.
    let per_pod = queries
        .iter()
        .filter(|(_, e)| e.contains("ringfwd_pod_"))
        .count();
    assert!(per_pod >= 4, "the per-pod row has {per_pod} queries");
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let forward = if expr.contains("ringfwd_pod_") {
            &spread.name
        } else {
            &rig.name
        };
        let q = substitute(expr, forward);
        assert!(!q.contains('$'), "unsubstituted variable in {title}: {q}");
        let r = prom.query(&q);
        let finite = r.iter().any(|s| {
            s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        });
        if !finite {
            empty.push(format!("{title}: {q} -> {r:?}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // What the traffic did shows up as such, not just as zeros.
    for (q, what) in [
        (
            format!("sum(rate(ringfwd_bytes_total{{forward=~\"{f}\",direction=\"down\"}}[5m]))"),
            "bytes down",
        ),
        (
            format!(
                "sum(ringfwd_connections_closed_total{{forward=~\"{f}\",outcome=\"server_error\"}})"
            ),
            "the refused port",
        ),
        (
            format!(
                "sum(ringfwd_connections_closed_total{{forward=~\"{f}\",outcome=\"session_lost\"}})"
            ),
            "the connection cut with its session",
        ),
        (
            format!("sum(ringfwd_sessions_failed_total{{forward=~\"{f}\",error=~\"eof|io\"}})"),
            "the cut session",
        ),
        (
            format!("sum(ringfwd_relay_stall_seconds_count{{forward=~\"{f}\"}})"),
            "the slow reader's stall",
        ),
        (
            format!(
                "sum(rate(ringfwd_pod_bytes_total{{forward=~\"{sf}\",pod=\"web-a\",direction=\"down\"}}[5m]))"
            ),
            "bytes from web-a",
        ),
        (
            format!("sum(ringfwd_pod_connections_total{{forward=~\"{sf}\",pod=\"web-b\"}})"),
            "connections sent to web-b",
        ),
    ] {
        let r = prom.wait_for_data(&q);
        let v: f64 = r[0]["value"][1].as_str().unwrap().parse().unwrap();
        assert!(v > 0.0, "{what}: {q} = {v}");
    }

    // The rules loaded into this Prometheus.
    let rules = prom.api("/api/v1/rules");
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, 4, "{rules}");
}

#[test]
fn exposition_passes_promtool_check_metrics() {
    let Some(promtool) = tool_or_skip("promtool", "exposition_passes_promtool_check_metrics")
    else {
        return;
    };
    let rig = Rig::start();
    rig.download(1 << 20);
    let exposition = rig.scrape();
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "{said}\n{exposition}"
    );
}

fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let bin = tool_or_skip("promtool", "alert rules")?;
    let out = Command::new(bin)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap();
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    if let Some((ok, out)) = promtool(&["check", "rules", "dashboards/alerts.yml"]) {
        assert!(ok && out.contains("SUCCESS: 4 rules found"), "{out}");
    }
}

#[test]
fn alert_rules_pass_promtool_test_rules() {
    if let Some((ok, out)) = promtool(&["test", "rules", "dashboards/alerts.test.yml"]) {
        assert!(ok && out.contains("SUCCESS"), "{out}");
    }
}

/// The dashboard, the alert rules (and their tests) and the README name only metrics the
/// binary exports; the exposition has exactly the families `src/metrics/names.rs` defines;
/// the README's metrics section lists every one of them.
#[test]
fn dashboard_rules_and_readme_name_only_exported_metrics() {
    let rig = Rig::start();
    rig.download(1 << 20);
    let exported = families(&rig.scrape());
    let defined: BTreeSet<&str> = names::ALL.iter().map(|d| d.name).collect();
    let exported_names: BTreeSet<&str> = exported.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(exported_names, defined, "exposition and names.rs differ");

    let mut bad = Vec::new();
    for file in [
        "dashboards/ringfwd.json",
        "dashboards/alerts.yml",
        "dashboards/alerts.test.yml",
        "README.md",
    ] {
        let text = std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        for n in unexported(&used, &exported) {
            bad.push(format!("{file}: {n}"));
        }
    }
    assert!(
        bad.is_empty(),
        "not exported by ringfwd:\n{}",
        bad.join("\n")
    );

    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let section = readme
        .split("\n## Metrics")
        .nth(1)
        .expect("README has a ## Metrics section");
    let section = section.split("\n## ").next().unwrap();
    for d in names::ALL {
        assert!(
            section.contains(&format!("`{}`", d.name)),
            "README's metrics section does not list {}",
            d.name
        );
    }
}

/// The checks above must be able to fail: a name the binary does not export is caught, a
/// histogram's series are not.
#[test]
fn the_name_check_catches_an_unknown_metric() {
    let families = vec![
        ("ringfwd_bytes_total".to_string(), "counter".to_string()),
        ("ringfwd_stream_bytes".to_string(), "histogram".to_string()),
    ];
    let used = metric_names(
        "rate(ringfwd_bytes_total[5m]) ringfwd_stream_bytes_bucket ringfwd_stream_bytes_count \
         ringfwd_bytes_totally ringfwd_sessions_opened_total xringfwd_no",
    );
    assert_eq!(
        unexported(&used, &families),
        ["ringfwd_bytes_totally", "ringfwd_sessions_opened_total"]
    );
    assert_eq!(
        substitute(
            r#"x{forward=~"$forward"}[$__rate_interval]"#,
            "http://a.b/c"
        ),
        r#"x{forward=~"http://a\\.b/c"}[5m]"#
    );
}

/// `curl /metrics` while `ringfwd bench --metrics-addr` runs shows every family, histograms
/// with buckets; the bench prints its percentiles from the histograms and `--plot` draws.
#[test]
fn bench_exports_every_family_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bench.svg");
    let mut cmd = Command::new(BIN);
    cmd.args(["bench", "--metrics-addr", "127.0.0.1:0"])
        .args(["--bytes", "32MiB", "--connects", "20", "--echoes", "100"])
        .arg("--plot")
        .arg(&svg)
        .args(["--linger", "5m"])
        .env("RUST_LOG", "off");
    let bench = Proc::spawn(cmd);
    let mut table = Vec::new();
    let mut metrics = None;
    procs::wait_line(&bench.stdout, "the bench's plot line", |line| {
        if let Some(a) = line.strip_prefix("Metrics on http://") {
            metrics = a.strip_suffix("/metrics").map(str::to_string);
        }
        table.push(line.to_string());
        line.starts_with("Plot written to").then_some(())
    });
    let table = table.join("\n");
    let metrics = metrics.unwrap_or_else(|| panic!("no metrics address in:\n{table}"));
    // Lingering after the run: the endpoint still serves the final numbers.
    let (status, body) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    for d in names::ALL {
        let kind = match d.kind {
            names::Kind::Counter => "counter",
            names::Kind::Gauge => "gauge",
            names::Kind::Histogram(_) => "histogram",
        };
        assert!(
            body.contains(&format!("# TYPE {} {kind}\n", d.name)),
            "bench exports no {kind} {}",
            d.name
        );
        assert!(
            body.contains(&format!("# HELP {} ", d.name)),
            "{} has no help",
            d.name
        );
        if let names::Kind::Histogram(buckets) = d.kind {
            assert!(
                body.contains(&format!("{}_bucket{{", d.name)) && body.contains("le=\"+Inf\""),
                "{} has no buckets",
                d.name
            );
            let top = format!("le=\"{}\"", buckets[buckets.len() - 1]);
            assert!(body.contains(&top), "{} lacks its {top} bucket", d.name);
        }
    }
    let bench_bytes = sample_sum(
        &body,
        names::BYTES,
        &["forward=\"bench\"", "direction=\"down\""],
    );
    assert!(
        bench_bytes.unwrap_or(0.0) >= (32u64 << 20) as f64,
        "bench forward bytes down: {bench_bytes:?}"
    );
    assert!(
        table.contains("TTFB p50 / p99") && table.contains("histogram"),
        "{table}"
    );

    let picture = std::fs::read_to_string(&svg).expect("--plot wrote the SVG");
    assert!(picture.starts_with("<svg"), "not an SVG");
    for w in [
        "throughput over time",
        "time to first byte",
        "echo round trip",
        "Gbit/s",
    ] {
        assert!(picture.contains(w), "plot lacks {w:?}");
    }
    assert!(
        picture.matches("<polyline").count() >= 2,
        "no throughput lines"
    );
    assert!(picture.matches("<rect").count() >= 10, "no histogram bars");
}

/// `--metrics-addr` shows `/streams`: the open connection with its forward, port, age, bytes
/// and rate.
#[test]
fn streams_endpoint_lists_open_connections() {
    let rig = Rig::start();
    let mut c = rig.request(1 << 40);
    let mut buf = vec![0u8; 1 << 20];
    c.read_exact(&mut buf).unwrap();
    let stream = poll_on(&rig.proxy.traffic, "the open stream in /streams", || {
        let (status, body) = http_get(&rig.metrics, "/streams").ok()?;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let s = v["streams"]
            .as_array()?
            .iter()
            .find(|s| s["bytes_down"].as_u64().unwrap_or(0) >= 1 << 20)?
            .clone();
        Some(s)
    });
    assert_eq!(stream["forward"], rig.name.as_str());
    assert_eq!(stream["port"], rig.forward.forwarded()[0].1);
    assert!(stream["age_seconds"].as_f64().unwrap() > 0.0);
    assert!(stream["bytes_up"].as_u64().unwrap() >= 8, "{stream}");
    for k in [
        "rate_up_bytes_per_second",
        "rate_down_bytes_per_second",
        "peer",
    ] {
        assert!(stream.get(k).is_some(), "{k} missing: {stream}");
    }
}

/// `-v` logs each connection's end as structured fields; without it nothing per connection.
#[test]
fn verbose_logs_each_connection_end_with_bytes_duration_outcome() {
    let rig = Rig::start();
    let remote = format!(":{}", rig.forward.forwarded()[0].1);
    let start = |verbose: bool| {
        let mut cmd = Command::new(BIN);
        cmd.args(["forward", "--url", &rig.name, &remote])
            .env_remove("RUST_LOG");
        if verbose {
            cmd.arg("-v");
        }
        PortForward::start(cmd).expect("forward starts")
    };
    let transfer = |port: u16| {
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        c.set_read_timeout(Some(procs::IO_TIMEOUT)).unwrap();
        c.write_all(&4096u64.to_le_bytes()).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 4096);
    };
    let mut quiet = start(false);
    transfer(quiet.local);
    let mut verbose = start(true);
    transfer(verbose.local);
    assert!(
        verbose.wait_stderr("connection ended", DEADLINE),
        "no connection-end log line: {}",
        verbose.stderr()
    );
    let stderr = verbose.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("connection ended"))
        .map(str::to_string)
        .unwrap();
    verbose.stop();
    quiet.stop();
    for field in [
        "bytes_up=8",
        "bytes_down=4096",
        "duration=",
        "outcome=\"clean\"",
        &format!("port={}", &remote[1..]),
        &format!("forward={}", rig.name),
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(
        !quiet.stderr().contains("connection ended"),
        "logged without -v: {}",
        quiet.stderr()
    );
}

/// A forward under a pseudo-terminal (`script`), stdout and stderr both on it.
struct OnTerminal {
    child: KillOnDrop,
    /// Everything the terminal showed so far; the condvar is signalled on every new chunk.
    out: Arc<(Mutex<String>, std::sync::Condvar)>,
}

impl OnTerminal {
    fn start(args: &[&str]) -> OnTerminal {
        let cmd = std::iter::once(BIN)
            .chain(args.iter().copied())
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = Command::new("script")
            .args(["-qfec", &cmd, "/dev/null"])
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run script(1)");
        let mut pipe = child.stdout.take().unwrap();
        let out = Arc::new((Mutex::new(String::new()), std::sync::Condvar::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.0
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                sink.1.notify_all();
            }
        });
        OnTerminal {
            child: KillOnDrop(child),
            out,
        }
    }

    fn text(&self) -> String {
        self.out.0.lock().unwrap().clone()
    }

    /// Wait (on the terminal's output, for at most [`DEADLINE`]) until `f` finds what it
    /// looks for in everything shown so far.
    fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let end = Instant::now() + DEADLINE;
        let (text, more) = &*self.out;
        let mut t = text.lock().unwrap();
        loop {
            if let Some(v) = f(&t) {
                return v;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}: {:?}", *t);
            t = more.wait_timeout(t, left).unwrap().0;
        }
    }

    /// `(local forward port, metrics host:port)` once both lines are printed.
    fn ports(&self) -> (u16, String) {
        self.wait_for("the forward on a terminal to start", |t| {
            let metrics = t
                .lines()
                .find_map(|l| l.trim().strip_prefix("Metrics on http://"))
                .and_then(|l| l.strip_suffix("/metrics"))?;
            let (local, _) = t.lines().find_map(|l| procs::parse_forwarding(l.trim()))?;
            Some((local, metrics.to_string()))
        })
    }
}

/// On a terminal the live view draws one status line per forward and redraws it in place;
/// with `--quiet`, or when stderr is not a terminal, there is none.
#[test]
fn live_status_line_on_a_terminal_only() {
    let rig = Rig::start();
    let remote = format!(":{}", rig.forward.forwarded()[0].1);
    let common = [
        "forward",
        "--address",
        "127.0.0.1",
        "--metrics-addr",
        "127.0.0.1:0",
        "--url",
        &rig.name,
        &remote,
    ];
    // An endless download keeps a forward's stream open and its rate moving.
    let download = |local: u16| {
        let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, local)).unwrap();
        c.set_read_timeout(Some(procs::IO_TIMEOUT)).unwrap();
        c.write_all(&(1u64 << 40).to_le_bytes()).unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        std::thread::spawn(move || while matches!(c.read(&mut buf), Ok(k) if k > 0) {})
    };
    // The quiet forward runs first, with its download open, so that it has had as many
    // sampler ticks to draw in as the live one when that one has drawn three times.
    let mut quiet_args = common.to_vec();
    quiet_args.push("--quiet");
    let quiet = OnTerminal::start(&quiet_args);
    let quiet_reader = download(quiet.ports().0);
    let live = OnTerminal::start(&common);
    let live_reader = download(live.ports().0);
    let line = format!("{}  1 connection  up 8 B", rig.name);
    live.wait_for("the status line, redrawn", |t| {
        let first = t.find(&line)?;
        // Redrawn in place: erased (carriage return, erase below) and written again.
        t[first..].find("\r\x1b[J")?;
        t[first..].matches(&line).nth(2).map(|_| ())
    });
    assert!(!quiet.text().contains(&line), "status line with --quiet");
    assert!(
        quiet.text().contains("Forwarding from"),
        "the quiet forward printed nothing at all"
    );
    drop((live.child, quiet.child));
    let _ = (live_reader.join(), quiet_reader.join());
    // Not a terminal: the rig's own forward (stderr is a pipe) drew nothing.
    let mut fwd = rig.forward;
    fwd.stop();
    assert!(!fwd.stderr().contains("connection"), "{}", fwd.stderr());
}
