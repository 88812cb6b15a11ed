//! One upstream session: the socket, the protocol state, and the three tasks around them.
//!
//! - the **reader** owns the read half: it reads into one large buffer, lets the protocol cut
//!   events out of it (payload arrives as zero-copy slices of that buffer) and hands them to the
//!   connection they belong to;
//! - the **writer** owns the write half: it drains one queue of ready frames with vectored
//!   writes, so a frame header and its payload leave in one syscall with other frames;
//! - the **keepalive** PINGs an idle session and declares it dead when nothing at all has come
//!   back for `ping_timeout` (containerd's stream server can stop reading a session, see
//!   `shared/cri-notes.md`; a dead session must reset its connections, never leave them hanging).
//!
//! Ordering rule: every frame is produced and queued while holding the protocol lock, so frames
//! leave in the order the protocol produced them (SPDY header compression depends on it).

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::backend::{Received, Socket, send_all};
use super::drain::{Drain, Open};
use super::pipe::{Pipe, SpliceIn};
use super::queue;
use super::uring::{RingSocket, Worker};
use super::{CONN_QUEUE_FRAMES, READ_BUF, RelayError, SESSION_WRITE_BUDGET, UpstreamConn};
use crate::metrics::SessionMetrics;
use crate::proto::{ConnId, Event, HEADROOM, PortForwardProtocol, ProtoError};

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// How a session behaves; the defaults suit a forward to a cluster.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// PING after this long without receiving anything.
    pub ping_interval: Duration,
    /// Declare the session dead after this long without receiving anything.
    pub ping_timeout: Duration,
    /// Forward a local half-close upstream at once. Off for kubelet/containerd-style servers:
    /// they never pass a half-close on to the pod, and once one direction ends they close the
    /// whole connection after one second, truncating a slower reply. With this off the FIN is
    /// held until the server has finished its direction.
    pub forward_half_close: bool,
    /// With `forward_half_close` off, the longest a local half-close is held back.
    pub half_close_hold: Duration,
    /// With `forward_half_close` off, a held half-close goes out once the server's direction
    /// has been quiet this long (the server is done replying).
    pub half_close_quiet: Duration,
    /// Counts this session's reader while it waits for a slow local client (the only brake
    /// on a server that does no flow control). Shared by the sessions of one forward, so
    /// the forward (and tests) can see a stall happen.
    pub stalls: Option<Arc<watch::Sender<usize>>>,
    /// Where the session reports its start, end, PING round trips and stalls.
    pub metrics: SessionMetrics,
    /// Move payload with splice(2) where the upstream is plain TCP and the protocol allows it
    /// (SPDY to a stream server); otherwise, or when off, payload is copied through user
    /// memory. Defaults to on for the `epoll` plane, and for `uring` where this kernel (and
    /// seccomp profile) allows splice; uploads splice only where [`super::upload_splice`] says.
    pub splice: bool,
    /// Hand a plain TCP upstream to an io_uring worker (the `uring` data plane), which then
    /// runs the session's reader and writer and the relay of every connection on it, instead
    /// of tokio's epoll reactor. Defaults to whether the process runs the `uring` data plane.
    pub ring: bool,
    /// The process's graceful shutdown: the session's connections are counted in it and
    /// reset when it cuts them, and the session is closed with a GOAWAY at its end.
    pub drain: Option<Drain>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ping_interval: super::DEFAULT_PING_INTERVAL,
            ping_timeout: super::DEFAULT_PING_TIMEOUT,
            forward_half_close: false,
            half_close_hold: super::DEFAULT_HALF_CLOSE_HOLD,
            half_close_quiet: super::DEFAULT_HALF_CLOSE_QUIET,
            stalls: None,
            metrics: SessionMetrics::default(),
            splice: match super::data_plane() {
                super::DataPlane::Epoll => true,
                super::DataPlane::Uring => super::splice_available(),
                _ => false,
            },
            ring: super::data_plane() == super::DataPlane::Uring,
            drain: None,
        }
    }
}

/// What the session tells one connection.
#[derive(Debug)]
pub enum Inbound {
    Data(Bytes),
    /// `len` payload bytes wait in `pipe` (spliced from upstream), after everything sent before.
    Piped {
        pipe: Arc<Pipe>,
        len: usize,
    },
    Eof,
    Error(String),
    Reset,
}

/// Server role: a client asked for a connection to `port`.
pub struct Incoming {
    pub conn: ConnId,
    pub port: u16,
    pub inbound: queue::Receiver<Inbound>,
}

struct Frame {
    bytes: Bytes,
    /// Payload that follows `bytes` on the wire from a pipe (spliced upload).
    tail: Option<(Arc<Pipe>, usize)>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// One read of a spliced session's reader while the server sends small frames: a frame of
/// 80 KiB or more still has [`super::DOWN_SPLICE_MIN`] left after it, and is spliced. Small
/// reads also keep memory down: with 128 KiB reads, 4,000 idle connections through containerd
/// cost 5.0-5.2 KiB each against 4.2 (freed read buffers stay in the allocator's arenas).
/// A read that fills its buffer doubles the next one, up to [`SMALL_FRAMES_BULK_READ`]; a
/// short one starts again from here.
const SMALL_FRAMES_READ: usize = 16 * 1024;
/// The largest read of a reader taking small frames in bulk (a download through containerd).
const SMALL_FRAMES_BULK_READ: usize = 128 * 1024;

impl Frame {
    fn control(bytes: Bytes) -> Frame {
        Frame {
            bytes,
            tail: None,
            _permit: None,
        }
    }
}

/// A connection's end of the session: its inbound queue, and the pipe its spliced payload
/// goes through while there is some in flight.
struct ConnEntry {
    tx: queue::Sender<Inbound>,
    down: Option<Arc<Pipe>>,
}

struct Shared {
    proto: Mutex<Box<dyn PortForwardProtocol>>,
    out: mpsc::UnboundedSender<Frame>,
    conns: Mutex<HashMap<ConnId, ConnEntry>>,
    budget: Arc<Semaphore>,
    /// Woken whenever a connection is released.
    released: tokio::sync::Notify,
    dead: watch::Sender<Option<Arc<str>>>,
    retiring: AtomicBool,
    /// A plain TCP upstream's socket (owned by the reader and writer tasks), to see a peer
    /// that hung up before the reader has noticed.
    upstream: std::sync::OnceLock<std::sync::Weak<dyn AsFd + Send + Sync>>,
    /// The io_uring worker that runs this session's tasks (the uring plane, plain TCP).
    worker: std::sync::OnceLock<Worker>,
    /// We ended the session ourselves (GOAWAY / close frame sent): the reader drains what the
    /// peer still sends instead of closing under it, so our last frames are not lost to a TCP
    /// reset (closing a socket with unread input resets it and discards unsent output).
    closing: AtomicBool,
    /// The peer said goodbye (GOAWAY / WebSocket close) before the session ended.
    peer_closed: AtomicBool,
    /// Reader is waiting for a slow local client: silence upstream is then our doing.
    reader_blocked: AtomicBool,
    last_rx_ms: AtomicU64,
    /// The PING in flight (its id, when it left), to time its answer.
    ping: Mutex<Option<(u32, Instant)>>,
    started: Instant,
    max_payload: usize,
    /// Payload moves with splice (see [`SessionOptions::splice`]); fixed when the tasks start.
    splice: AtomicBool,
    /// The writer has stopped: whatever was queued at the end (a GOAWAY) is with the kernel.
    written_out: watch::Sender<bool>,
    opts: SessionOptions,
}

/// The channel ends the tasks own, between [`Session::new`] and [`Session::spawn`].
struct TaskEnds {
    out_rx: mpsc::UnboundedReceiver<Frame>,
    incoming_tx: mpsc::Sender<Incoming>,
}

/// A running upstream session. Cheap to clone; the tasks stop when it dies.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

/// A session that does not keep it alive (for [`Drain`]'s list).
pub(super) struct WeakSession(std::sync::Weak<Shared>);

impl WeakSession {
    pub(super) fn upgrade(&self) -> Option<Session> {
        self.0.upgrade().map(|shared| Session { shared })
    }

    pub(super) fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }
}

impl Session {
    /// Start driving `io` with `proto`. `prefix` is input already read from `io` (bytes that
    /// arrived with the HTTP upgrade response). Returns the session and, for a server-role
    /// protocol, the stream of incoming connection requests.
    pub fn start(
        io: impl Into<UpstreamConn>,
        prefix: Bytes,
        proto: Box<dyn PortForwardProtocol>,
        opts: SessionOptions,
    ) -> (Session, mpsc::Receiver<Incoming>) {
        let (session, ends, incoming_rx) = Session::new(proto, opts);
        session.spawn(io.into(), prefix, ends);
        (session, incoming_rx)
    }

    /// Client role: start a session whose first connection, to `port`, is open before a byte
    /// is read. For protocols that fix their connections at the upgrade (WebSocket v4, where
    /// the server dials at once and may answer with an error and a close straight away), so
    /// that answer reaches the connection instead of finding nobody registered.
    pub fn start_with_conn(
        io: impl Into<UpstreamConn>,
        prefix: Bytes,
        proto: Box<dyn PortForwardProtocol>,
        opts: SessionOptions,
        port: u16,
    ) -> Result<(Session, ConnId, queue::Receiver<Inbound>), RelayError> {
        let (session, ends, _) = Session::new(proto, opts);
        let (conn, inbound) = session.open(port)?;
        session.spawn(io.into(), prefix, ends);
        Ok((session, conn, inbound))
    }

    fn new(
        proto: Box<dyn PortForwardProtocol>,
        opts: SessionOptions,
    ) -> (Session, TaskEnds, mpsc::Receiver<Incoming>) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let max_payload = proto.max_payload().min(super::READ_BUF);
        let shared = Arc::new(Shared {
            proto: Mutex::new(proto),
            out: out_tx,
            conns: Mutex::new(HashMap::new()),
            budget: Arc::new(Semaphore::new(SESSION_WRITE_BUDGET)),
            released: tokio::sync::Notify::new(),
            dead: watch::channel(None).0,
            retiring: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
            reader_blocked: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(0),
            ping: Mutex::new(None),
            started: Instant::now(),
            max_payload,
            splice: AtomicBool::new(false),
            upstream: std::sync::OnceLock::new(),
            worker: std::sync::OnceLock::new(),
            written_out: watch::channel(false).0,
            opts,
        });
        shared.opts.metrics.started();
        if let Some(d) = &shared.opts.drain {
            d.register(WeakSession(Arc::downgrade(&shared)));
        }
        let ends = TaskEnds {
            out_rx,
            incoming_tx,
        };
        (Session { shared }, ends, incoming_rx)
    }

    /// The reader, the writer and the keepalive.
    fn spawn(&self, io: UpstreamConn, prefix: Bytes, ends: TaskEnds) {
        let TaskEnds {
            out_rx,
            incoming_tx,
        } = ends;
        if matches!(io, UpstreamConn::Tcp(_)) {
            // Splice needs a plain TCP upstream and a protocol whose payload it may move.
            let splice = self.shared.opts.splice && self.proto().read_hint(&[]).is_some();
            self.shared.splice.store(splice, Ordering::Release);
        }
        match io {
            // On the io_uring plane a plain TCP upstream leaves tokio's reactor for a worker,
            // which then runs the reader, the writer and every connection's relay.
            UpstreamConn::Tcp(tcp) if self.shared.opts.ring => {
                let ring = super::uring::worker::pick()
                    .and_then(|w| Ok((w, RingSocket::from_tokio(tcp)?)));
                match ring {
                    Ok((worker, sock)) => {
                        let _ = self.shared.worker.set(worker);
                        self.spawn_tcp(sock, prefix, out_rx, incoming_tx, |f| {
                            worker.spawn_detached(f)
                        });
                    }
                    Err(e) => self.die(RelayError::Io(e)),
                }
            }
            UpstreamConn::Tcp(tcp) => {
                self.spawn_tcp(tcp, prefix, out_rx, incoming_tx, |f| {
                    tokio::spawn(f);
                });
            }
            UpstreamConn::Stream(io) => {
                let (rd, wr) = tokio::io::split(io);
                let s = self.clone();
                tokio::spawn(async move {
                    let res = s.read_loop(rd, prefix, incoming_tx).await;
                    s.die(res.err().unwrap_or(RelayError::UpstreamClosed));
                });
                let s = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = s.write_loop(StreamWriter(wr), out_rx).await {
                        s.die(e);
                    }
                    s.shared.written_out.send_replace(true);
                });
            }
        }
        let s = self.clone();
        tokio::spawn(async move { s.keepalive().await });
    }

    /// The reader and the writer of a plain TCP upstream, started with `spawn`.
    fn spawn_tcp<S: Socket>(
        &self,
        sock: S,
        prefix: Bytes,
        out_rx: mpsc::UnboundedReceiver<Frame>,
        incoming_tx: mpsc::Sender<Incoming>,
        spawn: impl Fn(BoxFuture),
    ) {
        let sock = Arc::new(sock);
        let weak: std::sync::Weak<dyn AsFd + Send + Sync> = Arc::downgrade(&sock) as _;
        let _ = self.shared.upstream.set(weak);
        let s = self.clone();
        let rd = sock.clone();
        spawn(Box::pin(async move {
            let res = s.read_loop_tcp(&*rd, prefix, incoming_tx).await;
            s.die(res.err().unwrap_or(RelayError::UpstreamClosed));
        }));
        let s = self.clone();
        spawn(Box::pin(async move {
            if let Err(e) = s.write_loop(TcpWriter(sock), out_rx).await {
                s.die(e);
            }
            s.shared.written_out.send_replace(true);
        }));
    }

    /// The io_uring worker this session's tasks and connections run on, if it has one.
    pub fn worker(&self) -> Option<Worker> {
        self.shared.worker.get().copied()
    }

    fn proto(&self) -> MutexGuard<'_, Box<dyn PortForwardProtocol>> {
        self.shared.proto.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue what the protocol wants sent. Called with the protocol lock held.
    fn flush(&self, p: &mut Box<dyn PortForwardProtocol>) {
        while let Some(bytes) = p.poll_transmit() {
            let _ = self.shared.out.send(Frame::control(bytes));
        }
    }

    fn register(&self, conn: ConnId) -> queue::Receiver<Inbound> {
        let (tx, rx) = queue::channel(CONN_QUEUE_FRAMES);
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, ConnEntry { tx, down: None });
        rx
    }

    /// Forget a connection's inbound queue (the connection task is done with it). A retired
    /// session ends once its last connection is released.
    pub fn release(&self, conn: ConnId) {
        let idle = {
            let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.remove(&conn);
            conns.is_empty()
        };
        // A reader waiting for this connection's pipe to drain waits no more.
        self.shared.released.notify_waiters();
        if idle && self.shared.retiring.load(Ordering::Acquire) {
            self.shutdown();
        }
    }

    /// The session ended in order: we or the peer closed it (GOAWAY, WebSocket close, end of
    /// stream) rather than it failing (I/O error, protocol error, silence).
    pub fn ended_in_order(&self) -> bool {
        self.shared.closing.load(Ordering::Acquire)
            || self.shared.peer_closed.load(Ordering::Acquire)
    }

    /// Why the session died, once it has.
    pub fn dead_reason(&self) -> Option<Arc<str>> {
        self.shared.dead.borrow().clone()
    }

    /// Resolves when the session dies.
    pub fn watch_dead(&self) -> watch::Receiver<Option<Arc<str>>> {
        self.shared.dead.subscribe()
    }

    /// Resolves once the session's writer has stopped: after [`close`](Self::close), its
    /// goodbye is out.
    pub async fn written_out(&self) {
        let mut rx = self.shared.written_out.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Count a connection of this session in the process's [`Drain`], if there is one.
    pub fn track(&self) -> Option<Open> {
        self.shared.opts.drain.as_ref().map(Drain::track)
    }

    /// Resolves when the process's shutdown cuts the connections still open (never without a
    /// [`Drain`]).
    pub fn cut(&self) -> impl Future<Output = ()> + Send + 'static {
        let cut = self.shared.opts.drain.as_ref().map(Drain::cut);
        async move {
            match cut {
                Some(cut) => cut.await,
                None => std::future::pending().await,
            }
        }
    }

    /// The process is shutting down: take no new connections from upstream.
    pub fn draining(&self) -> bool {
        self.shared
            .opts
            .drain
            .as_ref()
            .is_some_and(Drain::is_draining)
    }

    /// Usable for new connections: alive and not retired.
    pub fn is_usable(&self) -> bool {
        self.dead_reason().is_none()
            && !self.shared.retiring.load(Ordering::Acquire)
            && !self.upstream_hung_up()
    }

    /// The upstream socket has seen the peer's end of file or a reset that the reader has not
    /// acted on yet (it runs as a task, maybe on another thread). A connection handed to such a session would be lost with it, so a
    /// pool must not pick it (seen: a network cut ended two pooled sessions, and the next
    /// connection was put on the one whose reader had not run yet).
    fn upstream_hung_up(&self) -> bool {
        self.shared
            .upstream
            .get()
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|sock| super::backend::hung_up(&*sock))
    }

    /// Take no new connections on this session; it ends when the last one is released.
    pub fn retire(&self) {
        self.shared.retiring.store(true, Ordering::Release);
        if self.active_conns() == 0 {
            self.shutdown();
        }
    }

    pub fn forward_half_close(&self) -> bool {
        self.shared.opts.forward_half_close
    }

    pub fn half_close_hold(&self) -> Duration {
        self.shared.opts.half_close_hold
    }

    pub fn half_close_quiet(&self) -> Duration {
        self.shared.opts.half_close_quiet
    }

    /// Whether a half-close reaches the server (not on WebSocket v4).
    pub fn half_close_on_wire(&self) -> bool {
        self.proto().half_close_on_wire()
    }

    /// Connections [`open`](Self::open) would still accept: zero once the session is dead or
    /// retired, or at its stream limit.
    pub fn conn_capacity(&self) -> usize {
        if !self.is_usable() {
            return 0;
        }
        self.proto().conn_capacity()
    }

    /// The reader is waiting for a slow local client: every other connection of this session
    /// waits with it.
    pub fn is_stalled(&self) -> bool {
        self.shared.reader_blocked.load(Ordering::Relaxed)
    }

    /// The same session (not just the same kind).
    pub fn same(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Largest payload per frame for this session.
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload
    }

    /// Connections with a registered inbound queue.
    pub fn active_conns(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Client role: open a connection to `port`.
    pub fn open(&self, port: u16) -> Result<(ConnId, queue::Receiver<Inbound>), RelayError> {
        if let Some(reason) = self.dead_reason() {
            return Err(RelayError::GoAway(reason.to_string()));
        }
        let mut p = self.proto();
        let conn = p.open(port)?;
        let rx = self.register(conn);
        self.flush(&mut p);
        Ok((conn, rx))
    }

    /// Send the payload in `buf[HEADROOM..]` on `conn`. `buf` is emptied (its remaining
    /// capacity stays with the caller for the next read).
    pub async fn send_data(&self, conn: ConnId, buf: &mut BytesMut) -> Result<(), RelayError> {
        let len = buf.len() - HEADROOM;
        let permit = (self.payload_permit(len).await).map_err(|_| RelayError::SessionClosed)?;
        self.frame_and_queue(permit, |p| {
            let off = p.frame_data(conn, &mut buf[..], len)?;
            Ok(buf.split().freeze().slice(off..))
        })
    }

    /// [`send_data`](Self::send_data) for bytes the ring received into one of its provided
    /// buffers: framed in the buffer's headroom, which goes back to the ring once written.
    pub async fn send_pooled(
        &self,
        conn: ConnId,
        mut buf: super::uring::PoolBuf,
    ) -> Result<(), RelayError> {
        let len = buf.len();
        let permit = (self.payload_permit(len).await).map_err(|_| RelayError::SessionClosed)?;
        self.frame_and_queue(permit, move |p| {
            let off = p.frame_data(conn, buf.framed_mut(), len)?;
            Ok(Bytes::from_owner(buf).slice(off..))
        })
    }

    /// Room for `len` payload bytes in the session's budget (the semaphore's own future, not
    /// an async fn around it: one less layer in every connection's future).
    fn payload_permit(
        &self,
        len: usize,
    ) -> impl Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + use<> {
        self.shared.budget.clone().acquire_many_owned(len as u32)
    }

    /// Queue the DATA frame `frame` makes, with the protocol lock held (so frames keep the
    /// protocol's order). Not async: the callers' futures stay small (every idle connection
    /// carries one).
    fn frame_and_queue(
        &self,
        permit: OwnedSemaphorePermit,
        frame: impl FnOnce(&mut Box<dyn PortForwardProtocol>) -> Result<Bytes, ProtoError>,
    ) -> Result<(), RelayError> {
        let mut p = self.proto();
        if self.dead_reason().is_some() {
            return Err(RelayError::SessionClosed);
        }
        let bytes = frame(&mut p)?;
        self.shared
            .out
            .send(Frame {
                bytes,
                tail: None,
                _permit: Some(permit),
            })
            .map_err(|_| RelayError::SessionClosed)?;
        Ok(())
    }

    /// Payload may move with splice on this session (see [`SessionOptions::splice`]).
    pub fn can_splice(&self) -> bool {
        self.shared.splice.load(Ordering::Acquire)
    }

    /// Send the `len` bytes at the front of `pipe` on `conn` (spliced from the local socket).
    /// They stay counted in the pipe's fill until the writer has spliced them out.
    pub async fn send_spliced(
        &self,
        conn: ConnId,
        pipe: &Arc<Pipe>,
        len: usize,
    ) -> Result<(), RelayError> {
        let permit = self
            .shared
            .budget
            .clone()
            .acquire_many_owned(len as u32)
            .await
            .map_err(|_| RelayError::SessionClosed)?;
        let mut p = self.proto();
        if self.dead_reason().is_some() {
            return Err(RelayError::SessionClosed);
        }
        let Some(bytes) = p.payload_header(conn, len)? else {
            return Err(RelayError::Proto(ProtoError::Unsupported(
                "spliced payload",
            )));
        };
        self.shared
            .out
            .send(Frame {
                bytes,
                tail: Some((pipe.clone(), len)),
                _permit: Some(permit),
            })
            .map_err(|_| RelayError::SessionClosed)?;
        Ok(())
    }

    /// The pipe `conn`'s downloaded payload is spliced into: the one in use, or a new one.
    /// `None` when the connection is gone or no pipe can be made (out of descriptors): the
    /// payload is then read and copied instead.
    fn down_pipe(&self, conn: ConnId) -> Option<Arc<Pipe>> {
        let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        let entry = conns.get_mut(&conn)?;
        if entry.down.is_none() {
            entry.down = Some(Arc::new(Pipe::new().ok()?));
        }
        entry.down.clone()
    }

    /// `pipe` is still where `conn`'s payload goes (the connection has not been released).
    fn has_pipe(&self, conn: ConnId, pipe: &Arc<Pipe>) -> bool {
        let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .get(&conn)
            .and_then(|e| e.down.as_ref())
            .is_some_and(|d| Arc::ptr_eq(d, pipe))
    }

    /// `conn` has spliced everything out of `pipe`: close it unless more is on the way, so an
    /// idle connection holds no pipe. Race-free with the reader, which takes its reference
    /// under the same lock: then there are more than two.
    pub fn pipe_drained(&self, conn: ConnId, pipe: &Arc<Pipe>) {
        let mut conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get_mut(&conn)
            && entry.down.as_ref().is_some_and(|d| Arc::ptr_eq(d, pipe))
            && Arc::strong_count(pipe) == 2
            && pipe.fill() == 0
        {
            entry.down = None;
        }
    }

    pub fn close_write(&self, conn: ConnId) -> Result<(), RelayError> {
        let mut p = self.proto();
        p.close_write(conn)?;
        self.flush(&mut p);
        Ok(())
    }

    pub fn reset(&self, conn: ConnId) {
        {
            let mut p = self.proto();
            p.reset(conn);
            self.flush(&mut p);
        }
        self.release(conn);
    }

    pub fn fail(&self, conn: ConnId, message: &str) {
        {
            let mut p = self.proto();
            p.fail(conn, message);
            self.flush(&mut p);
        }
        self.release(conn);
    }

    pub fn finish(&self, conn: ConnId) {
        {
            let mut p = self.proto();
            p.finish(conn);
            self.flush(&mut p);
        }
        self.release(conn);
    }

    /// End the session once its connections are done (at once if it has none).
    pub fn close(&self) {
        self.retire();
    }

    /// Say goodbye (GOAWAY / WebSocket close) and stop the session's tasks.
    fn shutdown(&self) {
        if self.dead_reason().is_some() {
            return;
        }
        {
            let mut p = self.proto();
            p.goaway();
            self.flush(&mut p);
        }
        self.shared.closing.store(true, Ordering::Release);
        self.die(RelayError::SessionClosed);
    }

    fn die(&self, err: RelayError) {
        let reason: Arc<str> = err.to_string().into();
        let first = self.shared.dead.send_if_modified(|d| {
            if d.is_none() {
                *d = Some(reason.clone());
                true
            } else {
                false
            }
        });
        if first {
            let failure = (!self.ended_in_order())
                .then(|| err.failure_kind())
                .flatten();
            self.shared.opts.metrics.ended(failure);
            tracing::debug!("session ended: {reason}");
            self.shared.budget.close();
            // Dropping the senders ends every connection's inbound queue: they reset.
            self.shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    fn now_ms(&self) -> u64 {
        self.shared.started.elapsed().as_millis() as u64
    }

    async fn read_loop<R: AsyncRead>(
        &self,
        rd: tokio::io::ReadHalf<R>,
        prefix: Bytes,
        incoming: mpsc::Sender<Incoming>,
    ) -> Result<(), RelayError> {
        let mut rd = rd;
        let mut dead = self.watch_dead();
        let mut buf = BytesMut::with_capacity(READ_BUF);
        buf.extend_from_slice(&prefix);
        loop {
            self.handle_buffered(&mut buf, &incoming).await?;
            if buf.capacity() - buf.len() < READ_BUF / 4 {
                buf.reserve(READ_BUF);
            }
            let n = tokio::select! {
                n = rd.read_buf(&mut buf) => n?,
                _ = dead.changed() => {
                    if self.shared.closing.load(Ordering::Acquire) {
                        drain(&mut rd).await;
                    }
                    return Ok(());
                }
            };
            if n == 0 {
                return Err(RelayError::UpstreamClosed);
            }
            self.shared
                .last_rx_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The reader for a plain TCP upstream. Copying (every backend): it reads as much as the
    /// socket has, up to [`READ_BUF`], into one buffer whose frames' payload goes to the
    /// connections as slices of it. Splicing (the epoll backend, SPDY): frame headers and
    /// control frames are read into `buf` (never further, see
    /// [`PortForwardProtocol::read_hint`]) and a connection's payload is spliced from the
    /// socket into its pipe and handed over as [`Inbound::Piped`]; a server that sends small
    /// frames (under [`super::DOWN_SPLICE_MIN`] left) has them read several at a time and
    /// copied instead, until a large one shows up.
    ///
    /// Reads start at [`SMALL_FRAMES_READ`] and double after each one that fills its buffer
    /// (up to [`READ_BUF`] copying, [`SMALL_FRAMES_BULK_READ`] for small frames), so that an
    /// idle or interactive session holds little memory and a download still reads in bulk.
    async fn read_loop_tcp<S: Socket>(
        &self,
        sock: &S,
        prefix: Bytes,
        incoming: mpsc::Sender<Incoming>,
    ) -> Result<(), RelayError> {
        let mut dead = self.watch_dead();
        let splice = self.can_splice();
        // The server sends small frames (containerd: 32 KiB at most): read them freely and
        // copy, as the copy plane does, instead of a header read and a splice per frame.
        let mut small_frames = false;
        // Part of the frame in progress was spliced (its remainder may be small: keep going).
        let mut frame_spliced = false;
        let mut read = SMALL_FRAMES_READ;
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(&prefix);
        loop {
            self.handle_buffered(&mut buf, &incoming).await?;
            let moving = match splice && buf.is_empty() {
                true => self.proto().payload_in_progress(),
                false => None,
            };
            match moving {
                None => frame_spliced = false,
                Some((_, left)) if left >= super::DOWN_SPLICE_MIN => small_frames = false,
                Some(_) if !frame_spliced => small_frames = true,
                Some(_) => {}
            }
            if let Some((conn, left)) = moving
                && !small_frames
                && left >= super::SPLICE_MIN
                && let Some(pipe) = self.down_pipe(conn)
            {
                let n = tokio::select! {
                    n = sock.splice_in(&pipe, left) => n?,
                    _ = dead.changed() => return Ok(()),
                };
                let n = match n {
                    SpliceIn::Moved(n) => n,
                    SpliceIn::Eof => return Err(RelayError::UpstreamClosed),
                    SpliceIn::Full => {
                        // The local client is not keeping up: as with a full queue, stop
                        // reading until it does, or until its connection is gone (then the
                        // rest of the payload is read and dropped on the next turn).
                        let gone = self.shared.released.notified();
                        tokio::pin!(gone);
                        gone.as_mut().enable();
                        if self.has_pipe(conn, &pipe) {
                            tokio::select! {
                                _ = self.stalled(pipe.drained()) => {}
                                _ = gone => {}
                                _ = dead.changed() => return Ok(()),
                            }
                        }
                        continue;
                    }
                };
                self.touch_rx();
                frame_spliced = true;
                {
                    let mut p = self.proto();
                    p.payload_moved(n)?;
                    self.flush(&mut p);
                }
                self.deliver(conn, Inbound::Piped { pipe, len: n }).await;
                continue;
            }
            let want = match (splice, small_frames) {
                (true, false) => self
                    .proto()
                    .read_hint(&buf)
                    .unwrap_or(READ_BUF)
                    .clamp(1, READ_BUF),
                // Small frames: several per read, but never so much of a large frame that
                // what is left of it could not be spliced (this is how a large one is seen).
                (true, true) => read.min(SMALL_FRAMES_BULK_READ),
                (false, _) => read,
            };
            let n = tokio::select! {
                n = receive(sock, &mut buf, want) => n?,
                _ = dead.changed() => {
                    if self.shared.closing.load(Ordering::Acquire) {
                        let _ = super::uring::worker::timeout(super::LINGER, async {
                            let mut sink = BytesMut::with_capacity(16 * 1024);
                            loop {
                                sink.clear();
                                sink.reserve(16 * 1024);
                                match sock.recv(&mut sink, 16 * 1024).await {
                                    Ok(n) if n > 0 => {}
                                    _ => break,
                                }
                            }
                        })
                        .await;
                    }
                    return Ok(());
                }
            };
            if n == 0 {
                return Err(RelayError::UpstreamClosed);
            }
            read = match n == want {
                true => (read * 2).min(READ_BUF),
                false => SMALL_FRAMES_READ,
            };
            self.touch_rx();
        }
    }

    /// Hand every complete event in `buf` to its connection (both readers).
    async fn handle_buffered(
        &self,
        buf: &mut BytesMut,
        incoming: &mpsc::Sender<Incoming>,
    ) -> Result<(), RelayError> {
        loop {
            let ev = {
                let mut p = self.proto();
                let ev = p.handle_input(buf)?;
                self.flush(&mut p);
                ev
            };
            match ev {
                Some(ev) => self.dispatch(ev, incoming).await,
                None => return Ok(()),
            }
        }
    }

    fn touch_rx(&self) {
        self.shared
            .last_rx_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Wait for `f` as a reader held up by a slow local client (the only brake on a server
    /// that does no flow control): counted as a stall, and silence upstream meanwhile is ours.
    async fn stalled<F: std::future::Future>(&self, f: F) -> F::Output {
        /// Ends the stall also when the wait is abandoned (the session died meanwhile).
        struct Stall<'a>(&'a Session, Instant);
        impl Drop for Stall<'_> {
            fn drop(&mut self) {
                let shared = &self.0.shared;
                if let Some(w) = shared.opts.stalls.as_ref() {
                    w.send_modify(|n| *n -= 1);
                }
                shared.opts.metrics.stall_end(self.1.elapsed());
                shared.reader_blocked.store(false, Ordering::Relaxed);
                self.0.touch_rx();
            }
        }
        self.shared.reader_blocked.store(true, Ordering::Relaxed);
        self.shared.opts.metrics.stall_begin();
        if let Some(w) = self.shared.opts.stalls.as_ref() {
            w.send_modify(|n| *n += 1);
        }
        let _stall = Stall(self, Instant::now());
        f.await
    }

    async fn deliver(&self, conn: ConnId, msg: Inbound) {
        let tx = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&conn)
            .map(|e| e.tx.clone());
        let Some(tx) = tx else { return };
        let msg = match tx.try_send(msg) {
            Ok(()) => return,
            Err(queue::TrySendError::Closed(_)) => {
                self.reset(conn);
                return;
            }
            Err(queue::TrySendError::Full(msg)) => msg,
        };
        // The local client is slower than upstream; the peer does no flow control, so the only
        // brake is to stop reading the session until this connection catches up.
        if self.stalled(tx.send(msg)).await.is_err() {
            self.reset(conn);
        }
    }

    async fn dispatch(&self, ev: Event, incoming: &mpsc::Sender<Incoming>) {
        match ev {
            Event::Data { conn, data } => self.deliver(conn, Inbound::Data(data)).await,
            Event::Eof { conn } => self.deliver(conn, Inbound::Eof).await,
            Event::Error { conn, message } => self.deliver(conn, Inbound::Error(message)).await,
            Event::Reset { conn } => self.deliver(conn, Inbound::Reset).await,
            Event::Incoming { conn, port } => {
                let inbound = self.register(conn);
                if incoming
                    .send(Incoming {
                        conn,
                        port,
                        inbound,
                    })
                    .await
                    .is_err()
                {
                    self.fail(conn, "ringfwd serve is shutting down");
                }
            }
            Event::Pong { id } => {
                let mut ping = self.shared.ping.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((sent_id, at)) = *ping
                    && sent_id == id
                {
                    *ping = None;
                    self.shared.opts.metrics.ping_rtt(at.elapsed());
                }
            }
            Event::GoAway { message } => {
                tracing::debug!("upstream sent GOAWAY: {message}");
                self.shared.peer_closed.store(true, Ordering::Release);
                self.retire();
            }
        }
    }

    async fn write_loop(
        &self,
        mut wr: impl FrameWriter,
        mut rx: mpsc::UnboundedReceiver<Frame>,
    ) -> Result<(), RelayError> {
        let mut dead = self.watch_dead();
        let mut batch: Vec<Frame> = Vec::with_capacity(64);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, 64) => n,
                _ = dead.changed() => 0,
            };
            if n == 0 {
                // Whatever was queued before the end (a GOAWAY, resets) still goes out.
                while let Ok(f) = rx.try_recv() {
                    batch.push(f);
                }
                let _ = wr.write_frames(&batch).await;
                wr.shutdown().await;
                return Ok(());
            }
            wr.write_frames(&batch).await?;
            batch.clear();
        }
    }

    async fn keepalive(&self) {
        let opts = &self.shared.opts;
        let mut dead = self.watch_dead();
        let mut tick = tokio::time::interval(opts.ping_interval.min(opts.ping_timeout / 2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = dead.changed() => return,
            }
            let idle = Duration::from_millis(
                self.now_ms() - self.shared.last_rx_ms.load(Ordering::Relaxed),
            );
            if self.shared.reader_blocked.load(Ordering::Relaxed) {
                continue;
            }
            if idle >= opts.ping_timeout {
                self.die(RelayError::Unresponsive(idle));
                return;
            }
            if idle >= opts.ping_interval {
                let mut p = self.proto();
                let id = p.ping();
                // Timed from when it is queued: the writer sends it next, behind any data.
                *self.shared.ping.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((id, Instant::now()));
                self.flush(&mut p);
            }
        }
    }
}

/// After our goodbye: read and discard until the peer closes too (or [`super::LINGER`]
/// passes), the way a lingering close works, so that the peer reads everything we sent.
async fn drain<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut sink = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(super::LINGER, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Where the writer task puts frames: a byte stream, or a TCP socket it may splice into.
trait FrameWriter: Send {
    /// Write every frame of `batch` (and its spliced tail) in order; done when the bytes are
    /// with the kernel.
    fn write_frames(
        &mut self,
        batch: &[Frame],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// Any upstream byte stream (TLS, the WebSocket tunnel): copies only.
struct StreamWriter(tokio::io::WriteHalf<Box<dyn super::UpstreamIo>>);

impl FrameWriter for StreamWriter {
    async fn write_frames(&mut self, batch: &[Frame]) -> std::io::Result<()> {
        debug_assert!(batch.iter().all(|f| f.tail.is_none()));
        write_all_frames(&mut self.0, batch).await?;
        // A TLS stream or the WebSocket tunnel may accept a write into its own buffer and
        // send the tail later; nothing else would push that tail out while this task waits
        // for the next frame, so a last batch (the end of an upload, a PING) could sit there.
        self.0.flush().await
    }

    async fn shutdown(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// A plain TCP upstream: frames leave with `sendmsg`, many per call, a spliced payload right
/// behind its header (which is sent with `MSG_MORE`, so both leave in the same segments).
struct TcpWriter<S>(Arc<S>);

impl<S: Socket> FrameWriter for TcpWriter<S> {
    async fn write_frames(&mut self, batch: &[Frame]) -> std::io::Result<()> {
        let sock = &*self.0;
        let mut start = 0;
        for (i, f) in batch.iter().enumerate() {
            if let Some((pipe, len)) = &f.tail {
                send_all(sock, bytes_of(&batch[start..=i]), true).await?;
                let more = i + 1 < batch.len();
                sock.splice_out(pipe, *len, more).await?;
                start = i + 1;
            }
        }
        send_all(sock, bytes_of(&batch[start..]), false).await
    }

    async fn shutdown(&mut self) {
        let _ = super::backend::shutdown_write(&*self.0);
    }
}

/// The bytes of `frames` (not their spliced tails), to send.
fn bytes_of(frames: &[Frame]) -> Vec<Bytes> {
    frames.iter().map(|f| f.bytes.clone()).collect()
}

/// Receive up to `want` bytes into `buf`. When it is empty, into a buffer the backend picks
/// as they arrive, if it has such buffers (io_uring), and copied: a session waiting for a
/// quiet server then holds no buffer (32 sessions of a forward would otherwise keep up to
/// 256 KiB each after a burst).
async fn receive<S: Socket>(sock: &S, buf: &mut BytesMut, want: usize) -> std::io::Result<usize> {
    if buf.is_empty() {
        match sock.recv_pooled(want).await? {
            Some(Received::Data(b)) => {
                let data = &b.as_ref()[HEADROOM..];
                *buf = BytesMut::from(data);
                return Ok(data.len());
            }
            Some(Received::Eof) => return Ok(0),
            None => {}
        }
    }
    buf.reserve(want);
    sock.recv(buf, want).await
}

/// Write every frame of `batch`, several per syscall.
async fn write_all_frames<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &[Frame],
) -> std::io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < batch.len() {
        let mut slices: [IoSlice<'_>; 64] = [IoSlice::new(&[]); 64];
        let mut k = 0;
        for (j, f) in batch[i..].iter().enumerate().take(64) {
            slices[k] = IoSlice::new(if j == 0 {
                &f.bytes[off..]
            } else {
                &f.bytes[..]
            });
            k += 1;
        }
        let mut n = wr.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = batch[i].bytes.len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        // Skip empty frames so the loop cannot spin on them.
        while i < batch.len() && batch[i].bytes.len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::portforward::SpdyPortForward;
    use tokio::io::{BufWriter, duplex};
    use tokio::net::TcpStream;

    fn stream(io: impl super::super::UpstreamIo) -> UpstreamConn {
        UpstreamConn::Stream(Box::new(io))
    }

    /// The writer must flush: over a stream that holds written bytes until flushed (TLS, the
    /// WebSocket tunnel, here a `BufWriter`), a small last batch would otherwise never leave.
    #[tokio::test]
    async fn small_frames_leave_a_buffering_stream() {
        let (client, server) = duplex(1 << 20);
        let opts = SessionOptions::default();
        let (client, _) = Session::start(
            stream(BufWriter::with_capacity(64 * 1024, client)),
            Bytes::new(),
            Box::new(SpdyPortForward::client()),
            opts.clone(),
        );
        let (_server, mut incoming) = Session::start(
            stream(server),
            Bytes::new(),
            Box::new(SpdyPortForward::server()),
            opts,
        );
        let (conn, _inbound) = client.open(8080).unwrap();
        let mut payload = BytesMut::zeroed(HEADROOM);
        payload.extend_from_slice(b"hello");
        client.send_data(conn, &mut payload).await.unwrap();
        let mut got = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
            .await
            .expect("the stream request never left the client")
            .expect("server session ended");
        assert_eq!(got.port, 8080);
        let data = tokio::time::timeout(Duration::from_secs(5), got.inbound.recv())
            .await
            .expect("the data never left the client");
        assert!(matches!(data, Some(Inbound::Data(b)) if &b[..] == b"hello"));
    }

    /// A client session and a splicing server session (the epoll splice path: the ring copies
    /// payload by default) over loopback TCP; `None` (said on stderr) where splice is not
    /// available. `stalls` goes to the server's options.
    async fn spliced_sessions(
        client: SpdyPortForward,
        stalls: Option<Arc<watch::Sender<usize>>>,
    ) -> Option<(Session, Session, mpsc::Receiver<Incoming>)> {
        if !crate::relay::splice_available() {
            eprintln!("splice not available here: skipped");
            return None;
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (srv, _) = l.accept().await.unwrap();
        let opts = SessionOptions {
            splice: true,
            ring: false,
            ..SessionOptions::default()
        };
        let (client, _) = Session::start(c, Bytes::new(), Box::new(client), opts.clone());
        let server_opts = SessionOptions { stalls, ..opts };
        let (server, incoming) = Session::start(
            srv,
            Bytes::new(),
            Box::new(SpdyPortForward::server()),
            server_opts,
        );
        assert!(server.can_splice());
        Some((client, server, incoming))
    }

    /// Splicing reader: a server that sends containerd-sized DATA frames (32 KiB) has them
    /// copied (read several at once), and once it sends large ones (256 KiB, as `ringfwd
    /// serve`) their payload is spliced again.
    #[tokio::test]
    async fn small_frames_are_copied_and_large_ones_spliced() {
        let Some((client, _server, mut incoming)) =
            spliced_sessions(SpdyPortForward::client(), None).await
        else {
            return;
        };
        let (a, _a_rx) = client.open(1).unwrap();
        let send = |size: usize, count: usize| {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..count {
                    let mut buf = BytesMut::zeroed(HEADROOM + size);
                    client.send_data(a, &mut buf).await.unwrap();
                }
            })
        };
        let small = 64;
        send(32 * 1024, small).await.unwrap();
        let mut got = incoming.recv().await.unwrap();
        let mut copied = 0;
        while copied < small * 32 * 1024 {
            match got.inbound.recv().await.unwrap() {
                Inbound::Data(b) => copied += b.len(),
                _ => panic!("a 32 KiB frame's payload was not copied (after {copied} bytes)"),
            }
        }
        // Spliced payload goes on to a socket, as a connection's relay would send it.
        let (sink, mut drain) = crate::relay::tests::pair().await;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 20];
            while tokio::io::AsyncReadExt::read(&mut drain, &mut buf)
                .await
                .unwrap_or(0)
                > 0
            {}
        });
        let large = send(256 * 1024, 8);
        let mut spliced = false;
        let mut seen = 0;
        while seen < 8 * 256 * 1024 {
            match got.inbound.recv().await.unwrap() {
                Inbound::Data(b) => seen += b.len(),
                Inbound::Piped { pipe, len } => {
                    crate::relay::backend::epoll::splice_out(&sink, &pipe, len, false)
                        .await
                        .unwrap();
                    seen += len;
                    spliced = true;
                }
                _ => panic!("unexpected inbound message"),
            }
        }
        large.await.unwrap();
        assert!(spliced, "no payload of a 256 KiB frame was spliced");
    }

    /// Splicing server: a connection whose pipe filled up and whose relay then ended (its
    /// target reset) must not hold the session's reader: the rest of its payload is dropped
    /// and another connection on the same session still works.
    #[tokio::test]
    async fn a_released_connection_does_not_hold_the_spliced_reader() {
        let stalls = Arc::new(watch::channel(0usize).0);
        let Some((client, server, mut incoming)) = spliced_sessions(
            SpdyPortForward::client().with_immediate_eof(),
            Some(stalls.clone()),
        )
        .await
        else {
            return;
        };
        let (a, _a_rx) = client.open(1).unwrap();
        let uploader = {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..64 {
                    let mut buf = BytesMut::zeroed(HEADROOM + 256 * 1024);
                    if client.send_data(a, &mut buf).await.is_err() {
                        return;
                    }
                }
            })
        };
        let got_a = incoming.recv().await.unwrap();
        // Nobody drains A's pipe: the reader stalls on it.
        let mut w = stalls.subscribe();
        tokio::time::timeout(Duration::from_secs(10), w.wait_for(|n| *n > 0))
            .await
            .expect("the reader never stalled on the full pipe")
            .unwrap();
        // A's target goes away: its relay reports it and lets go.
        server.fail(got_a.conn, "target reset");
        drop(got_a.inbound);
        let (b, _b_rx) = client.open(2).unwrap();
        let mut hello = BytesMut::zeroed(HEADROOM);
        hello.extend_from_slice(b"hello");
        client.send_data(b, &mut hello).await.unwrap();
        let mut got_b = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let i = incoming.recv().await.unwrap();
                if i.port == 2 {
                    return i;
                }
            }
        })
        .await
        .expect("the session's reader is still held by the released connection");
        let first = tokio::time::timeout(Duration::from_secs(10), got_b.inbound.recv())
            .await
            .expect("no data for the second connection");
        assert!(
            matches!(first, Some(Inbound::Data(ref d)) if &d[..] == b"hello"),
            "{first:?}"
        );
        uploader.abort();
    }

    /// A WebSocket v4 server dials at the upgrade and may answer with an error and a close
    /// before the client has done anything: here both are in the input before the session
    /// starts. The connection opened with the session gets the server's message, not a
    /// "session closed".
    #[tokio::test]
    async fn an_answer_that_comes_with_the_upgrade_reaches_the_connection() {
        use crate::proto::ws::WsPortForward;
        let mut server = WsPortForward::server(&[7000]);
        let mut scratch = BytesMut::new();
        let conn = match server.handle_input(&mut scratch).unwrap() {
            Some(Event::Incoming { conn, port: 7000 }) => conn,
            other => panic!("{other:?}"),
        };
        server.fail(conn, "dial tcp 127.0.0.1:7000: connection refused");
        server.goaway();
        let mut wire = BytesMut::new();
        while let Some(b) = server.poll_transmit() {
            wire.extend_from_slice(&b);
        }
        let (client_io, mut server_io) = duplex(1 << 16);
        server_io.write_all(&wire).await.unwrap();
        let (_session, _conn, mut inbound) = Session::start_with_conn(
            stream(client_io),
            Bytes::new(),
            Box::new(WsPortForward::client(&[7000], 1)),
            SessionOptions::default(),
            7000,
        )
        .unwrap();
        match inbound.recv().await {
            Some(Inbound::Error(m)) => assert!(m.contains("connection refused"), "{m}"),
            other => panic!("want the server's error, got {other:?}"),
        }
    }
}
