//! Ships the audit spool to the control plane (`sigil.audit.v1.Audit/Ship`) for as long as the
//! sidecar runs: from the first record not acknowledged, in batches, reconnecting with backoff.
//! The control plane acknowledges what it has made durable; only then do records leave the
//! spool. A checkpoint (the chain's head, signed with the SVID key) goes with each batch that
//! drains the spool, and at least every `CHECKPOINT_EVERY` during a backlog.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sigil_api::audit::{Batch, Checkpoint};
use sigil_config::proxy_config::ControlPlaneSpec;
use sigil_filters::audit::{link, sign_checkpoint};
use sigil_filters::tls::{self, Carries};
use tracing::info;

use crate::audit::Auditor;
use crate::control::{connect, StreamError};
use crate::logs::limited;
use crate::proxy::Proxy;
use crate::spool::SpoolError;

/// Records per batch at most.
const BATCH: usize = 1_000;
/// A checkpoint at least this often while records come.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// After a batch that drained the spool, records gather this long before the next is sent:
/// under a steady trickle, one batch (one commit at the control plane, one acknowledgement
/// noted here) per this time instead of one per record. A backlog ships without pause.
const LINGER: Duration = Duration::from_millis(200);
/// How long an acknowledgement may take.
const ACK_WITHIN: Duration = Duration::from_secs(30);

/// Why the audit stream ended; the shipper reconnects.
#[derive(Debug)]
pub enum ShipError {
    Connect(StreamError),
    Refused(tonic::Status),
    Closed,
    NoAck,
    Spool(SpoolError),
}

impl fmt::Display for ShipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "{e}"),
            Self::Refused(s) => write!(f, "{}: {}", s.code().description(), s.message()),
            Self::Closed => f.write_str("the control plane ended the stream"),
            Self::NoAck => write!(f, "no acknowledgement within {} s", ACK_WITHIN.as_secs()),
            Self::Spool(e) => write!(f, "reading the spool: {e}"),
        }
    }
}

pub async fn ship(p: Arc<Proxy>, auditor: Arc<Auditor>, cp: ControlPlaneSpec) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match ship_once(&p, &auditor, &cp).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(why) => {
                limited!(warn, control_plane = %cp.address, retry_in_ms = backoff.as_millis() as u64, "audit stream: {why}; records wait in the spool");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn ship_once(p: &Proxy, auditor: &Auditor, cp: &ControlPlaneSpec) -> Result<(), ShipError> {
    let client = tls::client_config(
        &p.tls.get().identity,
        p.sources.lock().expect("sources lock").file_bundles.clone(),
        Default::default(),
        tls::provider(),
        cp.spiffe_id.clone(),
        Carries::Http2,
    );
    let (sender, conn) = connect(cp, &p.cfg.spec.timeouts, client)
        .await
        .map_err(ShipError::Connect)?;
    let result = stream(p, auditor, cp, sender).await;
    conn.abort();
    result
}

async fn stream(
    p: &Proxy,
    auditor: &Auditor,
    cp: &ControlPlaneSpec,
    sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
) -> Result<(), ShipError> {
    let origin = format!("https://{}", cp.address)
        .parse()
        .expect("a socket address is a URI authority");
    let (tx, mut acks) = sigil_api::client::ship(sender, origin)
        .await
        .map_err(ShipError::Refused)?;
    info!(control_plane = %cp.address, "audit stream open");
    let chain = auditor.chain();
    let mut cursor = auditor.cursor();
    let mut checkpointed = 0u64;
    let mut last_checkpoint = tokio::time::Instant::now();
    loop {
        let records = auditor
            .read(&mut cursor, BATCH)
            .await
            .map_err(ShipError::Spool)?;
        let Some(last) = records.last() else {
            tokio::select! {
                _ = auditor.appended() => {}
                _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            }
            continue;
        };
        let batch_last = last.0;
        let drained = records.len() < BATCH;
        let due = drained || last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
        let mut checkpoints = Vec::new();
        if due && batch_last > checkpointed {
            let head = link(last.0, &last.1, &last.2);
            let identity = &p.tls.get().identity;
            if let Some(signature) = sign_checkpoint(identity, batch_last, &head) {
                checkpoints.push(Checkpoint {
                    seq: batch_last,
                    head: head.to_vec(),
                    signature,
                    signer: identity.chain()[0].to_vec(),
                });
                checkpointed = batch_last;
                last_checkpoint = tokio::time::Instant::now();
            }
        }
        let batch = Batch {
            records: records.into_iter().map(|r| r.2).collect(),
            checkpoints,
            chain: chain.clone(),
        };
        tx.send(batch).await.map_err(|_| ShipError::Closed)?;
        let ack = tokio::time::timeout(ACK_WITHIN, acks.message())
            .await
            .map_err(|_| ShipError::NoAck)?
            .map_err(ShipError::Refused)?
            .ok_or(ShipError::Closed)?;
        if !ack.error.is_empty() {
            limited!(error, "the control plane did not store every audit record sent; they stay in the spool: {}", ack.error);
        }
        // Never past what was sent: an acknowledgement covers this batch only.
        let through = ack.durable_through.min(batch_last);
        auditor
            .acknowledge(through)
            .await
            .map_err(ShipError::Spool)?;
        if through < batch_last {
            // The records after `through` were not stored: sent again from there, so that
            // a later acknowledgement never covers them.
            cursor = auditor.cursor();
        }
        if drained {
            tokio::time::sleep(LINGER).await;
        }
    }
}
