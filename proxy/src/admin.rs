//! Admin listener: /live, /ready, /metrics, /config_dump. It listens on every address (for
//! scrapes), so it is bounded too: `LIMITS` connections at once, and fewer from one source
//! address, so that one client cannot starve the kubelet's probes or Prometheus; each is
//! closed when a request head takes longer than `http::HEADER_READ_TIMEOUT` (idle keep-alive
//! included).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use sigil_filters::limits::{ConnLimits, Refusal};

use crate::admission::Admission;
use crate::proxy::Proxy;

/// Admin connections open at once, and from one source; more are closed at accept. Probes
/// and scrapes need a handful. (No TLS here: the handshake bounds do not apply.)
pub const LIMITS: ConnLimits = ConnLimits {
    connections: 256,
    connections_per_source: 16,
    handshakes: u32::MAX,
    handshakes_per_source: u32::MAX,
};

pub fn serve_conn(p: Arc<Proxy>, admission: &Arc<Admission>, tcp: TcpStream, client: SocketAddr) {
    let slot = match admission.inbound(client.ip()) {
        Ok((slot, _no_handshake)) => slot,
        Err(why) => {
            let local = p.tls.get().local_label.clone();
            p.ledger.refused(
                crate::conns::Direction::Inbound,
                &local,
                crate::metrics::UNAUTHENTICATED_PEER.into(),
                crate::reasons::Refusal::AdminLimit,
            );
            let why = match why {
                Refusal::TooManyFromSource => "16 admin connections open from this address",
                _ => "256 admin connections open",
            };
            crate::logs::limited!(warn, %client, "admin connection refused: {why}");
            return;
        }
    };
    tokio::spawn(async move {
        let _slot = slot;
        let service = hyper::service::service_fn(move |req| {
            let p = p.clone();
            async move { Ok::<_, Infallible>(route(&p, client, &req)) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(crate::http::HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(tcp), service)
            .await;
    });
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response parts")
}

fn route(p: &Proxy, client: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match p.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => Response::builder()
            .header(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(p.ledger.metrics.encode().into()))
            .expect("static response parts"),
        // The admin port is reachable from outside for scraping; the config is not.
        "/config_dump" if client.ip().is_loopback() => Response::builder()
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(config_dump(p).into()))
            .expect("static response parts"),
        "/config_dump" => text(
            StatusCode::FORBIDDEN,
            "config_dump is served to loopback only\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live /ready /metrics /config_dump\n",
        ),
    }
}

/// The running configuration and identity state. Certificates are public; the private key
/// is never part of it (only its file path, from the config).
fn config_dump(p: &Proxy) -> String {
    let tls = p.tls.get();
    let pushed = p
        .sources
        .lock()
        .expect("sources lock")
        .pushed
        .as_ref()
        .map(|s| {
            serde_json::json!({
                "version": s.version,
                "policies": s.policies.iter().map(|p| p.metadata.name.as_str()).collect::<Vec<_>>(),
                "revocations": s.revocations.iter().map(|r| r.metadata.name.as_str()).collect::<Vec<_>>(),
                "registry_entries": s.registry.len(),
                "trust_bundles": s.bundles.as_ref().map(|b| b.domains()).unwrap_or_default(),
            })
        });
    let dump = serde_json::json!({
        "control_plane_snapshot": pushed,
        "registry_entries": p.registry_len(),
        "config": { "metadata": &p.cfg.metadata, "spec": &p.cfg.spec },
        "identity": {
            "spiffe_id": tls.identity.id().as_str(),
            "not_after_unix": tls.identity.not_after(),
            "chain_length": tls.identity.chain().len(),
        },
        "trust_domains": tls.bundles.domains(),
        "revocations_in_force": tls.revocations.len(),
        "open": {
            "connections": p.admission.open().0,
            "pending_handshakes": p.admission.open().1,
            "pooled_destinations": p.pool.destinations(),
        },
        "self_revoked": tls.self_revoked().map(|r| r.metadata.name.as_str()),
        "live_connections": p.ledger.conns.snapshot().into_iter()
            .map(|(direction, kind, peer)| serde_json::json!({
                "direction": direction, "kind": kind, "peer_id": peer,
            }))
            .collect::<Vec<_>>(),
        "ready": p.ready().is_ok(),
    });
    serde_json::to_string_pretty(&dump).expect("JSON of plain values") + "\n"
}
