//! Putting a changed source in force: trust bundles, revocations, a rotated SVID and policy
//! re-checks. Each puts the new state in force for new handshakes and requests first, then
//! closes the live connections it no longer allows: verifiers run only at handshake time, and
//! relayed connections are authorized only when they open.

use std::sync::Arc;

use sigil_config::Revocation;
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::{tls, Revocations};
use tracing::{error, info, warn};

use crate::conns::{Direction, Kind};
use crate::identity::Change;
use crate::metrics::LocalLabels;
use crate::proxy::{now_unix, Proxy};
use crate::reasons::CloseReason;

impl Proxy {
    /// Puts the bundles in force (files, overlaid with pushed TrustBundles) for new
    /// handshakes, and closes every live connection whose peer no longer verifies.
    pub fn install_bundles(&self) {
        let _installing = self.installing.lock().expect("install lock");
        let (bundles, version) = self.bundles_and_version();
        info!(trust_domains = ?bundles.domains(), "trust bundles in force");
        self.ledger
            .versions
            .bundles
            .store(version, std::sync::atomic::Ordering::Relaxed);
        self.tls.set_bundles(bundles.clone(), version);
        self.sources_changed.send_modify(|n| *n += 1);
        let provider = tls::provider();
        let algs = &provider.signature_verification_algorithms;
        let n = self
            .ledger
            .conns
            .close_where(CloseReason::BundleChange, |c| {
                if c.kind == Kind::Workload {
                    // No peer certificate: its pooled connections are re-checked instead.
                    return false;
                }
                let usage = match c.direction {
                    Direction::Inbound => Usage::Client,
                    Direction::Outbound => Usage::Server,
                };
                let Some((leaf, rest)) = c.chain.split_first() else {
                    return true;
                };
                // At the handshake's time: a peer SVID that has expired since (its sidecar
                // renewed) keeps its connection, as it would without a bundle change.
                verify_svid(&bundles, algs, leaf, rest, c.verified_at, usage).is_err()
            });
        if n > 0 {
            warn!(
                closed = n,
                "closed live connections whose peer no longer verifies"
            );
        }
    }

    /// Puts the revocations from every source in force: new handshakes check them at once,
    /// and every live connection whose peer they cover is closed (`revoked`). If they cover
    /// our own SVID, every connection is closed and none is made or accepted until a fresh
    /// SVID arrives. Only revocations that were not in force before are logged.
    pub fn install_revocations(&self) {
        let _installing = self.installing.lock().expect("install lock");
        let list = self.revocations();
        let before = self.tls.get().revocations.clone();
        let revocations = Arc::new(Revocations::new(&list));
        self.tls.set_revocations(revocations.clone());
        let tls = self.tls.get();
        if let Some(r) = tls.self_revoked() {
            error!(revocation = %r.metadata.name, reason = %r.spec.reason, "our own SVID is revoked: closing every connection and presenting it to nobody until a fresh one arrives");
            let n = self
                .ledger
                .conns
                .close_where(CloseReason::Revoked, |_| true);
            warn!(
                closed = n,
                "closed live connections: our own SVID is revoked"
            );
            return;
        }
        info!(revocations = revocations.len(), "revocations updated");
        log_new_revocations(&list, &before);
        let n = self.ledger.conns.close_where(CloseReason::Revoked, |c| {
            // Workload connections carry no peer certificate; their pooled connections do.
            c.kind != Kind::Workload
                && c.chain
                    .first()
                    .is_some_and(|leaf| revocations.check(&c.peer, leaf).is_err())
        });
        if n > 0 {
            warn!(closed = n, "closed live connections of revoked identities");
        }
    }

    /// Closes live inbound TCP connections that the current policy no longer allows,
    /// including those on ports now declared HTTP, whose requests must each be checked.
    /// (HTTP connections are checked on every request.)
    pub fn recheck_tcp(&self) {
        let index = self.policy();
        let now = now_unix();
        let n = self
            .ledger
            .conns
            .close_where(CloseReason::PolicyChange, |c| {
                c.direction == Direction::Inbound
                    && c.kind == Kind::Tcp
                    && (index.is_http(c.port) || !index.decide_tcp(&c.peer, c.port, now).allowed)
            });
        if n > 0 {
            warn!(
                closed = n,
                "closed live connections that policy no longer allows"
            );
        }
    }

    /// Applies a change of the identity files: a rotated SVID (new handshakes use it; live
    /// connections keep theirs) or new bundle files.
    pub fn apply_identity_change(&self, change: Change) {
        let metrics = &self.ledger.metrics;
        match change {
            Change::Svid(Ok(identity)) => {
                let id_changed = identity.id() != self.tls.get().identity.id();
                info!(id = %identity.id(), not_after = identity.not_after(), "SVID rotated; new handshakes use it");
                let local: Arc<str> = identity.id().as_str().into();
                self.set_expiry(&local, identity.not_after());
                self.tls.set_identity(identity);
                if id_changed {
                    // Policies are compiled for our own ID.
                    self.refresh_policy();
                }
                metrics.reload("svid", true);
            }
            Change::Svid(Err(e)) => {
                error!("SVID update refused, keeping the current one: {e}");
                metrics.reload("svid", false);
            }
            Change::Bundles(bundles, problems) => {
                for problem in &problems {
                    error!("trust bundle update refused: {problem}");
                    metrics.reload("bundle", false);
                }
                let Some(bundles) = bundles else { return };
                info!(trust_domains = ?bundles.domains(), "trust bundle files updated");
                self.sources.lock().expect("sources lock").file_bundles = bundles;
                metrics.reload("bundle", true);
                self.install_bundles();
            }
        }
    }

    /// `sigil_svid_expiry_timestamp_seconds` of our SVID.
    pub fn set_expiry(&self, local: &Arc<str>, not_after: u64) {
        set_expiry(&self.ledger.metrics, local, not_after);
    }
}

/// `sigil_svid_expiry_timestamp_seconds`, before a `Proxy` exists too.
pub fn set_expiry(m: &crate::metrics::Metrics, local: &Arc<str>, not_after: u64) {
    m.svid_expiry
        .get_or_create(&LocalLabels {
            local_id: local.clone(),
        })
        .set(not_after as i64);
}

/// One WARN line per revocation that was not in force before: a snapshot that repeats the
/// same set says nothing new.
fn log_new_revocations(list: &[Revocation], before: &Revocations) {
    for r in list {
        if before.contains(r) {
            continue;
        }
        let issued_before = r.spec.issued_before.map(|t| t.0);
        warn!(id = %r.spec.spiffe_id, revocation = %r.metadata.name, issued_before_unix = ?issued_before, reason = %r.spec.reason, "revocation in force");
    }
}
