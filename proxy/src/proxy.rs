//! The state every connection task shares, and the bookkeeping they all do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_config::proxy_config::Destination;
use sigil_config::{Policy, ProxyConfig, SpiffeId};
use sigil_filters::PolicyIndex;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conns::{ConnGuard, Conns, Direction, Kind};
use crate::identity::Current;
use crate::metrics::{ConnLabels, HandshakeLabels, Metrics, ReasonLabels, UNAUTHENTICATED_PEER};
use crate::relay::{relay, Counters};

pub struct Proxy {
    pub cfg: ProxyConfig,
    pub tls: Current,
    policy: RwLock<Arc<PolicyIndex>>,
    registry: HashMap<SocketAddr, SpiffeId>,
    registry_hosts: HashMap<IpAddr, SpiffeId>,
    pub metrics: Metrics,
    pub conns: Arc<Conns>,
    pub draining: AtomicBool,
    /// Wakes connections that can end gracefully (HTTP) when draining starts.
    pub drain_started: tokio::sync::Notify,
    /// Pooled clients towards the local workload (L7 ports).
    pub upstreams: crate::l7::Upstreams,
    /// Pooled HTTP/2 connections towards peer sidecars (outbound L7).
    pub pool: crate::pool::Pool,
}

impl Proxy {
    pub fn new(cfg: ProxyConfig, tls: Current, metrics: Metrics, policies: &[Policy]) -> Self {
        let local = tls.get().identity.id().clone();
        let policy = RwLock::new(Arc::new(crate::resources::compile_policies(
            &cfg, policies, &local,
        )));
        let mut registry = HashMap::new();
        let mut registry_hosts = HashMap::new();
        for e in &cfg.spec.outbound.registry {
            match e.value.address {
                Destination::Socket(a) => registry.insert(a, e.value.spiffe_id.clone()),
                Destination::Host(ip) => registry_hosts.insert(ip, e.value.spiffe_id.clone()),
            };
        }
        Self {
            cfg,
            tls,
            policy,
            registry,
            registry_hosts,
            metrics,
            conns: Arc::new(Conns::default()),
            draining: AtomicBool::new(false),
            drain_started: tokio::sync::Notify::new(),
            upstreams: crate::l7::Upstreams::new(),
            pool: crate::pool::Pool::default(),
        }
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
    pub fn expected_id(&self, dest: SocketAddr) -> Option<&SpiffeId> {
        self.registry
            .get(&dest)
            .or_else(|| self.registry_hosts.get(&dest.ip()))
    }

    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining");
        }
        if !self.tls.get().is_ready(UnixTime::now()) {
            return Err("no valid SVID or trust bundle");
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
        let reason = relay(peer_io, local_io, &counters, &mut guard.close_rx).await;
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
