//! `ringfwd up -f FILE`: the real binary against a real `ringfwd serve` and echo targets, all
//! on port 0. A file that does not validate starts nothing; a forward that cannot start is
//! named on stderr while the others carry bytes; only when none starts does `up` fail. And
//! every example file in `examples/forwards/` (and the README's) must validate.

#[path = "support/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};

use procs::{Proc, RINGFWD, closed_port, echo_roundtrip, echo_server, http_get, wait_line};

/// Writes `text` as `forwards.toml` in a fresh directory.
fn forwards_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forwards.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

fn up(file: &str) -> Output {
    Command::new(RINGFWD)
        .args(["up", "-f", file])
        .output()
        .expect("run ringfwd up")
}

/// `NAME: Forwarding from 127.0.0.1:LOCAL -> REMOTE`.
fn forwarding(line: &str, name: &str) -> Option<(u16, u16)> {
    let rest = line.strip_prefix(&format!("{name}: Forwarding from 127.0.0.1:"))?;
    let (local, remote) = rest.split_once(" -> ")?;
    Some((local.parse().ok()?, remote.parse().ok()?))
}

#[test]
fn good_forwards_run_beside_one_that_cannot_start() {
    let (_serve, url) = procs::serve_process("off");
    let (echo_a, echo_b) = (echo_server(), echo_server());
    // The bad forward's local port is held here, so its bind fails.
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (_dir, file) = forwards_file(&format!(
        r#"
        [defaults]
        address = ["127.0.0.1"]

        [[forward]]
        name = "alpha"
        url = "{url}"
        ports = [":{echo_a}"]

        [[forward]]
        name = "taken"
        url = "{url}"
        ports = ["{taken_port}:{echo_a}"]

        [[forward]]
        name = "beta"
        url = "{url}"
        ports = [":{echo_b}"]
        ping_interval = "2s"
        "#
    ));
    let mut cmd = Command::new(RINGFWD);
    cmd.args(["up", "-f", &file, "--metrics-addr", "127.0.0.1:0"]);
    let child = Proc::spawn(cmd);
    let (out, err) = (&child.stdout, &child.stderr);

    let metrics = wait_line(out, "metrics address", |l| {
        l.strip_prefix("Metrics on http://")?
            .strip_suffix("/metrics")
            .map(str::to_string)
    });
    let (mut a, mut b) = (None, None);
    while a.is_none() || b.is_none() {
        wait_line(out, "Forwarding lines of alpha and beta", |l| {
            assert!(!l.starts_with("taken:"), "the taken port was bound: {l}");
            if let Some(p) = forwarding(l, "alpha") {
                a = Some(p);
            } else if let Some(p) = forwarding(l, "beta") {
                b = Some(p);
            } else {
                return None;
            }
            Some(())
        });
    }
    let ((local_a, remote_a), (local_b, remote_b)) = (a.unwrap(), b.unwrap());
    assert_eq!((remote_a, remote_b), (echo_a, echo_b));
    echo_roundtrip(local_a, 256 * 1024).unwrap();
    echo_roundtrip(local_b, 256 * 1024).unwrap();

    let reason = wait_line(err, "the taken forward's error", |l| {
        l.split_once(r#"forward "taken" did not start: "#)
            .map(|(_, reason)| reason.to_string())
    });
    assert!(
        reason.contains(&format!("cannot listen on 127.0.0.1:{taken_port}")),
        "{reason}"
    );
    wait_line(err, "the summary", |l| {
        l.contains("2 of 3 forwards running").then_some(())
    });

    // Each forward is its own metrics label.
    let (_, scrape) = http_get(&metrics, "/metrics").unwrap();
    for name in ["alpha", "beta"] {
        let label = format!("forward=\"{name}\"");
        assert!(
            scrape
                .lines()
                .any(|l| l.starts_with("ringfwd_connections_accepted_total{") && l.contains(&label)),
            "no ringfwd_connections_accepted_total with {label} in\n{scrape}"
        );
    }
}

#[test]
fn fails_when_no_forward_can_start() {
    let port = closed_port();
    let (_dir, file) = forwards_file(&format!(
        r#"
        [[forward]]
        name = "gone"
        url = "http://127.0.0.1:{port}/portforward"
        ports = [":80"]
        "#
    ));
    let out = up(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0; stderr {stderr}");
    assert!(
        stderr.contains(r#"forward "gone" did not start: cannot connect"#),
        "{stderr}"
    );
    assert!(
        stderr.contains("none of its 1 forwards could start"),
        "{stderr}"
    );
}

#[test]
fn an_invalid_file_starts_nothing_and_names_every_problem() {
    let (_serve, url) = procs::serve_process("off");
    let (_dir, file) = forwards_file(&format!(
        r#"
        [[forward]]
        name = "fine"
        url = "{url}"
        ports = [":80"]

        [[forward]]
        name = "db"
        url = "{url}"
        ports = [80, "80:abc"]

        [[forward]]
        ports = []
        "#
    ));
    let out = up(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0; stderr {stderr}");
    assert!(
        !stdout.contains("Forwarding"),
        "a forward started: {stdout}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0],
        format!("error: {file}: 4 problems, no forward started"),
        "{stderr}"
    );
    for want in [
        r#"forward "db": ports[1] "80:abc": a named port needs a cluster target"#,
        "forward[2]: name: missing",
        "forward[2]: no target",
        "forward[2]: ports: no ports to forward",
    ] {
        let line = format!("{file}: {want}");
        assert!(
            lines.iter().any(|l| l.starts_with(&line)),
            "no line {line:?} in {stderr}"
        );
    }
}

#[test]
fn unknown_fields_are_rejected_by_name_and_line() {
    let (_dir, file) = forwards_file(
        "[[forward]]\nname = \"a\"\nurl = \"http://127.0.0.1:1/\"\nports = [80]\nlocal_port = 8080\n",
    );
    let out = up(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0; stderr {stderr}");
    assert!(stderr.contains("unknown field `local_port`"), "{stderr}");
    assert!(stderr.contains("line 5"), "{stderr}");
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let out = up(path.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.starts_with("error: cannot read ") && stderr.contains("absent.toml"),
        "{stderr}"
    );
}

/// Every `examples/forwards/*.toml` (a new one is covered without touching this test) and the
/// README's `ringfwd up` example validate.
#[test]
fn examples_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("examples/forwards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = ringfwd::control::config::parse(&text) {
            panic!("{}", e.in_file(&path.display().to_string()));
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} example files");

    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("### Many forwards from a file: `ringfwd up`")
        .nth(1)
        .expect("README has a ringfwd up section");
    let example = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the ringfwd up section has a toml block");
    if let Err(e) = ringfwd::control::config::parse(example) {
        panic!("{}", e.in_file("README.md"));
    }
}
