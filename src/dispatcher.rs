//! The dispatcher (the hub): one thread that owns every piece of shared chat state — who is
//! connected, their names, rooms, typing states and history — and decides who receives what.
//!
//! Sessions and the HTTP API talk to it only through [`Event`]s on one channel, and it talks back
//! only through each client's [`Outlet`], handing it frames. It never blocks on a client: a client
//! whose outlet's backlog passes its bound is dropped as too slow. Because all chat state lives on
//! this one thread it needs no locks, and every room sees its messages in one order (the id
//! order).
//!
//! Each loop turn handles a batch of events, then commits history (one write, one sync), and only
//! then hands the batch's frames to the outlets, each client's frames together, so no one sees a
//! message that a crash could still lose. Chat messages wait for that commit apart from other
//! frames: if it fails, none of them is shown and each sender is told it was not saved.
//!
//! With `--redis` ([`crate::cluster`]) a chat message is handed to Redis instead, and shown when
//! it comes back with its id, in the order all nodes share; `remote` holds that side.

mod remote;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info};

use crate::cluster::{self, Cluster};
use crate::courier::{Couriers, Parcel};
use crate::history::{History, SaveError, Stored};
use crate::metrics::Metrics;
use crate::names;
use crate::outlet::Outlet;
use crate::protocol::{self, ChatError, ChatMessage, Command, Frame, RoomState, ServerEvent};
use crate::ratelimit::TokenBucket;

pub use crate::protocol::ClientId;

/// Most events handled before history is committed and frames are delivered: bounds the delay a
/// busy dispatcher adds before the first frame of a batch goes out.
const MAX_BATCH_EVENTS: usize = 512;
/// A typing state that is not refreshed within this time ends by itself.
pub const TYPING_TIMEOUT: Duration = Duration::from_secs(5);
/// Mailbox capacity a client keeps between batches; a bigger one (after a burst) is released.
const KEEP_MAILBOX_FRAMES: usize = 16;
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
    Connect(Box<Connect>),
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

/// A new client, after its handshake.
pub struct Connect {
    pub id: ClientId,
    pub peer: String,
    pub name: Option<String>,
    pub room: String,
    pub since: Option<u64>,
    pub outlet: Arc<Outlet>,
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
    outlet: Arc<Outlet>,
    /// This batch's frames for the client, in order, until the batch is committed.
    mailbox: Vec<Frame>,
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
    /// Clients with frames in their mailbox from this batch, delivered after the commit.
    touched: Vec<ClientId>,
    /// Helper threads that write part of each batch (see [`crate::courier`]).
    couriers: Couriers,
    /// The frames this thread writes itself (lane 0), kept for its allocation.
    own: Parcel,
    /// This batch's chat messages, shown only once the commit saved them.
    unsaved: Vec<Unsaved>,
    /// API publishers waiting for their answer, answered after the batch is delivered.
    acks: Vec<(PublishReply, Result<u64, ChatError>)>,
    typing_deadlines: BinaryHeap<Reverse<(Instant, ClientId)>>,
    /// Rooms whose membership changed without per-member events, and when to tell them.
    presence_changed: Vec<String>,
    presence_due: Option<Instant>,
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
        couriers: Couriers,
        metrics: Arc<Metrics>,
    ) -> Hub {
        Hub {
            clients: HashMap::new(),
            names: HashMap::new(),
            rooms: HashMap::new(),
            history,
            limits,
            metrics,
            touched: Vec::new(),
            couriers,
            own: Parcel::default(),
            unsaved: Vec::new(),
            acks: Vec::new(),
            typing_deadlines: BinaryHeap::new(),
            presence_changed: Vec::new(),
            presence_due: None,
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
            let now = Instant::now();
            self.expire_typing(now);
            self.announce_presence(now);
            self.commit();
        }
        self.close_everyone();
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
            Event::Connect(connect) => self.connect(*connect),
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

    fn connect(&mut self, c: Connect) {
        let mut errors = Vec::new();
        let name = match c
            .name
            .map(|n| protocol::check_name(&n).and_then(|n| self.free_name(n, c.id)))
        {
            Some(Ok(name)) => name,
            Some(Err(e)) => {
                errors.push(e);
                self.guest_name(c.id)
            }
            None => self.guest_name(c.id),
        };
        let mut room = c.room;
        if let Err(e) = self.room_allowed(&room) {
            errors.push(e);
            room = protocol::DEFAULT_ROOM.to_owned();
        }
        info!(
            "a user connected: id {} name {name:?} room {room:?} from {}",
            c.id, c.peer
        );
        self.names.insert(names::key(&name), c.id);
        self.clients.insert(
            c.id,
            Client {
                name,
                room: room.clone(),
                outlet: c.outlet,
                mailbox: Vec::new(),
                typing_until: None,
            },
        );
        self.enter_room(c.id, &room, c.since, true);
        for e in errors {
            self.send_to(c.id, e.to_frame());
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
        let client = self.clients.remove(&id)?;
        self.names.remove(&names::key(&client.name));
        self.leave_room(id, &client.room, &client.name);
        if let Some(cluster) = &self.cluster {
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
        if let Some(cluster) = &self.cluster {
            cluster.here(id, &name, &room);
        }
        let count = self.headcount(&room);
        let frame = protocol::encode(&ServerEvent::Renamed {
            room: &room,
            from: &old,
            name: &name,
            count,
        });
        if count <= self.limits.presence_limit {
            self.broadcast(&room, None, frame);
        } else {
            self.send_to(id, frame); // a crowd hears no names; the renamed client must
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
        if let Some(cluster) = &self.cluster {
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
        let history = slice
            .messages
            .iter()
            .filter_map(|m| protocol::raw_json(&m.frame))
            .collect();
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
        let frame = if welcome {
            protocol::encode(&ServerEvent::Welcome {
                client_id: id,
                name: &me.name,
                room: state,
            })
        } else {
            protocol::encode(&ServerEvent::Room { room: state })
        };
        let joined = (is_new && count <= self.limits.presence_limit).then(|| {
            protocol::encode(&ServerEvent::Joined {
                room,
                name: &me.name,
                count,
            })
        });
        self.send_to(id, frame);
        if let Some(joined) = joined {
            self.broadcast(room, Some(id), joined);
        } else if is_new {
            self.presence_changed(room);
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
        } else if before <= self.limits.presence_limit {
            let frame = protocol::encode(&ServerEvent::Left { room, name, count });
            self.broadcast(room, None, frame);
        } else {
            self.presence_changed(room);
        }
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
        if let Some(cluster) = &self.cluster {
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
        post_to(&mut self.clients, &mut self.touched, id, frame);
    }

    /// Queues a frame for every member of `room` but `except`.
    fn broadcast(&mut self, room: &str, except: Option<ClientId>, frame: Frame) {
        let members = self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[]);
        for &member in members.iter().filter(|&&m| Some(m) != except) {
            post_to(&mut self.clients, &mut self.touched, member, frame.clone());
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
        // Dropping a slow client queues `left` frames for its room; deliver those too. Each pass
        // after the first removes at least one client, so this ends.
        while !self.touched.is_empty() {
            self.deliver();
        }
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

    /// Hands each touched client's mailbox to its outlet, all of its frames together so they
    /// leave in one write: by this thread (lane 0) or a courier.
    fn deliver(&mut self) {
        let lanes = self.couriers.lanes() as u64;
        let mut touched = std::mem::take(&mut self.touched);
        for id in touched.drain(..) {
            let Some(client) = self.clients.get_mut(&id) else {
                continue; // gone since: its frames went with it
            };
            let parcel = match (id % lanes) as usize {
                0 => &mut self.own,
                lane => self.couriers.parcel(lane),
            };
            parcel.add(id, &client.outlet, client.mailbox.drain(..));
            if client.mailbox.capacity() > KEEP_MAILBOX_FRAMES {
                client.mailbox = Vec::new(); // an idle client keeps little
            }
        }
        self.touched = touched; // keep the allocation for the next batch
        self.couriers.send_all();
        let mut slow = Vec::new();
        let handed = self.own.deliver(|id| slow.push(id));
        Metrics::add(&self.metrics.messages_sent, handed);
        slow.extend(self.couriers.slow_clients());
        for id in slow {
            self.drop_slow(id);
        }
    }

    fn drop_slow(&mut self, id: ClientId) {
        if let Some(client) = self.remove_client(id) {
            info!(
                "a user disconnected: id {id} name {:?} (too slow: its backlog is full)",
                client.name
            );
            Metrics::add(&self.metrics.slow_clients_dropped, 1);
            client.outlet.close(1008, "too slow");
        }
    }

    fn close_everyone(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.stop();
        }
        self.commit();
        self.history.finish();
        self.couriers.stop(); // what they carry goes out before the close frames
        for client in self.clients.values() {
            client.outlet.close(1001, "server shutting down");
        }
        info!(
            "dispatcher stopped ({} clients told to go away)",
            self.clients.len()
        );
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

/// Puts a frame in a client's mailbox (if it is still connected), noting the client as touched
/// the first time in a batch.
fn post_to(
    clients: &mut HashMap<ClientId, Client>,
    touched: &mut Vec<ClientId>,
    id: ClientId,
    frame: Frame,
) {
    if let Some(client) = clients.get_mut(&id) {
        if client.mailbox.is_empty() {
            touched.push(id);
        }
        client.mailbox.push(frame);
    }
}
