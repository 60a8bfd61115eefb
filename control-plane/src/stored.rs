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

/// The latest checkpoint of an audit chain, kept in this store beside the resources: out of
/// the audit database's reach, so that a tail cut off there together with its checkpoints
/// still shows (`sigil audit verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// The SPIFFE ID the chain's records are stored under.
    pub sidecar: String,
    pub chain: String,
    pub seq: u64,
    /// The chain's link at `seq`.
    pub head: [u8; 32],
}

impl Witness {
    /// `seq head-hex`, the value kept under the chain's key; `seq` in 20 digits, so that of
    /// two values the later checkpoint's is the greater, byte by byte (the stores keep the
    /// greater: a replica late with an older one never replaces a newer).
    pub fn value(&self) -> String {
        let head: String = self.head.iter().map(|b| format!("{b:02x}")).collect();
        format!("{:020} {head}", self.seq)
    }

    /// The witness of (`sidecar`, `chain`) from its `value`.
    pub fn parse(sidecar: &str, chain: &str, value: &str) -> Option<Self> {
        let (seq, hex) = value.split_once(' ')?;
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut head = [0u8; 32];
        for (i, b) in head.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self {
            sidecar: sidecar.to_string(),
            chain: chain.to_string(),
            seq: seq.parse().ok()?,
            head,
        })
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

/// One issuance decision as the store keeps it for the audit stream: when, who asked and from
/// where, for which identity, what came of it and why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IssuanceRecord {
    /// Unix seconds.
    pub at: i64,
    /// `first`, `renewal`, `workload_api` (issued) or `refused`.
    pub result: String,
    /// The refusal's reason (the metric's label); empty when issued.
    pub reason: String,
    /// The SPIFFE ID the caller presented, or `anonymous` (a join token).
    pub caller: String,
    /// The sidecar's name, as it gave it.
    pub node: String,
    /// Its address.
    pub addr: String,
    /// The identity issued; empty if refused before one was known.
    pub id: String,
    pub workload: String,
    /// The SVID's serial, hex; empty if refused.
    pub serial: String,
    /// Unix seconds; 0 if refused.
    pub not_after: i64,
    /// What the caller was told, when refused.
    pub message: String,
}

impl IssuanceRecord {
    /// One line of tab-separated fields, in the order of the struct. Tabs and line breaks in
    /// a field (a CSR can carry any text) become spaces.
    pub fn encode(&self) -> String {
        let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
        [
            self.at.to_string(),
            clean(&self.result),
            clean(&self.reason),
            clean(&self.caller),
            clean(&self.node),
            clean(&self.addr),
            clean(&self.id),
            clean(&self.workload),
            clean(&self.serial),
            self.not_after.to_string(),
            clean(&self.message),
        ]
        .join("\t")
    }

    pub fn decode(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split('\t').collect();
        let [at, result, reason, caller, node, addr, id, workload, serial, not_after, message] =
            f.as_slice()
        else {
            return None;
        };
        Some(Self {
            at: at.parse().ok()?,
            result: result.to_string(),
            reason: reason.to_string(),
            caller: caller.to_string(),
            node: node.to_string(),
            addr: addr.to_string(),
            id: id.to_string(),
            workload: workload.to_string(),
            serial: serial.to_string(),
            not_after: not_after.parse().ok()?,
            message: message.to_string(),
        })
    }
}

impl IssuanceRecord {
    /// One line for people (`sigil issuances`): the time (RFC 3339), the result, then what
    /// is known as key=value; a refusal ends with what the caller was told.
    pub fn line(&self) -> String {
        let t = |unix: i64| sigil_config::policy::Timestamp(unix).to_string();
        let mut out = format!("{} {}", t(self.at), self.result);
        let mut field = |k: &str, v: &str| {
            if !v.is_empty() {
                out += &format!(" {k}={v}");
            }
        };
        field("reason", &self.reason);
        field("id", &self.id);
        field("workload", &self.workload);
        field("serial", &self.serial);
        if self.not_after != 0 {
            field("not_after", &t(self.not_after));
        }
        field("caller", &self.caller);
        field("node", &self.node);
        field("addr", &self.addr);
        if !self.message.is_empty() {
            out += &format!(" -- {}", self.message);
        }
        out
    }
}

/// How long issuance records are kept in the store.
pub const ISSUANCE_RETENTION_SECS: i64 = 30 * 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issuance_record_survives_its_line_and_a_forged_one_stays_one_line() {
        let r = IssuanceRecord {
            at: 1_800_000_000,
            result: "refused".into(),
            reason: "csr_foreign_id".into(),
            caller: "anonymous".into(),
            node: "web-1".into(),
            addr: "10.0.0.7:40112".into(),
            id: String::new(),
            workload: "web".into(),
            serial: String::new(),
            not_after: 0,
            message: "csr_foreign_id: names spiffe://x\n1800000000\tfirst\tforged".into(),
        };
        let line = r.encode();
        assert!(!line.contains('\n'));
        let back = IssuanceRecord::decode(&line).unwrap();
        assert_eq!(
            back.message,
            "csr_foreign_id: names spiffe://x 1800000000 first forged"
        );
        assert_eq!(
            IssuanceRecord {
                message: back.message.clone(),
                ..r
            },
            back
        );
        assert_eq!(IssuanceRecord::decode("1\tfirst"), None);
    }
}
