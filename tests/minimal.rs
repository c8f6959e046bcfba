//! The minimal chat (`examples/minimal.rs`) as a student runs it: the example's own binary in a
//! child process on a free port, real WebSocket clients over 127.0.0.1, and its log read back.

mod example_server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use example_server::{Minimal, WAIT, binary, connect, expect_text, next_text, send};
use socket2::{Domain, SockRef, Socket, Type};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// Size of each message in the slow-client test: big enough to fill socket buffers quickly.
const BIG_MESSAGE: usize = 16 * 1024;
/// The slow client's receive buffer: fixed, so the kernel does not grow it to tcp_rmem's max
/// (32 MiB on some hosts), and not tiny, so reading what is left at the end is quick.
const SLOW_CLIENT_RCVBUF: usize = 64 * 1024;
/// Most messages the slow-client test sends before giving up (32 MiB at `BIG_MESSAGE`), far
/// beyond the example's queue (128) plus what socket buffers hold.
const MOST_BIG_MESSAGES: usize = 2048;

#[test]
fn it_prints_where_it_listens_and_logs_connects_and_disconnects() {
    let server = Minimal::start();
    assert!(server.addr.ip().is_loopback() && server.addr.port() != 0);
    let mut ws = server.join("ada");
    assert!(server.saw_log("a user connected"));
    ws.close(None).unwrap();
    assert!(server.saw_log("user disconnected"));
}

#[test]
fn echo_hello_world() {
    let server = Minimal::start();
    let mut ws = server.join("ada");
    send(&mut ws, "hello world");
    assert_eq!(next_text(&mut ws), "hello world");
}

#[test]
fn two_clients_see_each_others_messages() {
    let server = Minimal::start();
    let mut ada = server.join("ada");
    let mut bob = server.join("bob");
    send(&mut ada, "hi bob");
    expect_text(&mut bob, "hi bob");
    expect_text(&mut ada, "hi bob");
    send(&mut bob, "hi ada");
    expect_text(&mut ada, "hi ada");
    expect_text(&mut bob, "hi ada");
}

#[test]
fn a_ping_is_answered_with_a_pong_carrying_its_payload() {
    let server = Minimal::start();
    let mut ws = server.join("ada");
    ws.send(Message::Ping("are you there".into())).unwrap();
    loop {
        match ws.read().expect("a pong before the timeout") {
            Message::Pong(payload) => break assert_eq!(&payload[..], b"are you there"),
            Message::Text(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[test]
fn a_close_frame_is_answered_with_the_same_code_and_the_connection_ends() {
    let server = Minimal::start();
    let mut ws = server.join("ada");
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.close(Some(bye)).unwrap();
    let reply = loop {
        match ws.read().expect("a close reply before the timeout") {
            Message::Close(frame) => break frame,
            _ => continue,
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::Normal));
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
    assert!(server.saw_log("user disconnected"));
}

#[test]
fn binary_frames_are_refused_with_close_1003() {
    let server = Minimal::start();
    let mut ws = server.join("ada");
    ws.send(Message::Binary(vec![1, 2, 3].into())).unwrap();
    let reply = loop {
        match ws.read().expect("a close before the timeout") {
            Message::Close(frame) => break frame,
            _ => continue,
        }
    };
    assert_eq!(reply.map(|f| f.code), Some(CloseCode::Unsupported));
}

#[test]
fn a_client_that_never_reads_is_dropped_while_the_others_keep_chatting() {
    let server = Minimal::start();
    let mut ada = server.join("ada");
    let mut bob = server.join("bob");
    // A fixed receive buffer (no autotuning up to tcp_rmem's max), so the server's queue for
    // this client fills soon.
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(SLOW_CLIENT_RCVBUF).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let mut sloth = connect(socket.into(), server.addr);
    send(&mut sloth, "sloth is here");
    expect_text(&mut ada, "sloth is here");
    expect_text(&mut bob, "sloth is here");

    let big = "x".repeat(BIG_MESSAGE);
    let mut sent = 0;
    while sent < MOST_BIG_MESSAGES && !server.logged_already("too slow") {
        send(&mut ada, &big);
        assert_eq!(next_text(&mut ada).len(), BIG_MESSAGE);
        assert_eq!(next_text(&mut bob).len(), BIG_MESSAGE);
        sent += 1;
    }
    assert!(
        sent < MOST_BIG_MESSAGES || server.saw_log("too slow"),
        "the client that never reads was not dropped after {sent} messages"
    );

    send(&mut ada, "still here");
    expect_text(&mut bob, "still here");
    expect_text(&mut ada, "still here");
    assert!(
        server.saw_log("user disconnected"),
        "the slow client's threads did not end"
    );
    // The dropped client gets what was already on its way, then the end of the connection.
    let deadline = Instant::now() + WAIT;
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "the slow client's connection is still open"
        );
        match sloth.read() {
            Ok(Message::Text(text)) => assert_ne!(text.as_str(), "still here"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        !matches!(&end, tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
}

#[test]
fn a_dead_client_is_removed_and_the_others_are_unaffected() {
    let server = Minimal::start();
    let mut ada = server.join("ada");
    let bob = server.join("bob");
    assert!(server.saw_log("a user connected") && server.saw_log("a user connected"));
    // No close frame: the socket is reset, as when a process dies.
    SockRef::from(bob.get_ref())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(bob);
    assert!(server.saw_log("user disconnected"));
    send(&mut ada, "anyone?");
    expect_text(&mut ada, "anyone?");
}

#[test]
fn a_plain_http_request_gets_400_and_a_reason() {
    let server = Minimal::start();
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\nThis is a WebSocket server.\n"),
        "{answer}"
    );
    assert!(server.saw_log("handshake failed"));
}

#[test]
fn a_port_that_is_not_a_number_is_a_one_line_error() {
    let out = Command::new(binary()).env("PORT", "five").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("minimal: PORT is not a port number"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
