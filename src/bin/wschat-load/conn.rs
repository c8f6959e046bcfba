//! One WebSocket client connection over a blocking `TcpStream`, the wire format of the tool's
//! messages, and error classification.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};
use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::cli::Envelope;

// ---------------------------------------------------------------------------------------------
// Clock

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide epoch (a monotonic `Instant` taken at start). Every
/// timestamp the tool puts in a message, and every receive time, is on this clock.
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Waits until every thread has finished or `deadline_ns` (on the [`now_ns`] clock) has passed,
/// then joins the finished ones. Returns their results (`Err` for a thread that panicked) and how
/// many were still running; those are left detached rather than waited for.
pub fn join_finished<T>(
    handles: Vec<std::thread::JoinHandle<T>>,
    deadline_ns: u64,
) -> (Vec<std::thread::Result<T>>, usize) {
    while now_ns() < deadline_ns && handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (finished, running): (Vec<_>, Vec<_>) = handles.into_iter().partition(|h| h.is_finished());
    (
        finished.into_iter().map(|h| h.join()).collect(),
        running.len(),
    )
}

pub fn init_clock() {
    EPOCH.get_or_init(Instant::now);
}

pub fn sleep_until_ns(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

// ---------------------------------------------------------------------------------------------
// Stream wrapper

/// The stream under tungstenite: reads go straight to the socket; writes are collected in
/// `wbuf` and only hit the socket when `push` is called, or just before the next read that
/// needs the socket. A sender that writes one message per received echo therefore sends its
/// whole batch in one syscall once it has consumed everything already buffered, and never
/// blocks in `read` with unsent data.
///
/// `wlock` serialises socket writes with a writer thread that shares the socket through a
/// `try_clone` (latency mode); uncontended otherwise.
pub struct Conn {
    pub tcp: TcpStream,
    /// A `wss://` connection's TLS state (shared with the latency writer).
    #[cfg(feature = "tls")]
    tls: Option<Arc<crate::tls::TlsConn>>,
    /// Encrypted bytes read but not yet decrypted (wss).
    #[cfg(feature = "tls")]
    tls_left: Vec<u8>,
    wbuf: Vec<u8>,
    pub wlock: Arc<Mutex<()>>,
    nonblocking: bool,
}

impl Conn {
    fn new(tcp: TcpStream) -> Conn {
        Conn {
            tcp,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            tls_left: Vec::new(),
            wbuf: Vec::new(),
            wlock: Arc::new(Mutex::new(())),
            nonblocking: false,
        }
    }

    /// Writes out everything collected. On a blocking socket a write that stalls past the write
    /// timeout is an error of kind `TimedOut` ("write stalled"); on a non-blocking one the rest
    /// is kept for the next call and `WouldBlock` is returned.
    pub fn push(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let _guard = self.wlock.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            // rustls keeps what a non-blocking socket did not take, for the next call.
            let written = tls.write_all(&self.tcp, &self.wbuf);
            self.wbuf.clear();
            return self.stalled(written);
        }
        let mut off = 0;
        let res = loop {
            if off == self.wbuf.len() {
                break Ok(());
            }
            match self.tcp.write(&self.wbuf[off..]) {
                Ok(0) => {
                    break Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket wrote nothing",
                    ));
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.wbuf.drain(..off);
        self.stalled(res)
    }

    /// A blocking write that timed out is "write stalled".
    fn stalled(&self, written: io::Result<()>) -> io::Result<()> {
        match written {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !self.nonblocking => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"))
            }
            r => r,
        }
    }

    /// A second way to write this connection's socket, for a writer thread: writes through it
    /// take the same lock (and, for wss, the same TLS state) as `push`.
    pub fn writer(&self) -> io::Result<Writer> {
        Ok(Writer {
            tcp: self.tcp.try_clone()?,
            lock: self.wlock.clone(),
            #[cfg(feature = "tls")]
            tls: self.tls.clone(),
        })
    }

    pub fn set_nonblocking(&mut self) -> io::Result<()> {
        self.nonblocking = true;
        self.tcp.set_nonblocking(true)
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.wbuf.is_empty() {
            match self.push() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return tls.read(&self.tcp, &mut self.tls_left, buf);
        }
        self.tcp.read(buf)
    }
}

/// See [`Conn::writer`].
pub struct Writer {
    tcp: TcpStream,
    lock: Arc<Mutex<()>>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<crate::tls::TlsConn>>,
}

impl Writer {
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return tls.write_all(&self.tcp, bytes);
        }
        self.tcp.write_all(bytes)
    }
}

impl Write for Conn {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.wbuf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type Ws = WebSocket<Conn>;

// ---------------------------------------------------------------------------------------------
// Target

/// Where to connect: the URL exactly as given (plus a `room` query parameter in wschat mode),
/// resolved once.
#[derive(Clone)]
pub struct Target {
    /// The URL without any room added by the tool.
    pub base: String,
    pub addr: SocketAddr,
    /// Whether the URL already names a room (`/chat/<room>` or `room=` in the query).
    pub has_room: bool,
    /// A `wss://` URL's TLS client.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::TlsTarget>,
}

impl Target {
    /// `ca` is the certificate (PEM) a `wss://` server's chain must lead to.
    pub fn parse(
        url: &str,
        allow_remote: bool,
        ca: Option<&std::path::Path>,
    ) -> Result<Target, String> {
        let (rest, default_port) = match url.split_once("://") {
            Some(("ws", rest)) => (rest, 80),
            Some(("wss", rest)) => (rest, 443),
            _ => return Err(format!("{url}: only ws:// and wss:// URLs are supported")),
        };
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url}: bad host"));
        }
        let path_query = &rest[authority.len()..];
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:{default_port}")
        } else {
            authority.to_string()
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
            .collect();
        let addr = *addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .ok_or_else(|| format!("{url}: {authority} resolves to nothing"))?;
        if !allow_remote && !addr.ip().is_loopback() {
            return Err(format!(
                "{url}: {} is not a loopback address; pass --allow-remote to load a remote server",
                addr.ip()
            ));
        }
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_query, ""),
        };
        let has_room = (path.starts_with("/chat/") && path.len() > "/chat/".len())
            || query.split('&').any(|kv| kv.starts_with("room="));
        let tls = default_port == 443;
        #[cfg(not(feature = "tls"))]
        if tls || ca.is_some() {
            return Err(format!("{url}: this wschat-load was built without TLS"));
        }
        Ok(Target {
            base: url.to_string(),
            addr,
            has_room,
            #[cfg(feature = "tls")]
            tls: tls_target(tls, ca, authority)?,
        })
    }

    /// The URL with `room=<room>` added (wschat mode), or unchanged when it names a room already.
    pub fn url_for_room(&self, room: Option<&str>) -> String {
        match room {
            Some(room) if !self.has_room => {
                let base = self.base.split('#').next().unwrap_or_default();
                let sep = if base.contains('?') { '&' } else { '?' };
                format!("{base}{sep}room={room}")
            }
            _ => self.base.clone(),
        }
    }
}

/// A wss target's TLS client, trusting `--ca` for the URL's host.
#[cfg(feature = "tls")]
fn tls_target(
    tls: bool,
    ca: Option<&std::path::Path>,
    authority: &str,
) -> Result<Option<crate::tls::TlsTarget>, String> {
    match (tls, ca) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err("--ca is for wss:// URLs".into()),
        (true, None) => Err("a wss:// URL needs --ca FILE: the certificate (PEM) to trust".into()),
        (true, Some(ca)) => {
            let host = match authority.rsplit_once(':') {
                Some((host, port)) if !port.contains(']') => host,
                _ => authority,
            };
            crate::tls::TlsTarget::new(ca, host).map(Some)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting

#[derive(Clone, Copy)]
pub struct ConnOpts {
    /// Bound for the TCP connect, the handshake, and (later) every blocking write.
    pub timeout: Duration,
    /// tungstenite's read buffer (allocated eagerly per connection).
    pub read_buf: usize,
}

fn ws_config(read_buf: usize) -> WebSocketConfig {
    // Frames go straight into `Conn`'s own buffer (which batches them), so tungstenite need not
    // buffer writes too.
    WebSocketConfig::default()
        .read_buffer_size(read_buf)
        .write_buffer_size(0)
}

/// Opens a WebSocket to `url` at `addr`: TCP connect (TCP_NODELAY on), then the HTTP upgrade.
/// Returns the socket (blocking, read and write timeouts = `opts.timeout`) or an error kind.
pub fn open(url: &str, target: &Target, opts: ConnOpts) -> Result<Ws, String> {
    let tcp = TcpStream::connect_timeout(&target.addr, opts.timeout)
        .map_err(|e| format!("connect: {}", io_kind(&e)))?;
    let setup = || -> io::Result<()> {
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(opts.timeout))?;
        tcp.set_write_timeout(Some(opts.timeout))
    };
    setup().map_err(|e| format!("socket: {}", io_kind(&e)))?;
    #[allow(unused_mut)] // without TLS nothing more is set
    let mut conn = Conn::new(tcp);
    #[cfg(feature = "tls")]
    if let Some(tls) = &target.tls {
        let session = tls.connect(&conn.tcp);
        conn.tls = Some(session.map_err(|e| format!("tls: {}", io_kind(&e)))?);
    }
    match tungstenite::client::client_with_config(url, conn, Some(ws_config(opts.read_buf))) {
        Ok((ws, _response)) => Ok(ws),
        Err(HandshakeError::Interrupted(_)) => Err("handshake: timeout".into()),
        Err(HandshakeError::Failure(e)) => Err(format!("handshake: {}", ws_kind(&e))),
    }
}

/// A WebSocket being opened on a non-blocking socket: the TCP connect, then the upgrade. Each
/// step is taken by [`Opening::advance`] once the socket is ready ([`Opening::wants_write`]
/// says for what), so one thread can have thousands under way, as many independent clients
/// would. A `wss://` target is opened blocking instead ([`Opening::start`] returns it open).
pub enum Opening {
    /// The TCP connect is under way: the socket turns writable when it is done, or failed.
    Connecting {
        tcp: TcpStream,
        url: String,
        read_buf: usize,
    },
    /// The upgrade request is out; the response has not all come.
    Upgrading(Box<MidHandshake<ClientHandshake<Conn>>>),
}

/// Where an opening stands.
pub enum Opened {
    Open(Box<Ws>),
    Waiting(Opening),
}

impl Opening {
    /// Starts the TCP connect to `target` without waiting for it (`wss://`: opens it whole).
    pub fn start(url: &str, target: &Target, opts: ConnOpts) -> Result<Opened, String> {
        #[cfg(feature = "tls")]
        if target.tls.is_some() {
            return open(url, target, opts).map(|ws| Opened::Open(Box::new(ws)));
        }
        let sock = |e: io::Error| format!("socket: {}", io_kind(&e));
        let socket =
            Socket::new(Domain::for_address(target.addr), Type::STREAM, None).map_err(sock)?;
        socket.set_nonblocking(true).map_err(sock)?;
        match socket.connect(&target.addr.into()) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => {
                return Err(format!("connect: {}", io_kind(&e)));
            }
            _ => {}
        }
        Ok(Opened::Waiting(Opening::Connecting {
            tcp: socket.into(),
            url: url.to_string(),
            read_buf: opts.read_buf,
        }))
    }

    /// The socket, for a poller.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Opening::Connecting { tcp, .. } => tcp,
            Opening::Upgrading(mid) => &mid.get_ref().get_ref().tcp,
        }
    }

    /// The next step waits for the socket to be writable (the connect), else readable.
    pub fn wants_write(&self) -> bool {
        matches!(self, Opening::Connecting { .. })
    }

    /// Takes the next step, the socket being ready. The request (a few hundred bytes) goes
    /// out whole into a new socket's empty buffer; what follows only waits to read.
    pub fn advance(self) -> Result<Opened, String> {
        let stepped = match self {
            Opening::Connecting { tcp, url, read_buf } => {
                if let Some(e) = tcp
                    .take_error()
                    .map_err(|e| format!("connect: {}", io_kind(&e)))?
                {
                    return Err(format!("connect: {}", io_kind(&e)));
                }
                tcp.set_nodelay(true)
                    .map_err(|e| format!("socket: {}", io_kind(&e)))?;
                let mut conn = Conn::new(tcp);
                conn.nonblocking = true;
                tungstenite::client::client_with_config(url, conn, Some(ws_config(read_buf)))
            }
            Opening::Upgrading(mid) => (*mid).handshake(),
        };
        match stepped {
            Ok((ws, _response)) => Ok(Opened::Open(Box::new(ws))),
            Err(HandshakeError::Interrupted(mid)) => {
                Ok(Opened::Waiting(Opening::Upgrading(Box::new(mid))))
            }
            Err(HandshakeError::Failure(e)) => Err(format!("handshake: {}", ws_kind(&e))),
        }
    }
}

/// Sends a normal close frame, then reads (discarding) until the peer's close frame, EOF, an
/// error, or `deadline_ns`. Returns whether the closing handshake completed.
pub fn close(ws: &mut Ws, deadline_ns: u64) -> bool {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if ws.close(Some(frame)).is_err() || ws.get_mut().push().is_err() {
        return false;
    }
    let _ = ws
        .get_mut()
        .tcp
        .set_read_timeout(Some(Duration::from_millis(50)));
    while now_ns() < deadline_ns {
        match ws.read() {
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(WsError::ConnectionClosed) => return true,
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    false
}

/// Short, stable name of an I/O error, for tallies.
pub fn io_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(24) => return "too many open files (EMFILE)".into(),
        Some(99) => return "no local port (EADDRNOTAVAIL)".into(),
        Some(111) => return "refused".into(),
        Some(104) => return "reset".into(),
        Some(32) => return "broken pipe".into(),
        Some(110) => return "timed out".into(),
        Some(11) => return "timeout".into(),
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::TimedOut if e.to_string().contains("write stalled") => {
            "write stalled".into()
        }
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".into(),
        io::ErrorKind::UnexpectedEof => "eof".into(),
        // TLS errors (wss) come as `Other`: their text says which.
        io::ErrorKind::Other | io::ErrorKind::InvalidData => format!("{e}"),
        k => format!("{k:?}").to_lowercase(),
    }
}

/// Short, stable name of a tungstenite error, for tallies.
pub fn ws_kind(e: &WsError) -> String {
    match e {
        WsError::Io(io) => io_kind(io),
        WsError::Http(resp) => http_kind(resp.status().as_u16(), resp.body().as_deref()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "eof without close frame".into()
        }
        WsError::Protocol(p) => format!("protocol: {p}"),
        WsError::Capacity(c) => format!("capacity: {c}"),
        other => other.to_string(),
    }
}

/// Longest part of an HTTP refusal's body kept in a tally: the server's reason, not a page.
const HTTP_BODY_CHARS: usize = 120;

/// `"http 503: <the body's first line>"`: the server's own words say which limit refused us.
fn http_kind(status: u16, body: Option<&[u8]>) -> String {
    let text = body.map(String::from_utf8_lossy).unwrap_or_default();
    let reason: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .take(HTTP_BODY_CHARS)
        .collect();
    if reason.is_empty() {
        format!("http {status}")
    } else {
        format!("http {status}: {reason}")
    }
}

/// `"1008 too slow"` for a close frame received from the server.
pub fn close_kind(frame: &Option<CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("{}", u16::from(f.code)),
        Some(f) => format!("{} {}", u16::from(f.code), f.reason.as_str()),
        None => "no code".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The tool's messages

/// What the tool sends: `wsload:<token>:<sender>:<seq>:<send-ts-ns>:` padded with `x` to the
/// wanted size, and probes `wsload:<token>:P<round>:`. The token is random per run, so frames of
/// other runs or users are ignored. The text needs no JSON escaping.
#[derive(Clone)]
pub struct Wire {
    /// `wsload:<token>:`
    pub needle: String,
    /// What goes around the text.
    pub envelope: Envelope,
    pub size: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Msg {
        sender: u32,
        seq: u64,
        ts: u64,
    },
    Probe(u32),
    /// Any frame that does not hold the token.
    Other,
}

impl Wire {
    pub fn new(token: &str, envelope: Envelope, size: usize) -> Wire {
        Wire {
            needle: format!("wsload:{token}:"),
            envelope,
            size,
        }
    }

    fn wrap(&self, text: &mut String, body: impl FnOnce(&mut String)) {
        text.clear();
        match self.envelope {
            Envelope::Bare => {}
            Envelope::Json => text.push_str(r#"{"type":"message","text":""#),
            Envelope::SocketIo => text.push_str(r#"42["chat message",""#),
        }
        let start = text.len();
        text.push_str(&self.needle);
        body(text);
        while text.len() - start < self.size {
            text.push('x');
        }
        match self.envelope {
            Envelope::Bare => {}
            Envelope::Json => text.push_str(r#""}"#),
            Envelope::SocketIo => text.push_str(r#""]"#),
        }
    }

    /// The frame payload of message `seq` of `sender`, stamped `ts`.
    pub fn message(&self, sender: u32, seq: u64, ts: u64) -> String {
        let mut s = String::with_capacity(self.size + 64);
        self.wrap(&mut s, |t| {
            use std::fmt::Write;
            let _ = write!(t, "{sender}:{seq}:{ts}:");
        });
        s
    }

    pub fn probe(&self, round: u32) -> String {
        let mut s = String::with_capacity(self.needle.len() + 48);
        self.wrap(&mut s, |t| {
            use std::fmt::Write;
            let _ = write!(t, "P{round}:");
        });
        s
    }

    /// Finds the token anywhere in a received frame, whatever envelope the server put around it.
    pub fn parse(&self, frame: &str) -> Frame {
        let Some(at) = frame.find(self.needle.as_str()) else {
            return Frame::Other;
        };
        let b = &frame.as_bytes()[at + self.needle.len()..];
        if let Some(rest) = b.strip_prefix(b"P") {
            return match num(rest) {
                Some((n, _)) => Frame::Probe(n as u32),
                None => Frame::Other,
            };
        }
        let parsed = (|| {
            let (sender, b) = num(b)?;
            let (seq, b) = num(b.strip_prefix(b":")?)?;
            let (ts, b) = num(b.strip_prefix(b":")?)?;
            b.strip_prefix(b":")?;
            Some(Frame::Msg {
                sender: sender as u32,
                seq,
                ts,
            })
        })();
        parsed.unwrap_or(Frame::Other)
    }
}

fn num(b: &[u8]) -> Option<(u64, &[u8])> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let v = b[..n].iter().fold(0u64, |v, c| v * 10 + (c - b'0') as u64);
    Some((v, &b[n..]))
}

/// The `code` of a wschat `error` event (`{"type":"error","code":"rate_limited",...}`), if the
/// frame is one. Only frames that mention `error` at all are parsed.
pub fn error_code(frame: &str) -> Option<String> {
    if !frame.contains("error") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(frame).ok()?;
    if v.get("type")?.as_str()? != "error" {
        return None;
    }
    Some(
        v.get("code")
            .and_then(|c| c.as_str())
            .unwrap_or("no code")
            .to_string(),
    )
}

/// socket.io's opening over a WebSocket: Engine.IO's `open` packet, then the CONNECT to `/`
/// (`40`) and its answer (`40{"sid":...}`). Other packets before the answer are skipped.
pub fn socketio_connect(ws: &mut Ws) -> Result<(), String> {
    let mut opened = false;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) if !opened && t.as_str().starts_with('0') => {
                opened = true;
                ws.send(Message::text("40"))
                    .map_err(|e| format!("socket.io connect: {}", ws_kind(&e)))?;
            }
            Ok(Message::Text(t)) if opened && t.as_str().starts_with("40") => return Ok(()),
            Ok(Message::Text(t)) if t.as_str().starts_with("44") => {
                let s = t.as_str();
                return Err(format!(
                    "socket.io connect refused: {}",
                    &s[..s.floor_char_boundary(60)]
                ));
            }
            Ok(Message::Close(f)) => {
                return Err(format!("socket.io connect: closed {}", close_kind(&f)));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("socket.io connect: {}", ws_kind(&e))),
        }
    }
}

/// Whether a frame is wschat's `welcome` event. wschat writes `type` first, so its welcomes are
/// known by their first bytes; anything else is parsed. (A welcome carries the room's history,
/// up to 256 KiB: parsing each whole cost the tool more CPU than the server spent on it.)
pub fn is_welcome(frame: &str) -> bool {
    frame.starts_with(r#"{"type":"welcome","#)
        || serde_json::from_str::<serde_json::Value>(frame)
            .is_ok_and(|v| v.get("type").and_then(|t| t.as_str()) == Some("welcome"))
}

/// Encodes a masked client text frame (RFC 6455 §5.2) into `out`, for the writer thread that
/// shares a socket with a tungstenite reader.
pub fn encode_text_frame(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    out.push(0x81);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// A random token for this run: 12 hex digits from std's randomly keyed hasher.
pub fn run_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// Cheap xorshift64 for masking keys (they need no cryptographic quality for a load test).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip() {
        let w = Wire::new("abc123", Envelope::Json, 64);
        let m = w.message(3, 17, 123456789);
        assert!(m.starts_with(r#"{"type":"message","text":"wsload:abc123:3:17:123456789:"#));
        let text: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(text["text"].as_str().unwrap().len(), 64);
        let echoed = format!(
            r#"{{"type":"message","id":5,"room":"r","from":"guest-1","text":{},"ts":1}}"#,
            text["text"]
        );
        assert_eq!(
            w.parse(&echoed),
            Frame::Msg {
                sender: 3,
                seq: 17,
                ts: 123456789
            }
        );
        let raw = Wire::new("abc123", Envelope::Bare, 10);
        let sio = Wire::new("abc123", Envelope::SocketIo, 10);
        let sent = sio.message(2, 5, 9);
        assert!(
            sent.starts_with(r#"42["chat message","wsload:abc123:2:5:9:"#)
                && sent.ends_with(r#""]"#)
        );
        let heard = format!(r#"42["chat message",{}]"#, &sent[19..sent.len() - 1]);
        assert_eq!(
            sio.parse(&heard),
            Frame::Msg {
                sender: 2,
                seq: 5,
                ts: 9
            }
        );
        assert_eq!(raw.parse(&raw.probe(7)), Frame::Probe(7));
        assert_eq!(raw.parse("wsload:other:1:2:3:"), Frame::Other);
        assert_eq!(raw.parse("wsload:abc123:1:2:"), Frame::Other);
    }

    #[test]
    fn urls() {
        let t = Target::parse("ws://127.0.0.1:5001/chat", false, None).unwrap();
        assert!(!t.has_room);
        assert_eq!(
            t.url_for_room(Some("r1")),
            "ws://127.0.0.1:5001/chat?room=r1"
        );
        let t = Target::parse("ws://localhost:5001/chat?name=x", false, None).unwrap();
        assert_eq!(
            t.url_for_room(Some("r1")),
            "ws://localhost:5001/chat?name=x&room=r1"
        );
        assert!(
            Target::parse("ws://127.0.0.1:5001/chat/dev", false, None)
                .unwrap()
                .has_room
        );
        assert!(
            Target::parse("ws://127.0.0.1:5001/chat?room=dev", false, None)
                .unwrap()
                .has_room
        );
        assert!(Target::parse("http://127.0.0.1/", false, None).is_err());
        assert!(Target::parse("ws://10.1.2.3:80/", false, None).is_err());
    }

    #[test]
    fn errors() {
        assert_eq!(
            error_code(r#"{"type":"error","code":"rate_limited","message":"x"}"#).as_deref(),
            Some("rate_limited")
        );
        assert!(is_welcome(r#"{ "type": "welcome", "client_id": 1 }"#));
        assert!(is_welcome(r#"{"type":"welcome","client_id":1}"#));
        assert!(!is_welcome(
            r#"{"type":"message","text":"\"type\":\"welcome\""}"#
        ));
        assert_eq!(
            error_code(r#"{"type":"message","text":"\"code\":\"x\""}"#),
            None
        );
    }
}
