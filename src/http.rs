//! The plain HTTP side of the one port: the page (embedded in the binary, or a directory with
//! `--www`), `/config.json`, the JSON API, `/healthz` and `/metrics`.
//!
//! A request arrives here from the front door ([`crate::listener`]) already read and parsed, on
//! its connection's own thread, which answers it at once; the answer is a `tiny_http`
//! [`Response`], which also writes itself out (status line, headers, length). Anything about
//! chat state is asked of the dispatcher through an [`Event`] with a reply channel and a timeout.
//! This module never holds chat state itself.

use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use include_dir::{Dir, include_dir};
use serde_json::json;
use tiny_http::{HTTPVersion, Header, Response};

use crate::cluster;
use crate::dispatcher::Event;
use crate::metrics::Metrics;
use crate::names;
use crate::protocol::{self, ChatError};
use crate::ratelimit::{AddressBuckets, TokenBucket};
use crate::request::{self, Request};
use crate::wire::Wire;

/// The page, compiled into the binary so it runs from any directory.
static WWW: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/www");

/// How long a request waits for the dispatcher before answering 503.
const DISPATCHER_TIMEOUT: Duration = Duration::from_secs(2);
/// Most messages `GET /api/rooms/<room>/messages` returns.
const MAX_HISTORY_PAGE: usize = 1000;
/// Largest file served from `--www DIR`.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// What the HTTP handlers need.
pub struct HttpShared {
    pub events: Sender<Event>,
    pub metrics: Arc<Metrics>,
    pub www_dir: Option<PathBuf>,
    pub public_ws_url: Option<String>,
    pub api_token: Option<String>,
    pub max_body_bytes: usize,
    /// Host for the WebSocket URL when the request has no usable `Host`.
    pub default_host: String,
    /// API posts per address, and for the token as a whole (a leaked token is one budget).
    pub api_posts_per_address: AddressBuckets,
    pub api_posts: Mutex<TokenBucket>,
    pub trusted_proxy: Option<IpAddr>,
    /// `wss` when the port speaks TLS, else `ws`: the scheme of the announced WebSocket URL.
    pub ws_scheme: &'static str,
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

/// What one request on a connection can see besides its head: the socket, for the body.
struct Exchange<'a> {
    request: &'a Request,
    stream: &'a Wire,
    buffered: &'a mut Vec<u8>,
    /// The body must have arrived by then.
    deadline: Instant,
    /// The body (if any) is off the connection: the next request can follow.
    body_done: bool,
}

/// Answers one request; returns whether the connection may serve another. The body, if the
/// handler wants it, must arrive within `timeout`; so must the response's last byte leave.
pub(crate) fn serve(
    shared: &HttpShared,
    stream: &Wire,
    request: &Request,
    buffered: &mut Vec<u8>,
    timeout: Duration,
) -> bool {
    let mut exchange = Exchange {
        request,
        stream,
        buffered,
        deadline: Instant::now() + timeout,
        body_done: request.content_length() == Ok(0),
    };
    let reply = route(shared, &mut exchange);
    let status = reply.status_code().0;
    log::debug!("{} {} -> {status}", request.method, request.target);
    // A body left unread would be taken for the next request: close instead.
    let keep_open = request.keep_alive() && exchange.body_done;
    // tiny_http names itself in a `Server` header unless the response has one.
    let reply = reply.with_header(header("Server", "wschat"));
    let reply = if keep_open {
        reply
    } else {
        reply.with_header(header("Connection", "close"))
    };
    let version = HTTPVersion(1, request.minor_version);
    let head_only = request.method == "HEAD";
    let mut out = BufWriter::new(stream);
    let written = stream
        .set_write_timeout(Some(timeout))
        .and_then(|()| reply.raw_print(&mut out, version, &[], head_only, None))
        .and_then(|()| out.flush());
    keep_open && written.is_ok()
}

fn route(shared: &HttpShared, exchange: &mut Exchange<'_>) -> Reply {
    let request = exchange.request;
    let path = request.path().to_owned();
    let read = matches!(request.method.as_str(), "GET" | "HEAD");
    match path.as_str() {
        "/config.json" if read => json_reply(200, &json!({ "ws_url": ws_url(shared, request) })),
        "/healthz" if read => healthz(shared),
        "/metrics" if read => text(200, &shared.metrics.render(shared.events.len()))
            .with_header(header("Content-Type", "text/plain; version=0.0.4")),
        "/api/rooms" if read => rooms(shared),
        p if p.starts_with("/api/") => api(shared, exchange, p),
        p if read => static_file(shared, request, p),
        _ => text(405, "method not allowed\n").with_header(header("Allow", "GET, HEAD")),
    }
}

// ----- the page -----

fn static_file(shared: &HttpShared, request: &Request, path: &str) -> Reply {
    let Some(rel) = clean_path(path) else {
        return not_found();
    };
    let body = match &shared.www_dir {
        Some(dir) => read_from_dir(dir, &rel),
        None => WWW.get_file(&rel).map(|f| f.contents().to_vec()),
    };
    let Some(body) = body else { return not_found() };
    let csp = content_security_policy(&ws_url(shared, request));
    Response::from_data(body)
        .with_header(header("Content-Type", content_type(&rel)))
        .with_header(header("Content-Security-Policy", &csp))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header("Referrer-Policy", "no-referrer"))
        .with_header(header("Cache-Control", "no-cache"))
}

/// A request path as a relative file path, or `None` if it could leave the root: every segment
/// must be a plain name after percent-decoding (no `..`, `.`, empty, `\`, NUL or `:`).
pub fn clean_path(path: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?;
    let rel = decoded.strip_prefix('/')?;
    let rel = if rel.is_empty() || rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_owned()
    };
    let plain = |seg: &str| {
        !seg.is_empty() && seg != "." && seg != ".." && !seg.contains(['\\', '\0', ':'])
    };
    rel.split('/').all(plain).then_some(rel)
}

/// Reads `rel` under `dir`, refusing anything (a symlink included) that resolves outside it.
fn read_from_dir(dir: &Path, rel: &str) -> Option<Vec<u8>> {
    let root = dir.canonicalize().ok()?;
    let full = root.join(rel).canonicalize().ok()?;
    if !full.starts_with(&root) || !full.is_file() || full.metadata().ok()?.len() > MAX_FILE_BYTES {
        return None;
    }
    std::fs::read(full).ok()
}

fn content_type(path: &str) -> &'static str {
    match path
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .as_deref()
    {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Only the page's own scripts and styles, and connections to itself and the WebSocket.
fn content_security_policy(ws_url: &str) -> String {
    let ws_origin = ws_url.split('/').take(3).collect::<Vec<_>>().join("/");
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' {ws_origin}; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    )
}

/// Where the page should connect: `--public-ws-url`, or the host and port the browser used
/// (the same port serves both), so a page opened from another machine on the LAN works too.
fn ws_url(shared: &HttpShared, request: &Request) -> String {
    if let Some(url) = &shared.public_ws_url {
        return url.clone();
    }
    let host = request.header("Host").filter(|h| is_plain_host(h));
    let host = host.unwrap_or(&shared.default_host);
    format!("{}://{host}/chat", shared.ws_scheme)
}

/// A host name or address, nothing that could break out of a URL, JSON string or header.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
}

// ----- health, metrics, API -----

/// Asks the dispatcher something and waits (bounded) for the answer.
fn ask<T>(shared: &HttpShared, event: impl FnOnce(Sender<T>) -> Event) -> Option<T> {
    let (tx, rx) = bounded(1);
    shared
        .events
        .send_timeout(event(tx), DISPATCHER_TIMEOUT)
        .ok()?;
    rx.recv_timeout(DISPATCHER_TIMEOUT).ok()
}

/// Healthy only if the dispatcher answers a ping and can save messages: a stuck or dead
/// dispatcher, or a history file that cannot be written (a full disk), is a 503 naming it.
fn healthz(shared: &HttpShared) -> Reply {
    match ask(shared, |reply| Event::Ping { reply }) {
        // Degraded still serves its own clients: a load balancer should keep sending them.
        Some(None)
            if shared
                .metrics
                .redis_state
                .load(std::sync::atomic::Ordering::Relaxed)
                == cluster::STATE_DEGRADED =>
        {
            text(200, &format!("degraded: {}\n", cluster::UNREACHABLE))
        }
        Some(None) => text(200, "ok\n"),
        Some(Some(problem)) => text(503, &format!("{problem}\n")),
        None => text(503, "dispatcher not responding\n"),
    }
}

fn rooms(shared: &HttpShared) -> Reply {
    match ask(shared, |reply| Event::Rooms { reply }) {
        Some(rooms) => json_reply(200, &json!({ "rooms": rooms })),
        None => busy(),
    }
}

fn api(shared: &HttpShared, exchange: &mut Exchange<'_>, path: &str) -> Reply {
    let segments: Vec<&str> = path.split('/').collect();
    let ["", "api", "rooms", room, "messages"] = segments[..] else {
        return json_error(
            404,
            "not_found",
            "no such API endpoint; see docs/PROTOCOL.md",
        );
    };
    let room = percent_encoding::percent_decode_str(room)
        .decode_utf8_lossy()
        .into_owned();
    match exchange.request.method.as_str() {
        "GET" | "HEAD" => history(shared, room, exchange.request.query()),
        "POST" => post_message(shared, exchange, room),
        _ => json_error(405, "method_not_allowed", "use GET or POST")
            .with_header(header("Allow", "GET, HEAD, POST")),
    }
}

fn history(shared: &HttpShared, room: String, query: &str) -> Reply {
    if let Err(e) = protocol::check_room(&room) {
        return chat_error(&e);
    }
    let mut since = None;
    let mut limit = MAX_HISTORY_PAGE;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match (k, v.parse::<u64>()) {
            ("since", Ok(n)) => since = Some(n),
            ("limit", Ok(n)) => limit = (n as usize).min(MAX_HISTORY_PAGE),
            ("since" | "limit", Err(_)) => {
                return json_error(400, "bad_request", "since and limit are whole numbers");
            }
            _ => {}
        }
    }
    let room_name = room.clone();
    let Some(page) = ask(shared, |reply| Event::History {
        room,
        since,
        limit,
        reply,
    }) else {
        return busy();
    };
    /// Stored frames are spliced in as they are, not parsed into values and printed again.
    #[derive(serde::Serialize)]
    struct Page<'a> {
        room: &'a str,
        messages: Vec<&'a serde_json::value::RawValue>,
        truncated: bool,
        more: bool,
    }
    let messages = page
        .messages
        .iter()
        .filter_map(protocol::raw_json)
        .collect();
    let body = protocol::encode(&Page {
        room: &room_name,
        messages,
        truncated: page.truncated,
        more: page.more,
    });
    Response::from_string(body.as_str())
        .with_status_code(200)
        .with_header(header("Content-Type", "application/json"))
}

/// `POST /api/rooms/<room>/messages`: the token and the post rates are checked before the body
/// is read.
fn post_message(shared: &HttpShared, exchange: &mut Exchange<'_>, room: String) -> Reply {
    let request = exchange.request;
    let Some(token) = &shared.api_token else {
        return json_error(
            403,
            "api_disabled",
            "posting is disabled: start wschat with --api-token TOKEN (or WSCHAT_API_TOKEN)",
        );
    };
    let given = request
        .header("Authorization")
        .and_then(bearer)
        .unwrap_or("");
    if given.is_empty() {
        return json_error(401, "missing_token", "send Authorization: Bearer <token>")
            .with_header(header("WWW-Authenticate", "Bearer"));
    }
    if !constant_time_eq::constant_time_eq(given.as_bytes(), token.as_bytes()) {
        let reason = "the bearer token is not this server's --api-token";
        return json_error(401, "bad_token", reason).with_header(header(
            "WWW-Authenticate",
            r#"Bearer error="invalid_token""#,
        ));
    }
    if let Some(refused) = over_post_rate(shared, request) {
        return refused;
    }
    if let Err(e) = protocol::check_room(&room) {
        return chat_error(&e);
    }
    if let Err(why) = request.content_length() {
        return json_error(411, "length_required", why);
    }
    let Some(body) = read_body(exchange, shared.max_body_bytes) else {
        let limit = shared.max_body_bytes;
        return json_error(413, "too_large", &format!("the body is over {limit} bytes"));
    };
    let is_json = request
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("application/json"));
    let (text, from) = match parse_post(&body, is_json) {
        Ok(parsed) => parsed,
        Err(e) => return chat_error(&e),
    };
    match ask(shared, |reply| Event::Publish {
        room,
        from,
        text,
        reply,
    }) {
        Some(Ok(id)) => json_reply(201, &json!({ "id": id })),
        Some(Err(e)) => chat_error(&e),
        None => busy(),
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A 429 when this address, or the token as a whole, posts faster than `--api-rate`.
fn over_post_rate(shared: &HttpShared, request: &Request) -> Option<Reply> {
    let now = Instant::now();
    let ip = request.client_ip(shared.trusted_proxy);
    let allowed = shared.api_posts_per_address.try_take(ip, 1.0, now)
        && shared
            .api_posts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_take(now);
    if allowed {
        return None;
    }
    Metrics::add(&shared.metrics.rate_limited, 1);
    let reply = json_error(429, "rate_limited", "too many posts; see --api-rate")
        .with_header(header("Retry-After", "1"));
    Some(reply)
}

/// The body, or `None` when it is over `max` bytes (or does not arrive in time). A client that
/// asked `Expect: 100-continue` is answered without being asked for the body; from others, up
/// to [`request::DRAIN_LIMIT_BYTES`] are read and dropped first, so the answer is not lost in a
/// connection reset.
fn read_body(exchange: &mut Exchange<'_>, max: usize) -> Option<Vec<u8>> {
    let length = exchange.request.content_length().ok()?;
    let (stream, deadline) = (exchange.stream, exchange.deadline);
    let expects_continue = exchange
        .request
        .header("Expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if length > max {
        if !expects_continue && length <= request::DRAIN_LIMIT_BYTES {
            exchange.body_done = request::skip_body(stream, exchange.buffered, length, deadline);
        }
        return None;
    }
    if expects_continue && exchange.buffered.len() < length {
        // The client waits for this before it sends the body (curl, for bodies over 1 KiB).
        (&*stream)
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .ok()?;
    }
    let body = request::read_body(stream, exchange.buffered, length, deadline).ok()?;
    exchange.body_done = true;
    Some(body)
}

/// A JSON body `{"text": "...", "from": "..."}` or plain text; `from` defaults to `server`
/// ([`names::check_sender`] says which names the API may use).
fn parse_post(body: &[u8], is_json: bool) -> Result<(String, String), ChatError> {
    #[derive(serde::Deserialize)]
    struct Post {
        text: String,
        from: Option<String>,
    }
    let post = if is_json {
        serde_json::from_slice::<Post>(body)
            .map_err(|e| ChatError::BadRequest(format!("invalid JSON body: {e}")))?
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|_| ChatError::BadRequest("the body is not UTF-8".into()))?;
        Post {
            text: text.to_owned(),
            from: None,
        }
    };
    let from = names::check_sender(post.from.as_deref().unwrap_or(names::SERVER))?;
    Ok((protocol::check_text(&post.text)?, from))
}

// ----- small helpers -----

fn header(name: &str, value: &str) -> Header {
    // Every name and value here is ASCII we wrote, or a host checked by `is_plain_host`.
    Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("header names and values are ASCII")
}

fn text(status: u16, body: &str) -> Reply {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
}

fn not_found() -> Reply {
    text(404, "not found\n")
}

fn json_reply(status: u16, value: &serde_json::Value) -> Reply {
    Response::from_string(value.to_string())
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

fn json_error(status: u16, code: &str, message: &str) -> Reply {
    json_reply(status, &json!({ "error": code, "message": message }))
}

fn chat_error(e: &ChatError) -> Reply {
    match e {
        ChatError::NotSaved(_) => {
            json_error(503, e.code(), &e.to_string()).with_header(header("Retry-After", "5"))
        }
        _ => json_error(400, e.code(), &e.to_string()),
    }
}

fn busy() -> Reply {
    json_error(503, "busy", "the server did not answer in time; try again")
        .with_header(header("Retry-After", "1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_leave_the_root() {
        assert_eq!(clean_path("/").as_deref(), Some("index.html"));
        assert_eq!(clean_path("/app.js").as_deref(), Some("app.js"));
        assert_eq!(clean_path("/img/a%20b.png").as_deref(), Some("img/a b.png"));
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/a/../../x",
            "//etc/passwd",
            "/a\\..\\b",
            "/%2fetc",
            "/c:/x",
            "/a%00",
        ] {
            assert_eq!(clean_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types_by_extension() {
        let cases = [
            ("index.html", "text/html; charset=utf-8"),
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("logo.svg", "image/svg+xml"),
            ("a.PNG", "image/png"),
            ("favicon.ico", "image/x-icon"),
            ("config.json", "application/json"),
            ("blob", "application/octet-stream"),
        ];
        for (path, expected) in cases {
            assert_eq!(content_type(path), expected, "{path}");
        }
    }

    #[test]
    fn csp_names_the_websocket_origin() {
        let csp = content_security_policy("ws://10.0.0.2:5001/chat");
        assert!(
            csp.contains("connect-src 'self' ws://10.0.0.2:5001;"),
            "{csp}"
        );
    }
}
