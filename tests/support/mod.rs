//! Shared fixtures for integration tests (`mod support;` in a test file).
//!
//! Layout:
//! - `containerd`: a private, real containerd with real pod sandboxes, for forwarding through
//!   containerd's CRI stream server; plus `listen_in_netns` to put a target server in a pod.
//! - `procs`: port-forward clients (kubectl, ringfwd) as killed-on-drop processes; echo targets.
//! - `apiserver`: a small fake Kubernetes API server (HTTPS, auth, discovery, objects, watch)
//!   that real kubectl accepts, proxying `pods/portforward` (SPDY and the KEP-4006 WebSocket
//!   tunnel) to a CRI stream server or a `ringfwd serve`.
//! - `postgres`: a real PostgreSQL 15 server in a pod's network namespace, and its client tools.
//!
//! Each test binary uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code, unused_imports)]

pub mod apiserver;
pub mod containerd;
pub mod postgres;
pub mod procs;

use std::io::Write;

pub use containerd::{Containerd, Sandbox, in_netns, listen_in_netns};

/// Starts a private containerd, or explains loudly why this test cannot run here.
///
/// `None` means "skip": a `SKIPPED: <test>: <reason>` line has been printed to stderr. When the
/// `CI` environment variable is set, a missing containerd is a failure instead (CI installs it),
/// so this panics.
pub fn containerd_or_skip(test: &str) -> Option<Containerd> {
    match Containerd::start() {
        Ok(c) => Some(c),
        Err(reason) => {
            skip(test, &reason);
            None
        }
    }
}

/// Destroys every established TCP connection of this network namespace to `port` (the kernel's
/// SOCK_DESTROY through `ss -K`), as a crashed proxy or a conntrack flush would: our side fails
/// with ECONNABORTED, the server gets a reset. Returns how many were killed.
pub fn kill_connections_to(port: u16) -> Result<usize, String> {
    let out = std::process::Command::new("ss")
        .args(["-K", "-tnH", "state", "established", "dport", "="])
        .arg(format!(":{port}"))
        .output()
        .map_err(|e| format!("cannot run ss: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ss -K failed (it needs root and CONFIG_INET_DIAG_DESTROY): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// Says loudly that `test` cannot run on this machine and why: one `SKIPPED: <test>: <reason>`
/// line on stderr. Under CI (`CI` set), which installs everything the suite needs, it panics
/// instead.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run in CI: {reason}");
    }
    // Straight to fd 2: libtest captures `eprintln!` and drops it for passing tests, which
    // would make the skip silent.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {reason}");
}
