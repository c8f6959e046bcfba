//! Socket.IO protocol version 5 (socket.io 4.x), carried in Engine.IO messages: its packets, and
//! how socket.io events map onto wschat's commands and frames (docs/PROTOCOL.md, "socket.io").
//!
//! This module owns the socket.io text format and the mapping, nothing else: it never touches
//! sockets, sessions ([`crate::eio_session`]) or chat state, and the chat rules it applies are
//! [`crate::protocol`]'s. Only the main namespace `/` is served; binary packets are refused.
//!
//! A packet is `<type>[<namespace>,][<ack id>][<JSON>]`: `0` connects to `/`, `2["chat
//! message","hi"]` is an event, `213["nick","ada"]` an event the client wants acknowledged (id 13),
//! `0/admin,` a connect to the namespace `/admin` (refused with `4/admin,{"message":...}`).

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use crate::engineio::{self, query_param};
use crate::protocol::{self, Arrival, ChatError, Command, Frame};

/// The one namespace served.
pub const MAIN_NAMESPACE: &str = "/";
/// Longest namespace read before the packet is refused (socket.io namespaces are short paths).
const MAX_NAMESPACE_BYTES: usize = 128;
/// Digits of an acknowledgement id: the ids are counters, so a u64 is plenty.
const MAX_ACK_DIGITS: usize = 19;

/// The packet types of socket.io 5, with their digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect = 0,
    Disconnect = 1,
    Event = 2,
    Ack = 3,
    ConnectError = 4,
}

/// One socket.io packet (binary ones, types 5 and 6, are refused before they get this far).
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub kind: Kind,
    pub namespace: String,
    pub ack: Option<u64>,
    pub data: Option<Value>,
}

/// Every way a socket.io packet can fail; [`SioError::reply`] says what the client is told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SioError {
    #[error("bad socket.io packet: {0}")]
    BadPacket(&'static str),
    #[error("binary packets are not supported; send text and JSON")]
    Binary,
    #[error("only the main namespace \"/\" is served, not {0:?}")]
    Namespace(String),
    #[error("connect to the namespace \"/\" first")]
    NotConnected,
    #[error(transparent)]
    Chat(#[from] ChatError),
}

impl SioError {
    /// What to send back (a `CONNECT_ERROR` or an `error` event), already an Engine.IO message;
    /// `None` when the packet breaks the protocol and the connection is to be closed instead.
    pub fn reply(&self) -> Option<Frame> {
        let message = self.to_string();
        match self {
            SioError::BadPacket(_) => None,
            SioError::Namespace(namespace) => {
                Some(connect_error(namespace, "bad_namespace", &message))
            }
            SioError::NotConnected => Some(connect_error("/", "not_connected", &message)),
            SioError::Binary => Some(error_event(&ChatError::Unsupported)),
            SioError::Chat(e) => Some(error_event(e)),
        }
    }
}

impl Packet {
    /// Decodes one packet (the text of an Engine.IO message).
    pub fn decode(text: &str) -> Result<Packet, SioError> {
        let (kind, rest) = decode_kind(text)?;
        let (namespace, rest) = split_namespace(rest)?;
        let (ack, rest) = split_ack(rest)?;
        let data = match rest {
            "" => None,
            json => {
                Some(serde_json::from_str(json).map_err(|_| SioError::BadPacket("invalid JSON"))?)
            }
        };
        let packet = Packet {
            kind,
            namespace: namespace.to_owned(),
            ack,
            data,
        };
        packet.check_shape()?;
        Ok(packet)
    }

    /// The data each type may carry, as socket.io itself checks it.
    fn check_shape(&self) -> Result<(), SioError> {
        let event_name = |data: &Option<Value>| match data {
            Some(Value::Array(args)) => args.first().is_some_and(Value::is_string),
            _ => false,
        };
        let ok = match self.kind {
            Kind::Connect => matches!(self.data, None | Some(Value::Object(_))),
            Kind::Disconnect => self.data.is_none(),
            Kind::Event => event_name(&self.data),
            Kind::Ack => self.ack.is_some() && matches!(self.data, Some(Value::Array(_))),
            Kind::ConnectError => matches!(self.data, Some(Value::Object(_) | Value::String(_))),
        };
        if !ok {
            return Err(SioError::BadPacket("wrong data for the packet type"));
        }
        Ok(())
    }

    /// The packet as text (the namespace `/` is left out, as socket.io does).
    pub fn encode(&self) -> String {
        let mut text = (self.kind as u8).to_string();
        if self.namespace != MAIN_NAMESPACE {
            text.push_str(&self.namespace);
            text.push(',');
        }
        if let Some(id) = self.ack {
            text.push_str(&id.to_string());
        }
        if let Some(data) = &self.data {
            text.push_str(&data.to_string());
        }
        text
    }
}

fn decode_kind(text: &str) -> Result<(Kind, &str), SioError> {
    let mut chars = text.chars();
    let kind = match chars.next() {
        Some('0') => Kind::Connect,
        Some('1') => Kind::Disconnect,
        Some('2') => Kind::Event,
        Some('3') => Kind::Ack,
        Some('4') => Kind::ConnectError,
        Some('5' | '6') => return Err(SioError::Binary),
        Some(_) => return Err(SioError::BadPacket("unknown packet type")),
        None => return Err(SioError::BadPacket("empty packet")),
    };
    Ok((kind, chars.as_str()))
}

/// `/admin,rest` -> (`/admin`, `rest`); anything not starting with `/` is in the namespace `/`.
fn split_namespace(text: &str) -> Result<(&str, &str), SioError> {
    if !text.starts_with('/') {
        return Ok((MAIN_NAMESPACE, text));
    }
    let (namespace, rest) = text.split_once(',').unwrap_or((text, ""));
    if namespace.len() > MAX_NAMESPACE_BYTES {
        return Err(SioError::BadPacket("namespace too long"));
    }
    Ok((namespace, rest))
}

/// Leading digits are the acknowledgement id.
fn split_ack(text: &str) -> Result<(Option<u64>, &str), SioError> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Ok((None, text));
    }
    if digits > MAX_ACK_DIGITS {
        return Err(SioError::BadPacket("acknowledgement id too long"));
    }
    let (id, rest) = text.split_at(digits);
    let id = id
        .parse()
        .map_err(|_| SioError::BadPacket("bad acknowledgement id"))?;
    Ok((Some(id), rest))
}

/// What a client asks for at connect: from the `auth` object of its CONNECT packet, or else from
/// the query string of its Engine.IO requests (`room`, `name`, `since`, `full`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// What the dispatcher gets, as for a raw client.
    pub arrival: Arrival,
    /// Room messages carry a second argument, the whole message object (id, sender, time).
    pub full: bool,
}

/// The `auth` fields read; others are ignored.
#[derive(Deserialize)]
struct Auth {
    room: Option<String>,
    name: Option<String>,
    since: Option<u64>,
    full: Option<bool>,
}

impl ConnectOptions {
    /// From the query string of the Engine.IO requests (without `?`) of a client from `ip`.
    pub fn from_query(query: &str, ip: IpAddr) -> Result<ConnectOptions, ChatError> {
        let since = match query_param(query, "since") {
            Some(s) => Some(s.parse().map_err(|_| bad("since must be a message id"))?),
            None => None,
        };
        let mut arrival = Arrival::new(ip);
        if let Some(room) = query_param(query, "room") {
            arrival.room = checked_room(room.into_owned())?;
        }
        arrival.name = query_param(query, "name").map(|n| n.into_owned());
        arrival.since = since;
        Ok(ConnectOptions {
            arrival,
            full: matches!(query_param(query, "full").as_deref(), Some("1" | "true")),
        })
    }

    /// The CONNECT packet's `auth` object overrides the query, field by field.
    pub fn with_auth(mut self, auth: Option<&Value>) -> Result<ConnectOptions, ChatError> {
        let Some(auth) = auth else {
            return Ok(self);
        };
        let auth = Auth::deserialize(auth).map_err(|e| bad(&format!("invalid auth: {e}")))?;
        let arrival = &mut self.arrival;
        if let Some(room) = auth.room {
            arrival.room = checked_room(room)?;
        }
        arrival.name = auth.name.or(arrival.name.take());
        arrival.since = auth.since.or(arrival.since);
        self.full = auth.full.unwrap_or(self.full);
        Ok(self)
    }
}

fn checked_room(room: String) -> Result<String, ChatError> {
    protocol::check_room(&room)?;
    Ok(room)
}

fn bad(message: &str) -> ChatError {
    ChatError::BadRequest(message.to_owned())
}

/// A packet from a client, in wschat's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// CONNECT to `/`, with what its `auth` object asked for (the query is the caller's).
    Connect(Option<Value>),
    /// DISCONNECT from `/`.
    Disconnect,
    /// An event that is a chat command; answer `ack` with [`ack_frame`] once it is accepted.
    Command { command: Command, ack: Option<u64> },
    /// An ACK: the server asks for none, so there is nothing to do.
    Ack,
}

/// Decodes a client's packet and maps it onto wschat. `connected` says whether the client has
/// connected to `/`: before that, only CONNECT is accepted.
pub fn decode_incoming(text: &str, connected: bool) -> Result<Incoming, SioError> {
    let packet = Packet::decode(text)?;
    if packet.namespace != MAIN_NAMESPACE {
        return Err(SioError::Namespace(packet.namespace));
    }
    match (packet.kind, connected) {
        (Kind::Connect, false) => Ok(Incoming::Connect(packet.data)),
        (Kind::Connect, true) => Err(SioError::BadPacket("already connected")),
        (_, false) => Err(SioError::NotConnected),
        (Kind::Disconnect, true) => Ok(Incoming::Disconnect),
        (Kind::Event, true) => {
            let Some(Value::Array(args)) = packet.data else {
                return Err(SioError::BadPacket("an event is an array"));
            };
            let command = event_to_command(&args)?;
            Ok(Incoming::Command {
                command,
                ack: packet.ack,
            })
        }
        (Kind::Ack, true) => Ok(Incoming::Ack),
        (Kind::ConnectError, true) => Err(SioError::BadPacket("CONNECT_ERROR comes from servers")),
    }
}

/// The events a client may emit: `chat message` (text), `private` ({to, text}), `nick` (name),
/// `join` (room[, since]), `typing` (bool).
pub fn event_to_command(args: &[Value]) -> Result<Command, ChatError> {
    let name = args.first().and_then(Value::as_str).unwrap_or_default();
    let arg = |i: usize| args.get(i + 1);
    let usage = |what: &str| bad(&format!("{name:?} takes {what}"));
    match name {
        "chat message" => {
            let text = arg(0)
                .and_then(Value::as_str)
                .ok_or_else(|| usage("the text"))?;
            Ok(Command::Message {
                text: protocol::check_text(text)?,
                to: None,
            })
        }
        "private" => private_command(arg(0)).ok_or_else(|| usage("{\"to\":name,\"text\":text}"))?,
        "nick" => {
            let name = arg(0)
                .and_then(Value::as_str)
                .ok_or_else(|| usage("the name"))?;
            Ok(Command::Nick {
                name: protocol::check_name(name)?,
            })
        }
        "join" => {
            let room = arg(0)
                .and_then(Value::as_str)
                .ok_or_else(|| usage("the room"))?;
            let since = match arg(1) {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| usage("a message id as `since`"))?),
            };
            Ok(Command::Join {
                room: protocol::check_room(room)?.to_owned(),
                since,
            })
        }
        "typing" => {
            let active = arg(0)
                .and_then(Value::as_bool)
                .ok_or_else(|| usage("true or false"))?;
            Ok(Command::Typing { active })
        }
        other => Err(bad(&format!("unknown event {other:?}"))),
    }
}

/// `private` with `{"to": name, "text": text}`; `None` if the shape is wrong.
fn private_command(arg: Option<&Value>) -> Option<Result<Command, ChatError>> {
    let to = arg?.get("to")?.as_str()?;
    let text = arg?.get("text")?.as_str()?;
    Some(private_message(to, text))
}

fn private_message(to: &str, text: &str) -> Result<Command, ChatError> {
    Ok(Command::Message {
        text: protocol::check_text(text)?,
        to: Some(protocol::check_name(to)?),
    })
}

/// `40{"sid":"..."}`: the answer to a CONNECT.
pub fn connect_frame(socket_id: &str) -> Frame {
    let data = serde_json::json!({ "sid": socket_id });
    engineio::message_frame(&format!("0{data}"))
}

/// `44{"message":"...","data":{"code":"bad_room"}}`: a CONNECT refused for what it asked (see
/// [`ConnectOptions`]).
pub fn connect_refused(error: &ChatError) -> Frame {
    connect_error(MAIN_NAMESPACE, error.code(), &error.to_string())
}

fn connect_error(namespace: &str, code: &str, message: &str) -> Frame {
    let packet = Packet {
        kind: Kind::ConnectError,
        namespace: namespace.to_owned(),
        ack: None,
        data: Some(serde_json::json!({ "message": message, "data": { "code": code } })),
    };
    engineio::message_frame(&packet.encode())
}

/// `43<id>[]`: the acknowledgement of an accepted event (it carries nothing; a refusal comes as
/// an `error` event).
pub fn ack_frame(id: u64) -> Frame {
    engineio::message_frame(&format!("3{id}[]"))
}

/// `42["error",{...}]`: a wschat `error` frame as an event.
pub fn error_event(error: &ChatError) -> Frame {
    event_frame("error", &[error.to_frame().as_str()])
}

/// `42["<name>",<arg>,...]`, the arguments spliced in as they are (each must be JSON).
pub fn event_frame(name: &str, json_args: &[&str]) -> Frame {
    let name = Value::from(name).to_string();
    let len = name.len() + json_args.iter().map(|a| a.len() + 1).sum::<usize>() + 4;
    let mut text = String::with_capacity(len);
    text.push_str("2[");
    text.push_str(&name);
    for arg in json_args {
        text.push(',');
        text.push_str(arg);
    }
    text.push(']');
    engineio::message_frame(&text)
}

/// The fields of a server frame that decide its event.
#[derive(Deserialize)]
struct FrameHead {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    private: bool,
    text: Option<String>,
}

/// A wschat server frame (one JSON object, as raw clients get it) as the socket.io event that
/// carries it, ready for every socket.io client of the same `full` choice:
///
/// * a room `message` -> `chat message` with its text (and, when `full`, the object);
/// * a private `message` -> `private` with the object;
/// * any other frame -> the event named by its `type`, with the object
///   (`welcome`, `room`, `joined`, `left`, `renamed`, `presence`, `typing`, `error`).
///
/// `None` if the frame is not such an object (it never is: the server wrote it).
pub fn from_server_frame(frame: &str, full: bool) -> Option<Frame> {
    let head: FrameHead = serde_json::from_str(frame).ok()?;
    match (head.kind.as_str(), head.private, head.text) {
        ("message", false, Some(text)) => {
            let text = Value::from(text).to_string();
            let args: &[&str] = if full { &[&text, frame] } else { &[&text] };
            Some(event_frame("chat message", args))
        }
        ("message", true, _) => Some(event_frame("private", &[frame])),
        (kind, _, _) => Some(event_frame(kind, &[frame])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn packet(kind: Kind, namespace: &str, ack: Option<u64>, data: Option<Value>) -> Packet {
        Packet {
            kind,
            namespace: namespace.into(),
            ack,
            data,
        }
    }

    #[test]
    fn packets_decode_and_encode() {
        let cases = [
            ("0", packet(Kind::Connect, "/", None, None)),
            (
                "0{\"name\":\"ada\"}",
                packet(Kind::Connect, "/", None, Some(json!({"name":"ada"}))),
            ),
            ("0/admin,", packet(Kind::Connect, "/admin", None, None)),
            ("1", packet(Kind::Disconnect, "/", None, None)),
            (
                "2[\"chat message\",\"hi\"]",
                packet(Kind::Event, "/", None, Some(json!(["chat message", "hi"]))),
            ),
            (
                "213[\"nick\",\"ada\"]",
                packet(Kind::Event, "/", Some(13), Some(json!(["nick", "ada"]))),
            ),
            (
                "2/admin,7[\"x\"]",
                packet(Kind::Event, "/admin", Some(7), Some(json!(["x"]))),
            ),
            ("31[]", packet(Kind::Ack, "/", Some(1), Some(json!([])))),
            (
                "4{\"message\":\"no\"}",
                packet(Kind::ConnectError, "/", None, Some(json!({"message":"no"}))),
            ),
        ];
        for (text, expected) in cases {
            let decoded = Packet::decode(text).unwrap();
            assert_eq!(decoded, expected, "{text}");
            assert_eq!(decoded.encode(), text);
        }
        // A namespace without a comma, and `/` spelled out.
        assert_eq!(Packet::decode("0/admin").unwrap().namespace, "/admin");
        assert_eq!(Packet::decode("0/,").unwrap().encode(), "0");
    }

    #[test]
    fn bad_packets() {
        let bad = [
            "",
            "7",
            "x",
            "0[]",
            "0\"auth\"",
            "1{}",
            "2",
            "2[]",
            "2[1]",
            "2{}",
            "2[\"a\"",
            "3[]",
            "31{}",
            "4[]",
            "299999999999999999999[\"a\"]",
        ];
        for text in bad {
            assert!(
                matches!(Packet::decode(text), Err(SioError::BadPacket(_))),
                "{text:?}"
            );
        }
        assert_eq!(
            Packet::decode("51-[\"a\",{\"_placeholder\":true,\"num\":0}]"),
            Err(SioError::Binary)
        );
        assert_eq!(Packet::decode("61-0[]"), Err(SioError::Binary));
        let long = format!("0/{},", "n".repeat(200));
        assert!(matches!(Packet::decode(&long), Err(SioError::BadPacket(_))));
    }

    #[test]
    fn deep_json_is_an_error_not_a_crash() {
        let deep = format!(
            "2[\"chat message\",{}{}]",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(Packet::decode(&deep), Err(SioError::BadPacket(_))));
    }

    #[test]
    fn events_become_commands() {
        let command = |text: &str| match decode_incoming(text, true) {
            Ok(Incoming::Command { command, ack }) => (command, ack),
            other => panic!("{text}: {other:?}"),
        };
        let message = |text: &str, to: Option<&str>| Command::Message {
            text: text.into(),
            to: to.map(Into::into),
        };
        assert_eq!(
            command("2[\"chat message\",\"hello world\"]"),
            (message("hello world", None), None)
        );
        assert_eq!(
            command("25[\"private\",{\"to\":\" bob \",\"text\":\"psst\"}]"),
            (message("psst", Some("bob")), Some(5))
        );
        assert_eq!(
            command("2[\"nick\",\"ada\"]").0,
            Command::Nick { name: "ada".into() }
        );
        assert_eq!(
            command("2[\"join\",\"dev\",41]").0,
            Command::Join {
                room: "dev".into(),
                since: Some(41)
            }
        );
        assert_eq!(
            command("2[\"join\",\"dev\"]").0,
            Command::Join {
                room: "dev".into(),
                since: None
            }
        );
        assert_eq!(
            command("2[\"typing\",true]").0,
            Command::Typing { active: true }
        );
    }

    #[test]
    fn bad_events_get_the_chat_error_codes() {
        let code = |text: &str| match decode_incoming(text, true) {
            Err(SioError::Chat(e)) => e.code(),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(code("2[\"chat message\",\"  \"]"), "empty_message");
        assert_eq!(code("2[\"chat message\",\"a\\u0007\"]"), "bad_text");
        assert_eq!(code("2[\"chat message\",42]"), "bad_request");
        assert_eq!(code("2[\"chat message\"]"), "bad_request");
        assert_eq!(code("2[\"nick\",\"\"]"), "bad_name");
        assert_eq!(code("2[\"join\",\"a b\"]"), "bad_room");
        assert_eq!(code("2[\"join\",\"dev\",-1]"), "bad_request");
        assert_eq!(code("2[\"typing\",\"yes\"]"), "bad_request");
        assert_eq!(code("2[\"private\",\"bob\",\"hi\"]"), "bad_request");
        assert_eq!(
            code("2[\"private\",{\"to\":\"\",\"text\":\"hi\"}]"),
            "bad_name"
        );
        assert_eq!(code("2[\"dance\"]"), "bad_request");
    }

    #[test]
    fn connect_rules() {
        assert_eq!(decode_incoming("0", false), Ok(Incoming::Connect(None)));
        assert_eq!(
            decode_incoming("0{\"room\":\"dev\"}", false),
            Ok(Incoming::Connect(Some(json!({"room":"dev"}))))
        );
        assert!(matches!(
            decode_incoming("0", true),
            Err(SioError::BadPacket(_))
        ));
        assert_eq!(
            decode_incoming("2[\"chat message\",\"x\"]", false),
            Err(SioError::NotConnected)
        );
        assert_eq!(
            decode_incoming("0/admin,", false),
            Err(SioError::Namespace("/admin".into()))
        );
        assert_eq!(decode_incoming("1", true), Ok(Incoming::Disconnect));
        assert_eq!(decode_incoming("31[]", true), Ok(Incoming::Ack));
    }

    #[test]
    fn errors_answer_with_connect_error_or_an_error_event() {
        let namespace = SioError::Namespace("/admin".into()).reply().unwrap();
        assert!(namespace.as_str().starts_with("44/admin,{"), "{namespace}");
        assert!(namespace.as_str().contains("\"code\":\"bad_namespace\""));
        let room = connect_refused(&ChatError::BadRoom);
        assert!(room.as_str().starts_with("44{"), "{room}");
        assert!(room.as_str().contains("\"code\":\"bad_room\""));
        let later = SioError::Chat(ChatError::BadRoom).reply().unwrap();
        assert!(
            later
                .as_str()
                .starts_with("42[\"error\",{\"type\":\"error\",\"code\":\"bad_room\"")
        );
        let binary = SioError::Binary.reply().unwrap();
        assert!(binary.as_str().contains("\"code\":\"unsupported\""));
        let early = SioError::NotConnected.reply().unwrap();
        assert!(early.as_str().contains("\"code\":\"not_connected\""));
        assert_eq!(SioError::BadPacket("x").reply(), None);
    }

    #[test]
    fn connect_options_from_query_and_auth() {
        let ip: IpAddr = [192, 0, 2, 1].into();
        let from_query = |query| ConnectOptions::from_query(query, ip);
        let q = from_query("EIO=4&transport=polling&room=dev&name=Zo%C3%AB&since=41&full=1");
        let arrival = Arrival {
            ip,
            room: "dev".into(),
            name: Some("Zoë".into()),
            since: Some(41),
        };
        let q = q.unwrap();
        assert_eq!(
            q,
            ConnectOptions {
                arrival,
                full: true
            }
        );
        let plain = ConnectOptions {
            arrival: Arrival::new(ip),
            full: false,
        };
        assert_eq!(from_query("EIO=4").unwrap(), plain);
        assert_eq!(from_query("since=x").unwrap_err().code(), "bad_request");
        assert_eq!(from_query("room=a%20b").unwrap_err().code(), "bad_room");
        // auth wins over the query, field by field; unknown fields are ignored.
        let auth = json!({"room":"ops","since":7,"token":"t","full":false});
        let merged = q.clone().with_auth(Some(&auth)).unwrap();
        let arrival = Arrival {
            room: "ops".into(),
            since: Some(7),
            ..q.arrival.clone()
        };
        assert_eq!(
            merged,
            ConnectOptions {
                arrival,
                full: false
            }
        );
        assert_eq!(q.clone().with_auth(None).unwrap(), q);
        let wrong = json!({"room":5});
        assert_eq!(
            q.clone().with_auth(Some(&wrong)).unwrap_err().code(),
            "bad_request"
        );
        let bad_room = json!({"room":"a/b"});
        assert_eq!(q.with_auth(Some(&bad_room)).unwrap_err().code(), "bad_room");
    }

    #[test]
    fn server_frames_become_events() {
        let message =
            r#"{"type":"message","id":7,"room":"lobby","from":"ada","text":"hi \"you\"","ts":1}"#;
        assert_eq!(
            from_server_frame(message, false).unwrap().as_str(),
            r#"42["chat message","hi \"you\""]"#
        );
        assert_eq!(
            from_server_frame(message, true).unwrap().as_str(),
            format!(r#"42["chat message","hi \"you\"",{message}]"#)
        );
        let private = r#"{"type":"message","id":8,"room":"lobby","from":"ada","to":"bob","text":"psst","ts":1,"private":true}"#;
        assert_eq!(
            from_server_frame(private, false).unwrap().as_str(),
            format!(r#"42["private",{private}]"#)
        );
        let joined = r#"{"type":"joined","room":"lobby","name":"bob","count":2}"#;
        assert_eq!(
            from_server_frame(joined, false).unwrap().as_str(),
            format!(r#"42["joined",{joined}]"#)
        );
        assert_eq!(from_server_frame("not json", false), None);
    }

    #[test]
    fn small_frames() {
        assert_eq!(connect_frame("abc").as_str(), r#"40{"sid":"abc"}"#);
        assert_eq!(ack_frame(12).as_str(), "4312[]");
        assert_eq!(
            event_frame("chat message", &["\"hello world\""]).as_str(),
            r#"42["chat message","hello world"]"#
        );
    }

    /// The tutorial's exchange over long-polling, through both layers, as the front door will
    /// run it: open, connect with `auth`, emit `chat message`, and get it back in one poll.
    #[test]
    fn a_tutorial_conversation_through_both_layers() {
        use crate::eio_session::{Inbound, Limits, Session};
        use crate::engineio::Transport;
        use std::time::{Duration, Instant};

        let limits = Limits {
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload: 1000,
            max_queue_bytes: 10_000,
        };
        let (mut session, open) =
            Session::open("e1".into(), Transport::Polling, limits, Instant::now());
        assert!(open.starts_with(r#"0{"sid":"e1","upgrades":["websocket"]"#));
        let message = |inbound: Vec<Inbound>| match inbound.as_slice() {
            [Inbound::Message(text)] => text.clone(),
            other => panic!("{other:?}"),
        };

        let connect = message(session.receive_payload(br#"40{"name":"ada"}"#).unwrap());
        let Ok(Incoming::Connect(auth)) = decode_incoming(&connect, false) else {
            panic!("{connect}");
        };
        let ip = [192, 0, 2, 1].into();
        let options = ConnectOptions::from_query("EIO=4&transport=polling&room=dev", ip)
            .and_then(|o| o.with_auth(auth.as_ref()))
            .unwrap();
        let arrival = options.arrival;
        assert_eq!(
            (arrival.room.as_str(), arrival.name.as_deref()),
            ("dev", Some("ada"))
        );
        session.send(connect_frame("s1")).unwrap();

        let event = message(
            session
                .receive_payload(br#"42["chat message","hello world"]"#)
                .unwrap(),
        );
        let Ok(Incoming::Command { command, ack: None }) = decode_incoming(&event, true) else {
            panic!("{event}");
        };
        assert_eq!(
            command,
            Command::Message {
                text: "hello world".into(),
                to: None
            }
        );

        // What the dispatcher broadcasts comes back as the tutorial's event.
        let frame =
            r#"{"type":"message","id":1,"room":"dev","from":"ada","text":"hello world","ts":1}"#;
        session
            .send(from_server_frame(frame, false).unwrap())
            .unwrap();
        assert_eq!(
            session.begin_poll().unwrap().as_deref(),
            Some("40{\"sid\":\"s1\"}\u{1e}42[\"chat message\",\"hello world\"]")
        );
    }
}
