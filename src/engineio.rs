//! Engine.IO protocol version 4, the transport layer under socket.io: packets, the polling
//! payload, the open packet, the request query, and the protocol's error answers.
//!
//! This module only turns bytes into packets and back. It never touches sockets, clocks or
//! sessions: [`crate::eio_session`] holds a session's state, and the front door does the I/O.
//!
//! A packet is one type digit and its data: `4hello` is the message `hello`, `2` a ping. Over
//! WebSocket each frame is one packet; over HTTP long-polling a body holds several, joined by the
//! record separator `\x1e`. Binary packets travel over polling as `b` + base64; they are decoded
//! here (so a bad one is a clear error) and refused one layer up, since wschat has no binary data.

use std::borrow::Cow;

use serde::Serialize;

use crate::protocol::Frame;

/// The only Engine.IO protocol version served (the `EIO` query parameter of socket.io 4).
pub const PROTOCOL_VERSION: &str = "4";
/// Separates the packets of a polling body.
pub const RECORD_SEPARATOR: char = '\u{1e}';
/// The ping data of the upgrade probe (`2probe`, answered `3probe`).
pub const PROBE: &str = "probe";
/// Longest `sid` accepted in a query: ours are 20 characters, so anything longer is unknown
/// without a lookup.
pub const MAX_SID_CHARS: usize = 64;

/// The two transports of Engine.IO 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP long-polling: `GET` waits for packets, `POST` sends them.
    Polling,
    /// One WebSocket, one packet per frame.
    WebSocket,
}

/// Every packet a client may send (an `open` only ever comes from the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `1`: the peer ends the session.
    Close,
    /// `2`, or `2probe` to test a new transport during the upgrade.
    Ping { probe: bool },
    /// `3`, or `3probe`.
    Pong { probe: bool },
    /// `4<text>`: a socket.io packet.
    Message(String),
    /// `b<base64>` over polling, or a binary WebSocket frame: a binary attachment.
    Binary(Vec<u8>),
    /// `5`: the client switches to the WebSocket it probed.
    Upgrade,
    /// `6`: nothing; ends a poll.
    Noop,
}

/// Every way an Engine.IO request can fail. [`EioError::code`] and [`EioError::http_status`]
/// are what the client sees; the message says why, for the log and the curious.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EioError {
    #[error("unknown transport: use transport=polling or transport=websocket")]
    UnknownTransport,
    #[error("unknown session id (it expired, was closed, or never existed)")]
    UnknownSid,
    #[error("a new session starts with a GET request")]
    BadHandshakeMethod,
    #[error("only Engine.IO protocol version 4 (EIO=4) is served")]
    UnsupportedVersion,
    #[error("bad packet: {0}")]
    BadPacket(&'static str),
    #[error("the body is over the {0}-byte limit (maxPayload)")]
    PayloadTooLarge(usize),
    #[error("a second GET while one is still waiting: the session is closed")]
    DuplicatePoll,
    #[error("this request's transport is not the session's")]
    TransportMismatch,
    #[error("the session is closed")]
    SessionClosed,
    #[error("the client reads too slowly: the session is closed")]
    TooSlow,
    #[error("the server holds its maximum number of sessions")]
    TooManySessions,
    #[error("too many sessions from this address")]
    TooManyFromAddress,
    #[error("no randomness for a session id")]
    NoRandomness,
}

impl EioError {
    /// The number the protocol defines for this error (the `code` of the JSON body): 0 unknown
    /// transport, 1 unknown session, 2 bad handshake method, 3 bad request, 5 unsupported version.
    pub fn code(&self) -> u8 {
        match self {
            EioError::UnknownTransport => 0,
            EioError::UnknownSid | EioError::SessionClosed => 1,
            EioError::BadHandshakeMethod => 2,
            EioError::UnsupportedVersion => 5,
            _ => 3,
        }
    }

    /// The HTTP status that answers a polling request failing this way.
    pub fn http_status(&self) -> u16 {
        match self {
            EioError::PayloadTooLarge(_) => 413,
            EioError::TooManySessions | EioError::TooManyFromAddress => 503,
            EioError::NoRandomness => 500,
            _ => 400,
        }
    }

    /// The JSON body of that answer: `{"code":1,"message":"..."}`.
    pub fn json_body(&self) -> String {
        let message = self.to_string();
        serde_json::json!({ "code": self.code(), "message": message }).to_string()
    }
}

impl Packet {
    /// Decodes one text packet: a type digit, then its data.
    pub fn decode(text: &str) -> Result<Packet, EioError> {
        let mut chars = text.chars();
        let kind = chars.next().ok_or(EioError::BadPacket("empty packet"))?;
        let data = chars.as_str();
        let no_data = |packet: Packet| match data {
            "" => Ok(packet),
            _ => Err(EioError::BadPacket("this packet type carries no data")),
        };
        match kind {
            '0' => Err(EioError::BadPacket("open packets come from the server")),
            '1' => no_data(Packet::Close),
            '2' => Ok(Packet::Ping {
                probe: is_probe(data)?,
            }),
            '3' => Ok(Packet::Pong {
                probe: is_probe(data)?,
            }),
            '4' => Ok(Packet::Message(data.to_owned())),
            '5' => no_data(Packet::Upgrade),
            '6' => no_data(Packet::Noop),
            'b' => decode_base64(data).map(Packet::Binary),
            _ => Err(EioError::BadPacket("unknown packet type")),
        }
    }

    /// The packet as text: what one WebSocket frame, or one part of a polling body, carries.
    pub fn encode(&self) -> String {
        let probe = |probe: bool| if probe { PROBE } else { "" };
        match self {
            Packet::Close => "1".into(),
            Packet::Ping { probe: p } => format!("2{}", probe(*p)),
            Packet::Pong { probe: p } => format!("3{}", probe(*p)),
            Packet::Message(text) => format!("4{text}"),
            Packet::Binary(bytes) => format!("b{}", data_encoding::BASE64.encode(bytes)),
            Packet::Upgrade => "5".into(),
            Packet::Noop => "6".into(),
        }
    }
}

/// Standard base64 in its one canonical form (the decoder alone would also take, say, two padded
/// blocks in a row).
fn decode_base64(data: &str) -> Result<Vec<u8>, EioError> {
    let bytes = data_encoding::BASE64.decode(data.as_bytes()).ok();
    match bytes {
        Some(bytes) if data_encoding::BASE64.encode(&bytes) == data => Ok(bytes),
        _ => Err(EioError::BadPacket("binary packet is not canonical base64")),
    }
}

/// Ping and pong data is nothing or `probe`.
fn is_probe(data: &str) -> Result<bool, EioError> {
    match data {
        "" => Ok(false),
        PROBE => Ok(true),
        _ => Err(EioError::BadPacket(
            "ping and pong data is empty or \"probe\"",
        )),
    }
}

/// A message packet (`4` + a socket.io packet) as a frame that many sessions can share.
pub fn message_frame(socketio_packet: &str) -> Frame {
    let mut text = String::with_capacity(1 + socketio_packet.len());
    text.push('4');
    text.push_str(socketio_packet);
    text.into()
}

/// Decodes a polling `POST` body: UTF-8, at most `max_payload` bytes, packets joined by `\x1e`.
pub fn decode_payload(body: &[u8], max_payload: usize) -> Result<Vec<Packet>, EioError> {
    if body.len() > max_payload {
        return Err(EioError::PayloadTooLarge(max_payload));
    }
    let text = std::str::from_utf8(body).map_err(|_| EioError::BadPacket("body is not UTF-8"))?;
    text.split(RECORD_SEPARATOR).map(Packet::decode).collect()
}

/// Joins encoded packets into one polling `GET` answer.
pub fn encode_payload<S: AsRef<str>>(packets: &[S]) -> String {
    let len = packets.iter().map(|p| p.as_ref().len() + 1).sum();
    let mut body = String::with_capacity(len);
    for (i, packet) in packets.iter().enumerate() {
        if i > 0 {
            body.push(RECORD_SEPARATOR);
        }
        body.push_str(packet.as_ref());
    }
    body
}

/// What the server tells a new session, as the `open` packet's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpenInfo {
    pub sid: String,
    /// `["websocket"]` for a polling session, `[]` for one that is already a WebSocket.
    pub upgrades: Vec<&'static str>,
    /// Milliseconds between the server's pings.
    pub ping_interval: u64,
    /// Milliseconds the server waits for the pong.
    pub ping_timeout: u64,
    /// Largest polling body the server reads, in bytes.
    pub max_payload: usize,
}

impl OpenInfo {
    /// The `open` packet: `0{"sid":...}`.
    pub fn encode(&self) -> String {
        // Serialising a struct of strings and numbers cannot fail.
        format!("0{}", serde_json::to_string(self).unwrap_or_default())
    }
}

/// The Engine.IO part of a request's query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub transport: Transport,
    /// Present on every request of a session but its first.
    pub sid: Option<String>,
}

/// Reads `EIO`, `transport` and `sid` from a query string (without the `?`). Other keys are
/// left to the layers above ([`query_param`]).
pub fn parse_query(query: &str) -> Result<Query, EioError> {
    if query_param(query, "EIO").as_deref() != Some(PROTOCOL_VERSION) {
        return Err(EioError::UnsupportedVersion);
    }
    let transport = match query_param(query, "transport").as_deref() {
        Some("polling") => Transport::Polling,
        Some("websocket") => Transport::WebSocket,
        _ => return Err(EioError::UnknownTransport),
    };
    let sid = query_param(query, "sid").map(Cow::into_owned);
    if sid
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.len() > MAX_SID_CHARS)
    {
        return Err(EioError::UnknownSid);
    }
    Ok(Query { transport, sid })
}

/// The first value of `key` in a query string, percent-decoded (`+` is a space). A value that
/// does not decode to UTF-8 counts as absent.
pub fn query_param<'q>(query: &'q str, key: &str) -> Option<Cow<'q, str>> {
    let raw = query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })?;
    if !raw.contains(['%', '+']) {
        return Some(Cow::Borrowed(raw));
    }
    let spaced = raw.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()?;
    Some(Cow::Owned(decoded.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip() {
        let packets = [
            Packet::Close,
            Packet::Ping { probe: false },
            Packet::Ping { probe: true },
            Packet::Pong { probe: false },
            Packet::Pong { probe: true },
            Packet::Message("2[\"chat message\",\"hi\"]".into()),
            Packet::Message(String::new()),
            Packet::Binary(vec![1, 2, 3, 4]),
            Packet::Upgrade,
            Packet::Noop,
        ];
        for packet in packets {
            assert_eq!(Packet::decode(&packet.encode()), Ok(packet));
        }
        assert_eq!(Packet::Ping { probe: true }.encode(), "2probe");
        assert_eq!(Packet::Binary(vec![1, 2, 3, 4]).encode(), "bAQIDBA==");
    }

    #[test]
    fn bad_packets_are_errors() {
        for bad in [
            "", "0{}", "7", "x", "1x", "2pro", "3 ", "5now", "6?", "b!!", "béh",
        ] {
            assert!(
                matches!(Packet::decode(bad), Err(EioError::BadPacket(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn payloads_split_on_the_record_separator() {
        let body = "4hello\u{1e}2\u{1e}4\u{1e}bAQ==";
        let packets = decode_payload(body.as_bytes(), 100).unwrap();
        assert_eq!(
            packets,
            [
                Packet::Message("hello".into()),
                Packet::Ping { probe: false },
                Packet::Message(String::new()),
                Packet::Binary(vec![1]),
            ]
        );
        assert_eq!(encode_payload(&["4a", "2", "6"]), "4a\u{1e}2\u{1e}6");
        assert_eq!(encode_payload::<&str>(&[]), "");
    }

    #[test]
    fn payload_limits() {
        assert_eq!(
            decode_payload(b"4hello", 5),
            Err(EioError::PayloadTooLarge(5))
        );
        assert!(decode_payload(b"4hello", 6).is_ok());
        assert!(decode_payload(b"4\xff", 6).is_err());
        // An empty body and a trailing separator hold an empty packet.
        assert!(decode_payload(b"", 6).is_err());
        assert!(decode_payload(b"4a\x1e", 6).is_err());
    }

    #[test]
    fn open_packet() {
        let open = OpenInfo {
            sid: "abc".into(),
            upgrades: vec!["websocket"],
            ping_interval: 25_000,
            ping_timeout: 20_000,
            max_payload: 65_536,
        };
        assert_eq!(
            open.encode(),
            r#"0{"sid":"abc","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}"#
        );
    }

    #[test]
    fn queries() {
        let q = parse_query("EIO=4&transport=polling&t=OxV2").unwrap();
        assert_eq!(q.transport, Transport::Polling);
        assert_eq!(q.sid, None);
        let q = parse_query("transport=websocket&sid=a%2Db&EIO=4").unwrap();
        assert_eq!(
            (q.transport, q.sid.as_deref()),
            (Transport::WebSocket, Some("a-b"))
        );
        assert_eq!(
            parse_query("EIO=3&transport=polling"),
            Err(EioError::UnsupportedVersion)
        );
        assert_eq!(
            parse_query("transport=polling"),
            Err(EioError::UnsupportedVersion)
        );
        assert_eq!(
            parse_query("EIO=4&transport=jsonp"),
            Err(EioError::UnknownTransport)
        );
        assert_eq!(parse_query("EIO=4"), Err(EioError::UnknownTransport));
        let long = format!("EIO=4&transport=polling&sid={}", "s".repeat(65));
        assert_eq!(parse_query(&long), Err(EioError::UnknownSid));
        assert_eq!(
            parse_query("EIO=4&transport=polling&sid="),
            Err(EioError::UnknownSid)
        );
        assert_eq!(
            query_param("name=Zo%C3%AB+K&x", "name").as_deref(),
            Some("Zoë K")
        );
        assert_eq!(query_param("name=%FF", "name"), None);
        assert_eq!(query_param("x&y=1", "x").as_deref(), Some(""));
    }

    #[test]
    fn errors_carry_the_protocol_codes() {
        assert_eq!(EioError::UnknownSid.code(), 1);
        assert_eq!(EioError::UnknownSid.http_status(), 400);
        assert_eq!(EioError::PayloadTooLarge(9).http_status(), 413);
        assert_eq!(EioError::TooManyFromAddress.http_status(), 503);
        let body: serde_json::Value =
            serde_json::from_str(&EioError::UnsupportedVersion.json_body()).unwrap();
        assert_eq!(body["code"], 5);
        assert!(body["message"].as_str().unwrap().contains("EIO=4"));
    }
}
