//! Every limit true: the attacks of issue 9, each against a real server, each bounded in time
//! and watching the server's memory where memory is what the attack goes after. Servers whose
//! memory is watched run as child processes (their RSS is theirs alone); the others in-process.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, WAIT, config, connect_from, http_get, http_request, start, upgrade_request};
use serde_json::json;
use tungstenite::Message;

// ----- a server in a child process, and its memory -----

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary on a free port with `args`, under `sh -c` so a test can set `ulimit`.
    fn start(shell_prefix: &str, args: &[&str]) -> ServerProcess {
        let bin = env!("CARGO_BIN_EXE_wschat");
        let script = format!("{shell_prefix} exec {bin} --port 0 {}", args.join(" "));
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("the server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the startup line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the startup line {line:?}"));
        ServerProcess { child, addr }
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server is alive");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `attack` (which returns when done or told to stop) for at most `limit`, sampling the
/// server's RSS every 50 ms; stops early, and fails, if it grows past `cap_kib` over its start.
fn watch_memory(
    server: &ServerProcess,
    limit: Duration,
    cap_kib: u64,
    attack: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
) -> u64 {
    let before = server.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = {
        let stop = stop.clone();
        thread::spawn(move || attack(stop))
    };
    let started = Instant::now();
    let mut peak = before;
    while !attacker.is_finished() && started.elapsed() < limit {
        peak = peak.max(server.rss_kib());
        if peak > before + cap_kib {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Relaxed);
    attacker.join().expect("the attacker thread");
    assert!(
        peak <= before + cap_kib,
        "server RSS grew from {before} KiB to {peak} KiB (cap +{cap_kib} KiB)"
    );
    peak - before
}

fn healthy(addr: SocketAddr) -> bool {
    http_get(addr, "/healthz").0 == 200
}

/// A client joins, sends, and gets its own message back.
fn chats(addr: SocketAddr, name: &str) {
    let mut c = Client::connect(addr, &format!("/chat?name={name}"));
    c.expect("welcome");
    c.send("still here");
    assert_eq!(c.expect_text(), "still here");
}

// ----- finding 6: the memory ceiling, every attack in a row -----

/// The README's ceiling for `clients` WebSocket clients (and a full door), default flags, KiB.
fn ceiling_kib(clients: u64) -> u64 {
    let max_message = 64;
    8 * 1024 + clients * (16 + max_message * 3 / 2) + 1024 * 24 + 32 * 1024 + 32 * 1024 + 8 * 1024
}

#[test]
fn every_attack_in_a_row_stays_under_the_memory_ceiling() {
    let server = ServerProcess::start("", &["--api-token", "abuse-token"]);
    let clients = 300;
    let out = Command::new(env!("CARGO_BIN_EXE_wschat-abuse"))
        .args(["--addr", &server.addr.to_string()])
        .args(["--server-pid", &server.child.id().to_string()])
        .args(["--connections", &clients.to_string(), "--seconds", "1.5"])
        .args(["--api-token", "abuse-token"])
        .stdin(Stdio::null())
        .output()
        .expect("wschat-abuse runs");
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lines.len(), 10, "one line per attack:\n{report}");
    for line in &lines {
        let peak = line["peak_rss_kib"].as_u64().expect("peak RSS");
        assert!(peak <= ceiling_kib(clients), "{line}");
        assert!(
            line["honest"]["round_trips"].as_u64() > Some(0),
            "honest clients chatted: {line}"
        );
    }
}

// ----- finding 1 and 12: request heads -----

#[test]
fn an_endless_request_head_is_refused_at_its_bound_and_costs_nothing() {
    let server = ServerProcess::start("", &[]);
    let addr = server.addr;
    let grew = watch_memory(&server, Duration::from_secs(10), 8 << 10, move |stop| {
        for _ in 0..20 {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ");
            let pad = vec![b'a'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 16 << 20 && !stop.load(Relaxed) {
                match s.write(&pad) {
                    Ok(n) => sent += n,
                    Err(_) => break, // the server hung up: what we wanted
                }
            }
            assert!(sent < 16 << 20, "the server took 16 MiB of one header");
        }
    });
    eprintln!("RSS grew {grew} KiB under 20 endless heads");
    // The answer is a 431, and nothing more is read.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    head.resize(9 * 1024, b'b');
    let _ = s.write_all(&head);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(healthy(addr));
}

#[test]
fn an_http_head_sent_a_byte_at_a_time_is_cut_at_one_deadline() {
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(1);
    let server = start(cfg);
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed_after = loop {
        let i = (started.elapsed().as_millis() / 200) as usize % request.len();
        let _ = s.write_all(&request[i..=i]);
        match s.read(&mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(_) => panic!("an unfinished head got an answer"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still open after 10 s"
        );
    };
    assert!(
        closed_after < Duration::from_secs(3),
        "a head dribbled a byte every 200 ms was cut after {closed_after:?} (deadline 1 s)"
    );
    server.shutdown();
}

// ----- finding 2: what a connection queues for itself -----

#[test]
fn pings_from_a_client_that_never_reads_end_with_it_dropped() {
    let server = ServerProcess::start("", &[]);
    let addr = server.addr;
    let grew = watch_memory(&server, Duration::from_secs(30), 32 << 10, move |stop| {
        let socket = connect_small_rcvbuf(addr);
        let (mut ws, _) = tungstenite::client(format!("ws://{addr}/chat"), socket).expect("ws");
        ws.get_mut().set_nonblocking(true).unwrap();
        let ping = Message::Ping(vec![7u8; 125].into());
        let started = Instant::now();
        while !stop.load(Relaxed) && started.elapsed() < Duration::from_secs(25) {
            match ws.write(ping.clone()) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return, // the server closed the connection
            }
            let _ = ws.flush();
        }
    });
    eprintln!("RSS grew {grew} KiB under a ping flood");
    assert!(healthy(addr));
    let (_, _, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.contains("wschat_slow_clients_dropped_total 1"),
        "the pinger is dropped as too slow:\n{metrics}"
    );
}

fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).expect("tcp connect");
    socket.into()
}

// ----- finding 3: file descriptors -----

#[test]
fn running_out_of_descriptors_never_kills_the_port() {
    let mut server = ServerProcess::start("ulimit -n 256 &&", &["--max-clients-per-ip", "0"]);
    let addr = server.addr;
    // 400 connections from 8 addresses, more than the 256 descriptors: the extra ones are
    // turned away at once, the server lives.
    let mut held = Vec::new();
    for i in 0..400 {
        let from = [127, 0, 0, 2 + (i % 8) as u8];
        if let Ok(s) = std::panic::catch_unwind(|| connect_from(from, addr)) {
            held.push(s);
        }
    }
    thread::sleep(Duration::from_millis(300));
    assert!(server.alive(), "the server died when descriptors ran out");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthy(addr) {
        assert!(Instant::now() < deadline, "the port did not come back");
        thread::sleep(Duration::from_millis(100));
    }
    chats(addr, "after");
}

// ----- finding 4: one address at the door -----

#[test]
fn one_address_holding_the_door_locks_nobody_else_out() {
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(2);
    let server = start(cfg);
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    // 2,048 silent sockets from 127.0.0.2, reopened as they are cut.
    let attacker = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut open: Vec<TcpStream> = Vec::new();
            while !stop.load(Relaxed) {
                open.retain(|s| {
                    let mut b = [0u8; 1];
                    s.set_nonblocking(true).unwrap();
                    matches!((&*s).read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
                });
                while open.len() < 2048 && !stop.load(Relaxed) {
                    open.push(connect_from([127, 0, 0, 2], addr));
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    let clients: Vec<Client> = (0..64)
        .map(|i| {
            let mut c = Client::connect(addr, &format!("/chat?name=real{i}"));
            c.expect("welcome");
            c
        })
        .collect();
    assert_eq!(clients.len(), 64);
    stop.store(true, Relaxed);
    attacker.join().unwrap();
    let (_, _, metrics) = http_get(addr, "/metrics");
    assert!(
        metrics.contains("wschat_handshakes_rejected_total{reason=\"too_many_pending\"}"),
        "{metrics}"
    );
    server.shutdown();
}

#[test]
fn new_connections_are_rate_limited_per_address() {
    let mut cfg = config();
    cfg.conn_rate_per_ip = 5.0; // burst 10
    let server = start(cfg);
    let addr = server.addr();
    let statuses: Vec<u16> = (0..30)
        .map(|_| {
            let mut s = connect_from([127, 0, 0, 3], addr);
            s.set_read_timeout(Some(WAIT)).unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    assert!(refused >= 15, "{statuses:?}");
    assert!(statuses[..10].iter().all(|&s| s == 200), "{statuses:?}");
    // Another address is not affected.
    assert!(healthy(addr));
    server.shutdown();
}

// ----- finding 5: bytes, after encoding -----

#[test]
fn text_is_charged_as_it_is_sent_on_escaped() {
    let mut cfg = config();
    cfg.rate_bytes_per_ip = 64.0 * 1024.0; // a burst of 256 KiB
    // The connection's own read rate would hold the sender back before the address's budget
    // does (its reads pause mid-message); this test is about the address's budget.
    cfg.rate_bytes = 1e9;
    let server = start(cfg);
    let (mut sender, _) = Client::join(&server, "/chat?name=quoter");
    let quotes = "\"".repeat(60 * 1024); // 120 KiB once escaped
    let mut refused = None;
    for i in 0..4 {
        sender.send(&quotes);
        let frame = loop {
            let f = sender.recv();
            if f["type"] == "message" || f["type"] == "error" {
                break f;
            }
        };
        if frame["type"] == "error" {
            refused = Some((i, frame));
            break;
        }
    }
    let (i, error) = refused.expect("four 60 KiB messages of quotes in a row are not all sent");
    assert_eq!(i, 2, "two fit the 256 KiB burst, the third does not");
    assert_eq!(error["code"], "rate_limited");
    assert!(
        error["message"].as_str().unwrap().contains("--rate-bytes"),
        "{error}"
    );
    server.shutdown();
}

#[test]
fn a_member_reads_at_most_its_rooms_byte_rate_however_many_senders() {
    let mut cfg = config();
    cfg.room_rate_bytes = 64.0 * 1024.0; // burst 256 KiB (4 s)
    let server = start(cfg);
    let addr = server.addr();
    let (mut reader, _) = Client::join(&server, "/chat?name=reader");
    let started = Instant::now();
    let senders: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                // Half speak in the reader's room, half whisper to it from another room.
                let room = if i % 2 == 0 { "lobby" } else { "elsewhere" };
                let mut s = Client::connect(addr, &format!("/chat/{room}?name=s{i}"));
                s.expect("welcome");
                let text = "x".repeat(16 * 1024);
                while started.elapsed() < Duration::from_secs(2) {
                    match i % 2 {
                        0 => s.send(&text),
                        _ => s.send_json(json!({"type":"message","text":text,"to":"reader"})),
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    senders.into_iter().for_each(|t| t.join().unwrap());
    let mut bytes = 0;
    reader
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(m) = reader.ws.read() {
        if let Message::Text(t) = m
            && t.contains("\"type\":\"message\"")
        {
            bytes += t.len();
        }
    }
    let allowed = 256 * 1024 + 64 * 1024 * 3; // the burst, and 2 s (+1 for slack) of the rate
    assert!(
        bytes > 0 && bytes <= allowed,
        "the reader got {bytes} bytes of messages"
    );
    server.shutdown();
}

// ----- the total backlog budget -----

#[test]
fn slow_readers_together_hold_at_most_the_backlog_budget() {
    let mut cfg = config();
    cfg.backlog_bytes = 1 << 20;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    let server = start(cfg);
    let addr = server.addr();
    let stallers: Vec<_> = (0..6)
        .map(|i| {
            let s = connect_small_rcvbuf(addr);
            tungstenite::client(format!("ws://{addr}/chat/slow?name=st{i}"), s).unwrap()
        })
        .collect();
    let (mut talker, _) = Client::join(&server, "/chat/slow?name=talker");
    let text = "t".repeat(32 * 1024);
    for _ in 0..100 {
        talker.send(&text);
        talker.expect("message");
        let waiting = server.metrics().backlog_bytes.load(Relaxed);
        assert!(
            waiting <= (1 << 20) + 6 * 40 * 1024,
            "{waiting} bytes wait for slow readers"
        );
    }
    assert!(server.metrics().slow_clients_dropped.load(Relaxed) >= 1);
    drop(stallers);
    server.shutdown();
}

// ----- findings 10, 15: the API token -----

#[test]
fn the_api_takes_any_case_of_bearer_and_limits_posts() {
    let mut cfg = config();
    cfg.api_token = Some("s3cret".into());
    cfg.api_rate = 2.0; // burst 4
    let server = start(cfg);
    let post = |auth: &str| {
        let request = format!(
            "POST /api/rooms/lobby/messages HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        http_request(server.addr(), &request).0
    };
    assert_eq!(post("bearer s3cret"), 201);
    assert_eq!(post("BEARER s3cret"), 201);
    assert_eq!(post("Bearer wrong"), 401);
    let statuses: Vec<u16> = (0..6).map(|_| post("Bearer s3cret")).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    server.shutdown();
}

#[test]
fn an_empty_api_token_refuses_to_start() {
    for (args, env) in [(&["--api-token", ""][..], None), (&[][..], Some(""))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wschat"));
        cmd.args(["--port", "0"]).args(args).stdin(Stdio::null());
        if let Some(v) = env {
            cmd.env("WSCHAT_API_TOKEN", v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("empty"), "{stderr}");
    }
}

// ----- the front door keeps HTTP connections -----

#[test]
fn keep_alive_requests_and_an_upgrade_share_one_connection() {
    let server = start(config());
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = vec![0u8; 1024];
        let n = s.read(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
            "{answer}"
        );
    }
    s.write_all(upgrade_request("/chat?name=reuser", "").as_bytes())
        .unwrap();
    let head = common::handshake_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (mut ws, _) = (
        tungstenite::WebSocket::from_raw_socket(s, tungstenite::protocol::Role::Client, None),
        (),
    );
    let welcome = ws.read().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("\"welcome\""),
        "{welcome}"
    );
    ws.send(Message::Text(
        json!({"type":"message","text":"hi"}).to_string().into(),
    ))
    .unwrap();
    server.shutdown();
}
