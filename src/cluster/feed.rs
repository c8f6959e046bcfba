//! The feed thread: the one reader of the Redis channel. After each (re)connection it
//! subscribes first, then reads what it missed from the room streams and the other nodes'
//! member lists, then follows the channel; it hands everything to the dispatcher in id order,
//! each message once, and the messages of one channel entry (one post script's batch) in one
//! event, so that the dispatcher shows them in one batch. It never writes to Redis.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use log::{debug, warn};
use redis::streams::StreamRangeReply;
use redis::{Connection, RedisResult};
use serde_json::value::RawValue;

use super::wire::{self, Entry, Member};
use super::{Arrived, Backoff, FEED_BYTES, Inbound, Shared, keys};
use crate::dispatcher::Event;

/// How long one wait for the channel lasts before the feed looks whether it must stop or start
/// over (the link reconnected).
const POLL: Duration = Duration::from_millis(250);

/// Messages read from the streams after a (re)connection are handed over this many at a time:
/// batches as large as the link's, so the dispatcher shows them as it shows a burst.
const CATCH_UP_CHUNK: usize = 64;

/// How long the feed waits for the dispatcher to catch up before looking again.
const FEED_WAIT: Duration = Duration::from_millis(5);

/// What the feed remembers across reconnections: the newest ids it handed over.
#[derive(Default)]
struct Seen {
    /// Newest room message: the streams are read from just after it.
    room: u64,
    /// Newest private message (never in a stream: one missed while away is lost).
    private: u64,
}

pub(super) fn run(shared: &Shared, events: &Sender<Event>) {
    let mut seen = Seen::default();
    let mut backoff = Backoff::new();
    // The link's heartbeat count when the feed last lost Redis: it waits for a newer one.
    let mut lost_at_check = None;
    while !shared.stopping.load(Relaxed) {
        let checks = shared.link_checks.load(Relaxed);
        if !shared.link_up.load(Relaxed) || lost_at_check.is_some_and(|at| checks <= at) {
            std::thread::sleep(POLL); // the link is reconnecting, or checking; follow it
            continue;
        }
        let generation = shared.link_generation.load(Relaxed);
        let mut feed = Feed {
            shared,
            events,
            seen: &mut seen,
        };
        let why = match feed.follow(generation, &mut backoff) {
            Ok(()) => "the link reconnected".to_owned(),
            Err(e) => {
                lost_at_check = Some(shared.link_checks.load(Relaxed));
                e.to_string()
            }
        };
        if shared.stopping.load(Relaxed) {
            break; // not an outage: the server is stopping
        }
        shared.set_feed(false, &why);
        let until = Instant::now() + backoff.next_wait();
        while Instant::now() < until && !shared.stopping.load(Relaxed) {
            std::thread::sleep(POLL); // in steps, so that a shutdown need not wait
        }
    }
}

struct Feed<'a> {
    shared: &'a Shared,
    events: &'a Sender<Event>,
    seen: &'a mut Seen,
}

impl Feed<'_> {
    /// Subscribes, catches up, then follows the channel until the link's `generation` changes,
    /// the server stops, or Redis fails.
    fn follow(&mut self, generation: u64, backoff: &mut Backoff) -> RedisResult<()> {
        let mut query = super::connect(&self.shared.client)?;
        let mut sub = super::connect(&self.shared.client)?;
        let mut pubsub = sub.as_pubsub();
        pubsub.subscribe(keys::CHANNEL)?;
        pubsub.set_read_timeout(Some(POLL))?;
        self.catch_up(&mut query)?;
        drop(query);
        self.shared.set_feed(true, "");
        backoff.reset();
        loop {
            if self.shared.stopping.load(Relaxed)
                || self.shared.link_generation.load(Relaxed) != generation
                || !self.shared.link_up.load(Relaxed)
            {
                return Ok(());
            }
            match pubsub.get_message() {
                Ok(msg) => self.take(msg.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the other nodes' members, then every room's messages after the newest one seen.
    fn catch_up(&mut self, con: &mut Connection) -> RedisResult<()> {
        let members = self.members(con)?;
        self.hand(Inbound::Members(members));
        let mut missed = self.missed_messages(con)?;
        missed.sort_unstable_by_key(|(id, _)| *id);
        for chunk in missed.chunks(CATCH_UP_CHUNK) {
            let mut arrived = Vec::with_capacity(chunk.len());
            for (_, bytes) in chunk {
                self.take_entry(bytes, &mut arrived);
            }
            self.hand_messages(arrived);
        }
        Ok(())
    }

    fn members(&self, con: &mut Connection) -> RedisResult<Vec<Member>> {
        let nodes: Vec<u64> = redis::cmd("SMEMBERS").arg(keys::NODES).query(con)?;
        let mut members = Vec::new();
        for node in nodes.into_iter().filter(|&n| n != self.shared.node) {
            let entries: Vec<Vec<u8>> = redis::cmd("HVALS").arg(keys::members(node)).query(con)?;
            members.extend(entries.iter().filter_map(|e| self.parse_member(e)));
        }
        Ok(members)
    }

    fn parse_member(&self, bytes: &[u8]) -> Option<Member> {
        let member = serde_json::from_slice::<Member>(bytes).map_err(wire::BadEntry::from);
        match member.and_then(|m| wire::check_member(&m).map(|()| m)) {
            Ok(m) => Some(m),
            Err(e) => {
                self.skip(bytes, &e.to_string());
                None
            }
        }
    }

    /// The newest `--history` messages of every room after the newest seen, at most about
    /// `--history-bytes` of them (what history can hold anyway), as (id, entry) pairs. (The
    /// streams' own entry ids are Redis's, not the messages': a foreign entry with a large one
    /// cannot block later messages.)
    fn missed_messages(&self, con: &mut Connection) -> RedisResult<Vec<(u64, Vec<u8>)>> {
        let rooms: Vec<String> = redis::cmd("SMEMBERS").arg(keys::ROOMS).query(con)?;
        let mut missed = Vec::new();
        let mut bytes = 0;
        for room in rooms {
            let reply: StreamRangeReply = redis::cmd("XREVRANGE")
                .arg(keys::stream(&room))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.shared.history.max(1))
                .query(con)?;
            for entry in reply.ids {
                let Some(data) = entry.get::<Vec<u8>>("m") else {
                    self.skip(entry.id.as_bytes(), "a stream entry without a message");
                    continue;
                };
                match serde_json::from_slice::<IdOnly>(&data) {
                    Ok(IdOnly { id }) if id <= self.seen.room => break, // older ones too
                    Ok(IdOnly { id }) => {
                        bytes += data.len();
                        missed.push((id, data));
                    }
                    Err(e) => self.skip(&data, &e.to_string()),
                }
            }
            if bytes > 2 * self.shared.history_bytes {
                bytes = keep_newest(&mut missed, self.shared.history_bytes);
            }
        }
        Ok(missed)
    }

    /// Hands what one channel entry brought to the dispatcher: a batch of chat messages (a
    /// JSON array of entries, from one post script) in one event, or a single entry.
    fn take(&mut self, bytes: &[u8]) {
        let mut arrived = Vec::new();
        if bytes.first() == Some(&b'[') {
            match serde_json::from_slice::<Vec<&RawValue>>(bytes) {
                Ok(entries) => {
                    arrived.reserve(entries.len());
                    for entry in entries {
                        self.take_entry(entry.get().as_bytes(), &mut arrived);
                    }
                }
                Err(e) => self.skip(bytes, &e.to_string()),
            }
        } else {
            self.take_entry(bytes, &mut arrived);
        }
        self.hand_messages(arrived);
    }

    /// Checks one entry: a chat message not seen yet joins `arrived`; anything else is handed
    /// over at once (after `arrived`, to keep the order), unless it is this node's own presence.
    fn take_entry(&mut self, bytes: &[u8], arrived: &mut Vec<Arrived>) {
        let entry = match wire::parse(bytes) {
            Ok(entry) => entry,
            Err(e) => return self.skip(bytes, &e.to_string()),
        };
        let me = self.shared.node;
        let inbound = match entry {
            Entry::Message { id, m } => {
                let newest = if m.private {
                    &mut self.seen.private
                } else {
                    &mut self.seen.room
                };
                if id <= *newest {
                    return; // already shown (read from a stream, then heard again)
                }
                *newest = id;
                self.shared.saw_id(id);
                let sender = (m.node == me).then_some(m.client);
                let message = wire::chat_message(id, m);
                return arrived.push(Arrived { message, sender });
            }
            Entry::Here { member } if member.node != me => Inbound::Here(member),
            Entry::Roster { node, members } if node != me => Inbound::Roster { node, members },
            Entry::Gone { node, client } if node != me => Inbound::Gone { node, client },
            Entry::NodeGone { node } if node != me => Inbound::NodeGone(node),
            Entry::Typing {
                node,
                room,
                name,
                active,
            } if node != me => Inbound::Typing { room, name, active },
            _ => return, // this node's own presence: its dispatcher knows it already
        };
        self.hand_messages(std::mem::take(arrived));
        self.hand(inbound);
    }

    /// Hands chat messages to the dispatcher as one event, once it has room for their text.
    fn hand_messages(&self, arrived: Vec<Arrived>) {
        if arrived.is_empty() {
            return;
        }
        let bytes = arrived.iter().map(|a| a.message.text.len() as u64).sum();
        self.wait_for_room(bytes);
        self.hand(Inbound::Messages(arrived));
    }

    /// Hands an event to the dispatcher, waiting while its queue is full (Redis then buffers
    /// for us, up to its own output limit, past which it drops us and we resync).
    fn hand(&self, inbound: Inbound) {
        let mut event = Event::FromCluster(inbound);
        loop {
            match self.events.send_timeout(event, POLL) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(back)) if !self.shared.stopping.load(Relaxed) => {
                    event = back;
                }
                Err(_) => return,
            }
        }
    }

    /// Waits while the dispatcher has [`FEED_BYTES`] of chat text from the feed to handle, then
    /// counts `bytes` more (the dispatcher takes them off: [`super::Cluster::handled`]).
    fn wait_for_room(&self, bytes: u64) {
        let waiting = &self.shared.feed_bytes;
        while waiting.load(Relaxed) > 0 && waiting.load(Relaxed) + bytes > FEED_BYTES {
            if self.shared.stopping.load(Relaxed) {
                return;
            }
            std::thread::sleep(FEED_WAIT);
        }
        waiting.fetch_add(bytes, Relaxed);
    }

    /// Logs a malformed or foreign entry (the first, then at every power of two) and skips it.
    fn skip(&self, bytes: &[u8], why: &str) {
        let count = self.shared.metrics.redis_bad_entries.fetch_add(1, Relaxed) + 1;
        if count.is_power_of_two() {
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]);
            warn!("redis: skipped a bad entry ({why}): {shown:?} ({count} so far)");
        } else {
            debug!("redis: skipped a bad entry ({why})");
        }
    }
}

/// A stream entry's message id, read without the rest.
#[derive(serde::Deserialize)]
struct IdOnly {
    id: u64,
}

/// Keeps the newest entries within `budget` bytes; returns the bytes kept.
fn keep_newest(missed: &mut Vec<(u64, Vec<u8>)>, budget: usize) -> usize {
    missed.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
    let mut kept = 0;
    let mut count = 0;
    for (_, data) in missed.iter() {
        if kept + data.len() > budget {
            break;
        }
        kept += data.len();
        count += 1;
    }
    missed.truncate(count);
    kept
}
