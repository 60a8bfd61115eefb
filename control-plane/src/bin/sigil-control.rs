//! sigil-control: the Sigil control plane. See `--help`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use sigil_config::IdPattern;
use sigil_control::audit_store::{AuditDb, AuditStore, PostgresSpec};
use sigil_control::ca::CaSet;
use sigil_control::etcd::{Etcd, EtcdTls};
use sigil_control::issuer::Issuer;
use sigil_control::operator::{self, Api};
use sigil_control::own_audit;
use sigil_control::records::Recorder;
use sigil_control::rotation::{self, Rotation};
use sigil_control::sidecars::{self, Hub};
use sigil_control::snapshot::Catalog;
use sigil_control::sqlite::Sqlite;
use sigil_control::stored::StoreError;
use sigil_control::{identity, store::Store};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

const USAGE: &str = "\
sigil-control --data-dir DIR --cert FILE --key FILE --bundle-dir DIR --operator PATTERN...
       sigil-control --store etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
                     (--etcd-ca FILE --etcd-cert FILE --etcd-key FILE | --etcd-insecure)
                     --cert FILE --key FILE --bundle-dir DIR --operator PATTERN...";

const AFTER_HELP: &str = "\
Environment:
  SIGIL_LOG  log level: error, warn, info (default), debug, trace

Exit codes: 0 clean shutdown (SIGTERM/SIGINT); 1 runtime failure; 2 invalid arguments.";

/// The Sigil control plane: stores resources, pushes each sidecar the snapshot of its own
/// identity, serves operators.
#[derive(Parser)]
#[command(name = "sigil-control", version, override_usage = USAGE, after_help = AFTER_HELP)]
struct Cli {
    /// The embedded store (DIR/sigil.db, created if missing; one sigil-control per
    /// directory, enforced with DIR/sigil.lock)
    #[arg(long, value_name = "DIR", conflicts_with = "store")]
    data_dir: Option<PathBuf>,
    /// An etcd store shared by several replicas (keys under PREFIX, default /sigil/); each
    /// replica watches it and pushes every change to the sidecars connected to it
    #[arg(long, value_name = "etcd://...", value_parser = etcd_spec)]
    store: Option<String>,
    /// CA certificate(s) etcd's server certificate must chain to
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate presented to etcd (--client-cert-auth)
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    etcd_cert: Option<PathBuf>,
    /// Its private key
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    etcd_key: Option<PathBuf>,
    /// Plaintext to etcd instead of TLS (a warning is logged): anyone on the path could read
    /// and change every policy and revocation
    #[arg(
        long,
        conflicts_with_all = ["data_dir", "etcd_ca", "etcd_cert", "etcd_key"]
    )]
    etcd_insecure: bool,
    /// The control plane's own SVID, leaf first
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Its private key
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Trust bundles, one <trust domain>.pem each
    #[arg(long, value_name = "DIR")]
    bundle_dir: Option<PathBuf>,
    /// SPIFFE IDs allowed to use the operator API: an exact ID or a prefix pattern such as
    /// spiffe://example.org/ops/* (repeatable)
    #[arg(long = "operator", value_name = "PATTERN", value_parser = IdPattern::parse)]
    operators: Vec<IdPattern>,
    /// Operator API (HTTPS, mutual TLS)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15014")]
    operator_listen: SocketAddr,
    /// Sidecar API (gRPC, TLS; mutual but for a first SVID asked with a join token)
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15012")]
    sidecar_listen: SocketAddr,
    /// The CA that signs SVIDs (made with `sigil ca init`); without it no SVID is issued
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Where sidecars' audit records are kept: an SQLite file (DIR/audit.db with --data-dir
    /// by default), or postgresql://USER@HOST:PORT/DATABASE, shared by every replica and
    /// reached over TLS only (--audit-pg-ca). Without it, with --store, none are taken
    #[arg(long, value_name = "FILE|URL")]
    audit_db: Option<String>,
    /// The CA that PostgreSQL's server certificate must chain to (PEM)
    #[arg(long, value_name = "FILE")]
    audit_pg_ca: Option<PathBuf>,
    /// A client certificate for PostgreSQL (its `cert` authentication), with --audit-pg-key
    #[arg(long, value_name = "FILE", requires = "audit_pg_key")]
    audit_pg_cert: Option<PathBuf>,
    /// The client certificate's private key
    #[arg(long, value_name = "FILE", requires = "audit_pg_cert")]
    audit_pg_key: Option<PathBuf>,
    /// How long audit records are kept (90d, 2160h); older ones are removed from the start
    /// of each chain. Without it, records are kept for good
    #[arg(long, value_name = "DURATION", value_parser = retention)]
    audit_retention: Option<std::time::Duration>,
}

/// `--audit-retention`: a duration of one second at least.
fn retention(v: &str) -> Result<std::time::Duration, String> {
    let d = sigil_config::proxy_config::duration::parse(v)?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{v:?}: one second at least"));
    }
    Ok(d)
}

/// A `--store` value that is not `etcd://…`.
#[derive(Debug)]
struct NotEtcd;

impl fmt::Display for NotEtcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected etcd://host:port[/prefix]")
    }
}

impl std::error::Error for NotEtcd {}

/// `--store`: what follows `etcd://`.
fn etcd_spec(v: &str) -> Result<String, NotEtcd> {
    v.strip_prefix("etcd://").map(str::to_string).ok_or(NotEtcd)
}

/// What `sigil-control` was asked to run, once the arguments are known to fit together.
struct Config {
    store: StoreSpec,
    cert: PathBuf,
    key: PathBuf,
    bundle_dir: PathBuf,
    operators: Vec<IdPattern>,
    operator_listen: SocketAddr,
    sidecar_listen: SocketAddr,
    ca_dir: Option<PathBuf>,
    audit_db: Option<AuditDb>,
    audit_retention: Option<std::time::Duration>,
}

enum StoreSpec {
    Sqlite(PathBuf),
    Etcd(String, EtcdTls),
}

fn main() -> ExitCode {
    let config = match check(Cli::parse()) {
        Ok(c) => c,
        Err(message) => {
            // clap's form: the one-line reason, the usage, the hint to --help.
            let _ = Cli::command()
                .error(ErrorKind::MissingRequiredArgument, message)
                .print();
            return ExitCode::from(2);
        }
    };
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// What clap's per-flag rules cannot say: which store, and how etcd is reached. Checked in
/// this order so that the store's message comes first, naming both ways to reach etcd.
fn check(cli: Cli) -> Result<Config, &'static str> {
    let audit_db = match cli.audit_db {
        Some(url) if url.starts_with("postgresql://") || url.starts_with("postgres://") => {
            let Some(ca) = cli.audit_pg_ca else {
                return Err("--audit-db postgresql:// needs --audit-pg-ca: the audit store is reached over TLS only");
            };
            let client = cli.audit_pg_cert.zip(cli.audit_pg_key);
            Some(AuditDb::Postgres(PostgresSpec { url, ca, client }))
        }
        _ if cli.audit_pg_ca.is_some() || cli.audit_pg_cert.is_some() => {
            return Err("--audit-pg-ca, --audit-pg-cert and --audit-pg-key go with --audit-db postgresql://");
        }
        Some(file) => Some(AuditDb::Sqlite(file.into())),
        None => cli
            .data_dir
            .as_ref()
            .map(|d| AuditDb::Sqlite(d.join("audit.db"))),
    };
    let store = match (cli.data_dir, cli.store) {
        (Some(d), None) => StoreSpec::Sqlite(d),
        (None, Some(e)) => {
            let tls = match (cli.etcd_ca, cli.etcd_cert, cli.etcd_key, cli.etcd_insecure) {
                (Some(ca), Some(cert), Some(key), false) => EtcdTls::Mutual { ca, cert, key },
                (None, None, None, true) => EtcdTls::Insecure,
                _ => return Err("--store etcd:// needs --etcd-ca, --etcd-cert and --etcd-key (TLS with a client certificate), or --etcd-insecure for plaintext"),
            };
            StoreSpec::Etcd(e, tls)
        }
        _ => return Err("exactly one of --data-dir and --store is required"),
    };
    if matches!(
        (&store, &audit_db),
        (StoreSpec::Etcd(..), Some(AuditDb::Sqlite(_)))
    ) {
        return Err("with --store etcd, --audit-db must be postgresql://... shared by every replica: a file of each replica's own would split the records between them");
    }
    let (Some(cert), Some(key), Some(bundle_dir)) = (cli.cert, cli.key, cli.bundle_dir) else {
        return Err("--cert, --key and --bundle-dir are required");
    };
    if cli.operators.is_empty() {
        return Err(
            "at least one --operator PATTERN is required (nobody could use the operator API)",
        );
    }
    Ok(Config {
        store,
        cert,
        key,
        bundle_dir,
        operators: cli.operators,
        operator_listen: cli.operator_listen,
        sidecar_listen: cli.sidecar_listen,
        ca_dir: cli.ca_dir,
        audit_db,
        audit_retention: cli.audit_retention,
    })
}

/// Why `sigil-control` could not start (exit code 1).
#[derive(Debug)]
enum StartError {
    Identity(identity::LoadError),
    Store(StoreError),
    Ca(sigil_control::ca::CaError),
    Audit(sigil_control::audit_store::AuditStoreError),
    Listen {
        addr: SocketAddr,
        api: &'static str,
        source: std::io::Error,
    },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "{e}"),
            Self::Ca(e) => write!(f, "CA: {e}"),
            Self::Audit(e) => write!(f, "{e}"),
            Self::Listen { addr, api, source } => {
                write!(f, "cannot listen on {addr} ({api}): {source}")
            }
        }
    }
}

impl From<identity::LoadError> for StartError {
    fn from(e: identity::LoadError) -> Self {
        Self::Identity(e)
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Loads the identity, opens the store, listens, and serves until SIGTERM or SIGINT.
async fn run(config: Config) -> Result<(), StartError> {
    let id = identity::load(&config.cert, &config.key, &config.bundle_dir)?;
    let cas = match &config.ca_dir {
        Some(dir) => Some((dir.clone(), CaSet::load(dir).map_err(StartError::Ca)?)),
        None => None,
    };
    let store = Arc::new(open_store(config.store).await?);
    let audit = open_audit(config.audit_db.clone()).await?;
    let version = store.version().await?;
    let server = sigil_filters::tls::server_config(
        &id.local,
        id.bundles.clone(),
        Arc::default(),
        id.provider.clone(),
    );
    let operator_listener = bind(config.operator_listen, "operator API").await?;
    let sidecar_listener = bind(config.sidecar_listen, "sidecar API").await?;
    let catalog = Catalog::load(&store).await?;
    for problem in &catalog.unreadable {
        error!("stored resource not sent to any sidecar: {problem}");
    }
    let hub = Arc::new(Hub::new(catalog));
    if let Some(audit) = &audit {
        start_audit(audit, config.audit_retention, &hub, &id.local, &store);
    }
    info!(
        "{} ready; operator API on {}; sidecar API on {}; store {} at version {version}",
        id.local.id(),
        config.operator_listen,
        config.sidecar_listen,
        store.describe()
    );
    let api = Arc::new(Api {
        store,
        operators: config.operators,
        hub: hub.clone(),
        audit: audit.clone(),
        signer_roots: operator::SignerRoots {
            files: id.bundles.clone(),
            ca_dir: config.ca_dir.clone(),
        },
    });
    if let Store::Etcd(etcd) = &*api.store {
        follow_etcd(etcd, &api);
    }
    let witnessed = audit.clone().map(|a| (a, api.store.clone()));
    let retrying = api.clone();
    tokio::spawn(async move { retrying.hub.retry_publishes(&retrying.store).await });
    let reloading = api.clone();
    tokio::spawn(async move { reloading.hub.reload_on_request(&reloading.store).await });
    // Sidecars without an SVID yet reach `Issue` with a join token: no client certificate
    // required at the handshake; `Subscribe` refuses them.
    let local = id.local.clone();
    let provider = id.provider.clone();
    let sidecar_acceptor = move |bundles: Arc<sigil_filters::TrustBundles>| {
        TlsAcceptor::from(sigil_filters::tls::server_config_client_optional(
            &local,
            bundles,
            Arc::default(),
            provider.clone(),
        ))
    };
    let (acceptor_tx, acceptor_rx) =
        tokio::sync::watch::channel(sidecar_acceptor(id.bundles.clone()));
    let issuer = cas.map(|(dir, set)| {
        let ca = &set.active;
        info!(trust_domain = %ca.trust_domain(), not_after = %sigil_control::issuer::rfc3339(ca.not_after()), "CA loaded: issuing SVIDs");
        let set = Arc::new(set);
        let own = IdPattern::parse(id.local.id().as_str()).expect("an SPIFFE ID is a pattern");
        let mut reserved = api.operators.clone();
        reserved.push(own);
        let (cas_tx, cas_rx) = tokio::sync::watch::channel(set.clone());
        // The sidecars' SVIDs verify against the CA set as it changes.
        let verify = Arc::new(rotation::bundles_with(&id.bundles, &set));
        acceptor_tx.send_replace(sidecar_acceptor(verify.clone()));
        let (verify_tx, mut verify_rx) = tokio::sync::watch::channel(verify);
        let make = sidecar_acceptor.clone();
        let issued_until = Arc::new(std::sync::atomic::AtomicI64::new(0));
        tokio::spawn(async move {
            while verify_rx.changed().await.is_ok() {
                let bundles = verify_rx.borrow_and_update().clone();
                acceptor_tx.send_replace(make(bundles));
            }
        });
        tokio::spawn(rotation::follow(Rotation {
            dir,
            store: api.store.clone(),
            hub: hub.clone(),
            cas: cas_tx,
            file_bundles: id.bundles.clone(),
            verify_with: verify_tx,
            issued_until: issued_until.clone(),
            own_id: id.local.id().clone(),
        }));
        Arc::new(Issuer {
            cas: cas_rx,
            store: api.store.clone(),
            catalog: hub.catalog(),
            reserved,
            records: Recorder::start(
                own_audit::Issuances {
                    store: api.store.clone(),
                    audit: hub.own_audit.get().cloned(),
                },
                hub.metrics.records_dropped.clone(),
            ),
            issued_until,
        })
    });
    let acceptor = TlsAcceptor::from(server);
    let issuing = issuer.clone();
    let own = hub.own_audit.get().cloned();
    tokio::select! {
        _ = operator::serve(operator_listener, acceptor, api) => {}
        _ = sidecars::serve(sidecar_listener, acceptor_rx, hub, issuer, audit) => {}
        _ = shutdown() => info!("stopping"),
    }
    keep_records(issuing, own, witnessed).await;
    Ok(())
}

/// At shutdown: the issuance records and the control plane's own audit records still waiting
/// (3 s at most each), then the audit chains' latest checkpoints.
async fn keep_records(
    issuer: Option<Arc<Issuer>>,
    own: Option<Arc<own_audit::OwnAudit>>,
    witnessed: Option<(Arc<AuditStore>, Arc<Store>)>,
) {
    if let Some(issuer) = issuer {
        issuer
            .records
            .flush(std::time::Duration::from_secs(3))
            .await;
    }
    if let Some(own) = own {
        own.flush(std::time::Duration::from_secs(3)).await;
    }
    if let Some((audit, store)) = witnessed {
        keep_witnesses(&audit, &store).await;
    }
}

/// Opens the audit store, if one is configured. PostgreSQL's client blocks: off the runtime's
/// threads.
async fn open_audit(db: Option<AuditDb>) -> Result<Option<Arc<AuditStore>>, StartError> {
    let Some(db) = db else {
        return Ok(None);
    };
    let store = tokio::task::spawn_blocking(move || AuditStore::open(&db))
        .await
        .expect("opening the audit store does not panic")
        .map_err(StartError::Audit)?;
    Ok(Some(Arc::new(store)))
}

/// What runs beside an audit store: retention (`keep`), the control plane's own chain, and
/// the chains' latest checkpoints kept in `store` every `WITNESS_EVERY`.
fn start_audit(
    audit: &Arc<AuditStore>,
    keep: Option<std::time::Duration>,
    hub: &Hub,
    local: &sigil_filters::LocalIdentity,
    store: &Arc<Store>,
) {
    if let Some(keep) = keep {
        audit.set_retention();
        tokio::spawn(retain(audit.clone(), keep));
    }
    let own = own_audit::start(
        audit.clone(),
        local.clone(),
        hub.metrics.own_audit_dropped.clone(),
    );
    let _ = hub.own_audit.set(Arc::new(own));
    let (audit, store) = (audit.clone(), store.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WITNESS_EVERY).await;
            keep_witnesses(&audit, &store).await;
        }
    });
}

/// How often the audit chains' latest checkpoints are kept in the store.
const WITNESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the audit chains' latest checkpoints stored since the last time in the store, out of
/// the audit database's reach (`sigil audit verify` holds the chains against them); kept for
/// the next time if the store cannot be reached.
async fn keep_witnesses(audit: &AuditStore, store: &Store) {
    let witnesses = audit.take_witnesses();
    if witnesses.is_empty() {
        return;
    }
    if let Err(e) = store.put_witnesses(&witnesses).await {
        warn!("the audit chains' latest checkpoints not kept in the store (tried again in {WITNESS_EVERY:?}): {e}");
        audit.untake_witnesses(witnesses);
    }
}

/// Removes audit records older than `keep`, at start and then every quarter of `keep` (at
/// most every 10 minutes), for as long as the control plane runs.
async fn retain(store: Arc<sigil_control::audit_store::AuditStore>, keep: std::time::Duration) {
    let every = (keep / 4).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(600),
    );
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(keep).as_nanos() as i64;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(
                removed = n,
                "audit records older than the retention removed"
            ),
            Ok(Err(e)) => error!("audit retention: {e}"),
            Err(e) => error!("audit retention: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

async fn open_store(spec: StoreSpec) -> Result<Store, StoreError> {
    Ok(match spec {
        StoreSpec::Sqlite(dir) => Store::Sqlite(Sqlite::open(&dir)?),
        StoreSpec::Etcd(spec, tls) => {
            if matches!(tls, EtcdTls::Insecure) {
                warn!(
                    "plaintext to etcd (--etcd-insecure): anyone on the path can read and change every policy and revocation"
                );
            }
            Store::Etcd(Box::new(Etcd::connect(&spec, &tls).await?))
        }
    })
}

async fn bind(addr: SocketAddr, api: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, api, source })
}

/// With an etcd store: changes made through any replica reach this one's sidecars (the
/// watch), and `sigil status` at any replica lists this one's sidecars (the status key).
fn follow_etcd(etcd: &Etcd, api: &Arc<Api>) {
    let (status_store, hub) = (Etcd::clone(etcd), api.hub.clone());
    let (etcd, api) = (Etcd::clone(etcd), api.clone());
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify = changed.clone();
    tokio::spawn(async move { etcd.follow(|| notify.notify_one()).await });
    let replica = format!("{}-{}", hostname(), std::process::id());
    tokio::spawn(async move {
        status_store
            .publish_status(&replica, || hub.status_lines().join("\n"))
            .await
    });
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            let _ = api.hub.publish(&api.store).await;
        }
    });
}

/// Log lines as the sidecar writes them (`sigil-proxy`'s `init_logging`): tracing's text
/// format on stderr with timestamps and levels, no colour codes (the log usually goes to a
/// file or journald), the level from `SIGIL_LOG`; one setting for the whole mesh.
fn init_logging() {
    let level = match std::env::var("SIGIL_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
