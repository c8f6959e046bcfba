//! The front door: one blocking `std::net::TcpListener` on the one public port, whose accept loop
//! gives every connection its own thread (from the [`Pool`]: one that a finished connection left
//! parked, or a new one). That thread reads the request head (bounded in size
//! and time, [`crate::request`]) and then either upgrades it to a WebSocket ([`handshake`], then
//! the [`session`]), hands it to the socket.io door ([`sio_door`], for `/socket.io/`: polling
//! requests, or a WebSocket in socket.io's dialect), or answers it as plain HTTP ([`http`]),
//! keeping the connection for more requests while the client wants.
//!
//! This module owns the bookkeeping of connections as sockets: a handle on each so shutdown can
//! cut them, and the [`Admission`] ticket each one holds. It knows nothing of rooms or names.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, info, warn};

use crate::admission::{Admission, Ticket, Turned};
use crate::dispatcher::Event;
use crate::handshake::{self, Policy};
use crate::http::{self, HttpShared};
use crate::metrics::{Metrics, Rejection};
use crate::pool::{Job, Pool};
use crate::ratelimit::AddressBuckets;
use crate::reactor::Reactor;
use crate::request::{self, HeadError, Request};
use crate::session::{self, Env, Joining, SESSION_STACK_BYTES, Settings};
use crate::sio_door::{self, Door, Next, SioDoor};
#[cfg(feature = "tls")]
use crate::tls::{Refused, Tls};
use crate::wire::Wire;

/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Kernel receive buffer of every connection (the kernel doubles it): without a cap, Linux grows
/// it to megabytes for a client that sends faster than we read, which costs memory the process
/// does not even see.
const RECEIVE_BUFFER_BYTES: usize = 64 * 1024;
/// Kernel send buffer of every connection: without a cap, Linux grows it to megabytes for a slow
/// reader, and thousands of them reach the machine's TCP memory limit (the kernel doubles it for
/// its bookkeeping). What a WebSocket client does not take waits in its outlet instead, bounded.
const SEND_BUFFER_BYTES: usize = 128 * 1024;
/// Requests served on one keep-alive connection before it is closed: a page load needs a
/// dozen; a client looping on one connection cannot keep its thread forever.
const MAX_REQUESTS_PER_CONNECTION: usize = 1000;

/// What every connection thread shares.
pub struct Front {
    pub policy: Policy,
    pub settings: Settings,
    pub events: Sender<Event>,
    pub metrics: Arc<Metrics>,
    pub reactor: Arc<Reactor>,
    pub admission: Arc<Admission>,
    /// Chat bytes per address (see [`session::Env`]).
    pub bytes_per_address: AddressBuckets,
    pub http: HttpShared,
    /// socket.io's sessions, at `/socket.io/`.
    pub sio: SioDoor,
    /// The whole first request head must arrive within this (slowloris bound).
    pub head_timeout: Duration,
    /// A keep-alive connection's next request, and any body, must arrive within this.
    pub http_timeout: Duration,
    /// Shown to plain HTTP clients that knock on a WebSocket path (and on the TLS port).
    pub page_url: String,
    /// With `--tls-cert`: every connection starts with a TLS handshake.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<Tls>>,
    pub stopping: AtomicBool,
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, Arc<TcpStream>>>,
    /// Signalled when a connection thread ends.
    ended: Condvar,
}

impl Front {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: Policy,
        settings: Settings,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
        reactor: Arc<Reactor>,
        admission: Arc<Admission>,
        bytes_per_address: AddressBuckets,
        (http, sio): (HttpShared, SioDoor),
        (head_timeout, http_timeout): (Duration, Duration),
        page_url: String,
    ) -> Self {
        Front {
            policy,
            settings,
            events,
            metrics,
            reactor,
            admission,
            bytes_per_address,
            http,
            sio,
            head_timeout,
            http_timeout,
            page_url,
            #[cfg(feature = "tls")]
            tls: None,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            streams: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
        }
    }

    /// A fresh id for a connection or a socket.io client (the two never share one).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    /// What the socket.io door borrows.
    fn sio_door(&self) -> Door<'_> {
        Door {
            sio: &self.sio,
            env: self.env(),
            policy: &self.policy,
            admission: &self.admission,
            head_timeout: self.head_timeout,
            http_timeout: self.http_timeout,
            page_url: &self.page_url,
            ids: &self.next_id,
        }
    }

    /// What a session borrows from the server.
    pub fn env(&self) -> Env<'_> {
        Env {
            settings: &self.settings,
            bytes_per_address: &self.bytes_per_address,
            events: &self.events,
            metrics: &self.metrics,
            reactor: &self.reactor,
        }
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<u64, Arc<TcpStream>>> {
        // A panic elsewhere cannot leave the map half-updated: every update is one statement.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection threads still running (HTTP and pending handshakes included).
    pub fn live_connections(&self) -> usize {
        self.streams().len()
    }

    /// Cuts every socket: blocked reads return, blocked writes fail, threads end.
    pub fn cut_all(&self) {
        for stream in self.streams().values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Waits until every connection thread has ended, or `timeout` passes; true if all ended.
    pub fn wait_all_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut streams = self.streams();
        while !streams.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            streams = self
                .ended
                .wait_timeout(streams, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A registered socket; dropping it unregisters it and wakes [`Front::wait_all_ended`].
struct Registered<'a> {
    front: &'a Front,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.front.streams().remove(&self.id);
        // Only shutdown waits for connections to end, once `stopping` is set: before that, a
        // wake-up (a syscall, even with no one waiting) per connection would be for nobody.
        // A waiter checks the map under the same lock, so it cannot miss this removal.
        if self.front.stopping.load(Relaxed) {
            self.front.ended.notify_all();
        }
    }
}

/// Counts a connection at the door in the metrics until dropped.
struct AtDoor<'a>(&'a Metrics);

impl Drop for AtDoor<'_> {
    fn drop(&mut self) {
        self.0.handshakes_pending.fetch_sub(1, Relaxed);
    }
}

/// Accepts until [`Front::stopping`] is set (and the listener is poked with a connection).
/// An accept error (out of descriptors, most likely) pauses the loop; it never ends it.
/// Connection threads come from a [`Pool`] that lives as long as the loop: when it ends, the
/// parked threads end too.
pub fn accept_loop(listener: TcpListener, front: Arc<Front>) {
    let pool = Pool::new(SESSION_STACK_BYTES);
    let mut failures = 0u64;
    loop {
        // `accept` rather than `incoming`: it gives the peer's address, so no `getpeername`.
        let accepted = listener.accept();
        if front.stopping.load(Relaxed) {
            break;
        }
        match accepted {
            Ok((stream, peer)) => admit(&front, &pool, stream, peer),
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    warn!("accept failed ({failures} times so far): {e}");
                }
                thread::sleep(ACCEPT_ERROR_PAUSE);
            }
        }
    }
    debug!("listener stopped");
}

/// What every connection's socket gets before anything is read: its kernel buffers capped (what
/// a client may push into the kernel, and what a slow reader leaves there), and no Nagle delay
/// (whole frames are written at once). Set once on the listening socket, before it listens
/// (`bind` in lib.rs): Linux copies these into every socket it accepts (a test below checks
/// it), which saves three system calls a connection.
pub(crate) fn set_socket_options(socket: socket2::SockRef<'_>) -> std::io::Result<()> {
    socket.set_recv_buffer_size(RECEIVE_BUFFER_BYTES)?;
    socket.set_send_buffer_size(SEND_BUFFER_BYTES)?;
    socket.set_tcp_nodelay(true)
}

/// Gives an accepted connection a thread, or turns it away at once (on this thread, without
/// blocking: the accept loop never waits on a client).
fn admit(front: &Arc<Front>, pool: &Pool, stream: TcpStream, peer: SocketAddr) {
    let ticket = match front.admission.admit(peer.ip(), Instant::now()) {
        Ok(ticket) => ticket,
        Err(turned) => return turn_away(front, &stream, peer, turned),
    };
    let id = front.next_id();
    let stream = Arc::new(stream);
    // Register before the hand-off, so shutdown never misses a socket.
    front.streams().insert(id, stream.clone());
    front.metrics.handshakes_pending.fetch_add(1, Relaxed);
    let thread_front = front.clone();
    let job = Job {
        name: format!("conn-{id}"),
        run: Box::new(move || {
            let front = &*thread_front;
            let registered = Registered { front, id };
            let at_door = AtDoor(&front.metrics);
            if catch_unwind(AssertUnwindSafe(|| {
                connection(front, id, stream, peer, ticket, at_door)
            }))
            .is_err()
            {
                log::error!("connection {id} from {peer}: its thread panicked; cleaned up");
            }
            drop(registered);
        }),
    };
    if let Err(e) = pool.run(job) {
        warn!("cannot start a thread for {peer}: {e}");
        front.metrics.handshakes_pending.fetch_sub(1, Relaxed);
        front.streams().remove(&id);
    }
}

/// Tells a turned-away client why in one short non-blocking write (if its socket takes it),
/// logs the refusal (once a minute per kind at most: see [`Metrics::reject`]), and closes.
fn turn_away(front: &Front, stream: &TcpStream, peer: SocketAddr, turned: Turned) {
    let logged = front.metrics.reject(match turned {
        Turned::Connections => Rejection::TooManyConnections,
        Turned::AtDoor | Turned::AtDoorFromAddress => Rejection::TooManyPending,
        Turned::Rate => Rejection::ConnectionRate,
    });
    if let Some(count) = logged {
        warn!("turned away a connection from {peer}: {turned} ({count} of this kind so far)");
    }
    let body = format!("{turned}; try again shortly\n");
    let response =
        handshake::status_response("503 Service Unavailable", "Retry-After: 1\r\n", &body);
    let _ = stream.set_nonblocking(true);
    let _ = handshake::send(stream, &response);
    let _ = stream.shutdown(Shutdown::Both);
}

/// One connection's whole life: requests until it becomes a WebSocket or ends. The TLS
/// handshake (if any) and the first request head share one deadline.
fn connection(
    front: &Front,
    id: u64,
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    mut ticket: Ticket,
    at_door: AtDoor<'_>,
) {
    let deadline = Instant::now() + front.head_timeout.min(front.http_timeout);
    let Some(wire) = open_wire(front, stream, peer, deadline) else {
        return;
    };
    if let Some((joining, leftover)) = at_the_door(front, id, &wire, peer, &mut ticket, deadline) {
        drop(at_door);
        run_session(front, id, wire, peer, joining, leftover);
    }
}

/// The connection's bytes: plain, or (with `--tls-cert`) TLS once its handshake is done by
/// `deadline`. None if the handshake failed (answered, counted and logged).
#[cfg(feature = "tls")]
fn open_wire(
    front: &Front,
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    deadline: Instant,
) -> Option<Wire> {
    let Some(tls) = &front.tls else {
        return Some(Wire::plain(stream));
    };
    match tls.accept(stream.clone(), deadline) {
        Ok(wire) => Some(wire),
        Err(refused) => {
            tls_failed(front, Wire::plain(stream), peer, refused, deadline);
            None
        }
    }
}

#[cfg(not(feature = "tls"))]
fn open_wire(_: &Front, stream: Arc<TcpStream>, _: SocketAddr, _: Instant) -> Option<Wire> {
    Some(Wire::plain(stream))
}

/// A TLS handshake that failed: plain HTTP gets a plain `400` saying to use https (after its
/// head is read, so the answer is not lost in a reset); the rest is counted and logged.
#[cfg(feature = "tls")]
fn tls_failed(front: &Front, plain: Wire, peer: SocketAddr, refused: Refused, deadline: Instant) {
    let kind = match refused {
        Refused::Closed => return,
        Refused::Io(ref e) => return debug!("connection from {peer}: {e}"),
        Refused::PlainHttp => Rejection::TlsPlainHttp,
        Refused::Timeout => Rejection::Timeout,
        Refused::Truncated | Refused::Tls(_) => Rejection::TlsHandshake,
    };
    if let Some(count) = front.metrics.reject(kind) {
        info!("dropped a connection from {peer}: {refused} ({count} of this kind so far)");
    }
    if matches!(refused, Refused::PlainHttp) {
        let _ = request::read_head(&plain, peer, &mut Vec::new(), deadline);
        let body = format!("this port speaks TLS: use {}\n", front.page_url);
        let response = handshake::status_response("400 Bad Request", "", &body);
        let _ = plain.set_write_timeout(Some(front.head_timeout));
        let _ = handshake::send(&plain, &response);
    }
    let _ = plain.shutdown(Shutdown::Both);
}

/// Serves requests until one asks for a WebSocket (checked, answered `101`, and returned with the
/// bytes read past it: a chat client, or a socket.io session's) or the connection ends. Never
/// inlined: the requests, their buffers and the HTTP answers' frames are gone before the session
/// starts (an idle connection's memory is mostly what its thread keeps).
#[inline(never)]
fn at_the_door(
    front: &Front,
    id: u64,
    stream: &Wire,
    peer: SocketAddr,
    ticket: &mut Ticket,
    mut deadline: Instant,
) -> Option<(Joining, Vec<u8>)> {
    let mut buffered = Vec::new();
    for served in 0..MAX_REQUESTS_PER_CONNECTION {
        let request = match request::read_head(stream, peer, &mut buffered, deadline) {
            Ok(request) => request,
            Err(e) => {
                head_failed(front, stream, peer, e, served);
                return None;
            }
        };
        debug!("request from {peer}:\n{}", request_log(&request));
        let keep_open = if sio_door::is_socketio_path(request.path()) {
            match sio_door::serve(&front.sio_door(), stream, &request, &mut buffered, ticket) {
                Next::Http { keep_open } => keep_open,
                Next::WebSocket(link, ip) => {
                    buffered.shrink_to_fit();
                    return Some((Joining::socketio(id, ip, link), buffered));
                }
            }
        } else if handshake::is_chat_path(request.path()) || handshake::is_upgrade(&request) {
            let upgrade = check_upgrade(front, stream, &request, ticket)?;
            buffered.shrink_to_fit();
            return Some((Joining::chat(id, upgrade), buffered));
        } else {
            http::serve(
                &front.http,
                stream,
                &request,
                &mut buffered,
                front.http_timeout,
            )
        };
        if !keep_open || front.stopping.load(Relaxed) {
            break;
        }
        deadline = Instant::now() + front.http_timeout;
    }
    let _ = stream.shutdown(Shutdown::Both);
    None
}

/// The head could not be read: answer what deserves an answer, log what deserves a line.
fn head_failed(front: &Front, stream: &Wire, peer: SocketAddr, e: HeadError, served: usize) {
    match e {
        HeadError::Closed => {}
        HeadError::Timeout if served > 0 => {} // an idle keep-alive connection: the usual end
        HeadError::Timeout => {
            if let Some(count) = front.metrics.reject(Rejection::Timeout) {
                info!(
                    "dropped a connection from {peer}: no complete request within {:?} \
                     ({count} of this kind so far)",
                    front.head_timeout
                );
            }
        }
        HeadError::TooLarge => {
            if let Some(count) = front.metrics.reject(Rejection::BadRequest) {
                info!("refused a request from {peer}: {e} ({count} bad requests so far)");
            }
            let body = format!("{e}\n");
            let response =
                handshake::status_response("431 Request Header Fields Too Large", "", &body);
            let _ = handshake::send(stream, &response);
        }
        HeadError::Malformed(why) => {
            if let Some(count) = front.metrics.reject(Rejection::BadRequest) {
                info!("refused a request from {peer}: {e} ({count} bad requests so far)");
            }
            let response =
                handshake::status_response("400 Bad Request", "", &format!("bad request: {why}\n"));
            let _ = handshake::send(stream, &response);
        }
        HeadError::Io(e) => debug!("connection from {peer} lost: {e}"),
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A request for a WebSocket endpoint: checks it, takes a client slot, and answers 101, or
/// answers the refusal. Never inlined: its buffers then leave the stack before the session
/// starts (an idle connection's memory is mostly its stack).
#[inline(never)]
fn check_upgrade(
    front: &Front,
    stream: &Wire,
    request: &Request,
    ticket: &mut Ticket,
) -> Option<handshake::Upgrade> {
    let upgrade = handshake::check(request, &front.policy)
        .and_then(|upgrade| ticket.become_client(upgrade.arrival.ip).map(|()| upgrade));
    match upgrade {
        Ok(upgrade) => {
            let response = handshake::accept_response(&upgrade);
            handshake::switch_protocols(stream, request, &response, front.head_timeout)
                .then_some(upgrade)
        }
        Err(refusal) => {
            handshake::refuse(
                &front.metrics,
                &front.page_url,
                stream,
                request.peer,
                &refusal,
            );
            None
        }
    }
}

/// The connection is a WebSocket client now: hand it to its session.
fn run_session(
    front: &Front,
    id: u64,
    wire: Wire,
    peer: SocketAddr,
    joining: Joining,
    leftover: Vec<u8>,
) {
    let reason = session::serve(wire, leftover, joining, front.env());
    debug!("connection {id} from {peer} ended: {reason}");
}

/// A request head as the debug log shows it.
fn request_log(request: &Request) -> String {
    let mut text = format!(
        "{} {} HTTP/1.{}",
        request.method, request.target, request.minor_version
    );
    for (name, value) in &request.headers {
        text.push_str(&format!("\n{name}: {value}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`set_socket_options`] relies on: an accepted socket has the listening socket's.
    #[test]
    fn accepted_sockets_inherit_the_listening_sockets_options() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_socket_options(socket2::SockRef::from(&listener)).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let socket = socket2::SockRef::from(&accepted);
        // The kernel doubles what it is given, for its bookkeeping.
        assert_eq!(socket.recv_buffer_size().unwrap(), 2 * RECEIVE_BUFFER_BYTES);
        assert_eq!(socket.send_buffer_size().unwrap(), 2 * SEND_BUFFER_BYTES);
        assert!(socket.tcp_nodelay().unwrap());
    }
}
