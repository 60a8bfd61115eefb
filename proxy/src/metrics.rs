//! Prometheus/OpenMetrics metrics, labelled by SPIFFE IDs. Label sets are built once per
//! connection and the resulting handles cached in the connection task.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The peer_id value used once the cap on distinct peers is reached.
pub const OVERFLOW_PEER: &str = "overflow";
/// peer_id for connections refused before the peer proved an identity.
pub const UNAUTHENTICATED_PEER: &str = "unauthenticated";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub local_id: Arc<str>,
    pub peer_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub local_id: Arc<str>,
    pub peer_id: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub local_id: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalLabels {
    pub local_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub direction: &'static str,
    pub local_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub local_id: Arc<str>,
    pub peer_id: Arc<str>,
    /// Inbound: `policy/rule` that decided, or `no_policy` / `default_deny` /
    /// `invalid_request`. Outbound: `remote` (the destination's sidecar decides).
    pub route: Arc<str>,
    /// Inbound: allow, deny, invalid. Outbound: forward (answered by the destination,
    /// its 403s included), invalid, error (no answer: peer unreachable or failed).
    pub decision: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub local_id: Arc<str>,
    pub rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// `older_version` (behind the one in force, same epoch), `invalid` (does not parse or
    /// does not fit this sidecar), `persisted_unusable` (the copy on disk at start).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub resource: &'static str,
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub active: Family<ConnLabels, Gauge>,
    pub closed: Family<ReasonLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub svid_expiry: Family<LocalLabels, Gauge>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    pub would_deny: Family<RuleLabels, Counter>,
    pub snapshot_rejections: Family<RejectionLabels, Counter>,
    /// The audit stream: the last record spooled, the last acknowledged, records lost.
    pub audit_spooled: Gauge,
    pub audit_acknowledged: Gauge,
    pub audit_lost: Counter,
    peers: PeerLabels,
}

fn duration_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Metrics {
    pub fn new(peer_id_cap: usize) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            opened: Family::default(),
            active: Family::default(),
            closed: Family::default(),
            refused: Family::default(),
            bytes_received: Family::default(),
            bytes_sent: Family::default(),
            handshake_failures: Family::default(),
            svid_expiry: Family::default(),
            reloads: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            would_deny: Family::default(),
            snapshot_rejections: Family::default(),
            audit_spooled: Gauge::default(),
            audit_acknowledged: Gauge::default(),
            audit_lost: Counter::default(),
            peers: PeerLabels::new(peer_id_cap),
            registry: Registry::default(),
        };
        registry.register(
            "sigil_audit_spooled_seq",
            "Sequence number of the last audit record written to the spool",
            m.audit_spooled.clone(),
        );
        registry.register(
            "sigil_audit_acknowledged_seq",
            "Sequence number up to which the control plane holds the audit records",
            m.audit_acknowledged.clone(),
        );
        registry.register(
            "sigil_audit_records_lost",
            "Audit records dropped from a full spool (fail-open) or not spooled",
            m.audit_lost.clone(),
        );
        registry.register(
            "sigil_connections_opened",
            "Connections admitted and forwarded",
            m.opened.clone(),
        );
        registry.register(
            "sigil_connections_active",
            "Connections open now",
            m.active.clone(),
        );
        registry.register(
            "sigil_connections_closed",
            "Connections ended, by close reason",
            m.closed.clone(),
        );
        registry.register(
            "sigil_connections_refused",
            "Connections refused (failed handshake, not allowed, unknown destination, upstream down)",
            m.refused.clone(),
        );
        registry.register(
            "sigil_bytes_received",
            "Bytes received from the peer side",
            m.bytes_received.clone(),
        );
        registry.register(
            "sigil_bytes_sent",
            "Bytes sent to the peer side",
            m.bytes_sent.clone(),
        );
        registry.register(
            "sigil_handshake_failures",
            "mTLS handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "sigil_svid_expiry_timestamp_seconds",
            "notAfter of the SVID in use, Unix seconds",
            m.svid_expiry.clone(),
        );
        registry.register(
            "sigil_reloads",
            "Reloads of SVID, trust bundle and policy files, by result",
            m.reloads.clone(),
        );
        registry.register(
            "sigil_requests",
            "HTTP requests by direction, peer, deciding route, decision and status class",
            m.requests.clone(),
        );
        registry.register(
            "sigil_request_duration_seconds",
            "Time from request received to response headers sent, by direction",
            m.request_duration.clone(),
        );
        registry.register(
            "sigil_policy_would_deny",
            "Requests or connections a dry-run rule would deny (allowed now)",
            m.would_deny.clone(),
        );
        registry.register(
            "sigil_snapshot_rejections",
            "Control-plane snapshots refused, by reason (the one in force stays)",
            m.snapshot_rejections.clone(),
        );
        Self { registry, ..m }
    }

    pub fn snapshot_rejected(&self, reason: &'static str) {
        self.snapshot_rejections
            .get_or_create(&RejectionLabels { reason })
            .inc();
    }

    /// The label value for a peer: its ID, or `overflow` past the cap.
    pub fn peer_label(&self, id: &str) -> Arc<str> {
        self.peers.label(id)
    }

    /// An SVID asked of the control plane: `sigil_reloads_total{resource="svid_issuance"}`,
    /// by result. (The SVID put in force counts as `resource="svid"` too.)
    pub fn renewed(&self, ok: bool) {
        self.reload("svid_issuance", ok);
    }

    pub fn reload(&self, resource: &'static str, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads
            .get_or_create(&ReloadLabels { resource, result })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The request metrics of one HTTP connection, whose direction, local and peer IDs are
/// fixed: the duration histogram, and the counter of the last (route, decision, status
/// class) seen, which nearly every request of a connection repeats. Saves hashing the label
/// set (two SPIFFE IDs) into the family on every request.
pub struct RequestMetrics {
    direction: &'static str,
    local_id: Arc<str>,
    peer_id: Arc<str>,
    duration: Histogram,
    last: Mutex<Option<LastRequest>>,
}

struct LastRequest {
    route: Arc<str>,
    decision: &'static str,
    status_class: &'static str,
    counter: Counter,
}

impl RequestMetrics {
    pub fn new(
        m: &Metrics,
        direction: &'static str,
        local_id: Arc<str>,
        peer_id: Arc<str>,
    ) -> Self {
        let duration = m
            .request_duration
            .get_or_create(&DurationLabels {
                direction,
                local_id: local_id.clone(),
            })
            .clone();
        Self {
            direction,
            local_id,
            peer_id,
            duration,
            last: Mutex::new(None),
        }
    }

    pub fn record(
        &self,
        m: &Metrics,
        route: &Arc<str>,
        decision: &'static str,
        status_class: &'static str,
        seconds: f64,
    ) {
        self.duration.observe(seconds);
        let mut last = self.last.lock().expect("request metrics lock");
        if let Some(l) = last.as_ref() {
            // Matched rules' labels are shared Arcs; `no_policy` and the like are built anew.
            if (Arc::ptr_eq(&l.route, route) || l.route == *route)
                && l.decision == decision
                && l.status_class == status_class
            {
                l.counter.inc();
                return;
            }
        }
        let counter = m
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                local_id: self.local_id.clone(),
                peer_id: self.peer_id.clone(),
                route: route.clone(),
                decision,
                status_class,
            })
            .clone();
        counter.inc();
        *last = Some(LastRequest {
            route: route.clone(),
            decision,
            status_class,
            counter,
        });
    }
}

/// Bounds the number of distinct peer_id label values (each is a set of series).
struct PeerLabels {
    cap: usize,
    seen: Mutex<HashSet<Arc<str>>>,
    overflow: Arc<str>,
}

impl PeerLabels {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            seen: Mutex::new(HashSet::new()),
            overflow: OVERFLOW_PEER.into(),
        }
    }

    fn label(&self, id: &str) -> Arc<str> {
        let mut seen = self.seen.lock().expect("peer label lock");
        if let Some(l) = seen.get(id) {
            return l.clone();
        }
        if seen.len() >= self.cap {
            return self.overflow.clone();
        }
        let l: Arc<str> = id.into();
        seen.insert(l.clone());
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_past_the_cap_share_one_overflow_value() {
        let m = Metrics::new(2);
        let label = |id: &str| {
            let l = m.peer_label(id);
            m.opened
                .get_or_create(&ConnLabels {
                    direction: "inbound",
                    local_id: "spiffe://td/me".into(),
                    peer_id: l.clone(),
                })
                .inc();
            l
        };
        assert_eq!(&*label("spiffe://td/a"), "spiffe://td/a");
        assert_eq!(&*label("spiffe://td/b"), "spiffe://td/b");
        assert_eq!(&*label("spiffe://td/c"), OVERFLOW_PEER);
        assert_eq!(&*label("spiffe://td/d"), OVERFLOW_PEER);
        // Peers seen before the cap keep their own series.
        assert_eq!(&*label("spiffe://td/a"), "spiffe://td/a");
        let page = m.encode();
        assert!(page.contains("peer_id=\"spiffe://td/a\"} 2"), "{page}");
        assert!(page.contains("peer_id=\"overflow\"} 2"), "{page}");
        assert!(!page.contains("spiffe://td/c"), "{page}");
    }
}
