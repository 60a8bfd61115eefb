//! The control plane's own audit records (issue 16): every SVID issued, renewed or refused,
//! every resource applied or deleted (policies, bundles, revocations, with the operator's
//! SPIFFE ID), and every break found in a sidecar's chain on ingest. They are kept in the
//! audit store beside the sidecars' records, as a chain of this control plane's own: under
//! its SPIFFE ID, a chain ID made at each start, linked and checkpointed (signed with its
//! SVID key) exactly like a sidecar's, so `sigil audit verify` checks them too and
//! `sigil audit query` finds them. They are written in batches off the path of what they
//! record (`records::Recorder`).

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use sigil_api::audit::{Batch, Checkpoint, Kind, Record, SCHEMA};
use sigil_api::Message;
use sigil_config::SpiffeId;
use sigil_filters::audit::{link, new_chain_id, sign_checkpoint, Hash, GENESIS};
use sigil_filters::LocalIdentity;
use tracing::error;

use crate::audit_store::{AuditStore, AuditStoreError};
use crate::records::{Recorder, Sink};
use crate::store::Store;
use crate::stored::{IssuanceRecord, StoreError};

pub type OwnAudit = Recorder<Record>;

/// Starts the writer of this control plane's chain into `store`, signed with `identity`;
/// `dropped` counts records lost to a full queue.
pub fn start(store: Arc<AuditStore>, identity: LocalIdentity, dropped: Counter) -> OwnAudit {
    Recorder::start(
        OwnChain {
            store,
            identity,
            chain: new_chain_id(),
            head: Mutex::new((0, GENESIS)),
        },
        dropped,
    )
}

struct OwnChain {
    store: Arc<AuditStore>,
    identity: LocalIdentity,
    chain: String,
    /// The last record written and its link.
    head: Mutex<(u64, Hash)>,
}

impl Sink<Record> for OwnChain {
    const WHAT: &'static str = "control-plane audit records";
    type Error = AuditStoreError;

    async fn write(&self, batch: &[Record]) -> Result<(), AuditStoreError> {
        // Numbered from the head afresh at each try: a batch written again gets the same
        // numbers and bytes, and the head moves only once it is stored.
        let (mut seq, mut head) = *self.head.lock().expect("head lock");
        let id = self.identity.id().clone();
        let mut records = Vec::with_capacity(batch.len());
        for r in batch {
            seq += 1;
            let bytes = Record {
                schema: SCHEMA,
                seq,
                prev: head.to_vec(),
                local_id: id.to_string(),
                ..r.clone()
            }
            .encode_to_vec();
            head = link(seq, &head, &bytes);
            records.push(bytes);
        }
        let leaf = self.identity.chain()[0].to_vec();
        let checkpoints = sign_checkpoint(&self.identity, seq, &head)
            .map(|signature| Checkpoint {
                seq,
                head: head.to_vec(),
                signature,
                signer: leaf.clone(),
            })
            .into_iter()
            .collect();
        let batch = Batch {
            records,
            checkpoints,
            chain: self.chain.clone(),
        };
        let store = self.store.clone();
        let got = tokio::task::spawn_blocking(move || store.ingest(&id, &leaf, &batch))
            .await
            .expect("the audit store does not panic")?;
        for b in &got.breaks {
            error!("the control plane's own audit chain: {b}");
        }
        *self.head.lock().expect("head lock") = (seq, head);
        Ok(())
    }
}

/// Where issuance records go: the store (`sigil issuances`, replicated with it), then, once
/// kept there, this control plane's audit chain, if it keeps one.
pub struct Issuances {
    pub store: Arc<Store>,
    pub audit: Option<Arc<OwnAudit>>,
}

impl Sink<IssuanceRecord> for Issuances {
    const WHAT: &'static str = "issuance records";
    type Error = StoreError;

    async fn write(&self, batch: &[IssuanceRecord]) -> Result<(), StoreError> {
        self.store
            .append_issuances(batch, now_nanos() / 1_000_000_000)
            .await?;
        if let Some(audit) = &self.audit {
            for r in batch {
                audit.record(issuance(r));
            }
        }
        Ok(())
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// An SVID issued, renewed or refused: the caller (`actor`), the identity (`subject`, and
/// `peer_id` so that `--identity` finds it), the serial, and the result and reason.
pub fn issuance(r: &IssuanceRecord) -> Record {
    let refused = r.result == "refused";
    Record {
        time_unix_nanos: r.at.saturating_mul(1_000_000_000),
        kind: Kind::Issuance as i32,
        peer_addr: r.addr.clone(),
        // As sidecars write serials: hex digits only.
        peer_serial: r.serial.replace(':', "").to_ascii_lowercase(),
        actor: r.caller.clone(),
        subject: if r.id.is_empty() {
            r.workload.clone()
        } else {
            r.id.clone()
        },
        decision: if refused { "deny" } else { "allow" }.into(),
        detail: if refused {
            r.message.clone()
        } else {
            format!(
                "{} for Workload/{} (node {}), valid until {}",
                r.result,
                r.workload,
                r.node,
                crate::issuer::rfc3339(r.not_after)
            )
        },
        // `--identity` finds a record by its sidecar or its peer: here, the identity issued.
        peer_id: r.id.clone(),
        ..Record::default()
    }
}

/// A resource `Kind/name` created, updated or deleted by the operator `actor`.
pub fn change(actor: &SpiffeId, what: &str, subject: &str, version: i64) -> Record {
    Record {
        time_unix_nanos: now_nanos(),
        kind: Kind::Change as i32,
        actor: actor.to_string(),
        peer_id: actor.to_string(),
        subject: subject.into(),
        decision: what.into(),
        detail: format!("{what} {subject} (store version {version})"),
        ..Record::default()
    }
}

/// A break found in the chain `chain` of `sidecar` as its records arrived (`rule`: its kind,
/// as the metric labels it).
pub fn chain_break(sidecar: &SpiffeId, chain: &str, what: &str, label: &str) -> Record {
    Record {
        time_unix_nanos: now_nanos(),
        kind: Kind::ChainBreak as i32,
        peer_id: sidecar.to_string(),
        subject: format!("{sidecar} chain={chain}"),
        rule: label.into(),
        detail: what.into(),
        ..Record::default()
    }
}
