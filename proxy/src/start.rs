//! Starting and stopping the sidecar: load the identity and every source, build the shared
//! state, open the listeners and the control-plane stream, wait for SIGTERM, then drain.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sigil_config::proxy_config::SvidSource;
use sigil_config::ProxyConfig;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admission::{self, Admission};
use crate::identity::{Current, IdentityFiles, Seen, TlsState};
use crate::install::set_expiry;
use crate::listeners::{self, BindError};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reasons::CloseReason;
use crate::resources::{self, FilePolicies};
use crate::sources::Sources;
use crate::watch::Watched;
use crate::workers::Workers;
use crate::{alloc, control, watch as watcher};

/// Why the sidecar did not start (exit code 1).
#[derive(Debug)]
pub enum StartError {
    /// The SVID or the trust bundles at start.
    Identity(crate::identity::FileProblem),
    /// The policy or revocation directory at start, with every problem found.
    Resources {
        kind: &'static str,
        problems: Vec<crate::resources::ResourceProblem>,
    },
    Workers(std::io::Error),
    Bind(BindError),
    /// No SVID from the control plane (a refusal; an unreachable one is waited for).
    Issue(crate::issuance::IssueError),
    /// The Workload API's socket cannot be made.
    WorkloadApi(std::path::PathBuf, std::io::Error),
    /// The audit spool cannot be opened.
    Audit(crate::spool::SpoolError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity(e) => write!(f, "cannot load identity: {e}"),
            Self::Resources { kind, problems } => {
                write!(f, "invalid {kind}:")?;
                for problem in problems {
                    write!(f, "\n  {problem}")?;
                }
                Ok(())
            }
            Self::Workers(e) => write!(f, "cannot start worker threads: {e}"),
            Self::Bind(e) => write!(f, "{e}"),
            Self::Issue(e) => write!(f, "cannot get an SVID: {e}"),
            Self::Audit(e) => write!(f, "audit spool (audit.spoolDir): {e}"),
            Self::WorkloadApi(path, e) => write!(
                f,
                "cannot serve the Workload API on {} (workloadApi.socket): {e}",
                path.display()
            ),
        }
    }
}

impl From<BindError> for StartError {
    fn from(e: BindError) -> Self {
        Self::Bind(e)
    }
}

/// `--check`: the config parsed; loads the identity files and says what they hold. An SVID
/// the control plane issues is not asked for: the bundles are checked, and the join token
/// file must be readable.
pub fn check(cfg: &ProxyConfig) -> Result<String, StartError> {
    let provider = sigil_filters::tls::provider();
    if let SvidSource::Issued { join_token_file } = cfg.spec.identity.source() {
        let files = IdentityFiles::from_config(cfg);
        let bundles = files.bundles_now().map_err(StartError::Identity)?;
        let token = cfg.resolve(&join_token_file);
        std::fs::metadata(&token).map_err(|e| {
            StartError::Issue(crate::issuance::IssueError::Token(
                token.clone(),
                e.to_string(),
            ))
        })?;
        return Ok(format!(
            "config OK: {} (SVID from the control plane, first with the join token in {}; trust domains {:?})",
            cfg.metadata.name,
            token.display(),
            bundles.domains()
        ));
    }
    if let SvidSource::WorkloadApi { socket } = cfg.spec.identity.source() {
        return Ok(format!(
            "config OK: {} (SVID and trust bundles from the Workload API at {})",
            cfg.metadata.name,
            socket.display()
        ));
    }
    let state = IdentityFiles::from_config(cfg)
        .load(&mut Seen::default(), &provider)
        .map_err(StartError::Identity)?;
    Ok(format!(
        "config and identity OK: {} (SVID {} valid until {} Unix time; trust domains {:?})",
        cfg.metadata.name,
        state.identity.id(),
        state.identity.not_after(),
        state.bundles.domains()
    ))
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: ProxyConfig) -> Result<(), StartError> {
    let issued = match cfg.spec.identity.source() {
        SvidSource::Issued { .. } => {
            let files = IdentityFiles::from_config(&cfg);
            let bootstrap = files.bundles_now().map_err(StartError::Identity)?;
            let expected = files.expected().cloned();
            let identity = crate::issuance::at_start(&cfg, bootstrap, expected.as_ref())
                .await
                .map_err(StartError::Issue)?;
            Some(identity)
        }
        SvidSource::Files { .. } | SvidSource::WorkloadApi { .. } => None,
    };
    let from_api = match cfg.spec.identity.source() {
        SvidSource::WorkloadApi { socket } => {
            let expected = cfg.spec.identity.spiffe_id.clone();
            Some(crate::workload_client::at_start(&socket, expected.as_ref()).await)
        }
        _ => None,
    };
    let (p, watched) = load(cfg, issued, from_api)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    listeners::start(&p, &shutdown_rx).await?;
    if let Some(socket) = crate::workload_api::socket_path(&p) {
        crate::workload_api::start(p.clone(), &socket)
            .await
            .map_err(|e| StartError::WorkloadApi(socket, e))?;
    }
    if let Some(cp) = p.cfg.spec.control_plane.clone() {
        tokio::spawn(control::run(p.clone(), cp.clone()));
        if let Some(auditor) = p.ledger.audit.clone() {
            tokio::spawn(crate::shipper::ship(p.clone(), auditor, cp));
        }
    }
    watcher::spawn(p.clone(), watched);
    tokio::spawn(crate::issuance::renew(p.clone()));
    if let SvidSource::WorkloadApi { socket } = p.cfg.spec.identity.source() {
        tokio::spawn(crate::workload_client::follow(p.clone(), socket));
    }
    info!(name = %p.cfg.metadata.name, mode = ?p.cfg.spec.mode, "sigil-proxy ready");
    wait_for_signal().await;
    let _ = shutdown_tx.send(true);
    drain(&p).await;
    info!("sigil-proxy stopped");
    Ok(())
}

/// Loads the identity and every source and builds the shared state, with the sources' state
/// in force; returns it and what the file watcher is to poll.
/// `issued`: the SVID the control plane issued (`identity.joinTokenFile`); `from_api`: the SVID
/// and bundles a Workload API handed out (`identity.workloadApi`); neither for SVID files.
pub fn load(
    cfg: ProxyConfig,
    issued: Option<sigil_filters::LocalIdentity>,
    from_api: Option<crate::workload_client::FromApi>,
) -> Result<(Arc<Proxy>, Watched), StartError> {
    let provider = sigil_filters::tls::provider();
    let mut identity = IdentityFiles::from_config(&cfg);
    let mut seen = Seen::default();
    let api_bundles = from_api.as_ref().map(|f| f.bundles.clone());
    let state = match (issued, from_api) {
        (Some(svid), _) => identity.load_with(svid, false, &mut seen, &provider),
        (None, Some(f)) => identity.load_with(f.identity, true, &mut seen, &provider),
        (None, None) => identity.load(&mut seen, &provider),
    }
    .map_err(StartError::Identity)?;
    let metrics = Metrics::new(cfg.spec.metrics.peer_id_cap);
    set_expiry(&metrics, &state.local_label, state.identity.not_after());
    metrics.reload("svid", true);
    metrics.reload("bundle", true);
    info!(
        id = %state.identity.id(),
        not_after = state.identity.not_after(),
        trust_domains = ?state.bundles.domains(),
        "identity loaded"
    );
    let mut policies = resources::policy_files(&cfg);
    let mut revocations = resources::revocation_files(&cfg);
    let mut sources = sources(&cfg, &state, &metrics, &mut policies, &mut revocations)?;
    let pushed_bundles = sources.pushed.as_ref().is_some_and(|p| p.bundles.is_some());
    let more_bundles = pushed_bundles || api_bundles.is_some();
    sources.api_bundles = api_bundles;
    let threads = cfg
        .spec
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let serving = Workers::start(threads).map_err(StartError::Workers)?;
    let admission = Admission::new(admission::limits(&cfg));
    let audit = match &cfg.spec.audit {
        Some(spec) => {
            let dir = cfg.resolve(&spec.spool_dir);
            let auditor =
                crate::audit::Auditor::open(spec, &dir, &metrics).map_err(StartError::Audit)?;
            Some(Arc::new(auditor))
        }
        None => None,
    };
    let p = Arc::new(Proxy::new(
        cfg,
        Current::new(state),
        metrics,
        sources,
        serving,
        admission,
        audit,
    ));
    // Parsing the policy files peaked at several times what is kept.
    alloc::release_free_memory();
    if more_bundles {
        p.install_bundles();
    }
    if revocations.is_configured() {
        p.ledger.metrics.reload("revocation", true);
    }
    if !p.revocations().is_empty() {
        p.install_revocations();
    }
    let watched = Watched {
        identity,
        seen,
        policies,
        revocations,
    };
    Ok((p, watched))
}

/// The policy and revocation files as they are at start (every one must be valid), and the
/// last snapshot accepted from the control plane, served until a newer one arrives.
fn sources(
    cfg: &ProxyConfig,
    state: &TlsState,
    metrics: &Metrics,
    policies: &mut resources::ResourceDir<sigil_config::Policy>,
    revocations: &mut resources::ResourceDir<sigil_config::Revocation>,
) -> Result<Sources, StartError> {
    let file_policies = match policies.poll() {
        Some(Err(problems)) => {
            let kind = "policies";
            return Err(StartError::Resources { kind, problems });
        }
        Some(Ok(set)) => FilePolicies::new(set, state.identity.id()),
        None => FilePolicies::default(),
    };
    if policies.is_configured() {
        metrics.reload("policy", true);
        info!(policies = file_policies.total(), "policies loaded");
    }
    let file_revocations = match revocations.poll() {
        Some(Err(problems)) => {
            let kind = "revocations";
            return Err(StartError::Resources { kind, problems });
        }
        Some(Ok(set)) => set.resources,
        None => Vec::new(),
    };
    let pushed = cfg.spec.control_plane.as_ref().and_then(|cp| {
        control::load_persisted(cfg, &cfg.resolve(&cp.state_dir), &state.identity, metrics)
    });
    Ok(Sources {
        file_bundles: state.bundles.clone(),
        api_bundles: None,
        file_policies,
        file_revocations,
        pushed,
    })
}

/// Stops taking connections, lets HTTP connections finish their requests, and closes what
/// is left at the drain deadline (`timeouts.drain`).
async fn drain(p: &Proxy) {
    let deadline = p.cfg.spec.timeouts.drain;
    let conns = &p.ledger.conns;
    info!(
        live = conns.waited_for(),
        "shutting down: no new connections; draining up to {deadline:?}"
    );
    conns.start_drain();
    if tokio::time::timeout(deadline, conns.wait_empty())
        .await
        .is_err()
    {
        let n = conns.close_where(CloseReason::Shutdown, |_| true);
        warn!(
            closed = n,
            "drain deadline passed; closing remaining connections"
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait_empty()).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
