//! The state every connection task shares: the config, our identity, the policy index and
//! registry derived from the sources, and the rooms that serve connections (ledger, dial,
//! pools, workers, admission). Changes are put in force by `install`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::UnixTime;
use sigil_config::proxy_config::Destination;
use sigil_config::{ProxyConfig, Revocation, SpiffeId};
use sigil_filters::PolicyIndex;
use tracing::{error, info};

use crate::admission::Admission;
use crate::dial::Dialer;
use crate::identity::Current;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::sources::Sources;
use crate::workers::Workers;
use crate::workload::Workload;

pub struct Proxy {
    pub cfg: ProxyConfig,
    pub tls: Arc<Current>,
    /// The policies in force and the control-plane snapshot version they came with (0:
    /// files only), swapped together so that a record names the version that decided.
    policy: RwLock<(Arc<PolicyIndex>, u64)>,
    registry: RwLock<Arc<Registry>>,
    /// Policies and revocations from files and from the control plane; the policy index,
    /// registry and revocation set are rebuilt from these whenever one changes.
    pub sources: Mutex<Sources>,
    /// Held while a state derived from `sources` is computed and put in force, so that the
    /// file watcher and the control-plane client, racing, never install a stale one last.
    pub installing: Mutex<()>,
    /// Metrics and the registry of live connections.
    pub ledger: Arc<Ledger>,
    /// mTLS to peer sidecars.
    pub dialer: Arc<Dialer>,
    /// Pooled clients towards the local workload (L7 ports).
    pub workload: Workload,
    /// Pooled HTTP/2 connections towards peer sidecars (outbound L7).
    pub pool: Arc<Pool>,
    /// The runtimes that serve connections, one per core.
    pub workers: Arc<Workers>,
    /// What is open, against `spec.limits`.
    pub admission: Arc<Admission>,
    /// Counts the trust bundles and pushed snapshots put in force, for the Workload API's
    /// streams.
    pub sources_changed: tokio::sync::watch::Sender<u64>,
}

/// Why the sidecar is not ready (`/ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Draining,
    NoValidIdentity,
    AwaitingSnapshot,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Draining => "draining",
            Self::NoValidIdentity => "no valid SVID or trust bundle",
            Self::AwaitingSnapshot => "no snapshot from the control plane in force yet",
        })
    }
}

/// Where outbound connections go: destination → expected SPIFFE ID.
#[derive(Default)]
pub struct Registry {
    sockets: HashMap<SocketAddr, SpiffeId>,
    hosts: HashMap<IpAddr, SpiffeId>,
}

impl Registry {
    fn insert(&mut self, dest: Destination, id: &SpiffeId) {
        match dest {
            Destination::Socket(a) => self.sockets.entry(a).or_insert_with(|| id.clone()),
            Destination::Host(ip) => self.hosts.entry(ip).or_insert_with(|| id.clone()),
        };
    }

    pub fn entries(&self) -> usize {
        self.sockets.len() + self.hosts.len()
    }

    /// The ID expected at `dest`: exact address first, then host.
    fn lookup(&self, dest: SocketAddr) -> Option<&SpiffeId> {
        self.sockets
            .get(&dest)
            .or_else(|| self.hosts.get(&dest.ip()))
    }
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        tls: Current,
        metrics: Metrics,
        sources: Sources,
        workers: Workers,
        admission: Arc<Admission>,
        audit: Option<Arc<crate::audit::Auditor>>,
    ) -> Self {
        let local = tls.get().identity.id().clone();
        let tls = Arc::new(tls);
        let ledger = Arc::new(Ledger::new(metrics, audit));
        let timeouts = &cfg.spec.timeouts;
        let dialer = Arc::new(Dialer {
            tls: tls.clone(),
            ledger: ledger.clone(),
            connect: timeouts.connect,
            handshake: timeouts.handshake,
        });
        let pool = Pool::new(
            dialer.clone(),
            ledger.clone(),
            timeouts.request,
            timeouts.pool_idle,
        );
        let p = Self {
            policy: RwLock::new((Arc::new(PolicyIndex::compile([], &local)), 0)),
            registry: RwLock::default(),
            sources: Mutex::new(sources),
            installing: Mutex::new(()),
            workload: Workload::new(workers.count(), admission.max_connections() as usize),
            pool: Arc::new(pool),
            workers: Arc::new(workers),
            cfg,
            tls,
            ledger,
            dialer,
            admission,
            sources_changed: tokio::sync::watch::Sender::new(0),
        };
        p.refresh_policy();
        p.refresh_registry();
        p
    }

    /// Recompiles the policy index for our own ID from every source.
    pub fn refresh_policy(&self) {
        let _installing = self.installing.lock().expect("install lock");
        let local = self.tls.get().identity.id().clone();
        let (index, version) = {
            let mut sources = self.sources.lock().expect("sources lock");
            let Sources {
                file_policies,
                pushed,
                ..
            } = &mut *sources;
            let version = pushed.as_ref().map_or(0, |s| s.version);
            let files = match file_policies.targeting(&local) {
                Ok(files) => files,
                Err(e) => {
                    error!("cannot parse the policy files again for {local}, keeping the current policies: {e}");
                    return;
                }
            };
            let index = if self.cfg.spec.control_plane.is_some() && pushed.is_none() {
                PolicyIndex::awaiting_snapshot()
            } else {
                let pushed = pushed.iter().flat_map(|p| p.policies.iter());
                crate::resources::compile_policies(&self.cfg, files.iter().chain(pushed), &local)
            };
            (index, version)
        };
        self.ledger
            .versions
            .policies
            .store(version, Ordering::Relaxed);
        self.set_policy(index, version);
    }

    /// Rebuilds the registry: the config's own entries first (a local override wins), then
    /// the pushed ones.
    pub fn refresh_registry(&self) {
        let _installing = self.installing.lock().expect("install lock");
        let mut r = Registry::default();
        for e in &self.cfg.spec.outbound.registry {
            r.insert(e.value.address, &e.value.spiffe_id);
        }
        if let Some(pushed) = &self.sources.lock().expect("sources lock").pushed {
            for (dest, id) in &pushed.registry {
                r.insert(*dest, id);
            }
        }
        // In force first, so that a connection looking a destination up meanwhile cannot take
        // a fresh slot to one about to be pruned.
        let r = Arc::new(r);
        *self.registry.write().expect("registry lock") = r.clone();
        // Pooled connections to destinations that left (or now expect another ID) go; the
        // explicit listeners' upstreams are not the registry's to take away.
        let explicit = &self.cfg.spec.outbound.explicit;
        let pruned = self.pool.prune(|dest, id| {
            r.lookup(dest) == Some(id)
                || explicit
                    .iter()
                    .any(|l| l.value.upstream == dest && l.value.expected_id.as_ref() == Some(id))
        });
        if pruned > 0 {
            info!(
                pruned,
                "let go of pooled connections to destinations that left the registry"
            );
        }
    }

    /// The version of the control-plane snapshot in force; 0 without one.
    pub fn pushed_version(&self) -> u64 {
        let sources = self.sources.lock().expect("sources lock");
        sources.pushed.as_ref().map_or(0, |s| s.version)
    }

    /// The epoch and version of the control-plane snapshot in force; ("", 0) without one.
    pub fn pushed_epoch_version(&self) -> (String, u64) {
        let sources = self.sources.lock().expect("sources lock");
        sources
            .pushed
            .as_ref()
            .map_or((String::new(), 0), |s| (s.epoch.clone(), s.version))
    }

    /// Whether policies come from a control plane that has not sent a snapshot yet (nor
    /// left an intact copy): then the sidecar is not ready and denies inbound traffic.
    pub fn awaiting_snapshot(&self) -> bool {
        self.cfg.spec.control_plane.is_some()
            && self.sources.lock().expect("sources lock").pushed.is_none()
    }

    pub fn registry_len(&self) -> usize {
        self.registry.read().expect("registry lock").entries()
    }

    /// The trust bundles in force: the bundle directory's, each domain the control plane
    /// pushed a TrustBundle for replaced by it.
    pub fn bundles(&self) -> Arc<sigil_filters::TrustBundles> {
        self.bundles_and_version().0
    }

    /// The bundles in force and the snapshot version they came with (0: files only), read
    /// together.
    pub fn bundles_and_version(&self) -> (Arc<sigil_filters::TrustBundles>, u64) {
        let sources = self.sources.lock().expect("sources lock");
        let local = match &sources.api_bundles {
            Some(api) => Arc::new(sources.file_bundles.overlay(api)),
            None => sources.file_bundles.clone(),
        };
        let version = sources.pushed.as_ref().map_or(0, |s| s.version);
        let bundles = match sources.pushed.as_ref().and_then(|p| p.bundles.as_ref()) {
            Some(pushed) => Arc::new(local.overlay(pushed)),
            None => local,
        };
        (bundles, version)
    }

    /// Every revocation in force, from files and from the control plane.
    pub fn revocations(&self) -> Vec<Revocation> {
        let sources = self.sources.lock().expect("sources lock");
        let pushed = sources.pushed.iter().flat_map(|p| p.revocations.iter());
        sources
            .file_revocations
            .iter()
            .chain(pushed)
            .cloned()
            .collect()
    }

    pub fn policy(&self) -> Arc<PolicyIndex> {
        self.policy.read().expect("policy lock").0.clone()
    }

    /// The policies in force and the snapshot version they came with, read together.
    pub fn policy_and_version(&self) -> (Arc<PolicyIndex>, u64) {
        let held = self.policy.read().expect("policy lock");
        (held.0.clone(), held.1)
    }

    pub fn set_policy(&self, index: PolicyIndex, version: u64) {
        *self.policy.write().expect("policy lock") = (Arc::new(index), version);
    }

    /// The SPIFFE ID expected at a mesh destination; exact address first, then host.
    pub fn expected_id(&self, dest: SocketAddr) -> Option<SpiffeId> {
        self.registry
            .read()
            .expect("registry lock")
            .lookup(dest)
            .cloned()
    }

    pub fn ready(&self) -> Result<(), NotReady> {
        if self.ledger.conns.is_draining() {
            return Err(NotReady::Draining);
        }
        if !self.tls.get().is_ready(UnixTime::now()) {
            return Err(NotReady::NoValidIdentity);
        }
        if self.awaiting_snapshot() {
            return Err(NotReady::AwaitingSnapshot);
        }
        Ok(())
    }
}

/// Unix seconds by the sidecar's own clock (policy expiry).
pub fn now_unix() -> i64 {
    UnixTime::now().as_secs() as i64
}
