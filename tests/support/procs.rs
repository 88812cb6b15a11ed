//! Running port-forward clients (kubectl or ringfwd) and other processes, echo targets, and
//! the small pieces every test file needs (payload bytes, a reset check, an HTTP GET).
//!
//! A [`PortForward`] is a spawned `... port-forward`-style command, started once it printed
//! kubectl's `Forwarding from 127.0.0.1:L -> R` line, killed on drop. A [`Proc`] is any process
//! whose output lines a test waits for ([`lines`] and [`wait_line`] underneath). Plus a
//! threaded TCP echo server and a byte-exact echo round trip through a forward.
//!
//! Test files include this file directly (`#[path = "support/procs.rs"]`) or through
//! `support`: it uses nothing else of `support`.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for kubectl to print its `Forwarding from` line (or exit).
pub const KUBECTL_READY: Duration = Duration::from_secs(60);
/// Longest wait for bytes to come back through a forward.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a process's output line or exit: a safety net against a hang, far above
/// what any of them takes.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The ringfwd binary under test.
pub const RINGFWD: &str = env!("CARGO_BIN_EXE_ringfwd");

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A TCP echo server on `listener` (threads, one per connection); returns its port.
pub fn echo_on(listener: TcpListener) -> u16 {
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut rd = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut rd, &mut conn);
            });
        }
    });
    port
}

/// A `ringfwd serve` on loopback, in this process, for as long as the returned runtime lives;
/// its URL.
pub fn serve_in_process() -> (tokio::runtime::Runtime, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(async {
        let (l, url) = ringfwd::serve::bind((Ipv4Addr::LOCALHOST, 0).into())
            .await
            .unwrap();
        tokio::spawn(ringfwd::serve::serve(
            l,
            ringfwd::serve::Dialer::Local,
            ringfwd::relay::SessionOptions::default(),
        ));
        url
    });
    (rt, url)
}

pub fn echo_server() -> u16 {
    echo_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind echo"))
}

/// Deterministic pseudo-random bytes, 8 per xorshift64 step: a transfer that drops, repeats or
/// reorders anything changes them, and both ends of a transfer can make them from the seed.
pub struct PayloadStream(pub u64);

impl PayloadStream {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// `len` bytes of [`PayloadStream`] from `seed`.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    PayloadStream(seed | 1).fill(&mut out);
    out
}

/// Bytes per direction for a bulk transfer: the environment's `var`, or `default`.
pub fn bulk_bytes(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    l.local_addr().unwrap().port()
}

/// One read of a connection that must end in a reset (a broken transfer must never look like a
/// clean end): `Ok(true)` once the reset came, `Ok(false)` after data (read on), `Err` for an end
/// of file or any other error.
pub fn reset_after(read: std::io::Result<usize>) -> Result<bool, String> {
    match read {
        Ok(0) => Err("the connection ended with a clean end of file, want a reset".into()),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(format!("the connection failed with {e}, want a reset")),
    }
}

/// Reads `s` until it is reset; see [`reset_after`].
pub fn expect_reset(s: &mut impl Read) -> Result<(), String> {
    let mut buf = vec![0u8; 64 * 1024];
    while !reset_after(s.read(&mut buf))? {}
    Ok(())
}

/// A minimal HTTP/1.0 GET (no chunking to undo): `(status, body)`.
pub fn http_get(addr: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Sends `len` bytes to 127.0.0.1:`port` (from another thread) and checks the same bytes come
/// back.
pub fn echo_roundtrip(port: u16, len: usize) -> Result<(), String> {
    let data = payload(len, u64::from(port) * 7919);
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| format!("connect to forward: {e}"))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut wr = conn.try_clone().unwrap();
    let out = data.clone();
    let writer = std::thread::spawn(move || wr.write_all(&out));
    let mut back = vec![0u8; len];
    let read = conn.read_exact(&mut back);
    let written = writer.join().unwrap();
    read.map_err(|e| format!("reading the echo of {len} bytes: {e}"))?;
    written.map_err(|e| format!("writing {len} bytes: {e}"))?;
    if back != data {
        return Err(format!(
            "{len} bytes changed on the way through the forward"
        ));
    }
    Ok(())
}

/// A running port-forward client (`kubectl port-forward ...` or `ringfwd ...`), killed on drop.
pub struct PortForward {
    pub child: Child,
    /// Local port of the first `Forwarding from` line.
    pub local: u16,
    /// Remote port it forwards to.
    pub remote: u16,
    /// Every `(local, remote)` printed before `start` returned.
    forwarded: Vec<(u16, u16)>,
    stdout: Arc<Mutex<String>>,
    /// Closed when the client's stdout closes (it exited).
    stdout_open: mpsc::Receiver<String>,
    stderr: Arc<(Mutex<String>, Condvar)>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl PortForward {
    /// Spawns `cmd` and waits for its `Forwarding from 127.0.0.1:L -> R` line. `Err` carries
    /// the client's stderr when it exited instead.
    pub fn start(cmd: Command) -> Result<PortForward, String> {
        PortForward::start_ports(cmd, 1)
    }

    /// Like [`start`](Self::start), waiting for `ports` Forwarding lines.
    pub fn start_ports(mut cmd: Command, ports: usize) -> Result<PortForward, String> {
        cmd.arg("--address").arg("127.0.0.1");
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let tool = std::path::Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = cmd.spawn().expect("spawn port-forward");
        let stderr = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let err_sink = stderr.clone();
        let err_pipe = BufReader::new(child.stderr.take().unwrap());
        let err_reader = std::thread::spawn(move || {
            for line in err_pipe.lines() {
                let Ok(line) = line else { break };
                let mut sink = err_sink.0.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
                err_sink.1.notify_all();
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out_sink = stdout.clone();
        let out = BufReader::new(child.stdout.take().unwrap());
        let name = tool.clone();
        std::thread::spawn(move || {
            // Keep draining after the Forwarding line: kubectl dies of SIGPIPE if its stdout
            // closes ("Handling connection for ..." per connection).
            for line in out.lines() {
                let Ok(line) = line else { break };
                eprintln!("{name}: {line}");
                {
                    let mut sink = out_sink.lock().unwrap();
                    sink.push_str(&line);
                    sink.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        let mut forwarded = Vec::new();
        loop {
            match rx.recv_timeout(KUBECTL_READY) {
                Ok(line) => {
                    if let Some(pair) = parse_forwarding(&line) {
                        forwarded.push(pair);
                        if forwarded.len() == ports {
                            return Ok(PortForward {
                                child,
                                local: forwarded[0].0,
                                remote: forwarded[0].1,
                                forwarded,
                                stdout,
                                stdout_open: rx,
                                stderr,
                                stderr_reader: Some(err_reader),
                            });
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    let _ = err_reader.join();
                    let text = stderr.0.lock().unwrap().clone();
                    return Err(text);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{tool} printed no Forwarding line in time");
                }
            }
        }
    }

    /// Every `(local, remote)` pair printed at start.
    pub fn forwarded(&self) -> Vec<(u16, u16)> {
        self.forwarded.clone()
    }

    /// Everything the client printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// `host:port` of the `--metrics-addr` endpoint ringfwd printed before its Forwarding line.
    pub fn metrics_addr(&self) -> Option<String> {
        self.stdout()
            .lines()
            .find_map(|l| l.strip_prefix("Metrics on http://"))
            .and_then(|l| l.strip_suffix("/metrics"))
            .map(str::to_string)
    }

    /// Waits up to `timeout` for the client to exit on its own (its stdout closes); returns its
    /// status, or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stdout_open.recv_timeout(left) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = self.child.wait().ok();
        if let Some(r) = self.stderr_reader.take() {
            let _ = r.join();
        }
        status
    }

    pub fn stderr(&self) -> String {
        self.stderr.0.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for `needle` on the client's stderr; whether it came.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let (text, changed) = &*self.stderr;
        let text = text.lock().unwrap();
        let (text, _) = changed
            .wait_timeout_while(text, timeout, |t| !t.contains(needle))
            .unwrap();
        text.contains(needle)
    }

    /// Asserts `len` bytes come back byte-exact through the forward (to an echo target).
    pub fn assert_echo(&mut self, len: usize) {
        if let Err(e) = echo_roundtrip(self.local, len) {
            let status = self.child.try_wait();
            self.stop();
            panic!("{e}; client ({status:?}) stderr:\n{}", self.stderr());
        }
    }

    /// Kills kubectl and collects the rest of its stderr.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.stderr_reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and their output lines
// ---------------------------------------------------------------------------------------------

/// Each line of `pipe` on the returned channel as it comes (closed at end of file), and on
/// our stderr after `label` (libtest shows it for a failed test). The pipe is read to its end
/// even when nobody listens any more, so that the process never blocks writing to it.
pub fn lines(pipe: impl Read + Send + 'static, label: &str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let label = label.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("{label}: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// The first line from `rx` that `want` accepts, within `timeout`; otherwise why not (the
/// sender closed, or the time ran out) and every line seen meanwhile.
pub fn next_line<T>(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    mut want: impl FnMut(&str) -> Option<T>,
) -> Result<T, (mpsc::RecvTimeoutError, Vec<String>)> {
    let end = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => match want(&line) {
                Some(v) => return Ok(v),
                None => seen.push(line),
            },
            Err(e) => return Err((e, seen)),
        }
    }
}

/// [`next_line`] within [`LINE_TIMEOUT`], or a panic naming `what` and what came instead.
pub fn wait_line<T>(
    rx: &mpsc::Receiver<String>,
    what: &str,
    want: impl FnMut(&str) -> Option<T>,
) -> T {
    next_line(rx, LINE_TIMEOUT, want)
        .unwrap_or_else(|(e, seen)| panic!("no {what} ({e:?}); saw {seen:#?}"))
}

/// A process with its output as line channels; killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
    /// Every stderr line seen so far by [`Proc::wait_stderr`] and [`Proc::wait_exit`].
    stderr_seen: Vec<String>,
}

impl Proc {
    /// Spawns `cmd` with its stdout and stderr piped to line channels.
    pub fn spawn(mut cmd: Command) -> Proc {
        let name = std::path::Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            stdout: lines(child.stdout.take().unwrap(), &name),
            stderr: lines(child.stderr.take().unwrap(), &name),
            child,
            stderr_seen: Vec::new(),
        }
    }

    /// `ringfwd ARGS` at `RUST_LOG=ringfwd=info`.
    pub fn ringfwd(args: &[&str]) -> Proc {
        let mut cmd = Command::new(RINGFWD);
        cmd.args(args).env("RUST_LOG", "ringfwd=info");
        Proc::spawn(cmd)
    }

    /// The rest of the first stdout line starting with `prefix`.
    pub fn wait_stdout(&mut self, prefix: &str) -> String {
        match next_line(&self.stdout, LINE_TIMEOUT, |l| {
            l.strip_prefix(prefix).map(str::to_string)
        }) {
            Ok(rest) => rest,
            Err((e, _)) => panic!(
                "no stdout line {prefix:?} ({e:?}); stderr {:?}",
                self.drain_err()
            ),
        }
    }

    /// Waits for a stderr line containing `text`.
    pub fn wait_stderr(&mut self, text: &str) -> String {
        let seen = &mut self.stderr_seen;
        let found = next_line(&self.stderr, LINE_TIMEOUT, |l| {
            seen.push(l.to_string());
            l.contains(text).then(|| l.to_string())
        });
        found.unwrap_or_else(|(e, _)| panic!("no stderr line with {text:?} ({e:?}): {seen:?}"))
    }

    fn drain_err(&mut self) -> Vec<String> {
        self.stderr_seen.extend(self.stderr.try_iter());
        self.stderr_seen.clone()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // Safety: kill(2) on our own child's pid, which it stays until we reap it.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit (its stderr closes first), with everything it wrote to stderr.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        loop {
            match self.stderr.recv_timeout(LINE_TIMEOUT) {
                Ok(line) => self.stderr_seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the process did not exit: {:?}", self.stderr_seen)
                }
            }
        }
        let status = self.child.wait().expect("wait for the process");
        (status, self.stderr_seen.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringfwd serve --listen 127.0.0.1:0` at `rust_log`, and the URL it serves on.
pub fn serve_process(rust_log: &str) -> (Proc, String) {
    let mut cmd = Command::new(RINGFWD);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", rust_log);
    let mut serve = Proc::spawn(cmd);
    let url = serve.wait_stdout("Serving port-forward on ");
    (serve, url)
}

/// Kills (and reaps) a child process when dropped, so no kubectl outlives its test.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Forwarding from 127.0.0.1:LOCAL -> REMOTE`.
pub fn parse_forwarding(line: &str) -> Option<(u16, u16)> {
    let rest = line.strip_prefix("Forwarding from 127.0.0.1:")?;
    let (local, remote) = rest.split_once(" -> ")?;
    Some((local.trim().parse().ok()?, remote.trim().parse().ok()?))
}

/// Runs a command to completion: (success, stdout, stderr).
pub fn run(mut cmd: Command) -> (bool, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
