//! Running port-forward clients (kubectl or ringfwd) as processes, and echo targets.
//!
//! A [`PortForward`] is a spawned `... port-forward`-style command, started once it printed
//! kubectl's `Forwarding from 127.0.0.1:L -> R` line, killed on drop. Plus a threaded TCP echo
//! server and a byte-exact echo round trip through a forward.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Longest wait for kubectl to print its `Forwarding from` line (or exit).
pub const KUBECTL_READY: Duration = Duration::from_secs(60);
/// Longest wait for bytes to come back through a forward.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Deterministic pseudo-random bytes.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
