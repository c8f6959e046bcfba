//! `fanout` and `latency`: C connections in one room, S of them sending.
//!
//! Every connection has its own thread doing blocking reads (128 KiB stack, read timeout so it
//! notices phase changes). Phases, driven by the main thread:
//!
//! 1. SETUP: connect (at most --concurrency handshakes at once); in wschat mode wait for the
//!    `welcome`; count as registered.
//! 2. PROBE: connection 0 sends a probe; every connection must see it (re-sent once a second).
//!    Then every connection is known to receive what is sent to the room.
//! 3. RUN: senders send during warm-up + duration. Each message carries its sequence number and
//!    send time, and counts as *measured* when that time falls after the warm-up.
//! 4. STOP: senders have stopped; the main thread waits (at most --drain) until every connection
//!    has received every message the server accepted.
//! 5. CLOSE: every connection sends a close frame and waits (bounded) for the server's.
//!
//! A message the server refuses (an `error` `rate_limited` to its sender) reaches nobody: it is
//! counted as *refused*. A sender the server closes leaves some messages *unanswered* (neither
//! echoed nor refused). *Lost* counts only the rest: messages some member should have received.
//! Receivers keep everything in thread-local state (counts, a latency histogram, per-sender
//! sequence tracking) and hand it back when joined; the only shared writes in the hot path are
//! each connection's own padded progress counter.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::error::Error as WsError;

use crate::Outcome;
use crate::cli::{Envelope, Mode, Opts};
use crate::conn::{self, ConnOpts, Frame, Target, Wire, Ws, XorShift, now_ns, sleep_until_ns};
use crate::limits;
use crate::stats::{Hist, Seen, SeqTrack, Tally, fmt_ns, group};
use crate::sysinfo::{CpuMark, MemMark, cpu_report};

const SETUP: u32 = 0;
const PROBE: u32 = 1;
const RUN: u32 = 2;
const STOP: u32 = 3;
const CLOSE: u32 = 4;

pub const CONN_STACK: usize = 128 * 1024;
const SEC: u64 = 1_000_000_000;

/// Seconds (a flag's value) as nanoseconds on the tool's clock.
fn ns(secs: f64) -> u64 {
    (secs * 1e9) as u64
}

fn secs_since(t: u64) -> f64 {
    (now_ns() - t) as f64 / 1e9
}

#[repr(align(128))]
#[derive(Default)]
struct Slot {
    /// Distinct messages received so far (all phases).
    recv: AtomicU64,
    /// Highest probe round seen.
    probe: AtomicU32,
}

#[repr(align(128))]
#[derive(Default)]
struct SenderSlot {
    sent: AtomicU64,
    /// Messages the server refused (its rate limit): they reach nobody and are not lost.
    refused: AtomicU64,
    /// Messages of a sender the server closed that got neither echo nor refusal.
    unanswered: AtomicU64,
    done: AtomicBool,
}

struct Ctx {
    o: Opts,
    wire: Wire,
    /// One per `--url`: the room's URL on that node, and its address.
    nodes: Vec<(String, Target)>,
    phase: AtomicU32,
    probe_round: AtomicU32,
    registered: AtomicUsize,
    failed: AtomicUsize,
    /// Registered connections that ended before the close phase (closed by the server, errors).
    dead: AtomicUsize,
    run_start: AtomicU64,
    warm_end: AtomicU64,
    end: AtomicU64,
    close_deadline: AtomicU64,
    slots: Vec<Slot>,
    senders: Vec<SenderSlot>,
    gate: Gate,
}

impl Ctx {
    fn new(o: &Opts, targets: &[Target]) -> Ctx {
        let token = conn::run_token();
        let room = o.room.clone().unwrap_or_else(|| format!("wsload-{token}"));
        let node = |target: &Target| {
            let url = if o.raw {
                target.base.clone()
            } else {
                target.url_for_room(Some(&room))
            };
            (url, target.clone())
        };
        Ctx {
            o: o.clone(),
            wire: Wire::new(&token, o.envelope(), o.size),
            nodes: targets.iter().map(node).collect(),
            phase: AtomicU32::new(SETUP),
            probe_round: AtomicU32::new(0),
            registered: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            dead: AtomicUsize::new(0),
            run_start: AtomicU64::new(u64::MAX),
            warm_end: AtomicU64::new(u64::MAX),
            end: AtomicU64::new(u64::MAX),
            close_deadline: AtomicU64::new(u64::MAX),
            slots: (0..o.clients).map(|_| Slot::default()).collect(),
            senders: (0..o.senders).map(|_| SenderSlot::default()).collect(),
            gate: Gate::new(o.concurrency),
        }
    }

    /// Where connection `i` goes: senders to the first node, receivers to each node in turn.
    fn node(&self, i: usize) -> &(String, Target) {
        let receiver = i.saturating_sub(self.o.senders);
        let k = if i < self.o.senders {
            0
        } else {
            receiver % self.nodes.len()
        };
        &self.nodes[k]
    }

    fn progress(&self) -> bool {
        !self.o.quiet && self.o.warmup + self.o.duration > 3.0
    }

    fn sent(&self) -> u64 {
        self.senders.iter().map(|s| s.sent.load(SeqCst)).sum()
    }

    fn refused(&self) -> u64 {
        self.senders.iter().map(|s| s.refused.load(SeqCst)).sum()
    }

    /// Per sender, the messages no member is to expect: refused, or left unanswered.
    fn not_expected(&self) -> Vec<u64> {
        let n = |s: &SenderSlot| s.refused.load(SeqCst) + s.unanswered.load(SeqCst);
        self.senders.iter().map(n).collect()
    }

    fn received(&self) -> u64 {
        self.slots.iter().map(|s| s.recv.load(SeqCst)).sum()
    }

    /// An error once a registered connection has ended before the run.
    fn all_alive(&self) -> Result<(), String> {
        match self.dead.load(SeqCst) {
            0 => Ok(()),
            dead => Err(format!("{dead} connections ended before the run started")),
        }
    }
}

/// At most `max` connection handshakes at once.
struct Gate {
    busy: std::sync::Mutex<usize>,
    cv: std::sync::Condvar,
    max: usize,
}

impl Gate {
    fn new(max: usize) -> Gate {
        Gate {
            busy: std::sync::Mutex::new(0),
            cv: std::sync::Condvar::new(),
            max: max.max(1),
        }
    }
    fn enter(&self) -> GateGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= self.max {
            busy = self.cv.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        GateGuard(self)
    }
}

struct GateGuard<'a>(&'a Gate);

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.cv.notify_one();
    }
}

/// What one connection hands back.
#[derive(Default)]
struct ConnStats {
    registered: bool,
    connect_ns: u64,
    errors: Tally,
    server_closes: Tally,
    server_errors: Tally,
    unique: u64,
    measured: u64,
    dups: u64,
    late: u64,
    foreign: u64,
    other_frames: u64,
    lat: Hist,
    echo: Hist,
    tracks: Vec<SeqTrack>,
    // As a sender:
    sent: u64,
    /// Own messages that came back (accepted and delivered to us).
    echoed: u64,
    sent_measured: u64,
    send_lag: Hist,
    closed_cleanly: bool,
}

/// What the measured phases found (absent when setup failed).
struct Measured {
    cpu: (Value, String),
    mem_after: MemMark,
    drain_s: f64,
}

/// Everything `report` needs besides the context.
struct Finished {
    stats: Vec<ConnStats>,
    errors: Tally,
    not_joined: usize,
    fatal: Option<String>,
    setup_s: f64,
    measured: Option<Measured>,
    mem_before: MemMark,
}

/// Runs the mode against `targets` (one per `--url`, at least one).
pub fn run(o: &Opts, targets: &[Target]) -> Outcome {
    let ctx = Arc::new(Ctx::new(o, targets));
    let mem_before = MemMark::now(o.server_pid);
    let t_setup = now_ns();
    let (handles, errors) = spawn_conns(&ctx);
    let setup_deadline = t_setup + ns(o.setup_timeout);
    let fatal = wait_registered(&ctx, t_setup, setup_deadline)
        .and_then(|()| probe(&ctx, setup_deadline))
        .err();
    let setup_s = secs_since(t_setup);
    let measured = fatal.is_none().then(|| measure(&ctx));
    let (stats, not_joined, errors) = close_and_join(&ctx, handles, errors);
    report(
        &ctx,
        Finished {
            stats,
            errors,
            not_joined,
            fatal,
            setup_s,
            measured,
            mem_before,
        },
    )
}

/// One thread per connection; a thread that cannot start counts as a failed connection.
fn spawn_conns(ctx: &Arc<Ctx>) -> (Vec<JoinHandle<ConnStats>>, Tally) {
    let mut errors = Tally::default();
    let mut handles = Vec::with_capacity(ctx.o.clients);
    for i in 0..ctx.o.clients {
        let c = ctx.clone();
        match thread::Builder::new()
            .name(format!("conn-{i}"))
            .stack_size(CONN_STACK)
            .spawn(move || conn_main(&c, i))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                errors.add(format!("spawn: {}", conn::io_kind(&e)));
                ctx.failed.fetch_add(1, SeqCst);
            }
        }
    }
    (handles, errors)
}

/// Phase 1: every connection up (and welcomed).
fn wait_registered(ctx: &Ctx, t_setup: u64, deadline: u64) -> Result<(), String> {
    let clients = ctx.o.clients;
    let mut next_note = t_setup + SEC;
    loop {
        let (reg, failed) = (ctx.registered.load(SeqCst), ctx.failed.load(SeqCst));
        if failed > 0 && reg + failed >= clients {
            return Err(format!("{failed} of {clients} connections failed"));
        }
        if reg >= clients {
            return Ok(());
        }
        ctx.all_alive()?;
        if now_ns() > deadline {
            return Err(format!(
                "only {reg} of {clients} connections registered within --setup-timeout"
            ));
        }
        if ctx.progress() && now_ns() >= next_note {
            eprintln!("[setup] {reg}/{clients} connections registered, {failed} failed");
            next_note += SEC;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Phase 2: probe until every connection has seen one.
fn probe(ctx: &Ctx, deadline: u64) -> Result<(), String> {
    ctx.phase.store(PROBE, SeqCst);
    let (mut round, mut next_round) = (0, 0);
    loop {
        if now_ns() >= next_round {
            round += 1;
            ctx.probe_round.store(round, SeqCst);
            next_round = now_ns() + SEC;
        }
        let seen = ctx
            .slots
            .iter()
            .filter(|s| s.probe.load(SeqCst) >= 1)
            .count();
        if seen == ctx.o.clients {
            return Ok(());
        }
        if now_ns() > deadline {
            return Err(format!(
                "only {seen} of {} connections received the probe",
                ctx.o.clients
            ));
        }
        ctx.all_alive()?;
        thread::sleep(Duration::from_millis(2));
    }
}

/// Phases 3 and 4: the run, then the drain.
fn measure(ctx: &Ctx) -> Measured {
    let start = now_ns() + 1_000_000;
    let warm_end = start + ns(ctx.o.warmup);
    let end = warm_end + ns(ctx.o.duration);
    ctx.run_start.store(start, SeqCst);
    ctx.warm_end.store(warm_end, SeqCst);
    ctx.end.store(end, SeqCst);
    ctx.phase.store(RUN, SeqCst);
    let cpu0 = watch_run(ctx, start, warm_end, end);
    let cpu1 = CpuMark::now(ctx.o.server_pid);
    let mem_after = MemMark::now(ctx.o.server_pid);
    ctx.phase.store(STOP, SeqCst);
    Measured {
        cpu: cpu_report(cpu0.unwrap_or(cpu1), cpu1),
        mem_after,
        drain_s: drain(ctx, end),
    }
}

/// Sleeps through the run, printing progress once a second; returns the CPU mark taken at the
/// end of the warm-up.
fn watch_run(ctx: &Ctx, start: u64, warm_end: u64, end: u64) -> Option<CpuMark> {
    let mut cpu0 = None;
    let mut next_tick = start + SEC;
    let mut last = (start, 0u64, 0u64);
    loop {
        let now = now_ns();
        if cpu0.is_none() && now >= warm_end {
            cpu0 = Some(CpuMark::now(ctx.o.server_pid));
        }
        if now >= end {
            return cpu0;
        }
        if now >= next_tick && ctx.progress() {
            last = print_progress(ctx, now, start, warm_end, last);
        }
        while next_tick <= now {
            next_tick += SEC;
        }
        let wake = [end, next_tick, if cpu0.is_none() { warm_end } else { end }];
        let wake = wake.into_iter().min().unwrap_or(end);
        sleep_until_ns(wake.min(now_ns() + 200_000_000));
    }
}

/// One progress line; returns the (time, sent, received) it was computed from.
fn print_progress(
    ctx: &Ctx,
    now: u64,
    start: u64,
    warm_end: u64,
    last: (u64, u64, u64),
) -> (u64, u64, u64) {
    let sent: u64 = ctx.senders.iter().map(|s| s.sent.load(Relaxed)).sum();
    let recv: u64 = ctx.slots.iter().map(|s| s.recv.load(Relaxed)).sum();
    let dt = (now - last.0) as f64 / 1e9;
    eprintln!(
        "[{:5.1}s] {:8} sent {:>12} ({:>9.0}/s)  delivered {:>14} ({:>11.0}/s)",
        (now - start) as f64 / 1e9,
        if now < warm_end { "warm-up" } else { "measure" },
        group(sent),
        (sent - last.1) as f64 / dt,
        group(recv),
        (recv - last.2) as f64 / dt,
    );
    (now, sent, recv)
}

/// Phase 4: senders finish, then wait until every connection has every accepted message, or
/// until nothing new has arrived for --drain seconds (hard cap: --drain + 30 s). Returns its
/// length in seconds.
fn drain(ctx: &Ctx, end: u64) -> f64 {
    let quiet_for = ns(ctx.o.drain);
    let hard_deadline = end + quiet_for + 30 * SEC;
    let (mut last_recv, mut last_change) = (u64::MAX, end);
    loop {
        let done = ctx.senders.iter().all(|s| s.done.load(SeqCst));
        let recv = ctx.received();
        let now = now_ns();
        let accepted = ctx.sent().saturating_sub(ctx.refused());
        if done && recv >= accepted * ctx.o.clients as u64 {
            break;
        }
        if recv != last_recv {
            (last_recv, last_change) = (recv, now);
        }
        if now >= hard_deadline || now >= last_change + quiet_for {
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    (now_ns() - end) as f64 / 1e9
}

/// Phase 5: close, then join the threads that finish in time.
fn close_and_join(
    ctx: &Ctx,
    handles: Vec<JoinHandle<ConnStats>>,
    mut errors: Tally,
) -> (Vec<ConnStats>, usize, Tally) {
    let close_deadline = now_ns() + 2 * SEC;
    ctx.close_deadline.store(close_deadline, SeqCst);
    ctx.phase.store(CLOSE, SeqCst);
    let join_deadline = close_deadline + ns(ctx.o.connect_timeout) + SEC;
    let (results, not_joined) = conn::join_finished(handles, join_deadline);
    let mut stats = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(s) => stats.push(s),
            Err(_) => errors.add("connection thread panicked"),
        }
    }
    (stats, not_joined, errors)
}

// ---------------------------------------------------------------------------------------------
// The report

/// The connections' figures, summed.
#[derive(Default)]
struct Totals {
    errors: Tally,
    server_closes: Tally,
    server_errors: Tally,
    lat: Hist,
    echo: Hist,
    lag: Hist,
    connect: Hist,
    unique: u64,
    measured: u64,
    dups: u64,
    late: u64,
    /// Messages some member should have received and did not, counted per member.
    lost: u64,
    /// Messages the server refused (they reach no member).
    refused: u64,
    /// Messages of senders the server closed that got neither echo nor refusal.
    unanswered: u64,
    foreign: u64,
    other: u64,
    sent: u64,
    sent_measured: u64,
    registered: u64,
    clean: u64,
}

impl Totals {
    fn sum(ctx: &Ctx, f: &Finished) -> Totals {
        let sent: Vec<u64> = ctx.senders.iter().map(|s| s.sent.load(SeqCst)).collect();
        let not_expected = ctx.not_expected();
        let refused = ctx.refused();
        let mut t = Totals {
            errors: f.errors.clone(),
            refused,
            unanswered: not_expected.iter().sum::<u64>() - refused,
            ..Totals::default()
        };
        for s in &f.stats {
            t.add(s, &sent, &not_expected);
        }
        t
    }

    fn add(&mut self, s: &ConnStats, sent: &[u64], not_expected: &[u64]) {
        self.errors.merge(&s.errors);
        self.server_closes.merge(&s.server_closes);
        self.server_errors.merge(&s.server_errors);
        self.lat.merge(&s.lat);
        self.echo.merge(&s.echo);
        self.lag.merge(&s.send_lag);
        if s.registered {
            self.registered += 1;
            self.connect.record(s.connect_ns);
            // A refused or unanswered message is missing at every member, and is not lost.
            let missing = s.tracks.iter().zip(sent).map(|(t, &n)| t.lost(n));
            let lost = missing.zip(not_expected).map(|(m, &r)| m.saturating_sub(r));
            self.lost += lost.sum::<u64>();
        }
        self.unique += s.unique;
        self.measured += s.measured;
        self.dups += s.dups;
        self.late += s.late;
        self.foreign += s.foreign;
        self.other += s.other_frames;
        self.sent += s.sent;
        self.sent_measured += s.sent_measured;
        self.clean += s.closed_cleanly as u64;
    }

    fn expected_measured(&self, ctx: &Ctx) -> u64 {
        self.sent_measured * ctx.o.clients as u64
    }

    fn ok(&self, ctx: &Ctx, f: &Finished) -> bool {
        f.fatal.is_none()
            && self.registered == ctx.o.clients as u64
            && self.lost + self.refused + self.unanswered + self.dups + self.late + self.foreign
                == 0
            && self.measured == self.expected_measured(ctx)
            && self.measured > 0
            && self.errors.total() + self.server_closes.total() + self.server_errors.total() == 0
            && f.not_joined == 0
    }

    /// The server limit that refused part of the load, if one did.
    fn limited_by(&self) -> Option<String> {
        limits::first(&[&self.errors, &self.server_closes, &self.server_errors])
    }
}

fn report(ctx: &Ctx, f: Finished) -> Outcome {
    let t = Totals::sum(ctx, &f);
    Outcome {
        ok: t.ok(ctx, &f),
        limited_by: t.limited_by(),
        json: report_json(ctx, &f, &t),
        lines: report_lines(ctx, &f, &t),
        fatal: f.fatal,
    }
}

fn report_json(ctx: &Ctx, f: &Finished, t: &Totals) -> serde_json::Map<String, Value> {
    let o = &ctx.o;
    let per_s = |n: u64| per_second(f, o, n);
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    let mut json = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        json.insert(k.to_string(), v);
    };
    put("clients", json!(o.clients));
    put("senders", json!(o.senders));
    match o.mode {
        Mode::Fanout => put("window", json!(o.window)),
        _ => put("rate", json!(o.rate)),
    }
    put("size", json!(o.size));
    put("warmup_s", json!(o.warmup));
    put("duration_s", json!(o.duration));
    put("room_url", json!(ctx.nodes[0].0));
    if ctx.nodes.len() > 1 {
        put(
            "node_urls",
            json!(ctx.nodes.iter().map(|n| &n.0).collect::<Vec<_>>()),
        );
    }
    put(
        "connections",
        json!({"wanted": o.clients, "registered": t.registered, "failed": ctx.failed.load(SeqCst),
               "setup_s": (f.setup_s * 1000.0).round() / 1000.0, "connect_us": t.connect.json_us(),
               "closed_cleanly": t.clean, "ended_early": ctx.dead.load(SeqCst),
               "threads_not_joined": f.not_joined}),
    );
    put(
        "sent",
        json!({"total": t.sent, "measured": t.sent_measured, "per_s": round1(per_s(t.sent_measured))}),
    );
    put(
        "deliveries",
        json!({"total": t.unique, "measured": t.measured, "expected_measured": t.expected_measured(ctx),
               "per_s": round1(per_s(t.measured))}),
    );
    put("lost", json!(t.lost));
    put("refused", json!(t.refused));
    put("unanswered", json!(t.unanswered));
    put("duplicated", json!(t.dups));
    put("order_violations", json!(t.late));
    put("foreign", json!(t.foreign));
    put("latency_us", t.lat.json_us());
    put("echo_latency_us", t.echo.json_us());
    if o.mode == Mode::Latency {
        put("send_lag_us", t.lag.json_us());
    }
    let m = f.measured.as_ref();
    let drain_s = m.map_or(0.0, |m| m.drain_s);
    put("drain_s", json!((drain_s * 1000.0).round() / 1000.0));
    put("errors", t.errors.json());
    put("server_closes", t.server_closes.json());
    put("server_errors", t.server_errors.json());
    put("other_frames", json!(t.other));
    put("cpu", m.map_or(Value::Null, |m| m.cpu.0.clone()));
    let after = m.map_or(f.mem_before, |m| m.mem_after);
    put(
        "memory",
        json!({"before": f.mem_before.json(), "after": after.json()}),
    );
    json
}

/// Per second of the measured time (0 when the run did not take place).
fn per_second(f: &Finished, o: &Opts, n: u64) -> f64 {
    if f.measured.is_some() {
        n as f64 / o.duration
    } else {
        0.0
    }
}

fn report_lines(ctx: &Ctx, f: &Finished, t: &Totals) -> Vec<String> {
    let o = &ctx.o;
    let what = match o.mode {
        Mode::Fanout => format!("window {} per sender", o.window),
        _ => format!("{} msg/s in total", o.rate),
    };
    let handshake = if t.connect.count() > 0 {
        let (p50, max) = (t.connect.quantile(0.5), t.connect.max());
        format!("p50 {} max {}", fmt_ns(p50), fmt_ns(max))
    } else {
        "-".into()
    };
    let mut lines = vec![
        format!(
            "room          {} connections, {} sending ({what}), {} B messages",
            o.clients, o.senders, o.size
        ),
        format!(
            "connections   {}/{} registered in {:.2}s (handshake {handshake})",
            t.registered, o.clients, f.setup_s
        ),
    ];
    if let Some(m) = &f.measured {
        lines.extend(measured_lines(ctx, f, t, m));
    }
    lines.push(format!("errors        {}", t.errors.human()));
    if t.server_closes.total() > 0 {
        lines.push(format!("server closed {}", t.server_closes.human()));
    }
    if t.server_errors.total() > 0 {
        lines.push(format!("server errors {}", t.server_errors.human()));
    }
    if f.not_joined > 0 {
        lines.push(format!(
            "WARNING       {} connection threads did not finish in time",
            f.not_joined
        ));
    }
    lines
}

fn measured_lines(ctx: &Ctx, f: &Finished, t: &Totals, m: &Measured) -> Vec<String> {
    let o = &ctx.o;
    let per_s = |n: u64| per_second(f, o, n);
    let mut integrity = format!(
        "integrity     lost {}   refused {}   unanswered {}   duplicated {}   out of order {}",
        t.lost, t.refused, t.unanswered, t.dups, t.late
    );
    if t.foreign > 0 {
        integrity += &format!("   foreign {}", t.foreign);
    }
    let mut lines = vec![
        format!(
            "measured      {:.2}s after {:.2}s warm-up; drain took {:.3}s",
            o.duration, o.warmup, m.drain_s
        ),
        format!(
            "sent          {} msgs measured ({:.1} msg/s), {} in all",
            group(t.sent_measured),
            per_s(t.sent_measured),
            group(t.sent)
        ),
        format!(
            "deliveries    {} measured ({:.1}/s); expected {} = {} msgs x {} receivers",
            group(t.measured),
            per_s(t.measured),
            group(t.expected_measured(ctx)),
            group(t.sent_measured),
            o.clients
        ),
        integrity,
        format!("latency       {}  (send -> each member)", t.lat.human()),
        format!("  own echo    {}", t.echo.human()),
    ];
    if o.mode == Mode::Latency {
        lines.push(format!("  send lag    {}", t.lag.human()));
    }
    lines.push(format!("cpu           {}", m.cpu.1));
    lines.push(format!(
        "closing       {} of {} with a closing handshake (close frame answered)",
        t.clean, t.registered
    ));
    lines
}

// ---------------------------------------------------------------------------------------------
// One connection

/// A sending connection's side: fanout keeps a window of messages in flight, latency hands the
/// sending to a writer thread.
struct Sending {
    /// The sender's index (its messages carry it).
    s: usize,
    inflight: usize,
    seq: u64,
    /// Still to start (latency) or to go on (fanout) sending.
    active: bool,
    writer: Option<JoinHandle<ConnStats>>,
}

/// The connection ended before the close phase (closed by the server, or an error).
struct Aborted;

fn conn_main(ctx: &Arc<Ctx>, i: usize) -> ConnStats {
    let mut st = ConnStats {
        tracks: vec![SeqTrack::default(); ctx.o.senders],
        ..Default::default()
    };
    let mut sending = (i < ctx.o.senders).then_some(Sending {
        s: i,
        inflight: 0,
        seq: 0,
        active: true,
        writer: None,
    });
    let Some(mut ws) = connect(ctx, i, &mut st) else {
        if let Some(snd) = &sending {
            ctx.senders[snd.s].done.store(true, SeqCst);
        }
        return st;
    };
    let aborted = conn_loop(ctx, i, &mut ws, &mut sending, &mut st).is_err();
    if aborted {
        ctx.dead.fetch_add(1, SeqCst);
    }
    if let Some(snd) = sending {
        let s = snd.s;
        finish_sending(ctx, snd, &mut st);
        if aborted {
            let slot = &ctx.senders[s];
            let answered = slot.refused.load(SeqCst) + st.echoed;
            let unanswered = slot.sent.load(SeqCst).saturating_sub(answered);
            slot.unanswered.store(unanswered, SeqCst);
        }
    }
    if !aborted {
        st.closed_cleanly = conn::close(&mut ws, ctx.close_deadline.load(SeqCst));
    }
    st
}

/// Opens the connection (within the handshake gate) and waits for the welcome; counts it as
/// registered or failed.
fn connect(ctx: &Ctx, i: usize, st: &mut ConnStats) -> Option<Ws> {
    let (t0, opened) = {
        let _permit = ctx.gate.enter();
        let t0 = now_ns();
        let opts = ConnOpts {
            timeout: ctx.o.connect_timeout(),
            read_buf: 8 * 1024,
        };
        let (url, target) = ctx.node(i);
        let opened = conn::open(url, target, opts).and_then(|mut ws| {
            match ctx.o.envelope() {
                Envelope::Bare => {}
                Envelope::Json => wait_welcome(&mut ws)?,
                Envelope::SocketIo => conn::socketio_connect(&mut ws)?,
            }
            Ok(ws)
        });
        (t0, opened)
    };
    let ws = match opened {
        Ok(ws) => ws,
        Err(kind) => {
            st.errors.add(kind);
            ctx.failed.fetch_add(1, SeqCst);
            return None;
        }
    };
    st.connect_ns = now_ns() - t0;
    st.registered = true;
    ctx.registered.fetch_add(1, SeqCst);
    // Senders look at the clock more often: their window refills as echoes land.
    let poll_ms = if i < ctx.o.senders { 20 } else { 100 };
    let _ = ws
        .get_ref()
        .tcp
        .set_read_timeout(Some(Duration::from_millis(poll_ms)));
    Some(ws)
}

/// Reads (and, for a sender, sends) until the close phase.
fn conn_loop(
    ctx: &Arc<Ctx>,
    i: usize,
    ws: &mut Ws,
    sending: &mut Option<Sending>,
    st: &mut ConnStats,
) -> Result<(), Aborted> {
    let mut probe_sent = 0;
    loop {
        let phase = ctx.phase.load(Acquire);
        if phase >= CLOSE {
            return Ok(());
        }
        if phase == PROBE && i == 0 {
            send_probe(ctx, ws, &mut probe_sent, st)?;
        }
        if phase >= RUN
            && let Some(snd) = sending.as_mut()
            && snd.active
        {
            send(ctx, ws, snd, st)?;
        }
        read_one(ctx, i, ws, sending.as_mut(), st)?;
    }
}

fn send_probe(ctx: &Ctx, ws: &mut Ws, sent: &mut u32, st: &mut ConnStats) -> Result<(), Aborted> {
    let round = ctx.probe_round.load(Acquire);
    if round <= *sent {
        return Ok(());
    }
    *sent = round;
    ws.write(Message::text(ctx.wire.probe(round)))
        .map_err(|e| conn::ws_kind(&e))
        .and_then(|_| ws.get_mut().push().map_err(|e| conn::io_kind(&e)))
        .map_err(|e| {
            st.errors.add(format!("write: {e}"));
            Aborted
        })
}

fn send(ctx: &Arc<Ctx>, ws: &mut Ws, snd: &mut Sending, st: &mut ConnStats) -> Result<(), Aborted> {
    if ctx.o.mode != Mode::Latency {
        return fill_window(ctx, ws, snd, st);
    }
    snd.active = false;
    match spawn_writer(ctx, ws, snd.s) {
        Ok(h) => snd.writer = Some(h),
        Err(e) => {
            st.errors.add(e);
            ctx.senders[snd.s].done.store(true, SeqCst);
        }
    }
    Ok(())
}

/// Fanout: sends until --window messages are in flight (or the run is over).
fn fill_window(
    ctx: &Ctx,
    ws: &mut Ws,
    snd: &mut Sending,
    st: &mut ConnStats,
) -> Result<(), Aborted> {
    let (warm_end, end) = (ctx.warm_end.load(Relaxed), ctx.end.load(Relaxed));
    let mut failed = false;
    while snd.inflight < ctx.o.window {
        let ts = now_ns();
        if ts >= end {
            break;
        }
        let text = ctx.wire.message(snd.s as u32, snd.seq, ts);
        if let Err(e) = ws.write(Message::text(text)) {
            st.errors.add(format!("write: {}", conn::ws_kind(&e)));
            failed = true;
            break;
        }
        snd.seq += 1;
        snd.inflight += 1;
        st.sent += 1;
        st.sent_measured += (ts >= warm_end) as u64;
    }
    let slot = &ctx.senders[snd.s];
    slot.sent.store(snd.seq, Release);
    if failed || now_ns() >= end {
        snd.active = false;
        if ws.get_mut().push().is_err() && !failed {
            st.errors.add("write: failed");
        }
        slot.done.store(true, SeqCst);
    }
    if failed { Err(Aborted) } else { Ok(()) }
}

/// Reads one frame (or times out); a frame that lands (or refuses) one of ours frees a slot of
/// the sender's window.
fn read_one(
    ctx: &Ctx,
    i: usize,
    ws: &mut Ws,
    sending: Option<&mut Sending>,
    st: &mut ConnStats,
) -> Result<(), Aborted> {
    match ws.read() {
        Ok(Message::Text(t)) => {
            let sender = sending.as_ref().map(|snd| snd.s);
            if on_text(ctx, i, sender, st, t.as_str())
                && let Some(snd) = sending
            {
                snd.inflight = snd.inflight.saturating_sub(1);
            }
            Ok(())
        }
        Ok(Message::Close(frame)) => {
            st.server_closes.add(conn::close_kind(&frame));
            Err(Aborted)
        }
        Ok(_) => Ok(()),
        Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => {
            st.errors.add(format!("read: {}", conn::ws_kind(&e)));
            Err(Aborted)
        }
    }
}

/// Marks the sender done and adds its writer thread's figures (latency).
fn finish_sending(ctx: &Ctx, snd: Sending, st: &mut ConnStats) {
    if ctx.o.mode == Mode::Fanout {
        ctx.senders[snd.s].sent.store(snd.seq, SeqCst);
        ctx.senders[snd.s].done.store(true, SeqCst);
    }
    if let Some(h) = snd.writer {
        match h.join() {
            Ok(w) => {
                st.sent += w.sent;
                st.sent_measured += w.sent_measured;
                st.send_lag.merge(&w.send_lag);
                st.errors.merge(&w.errors);
            }
            Err(_) => st.errors.add("writer thread panicked"),
        }
    }
}

/// Reads until the first frame, which must be wschat's `welcome`.
fn wait_welcome(ws: &mut Ws) -> Result<(), String> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) if conn::is_welcome(t.as_str()) => return Ok(()),
            Ok(Message::Text(t)) => {
                let s = t.as_str();
                return Err(format!("welcome: got {}", &s[..s.floor_char_boundary(60)]));
            }
            Ok(Message::Close(f)) => {
                return Err(format!("welcome: closed {}", conn::close_kind(&f)));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("welcome: {}", conn::ws_kind(&e))),
        }
    }
}

/// Accounts for one received text frame. Returns true when it is one of this sender's own
/// messages landing (or being refused), which frees a slot of its window.
fn on_text(ctx: &Ctx, i: usize, sender: Option<usize>, st: &mut ConnStats, text: &str) -> bool {
    match ctx.wire.parse(text) {
        Frame::Msg {
            sender: from,
            seq,
            ts,
        } => on_message(ctx, i, sender, st, (from as usize, seq, ts)),
        Frame::Probe(n) => {
            ctx.slots[i].probe.fetch_max(n, SeqCst);
            false
        }
        Frame::Other => {
            st.other_frames += 1;
            let Some(code) = conn::error_code(text) else {
                return false;
            };
            // A refused message of ours will never land: free its window slot.
            let refused = code == limits::RATE_LIMITED;
            if let (Some(s), true) = (sender, refused) {
                ctx.senders[s].refused.fetch_add(1, SeqCst);
            }
            st.server_errors.add(code);
            refused && sender.is_some()
        }
    }
}

/// One of the run's messages, `(sender, seq, send time)`: counted once, timed if measured.
fn on_message(
    ctx: &Ctx,
    i: usize,
    sender: Option<usize>,
    st: &mut ConnStats,
    (from, seq, ts): (usize, u64, u64),
) -> bool {
    let now = now_ns();
    let Some(track) = st.tracks.get_mut(from) else {
        st.foreign += 1;
        return false;
    };
    let seen = track.see(seq);
    if seen == Seen::Duplicate {
        st.dups += 1;
        return false;
    }
    st.late += (seen == Seen::Late) as u64;
    st.unique += 1;
    ctx.slots[i].recv.store(st.unique, Relaxed);
    let own = sender == Some(from);
    st.echoed += own as u64;
    if ts >= ctx.warm_end.load(Relaxed) && ts < ctx.end.load(Relaxed) {
        st.measured += 1;
        let l = now.saturating_sub(ts);
        st.lat.record(l);
        if own {
            st.echo.record(l);
        }
    }
    own
}

/// Latency mode: a thread that writes this sender's messages on a clone of the socket at
/// exactly the scheduled times, while the connection thread keeps reading.
fn spawn_writer(ctx: &Arc<Ctx>, ws: &mut Ws, s: usize) -> Result<JoinHandle<ConnStats>, String> {
    let writer = ws
        .get_ref()
        .writer()
        .map_err(|e| format!("clone: {}", conn::io_kind(&e)))?;
    // Sending the bytes tungstenite has queued (pongs) first keeps the stream in order.
    ws.get_mut()
        .push()
        .map_err(|e| format!("write: {}", conn::io_kind(&e)))?;
    let wire = ctx.wire.clone();
    let senders = ctx.o.senders as f64;
    let interval = senders * 1e9 / ctx.o.rate;
    let offset = interval * s as f64 / senders;
    let (start, warm_end, end) = (
        ctx.run_start.load(SeqCst),
        ctx.warm_end.load(SeqCst),
        ctx.end.load(SeqCst),
    );
    let ctx = ctx.clone();
    thread::Builder::new()
        .name(format!("writer-{s}"))
        .stack_size(CONN_STACK)
        .spawn(move || {
            let slot = &ctx.senders[s];
            let mut writer = writer;
            let mut st = ConnStats::default();
            let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((s as u64 + 1) << 32) ^ start);
            let mut buf = Vec::with_capacity(4096);
            let due = |k: u64| start + (offset + k as f64 * interval) as u64;
            let mut k = 0u64;
            while due(k) < end {
                sleep_until_ns(due(k));
                let now = now_ns();
                buf.clear();
                let first = k;
                while due(k) <= now && due(k) < end {
                    // Stamped with the actual send time; lateness against the schedule (the
                    // tool's or a blocked write's) is reported apart as send lag.
                    let text = wire.message(s as u32, k, now);
                    let m = rng.next().to_le_bytes();
                    conn::encode_text_frame(&mut buf, text.as_bytes(), [m[0], m[1], m[2], m[3]]);
                    k += 1;
                }
                let res = writer.write_all(&buf);
                if let Err(e) = res {
                    // Part of the batch may have gone out; count none of it as sent.
                    st.errors.add(format!("write: {}", conn::io_kind(&e)));
                    break;
                }
                for j in first..k {
                    st.send_lag.record(now.saturating_sub(due(j)));
                    st.sent_measured += (now >= warm_end && now < end) as u64;
                }
                st.sent = k;
                slot.sent.store(k, Release);
            }
            slot.done.store(true, SeqCst);
            st
        })
        .map_err(|e| format!("spawn: {}", conn::io_kind(&e)))
}
