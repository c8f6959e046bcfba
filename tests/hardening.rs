//! Hardening: connection limits, proxies, slow and hostile clients, keepalive, leaks, rate limits,
//! validation, slow consumers, origins, shutdown, and kill -9 durability. Real sockets against an
//! in-process server (the real binary for kill -9), loopback only, every wait bounded.
//!
//! The tests take turns (`serial()`): several measure the whole process (threads, RSS, room
//! throughput) or open hundreds of sockets, and the machine has two cores.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::WebSocket;
use wschat::Handle;

// ===================================================================================== helpers

static SERIAL: Mutex<()> = Mutex::new(());
/// Panics in the server's own threads (`ws-*`, `dispatcher`, `http`), as "thread: message".
/// The listener catches a session's panic and carries on, so only this hook sees it.
static SERVER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Held by each test: one test at a time (a failed test must not stop the others: poisoning is
/// ignored), and on drop it fails the test if a server thread panicked meanwhile.
struct Serial {
    panics_before: usize,
    _lock: MutexGuard<'static, ()>,
}

fn serial() -> Serial {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = thread::current().name().unwrap_or_default().to_owned();
            if name.starts_with("conn-") || name.starts_with("courier-") || name == "dispatcher" {
                server_panics().push(format!("thread {name}: {info}"));
            }
            default(info);
        }));
    });
    let lock = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    Serial {
        panics_before: server_panics().len(),
        _lock: lock,
    }
}

fn server_panics() -> MutexGuard<'static, Vec<String>> {
    SERVER_PANICS.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Drop for Serial {
    fn drop(&mut self) {
        if thread::panicking() {
            return;
        }
        let new = server_panics()[self.panics_before..].join("\n");
        assert!(
            new.is_empty(),
            "server threads panicked during this test (caught by the listener):\n{new}"
        );
    }
}

/// Polls `done` every 10 ms; panics naming `what` after `timeout`. Returns the time it took.
fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "waited {timeout:?} for {what}, in vain"
        );
        thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn rejected(server: &Handle, reason: &str) -> u64 {
    metric(
        server.http_addr(),
        &format!("wschat_handshakes_rejected_total{{reason=\"{reason}\"}}"),
    )
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends a handshake for `path` with `extra` headers; returns the status, the response head
/// and the socket (still open, positioned after the head).
fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(addr).expect("tcp connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(upgrade_request(path, extra).as_bytes())
        .unwrap();
    let head = handshake_head(&mut s);
    (status_of(&head), head, s)
}

/// A refused handshake: the head is a plain HTTP error, and the server then closes.
fn assert_refused(expected: u16, head: &str, mut s: TcpStream) -> String {
    assert_eq!(status_of(head), expected, "response head:\n{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-accept"),
        "a refusal carries no upgrade: {head}"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body); // ends: the server closes after refusing (timeout WAIT)
    body
}

/// Sets SO_LINGER 0, so dropping the socket sends a reset instead of a FIN.
fn reset_on_drop(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// A TCP connection whose receive buffer is tiny (set before connecting, so the window is too).
fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).expect("tcp connect");
    socket.into()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads and discards until the peer closes (EOF or reset). Returns how long that took, or
/// `None` if the socket was still open after `timeout`.
fn read_until_closed(s: &TcpStream, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let mut reader = s;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match reader.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return None,
            Err(_) => return Some(start.elapsed()), // reset
        }
    }
}

/// Every text frame that arrives until nothing has come for `quiet`.
fn drain(c: &mut Client, quiet: Duration) -> Vec<Value> {
    collect(c, quiet, None)
}

/// Every text frame that arrives before `deadline` (or until `quiet` passes without one).
fn collect(c: &mut Client, quiet: Duration, deadline: Option<Instant>) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let mut wait = quiet;
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
        }
        c.ws.get_mut().set_read_timeout(Some(wait)).unwrap();
        match c.ws.read() {
            Ok(Message::Text(t)) => out.push(serde_json::from_str(&t).expect("JSON frame")),
            Ok(Message::Close(f)) => panic!("connection closed: {f:?}"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {
                if deadline.is_none() {
                    break;
                }
            }
            Err(e) => panic!("connection broke: {e}"),
        }
    }
    c.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    out
}

/// A masked client frame (raw, so tests can send fragments and lying headers).
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    out.extend(mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Parses one unmasked server frame at the start of `buf`: (opcode, payload, length used).
fn server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (len, at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((b0 & 0x0f, payload, at + len))
}

/// Reads server frames from a raw socket until a close frame: returns its (code, reason), or
/// `None` if the connection ended without one. Panics if neither happens within `WAIT`.
fn read_close(s: &mut TcpStream, leftover: Vec<u8>) -> Option<(u16, String)> {
    let start = Instant::now();
    let mut buf = leftover;
    let mut chunk = [0u8; 8192];
    loop {
        while let Some((opcode, payload, used)) = server_frame(&buf) {
            buf.drain(..used);
            if opcode == 0x8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
            }
        }
        assert!(start.elapsed() < WAIT, "no close frame within {WAIT:?}");
        s.set_read_timeout(Some(WAIT)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => panic!("no close frame within {WAIT:?}"),
            Err(_) => return None,
        }
    }
}

/// The close frame a `Client` receives next (other frames skipped): (code, reason).
fn expect_close_frame(c: &mut Client) -> Option<(u16, String)> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match c.ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| (f.code.into(), f.reason.to_string())),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    panic!("no close within {WAIT:?}");
}

/// `(tx_queue, rx_queue)` of the loopback IPv4 TCP socket `local` -> `remote`, from
/// /proc/net/tcp: how much it holds unsent/unacknowledged, and received but unread.
fn tcp_queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port()),
        IpAddr::V6(_) => unreachable!("tests use 127.0.0.1"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

/// A field of /proc/self/status, as a number (`kB` dropped).
fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Names of this process's threads named by the WebSocket side of the server (`ws-<id>`,
/// `ws-pump`, ...), but not its accept loop. Tests compare the count with a snapshot taken in
/// the same test, so they hold whatever the number of threads per connection.
fn connection_threads() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            let comm = comm.trim();
            if comm.starts_with("conn-") {
                names.push(comm.to_owned());
            }
        }
    }
    names
}

/// Connection threads parked in the listener's pool, waiting for the next connection.
fn parked_threads() -> u64 {
    let parked = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim() == wschat::PARKED_THREAD_NAME)
        });
    parked.count() as u64
}

/// A directory under the system temp dir, unique to this process and call, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "wschat-hardening-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ============================================================ 1. max clients, total and per IP

#[test]
fn max_clients_refuses_with_503_and_retry_after_until_a_client_leaves() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_clients = 3;
    cfg.max_clients_per_ip = 0;
    let server = start(cfg);
    let mut clients: Vec<Client> = (0..3)
        .map(|i| Client::join(&server, &format!("/chat?name=c{i}")).0)
        .collect();

    let (_, head, s) = upgrade(server.ws_addr(), "/chat", "");
    let body = assert_refused(503, &head, s);
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: "),
        "a 503 says when to retry:\n{head}"
    );
    assert!(body.contains("--max-clients"), "names the limit: {body}");
    assert_eq!(rejected(&server, "too_many_clients"), 1);
    assert_eq!(rejected(&server, "too_many_from_address"), 0);

    // One leaves; once its connection has ended, its slot is free for exactly one newcomer.
    clients.pop().unwrap().close();
    wait_for("the closed client's connection to end", WAIT, || {
        server.live_connections() == 2
    });
    let (_newcomer, welcome) = Client::join(&server, "/chat?name=newcomer");
    assert_eq!(welcome["count"], 3);
    let (_, head, s) = upgrade(server.ws_addr(), "/chat", "");
    assert_refused(503, &head, s);
    assert_eq!(rejected(&server, "too_many_clients"), 2);
    server.shutdown();
}

#[test]
fn max_clients_per_ip_refuses_with_503_and_counts_it() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_clients_per_ip = 2;
    let server = start(cfg);
    let (a, _) = Client::join(&server, "/chat?name=a");
    let (_b, _) = Client::join(&server, "/chat?name=b");

    let (_, head, s) = upgrade(server.ws_addr(), "/chat", "");
    assert_refused(503, &head, s);
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{head}"
    );
    assert_eq!(rejected(&server, "too_many_from_address"), 1);
    assert_eq!(rejected(&server, "too_many_clients"), 0);

    a.close();
    wait_for("a's connection to end", WAIT, || {
        server.live_connections() == 1
    });
    let (_c, welcome) = Client::join(&server, "/chat?name=c");
    assert_eq!(welcome["name"], "c");
    server.shutdown();
}

#[test]
fn max_clients_per_ip_zero_lifts_the_limit() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_clients_per_ip = 0;
    let server = start(cfg);
    // More than the default per-address limit (256), all from 127.0.0.1.
    let n = wschat::Config::default().max_clients_per_ip + 4;
    let sockets: Vec<TcpStream> = (0..n)
        .map(|i| {
            let (status, head, s) = upgrade(server.ws_addr(), "/chat", "");
            assert_eq!(status, 101, "client {i} of {n} from one address:\n{head}");
            s
        })
        .collect();
    assert_eq!(server.live_connections(), n);
    assert_eq!(rejected(&server, "too_many_from_address"), 0);
    drop(sockets);
    server.shutdown();
}

// ================================================================== 2. X-Forwarded-For, proxy

#[test]
fn a_trusted_proxy_counts_clients_by_their_forwarded_address() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_clients_per_ip = 1;
    cfg.trusted_proxy = Some([127, 0, 0, 1].into());
    let server = start(cfg);
    let ws = server.ws_addr();
    let xff = |a: &str| format!("X-Forwarded-For: {a}\r\n");

    let (status, head, first) = upgrade(ws, "/chat", &xff("192.0.2.7"));
    assert_eq!(status, 101, "{head}");
    let (status, head, _other) = upgrade(ws, "/chat", &xff("192.0.2.8"));
    assert_eq!(
        status, 101,
        "a different forwarded address has its own limit:\n{head}"
    );
    let (_, head, s) = upgrade(ws, "/chat", &xff("192.0.2.7"));
    assert_refused(503, &head, s);
    assert_eq!(rejected(&server, "too_many_from_address"), 1);
    // A chain: the proxy appends the address it saw, and only that last one counts.
    let (status, head, _chain) = upgrade(ws, "/chat", &xff("192.0.2.7, 192.0.2.9"));
    assert_eq!(
        status, 101,
        "the last X-Forwarded-For entry counts:\n{head}"
    );
    // The proxy's own connections without the header count against the proxy's address.
    let (status, head, _own) = upgrade(ws, "/chat", "");
    assert_eq!(status, 101, "{head}");
    let (_, head, s) = upgrade(ws, "/chat", "");
    assert_refused(503, &head, s);
    assert_eq!(rejected(&server, "too_many_from_address"), 2);

    // 192.0.2.7 leaves: it may come back.
    drop(first);
    wait_for("192.0.2.7's connection to end", WAIT, || {
        server.live_connections() == 3
    });
    let (status, head, _back) = upgrade(ws, "/chat", &xff("192.0.2.7"));
    assert_eq!(status, 101, "{head}");
    server.shutdown();
}

#[test]
fn without_a_trusted_proxy_x_forwarded_for_is_ignored() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_clients_per_ip = 1;
    let server = start(cfg);
    let ws = server.ws_addr();
    let (status, head, _first) = upgrade(ws, "/chat", "X-Forwarded-For: 192.0.2.7\r\n");
    assert_eq!(status, 101, "{head}");
    let (_, head, s) = upgrade(ws, "/chat", "X-Forwarded-For: 192.0.2.8\r\n");
    assert_refused(503, &head, s);
    assert_eq!(rejected(&server, "too_many_from_address"), 1);
    server.shutdown();
}

// ====================================================================== 3. WebSocket slowloris

const STALLED: usize = 500;

/// A handshake request that never ends (no blank line), for stalled clients to dribble.
fn endless_request() -> Vec<u8> {
    let full = upgrade_request("/chat", "");
    full.as_bytes()[..full.len() - 2].to_vec()
}

/// `n` connections that never finish a handshake; the odd ones have sent a first byte.
fn open_stalled(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let request = endless_request();
    (0..n)
        .map(|i| {
            // Spread over addresses, within each one's share of the door (64).
            let from = [127, 0, 0, 10 + (i / 50) as u8];
            let mut s = common::connect_from(from, addr);
            if i % 2 == 1 {
                s.write_all(&request[..1]).unwrap();
            }
            s
        })
        .collect()
}

/// Sends the odd stalled connections one more byte of their endless request every `every`.
struct Trickler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Trickler {
    fn start(sockets: Arc<Vec<TcpStream>>, every: Duration) -> Trickler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let request = endless_request();
            let mut next = 1;
            while !flag.load(Relaxed) && next < request.len() {
                let tick = Instant::now() + every;
                for s in sockets.iter().skip(1).step_by(2) {
                    let _ = (&*s).write(&request[next..=next]); // may fail once closed
                }
                next += 1;
                while !flag.load(Relaxed) && Instant::now() < tick {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        });
        Trickler { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap();
    }
}

#[test]
fn five_hundred_stalled_handshakes_do_not_lock_out_a_real_client() {
    let _serial = serial();
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(20); // all stay pending through the test
    let server = start(cfg);
    let stalled = Arc::new(open_stalled(server.ws_addr(), STALLED));
    let trickler = Trickler::start(stalled.clone(), Duration::from_millis(150));
    wait_for(
        "every stalled socket to be a pending handshake",
        Duration::from_secs(10),
        || server.metrics().handshakes_pending.load(Relaxed) >= STALLED as u64,
    );

    let t0 = Instant::now();
    let (mut c, _) = Client::join(&server, "/chat?name=real");
    c.send("through the crowd");
    assert_eq!(c.expect_text(), "through the crowd");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "with {STALLED} stalled handshakes a real client needed {took:?} to join and chat"
    );
    assert_eq!(
        server.metrics().handshakes_pending.load(Relaxed),
        STALLED as u64,
        "the stalled handshakes are all still pending (none refused for the real one)"
    );
    trickler.stop();
    drop(stalled);
    server.shutdown();
}

#[test]
fn stalled_handshakes_are_closed_at_the_total_deadline() {
    let _serial = serial();
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_secs(1);
    let server = start(cfg);
    let addr = server.ws_addr();

    // One byte every 200 ms: each read succeeds, so only a total deadline stops it.
    let dribbler = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let request = endless_request();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut sent = 0;
        let mut buf = [0u8; 256];
        loop {
            if s.write_all(&request[sent..=sent]).is_ok() {
                sent += 1;
            }
            match s.read(&mut buf) {
                Ok(0) => return (t0.elapsed(), sent),
                Ok(n) => panic!(
                    "an unfinished request got an answer: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
                Err(e) if is_timeout(&e) => {}
                Err(_) => return (t0.elapsed(), sent),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "still open after 10 s"
            );
        }
    });

    let opened = Instant::now();
    let stalled = Arc::new(open_stalled(addr, STALLED));
    let trickler = Trickler::start(stalled.clone(), Duration::from_millis(150));
    // Each is closed by the server (EOF, or a reset if a dribbled byte was unread) soon after
    // its deadline: 1 s after it was accepted.
    let deadline = Instant::now() + Duration::from_secs(1) + Duration::from_secs(4);
    let still_open = stalled
        .iter()
        .filter(|s| {
            let left = deadline.saturating_duration_since(Instant::now());
            read_until_closed(s, left.max(Duration::from_millis(1))).is_none()
        })
        .count();
    let all_closed_after = opened.elapsed();
    trickler.stop();
    assert_eq!(
        still_open, 0,
        "{still_open} of {STALLED} stalled handshakes were still open {all_closed_after:?} \
         after opening (handshake_timeout 1 s)"
    );

    let (closed_after, sent) = dribbler.join().unwrap();
    assert!(
        sent >= 4,
        "the dribbler sent {sent} bytes before being closed"
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(3),
        "a client sending a byte every 200 ms was closed after {closed_after:?}; \
         the 1 s handshake deadline is total, not per read"
    );
    wait_for("every handshake thread to end", WAIT, || {
        server.live_connections() == 0
    });
    assert_eq!(server.metrics().handshakes_pending.load(Relaxed), 0);
    assert_eq!(rejected(&server, "timeout"), STALLED as u64 + 1);
    server.shutdown();
}

// =========================================================================== 4. HTTP slowloris

/// `GET /healthz`, with a clear error when the HTTP port does not even accept.
fn healthz(addr: SocketAddr) -> Result<u16, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("cannot send: {e}"))?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .map_err(|e| format!("no answer: {e}"))?;
    Ok(status_of(&response))
}

#[test]
fn a_stalled_http_connection_is_closed_after_the_http_timeout() {
    let _serial = serial();
    let mut cfg = config();
    cfg.http_timeout = Duration::from_secs(1);
    let server = start(cfg);
    let half = TcpStream::connect(server.http_addr()).unwrap();
    (&half)
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .unwrap();
    let silent = TcpStream::connect(server.http_addr()).unwrap();
    let opened = Instant::now();
    for (what, s) in [("half a request", &half), ("nothing", &silent)] {
        let left = Duration::from_secs(5).saturating_sub(opened.elapsed());
        read_until_closed(s, left).unwrap_or_else(|| {
            panic!("an HTTP connection that sent {what} was still open after 5 s (timeout 1 s)")
        });
        let closed_after = opened.elapsed();
        assert!(
            closed_after >= Duration::from_millis(500),
            "an HTTP connection that sent {what} was closed after only {closed_after:?}"
        );
    }
    // The server still answers once the attack is over (checked at a fixed 1.5 s, so the
    // outcome does not depend on how fast the stalled sockets were closed).
    thread::sleep(Duration::from_millis(1500).saturating_sub(opened.elapsed()));
    assert_eq!(
        healthz(server.http_addr()),
        Ok(200),
        "GET /healthz 1.5 s after two stalled connections (http_timeout 1 s)"
    );
    server.shutdown();
}

/// The HTTP listener carries SO_RCVTIMEO (so accepted sockets inherit it); on Linux that also
/// bounds `accept()` itself, and tiny_http's accept thread ends on the first accept error.
#[test]
fn the_http_port_keeps_accepting_after_idling_longer_than_the_http_timeout() {
    let _serial = serial();
    let mut cfg = config();
    cfg.http_timeout = Duration::from_secs(1);
    let server = start(cfg);
    assert_eq!(healthz(server.http_addr()), Ok(200), "at once");
    thread::sleep(Duration::from_millis(1600)); // no HTTP connection for longer than 1 s
    assert_eq!(
        healthz(server.http_addr()),
        Ok(200),
        "after 1.6 s without an HTTP connection (http_timeout 1 s)"
    );
    server.shutdown();
}

#[test]
fn a_hundred_stalled_http_connections_do_not_stop_healthz() {
    let _serial = serial();
    let server = start(config()); // http_timeout 10 s: the stalled ones stay
    let stalled: Vec<TcpStream> = (0..100)
        .map(|i| {
            let from = [127, 0, 0, 2 + (i % 2) as u8]; // two addresses, each within its share
            let mut s = common::connect_from(from, server.http_addr());
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(200));

    let t0 = Instant::now();
    let (status, _, body) = http_get(server.http_addr(), "/healthz");
    let took = t0.elapsed();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(
        took < Duration::from_secs(3),
        "/healthz took {took:?} behind 100 stalled connections"
    );
    assert_eq!(http_get(server.http_addr(), "/api/rooms").0, 200);
    // They really were all pending at the same time.
    for (i, s) in stalled.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        match (&*s).read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("stalled HTTP connection {i} was not pending: {other:?}"),
        }
    }
    drop(stalled);
    server.shutdown();
}

// ================================================================================ 5. keepalive

#[test]
fn a_client_that_answers_pings_stays_connected() {
    let _serial = serial();
    let mut cfg = config();
    cfg.ping_interval = Duration::from_millis(300);
    let server = start(cfg);
    let (mut c, _) = Client::join(&server, "/chat");
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let (t0, mut pings) = (Instant::now(), 0);
    while t0.elapsed() < Duration::from_millis(1800) {
        // tungstenite answers each ping with a pong on the next read.
        match c.ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(f)) => panic!("closed after {:?}: {f:?}", t0.elapsed()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(e) => panic!("dropped after {:?}: {e}", t0.elapsed()),
        }
    }
    assert!(pings >= 3, "{pings} pings in 1.8 s at a 300 ms interval");
    c.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    c.send("still here");
    assert_eq!(c.expect_text(), "still here");
    assert_eq!(server.live_connections(), 1);
    server.shutdown();
}

#[test]
fn a_silent_client_is_dropped_after_two_ping_intervals() {
    let _serial = serial();
    let mut cfg = config();
    cfg.ping_interval = Duration::from_millis(300);
    let server = start(cfg);
    let (status, head, s) = upgrade(server.ws_addr(), "/chat", "");
    assert_eq!(status, 101, "{head}");
    let t0 = Instant::now();
    assert_eq!(server.live_connections(), 1);
    // Never read, never answer: the server's pings pile up in our receive buffer.
    let gone_after = wait_for(
        "the silent client to be dropped",
        Duration::from_secs(5),
        || server.live_connections() == 0,
    );
    assert!(
        gone_after >= Duration::from_millis(500),
        "dropped after {gone_after:?}: sooner than two 300 ms ping intervals"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "dropped only after {:?}",
        t0.elapsed()
    );
    // What it was sent: the welcome, at least one ping, then the end of the stream.
    let mut bytes = Vec::new();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = &s;
    let ended = reader.read_to_end(&mut bytes);
    assert!(
        ended.is_ok() || !is_timeout(ended.as_ref().unwrap_err()),
        "the socket did not end: {ended:?}"
    );
    let mut pings = 0;
    let mut at = 0;
    while let Some((opcode, _, used)) = server_frame(&bytes[at..]) {
        pings += usize::from(opcode == 0x9);
        at += used;
    }
    assert!(pings >= 1, "no ping before the drop");
    assert_eq!(metric(server.http_addr(), "wschat_connections"), 0);
    server.shutdown();
}

// ============================================================ 6. connect/disconnect: no leaks

/// One connection, ended in one of four ways (clean or abrupt, before or after the welcome).
fn cycle(server: &Handle, i: usize) {
    match i % 4 {
        0 => {
            let (mut c, _) = Client::join(server, "/chat");
            let _ = c.ws.close(None);
            while c.ws.read().is_ok() {} // until the server answers the close and hangs up
        }
        1 => {
            let (c, _) = Client::join(server, "/chat");
            reset_on_drop(c.ws.get_ref());
        }
        2 => {
            let (status, head, s) = upgrade(server.ws_addr(), "/chat", "");
            assert_eq!(status, 101, "{head}");
            reset_on_drop(&s);
        }
        _ => Client::join(server, "/chat").0.close(), // close frame, then gone
    }
}

#[test]
fn a_thousand_connect_disconnect_cycles_leak_no_threads_or_memory() {
    let _serial = serial();
    let server = start(config());
    let idle = connection_threads().len(); // no connection yet
    let settle = |what: &str| {
        wait_for(what, Duration::from_secs(10), || {
            server.live_connections() == 0 && connection_threads().len() <= idle
        })
    };
    for i in 0..40 {
        cycle(&server, i); // warm up: allocator arenas, thread stacks, buffers
    }
    settle("the warm-up connections to end");
    // Threads the listener keeps parked for the next connections are not a leak (bounded).
    let working = || proc_status("Threads:") - parked_threads();
    let (threads0, rss0) = (working(), proc_status("VmRSS:"));

    for i in 0..1000 {
        cycle(&server, i);
    }
    settle("all 1000 connections and their threads to end");
    // Threads of earlier tests' servers (tiny_http's idle pool) may still be ending: the count
    // must come back to at most the baseline; more would be a leak.
    let mut threads = working();
    let start = Instant::now();
    while threads > threads0 && start.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(20));
        threads = working();
    }
    assert!(parked_threads() <= wschat::MAX_PARKED_THREADS as u64);
    assert!(
        threads <= threads0,
        "threads: {threads0} before 1000 connections, {threads} after"
    );
    let rss = proc_status("VmRSS:");
    eprintln!("threads {threads0} -> {threads}, VmRSS {rss0} kB -> {rss} kB");
    assert!(
        rss <= rss0 + 8 * 1024,
        "VmRSS grew from {rss0} kB to {rss} kB over 1000 connections"
    );
    assert_eq!(metric(server.http_addr(), "wschat_connections"), 0);
    let (mut c, _) = Client::join(&server, "/chat");
    c.send("fine");
    assert_eq!(c.expect_text(), "fine");
    server.shutdown();
}

// =============================================================================== 7. rate limits

#[test]
fn a_burst_of_forty_gets_thirty_through_and_ten_rate_limited() {
    let _serial = serial();
    let server = start(config()); // 10 per second, burst 30
    let (mut c, _) = Client::join(&server, "/chat");
    for i in 0..40 {
        c.ws.write(text_frame(&format!("m{i}"))).unwrap();
    }
    c.ws.flush().unwrap();
    let (mut echoed, mut limited) = (Vec::new(), 0);
    while echoed.len() + limited < 40 {
        let v = c.recv();
        match v["type"].as_str() {
            Some("message") => echoed.push(v["text"].as_str().unwrap().to_owned()),
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            _ => {}
        }
    }
    let first_thirty: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(echoed, first_thirty, "the first 30 are echoed, in order");
    assert_eq!(limited, 10);
    c.expect_none("message", Duration::from_millis(200));
    assert_eq!(metric(server.http_addr(), "wschat_rate_limited_total"), 10);
    // Tokens come back at 10 per second.
    thread::sleep(Duration::from_millis(300));
    c.send("later");
    assert_eq!(c.expect_text(), "later");
    server.shutdown();
}

#[test]
fn a_flooder_is_closed_with_1008_while_a_calm_client_chats_on() {
    let _serial = serial();
    let server = start(config());
    let (mut calm, _) = Client::join(&server, "/chat?name=calm");
    let (mut flood, _) = Client::join(&server, "/chat?name=flood");
    calm.expect("joined");
    // Burst 30, then 50 rate-limited messages within 10 s mark a flooder: send plenty more.
    let flooder = thread::spawn(move || {
        for i in 0..100 {
            if flood.ws.write(text_frame(&format!("f{i}"))).is_err() {
                break;
            }
        }
        let _ = flood.ws.flush();
        let mut limited = 0;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match flood.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "error" {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        limited += 1;
                    }
                }
                Ok(Message::Close(f)) => {
                    return (
                        limited,
                        f.map(|f| (u16::from(f.code), f.reason.to_string())),
                    );
                }
                Ok(_) => {}
                Err(e) => panic!("the flooder's connection ended without a close frame: {e}"),
            }
        }
        panic!("the flooder was not closed within {WAIT:?}");
    });

    let mut flood_left = false;
    for i in 0..10 {
        let t0 = Instant::now();
        let text = format!("calm {i}");
        calm.send(&text);
        loop {
            let v = calm.recv();
            if v["type"] == "error" {
                panic!("the calm client got {v}");
            }
            flood_left |= v["type"] == "left" && v["name"] == "flood";
            if v["type"] == "message" && v["from"] == "calm" {
                assert_eq!(v["text"], text.as_str());
                break;
            }
        }
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "the calm client's message {i} took {took:?} during the flood"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (limited, close) = flooder.join().unwrap();
    assert_eq!(close, Some((1008, "flooding".to_owned())));
    assert_eq!(limited, 49, "49 rate_limited errors, and the 50th closes");
    if !flood_left {
        assert_eq!(calm.expect("left")["name"], "flood");
    }
    calm.send("after the flood");
    assert_eq!(calm.expect_text(), "after the flood");
    server.shutdown();
}

#[test]
fn nick_and_join_beyond_the_control_burst_are_rate_limited() {
    let _serial = serial();
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat");
    for i in 0..8 {
        c.ws.write(text_frame(
            &json!({"type":"nick","name":format!("n{i}")}).to_string(),
        ))
        .unwrap();
    }
    c.ws.flush().unwrap();
    let (mut renamed, mut limited) = (Vec::new(), 0);
    while renamed.len() + limited < 8 {
        let v = c.recv();
        match v["type"].as_str() {
            Some("renamed") => renamed.push(v["name"].as_str().unwrap().to_owned()),
            Some("error") => {
                assert_eq!(v["code"], "rate_limited", "{v}");
                limited += 1;
            }
            _ => {}
        }
    }
    assert_eq!(renamed, ["n0", "n1", "n2", "n3", "n4"]);
    assert_eq!(limited, 3);
    // join shares the bucket
    c.send_json(json!({"type":"join","room":"elsewhere"}));
    assert_eq!(c.expect("error")["code"], "rate_limited");
    server.shutdown();
}

#[test]
fn typing_beyond_two_per_second_is_dropped_silently() {
    let _serial = serial();
    let server = start(config());
    let (mut watcher, _) = Client::join(&server, "/chat?name=watcher");
    let (mut typer, _) = Client::join(&server, "/chat?name=typer");
    watcher.expect("joined");
    let typing = json!({"type":"typing","active":true}).to_string();

    // 20 at once: the burst of 2 gets through.
    for _ in 0..20 {
        typer.ws.write(text_frame(&typing)).unwrap();
    }
    typer.ws.flush().unwrap();
    let seen = drain(&mut watcher, Duration::from_millis(400));
    let typed = seen.iter().filter(|v| v["type"] == "typing").count();
    assert_eq!(typed, 2, "watcher saw {seen:?}");

    // 20 per second for 2 s: about 2 per second get through.
    let t0 = Instant::now();
    let sender = thread::spawn(move || {
        for _ in 0..40 {
            typer.send(&typing);
            thread::sleep(Duration::from_millis(50));
        }
        typer
    });
    let seen = collect(
        &mut watcher,
        Duration::from_millis(100),
        Some(t0 + Duration::from_millis(2300)),
    );
    let mut typer = sender.join().unwrap();
    let typed = seen.iter().filter(|v| v["type"] == "typing").count();
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        typed >= 2 && (typed as f64) <= 2.0 + 2.0 * secs,
        "watcher saw {typed} typing events in {secs:.1} s of 20 per second"
    );
    // Silently: the typer got no error for the dropped ones.
    typer.expect_none("error", Duration::from_millis(200));
    server.shutdown();
}

// ======================================================================= 8. validation, depth

#[test]
fn hostile_input_gets_errors_and_the_connection_stays() {
    let _serial = serial();
    let server = start(config());
    let (mut c, _) = Client::join(&server, "/chat?name=val");
    let (open, close) = ("[".repeat(10_000), "]".repeat(10_000));
    let deep_text = format!(r#"{{"type":"message","text":{open}{close}}}"#);
    let deep_name = format!(
        r#"{{"type":"nick","name":{}1{}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    let deep_unclosed = format!(r#"{{"type":"message","text":"x","n":{open}"#);
    let long_nick = json!({"type":"nick","name":"n".repeat(60 * 1024)}).to_string();
    let cases = [
        (deep_text.as_str(), "bad_request"),
        (deep_name.as_str(), "bad_request"),
        (deep_unclosed.as_str(), "bad_request"),
        (long_nick.as_str(), "bad_name"),
        (r#"{"type":"nick","name":"a\u0007b"}"#, "bad_name"),
        (r#"{"type":"nick","name":"\u0000"}"#, "bad_name"),
        (r#"{"type":"nick","name":"new\nline"}"#, "bad_name"),
        (r#"{"type":"join","room":"lob\u0001by"}"#, "bad_room"),
        (r#"{"type":"join","room":"lob by"}"#, "bad_room"),
        (r#"{"type":"message","text":"hi\u001b[31m"}"#, "bad_text"),
        (r#"{"type":"message","text":"nul\u0000"}"#, "bad_text"),
        (
            r#"{"type":"message","text":"x","to":"bo\u0008b"}"#,
            "bad_name",
        ),
        ("bell\u{7}", "bad_text"),
        ("del\u{7f}", "bad_text"),
    ];
    for (frame, code) in cases {
        c.send(frame);
        let e = c.expect("error");
        assert_eq!(e["code"], code, "for {:.80}", frame);
        c.send("still here");
        assert_eq!(c.expect_text(), "still here", "after {:.80}", frame);
    }
    // Deep nesting in a field nobody reads is skipped without recursion: the message goes out.
    let deep_extra = format!(
        r#"{{"type":"message","text":"deep extra","n":{open}{close},"o":{}{}}}"#,
        r#"{"a":"#.repeat(5_000),
        r#"1"#.to_owned() + &"}".repeat(5_000)
    );
    c.send(&deep_extra);
    assert_eq!(c.expect_text(), "deep extra");
    c.ws.send(Message::Binary(vec![0, 159, 146, 150].into()))
        .unwrap();
    assert_eq!(c.expect("error")["code"], "unsupported");
    c.send("and here");
    assert_eq!(c.expect_text(), "and here");

    // The server is fine for others too.
    let (mut other, welcome) = Client::join(&server, "/chat?name=other");
    assert_eq!(welcome["users"], json!(["other", "val"]));
    other.send("hello");
    assert_eq!(other.expect_text(), "hello");
    server.shutdown();
}

#[test]
fn hostile_handshakes_are_refused_or_sanitised() {
    let _serial = serial();
    let server = start(config());
    let ws = server.ws_addr();
    // A control character in the name: in as a guest, with a bad_name error.
    let (mut c, welcome) = Client::join(&server, "/chat?name=a%07b");
    assert!(
        welcome["name"].as_str().unwrap().starts_with("guest-"),
        "{welcome}"
    );
    assert_eq!(c.expect("error")["code"], "bad_name");
    // A control character in the room: refused before the upgrade.
    let (_, head, s) = upgrade(ws, "/chat?room=a%01b", "");
    assert_refused(400, &head, s);
    let (_, head, s) = upgrade(ws, "/chat/%00", "");
    assert_refused(400, &head, s);
    // A 60 KiB name makes a head over the 8 KiB limit: refused (or cut), never upgraded.
    let mut s = TcpStream::connect(ws).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let request = upgrade_request(&format!("/chat?name={}", "n".repeat(60 * 1024)), "");
    let _ = s.write_all(request.as_bytes()); // the server may hang up before reading it all
    let mut answer = Vec::new();
    let ended = s.read_to_end(&mut answer);
    assert!(
        !matches!(&ended, Err(e) if is_timeout(e)),
        "still open after {WAIT:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    c.send("fine");
    assert_eq!(c.expect_text(), "fine");
    server.shutdown();
}

#[test]
fn oversized_messages_close_with_1009_whole_or_fragmented() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_message_bytes = 4096;
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    let server = start(cfg);
    // Exactly the limit is fine.
    let (mut c, _) = Client::join(&server, "/chat");
    c.send(&"a".repeat(4096));
    assert_eq!(c.expect_text().len(), 4096);
    // One byte over, in one frame.
    c.send(&"b".repeat(4097));
    assert_eq!(expect_close_frame(&mut c).map(|(code, _)| code), Some(1009));

    let raw = |frames: &[Vec<u8>]| {
        let (status, head, mut s) = upgrade(server.ws_addr(), "/chat", "");
        assert_eq!(status, 101, "{head}");
        for f in frames {
            if s.write_all(f).is_err() {
                break; // closed already: fine, the close frame is what we check
            }
        }
        read_close(&mut s, Vec::new())
    };
    // Fragments each under the limit, 6000 bytes in all.
    let fragments = [
        client_frame(false, 0x1, &[b'c'; 3000]),
        client_frame(false, 0x0, &[b'c'; 2990]),
        client_frame(true, 0x0, &[b'c'; 10]),
    ];
    assert_eq!(raw(&fragments).map(|(code, _)| code), Some(1009));
    // A header announcing a terabyte: refused at once, without waiting for the payload.
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend((1u64 << 40).to_be_bytes());
    huge.extend([1, 2, 3, 4]);
    assert_eq!(raw(&[huge]).map(|(code, _)| code), Some(1009));

    let (mut c, _) = Client::join(&server, "/chat");
    c.send("server fine");
    assert_eq!(c.expect_text(), "server fine");
    server.shutdown();
}

// ============================================================================ 9. slow consumers

/// A room member: counts every message it receives into `delivered`; a sender also sends one
/// message at a time, waiting for its own echo (and `pause`) before the next.
fn member(
    addr: SocketAddr,
    i: usize,
    pause: Option<Duration>,
    delivered: &AtomicU64,
    stop: &AtomicBool,
    ready: mpsc::Sender<()>,
) -> Result<(), String> {
    let mut c = Client::connect(addr, &format!("/chat?name=m{i}"));
    c.expect("welcome");
    ready.send(()).unwrap();
    c.ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (mut seq, mut awaiting) = (0u64, None::<String>);
    while !stop.load(Relaxed) {
        if pause.is_some() && awaiting.is_none() {
            let text = format!("m{i}:{seq}");
            seq += 1;
            c.ws.send(text_frame(&text))
                .map_err(|e| format!("m{i} send: {e}"))?;
            awaiting = Some(text);
        }
        match c.ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("message") => {
                        delivered.fetch_add(1, Relaxed);
                        if awaiting.as_deref() == v["text"].as_str() {
                            awaiting = None;
                            thread::sleep(pause.unwrap_or_default());
                        }
                    }
                    Some("error") => return Err(format!("m{i} got {v}")),
                    _ => {}
                }
            }
            Ok(Message::Close(f)) => return Err(format!("m{i} was closed: {f:?}")),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
            Err(e) => return Err(format!("m{i}: {e}")),
        }
    }
    Ok(())
}

#[test]
fn a_stalled_reader_does_not_slow_its_room_and_is_dropped_as_too_slow() {
    let _serial = serial();
    let mut cfg = config();
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    cfg.client_queue = 512;
    let server = start(cfg);
    let addr = server.ws_addr();
    const MEMBERS: usize = 100;
    const SENDERS: usize = 4;
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let members: Vec<_> = (0..MEMBERS)
        .map(|i| {
            let (delivered, stop, ready) = (delivered.clone(), stop.clone(), ready_tx.clone());
            let pause = (i < SENDERS).then_some(Duration::from_millis(10));
            thread::spawn(move || member(addr, i, pause, &delivered, &stop, ready))
        })
        .collect();
    for _ in 0..MEMBERS {
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("every member joined");
    }
    let window = |what: &str| {
        let d0 = delivered.load(Relaxed);
        let t0 = Instant::now();
        thread::sleep(Duration::from_secs(1));
        let rate = (delivered.load(Relaxed) - d0) as f64 / t0.elapsed().as_secs_f64();
        eprintln!("room deliveries {what}: {rate:.0}/s");
        rate
    };
    thread::sleep(Duration::from_millis(300)); // warm up
    let without = window("without the staller");
    assert!(without > 0.0, "the room is not chatting");

    // The staller: a tiny receive buffer, and it never reads.
    let staller_socket = connect_small_rcvbuf(addr);
    let staller_addr = staller_socket.local_addr().unwrap();
    let (mut staller, _) =
        tungstenite::client(format!("ws://{addr}/chat?name=staller"), staller_socket)
            .expect("staller handshake");
    // Private messages from elsewhere fill its socket buffers at once, so its session is stuck
    // writing while the room chats (room traffic alone would take megabytes).
    let (mut filler, _) = Client::join(&server, "/chat/elsewhere?name=filler");
    let big = "z".repeat(32 * 1024);
    // 1 MiB: more than the (capped) socket buffers hold. The room's own traffic then fills its
    // queue (512 frames) within seconds.
    for _ in 0..32 {
        filler.send_json(json!({"type":"message","text":big,"to":"staller"}));
        filler.expect("message"); // its own copy: the dispatcher has queued it for the staller
    }
    let (backlog, _) = tcp_queues(addr, staller_addr).expect("the server's socket to the staller");
    assert!(
        backlog > 0,
        "the server's socket to the staller has nothing waiting: it is not stalled"
    );
    let with = window("with the staller");
    eprintln!("ratio {:.2}", with / without);
    assert!(
        with >= 0.3 * without,
        "room deliveries fell from {without:.0}/s to {with:.0}/s with one stalled reader"
    );

    wait_for("the staller to be dropped", Duration::from_secs(15), || {
        server.metrics().slow_clients_dropped.load(Relaxed) == 1
    });
    // Reading again, the staller gets what was queued, then the close.
    staller.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    let close = loop {
        match staller.read() {
            Ok(Message::Close(f)) => break f.map(|f| (u16::from(f.code), f.reason.to_string())),
            Ok(_) => {}
            Err(e) => panic!("the staller's connection ended without a close frame: {e}"),
        }
    };
    assert_eq!(close, Some((1008, "too slow".to_owned())));
    stop.store(true, Relaxed);
    for (i, m) in members.into_iter().enumerate() {
        m.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("member {i}: {e}"));
    }
    assert_eq!(
        metric(server.http_addr(), "wschat_slow_clients_dropped_total"),
        1
    );
    server.shutdown();
}

// ==================================================================================== 10. origins

#[test]
fn origins_are_checked_before_the_upgrade() {
    let _serial = serial();
    let server = start(config());
    let ws = server.ws_addr();
    let origin = |o: &str| format!("Origin: {o}\r\n");
    let own = format!("http://127.0.0.1:{}", server.http_addr().port());
    let (status, head, _a) = upgrade(ws, "/chat", &origin(&own));
    assert_eq!(status, 101, "the page's own origin:\n{head}");
    let (status, head, _b) = upgrade(ws, "/chat", "");
    assert_eq!(status, 101, "no Origin (not a browser):\n{head}");
    let localhost = format!("http://localhost:{}", ws.port());
    let (status, head, _c) = upgrade(ws, "/chat", &origin(&localhost));
    assert_eq!(status, 101, "localhost, on a loopback bind:\n{head}");
    for bad in [
        "http://evil.example",
        &format!("http://127.0.0.1:{}", ws.port() ^ 1),
        &format!("https://127.0.0.1:{}", server.http_addr().port()),
        "null",
    ] {
        let (_, head, s) = upgrade(ws, "/chat", &origin(bad));
        assert_refused(403, &head, s);
    }
    // DNS rebinding: a page on the attacker's name, whose Host header names it too.
    let rebound = format!(
        "Host: evil.example:{0}\r\nOrigin: http://evil.example:{0}\r\n",
        ws.port()
    );
    let (_, head, s) = upgrade(ws, "/chat", &rebound);
    assert_refused(403, &head, s);
    assert_eq!(rejected(&server, "forbidden_origin"), 5);
    // Two Origin headers: which one a browser meant is unknowable.
    let two = format!("{}{}", origin(&own), origin("http://evil.example"));
    let (_, head, s) = upgrade(ws, "/chat", &two);
    assert_refused(400, &head, s);
    server.shutdown();

    let mut cfg = config();
    cfg.allow_origins = vec!["https://chat.example.org".into()];
    let server = start(cfg);
    let ws = server.ws_addr();
    let (status, head, _a) = upgrade(ws, "/chat", &origin("https://chat.example.org"));
    assert_eq!(status, 101, "an allowed origin:\n{head}");
    let own = format!("http://127.0.0.1:{}", server.http_addr().port());
    let (status, head, _b) = upgrade(ws, "/chat", &origin(&own));
    assert_eq!(status, 101, "the own origin still:\n{head}");
    let (_, head, s) = upgrade(ws, "/chat", &origin("http://evil.example"));
    assert_refused(403, &head, s);
    server.shutdown();

    let mut cfg = config();
    cfg.allow_origins = vec!["*".into()];
    let server = start(cfg);
    let (status, head, _c) = upgrade(server.ws_addr(), "/chat", &origin("http://evil.example"));
    assert_eq!(status, 101, "* allows any origin:\n{head}");
    server.shutdown();
}

// =================================================================================== 11. shutdown

#[test]
fn shutdown_with_stalled_readers_returns_promptly_and_readers_get_1001() {
    let _serial = serial();
    let mut cfg = config();
    cfg.rate = 1e6;
    cfg.burst = 1e6;
    cfg.rate_bytes = 1e9;
    cfg.rate_bytes_per_ip = 1e9;
    cfg.room_rate_bytes = 1e9;
    cfg.client_queue_bytes = 64 << 20; // the stallers are behind, but not dropped
    cfg.backlog_bytes = 1 << 30;
    let server = start(cfg);
    let addr = server.ws_addr();
    const MESSAGES: usize = 160;
    let big = "q".repeat(32 * 1024); // 5 MiB in all: more than the socket buffers hold

    let stallers: Vec<(WebSocket<TcpStream>, SocketAddr)> = (0..5)
        .map(|i| {
            let socket = connect_small_rcvbuf(addr);
            let local = socket.local_addr().unwrap();
            let ws = tungstenite::client(format!("ws://{addr}/chat?name=s{i}"), socket)
                .expect("staller handshake")
                .0;
            (ws, local)
        })
        .collect();
    let (got_all_tx, got_all_rx) = mpsc::channel();
    let mut readers: Vec<JoinHandle<Option<u16>>> = (0..14)
        .map(|i| {
            let mut c = Client::join(&server, &format!("/chat?name=r{i}")).0;
            let got_all = got_all_tx.clone();
            thread::spawn(move || {
                for _ in 0..MESSAGES {
                    c.expect("message");
                }
                got_all.send(()).unwrap();
                c.expect_close()
            })
        })
        .collect();
    let mut talker = Client::join(&server, "/chat?name=talker").0;
    readers.push(thread::spawn(move || {
        for _ in 0..MESSAGES {
            talker.send(&big);
            while talker.expect("message")["from"] != "talker" {}
        }
        got_all_tx.send(()).unwrap();
        talker.expect_close()
    }));
    for _ in 0..readers.len() {
        got_all_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("every reader got every message");
    }
    for (i, (_, local)) in stallers.iter().enumerate() {
        let (backlog, _) = tcp_queues(addr, *local).expect("the server's socket to a staller");
        assert!(backlog > 0, "staller {i}: nothing waiting to be sent to it");
    }
    assert_eq!(server.metrics().slow_clients_dropped.load(Relaxed), 0);
    assert_eq!(server.live_connections(), 20);

    let t0 = Instant::now();
    server.shutdown();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "shutdown took {took:?} with 5 stalled readers"
    );
    for (i, r) in readers.into_iter().enumerate() {
        assert_eq!(r.join().unwrap(), Some(1001), "reader {i}");
    }
    drop(stallers);
}

// ========================================================================= 12. kill -9 durability

/// The real binary, killed on drop.
struct ServerProcess {
    child: Child,
    http: SocketAddr,
    ws: SocketAddr,
}

impl ServerProcess {
    fn start(data_dir: &Path, log: &Path) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wschat"))
            .args(["--port", "0", "--data-dir"])
            .arg(data_dir)
            .args(["--fsync", "always", "--history", "5000"])
            .args(["--rate", "1000000", "--burst", "1000000"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("run the wschat binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line); // keep draining so the pipe never fills
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!(
                    "no listening line from wschat; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        let (http, ws) = parse_listening(&line)
            .unwrap_or_else(|| panic!("unexpected first line from wschat: {line:?}"));
        ServerProcess { child, http, ws }
    }

    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `wschat listening: http://127.0.0.1:P/ (websocket ws://127.0.0.1:W/chat)`
fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("wschat listening: http://")?;
    let (http, rest) = rest.split_once("/ (websocket ws://")?;
    let ws = rest.strip_suffix("/chat)")?;
    Some((http.parse().ok()?, ws.parse().ok()?))
}

/// Sends batches of 10 and reads until its own 10 are back, recording every message it sees,
/// until the connection breaks or `cap` messages are sent.
fn chatter(addr: SocketAddr, k: usize, seen: &Mutex<BTreeMap<u64, String>>, cap: usize) -> usize {
    let me = format!("k{k}");
    let mut c = Client::connect(addr, &format!("/chat?name={me}"));
    c.expect("welcome");
    let mut sent = 0;
    'chat: while sent < cap {
        for _ in 0..10 {
            if c.ws.write(text_frame(&format!("{me}-{sent}"))).is_err() {
                break 'chat;
            }
            sent += 1;
        }
        if c.ws.flush().is_err() {
            break;
        }
        let mut own = 0;
        while own < 10 {
            let Ok(Message::Text(t)) = c.ws.read() else {
                break 'chat; // killed: EOF or reset (pings do not happen at this speed)
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "message" {
                let id = v["id"].as_u64().unwrap();
                let text = v["text"].as_str().unwrap().to_owned();
                seen.lock().unwrap().insert(id, text);
                own += usize::from(v["from"] == me.as_str());
            }
        }
    }
    sent
}

/// Every message in the room's history, paging through the API by `since`.
fn all_history(http: SocketAddr, room: &str) -> Vec<Value> {
    let (mut all, mut since) = (Vec::<Value>::new(), 0);
    loop {
        let (status, _, body) = http_get(
            http,
            &format!("/api/rooms/{room}/messages?since={since}&limit=1000"),
        );
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        let messages = page["messages"].as_array().unwrap();
        let Some(last) = messages.last() else {
            return all;
        };
        since = last["id"].as_u64().unwrap();
        all.extend(messages.iter().cloned());
        assert!(all.len() <= 10_000, "history paging does not end");
    }
}

#[test]
fn kill_dash_nine_loses_no_message_anyone_received() {
    let _serial = serial();
    let dir = TempDir::new("kill9");
    let data = dir.path().join("data");
    let server = ServerProcess::start(&data, &dir.path().join("log-1.txt"));
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let chatters: Vec<_> = (0..3)
        .map(|k| {
            let (addr, seen) = (server.ws, seen.clone());
            thread::spawn(move || chatter(addr, k, &seen, 1400))
        })
        .collect();
    let t0 = Instant::now();
    while seen.lock().unwrap().len() < 600 && t0.elapsed() < Duration::from_secs(8) {
        thread::sleep(Duration::from_millis(5));
    }
    server.kill(); // mid-chat
    let sent: usize = chatters.into_iter().map(|c| c.join().unwrap()).sum();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.len() >= 30,
        "only {} messages were chatted before the kill",
        seen.len()
    );
    assert!(sent < 5000, "more than --history holds");
    eprintln!("kill -9 after {} messages seen ({sent} sent)", seen.len());

    let server = ServerProcess::start(&data, &dir.path().join("log-2.txt"));
    let history = all_history(server.http, "lobby");
    let stored: BTreeMap<u64, String> = history
        .iter()
        .map(|m| {
            let text = m["text"].as_str().unwrap().to_owned();
            (m["id"].as_u64().unwrap(), text)
        })
        .collect();
    assert_eq!(stored.len(), history.len(), "duplicate ids in history");
    let ids: Vec<u64> = history.iter().map(|m| m["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "history in id order");
    let lost: Vec<_> = seen
        .iter()
        .filter(|(id, text)| stored.get(id) != Some(text))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} received messages are missing or changed after kill -9, e.g. {:?}",
        lost.len(),
        seen.len(),
        &lost[..lost.len().min(5)]
    );

    let (mut c, _) = join_addr(server.ws, "/chat?name=after");
    c.send("after the restart");
    let id = c.expect("message")["id"].as_u64().unwrap();
    let newest = seen.keys().chain(stored.keys()).max().copied().unwrap();
    assert!(
        id > newest,
        "the first message after the restart got id {id}; ids up to {newest} were used"
    );
    drop(c);
    server.kill();
}

/// `Client::join` for a server that is not a `Handle` (the subprocess).
fn join_addr(addr: SocketAddr, path: &str) -> (Client, Value) {
    let mut c = Client::connect(addr, path);
    let welcome = c.expect("welcome");
    (c, welcome)
}

// =================================================================== 13. no ghosts in presence

#[test]
fn abrupt_disconnects_mid_handshake_and_mid_frame_leave_presence_exact() {
    let _serial = serial();
    // Every join and leave told one by one (no burst turns them into a list): the watcher
    // replays them all.
    let server = start(wschat::Config {
        presence_burst: u32::MAX,
        ..config()
    });
    let ws = server.ws_addr();
    let (mut watcher, _) = Client::join(&server, "/chat?name=watcher");

    // Half a handshake, then a reset.
    for i in 0..20 {
        let request = upgrade_request(&format!("/chat?name=h{i}"), "");
        let mut s = TcpStream::connect(ws).unwrap();
        s.write_all(&request.as_bytes()[..request.len() / 2])
            .unwrap();
        reset_on_drop(&s);
    }
    // A whole handshake, reset before reading the answer (upgraded or not: either is fine).
    for i in 0..20 {
        let mut s = TcpStream::connect(ws).unwrap();
        s.write_all(upgrade_request(&format!("/chat?name=r{i}"), "").as_bytes())
            .unwrap();
        reset_on_drop(&s);
    }
    // Upgraded, then a reset in the middle of a frame.
    for i in 0..20 {
        let (status, head, mut s) = upgrade(ws, &format!("/chat?name=f{i}"), "");
        assert_eq!(status, 101, "{head}");
        s.write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4, b'a', b'b', b'c'])
            .unwrap();
        reset_on_drop(&s);
    }
    // Joined, then a reset in the middle of the close handshake.
    for i in 0..20 {
        let (mut c, _) = Client::join(&server, &format!("/chat?name=c{i}"));
        let _ = c.ws.close(None);
        let _ = c.ws.flush();
        reset_on_drop(c.ws.get_ref());
    }
    wait_for(
        "every abrupt connection to end",
        Duration::from_secs(10),
        || server.live_connections() == 1,
    );

    // Replaying joined/left on the watcher's list gives back exactly the watcher.
    let mut present = BTreeSet::from(["watcher".to_owned()]);
    let mut ever_joined = BTreeSet::new();
    for v in drain(&mut watcher, Duration::from_millis(500)) {
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        match v["type"].as_str() {
            Some("joined") => {
                assert!(present.insert(name.clone()), "{name} joined twice");
                ever_joined.insert(name);
            }
            Some("left") => assert!(present.remove(&name), "{name} left but was not here"),
            _ => continue,
        }
        assert_eq!(v["count"], present.len(), "count in {v}");
    }
    assert_eq!(
        present,
        BTreeSet::from(["watcher".to_owned()]),
        "ghosts in presence"
    );
    for i in 0..20 {
        for name in [format!("f{i}"), format!("c{i}")] {
            assert!(ever_joined.contains(&name), "{name} never joined");
        }
        assert!(
            !ever_joined.contains(&format!("h{i}")),
            "a half handshake joined"
        );
    }

    let (_fresh, welcome) = Client::join(&server, "/chat?name=fresh");
    assert_eq!(welcome["users"], json!(["fresh", "watcher"]));
    assert_eq!(welcome["count"], 2);
    // Their names are free again.
    let (_f0, welcome) = Client::join(&server, "/chat?name=f0");
    assert_eq!(welcome["name"], "f0");
    let (status, _, body) = http_get(server.http_addr(), "/api/rooms");
    assert_eq!(status, 200);
    let rooms: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rooms["rooms"], json!([{"name":"lobby","count":3}]));
    server.shutdown();
}

/// A frame over the limit ends its session with 1009 while its payload is still arriving: the
/// client leaves the room (the session's `LeaveOnDrop`, which also covers a panic) and its thread
/// ends, though its socket stays open. (This once provoked a panic: tungstenite's codec was read
/// again after the error; `Serial` would report one.)
#[test]
fn an_oversized_frame_ends_its_session_leaving_no_ghost_and_no_thread() {
    let _serial = serial();
    let mut cfg = config();
    cfg.max_message_bytes = 4096;
    let server = start(cfg);
    let (mut watcher, _) = Client::join(&server, "/chat?name=watcher");
    let one_connection = connection_threads().len();
    let (mut big, _) = Client::join(&server, "/chat?name=big");
    let _ = big.ws.send(text_frame(&"b".repeat(8192)));
    assert_eq!(
        expect_close_frame(&mut big).map(|(code, _)| code),
        Some(1009)
    );
    // `big` keeps its TCP connection open: only the server can end its threads now.
    wait_for("big's connection to end", WAIT, || {
        server.live_connections() == 1
    });
    let events: Vec<(String, String)> = drain(&mut watcher, Duration::from_millis(300))
        .iter()
        .filter(|v| v["type"] == "joined" || v["type"] == "left")
        .map(|v| {
            (
                v["type"].as_str().unwrap().into(),
                v["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("joined".into(), "big".into()),
            ("left".into(), "big".into())
        ]
    );
    // No thread of big's connection is left, although its socket is still open.
    let start = Instant::now();
    while connection_threads().len() > one_connection && start.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        connection_threads().len(),
        one_connection,
        "server threads {:?}, 3 s after big's connection ended (its socket still open); \
         {one_connection} with the watcher alone",
        connection_threads()
    );
    let (_fresh, welcome) = Client::join(&server, "/chat?name=fresh");
    assert_eq!(welcome["users"], json!(["fresh", "watcher"]));
    drop(big);
    server.shutdown();
}
