//! One Engine.IO session driven by arbitrary operations (polls, sends, posts, probes, a fake
//! clock): its queue stays bounded, a closed session stays closed, poll answers are valid.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::eio_session(data));
