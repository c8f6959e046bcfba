//! Several nodes as one chat through Redis (`--redis`, issue 14): real `redis-server` processes
//! on free ports, real `wschat` processes, real WebSocket clients. Skipped (with a line saying
//! so) where `redis-server` is not installed; `scripts/test` installs it.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::Client;
use serde_json::{Value, json};

/// The nodes' API token.
const TOKEN: &str = "t0ken";

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
    // CI runs scripts/test, which installs it: there, a missing server is a failure.
    assert!(
        found || std::env::var_os("CI").is_none(),
        "redis-server is missing"
    );
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
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
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

    /// Sends one command and returns the first line of the answer.
    fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request += &format!("${}\r\n{arg}\r\n", arg.len());
        }
        s.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).ok()?;
        Some(answer.trim().to_owned())
    }

    fn ping(&self) -> Option<()> {
        (self.command(&["PING"])? == "+PONG").then_some(())
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
            .args(["--api-token", TOKEN])
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

    /// Posts `text` to `room` through the HTTP API: (status, body).
    fn api_post(&self, room: &str, text: &str) -> (u16, String) {
        let request = format!(
            "POST /api/rooms/{room}/messages HTTP/1.0\r\nHost: x\r\n\
             Authorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        let (status, _, body) = common::http_request(self.addr, &request);
        (status, body)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill").args([signal, &pid]).status().unwrap();
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
    let (mut bob, welcome) = b.join(&format!("/chat/dev?name=bob&since={since}"));
    // Node b may not have heard all of them yet when bob arrives: what it lacks comes live
    // right after the welcome. Either way, exactly what came after `since`, once each.
    let mut resumed: Vec<Value> = welcome["history"].as_array().unwrap().clone();
    while resumed.len() < 3 {
        resumed.push(bob.expect("message"));
    }
    assert_eq!(
        resumed,
        sent[2..],
        "what came after `since`, the same frames"
    );
    bob.expect_none("message", Duration::from_millis(300));

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
        match client.read() {
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

/// Sends a numbered message every few milliseconds until told to stop; returns how many.
fn chatter(mut client: Client, stop: Arc<std::sync::atomic::AtomicBool>) -> Client {
    let mut i = 0;
    while !stop.load(Relaxed) {
        client.send(&format!("tick {i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    client
}

/// Every chat message `client` gets until `quiet` passes without one: (with ids, without).
fn drain_messages(client: &mut Client, quiet: Duration) -> (Vec<Value>, Vec<Value>) {
    let (mut with_id, mut local) = (Vec::new(), Vec::new());
    client.ws.get_mut().set_read_timeout(Some(quiet)).unwrap();
    while let Ok(frame) = client.read() {
        let tungstenite::Message::Text(t) = frame else {
            continue;
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] != "message" {
            continue;
        }
        if v["id"].is_u64() {
            with_id.push(v);
        } else {
            local.push(v);
        }
    }
    (with_id, local)
}

#[test]
fn redis_killed_and_restarted_mid_chat_loses_and_repeats_nothing_it_took() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("restart");
    let mut redis = Redis::start(&scratch.0, true);
    let a = Node::start(&redis, &scratch.0, "a");
    let b = Node::start(&redis, &scratch.0, "b");
    let (ada, _) = a.join("/chat/dev?name=ada");
    let (mut al, _) = a.join("/chat/dev?name=al");
    let (mut bob, _) = b.join("/chat/dev?name=bob");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let talking = {
        let stop = stop.clone();
        std::thread::spawn(move || chatter(ada, stop))
    };
    let mut on_b = collect(&mut bob, 5); // chat flows before the outage
    redis.kill();
    a.wait_health("degraded");
    b.wait_health("degraded");
    let (status, body) = a.api_post("dev", "while away");
    assert_eq!(status, 503, "{body}");
    std::thread::sleep(Duration::from_millis(500));
    redis.spawn(); // the same port and files: what it took is still there
    a.wait_health("ok");
    b.wait_health("ok");
    let until_back = on_b.len() + 5;
    while on_b.len() < until_back {
        on_b.push(bob.expect("message")); // and after it
    }
    stop.store(true, Relaxed);
    let mut ada = talking.join().unwrap();

    let (on_a, local_a) = drain_messages(&mut al, Duration::from_secs(2));
    let (rest_b, local_b) = drain_messages(&mut bob, Duration::from_secs(1));
    on_b.extend(rest_b);
    let (own, _) = drain_messages(&mut ada, Duration::from_secs(1));
    assert!(
        ids(&on_a).windows(2).all(|w| w[0] < w[1]),
        "one order, none twice"
    );
    assert_eq!(on_a, on_b, "both nodes show what Redis took, the same");
    assert_eq!(own, on_a, "the sender too");
    assert!(
        !local_a.is_empty(),
        "local chat went on while Redis was away"
    );
    assert!(
        local_a
            .iter()
            .all(|m| m["local"] == true && m.get("id").is_none())
    );
    assert!(local_b.is_empty(), "a local message stays on its node");
    let log = a.log();
    let redis_log = std::fs::read_to_string(scratch.0.join("redis.log")).unwrap_or_default();
    assert_eq!(
        log.matches("redis: unreachable").count(),
        1,
        "{log}\n{redis_log}"
    );
    assert_eq!(log.matches("redis: connected").count(), 2, "{log}");
    let (_, metrics) = (0, common::http_get(a.addr, "/metrics").2);
    assert!(metrics.contains("wschat_redis_up 1"), "{metrics}");
    assert!(
        metrics.contains("wschat_redis_outages_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_stopped_redis_does_not_stop_local_chat() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("sigstop");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let b = Node::start(&redis, &scratch.0, "b");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    let (mut al, _) = a.join("/chat/dev?name=al");
    let (mut bob, _) = b.join("/chat/dev?name=bob");
    redis.signal("-STOP");
    // Redis takes bytes but never answers: the node finds out within its timeouts, and
    // meanwhile (and after) its clients are served.
    let (_, welcome) = a.join("/chat/dev?name=newcomer");
    assert_eq!(welcome["name"], "newcomer");
    a.wait_health("degraded");
    ada.send("still here");
    let got = al.expect("message");
    assert_eq!(
        (got["text"].as_str(), got["local"].as_bool()),
        (Some("still here"), Some(true))
    );
    bob.expect_none("message", Duration::from_millis(300));

    redis.signal("-CONT");
    a.wait_health("ok");
    b.wait_health("ok");
    ada.send("and back");
    let got = bob.expect("message");
    assert_eq!(got["text"], "and back");
    assert!(got["id"].is_u64());
}

#[test]
fn foreign_and_malformed_entries_in_redis_are_logged_and_skipped() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("garbage");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    for garbage in [
        "hello",
        r#"{"k":"m","id":1}"#,
        r#"{"k":"here","member":{"node":1,"client":1,"name":"","room":"dev"}}"#,
    ] {
        assert_eq!(
            redis.command(&["PUBLISH", "wschat:bus", garbage]).unwrap(),
            ":1"
        );
    }
    // A foreign entry in a room's stream, with an id far ahead of wschat's.
    let xadd = [
        "XADD",
        "wschat:room:dev",
        "9999999999999-0",
        "m",
        "{\"k\":\"m\"}",
    ];
    assert!(redis.command(&xadd).unwrap().starts_with('$'));
    ada.send("still fine");
    assert_eq!(ada.expect_text(), "still fine");
    let metrics = common::http_get(a.addr, "/metrics").2;
    assert!(
        metrics.contains("wschat_redis_bad_entries_total 3"),
        "{metrics}"
    );
    assert!(a.log().contains("redis: skipped a bad entry"));

    // An operator flushes Redis's script cache: the node reloads the script and sends the
    // message again (Redis ran nothing of it), so it arrives, once.
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), "+OK");
    ada.send("after the flush");
    assert_eq!(ada.expect_text(), "after the flush");

    let b = Node::start(&redis, &scratch.0, "b"); // reads the stream, skips the foreign entry
    let (_, welcome) = b.join("/chat/dev?name=bob");
    let history = welcome["history"].as_array().unwrap();
    let texts: Vec<&str> = history
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["still fine", "after the flush"]);
    assert!(b.log().contains("redis: skipped a bad entry"));

    // A batch on the channel with one bad entry: only that one is skipped.
    assert_eq!(redis.command(&["INCR", "wschat:id"]).unwrap(), ":3");
    let good = concat!(
        r#"{"k":"m","id":3,"#,
        r#""m":{"room":"dev","from":"cy","text":"third","ts":1,"node":1,"client":1}}"#
    );
    let batch = format!(r#"[{good},{{"k":"m","id":4}}]"#);
    assert_eq!(
        redis.command(&["PUBLISH", "wschat:bus", &batch]).unwrap(),
        ":2"
    );
    assert_eq!(ada.expect_text(), "third");
    // A room whose stream key holds something else: its message is refused, others are not.
    assert_eq!(
        redis.command(&["SET", "wschat:room:odd", "x"]).unwrap(),
        "+OK"
    );
    let (mut odd, _) = a.join("/chat/odd?name=oz");
    odd.send("nowhere to go");
    let refused = odd.expect("error");
    assert_eq!(refused["code"], "not_saved", "{refused}");
    ada.send("still here");
    assert_eq!(ada.expect_text(), "still here");
    let metrics = common::http_get(a.addr, "/metrics").2;
    assert!(
        metrics.contains("wschat_redis_bad_entries_total 4"),
        "{metrics}"
    );
}

#[test]
fn a_node_stopped_cleanly_takes_its_users_out_at_once() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("sigterm");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    let b = Node::start(&redis, &scratch.0, "b");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    let (mut bob, _) = b.join("/chat/dev?name=bob");
    ada.expect("joined");
    b.signal("-TERM");
    assert_eq!(bob.expect_close(), Some(1001));
    // Well before the heartbeat would expire (6 s): the node said goodbye.
    let left = expect_within(&mut ada, "left", Duration::from_secs(4));
    assert_eq!(left["name"], "bob");
}

#[test]
fn a_name_another_node_claimed_first_becomes_a_guest() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("claim");
    let redis = Redis::start(&scratch.0, false);
    let a = Node::start(&redis, &scratch.0, "a");
    // Another node took "zed" a moment ago; its `here` has not reached node a yet.
    assert_eq!(
        redis
            .command(&["SET", "wschat:name:zed", "12345:1"])
            .unwrap(),
        "+OK"
    );
    let (mut zed, welcome) = a.join("/chat/dev?name=zed");
    assert_eq!(welcome["name"], "zed", "node a knew of no other zed");
    let renamed = zed.expect("renamed");
    assert_eq!(renamed["from"], "zed");
    assert!(renamed["name"].as_str().unwrap().starts_with("guest-"));
    assert_eq!(zed.expect("error")["code"], "name_taken");
}

#[test]
fn a_redis_that_comes_back_empty_gets_the_members_again_and_never_reuses_an_id() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("empty");
    let mut redis = Redis::start(&scratch.0, false); // no persistence: a restart forgets all
    let a = Node::start(&redis, &scratch.0, "a");
    let (mut ada, _) = a.join("/chat/dev?name=ada");
    ada.send("before");
    let before = ada.expect("message")["id"].as_u64().unwrap();
    redis.kill();
    a.wait_health("degraded");
    redis.spawn();
    a.wait_health("ok");
    ada.send("after");
    let after = ada.expect("message");
    assert_eq!(after["text"], "after");
    assert!(
        after["id"].as_u64().unwrap() > before,
        "{after} after id {before}"
    );

    let b = Node::start(&redis, &scratch.0, "b");
    let (_, welcome) = b.join("/chat/dev?name=bob");
    assert_eq!(
        welcome["users"],
        json!(["ada", "bob"]),
        "node a published its members again"
    );
    let (_, welcome) = b.join("/chat/dev?name=Ada");
    assert_ne!(welcome["name"], "Ada", "and claimed their names again");
}

#[test]
fn messages_a_resumed_client_has_from_a_faster_node_are_not_shown_again() {
    if !have_redis() {
        return;
    }
    let scratch = Scratch::new("ahead");
    let redis = Redis::start(&scratch.0, false);
    let b = Node::start(&redis, &scratch.0, "b");
    let (mut al, _) = b.join("/chat/dev?name=al");
    // bob saw up to id 1000 on a node whose feed was ahead; node b has not heard 1000 yet.
    let (mut bob, welcome) = b.join("/chat/dev?name=bob&since=1000");
    assert_eq!(welcome["last_id"], 1000);
    let entry = |id: u64| {
        format!(
            r#"{{"k":"m","id":{id},"m":{{"room":"dev","from":"cy","text":"m{id}","ts":1,"node":1,"client":1}}}}"#
        )
    };
    for id in [1000, 1001] {
        assert_eq!(
            redis
                .command(&["PUBLISH", "wschat:bus", &entry(id)])
                .unwrap(),
            ":1"
        );
    }
    assert_eq!(al.expect_text(), "m1000", "shown to those who lack it");
    assert_eq!(al.expect_text(), "m1001");
    assert_eq!(bob.expect_text(), "m1001", "not again to bob, who had it");
}
