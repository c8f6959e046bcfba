//! The socket.io door: `/socket.io/` on the one port, where socket.io 4 clients (Engine.IO 4)
//! arrive. It runs Engine.IO's transports on the connection's own thread, as the door door
//! hands them over ([`crate::listener`]):
//!
//! * `GET` without `sid`: a new polling session (a [`Link`], counted as a client), answered
//!   with its `open` packet;
//! * `GET` with `sid`: the long poll, which waits up to a ping interval for packets;
//! * `POST` with `sid`: the client's packets, in the body;
//! * a WebSocket upgrade (`transport=websocket`): with `sid`, the probe of a polling session
//!   (`2probe`, `3probe`, `5`); without, a session that lives on its WebSocket from the start.
//!   Either way the connection becomes a [`session`](crate::session) in socket.io's dialect;
//! * `GET /socket.io/socket.io.js`: the file `--socketio-client` names (wschat ships none).
//!
//! It owns the registry of live sessions, and the sweep that keeps polling sessions' time
//! (pings, the pong deadline) and forgets ended ones; what it needs of the server it borrows from
//! the front door as a [`Door`]. Every request passes the origin check of
//! WebSockets; what a client may send is its link's business, and chat the dispatcher's.

use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{info, warn};

use crate::admission::{Admission, Ticket};
use crate::dispatcher::Event;
use crate::eio_session::{self, CloseReason, Registry, RegistryLimits};
use crate::engineio::{self, EioError, Transport};
use crate::handshake::{self, Policy, Refusal};
use crate::metrics::Rejection;
use crate::request::{self, Request};
use crate::session::Env;
use crate::sio_link::{Link, NewLink};

/// Where socket.io clients fetch the client script.
pub const CLIENT_SCRIPT_PATH: &str = "/socket.io/socket.io.js";
/// How often the sweep runs the polling sessions' clocks and forgets ended sessions: pings and
/// pong deadlines are kept to this resolution, and an ended session is forgotten within it.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// What a socket.io request leaves the connection as.
pub enum Next {
    /// Answered: keep the connection for another request, or close it.
    Http { keep_open: bool },
    /// Answered `101`: the connection is this link's WebSocket now.
    WebSocket(Arc<Link>, IpAddr),
}

/// What the socket.io door borrows from the front door ([`crate::listener`]) for a request.
pub struct Door<'a> {
    pub sio: &'a SioDoor,
    pub env: Env<'a>,
    pub policy: &'a Policy,
    pub admission: &'a Arc<Admission>,
    /// The `101` must leave within this.
    pub head_timeout: Duration,
    /// A body must arrive, and an answer leave, within this.
    pub http_timeout: Duration,
    /// Where a lost browser should go instead (in refusals).
    pub page_url: &'a str,
    /// The front door's ids, shared by connections and socket.io clients.
    pub ids: &'a AtomicU64,
}

impl Door<'_> {
    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Relaxed)
    }
}

/// The live socket.io sessions and what every one of them shares.
pub struct SioDoor {
    registry: Mutex<Registry<Arc<Link>>>,
    limits: eio_session::Limits,
    client_script: Option<PathBuf>,
}

/// Whether a request is for the socket.io door.
pub fn is_socketio_path(path: &str) -> bool {
    path == "/socket.io" || path.starts_with("/socket.io/")
}

impl SioDoor {
    /// `limits` for every session; at most `max_sessions` (0: any number), `max_per_address`
    /// from one address: the client caps, which a session counts against as well.
    pub fn new(
        limits: eio_session::Limits,
        registry: RegistryLimits,
        client_script: Option<PathBuf>,
    ) -> SioDoor {
        SioDoor {
            registry: Mutex::new(Registry::new(registry)),
            limits,
            client_script,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry<Arc<Link>>> {
        // Every update of the registry is one call: a poisoned lock is still sound.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, sid: &str) -> Option<Arc<Link>> {
        self.registry().get(sid).cloned()
    }

    /// Runs the sweep every `SWEEP_INTERVAL` until `stopping` is set (and this thread unparked).
    pub fn sweep_until_stopped(&self, stopping: &AtomicBool, events: &Sender<Event>) {
        while !stopping.load(Relaxed) {
            self.sweep(Instant::now(), events);
            thread::park_timeout(SWEEP_INTERVAL);
        }
    }

    /// Runs every polling session's clock; forgets the ended sessions, telling the dispatcher
    /// their clients left.
    fn sweep(&self, now: Instant, events: &Sender<Event>) {
        let mut ended = Vec::new();
        self.registry().retain(|_, link| match link.tick(now) {
            Some(reason) => {
                ended.push((link.clone(), reason));
                false
            }
            None => true,
        });
        for (link, reason) in ended {
            link.leave(format!("socket.io session ended: {reason:?}"), events);
        }
    }

    /// Shutdown: ends every session, so the polls waiting are answered at once.
    pub fn close_all(&self) {
        self.registry().retain(|_, link| {
            link.close(CloseReason::Server);
            true
        });
    }
}

/// Answers one request for `/socket.io/...`.
pub fn serve(
    door: &Door<'_>,
    stream: &TcpStream,
    request: &Request,
    buffered: &mut Vec<u8>,
    ticket: &mut Ticket,
) -> Next {
    let reply = Reply {
        door,
        stream,
        request,
    };
    if request.path() == CLIENT_SCRIPT_PATH {
        return reply.client_script(&door.sio.client_script);
    }
    if request.path().trim_end_matches('/') != "/socket.io" {
        return reply.text(
            404,
            "no such socket.io resource; the endpoint is /socket.io/\n",
        );
    }
    if let Err(refusal) = handshake::check_origin(request, door.policy) {
        return reply.refused(&refusal);
    }
    let query = match engineio::parse_query(request.query()) {
        Ok(query) => query,
        Err(e) => return reply.error(&e),
    };
    let method = request.method.as_str();
    match (query.transport, query.sid, method) {
        (Transport::WebSocket, sid, _) => websocket(&reply, sid, ticket),
        (Transport::Polling, None, "GET") => open_polling(&reply),
        (Transport::Polling, None, _) => reply.error(&EioError::BadHandshakeMethod),
        (Transport::Polling, Some(sid), "GET") => match door.sio.get(&sid) {
            Some(link) => poll(&reply, &link),
            None => reply.error(&EioError::UnknownSid),
        },
        (Transport::Polling, Some(sid), "POST") => match door.sio.get(&sid) {
            Some(link) => post(&reply, &link, buffered),
            None => reply.error(&EioError::UnknownSid),
        },
        _ => reply.text(405, "socket.io polling is GET and POST\n"),
    }
}

/// A new polling session: a client slot, a registry entry, and its `open` packet.
fn open_polling(reply: &Reply<'_>) -> Next {
    let door = reply.door;
    let ip = reply.request.client_ip(door.policy.trusted_proxy);
    let slot = match door.admission.client_slot(ip) {
        Ok(slot) => slot,
        Err(refusal) => return reply.refused(&refusal),
    };
    let new = NewLink {
        id: door.next_id(),
        ip,
        query: reply.request.query(),
        slot: Some(slot),
        now: Instant::now(),
    };
    match register(door, ip, Transport::Polling, new) {
        Ok(link) => match link.take_open() {
            Some(open) => reply.ok(open.as_bytes()),
            None => reply.error(&EioError::SessionClosed),
        },
        Err(e) => reply.error(&e),
    }
}

/// Stores a new link under a fresh session id.
fn register(
    door: &Door<'_>,
    ip: IpAddr,
    transport: Transport,
    new: NewLink<'_>,
) -> Result<Arc<Link>, EioError> {
    let env = door.env;
    let limits = door.sio.limits;
    let mut registry = door.sio.registry();
    let sid = registry.insert_with(ip, |sid| Link::open(sid, transport, new, limits, &env))?;
    registry.get(&sid).cloned().ok_or(EioError::UnknownSid)
}

/// The long poll: waits up to a ping interval for packets (the server's ping comes within it).
fn poll(reply: &Reply<'_>, link: &Link) -> Next {
    match link.poll(reply.door.sio.limits.ping_interval) {
        Ok(body) => {
            let next = reply.ok(body.as_bytes());
            if let Next::Http { keep_open: false } = next {
                link.abandon_poll();
            }
            next
        }
        Err(e) => reply.error(&e),
    }
}

/// The client's packets, in a body of at most `maxPayload` bytes.
fn post(reply: &Reply<'_>, link: &Link, buffered: &mut Vec<u8>) -> Next {
    let door = reply.door;
    let length = match reply.request.content_length() {
        Ok(length) => length,
        Err(why) => return reply.close_with(400, why),
    };
    let deadline = Instant::now() + door.http_timeout;
    if length > door.sio.limits.max_payload {
        link.close(CloseReason::BadPacket);
        if length <= request::DRAIN_LIMIT_BYTES {
            // Read first, so the client gets the 413 instead of a connection reset.
            request::skip_body(reply.stream, buffered, length, deadline);
        }
        let error = EioError::PayloadTooLarge(door.sio.limits.max_payload);
        return reply.close_with(413, &error.json_body());
    }
    let Ok(body) = request::read_body(reply.stream, buffered, length, deadline) else {
        return Next::Http { keep_open: false };
    };
    // Reading is rate-limited as a session's is, by not reading: the answer (and so the
    // client's next POST) waits until time pays the debt.
    let now = Instant::now();
    if let Some(paid) = link.charge_read(body.len(), now) {
        thread::sleep(paid.saturating_duration_since(now));
    }
    match link.post(&body, &door.env) {
        Ok(()) => reply.ok(b"ok"),
        Err(e) => reply.error(&e),
    }
}

/// A WebSocket for a session: a probe of a polling one (with `sid`), or a new one.
fn websocket(reply: &Reply<'_>, sid: Option<String>, ticket: &mut Ticket) -> Next {
    let (door, request) = (reply.door, reply.request);
    let accept_key = match handshake::accept_key(request) {
        Ok(key) => key,
        Err(refusal) => return reply.refused(&refusal),
    };
    let ip = request.client_ip(door.policy.trusted_proxy);
    let link = match sid {
        Some(sid) => match door.sio.get(&sid) {
            Some(link) if link.accepts_probe() => {
                ticket.leave_door(); // the session holds the client slot
                link
            }
            Some(_) => return reply.error(&EioError::TransportMismatch),
            None => return reply.error(&EioError::UnknownSid),
        },
        None => {
            if let Err(refusal) = ticket.become_client(ip) {
                return reply.refused(&refusal);
            }
            let new = NewLink {
                id: door.next_id(),
                ip,
                query: request.query(),
                slot: None,
                now: Instant::now(),
            };
            match register(door, ip, Transport::WebSocket, new) {
                Ok(link) => link,
                Err(e) => return reply.error(&e),
            }
        }
    };
    let response = handshake::switching_response(&accept_key, None);
    if !handshake::switch_protocols(reply.stream, request, &response, door.head_timeout) {
        link.websocket_ended("lost during the handshake".into(), door.env.events);
        return Next::Http { keep_open: false };
    }
    Next::WebSocket(link, ip)
}

/// How a socket.io request is answered.
struct Reply<'a> {
    door: &'a Door<'a>,
    stream: &'a TcpStream,
    request: &'a Request,
}

impl Reply<'_> {
    fn ok(&self, body: &[u8]) -> Next {
        self.send(200, "text/plain; charset=UTF-8", body, true)
    }

    fn text(&self, status: u16, body: &str) -> Next {
        self.send(status, "text/plain; charset=UTF-8", body.as_bytes(), true)
    }

    /// An answer after which the connection closes (its body, if any, was not read).
    fn close_with(&self, status: u16, body: &str) -> Next {
        self.send(status, "text/plain; charset=UTF-8", body.as_bytes(), false)
    }

    /// Engine.IO's error answer: its status, and `{"code":..,"message":..}`.
    fn error(&self, error: &EioError) -> Next {
        if let Some(count) = self.door.env.metrics.reject(Rejection::BadRequest) {
            info!(
                "socket.io request from {} refused: {error} ({count} bad requests so far)",
                self.request.peer
            );
        }
        let body = error.json_body();
        self.send(
            error.http_status(),
            "application/json",
            body.as_bytes(),
            true,
        )
    }

    /// A refusal of the WebSocket kind (origin, client caps, a bad upgrade).
    fn refused(&self, refusal: &Refusal) -> Next {
        let door = self.door;
        handshake::refuse(
            door.env.metrics,
            door.page_url,
            self.stream,
            self.request.peer,
            refusal,
        );
        Next::Http { keep_open: false }
    }

    fn client_script(&self, file: &Option<PathBuf>) -> Next {
        let Some(file) = file else {
            return self.text(
                404,
                "wschat serves no socket.io client script unless started with \
                 --socketio-client FILE (e.g. node_modules/socket.io-client/dist/socket.io.min.js)\n",
            );
        };
        match std::fs::read(file) {
            Ok(script) => self.send(200, "text/javascript; charset=UTF-8", &script, true),
            Err(e) => {
                warn!("cannot read --socketio-client {}: {e}", file.display());
                self.text(
                    404,
                    "the socket.io client script named by --socketio-client is unreadable\n",
                )
            }
        }
    }

    /// Writes a whole response within the HTTP timeout; true if the connection may serve
    /// another request.
    fn send(&self, status: u16, content_type: &str, body: &[u8], keep_open: bool) -> Next {
        let keep_open = keep_open && self.request.keep_alive();
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n{}\r\n",
            reason_phrase(status),
            body.len(),
            if keep_open {
                ""
            } else {
                "Connection: close\r\n"
            },
        );
        let head_only = self.request.method == "HEAD";
        let written = self
            .stream
            .set_write_timeout(Some(self.door.http_timeout))
            .and_then(|()| write_all(self.stream, head.as_bytes()))
            .and_then(|()| {
                if head_only {
                    Ok(())
                } else {
                    write_all(self.stream, body)
                }
            });
        Next::Http {
            keep_open: keep_open && written.is_ok(),
        }
    }
}

fn write_all(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    std::io::Write::write_all(&mut &*stream, bytes)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}
