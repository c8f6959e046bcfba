//! The reactor: one thread that waits (with epoll, through the `polling` crate) until any client
//! socket has bytes to read, and then wakes that socket's session thread.
//!
//! Why: a session thread must wait for two things at once, bytes from its client and frames from
//! the dispatcher. A blocking `read` cannot also wait on a channel, and a second thread per
//! connection just to read costs a second stack (and, on Linux, four more memory mappings, which
//! caps how many connections a machine can hold). So sessions wait only on channels, and this one
//! thread turns "socket readable" into a message on the session's wake channel.
//!
//! Interest is one-shot: after a wake, the session reads what is there and re-arms. The reactor
//! never reads or writes a socket and knows nothing of WebSockets.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crossbeam_channel::Sender;
use polling::{Event, Events, Poller};

pub struct Reactor {
    poller: Poller,
    /// Connection id -> its session's wake channel (capacity 1: one pending wake is enough).
    wakers: Mutex<HashMap<usize, Sender<()>>>,
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

    fn wakers(&self) -> MutexGuard<'_, HashMap<usize, Sender<()>>> {
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
                if let Some(wake) = wakers.get(&event.key) {
                    let _ = wake.try_send(()); // full: a wake is already pending
                }
            }
        }
    }

    pub fn stop(&self) {
        self.stopping.store(true, Relaxed);
        let _ = self.poller.notify();
    }

    /// Watches `stream` for readability; `wake` gets a message each time it becomes readable
    /// after [`Registration::rearm`] (and once at the start).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        stream: Arc<TcpStream>,
        wake: Sender<()>,
    ) -> io::Result<Registration> {
        let key = id as usize;
        self.wakers().insert(key, wake);
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
    /// Asks for the next wake. If bytes are already waiting, it comes at once.
    pub fn rearm(&self) -> io::Result<()> {
        self.reactor
            .poller
            .modify(&*self.stream, Event::readable(self.key))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.reactor.poller.delete(&*self.stream);
        self.reactor.wakers().remove(&self.key);
    }
}
