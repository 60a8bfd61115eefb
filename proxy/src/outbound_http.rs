//! Outbound HTTP: our workload's HTTP/1.1 or HTTP/2 connection to a mesh destination is
//! served here, and each request goes to the destination's sidecar over the pooled HTTP/2
//! connection (`pool`), whichever version the workload spoke. The destination's sidecar
//! authorizes each request; its answers, 403s included, come back unchanged. Upgrade
//! requests (WebSocket), which HTTP/2 cannot carry, take an HTTP/1.1 connection of their own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HOST, UPGRADE};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use sigil_config::SpiffeId;
use sigil_filters::detect::Speaks;
use sigil_filters::normalize::forwarded_authority;
use sigil_filters::tls::Carries;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conns::{Direction, Kind};
use crate::http::{
    host_header, is_grpc, local_response, serve_until_closed, status_class, tunnel, ResponseBody,
};
use crate::ledger::Admitted;
use crate::logs::limited;
use crate::metrics::RequestMetrics;
use crate::pool::{SendError, Slot};
use crate::proxy::Proxy;
use crate::reasons::CloseReason;
use crate::relay::{closed, Counted};

const DIR: Direction = Direction::Outbound;

struct Conn {
    p: Arc<Proxy>,
    dest: SocketAddr,
    expected: SpiffeId,
    local: Arc<str>,
    peer_label: Arc<str>,
    /// The `route` label of outbound requests: the destination decides.
    route: Arc<str>,
    metrics: RequestMetrics,
    slot: Arc<Slot>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The last workload connection using a destination whose connection is gone.
        self.p.pool.forget(&self.slot);
    }
}

/// A request the sidecar answers itself: status, metrics decision label, reason.
struct Answer(StatusCode, &'static str, String);

impl Answer {
    fn invalid(why: impl std::fmt::Display) -> Self {
        Self(StatusCode::BAD_REQUEST, "invalid", why.to_string())
    }

    fn error(status: StatusCode, why: impl std::fmt::Display) -> Self {
        Self(status, "error", why.to_string())
    }
}

/// Serves one workload connection until it ends, the registry closes it, or draining ends it.
pub async fn serve<S>(
    p: Arc<Proxy>,
    workload: S,
    speaks: Speaks,
    dest: SocketAddr,
    expected: SpiffeId,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let local = p.tls.get().local_label.clone();
    let peer_label = p.ledger.metrics.peer_label(expected.as_str());
    let conn = Arc::new(Conn {
        p: p.clone(),
        dest,
        metrics: RequestMetrics::new(
            &p.ledger.metrics,
            DIR.label(),
            local.clone(),
            peer_label.clone(),
        ),
        local,
        peer_label,
        expected: expected.clone(),
        route: "remote".into(),
        slot: p.pool.slot(dest, &expected),
    });
    // Registered so that the drain waits for it; its traffic is counted on the pooled
    // connections, which carry the identity.
    let conns = &p.ledger.conns;
    let mut guard = conns.register(DIR, Kind::Workload, expected, Vec::new(), dest.port());
    let service = move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    };
    let reason = serve_until_closed(conns, workload, speaks, service, &mut guard.close_rx).await;
    if reason != CloseReason::Done {
        limited!(info, %dest, reason = reason.label(), "outbound HTTP connection closed");
    }
}

async fn handle(c: &Conn, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let grpc = is_grpc(&req);
    let upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(UPGRADE);
    let (decision, resp) = match if upgrade {
        // Boxed to keep the common request's future small (see `Pool::sender`).
        Box::pin(via_own_connection(c, req)).await
    } else {
        via_pool(c, req, grpc).await
    } {
        Ok(r) => ("forward", r),
        Err(Answer(status, decision, why)) => {
            limited!(info, dest = %c.dest, peer = %c.expected, status = status.as_u16(), "outbound request failed: {why}");
            (decision, local_response(status, grpc, &why))
        }
    };
    c.metrics.record(
        &c.p.ledger.metrics,
        &c.route,
        decision,
        status_class(resp.status()),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// Sends the request as HTTP/2 over the pooled connection (see `Pool::send`).
async fn via_pool(
    c: &Conn,
    req: Request<Incoming>,
    grpc: bool,
) -> Result<Response<ResponseBody>, Answer> {
    let (mut parts, body) = req.into_parts();
    let authority = authority(&parts)?;
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(Answer::invalid)?;
    parts.version = Version::HTTP_2;
    // HTTP/2 carries the host as :authority (RFC 9113 §8.3.1).
    parts.headers.remove(HOST);
    let req = Request::from_parts(parts, body);
    c.p.pool.send(&c.slot, req, grpc).await.map_err(|e| {
        let status = match e {
            SendError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Answer::error(status, e)
    })
}

/// The authority to send over HTTP/2 (`sigil_filters::normalize::forwarded_authority`).
fn authority(parts: &hyper::http::request::Parts) -> Result<Authority, Answer> {
    let host = host_header(&parts.headers).map_err(Answer::invalid)?;
    let target = parts.uri.authority().map(Authority::as_str);
    let chosen = forwarded_authority(target, host).map_err(Answer::invalid)?;
    Authority::try_from(chosen)
        .map_err(|e| Answer::invalid(format!("invalid Host header {chosen:?}: {e}")))
}

/// An upgrade request gets an HTTP/1.1 mTLS connection of its own (ALPN `http/1.1`); once
/// the destination answers 101, the connection carries the tunnel and stays registered.
async fn via_own_connection(
    c: &Conn,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Answer> {
    // The tunnel outlives the workload connection and its room: it takes its own.
    let room = c.p.admission.total_only().map_err(|why| {
        Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no room for a tunnel: {why}"),
        )
    })?;
    let down = hyper::upgrade::on(&mut req);
    crate::http::strip_identity(req.headers_mut());
    let req = req.map(crate::http::ScrubTrailers);
    let dialed = c.p.dialer.dial(c.dest, &c.expected, Carries::Http1).await;
    let Some((stream, session)) = dialed else {
        return Err(Answer::error(
            StatusCode::BAD_GATEWAY,
            SendError::Unreachable,
        ));
    };
    let a = Admitted {
        direction: DIR,
        kind: Kind::Tunnel,
        local: c.local.clone(),
        peer_label: c.peer_label.clone(),
        peer: c.expected.clone(),
        session,
        port: c.dest.port(),
        protocol: "tunnel",
        rule: None,
        would_deny: None,
        policy_version: None,
    };
    let (labels, counters, mut guard) = c.p.ledger.admit(a);
    let io = TokioIo::new(Counted::new(stream, counters));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
        Ok(x) => x,
        Err(e) => {
            c.p.ledger
                .closed(&labels, Some(&guard), CloseReason::IoError);
            return Err(Answer::error(StatusCode::BAD_GATEWAY, e));
        }
    };
    let (upgraded_tx, upgraded_rx) = tokio::sync::oneshot::channel();
    let p = c.p.clone();
    // The workload's connection (and its `Load`) may end at the upgrade; the tunnel stays.
    let load = p.workers.hold();
    let idle = p.cfg.spec.timeouts.idle;
    tokio::spawn(async move {
        let _held = (load, room);
        let reason = tokio::select! {
            // Ends when the response is done and the sender dropped, or at the upgrade.
            r = conn.with_upgrades() => r.err().map(|_| CloseReason::IoError),
            reason = closed(&mut guard.close_rx) => Some(reason),
        };
        let reason = match reason {
            Some(reason) => reason,
            None => match upgraded_rx.await {
                Ok(up) => tunnel(down, up, &mut guard.close_rx, idle).await,
                Err(_) => CloseReason::Done,
            },
        };
        p.ledger.closed(&labels, Some(&guard), reason);
    });
    let limit = c.p.cfg.spec.timeouts.request;
    let mut resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| {
            Answer::error(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the destination's sidecar did not answer the upgrade within {limit:?}"),
            )
        })?
        .map_err(|e| Answer::error(StatusCode::BAD_GATEWAY, format!("peer sidecar: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let _ = upgraded_tx.send(hyper::upgrade::on(&mut resp));
    }
    Ok(resp.map(|b| b.map_err(Into::into).boxed()))
}
