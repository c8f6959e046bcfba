//! Issue 9: history that is bounded (in bytes, in every answer), saved before it is shown (a
//! full disk refuses messages instead of losing them), checked when read back, and rooms whose
//! slots free up.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use wschat::Config;

fn fast_config() -> Config {
    Config {
        rate: 1e6,
        burst: 1e6,
        api_token: Some("t".into()),
        api_rate: 1e6,
        rate_bytes: 1e9,
        rate_bytes_per_ip: 1e9,
        room_rate_bytes: 1e9,
        ..config()
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wschat-history-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn ids(list: &Value) -> Vec<u64> {
    let list = list.as_array().expect("a list of messages");
    list.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// POSTs `text` to `room` with the token `t`: (status, body).
fn post(addr: SocketAddr, room: &str, text: &str) -> (u16, Value) {
    let request = format!(
        "POST /api/rooms/{room}/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let (status, _, body) = http_request(addr, &request);
    (status, json_of(&body))
}

#[test]
fn the_byte_budget_bounds_all_rooms_together_and_evicts_the_oldest() {
    let budget = 64 << 10;
    let server = start(Config {
        history_bytes: budget,
        ..fast_config()
    });
    let addr = server.http_addr();
    let mut first = Vec::new();
    for i in 0..40 {
        let room = if i % 2 == 0 { "even" } else { "odd" };
        let (status, body) = post(addr, room, &format!("{i} {}", "x".repeat(4000)));
        assert_eq!(status, 201, "{body}");
        first.push(body["id"].as_u64().unwrap());
    }
    let held = metric(addr, "wschat_history_bytes");
    assert!(held <= budget as u64 && held > budget as u64 / 2, "{held}");
    let kept = metric(addr, "wschat_history_messages");
    assert!(
        kept < 20,
        "40 messages of 4 KB do not fit in 64 KiB: {kept} kept"
    );
    // Both rooms lost their oldest messages, and a resume from the start says so.
    for room in ["even", "odd"] {
        let (_c, welcome) = Client::join(&server, &format!("/chat/{room}?since=0"));
        assert_eq!(welcome["truncated"], true, "{room}");
        let got = ids(&welcome["history"]);
        assert!(got.len() < 20 && got.len() > 2, "{room}: {got:?}");
        assert_eq!(
            got.last(),
            first.iter().rev().find(|&&id| id % 2 == got[0] % 2)
        );
    }
    server.shutdown();
}

#[test]
fn a_welcome_is_bounded_in_bytes_and_the_api_pages_forward() {
    let server = start(fast_config());
    let addr = server.http_addr();
    let big = "\"".repeat(60 << 10); // doubles when escaped
    let sent: Vec<u64> = (0..12)
        .map(|i| {
            let (status, body) = post(addr, "big", &format!("{i}{big}"));
            assert_eq!(status, 201, "{body}");
            body["id"].as_u64().unwrap()
        })
        .collect();
    let mut c = Client::connect(server.ws_addr(), "/chat/big");
    let frame = match c.ws.read().unwrap() {
        tungstenite::Message::Text(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(frame.len() <= 300 << 10, "welcome of {} bytes", frame.len());
    let welcome = json_of(&frame);
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["more"], true, "older messages are left out");
    assert_eq!(welcome["truncated"], false, "but not lost");
    let newest = ids(&welcome["history"]);
    assert!(!newest.is_empty() && sent.ends_with(&newest), "{newest:?}");
    // The rest, page by page, forward from since=0.
    let (mut since, mut got) = (0u64, Vec::<u64>::new());
    loop {
        let path = format!("/api/rooms/big/messages?since={since}&limit=5");
        let (status, _, body) = http_get(addr, &path);
        assert_eq!(status, 200);
        assert!(
            body.len() <= (1 << 20) + (200 << 10),
            "page of {} bytes",
            body.len()
        );
        let page = json_of(&body);
        let page_ids = ids(&page["messages"]);
        got.extend(&page_ids);
        since = *page_ids
            .last()
            .expect("a page is never empty while more is true");
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(got, sent);
    server.shutdown();
}

#[test]
fn a_history_file_is_checked_not_trusted() {
    let dir = temp_dir("checked");
    std::fs::create_dir_all(&dir).unwrap();
    let line = |id: u64, extra: &str| {
        format!(
            r#"{{"type":"message","id":{id},"room":"lobby","from":"a","text":"m{id}","ts":1{extra}}}"#
        )
    };
    let bad = [
        line(5, ""),                                            // kept
        line(5, ""),                                            // duplicate
        line(3, ""),                                            // out of order
        line(u64::MAX, ""),                                     // would wrap the counter
        line(6, r#","private":true,"to":"b""#),                 // private
        line(6, &format!(r#","x":"{}""#, "y".repeat(1 << 20))), // far too long
        "{\"type\":\"message\",\"id\":6,\"ro\u{FFFD}".into(),   // garbage
        line(7, ""),                                            // kept
    ];
    let mut text = bad.join("\n");
    text.push('\n');
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(b"\xff\xfe not utf-8\n");
    std::fs::write(dir.join("history.jsonl"), bytes).unwrap();
    let cfg = Config {
        data_dir: Some(dir.clone()),
        ..fast_config()
    };
    let server = start(cfg.clone());
    let (mut c, welcome) = Client::join(&server, "/chat?name=c");
    assert_eq!(ids(&welcome["history"]), [5, 7]);
    c.send("after");
    assert_eq!(c.expect("message")["id"], 8, "the counter did not wrap");
    server.shutdown();
    let rejected = std::fs::read(dir.join("history.jsonl.rejected")).unwrap();
    let aside = rejected
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(aside, 7, "every refused line is kept aside");
    assert!(rejected.len() > 1 << 20, "the long line too, whole");
    let history = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
    assert!(
        !history.contains("private") && !history.contains("yyyy"),
        "{history}"
    );
    // A second start finds nothing to set aside: the lines are not copied twice.
    let server = start(cfg);
    let (_c, welcome) = Client::join(&server, "/chat");
    assert_eq!(ids(&welcome["history"]), [5, 7, 8]);
    server.shutdown();
    let again = std::fs::read(dir.join("history.jsonl.rejected")).unwrap();
    assert_eq!(again.len(), rejected.len());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_file_of_live_history_is_never_rewritten() {
    let dir = temp_dir("live");
    let server = start(Config {
        data_dir: Some(dir.clone()),
        compact_bytes: 2_000,
        ..fast_config()
    });
    let inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("history.jsonl")).map(|m| m.ino())
    };
    let (mut c, _) = Client::join(&server, "/chat");
    c.send("first");
    c.expect("message");
    let before = inode().unwrap();
    for i in 0..60 {
        c.send(&format!("{i} {}", "x".repeat(100)));
        c.expect("message");
    }
    std::thread::sleep(Duration::from_millis(300)); // a compaction would have been swapped in
    c.send("last");
    c.expect("message");
    assert_eq!(inode().unwrap(), before, "nothing to remove, so no rewrite");
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn quiet_empty_rooms_give_back_their_slot_also_after_a_restart() {
    let dir = temp_dir("slots");
    let cfg = Config {
        max_rooms: 3,
        room_quiet: Duration::from_secs(1),
        data_dir: Some(dir.clone()),
        ..fast_config()
    };
    let server = start(cfg.clone());
    let addr = server.http_addr();
    for room in ["r1", "r2", "r3"] {
        assert_eq!(post(addr, room, "hi").0, 201);
    }
    let (status, body) = post(addr, "r4", "hi");
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("too_many_rooms"))
    );
    std::thread::sleep(Duration::from_millis(1_200));
    assert_eq!(post(addr, "r4", "hi").0, 201, "r1 was quiet long enough");
    let (_, _, rooms) = http_get(addr, "/api/rooms");
    assert!(!rooms.contains("\"r1\""), "{rooms}");
    server.shutdown();
    std::thread::sleep(Duration::from_millis(1_200));
    let server = start(cfg);
    let (_, _, rooms) = http_get(server.http_addr(), "/api/rooms");
    assert!(
        !rooms.contains("\"r1\""),
        "r1 stays forgotten after a restart: {rooms}"
    );
    let (_, _, page) = http_get(server.http_addr(), "/api/rooms/r1/messages?since=0");
    assert_eq!(
        ids(&json_of(&page)["messages"]),
        Vec::<u64>::new(),
        "{page}"
    );
    let (status, body) = post(server.http_addr(), "r5", "hi");
    assert_eq!(status, 201, "after a restart too: {body}");
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

// ----- a full disk, for real: the binary under a file size limit -----

/// The `wschat` binary whose files may not grow past `limit` bytes (RLIMIT_FSIZE: writes past
/// it fail with EFBIG, as on a full disk), with its log collected.
struct Limited {
    child: Child,
    http: SocketAddr,
    ws: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Limited {
    fn start(dir: &Path, limit: u64) -> Limited {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wschat"));
        cmd.args(["--port", "0", "--api-token", "t", "--rate", "1000"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec, where only async-signal-safe calls are
        // allowed: setrlimit and signal are, and nothing here allocates or takes a lock.
        unsafe {
            cmd.pre_exec(move || {
                let rlim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &rlim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Ignored, so a write past the limit fails instead of killing the process.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("the binary starts");
        let (http, ws) = read_listening_line(&mut child);
        let log = Arc::new(Mutex::new(String::new()));
        let (sink, mut stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Limited {
            child,
            http: http.parse().unwrap(),
            ws: ws.parse().unwrap(),
            log,
        }
    }

    /// Lifts the file size limit, as freeing disk space would.
    fn free_space(&self) {
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: prlimit reads `rlim` and writes nothing (the old-limit pointer is null).
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &rlim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    fn log_count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().matches(needle).count()
    }

    fn kill(mut self) {
        let _ = self.child.kill(); // SIGKILL: no clean shutdown
        let _ = self.child.wait();
    }
}

/// Sends `text` and returns the message echoed to the sender, or the error it got instead.
fn send(c: &mut Client, text: &str) -> Value {
    c.send(text);
    loop {
        let v = c.recv();
        if v["type"] == "message" || v["type"] == "error" {
            return v;
        }
    }
}

#[test]
fn a_full_disk_refuses_messages_instead_of_losing_them() {
    let dir = temp_dir("full");
    let server = Limited::start(&dir, 3_000);
    let mut alice = Client::connect(server.ws, "/chat?name=alice");
    alice.expect("welcome");
    let mut bob = Client::connect(server.ws, "/chat?name=bob");
    bob.expect("welcome");
    let (mut saved, mut refused) = (Vec::new(), 0u64);
    for i in 0..20 {
        let text = format!("{i} {}", "x".repeat(300));
        let got = send(&mut alice, &text);
        if got["type"] == "message" {
            saved.push(got["id"].as_u64().unwrap());
        } else {
            assert_eq!(got["code"], "not_saved", "{got}");
            assert!(
                got["message"].as_str().unwrap().contains("disk full"),
                "{got}"
            );
            refused += 1;
        }
    }
    assert!(
        !saved.is_empty() && refused > 0,
        "saved {saved:?}, refused {refused}"
    );
    // Bob saw exactly the saved messages; the refused ones reached no one.
    let mut seen = Vec::new();
    while seen.len() < saved.len() {
        seen.push(bob.expect("message")["id"].as_u64().unwrap());
    }
    assert_eq!(seen, saved);
    bob.expect_none("message", Duration::from_millis(300));
    let (status, body) = post(server.http, "lobby", &"api ".repeat(100)); // as long as those refused
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("not_saved")),
        "{body}"
    );
    let (status, _, health) = http_get(server.http, "/healthz");
    assert_eq!(status, 503);
    assert!(health.contains("cannot write (disk full)"), "{health}");
    assert!(metric(server.http, "wschat_history_write_failures_total") >= refused);

    server.free_space();
    let back = send(&mut alice, "space is back");
    assert_eq!(back["type"], "message", "{back}");
    let back_id = back["id"].as_u64().unwrap();
    assert_eq!(bob.expect("message")["id"], back_id);
    assert!(back_id > *saved.last().unwrap());
    assert_eq!(http_get(server.http, "/healthz").0, 200);
    assert_eq!(
        server.log_count("cannot write"),
        1,
        "logged once per outage"
    );
    assert_eq!(server.log_count("can be written again"), 1);
    server.kill();

    // Nothing glued, nothing refused, nothing shown missing; ids increase.
    let file = std::fs::read_to_string(dir.join("history.jsonl")).unwrap();
    let mut in_file = Vec::new();
    for line in file.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if let Some(id) = v["id"].as_u64() {
            in_file.push(id);
        }
    }
    let mut shown = saved.clone();
    shown.push(back_id);
    assert_eq!(in_file, shown);

    // Restarting on a full disk: history is served, new messages are refused with the reason.
    let len = std::fs::metadata(dir.join("history.jsonl")).unwrap().len();
    let server = Limited::start(&dir, len);
    let mut carol = Client::connect(server.ws, "/chat?name=carol");
    let welcome = carol.expect("welcome");
    assert_eq!(ids(&welcome["history"]), shown);
    assert_eq!(send(&mut carol, "full again")["code"], "not_saved");
    server.free_space();
    let next = send(&mut carol, "and free");
    assert!(
        next["id"].as_u64().unwrap() > back_id,
        "no id shown twice: {next}"
    );
    server.kill();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_api_pages_are_checked() {
    let server = start(fast_config());
    let addr = server.http_addr();
    for i in 0..3 {
        post(addr, "p", &format!("m{i}"));
    }
    let (_, _, body) = http_get(addr, "/api/rooms/p/messages?limit=2");
    let newest = json_of(&body);
    assert_eq!(
        newest["more"], true,
        "without since: the newest, and more before them"
    );
    assert_eq!(ids(&newest["messages"]).len(), 2);
    let (_, _, body) = http_get(addr, "/api/rooms/p/messages?since=0&limit=2");
    let first = json_of(&body);
    assert_eq!(
        json!([first["messages"][0]["text"], first["more"]]),
        json!(["m0", true])
    );
    server.shutdown();
}
