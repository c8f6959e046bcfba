//! The wire protocol: what clients may send, what the server sends back, and the rules for rooms
//! and text (docs/PROTOCOL.md is the reader's version of this file; names have their own module,
//! [`crate::names`]).
//!
//! This module owns parsing and serialising frames and the one place where an error becomes the
//! text a user reads ([`ChatError`]'s messages). It never touches sockets or server state.

use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

pub use crate::names::MAX_NAME_CHARS;
use crate::names::{self, NameError};

/// A serialised server event, shared by every recipient without copying (a reference count).
pub type Frame = Utf8Bytes;

/// Connection ids, unique for the life of the process (`client_id` in `welcome`).
pub type ClientId = u64;

/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;
/// The room a connection enters when it names none.
pub const DEFAULT_ROOM: &str = "lobby";

/// One client on its way in: where it comes from, and the room, name and resume point it asks
/// for. The handshake builds it (or, for socket.io, the CONNECT), the session holds it, and the
/// dispatcher takes it in [`Event::Connect`](crate::dispatcher::Event::Connect), unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The client's address: the peer, or `X-Forwarded-For` from a trusted proxy.
    pub ip: IpAddr,
    /// Already checked ([`check_room`]).
    pub room: String,
    /// As asked: the dispatcher checks it, and names the client `guest-N` if it cannot have it.
    pub name: Option<String>,
    /// Replay the room's messages after this id (the newest one the client saw).
    pub since: Option<u64>,
}

impl Arrival {
    /// A client from `ip` that asks for nothing: the default room, a guest name.
    pub fn new(ip: IpAddr) -> Arrival {
        Arrival {
            ip,
            room: DEFAULT_ROOM.to_owned(),
            name: None,
            since: None,
        }
    }
}

/// Everything a client can ask for, already validated for shape (not for server state).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Message { text: String, to: Option<String> },
    Nick { name: String },
    Join { room: String, since: Option<u64> },
    Typing { active: bool },
}

impl Command {
    /// Bytes this command holds while it waits for the dispatcher (counted in
    /// `Metrics::inbound_bytes` by the session that sends it and the dispatcher that takes it).
    pub fn held_bytes(&self) -> usize {
        match self {
            Command::Message { text, .. } => text.len(),
            _ => 0,
        }
    }
}

/// Every way a request can fail, with the stable `code` clients match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("{0}")]
    BadRequest(String),
    #[error("binary frames are not supported; send text frames")]
    Unsupported,
    #[error("empty messages are not sent")]
    EmptyMessage,
    #[error("text may not contain control characters other than tab and newline")]
    BadText,
    #[error("{0}")]
    BadName(#[from] NameError),
    #[error("the name {0:?} is already in use")]
    NameTaken(String),
    #[error("room names are 1-64 characters from A-Z a-z 0-9 - _ .")]
    BadRoom,
    #[error("nobody here is called {0:?}")]
    NoSuchUser(String),
    #[error("too many messages: this one was dropped, slow down")]
    RateLimited,
    #[error("too much text too fast (--rate-bytes, --rate-bytes-per-ip): this one was dropped")]
    TooManyBytes,
    #[error("this room carries all it can (--room-rate-bytes): this one was dropped, try again")]
    RoomBusy,
    #[error("the server is busy: this message was dropped, try again shortly")]
    Busy,
    #[error("the server already holds its maximum number of rooms")]
    TooManyRooms,
    #[error("the server cannot save messages right now ({0}); this one was not sent")]
    NotSaved(String),
}

impl ChatError {
    /// The stable word clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ChatError::BadRequest(_) => "bad_request",
            ChatError::Unsupported => "unsupported",
            ChatError::EmptyMessage => "empty_message",
            ChatError::BadText => "bad_text",
            ChatError::BadName(_) => "bad_name",
            ChatError::NameTaken(_) => "name_taken",
            ChatError::BadRoom => "bad_room",
            ChatError::NoSuchUser(_) => "no_such_user",
            ChatError::RateLimited | ChatError::TooManyBytes | ChatError::RoomBusy => {
                "rate_limited"
            }
            ChatError::Busy => "busy",
            ChatError::TooManyRooms => "too_many_rooms",
            ChatError::NotSaved(_) => "not_saved",
        }
    }

    /// The `error` event sent to the client.
    pub fn to_frame(&self) -> Frame {
        let message = self.to_string();
        encode(&ServerEvent::Error {
            code: self.code(),
            message: &message,
        })
    }
}

/// The JSON form of a command: one flat struct, so unknown fields are skipped cheaply and no
/// buffering of the whole object is needed to find its `type`.
#[derive(Deserialize)]
struct RawCommand {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    to: Option<String>,
    name: Option<String>,
    room: Option<String>,
    since: Option<u64>,
    active: Option<bool>,
}

/// Parses one text frame. Text that does not start with `{` is a chat message, so a plain
/// WebSocket client like `websocat` can chat.
pub fn parse_command(frame: &str) -> Result<Command, ChatError> {
    if !frame.starts_with('{') {
        return Ok(Command::Message {
            text: check_text(frame)?,
            to: None,
        });
    }
    let raw: RawCommand = serde_json::from_str(frame)
        .map_err(|e| ChatError::BadRequest(format!("invalid command: {e}")))?;
    let missing =
        |field: &str| ChatError::BadRequest(format!("\"{}\" needs \"{field}\"", raw.kind));
    match raw.kind.as_str() {
        "message" => {
            let text = raw.text.as_deref().ok_or_else(|| missing("text"))?;
            let to = raw.to.as_deref().map(names::normalise).transpose()?;
            Ok(Command::Message {
                text: check_text(text)?,
                to,
            })
        }
        "nick" => Ok(Command::Nick {
            name: check_name(raw.name.as_deref().ok_or_else(|| missing("name"))?)?,
        }),
        "join" => {
            let room = raw.room.as_deref().ok_or_else(|| missing("room"))?;
            Ok(Command::Join {
                room: check_room(room)?.to_owned(),
                since: raw.since,
            })
        }
        "typing" => Ok(Command::Typing {
            active: raw.active.ok_or_else(|| missing("active"))?,
        }),
        other => Err(ChatError::BadRequest(format!("unknown type {other:?}"))),
    }
}

/// A nickname a user asked for, normalised, or why it is refused ([`names::check`]).
pub fn check_name(name: &str) -> Result<String, ChatError> {
    Ok(names::check(name)?)
}

/// A room name: 1-64 of `A-Z a-z 0-9 - _ .`.
pub fn check_room(room: &str) -> Result<&str, ChatError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if room.is_empty() || room.len() > MAX_ROOM_CHARS || !room.chars().all(ok_char) {
        return Err(ChatError::BadRoom);
    }
    Ok(room)
}

/// Message text: not blank, and no control characters but tab, newline and carriage return.
pub fn check_text(text: &str) -> Result<String, ChatError> {
    if text.trim().is_empty() {
        return Err(ChatError::EmptyMessage);
    }
    if text
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(ChatError::BadText);
    }
    Ok(text.to_owned())
}

/// A chat message as sent, stored in history and written to the history file (one per line).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename = "message")]
pub struct ChatMessage {
    pub id: u64,
    pub room: String,
    pub from: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub to: Option<String>,
    pub text: String,
    pub ts: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub private: bool,
}

/// Every other event the server sends. `welcome` and `room` go through [`encode_entering`],
/// which splices their history in.
#[derive(Serialize, Debug)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent<'a> {
    Welcome {
        /// This connection's number (`guest-N` uses it); not a message id.
        client_id: u64,
        name: &'a str,
        #[serde(flatten)]
        room: RoomState<'a>,
    },
    Room {
        #[serde(flatten)]
        room: RoomState<'a>,
    },
    Joined {
        room: &'a str,
        name: &'a str,
        count: usize,
    },
    Left {
        room: &'a str,
        name: &'a str,
        count: usize,
    },
    Renamed {
        room: &'a str,
        from: &'a str,
        name: &'a str,
        count: usize,
    },
    /// A crowd's member count (see the dispatcher); `users` once it is small again.
    Presence {
        room: &'a str,
        count: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<Vec<&'a str>>,
    },
    Typing {
        room: &'a str,
        name: &'a str,
        active: bool,
    },
    Error {
        code: &'static str,
        message: &'a str,
    },
}

/// What a client learns on entering a room.
#[derive(Serialize, Debug)]
pub struct RoomState<'a> {
    pub room: &'a str,
    pub users: Vec<&'a str>,
    pub count: usize,
    /// The message id to resume from: pass it as `since` to get exactly what came after this
    /// frame (the newest message of `history`, or the `since` asked for when nothing is newer).
    pub last_id: u64,
    /// The fields below are written by [`encode_entering`] (which alone may serialise this),
    /// after the others and in this order. The room's recent messages, as stored (each
    /// [`encode`]'s output, a JSON object): spliced into the frame as they are.
    #[serde(skip)]
    pub history: Vec<&'a Frame>,
    /// Messages after `since` are gone for good: the client missed some.
    #[serde(skip)]
    pub truncated: bool,
    /// Older messages after `since` are kept but did not fit: the HTTP API has them.
    #[serde(skip)]
    pub more: bool,
}

/// Serialises an event once; the result is shared by all its recipients.
pub fn encode<T: Serialize>(event: &T) -> Frame {
    // Serialising these types cannot fail: no maps with non-string keys, no failing impls.
    serde_json::to_string(event).unwrap_or_default().into()
}

/// Serialises a `welcome` or `room` event, its last fields written here: `history`, the stored
/// frames joined by commas, then `truncated` and `more`. A welcome carries up to 100 stored
/// frames, and reading each again to check what [`encode`] itself wrote took a sixth of the
/// dispatcher's time under connection churn. Other events are serialised as [`encode`] does.
pub fn encode_entering(event: &ServerEvent<'_>) -> Frame {
    let (ServerEvent::Welcome { room, .. } | ServerEvent::Room { room }) = event else {
        return encode(event);
    };
    let mut json = serde_json::to_string(event).unwrap_or_default();
    // An object with fields: it ends with its closing brace, which the history goes before.
    debug_assert!(json.ends_with('}') && json.len() > 2);
    json.pop();
    json.push_str(r#","history":["#);
    for (n, frame) in room.history.iter().enumerate() {
        if n > 0 {
            json.push(',');
        }
        json.push_str(frame.as_str());
    }
    let (truncated, more) = (room.truncated, room.more);
    let _ = write!(json, r#"],"truncated":{truncated},"more":{more}}}"#); // a String: never fails
    json.into()
}

/// A stored frame as a raw JSON value, for `history` lists. Stored frames were produced by
/// [`encode`] or validated on load, so this only fails on a corrupted file line, which is skipped.
pub fn raw_json(frame: &Frame) -> Option<&RawValue> {
    serde_json::from_str(frame.as_str()).ok()
}

/// Milliseconds since the Unix epoch, for message timestamps.
/// The length of `text` as a JSON string (quotes included): what recipients read of it.
pub fn encoded_len(text: &str) -> usize {
    let escaped: usize = text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    escaped + 2
}

pub fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_and_json_messages() {
        let hello = Command::Message {
            text: "hello world".into(),
            to: None,
        };
        assert_eq!(parse_command("hello world"), Ok(hello.clone()));
        assert_eq!(
            parse_command(r#"{"type":"message","text":"hello world","x":[1]}"#),
            Ok(hello)
        );
        let private = parse_command(r#"{"type":"message","text":"hi","to":" bob "}"#);
        assert_eq!(
            private,
            Ok(Command::Message {
                text: "hi".into(),
                to: Some("bob".into())
            })
        );
    }

    #[test]
    fn bad_input_gets_the_right_code() {
        let code = |s: &str| parse_command(s).unwrap_err().code();
        assert_eq!(code("{not json"), "bad_request");
        assert_eq!(code(r#"{"type":"dance"}"#), "bad_request");
        assert_eq!(code(r#"{"type":"message"}"#), "bad_request");
        assert_eq!(code("   "), "empty_message");
        assert_eq!(code("a\u{7}b"), "bad_text");
        assert_eq!(code(r#"{"type":"nick","name":""}"#), "bad_name");
        assert_eq!(
            code(&format!(r#"{{"type":"nick","name":"{}"}}"#, "x".repeat(33))),
            "bad_name"
        );
        assert_eq!(code(r#"{"type":"join","room":"a b"}"#), "bad_room");
        assert_eq!(code(r#"{"type":"typing"}"#), "bad_request");
    }

    #[test]
    fn deep_json_is_an_error_or_ignored_never_a_crash() {
        let (open, close) = ("[".repeat(10_000), "]".repeat(10_000));
        // Deep nesting where a string is expected fails at the first bracket.
        let deep_text = format!(r#"{{"type":"message","text":{open}{close}}}"#);
        assert_eq!(parse_command(&deep_text).unwrap_err().code(), "bad_request");
        // Unknown fields are skipped without recursion, however deep.
        let deep_extra = format!(r#"{{"type":"message","text":"x","n":{open}{close}}}"#);
        assert!(parse_command(&deep_extra).is_ok());
        let unclosed = format!(r#"{{"type":"message","text":"x","n":{open}"#);
        assert_eq!(parse_command(&unclosed).unwrap_err().code(), "bad_request");
    }

    #[test]
    fn names_and_rooms() {
        assert_eq!(check_name("  Zoë  "), Ok("Zoë".into()));
        assert_eq!(check_name(&"é".repeat(32)), Ok("é".repeat(32)));
        assert!(check_name("tab\there").is_err());
        let refused = check_name("alice\u{200B}").unwrap_err();
        assert_eq!(refused.code(), "bad_name");
        assert!(refused.to_string().contains("U+200B"), "{refused}");
        assert_eq!(check_name("server").unwrap_err().code(), "bad_name");
        // A guest can still be written to: a receiver's name is normalised, not checked against
        // the reserved names.
        assert_eq!(
            parse_command(r#"{"type":"message","text":"hi","to":"ｇuest-5"}"#),
            Ok(Command::Message {
                text: "hi".into(),
                to: Some("guest-5".into())
            })
        );
        assert!(check_room("dev.team_1-a").is_ok());
        assert!(check_room(&"r".repeat(65)).is_err());
        assert!(check_room("ünïcode").is_err());
    }

    #[test]
    fn message_frames_round_trip() {
        let m = ChatMessage {
            id: 7,
            room: "lobby".into(),
            from: "a".into(),
            to: None,
            text: "t".into(),
            ts: 1,
            private: false,
        };
        let frame = encode(&m);
        assert_eq!(
            frame.as_str(),
            r#"{"type":"message","id":7,"room":"lobby","from":"a","text":"t","ts":1}"#
        );
        assert_eq!(
            serde_json::from_str::<ChatMessage>(frame.as_str()).unwrap(),
            m
        );
    }

    #[test]
    fn a_room_frame_carries_its_history_as_stored() {
        let message = |id, text: &str| ChatMessage {
            id,
            room: "lobby".into(),
            from: "a \"b\"".into(),
            to: None,
            text: text.into(),
            ts: 1,
            private: false,
        };
        let stored = [encode(&message(1, "x}")), encode(&message(2, "]y"))];
        let room = |history| RoomState {
            room: "lobby",
            users: vec!["a \"b\""],
            count: 1,
            last_id: 2,
            truncated: false,
            more: true,
            history,
        };
        let welcome = encode_entering(&ServerEvent::Welcome {
            client_id: 3,
            name: "c",
            room: room(stored.iter().collect()),
        });
        let got: serde_json::Value = serde_json::from_str(welcome.as_str()).expect("JSON");
        let expected = serde_json::json!({
            "type": "welcome", "client_id": 3, "name": "c", "room": "lobby",
            "users": ["a \"b\""], "count": 1, "last_id": 2, "truncated": false, "more": true,
            "history": [
                serde_json::to_value(message(1, "x}")).unwrap(),
                serde_json::to_value(message(2, "]y")).unwrap(),
            ],
        });
        assert_eq!(got, expected);
        let empty = encode_entering(&ServerEvent::Room { room: room(vec![]) });
        assert_eq!(
            empty.as_str(),
            r#"{"type":"room","room":"lobby","users":["a \"b\""],"count":1,"last_id":2,"history":[],"truncated":false,"more":true}"#
        );
    }
}
