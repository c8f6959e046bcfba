//! The link thread: the one writer to Redis. It runs the dispatcher's work (chat messages,
//! presence, typing) in order on one connection, beats this node's heartbeat and sweeps nodes
//! whose heartbeat stopped. It never reads the channel (the feed does) and never waits on the
//! dispatcher: answers go back as events it may drop, never as a wait.

use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use redis::{Connection, RedisResult, Script};

use super::wire::{self, Entry};
use super::{Backoff, HEARTBEAT, Inbound, NODE_EXPIRY, Outbound, ReplyTo, Shared, keys};
use crate::dispatcher::Event;
use crate::protocol::ChatError;

/// Takes the next id, stores a room message in its stream (trimmed to about `--history`),
/// publishes it: one atomic step, so the channel's order is the id order.
const POST: &str = r#"
local id = redis.call('INCR', KEYS[1])
local entry = '{"k":"m","id":' .. id .. ',"m":' .. ARGV[1] .. '}'
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id .. '-0', 'm', entry)
  redis.call('SADD', KEYS[3], ARGV[4])
end
redis.call('PUBLISH', KEYS[4], entry)
return id
"#;

/// Raises the id counter to at least ARGV[1]: a Redis that lost its data (restarted without
/// persistence) must never hand out an id some node has already shown.
const FLOOR: &str = r"
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
";

/// Records a member in its node's hash, and publishes it.
const HERE: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 0
";

/// Forgets a member, and publishes it.
const GONE: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 0
";

/// Removes a node whose heartbeat expired (or that is retiring, having deleted its own), with
/// its members, and tells everyone; only the first sweeper to see it does.
const SWEEP: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SREM', KEYS[3], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', KEYS[4], ARGV[2])
return 1
";

/// The compiled scripts (their SHA1s; sent in full once per connection if Redis lacks them).
struct Scripts {
    post: Script,
    floor: Script,
    here: Script,
    gone: Script,
    sweep: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            post: Script::new(POST),
            floor: Script::new(FLOOR),
            here: Script::new(HERE),
            gone: Script::new(GONE),
            sweep: Script::new(SWEEP),
        }
    }
}

/// The thread's body: connect, serve until the connection fails, wait, again; until stopped.
pub(super) fn run(shared: &Shared, outbox: &Receiver<Outbound>, events: &Sender<Event>) {
    let scripts = Scripts::new();
    let mut backoff = Backoff::new();
    let mut link = Link {
        shared,
        scripts: &scripts,
        events,
    };
    while !shared.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        let why = match super::connect(&shared.client).and_then(|mut con| {
            link.prepare(&mut con)?;
            shared.set_link(true, "");
            backoff.reset();
            link.serve(&mut con, outbox)
        }) {
            Ok(()) => break, // the dispatcher is gone: stop
            Err(e) => e.to_string(),
        };
        shared.set_link(false, &why);
        link.refuse_until(Instant::now() + backoff.next_wait(), outbox);
    }
    link.retire();
}

struct Link<'a> {
    shared: &'a Shared,
    scripts: &'a Scripts,
    events: &'a Sender<Event>,
}

impl Link<'_> {
    /// Makes a fresh connection ready: the id counter at least what this node has seen, this
    /// node's heartbeat.
    fn prepare(&mut self, con: &mut Connection) -> RedisResult<()> {
        let floor = self
            .shared
            .highest_id
            .load(std::sync::atomic::Ordering::Relaxed);
        self.scripts
            .floor
            .key(keys::COUNTER)
            .arg(floor)
            .invoke::<i64>(con)?;
        self.beat(con)
    }

    /// Runs work as it comes, and the heartbeat between. Ok when the dispatcher is gone.
    fn serve(&mut self, con: &mut Connection, outbox: &Receiver<Outbound>) -> RedisResult<()> {
        let mut next_beat = Instant::now() + HEARTBEAT;
        loop {
            match outbox.recv_deadline(next_beat) {
                Ok(work) => self.run(con, work)?,
                Err(RecvTimeoutError::Timeout) => {
                    self.beat(con)?;
                    self.sweep(con)?;
                    next_beat = Instant::now() + HEARTBEAT;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.note_queue(outbox);
        }
    }

    fn note_queue(&self, outbox: &Receiver<Outbound>) {
        let queued = outbox.len() as u64;
        let gauge = &self.shared.metrics.redis_outbox;
        gauge.store(queued, std::sync::atomic::Ordering::Relaxed);
    }

    fn run(&mut self, con: &mut Connection, work: Outbound) -> RedisResult<()> {
        match work {
            Outbound::Post { body, reply } => self.post(con, body, reply),
            Outbound::Here(member) => {
                let stored = serde_json::to_string(&member).unwrap_or_default();
                let (client, entry) = (member.client, wire::encode(&Entry::Here { member }));
                self.scripts
                    .here
                    .key(keys::members(self.shared.node))
                    .key(keys::CHANNEL)
                    .arg(client)
                    .arg(stored)
                    .arg(entry)
                    .invoke::<i64>(con)
                    .map(drop)
            }
            Outbound::Gone(client) => {
                let node = self.shared.node;
                let json = wire::encode(&Entry::Gone { node, client });
                self.scripts
                    .gone
                    .key(keys::members(node))
                    .key(keys::CHANNEL)
                    .arg(client)
                    .arg(json)
                    .invoke::<i64>(con)
                    .map(drop)
            }
            Outbound::Typing { room, name, active } => {
                let node = self.shared.node;
                let entry = Entry::Typing {
                    node,
                    room,
                    name,
                    active,
                };
                redis::cmd("PUBLISH")
                    .arg(keys::CHANNEL)
                    .arg(wire::encode(&entry))
                    .query::<i64>(con)
                    .map(drop)
            }
        }
    }

    /// Runs the post script. A connection failure leaves the message's fate unknown (Redis may
    /// have run it): the sender is told so, and sees it after all if it was taken.
    fn post(&mut self, con: &mut Connection, body: wire::Body, reply: ReplyTo) -> RedisResult<()> {
        let stored = !body.private;
        let room = body.room.clone();
        let json = serde_json::to_string(&body).unwrap_or_default();
        let result = self
            .scripts
            .post
            .key(keys::COUNTER)
            .key(keys::stream(&room))
            .key(keys::ROOMS)
            .key(keys::CHANNEL)
            .arg(json)
            .arg(if stored { "1" } else { "0" })
            .arg(self.shared.history.max(1))
            .arg(&room)
            .invoke::<u64>(con);
        match result {
            Ok(id) => {
                self.shared.saw_id(id);
                if let ReplyTo::Api(reply) = reply {
                    let _ = reply.try_send(Ok(id));
                }
                Ok(())
            }
            Err(e) => {
                let reason = if e.is_io_error() || e.is_timeout() {
                    "lost contact with Redis; it may still arrive".to_owned()
                } else {
                    format!("Redis refused it: {e}")
                };
                self.refuse(reply, ChatError::NotSaved(reason));
                if e.is_io_error() || e.is_timeout() || e.is_unrecoverable_error() {
                    Err(e)
                } else {
                    warn!("redis: a chat message was refused: {e}");
                    Ok(())
                }
            }
        }
    }

    fn refuse(&self, reply: ReplyTo, error: ChatError) {
        match reply {
            ReplyTo::Api(reply) => drop(reply.try_send(Err(error))),
            ReplyTo::Nobody => {}
            ReplyTo::Client(client) => {
                let event = Event::FromCluster(Inbound::Refused { client, error });
                if self.events.try_send(event).is_err() {
                    debug!("client {client}: its refusal was dropped (dispatcher busy)");
                }
            }
        }
    }

    /// Waits until `deadline` while Redis is away, refusing the chat messages that were queued.
    fn refuse_until(&self, deadline: Instant, outbox: &Receiver<Outbound>) {
        while let Ok(work) = outbox.recv_deadline(deadline) {
            if let Outbound::Post { reply, .. } = work {
                let error = ChatError::NotSaved(super::UNREACHABLE.to_owned());
                self.refuse(reply, error);
            }
        }
        self.note_queue(outbox);
    }

    /// Renews this node's heartbeat key (expiring after [`NODE_EXPIRY`]) and its entry in the set
    /// of nodes.
    fn beat(&self, con: &mut Connection) -> RedisResult<()> {
        let node = self.shared.node;
        redis::pipe()
            .cmd("SET")
            .arg(keys::alive(node))
            .arg(1)
            .arg("PX")
            .arg(NODE_EXPIRY.as_millis() as u64)
            .ignore()
            .cmd("SADD")
            .arg(keys::NODES)
            .arg(node)
            .ignore()
            .query::<()>(con)
    }

    /// Removes every node whose heartbeat expired.
    fn sweep(&self, con: &mut Connection) -> RedisResult<()> {
        let nodes: Vec<u64> = redis::cmd("SMEMBERS").arg(keys::NODES).query(con)?;
        for node in nodes.into_iter().filter(|&n| n != self.shared.node) {
            if self.remove_node(con, node)? {
                log::info!("redis: node {node} missed its heartbeats: its users are gone");
            }
        }
        Ok(())
    }

    fn remove_node(&self, con: &mut Connection, node: u64) -> RedisResult<bool> {
        let entry = wire::encode(&Entry::NodeGone { node });
        self.scripts
            .sweep
            .key(keys::alive(node))
            .key(keys::members(node))
            .key(keys::NODES)
            .key(keys::CHANNEL)
            .arg(node)
            .arg(entry)
            .invoke::<i64>(con)
            .map(|removed| removed == 1)
    }

    /// At shutdown: takes this node and its members out at once (best effort; otherwise they
    /// expire with the heartbeat).
    fn retire(&self) {
        let node = self.shared.node;
        let Ok(mut con) = super::connect(&self.shared.client) else {
            return;
        };
        let gone = redis::cmd("DEL")
            .arg(keys::alive(node))
            .query::<i64>(&mut con)
            .and_then(|_| self.remove_node(&mut con, node));
        if let Err(e) = gone {
            debug!("redis: could not retire node {node}: {e}");
        }
    }
}
