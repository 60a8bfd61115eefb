//! The books every connection path keeps: admitted connections are counted and registered
//! (so that a bundle change, a revocation or a policy change can close them), closes and
//! refusals are counted by reason. The dial, the pool and both directions share one.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use sigil_config::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};

use sigil_api::audit::{Kind as AuditKind, Record};

use crate::audit::Auditor;
use crate::conns::{ConnGuard, Conns, Direction, Kind};
use crate::metrics::{ConnLabels, HandshakeLabels, Metrics, ReasonLabels, UNAUTHENTICATED_PEER};
use crate::reasons::{CloseReason, Refusal};
use crate::relay::{relay, Counters};

pub struct Ledger {
    pub metrics: Metrics,
    pub conns: Arc<Conns>,
    /// The audit stream (`audit`), if the config asks for it.
    pub audit: Option<Arc<Auditor>>,
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

impl Ledger {
    pub fn new(metrics: Metrics, audit: Option<Arc<Auditor>>) -> Self {
        Self {
            metrics,
            conns: Arc::new(Conns::default()),
            audit,
        }
    }

    /// A handshake that failed: counted as such and as a refusal of an unauthenticated peer.
    pub fn handshake_failed(&self, direction: Direction, local: &Arc<str>, reason: &'static str) {
        self.metrics
            .handshake_failures
            .get_or_create(&HandshakeLabels {
                direction: direction.label(),
                local_id: local.clone(),
                reason,
            })
            .inc();
        self.refused(
            direction,
            local,
            UNAUTHENTICATED_PEER.into(),
            Refusal::Handshake(reason),
        );
    }

    pub fn refused(&self, direction: Direction, local: &Arc<str>, peer_id: Arc<str>, why: Refusal) {
        // Refusals of peers that proved no identity (failed handshakes, limits) are counted,
        // not recorded one by one: a flood must not be able to fill the spool.
        if let Some(audit) = self
            .audit
            .as_ref()
            .filter(|_| &*peer_id != UNAUTHENTICATED_PEER)
        {
            audit.record(Record {
                kind: AuditKind::ConnectionRefused as i32,
                direction: direction.label().into(),
                local_id: local.to_string(),
                peer_id: peer_id.to_string(),
                decision: "deny".into(),
                detail: why.label().into(),
                ..Record::default()
            });
        }
        self.metrics
            .refused
            .get_or_create(&ReasonLabels {
                direction: direction.label(),
                local_id: local.clone(),
                peer_id,
                reason: why.label(),
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
        let open = self.audit.as_ref().map(|_| Record {
            kind: AuditKind::ConnectionOpen as i32,
            direction: a.direction.label().into(),
            local_id: labels.local_id.to_string(),
            peer_id: a.peer.to_string(),
            decision: "allow".into(),
            port: a.port.into(),
            ..Record::default()
        });
        let guard = self
            .conns
            .register(a.direction, a.kind, a.peer, a.chain, a.port);
        if let (Some(audit), Some(open)) = (&self.audit, open) {
            audit.record(Record {
                conn: guard.id(),
                ..open
            });
        }
        (labels, counters, guard)
    }

    /// An admitted L4 connection: admit, relay until it ends or nothing moves for `idle`,
    /// count the close.
    pub async fn carry<P, L>(
        &self,
        a: Admitted,
        peer_io: P,
        local_io: L,
        idle: std::time::Duration,
    ) -> CloseReason
    where
        P: AsyncRead + AsyncWrite + Unpin,
        L: AsyncRead + AsyncWrite + Unpin,
    {
        let (labels, counters, mut guard) = self.admit(a);
        let reason = relay(peer_io, local_io, &counters, &mut guard.close_rx, idle).await;
        self.closed(&labels, Some(&guard), reason);
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

    /// Counts the close; `guard` (the connection's registration, if it has one) gives the
    /// audit record its connection number, exact peer and duration.
    pub fn closed(&self, labels: &ConnLabels, guard: Option<&ConnGuard>, reason: CloseReason) {
        if let Some(audit) = &self.audit {
            let peer = guard.and_then(ConnGuard::peer);
            audit.record(Record {
                kind: AuditKind::ConnectionClose as i32,
                direction: labels.direction.into(),
                local_id: labels.local_id.to_string(),
                peer_id: peer.map_or_else(|| labels.peer_id.to_string(), |p| p.to_string()),
                close_reason: reason.label().into(),
                conn: guard.map_or(0, ConnGuard::id),
                duration_ms: guard.map_or(0, |g| g.opened_at.elapsed().as_millis() as u64),
                ..Record::default()
            });
        }
        self.metrics.active.get_or_create(labels).dec();
        self.metrics
            .closed
            .get_or_create(&ReasonLabels {
                direction: labels.direction,
                local_id: labels.local_id.clone(),
                peer_id: labels.peer_id.clone(),
                reason: reason.label(),
            })
            .inc();
    }
}

/// The peer's certificate chain as presented (leaf first), owned for the registry.
pub fn peer_chain(conn: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    conn.peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}
