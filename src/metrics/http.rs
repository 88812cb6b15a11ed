//! The `--metrics-addr` endpoint: a small HTTP/1.1 server with two pages.
//!
//! - `GET /metrics`: the Prometheus text exposition, rendered from the recorder after folding
//!   the open streams' bytes in (so a long transfer shows up while it runs), then the per-pod
//!   families of `--spread` forwards ([`super::render_pods`]);
//! - `GET /streams`: JSON of the open streams: forward, pod (`--spread`), remote port, peer,
//!   age, bytes and current rate each way.
//!
//! Our own server rather than the exporter's listener, because `/streams` is ours and the
//! exporter's listener is behind features that pull in more than we need.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use super::MetricsError;

/// How often the recorder drains histogram samples when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// `--metrics-addr`: `HOST:PORT`, or a bare port for `127.0.0.1:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok((Ipv4Addr::LOCALHOST, port).into());
    }
    s.parse()
        .map_err(|_| format!("invalid metrics address {s:?} (try 9464 or 127.0.0.1:9464)"))
}

/// Install the recorder, listen on `addr` and serve the endpoint on the current runtime.
/// Returns the bound address (`addr` may have port 0).
pub async fn start(addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
    let handle = super::install()?;
    let listen_err = |source| MetricsError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen_err)?;
    let bound = listener.local_addr().map_err(listen_err)?;
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            h.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
    Ok(bound)
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(route(&req, &handle)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await
            {
                tracing::debug!("metrics request from {peer}: {e}");
            }
        });
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn route(req: &Request<Incoming>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            super::fold_all();
            let mut text = handle.render();
            super::render_pods(&mut text);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            )
        }
        "/streams" => respond(StatusCode::OK, "application/json", streams_json()),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /streams\n".into(),
        ),
    }
}

/// `{"streams": [{"forward", "pod", "port", "peer", "age_seconds", "bytes_up", "bytes_down",
/// "rate_up_bytes_per_second", "rate_down_bytes_per_second"}, ...]}`, oldest first. `pod` is
/// the pod a `--spread` forward sent the connection to (null otherwise). Rates are over the
/// sampler's last second.
pub fn streams_json() -> String {
    let streams: Vec<serde_json::Value> = super::open_streams()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "forward": &*s.forward,
                "pod": s.pod.as_deref(),
                "port": s.port,
                "peer": s.peer.map(|p| p.to_string()),
                "age_seconds": s.age.as_secs_f64(),
                "bytes_up": s.bytes[0],
                "bytes_down": s.bytes[1],
                "rate_up_bytes_per_second": s.rate[0],
                "rate_down_bytes_per_second": s.rate[1],
            })
        })
        .collect();
    serde_json::json!({ "streams": streams }).to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_addr;

    #[test]
    fn bare_port_means_loopback() {
        assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(parse_addr("0.0.0.0:1").unwrap().to_string(), "0.0.0.0:1");
        assert_eq!(parse_addr("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(parse_addr("localhost:x").unwrap_err().contains("9464"));
    }
}
