//! `storm`: a server restart with every client connected, and what the clients see of it.
//!
//! Each of --connections N clients has a thread of its own (blocking reads, like a real client)
//! and a room (--per-room M to a room). Once all are in, the first client of each room posts
//! --messages P through its WebSocket, and everyone waits until every client has them all. Then
//! the server goes down (the tool runs --restart-cmd, or waits --hold seconds for someone else to
//! restart it): every client notices its connection drop and reconnects with jittered, capped
//! exponential backoff and `since=<newest id it got>`, as the page does. The first client of each
//! room (which retries every few milliseconds, to be back among the first) posts P more as soon
//! as it is back. Every other client (odd-numbered) holds its reconnect until the server has every
//! room's second round, so that it gets it in the replay of `since`; the rest race the posting and
//! get it live or replayed. The run is ok when every client came back and got all 2P of its room
//! exactly once and in order: no gap across the restart, no duplicate between the replay and
//! live delivery. It reports how long the storm took: from the first drop to the last client back
//! and resumed.
//!
//! This mode needs a server whose message ids survive the restart (`--data-dir`): without it the
//! new server numbers from 1 again, and a client's `since` may pass over new messages (which the
//! run reports as lost).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::error::Error as WsError;

use crate::cli::Opts;
use crate::conn::{self, ConnOpts, Target, Ws, XorShift, now_ns};
use crate::room::CONN_STACK;
use crate::stats::{Hist, Seen, SeqTrack, Tally, fmt_ns, group};
use crate::{Outcome, limits};

const SEC: u64 = 1_000_000_000;
/// Phases, in order; the clients follow them.
const OPEN: u32 = 0;
const POST: u32 = 1;
const RESTART: u32 = 2;
const CLOSE: u32 = 3;
/// First reconnect delay bound; it doubles with each failed attempt up to --backoff-cap, and
/// each wait is drawn uniformly below the bound (full jitter).
const BACKOFF_BASE_NS: u64 = 50_000_000;
/// The room's poster retries within this, without growing: it is back among the first, so
/// that it can post the second round while the rest of the room is still away.
const POSTER_RETRY_NS: u64 = 10_000_000;
/// How long a client's blocking read waits before it looks at the phase again: short for the
/// room's poster (it must post when the phase turns), long for the others, which only need to
/// notice the end of the run (10,000 threads waking often would be load of their own).
const POSTER_POLL: Duration = Duration::from_millis(20);
const MEMBER_POLL: Duration = Duration::from_secs(2);

struct Shared {
    o: Opts,
    target: Target,
    room: String,
    /// `wsload:<token>:`: the tool's messages start with it; `<room>:<seq>` follows.
    needle: String,
    phase: AtomicU32,
    opened: AtomicUsize,
    open_failed: AtomicUsize,
    /// Clients that have all P messages of the first round.
    have_before: AtomicUsize,
    dropped: AtomicUsize,
    resumed: AtomicUsize,
    /// Clients that have all 2P messages.
    complete: AtomicUsize,
    /// Rooms whose second round the server has (its poster got its own messages back); the
    /// clients that wait for it sleep on `stored` (thousands of threads must not poll).
    posted_after: Mutex<usize>,
    stored: Condvar,
    first_drop_ns: AtomicU64,
    first_back_ns: AtomicU64,
    last_back_ns: AtomicU64,
    complete_ns: AtomicU64,
}

impl Shared {
    fn messages(&self) -> u64 {
        self.o.messages as u64
    }

    /// Clients per room (--per-room 0: all in one).
    fn room_size(&self) -> usize {
        match self.o.per_room {
            0 => self.o.connections,
            m => m,
        }
    }

    fn rooms(&self) -> usize {
        self.o.connections.div_ceil(self.room_size())
    }

    fn room_of(&self, j: usize) -> usize {
        j / self.room_size()
    }

    fn url(&self, j: usize, since: Option<u64>) -> String {
        let room = format!("{}-{}", self.room, self.room_of(j));
        let url = self.target.url_for_room(Some(&room));
        match since {
            Some(id) if url.contains('?') => format!("{url}&since={id}"),
            Some(id) => format!("{url}?since={id}"),
            None => url,
        }
    }

    fn posted_after(&self) -> MutexGuard<'_, usize> {
        // A counter: a panic elsewhere cannot leave it half-updated.
        self.posted_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn text(&self, room: usize, seq: u64) -> String {
        let text = format!("{}{room}:{seq}", self.needle);
        json!({"type": "message", "text": text}).to_string()
    }
}

/// What one client saw.
#[derive(Default)]
struct Stats {
    failures: Tally,
    reconnects: Hist,
    attempts: u64,
    retried: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    truncated: u64,
    foreign: u64,
    errors: Tally,
}

impl Stats {
    fn merge(&mut self, s: &Stats) {
        self.failures.merge(&s.failures);
        self.reconnects.merge(&s.reconnects);
        self.attempts += s.attempts;
        self.retried += s.retried;
        self.lost += s.lost;
        self.duplicated += s.duplicated;
        self.out_of_order += s.out_of_order;
        self.truncated += s.truncated;
        self.foreign += s.foreign;
        self.errors.merge(&s.errors);
    }
}

pub fn run(o: &Opts, target: &Target) -> Outcome {
    let token = conn::run_token();
    let sh = Arc::new(Shared {
        o: o.clone(),
        target: target.clone(),
        room: o.room.clone().unwrap_or_else(|| format!("wsload-{token}")),
        needle: format!("wsload:{token}:"),
        phase: AtomicU32::new(OPEN),
        opened: AtomicUsize::new(0),
        open_failed: AtomicUsize::new(0),
        have_before: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
        complete: AtomicUsize::new(0),
        posted_after: Mutex::new(0),
        stored: Condvar::new(),
        first_drop_ns: AtomicU64::new(u64::MAX),
        first_back_ns: AtomicU64::new(u64::MAX),
        last_back_ns: AtomicU64::new(0),
        complete_ns: AtomicU64::new(0),
    });
    let t0 = now_ns();
    let (handles, mut spawn_errors) = spawn_clients(&sh);
    let setup = Duration::from_secs_f64(o.setup_timeout);
    let n = o.connections;
    let fatal = wait_for(&sh, "open", setup, || {
        sh.opened.load(SeqCst) + sh.open_failed.load(SeqCst) >= n
    })
    .and_then(|()| all_or(&sh.opened, n, "clients connected"))
    .and_then(|()| {
        let open_s = (now_ns() - t0) as f64 / 1e9;
        note(
            &sh,
            &format!("{n} clients connected in {open_s:.2}s; posting"),
        );
        sh.phase.store(POST, SeqCst);
        wait_for(&sh, "post", setup, || sh.have_before.load(SeqCst) >= n)
    })
    .and_then(|()| restart(&sh))
    .and_then(|()| wait_for(&sh, "storm", setup, || sh.complete.load(SeqCst) >= n));
    sh.phase.store(CLOSE, SeqCst);
    let deadline = now_ns() + 2 * SEC + o.connect_timeout().as_nanos() as u64;
    let (results, not_joined) = conn::join_finished(handles, deadline);
    let mut st = Stats::default();
    for result in results {
        match result {
            Ok(s) => st.merge(&s),
            Err(_) => spawn_errors.add("client thread panicked"),
        }
    }
    st.errors.merge(&spawn_errors);
    report(&sh, st, fatal.err(), not_joined)
}

/// Starts a thread per client, at most --concurrency of them opening at once (so that opening is
/// not a storm of its own): past that, the next starts when an earlier one is through.
fn spawn_clients(sh: &Arc<Shared>) -> (Vec<thread::JoinHandle<Stats>>, Tally) {
    let mut handles = Vec::with_capacity(sh.o.connections);
    let mut errors = Tally::default();
    let setup = Duration::from_secs_f64(sh.o.setup_timeout);
    let (through_tx, through) = mpsc::channel::<()>();
    for j in 0..sh.o.connections {
        if j >= sh.o.concurrency && through.recv_timeout(setup).is_err() {
            break; // the opening phase reports who is missing
        }
        let (shared, through_tx) = (sh.clone(), through_tx.clone());
        match thread::Builder::new()
            .name(format!("storm-{j}"))
            .stack_size(CONN_STACK)
            .spawn(move || client(&shared, j, through_tx))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                errors.add(format!("spawn: {}", conn::io_kind(&e)));
                sh.open_failed.fetch_add(1, SeqCst);
            }
        }
    }
    (handles, errors)
}

/// Progress and phase changes, on stderr.
fn note(sh: &Shared, line: &str) {
    if !sh.o.quiet {
        eprintln!("[storm] {line}");
    }
}

/// Waits until `done` (checked every 5 ms) or `limit`, saying once a second where the clients
/// stand; an error names the phase.
fn wait_for(
    sh: &Shared,
    what: &str,
    limit: Duration,
    done: impl Fn() -> bool,
) -> Result<(), String> {
    let start = now_ns();
    let deadline = start + limit.as_nanos() as u64;
    let mut next_note = start + SEC;
    let standing = || {
        let (opened, back) = (sh.opened.load(SeqCst), sh.resumed.load(SeqCst));
        let complete = sh.complete.load(SeqCst);
        format!("{opened} opened, {back} back after the drop, {complete} with every message")
    };
    while !done() {
        let now = now_ns();
        if now >= deadline {
            return Err(format!(
                "{what}: not done within {limit:?} ({})",
                standing()
            ));
        }
        if now >= next_note {
            let secs = (now - start) as f64 / 1e9;
            note(sh, &format!("{what} {secs:4.1}s: {}", standing()));
            next_note += SEC;
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn all_or(counter: &AtomicUsize, n: usize, what: &str) -> Result<(), String> {
    let got = counter.load(SeqCst);
    if got < n {
        return Err(format!("{got} of {n} {what}"));
    }
    Ok(())
}

/// Takes the server down: runs --restart-cmd, or waits --hold seconds for the first drop.
fn restart(sh: &Shared) -> Result<(), String> {
    sh.phase.store(RESTART, SeqCst);
    let hold = Duration::from_secs_f64(sh.o.hold);
    match &sh.o.restart_cmd {
        Some(cmd) => {
            note(
                sh,
                &format!("every client has the first round; running: {cmd}"),
            );
            let status = std::process::Command::new("sh")
                .args(["-c", cmd])
                .status()
                .map_err(|e| format!("--restart-cmd: cannot run sh: {e}"))?;
            if !status.success() {
                return Err(format!("--restart-cmd failed: {status}"));
            }
        }
        None => note(
            sh,
            &format!("every client has the first round; restart the server now (waiting {hold:?})"),
        ),
    }
    wait_for(sh, "restart", hold, || sh.dropped.load(SeqCst) > 0)
        .map_err(|_| format!("the server did not go down within --hold {hold:?}"))
}

/// One client's connection, and what it has seen.
struct Client<'a> {
    sh: &'a Shared,
    j: usize,
    room: usize,
    ws: Option<Ws>,
    /// The newest message id this client got: what it resumes from.
    since: u64,
    track: SeqTrack,
    /// The room's poster: the first client of each room.
    poster: bool,
    posted: u64,
    /// Distinct messages of the tool's received (at most 2P).
    got: u64,
    /// Connected again after the restart.
    back: bool,
    rng: XorShift,
    st: Stats,
}

fn client(sh: &Shared, j: usize, through: mpsc::Sender<()>) -> Stats {
    let mut c = Client {
        sh,
        j,
        room: sh.room_of(j),
        ws: None,
        since: 0,
        track: SeqTrack::default(),
        poster: j.is_multiple_of(sh.room_size()),
        posted: 0,
        got: 0,
        back: false,
        rng: XorShift(0x9E37_79B9_7F4A_7C15 ^ (j as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
        st: Stats::default(),
    };
    let opened = c.open_first();
    let _ = through.send(());
    if opened {
        c.live();
    }
    c.finish()
}

impl Client<'_> {
    /// The first connection (and its welcome).
    fn open_first(&mut self) -> bool {
        let sh = self.sh;
        match self.connect(None) {
            Ok(()) => {
                sh.opened.fetch_add(1, SeqCst);
                true
            }
            Err(kind) => {
                self.st.failures.add(kind);
                sh.open_failed.fetch_add(1, SeqCst);
                false
            }
        }
    }

    /// Reads until the run ends; reconnects whenever the connection drops.
    fn live(&mut self) {
        while self.sh.phase.load(SeqCst) != CLOSE {
            if self.ws.is_none() {
                self.reconnect();
                continue;
            }
            self.post();
            if let Err(kind) = self.read_one() {
                self.on_drop(kind);
            }
        }
    }

    /// Opens a connection (resuming from `since`), and takes in its welcome.
    fn connect(&mut self, since: Option<u64>) -> Result<(), String> {
        let opts = ConnOpts {
            timeout: self.sh.o.connect_timeout(),
            read_buf: 4096,
        };
        let mut ws = conn::open(&self.sh.url(self.j, since), &self.sh.target, opts)?;
        let welcome = loop {
            match ws.read() {
                Ok(Message::Text(t)) if conn::is_welcome(t.as_str()) => break t,
                Ok(Message::Close(f)) => {
                    return Err(format!("welcome: closed {}", conn::close_kind(&f)));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("welcome: {}", conn::ws_kind(&e))),
            }
        };
        let poll = if self.poster {
            POSTER_POLL
        } else {
            MEMBER_POLL
        };
        ws.get_mut()
            .tcp
            .set_read_timeout(Some(poll))
            .map_err(|e| format!("socket: {}", conn::io_kind(&e)))?;
        self.ws = Some(ws);
        self.on_welcome(welcome.as_str());
        Ok(())
    }

    fn on_welcome(&mut self, frame: &str) {
        let Ok(welcome) = serde_json::from_str::<Value>(frame) else {
            return self.st.errors.add("welcome: not JSON");
        };
        if welcome["truncated"] == true || welcome["more"] == true {
            self.st.truncated += 1; // the replay is not whole: what it lacks shows as lost
        }
        for message in welcome["history"].as_array().into_iter().flatten() {
            self.on_message(message);
        }
        if let Some(id) = welcome["last_id"].as_u64() {
            self.since = self.since.max(id);
        }
    }

    /// A message of the room, live or replayed: checks it is the next of the tool's.
    fn on_message(&mut self, message: &Value) {
        if let Some(id) = message["id"].as_u64() {
            self.since = self.since.max(id);
        }
        let text = message["text"].as_str().unwrap_or_default();
        let Some(rest) = text.strip_prefix(self.sh.needle.as_str()) else {
            return; // someone else's message
        };
        let parsed = rest
            .split_once(':')
            .and_then(|(room, seq)| Some((room.parse::<usize>().ok()?, seq.parse::<u64>().ok()?)));
        match parsed {
            Some((room, seq)) if room == self.room => self.see(seq),
            _ => self.st.foreign += 1,
        }
    }

    fn see(&mut self, seq: u64) {
        match self.track.see(seq) {
            Seen::New => {}
            Seen::Late => self.st.out_of_order += 1,
            Seen::Duplicate => return self.st.duplicated += 1,
        }
        self.got += 1;
        let p = self.sh.messages();
        if self.got == p {
            self.sh.have_before.fetch_add(1, SeqCst);
        }
        if self.got == 2 * p {
            if self.poster {
                // Its own second round came back: the server has stored it.
                let mut posted = self.sh.posted_after();
                *posted += 1;
                if *posted == self.sh.rooms() {
                    self.sh.stored.notify_all(); // one wake-up each, when the last room is in
                }
            }
            self.sh.complete.fetch_add(1, SeqCst);
            self.sh.complete_ns.fetch_max(now_ns(), SeqCst);
        }
    }

    /// The poster's part: the first round once everyone is in, the second as soon as it is back
    /// after the restart.
    fn post(&mut self) {
        let sh = self.sh;
        let p = sh.messages();
        let due = match sh.phase.load(SeqCst) {
            POST => p,
            RESTART if self.back => 2 * p,
            _ => return,
        };
        if !self.poster || self.posted >= due {
            return;
        }
        let Some(ws) = self.ws.as_mut() else { return };
        while self.posted < due {
            let text = self.sh.text(self.room, self.posted);
            if let Err(e) = ws.send(Message::text(text)) {
                self.st.errors.add(format!("send: {}", conn::ws_kind(&e)));
                return;
            }
            self.posted += 1;
        }
        if let Err(e) = ws.get_mut().push() {
            self.st.errors.add(format!("send: {}", conn::io_kind(&e)));
        }
    }

    /// An odd-numbered client waits until the server has every room's second round, so that
    /// it needs the replay.
    fn await_second_round(&self) {
        let sh = self.sh;
        if self.poster || self.j.is_multiple_of(2) {
            return;
        }
        let mut posted = sh.posted_after();
        while *posted < sh.rooms() && sh.phase.load(SeqCst) != CLOSE {
            posted = sh
                .stored
                .wait_timeout(posted, MEMBER_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Reads one frame (or waits out the poll interval); an error says the connection is gone.
    fn read_one(&mut self) -> Result<(), String> {
        let Some(ws) = self.ws.as_mut() else {
            return Ok(());
        };
        let frame = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(f)) => return Err(format!("closed {}", conn::close_kind(&f))),
            Ok(_) => return Ok(()),
            Err(WsError::Io(e)) if conn::io_kind(&e) == "timeout" => return Ok(()),
            Err(e) => return Err(conn::ws_kind(&e)),
        };
        let text = frame.as_str();
        if let Some(code) = conn::error_code(text) {
            self.st.errors.add(code);
        } else if text.contains(self.sh.needle.as_str()) {
            match serde_json::from_str::<Value>(text) {
                Ok(message) => self.on_message(&message),
                Err(_) => self.st.errors.add("a frame that is not JSON"),
            }
        }
        Ok(())
    }

    fn on_drop(&mut self, kind: String) {
        self.ws = None;
        let sh = self.sh;
        if sh.phase.load(SeqCst) != RESTART || self.back {
            return self.st.errors.add(format!("dropped: {kind}")); // not the restart
        }
        sh.first_drop_ns.fetch_min(now_ns(), SeqCst);
        sh.dropped.fetch_add(1, SeqCst);
    }

    /// Tries again and again, waiting a jittered, growing time before each attempt.
    fn reconnect(&mut self) {
        let cap = (self.sh.o.backoff_cap * 1e9) as u64;
        let started = now_ns();
        let mut attempt = 0u32;
        while self.sh.phase.load(SeqCst) != CLOSE {
            let backoff = BACKOFF_BASE_NS.saturating_mul(1 << attempt.min(20));
            let bound = if self.poster {
                POSTER_RETRY_NS
            } else {
                backoff.min(cap)
            };
            conn::sleep_until_ns(now_ns() + self.rng.next() % bound.max(1));
            self.await_second_round();
            attempt += 1;
            self.st.attempts += 1;
            match self.connect(Some(self.since)) {
                Ok(()) => return self.on_back(started, attempt),
                Err(kind) => self.st.failures.add(kind),
            }
        }
    }

    fn on_back(&mut self, started: u64, attempts: u32) {
        let now = now_ns();
        self.st.reconnects.record(now - started);
        if attempts > 1 {
            self.st.retried += 1;
        }
        if !self.back && self.sh.phase.load(SeqCst) == RESTART {
            self.back = true;
            self.sh.first_back_ns.fetch_min(now, SeqCst);
            self.sh.last_back_ns.fetch_max(now, SeqCst);
            self.sh.resumed.fetch_add(1, SeqCst);
        }
    }

    /// Closes the connection and counts what never came.
    fn finish(mut self) -> Stats {
        if let Some(ws) = self.ws.as_mut() {
            conn::close(ws, now_ns() + SEC);
        }
        self.st.lost = self.track.lost(2 * self.sh.messages());
        self.st
    }
}

/// The storm's figures, in seconds from the first drop (or between two moments), if both
/// moments happened.
struct Times {
    down: Option<f64>,
    back: Option<f64>,
    storm: Option<f64>,
    verified: Option<f64>,
}

impl Times {
    fn new(sh: &Shared) -> Times {
        let at = |a: &AtomicU64| Some(a.load(SeqCst)).filter(|&t| t != 0 && t != u64::MAX);
        let drop = at(&sh.first_drop_ns);
        let first = at(&sh.first_back_ns);
        let last = at(&sh.last_back_ns);
        let complete = at(&sh.complete_ns);
        let span = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / 1e9);
        Times {
            down: span(drop, first),
            back: span(drop, last),
            storm: span(first, last),
            verified: span(drop, complete),
        }
    }
}

fn report(sh: &Shared, st: Stats, fatal: Option<String>, not_joined: usize) -> Outcome {
    let n = sh.o.connections;
    let resumed = sh.resumed.load(SeqCst);
    let faults = st.lost + st.duplicated + st.out_of_order + st.foreign + st.errors.total();
    let ok = fatal.is_none() && resumed == n && faults == 0 && not_joined == 0;
    let times = Times::new(sh);
    let mut json = serde_json::Map::new();
    let round = |t: Option<f64>| t.map(|t| (t * 1000.0).round() / 1000.0);
    for (key, value) in [
        ("connections", json!(n)),
        ("per_room", json!(sh.o.per_room)),
        ("rooms", json!(sh.rooms())),
        ("messages_per_round", json!(sh.o.messages)),
        ("opened", json!(sh.opened.load(SeqCst))),
        ("dropped", json!(sh.dropped.load(SeqCst))),
        ("resumed", json!(resumed)),
        ("complete", json!(sh.complete.load(SeqCst))),
        ("down_s", json!(round(times.down))),
        ("back_s", json!(round(times.back))),
        ("storm_s", json!(round(times.storm))),
        ("verified_s", json!(round(times.verified))),
        ("reconnect_us", st.reconnects.json_us()),
        ("attempts", json!(st.attempts)),
        ("retried", json!(st.retried)),
        ("failures", st.failures.json()),
        ("lost", json!(st.lost)),
        ("duplicated", json!(st.duplicated)),
        ("out_of_order", json!(st.out_of_order)),
        ("truncated", json!(st.truncated)),
        ("foreign", json!(st.foreign)),
        ("errors", st.errors.json()),
        ("threads_not_joined", json!(not_joined)),
    ] {
        json.insert(key.to_string(), value);
    }
    Outcome {
        ok,
        limited_by: limits::first(&[&st.failures, &st.errors]),
        lines: report_lines(sh, &st, &times, resumed),
        fatal,
        json,
    }
}

fn report_lines(sh: &Shared, st: &Stats, times: &Times, resumed: usize) -> Vec<String> {
    let secs = |t: Option<f64>| t.map_or_else(|| "-".to_string(), |t| format!("{t:.3}s"));
    let n = sh.o.connections as u64;
    let reconnect = if st.reconnects.count() > 0 {
        let r = &st.reconnects;
        let (p50, p99) = (fmt_ns(r.quantile(0.5)), fmt_ns(r.quantile(0.99)));
        format!("p50 {p50} p99 {p99} max {}", fmt_ns(r.max()))
    } else {
        "-".into()
    };
    vec![
        format!(
            "clients       {} in rooms of {}, {} messages per room before the restart and {} after",
            group(n),
            sh.room_size(),
            sh.o.messages,
            sh.o.messages
        ),
        format!(
            "back          {}/{} resumed; {} after the first drop (server down {}, then all back in {})",
            group(resumed as u64),
            group(n),
            secs(times.back),
            secs(times.down),
            secs(times.storm)
        ),
        format!(
            "every message {} after the first drop",
            secs(times.verified)
        ),
        format!(
            "reconnects    {} attempts, {} clients needed more than one; drop to back {reconnect}",
            group(st.attempts),
            group(st.retried)
        ),
        format!("refusals      {}", st.failures.human()),
        format!(
            "messages      lost {}, duplicated {}, out of order {}, other rooms' {}; replays cut short {}",
            st.lost, st.duplicated, st.out_of_order, st.foreign, st.truncated
        ),
        format!("errors        {}", st.errors.human()),
    ]
}
