//! `storm`: a server restart with every client connected, and what the clients see of it.
//!
//! --connections N clients, each in a room (--per-room M to a room), are held by --concurrency
//! worker threads. A worker owns its share of the sockets (non-blocking) and sleeps in an epoll
//! wait (the `polling` crate) until some of them have data, then drains each: one wake-up serves
//! every frame that arrived meanwhile, where a thread per client would wake once per frame. It
//! opens and reopens its clients itself on non-blocking sockets (connect, upgrade, welcome, each
//! step when the socket is ready): at first one at a time per worker (so --concurrency at once),
//! after the restart every client whose backoff is up at once, as independent clients would.
//!
//! Once all are in, the first client of each room posts --messages P through its WebSocket, and
//! everyone waits until every client has them all. Then the server goes down (the tool runs
//! --restart-cmd, or waits --hold seconds for someone else to restart it): every client notices
//! its connection drop and reconnects with jittered, capped exponential backoff and
//! `since=<newest id it got>`, as the page does. The first client of each room (which retries
//! every few milliseconds, to be back among the first) posts P more as soon as it is back. Every
//! other client (odd-numbered) holds its reconnect until the server has its room's second
//! round, so that it gets it in the replay of `since`; the rest race the posting and get it live
//! or replayed. The run is ok when every client came back and got all 2P of its room exactly once
//! and in order: no gap across the restart, no duplicate between the replay and live delivery.
//! It reports how long the storm took: from the first drop to the last client back and resumed.
//!
//! This mode needs a server whose message ids survive the restart (`--data-dir`): without it the
//! new server numbers from 1 again, and a client's `since` may pass over new messages (which the
//! run reports as lost).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::Duration;

use polling::{Event, Events, PollMode, Poller};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

use crate::cli::Opts;
use crate::conn::{self, ConnOpts, Opened, Opening, Target, Ws, XorShift, now_ns};
use crate::stats::{Hist, Seen, SeqTrack, Tally, fmt_ns, group};
use crate::{Outcome, limits};

const SEC: u64 = 1_000_000_000;
/// Phases, in order; the workers follow them.
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
/// Longest sleep of a worker in its poll: it looks at the phase (to post, or to stop) and at
/// the held reconnects at least this often.
const TURN: Duration = Duration::from_millis(10);
/// A worker's stack: it holds no buffers of its own there.
const WORKER_STACK: usize = 256 * 1024;
/// How long the clients' closing handshakes may take at the end of the run.
const CLOSE_WAIT_NS: u64 = 2 * SEC;

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
    /// Rooms whose second round the server has (its poster got its own messages back): a
    /// flag a room, and their count.
    stored: Vec<AtomicBool>,
    rooms_stored: AtomicUsize,
    first_drop_ns: AtomicU64,
    first_back_ns: AtomicU64,
    last_back_ns: AtomicU64,
    /// When the last room's second round was stored (the held clients may come back).
    stored_ns: AtomicU64,
    complete_ns: AtomicU64,
}

impl Shared {
    fn messages(&self) -> u64 {
        self.o.messages as u64
    }

    fn room_size(&self) -> usize {
        room_size(&self.o)
    }

    fn rooms(&self) -> usize {
        room_count(&self.o)
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

    /// The room's second round is stored: its held clients may come back.
    fn second_round_stored(&self, room: usize) -> bool {
        self.stored[room].load(SeqCst)
    }

    fn text(&self, room: usize, seq: u64) -> String {
        let text = format!("{}{room}:{seq}", self.needle);
        json!({"type": "message", "text": text}).to_string()
    }
}

/// Clients per room (--per-room 0: all in one).
fn room_size(o: &Opts) -> usize {
    match o.per_room {
        0 => o.connections.max(1),
        m => m,
    }
}

fn room_count(o: &Opts) -> usize {
    o.connections.div_ceil(room_size(o))
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
        stored: (0..room_count(o)).map(|_| AtomicBool::new(false)).collect(),
        rooms_stored: AtomicUsize::new(0),
        first_drop_ns: AtomicU64::new(u64::MAX),
        first_back_ns: AtomicU64::new(u64::MAX),
        last_back_ns: AtomicU64::new(0),
        stored_ns: AtomicU64::new(0),
        complete_ns: AtomicU64::new(0),
    });
    let t0 = now_ns();
    let (handles, mut spawn_errors) = spawn_workers(&sh);
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
    let deadline = now_ns() + CLOSE_WAIT_NS + SEC + o.connect_timeout().as_nanos() as u64;
    let (results, not_joined) = conn::join_finished(handles, deadline);
    let mut st = Stats::default();
    for result in results {
        match result {
            Ok(s) => st.merge(&s),
            Err(_) => spawn_errors.add("worker thread panicked"),
        }
    }
    st.errors.merge(&spawn_errors);
    report(&sh, st, fatal.err(), not_joined)
}

/// Starts --concurrency workers; worker k holds clients k, k + K, k + 2K...
fn spawn_workers(sh: &Arc<Shared>) -> (Vec<thread::JoinHandle<Stats>>, Tally) {
    let workers = sh.o.concurrency.clamp(1, sh.o.connections.max(1));
    let mut handles = Vec::with_capacity(workers);
    let mut errors = Tally::default();
    for k in 0..workers {
        let shared = sh.clone();
        match thread::Builder::new()
            .name(format!("storm-{k}"))
            .stack_size(WORKER_STACK)
            .spawn(move || worker(&shared, k, workers))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                errors.add(format!("spawn: {}", conn::io_kind(&e)));
                let share = (k..sh.o.connections).step_by(workers).count();
                sh.open_failed.fetch_add(share, SeqCst);
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

/// What a client without a connection does next.
enum Next {
    /// Its opening is under way: watch its socket.
    Watch,
    /// Try again at this time (on the [`now_ns`] clock).
    Retry(u64),
    /// Wait until every room's second round is stored.
    Hold,
    /// Its first connection failed: the run reports it, no retry.
    GiveUp,
}

/// One worker: its clients, the poller that watches their sockets, and when each disconnected
/// client tries again. Only the worker adds sockets to its poller and removes them.
struct Worker<'a> {
    sh: &'a Shared,
    poller: Poller,
    clients: Vec<Client<'a>>,
    /// The room posters among `clients` (indices).
    posters: Vec<usize>,
    /// Disconnected clients by the time of their next attempt (indices into `clients`).
    due: BinaryHeap<Reverse<(u64, usize)>>,
    /// Odd-numbered clients waiting for their room's second round before they reconnect.
    held: Vec<usize>,
    /// Clients opening (connect, upgrade, welcome) now.
    opening: usize,
    next_expiry_check: u64,
    errors: Tally,
}

fn worker(sh: &Shared, k: usize, workers: usize) -> Stats {
    let share = (k..sh.o.connections).step_by(workers);
    let poller = match Poller::new() {
        Ok(poller) => poller,
        Err(e) => {
            sh.open_failed.fetch_add(share.count(), SeqCst);
            let mut st = Stats::default();
            st.errors.add(format!("poller: {}", conn::io_kind(&e)));
            return st;
        }
    };
    let clients: Vec<Client> = share.map(|j| Client::new(sh, j)).collect();
    let mut w = Worker {
        sh,
        poller,
        posters: (0..clients.len()).filter(|&i| clients[i].poster).collect(),
        due: (0..clients.len()).map(|i| Reverse((0, i))).collect(),
        clients,
        held: Vec::new(),
        opening: 0,
        next_expiry_check: 0,
        errors: Tally::default(),
    };
    w.run();
    w.close_all();
    w.finish()
}

impl Worker<'_> {
    /// Until the run ends: starts the attempts that are due, posts, and sleeps until some socket
    /// is ready (or the next client is due, or a turn has passed), then serves those.
    fn run(&mut self) {
        let mut events = Events::new();
        while self.sh.phase.load(SeqCst) != CLOSE {
            self.release_held();
            self.start_due();
            self.expire();
            self.post();
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, Some(self.timeout()))
                && e.kind() != io::ErrorKind::Interrupted
            {
                self.errors.add(format!("poll: {}", conn::io_kind(&e)));
                thread::sleep(TURN);
            }
            for event in events.iter() {
                self.on_ready(event.key);
            }
        }
    }

    /// How long the poll may sleep: until the next client is due (if it may start), a turn at
    /// most.
    fn timeout(&self) -> Duration {
        match self.due.peek() {
            Some(Reverse((at, _))) if self.opening < self.at_once() => {
                Duration::from_nanos(at.saturating_sub(now_ns())).min(TURN)
            }
            _ => TURN,
        }
    }

    /// Openings a worker has under way at once: after the restart all that are due, as
    /// independent clients would; while first opening, one (--concurrency at once in all).
    fn at_once(&self) -> usize {
        match self.sh.phase.load(SeqCst) {
            OPEN => 1,
            _ => usize::MAX,
        }
    }

    /// Held clients whose room's second round is stored are due now.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = now_ns();
        let (clients, due) = (&self.clients, &mut self.due);
        self.held.retain(|&i| {
            let release = !clients[i].held_back();
            if release {
                due.push(Reverse((now, i)));
            }
            !release
        });
    }

    /// Starts the attempts that are due, as many as [`Worker::at_once`] allows.
    fn start_due(&mut self) {
        let at_once = self.at_once();
        while self.opening < at_once {
            let i = match self.due.peek() {
                Some(&Reverse((at, i))) if at <= now_ns() => i,
                _ => return,
            };
            self.due.pop();
            match self.clients[i].attempt() {
                Next::Watch => {
                    self.opening += 1;
                    self.watch(i);
                }
                Next::Retry(at) => self.due.push(Reverse((at, i))),
                Next::Hold => self.held.push(i),
                Next::GiveUp => {}
            }
        }
    }

    /// Ends the openings that ran past --connect-timeout (looked at every `TURN`).
    fn expire(&mut self) {
        let now = now_ns();
        if self.opening == 0 || now < self.next_expiry_check {
            return;
        }
        self.next_expiry_check = now + TURN.as_nanos() as u64;
        for i in 0..self.clients.len() {
            if let Some(kind) = self.clients[i].expired(now) {
                self.failed(i, kind.to_string());
            }
        }
    }

    fn post(&mut self) {
        for &i in &self.posters {
            self.clients[i].post();
        }
    }

    /// A client's socket is ready: the next step of its opening, or what it holds to read.
    fn on_ready(&mut self, i: usize) {
        if self.clients[i].opening.is_some() {
            self.advance(i);
        } else {
            self.drain(i);
        }
    }

    /// Puts a client's socket in the poller, for what it waits for next.
    fn watch(&mut self, i: usize) {
        let Some((tcp, write)) = self.clients[i].socket() else {
            return;
        };
        let interest = match write {
            true => Event::writable(i),
            false => Event::readable(i),
        };
        // SAFETY: a socket leaves the poller (`unwatch`) before it can be dropped: a client's
        // opening or connection is only taken out or replaced by `disconnect` and `advance`,
        // which unwatch it first.
        let added = unsafe { self.poller.add_with_mode(tcp, interest, PollMode::Level) };
        if let Err(e) = added {
            self.failed(i, format!("poll: {}", conn::io_kind(&e)));
        }
    }

    fn unwatch(&self, i: usize) {
        if let Some((tcp, _)) = self.clients[i].socket() {
            let _ = self.poller.delete(tcp);
        }
    }

    fn disconnect(&mut self, i: usize) {
        self.unwatch(i);
        let c = &mut self.clients[i];
        if c.opening.take().is_some() || c.ws.as_ref().is_some_and(|_| !c.welcomed) {
            self.opening -= 1;
        }
        c.ws = None;
        c.welcomed = false;
    }

    /// The next step of an opening (out of the poller meanwhile: a failed step drops it).
    fn advance(&mut self, i: usize) {
        self.unwatch(i);
        let Some(opening) = self.clients[i].opening.take() else {
            return;
        };
        match opening.advance() {
            Ok(Opened::Waiting(next)) => {
                self.clients[i].opening = Some(next);
                self.watch(i);
            }
            Ok(Opened::Open(ws)) => {
                self.clients[i].ws = Some(*ws);
                self.watch(i);
                self.drain(i); // the welcome may have come with the response
            }
            Err(kind) => {
                self.opening -= 1; // taken out above: `failed` finds nothing to count
                self.failed(i, kind);
            }
        }
    }

    /// Reads what a client's socket holds; a connection that is gone is tried again later.
    fn drain(&mut self, i: usize) {
        let was_welcomed = self.clients[i].welcomed;
        match self.clients[i].drain() {
            Ok(()) if !was_welcomed && self.clients[i].welcomed => self.opening -= 1,
            Ok(()) => {}
            Err(kind) if self.clients[i].welcomed => {
                self.disconnect(i);
                let at = self.clients[i].on_drop(kind);
                self.due.push(Reverse((at, i)));
            }
            Err(kind) => self.failed(i, format!("welcome: {kind}")),
        }
    }

    /// An attempt that did not get as far as the welcome.
    fn failed(&mut self, i: usize, kind: String) {
        self.disconnect(i);
        if let Some(at) = self.clients[i].failed(kind) {
            self.due.push(Reverse((at, i)));
        }
    }

    /// Sends every connected client's close frame, then drains until the server has answered
    /// each (or `CLOSE_WAIT_NS`).
    fn close_all(&mut self) {
        let deadline = now_ns() + CLOSE_WAIT_NS;
        let mut open = self
            .clients
            .iter_mut()
            .map(Client::send_close)
            .filter(|&sent| sent)
            .count();
        let mut events = Events::new();
        while open > 0 && now_ns() < deadline {
            events.clear();
            let _ = self.poller.wait(&mut events, Some(TURN));
            for event in events.iter() {
                let c = &mut self.clients[event.key];
                if c.opening.is_none() && c.welcomed && c.drain().is_err() {
                    self.disconnect(event.key);
                    open -= 1;
                }
            }
        }
    }

    /// What the worker's clients saw, summed.
    fn finish(mut self) -> Stats {
        let mut st = Stats::default();
        st.errors.merge(&self.errors);
        for i in 0..self.clients.len() {
            self.disconnect(i);
        }
        for c in self.clients {
            st.merge(&c.finish());
        }
        st
    }
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
    /// Its socket while it opens (connect, upgrade), and until when it may take.
    opening: Option<Opening>,
    open_by: u64,
    /// The welcome of its connection came (the connection is open).
    welcomed: bool,
    /// It had a welcome once: what follows are reconnects.
    has_opened: bool,
    /// Connected again after the restart.
    back: bool,
    /// When its connection dropped, and how many attempts it has made since.
    drop_ns: u64,
    tries: u32,
    rng: XorShift,
    st: Stats,
}

impl<'a> Client<'a> {
    fn new(sh: &'a Shared, j: usize) -> Client<'a> {
        Client {
            sh,
            j,
            room: sh.room_of(j),
            ws: None,
            since: 0,
            track: SeqTrack::default(),
            poster: j.is_multiple_of(sh.room_size()),
            posted: 0,
            got: 0,
            opening: None,
            open_by: 0,
            welcomed: false,
            has_opened: false,
            back: false,
            drop_ns: 0,
            tries: 0,
            rng: XorShift(
                0x9E37_79B9_7F4A_7C15 ^ (j as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
            ),
            st: Stats::default(),
        }
    }
}

impl Client<'_> {
    /// The next step for a client without a connection: its first, or one more try after a drop.
    fn attempt(&mut self) -> Next {
        if self.has_opened {
            if self.held_back() {
                return Next::Hold;
            }
            self.tries += 1;
            self.st.attempts += 1;
        }
        let sh = self.sh;
        let opts = ConnOpts {
            timeout: sh.o.connect_timeout(),
            read_buf: 4096,
        };
        self.open_by = now_ns() + opts.timeout.as_nanos() as u64;
        let url = sh.url(self.j, self.has_opened.then_some(self.since));
        match Opening::start(&url, &sh.target, opts) {
            Ok(Opened::Waiting(opening)) => self.opening = Some(opening),
            Ok(Opened::Open(mut ws)) => {
                // wss: opened blocking; from here on the poller waits for it.
                if let Err(e) = ws.get_mut().set_nonblocking() {
                    let kind = format!("socket: {}", conn::io_kind(&e));
                    return self.failed(kind).map_or(Next::GiveUp, Next::Retry);
                }
                self.ws = Some(*ws);
            }
            Err(kind) => {
                return self.failed(kind).map_or(Next::GiveUp, Next::Retry);
            }
        }
        Next::Watch
    }

    /// Counts an attempt that did not get as far as the welcome; says when to try again (never,
    /// for the first).
    fn failed(&mut self, kind: String) -> Option<u64> {
        self.st.failures.add(kind);
        if !self.has_opened {
            self.sh.open_failed.fetch_add(1, SeqCst);
            return None;
        }
        Some(self.next_try())
    }

    /// An opening past its time: what it was waiting for.
    fn expired(&self, now: u64) -> Option<&'static str> {
        if now < self.open_by {
            return None;
        }
        match (&self.opening, &self.ws) {
            (Some(opening), _) if opening.wants_write() => Some("connect: timeout"),
            (Some(_), _) => Some("handshake: timeout"),
            (None, Some(_)) if !self.welcomed => Some("welcome: timeout"),
            _ => None,
        }
    }

    /// The socket of its opening or connection, and whether it waits to write (the connect).
    fn socket(&self) -> Option<(&std::net::TcpStream, bool)> {
        match (&self.opening, &self.ws) {
            (Some(opening), _) => Some((opening.tcp(), opening.wants_write())),
            (None, Some(ws)) => Some((&ws.get_ref().tcp, false)),
            (None, None) => None,
        }
    }

    /// An odd-numbered client waits until the server has its room's second round, so that it
    /// needs the replay.
    fn held_back(&self) -> bool {
        !self.poster && !self.j.is_multiple_of(2) && !self.sh.second_round_stored(self.room)
    }

    /// When to try next: a jittered wait below a bound that doubles with each failed attempt
    /// (capped by --backoff-cap); the room's poster retries within a few milliseconds.
    fn next_try(&mut self) -> u64 {
        let bound = if self.poster {
            POSTER_RETRY_NS
        } else {
            let cap = (self.sh.o.backoff_cap * 1e9) as u64;
            BACKOFF_BASE_NS
                .saturating_mul(1 << self.tries.min(20))
                .min(cap)
        };
        now_ns() + self.rng.next() % bound.max(1)
    }

    /// The welcome came: the connection is open (first, or back after a drop).
    fn on_open(&mut self, welcome: &str) {
        self.welcomed = true;
        self.on_welcome(welcome);
        if self.has_opened {
            return self.on_back();
        }
        self.has_opened = true;
        self.sh.opened.fetch_add(1, SeqCst);
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

    /// Reads every frame the connection holds; an error says it is gone.
    fn drain(&mut self) -> Result<(), String> {
        while let Some(frame) = self.next_frame()? {
            match self.welcomed {
                true => self.on_frame(frame.as_str()),
                false if conn::is_welcome(frame.as_str()) => self.on_open(frame.as_str()),
                false => {} // nothing comes before the welcome but control frames
            }
        }
        let Some(ws) = self.ws.as_mut() else {
            return Ok(());
        };
        match ws.get_mut().push() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                Err(format!("write: {}", conn::io_kind(&e)))
            }
            _ => Ok(()), // the pongs tungstenite queued are out (or wait for room)
        }
    }

    /// The next text frame, or `None` once the socket would block.
    fn next_frame(&mut self) -> Result<Option<tungstenite::Utf8Bytes>, String> {
        let Some(ws) = self.ws.as_mut() else {
            return Ok(None);
        };
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => return Ok(Some(t)),
                Ok(Message::Close(f)) => {
                    let _ = ws.flush(); // the reply tungstenite queued
                    let _ = ws.get_mut().push();
                    return Err(format!("closed {}", conn::close_kind(&f)));
                }
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(conn::ws_kind(&e)),
            }
        }
    }

    fn on_frame(&mut self, text: &str) {
        if let Some(code) = conn::error_code(text) {
            self.st.errors.add(code);
        } else if text.contains(self.sh.needle.as_str()) {
            match serde_json::from_str::<Value>(text) {
                Ok(message) => self.on_message(&message),
                Err(_) => self.st.errors.add("a frame that is not JSON"),
            }
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
                self.sh.stored[self.room].store(true, SeqCst);
                if self.sh.rooms_stored.fetch_add(1, SeqCst) + 1 == self.sh.rooms() {
                    self.sh.stored_ns.store(now_ns(), SeqCst);
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
        let Some(ws) = self.ws.as_mut().filter(|_| self.welcomed) else {
            return;
        };
        while self.posted < due {
            let text = sh.text(self.room, self.posted);
            if let Err(e) = ws.send(Message::text(text)) {
                return self.st.errors.add(format!("send: {}", conn::ws_kind(&e)));
            }
            self.posted += 1;
        }
        match ws.get_mut().push() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                self.st.errors.add(format!("send: {}", conn::io_kind(&e)));
            }
            _ => {} // what the socket did not take goes before the next read
        }
    }

    /// Counts a drop (the restart's, or an error at any other time) and says when to try again.
    fn on_drop(&mut self, kind: String) -> u64 {
        let sh = self.sh;
        let now = now_ns();
        if sh.phase.load(SeqCst) != RESTART || self.back {
            self.st.errors.add(format!("dropped: {kind}")); // not the restart
        } else {
            sh.first_drop_ns.fetch_min(now, SeqCst);
            sh.dropped.fetch_add(1, SeqCst);
        }
        self.drop_ns = now;
        self.tries = 0;
        self.next_try()
    }

    fn on_back(&mut self) {
        let now = now_ns();
        self.st.reconnects.record(now - self.drop_ns);
        if self.tries > 1 {
            self.st.retried += 1;
        }
        if !self.back && self.sh.phase.load(SeqCst) == RESTART {
            self.back = true;
            self.sh.first_back_ns.fetch_min(now, SeqCst);
            self.sh.last_back_ns.fetch_max(now, SeqCst);
            self.sh.resumed.fetch_add(1, SeqCst);
        }
    }

    /// Starts the closing handshake; says whether there was a connection to close.
    fn send_close(&mut self) -> bool {
        let Some(ws) = self.ws.as_mut().filter(|_| self.welcomed) else {
            return false;
        };
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = ws.close(Some(frame));
        let _ = ws.get_mut().push();
        true
    }

    /// Counts what never came.
    fn finish(mut self) -> Stats {
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
    /// From the first client back to every room's second round stored (the held half waits).
    stored: Option<f64>,
    verified: Option<f64>,
}

impl Times {
    fn new(sh: &Shared) -> Times {
        let at = |a: &AtomicU64| Some(a.load(SeqCst)).filter(|&t| t != 0 && t != u64::MAX);
        let drop = at(&sh.first_drop_ns);
        let first = at(&sh.first_back_ns);
        let last = at(&sh.last_back_ns);
        let stored = at(&sh.stored_ns);
        let complete = at(&sh.complete_ns);
        let span = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / 1e9);
        Times {
            down: span(drop, first),
            back: span(drop, last),
            storm: span(first, last),
            stored: span(first, stored),
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
        ("stored_s", json!(round(times.stored))),
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
            "every message {} after the first drop; every room's second round stored {} after the first back",
            secs(times.verified),
            secs(times.stored)
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
