//! Issuance records on their way to the store, for the audit stream. The `Issue` handler
//! hands each decision over without waiting; one writer keeps them in batches (one
//! transaction each) and retries while the store is down, holding up to `QUEUE` records in
//! memory meanwhile. A record beyond that is dropped and counted
//! (`sigil_control_issuance_records_dropped_total`): issuance never waits for the audit trail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::{error, warn};

use crate::store::Store;
use crate::stored::IssuanceRecord;

/// Records held in memory while the store is slow or down.
const QUEUE: usize = 65_536;
/// Records written in one transaction at most.
const BATCH: usize = 1_000;

pub struct Recorder {
    tx: mpsc::Sender<IssuanceRecord>,
    /// Handed over and not yet written.
    pending: Arc<AtomicUsize>,
    dropped: Counter,
}

impl Recorder {
    /// Starts the writer into `store`; `dropped` counts the records lost to a full queue.
    pub fn start(store: Arc<Store>, dropped: Counter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write(store, rx, pending.clone()));
        Self {
            tx,
            pending,
            dropped,
        }
    }

    pub fn record(&self, r: IssuanceRecord) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(r).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Waits, at most `limit`, until every record handed over is in the store (at shutdown).
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

async fn write(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<IssuanceRecord>,
    pending: Arc<AtomicUsize>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.append_issuances(&batch, now_unix()).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(
                        records = batch.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "issuance records not kept yet: {e}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        pending.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
    }
}

/// Unix seconds.
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Logs that the records still waiting at shutdown are lost.
pub fn report_unflushed(flushed: bool) {
    if !flushed {
        error!("stopping with issuance records not yet in the store: they are lost");
    }
}
