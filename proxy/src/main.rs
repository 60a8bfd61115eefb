//! sigil-proxy: the Sigil sidecar. See `--help`.

mod admin;
mod admission;
mod alloc;
mod conns;
mod control;
mod http;
mod identity;
mod inbound;
mod l7;
mod logs;
mod metrics;
mod outbound;
mod outbound_http;
mod pool;
mod proxy;
mod relay;
mod resources;
mod workers;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::UnixTime;
use sigil_config::proxy_config::Mode;
use sigil_config::{Policy, ProxyConfig, Revocation};
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::tls;
use sigil_filters::Revocations;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::conns::{Direction, Kind};
use crate::identity::{Change, Current, IdentityFiles, Seen, POLL_INTERVAL};
use crate::metrics::{LocalLabels, Metrics};
use crate::proxy::Proxy;

const USAGE: &str = "\
sigil-proxy — Sigil sidecar: SPIFFE mTLS between workloads, per-port identity authorization

USAGE:
    sigil-proxy --config FILE [--check]

OPTIONS:
    --config FILE   ProxyConfig YAML (apiVersion: sigil.dev/v1, kind: ProxyConfig)
    --check         validate the config and the identity files, then exit
    -h, --help      this text
    -V, --version   version

ENVIRONMENT:
    SIGIL_LOG       log level: error, warn, info (default), debug, trace

EXIT CODES:
    0 clean shutdown (SIGTERM/SIGINT, after draining); 1 runtime failure (bad identity
    files at start, address in use); 2 invalid config or arguments";

fn main() -> ExitCode {
    let mut config = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => config = args.next().map(PathBuf::from),
            "--check" => check = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("sigil-proxy {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("sigil-proxy: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = config else {
        eprintln!("sigil-proxy: --config FILE is required\n\n{USAGE}");
        return ExitCode::from(2);
    };
    init_logging();
    let cfg = match ProxyConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sigil-proxy: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cfg, check)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("sigil-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

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

async fn run(cfg: ProxyConfig, check: bool) -> Result<(), String> {
    let provider = tls::provider();
    let mut files = IdentityFiles::from_config(&cfg);
    let mut seen = Seen::default();
    let state = files
        .load(&mut seen, &provider)
        .map_err(|e| format!("cannot load identity: {e}"))?;
    if check {
        println!(
            "config and identity OK: {} (SVID {} valid until {} Unix time; trust domains {:?})",
            cfg.metadata.name,
            state.identity.id(),
            state.identity.not_after(),
            state.bundles.domains()
        );
        return Ok(());
    }
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
    let mut policy_files = resources::policy_files(&cfg);
    let file_policies = match policy_files.poll() {
        Some(Err(problems)) => {
            return Err(format!("invalid policies:\n  {}", problems.join("\n  ")));
        }
        Some(Ok(set)) => resources::FilePolicies::new(set, state.identity.id()),
        None => resources::FilePolicies::default(),
    };
    if policy_files.is_configured() {
        metrics.reload("policy", true);
        info!(policies = file_policies.total(), "policies loaded");
    }
    let mut revocation_files = resources::revocation_files(&cfg);
    let file_revocations = match revocation_files.poll() {
        Some(Err(problems)) => {
            return Err(format!("invalid revocations:\n  {}", problems.join("\n  ")));
        }
        Some(Ok(set)) => set.resources,
        None => Vec::new(),
    };
    // The last snapshot accepted from the control plane, served until a newer one arrives.
    let pushed = match &cfg.spec.control_plane {
        Some(cp) => {
            control::load_persisted(&cfg, &cfg.resolve(&cp.state_dir), &state.identity, &metrics)
        }
        None => None,
    };
    let sources = proxy::Sources {
        file_bundles: state.bundles.clone(),
        file_policies,
        file_revocations,
        pushed,
    };
    let pushed_bundles = sources.pushed.as_ref().is_some_and(|p| p.bundles.is_some());
    let threads = cfg
        .spec
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let serving = workers::Workers::start(threads)
        .map_err(|e| format!("cannot start worker threads: {e}"))?;
    let admission = admission::Admission::new(conn_limits(&cfg));
    let p = Arc::new(Proxy::new(
        cfg,
        Current::new(state),
        metrics,
        sources,
        serving,
        admission,
    ));
    // Parsing the policy files peaked at several times what is kept.
    alloc::release_free_memory();
    if pushed_bundles {
        install_bundles(&p);
    }
    if revocation_files.is_configured() {
        p.metrics.reload("revocation", true);
    }
    if !p.revocations().is_empty() {
        install_revocations(&p);
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let spec = &p.cfg.spec;
    let admin = bind(spec.admin.listen, "admin").await?;
    let admin_room = admission::Admission::new(admin::LIMITS);
    spawn_accept(
        admin,
        shutdown_rx.clone(),
        p.clone(),
        move |p, tcp, peer, _| admin::serve_conn(p, &admin_room, tcp, peer),
    );
    if spec.mode == Mode::Transparent {
        let l = bind(spec.inbound.listen, "inbound").await?;
        spawn_accept(
            l,
            shutdown_rx.clone(),
            p.clone(),
            |p, tcp, peer, local| match original_dst(&tcp) {
                Some(dst) if dst != local => {
                    let Some(room) = admit_inbound(&p, peer) else {
                        return;
                    };
                    tokio::spawn(async move {
                        let multiplexed = workers::offers_multiplexed(&tcp).await;
                        let workers = p.workers.clone();
                        workers.serve(tcp, multiplexed, move |tcp, load| {
                            inbound::handle(p, tcp, load, peer, dst.port(), room)
                        });
                    });
                }
                _ => {
                    let tls = p.tls.get();
                    logs::limited!(info, %peer, "inbound refused: not redirected (no original destination)");
                    p.refused(
                        Direction::Inbound,
                        &tls.local_label,
                        metrics::UNAUTHENTICATED_PEER.into(),
                        "not_redirected",
                    );
                }
            },
        );
        let l = bind(spec.outbound.listen, "outbound").await?;
        spawn_accept(
            l,
            shutdown_rx.clone(),
            p.clone(),
            |p, tcp, peer, local| match original_dst(&tcp) {
                Some(dst) if dst != local => {
                    let Some(room) = admit_outbound(&p, peer) else {
                        return;
                    };
                    let workers = p.workers.clone();
                    workers.serve(tcp, false, move |tcp, load| {
                        outbound::handle(p, tcp, load, dst, None, room)
                    });
                }
                _ => {
                    let tls = p.tls.get();
                    logs::limited!(info, %peer, "outbound refused: not redirected (no original destination)");
                    p.refused(
                        Direction::Outbound,
                        &tls.local_label,
                        "unknown".into(),
                        "not_redirected",
                    );
                }
            },
        );
    }
    for l in &spec.inbound.explicit {
        let port = l.value.port;
        let listener = bind(l.value.listen, "inbound.explicit").await?;
        spawn_accept(
            listener,
            shutdown_rx.clone(),
            p.clone(),
            move |p, tcp, peer, _| {
                let Some(room) = admit_inbound(&p, peer) else {
                    return;
                };
                tokio::spawn(async move {
                    let multiplexed = workers::offers_multiplexed(&tcp).await;
                    let workers = p.workers.clone();
                    workers.serve(tcp, multiplexed, move |tcp, load| {
                        inbound::handle(p, tcp, load, peer, port, room)
                    });
                });
            },
        );
    }
    for l in &spec.outbound.explicit {
        let (upstream, expected) = (l.value.upstream, l.value.expected_id.clone());
        let listener = bind(l.value.listen, "outbound.explicit").await?;
        spawn_accept(
            listener,
            shutdown_rx.clone(),
            p.clone(),
            move |p, tcp, peer, _| {
                let Some(room) = admit_outbound(&p, peer) else {
                    return;
                };
                let workers = p.workers.clone();
                let expected = expected.clone();
                workers.serve(tcp, false, move |tcp, load| {
                    outbound::handle(p, tcp, load, upstream, expected, room)
                });
            },
        );
    }
    if let Some(cp) = p.cfg.spec.control_plane.clone() {
        tokio::spawn(control::run(p.clone(), cp));
    }
    spawn_watcher(
        p.clone(),
        files,
        seen,
        provider,
        policy_files,
        revocation_files,
    );
    info!(name = %p.cfg.metadata.name, mode = ?p.cfg.spec.mode, "sigil-proxy ready");

    wait_for_signal().await;
    let deadline = p.cfg.spec.timeouts.drain;
    info!(
        live = p.conns.len(),
        "shutting down: no new connections; draining up to {deadline:?}"
    );
    p.start_drain();
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(deadline, p.conns.wait_empty())
        .await
        .is_err()
    {
        let n = p.conns.close_where("shutdown", |_| true);
        warn!(
            closed = n,
            "drain deadline passed; closing remaining connections"
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), p.conns.wait_empty()).await;
    }
    info!("sigil-proxy stopped");
    Ok(())
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

/// Accepts until shutdown; `on_conn(proxy, stream, peer addr, listener addr)`.
fn spawn_accept<F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    p: Arc<Proxy>,
    on_conn: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, SocketAddr) + Send + 'static,
{
    let local = listener
        .local_addr()
        .expect("bound listener has an address");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        on_conn(p.clone(), tcp, peer, local);
                    }
                    // EMFILE and friends: back off instead of spinning.
                    Err(e) => {
                        warn!(%local, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// `spec.limits`, the default bound on connections taken from the descriptor limit (raised
/// to its hard maximum here).
fn conn_limits(cfg: &ProxyConfig) -> sigil_filters::limits::ConnLimits {
    let l = &cfg.spec.limits;
    let fds = admission::raise_fd_limit();
    let fits = admission::default_max_connections(fds, l.fd_reserve);
    let connections = l.max_connections.unwrap_or(fits);
    if connections > fits {
        warn!(
            fd_limit = fds,
            max_connections = connections,
            "limits.maxConnections is above what the descriptor limit holds at two descriptors a connection after limits.fdReserve ({fits}): a flood can take the descriptors the sidecar needs for its own workload"
        );
    }
    info!(
        fd_limit = fds,
        max_connections = connections,
        per_source = l.max_connections_per_source,
        pending_handshakes = l.max_pending_handshakes,
        "connection limits"
    );
    sigil_filters::limits::ConnLimits {
        connections,
        connections_per_source: l.max_connections_per_source,
        handshakes: l.max_pending_handshakes,
        handshakes_per_source: l.max_pending_handshakes_per_source,
    }
}

/// Room for an inbound connection from `peer` (`admission`), or None: refused, counted and
/// logged (rate-limited), and the socket closed by the caller dropping it.
fn admit_inbound(p: &Proxy, peer: SocketAddr) -> Option<(admission::Slot, admission::Handshake)> {
    match p.admission.inbound(peer.ip()) {
        Ok(room) => Some(room),
        Err(why) => {
            refuse_over_limit(p, Direction::Inbound, peer, why);
            None
        }
    }
}

/// Room for an outbound connection from our workload, or None (see `admit_inbound`).
fn admit_outbound(p: &Proxy, peer: SocketAddr) -> Option<admission::Slot> {
    match p.admission.total_only() {
        Ok(slot) => Some(slot),
        Err(why) => {
            refuse_over_limit(p, Direction::Outbound, peer, why);
            None
        }
    }
}

fn refuse_over_limit(
    p: &Proxy,
    direction: Direction,
    peer: SocketAddr,
    why: sigil_filters::limits::Refusal,
) {
    let tls = p.tls.get();
    p.refused(
        direction,
        &tls.local_label,
        metrics::UNAUTHENTICATED_PEER.into(),
        why.label(),
    );
    logs::limited!(warn, %peer, direction = direction.label(), reason = why.label(), "connection refused: {why}");
}

/// The destination before iptables REDIRECT rewrote it.
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if tcp.local_addr().ok()?.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    addr.ok()?.as_socket()
}

fn set_expiry(m: &Metrics, local: &Arc<str>, not_after: u64) {
    m.svid_expiry
        .get_or_create(&LocalLabels {
            local_id: local.clone(),
        })
        .set(not_after as i64);
}

/// Polls the identity and policy files on a plain thread (tiny blocking reads) and applies
/// changes; re-checks live TCP connections against policy every second, for expiry.
fn spawn_watcher(
    p: Arc<Proxy>,
    files: IdentityFiles,
    mut seen: Seen,
    provider: Arc<rustls::crypto::CryptoProvider>,
    mut policy_files: resources::ResourceDir<Policy>,
    mut revocation_files: resources::ResourceDir<Revocation>,
) {
    std::thread::Builder::new()
        .name("identity-watch".into())
        .spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(POLL_INTERVAL);
                for change in files.poll(&mut seen, &provider) {
                    apply(&p, change);
                }
                let changed = match policy_files.poll() {
                    None => false,
                    Some(Err(problems)) => {
                        for problem in &problems {
                            error!(
                                "policy update refused, keeping the current policies: {problem}"
                            );
                        }
                        p.metrics.reload("policy", false);
                        false
                    }
                    Some(Ok(set)) => {
                        let local = p.tls.get().identity.id().clone();
                        let set = resources::FilePolicies::new(set, &local);
                        let n = set.total();
                        p.sources.lock().expect("sources lock").file_policies = set;
                        p.refresh_policy();
                        alloc::release_free_memory();
                        p.metrics.reload("policy", true);
                        info!(policies = n, "policies updated");
                        true
                    }
                };
                if changed || tick % 4 == 0 {
                    recheck_tcp(&p);
                }
                match revocation_files.poll() {
                    None => {}
                    Some(Err(problems)) => {
                        for problem in &problems {
                            error!("revocation update refused, keeping the current set: {problem}");
                        }
                        p.metrics.reload("revocation", false);
                    }
                    Some(Ok(set)) => {
                        p.metrics.reload("revocation", true);
                        p.sources.lock().expect("sources lock").file_revocations = set.resources;
                        install_revocations(&p);
                    }
                }
            }
        })
        .expect("spawn identity watcher");
}

/// Closes live inbound TCP connections that the current policy no longer allows, including
/// those on ports now declared HTTP, whose requests must each be checked. (HTTP connections
/// are checked on every request.)
pub(crate) fn recheck_tcp(p: &Proxy) {
    let index = p.policy();
    let now = proxy::now_unix();
    let n = p.conns.close_where("policy_change", |c| {
        c.direction == Direction::Inbound
            && c.kind == Kind::Tcp
            && (index.is_http(c.port) || !index.decide_tcp(&c.peer, c.port, now).allowed)
    });
    if n > 0 {
        warn!(
            closed = n,
            "closed live connections that policy no longer allows"
        );
    }
}

fn apply(p: &Proxy, change: Change) {
    match change {
        Change::Svid(Ok(identity)) => {
            let id_changed = identity.id() != p.tls.get().identity.id();
            info!(id = %identity.id(), not_after = identity.not_after(), "SVID rotated; new handshakes use it");
            let local: Arc<str> = identity.id().as_str().into();
            set_expiry(&p.metrics, &local, identity.not_after());
            p.tls.set_identity(identity);
            if id_changed {
                // Policies are compiled for our own ID.
                p.refresh_policy();
            }
            p.metrics.reload("svid", true);
        }
        Change::Svid(Err(e)) => {
            error!("SVID update refused, keeping the current one: {e}");
            p.metrics.reload("svid", false);
        }
        Change::Bundles(bundles, problems) => {
            for problem in &problems {
                error!("trust bundle update refused: {problem}");
                p.metrics.reload("bundle", false);
            }
            let Some(bundles) = bundles else { return };
            info!(trust_domains = ?bundles.domains(), "trust bundle files updated");
            p.sources.lock().expect("sources lock").file_bundles = bundles;
            p.metrics.reload("bundle", true);
            install_bundles(p);
        }
    }
}

/// Puts the bundles in force (files, overlaid with pushed TrustBundles) for new handshakes,
/// and closes every live connection whose peer no longer verifies: verifiers run only at
/// handshake time.
pub(crate) fn install_bundles(p: &Proxy) {
    let _installing = p.installing.lock().expect("install lock");
    let bundles = p.bundles();
    info!(trust_domains = ?bundles.domains(), "trust bundles in force");
    p.tls.set_bundles(bundles.clone());
    let provider = tls::provider();
    let now = UnixTime::now();
    let algs = &provider.signature_verification_algorithms;
    let n = p.conns.close_where("bundle_change", |c| {
        if c.kind == Kind::Workload {
            // No peer certificate: its pooled connections are re-checked instead.
            return false;
        }
        let usage = match c.direction {
            Direction::Inbound => Usage::Client,
            Direction::Outbound => Usage::Server,
        };
        let Some((leaf, rest)) = c.chain.split_first() else {
            return true;
        };
        verify_svid(&bundles, algs, leaf, rest, now, usage).is_err()
    });
    if n > 0 {
        warn!(
            closed = n,
            "closed live connections whose peer no longer verifies"
        );
    }
}

fn log_revocations(list: &[Revocation]) {
    for r in list {
        let before = r.spec.issued_before.map(|t| t.0);
        warn!(id = %r.spec.spiffe_id, revocation = %r.metadata.name, issued_before_unix = ?before, reason = %r.spec.reason, "revocation in force");
    }
}

/// Puts a new set of revocations in force: new handshakes check it at once, and every live
/// connection whose peer it covers is closed (`revoked`). If it covers our own SVID, every
/// connection is closed and none is made or accepted until a fresh SVID arrives.
pub(crate) fn install_revocations(p: &Proxy) {
    let _installing = p.installing.lock().expect("install lock");
    apply_revocations(p, &p.revocations());
}

fn apply_revocations(p: &Proxy, list: &[Revocation]) {
    let revocations = Arc::new(Revocations::new(list));
    p.tls.set_revocations(revocations.clone());
    let tls = p.tls.get();
    if let Some(r) = tls.self_revoked() {
        error!(revocation = %r.metadata.name, reason = %r.spec.reason, "our own SVID is revoked: closing every connection and presenting it to nobody until a fresh one arrives");
        let n = p.conns.close_where("revoked", |_| true);
        warn!(
            closed = n,
            "closed live connections: our own SVID is revoked"
        );
        return;
    }
    info!(revocations = revocations.len(), "revocations updated");
    log_revocations(list);
    let n = p.conns.close_where("revoked", |c| {
        // Workload connections carry no peer certificate; their pooled connections do.
        c.kind != Kind::Workload
            && c.chain
                .first()
                .is_some_and(|leaf| revocations.check(&c.peer, leaf).is_err())
    });
    if n > 0 {
        warn!(closed = n, "closed live connections of revoked identities");
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
