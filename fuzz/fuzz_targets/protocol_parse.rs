//! `wschat::protocol::parse_command` and the name/room/text checkers on arbitrary UTF-8.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::protocol_parse(data));
