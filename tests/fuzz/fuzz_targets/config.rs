//! Arbitrary bytes as a `ringfwd up` file: parsing and validation must return a config or a
//! list of problems, never panic, and a config must keep the validator's promises (unique
//! names, ports and addresses present).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringfwd::control::config::fuzz::config(data);
});
