//! wschat-abuse: replays the attacks of issue 9 ("Every limit true") against a running wschat on
//! this machine, one after another, while honest clients chat beside them. For each attack it
//! prints the server's peak RSS (with `--server-pid`), whether the honest clients kept chatting
//! (their round-trip p99 and failures), and what the attacker got.
//!
//! Plain threads and tungstenite's blocking client, like `wschat-load`. It talks only to loopback
//! addresses (attackers use 127.0.0.2 and up as their own addresses), every attack is bounded in
//! connections and time, and the tool stops by itself.

mod attacks;
mod honest;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

const USAGE: &str = "\
wschat-abuse: replay issue 9's attacks against a wschat on this machine

USAGE: wschat-abuse --addr 127.0.0.1:5000 [--server-pid PID] [--seconds S] [--only NAME]
                    [--api-token TOKEN] [--connections N]

  --addr ADDR        the server's one port (loopback only)
  --server-pid PID   read the server's RSS from /proc (peak per attack)
  --seconds S        how long each attack runs (default 5)
  --connections N    attacker connections for the big attacks (default 1000)
  --api-token TOKEN  the server's API token, for the API flood (skipped without it)
  --only NAME        run one attack: head partial pings fds door escape fill readers api
                     slowloris

Prints a table, then one JSON line per attack. Exit 0 when every attack left the honest clients
chatting (p99 under 100 ms, no failures), 2 otherwise.
";

/// What the tool was asked to do.
#[derive(Clone)]
pub struct Opts {
    pub addr: SocketAddr,
    pub server_pid: Option<u32>,
    pub seconds: f64,
    pub connections: usize,
    pub api_token: Option<String>,
    pub only: Option<String>,
}

/// What one attack reports.
pub struct Report {
    pub name: &'static str,
    pub what: &'static str,
    /// What the attacker got, in words.
    pub got: String,
}

fn main() {
    let opts = match parse() {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("wschat-abuse: {e}\n(see wschat-abuse --help)");
            std::process::exit(2);
        }
    };
    let mut all_ok = true;
    println!(
        "{:<10} {:>9} {:>12} {:>8}  attacker got",
        "attack", "peak RSS", "honest p99", "failed"
    );
    for attack in attacks::ALL {
        if opts.only.as_deref().is_some_and(|only| only != attack.0) {
            continue;
        }
        all_ok &= run_one(&opts, attack.0, attack.1);
    }
    std::process::exit(if all_ok { 0 } else { 2 });
}

/// Runs one attack with the honest clients and the memory watcher beside it; prints its line.
fn run_one(opts: &Opts, name: &'static str, attack: attacks::Attack) -> bool {
    let deadline = Instant::now() + Duration::from_secs_f64(opts.seconds);
    let before = rss_kib(opts.server_pid);
    let watcher = honest::Watcher::start(opts.addr, opts.server_pid);
    // The attacker yields the CPU to the server and the honest clients, as it would if it ran
    // on other machines: this box runs all three.
    let attacker_opts = opts.clone();
    let report = std::thread::spawn(move || {
        lower_this_threads_priority();
        attack(&attacker_opts, deadline)
    })
    .join()
    .expect("the attack thread");
    let seen = watcher.stop();
    let peak = seen.peak_rss_kib.max(before.unwrap_or(0));
    let ok = seen.failed == 0 && seen.p99_ms < 100.0;
    let rss = match opts.server_pid {
        Some(_) => format!("{:.1} MiB", peak as f64 / 1024.0),
        None => "-".into(),
    };
    println!(
        "{:<10} {:>9} {:>9.1} ms {:>8}  {}",
        name, rss, seen.p99_ms, seen.failed, report.got
    );
    let json = serde_json::json!({
        "attack": name, "what": report.what, "ok": ok,
        "peak_rss_kib": opts.server_pid.map(|_| peak),
        "rss_before_kib": before,
        "honest": { "round_trips": seen.round_trips, "failed": seen.failed,
                    "p50_ms": seen.p50_ms, "p99_ms": seen.p99_ms },
        "attacker_got": report.got,
    });
    eprintln!("{json}");
    ok
}

/// Lowers the calling thread's scheduling priority (nice 10); threads it starts inherit it.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes a scheduling attribute; on Linux, PRIO_PROCESS with 0
    // names the calling thread (nice values are per thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// The server's resident memory in KiB, from /proc.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn parse() -> Result<Opts, lexopt::Error> {
    use lexopt::prelude::*;
    let mut opts = Opts {
        addr: SocketAddr::from(([127, 0, 0, 1], 5000)),
        server_pid: None,
        seconds: 5.0,
        connections: 1000,
        api_token: None,
        only: None,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("addr") => opts.addr = parser.value()?.parse()?,
            Long("server-pid") => opts.server_pid = Some(parser.value()?.parse()?),
            Long("seconds") => opts.seconds = parser.value()?.parse()?,
            Long("connections") => opts.connections = parser.value()?.parse()?,
            Long("api-token") => opts.api_token = Some(parser.value()?.string()?),
            Long("only") => opts.only = Some(parser.value()?.string()?),
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(arg.unexpected()),
        }
    }
    if !opts.addr.ip().is_loopback() {
        return Err(
            "--addr must be a loopback address: this tool attacks only this machine".into(),
        );
    }
    if opts
        .only
        .as_deref()
        .is_some_and(|o| !attacks::ALL.iter().any(|a| a.0 == o))
    {
        return Err("--only takes one of the attack names in --help".into());
    }
    Ok(opts)
}
