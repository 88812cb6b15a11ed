//! How a forward ends and where it stops taking connections: graceful shutdown on
//! SIGINT/SIGTERM (`--grace`), and `--max-connections`. Real processes (`ringfwd serve` and
//! `ringfwd forward --url`), real sockets on port 0; every wait is for a line, a byte, an end
//! of file or an exit, never a sleep.

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;

use procs::{IO_TIMEOUT, Proc, echo_server, payload, serve_process};
use sha2::{Digest, Sha256};

/// `ringfwd serve` and a `ringfwd forward --url` through it to `target`, with `args`; the
/// forward's local port.
fn forward_to(target: u16, args: &[&str]) -> (Proc, Proc, u16) {
    let (serve, url) = serve_process("ringfwd=info");
    let spec = format!(":{target}");
    let mut all = vec!["forward", "--address", "127.0.0.1", "--url", &url];
    all.extend_from_slice(args);
    all.push(&spec);
    let mut fwd = Proc::ringfwd(&all);
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
    let (mut serve, url) = serve_process("ringfwd=info");
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
