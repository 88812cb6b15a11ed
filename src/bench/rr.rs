//! `ringfwd bench --connections N --message BYTES`: the load-test shape. N connections each
//! write a message to an echo target and read it back, over and over, for `--duration`; the
//! report is requests per second, latency percentiles, and CPU per request of every process on
//! the path.
//!
//! Attribution is per process, so it holds whatever threads a data plane starts: the forwarder
//! (`ringfwd forward`) and the embedded server (`ringfwd serve`) run as child processes of this
//! binary, started as a user would start them, and each one's CPU is its whole process's
//! (`/proc/PID/stat`: every thread, io_uring workers included). The load generator and the echo
//! target stay in this process on their own named runtimes (`rf-load`, `rf-target`). Through a
//! runtime (`--runtime-endpoint`) or a URL, the server is the process on this machine listening
//! on that endpoint (containerd), found through `/proc/net` and the processes' descriptors, or
//! `--server-pid`. With `--echo-addr` no tunnel of ours runs: the load goes to that address, and
//! whoever put something in between measures it (perf/compare.sh does).
//!
//! Counting is checked at both ends: the echo target counts the bytes it answered, so a run
//! whose client-side request count differs from what the target saw says so.
//!
//! Must not touch the relay: it is measured through the command line, as users run it.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TargetPorts, parse_size, runtime, start_counted_targets, thread_cpu_seconds};
use crate::parse_duration;
use crate::secret::redact_url;

/// Round trips per connection before the timed window: sessions and connections set up.
const WARMUP: usize = 10;
/// How long a child may take to print its address.
const CHILD_START: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RrArgs {
    /// Request/response instead of bulk transfers: N connections, each writing --message
    /// bytes to the echo target and reading them back, repeatedly, for --duration.
    #[arg(long, value_name = "N", conflicts_with_all = ["bytes", "connects", "echoes"],
          value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: Option<u32>,
    /// Bytes per request (and per response), with --connections; at most 16MiB (bulk
    /// transfers are what --bytes measures).
    #[arg(long, default_value = "64", value_parser = parse_message, requires = "connections")]
    pub message: u64,
    /// How long to run the requests, with --connections.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION",
          requires = "connections")]
    pub duration: Duration,
    /// With --connections: no tunnel of ours; send the requests to this echo server (for
    /// scripts that measure another relay in between; only the load generator's and the
    /// machine's CPU are reported).
    #[arg(long, value_name = "HOST:PORT", requires = "connections",
          conflicts_with_all = ["runtime_endpoint", "url", "targets_netns", "target_ports"])]
    pub echo_addr: Option<SocketAddr>,
    /// With --connections: the server's process id (containerd), when it is not found from
    /// the endpoint's listening socket.
    #[arg(
        long,
        value_name = "PID",
        requires = "connections",
        conflicts_with = "echo_addr"
    )]
    pub server_pid: Option<u32>,
    /// With --connections: print the report as one JSON object instead of a table.
    #[arg(long, requires = "connections")]
    pub json: bool,
    /// Only start the targets (source, sink, echo; the protocols above), print their ports as
    /// one JSON line, and serve until killed (perf/compare.sh runs them behind other relays).
    #[arg(long, conflicts_with_all = ["connections", "runtime_endpoint", "url", "target_ports", "plot"])]
    pub targets_only: bool,
    /// With --targets-only: the address to listen on (0.0.0.0 inside a pod, for its IP).
    #[arg(
        long,
        value_name = "IP",
        requires = "targets_only",
        conflicts_with = "targets_netns"
    )]
    pub targets_bind: Option<IpAddr>,
}

/// Largest `--message`: every connection holds a request and a response buffer.
const MAX_MESSAGE: u64 = 16 << 20;

fn parse_message(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if n > MAX_MESSAGE => Err(format!(
            "{s:?} is more than a request/response message of at most 16MiB (use --bytes for bulk)"
        )),
        n => Ok(n),
    }
}

/// One process's (or thread group's) CPU over the timed window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuShare {
    /// `forwarder`, `server`, `load generator` or `echo target`.
    pub role: &'static str,
    /// What it is: `ringfwd forward`, `containerd`, `rf-load threads`.
    pub process: String,
    pub pid: Option<u32>,
    pub seconds: f64,
    pub us_per_request: f64,
}

/// Results of one request/response run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RrReport {
    pub mode: String,
    pub data_plane: String,
    pub connections: u32,
    pub message: u64,
    /// The timed window: from the first request to the end of the last.
    pub seconds: f64,
    /// Requests answered and checked by the load generator in the window.
    pub requests: u64,
    /// Requests before the window (per connection, to set up sessions and connections).
    pub warmup_requests: u64,
    /// Requests the echo target answered in the window (bytes echoed / message), when the
    /// target is ours.
    pub answered: Option<u64>,
    pub requests_per_second: f64,
    pub latency_ms: Percentiles,
    pub cpu: Vec<CpuShare>,
    /// Busy time of every CPU (everything running, not only the path).
    pub machine_cpu_seconds: f64,
    pub machine_us_per_request: f64,
    pub cpus: usize,
    /// Requests done so far, sampled every 100 ms (seconds since the start), for `--plot`.
    #[serde(skip)]
    pub series: Vec<(f64, u64)>,
    /// Every request's round trip in nanoseconds, sorted.
    #[serde(skip)]
    pub latencies_ns: Vec<u64>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(sorted_ns: &[u64]) -> Self {
        let at = |p: f64| {
            if sorted_ns.is_empty() {
                return f64::NAN;
            }
            let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
            sorted_ns[i] as f64 / 1e6
        };
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

impl std::fmt::Display for RrReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ringfwd bench: request/response, {}, data plane {}",
            self.mode, self.data_plane
        )?;
        writeln!(
            f,
            "{} connections, {}-byte messages, {:.2} s",
            self.connections, self.message, self.seconds
        )?;
        writeln!(f, "{:<34} value", "metric")?;
        let answered = match self.answered {
            Some(n) if n == self.requests => ", all answered by the echo target".to_string(),
            Some(n) => format!(", but the echo target answered {n}: MISMATCH"),
            None => String::new(),
        };
        writeln!(
            f,
            "{:<34} {:.0} ({} requests{answered})",
            "requests per second", self.requests_per_second, self.requests
        )?;
        let l = &self.latency_ms;
        writeln!(
            f,
            "{:<34} {:.3} / {:.3} / {:.3} ms (max {:.3})",
            "latency p50 / p90 / p99", l.p50, l.p90, l.p99, l.max
        )?;
        for c in &self.cpu {
            let pid = c.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
            writeln!(
                f,
                "{:<34} {:.1} µs ({}{pid}; {:.2} s)",
                format!("{} CPU per request", c.role),
                c.us_per_request,
                c.process,
                c.seconds
            )?;
        }
        write!(
            f,
            "{:<34} {:.1} µs ({} CPUs, everything running; {:.2} s)",
            "whole machine CPU per request",
            self.machine_us_per_request,
            self.cpus,
            self.machine_cpu_seconds
        )
    }
}

/// `--targets-only`: the targets, their ports on stdout, then serve until killed.
pub fn run_targets(netns: Option<&Path>, bind: Option<IpAddr>) -> Result<(), String> {
    let rt = runtime("rf-target", 1)?;
    let (ports, _) = rt
        .block_on(start_counted_targets(netns, bind))
        .map_err(|e| format!("cannot start bench targets: {e}"))?;
    println!(
        "{}",
        serde_json::json!({"source": ports.source, "sink": ports.sink, "echo": ports.echo})
    );
    std::io::Write::flush(&mut std::io::stdout()).map_err(|e| e.to_string())?;
    loop {
        // Until a signal ends the process: the targets run on `rt`'s thread.
        std::thread::park();
    }
}

/// A child process of this binary (`ringfwd forward`, `ringfwd serve`): its stdout lines
/// arrive on a channel, its stderr is kept for errors; killed when dropped.
struct ChildProc {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl ChildProc {
    fn spawn(name: &'static str, exe: &Path, args: &[String]) -> Result<Self, String> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Safety: between fork and exec the hook only makes one async-signal-safe system call
        // (prctl), touching no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the bench (the thread that forked: this one, which outlives the run),
                // so an interrupted bench leaves no forwarder behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", exe.display()))?;
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let keep = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = keep.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                // Only the tail is ever shown.
                if s.len() > 64 * 1024 {
                    let cut = s.len() - 16 * 1024;
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.drain(..cut);
                }
            }
        });
        Ok(ChildProc {
            name,
            child,
            lines,
            stderr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line for which `pick` returns something, passing the others to
    /// `other`; an error with the child's stderr when it exits or stays silent.
    fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(&str) -> Option<T>,
        mut other: impl FnMut(&str),
    ) -> Result<T, String> {
        let deadline = Instant::now() + CHILD_START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match pick(&line) {
                    Some(v) => return Ok(v),
                    None => other(&line),
                },
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} printed no address within {:?}: {}",
                        self.name,
                        CHILD_START,
                        self.stderr_tail()
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string());
                    return Err(format!(
                        "{} exited ({}): {}",
                        self.name,
                        status.unwrap_or_else(|e| e.to_string()),
                        self.stderr_tail()
                    ));
                }
            }
        }
    }

    fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let t = s.trim();
        let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            "no output on stderr".into()
        } else {
            tail
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of process `pid` (all its threads, living and ended), in seconds.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3; utime and stime are fields 14 and 15.
    let rest: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // Safety: sysconf(3) only reads a configuration value; it takes no pointers.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Busy seconds of all CPUs since boot (everything but idle and iowait), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy: u64 = v.iter().take(8).sum::<u64>()
        - v.get(3).copied().unwrap_or(0)
        - v.get(4).copied().unwrap_or(0);
    busy as f64 / clock_ticks()
}

/// Socket inodes listening on `endpoint`: a CRI endpoint (`unix:///path`, or a bare path)
/// or a URL whose host is this machine's loopback.
fn listening_inodes(endpoint: &str) -> Vec<u64> {
    let field = |line: &str, i: usize| line.split_whitespace().nth(i).map(str::to_string);
    if let Some(path) = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint))
    {
        // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is __SO_ACCEPTCON.
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        return table
            .lines()
            .skip(1)
            .filter(|l| field(l, 7).as_deref() == Some(path))
            .filter(|l| {
                field(l, 3)
                    .and_then(|f| u32::from_str_radix(&f, 16).ok())
                    .is_some_and(|f| f & 0x10000 != 0)
            })
            .filter_map(|l| field(l, 6)?.parse().ok())
            .collect();
    }
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return Vec::new();
    };
    let loopback = match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    if !loopback {
        return Vec::new();
    }
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        // sl local_address rem_address st ... inode (field 9); state 0A is LISTEN.
        for l in text.lines().skip(1) {
            let local_port = field(l, 1)
                .and_then(|a| a.rsplit(':').next().map(str::to_string))
                .and_then(|p| u16::from_str_radix(&p, 16).ok());
            if local_port == Some(port) && field(l, 3).as_deref() == Some("0A") {
                inodes.extend(field(l, 9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    inodes
}

/// The process (id, name) that holds one of these socket inodes.
fn socket_owner(inodes: &[u64]) -> Option<(u32, String)> {
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_dir
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                return Some((pid, process_name(pid)));
            }
        }
    }
    None
}

/// The program's name and its subcommand, if any (`containerd`, `ringfwd serve`).
fn process_name(pid: u32) -> String {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return format!("pid {pid}");
    };
    let mut args = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let prog = args.next().unwrap_or_default();
    let prog = prog.rsplit('/').next().unwrap_or_default().to_string();
    match args.next() {
        Some(sub) if !sub.is_empty() && !sub.starts_with('-') && !sub.contains('/') => {
            format!("{prog} {sub}")
        }
        _ => prog,
    }
}

/// What to stop after: a number of round trips, or a moment.
#[derive(Clone, Copy)]
enum Until {
    Count(usize),
    Deadline(Instant),
}

/// Round trips of `message` bytes on `s`; the round-trip times in nanoseconds.
async fn round_trips(
    s: &mut TcpStream,
    message: usize,
    until: Until,
    done: &AtomicU64,
) -> Result<Vec<u64>, String> {
    let mut req: Vec<u8> = (0..message).map(|i| (i % 251) as u8).collect();
    let mut resp = vec![0u8; message];
    let mut out = Vec::new();
    let mut i = 0usize;
    loop {
        match until {
            Until::Count(n) if i >= n => break,
            Until::Deadline(t) if Instant::now() >= t => break,
            _ => {}
        }
        // A mark that changes per request, so a response from another request (or shifted
        // bytes) does not compare equal.
        req[0] = i as u8;
        req[message - 1] = (i >> 8) as u8;
        let t0 = Instant::now();
        // Write and read at once: a message larger than the path's buffers would otherwise
        // wait on the echo, which waits on us to read.
        let (mut r, mut w) = s.split();
        let (sent, got) = tokio::join!(w.write_all(&req), r.read_exact(&mut resp));
        sent.map_err(|e| format!("request {i}: send: {e}"))?;
        got.map_err(|e| format!("request {i}: no full response: {e}"))?;
        out.push(t0.elapsed().as_nanos() as u64);
        if resp != req {
            return Err(format!(
                "request {i}: the response differs from the request"
            ));
        }
        done.fetch_add(1, Ordering::Relaxed);
        i += 1;
    }
    Ok(out)
}

/// The forward's local port for `remote`, from its `Forwarding from 127.0.0.1:P -> R` line.
fn forwarding_port(line: &str, remote: u16) -> Option<u16> {
    let rest = line.split("Forwarding from ").nth(1)?;
    let (local, to) = rest.split_once(" -> ")?;
    if to.trim().parse::<u16>().ok()? != remote {
        return None;
    }
    local.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// Run the request/response benchmark (the CLI's path: `exe` is this binary, started for the
/// forward and the embedded serve).
pub fn measure(
    a: &super::BenchArgs,
    exe: &Path,
    metrics_addr: Option<SocketAddr>,
) -> Result<RrReport, String> {
    let rr = &a.rr;
    let connections = rr.connections.ok_or("--connections is required")?;
    let message = usize::try_from(rr.message).map_err(|_| "--message is too large")?;
    let targets_rt = runtime("rf-target", 1)?;
    let load_rt = runtime("rf-load", 1)?;
    let data_plane = crate::relay::data_plane().name();
    let protocol = clap::ValueEnum::to_possible_value(&a.protocol)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| a.protocol.label().to_string());

    // Who is on the path, and where the load connects.
    let mut children: Vec<ChildProc> = Vec::new();
    let mut cpu_of: Vec<(&'static str, String, u32)> = Vec::new();
    let mut answered_bytes: Option<Arc<AtomicU64>> = None;
    let (entry, mode) = if let Some(addr) = rr.echo_addr {
        (addr, format!("echo server {addr} (no tunnel of ours)"))
    } else {
        let echo = match &a.target_ports {
            Some(p) => p[2],
            None => {
                let (ports, count): (TargetPorts, _) = targets_rt
                    .block_on(start_counted_targets(a.targets_netns.as_deref(), None))
                    .map_err(|e| format!("cannot start bench targets: {e}"))?;
                answered_bytes = Some(count);
                ports.echo
            }
        };
        // After the subcommand: the flags are global, but not before a subcommand.
        let common = |mut v: Vec<String>| {
            v.splice(1..1, ["--data-plane".to_string(), data_plane.to_string()]);
            v.push("--quiet".into());
            v
        };
        let (upstream, mode, server) = match (&a.runtime_endpoint, &a.url) {
            (Some(ep), _) => {
                let sb = a
                    .sandbox
                    .clone()
                    .ok_or("--runtime-endpoint needs a SANDBOX_ID")?;
                let server = rr
                    .server_pid
                    .map(|p| (p, process_name(p)))
                    .or_else(|| socket_owner(&listening_inodes(ep)));
                (
                    vec!["--runtime-endpoint".into(), ep.clone(), sb.clone()],
                    format!("CRI {ep} sandbox {sb}"),
                    server,
                )
            }
            (None, Some(url)) => {
                let server = rr
                    .server_pid
                    .map(|p| (p, process_name(p)))
                    .or_else(|| socket_owner(&listening_inodes(url)));
                (
                    vec!["--url".into(), url.clone()],
                    format!("stream server {}", redact_url(url)),
                    server,
                )
            }
            (None, None) => {
                let args = common(vec![
                    "serve".into(),
                    "--listen".into(),
                    format!("{}:0", Ipv4Addr::LOCALHOST),
                ]);
                let mut serve = ChildProc::spawn("ringfwd serve", exe, &args)?;
                let url = serve.wait_for(
                    |l| {
                        l.strip_prefix("Serving port-forward on ")
                            .map(|u| u.trim().to_string())
                    },
                    |_| {},
                )?;
                let pid = serve.pid();
                children.push(serve);
                (
                    vec!["--url".into(), url],
                    "embedded (ringfwd serve on loopback, a child process)".to_string(),
                    Some((pid, "ringfwd serve".to_string())),
                )
            }
        };
        let mut args = vec!["forward".to_string(), "--protocol".into(), protocol.clone()];
        args.extend(upstream);
        args.extend(["--address".into(), Ipv4Addr::LOCALHOST.to_string()]);
        if let Some(m) = metrics_addr {
            args.extend(["--metrics-addr".into(), m.to_string()]);
        }
        args.push(format!(":{echo}"));
        let mut fwd = ChildProc::spawn("ringfwd forward", exe, &common(args))?;
        let port = fwd.wait_for(
            |l| forwarding_port(l, echo),
            |l| {
                if l.starts_with("Metrics on ") {
                    println!("{l}");
                }
            },
        )?;
        cpu_of.push(("forwarder", "ringfwd forward".into(), fwd.pid()));
        children.push(fwd);
        match server {
            Some((pid, name)) => cpu_of.push(("server", name, pid)),
            None => eprintln!(
                "bench: no server process found listening on the upstream endpoint on this \
                 machine (give --server-pid): its CPU is not reported"
            ),
        }
        (
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            format!("{mode}, protocol {protocol}"),
        )
    };

    // Connect and warm up every connection before anything is timed.
    let done = Arc::new(AtomicU64::new(0));
    let mut conns: Vec<TcpStream> = load_rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for c in 0..connections {
            let done = done.clone();
            set.spawn(async move {
                let mut s = TcpStream::connect(entry)
                    .await
                    .map_err(|e| format!("connection {c}: connect to {entry}: {e}"))?;
                s.set_nodelay(true).ok();
                round_trips(&mut s, message, Until::Count(WARMUP), &done)
                    .await
                    .map_err(|e| format!("connection {c} (warm-up): {e}"))?;
                Ok::<_, String>(s)
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.map_err(|e| format!("load task: {e}"))??);
        }
        Ok::<_, String>(out)
    })?;
    done.store(0, Ordering::Relaxed);

    let cpu_now = |who: &[(&'static str, String, u32)]| -> Vec<f64> {
        who.iter()
            .map(|(_, _, pid)| process_cpu_seconds(*pid).unwrap_or(f64::NAN))
            .collect()
    };
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, done) = (sampling.clone(), done.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut series = vec![(0.0, 0)];
            while sampling.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                series.push((t0.elapsed().as_secs_f64(), done.load(Ordering::Relaxed)));
            }
            series
        })
    };
    let answered0 = answered_bytes.as_ref().map(|c| c.load(Ordering::SeqCst));
    let (p0, l0, t0c, m0) = (
        cpu_now(&cpu_of),
        thread_cpu_seconds("rf-load"),
        thread_cpu_seconds("rf-target"),
        machine_busy_seconds(),
    );
    let t0 = Instant::now();
    let deadline = t0 + rr.duration;
    let results = load_rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (c, mut s) in conns.drain(..).enumerate() {
            let done = done.clone();
            set.spawn(async move {
                let r = round_trips(&mut s, message, Until::Deadline(deadline), &done)
                    .await
                    .map_err(|e| format!("connection {c}: {e}"));
                (s, r)
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.map_err(|e| format!("load task: {e}"))?);
        }
        Ok::<_, String>(out)
    });
    let seconds = t0.elapsed().as_secs_f64();
    let (p1, l1, t1c, m1) = (
        cpu_now(&cpu_of),
        thread_cpu_seconds("rf-load"),
        thread_cpu_seconds("rf-target"),
        machine_busy_seconds(),
    );
    let answered1 = answered_bytes.as_ref().map(|c| c.load(Ordering::SeqCst));
    sampling.store(false, Ordering::Relaxed);
    let series = sampler.join().map_err(|_| "bench sampler panicked")?;
    let mut latencies_ns = Vec::new();
    for (_, r) in results? {
        latencies_ns.extend(r?);
    }
    latencies_ns.sort_unstable();
    let requests = latencies_ns.len() as u64;
    if requests == 0 {
        return Err("no request completed in the timed window".into());
    }
    let per = |s: f64| s / requests as f64 * 1e6;
    let mut cpu: Vec<CpuShare> = cpu_of
        .iter()
        .zip(p0.iter().zip(&p1))
        .map(|((role, name, pid), (a, b))| CpuShare {
            role,
            process: name.clone(),
            pid: Some(*pid),
            seconds: b - a,
            us_per_request: per(b - a),
        })
        .collect();
    cpu.push(CpuShare {
        role: "load generator",
        process: "rf-load threads of this process".into(),
        pid: None,
        seconds: l1 - l0,
        us_per_request: per(l1 - l0),
    });
    if answered_bytes.is_some() {
        cpu.push(CpuShare {
            role: "echo target",
            process: "rf-target threads of this process".into(),
            pid: None,
            seconds: t1c - t0c,
            us_per_request: per(t1c - t0c),
        });
    }
    let report = RrReport {
        mode,
        data_plane: data_plane.to_string(),
        connections,
        message: rr.message,
        seconds,
        requests,
        warmup_requests: u64::from(connections) * WARMUP as u64,
        answered: answered0.zip(answered1).map(|(a, b)| (b - a) / rr.message),
        requests_per_second: requests as f64 / seconds,
        latency_ms: Percentiles::of(&latencies_ns),
        cpu,
        machine_cpu_seconds: m1 - m0,
        machine_us_per_request: per(m1 - m0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        series,
        latencies_ns,
    };
    if let (Some(_), Some(linger)) = (metrics_addr, a.linger) {
        // The forward's endpoint keeps the final numbers for a scraper.
        std::thread::sleep(linger);
    }
    drop(children);
    load_rt.shutdown_background();
    targets_rt.shutdown_background();
    Ok(report)
}

/// `ringfwd bench --connections N`: measure, print (a table or `--json`), `--plot`.
pub fn run(a: &super::BenchArgs, metrics_addr: Option<SocketAddr>) -> Result<(), String> {
    let exe: PathBuf =
        std::env::current_exe().map_err(|e| format!("cannot find this binary to start: {e}"))?;
    let report = measure(a, &exe, metrics_addr)?;
    if a.rr.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!("{report}");
    }
    if let Some(path) = &a.plot {
        crate::plot::rr_svg(path, &report)?;
        if !a.rr.json {
            println!("Plot written to {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_lines_name_the_local_port_of_a_remote() {
        let l = "Forwarding from 127.0.0.1:40123 -> 5000";
        assert_eq!(forwarding_port(l, 5000), Some(40123));
        assert_eq!(forwarding_port(l, 5001), None);
        assert_eq!(
            forwarding_port("Forwarding from [::1]:40124 -> 5000", 5000),
            Some(40124)
        );
        assert_eq!(
            forwarding_port("Metrics on http://127.0.0.1:9/metrics", 5000),
            None
        );
    }

    #[test]
    fn percentiles_pick_nearest_ranks() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        let p = Percentiles::of(&ns);
        assert_eq!((p.p50, p.p99, p.max), (51.0, 99.0, 100.0));
        assert!(Percentiles::of(&[]).p50.is_nan());
    }

    #[test]
    fn own_process_cpu_is_read_from_proc() {
        let pid = std::process::id();
        let before = process_cpu_seconds(pid).expect("own /proc/PID/stat");
        let mut x = 0u64;
        // Spin until the kernel has charged a tick to us: it must show in our stat.
        while process_cpu_seconds(pid).unwrap() <= before {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        assert!(machine_busy_seconds() > 0.0);
    }

    #[test]
    fn the_owner_of_a_loopback_listener_is_found() {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let url = format!("http://{}/portforward", l.local_addr().unwrap());
        let (pid, _) = socket_owner(&listening_inodes(&url)).expect("our own listener");
        assert_eq!(pid, std::process::id());
        // Not loopback: never guessed from a local port.
        let far = format!("http://192.0.2.1:{}/", l.local_addr().unwrap().port());
        assert!(listening_inodes(&far).is_empty());
    }

    #[test]
    fn the_owner_of_a_unix_listener_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cri.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let ep = format!("unix://{}", path.display());
        let (pid, _) = socket_owner(&listening_inodes(&ep)).expect("our own listener");
        assert_eq!(pid, std::process::id());
    }
}
