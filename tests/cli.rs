//! The command line on bad input: every mistake is one `error: ...` line on stderr naming the
//! problem, and a non-zero exit. Runs the real binaries against real peers on port 0.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod support;

use support::procs::serve_in_process;

fn ringfwd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringfwd"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run ringfwd")
}

/// Asserts a failed run whose stderr is one line starting `error: ` and containing every
/// fragment of `want`.
fn assert_one_line_error(out: &Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0; stderr {err:?}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    for w in want {
        assert!(lines[0].contains(w), "{err:?} does not mention {w:?}");
    }
}

#[test]
fn malformed_port_spec() {
    for spec in ["80x", "0", "70000", "x:80", "1:2:3"] {
        let out = ringfwd(&["forward", "--url", "http://127.0.0.1:1/", spec]);
        assert_one_line_error(&out, &["invalid port spec", spec]);
    }
    let out = ringfwd(&["svc/web", "8080:NotAName"]);
    assert_one_line_error(&out, &["invalid port spec", "NotAName"]);
}

#[test]
fn spread_needs_several_pods() {
    for target in ["pod/web-0", "web-0"] {
        let out = ringfwd(&[target, "80", "--spread"]);
        assert_one_line_error(&out, &["--spread needs a target with several pods", target]);
    }
    // -l alone has no TYPE/NAME to take the first port from: the ports must be there.
    let out = ringfwd(&["-l", "app=web", "--spread"]);
    assert_one_line_error(&out, &["no ports to forward"]);
}

#[test]
fn unknown_target_type() {
    let out = ringfwd(&["job/x", "80"]);
    assert_one_line_error(&out, &["job/x", "unsupported type"]);
}

#[test]
fn local_port_in_use() {
    let (_rt, url) = serve_in_process();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = format!("{port}:80");
    let out = ringfwd(&["forward", "--address", "127.0.0.1", "--url", &url, &spec]);
    assert_one_line_error(
        &out,
        &[&format!("cannot listen on 127.0.0.1:{port}"), "in use"],
    );
}

#[test]
fn unreachable_stream_server() {
    let closed = {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{closed}/portforward");
    let out = ringfwd(&["forward", "--url", &url, ":80"]);
    assert_one_line_error(&out, &["cannot connect", &format!("127.0.0.1:{closed}")]);
}

#[test]
fn unreachable_runtime_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix://{}/nothing.sock", dir.path().display());
    let out = ringfwd(&["forward", "--runtime-endpoint", &ep, "sandbox", ":80"]);
    assert_one_line_error(&out, &["nothing.sock"]);
}

#[test]
fn missing_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let out = ringfwd(&["--kubeconfig", path.to_str().unwrap(), "pod/x", "80"]);
    assert_one_line_error(&out, &["kubeconfig", "absent"]);
}

#[test]
fn completions_name_the_commands() {
    let out = ringfwd(&["completion", "bash"]);
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    for w in ["ringfwd", "--kubeconfig", "--namespace", "forward", "bench"] {
        assert!(script.contains(w), "bash completion lacks {w}");
    }
}

#[test]
fn plugin_binary_speaks_as_kubectl_ringfwd() {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-ringfwd"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: kubectl ringfwd TYPE/NAME"),
        "plugin help: {help}"
    );
    assert!(help.contains("kubectl ringfwd svc/myservice 8080:http"));
}

/// The README's two commands: the first runs the embedded bench through `cargo run` (here
/// without `--release` and with small sizes, so no second build and no long run), the second is
/// the test command `.ci/run` calls. `cargo run` must pick `ringfwd` among the two binaries.
#[test]
fn readme_commands_work() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README starts with a sh block");
    let cmds: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        cmds,
        ["cargo run --release -- bench", "cargo test --locked"]
    );
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == cmds[1]),
        ".ci/run does not run the README's test command"
    );

    let mut cargo = Command::new(env!("CARGO"));
    // Not the variables cargo sets for this test (CARGO_PKG_NAME, ...): a build script that
    // watches one (ring's) would otherwise be rerun, and everything above it rebuilt twice
    // over, here and in the next `cargo test` (seen: minutes of every CI pass).
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR"
                || k == "OUT_DIR")
        {
            cargo.env_remove(k);
        }
    }
    let out = cargo
        .current_dir(root)
        .args(["run", "--quiet", "--offline", "--", "bench"])
        .args(["--bytes", "16MiB", "--connects", "20", "--echoes", "200"])
        .env("RUST_LOG", "off")
        .output()
        .expect("run cargo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`cargo run -- bench` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in ["download", "upload", "CPU", "p50", "p99"] {
        assert!(stdout.contains(w), "bench table lacks {w:?}: {stdout}");
    }
}

/// `ringfwd bench --connections N --json`: the report of a successful run.
fn bench_rr(args: &[&str]) -> serde_json::Value {
    let out = ringfwd(
        &[
            &["bench", "--connections", "3", "--duration", "1s", "--json"],
            args,
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

/// The CPU share of `role` in a request/response report.
fn share<'a>(report: &'a serde_json::Value, role: &str) -> Option<&'a serde_json::Value> {
    report["cpu"].as_array()?.iter().find(|c| c["role"] == role)
}

/// The embedded request/response bench: every request the load generator counted is one the
/// echo target answered, the forwarder and the server are separate processes (children, not
/// this bench), and the figures agree with each other. No timing is asserted.
#[test]
fn bench_connections_counts_what_the_target_answered() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("rr.svg");
    let r = bench_rr(&["--message", "100", "--plot", svg.to_str().unwrap()]);
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 0, "{r}");
    assert_eq!(r["answered"].as_u64(), Some(requests), "{r}");
    assert_eq!(r["connections"], 3);
    assert_eq!(r["message"], 100);
    let rate = r["requests_per_second"].as_f64().unwrap();
    let secs = r["seconds"].as_f64().unwrap();
    assert!(
        (rate * secs - requests as f64).abs() < 1e-6 * requests as f64,
        "{r}"
    );
    let l = &r["latency_ms"];
    let q = |k: &str| l[k].as_f64().unwrap();
    assert!(0.0 < q("p50") && q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("max"));

    let fwd = share(&r, "forwarder").expect("forwarder CPU");
    let server = share(&r, "server").expect("server CPU");
    assert_eq!(fwd["process"], "ringfwd forward");
    assert_eq!(server["process"], "ringfwd serve");
    let me = u64::from(std::process::id());
    let (fp, sp) = (
        fwd["pid"].as_u64().unwrap(),
        server["pid"].as_u64().unwrap(),
    );
    assert!(fp != sp && fp != me && sp != me, "{r}");
    for role in ["forwarder", "server", "load generator", "echo target"] {
        let c = share(&r, role).unwrap_or_else(|| panic!("no {role} in {r}"));
        let (s, us) = (
            c["seconds"].as_f64().unwrap(),
            c["us_per_request"].as_f64().unwrap(),
        );
        assert!(
            s >= 0.0 && (us - s / requests as f64 * 1e6).abs() < 1e-6,
            "{role}: {c}"
        );
    }
    let svg = std::fs::read_to_string(&svg).expect("--plot wrote the SVG");
    assert!(svg.contains("requests per second") && svg.contains("CPU per request"));
}

/// `--echo-addr`: the load alone against someone else's echo server, which sees exactly the
/// requests the report counts, and no forwarder or server is claimed.
#[test]
fn bench_connections_against_an_echo_address() {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let echoed = Arc::new(AtomicU64::new(0));
    let count = echoed.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    count.fetch_add(n as u64, Ordering::SeqCst);
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let r = bench_rr(&["--message", "1KiB", "--echo-addr", &addr.to_string()]);
    let requests = r["requests"].as_u64().unwrap();
    // The echo also saw the warm-up requests before the timed window.
    let warmup = r["warmup_requests"].as_u64().unwrap();
    assert_eq!(
        echoed.load(Ordering::SeqCst),
        (requests + warmup) * 1024,
        "{r}"
    );
    assert!(r["answered"].is_null(), "not our target: {r}");
    assert!(
        share(&r, "forwarder").is_none() && share(&r, "server").is_none(),
        "{r}"
    );
    assert!(share(&r, "load generator").is_some(), "{r}");
}
