//! The sidecar API of `sigil-control` (15012), gRPC over HTTP/2 and TLS 1.3:
//! - `sigil.v1.Mesh/Subscribe`, mutual TLS: the verified SPIFFE ID of the client decides what
//!   it gets, the snapshot for that identity and nothing else. Each stream gets a snapshot at
//!   once and again whenever a store change alters what its identity gets; acknowledgements
//!   are recorded per stream for `sigil status`.
//! - `sigil.v1.Identity/Issue` (`issuer`): an SVID for a CSR, to a caller authenticated by its
//!   SVID or, on first contact, without one, by a join token. So the listener lets clients in
//!   without a certificate, and `Subscribe` refuses them (Unauthenticated).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_api::{Ack, Snapshot};
use sigil_config::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::{error, info, warn};

use crate::audit_store::{AuditStore, Break};
use crate::issuer::{Caller, Issuer};
use crate::metrics::{AuditLabels, IssuanceLabels, Metrics, SidecarLabels};
use crate::own_audit::{chain_break, OwnAudit};
use crate::snapshot::Catalog;
use crate::store::Store;
use crate::stored::{IssuanceRecord, StoreError};

/// The published catalog and the sidecars connected to this replica.
pub struct Hub {
    catalog: watch::Sender<Arc<Catalog>>,
    pub metrics: Metrics,
    /// Woken when a publish failed (the store did not answer): `retry_publishes` tries again.
    retry: tokio::sync::Notify,
    /// Woken when a sidecar runs a newer snapshot than this replica's catalog: the catalog
    /// is behind its store (a watch event not yet seen), and `reload_on_request` reads it.
    reload: tokio::sync::Notify,
    sidecars: Mutex<HashMap<u64, SidecarStatus>>,
    next: AtomicU64,
    /// The latest SVID issuance refusals on this replica, oldest first (`sigil status`).
    refusals: Mutex<std::collections::VecDeque<String>>,
    /// Join-token attempts in the current second, per source address.
    anonymous: Mutex<(u64, HashMap<std::net::IpAddr, u32>)>,
    /// Connections without a certificate open now, per source address (`AnonymousConn`).
    anonymous_conns: Mutex<HashMap<std::net::IpAddr, u32>>,
    /// This control plane's own audit records, with an audit store (set once at start).
    pub own_audit: std::sync::OnceLock<Arc<OwnAudit>>,
}

/// How many issuance refusals `sigil status` shows per replica.
const REFUSALS_KEPT: usize = 20;
/// The largest `IssueRequest` read: a CSR of the 4 KiB `check_csr` reads, a token, a name.
const MAX_ISSUE_REQUEST: usize = 8 * 1024;
/// Join-token attempts (`Issue` without an SVID) per source address per second: guessing a
/// 256-bit token is hopeless, but every attempt costs a store lookup.
const ANONYMOUS_PER_SECOND: u32 = 10;
/// Connections without a certificate open at once, per source address and in all: a first
/// contact needs one, for one call. Those past either bound are closed at once.
const ANONYMOUS_PER_SOURCE: u32 = 8;
const ANONYMOUS_TOTAL: u32 = 1024;
/// How long a connection without a certificate may stay open.
const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(30);

/// A connection without a certificate, counted against `ANONYMOUS_PER_SOURCE` and
/// `ANONYMOUS_TOTAL` while it lives.
struct AnonymousConn {
    hub: Arc<Hub>,
    source: std::net::IpAddr,
}

impl AnonymousConn {
    fn take(hub: &Arc<Hub>, source: std::net::IpAddr) -> Option<Self> {
        let mut open = hub.anonymous_conns.lock().expect("anonymous lock");
        let total: u32 = open.values().sum();
        let here = open.entry(source).or_insert(0);
        if *here >= ANONYMOUS_PER_SOURCE || total >= ANONYMOUS_TOTAL {
            if *here == 0 {
                open.remove(&source);
            }
            return None;
        }
        *here += 1;
        Some(Self {
            hub: hub.clone(),
            source,
        })
    }
}

impl Drop for AnonymousConn {
    fn drop(&mut self) {
        let mut open = self.hub.anonymous_conns.lock().expect("anonymous lock");
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// One connected stream, as `sigil status` shows it.
#[derive(Debug, Clone)]
pub struct SidecarStatus {
    pub id: SpiffeId,
    /// The sidecar's name, from its first message.
    pub node: String,
    pub addr: SocketAddr,
    pub connected_at: SystemTime,
    /// The last version sent.
    pub sent: u64,
    /// The version awaiting acknowledgement, and since when (the store change that made it,
    /// or the sending of a stream's first snapshot).
    pending: Option<(u64, Instant)>,
    /// The last version the sidecar accepted (0: none yet).
    pub acked: u64,
    /// The last version it rejected, with its reason, unless it accepted a later one.
    pub rejected: Option<(u64, String)>,
    /// What the sidecar said with its last acknowledgement (e.g. it could not persist it).
    pub note: String,
}

impl Hub {
    pub fn new(catalog: Catalog) -> Self {
        let metrics = Metrics::default();
        metrics.version.set(catalog.version as i64);
        metrics.revocations.set(catalog.revocation_count() as i64);
        Self {
            metrics,
            retry: tokio::sync::Notify::new(),
            reload: tokio::sync::Notify::new(),
            catalog: watch::Sender::new(Arc::new(catalog)),
            sidecars: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            refusals: Mutex::default(),
            anonymous: Mutex::default(),
            anonymous_conns: Mutex::default(),
            own_audit: std::sync::OnceLock::new(),
        }
    }

    /// Re-reads the store and sends every stream whose snapshot changed its new one. A failure
    /// is logged and retried in the background (`retry_publishes`): a change the store took
    /// must reach the sidecars even if reading it back failed once.
    pub async fn publish(&self, store: &Store) -> Result<u64, StoreError> {
        let catalog = match Catalog::load(store).await {
            Ok(c) => c,
            Err(e) => {
                error!("cannot publish, will retry: {e}");
                self.retry.notify_one();
                return Err(e);
            }
        };
        for problem in &catalog.unreadable {
            error!("stored resource not sent to any sidecar: {problem}");
        }
        let version = catalog.version;
        let revocations = catalog.revocation_count();
        // Publishes may race (an operator change and the etcd watch): never go back, and
        // do not wake every stream for a version they have.
        let newer = self.catalog.send_if_modified(|current| {
            if version > current.version {
                *current = Arc::new(catalog);
                true
            } else {
                false
            }
        });
        if newer {
            self.metrics.version.set(version as i64);
            self.metrics.revocations.set(revocations as i64);
        }
        Ok(version)
    }

    /// Retries failed publishes, one second apart, for as long as they fail. Runs forever.
    pub async fn retry_publishes(&self, store: &Store) {
        loop {
            self.retry.notified().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = self.publish(store).await;
        }
    }

    /// Reloads the catalog from the store whenever a sidecar's hello shows it behind, at
    /// most once a second however many sidecars ask (after a store restored from an older
    /// copy, every sidecar is ahead). Runs forever.
    pub async fn reload_on_request(&self, store: &Store) {
        loop {
            self.reload.notified().await;
            let _ = self.publish(store).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub fn version(&self) -> u64 {
        self.catalog.borrow().version
    }

    /// The catalog in force, followed: the CA reads Workloads and revocations from it.
    pub fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    /// Every connected stream, oldest first.
    pub fn status(&self) -> Vec<SidecarStatus> {
        let sidecars = self.sidecars.lock().expect("sidecars lock");
        let mut all: Vec<_> = sidecars.iter().map(|(k, s)| (*k, s.clone())).collect();
        all.sort_by_key(|(k, _)| *k);
        all.into_iter().map(|(_, s)| s).collect()
    }

    /// One line per connected stream: name, SPIFFE ID, address, the version sent, and
    /// whether it was acknowledged; then one per recent issuance refusal, starting with
    /// `issuance `.
    pub fn status_lines(&self) -> Vec<String> {
        let refusals = self.refusals.lock().expect("refusals lock").clone();
        self.sidecar_lines()
            .into_iter()
            .chain(refusals.into_iter().map(|r| format!("issuance {r}")))
            .collect()
    }

    /// Keeps a refusal for `sigil status`, dropping the oldest past `REFUSALS_KEPT`.
    fn record_refusal(&self, line: String) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        if refusals.len() == REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(line);
    }

    /// Whether another join-token attempt from `source` fits this second's budget.
    fn anonymous_allowed(&self, source: std::net::IpAddr) -> bool {
        let second = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut guard = self.anonymous.lock().expect("anonymous lock");
        let (current, counts) = &mut *guard;
        if *current != second {
            *current = second;
            counts.clear();
        }
        let n = counts.entry(source).or_insert(0);
        *n += 1;
        *n <= ANONYMOUS_PER_SECOND
    }

    fn sidecar_lines(&self) -> Vec<String> {
        self.status()
            .into_iter()
            .map(|s| {
                let state = match &s.rejected {
                    Some((v, why)) => format!("REJECTED {v}: {why}"),
                    None if s.acked == s.sent && s.sent != 0 && s.note.is_empty() => {
                        "acknowledged".to_string()
                    }
                    None if s.acked == s.sent && s.sent != 0 => {
                        format!("acknowledged ({})", s.note)
                    }
                    None => format!("pending (acknowledged {})", s.acked),
                };
                let node = if s.node.is_empty() { "-" } else { &s.node };
                format!("{node} {} {} sent={} {state}", s.id, s.addr, s.sent)
            })
            .collect()
    }

    fn update(&self, key: u64, f: impl FnOnce(&mut SidecarStatus)) {
        if let Some(s) = self.sidecars.lock().expect("sidecars lock").get_mut(&key) {
            f(s);
        }
    }
}

/// Accepts sidecar connections until the listener fails. `acceptor` lets clients in without
/// a certificate (`sigil_filters::tls::server_config_client_optional`); `issuer`: None
/// without a CA (`--ca-dir`), when `Issue` is refused.
pub async fn serve(
    listener: TcpListener,
    acceptor: watch::Receiver<TlsAcceptor>,
    hub: Arc<Hub>,
    issuer: Option<Arc<Issuer>>,
    audit: Option<Arc<AuditStore>>,
) {
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("sidecar accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // The one in force now: its bundles follow the CA set (`rotation`).
        let acceptor = acceptor.borrow().clone();
        let (hub, issuer, audit) = (hub.clone(), issuer.clone(), audit.clone());
        tokio::spawn(async move {
            let Some((tls, caller)) =
                crate::identity::accept_any(&acceptor, tcp, addr, "sidecar").await
            else {
                return;
            };
            // A client without a certificate is held to a few connections per address, and
            // each for a short while: it is there for one first-contact `Issue` call.
            let anonymous = match caller {
                Caller::Anonymous => match AnonymousConn::take(&hub, addr.ip()) {
                    Some(held) => Some(held),
                    None => {
                        let labels = IssuanceLabels {
                            result: "refused",
                            reason: "too_many_connections",
                        };
                        hub.metrics.issuance.get_or_create(&labels).inc();
                        return;
                    }
                },
                Caller::Svid(..) => None,
            };
            let service = hyper::service::service_fn(move |req| {
                let (hub, caller, issuer, audit) =
                    (hub.clone(), caller.clone(), issuer.clone(), audit.clone());
                async move { Ok::<_, Infallible>(route(hub, issuer, audit, caller, addr, req).await) }
            });
            // PINGs notice a sidecar host gone without a FIN (its stream, status line and
            // gauge would otherwise stay forever).
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(tls), service);
            match anonymous {
                Some(_held) => {
                    let _ = tokio::time::timeout(ANONYMOUS_LIFETIME, served).await;
                }
                None => {
                    let _ = served.await;
                }
            }
        });
    }
}

async fn route(
    hub: Arc<Hub>,
    issuer: Option<Arc<Issuer>>,
    audit: Option<Arc<AuditStore>>,
    caller: Caller,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<tonic::body::Body> {
    match req.uri().path() {
        sigil_api::SUBSCRIBE_PATH => {
            let Caller::Svid(peer, _) = caller else {
                return Status::unauthenticated(
                    "Subscribe needs an SVID: ask for one first (sigil.v1.Identity/Issue)",
                )
                .into_http();
            };
            let mut grpc = tonic::server::Grpc::new(sigil_api::server_codec());
            grpc.streaming(Subscribe { hub, peer, addr }, req).await
        }
        sigil_api::ISSUE_PATH => {
            let Some(issuer) = issuer else {
                return Status::unimplemented(
                    "this control plane issues no SVIDs: it runs without a CA (--ca-dir)",
                )
                .into_http();
            };
            // A CSR is a few hundred bytes; the check refuses more than 4 KiB with a clear
            // reason, and nothing larger is read at all.
            let mut grpc = tonic::server::Grpc::new(sigil_api::issue_server_codec())
                .max_decoding_message_size(MAX_ISSUE_REQUEST);
            let issue = Issue {
                hub,
                issuer,
                caller,
                addr,
            };
            grpc.unary(issue, req).await
        }
        sigil_api::audit::SHIP_PATH => {
            let Caller::Svid(peer, leaf) = caller else {
                return Status::unauthenticated("Ship needs an SVID").into_http();
            };
            let Some(store) = audit else {
                return Status::unimplemented(
                    "this control plane keeps no audit records (see --audit-db)",
                )
                .into_http();
            };
            let mut grpc = tonic::server::Grpc::new(sigil_api::audit::server_codec());
            let leaf = leaf.to_vec();
            grpc.streaming(
                Ship {
                    hub,
                    store,
                    peer,
                    leaf,
                },
                req,
            )
            .await
        }
        other => Status::unimplemented(format!("no method {other}")).into_http(),
    }
}

/// One sidecar's `Ship` stream: each batch ingested (in order) and acknowledged once durable.
/// Breaks of one batch logged and recorded one by one at most (`Ship`).
const BREAKS_RECORDED: usize = 10;

struct Ship {
    hub: Arc<Hub>,
    store: Arc<AuditStore>,
    peer: SpiffeId,
    /// The SVID the sidecar presented: its checkpoints must be signed with it.
    leaf: Vec<u8>,
}

impl tonic::server::StreamingService<sigil_api::audit::Batch> for Ship {
    type Response = sigil_api::audit::Ack;
    type ResponseStream = ReceiverStream<Result<sigil_api::audit::Ack, Status>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: tonic::Request<Streaming<sigil_api::audit::Batch>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(4);
        let (hub, store, peer) = (self.hub.clone(), self.store.clone(), self.peer.clone());
        let leaf = Arc::new(self.leaf.clone());
        let mut batches = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = batches.message().await {
                let chain = batch.chain.clone();
                let (s, p, l) = (store.clone(), peer.clone(), leaf.clone());
                let ingested = tokio::task::spawn_blocking(move || s.ingest(&p, &l, &batch)).await;
                let ack = match ingested {
                    Ok(Ok(got)) => {
                        let m = &hub.metrics;
                        let stored = AuditLabels { result: "stored" };
                        let duplicate = AuditLabels {
                            result: "duplicate",
                        };
                        m.audit_records
                            .get_or_create(&stored)
                            .inc_by(got.stored as u64);
                        m.audit_records
                            .get_or_create(&duplicate)
                            .inc_by(got.duplicates as u64);
                        for (i, b) in got.breaks.iter().enumerate() {
                            let kind = AuditLabels { result: b.label() };
                            m.audit_breaks.get_or_create(&kind).inc();
                            // A batch can hold a million broken records: the first ones are
                            // logged and recorded, the rest counted in one record.
                            if i < BREAKS_RECORDED {
                                warn!(sidecar = %peer, "audit chain: {b}");
                                if let Some(own) = hub.own_audit.get() {
                                    own.record(chain_break(
                                        &peer,
                                        &chain,
                                        &b.to_string(),
                                        b.label(),
                                    ));
                                }
                            }
                        }
                        let more = got.breaks.len().saturating_sub(BREAKS_RECORDED);
                        if more > 0 {
                            warn!(sidecar = %peer, "audit chain: {more} more breaks in the same batch");
                            if let Some(own) = hub.own_audit.get() {
                                let what = format!("{more} more breaks in the same batch");
                                own.record(chain_break(&peer, &chain, &what, "more"));
                            }
                        }
                        let error = got
                            .breaks
                            .iter()
                            .find(|b| matches!(b, Break::Fork { .. } | Break::Undecodable { .. }))
                            .map(|b| format!("not stored past record {}: {b}", got.durable_through))
                            .unwrap_or_default();
                        sigil_api::audit::Ack {
                            durable_through: got.durable_through,
                            error,
                        }
                    }
                    Ok(Err(e)) => {
                        error!(sidecar = %peer, "audit records not stored: {e}");
                        let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                        return;
                    }
                    Err(e) => {
                        error!(sidecar = %peer, "audit ingest failed: {e}");
                        let _ = tx.send(Err(Status::internal("audit ingest failed"))).await;
                        return;
                    }
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        std::future::ready(Ok(tonic::Response::new(ReceiverStream::new(rx))))
    }
}

/// One `Issue` call.
struct Issue {
    hub: Arc<Hub>,
    issuer: Arc<Issuer>,
    caller: Caller,
    addr: SocketAddr,
}

impl tonic::server::UnaryService<sigil_api::IssueRequest> for Issue {
    type Response = sigil_api::IssueResponse;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<Self::Response>, Status>>
                + Send,
        >,
    >;

    fn call(&mut self, req: tonic::Request<sigil_api::IssueRequest>) -> Self::Future {
        let (hub, issuer, caller, addr) = (
            self.hub.clone(),
            self.issuer.clone(),
            self.caller.clone(),
            self.addr,
        );
        Box::pin(async move { issue(&hub, &issuer, &caller, addr, req.into_inner()).await })
    }
}

/// Issues, or refuses; either way logged, counted and recorded in the store (`records`), a
/// refusal also kept for `sigil status`.
async fn issue(
    hub: &Hub,
    issuer: &Issuer,
    caller: &Caller,
    addr: SocketAddr,
    req: sigil_api::IssueRequest,
) -> Result<tonic::Response<sigil_api::IssueResponse>, Status> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // One word: it goes into `sigil status` and the issuance records between other fields.
    let node = if req.node.is_empty() {
        "-".to_string()
    } else {
        clean(&req.node).replace(' ', "_")
    };
    let who = match caller {
        Caller::Svid(id, _) => id.to_string(),
        Caller::Anonymous => "anonymous".to_string(),
    };
    if *caller == Caller::Anonymous && !hub.anonymous_allowed(addr.ip()) {
        // Not logged or kept one by one: a flood would flood the log and `sigil status`.
        let labels = IssuanceLabels {
            result: "refused",
            reason: "too_many_attempts",
        };
        hub.metrics.issuance.get_or_create(&labels).inc();
        return Err(Status::resource_exhausted(format!(
            "too_many_attempts: more than {ANONYMOUS_PER_SECOND} join-token attempts from {} this second; try again",
            addr.ip()
        )));
    }
    match issuer.issue(caller, &req, now).await {
        Ok(issued) => {
            let kind = issued.basis.label();
            info!(
                node = %node, %addr, id = %issued.id, workload = %issued.workload,
                serial = %issued.serial, not_after = %crate::issuer::rfc3339(issued.not_after),
                kind, "SVID issued"
            );
            let labels = IssuanceLabels {
                result: kind,
                reason: "",
            };
            hub.metrics.issuance.get_or_create(&labels).inc();
            issuer.records.record(IssuanceRecord {
                at: now,
                result: kind.to_string(),
                caller: who,
                node,
                addr: addr.to_string(),
                id: issued.id.to_string(),
                workload: issued.workload.clone(),
                serial: issued.serial.clone(),
                not_after: issued.not_after,
                ..IssuanceRecord::default()
            });
            Ok(tonic::Response::new(issued.response))
        }
        Err(refused) => {
            let reason = refused.label();
            // The message can carry text from the CSR (a URI SAN): one line, no forged ones.
            let said = clean(&refused.to_string());
            warn!(node = %node, %addr, caller = %who, reason, "SVID refused: {said}");
            let labels = IssuanceLabels {
                result: "refused",
                reason,
            };
            hub.metrics.issuance.get_or_create(&labels).inc();
            hub.record_refusal(format!(
                "REFUSED {} {node} {addr} {who} {reason}: {said}",
                crate::issuer::rfc3339(now)
            ));
            let message = format!("{reason}: {said}");
            issuer.records.record(IssuanceRecord {
                at: now,
                result: "refused".into(),
                reason: reason.into(),
                caller: who,
                node,
                addr: addr.to_string(),
                workload: clean(&req.for_workload),
                message: message.clone(),
                ..IssuanceRecord::default()
            });
            Err(Status::new(refused.code(), message))
        }
    }
}

struct Subscribe {
    hub: Arc<Hub>,
    peer: SpiffeId,
    addr: SocketAddr,
}

type Snapshots = ReceiverStream<Result<Snapshot, Status>>;

impl tonic::server::StreamingService<Ack> for Subscribe {
    type Response = Snapshot;
    type ResponseStream = Snapshots;
    type Future = std::future::Ready<Result<tonic::Response<Snapshots>, Status>>;

    fn call(&mut self, req: tonic::Request<Streaming<Ack>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(2);
        let (hub, peer, addr) = (self.hub.clone(), self.peer.clone(), self.addr);
        tokio::spawn(session(hub, peer, addr, req.into_inner(), tx));
        std::future::ready(Ok(tonic::Response::new(ReceiverStream::new(rx))))
    }
}

/// One sidecar's stream: a snapshot now and on every change that concerns it; its
/// acknowledgements recorded until it goes away.
async fn session(
    hub: Arc<Hub>,
    peer: SpiffeId,
    addr: SocketAddr,
    mut acks: Streaming<Ack>,
    tx: mpsc::Sender<Result<Snapshot, Status>>,
) {
    let key = hub.next.fetch_add(1, Ordering::Relaxed);
    hub.sidecars.lock().expect("sidecars lock").insert(
        key,
        SidecarStatus {
            id: peer.clone(),
            node: String::new(),
            addr,
            connected_at: SystemTime::now(),
            sent: 0,
            pending: None,
            acked: 0,
            rejected: None,
            note: String::new(),
        },
    );
    info!("sidecar {peer} connected from {addr}");
    hub.metrics.connected.inc();
    let why = serve_stream(&hub, key, &peer, addr, &mut acks, &tx).await;
    hub.sidecars.lock().expect("sidecars lock").remove(&key);
    hub.metrics.connected.dec();
    info!("sidecar {peer} at {addr} disconnected: {why}");
}

/// How long a new stream may take to say hello before it is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the hello, then sends snapshots until the stream ends; returns why it ended.
async fn serve_stream(
    hub: &Hub,
    key: u64,
    peer: &SpiffeId,
    addr: SocketAddr,
    acks: &mut Streaming<Ack>,
    tx: &mpsc::Sender<Result<Snapshot, Status>>,
) -> &'static str {
    // The hello says which snapshot the sidecar runs; nothing older of its epoch is sent.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, acks.message()).await {
        Err(_) => return "no hello",
        Ok(Ok(Some(hello))) => hello,
        Ok(Ok(None)) => return "sidecar ended the stream",
        Ok(Err(_)) => return "stream error",
    };
    let runs = (hello.epoch.clone(), hello.version);
    record(hub, key, peer, hello);
    let mut catalog = hub.catalog.subscribe();
    // What was last sent, with its version zeroed: a store change that does not alter this
    // identity's snapshot sends nothing.
    let mut last: Option<Snapshot> = None;
    let mut behind_said = false;
    // While behind: when to ask for another reload (at most one a second, since a store that
    // is itself behind answers every reload with the same version).
    let mut reload_at: Option<tokio::time::Instant> = None;
    loop {
        let current = catalog.borrow_and_update().clone();
        let behind = current.epoch == runs.0 && current.version < runs.1;
        if behind {
            // This replica has not seen what its store holds (its watch is behind, or the
            // store was restored from an older copy): sending now would roll the sidecar
            // back. Read the store again and wait until the catalog catches up.
            if !behind_said {
                warn!(
                    "sidecar {peer} at {addr} runs version {} of epoch {}, newer than this replica's {}: reloading from the store before answering",
                    runs.1, runs.0, current.version
                );
                behind_said = true;
            }
            let now = tokio::time::Instant::now();
            if reload_at.is_none_or(|at| now >= at) {
                hub.reload.notify_one();
                reload_at = Some(now + Duration::from_secs(1));
            }
        } else {
            let snapshot = current.snapshot_for(peer);
            let content = Snapshot {
                version: 0,
                ..snapshot.clone()
            };
            if last.as_ref() != Some(&content) {
                let version = snapshot.version;
                if tx.send(Ok(snapshot)).await.is_err() {
                    return "stream closed";
                }
                // A change pushed to a connected sidecar is timed from the store change.
                let since = match (&last, current.loaded_at) {
                    (Some(_), Some(t)) => t,
                    _ => Instant::now(),
                };
                hub.metrics.sent.inc();
                hub.update(key, |s| {
                    s.sent = version;
                    s.pending = Some((version, since));
                });
                last = Some(content);
            }
        }
        let recheck = reload_at.filter(|_| behind);
        tokio::select! {
            r = catalog.changed() => if r.is_err() { return "shutting down" },
            _ = tokio::time::sleep_until(recheck.unwrap_or_else(tokio::time::Instant::now)), if recheck.is_some() => {}
            m = acks.message() => match m {
                Ok(Some(ack)) => record(hub, key, peer, ack),
                Ok(None) => return "sidecar ended the stream",
                Err(e) => return if e.code() == tonic::Code::Cancelled { "cancelled" } else { "stream error" },
            },
        }
    }
}

/// Text a sidecar sent, made safe for one status line: control characters (a newline would
/// forge lines of `sigil status`) become spaces, and it is cut at 500 characters.
fn clean(text: &str) -> String {
    text.chars()
        .take(500)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn record(hub: &Hub, key: u64, peer: &SpiffeId, mut ack: Ack) {
    ack.node = clean(&ack.node).replace(' ', "_");
    ack.error = clean(&ack.error);
    hub.update(key, |s| {
        if !ack.node.is_empty() {
            s.node = ack.node.clone();
        }
        if ack.version == 0 {
            return;
        }
        if ack.accepted {
            if ack.version >= s.acked {
                s.acked = ack.version;
                s.rejected = None;
                s.note = ack.error.clone();
            }
            if let Some((v, since)) = s.pending {
                if v == ack.version {
                    hub.metrics.acknowledged.inc();
                    hub.metrics
                        .push_latency
                        .observe(since.elapsed().as_secs_f64());
                    s.pending = None;
                }
            }
        } else {
            hub.metrics
                .rejected
                .get_or_create(&SidecarLabels {
                    spiffe_id: peer.to_string(),
                })
                .inc();
            s.pending = None;
            warn!(
                "sidecar {peer} ({}) rejected version {}: {}",
                s.node, ack.version, ack.error
            );
            s.rejected = Some((ack.version, ack.error.clone()));
        }
    });
}
