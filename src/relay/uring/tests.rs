//! The io_uring workers, their operations and their buffers, on private workers (so that what
//! a test counts on a ring is its own).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::buf::POOL_BUFS;
use super::op::{self, Pooled};
use super::ring;
use super::worker::current;
use super::*;
use crate::proto::HEADROOM;
use crate::relay::tests::pair;

/// A private worker, or `None` (said on stderr) where io_uring is not available.
fn worker() -> Option<Worker> {
    if let Err(e) = available() {
        eprintln!("io_uring not available here: {e}");
        return None;
    }
    Some(Worker::private())
}

/// Buffers of this worker's pool that are in the ring (not lent out).
fn pool_free() -> usize {
    ring::with(|r| r.pool.as_ref().expect("provided buffers").available())
}

/// Poll `f` once (so that its entry is queued), then hand it back.
async fn started<F: Future + Unpin>(mut f: F) -> F {
    std::future::poll_fn(|cx| {
        assert!(Pin::new(&mut f).poll(cx).is_pending(), "finished at once");
        Poll::Ready(())
    })
    .await;
    f
}

/// Until this worker has entered the kernel twice: what was queued has been submitted and
/// what completed at once has been reaped.
async fn next_turn() {
    let enters = || current().expect("on a worker").stats().0;
    let until = enters() + 2;
    std::future::poll_fn(|cx| {
        if enters() >= until {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Receive and send go through the ring: bytes arrive intact, a receive waits for data that
/// is not there yet, `recv` appends after what the buffer held, and the socket closes when the
/// last handle goes.
#[tokio::test]
async fn recv_and_send_through_the_ring() {
    let Some(w) = worker() else { return };
    let (mut a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let task = w.spawn(async move {
        let mut head = BytesMut::with_capacity(1024);
        head.extend_from_slice(b"head:");
        let (n, buf) = op::recv(&sock, head, 1024).await;
        let sent = op::sendmsg(
            &sock,
            vec![Bytes::from_static(b"one "), Bytes::from_static(b"two")],
            0,
        )
        .await
        .0
        .unwrap();
        let one = op::send(&sock, Bytes::from_static(b"!"), 0)
            .await
            .0
            .unwrap();
        (n.unwrap(), buf, sent, one)
    });
    a.write_all(b"hello").await.unwrap();
    let (n, buf, sent, one) = task.await.unwrap();
    assert_eq!(n, 5);
    assert_eq!(&buf[..], b"head:hello");
    assert_eq!((sent, one), (7, 1));
    let mut got = [0u8; 8];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one two!");
    // The task ended: every handle of the socket is gone.
    assert_eq!(a.read(&mut got).await.unwrap(), 0, "socket stayed open");
}

/// A receive into the provided buffers holds none while it waits, gets the bytes in one with
/// the frame headroom in front, and the buffer goes back when dropped; cancelled receives and
/// an end of file give theirs back too.
#[tokio::test]
async fn pooled_receive_holds_no_buffer_while_it_waits() {
    let Some(w) = worker() else { return };
    let (mut a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let (to_test, mut waiting) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let (go, mut wrote) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = w.spawn(async move {
        assert_eq!(pool_free(), POOL_BUFS as usize);
        let recv = started(Box::pin(op::recv_pooled(&sock, 1024))).await;
        next_turn().await;
        to_test.send(pool_free()).unwrap();
        wrote.recv().await.unwrap();
        let Pooled::Data(mut got) = recv.await.unwrap() else {
            panic!("no data")
        };
        assert_eq!(got.len(), 5);
        assert_eq!(&got.framed_mut()[HEADROOM..], b"hello");
        assert_eq!(pool_free(), POOL_BUFS as usize - 1);
        let bytes = Bytes::from_owner(got).slice(HEADROOM..);
        assert_eq!(&bytes[..], b"hello");
        drop(bytes);
        assert_eq!(
            pool_free(),
            POOL_BUFS as usize,
            "dropped buffer not given back"
        );
        // Cancelled while waiting: nothing taken, nothing lost.
        for _ in 0..100 {
            drop(started(Box::pin(op::recv_pooled(&sock, 1024))).await);
        }
        next_turn().await;
        assert_eq!(pool_free(), POOL_BUFS as usize);
        to_test.send(0).unwrap();
        wrote.recv().await.unwrap();
        match op::recv_pooled(&sock, 1024).await.unwrap() {
            Pooled::Data(b) => assert_eq!(b.len(), 1),
            Pooled::Eof => panic!("end of file, not the byte sent"),
            Pooled::NoBuffer => panic!("no buffer for the byte sent"),
        }
        wrote.recv().await.unwrap();
        assert!(matches!(
            op::recv_pooled(&sock, 1024).await.unwrap(),
            Pooled::Eof
        ));
        pool_free()
    });
    assert_eq!(
        waiting.recv().await.unwrap(),
        POOL_BUFS as usize,
        "a waiting receive took a buffer"
    );
    a.write_all(b"hello").await.unwrap();
    go.send(()).unwrap();
    waiting.recv().await.unwrap();
    a.write_all(b"x").await.unwrap();
    go.send(()).unwrap();
    drop(a);
    go.send(()).unwrap();
    assert_eq!(task.await.unwrap(), POOL_BUFS as usize);
}

/// With every provided buffer lent out, a receive says so (and leaves the bytes in the socket
/// for a receive of its own); one buffer back, and pooled receives work again.
#[tokio::test]
async fn pooled_receive_with_every_buffer_out() {
    let Some(w) = worker() else { return };
    let (mut a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let (step, mut steps) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (ack, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = w.spawn(async move {
        let mut held = Vec::new();
        for i in 0..POOL_BUFS {
            steps.recv().await.unwrap();
            match op::recv_pooled(&sock, 1).await.unwrap() {
                Pooled::Data(b) => held.push(b),
                _ => panic!("receive {i} got no buffer"),
            }
            ack.send(()).unwrap();
        }
        assert_eq!(pool_free(), 0);
        steps.recv().await.unwrap();
        assert!(matches!(
            op::recv_pooled(&sock, 1024).await.unwrap(),
            Pooled::NoBuffer
        ));
        let (n, own) = op::recv(&sock, BytesMut::with_capacity(1024), 1024).await;
        assert_eq!(n.unwrap(), 4);
        assert_eq!(&own[..], b"late");
        held.pop();
        ack.send(()).unwrap();
        steps.recv().await.unwrap();
        let Pooled::Data(mut got) = op::recv_pooled(&sock, 1024).await.unwrap() else {
            panic!("no buffer after one came back")
        };
        assert_eq!(&got.framed_mut()[HEADROOM..], b"again");
        drop((got, held));
        pool_free()
    });
    for i in 0..POOL_BUFS {
        a.write_all(&[i as u8]).await.unwrap();
        step.send(()).unwrap();
        acks.recv().await.unwrap();
    }
    a.write_all(b"late").await.unwrap();
    step.send(()).unwrap();
    acks.recv().await.unwrap();
    a.write_all(b"again").await.unwrap();
    step.send(()).unwrap();
    assert_eq!(task.await.unwrap(), POOL_BUFS as usize);
}

/// Operations dropped while in flight (the way a reset connection drops them) are cancelled:
/// their slots come back once the kernel has answered, and their buffers with them.
#[tokio::test]
async fn cancelled_operations_free_their_slots() {
    let Some(w) = worker() else { return };
    let (_a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let left = w
        .spawn(async move {
            let before = ring::with(|r| r.in_flight());
            for _ in 0..200 {
                let recv = Box::pin(op::recv(&sock, BytesMut::with_capacity(4096), 4096));
                drop(started(recv).await);
            }
            // The cancels reach the kernel with the next turn; their completions with the
            // one after.
            let deadline = Instant::now() + Duration::from_secs(10);
            while ring::with(|r| r.in_flight()) > before && Instant::now() < deadline {
                next_turn().await;
            }
            ring::with(|r| r.in_flight()) - before
        })
        .await
        .unwrap();
    assert_eq!(left, 0, "cancelled receives still hold their slots");
}

/// A turn's operations reach the kernel together: 64 sends started by one task in one turn
/// cost one `io_uring_enter` (not one each), and all complete.
#[tokio::test]
async fn one_enter_carries_a_turns_operations() {
    let Some(w) = worker() else { return };
    let mut peers = Vec::new();
    let mut socks = Vec::new();
    for _ in 0..64 {
        let (a, b) = pair().await;
        peers.push(a);
        socks.push(RingSocket::from_tokio(b).unwrap());
    }
    let (enters, sent) = w
        .spawn(async move {
            // Settle: the worker has nothing else queued.
            next_turn().await;
            let before = current().unwrap().stats().0;
            let mut sends: Vec<_> = socks
                .iter()
                .map(|s| Box::pin(op::send(s, Bytes::from_static(b"ping"), 0)))
                .collect();
            let mut sent = vec![None; sends.len()];
            std::future::poll_fn(|cx| {
                for (f, out) in sends.iter_mut().zip(sent.iter_mut()) {
                    if out.is_none()
                        && let Poll::Ready((r, _)) = f.as_mut().poll(cx)
                    {
                        *out = Some(r.unwrap());
                    }
                }
                match sent.iter().all(Option::is_some) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                }
            })
            .await;
            let after = current().unwrap().stats().0;
            let sent: usize = sent.into_iter().flatten().sum();
            (after - before, sent)
        })
        .await
        .unwrap();
    assert_eq!(sent, 64 * 4);
    assert!(enters <= 2, "64 sends took {enters} io_uring_enter calls");
    for mut p in peers {
        let mut got = [0u8; 4];
        p.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}

/// Dropping a task's handle cancels the task on its worker: its receive is cancelled and its
/// socket closed (the peer sees the end).
#[tokio::test]
async fn dropping_the_handle_cancels_the_task() {
    let Some(w) = worker() else { return };
    let (mut a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = w.spawn(async move {
        let _ = started_tx.send(());
        op::recv(&sock, BytesMut::with_capacity(64), 64).await.0
    });
    started_rx.await.unwrap();
    drop(task);
    let mut got = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), a.read(&mut got))
        .await
        .expect("the cancelled task's socket stayed open")
        .unwrap();
    assert_eq!(n, 0);
}

/// Timers of the worker fire on time (never early), and a wake-up from another thread (a
/// tokio channel) reaches a task that waits on the ring.
#[tokio::test]
async fn timers_and_wakes_from_other_threads() {
    let Some(w) = worker() else { return };
    let slept = w
        .spawn(async {
            let t0 = Instant::now();
            worker::sleep_until(t0 + Duration::from_millis(30)).await;
            let late =
                worker::timeout(Duration::from_millis(20), std::future::pending::<()>()).await;
            (t0.elapsed(), late.is_none())
        })
        .await
        .unwrap();
    assert!(slept.0 >= Duration::from_millis(50), "{slept:?}");
    assert!(slept.1, "a timeout on a pending future returned its output");

    let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
    let task = w.spawn(async move { rx.await.unwrap() + 1 });
    tokio::task::yield_now().await;
    tx.send(41).unwrap();
    assert_eq!(task.await, Some(42));
}

/// One multishot accept takes every connection, and a dropped one stops listening at once
/// and closes the connections it took but never handed out.
#[tokio::test]
async fn one_multishot_accept_takes_every_connection() {
    let Some(w) = worker() else { return };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    let mut accepts = RingAccepts::start(w, &l).unwrap();
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(tokio::net::TcpStream::connect(at).await.unwrap());
    }
    for i in 0..20 {
        match accepts.next().await {
            Accepted::Conn(fd) => {
                let peer = socket2::SockRef::from(&fd).peer_addr().unwrap();
                assert!(peer.as_socket().is_some(), "connection {i}: no peer");
            }
            _ => panic!("connection {i} not accepted"),
        }
    }
    // Two more arrive, are accepted by the kernel for the ring, and are never taken.
    let mut late = Vec::new();
    for _ in 0..2 {
        late.push(tokio::net::TcpStream::connect(at).await.unwrap());
    }
    drop(accepts);
    for mut c in late {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
            .await
            .expect("a connection the dropped accept took stayed open");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
    drop(l);
    let refused = tokio::net::TcpStream::connect(at).await;
    assert!(refused.is_err(), "the port still listens");
}

/// A local connection's receives: messages arrive through one multishot receive, then a bulk
/// sender is read into buffers of our own, and nothing is lost or reordered at either switch
/// (what the multishot receive took before it was stopped comes first), down to the end of
/// file.
#[tokio::test]
async fn a_stream_of_messages_then_bulk_then_messages_again() {
    use crate::relay::backend::{Received, Socket};
    let Some(w) = worker() else { return };
    super::socket::FORCE_MULTISHOT.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut a, b) = pair().await;
    let sock = RingSocket::from_tokio(b).unwrap();
    let bulk: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let expect = bulk.clone();
    let (ack, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
    let task = w.spawn(async move {
        let mut got = Vec::new();
        // Three messages, one receive each.
        for _ in 0..3 {
            match sock.recv_stream(64 * 1024).await.unwrap() {
                Some(Received::Data(b)) => got.extend_from_slice(&b.as_ref()[HEADROOM..]),
                _ => panic!("no message"),
            }
            ack.send(()).unwrap();
        }
        assert_eq!(got, b"onetwothree");
        // The bulk: the first buffer fills, then receives of our own.
        let mut bulk = Vec::new();
        match sock.recv_stream(64 * 1024).await.unwrap() {
            Some(Received::Data(b)) => bulk.extend_from_slice(&b.as_ref()[HEADROOM..]),
            _ => panic!("no bulk"),
        }
        while bulk.len() < 300_000 {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let n = sock.recv(&mut buf, 64 * 1024).await.unwrap();
            assert!(n > 0, "end of file after {} bulk bytes", bulk.len());
            bulk.extend_from_slice(&buf);
        }
        ack.send(()).unwrap();
        let mut tail = Vec::new();
        loop {
            match sock.recv_stream(64 * 1024).await.unwrap() {
                Some(Received::Data(b)) => tail.extend_from_slice(&b.as_ref()[HEADROOM..]),
                Some(Received::Eof) => break,
                None => {
                    sock.readable().await.unwrap();
                    let mut buf = BytesMut::with_capacity(64 * 1024);
                    match sock.recv(&mut buf, 64 * 1024).await.unwrap() {
                        0 => break,
                        _ => tail.extend_from_slice(&buf),
                    }
                }
            }
        }
        (bulk, tail)
    });
    for m in [&b"one"[..], b"two", b"three"] {
        a.write_all(m).await.unwrap();
        acks.recv().await.unwrap();
    }
    a.write_all(&expect).await.unwrap();
    acks.recv().await.unwrap();
    a.write_all(b"tail").await.unwrap();
    drop(a);
    let (bulk, tail) = task.await.unwrap();
    assert!(bulk == expect, "bulk bytes changed or reordered");
    assert_eq!(tail, b"tail");
}

/// Splices on ring sockets: 16 MiB go socket → pipe → socket intact and in order, with a
/// writer faster than the receiver (the far socket fills and the splice out waits for room)
/// and a receiver that reads only after the worker has run again: a splice that blocked the
/// worker thread would stop its timer task, and the test would fail at its deadline.
#[tokio::test]
async fn splices_wait_on_the_ring_not_the_worker() {
    use crate::relay::backend::Socket;
    use crate::relay::pipe::{Pipe, SpliceIn};
    let Some(w) = worker() else { return };
    let (mut src, from) = pair().await;
    let (to, mut dst) = pair().await;
    let from = RingSocket::from_tokio(from).unwrap();
    let to = RingSocket::from_tokio(to).unwrap();
    const TOTAL: usize = 16 << 20; // more than loopback's socket buffers hold
    let data: Vec<u8> = (0..TOTAL as u32).map(|i| (i * 7 % 253) as u8).collect();
    let expect = data.clone();
    let (ticked, mut ticks) = tokio::sync::mpsc::unbounded_channel::<()>();
    // A task beside the splices: the worker keeps running it while they wait.
    let ticker = w.spawn(async move {
        loop {
            super::worker::sleep_until(Instant::now() + Duration::from_millis(1)).await;
            if ticked.send(()).is_err() {
                return;
            }
        }
    });
    let relay = w.spawn(async move {
        let pipe = Pipe::new().unwrap();
        let mut moved = 0;
        loop {
            match from.splice_in(&pipe, 256 * 1024).await.unwrap() {
                SpliceIn::Moved(n) => {
                    to.splice_out(&pipe, n, false).await.unwrap();
                    moved += n;
                }
                SpliceIn::Eof => return moved,
                SpliceIn::Full => unreachable!("the pipe is emptied after every splice"),
            }
        }
    });
    let writer = tokio::spawn(async move {
        src.write_all(&data).await.unwrap();
        src.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(TOTAL);
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        // The worker has run since the last read (a stale tick does not count).
        while ticks.try_recv().is_ok() {}
        tokio::time::timeout(Duration::from_secs(30), ticks.recv())
            .await
            .expect("the worker is blocked")
            .expect("the ticker runs");
        let n = dst.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    writer.await.unwrap();
    assert_eq!(relay.await.unwrap(), TOTAL);
    assert_eq!(got.len(), TOTAL);
    assert!(got == expect, "bytes changed or reordered on the way");
    drop(ticker);
}
