//! The WebSocket opening handshake (RFC 6455 section 4), checked by hand so that every refusal
//! is a proper HTTP answer: 404 for other paths, 426 for plain HTTP, 403 for foreign origins, 503
//! when full. tungstenite's own server handshake can only fail with an error, not answer a plain
//! GET.
//!
//! [`check`] is a pure function from a parsed [`Request`] to an [`Upgrade`] or a [`Refusal`]
//! (fuzzed in `fuzz/`); [`accept_response`] and [`Refusal::response`] write the answer. After a
//! 101, the socket belongs to the session. Reading the request is [`crate::request`]'s job.

use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, UdpSocket};
use std::time::Duration;

use crate::metrics::{Metrics, Rejection};
use crate::protocol::{self, Arrival, DEFAULT_ROOM};
use crate::request::Request;
use crate::wire::Wire;

/// What the server checks a handshake against.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Origins of the pages this server serves (`http://127.0.0.1:5000`, the public URL's...),
    /// lower-case, without a trailing slash. Never derived from a request's own `Host`: a page
    /// on a rebound DNS name would otherwise vouch for itself.
    pub own_origins: Vec<String>,
    /// The public port: with a wildcard bind, `http://<an address of this host>:<port>` is ours.
    pub port: u16,
    pub wildcard_bind: bool,
    /// Extra allowed origins, lower-case, without a trailing slash.
    pub allow_origins: Vec<String>,
    pub allow_any_origin: bool,
    /// Connections from this address may name the client in `X-Forwarded-For`.
    pub trusted_proxy: Option<IpAddr>,
    /// `/echo` is served (`--echo`); otherwise it is a path like any other: 404.
    pub echo: bool,
}

/// Which WebSocket endpoint a handshake opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/chat`, `/chat/<room>`: a chat client, joined to the dispatcher.
    Chat,
    /// `/echo` (with `--echo`): every message comes back as it was sent.
    Echo,
}

/// An accepted handshake: the `101` answer's parts, and the client's [`Arrival`] for the
/// session to carry to the dispatcher.
#[derive(Debug, PartialEq)]
pub struct Upgrade {
    pub endpoint: Endpoint,
    pub arrival: Arrival,
    /// `chat` if the client offered it.
    pub protocol: Option<&'static str>,
    pub accept_key: String,
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
    #[error("server full: {0} WebSocket clients (--max-clients)")]
    TooManyClients(usize),
    #[error("per-address cap: {1} clients from {0} (--max-clients-per-ip)")]
    TooManyFromAddress(IpAddr, usize),
}

impl Refusal {
    pub fn kind(&self) -> Rejection {
        match self {
            Refusal::BadRequest(_) => Rejection::BadRequest,
            Refusal::NotFound(_) => Rejection::NotFound,
            Refusal::UpgradeRequired => Rejection::UpgradeRequired,
            Refusal::Forbidden(_) => Rejection::Forbidden,
            Refusal::TooManyClients(_) => Rejection::TooManyClients,
            Refusal::TooManyFromAddress(..) => Rejection::TooManyFromAddress,
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
                    "this path speaks WebSocket only (ws://.../chat); the chat page is at {page_url}\n"
                ),
            ),
            Refusal::Forbidden(_) => (
                "403 Forbidden",
                "",
                "this origin may not open a WebSocket here (see --allow-origin)\n".to_owned(),
            ),
            Refusal::TooManyClients(_) | Refusal::TooManyFromAddress(..) => (
                "503 Service Unavailable",
                "Retry-After: 5\r\n",
                format!("{self}; try again shortly\n"),
            ),
        };
        status_response(status, extra, &body)
    }
}

/// A complete plain-text response that closes the connection.
pub fn status_response(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{extra_headers}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether a request asks to become a WebSocket (whatever its path).
pub fn is_upgrade(request: &Request) -> bool {
    request
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && request.has_token("connection", "upgrade")
}

/// Whether `path` is a chat endpoint (`/chat`, `/chat/<room>`).
pub fn is_chat_path(path: &str) -> bool {
    path == "/chat" || path.starts_with("/chat/")
}

/// Checks a request for a chat endpoint.
pub fn check(request: &Request, policy: &Policy) -> Result<Upgrade, Refusal> {
    let path = request.path();
    let (endpoint, room) = match path.strip_prefix("/chat") {
        Some("") | Some("/") => (Endpoint::Chat, None),
        Some(rest) if rest.starts_with('/') => {
            (Endpoint::Chat, Some(crate::request::decode(&rest[1..])))
        }
        _ if path == "/echo" && policy.echo => (Endpoint::Echo, None),
        _ => return Err(Refusal::NotFound(path.chars().take(100).collect())),
    };
    let accept_key = accept_key(request)?;
    check_origin(request, policy)?;

    let since = match request.query_value("since") {
        None => None,
        Some(v) => Some(
            v.parse()
                .map_err(|_| Refusal::BadRequest("since must be a message id"))?,
        ),
    };
    let arrival = Arrival {
        ip: request.client_ip(policy.trusted_proxy),
        room: request
            .query_value("room")
            .or(room)
            .unwrap_or_else(|| DEFAULT_ROOM.to_owned()),
        name: request.query_value("name"),
        since,
    };
    protocol::check_room(&arrival.room)
        .map_err(|_| Refusal::BadRequest("room names are 1-64 of A-Z a-z 0-9 - _ ."))?;
    Ok(Upgrade {
        endpoint,
        arrival,
        protocol: request
            .has_token("sec-websocket-protocol", "chat")
            .then_some("chat"),
        accept_key,
    })
}

/// The checks of every WebSocket upgrade, whatever its path: `GET`, HTTP/1.1, version 13, a
/// key; returns the `Sec-WebSocket-Accept` value.
pub fn accept_key(request: &Request) -> Result<String, Refusal> {
    if !is_upgrade(request) {
        return Err(Refusal::UpgradeRequired);
    }
    if request.method != "GET" || request.minor_version != 1 {
        return Err(Refusal::BadRequest(
            "a WebSocket handshake is GET with HTTP/1.1",
        ));
    }
    if request.header("sec-websocket-version") != Some("13") {
        return Err(Refusal::BadRequest("Sec-WebSocket-Version must be 13"));
    }
    let key = request
        .header("sec-websocket-key")
        .filter(|k| k.len() == 24)
        .ok_or(Refusal::BadRequest(
            "missing or malformed Sec-WebSocket-Key",
        ))?;
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Browsers always send `Origin`; other clients usually do not, and cannot be hijacked. The
/// origin must be one this server serves or one allowed by `--allow-origin`.
pub fn check_origin(request: &Request, policy: &Policy) -> Result<(), Refusal> {
    let mut origins = request.headers_named("origin");
    let Some(origin) = origins.next() else {
        return Ok(());
    };
    if origins.next().is_some() {
        return Err(Refusal::BadRequest("more than one Origin header"));
    }
    let normalized = origin.trim_end_matches('/').to_ascii_lowercase();
    if policy.allow_any_origin
        || policy.own_origins.contains(&normalized)
        || policy.allow_origins.contains(&normalized)
        || (policy.wildcard_bind && is_this_host(&normalized, policy.port))
    {
        Ok(())
    } else {
        Err(Refusal::Forbidden(origin.chars().take(200).collect()))
    }
}

/// Whether `origin` is `http(s)://<IP literal>:<port>` with an address of this host: what a
/// browser on the LAN sends for a server bound to all addresses. Host names never pass here (a
/// rebound DNS name is exactly what the check is for); binding a UDP socket to the address
/// asks the kernel whether it is ours, and sends nothing.
fn is_this_host(origin: &str, port: u16) -> bool {
    let Some(authority) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let Some((host, origin_port)) = authority.rsplit_once(':') else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match (host.parse::<IpAddr>(), origin_port.parse::<u16>()) {
        (Ok(ip), Ok(p)) if p == port => UdpSocket::bind((ip, 0)).is_ok(),
        _ => false,
    }
}

/// The `101 Switching Protocols` response.
pub fn accept_response(upgrade: &Upgrade) -> String {
    switching_response(&upgrade.accept_key, upgrade.protocol)
}

/// The `101 Switching Protocols` response for an accept key and an optional subprotocol.
pub fn switching_response(accept_key: &str, protocol: Option<&str>) -> String {
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n{protocol}\r\n"
    )
}

/// Writes a whole response (handshake answers are small: one write, bounded by the write timeout).
pub fn send(mut stream: impl Write, response: &str) -> io::Result<()> {
    stream.write_all(response.as_bytes())
}

/// Answers a refused upgrade (or socket.io request), closes the connection's writing side, and
/// logs it sparingly: a flood of refusals would flood the log too, so the 1st, 2nd, 4th, 8th...
/// of each kind. `page_url` is where a lost browser should go instead.
pub(crate) fn refuse(
    metrics: &Metrics,
    page_url: &str,
    stream: &Wire,
    peer: SocketAddr,
    refusal: &Refusal,
) {
    if let Some(count) = metrics.reject(refusal.kind()) {
        log::info!("refused a WebSocket from {peer}: {refusal} ({count} of this kind so far)");
    }
    let response = refusal.response(page_url);
    log::debug!("handshake response to {peer}:\n{response}");
    let _ = send(stream, &response);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Answers `101` (within `timeout`). The socket's timeouts stay as they are: the session sets
/// its receive timeout before it first waits, writes without blocking, and its last writes set
/// their own (clearing them here would be two system calls a connection for nothing); its
/// buffers and `TCP_NODELAY` were set at accept (`listener`). False if the connection was lost.
pub(crate) fn switch_protocols(
    stream: &Wire,
    request: &Request,
    response: &str,
    timeout: Duration,
) -> bool {
    log::debug!("handshake response to {}:\n{response}", request.peer);
    let setup = stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| send(stream, response));
    if let Err(e) = &setup {
        log::debug!(
            "connection from {} lost during the handshake: {e}",
            request.peer
        );
    }
    setup.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "127.0.0.1:40000";

    fn request(target: &str, extra: &str) -> Request {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        crate::request::parse(head.as_bytes(), PEER.parse().unwrap()).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            own_origins: vec![
                "http://127.0.0.1:5000".into(),
                "http://localhost:5000".into(),
            ],
            port: 5000,
            ..Policy::default()
        }
    }

    #[test]
    fn accepts_a_good_handshake_with_room_name_and_since() {
        let r = request(
            "/chat/dev?name=Al%20ice&since=41",
            "Sec-WebSocket-Protocol: superchat, chat\r\n",
        );
        let up = check(&r, &policy()).unwrap();
        let arrival = &up.arrival;
        assert_eq!(
            (
                arrival.room.as_str(),
                arrival.name.as_deref(),
                arrival.since
            ),
            ("dev", Some("Al ice"), Some(41))
        );
        assert_eq!(up.protocol, Some("chat"));
        assert_eq!(up.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let r = request("/chat?room=ops", "Sec-WebSocket-Protocol: superchat\r\n");
        let up = check(&r, &policy()).unwrap();
        assert_eq!((up.arrival.room.as_str(), up.protocol), ("ops", None));
    }

    #[test]
    fn refusals() {
        let p = policy();
        assert_eq!(
            check(&request("/other", ""), &p),
            Err(Refusal::NotFound("/other".into()))
        );
        assert_eq!(
            check(&request("/chatroom", ""), &p),
            Err(Refusal::NotFound("/chatroom".into()))
        );
        let plain = crate::request::parse(
            b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n",
            PEER.parse().unwrap(),
        )
        .unwrap();
        assert_eq!(check(&plain, &p), Err(Refusal::UpgradeRequired));
        assert!(matches!(
            check(&request("/chat/a%20b", ""), &p),
            Err(Refusal::BadRequest(_))
        ));
    }

    #[test]
    fn echo_only_when_turned_on() {
        let r = request("/echo", "");
        assert_eq!(check(&r, &policy()), Err(Refusal::NotFound("/echo".into())));
        let p = Policy {
            echo: true,
            ..policy()
        };
        assert_eq!(check(&r, &p).map(|up| up.endpoint), Ok(Endpoint::Echo));
        let chat = check(&request("/chat", ""), &p).map(|up| up.endpoint);
        assert_eq!(chat, Ok(Endpoint::Chat));
        let sub = request("/echo/x", "");
        assert_eq!(check(&sub, &p), Err(Refusal::NotFound("/echo/x".into())));
    }

    #[test]
    fn origins_are_the_servers_own_never_the_requests_host() {
        let p = policy();
        let with = |extra: &str| check(&request("/chat", extra), &p);
        assert!(with("Origin: http://127.0.0.1:5000\r\n").is_ok());
        assert!(with("Origin: HTTP://localhost:5000/\r\n").is_ok());
        for bad in ["http://127.0.0.1:5001", "http://evil.example", "null"] {
            assert!(
                matches!(
                    with(&format!("Origin: {bad}\r\n")),
                    Err(Refusal::Forbidden(_))
                ),
                "{bad}"
            );
        }
        // DNS rebinding: the request's own Host names the attacker's page.
        let rebound = "Host: evil.example:7561\r\nOrigin: http://evil.example:7561\r\n";
        assert!(matches!(with(rebound), Err(Refusal::Forbidden(_))));
        let two = "Origin: http://127.0.0.1:5000\r\nOrigin: http://evil.example\r\n";
        assert!(matches!(with(two), Err(Refusal::BadRequest(_))));
        let p = Policy {
            allow_origins: vec!["https://chat.example.org".into()],
            ..policy()
        };
        let r = request("/chat", "Origin: https://chat.example.org\r\n");
        assert!(check(&r, &p).is_ok());
    }

    #[test]
    fn a_wildcard_bind_accepts_this_hosts_addresses_only() {
        let p = Policy {
            wildcard_bind: true,
            ..policy()
        };
        assert!(is_this_host("http://127.0.0.2:5000", p.port));
        assert!(is_this_host("http://[::1]:5000", p.port) || UdpSocket::bind("[::1]:0").is_err());
        assert!(!is_this_host("http://127.0.0.2:5001", p.port));
        assert!(!is_this_host("http://192.0.2.1:5000", p.port)); // TEST-NET: not ours
        assert!(!is_this_host("http://evil.example:5000", p.port));
    }

    #[test]
    fn forwarded_for_only_from_the_trusted_proxy() {
        let xff = "X-Forwarded-For: 10.0.0.9, 192.0.2.7\r\n";
        let up = check(&request("/chat", xff), &policy()).unwrap();
        assert_eq!(
            up.arrival.ip,
            PEER.parse::<std::net::SocketAddr>().unwrap().ip()
        );
        let p = Policy {
            trusted_proxy: Some("127.0.0.1".parse().unwrap()),
            ..policy()
        };
        let up = check(&request("/chat", xff), &p).unwrap();
        assert_eq!(up.arrival.ip, "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
