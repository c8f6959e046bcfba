//! HTTP/1.1 requests as they arrive at the front door: a request head read from the socket
//! under one deadline and a size bound, parsed with `httparse` into owned parts, and then, for
//! the few requests that carry one, a body of a declared length.
//!
//! This module owns what a request may cost before anyone looks at it: [`MAX_HEAD_BYTES`] and
//! [`MAX_HEADERS`] bound the memory, and the deadline the caller passes bounds the time for the
//! whole head, so a client sending one byte every few seconds gains nothing. It never answers a
//! request and never decides what one means: the listener, [`crate::handshake`] and
//! [`crate::http`] do.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};

use crate::wire::Wire;
use std::time::Instant;

/// Largest request head accepted: browsers send well under 2 KiB, and a cookie-laden one 4-6 KiB.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers parsed; more is a refusal, not a bigger buffer.
pub const MAX_HEADERS: usize = 32;
/// Bytes read from the socket per call while waiting for a head or a body.
const READ_CHUNK_BYTES: usize = 1024;

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed before sending anything (the normal end of a keep-alive connection).
    #[error("connection closed")]
    Closed,
    #[error("the request head did not arrive in time")]
    Timeout,
    #[error("the request head is over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// HTTP/1.`minor`.
    pub minor_version: u8,
    /// Header names and values in the order sent (values that are not UTF-8 are dropped).
    pub headers: Vec<(String, String)>,
    /// The TCP peer.
    pub peer: SocketAddr,
}

impl Request {
    /// The first header named `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// Every header named `name`, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The query string, without `?` (empty if none).
    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether the query has `key` (first value, percent-decoded, `+` as space).
    pub fn query_value(&self, key: &str) -> Option<String> {
        self.query()
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| decode(v))
    }

    /// Whether a comma-separated header holds `token` (case-insensitive), as `Connection` does.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The client's address: the peer, or the last `X-Forwarded-For` entry when the peer is the
    /// trusted proxy (a proxy appends the address it saw: the last entry is the one it vouches
    /// for).
    pub fn client_ip(&self, trusted_proxy: Option<IpAddr>) -> IpAddr {
        let peer = self.peer.ip();
        if trusted_proxy != Some(peer) {
            return peer;
        }
        self.header("x-forwarded-for")
            .and_then(|v| v.rsplit(',').next())
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(peer)
    }

    /// Whether the client wants the connection kept open after the response.
    pub fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.has_token("connection", "keep-alive")
        } else {
            !self.has_token("connection", "close")
        }
    }

    /// The body's declared length: `Ok(0)` without one; an error for a chunked body (which
    /// nothing here needs) or a length that is not one number.
    pub fn content_length(&self) -> Result<usize, &'static str> {
        if self.header("transfer-encoding").is_some() {
            return Err("send the body with Content-Length (chunked bodies are not accepted)");
        }
        let mut lengths = self.headers_named("content-length");
        let length = match lengths.next() {
            None => return Ok(0),
            Some(v) => v.parse().map_err(|_| "Content-Length is not a number")?,
        };
        match lengths.next() {
            Some(_) => Err("more than one Content-Length"),
            None => Ok(length),
        }
    }
}

/// Percent-decodes a query value (`+` is a space, as browsers send forms).
pub fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Reads one request head. `buffered` holds bytes already read from this connection (a
/// pipelined request, or nothing); on success the head is taken out of it and what follows
/// stays. The whole head must arrive by `deadline`. `peer` is the connection's address, as
/// `accept` gave it (asking the socket again would be a system call a request).
pub(crate) fn read_head(
    stream: &Wire,
    peer: SocketAddr,
    buffered: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Request, HeadError> {
    let mut searched = 0;
    loop {
        if let Some(end) = find_head_end(buffered, searched) {
            let rest = buffered.split_off(end);
            let head = std::mem::replace(buffered, rest);
            return parse(&head, peer);
        }
        if buffered.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        searched = buffered.len();
        let wanted = READ_CHUNK_BYTES.min(MAX_HEAD_BYTES - buffered.len());
        let read = read_some(stream, buffered, wanted, deadline).map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => HeadError::Timeout,
            _ => HeadError::Io(e),
        });
        match read? {
            0 if buffered.is_empty() => return Err(HeadError::Closed),
            0 => return Err(HeadError::Malformed("the connection ended inside the head")),
            _ => {}
        }
    }
}

/// Parses a complete head (up to and including its blank line).
pub fn parse(head: &[u8], peer: SocketAddr) -> Result<Request, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("not an HTTP/1.x request")),
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let headers = req
        .headers
        .iter()
        .filter_map(|h| {
            Some((
                h.name.to_owned(),
                std::str::from_utf8(h.value).ok()?.to_owned(),
            ))
        })
        .collect();
    Ok(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        minor_version,
        headers,
        peer,
    })
}

/// Reads a body of exactly `length` bytes (some may be in `buffered` already), by `deadline`.
pub(crate) fn read_body(
    stream: &Wire,
    buffered: &mut Vec<u8>,
    length: usize,
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    while buffered.len() < length {
        let wanted = length - buffered.len(); // the caller bounds `length`
        if read_some(stream, buffered, wanted, deadline)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let rest = buffered.split_off(length);
    Ok(std::mem::replace(buffered, rest))
}

/// Bytes of an oversized body read and thrown away before answering 413, so the client reads a
/// clean response instead of a connection reset. Past this, the answer is sent at once and the
/// connection closed: draining more would let one request hold its thread for long.
pub const DRAIN_LIMIT_BYTES: usize = 1 << 20;

/// Reads and throws away up to `length` bytes of a body nobody wants, by `deadline`, so the
/// answer that follows is not lost in a connection reset. False if they did not all arrive.
pub(crate) fn skip_body(
    stream: &Wire,
    buffered: &mut Vec<u8>,
    length: usize,
    deadline: Instant,
) -> bool {
    let mut left = length;
    loop {
        let n = left.min(buffered.len());
        buffered.drain(..n);
        left -= n;
        if left == 0 {
            return true;
        }
        match read_some(stream, buffered, READ_CHUNK_BYTES.min(left), deadline) {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}

/// One `read` of up to `wanted` bytes appended to `buf`, waiting no later than `deadline`.
/// Returns 0 at end of stream.
fn read_some(
    stream: &Wire,
    buf: &mut Vec<u8>,
    wanted: usize,
    deadline: Instant,
) -> Result<usize, io::Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    let start = buf.len();
    buf.resize(start + wanted, 0);
    let result = (&*stream).read(&mut buf[start..]);
    buf.truncate(start + *result.as_ref().unwrap_or(&0));
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
        other => other,
    }
}

impl From<HeadError> for io::Error {
    fn from(e: HeadError) -> io::Error {
        match e {
            HeadError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// Where the blank line ending the head is, looking only at what might contain it.
fn find_head_end(buf: &[u8], new_from: usize) -> Option<usize> {
    let from = new_from.saturating_sub(3);
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:4000".parse().unwrap()
    }

    #[test]
    fn parses_heads_into_owned_parts() {
        let head = b"GET /chat/dev?name=Al%20ice&x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n";
        let r = parse(head, peer()).unwrap();
        assert_eq!(
            (r.method.as_str(), r.path(), r.query()),
            ("GET", "/chat/dev", "name=Al%20ice&x")
        );
        assert_eq!(r.query_value("name").as_deref(), Some("Al ice"));
        assert_eq!(r.query_value("x").as_deref(), Some(""));
        assert!(r.has_token("connection", "upgrade") && r.keep_alive());
        assert!(matches!(
            parse(b"garbage\r\n\r\n", peer()),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let r = |s: &str| parse(s.as_bytes(), peer()).unwrap();
        assert!(!r("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(r("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(!r("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
    }

    #[test]
    fn body_lengths_are_one_number() {
        let r = |s: &str| parse(s.as_bytes(), peer()).unwrap().content_length();
        assert_eq!(r("POST / HTTP/1.1\r\n\r\n"), Ok(0));
        assert_eq!(r("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"), Ok(12));
        assert!(r("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(r("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err());
        assert!(r("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn too_many_headers_is_too_large() {
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            head.push_str(&format!("X-{i}: y\r\n"));
        }
        head.push_str("\r\n");
        assert!(matches!(
            parse(head.as_bytes(), peer()),
            Err(HeadError::TooLarge)
        ));
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let buf = b"GET / HTTP/1.1\r\n\r\nrest";
        assert_eq!(find_head_end(buf, 0), Some(18));
        assert_eq!(find_head_end(buf, 17), Some(18));
        assert_eq!(find_head_end(b"ab", 5), None);
    }
}
