//! The sidecar's audit stream (issue 16): a record per connection at open and close and per
//! refusal, chained and appended to the on-disk spool (`spool.rs`) before the call returns,
//! then shipped to the control plane (`Ship`), which acknowledges what it has made durable;
//! only then do records leave the spool. A checkpoint (the chain's head, signed with the SVID
//! key) goes with each batch and at least every `CHECKPOINT_EVERY` while records come.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_api::audit::{Batch, Checkpoint, Kind, Record, SCHEMA};
use sigil_api::Message;
use sigil_config::proxy_config::{AuditSpec, ControlPlaneSpec, WhenFull};
use sigil_filters::audit::{link, sign_checkpoint};
use sigil_filters::tls::{self, Carries};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::control::connect;
use crate::logs::limited;
use crate::proxy::Proxy;
use crate::spool::{Spool, SpoolError};

/// Records per batch at most.
const BATCH: usize = 1_000;
/// A checkpoint at least this often while records come.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

pub struct Auditor {
    spool: Mutex<Spool>,
    when_full: WhenFull,
    /// Set while a fail-closed spool is full: new connections are refused.
    full: AtomicBool,
    /// Wakes the shipper.
    appended: Notify,
    spooled: prometheus_client::metrics::gauge::Gauge,
    acknowledged: prometheus_client::metrics::gauge::Gauge,
    lost: prometheus_client::metrics::counter::Counter,
}

impl Auditor {
    pub fn open(
        spec: &AuditSpec,
        dir: &std::path::Path,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Self, SpoolError> {
        let when_full = match spec.when_full {
            WhenFull::FailOpen => crate::spool::WhenFull::FailOpen,
            WhenFull::FailClosed => crate::spool::WhenFull::FailClosed,
        };
        let spool = Spool::open(dir, spec.max_bytes, when_full)?;
        metrics.audit_spooled.set(spool.position().0 as i64 - 1);
        metrics.audit_acknowledged.set(spool.acked() as i64);
        Ok(Self {
            spool: Mutex::new(spool),
            when_full: spec.when_full,
            full: AtomicBool::new(false),
            appended: Notify::new(),
            spooled: metrics.audit_spooled.clone(),
            acknowledged: metrics.audit_acknowledged.clone(),
            lost: metrics.audit_lost.clone(),
        })
    }

    /// Whether new connections must be refused (fail-closed, spool full).
    pub fn refusing(&self) -> bool {
        self.full.load(Ordering::Relaxed)
    }

    /// Appends `r` (its kind and fields set by the caller) to the spool: on disk, in the
    /// chain, before this returns. A full fail-closed spool refuses it (and new connections,
    /// until the control plane acknowledges); a full fail-open one drops its oldest records,
    /// and a `Dropped` record says how many.
    pub fn record(&self, mut r: Record) {
        r.schema = SCHEMA;
        r.time_unix_nanos = now_nanos();
        let mut spool = self.spool.lock().expect("spool lock");
        let dropped = spool.take_dropped();
        if dropped > 0 {
            self.lost.inc_by(dropped);
            let note = Record {
                schema: SCHEMA,
                time_unix_nanos: r.time_unix_nanos,
                kind: Kind::Dropped as i32,
                local_id: r.local_id.clone(),
                dropped,
                detail: "the audit spool was full (fail-open): the oldest records were dropped"
                    .into(),
                ..Record::default()
            };
            let _ = append(&mut spool, note);
        }
        match append(&mut spool, r) {
            Ok(seq) => {
                self.spooled.set(seq as i64);
                // Fail-closed refuses new connections from 90 % on, so that the records of
                // the connections already open (their closes) still find room.
                if self.when_full == WhenFull::FailClosed
                    && spool.bytes() > spool.max_bytes() / 10 * 9
                    && !self.full.swap(true, Ordering::Relaxed)
                {
                    warn!("audit spool 90 % full (fail-closed): refusing new connections until the control plane acknowledges records");
                }
            }
            Err(SpoolError::Full { .. }) => {
                // Past the 10 % kept for connections already open: this one is lost, counted.
                self.full.store(true, Ordering::Relaxed);
                self.lost.inc();
                limited!(warn, "audit spool full (fail-closed): a record was lost; refusing new connections until the control plane acknowledges records");
            }
            Err(e) => {
                self.lost.inc();
                limited!(warn, "audit record not spooled: {e}");
            }
        }
        drop(spool);
        self.appended.notify_one();
    }
}

fn append(spool: &mut Spool, mut r: Record) -> Result<u64, SpoolError> {
    spool.append(|seq, prev| {
        r.seq = seq;
        r.prev = prev.to_vec();
        r.encode_to_vec()
    })
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Ships the spool to the control plane for as long as the sidecar runs: from the first record
/// not acknowledged, in batches, reconnecting with backoff.
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

async fn ship_once(
    p: &Arc<Proxy>,
    auditor: &Arc<Auditor>,
    cp: &ControlPlaneSpec,
) -> Result<(), String> {
    let tls_state = p.tls.get();
    let bootstrap = p.sources.lock().expect("sources lock").file_bundles.clone();
    let client = tls::client_config(
        &tls_state.identity,
        bootstrap,
        Default::default(),
        tls::provider(),
        cp.spiffe_id.clone(),
        Carries::Http2,
    );
    let (sender, conn) = connect(cp, &p.cfg.spec.timeouts, client)
        .await
        .map_err(|e| e.to_string())?;
    let origin = format!("https://{}", cp.address)
        .parse()
        .expect("a socket address is a URI authority");
    let result = async {
        let (tx, mut acks) = sigil_api::client::ship(sender, origin)
            .await
            .map_err(|s| format!("Ship: {}", s.message()))?;
        info!(control_plane = %cp.address, "audit stream open");
        let mut checkpointed = 0u64;
        let mut last_checkpoint = tokio::time::Instant::now();
        loop {
            let (records, chain) = {
                let spool = auditor.spool.lock().expect("spool lock");
                let records = spool
                    .read_from(spool.acked() + 1, BATCH)
                    .map_err(|e| e.to_string())?;
                (records, spool.chain().to_string())
            };
            let Some(last) = records.last() else {
                tokio::select! {
                    _ = auditor.appended.notified() => {}
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                }
                continue;
            };
            // A checkpoint over the batch's last record when the batch drains the spool, and
            // at least every CHECKPOINT_EVERY during a backlog.
            let batch_last = last.0;
            let head = link(last.0, &last.1, &last.2);
            let due = records.len() < BATCH || last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            let mut checkpoints = Vec::new();
            if due && batch_last > checkpointed {
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
                chain,
            };
            tx.send(batch)
                .await
                .map_err(|_| "the stream closed".to_string())?;
            let ack = tokio::time::timeout(Duration::from_secs(30), acks.message())
                .await
                .map_err(|_| "no acknowledgement within 30 s".to_string())?
                .map_err(|s| format!("{}: {}", s.code().description(), s.message()))?
                .ok_or("the control plane ended the stream")?;
            if !ack.error.is_empty() {
                limited!(error, "the control plane did not store every audit record sent; they stay in the spool: {}", ack.error);
            }
            // Never past what was sent: an acknowledgement covers this batch only.
            let through = ack.durable_through.min(batch_last);
            let mut spool = auditor.spool.lock().expect("spool lock");
            spool.ack(through).map_err(|e| e.to_string())?;
            auditor.acknowledged.set(spool.acked() as i64);
            if auditor.full.load(Ordering::Relaxed) && spool.bytes() <= spool.max_bytes() / 10 * 9 {
                auditor.full.store(false, Ordering::Relaxed);
                info!("audit spool has room again: accepting connections");
            }
        }
    }
    .await;
    conn.abort();
    result
}
