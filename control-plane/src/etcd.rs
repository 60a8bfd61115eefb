//! The etcd store (`--store etcd://host:port[,host:port…][/prefix]`): several `sigil-control`
//! replicas share one set of resources. Keys under the prefix (default `/sigil/`):
//!
//! - `resources/<Kind>/<name>`: the document as applied; its mod_revision is its version;
//! - `version`: rewritten by every change, so that its mod_revision is the set's version (an
//!   etcd revision, the same number on every replica);
//! - `epoch`: a random ID written by the first replica; with etcd's cluster ID it names the
//!   store whose revisions the versions count (see `sigil_api::Snapshot`);
//! - `status/<replica>`: each replica's connected sidecars, under a lease, so that `sigil
//!   status` on any replica lists the sidecars of all of them.
//!
//! Writes are transactions guarded by the mod_revisions read just before (optimistic
//! concurrency): two replicas applying at once never lose a change or misreport one. Each
//! replica follows the prefix with a watch and republishes snapshots on any change, wherever
//! it was made.
//!
//! etcd is spoken to over TLS with a client certificate (`--etcd-ca`, `--etcd-cert`,
//! `--etcd-key`; etcd started with `--client-cert-auth`): whoever can write these keys
//! decides every sidecar's policies and revocations. Plaintext needs `--etcd-insecure`, and
//! is warned about at start.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp,
};

use tracing::warn;

use crate::stored::{
    take, Change, IssuanceRecord, StoreError, Stored, TokenRecord, TokenUse, Witness,
    ISSUANCE_RETENTION_SECS,
};

/// Attempts of an optimistic transaction before giving up (another replica kept winning).
const ATTEMPTS: usize = 8;

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
    epoch: String,
    /// The lease issuance records are put under, and when it was granted (Unix seconds):
    /// one a day rather than one a batch.
    records_lease: std::sync::Arc<tokio::sync::Mutex<Option<(i64, i64)>>>,
}

/// How `sigil-control` reaches etcd.
pub enum EtcdTls {
    /// TLS: etcd's certificate must chain to `ca`; we present `cert` and `key`.
    Mutual {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// Plaintext (`--etcd-insecure`).
    Insecure,
}

impl EtcdTls {
    fn options(&self) -> Result<Option<TlsOptions>, StoreError> {
        let Self::Mutual { ca, cert, key } = self else {
            return Ok(None);
        };
        let read = |flag: &'static str, p: &PathBuf| {
            std::fs::read(p).map_err(|source| StoreError::EtcdFile {
                flag,
                path: p.clone(),
                source,
            })
        };
        let (ca_pem, cert_pem, key_pem) = (
            read("--etcd-ca", ca)?,
            read("--etcd-cert", cert)?,
            read("--etcd-key", key)?,
        );
        for (flag, path, pem, label) in [
            ("--etcd-ca", ca, &ca_pem, "CERTIFICATE"),
            ("--etcd-cert", cert, &cert_pem, "CERTIFICATE"),
            ("--etcd-key", key, &key_pem, "PRIVATE KEY"),
        ] {
            // tonic would only fail at the first connection, naming neither file.
            if !String::from_utf8_lossy(pem).contains(&format!("{label}-----")) {
                return Err(StoreError::EtcdPem {
                    flag,
                    path: path.clone(),
                    label,
                });
            }
        }
        Ok(Some(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .identity(Identity::from_pem(cert_pem, key_pem)),
        ))
    }
}

impl Etcd {
    /// `spec`: what follows `etcd://`: endpoints separated by commas, then an optional `/prefix`.
    pub async fn connect(spec: &str, tls: &EtcdTls) -> Result<Self, StoreError> {
        let (hosts, prefix) = match spec.split_once('/') {
            Some((h, p)) if !p.is_empty() => (h, format!("/{}/", p.trim_matches('/'))),
            Some((h, _)) => (h, "/sigil/".to_string()),
            None => (spec, "/sigil/".to_string()),
        };
        let tls = tls.options()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}"))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::EtcdSpec(spec.to_string()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|source| StoreError::EtcdConnect {
                endpoints: endpoints.join(","),
                source,
            })?;
        let mut e = Self {
            client,
            endpoints,
            prefix,
            epoch: String::new(),
            records_lease: Default::default(),
        };
        // Fail at start, not at the first request, if etcd does not answer.
        e.version().await?;
        e.epoch = e.read_epoch().await?;
        Ok(e)
    }

    /// `etcd-<cluster ID>-<random>`: the random part is written once under the prefix by
    /// whichever replica comes first, so every replica of one store agrees, and an emptied
    /// or rebuilt etcd (whose revisions start again) gets a new one even if it kept its
    /// cluster ID.
    async fn read_epoch(&self) -> Result<String, StoreError> {
        let key = format!("{}epoch", self.prefix);
        let mut client = self.client.clone();
        let fresh = crate::stored::random_hex(16);
        let r = client
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), fresh, None)]),
            )
            .await?;
        let cluster = r.header().map_or(0, |h| h.cluster_id());
        let got = client.get(key.as_str(), None).await?;
        let random = got
            .kvs()
            .first()
            .map(|kv| kv.value_str().map(str::to_owned))
            .transpose()?
            .ok_or_else(|| StoreError::EpochVanished(key.clone()))?;
        Ok(format!("etcd-{cluster:016x}-{random}"))
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}resources/{kind}/{name}", self.prefix)
    }

    fn version_key(&self) -> String {
        format!("{}version", self.prefix)
    }

    pub async fn version(&self) -> Result<i64, StoreError> {
        let r = self.client.clone().get(self.version_key(), None).await?;
        Ok(r.kvs().first().map_or(0, |kv| kv.mod_revision()))
    }

    pub async fn apply(
        &self,
        docs: &[(&str, &str, &str)],
        dry_run: bool,
    ) -> Result<(Vec<Change>, i64), StoreError> {
        let mut client = self.client.clone();
        for _ in 0..ATTEMPTS {
            let version = self.version().await?;
            let mut guards = Vec::with_capacity(docs.len());
            let mut puts = Vec::new();
            let mut changes = Vec::with_capacity(docs.len());
            for (kind, name, yaml) in docs {
                let key = self.key(kind, name);
                let r = client.get(key.as_str(), None).await?;
                let change = match r.kvs().first() {
                    None => {
                        guards.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                        Change::Created
                    }
                    Some(kv) => {
                        guards.push(Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ));
                        if kv.value() == yaml.as_bytes() {
                            Change::Unchanged
                        } else {
                            Change::Updated
                        }
                    }
                };
                if change != Change::Unchanged {
                    puts.push(TxnOp::put(key, *yaml, None));
                }
                changes.push(change);
            }
            if dry_run || puts.is_empty() {
                return Ok((changes, version));
            }
            puts.push(TxnOp::put(self.version_key(), "", None));
            let r = client.txn(Txn::new().when(guards).and_then(puts)).await?;
            if r.succeeded() {
                let revision = r.header().map_or(version, |h| h.revision());
                return Ok((changes, revision));
            }
            // Another replica changed one of these resources in between: read again.
        }
        Err(StoreError::Conflicts(ATTEMPTS))
    }

    fn token_key(&self, hash: &str) -> String {
        format!("{}tokens/{hash}", self.prefix)
    }

    /// Keeps a new join token (by its hash), leased to expire from etcd a day after it does.
    pub async fn create_token(
        &self,
        hash: &str,
        record: &TokenRecord,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let ttl = (record.expires_at - now).max(0) + 86_400;
        let lease = client.lease_grant(ttl, None).await?;
        let key = self.token_key(hash);
        let put = TxnOp::put(
            key.as_str(),
            record.encode(),
            Some(PutOptions::new().with_lease(lease.id())),
        );
        let created = Compare::create_revision(key.as_str(), CompareOp::Equal, 0);
        client
            .txn(Txn::new().when([created]).and_then([put]))
            .await?;
        Ok(())
    }

    /// Keeps issuance records under `issuances/<at, 12 digits>-<random>`, leased to leave
    /// etcd after the retention; one lease for the lot, one transaction per 100 (etcd takes
    /// 128 operations in one by default).
    pub async fn append_issuances(
        &self,
        records: &[IssuanceRecord],
        now: i64,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut client = self.client.clone();
        // A record lives at least the retention, at most a day longer.
        let lease = {
            let mut held = self.records_lease.lock().await;
            match *held {
                Some((id, granted)) if now - granted < 86_400 => id,
                _ => {
                    let ttl = ISSUANCE_RETENTION_SECS + 86_400;
                    let id = client.lease_grant(ttl, None).await?.id();
                    *held = Some((id, now));
                    id
                }
            }
        };
        for chunk in records.chunks(100) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|r| {
                    let key = format!(
                        "{}issuances/{:012}-{}",
                        self.prefix,
                        r.at.max(0),
                        crate::stored::random_hex(6)
                    );
                    TxnOp::put(
                        key.as_str(),
                        r.encode(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            if let Err(e) = client.txn(Txn::new().and_then(puts)).await {
                // The lease may be what failed (gone from etcd): a new one next time.
                *self.records_lease.lock().await = None;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Keeps the latest checkpoint of each chain given (`Witness`) under
    /// `audit-witness/<chain>/<sidecar>`, unless the value there is already a later one (put
    /// by another replica the chain moved to): one nested transaction per witness, 40 to a
    /// request (etcd takes 128 operations in one by default). Not leased: a chain that ended
    /// long ago is as open to a cut tail as a live one.
    pub async fn put_witnesses(&self, witnesses: &[Witness]) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        for chunk in witnesses.chunks(40) {
            let each: Vec<TxnOp> = chunk
                .iter()
                .map(|w| {
                    let key = format!("{}audit-witness/{}/{}", self.prefix, w.chain, w.sidecar);
                    let value = w.value();
                    let put = TxnOp::put(key.as_str(), value.as_str(), None);
                    let newer = Txn::new()
                        .when([Compare::value(
                            key.as_str(),
                            CompareOp::Less,
                            value.as_str(),
                        )])
                        .and_then([put.clone()]);
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                            .and_then([put])
                            .or_else([TxnOp::txn(newer)]),
                    )
                })
                .collect();
            client.txn(Txn::new().and_then(each)).await?;
        }
        Ok(())
    }

    /// Every chain's witness.
    pub async fn witnesses(&self) -> Result<Vec<Witness>, StoreError> {
        let base = format!("{}audit-witness/", self.prefix);
        let r = self
            .client
            .clone()
            .get(base.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        r.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                key.strip_prefix(&base)
                    .and_then(|rest| rest.split_once('/'))
                    .zip(std::str::from_utf8(kv.value()).ok())
                    .and_then(|((chain, sidecar), value)| Witness::parse(sidecar, chain, value))
                    .ok_or_else(|| StoreError::Corrupt(key.to_string()))
            })
            .collect()
    }

    /// Issuance records from `since` (Unix seconds) on, oldest first, at most `limit`.
    pub async fn list_issuances(
        &self,
        since: i64,
        limit: usize,
    ) -> Result<Vec<IssuanceRecord>, StoreError> {
        let base = format!("{}issuances/", self.prefix);
        let from = format!("{base}{:012}", since.max(0));
        // Everything from `from` to the end of the `issuances/` keys.
        let mut end = base.into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let r = self
            .client
            .clone()
            .get(
                from.as_str(),
                Some(
                    GetOptions::new()
                        .with_range(end)
                        .with_limit(limit as i64)
                        .with_sort(SortTarget::Key, SortOrder::Ascend),
                ),
            )
            .await?;
        r.kvs()
            .iter()
            .map(|kv| {
                std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(IssuanceRecord::decode)
                    .ok_or_else(|| StoreError::Corrupt(String::from_utf8_lossy(kv.key()).into()))
            })
            .collect()
    }

    /// What taking a join token at `now` would come to, taking nothing.
    pub async fn peek_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        let key = self.token_key(hash);
        let r = self.client.clone().get(key.as_str(), None).await?;
        let Some(kv) = r.kvs().first() else {
            return Ok(TokenUse::Unknown);
        };
        let record = std::str::from_utf8(kv.value())
            .ok()
            .and_then(TokenRecord::decode)
            .ok_or(StoreError::Corrupt(key))?;
        Ok(take(&record, now).0)
    }

    /// Takes a join token at `now`, at most once ever across every replica: the record is
    /// rewritten only if nobody changed it since it was read.
    pub async fn use_token(&self, hash: &str, now: i64) -> Result<TokenUse, StoreError> {
        let mut client = self.client.clone();
        let key = self.token_key(hash);
        for _ in 0..ATTEMPTS {
            let r = client.get(key.as_str(), None).await?;
            let Some(kv) = r.kvs().first() else {
                return Ok(TokenUse::Unknown);
            };
            let record = std::str::from_utf8(kv.value())
                .ok()
                .and_then(TokenRecord::decode)
                .ok_or_else(|| StoreError::Corrupt(key.clone()))?;
            let (outcome, after) = take(&record, now);
            let Some(after) = after else {
                return Ok(outcome);
            };
            let unchanged =
                Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            // Kept under the same lease, so it still leaves etcd in time.
            let put = TxnOp::put(
                key.as_str(),
                after.encode(),
                Some(PutOptions::new().with_lease(kv.lease())),
            );
            let r = client
                .txn(Txn::new().when([unchanged]).and_then([put]))
                .await?;
            if r.succeeded() {
                return Ok(outcome);
            }
            // Another replica wrote it in between: read what it did.
        }
        Err(StoreError::Conflicts(ATTEMPTS))
    }

    pub async fn list(&self, kind: Option<&str>) -> Result<Vec<Stored>, StoreError> {
        let base = format!("{}resources/", self.prefix);
        let from = match kind {
            Some(k) => format!("{base}{k}/"),
            None => base.clone(),
        };
        let r = self
            .client
            .clone()
            .get(from, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Vec::with_capacity(r.kvs().len());
        for kv in r.kvs() {
            let key = kv.key_str()?;
            let Some((kind, name)) = key.strip_prefix(&base).and_then(|k| k.split_once('/')) else {
                continue;
            };
            out.push(Stored {
                kind: kind.to_string(),
                name: name.to_string(),
                yaml: kv.value_str()?.to_string(),
                version: kv.mod_revision(),
            });
        }
        out.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
        Ok(out)
    }

    pub async fn delete(&self, kind: &str, name: &str) -> Result<bool, StoreError> {
        let key = self.key(kind, name);
        let r = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(
                        key.as_str(),
                        CompareOp::Greater,
                        0,
                    )])
                    .and_then([
                        TxnOp::delete(key.as_str(), None),
                        TxnOp::put(self.version_key(), "", None),
                    ]),
            )
            .await?;
        Ok(r.succeeded())
    }

    /// Every replica's status text, by replica name.
    pub async fn statuses(&self) -> Result<Vec<(String, String)>, StoreError> {
        let base = format!("{}status/", self.prefix);
        let r = self
            .client
            .clone()
            .get(base.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Vec::new();
        for kv in r.kvs() {
            let key = kv.key_str()?;
            let name = key.strip_prefix(&base).unwrap_or(key).to_string();
            out.push((name, kv.value_str()?.to_string()));
        }
        Ok(out)
    }

    /// Keeps `status()` of this replica in etcd, refreshed every 2 s under a 10 s lease: a
    /// replica that dies drops out of `sigil status` within 10 s. Runs forever.
    pub async fn publish_status(&self, replica: &str, status: impl Fn() -> String) {
        let key = format!("{}status/{replica}", self.prefix);
        let mut lease = None;
        loop {
            let mut client = self.client.clone();
            if lease.is_none() {
                lease = client.lease_grant(10, None).await.ok().map(|l| l.id());
            }
            if let Some(id) = lease {
                let put = client
                    .put(
                        key.as_str(),
                        status(),
                        Some(PutOptions::new().with_lease(id)),
                    )
                    .await;
                let kept = match client.lease_keep_alive(id).await {
                    Ok((mut keeper, mut stream)) => {
                        keeper.keep_alive().await.is_ok()
                            && matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0)
                    }
                    Err(_) => false,
                };
                if put.is_err() || !kept {
                    // Expired or etcd away: a fresh lease on the next round.
                    lease = None;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Calls `changed` after every change of the resources, whichever replica made it (they
    /// all rewrite the version key), and once after each (re)connection of the watch, to
    /// catch up. Runs forever, re-watching with backoff when etcd goes away.
    pub async fn follow(&self, changed: impl Fn()) {
        let mut backoff = Duration::from_millis(100);
        let mut from = 0i64;
        loop {
            let mut client = self.client.clone();
            let options =
                (from > 0).then(|| etcd_client::WatchOptions::new().with_start_revision(from));
            match client.watch(self.version_key(), options).await {
                Ok(mut stream) => {
                    changed();
                    backoff = Duration::from_millis(100);
                    loop {
                        match stream.message().await {
                            Ok(Some(r)) => {
                                if let Some(h) = r.header() {
                                    from = h.revision() + 1;
                                }
                                if r.canceled() {
                                    warn!("etcd watch cancelled: {}", r.cancel_reason());
                                    // Compacted past `from`: start again from now.
                                    from = 0;
                                    break;
                                }
                                if !r.events().is_empty() {
                                    changed();
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                warn!("etcd watch lost: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => warn!("etcd watch failed: {e}"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
