//! Fuzz RFC 6455 framing: arbitrary bytes into a `WsCodec` of either role, fed whole and split
//! at a fuzzer-chosen offset. Must never panic, and the split must not change what comes out.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringfwd::proto::ws::{Role, WsCodec};

fn run(role: Role, data: &[u8], cut: usize) -> (Vec<String>, Vec<u8>) {
    let mut codec = WsCodec::new(role, 0x5eed);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    'feed: for chunk in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.read(&mut buf) {
                Ok(Some(m)) => out.push(format!("{m:?}")),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e}"));
                    break 'feed;
                }
            }
        }
    }
    let mut tx = Vec::new();
    while let Some(b) = codec.poll_transmit() {
        tx.extend_from_slice(&b);
    }
    (out, tx)
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, data)) = data.split_first() else {
        return;
    };
    let role = if ctl & 1 == 0 {
        Role::Client
    } else {
        Role::Server
    };
    let cut = (ctl as usize >> 1) % (data.len() + 1);
    let whole = run(role, data, data.len());
    let split = run(role, data, cut);
    assert_eq!(whole, split, "split at {cut} changed the result");
});
