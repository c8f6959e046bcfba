//! The echo endpoint (`--echo`, for the Autobahn suite): the chat's session code with the
//! dispatcher taken out. Every test talks to a real server over 127.0.0.1.

mod common;

use std::time::Duration;

use common::{Client, config, http_request, start, upgrade_request};
use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use wschat::{Config, Handle};

fn echo_server(config: Config) -> Handle {
    start(Config {
        echo: true,
        ..config
    })
}

/// The next data message, skipping pings and pongs.
fn next_message(client: &mut Client) -> Message {
    loop {
        match client.ws.read().expect("a message before the timeout") {
            Message::Ping(_) | Message::Pong(_) => continue,
            message => return message,
        }
    }
}

/// Sends one raw frame as it is (fragments, bad payloads).
fn send_frame(client: &mut Client, opcode: OpCode, payload: &[u8], is_final: bool) {
    let frame = Frame::message(payload.to_vec(), opcode, is_final);
    client.ws.send(Message::Frame(frame)).expect("send a frame");
}

#[test]
fn text_comes_back_as_text_and_binary_as_binary() {
    let server = echo_server(config());
    let mut client = Client::connect(server.ws_addr(), "/echo");
    client.send("hello, échő");
    assert_eq!(next_message(&mut client), Message::text("hello, échő"));
    let bytes = vec![0u8, 1, 2, 255, 254];
    client.ws.send(Message::binary(bytes.clone())).unwrap();
    assert_eq!(next_message(&mut client), Message::binary(bytes));
    // Not JSON, not a command: the dispatcher never sees it, so nothing else comes.
    client.send(r#"{"type":"join","room":"x"}"#);
    assert_eq!(
        next_message(&mut client),
        Message::text(r#"{"type":"join","room":"x"}"#)
    );
}

#[test]
fn a_fragmented_message_comes_back_whole() {
    let server = echo_server(config());
    let mut client = Client::connect(server.ws_addr(), "/echo");
    send_frame(&mut client, OpCode::Data(Data::Text), b"frag", false);
    send_frame(&mut client, OpCode::Data(Data::Continue), b"men", false);
    // A ping between fragments is answered at once, and the message goes on.
    let ping = Frame::ping(b"mid".to_vec());
    client.ws.send(Message::Frame(ping)).unwrap();
    send_frame(&mut client, OpCode::Data(Data::Continue), b"ted", true);
    assert_eq!(client.ws.read().unwrap(), Message::Pong("mid".into()));
    assert_eq!(next_message(&mut client), Message::text("fragmented"));
}

#[test]
fn a_ping_gets_its_payload_back_in_a_pong() {
    let server = echo_server(config());
    let mut client = Client::connect(server.ws_addr(), "/echo");
    client
        .ws
        .send(Message::Ping(vec![7u8; 125].into()))
        .unwrap();
    assert_eq!(
        client.ws.read().unwrap(),
        Message::Pong(vec![7u8; 125].into())
    );
}

#[test]
fn close_codes() {
    let server = echo_server(config());
    // The client's close is answered with the same code.
    let mut client = Client::connect(server.ws_addr(), "/echo");
    let frame = tungstenite::protocol::CloseFrame {
        code: 4000.into(),
        reason: "bye".into(),
    };
    client.ws.close(Some(frame)).unwrap();
    assert_eq!(client.expect_close(), Some(4000));
    // A close code no endpoint may send: protocol error.
    let mut client = Client::connect(server.ws_addr(), "/echo");
    let bad = Frame::close(Some(tungstenite::protocol::CloseFrame {
        code: 999.into(),
        reason: "".into(),
    }));
    client.ws.send(Message::Frame(bad)).unwrap();
    assert_eq!(client.expect_close(), Some(1002));
    // Text that is not UTF-8: 1007.
    let mut client = Client::connect(server.ws_addr(), "/echo");
    send_frame(&mut client, OpCode::Data(Data::Text), &[b'a', 0xff], true);
    assert_eq!(client.expect_close(), Some(1007));
}

#[test]
fn a_message_over_the_limit_closes_with_1009() {
    let server = echo_server(Config {
        max_message_bytes: 1024,
        ..config()
    });
    let mut client = Client::connect(server.ws_addr(), "/echo");
    client.send(&"x".repeat(1024));
    assert_eq!(next_message(&mut client), Message::text("x".repeat(1024)));
    // Over the limit in fragments that are each small: the message is what counts.
    send_frame(&mut client, OpCode::Data(Data::Binary), &[1; 600], false);
    send_frame(&mut client, OpCode::Data(Data::Continue), &[2; 600], true);
    assert_eq!(client.expect_close(), Some(1009));
}

#[test]
fn echo_is_rate_limited_like_chat() {
    let server = echo_server(Config {
        rate: 1.0,
        burst: 2.0,
        ..config()
    });
    let mut client = Client::connect(server.ws_addr(), "/echo");
    for text in ["one", "two", "three"] {
        client.send(text);
    }
    assert_eq!(next_message(&mut client), Message::text("one"));
    assert_eq!(next_message(&mut client), Message::text("two"));
    let Message::Text(refused) = next_message(&mut client) else {
        panic!("expected an error frame")
    };
    let refused: serde_json::Value = serde_json::from_str(&refused).unwrap();
    assert_eq!(refused["code"], "rate_limited", "{refused}");
}

#[test]
fn off_by_default_it_is_not_found() {
    let server = start(config());
    let (status, _, body) = http_request(server.ws_addr(), &upgrade_request("/echo", ""));
    assert_eq!(status, 404, "{body}");
    // And an echo server still serves the chat beside it, which never hears of echo clients.
    let server = echo_server(config());
    let mut echo = Client::connect(server.ws_addr(), "/echo");
    let (mut chat, welcome) = Client::join(&server, "/chat?name=ada");
    assert_eq!(welcome["users"], serde_json::json!(["ada"]));
    echo.send("ping");
    assert_eq!(next_message(&mut echo), Message::text("ping"));
    chat.expect_none("joined", Duration::from_millis(200));
}
