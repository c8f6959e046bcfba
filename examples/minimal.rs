//! wschat's design on one page: every text message goes to every client, its sender included.
//! `PORT=5000 cargo run --example minimal`, then connect any WebSocket client to
//! `ws://127.0.0.1:5000/` (any path). docs/TUTORIAL.md walks through it.
//!
//! `main` gives each TCP connection a thread, which does the handshake and then blocks reading
//! frames; each text message becomes an [`Event::Said`]. The dispatcher thread alone owns the
//! client list (nothing is locked around it) and puts every message in every client's bounded
//! queue, never blocking: a client whose queue is full is too slow and is cut off. A thread
//! blocked in `read` cannot write, so each connection has a second thread, its writer, with a
//! `WebSocket` of its own over a clone of the socket; both write through [`Shared`], one whole
//! frame at a time, so their frames never interleave.

use std::collections::HashMap;
use std::io::ErrorKind::{TimedOut, WouldBlock};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use log::{debug, info, warn};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Bytes, Error, Message, Utf8Bytes};

/// The port when `PORT` is not set: the one the tutorial uses.
const DEFAULT_PORT: u16 = 5000;
/// Messages waiting for one client. A client this far behind reads slower than the room talks;
/// keeping more for it would only grow memory, so it is dropped instead.
const CLIENT_QUEUE: usize = 128;
/// Events waiting for the dispatcher. When full, readers wait, and through TCP so do their
/// clients: senders are slowed down instead of memory growing.
const DISPATCHER_QUEUE: usize = 1024;
/// Largest message accepted (tungstenite's default, 64 MiB, is far beyond a chat line).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// A client silent this long gets a ping; silent as long again, it is gone. A peer that vanished
/// without closing (power cut, lost network) never says so itself.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// A write stuck this long means the peer stopped reading: a dead peer never holds a thread.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The answer to a request that is not a WebSocket handshake.
const NOT_WEBSOCKET: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\nThis is a WebSocket server.\n";

/// A client as the dispatcher holds it: its queue, and its socket (to cut it off).
type Client = (Sender<Utf8Bytes>, TcpStream);

/// What connection threads tell the dispatcher.
enum Event {
    Joined(u64, Client),
    Said(Utf8Bytes),
    Left(u64),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let port = std::env::var("PORT").map_or(Ok(DEFAULT_PORT), |p| p.parse());
    let port = port.unwrap_or_else(|e| fail(format!("PORT is not a port number: {e}")));
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| fail(e.to_string()));
    match listener.local_addr() {
        Ok(addr) => println!("listening on ws://{addr}"),
        Err(e) => fail(e.to_string()),
    }
    let (events, inbox) = crossbeam_channel::bounded(DISPATCHER_QUEUE);
    thread::spawn(move || dispatch(inbox));
    for (id, stream) in (0..).zip(listener.incoming()) {
        let events = events.clone();
        let spawn = |s| thread::Builder::new().spawn(move || connection(id, s, events));
        if let Err(e) = stream.and_then(spawn) {
            warn!("cannot take a connection: {e}");
            thread::sleep(ACCEPT_BACKOFF);
        }
    }
}

/// A one-line error and exit status 1, for what the user can fix (the port, the address).
fn fail(message: String) -> ! {
    eprintln!("minimal: {message}");
    std::process::exit(1);
}

/// The dispatcher: every message to every client, and the ones that fall behind dropped.
fn dispatch(inbox: Receiver<Event>) {
    let mut clients: HashMap<u64, Client> = HashMap::new();
    for event in inbox {
        match event {
            Event::Joined(id, client) => drop(clients.insert(id, client)),
            Event::Left(id) => drop(clients.remove(&id)),
            // `Utf8Bytes` is reference counted: every client gets the same bytes, not a copy.
            Event::Said(text) => clients.retain(|id, (queue, socket)| {
                let Err(TrySendError::Full(_)) = queue.try_send(text.clone()) else {
                    return true; // queued, or its writer ended and its `Left` is on the way
                };
                warn!("client {id} is too slow, dropping it");
                let _ = socket.shutdown(Shutdown::Both);
                false
            }),
        }
    }
}

/// One connection, from handshake to goodbye. Its writer runs in a scoped thread beside it.
fn connection(id: u64, stream: TcpStream, events: Sender<Event>) {
    let Ok((socket, writer_stream)) = prepare(&stream) else {
        return;
    };
    let lock = Arc::new(Mutex::new(()));
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES));
    let mut ws = match tungstenite::accept_with_config(Shared(stream, lock.clone()), Some(config)) {
        Ok(ws) => ws,
        Err(e) => {
            warn!("handshake failed: {e}");
            let _ = (&socket).write_all(NOT_WEBSOCKET); // most likely a plain HTTP request
            return;
        }
    };
    let writer = WebSocket::from_raw_socket(Shared(writer_stream, lock), Role::Server, None);
    info!("a user connected");
    let (queue, outbox) = crossbeam_channel::bounded(CLIENT_QUEUE);
    if events.send(Event::Joined(id, (queue, socket))).is_err() {
        return;
    }
    let goodbye = thread::scope(|scope| {
        let goodbye =
            match thread::Builder::new().spawn_scoped(scope, || write_loop(writer, outbox)) {
                Ok(_) => read_loop(&mut ws, &events),
                Err(e) => {
                    warn!("cannot start a writer: {e}");
                    close_with(CloseCode::Again, "server busy, try again")
                }
            };
        let _ = events.send(Event::Left(id)); // the dispatcher drops our queue: the writer ends
        goodbye
    });
    let _ = ws.close(goodbye); // our close frame, or the reply to the client's
    info!("user disconnected");
}

/// The socket's timeouts, and two more handles on it: the dispatcher's and the writer's.
fn prepare(stream: &TcpStream) -> io::Result<(TcpStream, TcpStream)> {
    stream.set_read_timeout(Some(PING_INTERVAL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok((stream.try_clone()?, stream.try_clone()?))
}

/// Reads until the client closes or fails. Returns the close frame to send if we end it.
fn read_loop(ws: &mut WebSocket<Shared>, events: &Sender<Event>) -> Option<CloseFrame> {
    let mut pinged = false;
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => events.send(Event::Said(text)).ok()?,
            Ok(Message::Binary(_)) => return close_with(CloseCode::Unsupported, "text only"),
            Ok(Message::Close(_)) => return None, // tungstenite queued the reply
            Ok(_) => {}                           // a ping (tungstenite queued the pong) or a pong
            Err(Error::Io(e)) if !pinged && matches!(e.kind(), WouldBlock | TimedOut) => {
                ws.send(Message::Ping(Bytes::new())).ok()?; // silent for PING_INTERVAL
                pinged = true;
                continue;
            }
            Err(Error::Capacity(_)) => return close_with(CloseCode::Size, "message too big"),
            Err(Error::Protocol(_)) => return close_with(CloseCode::Protocol, "protocol error"),
            Err(e) => {
                debug!("read ended: {e}"); // the client left, or stayed silent after a ping
                return None;
            }
        }
        pinged = false;
    }
}

/// The close frame we send when we end the connection.
fn close_with(code: CloseCode, why: &'static str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(why),
    })
}

/// Writes what the dispatcher queued for this client, until it drops the queue.
fn write_loop(mut ws: WebSocket<Shared>, outbox: Receiver<Utf8Bytes>) {
    for text in outbox {
        if let Err(e) = ws.send(Message::Text(text)) {
            debug!("write failed: {e}");
            let _ = ws.get_ref().0.shutdown(Shutdown::Both); // wakes the reader
            return;
        }
    }
}

/// The socket as each of a connection's two `WebSocket`s sees it: reads go straight through;
/// a write takes the connection's lock and writes the whole buffer, so frames never interleave.
struct Shared(TcpStream, Arc<Mutex<()>>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _turn = self.1.lock().unwrap_or_else(PoisonError::into_inner);
        self.0.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
