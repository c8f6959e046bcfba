//! The dispatcher's side of `--redis`: what the other nodes' members are (names, rooms), and
//! how what the feed brings becomes frames for this node's clients. Everything here runs on
//! the dispatcher thread, like the rest of the hub; Redis itself is [`crate::cluster`]'s.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{Audience, Hub, Origin, Unsaved};
use crate::cluster::wire::{Body, Member};
use crate::cluster::{Arrived, Cluster, Inbound, ReplyTo, UNREACHABLE};
use crate::history::Stored;
use crate::metrics::Metrics;
use crate::names;
use crate::protocol::{self, ChatError, ChatMessage, ClientId, ServerEvent};

/// A message shown while Redis is away: a `message` frame without an id.
#[derive(serde::Serialize)]
struct LocalMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    from: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    text: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    private: bool,
    local: bool,
}

/// The other nodes' members, by node and client id, with their names for uniqueness.
#[derive(Default)]
pub(super) struct Remote {
    members: HashMap<(u64, ClientId), Member>,
    /// Name key ([`names::key`]) -> member, as the hub's own `names`.
    names: HashMap<String, (u64, ClientId)>,
    /// Each room's members on other nodes, in the order they arrived, as the hub's own `rooms`.
    rooms: HashMap<String, Vec<(u64, ClientId)>>,
    /// Clients that resumed here with a `since` this node's copy of history had not reached
    /// yet (the client came from a node whose feed was ahead): the messages up to it, still on
    /// their way, are not shown to them again. Each holds for [`RESUME_GRACE`] at most.
    resumes: HashMap<ClientId, (u64, Instant)>,
}

/// How long a resume's `since` can hold back older messages still on their way to this node:
/// far more than one feed lags behind another, short enough that a made-up `since` (above
/// every id) hides nothing for long.
const RESUME_GRACE: Duration = Duration::from_secs(10);

impl Remote {
    /// A client entered a room with `since` (or without): remembered until the messages up
    /// to it have passed, or for [`RESUME_GRACE`].
    pub(super) fn resumed(&mut self, client: ClientId, since: Option<u64>) {
        match since {
            Some(since) => {
                let until = Instant::now() + RESUME_GRACE;
                self.resumes.insert(client, (since, until));
            }
            None => self.forget_resume(client),
        }
    }

    pub(super) fn forget_resume(&mut self, client: ClientId) {
        self.resumes.remove(&client);
    }

    /// Whether message `id` is one `client` already has (by its resume), forgetting resumes
    /// that are past.
    fn already_has(&mut self, client: ClientId, id: u64, now: Instant) -> bool {
        let Some(&(since, until)) = self.resumes.get(&client) else {
            return false;
        };
        if id <= since && now < until {
            return true;
        }
        self.resumes.remove(&client);
        false
    }

    /// Members of `room` on other nodes.
    pub(super) fn count(&self, room: &str) -> usize {
        self.rooms.get(room).map_or(0, Vec::len)
    }

    pub(super) fn names_in(&self, room: &str) -> Vec<&str> {
        let at = self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[]);
        let members = at.iter().filter_map(|at| self.members.get(at));
        members.map(|m| m.name.as_str()).collect()
    }

    pub(super) fn has_name(&self, key: &str) -> bool {
        self.names.contains_key(key)
    }

    fn by_name_key(&self, key: &str) -> Option<&Member> {
        self.members.get(self.names.get(key)?)
    }

    /// Rooms with members on other nodes (the room list counts them).
    pub(super) fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }

    fn insert(&mut self, member: Member) -> Option<Member> {
        let at = (member.node, member.client);
        let (name, room) = (names::key(&member.name), member.room.clone());
        let old = self.members.insert(at, member);
        if let Some(old) = &old {
            self.unindex(at, old);
        }
        self.names.insert(name, at);
        let in_room = self.rooms.entry(room).or_default();
        if !in_room.contains(&at) {
            in_room.push(at);
        }
        old
    }

    fn remove(&mut self, node: u64, client: ClientId) -> Option<Member> {
        let old = self.members.remove(&(node, client))?;
        self.unindex((node, client), &old);
        Some(old)
    }

    fn unindex(&mut self, at: (u64, ClientId), old: &Member) {
        self.names.remove(&names::key(&old.name));
        if let Some(in_room) = self.rooms.get_mut(&old.room) {
            in_room.retain(|&m| m != at);
            if in_room.is_empty() {
                self.rooms.remove(&old.room);
            }
        }
    }

    fn of_node(&self, node: u64) -> Vec<ClientId> {
        let on_node = self.members.keys().filter(|(n, _)| *n == node);
        on_node.map(|&(_, c)| c).collect()
    }
}

/// A chat message as handed to Redis (it gets its id there; the link fills in the node).
pub(super) fn body(room: &str, from: &str, to: Option<String>, text: &str) -> Body {
    Body {
        room: room.to_owned(),
        from: from.to_owned(),
        private: to.is_some(),
        to,
        text: text.to_owned(),
        ts: protocol::now_ms(),
        node: 0,
        client: 0,
    }
}

impl Hub {
    pub(super) fn heard_from_cluster(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Messages(arrived) => {
                if let Some(cluster) = &self.cluster {
                    cluster.handled(arrived.iter().map(|a| a.message.text.len()).sum());
                }
                for Arrived { message, sender } in arrived {
                    self.arrived(message, sender);
                }
            }
            Inbound::Refused { client, error } => self.send_to(client, error.to_frame()),
            Inbound::NameLost { client, name } => self.name_lost(client, name),
            Inbound::Members(members) => self.replace_remote(None, members),
            Inbound::Roster { node, members } => self.replace_remote(Some(node), members),
            Inbound::Here(member) => self.remote_here(member),
            Inbound::Gone { node, client } => self.remote_gone(node, client),
            Inbound::NodeGone(node) => {
                for client in self.remote.of_node(node) {
                    self.remote_gone(node, client);
                }
            }
            Inbound::Typing { room, name, active } => {
                let frame = protocol::encode(&ServerEvent::Typing {
                    room: &room,
                    name: &name,
                    active,
                });
                self.broadcast(&room, None, frame);
            }
        }
    }

    /// A room message with `--redis`: handed to Redis, to be shown when the feed brings it
    /// back with its id. While Redis is away a client's message is shown at once to this node's
    /// members only, without an id (see [`Hub::show_locally`]); the API is refused.
    pub(super) fn post_through_cluster(
        &mut self,
        room: &str,
        from: &str,
        text: &str,
        origin: Origin,
    ) -> Result<(), ChatError> {
        let Some(up) = self.cluster.as_ref().map(Cluster::is_up) else {
            return Ok(());
        };
        let reply = match origin {
            Origin::Client(_) if !up => {
                self.show_locally(room, from, None, text);
                return Ok(());
            }
            Origin::Client(id) => ReplyTo::Client(id),
            Origin::Api(reply) => ReplyTo::Api(reply),
            Origin::Cluster => ReplyTo::Nobody,
        };
        self.post_to_cluster(body(room, from, None, text), reply)
    }

    /// While Redis is away: a message shown on this node only, at once, with no id (only Redis
    /// hands out ids, so none can be shown twice) and `"local": true`, kept in no history.
    /// `to` is a private message's receiver on this node.
    fn show_locally(&mut self, room: &str, from: &str, to: Option<(ClientId, &str)>, text: &str) {
        let frame = protocol::encode(&LocalMessage {
            kind: "message",
            room,
            from,
            to: to.map(|(_, name)| name),
            text,
            ts: protocol::now_ms(),
            private: to.is_some(),
            local: true,
        });
        Metrics::add(&self.metrics.messages_received, 1);
        match to {
            Some((receiver, _)) => {
                self.send_to(receiver, frame.clone());
                let sender = self.names.get(&names::key(from)).copied();
                if let Some(sender) = sender.filter(|&s| s != receiver) {
                    self.send_to(sender, frame);
                }
            }
            None => self.broadcast(room, None, frame),
        }
    }

    /// A private message to a member of any node: it too takes its id from Redis, and both
    /// ends see it when the feed brings it.
    pub(super) fn private_through_cluster(
        &mut self,
        id: ClientId,
        to: &str,
        text: &str,
    ) -> Result<(), ChatError> {
        let key = names::key(to);
        let receiver = match self.names.get(&key).and_then(|t| self.clients.get(t)) {
            Some(local) => (local.name.clone(), local.room.clone()),
            None => match self.remote.by_name_key(&key) {
                Some(remote) => (remote.name.clone(), remote.room.clone()),
                None => return Err(ChatError::NoSuchUser(to.to_owned())),
            },
        };
        let Some(sender) = self.clients.get(&id) else {
            return Ok(());
        };
        let (room, from) = (sender.room.clone(), sender.name.clone());
        self.take_room_bytes(&receiver.1, &from, text)?;
        let Some(up) = self.cluster.as_ref().map(Cluster::is_up) else {
            return Ok(());
        };
        if !up {
            let Some(&target) = self.names.get(&key) else {
                return Err(ChatError::NotSaved(UNREACHABLE.to_owned()));
            };
            self.show_locally(&room, &from, Some((target, &receiver.0)), text);
            return Ok(());
        }
        let body = body(&room, &from, Some(receiver.0), text);
        self.post_to_cluster(body, ReplyTo::Client(id))
    }

    fn post_to_cluster(&mut self, body: Body, reply: ReplyTo) -> Result<(), ChatError> {
        match &mut self.cluster {
            Some(cluster) => cluster.post(body, reply),
            None => Ok(()),
        }
    }

    /// The end of a batch: its chat messages go to Redis together; those the link had no room
    /// for are refused (`busy`).
    pub(super) fn hand_posts_to_cluster(&mut self) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        for reply in cluster.hand_over() {
            match reply {
                ReplyTo::Client(id) => self.send_to(id, ChatError::Busy.to_frame()),
                ReplyTo::Api(reply) => drop(reply.try_send(Err(ChatError::Busy))),
                ReplyTo::Nobody => {}
            }
        }
    }

    /// A chat message in the one order: history and the room, or a private message's two ends
    /// (the sender only if it is on this node).
    fn arrived(&mut self, message: ChatMessage, sender: Option<ClientId>) {
        let frame = protocol::encode(&message);
        if message.private {
            let to = message.to.as_deref().map(names::key);
            let target = to.and_then(|key| self.names.get(&key).copied());
            for id in [target, sender.filter(|&s| Some(s) != target)]
                .into_iter()
                .flatten()
            {
                self.send_to(id, frame.clone());
            }
            return;
        }
        let (id, ts) = (message.id, message.ts);
        let stored = Stored {
            id,
            ts,
            frame: frame.clone(),
        };
        self.history.append(&message.room, stored);
        self.unsaved.push(Unsaved {
            id,
            frame,
            audience: Audience::FromCluster(message.room),
            origin: Origin::Cluster,
        });
    }

    /// Shows a room message from the feed to its room, but not to a member that resumed from
    /// a later id (it has this one from another node).
    pub(super) fn show_arrived(&mut self, room: &str, id: u64, frame: protocol::Frame) {
        if self.remote.resumes.is_empty() {
            return self.broadcast(room, None, frame);
        }
        let now = Instant::now();
        let members = self.members(room).to_vec();
        for member in members {
            if !self.remote.already_has(member, id, now) {
                self.send_to(member, frame.clone());
            }
        }
    }

    /// Another node claimed this name first (both took it at once, or while Redis was away):
    /// the member here becomes a guest, and is told why.
    fn name_lost(&mut self, client: ClientId, name: String) {
        if self.clients.get(&client).is_none_or(|c| c.name != name) {
            return; // renamed or gone since
        }
        let guest = self.guest_name(client);
        if self.rename(client, guest).is_ok() {
            self.send_to(client, ChatError::NameTaken(name).to_frame());
        }
    }

    /// The members of one other node (`Some`) or of all of them, as Redis has them now.
    fn replace_remote(&mut self, node: Option<u64>, members: Vec<Member>) {
        let now: HashSet<(u64, ClientId)> = members.iter().map(|m| (m.node, m.client)).collect();
        let stale: Vec<(u64, ClientId)> = (self.remote.members.keys())
            .filter(|at| node.is_none_or(|n| n == at.0) && !now.contains(at))
            .copied()
            .collect();
        for (node, client) in stale {
            self.remote_gone(node, client);
        }
        for member in members {
            self.remote_here(member);
        }
    }

    /// A member of another node joined, moved or was renamed: this node's members of the rooms
    /// concerned hear it as if it were local.
    fn remote_here(&mut self, member: Member) {
        let (name, room) = (member.name.clone(), member.room.clone());
        match self.remote.insert(member) {
            Some(old) if old.room == room && old.name == name => {}
            Some(old) if old.room == room => {
                let count = self.headcount(&room);
                let frame = protocol::encode(&ServerEvent::Renamed {
                    room: &room,
                    from: &old.name,
                    name: &name,
                    count,
                });
                self.tell_room(&room, count, frame);
            }
            old => {
                if let Some(old) = old {
                    self.tell_left(&old.room, &old.name);
                }
                let count = self.headcount(&room);
                let frame = protocol::encode(&ServerEvent::Joined {
                    room: &room,
                    name: &name,
                    count,
                });
                self.tell_room(&room, count, frame);
            }
        }
    }

    fn remote_gone(&mut self, node: u64, client: ClientId) {
        if let Some(old) = self.remote.remove(node, client) {
            self.tell_left(&old.room, &old.name);
        }
    }

    fn tell_left(&mut self, room: &str, name: &str) {
        let count = self.headcount(room);
        let frame = protocol::encode(&ServerEvent::Left { room, name, count });
        self.tell_room(room, count + 1, frame);
    }

    /// A presence frame for a room of `count` members (counted before a leave): by name, or as
    /// one `presence` frame at the next tick, as for local members (see `one_by_one`).
    fn tell_room(&mut self, room: &str, count: usize, frame: protocol::Frame) {
        if !self.members(room).is_empty() && self.one_by_one(room, count) {
            self.broadcast(room, None, frame);
        }
    }

    /// Members of `room` on every node.
    pub(super) fn headcount(&self, room: &str) -> usize {
        self.members(room).len() + self.remote.count(room)
    }
}
