//! The link thread: the one writer to Redis. It runs the dispatcher's work (chat messages,
//! presence, typing) in order on one connection, beats this node's heartbeat and sweeps nodes
//! whose heartbeat stopped. It never reads the channel (the feed does) and never waits on the
//! dispatcher: answers go back as events it may drop, never as a wait.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use redis::{Connection, ErrorKind, RedisResult, Script};

use super::presence::Presence;
use super::wire::{self, Body, Entry};
use super::{Backoff, HEARTBEAT, Inbound, NODE_EXPIRY, Outbound, RECHECK, ReplyTo, Shared, keys};
use crate::dispatcher::Event;
use crate::protocol::ChatError;

/// Posts a batch of chat messages in one atomic step. For each message in turn: take the next
/// id; for a room message, add its room to the set of rooms and append it to the room's stream
/// (trimmed to about `--history`). Then it publishes every message it took as *one* channel
/// entry, a JSON array in id order, so every node hands its dispatcher the batch at once (one
/// commit, one write per client) instead of one message at a time. The channel's order is still
/// the id order. Answers, per message, its id, or why Redis refused it (a string): a refused
/// message is neither stored nor published.
/// KEYS: the counter, the set of rooms, the channel, then each message's stream.
/// ARGV: the stream length, then per message its body, "1" for a room message, and its room.
const POST: &str = r#"
local answers, entries = {}, {}
for i = 4, #KEYS do
  local a = 2 + (i - 4) * 3
  local id = redis.call('INCR', KEYS[1])
  local entry = '{"k":"m","id":' .. id .. ',"m":' .. ARGV[a] .. '}'
  local refused = nil
  if ARGV[a + 1] == '1' then
    local r = redis.pcall('SADD', KEYS[2], ARGV[a + 2])
    if type(r) == 'table' and r.err then refused = r.err else
      r = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*', 'm', entry)
      if type(r) == 'table' and r.err then refused = r.err end
    end
  end
  if refused then
    answers[#answers + 1] = refused
  else
    answers[#answers + 1] = id
    entries[#entries + 1] = entry
  end
end
if #entries > 0 then
  redis.call('PUBLISH', KEYS[3], '[' .. table.concat(entries, ',') .. ']')
end
return answers
"#;

/// Most chat messages sent to Redis in one script: a burst costs one round trip, one publish
/// and one dispatcher batch on every node, not one each; the first of it waits only for the
/// others to be written.
pub(super) const BATCH: usize = 64;
/// Most chat text in one script (about: the last batch added may pass it): bounds the one
/// channel entry that carries the batch (about twice this as JSON at worst) well under what
/// Redis lets a subscriber's output buffer hold (by default 32 MiB, or 8 MiB for a minute).
const BATCH_BYTES: usize = 1 << 20;

/// Raises the id counter to at least ARGV[1]: a Redis that lost its data (restarted without
/// persistence) must never hand out an id some node has already shown.
const FLOOR: &str = r"
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
";

/// The thread's body: connect, serve until the connection fails, wait, again; until stopped.
pub(super) fn run(shared: &Shared, outbox: &Receiver<Outbound>, events: &Sender<Event>) {
    let mut backoff = Backoff::new();
    let mut link = Link {
        shared,
        events,
        post: Script::new(POST),
        floor: Script::new(FLOOR),
        presence: Presence::new(),
    };
    while !shared.stopping.load(Relaxed) {
        let served = super::connect(&shared.client).and_then(|mut con| {
            link.prepare(&mut con)?;
            shared.set_link(true, "");
            backoff.reset();
            link.serve(&mut con, outbox)
        });
        match served {
            Ok(()) => break, // the dispatcher is gone: stop
            Err(e) => shared.set_link(false, &e.to_string()),
        }
        link.refuse_until(Instant::now() + backoff.next_wait(), outbox);
    }
    link.presence.retire(shared);
}

struct Link<'a> {
    shared: &'a Shared,
    events: &'a Sender<Event>,
    post: Script,
    floor: Script,
    presence: Presence,
}

impl Link<'_> {
    /// Makes a fresh connection ready: the id counter at least what this node has seen, this
    /// node's heartbeat and members.
    fn prepare(&mut self, con: &mut Connection) -> RedisResult<()> {
        let floor = self.shared.highest_id.load(Relaxed);
        self.floor
            .key(keys::COUNTER)
            .arg(floor)
            .invoke::<i64>(con)?;
        self.post.load(con)?; // sent by hash from now on
        self.beat(con)?;
        self.republish(con)
    }

    fn republish(&mut self, con: &mut Connection) -> RedisResult<()> {
        for lost in self.presence.republish(self.shared, con)? {
            self.tell(lost);
        }
        Ok(())
    }

    /// Runs work as it comes, and the heartbeat between. Ok when the dispatcher is gone.
    fn serve(&mut self, con: &mut Connection, outbox: &Receiver<Outbound>) -> RedisResult<()> {
        let mut next_beat = Instant::now() + HEARTBEAT;
        loop {
            let wake = match self.shared.feed_up.load(Relaxed) {
                true => next_beat,
                false => next_beat.min(Instant::now() + RECHECK),
            };
            match outbox.recv_deadline(wake) {
                Ok(work) => self.run_with_batch(con, self.took(work), outbox)?,
                Err(RecvTimeoutError::Timeout) if Instant::now() < next_beat => self.beat(con)?,
                Err(RecvTimeoutError::Timeout) => {
                    self.beat(con)?;
                    self.presence.sweep(self.shared, con)?;
                    if self.shared.roster_stale.load(Relaxed) {
                        self.republish(con)?;
                    }
                    next_beat = Instant::now() + HEARTBEAT;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.note_queue(outbox);
        }
    }

    /// Work taken off the queue: its chat messages no longer count against [`super::OUTBOX`]
    /// and [`super::OUTBOX_BYTES`].
    fn took(&self, work: Outbound) -> Outbound {
        if let Outbound::Posts(posts) = &work {
            let bytes: usize = posts.iter().map(|(body, _)| body.text.len()).sum();
            self.shared.outbox_bytes.fetch_sub(bytes as u64, Relaxed);
            let messages = posts.len() as u64;
            self.shared.outbox_messages.fetch_sub(messages, Relaxed);
        }
        work
    }

    fn note_queue(&self, outbox: &Receiver<Outbound>) {
        let queued = outbox.len() as u64;
        self.shared.metrics.redis_outbox.store(queued, Relaxed);
    }

    /// Runs `work`; chat messages with the ones queued right behind them (until [`BATCH`] or
    /// [`BATCH_BYTES`] of text is reached).
    fn run_with_batch(
        &mut self,
        con: &mut Connection,
        work: Outbound,
        outbox: &Receiver<Outbound>,
    ) -> RedisResult<()> {
        let Outbound::Posts(mut batch) = work else {
            return self.run(con, work);
        };
        let mut bytes = text_bytes(&batch);
        let mut next = None;
        while batch.len() < BATCH && bytes < BATCH_BYTES && next.is_none() {
            match outbox.try_recv().map(|work| self.took(work)) {
                Ok(Outbound::Posts(more)) => {
                    bytes += text_bytes(&more);
                    batch.extend(more);
                }
                Ok(other) => next = Some(other),
                Err(_) => break,
            }
        }
        self.post(con, batch)?;
        match next {
            Some(work) => self.run(con, work),
            None => Ok(()),
        }
    }

    fn run(&mut self, con: &mut Connection, work: Outbound) -> RedisResult<()> {
        match work {
            Outbound::Posts(batch) => self.post(con, batch),
            Outbound::Here(client) => {
                if let Some(lost) = self.presence.here(self.shared, con, client)? {
                    self.tell(lost);
                }
                Ok(())
            }
            Outbound::Gone(client) => self.presence.gone(self.shared, con, client),
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

    /// Runs the post script for a batch of chat messages, in one round trip. A connection
    /// failure leaves their fate unknown (Redis may have run it): their senders are told so,
    /// and see them after all if they were taken. (A script cache that someone flushed is
    /// reloaded and the script sent again: Redis ran nothing of it.)
    fn post(&mut self, con: &mut Connection, batch: Vec<(Body, ReplyTo)>) -> RedisResult<()> {
        let answers = match self
            .post_invocation(&batch)
            .invoke::<Vec<redis::Value>>(con)
        {
            Ok(answers) => answers,
            Err(e) if matches!(e.kind(), ErrorKind::Server(_)) => {
                warn!("redis: {} chat messages were refused: {e}", batch.len());
                let why = format!("Redis refused it: {e}");
                for (_, reply) in batch {
                    self.refuse(reply, ChatError::NotSaved(why.clone()));
                }
                return Ok(());
            }
            Err(e) => {
                for (_, reply) in batch {
                    let reason = "lost contact with Redis; it may still arrive".to_owned();
                    self.refuse(reply, ChatError::NotSaved(reason));
                }
                return Err(e);
            }
        };
        for ((_, reply), answer) in batch.into_iter().zip(answers) {
            match answer_id(answer) {
                Ok(id) => {
                    self.shared.saw_id(id);
                    if let ReplyTo::Api(reply) = reply {
                        let _ = reply.try_send(Ok(id));
                    }
                }
                Err(why) => {
                    warn!("redis: a chat message was refused: {why}");
                    self.refuse(
                        reply,
                        ChatError::NotSaved(format!("Redis refused it: {why}")),
                    );
                }
            }
        }
        Ok(())
    }

    /// The post script's keys and arguments for a batch (its layout is [`POST`]'s comment).
    fn post_invocation(&self, batch: &[(Body, ReplyTo)]) -> redis::ScriptInvocation<'_> {
        let mut invocation = self.post.prepare_invoke();
        invocation
            .key(keys::COUNTER)
            .key(keys::ROOMS)
            .key(keys::CHANNEL)
            .arg(self.shared.history.max(1));
        for (body, _) in batch {
            let json = serde_json::to_string(body).unwrap_or_default();
            invocation
                .key(keys::stream(&body.room))
                .arg(json)
                .arg(if body.private { "0" } else { "1" })
                .arg(&body.room);
        }
        invocation
    }

    fn refuse(&self, reply: ReplyTo, error: ChatError) {
        match reply {
            ReplyTo::Api(reply) => drop(reply.try_send(Err(error))),
            ReplyTo::Client(client) => self.tell(Inbound::Refused { client, error }),
            ReplyTo::Nobody => {}
        }
    }

    /// Tells the dispatcher without waiting: if its queue is full, this is dropped (logged).
    fn tell(&self, inbound: Inbound) {
        if self.events.try_send(Event::FromCluster(inbound)).is_err() {
            debug!("redis: an answer for the dispatcher was dropped (its queue is full)");
        }
    }

    /// Waits until `deadline` while Redis is away, refusing the chat messages that were queued
    /// (presence changes wait in the roster, republished on reconnection).
    fn refuse_until(&self, deadline: Instant, outbox: &Receiver<Outbound>) {
        while let Ok(work) = outbox.recv_deadline(deadline) {
            if let Outbound::Posts(batch) = self.took(work) {
                for (_, reply) in batch {
                    let error = ChatError::NotSaved(super::UNREACHABLE.to_owned());
                    self.refuse(reply, error);
                }
            }
        }
        self.note_queue(outbox);
    }

    /// Renews this node's heartbeat key (expiring after [`NODE_EXPIRY`]) and its entry in the
    /// set of nodes.
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
            .query::<()>(con)?;
        self.shared.link_checks.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// One message's answer from the post script: its id, or why Redis refused it.
fn answer_id(answer: redis::Value) -> Result<u64, String> {
    match answer {
        redis::Value::Int(id) => u64::try_from(id).map_err(|_| format!("id {id}")),
        redis::Value::BulkString(why) => Err(String::from_utf8_lossy(&why).into_owned()),
        other => Err(format!("an unexpected answer: {other:?}")),
    }
}

fn text_bytes(posts: &[(Body, ReplyTo)]) -> usize {
    posts.iter().map(|(body, _)| body.text.len()).sum()
}
