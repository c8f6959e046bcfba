//! A connection's bytes at the front door: the one seam between "a TCP socket" and "a TLS
//! session over a TCP socket". The request reader, the HTTP answers, the socket.io door and the
//! handshake read and write a [`Wire`] and never ask which it is.
//!
//! This module owns only that choice. A plain wire reads and writes its socket directly: one
//! branch more than `&TcpStream`, no copy, no extra system call. A TLS wire (feature `tls`) goes
//! through its [`rustls::ServerConnection`], which [`crate::tls`] made during the TLS handshake.
//! It never decides what the bytes mean and never sets a deadline: the caller sets the socket's
//! timeouts, which bound the TLS reads and writes too.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A connection's bytes: plain TCP, or TLS over TCP.
pub struct Wire {
    tcp: Arc<TcpStream>,
    #[cfg(feature = "tls")]
    tls: Option<Mutex<rustls::ServerConnection>>,
}

impl Wire {
    /// Plain TCP: reads and writes go straight to the socket.
    pub fn plain(tcp: Arc<TcpStream>) -> Wire {
        Wire {
            tcp,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// TLS over `tcp`, whose handshake `conn` has completed.
    #[cfg(feature = "tls")]
    pub fn tls(tcp: Arc<TcpStream>, conn: rustls::ServerConnection) -> Wire {
        Wire {
            tcp,
            tls: Some(Mutex::new(conn)),
        }
    }

    /// Whether this connection speaks TLS.
    pub fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The socket underneath (for the reactor, the registry of open sockets, and the session).
    pub fn tcp(&self) -> &Arc<TcpStream> {
        &self.tcp
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(timeout)
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp.set_nodelay(nodelay)
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.tcp.set_nonblocking(nonblocking)
    }

    /// Shuts the socket down; a TLS wire first tells its peer with a `close_notify` alert when
    /// the writing side closes (best effort, within the socket's write timeout).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        #[cfg(feature = "tls")]
        if let (Some(tls), Shutdown::Write | Shutdown::Both) = (&self.tls, how) {
            let mut conn = lock(tls);
            conn.send_close_notify();
            let _ = conn.complete_io(&mut &*self.tcp);
        }
        self.tcp.shutdown(how)
    }
}

#[cfg(feature = "tls")]
fn lock(tls: &Mutex<rustls::ServerConnection>) -> MutexGuard<'_, rustls::ServerConnection> {
    // A panic mid-call leaves rustls' state as consistent as any error does: the next call
    // reports the connection broken.
    tls.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Read for &Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return rustls::Stream::new(&mut *lock(tls), &mut &*self.tcp).read(buf);
        }
        (&*self.tcp).read(buf)
    }
}

impl Write for &Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return rustls::Stream::new(&mut *lock(tls), &mut &*self.tcp).write(buf);
        }
        (&*self.tcp).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return rustls::Stream::new(&mut *lock(tls), &mut &*self.tcp).flush();
        }
        (&*self.tcp).flush()
    }
}
