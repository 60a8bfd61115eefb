//! The SVID and trust bundles of `sigil-control` and of the `sigil` CLI, read from files.
//! Both sides of the operator API are mutual TLS with SPIFFE verification, the sidecars' own
//! rustls configurations (`sigil_filters::tls`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use sigil_config::{SpiffeIdError, TrustDomain};
use sigil_filters::{BundleError, IdentityError, LocalIdentity, TrustBundles};
use tracing::info;

pub struct Identity {
    pub local: LocalIdentity,
    pub bundles: Arc<TrustBundles>,
    pub provider: Arc<CryptoProvider>,
}

/// Why the SVID or the trust bundles could not be loaded; each names the file at fault.
#[derive(Debug)]
pub enum LoadError {
    Read {
        path: PathBuf,
        source: io::Error,
    },
    /// The SVID and key do not make a usable identity.
    Svid {
        cert: PathBuf,
        source: IdentityError,
    },
    /// A bundle file is not named `<trust domain>.pem` with a valid trust domain.
    TrustDomain {
        path: PathBuf,
        source: SpiffeIdError,
    },
    Bundle {
        path: PathBuf,
        source: BundleError,
    },
    NoBundle {
        dir: PathBuf,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Svid { cert, source } => write!(f, "{}: {source}", cert.display()),
            Self::TrustDomain { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Bundle { path, source } => write!(f, "{}: {source}", path.display()),
            Self::NoBundle { dir } => write!(
                f,
                "{}: no trust bundle (<trust domain>.pem) found",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for LoadError {}

/// Reads `cert` (leaf first), `key` and `bundle_dir` (one `<trust domain>.pem` each).
pub fn load(cert: &Path, key: &Path, bundle_dir: &Path) -> Result<Identity, LoadError> {
    let provider = sigil_filters::tls::provider();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| LoadError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let local =
        LocalIdentity::from_pem(&read(cert)?, &read(key)?, UnixTime::now(), None, &provider)
            .map_err(|source| LoadError::Svid {
                cert: cert.to_path_buf(),
                source,
            })?;
    let mut bundles = TrustBundles::new();
    let entries = std::fs::read_dir(bundle_dir).map_err(|source| LoadError::Read {
        path: bundle_dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let path = e.path();
        let Some(td) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        let td = match TrustDomain::parse(td) {
            Ok(td) => td,
            Err(source) => return Err(LoadError::TrustDomain { path, source }),
        };
        if let Err(source) = bundles.insert_pem(&td, &read(&path)?) {
            return Err(LoadError::Bundle { path, source });
        }
    }
    if bundles.is_empty() {
        return Err(LoadError::NoBundle {
            dir: bundle_dir.to_path_buf(),
        });
    }
    Ok(Identity {
        local,
        bundles: Arc::new(bundles),
        provider,
    })
}

/// A TLS handshake on an accepted connection whose client may present no certificate (the
/// sidecar API), and who it is: its verified SVID's ID and leaf, or anonymous. None, logged:
/// the handshake failed or timed out.
pub async fn accept_any(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    what: &str,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    crate::issuer::Caller,
)> {
    let tls = handshake(acceptor, tcp, client, what).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned());
    let caller = match leaf {
        None => crate::issuer::Caller::Anonymous,
        // The verifier accepted the chain; a leaf without a readable ID cannot get here.
        Some(leaf) => {
            let id = sigil_filters::svid::leaf_spiffe_id(&leaf, None).ok()?;
            crate::issuer::Caller::Svid(id, leaf)
        }
    };
    Some((tls, caller))
}

async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    what: &str,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let timeout = std::time::Duration::from_secs(10);
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            info!("{what} handshake from {client} refused: {e}");
            None
        }
        Err(_) => {
            info!("{what} handshake from {client} timed out");
            None
        }
    }
}

/// A TLS handshake on an accepted connection, and the client's SPIFFE ID (verified by the
/// acceptor's configuration). None, logged: the handshake failed or timed out.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    what: &str,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    sigil_config::SpiffeId,
)> {
    match accept_any(acceptor, tcp, client, what).await? {
        (tls, crate::issuer::Caller::Svid(id, _)) => Some((tls, id)),
        // The operator API's acceptor requires a certificate: cannot happen.
        (_, crate::issuer::Caller::Anonymous) => None,
    }
}
