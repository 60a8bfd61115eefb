//! The sidecar's audit records (issue 16): a record per connection at open and close and per
//! refusal, chained and appended to the on-disk spool (`spool.rs`) before the call returns.
//! `shipper.rs` sends them to the control plane; they leave the spool once it acknowledges
//! them. Connections take the spool's lock for one `write`; the shipper takes it only to plan
//! a read and to trim, and reads and waits for the disk without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sigil_api::audit::{Kind, Record, SCHEMA};
use sigil_api::Message;
use sigil_config::proxy_config::{AuditSpec, WhenFull};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::logs::limited;
use crate::spool::{self, Cursor, Spool, SpoolError, Spooled};

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
    /// and a `Dropped` record after this one says which.
    pub fn record(&self, mut r: Record) {
        r.schema = SCHEMA;
        r.time_unix_nanos = now_nanos();
        let mut spool = self.spool.lock().expect("spool lock");
        let (local_id, r_time) = (r.local_id.clone(), r.time_unix_nanos);
        // Records lost at open (a damaged segment) are said before this one.
        self.note_losses(&mut spool, &local_id, r_time);
        match append(&mut spool, r) {
            Ok(_) => {
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
        // The records this one pushed out (fail-open) are said at once, so that no loss
        // waits for a next record to be told.
        self.note_losses(&mut spool, &local_id, r_time);
        self.spooled.set(spool.position().0 as i64 - 1);
        drop(spool);
        self.appended.notify_one();
    }

    /// Appends a `Dropped` record for each range of records the spool lost (a full fail-open
    /// spool, a damaged segment), so that the gap they leave in the chain is accounted for;
    /// until none is left (a note can push out older records in turn).
    fn note_losses(&self, spool: &mut Spool, local_id: &str, time_unix_nanos: i64) {
        loop {
            let losses = spool.take_dropped();
            if losses.is_empty() {
                return;
            }
            for (i, &lost) in losses.iter().enumerate() {
                let note = Record {
                    schema: SCHEMA,
                    time_unix_nanos,
                    kind: Kind::Dropped as i32,
                    local_id: local_id.to_string(),
                    dropped: lost.count(),
                    dropped_from: lost.from,
                    detail: format!(
                        "records {} to {} were lost before the control plane had them (a full fail-open spool drops its oldest; a damaged spool segment loses what it held)",
                        lost.from, lost.through
                    ),
                    ..Record::default()
                };
                match append(spool, note) {
                    Ok(_) => {
                        self.lost.inc_by(lost.count());
                    }
                    Err(e) => {
                        // Kept to be said with the next record that finds room (fail-closed).
                        limited!(warn, "audit record of lost records not spooled yet: {e}");
                        for l in &losses[i..] {
                            spool.lose(l.from, l.through);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Where shipping starts: the first record not acknowledged.
    pub fn cursor(&self) -> Cursor {
        self.spool.lock().expect("spool lock").cursor()
    }

    /// The spool's chain ID.
    pub fn chain(&self) -> String {
        self.spool.lock().expect("spool lock").chain().to_string()
    }

    /// Up to `max` records from `cursor` on, read off the connections' path.
    pub async fn read(&self, cursor: &mut Cursor, max: usize) -> Result<Vec<Spooled>, SpoolError> {
        let parts = self.spool.lock().expect("spool lock").plan(cursor);
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let mut at = *cursor;
        let (records, at) = tokio::task::spawn_blocking(move || {
            spool::read(&parts, &mut at, max).map(|records| (records, at))
        })
        .await
        .expect("the spool read does not panic")?;
        *cursor = at;
        Ok(records)
    }

    /// The control plane holds every record up to `through`: noted on disk, then the segments
    /// it covers leave; a fail-closed spool with room again accepts connections.
    pub async fn acknowledge(&self, through: u64) -> Result<(), SpoolError> {
        let dir = {
            let spool = self.spool.lock().expect("spool lock");
            // Never backwards: a batch whose first record was not stored acknowledges less
            // than is already noted.
            if through <= spool.acked() {
                return Ok(());
            }
            spool.dir().to_path_buf()
        };
        tokio::task::spawn_blocking(move || spool::write_acked(&dir, through))
            .await
            .expect("the acked write does not panic")?;
        let gone = {
            let mut spool = self.spool.lock().expect("spool lock");
            let gone = spool.trim(through);
            self.acknowledged.set(spool.acked() as i64);
            if self.full.load(Ordering::Relaxed) && spool.bytes() <= spool.max_bytes() / 10 * 9 {
                self.full.store(false, Ordering::Relaxed);
                info!("audit spool has room again: accepting connections");
            }
            gone
        };
        tokio::task::spawn_blocking(move || {
            for path in gone {
                std::fs::remove_file(&path).map_err(|e| SpoolError::Io(path, e))?;
            }
            Ok(())
        })
        .await
        .expect("the segment removal does not panic")
    }

    /// Waits for the next record appended.
    pub async fn appended(&self) {
        self.appended.notified().await
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
