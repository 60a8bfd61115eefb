//! The control plane's audit store (issue 16): sidecars' chained records and checkpoints,
//! ingested in order, idempotently, and checked as they arrive. In an embedded SQLite file,
//! or in a PostgreSQL database that several replicas share (`audit_sql`).
//!
//! Ingest of a batch from sidecar X (its SPIFFE ID, from the SVID it presented):
//! - a record already stored under (X, seq) with the same bytes is skipped (a batch sent
//!   again after a reconnection); with other bytes it is a fork, reported and not stored;
//! - every other record is stored, whatever its place: one that does not follow the stored
//!   head (a gap, a wrong link) is stored too, so nothing is lost, and the break is reported;
//! - a checkpoint must be signed with the SVID X presented on this stream and match the
//!   stored chain; a bad one is reported and not kept.
//!
//! Records are kept under (sidecar, chain, seq): each spool has a chain of its own, so
//! replicas sharing one identity never collide. The batch is one transaction;
//! `durable_through` (the acknowledgement, after the commit) is the batch's last record, or
//! the one before its first record that could not be stored (a fork, one that does not
//! decode): the sidecar keeps everything after that.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Mutex;

use rustls::pki_types::CertificateDer;
use sigil_api::audit::{Batch, Checkpoint as WireCheckpoint, Kind, Record};
use sigil_api::Message;
use sigil_config::SpiffeId;
use sigil_filters::audit::{link, verify, Checkpoint, Damage, Entry, Hash, GENESIS};

use crate::audit_sql::Arg::{Bytes, Int, Text};
pub use crate::audit_sql::PostgresSpec;
use crate::audit_sql::{Arg, Cell, Db, SqlError, Tx};
use crate::stored::Witness;

/// A break found on ingest or by `verify_range`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Break {
    /// A record that does not decode as a `Record`.
    Undecodable { index: usize, why: String },
    /// A record sent again under a stored sequence number, with other bytes.
    Fork { seq: u64 },
    /// A break in the chain or its checkpoints.
    Chain(Damage),
}

impl Break {
    /// The metric's label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Undecodable { .. } => "undecodable",
            Self::Fork { .. } => "fork",
            Self::Chain(Damage::OutOfSequence { .. }) => "out_of_sequence",
            Self::Chain(Damage::Unlinked { .. }) => "unlinked",
            Self::Chain(Damage::HeadMismatch { .. }) => "head_mismatch",
            Self::Chain(Damage::BadSignature { .. }) => "bad_signature",
            Self::Chain(Damage::Truncated { .. }) => "truncated",
        }
    }
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Undecodable { index, why } => {
                write!(f, "record #{index} of the batch does not decode: {why}")
            }
            Self::Fork { seq } => write!(
                f,
                "record {seq} was sent again with other bytes than the stored one (a fork)"
            ),
            Self::Chain(d) => write!(f, "{d}"),
        }
    }
}

/// Which stored records a query wants.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Records of this sidecar or with this peer.
    pub identity: Option<String>,
    pub decision: Option<String>,
    pub policy: Option<String>,
    pub close_reason: Option<String>,
    pub kind: Option<i32>,
    /// Unix nanoseconds, from (inclusive) and to (exclusive).
    pub since_nanos: i64,
    pub until_nanos: i64,
    /// Only rows stored after this one (following).
    pub after: i64,
    pub limit: usize,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            identity: None,
            decision: None,
            policy: None,
            close_reason: None,
            kind: None,
            since_nanos: 0,
            until_nanos: i64::MAX,
            after: 0,
            limit: 1_000,
        }
    }
}

/// What an ingest did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub stored: usize,
    pub duplicates: usize,
    /// Every record up to here is stored (the sidecar may drop them).
    pub durable_through: u64,
    pub breaks: Vec<Break>,
}

pub struct AuditStore {
    /// Ingest: one writer.
    db: Mutex<Db>,
    /// Queries and verification, on a connection of their own: they read what was committed
    /// (SQLite's write-ahead log) and never hold ingest up.
    reader: Mutex<Db>,
    /// Whether this control plane removes old records (`--audit-retention`): only then is a
    /// chain's cut (`audit_pruned`) honoured by `verify_range`.
    retention: std::sync::atomic::AtomicBool,
    /// The latest checkpoint stored per (sidecar, chain) since they were last taken, to be
    /// kept outside this store (`take_witnesses`).
    witnessed: Mutex<HashMap<(String, String), (u64, Hash)>>,
}

#[derive(Debug)]
pub enum AuditStoreError {
    Dir(PathBuf, std::io::Error),
    Db(SqlError),
    /// A batch whose chain ID is not 1 to 64 hex digits.
    BadChainId(String),
    /// A stored record that no longer decodes.
    StoredRecord {
        sidecar: String,
        seq: u64,
        why: sigil_api::DecodeError,
    },
}

impl std::fmt::Display for AuditStoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir, e) => write!(f, "audit store: {}: {e}", dir.display()),
            Self::Db(e) => write!(f, "audit store: {e}"),
            Self::BadChainId(chain) => {
                write!(
                    f,
                    "audit store: batch chain {chain:?}: not a chain ID (1 to 64 hex digits)"
                )
            }
            Self::StoredRecord { sidecar, seq, why } => {
                write!(f, "audit store: stored record {seq} of {sidecar}: {why}")
            }
        }
    }
}

impl std::error::Error for AuditStoreError {}

impl From<SqlError> for AuditStoreError {
    fn from(e: SqlError) -> Self {
        Self::Db(e)
    }
}

/// The cells of a row whose statement names `N` columns.
fn cells<const N: usize>(row: Vec<Cell>) -> [Cell; N] {
    row.try_into()
        .unwrap_or_else(|r: Vec<Cell>| panic!("a statement of {N} columns gave {}", r.len()))
}

/// A sequence number, a count (none: 0).
fn number(c: &Cell) -> Result<u64, AuditStoreError> {
    Ok(c.int()?.unwrap_or(0).max(0) as u64)
}

fn seq_and_link(row: Vec<Cell>) -> Result<(u64, Hash), AuditStoreError> {
    let [seq, link] = cells(row);
    Ok((number(&seq)?, hash_of(&link.bytes())))
}

/// Where retention cut a chain: the last record removed and its link, from which the records
/// kept verify. None: nothing removed.
fn pruned_at(
    db: &mut Tx<'_>,
    sidecar: &str,
    chain: &str,
) -> Result<Option<(u64, Hash)>, AuditStoreError> {
    db.row(
        "SELECT seq, link FROM audit_pruned WHERE sidecar = ?1 AND chain = ?2",
        &[Text(sidecar), Text(chain)],
    )?
    .map(seq_and_link)
    .transpose()
}

/// Records removed per transaction by retention.
const PRUNE_CHUNK: i64 = 10_000;

/// Records verified per read (small in unit tests, so that they cross chunks).
const VERIFY_CHUNK: i64 = if cfg!(test) { 64 } else { 10_000 };

fn hash_of(bytes: &[u8]) -> Hash {
    let mut h = GENESIS;
    if bytes.len() == 32 {
        h.copy_from_slice(bytes);
    }
    h
}

/// The link of the stored record (sidecar, chain, seq), if there is one.
fn stored_link(
    db: &mut Tx<'_>,
    sidecar: &str,
    chain: &str,
    seq: u64,
) -> Result<Option<Hash>, AuditStoreError> {
    let row = db.row(
        "SELECT link FROM audit_records WHERE sidecar = ?1 AND chain = ?2 AND seq = ?3",
        &[Text(sidecar), Text(chain), Int(seq as i64)],
    )?;
    Ok(row.map(|r| {
        let [link] = cells(r);
        hash_of(&link.bytes())
    }))
}

/// The chain's stored head: the highest sequence number stored and its link.
fn stored_head(
    db: &mut Tx<'_>,
    sidecar: &str,
    chain: &str,
) -> Result<(u64, Hash), AuditStoreError> {
    let head = db
        .row(
            "SELECT seq, link FROM audit_heads WHERE sidecar = ?1 AND chain = ?2",
            &[Text(sidecar), Text(chain)],
        )?
        .map(seq_and_link)
        .transpose()?;
    Ok(head.unwrap_or((0, GENESIS)))
}

/// The ranges the chain's stored `Dropped` records say the sidecar lost, merged where they
/// meet. Only a `Dropped` record that comes after the range it names, and that a stored
/// checkpoint vouches for (one at its sequence number or later: `verify` then checks that
/// the chain up to that checkpoint is whole), counts: a record rewritten into a `Dropped`
/// one, or one appended after the last checkpoint, accounts for nothing.
fn lost_ranges(
    db: &mut Tx<'_>,
    sidecar: &str,
    chain: &str,
) -> Result<Vec<RangeInclusive<u64>>, AuditStoreError> {
    let rows = db.rows(
        "SELECT seq, record FROM audit_records WHERE sidecar = ?1 AND chain = ?2 AND kind = ?3",
        &[Text(sidecar), Text(chain), Int(Kind::Dropped as i64)],
    )?;
    let vouched_through = db
        .row(
            "SELECT MAX(seq) FROM audit_checkpoints WHERE sidecar = ?1 AND chain = ?2",
            &[Text(sidecar), Text(chain)],
        )?
        .map_or(Ok(0), |r| number(&r[0]))?;
    let mut ranges = Vec::new();
    for row in rows {
        let [seq, bytes] = cells(row);
        let seq = number(&seq)?;
        let r =
            Record::decode(&bytes.bytes()[..]).map_err(|why| AuditStoreError::StoredRecord {
                sidecar: sidecar.to_string(),
                seq,
                why,
            })?;
        let through = r.dropped_from.saturating_add(r.dropped.saturating_sub(1));
        if r.dropped_from > 0 && r.dropped > 0 && through < seq && seq <= vouched_through {
            ranges.push((r.dropped_from, through));
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (from, through) in ranges {
        match merged.last_mut() {
            Some(last) if from <= last.1.saturating_add(1) => last.1 = last.1.max(through),
            _ => merged.push((from, through)),
        }
    }
    Ok(merged.into_iter().map(|(f, t)| f..=t).collect())
}

type StoredCheckpoint = (u64, Hash, Vec<u8>, Vec<u8>);

/// The chain's stored checkpoints with `after < seq <= through`.
fn stored_checkpoints(
    db: &mut Tx<'_>,
    sidecar: &str,
    chain: &str,
    after: u64,
    through: u64,
) -> Result<Vec<StoredCheckpoint>, AuditStoreError> {
    db.rows(
        "SELECT seq, head, signature, signer FROM audit_checkpoints
         WHERE sidecar = ?1 AND chain = ?2 AND seq > ?3 AND seq <= ?4 ORDER BY seq",
        &[
            Text(sidecar),
            Text(chain),
            Int(after as i64),
            Int(through.min(i64::MAX as u64) as i64),
        ],
    )?
    .into_iter()
    .map(|row| {
        let [seq, head, signature, signer] = cells(row);
        Ok((
            number(&seq)?,
            hash_of(&head.bytes()),
            signature.bytes(),
            signer.bytes(),
        ))
    })
    .collect()
}

/// Whether a checkpoint's signer (its SVID's leaf, DER) chains to a root the control plane
/// trusts or trusted; why not.
pub type SignerCheck<'a> = &'a dyn Fn(&[u8]) -> Result<(), String>;

/// The checkpoints whose signers pass `trusted` (each signer checked once), and a break for
/// each of the others.
fn trusted_checkpoints<'c>(
    cps: &'c [StoredCheckpoint],
    trusted: SignerCheck<'_>,
    seen: &mut std::collections::HashMap<Vec<u8>, Result<(), String>>,
) -> (Vec<&'c StoredCheckpoint>, Vec<Damage>) {
    let (mut ok, mut damage) = (Vec::new(), Vec::new());
    for c in cps {
        let verdict = seen.entry(c.3.clone()).or_insert_with(|| trusted(&c.3));
        match verdict {
            Ok(()) => ok.push(c),
            Err(why) => damage.push(Damage::BadSignature {
                seq: c.0,
                why: format!(
                    "its SVID does not chain to a root this control plane trusts or trusted: {why}"
                ),
            }),
        }
    }
    (ok, damage)
}

/// `verify` over one chunk of stored records and the checkpoints that fall in it.
fn verify_chunk(
    sidecar: &SpiffeId,
    rows: &[(u64, Hash, Vec<u8>)],
    cps: &[&StoredCheckpoint],
    start: Option<(u64, Hash)>,
    lost: &[RangeInclusive<u64>],
) -> Vec<Damage> {
    let signers: Vec<CertificateDer<'_>> = cps
        .iter()
        .map(|c| CertificateDer::from(c.3.as_slice()))
        .collect();
    let checkpoints: Vec<Checkpoint<'_>> = cps
        .iter()
        .zip(&signers)
        .map(|(c, signer)| Checkpoint {
            seq: c.0,
            head: c.1,
            signature: &c.2,
            signer,
        })
        .collect();
    let entries: Vec<Entry<'_>> = rows
        .iter()
        .map(|(seq, prev, record)| Entry {
            seq: *seq,
            prev: *prev,
            record,
        })
        .collect();
    verify(sidecar, &entries, &checkpoints, start, lost)
}

/// A record's field as its query column keeps it: PostgreSQL's text takes no NUL, which a
/// broken sidecar could send (the record's bytes, kept whole, are what the chain covers).
fn indexed(field: &str) -> std::borrow::Cow<'_, str> {
    if field.contains('\0') {
        field.replace('\0', "\u{fffd}").into()
    } else {
        field.into()
    }
}

/// What one batch does to the chain it is ingested into.
struct Ingest<'a, 't> {
    tx: &'a mut Tx<'t>,
    sidecar: &'a SpiffeId,
    chain: &'a str,
    head: (u64, Hash),
    /// Where retention cut the chain: records up to it were stored and removed since.
    pruned: u64,
    out: Ingested,
    /// The latest checkpoint of the batch that was kept.
    checkpointed: Option<(u64, Hash)>,
    /// The links stored (before or in this batch) at the batch's sequence numbers: read in
    /// one query, not one per record (a round trip each to PostgreSQL).
    known: HashMap<u64, Hash>,
    /// Records to store, written `INSERT_ROWS` to a statement.
    pending: Vec<Row<'a>>,
}

/// A record as `audit_records` keeps it.
struct Row<'a> {
    seq: u64,
    prev: Hash,
    link: Hash,
    record: Record,
    bytes: &'a [u8],
}

/// Rows per INSERT: one round trip for many records; a few statement shapes only.
const INSERT_ROWS: [usize; 3] = [100, 10, 1];

/// `INSERT INTO audit_records` of `n` rows (one of `INSERT_ROWS`), made once.
fn insert_sql(n: usize) -> &'static str {
    static MADE: std::sync::OnceLock<[String; 3]> = std::sync::OnceLock::new();
    let made = MADE.get_or_init(|| INSERT_ROWS.map(insert_sql_of));
    let i = INSERT_ROWS
        .iter()
        .position(|&rows| rows == n)
        .expect("one of INSERT_ROWS");
    &made[i]
}

fn insert_sql_of(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO audit_records
           (sidecar, chain, seq, prev, link, time, kind, peer, decision, policy, close_reason, record)
         VALUES ",
    );
    for row in 0..n {
        let p = row * 12;
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        let cols: Vec<String> = (1..=12).map(|c| format!("?{}", p + c)).collect();
        sql.push_str(&cols.join(", "));
        sql.push(')');
    }
    sql
}

impl<'a> Ingest<'a, '_> {
    /// The links stored at the sequence numbers `seqs` spans.
    /// (Only numbers a record may have count: one out of range is refused by `record`.) A
    /// batch whose numbers lie far apart is looked up number by number instead, so that a
    /// stray number cannot load the whole chain.
    fn preload(&mut self, seqs: &[u64]) -> Result<(), AuditStoreError> {
        let valid = || {
            seqs.iter()
                .copied()
                .filter(|s| (1..=i64::MAX as u64).contains(s))
        };
        let (low, high) = valid().fold((u64::MAX, 0), |(l, h), s| (l.min(s), h.max(s)));
        if low > high {
            return Ok(());
        }
        if high - low > 4 * seqs.len() as u64 + 64 {
            let id = self.sidecar.as_str();
            for seq in valid() {
                if let Some(link) = stored_link(self.tx, id, self.chain, seq)? {
                    self.known.insert(seq, link);
                }
            }
            return Ok(());
        }
        let rows = self.tx.rows(
            "SELECT seq, link FROM audit_records
             WHERE sidecar = ?1 AND chain = ?2 AND seq >= ?3 AND seq <= ?4",
            &[
                Text(self.sidecar.as_str()),
                Text(self.chain),
                Int(low as i64),
                Int(high as i64),
            ],
        )?;
        for row in rows {
            let (seq, link) = seq_and_link(row)?;
            self.known.insert(seq, link);
        }
        Ok(())
    }

    /// Stores record `index` of the batch (see the module), decoded as `decoded`; its
    /// sequence number if it is stored now or was already, None if it cannot be
    /// (undecodable, a fork).
    fn record(
        &mut self,
        index: usize,
        bytes: &'a [u8],
        decoded: Result<Record, sigil_api::DecodeError>,
    ) -> Result<Option<u64>, AuditStoreError> {
        let record = match decoded {
            Ok(r) if r.seq == 0 || r.seq > i64::MAX as u64 => {
                self.out.breaks.push(Break::Undecodable {
                    index,
                    why: format!("sequence number {} out of range", r.seq),
                });
                return Ok(None);
            }
            Ok(r) => r,
            Err(e) => {
                self.out.breaks.push(Break::Undecodable {
                    index,
                    why: e.to_string(),
                });
                return Ok(None);
            }
        };
        if record.seq <= self.pruned {
            // Sent again after retention removed it: stored once already.
            self.out.duplicates += 1;
            return Ok(Some(record.seq));
        }
        let prev = hash_of(&record.prev);
        let this = link(record.seq, &prev, bytes);
        match self.known.get(&record.seq) {
            Some(stored) if *stored == this => {
                self.out.duplicates += 1;
                return Ok(Some(record.seq));
            }
            Some(_) => {
                self.out.breaks.push(Break::Fork { seq: record.seq });
                return Ok(None);
            }
            None => {}
        }
        let entry = [Entry {
            seq: record.seq,
            prev,
            record: bytes,
        }];
        let (head_seq, head) = self.head;
        let start = (head_seq > 0 || record.seq > 1).then_some((head_seq, head));
        let damage = verify(self.sidecar, &entry, &[], start, &[]);
        self.out.breaks.extend(damage.into_iter().map(Break::Chain));
        let seq = record.seq;
        self.known.insert(seq, this);
        self.pending.push(Row {
            seq,
            prev,
            link: this,
            record,
            bytes,
        });
        if self.pending.len() >= INSERT_ROWS[0] {
            self.flush()?;
        }
        self.out.stored += 1;
        if seq > head_seq {
            self.head = (seq, this);
        }
        Ok(Some(seq))
    }

    /// Writes the records waiting to be stored.
    fn flush(&mut self) -> Result<(), AuditStoreError> {
        let pending = std::mem::take(&mut self.pending);
        let mut rows = &pending[..];
        let id = self.sidecar.as_str();
        for n in INSERT_ROWS {
            while rows.len() >= n {
                let (these, rest) = rows.split_at(n);
                let columns: Vec<[std::borrow::Cow<'_, str>; 4]> = these
                    .iter()
                    .map(|r| {
                        [
                            indexed(&r.record.peer_id),
                            indexed(&r.record.decision),
                            indexed(&r.record.policy),
                            indexed(&r.record.close_reason),
                        ]
                    })
                    .collect();
                let mut args = Vec::with_capacity(n * 12);
                for (r, [peer, decision, policy, close_reason]) in these.iter().zip(&columns) {
                    args.extend([
                        Text(id),
                        Text(self.chain),
                        Int(r.seq as i64),
                        Bytes(&r.prev),
                        Bytes(&r.link),
                        Int(r.record.time_unix_nanos),
                        Int(r.record.kind.into()),
                        Text(peer),
                        Text(decision),
                        Text(policy),
                        Text(close_reason),
                        Bytes(r.bytes),
                    ]);
                }
                self.tx.exec(insert_sql(n), &args)?;
                rows = rest;
            }
        }
        Ok(())
    }

    /// Checks a checkpoint and keeps it if it holds: signed with the SVID this stream was
    /// opened with (so not with a certificate made up for the same ID), its signature, and
    /// the stored record's link at its sequence number, which stands for the chain up to it.
    fn checkpoint(&mut self, peer_leaf: &[u8], c: &WireCheckpoint) -> Result<(), AuditStoreError> {
        let signer = CertificateDer::from(c.signer.as_slice());
        let checkpoint = Checkpoint {
            seq: c.seq,
            head: hash_of(&c.head),
            signature: &c.signature,
            signer: &signer,
        };
        let id = self.sidecar.as_str();
        let at = match self.known.get(&c.seq) {
            Some(link) => Some(*link),
            None => stored_link(self.tx, id, self.chain, c.seq)?,
        };
        let mut damage = if c.signer != peer_leaf {
            vec![Damage::BadSignature {
                seq: c.seq,
                why: "not signed with the SVID this stream was opened with".into(),
            }]
        } else {
            // With the range starting at the checkpoint, verify checks the signature only.
            verify(
                self.sidecar,
                &[],
                &[checkpoint],
                Some((c.seq, checkpoint.head)),
                &[],
            )
        };
        match at {
            Some(l) if damage.is_empty() && l != checkpoint.head => {
                damage.push(Damage::HeadMismatch { seq: c.seq })
            }
            // A checkpoint for a record not stored vouches for nothing here.
            None if damage.is_empty() => return Ok(()),
            _ => {}
        }
        if damage.is_empty() {
            if self.checkpointed.is_none_or(|(seq, _)| seq < c.seq) {
                self.checkpointed = Some((c.seq, checkpoint.head));
            }
            self.tx.exec(
                "INSERT INTO audit_checkpoints (sidecar, chain, seq, head, signature, signer)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (sidecar, chain, seq) DO UPDATE SET head = excluded.head,
                   signature = excluded.signature, signer = excluded.signer",
                &[
                    Text(id),
                    Text(self.chain),
                    Int(c.seq as i64),
                    Bytes(&c.head),
                    Bytes(&c.signature),
                    Bytes(&c.signer),
                ],
            )?;
        }
        self.out.breaks.extend(damage.into_iter().map(Break::Chain));
        Ok(())
    }
}

/// Where the audit records are kept.
#[derive(Clone, Debug)]
pub enum AuditDb {
    /// An SQLite file of this control plane's own.
    Sqlite(PathBuf),
    /// A PostgreSQL database that several replicas share.
    Postgres(PostgresSpec),
}

impl AuditStore {
    /// Opens the store (made if new), with a connection to write and one to read.
    pub fn open(at: &AuditDb) -> Result<Self, AuditStoreError> {
        let (db, reader) = match at {
            AuditDb::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| AuditStoreError::Dir(dir.to_path_buf(), e))?;
                }
                (Db::sqlite(path)?, Db::sqlite(path)?)
            }
            AuditDb::Postgres(spec) => (Db::postgres(spec)?, Db::postgres(spec)?),
        };
        Ok(Self {
            db: Mutex::new(db),
            reader: Mutex::new(reader),
            retention: std::sync::atomic::AtomicBool::new(false),
            witnessed: Mutex::default(),
        })
    }

    /// Ingests one batch of `sidecar`'s records and checkpoints (see the module). `peer_leaf`:
    /// the SVID the sidecar presented on this stream; checkpoints must be signed with it.
    pub fn ingest(
        &self,
        sidecar: &SpiffeId,
        peer_leaf: &[u8],
        batch: &Batch,
    ) -> Result<Ingested, AuditStoreError> {
        let chain = batch.chain.as_str();
        if chain.is_empty() || chain.len() > 64 || !chain.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AuditStoreError::BadChainId(chain.to_string()));
        }
        let mut db = self.db.lock().expect("audit store lock");
        let mut tx = db.write()?;
        let head = stored_head(&mut tx, sidecar.as_str(), chain)?;
        let pruned = pruned_at(&mut tx, sidecar.as_str(), chain)?.map_or(0, |(seq, _)| seq);
        let mut ingest = Ingest {
            tx: &mut tx,
            sidecar,
            chain,
            head,
            pruned,
            out: Ingested::default(),
            checkpointed: None,
            known: HashMap::new(),
            pending: Vec::new(),
        };
        let decoded: Vec<_> = batch
            .records
            .iter()
            .map(|bytes| Record::decode(&bytes[..]))
            .collect();
        let seqs: Vec<u64> = decoded.iter().flatten().map(|r| r.seq).collect();
        ingest.preload(&seqs)?;
        // The batch is acknowledged up to its first record that could not be stored.
        let mut stopped = false;
        for ((index, bytes), decoded) in batch.records.iter().enumerate().zip(decoded) {
            match ingest.record(index, bytes, decoded)? {
                Some(seq) if !stopped => ingest.out.durable_through = seq,
                Some(_) => {}
                None => stopped = true,
            }
        }
        ingest.flush()?;
        for c in &batch.checkpoints {
            ingest.checkpoint(peer_leaf, c)?;
        }
        let (head_seq, head) = ingest.head;
        let checkpointed = ingest.checkpointed;
        let out = ingest.out;
        tx.exec(
            "INSERT INTO audit_heads (sidecar, chain, seq, link) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (sidecar, chain) DO UPDATE SET seq = excluded.seq, link = excluded.link",
            &[
                Text(sidecar.as_str()),
                Text(chain),
                Int(head_seq as i64),
                Bytes(&head),
            ],
        )?;
        tx.commit()?;
        if let Some((seq, head)) = checkpointed {
            let mut witnessed = self.witnessed.lock().expect("witness lock");
            let w = witnessed
                .entry((sidecar.to_string(), chain.to_string()))
                .or_insert((seq, head));
            if w.0 < seq {
                *w = (seq, head);
            }
        }
        Ok(out)
    }

    /// The chains' latest checkpoints stored since the last call, to be kept outside this
    /// store (in the control plane's own, beside the resources).
    pub fn take_witnesses(&self) -> Vec<Witness> {
        let taken = std::mem::take(&mut *self.witnessed.lock().expect("witness lock"));
        taken
            .into_iter()
            .map(|((sidecar, chain), (seq, head))| Witness {
                sidecar,
                chain,
                seq,
                head,
            })
            .collect()
    }

    /// Witnesses taken but not kept (the control plane's store was unreachable): taken again
    /// next time, unless a later checkpoint came meanwhile.
    pub fn untake_witnesses(&self, witnesses: Vec<Witness>) {
        let mut witnessed = self.witnessed.lock().expect("witness lock");
        for w in witnesses {
            let e = witnessed
                .entry((w.sidecar, w.chain))
                .or_insert((w.seq, w.head));
            if e.0 < w.seq {
                *e = (w.seq, w.head);
            }
        }
    }

    /// What the chain's records stored here say against its `witness`, the latest checkpoint
    /// kept outside this store: None if they agree; else why not (the tail cut off together
    /// with its checkpoints, the record it vouches for missing or changed).
    pub fn witness_break(&self, w: &Witness) -> Result<Option<String>, AuditStoreError> {
        let mut reader = self.reader.lock().expect("audit store lock");
        let mut db = reader.read()?;
        let (sidecar, chain) = (w.sidecar.as_str(), w.chain.as_str());
        let last = db
            .row(
                "SELECT MAX(seq) FROM audit_records WHERE sidecar = ?1 AND chain = ?2",
                &[Text(sidecar), Text(chain)],
            )?
            .map_or(Ok(0), |r| number(&r[0]))?;
        let kept = "the checkpoint kept in the control plane's store";
        if last < w.seq {
            return Ok(Some(if last == 0 {
                format!(
                    "no record is stored, but {kept} vouches for records up to {}",
                    w.seq
                )
            } else {
                format!(
                    "the records end at {last}, but {kept} vouches for records up to {}: the tail was cut off with its checkpoints",
                    w.seq
                )
            }));
        }
        let retention = self.retention.load(std::sync::atomic::Ordering::Relaxed);
        if retention && pruned_at(&mut db, sidecar, chain)?.is_some_and(|(cut, _)| cut >= w.seq) {
            return Ok(None);
        }
        Ok(match stored_link(&mut db, sidecar, chain, w.seq)? {
            Some(link) if link == w.head => None,
            Some(_) => Some(format!("record {} differs from {kept}", w.seq)),
            None => Some(format!(
                "record {}, which {kept} vouches for, is missing",
                w.seq
            )),
        })
    }

    /// Stored records that pass `filter`, oldest first (by arrival), with their row number
    /// (for following: `after`).
    pub fn query(&self, filter: &Filter) -> Result<Vec<(i64, String, Record)>, AuditStoreError> {
        let mut sql = String::from(
            "SELECT rowid, sidecar, seq, record FROM audit_records WHERE rowid > ?1 AND time >= ?2 AND time < ?3",
        );
        let mut args: Vec<Arg<'_>> = vec![
            Int(filter.after),
            Int(filter.since_nanos),
            Int(filter.until_nanos),
        ];
        if let Some(id) = &filter.identity {
            args.push(Text(id));
            let n = args.len();
            sql += &format!(" AND (sidecar = ?{n} OR peer = ?{n})");
        }
        for (column, value) in [
            ("decision", &filter.decision),
            ("policy", &filter.policy),
            ("close_reason", &filter.close_reason),
        ] {
            if let Some(v) = value {
                args.push(Text(v));
                sql += &format!(" AND {column} = ?{}", args.len());
            }
        }
        if let Some(kind) = filter.kind {
            args.push(Int(kind.into()));
            sql += &format!(" AND kind = ?{}", args.len());
        }
        args.push(Int(filter.limit as i64));
        sql += &format!(" ORDER BY rowid LIMIT ?{}", args.len());
        let mut reader = self.reader.lock().expect("audit store lock");
        let rows = reader.read()?.rows(&sql, &args)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let [rowid, sidecar, seq, bytes] = cells(row);
            let (sidecar, seq) = (sidecar.text()?, number(&seq)?);
            let record = Record::decode(&bytes.bytes()[..]).map_err(|why| {
                AuditStoreError::StoredRecord {
                    sidecar: sidecar.clone(),
                    seq,
                    why,
                }
            })?;
            out.push((rowid.int()?.unwrap_or(0), sidecar, record));
        }
        Ok(out)
    }

    /// Every chain with stored records: the sidecar's SPIFFE ID, the chain, how many
    /// records, and the highest sequence number.
    pub fn chains(&self) -> Result<Vec<(String, String, u64, u64)>, AuditStoreError> {
        let mut reader = self.reader.lock().expect("audit store lock");
        let rows = reader.read()?.rows(
            "SELECT sidecar, chain, COUNT(*), MAX(seq) FROM audit_records
                 GROUP BY sidecar, chain ORDER BY sidecar, chain",
            &[],
        )?;
        rows.into_iter()
            .map(|row| {
                let [sidecar, chain, count, last] = cells(row);
                Ok((
                    sidecar.text()?,
                    chain.text()?,
                    number(&count)?,
                    number(&last)?,
                ))
            })
            .collect()
    }

    /// The last record of the chain that retention removed, if any.
    pub fn pruned_through(
        &self,
        sidecar: &str,
        chain: &str,
    ) -> Result<Option<u64>, AuditStoreError> {
        let mut reader = self.reader.lock().expect("audit store lock");
        let at = pruned_at(&mut reader.read()?, sidecar, chain)?;
        Ok(at.map(|(seq, _)| seq))
    }

    /// The ranges of `sidecar`'s chain that its `Dropped` records say were lost.
    pub fn lost(
        &self,
        sidecar: &str,
        chain: &str,
    ) -> Result<Vec<RangeInclusive<u64>>, AuditStoreError> {
        let mut reader = self.reader.lock().expect("audit store lock");
        let lost = lost_ranges(&mut reader.read()?, sidecar, chain)?;
        Ok(lost)
    }

    /// Says that this control plane removes old records (`prune`), so that the cuts it makes
    /// are honoured when chains are verified.
    pub fn set_retention(&self) {
        self.retention
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Retention: removes, chain by chain, the records older than `cutoff_nanos` from the
    /// start of each chain (never past a record that is kept, so the rest still verifies),
    /// with the checkpoints they cover, and notes where each chain now starts. A chain whose
    /// records are all older keeps its last one, whose link its next records continue from.
    /// Runs in transactions of `PRUNE_CHUNK` records, on the ingest connection. Returns how
    /// many records were removed.
    pub fn prune(&self, cutoff_nanos: i64) -> Result<u64, AuditStoreError> {
        let chains = {
            let mut reader = self.reader.lock().expect("audit store lock");
            let rows = reader.read()?.rows(
                "SELECT DISTINCT sidecar, chain FROM audit_records WHERE time < ?1",
                &[Int(cutoff_nanos)],
            )?;
            rows.into_iter()
                .map(|row| {
                    let [sidecar, chain] = cells(row);
                    Ok((sidecar.text()?, chain.text()?))
                })
                .collect::<Result<Vec<_>, AuditStoreError>>()?
        };
        let mut removed = 0;
        for (sidecar, chain) in chains {
            let this = [Text(&sidecar), Text(&chain)];
            loop {
                let mut db = self.db.lock().expect("audit store lock");
                let mut tx = db.write()?;
                // The first record kept: the oldest one at or after the cutoff, or the last.
                let first_kept = tx
                    .row(
                        "SELECT COALESCE(
                             (SELECT MIN(seq) FROM audit_records
                               WHERE sidecar = ?1 AND chain = ?2 AND time >= ?3),
                             (SELECT MAX(seq) FROM audit_records WHERE sidecar = ?1 AND chain = ?2))",
                        &[this[0], this[1], Int(cutoff_nanos)],
                    )?
                    .map(|r| r[0].int())
                    .transpose()?
                    .flatten();
                let Some(first_kept) = first_kept else {
                    break;
                };
                let last_gone = match tx.row(
                    "SELECT seq, link FROM audit_records
                      WHERE sidecar = ?1 AND chain = ?2 AND seq < ?3
                      ORDER BY seq LIMIT 1 OFFSET ?4",
                    &[this[0], this[1], Int(first_kept), Int(PRUNE_CHUNK - 1)],
                )? {
                    Some(row) => Some(row),
                    None => tx.row(
                        "SELECT seq, link FROM audit_records
                          WHERE sidecar = ?1 AND chain = ?2 AND seq < ?3
                          ORDER BY seq DESC LIMIT 1",
                        &[this[0], this[1], Int(first_kept)],
                    )?,
                };
                let Some(row) = last_gone else {
                    break;
                };
                let [through, link] = cells(row);
                let (through, link) = (through.int()?.unwrap_or(0), link.bytes());
                let n = tx.exec(
                    "DELETE FROM audit_records WHERE sidecar = ?1 AND chain = ?2 AND seq <= ?3",
                    &[this[0], this[1], Int(through)],
                )?;
                tx.exec(
                    "DELETE FROM audit_checkpoints WHERE sidecar = ?1 AND chain = ?2 AND seq <= ?3",
                    &[this[0], this[1], Int(through)],
                )?;
                tx.exec(
                    "INSERT INTO audit_pruned (sidecar, chain, seq, link) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (sidecar, chain) DO UPDATE SET seq = excluded.seq, link = excluded.link",
                    &[this[0], this[1], Int(through), Bytes(&link)],
                )?;
                tx.commit()?;
                removed += n;
            }
        }
        Ok(removed)
    }

    /// Checks `sidecar`'s stored records `from..=to` (all: 1..=u64::MAX) end to end, in
    /// sequence order, against the stored checkpoints whose signers pass `trusted` (those
    /// that do not are breaks); gaps the chain's own `Dropped` records account for are not
    /// breaks. Reads `VERIFY_CHUNK` records at a time.
    pub fn verify_range(
        &self,
        sidecar: &SpiffeId,
        chain: &str,
        from: u64,
        to: u64,
        trusted: SignerCheck<'_>,
    ) -> Result<Vec<Damage>, AuditStoreError> {
        let mut seen = std::collections::HashMap::new();
        let mut reader = self.reader.lock().expect("audit store lock");
        // One snapshot of the store throughout: records and checkpoints committed meanwhile
        // would otherwise show as a checkpoint past the last record read (a false truncation).
        let mut db = reader.read()?;
        let id = sidecar.as_str();
        let to = to.min(i64::MAX as u64);
        let lost = lost_ranges(&mut db, id, chain)?;
        // Records removed by retention are not missing: the range starts after them. Without
        // retention, no cut is honoured (a deletion is not passed off as one).
        let pruned = if self.retention.load(std::sync::atomic::Ordering::Relaxed) {
            pruned_at(&mut db, id, chain)?
        } else {
            None
        };
        let from = match pruned {
            Some((seq, _)) => from.max(seq + 1),
            None => from,
        };
        let mut start = match pruned {
            Some((seq, link)) if from == seq + 1 => Some((seq, link)),
            _ if from > 1 => stored_link(&mut db, id, chain, from - 1)?.map(|l| (from - 1, l)),
            _ => None,
        };
        let mut after = from.saturating_sub(1);
        let mut damage = Vec::new();
        loop {
            let rows: Vec<(u64, Hash, Vec<u8>)> = db
                .rows(
                    "SELECT seq, prev, record FROM audit_records
                     WHERE sidecar = ?1 AND chain = ?2 AND seq > ?3 AND seq <= ?4
                     ORDER BY seq LIMIT ?5",
                    &[
                        Text(id),
                        Text(chain),
                        Int(after as i64),
                        Int(to as i64),
                        Int(VERIFY_CHUNK),
                    ],
                )?
                .into_iter()
                .map(|row| {
                    let [seq, prev, record] = cells(row);
                    Ok((number(&seq)?, hash_of(&prev.bytes()), record.bytes()))
                })
                .collect::<Result<_, AuditStoreError>>()?;
            // The last chunk takes every checkpoint up to `to`: those past the last record
            // stored vouch for a tail that is gone.
            let through = match rows.last() {
                Some(last) if rows.len() as i64 == VERIFY_CHUNK => last.0,
                _ => to,
            };
            let cps = stored_checkpoints(&mut db, id, chain, after, through)?;
            let (cps, untrusted) = trusted_checkpoints(&cps, trusted, &mut seen);
            damage.extend(untrusted);
            damage.extend(verify_chunk(sidecar, &rows, &cps, start, &lost));
            let Some((seq, prev, record)) = rows.last() else {
                break;
            };
            start = Some((*seq, link(*seq, prev, record)));
            after = *seq;
            if through == to {
                break;
            }
        }
        Ok(damage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use sigil_api::audit::{Checkpoint as WireCheckpoint, Kind, SCHEMA};
    use sigil_filters::audit::sign_checkpoint;
    use sigil_filters::LocalIdentity;
    use sigil_testkit::Ca;

    const WEB: &str = "spiffe://example.org/ns/demo/sa/web";

    /// Every signer trusted (the signer checks are `AuditStore::verify_range`'s caller's).
    fn any_signer(_: &[u8]) -> Result<(), String> {
        Ok(())
    }
    const CHAIN: &str = "0123456789abcdef0123456789abcdef";

    struct Sidecar {
        identity: LocalIdentity,
        head: Hash,
        seq: u64,
        sent: Vec<Vec<u8>>,
    }

    impl Sidecar {
        fn new(ca: &Ca) -> Self {
            let svid = ca.svid(WEB);
            let identity = LocalIdentity::from_pem(
                svid.chain_pem().as_bytes(),
                svid.key_pem().as_bytes(),
                UnixTime::now(),
                None,
                &sigil_filters::tls::provider(),
            )
            .unwrap();
            Self {
                identity,
                head: GENESIS,
                seq: 0,
                sent: Vec::new(),
            }
        }

        /// `n` more records, and a checkpoint after them.
        fn batch(&mut self, n: u64) -> Batch {
            let close = Record {
                kind: Kind::ConnectionClose as i32,
                peer_id: "spiffe://example.org/ns/demo/sa/a".into(),
                close_reason: "normal".into(),
                ..Record::default()
            };
            self.batch_of(vec![close; n as usize])
        }

        /// Records `from..=to` as they were sent, again, without a checkpoint.
        fn sent_again(&self, from: u64, to: u64) -> Batch {
            Batch {
                records: self.sent[from as usize - 1..to as usize].to_vec(),
                checkpoints: Vec::new(),
                chain: CHAIN.into(),
            }
        }

        /// `records`, chained, and a checkpoint after them.
        fn batch_of(&mut self, records: Vec<Record>) -> Batch {
            let records: Vec<Vec<u8>> = records
                .into_iter()
                .map(|r| {
                    self.seq += 1;
                    let r = Record {
                        schema: SCHEMA,
                        seq: self.seq,
                        prev: self.head.to_vec(),
                        time_unix_nanos: 1_800_000_000_000_000_000 + self.seq as i64,
                        ..r
                    }
                    .encode_to_vec();
                    self.head = link(self.seq, &self.head, &r);
                    r
                })
                .collect();
            self.sent.extend(records.iter().cloned());
            let checkpoints = vec![WireCheckpoint {
                seq: self.seq,
                head: self.head.to_vec(),
                signature: sign_checkpoint(&self.identity, self.seq, &self.head).unwrap(),
                signer: self.identity.chain()[0].to_vec(),
            }];
            Batch {
                records,
                checkpoints,
                chain: CHAIN.into(),
            }
        }
    }

    /// Where a test's stores live: an SQLite file in a directory of its own, or a fresh
    /// PostgreSQL server (Debian's, started here).
    struct Place {
        // Dropped first: the server stops before its directory goes.
        pg: Option<sigil_e2e::PgServer>,
        dir: sigil_e2e::TempDir,
    }

    impl Place {
        fn open(&self) -> AuditStore {
            let at = match &self.pg {
                None => AuditDb::Sqlite(self.dir.path().join("audit.db")),
                Some(pg) => AuditDb::Postgres(PostgresSpec {
                    url: pg.url(),
                    ca: pg.ca_file.clone(),
                    client: Some(pg.client.clone()),
                }),
            };
            AuditStore::open(&at).unwrap()
        }
    }

    /// Each kind of store, fresh: SQLite always, and PostgreSQL where it is installed (in CI
    /// it must be).
    fn places(name: &str) -> Vec<Place> {
        let sqlite = Place {
            dir: sigil_e2e::TempDir::new(&format!("audit-{name}")),
            pg: None,
        };
        let dir = sigil_e2e::TempDir::new(&format!("audit-pg-{name}"));
        match sigil_e2e::PgServer::start(dir.path(), name) {
            Some(pg) => vec![sqlite, Place { dir, pg: Some(pg) }],
            None => vec![sqlite],
        }
    }

    /// Changes the stored records behind the store's back, as someone with write access to
    /// the database would.
    fn tamper(store: &AuditStore, sql: &str, args: &[Arg<'_>]) {
        let mut db = store.db.lock().unwrap();
        let mut tx = db.write().unwrap();
        tx.exec(sql, args).unwrap();
        tx.commit().unwrap();
    }

    #[test]
    fn batches_are_stored_once_in_order_and_a_stored_range_verifies() {
        for place in places("store") {
            stored_once_and_verified(&place.open(), Sidecar::new(&Ca::new("example.org")));
        }
    }

    fn stored_once_and_verified(store: &AuditStore, mut web: Sidecar) {
        let id = SpiffeId::parse(WEB).unwrap();
        let leaf = web.identity.chain()[0].to_vec();
        let first = web.batch(100);
        let got = store.ingest(&id, &leaf, &first).unwrap();
        assert_eq!(
            (got.stored, got.duplicates, got.durable_through),
            (100, 0, 100)
        );
        assert_eq!(got.breaks, []);
        // Sent again after a reconnection: stored once.
        let again = store.ingest(&id, &leaf, &first).unwrap();
        assert_eq!(
            (again.stored, again.duplicates, again.durable_through),
            (0, 100, 100)
        );
        let second = web.batch(50);
        assert_eq!(
            store.ingest(&id, &leaf, &second).unwrap().durable_through,
            150
        );
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            []
        );
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 40, 120, &any_signer)
                .unwrap(),
            []
        );

        // A fork (other bytes under a stored number) is refused and named.
        let mut forked = second.clone();
        forked.records[0][10] ^= 1;
        forked.checkpoints.clear();
        let got = store.ingest(&id, &leaf, &forked).unwrap();
        assert!(
            got.breaks.contains(&Break::Fork { seq: 101 }),
            "{:?}",
            got.breaks
        );

        // A gap on ingest (records lost on the way) is stored and named.
        web.seq += 5;
        let after_gap = web.batch(1);
        let got = store.ingest(&id, &leaf, &after_gap).unwrap();
        assert_eq!(got.stored, 1);
        assert!(
            got.breaks.contains(&Break::Chain(Damage::OutOfSequence {
                expected: 151,
                found: 156
            })),
            "{:?}",
            got.breaks
        );

        // A checkpoint signed for another head than the stored chain's, and a forged one:
        // named, and not kept.
        let wrong = [7u8; 32];
        let bad = Batch {
            chain: CHAIN.into(),
            records: vec![],
            checkpoints: vec![WireCheckpoint {
                seq: 100,
                head: wrong.to_vec(),
                signature: sign_checkpoint(&web.identity, 100, &wrong).unwrap(),
                signer: web.identity.chain()[0].to_vec(),
            }],
        };
        assert_eq!(
            store.ingest(&id, &leaf, &bad).unwrap().breaks,
            [Break::Chain(Damage::HeadMismatch { seq: 100 })]
        );
        let mut forged = bad.clone();
        forged.checkpoints[0].head = web.head.to_vec();
        let got = store.ingest(&id, &leaf, &forged).unwrap();
        assert!(
            matches!(
                &got.breaks[..],
                [Break::Chain(Damage::BadSignature { seq: 100, .. })]
            ),
            "{:?}",
            got.breaks
        );

        // Edited in the store afterwards: `verify_range` finds it.
        tamper(
            store,
            "UPDATE audit_records SET record = ?2 WHERE sidecar = ?1 AND seq = 42",
            &[Text(WEB), Bytes(&[0])],
        );
        tamper(
            store,
            "DELETE FROM audit_records WHERE sidecar = ?1 AND seq = 150",
            &[Text(WEB)],
        );
        let damage = store.verify_range(&id, CHAIN, 1, 150, &any_signer).unwrap();
        assert!(damage.contains(&Damage::Unlinked { seq: 43 }), "{damage:?}");
        assert!(
            damage.contains(&Damage::Truncated {
                last: 149,
                checkpoint: 150
            }),
            "{damage:?}"
        );
    }

    #[test]
    fn a_gap_the_sidecar_accounts_for_is_not_a_break_and_one_it_does_not_is() {
        for place in places("lost") {
            accounted_gaps(&place.open(), Sidecar::new(&Ca::new("example.org")));
        }
    }

    fn accounted_gaps(store: &AuditStore, mut web: Sidecar) {
        let id = SpiffeId::parse(WEB).unwrap();
        let leaf = web.identity.chain()[0].to_vec();
        store.ingest(&id, &leaf, &web.batch(100)).unwrap();
        // Records 101 to 180 lost in a full fail-open spool; the sidecar says so later.
        web.seq += 80;
        web.head = [9; 32];
        store.ingest(&id, &leaf, &web.batch(20)).unwrap();
        let damage = store
            .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
            .unwrap();
        assert_eq!(
            damage,
            [
                Damage::OutOfSequence {
                    expected: 101,
                    found: 181
                },
                Damage::Unlinked { seq: 181 }
            ]
        );
        // Two drops that meet, each said in a record of its own.
        let note = |from: u64, n: u64| Record {
            kind: Kind::Dropped as i32,
            dropped: n,
            dropped_from: from,
            ..Record::default()
        };
        let notes = web.batch_of(vec![note(141, 40), note(101, 40)]);
        store.ingest(&id, &leaf, &notes).unwrap();
        store.ingest(&id, &leaf, &web.batch(100)).unwrap();
        assert_eq!(store.lost(WEB, CHAIN).unwrap(), [101..=180]);
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            []
        );
        // A record deleted elsewhere is still a break, across the verifier's chunks.
        tamper(store, "DELETE FROM audit_records WHERE seq = 250", &[]);
        let broken = [
            Damage::OutOfSequence {
                expected: 250,
                found: 251,
            },
            Damage::Unlinked { seq: 251 },
        ];
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            broken
        );
        // A Dropped record no checkpoint vouches for (appended after the last one) accounts
        // for nothing; nor does one that comes before the range it names.
        let mut unvouched = web.batch_of(vec![note(250, 1)]);
        unvouched.checkpoints.clear();
        store.ingest(&id, &leaf, &unvouched).unwrap();
        let early = Record {
            seq: 249,
            ..note(250, 1)
        };
        tamper(
            store,
            "UPDATE audit_records SET kind = ?1, record = ?2 WHERE seq = 249",
            &[Int(Kind::Dropped as i64), Bytes(&early.encode_to_vec())],
        );
        assert_eq!(store.lost(WEB, CHAIN).unwrap(), [101..=180]);
    }

    #[test]
    fn retention_removes_the_oldest_records_and_what_is_kept_still_verifies() {
        for place in places("prune") {
            pruned(&place, Sidecar::new(&Ca::new("example.org")));
        }
        // Everything older: the last record stays, and the chain goes on from it.
        for place in places("prune-all") {
            let (store, mut web) = (place.open(), Sidecar::new(&Ca::new("example.org")));
            store.set_retention();
            let id = SpiffeId::parse(WEB).unwrap();
            store.ingest(&id, &leaf_of(&web), &web.batch(30)).unwrap();
            assert_eq!(store.prune(i64::MAX).unwrap(), 29);
            store.ingest(&id, &leaf_of(&web), &web.batch(5)).unwrap();
            assert_eq!(
                store
                    .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                    .unwrap(),
                []
            );
        }
    }

    fn pruned(place: &Place, mut web: Sidecar) {
        let store = place.open();
        store.set_retention();
        let id = SpiffeId::parse(WEB).unwrap();
        let leaf = web.identity.chain()[0].to_vec();
        store.ingest(&id, &leaf, &web.batch(100)).unwrap();
        // Record n has time 1.8e18 + n: keep from record 40 on.
        let cutoff = 1_800_000_000_000_000_000 + 40;
        assert_eq!(store.prune(cutoff).unwrap(), 39);
        assert_eq!(store.prune(cutoff).unwrap(), 0, "nothing more to remove");
        assert_eq!(store.pruned_through(WEB, CHAIN).unwrap(), Some(39));
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            []
        );
        // A batch sent again after the cut: its removed records count as duplicates.
        let again = web.sent_again(30, 45);
        let got = store.ingest(&id, &leaf, &again).unwrap();
        assert_eq!((got.stored, got.duplicates, got.breaks), (0, 16, vec![]));
        store.ingest(&id, &leaf, &web.batch(50)).unwrap();
        assert_eq!(
            store
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            []
        );
        assert_eq!(store.chains().unwrap()[0].2, 150 - 39);
        // A control plane without retention honours no cut: the missing start is a break.
        let without = place.open();
        assert_eq!(
            without
                .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap()[0],
            Damage::OutOfSequence {
                expected: 1,
                found: 40
            }
        );
        // A record deleted among those kept is still a break.
        tamper(&store, "DELETE FROM audit_records WHERE seq = 60", &[]);
        let damage = store
            .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
            .unwrap();
        assert!(
            damage.contains(&Damage::OutOfSequence {
                expected: 60,
                found: 61
            }),
            "{damage:?}"
        );
    }

    /// Batches as a reconnecting sidecar sends them: records sent again before new ones, one
    /// twice in a batch, 111 rows (statements of 100, 10 and 1), and a record numbered out
    /// of range among records sent again.
    #[test]
    fn a_batch_mixing_records_sent_again_new_ones_and_a_bad_one_stores_each_once() {
        for place in places("mixed") {
            let (store, mut web) = (place.open(), Sidecar::new(&Ca::new("example.org")));
            let id = SpiffeId::parse(WEB).unwrap();
            let leaf = leaf_of(&web);
            let got = store.ingest(&id, &leaf, &web.batch(111)).unwrap();
            assert_eq!(
                (got.stored, got.durable_through, got.breaks),
                (111, 111, vec![])
            );
            let next = web.batch(39);
            let mut mixed = web.sent_again(50, 111);
            mixed.records.push(next.records[0].clone());
            mixed.records.extend(next.records.iter().cloned());
            mixed.checkpoints = next.checkpoints.clone();
            let got = store.ingest(&id, &leaf, &mixed).unwrap();
            assert_eq!(
                (got.stored, got.duplicates, got.durable_through, got.breaks),
                (39, 63, 150, vec![])
            );
            let mut with_bad = web.sent_again(140, 150);
            let bad = Record {
                seq: u64::MAX,
                ..Record::default()
            };
            with_bad.records.push(bad.encode_to_vec());
            let got = store.ingest(&id, &leaf, &with_bad).unwrap();
            assert_eq!(
                (got.stored, got.duplicates, got.durable_through),
                (0, 11, 150)
            );
            assert!(
                matches!(&got.breaks[..], [Break::Undecodable { index: 11, .. }]),
                "{:?}",
                got.breaks
            );
            assert_eq!(store.chains().unwrap()[0].2, 150);
            assert_eq!(
                store
                    .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                    .unwrap(),
                []
            );
        }
    }

    #[test]
    fn the_latest_checkpoint_kept_elsewhere_names_a_tail_cut_with_its_checkpoints() {
        for place in places("witness") {
            let (store, mut web) = (place.open(), Sidecar::new(&Ca::new("example.org")));
            let id = SpiffeId::parse(WEB).unwrap();
            store.ingest(&id, &leaf_of(&web), &web.batch(50)).unwrap();
            store.ingest(&id, &leaf_of(&web), &web.batch(50)).unwrap();
            let taken = store.take_witnesses();
            assert_eq!(taken.len(), 1, "{taken:?}");
            let w = taken[0].clone();
            assert_eq!(
                (w.sidecar.as_str(), w.chain.as_str(), w.seq),
                (WEB, CHAIN, 100)
            );
            assert_eq!(w.head, web.head);
            assert_eq!(Witness::parse(WEB, CHAIN, &w.value()), Some(w.clone()));
            assert!(store.take_witnesses().is_empty(), "taken once");
            // Not kept elsewhere: taken again.
            store.untake_witnesses(taken);
            assert_eq!(store.take_witnesses(), std::slice::from_ref(&w));
            assert_eq!(store.witness_break(&w).unwrap(), None);

            tamper(&store, "DELETE FROM audit_checkpoints WHERE seq > 90", &[]);
            tamper(&store, "DELETE FROM audit_records WHERE seq > 90", &[]);
            assert_eq!(
                store
                    .verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                    .unwrap(),
                [],
                "the store alone cannot tell"
            );
            let why = store.witness_break(&w).unwrap().expect("named");
            assert!(why.contains("the records end at 90"), "{why}");
            let changed = Witness {
                seq: 50,
                ..w.clone()
            };
            let why = store.witness_break(&changed).unwrap().expect("named");
            assert!(why.contains("record 50 differs"), "{why}");
            let gone = Witness {
                chain: "fe".into(),
                ..w
            };
            let why = store.witness_break(&gone).unwrap().expect("named");
            assert!(why.starts_with("no record is stored"), "{why}");
        }
    }

    /// Two replicas on one PostgreSQL ingesting the same chain at once (a sidecar that moved
    /// while its old stream was still being served): each record stored once, none a break.
    #[test]
    fn two_stores_on_one_postgresql_ingesting_one_chain_at_once_store_each_record_once() {
        let dir = sigil_e2e::TempDir::new("audit-pg-race");
        let Some(pg) = sigil_e2e::PgServer::start(dir.path(), "two stores on one PostgreSQL")
        else {
            return;
        };
        let place = Place { pg: Some(pg), dir };
        let (one, two) = (place.open(), place.open());
        let mut web = Sidecar::new(&Ca::new("example.org"));
        let id = SpiffeId::parse(WEB).unwrap();
        let leaf = leaf_of(&web);
        let batches: Vec<Batch> = (0..20).map(|_| web.batch(25)).collect();
        let stored: usize = std::thread::scope(|s| {
            let both = [&one, &two].map(|store| {
                s.spawn(|| {
                    let mut stored = 0;
                    for b in &batches {
                        let got = store.ingest(&id, &leaf, b).unwrap();
                        assert_eq!(got.breaks, [], "{got:?}");
                        stored += got.stored;
                    }
                    stored
                })
            });
            both.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(stored, 500);
        assert_eq!(two.chains().unwrap()[0].2, 500);
        assert_eq!(
            one.verify_range(&id, CHAIN, 1, u64::MAX, &any_signer)
                .unwrap(),
            []
        );
    }

    fn leaf_of(s: &Sidecar) -> Vec<u8> {
        s.identity.chain()[0].to_vec()
    }
}
