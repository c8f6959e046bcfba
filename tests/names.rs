//! Issue 9, finding 11: names that cannot impersonate, over real sockets. Look-alikes of a
//! connected name are `name_taken`, invisible characters are `bad_name`, and `server` and
//! `guest-N` are kept for the server (docs/PROTOCOL.md, "Names").

mod common;

use common::*;
use serde_json::{Value, json};
use wschat::Config;

/// `alice` with Cyrillic а (U+0430) and с (U+0441): looks the same, other code points.
const CYRILLIC_ALICE: &str = "\u{430}li\u{441}e";

/// Every byte percent-encoded, so any name fits in the query string.
fn query(name: &str) -> String {
    name.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Connects asking for `name`; returns the client, the name it got, and the error that came
/// after the welcome, if one did.
fn join_as(server: &wschat::Handle, name: &str) -> (Client, String) {
    let (client, welcome) = Client::join(server, &format!("/chat?name={}", query(name)));
    let got = welcome["name"].as_str().expect("a name").to_owned();
    (client, got)
}

/// Asks for `name` with a `nick` command; returns the answer: `renamed`, or an `error`.
fn nick(client: &mut Client, name: &str) -> Value {
    client.send_json(json!({"type":"nick","name":name}));
    loop {
        let v = client.recv();
        if v["type"] == "renamed" || v["type"] == "error" {
            return v;
        }
    }
}

#[test]
fn look_alikes_of_a_connected_name_are_taken() {
    let server = start(config());
    let (mut alice, name) = join_as(&server, "alice");
    assert_eq!(name, "alice");

    let (mut mallory, name) = join_as(&server, CYRILLIC_ALICE);
    assert!(name.starts_with("guest-"), "{name}");
    assert_eq!(mallory.expect("error")["code"], "name_taken");

    for look_alike in ["ＡＬＩＣＥ", "𝐚𝐥𝐢𝐜𝐞", "\u{410}LICE"] {
        let answer = nick(&mut mallory, look_alike);
        assert_eq!(answer["code"], "name_taken", "{look_alike:?}: {answer}");
    }

    // A private message to a look-alike of a name reaches the holder of that name.
    mallory.send_json(json!({"type":"message","text":"psst","to":CYRILLIC_ALICE}));
    let received = alice.expect("message");
    assert_eq!(
        (received["to"].as_str(), received["private"].as_bool()),
        (Some("alice"), Some(true))
    );

    // Once alice leaves, her key is free again, for any of its spellings.
    alice.close();
    mallory.expect("left");
    let answer = nick(&mut mallory, "ＡＬＩＣＥ");
    assert_eq!(answer["type"], "renamed", "{answer}");
    assert_eq!(
        answer["name"], "ALICE",
        "the name is shown in its NFKC form"
    );
}

#[test]
fn invisible_characters_are_bad_names() {
    let server = start(config());
    let (_alice, _) = join_as(&server, "alice");
    let (mut c, name) = join_as(&server, "alice\u{200B}");
    assert!(name.starts_with("guest-"), "{name}");
    let error = c.expect("error");
    assert_eq!(error["code"], "bad_name");
    assert!(
        error["message"].as_str().unwrap().contains("U+200B"),
        "{error}"
    );

    for bad in [
        "\u{FEFF}bob",
        "bo\u{AD}b",
        "\u{202E}bob",
        "\u{200B}",
        "\u{3164}",
        "bo\u{2028}b",
    ] {
        let (mut c, name) = join_as(&server, bad);
        assert!(name.starts_with("guest-"), "{bad:?} got {name}");
        assert_eq!(c.expect("error")["code"], "bad_name", "{bad:?}");
    }
    let answer = nick(&mut c, "zoe\u{200D}");
    assert_eq!(answer["code"], "bad_name", "{answer}");
}

#[test]
fn server_and_guest_names_are_reserved() {
    let server = start(config());
    let (mut c, name) = join_as(&server, "server");
    assert!(name.starts_with("guest-"), "{name}");
    assert_eq!(c.expect("error")["code"], "bad_name");
    for reserved in ["guest-99", "Server", "GUEST-1", "server"] {
        let answer = nick(&mut c, reserved);
        assert_eq!(answer["code"], "bad_name", "{reserved:?}: {answer}");
    }
    // Guests still get their names, and can be written to by any spelling of them.
    let (mut other, other_name) = join_as(&server, "bob");
    assert_eq!(other_name, "bob");
    other.send_json(json!({"type":"message","text":"hi","to":name.to_uppercase()}));
    assert_eq!(c.expect("message")["to"], name.as_str());
}

#[test]
fn the_api_posts_as_server_but_not_as_a_guest() {
    let server = start(Config {
        api_token: Some("t0ken".into()),
        ..config()
    });
    let (mut c, _) = Client::join(&server, "/chat/ops");
    let post = |from: &str| {
        let body = json!({"text":"deployed","from":from}).to_string();
        let addr = server.http_addr();
        http_request(
            addr,
            &format!(
                "POST /api/rooms/ops/messages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer t0ken\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let (status, _, body) = post("server");
    assert_eq!(status, 201, "{body}");
    assert_eq!(c.expect("message")["from"], "server");
    for refused in ["guest-3", "\u{455}erver", "Server", "bot\u{200B}"] {
        let (status, _, body) = post(refused);
        assert_eq!(status, 400, "{refused:?}: {body}");
        assert!(body.contains("bad_name"), "{refused:?}: {body}");
    }
}
