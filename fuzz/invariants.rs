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
        echo: selector & 128 != 0,
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
            room_ok(&upgrade.arrival.room);
            assert_eq!(upgrade.accept_key.len(), 28, "base64 of a SHA-1");
            if policy.trusted_proxy != Some(peer) {
                assert_eq!(
                    upgrade.arrival.ip, peer,
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

/// Engine.IO: a polling body, one packet and a query string, from the same bytes.
pub fn engineio_parse(data: &[u8]) {
    use wschat::engineio::{self, Packet};
    if let Ok(packets) = engineio::decode_payload(data, ENGINEIO_MAX_PAYLOAD) {
        let encoded: Vec<String> = packets.iter().map(Packet::encode).collect();
        assert_eq!(
            engineio::encode_payload(&encoded).as_bytes(),
            data,
            "a decoded body encodes back to the same bytes"
        );
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(packet) = Packet::decode(&text) {
        assert_eq!(Packet::decode(&packet.encode()), Ok(packet));
    }
    if let Ok(query) = engineio::parse_query(&text) {
        let sid = query.sid.unwrap_or_default();
        assert!(sid.len() <= engineio::MAX_SID_CHARS);
    }
    match wschat::socketio::ConnectOptions::from_query(&text, [127, 0, 0, 1].into()) {
        Ok(options) => room_ok(&options.arrival.room),
        Err(e) => reply_ok(wschat::socketio::connect_refused(&e).as_str()),
    }
}

/// Largest body the Engine.IO targets decode.
const ENGINEIO_MAX_PAYLOAD: usize = 4096;

/// Drives one Engine.IO session with operations read from the bytes (a fake clock included) and
/// checks after each that its queue stays within its bound, a closed session stays closed, and
/// every poll answer is a valid body.
pub fn eio_session(data: &[u8]) {
    use std::time::{Duration, Instant};
    use wschat::eio_session::{Limits, Session};
    use wschat::engineio::{Packet, Transport};

    let limits = Limits {
        ping_interval: Duration::from_secs(25),
        ping_timeout: Duration::from_secs(20),
        max_payload: 64,
        max_queue_bytes: 256,
    };
    let mut now = Instant::now();
    let transport = match data.first() {
        Some(b) if b & 1 == 1 => Transport::WebSocket,
        _ => Transport::Polling,
    };
    let (mut session, _open) = Session::open("fuzz".into(), transport, limits, now);
    let mut was_closed = false;
    for pair in data.chunks(2) {
        let (op, arg) = (pair[0], pair.get(1).copied().unwrap_or(0));
        match op % 8 {
            0 => poll_answer_ok(session.begin_poll().ok().flatten()),
            1 => poll_answer_ok(session.take_poll()),
            2 => poll_answer_ok(Some(session.end_poll())),
            3 => {
                let frame = wschat::engineio::message_frame(&"m".repeat(arg as usize));
                let _ = session.send(frame);
            }
            4 => {
                now += Duration::from_secs(u64::from(arg));
                session.tick(now);
            }
            5 => {
                let body: &[u8] = &pair[1..];
                let _ = session.receive_payload(body);
            }
            6 => {
                let packets = [
                    Packet::Ping { probe: true },
                    Packet::Upgrade,
                    Packet::Close,
                    Packet::Pong { probe: false },
                    Packet::Message("2[\"x\"]".into()),
                    Packet::Binary(vec![arg]),
                ];
                let packet = packets[usize::from(arg) % packets.len()].clone();
                let _ = session.receive(packet, Transport::WebSocket);
            }
            _ => {
                match arg % 3 {
                    0 => session.abandon_poll(),
                    1 => session.probe_failed(),
                    _ => {}
                }
                for frame in session.take_websocket() {
                    assert!(Packet::decode(frame.as_str()).is_ok(), "{frame:?}");
                }
            }
        }
        assert!(
            session.queued_bytes() <= limits.max_queue_bytes,
            "queue over its bound"
        );
        if was_closed {
            assert!(session.closed().is_some(), "a closed session stays closed");
        }
        was_closed = session.closed().is_some();
    }
}

/// A poll answer is a non-empty body of packets the server may send.
fn poll_answer_ok(answer: Option<String>) {
    let Some(body) = answer else {
        return;
    };
    assert!(!body.is_empty(), "an answer is never empty");
    for packet in body.split('\u{1e}') {
        let decoded = wschat::engineio::Packet::decode(packet);
        assert!(decoded.is_ok(), "{packet:?} in {body:?}");
    }
}

/// Socket.IO: a packet as the client's, a query, a server frame and an event name.
pub fn socketio_parse(data: &[u8]) {
    use wschat::socketio::{self, Packet};
    let text = String::from_utf8_lossy(data);
    if let Ok(packet) = Packet::decode(&text) {
        let again = Packet::decode(&packet.encode()).expect("an encoded packet decodes");
        assert_eq!(again, packet, "decode(encode(p)) == p");
    }
    for connected in [false, true] {
        match socketio::decode_incoming(&text, connected) {
            Ok(socketio::Incoming::Command { command, .. }) => command_ok(command),
            Ok(_) => {}
            Err(e) => {
                if let Some(reply) = e.reply() {
                    reply_ok(reply.as_str());
                }
            }
        }
    }
    // A server frame is always valid JSON, of little depth: only such text must give a valid event.
    let server_like = text.matches(['[', '{']).count() < 100
        && serde_json::from_str::<serde_json::Value>(&text).is_ok();
    let event = socketio::from_server_frame(&text, data.first() == Some(&b'{'));
    if let Some(event) = event.filter(|_| server_like) {
        reply_ok(event.as_str());
    }
    let named = socketio::event_frame(&text, &["1"]);
    let packet = Packet::decode(&named.as_str()[1..]).expect("an event frame decodes");
    let args = packet.data.expect("an event has data");
    assert_eq!(args[0].as_str(), Some(text.as_ref()), "the name survives");
}

fn command_ok(command: Command) {
    match command {
        Command::Message { text, to } => {
            assert_eq!(protocol::check_text(&text).as_deref(), Ok(text.as_str()));
            if let Some(to) = to {
                name_ok(&to);
            }
        }
        Command::Nick { name } => name_ok(&name),
        Command::Join { room, .. } => room_ok(&room),
        Command::Typing { .. } => {}
    }
}

/// What the server sends back is an Engine.IO message holding a packet our own parser reads.
fn reply_ok(frame: &str) {
    let sio = frame.strip_prefix('4').expect("an Engine.IO message");
    wschat::socketio::Packet::decode(sio).expect("the server's packet decodes");
}
