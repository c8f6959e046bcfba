//! The load generator `wschat-load` (src/bin/wschat-load/) against an in-process server: every
//! mode on small sizes, checking the figures of its JSON line for consistency, plus its failure
//! paths (nothing listening, --timeout, a non-loopback target).
//!
//! The tool runs as a subprocess; each run is bounded by the tool's own --timeout and, should
//! that fail, killed by `run` below. The tests take a lock so that only one load runs at a time
//! and the figures are not skewed by the other tests' load.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::DataDir;
use serde_json::Value;
use wschat::{Config, Handle, Server};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Longest a run may take before the test kills it.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// A server on free ports with its limits lifted: no rate limit, no client limits, and
/// queues deep enough that a load-generator thread starved for a while on a busy machine is
/// not dropped as too slow (these tests check the tool's accounting, not that policy; one test
/// below checks that drops are reported).
fn server() -> Handle {
    Server::start(Config {
        http_port: 0,
        rate: 1_000_000.0,
        burst: 1_000_000.0,
        max_clients: 0,
        max_clients_per_ip: 0,
        client_queue: 1_000_000,
        client_queue_bytes: 1 << 30,
        conn_rate_per_ip: 0.0,
        rate_bytes: 1e12,
        rate_bytes_per_ip: 1e12,
        room_rate_bytes: 1e12,
        backlog_bytes: 1 << 30,
        // Every join told one by one, however fast they come: `idle` counts them.
        presence_burst: u32::MAX,
        ..Config::default()
    })
    .expect("server starts")
}

struct Run {
    code: i32,
    json: Value,
    stdout: String,
    stderr: String,
}

/// Runs wschat-load with `args`; returns its exit code, the JSON of its last stdout line, and
/// its output.
fn run(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wschat-load");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("wschat-load {args:?} ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("last stdout line is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}")
    });
    Run {
        code: status.code().unwrap_or(-1),
        json,
        stdout,
        stderr,
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

fn assert_ok(r: &Run) {
    assert!(
        r.code == 0 && r.json["ok"] == true,
        "exit {} ok={}\nstdout:\n{}\nstderr:\n{}",
        r.code,
        r.json["ok"],
        r.stdout,
        r.stderr
    );
}

#[test]
fn fanout_delivers_every_message_to_every_member() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let pid = std::process::id().to_string();
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--clients",
        "20",
        "--senders",
        "2",
        "--window",
        "20",
        "--duration",
        "1.5",
        "--warmup",
        "0.5",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    let j = &r.json;
    assert_eq!(j["mode"], "fanout");
    assert_eq!(j["target"], "wschat");
    assert_eq!(n(&j["connections"]["registered"]), 20);
    assert_eq!(n(&j["lost"]), 0);
    assert_eq!(n(&j["duplicated"]), 0);
    assert_eq!(n(&j["order_violations"]), 0);
    let sent = n(&j["sent"]["measured"]);
    let delivered = n(&j["deliveries"]["measured"]);
    assert!(sent > 0, "{j}");
    // Every member, the senders included, receives every message sent in the measured time.
    assert_eq!(delivered, sent * 20, "{j}");
    assert_eq!(n(&j["deliveries"]["expected_measured"]), delivered);
    // Every delivery of a measured message has a latency sample; the total includes warm-up.
    assert_eq!(n(&j["latency_us"]["count"]), delivered);
    assert!(n(&j["deliveries"]["total"]) >= delivered);
    assert_eq!(n(&j["deliveries"]["total"]), n(&j["sent"]["total"]) * 20);
    // Each sender's own echoes are its landed messages.
    assert_eq!(n(&j["echo_latency_us"]["count"]), sent);
    let p50 = j["latency_us"]["p50"].as_f64().unwrap();
    let max = j["latency_us"]["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= max, "{j}");
    assert_eq!(j["errors"], serde_json::json!({}));
    assert_eq!(j["server_closes"], serde_json::json!({}));
    assert!(
        j["cpu"]["tool_s"].is_number() && j["cpu"]["server_s"].is_number(),
        "{j}"
    );
    // The human table comes first, the JSON line last.
    assert!(r.stdout.starts_with("wschat-load fanout"), "{}", r.stdout);
    server.shutdown();
}

#[test]
fn latency_mode_sends_at_the_asked_rate() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let r = run(&[
        "latency",
        "--url",
        &url,
        "--clients",
        "10",
        "--senders",
        "2",
        "--rate",
        "200",
        "--duration",
        "1.5",
        "--warmup",
        "0.5",
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    let j = &r.json;
    // The schedule holds 200 msg/s over warm-up + measured time (2 s), whatever the machine's
    // load: late messages are sent late, not dropped.
    let total = n(&j["sent"]["total"]);
    assert!((398..=402).contains(&total), "sent {total}: {j}");
    // Those stamped in the measured 1.5 s: 300, give or take a stall at the window's edges.
    let sent = n(&j["sent"]["measured"]);
    assert!((200..=360).contains(&sent), "sent {sent}: {j}");
    assert_eq!(n(&j["deliveries"]["measured"]), sent * 10);
    assert_eq!(n(&j["lost"]), 0);
    assert_eq!(n(&j["duplicated"]), 0);
    assert_eq!(n(&j["order_violations"]), 0);
    assert_eq!(n(&j["send_lag_us"]["count"]), n(&j["sent"]["total"]));
    for q in ["p50", "p90", "p99", "max"] {
        assert!(j["latency_us"][q].as_f64().unwrap() > 0.0, "{q}: {j}");
    }
    server.shutdown();
}

#[test]
fn raw_mode_counts_the_token_inside_wschat_envelopes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    // --raw sends bare text: wschat takes it as a chat message and wraps it in a JSON event.
    let url = format!("{}?room=rawtest", server.ws_url());
    let r = run(&[
        "fanout",
        "--raw",
        "--url",
        &url,
        "--clients",
        "5",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--size",
        "200",
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    let j = &r.json;
    assert_eq!(j["target"], "raw");
    let sent = n(&j["sent"]["measured"]);
    assert!(sent > 0);
    assert_eq!(n(&j["deliveries"]["measured"]), sent * 5);
    assert_eq!(n(&j["lost"]), 0);
    server.shutdown();
}

#[test]
fn idle_opens_and_holds_every_connection() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let pid = std::process::id().to_string();
    let r = run(&[
        "idle",
        "--url",
        &url,
        "--connections",
        "60",
        "--concurrency",
        "4",
        "--per-room",
        "20",
        "--hold",
        "1",
        "--server-pid",
        &pid,
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    let j = &r.json;
    assert_eq!(n(&j["opened"]), 60);
    assert_eq!(n(&j["failed"]), 0);
    assert_eq!(j["dropped_during_hold"], serde_json::json!({}));
    // 3 rooms of 20: each member hears every later member join.
    assert!(n(&j["frames_received"]) >= 3 * (20 * 19 / 2), "{j}");
    assert_eq!(n(&j["closed_cleanly"]) + n(&j["close_unacked"]), 60);
    assert!(j["connections_per_s"].as_f64().unwrap() > 0.0);
    assert!(j["memory"]["held"]["server_rss_kb"].is_number(), "{j}");
    server.shutdown();
}

/// RFC 6455 5.5.1: a close frame must be answered with a close frame.
#[test]
fn idle_connections_close_with_a_closing_handshake() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let r = run(&[
        "idle",
        "--url",
        &url,
        "--connections",
        "10",
        "--hold",
        "0.2",
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    assert_eq!(n(&r.json["closed_cleanly"]), 10, "{}", r.json);
    server.shutdown();
}

#[test]
fn churn_cycles_without_errors() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let r = run(&[
        "churn",
        "--url",
        &url,
        "--threads",
        "2",
        "--duration",
        "1.5",
        "--warmup",
        "0.3",
        "--timeout",
        "60",
    ]);
    assert_ok(&r);
    let j = &r.json;
    let c = &j["cycles"];
    let total = n(&c["total"]);
    assert!(n(&c["measured"]) >= 10, "{j}");
    assert!(n(&c["measured"]) <= total);
    // Every 10th cycle of each thread drops the socket; the others close properly.
    assert!(n(&c["abrupt"]) >= total / 10 - 2, "{j}");
    assert_eq!(
        n(&c["abrupt"]) + n(&c["closed_cleanly"]) + n(&c["close_unacked"]),
        total
    );
    assert_eq!(j["errors"], serde_json::json!({}));
    assert_eq!(n(&j["connect_us"]["count"]), n(&c["measured"]));
    server.shutdown();
}

#[test]
fn clients_dropped_by_the_server_are_reported_as_losses() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The server goes away in the middle of the measured run (0.7 s after the first message:
    // past the 0.2 s warm-up, well before the end of the 3 s run, however slow the setup was).
    // Its clients are dropped with close 1001, and the tool must say so rather than report a
    // clean run.
    // Queues deep enough that a member lagging behind on a busy machine is not dropped as too
    // slow (1008) first, as scripts/bench runs it: the only drop here is the shutdown's.
    let server = server_with_flags(&[
        "--load-test",
        "--client-queue",
        "1000000",
        "--client-queue-bytes",
        "1073741824",
    ]);
    let url = server.ws_url();
    let stopper = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.metrics().messages_received.load(Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(700));
        server.shutdown();
    });
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--clients",
        "3",
        "--window",
        "10",
        "--duration",
        "3",
        "--warmup",
        "0.2",
        "--drain",
        "0.5",
        "--timeout",
        "60",
    ]);
    stopper.join().expect("the server stops");
    let j = &r.json;
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(j["ok"], false);
    // Each member reads its close frame, or sees its connection end; the tool reports both.
    let closes = j["server_closes"]["1001 server shutting down"]
        .as_u64()
        .unwrap_or(0);
    assert!(closes + n(&j["connections"]["ended_early"]) >= 3, "{j}");
    // Whatever was sent was received, counted lost, or left unanswered by the closed sender,
    // for every member (a message the sender never heard back about may still have reached
    // others: hence at least). Nothing was refused: the server has no rate limits.
    let accounted = n(&j["deliveries"]["total"]) + n(&j["lost"]) + n(&j["unanswered"]) * 3;
    assert!(accounted >= n(&j["sent"]["total"]) * 3, "{j}");
    assert_eq!(
        (n(&j["refused"]), &j["limited_by"]),
        (0, &Value::Null),
        "{j}"
    );
}

/// A server as `wschat` with these flags (and free ports) starts it.
fn server_with_flags(flags: &[&str]) -> Handle {
    let args = ["wschat", "--port", "0"]
        .iter()
        .chain(flags)
        .map(Into::into);
    match wschat::config::parse_args(args, |_| None) {
        Ok(wschat::config::Parsed::Run(config)) => Server::start(*config).expect("server starts"),
        other => panic!("flags {flags:?}: {other:?}"),
    }
}

#[test]
fn against_a_default_server_the_tool_names_the_limit_that_refused_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server_with_flags(&[]);
    let url = server.ws_url();
    let r = run(&[
        "fanout",
        "--url",
        &url,
        "--clients",
        "3",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--drain",
        "0.5",
        "--timeout",
        "60",
    ]);
    let j = &r.json;
    assert_eq!((r.code, &j["ok"]), (2, &Value::Bool(false)), "{}", r.stdout);
    let limit = j["limited_by"]
        .as_str()
        .unwrap_or_else(|| panic!("no limit named: {j}"));
    assert!(
        limit.contains("rate limit") && limit.contains("--load-test"),
        "{limit}"
    );
    let first_line = r.stdout.lines().next().unwrap_or_default();
    assert!(
        first_line.ends_with(&format!("(NOT OK: {limit})")),
        "{first_line}"
    );
    // The window ran into the rate limit at once: refused messages are not losses.
    assert!(n(&j["refused"]) > 0, "{j}");
    assert_eq!(n(&j["lost"]), 0, "{j}");
    server.shutdown();

    let server = server_with_flags(&["--max-clients-per-ip", "2"]);
    let url = server.ws_url();
    let r = run(&[
        "idle",
        "--url",
        &url,
        "-n",
        "4",
        "--hold",
        "0.2",
        "--timeout",
        "60",
    ]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let limit = r.json["limited_by"].as_str().unwrap_or_default();
    assert!(
        limit.starts_with("refused at connect: http 503"),
        "{}",
        r.json
    );
    assert!(
        limit.contains("--max-clients-per-ip") && limit.contains("--load-test"),
        "{limit}"
    );
    server.shutdown();
}

#[test]
fn a_load_test_server_takes_a_default_fanout_and_latency_run() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server_with_flags(&["--load-test"]);
    let url = server.ws_url();
    for mode in ["fanout", "latency"] {
        let r = run(&[
            mode,
            "--url",
            &url,
            "--clients",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--timeout",
            "60",
        ]);
        assert_ok(&r);
        assert_eq!(r.json["limited_by"], Value::Null);
        assert_eq!(n(&r.json["refused"]), 0);
    }
    server.shutdown();
}

/// Receivers spread over every `--url`, senders stay on the first. Two servers that are not
/// one chat show it: the probe, sent on the first, reaches exactly the connections placed there
/// (the sender and receivers 1 and 3 of 4; receivers 2 and 4 are on the second server).
#[test]
fn several_urls_spread_the_receivers_and_keep_the_sender_on_the_first() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = (server(), server());
    let (url_a, url_b) = (a.ws_url(), b.ws_url());
    let r = run(&[
        "latency",
        "--url",
        &url_a,
        "--url",
        &url_b,
        "--clients",
        "5",
        "--setup-timeout",
        "3",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let error = r.json["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("only 3 of 5 connections received the probe"),
        "{}",
        r.json
    );
    assert_eq!(n(&r.json["connections"]["registered"]), 5, "{}", r.json);
    let nodes = r.json["node_urls"].as_array().expect("node_urls");
    assert!(nodes[1].as_str().unwrap().starts_with(&url_b), "{}", r.json);
    a.shutdown();
    b.shutdown();
}

#[test]
fn nothing_listening_is_a_setup_failure() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A port that was just free: bind, note, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/chat");
    let r = run(&["fanout", "--url", &url, "--clients", "3", "--timeout", "30"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.json["ok"], false);
    assert!(
        r.json["error"].as_str().unwrap().contains("failed"),
        "{}",
        r.json
    );
    assert_eq!(n(&r.json["errors"]["connect: refused"]), 3, "{}", r.json);
}

#[test]
fn the_timeout_bounds_a_run() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let url = server.ws_url();
    let started = Instant::now();
    let r = run(&[
        "latency",
        "--url",
        &url,
        "--clients",
        "2",
        "--duration",
        "60",
        "--timeout",
        "1.5",
        "--quiet",
    ]);
    assert_eq!(r.code, 3, "{}", r.stdout);
    assert_eq!(r.json["ok"], false);
    assert!(r.json["error"].as_str().unwrap().contains("timeout"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // --quiet: the JSON line is all there is on stdout.
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    server.shutdown();
}

#[test]
fn refuses_non_loopback_targets_and_bad_usage() {
    let r = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .args(["idle", "--url", "ws://192.0.2.1:5001/chat"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--allow-remote"));
    let r = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .args(["fanout", "--senders", "5", "--clients", "2"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let r = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(r.status.success());
    let help = String::from_utf8_lossy(&r.stdout);
    assert!(help.contains("fanout"));
    // which server flags a run needs
    assert!(help.contains("wschat --load-test") && help.contains("--max-clients-per-ip 0"));
}

// ---------------------------------------------------------------------------------------------
// storm: the server restarts under the tool, as a process of its own

/// The `wschat` binary as a child process on `port` (0: a free one), with its limits lifted for
/// a load test and `extra` flags; returns it and the port it printed.
fn spawn_wschat(port: u16, extra: &[&str]) -> (std::process::Child, u16) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_wschat"))
        .args(["--port", &port.to_string(), "--load-test"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wschat starts");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    // wschat listening: http://127.0.0.1:P/ (websocket ...)
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("startup line: {line:?}"));
    (child, port)
}

/// Runs `wschat-load storm` with 200 clients (and `tool_args`) against a wschat process (with
/// `server_args`), and kills and restarts that process (same port, same flags) when the tool
/// says every client has the first round.
fn storm_across_a_restart(server_args: &[&str], tool_args: &[&str]) -> Run {
    use std::io::{BufRead, BufReader};
    let (mut server, port) = spawn_wschat(0, server_args);
    let url = format!("ws://127.0.0.1:{port}/chat");
    let args = [
        "storm",
        "--url",
        &url,
        "-n",
        "200",
        "--hold",
        "30",
        "--timeout",
        "60",
    ];
    let mut tool = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .args(args)
        .args(tool_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wschat-load");
    let mut stderr = BufReader::new(tool.stderr.take().unwrap());
    let mut seen = String::new();
    // The tool's --timeout ends this loop should it never get there (its stderr closes).
    while !seen.contains("restart the server now") {
        let before = seen.len();
        if stderr.read_line(&mut seen).unwrap_or(0) == 0 || seen.len() == before {
            break;
        }
    }
    let _ = server.kill(); // a crash, not a clean shutdown: nothing on disk may depend on it
    let _ = server.wait();
    let (mut server, _) = spawn_wschat(port, server_args);
    let mut out = String::new();
    let _ = tool.stdout.take().unwrap().read_to_string(&mut out);
    let _ = stderr.read_to_string(&mut seen);
    let status = tool.wait().expect("wait for wschat-load");
    let _ = server.kill();
    let _ = server.wait();
    let last = out.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last stdout line is not JSON ({e}):\n{out}\nstderr:\n{seen}"));
    Run {
        code: status.code().unwrap_or(-1),
        json,
        stdout: out,
        stderr: seen,
    }
}

#[test]
fn storm_brings_every_client_back_with_every_message_across_a_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = DataDir::new("storm");
    let server = ["--data-dir", dir.path()];
    let r = storm_across_a_restart(&server, &["--per-room", "50", "--setup-timeout", "15"]);
    assert_ok(&r);
    let j = &r.json;
    assert_eq!((n(&j["resumed"]), n(&j["complete"])), (200, 200), "{j}");
    assert_eq!((n(&j["lost"]), n(&j["duplicated"])), (0, 0), "{j}");
    assert!(n(&j["attempts"]) >= 200, "every client reconnected: {j}");
    let (down, back) = (j["down_s"].as_f64().unwrap(), j["back_s"].as_f64().unwrap());
    assert!(0.0 < down && down <= back, "{j}");
    // The odd-numbered half came back only after their room's second round was stored.
    let (stored, storm) = (
        j["stored_s"].as_f64().unwrap(),
        j["storm_s"].as_f64().unwrap(),
    );
    assert!(0.0 <= stored && stored <= storm, "{j}");
}

#[test]
fn storm_reports_what_a_replay_cut_short_loses() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A server that keeps 2 messages per room: the clients that come back after the second
    // round was stored (at least the odd-numbered half) get only its last 2 in their replay. The
    // tool must count the other 3 as lost for each of them, and the replay as cut short.
    let dir = DataDir::new("storm-short");
    let server = ["--data-dir", dir.path(), "--history", "2"];
    let r = storm_across_a_restart(&server, &["--per-room", "0", "--setup-timeout", "4"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json["ok"], false);
    assert_eq!(n(&r.json["resumed"]), 200, "{}", r.json);
    assert!(
        n(&r.json["lost"]) >= 3 && n(&r.json["truncated"]) > 0,
        "{}",
        r.json
    );
    assert_eq!(n(&r.json["duplicated"]), 0, "{}", r.json);
}
