//! `wschat::handshake::check` on arbitrary request heads (first byte picks the peer and policy),
//! and `wschat::http::clean_path` on arbitrary strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::handshake_check(data));
