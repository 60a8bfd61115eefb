//! Metrics of `sigil-control` (OpenMetrics, `GET /metrics` on the operator port): connected
//! sidecars, the store version, snapshots sent, acknowledged and rejected, push latency,
//! revocations in force, and SVIDs issued and refused.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SidecarLabels {
    pub spiffe_id: String,
}

/// `result`: `first` (a join token), `renewal`, or `refused` with its `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuanceLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub issuance: Family<IssuanceLabels, Counter>,
    pub connected: Gauge,
    pub version: Gauge,
    pub revocations: Gauge,
    pub sent: Counter,
    pub acknowledged: Counter,
    pub rejected: Family<SidecarLabels, Counter>,
    /// From the store change (or, for a stream's first snapshot, from sending it) to the
    /// sidecar's acknowledgement.
    pub push_latency: Histogram,
    /// Issuance records that could not wait for the store (`records`).
    pub records_dropped: Counter,
    /// The control plane's own audit records that could not wait for the audit store.
    pub own_audit_dropped: Counter,
    /// Audit records ingested, by result (stored, duplicate).
    pub audit_records: Family<AuditLabels, Counter>,
    /// Breaks found in sidecars' audit chains on ingest, by kind.
    pub audit_breaks: Family<AuditLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sigil_control");
        let m = Self {
            connected: Gauge::default(),
            version: Gauge::default(),
            revocations: Gauge::default(),
            sent: Counter::default(),
            acknowledged: Counter::default(),
            rejected: Family::default(),
            // 0.5 ms .. ~8 s
            push_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            issuance: Family::default(),
            records_dropped: Counter::default(),
            own_audit_dropped: Counter::default(),
            audit_records: Family::default(),
            audit_breaks: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "svid_issuance",
            "SVIDs issued (result first, renewal or workload_api) and refused (result refused, by reason)",
            m.issuance.clone(),
        );
        registry.register(
            "sidecars_connected",
            "Sidecar streams open on this replica",
            m.connected.clone(),
        );
        registry.register(
            "snapshot_version",
            "Store version of the snapshots being served",
            m.version.clone(),
        );
        registry.register("revocations", "Revocations in force", m.revocations.clone());
        registry.register(
            "snapshots_sent",
            "Snapshots sent to sidecars",
            m.sent.clone(),
        );
        registry.register(
            "snapshots_acknowledged",
            "Snapshots sidecars accepted",
            m.acknowledged.clone(),
        );
        registry.register(
            "snapshots_rejected",
            "Snapshots sidecars rejected (NACK), by sidecar identity",
            m.rejected.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "From a store change to a sidecar's acknowledgement of it",
            m.push_latency.clone(),
        );
        registry.register(
            "issuance_records_dropped",
            "Issuance records not kept: more were waiting for the store than it holds in memory",
            m.records_dropped.clone(),
        );
        registry.register(
            "audit_own_records_dropped",
            "The control plane's own audit records not kept: more were waiting for the audit store than it holds in memory",
            m.own_audit_dropped.clone(),
        );
        registry.register(
            "audit_records",
            "Sidecars' audit records ingested (result stored or duplicate)",
            m.audit_records.clone(),
        );
        registry.register(
            "audit_chain_breaks",
            "Breaks found in sidecars' audit chains on ingest, by kind (result)",
            m.audit_breaks.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
