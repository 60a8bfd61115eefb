//! The state every connection task shares, and the bookkeeping they all do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_config::proxy_config::Destination;
use sigil_config::{ProxyConfig, Revocation, SpiffeId};
use sigil_filters::PolicyIndex;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{error, info};

use crate::conns::{ConnGuard, Conns, Direction, Kind};
use crate::identity::Current;
use crate::metrics::{ConnLabels, HandshakeLabels, Metrics, ReasonLabels, UNAUTHENTICATED_PEER};
use crate::relay::{relay, Counters};

pub struct Proxy {
    pub cfg: ProxyConfig,
    pub tls: Current,
    policy: RwLock<Arc<PolicyIndex>>,
    registry: RwLock<Arc<Registry>>,
    /// Policies and revocations from files and from the control plane; the policy index,
    /// registry and revocation set are rebuilt from these whenever one changes.
    pub sources: Mutex<Sources>,
    /// Held while a state derived from `sources` is computed and put in force, so that the
    /// file watcher and the control-plane client, racing, never install a stale one last.
    pub installing: Mutex<()>,
    pub metrics: Metrics,
    pub conns: Arc<Conns>,
    pub draining: AtomicBool,
    /// Wakes connections that can end gracefully (HTTP) when draining starts.
    pub drain_started: tokio::sync::Notify,
    /// Pooled clients towards the local workload (L7 ports).
    pub workload: crate::workload::Workload,
    /// Pooled HTTP/2 connections towards peer sidecars (outbound L7).
    pub pool: crate::pool::Pool,
    /// The runtimes that serve connections, one per core.
    pub workers: Arc<crate::workers::Workers>,
    /// What is open, against `spec.limits`.
    pub admission: Arc<crate::admission::Admission>,
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

    pub fn len(&self) -> usize {
        self.sockets.len() + self.hosts.len()
    }

    /// The ID expected at `dest`: exact address first, then host.
    fn lookup(&self, dest: SocketAddr) -> Option<&SpiffeId> {
        self.sockets
            .get(&dest)
            .or_else(|| self.hosts.get(&dest.ip()))
    }
}

pub struct Sources {
    /// The bundles of the bundle directory (the last good set).
    pub file_bundles: Arc<sigil_filters::TrustBundles>,
    pub file_policies: crate::resources::FilePolicies,
    pub file_revocations: Vec<Revocation>,
    /// The snapshot from the control plane in force (received, or persisted).
    pub pushed: Option<Arc<crate::control::Pushed>>,
}

impl Proxy {
    pub fn new(
        cfg: ProxyConfig,
        tls: Current,
        metrics: Metrics,
        sources: Sources,
        workers: crate::workers::Workers,
        admission: Arc<crate::admission::Admission>,
    ) -> Self {
        let local = tls.get().identity.id().clone();
        let p = Self {
            cfg,
            tls,
            policy: RwLock::new(Arc::new(PolicyIndex::compile([], &local))),
            registry: RwLock::default(),
            sources: Mutex::new(sources),
            installing: Mutex::new(()),
            metrics,
            conns: Arc::new(Conns::default()),
            draining: AtomicBool::new(false),
            drain_started: tokio::sync::Notify::new(),
            workload: crate::workload::Workload::new(
                workers.len(),
                admission.max_connections() as usize,
            ),
            pool: crate::pool::Pool::default(),
            workers: Arc::new(workers),
            admission,
        };
        p.refresh_policy();
        p.refresh_registry();
        p
    }

    /// Recompiles the policy index for our own ID from every source.
    pub fn refresh_policy(&self) {
        let _installing = self.installing.lock().expect("install lock");
        let local = self.tls.get().identity.id().clone();
        let index = {
            let mut sources = self.sources.lock().expect("sources lock");
            let Sources {
                file_policies,
                pushed,
                ..
            } = &mut *sources;
            let files = match file_policies.targeting(&local) {
                Ok(files) => files,
                Err(e) => {
                    error!("cannot parse the policy files again for {local}, keeping the current policies: {e}");
                    return;
                }
            };
            if self.cfg.spec.control_plane.is_some() && pushed.is_none() {
                PolicyIndex::awaiting_snapshot()
            } else {
                let pushed = pushed.iter().flat_map(|p| p.policies.iter());
                crate::resources::compile_policies(&self.cfg, files.iter().chain(pushed), &local)
            }
        };
        self.set_policy(index);
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
        self.registry.read().expect("registry lock").len()
    }

    /// The trust bundles in force: the bundle directory's, each domain the control plane
    /// pushed a TrustBundle for replaced by it.
    pub fn bundles(&self) -> Arc<sigil_filters::TrustBundles> {
        let sources = self.sources.lock().expect("sources lock");
        match sources.pushed.as_ref().and_then(|p| p.bundles.as_ref()) {
            Some(pushed) => Arc::new(sources.file_bundles.overlay(pushed)),
            None => sources.file_bundles.clone(),
        }
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

    /// Starts draining: readiness fails, HTTP connections finish their requests and close.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_started.notify_waiters();
    }

    /// Resolves once draining has started.
    pub async fn drained(&self) {
        loop {
            let notified = self.drain_started.notified();
            if self.draining.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }

    pub fn policy(&self) -> Arc<PolicyIndex> {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn set_policy(&self, index: PolicyIndex) {
        *self.policy.write().expect("policy lock") = Arc::new(index);
    }

    /// The SPIFFE ID expected at a mesh destination; exact address first, then host.
    pub fn expected_id(&self, dest: SocketAddr) -> Option<SpiffeId> {
        self.registry
            .read()
            .expect("registry lock")
            .lookup(dest)
            .cloned()
    }

    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining");
        }
        if !self.tls.get().is_ready(UnixTime::now()) {
            return Err("no valid SVID or trust bundle");
        }
        if self.awaiting_snapshot() {
            return Err("no snapshot from the control plane in force yet");
        }
        Ok(())
    }

    pub fn handshake_failed(&self, direction: Direction, local: &Arc<str>, reason: &'static str) {
        self.metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: direction.label(),
                local_id: local.clone(),
                reason,
            })
            .inc();
        self.refused(direction, local, UNAUTHENTICATED_PEER.into(), reason);
    }

    pub fn refused(
        &self,
        direction: Direction,
        local: &Arc<str>,
        peer_id: Arc<str>,
        reason: &'static str,
    ) {
        self.metrics
            .refused
            .get_or_create(&ReasonLabels {
                direction: direction.label(),
                local_id: local.clone(),
                peer_id,
                reason,
            })
            .inc();
    }

    /// Counts an admitted connection and registers it (so a bundle or policy change can
    /// close it). The guard unregisters on drop; call `closed` with the reason at the end.
    pub fn admit(&self, a: Admitted) -> (ConnLabels, Counters, ConnGuard) {
        let labels = ConnLabels {
            direction: a.direction.label(),
            local_id: a.local,
            peer_id: a.peer_label,
        };
        let counters = self.opened(&labels);
        let guard = self
            .conns
            .register(a.direction, a.kind, a.peer, a.chain, a.port);
        (labels, counters, guard)
    }

    /// An admitted L4 connection: admit, relay until it ends, count the close.
    pub async fn carry<P, L>(&self, a: Admitted, peer_io: P, local_io: L) -> &'static str
    where
        P: AsyncRead + AsyncWrite + Unpin,
        L: AsyncRead + AsyncWrite + Unpin,
    {
        let (labels, counters, mut guard) = self.admit(a);
        let idle = self.cfg.spec.timeouts.idle;
        let reason = relay(peer_io, local_io, &counters, &mut guard.close_rx, idle).await;
        self.closed(&labels, reason);
        reason
    }

    /// Counts the connection as opened and returns its cached counter handles.
    pub fn opened(&self, labels: &ConnLabels) -> Counters {
        self.metrics.opened.get_or_create(labels).inc();
        self.metrics.active.get_or_create(labels).inc();
        Counters {
            from_peer: self.metrics.bytes_received.get_or_create(labels).clone(),
            to_peer: self.metrics.bytes_sent.get_or_create(labels).clone(),
        }
    }

    pub fn closed(&self, labels: &ConnLabels, reason: &'static str) {
        self.metrics.active.get_or_create(labels).dec();
        self.metrics
            .closed
            .get_or_create(&ReasonLabels {
                direction: labels.direction,
                local_id: labels.local_id.clone(),
                peer_id: labels.peer_id.clone(),
                reason,
            })
            .inc();
    }
}

/// A connection that passed the handshake (and, for TCP ports, authorization).
pub struct Admitted {
    pub direction: Direction,
    pub kind: Kind,
    pub local: Arc<str>,
    pub peer_label: Arc<str>,
    pub peer: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    /// The workload port (inbound) or destination port (outbound).
    pub port: u16,
}

/// Unix seconds by the sidecar's own clock (policy expiry).
pub fn now_unix() -> i64 {
    UnixTime::now().as_secs() as i64
}

/// The peer's certificate chain as presented (leaf first), owned for the registry.
pub fn peer_chain(conn: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    conn.peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}
