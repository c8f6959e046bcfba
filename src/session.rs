//! One client connection after its handshake: one thread, which owns the WebSocket state.
//!
//! ```text
//!   socket --blocking read--> [session thread] --Event--> dispatcher
//!   socket <------------- outlet <--frames-- dispatcher, and the session's own frames
//!                            `--"the socket is full"--> [reactor] --writes the rest--> socket
//! ```
//!
//! The session thread waits on its socket with a plain blocking read, as the design card has it
//! (std's `peek`, then a `read` of what came), with a receive timeout so that the keepalive ping
//! (and the check for a silent peer) comes on time. It feeds tungstenite, and hands what the
//! client asked to the dispatcher. It never waits for anything else: the dispatcher's frames and
//! its own (pongs, errors, the close) are written straight to the socket, without blocking,
//! through the client's [`Outlet`], and whatever the socket does not take at once is written by
//! the [`reactor`](crate::reactor) when there is room. A close the dispatcher asks for (too slow,
//! kicked, server shutting down) interrupts the blocked read (the outlet shuts the socket's read
//! side); the session then sends its close frame and waits, bounded, for the client's. Only those
//! last writes block, for at most `CLOSE_TIMEOUT` each. A client that stops reading lets its
//! backlog grow until the outlet calls it too slow, or until its socket has taken nothing for
//! `outlet::WRITE_TIMEOUT`. An idle connection costs no CPU between pings, and a broadcast
//! reaches a client without waking its thread at all.
//!
//! The session parses and rate-limits what the client sends ([`Gate`]; a client that sends more
//! bytes than `--rate-bytes` is simply not read for a while: its thread sleeps, and TCP makes the
//! client wait), and answers malformed input itself; everything else goes to the dispatcher. It
//! knows nothing of rooms or other clients. A socket.io client's WebSocket is a session too, in
//! socket.io's dialect: its text frames go to the [`Carried`] protocol (socket.io's link, which
//! applies the same [`Gate`]), its pings are Engine.IO's `2`, and when a polling client upgrades
//! here the session takes over the client's outlet. The session never looks inside socket.io's
//! packets.
//!
//! On the echo endpoint ([`Endpoint::Echo`], `--echo`, for conformance suites) the same session
//! runs in a third dialect: what the client sends goes back to its own outlet instead of to the
//! dispatcher, text as text and binary as binary, after the same reads, gate and size limits.
//! The dispatcher never hears of an echo client.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use tungstenite::error::ProtocolError;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use crate::dispatcher::{ClientId, Event};
use crate::handshake::{Endpoint, Upgrade};
use crate::metrics::Metrics;
use crate::outlet::{self, Outlet};
use crate::protocol::{self, Arrival, ChatError, Command, Frame};
use crate::ratelimit::{AddressBuckets, FloodDetector, TokenBucket};
use crate::reactor::Reactor;
use crate::wire::{TlsSession, Wire};

/// tungstenite's read buffer per connection: small, since an idle connection keeps it; a large
/// message only takes more reads (one `recv` per turn of the session's loop, each returning at
/// once while the client's bytes wait in the socket).
const READ_BUFFER_BYTES: usize = 512;
/// Encrypted bytes a TLS session reads from its socket at once: one full TLS record.
const TLS_READ_BYTES: usize = 16 * 1024 + 256;
/// Capacity of the buffer for the session's own frames kept between flushes.
const KEEP_OUT_BUFFER_BYTES: usize = 1024;
/// At the end: how long each last write may make no progress, and how long to wait for the
/// peer's close frame after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// While waiting for the peer's close after a close request shut the socket's read side (a
/// `recv` then returns at once when nothing is there): the first pause between two looks, each
/// next one twice as long. A peer slow to answer then costs 7 wake-ups within `CLOSE_TIMEOUT`,
/// not 100: at a shutdown every session waits at once, and 10,000 threads looking every 10 ms
/// kept both cores busy for seconds.
const CLOSE_POLL: Duration = Duration::from_millis(10);
/// How late a receive timeout may let the session wake for its next ping: the timeout is set
/// again only once it is this much out of date, not before every wait (a system call; at 200
/// messages a second, a slack of 10 ms still cost one every other message).
const TIMER_SLACK: Duration = Duration::from_millis(50);
/// A new session gives back the stack pages its thread touched before it (the handshake, and
/// the connection this pooled thread served last) once it is this old, at its first wait that
/// ends after that: an idle connection is trimmed within about a second, while a short one
/// (most of a reconnect storm, a load test's churn) ends before and leaves the pages warm for
/// the next connection on its thread, instead of faulting them in again (3 page faults a cycle).
const TRIM_AFTER: Duration = Duration::from_secs(1);
/// Typing events accepted per second (and at once); the excess is dropped silently.
const TYPING_RATE: f64 = 2.0;
/// Nick and join commands per second, and at once.
const CONTROL_RATE: f64 = 1.0;
const CONTROL_BURST: f64 = 5.0;
/// Chat text on its way to the dispatcher, from all sessions together: past it, messages are
/// refused (`busy`) instead of queued, so a dispatcher slowed by a slow disk never lets the
/// queue between them grow past this many bytes (the queue's 4,096 events bound the count).
pub const INBOUND_BUDGET_BYTES: u64 = 8 << 20;
/// What a chat message costs against the byte rates beyond its text: the JSON frame around it
/// (type, id, room, sender, time), which every recipient reads too.
pub const MESSAGE_OVERHEAD_BYTES: usize = 160;
/// Stack of a connection thread: the handshake, parsing, tungstenite and logging fit well within
/// it (tests send the deepest and largest inputs through real connections). Only the pages
/// touched count towards memory, and a parked session gives back the deeper ones (`stack`).
pub const SESSION_STACK_BYTES: usize = 256 * 1024;

/// What a session needs from the server.
#[derive(Clone, Debug)]
pub struct Settings {
    pub rate: f64,
    pub burst: f64,
    pub ping_interval: Duration,
    pub max_message_bytes: usize,
    /// What may wait for the client before it is too slow.
    pub backlog: outlet::Bounds,
    /// Chat bytes per second (JSON-encoded, as recipients read them) per connection.
    pub rate_bytes: f64,
}

/// Who is joining, from the handshake.
pub struct Joining {
    pub id: ClientId,
    /// Its address, and for a chat client the room, name and resume point it asks for.
    pub arrival: Arrival,
    /// A socket.io client's session (its WebSocket transport): it joins the dispatcher at its
    /// socket.io CONNECT, not here.
    pub link: Option<Arc<dyn Carried>>,
    /// `/echo`: the dispatcher never hears of it.
    pub echo: bool,
}

impl Joining {
    /// A chat client, from its accepted handshake.
    pub fn chat(id: ClientId, upgrade: Upgrade) -> Joining {
        Joining {
            id,
            arrival: upgrade.arrival,
            link: None,
            echo: upgrade.endpoint == Endpoint::Echo,
        }
    }

    /// A socket.io session's WebSocket from `ip` (its room and name come with its CONNECT).
    pub fn socketio(id: ClientId, ip: IpAddr, link: Arc<dyn Carried>) -> Joining {
        Joining {
            id,
            arrival: Arrival::new(ip),
            link: Some(link),
            echo: false,
        }
    }
}

/// Why a session ended.
enum Stop {
    /// The peer closed or vanished: nothing more to send.
    Gone(String),
    /// We end it: send a close frame with this code and reason, and wait for the peer's.
    Close(CloseCode, &'static str),
    /// The peer broke the protocol: send a close frame, but read nothing more (tungstenite's
    /// reader is not to be used after such an error).
    Broken(CloseCode, &'static str),
}

/// What a session borrows from the server.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    pub settings: &'a Settings,
    /// Chat bytes per address, shared by every session from that address.
    pub bytes_per_address: &'a AddressBuckets,
    pub events: &'a Sender<Event>,
    pub metrics: &'a Arc<Metrics>,
    pub reactor: &'a Arc<Reactor>,
}

/// Serves one upgraded connection until it ends; returns the reason, for the log.
pub fn serve(wire: Wire, leftover: Vec<u8>, joining: Joining, env: Env<'_>) -> String {
    let (stream, tls) = wire.into_parts();
    let id = joining.id;
    let watch = env.reactor.watch(id, stream.clone());
    let outlet = Arc::new(Outlet::new(
        (stream.clone(), tls.clone()),
        watch,
        env.metrics.clone(),
        env.settings.backlog,
    ));
    Metrics::add(&env.metrics.connections_total, 1);
    Metrics::add(&env.metrics.connections_now, 1);
    // Counts the connection out and tells the dispatcher, however the session ends.
    let mut leave = LeaveOnDrop {
        id,
        metrics: env.metrics.clone(),
        events: env.events.clone(),
        link: joining.link.clone(),
        echo: joining.echo,
        reason: "internal error".into(),
    };
    let reason = if !join(&joining, &outlet, &env) {
        "server shutting down".to_owned()
    } else {
        let conn = Conn::new(stream.clone(), tls, outlet);
        let dialect = Dialect::of(joining, env.settings);
        Session::boxed(id, dialect, conn, leftover, &env).run()
    };
    leave.reason = reason.clone();
    let _ = stream.shutdown(Shutdown::Both);
    reason
}

/// Tells the dispatcher a raw client arrived; a socket.io client's WebSocket that opens a
/// session of its own starts with Engine.IO's `open` packet instead (it joins at its CONNECT).
/// False if the server is shutting down.
fn join(joining: &Joining, outlet: &Arc<Outlet>, env: &Env<'_>) -> bool {
    if joining.echo {
        return true;
    }
    if let Some(link) = &joining.link {
        if let Some(open) = link.attach(outlet) {
            outlet.send_as_is(&[open]);
        }
        return true;
    }
    let connect = Event::Connect {
        id: joining.id,
        arrival: joining.arrival.clone(),
        outlet: outlet.clone(),
    };
    env.events.send(connect).is_ok()
}

/// Tells the dispatcher the client left, however the session ends (a panic included), so no
/// ghost stays in presence.
struct LeaveOnDrop {
    id: ClientId,
    metrics: Arc<Metrics>,
    events: Sender<Event>,
    /// A socket.io client's link, which knows whether this WebSocket was its transport.
    link: Option<Arc<dyn Carried>>,
    echo: bool,
    reason: String,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.metrics.connections_now.fetch_sub(1, Relaxed);
        let reason = std::mem::take(&mut self.reason);
        match &self.link {
            Some(link) => link.ended(reason, &self.events),
            None if self.echo => {} // the dispatcher never knew it
            None => {
                let _ = self.events.send(Event::Disconnect {
                    id: self.id,
                    reason,
                });
            }
        }
    }
}

/// What one client may send, for both dialects: its chat bytes against its address's budget
/// (charged before parsing), its message, typing and control rates, the budget of chat text on
/// its way to the dispatcher, and the count of refusals that makes it a flood.
pub struct Gate {
    ip: IpAddr,
    messages: TokenBucket,
    typing: TokenBucket,
    control: TokenBucket,
    flood: FloodDetector,
}

impl Gate {
    pub fn new(ip: IpAddr, settings: &Settings, now: Instant) -> Gate {
        Gate {
            ip,
            messages: TokenBucket::new(settings.rate, settings.burst, now),
            typing: TokenBucket::new(TYPING_RATE, TYPING_RATE, now),
            control: TokenBucket::new(CONTROL_RATE, CONTROL_BURST, now),
            flood: FloodDetector::default(),
        }
    }

    /// Charges a text frame to the address's chat byte budget, as recipients would read it:
    /// text over the budget costs a byte scan, not a parse.
    pub fn charge(&self, text: &str, env: &Env<'_>, now: Instant) -> Result<(), ChatError> {
        let cost = (protocol::encoded_len(text) + MESSAGE_OVERHEAD_BYTES) as f64;
        if !env.bytes_per_address.try_take(self.ip, cost, now) {
            Metrics::add(&env.metrics.rate_limited, 1);
            return Err(ChatError::TooManyBytes);
        }
        Ok(())
    }

    /// Whether `command` goes to the dispatcher: `Ok(true)` it does (its text now counts as
    /// inbound), `Ok(false)` it is dropped silently (typing indicators are best effort).
    pub fn admit(
        &mut self,
        command: &Command,
        metrics: &Metrics,
        now: Instant,
    ) -> Result<bool, ChatError> {
        if matches!(command, Command::Message { .. })
            && metrics.inbound_bytes.load(Relaxed) > INBOUND_BUDGET_BYTES
        {
            return Err(ChatError::Busy);
        }
        let allowed = match command {
            Command::Message { .. } => self.messages.try_take(now),
            Command::Typing { .. } => {
                if !self.typing.try_take(now) {
                    return Ok(false);
                }
                true
            }
            Command::Nick { .. } | Command::Join { .. } => self.control.try_take(now),
        };
        if !allowed {
            Metrics::add(&metrics.rate_limited, 1);
            return Err(ChatError::RateLimited);
        }
        metrics
            .inbound_bytes
            .fetch_add(command.held_bytes() as u64, Relaxed);
        Ok(true)
    }

    /// Whether an echoed message of `len` bytes goes back: charged like a chat message, against
    /// the address's byte budget and the message rate.
    pub fn admit_echo(&mut self, len: usize, env: &Env<'_>, now: Instant) -> Result<(), ChatError> {
        let cost = (len + MESSAGE_OVERHEAD_BYTES) as f64;
        let refused = if !env.bytes_per_address.try_take(self.ip, cost, now) {
            ChatError::TooManyBytes
        } else if !self.messages.try_take(now) {
            ChatError::RateLimited
        } else {
            return Ok(());
        };
        Metrics::add(&env.metrics.rate_limited, 1);
        Err(refused)
    }

    /// Counts a refusal; true once there were so many so fast that the client is flooding (and
    /// is to be closed).
    pub fn flooding(&mut self, id: ClientId, now: Instant) -> bool {
        let flooding = self.flood.reject(now);
        if flooding {
            log::warn!(
                "client {id}: flooding ({} rejected messages within 10 s), closing",
                crate::ratelimit::FLOOD_REJECTIONS
            );
        }
        flooding
    }
}

/// A protocol carried in a session's text frames in place of wschat's own (socket.io's, whose
/// link implements it): the session does the WebSocket's I/O and keeps its limits on bytes and
/// time; the carried protocol says what each frame means.
pub trait Carried: Send + Sync {
    /// The session starts carrying it, with `outlet` as its own: the frame to send first, if any.
    fn attach(&self, outlet: &Arc<Outlet>) -> Option<Frame>;
    /// One text frame from the client.
    fn heard(&self, text: &str, env: &Env<'_>, now: Instant) -> Heard;
    /// The client's outlet, which the session takes over on [`Heard::Upgraded`].
    fn outlet(&self) -> Option<Arc<Outlet>>;
    /// What waited for the client's old way when it upgraded, to send first.
    fn take_waiting(&self) -> Vec<Frame>;
    /// The keepalive ping, once this WebSocket is the client's transport.
    fn ping(&self) -> Option<Frame>;
    /// The session ended, for `reason`.
    fn ended(&self, reason: String, events: &Sender<Event>);
}

/// What a frame of a [`Carried`] protocol asks of the session.
pub enum Heard {
    Nothing,
    /// Write this on the WebSocket now (socket.io's `3probe`).
    Reply(Frame),
    /// The client moved to this WebSocket: take its outlet over.
    Upgraded,
    /// Close the WebSocket normally (the client closed, or a limit ended its session).
    End(&'static str),
    /// The client broke the protocol: close the WebSocket with 1002.
    Broken(&'static str),
}

/// How a session reads its client's text frames.
enum Dialect {
    /// wschat's own protocol: each frame a command, limited by the session's gate.
    Raw(Gate),
    /// Engine.IO packets of a socket.io client; its link parses, limits and forwards them.
    SocketIo(Arc<dyn Carried>),
    /// `/echo`: every message goes back as it came, limited by the same gate.
    Echo(Gate),
}

impl Dialect {
    fn of(joining: Joining, settings: &Settings) -> Dialect {
        match joining.link {
            Some(link) => Dialect::SocketIo(link),
            None if joining.echo => {
                Dialect::Echo(Gate::new(joining.arrival.ip, settings, Instant::now()))
            }
            None => Dialect::Raw(Gate::new(joining.arrival.ip, settings, Instant::now())),
        }
    }
}

struct Session<'a> {
    id: ClientId,
    /// The WebSocket over [`Conn`], which holds the socket and the client's outlet.
    ws: WebSocket<Conn>,
    env: Env<'a>,
    dialect: Dialect,
    events: Sender<Event>,
    metrics: Arc<Metrics>,
    ping_interval: Duration,
    next_ping: Instant,
    last_heard: Instant,
    /// Bytes read from the socket: in debt, the session stops reading until time pays it, and
    /// TCP makes the client wait (it costs the server nothing while it waits).
    bytes: TokenBucket,
    /// Reading is paused until then (see `bytes`).
    read_paused_until: Option<Instant>,
    /// Commands parsed from the current read, not yet sent to the dispatcher.
    commands: Vec<Command>,
    /// When the stack pages the session did not touch go back (see [`TRIM_AFTER`]); none once
    /// they did.
    trim_at: Option<Instant>,
}

impl<'a> Session<'a> {
    /// On the heap, and built in a frame of its own that is gone before the session runs: an
    /// idle connection's memory is mostly the stack its thread keeps.
    #[inline(never)]
    fn boxed(
        id: ClientId,
        dialect: Dialect,
        conn: Conn,
        leftover: Vec<u8>,
        env: &Env<'a>,
    ) -> Box<Session<'a>> {
        let settings = env.settings;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0) // Conn buffers; we flush once per read
            .max_message_size(Some(settings.max_message_bytes))
            .max_frame_size(Some(settings.max_message_bytes));
        let now = Instant::now();
        Box::new(Session {
            id,
            ws: WebSocket::from_partially_read(conn, leftover, Role::Server, Some(config)),
            env: *env,
            dialect,
            events: env.events.clone(),
            metrics: env.metrics.clone(),
            ping_interval: settings.ping_interval,
            next_ping: now + settings.ping_interval,
            last_heard: now,
            bytes: TokenBucket::new(
                settings.rate_bytes,
                crate::ratelimit::byte_burst(settings.rate_bytes, settings.max_message_bytes),
                now,
            ),
            read_paused_until: None,
            commands: Vec::new(),
            trim_at: Some(now + TRIM_AFTER),
        })
    }

    /// The client's outlet: its way out, and where a close request is found.
    fn outlet(&self) -> &Arc<Outlet> {
        &self.ws.get_ref().outlet
    }

    fn run(&mut self) -> String {
        let stop = self.event_loop();
        self.outlet().shut(); // no frames from the dispatcher after our close frame
        match stop {
            Stop::Gone(reason) => {
                // tungstenite answers a client's close frame into our buffer, then reports the
                // connection closed before flushing: send the answer.
                let _ = self.ws.get_mut().flush();
                let _ = self.outlet().finish(CLOSE_TIMEOUT);
                reason
            }
            Stop::Close(code, reason) => {
                if self.send_close(code, reason) {
                    self.await_peer_close();
                }
                format!("closed by server: {} {reason}", u16::from(code))
            }
            Stop::Broken(code, reason) => {
                self.send_close(code, reason);
                format!("closed by server: {} {reason}", u16::from(code))
            }
        }
    }

    fn event_loop(&mut self) -> Stop {
        // Frames the client sent right behind its handshake are already in tungstenite's buffer.
        if let Err(stop) = self.read_frames() {
            return stop;
        }
        loop {
            if let Err(stop) = self.turn() {
                return stop;
            }
        }
    }

    /// One turn: waits until the client sent something (or a ping is due, or a close is asked)
    /// and reads it, or sleeps while reads are paused; then does what is due.
    fn turn(&mut self) -> Result<(), Stop> {
        match self.read_paused_until {
            Some(until) if Instant::now() < until => self.pause(until.min(self.next_ping)),
            _ => {
                self.read_paused_until = None;
                let wake = self
                    .trim_at
                    .map_or(self.next_ping, |at| at.min(self.next_ping));
                let readable = self.ws.get_mut().wait_readable(wake);
                let readable = readable
                    .map_err(|e| Stop::Gone(format!("cannot set the receive timeout: {e}")))?;
                if readable {
                    self.read_frames()?;
                }
                self.trim_when_due();
            }
        }
        if let Some((code, reason)) = self.outlet().close_request() {
            return Err(Stop::Close(code.into(), reason));
        }
        self.keepalive()
    }

    /// Gives back the stack pages below this frame once the session is [`TRIM_AFTER`] old.
    fn trim_when_due(&mut self) {
        if self.trim_at.is_some_and(|at| Instant::now() >= at) {
            crate::stack::release_unused(); // the handshake's pages: an idle connection needs none
            self.trim_at = None;
        }
    }

    /// Reads nothing until `until`; a close request wakes the thread (the outlet unparks it).
    fn pause(&self, until: Instant) {
        let now = Instant::now();
        if now < until && self.outlet().close_request().is_none() {
            thread::park_timeout(until - now); // may return early: the next turn looks again
        }
    }

    /// Reads once from the socket (which has bytes) and handles every complete frame. In a
    /// frame of its own: tungstenite's reading goes deeper than the idle wait, and its stack
    /// pages are not to be kept while the session waits.
    #[inline(never)]
    fn read_frames(&mut self) -> Result<(), Stop> {
        let result = self.read_available();
        let got = self.ws.get_mut().next_turn();
        if got > 0 {
            let now = Instant::now();
            self.last_heard = now;
            Metrics::add(&self.metrics.bytes_in, got);
            self.bytes.charge(got as f64, now);
            self.read_paused_until = self.bytes.debt_paid_at();
        }
        self.send_commands()?; // what was accepted before an error still counts
        result?;
        self.flush()
    }

    fn read_available(&mut self) -> Result<(), Stop> {
        loop {
            match self.ws.read() {
                Ok(message @ (Message::Text(_) | Message::Binary(_)))
                    if matches!(self.dialect, Dialect::Echo(_)) =>
                {
                    self.echo_back(message)?
                }
                Ok(Message::Text(text)) => self.on_text(&text)?,
                Ok(Message::Binary(_)) if matches!(self.dialect, Dialect::SocketIo(_)) => {
                    return Err(Stop::Broken(
                        CloseCode::Unsupported,
                        "binary packets are not supported",
                    ));
                }
                Ok(Message::Binary(_)) => self.reject(ChatError::Unsupported)?,
                Ok(_) => {} // ping: tungstenite queued the pong; pong; close: answered, next read ends
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(stop_for(e)),
            }
        }
    }

    fn on_text(&mut self, text: &str) -> Result<(), Stop> {
        let now = Instant::now();
        let env = self.env;
        let verdict = match &mut self.dialect {
            Dialect::Raw(gate) => gate.charge(text, &env, now).and_then(|()| {
                let command = protocol::parse_command(text)?;
                Ok(gate.admit(&command, env.metrics, now)?.then_some(command))
            }),
            Dialect::SocketIo(link) => {
                let heard = link.heard(text, &env, now);
                return self.on_heard(heard);
            }
            Dialect::Echo(_) => return self.echo_back(Message::text(text)),
        };
        match verdict {
            Ok(Some(command)) => self.commands.push(command),
            Ok(None) => {}
            Err(e) => self.reject(e)?,
        }
        Ok(())
    }

    /// `/echo`: the message goes back to the client as it came, if the gate lets it.
    fn echo_back(&mut self, message: Message) -> Result<(), Stop> {
        let env = self.env;
        let Dialect::Echo(gate) = &mut self.dialect else {
            return Ok(());
        };
        match gate.admit_echo(message.len(), &env, Instant::now()) {
            Ok(()) => self.ws.write(message).map_err(stop_for),
            Err(e) => self.reject(e),
        }
    }

    /// What a socket.io client's packet asks of the session.
    fn on_heard(&mut self, heard: Heard) -> Result<(), Stop> {
        match heard {
            Heard::Nothing => Ok(()),
            Heard::Reply(frame) => self.ws.write(Message::Text(frame)).map_err(stop_for),
            Heard::Upgraded => self.take_over_outlet(),
            Heard::End(reason) => Err(Stop::Close(CloseCode::Normal, reason)),
            Heard::Broken(reason) => Err(Stop::Broken(CloseCode::Protocol, reason)),
        }
    }

    /// A polling socket.io client moved to this WebSocket: its outlet (the one the dispatcher
    /// holds) writes here from now on, and a close asked of it interrupts this session.
    fn take_over_outlet(&mut self) -> Result<(), Stop> {
        let Dialect::SocketIo(link) = &self.dialect else {
            return Ok(());
        };
        let Some(outlet) = link.outlet() else {
            return Ok(());
        };
        self.ws.flush().map_err(stop_for)?; // the `3probe` first, on the old outlet
        outlet.take_over(self.outlet(), || link.take_waiting());
        self.ws.get_mut().outlet = outlet;
        Ok(())
    }

    /// Hands the commands of one read to the dispatcher as one event: it then handles them in
    /// one batch, and every recipient gets their frames with one wake-up instead of one each.
    fn send_commands(&mut self) -> Result<(), Stop> {
        if self.commands.is_empty() {
            return Ok(());
        }
        let commands = std::mem::take(&mut self.commands);
        let event = Event::Commands {
            id: self.id,
            commands,
        };
        self.events
            .send(event)
            .map_err(|_| Stop::Close(CloseCode::Away, "server shutting down"))
    }

    /// Tells a raw client what was wrong; too many rejections too fast end the connection.
    fn reject(&mut self, error: ChatError) -> Result<(), Stop> {
        log::debug!("client {}: rejected: {error}", self.id);
        if let Dialect::Raw(gate) | Dialect::Echo(gate) = &mut self.dialect
            && gate.flooding(self.id, Instant::now())
        {
            return Err(Stop::Close(CloseCode::Policy, "flooding"));
        }
        self.ws
            .write(Message::Text(error.to_frame()))
            .map_err(stop_for)
    }

    /// Sends a ping when one is due, after checking that the client was heard since the last
    /// but one; gives back the stack pages busy moments touched.
    fn keepalive(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if now < self.next_ping {
            return Ok(());
        }
        if now.duration_since(self.last_heard) >= 2 * self.ping_interval {
            return Err(Stop::Gone(format!(
                "silent for {:?}: no pong",
                now.duration_since(self.last_heard)
            )));
        }
        self.next_ping = now + self.ping_interval;
        let ping = match &self.dialect {
            Dialect::Raw(_) | Dialect::Echo(_) => Some(Message::Ping(Default::default())),
            // Engine.IO's own ping, once the WebSocket is the session's transport (a probe
            // answered with anything but `3probe` fails).
            Dialect::SocketIo(link) => link.ping().map(Message::Text),
        };
        if let Some(ping) = ping {
            self.ws.write(ping).map_err(stop_for)?;
        }
        self.flush()?;
        crate::stack::release_unused(); // what busy moments since the last ping touched
        Ok(())
    }

    /// Hands the session's own frames to the outlet, which writes what the socket takes.
    fn flush(&mut self) -> Result<(), Stop> {
        self.ws.flush().map_err(stop_for)?;
        if self.ws.get_ref().too_slow {
            Metrics::add(&self.metrics.slow_clients_dropped, 1);
            return Err(Stop::Close(CloseCode::Policy, "too slow"));
        }
        Ok(())
    }

    /// Sends what waits and a close frame; false if the connection cannot take them.
    fn send_close(&mut self, code: CloseCode, reason: &'static str) -> bool {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        self.ws.close(Some(frame)).is_ok() && self.outlet().finish(CLOSE_TIMEOUT).is_ok()
    }

    /// Waits (bounded) for the peer's close frame, reading and dropping what comes before it,
    /// so that no unread byte makes the kernel end the connection with a reset, which could
    /// destroy our close frame before the peer reads it.
    fn await_peer_close(&mut self) {
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let mut pause = CLOSE_POLL;
        while Instant::now() < deadline {
            let conn = self.ws.get_mut();
            if conn.set_deadline(deadline).is_err() {
                return;
            }
            conn.next_turn();
            match self.ws.read() {
                Ok(_) => continue,
                // A shut read side returns at once: look again shortly.
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.ws.get_ref().read_shut {
                        thread::sleep(
                            pause.min(deadline.saturating_duration_since(Instant::now())),
                        );
                        pause *= 2;
                    }
                }
                Err(_) => return, // the peer's close arrived (or the connection broke)
            }
        }
    }
}

/// Maps a tungstenite error to how the session ends.
fn stop_for(error: WsError) -> Stop {
    match error {
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            Stop::Gone("closed by the client".into())
        }
        WsError::Capacity(_) => Stop::Broken(CloseCode::Size, "message too big"),
        WsError::Utf8(_) => Stop::Broken(CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Stop::Gone("connection dropped without a close frame".into())
        }
        WsError::Protocol(e) => {
            log::info!("protocol error: {e}");
            Stop::Broken(CloseCode::Protocol, "protocol error")
        }
        WsError::Io(e) => Stop::Gone(format!("connection lost: {e}")),
        other => Stop::Gone(format!("connection error: {other}")),
    }
}

/// The stream tungstenite sees: one `recv` per turn of the session's loop, once
/// [`Conn::wait_readable`] found bytes (a second read in the same turn says `WouldBlock`, so
/// the session hands over what it parsed before it waits again), and writes (the session's own
/// frames) that collect in a buffer `flush` hands to the outlet, behind the dispatcher's frames.
pub struct Conn {
    stream: Arc<TcpStream>,
    /// A TLS client's session: what is read is decrypted through it.
    tls: Option<TlsSession>,
    /// Encrypted bytes read but not yet taken by rustls (it takes none while plaintext waits).
    tls_left: Vec<u8>,
    outlet: Arc<Outlet>,
    out: Vec<u8>,
    /// The outlet found the backlog over its bounds when the last frames were handed to it.
    too_slow: bool,
    /// Bytes read since the session last asked.
    bytes_read: u64,
    /// This turn's `recv` is still to come.
    may_read: bool,
    /// When the receive timeout was set, and the deadline it was set for.
    timeout_set: Option<(Instant, Instant)>,
    /// A close request shut the socket's read side: reads no longer wait.
    read_shut: bool,
}

impl Conn {
    fn new(stream: Arc<TcpStream>, tls: Option<TlsSession>, outlet: Arc<Outlet>) -> Conn {
        Conn {
            stream,
            tls,
            tls_left: Vec::new(),
            outlet,
            out: Vec::new(),
            too_slow: false,
            bytes_read: 0,
            may_read: false, // the first turn reads what came with the handshake
            timeout_set: None,
            read_shut: false,
        }
    }

    /// Starts a new turn (one more `recv` allowed); returns the bytes read in the last one.
    fn next_turn(&mut self) -> u64 {
        self.may_read = true;
        std::mem::take(&mut self.bytes_read)
    }

    /// Waits until the socket has bytes, an end of stream or an error (true), or `deadline`
    /// passes (false). It only peeks: tungstenite's read that follows takes the bytes. Waiting
    /// here, near the top of the stack, rather than in a `recv` deep inside tungstenite, keeps
    /// an idle thread's stack to the pages it had when the session last gave the rest back.
    fn wait_readable(&mut self, deadline: Instant) -> io::Result<bool> {
        self.set_deadline(deadline)?;
        match self.stream.peek(&mut [0u8; 1]) {
            // A signal: the next turn waits again.
            Err(e) if timed_out(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(false),
            _ => Ok(true), // bytes, an end or an error: the read finds out which
        }
    }

    /// Makes a `recv` give up at `deadline` (to within [`TIMER_SLACK`]): sets the socket's
    /// receive timeout, unless the one set is for the same deadline and recent enough.
    fn set_deadline(&mut self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        if let Some((set_at, set_for)) = self.timeout_set
            && set_for == deadline
            && now.duration_since(set_at) < TIMER_SLACK
        {
            return Ok(());
        }
        // A zero timeout would mean "never": a deadline that passed waits one millisecond.
        let timeout = deadline.saturating_duration_since(now);
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        self.timeout_set = Some((now, deadline));
        Ok(())
    }
}

/// The error of a read that hit the socket's receive timeout (`EAGAIN` on Linux; some systems
/// say `TimedOut`).
fn timed_out(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.clone() {
            Some(tls) => self.read_tls(&tls, buf),
            None => self.recv(buf),
        }
    }
}

impl Conn {
    /// A TLS client's bytes: plaintext decrypted before first (no system call); else this
    /// turn's `recv` of encrypted bytes, made without the TLS lock (the outlet may be encrypting
    /// meanwhile) and decrypted under it. The byte rate counts encrypted bytes, as they came.
    fn read_tls(&mut self, tls: &TlsSession, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match tls.read_plain(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if !self.tls_left.is_empty() {
                let taken = tls.open(&self.tls_left)?;
                self.tls_left.drain(..taken);
                if taken == 0 || self.tls_left.is_empty() {
                    self.tls_left = Vec::new(); // an idle connection keeps no buffer
                }
                continue;
            }
            // On the stack only while reading: the session gives the pages back when idle.
            let mut raw = [0u8; TLS_READ_BYTES];
            let n = self.recv(&mut raw)?;
            let taken = tls.open(&raw[..n])?;
            if n == 0 {
                // The end of the stream: rustls says whether it was a clean one.
                return tls.read_plain(buf).or(Ok(0));
            }
            self.tls_left.extend_from_slice(&raw[taken..n]);
        }
    }

    /// This turn's one `recv`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.may_read {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.may_read = false;
        let read = loop {
            match (&*self.stream).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                read => break read,
            }
        };
        match read {
            // Our own shut read side (a close request), not the client's end: nothing more to
            // read now, and the session looks at the request.
            Ok(0) if self.outlet.close_request().is_some() => {
                self.read_shut = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
            Ok(n) => {
                self.bytes_read += n as u64;
                Ok(n)
            }
            Err(e) if timed_out(&e) => Err(io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(e),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.too_slow |= self.outlet.append_own(&self.out).too_slow;
        self.out.clear();
        if self.out.capacity() > KEEP_OUT_BUFFER_BYTES {
            self.out = Vec::new();
        }
        Ok(())
    }
}
