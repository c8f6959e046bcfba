//! Message history: the last N messages of every room, the message id counter, and (with
//! `--data-dir`) the append-only file that makes both survive a restart.
//!
//! The file is JSON lines, one message frame per line, exactly the bytes that were broadcast.
//! Appends are buffered and written by [`History::commit`], which the dispatcher calls once per
//! batch of events *before* it broadcasts them (group commit: one write and at most one sync for
//! many messages). This module is owned by the dispatcher thread; it knows nothing of clients.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{FSYNC_INTERVAL, Fsync};
use crate::protocol::{ChatMessage, Frame};

/// Name of the history file inside `--data-dir`.
pub const FILE_NAME: &str = "history.jsonl";

/// One stored message: its id and the exact frame clients received.
#[derive(Clone, Debug)]
pub struct Stored {
    pub id: u64,
    pub frame: Frame,
}

/// A room's recent messages and what has fallen out of them.
#[derive(Default)]
struct RoomLog {
    messages: VecDeque<Stored>,
    /// Largest id dropped from `messages`; a resume from below it has a gap.
    evicted_up_to: u64,
}

/// The messages a client asked for, and whether some it asked for are gone.
pub struct Slice<'a> {
    pub messages: Vec<&'a Stored>,
    pub truncated: bool,
}

pub struct History {
    limit: usize,
    rooms: HashMap<String, RoomLog>,
    next_id: u64,
    store: Option<Store>,
}

impl History {
    /// In-memory history, or history loaded from (and appended to) `data_dir`.
    pub fn open(
        limit: usize,
        data_dir: Option<&Path>,
        fsync: Fsync,
        compact_bytes: u64,
    ) -> io::Result<Self> {
        let mut history = History {
            limit,
            rooms: HashMap::new(),
            next_id: 1,
            store: None,
        };
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(FILE_NAME);
            let file_len = history.load(&path)?;
            history.store = Some(Store::open(path, file_len, fsync, compact_bytes)?);
            history.compact_if_needed()?;
        }
        Ok(history)
    }

    /// Reads the file line by line, keeping the last `limit` per room. Lines that do not parse
    /// (a torn last line after a crash) are skipped with a warning.
    fn load(&mut self, path: &Path) -> io::Result<u64> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let file_len = file.metadata()?.len();
        let (mut loaded, mut skipped) = (0u64, 0u64);
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                // Not UTF-8: the line was consumed; count it and go on.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(e),
            }
            match self.load_line(line.trim_end()) {
                Some(()) => loaded += 1,
                None if line.trim().is_empty() => {}
                None => skipped += 1,
            }
        }
        if skipped > 0 {
            log::warn!(
                "history: skipped {skipped} unreadable line(s) in {} (a torn write from a crash?)",
                path.display()
            );
        }
        log::info!(
            "history: loaded {loaded} messages from {}, next id {}",
            path.display(),
            self.next_id
        );
        Ok(file_len)
    }

    fn load_line(&mut self, line: &str) -> Option<()> {
        if let Ok(meta) = serde_json::from_str::<NextId>(line) {
            self.next_id = self.next_id.max(meta.next_id);
            return Some(());
        }
        let msg: ChatMessage = serde_json::from_str(line).ok()?;
        crate::protocol::check_room(&msg.room).ok()?;
        self.next_id = self.next_id.max(msg.id + 1);
        self.push(
            &msg.room,
            Stored {
                id: msg.id,
                frame: line.to_owned().into(),
            },
        );
        Some(())
    }

    /// The id for the next accepted room message (stored, so a restart continues after it).
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// An id for a message that is not stored (a private one): the file records the counter
    /// past it, so a restart never hands the same id to another message.
    pub fn take_unstored_id(&mut self) -> u64 {
        let id = self.take_id();
        if let Some(store) = &mut self.store
            && let Ok(line) = serde_json::to_string(&NextId { next_id: id + 1 })
        {
            store.pending.extend_from_slice(line.as_bytes());
            store.pending.push(b'\n');
        }
        id
    }

    /// Records a room message; it reaches the file at the next [`History::commit`].
    pub fn append(&mut self, room: &str, stored: Stored) {
        if let Some(store) = &mut self.store {
            store.pending.extend_from_slice(stored.frame.as_bytes());
            store.pending.push(b'\n');
        }
        self.push(room, stored);
    }

    fn push(&mut self, room: &str, stored: Stored) {
        let log = self.rooms.entry(room.to_owned()).or_default();
        log.messages.push_back(stored);
        while log.messages.len() > self.limit {
            if let Some(old) = log.messages.pop_front() {
                log.evicted_up_to = old.id;
            }
        }
    }

    /// Messages of `room` after `since` (all kept ones when `since` is `None`), at most `limit`
    /// of the newest.
    pub fn slice(&self, room: &str, since: Option<u64>, limit: usize) -> Slice<'_> {
        let Some(log) = self.rooms.get(room) else {
            return Slice {
                messages: Vec::new(),
                truncated: false,
            };
        };
        let after = since.unwrap_or(0);
        let newer: Vec<&Stored> = log.messages.iter().filter(|m| m.id > after).collect();
        let skip = newer.len().saturating_sub(limit);
        let truncated = since.is_some() && (after < log.evicted_up_to || skip > 0);
        Slice {
            messages: newer[skip..].to_vec(),
            truncated,
        }
    }

    /// Whether a room has any stored history.
    pub fn has_room(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    /// How many rooms have history.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Rooms that have history.
    pub fn room_names(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }

    /// Messages held in memory, over all rooms (a metric).
    pub fn len(&self) -> usize {
        self.rooms.values().map(|r| r.messages.len()).sum()
    }

    /// Whether no room has any history.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Writes appended messages to the file and syncs as `--fsync` says. Call before
    /// broadcasting them: a message is on disk before anyone sees its id.
    pub fn commit(&mut self) -> io::Result<()> {
        let Some(store) = &mut self.store else {
            return Ok(());
        };
        store.write_pending()?;
        self.compact_if_needed()
    }

    /// When `--fsync interval` has unsynced data, the moment it must be synced.
    pub fn sync_deadline(&self) -> Option<Instant> {
        self.store.as_ref().and_then(Store::sync_deadline)
    }

    /// Rewrites the file with only what memory holds, when it has grown past its bound.
    fn compact_if_needed(&mut self) -> io::Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        if store.file_len <= store.compact_at {
            return Ok(());
        }
        let mut all: Vec<&Stored> = self
            .rooms
            .values()
            .flat_map(|r| r.messages.iter())
            .collect();
        all.sort_unstable_by_key(|m| m.id);
        let next_id = self.next_id;
        if let Some(store) = &mut self.store {
            store.rewrite(next_id, &all)?;
        }
        Ok(())
    }
}

/// The first line of a compacted file, and the line after a private message's id: keeps ids
/// increasing even where no stored message shows them.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NextId {
    next_id: u64,
}

/// The open history file.
struct Store {
    path: PathBuf,
    file: File,
    fsync: Fsync,
    /// Lines appended since the last commit.
    pending: Vec<u8>,
    file_len: u64,
    /// Compact when the file grows past this; raised after each compaction so a history that is
    /// large by itself is not rewritten on every commit.
    compact_at: u64,
    compact_bytes: u64,
    /// Under `--fsync interval`, when data was first written without a sync.
    unsynced_since: Option<Instant>,
}

impl Store {
    fn open(path: PathBuf, file_len: u64, fsync: Fsync, compact_bytes: u64) -> io::Result<Store> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let mut file_len = file_len;
        if file_len > 0 && !ends_with_newline(&mut file)? {
            // A torn last line: start the next append on a line of its own.
            file.write_all(b"\n")?;
            file_len += 1;
        }
        Ok(Store {
            path,
            file,
            fsync,
            pending: Vec::new(),
            file_len,
            compact_at: compact_bytes,
            compact_bytes,
            unsynced_since: None,
        })
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all(&self.pending)?;
            self.file_len += self.pending.len() as u64;
            self.pending.clear();
            if self.pending.capacity() > 1 << 20 {
                self.pending = Vec::new();
            }
            match self.fsync {
                Fsync::Always => self.file.sync_data()?,
                Fsync::Interval => {
                    self.unsynced_since.get_or_insert_with(Instant::now);
                }
                Fsync::Never => {}
            }
        }
        if self.sync_deadline().is_some_and(|d| d <= Instant::now()) {
            self.file.sync_data()?;
            self.unsynced_since = None;
        }
        Ok(())
    }

    fn sync_deadline(&self) -> Option<Instant> {
        self.unsynced_since.map(|t| t + FSYNC_INTERVAL)
    }

    /// Writes `messages` to a temporary file, syncs it, and renames it over the old one, so a
    /// crash at any point leaves either the old or the new file whole.
    fn rewrite(&mut self, next_id: u64, messages: &[&Stored]) -> io::Result<()> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        let header = serde_json::to_string(&NextId { next_id }).map_err(io::Error::other)?;
        writeln!(out, "{header}")?;
        for m in messages {
            writeln!(out, "{}", m.frame.as_str())?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let new_len = file.metadata()?.len();
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.path)?;
        log::info!(
            "history: compacted {} from {} to {} bytes",
            self.path.display(),
            self.file_len,
            new_len
        );
        self.file_len = new_len;
        self.compact_at = self.compact_bytes.max(new_len.saturating_mul(2));
        self.unsynced_since = None;
        Ok(())
    }
}

fn ends_with_newline(file: &mut File) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(id: u64) -> Stored {
        Stored {
            id,
            frame: format!("{{\"id\":{id}}}").into(),
        }
    }

    #[test]
    fn keeps_the_last_n_and_reports_gaps() {
        let mut h = History::open(3, None, Fsync::Never, 0).unwrap();
        for id in 1..=5 {
            h.append("r", stored(id));
        }
        let ids = |s: Slice| s.messages.iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(h.slice("r", None, 100)), [3, 4, 5]);
        assert_eq!(ids(h.slice("r", Some(3), 100)), [4, 5]);
        assert!(!h.slice("r", Some(2), 100).truncated);
        assert!(h.slice("r", Some(1), 100).truncated);
        assert_eq!(ids(h.slice("r", None, 2)), [4, 5]);
        assert!(h.slice("empty", Some(0), 100).messages.is_empty());
    }
}
