//! Command line: the modes, their options and defaults, and the help text (which also says
//! which server flags a run needs). Never touches the network.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fanout,
    Latency,
    Idle,
    Churn,
    Storm,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fanout => "fanout",
            Mode::Latency => "latency",
            Mode::Idle => "idle",
            Mode::Churn => "churn",
            Mode::Storm => "storm",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub mode: Mode,
    /// The first `--url`: every sender connects here.
    pub url: String,
    /// Further `--url`s (fanout and latency): receivers are spread over all the URLs in turn,
    /// so one run can cover several nodes of one chat.
    pub more_urls: Vec<String>,
    pub raw: bool,
    /// The server speaks socket.io 4 (Engine.IO's WebSocket transport).
    pub socketio: bool,
    pub room: Option<String>,
    pub clients: usize,
    pub senders: usize,
    pub window: usize,
    pub rate: f64,
    pub duration: f64,
    pub warmup: f64,
    pub drain: f64,
    pub size: usize,
    pub connections: usize,
    pub concurrency: usize,
    pub hold: f64,
    pub per_room: usize,
    pub threads: usize,
    pub timeout: f64,
    pub connect_timeout: f64,
    pub setup_timeout: f64,
    pub server_pid: Option<u32>,
    pub messages: usize,
    pub restart_cmd: Option<String>,
    pub backoff_cap: f64,
    pub quiet: bool,
    pub allow_remote: bool,
    /// The certificate (PEM) a `wss://` server must present a chain to.
    pub ca: Option<std::path::PathBuf>,
}

/// Where the tool connects without `--url`.
const DEFAULT_URL: &str = "ws://127.0.0.1:5000/chat";
/// The same, with `--socketio`.
const SOCKETIO_URL: &str = "ws://127.0.0.1:5000/socket.io/?EIO=4&transport=websocket";

/// What a message looks like on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Envelope {
    /// The text as the frame (`--raw`).
    Bare,
    /// wschat's `{"type":"message","text":...}`.
    Json,
    /// socket.io's `42["chat message",...]` (`--socketio`).
    SocketIo,
}

impl Opts {
    pub fn envelope(&self) -> Envelope {
        match (self.raw, self.socketio) {
            (true, _) => Envelope::Bare,
            (false, true) => Envelope::SocketIo,
            (false, false) => Envelope::Json,
        }
    }

    /// The target's name in the report.
    pub fn target_name(&self) -> &'static str {
        match self.envelope() {
            Envelope::Bare => "raw",
            Envelope::Json => "wschat",
            Envelope::SocketIo => "socketio",
        }
    }
}

pub const HELP: &str = "\
wschat-load: WebSocket load generator for wschat (plain threads, blocking sockets)

USAGE:
    wschat-load <MODE> [OPTIONS]

MODES:
    fanout    --clients C connections in one room, --senders S of them also send; each sender
              keeps at most --window W of its own messages in flight (a message has landed when
              its sender gets the echo). Measures deliveries/s over --duration after --warmup.
    latency   the same room, but a fixed total --rate msgs/s spread evenly over the S senders
              (open loop: a writer thread per sender sends on schedule whatever comes back;
              messages carry their actual send time, and lateness against the schedule, the
              tool's or a blocked write's, is reported apart as send lag).
    idle      opens --connections N with --concurrency threads, holds them --hold seconds,
              reports how many succeeded, connections/s while opening, failures by kind, and
              (with --server-pid) server RSS/threads and the machine's KernelStack per connection.
    churn     --threads T loops: connect, wait for welcome, send one message, receive its echo,
              close (every 10th cycle drops the TCP socket without a close frame instead).
    storm     a server restart under load: --connections N clients (held by --concurrency
              threads that sleep in epoll until their sockets have data) in rooms of
              --per-room M; the first of each room posts --messages P; then the server restarts
              (--restart-cmd, or someone else within --hold seconds), every client reconnects
              with jittered, capped backoff and `since`; the first of each room posts P more
              as soon as it is back, and every other client waits until its room's are stored
              before it reconnects, so it needs the replay. Ok when every client is back with
              all 2P messages of its room, no gap, no duplicate, in order. Reports the time
              from the first drop until all N are back and resumed. Needs a server with
              --data-dir (ids must survive the restart).

THE SERVER'S LIMITS:
    A wschat server with its defaults protects itself from what a load test does: it allows each
    connection 10 chat messages/s (burst 30) and 64 KiB/s, a room 256 KiB/s, closes a connection
    whose messages it refuses too often (1008 \"flooding\"), and takes at most 256 connections
    (and 50 new ones a second) from one address. So:
      fanout and latency need a server without rate limits;
      idle, storm and big fanout runs (over 256 connections) need a server without the
      per-address cap (and storm one whose connection rate per address is off).
    Start the server for a load test on this machine with
        wschat --load-test        (no rate limits, no per-address caps; logged; never public)
    or lift one limit at a time: --rate R --burst B, --rate-bytes N, --room-rate-bytes N,
    --max-clients-per-ip 0, --conn-rate-per-ip 0, --max-clients N.
    A run the server refuses says so on its NOT OK line and in \"limited_by\": refused messages
    are counted as `refused`, apart from `lost`.

TARGET:
    --url URL              WebSocket URL, ws:// or wss:// [default: ws://127.0.0.1:5000/chat]
    --ca FILE              wss://: trust this certificate (PEM; the server's own if self-signed,
                           or its CA). The tool is built with TLS unless cargo's `tls` is off.
                           The tool connects to this address and no other. Non-loopback
                           addresses are refused unless --allow-remote is given.
                           fanout and latency take --url more than once (several nodes of one
                           chat, e.g. wschat --redis): the senders connect to the first URL,
                           the receivers to each URL in turn.
    --raw                  the server is a plain broadcast server: send bare text frames, expect
                           no welcome, count any frame that contains the run's token. Without
                           --raw the tool speaks wschat: sends {\"type\":\"message\",\"text\":...},
                           waits for each connection's `welcome`, and puts the run in a room.
    --socketio             the server speaks socket.io 4 over WebSocket (wschat's /socket.io/, or
                           scripts/bench-socketio-node): the tool reads Engine.IO's `open`,
                           connects to `/` (`40`, answered `40{...}`), sends
                           42[\"chat message\",text] and finds its token in whatever event comes
                           back. Default URL ws://127.0.0.1:5000/socket.io/?EIO=4&transport=websocket.
                           fanout and latency only; runs shorter than the server's ping interval
                           (the tool answers no Engine.IO ping).
    --room NAME            wschat room [default: wsload-<random token>, fresh per run]. Ignored
                           if the URL already names a room. In idle mode rooms are NAME-0, NAME-1...
    --server-pid PID       also report the server process's CPU time, RSS and threads (/proc)

FANOUT / LATENCY:
    -c, --clients C        connections in the room, senders included [default: 100]
    -s, --senders S        how many of them send [default: 1]
    -w, --window W         fanout: messages in flight per sender [default: 100]
    -r, --rate R           latency: total messages per second over all senders [default: 200]
    -d, --duration SECS    measured time [default: 10]
        --warmup SECS      sending before the measured time starts [default: 2]
        --drain SECS       after sending stops, wait for deliveries still in flight until
                           none has arrived for SECS (and at most SECS + 30) [default: 2]
        --size BYTES       message text size (minimum: the header fits) [default: 64]

IDLE:
    -n, --connections N    connections to open [default: 1000]
        --concurrency K    opening threads (idle) / simultaneous handshakes (other modes)
                           [default: 8 for idle, 32 otherwise]
        --hold SECS        how long to hold them once open [default: 10]
        --per-room M       wschat: M connections per room (0: all in one room) [default: 100]

STORM:
    -n, --connections N    clients [default: 1000]; --per-room M as in idle [default: 100]
        --concurrency K    worker threads holding the clients; K handshakes at once while
                           first connecting, every due reconnect at once after [default: 32]
        --messages P       messages each room's first client posts before the restart, and
                           again after [default: 5]
        --restart-cmd CMD  run `sh -c CMD` once every client has the first round: it must take
                           the server down and start it again (and return)
        --hold SECS        without --restart-cmd: how long to wait for the server to go down
                           [default: 10]
        --backoff-cap SECS longest wait before a reconnect attempt; the first waits up to 50 ms,
                           each next one up to twice that, each drawn at random [default: 1]
    --setup-timeout bounds each phase: opening, the first round, and the storm itself.

CHURN:
    -t, --threads T        looping threads [default: 4]
    -d, --duration SECS    measured time, after --warmup [default: 10]

LIMITS:
    --timeout SECS         hard bound for the whole run; on expiry the JSON line is printed with
                           \"ok\":false and the tool exits 3 [default: derived from the other times]
    --connect-timeout SECS TCP connect + handshake + welcome, and every blocking write [default: 10]
    --setup-timeout SECS   all connections open and registered [default: 60]
    --allow-remote         permit a non-loopback target
    -q, --quiet            no table, no progress: only the JSON line
    -h, --help

OUTPUT:
    stdout: a short human-readable table, then exactly one JSON object on the LAST line (it is
    the only stdout line that starts with '{'). Progress (once a second on runs longer than
    3 s) and warnings go to stderr.
    JSON keys include: mode, ok, error, limited_by, sent, deliveries, lost, refused, duplicated,
    order_violations, latency_us{count,p50,p90,p99,p999,max,mean}, errors, cpu{tool_s,...}.
    `lost` counts messages the server accepted (or never answered) that some member did not
    receive; `refused` the messages the server's rate limit turned away (they reach nobody).
    `limited_by` names the server limit that refused part of the run, and the flags that lift it.
    `ok` is true when every connection came up, nothing was lost, refused or duplicated, nothing
    arrived out of order and no error occurred.

EXIT STATUS:
    0 run completed and ok; 2 run completed but not ok (losses, errors...), or bad usage;
    1 setup failed (not every connection came up); 3 --timeout expired.

COST OF THE TOOL:
    fanout/latency/churn use one thread per connection (128 KiB stack) doing blocking reads.
    idle holds its sockets in --concurrency threads instead, sweeping them with non-blocking
    reads every 500 ms: that answers the server's pings (every 30 s; silent peers are dropped
    after 60 s) and drains presence events, while adding no thread, and so no kernel stack,
    per connection; KernelStack growth during idle is then the server's. storm holds its
    clients in --concurrency threads too, each asleep in epoll until some of its sockets have
    data: a burst of presence frames costs one wake-up per worker, not one per frame.
";

fn parse_mode(name: &str) -> Result<Mode, lexopt::Error> {
    match name {
        "fanout" => Ok(Mode::Fanout),
        "latency" => Ok(Mode::Latency),
        "idle" => Ok(Mode::Idle),
        "churn" => Ok(Mode::Churn),
        "storm" => Ok(Mode::Storm),
        other => {
            Err(format!("unknown mode {other:?} (fanout, latency, idle, churn, storm)").into())
        }
    }
}

impl Opts {
    pub fn parse() -> Result<Opts, String> {
        Self::parse_from(std::env::args_os().skip(1)).map_err(|e| e.to_string())
    }

    pub fn parse_from(
        args: impl IntoIterator<Item = std::ffi::OsString>,
    ) -> Result<Opts, lexopt::Error> {
        use lexopt::prelude::*;
        let mut p = lexopt::Parser::from_args(args);
        let mut mode = None;
        let mut o = Opts::defaults();
        let mut urls = Vec::new();
        fn secs(p: &mut lexopt::Parser) -> Result<f64, lexopt::Error> {
            let v: f64 = p.value()?.parse()?;
            if !(0.0..=86_400.0).contains(&v) {
                return Err("a time must be 0..=86400 seconds".into());
            }
            Ok(v)
        }
        while let Some(arg) = p.next()? {
            match arg {
                Short('h') | Long("help") => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                Long("url") => urls.push(p.value()?.string()?),
                Long("raw") => o.raw = true,
                Long("socketio") => o.socketio = true,
                Long("room") => o.room = Some(p.value()?.string()?),
                Long("server-pid") => o.server_pid = Some(p.value()?.parse()?),
                Short('c') | Long("clients") => o.clients = p.value()?.parse()?,
                Short('s') | Long("senders") => o.senders = p.value()?.parse()?,
                Short('w') | Long("window") => o.window = p.value()?.parse()?,
                Short('r') | Long("rate") => o.rate = p.value()?.parse()?,
                Short('d') | Long("duration") => o.duration = secs(&mut p)?,
                Long("warmup") => o.warmup = secs(&mut p)?,
                Long("drain") => o.drain = secs(&mut p)?,
                Long("size") => o.size = p.value()?.parse()?,
                Short('n') | Long("connections") => o.connections = p.value()?.parse()?,
                Long("concurrency") => o.concurrency = p.value()?.parse()?,
                Long("hold") => o.hold = secs(&mut p)?,
                Long("per-room") => o.per_room = p.value()?.parse()?,
                Long("messages") => o.messages = p.value()?.parse()?,
                Long("restart-cmd") => o.restart_cmd = Some(p.value()?.string()?),
                Long("backoff-cap") => o.backoff_cap = secs(&mut p)?,
                Short('t') | Long("threads") => o.threads = p.value()?.parse()?,
                Long("timeout") => o.timeout = secs(&mut p)?,
                Long("connect-timeout") => o.connect_timeout = secs(&mut p)?,
                Long("setup-timeout") => o.setup_timeout = secs(&mut p)?,
                Long("allow-remote") => o.allow_remote = true,
                Long("ca") => o.ca = Some(p.value()?.into()),
                Short('q') | Long("quiet") => o.quiet = true,
                Value(v) if mode.is_none() => mode = Some(parse_mode(&v.string()?)?),
                _ => return Err(arg.unexpected()),
            }
        }
        o.mode =
            mode.ok_or("a mode is needed: fanout, latency, idle, churn or storm (see --help)")?;
        if let Some((first, more)) = urls.split_first() {
            o.url = first.clone();
            o.more_urls = more.to_vec();
        }
        o.check()?;
        o.fill_derived();
        Ok(o)
    }

    fn defaults() -> Opts {
        Opts {
            mode: Mode::Fanout,
            url: DEFAULT_URL.into(),
            more_urls: Vec::new(),
            raw: false,
            socketio: false,
            room: None,
            clients: 100,
            senders: 1,
            window: 100,
            rate: 200.0,
            duration: 10.0,
            warmup: 2.0,
            drain: 2.0,
            size: 64,
            connections: 1000,
            concurrency: 0,
            hold: 10.0,
            per_room: 100,
            threads: 4,
            timeout: 0.0,
            connect_timeout: 10.0,
            setup_timeout: 60.0,
            server_pid: None,
            messages: 5,
            restart_cmd: None,
            backoff_cap: 1.0,
            quiet: false,
            allow_remote: false,
            ca: None,
        }
    }

    /// The bounds between options.
    fn check(&self) -> Result<(), lexopt::Error> {
        let bad = |m: &str| -> Result<(), lexopt::Error> { Err(m.to_string().into()) };
        if self.socketio && (self.raw || !matches!(self.mode, Mode::Fanout | Mode::Latency)) {
            return bad("--socketio is for fanout and latency, without --raw");
        }
        if !self.more_urls.is_empty() && !matches!(self.mode, Mode::Fanout | Mode::Latency) {
            return bad("--url more than once is for fanout and latency");
        }
        if self.clients == 0 || self.senders == 0 || self.senders > self.clients {
            return bad("need 1 <= --senders <= --clients");
        }
        if self.clients > 50_000
            || self.connections > 200_000
            || self.threads == 0
            || self.threads > 10_000
        {
            return bad("--clients <= 50000, --connections <= 200000, 1 <= --threads <= 10000");
        }
        if self.window == 0 || self.connections == 0 {
            return bad("--window and --connections must be at least 1");
        }
        if !(self.rate > 0.0 && self.rate <= 10_000_000.0) {
            return bad("--rate must be in (0, 10000000]");
        }
        if self.size > 60 * 1024 {
            return bad("--size is at most 61440");
        }
        if self.duration <= 0.0 || self.connect_timeout <= 0.0 || self.setup_timeout <= 0.0 {
            return bad("--duration, --connect-timeout and --setup-timeout must be > 0");
        }
        if self.mode == Mode::Storm && self.connections > 50_000 {
            return bad("storm: --connections <= 50000 (a local port each)");
        }
        if self.messages == 0 || self.messages > 1000 {
            return bad("--messages must be 1..=1000");
        }
        if let Some(room) = &self.room {
            let ok = !room.is_empty()
                && room.len() <= 56
                && room
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return bad("--room: 1-56 characters of A-Z a-z 0-9 - _ .");
            }
        }
        Ok(())
    }

    /// The defaults that depend on the mode and the other times.
    fn fill_derived(&mut self) {
        if self.socketio && self.url == DEFAULT_URL {
            self.url = SOCKETIO_URL.into();
        }
        if self.concurrency == 0 {
            self.concurrency = if self.mode == Mode::Idle { 8 } else { 32 };
        }
        if self.timeout == 0.0 {
            let work = match self.mode {
                Mode::Fanout | Mode::Latency => {
                    self.setup_timeout + self.warmup + self.duration + self.drain + 30.0
                }
                Mode::Churn => self.warmup + self.duration + 2.0 * self.connect_timeout,
                Mode::Idle => self.setup_timeout + self.hold,
                Mode::Storm => 3.0 * self.setup_timeout + self.hold,
            };
            self.timeout = work + 30.0;
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, lexopt::Error> {
        Opts::parse_from(args.iter().map(std::ffi::OsString::from))
    }

    #[test]
    fn parses() {
        let o = parse(&[
            "fanout",
            "--clients",
            "20",
            "-s",
            "2",
            "--raw",
            "--duration=1.5",
        ])
        .unwrap();
        assert_eq!(
            (o.mode, o.clients, o.senders, o.raw, o.duration),
            (Mode::Fanout, 20, 2, true, 1.5)
        );
        assert_eq!(o.concurrency, 32);
        assert!(o.timeout > 60.0);
        let o = parse(&["--connections", "5", "idle"]).unwrap();
        assert_eq!((o.mode, o.connections, o.concurrency), (Mode::Idle, 5, 8));
        assert!(parse(&["fanout", "--senders", "3", "--clients", "2"]).is_err());
        assert!(parse(&["bogus"]).is_err());
        assert!(parse(&[]).is_err());
        assert!(parse(&["idle", "--room", "a b"]).is_err());
    }

    #[test]
    fn several_urls_are_for_fanout_and_latency() {
        let o = parse(&["latency", "--url", "ws://a/chat", "--url", "ws://b/chat"]).unwrap();
        assert_eq!((o.url.as_str(), o.more_urls.len()), ("ws://a/chat", 1));
        assert!(o.more_urls[0] == "ws://b/chat");
        let o = parse(&["fanout", "--url", "ws://a/chat"]).unwrap();
        assert!(o.more_urls.is_empty());
        assert!(parse(&["idle", "--url", "ws://a/chat", "--url", "ws://b/chat"]).is_err());
    }
}
