//! Smoke test of the containerd fixture and the CRI client: a real containerd runs a real pod
//! sandbox, the CRI PortForward call returns a stream-server URL, and that server answers.
//! Skips loudly without root/containerd; fails under `CI`.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use ringfwd::control::cri::{CriClient, CriError, SandboxState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn containerd_fixture_port_forward_url_and_stream_server() {
    let Some(containerd) = support::containerd_or_skip("containerd_smoke") else {
        return;
    };
    let sandbox = containerd.run_sandbox("smoke");
    assert!(sandbox.netns.exists(), "{}", sandbox.netns.display());

    // A target inside the pod, reachable only through the pod's loopback.
    let listener = support::listen_in_netns(&sandbox.netns);
    let port = listener.local_addr().unwrap().port();
    let target = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
    });
    // The listener really lives in the pod: from inside the netns it echoes.
    support::in_netns(&sandbox.netns, || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    });
    target.join().unwrap();

    let mut cri = CriClient::connect(&containerd.endpoint()).await.unwrap();
    let version = cri.version().await.unwrap();
    assert!(version.starts_with("containerd "), "{version}");

    let status = cri.pod_sandbox_status(&sandbox.id).await.unwrap();
    assert_eq!(status.state, SandboxState::Ready);
    assert_eq!(status.netns.as_deref(), Some(sandbox.netns.as_path()));

    let url = cri.port_forward(&sandbox.id, &[port]).await.unwrap();
    let rest = url
        .expose()
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected URL {url}"));
    let (stream_port, path) = rest.split_once('/').unwrap();
    let stream_port: u16 = stream_port.parse().unwrap();
    assert!(
        path.starts_with("portforward/") && path.len() > "portforward/".len(),
        "{url}"
    );

    // The stream server is up and checks tokens: an unknown token is a 404.
    let status_line = http_post(stream_port, "/portforward/no-such-token", "").await;
    assert!(status_line.starts_with("HTTP/1.1 404"), "{status_line}");

    // A SPDY port-forward request without the upgrade headers reaches the upgrader and is
    // refused with a 4xx (the token is consumed either way: it is single-use).
    let status_line = http_post(
        stream_port,
        &format!("/{path}"),
        "X-Stream-Protocol-Version: portforward.k8s.io\r\n",
    )
    .await;
    assert!(status_line.starts_with("HTTP/1.1 4"), "{status_line}");
    eprintln!("stream server without upgrade: {status_line}");

    // A wrong sandbox id is one clear line, not a gRPC dump.
    let err = cri
        .port_forward("no-such-sandbox", &[80])
        .await
        .unwrap_err();
    assert!(matches!(err, CriError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        r#"pod sandbox "no-such-sandbox" not found in the container runtime"#
    );

    containerd.remove_sandbox(&sandbox);
    assert!(matches!(
        cri.pod_sandbox_status(&sandbox.id).await,
        Err(CriError::NotFound { .. })
    ));
}

/// POSTs with no body and returns the response's status line.
async fn http_post(port: u16, path: &str, extra_headers: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra_headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut resp))
        .await
        .expect("stream server did not answer")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    eprintln!("POST {path} -> {resp:?}");
    resp.lines().next().unwrap_or("").to_owned()
}
