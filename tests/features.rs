//! Issue 3: rooms, names, presence, typing, private messages, history, resume, persistence.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use wschat::Config;

fn fast_config() -> Config {
    Config {
        rate: 1e6,
        burst: 1e6,
        ..config()
    }
}

fn ids(history: &Value) -> Vec<u64> {
    history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wschat-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn rooms_isolate_messages_and_both_url_forms_work() {
    let server = start(config());
    let (mut a, wa) = Client::join(&server, "/chat/dev");
    let (mut b, wb) = Client::join(&server, "/chat?room=dev");
    let (mut c, wc) = Client::join(&server, "/chat");
    assert_eq!(
        (
            wa["room"].as_str(),
            wb["room"].as_str(),
            wc["room"].as_str()
        ),
        (Some("dev"), Some("dev"), Some("lobby"))
    );
    a.send("in dev");
    assert_eq!(b.expect_text(), "in dev");
    assert_eq!(a.expect_text(), "in dev");
    c.send("in lobby");
    assert_eq!(c.expect_text(), "in lobby");
    a.expect_none("message", Duration::from_millis(200));
    b.expect_none("message", Duration::from_millis(50));
    server.shutdown();
}

#[test]
fn switching_rooms_moves_presence_and_history() {
    let server = start(config());
    let (mut a, _) = Client::join(&server, "/chat?name=a");
    let (mut b, _) = Client::join(&server, "/chat/dev?name=b");
    b.send("earlier in dev");
    let earlier = b.expect("message");
    a.send_json(json!({"type":"join","room":"dev"}));
    let room = a.expect("room");
    assert_eq!(room["room"], "dev");
    assert_eq!(room["users"], json!(["a", "b"]));
    assert_eq!(ids(&room["history"]), [earlier["id"].as_u64().unwrap()]);
    let joined = b.expect("joined");
    assert_eq!(
        (joined["name"].as_str(), joined["count"].as_u64()),
        (Some("a"), Some(2))
    );
    a.send_json(json!({"type":"join","room":"bad room!"}));
    assert_eq!(a.expect("error")["code"], "bad_room");
    a.send("still in dev");
    assert_eq!(b.expect_text(), "still in dev");
    a.send_json(json!({"type":"join","room":"lobby"}));
    a.expect("room");
    let left = b.expect("left");
    assert_eq!(
        (left["name"].as_str(), left["count"].as_u64()),
        (Some("a"), Some(1))
    );
    server.shutdown();
}

#[test]
fn names_are_unique_regardless_of_case() {
    let server = start(config());
    let (mut alice, _) = Client::join(&server, "/chat?name=Alice");
    let (mut other, welcome) = Client::join(&server, "/chat?name=aLiCe");
    assert!(
        welcome["name"].as_str().unwrap().starts_with("guest-"),
        "taken name at connect still gets in"
    );
    assert_eq!(other.expect("error")["code"], "name_taken");
    other.send_json(json!({"type":"nick","name":"ALICE"}));
    assert_eq!(other.expect("error")["code"], "name_taken");
    let (_bad, welcome) = Client::join(&server, "/chat?name=%01x");
    assert!(welcome["name"].as_str().unwrap().starts_with("guest-"));
    alice.send_json(json!({"type":"nick","name":"alice"}));
    assert_eq!(
        alice.expect("renamed")["name"],
        "alice",
        "changing the case of your own name is allowed"
    );
    drop(alice);
    other.expect("left");
    other.send_json(json!({"type":"nick","name":"ALICE"}));
    assert_eq!(
        other.expect("renamed")["name"],
        "ALICE",
        "a freed name can be taken"
    );
    server.shutdown();
}

#[test]
fn presence_lists_stay_exact_after_churn() {
    let server = start(config());
    let (mut watcher, welcome) = Client::join(&server, "/chat?name=watcher");
    let mut users = names_of(&welcome);
    let mut kept = Vec::new();
    for i in 0..30 {
        let (mut c, _) = Client::join(&server, &format!("/chat?name=u{i}"));
        match i % 3 {
            0 => continue, // dropped: disconnects
            1 => c.send_json(json!({"type":"nick","name":format!("renamed{i}")})),
            _ => c.send_json(json!({"type":"join","room":"elsewhere"})),
        }
        kept.push(c);
    }
    // Joined mid-churn: its welcome lists itself and the watcher, whatever else was in flight.
    let (_early, early_welcome) = Client::join(&server, "/chat?name=early");
    assert!(names_of(&early_welcome).is_superset(&["watcher", "early"].map(String::from).into()));
    // Once the churn has settled: watcher, early and the ten renamed. The watcher heard the
    // first changes one by one and, past a burst of them, the room's whole list.
    let mut settled: BTreeSet<String> = ["watcher", "early"].map(String::from).into();
    settled.extend((1..30).step_by(3).map(|i| format!("renamed{i}")));
    follow_until(&mut watcher, &mut users, &settled);
    let (_late, late_welcome) = Client::join(&server, "/chat?name=late");
    settled.insert("late".into());
    assert_eq!(
        names_of(&late_welcome),
        settled,
        "a fresh join sees the settled list"
    );
    follow_until(&mut watcher, &mut users, &settled);
    server.shutdown();
}

fn names_of(welcome: &Value) -> BTreeSet<String> {
    let users = welcome["users"].as_array().expect("welcome lists users");
    users.iter().map(|u| u.as_str().unwrap().into()).collect()
}

/// Applies the watcher's presence events (one by one, or a whole list) to `users` until it
/// equals `want`, checking each event's `count` against the list so far.
fn follow_until(watcher: &mut Client, users: &mut BTreeSet<String>, want: &BTreeSet<String>) {
    while users != want {
        let ev = watcher.recv();
        let name = ev["name"].as_str().map(String::from);
        match ev["type"].as_str() {
            Some("joined") => assert!(users.insert(name.unwrap())),
            Some("left") => assert!(users.remove(&name.unwrap())),
            Some("renamed") => {
                assert!(users.remove(ev["from"].as_str().unwrap()));
                assert!(users.insert(name.unwrap()));
            }
            // Past a burst of changes the room hears its whole list instead.
            Some("presence") => *users = names_of(&ev),
            _ => continue,
        }
        assert!(users.len() <= 40);
        if let Some(count) = ev["count"].as_u64() {
            assert_eq!(users.len(), count as usize, "count matches after {ev}");
        }
    }
}

#[test]
fn a_burst_of_joins_is_told_as_one_list() {
    let server = start(Config {
        presence_burst: 4,
        ..config()
    });
    let (mut watcher, _) = Client::join(&server, "/chat?name=watcher");
    let _comers: Vec<_> = (0..10)
        .map(|i| Client::join(&server, &format!("/chat?name=c{i}")).0)
        .collect();
    // The watcher's own join was the first change of the window: three more one by one.
    for i in 0..3 {
        let told = watcher.recv();
        assert_eq!(
            (&told["type"], &told["name"]),
            (&json!("joined"), &json!(format!("c{i}")))
        );
    }
    let list = watcher.recv();
    assert_eq!(list["type"], "presence", "the rest as one list: {list}");
    let mut want: BTreeSet<String> = (0..10).map(|i| format!("c{i}")).collect();
    want.insert("watcher".into());
    assert_eq!((names_of(&list), list["count"].as_u64()), (want, Some(11)));
    server.shutdown();
}

#[test]
fn a_crowd_hears_counts_not_names() {
    let server = start(Config {
        presence_limit: 3,
        ..config()
    });
    let (mut a, _) = Client::join(&server, "/chat?name=a");
    let (_b, _) = Client::join(&server, "/chat?name=b");
    let (c, _) = Client::join(&server, "/chat?name=c");
    assert_eq!(a.expect("joined")["name"], "b");
    assert_eq!(a.expect("joined")["name"], "c");

    // The fourth member makes a crowd: its welcome lists the three longest present.
    let (mut d, welcome) = Client::join(&server, "/chat?name=d");
    assert_eq!(welcome["users"], json!(["a", "b", "c"]));
    assert_eq!(welcome["count"], 4);
    let counted = a.recv();
    assert_eq!(
        counted["type"], "presence",
        "no joined for a crowd: {counted}"
    );
    assert_eq!(counted["count"], 4);
    assert!(counted.get("users").is_none(), "{counted}");

    // In a crowd only the renamed client hears of its rename.
    d.send_json(json!({"type":"nick","name":"dora"}));
    assert_eq!(d.expect("renamed")["name"], "dora");
    drop(d);
    // Small again: the whole list, after which per-member events resume.
    let small = a.recv();
    assert_eq!(
        small["type"], "presence",
        "no left or renamed from a crowd: {small}"
    );
    assert_eq!(small["count"], 3);
    assert_eq!(small["users"], json!(["a", "b", "c"]));
    drop(c);
    let left = a.recv();
    assert_eq!(
        (&left["type"], &left["name"]),
        (&json!("left"), &json!("c"))
    );
    assert_eq!(left["count"], 2);
    server.shutdown();
}

#[test]
fn typing_is_relayed_to_others_and_expires() {
    let server = start(config());
    let (mut a, _) = Client::join(&server, "/chat?name=a");
    let (mut b, _) = Client::join(&server, "/chat?name=b");
    a.send_json(json!({"type":"typing","active":true}));
    let t = b.expect("typing");
    assert_eq!(
        (t["name"].as_str(), t["active"].as_bool()),
        (Some("a"), Some(true))
    );
    a.expect_none("typing", Duration::from_millis(100));
    let started = Instant::now();
    let t = b.expect("typing");
    assert_eq!(t["active"], false);
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_secs(3),
        "expired after ~5 s, not {waited:?}"
    );
    // A message ends typing at once; a disconnect too.
    a.send_json(json!({"type":"typing","active":true}));
    b.expect("typing");
    a.send("done typing");
    assert_eq!(b.expect("typing")["active"], false);
    a.send_json(json!({"type":"typing","active":true}));
    assert_eq!(b.expect("typing")["active"], true);
    drop(a);
    assert_eq!(b.expect("typing")["active"], false);
    server.shutdown();
}

#[test]
fn private_messages_reach_only_their_target() {
    let server = start(config());
    let (mut a, _) = Client::join(&server, "/chat?name=alice");
    let (mut b, _) = Client::join(&server, "/chat/other?name=bob");
    let (mut c, _) = Client::join(&server, "/chat?name=carol");
    a.send_json(json!({"type":"message","text":"psst","to":"BOB"}));
    let (to_b, echo) = (b.expect("message"), a.expect("message"));
    assert_eq!(to_b, echo, "same id and content on both sides");
    assert_eq!(
        (
            to_b["private"].as_bool(),
            to_b["from"].as_str(),
            to_b["to"].as_str()
        ),
        (Some(true), Some("alice"), Some("bob"))
    );
    c.expect_none("message", Duration::from_millis(200));
    a.send_json(json!({"type":"message","text":"hello?","to":"nobody"}));
    assert_eq!(a.expect("error")["code"], "no_such_user");
    let (_d, welcome) = Client::join(&server, "/chat");
    assert!(
        welcome["history"].as_array().unwrap().is_empty(),
        "private messages are not history"
    );
    server.shutdown();
}

#[test]
fn resume_with_since_has_no_gap_and_no_duplicate_while_others_send() {
    let server = start(fast_config());
    let (mut sender, _) = Client::join(&server, "/chat/busy?name=sender");
    let (mut reader, _) = Client::join(&server, "/chat/busy?name=reader");
    sender.send("first");
    let last_seen = reader.expect("message")["id"].as_u64().unwrap();
    drop(reader);
    // Keep sending from another thread while the reader is away and while it reconnects.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let pump = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && n < 500 {
            sender.send(&format!("m{n}"));
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        sender
    });
    std::thread::sleep(Duration::from_millis(100));
    let (mut reader, welcome) = Client::join(
        &server,
        &format!("/chat/busy?name=reader&since={last_seen}"),
    );
    assert_eq!(welcome["truncated"], false);
    let mut got = ids(&welcome["history"]);
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sender = pump.join().unwrap();
    sender.send("last");
    loop {
        let m = reader.expect("message");
        got.push(m["id"].as_u64().unwrap());
        if m["text"] == "last" {
            break;
        }
    }
    // The sender saw every id; the reader must have exactly those after last_seen.
    let mut all = Vec::new();
    loop {
        let m = sender.expect("message");
        let id = m["id"].as_u64().unwrap();
        if id > last_seen {
            all.push(id);
        }
        if m["text"] == "last" {
            break;
        }
    }
    assert!(got.len() > 20, "messages were sent during the reconnect");
    assert_eq!(got, all, "no gap, no duplicate, same order");
    server.shutdown();
}

#[test]
fn resume_from_too_far_back_says_truncated() {
    let server = start(Config {
        history: 5,
        ..fast_config()
    });
    let (mut c, _) = Client::join(&server, "/chat?name=c");
    for i in 0..10 {
        c.send(&format!("{i}"));
    }
    let first = c.expect("message")["id"].as_u64().unwrap();
    for _ in 1..10 {
        c.expect("message"); // all ten are history before the next client joins
    }
    let (_r, welcome) = Client::join(&server, &format!("/chat?since={first}"));
    assert_eq!(welcome["truncated"], true);
    assert_eq!(ids(&welcome["history"]).len(), 5);
    let newest = *ids(&welcome["history"]).last().unwrap();
    let (_r, welcome) = Client::join(&server, &format!("/chat?since={}", newest - 2));
    assert_eq!(
        (welcome["truncated"].as_bool(), ids(&welcome["history"])),
        (Some(false), vec![newest - 1, newest])
    );
    server.shutdown();
}

#[test]
fn history_and_ids_survive_a_restart() {
    let dir = temp_dir("restart");
    let cfg = Config {
        data_dir: Some(dir.clone()),
        ..fast_config()
    };
    let server = start(cfg.clone());
    let (mut c, _) = Client::join(&server, "/chat/keep?name=c");
    let sent: Vec<u64> = (0..5)
        .map(|i| {
            c.send(&format!("before {i}"));
            c.expect("message")["id"].as_u64().unwrap()
        })
        .collect();
    // A private message takes an id too, and is never stored: its id must not come back.
    c.send_json(json!({"type":"message","text":"note to self","to":"c"}));
    let private = c.expect("message")["id"].as_u64().unwrap();
    assert!(private > sent[4]);
    drop(c);
    server.shutdown();

    let server = start(cfg);
    let (mut c, welcome) = Client::join(&server, &format!("/chat/keep?since={}", sent[1]));
    assert_eq!(
        ids(&welcome["history"]),
        sent[2..],
        "private messages are not history"
    );
    c.send("after");
    assert!(
        c.expect("message")["id"].as_u64().unwrap() > private,
        "ids keep increasing, past the private message's too"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_torn_last_line_is_skipped_and_appends_continue() {
    let dir = temp_dir("torn");
    std::fs::create_dir_all(&dir).unwrap();
    let good = r#"{"type":"message","id":7,"room":"lobby","from":"a","text":"ok","ts":1}"#;
    std::fs::write(
        dir.join("history.jsonl"),
        format!("{good}\n{{\"type\":\"message\",\"id\":8,\"ro"),
    )
    .unwrap();
    let cfg = Config {
        data_dir: Some(dir.clone()),
        ..fast_config()
    };
    let server = start(cfg.clone());
    let (mut c, welcome) = Client::join(&server, "/chat");
    assert_eq!(ids(&welcome["history"]), [7]);
    c.send("next");
    let id = c.expect("message")["id"].as_u64().unwrap();
    assert_eq!(id, 8);
    server.shutdown();
    let server = start(cfg);
    let (_c, welcome) = Client::join(&server, "/chat");
    assert_eq!(
        ids(&welcome["history"]),
        [7, 8],
        "the line after the torn one is whole"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn compaction_keeps_the_last_n_per_room() {
    let dir = temp_dir("compact");
    let cfg = Config {
        data_dir: Some(dir.clone()),
        history: 3,
        compact_bytes: 2_000,
        ..fast_config()
    };
    let server = start(cfg.clone());
    let (mut a, _) = Client::join(&server, "/chat/a");
    let (mut b, _) = Client::join(&server, "/chat/b");
    let mut last_a = Vec::new();
    for i in 0..60 {
        a.send(&format!("a{i} {}", "x".repeat(50)));
        last_a.push(a.expect("message")["id"].as_u64().unwrap());
    }
    b.send("only b");
    let b_id = b.expect("message")["id"].as_u64().unwrap();
    server.shutdown();
    let len = std::fs::metadata(dir.join("history.jsonl")).unwrap().len();
    assert!(len < 4_000, "the file was compacted: {len} bytes");
    let server = start(cfg);
    let (_a, wa) = Client::join(&server, "/chat/a");
    let (mut b, wb) = Client::join(&server, "/chat/b");
    assert_eq!(ids(&wa["history"]), last_a[57..]);
    assert_eq!(ids(&wb["history"]), [b_id]);
    b.send("again");
    assert!(b.expect("message")["id"].as_u64().unwrap() > b_id);
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fsync_modes_all_persist_on_clean_shutdown() {
    for fsync in [
        wschat::config::Fsync::Always,
        wschat::config::Fsync::Interval,
        wschat::config::Fsync::Never,
    ] {
        let dir = temp_dir("fsync");
        let cfg = Config {
            data_dir: Some(dir.clone()),
            fsync,
            ..fast_config()
        };
        let server = start(cfg.clone());
        let (mut c, _) = Client::join(&server, "/chat");
        c.send("kept");
        let id = c.expect("message")["id"].as_u64().unwrap();
        server.shutdown();
        let server = start(cfg);
        let (_c, welcome) = Client::join(&server, "/chat");
        assert_eq!(ids(&welcome["history"]), [id], "{fsync:?}");
        server.shutdown();
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn the_room_count_is_bounded_for_joins_and_posts() {
    let server = start(Config {
        max_rooms: 2,
        api_token: Some("t".into()),
        ..fast_config()
    });
    let (mut a, _) = Client::join(&server, "/chat/one");
    a.send("history in one");
    a.expect("message");
    a.send_json(json!({"type":"join","room":"two"}));
    a.expect("room");
    a.send_json(json!({"type":"join","room":"three"}));
    assert_eq!(a.expect("error")["code"], "too_many_rooms");
    let (mut b, welcome) = Client::join(&server, "/chat/four");
    assert_eq!(
        welcome["room"], "lobby",
        "a full server puts newcomers in the lobby"
    );
    assert_eq!(b.expect("error")["code"], "too_many_rooms");
    let post = "POST /api/rooms/five/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
    let (status, _, body) = http_request(server.http_addr(), post);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("too_many_rooms"));
    server.shutdown();
}
