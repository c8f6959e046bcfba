//! Engine.IO 4 parsing on arbitrary bytes: polling bodies (which must encode back to the same
//! bytes), single packets and query strings. The checks are in fuzz/invariants.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../invariants.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| invariants::engineio_parse(data));
