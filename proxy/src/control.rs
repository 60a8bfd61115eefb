//! The control-plane client: one gRPC stream (`sigil.v1.Mesh/Subscribe`) to `sigil-control`
//! over mutual TLS, whose certificate must carry `controlPlane.spiffeId`.
//!
//! Each snapshot is parsed and checked as this sidecar would run it; one that fails, or that
//! is older than the one in force in the same epoch (`sigil_filters::snapshot::freshness`: a
//! replica behind its store must not roll a revocation back), is rejected (NACK, with the
//! reason; `sigil_snapshot_rejections_total`) and never replaces the snapshot in force. An
//! accepted one is written to `controlPlane.stateDir` before it is acknowledged (a write that
//! fails is said in the acknowledgement), sealed with its length and SHA-256, and read back
//! at start, so a restarted sidecar serves its last good state while the control plane is
//! unreachable. A copy that is not whole (truncated, emptied, overwritten) is ignored: until
//! a snapshot is in force the sidecar is not ready and denies every inbound request and
//! connection (`PolicyIndex::awaiting_snapshot`), since the policies it will receive could
//! deny what nothing else here knows to.
//! Lost streams are re-opened with exponential backoff and full jitter.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper::http;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use sigil_api::{Ack, Message, Snapshot};
use sigil_config::proxy_config::ControlPlaneSpec;
use sigil_config::ProxyConfig;
use sigil_filters::snapshot::{freshness, seal, unseal, Freshness, SealError};
use sigil_filters::tls;
use sigil_filters::tls::Carries;
use sigil_filters::LocalIdentity;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{error, info, warn};

use crate::proxy::Proxy;
use crate::sources::{InvalidSnapshot, Pushed};

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const SNAPSHOT_FILE: &str = "snapshot.pb";

/// The persisted snapshot, if there is an intact and valid one. Anything else is said in
/// the log and counted (`sigil_snapshot_rejections_total{reason="persisted_unusable"}`); the
/// sidecar then waits for the control plane, not ready and denying.
pub fn load_persisted(
    cfg: &ProxyConfig,
    state_dir: &Path,
    own: &LocalIdentity,
    metrics: &crate::metrics::Metrics,
) -> Option<Arc<Pushed>> {
    let path = state_dir.join(SNAPSHOT_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(
                "{}: no snapshot kept from an earlier run; not ready, and denying inbound traffic, until the control plane sends one",
                path.display()
            );
            return None;
        }
        Err(e) => {
            error!(
                "{}: cannot read the last snapshot: {e}; not ready, and denying inbound traffic, until the control plane sends one",
                path.display()
            );
            metrics.snapshot_rejected("persisted_unusable");
            return None;
        }
    };
    let parsed = match decode_persisted(&bytes) {
        Ok(s) => Pushed::parse(cfg, &s, own).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match parsed {
        Ok(p) => {
            info!(
                epoch = %p.epoch,
                version = p.version,
                policies = p.policies.len(),
                revocations = p.revocations.len(),
                registry = p.registry.len(),
                "serving the last snapshot from {} until the control plane answers",
                path.display()
            );
            Some(Arc::new(p))
        }
        Err(e) => {
            error!(
                "{}: last snapshot unusable, ignored: {e}; not ready, and denying inbound traffic, until the control plane sends one",
                path.display()
            );
            metrics.snapshot_rejected("persisted_unusable");
            None
        }
    }
}

/// Why a persisted snapshot is not used.
#[derive(Debug, PartialEq)]
enum Unusable {
    /// Not whole, or changed since it was written.
    Seal(SealError),
    /// Sealed, but not a snapshot.
    Decode(sigil_api::DecodeError),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seal(e) => write!(f, "{e}"),
            Self::Decode(e) => write!(f, "not a snapshot: {e}"),
        }
    }
}

/// The snapshot in a persisted file: sealed (whole and unchanged) and decodable. (Version 0
/// is a real snapshot: an empty store's.)
fn decode_persisted(bytes: &[u8]) -> Result<Snapshot, Unusable> {
    let payload = unseal(bytes).map_err(Unusable::Seal)?;
    Snapshot::decode(payload).map_err(Unusable::Decode)
}

/// Written to a temporary file, synced, and renamed over (the directory synced too): a crash
/// or power loss leaves the old snapshot or the new one, never half of one.
fn persist(state_dir: &Path, s: &Snapshot) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&seal(&s.encode_to_vec()))?;
    f.sync_all()?;
    std::fs::rename(&tmp, state_dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(state_dir)?.sync_all()
}

/// Why a snapshot was rejected: `Display` is the NACK's text, `label()` the metric's reason.
enum Rejected {
    /// Older than the one in force in the same epoch: the control plane is behind its store.
    Older {
        epoch: String,
        version: u64,
        running: u64,
    },
    /// No epoch, while one is in force: a control plane of an older release.
    NoEpoch {
        version: u64,
        epoch: String,
        running: u64,
    },
    Invalid(InvalidSnapshot),
}

impl Rejected {
    fn label(&self) -> &'static str {
        match self {
            Self::Older { .. } | Self::NoEpoch { .. } => "older_version",
            Self::Invalid(_) => "invalid",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Older { epoch, version, running } => write!(
                f,
                "version {version} of epoch {epoch} is older than version {running} in force: the control plane is behind its store; keeping {running}"
            ),
            Self::NoEpoch { version, epoch, running } => write!(
                f,
                "version {version} names no epoch, while epoch {epoch} is in force: a control plane of an older release, whose versions cannot be compared; keeping version {running}"
            ),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// Checks, persists and puts in force one snapshot. Ok(note): in force, with what went wrong
/// around it (it could not be persisted), for the acknowledgement. Err: rejected.
fn accept(p: &Proxy, s: &Snapshot, state_dir: &Path) -> Result<String, Rejected> {
    let (same, order) = {
        let sources = p.sources.lock().expect("sources lock");
        let cur = sources.pushed.as_ref();
        (
            cur.is_some_and(|cur| cur.raw == *s),
            freshness(
                cur.map(|c| (c.epoch.as_str(), c.version)),
                (&s.epoch, s.version),
            ),
        )
    };
    if same {
        return Ok(String::new());
    }
    match order {
        Freshness::Older => {
            return Err(Rejected::Older {
                epoch: s.epoch.clone(),
                version: s.version,
                running: p.pushed_version(),
            });
        }
        Freshness::NoEpoch => {
            let (epoch, running) = p.pushed_epoch_version();
            return Err(Rejected::NoEpoch {
                version: s.version,
                epoch,
                running,
            });
        }
        Freshness::NewEpoch => warn!(
            epoch = %s.epoch,
            version = s.version,
            "snapshot from a new epoch (the control plane's store was rebuilt); its versions count afresh"
        ),
        Freshness::First | Freshness::Newer | Freshness::Same => {}
    }
    let pushed = Pushed::parse(&p.cfg, s, &p.tls.get().identity).map_err(Rejected::Invalid)?;
    let mut note = String::new();
    if let Err(e) = persist(state_dir, s) {
        // Still applied (serving it now matters more than surviving a restart with it), and
        // said in the acknowledgement, which `sigil status` shows.
        error!(
            "{}: cannot persist snapshot {}: {e}",
            state_dir.display(),
            s.version
        );
        note = format!("in force but not persisted: {e}");
    }
    info!(
        version = pushed.version,
        policies = pushed.policies.len(),
        revocations = pushed.revocations.len(),
        registry = pushed.registry.len(),
        "snapshot from the control plane in force"
    );
    let bundles_changed = {
        let mut sources = p.sources.lock().expect("sources lock");
        let before = sources.pushed.as_ref().map(|cur| &cur.raw.bundles);
        let changed = before != Some(&s.bundles) && !(before.is_none() && s.bundles.is_empty());
        sources.pushed = Some(Arc::new(pushed));
        changed
    };
    if bundles_changed {
        p.install_bundles();
    }
    p.sources_changed.send_modify(|n| *n += 1);
    p.refresh_policy();
    p.refresh_registry();
    p.install_revocations();
    p.recheck_tcp();
    Ok(note)
}

/// Holds a stream to the control plane for as long as the sidecar runs.
pub async fn run(p: Arc<Proxy>, cp: ControlPlaneSpec) {
    let state_dir = p.cfg.resolve(&cp.state_dir);
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut received = false;
        let why = match session(&p, &cp, &state_dir, &mut received).await {
            Ok(()) => StreamError::Ended,
            Err(e) => e,
        };
        if received {
            backoff = MIN_BACKOFF;
        }
        let version = p.pushed_version();
        let wait = jitter(backoff);
        warn!(
            control_plane = %cp.address,
            serving_version = version,
            retry_in_ms = wait.as_millis() as u64,
            "control plane stream lost: {why}"
        );
        p.ledger.metrics.reload("snapshot_stream", false);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Full jitter: uniform in [0, max], so that sidecars cut off together do not return
/// together. The randomness is the std hasher's per-instance random keys.
fn jitter(max: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    max.mul_f64((r % 10_000) as f64 / 10_000.0)
        .max(Duration::from_millis(10))
}

/// An HTTP/2 connection to the control plane over TLS with `client` (mutual, or anonymous
/// for a first SVID); the connection runs on its task until the handle is aborted.
pub async fn connect(
    cp: &ControlPlaneSpec,
    timeouts: &sigil_config::proxy_config::Timeouts,
    client: Arc<rustls::ClientConfig>,
) -> Result<
    (
        SendRequest<tonic::body::Body>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ),
    StreamError,
> {
    let tcp = tokio::time::timeout(timeouts.connect, TcpStream::connect(cp.address))
        .await
        .map_err(|_| StreamError::ConnectTimeout)?
        .map_err(StreamError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(client);
    let name = ServerName::IpAddress(cp.address.ip().into());
    let stream = tokio::time::timeout(timeouts.handshake, connector.connect(name, tcp))
        .await
        .map_err(|_| StreamError::HandshakeTimeout)?
        .map_err(StreamError::Handshake)?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A control plane that vanishes without a FIN is noticed within 15 s.
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(StreamError::Http2)?;
    Ok((sender, tokio::spawn(conn)))
}

/// Why a connection or stream to the control plane ended; said in the log before the next
/// attempt.
#[derive(Debug)]
pub enum StreamError {
    /// The control plane ended the stream itself.
    Ended,
    ConnectTimeout,
    Connect(std::io::Error),
    HandshakeTimeout,
    Handshake(std::io::Error),
    Http2(hyper::Error),
    Subscribe(tonic::Status),
    Receive(tonic::Status),
    /// Our acknowledgement found the stream closed.
    Closed,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ended => f.write_str("the control plane ended the stream"),
            Self::ConnectTimeout => f.write_str("connect timed out"),
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::HandshakeTimeout => f.write_str("TLS handshake timed out"),
            Self::Handshake(e) => write!(f, "TLS handshake: {e}"),
            Self::Http2(e) => write!(f, "HTTP/2 handshake: {e}"),
            Self::Subscribe(s) => write!(f, "subscribe: {}: {}", s.code(), s.message()),
            Self::Receive(s) => write!(f, "{}: {}", s.code(), s.message()),
            Self::Closed => f.write_str("stream closed"),
        }
    }
}

async fn session(
    p: &Arc<Proxy>,
    cp: &ControlPlaneSpec,
    state_dir: &Path,
    received: &mut bool,
) -> Result<(), StreamError> {
    // Even with our own SVID revoked we present it here: the control plane is the one party
    // that can lift the revocation (`sigil unrevoke`), and it sends us only our own snapshot.
    // Its certificate is checked against the bundle directory alone, with no revocations: a
    // pushed bundle or revocation must never cut us off from the party that can undo it.
    let tls = p.tls.get();
    let bootstrap = p.sources.lock().expect("sources lock").file_bundles.clone();
    let client = tls::client_config(
        &tls.identity,
        bootstrap,
        Default::default(),
        tls::provider(),
        cp.spiffe_id.clone(),
        Carries::Http2,
    );
    let (sender, conn) = connect(cp, &p.cfg.spec.timeouts, client).await?;
    let result = subscribe(p, cp, sender, state_dir, received).await;
    conn.abort();
    result
}

async fn subscribe(
    p: &Arc<Proxy>,
    cp: &ControlPlaneSpec,
    sender: SendRequest<tonic::body::Body>,
    state_dir: &Path,
    received: &mut bool,
) -> Result<(), StreamError> {
    // HTTP/2 requests carry :scheme and :authority; a socket address always makes one.
    let origin: http::Uri = format!("https://{}", cp.address)
        .parse()
        .expect("a socket address is a URI authority");
    let node = p.cfg.metadata.name.clone();
    let (epoch, running) = p.pushed_epoch_version();
    let hello = Ack {
        node: node.clone(),
        version: running,
        accepted: true,
        error: String::new(),
        epoch,
    };
    let (tx, mut snapshots) = sigil_api::client::subscribe(sender, origin, hello)
        .await
        .map_err(StreamError::Subscribe)?;
    info!(version = running, "control plane stream open");
    while let Some(s) = snapshots.message().await.map_err(StreamError::Receive)? {
        *received = true;
        let version = s.version;
        let ack = match accept(p, &s, state_dir) {
            Ok(note) => {
                p.ledger.metrics.reload("snapshot", true);
                Ack {
                    node: node.clone(),
                    version,
                    accepted: true,
                    error: note,
                    epoch: s.epoch.clone(),
                }
            }
            Err(e) => {
                let reason = e.label();
                error!(
                    version,
                    reason, "snapshot rejected, keeping the one in force: {e}"
                );
                p.ledger.metrics.reload("snapshot", false);
                p.ledger.metrics.snapshot_rejected(reason);
                Ack {
                    node: node.clone(),
                    version,
                    accepted: false,
                    error: e.to_string(),
                    epoch: s.epoch.clone(),
                }
            }
        };
        tx.send(ack).await.map_err(|_| StreamError::Closed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;
    use sigil_api::{Bundle, Child, Document, RegistryEntry};

    const REGRESSIONS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/proptest-regressions/control.txt"
    );

    /// `ci_cases` unless `PROPTEST_CASES` says otherwise (scripts/fuzz-long.sh raises it).
    fn config(ci_cases: u32) -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(ci_cases);
        ProptestConfig {
            cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
            ..ProptestConfig::default()
        }
    }

    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[ -~\n]{0,40}").unwrap()
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        let doc = || (text(), text()).prop_map(|(name, yaml)| Document { name, yaml });
        let entry =
            (text(), text(), text()).prop_map(|(address, spiffe_id, workload)| RegistryEntry {
                address,
                spiffe_id,
                workload,
            });
        let bundle = (text(), text()).prop_map(|(trust_domain, pem)| Bundle { trust_domain, pem });
        let child = (
            text(),
            text(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            text(),
        )
            .prop_map(|(workload, spiffe_id, uid, gid, path)| Child {
                workload,
                spiffe_id,
                uid,
                gid,
                path,
            });
        (
            1..u64::MAX,
            text(),
            proptest::collection::vec(doc(), 0..4),
            proptest::collection::vec(doc(), 0..4),
            proptest::collection::vec(entry, 0..4),
            proptest::collection::vec(bundle, 0..3),
            proptest::collection::vec(child, 0..3),
        )
            .prop_map(
                |(version, epoch, policies, revocations, registry, bundles, children)| Snapshot {
                    version,
                    epoch,
                    policies,
                    revocations,
                    registry,
                    bundles,
                    children,
                },
            )
    }

    proptest! {
        #![proptest_config(config(2000))]

        /// Whatever is on disk, reading it never panics; unsealed bytes are never taken;
        /// sealed ones are exactly what they decode to.
        #[test]
        fn any_file_is_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if !bytes.starts_with(sigil_filters::snapshot::MAGIC) {
                prop_assert!(decode_persisted(&bytes).is_err());
            }
            let mut sealed = seal(&bytes);
            prop_assert_eq!(
                decode_persisted(&sealed).ok(),
                Snapshot::decode(&bytes[..]).ok()
            );
            sealed.truncate(sealed.len() / 2);
            prop_assert!(decode_persisted(&sealed).is_err());
        }

        /// What the sidecar wrote comes back as it was; one byte changed anywhere, or the
        /// file cut anywhere, and it is refused.
        #[test]
        fn a_sealed_snapshot_comes_back_whole_or_not_at_all(
            s in snapshot(),
            at in any::<prop::sample::Index>(),
            flip in 1..=255u8,
            cut in any::<prop::sample::Index>(),
        ) {
            let file = seal(&s.encode_to_vec());
            prop_assert_eq!(decode_persisted(&file), Ok(s.clone()));
            let mut changed = file.clone();
            let i = at.index(changed.len());
            changed[i] ^= flip;
            prop_assert!(decode_persisted(&changed).is_err(), "byte {} changed, accepted", i);
            let n = cut.index(file.len());
            prop_assert!(decode_persisted(&file[..n]).is_err(), "cut at {}, accepted", n);
        }
    }
}
