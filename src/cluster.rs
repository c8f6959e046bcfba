//! Several wschat nodes as one chat, through Redis (`--redis URL`).
//!
//! Two threads per node talk to Redis; the dispatcher never does. The *link* ([`link`]) takes
//! work from the dispatcher over a bounded channel and runs it against Redis: the chat messages
//! of a dispatcher batch (and any queued behind them) become one Lua script that takes their ids
//! from a global counter, appends each to its room's stream and publishes them together on the
//! one channel, atomically, so the channel's order is the id order. The link also keeps this
//! node's members in Redis, beats its heartbeat and sweeps nodes whose heartbeat stopped. The
//! *feed* ([`feed`]) subscribes to the channel and hands every entry to the dispatcher as an
//! [`Event::FromCluster`], in channel order (the messages of one script together, so the
//! dispatcher shows them in one batch); after a (re)connection it first reads the room streams
//! for what it missed, so nothing is shown twice or out of order. Every node, the sender's
//! included, shows a chat message only when the feed brings it: the same messages, in the same
//! order, with the same ids, everywhere.
//!
//! This module owns the Redis connections, their timeouts and reconnection, and the health
//! that `/healthz` and `/metrics` report. It never holds chat state: membership, names and
//! history stay the dispatcher's.

mod feed;
mod link;
mod presence;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use log::{info, warn};

use crate::dispatcher::{Event, PublishReply};
use crate::metrics::Metrics;
use crate::protocol::{ChatError, ChatMessage, ClientId};
use wire::{Body, Member};

/// Chat messages waiting for the link, and the chat text in them (its queue holds as many
/// items: batches of messages, presence and typing). Past either the dispatcher refuses new
/// chat messages with `busy` instead of waiting (presence waits in the roster): a stuck Redis
/// holds at most this much of this node's memory.
pub const OUTBOX: usize = 1024;
pub const OUTBOX_BYTES: u64 = 8 << 20;
/// Chat text the feed has handed the dispatcher that it has not handled yet. Past it the feed
/// waits (and Redis buffers for it, up to its pub/sub output limit, past which it drops the
/// feed, which then catches up from the streams): a resync cannot flood the dispatcher's queue.
pub const FEED_BYTES: u64 = 8 << 20;
/// Longest wait for Redis to connect, answer a command or take a write. A stuck Redis (one that
/// accepts bytes but never answers, like a SIGSTOPped one) is declared down after this.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a node renews its heartbeat and looks for dead nodes.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// While the feed is disconnected, the link checks its own connection this often: the two
/// find out about a Redis restart together, so it is logged once.
pub const RECHECK: Duration = Duration::from_millis(250);
/// A node whose heartbeat is this old is gone: three missed beats. Its members disappear from
/// every list within this plus one [`HEARTBEAT`] (the next sweep).
pub const NODE_EXPIRY: Duration = Duration::from_secs(6);
/// Reconnection waits double from the first to the cap, with up to half of it added at random
/// so that nodes do not all come back in the same millisecond.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// What a chat message sent while Redis is away is refused with (`not_saved`).
pub const UNREACHABLE: &str = "the other chat nodes are unreachable (Redis is down)";

/// Why `--redis` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--redis {url:?}: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot start the Redis link thread: {0}")]
    Thread(std::io::Error),
}

/// What the link and the feed hand the dispatcher.
pub enum Inbound {
    /// Chat messages in the one order: all that one channel entry (one post script, on
    /// whichever node) brought, to be shown in one dispatcher batch.
    Messages(Vec<Arrived>),
    /// A chat message of this node's client that Redis did not take.
    Refused { client: ClientId, error: ChatError },
    /// A member of this node whose name another node holds: it must be renamed.
    NameLost { client: ClientId, name: String },
    /// Another node's whole member list (after its reconnection): replaces what was known.
    Roster { node: u64, members: Vec<Member> },
    /// Every member of the other nodes, read after a (re)connection: replaces what was known.
    Members(Vec<Member>),
    /// A member of another node joined, moved or was renamed.
    Here(Member),
    /// A member of another node left.
    Gone { node: u64, client: ClientId },
    /// Another node is gone, and all its members with it.
    NodeGone(u64),
    Typing {
        room: String,
        name: String,
        active: bool,
    },
}

/// A chat message in the one order; `sender` is its sender's client if it is on this node.
pub struct Arrived {
    pub message: ChatMessage,
    pub sender: Option<ClientId>,
}

/// Who hears whether Redis took a chat message.
pub enum ReplyTo {
    /// A client of this node: it sees its message arrive, or an `error`.
    Client(ClientId),
    /// The HTTP API: answered with the message's id as soon as Redis took it.
    Api(PublishReply),
    /// No one waits for the answer.
    Nobody,
}

/// Work for the link thread.
enum Outbound {
    /// Chat messages of one dispatcher batch (at most [`link::BATCH`]), in order.
    Posts(Vec<(Body, ReplyTo)>),
    /// This member (as the roster has it now) joined, moved or was renamed.
    Here(ClientId),
    Gone(ClientId),
    Typing {
        room: String,
        name: String,
        active: bool,
    },
}

/// What the link and the feed share, and report.
struct Shared {
    client: redis::Client,
    node: u64,
    history: usize,
    history_bytes: usize,
    link_up: AtomicBool,
    feed_up: AtomicBool,
    /// Whether the last reported state was up: outage and recovery are logged once each.
    reported_up: AtomicBool,
    /// Chat messages and text waiting for the link ([`OUTBOX`], [`OUTBOX_BYTES`]) and chat
    /// text waiting for the dispatcher ([`FEED_BYTES`]).
    outbox_messages: AtomicU64,
    outbox_bytes: AtomicU64,
    feed_bytes: AtomicU64,
    /// Counts the link's reconnections: the feed starts over when it changes.
    link_generation: AtomicU64,
    /// Counts the link's heartbeats that Redis answered: after losing its connection, the feed
    /// waits for a newer one, so that it never follows a Redis the link has not seen alive.
    link_checks: AtomicU64,
    /// The largest message id this node has seen: the counter is never set below it.
    highest_id: AtomicU64,
    /// This node's members, kept by the dispatcher (never locked across Redis work): what the
    /// link publishes, and publishes whole again after a reconnection.
    roster: Mutex<HashMap<ClientId, Member>>,
    /// A change could not be queued for the link: it publishes the whole roster again.
    roster_stale: AtomicBool,
    stopping: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn up(&self) -> bool {
        self.link_up.load(Relaxed) && self.feed_up.load(Relaxed)
    }

    fn set_link(&self, up: bool, why: &str) {
        if up {
            self.link_generation.fetch_add(1, Relaxed);
        } else {
            self.feed_up.store(false, Relaxed); // it must follow the new connection afresh
        }
        self.link_up.store(up, Relaxed);
        self.report(why);
    }

    fn set_feed(&self, up: bool, why: &str) {
        self.feed_up.store(up, Relaxed);
        self.report(why);
    }

    /// Logs a change between up and degraded once, and sets the gauge.
    fn report(&self, why: &str) {
        let up = self.up();
        self.metrics
            .redis_state
            .store(if up { STATE_UP } else { STATE_DEGRADED }, Relaxed);
        if self.reported_up.swap(up, Relaxed) == up {
            return;
        }
        if up {
            info!(
                "redis: connected (node {}); chat spans every node",
                self.node
            );
        } else {
            Metrics::add(&self.metrics.redis_outages, 1);
            warn!(
                "redis: unreachable ({why}); until it is back this node serves its own clients \
                 alone (their messages are shown here only, without ids)"
            );
        }
    }

    fn saw_id(&self, id: u64) {
        self.highest_id.fetch_max(id, Relaxed);
    }

    fn roster(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Member>> {
        self.roster.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn member(&self, client: ClientId) -> Option<Member> {
        self.roster().get(&client).cloned()
    }

    fn roster_snapshot(&self) -> Vec<Member> {
        self.roster().values().cloned().collect()
    }
}

/// `wschat_redis_state`: 0 without `--redis`, 1 up, 2 degraded.
pub const STATE_UP: u64 = 1;
pub const STATE_DEGRADED: u64 = 2;

/// The dispatcher's side of the link: hands work over without ever waiting.
pub struct Cluster {
    shared: Arc<Shared>,
    outbox: Sender<Outbound>,
    threads: Vec<JoinHandle<()>>,
    /// Chat messages posted in the dispatcher's current batch: handed to the link together
    /// ([`Cluster::hand_over`]), so they travel as one script and one channel entry, and every
    /// node shows them in one batch, as one node shows what one read from a client brought.
    pending: Vec<(Body, ReplyTo)>,
    /// Those whose messages the link's queue had no room for: they are told `busy`.
    refused: Vec<ReplyTo>,
}

impl Cluster {
    /// Starts the link and the feed threads; they connect (and reconnect) by themselves. Until
    /// they are connected the node is degraded: it serves its own clients alone.
    pub fn start(
        url: &str,
        history: usize,
        history_bytes: usize,
        events: Sender<Event>,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(url).map_err(|source| ClusterError::Url {
            url: url.to_owned(),
            source,
        })?;
        let shared = Arc::new(Shared {
            client,
            node: node_id(),
            history,
            history_bytes,
            link_up: AtomicBool::new(false),
            feed_up: AtomicBool::new(false),
            reported_up: AtomicBool::new(false),
            outbox_messages: AtomicU64::new(0),
            outbox_bytes: AtomicU64::new(0),
            feed_bytes: AtomicU64::new(0),
            link_generation: AtomicU64::new(0),
            link_checks: AtomicU64::new(0),
            highest_id: AtomicU64::new(0),
            roster: Mutex::new(HashMap::new()),
            roster_stale: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            metrics,
        });
        shared.report("not connected yet");
        let (outbox, inbox) = crossbeam_channel::bounded(OUTBOX);
        let (s, e) = (shared.clone(), events.clone());
        let link = spawn("redis-link", move || link::run(&s, &inbox, &e))?;
        let s = shared.clone();
        let feed = spawn("redis-feed", move || feed::run(&s, &events))?;
        Ok(Cluster {
            shared,
            outbox,
            threads: vec![link, feed],
            pending: Vec::new(),
            refused: Vec::new(),
        })
    }

    /// This node's number, unique among the nodes with high probability (and checked: names
    /// are claimed in Redis).
    pub fn node(&self) -> u64 {
        self.shared.node
    }

    /// Whether Redis is reachable (the link and the feed are both connected).
    pub fn is_up(&self) -> bool {
        self.shared.up()
    }

    /// Hands a chat message to Redis (with the rest of this batch's, at its end). It is shown
    /// (to everyone, its sender included) when the feed brings it back with its id; refused at
    /// once if Redis is away or the link is full.
    pub fn post(&mut self, mut body: Body, reply: ReplyTo) -> Result<(), ChatError> {
        if !self.shared.up() {
            return Err(ChatError::NotSaved(UNREACHABLE.to_owned()));
        }
        let bytes = body.text.len() as u64;
        let (messages, queued) = (&self.shared.outbox_messages, &self.shared.outbox_bytes);
        if messages.load(Relaxed) >= OUTBOX as u64 || queued.load(Relaxed) + bytes > OUTBOX_BYTES {
            Metrics::add(&self.shared.metrics.redis_dropped, 1);
            return Err(ChatError::Busy);
        }
        messages.fetch_add(1, Relaxed);
        queued.fetch_add(bytes, Relaxed);
        body.node = self.shared.node;
        if let ReplyTo::Client(client) = &reply {
            body.client = *client; // so this node can show the sender its private message
        }
        self.pending.push((body, reply));
        if self.pending.len() >= link::BATCH {
            self.send_pending();
        }
        Ok(())
    }

    /// The end of a dispatcher batch: hands its chat messages to the link; returns those whose
    /// messages the link had no room for (they are to hear `busy`).
    pub fn hand_over(&mut self) -> Vec<ReplyTo> {
        self.send_pending();
        std::mem::take(&mut self.refused)
    }

    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let posts = std::mem::take(&mut self.pending);
        if let Err(Outbound::Posts(posts)) = self.send(Outbound::Posts(posts)) {
            for (body, reply) in posts {
                self.shared.outbox_messages.fetch_sub(1, Relaxed);
                let bytes = body.text.len() as u64;
                self.shared.outbox_bytes.fetch_sub(bytes, Relaxed);
                self.refused.push(reply);
            }
        }
    }

    /// The dispatcher handled a chat message the feed brought: its text no longer waits.
    pub fn handled(&self, text_bytes: usize) {
        self.shared.feed_bytes.fetch_sub(text_bytes as u64, Relaxed);
    }

    /// Tells the other nodes that this member joined, moved or was renamed.
    pub fn here(&mut self, client: ClientId, name: &str, room: &str) {
        let member = Member {
            node: self.shared.node,
            client,
            name: name.to_owned(),
            room: room.to_owned(),
        };
        self.shared.roster().insert(client, member);
        self.send_presence(Outbound::Here(client));
    }

    /// Tells the other nodes that this member left.
    pub fn gone(&mut self, client: ClientId) {
        self.shared.roster().remove(&client);
        self.send_presence(Outbound::Gone(client));
    }

    /// A presence change that cannot be queued is not lost: the roster has it, and the link
    /// publishes the roster whole at its next heartbeat.
    fn send_presence(&mut self, work: Outbound) {
        if self.send(work).is_err() {
            self.shared.roster_stale.store(true, Relaxed);
        }
    }

    pub fn typing(&mut self, room: &str, name: &str, active: bool) {
        let (room, name) = (room.to_owned(), name.to_owned());
        let _ = self.send(Outbound::Typing { room, name, active });
    }

    /// Queues work for the link, after this batch's chat messages (the order the dispatcher
    /// saw them in); gives it back if the queue is full.
    fn send(&mut self, work: Outbound) -> Result<(), Outbound> {
        if !matches!(work, Outbound::Posts(_)) {
            self.send_pending();
        }
        let sent = match self.outbox.try_send(work) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(work)) => {
                let dropped = match &work {
                    Outbound::Posts(posts) => posts.len() as u64,
                    _ => 1,
                };
                Metrics::add(&self.shared.metrics.redis_dropped, dropped);
                Err(work)
            }
            Err(TrySendError::Disconnected(work)) => Err(work),
        };
        let queued = self.outbox.len() as u64;
        self.shared.metrics.redis_outbox.store(queued, Relaxed);
        sent
    }

    /// Stops both threads (at most [`REDIS_TIMEOUT`] or so: each checks between waits).
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, Relaxed);
        let (outbox, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.outbox, outbox)); // the link sees its channel close
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ClusterError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map_err(ClusterError::Thread)
}

/// A random node number, small enough for a guest name (`guest-<node>-<client>`).
fn node_id() -> u64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: the process id is unique on this host at least.
        return u64::from(std::process::id());
    }
    u64::from(u32::from_le_bytes(bytes))
}

/// Capped exponential backoff with jitter, for reconnecting.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The next wait: the current step plus up to half of it at random.
    fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        let mut bytes = [0u8; 2];
        let _ = getrandom::fill(&mut bytes);
        let jitter = step.mul_f64(f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX) / 2.0);
        step + jitter
    }
}

/// Opens a connection with [`REDIS_TIMEOUT`] on connecting, reading and writing.
fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let con = client.get_connection_with_timeout(REDIS_TIMEOUT)?;
    con.set_read_timeout(Some(REDIS_TIMEOUT))?;
    con.set_write_timeout(Some(REDIS_TIMEOUT))?;
    Ok(con)
}

/// Redis key names: all under `wschat:`, so a database can be shared with other programs.
mod keys {
    pub const COUNTER: &str = "wschat:id";
    pub const CHANNEL: &str = "wschat:bus";
    pub const ROOMS: &str = "wschat:rooms";
    pub const NODES: &str = "wschat:nodes";

    pub fn stream(room: &str) -> String {
        format!("wschat:room:{room}")
    }

    pub fn alive(node: u64) -> String {
        format!("wschat:node:{node}:alive")
    }

    pub fn members(node: u64) -> String {
        format!("wschat:node:{node}:members")
    }

    /// A node's members' name keys (client -> key), so a sweep can free them.
    pub fn names(node: u64) -> String {
        format!("wschat:node:{node}:names")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_at_most_half_again_of_jitter() {
        let mut backoff = Backoff::new();
        let mut step = BACKOFF_FIRST;
        for _ in 0..10 {
            let wait = backoff.next_wait();
            assert!(
                wait >= step && wait <= step.mul_f64(1.5),
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(BACKOFF_CAP);
        }
        backoff.reset();
        assert!(backoff.next_wait() <= BACKOFF_FIRST.mul_f64(1.5));
    }
}
