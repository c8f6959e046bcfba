//! `idle`: open N connections, hold them, close them.
//!
//! --concurrency threads each open their share of the connections one after another (blocking
//! connect + handshake + welcome), then switch the sockets to non-blocking mode and keep them.
//! Every 500 ms each thread sweeps its sockets with non-blocking reads until they would block:
//! that answers the server's pings (tungstenite queues the pong, `push` sends it), drains the
//! presence events other members cause, and notices connections the server dropped. So a
//! connection costs the tool one socket and a small read buffer, no thread: the machine's
//! KernelStack growth while connections are held is the server's (one kernel stack per thread).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::error::Error as WsError;

use crate::cli::Opts;
use crate::conn::{self, ConnOpts, Target, Ws, now_ns};
use crate::stats::{Hist, Tally, fmt_ns, group};
use crate::sysinfo::{CpuMark, MemMark, cpu_report};
use crate::{Outcome, limits};

const READY: u32 = 0;
const OPEN: u32 = 1;
const HOLD: u32 = 2;
const CLOSE: u32 = 3;
const SEC: u64 = 1_000_000_000;
const SWEEP_NS: u64 = 500_000_000;

struct Ctx {
    o: Opts,
    target: Target,
    room: String,
    phase: AtomicU32,
    opened: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    openers_started: AtomicUsize,
    openers_done: AtomicUsize,
    open_deadline: AtomicU64,
    close_deadline: AtomicU64,
}

#[derive(Default)]
struct Stats {
    opened: u64,
    not_attempted: u64,
    failures: Tally,
    dropped: Tally,
    frames: u64,
    pings: u64,
    closed_cleanly: u64,
    close_unacked: u64,
    connect: Hist,
    last_open_ns: u64,
}

impl Ctx {
    fn url(&self, j: usize) -> String {
        if self.o.raw {
            return self.target.base.clone();
        }
        let room = match j.checked_div(self.o.per_room) {
            None => self.room.clone(),
            Some(k) => format!("{}-{k}", self.room),
        };
        self.target.url_for_room(Some(&room))
    }
}

impl Stats {
    fn merge(&mut self, s: &Stats) {
        self.opened += s.opened;
        self.not_attempted += s.not_attempted;
        self.failures.merge(&s.failures);
        self.dropped.merge(&s.dropped);
        self.frames += s.frames;
        self.pings += s.pings;
        self.closed_cleanly += s.closed_cleanly;
        self.close_unacked += s.close_unacked;
        self.connect.merge(&s.connect);
        self.last_open_ns = self.last_open_ns.max(s.last_open_ns);
    }
}

/// Samples taken along the run, and what the phases counted.
struct Run {
    threads: usize,
    /// When opening started.
    t0: u64,
    mem_before: MemMark,
    mem_open: MemMark,
    mem_held: MemMark,
    mem_after: MemMark,
    cpu_open: (Value, String),
    cpu_hold: (Value, String),
    st: Stats,
    not_joined: usize,
}

pub fn run(o: &Opts, target: &Target) -> Outcome {
    let token = conn::run_token();
    let ctx = Arc::new(Ctx {
        o: o.clone(),
        target: target.clone(),
        room: o.room.clone().unwrap_or_else(|| format!("wsload-{token}")),
        phase: AtomicU32::new(READY),
        opened: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        openers_started: AtomicUsize::new(0),
        openers_done: AtomicUsize::new(0),
        open_deadline: AtomicU64::new(u64::MAX),
        close_deadline: AtomicU64::new(u64::MAX),
    });
    crate::sysinfo::settle(o.server_pid, Duration::from_secs(10));
    let threads = o.concurrency.min(o.connections);
    let (handles, errors) = spawn_openers(&ctx, threads);
    // The "before" sample is taken with the opener threads already running, so that the tool's
    // own threads (and their kernel stacks) are the same in every sample.
    let t_spawn = now_ns();
    while ctx.openers_started.load(SeqCst) < handles.len() && now_ns() < t_spawn + 5 * SEC {
        thread::sleep(Duration::from_millis(1));
    }
    let mem_before = MemMark::now(o.server_pid);
    let cpu_open0 = CpuMark::now(o.server_pid);
    let t0 = now_ns();
    ctx.open_deadline
        .store(t0 + (o.setup_timeout * 1e9) as u64, SeqCst);
    ctx.phase.store(OPEN, SeqCst);
    wait_opened(&ctx, t0, handles.len());
    let opened_at = now_ns();
    let mem_open = MemMark::now(o.server_pid);
    let cpu_open = cpu_report(cpu_open0, CpuMark::now(o.server_pid));
    let cpu0 = CpuMark::now(o.server_pid);
    hold(&ctx, opened_at);
    let cpu_hold = cpu_report(cpu0, CpuMark::now(o.server_pid));
    let mem_held = MemMark::now(o.server_pid);
    let (st, not_joined) = close_all(&ctx, handles, errors);
    report(
        o,
        Run {
            threads,
            t0,
            mem_before,
            mem_open,
            mem_held,
            mem_after: MemMark::now(o.server_pid),
            cpu_open,
            cpu_hold,
            st,
            not_joined,
        },
    )
}

fn spawn_openers(ctx: &Arc<Ctx>, threads: usize) -> (Vec<thread::JoinHandle<Stats>>, Tally) {
    let mut handles = Vec::new();
    let mut errors = Tally::default();
    for k in 0..threads {
        let c = ctx.clone();
        match thread::Builder::new()
            .name(format!("idle-{k}"))
            .stack_size(256 * 1024)
            .spawn(move || opener(&c, k, threads))
        {
            Ok(h) => handles.push(h),
            Err(e) => errors.add(format!("spawn: {}", conn::io_kind(&e))),
        }
    }
    (handles, errors)
}

/// Waits until every opener is done opening (or --setup-timeout), printing progress.
fn wait_opened(ctx: &Ctx, t0: u64, openers: usize) {
    let mut next_note = t0 + SEC;
    let deadline = ctx.open_deadline.load(SeqCst) + SEC;
    while ctx.openers_done.load(SeqCst) < openers && now_ns() < deadline {
        if !ctx.o.quiet && now_ns() >= next_note {
            let (ok, failed) = (ctx.opened.load(SeqCst), ctx.failed.load(SeqCst));
            let secs = (now_ns() - t0) as f64 / 1e9;
            eprintln!(
                "[{secs:5.1}s] opening: {ok}/{} open ({:.0}/s), {failed} failed",
                ctx.o.connections,
                ok as f64 / secs
            );
            next_note += SEC;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Holds the connections for --hold seconds (the openers sweep them meanwhile).
fn hold(ctx: &Ctx, opened_at: u64) {
    ctx.phase.store(HOLD, SeqCst);
    let hold_end = opened_at + (ctx.o.hold * 1e9) as u64;
    let mut next_note = opened_at + SEC;
    while now_ns() < hold_end {
        if !ctx.o.quiet && ctx.o.hold > 3.0 && now_ns() >= next_note {
            let held = ctx.opened.load(SeqCst) - ctx.dropped.load(SeqCst);
            eprintln!(
                "[hold {:5.1}s] {held} connections held",
                (now_ns() - opened_at) as f64 / 1e9
            );
        }
        while next_note <= now_ns() {
            next_note += SEC;
        }
        conn::sleep_until_ns(hold_end.min(next_note).min(now_ns() + 100_000_000));
    }
}

/// Closes every connection and joins the openers; returns their figures summed and how many
/// did not finish in time.
fn close_all(
    ctx: &Ctx,
    handles: Vec<thread::JoinHandle<Stats>>,
    mut errors: Tally,
) -> (Stats, usize) {
    // 20 µs per connection on top of 2 s: closing 100,000 takes a while.
    let close_deadline = now_ns() + 2 * SEC + (ctx.o.connections as u64 * 20_000);
    ctx.close_deadline.store(close_deadline, SeqCst);
    ctx.phase.store(CLOSE, SeqCst);
    let (results, not_joined) = conn::join_finished(handles, close_deadline + SEC);
    let mut st = Stats::default();
    for result in results {
        match result {
            Ok(s) => st.merge(&s),
            Err(_) => errors.add("opener thread panicked"),
        }
    }
    st.failures.merge(&errors);
    (st, not_joined)
}

/// Memory deltas between two samples, whole and per connection held.
struct MemDeltas {
    rss: Option<i64>,
    kstack: Option<i64>,
    threads: Option<i64>,
    tool_rss: Option<i64>,
    opened: f64,
}

impl MemDeltas {
    fn new(before: &MemMark, held: &MemMark, opened: u64) -> MemDeltas {
        let delta = |a: Option<u64>, b: Option<u64>| -> Option<i64> { Some(b? as i64 - a? as i64) };
        MemDeltas {
            rss: delta(before.server_rss_kb, held.server_rss_kb),
            kstack: delta(before.kernel_stack_kb, held.kernel_stack_kb),
            threads: delta(before.server_threads, held.server_threads),
            tool_rss: delta(before.tool_rss_kb, held.tool_rss_kb),
            opened: opened.max(1) as f64,
        }
    }

    /// Bytes per connection of a delta in kB.
    fn per_conn(&self, d: Option<i64>) -> Option<f64> {
        d.map(|d| (d as f64 * 1024.0 / self.opened).round())
    }
}

fn report(o: &Opts, r: Run) -> Outcome {
    let st = &r.st;
    let open_s = (st.last_open_ns.max(r.t0) - r.t0) as f64 / 1e9;
    let rate = if open_s > 0.0 {
        st.opened as f64 / open_s
    } else {
        0.0
    };
    let mem = MemDeltas::new(&r.mem_before, &r.mem_held, st.opened);
    let ok = st.opened == o.connections as u64 && st.dropped.total() == 0 && r.not_joined == 0;
    let fatal = (st.opened < o.connections as u64)
        .then(|| format!("{} of {} connections opened", st.opened, o.connections));
    Outcome {
        ok,
        fatal,
        limited_by: limits::first(&[&st.failures, &st.dropped]),
        json: report_json(o, &r, open_s, rate, &mem),
        lines: report_lines(o, &r, open_s, rate, &mem),
    }
}

fn report_json(
    o: &Opts,
    r: &Run,
    open_s: f64,
    rate: f64,
    mem: &MemDeltas,
) -> serde_json::Map<String, Value> {
    let st = &r.st;
    let mut json = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        json.insert(k.to_string(), v);
    };
    put("connections", json!(o.connections));
    put("concurrency", json!(r.threads));
    put(
        "per_room",
        if o.raw {
            Value::Null
        } else {
            json!(o.per_room)
        },
    );
    put("hold_s", json!(o.hold));
    put("opened", json!(st.opened));
    put("failed", json!(st.failures.total()));
    put("not_attempted", json!(st.not_attempted));
    put("failures", st.failures.json());
    put("open_s", json!((open_s * 1000.0).round() / 1000.0));
    put("connections_per_s", json!(rate.round()));
    put("connect_us", st.connect.json_us());
    put("dropped_during_hold", st.dropped.json());
    put("frames_received", json!(st.frames));
    put("pings_received", json!(st.pings));
    put("closed_cleanly", json!(st.closed_cleanly));
    put("close_unacked", json!(st.close_unacked));
    put("threads_not_joined", json!(r.not_joined));
    put("cpu_open", r.cpu_open.0.clone());
    put("cpu_hold", r.cpu_hold.0.clone());
    put(
        "memory",
        json!({
            "before": r.mem_before.json(), "opened": r.mem_open.json(), "held": r.mem_held.json(),
            "after_close": r.mem_after.json(),
            "server_rss_bytes_per_conn": mem.per_conn(mem.rss),
            "kernel_stack_bytes_per_conn": mem.per_conn(mem.kstack),
            "server_threads_delta": mem.threads,
            "tool_rss_bytes_per_conn": mem.per_conn(mem.tool_rss),
        }),
    );
    json
}

fn report_lines(o: &Opts, r: &Run, open_s: f64, rate: f64, mem: &MemDeltas) -> Vec<String> {
    let st = &r.st;
    let handshake = if st.connect.count() > 0 {
        let c = &st.connect;
        let (p50, p99) = (fmt_ns(c.quantile(0.5)), fmt_ns(c.quantile(0.99)));
        format!("p50 {p50} p99 {p99} max {}", fmt_ns(c.max()))
    } else {
        "-".into()
    };
    let mut lines = vec![
        format!(
            "opened        {}/{} in {open_s:.2}s ({rate:.0} conn/s) with {} threads; handshake {handshake}",
            group(st.opened),
            group(o.connections as u64),
            r.threads
        ),
        format!("failures      {}", st.failures.human()),
    ];
    if st.not_attempted > 0 {
        lines.push(format!(
            "not attempted {} (--setup-timeout ran out)",
            st.not_attempted
        ));
    }
    lines.push(format!(
        "held          {:.1}s; dropped by server: {}; {} frames, {} pings received",
        o.hold,
        st.dropped.human(),
        group(st.frames),
        st.pings
    ));
    lines.push(format!(
        "closed        {} with a closing handshake, {} without reply",
        st.closed_cleanly, st.close_unacked
    ));
    lines.extend(memory_lines(mem));
    lines.push(format!("cpu (opening) {}", r.cpu_open.1));
    lines.push(format!("cpu (hold)    {}", r.cpu_hold.1));
    lines
}

fn memory_lines(mem: &MemDeltas) -> [String; 2] {
    let na = || "n/a".to_string();
    let kb = |d: Option<i64>| d.map_or_else(na, |d| format!("{d:+} kB"));
    let b = |d: Option<f64>| d.map_or_else(na, |d| format!("{d:.0} B/conn"));
    [
        format!(
            "server memory RSS {} ({}), threads {}, KernelStack {} ({})",
            kb(mem.rss),
            b(mem.per_conn(mem.rss)),
            mem.threads.map_or_else(na, |t| format!("{t:+}")),
            kb(mem.kstack),
            b(mem.per_conn(mem.kstack))
        ),
        format!(
            "tool memory   RSS {} ({})",
            kb(mem.tool_rss),
            b(mem.per_conn(mem.tool_rss))
        ),
    ]
}

struct Held {
    ws: Ws,
    closing: bool,
}

fn opener(ctx: &Ctx, k: usize, threads: usize) -> Stats {
    let mut st = Stats::default();
    let mut held: Vec<Held> = Vec::new();
    let opts = ConnOpts {
        timeout: ctx.o.connect_timeout(),
        read_buf: 2048,
    };
    ctx.openers_started.fetch_add(1, SeqCst);
    while ctx.phase.load(SeqCst) == READY {
        thread::sleep(Duration::from_millis(1));
    }
    let open_deadline = ctx.open_deadline.load(SeqCst);
    let mut next_sweep = now_ns() + SWEEP_NS;
    let mut j = k;
    while j < ctx.o.connections {
        if now_ns() > open_deadline {
            st.not_attempted += ((ctx.o.connections - j) as u64).div_ceil(threads as u64);
            break;
        }
        let t = now_ns();
        match open_one(ctx, j, opts) {
            Ok(ws) => {
                let now = now_ns();
                st.connect.record(now - t);
                st.last_open_ns = now;
                st.opened += 1;
                ctx.opened.fetch_add(1, SeqCst);
                held.push(Held { ws, closing: false });
            }
            Err(kind) => {
                st.failures.add(kind);
                ctx.failed.fetch_add(1, SeqCst);
            }
        }
        if now_ns() >= next_sweep {
            sweep(ctx, &mut st, &mut held);
            next_sweep = now_ns() + SWEEP_NS;
        }
        j += threads;
    }
    ctx.openers_done.fetch_add(1, SeqCst);
    while ctx.phase.load(SeqCst) != CLOSE {
        if now_ns() >= next_sweep {
            sweep(ctx, &mut st, &mut held);
            next_sweep = now_ns() + SWEEP_NS;
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Close: a close frame on every socket, then sweep until each has answered (or gone).
    let deadline = ctx.close_deadline.load(SeqCst);
    for h in held.iter_mut() {
        let frame = tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        };
        let _ = h.ws.close(Some(frame));
        let _ = h.ws.get_mut().push();
        h.closing = true;
    }
    while !held.is_empty() && now_ns() < deadline {
        sweep(ctx, &mut st, &mut held);
        if !held.is_empty() {
            thread::sleep(Duration::from_millis(5));
        }
    }
    st.close_unacked += held.len() as u64;
    st
}

fn open_one(ctx: &Ctx, j: usize, opts: ConnOpts) -> Result<Ws, String> {
    let mut ws = conn::open(&ctx.url(j), &ctx.target, opts)?;
    if !ctx.o.raw {
        loop {
            match ws.read() {
                Ok(Message::Text(t)) if conn::is_welcome(t.as_str()) => break,
                Ok(Message::Text(_)) => return Err("welcome: other frame first".into()),
                Ok(Message::Close(f)) => {
                    return Err(format!("welcome: closed {}", conn::close_kind(&f)));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("welcome: {}", conn::ws_kind(&e))),
            }
        }
    }
    ws.get_mut()
        .set_nonblocking()
        .map_err(|e| format!("socket: {}", conn::io_kind(&e)))?;
    Ok(ws)
}

/// Reads every socket until it would block; drops the ones that closed.
fn sweep(ctx: &Ctx, st: &mut Stats, held: &mut Vec<Held>) {
    held.retain_mut(|h| {
        let gone: Option<String> = loop {
            match h.ws.read() {
                Ok(Message::Text(_)) | Ok(Message::Binary(_)) => st.frames += 1,
                Ok(Message::Ping(_)) => st.pings += 1,
                Ok(Message::Close(f)) => break Some(conn::close_kind(&f)),
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(WsError::ConnectionClosed) if h.closing => break Some(String::new()),
                Err(e) => break Some(conn::ws_kind(&e)),
            }
        };
        match gone {
            None => {
                if let Err(e) = h.ws.get_mut().push()
                    && e.kind() != io::ErrorKind::WouldBlock
                {
                    record_gone(ctx, st, h, format!("write: {}", conn::io_kind(&e)));
                    return false;
                }
                true
            }
            Some(kind) => {
                // A close frame from the server: tungstenite queued the reply; send it.
                let _ = h.ws.flush();
                let _ = h.ws.get_mut().push();
                record_gone(ctx, st, h, kind);
                false
            }
        }
    });
}

fn record_gone(ctx: &Ctx, st: &mut Stats, h: &Held, kind: String) {
    if h.closing {
        if kind.is_empty()
            || kind.starts_with("1000")
            || kind.starts_with("1001")
            || kind == "no code"
        {
            st.closed_cleanly += 1;
        } else {
            st.close_unacked += 1;
        }
    } else {
        st.dropped.add(if kind.is_empty() {
            "closed".into()
        } else {
            kind
        });
        ctx.dropped.fetch_add(1, SeqCst);
    }
}
