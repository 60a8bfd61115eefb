//! sigil-control: the Sigil control plane. See `--help`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use sigil_config::IdPattern;
use sigil_control::etcd::{Etcd, EtcdTls};
use sigil_control::operator::{self, Api};
use sigil_control::sidecars::{self, Hub};
use sigil_control::snapshot::Catalog;
use sigil_control::sqlite::Sqlite;
use sigil_control::stored::StoreError;
use sigil_control::{identity, store::Store};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

const USAGE: &str = "\
sigil-control — the Sigil control plane

USAGE:
    sigil-control (--data-dir DIR
                   | --store etcd://HOST:PORT[,HOST:PORT...][/PREFIX]
                     (--etcd-ca FILE --etcd-cert FILE --etcd-key FILE | --etcd-insecure))
                  --cert FILE --key FILE --bundle-dir DIR --operator PATTERN...
                  [--operator-listen ADDR] [--sidecar-listen ADDR]

OPTIONS:
    --data-dir DIR         the embedded store (DIR/sigil.db, created if missing; one
                           sigil-control per directory, enforced with DIR/sigil.lock)
    --store etcd://...     an etcd store shared by several replicas (keys under PREFIX,
                           default /sigil/); each replica watches it and pushes every change
                           to the sidecars connected to it
    --etcd-ca FILE         CA certificate(s) etcd's server certificate must chain to
    --etcd-cert FILE       client certificate presented to etcd (--client-cert-auth)
    --etcd-key FILE        its private key
    --etcd-insecure        plaintext to etcd instead of TLS (a warning is logged): anyone on
                           the path could read and change every policy and revocation
    --cert, --key FILE     the control plane's own SVID (leaf first) and key
    --bundle-dir DIR       trust bundles, one <trust domain>.pem each
    --operator PATTERN     SPIFFE IDs allowed to use the operator API: an exact ID or a
                           prefix pattern such as spiffe://example.org/ops/* (repeatable)
    --operator-listen ADDR operator API (HTTPS, mutual TLS)            [0.0.0.0:15014]
    --sidecar-listen ADDR  sidecar API (gRPC, mutual TLS)              [0.0.0.0:15012]
    -h, --help             this text
    -V, --version          version

ENVIRONMENT:
    SIGIL_LOG              log level: error, warn, info (default), debug, trace

EXIT CODES:
    0 clean shutdown (SIGTERM/SIGINT); 1 runtime failure; 2 invalid arguments";

fn main() -> ExitCode {
    let mut data_dir = None;
    let mut etcd = None;
    let (mut etcd_ca, mut etcd_cert, mut etcd_key) = (None, None, None);
    let mut etcd_insecure = false;
    let (mut cert, mut key, mut bundle_dir) = (None, None, None);
    let mut operators = Vec::new();
    let mut listen: SocketAddr = ([0, 0, 0, 0], 15014).into();
    let mut sidecar_listen: SocketAddr = ([0, 0, 0, 0], 15012).into();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
                "--store" => {
                    let v = value()?;
                    let spec = v
                        .strip_prefix("etcd://")
                        .ok_or(format!("--store {v:?}: expected etcd://host:port[/prefix]"))?;
                    etcd = Some(spec.to_string());
                }
                "--etcd-ca" => etcd_ca = Some(PathBuf::from(value()?)),
                "--etcd-cert" => etcd_cert = Some(PathBuf::from(value()?)),
                "--etcd-key" => etcd_key = Some(PathBuf::from(value()?)),
                "--etcd-insecure" => etcd_insecure = true,
                "--cert" => cert = Some(PathBuf::from(value()?)),
                "--key" => key = Some(PathBuf::from(value()?)),
                "--bundle-dir" => bundle_dir = Some(PathBuf::from(value()?)),
                "--operator" => {
                    let v = value()?;
                    operators
                        .push(IdPattern::parse(&v).map_err(|e| format!("--operator {v:?}: {e}"))?)
                }
                "--operator-listen" => {
                    let v = value()?;
                    listen = v
                        .parse()
                        .map_err(|_| format!("--operator-listen {v:?}: expected ip:port"))?
                }
                "--sidecar-listen" => {
                    let v = value()?;
                    sidecar_listen = v
                        .parse()
                        .map_err(|_| format!("--sidecar-listen {v:?}: expected ip:port"))?
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                "-V" | "--version" => {
                    println!("sigil-control {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("sigil-control: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let etcd_flags = etcd_ca.is_some() || etcd_cert.is_some() || etcd_key.is_some();
    let store = match (data_dir, etcd) {
        (Some(_), None) if etcd_flags || etcd_insecure => {
            eprintln!("sigil-control: --etcd-ca, --etcd-cert, --etcd-key and --etcd-insecure go with --store etcd://\n\n{USAGE}");
            return ExitCode::from(2);
        }
        (Some(d), None) => StoreSpec::Sqlite(d),
        (None, Some(e)) => {
            let tls = match (etcd_ca, etcd_cert, etcd_key, etcd_insecure) {
                (Some(ca), Some(cert), Some(key), false) => EtcdTls::Mutual { ca, cert, key },
                (None, None, None, true) => EtcdTls::Insecure,
                (_, _, _, true) => {
                    eprintln!("sigil-control: --etcd-insecure contradicts --etcd-ca/--etcd-cert/--etcd-key; choose TLS or plaintext\n\n{USAGE}");
                    return ExitCode::from(2);
                }
                _ => {
                    eprintln!("sigil-control: --store etcd:// needs --etcd-ca, --etcd-cert and --etcd-key (TLS with a client certificate), or --etcd-insecure for plaintext\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            StoreSpec::Etcd(e, tls)
        }
        _ => {
            eprintln!(
                "sigil-control: exactly one of --data-dir and --store is required\n\n{USAGE}"
            );
            return ExitCode::from(2);
        }
    };
    let (Some(cert), Some(key), Some(bundle_dir)) = (cert, key, bundle_dir) else {
        eprintln!("sigil-control: --cert, --key and --bundle-dir are required\n\n{USAGE}");
        return ExitCode::from(2);
    };
    if operators.is_empty() {
        eprintln!("sigil-control: at least one --operator PATTERN is required (nobody could use the operator API)\n\n{USAGE}");
        return ExitCode::from(2);
    }
    init_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let listen = Listen {
        operator: listen,
        sidecar: sidecar_listen,
    };
    match rt.block_on(run(store, cert, key, bundle_dir, operators, listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

struct Listen {
    operator: SocketAddr,
    sidecar: SocketAddr,
}

enum StoreSpec {
    Sqlite(PathBuf),
    Etcd(String, EtcdTls),
}

/// Why `sigil-control` could not start (exit code 1).
#[derive(Debug)]
enum StartError {
    Identity(identity::LoadError),
    Store(StoreError),
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

async fn run(
    store: StoreSpec,
    cert: PathBuf,
    key: PathBuf,
    bundle_dir: PathBuf,
    operators: Vec<IdPattern>,
    listen: Listen,
) -> Result<(), StartError> {
    let id = identity::load(&cert, &key, &bundle_dir)?;
    let store = match store {
        StoreSpec::Sqlite(dir) => Store::Sqlite(Sqlite::open(&dir)?),
        StoreSpec::Etcd(spec, tls) => {
            if matches!(tls, EtcdTls::Insecure) {
                warn!(
                    "plaintext to etcd (--etcd-insecure): anyone on the path can read and change every policy and revocation"
                );
            }
            Store::Etcd(Box::new(Etcd::connect(&spec, &tls).await?))
        }
    };
    let version = store.version().await?;
    let server = sigil_filters::tls::server_config(
        &id.local,
        id.bundles.clone(),
        Arc::default(),
        id.provider.clone(),
    );
    let operator_listener = tokio::net::TcpListener::bind(listen.operator)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen.operator,
            api: "operator API",
            source,
        })?;
    let sidecar_listener = tokio::net::TcpListener::bind(listen.sidecar)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen.sidecar,
            api: "sidecar API",
            source,
        })?;
    let catalog = Catalog::load(&store).await?;
    for problem in &catalog.unreadable {
        error!("stored resource not sent to any sidecar: {problem}");
    }
    let hub = Arc::new(Hub::new(catalog));
    info!(
        "{} ready; operator API on {}; sidecar API on {}; store {} at version {version}",
        id.local.id(),
        listen.operator,
        listen.sidecar,
        store.describe()
    );
    let api = Arc::new(Api {
        store,
        operators,
        hub: hub.clone(),
    });
    if let Store::Etcd(etcd) = &api.store {
        // Changes made through any replica reach this one's sidecars.
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
    let retrying = api.clone();
    tokio::spawn(async move { retrying.hub.retry_publishes(&retrying.store).await });
    let reloading = api.clone();
    tokio::spawn(async move { reloading.hub.reload_on_request(&reloading.store).await });
    let acceptor = TlsAcceptor::from(server);
    tokio::select! {
        _ = operator::serve(operator_listener, acceptor.clone(), api) => {}
        _ = sidecars::serve(sidecar_listener, acceptor, hub) => {}
        _ = shutdown() => info!("stopping"),
    }
    Ok(())
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
