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

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper::http;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::pki_types::UnixTime;
use sigil_api::{Ack, Message, Snapshot};
use sigil_config::policy::Protocol;
use sigil_config::proxy_config::{ControlPlaneSpec, Destination};
use sigil_config::{ConfigError, Policy, ProxyConfig, Revocation, SpiffeId, TrustDomain};
use sigil_filters::snapshot::{freshness, seal, unseal, Freshness};
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::tls;
use sigil_filters::tls::Carries;
use sigil_filters::{LocalIdentity, TrustBundles};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{error, info, warn};

use crate::proxy::Proxy;

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const SNAPSHOT_FILE: &str = "snapshot.pb";

/// A snapshot accepted from the control plane, parsed.
pub struct Pushed {
    /// The store whose changes `version` counts.
    pub epoch: String,
    pub version: u64,
    pub policies: Vec<Policy>,
    pub revocations: Vec<Revocation>,
    pub registry: Vec<(Destination, SpiffeId)>,
    /// TrustBundles, each replacing its domain's bundle file; None when none was pushed.
    pub bundles: Option<Arc<TrustBundles>>,
    raw: Snapshot,
}

impl Pushed {
    /// Parses `s` and checks it against this sidecar's own config and SVID: what the control
    /// plane cannot know (it never sees sidecar configs) is checked here.
    pub fn parse(cfg: &ProxyConfig, s: &Snapshot, own: &LocalIdentity) -> Result<Self, String> {
        let mut policies = Vec::new();
        for d in &s.policies {
            let origin = PathBuf::from(format!("control-plane:Policy/{}", d.name));
            let parsed = Policy::parse_all(&origin, &d.yaml).map_err(|e| e.to_string())?;
            for p in &parsed {
                check_ports(cfg, &origin, p)?;
            }
            policies.extend(parsed);
        }
        let mut revocations = Vec::new();
        for d in &s.revocations {
            let origin = PathBuf::from(format!("control-plane:Revocation/{}", d.name));
            revocations.extend(Revocation::parse_all(&origin, &d.yaml).map_err(|e| e.to_string())?);
        }
        let mut registry = Vec::new();
        for e in &s.registry {
            let at = || format!("control-plane:Workload/{}", e.workload);
            let dest: Destination = e
                .address
                .parse()
                .map_err(|err| format!("{}: {err}", at()))?;
            let id = SpiffeId::parse(&e.spiffe_id)
                .map_err(|err| format!("{}: spiffeId {:?}: {err}", at(), e.spiffe_id))?;
            registry.push((dest, id));
        }
        let bundles = if s.bundles.is_empty() {
            None
        } else {
            Some(Arc::new(parse_bundles(s, own)?))
        };
        Ok(Self {
            epoch: s.epoch.clone(),
            version: s.version,
            policies,
            revocations,
            registry,
            bundles,
            raw: s.clone(),
        })
    }
}

/// A port this sidecar's config pins to TCP (`inbound.ports`) cannot take HTTP routes from a
/// pushed policy: the sidecar would silently start checking per request what its owner
/// declared a connection-level port.
fn check_ports(cfg: &ProxyConfig, origin: &Path, p: &Policy) -> Result<(), String> {
    for port in &p.spec.ports {
        let declared_tcp = cfg
            .spec
            .inbound
            .ports
            .iter()
            .any(|r| r.value.port == port.value.port);
        if declared_tcp && port.value.protocol == Protocol::Http {
            return Err(ConfigError::new(
                origin,
                Some(port.referenced),
                format!(
                    "policy {:?} declares port {} http, but this sidecar's ProxyConfig declares it tcp (inbound.ports)",
                    p.metadata.name, port.value.port
                ),
            )
            .to_string());
        }
    }
    Ok(())
}

/// The pushed bundles. A bundle for our own trust domain that would no longer verify our own
/// SVID is refused: applying it would cut this sidecar off from its whole domain (push the new
/// CA next to the old one first, rotate the SVIDs, then drop the old CA).
fn parse_bundles(s: &Snapshot, own: &LocalIdentity) -> Result<TrustBundles, String> {
    let mut bundles = TrustBundles::new();
    for b in &s.bundles {
        let at = format!("control-plane:TrustBundle for {}", b.trust_domain);
        let td = TrustDomain::parse(&b.trust_domain).map_err(|e| format!("{at}: {e}"))?;
        bundles
            .insert_pem(&td, b.pem.as_bytes())
            .map_err(|e| format!("{at}: {e}"))?;
    }
    let own_td = own.id().trust_domain_name();
    if bundles.get(own_td).is_some() {
        let provider = tls::provider();
        let (leaf, rest) = own
            .chain()
            .split_first()
            .ok_or("our SVID has no certificate")?;
        verify_svid(
            &bundles,
            &provider.signature_verification_algorithms,
            leaf,
            rest,
            UnixTime::now(),
            Usage::Client,
        )
        .map_err(|e| {
            format!(
                "control-plane:TrustBundle for {own_td}: would not verify this sidecar's own SVID ({}): {e}",
                own.id()
            )
        })?;
    }
    Ok(bundles)
}

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
    let parsed = decode_persisted(&bytes).and_then(|s| Pushed::parse(cfg, &s, own));
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

/// The snapshot in a persisted file: sealed (whole and unchanged) and decodable. (Version 0
/// is a real snapshot: an empty store's.)
fn decode_persisted(bytes: &[u8]) -> Result<Snapshot, String> {
    let payload = unseal(bytes).map_err(|e| e.to_string())?;
    Snapshot::decode(payload).map_err(|e| format!("not a snapshot: {e}"))
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

/// Why a snapshot was rejected: the NACK's text and the metric's reason.
struct Rejected(String, &'static str);

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
            let running = p.pushed_version();
            return Err(Rejected(
                format!(
                    "version {} of epoch {} is older than version {running} in force: the control plane is behind its store; keeping {running}",
                    s.version, s.epoch
                ),
                "older_version",
            ));
        }
        Freshness::NoEpoch => {
            return Err(Rejected(
                format!(
                    "version {} names no epoch, while epoch {} is in force: a control plane of an older release, whose versions cannot be compared; keeping version {}",
                    s.version,
                    p.pushed_epoch_version().0,
                    p.pushed_version()
                ),
                "older_version",
            ));
        }
        Freshness::NewEpoch => warn!(
            epoch = %s.epoch,
            version = s.version,
            "snapshot from a new epoch (the control plane's store was rebuilt); its versions count afresh"
        ),
        Freshness::First | Freshness::Newer | Freshness::Same => {}
    }
    let pushed =
        Pushed::parse(&p.cfg, s, &p.tls.get().identity).map_err(|e| Rejected(e, "invalid"))?;
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
        crate::install_bundles(p);
    }
    p.refresh_policy();
    p.refresh_registry();
    crate::install_revocations(p);
    crate::recheck_tcp(p);
    Ok(note)
}

/// Holds a stream to the control plane for as long as the sidecar runs.
pub async fn run(p: Arc<Proxy>, cp: ControlPlaneSpec) {
    let state_dir = p.cfg.resolve(&cp.state_dir);
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut received = false;
        let why = match session(&p, &cp, &state_dir, &mut received).await {
            Ok(()) => "the control plane ended the stream".to_string(),
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
        p.metrics.reload("snapshot_stream", false);
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

async fn session(
    p: &Arc<Proxy>,
    cp: &ControlPlaneSpec,
    state_dir: &Path,
    received: &mut bool,
) -> Result<(), String> {
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
    let timeouts = &p.cfg.spec.timeouts;
    let tcp = tokio::time::timeout(timeouts.connect, TcpStream::connect(cp.address))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(client);
    let name = ServerName::IpAddress(cp.address.ip().into());
    let stream = tokio::time::timeout(timeouts.handshake, connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A control plane that vanishes without a FIN is noticed within 15 s.
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let conn = tokio::spawn(conn);
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
) -> Result<(), String> {
    // HTTP/2 requests carry :scheme and :authority.
    let origin: http::Uri = format!("https://{}", cp.address)
        .parse()
        .map_err(|e| format!("{}: {e}", cp.address))?;
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
        .map_err(|s| format!("subscribe: {}: {}", s.code(), s.message()))?;
    info!(version = running, "control plane stream open");
    while let Some(s) = snapshots
        .message()
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
    {
        *received = true;
        let version = s.version;
        let ack = match accept(p, &s, state_dir) {
            Ok(note) => {
                p.metrics.reload("snapshot", true);
                Ack {
                    node: node.clone(),
                    version,
                    accepted: true,
                    error: note,
                    epoch: s.epoch.clone(),
                }
            }
            Err(Rejected(e, reason)) => {
                error!(
                    version,
                    reason, "snapshot rejected, keeping the one in force: {e}"
                );
                p.metrics.reload("snapshot", false);
                p.metrics.snapshot_rejected(reason);
                Ack {
                    node: node.clone(),
                    version,
                    accepted: false,
                    error: e,
                    epoch: s.epoch.clone(),
                }
            }
        };
        tx.send(ack).await.map_err(|_| "stream closed")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;
    use sigil_api::{Bundle, Document, RegistryEntry};

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
        (
            1..u64::MAX,
            text(),
            proptest::collection::vec(doc(), 0..4),
            proptest::collection::vec(doc(), 0..4),
            proptest::collection::vec(entry, 0..4),
            proptest::collection::vec(bundle, 0..3),
        )
            .prop_map(
                |(version, epoch, policies, revocations, registry, bundles)| Snapshot {
                    version,
                    epoch,
                    policies,
                    revocations,
                    registry,
                    bundles,
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
