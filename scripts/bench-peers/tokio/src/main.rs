//! A room-less WebSocket broadcast hub on tokio and tokio-tungstenite: the peer that
//! scripts/bench runs beside wschat (driven by `wschat-load --raw`), written the way a tokio
//! user would write it. Not part of wschat.
//!
//!     bench-peer-tokio [PORT]      (PORT 0 or absent: an ephemeral port)
//!
//! Listens on 127.0.0.1 only, accepts any path, and sends every text frame it receives to every
//! connected client, the sender included, unchanged. Binary frames are ignored. Prints
//! "tokio-tungstenite listening: ws://127.0.0.1:PORT/" once it accepts; exits on SIGINT/SIGTERM.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Connections the kernel queues for accept: the same as wschat's and the Node peer's.
const LISTEN_BACKLOG: u32 = 4096;
/// Largest message accepted: the same as wschat's default and the Node peer's `maxPayload`.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Every connected client's outbound queue, by connection number.
type Clients = Arc<Mutex<HashMap<u64, UnboundedSender<Message>>>>;

#[tokio::main]
async fn main() {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        None => 0,
        Some(Ok(port)) => port,
        Some(Err(_)) => {
            eprintln!("usage: bench-peer-tokio [PORT]");
            std::process::exit(2);
        }
    };
    let listener = match listen(port) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("bench-peer-tokio: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    let actual = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("tokio-tungstenite listening: ws://127.0.0.1:{actual}/");
    let clients = Clients::default();
    let ids = AtomicU64::new(1);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(stream, id, clients.clone()));
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminated() => break,
        }
    }
}

fn listen(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(unix)]
async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sig) => {
            sig.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// One client: the handshake, then a writer task draining its queue while this task reads.
async fn serve(stream: TcpStream, id: u64, clients: Clients) {
    let _ = stream.set_nodelay(true); // as wschat and the Node peer do
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (queue, mut queued) = unbounded_channel::<Message>();
    lock(&clients).insert(id, queue);
    let writer = tokio::spawn(async move {
        while let Some(message) = queued.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    // A close frame (and a ping) is answered by tungstenite itself, on the read after it;
    // after a close, that read ends the stream.
    while let Some(Ok(message)) = source.next().await {
        if message.is_text() {
            for client in lock(&clients).values() {
                let _ = client.send(message.clone());
            }
        }
    }
    lock(&clients).remove(&id); // drops its queue's sender: the writer ends
    let _ = writer.await;
}

fn lock(clients: &Clients) -> std::sync::MutexGuard<'_, HashMap<u64, UnboundedSender<Message>>> {
    clients.lock().unwrap_or_else(|e| e.into_inner())
}
