//! `wss://` targets (feature `tls`): a rustls client that trusts the CA named by `--ca`, and
//! one connection's TLS state shared by its reader and (in latency mode) its writer thread.
//!
//! The reader reads raw bytes from the socket without holding the TLS lock and locks only to
//! decrypt them, so a writer never waits on a blocked read; a writer holds the lock while it
//! encrypts and writes (a blocking write, bounded by the socket's write timeout).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Raw bytes read from the socket per call: one full TLS record.
const RAW_READ_BYTES: usize = 16 * 1024 + 256;

/// What a wss target needs: whom to trust, and the name to check the certificate against.
#[derive(Clone)]
pub struct TlsTarget {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsTarget {
    /// Trusts the certificates in `ca` (PEM) for `host`.
    pub fn new(ca: &Path, host: &str) -> Result<TlsTarget, String> {
        let what = |e: &dyn std::fmt::Display| format!("--ca {}: {e}", ca.display());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).map_err(|e| what(&e))? {
            roots
                .add(cert.map_err(|e| what(&e))?)
                .map_err(|e| what(&e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| what(&e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
        Ok(TlsTarget {
            config: Arc::new(config),
            name,
        })
    }

    /// Runs the TLS handshake on `tcp` (bounded by its timeouts).
    pub fn connect(&self, tcp: &TcpStream) -> io::Result<Arc<TlsConn>> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut &*tcp)?;
        }
        Ok(Arc::new(TlsConn(Mutex::new(conn))))
    }
}

/// One connection's TLS state.
pub struct TlsConn(Mutex<ClientConnection>);

impl TlsConn {
    fn lock(&self) -> MutexGuard<'_, ClientConnection> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Plaintext, reading (and decrypting) from `tcp` when none is waiting. rustls takes no
    /// encrypted bytes while 16 KiB of plaintext wait: what it did not take waits in `left`.
    pub fn read(&self, tcp: &TcpStream, left: &mut Vec<u8>, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.lock().reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if left.is_empty() {
                let mut raw = [0; RAW_READ_BYTES];
                let n = (&*tcp).read(&mut raw)?;
                left.extend_from_slice(&raw[..n]);
                if n == 0 {
                    self.feed(&mut &[][..])?; // tells rustls the stream ended
                    continue;
                }
            }
            let mut rest = &left[..];
            self.feed(&mut rest)?;
            let taken = left.len() - rest.len();
            left.drain(..taken);
        }
    }

    /// Decrypts from the front of `rest` until plaintext is ready or nothing more is taken.
    fn feed(&self, rest: &mut &[u8]) -> io::Result<()> {
        let mut conn = self.lock();
        loop {
            let taken = conn.read_tls(rest)?;
            let state = conn.process_new_packets().map_err(io::Error::other)?;
            if taken == 0 || rest.is_empty() || state.plaintext_bytes_to_read() > 0 {
                return Ok(());
            }
        }
    }

    /// Encrypts and writes all of `bytes`. On a non-blocking socket, what the socket does not
    /// take stays in rustls for the next call and `WouldBlock` is returned.
    pub fn write_all(&self, tcp: &TcpStream, bytes: &[u8]) -> io::Result<()> {
        let mut conn = self.lock();
        let mut taken = 0;
        while taken < bytes.len() {
            // rustls takes plaintext up to its buffer limit: write out, then give it the rest.
            let n = conn.writer().write(&bytes[taken..])?;
            taken += n;
            if n == 0 && !conn.wants_write() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while conn.wants_write() {
                conn.write_tls(&mut &*tcp)?;
            }
        }
        Ok(())
    }
}
