//! Faults injected into a running forward, against both real upstreams:
//!
//! - the upstream connection is killed (`ss -K`, the kernel's SOCK_DESTROY) in the middle of a
//!   download and of an upload: the local client sees a reset, never a clean end of file, and a
//!   new connection works afterwards;
//! - the upstream stops answering in the middle of a transfer (containerd stopped with SIGSTOP;
//!   `ringfwd serve` behind a relay that stops relaying): the PING timeout notices, the
//!   transfer's client is reset, a connection that arrives meanwhile is reset after the setup
//!   bound, and new connections work once the upstream answers again;
//! - the target closes while the client uploads, 50 times in a row: the forward stays alive
//!   throughout (a connection opened before and a new one each round both answer).

use std::process::Command;

use super::isolation::{endless_source, ping_echo, stoppable_forward};
use super::*;

/// Moved before a fault is injected, so that it lands in the middle of a transfer.
const BEFORE_FAULT: u64 = 16 << 20;

/// The TCP port of the upstream's stream server: `ringfwd serve`'s from its URL; containerd's
/// from the socket it listens on.
fn upstream_port(env: &Env) -> Result<u16, Failed> {
    match &env.upstream {
        Upstream::Url(url) => {
            let rest = url.strip_prefix("http://").ok_or("serve URL is not http")?;
            let hostport = rest.split('/').next().unwrap_or(rest);
            Ok(hostport.parse::<SocketAddr>()?.port())
        }
        _ => {
            let pid = env.pauser.as_ref().ok_or("no containerd")?.pid();
            let out = Command::new("ss").args(["-ltnpH"]).output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let tag = format!("pid={pid},");
            text.lines()
                .filter(|l| l.contains(&tag))
                .find_map(|l| {
                    let local = l.split_whitespace().nth(3)?;
                    local.rsplit_once(':')?.1.parse().ok()
                })
                .ok_or_else(|| format!("containerd (pid {pid}) listens on no TCP port").into())
        }
    }
}

/// Target: read and discard until the connection ends or breaks (a broken upload is what
/// these tests cause, so it is not a failure here).
async fn drain(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

/// Bind a listener where the server dials, run `target` on it; its port.
fn target<F, Fut>(env: &Env, target: F) -> Result<u16, Failed>
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = env.bind();
    let port = l.local_addr()?.port();
    tokio::spawn(target(l));
    Ok(port)
}

/// Read at least [`BEFORE_FAULT`] bytes of a download, so that a fault lands mid-transfer.
async fn read_into_transfer(s: &mut TcpStream) -> Result<(), Failed> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < BEFORE_FAULT {
        match s.read(&mut buf).await? {
            0 => return Err("download ended before the fault".into()),
            n => got += n as u64,
        }
    }
    Ok(())
}

/// The upstream connection dies in the middle of a download: the client is reset after the
/// bytes that made it, and a new connection works.
pub async fn upstream_killed_download(env: Env, protocol: Protocol) -> Result<(), Failed> {
    let up_port = upstream_port(&env)?;
    let src_port = target(&env, endless_source)?;
    let echo_port = target(&env, echo)?;
    let (_fwd, addrs, mut outcomes) = env.forward(protocol, &[src_port, echo_port]).await;

    let mut s = TcpStream::connect(addrs[0]).await?;
    read_into_transfer(&mut s).await?;
    let killed = support::kill_connections_to(up_port)?;
    check(killed >= 1, || "no upstream connection to kill".into())?;
    expect_reset(&mut s).await?;
    match outcomes.recv().await {
        Some(o) if !o.is_clean() => {}
        other => return Err(format!("killed download: outcome {other:?}, want a failure").into()),
    }
    echo_exact(addrs[1], 3, 1 << 20).await?;
    Ok(())
}

/// The upstream connection dies in the middle of an upload: the client's writes and reads
/// fail with a reset (never a clean end of file), and a new connection works.
pub async fn upstream_killed_upload(env: Env, protocol: Protocol) -> Result<(), Failed> {
    let up_port = upstream_port(&env)?;
    let sink_port = target(&env, drain)?;
    let echo_port = target(&env, echo)?;
    let (_fwd, addrs, mut outcomes) = env.forward(protocol, &[sink_port, echo_port]).await;

    let mut s = TcpStream::connect(addrs[0]).await?;
    let (mut r, mut w) = s.split();
    let write_saw_reset = std::sync::atomic::AtomicBool::new(false);
    let send = async {
        let mut data = vec![0u8; CHUNK];
        let mut stream = PayloadStream(21);
        let mut sent = 0u64;
        let mut killed = None;
        loop {
            stream.fill(&mut data);
            if let Err(e) = w.write_all(&data).await {
                write_saw_reset.store(e.kind() == ErrorKind::ConnectionReset, Ordering::Relaxed);
                return Ok::<_, Failed>((e, killed));
            }
            sent += CHUNK as u64;
            if killed.is_none() && sent >= BEFORE_FAULT {
                killed = Some(support::kill_connections_to(up_port)?);
            }
        }
    };
    let recv = async {
        let mut buf = vec![0u8; 4096];
        match r.read(&mut buf).await {
            Ok(0) => Ok(write_saw_reset.load(Ordering::Relaxed)),
            Ok(n) => Err(format!("{n} bytes from a target that sends nothing")),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e.to_string()),
        }
    };
    let (sent, got) = tokio::join!(send, recv);
    let (write_err, killed) = sent?;
    check(killed.is_some_and(|k| k >= 1), || {
        format!("the upload failed before the fault ({write_err}), or nothing was killed")
    })?;
    check(got?, || {
        "killed upload: the client read a clean end of file, want a reset".into()
    })?;
    match outcomes.recv().await {
        Some(o) if !o.is_clean() => {}
        other => return Err(format!("killed upload: outcome {other:?}, want a failure").into()),
    }
    echo_exact(addrs[1], 4, 1 << 20).await?;
    Ok(())
}

/// The upstream stops answering in the middle of a download (containerd: SIGSTOP; serve: the
/// relay in front of it stops relaying and swallows new connections). The session's PING
/// timeout (3 s here) notices and resets the download's client; a connection made meanwhile is
/// reset after the setup bound; once the upstream answers again, new connections work.
pub async fn upstream_paused_mid_transfer(env: Env) -> Result<(), Failed> {
    let src_port = target(&env, endless_source)?;
    let echo_port = target(&env, echo)?;
    let (gate, _fwd, addrs, mut outcomes) = stoppable_forward(&env, &[src_port, echo_port]).await?;

    let mut s = TcpStream::connect(addrs[0]).await?;
    read_into_transfer(&mut s).await?;
    let paused = match (&gate, &env.pauser) {
        (Some(g), _) => {
            g.freeze(true);
            None
        }
        (None, Some(p)) => Some(p.pause()),
        (None, None) => return Err("no way to make this upstream stop answering".into()),
    };
    // What was in flight still arrives; then the reset.
    expect_reset(&mut s).await?;
    match outcomes.recv().await {
        Some(ConnOutcome::SessionLost(m)) if m.contains("stopped answering") => {}
        other => {
            return Err(format!("paused upstream: outcome {other:?}, want a lost session").into());
        }
    }
    let started = std::time::Instant::now();
    let mut waiting = TcpStream::connect(addrs[1]).await?;
    expect_reset(&mut waiting).await?;
    let waited = started.elapsed();
    match outcomes.recv().await {
        Some(ConnOutcome::SessionLost(m)) if m.contains("--connect-timeout") => {}
        other => {
            return Err(format!("want a reset naming --connect-timeout, got {other:?}").into());
        }
    }
    check(waited >= Duration::from_millis(500), || {
        format!("reset after {waited:?}, before the 500 ms bound")
    })?;

    drop(paused);
    if let Some(g) = &gate {
        g.freeze(false);
    }
    let mut after = TcpStream::connect(addrs[1]).await?;
    ping_echo(&mut after, "connection after the upstream came back").await?;
    echo_exact(addrs[1], 6, 4 << 20).await?;
    Ok(())
}

/// The target closes while the client is still uploading, 50 times in a row. Each time the
/// client's writes fail, and the forward stays alive: an echo connection opened before the
/// first round and a new one after every round both answer.
pub async fn target_closes_mid_upload_50x(env: Env, protocol: Protocol) -> Result<(), Failed> {
    let closer_port = target(&env, |l| closer(l, false))?;
    let echo_port = target(&env, echo)?;
    let (_fwd, addrs, mut outcomes) = env.forward(protocol, &[closer_port, echo_port]).await;
    let mut long_lived = TcpStream::connect(addrs[1]).await?;
    ping_echo(&mut long_lived, "echo before the first round").await?;

    for round in 0..50 {
        let mut s = TcpStream::connect(addrs[0]).await?;
        let buf = vec![0x5au8; CHUNK];
        let mut failed = false;
        for _ in 0..256 {
            if s.write_all(&buf).await.is_err() {
                failed = true;
                break;
            }
        }
        check(failed, || {
            format!("round {round}: 64 MiB accepted by a target that read 64 KiB")
        })?;
        drop(s);
        ping_echo(
            &mut long_lived,
            &format!("round {round}: echo opened before"),
        )
        .await?;
        let mut fresh = TcpStream::connect(addrs[1]).await?;
        ping_echo(&mut fresh, &format!("round {round}: new echo")).await?;
    }
    // 50 broken uploads, 50 new echoes and the long-lived one: the uploads failed, the echoes
    // ended cleanly.
    drop(long_lived);
    let mut failures = Vec::new();
    for _ in 0..101 {
        let o = outcomes
            .recv()
            .await
            .ok_or("forward stopped reporting outcomes")?;
        if !o.is_clean() {
            failures.push(o);
        }
    }
    // containerd 1.6.20 can wedge a session after such a failure (its frame worker blocks on
    // the dead stream): the PING timeout then retires the session, and an echo connection
    // that was on it, whose client had already gone, counts as lost. Broken, never silent.
    let lost = failures
        .iter()
        .filter(|o| matches!(o, ConnOutcome::SessionLost(_)))
        .count();
    if env.kubelet_like && lost > 0 {
        eprintln!("{}: {lost} wedged session(s) retired", env.name);
    }
    let want = if env.kubelet_like {
        50..=50 + lost
    } else {
        50..=50
    };
    check(want.contains(&failures.len()), || {
        format!(
            "{} failed connections, want the 50 uploads: {failures:?}",
            failures.len()
        )
    })
}
