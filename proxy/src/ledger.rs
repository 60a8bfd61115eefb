//! The books every connection path keeps: admitted connections are counted and registered
//! (so that a bundle change, a revocation or a policy change can close them), closes and
//! refusals are counted by reason. The dial, the pool and both directions share one.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use sigil_config::SpiffeId;
use sigil_filters::svid::serial_hex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncWrite};

use sigil_api::audit::{Kind as AuditKind, Record, RouteCount};

use crate::audit::Auditor;
use crate::conns::{ConnGuard, Conns, Direction, Kind};
use crate::metrics::{ConnLabels, HandshakeLabels, Metrics, ReasonLabels, UNAUTHENTICATED_PEER};
use crate::reasons::{CloseReason, Refusal};
use crate::relay::{relay, Counters};

pub struct Ledger {
    pub metrics: Metrics,
    pub conns: Arc<Conns>,
    /// The control-plane snapshot versions the policies and the trust bundles in force came
    /// with (0: files only, or none yet), for audit records.
    pub versions: Versions,
    /// The audit stream (`audit`), if the config asks for it.
    pub audit: Option<Arc<Auditor>>,
}

#[derive(Default)]
pub struct Versions {
    pub policies: AtomicU64,
    pub bundles: AtomicU64,
}

/// A connection that passed the handshake (and, for TCP ports, authorization).
pub struct Admitted {
    pub direction: Direction,
    pub kind: Kind,
    pub local: Arc<str>,
    pub peer_label: Arc<str>,
    pub peer: SpiffeId,
    pub session: Session,
    /// The workload port (inbound) or destination port (outbound).
    pub port: u16,
    /// What it carries, for its audit records: tcp, http1, http2 (or either), tunnel.
    pub protocol: &'static str,
    /// The rule that admitted it (`Policy/route`, as in metrics), where one decided for the
    /// whole connection (inbound TCP); HTTP is decided per request.
    pub rule: Option<Arc<str>>,
    /// The dry-run rule that would have refused it, where one would have.
    pub would_deny: Option<Arc<str>>,
    /// The snapshot version of the policies that decided (inbound); None: no policy decided,
    /// the version in force is recorded.
    pub policy_version: Option<u64>,
}

/// The HTTP requests one connection counted by route and method instead of recording each,
/// for its close record.
#[derive(Default)]
pub struct RequestTallies {
    pub allowed: Vec<RouteCount>,
    /// Denied past the requests recorded one by one.
    pub denied: Vec<RouteCount>,
    /// Allowed, but a dry-run rule would have denied them, past those recorded one by one.
    pub would_deny: Vec<RouteCount>,
}

/// What an mTLS handshake established, for the registry and the connection's audit records.
pub struct Session {
    /// The peer's certificate chain as presented (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    pub local_addr: Option<SocketAddr>,
    pub peer_addr: Option<SocketAddr>,
    /// As rustls names them: TLSv1_3, TLS13_AES_128_GCM_SHA256.
    pub tls_version: &'static str,
    pub cipher: &'static str,
    /// The snapshot version of the trust bundles the peer was verified with.
    pub bundle_version: u64,
}

impl Session {
    pub fn of(tcp: &tokio::net::TcpStream, tls: &rustls::CommonState, bundle_version: u64) -> Self {
        Self {
            bundle_version,
            chain: tls
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default(),
            local_addr: tcp.local_addr().ok(),
            peer_addr: tcp.peer_addr().ok(),
            tls_version: tls
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or(""),
            cipher: tls
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or(""),
        }
    }
}

impl Ledger {
    pub fn new(metrics: Metrics, audit: Option<Arc<Auditor>>) -> Self {
        Self {
            metrics,
            conns: Arc::new(Conns::default()),
            versions: Versions::default(),
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
        self.refused_by(direction, local, peer_id, why, None);
    }

    /// `refused`, by a rule whose record names it and the versions that decided.
    pub fn refused_by(
        &self,
        direction: Direction,
        local: &Arc<str>,
        peer_id: Arc<str>,
        why: Refusal,
        by: Option<RefusedBy<'_>>,
    ) {
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
                policy: policy_of(by.as_ref().map(|b| b.rule)).0.into(),
                rule: policy_of(by.as_ref().map(|b| b.rule)).1.into(),
                mode: if by.is_some() { "enforce" } else { "" }.into(),
                policy_version: by.as_ref().map_or_else(
                    || self.versions.policies.load(Ordering::Relaxed),
                    |b| b.policy_version,
                ),
                bundle_version: by.as_ref().map_or_else(
                    || self.versions.bundles.load(Ordering::Relaxed),
                    |b| b.bundle_version,
                ),
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
        let mut counters = self.opened(&labels);
        let s = &a.session;
        let (policy, rule) = policy_of(a.rule.as_deref());
        let open = self.audit.as_ref().map(|_| Record {
            kind: AuditKind::ConnectionOpen as i32,
            direction: a.direction.label().into(),
            local_addr: s.local_addr.map(|x| x.to_string()).unwrap_or_default(),
            peer_addr: s.peer_addr.map(|x| x.to_string()).unwrap_or_default(),
            local_id: labels.local_id.to_string(),
            peer_id: a.peer.to_string(),
            peer_serial: s
                .chain
                .first()
                .and_then(|leaf| serial_hex(leaf))
                .unwrap_or_default(),
            tls_version: s.tls_version.into(),
            cipher: s.cipher.into(),
            protocol: a.protocol.into(),
            decision: "allow".into(),
            policy: policy.into(),
            rule: rule.into(),
            mode: if a.rule.is_some() { "enforce" } else { "" }.into(),
            policy_version: a
                .policy_version
                .unwrap_or_else(|| self.versions.policies.load(Ordering::Relaxed)),
            bundle_version: a.session.bundle_version,
            port: a.port.into(),
            ..Record::default()
        });
        let guard = self
            .conns
            .register(a.direction, a.kind, a.peer, a.session.chain, a.port);
        counters.conn = guard.bytes.clone();
        if let (Some(audit), Some(open)) = (&self.audit, open) {
            let would_deny = a.would_deny.as_deref().map(|label| {
                let (policy, rule) = policy_of(Some(label));
                Record {
                    kind: AuditKind::WouldDeny as i32,
                    decision: "deny".into(),
                    policy: policy.into(),
                    rule: rule.into(),
                    mode: "dry-run".into(),
                    conn: guard.id(),
                    ..open.clone()
                }
            });
            audit.record(Record {
                conn: guard.id(),
                ..open
            });
            if let Some(r) = would_deny {
                audit.record(r);
            }
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
            conn: Arc::default(),
        }
    }

    /// Counts the close; `guard` (the connection's registration, if it has one) gives the
    /// audit record its connection number, exact peer and duration.
    pub fn closed(&self, labels: &ConnLabels, guard: Option<&ConnGuard>, reason: CloseReason) {
        self.closed_with(labels, guard, reason, RequestTallies::default())
    }

    /// `closed`, with the HTTP requests counted on the connection by route and method, for
    /// its audit record.
    pub fn closed_with(
        &self,
        labels: &ConnLabels,
        guard: Option<&ConnGuard>,
        reason: CloseReason,
        tallies: RequestTallies,
    ) {
        if let Some(audit) = &self.audit {
            let peer = guard.and_then(ConnGuard::peer);
            audit.record(Record {
                direction: labels.direction.into(),
                local_id: labels.local_id.to_string(),
                peer_id: peer.map_or_else(|| labels.peer_id.to_string(), |p| p.to_string()),
                allowed: tallies.allowed,
                denied: tallies.denied,
                would_deny: tallies.would_deny,
                ..close_record(guard, reason)
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

/// A close record's own fields: the connection's number, its duration, bytes and reason.
fn close_record(guard: Option<&ConnGuard>, reason: CloseReason) -> Record {
    Record {
        kind: AuditKind::ConnectionClose as i32,
        close_reason: reason.label().into(),
        conn: guard.map_or(0, ConnGuard::id),
        duration_ms: guard.map_or(0, |g| g.opened_at.elapsed().as_millis() as u64),
        bytes_in: guard.map_or(0, |g| g.bytes.from_peer.load(Ordering::Relaxed)),
        bytes_out: guard.map_or(0, |g| g.bytes.to_peer.load(Ordering::Relaxed)),
        ..Record::default()
    }
}

impl Ledger {
    /// An inbound tunnel (a WebSocket, say) upgraded on connection `on_conn` by a request
    /// `route` allowed: its open record. Its connection was counted in the metrics, and its
    /// close record written at the upgrade; the tunnel's own bytes and end are its own.
    pub fn tunnel_opened(&self, t: &Tunnel<'_>, guard: &ConnGuard, on_conn: u64) {
        let Some(audit) = &self.audit else {
            return;
        };
        let (policy, rule) = policy_of(Some(t.route));
        audit.record(Record {
            kind: AuditKind::ConnectionOpen as i32,
            direction: Direction::Inbound.label().into(),
            local_id: t.local.to_string(),
            peer_id: t.peer.to_string(),
            peer_serial: t
                .chain
                .first()
                .and_then(|leaf| serial_hex(leaf))
                .unwrap_or_default(),
            protocol: "tunnel".into(),
            decision: "allow".into(),
            route: t.route.into(),
            policy: policy.into(),
            rule: rule.into(),
            mode: "enforce".into(),
            policy_version: t.policy_version,
            bundle_version: t.bundle_version,
            port: t.port.into(),
            conn: guard.id(),
            detail: format!("upgraded on connection {on_conn}"),
            ..Record::default()
        });
    }

    /// The tunnel's close record: what it carried, how long, why it ended.
    pub fn tunnel_closed(&self, t: &Tunnel<'_>, guard: &ConnGuard, reason: CloseReason) {
        if let Some(audit) = &self.audit {
            audit.record(Record {
                direction: Direction::Inbound.label().into(),
                local_id: t.local.to_string(),
                peer_id: t.peer.to_string(),
                protocol: "tunnel".into(),
                ..close_record(Some(guard), reason)
            });
        }
    }
}

/// The rule that refused a connection (its label), and the snapshot versions of the
/// policies that decided and of the bundles the peer was verified with.
pub struct RefusedBy<'a> {
    pub rule: &'a str,
    pub policy_version: u64,
    pub bundle_version: u64,
}

/// An inbound tunnel, for its audit records.
pub struct Tunnel<'a> {
    pub local: &'a str,
    pub peer: &'a SpiffeId,
    pub chain: &'a [CertificateDer<'static>],
    pub port: u16,
    /// The route that allowed the upgrade request, and the snapshot version of its policies.
    pub route: &'a str,
    pub policy_version: u64,
    /// The snapshot version of the bundles its connection's peer was verified with.
    pub bundle_version: u64,
}

/// A rule label (`Policy/route`, or a reason no route decided, such as `default_deny`) as
/// (policy, rule).
pub fn policy_of(label: Option<&str>) -> (&str, &str) {
    match label {
        Some(l) => l.split_once('/').unwrap_or(("", l)),
        None => ("", ""),
    }
}
