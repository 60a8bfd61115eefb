//! Records on their way to a store, off the path of what they record: the `Issue` handler's
//! issuance records, and the control plane's own audit records (`own_audit`). The caller
//! hands each over without waiting; one writer keeps them in batches (one transaction each)
//! and retries while the store is down, holding up to `QUEUE` records in memory meanwhile. A
//! record beyond that is dropped and counted: nothing the control plane does waits for its
//! audit trail.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tracing::{error, warn};

/// Records held in memory while the store is slow or down.
const QUEUE: usize = 65_536;
/// Records written in one transaction at most.
const BATCH: usize = 1_000;

/// Where a recorder's batches go.
pub trait Sink<T>: Send + Sync + 'static {
    /// What the records are, for the logs.
    const WHAT: &'static str;
    type Error: fmt::Display + Send;
    /// Keeps the whole batch, or none of it (it is written again).
    fn write(&self, batch: &[T]) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

pub struct Recorder<T> {
    tx: mpsc::Sender<T>,
    /// Handed over and not yet written.
    pending: Arc<AtomicUsize>,
    dropped: Counter,
    what: &'static str,
}

impl<T: Send + Sync + 'static> Recorder<T> {
    /// Starts the writer into `sink`; `dropped` counts the records lost to a full queue.
    pub fn start<S: Sink<T>>(sink: S, dropped: Counter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write(sink, rx, pending.clone()));
        Self {
            tx,
            pending,
            dropped,
            what: S::WHAT,
        }
    }

    pub fn record(&self, r: T) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(r).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Waits, at most `limit`, until every record handed over is written (at shutdown); logs
    /// that those still waiting then are lost.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                error!(
                    "stopping with {} not yet in the store: they are lost",
                    self.what
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

async fn write<T, S: Sink<T>>(sink: S, mut rx: mpsc::Receiver<T>, pending: Arc<AtomicUsize>) {
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
            match sink.write(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(
                        records = batch.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "{} not kept yet: {e}",
                        S::WHAT
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
