//! Reading the history file back at start: checked line by line, never trusted.
//!
//! A line becomes history only if it is a room message (never a private one) with a valid room
//! and an id above every earlier one and at most [`MAX_ID`]; a `next_id` line moves the id
//! counter, and a `forget` line drops what came before it of a room given up whole. A line longer than the bound is not
//! read into memory. Every line that fails is copied, as it was, to `history.jsonl.rejected`
//! next to the file, with a warning naming its line number; nothing is dropped silently. This
//! module only reads the file (and appends to the rejected one); it never rewrites it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::store::{self, Forgotten, NextId};
use super::{History, MAX_ID, Stored};
use crate::protocol::{self, ChatMessage};

/// Warnings logged for set-aside lines before the rest are only counted: a file of a million
/// bad lines must not flood the log.
const MAX_LINE_WARNINGS: u64 = 10;
/// Buffer for reading the file.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// What loading found.
#[derive(Default)]
pub(super) struct Loaded {
    pub file_len: u64,
    /// Lines set aside.
    pub rejected: u64,
    /// Every set-aside line is safe in the rejected file, so a rewrite may drop them.
    pub rejects_kept: bool,
}

impl Loaded {
    /// Whether to rewrite the file at once: to drop lines that are kept aside, or because a
    /// rewrite would remove most of it. Never while a rejected line exists only in the file.
    pub fn compact_now(&self, live_bytes: u64, compact_bytes: u64) -> bool {
        if self.rejected > 0 {
            return self.rejects_kept;
        }
        store::worth_compacting(self.file_len, live_bytes, compact_bytes)
    }
}

/// Loads `path` into `history` (the last messages per room, within its bounds) and moves its
/// id counter past every id the file shows.
pub(super) fn load(history: &mut History, path: &Path, max_line: usize) -> io::Result<Loaded> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(e),
    };
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    let mut rejects = Rejects::new(path.with_extension("jsonl.rejected"));
    let (mut line, mut number, mut loaded, mut last_id) = (Vec::new(), 0u64, 0u64, 0u64);
    while let Some(fits) = next_line(&mut reader, &mut line, max_line, &mut rejects)? {
        number += 1;
        let verdict = if fits {
            check(&line, last_id)
        } else {
            Verdict::Reject(format!("longer than {max_line} bytes"))
        };
        match verdict {
            Verdict::Blank => {}
            Verdict::NextId(next) => history.next_id = history.next_id.max(next),
            Verdict::Forget(room, up_to) => history.forget_loaded(&room, up_to),
            Verdict::Message(msg) => {
                last_id = msg.id;
                history.next_id = history.next_id.max(msg.id + 1);
                let stored = Stored {
                    id: msg.id,
                    ts: msg.ts,
                    frame: protocol::encode(&msg),
                };
                history.push(&msg.room, stored);
                loaded += 1;
            }
            Verdict::Reject(why) => rejects.reject(number, &why, if fits { &line } else { &[] }),
        }
    }
    let (rejected, rejects_kept) = rejects.finish(path);
    log::info!(
        "history: loaded {loaded} messages from {}, next id {}",
        path.display(),
        history.next_id
    );
    Ok(Loaded {
        file_len,
        rejected,
        rejects_kept,
    })
}

enum Verdict {
    Blank,
    NextId(u64),
    Forget(String, u64),
    Message(ChatMessage),
    Reject(String),
}

/// What one line of the file is, given the id of the last message before it.
fn check(line: &[u8], last_id: u64) -> Verdict {
    let Ok(text) = std::str::from_utf8(line) else {
        return Verdict::Reject("not UTF-8".into());
    };
    let text = text.trim();
    if text.is_empty() {
        return Verdict::Blank;
    }
    if let Ok(NextId { next_id }) = serde_json::from_str(text) {
        return match next_id {
            0..=MAX_ID => Verdict::NextId(next_id),
            _ => Verdict::Reject(format!("next id {next_id} is above {MAX_ID}")),
        };
    }
    if let Ok(Forgotten { forget, up_to }) = serde_json::from_str(text) {
        return match protocol::check_room(&forget) {
            Ok(_) => Verdict::Forget(forget, up_to),
            Err(_) => Verdict::Reject(format!("invalid room name {forget:?}")),
        };
    }
    let Ok(msg) = serde_json::from_str::<ChatMessage>(text) else {
        return Verdict::Reject("not a chat message (a torn write from a crash?)".into());
    };
    if msg.private || msg.to.is_some() {
        Verdict::Reject("a private message, which is never history".into())
    } else if protocol::check_room(&msg.room).is_err() {
        Verdict::Reject(format!("invalid room name {:?}", msg.room))
    } else if msg.id > MAX_ID {
        Verdict::Reject(format!("id {} is above {MAX_ID}", msg.id))
    } else if msg.id <= last_id {
        Verdict::Reject(format!("id {} does not follow id {last_id}", msg.id))
    } else {
        Verdict::Message(msg)
    }
}

/// Reads the next line (without its newline) into `line`; `Some(true)` if it fit in `max`
/// bytes. A longer one is copied to `rejects` piece by piece, never held whole: `Some(false)`.
fn next_line(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
    rejects: &mut Rejects,
) -> io::Result<Option<bool>> {
    line.clear();
    let (mut fits, mut any) = (true, false);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(any.then_some(fits));
        }
        any = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let piece = &buf[..newline.unwrap_or(buf.len())];
        if fits && line.len() + piece.len() > max {
            rejects.write(line);
            line.clear();
            fits = false;
        }
        if fits {
            line.extend_from_slice(piece);
        } else {
            rejects.write(piece);
        }
        let used = newline.map_or(buf.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            return Ok(Some(fits));
        }
    }
}

/// Lines set aside, appended as they were to the rejected file (opened on the first one).
struct Rejects {
    path: PathBuf,
    file: Option<io::BufWriter<File>>,
    count: u64,
    /// A write to the rejected file failed: some set-aside line exists only in the history file.
    lost: bool,
}

impl Rejects {
    fn new(path: PathBuf) -> Rejects {
        Rejects {
            path,
            file: None,
            count: 0,
            lost: false,
        }
    }

    /// Ends a set-aside line: `rest` is what was not written yet.
    fn reject(&mut self, number: u64, why: &str, rest: &[u8]) {
        self.write(rest);
        self.write(b"\n");
        self.count += 1;
        if self.count <= MAX_LINE_WARNINGS {
            log::warn!(
                "history: line {number} set aside in {}: {why}",
                self.path.display()
            );
        }
    }

    fn write(&mut self, piece: &[u8]) {
        if self.lost || piece.is_empty() {
            return;
        }
        if self.file.is_none() {
            let opened = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path);
            match opened {
                Ok(f) => self.file = Some(io::BufWriter::new(f)),
                Err(e) => return self.fail(&e),
            }
        }
        if let Some(Err(e)) = self.file.as_mut().map(|f| f.write_all(piece)) {
            self.fail(&e);
        }
    }

    fn fail(&mut self, e: &io::Error) {
        log::error!(
            "history: cannot keep set-aside lines in {}: {e}; the history file keeps them",
            self.path.display()
        );
        self.lost = true;
    }

    /// Flushes and syncs the rejected file; returns how many lines were set aside and whether
    /// all of them are safely in it.
    fn finish(mut self, history: &Path) -> (u64, bool) {
        if let Some(file) = self.file.take() {
            let synced = file
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all());
            if let Err(e) = synced {
                self.fail(&e);
            }
        }
        if self.count > MAX_LINE_WARNINGS {
            log::warn!(
                "history: {} lines of {} set aside in {} in all",
                self.count,
                history.display(),
                self.path.display()
            );
        }
        (self.count, !self.lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked() {
        let msg = |id: u64, extra: &str| {
            format!(
                r#"{{"type":"message","id":{id},"room":"r","from":"a","text":"t","ts":1{extra}}}"#
            )
        };
        let verdict = |line: &str, last| match check(line.as_bytes(), last) {
            Verdict::Message(m) => format!("message {}", m.id),
            Verdict::NextId(n) => format!("next {n}"),
            Verdict::Forget(room, up_to) => format!("forget {room} {up_to}"),
            Verdict::Blank => "blank".into(),
            Verdict::Reject(why) => why,
        };
        assert_eq!(verdict(&msg(5, ""), 4), "message 5");
        assert!(verdict(&msg(4, ""), 4).contains("does not follow"));
        assert!(verdict(&msg(u64::MAX, ""), 0).contains("above"));
        assert!(verdict(&msg(5, r#","private":true"#), 0).contains("private"));
        assert!(verdict(&msg(5, r#","to":"b""#), 0).contains("private"));
        assert_eq!(verdict(r#"{"next_id":9}"#, 0), "next 9");
        assert!(verdict(&format!(r#"{{"next_id":{}}}"#, u64::MAX), 0).contains("above"));
        assert_eq!(verdict(r#"{"forget":"r","up_to":5}"#, 5), "forget r 5");
        assert!(verdict(r#"{"forget":"no room!","up_to":5}"#, 5).contains("invalid room"));
        assert_eq!(verdict("  ", 0), "blank");
        assert!(verdict("{\"type\":\"mess", 0).contains("torn"));
        assert!(matches!(check(b"\xff\xfe", 0), Verdict::Reject(_)));
    }

    #[test]
    fn a_long_line_is_streamed_aside_not_held() {
        let dir = std::env::temp_dir().join(format!("wschat-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rejects = Rejects::new(dir.join("r"));
        let input = format!("short\n{}\nnext", "x".repeat(10_000));
        let mut reader = BufReader::with_capacity(64, input.as_bytes());
        let mut line = Vec::new();
        assert_eq!(
            next_line(&mut reader, &mut line, 100, &mut rejects).unwrap(),
            Some(true)
        );
        assert_eq!(line, b"short");
        assert_eq!(
            next_line(&mut reader, &mut line, 100, &mut rejects).unwrap(),
            Some(false)
        );
        assert!(line.capacity() <= 200, "the long line was never held");
        rejects.reject(2, "long", &[]);
        assert_eq!(
            next_line(&mut reader, &mut line, 100, &mut rejects).unwrap(),
            Some(true)
        );
        assert_eq!(line, b"next");
        assert_eq!(
            next_line(&mut reader, &mut line, 100, &mut rejects).unwrap(),
            None
        );
        assert_eq!(rejects.finish(Path::new("h")), (1, true));
        let aside = std::fs::read_to_string(dir.join("r")).unwrap();
        assert_eq!(aside, format!("{}\n", "x".repeat(10_000)));
        let _ = std::fs::remove_dir_all(dir);
    }
}
