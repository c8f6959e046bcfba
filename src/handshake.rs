//! The WebSocket opening handshake (RFC 6455 section 4), done by hand so that every refusal is a
//! proper HTTP answer: 404 for other paths, 426 for plain HTTP, 403 for foreign origins, 503 when
//! full. tungstenite's own server handshake can only fail with an error, not answer a plain GET.
//!
//! [`read_request`] reads the request head under one total deadline; [`check`] is a pure function
//! from its bytes to an [`Upgrade`] or a [`Refusal`] (fuzzed in `fuzz/`); [`accept_response`] and
//! [`Refusal::response`] write the answer. After a 101, the socket belongs to the session.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::time::Instant;

use crate::metrics::Rejection;
use crate::protocol::{self, DEFAULT_ROOM};

/// Largest request head accepted: browsers send well under 2 KiB.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Most headers parsed; more is a refusal, not a bigger buffer.
const MAX_HEADERS: usize = 32;
/// Bytes read from the socket per call while waiting for the head.
const READ_CHUNK_BYTES: usize = 1024;

/// What the server checks a handshake against.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The HTTP (page) port: the default allowed `Origin` is `http://<Host>:<http_port>`.
    pub http_port: u16,
    /// Extra allowed origins, lower-case, without a trailing slash.
    pub allow_origins: Vec<String>,
    pub allow_any_origin: bool,
    /// Connections from this address may name the client in `X-Forwarded-For`.
    pub trusted_proxy: Option<IpAddr>,
}

/// An accepted handshake: what the session needs to know.
#[derive(Debug, PartialEq)]
pub struct Upgrade {
    pub room: String,
    pub name: Option<String>,
    pub since: Option<u64>,
    /// `chat` if the client offered it.
    pub protocol: Option<&'static str>,
    pub accept_key: String,
    /// The client's address: the peer, or `X-Forwarded-For` from a trusted proxy.
    pub client_ip: IpAddr,
}

/// A refused handshake and the HTTP answer it gets.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no WebSocket endpoint at {0}")]
    NotFound(String),
    #[error("not a WebSocket upgrade request")]
    UpgradeRequired,
    #[error("origin {0:?} is not allowed")]
    Forbidden(String),
    #[error("too many clients")]
    TooManyClients,
    #[error("too many clients from {0}")]
    TooManyFromAddress(IpAddr),
}

impl Refusal {
    pub fn kind(&self) -> Rejection {
        match self {
            Refusal::BadRequest(_) => Rejection::BadRequest,
            Refusal::NotFound(_) => Rejection::NotFound,
            Refusal::UpgradeRequired => Rejection::UpgradeRequired,
            Refusal::Forbidden(_) => Rejection::Forbidden,
            Refusal::TooManyClients => Rejection::TooManyClients,
            Refusal::TooManyFromAddress(_) => Rejection::TooManyFromAddress,
        }
    }

    /// The full HTTP response; `page_url` is where a lost browser should go instead.
    pub fn response(&self, page_url: &str) -> String {
        let (status, extra, body) = match self {
            Refusal::BadRequest(why) => (
                "400 Bad Request",
                "",
                format!("bad WebSocket request: {why}\n"),
            ),
            Refusal::NotFound(path) => (
                "404 Not Found",
                "",
                format!("no WebSocket endpoint at {path}; use /chat or /chat/<room>\n"),
            ),
            Refusal::UpgradeRequired => (
                "426 Upgrade Required",
                "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
                format!(
                    "this port speaks WebSocket only (ws://.../chat); the chat page is at {page_url}\n"
                ),
            ),
            Refusal::Forbidden(_) => (
                "403 Forbidden",
                "",
                "this origin may not open a WebSocket here\n".to_owned(),
            ),
            Refusal::TooManyClients | Refusal::TooManyFromAddress(_) => (
                "503 Service Unavailable",
                "Retry-After: 5\r\n",
                "too many connections, try again shortly\n".to_owned(),
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// Reads one request head: returns it and any bytes the client sent after it. Fails on EOF, on
/// more than [`MAX_REQUEST_BYTES`], or when `deadline` passes (a total deadline, so a client
/// sending one byte a second gains nothing).
pub fn read_request(stream: &TcpStream, deadline: Instant) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(READ_CHUNK_BYTES);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let start = buf.len();
        buf.resize(start + READ_CHUNK_BYTES, 0);
        let n = match (&*stream).read(&mut buf[start..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::ErrorKind::TimedOut.into());
            }
            Err(e) => return Err(e),
        };
        buf.truncate(start + n);
        if let Some(end) = find_head_end(&buf, start) {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

/// Where the blank line ending the head is, looking only at what might contain it.
fn find_head_end(buf: &[u8], new_from: usize) -> Option<usize> {
    let from = new_from.saturating_sub(3);
    buf[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

/// Checks a request head. `peer` is the TCP peer address.
pub fn check(head: &[u8], peer: IpAddr, policy: &Policy) -> Result<Upgrade, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::BadRequest("malformed HTTP request")),
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let room = match path.strip_prefix("/chat") {
        Some("") | Some("/") => None,
        Some(rest) if rest.starts_with('/') => Some(decode(&rest[1..])),
        _ => return Err(Refusal::NotFound(path.chars().take(100).collect())),
    };
    let is_upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade || !has_token(header("connection"), "upgrade") {
        return Err(Refusal::UpgradeRequired);
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return Err(Refusal::BadRequest(
            "a WebSocket handshake is GET with HTTP/1.1",
        ));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(Refusal::BadRequest("Sec-WebSocket-Version must be 13"));
    }
    let key = header("sec-websocket-key")
        .map(str::trim)
        .filter(|k| k.len() == 24);
    let key = key.ok_or(Refusal::BadRequest(
        "missing or malformed Sec-WebSocket-Key",
    ))?;
    check_origin(header("origin"), header("host"), policy)?;

    let mut upgrade = Upgrade {
        room: room.unwrap_or_else(|| DEFAULT_ROOM.to_owned()),
        name: None,
        since: None,
        protocol: has_token(header("sec-websocket-protocol"), "chat").then_some("chat"),
        accept_key: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        client_ip: client_ip(peer, header("x-forwarded-for"), policy),
    };
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "room" => upgrade.room = decode(v),
            "name" => upgrade.name = Some(decode(v)),
            "since" => {
                upgrade.since = Some(
                    v.parse()
                        .map_err(|_| Refusal::BadRequest("since must be a message id"))?,
                )
            }
            _ => {}
        }
    }
    protocol::check_room(&upgrade.room)
        .map_err(|_| Refusal::BadRequest("room names are 1-64 of A-Z a-z 0-9 - _ ."))?;
    Ok(upgrade)
}

/// Percent-decodes a query value (`+` is a space, as browsers send forms).
fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Browsers always send `Origin`; other clients usually do not, and cannot be hijacked.
fn check_origin(origin: Option<&str>, host: Option<&str>, policy: &Policy) -> Result<(), Refusal> {
    let Some(origin) = origin else { return Ok(()) };
    let normalized = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    let own = host.map(|h| format!("http://{}", with_port(host_name(h), policy.http_port)));
    if policy.allow_any_origin
        || own.as_deref() == Some(normalized.as_str())
        || policy.allow_origins.contains(&normalized)
    {
        Ok(())
    } else {
        Err(Refusal::Forbidden(origin.chars().take(200).collect()))
    }
}

/// The host part of a `Host` header: `[::1]:5001` -> `[::1]`, `example.org:5001` -> `example.org`.
fn host_name(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => host[..i].to_owned(),
        _ => host,
    }
}

/// `host:port`, leaving out port 80 as browsers do in `Origin`.
fn with_port(host: String, port: u16) -> String {
    if port == 80 {
        host
    } else {
        format!("{host}:{port}")
    }
}

fn client_ip(peer: IpAddr, forwarded: Option<&str>, policy: &Policy) -> IpAddr {
    if policy.trusted_proxy != Some(peer) {
        return peer;
    }
    // The proxy appends the address it saw: the last entry is the one it vouches for.
    forwarded
        .and_then(|v| v.rsplit(',').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(peer)
}

/// The `101 Switching Protocols` response.
pub fn accept_response(upgrade: &Upgrade) -> String {
    let protocol = upgrade
        .protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        upgrade.accept_key
    )
}

/// Writes a whole response (handshake answers are small: one write, bounded by the write timeout).
pub fn send(stream: &TcpStream, response: &str) -> io::Result<()> {
    (&*stream).write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn request(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:5001\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn policy() -> Policy {
        Policy {
            http_port: 5000,
            ..Policy::default()
        }
    }

    #[test]
    fn accepts_a_good_handshake_with_room_name_and_since() {
        let up = check(
            request(
                "/chat/dev?name=Al%20ice&since=41",
                "Sec-WebSocket-Protocol: superchat, chat\r\n",
            )
            .as_bytes(),
            PEER,
            &policy(),
        )
        .unwrap();
        assert_eq!(
            (up.room.as_str(), up.name.as_deref(), up.since, up.protocol),
            ("dev", Some("Al ice"), Some(41), Some("chat"))
        );
        assert_eq!(up.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let up = check(
            request("/chat?room=ops", "Sec-WebSocket-Protocol: superchat\r\n").as_bytes(),
            PEER,
            &policy(),
        )
        .unwrap();
        assert_eq!((up.room.as_str(), up.protocol), ("ops", None));
    }

    #[test]
    fn refusals() {
        let p = policy();
        assert_eq!(
            check(request("/other", "").as_bytes(), PEER, &p),
            Err(Refusal::NotFound("/other".into()))
        );
        assert_eq!(
            check(request("/chatroom", "").as_bytes(), PEER, &p),
            Err(Refusal::NotFound("/chatroom".into()))
        );
        let plain = "GET /chat HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            check(plain.as_bytes(), PEER, &p),
            Err(Refusal::UpgradeRequired)
        );
        assert!(matches!(
            check(request("/chat/a%20b", "").as_bytes(), PEER, &p),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            check(b"garbage\r\n\r\n", PEER, &p),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn origins() {
        let p = policy();
        let with = |origin: &str| {
            check(
                request("/chat", &format!("Origin: {origin}\r\n")).as_bytes(),
                PEER,
                &p,
            )
        };
        assert!(with("http://127.0.0.1:5000").is_ok());
        assert!(with("HTTP://127.0.0.1:5000/").is_ok());
        assert!(matches!(
            with("http://127.0.0.1:5001"),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            with("http://evil.example"),
            Err(Refusal::Forbidden(_))
        ));
        let p = Policy {
            allow_origins: vec!["https://chat.example.org".into()],
            ..policy()
        };
        assert!(
            check(
                request("/chat", "Origin: https://chat.example.org\r\n").as_bytes(),
                PEER,
                &p
            )
            .is_ok()
        );
        assert_eq!(host_name("[::1]:5001"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
    }

    #[test]
    fn forwarded_for_only_from_the_trusted_proxy() {
        let xff = "X-Forwarded-For: 10.0.0.9, 192.0.2.7\r\n";
        let up = check(request("/chat", xff).as_bytes(), PEER, &policy()).unwrap();
        assert_eq!(up.client_ip, PEER);
        let p = Policy {
            trusted_proxy: Some(PEER),
            ..policy()
        };
        let up = check(request("/chat", xff).as_bytes(), PEER, &p).unwrap();
        assert_eq!(up.client_ip, "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
