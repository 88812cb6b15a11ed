//! How a forward ends and where it stops taking connections: graceful shutdown on
//! SIGINT/SIGTERM (`--grace`), and `--max-connections`. Real processes (`ringfwd serve` and
//! `ringfwd forward --url`), real sockets on port 0; every wait is for a line, a byte, an end
//! of file or an exit, never a sleep.

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use procs::{IO_TIMEOUT, KUBECTL_READY, echo_server, payload};
use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");

/// Longest wait for a process to exit after it was told to: a safety net against a hang, far
/// above what any of these exits takes.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A `ringfwd` process with its output as line channels; killed on drop.
struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every stderr line seen so far by [`Proc::wait_stderr`] and [`Proc::wait_exit`].
    stderr_seen: Vec<String>,
}

/// Send each line of `pipe` to the returned channel (closed at end of file).
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            eprintln!("ringfwd: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "ringfwd=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringfwd");
        Proc {
            stdout: lines(child.stdout.take().unwrap()),
            stderr: lines(child.stderr.take().unwrap()),
            child,
            stderr_seen: Vec::new(),
        }
    }

    /// The rest of the first stdout line starting with `prefix`.
    fn wait_stdout(&mut self, prefix: &str) -> String {
        loop {
            match self.stdout.recv_timeout(KUBECTL_READY) {
                Ok(line) if line.starts_with(prefix) => return line[prefix.len()..].to_string(),
                Ok(_) => {}
                Err(e) => panic!(
                    "no stdout line {prefix:?} ({e}); stderr {:?}",
                    self.drain_err()
                ),
            }
        }
    }

    /// Waits for a stderr line containing `text`.
    fn wait_stderr(&mut self, text: &str) -> String {
        loop {
            match self.stderr.recv_timeout(EXIT_TIMEOUT) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(e) => panic!("no stderr line with {text:?} ({e}): {:?}", self.stderr_seen),
            }
        }
    }

    fn drain_err(&mut self) -> Vec<String> {
        self.stderr_seen.extend(self.stderr.try_iter());
        self.stderr_seen.clone()
    }

    fn signal(&self, sig: libc::c_int) {
        // Safety: kill(2) on our own child's pid, which it stays until we reap it.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit (its stderr closes first), with everything it wrote to stderr.
    fn wait_exit(&mut self) -> (ExitStatus, String) {
        loop {
            match self.stderr.recv_timeout(EXIT_TIMEOUT) {
                Ok(line) => self.stderr_seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("ringfwd did not exit: {:?}", self.stderr_seen)
                }
            }
        }
        let status = self.child.wait().expect("wait for ringfwd");
        (status, self.stderr_seen.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ringfwd serve` and a `ringfwd forward --url` through it to `target`, with `args`; the
/// forward's local port.
fn forward_to(target: u16, args: &[&str]) -> (Proc, Proc, u16) {
    let mut serve = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let url = serve.wait_stdout("Serving port-forward on ");
    let spec = format!(":{target}");
    let mut all = vec!["forward", "--address", "127.0.0.1", "--url", &url];
    all.extend_from_slice(args);
    all.push(&spec);
    let mut fwd = Proc::spawn(&all);
    let line = fwd.wait_stdout("Forwarding from 127.0.0.1:");
    let port = line.split(" -> ").next().unwrap().parse().unwrap();
    (serve, fwd, port)
}

/// A target that sends `first`, waits for the gate, then sends `rest`, ends its direction and
/// reads until the client's end of file. A closed gate (sender dropped) keeps it from sending
/// more; it holds the connection until then.
fn gated_target(first: Vec<u8>, rest: Vec<u8>) -> (u16, mpsc::Sender<()>) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let (gate, opened) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&first).unwrap();
        if opened.recv().is_err() {
            return;
        }
        s.write_all(&rest).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    });
    (port, gate)
}

/// Connects to the forward, half-closes, and reads `n` bytes.
fn connect_and_read(port: u16, n: usize) -> (TcpStream, Vec<u8>) {
    let mut c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = vec![0u8; n];
    c.read_exact(&mut got).unwrap();
    (c, got)
}

fn refused(port: u16) -> bool {
    matches!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

const PART: usize = 1 << 20;

#[test]
fn sigterm_with_nothing_open_exits_0_and_closes_the_port() {
    let (_serve, mut fwd, port) = forward_to(echo_server(), &[]);
    fwd.signal(libc::SIGTERM);
    let (status, err) = fwd.wait_exit();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("shutting down: 0 connections open"), "{err}");
    assert!(refused(port), "port {port} still open after the exit");
}

#[test]
fn serve_exits_0_on_sigterm() {
    let mut serve = Proc::spawn(&["serve", "--listen", "127.0.0.1:0"]);
    let url = serve.wait_stdout("Serving port-forward on ");
    let port: u16 = url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    serve.signal(libc::SIGTERM);
    let (status, err) = serve.wait_exit();
    assert!(status.success(), "{status}: {err}");
    assert!(refused(port));
}

#[test]
fn a_transfer_that_ends_within_the_grace_arrives_whole() {
    let (first, rest) = (payload(PART, 1), payload(PART, 2));
    let want = Sha256::new()
        .chain_update(&first)
        .chain_update(&rest)
        .finalize();
    let (target, gate) = gated_target(first.clone(), rest);
    let (_serve, mut fwd, port) = forward_to(target, &["--grace", "1m"]);
    let (mut c, got) = connect_and_read(port, PART);
    assert_eq!(got, first);

    fwd.signal(libc::SIGTERM);
    let line = fwd.wait_stderr("shutting down");
    assert!(
        line.contains("1 connection open, waiting up to 60s; press Ctrl-C again to stop now"),
        "{line}"
    );
    // The listener closed before that line was written.
    assert!(
        refused(port),
        "a new connection was accepted while shutting down"
    );

    gate.send(()).unwrap();
    let mut tail = Vec::new();
    c.read_to_end(&mut tail)
        .expect("the end of the transfer, then a clean end of file");
    let have = Sha256::new()
        .chain_update(&got)
        .chain_update(&tail)
        .finalize();
    assert_eq!(have, want, "{} bytes arrived", got.len() + tail.len());

    let (status, err) = fwd.wait_exit();
    assert!(status.success(), "{status}: {err}");
}

#[test]
fn a_transfer_still_open_after_the_grace_is_reset_and_the_exit_says_so() {
    let first = payload(PART, 3);
    let (target, _gate) = gated_target(first.clone(), Vec::new());
    let (_serve, mut fwd, port) = forward_to(target, &["--grace", "1s"]);
    let (mut c, got) = connect_and_read(port, PART);
    assert_eq!(got, first);

    fwd.signal(libc::SIGTERM);
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "want a reset, got {other:?} after {} more bytes",
            rest.len()
        ),
    }
    let (status, err) = fwd.wait_exit();
    assert!(
        !status.success(),
        "exit 0 although a connection was cut: {err}"
    );
    assert!(
        err.contains("1 connection still open after the 1s grace period, reset"),
        "{err}"
    );
}

#[test]
fn a_second_sigint_stops_at_once() {
    let first = payload(PART, 4);
    let (target, _gate) = gated_target(first, Vec::new());
    let (_serve, mut fwd, port) = forward_to(target, &["--grace", "1h"]);
    let (mut c, _) = connect_and_read(port, PART);

    fwd.signal(libc::SIGINT);
    fwd.wait_stderr("press Ctrl-C again to stop now");
    fwd.signal(libc::SIGINT);
    // Well within the hour of grace.
    let (status, err) = fwd.wait_exit();
    assert!(!status.success(), "{err}");
    assert!(err.contains("interrupted again"), "{err}");
    let mut rest = Vec::new();
    let r = c.read_to_end(&mut rest);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "want a reset, got {r:?}"
    );
}

/// Sends `msg` on `c` and reads it back.
fn echo(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn past_max_connections_a_connection_is_reset_and_the_others_keep_working() {
    let (_serve, mut fwd, port) = forward_to(echo_server(), &["--max-connections", "2"]);
    let open = || {
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        c
    };
    let (mut a, mut b) = (open(), open());
    // Both are relayed (so both hold their place) before the third arrives.
    echo(&mut a, b"first");
    echo(&mut b, b"second");

    let mut third = open();
    let mut buf = [0u8; 16];
    let r = third.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "want a reset, got {r:?}"
    );
    let line = fwd.wait_stderr("--max-connections 2");
    assert!(line.contains("reset: 2 connections open"), "{line}");

    echo(&mut a, &payload(64 * 1024, 5));
    echo(&mut b, &payload(64 * 1024, 6));
}
