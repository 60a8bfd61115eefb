//! `identity.workloadApi`: the sidecar's SVID and trust bundles from a SPIFFE Workload API (a
//! SPIRE agent, another Sigil sidecar's `workloadApi`), over its Unix socket. The first
//! `FetchX509SVID` answer is waited for at start; then the stream is followed, each new SVID
//! put in force by the usual hot rotation and each bundle change installed (the bundles
//! replace, per trust domain, those of `bundleDir`). A broken stream is reopened with backoff,
//! serving on the SVID held meanwhile.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_api::workload::X509SvidResponse;
use sigil_config::{SpiffeId, SpiffeIdError, TrustDomain};
use sigil_filters::bundle::{split_der, BundleError};
use sigil_filters::{tls, IdentityError, LocalIdentity, TrustBundles};
use tracing::{error, info, warn};

use crate::identity::Change;
use crate::issuance::{self, MAX_BACKOFF, MIN_BACKOFF};
use crate::proxy::Proxy;

/// What one `FetchX509SVID` answer gives this sidecar.
pub struct FromApi {
    pub identity: LocalIdentity,
    pub bundles: Arc<TrustBundles>,
}

/// Why the Workload API gave this sidecar nothing it can use.
#[derive(Debug)]
pub enum ApiError {
    Connect(PathBuf, std::io::Error),
    Http2(PathBuf, hyper::Error),
    Status(tonic::Status),
    Ended,
    NoSvidFor(SpiffeId),
    NoSvid,
    NotDer,
    Svid(IdentityError),
    TrustDomain(SpiffeIdError),
    FederatedName(String, SpiffeIdError),
    BundleNotDer(TrustDomain),
    BundleEmpty(TrustDomain),
    Bundle(TrustDomain, BundleError),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(socket, e) => write!(f, "{}: {e}", socket.display()),
            Self::Http2(socket, e) => write!(f, "HTTP/2 on {}: {e}", socket.display()),
            Self::Status(s) => write!(f, "{}: {}", s.code().description(), s.message()),
            Self::Ended => f.write_str("the stream ended"),
            Self::NoSvidFor(id) => write!(f, "no SVID for {id} among those handed out"),
            Self::NoSvid => f.write_str("no SVID in the answer"),
            Self::NotDer => f.write_str("x509_svid is not DER certificates"),
            Self::Svid(e) => write!(f, "{e}"),
            Self::TrustDomain(e) => write!(f, "the SVID's trust domain: {e}"),
            Self::FederatedName(name, e) => write!(f, "federated bundle {name:?}: {e}"),
            Self::BundleNotDer(td) => write!(f, "the bundle of {td} is not DER certificates"),
            Self::BundleEmpty(td) => write!(f, "the bundle of {td} is empty"),
            Self::Bundle(td, e) => write!(f, "the bundle of {td}: {e}"),
        }
    }
}

/// The first answer of the Workload API at `socket`, waited for (retried with backoff, each
/// failure logged) for as long as it takes: the sidecar serves nothing without an SVID.
pub async fn at_start(socket: &Path, expected: Option<&SpiffeId>) -> FromApi {
    let mut backoff = MIN_BACKOFF;
    loop {
        let answer = match open(socket).await {
            Ok(mut stream) => match stream.message().await {
                Ok(Some(r)) => parse(&r, expected),
                Ok(None) => Err(ApiError::Ended),
                Err(status) => Err(ApiError::Status(status)),
            },
            Err(e) => Err(e),
        };
        match answer {
            Ok(from) => {
                info!(socket = %socket.display(), id = %from.identity.id(), not_after = from.identity.not_after(), "SVID from the Workload API");
                return from;
            }
            Err(e) => {
                let wait = issuance::jitter(backoff);
                warn!(socket = %socket.display(), retry_in_ms = wait.as_millis() as u64, "no SVID from the Workload API yet: {e}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Follows the Workload API for as long as the sidecar runs.
pub async fn follow(p: Arc<Proxy>, socket: PathBuf) {
    // The identity stays the one the sidecar started with, as with SVID files.
    let expected = p.cfg.spec.identity.spiffe_id.clone().or_else(|| {
        (!p.cfg.spec.identity.allow_identity_change).then(|| p.tls.get().identity.id().clone())
    });
    let mut backoff = MIN_BACKOFF;
    loop {
        let why = match open(&socket).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        backoff = MIN_BACKOFF;
                        apply(&p, parse(&r, expected.as_ref()));
                    }
                    Ok(None) => break ApiError::Ended,
                    Err(status) => break ApiError::Status(status),
                }
            },
            Err(e) => e,
        };
        let wait = issuance::jitter(backoff);
        warn!(socket = %socket.display(), retry_in_ms = wait.as_millis() as u64, "Workload API stream lost, serving on the SVID held: {why}");
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Puts a new answer in force: the SVID if it changed, the bundles if they did.
fn apply(p: &Proxy, answer: Result<FromApi, ApiError>) {
    let from = match answer {
        Ok(from) => from,
        Err(e) => {
            error!("SVID from the Workload API refused, keeping the current one: {e}");
            p.ledger.metrics.reload("svid", false);
            return;
        }
    };
    if from.identity.chain() != p.tls.get().identity.chain() {
        p.apply_identity_change(Change::Svid(Ok(from.identity)));
    }
    let changed = {
        let mut sources = p.sources.lock().expect("sources lock");
        let same = sources
            .api_bundles
            .as_ref()
            .is_some_and(|b| same_bundles(b, &from.bundles));
        if !same {
            sources.api_bundles = Some(from.bundles);
        }
        !same
    };
    if changed {
        p.ledger.metrics.reload("bundle", true);
        p.install_bundles();
    }
}

fn same_bundles(a: &TrustBundles, b: &TrustBundles) -> bool {
    a.domains() == b.domains()
        && a.domains()
            .iter()
            .all(|td| a.get(td).map(|x| x.certs()) == b.get(td).map(|x| x.certs()))
}

/// An HTTP/2 connection over the socket and the `FetchX509SVID` stream on it.
async fn open(socket: &Path) -> Result<tonic::Streaming<X509SvidResponse>, ApiError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| ApiError::Connect(socket.to_path_buf(), e))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Http2(socket.to_path_buf(), e))?;
    tokio::spawn(conn);
    sigil_api::client::fetch_x509_svid(sender)
        .await
        .map_err(ApiError::Status)
}

/// The answer's SVID for this sidecar (the one with the `expected` ID, else the first), with
/// the same checks as an SVID file's, and its bundles.
fn parse(r: &X509SvidResponse, expected: Option<&SpiffeId>) -> Result<FromApi, ApiError> {
    let svid = match expected {
        Some(id) => r
            .svids
            .iter()
            .find(|s| s.spiffe_id == id.as_str())
            .ok_or_else(|| ApiError::NoSvidFor(id.clone()))?,
        None => r.svids.first().ok_or(ApiError::NoSvid)?,
    };
    let chain = split_der(&svid.x509_svid).ok_or(ApiError::NotDer)?;
    let chain_pem: String = chain
        .iter()
        .map(|c| issuance::pem("CERTIFICATE", c))
        .collect();
    let key_pem = issuance::pem("PRIVATE KEY", &svid.x509_svid_key);
    let identity = LocalIdentity::from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        UnixTime::now(),
        expected,
        &tls::provider(),
    )
    .map_err(ApiError::Svid)?;
    let mut bundles = TrustBundles::new();
    let own =
        TrustDomain::parse(identity.id().trust_domain_name()).map_err(ApiError::TrustDomain)?;
    insert(&mut bundles, &own, &svid.bundle)?;
    for (name, der) in &r.federated_bundles {
        // Keyed by the trust domain's SPIFFE ID (spiffe://example.org); a bare name is taken too.
        let td = TrustDomain::parse(name.strip_prefix("spiffe://").unwrap_or(name))
            .map_err(|e| ApiError::FederatedName(name.clone(), e))?;
        if td != own {
            insert(&mut bundles, &td, der)?;
        }
    }
    Ok(FromApi {
        identity,
        bundles: Arc::new(bundles),
    })
}

fn insert(bundles: &mut TrustBundles, td: &TrustDomain, der: &[u8]) -> Result<(), ApiError> {
    let certs: Vec<CertificateDer<'static>> =
        split_der(der).ok_or_else(|| ApiError::BundleNotDer(td.clone()))?;
    if certs.is_empty() {
        return Err(ApiError::BundleEmpty(td.clone()));
    }
    bundles
        .insert_der(td, certs)
        .map_err(|e| ApiError::Bundle(td.clone(), e))
}
