//! Self-check of the fake API server (`support::apiserver`) against the real judge: kubectl.
//!
//! Every test starts its own server, runs `/usr/bin/kubectl` against it and asserts on what
//! kubectl printed, on bytes through `kubectl port-forward`, and on how the server handled
//! each port-forward request. Local ports are always chosen by the kernel (`:PORT` forwards,
//! targets on 127.0.0.1:0).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::apiserver::{
    ApiOptions, ApiServer, Auth, Backend, IntOrString, PfKind, PodDef, ServicePortDef, VIEWER_USER,
};

use support::procs::*;

fn port_forward(api: &ApiServer, auth: Auth, target: &str, port: &str) -> Command {
    let mut cmd = api.kubectl(auth);
    cmd.args(["port-forward", target, port]);
    cmd
}

fn kinds(api: &ApiServer) -> Vec<PfKind> {
    api.portforward_log().into_iter().map(|r| r.kind).collect()
}

/// A server with one Running pod `web` (labels app=web, port `http` = an echo server) behind an
/// in-process `ringfwd serve`.
fn server_with_echo_pod(opts: ApiOptions) -> (ApiServer, u16) {
    let api = ApiServer::start_with(opts);
    let port = echo_server();
    let backend = api.serve_backend();
    api.add_pod(
        PodDef::new("web", backend)
            .label("app", "web")
            .port(Some("http"), port),
    );
    (api, port)
}

// ---------------------------------------------------------------------------------------------
// kubectl get, authentication
// ---------------------------------------------------------------------------------------------

#[test]
fn get_pods_with_every_working_credential() {
    let api = ApiServer::start();
    for name in ["alpha", "beta"] {
        api.add_pod(PodDef::new(name, Backend::None).label("app", name));
    }
    for auth in [
        Auth::Token,
        Auth::TokenFile,
        Auth::ClientCert,
        Auth::Exec,
        Auth::InsecureToken,
        Auth::ForbiddenToken,
    ] {
        let mut cmd = api.kubectl(auth);
        cmd.args(["get", "pods", "-o", "name"]);
        let (ok, out, err) = run(cmd);
        assert!(ok, "{auth:?}: kubectl get pods failed: {err}");
        assert_eq!(out, "pod/alpha\npod/beta\n", "{auth:?}");
    }
    let mut cmd = api.kubectl(Auth::Token);
    cmd.args(["get", "pods", "-l", "app in (beta,gamma)", "-o", "name"]);
    assert_eq!(run(cmd).1, "pod/beta\n");
}

#[test]
fn get_pods_with_a_bad_token_is_unauthorized() {
    let api = ApiServer::start();
    api.add_pod(PodDef::new("alpha", Backend::None));
    let mut cmd = api.kubectl(Auth::BadToken);
    cmd.args(["get", "pods", "-o", "name"]);
    let (ok, _, err) = run(cmd);
    assert!(!ok, "kubectl get pods succeeded with a bad token");
    // Discovery gets the 401 first; kubectl words it like this against real clusters too.
    assert!(
        err.contains(
            "error: You must be logged in to the server \
             (the server has asked for the client to provide credentials)"
        ),
        "{err}"
    );
    assert!(api.requests().iter().all(|r| r.ends_with("-> 401")));
}

/// With no credentials at all kubectl never gets to the server: it prompts for a username on
/// stdout and fails when stdin is closed. At most the gcloud version dispatcher's `/version`
/// probe arrives, and gets the 401.
#[test]
fn get_pods_without_credentials_prompts_and_fails() {
    let api = ApiServer::start();
    let mut cmd = api.kubectl(Auth::None);
    cmd.args(["get", "pods", "-o", "name"]);
    let (ok, out, err) = run(cmd);
    assert!(!ok, "kubectl get pods succeeded without credentials");
    assert_eq!(out, "Please enter Username: ");
    assert!(err.contains("error: EOF"), "{err}");
    let requests = api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("GET /version") && r.ends_with("-> 401")),
        "{requests:?}"
    );
}

#[test]
fn get_human_readable_and_single_objects() {
    let api = ApiServer::start();
    api.add_pod(
        PodDef::new("alpha", Backend::None)
            .phase("Pending")
            .ready(false),
    );
    let owner = api.add_deployment("web", "default", &[("app", "web")], 1);
    // Scheduled (it has a backend, never dialled here), so it has a node and an IP.
    let unused = Backend::Url("http://127.0.0.1:9/portforward".into());
    api.add_pod(
        PodDef::new("web-1", unused)
            .label("app", "web")
            .owner(&owner),
    );
    api.add_service(
        "web",
        "default",
        &[("app", "web")],
        vec![ServicePortDef::new(
            Some("http"),
            80,
            IntOrString::Int(8080),
        )],
    );
    let mut cmd = api.kubectl(Auth::Token);
    cmd.args(["get", "pods", "-o", "wide"]);
    let (ok, out, err) = run(cmd);
    assert!(ok, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ],
        "{out}"
    );
    assert_eq!(
        rows[1][..4],
        ["alpha", "0/1", "ContainerCreating", "0"],
        "{out}"
    );
    assert_eq!(rows[1][5..7], ["<none>", "<none>"], "{out}");
    assert_eq!(rows[2][..4], ["web-1", "1/1", "Running", "0"], "{out}");
    assert!(
        rows[2][4].ends_with('s') && rows[2][6] == "ringfwd-node",
        "{out}"
    );
    for (what, expect) in [
        (
            "pod/nope",
            "Error from server (NotFound): pods \"nope\" not found",
        ),
        (
            "deploy/nope",
            "Error from server (NotFound): deployments.apps \"nope\" not found",
        ),
    ] {
        let mut cmd = api.kubectl(Auth::Token);
        cmd.args(["get", what]);
        let (ok, _, err) = run(cmd);
        assert!(!ok && err.contains(expect), "{what}: {err}");
    }
    let mut cmd = api.kubectl(Auth::Token);
    cmd.args(["get", "deploy,rs,svc,endpointslices", "-o", "name"]);
    let (ok, out, err) = run(cmd);
    assert!(ok, "{err}");
    assert!(out.contains("deployment.apps/web\n"), "{out}");
    assert!(out.contains("replicaset.apps/web-"), "{out}");
    assert!(out.contains("service/web\n"), "{out}");
    assert!(out.contains("endpointslice.discovery.k8s.io/web-"), "{out}");
}

#[test]
fn watch_streams_added_pods() {
    let api = ApiServer::start();
    api.add_pod(PodDef::new("first", Backend::None));
    let mut cmd = api.kubectl(Auth::Token);
    cmd.args(["get", "pods", "--watch", "-o", "name"]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = KillOnDrop(cmd.spawn().expect("spawn kubectl"));
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("kubectl output").expect("utf-8");
    assert_eq!(next(), "pod/first");
    api.add_pod(PodDef::new("second", Backend::None));
    assert_eq!(next(), "pod/second");
    drop(child);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.ends_with("-> 200")),
        "{:#?}",
        api.requests()
    );
}

// ---------------------------------------------------------------------------------------------
// kubectl port-forward
// ---------------------------------------------------------------------------------------------

#[test]
fn port_forward_pod_over_websocket_tunnel() {
    let (api, port) = server_with_echo_pod(ApiOptions::default());
    let mut pf = PortForward::start(port_forward(
        &api,
        Auth::Token,
        "pod/web",
        &format!(":{port}"),
    ))
    .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
    assert_eq!(pf.remote, port);
    pf.assert_echo(1 << 20);
    pf.assert_echo(10);
    assert_eq!(kinds(&api), [PfKind::Tunnel], "{:#?}", api.requests());
    assert!(pf.stderr().is_empty(), "kubectl stderr: {}", pf.stderr());
}

#[test]
fn port_forward_pod_over_plain_spdy() {
    let (api, port) = server_with_echo_pod(ApiOptions::default());
    let mut cmd = port_forward(&api, Auth::Token, "web", &format!(":{port}"));
    cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    let mut pf =
        PortForward::start(cmd).unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
    pf.assert_echo(1 << 20);
    assert_eq!(kinds(&api), [PfKind::Spdy], "{:#?}", api.requests());
}

#[test]
fn port_forward_falls_back_to_spdy_without_tunnel() {
    let opts = ApiOptions {
        tunnel: false,
        ..ApiOptions::default()
    };
    let (api, port) = server_with_echo_pod(opts);
    let mut pf = PortForward::start(port_forward(
        &api,
        Auth::Token,
        "pod/web",
        &format!(":{port}"),
    ))
    .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
    pf.assert_echo(1 << 20);
    assert_eq!(
        kinds(&api),
        [PfKind::Rejected(400), PfKind::Spdy],
        "{:#?}",
        api.requests()
    );
}

#[test]
fn port_forward_service_by_named_port() {
    let api = ApiServer::start();
    let port = echo_server();
    let backend = api.serve_backend();
    api.add_pod(
        PodDef::new("web-0", backend)
            .label("app", "web")
            .port(Some("web"), port),
    );
    api.add_service(
        "web",
        "default",
        &[("app", "web")],
        vec![ServicePortDef::new(
            Some("http"),
            80,
            IntOrString::Str("web".into()),
        )],
    );
    let mut pf = PortForward::start(port_forward(&api, Auth::Token, "svc/web", ":http"))
        .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
    assert_eq!(
        pf.remote, port,
        "service port http -> targetPort web -> {port}"
    );
    pf.assert_echo(64 << 10);
    assert_eq!(kinds(&api), [PfKind::Tunnel]);
}

#[test]
fn port_forward_deployment_and_statefulset() {
    let api = ApiServer::start();
    let port = echo_server();
    let backend = api.serve_backend();
    let rs = api.add_deployment("web", "default", &[("app", "web")], 1);
    api.add_pod(
        PodDef::new(&format!("{}-x7k2p", rs.name), backend.clone())
            .label("app", "web")
            .port(Some("http"), port)
            .owner(&rs),
    );
    let sts = api.add_statefulset("db", "default", &[("app", "db")]);
    api.add_pod(
        PodDef::new("db-0", backend)
            .label("app", "db")
            .port(None, port)
            .owner(&sts),
    );
    for target in ["deploy/web", "deployment.apps/web", "sts/db"] {
        let mut pf =
            PortForward::start(port_forward(&api, Auth::Token, target, &format!(":{port}")))
                .unwrap_or_else(|e| panic!("{target}: kubectl port-forward failed: {e}"));
        pf.assert_echo(64 << 10);
    }
    let pods: Vec<String> = api.portforward_log().into_iter().map(|r| r.pod).collect();
    assert_eq!(
        pods,
        [
            format!("{}-x7k2p", rs.name),
            format!("{}-x7k2p", rs.name),
            "db-0".into()
        ]
    );
}

/// `kubectl port-forward deploy/x` with no pods yet watches for one (GetFirstPod).
#[test]
fn port_forward_deployment_waits_for_its_first_pod() {
    let api = ApiServer::start();
    let port = echo_server();
    let backend = api.serve_backend();
    let rs = api.add_deployment("late", "default", &[("app", "late")], 1);
    std::thread::scope(|s| {
        s.spawn(|| {
            let watching =
                |r: &str| r.contains("labelSelector=app%3Dlate") && r.contains("watch=true");
            api.wait_for_request(watching, KUBECTL_READY)
                .expect("kubectl watches for the deployment's pods");
            api.add_pod(
                PodDef::new("late-1", backend)
                    .label("app", "late")
                    .port(None, port)
                    .owner(&rs),
            );
        });
        let mut pf = PortForward::start(port_forward(
            &api,
            Auth::Token,
            "deploy/late",
            &format!(":{port}"),
        ))
        .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
        pf.assert_echo(64 << 10);
    });
    assert_eq!(api.portforward_log()[0].pod, "late-1");
}

#[test]
fn port_forward_forbidden_for_viewer() {
    let (api, port) = server_with_echo_pod(ApiOptions::default());
    let err = match PortForward::start(port_forward(
        &api,
        Auth::ForbiddenToken,
        "pod/web",
        &format!(":{port}"),
    )) {
        Ok(_) => panic!("kubectl port-forward succeeded for the viewer"),
        Err(e) => e,
    };
    let expected = format!(
        "pods \"web\" is forbidden: User \"{VIEWER_USER}\" cannot create resource \
         \"pods/portforward\" in API group \"\" in the namespace \"default\""
    );
    assert!(err.contains(&expected), "kubectl said: {err}");
    assert_eq!(kinds(&api), [PfKind::Rejected(403), PfKind::Rejected(403)]);
}

#[test]
fn port_forward_missing_pod_is_not_found() {
    let (api, _) = server_with_echo_pod(ApiOptions::default());
    let err = match PortForward::start(port_forward(&api, Auth::Token, "pod/nope", ":80")) {
        Ok(_) => panic!("kubectl port-forward to a missing pod succeeded"),
        Err(e) => e,
    };
    assert!(
        err.contains("Error from server (NotFound): pods \"nope\" not found"),
        "kubectl said: {err}"
    );
    assert!(
        kinds(&api).is_empty(),
        "kubectl gave up before port-forwarding"
    );
}

#[test]
fn port_forward_pod_not_running_is_refused_by_kubectl() {
    let api = ApiServer::start();
    api.add_pod(
        PodDef::new("pending", api.serve_backend())
            .phase("Pending")
            .ready(false),
    );
    let err = match PortForward::start(port_forward(&api, Auth::Token, "pod/pending", ":80")) {
        Ok(_) => panic!("kubectl port-forward to a Pending pod succeeded"),
        Err(e) => e,
    };
    assert!(
        err.contains("unable to forward port because pod is not running. Current status=Pending"),
        "kubectl said: {err}"
    );
    assert!(kinds(&api).is_empty());
}

#[test]
fn port_forward_through_containerd() {
    let Some(c) =
        support::containerd_or_skip("apiserver_selfcheck::port_forward_through_containerd")
    else {
        return;
    };
    let sb = c.run_sandbox("apiserver-pf");
    let listener = support::listen_in_netns(&sb.netns);
    let port = echo_on(listener);
    let api = ApiServer::start();
    api.add_pod(
        PodDef::new(
            "pod-in-containerd",
            Backend::Cri {
                endpoint: c.endpoint(),
                sandbox: sb.id.clone(),
            },
        )
        .port(Some("echo"), port),
    );
    for (websockets, kind) in [("true", PfKind::Tunnel), ("false", PfKind::Spdy)] {
        let mut cmd = port_forward(&api, Auth::Token, "pod/pod-in-containerd", ":echo");
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets);
        let mut pf = PortForward::start(cmd)
            .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}\n{}", c.log_tail()));
        assert_eq!(pf.remote, port);
        pf.assert_echo(1 << 20);
        assert_eq!(
            api.portforward_log().last().map(|r| r.kind.clone()),
            Some(kind)
        );
    }

    // An API server without the tunnel relays kubectl's WebSocket request to containerd,
    // which refuses it; kubectl falls back to SPDY.
    let old = ApiServer::start_with(ApiOptions {
        tunnel: false,
        ..ApiOptions::default()
    });
    old.add_pod(PodDef::new(
        "pod-in-containerd",
        Backend::Cri {
            endpoint: c.endpoint(),
            sandbox: sb.id.clone(),
        },
    ));
    let mut pf = PortForward::start(port_forward(
        &old,
        Auth::Token,
        "pod/pod-in-containerd",
        &format!(":{port}"),
    ))
    .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}\n{}", c.log_tail()));
    pf.assert_echo(1 << 20);
    // containerd's WebSocket handshake refuses the unknown subprotocol with a 403.
    assert_eq!(kinds(&old), [PfKind::Rejected(403), PfKind::Spdy]);
}

/// `/usr/bin/kubectl` here is gcloud's version dispatcher: it asks `/version` and runs the
/// matching `kubectl.1.<minor>`. Reporting 1.29 gets a kubectl without the WebSocket tunnel.
#[test]
fn dispatcher_picks_kubectl_matching_server_version() {
    let (api, port) = server_with_echo_pod(ApiOptions {
        minor_version: 29,
        ..ApiOptions::default()
    });
    let mut cmd = api.kubectl(Auth::Token);
    cmd.args(["version", "-o", "json"]);
    let (ok, out, err) = run(cmd);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("kubectl version json");
    let client = v["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    eprintln!(
        "client {client}, server {}",
        v["serverVersion"]["gitVersion"]
    );
    let mut pf = PortForward::start(port_forward(
        &api,
        Auth::Token,
        "pod/web",
        &format!(":{port}"),
    ))
    .unwrap_or_else(|e| panic!("kubectl port-forward failed: {e}"));
    pf.assert_echo(64 << 10);
    if client.starts_with("v1.29.") {
        assert_eq!(kinds(&api), [PfKind::Spdy]);
    } else {
        eprintln!("SKIPPED: dispatcher check: /usr/bin/kubectl runs {client} for a 1.29 server");
    }
}
