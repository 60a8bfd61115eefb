//! Inbound: a peer sidecar connects; we terminate mTLS, authorize its SPIFFE ID for the
//! workload port it dialled, and forward plaintext to 127.0.0.1:<port>: as bytes, or request
//! by request when the connection carries HTTP (the port is declared `http`, the peer's
//! ALPN says so, or a client without ALPN is sniffed speaking it).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use sigil_filters::detect::{inbound_serve, per_request, Serve, Speaks};
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::tls::{handshake_failure, Carries};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::admission::{Handshake, Slot};
use crate::conns::{Direction, Kind};
use crate::inbound_http;
use crate::ledger::{peer_chain, Admitted};
use crate::logs::limited;
use crate::metrics::{RuleLabels, UNAUTHENTICATED_PEER};
use crate::proxy::{now_unix, Proxy};
use crate::reasons::{CloseReason, Refusal};
use crate::relay::{sniff, Rewind};
use crate::workers::Load;

const DIR: Direction = Direction::Inbound;

/// `room`: the connection's admission (`admission`); the handshake's part is given back once
/// the handshake ends, the rest when the connection does.
pub async fn handle(
    p: Arc<Proxy>,
    tcp: TcpStream,
    mut load: Load,
    client: SocketAddr,
    port: u16,
    room: (Slot, Handshake),
) {
    let (_slot, handshake) = room;
    let tls = p.tls.get();
    let local = tls.local_label.clone();
    if let Some(r) = tls.self_revoked() {
        limited!(info, %client, port, revocation = %r.metadata.name, reason = "self_revoked", "inbound refused: our own SVID is revoked");
        let peer = UNAUTHENTICATED_PEER.into();
        p.ledger.refused(DIR, &local, peer, Refusal::SelfRevoked);
        return;
    }
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let timeout = p.cfg.spec.timeouts.handshake;
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            limited!(info, %client, port, reason = "handshake_timeout", "inbound refused: no handshake within {timeout:?}");
            p.ledger.handshake_failed(DIR, &local, "handshake_timeout");
            return;
        }
        Ok(Err(e)) => {
            let (reason, detail) = handshake_failure(&e);
            limited!(info, %client, port, reason, "inbound refused: {detail}");
            p.ledger.handshake_failed(DIR, &local, reason);
            return;
        }
        Ok(Ok(s)) => s,
    };
    drop(handshake);
    // The verifier accepted the chain; take the identity from the same leaf, once.
    let chain = peer_chain(stream.get_ref().1);
    let Some(peer) = chain
        .first()
        .and_then(|leaf| leaf_spiffe_id(leaf, None).ok())
    else {
        limited!(warn, %client, "inbound: verified handshake without a readable peer SVID");
        p.ledger.handshake_failed(DIR, &local, "invalid_svid");
        return;
    };
    let peer_label = p.ledger.metrics.peer_label(peer.as_str());
    let carries = Carries::from_alpn(stream.get_ref().1.alpn_protocol());
    load.multiplexed(carries == Some(Carries::Http2));
    let index = p.policy();
    let per_request = per_request(carries, index.is_http(port));
    if !per_request {
        let verdict = index.decide_tcp(&peer, port, now_unix());
        if let Some(w) = verdict.would_deny {
            limited!(info, %client, peer = %peer, port, rule = %w, "dry-run: would deny connection");
            p.ledger
                .metrics
                .would_deny
                .get_or_create(&RuleLabels {
                    local_id: local.clone(),
                    rule: index.label(&w),
                })
                .inc();
        }
        if !verdict.allowed {
            limited!(info, %client, peer = %peer, port, rule = %verdict.rule, reason = "not_allowed", "inbound refused");
            p.ledger
                .refused(DIR, &local, peer_label, Refusal::NotAllowed);
            // close_notify, so the peer sidecar sees a clean end rather than a truncation.
            let mut stream = stream;
            let _ = tokio::time::timeout(timeout, stream.shutdown()).await;
            return;
        }
        debug!(%client, peer = %peer, port, rule = %verdict.rule, "inbound allowed");
    }
    // HTTP gets per-request handling (metrics, the peer header, route checks once a policy
    // declares the port); anything else is relayed as bytes.
    let may_be_http = !index.is_tcp(port) && !p.cfg.spec.inbound.opaque_ports.contains(&port);
    // Connections re-check against the current index on policy changes; do not pin this one.
    drop((tls, index));
    let mut stream = stream;
    let (http, prefix): (Option<Speaks>, _) = match inbound_serve(carries, per_request, may_be_http)
    {
        Serve::Http(speaks) => (Some(speaks), Vec::new()),
        Serve::Bytes => (None, Vec::new()),
        Serve::Sniff => {
            let (detected, prefix) = sniff(&mut stream, p.cfg.spec.timeouts.detect).await;
            (Speaks::detected(detected), prefix)
        }
    };
    let stream = Rewind::new(prefix, stream);
    if let Some(speaks) = http {
        let a = Admitted {
            direction: DIR,
            kind: Kind::Http,
            local,
            peer_label: peer_label.clone(),
            peer,
            chain,
            port,
        };
        let reason = inbound_http::serve(p, stream, speaks, a).await;
        if reason != CloseReason::Done {
            limited!(info, %client, peer = %peer_label, port, reason = reason.label(), "inbound HTTP connection closed");
        }
        return;
    }
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let connect = tokio::time::timeout(p.cfg.spec.timeouts.connect, TcpStream::connect(upstream));
    let workload = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            limited!(info, peer = %peer, %upstream, "inbound refused: workload unreachable: {e}");
            p.ledger
                .refused(DIR, &local, peer_label, Refusal::UpstreamUnavailable);
            return;
        }
        Err(_) => {
            limited!(info, peer = %peer, %upstream, "inbound refused: workload connect timed out");
            p.ledger
                .refused(DIR, &local, peer_label, Refusal::UpstreamUnavailable);
            return;
        }
    };
    let _ = workload.set_nodelay(true);
    let label = peer_label.clone();
    let a = Admitted {
        direction: DIR,
        kind: Kind::Tcp,
        local,
        peer_label,
        peer,
        chain,
        port,
    };
    let idle = p.cfg.spec.timeouts.idle;
    let reason = p.ledger.carry(a, stream, workload, idle).await;
    if reason != CloseReason::Done {
        limited!(info, %client, peer = %label, port, reason = reason.label(), "inbound connection closed");
    }
}
