//! Counters and gauges, shared by every thread as relaxed atomics, and their Prometheus text form.
//!
//! Hot paths add to these once per batch, not once per message, to keep cache lines quiet.
//! This module only counts; it never decides anything.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a WebSocket handshake was refused (a label of `wschat_handshakes_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    BadRequest,
    NotFound,
    UpgradeRequired,
    Forbidden,
    TooManyClients,
    TooManyFromAddress,
    TooManyPending,
    TooManyConnections,
    ConnectionRate,
    Timeout,
    /// Plain HTTP on the TLS port.
    TlsPlainHttp,
    /// A TLS handshake that failed: garbage, a bad or truncated ClientHello, an alert.
    TlsHandshake,
}

impl Rejection {
    const ALL: [Rejection; 12] = [
        Rejection::BadRequest,
        Rejection::NotFound,
        Rejection::UpgradeRequired,
        Rejection::Forbidden,
        Rejection::TooManyClients,
        Rejection::TooManyFromAddress,
        Rejection::TooManyPending,
        Rejection::TooManyConnections,
        Rejection::ConnectionRate,
        Rejection::Timeout,
        Rejection::TlsPlainHttp,
        Rejection::TlsHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad_request",
            Rejection::NotFound => "not_found",
            Rejection::UpgradeRequired => "upgrade_required",
            Rejection::Forbidden => "forbidden_origin",
            Rejection::TooManyClients => "too_many_clients",
            Rejection::TooManyFromAddress => "too_many_from_address",
            Rejection::TooManyPending => "too_many_pending",
            Rejection::TooManyConnections => "too_many_connections",
            Rejection::ConnectionRate => "connection_rate",
            Rejection::Timeout => "timeout",
            Rejection::TlsPlainHttp => "tls_plain_http",
            Rejection::TlsHandshake => "tls_handshake",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub connections_now: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub slow_clients_dropped: AtomicU64,
    pub rate_limited: AtomicU64,
    pub history_messages: AtomicU64,
    pub history_bytes: AtomicU64,
    pub history_write_failures: AtomicU64,
    pub handshakes_pending: AtomicU64,
    /// Bytes waiting in every client's outlet together (see `outlet::Bounds::total_bytes`).
    pub backlog_bytes: AtomicU64,
    /// Chat text on its way to the dispatcher (see `session::INBOUND_BUDGET_BYTES`).
    pub inbound_bytes: AtomicU64,
    /// `--redis` only (see `cluster`): 0 off, 1 up, 2 degraded.
    pub redis_state: AtomicU64,
    /// Times Redis became unreachable.
    pub redis_outages: AtomicU64,
    /// Work waiting for the Redis link, and work dropped because that queue was full.
    pub redis_outbox: AtomicU64,
    pub redis_dropped: AtomicU64,
    /// Malformed or foreign entries read from Redis and skipped.
    pub redis_bad_entries: AtomicU64,
    /// socket.io sessions alive, on either transport (a polling one holds no connection).
    pub socketio_sessions: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// When each kind of refusal was last logged (seconds since the Unix epoch; 0: never).
    logged_at: [AtomicU64; Rejection::ALL.len()],
}

/// A kind of refusal is logged the first time, then at most once per this, with its count: a
/// flood of refusals must not flood the log too.
pub const REFUSALS_LOGGED_EVERY_SECS: u64 = 60;

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts a refusal. Returns how many of this kind there have been, this one included, when
    /// this one is to be logged: the first of its kind, and then the first after each
    /// [`REFUSALS_LOGGED_EVERY_SECS`].
    pub fn reject(&self, why: Rejection) -> Option<u64> {
        let count = self.rejected[why as usize].fetch_add(1, Relaxed) + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs().max(1));
        let logged = &self.logged_at[why as usize];
        let last = logged.load(Relaxed);
        let due = last == 0 || now >= last + REFUSALS_LOGGED_EVERY_SECS;
        // Of the threads that find it due at once, one wins the exchange and logs.
        (due && logged.compare_exchange(last, now, Relaxed, Relaxed).is_ok()).then_some(count)
    }

    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Relaxed)
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, dispatcher_queue: usize) -> String {
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "wschat_connections",
            "gauge",
            "WebSocket connections open now.",
            get(&self.connections_now),
        );
        metric(
            "wschat_connections_total",
            "counter",
            "WebSocket connections accepted.",
            get(&self.connections_total),
        );
        metric(
            "wschat_messages_received_total",
            "counter",
            "Chat messages accepted from clients and the API.",
            get(&self.messages_received),
        );
        metric(
            "wschat_messages_sent_total",
            "counter",
            "Frames handed to client queues.",
            get(&self.messages_sent),
        );
        metric(
            "wschat_bytes_in_total",
            "counter",
            "WebSocket bytes read from clients.",
            get(&self.bytes_in),
        );
        metric(
            "wschat_bytes_out_total",
            "counter",
            "WebSocket bytes written to clients.",
            get(&self.bytes_out),
        );
        metric(
            "wschat_slow_clients_dropped_total",
            "counter",
            "Clients dropped for not keeping up: a queue over its bound, or nothing written for 10 s.",
            get(&self.slow_clients_dropped),
        );
        metric(
            "wschat_rate_limited_total",
            "counter",
            "Client messages dropped by the rate limit.",
            get(&self.rate_limited),
        );
        metric(
            "wschat_history_messages",
            "gauge",
            "Messages held in room history.",
            get(&self.history_messages),
        );
        metric(
            "wschat_history_bytes",
            "gauge",
            "Bytes held in room history (at most --history-bytes).",
            get(&self.history_bytes),
        );
        metric(
            "wschat_history_write_failures_total",
            "counter",
            "Failed writes or syncs of the history file.",
            get(&self.history_write_failures),
        );
        metric(
            "wschat_handshakes_pending",
            "gauge",
            "Connections at the door: reading a request, HTTP, handshakes.",
            get(&self.handshakes_pending),
        );
        metric(
            "wschat_backlog_bytes",
            "gauge",
            "Bytes waiting for slow clients, all together.",
            get(&self.backlog_bytes),
        );
        metric(
            "wschat_inbound_bytes",
            "gauge",
            "Chat text waiting for the dispatcher.",
            get(&self.inbound_bytes),
        );
        metric(
            "wschat_socketio_sessions",
            "gauge",
            "socket.io sessions alive (polling or WebSocket).",
            get(&self.socketio_sessions),
        );
        metric(
            "wschat_dispatcher_queue",
            "gauge",
            "Events waiting for the dispatcher.",
            dispatcher_queue as u64,
        );
        if get(&self.redis_state) != 0 {
            self.render_redis(&mut metric);
        }
        let name = "wschat_handshakes_rejected_total";
        let _ = writeln!(
            out,
            "# HELP {name} WebSocket handshakes refused, by reason.\n# TYPE {name} counter"
        );
        for why in Rejection::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                why.label(),
                self.rejected(why)
            );
        }
        out
    }

    /// The `--redis` metrics (absent without it).
    fn render_redis(&self, metric: &mut impl FnMut(&str, &str, &str, u64)) {
        let get = |c: &AtomicU64| c.load(Relaxed);
        metric(
            "wschat_redis_up",
            "gauge",
            "1 while the Redis link and feed are connected, 0 while degraded.",
            u64::from(get(&self.redis_state) == 1),
        );
        metric(
            "wschat_redis_outages_total",
            "counter",
            "Times Redis became unreachable.",
            get(&self.redis_outages),
        );
        metric(
            "wschat_redis_queue",
            "gauge",
            "Work waiting for the Redis link.",
            get(&self.redis_outbox),
        );
        metric(
            "wschat_redis_dropped_total",
            "counter",
            "Work refused because the Redis link's queue was full.",
            get(&self.redis_dropped),
        );
        metric(
            "wschat_redis_bad_entries_total",
            "counter",
            "Malformed or foreign entries read from Redis and skipped.",
            get(&self.redis_bad_entries),
        );
    }
}
