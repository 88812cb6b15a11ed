//! `--spread` through the test API server (`support::apiserver`, which real kubectl accepts):
//! a service, a deployment, its ReplicaSet, a statefulset and a label selector over three pods, each a real containerd pod
//! sandbox with its own target server, reached through containerd's stream server as
//! kube-apiserver and kubelet reach it.
//!
//! Each pod's target tells the client which pod it is (its first line is the pod's name) and
//! then echoes, so every assertion is on what the pods themselves saw: how many connections
//! each got, which connections ended when a pod went away, which pod a new connection reached
//! after a pod turned ready, what a client of a pod whose port refuses sees, and what a
//! new connection sees while no pod is ready. Waits are for
//! events (a log line, a reset, a byte), never sleeps; deadlines are failure bounds only.
//!
//! A custom harness (libtest-mimic) starts containerd and the three sandboxes once; each
//! scenario gets its own API server. Without root or containerd every scenario is reported as
//! ignored with a loud SKIPPED line; with `CI` set that is a failure.

mod support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use support::apiserver::{ApiServer, Auth, Backend, IntOrString, PodDef, ServicePortDef};
use support::procs::{self, PortForward, RINGFWD, http_get, payload};

const NAMESPACE: &str = "default";
/// The pods' names; the sandboxes behind them are `ringfwd-spread-{a,b,c}`.
const PODS: [&str; 3] = ["web-a", "web-b", "web-c"];
/// Longest wait for a line, a byte or a reset: a failure bound, far above what any takes.
const DEADLINE: Duration = Duration::from_secs(30);
/// The target: a pod that turns ready gets new connections within this.
const READY_WITHIN: Duration = Duration::from_secs(2);

/// One pod sandbox and the ports of its targets, in its own network namespace.
#[derive(Clone)]
struct Sandbox {
    id: String,
    /// Says the pod's name on a line, then echoes.
    echo: u16,
    /// Nothing listens here.
    closed: u16,
}

struct Fixture {
    endpoint: String,
    sandboxes: Vec<Sandbox>,
}

/// Target: on each connection, the pod's name and a newline, then an echo of what comes.
fn name_then_echo(l: TcpListener, pod: &'static str) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                if conn.write_all(format!("{pod}\n").as_bytes()).is_err() {
                    return;
                }
                let mut rd = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut rd, &mut conn);
            });
        }
    });
}

/// How a scenario's pods look to the API server.
struct PodSpec {
    ready: bool,
    /// The pod's container port `echo` is a port nothing listens on.
    refuses: bool,
}

const READY: PodSpec = PodSpec {
    ready: true,
    refuses: false,
};

impl Fixture {
    /// A fresh API server with deployment `web` (selector app=web) and its ReplicaSet (whose
    /// name is returned), statefulset `web` (the same selector), pods `web-a`, `web-b`,
    /// `web-c` (one per sandbox, container port `echo` its own number, as `specs` say) and
    /// service `web`, port 80 -> targetPort `echo`: a named port each pod resolves to its own
    /// number.
    fn api(&self, specs: [PodSpec; 3]) -> (ApiServer, String) {
        let api = ApiServer::start();
        let rs = api.add_deployment("web", NAMESPACE, &[("app", "web")], 3);
        api.add_statefulset("web", NAMESPACE, &[("app", "web")]);
        for ((name, sb), spec) in PODS.iter().zip(&self.sandboxes).zip(specs) {
            let port = if spec.refuses { sb.closed } else { sb.echo };
            api.add_pod(
                PodDef::new(
                    name,
                    Backend::Cri {
                        endpoint: self.endpoint.clone(),
                        sandbox: sb.id.clone(),
                    },
                )
                .label("app", "web")
                .owner(&rs)
                .port(Some("echo"), port)
                .ready(spec.ready),
            );
        }
        api.add_service(
            "web",
            NAMESPACE,
            &[("app", "web")],
            vec![ServicePortDef::new(
                Some("http"),
                80,
                IntOrString::Str("echo".into()),
            )],
        );
        (api, rs.name)
    }
}

/// `ringfwd --kubeconfig K ARGS --spread --metrics-addr 127.0.0.1:0`, started.
fn spread(api: &ApiServer, args: &[&str], rust_log: Option<&str>) -> Result<Forward, Failed> {
    let mut cmd = Command::new(RINGFWD);
    cmd.arg("--kubeconfig")
        .arg(api.kubeconfig(Auth::Token))
        .env_remove("KUBECONFIG")
        .args(args)
        .args(["--spread", "--metrics-addr", "127.0.0.1:0"])
        .stdin(Stdio::null());
    match rust_log {
        Some(l) => cmd.env("RUST_LOG", l),
        None => cmd.env_remove("RUST_LOG"),
    };
    let pf = PortForward::start(cmd).map_err(|e| format!("ringfwd did not start: {e}"))?;
    let metrics = pf
        .metrics_addr()
        .ok_or("no metrics address before the Forwarding line")?;
    Ok(Forward { pf, metrics })
}

struct Forward {
    pf: PortForward,
    /// `host:port` of its metrics endpoint.
    metrics: String,
}

impl Forward {
    fn scrape(&self) -> Result<String, Failed> {
        let (status, body) = http_get(&self.metrics, "/metrics")?;
        check(status == 200, || format!("/metrics: HTTP {status}"))?;
        Ok(body)
    }

    /// Waits for `needle` on its stderr.
    fn wait_log(&self, needle: &str) -> Result<(), Failed> {
        check(self.pf.wait_stderr(needle, DEADLINE), || {
            format!("no {needle:?} in ringfwd's log:\n{}", self.pf.stderr())
        })
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(what().into()) }
}

/// A connection through the forward and the pod that answered it (its first line).
struct Conn {
    s: TcpStream,
    pod: String,
}

/// Connect to `port` and read which pod answers; the error says how it failed (a reset).
fn open(port: u16) -> Result<Conn, (u16, std::io::Error)> {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|e| (0, e))?;
    let local = s.local_addr().map(|a| a.port()).unwrap_or(0);
    s.set_read_timeout(Some(DEADLINE)).map_err(|e| (local, e))?;
    let mut line = String::new();
    // One byte at a time: what follows the line is the echo's, not the reader's buffer's.
    let mut byte = [0u8; 1];
    loop {
        match (&s).read(&mut byte) {
            Ok(0) => {
                let eof = std::io::Error::new(ErrorKind::UnexpectedEof, "closed before a name");
                return Err((local, eof));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0] as char),
            Err(e) => return Err((local, e)),
        }
    }
    Ok(Conn { s, pod: line })
}

impl Conn {
    /// `n` bytes go to the pod and come back unchanged.
    fn echo(&mut self, n: usize) -> Result<(), String> {
        let data = payload(n, n as u64);
        let mut back = vec![0u8; n];
        self.s
            .write_all(&data)
            .and_then(|()| self.s.read_exact(&mut back))
            .map_err(|e| format!("echo of {n} bytes through {}: {e}", self.pod))?;
        if back != data {
            return Err(format!("{n} bytes changed on the way to {}", self.pod));
        }
        Ok(())
    }

    fn local_port(&self) -> u16 {
        self.s.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

/// `open`, with the failure as a test failure.
fn open_ok(port: u16) -> Result<Conn, Failed> {
    open(port).map_err(|(local, e)| format!("connection from :{local}: {e}").into())
}

/// The per-pod series of `family` for the forward `forward`: pod -> value.
fn per_pod(exposition: &str, family: &str, forward: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let fwd = format!("forward=\"{forward}\"");
    for line in exposition.lines().filter(|l| l.starts_with(family)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !series.starts_with(&format!("{family}{{")) || !series.contains(&fwd) {
            continue;
        }
        let Some(pod) = series
            .split("pod=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        *out.entry(pod.to_string()).or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// `svc/web :80 --spread -v`: 300 connections, ten waves of 30 held open together, spread
/// evenly (100 ± 10 each); ringfwd's per-pod counters agree with what the pods saw, `/streams`
/// names an open connection's pod, and `-v` logs each connection's pod.
fn even_over_three_pods(fx: &Fixture) -> Result<(), Failed> {
    let (api, _) = fx.api([READY, READY, READY]);
    let fwd = spread(&api, &["svc/web", ":80", "-v"], None)?;
    check(fwd.pf.remote == 80, || {
        format!("listens for service port 80, says {}", fwd.pf.remote)
    })?;
    let out = fwd.pf.stdout();
    check(
        out.contains("Spreading connections over 3 ready pods of svc/web: web-a, web-b, web-c"),
        || format!("no line naming the ready pods: {out:?}"),
    )?;
    let started = Instant::now();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let mut wave = Vec::new();
        for _ in 0..30 {
            wave.push(open_ok(fwd.pf.local)?);
        }
        for c in &mut wave {
            c.echo(1024)?;
            *seen.entry(c.pod.clone()).or_default() += 1;
        }
    }
    eprintln!("300 connections in {:?}: {seen:?}", started.elapsed());
    check(
        seen.len() == 3 && seen.values().all(|n| (90..=110).contains(n)),
        || format!("300 connections over 3 pods went {seen:?}, want 100 ± 10 each"),
    )?;

    // One connection held open: /streams shows it with its pod.
    let held = open_ok(fwd.pf.local)?;
    let peer = held.s.local_addr()?.to_string();
    let (_, body) = http_get(&fwd.metrics, "/streams")?;
    let streams: serde_json::Value = serde_json::from_str(&body)?;
    let shown = streams["streams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["peer"] == peer.as_str())
        .ok_or_else(|| format!("/streams lacks the open connection from {peer}: {body}"))?;
    check(shown["pod"] == held.pod.as_str(), || {
        format!(
            "/streams says {} for a connection {} answered",
            shown["pod"], held.pod
        )
    })?;
    *seen.entry(held.pod.clone()).or_default() += 1;

    // ringfwd counted per pod what the pods saw.
    let counted = per_pod(&fwd.scrape()?, "ringfwd_pod_connections_total", "svc/web");
    let want: BTreeMap<String, f64> = seen.iter().map(|(p, n)| (p.clone(), *n as f64)).collect();
    check(counted == want, || {
        format!("ringfwd_pod_connections_total {counted:?}, the pods saw {want:?}")
    })?;
    // -v: each connection's end names its pod.
    for pod in PODS {
        fwd.wait_log(&format!("pod={pod}"))?;
    }
    Ok(())
}

/// `deploy/web :echo --spread` (a named container port, each pod its own number): pod `web-b`
/// is deleted while connections are held on every pod and new ones keep coming. `web-b`'s open
/// connections are reset, the others go on; every connection made once ringfwd has seen it go
/// succeeds on another pod; a connection that failed in between was `web-b`'s; its metric
/// series are gone.
fn a_deleted_pod_ends_only_its_own_connections(fx: &Fixture) -> Result<(), Failed> {
    let (api, _) = fx.api([READY, READY, READY]);
    let fwd = spread(&api, &["deploy/web", ":echo"], Some("ringfwd=info"))?;
    let local = fwd.pf.local;
    // Fewest open first, ties in turn: two on each pod.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(open_ok(local)?);
    }
    let mut on: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &held {
        *on.entry(c.pod.as_str()).or_default() += 1;
    }
    check(on.values().all(|n| *n == 2) && on.len() == 3, || {
        format!("six held connections went {on:?}, want two on each pod")
    })?;

    // New connections one after another, each to its end, while the pod goes. Each result
    // says whether the connection started after ringfwd had let the pod go (`gone`).
    let gone = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = mpsc::channel::<bool>();
    let load = {
        let (gone, stop) = (gone.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut results = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let after = gone.load(Ordering::SeqCst);
                let r = open(local).and_then(|mut c| {
                    let port = c.local_port();
                    c.echo(4096)
                        .map(|()| c.pod.clone())
                        .map_err(|e| (port, std::io::Error::other(format!("{}: {e}", c.pod))))
                });
                results.push((after, r.map_err(|(port, e)| (port, e.to_string()))));
                let _ = done_tx.send(after);
            }
            results
        })
    };
    // Waits for `n` more connections to end, started after the pod went if `after`.
    let wait_for = |n: usize, after: bool| -> Result<(), Failed> {
        let mut left = n;
        while left > 0 {
            let a = done
                .recv_timeout(DEADLINE)
                .map_err(|e| format!("the load stopped: {e}"))?;
            if a || !after {
                left -= 1;
            }
        }
        Ok(())
    };
    wait_for(10, false)?;
    api.remove("pods", NAMESPACE, "web-b");
    for c in &mut held {
        if c.pod == "web-b" {
            procs::expect_reset(&mut c.s)
                .map_err(|e| format!("an open connection to the deleted pod: {e}"))?;
        } else {
            c.echo(64 << 10)
                .map_err(|e| format!("{}'s open connection after web-b went: {e}", c.pod))?;
        }
    }
    fwd.wait_log("pod web-b is gone: reset its")?;
    fwd.wait_log("; 2 ready pods of deploy/web")?;
    gone.store(true, Ordering::SeqCst);
    wait_for(20, true)?;
    stop.store(true, Ordering::SeqCst);
    let results = load.join().expect("load thread");
    let (mut failed, mut per_pod_after) = (Vec::new(), BTreeMap::<String, usize>::new());
    for (after, r) in &results {
        match r {
            Ok(pod) if *after => *per_pod_after.entry(pod.clone()).or_default() += 1,
            Ok(_) => {}
            Err(e) if *after => {
                return Err(format!("a connection made after web-b was gone failed: {e:?}").into());
            }
            Err(e) => failed.push(e.clone()),
        }
    }
    check(
        !per_pod_after.contains_key("web-b") && per_pod_after.len() == 2,
        || format!("connections after web-b went: {per_pod_after:?}"),
    )?;
    // A connection that failed while the pod went was one ringfwd had sent to web-b.
    for (port, e) in &failed {
        fwd.wait_log(&format!("127.0.0.1:{port} to pod web-b"))
            .map_err(|_| format!("connection from :{port} failed ({e}), but not on web-b"))?;
    }
    eprintln!(
        "load: {} connections, {} failed with web-b, after it went: {per_pod_after:?}",
        results.len(),
        failed.len()
    );
    let counted = per_pod(
        &fwd.scrape()?,
        "ringfwd_pod_connections_total",
        "deploy/web",
    );
    check(
        counted.keys().map(String::as_str).eq(["web-a", "web-c"]),
        || format!("series after web-b went: {counted:?}, want web-a and web-c only"),
    )
}

/// `-l app=web --spread :echo`: pod `web-c` is not ready at first and gets nothing while
/// three connections are held (`web-a` two, `web-b` one: the fewest open, ties in turn). It
/// turns ready; ringfwd must see that within [`READY_WITHIN`] (the wait for its line has that
/// deadline), and the next connections go where the fewest are open: the first to `web-c`,
/// none to `web-a`. Prints how long the first took.
fn a_pod_that_turns_ready_gets_connections(fx: &Fixture) -> Result<(), Failed> {
    let unready = PodSpec {
        ready: false,
        refuses: false,
    };
    let (api, _) = fx.api([READY, READY, unready]);
    let fwd = spread(
        &api,
        &["-n", NAMESPACE, "-l", "app=web", ":echo"],
        Some("ringfwd=info"),
    )?;
    let pods = |held: &[Conn]| held.iter().map(|c| c.pod.clone()).collect::<Vec<_>>();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_ok(fwd.pf.local)?);
    }
    check(pods(&held) == ["web-a", "web-b", "web-a"], || {
        format!("three held connections went to {:?}", pods(&held))
    })?;

    let flipped = Instant::now();
    api.set_pod_ready(NAMESPACE, "web-c", true);
    let seen = "pod web-c is ready; 3 ready pods of -l app=web";
    check(fwd.pf.wait_stderr(seen, READY_WITHIN), || {
        format!(
            "no {seen:?} within {READY_WITHIN:?} of web-c turning ready:\n{}",
            fwd.pf.stderr()
        )
    })?;
    let mut new = vec![open_ok(fwd.pf.local)?];
    let took = flipped.elapsed();
    for _ in 0..2 {
        new.push(open_ok(fwd.pf.local)?);
    }
    let went = pods(&new);
    check(
        went[0] == "web-c" && !went.contains(&"web-a".to_string()),
        || {
            format!(
                "after web-c turned ready (open: web-a 2, web-b 1), new connections went to {went:?}"
            )
        },
    )?;
    for c in held.iter_mut().chain(&mut new) {
        c.echo(16 << 10)?;
    }
    eprintln!("web-c turned ready: its first connection {took:?} later");
    let counted = per_pod(
        &fwd.scrape()?,
        "ringfwd_pod_connections_active",
        "default/-l app=web",
    );
    let open: Vec<f64> = counted.values().copied().collect();
    check(open == [2.0, 2.0, 2.0], || {
        format!("ringfwd_pod_connections_active: {counted:?}, want 2 on each pod")
    })
}

/// `sts/web :echo --spread`, where `web-c`'s port has nothing listening: its connections are
/// reset (never a clean end) and ringfwd logs the server's message for each, naming the pod;
/// the others carry their bytes, and connections held open on them go on. (A refused
/// connection ends at once, so `web-c` always has the fewest open; its cool-down after each
/// failure keeps it from drawing every new connection.)
fn a_pod_whose_port_refuses(fx: &Fixture) -> Result<(), Failed> {
    let refusing = PodSpec {
        ready: true,
        refuses: true,
    };
    let (api, _) = fx.api([READY, READY, refusing]);
    let fwd = spread(&api, &["sts/web", ":echo"], Some("ringfwd=info"))?;
    // The first two (ties in turn) are held open on web-a and web-b throughout.
    let mut held = [open_ok(fwd.pf.local)?, open_ok(fwd.pf.local)?];
    let (mut good, mut refused) = (BTreeMap::<String, usize>::new(), Vec::new());
    for _ in 0..30 {
        match open(fwd.pf.local) {
            Ok(mut c) => {
                c.echo(16 << 10)?;
                *good.entry(c.pod.clone()).or_default() += 1;
            }
            Err((port, e)) => {
                check(e.kind() == ErrorKind::ConnectionReset, || {
                    format!("a refused connection ended with {e}, want a reset")
                })?;
                refused.push(port);
            }
        }
    }
    check(
        !refused.is_empty() && good.len() == 2 && !good.contains_key("web-c"),
        || format!("answered by {good:?}, {} reset", refused.len()),
    )?;
    for port in &refused {
        fwd.wait_log(&format!("127.0.0.1:{port} to pod web-c port"))?;
    }
    let log = fwd.pf.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("to pod web-c port"))
        .collect();
    check(lines.iter().all(|l| l.contains("refused")), || {
        format!("the server's message is missing: {lines:#?}")
    })?;
    for c in &mut held {
        c.echo(64 << 10)?;
    }
    eprintln!("answered {good:?}, {} reset by web-c", refused.len());
    Ok(())
}

/// `rs/web-HASH :echo --spread --connect-timeout 5m`: every pod stops being ready while one
/// connection is held on each. A new connection is then reset at once (no wait for a pod: the
/// connect timeout is far beyond the test's deadline, so a wait would show as a timeout, not a
/// reset), with one line saying no pod is ready; the held ones go on (an unready pod keeps its
/// open connections). When `web-b` is ready again the next connection goes there.
fn with_no_ready_pod_a_connection_is_reset_at_once(fx: &Fixture) -> Result<(), Failed> {
    let (api, rs) = fx.api([READY, READY, READY]);
    let target = format!("rs/{rs}");
    let fwd = spread(
        &api,
        &[&target, ":echo", "--connect-timeout", "5m"],
        Some("ringfwd=info"),
    )?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_ok(fwd.pf.local)?);
    }
    for pod in PODS {
        api.set_pod_ready(NAMESPACE, pod, false);
    }
    fwd.wait_log(&format!(
        "no ready pod of {target}: new connections are reset until one is"
    ))?;
    let (port, e) = match open(fwd.pf.local) {
        Ok(c) => return Err(format!("with no ready pod a connection reached {}", c.pod).into()),
        Err(failed) => failed,
    };
    check(e.kind() == ErrorKind::ConnectionReset, || {
        format!("with no ready pod a new connection ended with {e}, want a reset")
    })?;
    let said = format!(
        "connection from 127.0.0.1:{port} to port {} reset: no ready pod of {target}",
        fwd.pf.remote
    );
    fwd.wait_log(&said)?;
    let log = fwd.pf.stderr();
    let lines = log
        .lines()
        .filter(|l| l.contains(&format!("127.0.0.1:{port} ")))
        .count();
    check(lines == 1, || {
        format!("{lines} lines about the reset connection from :{port}:\n{log}")
    })?;
    for c in &mut held {
        c.echo(16 << 10)
            .map_err(|e| format!("a connection held on an unready pod: {e}"))?;
    }
    api.set_pod_ready(NAMESPACE, "web-b", true);
    fwd.wait_log(&format!(
        "pod web-b is ready again; 1 ready pod of {target}"
    ))?;
    let mut next = open_ok(fwd.pf.local)?;
    check(next.pod == "web-b", || {
        format!("with only web-b ready a connection went to {}", next.pod)
    })?;
    next.echo(16 << 10)?;
    Ok(())
}

type Scenario = fn(&Fixture) -> Result<(), Failed>;

fn main() {
    let mut args = Arguments::from_args();
    // Two cores: one scenario at a time.
    args.test_threads.get_or_insert(1);
    let fixture = support::containerd_or_skip("spread scenarios");
    let sandboxes: Vec<support::Sandbox> = fixture
        .iter()
        .flat_map(|c| ["a", "b", "c"].map(|x| c.run_sandbox(&format!("ringfwd-spread-{x}"))))
        .collect();
    let fx = fixture.as_ref().map(|c| {
        let sandboxes = sandboxes
            .iter()
            .zip(PODS)
            .map(|(sb, pod)| {
                let echo = support::listen_in_netns(&sb.netns);
                let closed = support::listen_in_netns(&sb.netns).local_addr().unwrap();
                let port = echo.local_addr().unwrap().port();
                name_then_echo(echo, pod);
                Sandbox {
                    id: sb.id.clone(),
                    echo: port,
                    closed: closed.port(),
                }
            })
            .collect();
        Arc::new(Fixture {
            endpoint: c.endpoint(),
            sandboxes,
        })
    });
    let scenarios: [(&str, Scenario); 5] = [
        ("spread::svc::even_over_three_pods", even_over_three_pods),
        (
            "spread::deploy::a_deleted_pod_ends_only_its_own_connections",
            a_deleted_pod_ends_only_its_own_connections,
        ),
        (
            "spread::selector::a_pod_that_turns_ready_gets_connections",
            a_pod_that_turns_ready_gets_connections,
        ),
        (
            "spread::sts::a_pod_whose_port_refuses",
            a_pod_whose_port_refuses,
        ),
        (
            "spread::rs::with_no_ready_pod_a_connection_is_reset_at_once",
            with_no_ready_pod_a_connection_is_reset_at_once,
        ),
    ];
    let trials = scenarios
        .into_iter()
        .map(|(name, f)| {
            let fx = fx.clone();
            let missing = fx.is_none();
            Trial::test(name, move || match &fx {
                Some(fx) => f(fx),
                None => Ok(()),
            })
            .with_ignored_flag(missing)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(c) = &fixture {
        for sb in &sandboxes {
            c.remove_sandbox(sb);
        }
    }
    drop(fixture);
    conclusion.exit();
}
