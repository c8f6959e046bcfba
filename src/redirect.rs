//! `--redirect-http PORT`: a plain-HTTP listener that answers every request with a `308` to the
//! same path on the https port, so `http://chat.example.org/` still finds the chat.
//!
//! Each connection gets a short-lived thread that reads one request head (the front door's
//! reader: the same size bound, within `--handshake-timeout`), answers, and closes. At most
//! [`MAX_REDIRECTS_AT_ONCE`] connections are served at once; more are closed unanswered. This
//! module never serves the chat, the page or the API, and never reads a body.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use crate::handshake;
use crate::request;
use crate::wire::Wire;

/// Redirect connections served at once: a redirect takes one short exchange, so a few dozen
/// threads serve any honest load; silent sockets beyond this cost nothing but a close.
pub const MAX_REDIRECTS_AT_ONCE: usize = 64;
/// Stack of a redirect thread: it reads one head and writes one short answer.
const REDIRECT_STACK_BYTES: usize = 64 * 1024;

/// What the redirect threads share.
pub struct Redirect {
    /// The https port, for the `Location`.
    pub https_port: u16,
    /// Host used when the request names none (or one that cannot go in a URL).
    pub default_host: String,
    /// The whole request head must arrive within this.
    pub head_timeout: Duration,
    pub stopping: AtomicBool,
    serving: AtomicUsize,
}

impl Redirect {
    pub fn new(https_port: u16, default_host: String, head_timeout: Duration) -> Redirect {
        Redirect {
            https_port,
            default_host,
            head_timeout,
            stopping: AtomicBool::new(false),
            serving: AtomicUsize::new(0),
        }
    }

    /// Accepts until [`Redirect::stopping`] is set (and the listener poked with a connection).
    pub fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Relaxed) {
                break;
            }
            let Ok(stream) = stream else {
                thread::sleep(Duration::from_millis(50)); // out of descriptors: let them free up
                continue;
            };
            if self.serving.fetch_add(1, Relaxed) >= MAX_REDIRECTS_AT_ONCE {
                self.serving.fetch_sub(1, Relaxed);
                continue; // dropped: closed unanswered
            }
            let redirect = self.clone();
            let spawned = thread::Builder::new()
                .name("redirect".into())
                .stack_size(REDIRECT_STACK_BYTES)
                .spawn(move || {
                    redirect.answer(stream);
                    redirect.serving.fetch_sub(1, Relaxed);
                });
            if spawned.is_err() {
                self.serving.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Reads one request head and answers `308` to its https twin (or `400` if it is no request).
    fn answer(&self, stream: TcpStream) {
        let Ok(peer) = stream.peer_addr() else {
            return; // gone already
        };
        let wire = Wire::plain(Arc::new(stream));
        let deadline = Instant::now() + self.head_timeout;
        let response = match request::read_head(&wire, peer, &mut Vec::new(), deadline) {
            Ok(request) => {
                let host = request.header("Host").unwrap_or_default();
                let location = self.location(host, &request.target);
                let extra = format!("Location: {location}\r\n");
                let body = format!("this site is at {location}\n");
                handshake::status_response("308 Permanent Redirect", &extra, &body)
            }
            Err(request::HeadError::Malformed(why)) => {
                handshake::status_response("400 Bad Request", "", &format!("bad request: {why}\n"))
            }
            Err(_) => return,
        };
        let _ = wire.set_write_timeout(Some(self.head_timeout));
        let _ = handshake::send(&wire, &response);
        let _ = wire.shutdown(Shutdown::Write);
    }

    /// `https://HOST:PORT/target`, with the request's host (its port dropped) when it is a plain
    /// host name or address, else the server's own.
    pub fn location(&self, host: &str, target: &str) -> String {
        let name = strip_port(host);
        let name = if is_plain_host(name) {
            name
        } else {
            &self.default_host
        };
        let target = if target.starts_with('/') { target } else { "/" };
        match self.https_port {
            443 => format!("https://{name}{target}"),
            port => format!("https://{name}:{port}{target}"),
        }
    }
}

/// `example.org:80` -> `example.org`; `[::1]:80` -> `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

/// A host name or address that cannot break out of a URL or a header.
fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))
}

/// Binds `--redirect-http`'s port and serves it on its own thread.
pub fn start(
    addr: SocketAddr,
    redirect: Arc<Redirect>,
) -> std::io::Result<(SocketAddr, thread::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let thread = thread::Builder::new()
        .name("redirect-accept".into())
        .spawn(move || redirect.accept_loop(listener))?;
    Ok((local, thread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_keep_the_path_and_swap_the_port() {
        let r = Redirect::new(8443, "127.0.0.1".into(), Duration::from_secs(1));
        assert_eq!(
            r.location("chat.example.org:8080", "/a?b=c"),
            "https://chat.example.org:8443/a?b=c"
        );
        assert_eq!(r.location("[::1]:80", "/"), "https://[::1]:8443/");
        assert_eq!(r.location("evil\r\nX: y", "/"), "https://127.0.0.1:8443/");
        assert_eq!(r.location("", "*"), "https://127.0.0.1:8443/");
        let r = Redirect::new(443, "h".into(), Duration::from_secs(1));
        assert_eq!(r.location("example.org", "/x"), "https://example.org/x");
    }
}
