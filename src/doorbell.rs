//! A session thread's doorbell: how the reactor ("your socket has bytes", "your socket has room")
//! and the client's [`Outlet`](crate::outlet::Outlet) ("frames are waiting to be written") wake a
//! parked session.
//!
//! Ringing sets a reason bit, and unparks the thread only if no reason was pending yet, so a
//! burst of rings costs one wake-up, and a ring while the session is busy costs no syscall at all.
//! It is an atomic byte and a thread handle: an idle connection keeps it, so it is kept small.
//! It knows nothing of sockets or frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::AcqRel};
use std::thread::{self, Thread};
use std::time::Instant;

/// The socket has bytes (or an end of file) to read. Rung by the reactor.
pub const READABLE: u8 = 1;
/// The socket has room for more bytes. Rung by the reactor.
pub const WRITABLE: u8 = 2;
/// The outlet has bytes to write, or a request to close. Rung by the dispatcher's side.
pub const WAITING: u8 = 4;

pub struct Doorbell {
    reasons: AtomicU8,
    thread: Thread,
}

impl Doorbell {
    /// A doorbell that wakes the calling thread.
    pub fn for_current_thread() -> Arc<Doorbell> {
        Arc::new(Doorbell {
            reasons: AtomicU8::new(0),
            thread: thread::current(),
        })
    }

    pub fn ring(&self, reason: u8) {
        // With a reason already pending, the thread has been unparked and has not yet taken the
        // reasons: it will take this one too.
        if self.reasons.fetch_or(reason, AcqRel) == 0 {
            self.thread.unpark();
        }
    }

    /// Waits until rung or until `deadline`; returns the reasons, or 0 once the deadline passed.
    /// Only the thread the doorbell was made for may wait on it.
    pub fn wait_until(&self, deadline: Instant) -> u8 {
        loop {
            let reasons = self.reasons.swap(0, AcqRel);
            if reasons != 0 {
                return reasons;
            }
            let now = Instant::now();
            if now >= deadline {
                return 0;
            }
            // May return early (another unpark, or spuriously): the loop checks again.
            thread::park_timeout(deadline - now);
        }
    }
}
