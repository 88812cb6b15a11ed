//! One forwarded connection: a local TCP socket relayed to a connection of a [`Session`].
//!
//! Two halves run at once, as in linkerd's duplex: **up** (socket → session) and **down**
//! (session → socket). End of file on one side becomes a half-close on the other, never a
//! teardown of both: a client that shuts its write side still receives the whole reply.
//! Anything that breaks the transfer (an error from the server, a reset, a dead session, a
//! socket error, a shutdown whose grace period ran out) ends the local socket with a TCP reset, so a cut-short transfer can never look
//! like a clean end of file.
//!
//! Half-close towards a server that does not pass it on (kubelet/containerd turn a client's
//! FIN into a one-second kill timer; WebSocket v4 cannot carry it at all): the FIN is held only
//! while the server is still sending. It goes out once the server's direction has been quiet
//! for [`SessionOptions::half_close_quiet`](super::SessionOptions::half_close_quiet), at the
//! server's end of file, or at the hold limit, whichever comes first. On v4 the same moment
//! ends the connection: everything the server sent has arrived, so the local client gets a
//! clean end of file.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::backend::{self, Received, Socket};
use super::pipe::{Pipe, SpliceIn};
use super::session::{Inbound, Session};
use super::{LocalConn, READ_BUF, RelayError, SMALL_READ, SPLICE_MIN};
use crate::metrics::{Outcome, Stream, StreamStats};
use crate::proto::{ConnId, HEADROOM};

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum ConnOutcome {
    /// Both directions finished with end of file.
    Clean { up: u64, down: u64 },
    /// The server reported an error for this connection (its error stream text); `sent` is
    /// how many bytes the local client had sent upstream by then.
    RemoteError { message: String, sent: u64 },
    /// The peer reset the connection.
    PeerReset,
    /// The session died under the connection.
    SessionLost(String),
    /// The local socket failed (the local client reset, or stopped existing).
    Local(io::Error),
    /// Writing upstream failed.
    Upstream(RelayError),
    /// Still open when the process's graceful shutdown ran out of time (see [`super::Drain`]).
    Shutdown,
}

impl ConnOutcome {
    pub fn is_clean(&self) -> bool {
        matches!(self, ConnOutcome::Clean { .. })
    }

    /// The `outcome` this counts as in the metrics.
    pub fn counted(&self) -> Outcome {
        match self {
            ConnOutcome::Clean { .. } => Outcome::Clean,
            ConnOutcome::RemoteError { .. } => Outcome::ServerError,
            ConnOutcome::PeerReset => Outcome::ResetByPeer,
            ConnOutcome::SessionLost(_) | ConnOutcome::Upstream(_) => Outcome::SessionLost,
            ConnOutcome::Local(_) => Outcome::LocalError,
            ConnOutcome::Shutdown => Outcome::Shutdown,
        }
    }
}

impl std::fmt::Display for ConnOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnOutcome::Clean { up, down } => {
                write!(f, "closed ({up} bytes up, {down} bytes down)")
            }
            ConnOutcome::RemoteError { message, .. } => write!(f, "server error: {message}"),
            ConnOutcome::PeerReset => write!(f, "reset by server"),
            ConnOutcome::SessionLost(m) => write!(f, "session lost: {m}"),
            ConnOutcome::Local(e) => write!(f, "local socket: {e}"),
            ConnOutcome::Upstream(e) => write!(f, "{e}"),
            ConnOutcome::Shutdown => write!(f, "still open when the shutdown grace period ended"),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// We accepted `tcp` locally and opened the connection upstream.
    Client,
    /// The connection came from upstream and we dialled `tcp` to the target.
    Server,
}

/// Client role: relay an accepted local connection on `conn`, already open on `session`
/// (see [`Session::open`] and [`Session::start_with_conn`]).
///
/// `busy` is dropped as soon as the local client has finished sending (or the connection has
/// ended): from then on the connection only drains what the server still sends, and whoever
/// handed out the session (the pool) may give it to another connection.
///
/// A session on an io_uring worker relays the connection on that worker (the socket leaves
/// tokio's reactor); any other session relays it here, through tokio.
pub async fn relay_opened_conn<B: Send + 'static>(
    session: &Session,
    local: LocalConn,
    conn: ConnId,
    inbound: crate::relay::queue::Receiver<Inbound>,
    busy: B,
    stream: Stream,
) -> ConnOutcome {
    relay_on_worker(session, local, conn, inbound, Side::Client, busy, stream).await
}

/// Server role: relay upstream connection `conn` to the dialled target `tcp`.
pub async fn relay_server_conn(
    session: &Session,
    tcp: TcpStream,
    conn: ConnId,
    inbound: crate::relay::queue::Receiver<Inbound>,
    stream: Stream,
) -> ConnOutcome {
    relay_on_worker(
        session,
        LocalConn::Tokio(tcp),
        conn,
        inbound,
        Side::Server,
        (),
        stream,
    )
    .await
}

/// Relay on the session's worker if it has one, else here.
async fn relay_on_worker<B: Send + 'static>(
    session: &Session,
    local: LocalConn,
    conn: ConnId,
    inbound: crate::relay::queue::Receiver<Inbound>,
    side: Side,
    busy: B,
    stream: Stream,
) -> ConnOutcome {
    let Some(worker) = session.worker() else {
        // Boxed, so that the connection's task on the other path does not carry it.
        let outcome = match local.into_tokio() {
            Ok(tcp) => {
                Box::pin(relay(
                    session,
                    tcp,
                    conn,
                    inbound,
                    side,
                    busy,
                    stream.stats(),
                ))
                .await
            }
            Err(e) => ConnOutcome::Local(e),
        };
        return finish(stream, outcome);
    };
    let sock = match local.into_ring() {
        Ok(sock) => sock,
        Err(e) => return finish(stream, ConnOutcome::Local(e)),
    };
    let s = session.clone();
    let task = worker.spawn(async move {
        let outcome = relay(&s, sock, conn, inbound, side, busy, stream.stats()).await;
        finish(stream, outcome)
    });
    // (Dropping this future drops the handle, which ends the relay on the worker.)
    task.await
        .unwrap_or_else(|| ConnOutcome::SessionLost("the io_uring worker stopped".into()))
}

fn finish(stream: Stream, outcome: ConnOutcome) -> ConnOutcome {
    stream.finish(outcome.counted(), &outcome);
    outcome
}

/// Microseconds since `base`, for timestamps shared between the two halves.
fn micros_since(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

// Every open connection keeps this future for its whole life, idle or not: the futures of
// the bulk paths (splices, batched writes) are boxed when they run, so that only the small
// interactive ones (a receive, a DATA frame, a send) are part of its size.
async fn relay<S: Socket, B: Send>(
    session: &Session,
    sock: S,
    conn: ConnId,
    mut inbound: crate::relay::queue::Receiver<Inbound>,
    side: Side,
    busy: B,
    stats: &StreamStats,
) -> ConnOutcome {
    super::tune_socket(sock.as_fd());
    // A client-side FIN is held back from servers that would turn it into a 1 s kill timer
    // (see SessionOptions::forward_half_close), and from protocols that cannot carry it.
    let wire_half_close = session.half_close_on_wire();
    let hold_fin = side == Side::Client && (!session.forward_half_close() || !wire_half_close);
    let base = Instant::now();
    // When the server's direction last delivered anything (µs since `base`).
    let last_down = AtomicU64::new(0);
    let mut busy = Some(busy);
    let up_done = AtomicBool::new(false);
    let eof_seen = AtomicBool::new(false);
    // Local bytes read but not yet handed to the session.
    let up_pending = AtomicBool::new(false);
    let eof_notify = Notify::new();
    let sock = &sock;

    let outcome = {
        let up = async {
            let max = session.max_payload();
            let splice = session.can_splice() && super::upload_splice();
            let mut buf = BytesMut::new();
            // Spliced upload: the pipe this connection's payload waits in for the writer.
            let mut pipe: Option<Arc<Pipe>> = None;
            // Copy small messages, splice bulk: start copying, splice once a read fills
            // SMALL_READ, copy again after a splice that moved less than SPLICE_MIN.
            let mut bulk = false;
            loop {
                // Nothing is allocated before the client sends: an idle connection holds no
                // buffer and no pipe (ours is closed once the writer is done with it).
                if pipe
                    .as_ref()
                    .is_some_and(|p| Arc::strong_count(p) == 1 && p.fill() == 0)
                {
                    pipe = None;
                }
                // Spliceable or not, a bulk sender's reads are as large as frames allow.
                let limit = if splice { SMALL_READ } else { max };
                // Between messages, wait holding no buffer: in a receive whose buffer the
                // backend picks when bytes arrive, or until the socket is readable.
                let mut got = None;
                if !bulk {
                    got = sock.recv_stream(limit).await.map_err(ConnOutcome::Local)?;
                    if got.is_none() {
                        sock.readable().await.map_err(ConnOutcome::Local)?;
                    }
                }
                let n = if let Some(got) = got {
                    match got {
                        Received::Eof => 0,
                        Received::Data(b) => {
                            let n = b.len();
                            bulk = n == limit.min(b.capacity());
                            stats.add_up(n);
                            up_pending.store(true, Relaxed);
                            // Boxed: the buffer would otherwise take room in every idle
                            // connection's future twice over.
                            Box::pin(session.send_pooled(conn, b))
                                .await
                                .map_err(ConnOutcome::Upstream)?;
                            up_pending.store(false, Relaxed);
                            n
                        }
                    }
                } else if bulk && splice {
                    let p = match &pipe {
                        Some(p) => p.clone(),
                        None => pipe
                            .insert(Arc::new(Pipe::new().map_err(ConnOutcome::Local)?))
                            .clone(),
                    };
                    let n = match Box::pin(sock.splice_in(&p, max))
                        .await
                        .map_err(ConnOutcome::Local)?
                    {
                        SpliceIn::Moved(n) => n,
                        SpliceIn::Eof => 0,
                        SpliceIn::Full => {
                            // The writer has not sent what is in the pipe yet.
                            p.drained().await;
                            continue;
                        }
                    };
                    bulk = n >= SPLICE_MIN;
                    if n > 0 {
                        stats.add_up(n);
                        up_pending.store(true, Relaxed);
                        Box::pin(session.send_spliced(conn, &p, n))
                            .await
                            .map_err(ConnOutcome::Upstream)?;
                        up_pending.store(false, Relaxed);
                    }
                    n
                } else {
                    buf.clear();
                    buf.reserve(HEADROOM + limit);
                    buf.put_bytes(0, HEADROOM);
                    let n = sock
                        .recv(&mut buf, limit)
                        .await
                        .map_err(ConnOutcome::Local)?;
                    bulk = n == limit;
                    if n > 0 {
                        stats.add_up(n);
                        up_pending.store(true, Relaxed);
                        session
                            .send_data(conn, &mut buf)
                            .await
                            .map_err(ConnOutcome::Upstream)?;
                        up_pending.store(false, Relaxed);
                    }
                    if !bulk {
                        // An interactive client between messages holds no buffer either.
                        buf = BytesMut::new();
                    }
                    n
                };
                if n == 0 {
                    if !eof_seen.load(Relaxed) && backend::reset_by_peer(sock) {
                        return Err(ConnOutcome::Local(io::ErrorKind::ConnectionReset.into()));
                    }
                    drop(busy.take());
                    if hold_fin && !eof_seen.load(Relaxed) {
                        Box::pin(hold_while_sending(session, base, &last_down, &eof_notify)).await;
                    }
                    if !wire_half_close && side == Side::Client {
                        // Nothing can carry the half-close: the server has gone quiet (or
                        // ended), so the connection is over.
                        return Ok::<bool, ConnOutcome>(true);
                    }
                    session.close_write(conn).map_err(ConnOutcome::Upstream)?;
                    return Ok(false);
                }
            }
        };
        let down = async {
            while let Some(msg) = inbound.recv().await {
                match msg {
                    Inbound::Data(b) => {
                        last_down.store(micros_since(base), Relaxed);
                        // Frames that queued up behind this one leave in the same send (a
                        // stream server's frames are small: 32 KiB from containerd).
                        let next = |m: &Inbound| matches!(m, Inbound::Data(_));
                        let mut n = b.len();
                        let mut batch = vec![b];
                        while batch.len() < WRITE_BATCH && n < READ_BUF {
                            let Some(m) = inbound.try_recv_if(next) else {
                                break;
                            };
                            let b = data(m);
                            n += b.len();
                            batch.push(b);
                        }
                        Box::pin(backend::send_all(sock, batch, false))
                            .await
                            .map_err(ConnOutcome::Local)?;
                        stats.add_down(n);
                    }
                    Inbound::Piped { pipe, mut len } => {
                        last_down.store(micros_since(base), Relaxed);
                        // Payload spliced into the same pipe since leaves in one splice.
                        while let Some(m) = inbound.try_recv_if(|m| {
                            matches!(m, Inbound::Piped { pipe: p, .. } if Arc::ptr_eq(p, &pipe))
                        }) {
                            if let Inbound::Piped { len: more, .. } = m {
                                len += more;
                            }
                        }
                        let more = !inbound.is_empty();
                        Box::pin(sock.splice_out(&pipe, len, more))
                            .await
                            .map_err(ConnOutcome::Local)?;
                        stats.add_down(len);
                        if pipe.fill() == 0 {
                            session.pipe_drained(conn, &pipe);
                        }
                    }
                    Inbound::Eof => {
                        eof_seen.store(true, Relaxed);
                        eof_notify.notify_one();
                        // The peer may already have gone entirely; a failed shutdown changes
                        // nothing about what was delivered.
                        let _ = backend::shutdown_write(sock);
                        if up_done.load(Relaxed) {
                            return Ok(());
                        }
                    }
                    Inbound::Error(message) => {
                        return Err(ConnOutcome::RemoteError {
                            message,
                            sent: stats.up(),
                        });
                    }
                    Inbound::Reset => return Err(ConnOutcome::PeerReset),
                }
            }
            Err(ConnOutcome::SessionLost(
                session
                    .dead_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "closed".into()),
            ))
        };
        // Resolves only when a graceful shutdown gives up on the connections still open.
        let cut = session.cut();
        tokio::pin!(up, down, cut);
        loop {
            tokio::select! {
                r = &mut up, if !up_done.load(Relaxed) => match r {
                    Ok(over) => {
                        up_done.store(true, Relaxed);
                        if over || eof_seen.load(Relaxed) {
                            break Ok(());
                        }
                    }
                    Err(e) => break Err(e),
                },
                // A dead session drops this connection's queue: `down` still delivers what was
                // queued before it (the last data, an end of file) and then ends.
                r = &mut down => break r,
                () = &mut cut => break Err(ConnOutcome::Shutdown),
            }
        }
    };

    // Data sent for a connection the server then gave up on can wedge one of containerd's
    // frame workers, and with it the whole session (fixed in containerd 1.6.22/1.7.3): such a
    // session takes no new connection. Retired here, before the lease goes back to the pool,
    // so that no connection is handed it in between (seen: a new echo put on the session a
    // failed upload had just wedged, and reset 3 s later by the PING timeout).
    if let Err(ConnOutcome::RemoteError { sent, .. }) = &outcome
        && *sent > 0
        && side == Side::Client
        && !session.forward_half_close()
    {
        session.retire();
    }
    drop(busy);

    // The peer finished its direction and then ended the whole session in order (a WebSocket
    // server closes once its targets are done; there is no half-close in v4.channel.k8s.io).
    // Everything it sent has arrived, so this is a target that closed, not a broken transfer:
    // close the local socket normally. As with a direct TCP connection to a closed target, the
    // kernel resets it if the client sent anything that now cannot be delivered.
    let outcome = match outcome {
        Err(ConnOutcome::SessionLost(_))
            if eof_seen.load(Relaxed) && !up_pending.load(Relaxed) && session.ended_in_order() =>
        {
            Ok(())
        }
        o => o,
    };
    match outcome {
        Ok(()) => {
            match side {
                Side::Client => session.release(conn),
                Side::Server => session.finish(conn),
            }
            ConnOutcome::Clean {
                up: stats.up(),
                down: stats.down(),
            }
        }
        Err(e) => {
            match (&e, side) {
                (ConnOutcome::Local(err), Side::Server) => {
                    session.fail(conn, &format!("error forwarding to target: {err}"))
                }
                _ => session.reset(conn),
            }
            // Never a clean FIN for a broken transfer.
            backend::reset_on_close(sock);
            e
        }
    }
}

/// Most queued frames one send takes at once.
const WRITE_BATCH: usize = 64;

fn data(m: Inbound) -> bytes::Bytes {
    match m {
        Inbound::Data(b) => b,
        _ => unreachable!("only data is batched"),
    }
}

/// A local client has half-closed: wait until the server's direction has been quiet for
/// `half_close_quiet` (a reply still streaming keeps the FIN back), until the server ends its
/// direction, or until `half_close_hold` has passed since the client's FIN, whichever is first.
/// A client that closed completely looks the same as one that half-closed, so this must end.
async fn hold_while_sending(session: &Session, base: Instant, last_down: &AtomicU64, eof: &Notify) {
    let fin_at = Instant::now();
    let limit = fin_at + session.half_close_hold();
    let quiet = session.half_close_quiet();
    loop {
        let last = base + Duration::from_micros(last_down.load(Relaxed));
        let until = (last.max(fin_at) + quiet).min(limit);
        if Instant::now() >= until {
            return;
        }
        tokio::select! {
            _ = eof.notified() => return,
            _ = super::uring::worker::sleep_until(until) => {}
        }
    }
}
