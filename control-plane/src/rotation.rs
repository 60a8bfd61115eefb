//! The CA set in force and its rotation, driven by the CA directory (`ca.rs`).
//!
//! The control plane owns its trust domain's bundle: it keeps a `TrustBundle` resource named
//! `ca-<trust domain>` in the store holding every CA of the set (active, next, retired) and the
//! certificates of its own bundle file for that domain (anchors of SVIDs it does not issue,
//! such as its own). The store pushes it to every sidecar like any other change, and the
//! sidecars acknowledge its version. A rotation (`sigil ca rotate`) then runs by itself:
//!
//! 1. the next CA appears in the directory: it enters the bundle;
//! 2. once every sidecar connected here has acknowledged that bundle, the next CA becomes the
//!    active one (it signs every SVID from then on) and the previous one is retired: it stays
//!    in the bundle until every SVID it signed has expired (now + the longest `svidTtl`);
//! 3. then it leaves the bundle.
//!
//! Sidecars move to the new CA at their next renewal (half their SVID's lifetime), so no
//! peer ever sees an SVID whose CA it does not trust.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use sigil_config::TrustDomain;
use sigil_filters::TrustBundles;
use tokio::sync::watch;
use tracing::{error, info};

use crate::ca::{self, CaSet};
use crate::issuer::rfc3339;
use crate::sidecars::Hub;
use crate::store::Store;

/// How often the CA directory is read.
const POLL: Duration = Duration::from_secs(1);
/// Kept beyond the last expiry of an SVID the retired CA signed, for peers whose clocks are
/// behind.
const RETIRE_MARGIN: i64 = 10;

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
        "apiVersion: sigil.dev/v1\nkind: TrustBundle\nmetadata:\n  name: {}\n  owner: sigil-control\n  purpose: the CAs that sign this trust domain's SVIDs (kept by sigil-control from --ca-dir; edits are replaced)\nspec:\n  trustDomain: {td}\n  pem: |\n{pem}",
        resource_name(td)
    )
}

/// Where a rotation stands, between two looks at the directory.
#[derive(Default)]
struct Progress {
    /// The certificates last written to the store, and the version that holds them.
    written: Option<(Vec<CertificateDer<'static>>, u64)>,
    /// The last problem logged, so that one that persists is logged once.
    problem: String,
    /// How many sidecars were last said to be behind the bundle with the next CA.
    waiting_for: usize,
}

/// Reads the CA directory every second and keeps the CA set, the verifier's bundles and the
/// stored bundle in step with it, advancing a rotation when its time comes. Runs forever.
pub async fn follow(r: Rotation) {
    let mut p = Progress::default();
    loop {
        if let Err(problem) = step(&r, &mut p).await {
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

async fn step(r: &Rotation, p: &mut Progress) -> Result<(), String> {
    let set =
        CaSet::load(&r.dir).map_err(|e| format!("{e}; the CAs loaded before stay in force"))?;
    let now = now_unix();
    if let Some(retired) = &set.retired {
        if now >= retired.until {
            ca::drop_retired(&r.dir).map_err(|e| e.to_string())?;
            info!("CA rotation: the retired CA leaves the trust bundle (every SVID it signed has expired)");
            return Ok(());
        }
    }
    let changed = {
        let current = r.cas.borrow();
        current.certs() != set.certs()
    };
    let set = Arc::new(set);
    if changed {
        r.cas.send_replace(set.clone());
        r.verify_with
            .send_replace(Arc::new(bundles_with(&r.file_bundles, &set)));
    }
    let certs = domain_certs(&r.file_bundles, &set);
    let version = match &p.written {
        Some((written, version)) if *written == certs => *version,
        _ => {
            let version = write_bundle(r, set.active.trust_domain(), &certs).await?;
            p.written = Some((certs, version));
            if set.next.is_some() {
                info!("CA rotation: the next CA is in the trust bundle (version {version}); it becomes active once every sidecar here has acknowledged it");
            }
            version
        }
    };
    if set.next.is_none() {
        return Ok(());
    }
    // Every sidecar connected here must have the bundle with the next CA before any peer
    // presents an SVID it signed.
    let behind = r.hub.status().iter().filter(|s| s.acked < version).count();
    if r.hub.version() < version || behind > 0 {
        if behind != p.waiting_for {
            info!("CA rotation: waiting for {behind} sidecar(s) to acknowledge trust bundle version {version}");
            p.waiting_for = behind;
        }
        return Ok(());
    }
    let max_ttl = r.hub.catalog().borrow().max_svid_ttl();
    let until = now + i64::try_from(max_ttl.as_secs()).unwrap_or(i64::MAX / 2) + RETIRE_MARGIN;
    ca::activate(&r.dir, until).map_err(|e| e.to_string())?;
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
) -> Result<u64, String> {
    let yaml = bundle_yaml(td, certs);
    let name = resource_name(td);
    let (_, version) = r
        .store
        .apply(&[("TrustBundle", &name, &yaml)], false)
        .await
        .map_err(|e| format!("storing TrustBundle/{name}: {e}; retrying"))?;
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
