//! Issue 2: the core chat server over real sockets.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[test]
fn should_echo_chat_messages_back_to_user() {
    let server = start(config());
    let (mut client, _) = Client::join(&server, "/chat");
    client.send("hello world");
    assert_eq!(client.expect_text(), "hello world");
    server.shutdown();
}

#[test]
fn welcome_names_the_connection_and_the_users() {
    let server = start(config());
    let (_alice, _) = Client::join(&server, "/chat?name=alice");
    let (_guest, welcome) = Client::join(&server, "/chat");
    let id = welcome["client_id"].as_u64().unwrap();
    assert_eq!(welcome["name"], format!("guest-{id}"));
    assert_eq!(welcome["users"], json!(["alice", format!("guest-{id}")]));
    assert_eq!(welcome["count"], 2);
    assert_eq!(welcome.get("id"), None, "a welcome has no message id");
    server.shutdown();
}

#[test]
fn welcome_last_id_is_the_since_that_resumes_right_after_it() {
    let server = start(config());
    let (mut alice, empty) = Client::join(&server, "/chat?name=alice");
    assert_eq!(empty["last_id"], 0, "an empty room: {empty}");
    alice.send("first");
    let first = alice.expect("message")["id"].as_u64().unwrap();
    let (_bob, welcome) = Client::join(&server, "/chat?name=bob");
    assert_eq!(welcome["last_id"].as_u64(), Some(first));
    alice.send("second");
    let second = alice.expect("message")["id"].clone();
    let path = format!("/chat?name=carol&since={first}");
    let (_carol, resumed) = Client::join(&server, &path);
    let ids: Vec<&Value> = resumed["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["id"])
        .collect();
    assert_eq!(ids, [&second], "{resumed}");
    assert_eq!(resumed["last_id"], second);
    server.shutdown();
}

#[test]
fn a_client_quiet_past_the_door_timeouts_and_the_stack_trim_still_chats() {
    // The door's socket timeouts stay set after the 101 (the session sets its own), and the
    // session gives back its stack pages once it is a second old: neither may end it.
    let server = start(wschat::Config {
        handshake_timeout: Duration::from_millis(300),
        ..config()
    });
    let (mut client, _) = Client::join(&server, "/chat");
    std::thread::sleep(Duration::from_millis(1500));
    client.send("still here");
    assert_eq!(client.expect_text(), "still here");
    server.shutdown();
}

#[test]
fn three_clients_each_receive_a_message_exactly_once() {
    let server = start(config());
    let mut clients: Vec<_> = (0..3).map(|_| Client::join(&server, "/chat").0).collect();
    for c in &mut clients[1..] {
        c.expect_none("nothing", Duration::from_millis(50)); // drain presence
    }
    clients[0].send(r#"{"type":"message","text":"once"}"#);
    for c in &mut clients {
        let m = c.expect("message");
        assert_eq!(m["text"], "once");
        assert!(m["id"].as_u64().unwrap() > 0 && m["ts"].as_u64().unwrap() > 1_700_000_000_000);
        c.expect_none("message", Duration::from_millis(200));
    }
    server.shutdown();
}

#[test]
fn message_ids_increase() {
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    c.send("a");
    c.send(r#"{"type":"message","text":"b"}"#);
    let (a, b) = (c.expect("message"), c.expect("message"));
    assert!(b["id"].as_u64() > a["id"].as_u64());
    server.shutdown();
}

#[test]
fn disconnect_produces_left_for_the_others() {
    let server = start(config());
    let (mut alice, _) = Client::join(&server, "/chat?name=alice");
    let (bob, _) = Client::join(&server, "/chat?name=bob");
    assert_eq!(alice.expect("joined")["name"], "bob");
    drop(bob); // abrupt: no close frame
    let left = alice.expect("left");
    assert_eq!(
        (left["name"].as_str(), left["count"].as_u64()),
        (Some("bob"), Some(1))
    );
    server.shutdown();
}

#[test]
fn nickname_change_is_announced_and_used() {
    let server = start(config());
    let (mut alice, _) = Client::join(&server, "/chat");
    let (mut bob, _) = Client::join(&server, "/chat");
    alice.send(r#"{"type":"nick","name":"  Alice  "}"#);
    for c in [&mut alice, &mut bob] {
        let r = c.expect("renamed");
        assert_eq!(r["name"], "Alice");
        assert!(r["from"].as_str().unwrap().starts_with("guest-"));
    }
    alice.send("hi");
    assert_eq!(bob.expect("message")["from"], "Alice");
    // The same name again changes nothing, so nobody hears of it; a new case is a change.
    alice.send(r#"{"type":"nick","name":"Alice"}"#);
    bob.expect_none("renamed", Duration::from_millis(300));
    alice.send(r#"{"type":"nick","name":"ALICE"}"#);
    assert_eq!(bob.expect("renamed")["name"], "ALICE");
    server.shutdown();
}

#[test]
fn subprotocol_chat_is_selected_only_when_offered() {
    let server = start(config());
    for (offer, expected) in [("chat, superchat", Some("chat")), ("superchat", None)] {
        let mut stream = TcpStream::connect(server.ws_addr()).unwrap();
        stream
            .write_all(
                upgrade_request("/chat", &format!("Sec-WebSocket-Protocol: {offer}\r\n"))
                    .as_bytes(),
            )
            .unwrap();
        let head = handshake_head(&mut stream).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let chosen = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-protocol: "))
            .map(str::trim);
        assert_eq!(chosen, expected, "{head}");
    }
    server.shutdown();
}

#[test]
fn wrong_path_is_404_and_plain_get_is_426() {
    let server = start(config());
    let r = raw_request(server.ws_addr(), upgrade_request("/nope", "").as_bytes());
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = raw_request(server.ws_addr(), b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(
        r.contains(&format!("http://127.0.0.1:{}/", server.http_addr().port())),
        "426 points at the page: {r}"
    );
    server.shutdown();
}

#[test]
fn every_error_case_gets_its_code_and_the_connection_stays() {
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    let cases = [
        ("{oops", "bad_request"),
        (r#"{"type":"dance"}"#, "bad_request"),
        (r#"{"type":"message"}"#, "bad_request"),
        ("   ", "empty_message"),
        (r#"{"type":"message","text":" \n "}"#, "empty_message"),
        (r#"{"type":"nick","name":""}"#, "bad_name"),
    ];
    for (frame, code) in cases {
        c.send(frame);
        let e = c.expect("error");
        assert_eq!(e["code"], code, "for {frame}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    c.ws.send(tungstenite::Message::Binary(vec![1, 2, 3].into()))
        .unwrap();
    assert_eq!(c.expect("error")["code"], "unsupported");
    c.send("still here");
    assert_eq!(c.expect_text(), "still here");
    server.shutdown();
}

#[test]
fn an_oversized_message_is_closed_with_1009() {
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    let _ = c.ws.send(text_frame(&"x".repeat(70 * 1024)));
    assert_eq!(c.expect_close(), Some(1009));
    server.shutdown();
}

#[test]
fn fifty_clients_twenty_messages_each_arrive_complete_in_order() {
    let mut cfg = config();
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    let server = start(cfg);
    let mut clients: Vec<Client> = (0..50)
        .map(|i| Client::join(&server, &format!("/chat?name=c{i}")).0)
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        for n in 0..20 {
            c.send(&format!("{i}:{n}"));
        }
    }
    let receivers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut next = [0u32; 50];
                let mut seen = HashSet::new();
                while seen.len() < 1000 {
                    let m = c.expect("message");
                    assert!(seen.insert(m["id"].as_u64().unwrap()), "duplicate {m}");
                    let (sender, n) = m["text"].as_str().unwrap().split_once(':').unwrap();
                    let (sender, n): (usize, u32) = (sender.parse().unwrap(), n.parse().unwrap());
                    assert_eq!(n, next[sender], "sender {sender} out of order");
                    next[sender] += 1;
                }
                c.expect_none("message", Duration::from_millis(100));
            })
        })
        .collect();
    for r in receivers {
        r.join().expect("receiver got all 1000 in order");
    }
    server.shutdown();
}

#[test]
fn abrupt_resets_mid_frame_leave_the_server_answering() {
    let server = start(config());
    for _ in 0..200 {
        let mut s = TcpStream::connect(server.ws_addr()).unwrap();
        s.write_all(upgrade_request("/chat", "").as_bytes())
            .unwrap();
        let _ = handshake_head(&mut s);
        // A masked text frame header announcing 100 bytes, then only 3 of them, then RST.
        let _ = s.write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4, b'a', b'b', b'c']);
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    let (mut c, _) = Client::join(&server, "/chat");
    c.send("alive?");
    assert_eq!(c.expect_text(), "alive?");
    let deadline = Instant::now() + WAIT;
    while server.live_connections() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.live_connections(),
        1,
        "every reset connection's threads ended"
    );
    server.shutdown();
}

#[test]
fn a_client_that_stops_reading_is_dropped_while_others_chat() {
    let mut cfg = config();
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    cfg.client_queue = 64;
    let server = start(cfg);
    // The staller never reads; its socket buffers fill, then its queue, then it is dropped.
    let staller = TcpStream::connect(server.ws_addr()).unwrap();
    socket2::SockRef::from(&staller)
        .set_recv_buffer_size(4096)
        .unwrap();
    let (_ws, _) = tungstenite::client(
        format!("ws://{}/chat?name=staller", server.ws_addr()),
        staller,
    )
    .unwrap();
    let (mut talker, _) = Client::join(&server, "/chat?name=talker");
    let big = "y".repeat(8 * 1024);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut staller_left = false;
    while !staller_left {
        talker.send(&big);
        loop {
            let frame = talker.recv();
            match frame["type"].as_str() {
                Some("message") => {
                    assert_eq!(frame["text"].as_str().map(str::len), Some(big.len()));
                    break;
                }
                Some("left") => {
                    assert_eq!(frame["name"], "staller");
                    staller_left = true;
                }
                _ => panic!("unexpected {frame}"),
            }
        }
        assert!(Instant::now() < deadline, "the staller was never dropped");
    }
    let dropped = server
        .metrics()
        .slow_clients_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dropped, 1);
    talker.send("after");
    assert_eq!(talker.expect_text(), "after");
    server.shutdown();
}

#[test]
fn shutdown_sends_1001_and_returns_promptly() {
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    let t0 = Instant::now();
    let closer = std::thread::spawn(move || c.expect_close());
    server.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(closer.join().unwrap(), Some(1001));
}

#[test]
fn a_clients_close_frame_is_answered_with_one() {
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    c.ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    let answer = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close frame came back: {e}"),
        }
    };
    assert_eq!(answer.map(|f| u16::from(f.code)), Some(1000));
    server.shutdown();
}
