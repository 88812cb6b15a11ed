//! Arbitrary bytes as SPDY/3 compressed header blocks (one block, and two blocks sharing one
//! zlib context), and as an uncompressed block. Must never panic or allocate past the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringfwd::proto::spdy::fuzz::header_block(data);
});
