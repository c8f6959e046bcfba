//! Connection threads, kept for the next connection: when a connection ends, its thread parks
//! here and the next accepted connection is handed to it, instead of a thread ending and another
//! starting. Starting and ending a thread (the kernel's `clone` and exit, the mappings of a guard
//! page and a signal stack and their removal, a dozen system calls) was about a quarter of the
//! server's CPU for a short connection, and a reconnecting client, a load test or a flaky mobile
//! network make nothing but short connections. Still one thread per connection: a parked thread
//! serves no one.
//!
//! Bounded: at most [`MAX_PARKED_THREADS`] wait at once (a thread that finishes when as many
//! wait ends instead), each gives its stack pages back soon after it parks, and each ends after
//! [`IDLE_LIFETIME`] without work. A job runs on a thread exactly as on a fresh one: the pool
//! hands over a boxed closure and nothing else, so whatever a connection owns (its socket, its
//! admission ticket, its session) is dropped when its job returns, before the thread parks.
//!
//! This module knows nothing of sockets or HTTP; the listener decides what a job is.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Parked threads kept at most. Each costs the stack pages its last connection touched (8 KiB
/// resident once trimmed: the top page with the thread's control block, and the parked frames)
/// and a 16 KiB kernel stack: at most 2 MiB for all of them, 1.5 MiB once trimmed. Churning
/// clients need as many as overlap at once (a handful for 4 churning threads); more would only
/// keep the peak of a burst.
pub const MAX_PARKED_THREADS: usize = 64;
/// A parked thread keeps its stack pages this long, then gives them back: under churn the next
/// connection comes within milliseconds and would only fault the pages in again.
const TRIM_AFTER: Duration = Duration::from_millis(500);
/// A parked thread that no connection needed for this long ends: a burst's threads do not stay.
const IDLE_LIFETIME: Duration = Duration::from_secs(30);
/// What a parked thread is called (in `top -H`, `/proc/<pid>/task/*/comm`): not `conn-*`, which
/// names a thread serving a connection.
pub const PARKED_THREAD_NAME: &str = "pool-idle";

/// Work for a thread: a connection's whole life, and the name its thread has meanwhile.
pub struct Job {
    pub name: String,
    pub run: Box<dyn FnOnce() + Send>,
}

/// Hands jobs to parked threads, or starts threads. Dropping it ends every parked thread (and
/// every busy one as soon as its job returns).
pub struct Pool {
    shared: Arc<Shared>,
    stack_bytes: usize,
}

/// What the pool and its threads share.
#[derive(Default)]
struct Shared {
    /// The parked threads, the most recently parked last: it is handed the next job (its stack
    /// is the warmest, and the others, left alone, reach their lifetime and end).
    parked: Mutex<Vec<Arc<Slot>>>,
    /// Set when the pool is dropped: parked threads end, busy ones do not park again.
    closed: AtomicBool,
}

/// Where a parked thread waits for its next job.
struct Slot {
    job: Mutex<Option<Job>>,
    thread: Thread,
}

impl Pool {
    /// A pool whose threads have stacks of `stack_bytes`.
    pub fn new(stack_bytes: usize) -> Pool {
        Pool {
            shared: Arc::default(),
            stack_bytes,
        }
    }

    /// Runs `job` on a parked thread, or on a new one if none waits. On error (no thread could
    /// be started) the job is dropped unrun.
    pub fn run(&self, job: Job) -> io::Result<()> {
        let slot = self.shared.parked().pop();
        if let Some(slot) = slot {
            *lock(&slot.job) = Some(job);
            slot.thread.unpark();
            return Ok(());
        }
        let shared = self.shared.clone();
        thread::Builder::new()
            .name(job.name.clone())
            .stack_size(self.stack_bytes)
            .spawn(move || work(job, &shared))
            .map(drop)
    }

    /// Threads parked now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shared.parked().len()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.closed.store(true, Release);
        for slot in self.shared.parked().drain(..) {
            slot.thread.unpark();
        }
    }
}

impl Shared {
    fn parked(&self) -> MutexGuard<'_, Vec<Arc<Slot>>> {
        lock(&self.parked)
    }

    /// Takes `slot` off the parked list; false if a job was handed to it meanwhile.
    fn unpark_self(&self, slot: &Arc<Slot>) -> bool {
        let mut parked = self.parked();
        let before = parked.len();
        parked.retain(|other| !Arc::ptr_eq(other, slot));
        parked.len() < before
    }
}

/// Every lock here is held for one statement: a poisoned one is still sound.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pool thread's life: its first job, then whatever it is handed while it is wanted.
fn work(first: Job, shared: &Shared) {
    let slot = Arc::new(Slot {
        job: Mutex::new(None),
        thread: thread::current(),
    });
    let mut job = first;
    loop {
        (job.run)(); // whatever the job owned is dropped by now
        match park(shared, &slot) {
            Some(next) => {
                name_this_thread(&next.name);
                job = next;
            }
            None => return,
        }
    }
}

/// Waits for the next job as one of the parked threads, if there is room for one more.
/// Never inlined: the stack pages below this frame are the ones given back.
#[inline(never)]
fn park(shared: &Shared, slot: &Arc<Slot>) -> Option<Job> {
    {
        let mut parked = shared.parked();
        if parked.len() >= MAX_PARKED_THREADS || shared.closed.load(Acquire) {
            return None;
        }
        parked.push(slot.clone());
    }
    name_this_thread(PARKED_THREAD_NAME);
    let parked_at = Instant::now();
    let mut trimmed = false;
    loop {
        if let Some(job) = lock(&slot.job).take() {
            return Some(job);
        }
        if shared.closed.load(Acquire) {
            return None;
        }
        let idle = parked_at.elapsed();
        if !trimmed && idle >= TRIM_AFTER {
            crate::stack::release_unused();
            trimmed = true;
        }
        // Past its lifetime, a thread still on the list leaves; one taken off it has a job coming.
        if idle >= IDLE_LIFETIME && shared.unpark_self(slot) {
            return None;
        }
        let wake = if trimmed { IDLE_LIFETIME } else { TRIM_AFTER };
        // May return early (the pool's unpark, a stale unpark from a finished connection's
        // doorbell, or spuriously): the loop looks again.
        thread::park_timeout(wake.saturating_sub(idle));
    }
}

/// Renames the calling thread as the system shows it (Linux keeps 15 bytes of it).
#[cfg(target_os = "linux")]
fn name_this_thread(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(buf.len() - 1);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: `buf` is NUL-terminated (its last byte is never written) and lives through the
    // call; PR_SET_NAME reads at most 16 bytes from it and renames only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// On systems other than Linux a pooled thread keeps the name it started with.
#[cfg(not(target_os = "linux"))]
fn name_this_thread(_name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn job(name: &str, run: impl FnOnce() + Send + 'static) -> Job {
        Job {
            name: name.into(),
            run: Box::new(run),
        }
    }

    /// Waits until a thread is parked.
    fn settle(pool: &Pool) {
        while pool.idle() == 0 {
            thread::yield_now();
        }
    }

    /// Runs a job that reports its thread, and waits until that thread is parked again.
    fn thread_of(pool: &Pool, name: &str) -> thread::ThreadId {
        let (tx, rx) = mpsc::channel();
        pool.run(job(name, move || tx.send(thread::current().id()).unwrap()))
            .unwrap();
        let id = rx.recv().unwrap();
        settle(pool);
        id
    }

    #[test]
    fn a_finished_thread_takes_the_next_job_and_nothing_of_the_last() {
        let pool = Pool::new(64 * 1024);
        let first = thread_of(&pool, "job-1");
        // What the first job owned is dropped before its thread parks.
        let owned = Arc::new(());
        let held = owned.clone();
        let (tx, rx) = mpsc::channel();
        pool.run(job("job-2", move || {
            let _keep = held;
            tx.send(thread::current().id()).unwrap();
        }))
        .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the parked thread ran it");
        settle(&pool);
        assert_eq!(Arc::strong_count(&owned), 1, "the job's captures are gone");
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn busy_threads_do_not_take_jobs_and_parked_ones_are_bounded() {
        let pool = Pool::new(64 * 1024);
        let (release, gate) = crossbeam_channel::unbounded::<()>();
        let busy = MAX_PARKED_THREADS + 4;
        for i in 0..busy {
            let gate = gate.clone();
            pool.run(job(&format!("busy-{i}"), move || gate.recv().unwrap()))
                .unwrap();
        }
        for _ in 0..busy {
            release.send(()).unwrap();
        }
        // Every thread finishes; only MAX_PARKED_THREADS of them stay.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.idle() < MAX_PARKED_THREADS && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.idle(), MAX_PARKED_THREADS);
    }
}
