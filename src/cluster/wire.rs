//! What travels on the Redis channel and sits in the room streams: one JSON object per entry,
//! tagged by `k`. This module only encodes and checks entries; it never talks to Redis.
//!
//! A chat message's envelope (`{"k":"m","id":N,"m":{...}}`) is finished by the Lua script that
//! gives it its id, so the same bytes are published and stored. Everything else is built here.

use serde::{Deserialize, Serialize};

use crate::protocol::{self, ChatMessage, ClientId};

/// A chat message before Redis gave it an id: the `m` of its envelope.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Body {
    pub room: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    pub text: String,
    pub ts: u64,
    #[serde(default)]
    pub private: bool,
    /// The node and the client that sent it: that node tells the sender about a private one.
    pub node: u64,
    pub client: ClientId,
}

/// A member as every node lists it: which node holds it, its client id there, name and room.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: u64,
    pub client: ClientId,
    pub name: String,
    pub room: String,
}

/// One entry of the channel (or a stream), as read back.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "k")]
pub enum Entry {
    /// A chat message with the id Redis gave it.
    #[serde(rename = "m")]
    Message { id: u64, m: Body },
    /// A member appeared or changed (joined, moved to another room, renamed).
    #[serde(rename = "here")]
    Here { member: Member },
    /// A member left.
    #[serde(rename = "gone")]
    Gone { node: u64, client: ClientId },
    /// A node's whole member list, after its reconnection.
    #[serde(rename = "roster")]
    Roster { node: u64, members: Vec<Member> },
    /// A node stopped (or missed its heartbeats): all its members left.
    #[serde(rename = "node_gone")]
    NodeGone { node: u64 },
    #[serde(rename = "typing")]
    Typing {
        node: u64,
        room: String,
        name: String,
        active: bool,
    },
}

/// Why an entry from Redis was skipped.
#[derive(Debug, thiserror::Error)]
pub enum BadEntry {
    #[error("not a wschat entry: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid field: {0}")]
    Field(&'static str),
}

/// Parses and checks an entry: a foreign or hand-made one must not reach a client as if a node
/// had sent it.
pub fn parse(bytes: &[u8]) -> Result<Entry, BadEntry> {
    let entry: Entry = serde_json::from_slice(bytes)?;
    match &entry {
        Entry::Message { id, m } => check_message(*id, m)?,
        Entry::Here { member } => check_member(member)?,
        Entry::Typing { room, name, .. } => {
            check(protocol::check_room(room).is_ok(), "room")?;
            check(crate::names::normalise(name).is_ok(), "name")?;
        }
        Entry::Roster { members, .. } => members.iter().try_for_each(check_member)?,
        Entry::Gone { .. } | Entry::NodeGone { .. } => {}
    }
    Ok(entry)
}

pub fn check_member(member: &Member) -> Result<(), BadEntry> {
    check(protocol::check_room(&member.room).is_ok(), "room")?;
    check(crate::names::normalise(&member.name).is_ok(), "name")
}

fn check_message(id: u64, m: &Body) -> Result<(), BadEntry> {
    check(id > 0 && id <= crate::history::MAX_ID, "id")?;
    check(protocol::check_room(&m.room).is_ok(), "room")?;
    check(protocol::check_text(&m.text).is_ok(), "text")?;
    check(crate::names::normalise(&m.from).is_ok(), "from")?;
    check(m.private == m.to.is_some(), "to")
}

fn check(ok: bool, field: &'static str) -> Result<(), BadEntry> {
    if ok {
        Ok(())
    } else {
        Err(BadEntry::Field(field))
    }
}

/// The message clients see, from an entry's id and body: every node builds the same frame.
pub fn chat_message(id: u64, m: Body) -> ChatMessage {
    ChatMessage {
        id,
        room: m.room,
        from: m.from,
        to: m.to,
        text: m.text,
        ts: m.ts,
        private: m.private,
    }
}

/// An entry as JSON text, to publish.
pub fn encode(entry: &Entry) -> String {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(entry).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body {
        Body {
            room: "lobby".into(),
            from: "ada".into(),
            to: None,
            text: "hi".into(),
            ts: 1,
            private: false,
            node: 7,
            client: 3,
        }
    }

    #[test]
    fn a_message_round_trips_and_bad_ones_are_refused() {
        let good = Entry::Message { id: 5, m: body() };
        assert_eq!(parse(encode(&good).as_bytes()).unwrap(), good);
        let bad_room = Entry::Message {
            id: 5,
            m: Body {
                room: "no room!".into(),
                ..body()
            },
        };
        assert!(parse(encode(&bad_room).as_bytes()).is_err());
        let zero = Entry::Message { id: 0, m: body() };
        assert!(parse(encode(&zero).as_bytes()).is_err());
        assert!(parse(b"{\"k\":\"m\",\"id\":1}").is_err());
        assert!(parse(b"hello").is_err());
        assert!(parse(br#"{"k":"surprise"}"#).is_err());
    }
}
