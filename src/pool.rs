//! Connection threads, kept for the next connection: when a connection ends, its thread parks
//! here and the next accepted connection is handed to it, instead of a thread ending and another
//! starting. Starting a thread is the largest part of the server's cost of a short connection
//! (the kernel's `clone`, the mappings of a guard page and a signal stack, their removal at the
//! end), and a reconnecting client, a load test or a flaky mobile network make nothing but
//! short connections. Still one thread per connection: a parked thread serves no one.
//!
//! Bounded: at most [`MAX_IDLE_THREADS`] wait at once (a thread that finishes when as many
//! wait ends instead), each gives its stack pages back soon after it parks, and each ends after
//! [`IDLE_LIFETIME`] without work. A job runs on a thread exactly as on a fresh one: the pool
//! hands over a boxed closure and nothing else, so whatever a connection owns (its socket, its
//! admission ticket, its session) is dropped when its job returns, before the thread parks.
//!
//! This module knows nothing of sockets or HTTP; the listener decides what a job is.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

/// Parked threads kept at most. Each costs its trimmed stack (about 8 KiB resident, the top
/// page with the thread's control block and the parked frames) and a 16 KiB kernel stack:
/// 1.5 MiB for all of them. 64 is more than a 2-core server starts in the time one connection
/// lives through a churn (connect, one message, close: about a millisecond).
pub const MAX_IDLE_THREADS: usize = 64;
/// A parked thread keeps its stack pages this long, then gives them back: under churn the next
/// connection comes within milliseconds and would only fault the pages in again.
const TRIM_AFTER: Duration = Duration::from_millis(500);
/// A parked thread that no connection needed for this long ends: a burst's threads do not stay.
pub const IDLE_LIFETIME: Duration = Duration::from_secs(30);
/// What a parked thread is called (in `top -H`, `/proc/<pid>/task/*/comm`): not `conn-*`, which
/// names a thread serving a connection.
pub const IDLE_NAME: &str = "pool-idle";

/// Work for a thread: a connection's whole life, and the name its thread has meanwhile.
pub struct Job {
    pub name: String,
    pub run: Box<dyn FnOnce() + Send>,
}

/// Hands jobs to parked threads, or starts threads. Dropping it ends every parked thread (and
/// every busy one as soon as its job returns).
pub struct Pool {
    handoff: Sender<Job>,
    parked: Receiver<Job>,
    idle: Arc<AtomicUsize>,
    stack_bytes: usize,
}

impl Pool {
    /// A pool whose threads have stacks of `stack_bytes`.
    pub fn new(stack_bytes: usize) -> Pool {
        // Zero capacity: a hand-off succeeds only into the hands of a thread waiting for it.
        let (handoff, parked) = crossbeam_channel::bounded(0);
        Pool {
            handoff,
            parked,
            idle: Arc::new(AtomicUsize::new(0)),
            stack_bytes,
        }
    }

    /// Runs `job` on a parked thread, or on a new one if none waits. On error (no thread could
    /// be started) the job is dropped unrun.
    pub fn run(&self, job: Job) -> io::Result<()> {
        let job = match self.handoff.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => job,
        };
        let parked = self.parked.clone();
        let idle = self.idle.clone();
        thread::Builder::new()
            .name(job.name.clone())
            .stack_size(self.stack_bytes)
            .spawn(move || work(job, &parked, &idle))
            .map(drop)
    }

    /// Threads parked now.
    pub fn idle(&self) -> usize {
        self.idle.load(Acquire)
    }
}

/// A pool thread's life: its first job, then whatever it is handed while it is wanted.
fn work(first: Job, parked: &Receiver<Job>, idle: &AtomicUsize) {
    let mut job = first;
    loop {
        (job.run)(); // whatever the job owned is dropped by now
        match park(parked, idle) {
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
fn park(parked: &Receiver<Job>, idle: &AtomicUsize) -> Option<Job> {
    if idle.fetch_add(1, AcqRel) >= MAX_IDLE_THREADS {
        idle.fetch_sub(1, AcqRel);
        return None;
    }
    name_this_thread(IDLE_NAME);
    let job = match parked.recv_timeout(TRIM_AFTER) {
        Err(RecvTimeoutError::Timeout) => {
            crate::stack::release_unused();
            parked.recv_timeout(IDLE_LIFETIME).ok()
        }
        received => received.ok(),
    };
    idle.fetch_sub(1, AcqRel);
    job
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

    /// Waits until a thread is parked, and a little more: it counts itself idle just before it
    /// waits for a job, and a hand-off only reaches a thread that waits.
    fn settle(pool: &Pool) {
        while pool.idle() == 0 {
            thread::yield_now();
        }
        thread::sleep(Duration::from_millis(50));
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
        let busy = MAX_IDLE_THREADS + 4;
        for i in 0..busy {
            let gate = gate.clone();
            pool.run(job(&format!("busy-{i}"), move || gate.recv().unwrap()))
                .unwrap();
        }
        for _ in 0..busy {
            release.send(()).unwrap();
        }
        // Every thread finishes; only MAX_IDLE_THREADS of them stay.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pool.idle() < MAX_IDLE_THREADS && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.idle(), MAX_IDLE_THREADS);
    }
}
