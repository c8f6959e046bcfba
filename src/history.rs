//! Message history: the recent messages of every room, bounded per room and in bytes over all
//! rooms, the message id counter, and (with `--data-dir`) the file that makes both survive a
//! restart (`store`, read back by `load`).
//!
//! A message is *staged* by [`History::append`] and becomes history only when
//! [`History::commit`] has saved its batch: the dispatcher calls it once per batch, before it
//! broadcasts, and refuses the batch's messages when it fails, so nothing that was shown can be
//! lost and nothing that was lost was shown. This module is owned by the dispatcher thread; it
//! knows nothing of clients.

mod load;
mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Fsync;
use crate::protocol::Frame;

pub use store::SaveError;

/// Name of the history file inside `--data-dir`.
pub const FILE_NAME: &str = "history.jsonl";
/// Largest message id ever accepted from the file: half of JavaScript's exact-integer range
/// (2^53), so clients hold every id exactly and counting on from the largest one cannot reach
/// the end of that range in any lifetime.
pub const MAX_ID: u64 = 1 << 52;
/// What a stored message costs besides its frame's bytes: its slot in the room's queue, the
/// frame's shared header and allocation, its entry in the age index. Counted in the byte budget
/// so that the budget bounds memory, not just text.
const STORED_OVERHEAD_BYTES: usize = 160;

/// Longest line of the history file for messages of at most `max_message_bytes`: JSON escaping
/// at most doubles the text (only `"`, `\\`, tab, newline and carriage return are escaped; other
/// control characters are refused), plus the other fields and their names.
pub fn max_line_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(2).saturating_add(1 << 10)
}

/// One stored message: its id, its time (ms since the epoch) and the exact frame clients got.
#[derive(Clone, Debug)]
pub struct Stored {
    pub id: u64,
    pub ts: u64,
    pub frame: Frame,
}

impl Stored {
    fn cost(&self) -> usize {
        self.frame.len() + STORED_OVERHEAD_BYTES
    }
}

/// A room's recent messages and what has fallen out of them.
#[derive(Default)]
struct RoomLog {
    messages: VecDeque<Stored>,
    /// Largest id dropped from `messages`; a resume from below it has a gap.
    evicted_up_to: u64,
    /// Time of the newest message (ms since the epoch): how long the room has been quiet.
    last_ts: u64,
}

/// The messages a client asked for, in id order, and what was left out.
pub struct Slice<'a> {
    pub messages: Vec<&'a Stored>,
    /// Some messages after `since` are gone for good (evicted): the client missed them.
    pub truncated: bool,
    /// Some messages after `since` are kept but did not fit this answer (count or bytes).
    pub more: bool,
}

/// How much history is kept, and where.
pub struct Settings<'a> {
    /// Messages kept per room (`--history`).
    pub per_room: usize,
    /// Bytes kept over all rooms (`--history-bytes`); the globally oldest go first.
    pub total_bytes: usize,
    pub data_dir: Option<&'a Path>,
    pub fsync: Fsync,
    /// The file is compacted above this size, if that removes at least half of it.
    pub compact_bytes: u64,
    /// Longest line read from the file; longer ones are set aside unread.
    pub max_line_bytes: usize,
}

pub struct History {
    per_room: usize,
    total_bytes: usize,
    rooms: HashMap<Arc<str>, RoomLog>,
    /// Every kept message's id and its room, so the globally oldest is found at once.
    ages: BTreeMap<u64, Arc<str>>,
    /// What the kept messages cost, as [`Stored::cost`] counts.
    bytes: usize,
    /// Largest id of a room forgotten whole: a resume from before it in such a room has a gap.
    forgotten_up_to: u64,
    next_id: u64,
    /// Messages of this batch, waiting for [`History::commit`].
    staged: Vec<(String, Stored)>,
    store: Option<store::Store>,
}

impl History {
    /// In-memory history, or history loaded from (and appended to) `settings.data_dir`.
    pub fn open(settings: &Settings) -> io::Result<Self> {
        let mut history = History {
            per_room: settings.per_room,
            total_bytes: settings.total_bytes,
            rooms: HashMap::new(),
            ages: BTreeMap::new(),
            bytes: 0,
            forgotten_up_to: 0,
            next_id: 1,
            staged: Vec::new(),
            store: None,
        };
        if let Some(dir) = settings.data_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(FILE_NAME);
            let loaded = load::load(&mut history, &path, settings.max_line_bytes)?;
            let mut store = store::Store::open(path, settings)?;
            if loaded.compact_now(history.live_file_bytes(), settings.compact_bytes) {
                store.compact_now(history.next_id, &history.snapshot());
            }
            history.store = Some(store);
        }
        Ok(history)
    }

    /// The id for the next room message; ids only move forward, even for refused messages.
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.saturating_add(1);
        id
    }

    /// An id for a message that is not stored (a private one): the file records the counter
    /// past it in the same batch, so a restart never hands the same id to another message.
    pub fn take_unstored_id(&mut self) -> u64 {
        let id = self.take_id();
        if let Some(store) = &mut self.store {
            store.stage_next_id(self.next_id);
        }
        id
    }

    /// Stages a room message; it becomes history when [`History::commit`] has saved it.
    pub fn append(&mut self, room: &str, stored: Stored) {
        if let Some(store) = &mut self.store {
            store.stage(&stored.frame);
        }
        self.staged.push((room.to_owned(), stored));
    }

    /// Saves the staged messages (write, and sync as `--fsync` says) and makes them history.
    /// On failure none of them is kept: the caller must not show them to anyone.
    pub fn commit(&mut self) -> Result<(), SaveError> {
        let staged = std::mem::take(&mut self.staged);
        if let Some(store) = &mut self.store {
            store.commit()?;
        }
        for (room, stored) in staged {
            self.push(&room, stored);
        }
        self.compact_if_worth_it();
        Ok(())
    }

    /// Starts a compaction in a helper thread when the file is mostly lines memory no longer
    /// holds.
    fn compact_if_worth_it(&mut self) {
        let live = self.live_file_bytes();
        if !self
            .store
            .as_ref()
            .is_some_and(|s| s.wants_compaction(live))
        {
            return;
        }
        let (next_id, frames) = (self.next_id, self.snapshot());
        if let Some(store) = &mut self.store {
            store.start_compaction(next_id, frames);
        }
    }

    /// Waits for a compaction in progress and puts its file in place (at shutdown).
    pub fn finish(&mut self) {
        if let Some(store) = &mut self.store {
            store.finish_compaction();
        }
    }

    /// When the dispatcher must wake even without events: an `--fsync interval` sync that is
    /// due, or a look at a compaction running in its helper thread.
    pub fn wake_at(&self) -> Option<Instant> {
        self.store.as_ref().and_then(store::Store::wake_at)
    }

    /// Why messages cannot be saved right now, while they cannot.
    pub fn outage(&self) -> Option<&str> {
        self.store.as_ref().and_then(store::Store::outage)
    }

    /// Failed writes and syncs since the start (a metric).
    pub fn write_failures(&self) -> u64 {
        self.store.as_ref().map_or(0, store::Store::failures)
    }

    /// Adds a saved message (or one loaded from the file), then evicts what is over the bounds.
    fn push(&mut self, room: &str, stored: Stored) {
        self.bytes += stored.cost();
        let name = match self.rooms.get_key_value(room) {
            Some((name, _)) => name.clone(),
            None => Arc::from(room),
        };
        self.ages.insert(stored.id, name.clone());
        let log = self.rooms.entry(name).or_default();
        log.last_ts = log.last_ts.max(stored.ts);
        log.messages.push_back(stored);
        if log.messages.len() > self.per_room {
            self.evict_oldest_of(room);
        }
        while self.bytes > self.total_bytes {
            let Some(oldest) = self.ages.first_key_value().map(|(_, r)| r.clone()) else {
                break;
            };
            self.evict_oldest_of(&oldest);
        }
    }

    fn evict_oldest_of(&mut self, room: &str) {
        let Some(log) = self.rooms.get_mut(room) else {
            return;
        };
        if let Some(old) = log.messages.pop_front() {
            log.evicted_up_to = old.id;
            self.ages.remove(&old.id);
            self.bytes -= old.cost();
        }
        if log.messages.is_empty() {
            self.forget(room);
        }
    }

    /// Drops a room's history whole; its slot is free again. Returns the room's newest id.
    fn forget(&mut self, room: &str) -> Option<u64> {
        let log = self.rooms.remove(room)?;
        for m in &log.messages {
            self.ages.remove(&m.id);
            self.bytes -= m.cost();
        }
        let last = log.messages.back().map_or(log.evicted_up_to, |m| m.id);
        self.forgotten_up_to = self.forgotten_up_to.max(last);
        Some(last)
    }

    /// A `forget` line of the file: the room's lines before it are not history.
    fn forget_loaded(&mut self, room: &str, up_to: u64) {
        let newest = self.rooms.get(room).and_then(|log| log.messages.back());
        if newest.is_some_and(|m| m.id <= up_to) {
            self.forget(room);
        }
    }

    /// Frees the slot of the room quiet the longest among those `may_forget` allows, if its
    /// newest message is older than `quiet_before` (ms since the epoch). Returns the room. The
    /// file records it with the next commit, so the room stays forgotten after a restart.
    pub fn forget_quietest(
        &mut self,
        quiet_before: u64,
        may_forget: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let (room, _) = self
            .rooms
            .iter()
            .filter(|(name, log)| log.last_ts < quiet_before && may_forget(name))
            .min_by_key(|(_, log)| log.last_ts)?;
        let room = room.to_string();
        let up_to = self.forget(&room)?;
        if let Some(store) = &mut self.store {
            store.stage_forgotten(&room, up_to);
        }
        Some(room)
    }

    /// The newest messages of `room` after `since` (all kept ones when `None`) that fit in
    /// `max_count` and `max_bytes` (at least one, however big): what a `welcome` carries.
    pub fn newest(
        &self,
        room: &str,
        since: Option<u64>,
        max_count: usize,
        max_bytes: usize,
    ) -> Slice<'_> {
        let (after, truncated) = self.after(room, since);
        let mut messages = fitting(after.iter().copied().rev(), max_count, max_bytes);
        messages.reverse();
        let more = messages.len() < after.len();
        Slice {
            messages,
            truncated,
            more,
        }
    }

    /// The oldest messages of `room` after `since` that fit in `max_count` and `max_bytes`
    /// (at least one): a page of the API, read forward.
    pub fn page(&self, room: &str, since: u64, max_count: usize, max_bytes: usize) -> Slice<'_> {
        let (after, truncated) = self.after(room, Some(since));
        let messages = fitting(after.iter().copied(), max_count, max_bytes);
        let more = messages.len() < after.len();
        Slice {
            messages,
            truncated,
            more,
        }
    }

    /// The kept messages of `room` after `since`, and whether some after `since` are gone.
    fn after(&self, room: &str, since: Option<u64>) -> (Vec<&Stored>, bool) {
        let after = since.unwrap_or(0);
        let Some(log) = self.rooms.get(room) else {
            return (Vec::new(), since.is_some() && after < self.forgotten_up_to);
        };
        let start = log.messages.partition_point(|m| m.id <= after);
        let kept = log.messages.range(start..).collect();
        (kept, since.is_some() && after < log.evicted_up_to)
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
        self.rooms.keys().map(|r| &**r)
    }

    /// Messages held in memory, over all rooms (a metric).
    pub fn len(&self) -> usize {
        self.ages.len()
    }

    /// Bytes the kept messages cost, overhead included (a metric; at most `--history-bytes`).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The size the file would have after a compaction: what a rewrite would keep.
    fn live_file_bytes(&self) -> u64 {
        let per_line = STORED_OVERHEAD_BYTES - 1; // the frame and its newline
        (self.bytes - self.ages.len() * per_line) as u64
    }

    /// Every kept message's frame, in id order, for a compaction.
    fn snapshot(&self) -> Vec<Frame> {
        let mut all: Vec<&Stored> = self.rooms.values().flat_map(|r| &r.messages).collect();
        all.sort_unstable_by_key(|m| m.id);
        all.into_iter().map(|m| m.frame.clone()).collect()
    }
}

/// The messages from `candidates` that fit in `max_count` and `max_bytes`, in the order given;
/// the first one always fits, so a single message bigger than the bound is still served.
fn fitting<'a>(
    candidates: impl Iterator<Item = &'a Stored>,
    max_count: usize,
    max_bytes: usize,
) -> Vec<&'a Stored> {
    let mut used = 0;
    let mut out = Vec::new();
    for m in candidates {
        let len = m.frame.len() + 1; // and a comma
        if out.len() == max_count || (!out.is_empty() && used + len > max_bytes) {
            break;
        }
        used += len;
        out.push(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(per_room: usize, total_bytes: usize) -> History {
        let settings = Settings {
            per_room,
            total_bytes,
            data_dir: None,
            fsync: Fsync::Never,
            compact_bytes: 0,
            max_line_bytes: 1 << 10,
        };
        History::open(&settings).unwrap()
    }

    fn add(h: &mut History, room: &str, id: u64, text_len: usize) {
        let frame = format!("{{\"id\":{id},\"t\":\"{}\"}}", "x".repeat(text_len));
        let stored = Stored {
            id,
            ts: id,
            frame: frame.into(),
        };
        h.append(room, stored);
        h.commit().unwrap();
    }

    fn ids(s: Slice) -> Vec<u64> {
        s.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn keeps_the_last_n_and_reports_gaps() {
        let mut h = memory(3, 1 << 20);
        for id in 1..=5 {
            add(&mut h, "r", id, 1);
        }
        assert_eq!(ids(h.newest("r", None, 100, 1 << 20)), [3, 4, 5]);
        assert_eq!(ids(h.newest("r", Some(3), 100, 1 << 20)), [4, 5]);
        assert!(!h.newest("r", Some(2), 100, 1 << 20).truncated);
        assert!(h.newest("r", Some(1), 100, 1 << 20).truncated);
        let two = h.newest("r", None, 2, 1 << 20);
        assert!(two.more && !two.truncated);
        assert_eq!(ids(two), [4, 5]);
        assert!(h.newest("empty", Some(0), 100, 1 << 20).messages.is_empty());
    }

    #[test]
    fn the_byte_budget_evicts_the_globally_oldest() {
        let mut h = memory(100, 10 * (STORED_OVERHEAD_BYTES + 120));
        for id in 1..=20 {
            add(&mut h, if id % 2 == 0 { "even" } else { "odd" }, id, 100);
        }
        assert!(h.bytes() <= 10 * (STORED_OVERHEAD_BYTES + 120));
        assert_eq!(
            ids(h.newest("odd", None, 100, 1 << 20)),
            [11, 13, 15, 17, 19]
        );
        assert_eq!(
            ids(h.newest("even", None, 100, 1 << 20)),
            [12, 14, 16, 18, 20]
        );
        assert!(h.newest("odd", Some(8), 100, 1 << 20).truncated);
        assert!(!h.newest("odd", Some(9), 100, 1 << 20).truncated);
    }

    #[test]
    fn answers_are_bounded_in_bytes_and_pages_go_forward() {
        let mut h = memory(100, 1 << 20);
        for id in 1..=10 {
            add(&mut h, "r", id, 100);
        }
        let newest = h.newest("r", None, 100, 350);
        assert!(newest.more);
        assert_eq!(ids(newest), [8, 9, 10]);
        let page = h.page("r", 2, 4, 1 << 20);
        assert!(page.more);
        assert_eq!(ids(page), [3, 4, 5, 6]);
        let last = h.page("r", 8, 4, 1 << 20);
        assert!(!last.more);
        assert_eq!(ids(last), [9, 10]);
        assert_eq!(ids(h.newest("r", None, 100, 1)), [10], "one always fits");
    }

    #[test]
    fn a_quiet_room_gives_back_its_slot() {
        let mut h = memory(100, 1 << 20);
        add(&mut h, "old", 1, 1);
        add(&mut h, "busy", 2, 1);
        add(&mut h, "new", 3, 1);
        assert_eq!(h.forget_quietest(2, |r| r != "old"), None);
        assert_eq!(h.forget_quietest(3, |_| true).as_deref(), Some("old"));
        assert!(!h.has_room("old"));
        assert!(h.newest("old", Some(0), 100, 1 << 20).truncated);
        assert_eq!(h.len(), 2);
    }
}
