//! The reactor: one thread that writes the backlogs of clients whose socket was full.
//!
//! Sessions read their own socket with a blocking `recv`, and the dispatcher (or a courier)
//! writes frames straight to a client's socket without blocking. What a socket does not take at
//! once waits in the client's outlet, and nobody else is there to write it when the socket has
//! room: the session thread sits in `recv`. So the outlet asks the reactor to watch that socket
//! ([`Watch::when_writable`]), and this thread waits (with epoll, through the `polling` crate)
//! until it has room, then lets the outlet write what it takes ([`Backlogged::write_some`]).
//! Interest is one-shot: the outlet asks again while anything is left. About once a second,
//! while any socket is watched, the reactor also asks each waiting backlog whether it has gone
//! too long without progress ([`Backlogged::check_progress`]), since a socket that never gets
//! room never wakes it.
//!
//! Only sockets with a backlog are watched: an idle or keeping-up client costs the reactor
//! nothing. The reactor never reads a socket, never blocks on one, and knows nothing of
//! WebSockets or frames (the outlet does).

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use polling::{Event, Events, Poller};

/// How often backlogs that wait are asked whether they made progress: the bound on how late a
/// client that stopped reading is noticed (its outlet allows it seconds, see `outlet`).
const PROGRESS_CHECK: Duration = Duration::from_secs(1);

/// A backlog the reactor writes: a client's outlet.
pub trait Backlogged: Send + Sync {
    /// The socket has room: write what it takes, and ask again if anything is left.
    fn write_some(self: Arc<Self>);
    /// Called about once a second (`PROGRESS_CHECK`) while the backlog waits: give up on a
    /// client whose socket took nothing for too long.
    fn check_progress(&self, now: Instant);
}

pub struct Reactor {
    poller: Poller,
    /// Watched sockets: connection id -> the backlog waiting for room (weak: the outlet owns its
    /// [`Watch`], not the other way round).
    waiting: Mutex<HashMap<usize, Weak<dyn Backlogged>>>,
    stopping: AtomicBool,
}

impl Reactor {
    pub fn new() -> io::Result<Arc<Reactor>> {
        Ok(Arc::new(Reactor {
            poller: Poller::new()?,
            waiting: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Lock order: an outlet's lock may be held while taking this one, never the reverse.
    fn waiting(&self) -> MutexGuard<'_, HashMap<usize, Weak<dyn Backlogged>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// No socket is watched.
    pub fn is_idle(&self) -> bool {
        self.waiting().is_empty()
    }

    /// The reactor thread's body: runs until [`Reactor::stop`].
    pub fn run(&self) {
        let mut events = Events::new();
        let mut ready = Vec::new();
        let mut next_check = Instant::now() + PROGRESS_CHECK;
        while !self.stopping.load(Relaxed) {
            events.clear();
            // Nothing waits: sleep until something does (`when_writable` notifies the poller).
            let timeout =
                (!self.is_idle()).then(|| next_check.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poller.wait(&mut events, timeout) {
                log::error!("reactor: waiting for sockets failed: {e}");
                return;
            }
            // One-shot: a socket that fired is no longer watched until its outlet asks again.
            ready.extend({
                let mut waiting = self.waiting();
                events
                    .iter()
                    .filter_map(|event| waiting.remove(&event.key))
                    .collect::<Vec<_>>()
            });
            for backlog in ready.drain(..).filter_map(|weak| weak.upgrade()) {
                backlog.write_some();
            }
            let now = Instant::now();
            if now >= next_check {
                self.check_progress(now);
                next_check = now + PROGRESS_CHECK;
            }
        }
    }

    /// Asks every waiting backlog whether it made progress (outside the map's lock: a backlog
    /// may take its own lock, then the map's).
    fn check_progress(&self, now: Instant) {
        let backlogs: Vec<_> = self.waiting().values().filter_map(Weak::upgrade).collect();
        for backlog in backlogs {
            backlog.check_progress(now);
        }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        let _ = self.poller.notify();
    }

    /// A watch on the socket of connection `id`, idle until its outlet asks for room.
    pub fn watch(self: &Arc<Self>, id: u64, stream: Arc<TcpStream>) -> Watch {
        Watch {
            reactor: self.clone(),
            key: id as usize,
            stream,
            added: AtomicBool::new(false),
        }
    }
}

/// One client socket the reactor can watch for room; dropping it stops the watching. The
/// socket joins the poller the first time it is watched, so a client that always keeps up never
/// costs a system call here.
pub struct Watch {
    reactor: Arc<Reactor>,
    key: usize,
    stream: Arc<TcpStream>,
    /// The socket is in the poller.
    added: AtomicBool,
}

impl Watch {
    /// Watches the socket until it has room to write (at once if it already has), then calls
    /// `backlog`'s [`Backlogged::write_some`] on the reactor thread, once.
    pub fn when_writable(&self, backlog: Weak<dyn Backlogged>) -> io::Result<()> {
        let reactor = &self.reactor;
        let was_idle = {
            let mut waiting = reactor.waiting();
            let was_idle = waiting.is_empty();
            waiting.insert(self.key, backlog); // before the interest: the event finds its entry
            was_idle
        };
        let interest = Event::writable(self.key);
        let armed = if self.added.swap(true, Relaxed) {
            reactor.poller.modify(&*self.stream, interest)
        } else {
            // SAFETY: the watch keeps the stream (so its descriptor) open until its drop has
            // removed it from the poller.
            unsafe { reactor.poller.add(&*self.stream, interest) }
                .inspect_err(|_| self.added.store(false, Relaxed))
        };
        if let Err(e) = armed {
            reactor.waiting().remove(&self.key);
            return Err(e);
        }
        if was_idle {
            let _ = reactor.poller.notify(); // its wait had no timeout: progress checks start
        }
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if *self.added.get_mut() {
            let _ = self.reactor.poller.delete(&*self.stream);
        }
        self.reactor.waiting().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    /// Counts the reactor's calls.
    #[derive(Default)]
    struct Counter {
        writes: AtomicUsize,
        checks: AtomicUsize,
    }

    impl Backlogged for Counter {
        fn write_some(self: Arc<Self>) {
            self.writes.fetch_add(1, Relaxed);
        }
        fn check_progress(&self, _now: Instant) {
            self.checks.fetch_add(1, Relaxed);
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_full_socket_is_written_once_it_has_room_and_checked_while_it_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let server = Arc::new(listener.accept().unwrap().0);
        server.set_nonblocking(true).unwrap();
        let chunk = [0u8; 64 * 1024];
        let mut filled = 0;
        while let Ok(n) = (&*server).write(&chunk) {
            filled += n; // until the socket is full
        }
        let reactor = Reactor::new().unwrap();
        let thread = std::thread::spawn({
            let reactor = reactor.clone();
            move || reactor.run()
        });
        let counter = Arc::new(Counter::default());
        let watch = reactor.watch(7, server);
        let weak: Weak<dyn Backlogged> = Arc::downgrade(&counter) as Weak<Counter>;
        watch.when_writable(weak).unwrap();
        wait_for("a progress check", || counter.checks.load(Relaxed) > 0);
        assert_eq!(counter.writes.load(Relaxed), 0, "no room yet");
        let mut sink = vec![0u8; filled];
        client.read_exact(&mut sink).unwrap(); // room again
        wait_for("the write", || counter.writes.load(Relaxed) == 1);
        assert!(reactor.waiting().is_empty(), "one-shot: no longer watched");
        drop(watch);
        reactor.stop();
        thread.join().unwrap();
    }
}
