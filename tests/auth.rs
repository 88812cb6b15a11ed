//! `ringfwd serve` with a token and `ringfwd forward` presenting it: who gets in, what a
//! refused client sees, the refusal to listen off loopback without a token, the wildcard
//! warning, and that no token (ours, or a CRI runtime's single-use URL) reaches any output,
//! even at `RUST_LOG=trace`. Real processes, real sockets on port 0.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;

use ringfwd::secret::Secret;
use support::procs::{IO_TIMEOUT, KUBECTL_READY, PortForward, echo_roundtrip, echo_server};

const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");

/// A `ringfwd` process that has printed its ready line, killed on drop; all its output kept.
struct Proc {
    child: Child,
    /// The ready line.
    line: String,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

impl Proc {
    /// Spawns `cmd` and waits for a stdout line starting with `ready`. `Err` holds its stderr
    /// when it exited first.
    fn start(mut cmd: Command, ready: &str) -> Result<Proc, String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringfwd");
        let mut err_pipe = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err_pipe.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        let out_pipe = BufReader::new(child.stdout.take().unwrap());
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in out_pipe.lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        let mut proc = Proc {
            child,
            line: String::new(),
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        loop {
            match rx.recv_timeout(KUBECTL_READY) {
                Ok(line) if line.starts_with(ready) => {
                    proc.line = line;
                    return Ok(proc);
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(proc.finish().1),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let (out, err) = proc.finish();
                    panic!("no {ready:?} line in time; stdout {out:?} stderr {err:?}");
                }
            }
        }
    }

    /// Kills the process; everything it wrote to stdout and stderr.
    fn finish(&mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let join = |h: Option<JoinHandle<String>>| h.map(|h| h.join().unwrap()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `ringfwd serve` on loopback with `args`; its URL is in `line` after the prefix.
fn serve(args: &[&str], rust_log: &str) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", rust_log);
    Proc::start(cmd, "Serving port-forward on ").unwrap_or_else(|e| panic!("serve: {e}"))
}

fn url(serve: &Proc) -> String {
    serve.line["Serving port-forward on ".len()..].to_string()
}

/// A token in a file under `dir`.
fn token_file(dir: &Path, name: &str) -> (Secret, PathBuf) {
    let token = Secret::generate();
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", token.expose())).unwrap();
    (token, path)
}

/// `ringfwd forward --url URL ARGS... :PORT`, started (or its stderr if it exited).
fn forward(url: &str, args: &[&str], port: u16, rust_log: &str) -> Result<PortForward, String> {
    let mut cmd = Command::new(BIN);
    cmd.args(["forward", "--url", url])
        .args(args)
        .arg(format!(":{port}"))
        .env("RUST_LOG", rust_log);
    PortForward::start(cmd)
}

/// A SPDY upgrade request for `path` to the server at `url`, by hand: status line and body
/// (none for a `101`: what follows it is the upgraded protocol).
fn ask(url: &str, path: &str, authorization: Option<&str>) -> (String, String) {
    let hostport = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap();
    let mut conn = TcpStream::connect(hostport).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
         Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n"
    );
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        resp.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&resp[..head_end]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.starts_with("HTTP/1.1 101") {
        return (status, String::new());
    }
    // `Connection: close`: the body runs to the end of the stream.
    conn.read_to_end(&mut resp).unwrap();
    let body = String::from_utf8_lossy(&resp[head_end + 4..]).into_owned();
    (status, body)
}

#[test]
fn requests_without_the_right_token_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let (token, file) = token_file(dir.path(), "token");
    let mut s = serve(&["--token-file", file.to_str().unwrap()], "ringfwd=debug");
    let base = url(&s);
    let tok = token.expose();
    for (path, auth, want) in [
        ("/portforward", None, "authentication required"),
        (
            "/portforward",
            Some("Bearer wrong-token-0123456789"),
            "wrong token",
        ),
        ("/portforward/wrong-token-0123456789", None, "wrong token"),
        (
            "/portforward",
            Some(&format!("Basic {tok}") as &str),
            "authentication required",
        ),
    ] {
        let (status, body) = ask(&base, path, auth);
        assert!(
            status.starts_with("HTTP/1.1 401"),
            "{path} {auth:?}: {status}"
        );
        assert_eq!(body.trim().lines().count(), 1, "{body:?}");
        assert!(body.contains(want), "{path} {auth:?}: {body:?}");
        assert!(!body.contains(tok), "{body:?}");
    }
    // The right token, in either place, gets past authentication to the upgrade.
    let (status, _) = ask(&base, "/portforward", Some(&format!("Bearer {tok}")));
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let (status, _) = ask(&base, &format!("/portforward/{tok}"), None);
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");

    let (_, err) = s.finish();
    assert!(
        err.contains("refused POST"),
        "refusals are logged at debug: {err}"
    );
    assert!(!err.contains(tok), "{err}");
}

#[test]
fn right_token_in_header_or_path_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let (token, file) = token_file(dir.path(), "token");
    let file = file.to_str().unwrap();
    let s = serve(&["--token-file", file], "off");
    let echo = echo_server();
    let base = url(&s);
    for protocol in ["spdy", "websocket"] {
        let mut by_header = forward(
            &base,
            &["--token-file", file, "--protocol", protocol],
            echo,
            "off",
        )
        .unwrap_or_else(|e| panic!("{protocol} with --token-file: {e}"));
        by_header.assert_echo(64 << 10);
        let in_path = format!("{base}/{}", token.expose());
        let mut by_path = forward(&in_path, &["--protocol", protocol], echo, "off")
            .unwrap_or_else(|e| panic!("{protocol} with the token in the URL: {e}"));
        by_path.assert_echo(64 << 10);
    }
}

#[test]
fn forward_without_or_with_a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_token, file) = token_file(dir.path(), "token");
    let (_other, wrong) = token_file(dir.path(), "wrong");
    let s = serve(&["--token-file", file.to_str().unwrap()], "off");
    let echo = echo_server();
    let base = url(&s);
    // SPDY sets a session up before listening: the forward fails at start, with one line.
    for (args, want) in [
        (vec![], "authentication required"),
        (vec!["--token-file", wrong.to_str().unwrap()], "wrong token"),
    ] {
        let err = match forward(&base, &args, echo, "off") {
            Ok(_) => panic!("forward {args:?} started against a server wanting a token"),
            Err(e) => e,
        };
        let lines: Vec<&str> = err.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{err:?}");
        for w in [
            "error: ",
            "refused authentication",
            "HTTP 401",
            want,
            "--token-file",
        ] {
            assert!(lines[0].contains(w), "{err:?} lacks {w:?}");
        }
    }
}

/// WebSocket v4 sets a session up per connection: the forward starts, and a connection that
/// cannot authenticate is reset (a TCP RST, not a clean end of file) with a log line saying so.
#[test]
fn websocket_connection_without_token_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (_token, file) = token_file(dir.path(), "token");
    let s = serve(&["--token-file", file.to_str().unwrap()], "off");
    let echo = echo_server();
    let mut f = forward(&url(&s), &["--protocol", "websocket"], echo, "ringfwd=info").unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", f.local)).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    match conn.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("want a reset, got {other:?}"),
    }
    f.stop();
    let err = f.stderr();
    assert!(
        err.contains("refused authentication") && err.contains("HTTP 401"),
        "{err}"
    );
}

#[test]
fn non_loopback_listen_without_token_is_refused() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", addr])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "serve --listen {addr} started: {err}"
        );
        let lines: Vec<&str> = err.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{err:?}");
        for w in [
            "error: refusing to listen on",
            addr,
            "--token-file",
            "--generate-token",
        ] {
            assert!(lines[0].contains(w), "{err:?} lacks {w:?}");
        }
    }
}

/// A runtime's stream URLs carry their own token: `--token-file` goes with `--url` only.
#[test]
fn token_file_is_for_url_forwards() {
    let out = Command::new(BIN)
        .args([
            "forward",
            "--runtime-endpoint",
            "unix:///nowhere.sock",
            "--token-file",
        ])
        .args(["/nowhere", "sandbox", ":80"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--token-file") && err.contains("cannot be used with"),
        "{err}"
    );
}

#[test]
fn wildcard_listeners_warn() {
    const WARNING: &str = "a wildcard address";
    let dir = tempfile::tempdir().unwrap();
    let (token, file) = token_file(dir.path(), "token");
    let file = file.to_str().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "0.0.0.0:0", "--token-file", file])
        .env_remove("RUST_LOG");
    let mut s = Proc::start(cmd, "Serving port-forward on ").unwrap();
    let port = url(&s)
        .trim_start_matches("http://0.0.0.0:")
        .trim_end_matches("/portforward")
        .to_string();
    let base = format!("http://127.0.0.1:{port}/portforward");

    let echo = echo_server();
    let mut cmd = Command::new(BIN);
    cmd.args(["forward", "--url", &base, "--token-file", file])
        .args(["--address", "0.0.0.0", &format!(":{echo}")])
        .args(["--metrics-addr", "0.0.0.0:0"])
        .env_remove("RUST_LOG");
    let mut f = Proc::start(cmd, "Forwarding from 0.0.0.0:").unwrap();
    let local: u16 = f
        .line
        .rsplit_once(':')
        .unwrap()
        .1
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    echo_roundtrip(local, 1000).unwrap();

    for (what, p) in [("serve", &mut s), ("forward", &mut f)] {
        let (_, err) = p.finish();
        let warnings: Vec<&str> = err.lines().filter(|l| l.contains(WARNING)).collect();
        let listeners: Vec<&&str> = warnings
            .iter()
            .filter(|l| l.contains("reachable from other machines"))
            .collect();
        assert_eq!(listeners.len(), 1, "{what}: {err}");
        // The forward's metrics listen on a wildcard too: one more line, naming them.
        let metrics: Vec<&&str> = warnings.iter().filter(|l| l.contains("/metrics")).collect();
        assert_eq!(
            metrics.len(),
            usize::from(what == "forward"),
            "{what}: {err}"
        );
        assert_eq!(
            warnings.len(),
            listeners.len() + metrics.len(),
            "{what}: {err}"
        );
        assert!(warnings.iter().all(|w| w.contains("WARN")), "{what}: {err}");
        assert!(!err.contains(token.expose()), "{what}: {err}");
    }

    // Loopback (the default) does not warn.
    let mut l = serve(&["--token-file", file], "ringfwd=info");
    assert!(!l.finish().1.contains(WARNING));
}

#[test]
fn generated_token_is_printed_in_the_url_and_required() {
    let s = serve(&["--generate-token"], "off");
    let with_token = url(&s);
    let token = with_token.rsplit_once('/').unwrap().1.to_string();
    assert_eq!(token.len(), 64, "{with_token}");
    let base = with_token.trim_end_matches(&token).trim_end_matches('/');
    assert!(
        ask(base, "/portforward", None)
            .0
            .starts_with("HTTP/1.1 401")
    );
    let mut f = forward(&with_token, &[], echo_server(), "off").unwrap();
    f.assert_echo(1000);
}

/// At `RUST_LOG=trace` (every crate, every level), neither process prints the token: not the
/// serve holding it, not a forward with it in the URL, not one sending it as a header.
#[test]
fn tokens_stay_out_of_trace_logs() {
    let dir = tempfile::tempdir().unwrap();
    let (token, file) = token_file(dir.path(), "token");
    let file = file.to_str().unwrap();
    let tok = token.expose();
    let mut s = serve(&["--token-file", file], "trace");
    let base = url(&s);
    let echo = echo_server();
    let mut in_path = forward(&format!("{base}/{tok}"), &[], echo, "trace").unwrap();
    in_path.assert_echo(10_000);
    let mut header = forward(
        &base,
        &["--token-file", file, "--protocol", "websocket"],
        echo,
        "trace",
    )
    .unwrap();
    header.assert_echo(10_000);
    in_path.stop();
    header.stop();
    let (out, err) = s.finish();
    for (what, text) in [
        ("serve stdout", out),
        ("serve stderr", err.clone()),
        ("forward (URL) stdout", in_path.stdout()),
        ("forward (URL) stderr", in_path.stderr()),
        ("forward (header) stdout", header.stdout()),
        ("forward (header) stderr", header.stderr()),
    ] {
        assert!(!text.contains(tok), "{what} shows the token:\n{text}");
    }
    // The logs were on: the check above could have failed.
    for (what, text) in [
        ("serve", err),
        ("forward", in_path.stderr()),
        ("forward", header.stderr()),
    ] {
        assert!(
            text.contains("DEBUG"),
            "{what} logged nothing at debug:\n{text}"
        );
    }
}

/// The same for a CRI runtime's single-use stream URL (`/portforward/TOKEN`), through a real
/// containerd: every `/portforward/` in the output is followed by `[redacted]`.
#[test]
fn cri_stream_url_stays_out_of_trace_logs() {
    let Some(c) = support::containerd_or_skip("cri_stream_url_stays_out_of_trace_logs") else {
        return;
    };
    let sb = c.run_sandbox("auth-logs");
    let port = support::procs::echo_on(support::listen_in_netns(&sb.netns));
    let mut cmd = Command::new(BIN);
    cmd.args(["forward", "--runtime-endpoint", &c.endpoint(), &sb.id])
        .arg(format!(":{port}"))
        .env("RUST_LOG", "trace");
    let mut f = PortForward::start(cmd).unwrap_or_else(|e| panic!("forward: {e}"));
    f.assert_echo(10_000);
    f.stop();
    let (out, err) = (f.stdout(), f.stderr());
    assert!(err.contains("DEBUG"), "nothing logged at debug:\n{err}");
    for text in [out, err] {
        for (at, _) in text.match_indices("/portforward/") {
            let next = &text[at + "/portforward/".len()..];
            assert!(
                !next.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "a stream URL token in the output: {}",
                &text[at.saturating_sub(80)..(at + 40).min(text.len())]
            );
        }
    }
}
