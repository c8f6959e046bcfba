//! The dispatcher (the hub): one thread that owns every piece of shared chat state — who is
//! connected, their names, rooms, typing states and history — and decides who receives what.
//!
//! Sessions and the HTTP API talk to it only through [`Event`]s on one channel, and it talks back
//! by posting frames to clients through [`Delivery`], which alone knows how bytes reach sockets.
//! It never blocks on a client: a client that delivery finds too slow is dropped. Because all
//! chat state lives on this one thread it needs no locks, and every room sees its messages in one
//! order (the id order).
//!
//! Each loop turn handles a batch of events, then commits history (one write, one sync), and only
//! then sends the batch's frames, so no one sees a message that a crash could still lose. Chat
//! messages wait for that commit apart from other frames: if it fails, none of them is shown and
//! each sender is told it was not saved.
//!
//! With `--redis` ([`crate::cluster`]) a chat message is handed to Redis instead, and shown when
//! it comes back with its id, in the order all nodes share; `remote` holds that side.

mod bursts;
mod remote;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info};

use crate::cluster::{self, Cluster};
use crate::delivery::Delivery;
use crate::history::{History, SaveError, Stored};
use crate::metrics::Metrics;
use crate::names;
use crate::outlet::Outlet;
use crate::protocol::{
    self, Arrival, ChatError, ChatMessage, Command, Frame, RoomState, ServerEvent,
};
use crate::ratelimit::TokenBucket;

pub use crate::protocol::ClientId;

/// Most events handled before history is committed and frames are delivered: bounds the delay a
/// busy dispatcher adds before the first frame of a batch goes out.
const MAX_BATCH_EVENTS: usize = 512;
/// A typing state that is not refreshed within this time ends by itself.
pub const TYPING_TIMEOUT: Duration = Duration::from_secs(5);
/// A message frame's bytes beyond its text, sender and room (type, id, time, quotes).
const MESSAGE_FRAME_BYTES: usize = 80;
/// A crowd (a room above the presence limit) hears its member count at most this often: telling
/// every member of every join would cost members² frames (50 million for 10,000 people).
pub const PRESENCE_TICK: Duration = Duration::from_secs(1);
/// Most bytes of history in a `welcome` or `room` frame (the newest messages that fit; older
/// ones come from the HTTP API). Without it, a room of 100 messages of 64 KiB made every join a
/// 13 MB frame built on this thread; 256 KiB still holds dozens of ordinary messages and any
/// single message (a 64 KiB text of quotes is about 128 KiB as JSON).
pub const WELCOME_HISTORY_BYTES: usize = 256 << 10;
/// Most bytes of messages in one page of `GET /api/rooms/<room>/messages`: an HTTP worker holds
/// the page whole while it answers.
pub const API_PAGE_BYTES: usize = 1 << 20;

/// Where an API publisher hears its message's id, or why it was refused.
pub type PublishReply = Sender<Result<u64, ChatError>>;

/// Everything the dispatcher is asked to do.
pub enum Event {
    /// A client after its handshake (a socket.io client: after its CONNECT); from now on its
    /// frames go out through `outlet`.
    Connect {
        id: ClientId,
        arrival: Arrival,
        outlet: Arc<Outlet>,
    },
    /// Commands from one read of a client's socket, in order.
    Commands {
        id: ClientId,
        commands: Vec<Command>,
    },
    Disconnect {
        id: ClientId,
        reason: String,
    },
    /// A message from the HTTP API; the reply carries its id once it is committed.
    Publish {
        room: String,
        from: String,
        text: String,
        reply: PublishReply,
    },
    Rooms {
        reply: Sender<Vec<RoomSummary>>,
    },
    History {
        room: String,
        since: Option<u64>,
        limit: usize,
        reply: Sender<HistoryPage>,
    },
    /// Answered at once: `/healthz` uses it to see that the dispatcher still turns. The reply
    /// names what is wrong, if anything (history that cannot be written).
    Ping {
        reply: Sender<Option<String>>,
    },
    /// Commit history, send close 1001 to every client, and stop.
    Shutdown,
    /// From the other nodes, through Redis (`--redis`; see [`crate::cluster`]).
    FromCluster(cluster::Inbound),
}

#[derive(serde::Serialize, Debug, Clone, PartialEq)]
pub struct RoomSummary {
    pub name: String,
    pub count: usize,
}

/// `GET /api/rooms/<room>/messages`: raw message frames in id order. Without `since` the newest
/// ones, with it the oldest after it (a client pages forward); `more` says a next page exists.
pub struct HistoryPage {
    pub messages: Vec<Frame>,
    pub truncated: bool,
    pub more: bool,
}

/// Limits the dispatcher enforces.
pub struct HubLimits {
    pub history: usize,
    pub max_rooms: usize,
    /// Largest room with per-member presence; bigger ones are crowds.
    pub presence_limit: usize,
    /// Membership changes a room is told one by one per [`PRESENCE_TICK`] (see [`bursts`]).
    pub presence_burst: u32,
    /// An empty room whose newest message is older than this gives its slot to a new room
    /// when every slot is taken.
    pub room_quiet: Duration,
    /// Chat bytes per second a room carries (what each member may have to read), and at once.
    pub room_rate_bytes: f64,
    pub room_burst_bytes: f64,
}

struct Client {
    name: String,
    room: String,
    /// When the client's typing state expires, if it is typing.
    typing_until: Option<Instant>,
}

pub struct Hub {
    clients: HashMap<ClientId, Client>,
    /// Name key ([`names::key`]) -> owner: look-alike names share a key, so they cannot coexist.
    names: HashMap<String, ClientId>,
    /// Members of every room that has any.
    rooms: HashMap<String, Vec<ClientId>>,
    history: History,
    limits: HubLimits,
    metrics: Arc<Metrics>,
    /// Every client's way out: frames posted there leave after the commit.
    delivery: Delivery,
    /// This batch's chat messages, shown only once the commit saved them.
    unsaved: Vec<Unsaved>,
    /// API publishers waiting for their answer, answered after the batch is delivered.
    acks: Vec<(PublishReply, Result<u64, ChatError>)>,
    typing_deadlines: BinaryHeap<Reverse<(Instant, ClientId)>>,
    /// Rooms whose membership changed without per-member events, and when to tell them.
    presence_changed: Vec<String>,
    presence_due: Option<Instant>,
    /// How many changes each room was told member by member lately (see [`bursts`]).
    bursts: bursts::Bursts,
    /// Each busy room's byte budget (see [`HubLimits::room_rate_bytes`]).
    room_rates: HashMap<String, TokenBucket>,
    /// With `--redis`: the link to the other nodes, and what is known of their members.
    cluster: Option<Cluster>,
    remote: remote::Remote,
    stopping: bool,
}

impl Hub {
    pub fn new(
        history: History,
        limits: HubLimits,
        delivery: Delivery,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            clients: HashMap::new(),
            names: HashMap::new(),
            rooms: HashMap::new(),
            history,
            limits,
            metrics,
            delivery,
            unsaved: Vec::new(),
            acks: Vec::new(),
            typing_deadlines: BinaryHeap::new(),
            presence_changed: Vec::new(),
            presence_due: None,
            bursts: bursts::Bursts::default(),
            room_rates: HashMap::new(),
            cluster: None,
            remote: remote::Remote::default(),
            stopping: false,
        }
    }

    /// One node of several (`--redis`): chat messages take their ids and order from Redis.
    pub fn with_cluster(mut self, cluster: Cluster) -> Hub {
        self.cluster = Some(cluster);
        self
    }

    /// The dispatcher thread's body: runs until [`Event::Shutdown`] or until every sender is gone.
    pub fn run(mut self, events: Receiver<Event>) {
        while !self.stopping {
            let first = match self.next_deadline() {
                Some(deadline) => events.recv_deadline(deadline),
                None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match first {
                Ok(event) => self.handle(event),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            for event in events.try_iter().take(MAX_BATCH_EVENTS) {
                self.handle(event);
            }
            self.end_batch(Instant::now());
        }
        self.close_everyone();
    }

    /// What follows a batch of events: typing states and crowd counts due by `now`, the
    /// batch's chat messages to Redis (`--redis`), then the commit, which shows the batch to
    /// its audience.
    fn end_batch(&mut self, now: Instant) {
        self.expire_typing(now);
        self.announce_presence(now);
        self.hand_posts_to_cluster();
        self.commit();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let typing = self.typing_deadlines.peek().map(|Reverse((t, _))| *t);
        [typing, self.history.wake_at(), self.presence_due]
            .into_iter()
            .flatten()
            .min()
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connect {
                id,
                arrival,
                outlet,
            } => self.connect(id, arrival, outlet),
            Event::Commands { id, commands } => {
                let held: usize = commands.iter().map(Command::held_bytes).sum();
                self.metrics.inbound_bytes.fetch_sub(held as u64, Relaxed);
                commands.into_iter().for_each(|c| self.command(id, c))
            }
            Event::Disconnect { id, reason } => self.disconnect(id, &reason),
            Event::Publish {
                room,
                from,
                text,
                reply,
            } => {
                if let Err(e) = self.post(&room, &from, &text, Origin::Api(reply.clone())) {
                    drop(reply.try_send(Err(e)));
                }
            }
            Event::Rooms { reply } => drop(reply.try_send(self.room_summaries())),
            Event::History {
                room,
                since,
                limit,
                reply,
            } => {
                let slice = match since {
                    Some(since) => self.history.page(&room, since, limit, API_PAGE_BYTES),
                    None => self.history.newest(&room, None, limit, API_PAGE_BYTES),
                };
                let messages = slice.messages.iter().map(|m| m.frame.clone()).collect();
                drop(reply.try_send(HistoryPage {
                    messages,
                    truncated: slice.truncated,
                    more: slice.more,
                }));
            }
            Event::Ping { reply } => {
                let problem = self.history.outage();
                drop(reply.try_send(problem.map(|p| format!("history: cannot write ({p})"))));
            }
            Event::Shutdown => self.stopping = true,
            Event::FromCluster(inbound) => self.heard_from_cluster(inbound),
        }
    }

    fn command(&mut self, id: ClientId, command: Command) {
        if !self.clients.contains_key(&id) {
            return; // dropped as too slow while its command was in flight
        }
        let result = match command {
            Command::Message { text, to: None } => self.room_message(id, text),
            Command::Message { text, to: Some(to) } => self.private_message(id, &to, text),
            Command::Nick { name } => self.rename(id, name),
            Command::Join { room, since } => self.join(id, room, since),
            Command::Typing { active } => {
                self.set_typing(id, active);
                Ok(())
            }
        };
        if let Err(e) = result {
            debug!("client {id}: {e}");
            self.send_to(id, e.to_frame());
        }
    }

    // ----- connections -----

    fn connect(&mut self, id: ClientId, arrival: Arrival, outlet: Arc<Outlet>) {
        let (name, name_error) = self.name_for(id, arrival.name);
        let (room, room_error) = match self.room_allowed(&arrival.room) {
            Ok(()) => (arrival.room, None),
            Err(e) => (protocol::DEFAULT_ROOM.to_owned(), Some(e)),
        };
        info!(
            "a user connected: id {id} name {name:?} room {room:?} from {}",
            arrival.ip
        );
        self.names.insert(names::key(&name), id);
        self.delivery.add(id, outlet);
        let client = Client {
            name,
            room: room.clone(),
            typing_until: None,
        };
        self.clients.insert(id, client);
        self.enter_room(id, &room, arrival.since, true);
        for e in [name_error, room_error].into_iter().flatten() {
            self.send_to(id, e.to_frame());
        }
    }

    /// The name a new client asked for, if it may have it; else `guest-<id>`, and why not.
    fn name_for(&self, id: ClientId, asked: Option<String>) -> (String, Option<ChatError>) {
        let checked = asked.map(|n| protocol::check_name(&n).and_then(|n| self.free_name(n, id)));
        match checked {
            Some(Ok(name)) => (name, None),
            Some(Err(e)) => (self.guest_name(id), Some(e)),
            None => (self.guest_name(id), None),
        }
    }

    fn disconnect(&mut self, id: ClientId, reason: &str) {
        if let Some(client) = self.remove_client(id) {
            info!(
                "a user disconnected: id {id} name {:?} ({reason})",
                client.name
            );
        }
    }

    /// Forgets a client: frees its name, ends its typing, tells its room it left.
    fn remove_client(&mut self, id: ClientId) -> Option<Client> {
        self.set_typing(id, false);
        self.delivery.remove(id);
        let client = self.clients.remove(&id)?;
        self.names.remove(&names::key(&client.name));
        self.leave_room(id, &client.room, &client.name);
        if let Some(cluster) = &mut self.cluster {
            cluster.gone(id);
            self.remote.forget_resume(id);
        }
        Some(client)
    }

    fn free_name(&self, name: String, id: ClientId) -> Result<String, ChatError> {
        let key = names::key(&name);
        match self.names.get(&key) {
            Some(&owner) if owner != id => Err(ChatError::NameTaken(name)),
            _ if self.remote.has_name(&key) => Err(ChatError::NameTaken(name)),
            _ => Ok(name),
        }
    }

    /// `guest-<id>` (with `--redis`, `guest-<node>-<id>`): always free, since ids are unique
    /// (on a node) and users cannot take the pattern ([`names::check`] reserves it).
    fn guest_name(&self, id: ClientId) -> String {
        match &self.cluster {
            Some(cluster) => format!("{}{}-{id}", names::GUEST_PREFIX, cluster.node()),
            None => format!("{}{id}", names::GUEST_PREFIX),
        }
    }

    fn rename(&mut self, id: ClientId, name: String) -> Result<(), ChatError> {
        if self.clients.get(&id).is_some_and(|c| c.name == name) {
            return Ok(()); // already so named: nothing changes, nobody is told
        }
        let name = self.free_name(name, id)?;
        let Some(client) = self.clients.get_mut(&id) else {
            return Ok(());
        };
        let old = std::mem::replace(&mut client.name, name.clone());
        let room = client.room.clone();
        self.names.remove(&names::key(&old));
        self.names.insert(names::key(&name), id);
        if let Some(cluster) = &mut self.cluster {
            cluster.here(id, &name, &room);
        }
        let count = self.headcount(&room);
        let frame = protocol::encode(&ServerEvent::Renamed {
            room: &room,
            from: &old,
            name: &name,
            count,
        });
        if self.one_by_one(&room, count) {
            self.broadcast(&room, None, frame);
        } else {
            self.send_to(id, frame); // the others hear a list at the tick; the renamed must know
        }
        Ok(())
    }

    // ----- rooms -----

    /// A room may be used if it exists (members or history), if there is room for one more,
    /// or if an empty room has been quiet long enough to give its slot up.
    fn room_allowed(&mut self, room: &str) -> Result<(), ChatError> {
        if self.rooms.contains_key(room) || self.history.has_room(room) {
            return Ok(());
        }
        let without_history = self
            .rooms
            .keys()
            .filter(|r| !self.history.has_room(r))
            .count();
        if self.history.room_count() + without_history < self.limits.max_rooms {
            return Ok(());
        }
        let quiet = self.limits.room_quiet.as_millis() as u64;
        let quiet_before = protocol::now_ms().saturating_sub(quiet);
        let rooms = &self.rooms;
        match self
            .history
            .forget_quietest(quiet_before, |r| !rooms.contains_key(r))
        {
            Some(old) => {
                info!("room {old:?} was empty and quiet: its slot goes to {room:?}");
                Ok(())
            }
            None => Err(ChatError::TooManyRooms),
        }
    }

    fn join(&mut self, id: ClientId, room: String, since: Option<u64>) -> Result<(), ChatError> {
        let Some(client) = self.clients.get(&id) else {
            return Ok(());
        };
        let (old, name) = (client.room.clone(), client.name.clone());
        if old != room {
            self.room_allowed(&room)?;
            self.set_typing(id, false);
            self.leave_room(id, &old, &name);
            if let Some(client) = self.clients.get_mut(&id) {
                client.room = room.clone();
            }
        }
        self.enter_room(id, &room, since, false);
        Ok(())
    }

    /// Adds `id` to `room` (unless already in), sends it `welcome` or `room`, and tells the
    /// others in the room.
    fn enter_room(&mut self, id: ClientId, room: &str, since: Option<u64>, welcome: bool) {
        let members = self.rooms.entry(room.to_owned()).or_default();
        let is_new = !members.contains(&id);
        if is_new {
            members.push(id);
        }
        let Some(me) = self.clients.get(&id) else {
            return;
        };
        if let Some(cluster) = &mut self.cluster {
            if is_new {
                cluster.here(id, &me.name, room);
            }
            self.remote.resumed(id, since);
        }
        let users = self.member_names(room);
        let count = self.headcount(room);
        let slice = self
            .history
            .newest(room, since, self.limits.history, WELCOME_HISTORY_BYTES);
        let history = slice.messages.iter().map(|m| &m.frame).collect();
        let last_id = slice.messages.last().map_or(since.unwrap_or(0), |m| m.id);
        let state = RoomState {
            room,
            users,
            count,
            last_id,
            history,
            truncated: slice.truncated,
            more: slice.more,
        };
        let frame = protocol::encode_entering(&if welcome {
            ServerEvent::Welcome {
                client_id: id,
                name: &me.name,
                room: state,
            }
        } else {
            ServerEvent::Room { room: state }
        });
        let joined = is_new.then(|| {
            protocol::encode(&ServerEvent::Joined {
                room,
                name: &me.name,
                count,
            })
        });
        self.send_to(id, frame);
        if let Some(joined) = joined
            && self.one_by_one(room, count)
        {
            self.broadcast(room, Some(id), joined);
        }
    }

    fn leave_room(&mut self, id: ClientId, room: &str, name: &str) {
        let Some(members) = self.rooms.get_mut(room) else {
            return;
        };
        let elsewhere = self.remote.count(room); // members on other nodes (`--redis`)
        let before = members.len() + elsewhere;
        members.retain(|&m| m != id);
        let count = members.len() + elsewhere;
        if members.is_empty() {
            self.rooms.remove(room);
            self.bursts.forget(room);
        } else if self.one_by_one(room, before) {
            let frame = protocol::encode(&ServerEvent::Left { room, name, count });
            self.broadcast(room, None, frame);
        }
    }

    /// Whether a membership change in `room` (of `count` members, counted before a leave) is told
    /// member by member. Not in a crowd (the room hears its count once a tick), nor past a burst of
    /// changes (it hears its whole list at the next tick, and every change until then goes into
    /// that list, so no one is told a `left` for a `joined` still on its way): those are noted
    /// for [`Hub::announce_presence`] instead.
    fn one_by_one(&mut self, room: &str, count: usize) -> bool {
        let told = count <= self.limits.presence_limit
            && !self.presence_changed.iter().any(|r| r == room)
            && self
                .bursts
                .allow(room, Instant::now(), self.limits.presence_burst);
        if !told {
            self.presence_changed(room);
        }
        told
    }

    /// Names in `room`, sorted case-insensitively: all of them, or in a crowd the
    /// `presence_limit` members who have been there longest.
    fn member_names(&self, room: &str) -> Vec<&str> {
        let members = self.members(room).iter();
        let local = members
            .filter_map(|m| self.clients.get(m))
            .map(|c| c.name.as_str());
        let mut names: Vec<&str> = local
            .chain(self.remote.names_in(room))
            .take(self.limits.presence_limit)
            .collect();
        names.sort_by_cached_key(|n| n.to_lowercase());
        names
    }

    /// Notes a membership change that was not told member by member.
    fn presence_changed(&mut self, room: &str) {
        if !self.presence_changed.iter().any(|r| r == room) {
            self.presence_changed.push(room.to_owned());
        }
        self.presence_due
            .get_or_insert_with(|| Instant::now() + PRESENCE_TICK);
    }

    /// Tells each changed room its count, and a room that is no longer a crowd its whole member
    /// list, so per-member events can take over again.
    fn announce_presence(&mut self, now: Instant) {
        if self.presence_due.is_none_or(|due| due > now) {
            return;
        }
        self.presence_due = None;
        for room in std::mem::take(&mut self.presence_changed) {
            let count = self.headcount(&room);
            if count == 0 {
                continue;
            }
            let users = (count <= self.limits.presence_limit).then(|| self.member_names(&room));
            let frame = protocol::encode(&ServerEvent::Presence {
                room: &room,
                count,
                users,
            });
            self.broadcast(&room, None, frame);
        }
    }

    fn members(&self, room: &str) -> &[ClientId] {
        self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[])
    }

    fn room_summaries(&self) -> Vec<RoomSummary> {
        let mut names: Vec<&str> = self
            .rooms
            .keys()
            .map(String::as_str)
            .chain(self.history.room_names())
            .chain(self.remote.rooms())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .map(|name| RoomSummary {
                name: name.to_owned(),
                count: self.headcount(name),
            })
            .collect()
    }

    // ----- messages -----

    fn room_message(&mut self, id: ClientId, text: String) -> Result<(), ChatError> {
        let Some(client) = self.clients.get(&id) else {
            return Ok(());
        };
        let (room, from) = (client.room.clone(), client.name.clone());
        debug!("got message from {from:?} in {room:?}, broadcasting to all");
        self.set_typing(id, false);
        self.post(&room, &from, &text, Origin::Client(id))
    }

    /// Stages a room message, to be shown to every member once the commit saved it.
    fn post(
        &mut self,
        room: &str,
        from: &str,
        text: &str,
        origin: Origin,
    ) -> Result<(), ChatError> {
        self.room_allowed(room)?;
        self.take_room_bytes(room, from, text)?;
        if self.cluster.is_some() {
            return self.post_through_cluster(room, from, text, origin);
        }
        let id = self.history.take_id();
        let message = ChatMessage {
            id,
            room: room.to_owned(),
            from: from.to_owned(),
            to: None,
            text: text.to_owned(),
            ts: protocol::now_ms(),
            private: false,
        };
        let frame = protocol::encode(&message);
        self.history.append(
            room,
            Stored {
                id,
                ts: message.ts,
                frame: frame.clone(),
            },
        );
        self.unsaved.push(Unsaved {
            id,
            frame,
            audience: Audience::Room(message.room),
            origin,
        });
        Ok(())
    }

    /// Charges a message to its room's byte budget, so that however many senders a room has,
    /// a member who reads at the room's rate never falls behind.
    fn take_room_bytes(&mut self, room: &str, from: &str, text: &str) -> Result<(), ChatError> {
        let now = Instant::now();
        let cost = protocol::encoded_len(text) + from.len() + room.len() + MESSAGE_FRAME_BYTES;
        if self.room_rates.len() > self.limits.max_rooms {
            self.room_rates.retain(|_, bucket| !bucket.is_full(now));
        }
        let (rate, burst) = (self.limits.room_rate_bytes, self.limits.room_burst_bytes);
        let bucket = self
            .room_rates
            .entry(room.to_owned())
            .or_insert_with(|| TokenBucket::new(rate, burst, now));
        if bucket.try_take_n(cost as f64, now) {
            Ok(())
        } else {
            Metrics::add(&self.metrics.rate_limited, 1);
            Err(ChatError::RoomBusy)
        }
    }

    fn private_message(&mut self, id: ClientId, to: &str, text: String) -> Result<(), ChatError> {
        if self.cluster.is_some() {
            return self.private_through_cluster(id, to, &text);
        }
        let target = *self
            .names
            .get(&names::key(to))
            .ok_or_else(|| ChatError::NoSuchUser(to.to_owned()))?;
        let (Some(sender), Some(receiver)) = (self.clients.get(&id), self.clients.get(&target))
        else {
            return Ok(());
        };
        let (room, from) = (sender.room.clone(), sender.name.clone());
        let (to, receiver_room) = (receiver.name.clone(), receiver.room.clone());
        // What the receiver reads counts against its room's budget, as the room's own messages
        // do: however many addresses whisper to one member, it never reads more than its room.
        self.take_room_bytes(&receiver_room, &from, &text)?;
        let message = ChatMessage {
            id: self.history.take_unstored_id(),
            room,
            from,
            to: Some(to),
            text,
            ts: protocol::now_ms(),
            private: true,
        };
        self.unsaved.push(Unsaved {
            id: message.id,
            frame: protocol::encode(&message),
            audience: Audience::Pair(id, target),
            origin: Origin::Client(id),
        });
        Ok(())
    }

    // ----- typing -----

    fn set_typing(&mut self, id: ClientId, active: bool) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let was_active = client.typing_until.is_some();
        if !active && !was_active {
            return;
        }
        if active {
            let until = Instant::now() + TYPING_TIMEOUT;
            client.typing_until = Some(until);
            self.typing_deadlines.push(Reverse((until, id)));
        } else {
            client.typing_until = None;
        }
        let (room, name) = (client.room.clone(), client.name.clone());
        if let Some(cluster) = &mut self.cluster {
            cluster.typing(&room, &name, active);
        }
        let frame = protocol::encode(&ServerEvent::Typing {
            room: &room,
            name: &name,
            active,
        });
        self.broadcast(&room, Some(id), frame);
    }

    fn expire_typing(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.typing_deadlines.peek() {
            if at > now {
                break;
            }
            self.typing_deadlines.pop();
            // Only the latest refresh counts: older deadlines for the same client are stale.
            if self.clients.get(&id).and_then(|c| c.typing_until) == Some(at) {
                self.set_typing(id, false);
            }
        }
    }

    // ----- delivery -----

    /// Queues a frame for one client, to be delivered after the commit.
    fn send_to(&mut self, id: ClientId, frame: Frame) {
        self.delivery.post(id, frame);
    }

    /// Queues a frame for every member of `room` but `except`: the same bytes for each.
    fn broadcast(&mut self, room: &str, except: Option<ClientId>, frame: Frame) {
        let members = self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[]);
        for &member in members.iter().filter(|&&m| Some(m) != except) {
            self.delivery.post(member, frame.clone());
        }
    }

    /// Makes the batch durable, then hands its frames to the outlets: its chat messages if
    /// they were saved, an error to each sender if not.
    fn commit(&mut self) {
        let saved = self.history.commit();
        let unsaved = std::mem::take(&mut self.unsaved);
        match saved {
            Ok(()) => unsaved.into_iter().for_each(|m| self.show(m)),
            Err(e) => self.refuse(unsaved, &e),
        }
        self.update_history_gauges();
        self.deliver();
        for (reply, answer) in self.acks.drain(..) {
            let _ = reply.try_send(answer);
        }
    }

    /// Delivers a saved message and acknowledges it to an API publisher.
    fn show(&mut self, m: Unsaved) {
        Metrics::add(&self.metrics.messages_received, 1);
        match m.audience {
            Audience::Room(room) => self.broadcast(&room, None, m.frame),
            Audience::FromCluster(room) => self.show_arrived(&room, m.id, m.frame),
            Audience::Pair(from, to) => {
                self.send_to(to, m.frame.clone());
                if from != to {
                    self.send_to(from, m.frame);
                }
            }
        }
        if let Origin::Api(reply) = m.origin {
            self.acks.push((reply, Ok(m.id)));
        }
    }

    /// Tells the senders of a batch that could not be saved; their ids are never used again.
    fn refuse(&mut self, unsaved: Vec<Unsaved>, e: &SaveError) {
        let error = ChatError::NotSaved(e.reason());
        for m in unsaved {
            match m.origin {
                Origin::Client(id) => self.send_to(id, error.to_frame()),
                Origin::Api(reply) => self.acks.push((reply, Err(error.clone()))),
                Origin::Cluster => {}
            }
        }
    }

    fn update_history_gauges(&self) {
        let m = &self.metrics;
        m.history_messages.store(self.history.len() as u64, Relaxed);
        m.history_bytes.store(self.history.bytes() as u64, Relaxed);
        m.history_write_failures
            .store(self.history.write_failures(), Relaxed);
    }

    /// Sends the batch's frames, and drops each client too slow for them. Dropping one tells
    /// its room it left; those frames go out too. Every pass that finds a slow client removes
    /// it, so this ends.
    fn deliver(&mut self) {
        loop {
            let slow = self.delivery.send();
            if slow.is_empty() {
                return;
            }
            slow.into_iter().for_each(|id| self.drop_slow(id));
        }
    }

    fn drop_slow(&mut self, id: ClientId) {
        self.delivery.close(id, 1008, "too slow");
        if let Some(client) = self.remove_client(id) {
            info!(
                "a user disconnected: id {id} name {:?} (too slow: its backlog is full)",
                client.name
            );
            Metrics::add(&self.metrics.slow_clients_dropped, 1);
        }
    }

    fn close_everyone(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.stop();
        }
        self.commit();
        self.history.finish();
        let told = self.delivery.close_all(1001, "server shutting down");
        info!("dispatcher stopped ({told} clients told to go away)");
    }
}

/// A chat message waiting for its batch to be saved.
struct Unsaved {
    id: u64,
    frame: Frame,
    audience: Audience,
    origin: Origin,
}

/// Who sees a message once it is saved.
enum Audience {
    /// Every member of the room.
    Room(String),
    /// Every member of the room who does not have it yet (`--redis`: see `remote`).
    FromCluster(String),
    /// A private message: its sender and its target.
    Pair(ClientId, ClientId),
}

/// Who is told if a message cannot be saved.
enum Origin {
    Client(ClientId),
    /// The HTTP API: answered with the id, or the error.
    Api(PublishReply),
    /// Another node (or this one, through Redis): its sender was answered there.
    Cluster,
}

/// The hub in memory: no sockets and no courier threads. Each client's outlet writes to a
/// recorder (`outlet::testing`) instead of a socket; the tests feed events and read what each
/// client got.
#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Fsync;
    use crate::history::Settings;
    use crate::outlet::testing::{ROOMY, Recorder, recording};

    const PRESENCE_LIMIT: usize = 3;
    const PRESENCE_BURST: u32 = 16;

    /// A hub with in-memory history and inline delivery, and its clients' recorders.
    struct Chat {
        hub: Hub,
        metrics: Arc<Metrics>,
        recorders: HashMap<ClientId, Arc<Recorder>>,
    }

    impl Chat {
        fn new() -> Chat {
            let history = History::open(&Settings {
                per_room: 100,
                total_bytes: 1 << 20,
                data_dir: None,
                fsync: Fsync::Never,
                compact_bytes: 1 << 20,
                max_line_bytes: 1 << 16,
            })
            .unwrap();
            let limits = HubLimits {
                history: 100,
                max_rooms: 10,
                presence_limit: PRESENCE_LIMIT,
                presence_burst: PRESENCE_BURST,
                room_quiet: Duration::from_secs(600),
                room_rate_bytes: 1e9,
                room_burst_bytes: 1e9,
            };
            let metrics = Arc::new(Metrics::default());
            let delivery = Delivery::with_couriers(0, metrics.clone()).unwrap();
            let hub = Hub::new(history, limits, delivery, metrics.clone());
            let recorders = HashMap::new();
            Chat {
                hub,
                metrics,
                recorders,
            }
        }

        /// Connects client `id` (`?name=...&since=...` in `room`) and ends the batch.
        fn connect(&mut self, id: ClientId, name: Option<&str>, room: &str, since: Option<u64>) {
            let (outlet, recorder) = recording(&self.metrics, ROOMY);
            self.recorders.insert(id, recorder);
            let arrival = Arrival {
                ip: [192, 0, 2, 1].into(),
                room: room.to_owned(),
                name: name.map(str::to_owned),
                since,
            };
            self.batch([Event::Connect {
                id,
                arrival,
                outlet,
            }]);
        }

        /// Handles `events` as one batch, and ends it.
        fn batch(&mut self, events: impl IntoIterator<Item = Event>) {
            events.into_iter().for_each(|e| self.hub.handle(e));
            self.hub.end_batch(Instant::now());
        }

        fn send(&mut self, id: ClientId, command: Command) {
            self.batch([commands(id, [command])]);
        }

        /// The frames client `id` got since the last look, parsed.
        fn got(&self, id: ClientId) -> Vec<Value> {
            let frames = self.recorders[&id].take();
            frames
                .iter()
                .map(|f| serde_json::from_str(f.as_str()).unwrap())
                .collect()
        }

        /// The `type` of each frame client `id` got since the last look.
        fn types(&self, id: ClientId) -> Vec<String> {
            let got = self.got(id);
            got.iter()
                .map(|f| f["type"].as_str().unwrap().to_owned())
                .collect()
        }

        /// Drops what these clients got so far.
        fn forget(&self, ids: &[ClientId]) {
            ids.iter().for_each(|id| drop(self.got(*id)));
        }
    }

    fn commands(id: ClientId, commands: impl IntoIterator<Item = Command>) -> Event {
        let commands = commands.into_iter().collect();
        Event::Commands { id, commands }
    }

    fn say(text: &str) -> Command {
        Command::Message {
            text: text.into(),
            to: None,
        }
    }

    fn whisper(to: &str, text: &str) -> Command {
        Command::Message {
            text: text.into(),
            to: Some(to.into()),
        }
    }

    fn texts(frames: &[Value]) -> Vec<&str> {
        frames.iter().filter_map(|f| f["text"].as_str()).collect()
    }

    #[test]
    fn a_client_is_welcomed_with_its_name_room_and_members() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        let welcome = &chat.got(2)[0];
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["client_id"], 2);
        assert_eq!(welcome["name"], "bob");
        assert_eq!(welcome["room"], "lobby");
        assert_eq!(welcome["users"], json!(["ada", "bob"]));
        assert_eq!(welcome["last_id"], 0);
    }

    #[test]
    fn the_room_hears_who_joins_and_who_leaves() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.connect(3, Some("cy"), "elsewhere", None);
        chat.forget(&[1]);
        chat.connect(4, Some("dee"), "lobby", None);
        assert_eq!(
            chat.got(1),
            [json!({"type":"joined","room":"lobby","name":"dee","count":3})]
        );
        let reason = "gone".to_owned();
        chat.batch([Event::Disconnect { id: 2, reason }]);
        assert_eq!(
            chat.got(1),
            [json!({"type":"left","room":"lobby","name":"bob","count":2})]
        );
        assert_eq!(chat.types(3), ["welcome"], "another room hears nothing");
    }

    #[test]
    fn a_message_reaches_the_whole_room_sender_included_in_id_order() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.connect(3, Some("cy"), "elsewhere", None);
        chat.forget(&[1, 2, 3]);
        chat.batch([
            commands(1, [say("one"), say("two")]),
            commands(2, [say("three")]),
        ]);
        for id in [1, 2] {
            let got = chat.got(id);
            assert_eq!(texts(&got), ["one", "two", "three"], "client {id}");
            let ids: Vec<u64> = got.iter().map(|f| f["id"].as_u64().unwrap()).collect();
            assert_eq!(ids, [1, 2, 3]);
            assert_eq!(got[2]["from"], "bob");
        }
        assert!(chat.got(3).is_empty());
    }

    #[test]
    fn nothing_is_shown_before_the_batch_is_committed() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.forget(&[1]);
        chat.hub.handle(commands(1, [say("soon")]));
        assert!(chat.got(1).is_empty(), "held until the commit");
        chat.hub.end_batch(Instant::now());
        assert_eq!(texts(&chat.got(1)), ["soon"]);
    }

    #[test]
    fn a_private_message_reaches_its_sender_and_target_only() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "dev", None);
        chat.connect(3, Some("cy"), "lobby", None);
        chat.forget(&[1, 2, 3]);
        chat.send(1, whisper("bob", "psst"));
        for id in [1, 2] {
            let got = chat.got(id);
            assert_eq!(texts(&got), ["psst"]);
            assert_eq!(
                (got[0]["private"].clone(), got[0]["to"].clone()),
                (json!(true), json!("bob"))
            );
        }
        assert!(chat.got(3).is_empty());
        chat.send(1, whisper("nobody", "hello?"));
        assert_eq!(chat.got(1)[0]["code"], "no_such_user");
    }

    #[test]
    fn a_taken_name_is_refused_at_a_rename_and_at_connect() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.forget(&[1, 2]);
        chat.send(2, Command::Nick { name: "ADA".into() });
        assert_eq!(chat.got(2)[0]["code"], "name_taken");
        assert!(chat.got(1).is_empty(), "a refused rename is not told");
        chat.connect(3, Some("ada"), "lobby", None);
        let got = chat.got(3);
        assert_eq!(
            (got[0]["type"].clone(), got[0]["name"].clone()),
            (json!("welcome"), json!("guest-3"))
        );
        assert_eq!(got[1]["code"], "name_taken");
    }

    #[test]
    fn a_rename_is_told_to_the_room_and_frees_the_old_name() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.forget(&[1, 2]);
        chat.send(2, Command::Nick { name: "rob".into() });
        let renamed = json!({"type":"renamed","room":"lobby","from":"bob","name":"rob","count":2});
        for id in [1, 2] {
            assert_eq!(chat.got(id), std::slice::from_ref(&renamed));
        }
        chat.send(1, Command::Nick { name: "bob".into() });
        assert_eq!(chat.got(1)[0]["type"], "renamed", "the old name is free");
    }

    #[test]
    fn a_slow_client_is_dropped_and_its_room_told() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.forget(&[1, 2]);
        *chat.recorders[&2].slow.lock().unwrap() = true;
        chat.send(1, say("flood"));
        let got = chat.got(1);
        assert_eq!(texts(&got), ["flood"]);
        assert_eq!(
            got[1],
            json!({"type":"left","room":"lobby","name":"bob","count":1})
        );
        assert_eq!(*chat.recorders[&2].closed.lock().unwrap(), Some("too slow"));
        assert_eq!(chat.metrics.slow_clients_dropped.load(Relaxed), 1);
        chat.send(1, say("after"));
        assert_eq!(
            chat.types(2),
            ["message"],
            "nothing reaches a dropped client"
        );
    }

    #[test]
    fn a_resume_with_since_gets_exactly_what_was_missed() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.batch([commands(1, [say("a"), say("b"), say("c")])]);
        chat.connect(2, Some("bob"), "lobby", Some(1));
        let welcome = &chat.got(2)[0];
        let history = welcome["history"].as_array().unwrap();
        assert_eq!(texts(history), ["b", "c"]);
        assert_eq!(
            (welcome["last_id"].clone(), welcome["truncated"].clone()),
            (json!(3), json!(false))
        );
        chat.connect(3, Some("cy"), "lobby", Some(3));
        let welcome = &chat.got(3)[0];
        assert_eq!(
            (welcome["history"].clone(), welcome["last_id"].clone()),
            (json!([]), json!(3))
        );
    }

    #[test]
    fn a_join_moves_the_client_and_tells_both_rooms() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "dev", None);
        chat.connect(3, Some("cy"), "lobby", None);
        chat.forget(&[1, 2, 3]);
        chat.send(
            3,
            Command::Join {
                room: "dev".into(),
                since: None,
            },
        );
        assert_eq!(
            chat.got(1),
            [json!({"type":"left","room":"lobby","name":"cy","count":1})]
        );
        assert_eq!(
            chat.got(2),
            [json!({"type":"joined","room":"dev","name":"cy","count":2})]
        );
        let room = &chat.got(3)[0];
        assert_eq!(
            (room["type"].clone(), room["users"].clone()),
            (json!("room"), json!(["bob", "cy"]))
        );
        chat.send(3, say("hi dev"));
        assert_eq!(
            (chat.types(1), chat.types(2)),
            (vec![], vec!["message".to_owned()])
        );
    }

    #[test]
    fn typing_is_told_to_the_others_and_ends_by_itself() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.connect(2, Some("bob"), "lobby", None);
        chat.forget(&[1, 2]);
        chat.send(1, Command::Typing { active: true });
        assert_eq!(
            chat.got(2),
            [json!({"type":"typing","room":"lobby","name":"ada","active":true})]
        );
        assert!(chat.got(1).is_empty(), "the typist is not told");
        chat.hub.end_batch(Instant::now() + TYPING_TIMEOUT);
        assert_eq!(chat.got(2)[0]["active"], false);
    }

    #[test]
    fn a_burst_of_joins_and_leaves_is_told_as_one_list_at_the_tick() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "lobby", None);
        chat.forget(&[1]);
        // Comers who join and leave at once: two changes each, past the burst.
        for id in 2..=PRESENCE_BURST as u64 {
            chat.connect(id, None, "lobby", None);
            let reason = "gone".to_owned();
            chat.batch([Event::Disconnect { id, reason }]);
        }
        let told = chat.types(1);
        // Ada's own arrival was the window's first change.
        assert_eq!(told.len(), PRESENCE_BURST as usize - 1);
        assert!(told.iter().all(|t| t == "joined" || t == "left"));
        chat.connect(99, Some("bob"), "lobby", None);
        assert!(chat.got(1).is_empty(), "past the burst: nothing one by one");
        chat.hub.end_batch(Instant::now() + PRESENCE_TICK);
        assert_eq!(
            chat.got(1),
            [json!({"type":"presence","room":"lobby","count":2,"users":["ada","bob"]})]
        );
    }

    #[test]
    fn a_crowd_hears_counts_once_a_tick_instead_of_names() {
        let mut chat = Chat::new();
        for id in 1..=PRESENCE_LIMIT as u64 + 1 {
            chat.connect(id, None, "lobby", None);
        }
        chat.forget(&[1]);
        chat.connect(9, None, "lobby", None);
        assert!(chat.got(1).is_empty(), "no `joined` in a crowd");
        chat.hub.end_batch(Instant::now() + PRESENCE_TICK);
        assert_eq!(
            chat.got(1),
            [json!({"type":"presence","room":"lobby","count":5})]
        );
    }

    #[test]
    fn an_api_post_is_shown_then_answered_with_its_id() {
        let mut chat = Chat::new();
        chat.connect(1, Some("ada"), "ops", None);
        chat.forget(&[1]);
        let (reply, answer) = crossbeam_channel::bounded(1);
        let publish = Event::Publish {
            room: "ops".into(),
            from: "deploy".into(),
            text: "done".into(),
            reply,
        };
        chat.batch([publish]);
        assert_eq!(answer.try_recv(), Ok(Ok(1)));
        let got = chat.got(1);
        assert_eq!(
            (texts(&got), got[0]["from"].clone()),
            (vec!["done"], json!("deploy"))
        );
    }
}
