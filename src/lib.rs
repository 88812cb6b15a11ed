//! ringfwd: fast, observable, hard-to-kill port forwarding into Kubernetes pods.
//!
//! Layout (one line per module, from the wire up):
//! - [`proto`]: sans-IO SPDY/3.1, port-forward stream pairing, WebSocket and the v4 channel
//!   protocol. Bytes in, events out; no sockets, no clocks.
//! - [`relay`]: the data plane. Drives a protocol session over a socket and relays each local
//!   connection with half-close, reset and keepalive semantics.
//! - [`control`]: the control plane. CRI client, HTTP upgrade, the forwarder that decides which
//!   session a connection rides on and replaces dead ones.
//! - [`serve`]: the stream-server side (`ringfwd serve`), dialling targets on localhost or in a
//!   network namespace.
//! - [`secret`]: tokens and stream-server URLs that carry them, kept out of logs and `Debug`.
//! - [`bench`]: `ringfwd bench`, the built-in load generator and its embedded targets;
//!   [`plot`] draws a run as SVG.
//! - [`metrics`]: every exported metric, the per-connection stats the data plane bumps, the
//!   Prometheus recorder and the `--metrics-addr` endpoint; [`status`] is the live status line.
//! - [`shutdown`]: SIGINT/SIGTERM: stop accepting, give open connections `--grace`, cut the rest.

pub mod bench;
pub mod cli;
pub mod control;
pub mod metrics;
pub mod plot;
pub mod proto;
pub mod relay;
pub mod secret;
pub mod serve;
pub mod shutdown;
pub mod status;

use std::time::Duration;

/// Parse `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (try 10s or 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("duration {s:?} must be positive"));
    }
    // `from_secs_f64` panics past u64::MAX seconds; a typo must be an error, not a crash.
    // Below a nanosecond rounds to zero, which a timer would reject.
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d.is_zero() => Err(format!("duration {s:?} must be positive")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!("duration {s:?} is too long")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3d").unwrap_err().contains("unit"));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("99999999999999999999999h").is_err());
        assert!(parse_duration("0.0000000001s").is_err());
    }
}
