//! Inbound HTTP: one hyper server (HTTP/1.1 and HTTP/2) per admitted mTLS connection that
//! carries HTTP. Every request is normalized, decided against the current policy index (so
//! policy changes apply to the next request; ports not declared `http` apply their TCP rule
//! to each request), and either answered with 403 (gRPC: PERMISSION_DENIED) naming the rule,
//! or forwarded to the workload with the verified peer ID in `x-sigil-peer-id` (every other
//! spelling of it, in headers and trailers, removed: `http::strip_identity`). Bodies
//! stream both ways; upgrades (WebSocket) are authorized on the upgrade request and then
//! relayed as bytes.
//!
//! Message framing is hyper's: a request with both Content-Length and Transfer-Encoding is
//! read as chunked and its Content-Length dropped (RFC 9112 §6.3), so the workload receives
//! one unambiguous framing; conflicting Content-Length values and header overflows are
//! refused by hyper before they reach us.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use hyper::http::uri::Parts as UriParts;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use sigil_api::audit::{Kind as AuditKind, Record, RouteCount};
use sigil_config::proxy_config::AuditRequests;
use sigil_config::SpiffeId;
use sigil_filters::detect::Speaks;
use sigil_filters::headers::PEER_ID_HEADER;
use sigil_filters::normalize::{effective_host, normalize_path, TargetError};
use sigil_filters::HttpRequest;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::conns::{Direction, Kind};
use crate::http::{
    host_header, is_grpc, local_response, serve_until_closed, status_class, ResponseBody,
};
use crate::ledger::{policy_of, Admitted, RequestTallies, Tunnel};
use crate::logs::limited;
use crate::metrics::{RequestMetrics, RuleLabels};
use crate::proxy::{now_unix, Proxy};
use crate::reasons::CloseReason;
use crate::relay::{relay, Counted, Counters};
use crate::workload::Unanswered;

struct Conn {
    p: Arc<Proxy>,
    /// The registry's number of this connection, for audit records.
    id: u64,
    /// Requests counted for the close record (with the audit stream).
    counts: Mutex<Counts>,
    peer: SpiffeId,
    /// For registering upgraded tunnels, which outlive the HTTP connection's registration.
    chain: Vec<CertificateDer<'static>>,
    peer_header: HeaderValue,
    local: Arc<str>,
    port: u16,
    metrics: RequestMetrics,
    /// The snapshot version of the bundles the peer was verified with.
    bundle_version: u64,
    /// The dry-run rule and policy version whose verdict the connection's open recorded,
    /// when a connection-level rule admitted it: its requests, checked against the same
    /// rule, do not record it again (unless the policies changed since).
    opened_would_deny: Option<(Arc<str>, u64)>,
}

/// Serves one admitted connection until it ends or the registry closes it.
pub async fn serve<S>(p: Arc<Proxy>, stream: S, speaks: Speaks, a: Admitted) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(peer_header) = HeaderValue::from_str(a.peer.as_str()) else {
        // SPIFFE IDs are ASCII without controls, so this cannot happen; refuse if it does.
        return CloseReason::InvalidPeerId;
    };
    let (peer, chain, local, port) = (
        a.peer.clone(),
        a.session.chain.clone(),
        a.local.clone(),
        a.port,
    );
    let metrics = RequestMetrics::new(
        &p.ledger.metrics,
        Direction::Inbound.label(),
        a.local.clone(),
        a.peer_label.clone(),
    );
    let opened_would_deny = a
        .would_deny
        .clone()
        .zip(a.policy_version)
        .filter(|_| a.rule.is_some());
    let bundle_version = a.session.bundle_version;
    let (labels, counters, mut guard) = p.ledger.admit(a);
    let conn = Arc::new(Conn {
        p: p.clone(),
        id: guard.id(),
        counts: Mutex::default(),
        peer,
        chain,
        peer_header,
        local,
        port,
        metrics,
        bundle_version,
        opened_would_deny,
    });
    let audited = conn.clone();
    let stream = Counted::new(stream, counters);
    // Boxed: the request's future is 2.7 KB, and hyper moves it several times on the way to
    // the task it spawns per HTTP/2 stream (server side: memmove 6.6–7.0% of the samples
    // before, 5.6–5.8% after; perf/HISTORY.md, "Dealing connections").
    let service = move |req| {
        let conn = conn.clone();
        Box::pin(async move { Ok::<_, Infallible>(handle(&conn, req).await) })
    };
    let conns = &p.ledger.conns;
    let reason = serve_until_closed(conns, stream, speaks, service, &mut guard.close_rx).await;
    let counts = std::mem::take(&mut *audited.counts.lock().expect("counts lock"));
    let list = |map: HashMap<(Arc<str>, Method), u64>| {
        map.into_iter()
            .map(|((route, method), count)| RouteCount {
                route: route.to_string(),
                method: method.to_string(),
                count,
            })
            .collect()
    };
    let tallies = RequestTallies {
        allowed: list(counts.allowed),
        denied: list(counts.denied),
        would_deny: list(counts.would_deny),
    };
    p.ledger.closed_with(&labels, Some(&guard), reason, tallies);
    reason
}

/// Distinct (route, method) pairs counted per connection at most; beyond, under method
/// `OTHER` (a client can send any method name).
const MAX_COUNTED: usize = 256;
/// Request records one connection writes at most; past them, denied requests are counted in
/// its close record, so that a peer cannot fill the spool with requests it knows are denied.
const MAX_RECORDED: u32 = 1_000;

/// A connection's requests, by (route, method), for its close record.
#[derive(Default)]
struct Counts {
    allowed: HashMap<(Arc<str>, Method), u64>,
    /// Denied past `MAX_RECORDED`.
    denied: HashMap<(Arc<str>, Method), u64>,
    /// Allowed but denied by a dry-run rule, past `MAX_RECORDED`.
    would_deny: HashMap<(Arc<str>, Method), u64>,
    /// Request records written.
    recorded: u32,
}

fn count(map: &mut HashMap<(Arc<str>, Method), u64>, route: &Arc<str>, method: &Method) {
    let mut key = (route.clone(), method.clone());
    if map.len() >= MAX_COUNTED && !map.contains_key(&key) {
        key.1 = Method::from_bytes(b"OTHER").expect("a method name");
    }
    *map.entry(key).or_default() += 1;
}

/// What a request's audit says of it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allowed,
    /// Denied by a rule, or malformed.
    Denied,
    /// Allowed, but a dry-run rule (`route`) would have denied it.
    WouldDeny,
}

impl Conn {
    /// The request's audit: a record of its own if it was denied or a dry-run rule would
    /// have denied it (or if every request is recorded), else a count in the connection's
    /// close record.
    fn audit(
        &self,
        method: &Method,
        path: &str,
        route: &Arc<str>,
        outcome: Outcome,
        why: Option<&dyn std::fmt::Display>,
        policy_version: Option<u64>,
    ) {
        let Some(audit) = &self.p.ledger.audit else {
            return;
        };
        let every = self.p.cfg.spec.audit.as_ref().map(|a| a.requests) == Some(AuditRequests::All);
        {
            let mut counts = self.counts.lock().expect("counts lock");
            if outcome == Outcome::Allowed {
                count(&mut counts.allowed, route, method);
                if !every {
                    return;
                }
            }
            if counts.recorded >= MAX_RECORDED {
                match outcome {
                    Outcome::Allowed => {}
                    Outcome::Denied => count(&mut counts.denied, route, method),
                    Outcome::WouldDeny => count(&mut counts.would_deny, route, method),
                }
                return;
            }
            counts.recorded += 1;
        }
        let (policy, rule) = policy_of(Some(route));
        let versions = &self.p.ledger.versions;
        let (kind, decision, mode) = match outcome {
            Outcome::Allowed => (AuditKind::RequestAllowed, "allow", "enforce"),
            Outcome::Denied => (AuditKind::RequestDenied, "deny", "enforce"),
            Outcome::WouldDeny => (AuditKind::WouldDeny, "deny", "dry-run"),
        };
        audit.record(Record {
            kind: kind as i32,
            direction: Direction::Inbound.label().into(),
            local_id: self.local.to_string(),
            peer_id: self.peer.to_string(),
            protocol: "http".into(),
            decision: decision.into(),
            policy: policy.into(),
            rule: rule.into(),
            mode: mode.into(),
            policy_version: policy_version
                .unwrap_or_else(|| versions.policies.load(Ordering::Relaxed)),
            bundle_version: self.bundle_version,
            route: route.to_string(),
            method: method.to_string(),
            detail: match why {
                Some(why) => format!("{why}; path {}", truncated(path, 1024)),
                None => format!("path {}", truncated(path, 1024)),
            },
            port: self.port.into(),
            conn: self.id,
            ..Record::default()
        });
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn handle(c: &Conn, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    // Only we may say who the caller is, under any spelling a backend could read as ours:
    // removed before the route's header matches see them, set again when forwarding.
    crate::http::strip_identity(req.headers_mut());
    let grpc = is_grpc(&req);
    let (route, decision, resp) = match authorize(c, &req) {
        Err(why) => {
            limited!(info, peer = %c.peer, port = c.port, method = %req.method(), "request refused: {why}");
            let r = local_response(StatusCode::BAD_REQUEST, grpc, &why.to_string());
            let invalid = Arc::from("invalid_request");
            c.audit(
                req.method(),
                req.uri().path(),
                &invalid,
                Outcome::Denied,
                Some(&why),
                None,
            );
            (Arc::from("invalid_request"), "invalid", r)
        }
        Ok((route, Verdict::Deny(why), version)) => {
            limited!(info, peer = %c.peer, port = c.port, method = %req.method(), path = %req.uri().path(), rule = %why, "request denied");
            let r = local_response(StatusCode::FORBIDDEN, grpc, &format!("denied by {why}"));
            c.audit(
                req.method(),
                req.uri().path(),
                &route,
                Outcome::Denied,
                None,
                Some(version),
            );
            (route, "deny", r)
        }
        Ok((route, Verdict::Allow { target }, version)) => {
            c.audit(
                req.method(),
                req.uri().path(),
                &route,
                Outcome::Allowed,
                None,
                Some(version),
            );
            debug!(peer = %c.peer, port = c.port, method = %req.method(), path = %req.uri().path(), "request allowed");
            let r = match forward(c, req, (&route, version, target), grpc).await {
                Ok(r) => r,
                Err(Unanswered::TimedOut(after)) => {
                    limited!(warn, peer = %c.peer, port = c.port, "workload did not answer within {after:?} (timeouts.request)");
                    let why = format!("workload did not answer within {after:?}");
                    local_response(StatusCode::GATEWAY_TIMEOUT, grpc, &why)
                }
                Err(e) => {
                    limited!(warn, peer = %c.peer, port = c.port, "workload request failed: {e}");
                    local_response(StatusCode::BAD_GATEWAY, grpc, "workload unavailable")
                }
            };
            (route, "allow", r)
        }
    };
    c.metrics.record(
        &c.p.ledger.metrics,
        &route,
        decision,
        status_class(resp.status()),
        started.elapsed().as_secs_f64(),
    );
    resp
}

enum Verdict {
    /// `target`: the normalized path and query, when normalizing changed the request's.
    Allow { target: Option<String> },
    /// The rule that denied.
    Deny(String),
}

/// What decided a request: the route's label, the verdict, and the snapshot version of the
/// policies that made it.
type Decided = (Arc<str>, Verdict, u64);

/// Ok((route label, verdict, policy version)). Err: the request is malformed (400).
fn authorize(c: &Conn, req: &Request<Incoming>) -> Result<Decided, TargetError> {
    let host_header = host_header(req.headers())?;
    let pq = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("");
    let (path, query) = normalize_path(pq)?;
    let host = effective_host(req.uri().authority().map(|a| a.as_str()), host_header, 80)?;
    let (index, version) = c.p.policy_and_version();
    let headers = req.headers();
    // HTTP reaches ports no policy declares `http` too (sniffed, or pooled from a peer
    // sidecar): there the port's connection-level rule applies to each request.
    let d = if index.is_http(c.port) {
        index.decide_http(&HttpRequest {
            peer: &c.peer,
            port: c.port,
            method: req.method().as_str(),
            host: &host,
            path: &path,
            header: |name: &str| headers.get(name).and_then(|v| v.to_str().ok()),
            now: now_unix(),
        })
    } else {
        index.decide_tcp(&c.peer, c.port, now_unix())
    };
    if let Some(w) = d.would_deny {
        limited!(info, peer = %c.peer, port = c.port, path = %path, rule = %w, "dry-run: would deny");
        let rule = index.label(&w);
        let recorded = c
            .opened_would_deny
            .as_ref()
            .is_some_and(|(r, v)| *r == rule && *v == version);
        if !recorded {
            let decided = Some(version);
            c.audit(
                req.method(),
                &path,
                &rule,
                Outcome::WouldDeny,
                None,
                decided,
            );
        }
        c.p.ledger
            .metrics
            .would_deny
            .get_or_create(&RuleLabels {
                local_id: c.local.clone(),
                rule,
            })
            .inc();
    }
    let route = index.label(&d.rule);
    if !d.allowed {
        return Ok((route, Verdict::Deny(d.rule.to_string()), version));
    }
    // Borrowed: every byte of the path was already in its normal form.
    let target = match (path, query) {
        (Cow::Borrowed(_), _) => None,
        (path, Some(q)) => Some(format!("{path}?{q}")),
        (path, None) => Some(path.into_owned()),
    };
    Ok((route, Verdict::Allow { target }, version))
}

/// Sends the request to 127.0.0.1:<port> with the normalized target (`target`, when
/// normalizing changed it) and our peer header.
async fn forward(
    c: &Conn,
    mut req: Request<Incoming>,
    (route, policy_version, target): (&Arc<str>, u64, Option<String>),
    grpc: bool,
) -> Result<Response<ResponseBody>, Unanswered> {
    let limit = c.p.cfg.spec.timeouts.request;
    let upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(UPGRADE);
    // A tunnel outlives the connection it came from, and the room that connection holds:
    // it takes room of its own, before the workload is asked.
    let room = match upgrade.then(|| c.p.admission.total_only()) {
        Some(Err(why)) => return Err(Unanswered::NoRoom(why)),
        Some(Ok(slot)) => Some(slot),
        None => None,
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // HTTP/2 carries the host in :authority; an HTTP/1.1 workload needs it as Host.
    if !grpc && !parts.headers.contains_key(HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    // hyper sends a GET (HEAD, CONNECT) body of unknown length as no body at all; one that
    // came over HTTP/2 (no framing headers there) must still reach the workload whole.
    if !grpc
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && !parts.headers.contains_key(TRANSFER_ENCODING)
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts
            .headers
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    // The client's spellings went in `handle`; this is the verified one.
    parts.headers.insert(
        HeaderName::from_static(PEER_ID_HEADER),
        c.peer_header.clone(),
    );
    let workload = &c.p.workload;
    let mut resp = if grpc {
        // gRPC needs HTTP/2 end to end.
        let pq = target
            .as_deref()
            .unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |pq| pq.as_str()));
        parts.uri = format!(
            "http://{}{pq}",
            SocketAddr::from((Ipv4Addr::LOCALHOST, c.port))
        )
        .parse::<Uri>()
        .map_err(|e| Unanswered::Target(e.into()))?;
        parts.version = Version::HTTP_2;
        // No timeout: gRPC carries its own deadline (grpc-timeout), and a streaming call
        // may send its response head only with its first message, long after.
        let out = Request::from_parts(parts, body);
        workload
            .send_grpc(out)
            .await?
            .map(|b| b.map_err(Into::into).boxed())
    } else {
        // Anything else goes to the workload as HTTP/1.1, which every workload speaks (an
        // HTTP/2 client must not break an HTTP/1-only server), in origin form.
        if let Some(t) = target {
            parts.uri = Uri::try_from(t).map_err(|e| Unanswered::Target(e.into()))?;
        } else if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let mut origin = UriParts::default();
            origin.path_and_query = parts.uri.path_and_query().cloned();
            parts.uri = Uri::from_parts(origin).map_err(|e| Unanswered::Target(e.into()))?;
        }
        parts.version = Version::HTTP_11;
        let out = Request::from_parts(parts, body);
        workload
            .send_h1(c.port, out, limit)
            .await?
            .map(|b| b.map_err(Into::into).boxed())
    };
    if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) = (downstream_upgrade, resp.status()) {
        let up = hyper::upgrade::on(&mut resp);
        spawn_tunnel(c, (down, up), room, (route, policy_version));
    }
    Ok(resp)
}

/// The tunnel an upgrade (101) opens between the client and the workload, on a task of its
/// own: it outlives the HTTP connection's registration, so it registers on its own, for a
/// bundle change (or revocation) still to find and close it. It holds `room` and a load on
/// this worker, and its audit records name the route and policy version that allowed it.
fn spawn_tunnel(
    c: &Conn,
    (down, up): (hyper::upgrade::OnUpgrade, hyper::upgrade::OnUpgrade),
    room: Option<crate::admission::Slot>,
    (route, policy_version): (&Arc<str>, u64),
) {
    let mut guard = c.p.ledger.conns.register(
        Direction::Inbound,
        Kind::Tunnel,
        c.peer.clone(),
        c.chain.clone(),
        c.port,
    );
    let load = c.p.workers.hold();
    let idle = c.p.cfg.spec.timeouts.idle;
    let p = c.p.clone();
    let (local, peer, chain, port, route) = (
        c.local.clone(),
        c.peer.clone(),
        c.chain.clone(),
        c.port,
        route.clone(),
    );
    let (on_conn, bundle_version) = (c.id, c.bundle_version);
    tokio::spawn(async move {
        let _held = (load, room);
        // Recorded once both sides have switched: an upgrade that fails is no tunnel.
        let (Ok(down), Ok(up)) = (down.await, up.await) else {
            return;
        };
        let t = Tunnel {
            local: &local,
            peer: &peer,
            chain: &chain,
            port,
            route: &route,
            policy_version,
            bundle_version,
        };
        p.ledger.tunnel_opened(&t, &guard, on_conn);
        let counters = Counters {
            conn: guard.bytes.clone(),
            ..Counters::default()
        };
        let (down, up) = (TokioIo::new(down), TokioIo::new(up));
        let reason = relay(down, up, &counters, &mut guard.close_rx, idle).await;
        p.ledger.tunnel_closed(&t, &guard, reason);
    });
}
