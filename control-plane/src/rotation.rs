//! The CA set in force and its rotation, driven by the CA directory (`ca.rs`).
//!
//! The control plane owns its trust domain's bundle: it keeps a `TrustBundle` resource named
//! `ca-<trust domain>` in the store holding the roots of its CA set (active, next, retired)
//! and the certificates of its own bundle file for that domain (anchors of SVIDs it does not
//! issue, such as its own). Replicas share it: each adds what its set needs and takes out only
//! the root it retired itself. The store pushes it to every sidecar like any other change, and
//! the sidecars acknowledge its version. A rotation (`sigil ca rotate`) then runs by itself:
//!
//! 1. the next CA appears in the directory: it enters the bundle;
//! 2. once every sidecar connected here has acknowledged that bundle, and 30 s at the least
//!    after it entered, the next CA becomes the active one (it signs every SVID from then on)
//!    and the previous one is retired: it stays in the bundle until every SVID it signed has
//!    expired (now + the longest `svidTtl`, or the latest expiry it signed if later);
//! 3. then it leaves the bundle.
//!
//! Sidecars move to the new CA at their next renewal (half their SVID's lifetime), so no
//! peer ever sees an SVID whose CA it does not trust.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use sigil_config::{SpiffeId, TrustDomain};
use sigil_filters::TrustBundles;
use tokio::sync::watch;
use tracing::{error, info};

use crate::ca::{self, CaSet};
use crate::issuer::rfc3339;
use crate::sidecars::Hub;
use crate::store::Store;

/// How often the CA directory is read.
const POLL: Duration = Duration::from_secs(1);
/// The next CA is in the stored bundle this long at the least before it signs: longer than
/// a sidecar's reconnection backoff (15 s) and a handshake.
const ACTIVATION_GRACE: Duration = Duration::from_secs(30);
/// Kept beyond the last expiry of an SVID the retired CA signed, for peers whose clocks are
/// behind.
const RETIRE_MARGIN: i64 = 10;

/// Why a look at the CA directory did not go through; retried at the next.
#[derive(Debug)]
pub enum RotationError {
    /// The CA directory does not load; the CAs loaded before stay in force.
    Load(ca::CaError),
    /// The retired CA could not be dropped, or the next one activated.
    Ca(ca::CaError),
    /// The trust bundle could not be stored.
    Store {
        name: String,
        source: crate::stored::StoreError,
    },
}

impl std::fmt::Display for RotationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Load(e) => write!(f, "{e}; the CAs loaded before stay in force"),
            Self::Ca(e) => write!(f, "{e}"),
            Self::Store { name, source } => {
                write!(f, "storing TrustBundle/{name}: {source}; retrying")
            }
        }
    }
}

/// What `follow` needs.
pub struct Rotation {
    pub dir: PathBuf,
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    /// The CAs in force, for the issuer.
    pub cas: watch::Sender<Arc<CaSet>>,
    /// The control plane's bundle files; its own domain's gets the CA set added.
    pub file_bundles: Arc<TrustBundles>,
    /// What the sidecar API verifies SVIDs with: the files and the CA set.
    pub verify_with: watch::Sender<Arc<TrustBundles>>,
    /// The latest expiry the active CA signed (the issuer's `issued_until`).
    pub issued_until: Arc<AtomicI64>,
    /// The control plane's own SPIFFE ID: who changed the bundle, in its audit records.
    pub own_id: SpiffeId,
}

/// The certificates of the CA's trust domain bundle: the CA set, then those of the bundle
/// file for that domain, each once.
pub fn domain_certs(file_bundles: &TrustBundles, cas: &CaSet) -> Vec<CertificateDer<'static>> {
    let mut certs = cas.anchors();
    let td = cas.active.trust_domain();
    for c in file_bundles.get(td.as_str()).map_or(&[][..], |b| b.certs()) {
        if !certs.contains(c) {
            certs.push(c.clone());
        }
    }
    certs
}

/// The bundle files with the CA's trust domain holding `domain_certs` instead.
pub fn bundles_with(file_bundles: &TrustBundles, cas: &CaSet) -> TrustBundles {
    let mut own = TrustBundles::new();
    // Every certificate was parsed as an anchor already (the files at start, the CA set at
    // load), so this cannot fail; if it did, the files alone stay in force.
    if own
        .insert_der(cas.active.trust_domain(), domain_certs(file_bundles, cas))
        .is_err()
    {
        return file_bundles.clone();
    }
    file_bundles.overlay(&own)
}

/// The name of the `TrustBundle` resource the control plane keeps for `td`.
pub fn resource_name(td: &TrustDomain) -> String {
    format!("ca-{td}")
}

fn bundle_yaml(td: &TrustDomain, certs: &[CertificateDer<'static>]) -> String {
    let mut pem = String::new();
    for c in certs {
        for line in sigil_testkit::pem("CERTIFICATE", c).lines() {
            pem += "    ";
            pem += line;
            pem += "\n";
        }
    }
    format!(
        "apiVersion: sigil.dev/v1\nkind: TrustBundle\nmetadata:\n  name: {}\n  owner: sigil-control\n  purpose: the CAs that sign this trust domain's SVIDs (kept by sigil-control from --ca-dir; a CA a replica signs with is put back if removed)\nspec:\n  trustDomain: {td}\n  pem: |\n{pem}",
        resource_name(td)
    )
}

/// Where a rotation stands, between two looks at the directory.
#[derive(Default)]
struct Progress {
    /// The last problem logged, so that one that persists is logged once.
    problem: String,
    /// How many sidecars were last said to be behind the bundle with the next CA.
    waiting_for: usize,
    /// The next CA's root, when this replica first saw it in the stored bundle, and the
    /// catalog version it saw it at.
    next_seen: Option<(CertificateDer<'static>, Instant, u64)>,
}

/// Reads the CA directory every second and keeps the CA set, the verifier's bundles and the
/// stored bundle in step with it, advancing a rotation when its time comes. Runs forever.
pub async fn follow(r: Rotation) {
    let mut p = Progress::default();
    loop {
        if let Err(problem) = step(&r, &mut p).await {
            let problem = problem.to_string();
            if problem != p.problem {
                error!("CA rotation: {problem}");
                p.problem = problem;
            }
        } else {
            p.problem.clear();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The certificates of the stored `ca-<td>` TrustBundle, as the catalog in force has it.
fn stored_certs(r: &Rotation, td: &TrustDomain) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    let catalog = r.hub.catalog().borrow().clone();
    let pem = catalog
        .trust_bundle_pem(&resource_name(td))
        .unwrap_or_default();
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn load(r: &Rotation) -> Result<Arc<CaSet>, RotationError> {
    let set = CaSet::load(&r.dir).map_err(RotationError::Load)?;
    let set = Arc::new(set);
    let changed = r.cas.borrow().certs() != set.certs();
    if changed {
        r.cas.send_replace(set.clone());
        r.verify_with
            .send_replace(Arc::new(bundles_with(&r.file_bundles, &set)));
    }
    Ok(set)
}

async fn step(r: &Rotation, p: &mut Progress) -> Result<(), RotationError> {
    let set = load(r)?;
    let td = set.active.trust_domain().clone();
    let now = now_unix();
    if let Some(retired) = &set.retired {
        if now >= retired.until {
            let gone = retired.cert.clone();
            ca::drop_retired(&r.dir).map_err(RotationError::Ca)?;
            let set = load(r)?;
            // Out of the stored bundle, unless this replica's set or bundle file still has it.
            if !domain_certs(&r.file_bundles, &set).contains(&gone) {
                let stored = stored_certs(r, &td);
                let kept: Vec<_> = stored.into_iter().filter(|c| *c != gone).collect();
                write_bundle(r, &td, &kept).await?;
            }
            info!("CA rotation: the retired CA leaves the trust bundle (every SVID it signed has expired)");
            return Ok(());
        }
    }
    // The stored bundle is shared by the replicas: each adds what its own set needs and
    // never takes out another's (a replica still signing with an older CA keeps it there).
    let stored = stored_certs(r, &td);
    let own = domain_certs(&r.file_bundles, &set);
    let missing: Vec<_> = own
        .iter()
        .filter(|c| !stored.contains(c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut all = stored;
        all.extend(missing);
        let version = write_bundle(r, &td, &all).await?;
        info!(
            version,
            "CA rotation: this replica's CAs are in the stored trust bundle"
        );
        return Ok(());
    }
    let Some(next) = &set.next else {
        p.next_seen = None;
        return Ok(());
    };
    let version = r.hub.catalog().borrow().version;
    let (_, since, version) = match &p.next_seen {
        Some(seen) if seen.0 == *next.cert() => seen.clone(),
        _ => {
            info!(version, "CA rotation: the next CA is in the trust bundle; it becomes active once every sidecar here has acknowledged it, and {} s at the least", ACTIVATION_GRACE.as_secs());
            let seen = (next.cert().clone(), Instant::now(), version);
            p.next_seen = Some(seen.clone());
            seen
        }
    };
    // Every sidecar connected here must have the bundle with the next CA before any peer
    // presents an SVID it signed; the grace lets sidecars that are reconnecting (after a
    // control-plane restart, say) come back and acknowledge it first.
    let behind = r.hub.status().iter().filter(|s| s.acked < version).count();
    if behind > 0 || since.elapsed() < ACTIVATION_GRACE {
        if behind != p.waiting_for {
            info!("CA rotation: waiting for {behind} sidecar(s) to acknowledge trust bundle version {version}");
            p.waiting_for = behind;
        }
        return Ok(());
    }
    // Every SVID the active CA signed has expired by then: the longest lifetime the
    // Workloads now have, and the latest expiry it actually signed (a lifetime shortened
    // since does not cut it short).
    let max_ttl = r.hub.catalog().borrow().max_svid_ttl();
    let by_ttl = now + i64::try_from(max_ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let signed = r.issued_until.swap(0, Ordering::Relaxed);
    let until = by_ttl.max(signed) + RETIRE_MARGIN;
    ca::activate(&r.dir, until).map_err(RotationError::Ca)?;
    load(r)?;
    p.next_seen = None;
    info!(
        "CA rotation: the next CA signs from now on; the previous one stays in the trust bundle until {}",
        rfc3339(until)
    );
    Ok(())
}

/// Stores the bundle of `td` and pushes it; the version that holds it.
async fn write_bundle(
    r: &Rotation,
    td: &TrustDomain,
    certs: &[CertificateDer<'static>],
) -> Result<u64, RotationError> {
    let yaml = bundle_yaml(td, certs);
    let name = resource_name(td);
    let (changes, version) = r
        .store
        .apply(&[("TrustBundle", &name, &yaml)], false)
        .await
        .map_err(|source| RotationError::Store {
            name: name.clone(),
            source,
        })?;
    // A bundle change is the control plane's own doing: a record of its chain, as an
    // operator's would be.
    let what = changes.first().map_or("unchanged", |c| c.label());
    if what != "unchanged" {
        if let Some(own) = r.hub.own_audit.get() {
            let subject = format!("TrustBundle/{name}");
            own.record(crate::own_audit::change(&r.own_id, what, &subject, version));
        }
    }
    let version = version.max(0) as u64;
    // Pushed at once; the watch of another replica (etcd) pushes it there.
    let _ = r.hub.publish(&r.store).await;
    Ok(version)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
