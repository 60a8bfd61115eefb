//! Where `sigil-control` keeps resources: the embedded SQLite file of `--data-dir` (one
//! replica), or etcd (`--store etcd://…`, several replicas sharing state). Either way each
//! resource is the document the operator applied, and the whole set has a version that grows
//! with every change: the snapshot version sidecars acknowledge.

use crate::etcd::Etcd;
use crate::sqlite::Sqlite;
use crate::stored::{Change, IssuanceRecord, StoreError, Stored, TokenRecord, TokenUse, Witness};

pub enum Store {
    Sqlite(Sqlite),
    /// Boxed: etcd-client's client is a few KB.
    Etcd(Box<Etcd>),
}

impl Store {
    /// The version of the whole set.
    pub async fn version(&self) -> Result<i64, StoreError> {
        match self {
            Self::Sqlite(s) => s.version(),
            Self::Etcd(e) => e.version().await,
        }
    }

    /// Applies documents `(kind, name, yaml)` all or nothing; a dry run writes nothing.
    /// Returns what each did and the set's version after it.
    pub async fn apply(
        &self,
        docs: &[(&str, &str, &str)],
        dry_run: bool,
    ) -> Result<(Vec<Change>, i64), StoreError> {
        match self {
            Self::Sqlite(s) => s.apply(docs, dry_run),
            Self::Etcd(e) => e.apply(docs, dry_run).await,
        }
    }

    /// Every resource (of `kind`), ordered by kind and name.
    pub async fn list(&self, kind: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        match self {
            Self::Sqlite(s) => s.list(kind),
            Self::Etcd(e) => e.list(kind).await,
        }
    }

    /// Deletes one resource; false if there was none.
    pub async fn delete(&self, kind: &str, name: &str) -> Result<bool, StoreError> {
        match self {
            Self::Sqlite(s) => s.delete(kind, name),
            Self::Etcd(e) => e.delete(kind, name).await,
        }
    }

    /// Keeps issuance records for the audit stream (`IssuanceRecord`); old ones leave.
    pub async fn append_issuances(
        &self,
        records: &[IssuanceRecord],
        now: i64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.append_issuances(records, now),
            Self::Etcd(e) => e.append_issuances(records, now).await,
        }
    }

    /// Keeps the latest checkpoint of each audit chain given (`Witness`).
    pub async fn put_witnesses(&self, witnesses: &[Witness]) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.put_witnesses(witnesses),
            Self::Etcd(e) => e.put_witnesses(witnesses).await,
        }
    }

    /// Every audit chain's witness.
    pub async fn witnesses(&self) -> Result<Vec<Witness>, StoreError> {
        match self {
            Self::Sqlite(s) => s.witnesses(),
            Self::Etcd(e) => e.witnesses().await,
        }
    }

    /// Issuance records from `since` (Unix seconds) on, oldest first, at most `limit`.
    pub async fn list_issuances(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<IssuanceRecord>, StoreError> {
        match self {
            Self::Sqlite(s) => s.list_issuances(since, limit),
            Self::Etcd(e) => e.list_issuances(since, limit).await,
        }
    }

    /// Keeps a new join token under `hash` (its SHA-256, hex).
    pub async fn create_token(
        &self,
        hash: &str,
        record: &TokenRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.create_token(hash, record, now),
            Self::Etcd(e) => e.create_token(hash, record, now).await,
        }
    }

    /// What taking the join token of `hash` at `now` would come to, without taking it.
    pub async fn peek_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        match self {
            Self::Sqlite(s) => s.peek_token(hash, now),
            Self::Etcd(e) => e.peek_token(hash, now).await,
        }
    }

    /// Takes the join token of `hash` at `now`: at most once ever, whichever replica asks.
    pub async fn use_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        match self {
            Self::Sqlite(s) => s.use_token(hash, now),
            Self::Etcd(e) => e.use_token(hash, now).await,
        }
    }

    /// The store's epoch: versions are compared only within one.
    pub fn epoch(&self) -> &str {
        match self {
            Self::Sqlite(s) => s.epoch(),
            Self::Etcd(e) => e.epoch(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(s) => s.describe(),
            Self::Etcd(e) => e.describe(),
        }
    }
}
