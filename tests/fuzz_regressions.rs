//! Fuzz regressions: inputs from the fuzz targets in `fuzz/` (corpus finds, seeds and edge cases
//! worth keeping), checked in the normal `cargo test` against exactly the properties the fuzzer
//! checks (`fuzz/invariants.rs`, included below), plus a few pinned outcomes.
//!
//! Run the fuzzers themselves with (from `fuzz/`):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run protocol_parse corpus/protocol_parse seeds/protocol_parse -- -dict=dicts/protocol_parse.dict -max_total_time=600`
//! (likewise `handshake_check`). A crash lands in `fuzz/artifacts/<target>/`; minimise it with
//! `cargo fuzz tmin <target> <file>` and add the bytes to the lists here.

#[path = "../fuzz/invariants.rs"]
mod invariants;

use std::net::IpAddr;

use wschat::handshake::Refusal;
use wschat::names::NameError;
use wschat::protocol::{self, Command};

/// Inputs for `protocol_parse`: any bytes (read as lossy UTF-8).
const PROTOCOL_PARSE: &[&[u8]] = &[
    // from the corpus
    b"{\"type\":1864467434770955161073091e400709]551616",
    b"{\"type\":\"join\",\"room\":\"_1-a\",\"si]\":41}",
    b"{\"\\ud56d\\ud300   \\ud83d\\ude00    ",
    b"{\"type\":\"{ng\",\"active\":0e1849551616400(",
    b"{\"F\":[1e1,1e14,1e1,1e11,1e1,1e14,1e1,1e1e1,]o\xff",
    b"{\"type\":\"nick\",\"\n\x00\x00o\xc3\xab }",
    b"\r\"type\":\"!j\"to\",\"room\xa2\\ud,s\x9c\"*\"1i",
    // surrogates, escapes, numbers at the edges
    b"{\"type\":\"message\",\"text\":\"\\ud83d\\ude00\"}",
    b"{\"type\":\"message\",\"text\":\"\\ud800\"}",
    b"{\"type\":\"message\",\"text\":\"\\udc00\\ud800\"}",
    b"{\"type\":\"join\",\"room\":\"dev\",\"since\":18446744073709551615}",
    b"{\"type\":\"join\",\"room\":\"dev\",\"since\":18446744073709551616}",
    b"{\"type\":\"join\",\"room\":\"dev\",\"since\":-1}",
    b"{\"type\":\"join\",\"room\":\"dev\",\"since\":1e3}",
    b"{\"type\":\"message\",\"text\":\"x\",\"text\":\"y\"}",
    b"{\"type\":\"typing\",\"active\":1}",
    // names: trimming of Unicode whitespace, controls, length in characters, invisible and
    // compatibility characters (issue 9)
    "{\"type\":\"nick\",\"name\":\"alice\u{200B}\"}".as_bytes(),
    "{\"type\":\"nick\",\"name\":\"\u{FEFF}\u{202E}\u{AD}\u{3164}\"}".as_bytes(),
    "{\"type\":\"nick\",\"name\":\"ａｌｉｃｅ  𝐚𝐥𝐢𝐜𝐞\"}".as_bytes(),
    "{\"type\":\"nick\",\"name\":\"\u{301}x\"}".as_bytes(),
    "{\"type\":\"nick\",\"name\":\"\u{FDFA}\u{FDFA}\"}".as_bytes(),
    "{\"type\":\"message\",\"text\":\"hi\",\"to\":\"ｇuest-5\"}".as_bytes(),
    b"{\"type\":\"nick\",\"name\":\"\\u0085x\\u0085\"}",
    b"{\"type\":\"nick\",\"name\":\"\\u3000\\u3000\"}",
    b"{\"type\":\"nick\",\"name\":\"a\\u2028b\"}",
    b"{\"type\":\"nick\",\"name\":\"a\\u0000b\"}",
    b"{\"type\":\"message\",\"text\":\"psst\",\"to\":\" \\t bob \\n\"}",
    // not JSON commands at all
    b"",
    b"{",
    b"}",
    b" {\"type\":\"nick\",\"name\":\"x\"}",
    b"\xef\xbb\xbf{\"type\":\"nick\",\"name\":\"x\"}",
    b"\xff\xfe\x00",
    b"\t\r\n",
    b"line\r\nbreaks\tand tabs",
];

/// Inputs for `handshake_check`: the first byte picks the peer and policy
/// (see `invariants::policy_for`), the rest is the request head.
const HANDSHAKE_CHECK: &[&[u8]] = &[
    // from the corpus: a Host that is not UTF-8, odd header casing, two Origin headers
    b"(GET /chat HTTP/1.1\r\nHost: \xff\xff\xff127\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http:/\r\n\r\n",
    b"6GET /chat HTTP/1.1\r\nHoSt: 1\r\n.0r.:.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: h.?\r\n\r\n",
    b"6GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://\r\nOrigin: htt12\r\n\r\n",
    b"\x00GET /chat HTTP/1.1\r\nHost: 127.0.0.1:5001\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    // leading blank lines before the request line
    b"\x00\r\n\r\nGET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    // forwarded addresses from a trusted proxy: junk, IPv6, brackets, empty entries
    b"\x20GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: 1.2.3.4, ::1\r\n\r\n",
    b"\x20GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: [::1]\r\n\r\n",
    b"\x20GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: ,,,\r\n\r\n",
    // hosts and origins with odd shapes
    b"\x00GET /chat HTTP/1.1\r\nHost: [::1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://[::1:5000\r\n\r\n",
    b"\x04GET /chat HTTP/1.1\r\nHost: a:b:c:80\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: HTTP://A:B:C/\r\n\r\n",
    // an Origin that is not UTF-8 (treated as absent: see `origin_that_is_not_utf8`)
    b"\x00GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://evil.example\xff\r\n\r\n",
    // query values: overflowing since, invalid percent-encoding, room in path and query
    b"\x00GET /chat?since=18446744073709551616 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"\x00GET /chat/dev?room=ops&name=%ff%fe%&since=&=&&name HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"\x00GET /chat/%2e%2e HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    // a key of the right length that is not base64
    b"\x00GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ........................\r\nSec-WebSocket-Version: 13\r\n\r\n",
    // refusals
    b"\x00GET /chat HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"\x00POST /chat HTTP/1.1\r\nUpgrade: WebSocket\r\nConnection: keep-alive,upgrade\r\n\r\n",
    b"\x00GET /chatroom HTTP/1.1\r\n\r\n",
    b"\x00GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00garbage\r\n\r\n",
    b"\x00",
    b"",
];

/// Inputs for `clean_path` (also reached from `handshake_check`).
const CLEAN_PATH: &[&str] = &[
    "/",
    "/a/b/",
    "/%2e%2e/etc/passwd",
    "/..%2f..%2fetc%2fpasswd",
    "/a/%2e/b",
    "/%c0%ae%c0%ae/x",
    "/a%5c..%5cb",
    "/\u{ff0e}\u{ff0e}/x",
    "/a//b",
    "//",
    "/%00",
    "/C:%5cwindows",
    "relative",
    "",
];

#[test]
fn protocol_parse_regressions() {
    for case in PROTOCOL_PARSE {
        invariants::protocol_parse(case);
    }
}

#[test]
fn handshake_check_regressions() {
    for case in HANDSHAKE_CHECK {
        for selector in [0u8, 0x04, 0x08, 0x10, 0x20, 0x21, 0x40, 0x7f, 0xff] {
            let mut input = case.to_vec();
            if let Some(first) = input.first_mut() {
                *first = selector;
            }
            invariants::handshake_check(&input);
        }
    }
}

#[test]
fn clean_path_regressions() {
    for case in CLEAN_PATH {
        invariants::clean_path(case);
    }
    for traversal in [
        "/%2e%2e/etc/passwd",
        "/..%2f..%2fetc%2fpasswd",
        "/a/%2e/b",
        "/a%5c..%5cb",
    ] {
        assert_eq!(wschat::http::clean_path(traversal), None, "{traversal}");
    }
    assert_eq!(
        wschat::http::clean_path("/a/b/").as_deref(),
        Some("a/b/index.html")
    );
}

/// Every seed the fuzzers start from (fuzz/seeds/<target>/) passes too.
#[test]
fn fuzz_seeds() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let mut checked = 0;
    for (target, check) in [
        ("protocol_parse", invariants::protocol_parse as fn(&[u8])),
        ("handshake_check", invariants::handshake_check),
    ] {
        for entry in std::fs::read_dir(seeds.join(target)).unwrap() {
            check(&std::fs::read(entry.unwrap().path()).unwrap());
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} seeds found");
}

/// Deep nesting, which no literal above holds: errors where a value is read, skipped where not.
#[test]
fn deep_nesting_never_recurses_or_panics() {
    for depth in [127, 128, 129, 10_000, 100_000] {
        let (open, close) = ("[".repeat(depth), "]".repeat(depth));
        for input in [
            format!(r#"{{"type":"message","text":{open}{close}}}"#),
            format!(r#"{{"type":"message","text":"x","n":{open}{close}}}"#),
            format!(r#"{{"type":"message","text":"x","n":{open}"#),
            format!(
                r#"{{"type":"nick","name":{}1{}}}"#,
                r#"{"a":"#.repeat(depth),
                "}".repeat(depth)
            ),
        ] {
            invariants::protocol_parse(input.as_bytes());
        }
    }
}

/// Pinned outcomes worth knowing about (each also passes the invariants above).
#[test]
fn pinned_protocol_outcomes() {
    let code = |s: &str| protocol::parse_command(s).map_err(|e| e.code());
    // A lone surrogate or an overflowing id is a bad request, not a panic or a wrap.
    assert_eq!(
        code(r#"{"type":"message","text":"\ud800"}"#),
        Err("bad_request")
    );
    assert_eq!(
        code(r#"{"type":"join","room":"dev","since":18446744073709551616}"#),
        Err("bad_request")
    );
    assert_eq!(
        code(r#"{"type":"message","text":"x","text":"y"}"#),
        Err("bad_request")
    );
    // JSON commands start with `{` exactly: anything before it makes a chat message.
    assert_eq!(
        protocol::parse_command("\u{feff}{\"type\":\"nick\",\"name\":\"x\"}"),
        Ok(Command::Message {
            text: "\u{feff}{\"type\":\"nick\",\"name\":\"x\"}".into(),
            to: None
        })
    );
    // Names are trimmed of Unicode whitespace (NEL included) before the control check.
    assert_eq!(protocol::check_name("\u{85}x\u{85}").as_deref(), Ok("x"));
    assert_eq!(
        protocol::check_name("\u{3000}\u{3000}"),
        Err(protocol::ChatError::BadName(NameError::Empty))
    );
    // Lengths count characters, not bytes.
    for (n, ok) in [(32, true), (33, false)] {
        let nick = serde_json::json!({"type":"nick","name":"é".repeat(n)}).to_string();
        invariants::protocol_parse(nick.as_bytes());
        assert_eq!(protocol::parse_command(&nick).is_ok(), ok, "{n} characters");
    }
}

/// An `Origin` value that is not UTF-8 counts as no `Origin` (as non-browser clients send): only
/// a browser is constrained by Origin, and a browser never sends such a value.
#[test]
fn origin_that_is_not_utf8() {
    let (peer, policy) = invariants::policy_for(0);
    let head = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://evil.example\xff\r\n\r\n";
    assert!(invariants::check(head, peer, &policy).is_ok());
    let utf8 = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://evil.example\r\n\r\n";
    assert!(matches!(
        invariants::check(utf8, peer, &policy),
        Err(Refusal::Forbidden(_))
    ));
}

/// X-Forwarded-For is read only from the trusted proxy, and only its last entry counts.
#[test]
fn forwarded_for_edge_cases() {
    let head = |xff: &str| {
        format!(
            "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Forwarded-For: {xff}\r\n\r\n"
        )
    };
    let (peer, trusted) = invariants::policy_for(0x20);
    let ip = |xff: &str| {
        invariants::check(head(xff).as_bytes(), peer, &trusted)
            .unwrap()
            .arrival
            .ip
    };
    assert_eq!(ip("192.0.2.7"), "192.0.2.7".parse::<IpAddr>().unwrap());
    assert_eq!(ip("10.0.0.1, ::1"), "::1".parse::<IpAddr>().unwrap());
    assert_eq!(
        ip("192.0.2.7, junk"),
        peer,
        "an unparsable last entry falls back to the peer"
    );
    assert_eq!(ip("[::1]"), peer);
    let (peer, untrusted) = invariants::policy_for(0x40); // another address is the proxy
    assert_eq!(
        invariants::check(head("192.0.2.7").as_bytes(), peer, &untrusted)
            .unwrap()
            .arrival
            .ip,
        peer
    );
}
