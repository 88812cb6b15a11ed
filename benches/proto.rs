//! Protocol encode/decode throughput, sans-IO: no sockets, payload bytes per second.
//!
//! What is measured, per payload size (32 KiB, the largest DATA frame containerd writes, and
//! 256 KiB, the largest ringfwd writes):
//! - `spdy`: [`SpdyPortForward::frame_data`] (header written in place in front of the payload)
//!   and [`SpdyPortForward::handle_input`] over a run of DATA frames, in both directions between
//!   a client and a server session (`up`: client frames, server parses; `down`: the reverse).
//! - `ws_v4`: the same for `v4.channel.k8s.io`. The client masks what it sends and the server
//!   unmasks it, so `up` pays one pass over the payload at each end; `down` is unmasked.
//! - `tunnel`: the `SPDY/3.1+portforward.k8s.io` adapter, [`WsTunnel`]: `encode` masks a
//!   message in place; `decode` unwraps server messages into the SPDY byte stream (one copy),
//!   and `decode+spdy` adds the SPDY parse on top, which is the client's whole download path.
//!
//! Run: `cargo bench --bench proto` (a few seconds per case; add a filter such as `spdy/` to
//! run a subset). Decoding runs over a pre-built wire image of [`WIRE_BYTES`] that is copied
//! outside the timed section for every batch.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use ringfwd::proto::portforward::SpdyPortForward;
use ringfwd::proto::ws::frame::{Opcode, Role, WsCodec, encode_frame};
use ringfwd::proto::ws::{WsPortForward, WsTunnel};
use ringfwd::proto::{ConnId, Event, HEADROOM, PortForwardProtocol};

const SIZES: [usize; 2] = [32 * 1024, 256 * 1024];

/// Payload per decode batch: big enough that per-batch setup does not matter, small enough
/// to stay in the last-level cache of nothing (a realistic stream, not a hot buffer).
const WIRE_BYTES: usize = 16 << 20;

const PORT: u16 = 8080;

fn label(size: usize) -> String {
    format!("{}KiB", size / 1024)
}

/// Move queued bytes between two sessions until neither has anything to say.
fn settle(a: &mut dyn PortForwardProtocol, b: &mut dyn PortForwardProtocol) {
    let (mut to_a, mut to_b) = (BytesMut::new(), BytesMut::new());
    loop {
        let mut moved = false;
        while let Some(x) = a.poll_transmit() {
            to_b.extend_from_slice(&x);
            moved = true;
        }
        while let Some(x) = b.poll_transmit() {
            to_a.extend_from_slice(&x);
            moved = true;
        }
        while a.handle_input(&mut to_a).expect("a: input").is_some() {
            moved = true;
        }
        while b.handle_input(&mut to_b).expect("b: input").is_some() {
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// A connected pair of sessions with one open connection: (client, server, conn).
type Pair = (
    Box<dyn PortForwardProtocol>,
    Box<dyn PortForwardProtocol>,
    ConnId,
);

fn spdy_pair() -> Pair {
    let mut c = SpdyPortForward::client().with_immediate_eof();
    let mut s = SpdyPortForward::server();
    let conn = c.open(PORT).expect("open");
    settle(&mut c, &mut s);
    (Box::new(c), Box::new(s), conn)
}

fn ws_pair() -> Pair {
    let mut c = WsPortForward::client(&[PORT], 0x5eed);
    let mut s = WsPortForward::server(&[PORT]);
    let conn = c.open(PORT).expect("open");
    settle(&mut c, &mut s);
    (Box::new(c), Box::new(s), conn)
}

/// `frames` DATA frames of `size` bytes from `tx`, as they would go on the wire.
fn wire_image(tx: &mut dyn PortForwardProtocol, conn: ConnId, size: usize) -> BytesMut {
    let frames = WIRE_BYTES / size;
    let mut buf = vec![0x5au8; HEADROOM + size];
    let mut wire = BytesMut::with_capacity(frames * (HEADROOM + size));
    for _ in 0..frames {
        // Masking (WebSocket client) changes the payload in place: refill it every frame.
        buf[HEADROOM..].fill(0x5a);
        let start = tx.frame_data(conn, &mut buf, size).expect("frame");
        wire.extend_from_slice(&buf[start..]);
    }
    assert!(tx.poll_transmit().is_none(), "control frames in a data run");
    wire
}

/// Parse `wire` to the end; returns the payload bytes seen.
fn drain(rx: &mut dyn PortForwardProtocol, mut wire: BytesMut) -> usize {
    let mut got = 0;
    while let Some(ev) = rx.handle_input(&mut wire).expect("parse") {
        match ev {
            Event::Data { data, .. } => got += data.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

/// `encode` and `decode` cases of one protocol, both directions.
fn session_cases(g: &mut BenchmarkGroup<'_, WallTime>, pair: fn() -> Pair) {
    for size in SIZES {
        for dir in ["up", "down"] {
            let (mut c, mut s, conn) = pair();
            let (tx, rx) = if dir == "up" {
                (&mut c, &mut s)
            } else {
                (&mut s, &mut c)
            };
            g.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x5au8; HEADROOM + size];
            g.bench_function(format!("encode/{dir}/{}", label(size)), |b| {
                b.iter(|| black_box(tx.frame_data(conn, black_box(&mut buf), size).unwrap()))
            });
            let wire = wire_image(tx.as_mut(), conn, size);
            let total = (WIRE_BYTES / size * size) as u64;
            g.throughput(Throughput::Bytes(total));
            g.bench_function(format!("decode/{dir}/{}", label(size)), |b| {
                b.iter_batched(
                    || wire.clone(),
                    |w| assert_eq!(drain(rx.as_mut(), w) as u64, total),
                    BatchSize::PerIteration,
                )
            });
        }
    }
}

/// Server-to-client tunnel messages carrying a SPDY DATA run of `size`-byte frames, one SPDY
/// frame per message (the server's writes).
fn tunnel_wire(size: usize) -> (BytesMut, Box<dyn PortForwardProtocol>, u64) {
    let (c, mut s, conn) = spdy_pair();
    let spdy = wire_image(s.as_mut(), conn, size);
    let frame = spdy.len() / (WIRE_BYTES / size);
    let mut wire = BytesMut::with_capacity(spdy.len() + spdy.len() / frame * 16);
    for msg in spdy.chunks(frame) {
        encode_frame(&mut wire, true, Opcode::Binary, None, msg);
    }
    (wire, c, (WIRE_BYTES / size * size) as u64)
}

fn tunnel_cases(g: &mut BenchmarkGroup<'_, WallTime>) {
    for size in SIZES {
        let mut t = WsTunnel::client(0x5eed);
        let mut buf = vec![0x5au8; HEADROOM + size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("encode/up/{}", label(size)), |b| {
            b.iter(|| black_box(t.encode_in_place(black_box(&mut buf), size).unwrap()))
        });
        // What the API server does with it: unmask. Only to check the frames are sound.
        let start = t.encode_in_place(&mut buf, size).unwrap();
        let mut server = WsCodec::new(Role::Server, 0);
        let msg = server.read(&mut BytesMut::from(&buf[start..])).unwrap();
        assert!(matches!(msg, Some(ringfwd::proto::ws::Message::Binary(p)) if p.len() == size));

        let (wire, mut spdy_client, total) = tunnel_wire(size);
        g.throughput(Throughput::Bytes(total));
        // The relay reuses its output buffer: so does the bench, or it would time the page
        // faults of a fresh 16 MiB buffer (most of the time on this VM) instead of decoding.
        let mut out = BytesMut::with_capacity(wire.len());
        for (case, parse) in [("decode", false), ("decode+spdy", true)] {
            g.bench_function(format!("{case}/down/{}", label(size)), |b| {
                let mut t = WsTunnel::client(1);
                b.iter_batched(
                    || wire.clone(),
                    |mut w| {
                        // Takes the allocation back once the last round's payloads are gone.
                        out.clear();
                        out.reserve(wire.len());
                        t.decode(&mut w, &mut out).unwrap();
                        if parse {
                            assert_eq!(drain(spdy_client.as_mut(), out.split()) as u64, total);
                        } else {
                            let headers = 8 * (WIRE_BYTES / size) as u64;
                            assert_eq!(out.len() as u64, total + headers);
                        }
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("spdy");
        session_cases(&mut g, spdy_pair);
        g.finish();
    }
    {
        let mut g = c.benchmark_group("ws_v4");
        session_cases(&mut g, ws_pair);
        g.finish();
    }
    {
        let mut g = c.benchmark_group("tunnel");
        tunnel_cases(&mut g);
        g.finish();
    }
    c.final_summary();
}
