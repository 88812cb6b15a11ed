//! kubectl versus ringfwd: one set of scenarios, run once with `kubectl port-forward`
//! (`/usr/bin/kubectl`, v1.32) and once with `ringfwd`, against the test API server
//! (`support::apiserver`) which relays each port-forward to containerd's stream server for a
//! real pod sandbox, as kube-apiserver and kubelet do.
//!
//! The pod runs three targets in its network namespace: an echo server, a source (send N
//! pseudo-random bytes on request) and a sink (answer the sha256 of N bytes). Every transfer is
//! checked against a digest computed independently at the other end. Where the two tools
//! differ on purpose the scenario asserts each one's behaviour: after a connection to a
//! refused port kubectl gives up the whole forward, ringfwd resets that connection only.
//!
//! A custom harness (libtest-mimic) starts containerd and the sandbox once; each scenario gets
//! its own API server. Without root or containerd every scenario is reported as ignored with a
//! loud SKIPPED line; with `CI` set that is a failure.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Failed, Trial};
use sha2::{Digest, Sha256};
use support::apiserver::{
    ApiOptions, ApiServer, Auth, Backend, IntOrString, PfKind, PodDef, ServicePortDef,
};
use support::procs::{self, PayloadStream, PortForward, echo_on, echo_roundtrip, echo_server};

/// Bytes per direction for the bulk scenarios.
fn bulk_bytes() -> u64 {
    procs::bulk_bytes("RINGFWD_KUBECTL_TEST_BYTES", 256 << 20)
}

const NAMESPACE: &str = "default";
const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Kubectl,
    Ringfwd,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Kubectl => "kubectl",
            Tool::Ringfwd => "ringfwd",
        }
    }

    /// `kubectl port-forward ARGS` or `ringfwd ARGS`, with `auth`'s kubeconfig.
    fn command(self, api: &ApiServer, auth: Auth, args: &[&str]) -> Command {
        let mut cmd = match self {
            Tool::Kubectl => {
                let mut c = api.kubectl(auth);
                c.arg("port-forward");
                c
            }
            Tool::Ringfwd => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_ringfwd"));
                c.arg("--kubeconfig")
                    .arg(api.kubeconfig(auth))
                    .env_remove("KUBECONFIG")
                    .env("RUST_LOG", "ringfwd=info")
                    .stdin(Stdio::null());
                c
            }
        };
        cmd.args(args);
        cmd
    }
}

/// The pod sandbox and the ports of its targets.
#[derive(Clone)]
struct Pod {
    endpoint: String,
    sandbox: String,
    echo: u16,
    source: u16,
    sink: u16,
    /// Nothing listens here inside the pod.
    closed: u16,
}

impl Pod {
    fn backend(&self) -> Backend {
        Backend::Cri {
            endpoint: self.endpoint.clone(),
            sandbox: self.sandbox.clone(),
        }
    }

    /// A fresh API server holding pod `web` (this sandbox; labels app=web; container ports
    /// `echo`, `source`, `sink`) owned by deployment `web`, and service `web` with port `http`
    /// (80 -> targetPort `echo`) and `data` (81 -> the source port, by number).
    fn api(&self, opts: ApiOptions) -> ApiServer {
        let api = ApiServer::start_with(opts);
        let rs = api.add_deployment("web", NAMESPACE, &[("app", "web")], 1);
        api.add_pod(
            PodDef::new("web", self.backend())
                .label("app", "web")
                .owner(&rs)
                .port(Some("echo"), self.echo)
                .port(Some("source"), self.source)
                .port(Some("sink"), self.sink),
        );
        api.add_service(
            "web",
            NAMESPACE,
            &[("app", "web")],
            vec![
                ServicePortDef::new(Some("http"), 80, IntOrString::Str("echo".into())),
                ServicePortDef::new(Some("data"), 81, IntOrString::Int(self.source)),
            ],
        );
        api
    }
}

const CHUNK: usize = 256 * 1024;

/// Source target: read a u64 count, send that many bytes of `PayloadStream(count | 1)`, close.
fn source_on(l: TcpListener) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut n = [0u8; 8];
                if s.read_exact(&mut n).is_err() {
                    return;
                }
                let n = u64::from_le_bytes(n);
                let (mut st, mut buf, mut left) = (PayloadStream(n | 1), vec![0u8; CHUNK], n);
                while left > 0 {
                    let k = left.min(CHUNK as u64) as usize;
                    st.fill(&mut buf[..k]);
                    if s.write_all(&buf[..k]).is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            });
        }
    });
}

/// Sink target: read a u64 count and that many bytes, answer their sha256.
fn sink_on(l: TcpListener) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            std::thread::spawn(move || {
                let mut n = [0u8; 8];
                if s.read_exact(&mut n).is_err() {
                    return;
                }
                let n = u64::from_le_bytes(n);
                let (mut h, mut buf, mut got) = (Sha256::new(), vec![0u8; CHUNK], 0u64);
                while got < n {
                    let want = (n - got).min(CHUNK as u64) as usize;
                    match s.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            got += k as u64;
                        }
                    }
                }
                let _ = s.write_all(&h.finalize());
            });
        }
    });
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(what().into()) }
}

fn connect(port: u16) -> Result<TcpStream, Failed> {
    let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Pull `n` bytes from the source through `local` and compare with the expected stream.
fn download(local: u16, n: u64) -> Result<(), Failed> {
    let mut s = connect(local)?;
    s.write_all(&n.to_le_bytes())?;
    let (mut want, mut got) = (Sha256::new(), Sha256::new());
    let (mut st, mut exp, mut buf) = (PayloadStream(n | 1), vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut total = 0u64;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        got.update(&buf[..k]);
        total += k as u64;
    }
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        st.fill(&mut exp[..k]);
        want.update(&exp[..k]);
        left -= k as u64;
    }
    check(total == n, || format!("downloaded {total} of {n} bytes"))?;
    check(want.finalize() == got.finalize(), || {
        format!("the {n} bytes downloaded differ from what the pod sent")
    })
}

/// Push `n` bytes to the sink through `local`; its sha256 must match ours.
fn upload(local: u16, n: u64) -> Result<(), Failed> {
    let mut s = connect(local)?;
    s.write_all(&n.to_le_bytes())?;
    let (mut st, mut buf, mut h, mut left) = (
        PayloadStream(n ^ 0x5a5a),
        vec![0u8; CHUNK],
        Sha256::new(),
        n,
    );
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        st.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    let mut theirs = [0u8; 32];
    s.read_exact(&mut theirs)?;
    check(theirs[..] == h.finalize()[..], || {
        format!("the pod's sha256 of the {n} bytes uploaded differs from ours")
    })
}

fn kinds(api: &ApiServer) -> Vec<PfKind> {
    api.portforward_log().into_iter().map(|r| r.kind).collect()
}

/// Start `tool` forwarding `args`; a failure to start carries its stderr.
fn start(tool: Tool, api: &ApiServer, auth: Auth, args: &[&str]) -> Result<PortForward, Failed> {
    PortForward::start(tool.command(api, auth, args))
        .map_err(|e| format!("{} did not start forwarding: {e}", tool.name()).into())
}

/// Run `tool` expecting it to fail before forwarding; returns its stderr.
fn start_fails(tool: Tool, api: &ApiServer, auth: Auth, args: &[&str]) -> Result<String, Failed> {
    start_fails_cmd(tool, tool.command(api, auth, args))
}

/// [`start_fails`] with a command the scenario adjusted.
fn start_fails_cmd(tool: Tool, cmd: Command) -> Result<String, Failed> {
    match PortForward::start(cmd) {
        Ok(pf) => Err(format!(
            "{} started forwarding to {} where it should have failed",
            tool.name(),
            pf.remote
        )
        .into()),
        Err(stderr) => Ok(stderr),
    }
}

/// `err` holds the tool's expected message; ringfwd's error is one `error: ...` line.
fn expect_error(tool: Tool, err: &str, kubectl: &str, ringfwd: &str) -> Result<(), Failed> {
    let want = match tool {
        Tool::Kubectl => kubectl,
        Tool::Ringfwd => ringfwd,
    };
    check(err.contains(want), || format!("want {want:?} in {err:?}"))?;
    if tool == Tool::Ringfwd {
        one_line(err)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// Bulk download and upload through `pod/web`, over the tunnel (kubectl's and ringfwd's
/// default) or plain SPDY (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`, honoured by both).
fn bulk(tool: Tool, pod: &Pod, spdy: bool) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let (src, sink) = (format!(":{}", pod.source), format!(":{}", pod.sink));
    let mut cmd = tool.command(&api, Auth::Token, &["pod/web", &src, &sink]);
    if spdy {
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    }
    let pf = PortForward::start_ports(cmd, 2).map_err(|e| format!("{}: {e}", tool.name()))?;
    let ports = pf.forwarded();
    let local = |remote: u16| {
        ports
            .iter()
            .find(|(_, r)| *r == remote)
            .map(|(l, _)| *l)
            .ok_or_else(|| format!("no Forwarding line for {remote}: {ports:?}"))
    };
    let n = bulk_bytes();
    download(local(pod.source)?, n)?;
    upload(local(pod.sink)?, n)?;
    let want = if spdy { PfKind::Spdy } else { PfKind::Tunnel };
    let got = kinds(&api);
    check(!got.is_empty() && got.iter().all(|k| *k == want), || {
        format!("port-forward requests {got:?}, want only {want:?}")
    })
}

/// `svc/web :http`: service port `http` -> targetPort `echo`, a named container port.
fn service_named_port(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let mut pf = start(tool, &api, Auth::Token, &["svc/web", ":http"])?;
    check(pf.remote == pod.echo, || {
        format!(
            "svc/web :http forwards to {}, want the echo port {}",
            pf.remote, pod.echo
        )
    })?;
    pf.assert_echo(1 << 20);
    if tool == Tool::Ringfwd {
        let out = pf.stdout();
        check(out.contains("Selected pod web for svc/web"), || {
            format!("ringfwd did not say which pod it chose: {out:?}")
        })?;
    }
    // By number, with a local port of the kernel's choosing: 81 -> the source port.
    let pf = start(tool, &api, Auth::Token, &["service/web", ":81"])?;
    check(pf.remote == pod.source, || {
        format!("svc/web :81 forwards to {}, want {}", pf.remote, pod.source)
    })?;
    download(pf.local, 1 << 20)
}

/// `deploy/web :echo`: the deployment's pod, by a named container port.
fn deployment_named_port(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let mut pf = start(tool, &api, Auth::Token, &["deploy/web", ":echo"])?;
    check(pf.remote == pod.echo, || {
        format!(
            "deploy/web :echo forwards to {}, want {}",
            pf.remote, pod.echo
        )
    })?;
    pf.assert_echo(1 << 20);
    Ok(())
}

/// An API server without the tunnel (before 1.30): both tools fall back to SPDY/3.1.
fn fallback_to_spdy(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions {
        tunnel: false,
        ..ApiOptions::default()
    });
    let mut pf = start(
        tool,
        &api,
        Auth::Token,
        &["pod/web", &format!(":{}", pod.echo)],
    )?;
    pf.assert_echo(1 << 20);
    let got = kinds(&api);
    check(
        matches!(got.as_slice(), [PfKind::Rejected(_), PfKind::Spdy, ..])
            && got[1..].iter().all(|k| *k == PfKind::Spdy),
        || format!("want a refused tunnel, then SPDY only; got {got:?}"),
    )
}

/// Every kind of credential a kubeconfig carries that both tools support.
fn credentials(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    for auth in [
        Auth::Token,
        Auth::TokenFile,
        Auth::ClientCert,
        Auth::Exec,
        Auth::InsecureToken,
    ] {
        let args = ["pod/web", &format!(":{}", pod.echo)];
        let mut pf = PortForward::start(tool.command(&api, auth, &args))
            .map_err(|e| format!("{} with {auth:?}: {e}", tool.name()))?;
        echo_roundtrip(pf.local, 4096).map_err(|e| format!("{auth:?}: {e}"))?;
        pf.stop();
    }
    Ok(())
}

/// The `oidc` auth provider: a valid ID token is used as it is; an expired one is refreshed at
/// the issuer first. kubectl trusts the issuer through the kubeconfig's
/// `idp-certificate-authority-data`; kube ignores that field and trusts the system roots, so
/// ringfwd is given the CA through `SSL_CERT_FILE` (its README says so), and without it fails
/// with one line naming the refresh.
fn oidc(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let args = ["pod/web", &format!(":{}", pod.echo)];
    let mut pf = PortForward::start(tool.command(&api, Auth::Oidc, &args))
        .map_err(|e| format!("{} with a valid OIDC ID token: {e}", tool.name()))?;
    echo_roundtrip(pf.local, 4096)?;
    pf.stop();
    check(api.oidc_refreshes() == 0, || {
        format!("{} refreshed a valid ID token", tool.name())
    })?;

    let mut cmd = tool.command(&api, Auth::OidcExpired, &args);
    if tool == Tool::Ringfwd {
        cmd.env("SSL_CERT_FILE", api.ca_file());
    }
    let mut pf = PortForward::start(cmd)
        .map_err(|e| format!("{} with an expired OIDC ID token: {e}", tool.name()))?;
    echo_roundtrip(pf.local, 4096)?;
    pf.stop();
    check(api.oidc_refreshes() >= 1, || {
        format!(
            "{} used an expired ID token without refreshing it",
            tool.name()
        )
    })?;

    if tool == Tool::Ringfwd {
        let mut cmd = tool.command(&api, Auth::OidcExpired, &["pod/web", "8080"]);
        cmd.env_remove("SSL_CERT_FILE");
        let err = start_fails_cmd(tool, cmd)?;
        one_line(&err)?;
        check(
            err.contains("refresh") && err.contains("SSL_CERT_FILE"),
            || format!("the failed OIDC refresh is not named: {err:?}"),
        )?;
    }
    Ok(())
}

/// `deploy/later` with no pod yet: both tools watch for one (kubectl's GetFirstPod, ringfwd's
/// `--pod-running-timeout`) and forward once it is added; with a short timeout both give up.
fn pod_appears_later(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let rs = api.add_deployment("later", NAMESPACE, &[("app", "later")], 1);
    let cmd = tool.command(&api, Auth::Token, &["deploy/later", ":echo"]);
    let starting = std::thread::spawn(move || PortForward::start(cmd));
    let watching = api.wait_for_request(
        |l| l.contains("/pods?") && l.contains("watch=") && l.contains("later"),
        Duration::from_secs(60),
    );
    check(watching.is_some(), || {
        format!("{} never watched for the deployment's pods", tool.name())
    })?;
    api.add_pod(
        PodDef::new("later-1", pod.backend())
            .label("app", "later")
            .owner(&rs)
            .port(Some("echo"), pod.echo),
    );
    let mut pf = starting.join().unwrap().map_err(|e| {
        format!(
            "{} did not forward to the pod added later: {e}",
            tool.name()
        )
    })?;
    check(pf.remote == pod.echo, || {
        format!("forwards to {}, want {}", pf.remote, pod.echo)
    })?;
    echo_roundtrip(pf.local, 4096)?;
    if tool == Tool::Ringfwd {
        let log = pf.stderr();
        check(log.contains("no pod matches deploy/later"), || {
            format!("ringfwd did not say it was waiting: {log:?}")
        })?;
    }
    pf.stop();

    api.add_deployment("never", NAMESPACE, &[("app", "never")], 1);
    let args = ["deploy/never", "8080", "--pod-running-timeout", "1s"];
    let mut cmd = tool.command(&api, Auth::Token, &args);
    // Only the error: the "waiting" notice is an info log.
    cmd.env("RUST_LOG", "ringfwd=warn");
    let err = start_fails_cmd(tool, cmd)?;
    expect_error(
        tool,
        &err,
        "timed out waiting for the condition",
        "after waiting 1s (--pod-running-timeout)",
    )
}

/// A token the server does not know: 401.
fn unauthorized(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let err = start_fails(tool, &api, Auth::BadToken, &["pod/web", "8080"])?;
    expect_error(
        tool,
        &err,
        "You must be logged in to the server",
        "Error from server (Unauthorized): Unauthorized",
    )?;
    check(api.portforward_log().is_empty(), || {
        "a port-forward was attempted without credentials".into()
    })
}

/// A pod that does not exist: 404 from the pod lookup, no port-forward attempted.
fn not_found(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let err = start_fails(tool, &api, Auth::Token, &["pod/nope", "8080"])?;
    let want = r#"Error from server (NotFound): pods "nope" not found"#;
    expect_error(tool, &err, want, want)
}

/// A user who may read pods but not create `pods/portforward`: 403.
fn forbidden(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let err = start_fails(tool, &api, Auth::ForbiddenToken, &["pod/web", ":8080"])?;
    let want =
        r#"cannot create resource "pods/portforward" in API group "" in the namespace "default""#;
    check(
        err.contains(want) && err.contains(r#"pods "web" is forbidden"#),
        || format!("want the RBAC message in {err:?}"),
    )?;
    if tool == Tool::Ringfwd {
        one_line(&err)?;
        check(err.contains("HTTP 403"), || format!("{err:?}"))?;
    }
    Ok(())
}

/// A pod that is not running: both refuse before asking for a port-forward.
fn not_running(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    api.add_pod(
        PodDef::new("pending", pod.backend())
            .phase("Pending")
            .ready(false),
    );
    let err = start_fails(tool, &api, Auth::Token, &["pending", "8080"])?;
    let want = match tool {
        Tool::Kubectl => {
            "unable to forward port because pod is not running. Current status=Pending"
        }
        Tool::Ringfwd => "pod default/pending is not running (phase Pending)",
    };
    check(err.contains(want), || format!("want {want:?} in {err:?}"))?;
    check(api.portforward_log().is_empty(), || {
        "a port-forward was attempted to a pending pod".into()
    })
}

/// One forward, two ports; the first has nothing listening in the pod. kubectl gives up the
/// whole forward after that connection's error (`lost connection to pod`); ringfwd resets that
/// connection and keeps forwarding the other port, and the refused one again later.
fn refused_port(tool: Tool, pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let args = [
        "pod/web",
        &format!(":{}", pod.closed),
        &format!(":{}", pod.echo),
    ];
    let mut pf = PortForward::start_ports(tool.command(&api, Auth::Token, &args), 2)
        .map_err(|e| format!("{}: {e}", tool.name()))?;
    let ports = pf.forwarded();
    let local = |remote| ports.iter().find(|(_, r)| *r == remote).map(|(l, _)| *l);
    let (closed, echo) = (local(pod.closed).unwrap(), local(pod.echo).unwrap());
    // The connection to the refused port must not look like a clean, empty reply.
    let mut s = connect(closed)?;
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 16];
    let r = s.read(&mut buf);
    check(!matches!(r, Ok(n) if n > 0), || {
        format!("refused port answered {r:?}")
    })?;
    match tool {
        Tool::Kubectl => {
            let status = pf.wait_exit(IO_TIMEOUT);
            let err = pf.stderr();
            check(
                status.is_some_and(|s| !s.success()) && err.contains("lost connection to pod"),
                || {
                    format!(
                        "kubectl: want an exit with \"lost connection to pod\", got {status:?} {err:?}"
                    )
                },
            )
        }
        Tool::Ringfwd => {
            check(
                matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                || format!("ringfwd: want a reset for the refused port, got {r:?}"),
            )?;
            echo_roundtrip(echo, 1 << 20)?;
            let mut again = connect(closed)?;
            let _ = again.write_all(b"again");
            let r = again.read(&mut buf);
            check(
                matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                || format!("ringfwd: second try at the refused port: {r:?}"),
            )?;
            echo_roundtrip(echo, 10)?;
            let err = pf.stderr();
            check(
                err.contains("connection refused") || err.contains("refused"),
                || format!("ringfwd should log the server's message: {err:?}"),
            )
        }
    }
}

/// A pod behind `ringfwd serve` instead of containerd (a node-side relay), over both upgrades.
fn through_ringfwd_serve(tool: Tool, _pod: &Pod) -> Result<(), Failed> {
    let api = ApiServer::start();
    let echo = echo_server();
    api.add_pod(PodDef::new("local", api.serve_backend()).port(Some("echo"), echo));
    for spdy in [false, true] {
        let mut cmd = tool.command(&api, Auth::Token, &["local", ":echo"]);
        if spdy {
            cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
        }
        let mut pf = PortForward::start(cmd).map_err(|e| format!("{}: {e}", tool.name()))?;
        pf.assert_echo(4 << 20);
        // Half-close: the request goes, the reply comes back whole.
        let mut s = connect(pf.local)?;
        s.write_all(b"last words")?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        let r = s.read_to_end(&mut back);
        check(r.is_ok() && back == b"last words", || {
            format!("half-closed echo: {r:?} {back:?}")
        })?;
    }
    // kubectl upgrades once per forward; ringfwd sets up spare sessions too (its pool), all of
    // the same kind.
    let mut got = kinds(&api);
    got.dedup();
    check(got == [PfKind::Tunnel, PfKind::Spdy], || {
        format!("{:?}", kinds(&api))
    })
}

/// ringfwd only: `--protocol websocket` speaks v4.channel.k8s.io through the API server.
fn ringfwd_websocket_v4(pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let echo = format!(":{}", pod.echo);
    let mut pf = start(
        Tool::Ringfwd,
        &api,
        Auth::Token,
        &["--protocol", "websocket", "pod/web", &echo],
    )?;
    pf.assert_echo(1 << 20);
    pf.assert_echo(100);
    let got = kinds(&api);
    check(
        !got.is_empty() && got.iter().all(|k| *k == PfKind::WebSocket),
        || format!("{got:?}"),
    )
}

/// ringfwd only (kubectl exits when its pod goes): the pod `target` forwards to is deleted,
/// and `replacement` (a pod of the same deployment, or the same pod again) is added. The open
/// connection is reset, one made while there is no pod waits and then works, and the forward
/// goes on to the new pod; each change is one log line.
fn pod_replaced(pod: &Pod, target: &str, replacement: &str) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let rs = api.add_deployment("roll", NAMESPACE, &[("app", "roll")], 1);
    let def = |name: &str| {
        PodDef::new(name, pod.backend())
            .label("app", "roll")
            .owner(&rs)
            .port(Some("echo"), pod.echo)
    };
    api.add_pod(def("roll-1"));
    let mut pf = start(Tool::Ringfwd, &api, Auth::Token, &[target, ":echo"])?;
    let mut open = connect(pf.local)?;
    open.write_all(b"ping")?;
    let mut back = [0u8; 4];
    open.read_exact(&mut back)?;
    check(&back == b"ping", || "echo before the pod went away".into())?;

    api.remove("pods", NAMESPACE, "roll-1");
    procs::expect_reset(&mut open)
        .map_err(|e| format!("connection to a pod that went away: {e}"))?;
    // ringfwd has seen the pod go (it reset the connection): this one arrives in the gap.
    let local = pf.local;
    let gap = std::thread::spawn(move || echo_roundtrip(local, 64 << 10));
    api.add_pod(def(replacement));
    gap.join()
        .unwrap()
        .map_err(|e| format!("connection made while there was no pod: {e}"))?;
    pf.assert_echo(1 << 20);
    let last = api.portforward_log().last().map(|r| r.pod.clone());
    check(last.as_deref() == Some(replacement), || {
        format!("last port-forward went to {last:?}, want {replacement}")
    })?;
    let log = pf.stderr();
    let waiting = match target {
        "deploy/roll" => "pod roll-1 is gone; waiting for a ready pod of deploy/roll".to_string(),
        _ => "pod roll-1 is gone; waiting for pod roll-1 to be Running again".to_string(),
    };
    for line in [
        waiting,
        format!("now forwarding to pod {replacement} (was roll-1)"),
    ] {
        check(log.contains(&line), || format!("no {line:?} in {log:?}"))?;
    }
    pf.stop();
    Ok(())
}

fn one_line(err: &str) -> Result<(), Failed> {
    let lines: Vec<&str> = err.trim().lines().collect();
    check(lines.len() == 1 && lines[0].starts_with("error: "), || {
        format!("want one `error: ...` line, got {err:?}")
    })
}

type Scenario = fn(Tool, &Pod) -> Result<(), Failed>;

fn trials(pod: Option<Arc<Pod>>) -> Vec<Trial> {
    let both: [(&str, Scenario); 14] = [
        ("tunnel::bulk_download_upload", |t, p| bulk(t, p, false)),
        ("spdy::bulk_download_upload", |t, p| bulk(t, p, true)),
        ("svc::named_target_port", service_named_port),
        ("deploy::named_container_port", deployment_named_port),
        ("deploy::pod_appears_later", pod_appears_later),
        ("fallback::old_api_server_spdy", fallback_to_spdy),
        ("auth::every_credential_kind", credentials),
        ("auth::oidc_and_refresh", oidc),
        ("auth::unauthorized_401", unauthorized),
        ("errors::pod_not_found_404", not_found),
        ("errors::forbidden_403", forbidden),
        ("errors::pod_not_running", not_running),
        ("errors::refused_port", refused_port),
        ("serve::backend_both_upgrades", through_ringfwd_serve),
    ];
    let mut out = Vec::new();
    for tool in [Tool::Kubectl, Tool::Ringfwd] {
        for (name, f) in both {
            let p = pod.clone();
            let t = Trial::test(format!("{}::{name}", tool.name()), move || match p {
                Some(p) => f(tool, &p),
                None => Ok(()),
            });
            out.push(t.with_ignored_flag(pod_missing(&pod)));
        }
    }
    for (name, target, replacement) in [
        (
            "ringfwd::deploy::pod_replaced_follows",
            "deploy/roll",
            "roll-2",
        ),
        (
            "ringfwd::pod::pod_recreated_follows",
            "pod/roll-1",
            "roll-1",
        ),
    ] {
        let p = pod.clone();
        out.push(
            Trial::test(name, move || match p {
                Some(p) => pod_replaced(&p, target, replacement),
                None => Ok(()),
            })
            .with_ignored_flag(pod_missing(&pod)),
        );
    }
    let p = pod.clone();
    out.push(
        Trial::test(
            "ringfwd::websocket_v4_through_api_server",
            move || match p {
                Some(p) => ringfwd_websocket_v4(&p),
                None => Ok(()),
            },
        )
        .with_ignored_flag(pod_missing(&pod)),
    );
    out.push(
        Trial::test("manual::hold_api_server", move || match pod {
            Some(p) => hold_api_server(&p),
            None => Ok(()),
        })
        .with_ignored_flag(true),
    );
    out
}

/// For trying ringfwd and kubectl by hand (opt-in):
/// `cargo test --test kubectl -- --ignored --nocapture manual::hold_api_server`
/// starts the test API server in front of the containerd pod, prints a kubeconfig and the
/// commands to try, and keeps everything up until stdin ends (Enter or Ctrl-D).
fn hold_api_server(pod: &Pod) -> Result<(), Failed> {
    let api = pod.api(ApiOptions::default());
    let kc = api.kubeconfig(Auth::Token);
    println!(
        "\nAPI server {} in front of pod web (echo :{}, source :{}, sink :{}). Try:\n  \
         ringfwd --kubeconfig {k} svc/web 8080:http\n  \
         kubectl --kubeconfig {k} port-forward svc/web 8081:http\n\
         Press Enter here to tear down.",
        api.url(),
        pod.echo,
        pod.source,
        pod.sink,
        k = kc.display()
    );
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

fn pod_missing(pod: &Option<Arc<Pod>>) -> bool {
    pod.is_none()
}

fn main() {
    let mut args = Arguments::from_args();
    // Two cores: one scenario at a time.
    args.test_threads.get_or_insert(1);
    let fixture = support::containerd_or_skip("kubectl scenarios");
    let sandbox = fixture
        .as_ref()
        .map(|c| c.run_sandbox("ringfwd-kubectl-test"));
    let pod = match (&fixture, &sandbox) {
        (Some(c), Some(sb)) => {
            let l = || support::listen_in_netns(&sb.netns);
            let (echo, source, sink) = (l(), l(), l());
            let closed = l().local_addr().unwrap().port();
            let pod = Pod {
                endpoint: c.endpoint(),
                sandbox: sb.id.clone(),
                echo: echo.local_addr().unwrap().port(),
                source: source.local_addr().unwrap().port(),
                sink: sink.local_addr().unwrap().port(),
                closed,
            };
            echo_on(echo);
            source_on(source);
            sink_on(sink);
            Some(Arc::new(pod))
        }
        _ => None,
    };
    let conclusion = libtest_mimic::run(&args, trials(pod));
    if let (Some(c), Some(sb)) = (&fixture, &sandbox) {
        c.remove_sandbox(sb);
    }
    drop(fixture);
    conclusion.exit();
}
