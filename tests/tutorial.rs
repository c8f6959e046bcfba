//! docs/TUTORIAL.md cannot rot: every command block in it is run here, or mirrored, and the values
//! it computes by hand (the accept key, frames in hex) are recomputed with tungstenite.
//!
//! A command block's opening fence says how it is checked (GitHub shows only the language):
//! - ```` ```sh ````: run as it is with bash; its `# ` lines are the output it must print.
//! - ```` ```sh minimal ````: the same, with the minimal chat running; its address replaces
//!   `127.0.0.1:5000` (and `/dev/tcp`'s `127.0.0.1/5000`).
//! - ```` ```sh wschat ````: the same, with the real server running.
//! - ```` ```sh mirrored ```` (or any language): not run as written (a server that runs until
//!   Ctrl-C, a release build, 10,000 connections). [`mirror`] says what exercises each one, and a
//!   command it does not know fails the test.

mod common;
mod example_server;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use example_server::Minimal;
use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use wschat::config::{self, Parsed};
use wschat::{Config, Handle, Server};

const TUTORIAL: &str = include_str!("../docs/TUTORIAL.md");
/// The port the tutorial's commands use; tests put a free port in its place.
const DOC_PORT: &str = "5000";
/// Longest one block or one mirrored command may run before the test kills it.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The masking key of the tutorial's client frames.
const MASK: [u8; 4] = [0xa1, 0xb2, 0xc3, 0xd4];
/// Load-tool runs are scaled down to at most this many connections...
const MOST_LOAD_CONNECTIONS: u64 = 20;
/// ...and this many seconds of measuring, holding and draining.
const LOAD_SECONDS: &str = "1";

/// One fenced block of the tutorial.
struct Block {
    lang: String,
    tag: String,
    /// Its command lines (or, outside `sh`, its whole text as one command).
    commands: Vec<String>,
    /// Its `# ` lines, without the `# `.
    expected: Vec<String>,
}

fn blocks() -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = TUTORIAL.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```").filter(|i| !i.is_empty()) else {
            continue;
        };
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or_default().to_owned();
        let tag = words.next().unwrap_or_default().to_owned();
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let (expected, commands): (Vec<&str>, Vec<&str>) = if lang == "sh" {
            body.iter().partition(|l| l.starts_with('#'))
        } else {
            (Vec::new(), Vec::new())
        };
        let output = |l: &&str| l[1..].strip_prefix(' ').unwrap_or(&l[1..]).to_owned();
        let mut commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        if lang != "sh" {
            commands.push(body.join("\n"));
        }
        blocks.push(Block {
            lang,
            tag,
            commands,
            expected: expected.iter().map(output).collect(),
        });
    }
    blocks
}

/// The command blocks with this tag.
fn tagged(tag: &str) -> Vec<Block> {
    let is_command = |b: &Block| b.lang == "sh" || !b.tag.is_empty();
    blocks()
        .into_iter()
        .filter(|b| is_command(b) && b.tag == tag)
        .collect()
}

/// Runs `script` with bash (bounded by `RUN_LIMIT`) and returns its stdout, `\r` removed.
fn bash(script: &str) -> String {
    let mut child = Command::new("bash")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("bash runs");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    wait_bounded(&mut child, script);
    let out = reader.join().expect("reader thread");
    String::from_utf8_lossy(&out).replace('\r', "")
}

fn wait_bounded(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ran longer than {RUN_LIMIT:?}: {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a block's commands as one script and checks its output against the block's `# ` lines.
fn check_output(block: &Block, rewrite: impl Fn(&str) -> String) {
    let script = rewrite(&block.commands.join("\n"));
    let out = bash(&script);
    let actual: Vec<&str> = out.lines().map(str::trim_end).collect();
    let expected: Vec<&str> = block.expected.iter().map(|l| l.trim_end()).collect();
    let trim = |v: &[&str]| v.iter().rposition(|l| !l.is_empty()).map_or(0, |i| i + 1);
    assert_eq!(
        actual[..trim(&actual)],
        expected[..trim(&expected)],
        "the output of this tutorial block changed:\n{script}"
    );
}

/// The tutorial's address, and a server's in its place.
fn at(addr: std::net::SocketAddr) -> impl Fn(&str) -> String {
    move |text: &str| {
        text.replace(&format!("127.0.0.1:{DOC_PORT}"), &addr.to_string())
            .replace(
                &format!("127.0.0.1/{DOC_PORT}"),
                &format!("{}/{}", addr.ip(), addr.port()),
            )
    }
}

#[test]
fn plain_commands_print_what_the_tutorial_shows() {
    let blocks = tagged("");
    assert!(blocks.len() >= 2, "the handshake arithmetic is gone");
    for block in blocks {
        check_output(&block, str::to_owned);
    }
}

#[test]
fn commands_against_the_minimal_chat_print_what_the_tutorial_shows() {
    let blocks = tagged("minimal");
    assert!(blocks.len() >= 3, "the curl and bash sessions are gone");
    for block in blocks {
        let server = Minimal::start();
        check_output(&block, at(server.addr));
    }
}

#[test]
fn commands_against_wschat_print_what_the_tutorial_shows() {
    let blocks = tagged("wschat");
    assert!(!blocks.is_empty());
    for block in blocks {
        let server = common::start(common::config());
        check_output(&block, at(server.http_addr()));
        server.shutdown();
    }
}

#[test]
fn every_block_tag_is_one_this_test_knows() {
    for block in blocks() {
        let known = ["", "minimal", "wschat", "mirrored"].contains(&block.tag.as_str());
        assert!(
            known,
            "unknown tag {:?} on a ```{} block",
            block.tag, block.lang
        );
    }
}

/// How a mirrored command is exercised.
enum Mirror {
    /// By a test of this name in this file.
    Test(&'static str, &'static str),
    /// Run as written, but a debug build instead of `--release` (quicker, same targets).
    DebugBuild,
    /// `wschat` with these flags: parsed as the binary parses them, and started on a free port.
    Server(Vec<String>),
    /// `wschat-load` with these arguments, run scaled down against the matching server.
    Load(Vec<String>),
}

/// What exercises a mirrored command, or `None` if nothing does.
fn mirror(command: &str) -> Option<Mirror> {
    let words = |rest: &str| rest.split_whitespace().map(str::to_owned).collect();
    if let Some(rest) = command.strip_prefix("target/release/wschat-load ") {
        return Some(Mirror::Load(words(rest)));
    }
    if let Some(rest) = command.strip_prefix("target/release/wschat ") {
        return Some(Mirror::Server(words(rest)));
    }
    let by_test = |name| Some(Mirror::Test("tests/minimal.rs", name));
    match command {
        "PORT=5000 cargo run --example minimal" | "PORT=5000 target/release/examples/minimal" => {
            by_test("it_prints_where_it_listens_and_logs_connects_and_disconnects")
        }
        "websocat ws://127.0.0.1:5000/" => by_test("echo_hello_world"),
        c if c.starts_with("const ws = new WebSocket(\"ws://127.0.0.1:5000/\");") => {
            by_test("echo_hello_world")
        }
        "cargo test --test minimal" => by_test("two_clients_see_each_others_messages"),
        c if c.starts_with("cargo build --release ") => Some(Mirror::DebugBuild),
        _ => None,
    }
}

fn mirrored_commands() -> Vec<String> {
    tagged("mirrored")
        .into_iter()
        .flat_map(|b| b.commands)
        .collect()
}

#[test]
fn every_mirrored_command_has_a_mirror_and_its_test_exists() {
    let commands = mirrored_commands();
    assert!(commands.len() >= 10);
    for command in commands {
        match mirror(&command) {
            None => panic!("no mirror for the tutorial's command {command:?}: add one"),
            Some(Mirror::Test(file, name)) => {
                let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
                let source = std::fs::read_to_string(path).expect("the mirroring test file");
                assert!(
                    source.contains(&format!("fn {name}()")),
                    "{file} has no test {name}"
                );
            }
            Some(_) => {} // run by the tests below
        }
    }
}

#[test]
fn the_build_command_builds_what_the_tutorial_runs() {
    for command in mirrored_commands() {
        if let Some(Mirror::DebugBuild) = mirror(&command) {
            let args: Vec<&str> = command
                .split_whitespace()
                .skip(1)
                .filter(|a| *a != "--release")
                .collect();
            let mut cargo = Command::new(env!("CARGO"));
            cargo
                .args(&args)
                .arg("--quiet")
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            let status = wait_bounded(&mut cargo.spawn().expect("cargo runs"), &command);
            assert!(status.success(), "{command}");
        }
    }
}

/// The config `wschat` would run with these flags, on a free port and a scratch data directory.
fn server_config(flags: &[String]) -> Config {
    let args = ["wschat"]
        .iter()
        .map(|s| s.to_string())
        .chain(flags.iter().cloned());
    let args = args.chain(["--port".to_owned(), "0".to_owned()]);
    let Ok(Parsed::Run(config)) = config::parse_args(args.map(Into::into), |_| None) else {
        panic!("wschat does not take the tutorial's flags {flags:?}");
    };
    let mut config = *config;
    if config.data_dir.is_some() {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tutorial-{}", std::process::id()));
        config.data_dir = Some(dir);
    }
    config
}

#[test]
fn every_server_command_starts_a_server_that_answers() {
    let servers: Vec<Vec<String>> = (mirrored_commands().iter())
        .filter_map(|c| match mirror(c) {
            Some(Mirror::Server(flags)) => Some(flags),
            _ => None,
        })
        .collect();
    assert!(
        servers.len() >= 3,
        "the benchmark, history and default servers are gone"
    );
    for flags in servers {
        let handle = Server::start(server_config(&flags)).expect("the tutorial's server starts");
        let (status, _, body) = common::http_get(handle.http_addr(), "/healthz");
        assert_eq!((status, body.trim()), (200, "ok"), "wschat {flags:?}");
        handle.shutdown();
    }
}

/// A load-tool command made small: fewer connections, a second of each phase, the test's own
/// servers in place of the tutorial's.
fn scaled(args: &[String], url: &str, pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        out.push(arg.clone());
        let value = |v: Option<&String>| v.expect("a flag's value").clone();
        match arg.as_str() {
            "--url" => out.push(
                value(args.next())
                    .replace("ws://127.0.0.1:5000/chat", url)
                    .replace("ws://127.0.0.1:5000/", url),
            ),
            "-c" | "-n" => {
                let n: u64 = value(args.next()).parse().expect("a count");
                out.push(n.min(MOST_LOAD_CONNECTIONS).to_string());
            }
            "--server-pid" => {
                // `$(pgrep -x NAME)`, three words: the test's server is not found by name.
                let words: Vec<String> = args.by_ref().take(3).cloned().collect();
                assert!(
                    words[0] == "$(pgrep" && words[2].ends_with(')'),
                    "{words:?}"
                );
                out.push(pid.to_string());
            }
            _ => {}
        }
    }
    let quick = [
        "-d",
        LOAD_SECONDS,
        "--warmup",
        "0",
        "--hold",
        LOAD_SECONDS,
        "--drain",
        LOAD_SECONDS,
        "-q",
    ];
    out.extend(quick.iter().map(|s| s.to_string()));
    out
}

fn run_load(args: &[String]) -> (i32, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wschat-load"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wschat-load starts");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let status = wait_bounded(&mut child, &args.join(" "));
    let out = reader.join().expect("reader thread");
    let last = out.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {out}"));
    (status.code().unwrap_or(-1), json)
}

#[test]
fn every_load_tool_command_runs_scaled_down() {
    let loads: Vec<Vec<String>> = (mirrored_commands().iter())
        .filter_map(|c| match mirror(c) {
            Some(Mirror::Load(args)) => Some(args),
            _ => None,
        })
        .collect();
    assert!(loads.len() >= 8, "the ladder's measurements are gone");
    // The tutorial's first server command is the benchmark one, limits lifted.
    let bench_flags = (mirrored_commands().iter())
        .find_map(|c| match mirror(c) {
            Some(Mirror::Server(flags)) => Some(flags),
            _ => None,
        })
        .expect("a server command");
    let wschat: Handle = Server::start(server_config(&bench_flags)).expect("server starts");
    let minimal = Minimal::start();
    for args in loads {
        let raw = args.iter().any(|a| a == "--raw");
        let (url, pid) = if raw {
            (format!("ws://{}/", minimal.addr), minimal.pid())
        } else {
            (wschat.ws_url(), std::process::id())
        };
        let (code, json) = run_load(&scaled(&args, &url, pid));
        assert_eq!(json["mode"], args[0], "{args:?}");
        if raw {
            // The minimal chat may drop receivers as too slow under fan-out (the tutorial's
            // point); the run itself must still complete (2 = completed with losses).
            assert!(code == 0 || code == 2, "exit {code} for {args:?}: {json}");
        } else {
            assert_eq!(
                (code, &json["ok"]),
                (0, &Value::Bool(true)),
                "{args:?}: {json}"
            );
        }
    }
    wschat.shutdown();
}

#[test]
fn the_accept_key_is_the_one_tungstenite_derives() {
    let accept = tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert!(TUTORIAL.contains(&format!("# sec-websocket-accept: {accept}")));
    assert!(TUTORIAL.contains(&format!("# {accept}\n")));
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn encode(frame: Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame.format(&mut out).expect("a frame encodes");
    out
}

fn text_frame(text: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = Frame::message(text.to_owned(), OpCode::Data(Data::Text), true);
    frame.header_mut().mask = mask;
    encode(frame)
}

fn close_frame(mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut frame = Frame::close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }));
    frame.header_mut().mask = mask;
    encode(frame)
}

#[test]
fn the_frames_in_hex_are_the_ones_tungstenite_encodes() {
    let client = text_frame("hello world", Some(MASK));
    assert!(
        TUTORIAL.contains(&format!("\n{}\n", hex(&client))),
        "{}",
        hex(&client)
    );
    let server = text_frame("hello world", None);
    assert!(
        TUTORIAL.contains(&format!("\n{}\n", hex(&server))),
        "{}",
        hex(&server)
    );
    for (len, header_len) in [(300, 4), (70_000, 10)] {
        let frame = text_frame(&"x".repeat(len), None);
        assert!(
            TUTORIAL.contains(&format!("\n{}\n", hex(&frame[..header_len]))),
            "{len}"
        );
    }
    assert!(TUTORIAL.contains(&format!("`{}`", hex(&close_frame(None)))));
    // The bash session sends these exact bytes.
    let escaped = |b: &[u8]| b.iter().map(|b| format!("\\x{b:02x}")).collect::<String>();
    assert!(TUTORIAL.contains(&format!("printf '{}' >&3", escaped(&client))));
    assert!(TUTORIAL.contains(&format!(
        "printf '{}' >&3",
        escaped(&close_frame(Some(MASK)))
    )));
}

#[test]
fn the_unmasking_table_is_the_xor_of_its_rows() {
    let payload = b"hello world";
    let key: Vec<u8> = MASK.iter().cycle().take(payload.len()).copied().collect();
    let masked: Vec<u8> = payload.iter().zip(&key).map(|(p, k)| p ^ k).collect();
    for (label, row) in [("masked", &masked[..]), ("key", &key), ("XOR", payload)] {
        assert!(
            TUTORIAL.contains(&format!("{label:<9}{}\n", hex(row))),
            "row {label}"
        );
    }
}

#[test]
fn the_walkthrough_names_and_values_are_the_examples() {
    let source = include_str!("../examples/minimal.rs");
    let start = TUTORIAL.find("## 4.").expect("the walkthrough");
    let end = TUTORIAL[start..]
        .find("## 5.")
        .expect("the section after it")
        + start;
    let walkthrough = &TUTORIAL[start..end];
    let is_name = |s: &&str| {
        s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == ':')
    };
    let names = walkthrough.split('`').skip(1).step_by(2).filter(is_name);
    for name in names.filter(|n| n.chars().any(char::is_alphabetic)) {
        let last = name.rsplit("::").next().unwrap_or(name);
        assert!(
            source.contains(last),
            "the walkthrough names `{name}`, the example has no {last}"
        );
    }
    for (said, coded) in [
        ("`CLIENT_QUEUE`, 128", "CLIENT_QUEUE: usize = 128;"),
        (
            "`MAX_MESSAGE_BYTES` (64 KiB)",
            "MAX_MESSAGE_BYTES: usize = 64 * 1024;",
        ),
        (
            "`PING_INTERVAL` (30 s)",
            "PING_INTERVAL: Duration = Duration::from_secs(30);",
        ),
        (
            "`WRITE_TIMEOUT`, 10 s",
            "WRITE_TIMEOUT: Duration = Duration::from_secs(10);",
        ),
    ] {
        assert!(
            walkthrough.contains(said),
            "the walkthrough no longer says {said}"
        );
        assert!(source.contains(coded), "the example no longer has {coded}");
    }
}
