//! # wschat: a WebSocket chat server with plain threads
//!
//! wschat is a small chat server built the old way: blocking sockets, one thread per connection,
//! channels between threads, and no async runtime. It is meant to be read.
//!
//! ## A tour, following one message
//!
//! ```text
//!  browser, client --> one port: [accept loop] --admission--> one thread per connection:
//!                        [front door: read the request head]
//!                          | plain HTTP                        | GET /chat + Upgrade
//!                          v answered on this thread (http)    v
//!                          | Event (+ reply channel)   [session thread] --Event::Commands--+
//!                          |                             ^ blocking recv on its socket     |
//!                          |                             |                                 |
//!                          v                             |                                 v
//!                     +--------------------------------------------------------------------+
//!                     | dispatcher (hub): clients, names, rooms, history --> history file  |
//!                     +----------------------------------+---------------------------------+
//!                                                        | each client's frames, written
//!                                                        v without blocking (+ couriers)
//!  socket <-- "a backlog waits" [reactor] (epoll) <-- [outlet per client] -----> socket
//! ```
//!
//! 1. [`listener`] accepts a TCP connection on the one public port, if [`admission`] lets it
//!    (descriptor budget, per-address shares and rates), and gives it a thread ([`pool`]: one a
//!    finished connection left parked, or a new one), the front door:
//!    it reads a request head ([`request`], bounded in size and time) and either answers plain
//!    HTTP on the spot ([`http`]: the page, the API, health, metrics) or checks a WebSocket
//!    upgrade ([`handshake`]: path, origin, client caps).
//! 2. The thread becomes the client's [`session`]: it owns the tungstenite state and waits in a
//!    blocking `recv` on its socket, and parses frames ([`protocol`]). A close the dispatcher
//!    asks for interrupts that `recv`. An idle session gives back the stack pages it no longer
//!    needs ([`stack`]).
//! 3. A chat message becomes an [`dispatcher::Event`] for the [`dispatcher`], the one thread that
//!    owns rooms, names and [`history`]. It gives the message an id, appends it to history (and the
//!    file), and serialises it once.
//! 4. Once the batch is saved, the dispatcher posts the same bytes to each member of the room, and
//!    [`delivery`] sends the whole batch in one call: each client's frames go to its [`outlet`],
//!    which writes them straight to the socket without blocking, all of them in one `sendmsg`;
//!    courier threads do part of the clients on the other cores. Only what a socket does not take
//!    waits in its outlet, and the [`reactor`] (one thread, epoll) writes it when the socket has
//!    room. If the batch cannot be saved (a full disk), its messages are shown to no one and each
//!    sender gets an error.
//!
//! With `--tls-cert` (feature `tls`), the same road runs inside TLS: the connection's thread
//! first completes a TLS handshake (`tls`), within the deadline of the first request head, and
//! everything after reads and writes a [`wire::Wire`]; the session decrypts what it reads, and
//! each client's outlet encrypts its frames (serialised once, encrypted per client) on the way
//! into its backlog, whose bounds then count what the socket carries.
//!
//! socket.io clients take the same road from step 3 on: [`sio_door`] serves `/socket.io/`
//! (long polls on the connection's own thread, or a session in socket.io's dialect), each client
//! is a [`sio_link::Link`] that turns Engine.IO and socket.io packets ([`engineio`],
//! [`eio_session`], [`socketio`]) into the same events, and its outlet turns the dispatcher's
//! frames into socket.io events, for its socket or its polling queue.
//!
//! With `--redis`, several nodes are one chat: at step 3 the dispatcher hands the message to
//! [`cluster`]'s link thread instead, which has Redis give it its id and publish it; every node
//! shows it when its feed thread brings it back, so all show the same messages in one order.
//!
//! Nothing in the dispatcher blocks on a client: a backlog past its bound means the client is too
//! slow and is dropped. Every thread, queue, buffer and wait has a bound, named as a constant where
//! it lives. [`metrics`] counts; [`config`] holds every tunable.
//!
//! ## What is public
//!
//! A program runs the server with [`Server::start`], which takes a [`Config`] and returns a
//! [`Handle`] (its address, its [`Metrics`], and `shutdown`); `src/main.rs` is that and the
//! command line. The modules a test or a fuzz target calls on their own are public: the pure
//! parsers and checkers ([`protocol`], [`names`], [`request`], [`handshake`], [`http`]'s path
//! check, socket.io's [`engineio`], [`eio_session`] and [`socketio`]) and [`config`]. Everything
//! else is the running server's machinery, private to the crate; the links above lead to it in
//! `cargo doc --document-private-items`.

// The tour above is a map of the private modules too.
#![allow(rustdoc::private_intra_doc_links)]

// The parts a reader, a test or a fuzz target uses on their own: parsers and checkers that are
// pure functions of their input, and the configuration.
pub mod config;
pub mod eio_session;
pub mod engineio;
pub mod handshake;
pub mod http;
pub mod names;
pub mod protocol;
pub mod request;
pub mod socketio;
#[cfg(feature = "tls")]
pub mod tls;

// The running server's machinery: reached through `Server` and `Handle` only.
mod admission;
mod cluster;
mod delivery;
mod dispatcher;
mod history;
mod listener;
mod metrics;
mod outlet;
mod pool;
mod ratelimit;
mod reactor;
#[cfg(feature = "tls")]
mod redirect;
mod session;
mod sio_door;
mod sio_link;
mod stack;
mod wire;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use admission::Admission;
pub use config::Config;
use dispatcher::{Event, Hub, HubLimits};
use listener::Front;
pub use metrics::Metrics;
/// How a test counts the connection threads parked for the next connection, and their bound.
pub use pool::{MAX_PARKED_THREADS, PARKED_THREAD_NAME};

/// Events waiting for the dispatcher. When full, sessions wait (and so their clients, through
/// TCP): the dispatcher itself never waits.
const DISPATCHER_QUEUE: usize = 4096;
/// Connections the kernel holds for the accept loop. A reconnect storm brings thousands within
/// a second, faster than the accept loop starts their threads; past the backlog the kernel drops
/// their SYNs and each client waits a 1 s retransmit (then 3 s). Linux caps it at
/// `net.core.somaxconn` (4096 by default); each waiting connection costs the kernel a socket.
const LISTEN_BACKLOG: i32 = 4096;
/// After telling every client to go away, how long sessions get to send their close frames.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);
/// After cutting the remaining sockets, how long their threads get to end.
const SHUTDOWN_CUT_WAIT: Duration = Duration::from_millis(500);

/// Most connections at the door at once (reading a request head, an HTTP exchange, a
/// handshake), over all addresses: each costs a thread until its deadline.
pub const MAX_AT_DOOR: usize = 1024;
/// Most of those from one address: one address holding silent sockets leaves the rest free.
/// `--load-test` lifts it to [`MAX_AT_DOOR`]: a load generator's reconnect storm comes from one
/// address.
pub const MAX_AT_DOOR_PER_ADDRESS: usize = 64;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {} port {}: {source}{hint}", addr.ip(), addr.port())]
    Bind {
        addr: SocketAddr,
        source: io::Error,
        hint: &'static str,
    },
    #[error("--data-dir {}: {problem}", dir.display())]
    History {
        dir: std::path::PathBuf,
        /// What is wrong, as the user sees it (see `data_dir_problem`).
        problem: String,
        source: io::Error,
    },
    #[error("cannot start a thread or the socket poller: {0}")]
    Thread(io::Error),
    /// The TLS pair cannot be used (unreadable, not PEM, key not the certificate's).
    #[cfg(feature = "tls")]
    #[error("{0}")]
    Tls(#[from] tls::PairError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// Starts servers; see [`Server::start`].
pub struct Server;

/// A running server: its address, and the way to stop it.
pub struct Handle {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    events: Sender<Event>,
    front: Arc<Front>,
    accept_thread: JoinHandle<()>,
    sweep_thread: JoinHandle<()>,
    reactor_thread: JoinHandle<()>,
    dispatcher_thread: JoinHandle<()>,
    /// `--redirect-http`: its shared state, address and accept thread.
    #[cfg(feature = "tls")]
    redirect: Option<(Arc<redirect::Redirect>, SocketAddr, JoinHandle<()>)>,
}

impl Server {
    /// Binds the port, loads history, and starts every thread. Returns once the server accepts.
    pub fn start(config: Config) -> Result<Handle, StartError> {
        #[cfg(feature = "tls")]
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::new(tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })?)),
            _ => None,
        };
        let listener = bind(config.bind, config.http_port)?;
        let addr = local_addr(&listener, config.http_port)?;

        let history = history::History::open(&history::Settings {
            per_room: config.history,
            total_bytes: config.history_bytes,
            data_dir: config.data_dir.as_deref(),
            fsync: config.fsync,
            compact_bytes: config.compact_bytes,
            max_line_bytes: history::max_line_bytes(config.max_message_bytes),
        })
        .map_err(|source| {
            let dir = config.data_dir.clone().unwrap_or_default();
            let problem = data_dir_problem(&dir, &source);
            StartError::History {
                dir,
                problem,
                source,
            }
        })?;
        let metrics = Arc::new(Metrics::default());
        let (events, inbox) = crossbeam_channel::bounded(DISPATCHER_QUEUE);
        let limits = HubLimits {
            history: config.history,
            max_rooms: config.max_rooms,
            presence_limit: config.presence_limit,
            presence_burst: config.presence_burst,
            room_quiet: config.room_quiet,
            room_rate_bytes: config.room_rate_bytes,
            room_burst_bytes: ratelimit::byte_burst(
                config.room_rate_bytes,
                config.max_message_bytes,
            ),
        };
        let delivery = delivery::Delivery::start(metrics.clone()).map_err(StartError::Thread)?;
        let mut hub = Hub::new(history, limits, delivery, metrics.clone());
        if let Some(url) = &config.redis {
            let (history, bytes) = (config.history, config.history_bytes);
            let link =
                cluster::Cluster::start(url, history, bytes, events.clone(), metrics.clone());
            hub = hub.with_cluster(link?);
        }
        let dispatcher_thread = spawn("dispatcher", move || hub.run(inbox))?;

        let reactor = reactor::Reactor::new().map_err(StartError::Thread)?;
        let reactor_for_thread = reactor.clone();
        let reactor_thread = spawn("reactor", move || reactor_for_thread.run())?;

        #[allow(unused_mut)] // without TLS nothing more is set
        let mut front = front(&config, addr, events.clone(), metrics.clone(), reactor);
        #[cfg(feature = "tls")]
        {
            front.tls = tls;
        }
        let front = Arc::new(front);
        let accept_front = front.clone();
        let accept_thread = spawn("accept", move || {
            listener::accept_loop(listener, accept_front)
        })?;
        let sweep_front = front.clone();
        let sweep_thread = spawn("socketio-sweep", move || {
            let front = &*sweep_front;
            front
                .sio
                .sweep_until_stopped(&front.stopping, &front.events)
        })?;
        #[cfg(feature = "tls")]
        let redirect = match config.redirect_http {
            Some(port) => Some(start_redirect(&config, port, addr.port())?),
            None => None,
        };
        Ok(Handle {
            #[cfg(feature = "tls")]
            redirect,
            addr,
            metrics,
            events,
            front,
            accept_thread,
            sweep_thread,
            reactor_thread,
            dispatcher_thread,
        })
    }
}

impl Handle {
    /// The one public address: page, API and WebSockets.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the page and API are served: [`Handle::addr`].
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where WebSocket clients connect (path `/chat`): [`Handle::addr`].
    pub fn ws_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL, as a person would open it.
    pub fn page_url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}/", reachable(self.addr))
    }

    /// The WebSocket endpoint's URL.
    pub fn ws_url(&self) -> String {
        let scheme = if self.is_tls() { "wss" } else { "ws" };
        format!("{scheme}://{}/chat", reachable(self.addr))
    }

    /// `--redirect-http`'s address, if it listens.
    #[cfg(feature = "tls")]
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(|(_, addr, _)| *addr)
    }

    /// Whether the port speaks TLS (`--tls-cert`).
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.front.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Reads the TLS pair again (on `SIGHUP`): new connections get the new one, open ones keep
    /// theirs. A bad pair is refused, and the old one stays. `Ok` without TLS (nothing to do).
    #[cfg(feature = "tls")]
    pub fn reload_tls(&self) -> Result<(), tls::PairError> {
        match &self.front.tls {
            Some(tls) => tls.certificates().reload(),
            None => Ok(()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Connection threads running now, HTTP and pending handshakes included.
    pub fn live_connections(&self) -> usize {
        self.front.live_connections()
    }

    /// Stops accepting, commits history, sends close 1001 to every client, and returns when every
    /// thread the server started has ended.
    pub fn shutdown(self) {
        let start = Instant::now();
        #[cfg(feature = "tls")]
        if let Some((redirect, addr, thread)) = self.redirect {
            redirect.stopping.store(true, Relaxed);
            let _ = TcpStream::connect_timeout(&reachable(addr), Duration::from_secs(1));
            let _ = thread.join();
        }
        self.front.stopping.store(true, Relaxed);
        let _ = TcpStream::connect_timeout(&reachable(self.addr), Duration::from_secs(1));
        let _ = self.accept_thread.join();
        self.sweep_thread.thread().unpark();
        let _ = self.sweep_thread.join();
        let closed = start.elapsed();

        let _ = self
            .events
            .send_timeout(Event::Shutdown, Duration::from_secs(1));
        let _ = self.dispatcher_thread.join();
        let told = start.elapsed();
        self.front.sio.close_all(); // polls waiting are answered, probes end
        if !self.front.wait_all_ended(SHUTDOWN_GRACE) {
            self.front.cut_all();
            self.front.wait_all_ended(SHUTDOWN_CUT_WAIT);
        }
        self.front.reactor.stop();
        let _ = self.reactor_thread.join();
        let (closed, told) = (closed.as_millis(), told.as_millis());
        log::info!(
            "wschat stopped in {} ms (listener closed at {closed} ms, dispatcher done at {told} ms)",
            start.elapsed().as_millis()
        );
    }
}

/// Everything the connection threads share, from the config.
fn front(
    config: &Config,
    addr: SocketAddr,
    events: Sender<Event>,
    metrics: Arc<Metrics>,
    reactor: Arc<reactor::Reactor>,
) -> Front {
    let host = display_host(config.bind);
    let port = addr.port();
    let policy = handshake::Policy {
        own_origins: own_origins(config, port),
        port,
        wildcard_bind: config.bind.is_unspecified(),
        allow_origins: normalized_origins(&config.allow_origins),
        allow_any_origin: config.allow_origins.iter().any(|o| o == "*"),
        trusted_proxy: config.trusted_proxy,
        echo: config.echo,
    };
    let settings = session::Settings {
        rate: config.rate,
        burst: config.burst,
        ping_interval: config.ping_interval,
        max_message_bytes: config.max_message_bytes,
        backlog: outlet::Bounds {
            frames: config.client_queue,
            bytes: config.client_queue_bytes,
            total_bytes: config.backlog_bytes,
        },
        rate_bytes: config.rate_bytes,
    };
    let http = http::HttpShared {
        events: events.clone(),
        metrics: metrics.clone(),
        www_dir: config.www_dir.clone(),
        public_ws_url: config.public_ws_url.clone(),
        api_token: config.api_token.clone(),
        max_body_bytes: config.max_message_bytes,
        default_host: format!("{host}:{port}"),
        api_posts_per_address: ratelimit::AddressBuckets::new(
            config.api_rate,
            2.0 * config.api_rate,
        ),
        api_posts: std::sync::Mutex::new(ratelimit::TokenBucket::new(
            config.api_rate,
            2.0 * config.api_rate,
            std::time::Instant::now(),
        )),
        trusted_proxy: config.trusted_proxy,
        ws_scheme: if config.tls_cert.is_some() {
            "wss"
        } else {
            "ws"
        },
    };
    let bytes_per_address = ratelimit::AddressBuckets::new(
        config.rate_bytes_per_ip,
        ratelimit::byte_burst(config.rate_bytes_per_ip, config.max_message_bytes),
    );
    Front::new(
        policy,
        settings,
        events,
        metrics,
        reactor,
        Arc::new(Admission::new(admission_limits(config))),
        bytes_per_address,
        (http, socketio_door(config)),
        (config.handshake_timeout, config.http_timeout),
        format!("{}://{host}:{port}/", page_scheme(config)),
    )
}

/// `--redirect-http PORT`: its listener and thread, pointing at the https port.
#[cfg(feature = "tls")]
fn start_redirect(
    config: &Config,
    port: u16,
    https_port: u16,
) -> Result<(Arc<redirect::Redirect>, SocketAddr, JoinHandle<()>), StartError> {
    let redirect = Arc::new(redirect::Redirect::new(
        https_port,
        display_host(config.bind),
        config.handshake_timeout,
    ));
    let wanted = SocketAddr::new(config.bind, port);
    let (addr, thread) =
        redirect::start(wanted, redirect.clone()).map_err(|source| StartError::Bind {
            addr: wanted,
            source,
            hint: " (--redirect-http)",
        })?;
    Ok((redirect, addr, thread))
}

/// `https` when the port speaks TLS.
fn page_scheme(config: &Config) -> &'static str {
    if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    }
}

/// The socket.io door: Engine.IO sessions within the client caps, as WebSocket clients are.
fn socketio_door(config: &Config) -> sio_door::SioDoor {
    let registry = eio_session::RegistryLimits {
        max_sessions: config.max_clients,
        max_per_address: config.max_clients_per_ip,
    };
    sio_door::SioDoor::new(
        eio_session::Limits::from_config(config),
        registry,
        config.socketio_client.clone(),
    )
}

/// The admission limits: the client caps from the flags, all within the descriptor budget.
fn admission_limits(config: &Config) -> admission::Limits {
    let budget = admission::fd_budget();
    let wanted = config.max_clients.saturating_add(MAX_AT_DOOR);
    if config.max_clients == 0 || wanted > budget {
        log::warn!(
            "the file-descriptor limit allows {budget} connections in all (--max-clients {} \
             plus {MAX_AT_DOOR} at the door would need {wanted}); raise `ulimit -n` for more",
            config.max_clients
        );
    }
    admission::Limits {
        connections: budget,
        at_door: MAX_AT_DOOR,
        at_door_per_address: if config.load_test {
            MAX_AT_DOOR
        } else {
            MAX_AT_DOOR_PER_ADDRESS
        },
        rate_per_address: config.conn_rate_per_ip,
        burst_per_address: 2.0 * config.conn_rate_per_ip,
        clients: config.max_clients,
        clients_per_address: config.max_clients_per_ip,
        exempt: config.trusted_proxy,
    }
}

/// The origins of the pages this server serves: its own address (and `localhost` when it
/// listens on loopback or everywhere), and the public URL's.
fn own_origins(config: &Config, port: u16) -> Vec<String> {
    let scheme = page_scheme(config);
    let with_port = |host: &str| match (scheme, port) {
        ("http", 80) | ("https", 443) => format!("{scheme}://{host}"),
        _ => format!("{scheme}://{host}:{port}"),
    };
    let mut origins = vec![with_port(&display_host(config.bind))];
    if config.bind.is_loopback() || config.bind.is_unspecified() {
        origins.extend(["localhost", "127.0.0.1", "[::1]"].map(with_port));
    }
    origins.extend(config.public_ws_url.as_deref().and_then(page_origin));
    normalized_origins(&origins)
}

/// The page origin that goes with a WebSocket URL: `wss://chat.example.org/chat` ->
/// `https://chat.example.org`.
fn page_origin(ws_url: &str) -> Option<String> {
    let (scheme, rest) = ws_url.split_once("://")?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "wss" | "https" => "https",
        _ => "http",
    };
    let authority = rest.split('/').next()?;
    Some(format!("{scheme}://{authority}"))
}

/// Origins as the handshake compares them: lower-case, no trailing slash.
fn normalized_origins(origins: &[String]) -> Vec<String> {
    origins
        .iter()
        .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
        .collect()
}

/// The listening socket.
fn bind(ip: IpAddr, port: u16) -> Result<TcpListener, StartError> {
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::new(ip, port);
    let fail = |source: io::Error| {
        let hint = if source.kind() == io::ErrorKind::AddrInUse {
            " (another program uses this port: pick another with --port or PORT)"
        } else {
            ""
        };
        StartError::Bind { addr, source, hint }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    // Before `listen`: every connection, from the first, inherits them.
    listener::set_socket_options((&socket).into()).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)?;
    Ok(socket.into())
}

fn local_addr(listener: &TcpListener, port: u16) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        source,
        hint: "",
    })
}

/// Why a data dir could not be used, in the user's words rather than the OS's.
fn data_dir_problem(dir: &std::path::Path, e: &io::Error) -> String {
    use io::ErrorKind::*;
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => "is not a directory".into(),
        Ok(_) if matches!(e.kind(), PermissionDenied | ReadOnlyFilesystem | NotFound) => {
            "is not writable".into()
        }
        Ok(_) => format!("cannot hold the history: {e}"),
        Err(_) => format!("cannot be created: {e}"),
    }
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
