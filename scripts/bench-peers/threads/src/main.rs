//! A room-less WebSocket broadcast hub, thread per connection, with as little as such a server
//! can do for a connection: a peer for scripts/bench (driven by `wschat-load --raw`), the floor
//! under wschat's churn and opening figures. Not part of wschat.
//!
//!     bench-peer-threads [PORT]      (PORT 0 or absent: an ephemeral port)
//!
//! Threads wait in `accept` on the listening socket themselves (the kernel wakes one; no accept
//! thread, no hand-off) and serve what they accepted: the handshake, then every text frame
//! written, by the reading thread itself, to every connected client, the sender included. A
//! thread that accepts while no other waits starts one more first, so there is a thread for
//! every connection held and none is started while finished ones wait (they are never ended).
//! No rooms, no presence, no history, no limits beyond the message size. Listens on 127.0.0.1
//! only; prints "threads listening: ws://127.0.0.1:PORT/" once it accepts.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

/// Threads started waiting in `accept`: more are started when all are busy.
const THREADS: usize = 8;
/// Connections the kernel queues for accept: the same as wschat's and the other peers'.
const LISTEN_BACKLOG: i32 = 4096;
/// Largest message accepted: the same as wschat's default and the other peers'.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// A connection thread's stack: tungstenite keeps its buffers on the heap.
const STACK_BYTES: usize = 64 * 1024;
/// How long a thread waits after a failed `accept` (no descriptors left, say) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// Every connected client's socket, by connection number.
type Clients = Mutex<HashMap<u64, Arc<TcpStream>>>;

/// What every thread shares.
struct Hub {
    listener: TcpListener,
    clients: Clients,
    ids: AtomicU64,
    /// Threads waiting in `accept`.
    waiting: AtomicUsize,
}

fn main() {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        None => 0,
        Some(Ok(port)) => port,
        Some(Err(_)) => {
            eprintln!("usage: bench-peer-threads [PORT]");
            std::process::exit(2);
        }
    };
    let listener = match listen(port) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bench-peer-threads: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    let actual = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("threads listening: ws://127.0.0.1:{actual}/");
    let hub = Arc::new(Hub {
        listener,
        clients: Clients::default(),
        ids: AtomicU64::new(1),
        waiting: AtomicUsize::new(0),
    });
    for _ in 0..THREADS {
        start(&hub);
    }
    loop {
        thread::park(); // the threads serve; this one only keeps the process
    }
}

/// The listening socket, with `TCP_NODELAY` set for every socket accepted from it.
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn start(hub: &Arc<Hub>) {
    hub.waiting.fetch_add(1, SeqCst);
    let its_hub = hub.clone();
    let started = thread::Builder::new()
        .stack_size(STACK_BYTES)
        .spawn(move || accept_and_serve(&its_hub));
    if let Err(e) = started {
        hub.waiting.fetch_sub(1, SeqCst);
        eprintln!("bench-peer-threads: cannot start a thread: {e}");
    }
}

fn accept_and_serve(hub: &Arc<Hub>) {
    loop {
        let accepted = hub.listener.accept();
        if hub.waiting.fetch_sub(1, SeqCst) == 1 {
            start(hub); // no one else waits: the next connection needs a thread
        }
        match accepted {
            Ok((stream, _)) => serve(hub, Arc::new(stream)),
            Err(_) => thread::sleep(ACCEPT_RETRY),
        }
        hub.waiting.fetch_add(1, SeqCst);
    }
}

/// One client: the handshake, then each text frame to everyone until it closes.
fn serve(hub: &Hub, stream: Arc<TcpStream>) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let Ok(mut ws) = tungstenite::accept_with_config(Shared(stream.clone()), Some(config)) else {
        return;
    };
    let id = hub.ids.fetch_add(1, SeqCst);
    lock(&hub.clients).insert(id, stream);
    // A close frame (and a ping) is answered by tungstenite itself; after a close, the next
    // read fails and the loop ends.
    while let Ok(message) = ws.read() {
        if let Message::Text(text) = message {
            let mut frame = Vec::with_capacity(text.len() + 10);
            let _ = Frame::message(text, OpCode::Data(Data::Text), true).format(&mut frame);
            for client in lock(&hub.clients).values() {
                let _ = (&**client).write_all(&frame);
            }
        }
    }
    lock(&hub.clients).remove(&id);
}

/// A socket that other threads write to as well, as tungstenite's stream (one descriptor).
struct Shared(Arc<TcpStream>);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lock(clients: &Clients) -> MutexGuard<'_, HashMap<u64, Arc<TcpStream>>> {
    clients.lock().unwrap_or_else(|e| e.into_inner())
}
