//! The SPIFFE Workload API (X.509 part), served on a Unix socket (`workloadApi.socket`) to
//! the processes of this machine, per the SPIFFE Workload Endpoint and Workload API standards.
//!
//! - Every request must carry `workload.spiffe.io: true` (InvalidArgument otherwise).
//! - The caller is who the kernel says it is: its uid and gid (`SO_PEERCRED`) and its binary
//!   (`/proc/<pid>/exe`). It gets the SVIDs of the Workloads the control plane says this
//!   sidecar serves (`workloadApi.sidecar` on the Workload record, pushed as `children`)
//!   whose selectors all match; no match is PermissionDenied.
//! - Their keys are made here, kept in memory only, and handed to matching callers; the CSR
//!   goes to the control plane through the sidecar's own `Issue` path, authenticated by the
//!   sidecar's SVID, and the control plane issues only Workloads that name this sidecar.
//! - `FetchX509SVID` and `FetchX509Bundles` are streams: a new message whenever an SVID is
//!   renewed (at half its lifetime, like the sidecar's own) or the bundles change.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_api::workload::{X509BundlesResponse, X509Svid, X509SvidResponse};
use sigil_api::IssueRequest;
use sigil_config::proxy_config::ControlPlaneSpec;
use sigil_config::SpiffeId;
use sigil_filters::attest::{self, Caller, Served};
use sigil_filters::issuance::{renew_at, Validity};
use sigil_filters::tls::{self, Carries};
use sigil_filters::{LocalIdentity, TrustBundles};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};

use crate::issuance::{self, IssueError};
use crate::logs::limited;
use crate::proxy::Proxy;

/// An SVID issued for a served workload. Its key (PKCS#8 DER) lives only here and in the
/// callers it is handed to.
struct WorkloadSvid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
    validity: Validity,
}

impl Drop for WorkloadSvid {
    fn drop(&mut self) {
        self.key.fill(0);
    }
}

pub struct WorkloadApi {
    p: Arc<Proxy>,
    cp: ControlPlaneSpec,
    /// By Workload name.
    svids: Mutex<HashMap<String, Arc<WorkloadSvid>>>,
    /// One issuance at a time: two callers asking for a new workload get one SVID.
    issuing: tokio::sync::Mutex<()>,
    /// Bumped whenever an SVID above is issued, renewed or dropped.
    changed: watch::Sender<u64>,
}

/// Binds `socket` (replacing a stale socket file, never another file) and serves the Workload
/// API on it until the process ends.
pub async fn start(p: Arc<Proxy>, socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let Some(cp) = p.cfg.spec.control_plane.clone() else {
        // The config loader refuses workloadApi without controlPlane.
        return Ok(());
    };
    let refuse = |why: String| std::io::Error::other(why);
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
        // Others who could write there could swap the socket for a link between its bind
        // and its chmod, or serve a socket of their own in its place.
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(refuse(format!(
                "{} is writable by others (mode {:o}); give the socket a directory of its own",
                dir.display(),
                mode & 0o777
            )));
        }
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {
            // A stale socket of a sidecar that is gone is replaced; a live one is not taken.
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(refuse("another process serves on this socket".to_string()));
            }
            std::fs::remove_file(socket)?
        }
        Ok(_) => return Err(refuse("a file that is not a socket is there".to_string())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(socket)?;
    // Anyone on the machine may connect: callers are told apart by their credentials.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    let api = Arc::new(WorkloadApi {
        p,
        cp,
        svids: Mutex::default(),
        issuing: tokio::sync::Mutex::new(()),
        changed: watch::Sender::new(0),
    });
    info!(socket = %socket.display(), "SPIFFE Workload API served");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(api.clone(), stream));
                }
                Err(e) => {
                    warn!("Workload API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(())
}

/// Who is at the other end of `stream`, as the kernel says.
fn caller_of(stream: &UnixStream) -> std::io::Result<Caller> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid();
    let path = pid.and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok());
    Ok(Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid,
        path,
    })
}

async fn serve_connection(api: Arc<WorkloadApi>, stream: UnixStream) {
    let caller = match caller_of(&stream) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            warn!("Workload API: the caller's credentials cannot be read: {e}");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let (api, caller) = (api.clone(), caller.clone());
        async move { Ok::<_, Infallible>(route(api, caller, req).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn route(
    api: Arc<WorkloadApi>,
    caller: Arc<Caller>,
    req: Request<Incoming>,
) -> Response<tonic::body::Body> {
    let header = req
        .headers()
        .get(sigil_api::workload::HEADER)
        .and_then(|v| v.to_str().ok());
    if header != Some("true") {
        return Status::invalid_argument("security header missing from request").into_http();
    }
    match req.uri().path() {
        sigil_api::workload::FETCH_X509_SVID_PATH => {
            let mut grpc = tonic::server::Grpc::new(sigil_api::workload::svid_server_codec());
            let fetch = Fetch {
                api,
                caller,
                answer: svids_answer,
            };
            grpc.server_streaming(fetch, req).await
        }
        sigil_api::workload::FETCH_X509_BUNDLES_PATH => {
            let mut grpc = tonic::server::Grpc::new(sigil_api::workload::bundles_server_codec());
            let fetch = Fetch {
                api,
                caller,
                answer: bundles_answer,
            };
            grpc.server_streaming(fetch, req).await
        }
        other => Status::unimplemented(format!(
            "{other}: this Workload API serves FetchX509SVID and FetchX509Bundles"
        ))
        .into_http(),
    }
}

type StreamFuture<T> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tonic::Response<ReceiverStream<Result<T, Status>>>, Status>,
            > + Send,
    >,
>;

type AnswerFuture<T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Status>> + Send>>;

/// One of the API's streams: what `answer` gives the caller now, and again whenever the
/// sources or the SVIDs change, sent only when it differs; an error ends it.
struct Fetch<T> {
    api: Arc<WorkloadApi>,
    caller: Arc<Caller>,
    answer: fn(Arc<WorkloadApi>, Arc<Caller>) -> AnswerFuture<T>,
}

impl<R, T> tonic::server::ServerStreamingService<R> for Fetch<T>
where
    T: PartialEq + Clone + Send + 'static,
{
    type Response = T;
    type ResponseStream = ReceiverStream<Result<T, Status>>;
    type Future = StreamFuture<T>;

    fn call(&mut self, _: tonic::Request<R>) -> Self::Future {
        let (api, caller, answer) = (self.api.clone(), self.caller.clone(), self.answer);
        Box::pin(async move {
            api.admit(&caller)?;
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(follow(api, caller, tx, answer));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        })
    }
}

async fn follow<T: PartialEq + Clone>(
    api: Arc<WorkloadApi>,
    caller: Arc<Caller>,
    tx: mpsc::Sender<Result<T, Status>>,
    answer: fn(Arc<WorkloadApi>, Arc<Caller>) -> AnswerFuture<T>,
) {
    let mut sources = api.p.sources_changed.subscribe();
    let mut svids = api.changed.subscribe();
    let mut last = None;
    loop {
        sources.borrow_and_update();
        svids.borrow_and_update();
        match answer(api.clone(), caller.clone()).await {
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            Ok(r) if last.as_ref() == Some(&r) => {}
            Ok(r) => {
                if tx.send(Ok(r.clone())).await.is_err() {
                    return;
                }
                last = Some(r);
            }
        }
        tokio::select! {
            _ = sources.changed() => {}
            _ = svids.changed() => {}
            _ = tx.closed() => return,
        }
    }
}

/// `FetchX509SVID`: the caller's SVIDs.
fn svids_answer(api: Arc<WorkloadApi>, caller: Arc<Caller>) -> AnswerFuture<X509SvidResponse> {
    Box::pin(async move {
        let mine = api.admit(&caller)?;
        api.svid_response(&mine).await
    })
}

/// `FetchX509Bundles`: every trust bundle in force.
fn bundles_answer(api: Arc<WorkloadApi>, caller: Arc<Caller>) -> AnswerFuture<X509BundlesResponse> {
    Box::pin(async move {
        api.admit(&caller)?;
        Ok(X509BundlesResponse {
            crl: vec![],
            bundles: bundle_map(&api.p.bundles(), None),
        })
    })
}

impl WorkloadApi {
    /// The workloads this sidecar serves now (from the snapshot in force).
    fn served(&self) -> Vec<Served> {
        let sources = self.p.sources.lock().expect("sources lock");
        sources
            .pushed
            .as_ref()
            .map(|p| p.served.clone())
            .unwrap_or_default()
    }

    /// The workloads `caller` is; PermissionDenied (logged, rate-limited) if none.
    fn admit(&self, caller: &Caller) -> Result<Vec<Served>, Status> {
        let served = self.served();
        let mine: Vec<Served> = attest::select(&served, caller)
            .into_iter()
            .cloned()
            .collect();
        if mine.is_empty() {
            limited!(
                info,
                uid = caller.uid,
                gid = caller.gid,
                pid = caller.pid,
                path = %caller.path.as_deref().unwrap_or(Path::new("?")).display(),
                "Workload API: no Workload served here matches the caller"
            );
            return Err(Status::permission_denied(
                "no identity issued: no Workload served by this sidecar matches the caller's uid, gid and binary",
            ));
        }
        Ok(mine)
    }

    /// The SVIDs of `mine` (issued now if need be) with their bundles.
    async fn svid_response(self: &Arc<Self>, mine: &[Served]) -> Result<X509SvidResponse, Status> {
        let bundles = self.p.bundles();
        let mut svids = Vec::new();
        let mut problem = None;
        for served in mine {
            match self.svid_for(served).await {
                Ok(svid) => {
                    let td = svid.id.trust_domain_name();
                    svids.push(X509Svid {
                        spiffe_id: svid.id.to_string(),
                        x509_svid: svid.chain.iter().flat_map(|c| c.to_vec()).collect(),
                        x509_svid_key: svid.key.clone(),
                        bundle: bundles
                            .get(td)
                            .map(|b| b.certs().iter().flat_map(|c| c.to_vec()).collect())
                            .unwrap_or_default(),
                        hint: served.workload.clone(),
                    });
                }
                Err(e) => {
                    limited!(warn, workload = %served.workload, "Workload API: no SVID: {e}");
                    problem = Some(e);
                }
            }
        }
        if svids.is_empty() {
            let why = problem.map(|e| e.to_string()).unwrap_or_default();
            return Err(Status::unavailable(format!(
                "no SVID could be issued: {why}"
            )));
        }
        let own = svids[0].spiffe_id.clone();
        let own_td = SpiffeId::parse(&own)
            .map(|id| id.trust_domain_name().to_string())
            .unwrap_or_default();
        Ok(X509SvidResponse {
            svids,
            crl: vec![],
            federated_bundles: bundle_map(&bundles, Some(&own_td)),
        })
    }

    /// The SVID of `served`: the one held, or a new one (then renewed in the background for
    /// as long as this sidecar serves the workload).
    async fn svid_for(self: &Arc<Self>, served: &Served) -> Result<Arc<WorkloadSvid>, IssueError> {
        let held = |api: &Self| {
            let svids = api.svids.lock().expect("svids lock");
            svids
                .get(&served.workload)
                .filter(|s| s.id == served.id && s.validity.not_after > issuance::now_unix())
                .cloned()
        };
        if let Some(svid) = held(self) {
            return Ok(svid);
        }
        let _one = self.issuing.lock().await;
        if let Some(svid) = held(self) {
            return Ok(svid);
        }
        let svid = Arc::new(self.issue(served).await?);
        info!(workload = %served.workload, id = %svid.id, not_after = svid.validity.not_after, "Workload API: SVID issued");
        let first = self
            .svids
            .lock()
            .expect("svids lock")
            .insert(served.workload.clone(), svid.clone())
            .is_none();
        if first {
            tokio::spawn(self.clone().renew(served.clone()));
        }
        Ok(svid)
    }

    /// Renews the SVID of `served` at half its lifetime (with jitter; retried with backoff)
    /// until this sidecar no longer serves it, when the SVID and its key are dropped.
    async fn renew(self: Arc<Self>, served: Served) {
        loop {
            let Some(validity) = self
                .svids
                .lock()
                .expect("svids lock")
                .get(&served.workload)
                .map(|s| s.validity)
            else {
                return;
            };
            issuance::sleep_until_unix(renew_at(validity, issuance::unit_jitter())).await;
            let mut backoff = issuance::MIN_BACKOFF;
            loop {
                if !self.served().contains(&served) {
                    self.svids
                        .lock()
                        .expect("svids lock")
                        .remove(&served.workload);
                    self.changed.send_modify(|n| *n += 1);
                    info!(workload = %served.workload, "Workload API: no longer served here; its SVID is dropped");
                    return;
                }
                match self.issue(&served).await {
                    Ok(svid) => {
                        info!(workload = %served.workload, not_after = svid.validity.not_after, "Workload API: SVID renewed");
                        self.svids
                            .lock()
                            .expect("svids lock")
                            .insert(served.workload.clone(), Arc::new(svid));
                        self.changed.send_modify(|n| *n += 1);
                        break;
                    }
                    Err(e) => {
                        let wait = issuance::jitter(backoff);
                        warn!(workload = %served.workload, seconds_left = validity.not_after - issuance::now_unix(), retry_in_ms = wait.as_millis() as u64, "Workload API: SVID renewal failed: {e}");
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(issuance::MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// A key made here, a CSR for `served`, signed by the control plane for this sidecar,
    /// checked with the key.
    async fn issue(&self, served: &Served) -> Result<WorkloadSvid, IssueError> {
        let provider = tls::provider();
        let current = self.p.tls.get();
        let bootstrap = self
            .p
            .sources
            .lock()
            .expect("sources lock")
            .file_bundles
            .clone();
        let client = tls::client_config(
            &current.identity,
            bootstrap,
            Default::default(),
            provider.clone(),
            self.cp.spiffe_id.clone(),
            Carries::Http2,
        );
        let (key_pem, csr) = issuance::key_and_csr(Some(&served.id))?;
        let request = IssueRequest {
            csr,
            join_token: String::new(),
            node: self.p.cfg.metadata.name.clone(),
            for_workload: served.workload.clone(),
        };
        let response = issuance::call(&self.cp, &self.p.cfg.spec.timeouts, client, request).await?;
        let chain: Vec<CertificateDer<'static>> = response
            .chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let chain_pem: String = chain
            .iter()
            .map(|c| issuance::pem("CERTIFICATE", c))
            .collect();
        // The same checks as for the sidecar's own SVID: the chain, the key, the ID.
        let at = UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                + issuance::SKEW,
        );
        let checked = LocalIdentity::from_pem(
            chain_pem.as_bytes(),
            key_pem.as_bytes(),
            at,
            Some(&served.id),
            &provider,
        )
        .map_err(|e| IssueError::Unusable(e.to_string()))?;
        let key = pem::parse(key_pem.as_bytes())
            .map_err(|e| IssueError::Key(e.to_string()))?
            .into_contents();
        Ok(WorkloadSvid {
            id: served.id.clone(),
            chain,
            key,
            validity: Validity {
                not_before: checked.not_before() as i64,
                not_after: checked.not_after() as i64,
            },
        })
    }
}

/// Trust domain (as `spiffe://<td>`, the form the standard's maps use) to its CA certificates,
/// DER one after another; without `except`.
fn bundle_map(bundles: &TrustBundles, except: Option<&str>) -> HashMap<String, Vec<u8>> {
    bundles
        .domains()
        .into_iter()
        .filter(|td| Some(*td) != except)
        .filter_map(|td| {
            let b = bundles.get(td)?;
            let der = b.certs().iter().flat_map(|c| c.to_vec()).collect();
            Some((format!("spiffe://{td}"), der))
        })
        .collect()
}

/// Where the socket is, resolved against the config's directory.
pub fn socket_path(p: &Proxy) -> Option<PathBuf> {
    p.cfg
        .spec
        .workload_api
        .as_ref()
        .map(|w| p.cfg.resolve(&w.socket))
}
