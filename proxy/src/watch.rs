//! Polls the identity, policy and revocation files on a plain thread (tiny blocking reads)
//! and puts changes in force; re-checks live TCP connections against policy every few
//! polls, for policies that expire.

use std::sync::Arc;

use sigil_config::{Policy, Revocation};
use tracing::{error, info};

use crate::identity::{IdentityFiles, Seen, POLL_INTERVAL};
use crate::proxy::Proxy;
use crate::resources::{FilePolicies, ResourceDir};

/// What the watcher polls.
pub struct Watched {
    pub identity: IdentityFiles,
    pub seen: Seen,
    pub policies: ResourceDir<Policy>,
    pub revocations: ResourceDir<Revocation>,
}

pub fn spawn(p: Arc<Proxy>, mut w: Watched) {
    let provider = sigil_filters::tls::provider();
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(POLL_INTERVAL);
                for change in w.identity.poll(&mut w.seen, &provider) {
                    p.apply_identity_change(change);
                }
                let changed = poll_policies(&p, &mut w.policies);
                if changed || tick % 4 == 0 {
                    p.recheck_tcp();
                }
                poll_revocations(&p, &mut w.revocations);
            }
        })
        .expect("spawn identity watcher");
}

/// Puts a changed, valid policy directory in force; a bad one is refused whole. Returns
/// whether the policies changed.
fn poll_policies(p: &Proxy, dir: &mut ResourceDir<Policy>) -> bool {
    let metrics = &p.ledger.metrics;
    match dir.poll() {
        None => false,
        Some(Err(problems)) => {
            for problem in &problems {
                error!("policy update refused, keeping the current policies: {problem}");
            }
            metrics.reload("policy", false);
            false
        }
        Some(Ok(set)) => {
            let local = p.tls.get().identity.id().clone();
            let set = FilePolicies::new(set, &local);
            let n = set.total();
            p.sources.lock().expect("sources lock").file_policies = set;
            p.refresh_policy();
            crate::alloc::release_free_memory();
            metrics.reload("policy", true);
            info!(policies = n, "policies updated");
            true
        }
    }
}

/// Puts a changed, valid revocation directory in force; a bad one is refused whole.
fn poll_revocations(p: &Proxy, dir: &mut ResourceDir<Revocation>) {
    let metrics = &p.ledger.metrics;
    match dir.poll() {
        None => {}
        Some(Err(problems)) => {
            for problem in &problems {
                error!("revocation update refused, keeping the current set: {problem}");
            }
            metrics.reload("revocation", false);
        }
        Some(Ok(set)) => {
            metrics.reload("revocation", true);
            p.sources.lock().expect("sources lock").file_revocations = set.resources;
            p.install_revocations();
        }
    }
}
