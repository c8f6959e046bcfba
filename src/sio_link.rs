//! One socket.io client across its requests and transports: its Engine.IO session (behind a
//! lock, with a condition variable that wakes its waiting `GET`), its [`Gate`], and its one
//! [`Outlet`], through which everything for the client leaves, the dispatcher's frames and its
//! own answers alike.
//!
//! A link is the socket.io client as the dispatcher knows it: it joins at the socket.io CONNECT
//! (with the room and name of the CONNECT's `auth`, or of the query) and leaves once, when the
//! session ends. What the client sends, by a polling `POST` ([`Link::post`]) or on its WebSocket
//! ([`Link::heard_websocket`]), goes through the same steps: Engine.IO packet, socket.io packet
//! ([`socketio::decode_incoming`]), the gate's limits, the dispatcher. While polling, the outlet's
//! way is the link itself (a [`Queue`]): frames wait in the Engine.IO session's bounded queue for
//! the next `GET` ([`Link::poll`]).
//!
//! This module never does I/O on a socket and never decides about chat: the front door
//! ([`crate::sio_door`]) and the session ([`crate::session`]) do the I/O, the dispatcher the chat.
//! Lock order: an outlet's lock may be held while taking a link's, never the reverse.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use serde_json::Value;

use crate::admission::ClientSlot;
use crate::dispatcher::Event;
use crate::eio_session::{self, CloseReason, Inbound};
use crate::engineio::{EioError, Packet, Transport};
use crate::metrics::Metrics;
use crate::outlet::{self, Backlog, Bounds, Form, Outlet, Queue};
use crate::protocol::{ChatError, ClientId, Command, Frame};
use crate::ratelimit::{TokenBucket, byte_burst};
use crate::session::{Carried, Env, Gate, Heard};
use crate::socketio::{self, ConnectOptions, Incoming};

pub struct Link {
    /// The dispatcher's id for this client.
    id: ClientId,
    ip: IpAddr,
    /// The query of the handshake request (`room`, `name`, `since`, `full` for the CONNECT).
    query: String,
    metrics: Arc<Metrics>,
    bounds: Bounds,
    /// Set at once for a polling session, by its WebSocket's session otherwise.
    outlet: OnceLock<Arc<Outlet>>,
    state: Mutex<State>,
    /// Rung whenever the waiting `GET` may have an answer.
    ready: Condvar,
    /// Counts the client against `--max-clients` (a WebSocket-only session is counted by its
    /// connection instead).
    _slot: Option<ClientSlot>,
}

struct State {
    eio: eio_session::Session,
    /// Engine.IO's `open` packet, until the first transport sends it.
    open: Option<String>,
    gate: Gate,
    /// Bytes read from the client's `POST` bodies (`--rate-bytes`): in debt, the door waits
    /// before answering, as a session stops reading.
    read: TokenBucket,
    /// The dispatcher knows the client (its CONNECT was accepted).
    joined: bool,
    /// The dispatcher was told the client left.
    left: bool,
    /// Bytes of the queue counted in [`Metrics::backlog_bytes`].
    counted: usize,
}

/// What a [`Link`] is made of, from the door.
pub struct NewLink<'a> {
    pub id: ClientId,
    pub ip: IpAddr,
    pub query: &'a str,
    pub slot: Option<ClientSlot>,
    pub now: Instant,
}

impl Link {
    /// A link for a fresh Engine.IO session `sid` on `transport`. A polling link gets its outlet
    /// here, and answers the handshake `GET` with [`Link::take_open`].
    pub fn open(
        sid: String,
        transport: Transport,
        new: NewLink<'_>,
        limits: eio_session::Limits,
        env: &Env<'_>,
    ) -> Arc<Link> {
        let (eio, open) = eio_session::Session::open(sid, transport, limits, new.now);
        let state = State {
            eio,
            open: Some(open),
            gate: Gate::new(new.ip, env.settings, new.now),
            read: TokenBucket::new(
                env.settings.rate_bytes,
                byte_burst(env.settings.rate_bytes, env.settings.max_message_bytes),
                new.now,
            ),
            joined: false,
            left: false,
            counted: 0,
        };
        let link = Arc::new(Link {
            id: new.id,
            ip: new.ip,
            query: new.query.to_owned(),
            metrics: env.metrics.clone(),
            bounds: env.settings.backlog,
            outlet: OnceLock::new(),
            state: Mutex::new(state),
            ready: Condvar::new(),
            _slot: new.slot,
        });
        Metrics::add(&env.metrics.socketio_sessions, 1);
        if transport == Transport::Polling {
            let queue: Weak<dyn Queue> = Arc::downgrade(&link) as Weak<Link>;
            let outlet = Outlet::queued(queue, env.metrics.clone(), env.settings.backlog);
            let _ = link.outlet.set(Arc::new(outlet));
        }
        link
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is whole before the lock is let go: a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn outlet(&self) -> Option<Arc<Outlet>> {
        self.outlet.get().cloned()
    }

    /// The `open` packet, once: the handshake `GET`'s answer, or a WebSocket's first frame.
    pub fn take_open(&self) -> Option<Frame> {
        self.lock().open.take().map(Frame::from)
    }

    /// A WebSocket session starts on this link: a WebSocket-only session takes `outlet` as its
    /// own and gets its `open` packet to send first; a probe gets nothing.
    pub fn attach(&self, outlet: &Arc<Outlet>) -> Option<Frame> {
        if self.outlet.set(outlet.clone()).is_err() {
            return None; // a probe: the session's outlet is the polling one
        }
        self.take_open()
    }

    /// Whether a new WebSocket may probe this session.
    pub fn accepts_probe(&self) -> bool {
        self.lock().eio.accepts_probe()
    }

    /// Whether the session lives on its WebSocket now.
    pub fn is_websocket(&self) -> bool {
        self.lock().eio.transport() == Transport::WebSocket
    }

    /// Why the session ended, once it has.
    pub fn closed(&self) -> Option<CloseReason> {
        self.lock().eio.closed()
    }

    /// Keeps the gauge of all waiting bytes true to the queue, and wakes the waiting `GET`.
    fn settle(&self, state: &mut State) -> u64 {
        let now = state.eio.queued_bytes();
        let total = outlet::move_gauge(&self.metrics, state.counted, now);
        state.counted = now;
        self.ready.notify_all();
        total
    }

    /// Ends the session (the `GET` waiting, if any, hears it).
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        state.eio.close(reason);
        self.settle(&mut state);
    }

    // ----- polling -----

    /// A polling `GET`: answered at once if packets wait, else when some are queued or after
    /// `wait` (a `noop`).
    pub fn poll(&self, wait: Duration) -> Result<String, EioError> {
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        if let Some(answer) = state.eio.begin_poll()? {
            self.settle(&mut state);
            return Ok(answer);
        }
        while !state.eio.poll_ready() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .ready
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let answer = state.eio.end_poll();
        self.settle(&mut state);
        Ok(answer)
    }

    /// The waiting `GET`'s connection broke before its answer left.
    pub fn abandon_poll(&self) {
        self.lock().eio.abandon_poll();
    }

    /// A polling `POST` body: each packet in order. An error closes the session; it is the
    /// `POST`'s answer.
    pub fn post(&self, body: &[u8], env: &Env<'_>) -> Result<(), EioError> {
        let inbound = {
            let mut state = self.lock();
            let inbound = state.eio.receive_payload(body);
            self.settle(&mut state);
            inbound?
        };
        let now = Instant::now();
        for packet in inbound {
            match packet {
                Inbound::Message(text) if self.socketio_packet(&text, env, now).is_err() => {
                    return Err(EioError::BadPacket("bad socket.io packet"));
                }
                Inbound::Binary(_) => self.refuse(&ChatError::Unsupported, now),
                _ => {}
            }
        }
        Ok(())
    }

    /// Charges a `POST` body to the client's read rate; returns when its debt is paid, if it
    /// is in debt.
    pub fn charge_read(&self, bytes: usize, now: Instant) -> Option<Instant> {
        let mut state = self.lock();
        state.read.charge(bytes as f64, now);
        state.read.debt_paid_at()
    }

    /// Runs the session's clock while it polls (pings, the pong deadline); a session on its
    /// WebSocket keeps time in its session thread. Returns why the session ended, once it has.
    pub fn tick(&self, now: Instant) -> Option<CloseReason> {
        let mut state = self.lock();
        if state.eio.transport() == Transport::Polling {
            state.eio.tick(now);
            self.settle(&mut state);
        }
        state.eio.closed()
    }

    // ----- the WebSocket -----

    /// One text frame on the session's WebSocket (a probe's, or the transport's).
    pub fn heard_websocket(&self, text: &str, env: &Env<'_>, now: Instant) -> Heard {
        let Ok(packet) = Packet::decode(text) else {
            self.close(CloseReason::BadPacket);
            return Heard::Broken("bad Engine.IO packet");
        };
        let inbound = {
            let mut state = self.lock();
            let inbound = state.eio.receive(packet, Transport::WebSocket);
            self.settle(&mut state);
            inbound
        };
        match inbound {
            Ok(Inbound::Message(text)) => match self.socketio_packet(&text, env, now) {
                Ok(()) if self.closed().is_some() => Heard::End("session closed"),
                Ok(()) => Heard::Nothing,
                Err(why) => Heard::Broken(why),
            },
            Ok(Inbound::Binary(_)) => {
                self.refuse(&ChatError::Unsupported, now);
                Heard::Nothing
            }
            Ok(Inbound::Reply(reply)) => Heard::Reply(reply.into()),
            Ok(Inbound::Upgraded) => Heard::Upgraded,
            Ok(Inbound::Closed) => Heard::End("closed by the client"),
            Ok(Inbound::Handled) => Heard::Nothing,
            Err(EioError::TooSlow) => Heard::End("too slow"),
            Err(_) => Heard::Broken("Engine.IO protocol error"),
        }
    }

    /// What waited in the queue when the client moved to its WebSocket.
    pub fn take_websocket(&self) -> Vec<Frame> {
        let mut state = self.lock();
        let frames = state.eio.take_websocket();
        self.settle(&mut state);
        frames
    }

    /// A WebSocket session on this link ended: if it was the session's transport, the session
    /// ends too; a probe that never upgraded leaves the session polling.
    pub fn websocket_ended(&self, reason: String, events: &Sender<Event>) {
        {
            let mut state = self.lock();
            if state.eio.transport() != Transport::WebSocket && state.eio.closed().is_none() {
                state.eio.probe_failed();
                return;
            }
            state.eio.close(CloseReason::ClientClosed);
            self.settle(&mut state);
        }
        self.leave(reason, events);
    }

    /// Tells the dispatcher the client left, once (it may never have joined).
    pub fn leave(&self, reason: String, events: &Sender<Event>) {
        let joined = {
            let mut state = self.lock();
            let was = state.joined && !state.left;
            state.left = true;
            was
        };
        if joined {
            let _ = events.send(Event::Disconnect {
                id: self.id,
                reason,
            });
        }
    }

    // ----- socket.io -----

    /// One socket.io packet from the client. `Err` when it breaks the protocol (the session is
    /// closed); refusals are told to the client.
    fn socketio_packet(&self, text: &str, env: &Env<'_>, now: Instant) -> Result<(), &'static str> {
        let joined = {
            let state = self.lock();
            if let Err(e) = state.gate.charge(text, env, now) {
                drop(state);
                self.refuse(&e, now);
                return Ok(());
            }
            state.joined
        };
        match socketio::decode_incoming(text, joined) {
            Ok(Incoming::Connect(auth)) => self.connect(auth.as_ref(), env),
            Ok(Incoming::Disconnect) => {
                self.close(CloseReason::ClientClosed);
                Ok(())
            }
            Ok(Incoming::Command { command, ack }) => {
                self.command(command, ack, env, now);
                Ok(())
            }
            Ok(Incoming::Ack) => Ok(()),
            Err(e) => match e.reply() {
                Some(reply) => {
                    self.send(reply);
                    Ok(())
                }
                None => {
                    log::info!("socket.io client {}: {e}; closing", self.id);
                    self.close(CloseReason::BadPacket);
                    Err("bad socket.io packet")
                }
            },
        }
    }

    /// A CONNECT to `/`: joins the dispatcher, or refuses with CONNECT_ERROR (the client may try
    /// again).
    fn connect(&self, auth: Option<&Value>, env: &Env<'_>) -> Result<(), &'static str> {
        let options =
            ConnectOptions::from_query(&self.query, self.ip).and_then(|o| o.with_auth(auth));
        let options = match options {
            Ok(options) => options,
            Err(e) => {
                self.send(socketio::connect_refused(&e));
                return Ok(());
            }
        };
        let (Some(outlet), Ok(socket_id)) = (self.outlet(), eio_session::random_id()) else {
            self.close(CloseReason::Server);
            return Err("no socket id");
        };
        outlet.set_form(Form::SocketIo { full: options.full });
        outlet.send_as_is(&[socketio::connect_frame(&socket_id)]);
        let connect = Event::Connect {
            id: self.id,
            arrival: options.arrival,
            outlet,
        };
        self.lock().joined = true;
        if env.events.send(connect).is_err() {
            self.close(CloseReason::Server);
        }
        Ok(())
    }

    /// An event that is a chat command: through the gate to the dispatcher, acknowledged if the
    /// client asked; refused with an `error` event.
    fn command(&self, command: Command, ack: Option<u64>, env: &Env<'_>, now: Instant) {
        let admitted = self.lock().gate.admit(&command, env.metrics, now);
        match admitted {
            Ok(forward) => {
                if forward {
                    let commands = vec![command];
                    let event = Event::Commands {
                        id: self.id,
                        commands,
                    };
                    if env.events.send(event).is_err() {
                        self.close(CloseReason::Server);
                    }
                }
                if let Some(ack) = ack {
                    self.send(socketio::ack_frame(ack));
                }
            }
            Err(e) => self.refuse(&e, now),
        }
    }

    /// Tells the client why its packet was refused; a flood of refusals ends the session.
    fn refuse(&self, error: &ChatError, now: Instant) {
        log::debug!("socket.io client {}: rejected: {error}", self.id);
        if self.lock().gate.flooding(self.id, now) {
            self.close(CloseReason::Server);
            return;
        }
        self.send(socketio::error_event(error));
    }

    /// A packet of the server's own, through the outlet, behind everything before it.
    fn send(&self, frame: Frame) {
        if let Some(outlet) = self.outlet() {
            outlet.send_as_is(&[frame]);
        }
    }
}

/// The link as the session of its WebSocket sees it.
impl Carried for Link {
    fn attach(&self, outlet: &Arc<Outlet>) -> Option<Frame> {
        Link::attach(self, outlet)
    }

    fn heard(&self, text: &str, env: &Env<'_>, now: Instant) -> Heard {
        self.heard_websocket(text, env, now)
    }

    fn outlet(&self) -> Option<Arc<Outlet>> {
        Link::outlet(self)
    }

    fn take_waiting(&self) -> Vec<Frame> {
        self.take_websocket()
    }

    /// Engine.IO's own ping (a probe answered with anything but `3probe` fails, so none before
    /// the upgrade).
    fn ping(&self) -> Option<Frame> {
        self.is_websocket().then(|| Frame::from("2"))
    }

    fn ended(&self, reason: String, events: &Sender<Event>) {
        self.websocket_ended(reason, events)
    }
}

impl Queue for Link {
    fn push(&self, frames: &[Frame]) -> Backlog {
        let mut state = self.lock();
        let mut too_slow = false;
        for frame in frames {
            if state.eio.send(frame.clone()).is_err() {
                too_slow = state.eio.closed() == Some(CloseReason::TooSlow);
                break;
            }
        }
        let total = self.settle(&mut state);
        let bytes = state.eio.queued_bytes();
        Backlog {
            frames: 0,
            bytes,
            too_slow: too_slow || self.bounds.exceeded(total, 0, bytes),
        }
    }

    fn close(&self, reason: &'static str) {
        let reason = match reason {
            "too slow" => CloseReason::TooSlow,
            _ => CloseReason::Server,
        };
        Link::close(self, reason);
    }
}

impl Drop for Link {
    /// What never went out leaves the all-clients gauge with the link; the link leaves the
    /// sessions gauge.
    fn drop(&mut self) {
        self.metrics.socketio_sessions.fetch_sub(1, Relaxed);
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.metrics
            .backlog_bytes
            .fetch_sub(state.counted as u64, Relaxed);
    }
}
