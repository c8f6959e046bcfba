//! wschat-load: a WebSocket load generator for wschat, built on plain `std::thread`s and
//! tungstenite's blocking client (no async runtime). See `--help` (cli.rs) for the modes and
//! the output format.
//!
//! Output: a human table on stdout, then exactly one JSON line, which is the last line of
//! stdout. Progress and warnings go to stderr.

mod churn;
mod cli;
mod conn;
mod idle;
mod limits;
mod room;
mod stats;
mod storm;
mod sysinfo;
#[cfg(feature = "tls")]
mod tls;

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use cli::{Mode, Opts};

/// What a mode hands back to `main`.
pub struct Outcome {
    /// Everything went as it should (the mode's own criteria; see `--help`).
    pub ok: bool,
    /// The run could not take place as asked (setup failed).
    pub fatal: Option<String>,
    /// The server limit that refused part of the load, in one line with the flags that lift it.
    pub limited_by: Option<String>,
    /// Mode-specific JSON fields.
    pub json: serde_json::Map<String, Value>,
    /// Human-readable table lines.
    pub lines: Vec<String>,
}

/// Set once the final output is printed: the watchdog and `main` never both print it.
static PRINTED: Mutex<bool> = Mutex::new(false);

fn emit(quiet: bool, lines: &[String], json: &Value) {
    let mut printed = PRINTED.lock().unwrap_or_else(|e| e.into_inner());
    if *printed {
        return;
    }
    *printed = true;
    let mut out = std::io::stdout().lock();
    if !quiet {
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
    }
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
}

fn header(o: &Opts, url: &str) -> Value {
    json!({
        "tool": "wschat-load",
        "version": 1,
        "mode": o.mode.name(),
        "target": o.target_name(),
        "url": url,
        "server_pid": o.server_pid,
    })
}

fn main() {
    conn::init_clock();
    let (o, targets) = parse_or_exit();
    let target = &targets[0];
    start_watchdog(&o);
    let started = conn::now_ns();
    let outcome = match o.mode {
        Mode::Fanout | Mode::Latency => room::run(&o, &targets),
        Mode::Idle => idle::run(&o, target),
        Mode::Churn => churn::run(&o, target),
        Mode::Storm => storm::run(&o, target),
    };
    let wall = (conn::now_ns() - started) as f64 / 1e9;
    let ok = outcome.ok && outcome.fatal.is_none();
    let mut j = header(&o, &o.url);
    j["ok"] = json!(ok);
    j["error"] = json!(outcome.fatal);
    j["limited_by"] = json!(outcome.limited_by);
    j["wall_s"] = json!((wall * 1000.0).round() / 1000.0);
    let mut lines = vec![format!(
        "wschat-load {}  {} {}  ({})",
        o.mode.name(),
        o.target_name(),
        o.url,
        verdict(ok, &outcome)
    )];
    lines.extend(outcome.lines.iter().map(|l| format!("  {l}")));
    if let Value::Object(m) = &mut j {
        m.extend(outcome.json);
    }
    lines.push(format!("  wall          {wall:.2}s"));
    emit(o.quiet, &lines, &j);
    std::process::exit(match (&outcome.fatal, ok) {
        (Some(_), _) => 1,
        (None, true) => 0,
        (None, false) => 2,
    });
}

/// The options, and the target of every `--url` (never empty: the first is `o.url`).
fn parse_or_exit() -> (Opts, Vec<conn::Target>) {
    let o = Opts::parse().unwrap_or_else(|e| {
        eprintln!("wschat-load: {e}\n(see wschat-load --help)");
        std::process::exit(2);
    });
    let urls = std::iter::once(&o.url).chain(&o.more_urls);
    let targets = urls
        .map(|url| conn::Target::parse(url, o.allow_remote, o.ca.as_deref()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| {
            eprintln!("wschat-load: {e}");
            std::process::exit(2);
        });
    (o, targets)
}

/// "ok", or "NOT OK: " and why, in one line: what failed, and the server limit behind it.
fn verdict(ok: bool, outcome: &Outcome) -> String {
    if ok {
        return "ok".into();
    }
    let why: Vec<&str> = [&outcome.fatal, &outcome.limited_by]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if why.is_empty() {
        "NOT OK".into()
    } else {
        format!("NOT OK: {}", why.join(": "))
    }
}

/// The whole run is bounded by --timeout, whatever blocks.
fn start_watchdog(o: &Opts) {
    let o = o.clone();
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(o.timeout));
            let mut j = header(&o, &o.url);
            j["ok"] = json!(false);
            j["error"] = json!(format!(
                "timeout: the run took longer than --timeout {}s",
                o.timeout
            ));
            eprintln!("wschat-load: --timeout {}s expired, giving up", o.timeout);
            emit(o.quiet, &[], &j);
            std::process::exit(3);
        });
    if let Err(e) = spawned {
        eprintln!("wschat-load: cannot start the watchdog thread: {e}");
        std::process::exit(1);
    }
}
