//! The embedded store of `sigil-control --data-dir DIR`: one SQLite file (`DIR/sigil.db`),
//! one row per resource holding the document the operator applied, and a version that grows
//! with every change (the snapshot version sidecars acknowledge), counted within an epoch: a
//! random ID made with the file, so that a new file's versions, which start again, are never
//! compared with the old one's.
//!
//! One process at a time: `DIR/sigil.lock` is locked for as long as `sigil-control` runs. Two
//! control planes on one directory would each publish from their own catalog, and neither
//! would hear of the other's changes.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::stored::{
    take, Change, IssuanceRecord, StoreError, Stored, TokenRecord, TokenUse, Witness,
    ISSUANCE_RETENTION_SECS,
};

pub struct Sqlite {
    db: Mutex<Connection>,
    path: std::path::PathBuf,
    epoch: String,
    /// Holds the directory's lock until the store is dropped.
    _lock: File,
}

impl Sqlite {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        let path = dir.join("sigil.db");
        let db = Connection::open(&path)?;
        // WAL: a crash mid-write never leaves a half-applied set behind.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS resources (
                 kind TEXT NOT NULL, name TEXT NOT NULL, yaml TEXT NOT NULL,
                 version INTEGER NOT NULL, PRIMARY KEY (kind, name));
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
             CREATE TABLE IF NOT EXISTS epoch (id TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS join_tokens (
                 hash TEXT PRIMARY KEY, workload TEXT NOT NULL,
                 expires_at INTEGER NOT NULL, used_at INTEGER);
             CREATE TABLE IF NOT EXISTS issuances (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, record TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS issuances_at ON issuances (at);
             CREATE TABLE IF NOT EXISTS audit_witnesses (
                 sidecar TEXT NOT NULL, chain TEXT NOT NULL, value TEXT NOT NULL,
                 PRIMARY KEY (sidecar, chain));",
        )?;
        let fresh = format!("sqlite-{}", crate::stored::random_hex(16));
        db.execute(
            "INSERT INTO epoch (id) SELECT ?1 WHERE NOT EXISTS (SELECT 1 FROM epoch)",
            [&fresh],
        )?;
        let epoch: String = db.query_row("SELECT id FROM epoch", [], |r| r.get(0))?;
        Ok(Self {
            db: Mutex::new(db),
            path,
            epoch,
            _lock: lock,
        })
    }

    /// The store's epoch: made with the file, kept for its life.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    /// The version of the whole set: bumped once per apply or delete that changes anything.
    pub fn version(&self) -> Result<i64, StoreError> {
        let db = self.db.lock().expect("store lock");
        Ok(
            db.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })?,
        )
    }

    /// Applies documents `(kind, name, yaml)` in one transaction; a dry run rolls it back.
    pub fn apply(
        &self,
        docs: &[(&str, &str, &str)],
        dry_run: bool,
    ) -> Result<(Vec<Change>, i64), StoreError> {
        let mut db = self.db.lock().expect("store lock");
        let tx = db.transaction()?;
        let version: i64 =
            tx.query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| {
                r.get(0)
            })?;
        let next = version + 1;
        let mut changes = Vec::with_capacity(docs.len());
        for (kind, name, yaml) in docs {
            let old: Option<String> = tx
                .query_row(
                    "SELECT yaml FROM resources WHERE kind = ?1 AND name = ?2",
                    params![kind, name],
                    |r| r.get(0),
                )
                .optional()?;
            let change = match old {
                None => Change::Created,
                Some(o) if o == *yaml => Change::Unchanged,
                Some(_) => Change::Updated,
            };
            if change != Change::Unchanged {
                tx.execute(
                    "INSERT INTO resources (kind, name, yaml, version) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind, name) DO UPDATE SET yaml = ?3, version = ?4",
                    params![kind, name, yaml, next],
                )?;
            }
            changes.push(change);
        }
        let changed = changes.iter().any(|c| *c != Change::Unchanged);
        if changed {
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'version'", [next])?;
        }
        if dry_run {
            tx.rollback()?;
            return Ok((changes, version));
        }
        tx.commit()?;
        Ok((changes, if changed { next } else { version }))
    }

    /// Keeps a new join token (by its hash). Tokens expired a day ago are dropped meanwhile.
    pub fn create_token(
        &self,
        hash: &str,
        record: &TokenRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        let db = self.db.lock().expect("store lock");
        db.execute(
            "DELETE FROM join_tokens WHERE expires_at < ?1",
            [now - 86_400],
        )?;
        db.execute(
            "INSERT INTO join_tokens (hash, workload, expires_at, used_at) VALUES (?1, ?2, ?3, NULL)",
            params![hash, record.workload, record.expires_at],
        )?;
        Ok(())
    }

    /// Keeps issuance records, all in one transaction; those past the retention leave.
    pub fn append_issuances(&self, records: &[IssuanceRecord], now: i64) -> Result<(), StoreError> {
        let mut db = self.db.lock().expect("store lock");
        let tx = db.transaction()?;
        tx.execute(
            "DELETE FROM issuances WHERE at < ?1",
            [now - ISSUANCE_RETENTION_SECS],
        )?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO issuances (at, record) VALUES (?1, ?2)")?;
            for r in records {
                insert.execute(params![r.at, r.encode()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Keeps the latest checkpoint of each chain given (`Witness`), all in one transaction.
    pub fn put_witnesses(&self, witnesses: &[Witness]) -> Result<(), StoreError> {
        let mut db = self.db.lock().expect("store lock");
        let tx = db.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO audit_witnesses (sidecar, chain, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sidecar, chain) DO UPDATE SET value = excluded.value
                 WHERE excluded.value > audit_witnesses.value",
            )?;
            for w in witnesses {
                put.execute(params![w.sidecar, w.chain, w.value()])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every chain's witness.
    pub fn witnesses(&self) -> Result<Vec<Witness>, StoreError> {
        let db = self.db.lock().expect("store lock");
        let mut q = db.prepare("SELECT sidecar, chain, value FROM audit_witnesses")?;
        let rows = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (sidecar, chain, value) = row?;
            out.push(Witness::parse(&sidecar, &chain, &value).ok_or_else(|| {
                StoreError::Corrupt(format!("audit witness {sidecar} {chain}: {value}"))
            })?);
        }
        Ok(out)
    }

    /// Issuance records from `since` (Unix seconds) on, oldest first, at most `limit`.
    pub fn list_issuances(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<IssuanceRecord>, StoreError> {
        let db = self.db.lock().expect("store lock");
        let mut q =
            db.prepare("SELECT record FROM issuances WHERE at >= ?1 ORDER BY seq LIMIT ?2")?;
        let rows = q.query_map(params![since, limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            let line = row?;
            out.push(
                IssuanceRecord::decode(&line)
                    .ok_or_else(|| StoreError::Corrupt(format!("issuances: {line}")))?,
            );
        }
        Ok(out)
    }

    /// What taking a join token at `now` would come to (`stored::take`), taking nothing.
    pub fn peek_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        let db = self.db.lock().expect("store lock");
        let record = token_record(&db, hash)?;
        Ok(record.map_or(TokenUse::Unknown, |r| take(&r, now).0))
    }

    /// Takes a join token at `now`, at most once ever (`stored::take`), in one transaction.
    pub fn use_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        let mut db = self.db.lock().expect("store lock");
        let tx = db.transaction()?;
        let record = token_record(&tx, hash)?;
        let Some(record) = record else {
            return Ok(TokenUse::Unknown);
        };
        let (outcome, after) = take(&record, now);
        if let Some(after) = after {
            tx.execute(
                "UPDATE join_tokens SET used_at = ?1 WHERE hash = ?2",
                params![after.used_at, hash],
            )?;
            tx.commit()?;
        }
        Ok(outcome)
    }

    pub fn list(&self, kind: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let db = self.db.lock().expect("store lock");
        let mut stmt = db.prepare(
            "SELECT kind, name, yaml, version FROM resources
             WHERE ?1 IS NULL OR kind = ?1 ORDER BY kind, name",
        )?;
        let rows = stmt.query_map([kind], |r| {
            Ok(Stored {
                kind: r.get(0)?,
                name: r.get(1)?,
                yaml: r.get(2)?,
                version: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes one resource; false if there was none. The set's version grows.
    pub fn delete(&self, kind: &str, name: &str) -> Result<bool, StoreError> {
        let mut db = self.db.lock().expect("store lock");
        let tx = db.transaction()?;
        let n = tx.execute(
            "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
            params![kind, name],
        )?;
        if n > 0 {
            tx.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'version'",
                [],
            )?;
        }
        tx.commit()?;
        Ok(n > 0)
    }
}

/// Locks `dir/sigil.lock` for this process, or says which process holds it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("sigil.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::InUse {
                dir: dir.to_path_buf(),
                lock: path,
                holder: (!holder.is_empty()).then(|| holder.to_string()),
            });
        }
        Err(std::fs::TryLockError::Error(source)) => return Err(StoreError::Lock { path, source }),
    }
    // Who holds it, for the message above; the lock, not this text, is what counts.
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(f)
}

/// The join token record under `hash`, if any (in a transaction or not).
fn token_record(db: &Connection, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
    let record = db
        .query_row(
            "SELECT workload, expires_at, used_at FROM join_tokens WHERE hash = ?1",
            [hash],
            |r| {
                Ok(TokenRecord {
                    workload: r.get(0)?,
                    expires_at: r.get(1)?,
                    used_at: r.get(2)?,
                })
            },
        )
        .optional()?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_witnesses_are_kept_one_per_chain_the_latest_checkpoint_winning() {
        let dir = std::env::temp_dir().join(format!("sigil-witness-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Sqlite::open(&dir).unwrap();
        let w = |chain: &str, seq: u64| Witness {
            sidecar: "spiffe://example.org/a".into(),
            chain: chain.into(),
            seq,
            head: [seq as u8; 32],
        };
        s.put_witnesses(&[w("01", 10), w("02", 5)]).unwrap();
        s.put_witnesses(&[w("01", 20)]).unwrap();
        // Late with an older one: the newer stays.
        s.put_witnesses(&[w("01", 9)]).unwrap();
        let mut got = s.witnesses().unwrap();
        got.sort_by(|a, b| a.chain.cmp(&b.chain));
        assert_eq!(got, [w("01", 20), w("02", 5)]);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn apply_reports_changes_versions_and_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("sigil-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = Sqlite::open(&dir).unwrap();
            assert_eq!(s.version().unwrap(), 0);
            let (c, v) = s
                .apply(&[("Policy", "a", "x: 1"), ("Workload", "w", "y: 1")], false)
                .unwrap();
            assert_eq!((c, v), (vec![Change::Created, Change::Created], 1));
            // Dry run: reported, not written.
            let (c, v) = s.apply(&[("Policy", "a", "x: 2")], true).unwrap();
            assert_eq!((c, v), (vec![Change::Updated], 1));
            assert_eq!(s.list(Some("Policy")).unwrap()[0].yaml, "x: 1");
            let (c, v) = s.apply(&[("Policy", "a", "x: 1")], false).unwrap();
            assert_eq!((c, v), (vec![Change::Unchanged], 1));
            let (c, v) = s.apply(&[("Policy", "a", "x: 2")], false).unwrap();
            assert_eq!((c, v), (vec![Change::Updated], 2));
            assert!(s.delete("Workload", "w").unwrap());
            assert!(!s.delete("Workload", "w").unwrap());
            assert_eq!(s.version().unwrap(), 3);
        }
        let s = Sqlite::open(&dir).unwrap();
        assert_eq!(s.version().unwrap(), 3);
        // The epoch is made once, with the file.
        let epoch = s.epoch().to_string();
        assert!(
            epoch.starts_with("sqlite-") && epoch.len() == 7 + 32,
            "{epoch}"
        );
        // A second store on the same directory is refused while this one is open.
        let err = match Sqlite::open(&dir) {
            Ok(_) => panic!("two stores opened one directory"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("in use by process") && err.contains("--data-dir"),
            "{err}"
        );
        drop(s);
        let s = Sqlite::open(&dir).unwrap();
        assert_eq!(s.epoch(), epoch);
        // Another file, another epoch.
        let other = dir.join("other");
        assert_ne!(Sqlite::open(&other).unwrap().epoch(), epoch);
        let all = s.list(None).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            (all[0].kind.as_str(), all[0].yaml.as_str(), all[0].version),
            ("Policy", "x: 2", 2)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
