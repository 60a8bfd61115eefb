//! What every store backend shares: the result types of `store::Store` and the store
//! epoch's random part. `store` picks a backend (`sqlite` or `etcd`); the backends and
//! `store` import these from here, so no backend imports the module that chooses it.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// What applying one document did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

impl Change {
    pub fn label(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// A stored resource: kind, name, the YAML document, and the version that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub kind: String,
    pub name: String,
    pub yaml: String,
    pub version: i64,
}

/// A join token as the store keeps it, under the SHA-256 of the token (the token itself is
/// never stored): the Workload it is bound to, when it expires and whether it was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub workload: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds; None while unused.
    pub used_at: Option<i64>,
}

impl TokenRecord {
    /// The form kept in etcd: `workload`, `expires_at`, `used_at` (empty while unused) on
    /// three lines. Workload names have no newline (they are resource names).
    pub fn encode(&self) -> String {
        let used = self.used_at.map(|t| t.to_string()).unwrap_or_default();
        format!("{}\n{}\n{used}", self.workload, self.expires_at)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut lines = text.split('\n');
        let workload = lines.next()?.to_string();
        let expires_at = lines.next()?.parse().ok()?;
        let used_at = match lines.next()? {
            "" => None,
            t => Some(t.parse().ok()?),
        };
        Some(Self {
            workload,
            expires_at,
            used_at,
        })
    }
}

/// What presenting a join token came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// Taken now: bound to this Workload (by name). It can never be taken again.
    Taken(String),
    /// No such token (never made, or mistyped).
    Unknown,
    /// Already taken, at this time (Unix seconds).
    Reused(i64),
    /// Expired at this time (Unix seconds).
    Expired(i64),
}

/// What a token record says to a use at `now`, and the record after it.
pub fn take(record: &TokenRecord, now: i64) -> (TokenUse, Option<TokenRecord>) {
    if let Some(at) = record.used_at {
        return (TokenUse::Reused(at), None);
    }
    if now >= record.expires_at {
        return (TokenUse::Expired(record.expires_at), None);
    }
    let used = TokenRecord {
        used_at: Some(now),
        ..record.clone()
    };
    (TokenUse::Taken(record.workload.clone()), Some(used))
}

/// Why a store could not do what was asked. Shown as `store: <what>`, naming the file,
/// flag or etcd endpoint at fault.
#[derive(Debug)]
pub enum StoreError {
    /// A file or directory of `--data-dir` could not be created or opened.
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// Another process holds `--data-dir`'s lock file: one `sigil-control` per directory.
    InUse {
        dir: PathBuf,
        lock: PathBuf,
        /// The PID written in the lock file, if any.
        holder: Option<String>,
    },
    /// The lock file could not be locked for another reason than another holder.
    Lock {
        path: PathBuf,
        source: io::Error,
    },
    Sqlite(rusqlite::Error),
    /// An `--etcd-ca`, `--etcd-cert` or `--etcd-key` file could not be read.
    EtcdFile {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Such a file holds no PEM block of the kind it must hold (tonic would only fail at the
    /// first connection, naming neither file).
    EtcdPem {
        flag: &'static str,
        path: PathBuf,
        label: &'static str,
    },
    /// `--store etcd://…` names no endpoint.
    EtcdSpec(String),
    /// No etcd endpoint could be reached at start.
    EtcdConnect {
        endpoints: String,
        source: etcd_client::Error,
    },
    Etcd(etcd_client::Error),
    /// The epoch key was gone right after a transaction made sure it exists.
    EpochVanished(String),
    /// Every attempt of an optimistic transaction lost to a concurrent change.
    Conflicts(usize),
    /// A stored record that is not in the form this version writes (its key).
    Corrupt(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store: ")?;
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::InUse { dir, lock, holder } => {
                let who = match holder {
                    Some(pid) => format!("process {pid}"),
                    None => "another process".to_string(),
                };
                write!(
                    f,
                    "{} is in use by {who} (its {} is locked): one sigil-control per --data-dir; \
                     several replicas share an etcd store (--store etcd://...)",
                    dir.display(),
                    lock.display()
                )
            }
            Self::Lock { path, source } => write!(f, "{}: cannot lock: {source}", path.display()),
            Self::Sqlite(e) => write!(f, "{e}"),
            Self::EtcdFile { flag, path, source } => {
                write!(f, "{flag} {}: {source}", path.display())
            }
            Self::EtcdPem { flag, path, label } => {
                write!(f, "{flag} {}: no PEM {label} block", path.display())
            }
            Self::EtcdSpec(spec) => write!(
                f,
                "etcd://{spec}: expected etcd://host:port[,host:port…][/prefix]"
            ),
            Self::EtcdConnect { endpoints, source } => write!(f, "etcd {endpoints}: {source}"),
            Self::Etcd(e) => write!(f, "etcd: {e}"),
            Self::EpochVanished(key) => {
                write!(f, "etcd: {key} vanished right after it was written")
            }
            Self::Conflicts(attempts) => write!(
                f,
                "etcd: gave up after {attempts} conflicting concurrent changes"
            ),
            Self::Corrupt(key) => write!(f, "{key}: not a record this sigil-control wrote"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

impl From<etcd_client::Error> for StoreError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Etcd(e)
    }
}

/// `bytes` random bytes from the system's generator, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random generator works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
