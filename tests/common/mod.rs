//! Helpers shared by the integration tests: an in-process server on free ports, and a small
//! blocking WebSocket client with timeouts on every wait.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::{Message, Utf8Bytes};
use wschat::{Config, Handle, Server};

/// Longest any test waits for one expected frame.
pub const WAIT: Duration = Duration::from_secs(5);

/// A config on free ports, quiet limits suited to tests.
pub fn config() -> Config {
    Config {
        http_port: 0,
        // Tests open connections far faster than a person: the rate has tests of its own.
        conn_rate_per_ip: 0.0,
        ..Config::default()
    }
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.0/8 is all this host's):
/// how a test plays a second client address.
pub fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    let local = SocketAddr::from((from, 0));
    socket
        .bind(&local.into())
        .expect("bind a loopback source address");
    socket.connect(&addr.into()).expect("tcp connect");
    socket.into()
}

/// Reads a child server's first stdout line, `wschat listening: http://H:P/ (websocket
/// ws://H:P/chat)`, and returns the page's and the WebSocket's `host:port`.
pub fn read_listening_line(child: &mut std::process::Child) -> (String, String) {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("the startup line");
    let addrs = line
        .trim()
        .strip_prefix("wschat listening: http://")
        .and_then(|rest| rest.split_once("/ (websocket ws://"))
        .and_then(|(http, rest)| Some((http, rest.strip_suffix("/chat)")?)));
    let (http, ws) = addrs.unwrap_or_else(|| panic!("startup line: {line:?}"));
    (http.to_owned(), ws.to_owned())
}

pub fn start(config: Config) -> Handle {
    let _ = env_logger::builder().is_test(true).try_init();
    Server::start(config).expect("server starts")
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    /// Connects to `path` (e.g. `/chat?name=alice`) and returns once the `welcome` arrived.
    pub fn join(handle: &Handle, path: &str) -> (Client, Value) {
        let mut client = Client::connect(handle.ws_addr(), path);
        let welcome = client.expect("welcome");
        (client, welcome)
    }

    pub fn connect(addr: SocketAddr, path: &str) -> Client {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _response) =
            tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
        Client { ws }
    }

    pub fn send(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).expect("send");
    }

    pub fn send_json(&mut self, value: Value) {
        self.send(&value.to_string());
    }

    /// The next frame; a read a signal interrupted is tried again (tungstenite keeps what it
    /// had buffered), so that a signal to the test process is not taken for a lost frame.
    pub fn read(&mut self) -> tungstenite::Result<Message> {
        loop {
            match self.ws.read() {
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// The next text frame as JSON (pings and pongs are skipped).
    pub fn recv(&mut self) -> Value {
        loop {
            match self.read().expect("a frame before the timeout") {
                Message::Text(t) => {
                    return serde_json::from_str(&t).expect("server frames are JSON");
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame of type `kind`, skipping others (presence, typing) on the way.
    pub fn expect(&mut self, kind: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let v = self.recv();
            if v["type"] == kind {
                return v;
            }
        }
        panic!("no {kind} frame within {WAIT:?}");
    }

    /// The next chat message's text.
    pub fn expect_text(&mut self) -> String {
        self.expect("message")["text"].as_str().unwrap().to_owned()
    }

    /// Reads frames until the connection closes; returns the close code if one came.
    pub fn expect_close(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| f.code.into()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        panic!("connection still open after {WAIT:?}");
    }

    /// Asserts that no frame of type `kind` arrives within `quiet`.
    pub fn expect_none(&mut self, kind: &str, quiet: Duration) {
        self.ws.get_mut().set_read_timeout(Some(quiet)).unwrap();
        loop {
            match self.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_ne!(v["type"], kind, "unexpected {v}");
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => panic!("connection broke: {e}"),
            }
        }
        self.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

pub fn text_frame(t: &str) -> Message {
    Message::Text(Utf8Bytes::from(t))
}

/// Sends raw bytes and returns everything the server answers until it closes (bounded).
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A plain HTTP/1.0 GET against the HTTP port: (status, headers, body).
/// A counter or gauge of `GET /metrics` (unlabelled series).
pub fn metric(addr: SocketAddr, series: &str) -> u64 {
    let (status, _, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
}

pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let response = raw_request(addr, request.as_bytes());
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A handshake request for the WebSocket port.
pub fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

/// Reads the handshake response head only (the connection stays open).
pub fn handshake_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A fresh, empty directory for one test's history (`--data-dir`), removed when dropped.
pub struct DataDir(std::path::PathBuf);

impl DataDir {
    pub fn new(name: &str) -> DataDir {
        let dir = std::env::temp_dir().join(format!("wschat-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        DataDir(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `wschat` binary with `args`, its output piped (read it, or it may stall).
pub fn wschat(args: &[&str]) -> std::process::Command {
    use std::process::Stdio;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wschat"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the binary to its exit (one that refuses to start): its exit code and its stderr.
pub fn failed_run(args: &[&str]) -> (Option<i32>, String) {
    let out = wschat(args).output().expect("the binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
