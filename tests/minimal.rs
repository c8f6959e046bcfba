//! The minimal chat (`examples/minimal.rs`) as a student runs it: the example's own binary in a
//! child process on a free port, real WebSocket clients over 127.0.0.1, and its log read back.
//! Also used by `tests/tutorial.rs`, which runs the tutorial's commands against it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use socket2::{Domain, SockRef, Socket, Type};
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// Longest any test waits for one expected frame or log line.
const WAIT: Duration = Duration::from_secs(10);
/// Size of each message in the slow-client test: big enough to fill socket buffers quickly.
const BIG_MESSAGE: usize = 16 * 1024;
/// The slow client's receive buffer: fixed, so the kernel does not grow it to tcp_rmem's max
/// (32 MiB on some hosts), and not tiny, so reading what is left at the end is quick.
const SLOW_CLIENT_RCVBUF: usize = 64 * 1024;
/// Most messages the slow-client test sends before giving up (32 MiB at `BIG_MESSAGE`), far
/// beyond the example's queue (128) plus what socket buffers hold.
const MOST_BIG_MESSAGES: usize = 2048;

/// The example's binary, built by the cargo that runs these tests (`cargo test` builds examples,
/// but `cargo test --test minimal` does not), next to this test's own binary.
pub fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("the test binary's path");
        // target/<profile>/deps/minimal-<hash> -> target/<profile>/examples/minimal
        let profile_dir = test_exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("deps dir");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--example", "minimal"]);
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        let status = cargo.current_dir(env!("CARGO_MANIFEST_DIR")).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cargo build --example minimal failed"
        );
        let path = profile_dir
            .join("examples")
            .join(format!("minimal{}", std::env::consts::EXE_SUFFIX));
        assert!(path.exists(), "no example binary at {}", path.display());
        path
    })
}

/// A running example: killed when dropped.
pub struct Minimal {
    child: Child,
    pub addr: SocketAddr,
    log: Receiver<String>,
}

impl Minimal {
    /// Starts the example with `PORT=0` and waits for the address it prints.
    pub fn start() -> Minimal {
        let mut child = Command::new(binary())
            .env("PORT", "0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example starts");
        let mut first = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut first)
            .expect("stdout");
        let addr = first.trim().strip_prefix("listening on ws://");
        let addr = addr
            .and_then(|a| a.parse().ok())
            .expect("'listening on ws://ADDR' first");
        let (lines, log) = crossbeam_channel::unbounded();
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        thread::spawn(move || {
            stderr
                .lines()
                .map_while(Result::ok)
                .try_for_each(|l| lines.send(l))
        });
        Minimal { child, addr, log }
    }

    /// Waits (at most `WAIT`) for a log line containing `needle`; false if none came.
    pub fn saw_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + WAIT;
        while let Ok(line) = self.log.recv_deadline(deadline) {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// Has a log line containing `needle` come by now? (Does not wait.)
    fn logged_already(&self, needle: &str) -> bool {
        self.log.try_iter().any(|line| line.contains(needle))
    }

    /// A connected client, known to the dispatcher: its own first message came back.
    pub fn join(&self, name: &str) -> WebSocket<TcpStream> {
        let mut ws = connect(
            TcpStream::connect(self.addr).expect("tcp connect"),
            self.addr,
        );
        let probe = format!("{name} is here");
        send(&mut ws, &probe);
        expect_text(&mut ws, &probe);
        ws
    }
}

impl Drop for Minimal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(stream: TcpStream, addr: SocketAddr) -> WebSocket<TcpStream> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    ws
}

fn send(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::Text(text.into())).expect("send");
}

/// The next text frame (control frames skipped).
fn next_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads text frames until one equals `want` (others, like later clients' probes, skipped).
fn expect_text(ws: &mut WebSocket<TcpStream>, want: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if next_text(ws) == want {
            return;
        }
    }
    panic!("no {want:?} within {WAIT:?}");
}

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
