//! The minimal chat (`examples/minimal.rs`) as a student runs it, for `tests/minimal.rs` and
//! `tests/tutorial.rs`: the example's own binary in a child process on a free port, its log read
//! back, and a small blocking WebSocket client with a timeout on every wait.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use tungstenite::{Message, WebSocket};

/// Longest any test waits for one expected frame or log line.
pub const WAIT: Duration = Duration::from_secs(10);
/// The example's binary, built by the cargo that runs these tests (`cargo test` builds examples,
/// but `cargo test --test minimal` does not), next to this test's own binary.
pub fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("the test binary's path");
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/minimal
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
    /// The example's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

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
    pub fn logged_already(&self, needle: &str) -> bool {
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

pub fn connect(stream: TcpStream, addr: SocketAddr) -> WebSocket<TcpStream> {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    ws
}

pub fn send(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::Text(text.into())).expect("send");
}

/// The next text frame (control frames skipped).
pub fn next_text(ws: &mut WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().expect("a frame before the timeout") {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads text frames until one equals `want` (others, like later clients' probes, skipped).
pub fn expect_text(ws: &mut WebSocket<TcpStream>, want: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if next_text(ws) == want {
            return;
        }
    }
    panic!("no {want:?} within {WAIT:?}");
}
