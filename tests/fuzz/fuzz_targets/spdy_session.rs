//! Arbitrary bytes, split arbitrarily, into a client- and a server-role SPDY session until an
//! error or "need more input". The first input byte seeds the split points; the outcome of the
//! split feed must equal that of feeding the bytes whole (checked inside).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringfwd::proto::spdy::fuzz::session_input(data);
});
