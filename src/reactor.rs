//! The reactor: one thread that waits (with epoll, through the `polling` crate) until any client
//! socket has bytes to read, and then rings that socket's session [`Doorbell`].
//!
//! Why: a session thread must wait for two things at once, bytes from its client and frames the
//! dispatcher could not write at once. A blocking `read` cannot also wait for the other, and a
//! second thread per connection just to read costs a second stack (and, on Linux, four more
//! memory mappings, which caps how many connections a machine can hold). So sessions wait only on
//! their doorbell, and this one thread turns "socket readable" into a ring of it.
//!
//! Interest is one-shot: after a wake, the session reads (or writes) what it can and re-arms. The
//! reactor never reads or writes a socket and knows nothing of WebSockets.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use polling::{Event, Events, Poller};

use crate::doorbell::{Doorbell, READABLE, WRITABLE};

pub struct Reactor {
    poller: Poller,
    /// Connection id -> its session's doorbell.
    wakers: Mutex<HashMap<usize, Arc<Doorbell>>>,
    stopping: AtomicBool,
}

impl Reactor {
    pub fn new() -> io::Result<Arc<Reactor>> {
        Ok(Arc::new(Reactor {
            poller: Poller::new()?,
            wakers: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        }))
    }

    fn wakers(&self) -> MutexGuard<'_, HashMap<usize, Arc<Doorbell>>> {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reactor thread's body: runs until [`Reactor::stop`].
    pub fn run(&self) {
        let mut events = Events::new();
        while !self.stopping.load(Relaxed) {
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, None) {
                log::error!("reactor: waiting for sockets failed: {e}");
                return;
            }
            let wakers = self.wakers();
            for event in events.iter() {
                if let Some(doorbell) = wakers.get(&event.key) {
                    let readable = if event.readable { READABLE } else { 0 };
                    let writable = if event.writable { WRITABLE } else { 0 };
                    doorbell.ring(readable | writable);
                }
            }
        }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        let _ = self.poller.notify();
    }

    /// Watches `stream` for readability; `doorbell` rings once when it is readable (at once if
    /// it already is), and again after each [`Registration::rearm`].
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        stream: Arc<TcpStream>,
        doorbell: Arc<Doorbell>,
    ) -> io::Result<Registration> {
        let key = id as usize;
        self.wakers().insert(key, doorbell);
        // SAFETY: `Registration` keeps the stream open until it has removed it from the poller.
        if let Err(e) = unsafe { self.poller.add(&*stream, Event::readable(key)) } {
            self.wakers().remove(&key);
            return Err(e);
        }
        Ok(Registration {
            reactor: self.clone(),
            key,
            stream,
        })
    }
}

/// A socket watched by the reactor; dropping it stops the watching.
pub struct Registration {
    reactor: Arc<Reactor>,
    key: usize,
    stream: Arc<TcpStream>,
}

impl Registration {
    /// Asks for the next wake: when the socket is readable, and if `writable`, also when it has
    /// room to write. One-shot: whichever comes first ends the watch until the next rearm.
    pub fn rearm(&self, readable: bool, writable: bool) -> io::Result<()> {
        let interest = Event::new(self.key, readable, writable);
        self.reactor.poller.modify(&*self.stream, interest)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.reactor.poller.delete(&*self.stream);
        self.reactor.wakers().remove(&self.key);
    }
}
