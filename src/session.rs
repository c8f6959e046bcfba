//! One client connection after its handshake: two threads and the WebSocket state between them.
//!
//! ```text
//!   socket --read--> [pump thread] --bytes--> [session thread] --events--> dispatcher
//!   socket <-write-- [session thread] <--frames-- client queue <-- dispatcher
//! ```
//!
//! The *pump* only does blocking reads of raw bytes and hands them over a bounded channel, so it
//! never waits on writing. The *session* owns the tungstenite state and is the only writer to the
//! socket: it waits on inbound bytes and outbound frames at once (`select!`), so a broadcast
//! reaches an idle client at once and an idle connection costs no CPU. Frames cannot interleave
//! because only one thread writes. tungstenite reads from an in-memory buffer that says
//! `WouldBlock` when it is empty ([`Conn`]), which lets the session use it without blocking.
//!
//! The session parses and rate-limits what the client sends, and answers malformed input itself;
//! everything else goes to the dispatcher. It knows nothing of rooms or other clients.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

use crate::dispatcher::{ClientId, ClientLink, Connect, Event, Outbound};
use crate::metrics::Metrics;
use crate::protocol::{self, ChatError, Command};
use crate::ratelimit::{FloodDetector, TokenBucket};

/// Bytes the pump reads per call: a few chat messages; larger ones take several reads.
const PUMP_READ_BYTES: usize = 4 * 1024;
/// Chunks in flight from pump to session: a small bound, so a client that sends faster than the
/// session consumes is slowed down by TCP itself.
const INBOUND_CHUNKS: usize = 8;
/// tungstenite's read buffer per connection: it reads from memory (see [`Conn`]), so a small buffer
/// costs only extra copies of large messages, and saves memory on every idle connection.
const READ_BUFFER_BYTES: usize = 512;
/// Bytes written per flush when the queue is long, so one flush is one bounded syscall.
const MAX_WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Output buffer capacity kept between flushes; a bigger burst's buffer is released.
const KEEP_OUT_BUFFER_BYTES: usize = 16 * 1024;
/// A write that makes no progress for this long means the peer is gone or not reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Typing events accepted per second (and at once); the excess is dropped silently.
const TYPING_RATE: f64 = 2.0;
/// Nick and join commands per second, and at once.
const CONTROL_RATE: f64 = 1.0;
const CONTROL_BURST: f64 = 5.0;
/// Stack of the session thread: parsing, tungstenite and logging fit well within it (the
/// `deep_json` test sends the deepest input serde_json accepts).
pub const SESSION_STACK_BYTES: usize = 256 * 1024;
/// Stack of the pump thread: one read buffer and a channel send.
const PUMP_STACK_BYTES: usize = 64 * 1024;

/// What a session needs from the server.
#[derive(Clone, Debug)]
pub struct Settings {
    pub rate: f64,
    pub burst: f64,
    pub ping_interval: Duration,
    pub max_message_bytes: usize,
}

/// Who is joining, from the handshake.
pub struct Joining {
    pub id: ClientId,
    pub peer: String,
    pub name: Option<String>,
    pub room: String,
    pub since: Option<u64>,
}

/// Why a session ended.
enum Stop {
    /// The peer closed or vanished: nothing more to send.
    Gone(String),
    /// We end it: send a close frame with this code and reason first.
    Close(CloseCode, &'static str),
}

/// Serves one upgraded connection until it ends; returns the reason, for the log.
pub fn serve(
    stream: Arc<TcpStream>,
    leftover: Vec<u8>,
    joining: Joining,
    settings: &Settings,
    events: &Sender<Event>,
    metrics: &Arc<Metrics>,
) -> String {
    // The dispatcher (the only sender) bounds this queue itself, in frames and bytes: an unbounded
    // channel allocates as it fills, where a bounded one would allocate every slot up front.
    let (out_tx, out_rx) = unbounded();
    let (in_tx, in_rx) = bounded(INBOUND_CHUNKS);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let pump = match spawn_pump(stream.clone(), in_tx, metrics.clone()) {
        Ok(pump) => pump,
        Err(e) => return format!("cannot start its reader thread: {e}"),
    };
    let id = joining.id;
    let link = ClientLink {
        tx: out_tx,
        queued_bytes: queued_bytes.clone(),
    };
    let connect = Connect {
        id,
        peer: joining.peer,
        name: joining.name,
        room: joining.room,
        since: joining.since,
        link,
    };
    let mut leave = LeaveOnDrop {
        id,
        events: events.clone(),
        reason: "internal error".into(),
    };
    let reason = if events.send(Event::Connect(Box::new(connect))).is_err() {
        "server shutting down".to_owned()
    } else {
        let mut session = Session::new(
            id,
            stream.clone(),
            leftover,
            in_rx,
            out_rx,
            queued_bytes,
            settings,
            events.clone(),
            metrics.clone(),
        );
        session.run()
    };
    leave.reason = reason.clone();
    let _ = stream.shutdown(Shutdown::Both); // wakes the pump's blocking read
    let _ = pump.join();
    reason
}

/// Tells the dispatcher the client left, however the session ends (a panic included), so no
/// ghost stays in presence.
struct LeaveOnDrop {
    id: ClientId,
    events: Sender<Event>,
    reason: String,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        let reason = std::mem::take(&mut self.reason);
        let _ = self.events.send(Event::Disconnect {
            id: self.id,
            reason,
        });
    }
}

fn spawn_pump(
    stream: Arc<TcpStream>,
    tx: Sender<Vec<u8>>,
    metrics: Arc<Metrics>,
) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("ws-pump".into())
        .stack_size(PUMP_STACK_BYTES)
        .spawn(move || {
            let mut buf = [0u8; PUMP_READ_BYTES];
            loop {
                match (&*stream).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        Metrics::add(&metrics.bytes_in, n as u64);
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
}

struct Session {
    id: ClientId,
    ws: WebSocket<Conn>,
    inbound: Receiver<Vec<u8>>,
    outbound: Receiver<Outbound>,
    queued_bytes: Arc<AtomicUsize>,
    events: Sender<Event>,
    metrics: Arc<Metrics>,
    ping_interval: Duration,
    next_ping: Instant,
    last_heard: Instant,
    messages: TokenBucket,
    typing: TokenBucket,
    control: TokenBucket,
    flood: FloodDetector,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: ClientId,
        stream: Arc<TcpStream>,
        leftover: Vec<u8>,
        inbound: Receiver<Vec<u8>>,
        outbound: Receiver<Outbound>,
        queued_bytes: Arc<AtomicUsize>,
        settings: &Settings,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
    ) -> Session {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0) // Conn buffers; we flush once per batch
            .max_message_size(Some(settings.max_message_bytes))
            .max_frame_size(Some(settings.max_message_bytes));
        let now = Instant::now();
        Session {
            id,
            ws: WebSocket::from_partially_read(
                Conn::new(stream, metrics.clone()),
                leftover,
                Role::Server,
                Some(config),
            ),
            inbound,
            outbound,
            queued_bytes,
            events,
            metrics,
            ping_interval: settings.ping_interval,
            next_ping: now + settings.ping_interval,
            last_heard: now,
            messages: TokenBucket::new(settings.rate, settings.burst, now),
            typing: TokenBucket::new(TYPING_RATE, TYPING_RATE, now),
            control: TokenBucket::new(CONTROL_RATE, CONTROL_BURST, now),
            flood: FloodDetector::default(),
        }
    }

    fn run(&mut self) -> String {
        // Bytes the client sent right behind its handshake are already in tungstenite's buffer.
        let stop = match self.read_frames() {
            Err(stop) => stop,
            Ok(()) => self.pump_loop(),
        };
        match stop {
            Stop::Gone(reason) => reason,
            Stop::Close(code, reason) => {
                self.close(code, reason);
                format!("closed by server: {} {reason}", u16::from(code))
            }
        }
    }

    fn pump_loop(&mut self) -> Stop {
        loop {
            if let Err(stop) = self.wait_once() {
                return stop;
            }
        }
    }

    /// Waits for whichever comes first: bytes from the client, frames for it, or a ping due.
    fn wait_once(&mut self) -> Result<(), Stop> {
        let until_ping = self.next_ping.saturating_duration_since(Instant::now());
        select! {
                recv(self.inbound) -> chunk => match chunk {
                    Ok(bytes) => {
                        self.last_heard = Instant::now();
                        self.ws.get_mut().push_inbound(bytes);
                        self.read_frames()?;
                    }
                    Err(_) => return Err(Stop::Gone("connection closed by the client".into())),
                },
                recv(self.outbound) -> out => match out {
                    Ok(out) => self.write_batch(out)?,
                    Err(_) => return Err(Stop::Close(CloseCode::Error, "server error")),
                },
                default(until_ping) => self.keepalive()?,
        }
        Ok(())
    }

    /// Handles every complete frame buffered so far.
    fn read_frames(&mut self) -> Result<(), Stop> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => self.on_text(&text)?,
                Ok(Message::Binary(_)) => self.reject(ChatError::Unsupported)?,
                Ok(_) => {} // ping: tungstenite queued the pong; pong; close: answered, next read ends
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(stop_for(e)),
            }
        }
        self.flush()
    }

    fn on_text(&mut self, text: &str) -> Result<(), Stop> {
        let command = match protocol::parse_command(text) {
            Ok(command) => command,
            Err(e) => return self.reject(e),
        };
        let now = Instant::now();
        let allowed = match command {
            Command::Message { .. } => self.messages.try_take(now),
            Command::Typing { .. } => {
                if !self.typing.try_take(now) {
                    return Ok(()); // typing indicators are best effort: drop silently
                }
                true
            }
            Command::Nick { .. } | Command::Join { .. } => self.control.try_take(now),
        };
        if !allowed {
            Metrics::add(&self.metrics.rate_limited, 1);
            return self.reject(ChatError::RateLimited);
        }
        self.events
            .send(Event::Command {
                id: self.id,
                command,
            })
            .map_err(|_| Stop::Close(CloseCode::Away, "server shutting down"))
    }

    /// Tells the client what was wrong; too many rejections too fast end the connection.
    fn reject(&mut self, error: ChatError) -> Result<(), Stop> {
        log::debug!("client {}: rejected: {error}", self.id);
        if self.flood.reject(Instant::now()) {
            log::warn!(
                "client {}: flooding ({} rejected messages within 10 s), closing",
                self.id,
                crate::ratelimit::FLOOD_REJECTIONS
            );
            return Err(Stop::Close(CloseCode::Policy, "flooding"));
        }
        self.ws
            .write(Message::Text(error.to_frame()))
            .map_err(stop_for)
    }

    /// Writes `first` and whatever else is queued (up to a bound), then flushes once.
    fn write_batch(&mut self, first: Outbound) -> Result<(), Stop> {
        let mut next = Some(first);
        let mut batch_bytes = 0;
        let mut result = Ok(());
        while let Some(out) = next.take() {
            match out {
                Outbound::Frame(frame) => {
                    batch_bytes += frame.len();
                    if let Err(e) = self.ws.write(Message::Text(frame)) {
                        result = Err(stop_for(e));
                        break;
                    }
                }
                Outbound::Close(code, reason) => {
                    result = Err(Stop::Close(code.into(), reason));
                    break;
                }
            }
            if batch_bytes < MAX_WRITE_BATCH_BYTES {
                next = self.outbound.try_recv().ok();
            }
        }
        self.queued_bytes.fetch_sub(batch_bytes, Relaxed);
        self.flush()?;
        result
    }

    fn keepalive(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if now < self.next_ping {
            return Ok(()); // woke early
        }
        if now.duration_since(self.last_heard) >= 2 * self.ping_interval {
            return Err(Stop::Gone(format!(
                "silent for {:?}: no pong",
                now.duration_since(self.last_heard)
            )));
        }
        self.next_ping = now + self.ping_interval;
        self.ws
            .write(Message::Ping(Default::default()))
            .map_err(stop_for)?;
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Stop> {
        self.ws.flush().map_err(stop_for)
    }

    /// Sends a close frame and waits (bounded) for the peer's, so the TCP close is clean.
    fn close(&mut self, code: CloseCode, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        if self.ws.close(Some(frame)).is_err() {
            return;
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while let Ok(bytes) = self.inbound.recv_deadline(deadline) {
            self.ws.get_mut().push_inbound(bytes);
            loop {
                match self.ws.read() {
                    Ok(_) => {}
                    Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return, // the peer's close arrived (or the connection broke)
                }
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
        WsError::Capacity(_) => Stop::Close(CloseCode::Size, "message too big"),
        WsError::Utf8(_) => Stop::Close(CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(e) => {
            log::info!("protocol error: {e}");
            Stop::Close(CloseCode::Protocol, "protocol error")
        }
        WsError::Io(e) => Stop::Gone(format!("connection lost: {e}")),
        other => Stop::Gone(format!("connection error: {other}")),
    }
}

/// The stream tungstenite sees: reads come from bytes the pump handed over (and say
/// `WouldBlock` when there are none), writes collect in a buffer that `flush` sends in one go.
pub struct Conn {
    stream: Arc<TcpStream>,
    inbound: Vec<u8>,
    read_pos: usize,
    out: Vec<u8>,
    metrics: Arc<Metrics>,
}

impl Conn {
    fn new(stream: Arc<TcpStream>, metrics: Arc<Metrics>) -> Conn {
        Conn {
            stream,
            inbound: Vec::new(),
            read_pos: 0,
            out: Vec::new(),
            metrics,
        }
    }

    fn push_inbound(&mut self, bytes: Vec<u8>) {
        if self.read_pos == self.inbound.len() {
            self.inbound = bytes; // the usual case: everything before was consumed
            self.read_pos = 0;
        } else {
            self.inbound.extend_from_slice(&bytes);
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = &self.inbound[self.read_pos..];
        if available.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.read_pos += n;
        Ok(n)
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
        let result = (&*self.stream).write_all(&self.out);
        Metrics::add(&self.metrics.bytes_out, self.out.len() as u64);
        self.out.clear();
        if self.out.capacity() > KEEP_OUT_BUFFER_BYTES {
            self.out = Vec::new();
        }
        result
    }
}
