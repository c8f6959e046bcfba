//! A connection's bytes: the one seam between "a TCP socket" and "a TLS session over a TCP
//! socket". The request reader, the HTTP answers, the socket.io door and the handshake read and
//! write a [`Wire`] and never ask which it is; the session and the outlet take its parts, the
//! socket and (with TLS) the [`TlsSession`], which encrypts what the outlet sends and decrypts
//! what the session reads.
//!
//! This module owns only that choice. A plain wire reads and writes its socket directly: one
//! branch more than `&TcpStream`, no copy, no extra system call. A TLS wire (feature `tls`) goes
//! through its `rustls::ServerConnection`, which [`crate::tls`] made in the TLS handshake. It
//! never decides what the bytes mean and never sets a deadline: the caller sets the socket's
//! timeouts, which bound the TLS reads and writes too. In a build without the feature,
//! [`TlsSession`] is a type with no values: the code that would use one compiles, and the
//! compiler knows it never runs.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A connection's bytes: plain TCP, or TLS over TCP.
pub struct Wire {
    tcp: Arc<TcpStream>,
    tls: Option<TlsSession>,
}

impl Wire {
    /// Plain TCP: reads and writes go straight to the socket.
    pub fn plain(tcp: Arc<TcpStream>) -> Wire {
        Wire { tcp, tls: None }
    }

    /// TLS over `tcp`, whose handshake `conn` has completed.
    #[cfg(feature = "tls")]
    pub fn tls(tcp: Arc<TcpStream>, mut conn: rustls::ServerConnection) -> Wire {
        // What is encrypted goes at once into the outlet's backlog, which has its own bounds.
        conn.set_buffer_limit(None);
        let tls = TlsSession(Arc::new(Mutex::new(conn)));
        Wire {
            tcp,
            tls: Some(tls),
        }
    }

    /// The socket and the TLS session, for the session and its outlet.
    pub fn into_parts(self) -> (Arc<TcpStream>, Option<TlsSession>) {
        (self.tcp, self.tls)
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

    /// Shuts the socket down; a TLS wire first tells its peer with a `close_notify` alert when
    /// the writing side closes (best effort, within the socket's write timeout).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let (Some(tls), Shutdown::Write | Shutdown::Both) = (&self.tls, how) {
            let _ = tls.close_notify(&self.tcp);
        }
        self.tcp.shutdown(how)
    }
}

impl Read for &Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.tls {
            Some(tls) => tls.read_blocking(&self.tcp, buf),
            None => (&*self.tcp).read(buf),
        }
    }
}

impl Write for &Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.tls {
            Some(tls) => tls.write_blocking(&self.tcp, buf),
            None => (&*self.tcp).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &self.tls {
            Some(tls) => tls.flush_blocking(&self.tcp),
            None => (&*self.tcp).flush(),
        }
    }
}

/// One connection's TLS state, shared by the session (which decrypts what it read) and the
/// outlet (which encrypts what the dispatcher, a courier or the session sends).
///
/// Why a plain lock, and not `try_lock`: nobody holds it across a socket read or a write that
/// can wait. The session reads the socket without it and locks only to decrypt those bytes (at
/// most one read's worth); the outlet locks it to encrypt frames into its own backlog in memory,
/// and writes that backlog without it. So a writer waits at most one decryption of one read,
/// microseconds whatever the peer does, and cannot starve; a `try_lock` would need a second way
/// for frames that find it taken, and could find it taken every time.
#[cfg(feature = "tls")]
#[derive(Clone)]
pub struct TlsSession(Arc<Mutex<rustls::ServerConnection>>);

/// No TLS in this build: a type with no values.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
pub enum TlsSession {}

#[cfg(feature = "tls")]
impl TlsSession {
    fn lock(&self) -> MutexGuard<'_, rustls::ServerConnection> {
        // A panic mid-call leaves rustls' state as consistent as any error does: the next call
        // reports the connection broken.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encrypts `parts` as one stream of plaintext and appends the TLS records to `out`.
    pub fn seal(&self, parts: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
        let mut conn = self.lock();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // Without a buffer limit, rustls takes all of it.
        let taken = conn.writer().write_vectored(parts)?;
        debug_assert_eq!(taken, total);
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
        Ok(())
    }

    /// Decrypts bytes the session read from the socket (an empty slice: the end of the
    /// stream), from the front, until some plaintext is ready for [`TlsSession::read_plain`];
    /// returns how many it took. rustls takes no more while 16 KiB of plaintext wait, so the
    /// caller keeps the rest until it has read the plaintext. Nothing is taken after the peer's
    /// `close_notify`.
    pub fn open(&self, raw: &[u8]) -> io::Result<usize> {
        let mut conn = self.lock();
        let mut rest = raw;
        loop {
            let taken = conn.read_tls(&mut rest)?;
            let state = conn.process_new_packets().map_err(io::Error::other)?;
            if taken == 0 || rest.is_empty() || state.plaintext_bytes_to_read() > 0 {
                return Ok(raw.len() - rest.len());
            }
        }
    }

    /// Plaintext decrypted so far: `WouldBlock` if none waits, `Ok(0)` after the peer's
    /// `close_notify`.
    pub fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.lock().reader().read(buf)
    }

    /// Blocking reads at the door: decrypts until there is plaintext, the end, or a timeout.
    fn read_blocking(&self, tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        rustls::Stream::new(&mut *self.lock(), &mut &*tcp).read(buf)
    }

    /// Blocking writes at the door (the socket's write timeout bounds them).
    fn write_blocking(&self, tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        rustls::Stream::new(&mut *self.lock(), &mut &*tcp).write(buf)
    }

    fn flush_blocking(&self, tcp: &TcpStream) -> io::Result<()> {
        rustls::Stream::new(&mut *self.lock(), &mut &*tcp).flush()
    }

    /// Sends the `close_notify` alert (and anything still buffered).
    fn close_notify(&self, tcp: &TcpStream) -> io::Result<()> {
        let mut conn = self.lock();
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(&mut &*tcp)?;
        }
        Ok(())
    }
}

#[cfg(not(feature = "tls"))]
impl TlsSession {
    pub fn seal(&self, _: &[IoSlice<'_>], _: &mut Vec<u8>) -> io::Result<()> {
        match *self {}
    }

    pub fn open(&self, _: &[u8]) -> io::Result<usize> {
        match *self {}
    }

    pub fn read_plain(&self, _: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }

    fn read_blocking(&self, _: &TcpStream, _: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }

    fn write_blocking(&self, _: &TcpStream, _: &[u8]) -> io::Result<usize> {
        match *self {}
    }

    fn flush_blocking(&self, _: &TcpStream) -> io::Result<()> {
        match *self {}
    }

    fn close_notify(&self, _: &TcpStream) -> io::Result<()> {
        match *self {}
    }
}
