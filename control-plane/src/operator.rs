//! The operator API of `sigil-control` (HTTPS, mutual TLS with SPIFFE verification): only
//! identities matching `--operator` patterns may use it. Resources travel as the YAML
//! documents operators write.
//!
//! - `POST /v1/apply` (`?dryRun=true`): a YAML stream, validated like `sigil validate`
//!   (errors name the file from the `x-sigil-file` header and the line); answers one line per
//!   resource: `created|updated|unchanged Kind/name`, then the set's version.
//! - `GET /v1/resources[/KIND[/NAME]]`: the stored documents, `---`-separated.
//! - `DELETE /v1/resources/KIND/NAME`.
//! - `GET /v1/status`: the store version and every connected sidecar, one line each; then the
//!   latest SVID issuance refusals.
//! - `POST /v1/tokens` with a body `workload=NAME ttl=DURATION`: a one-time join token for a
//!   sidecar's first SVID, bound to that Workload. The token is in the answer and nowhere
//!   else: the store keeps its SHA-256.
//! - `GET /metrics`: OpenMetrics, for any client with a verified SVID (a Prometheus with its
//!   own SVID need not be an operator).

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sigil_config::{IdPattern, Resource, SpiffeId};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::own_audit::change as change_record;
use crate::sidecars::Hub;
use crate::store::Store;

/// A resource file is small; the same limit as the config loader's.
const MAX_BODY: usize = 4 << 20;

pub struct Api {
    /// Shared with the CA, which keeps join tokens in it.
    pub store: Arc<Store>,
    pub operators: Vec<IdPattern>,
    /// Told of every change, to push snapshots.
    pub hub: Arc<Hub>,
    /// Sidecars' audit records (`--audit-db`), if kept here.
    pub audit: Option<Arc<crate::audit_store::AuditStore>>,
    /// What audit checkpoints' signers must chain to: the bundle files (`--bundle-dir`) and,
    /// read at each verification, every CA the CA directory (`--ca-dir`) holds or held.
    pub signer_roots: SignerRoots,
}

/// Why `sigil audit verify` could not run.
#[derive(Debug)]
enum VerifyFailed {
    Ca(crate::ca::CaError),
    Bundle(sigil_filters::BundleError),
    Store(crate::audit_store::AuditStoreError),
}

impl std::fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ca(e) => write!(f, "the CA directory, for the checkpoints' signers: {e}"),
            Self::Bundle(e) => write!(f, "the roots for the checkpoints' signers: {e}"),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

/// See `Api::signer_roots`.
#[derive(Clone)]
pub struct SignerRoots {
    pub files: Arc<sigil_filters::TrustBundles>,
    pub ca_dir: Option<std::path::PathBuf>,
}

impl SignerRoots {
    /// The check `verify_range` puts each checkpoint signer to: a valid SVID of a trusted
    /// domain at its own notBefore (it signed while valid, maybe long ago), against the bundle
    /// files and every root the CA directory has held, with its intermediates.
    fn check(&self) -> Result<impl Fn(&[u8]) -> Result<(), String>, VerifyFailed> {
        let mut bundles = (*self.files).clone();
        let mut intermediates = Vec::new();
        if let Some(dir) = &self.ca_dir {
            let set = crate::ca::CaSet::load(dir).map_err(VerifyFailed::Ca)?;
            let (roots, above) = set.ever();
            let mut own = sigil_filters::TrustBundles::new();
            let td = set.active.trust_domain();
            let mut all = bundles
                .get(td.as_str())
                .map_or(Vec::new(), |b| b.certs().to_vec());
            all.extend(
                roots
                    .into_iter()
                    .filter(|r| !all.contains(r))
                    .collect::<Vec<_>>(),
            );
            own.insert_der(td, all).map_err(VerifyFailed::Bundle)?;
            bundles = bundles.overlay(&own);
            intermediates = above;
        }
        let algs = sigil_filters::tls::provider().signature_verification_algorithms;
        Ok(move |leaf: &[u8]| {
            let leaf = rustls::pki_types::CertificateDer::from(leaf);
            let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
                .map_err(|e| format!("its certificate: {e}"))?;
            let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                cert.validity().not_before.timestamp().max(0) as u64 + 1,
            ));
            sigil_filters::svid::verify_svid(
                &bundles,
                &algs,
                &leaf,
                &intermediates,
                at,
                sigil_filters::svid::Usage::Client,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }
}

impl Api {
    /// Failures are logged and retried by the hub.
    async fn publish(&self) {
        let _ = self.hub.publish(&self.store).await;
    }
}

/// Accepts operator connections until the listener fails.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, api: Arc<Api>) {
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("operator accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, api) = (acceptor.clone(), api.clone());
        tokio::spawn(async move {
            let Some((tls, peer)) =
                crate::identity::accept(&acceptor, tcp, client, "operator").await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let (api, peer) = (api.clone(), peer.clone());
                async move { Ok::<_, Infallible>(handle(&api, &peer, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("static response parts")
}

async fn handle(api: &Api, peer: &SpiffeId, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        return Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(api.hub.metrics.encode())))
            .expect("static response parts");
    }
    if !api.operators.iter().any(|p| p.matches(peer)) {
        warn!("operator API refused {peer}: not an operator");
        return text(
            StatusCode::FORBIDDEN,
            format!("{peer} is not an operator of this control plane (see --operator)\n"),
        );
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["v1", "apply"]) => apply(api, peer, req).await,
        (Method::GET, ["v1", "resources", rest @ ..]) if rest.len() <= 2 => get(api, rest).await,
        (Method::DELETE, ["v1", "resources", kind, name]) => delete(api, peer, kind, name).await,
        (Method::GET, ["v1", "status"]) => Ok(status(api).await),
        (Method::POST, ["v1", "tokens"]) => create_token(api, peer, req).await,
        (Method::GET, ["v1", "issuances"]) => issuances(api, req.uri().query()).await,
        (Method::GET, ["v1", "audit", "verify"]) => audit_verify(api).await,
        (Method::GET, ["v1", "audit", "records"]) => audit_records(api, req.uri().query()).await,
        _ => Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}\n"),
        )),
    };
    result.unwrap_or_else(|Refusal(status, why)| text(status, why))
}

/// A request the API refuses: the status and the reason sent back.
struct Refusal(StatusCode, String);

type Reply = Result<Response<Full<Bytes>>, Refusal>;

fn internal(e: impl std::fmt::Display) -> Refusal {
    error!("{e}");
    Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
}

async fn apply(api: &Api, peer: &SpiffeId, req: Request<Incoming>) -> Reply {
    let dry_run = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "dryRun=true"));
    let file = req
        .headers()
        .get("x-sigil-file")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("request")
        .to_string();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Refusal(StatusCode::PAYLOAD_TOO_LARGE, format!("{file}: {e}\n")))?
        .to_bytes();
    let yaml = std::str::from_utf8(&body)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("{file}: not UTF-8: {e}\n")))?;
    let docs = Resource::parse_docs(Path::new(&file), yaml)
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("{e}\n")))?;
    let resources: Vec<Resource> = docs.iter().map(|(r, _)| r.clone()).collect();
    let bad = crate::files::check_certificates(Path::new(&file), &resources);
    if !bad.is_empty() {
        let lines: String = bad.iter().map(|p| format!("{p}\n")).collect();
        return Err(Refusal(StatusCode::BAD_REQUEST, lines));
    }
    let rows: Vec<(&str, &str, &str)> = docs
        .iter()
        .map(|(r, doc)| (r.kind(), r.name(), doc.as_str()))
        .collect();
    let (changes, version) = api.store.apply(&rows, dry_run).await.map_err(internal)?;
    let mut out = String::new();
    for ((kind, name, _), change) in rows.iter().zip(&changes) {
        out += &format!("{} {kind}/{name}\n", change.label());
        if !dry_run && change.label() != "unchanged" {
            info!(
                "{peer} {} {kind}/{name} (version {version})",
                change.label()
            );
            if let Some(own) = api.hub.own_audit.get() {
                own.record(change_record(
                    peer,
                    change.label(),
                    &format!("{kind}/{name}"),
                    version,
                ));
            }
        }
    }
    if !dry_run && changes.iter().any(|c| c.label() != "unchanged") {
        api.publish().await;
    }
    out += &if dry_run {
        format!("dry run: nothing written (version {version})\n")
    } else {
        format!("version {version}\n")
    };
    Ok(text(StatusCode::OK, out))
}

async fn get(api: &Api, rest: &[&str]) -> Reply {
    let kind = rest.first().copied().filter(|k| !k.is_empty());
    let all = api.store.list(kind).await.map_err(internal)?;
    let found: Vec<_> = match rest.get(1) {
        Some(name) => all.into_iter().filter(|s| s.name == *name).collect(),
        None => all,
    };
    if found.is_empty() && rest.len() == 2 {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("{}/{}: not found\n", rest[0], rest[1]),
        ));
    }
    let docs: Vec<String> = found
        .iter()
        .map(|s| {
            format!(
                "# {}/{} (version {})\n{}\n",
                s.kind, s.name, s.version, s.yaml
            )
        })
        .collect();
    Ok(text(StatusCode::OK, docs.join("---\n")))
}

async fn delete(api: &Api, peer: &SpiffeId, kind: &str, name: &str) -> Reply {
    if !api.store.delete(kind, name).await.map_err(internal)? {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("{kind}/{name}: not found\n"),
        ));
    }
    let version = api.store.version().await.map_err(internal)?;
    api.publish().await;
    info!("{peer} deleted {kind}/{name} (version {version})");
    if let Some(own) = api.hub.own_audit.get() {
        own.record(change_record(
            peer,
            "deleted",
            &format!("{kind}/{name}"),
            version,
        ));
    }
    Ok(text(
        StatusCode::OK,
        format!("deleted {kind}/{name}\nversion {version}\n"),
    ))
}

/// The longest a join token may live: it stands for an identity until used.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

async fn create_token(api: &Api, peer: &SpiffeId, req: Request<Incoming>) -> Reply {
    let body = Limited::new(req.into_body(), 1024)
        .collect()
        .await
        .map_err(|e| {
            Refusal(
                StatusCode::BAD_REQUEST,
                format!("reading the request: {e}\n"),
            )
        })?
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    let (mut workload, mut ttl) = (None, None);
    for field in body.split_whitespace() {
        match field.split_once('=') {
            Some(("workload", v)) => workload = Some(v.to_string()),
            Some(("ttl", v)) => {
                let d = sigil_config::proxy_config::duration::parse(v)
                    .map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("ttl: {e}\n")))?;
                ttl = Some(d);
            }
            _ => {
                return Err(Refusal(
                    StatusCode::BAD_REQUEST,
                    format!("unexpected {field:?}: expected workload=NAME ttl=DURATION\n"),
                ))
            }
        }
    }
    let Some(workload) = workload else {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "workload=NAME is required\n".into(),
        ));
    };
    let ttl = ttl.unwrap_or(Duration::from_secs(600));
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "ttl must be longer than 0 and at most 24h\n".into(),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let catalog = api.hub.catalog().borrow().clone();
    let token = crate::issuer::create_token(&api.store, &catalog, &workload, ttl, now)
        .await
        .map_err(|e| match e {
            crate::issuer::Refused::UnknownWorkload(_) => {
                Refusal(StatusCode::NOT_FOUND, format!("{e}\n"))
            }
            other => internal(other),
        })?;
    let expires = crate::issuer::rfc3339(now + ttl.as_secs() as i64);
    // Who made a token for which identity is worth an audit line; the token itself is not.
    info!("{peer} made a join token for Workload {workload}, valid until {expires}");
    if let Some(own) = api.hub.own_audit.get() {
        let mut r = change_record(peer, "created", &format!("JoinToken/{workload}"), 0);
        r.detail = format!("join token for Workload/{workload}, valid until {expires}");
        own.record(r);
    }
    Ok(text(
        StatusCode::OK,
        format!("{token}\nworkload {workload}\nexpires {expires}\n"),
    ))
}

/// `version N` then one line per connected sidecar: name, SPIFFE ID, address, the version it
/// was sent, and whether it acknowledged it. With an etcd store, the sidecars of every replica
/// (each line names its replica), as last refreshed (every 2 s).
/// The issuance records (`records`) from `since` (Unix seconds, default 0) on, oldest first,
/// at most `limit` (default 1,000, at most 100,000), one line each.
async fn issuances(api: &Api, query: Option<&str>) -> Reply {
    let (mut since, mut limit) = (0i64, 1_000usize);
    for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        let bad = || {
            Refusal(
                StatusCode::BAD_REQUEST,
                format!("{kv:?}: expected since=<Unix seconds> or limit=<count>\n"),
            )
        };
        match kv.split_once('=') {
            Some(("since", v)) => since = v.parse().map_err(|_| bad())?,
            Some(("limit", v)) => limit = v.parse::<usize>().map_err(|_| bad())?.clamp(1, 100_000),
            _ => return Err(bad()),
        }
    }
    let records = api
        .store
        .list_issuances(since, limit)
        .await
        .map_err(internal)?;
    let out: String = records.iter().map(|r| r.line() + "\n").collect();
    Ok(text(StatusCode::OK, out))
}

/// Stored audit records that pass the query's filters (`identity`, `decision`, `policy`,
/// `close_reason`, `kind`, `since` and `until` in Unix nanoseconds, `after` a row, `limit`),
/// one line each, oldest first; `format=json` for JSON lines. Each line starts with its row
/// number (`row` in JSON), for following with `after`.
async fn audit_records(api: &Api, query: Option<&str>) -> Reply {
    use crate::audit_store::Filter;
    let Some(store) = api.audit.clone() else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "this control plane keeps no audit records (see --audit-db)\n".into(),
        ));
    };
    let mut f = Filter::default();
    let mut json = false;
    for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        let bad = |why: &str| Refusal(StatusCode::BAD_REQUEST, format!("{k}={v:?}: {why}\n"));
        let number = |v: &str| v.parse::<i64>().map_err(|_| bad("not a number"));
        match k {
            "identity" => f.identity = Some(v.clone()),
            "decision" => f.decision = Some(v.clone()),
            "policy" => f.policy = Some(v.clone()),
            "close_reason" => f.close_reason = Some(v.clone()),
            "kind" => {
                let kind = sigil_api::audit::Kind::from_label(&v)
                    .ok_or_else(|| bad("not a record kind (connection_open, connection_close, connection_refused, request_denied, request_allowed, would_deny, dropped, ...)"))?;
                f.kind = Some(kind as i32);
            }
            "since" => f.since_nanos = number(&v)?,
            "until" => f.until_nanos = number(&v)?,
            "after" => f.after = number(&v)?,
            "limit" => f.limit = number(&v)?.clamp(1, 100_000) as usize,
            "format" => json = v == "json",
            _ => return Err(bad("unknown filter")),
        }
    }
    let rows = tokio::task::spawn_blocking(move || store.query(&f))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let out: String = rows
        .iter()
        .map(|(row, sidecar, r)| {
            if json {
                audit_json(*row, sidecar, r) + "\n"
            } else {
                audit_line(*row, sidecar, r) + "\n"
            }
        })
        .collect();
    Ok(text(StatusCode::OK, out))
}

fn kind_label(r: &sigil_api::audit::Record) -> &'static str {
    sigil_api::audit::Kind::try_from(r.kind).map_or("unknown", |k| k.label())
}

fn nanos_rfc3339(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    let t = sigil_config::policy::Timestamp(secs).to_string();
    // 2026-12-06T05:31:02Z -> 2026-12-06T05:31:02.123456789Z
    match t.strip_suffix('Z') {
        Some(base) => format!("{base}.{sub:09}Z"),
        None => t,
    }
}

/// One record for people: row, time, sidecar, sequence number, kind, then what it says.
fn audit_line(row: i64, sidecar: &str, r: &sigil_api::audit::Record) -> String {
    let mut out = format!(
        "{row} {} {sidecar} #{} {}",
        nanos_rfc3339(r.time_unix_nanos),
        r.seq,
        kind_label(r)
    );
    let fields = [
        ("direction", r.direction.as_str()),
        ("peer", &r.peer_id),
        ("decision", &r.decision),
        ("policy", &r.policy),
        ("rule", &r.rule),
        ("close_reason", &r.close_reason),
        ("detail", &r.detail),
    ];
    for (k, v) in fields {
        if !v.is_empty() {
            out += &format!(" {k}={}", v.replace(' ', "_"));
        }
    }
    if r.port != 0 {
        out += &format!(" port={}", r.port);
    }
    if r.conn != 0 {
        out += &format!(" conn={}", r.conn);
    }
    if r.duration_ms != 0 {
        out += &format!(" duration_ms={}", r.duration_ms);
    }
    if r.dropped != 0 {
        out += &format!(" dropped={} dropped_from={}", r.dropped, r.dropped_from);
    }
    out
}

/// One record as a JSON object, with the schema's field names.
fn audit_json(row: i64, sidecar: &str, r: &sigil_api::audit::Record) -> String {
    serde_json::json!({
        "row": row,
        "sidecar": sidecar,
        "schema": r.schema,
        "seq": r.seq,
        "time": nanos_rfc3339(r.time_unix_nanos),
        "time_unix_nanos": r.time_unix_nanos,
        "kind": kind_label(r),
        "direction": r.direction,
        "local_addr": r.local_addr,
        "peer_addr": r.peer_addr,
        "local_id": r.local_id,
        "peer_id": r.peer_id,
        "peer_serial": r.peer_serial,
        "tls_version": r.tls_version,
        "cipher": r.cipher,
        "protocol": r.protocol,
        "decision": r.decision,
        "policy": r.policy,
        "rule": r.rule,
        "mode": r.mode,
        "policy_version": r.policy_version,
        "bundle_version": r.bundle_version,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "duration_ms": r.duration_ms,
        "close_reason": r.close_reason,
        "route": r.route,
        "method": r.method,
        "allowed": r.allowed.iter().map(|c| serde_json::json!({"route": c.route, "method": c.method, "count": c.count})).collect::<Vec<_>>(),
        "denied": r.denied.iter().map(|c| serde_json::json!({"route": c.route, "method": c.method, "count": c.count})).collect::<Vec<_>>(),
        "would_deny": r.would_deny.iter().map(|c| serde_json::json!({"route": c.route, "method": c.method, "count": c.count})).collect::<Vec<_>>(),
        "dropped": r.dropped,
        "dropped_from": r.dropped_from,
        "actor": r.actor,
        "subject": r.subject,
        "detail": r.detail,
        "port": r.port,
        "conn": r.conn,
    })
    .to_string()
}

/// `%XX` escapes and `+` (a space) undone; anything malformed kept as it is.
fn percent_decode(v: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?))
            .flatten();
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every stored audit chain checked end to end: one line per chain (the sidecar's ID, the
/// chain, how many records, the last sequence number, how many records the sidecar's own
/// `Dropped` records say it lost if any, `ok` or how many breaks), then one per break.
/// 409 if any break was found.
async fn audit_verify(api: &Api) -> Reply {
    let Some(store) = api.audit.clone() else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "this control plane keeps no audit records (see --audit-db)\n".into(),
        ));
    };
    let roots = api.signer_roots.clone();
    let witnesses = api.store.witnesses().await.map_err(internal)?;
    let report = tokio::task::spawn_blocking(move || {
        let trusted = roots.check()?;
        verify_report(&store, &trusted, &witnesses).map_err(VerifyFailed::Store)
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let status = if report.1 {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    Ok(text(status, report.0))
}

/// The report of `audit_verify`, and whether every chain is whole. `witnesses`: the chains'
/// latest checkpoints as kept in the control plane's store, out of the audit store's reach.
fn verify_report(
    store: &crate::audit_store::AuditStore,
    trusted: crate::audit_store::SignerCheck<'_>,
    witnesses: &[crate::stored::Witness],
) -> Result<(String, bool), crate::audit_store::AuditStoreError> {
    let mut out = String::new();
    let mut whole = true;
    let chains = store.chains()?;
    // Chains witnessed of which nothing is stored: gone whole.
    for w in witnesses {
        if !chains
            .iter()
            .any(|(s, c, ..)| *s == w.sidecar && *c == w.chain)
        {
            if let Some(why) = store.witness_break(w)? {
                whole = false;
                out += &format!(
                    "{} chain={} records=0 breaks=1\n  {why}\n",
                    w.sidecar, w.chain
                );
            }
        }
    }
    for (sidecar, chain, count, last) in chains {
        let line = format!("{sidecar} chain={chain} records={count} last={last}");
        // Stored under the ID of the SVID the sidecar presented, so it parses.
        let Ok(id) = SpiffeId::parse(&sidecar) else {
            whole = false;
            out += &format!("{line} breaks=1\n  the stored sidecar ID is not a SPIFFE ID\n");
            continue;
        };
        let mut damage: Vec<String> = store
            .verify_range(&id, &chain, 1, u64::MAX, trusted)?
            .iter()
            .map(ToString::to_string)
            .collect();
        let witness = witnesses
            .iter()
            .find(|w| w.sidecar == sidecar && w.chain == chain);
        if let Some(why) = witness
            .map(|w| store.witness_break(w))
            .transpose()?
            .flatten()
        {
            damage.push(why);
        }
        let lost: u64 = store
            .lost(&sidecar, &chain)?
            .iter()
            .map(|r| r.end() - r.start() + 1)
            .sum();
        let mut lost = if lost > 0 {
            format!(" lost_by_sidecar={lost}")
        } else {
            String::new()
        };
        if let Some(seq) = store.pruned_through(&sidecar, &chain)? {
            lost += &format!(" pruned_through={seq}");
        }
        if damage.is_empty() {
            out += &format!("{line}{lost} ok\n");
        } else {
            whole = false;
            out += &format!("{line}{lost} breaks={}\n", damage.len());
            for d in damage {
                out += &format!("  {d}\n");
            }
        }
    }
    Ok((out, whole))
}

async fn status(api: &Api) -> Response<Full<Bytes>> {
    let version = api.hub.version();
    let lines = match &*api.store {
        crate::store::Store::Etcd(e) => match e.statuses().await {
            Ok(all) => all
                .into_iter()
                .flat_map(|(replica, text)| {
                    text.lines()
                        .map(|l| format!("{l} replica={replica}"))
                        .collect::<Vec<_>>()
                })
                .collect(),
            Err(e) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot read the replicas' status: {e}\n"),
                )
            }
        },
        crate::store::Store::Sqlite(_) => api.hub.status_lines(),
    };
    let (refusals, sidecars): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| l.starts_with("issuance "));
    let mut out = format!("version {version}\nsidecars {}\n", sidecars.len());
    for l in sidecars {
        out += &l;
        out.push('\n');
    }
    if !refusals.is_empty() {
        out += &format!("issuance refusals {}\n", refusals.len());
        for l in refusals {
            out += &l;
            out.push('\n');
        }
    }
    text(StatusCode::OK, out)
}
