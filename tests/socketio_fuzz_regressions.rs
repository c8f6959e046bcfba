//! Fuzz regressions for the socket.io layers: crafted inputs and the seeds of the `engineio_parse`,
//! `eio_session` and `socketio_parse` targets, checked in the normal `cargo test` against exactly
//! the properties the fuzzers check (`fuzz/invariants.rs`), plus a few pinned outcomes.
//!
//! Run the fuzzers themselves from `fuzz/`, e.g.
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run socketio_parse corpus/socketio_parse seeds/socketio_parse -- -dict=dicts/socketio_parse.dict -max_total_time=600`.

#[path = "../fuzz/invariants.rs"]
mod invariants;

use wschat::engineio::{self, EioError, Packet};
use wschat::socketio::{self, SioError};

/// Inputs for `engineio_parse`: polling bodies, packets and queries at their edges.
const ENGINEIO: &[&[u8]] = &[
    // found by a mutation run: two padded base64 blocks in a row decoded, and did not round-trip
    b"bAQIDBA==true",
    b"",
    b"\x1e",
    b"4\x1e",
    b"\x1e4",
    b"4a\x1e\x1e4b",
    b"4\xff\xfe",
    b"2probe\x1e3probe\x1e2prob",
    b"b",
    b"bAQ",
    b"bAR==",
    b"bAQ==\x1ebAQ=",
    b"b====",
    b"0{\"sid\":\"x\"}",
    b"7",
    b"40\x1e42[\"chat message\",\"\xe2\x80\xa8\"]",
    b"EIO=4&EIO=3&transport=polling",
    b"EIO=4&transport=polling&sid=%",
    b"EIO=4&transport=polling&sid=%ZZ&room=%2e%2e",
    b"EIO=4&transport=websocket&sid=++++&since=18446744073709551616",
    b"EIO=4&transport=polling&room=&name=&since=-1",
    b"=&&=&EIO&transport",
];

/// Inputs for `socketio_parse`: packets a client might send, and frames a server sends.
const SOCKETIO: &[&str] = &[
    "",
    "0/",
    "0/,",
    "0/,{}",
    "0/admin",
    "0/admin,{\"token\":1}",
    "0//,,",
    "0{\"room\":null,\"name\":null,\"since\":null,\"full\":null}",
    "0{\"room\":\"\",\"since\":1.5}",
    "0{\"since\":18446744073709551616}",
    "1/",
    "2[\"chat message\",\"\\ud800\"]",
    "2[\"chat message\",\"\\u0000\"]",
    "2[\"chat message\",\"hi\",\"extra\",{}]",
    "2007[\"nick\",\"ada\"]",
    "29999999999999999999[\"nick\",\"ada\"]",
    "2[\"join\",\"dev\",1e3]",
    "2[\"join\",\"dev\",null]",
    "2[\"private\",{\"to\":\"bob\"}]",
    "2[\"private\",{\"to\":\"bob\",\"text\":\"x\",\"to\":\"eve\"}]",
    "2[\"connect\"]",
    "2[1,\"x\"]",
    "3",
    "3[]",
    "4\"refused\"",
    "50-[\"x\"]",
    "6",
    "9",
    "2[\"chat message\"] trailing",
    "{\"type\":\"message\",\"text\":\"a\\\"b\",\"private\":false}",
    "{\"type\":\"message\",\"private\":true}",
    "{\"type\":\"\\\"]\"}",
    "[\"message\",false,\"hi\"]",
    // found by a mutation run: a number out of range where the frame mapping does not look
    "{\"type\":\"message\",\"id\":7,\"room\":\"lobby\",\"from\":\"ada\",\"text\":\"hi\",\"ts\":11e999}",
];

/// Operation strings for `eio_session` (see `invariants::eio_session` for the encoding).
const EIO_SESSION: &[&[u8]] = &[
    // a GET waits, another GET: duplicate, closed
    b"\x00\x00\x00\x00\x00\x00\x01\x00",
    // probe over polling is refused, then everything on a closed session
    b"\x00\x05\x32\x00\x00\x03\x10\x04\xff\x06\x00",
    // probe, upgrade, then a POST on the upgraded session
    b"\x00\x00\x06\x00\x06\x01\x05\x34\x00\x00\x01\x00",
    // pings never answered
    b"\x00\x04\x19\x04\x14\x04\xff\x00\x00",
    // a POST of pings that fills the queue
    b"\x00\x052\x1e2\x1e2\x1e2\x1e2\x1e2\x1e2\x1e2\x1e2\x1e2",
];

#[test]
fn engineio_regressions() {
    for case in ENGINEIO {
        invariants::engineio_parse(case);
    }
}

#[test]
fn socketio_regressions() {
    for case in SOCKETIO {
        invariants::socketio_parse(case.as_bytes());
    }
}

#[test]
fn eio_session_regressions() {
    for case in EIO_SESSION {
        invariants::eio_session(case);
        let mut as_websocket = case.to_vec();
        as_websocket[0] |= 1;
        invariants::eio_session(&as_websocket);
    }
}

/// Every seed the three fuzzers start from (fuzz/seeds/<target>/) passes too.
#[test]
fn socketio_fuzz_seeds() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut checked = 0;
    for (target, check) in [
        ("engineio_parse", invariants::engineio_parse as fn(&[u8])),
        ("eio_session", invariants::eio_session),
        ("socketio_parse", invariants::socketio_parse),
    ] {
        for entry in std::fs::read_dir(seeds.join(target)).unwrap() {
            check(&std::fs::read(entry.unwrap().path()).unwrap());
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} seeds found");
}

/// Deep JSON in every place a socket.io packet holds some: an error, never a stack overflow.
#[test]
fn deep_json_in_socketio_packets() {
    for depth in [127, 128, 129, 100_000] {
        let (open, close) = ("[".repeat(depth), "]".repeat(depth));
        for input in [
            format!("2[\"chat message\",{open}{close}]"),
            format!("0{{\"room\":{open}{close}}}"),
            format!("3{depth}{open}{close}"),
            format!("2{open}"),
        ] {
            invariants::socketio_parse(input.as_bytes());
        }
    }
}

/// Pinned outcomes worth knowing about.
#[test]
fn pinned_outcomes() {
    // An Engine.IO body of only separators holds empty packets: refused, not skipped.
    assert_eq!(
        engineio::decode_payload(b"\x1e", 10),
        Err(EioError::BadPacket("empty packet"))
    );
    // Non-canonical base64 is refused rather than silently altered.
    assert!(Packet::decode("bAR==").is_err());
    // A binary event is refused with `unsupported`, and the connection stays.
    let binary = socketio::decode_incoming("51-[\"x\",{\"_placeholder\":true,\"num\":0}]", true);
    assert_eq!(binary, Err(SioError::Binary));
    let reply = SioError::Binary.reply().expect("an error event");
    assert!(reply.as_str().contains("\"code\":\"unsupported\""));
    // Leading zeros in an ack id are the same id.
    let ack = socketio::decode_incoming("2007[\"nick\",\"ada\"]", true);
    assert!(matches!(
        ack,
        Ok(socketio::Incoming::Command { ack: Some(7), .. })
    ));
    // A reserved socket.io event name is just an unknown event here.
    let reserved = socketio::decode_incoming("2[\"connect\"]", true);
    assert!(matches!(reserved, Err(SioError::Chat(e)) if e.code() == "bad_request"));
}
