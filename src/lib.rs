//! # wschat: a WebSocket chat server with plain threads
//!
//! wschat is a small chat server built the old way: blocking sockets, one thread per connection,
//! channels between threads, and no async runtime. It is meant to be read.
//!
//! ## A tour, following one message
//!
//! ```text
//!                         +--------------------+
//!  browser --HTTP------>  | http (tiny_http)   |  page, /config.json, /api, /metrics
//!                         +---------+----------+
//!                                   | Event (+ reply channel)
//!  client --WebSocket--> listener   v
//!    accept loop --> one thread per connection:     +------------------+
//!        [session thread] --Event::Commands-------> | dispatcher (hub) |--> history file
//!          ^  ^ doorbell: "socket readable"         +--------+---------+
//!          |  +---- [reactor thread] (epoll)                 | each client's frames, written
//!          |                                                 v without blocking (+ couriers)
//!  socket <+------ "a backlog waits" ---------------- [outlet per client] -----> socket
//! ```
//!
//! 1. [`listener`] accepts a TCP connection and gives it a thread, which reads the HTTP upgrade
//!    request and checks it ([`handshake`]): path, origin, limits.
//! 2. The thread becomes the client's [`session`]: it owns the tungstenite state and parks on a
//!    [`doorbell`], which the [`reactor`] (one thread watching every client socket) rings when the
//!    socket has bytes. It reads without blocking and parses frames ([`protocol`]). A parked
//!    session gives back the stack pages it no longer needs ([`stack`]).
//! 3. A chat message becomes an [`dispatcher::Event`] for the [`dispatcher`], the one thread that
//!    owns rooms, names and [`history`]. It gives the message an id, appends it to history (and the
//!    file), and serialises it once.
//! 4. After committing the batch, the dispatcher hands each member of the room the same bytes
//!    through the client's [`outlet`], which writes them straight to the socket without blocking,
//!    all of a batch's frames for that client in one `sendmsg`; [`courier`] threads do part of
//!    the clients on the other cores. Only what a socket does not take waits in its outlet, and
//!    the doorbell tells the session to write it when the socket has room.
//!
//! Nothing in the dispatcher blocks on a client: a backlog past its bound means the client is too
//! slow and is dropped. Every thread, queue, buffer and wait has a bound, named as a constant where
//! it lives. [`metrics`] counts; [`config`] holds every tunable.

pub mod config;
pub mod courier;
pub mod dispatcher;
pub mod doorbell;
pub mod eio_session;
pub mod engineio;
pub mod handshake;
pub mod history;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod outlet;
pub mod protocol;
pub mod ratelimit;
pub mod reactor;
pub mod session;
pub mod socketio;
pub mod stack;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Sender;

pub use config::Config;
use dispatcher::{Event, Hub, HubLimits};
use listener::WsShared;
use metrics::Metrics;

/// Events waiting for the dispatcher. When full, sessions wait (and so their clients, through
/// TCP): the dispatcher itself never waits.
const DISPATCHER_QUEUE: usize = 4096;
/// Backlog of each listening socket.
const LISTEN_BACKLOG: i32 = 1024;
/// After telling every client to go away, how long sessions get to send their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);
/// After cutting the remaining sockets, how long their threads get to end.
const SHUTDOWN_CUT_WAIT: Duration = Duration::from_millis(500);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} (port {port}): {source}")]
    Bind {
        addr: SocketAddr,
        port: u16,
        source: io::Error,
    },
    #[error("cannot open the history in {dir}: {source}")]
    History { dir: String, source: io::Error },
    #[error("cannot start a thread or the socket poller: {0}")]
    Thread(io::Error),
    #[error("cannot start the HTTP server: {0}")]
    Http(String),
}

/// Starts servers; see [`Server::start`].
pub struct Server;

/// A running server: its addresses, and the way to stop it.
pub struct Handle {
    http_addr: SocketAddr,
    ws_addr: SocketAddr,
    metrics: Arc<Metrics>,
    events: Sender<Event>,
    ws: Arc<WsShared>,
    http: Arc<tiny_http::Server>,
    accept_thread: JoinHandle<()>,
    reactor_thread: JoinHandle<()>,
    dispatcher_thread: JoinHandle<()>,
    http_threads: Vec<JoinHandle<()>>,
    /// Dropping the sender stops the keeper thread (see [`http::keep_accepting`]).
    http_keeper: (Sender<()>, JoinHandle<()>),
}

impl Server {
    /// Binds both ports, loads history, and starts every thread. Returns once the server accepts.
    pub fn start(config: Config) -> Result<Handle, StartError> {
        let http_listener = bind(config.bind, config.http_port, Some(config.http_timeout))?;
        let http_addr = local_addr(&http_listener, config.http_port)?;
        let ws_port = config.ws_port.unwrap_or(if config.http_port == 0 {
            0
        } else {
            http_addr.port().wrapping_add(1)
        });
        let ws_listener = bind(config.bind, ws_port, None)?;
        let ws_addr = local_addr(&ws_listener, ws_port)?;

        let history = history::History::open(
            config.history,
            config.data_dir.as_deref(),
            config.fsync,
            config.compact_bytes,
        )
        .map_err(|source| StartError::History {
            dir: format!("{:?}", config.data_dir),
            source,
        })?;
        let metrics = Arc::new(Metrics::default());
        let (events, inbox) = crossbeam_channel::bounded(DISPATCHER_QUEUE);
        let backlog = courier::Bounds {
            frames: config.client_queue,
            bytes: config.client_queue_bytes,
        };
        let limits = HubLimits {
            history: config.history,
            max_rooms: config.max_rooms,
            presence_limit: config.presence_limit,
            backlog,
        };
        let couriers = courier::Couriers::start(backlog, &metrics).map_err(StartError::Thread)?;
        let hub = Hub::new(history, limits, couriers, metrics.clone());
        let dispatcher_thread = spawn("dispatcher", move || hub.run(inbox))?;

        let reactor = reactor::Reactor::new().map_err(StartError::Thread)?;
        let reactor_for_thread = reactor.clone();
        let reactor_thread = spawn("reactor", move || reactor_for_thread.run())?;

        let host = display_host(config.bind);
        let ws = Arc::new(ws_shared(
            &config,
            &host,
            http_addr.port(),
            events.clone(),
            metrics.clone(),
            reactor,
        ));
        let accept_ws = ws.clone();
        let accept_thread = spawn("ws-accept", move || {
            listener::accept_loop(ws_listener, accept_ws)
        })?;

        let http = Arc::new(
            tiny_http::Server::from_listener(http_listener, None)
                .map_err(|e| StartError::Http(e.to_string()))?,
        );
        let http_shared = Arc::new(http::HttpShared {
            events: events.clone(),
            metrics: metrics.clone(),
            www_dir: config.www_dir.clone(),
            ws_port: ws_addr.port(),
            public_ws_url: config.public_ws_url.clone(),
            api_token: config.api_token.clone(),
            max_body_bytes: config.max_message_bytes,
            default_host: host,
        });
        let (keeper_stop, keeper_stopped) = crossbeam_channel::bounded(0);
        let interval = http::keeper_interval(config.http_timeout);
        let http_keeper = spawn("http-keeper", move || {
            http::keep_accepting(reachable(http_addr), interval, keeper_stopped)
        })?;
        let http_threads = (0..http::HTTP_WORKERS)
            .map(|_| {
                let (server, shared) = (http.clone(), http_shared.clone());
                spawn("http", move || http::worker(server, shared))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Handle {
            http_addr,
            ws_addr,
            metrics,
            events,
            ws,
            http,
            accept_thread,
            reactor_thread,
            dispatcher_thread,
            http_threads,
            http_keeper: (keeper_stop, http_keeper),
        })
    }
}

impl Handle {
    /// Where the page and API are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where WebSocket clients connect (path `/chat`).
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// The page's URL, as a person would open it.
    pub fn page_url(&self) -> String {
        format!("http://{}/", reachable(self.http_addr))
    }

    /// The WebSocket endpoint's URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/chat", reachable(self.ws_addr))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Connection threads running now, pending handshakes included.
    pub fn live_connections(&self) -> usize {
        self.ws.live_connections()
    }

    /// Stops accepting, commits history, sends close 1001 to every client, and returns when every
    /// thread the server started has ended (tiny_http's own connection threads end on their
    /// socket timeout).
    pub fn shutdown(self) {
        self.ws.stopping.store(true, Relaxed);
        let _ = TcpStream::connect_timeout(&reachable(self.ws_addr), Duration::from_secs(1));
        let _ = self.accept_thread.join();

        let _ = self
            .events
            .send_timeout(Event::Shutdown, Duration::from_secs(1));
        let _ = self.dispatcher_thread.join();
        if !self.ws.wait_all_ended(SHUTDOWN_GRACE) {
            self.ws.cut_all();
            self.ws.wait_all_ended(SHUTDOWN_CUT_WAIT);
        }
        self.ws.reactor.stop();
        let _ = self.reactor_thread.join();

        let (keeper_stop, keeper) = self.http_keeper;
        drop(keeper_stop);
        let _ = keeper.join();
        for _ in &self.http_threads {
            self.http.unblock();
        }
        for thread in self.http_threads {
            let _ = thread.join();
        }
        log::info!("wschat stopped");
    }
}

fn ws_shared(
    config: &Config,
    host: &str,
    http_port: u16,
    events: Sender<Event>,
    metrics: Arc<Metrics>,
    reactor: Arc<reactor::Reactor>,
) -> WsShared {
    let allow_any_origin = config.allow_origins.iter().any(|o| o == "*");
    let allow_origins = config
        .allow_origins
        .iter()
        .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
        .collect();
    let policy = handshake::Policy {
        http_port,
        allow_origins,
        allow_any_origin,
        trusted_proxy: config.trusted_proxy,
    };
    let settings = session::Settings {
        rate: config.rate,
        burst: config.burst,
        ping_interval: config.ping_interval,
        max_message_bytes: config.max_message_bytes,
    };
    let page_url = format!("http://{host}:{http_port}/");
    WsShared::new(
        policy,
        settings,
        events,
        metrics,
        reactor,
        config.handshake_timeout,
        config.max_clients,
        config.max_clients_per_ip,
        page_url,
    )
}

/// A listening socket; `timeouts` are set on the listener so accepted sockets inherit them.
fn bind(ip: IpAddr, port: u16, timeouts: Option<Duration>) -> Result<TcpListener, StartError> {
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::new(ip, port);
    let fail = |source| StartError::Bind { addr, port, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    if let Some(t) = timeouts {
        socket.set_read_timeout(Some(t)).map_err(fail)?;
        socket.set_write_timeout(Some(t)).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    Ok(socket.into())
}

fn local_addr(listener: &TcpListener, port: u16) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        port,
        source,
    })
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StartError> {
    thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map_err(StartError::Thread)
}

/// The host to print and to use in URLs: a wildcard bind is reached through loopback.
fn display_host(ip: IpAddr) -> String {
    match reachable(SocketAddr::new(ip, 0)).ip() {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// An address we can connect to: a wildcard bind is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
