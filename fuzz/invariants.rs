//! The properties the fuzz targets check. `tests/fuzz_regressions.rs` includes this same file
//! (`#[path]`), so every saved crash and corpus input is checked in `cargo test` against exactly
//! what the fuzzer checked. Every function takes raw fuzzer bytes and panics on a violation.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Component, Path};

use wschat::handshake::{self, Policy, Refusal};
use wschat::names;
use wschat::protocol::{self, ChatError, ChatMessage, Command};

/// `parse_command` and the checkers on `data` as (lossy) UTF-8.
pub fn protocol_parse(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    parse_command(&s);
    checkers(&s);
}

fn parse_command(s: &str) {
    match protocol::parse_command(s) {
        Ok(Command::Message { text, to }) => {
            assert_eq!(
                protocol::check_text(&text).as_deref(),
                Ok(text.as_str()),
                "accepted text passes check_text unchanged"
            );
            if !s.starts_with('{') {
                assert_eq!(text, s, "plain text is the message itself");
                assert!(to.is_none());
            }
            if let Some(to) = &to {
                name_ok(to);
            }
            // What the dispatcher stores and broadcasts must read back as the same message.
            let message = ChatMessage {
                id: u64::MAX,
                room: "lobby".into(),
                from: "f".into(),
                to,
                text,
                ts: 0,
                private: false,
            };
            let frame = protocol::encode(&message);
            let back: ChatMessage =
                serde_json::from_str(frame.as_str()).expect("an encoded message parses");
            assert_eq!(back, message);
        }
        Ok(Command::Nick { name }) => {
            name_ok(&name);
            assert_eq!(protocol::check_name(&name).as_deref(), Ok(name.as_str()));
        }
        Ok(Command::Join { room, .. }) => room_ok(&room),
        Ok(Command::Typing { .. }) => {}
        Err(e) => {
            assert!(!s.is_empty() || e == ChatError::EmptyMessage);
            error_frame_ok(&e);
        }
    }
}

fn checkers(s: &str) {
    match protocol::check_name(s) {
        Ok(name) => {
            name_ok(&name);
            assert_eq!(
                protocol::check_name(&name).as_deref(),
                Ok(name.as_str()),
                "idempotent"
            );
        }
        Err(e) => assert!(matches!(e, ChatError::BadName(_)), "{e:?}"),
    }
    match protocol::check_room(s) {
        Ok(room) => {
            assert_eq!(room, s);
            room_ok(room);
        }
        Err(e) => assert_eq!(e, ChatError::BadRoom),
    }
    match protocol::check_text(s) {
        Ok(text) => assert_eq!(text, s),
        Err(ChatError::EmptyMessage) => assert!(s.trim().is_empty()),
        Err(ChatError::BadText) => assert!(s.chars().any(bad_text_char)),
        Err(other) => panic!("check_text gave {other:?}"),
    }
}

fn bad_text_char(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// A name as shown (a nick, or a private message's receiver): normalised already, so
/// normalising again changes nothing, and nothing invisible is left in it.
fn name_ok(name: &str) {
    let chars = name.chars().count();
    assert!((1..=protocol::MAX_NAME_CHARS).contains(&chars), "{name:?}");
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert!(!name.contains("  "), "{name:?}");
    assert_eq!(name, name.trim(), "{name:?}");
    assert_eq!(names::normalise(name).as_deref(), Ok(name), "idempotent");
    assert!(!names::key(name).is_empty(), "{name:?} has a key");
}

fn room_ok(room: &str) {
    assert!(
        (1..=protocol::MAX_ROOM_CHARS).contains(&room.len()),
        "{room:?}"
    );
    assert!(
        room.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
        "{room:?}"
    );
}

/// The `error` frame a client gets is JSON with the stable code.
fn error_frame_ok(e: &ChatError) {
    let frame = e.to_frame();
    let v: serde_json::Value = serde_json::from_str(frame.as_str()).expect("error frame is JSON");
    assert_eq!(v["type"], "error");
    assert_eq!(v["code"], e.code());
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// The peer and policy the first byte selects.
pub fn policy_for(selector: u8) -> (IpAddr, Policy) {
    let peer: IpAddr = match selector & 3 {
        0 => [127, 0, 0, 1].into(),
        1 => std::net::Ipv6Addr::LOCALHOST.into(),
        2 => [192, 0, 2, 1].into(),
        _ => "2001:db8::1".parse().unwrap(),
    };
    let trusted_proxy = match (selector >> 5) & 3 {
        0 => None,
        1 => Some(peer),
        _ => Some([198, 51, 100, 1].into()),
    };
    let port = if selector & 4 != 0 { 80 } else { 5000 };
    let policy = Policy {
        own_origins: vec![format!("http://127.0.0.1:{port}")],
        port,
        wildcard_bind: selector & 2 != 0,
        allow_origins: if selector & 8 != 0 {
            vec!["https://chat.example.org".into()]
        } else {
            Vec::new()
        },
        allow_any_origin: selector & 16 != 0,
        trusted_proxy,
    };
    (peer, policy)
}

/// `handshake::check` on `data[1..]` with the policy `data[0]` picks; `clean_path` on the
/// request target and on the whole input.
pub fn handshake_check(data: &[u8]) {
    let Some((&selector, head)) = data.split_first() else {
        return;
    };
    let (peer, policy) = policy_for(selector);
    match check(head, peer, &policy) {
        Ok(upgrade) => {
            room_ok(&upgrade.room);
            assert_eq!(upgrade.accept_key.len(), 28, "base64 of a SHA-1");
            if policy.trusted_proxy != Some(peer) {
                assert_eq!(
                    upgrade.client_ip, peer,
                    "X-Forwarded-For from an untrusted peer"
                );
            }
            let response = handshake::accept_response(&upgrade);
            assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
            response_is_one_clean_head(&response, "");
        }
        Err(refusal) => {
            assert!(
                !matches!(
                    refusal,
                    Refusal::TooManyClients(_) | Refusal::TooManyFromAddress(..)
                ),
                "check() knows nothing of limits"
            );
            let response = refusal.response("http://127.0.0.1:5000/");
            let (head, body) = response.split_once("\r\n\r\n").expect("a head");
            response_is_one_clean_head(&format!("{head}\r\n\r\n"), body);
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.trim().parse::<usize>().ok());
            assert_eq!(length, Some(body.len()), "Content-Length matches the body");
        }
    }
    let text = String::from_utf8_lossy(head);
    if let Some(target) = text.split_whitespace().nth(1) {
        clean_path(target.split('?').next().unwrap_or(target));
    }
    clean_path(&text);
}

/// Parses a request head and checks it as a handshake, as the front door does (a head that
/// does not parse is a bad request).
pub fn check(
    head: &[u8],
    peer: std::net::IpAddr,
    policy: &Policy,
) -> Result<handshake::Upgrade, Refusal> {
    let request = wschat::request::parse(head, std::net::SocketAddr::new(peer, 40000))
        .map_err(|_| Refusal::BadRequest("malformed HTTP request"))?;
    handshake::check(&request, policy)
}

/// The head (ending in one blank line) has no stray CR or LF: nothing a request put into a
/// response can add a header or end the head early.
fn response_is_one_clean_head(head: &str, body: &str) {
    assert!(head.ends_with("\r\n\r\n"));
    let inner = &head[..head.len() - 4];
    for line in inner.split("\r\n") {
        assert!(!line.is_empty(), "no blank line inside the head: {head:?}");
        assert!(!line.contains(['\r', '\n']), "stray CR/LF in {line:?}");
    }
    let _ = body;
}

/// A path `clean_path` accepts is relative, with plain segments only: it cannot leave the root.
pub fn clean_path(path: &str) {
    let Some(rel) = wschat::http::clean_path(path) else {
        return;
    };
    assert!(!rel.starts_with('/'), "{path:?} -> {rel:?}");
    assert!(!rel.is_empty());
    for segment in rel.split('/') {
        assert!(
            !segment.is_empty() && segment != "." && segment != "..",
            "{path:?} -> {rel:?}"
        );
        assert!(!segment.contains(['\\', '\0', ':']), "{path:?} -> {rel:?}");
    }
    assert!(
        Path::new(&rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "{path:?} -> {rel:?}"
    );
    let root = Path::new("/srv/www");
    assert!(root.join(&rel).starts_with(root));
}
