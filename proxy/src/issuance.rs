//! The sidecar's SVID from the control plane (`identity.joinTokenFile`): it makes its own
//! ECDSA P-256 key, which never leaves it, and sends a CSR (`sigil.v1.Identity/Issue`); the
//! first time with the one-time join token of the file, after that authenticated by its
//! current SVID. The SVID and key are kept in `controlPlane.stateDir` (`svid.pem`, the key and
//! the chain in one file of mode 0600, replaced whole), so a restarted sidecar renews with
//! them instead of needing a new token.
//!
//! Clocks: an SVID starts at the control plane's second of issue. The sidecar accepts one up
//! to `SKEW` before its start by its own clock, and puts a renewed one in force `SKEW` after
//! receiving it (the current one is valid for long after), so that peers whose clocks are up
//! to `SKEW` behind the control plane's accept it.
//!
//! Renewal is due at half the SVID's lifetime, ±10 % (`sigil_filters::issuance::renew_at`).
//! A failed renewal is retried with backoff (1 s doubling to 60 s, jittered) while the
//! sidecar keeps serving on the SVID it has; it goes not-ready only when that SVID expires
//! (`TlsState::is_ready`). A new SVID is put in force for new handshakes without closing a
//! connection, as a rotated SVID file is. If the SVID expired, only a new join token written
//! to the file brings the sidecar back: it is read again at every attempt.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use sigil_api::{IssueRequest, IssueResponse};
use sigil_config::proxy_config::{ControlPlaneSpec, SvidSource, Timeouts};
use sigil_config::{ProxyConfig, SpiffeId};
use sigil_filters::issuance::{renew_at, Validity};
use sigil_filters::tls::{self, Carries};
use sigil_filters::{LocalIdentity, TrustBundles};
use tracing::{error, info, warn};

use crate::control::{connect, StreamError};
use crate::identity::Change;
use crate::proxy::Proxy;

const SVID_FILE: &str = "svid.pem";
pub(crate) const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// The clock difference with the control plane and peers that is tolerated (see above).
pub(crate) const SKEW: Duration = Duration::from_secs(5);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why no SVID came from the control plane.
#[derive(Debug)]
pub enum IssueError {
    /// The join token file could not be read, or is empty.
    Token(PathBuf, String),
    Connect(StreamError),
    /// The control plane refused (its reason, from the gRPC message).
    Refused(tonic::Code, String),
    /// What it sent is not an SVID this sidecar can use with its key.
    Unusable(String),
    /// The SVID could not be kept in the state directory.
    Persist(PathBuf, std::io::Error),
    Key(String),
}

impl IssueError {
    /// Whether asking again unchanged can succeed: the control plane was unreachable or
    /// failed on its side. A refused token or CSR will be refused again.
    pub fn transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Persist(..) => true,
            Self::Refused(code, _) => matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

impl fmt::Display for IssueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(path, why) => write!(f, "join token {}: {why}", path.display()),
            Self::Connect(e) => write!(f, "control plane: {e}"),
            Self::Refused(_, why) => write!(f, "the control plane refused: {why}"),
            Self::Unusable(why) => write!(f, "the SVID the control plane sent is unusable: {why}"),
            Self::Persist(path, e) => write!(f, "{}: {e}", path.display()),
            Self::Key(e) => write!(f, "making a key: {e}"),
        }
    }
}

/// Where the issued SVID is kept: its key and chain in one file.
fn svid_file(cfg: &ProxyConfig, cp: &ControlPlaneSpec) -> PathBuf {
    cfg.resolve(&cp.state_dir).join(SVID_FILE)
}

/// The SVID to start with: the kept one while it is valid, else a first one for the join
/// token. Transient failures (the control plane unreachable) are retried with backoff, for
/// as long as it takes; a refusal is returned.
pub async fn at_start(
    cfg: &ProxyConfig,
    bootstrap: Arc<TrustBundles>,
    expected: Option<&SpiffeId>,
) -> Result<LocalIdentity, IssueError> {
    let provider = tls::provider();
    let (SvidSource::Issued { join_token_file }, Some(cp)) =
        (cfg.spec.identity.source(), cfg.spec.control_plane.as_ref())
    else {
        return Err(IssueError::Token(
            PathBuf::new(),
            "identity.joinTokenFile and controlPlane are required".into(),
        ));
    };
    let file = svid_file(cfg, cp);
    if let Some(kept) = kept(&file, expected, &provider) {
        info!(id = %kept.id(), not_after = kept.not_after(), "using the SVID kept in {}", file.display());
        return Ok(kept);
    }
    let token_file = cfg.resolve(&join_token_file);
    let mut backoff = MIN_BACKOFF;
    loop {
        let attempt = first(cfg, cp, &token_file, &bootstrap, expected, &provider).await;
        match attempt {
            Ok(identity) => return Ok(identity),
            Err(e) if e.transient() => {
                let wait = jitter(backoff);
                warn!(retry_in_ms = wait.as_millis() as u64, "no SVID yet: {e}");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The kept SVID, if its file is there and it is valid now.
fn kept(
    file: &Path,
    expected: Option<&SpiffeId>,
    provider: &Arc<CryptoProvider>,
) -> Option<LocalIdentity> {
    let pem = std::fs::read(file).ok()?;
    // One file: the key block and the certificate blocks are each picked out of it.
    match LocalIdentity::from_pem(&pem, &pem, UnixTime::now(), expected, provider) {
        Ok(identity) => Some(identity),
        Err(e) => {
            warn!(
                "{}: the kept SVID is not usable ({e}); asking for a new one",
                file.display()
            );
            None
        }
    }
}

/// First contact: a CSR with the join token, without an SVID.
async fn first(
    cfg: &ProxyConfig,
    cp: &ControlPlaneSpec,
    token_file: &Path,
    bootstrap: &Arc<TrustBundles>,
    expected: Option<&SpiffeId>,
    provider: &Arc<CryptoProvider>,
) -> Result<LocalIdentity, IssueError> {
    let token = std::fs::read_to_string(token_file)
        .map_err(|e| IssueError::Token(token_file.to_path_buf(), e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(IssueError::Token(
            token_file.to_path_buf(),
            "the file is empty".into(),
        ));
    }
    let client = tls::client_config_anonymous(
        bootstrap.clone(),
        provider.clone(),
        cp.spiffe_id.clone(),
        Carries::Http2,
    );
    let identity = ask(cfg, cp, client, token, expected, provider).await?;
    info!(id = %identity.id(), not_after = identity.not_after(), "first SVID issued by the control plane");
    Ok(identity)
}

/// Makes a key and a CSR, asks, checks what came back with the key, keeps both.
async fn ask(
    cfg: &ProxyConfig,
    cp: &ControlPlaneSpec,
    client: Arc<rustls::ClientConfig>,
    token: &str,
    expected: Option<&SpiffeId>,
    provider: &Arc<CryptoProvider>,
) -> Result<LocalIdentity, IssueError> {
    let (key_pem, csr) = key_and_csr(expected)?;
    let request = IssueRequest {
        csr,
        join_token: token.to_string(),
        node: cfg.metadata.name.clone(),
        for_workload: String::new(),
    };
    let response = call(cp, &cfg.spec.timeouts, client, request).await?;
    let chain_pem: String = response
        .chain
        .iter()
        .map(|c| pem("CERTIFICATE", c))
        .collect();
    // Accepted up to SKEW before its start by our clock (see the module's documentation).
    let at = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            + SKEW,
    );
    let identity = LocalIdentity::from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        at,
        expected,
        provider,
    )
    .map_err(|e| IssueError::Unusable(e.to_string()))?;
    // Not kept is not lost: the SVID serves from memory, and the next renewal keeps it again.
    let file = svid_file(cfg, cp);
    if let Err(e) = keep(&file, &format!("{key_pem}{chain_pem}")) {
        error!("the new SVID is in force but not kept for a restart: {e}");
    }
    Ok(identity)
}

pub(crate) async fn call(
    cp: &ControlPlaneSpec,
    timeouts: &Timeouts,
    client: Arc<rustls::ClientConfig>,
    request: IssueRequest,
) -> Result<IssueResponse, IssueError> {
    let (sender, conn) = connect(cp, timeouts, client)
        .await
        .map_err(IssueError::Connect)?;
    let origin = format!("https://{}", cp.address)
        .parse()
        .expect("a socket address is a URI authority");
    let answer = tokio::time::timeout(
        timeouts.request,
        sigil_api::client::issue(sender, origin, request),
    )
    .await;
    conn.abort();
    match answer {
        Err(_) => Err(IssueError::Refused(
            tonic::Code::DeadlineExceeded,
            format!("no answer within {:?}", timeouts.request),
        )),
        Ok(Err(status)) => Err(IssueError::Refused(
            status.code(),
            status.message().to_string(),
        )),
        Ok(Ok(response)) => Ok(response),
    }
}

/// A P-256 key (PKCS#8 PEM) made here, and a CSR over it naming `id` if the config pins one
/// (else the control plane names the identity from the token's Workload).
pub(crate) fn key_and_csr(id: Option<&SpiffeId>) -> Result<(String, Vec<u8>), IssueError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IssueError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    if let Some(id) = id {
        let uri = id
            .as_str()
            .try_into()
            .map_err(|_| IssueError::Key(format!("{id} is not an IA5 string")))?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    }
    let csr = params
        .serialize_request(&key)
        .map_err(|e| IssueError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Keeps the key and chain in one file (mode 0600), written whole, synced, renamed over, and
/// the directory synced: a crash leaves the old pair or the new one, never half of each.
fn keep(file: &Path, pem: &str) -> Result<(), IssueError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e| IssueError::Persist(file.to_path_buf(), e);
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = file.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, file).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

/// Renews the SVID for as long as the sidecar runs (see the module's documentation).
pub async fn renew(p: Arc<Proxy>) {
    let (Some(cp), SvidSource::Issued { join_token_file }) = (
        p.cfg.spec.control_plane.clone(),
        p.cfg.spec.identity.source(),
    ) else {
        return;
    };
    let token_file = p.cfg.resolve(&join_token_file);
    // The last token the control plane answered about: only a different one is worth
    // presenting again. (A sidecar that started from its kept SVID presents the file's token
    // once if it needs one, and learns from the answer.)
    let mut spent = String::new();
    loop {
        let current = p.tls.get();
        let v = Validity {
            not_before: current.identity.not_before() as i64,
            not_after: current.identity.not_after() as i64,
        };
        let due = renew_at(v, unit_jitter());
        sleep_until_unix(due).await;
        let mut backoff = MIN_BACKOFF;
        loop {
            match renew_once(&p, &cp, &token_file, &mut spent).await {
                Ok(identity) => {
                    info!(id = %identity.id(), not_after = identity.not_after(), "SVID renewed by the control plane");
                    p.ledger.metrics.renewed(true);
                    // For peers whose clocks are behind (see the module's documentation);
                    // also a floor between renewals should our clock run far ahead.
                    tokio::time::sleep(SKEW).await;
                    p.apply_identity_change(Change::Svid(Ok(identity)));
                    break;
                }
                Err(e) => {
                    p.ledger.metrics.renewed(false);
                    let left = v.not_after - now_unix();
                    let wait = jitter(backoff);
                    if left > 0 {
                        warn!(
                            seconds_left = left,
                            retry_in_ms = wait.as_millis() as u64,
                            "SVID renewal failed, still serving on the current SVID: {e}"
                        );
                    } else {
                        error!(retry_in_ms = wait.as_millis() as u64, "the SVID expired and renewal failed; not ready until a new SVID arrives (a new join token in {}): {e}", token_file.display());
                    }
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// One renewal attempt: with the current SVID while it is valid and not revoked; otherwise,
/// or when the control plane refuses that SVID for good (its identity revoked with a cut-off,
/// say), with a join token from the file that the control plane has not answered about.
async fn renew_once(
    p: &Proxy,
    cp: &ControlPlaneSpec,
    token_file: &Path,
    spent: &mut String,
) -> Result<LocalIdentity, IssueError> {
    let provider = tls::provider();
    let current = p.tls.get();
    let bootstrap = p.sources.lock().expect("sources lock").file_bundles.clone();
    let expected = p.cfg.spec.identity.spiffe_id.clone().or_else(|| {
        // Renewals keep the identity the sidecar was issued (it is pinned to it).
        (!p.cfg.spec.identity.allow_identity_change).then(|| current.identity.id().clone())
    });
    let mut refused = None;
    if current.identity.not_after() as i64 > now_unix() && current.self_revoked().is_none() {
        let client = tls::client_config(
            &current.identity,
            bootstrap.clone(),
            Default::default(),
            provider.clone(),
            cp.spiffe_id.clone(),
            Carries::Http2,
        );
        match ask(&p.cfg, cp, client, "", expected.as_ref(), &provider).await {
            Err(e) if !e.transient() => refused = Some(e),
            other => return other,
        }
    }
    let token = std::fs::read_to_string(token_file).unwrap_or_default();
    if token.trim().is_empty() || token == *spent {
        return Err(refused.unwrap_or_else(|| {
            IssueError::Token(
                token_file.to_path_buf(),
                "holds no new join token (sigil token create)".into(),
            )
        }));
    }
    let client = tls::client_config_anonymous(
        bootstrap,
        provider.clone(),
        cp.spiffe_id.clone(),
        Carries::Http2,
    );
    let answer = ask(
        &p.cfg,
        cp,
        client,
        token.trim(),
        expected.as_ref(),
        &provider,
    )
    .await;
    // Spent once the control plane answered about it; not when it could not be reached.
    if !matches!(&answer, Err(e) if e.transient()) {
        *spent = token;
    }
    answer
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) async fn sleep_until_unix(at: i64) {
    let wait = (at - now_unix()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
}

/// Uniform in [-1, 1], from the std hasher's per-instance random keys.
pub(crate) fn unit_jitter() -> f64 {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (r % 20_001) as f64 / 10_000.0 - 1.0
}

/// Full jitter: uniform in [max/2, max], so that sidecars retrying together spread out.
pub(crate) fn jitter(max: Duration) -> Duration {
    max.mul_f64(0.75 + unit_jitter() / 4.0)
}

pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}
