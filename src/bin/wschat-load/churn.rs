//! `churn`: --threads loops of connect → welcome → send one message → its echo → close.
//! Every 10th cycle of a thread drops the TCP socket instead (no close frame). Cycles that start
//! after the warm-up and end before the end of the measured time are counted.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};
use tungstenite::Message;

use crate::cli::Opts;
use crate::conn::{self, ConnOpts, Frame, Target, Wire, now_ns};
use crate::room::CONN_STACK;
use crate::stats::{Hist, Tally, group};
use crate::sysinfo::{CpuMark, cpu_report};
use crate::{Outcome, limits};

const SEC: u64 = 1_000_000_000;

struct Ctx {
    o: Opts,
    wire: Wire,
    url: String,
    target: Target,
    warm_end: u64,
    end: u64,
}

#[derive(Default)]
struct Stats {
    cycles: u64,
    measured: u64,
    abrupt: u64,
    clean: u64,
    unacked: u64,
    errors: Tally,
    measured_errors: u64,
    connect: Hist,
    cycle: Hist,
}

impl Stats {
    fn merge(&mut self, s: &Stats) {
        self.cycles += s.cycles;
        self.measured += s.measured;
        self.abrupt += s.abrupt;
        self.clean += s.clean;
        self.unacked += s.unacked;
        self.errors.merge(&s.errors);
        self.measured_errors += s.measured_errors;
        self.connect.merge(&s.connect);
        self.cycle.merge(&s.cycle);
    }
}

pub fn run(o: &Opts, target: &Target) -> Outcome {
    let token = conn::run_token();
    let room = o.room.clone().unwrap_or_else(|| format!("wsload-{token}"));
    let start = now_ns() + 1_000_000;
    let warm_end = start + (o.warmup * 1e9) as u64;
    let end = warm_end + (o.duration * 1e9) as u64;
    let ctx = Arc::new(Ctx {
        o: o.clone(),
        wire: Wire::new(&token, o.envelope(), o.size),
        url: if o.raw {
            target.base.clone()
        } else {
            target.url_for_room(Some(&room))
        },
        target: target.clone(),
        warm_end,
        end,
    });
    let mut errors = Tally::default();
    let mut handles = Vec::new();
    for k in 0..o.threads {
        let c = ctx.clone();
        match thread::Builder::new()
            .name(format!("churn-{k}"))
            .stack_size(CONN_STACK)
            .spawn(move || churner(&c, k))
        {
            Ok(h) => handles.push(h),
            Err(e) => errors.add(format!("spawn: {}", conn::io_kind(&e))),
        }
    }
    let cpu = watch(&ctx, start);
    // Each thread finishes its current cycle, bounded by the per-step timeouts.
    let join_deadline = end + 3 * (o.connect_timeout * 1e9) as u64 + SEC;
    let (results, not_joined) = conn::join_finished(handles, join_deadline);
    let mut st = Stats::default();
    for result in results {
        match result {
            Ok(s) => st.merge(&s),
            Err(_) => errors.add("churn thread panicked"),
        }
    }
    st.errors.merge(&errors);
    report(&ctx, &st, not_joined, cpu)
}

/// Sleeps through the run, printing progress once a second; returns the CPU used while measured.
fn watch(ctx: &Ctx, start: u64) -> (Value, String) {
    let progress = !ctx.o.quiet && ctx.o.warmup + ctx.o.duration > 3.0;
    let (warm_end, end) = (ctx.warm_end, ctx.end);
    let mut cpu0 = None;
    let mut next_tick = start + SEC;
    while now_ns() < end {
        let now = now_ns();
        if cpu0.is_none() && now >= warm_end {
            cpu0 = Some(CpuMark::now(ctx.o.server_pid));
        }
        if progress && now >= next_tick {
            eprintln!(
                "[{:5.1}s] {}",
                (now - start) as f64 / 1e9,
                if now < warm_end { "warm-up" } else { "measure" }
            );
        }
        while next_tick <= now {
            next_tick += SEC;
        }
        let wake = if cpu0.is_none() { warm_end } else { end }.min(next_tick);
        conn::sleep_until_ns(wake.min(now_ns() + 100_000_000));
    }
    let cpu1 = CpuMark::now(ctx.o.server_pid);
    cpu_report(cpu0.unwrap_or(cpu1), cpu1)
}

fn report(ctx: &Ctx, st: &Stats, not_joined: usize, cpu: (Value, String)) -> Outcome {
    let o = &ctx.o;
    let per_s = st.measured as f64 / o.duration;
    let mut json = serde_json::Map::new();
    let mut put = |k: &str, v: Value| {
        json.insert(k.to_string(), v);
    };
    put("threads", json!(o.threads));
    put("warmup_s", json!(o.warmup));
    put("duration_s", json!(o.duration));
    put("room_url", json!(ctx.url));
    put(
        "cycles",
        json!({"total": st.cycles, "measured": st.measured, "per_s": (per_s * 10.0).round() / 10.0,
               "abrupt": st.abrupt, "closed_cleanly": st.clean, "close_unacked": st.unacked}),
    );
    put("errors", st.errors.json());
    put("errors_measured", json!(st.measured_errors));
    put("connect_us", st.connect.json_us());
    put("cycle_us", st.cycle.json_us());
    put("threads_not_joined", json!(not_joined));
    put("cpu", cpu.0);
    let lines = vec![
        format!(
            "threads       {} looping over {:.2}s after {:.2}s warm-up",
            o.threads, o.duration, o.warmup
        ),
        format!(
            "cycles        {} measured ({per_s:.1}/s), {} in all; {} dropped abruptly, {} closed with handshake, {} close unanswered",
            group(st.measured),
            group(st.cycles),
            group(st.abrupt),
            group(st.clean),
            st.unacked
        ),
        format!("connect       {}", st.connect.human()),
        format!("connect→echo  {}", st.cycle.human()),
        format!(
            "errors        {} ({} in the measured time)",
            st.errors.human(),
            st.measured_errors
        ),
        format!("cpu           {}", cpu.1),
    ];
    Outcome {
        ok: st.errors.total() == 0 && st.measured > 0 && not_joined == 0,
        fatal: None,
        limited_by: limits::first(&[&st.errors]),
        json,
        lines,
    }
}

fn churner(ctx: &Ctx, k: usize) -> Stats {
    let mut st = Stats::default();
    let opts = ConnOpts {
        timeout: ctx.o.connect_timeout(),
        read_buf: 8 * 1024,
    };
    let mut cycle: u64 = 0;
    loop {
        let t0 = now_ns();
        if t0 >= ctx.end {
            break;
        }
        let res = one_cycle(ctx, k, cycle, opts, &mut st);
        let t1 = now_ns();
        let measured = t0 >= ctx.warm_end && t1 <= ctx.end;
        match res {
            Ok((connect_ns, echo_ns)) => {
                st.cycles += 1;
                if measured {
                    st.measured += 1;
                    st.connect.record(connect_ns);
                    st.cycle.record(echo_ns);
                }
            }
            Err(kind) => {
                st.errors.add(kind);
                st.measured_errors += measured as u64;
                thread::sleep(Duration::from_millis(10));
            }
        }
        cycle += 1;
    }
    st
}

/// One cycle; returns (connect + welcome time, connect → echo time).
fn one_cycle(
    ctx: &Ctx,
    k: usize,
    cycle: u64,
    opts: ConnOpts,
    st: &mut Stats,
) -> Result<(u64, u64), String> {
    let t0 = now_ns();
    let mut ws = conn::open(&ctx.url, &ctx.target, opts)?;
    if !ctx.o.raw {
        // The welcome may carry the room's history (our own earlier messages): skip it whole.
        match ws.read() {
            Ok(Message::Text(t)) if conn::is_welcome(t.as_str()) => {}
            Ok(Message::Close(f)) => {
                return Err(format!("welcome: closed {}", conn::close_kind(&f)));
            }
            Ok(_) => return Err("welcome: other frame first".into()),
            Err(e) => return Err(format!("welcome: {}", conn::ws_kind(&e))),
        }
    }
    let t_conn = now_ns();
    let text = ctx.wire.message(k as u32, cycle, t_conn);
    ws.write(Message::text(text))
        .map_err(|e| format!("send: {}", conn::ws_kind(&e)))?;
    ws.get_mut()
        .push()
        .map_err(|e| format!("send: {}", conn::io_kind(&e)))?;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                if let Frame::Msg { sender, seq, .. } = ctx.wire.parse(t.as_str()) {
                    if sender as usize == k && seq == cycle {
                        break;
                    }
                } else if let Some(code) = conn::error_code(t.as_str()) {
                    return Err(format!("echo: server error {code}"));
                }
            }
            Ok(Message::Close(f)) => return Err(format!("echo: closed {}", conn::close_kind(&f))),
            Ok(_) => {}
            Err(e) => return Err(format!("echo: {}", conn::ws_kind(&e))),
        }
    }
    let t_echo = now_ns();
    if cycle % 10 == 9 {
        // Abrupt: no close frame; the kernel sends FIN, or RST if unread data is pending.
        drop(ws);
        st.abrupt += 1;
    } else if conn::close(&mut ws, now_ns() + (ctx.o.connect_timeout * 1e9) as u64) {
        st.clean += 1;
    } else {
        st.unacked += 1;
    }
    Ok((t_conn - t0, t_echo - t0))
}
