//! The SVID and trust bundles of `sigil-control` and of the `sigil` CLI, read from files.
//! Both sides of the operator API are mutual TLS with SPIFFE verification, the sidecars' own
//! rustls configurations (`sigil_filters::tls`).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use sigil_config::TrustDomain;
use sigil_filters::{LocalIdentity, TrustBundles};

pub struct Identity {
    pub local: LocalIdentity,
    pub bundles: Arc<TrustBundles>,
    pub provider: Arc<CryptoProvider>,
}

/// Reads `cert` (leaf first), `key` and `bundle_dir` (one `<trust domain>.pem` each).
pub fn load(cert: &Path, key: &Path, bundle_dir: &Path) -> Result<Identity, String> {
    let provider = sigil_filters::tls::provider();
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let local =
        LocalIdentity::from_pem(&read(cert)?, &read(key)?, UnixTime::now(), None, &provider)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
    let mut bundles = TrustBundles::new();
    let entries =
        std::fs::read_dir(bundle_dir).map_err(|e| format!("{}: {e}", bundle_dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        let Some(td) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".pem"))
        else {
            continue;
        };
        let td = TrustDomain::parse(td).map_err(|e| format!("{}: {e}", path.display()))?;
        bundles
            .insert_pem(&td, &read(&path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if bundles.is_empty() {
        return Err(format!(
            "{}: no trust bundle (<trust domain>.pem) found",
            bundle_dir.display()
        ));
    }
    Ok(Identity {
        local,
        bundles: Arc::new(bundles),
        provider,
    })
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
    let timeout = std::time::Duration::from_secs(10);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            eprintln!("sigil-control: {what} handshake from {client} refused: {e}");
            return None;
        }
        Err(_) => {
            eprintln!("sigil-control: {what} handshake from {client} timed out");
            return None;
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| sigil_filters::svid::leaf_spiffe_id(leaf, None).ok())?;
    Some((tls, peer))
}
