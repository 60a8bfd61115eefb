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
use sigil_filters::normalize::effective_host;
use sigil_filters::tls::Carries;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::conns::{Direction, Kind};
use crate::l7::{is_grpc, local_response, serve_until_closed, status_class, tunnel, Body, Speaks};
use crate::logs::limited;
use crate::metrics::RequestMetrics;
use crate::outbound::dial;
use crate::pool::{SendError, Slot};
use crate::proxy::{Admitted, Proxy};
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
struct Refusal(StatusCode, &'static str, String);

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
    let peer_label = p.metrics.peer_label(expected.as_str());
    let conn = Arc::new(Conn {
        p: p.clone(),
        dest,
        metrics: RequestMetrics::new(&p.metrics, DIR.label(), local.clone(), peer_label.clone()),
        local,
        peer_label,
        expected: expected.clone(),
        route: "remote".into(),
        slot: p.pool.slot(dest, &expected),
    });
    // Registered so that the drain waits for it; its traffic is counted on the pooled
    // connections, which carry the identity.
    let mut guard = p
        .conns
        .register(DIR, Kind::Workload, expected, Vec::new(), dest.port());
    let service = move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    };
    let reason = serve_until_closed(&p, workload, speaks, service, &mut guard.close_rx).await;
    if reason != "done" {
        limited!(info, %dest, reason, "outbound HTTP connection closed");
    }
}

async fn handle(c: &Conn, req: Request<Incoming>) -> Response<Body> {
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
        Err(Refusal(status, decision, why)) => {
            limited!(info, dest = %c.dest, peer = %c.expected, status = status.as_u16(), "outbound request failed: {why}");
            (decision, local_response(status, grpc, &why))
        }
    };
    c.metrics.record(
        &c.p.metrics,
        &c.route,
        decision,
        status_class(resp.status()),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// Sends the request as HTTP/2 over the pooled connection (see `Pool::send`).
async fn via_pool(c: &Conn, req: Request<Incoming>, grpc: bool) -> Result<Response<Body>, Refusal> {
    let (mut parts, body) = req.into_parts();
    let authority = authority(&parts, c.dest)
        .map_err(|why| Refusal(StatusCode::BAD_REQUEST, "invalid", why))?;
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
        .map_err(|e| Refusal(StatusCode::BAD_REQUEST, "invalid", e.to_string()))?;
    parts.version = Version::HTTP_2;
    // HTTP/2 carries the host as :authority (RFC 9113 §8.3.1).
    parts.headers.remove(HOST);
    let req = Request::from_parts(parts, body);
    match c.p.pool.send(&c.p, &c.slot, req, grpc).await {
        Ok(resp) => Ok(resp),
        Err(SendError::Unreachable) => Err(unreachable_peer()),
        Err(SendError::Gone) => Err(Refusal(
            StatusCode::BAD_GATEWAY,
            "error",
            "the destination left the mesh registry".into(),
        )),
        Err(SendError::Failed(why)) => Err(Refusal(StatusCode::BAD_GATEWAY, "error", why)),
        Err(SendError::TimedOut(after)) => Err(Refusal(
            StatusCode::GATEWAY_TIMEOUT,
            "error",
            format!("the destination's sidecar did not answer within {after:?}"),
        )),
    }
}

fn unreachable_peer() -> Refusal {
    Refusal(
        StatusCode::BAD_GATEWAY,
        "error",
        "cannot reach the destination's sidecar (see the sidecar log)".into(),
    )
}

/// The authority to send: the target's (HTTP/2, absolute-form) or Host, which must agree
/// when both are given, else the destination address.
fn authority(parts: &hyper::http::request::Parts, dest: SocketAddr) -> Result<Authority, String> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header".into());
    }
    let host = match host {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "Host header is not ASCII".to_string())?,
        ),
        None => None,
    };
    let target = parts.uri.authority();
    // The same check the destination would make, which it cannot once Host is gone.
    effective_host(target.map(|a| a.as_str()), host, 80).map_err(|e| e.to_string())?;
    match (target, host) {
        (Some(a), _) => Ok(a.clone()),
        (None, Some(h)) => {
            Authority::try_from(h).map_err(|e| format!("invalid Host header {h:?}: {e}"))
        }
        (None, None) => Authority::try_from(dest.to_string())
            .map_err(|e| format!("destination {dest} as authority: {e}")),
    }
}

/// An upgrade request gets an HTTP/1.1 mTLS connection of its own (ALPN `http/1.1`); once
/// the destination answers 101, the connection carries the tunnel and stays registered.
async fn via_own_connection(
    c: &Conn,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    // The tunnel outlives the workload connection and its room: it takes its own.
    let room = c.p.admission.total_only().map_err(|why| {
        Refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "error",
            format!("no room for a tunnel: {why}"),
        )
    })?;
    let down = hyper::upgrade::on(&mut req);
    crate::http::strip_identity(req.headers_mut());
    let req = req.map(crate::http::ScrubTrailers);
    let Some((stream, chain)) = dial(&c.p, c.dest, &c.expected, Carries::Http1).await else {
        return Err(unreachable_peer());
    };
    let a = Admitted {
        direction: DIR,
        kind: Kind::Tunnel,
        local: c.local.clone(),
        peer_label: c.peer_label.clone(),
        peer: c.expected.clone(),
        chain,
        port: c.dest.port(),
    };
    let (labels, counters, mut guard) = c.p.admit(a);
    let io = TokioIo::new(Counted::new(stream, counters));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
        Ok(x) => x,
        Err(e) => {
            c.p.closed(&labels, "io_error");
            return Err(Refusal(StatusCode::BAD_GATEWAY, "error", e.to_string()));
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
            r = conn.with_upgrades() => r.err().map(|_| "io_error"),
            reason = closed(&mut guard.close_rx) => Some(reason),
        };
        let reason = match reason {
            Some(reason) => reason,
            None => match upgraded_rx.await {
                Ok(up) => tunnel(down, up, &mut guard.close_rx, idle).await,
                Err(_) => "done",
            },
        };
        p.closed(&labels, reason);
    });
    let limit = c.p.cfg.spec.timeouts.request;
    let mut resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| {
            Refusal(
                StatusCode::GATEWAY_TIMEOUT,
                "error",
                format!("the destination's sidecar did not answer the upgrade within {limit:?}"),
            )
        })?
        .map_err(|e| {
            Refusal(
                StatusCode::BAD_GATEWAY,
                "error",
                format!("peer sidecar: {e}"),
            )
        })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let _ = upgraded_tx.send(hyper::upgrade::on(&mut resp));
    }
    Ok(resp.map(|b| b.map_err(Into::into).boxed()))
}
