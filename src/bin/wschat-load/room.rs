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
//!    has received every message sent.
//! 5. CLOSE: every connection sends a close frame and waits (bounded) for the server's.
//!
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
use crate::cli::{Mode, Opts};
use crate::conn::{self, ConnOpts, Frame, Target, Wire, Ws, XorShift, now_ns, sleep_until_ns};
use crate::stats::{Hist, Seen, SeqTrack, Tally, group};
use crate::sysinfo::{CpuMark, MemMark, cpu_report};

const SETUP: u32 = 0;
const PROBE: u32 = 1;
const RUN: u32 = 2;
const STOP: u32 = 3;
const CLOSE: u32 = 4;

pub const CONN_STACK: usize = 128 * 1024;
const SEC: u64 = 1_000_000_000;

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
    done: AtomicBool,
}

struct Ctx {
    o: Opts,
    wire: Wire,
    url: String,
    target: Target,
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
    sent_measured: u64,
    send_lag: Hist,
    closed_cleanly: bool,
}

pub fn run(o: &Opts, target: &Target) -> Outcome {
    let token = conn::run_token();
    let room = o.room.clone().unwrap_or_else(|| format!("wsload-{token}"));
    let url = if o.raw {
        target.base.clone()
    } else {
        target.url_for_room(Some(&room))
    };
    let ctx = Arc::new(Ctx {
        o: o.clone(),
        wire: Wire::new(&token, !o.raw, o.size),
        url: url.clone(),
        target: target.clone(),
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
    });
    let progress = !o.quiet && o.warmup + o.duration > 3.0;
    let mem_before = MemMark::now(o.server_pid);
    let t_setup = now_ns();

    let mut spawn_errors = Tally::default();
    let mut handles: Vec<Option<JoinHandle<ConnStats>>> = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        let c = ctx.clone();
        match thread::Builder::new()
            .name(format!("conn-{i}"))
            .stack_size(CONN_STACK)
            .spawn(move || conn_main(&c, i))
        {
            Ok(h) => handles.push(Some(h)),
            Err(e) => {
                spawn_errors.add(format!("spawn: {}", conn::io_kind(&e)));
                ctx.failed.fetch_add(1, SeqCst);
                handles.push(None);
            }
        }
    }

    // 1. Every connection up (and welcomed).
    let setup_deadline = t_setup + (o.setup_timeout * 1e9) as u64;
    let mut next_note = t_setup + SEC;
    let mut fatal = None;
    loop {
        let (reg, failed) = (ctx.registered.load(SeqCst), ctx.failed.load(SeqCst));
        if failed > 0 && reg + failed >= o.clients {
            fatal = Some(format!("{failed} of {} connections failed", o.clients));
            break;
        }
        if reg >= o.clients {
            break;
        }
        let dead = ctx.dead.load(SeqCst);
        if dead > 0 {
            fatal = Some(format!("{dead} connections ended before the run started"));
            break;
        }
        if now_ns() > setup_deadline {
            fatal = Some(format!(
                "only {reg} of {} connections registered within --setup-timeout",
                o.clients
            ));
            break;
        }
        if progress && now_ns() >= next_note {
            eprintln!(
                "[setup] {reg}/{} connections registered, {failed} failed",
                o.clients
            );
            next_note += SEC;
        }
        thread::sleep(Duration::from_millis(5));
    }

    // 2. Probe until every connection has seen one.
    if fatal.is_none() {
        ctx.phase.store(PROBE, SeqCst);
        let mut round = 0;
        let mut next_round = 0;
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
            if seen == o.clients {
                break;
            }
            if now_ns() > setup_deadline {
                fatal = Some(format!(
                    "only {seen} of {} connections received the probe",
                    o.clients
                ));
                break;
            }
            let dead = ctx.dead.load(SeqCst);
            if dead > 0 {
                fatal = Some(format!("{dead} connections ended before the run started"));
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
    let setup_s = (now_ns() - t_setup) as f64 / 1e9;

    // 3. Run.
    let mut cpu = None;
    let mut drain_s = 0.0;
    let mut mem_after = mem_before;
    if fatal.is_none() {
        let start = now_ns() + 1_000_000;
        let warm_end = start + (o.warmup * 1e9) as u64;
        let end = warm_end + (o.duration * 1e9) as u64;
        ctx.run_start.store(start, SeqCst);
        ctx.warm_end.store(warm_end, SeqCst);
        ctx.end.store(end, SeqCst);
        ctx.phase.store(RUN, SeqCst);
        let mut cpu0 = None;
        let mut next_tick = start + SEC;
        let mut last = (start, 0u64, 0u64);
        loop {
            let now = now_ns();
            if cpu0.is_none() && now >= warm_end {
                cpu0 = Some(CpuMark::now(o.server_pid));
            }
            if now >= end {
                break;
            }
            if now >= next_tick && progress {
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
                last = (now, sent, recv);
            }
            while next_tick <= now {
                next_tick += SEC;
            }
            let wake = [end, next_tick, if cpu0.is_none() { warm_end } else { end }]
                .into_iter()
                .min()
                .unwrap();
            sleep_until_ns(wake.min(now_ns() + 200_000_000));
        }
        let cpu1 = CpuMark::now(o.server_pid);
        mem_after = MemMark::now(o.server_pid);
        cpu = Some(cpu_report(cpu0.unwrap_or(cpu1), cpu1));

        // 4. Drain: senders finish, then wait until every connection has everything, or until
        //    nothing new has arrived for --drain seconds (hard cap: --drain + 30 s).
        ctx.phase.store(STOP, SeqCst);
        let quiet_for = (o.drain * 1e9) as u64;
        let hard_deadline = end + quiet_for + 30 * SEC;
        let (mut last_recv, mut last_change) = (u64::MAX, end);
        loop {
            let done = ctx.senders.iter().all(|s| s.done.load(SeqCst));
            let recv: u64 = ctx.slots.iter().map(|s| s.recv.load(SeqCst)).sum();
            let now = now_ns();
            if done {
                let sent: u64 = ctx.senders.iter().map(|s| s.sent.load(SeqCst)).sum();
                if recv >= sent * o.clients as u64 {
                    break;
                }
            }
            if recv != last_recv {
                (last_recv, last_change) = (recv, now);
            }
            if now >= hard_deadline || now >= last_change + quiet_for {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        drain_s = (now_ns() - end) as f64 / 1e9;
    }

    // 5. Close, join (bounded).
    let close_deadline = now_ns() + 2 * SEC;
    ctx.close_deadline.store(close_deadline, SeqCst);
    ctx.phase.store(CLOSE, SeqCst);
    let join_deadline = close_deadline + (o.connect_timeout * 1e9) as u64 + SEC;
    let mut stats = Vec::with_capacity(o.clients);
    let mut not_joined = 0;
    while now_ns() < join_deadline
        && handles
            .iter()
            .any(|h| h.as_ref().is_some_and(|h| !h.is_finished()))
    {
        thread::sleep(Duration::from_millis(5));
    }
    for h in handles.iter_mut() {
        match h.take() {
            Some(h) if h.is_finished() => match h.join() {
                Ok(s) => stats.push(s),
                Err(_) => spawn_errors.add("connection thread panicked"),
            },
            Some(_) => not_joined += 1,
            None => {}
        }
    }

    report(
        &ctx,
        o,
        stats,
        spawn_errors,
        not_joined,
        fatal,
        setup_s,
        drain_s,
        cpu,
        mem_before,
        mem_after,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    ctx: &Ctx,
    o: &Opts,
    stats: Vec<ConnStats>,
    mut errors: Tally,
    not_joined: usize,
    fatal: Option<String>,
    setup_s: f64,
    drain_s: f64,
    cpu: Option<(Value, String)>,
    mem_before: MemMark,
    mem_after: MemMark,
) -> Outcome {
    let sent_final: Vec<u64> = ctx.senders.iter().map(|s| s.sent.load(SeqCst)).collect();
    let mut server_closes = Tally::default();
    let mut server_errors = Tally::default();
    let (mut lat, mut echo, mut lag, mut connect) = (
        Hist::default(),
        Hist::default(),
        Hist::default(),
        Hist::default(),
    );
    let (mut unique, mut measured, mut dups, mut late, mut lost, mut foreign, mut other) =
        (0, 0, 0, 0, 0, 0, 0);
    let (mut sent, mut sent_measured, mut registered, mut clean) = (0u64, 0u64, 0u64, 0u64);
    for s in &stats {
        errors.merge(&s.errors);
        server_closes.merge(&s.server_closes);
        server_errors.merge(&s.server_errors);
        lat.merge(&s.lat);
        echo.merge(&s.echo);
        lag.merge(&s.send_lag);
        if s.registered {
            registered += 1;
            connect.record(s.connect_ns);
            lost += s
                .tracks
                .iter()
                .zip(&sent_final)
                .map(|(t, &n)| t.lost(n))
                .sum::<u64>();
        }
        unique += s.unique;
        measured += s.measured;
        dups += s.dups;
        late += s.late;
        foreign += s.foreign;
        other += s.other_frames;
        sent += s.sent;
        sent_measured += s.sent_measured;
        clean += s.closed_cleanly as u64;
    }
    let receivers = o.clients as u64;
    let expected_measured = sent_measured * receivers;
    let ran = fatal.is_none();
    let ok = ran
        && registered == receivers
        && lost == 0
        && dups == 0
        && late == 0
        && foreign == 0
        && measured == expected_measured
        && measured > 0
        && errors.total() == 0
        && server_closes.total() == 0
        && server_errors.total() == 0
        && not_joined == 0;
    let per_s = |n: u64| if ran { n as f64 / o.duration } else { 0.0 };
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
    put("room_url", json!(ctx.url));
    put(
        "connections",
        json!({"wanted": o.clients, "registered": registered, "failed": ctx.failed.load(SeqCst),
               "setup_s": (setup_s * 1000.0).round() / 1000.0, "connect_us": connect.json_us(),
               "closed_cleanly": clean, "ended_early": ctx.dead.load(SeqCst),
               "threads_not_joined": not_joined}),
    );
    put(
        "sent",
        json!({"total": sent, "measured": sent_measured, "per_s": round1(per_s(sent_measured))}),
    );
    put(
        "deliveries",
        json!({"total": unique, "measured": measured, "expected_measured": expected_measured,
               "per_s": round1(per_s(measured))}),
    );
    put("lost", json!(lost));
    put("duplicated", json!(dups));
    put("order_violations", json!(late));
    put("foreign", json!(foreign));
    put("latency_us", lat.json_us());
    put("echo_latency_us", echo.json_us());
    if o.mode == Mode::Latency {
        put("send_lag_us", lag.json_us());
    }
    put("drain_s", json!((drain_s * 1000.0).round() / 1000.0));
    put("errors", errors.json());
    put("server_closes", server_closes.json());
    put("server_errors", server_errors.json());
    put("other_frames", json!(other));
    put(
        "cpu",
        cpu.as_ref().map(|c| c.0.clone()).unwrap_or(Value::Null),
    );
    put(
        "memory",
        json!({"before": mem_before.json(), "after": mem_after.json()}),
    );

    let mut lines = vec![];
    let what = match o.mode {
        Mode::Fanout => format!("window {} per sender", o.window),
        _ => format!("{} msg/s in total", o.rate),
    };
    lines.push(format!(
        "room          {} connections, {} sending ({what}), {} B messages",
        o.clients, o.senders, o.size
    ));
    lines.push(format!(
        "connections   {registered}/{} registered in {setup_s:.2}s (handshake {})",
        o.clients,
        if connect.count() > 0 {
            format!(
                "p50 {} max {}",
                crate::stats::fmt_ns(connect.quantile(0.5)),
                crate::stats::fmt_ns(connect.max())
            )
        } else {
            "-".into()
        }
    ));
    if ran {
        lines.push(format!(
            "measured      {:.2}s after {:.2}s warm-up; drain took {drain_s:.3}s",
            o.duration, o.warmup
        ));
        lines.push(format!(
            "sent          {} msgs measured ({:.1} msg/s), {} in all",
            group(sent_measured),
            per_s(sent_measured),
            group(sent)
        ));
        lines.push(format!(
            "deliveries    {} measured ({:.1}/s); expected {} = {} msgs x {} receivers",
            group(measured),
            per_s(measured),
            group(expected_measured),
            group(sent_measured),
            receivers
        ));
        lines.push(format!(
            "integrity     lost {lost}   duplicated {dups}   out of order {late}{}",
            if foreign > 0 {
                format!("   foreign {foreign}")
            } else {
                String::new()
            }
        ));
        lines.push(format!(
            "latency       {}  (send -> each member)",
            lat.human()
        ));
        lines.push(format!("  own echo    {}", echo.human()));
        if o.mode == Mode::Latency {
            lines.push(format!("  send lag    {}", lag.human()));
        }
        if let Some((_, h)) = &cpu {
            lines.push(format!("cpu           {h}"));
        }
    }
    if ran {
        lines.push(format!(
            "closing       {clean} of {registered} with a closing handshake (close frame answered)"
        ));
    }
    lines.push(format!("errors        {}", errors.human()));
    if server_closes.total() > 0 {
        lines.push(format!("server closed {}", server_closes.human()));
    }
    if server_errors.total() > 0 {
        lines.push(format!("server errors {}", server_errors.human()));
    }
    if not_joined > 0 {
        lines.push(format!(
            "WARNING       {not_joined} connection threads did not finish in time"
        ));
    }
    Outcome {
        ok,
        fatal,
        json,
        lines,
    }
}

// ---------------------------------------------------------------------------------------------
// One connection

fn conn_main(ctx: &Arc<Ctx>, i: usize) -> ConnStats {
    let mut st = ConnStats {
        tracks: vec![SeqTrack::default(); ctx.o.senders],
        ..Default::default()
    };
    let sender = (i < ctx.o.senders).then_some(i);
    let (t0, opened) = {
        let _permit = ctx.gate.enter();
        let t0 = now_ns();
        let opened = conn::open(
            &ctx.url,
            ctx.target.addr,
            ConnOpts {
                timeout: ctx.o.connect_timeout(),
                read_buf: 8 * 1024,
            },
        )
        .and_then(|mut ws| {
            if ctx.o.raw {
                Ok(ws)
            } else {
                wait_welcome(&mut ws).map(|_| ws)
            }
        });
        (t0, opened)
    };
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(kind) => {
            st.errors.add(kind);
            ctx.failed.fetch_add(1, SeqCst);
            if let Some(s) = sender {
                ctx.senders[s].done.store(true, SeqCst);
            }
            return st;
        }
    };
    st.connect_ns = now_ns() - t0;
    st.registered = true;
    ctx.registered.fetch_add(1, SeqCst);
    let timeout = if sender.is_some() { 20 } else { 100 };
    let _ = ws
        .get_mut()
        .tcp
        .set_read_timeout(Some(Duration::from_millis(timeout)));

    let mut writer: Option<JoinHandle<ConnStats>> = None;
    let mut probe_sent = 0;
    let (mut inflight, mut seq, mut sending) = (0usize, 0u64, sender.is_some());
    let mut aborted = false;
    loop {
        let phase = ctx.phase.load(Acquire);
        if phase >= CLOSE {
            break;
        }
        if phase == PROBE && i == 0 {
            let round = ctx.probe_round.load(Acquire);
            if round > probe_sent {
                probe_sent = round;
                if let Err(e) = ws
                    .write(Message::text(ctx.wire.probe(round)))
                    .map_err(|e| conn::ws_kind(&e))
                    .and_then(|_| ws.get_mut().push().map_err(|e| conn::io_kind(&e)))
                {
                    st.errors.add(format!("write: {e}"));
                    aborted = true;
                    break;
                }
            }
        }
        if let (Some(s), true, true) = (sender, sending, phase >= RUN) {
            match ctx.o.mode {
                Mode::Latency => {
                    sending = false;
                    match spawn_writer(ctx, &mut ws, s) {
                        Ok(h) => writer = Some(h),
                        Err(e) => {
                            st.errors.add(e);
                            ctx.senders[s].done.store(true, SeqCst);
                        }
                    }
                }
                _ => {
                    let (warm_end, end) = (ctx.warm_end.load(Relaxed), ctx.end.load(Relaxed));
                    let mut failed = false;
                    while inflight < ctx.o.window {
                        let ts = now_ns();
                        if ts >= end {
                            break;
                        }
                        if let Err(e) = ws.write(Message::text(ctx.wire.message(s as u32, seq, ts)))
                        {
                            st.errors.add(format!("write: {}", conn::ws_kind(&e)));
                            failed = true;
                            break;
                        }
                        seq += 1;
                        inflight += 1;
                        st.sent += 1;
                        st.sent_measured += (ts >= warm_end) as u64;
                    }
                    ctx.senders[s].sent.store(seq, Release);
                    if failed || now_ns() >= end {
                        sending = false;
                        if ws.get_mut().push().is_err() && !failed {
                            st.errors.add("write: failed");
                        }
                        ctx.senders[s].done.store(true, SeqCst);
                        if failed {
                            aborted = true;
                            break;
                        }
                    }
                }
            }
        }
        match ws.read() {
            Ok(Message::Text(t)) => {
                let own_landed = on_text(ctx, i, sender, &mut st, t.as_str());
                if own_landed {
                    inflight = inflight.saturating_sub(1);
                }
            }
            Ok(Message::Close(frame)) => {
                st.server_closes.add(conn::close_kind(&frame));
                aborted = true;
                break;
            }
            Ok(_) => {}
            Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                st.errors.add(format!("read: {}", conn::ws_kind(&e)));
                aborted = true;
                break;
            }
        }
    }
    if aborted {
        ctx.dead.fetch_add(1, SeqCst);
    }
    if let Some(s) = sender
        && ctx.o.mode == Mode::Fanout
    {
        ctx.senders[s].sent.store(seq, SeqCst);
        ctx.senders[s].done.store(true, SeqCst);
    }
    if let Some(h) = writer {
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
    if !aborted {
        st.closed_cleanly = conn::close(&mut ws, ctx.close_deadline.load(SeqCst));
    }
    st
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
        } => {
            let now = now_ns();
            let Some(track) = st.tracks.get_mut(from as usize) else {
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
            let own = sender == Some(from as usize);
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
        Frame::Probe(n) => {
            ctx.slots[i].probe.fetch_max(n, SeqCst);
            false
        }
        Frame::Other => {
            st.other_frames += 1;
            match conn::error_code(text) {
                Some(code) => {
                    // A refused message of ours will never land: free its window slot.
                    let refused = sender.is_some() && code == "rate_limited";
                    st.server_errors.add(code);
                    refused
                }
                None => false,
            }
        }
    }
}

/// Latency mode: a thread that writes this sender's messages on a clone of the socket at
/// exactly the scheduled times, while the connection thread keeps reading.
fn spawn_writer(ctx: &Arc<Ctx>, ws: &mut Ws, s: usize) -> Result<JoinHandle<ConnStats>, String> {
    let tcp = ws
        .get_ref()
        .tcp
        .try_clone()
        .map_err(|e| format!("clone: {}", conn::io_kind(&e)))?;
    let lock = ws.get_ref().wlock.clone();
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
            let mut tcp = tcp;
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
                let res = {
                    let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                    io::Write::write_all(&mut tcp, &buf)
                };
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
