//! The HTTP side: page, config.json, API, health and metrics.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{Value, json};
use wschat::Config;

fn json_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &str,
) -> (u16, String, String) {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_request(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[test]
fn the_page_is_served_with_the_right_types_and_headers() {
    let server = start(config());
    let addr = server.http_addr();
    let (status, head, body) = http_get(addr, "/");
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"));
    assert!(head.contains("\r\nServer: wschat\r\n"), "{head}");
    assert!(!head.contains("tiny-http"), "{head}");
    let csp = head
        .lines()
        .find(|l| l.starts_with("Content-Security-Policy:"))
        .expect("a CSP header");
    assert!(
        csp.contains("script-src 'self'")
            && csp.contains(&format!("ws://127.0.0.1:{}", server.ws_addr().port())),
        "{csp}"
    );
    for (path, ty) in [
        ("/app.js", "text/javascript"),
        ("/style.css", "text/css"),
        ("/favicon.svg", "image/svg+xml"),
    ] {
        let (status, head, _) = http_get(addr, path);
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("Content-Type: {ty}")),
            "{path}: {head}"
        );
    }
    let (status, head, body) =
        http_request(addr, &format!("HEAD / HTTP/1.0\r\nHost: {addr}\r\n\r\n"));
    assert_eq!((status, body.as_str()), (200, ""), "HEAD has no body");
    assert!(head.contains("text/html"));
    assert_eq!(http_get(addr, "/nope.html").0, 404);
    server.shutdown();
}

#[test]
fn config_json_uses_the_host_the_browser_used() {
    let server = start(config());
    let addr = server.http_addr();
    let port = addr.port();
    let (status, head, body) = http_request(
        addr,
        "GET /config.json HTTP/1.0\r\nHost: 192.168.7.9:5000\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert!(head.contains("application/json"));
    assert_eq!(json_body(&body)["ws_url"], "ws://192.168.7.9:5000/chat");
    let (_, _, body) = http_request(
        addr,
        "GET /config.json HTTP/1.0\r\nHost: evil\"host\r\n\r\n",
    );
    assert_eq!(
        json_body(&body)["ws_url"],
        format!("ws://127.0.0.1:{port}/chat"),
        "an odd Host is not echoed"
    );
    server.shutdown();

    let server = start(Config {
        public_ws_url: Some("wss://chat.example.org/chat".into()),
        ..config()
    });
    let (_, _, body) = http_get(server.http_addr(), "/config.json");
    assert_eq!(json_body(&body)["ws_url"], "wss://chat.example.org/chat");
    server.shutdown();
}

#[test]
fn path_traversal_gets_404_and_no_file_contents() {
    let dir = std::env::temp_dir().join(format!("wschat-www-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("index.html"), "<!doctype html>hi").unwrap();
    std::fs::write(dir.join("sub/page.json"), "{}").unwrap();
    std::fs::write(std::env::temp_dir().join("wschat-secret.txt"), "SECRET").unwrap();
    std::os::unix::fs::symlink(
        std::env::temp_dir().join("wschat-secret.txt"),
        dir.join("leak.txt"),
    )
    .unwrap();
    let server = start(Config {
        www_dir: Some(dir.clone()),
        ..config()
    });
    let addr = server.http_addr();
    assert_eq!(http_get(addr, "/sub/page.json").0, 200);
    assert!(
        http_get(addr, "/sub/page.json")
            .1
            .contains("application/json")
    );
    for path in [
        "/../wschat-secret.txt",
        "/%2e%2e/wschat-secret.txt",
        "/sub/../../wschat-secret.txt",
        "/sub/%2e%2e/%2e%2e/wschat-secret.txt",
        "/leak.txt",
        "//etc/passwd",
        "/..%2fwschat-secret.txt",
        "/%2fetc%2fpasswd",
    ] {
        let (status, _, body) =
            http_request(addr, &format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n"));
        assert!(status == 404 || status == 400, "{path} -> {status}");
        assert!(
            !body.contains("SECRET") && !body.contains("root:"),
            "{path} leaked"
        );
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn posting_needs_a_configured_token() {
    let server = start(config());
    let (status, _, body) = post(
        server.http_addr(),
        "/api/rooms/lobby/messages",
        Some("x"),
        "text/plain",
        "hi",
    );
    assert_eq!(status, 403);
    assert!(
        body.contains("--api-token"),
        "says how to enable it: {body}"
    );
    server.shutdown();
}

#[test]
fn posting_with_the_right_token_broadcasts_and_wrong_ones_are_401() {
    let server = start(Config {
        api_token: Some("s3cret".into()),
        max_message_bytes: 1024,
        ..config()
    });
    let addr = server.http_addr();
    let (mut c, _) = Client::join(&server, "/chat/ops");
    assert_eq!(
        post(addr, "/api/rooms/ops/messages", None, "text/plain", "hi").0,
        401
    );
    assert_eq!(
        post(
            addr,
            "/api/rooms/ops/messages",
            Some("s3cres"),
            "text/plain",
            "hi"
        )
        .0,
        401
    );
    let (status, _, body) = post(
        addr,
        "/api/rooms/ops/messages",
        Some("s3cret"),
        "text/plain",
        "deploy done",
    );
    assert_eq!(status, 201, "{body}");
    let id = json_body(&body)["id"].as_u64().unwrap();
    let m = c.expect("message");
    assert_eq!(
        (m["id"].as_u64(), m["from"].as_str(), m["text"].as_str()),
        (Some(id), Some("server"), Some("deploy done"))
    );
    let (status, _, _) = post(
        addr,
        "/api/rooms/ops/messages",
        Some("s3cret"),
        "application/json",
        r#"{"text":"from a bot","from":"ci-bot"}"#,
    );
    assert_eq!(status, 201);
    assert_eq!(c.expect("message")["from"], "ci-bot");
    let bad = [
        ("bad%20room", "text/plain", "x"),
        ("ops", "text/plain", "  "),
        ("ops", "application/json", "{"),
    ];
    for (room, content_type, body) in bad {
        let path = format!("/api/rooms/{room}/messages");
        let status = post(addr, &path, Some("s3cret"), content_type, body).0;
        assert_eq!(status, 400, "{room} {body:?}");
    }
    let (status, head, body) = post(
        addr,
        "/api/rooms/ops/messages",
        Some("s3cret"),
        "text/plain",
        &"z".repeat(5000),
    );
    assert_eq!(status, 413, "{head}");
    assert_eq!(json_body(&body)["error"], "too_large");
    // A wrong token is refused before the body is read, even a huge one.
    let (status, _, _) = post(
        addr,
        "/api/rooms/ops/messages",
        Some("nope"),
        "text/plain",
        &"z".repeat(5000),
    );
    assert_eq!(status, 401);
    server.shutdown();
}

#[test]
fn rooms_and_history_can_be_read_without_a_token() {
    let server = start(Config {
        rate: 1e6,
        burst: 1e6,
        ..config()
    });
    let addr = server.http_addr();
    let (mut a, _) = Client::join(&server, "/chat/dev");
    let (_b, _) = Client::join(&server, "/chat/dev");
    let (_c, _) = Client::join(&server, "/chat");
    let sent: Vec<u64> = (0..5)
        .map(|i| {
            a.send(&format!("m{i}"));
            a.expect("message")["id"].as_u64().unwrap()
        })
        .collect();
    let (status, _, body) = http_get(addr, "/api/rooms");
    assert_eq!(status, 200);
    assert_eq!(
        json_body(&body)["rooms"],
        json!([{"name":"dev","count":2},{"name":"lobby","count":1}])
    );
    let (status, _, body) = http_get(
        addr,
        &format!("/api/rooms/dev/messages?since={}&limit=2", sent[1]),
    );
    assert_eq!(status, 200);
    let page = json_body(&body);
    let got: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got, sent[2..4], "a page goes forward from since");
    assert_eq!(page["messages"][0]["text"], "m2");
    assert_eq!(page["more"], true);
    let next = format!("/api/rooms/dev/messages?since={}&limit=2", sent[3]);
    let page = json_body(&http_get(addr, &next).2);
    assert_eq!(page["messages"][0]["id"], sent[4]);
    assert_eq!(page["more"], false, "{page}");
    let (status, _, _) = http_request(
        addr,
        "GET /api/rooms/dev/messages HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer whatever\r\n\r\n",
    );
    assert_eq!(status, 200, "a token on a read is ignored");
    assert_eq!(http_get(addr, "/api/rooms/dev/messages?since=x").0, 400);
    assert_eq!(http_get(addr, "/api/nothing").0, 404);
    server.shutdown();
}

#[test]
fn healthz_answers_while_the_dispatcher_runs() {
    let server = start(config());
    let (status, _, body) = http_get(server.http_addr(), "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    server.shutdown();
}

#[test]
fn metrics_counters_move() {
    let server = start(config());
    let addr = server.http_addr();
    assert_eq!(metric(addr, "wschat_connections"), 0);
    let (mut a, _) = Client::join(&server, "/chat");
    let (mut b, _) = Client::join(&server, "/chat");
    a.send("counted");
    a.expect("message");
    b.expect("message");
    let _ = raw_request(
        server.ws_addr(),
        upgrade_request("/elsewhere", "").as_bytes(),
    );
    assert_eq!(metric(addr, "wschat_connections"), 2);
    assert_eq!(metric(addr, "wschat_connections_total"), 2);
    assert_eq!(metric(addr, "wschat_messages_received_total"), 1);
    // Counters are added after each batch is handed out, so a reader may be a moment ahead.
    let deadline = std::time::Instant::now() + WAIT;
    while metric(addr, "wschat_messages_sent_total") < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "two welcomes, a joined, two messages"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        metric(addr, "wschat_bytes_in_total") > 0 && metric(addr, "wschat_bytes_out_total") > 0
    );
    assert_eq!(metric(addr, "wschat_history_messages"), 1);
    assert_eq!(
        metric(
            addr,
            "wschat_handshakes_rejected_total{reason=\"not_found\"}"
        ),
        1
    );
    drop(a);
    b.expect("left");
    assert_eq!(metric(addr, "wschat_connections"), 1);
    server.shutdown();
}

#[test]
fn a_missing_token_and_a_wrong_one_get_different_answers() {
    let server = start(Config {
        api_token: Some("s3cret".into()),
        ..config()
    });
    let addr = server.http_addr();
    let path = "/api/rooms/ops/messages";
    let (status, _, body) = post(addr, path, None, "text/plain", "hi");
    assert_eq!(
        (status, &json_body(&body)["error"]),
        (401, &json!("missing_token"))
    );
    assert!(body.contains("Authorization: Bearer <token>"), "{body}");
    let (status, _, body) = post(addr, path, Some("s3cres"), "text/plain", "hi");
    assert_eq!(
        (status, &json_body(&body)["error"]),
        (401, &json!("bad_token"))
    );
    server.shutdown();
}

/// curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for the interim answer.
#[test]
fn a_post_that_expects_100_continue_gets_it_then_its_answer() {
    use std::io::{Read, Write};
    let server = start(Config {
        api_token: Some("s3cret".into()),
        ..config()
    });
    let body = "x".repeat(2000);
    let mut s = std::net::TcpStream::connect(server.http_addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /api/rooms/lobby/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    server.shutdown();
}
