//! The honest side of an attack: a few clients in their own room, each sending a message every
//! 100 ms and timing its echo, and the server's RSS sampled beside them.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

/// Honest clients: enough to see a room's fan-out, few enough to leave the attacker the machine.
const HONEST_CLIENTS: usize = 4;
/// How often each honest client speaks.
const EVERY: Duration = Duration::from_millis(100);
/// A round trip slower than this counts as failed.
const TOO_LATE: Duration = Duration::from_secs(2);

/// What the honest clients saw.
#[derive(Default)]
pub struct Seen {
    pub round_trips: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub peak_rss_kib: u64,
}

pub struct Watcher {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<(Vec<f64>, usize)>>,
    memory: JoinHandle<u64>,
}

impl Watcher {
    pub fn start(addr: SocketAddr, pid: Option<u32>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..HONEST_CLIENTS)
            .map(|i| {
                let stop = stop.clone();
                thread::spawn(move || chat(addr, i, &stop))
            })
            .collect();
        let memory = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Relaxed) {
                    peak = peak.max(crate::rss_kib(pid).unwrap_or(0));
                    thread::sleep(Duration::from_millis(50));
                }
                peak
            })
        };
        Watcher {
            stop,
            clients,
            memory,
        }
    }

    pub fn stop(self) -> Seen {
        self.stop.store(true, Relaxed);
        let mut times = Vec::new();
        let mut failed = 0;
        for client in self.clients {
            let (t, f) = client.join().unwrap_or_default();
            times.extend(t);
            failed += f;
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| {
            times.get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
        };
        Seen {
            round_trips: times.len(),
            failed,
            p50_ms: at(0.5).copied().unwrap_or(0.0),
            p99_ms: at(0.99).copied().unwrap_or(0.0),
            peak_rss_kib: self.memory.join().unwrap_or(0),
        }
    }
}

/// One honest client: joins `honest`, sends every [`EVERY`], times each echo. Returns the round
/// trips in ms and how many failed (no echo in time, or the connection lost).
fn chat(addr: SocketAddr, i: usize, stop: &AtomicBool) -> (Vec<f64>, usize) {
    let (mut times, mut failed) = (Vec::new(), 0);
    let mut ws = None;
    while !stop.load(Relaxed) {
        let started = Instant::now();
        if ws.is_none() {
            ws = join(addr, i);
        }
        match ws.as_mut().map(|ws| round_trip(ws, i, times.len())) {
            Some(true) => times.push(started.elapsed().as_secs_f64() * 1000.0),
            _ => {
                failed += 1;
                ws = None;
            }
        }
        thread::sleep(EVERY.saturating_sub(started.elapsed()));
    }
    (times, failed)
}

fn join(addr: SocketAddr, i: usize) -> Option<WebSocket<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, TOO_LATE).ok()?;
    stream.set_read_timeout(Some(TOO_LATE)).ok()?;
    let url = format!("ws://{addr}/chat/honest?name=honest{i}");
    tungstenite::client(url, stream).ok().map(|(ws, _)| ws)
}

/// Sends one numbered message and reads until its own echo comes back.
fn round_trip(ws: &mut WebSocket<TcpStream>, i: usize, n: usize) -> bool {
    let text = format!("honest {i} #{n}");
    if ws.send(Message::text(text.clone())).is_err() {
        return false;
    }
    let deadline = Instant::now() + TOO_LATE;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Text(t)) if t.contains(&format!("\"text\":\"{text}\"")) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}
