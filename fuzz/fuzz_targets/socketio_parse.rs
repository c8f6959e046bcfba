//! Socket.IO 5 parsing on arbitrary UTF-8: packets round-trip, events map to valid commands, and
//! every reply the server would send parses with the same parser. See fuzz/invariants.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::socketio_parse(data));
