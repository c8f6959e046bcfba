//! TLS on the one port, with real TLS: a CA and server certificates made at test time (rcgen),
//! a rustls client that trusts only that CA, and the server in-process or as the binary.
#![cfg(feature = "tls")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;
use tungstenite::{Message, WebSocket};

use common::{WAIT, failed_run, wschat};

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A test CA, and a directory for the pairs it signs.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
}

/// A server pair on disk, and its certificate (to compare with the one a client was served).
struct Pair {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new() -> Pki {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wschat-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Names of their own: a leaf named like its issuer looks self-signed to OpenSSL.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "wschat test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
        let ca_der = ca.der().clone();
        Pki {
            dir,
            ca: Issuer::new(params, key),
            ca_der,
        }
    }

    /// A pair for localhost and 127.0.0.1 with `serial`, written as `name.crt` and `name.key`.
    fn pair(&self, name: &str, serial: u64) -> Pair {
        self.pair_with(name, serial, |_| {})
    }

    fn pair_with(
        &self,
        name: &str,
        serial: u64,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> Pair {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = Some(serial.into());
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A config serving `pair` over TLS.
fn tls_config(pair: &Pair) -> wschat::Config {
    wschat::Config {
        tls_cert: Some(pair.cert.clone()),
        tls_key: Some(pair.key.clone()),
        ..common::config()
    }
}

/// `config` with the chat rate limits off, as `--load-test` has them.
fn lifted(config: wschat::Config) -> wschat::Config {
    wschat::Config {
        rate: 1e6,
        burst: 1e6,
        rate_bytes: 1e9,
        rate_bytes_per_ip: 1e9,
        room_rate_bytes: 1e9,
        ..config
    }
}

/// A TLS connection to `addr` as `localhost`, handshake done.
fn connect(addr: SocketAddr, client: &Arc<ClientConfig>) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    tcp.set_write_timeout(Some(WAIT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(client.clone(), name).unwrap();
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// The certificate the server presented.
fn served_cert(stream: &TlsStream) -> CertificateDer<'static> {
    stream.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// `GET path` over https: status and body.
fn https_get(addr: SocketAddr, client: &Arc<ClientConfig>, path: &str) -> (u16, String) {
    let mut stream = connect(addr, client);
    let host = format!("localhost:{}", addr.port());
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap(); // ends with the server's close_notify
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

/// A chat client over wss, welcomed.
fn wss_join(addr: SocketAddr, client: &Arc<ClientConfig>, name: &str) -> WebSocket<TlsStream> {
    let stream = connect(addr, client);
    let url = format!("wss://localhost:{}/chat?name={name}", addr.port());
    let (mut ws, response) = tungstenite::client(url, stream).unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(expect(&mut ws, "welcome")["name"], name);
    ws
}

/// The next frame of `kind` (`a|b`: either), others skipped, within [`WAIT`].
fn expect(ws: &mut WebSocket<TlsStream>, kind: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Message::Text(text) = ws.read().unwrap() {
            let value: Value = serde_json::from_str(&text).unwrap();
            if kind.split('|').any(|k| value["type"] == k) {
                return value;
            }
        }
    }
    panic!("no {kind} within {WAIT:?}");
}

/// One label's count of refused handshakes.
fn rejected(handle: &wschat::Handle, reason: &str) -> u64 {
    metric(
        handle,
        &format!("wschat_handshakes_rejected_total{{reason=\"{reason}\"}}"),
    )
}

#[test]
fn the_page_api_and_health_are_served_over_https() {
    let pki = Pki::new();
    let pair = pki.pair("server", 1);
    let handle = common::start(tls_config(&pair));
    let client = pki.client();
    assert!(handle.page_url().starts_with("https://"));
    assert!(handle.ws_url().starts_with("wss://"));
    let (status, page) = https_get(handle.addr(), &client, "/");
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "{page}");
    assert_eq!(https_get(handle.addr(), &client, "/healthz").0, 200);
    let (status, config) = https_get(handle.addr(), &client, "/config.json");
    assert_eq!(status, 200);
    assert!(config.contains("\"wss://localhost:"), "{config}");
    handle.shutdown();
}

#[test]
fn socketio_polling_works_over_https() {
    let pki = Pki::new();
    let handle = common::start(tls_config(&pki.pair("server", 1)));
    let (status, open) = https_get(
        handle.addr(),
        &pki.client(),
        "/socket.io/?EIO=4&transport=polling",
    );
    assert_eq!(status, 200);
    assert!(open.starts_with("0{\"sid\":"), "{open}");
    handle.shutdown();
}

#[test]
fn socketio_over_wss_opens_and_connects() {
    let pki = Pki::new();
    let handle = common::start(tls_config(&pki.pair("server", 1)));
    let stream = connect(handle.addr(), &pki.client());
    let port = handle.addr().port();
    let url = format!("wss://localhost:{port}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tungstenite::client(url, stream).unwrap();
    let open = ws.read().unwrap().into_text().unwrap();
    assert!(open.starts_with("0{\"sid\":"), "{open}");
    ws.send(Message::text("40")).unwrap();
    let connected = ws.read().unwrap().into_text().unwrap();
    assert!(connected.starts_with("40{\"sid\":"), "{connected}");
    handle.shutdown();
}

#[test]
fn a_chat_over_wss_reaches_both_clients() {
    let pki = Pki::new();
    // 300 KB at once: past the default byte rates, which have tests of their own.
    let handle = common::start(lifted(tls_config(&pki.pair("server", 1))));
    let client = pki.client();
    let mut ada = wss_join(handle.addr(), &client, "ada");
    let mut bob = wss_join(handle.addr(), &client, "bob");
    ada.send(Message::text("hello world")).unwrap();
    for ws in [&mut ada, &mut bob] {
        let message = expect(ws, "message");
        assert_eq!(
            (message["from"].as_str(), message["text"].as_str()),
            (Some("ada"), Some("hello world"))
        );
    }
    // Messages bigger than one TLS record (16 KiB) cross in several, both ways, back to back
    // (a read then ends inside a record, and completes it with the next ones).
    let long = "x".repeat(60_000);
    for _ in 0..5 {
        bob.send(Message::text(long.clone())).unwrap();
    }
    for _ in 0..5 {
        let text = expect(&mut ada, "message")["text"].as_str().map(str::len);
        assert_eq!(text, Some(long.len()));
    }
    handle.shutdown();
}

#[test]
fn plain_http_on_the_tls_port_is_told_to_use_https() {
    let pki = Pki::new();
    let handle = common::start(tls_config(&pki.pair("server", 1)));
    let (status, _, body) = common::http_get(handle.addr(), "/");
    assert_eq!(status, 400);
    assert!(
        body.contains("this port speaks TLS: use https://"),
        "{body}"
    );
    assert_eq!(rejected(&handle, "tls_plain_http"), 1);
    handle.shutdown();
}

#[test]
fn garbage_and_stalled_handshakes_are_cut_and_counted() {
    let pki = Pki::new();
    let config = wschat::Config {
        handshake_timeout: Duration::from_secs(1),
        ..tls_config(&pki.pair("server", 1))
    };
    let handle = common::start(config);
    // A handshake record of garbage: an alert, then the end.
    let mut garbage = TcpStream::connect(handle.addr()).unwrap();
    garbage.set_read_timeout(Some(WAIT)).unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0xff, 0, 0, 0])
        .unwrap();
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "a TLS alert record: {answer:?}"
    );
    // Half a ClientHello, then silence: cut at the handshake deadline.
    let started = Instant::now();
    let mut stalled = TcpStream::connect(handle.addr()).unwrap();
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    assert_eq!(stalled.read(&mut [0; 64]).unwrap_or(0), 0, "closed");
    assert!(started.elapsed() < WAIT);
    // Half a ClientHello, then the end.
    let mut truncated = TcpStream::connect(handle.addr()).unwrap();
    truncated
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    truncated.set_read_timeout(Some(WAIT)).unwrap();
    let _ = truncated.read_to_end(&mut Vec::new());
    let deadline = Instant::now() + WAIT;
    while rejected(&handle, "tls_handshake") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rejected(&handle, "tls_handshake"), 2);
    assert_eq!(rejected(&handle, "timeout"), 1);
    // The server is none the worse.
    assert_eq!(https_get(handle.addr(), &pki.client(), "/healthz").0, 200);
    handle.shutdown();
}

#[test]
fn redirect_http_answers_308_to_https() {
    let pki = Pki::new();
    let config = wschat::Config {
        redirect_http: Some(0),
        ..tls_config(&pki.pair("server", 1))
    };
    let handle = common::start(config);
    let redirect = handle.redirect_addr().unwrap();
    let request = "GET /chat/dev?x=1 HTTP/1.1\r\nHost: localhost:80\r\n\r\n";
    let (status, head, _) = common::http_request(redirect, request);
    assert_eq!(status, 308);
    let location = format!(
        "location: https://localhost:{}/chat/dev?x=1",
        handle.addr().port()
    );
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    handle.shutdown();
}

/// Debian's Python, where `apt-get install python3-websockets` puts the module.
const PYTHON: &str = "/usr/bin/python3";

#[test]
fn python_websockets_chats_over_wss() {
    let has_websockets = Command::new(PYTHON)
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_websockets {
        // scripts/test installs it and sets this, so the suite cannot pass without it.
        assert!(
            std::env::var_os("WSCHAT_REQUIRE_PYTHON").is_none(),
            "python3-websockets is not installed"
        );
        eprintln!(
            "skipped: {PYTHON} has no websockets module (apt-get install python3-websockets)"
        );
        return;
    }
    let pki = Pki::new();
    let handle = common::start(tls_config(&pki.pair("server", 1)));
    let url = format!("wss://localhost:{}/chat?name=py", handle.addr().port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/wss_echo.py");
    let output = Command::new(PYTHON)
        .args([script, &url, pki.dir.join("ca.crt").to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        said.trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    handle.shutdown();
}

// ----- the binary: refusals at start, SIGHUP -----

fn tls_args<'a>(cert: &'a Path, key: &'a Path) -> Vec<&'a str> {
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    vec!["--port", "0", "--tls-cert", cert, "--tls-key", key]
}

#[test]
fn a_mismatched_expired_or_missing_pair_is_refused_at_start_with_one_line() {
    let pki = Pki::new();
    let one = pki.pair("one", 1);
    let two = pki.pair("two", 2);
    let (status, stderr) = failed_run(&tls_args(&one.cert, &two.key));
    assert_eq!(status, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is not the key of the certificate"),
        "{stderr}"
    );

    let old = pki.pair_with("old", 3, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (status, stderr) = failed_run(&tls_args(&old.cert, &old.key));
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("expired") && stderr.lines().count() == 1,
        "{stderr}"
    );

    let missing = pki.dir.join("missing.crt");
    let (status, stderr) = failed_run(&tls_args(&missing, &one.key));
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("no such file") && stderr.lines().count() == 1,
        "{stderr}"
    );

    let (status, stderr) = failed_run(&["--port", "0", "--tls-cert", "x.crt"]);
    assert_eq!(status, Some(2));
    assert!(stderr.contains("go together"), "{stderr}");
}

/// Starts the binary over TLS; returns it and its address.
fn spawn_tls(cert: &Path, key: &Path) -> (Child, SocketAddr) {
    let mut child = wschat(&tls_args(cert, key)).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("wschat listening: https://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(addr, _)| addr.parse().unwrap());
    (
        child,
        addr.unwrap_or_else(|| panic!("startup line: {line:?}")),
    )
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sighup_serves_the_new_pair_to_new_connections_and_keeps_the_old_if_bad() {
    let pki = Pki::new();
    let first = pki.pair("live", 1);
    let (mut child, addr) = spawn_tls(&first.cert, &first.key);
    let client = pki.client();
    assert_eq!(served_cert(&connect(addr, &client)), first.der);
    let mut ada = wss_join(addr, &client, "ada");

    let second = pki.pair("live", 2); // the renewal overwrites the files, as certbot does
    signal(&child, "-HUP");
    let deadline = Instant::now() + WAIT;
    while served_cert(&connect(addr, &client)) != second.der {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The chat opened before goes on, under its old keys.
    ada.send(Message::text("still here")).unwrap();
    assert_eq!(expect(&mut ada, "message")["text"], "still here");

    std::fs::write(&second.key, "not a key").unwrap();
    signal(&child, "-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served_cert(&connect(addr, &client)), second.der);
    assert_eq!(https_get(addr, &client, "/healthz").0, 200);

    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("TLS pair reloaded"), "{log}");
    assert!(log.contains("still serving the previous pair"), "{log}");
}

#[test]
fn a_tls_client_that_stops_reading_is_dropped_as_too_slow() {
    let pki = Pki::new();
    let config = wschat::Config {
        client_queue_bytes: 256 * 1024,
        ..tls_config(&pki.pair("server", 1))
    };
    let handle = common::start(lifted(config));
    let client = pki.client();
    // The staller never reads after its welcome.
    let _staller = wss_join(handle.addr(), &client, "staller");
    let mut filler = wss_join(handle.addr(), &client, "filler");
    let big = "z".repeat(32 * 1024);
    let private = serde_json::json!({"type": "message", "text": big, "to": "staller"});
    // 2 MiB encrypted: more than the socket buffers and the 256 KiB the backlog may hold.
    for _ in 0..64 {
        filler.send(Message::text(private.to_string())).unwrap();
        // Its own copy (the staller's is queued by now), or, once the staller is gone, an error.
        if expect(&mut filler, "message|error")["type"] == "error" {
            break;
        }
    }
    let deadline = Instant::now() + WAIT;
    while metric(&handle, "wschat_slow_clients_dropped_total") == 0 {
        assert!(Instant::now() < deadline, "the staller was not dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its backlog goes with it (when its session ends, just after); the filler chats on.
    while metric(&handle, "wschat_backlog_bytes") > 0 {
        assert!(
            Instant::now() < deadline + WAIT,
            "the staller's backlog stayed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    filler.send(Message::text("still fine")).unwrap();
    assert_eq!(expect(&mut filler, "message")["text"], "still fine");
    handle.shutdown();
}

/// A series' value, read from the server's own counters (`common::metric` asks over plain
/// HTTP, which this port does not speak).
fn metric(handle: &wschat::Handle, series: &str) -> u64 {
    let metrics = handle.metrics().render(0);
    let prefix = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {series} in {metrics}"))
        .parse()
        .unwrap()
}
