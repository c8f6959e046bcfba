//! The attacks of issue 9, each bounded in connections and by `deadline`. Attackers speak from
//! loopback addresses of their own (127.0.0.2 and up), as several hosts would.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use crate::{Opts, Report};

pub type Attack = fn(&Opts, Instant) -> Report;

/// Every attack, in the order of the issue's findings.
pub const ALL: [(&str, Attack); 10] = [
    ("head", endless_head),
    ("partial", partial_messages),
    ("pings", pings),
    ("fds", descriptors),
    ("door", door),
    ("escape", escape),
    ("fill", fill),
    ("readers", slow_readers),
    ("api", api),
    ("slowloris", slowloris),
];

/// A TCP connection from the loopback address 127.0.0.`host`.
fn connect_from(host: u8, addr: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, host], 0)).into())?;
    // An attacker reads little (the server's queues stay full) and buffers little of its own (a
    // write that succeeds is one the server's kernel took).
    socket.set_recv_buffer_size(4096)?;
    socket.set_send_buffer_size(4096)?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(2))?;
    Ok(socket.into())
}

/// A WebSocket from 127.0.0.`host` to `path`.
fn ws_from(host: u8, addr: SocketAddr, path: &str) -> Option<WebSocket<TcpStream>> {
    let stream = connect_from(host, addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).ok()?;
    Some(ws)
}

/// Whether the server has closed `s`, reading (without blocking) whatever it said first.
fn closed(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 4096];
    loop {
        match (&*s).read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != ErrorKind::WouldBlock,
        }
    }
}

fn endless_head(opts: &Opts, deadline: Instant) -> Report {
    let mut taken = Vec::new();
    for i in 0..20 {
        let Ok(mut s) = connect_from(2 + i % 4, opts.addr) else {
            continue;
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = s.write_all(b"GET / HTTP/1.1\r\nX-Pad: ");
        let pad = [b'a'; 16 * 1024];
        let mut sent = 0usize;
        while sent < 64 << 20 && Instant::now() < deadline {
            match s.write(&pad) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        taken.push(sent);
    }
    let most = taken.iter().max().copied().unwrap_or(0);
    Report {
        name: "head",
        what: "20 connections each send a header of endless bytes",
        got: format!("hung up after at most {} KiB of one head", most / 1024),
    }
}

/// Every connection sends all but the last bytes of a largest-size message and holds it: what
/// a connection can make the server keep for it.
fn partial_messages(opts: &Opts, deadline: Instant) -> Report {
    let frame = masked_text_frame(64 * 1024 - 16);
    let held: Vec<_> = (0..opts.connections.min(1000))
        .filter_map(|i| {
            let mut ws = ws_from(100 + (i / 40) as u8, opts.addr, "/chat/partial")?;
            let _ = ws.get_mut().set_write_timeout(Some(Duration::from_secs(2)));
            ws.get_mut().write_all(&frame[..frame.len() - 1]).ok()?;
            Some(ws)
        })
        .collect();
    thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let open = held.iter().filter(|ws| !closed(ws.get_ref())).count();
    Report {
        name: "partial",
        what: "--connections clients each send a 64 KiB message but its last byte, and wait",
        got: format!("{} connected, {open} still open at the end", held.len()),
    }
}

/// A client's text frame of `len` bytes of `m`, masked (key 0: the payload is unchanged).
fn masked_text_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(len as u64).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.resize(frame.len() + len, b'm');
    frame
}

fn pings(opts: &Opts, deadline: Instant) -> Report {
    let pingers: Vec<_> = (0..10u8)
        .map(|i| {
            let addr = opts.addr;
            thread::spawn(move || {
                let Some(mut ws) = ws_from(2 + i % 4, addr, "/chat/pings") else {
                    return false;
                };
                let _ = ws.get_mut().set_nonblocking(true);
                while Instant::now() < deadline {
                    match ws.write(Message::Ping(vec![7u8; 125].into())) {
                        Ok(()) => {}
                        Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(1))
                        }
                        Err(_) => return true, // dropped
                    }
                    let _ = ws.flush();
                }
                false
            })
        })
        .collect();
    let dropped = pingers
        .into_iter()
        .filter_map(|p| p.join().ok())
        .filter(|&d| d)
        .count();
    Report {
        name: "pings",
        what: "10 clients send pings as fast as they can and read nothing",
        got: format!("{dropped} of 10 dropped as too slow; the others are read at --rate-bytes"),
    }
}

fn descriptors(opts: &Opts, deadline: Instant) -> Report {
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..opts.connections * 3 {
        if Instant::now() >= deadline {
            break;
        }
        match connect_from(20 + (i / 60) as u8, opts.addr) {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    thread::sleep(Duration::from_millis(200));
    let open = held.iter().filter(|s| !closed(s)).count();
    Report {
        name: "fds",
        what: "3 x --connections sockets held open from many addresses",
        got: format!(
            "{open} held open, {} closed at once, {refused} not connected",
            held.len() - open
        ),
    }
}

fn door(opts: &Opts, deadline: Instant) -> Report {
    let mut open: Vec<TcpStream> = Vec::new();
    let mut opened = 0;
    while Instant::now() < deadline {
        open.retain(|s| !closed(s));
        while open.len() < 2048 && Instant::now() < deadline {
            match connect_from(2, opts.addr) {
                Ok(s) => open.push(s),
                Err(_) => break,
            }
            opened += 1;
        }
        thread::sleep(Duration::from_millis(20));
    }
    open.retain(|s| !closed(s));
    Report {
        name: "door",
        what: "2,048 silent sockets from one address, reopened as they are cut",
        got: format!(
            "{} of 2048 still held at the end ({opened} opened)",
            open.len()
        ),
    }
}

/// Sends `text` on `ws` as fast as the server lets it; returns (accepted, refused).
fn send_until(ws: &mut WebSocket<TcpStream>, text: &str, deadline: Instant) -> (usize, usize) {
    let (mut sent, mut refused) = (0, 0);
    let _ = ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)));
    while Instant::now() < deadline {
        if ws.send(Message::text(text)).is_err() {
            break;
        }
        sent += 1;
        while let Ok(m) = ws.read() {
            if let Message::Text(t) = m
                && t.contains("\"rate_limited\"")
            {
                refused += 1;
            }
        }
        thread::sleep(Duration::from_millis(100)); // within --rate: bytes are what is tested
    }
    (sent - refused.min(sent), refused)
}

fn escape(opts: &Opts, deadline: Instant) -> Report {
    let quotes = "\"".repeat(60 * 1024);
    let senders: Vec<_> = (0..4u8)
        .map(|i| {
            let (addr, quotes) = (opts.addr, quotes.clone());
            thread::spawn(
                move || match ws_from(2 + i, addr, &format!("/chat/honest?name=q{i}")) {
                    Some(mut ws) => send_until(&mut ws, &quotes, deadline),
                    None => (0, 0),
                },
            )
        })
        .collect();
    let (sent, refused) = senders
        .into_iter()
        .map(|s| s.join().unwrap_or_default())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    Report {
        name: "escape",
        what: "4 addresses send 60 KiB of quotes (120 KiB escaped) into the honest room",
        got: format!("{sent} messages through, {refused} refused (rate_limited)"),
    }
}

fn fill(opts: &Opts, deadline: Instant) -> Report {
    let text = "f".repeat(64 * 1024 - 64);
    let threads: Vec<_> = (0..opts.connections.min(1000))
        .map(|i| {
            let (addr, text) = (opts.addr, text.clone());
            thread::spawn(move || {
                let path = format!("/chat/fill-{i}");
                match ws_from(2 + (i % 4) as u8, addr, &path) {
                    Some(mut ws) => send_until(&mut ws, &text, deadline),
                    None => (0, 0),
                }
            })
        })
        .collect();
    let (sent, refused) = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    Report {
        name: "fill",
        what: "--connections clients on 4 addresses fill a room each with 64 KiB messages",
        got: format!("{sent} messages sent, {refused} seen refused"),
    }
}

fn slow_readers(opts: &Opts, deadline: Instant) -> Report {
    let readers: Vec<_> = (0..opts.connections.min(1000))
        .filter_map(|i| ws_from(60 + (i / 40) as u8, opts.addr, "/chat/readers"))
        .collect();
    let text = "r".repeat(32 * 1024);
    let (sent, refused) = match ws_from(9, opts.addr, "/chat/readers?name=talker") {
        Some(mut ws) => send_until(&mut ws, &text, deadline),
        None => (0, 0),
    };
    let dropped = readers.iter().filter(|ws| closed(ws.get_ref())).count();
    Report {
        name: "readers",
        what: "--connections clients that never read, in a room where one talks",
        got: format!(
            "{} readers, {dropped} dropped as too slow; {sent} messages sent, {refused} refused",
            readers.len()
        ),
    }
}

fn api(opts: &Opts, deadline: Instant) -> Report {
    let Some(token) = &opts.api_token else {
        return Report {
            name: "api",
            what: "POST flood on the HTTP API",
            got: "skipped (no --api-token)".into(),
        };
    };
    let (mut created, mut limited, mut other) = (0, 0, 0);
    while Instant::now() < deadline {
        let request = format!(
            "POST /api/rooms/api/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\nflood"
        );
        let status = connect_from(3, opts.addr).ok().and_then(|mut s| {
            s.write_all(request.as_bytes()).ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            answer.split(' ').nth(1)?.parse::<u16>().ok()
        });
        match status {
            Some(201) => created += 1,
            Some(429) => limited += 1,
            _ => other += 1,
        }
    }
    Report {
        name: "api",
        what: "POST flood on the HTTP API from one address",
        got: format!(
            "{created} posted, {limited} refused with 429, {other} turned away at the door (connection rate)"
        ),
    }
}

fn slowloris(opts: &Opts, deadline: Instant) -> Report {
    // Held past the first-request deadline (5 s), whatever --seconds says.
    let deadline = deadline.max(Instant::now() + Duration::from_secs(8));
    let mut open: Vec<(TcpStream, Instant)> = (0..opts.connections.min(600))
        .filter_map(|i| connect_from(40 + (i / 60) as u8, opts.addr).ok())
        .map(|s| (s, Instant::now()))
        .collect();
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let mut longest = Duration::ZERO;
    let mut step = 0;
    while Instant::now() < deadline && !open.is_empty() {
        open.retain(|(s, since)| {
            let alive = (&*s)
                .write_all(&request[step % request.len()..][..1])
                .is_ok()
                && !closed(s);
            if !alive {
                longest = longest.max(since.elapsed());
            }
            alive
        });
        step += 1;
        thread::sleep(Duration::from_millis(500));
    }
    Report {
        name: "slowloris",
        what: "600 connections send a request head one byte every 0.5 s, for 8 s at least",
        got: format!(
            "{} still open at the end; the longest cut one was held {:.1} s",
            open.len(),
            longest.as_secs_f64()
        ),
    }
}
