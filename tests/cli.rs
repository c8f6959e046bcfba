//! The `wschat` binary as a person runs it: the startup line, a busy port, signals.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Client, failed_run, wschat};

/// Starts the binary on free ports and returns it with the HTTP and WebSocket addresses it printed.
fn spawn_server(extra: &[&str]) -> (Child, String, String) {
    let mut args = vec!["--port", "0"];
    args.extend_from_slice(extra);
    let mut child = wschat(&args).spawn().expect("binary starts");
    let (http, ws) = common::read_listening_line(&mut child);
    (child, http, ws)
}

/// Stops the server with SIGTERM, checks it exits cleanly, and returns what it logged.
fn stop_and_read_log(child: &mut Child) -> String {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(wait_exit(child, Duration::from_secs(5)).is_some_and(|s| s.success()));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    log
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn a_busy_port_is_a_one_line_error_and_exit_code_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = wschat(&["--port", &port]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("port {port}")) && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn help_works() {
    let out = wschat(&["--help"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--max-clients"));
}

#[test]
fn a_bad_flag_value_names_the_flag_and_what_it_allows() {
    let cases = [
        (
            &["--port", "abc"][..],
            "wschat: --port: \"abc\" is not a port number (0-65535)",
        ),
        (
            &["--port", "70000"],
            "wschat: --port: \"70000\" is not a port number (0-65535)",
        ),
        (
            &["--rate", "0"],
            "wschat: --rate: \"0\" is not a number above 0",
        ),
        (
            &["--allow-origin", "foo"],
            "wschat: --allow-origin: \"foo\" is not an origin",
        ),
    ];
    for (args, start) in cases {
        let (code, stderr) = failed_run(args);
        assert_eq!(code, Some(2), "{args:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(start), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unusable_data_dir_is_named_with_its_problem() {
    let file = std::env::temp_dir().join(format!("wschat-cli-{}.txt", std::process::id()));
    std::fs::write(&file, "not a directory").unwrap();
    let file_arg = file.to_str().unwrap();
    let (code, stderr) = failed_run(&["--port", "0", "--data-dir", file_arg]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr.trim(),
        format!("wschat: --data-dir {file_arg}: is not a directory")
    );
    // A directory nobody may write in, even root: sysfs refuses new files.
    if std::path::Path::new("/sys/kernel").is_dir() {
        let (code, stderr) = failed_run(&["--port", "0", "--data-dir", "/sys/kernel"]);
        assert_eq!(code, Some(1));
        assert_eq!(
            stderr.trim(),
            "wschat: --data-dir /sys/kernel: is not writable"
        );
    }
}

#[test]
fn load_test_mode_is_logged_once_at_start() {
    let (mut child, _http, _ws) = spawn_server(&["--load-test"]);
    let log = stop_and_read_log(&mut child);
    let warning =
        "load-test mode: rate limits and per-address caps are off; do not expose this server";
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains("WARN"), "{log}");
}

#[test]
fn sigterm_and_sigint_close_clients_with_1001_and_exit_0() {
    for signal in ["-TERM", "-INT"] {
        let (mut child, _http, ws) = spawn_server(&[]);
        let mut client = Client::connect(ws.parse().unwrap(), "/chat");
        client.expect("welcome");
        let t0 = Instant::now();
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert_eq!(client.expect_close(), Some(1001));
        let status = wait_exit(&mut child, Duration::from_secs(5)).expect("exits");
        assert!(status.success(), "{signal}: {status:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{signal}: exit took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn logs_connects_and_disconnects_and_at_debug_the_messages_and_handshakes() {
    // RUST_LOG=debug also runs the deepest logging paths on the connection threads' small stacks.
    let mut cmd = wschat(&["--port", "0"]);
    cmd.env("RUST_LOG", "debug");
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ws = line
        .split("ws://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let mut client = Client::connect(ws.parse().unwrap(), "/chat?name=logme");
    client.expect("welcome");
    client.send("hello log");
    client.expect("message");
    client.send(&format!(
        r#"{{"type":"message","text":"x","deep":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    ));
    client.expect("message");
    client.close();
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_and_read_log(&mut child);
    assert!(
        log.contains("a user connected") && log.contains("\"logme\"") && log.contains("127.0.0.1"),
        "{log}"
    );
    assert!(
        log.contains("a user disconnected") && log.contains("closed by the client"),
        "{log}"
    );
    assert!(log.contains("got message from \"logme\""), "{log}");
    assert!(
        log.contains("request from") && log.contains("Sec-WebSocket-Key"),
        "{log}"
    );
    assert!(log.contains("101 Switching Protocols"), "{log}");
}

#[test]
fn bound_to_every_address_it_says_where_neighbours_connect() {
    let mut child = wschat(&["--bind", "0.0.0.0", "--port", "0"])
        .spawn()
        .expect("binary starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut first, mut second) = (String::new(), String::new());
    out.read_line(&mut first).unwrap();
    out.read_line(&mut second).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.starts_with("wschat listening: http://127.0.0.1:"),
        "{first}"
    );
    assert!(
        second.contains("from other machines: http://")
            || second.contains("no network address besides loopback"),
        "{second}"
    );
}

#[test]
fn a_flood_of_refusals_is_logged_once() {
    let (mut child, http, _) = spawn_server(&["--conn-rate-per-ip", "1"]);
    let addr: std::net::SocketAddr = http.parse().unwrap();
    for _ in 0..100 {
        let _ = std::net::TcpStream::connect(addr);
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = stop_and_read_log(&mut child);
    let lines = log.matches("turned away a connection").count();
    assert_eq!(lines, 1, "{log}");
    assert!(log.contains("--conn-rate-per-ip"), "{log}");
}
