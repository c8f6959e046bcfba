//! A clean shutdown (SIGTERM) of the `wschat` binary with a few hundred clients connected: the
//! process ends, every client gets its close frame 1001 (going away), the port is free at once,
//! and a server started again on the same data dir has every message the clients saw stored.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, DataDir};

/// Clients held while the server stops, in rooms of `PER_ROOM`.
const CLIENTS: usize = 300;
const PER_ROOM: usize = 50;
/// Messages the first client of each room posts (and sees come back) before the signal.
const POSTS: usize = 3;
/// A hang detector, not a speed check: the shutdown waits at most a few seconds by design.
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// The binary on `port` (0: a free one) with `--data-dir`; its log is not read (a full pipe
/// would stall it), so it goes nowhere.
fn spawn_server(port: u16, dir: &DataDir) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wschat"))
        .args(["--port", &port.to_string(), "--load-test"])
        .args(["--data-dir", dir.path(), "--fsync", "always"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wschat starts");
    let (_, ws) = common::read_listening_line(&mut child);
    (child, ws.parse().expect("host:port"))
}

fn room_path(room: usize) -> String {
    format!("/chat/shut-{room}")
}

/// Opens `CLIENTS` clients; the first of each room posts `POSTS` messages and waits for them to
/// come back (stored: `--fsync always` acknowledges nothing before it is on disk).
fn fill(addr: SocketAddr) -> Vec<Client> {
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|j| {
            let mut client = Client::connect(addr, &room_path(j / PER_ROOM));
            client.expect("welcome");
            client
        })
        .collect();
    for poster in clients.iter_mut().step_by(PER_ROOM) {
        for k in 0..POSTS {
            poster.send(&format!("before the signal {k}"));
        }
        for k in 0..POSTS {
            assert_eq!(poster.expect_text(), format!("before the signal {k}"));
        }
    }
    clients
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + EXIT_LIMIT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("the server did not end within {EXIT_LIMIT:?} of SIGTERM");
}

#[test]
fn sigterm_with_hundreds_of_clients_closes_each_with_1001_and_keeps_the_history() {
    let dir = DataDir::new("shutdown");
    let (mut server, addr) = spawn_server(0, &dir);
    let clients = fill(addr);
    sigterm(&server);
    let status = wait_exit(&mut server);
    assert!(status.success(), "exit status {status}");

    // What the server wrote before it ended waits in each client's socket, close frame last.
    for (j, mut client) in clients.into_iter().enumerate() {
        assert_eq!(client.expect_close(), Some(1001), "client {j}");
    }

    // The port is free at once, and the history is whole.
    let (mut again, addr) = spawn_server(addr.port(), &dir);
    for room in 0..CLIENTS / PER_ROOM {
        let path = format!("{}?since=0", room_path(room));
        let mut client = Client::connect(addr, &path);
        let welcome = client.expect("welcome");
        let texts: Vec<&str> = welcome["history"]
            .as_array()
            .expect("a history array")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        let expected: Vec<String> = (0..POSTS)
            .map(|k| format!("before the signal {k}"))
            .collect();
        assert_eq!(texts, expected, "room {room}");
    }
    let _ = again.kill();
    let _ = again.wait();
}
