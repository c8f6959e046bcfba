//! TLS on the one port (feature `tls`): the certificate and key from `--tls-cert` and
//! `--tls-key`, the server's rustls configuration, the TLS handshake at the front door, and the
//! reload of the pair on `SIGHUP`.
//!
//! rustls with the `ring` provider: ring builds with a C compiler alone (no cmake, no Go), which
//! a Raspberry Pi or a router's SDK has. The pair is read with rustls' own PEM reader (the chain
//! in the cert file; PKCS#8, PKCS#1 RSA or SEC1 EC keys, Ed25519 in PKCS#8).
//!
//! This module owns the current pair ([`Certificates`], the resolver every new handshake asks)
//! and the handshake's refusals. It never reads a request and never touches a connection after
//! its handshake: a finished handshake becomes a [`Wire`], which carries the bytes.

use std::fmt;
use std::io::{self, ErrorKind};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};

use crate::wire::Wire;

mod validity;

/// The first byte of every TLS record that opens a connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Where the pair comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a pair cannot be used: said in one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error("--tls-cert {}: {why}", path.display())]
    Cert { path: PathBuf, why: String },
    #[error("--tls-key {}: {why}", path.display())]
    Key { path: PathBuf, why: String },
    #[error("--tls-cert {}: {why}", path.display())]
    Expired { path: PathBuf, why: String },
    #[error(
        "--tls-key {} is not the key of the certificate in --tls-cert {}",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The crypto provider every TLS object here uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a pair: the chain parses, the key parses, and the key is the certificate's.
pub fn load_pair(files: &TlsFiles) -> Result<CertifiedKey, PairError> {
    let cert_error = |why: String| PairError::Cert {
        path: files.cert.clone(),
        why,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_error(pem_problem(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(pem_problem(&e)))?;
    if chain.is_empty() {
        return Err(cert_error("holds no PEM certificate".into()));
    }
    check_validity(&files.cert, &chain[0])?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| PairError::Key {
        path: files.key.clone(),
        why: pem_problem(&e),
    })?;
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| PairError::Key {
                path: files.key.clone(),
                why: format!("not a usable RSA, ECDSA or Ed25519 key ({e})"),
            })?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        Ok(()) => Ok(pair),
        Err(rustls::Error::InconsistentKeys(_)) => Err(PairError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(e) => Err(cert_error(format!("not a usable certificate ({e})"))),
    }
}

/// Refuses a certificate that has expired (or is not valid yet): browsers would refuse it, and
/// a server that starts with it only looks healthy.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), PairError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let expired = |why: String| PairError::Expired {
        path: path.to_owned(),
        why,
    };
    let Some((not_before, not_after)) = validity::of(cert) else {
        return Err(expired("its validity period cannot be read".into()));
    };
    if now > not_after {
        return Err(expired(format!(
            "expired {} days ago: renew it (e.g. certbot renew)",
            (now - not_after) / 86_400 + 1
        )));
    }
    if now < not_before {
        return Err(expired("not valid yet (is the clock right?)".into()));
    }
    Ok(())
}

/// A PEM reading error as a person reads it.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) if e.kind() == ErrorKind::NotFound => "no such file".into(),
        Error::Io(e) => format!("cannot read it: {e}"),
        Error::NoItemsFound => "holds no PEM private key".into(),
        other => format!("is not valid PEM ({other:?})"),
    }
}

/// The pair every new handshake gets; [`Certificates::reload`] swaps it. A connection keeps the
/// pair it shook hands with (rustls holds its own `Arc`).
#[derive(Debug)]
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificates {
    /// Reads the pair named by `files`.
    pub fn load(files: TlsFiles) -> Result<Certificates, PairError> {
        let pair = load_pair(&files)?;
        Ok(Certificates {
            files,
            current: RwLock::new(Arc::new(pair)),
        })
    }

    /// Reads the files again and serves the new pair to new connections; a bad pair leaves
    /// the old one in place.
    pub fn reload(&self) -> Result<(), PairError> {
        let pair = Arc::new(load_pair(&self.files)?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = pair;
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        Some(current.clone())
    }
}

/// The server side of TLS: the configuration every handshake uses.
pub struct Tls {
    config: Arc<ServerConfig>,
    certificates: Arc<Certificates>,
}

impl Tls {
    /// Reads the pair and builds the configuration (TLS 1.2 and 1.3, no client certificates).
    pub fn new(files: TlsFiles) -> Result<Tls, PairError> {
        let certificates = Arc::new(Certificates::load(files)?);
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PairError::Cert {
                path: certificates.files.cert.clone(),
                why: format!("no TLS version available ({e})"),
            })?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        Ok(Tls {
            config: Arc::new(config),
            certificates,
        })
    }

    pub fn certificates(&self) -> &Certificates {
        &self.certificates
    }

    /// Runs the TLS handshake on `tcp`, all of it by `deadline`. The first byte decides: a TLS
    /// handshake record goes on; anything else is [`Refused::PlainHttp`] (nothing more is read).
    pub fn accept(&self, tcp: Arc<TcpStream>, deadline: Instant) -> Result<Wire, Refused> {
        let mut first = [0u8; 1];
        set_deadline(&tcp, deadline)?;
        match tcp.peek(&mut first) {
            Ok(0) => return Err(Refused::Closed),
            Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => return Err(Refused::PlainHttp),
            Ok(_) => {}
            Err(e) => return Err(Refused::from_io(e)),
        }
        let mut conn = ServerConnection::new(self.config.clone()).map_err(Refused::Tls)?;
        while conn.is_handshaking() {
            set_deadline(&tcp, deadline)?;
            conn.complete_io(&mut &*tcp).map_err(Refused::from_io)?;
        }
        // The session and the door set their own timeouts from here on.
        let _ = tcp.set_read_timeout(None);
        Ok(Wire::tls(tcp, conn))
    }
}

/// Bounds the next socket read and write by `deadline` (a timeout if it has passed).
fn set_deadline(tcp: &TcpStream, deadline: Instant) -> Result<(), Refused> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Refused::Timeout);
    }
    tcp.set_read_timeout(Some(left))
        .and_then(|()| tcp.set_write_timeout(Some(left)))
        .map_err(Refused::Io)
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum Refused {
    /// The first bytes were not TLS (most likely plain HTTP): the caller answers in plain text.
    PlainHttp,
    /// The peer closed before sending anything (a port check, a browser's spare connection).
    Closed,
    /// The peer closed in the middle of the handshake (a truncated ClientHello, a client that
    /// gave up on the certificate).
    Truncated,
    /// The handshake did not complete within the deadline.
    Timeout,
    /// The peer sent something TLS refuses (garbage, a bad ClientHello, an alert).
    Tls(rustls::Error),
    Io(io::Error),
}

impl Refused {
    fn from_io(e: io::Error) -> Refused {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Refused::Timeout,
            ErrorKind::UnexpectedEof => Refused::Truncated,
            _ => match e.downcast::<rustls::Error>() {
                Ok(tls) => Refused::Tls(tls),
                Err(e) => Refused::Io(e),
            },
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::PlainHttp => write!(f, "plain HTTP on the TLS port"),
            Refused::Closed => write!(f, "closed before the TLS handshake"),
            Refused::Truncated => write!(f, "closed in the middle of the TLS handshake"),
            Refused::Timeout => write!(f, "the TLS handshake did not complete in time"),
            Refused::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Refused::Io(e) => write!(f, "connection lost during the TLS handshake: {e}"),
        }
    }
}
