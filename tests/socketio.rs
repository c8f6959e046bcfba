//! socket.io clients at `/socket.io/` on the one port, over real sockets: Engine.IO's polling
//! (`GET` waits, `POST` sends), the upgrade to WebSocket, WebSocket-only sessions, and every
//! limit of the raw path (malformed packets, a slow poller, the per-address cap, the origin
//! check, keepalive, shutdown). The mocha tests in tests/socketio drive the real socket.io client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, WAIT, config, metric, start};
use serde_json::Value;
use tungstenite::{Message, WebSocket};

const POLLING: &str = "/socket.io/?EIO=4&transport=polling";

/// One HTTP request on a connection of its own: the status and the body.
fn http(addr: SocketAddr, method: &str, target: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("the whole response");
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let status = head[9..12].parse().expect("a status");
    (status, body.to_owned())
}

/// A polling session: its id, from the `open` packet.
fn open_polling(addr: SocketAddr, query: &str) -> (String, Value) {
    let (status, body) = http(addr, "GET", &format!("{POLLING}{query}"), "", "");
    assert_eq!(status, 200, "{body}");
    let open: Value =
        serde_json::from_str(body.strip_prefix('0').expect("an open packet")).unwrap();
    (open["sid"].as_str().unwrap().to_owned(), open)
}

fn get(addr: SocketAddr, sid: &str) -> (u16, String) {
    http(addr, "GET", &format!("{POLLING}&sid={sid}"), "", "")
}

fn post(addr: SocketAddr, sid: &str, body: &str) -> (u16, String) {
    http(addr, "POST", &format!("{POLLING}&sid={sid}"), "", body)
}

/// Polls until a packet satisfying `wanted` arrives; returns it. Packets before it are dropped,
/// packets after it in the same answer are kept in `rest` for the next call.
fn poll_until(addr: SocketAddr, sid: &str, wanted: impl Fn(&str) -> bool) -> String {
    poll_from(addr, sid, &mut Vec::new(), wanted)
}

fn poll_from(
    addr: SocketAddr,
    sid: &str,
    rest: &mut Vec<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if rest.is_empty() {
            let (status, body) = get(addr, sid);
            assert_eq!(status, 200, "{body}");
            rest.extend(body.split('\u{1e}').map(str::to_owned));
        }
        let packet = rest.remove(0);
        if wanted(&packet) {
            return packet;
        }
    }
    panic!("no such packet within {WAIT:?}");
}

/// A socket.io client on polling, connected to `/` and welcomed.
fn connected_poller(addr: SocketAddr, query: &str) -> String {
    let (sid, _) = open_polling(addr, query);
    assert_eq!(post(addr, &sid, "40"), (200, "ok".into()));
    let mut rest = Vec::new();
    poll_from(addr, &sid, &mut rest, |p| p.starts_with("40{\"sid\""));
    poll_from(addr, &sid, &mut rest, |p| p.starts_with("42[\"welcome\""));
    assert!(rest.is_empty(), "{rest:?}");
    sid
}

fn websocket(addr: SocketAddr, query: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket{query}");
    tungstenite::client(url, stream).expect("handshake").0
}

/// The next text frame (WebSocket pings skipped).
fn next_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn text_until(ws: &mut WebSocket<TcpStream>, wanted: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let text = next_text(ws);
        if wanted(&text) {
            return text;
        }
    }
    panic!("no such frame within {WAIT:?}");
}

fn send(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// The close code the server ends a WebSocket with (reading through what comes before it).
fn close_code(ws: &mut WebSocket<TcpStream>) -> Option<u16> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    panic!("still open after {WAIT:?}");
}

#[test]
fn polling_handshake_then_chat_by_post_and_get() {
    let mut cfg = config();
    cfg.max_message_bytes = 5000;
    let server = start(cfg);
    let addr = server.addr();
    let (mut raw, _) = Client::join(&server, "/chat/tut?name=rawley");

    let (sid, open) = open_polling(addr, "&room=tut&name=poll");
    assert_eq!(sid.len(), 20);
    assert_eq!(open["upgrades"], serde_json::json!(["websocket"]));
    assert_eq!(open["maxPayload"], 5000);
    assert_eq!(open["pingInterval"], 30_000);
    assert_eq!(post(addr, &sid, "40"), (200, "ok".into()));
    let mut rest = Vec::new();
    poll_from(addr, &sid, &mut rest, |p| p.starts_with("40{\"sid\""));
    let welcome = poll_from(addr, &sid, &mut rest, |p| p.starts_with("42[\"welcome\""));
    assert!(welcome.contains("\"name\":\"poll\""), "{welcome}");

    // Two packets in one body; the chat message comes back to its sender, as in the tutorial.
    let body = "42[\"typing\",true]\u{1e}42[\"chat message\",\"hello world\"]";
    assert_eq!(post(addr, &sid, body), (200, "ok".into()));
    let echo = poll_until(addr, &sid, |p| p.starts_with("42[\"chat message\""));
    assert_eq!(echo, "42[\"chat message\",\"hello world\"]");
    let frame = raw.expect("message");
    assert_eq!(
        (frame["from"].as_str(), frame["text"].as_str()),
        (Some("poll"), Some("hello world"))
    );

    // And the other way.
    raw.send("from raw");
    poll_until(addr, &sid, |p| p == "42[\"chat message\",\"from raw\"]");
}

#[test]
fn a_polling_session_upgrades_to_websocket() {
    let server = start(config());
    let addr = server.addr();
    let sid = connected_poller(addr, "&room=up&name=upper");
    // A GET waits, as the client's does during the probe.
    let poll_sid = sid.clone();
    let waiting = thread::spawn(move || get(addr, &poll_sid));
    thread::sleep(Duration::from_millis(100));
    let mut ws = websocket(addr, &format!("&sid={sid}"));
    send(&mut ws, "2probe");
    assert_eq!(next_text(&mut ws), "3probe");
    let (status, answer) = waiting.join().unwrap();
    assert_eq!(
        (status, answer.as_str()),
        (200, "6"),
        "the waiting GET ends with a noop"
    );
    send(&mut ws, "5");
    send(&mut ws, "42[\"chat message\",\"upgraded\"]");
    text_until(&mut ws, |t| t == "42[\"chat message\",\"upgraded\"]");
    // Polling is over for this session.
    let (status, _) = get(addr, &sid);
    assert_eq!(status, 400);
}

#[test]
fn a_websocket_only_session_opens_on_its_socket() {
    let server = start(config());
    let mut ws = websocket(server.addr(), "&room=wso");
    let open = next_text(&mut ws);
    assert!(
        open.starts_with("0{") && open.contains("\"upgrades\":[]"),
        "{open}"
    );
    send(&mut ws, "40{\"name\":\"socky\"}");
    assert!(next_text(&mut ws).starts_with("40{\"sid\""));
    let welcome = text_until(&mut ws, |t| t.starts_with("42[\"welcome\""));
    assert!(welcome.contains("\"name\":\"socky\"") && welcome.contains("\"room\":\"wso\""));
    // The acknowledgement and the broadcast race each other: either may come first.
    send(&mut ws, "421[\"chat message\",\"acked\"]");
    let wanted = ["431[]", "42[\"chat message\",\"acked\"]"];
    let first = text_until(&mut ws, |t| wanted.contains(&t));
    text_until(&mut ws, |t| wanted.contains(&t) && t != first);
    // The client's DISCONNECT ends the session.
    send(&mut ws, "41");
    assert_eq!(close_code(&mut ws), Some(1000));
}

#[test]
fn a_second_waiting_get_closes_the_session() {
    let server = start(config());
    let addr = server.addr();
    let sid = connected_poller(addr, "");
    let first_sid = sid.clone();
    let first = thread::spawn(move || get(addr, &first_sid));
    thread::sleep(Duration::from_millis(200));
    let (status, body) = get(addr, &sid);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"code\":3"), "{body}");
    assert_eq!(
        first.join().unwrap(),
        (200, "1".into()),
        "the first hears close"
    );
    let (status, body) = get(addr, &sid);
    assert_eq!(status, 400);
    assert!(body.contains("\"code\":1"), "{body}");
}

#[test]
fn malformed_packets_get_clear_errors_never_a_crash() {
    let server = start(config());
    let addr = server.addr();
    // Engine.IO: a bad query, a bad body.
    let (status, body) = http(addr, "GET", "/socket.io/?EIO=3&transport=polling", "", "");
    assert_eq!((status, body.contains("\"code\":5")), (400, true), "{body}");
    let (status, _) = http(
        addr,
        "GET",
        "/socket.io/?EIO=4&transport=carrier-pigeon",
        "",
        "",
    );
    assert_eq!(status, 400);
    let (status, body) = get(addr, "no-such-session");
    assert_eq!((status, body.contains("\"code\":1")), (400, true), "{body}");
    let (sid, _) = open_polling(addr, "");
    let (status, body) = post(addr, &sid, "x");
    assert_eq!((status, body.contains("\"code\":3")), (400, true), "{body}");
    assert_eq!(get(addr, &sid).0, 400, "a bad body closed the session");

    // socket.io: another namespace and a bad room are refused with CONNECT_ERROR; the session
    // lives on.
    let sid = connected_poller(addr, "");
    let mut ws = websocket(addr, "");
    next_text(&mut ws);
    send(&mut ws, "40/admin,");
    assert!(next_text(&mut ws).starts_with("44/admin,{"));
    send(&mut ws, "40{\"room\":\"not a room!\"}");
    let refused = next_text(&mut ws);
    assert!(
        refused.starts_with("44{") && refused.contains("bad_room"),
        "{refused}"
    );
    // An unknown event is an error event; broken JSON closes with 1002.
    send(&mut ws, "40");
    text_until(&mut ws, |t| t.starts_with("40{\"sid\""));
    send(&mut ws, "42[\"launch\",1]");
    text_until(&mut ws, |t| t.starts_with("42[\"error\""));
    send(&mut ws, "42[\"chat message\",");
    assert_eq!(close_code(&mut ws), Some(1002));
    // A binary frame is refused with 1003.
    let mut ws = websocket(addr, "");
    next_text(&mut ws);
    ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(close_code(&mut ws), Some(1003));
    // The server is still there.
    assert_eq!(
        post(addr, &sid, "42[\"chat message\",\"still here\"]").0,
        200
    );
}

#[test]
fn a_polling_body_over_max_payload_is_read_and_answered_413() {
    let server = start(config());
    let addr = server.addr();
    let (sid, open) = open_polling(addr, "");
    assert_eq!(metric(addr, "wschat_socketio_sessions"), 1);
    // 1 MiB from a client with a small send buffer: it is still writing when the server
    // answers, so a server that did not read the body would reset the connection under it.
    let big = 1 << 20;
    assert!(open["maxPayload"].as_u64().unwrap() < big as u64);
    let stream = TcpStream::connect(addr).unwrap();
    socket2::SockRef::from(&stream)
        .set_send_buffer_size(16 * 1024)
        .unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST {POLLING}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {big}\r\n\r\n"
    );
    let request = [head.into_bytes(), vec![b'4'; big]].concat();
    (&stream)
        .write_all(&request)
        .expect("the server reads the body");
    let mut response = String::new();
    (&stream).read_to_string(&mut response).expect("the answer");
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("maxPayload"), "{response}");
    assert_eq!(get(addr, &sid).0, 400, "the session is closed");
    let deadline = Instant::now() + WAIT;
    while metric(addr, "wschat_socketio_sessions") != 0 {
        assert!(Instant::now() < deadline, "the ended session is forgotten");
        thread::sleep(Duration::from_millis(20));
    }
    server.shutdown();
}

#[test]
fn a_polling_client_that_never_fetches_is_dropped_as_too_slow() {
    let mut cfg = config();
    cfg.client_queue_bytes = 4096;
    let server = start(cfg);
    let addr = server.addr();
    let sid = connected_poller(addr, "&room=slow");
    let (mut raw, _) = Client::join(&server, "/chat/slow?name=talker");
    let text = "x".repeat(200);
    for _ in 0..25 {
        raw.send(&text);
    }
    // The poller's queue passed 4 KiB: its session is closed, its user gone from the room.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = raw.expect("left");
        if left["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("guest-"))
        {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    let (status, body) = get(addr, &sid);
    assert!(status == 400 || body == "1", "{status} {body}");
}

#[test]
fn the_per_address_cap_counts_socketio_sessions() {
    let mut cfg = config();
    cfg.max_clients_per_ip = 2;
    let server = start(cfg);
    let addr = server.addr();
    let _raw = Client::connect(addr, "/chat");
    open_polling(addr, "");
    let (status, body) = http(addr, "GET", POLLING, "", "");
    assert_eq!(status, 503, "{body}");
    let refused = TcpStream::connect(addr).unwrap();
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    assert!(
        tungstenite::client(url, refused).is_err(),
        "a WebSocket-only session too"
    );
}

#[test]
fn foreign_origins_are_refused() {
    let server = start(config());
    let addr = server.addr();
    let evil = "Origin: http://evil.example\r\n";
    let (status, _) = http(addr, "GET", POLLING, evil, "");
    assert_eq!(status, 403);
    let own = format!("Origin: http://{addr}\r\n");
    assert_eq!(http(addr, "GET", POLLING, &own, "").0, 200);
    let stream = TcpStream::connect(addr).unwrap();
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request
        .headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    assert!(tungstenite::client(request, stream).is_err());
}

#[test]
fn the_client_script_is_the_named_file_or_a_404_naming_the_flag() {
    let server = start(config());
    let (status, body) = http(server.addr(), "GET", "/socket.io/socket.io.js", "", "");
    assert_eq!(status, 404);
    assert!(body.contains("--socketio-client"), "{body}");
    let file = std::env::temp_dir().join(format!("wschat-sio-{}.js", std::process::id()));
    std::fs::write(&file, "/* not socket.io */").unwrap();
    let mut cfg = config();
    cfg.socketio_client = Some(file.clone());
    let server = start(cfg);
    let (status, body) = http(server.addr(), "GET", "/socket.io/socket.io.js", "", "");
    std::fs::remove_file(file).unwrap();
    assert_eq!((status, body.as_str()), (200, "/* not socket.io */"));
}

#[test]
fn pings_keep_sessions_and_silence_ends_them() {
    let mut cfg = config();
    cfg.ping_interval = Duration::from_secs(1);
    let server = start(cfg);
    let addr = server.addr();
    // Polling: the ping comes through a GET; answered, the session lives on.
    let sid = connected_poller(addr, "");
    poll_until(addr, &sid, |p| p == "2");
    assert_eq!(post(addr, &sid, "3"), (200, "ok".into()));
    // Unanswered, it ends the session after the timeout.
    poll_until(addr, &sid, |p| p == "2");
    let deadline = Instant::now() + WAIT;
    while get(addr, &sid).0 == 200 {
        assert!(Instant::now() < deadline, "a silent poller was not dropped");
    }
    // WebSocket: Engine.IO's ping is a text frame "2"; silence closes the socket.
    let mut ws = websocket(addr, "");
    next_text(&mut ws);
    text_until(&mut ws, |t| t == "2");
    close_code(&mut ws); // panics if the socket is still open after WAIT
}

#[test]
fn shutdown_answers_waiting_polls_and_closes_websockets_with_1001() {
    let server = start(config());
    let addr = server.addr();
    let sid = connected_poller(addr, "");
    let waiting = thread::spawn(move || poll_until(addr, &sid, |p| p == "1"));
    let mut ws = websocket(addr, "");
    next_text(&mut ws);
    send(&mut ws, "40");
    text_until(&mut ws, |t| t.starts_with("40{"));
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() < WAIT, "shutdown waited for the poll");
    assert_eq!(waiting.join().unwrap(), "1");
    assert_eq!(close_code(&mut ws), Some(1001));
}
