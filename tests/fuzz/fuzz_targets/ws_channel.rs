//! Fuzz the `v4.channel.k8s.io` channel protocol: arbitrary bytes into a client and a server
//! `WsPortForward`, fed whole and byte by byte. Must never panic; byte-by-byte feeding must give
//! the same events and the same replies.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringfwd::proto::PortForwardProtocol;
use ringfwd::proto::ws::WsPortForward;

const PORTS: [u16; 3] = [80, 443, 80];

fn session(server: bool) -> WsPortForward {
    if server {
        WsPortForward::server(&PORTS)
    } else {
        WsPortForward::client(&PORTS, 7)
    }
}

fn run(server: bool, data: &[u8], bytewise: bool) -> (Vec<String>, Vec<u8>) {
    let mut s = session(server);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut chunks: Vec<&[u8]> = if bytewise {
        data.chunks(1).collect()
    } else {
        vec![data]
    };
    // Always call handle_input at least once (server Incoming events come out of it).
    chunks.push(&[]);
    'feed: for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match s.handle_input(&mut buf) {
                Ok(Some(ev)) => out.push(format!("{ev:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e}"));
                    break 'feed;
                }
            }
        }
    }
    // Exercise the send side too; errors are fine, panics are not.
    let mut frame = vec![0u8; ringfwd::proto::HEADROOM + 3];
    let _ = s.frame_data(0, &mut frame, 3);
    let _ = s.ping();
    let mut tx = Vec::new();
    while let Some(b) = s.poll_transmit() {
        tx.extend_from_slice(&b);
    }
    (out, tx)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let server = ctl & 1 == 1;
    let data = &data[..data.len().min(1 << 16)];
    assert_eq!(run(server, data, false), run(server, data, true));
});
