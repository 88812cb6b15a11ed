//! A runtime target whose pod restarts: its sandbox is stopped and removed, and a new sandbox
//! of the same pod (name and namespace) is started, with the target listening on the same port
//! again. The forward must follow it: the connection that was open is reset (never a clean end
//! of file), a connection made while no sandbox is ready waits and then works, and new
//! connections work afterwards, all through the same local port.

use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Failed, Trial};
use ringfwd::control::follow::TargetState;
use ringfwd::control::forward::Upstream;
use ringfwd::control::pool::PoolOptions;
use ringfwd::control::upgrade::Protocol;
use ringfwd::relay::ConnOutcome;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::support::containerd::{Containerd, Sandbox, listen_in_netns_on};
use super::{Env, check, echo, echo_exact, expect_reset};

pub fn trials(c: &Arc<Containerd>) -> Vec<Trial> {
    [Protocol::Spdy, Protocol::Websocket]
        .into_iter()
        .map(|protocol| {
            let c = c.clone();
            Trial::test(
                format!(
                    "containerd::{}::sandbox_replaced_forward_follows",
                    protocol.label()
                ),
                move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        tokio::time::timeout(
                            Duration::from_secs(300),
                            sandbox_replaced(c, protocol),
                        )
                        .await
                    })
                    .map_err(|_| Failed::from("timed out after 300 s"))?
                },
            )
        })
        .collect()
}

/// The fixture's CRI calls block: run them off the runtime's workers.
async fn blocking<T: Send + 'static>(
    c: &Arc<Containerd>,
    f: impl FnOnce(&Containerd) -> T + Send + 'static,
) -> T {
    let c = c.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .expect("fixture call panicked")
}

fn echo_in(sb: &Sandbox, port: u16) {
    let l = listen_in_netns_on(&sb.netns, port);
    l.set_nonblocking(true).unwrap();
    tokio::spawn(echo(TcpListener::from_std(l).unwrap()));
}

async fn sandbox_replaced(c: Arc<Containerd>, protocol: Protocol) -> Result<(), Failed> {
    let name = format!("ringfwd-follow-{}", protocol.label());
    let old = blocking(&c, {
        let name = name.clone();
        move |c| c.run_sandbox(&name)
    })
    .await;
    let port = {
        let l = ringfwd::serve::listen_in_netns(&old.netns)?;
        let port = l.local_addr()?.port();
        l.set_nonblocking(true)?;
        tokio::spawn(echo(TcpListener::from_std(l)?));
        port
    };
    let env = Env {
        name: "containerd",
        upstream: Upstream::Cri {
            endpoint: c.endpoint(),
            sandbox: old.id.clone(),
        },
        netns: Some(old.netns.clone()),
        kubelet_like: true,
        pauser: None,
    };
    // A bound, not a timing: the connection made in the gap waits for the new sandbox.
    let pool = PoolOptions {
        connect_timeout: Duration::from_secs(120),
        ..PoolOptions::default()
    };
    let (fwd, addrs, mut outcomes) = env.forward_with(protocol, &[port], pool).await;
    let addr = addrs[0];
    let mut target = fwd.target().expect("a runtime target follows its pod");

    // A connection open across the restart.
    let mut open = TcpStream::connect(addr).await?;
    open.write_all(b"before").await?;
    let mut back = [0u8; 6];
    open.read_exact(&mut back).await?;
    check(&back == b"before", || "echo before the restart".into())?;

    blocking(&c, move |c| c.remove_sandbox(&old)).await;
    target
        .wait_for(|s| matches!(s, TargetState::Waiting { .. }))
        .await?;
    expect_reset(&mut open).await?;

    // A connection while no sandbox of the pod is ready: it waits.
    let gap = tokio::spawn(echo_exact(addr, 11, 64 << 10));

    // The pod again: a new sandbox, same name and namespace, its target on the same port.
    // (The forward may switch to it before the target listens: a connection arriving in that
    // instant is refused by the pod, as it would be by any pod that is still starting. The
    // gap connection can be that one: see below.)
    let new = blocking(&c, move |c| c.run_sandbox(&name)).await;
    echo_in(&new, port);
    let switched = target
        .wait_for(|s| matches!(s, TargetState::Ready { .. }))
        .await?
        .clone();
    check(
        switched
            == TargetState::Ready {
                pod: new.id.clone(),
                generation: 1,
            },
        || {
            format!(
                "forwarding to {switched:?}, want the new sandbox {}",
                new.id
            )
        },
    )?;

    if let Err(e) = gap.await? {
        // Reset: acceptable only if the pod refused the dial (the forward switched before
        // `echo_in` bound the port: seen once in CI under load), which the forward records as
        // the server's error for that connection. A session lost, a clean end: failures.
        let refused = async {
            while let Some(o) = outcomes.recv().await {
                if let ConnOutcome::RemoteError { message, .. } = &o
                    && message.contains("refused")
                {
                    return true;
                }
            }
            false
        };
        let refused = tokio::time::timeout(Duration::from_secs(30), refused).await;
        check(refused == Ok(true), || {
            format!("connection made in the gap: {e}, and the pod did not refuse it")
        })?;
    }
    for seed in 0..3 {
        echo_exact(addr, 100 + seed, 256 << 10)
            .await
            .map_err(|e| format!("new connection after the restart: {e}"))?;
    }
    drop(fwd);
    blocking(&c, move |c| c.remove_sandbox(&new)).await;
    Ok(())
}
