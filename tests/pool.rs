//! The listener's pool of connection threads, over real sockets: a finished connection's thread
//! serves the next one, with nothing of the last (name, room, rate limits, admission), the pool
//! keeps at most its bound of parked threads, and shutdown ends them.

mod common;

use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, WAIT, config, metric, start};
use wschat::{MAX_PARKED_THREADS, PARKED_THREAD_NAME};

/// The tests count this process's threads by name: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// This process's threads as (thread id, name).
fn threads() -> Vec<(String, String)> {
    let mut all = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .flatten()
    {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            let tid = task.file_name().to_string_lossy().into_owned();
            all.push((tid, comm.trim().to_owned()));
        }
    }
    all
}

/// Threads serving a connection now.
fn serving() -> Vec<(String, String)> {
    threads()
        .into_iter()
        .filter(|(_, name)| name.starts_with("conn-"))
        .collect()
}

fn parked() -> usize {
    threads()
        .iter()
        .filter(|(_, name)| name == PARKED_THREAD_NAME)
        .count()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `text` and returns the type of what comes back for it: `message` or `error`.
fn answer_to(client: &mut Client, text: &str) -> String {
    client.send(text);
    loop {
        let frame = client.recv();
        if frame["type"] == "message" || frame["type"] == "error" {
            return frame["type"].as_str().unwrap_or_default().to_owned();
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_pooled_thread_serves_the_next_client_with_nothing_of_the_last() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let before = parked(); // a failed test's server may have left some
    let mut cfg = config();
    cfg.max_clients_per_ip = 1; // a ticket the pool kept would refuse the next client
    cfg.rate = 0.5;
    cfg.burst = 2.0;
    let server = start(cfg);

    let (mut alice, welcome_a) = Client::join(&server, "/chat/first?name=alice");
    let [(tid, _)] = <[_; 1]>::try_from(serving()).expect("one connection, one thread");
    assert_eq!(answer_to(&mut alice, "one"), "message");
    assert_eq!(answer_to(&mut alice, "two"), "message");
    assert_eq!(
        answer_to(&mut alice, "three"),
        "error",
        "alice's burst is spent"
    );
    alice.close();
    wait_for("alice's thread to park", || {
        threads().contains(&(tid.clone(), PARKED_THREAD_NAME.to_owned()))
    });

    let (mut next, welcome) = Client::join(&server, "/chat");
    let [(next_tid, _)] = <[_; 1]>::try_from(serving()).expect("one connection, one thread");
    assert_eq!(next_tid, tid, "the parked thread serves the next client");
    assert_ne!(welcome["client_id"], welcome_a["client_id"]);
    assert_eq!(welcome["room"], "lobby");
    assert!(
        welcome["name"].as_str().unwrap().starts_with("guest-"),
        "{welcome}"
    );
    assert_eq!(welcome["users"], serde_json::json!([welcome["name"]]));
    // A fresh burst: nothing of alice's rate limit came along.
    assert_eq!(answer_to(&mut next, "one"), "message");
    assert_eq!(answer_to(&mut next, "two"), "message");
    assert_eq!(metric(server.http_addr(), "wschat_connections"), 1);

    next.close();
    wait_for("every connection to end", || server.live_connections() == 0);
    assert!(parked() > before);
    server.shutdown();
    wait_for("the parked threads to end after shutdown", || {
        parked() <= before
    });
}

#[cfg(target_os = "linux")]
#[test]
fn after_a_burst_at_most_the_bound_stay_parked_and_admission_is_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let before = parked(); // a failed test's server may have left some
    let server = start(config());
    let clients: Vec<_> = (0..MAX_PARKED_THREADS + 16)
        .map(|i| Client::join(&server, &format!("/chat/burst?name=c{i}")).0)
        .collect();
    assert_eq!(serving().len(), MAX_PARKED_THREADS + 16);
    for client in clients {
        client.close();
    }
    wait_for("every connection to end", || server.live_connections() == 0);
    wait_for("the threads to finish", || serving().is_empty());
    assert_eq!(parked() - before, MAX_PARKED_THREADS);
    assert_eq!(metric(server.http_addr(), "wschat_connections"), 0);
    // At the door: the request for the metrics alone.
    assert_eq!(metric(server.http_addr(), "wschat_handshakes_pending"), 1);
    // Every parked thread still serves: a second round reuses them (plus some new ones).
    let again: Vec<_> = (0..8)
        .map(|i| Client::join(&server, &format!("/chat/burst?name=d{i}")).0)
        .collect();
    assert_eq!(parked() - before, MAX_PARKED_THREADS - 8);
    drop(again);
    server.shutdown();
    wait_for("the parked threads to end after shutdown", || {
        parked() <= before
    });
}
