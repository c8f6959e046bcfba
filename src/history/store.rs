//! The history file: lines staged during a batch, the commit that writes (and syncs) them, what
//! happens when the disk refuses, and compaction in a helper thread.
//!
//! A failed commit leaves the file as it was before the batch: what was partly written is cut
//! off again (or, if even that fails, the next write starts on a new line), so no half line is
//! ever glued to the next one. The staged lines are dropped, never kept for later: while the
//! disk refuses, memory stays bounded by one batch. Every commit with lines retries the disk, so
//! the store recovers by itself. This module never decides who sees a message; it only reports
//! whether the batch was saved.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use super::Settings;
use crate::config::{FSYNC_INTERVAL, Fsync};
use crate::protocol::Frame;

/// How often the dispatcher looks whether a compaction finished when no events wake it; until
/// then the old file stays in use, whole and valid.
const COMPACTION_POLL: Duration = Duration::from_millis(100);
/// Staged bytes kept allocated between batches; a bigger buffer (after a burst) is released.
const KEEP_PENDING_BYTES: usize = 1 << 20;

/// The batch could not be saved: none of its messages may be shown.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the history file: {0}")]
pub struct SaveError(#[source] io::Error);

impl SaveError {
    /// The reason in a few words, for the people whose messages were refused.
    pub fn reason(&self) -> String {
        describe(&self.0)
    }
}

fn describe(e: &io::Error) -> String {
    use io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
    match e.kind() {
        StorageFull | QuotaExceeded | FileTooLarge => "disk full".into(),
        kind => kind.to_string(),
    }
}

/// The first line of a compacted file, and the line after a private message's id: keeps ids
/// increasing even where no stored message shows them.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NextId {
    pub next_id: u64,
}

/// A room given up whole to free its slot (`History::forget_quietest`): at the next start its
/// older lines are not history again. Compaction, which keeps only live rooms, drops both.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Forgotten {
    pub forget: String,
    /// The room's newest message id when it was forgotten.
    pub up_to: u64,
}

/// A rewrite in progress in a helper thread.
struct Compaction {
    tmp: PathBuf,
    /// The file's length when the snapshot was taken: lines after it are copied at the swap.
    snap_len: u64,
    done: Receiver<io::Result<u64>>,
    thread: JoinHandle<()>,
}

/// The open history file.
pub(super) struct Store {
    path: PathBuf,
    file: File,
    fsync: Fsync,
    /// Lines staged since the last commit.
    pending: Vec<u8>,
    /// Length of the file up to its last saved line.
    file_len: u64,
    /// The file may end in a partial line that could not be cut off: the next write starts
    /// with a newline, so nothing is glued to it.
    torn_tail: bool,
    compact_bytes: u64,
    /// After a failed compaction, the next one waits until the file is this long.
    compact_floor: u64,
    compaction: Option<Compaction>,
    /// Under `--fsync interval`, when data was first written without a sync.
    unsynced_since: Option<Instant>,
    /// Why the file cannot be written, while it cannot.
    outage: Option<String>,
    failures: u64,
}

/// Whether rewriting a file of `file_len` bytes, keeping `live` of them, is worth it: it must
/// be past the threshold and the rewrite must remove at least half, so that a file that is all
/// live history is not rewritten again and again.
pub(super) fn worth_compacting(file_len: u64, live: u64, compact_bytes: u64) -> bool {
    file_len > compact_bytes && file_len > live.saturating_mul(2)
}

impl Store {
    /// Opens (or creates) the file for appending. A full disk does not stop this: the store
    /// starts in an outage only when its first write fails.
    pub fn open(path: PathBuf, settings: &Settings) -> io::Result<Store> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        let file_len = file.metadata()?.len();
        let torn_tail = file_len > 0 && !ends_with_newline(&mut file)?;
        Ok(Store {
            path,
            file,
            fsync: settings.fsync,
            pending: Vec::new(),
            file_len,
            torn_tail,
            compact_bytes: settings.compact_bytes,
            compact_floor: 0,
            compaction: None,
            unsynced_since: None,
            outage: None,
            failures: 0,
        })
    }

    pub fn stage(&mut self, frame: &Frame) {
        self.pending.extend_from_slice(frame.as_bytes());
        self.pending.push(b'\n');
    }

    pub fn stage_next_id(&mut self, next_id: u64) {
        self.stage_record(&NextId { next_id });
    }

    pub fn stage_forgotten(&mut self, room: &str, up_to: u64) {
        let forget = room.to_owned();
        self.stage_record(&Forgotten { forget, up_to });
    }

    fn stage_record(&mut self, record: &impl serde::Serialize) {
        if let Ok(line) = serde_json::to_vec(record) {
            self.pending.extend_from_slice(&line);
            self.pending.push(b'\n');
        }
    }

    /// Writes the staged lines (and under `--fsync always` syncs them). On failure the file is
    /// cut back and the lines are dropped. Under `--fsync interval` a due sync that fails does
    /// not refuse the batch (what it covers was shown already); it is counted and reported.
    pub fn commit(&mut self) -> Result<(), super::SaveError> {
        self.poll_compaction();
        let wrote = self.write_pending();
        let synced = self.sync_if_due();
        match (wrote, synced) {
            (Err(e), _) => {
                self.note_failure(&e);
                Err(SaveError(e))
            }
            (Ok(_), Err(e)) => {
                self.note_failure(&e);
                Ok(())
            }
            (Ok(wrote), Ok(synced)) => {
                if wrote || synced {
                    self.note_success();
                }
                Ok(())
            }
        }
    }

    /// Returns whether anything was written.
    fn write_pending(&mut self) -> io::Result<bool> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let result = self.write_batch();
        match &result {
            Ok(()) => self.file_len += self.pending.len() as u64,
            Err(_) => self.cut_back(),
        }
        self.pending.clear();
        if self.pending.capacity() > KEEP_PENDING_BYTES {
            self.pending = Vec::new();
        }
        result.map(|()| true)
    }

    fn write_batch(&mut self) -> io::Result<()> {
        if self.torn_tail {
            // What lies past the last saved line stays, on a line of its own (set aside at the
            // next start); count it, so a later cut-back lands on a line boundary.
            self.file_len = self.file.metadata()?.len();
            self.file.write_all(b"\n")?;
            self.file_len += 1;
            self.torn_tail = false;
        }
        self.file.write_all(&self.pending)?;
        match self.fsync {
            Fsync::Always => self.file.sync_data()?,
            Fsync::Interval => {
                self.unsynced_since.get_or_insert_with(Instant::now);
            }
            Fsync::Never => {}
        }
        Ok(())
    }

    /// Removes whatever a failed write left after the last saved line.
    fn cut_back(&mut self) {
        if let Err(e) = self.file.set_len(self.file_len) {
            log::warn!(
                "history: cannot cut back a failed write ({e}); the next write starts on a new line"
            );
            self.torn_tail = true;
        }
    }

    /// Returns whether a sync was due and done. A failed one is retried an interval later,
    /// not at once: the dispatcher must not spin on a failing disk.
    fn sync_if_due(&mut self) -> io::Result<bool> {
        let now = Instant::now();
        if self.sync_deadline().is_none_or(|d| d > now) {
            return Ok(false);
        }
        let synced = self.file.sync_data();
        self.unsynced_since = synced.is_err().then_some(now);
        synced.map(|()| true)
    }

    fn sync_deadline(&self) -> Option<Instant> {
        self.unsynced_since.map(|t| t + FSYNC_INTERVAL)
    }

    fn note_failure(&mut self, e: &io::Error) {
        self.failures += 1;
        if self.outage.is_none() {
            log::error!(
                "history: cannot write {}: {e}; new messages are refused until it can be written",
                self.path.display()
            );
        }
        self.outage = Some(describe(e));
    }

    fn note_success(&mut self) {
        if let Some(reason) = self.outage.take() {
            log::info!(
                "history: {} can be written again (after: {reason}); messages are accepted",
                self.path.display()
            );
        }
    }

    pub fn outage(&self) -> Option<&str> {
        self.outage.as_deref()
    }

    pub fn failures(&self) -> u64 {
        self.failures
    }

    pub fn wake_at(&self) -> Option<Instant> {
        let poll = self
            .compaction
            .as_ref()
            .map(|_| Instant::now() + COMPACTION_POLL);
        [self.sync_deadline(), poll].into_iter().flatten().min()
    }

    // ----- compaction -----

    pub fn wants_compaction(&self, live: u64) -> bool {
        self.compaction.is_none()
            && self.outage.is_none()
            && self.file_len >= self.compact_floor
            && worth_compacting(self.file_len, live, self.compact_bytes)
    }

    fn tmp_path(&self) -> PathBuf {
        self.path.with_extension("jsonl.tmp")
    }

    /// Rewrites the file from `frames` in a helper thread; the dispatcher goes on appending to
    /// the old file, and the lines it adds meanwhile are copied over at the swap.
    pub fn start_compaction(&mut self, next_id: u64, frames: Vec<Frame>) {
        let (tmp, (tell, done)) = (self.tmp_path(), crossbeam_channel::bounded(1));
        let target = tmp.clone();
        let spawned = std::thread::Builder::new()
            .name("history-compact".into())
            .spawn(move || drop(tell.send(write_snapshot(&target, next_id, &frames))));
        match spawned {
            Ok(thread) => {
                let snap_len = self.file_len;
                self.compaction = Some(Compaction {
                    tmp,
                    snap_len,
                    done,
                    thread,
                });
            }
            Err(e) => self.compaction_failed(&tmp, &e),
        }
    }

    /// Rewrites the file from `frames` on this thread (at start, before anyone waits on it).
    pub fn compact_now(&mut self, next_id: u64, frames: &[Frame]) {
        let tmp = self.tmp_path();
        let written = write_snapshot(&tmp, next_id, frames);
        self.swap_in(&tmp, self.file_len, written);
    }

    /// Puts a finished compaction in place; does nothing while it runs.
    fn poll_compaction(&mut self) {
        let written = match self.compaction.as_ref().map(|c| c.done.try_recv()) {
            None | Some(Err(TryRecvError::Empty)) => return,
            Some(Ok(written)) => written,
            Some(Err(TryRecvError::Disconnected)) => Err(io::Error::other("its thread died")),
        };
        if let Some(c) = self.compaction.take() {
            let _ = c.thread.join();
            self.swap_in(&c.tmp, c.snap_len, written);
        }
    }

    /// Waits for a compaction in progress and puts it in place (at shutdown, so no thread is
    /// left writing the temporary file).
    pub fn finish_compaction(&mut self) {
        if let Some(c) = self.compaction.take() {
            let written = c
                .done
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("died")));
            let _ = c.thread.join();
            self.swap_in(&c.tmp, c.snap_len, written);
        }
    }

    fn swap_in(&mut self, tmp: &Path, snap_len: u64, written: io::Result<u64>) {
        let old_len = self.file_len;
        match written.and_then(|new_len| self.replace_file(tmp, snap_len, new_len)) {
            Ok(()) => log::info!(
                "history: compacted {} from {old_len} to {} bytes",
                self.path.display(),
                self.file_len
            ),
            Err(e) => self.compaction_failed(tmp, &e),
        }
    }

    /// Copies the lines added since the snapshot to the new file, syncs it and renames it over
    /// the old one: a crash at any point leaves one whole file or the other.
    fn replace_file(&mut self, tmp: &Path, snap_len: u64, new_len: u64) -> io::Result<()> {
        let mut new = OpenOptions::new().append(true).read(true).open(tmp)?;
        let mut old = File::open(&self.path)?;
        old.seek(SeekFrom::Start(snap_len))?;
        let tail = self.file_len - snap_len;
        if io::copy(&mut old.take(tail), &mut new)? != tail {
            return Err(io::Error::other(
                "the history file is shorter than what was written",
            ));
        }
        new.sync_data()?;
        fs::rename(tmp, &self.path)?;
        self.file = new;
        self.file_len = new_len + tail;
        self.torn_tail = false;
        self.unsynced_since = None;
        if let Some(Err(e)) = self.path.parent().map(|d| File::open(d)?.sync_all()) {
            log::warn!("history: cannot sync the data directory after compaction: {e}");
        }
        Ok(())
    }

    fn compaction_failed(&mut self, tmp: &Path, e: &io::Error) {
        log::warn!(
            "history: compaction of {} failed, the file stays as it is: {e}",
            self.path.display()
        );
        let _ = fs::remove_file(tmp);
        self.compact_floor = self.file_len.saturating_add(self.compact_bytes);
    }
}

/// Writes the compacted file: the id counter, then every kept message. Returns its length.
fn write_snapshot(tmp: &Path, next_id: u64, frames: &[Frame]) -> io::Result<u64> {
    let mut out = BufWriter::new(File::create(tmp)?);
    serde_json::to_writer(&mut out, &NextId { next_id })?;
    out.write_all(b"\n")?;
    for frame in frames {
        out.write_all(frame.as_bytes())?;
        out.write_all(b"\n")?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

fn ends_with_newline(file: &mut File) -> io::Result<bool> {
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings<'static> {
        Settings {
            per_room: 10,
            total_bytes: 1 << 20,
            data_dir: None,
            fsync: Fsync::Always,
            compact_bytes: 0,
            max_line_bytes: 1 << 10,
        }
    }

    #[test]
    fn lines_added_during_a_compaction_are_kept() {
        let dir = std::env::temp_dir().join(format!("wschat-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut store = Store::open(path.clone(), &settings()).unwrap();
        for line in ["old-1", "kept-2", "old-3"] {
            store.stage(&Frame::from(line));
        }
        store.commit().unwrap();
        store.start_compaction(4, vec![Frame::from("kept-2")]);
        store.stage(&Frame::from("during-4"));
        store.commit().unwrap();
        store.finish_compaction();
        store.stage(&Frame::from("after-5"));
        store.commit().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"next_id\":4}\nkept-2\nduring-4\nafter-5\n");
        assert_eq!(store.file_len, text.len() as u64);
        let _ = std::fs::remove_dir_all(dir);
    }
}
