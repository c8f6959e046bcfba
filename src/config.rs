//! Configuration: every tunable of the server, its default, and the command line that sets it.
//!
//! This module owns the [`Config`] struct and turns flags and environment variables into one.
//! It never opens sockets or files: [`crate::Server::start`] does that with what is here.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// When the history file is synced to disk (see the README's "Persistence" section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Sync after every batch of appended messages, before they are broadcast.
    Always,
    /// Sync at most once per [`FSYNC_INTERVAL`]; a crash can lose the last interval.
    Interval,
    /// Leave syncing to the OS; a crash of the machine can lose recent messages.
    Never,
}

/// How often `--fsync interval` syncs: bounds what a power cut can lose.
pub const FSYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Everything the server needs to run. `Config::default()` is what `wschat` with no flags uses.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the one public listener binds to.
    pub bind: IpAddr,
    /// The public port: page, API, metrics and WebSockets. 0 picks a free port.
    pub http_port: u16,
    /// Serve the page from this directory instead of the copy embedded in the binary.
    pub www_dir: Option<PathBuf>,
    /// socket.io's client script, served at `/socket.io/socket.io.js` (wschat ships none).
    pub socketio_client: Option<PathBuf>,
    /// WebSocket URL announced in `/config.json`, for reverse proxies.
    pub public_ws_url: Option<String>,
    /// Messages kept per room for `welcome` and `since` resume.
    pub history: usize,
    /// Directory of the append-only history file; `None` keeps history in memory only.
    pub data_dir: Option<PathBuf>,
    pub fsync: Fsync,
    /// History file size (bytes) above which it is compacted to the last `history` per room.
    pub compact_bytes: u64,
    /// Bearer token for `POST /api/...`; `None` disables posting.
    pub api_token: Option<String>,
    /// `--redis redis://HOST:PORT/DB`: this node is one of several sharing one chat through
    /// that Redis (see `cluster`); `None` runs alone, with nothing of Redis started.
    pub redis: Option<String>,
    /// Largest WebSocket message, frame and HTTP API body, in bytes.
    pub max_message_bytes: usize,
    /// Most WebSocket clients at once (0 = no limit).
    pub max_clients: usize,
    /// Most WebSocket clients from one address (0 = no limit).
    pub max_clients_per_ip: usize,
    /// Connections from this address may name the client in `X-Forwarded-For`.
    pub trusted_proxy: Option<IpAddr>,
    /// Chat messages per second per connection (token bucket refill rate).
    pub rate: f64,
    /// Chat messages a connection may send at once (token bucket size).
    pub burst: f64,
    /// Extra `Origin`s allowed to open a WebSocket (`*` allows any).
    pub allow_origins: Vec<String>,
    /// Most rooms (with members or history) the server holds.
    pub max_rooms: usize,
    /// Largest room with per-member presence (`joined`/`left` for everyone, full member list);
    /// a bigger room gets its member count once a second instead.
    pub presence_limit: usize,
    /// Membership changes a room hears one by one per second; past them, the rest of that
    /// second comes as one `presence` frame with the whole list (a reconnect storm).
    pub presence_burst: u32,
    /// Outgoing messages queued per client before it counts as too slow.
    pub client_queue: usize,
    /// Outgoing bytes queued per client before it counts as too slow.
    pub client_queue_bytes: usize,
    /// How often an idle connection is pinged; silence for two intervals drops it.
    pub ping_interval: Duration,
    /// Total time a client has to complete the WebSocket handshake.
    pub handshake_timeout: Duration,
    /// An HTTP connection idle (not sending, not reading) this long is dropped.
    pub http_timeout: Duration,
    /// `--load-test`: the per-connection rate limits and the per-address caps are off, so one
    /// machine's load generator is not refused. Logged loudly at start; never for a public server.
    pub load_test: bool,
    /// `--echo`: serve `/echo`, a WebSocket that sends every message back (for conformance
    /// suites such as Autobahn). Off by default: it is no use to a chat.
    pub echo: bool,
    // ----- what one address, connection or room may send (see the README's memory ceiling) -----
    /// New connections per second from one address (burst: twice that); 0 = no limit.
    pub conn_rate_per_ip: f64,
    /// Bytes per second the server reads from one connection (burst: 4 seconds' worth); past
    /// it, the server stops reading that connection until time pays the debt.
    pub rate_bytes: f64,
    /// Chat bytes per second from one address, as recipients read them (JSON-escaped); past it,
    /// messages are refused.
    pub rate_bytes_per_ip: f64,
    /// The same, per room: what every member of a room may have to read per second.
    pub room_rate_bytes: f64,
    /// Bytes waiting for all slow clients together before the one that would pass it is dropped.
    pub backlog_bytes: usize,
    /// HTTP API posts per second, per address and per token (burst: twice that).
    pub api_rate: f64,
    // ----- history bounds -----
    /// Bytes of history kept over all rooms; the oldest messages (of any room) go first.
    pub history_bytes: usize,
    /// When every room slot is taken, an empty room quiet this long gives its slot up.
    pub room_quiet: Duration,
    // ----- TLS (feature `tls`) -----
    /// PEM certificate chain: with `tls_key`, the one port speaks TLS (https, wss).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (RSA, ECDSA or Ed25519).
    pub tls_key: Option<PathBuf>,
    /// A plain-HTTP port that answers every request with a 308 to the https port.
    pub redirect_http: Option<u16>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: IpAddr::from([127, 0, 0, 1]),
            http_port: 5000,
            www_dir: None,
            socketio_client: None,
            public_ws_url: None,
            history: 100,
            data_dir: None,
            fsync: Fsync::Always,
            compact_bytes: 16 << 20,
            api_token: None,
            redis: None,
            max_message_bytes: 64 << 10,
            max_clients: 10_000,
            max_clients_per_ip: 256,
            trusted_proxy: None,
            rate: 10.0,
            burst: 30.0,
            allow_origins: Vec::new(),
            max_rooms: 1_000,
            presence_limit: 200,
            presence_burst: 16,
            client_queue: 1_024,
            client_queue_bytes: 4 << 20,
            ping_interval: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(5),
            http_timeout: Duration::from_secs(10),
            load_test: false,
            echo: false,
            conn_rate_per_ip: 50.0,
            rate_bytes: 16.0 * 1024.0,
            rate_bytes_per_ip: 128.0 * 1024.0,
            room_rate_bytes: 256.0 * 1024.0,
            backlog_bytes: 32 << 20,
            api_rate: 10.0,
            // 32 MiB: an eighth of the 256 MiB memory ceiling (see the README).
            history_bytes: 32 << 20,
            // Long enough that a room whose people stepped away keeps its history; short enough
            // that filling every slot once locks new rooms out for minutes, not for good.
            room_quiet: Duration::from_secs(10 * 60),
            tls_cert: None,
            tls_key: None,
            redirect_http: None,
        }
    }
}

/// The command line asked for help or the version instead of a server.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Config>),
    Help,
    Version,
}

/// Usage text printed by `--help`; the README's flag table mirrors it.
pub const USAGE: &str = "\
wschat: a small WebSocket chat server

USAGE: wschat [FLAGS]

  --port N               the one public port: page, API, WebSockets (env PORT; default 5000)
  --bind ADDR            address to listen on (default 127.0.0.1)
  --www DIR              serve the page from DIR instead of the embedded copy
  --socketio-client FILE serve FILE as /socket.io/socket.io.js (socket.io's client script)
  --public-ws-url URL    WebSocket URL announced in /config.json (reverse proxies)
  --history N            messages kept per room (default 100)
  --data-dir DIR         keep history in DIR/history.jsonl across restarts
  --fsync MODE           always | interval | never (default always)
  --compact-bytes N      compact the history file above N bytes (default 16777216)
  --api-token TOKEN      bearer token for POST /api (env WSCHAT_API_TOKEN)
  --redis URL            share one chat with other nodes through Redis,
                         redis://HOST:PORT/DB (env WSCHAT_REDIS); not with --data-dir
  --max-message-bytes N  largest message, frame and API body (default 65536)
  --max-clients N        most WebSocket clients, 0 = no limit (default 10000)
  --max-clients-per-ip N most clients from one address, 0 = no limit (default 256)
  --trusted-proxy ADDR   take the client address from X-Forwarded-For for this proxy
  --rate R               chat messages per second per connection (default 10)
  --burst B              chat messages at once per connection (default 30)
  --allow-origin ORIGIN  also accept this Origin (repeatable; * = any)
  --max-rooms N          most rooms held (default 1000)
  --presence-limit N     largest room that gets joined/left for every member; bigger
                         rooms get their count once a second (default 200)
  --presence-burst N     joins, leaves and renames a room hears one by one per second;
                         the rest of that second come as one list (default 16)
  --client-queue N       messages queued per client before it is dropped (default 1024)
  --client-queue-bytes N bytes queued per client before it is dropped (default 4194304)
  --ping-interval SECS   keepalive ping interval (default 30)
  --handshake-timeout SECS  total time to finish the handshake (default 5)
  --http-timeout SECS    drop an HTTP connection idle this long (default 10)
  --conn-rate-per-ip R   new connections per second per address, 0 = no limit (default 50)
  --rate-bytes N         bytes per second read from one connection (default 16384)
  --rate-bytes-per-ip N  chat bytes per second per address, escaped (default 131072)
  --room-rate-bytes N    chat bytes per second per room (default 262144)
  --backlog-bytes N      bytes waiting for all slow clients together (default 33554432)
  --api-rate R           HTTP API posts per second per address and per token (default 10)
  --history-bytes N      bytes of history kept over all rooms (default 33554432)
  --room-quiet SECS      when all rooms are taken, an empty room quiet this long
                         gives its slot to a new one (default 600)
  --load-test            for load generators on this machine: no chat rate limits (per
                         connection, address or room), no per-address caps; overrides the
                         flags of those limits; logged at start; never on a public server
  --echo                 also serve ws://.../echo, which sends every message back (text as
                         text, binary as binary) through the chat's session code, for
                         conformance suites (scripts/autobahn); off by default
  --tls-cert FILE        PEM certificate chain: the port speaks https and wss (with --tls-key);
                         SIGHUP reloads the pair
  --tls-key FILE         PEM private key of --tls-cert (RSA, ECDSA or Ed25519)
  --redirect-http PORT   also listen on PORT (plain HTTP) and answer every request with
                         a 308 to https
  -h, --help             print this help
  -V, --version          print the version

Logging: RUST_LOG=debug shows every message and the raw handshakes.
";

/// `--load-test`'s chat rate and burst per connection: high enough that no load generator on
/// one machine reaches them, finite so the token bucket's arithmetic stays ordinary.
pub const LOAD_TEST_RATE: f64 = 1e9;

/// Reads flags (and `PORT`, `WSCHAT_API_TOKEN`) into a [`Config`]. Every error names the flag
/// (or variable) and what it allows.
pub fn parse_args(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Parsed, lexopt::Error> {
    let mut cfg = Config::default();
    if let Some(port) = env("PORT") {
        cfg.http_port = parse_port("PORT", &port)?;
    }
    cfg.api_token = env("WSCHAT_API_TOKEN");
    cfg.redis = env("WSCHAT_REDIS");
    let mut parser = lexopt::Parser::from_iter(args);
    while let Some(arg) = parser.next()? {
        use lexopt::prelude::*;
        let flag = match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("ws-port") => return Err(WS_PORT_GONE.into()),
            Long("load-test") => {
                cfg.load_test = true;
                continue;
            }
            Long("echo") => {
                cfg.echo = true;
                continue;
            }
            Long(name) => format!("--{name}"),
            _ => return Err(arg.unexpected()),
        };
        apply(&mut cfg, &flag, &mut parser)?;
    }
    check(&cfg)?;
    if cfg.load_test {
        lift_for_load_test(&mut cfg);
    }
    Ok(Parsed::Run(Box::new(cfg)))
}

/// `--load-test`: every chat rate limit (per connection, address and room) and every
/// per-address cap off. The total bounds (clients, rooms, queues, memory) stay.
fn lift_for_load_test(cfg: &mut Config) {
    cfg.rate = LOAD_TEST_RATE;
    cfg.burst = LOAD_TEST_RATE;
    cfg.rate_bytes = LOAD_TEST_RATE;
    cfg.rate_bytes_per_ip = LOAD_TEST_RATE;
    cfg.room_rate_bytes = LOAD_TEST_RATE;
    cfg.conn_rate_per_ip = 0.0; // 0 = no limit
    cfg.max_clients_per_ip = 0; // 0 = no limit
}

/// Applies one flag that takes a value.
fn apply(cfg: &mut Config, flag: &str, parser: &mut lexopt::Parser) -> Result<(), lexopt::Error> {
    let mut value = || text(flag, parser.value()?);
    match flag {
        "--port" => cfg.http_port = parse_port(flag, &value()?)?,
        "--bind" => cfg.bind = parse_ip(flag, &value()?)?,
        "--www" => cfg.www_dir = Some(value()?.into()),
        "--socketio-client" => cfg.socketio_client = Some(value()?.into()),
        "--public-ws-url" => cfg.public_ws_url = Some(value()?),
        "--history" => cfg.history = parse_count(flag, &value()?)?,
        "--data-dir" => cfg.data_dir = Some(value()?.into()),
        "--fsync" => cfg.fsync = parse_fsync(&value()?)?,
        "--compact-bytes" => cfg.compact_bytes = parse_count(flag, &value()?)?,
        "--api-token" => cfg.api_token = Some(value()?),
        "--redis" => cfg.redis = Some(value()?),
        "--max-message-bytes" => cfg.max_message_bytes = parse_count(flag, &value()?)?,
        "--max-clients" => cfg.max_clients = parse_count(flag, &value()?)?,
        "--max-clients-per-ip" => cfg.max_clients_per_ip = parse_count(flag, &value()?)?,
        "--trusted-proxy" => cfg.trusted_proxy = Some(parse_ip(flag, &value()?)?),
        "--rate" => cfg.rate = parse_positive(flag, &value()?)?,
        "--burst" => cfg.burst = parse_positive(flag, &value()?)?,
        "--allow-origin" => cfg.allow_origins.push(parse_origin(&value()?)?),
        "--max-rooms" => cfg.max_rooms = parse_count(flag, &value()?)?,
        "--presence-limit" => cfg.presence_limit = parse_count(flag, &value()?)?,
        "--presence-burst" => cfg.presence_burst = parse_count(flag, &value()?)?,
        "--client-queue" => cfg.client_queue = parse_count(flag, &value()?)?,
        "--client-queue-bytes" => cfg.client_queue_bytes = parse_count(flag, &value()?)?,
        "--ping-interval" => cfg.ping_interval = parse_secs(flag, &value()?)?,
        "--handshake-timeout" => cfg.handshake_timeout = parse_secs(flag, &value()?)?,
        "--http-timeout" => cfg.http_timeout = parse_secs(flag, &value()?)?,
        "--conn-rate-per-ip" => cfg.conn_rate_per_ip = parse_rate_or_off(flag, &value()?)?,
        "--rate-bytes" => cfg.rate_bytes = parse_positive(flag, &value()?)?,
        "--rate-bytes-per-ip" => cfg.rate_bytes_per_ip = parse_positive(flag, &value()?)?,
        "--room-rate-bytes" => cfg.room_rate_bytes = parse_positive(flag, &value()?)?,
        "--backlog-bytes" => cfg.backlog_bytes = parse_count(flag, &value()?)?,
        "--api-rate" => cfg.api_rate = parse_positive(flag, &value()?)?,
        "--history-bytes" => cfg.history_bytes = parse_count(flag, &value()?)?,
        "--room-quiet" => cfg.room_quiet = parse_secs(flag, &value()?)?,
        "--tls-cert" => cfg.tls_cert = Some(value()?.into()),
        "--tls-key" => cfg.tls_key = Some(value()?.into()),
        "--redirect-http" => cfg.redirect_http = Some(parse_port(flag, &value()?)?),
        _ => return Err(lexopt::Error::UnexpectedOption(flag.to_owned())),
    }
    Ok(())
}

/// `--ws-port` is gone: one line saying what replaced it.
const WS_PORT_GONE: &str = "--ws-port was removed: WebSockets are served on --port now \
                            (ws://HOST:PORT/chat), next to the page";
/// An empty token would let anyone post.
const EMPTY_TOKEN: &str = "the API token (--api-token or WSCHAT_API_TOKEN) is empty: \
                           give a real token, or leave both unset to turn posting off";

/// History lives in Redis's streams with `--redis`: a second copy on one node's disk would
/// disagree with the others'.
const REDIS_AND_DATA_DIR: &str = "--redis and --data-dir do not go together: with --redis, \
                                  history lives in Redis (make Redis persistent instead)";

/// The bounds no single flag can check alone, and values that are dangerous rather than wrong.
fn check(cfg: &Config) -> Result<(), lexopt::Error> {
    if cfg
        .api_token
        .as_deref()
        .is_some_and(|t| t.trim().is_empty())
    {
        return Err(EMPTY_TOKEN.into());
    }
    if let Some(url) = &cfg.redis {
        if redis::parse_redis_url(url).is_none_or(|u| !matches!(u.scheme(), "redis" | "unix")) {
            return Err(format!(
                "--redis: {url:?} is not a Redis URL (redis://HOST:PORT/DB, or WSCHAT_REDIS)"
            )
            .into());
        }
        if cfg.data_dir.is_some() {
            return Err(REDIS_AND_DATA_DIR.into());
        }
    }
    if cfg.client_queue == 0 {
        return Err("--client-queue: must be at least 1".into());
    }
    if cfg.max_message_bytes < 16 {
        return Err("--max-message-bytes: must be at least 16".into());
    }
    check_tls(cfg)
}

/// TLS flags come as a pair, and only in a build that has TLS.
fn check_tls(cfg: &Config) -> Result<(), lexopt::Error> {
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(_), Some(_)) => true,
        (None, None) => false,
        _ => return Err("--tls-cert and --tls-key go together: give both, or neither".into()),
    };
    if tls && !cfg!(feature = "tls") {
        return Err("--tls-cert: this wschat was built without TLS (cargo feature `tls`)".into());
    }
    if cfg.redirect_http.is_some() && !tls {
        return Err(
            "--redirect-http: redirects to https, so it needs --tls-cert and --tls-key".into(),
        );
    }
    Ok(())
}

/// A flag's value as text, or an error naming the flag.
fn text(flag: &str, value: OsString) -> Result<String, lexopt::Error> {
    value
        .into_string()
        .map_err(|v| format!("{flag}: {v:?} is not valid UTF-8 text").into())
}

fn parse_port(flag: &str, s: &str) -> Result<u16, lexopt::Error> {
    s.trim()
        .parse()
        .map_err(|_| format!("{flag}: {s:?} is not a port number (0-65535)").into())
}

fn parse_count<T: std::str::FromStr>(flag: &str, s: &str) -> Result<T, lexopt::Error> {
    s.trim()
        .parse()
        .map_err(|_| format!("{flag}: {s:?} is not a whole number (0 or more)").into())
}

fn parse_ip(flag: &str, s: &str) -> Result<IpAddr, lexopt::Error> {
    s.trim().parse().map_err(|_| {
        format!("{flag}: {s:?} is not an IP address (like 127.0.0.1, 0.0.0.0 or ::1)").into()
    })
}

fn parse_fsync(s: &str) -> Result<Fsync, lexopt::Error> {
    match s {
        "always" => Ok(Fsync::Always),
        "interval" => Ok(Fsync::Interval),
        "never" => Ok(Fsync::Never),
        _ => Err(format!("--fsync: {s:?} is not one of always, interval, never").into()),
    }
}

fn parse_positive(flag: &str, s: &str) -> Result<f64, lexopt::Error> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{flag}: {s:?} is not a number above 0").into()),
    }
}

/// A rate where 0 turns the limit off.
fn parse_rate_or_off(flag: &str, s: &str) -> Result<f64, lexopt::Error> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{flag}: {s:?} is not a number (0 or more; 0 = no limit)").into()),
    }
}

fn parse_secs(flag: &str, s: &str) -> Result<Duration, lexopt::Error> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= MAX_SECS => Ok(Duration::from_secs_f64(v)),
        _ => {
            Err(format!("{flag}: {s:?} is not a number of seconds above 0 (at most a day)").into())
        }
    }
}

/// The longest timeout or interval a flag takes: longer is surely a typo, and `Duration`
/// overflows on absurd values.
const MAX_SECS: f64 = 86_400.0;

/// `*`, or an origin as browsers send it: `scheme://host[:port]`, no path.
fn parse_origin(s: &str) -> Result<String, lexopt::Error> {
    let trimmed = s.trim().trim_end_matches('/');
    if trimmed == "*" || is_origin(trimmed) {
        return Ok(trimmed.to_owned());
    }
    Err(format!(
        "--allow-origin: {s:?} is not an origin (scheme://host[:port], \
         like https://chat.example.org or http://192.168.1.5:5000; or * for any)"
    )
    .into())
}

fn is_origin(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let host_ok =
        !host.is_empty() && !host.contains(|c: char| c.is_whitespace() || "/?#@".contains(c));
    scheme_ok && host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], port: Option<&str>) -> Result<Parsed, lexopt::Error> {
        let args = std::iter::once("wschat")
            .chain(args.iter().copied())
            .map(OsString::from);
        parse_args(args, |k| {
            (k == "PORT").then(|| port.map(String::from)).flatten()
        })
    }

    #[test]
    fn flags_and_env_fill_the_config() {
        let Ok(Parsed::Run(cfg)) = parse(&["--fsync", "never"], Some("7000")) else {
            panic!("expected a config")
        };
        assert_eq!((cfg.http_port, cfg.fsync), (7000, Fsync::Never));
    }

    #[test]
    fn retired_and_dangerous_values_are_refused_with_one_line() {
        let err = parse(&["--ws-port", "5001"], None).unwrap_err().to_string();
        assert!(err.contains("--port"), "{err}");
        let err = parse(&["--api-token", ""], None).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        assert!(parse(&["--api-token", "  "], None).is_err());
    }

    #[test]
    fn redis_is_a_url_and_not_with_a_data_dir() {
        let url = "redis://127.0.0.1:6379/0";
        let Ok(Parsed::Run(cfg)) = parse(&["--redis", url], None) else {
            panic!("expected a config")
        };
        assert_eq!(cfg.redis.as_deref(), Some(url));
        let Ok(Parsed::Run(cfg)) = parse(&[], None) else {
            panic!("expected a config")
        };
        assert_eq!(cfg.redis, None, "nothing of Redis without the flag");
        let err = parse(&["--redis", "localhost:6379"], None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--redis: \"localhost:6379\" is not a Redis URL")
        );
        let err = parse(&["--redis", url, "--data-dir", "/tmp/x"], None).unwrap_err();
        assert!(err.to_string().contains("do not go together"), "{err}");
    }

    #[test]
    fn history_bounds_are_flags() {
        let Ok(Parsed::Run(cfg)) = parse(&["--history-bytes", "4096", "--room-quiet", "2"], None)
        else {
            panic!("expected a config")
        };
        assert_eq!(
            (cfg.history_bytes, cfg.room_quiet),
            (4096, Duration::from_secs(2))
        );
        assert!(parse(&["--room-quiet", "0"], None).is_err());
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        assert!(parse(&["--port", "seventy"], None).is_err());
        assert!(parse(&["--rate", "-1"], None).is_err());
        assert!(parse(&["--fsync", "sometimes"], None).is_err());
        assert!(parse(&[], Some("x")).is_err());
        assert!(matches!(parse(&["--help"], None), Ok(Parsed::Help)));
    }

    fn error_of(args: &[&str], port: Option<&str>) -> String {
        match parse(args, port) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{args:?} was accepted"),
        }
    }

    #[test]
    fn a_bad_port_names_its_flag_and_the_range() {
        for bad in ["abc", "70000", "-1", ""] {
            assert_eq!(
                error_of(&["--port", bad], None),
                format!("--port: {bad:?} is not a port number (0-65535)")
            );
        }
        assert_eq!(
            error_of(&[], Some("x")),
            "PORT: \"x\" is not a port number (0-65535)"
        );
    }

    #[test]
    fn every_numeric_flag_names_itself_and_what_it_allows() {
        let counts = [
            "--history",
            "--compact-bytes",
            "--max-message-bytes",
            "--max-clients",
            "--max-clients-per-ip",
            "--max-rooms",
            "--presence-limit",
            "--presence-burst",
            "--client-queue",
            "--client-queue-bytes",
            "--backlog-bytes",
            "--history-bytes",
        ];
        for flag in counts {
            let e = error_of(&[flag, "many"], None);
            assert_eq!(
                e,
                format!("{flag}: \"many\" is not a whole number (0 or more)")
            );
        }
        let positives = [
            "--rate",
            "--burst",
            "--rate-bytes",
            "--rate-bytes-per-ip",
            "--room-rate-bytes",
            "--api-rate",
        ];
        for flag in positives {
            for bad in ["0", "-1", "fast", "inf"] {
                let e = error_of(&[flag, bad], None);
                assert_eq!(e, format!("{flag}: {bad:?} is not a number above 0"));
            }
        }
        let times = [
            "--ping-interval",
            "--handshake-timeout",
            "--http-timeout",
            "--room-quiet",
        ];
        for flag in times {
            for bad in ["0", "soon", "1e12"] {
                let e = error_of(&[flag, bad], None);
                assert!(e.starts_with(&format!("{flag}: {bad:?} is not a number of seconds")));
            }
        }
        let e = error_of(&["--conn-rate-per-ip", "-1"], None);
        assert_eq!(
            e,
            "--conn-rate-per-ip: \"-1\" is not a number (0 or more; 0 = no limit)"
        );
    }

    #[test]
    fn other_bad_values_name_their_flag() {
        let cases = [
            (
                &["--bind", "localhost"][..],
                "--bind: \"localhost\" is not an IP address",
            ),
            (
                &["--trusted-proxy", "proxy"],
                "--trusted-proxy: \"proxy\" is not an IP address",
            ),
            (
                &["--fsync", "sometimes"],
                "--fsync: \"sometimes\" is not one of always",
            ),
            (
                &["--client-queue", "0"],
                "--client-queue: must be at least 1",
            ),
            (
                &["--max-message-bytes", "8"],
                "--max-message-bytes: must be at least 16",
            ),
            (&["--port"], "missing argument for option '--port'"),
            (&["--colour"], "invalid option '--colour'"),
        ];
        for (args, start) in cases {
            let e = error_of(args, None);
            assert!(e.starts_with(start), "{args:?}: {e}");
        }
    }

    #[test]
    fn allow_origin_takes_origins_and_star_only() {
        for bad in [
            "foo",
            "chat.example.org",
            "https://",
            "https://host/path",
            "http://h:99999",
        ] {
            let e = error_of(&["--allow-origin", bad], None);
            assert!(
                e.starts_with(&format!("--allow-origin: {bad:?} is not an origin")),
                "{e}"
            );
        }
        let good = [
            "*",
            "https://chat.example.org/",
            "http://192.168.1.5:5000",
            "http://[::1]:80",
        ];
        let args: Vec<&str> = good.iter().flat_map(|o| ["--allow-origin", o]).collect();
        let Ok(Parsed::Run(cfg)) = parse(&args, None) else {
            panic!("origins refused")
        };
        assert_eq!(cfg.allow_origins[1], "https://chat.example.org");
        assert_eq!(cfg.allow_origins.len(), good.len());
    }

    #[test]
    fn load_test_lifts_the_rate_limits_and_the_per_address_caps() {
        let Ok(Parsed::Run(cfg)) = parse(&["--rate", "5", "--load-test"], None) else {
            panic!("expected a config")
        };
        assert!(cfg.load_test);
        let rates = [
            cfg.rate,
            cfg.burst,
            cfg.rate_bytes,
            cfg.rate_bytes_per_ip,
            cfg.room_rate_bytes,
        ];
        assert_eq!(rates, [LOAD_TEST_RATE; 5]);
        assert_eq!((cfg.conn_rate_per_ip, cfg.max_clients_per_ip), (0.0, 0));
        let Ok(Parsed::Run(cfg)) = parse(&[], None) else {
            panic!("expected a config")
        };
        assert!(!cfg.load_test && cfg.rate < LOAD_TEST_RATE && cfg.max_clients_per_ip > 0);
    }

    #[test]
    fn echo_is_off_unless_asked_for() {
        let Ok(Parsed::Run(cfg)) = parse(&[], None) else {
            panic!("expected a config")
        };
        assert!(!cfg.echo);
        let Ok(Parsed::Run(cfg)) = parse(&["--echo"], None) else {
            panic!("expected a config")
        };
        assert!(cfg.echo);
    }
}
