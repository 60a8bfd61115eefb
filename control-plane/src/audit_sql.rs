//! The SQL under the audit store: an embedded SQLite file, or a PostgreSQL database that
//! several control-plane replicas share (`--audit-db postgresql://...`).
//!
//! The store's statements are written once, with `?N` parameters (turned into `$N` for
//! PostgreSQL), and read back as `Cell`s. The two dialects differ only in the schema, which
//! is each one's own, and in how writers are kept apart: SQLite has one writing connection
//! per process; on PostgreSQL every writing transaction of every replica first takes one
//! advisory lock, so that a chain's head is read and moved by one replica at a time and row
//! numbers (`rowid`, which `sigil audit tail` follows) become visible in the order they were
//! given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A statement's parameter.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// A value read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Cell {
    /// An integer column (a count, a sequence number); a NULL one (`MAX` of nothing) is None.
    pub fn int(&self) -> Result<Option<i64>, SqlError> {
        match self {
            Self::Null => Ok(None),
            Self::Int(i) => Ok(Some(*i)),
            _ => Err(SqlError::NotA("an integer")),
        }
    }

    pub fn text(self) -> Result<String, SqlError> {
        match self {
            Self::Text(t) => Ok(t),
            _ => Err(SqlError::NotA("text")),
        }
    }

    /// Bytes, whatever type the value was stored with: one edited by hand in SQLite may have
    /// become text, which reads as its bytes; one that is no bytes at all reads as none, and
    /// the chain then names the damage.
    pub fn bytes(self) -> Vec<u8> {
        match self {
            Self::Bytes(b) => b,
            Self::Text(t) => t.into_bytes(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug)]
pub enum SqlError {
    Sqlite(rusqlite::Error),
    Postgres(postgres::Error),
    /// A column read as the wrong type.
    NotA(&'static str),
    /// The PostgreSQL address or its TLS files.
    Config(String),
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(e) => write!(f, "{e}"),
            // postgres::Error's own text says only "db error" for what the server said.
            Self::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "PostgreSQL: {}: {}", db.severity(), db.message()),
                None => {
                    // The cause (a certificate refused, say) is in the sources.
                    write!(f, "PostgreSQL: {e}")?;
                    let mut source = std::error::Error::source(e);
                    while let Some(cause) = source {
                        write!(f, ": {cause}")?;
                        source = cause.source();
                    }
                    Ok(())
                }
            },
            Self::NotA(what) => write!(f, "a stored value is not {what}"),
            Self::Config(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for SqlError {}

impl From<rusqlite::Error> for SqlError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

impl From<postgres::Error> for SqlError {
    fn from(e: postgres::Error) -> Self {
        Self::Postgres(e)
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Int(i) => ValueRef::Integer(i),
            Arg::Text(t) => ValueRef::Text(t.as_bytes()),
            Arg::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // Each variant only where its own type goes (`accepts` takes any of the three).
        match *self {
            Arg::Int(i) if <i64 as ToSql>::accepts(ty) => i.to_sql(ty, out),
            Arg::Text(t) if <&str as ToSql>::accepts(ty) => t.to_sql(ty, out),
            Arg::Bytes(b) if <&[u8] as ToSql>::accepts(ty) => b.to_sql(ty, out),
            _ => Err(format!("{self:?} given for a parameter of type {ty}").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <&str as ToSql>::accepts(ty) || <&[u8] as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// The schema on SQLite (`rowid` is SQLite's own).
const SQLITE_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS audit_records (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq INTEGER NOT NULL, prev BLOB NOT NULL,
        link BLOB NOT NULL, time INTEGER NOT NULL, kind INTEGER NOT NULL,
        peer TEXT NOT NULL DEFAULT '', decision TEXT NOT NULL DEFAULT '',
        policy TEXT NOT NULL DEFAULT '', close_reason TEXT NOT NULL DEFAULT '',
        record BLOB NOT NULL, PRIMARY KEY (sidecar, chain, seq));
    CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq INTEGER NOT NULL, head BLOB NOT NULL,
        signature BLOB NOT NULL, signer BLOB NOT NULL, PRIMARY KEY (sidecar, chain, seq));
    CREATE TABLE IF NOT EXISTS audit_heads (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq INTEGER NOT NULL,
        link BLOB NOT NULL, PRIMARY KEY (sidecar, chain));
    CREATE TABLE IF NOT EXISTS audit_pruned (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq INTEGER NOT NULL,
        link BLOB NOT NULL, PRIMARY KEY (sidecar, chain));";

/// The same on PostgreSQL, with a `rowid` of its own: the order records were stored in.
const POSTGRES_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS audit_records (
        rowid BIGSERIAL NOT NULL,
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq BIGINT NOT NULL, prev BYTEA NOT NULL,
        link BYTEA NOT NULL, time BIGINT NOT NULL, kind BIGINT NOT NULL,
        peer TEXT NOT NULL DEFAULT '', decision TEXT NOT NULL DEFAULT '',
        policy TEXT NOT NULL DEFAULT '', close_reason TEXT NOT NULL DEFAULT '',
        record BYTEA NOT NULL, PRIMARY KEY (sidecar, chain, seq));
    CREATE UNIQUE INDEX IF NOT EXISTS audit_records_rowid ON audit_records (rowid);
    CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time);
    CREATE TABLE IF NOT EXISTS audit_checkpoints (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq BIGINT NOT NULL, head BYTEA NOT NULL,
        signature BYTEA NOT NULL, signer BYTEA NOT NULL, PRIMARY KEY (sidecar, chain, seq));
    CREATE TABLE IF NOT EXISTS audit_heads (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq BIGINT NOT NULL,
        link BYTEA NOT NULL, PRIMARY KEY (sidecar, chain));
    CREATE TABLE IF NOT EXISTS audit_pruned (
        sidecar TEXT NOT NULL, chain TEXT NOT NULL, seq BIGINT NOT NULL,
        link BYTEA NOT NULL, PRIMARY KEY (sidecar, chain));";

/// The advisory lock every replica's writing transactions take first ("sigil audit").
const WRITERS_LOCK: i64 = 0x5369_6769_6c41_7564;

/// How the control plane reaches a PostgreSQL audit store: always TLS, the server's
/// certificate checked against `ca`, and a client certificate when given.
#[derive(Clone, Debug)]
pub struct PostgresSpec {
    /// `postgresql://user@host:port/database`, as libpq takes it.
    pub url: String,
    pub ca: PathBuf,
    /// The client certificate and key (`cert` authentication), if any.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl PostgresSpec {
    /// The connection's settings, TLS required whatever the URL says.
    fn config(
        &self,
    ) -> Result<(postgres::Config, tokio_postgres_rustls::MakeRustlsConnect), SqlError> {
        // libpq's verify-ca and verify-full are what is done anyway (rustls checks the chain
        // and the name); tokio-postgres does not know them by name.
        let url = self
            .url
            .replace("sslmode=verify-full", "sslmode=require")
            .replace("sslmode=verify-ca", "sslmode=require");
        let mut config: postgres::Config = url.parse().map_err(|e| {
            SqlError::Config(format!(
                "--audit-db: not a PostgreSQL URL (postgresql://user@host:port/database): {e}"
            ))
        })?;
        if config.get_ssl_mode() == postgres::config::SslMode::Disable {
            return Err(SqlError::Config(
                "--audit-db: sslmode=disable: the audit store is reached over TLS only".into(),
            ));
        }
        // A replica that stops answering mid-transaction holds every replica's writers' lock:
        // the server ends its transaction after a minute idle, and the kernel gives up on a
        // peer gone from the network after 30 s.
        let options = format!(
            "{} -c idle_in_transaction_session_timeout=60s",
            config.get_options().unwrap_or_default()
        );
        config
            .ssl_mode(postgres::config::SslMode::Require)
            .connect_timeout(std::time::Duration::from_secs(5))
            .keepalives_idle(std::time::Duration::from_secs(30))
            .tcp_user_timeout(std::time::Duration::from_secs(30))
            .options(options.trim());
        Ok((
            config,
            tokio_postgres_rustls::MakeRustlsConnect::new(self.tls()?),
        ))
    }

    fn tls(&self) -> Result<rustls::ClientConfig, SqlError> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| SqlError::Config(format!("{flag} {}: {e}", path.display())))
        };
        let bad = |flag: &str, path: &Path, what: &str| {
            SqlError::Config(format!("{flag} {}: {what}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        let ca = read("--audit-pg-ca", &self.ca)?;
        for cert in CertificateDer::pem_slice_iter(&ca) {
            let cert = cert.map_err(|e| bad("--audit-pg-ca", &self.ca, &e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| bad("--audit-pg-ca", &self.ca, &e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("--audit-pg-ca", &self.ca, "no CERTIFICATE in it"));
        }
        let builder = rustls::ClientConfig::builder_with_provider(sigil_filters::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| SqlError::Config(format!("TLS to PostgreSQL: {e}")))?
            .with_root_certificates(roots);
        let Some((cert, key)) = &self.client else {
            return Ok(builder.with_no_client_auth());
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read("--audit-pg-cert", cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| bad("--audit-pg-cert", cert, &e.to_string()))?;
        if chain.is_empty() {
            return Err(bad("--audit-pg-cert", cert, "no CERTIFICATE in it"));
        }
        let key = PrivateKeyDer::from_pem_slice(&read("--audit-pg-key", key)?)
            .map_err(|_| bad("--audit-pg-key", key, "no PRIVATE KEY in it"))?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| SqlError::Config(format!("--audit-pg-cert, --audit-pg-key: {e}")))
    }
}

/// One connection to the store.
pub enum Db {
    Sqlite(rusqlite::Connection),
    /// Boxed: its settings and TLS configuration are large, and there are two per store.
    Postgres(Box<Pg>),
}

/// A PostgreSQL connection, made again if it was lost (the server restarted, say), and its
/// prepared statements.
pub struct Pg {
    config: postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The client says goodbye through a runtime of its own, which cannot start on a
        // thread that drives another (a store dropped in an async task): on a thread of its
        // own, then.
        if let Some(client) = self.client.take() {
            std::thread::spawn(move || drop(client));
        }
    }
}

impl Pg {
    fn client(
        &mut self,
    ) -> Result<
        (
            &mut postgres::Client,
            &mut HashMap<String, postgres::Statement>,
        ),
        SqlError,
    > {
        if self.client.as_ref().is_none_or(postgres::Client::is_closed) {
            self.statements.clear();
            self.client = Some(self.config.connect(self.tls.clone())?);
        }
        Ok((
            self.client.as_mut().expect("connected above"),
            &mut self.statements,
        ))
    }
}

impl Db {
    /// An SQLite file, durable on commit, with the schema.
    pub fn sqlite(path: &Path) -> Result<Self, SqlError> {
        let db = rusqlite::Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // Durable on commit: an acknowledged record survives a crash of this process and of
        // the machine.
        db.pragma_update(None, "synchronous", "FULL")?;
        db.set_prepared_statement_cache_capacity(32);
        db.execute_batch(SQLITE_SCHEMA)?;
        Ok(Self::Sqlite(db))
    }

    /// A connection to PostgreSQL, with the schema (made once, whichever replica is first).
    pub fn postgres(spec: &PostgresSpec) -> Result<Self, SqlError> {
        let (config, tls) = spec.config()?;
        let mut pg = Pg {
            config,
            tls,
            client: None,
            statements: HashMap::new(),
        };
        let (client, _) = pg.client()?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITERS_LOCK])?;
        tx.batch_execute(POSTGRES_SCHEMA)?;
        tx.commit()?;
        Ok(Self::Postgres(Box::new(pg)))
    }

    /// A transaction that writes: on PostgreSQL, after every other replica's (see the module).
    pub fn write(&mut self) -> Result<Tx<'_>, SqlError> {
        match self {
            Self::Sqlite(db) => Ok(Tx::Sqlite(db.transaction()?)),
            Self::Postgres(pg) => {
                let (client, statements) = pg.client()?;
                // Read committed whatever the database's default: each statement after the
                // lock sees what the replica that held it before committed.
                let mut tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::ReadCommitted)
                    .start()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITERS_LOCK])?;
                Ok(Tx::Postgres { tx, statements })
            }
        }
    }

    /// A transaction that reads one snapshot of the store throughout.
    pub fn read(&mut self) -> Result<Tx<'_>, SqlError> {
        match self {
            Self::Sqlite(db) => Ok(Tx::Sqlite(db.transaction()?)),
            Self::Postgres(pg) => {
                let (client, statements) = pg.client()?;
                let tx = client
                    .build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                Ok(Tx::Postgres { tx, statements })
            }
        }
    }
}

pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres {
        tx: postgres::Transaction<'a>,
        statements: &'a mut HashMap<String, postgres::Statement>,
    },
}

/// `?N` parameters as PostgreSQL writes them: `$N`.
fn dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn pg_cell(row: &postgres::Row, i: usize) -> Result<Cell, SqlError> {
    let ty = row.columns()[i].type_();
    Ok(if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Cell::Null, Cell::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map_or(Cell::Null, |v| Cell::Int(v.into()))
    } else if *ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)?
            .map_or(Cell::Null, Cell::Bytes)
    } else {
        row.try_get::<_, Option<String>>(i)?
            .map_or(Cell::Null, Cell::Text)
    })
}

impl Tx<'_> {
    /// Every row `sql` returns, each as its cells.
    pub fn rows(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Vec<Cell>>, SqlError> {
        match self {
            Self::Sqlite(tx) => {
                let mut q = tx.prepare_cached(sql)?;
                let n = q.column_count();
                let mut rows = q.query(rusqlite::params_from_iter(args))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut cells = Vec::with_capacity(n);
                    for i in 0..n {
                        cells.push(match r.get_ref(i)? {
                            ValueRef::Null => Cell::Null,
                            ValueRef::Integer(v) => Cell::Int(v),
                            ValueRef::Real(v) => Cell::Int(v as i64),
                            ValueRef::Text(t) => {
                                Cell::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                        });
                    }
                    out.push(cells);
                }
                Ok(out)
            }
            Self::Postgres { tx, statements } => {
                let params: Vec<&(dyn ToSql + Sync)> =
                    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                let statement = match statements.get(sql) {
                    Some(s) => s.clone(),
                    None => {
                        let s = tx.prepare(&dollars(sql))?;
                        statements.insert(sql.to_string(), s.clone());
                        s
                    }
                };
                tx.query(&statement, &params)?
                    .iter()
                    .map(|r| (0..r.len()).map(|i| pg_cell(r, i)).collect())
                    .collect()
            }
        }
    }

    /// The first row `sql` returns, if any.
    pub fn row(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Vec<Cell>>, SqlError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }

    /// Runs `sql`; how many rows it changed.
    pub fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, SqlError> {
        match self {
            Self::Sqlite(tx) => Ok(tx
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(args))?
                as u64),
            Self::Postgres { tx, statements } => {
                let params: Vec<&(dyn ToSql + Sync)> =
                    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                let statement = match statements.get(sql) {
                    Some(s) => s.clone(),
                    None => {
                        let s = tx.prepare(&dollars(sql))?;
                        statements.insert(sql.to_string(), s.clone());
                        s
                    }
                };
                Ok(tx.execute(&statement, &params)?)
            }
        }
    }

    pub fn commit(self) -> Result<(), SqlError> {
        match self {
            Self::Sqlite(tx) => Ok(tx.commit()?),
            Self::Postgres { tx, .. } => Ok(tx.commit()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_parameters_become_dollars_and_nothing_else_changes() {
        assert_eq!(
            dollars("SELECT a FROM t WHERE x = ?1 AND (y = ?12 OR z = '?') LIMIT ?3"),
            "SELECT a FROM t WHERE x = $1 AND (y = $12 OR z = '?') LIMIT $3"
        );
    }

    #[test]
    fn a_plaintext_url_is_refused_by_name() {
        let spec = PostgresSpec {
            url: "postgresql://sigil@127.0.0.1:5432/audit?sslmode=disable".into(),
            ca: "/nonexistent".into(),
            client: None,
        };
        let err = Db::postgres(&spec).err().expect("refused").to_string();
        assert!(err.contains("sslmode=disable"), "{err}");
        let spec = PostgresSpec {
            url: "mysql://x".into(),
            ..spec
        };
        let err = Db::postgres(&spec).err().expect("refused").to_string();
        assert!(err.contains("not a PostgreSQL URL"), "{err}");
    }
}
