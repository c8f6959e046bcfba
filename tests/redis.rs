//! Several nodes as one chat through Redis (`--redis`, issue 14): real `redis-server` processes
//! on free ports, real `wschat` processes, real WebSocket clients. Skipped (with a line saying
//! so) where `redis-server` is not installed; `scripts/test` installs it.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::Client;
use serde_json::{Value, json};

/// Longest wait for a node or Redis to come up, or for the nodes to notice a change.
const SETTLE: Duration = Duration::from_secs(15);

/// A scratch directory for one test's logs and Redis files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wschat-redis-{}-{name}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn have_redis() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("redis-server is not installed: skipping (scripts/test installs it)");
    }
    found
}

/// A `redis-server` of this test's own, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
    persistent: bool,
}

impl Redis {
    /// Without persistence, or (`persistent`) with an append-only file synced at every write.
    fn start(dir: &std::path::Path, persistent: bool) -> Redis {
        let mut redis = Redis {
            child: Command::new("true").spawn().unwrap(),
            port: free_port(),
            dir: dir.to_owned(),
            persistent,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let aof = if self.persistent { "yes" } else { "no" };
        self.child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let deadline = Instant::now() + SETTLE;
        while self.ping().is_none() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends one command (inline form) and returns the first line of the answer.
    fn command(&self, line: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{line}\r\n").as_bytes()).ok()?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).ok()?;
        Some(answer.trim().to_owned())
    }

    fn ping(&self) -> Option<()> {
        (self.command("PING")? == "+PONG").then_some(())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill").args([signal, &pid]).status().unwrap();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

/// A `wschat --redis` process, killed when dropped; its log goes to a file.
struct Node {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Node {
    fn start(redis: &Redis, dir: &std::path::Path, name: &str) -> Node {
        let node = Node::start_unready(redis, dir, name);
        node.wait_health("ok");
        node
    }

    fn start_unready(redis: &Redis, dir: &std::path::Path, name: &str) -> Node {
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_wschat"))
            .args(["--port", "0", "--load-test", "--redis", &redis.url()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("wschat starts");
        let (http, _) = common::read_listening_line(&mut child);
        let addr = http.parse().unwrap();
        Node { child, addr, log }
    }

    /// Waits until `/healthz` says `want` ("ok", "degraded").
    fn wait_health(&self, want: &str) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let (status, _, body) = common::http_get(self.addr, "/healthz");
            if status == 200 && body.starts_with(want) {
                return;
            }
            assert!(Instant::now() < deadline, "healthz still {status} {body:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn join(&self, path: &str) -> (Client, Value) {
        let mut client = Client::connect(self.addr, path);
        let welcome = client.expect("welcome");
        (client, welcome)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ids(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

/// Reads chat messages until `n` arrived (other frames skipped), each within the usual wait.
fn collect(client: &mut Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| client.expect("message")).collect()
}

#[test]
fn three_nodes_show_every_message_once_in_one_order() {
    if !have_redis() {
        return;
    }
    const PER_NODE: usize = 20;
    const EACH: usize = 50;
    let scratch = Scratch::new("order");
    let redis = Redis::start(&scratch.0, false);
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(&redis, &scratch.0, &format!("n{i}")))
        .collect();
    let total = 3 * PER_NODE * EACH;
    let ready = Arc::new(Barrier::new(3 * PER_NODE));
    let mut threads = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for c in 0..PER_NODE {
            let (mut client, _) = node.join(&format!("/chat/load?name=n{n}c{c}"));
            let ready = ready.clone();
            threads.push(std::thread::spawn(move || {
                ready.wait(); // everyone is in the room before anyone speaks
                for i in 0..EACH {
                    client.send(&format!("n{n}c{c} #{i}"));
                }
                collect(&mut client, total)
            }));
        }
    }
    let seen: Vec<Vec<Value>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let first = ids(&seen[0]);
    assert!(first.windows(2).all(|w| w[0] < w[1]), "ids increase");
    let texts: HashSet<&str> = seen[0]
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), total, "every message once");
    for other in &seen[1..] {
        assert_eq!(other, &seen[0], "every client sees the same sequence");
    }
}

#[test]
fn a_client_resumes_on_another_node_and_a_new_node_has_the_history() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("resume");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let b = Node::start(&redis, &scratch.0, "b");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    for i in 1..=5 {
        ada.send(&format!("m{i}"));
    }
    let sent = collect(&mut ada, 5);
    let since = sent[1]["id"].as_u64().unwrap();
    let (_, welcome) = b.join(&format!("/chat/dev?name=bob&since={since}"));
    let history: Vec<Value> = welcome["history"].as_array().unwrap().clone();
    assert_eq!(
        history,
        sent[2..],
        "what came after `since`, the same frames"
    );
    assert_eq!(welcome["last_id"], sent[4]["id"]);

    let c = Node::start(&redis, &scratch.0, "c");
    let (_, welcome) = c.join("/chat/dev?name=cy");
    assert_eq!(welcome["history"].as_array().unwrap(), &sent);
    let (status, _, body) = common::http_get(c.addr, "/api/rooms/dev/messages");
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["messages"].as_array().unwrap().len(), 5);
}

/// The next frame of type `kind` within `limit` (others skipped), for what takes heartbeats.
fn expect_within(client: &mut Client, kind: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {kind} frame within {limit:?}");
        client.ws.get_mut().set_read_timeout(Some(left)).unwrap();
        match client.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == kind {
                    client
                        .ws
                        .get_mut()
                        .set_read_timeout(Some(common::WAIT))
                        .unwrap();
                    return v;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("no {kind} frame within {limit:?}: {e}"),
        }
    }
}

#[test]
fn presence_names_typing_and_private_messages_span_the_nodes() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("presence");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let b = Node::start(&redis, &scratch.0, "b");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    std::thread::sleep(Duration::from_millis(300)); // ada's arrival reaches node b
    let (mut bob, welcome) = b.join("/chat/dev?name=bob");
    assert_eq!(welcome["users"], json!(["ada", "bob"]));
    assert_eq!(welcome["count"], 2);
    let joined = ada.expect("joined");
    assert_eq!(
        (joined["name"].as_str(), joined["count"].as_u64()),
        (Some("bob"), Some(2))
    );

    // Names are unique across nodes, case-insensitively.
    let (mut impostor, welcome) = b.join("/chat/dev?name=ADA");
    assert!(welcome["name"].as_str().unwrap().starts_with("guest-"));
    assert_eq!(impostor.expect("error")["code"], "name_taken");
    impostor.send_json(json!({"type": "nick", "name": "Bob"}));
    assert_eq!(impostor.expect("error")["code"], "name_taken");
    impostor.close();
    assert_eq!(ada.expect("left")["count"], 2);

    bob.send_json(json!({"type": "nick", "name": "cy"}));
    let renamed = ada.expect("renamed");
    assert_eq!(
        (renamed["from"].as_str(), renamed["name"].as_str()),
        (Some("bob"), Some("cy"))
    );

    bob.send_json(json!({"type": "typing", "active": true}));
    let typing = ada.expect("typing");
    assert_eq!(
        (typing["name"].as_str(), typing["active"].as_bool()),
        (Some("cy"), Some(true))
    );

    ada.send_json(json!({"type": "message", "to": "cy", "text": "psst"}));
    let got = bob.expect("message");
    assert_eq!(
        (got["private"].as_bool(), got["text"].as_str()),
        (Some(true), Some("psst"))
    );
    assert_eq!(
        ada.expect("message"),
        got,
        "the sender sees the same frame, same id"
    );

    bob.close();
    let left = ada.expect("left");
    assert_eq!(
        (left["name"].as_str(), left["count"].as_u64()),
        (Some("cy"), Some(1))
    );
    let (_, welcome) = b.join("/chat/dev?name=Cy");
    assert_eq!(
        welcome["name"], "Cy",
        "a name is free again once its owner left"
    );
}

#[test]
fn a_node_killed_with_sigkill_leaves_every_list_within_the_bound() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("kill");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let mut b = Node::start(&redis, &scratch.0, "b");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    let (_bob, _) = b.join("/chat/dev?name=bob");
    ada.expect("joined");
    b.child.kill().unwrap(); // SIGKILL: no goodbye
    let _ = b.child.wait();
    // NODE_EXPIRY (6 s) and one sweep (2 s), with room for a busy machine.
    let left = expect_within(&mut ada, "left", Duration::from_secs(12));
    assert_eq!(left["name"], "bob");
    let (_, welcome) = a.join("/chat/dev?name=bob");
    assert_eq!(welcome["name"], "bob", "its names are free again");
    assert!(a.log().contains("missed its heartbeats"));
}
