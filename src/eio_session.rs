//! Engine.IO sessions as state machines without I/O: the long-poll rules, the upgrade from
//! polling to WebSocket, the server's pings and the pong deadline, the bounded outgoing queue,
//! and the [`Registry`] that hands out session ids within a total and a per-address bound.
//!
//! Nothing here reads a clock, touches a socket or waits: the caller passes the time in
//! (`now: Instant`), performs the I/O a method asks for, and calls [`Session::tick`] by
//! [`Session::next_deadline`]. So every rule is unit-tested with a fake clock below. It never
//! parses socket.io packets ([`crate::socketio`]) and never decides about chat.
//!
//! A session's life:
//!
//! ```text
//!  GET (no sid) --> Polling --2probe on a WebSocket--> Probing --5--> WebSocket
//!  WS (no sid)  ----------------------------------------------------> WebSocket
//!  any state --close / ping timeout / duplicate GET / too slow / bad packet--> Closed
//! ```
//!
//! While polling, at most one `GET` waits; it is answered as soon as packets are queued
//! ([`Session::poll_ready`]), and a second `GET` in the meantime closes the session, as the
//! protocol says. During the probe the waiting `GET` is answered with a `noop`, so the client can
//! pause polling and send `5`; whatever is still queued then goes out on the WebSocket.
//!
//! How a front door drives it (each request on its own thread, the registry behind a lock):
//!
//! * `GET` without `sid`: [`Registry::insert_with`] a [`Session::open`], answer its `open` packet.
//! * `POST` with `sid`: [`Session::receive_payload`]; each [`Inbound::Message`] goes to
//!   [`crate::socketio::decode_incoming`]; an error answers its [`EioError::http_status`].
//! * `GET` with `sid`: [`Session::begin_poll`]; if it must wait, wait until [`Session::poll_ready`]
//!   (wake the waiter after every call that queues) or until the caller's own bound, then
//!   [`Session::take_poll`] or [`Session::end_poll`]; a dropped connection calls
//!   [`Session::abandon_poll`].
//! * WebSocket with `sid` (if [`Session::accepts_probe`]): each frame through
//!   [`engineio::Packet::decode`] and [`Session::receive`]; write an [`Inbound::Reply`] at once;
//!   after [`Inbound::Upgraded`], wake the waiting `GET` and write [`Session::take_websocket`]
//!   whenever something is queued; if the socket closes before `5`, [`Session::probe_failed`].
//!   Without `sid`: `open` as a WebSocket session, then the same.
//! * Every session: [`Session::tick`] by [`Session::next_deadline`]; once [`Session::closed`],
//!   remove it from the registry and tell the dispatcher the client left.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engineio::{self, EioError, OpenInfo, Packet, Transport};
use crate::protocol::Frame;

/// Bytes of randomness in a session id: 120 bits, so ids cannot be guessed or enumerated.
const SID_BYTES: usize = 15;
/// Attempts at drawing an id not already in use before giving up (a clash of two 120-bit random
/// ids does not happen; the bound only keeps the loop finite).
const SID_ATTEMPTS: usize = 3;

/// The tunables of every session (the front door builds them from the server's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time between the server's pings.
    pub ping_interval: Duration,
    /// How long the server waits for the pong before dropping the session.
    pub ping_timeout: Duration,
    /// Largest polling body read, in bytes (announced as `maxPayload`).
    pub max_payload: usize,
    /// Bytes queued for a client that does not fetch them before it is dropped as too slow.
    pub max_queue_bytes: usize,
}

impl Limits {
    /// wschat's settings: a ping every `--ping-interval`, and as long again for the pong (so a
    /// silent client goes after two intervals, as a raw one does); `--max-message-bytes` per body
    /// or frame; `--client-queue-bytes` waiting.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            ping_interval: config.ping_interval,
            ping_timeout: config.ping_interval,
            max_payload: config.max_message_bytes,
            max_queue_bytes: config.client_queue_bytes,
        }
    }
}

/// Why a session ended, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `close`, or its WebSocket closed.
    ClientClosed,
    /// No pong within the ping timeout.
    PingTimeout,
    /// A second `GET` while one was waiting.
    DuplicatePoll,
    /// Its queue passed [`Limits::max_queue_bytes`].
    TooSlow,
    /// It sent a packet that breaks the protocol.
    BadPacket,
    /// The server ended it (shutdown, or a limit of the layers above).
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Polling,
    /// `3probe` sent on the new WebSocket; polling still works until the client sends `5`.
    Probing,
    WebSocket,
    Closed(CloseReason),
}

/// What a packet from the client asks of the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Nothing to do (a pong, a noop, or a ping whose pong is queued).
    Handled,
    /// A socket.io packet for the layer above.
    Message(String),
    /// A binary attachment for the layer above (which refuses them).
    Binary(Vec<u8>),
    /// Write this on the WebSocket now, before anything queued (the `3probe`).
    Reply(String),
    /// The client moved to the WebSocket: the queue now drains there.
    Upgraded,
    /// The client closed the session.
    Closed,
}

/// One Engine.IO session.
#[derive(Debug)]
pub struct Session {
    sid: String,
    limits: Limits,
    phase: Phase,
    /// Encoded packets waiting for the client, and their total length.
    queue: VecDeque<Frame>,
    queued_bytes: usize,
    poll_waiting: bool,
    next_ping: Instant,
    pong_due: Option<Instant>,
}

impl Session {
    /// A new session on `transport`, and its `open` packet, which the caller sends first (as the
    /// answer to the first `GET`, or as the first WebSocket frame).
    pub fn open(sid: String, transport: Transport, limits: Limits, now: Instant) -> (Self, String) {
        let (phase, upgrades) = match transport {
            Transport::Polling => (Phase::Polling, vec!["websocket"]),
            Transport::WebSocket => (Phase::WebSocket, vec![]),
        };
        let open = OpenInfo {
            sid: sid.clone(),
            upgrades,
            ping_interval: millis(limits.ping_interval),
            ping_timeout: millis(limits.ping_timeout),
            max_payload: limits.max_payload,
        };
        let session = Session {
            sid,
            limits,
            phase,
            queue: VecDeque::new(),
            queued_bytes: 0,
            poll_waiting: false,
            next_ping: now + limits.ping_interval,
            pong_due: None,
        };
        (session, open.encode())
    }

    pub fn sid(&self) -> &str {
        &self.sid
    }

    /// Why the session ended, once it has.
    pub fn closed(&self) -> Option<CloseReason> {
        match self.phase {
            Phase::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// The transport packets leave by: polling until the client sends `5`.
    pub fn transport(&self) -> Transport {
        match self.phase {
            Phase::WebSocket => Transport::WebSocket,
            _ => Transport::Polling,
        }
    }

    /// Bytes waiting for the client.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Queues a frame for the client (an encoded packet, such as [`engineio::message_frame`]).
    /// Past [`Limits::max_queue_bytes`] the session is closed as too slow.
    pub fn send(&mut self, frame: Frame) -> Result<(), EioError> {
        if self.closed().is_some() {
            return Err(EioError::SessionClosed);
        }
        self.enqueue(frame)
    }

    /// Queues anything, pings and pongs included (a client that posts pings and never polls
    /// must not grow its queue without bound either).
    fn enqueue(&mut self, frame: Frame) -> Result<(), EioError> {
        if self.queued_bytes + frame.len() > self.limits.max_queue_bytes {
            self.close(CloseReason::TooSlow);
            return Err(EioError::TooSlow);
        }
        self.queued_bytes += frame.len();
        self.queue.push_back(frame);
        Ok(())
    }

    /// Ends the session and drops what was queued. A `GET` still waiting is answered `1` (or
    /// `6` when the client closed the session itself), later requests get an error, and a
    /// WebSocket is closed by the caller.
    pub fn close(&mut self, reason: CloseReason) {
        if self.closed().is_some() {
            return;
        }
        self.phase = Phase::Closed(reason);
        let last = match reason {
            CloseReason::ClientClosed => Packet::Noop,
            _ => Packet::Close,
        };
        let last: Frame = last.encode().into();
        self.queued_bytes = last.len();
        self.queue.clear();
        self.queue.push_back(last);
    }

    /// Handles one packet from the client, arriving by `via`. A packet that breaks the protocol
    /// closes the session and is returned as the error.
    pub fn receive(&mut self, packet: Packet, via: Transport) -> Result<Inbound, EioError> {
        if self.closed().is_some() {
            return Err(EioError::SessionClosed);
        }
        if via == Transport::Polling && self.phase == Phase::WebSocket {
            return Err(EioError::TransportMismatch);
        }
        let result = self.dispatch(packet, via);
        if let Err(EioError::BadPacket(_)) = result {
            self.close(CloseReason::BadPacket);
        }
        result
    }

    fn dispatch(&mut self, packet: Packet, via: Transport) -> Result<Inbound, EioError> {
        match packet {
            Packet::Message(text) => Ok(Inbound::Message(text)),
            Packet::Binary(bytes) => Ok(Inbound::Binary(bytes)),
            Packet::Pong { probe: false } => {
                self.pong_due = None;
                Ok(Inbound::Handled)
            }
            Packet::Ping { probe: true } => self.probe(via),
            Packet::Ping { probe: false } => {
                self.enqueue(Packet::Pong { probe: false }.encode().into())?;
                Ok(Inbound::Handled)
            }
            Packet::Upgrade => self.upgrade(via),
            Packet::Noop => Ok(Inbound::Handled),
            Packet::Close => {
                self.close(CloseReason::ClientClosed);
                Ok(Inbound::Closed)
            }
            Packet::Pong { probe: true } => Err(EioError::BadPacket("the server sends no probe")),
        }
    }

    /// `2probe` on the new WebSocket: answer `3probe` there, and end the waiting poll with a
    /// `noop` so the client can pause polling.
    fn probe(&mut self, via: Transport) -> Result<Inbound, EioError> {
        if via != Transport::WebSocket || self.phase != Phase::Polling {
            return Err(EioError::BadPacket(
                "a probe comes once, on a new WebSocket",
            ));
        }
        self.phase = Phase::Probing;
        self.enqueue(Packet::Noop.encode().into())?;
        Ok(Inbound::Reply(Packet::Pong { probe: true }.encode()))
    }

    /// Whether a new WebSocket may join this session to probe it: only a polling session that
    /// is not being probed already (a second WebSocket for the same `sid` is refused).
    pub fn accepts_probe(&self) -> bool {
        self.phase == Phase::Polling
    }

    /// The probing WebSocket closed before `5`: the session goes on polling, and may be probed
    /// again.
    pub fn probe_failed(&mut self) {
        if self.phase == Phase::Probing {
            self.phase = Phase::Polling;
        }
    }

    fn upgrade(&mut self, via: Transport) -> Result<Inbound, EioError> {
        if via != Transport::WebSocket || self.phase != Phase::Probing {
            return Err(EioError::BadPacket(
                "upgrade comes after the probe, on the WebSocket",
            ));
        }
        self.phase = Phase::WebSocket;
        Ok(Inbound::Upgraded)
    }

    /// Decodes a polling `POST` body and handles its packets in order. A bad body closes the
    /// session; its error says which HTTP status to answer.
    pub fn receive_payload(&mut self, body: &[u8]) -> Result<Vec<Inbound>, EioError> {
        let packets = match engineio::decode_payload(body, self.limits.max_payload) {
            Ok(packets) => packets,
            Err(e) => {
                self.close(CloseReason::BadPacket);
                return Err(e);
            }
        };
        let mut inbound = Vec::with_capacity(packets.len());
        for packet in packets {
            inbound.push(self.receive(packet, Transport::Polling)?);
        }
        Ok(inbound)
    }

    /// A `GET` arrived: its answer now if packets wait, `None` if it must wait (then call
    /// [`Session::take_poll`] whenever [`Session::poll_ready`] says so). A second waiting `GET`
    /// closes the session: the first is then answered with `close`, this one with the error.
    pub fn begin_poll(&mut self) -> Result<Option<String>, EioError> {
        if self.closed().is_some() {
            return Err(EioError::SessionClosed);
        }
        if self.phase == Phase::WebSocket {
            return Err(EioError::TransportMismatch);
        }
        if self.poll_waiting {
            self.close(CloseReason::DuplicatePoll);
            return Err(EioError::DuplicatePoll);
        }
        self.poll_waiting = true;
        Ok(self.take_poll())
    }

    /// Whether the waiting `GET` has an answer.
    pub fn poll_ready(&self) -> bool {
        self.poll_waiting && (!self.queue.is_empty() || self.phase == Phase::WebSocket)
    }

    /// The waiting `GET`'s answer, if it has one: the queued packets, or a `noop` once the
    /// session moved to its WebSocket (the queue then drains there).
    pub fn take_poll(&mut self) -> Option<String> {
        if !self.poll_ready() {
            return None;
        }
        self.poll_waiting = false;
        if self.phase == Phase::WebSocket {
            return Some(Packet::Noop.encode());
        }
        let frames = self.drain();
        Some(engineio::encode_payload(&frames))
    }

    /// The waiting `GET` gives up (its own time bound passed): its answer, a `noop` if nothing
    /// is queued.
    pub fn end_poll(&mut self) -> String {
        let answer = self.take_poll();
        self.poll_waiting = false;
        answer.unwrap_or_else(|| Packet::Noop.encode())
    }

    /// The waiting `GET`'s connection is gone; packets stay queued for the next one.
    pub fn abandon_poll(&mut self) {
        self.poll_waiting = false;
    }

    /// Frames to write on the WebSocket, once the session lives there (and after it closed,
    /// nothing: the caller closes the socket).
    pub fn take_websocket(&mut self) -> Vec<Frame> {
        match self.phase {
            Phase::WebSocket => self.drain(),
            _ => Vec::new(),
        }
    }

    fn drain(&mut self) -> Vec<Frame> {
        self.queued_bytes = 0;
        self.queue.drain(..).collect()
    }

    /// Runs the clock: a ping is queued every `ping_interval` (once the previous one has been
    /// answered), and a session whose pong is `ping_timeout` late is closed. Returns the reason
    /// once it closes here.
    pub fn tick(&mut self, now: Instant) -> Option<CloseReason> {
        if self.closed().is_some() {
            return None;
        }
        if self.pong_due.is_some_and(|due| now >= due) {
            self.close(CloseReason::PingTimeout);
            return self.closed();
        }
        if self.pong_due.is_none() && now >= self.next_ping {
            if self
                .enqueue(Packet::Ping { probe: false }.encode().into())
                .is_err()
            {
                return self.closed();
            }
            self.pong_due = Some(now + self.limits.ping_timeout);
            self.next_ping = now + self.limits.ping_interval;
        }
        None
    }

    /// When [`Session::tick`] has something to do next.
    pub fn next_deadline(&self) -> Instant {
        self.pong_due.unwrap_or(self.next_ping)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Bounds on how many sessions exist at once (0 = no bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryLimits {
    pub max_sessions: usize,
    pub max_per_address: usize,
}

/// The live sessions by id, with the address each came from. Generic over what it holds, so the
/// front door can keep a session behind whatever lock and wake-up it chooses.
#[derive(Debug)]
pub struct Registry<T> {
    limits: RegistryLimits,
    sessions: HashMap<String, (IpAddr, T)>,
    per_address: HashMap<IpAddr, usize>,
}

impl<T> Registry<T> {
    pub fn new(limits: RegistryLimits) -> Self {
        Registry {
            limits,
            sessions: HashMap::new(),
            per_address: HashMap::new(),
        }
    }

    /// Draws a fresh random id and stores `make(id)` under it, unless `addr` or the server is
    /// at its bound.
    pub fn insert_with(
        &mut self,
        addr: IpAddr,
        make: impl FnOnce(String) -> T,
    ) -> Result<String, EioError> {
        let over = |count: usize, max: usize| max != 0 && count >= max;
        if over(self.sessions.len(), self.limits.max_sessions) {
            return Err(EioError::TooManySessions);
        }
        let from_addr = self.per_address.get(&addr).copied().unwrap_or(0);
        if over(from_addr, self.limits.max_per_address) {
            return Err(EioError::TooManyFromAddress);
        }
        let sid = self.fresh_sid()?;
        self.sessions.insert(sid.clone(), (addr, make(sid.clone())));
        *self.per_address.entry(addr).or_default() += 1;
        Ok(sid)
    }

    fn fresh_sid(&self) -> Result<String, EioError> {
        for _ in 0..SID_ATTEMPTS {
            let sid = random_id()?;
            if !self.sessions.contains_key(&sid) {
                return Ok(sid);
            }
        }
        Err(EioError::NoRandomness)
    }

    pub fn get(&self, sid: &str) -> Option<&T> {
        self.sessions.get(sid).map(|(_, t)| t)
    }

    pub fn get_mut(&mut self, sid: &str) -> Option<&mut T> {
        self.sessions.get_mut(sid).map(|(_, t)| t)
    }

    pub fn remove(&mut self, sid: &str) -> Option<T> {
        let (addr, t) = self.sessions.remove(sid)?;
        self.forget_address(addr);
        Some(t)
    }

    /// Keeps only the sessions for which `keep` says so (a sweep of closed ones).
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut T) -> bool) {
        let mut gone = Vec::new();
        self.sessions.retain(|sid, (addr, t)| {
            let kept = keep(sid, t);
            if !kept {
                gone.push(*addr);
            }
            kept
        });
        for addr in gone {
            self.forget_address(addr);
        }
    }

    fn forget_address(&mut self, addr: IpAddr) {
        if let Some(count) = self.per_address.get_mut(&addr) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&addr);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// 120 random bits from the OS, as 20 URL-safe characters: a session id, or a socket.io socket id.
pub fn random_id() -> Result<String, EioError> {
    let mut bytes = [0u8; SID_BYTES];
    getrandom::fill(&mut bytes).map_err(|_| EioError::NoRandomness)?;
    Ok(data_encoding::BASE64URL_NOPAD.encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const INTERVAL: Duration = Duration::from_secs(25);
    const TIMEOUT: Duration = Duration::from_secs(20);
    const LIMITS: Limits = Limits {
        ping_interval: INTERVAL,
        ping_timeout: TIMEOUT,
        max_payload: 100,
        max_queue_bytes: 64,
    };

    fn polling(now: Instant) -> Session {
        Session::open("sid".into(), Transport::Polling, LIMITS, now).0
    }

    fn message(text: &str) -> Frame {
        engineio::message_frame(text)
    }

    #[test]
    fn limits_follow_the_config() {
        let config = Config::default();
        let limits = Limits::from_config(&config);
        assert_eq!(limits.ping_interval, config.ping_interval);
        assert_eq!(limits.ping_timeout, config.ping_interval);
        assert_eq!(limits.max_payload, config.max_message_bytes);
        assert_eq!(limits.max_queue_bytes, config.client_queue_bytes);
    }

    #[test]
    fn open_packet_announces_the_limits() {
        let now = Instant::now();
        let (_, open) = Session::open("s1".into(), Transport::Polling, LIMITS, now);
        assert_eq!(
            open,
            r#"0{"sid":"s1","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":100}"#
        );
        let (ws, open) = Session::open("s2".into(), Transport::WebSocket, LIMITS, now);
        assert!(open.contains(r#""upgrades":[]"#));
        assert_eq!(ws.transport(), Transport::WebSocket);
    }

    #[test]
    fn a_poll_waits_until_something_is_queued() {
        let mut s = polling(Instant::now());
        assert_eq!(s.begin_poll(), Ok(None));
        assert!(!s.poll_ready());
        s.send(message("2[\"a\"]")).unwrap();
        s.send(message("2[\"b\"]")).unwrap();
        assert!(s.poll_ready());
        assert_eq!(s.take_poll().as_deref(), Some("42[\"a\"]\u{1e}42[\"b\"]"));
        assert_eq!(s.queued_bytes(), 0);
        // Queued before the GET: answered at once.
        s.send(message("x")).unwrap();
        assert_eq!(s.begin_poll(), Ok(Some("4x".into())));
    }

    #[test]
    fn a_second_waiting_poll_closes_the_session() {
        let mut s = polling(Instant::now());
        assert_eq!(s.begin_poll(), Ok(None));
        assert_eq!(s.begin_poll(), Err(EioError::DuplicatePoll));
        assert_eq!(s.closed(), Some(CloseReason::DuplicatePoll));
        // The first GET is answered with `close`; later requests are refused.
        assert_eq!(s.take_poll().as_deref(), Some("1"));
        assert_eq!(s.begin_poll(), Err(EioError::SessionClosed));
        assert_eq!(s.send(message("x")), Err(EioError::SessionClosed));
    }

    #[test]
    fn a_poll_that_gives_up_gets_a_noop_and_one_whose_client_left_keeps_the_queue() {
        let mut s = polling(Instant::now());
        assert_eq!(s.begin_poll(), Ok(None));
        assert_eq!(s.end_poll(), "6");
        assert_eq!(s.begin_poll(), Ok(None));
        s.abandon_poll();
        s.send(message("kept")).unwrap();
        assert!(!s.poll_ready());
        assert_eq!(s.begin_poll(), Ok(Some("4kept".into())));
    }

    #[test]
    fn post_bodies_become_messages_and_pongs() {
        let mut s = polling(Instant::now());
        let got = s
            .receive_payload(b"40\x1e42[\"chat message\",\"hi\"]\x1e3")
            .unwrap();
        assert_eq!(
            got,
            [
                Inbound::Message("0".into()),
                Inbound::Message("2[\"chat message\",\"hi\"]".into()),
                Inbound::Handled,
            ]
        );
        // A client ping is answered with a pong through the poll.
        assert_eq!(s.receive_payload(b"2"), Ok(vec![Inbound::Handled]));
        assert_eq!(s.begin_poll(), Ok(Some("3".into())));
    }

    #[test]
    fn a_bad_body_closes_the_session() {
        let mut s = polling(Instant::now());
        assert!(matches!(
            s.receive_payload(b"abc"),
            Err(EioError::BadPacket(_))
        ));
        assert_eq!(s.closed(), Some(CloseReason::BadPacket));
        let mut s = polling(Instant::now());
        let big = vec![b'4'; 101];
        assert_eq!(s.receive_payload(&big), Err(EioError::PayloadTooLarge(100)));
        assert_eq!(s.closed(), Some(CloseReason::BadPacket));
        let mut s = polling(Instant::now());
        let upgrade_by_post = s.receive_payload(b"5");
        assert!(matches!(upgrade_by_post, Err(EioError::BadPacket(_))));
    }

    #[test]
    fn the_client_closes_the_session() {
        let mut s = polling(Instant::now());
        assert_eq!(s.begin_poll(), Ok(None));
        assert_eq!(s.receive_payload(b"1"), Ok(vec![Inbound::Closed]));
        assert_eq!(s.closed(), Some(CloseReason::ClientClosed));
        assert_eq!(s.take_poll().as_deref(), Some("6"));
    }

    #[test]
    fn the_upgrade_dance() {
        let mut s = polling(Instant::now());
        s.send(message("early")).unwrap();
        assert_eq!(s.begin_poll(), Ok(Some("4early".into())));
        assert_eq!(s.begin_poll(), Ok(None));
        // The probe arrives on the WebSocket: answered there, and the poll ends with a noop.
        let probe = Packet::Ping { probe: true };
        assert_eq!(
            s.receive(probe.clone(), Transport::WebSocket),
            Ok(Inbound::Reply("3probe".into()))
        );
        assert_eq!(s.take_poll().as_deref(), Some("6"));
        // Until `5`, packets still leave by polling, never by the WebSocket.
        s.send(message("during")).unwrap();
        assert!(s.take_websocket().is_empty());
        assert_eq!(
            s.receive(Packet::Upgrade, Transport::WebSocket),
            Ok(Inbound::Upgraded)
        );
        assert_eq!(s.transport(), Transport::WebSocket);
        let frames = s.take_websocket();
        assert_eq!(frames, [Frame::from("4during")]);
        // Polling is over for this session.
        assert_eq!(s.begin_poll(), Err(EioError::TransportMismatch));
        assert_eq!(s.receive_payload(b"4x"), Err(EioError::TransportMismatch));
        assert_eq!(s.closed(), None);
        // A second probe is a protocol error.
        assert!(s.receive(probe, Transport::WebSocket).is_err());
        assert_eq!(s.closed(), Some(CloseReason::BadPacket));
    }

    #[test]
    fn a_poll_still_waiting_at_the_upgrade_gets_a_noop() {
        let mut s = polling(Instant::now());
        let probe = Packet::Ping { probe: true };
        s.receive(probe, Transport::WebSocket).unwrap();
        // No GET was waiting: the noop is queued, then the client polls once more.
        assert_eq!(s.begin_poll(), Ok(Some("6".into())));
        assert_eq!(s.begin_poll(), Ok(None));
        s.receive(Packet::Upgrade, Transport::WebSocket).unwrap();
        assert!(s.poll_ready());
        assert_eq!(s.take_poll().as_deref(), Some("6"));
    }

    #[test]
    fn one_probing_websocket_at_a_time_and_a_failed_probe_keeps_polling() {
        let mut s = polling(Instant::now());
        assert!(s.accepts_probe());
        let probe = Packet::Ping { probe: true };
        s.receive(probe.clone(), Transport::WebSocket).unwrap();
        assert!(!s.accepts_probe());
        s.probe_failed();
        assert!(s.accepts_probe());
        assert_eq!(s.begin_poll(), Ok(Some("6".into())));
        assert_eq!(
            s.receive(probe, Transport::WebSocket),
            Ok(Inbound::Reply("3probe".into()))
        );
        s.receive(Packet::Upgrade, Transport::WebSocket).unwrap();
        s.probe_failed();
        assert_eq!(s.transport(), Transport::WebSocket, "too late to fail");
        assert!(!s.accepts_probe());
    }

    #[test]
    fn upgrade_without_probe_is_refused() {
        let mut s = polling(Instant::now());
        assert!(s.receive(Packet::Upgrade, Transport::WebSocket).is_err());
        let (mut ws, _) = Session::open("w".into(), Transport::WebSocket, LIMITS, Instant::now());
        let probe = Packet::Ping { probe: true };
        assert!(ws.receive(probe, Transport::WebSocket).is_err());
    }

    #[test]
    fn pings_and_the_pong_deadline() {
        let t0 = Instant::now();
        let mut s = polling(t0);
        assert_eq!(s.next_deadline(), t0 + INTERVAL);
        assert_eq!(s.tick(t0 + INTERVAL / 2), None);
        assert_eq!(s.begin_poll(), Ok(None));
        let t1 = t0 + INTERVAL;
        assert_eq!(s.tick(t1), None);
        assert_eq!(s.take_poll().as_deref(), Some("2"));
        assert_eq!(s.next_deadline(), t1 + TIMEOUT);
        // The pong clears the deadline; the next ping follows an interval later.
        s.receive_payload(b"3").unwrap();
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(s.tick(t2), None);
        assert!(s.queue.is_empty());
        assert_eq!(s.tick(t1 + INTERVAL), None);
        assert_eq!(s.begin_poll(), Ok(Some("2".into())));
        // No pong this time: closed at the deadline, not before.
        let t3 = t1 + INTERVAL;
        assert_eq!(s.tick(t3 + TIMEOUT - Duration::from_millis(1)), None);
        assert_eq!(s.tick(t3 + TIMEOUT), Some(CloseReason::PingTimeout));
        assert_eq!(s.tick(t3 + TIMEOUT * 2), None, "reported once");
        assert_eq!(s.begin_poll(), Err(EioError::SessionClosed));
    }

    #[test]
    fn a_client_that_does_not_fetch_is_dropped_as_too_slow() {
        let mut s = polling(Instant::now());
        let frame = message(&"x".repeat(30)); // 31 bytes
        s.send(frame.clone()).unwrap();
        s.send(frame.clone()).unwrap();
        assert_eq!(s.queued_bytes(), 62);
        assert_eq!(s.send(frame), Err(EioError::TooSlow));
        assert_eq!(s.closed(), Some(CloseReason::TooSlow));
        // What was queued is freed; the client hears `close` on its next poll.
        assert_eq!(s.queued_bytes(), 1);
        assert_eq!(s.take_poll(), None);
        assert_eq!(s.begin_poll(), Err(EioError::SessionClosed));
    }

    #[test]
    fn pongs_to_a_ping_flood_count_against_the_bound() {
        let mut s = polling(Instant::now());
        let flood = vec!["2"; 40].join("\u{1e}");
        assert!(s.receive_payload(flood.as_bytes()).is_ok());
        assert_eq!(s.queued_bytes(), 40);
        assert_eq!(s.receive_payload(flood.as_bytes()), Err(EioError::TooSlow));
        assert_eq!(s.closed(), Some(CloseReason::TooSlow));
        assert!(s.queued_bytes() <= LIMITS.max_queue_bytes);
    }

    #[test]
    fn websocket_sessions_drain_on_the_socket() {
        let (mut s, _) = Session::open("w".into(), Transport::WebSocket, LIMITS, Instant::now());
        s.send(message("a")).unwrap();
        assert_eq!(s.take_websocket(), [Frame::from("4a")]);
        assert_eq!(s.begin_poll(), Err(EioError::TransportMismatch));
        let text = Packet::Message("0".into());
        assert_eq!(
            s.receive(text, Transport::WebSocket),
            Ok(Inbound::Message("0".into()))
        );
    }

    #[test]
    fn sids_are_random_and_url_safe() {
        let a = random_id().unwrap();
        let b = random_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 20);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert!(engineio::parse_query(&format!("EIO=4&transport=polling&sid={a}")).is_ok());
    }

    #[test]
    fn the_registry_bounds_sessions_in_total_and_per_address() {
        let limits = RegistryLimits {
            max_sessions: 3,
            max_per_address: 2,
        };
        let mut reg: Registry<u32> = Registry::new(limits);
        let one = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let two = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let a = reg.insert_with(one, |_| 1).unwrap();
        let b = reg.insert_with(one, |_| 2).unwrap();
        assert_eq!(
            reg.insert_with(one, |_| 3),
            Err(EioError::TooManyFromAddress)
        );
        let c = reg.insert_with(two, |_| 3).unwrap();
        assert_eq!(reg.insert_with(two, |_| 4), Err(EioError::TooManySessions));
        assert_eq!(reg.get(&b), Some(&2));
        assert_eq!(reg.get("nope"), None);
        // Removing frees both the total and the address's share.
        assert_eq!(reg.remove(&a), Some(1));
        assert_eq!(reg.remove(&a), None);
        let d = reg.insert_with(one, |_| 5).unwrap();
        reg.retain(|_, v| *v != 5 && *v != 2);
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.get(&c), Some(&3));
        assert_eq!(reg.get(&d), None);
        assert!(reg.insert_with(one, |_| 6).is_ok());
        assert!(reg.insert_with(one, |_| 7).is_ok());
    }

    #[test]
    fn the_registry_hands_each_session_its_own_id() {
        let limits = RegistryLimits {
            max_sessions: 0,
            max_per_address: 0,
        };
        let mut reg = Registry::new(limits);
        let addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let sid = reg.insert_with(addr, |sid| sid).unwrap();
        assert_eq!(reg.get(&sid), Some(&sid));
        *reg.get_mut(&sid).unwrap() = "changed".into();
        assert_eq!(reg.get(&sid).map(String::as_str), Some("changed"));
    }
}
