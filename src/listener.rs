//! The WebSocket listener: a blocking `std::net::TcpListener` whose accept loop gives every
//! connection its own thread. That thread does the handshake (under a total deadline), takes a
//! client slot (total and per-address limits), and then runs the session.
//!
//! This module owns the bookkeeping of connections as sockets: how many are pending or open, from
//! where, and a handle on each so shutdown can cut them. It knows nothing of rooms or names.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, info, warn};

use crate::dispatcher::Event;
use crate::handshake::{self, Policy, Refusal};
use crate::metrics::{Metrics, Rejection};
use crate::reactor::Reactor;
use crate::session::{self, Env, Joining, SESSION_STACK_BYTES, Settings};

/// Handshakes in progress at once, over all addresses. Large enough that hundreds of stalled
/// sockets do not lock out real clients; each costs one thread until its deadline.
pub const MAX_PENDING_HANDSHAKES: u64 = 2048;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What every connection thread shares.
pub struct WsShared {
    pub policy: Policy,
    pub settings: Settings,
    pub events: Sender<Event>,
    pub metrics: Arc<Metrics>,
    pub reactor: Arc<Reactor>,
    pub handshake_timeout: Duration,
    pub max_clients: usize,
    pub max_clients_per_ip: usize,
    /// Shown to plain HTTP clients that knock on the WebSocket port.
    pub page_url: String,
    pub stopping: AtomicBool,
    next_id: AtomicU64,
    table: Mutex<Table>,
    /// Signalled when a connection thread ends.
    ended: Condvar,
}

/// Every socket and client slot, keyed by connection id.
#[derive(Default)]
struct Table {
    streams: HashMap<u64, Arc<TcpStream>>,
    clients: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl WsShared {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: Policy,
        settings: Settings,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
        reactor: Arc<Reactor>,
        handshake_timeout: Duration,
        max_clients: usize,
        max_clients_per_ip: usize,
        page_url: String,
    ) -> Self {
        WsShared {
            policy,
            settings,
            events,
            metrics,
            reactor,
            handshake_timeout,
            max_clients,
            max_clients_per_ip,
            page_url,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            table: Mutex::new(Table::default()),
            ended: Condvar::new(),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere cannot leave the table half-updated: every update is one statement.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection threads still running (pending handshakes included).
    pub fn live_connections(&self) -> usize {
        self.table().streams.len()
    }

    /// Cuts every socket: blocked reads return, blocked writes fail, threads end.
    pub fn cut_all(&self) {
        for stream in self.table().streams.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Waits until every connection thread has ended, or `timeout` passes; true if all ended.
    pub fn wait_all_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut table = self.table();
        while !table.streams.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            table = self
                .ended
                .wait_timeout(table, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn take_slot(&self, ip: IpAddr) -> Result<ClientSlot<'_>, Refusal> {
        let mut table = self.table();
        if self.max_clients > 0 && table.clients >= self.max_clients {
            return Err(Refusal::TooManyClients);
        }
        let from_ip = table.per_ip.entry(ip).or_default();
        if self.max_clients_per_ip > 0 && *from_ip >= self.max_clients_per_ip {
            return Err(Refusal::TooManyFromAddress(ip));
        }
        *from_ip += 1;
        table.clients += 1;
        Ok(ClientSlot { shared: self, ip })
    }
}

/// A counted client; dropping it gives the slot back.
struct ClientSlot<'a> {
    shared: &'a WsShared,
    ip: IpAddr,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut table = self.shared.table();
        table.clients -= 1;
        if let Some(n) = table.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A registered socket; dropping it unregisters it and wakes [`WsShared::wait_all_ended`].
struct Registered<'a> {
    shared: &'a WsShared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.table().streams.remove(&self.id);
        self.shared.ended.notify_all();
    }
}

/// Counts a pending handshake until dropped.
struct Pending<'a>(&'a Metrics);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.handshakes_pending.fetch_sub(1, Relaxed);
    }
}

/// Accepts until [`WsShared::stopping`] is set (and the listener is poked with a connection).
pub fn accept_loop(listener: TcpListener, shared: Arc<WsShared>) {
    for conn in listener.incoming() {
        if shared.stopping.load(Relaxed) {
            break;
        }
        match conn {
            Ok(stream) => spawn_connection(&shared, stream),
            Err(e) => {
                warn!("websocket accept failed: {e}");
                thread::sleep(ACCEPT_ERROR_PAUSE);
            }
        }
    }
    debug!("websocket listener stopped");
}

fn spawn_connection(shared: &Arc<WsShared>, stream: TcpStream) {
    let Ok(peer) = stream.peer_addr() else { return }; // reset before we looked
    if shared.metrics.handshakes_pending.load(Relaxed) >= MAX_PENDING_HANDSHAKES {
        let refused = shared.metrics.reject(Rejection::TooManyPending);
        // A flood of these would flood the log too: say it the 1st, 2nd, 4th, 8th... time.
        if refused.is_power_of_two() {
            warn!(
                "refused connection from {peer}: {MAX_PENDING_HANDSHAKES} handshakes already pending ({refused} refused so far)"
            );
        }
        return;
    }
    let id = shared.next_id.fetch_add(1, Relaxed);
    let stream = Arc::new(stream);
    // Register before spawning, so shutdown never misses a socket.
    shared.table().streams.insert(id, stream.clone());
    shared.metrics.handshakes_pending.fetch_add(1, Relaxed);
    let thread_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("ws-{id}"))
        .stack_size(SESSION_STACK_BYTES)
        .spawn(move || {
            let shared = &*thread_shared;
            let registered = Registered { shared, id };
            let pending = Pending(&shared.metrics);
            if catch_unwind(AssertUnwindSafe(|| {
                connection(shared, id, stream, peer, pending)
            }))
            .is_err()
            {
                log::error!("connection {id} from {peer}: its thread panicked; cleaned up");
            }
            drop(registered);
        });
    if let Err(e) = spawned {
        warn!("cannot start a thread for {peer}: {e}");
        shared.metrics.handshakes_pending.fetch_sub(1, Relaxed);
        shared.table().streams.remove(&id);
    }
}

/// One connection's whole life: handshake, slot, session.
fn connection(
    shared: &WsShared,
    id: u64,
    stream: Arc<TcpStream>,
    peer: SocketAddr,
    pending: Pending<'_>,
) {
    let Some((upgrade, leftover)) = handshake(shared, &stream, peer) else {
        return;
    };
    drop(pending);
    let _slot = match shared.take_slot(upgrade.client_ip) {
        Ok(slot) => slot,
        Err(refusal) => return refuse(shared, &stream, peer, &refusal),
    };
    let response = handshake::accept_response(&upgrade);
    debug!("handshake response to {peer}:\n{response}");
    let setup = handshake::send(&stream, &response)
        .and_then(|()| stream.set_read_timeout(None))
        .and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        return debug!("connection {id} from {peer} lost during the handshake: {e}");
    }
    let joining = Joining {
        id,
        peer: upgrade.client_ip.to_string(),
        name: upgrade.name,
        room: upgrade.room,
        since: upgrade.since,
    };
    let env = Env {
        settings: &shared.settings,
        events: &shared.events,
        metrics: &shared.metrics,
        reactor: &shared.reactor,
    };
    let reason = session::serve(stream, leftover, joining, env);
    debug!("connection {id} from {peer} ended: {reason}");
}

/// Reads and checks the request; answers refusals itself. Never inlined: its buffers then leave
/// the stack before the session starts (an idle connection's memory is mostly its stack).
#[inline(never)]
fn handshake(
    shared: &WsShared,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Option<(handshake::Upgrade, Vec<u8>)> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let _ = stream.set_write_timeout(Some(shared.handshake_timeout));
    let (head, rest) = match handshake::read_request(stream, deadline) {
        Ok(request) => request,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            shared.metrics.reject(Rejection::Timeout);
            info!(
                "rejected handshake from {peer}: not completed within {:?}",
                shared.handshake_timeout
            );
            return None;
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            refuse(
                shared,
                stream,
                peer,
                &Refusal::BadRequest("request head too large"),
            );
            return None;
        }
        Err(e) => {
            debug!("handshake from {peer} abandoned: {e}");
            return None;
        }
    };
    debug!(
        "handshake request from {peer}:\n{}",
        String::from_utf8_lossy(&head)
    );
    match handshake::check(&head, peer.ip(), &shared.policy) {
        Ok(upgrade) => Some((upgrade, rest)),
        Err(refusal) => {
            refuse(shared, stream, peer, &refusal);
            None
        }
    }
}

fn refuse(shared: &WsShared, stream: &TcpStream, peer: SocketAddr, refusal: &Refusal) {
    shared.metrics.reject(refusal.kind());
    info!("rejected handshake from {peer}: {refusal}");
    let response = refusal.response(&shared.page_url);
    debug!("handshake response to {peer}:\n{response}");
    let _ = handshake::send(stream, &response);
    let _ = stream.shutdown(Shutdown::Write);
}
