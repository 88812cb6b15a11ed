//! The command line on bad input: every mistake is one `error: ...` line on stderr naming the
//! problem, and a non-zero exit. Runs the real binaries against real peers on port 0.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, Output};

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
