//! Inbound: a peer sidecar connects; we terminate mTLS, authorize its SPIFFE ID for the
//! workload port it dialled, and forward plaintext to 127.0.0.1:<port>: as bytes, or request
//! by request when the connection carries HTTP (the port is declared `http`, the peer's
//! ALPN says so, or a client without ALPN is sniffed speaking it).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use sigil_config::SpiffeId;
use sigil_filters::detect::{inbound_serve, per_request, Serve, Speaks};
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::tls::{handshake_failure, Carries};
use sigil_filters::PolicyIndex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::admission::{Handshake, Slot};
use crate::conns::{Direction, Kind};
use crate::inbound_http;
use crate::ledger::{Admitted, RefusedBy, Session};
use crate::logs::limited;
use crate::metrics::{RuleLabels, UNAUTHENTICATED_PEER};
use crate::proxy::{now_unix, Proxy};
use crate::reasons::{CloseReason, Refusal};
use crate::relay::{sniff, Rewind};
use crate::workers::Load;

const DIR: Direction = Direction::Inbound;

/// A peer that completed the handshake: who it is and what its ALPN said it carries.
struct Peer {
    id: SpiffeId,
    label: Arc<str>,
    session: Session,
    carries: Option<Carries>,
}

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
    let local = p.tls.get().local_label.clone();
    let Some((stream, peer)) = accept(&p, tcp, client, port, &local).await else {
        return;
    };
    drop(handshake);
    load.multiplexed(peer.carries == Some(Carries::Http2));
    let (index, policy_version) = p.policy_and_version();
    let per_request = per_request(peer.carries, index.is_http(port));
    let decided = (&*index, policy_version);
    let (rule, would_deny) = if per_request {
        (None, None)
    } else if let Some((rule, would_deny)) = allowed(&p, decided, client, port, &local, &peer) {
        (Some(rule), would_deny)
    } else {
        // close_notify, so the peer sidecar sees a clean end rather than a truncation.
        let mut stream = stream;
        let _ = tokio::time::timeout(p.cfg.spec.timeouts.handshake, stream.shutdown()).await;
        return;
    };
    // HTTP gets per-request handling (metrics, the peer header, route checks once a policy
    // declares the port); anything else is relayed as bytes.
    let may_be_http = !index.is_tcp(port) && !p.cfg.spec.inbound.opaque_ports.contains(&port);
    // Connections re-check against the current index on policy changes; do not pin this one.
    drop(index);
    let mut stream = stream;
    let (http, prefix) = match inbound_serve(peer.carries, per_request, may_be_http) {
        Serve::Http(speaks) => (Some(speaks), Vec::new()),
        Serve::Bytes => (None, Vec::new()),
        Serve::Sniff => {
            let (detected, prefix) = sniff(&mut stream, p.cfg.spec.timeouts.detect).await;
            (Speaks::detected(detected), prefix)
        }
    };
    let stream = Rewind::new(prefix, stream);
    let label = peer.label.clone();
    let a = Admitted {
        direction: DIR,
        kind: if http.is_some() {
            Kind::Http
        } else {
            Kind::Tcp
        },
        local,
        peer_label: peer.label,
        peer: peer.id,
        session: peer.session,
        port,
        protocol: match http {
            Some(Speaks::Http1) => "http1",
            Some(Speaks::Http2) => "http2",
            Some(Speaks::Either) => "http",
            None => "tcp",
        },
        rule,
        would_deny,
        policy_version: Some(policy_version),
    };
    let reason = match http {
        Some(speaks) => inbound_http::serve(p, stream, speaks, a).await,
        None => match relay_to_workload(&p, stream, a).await {
            Some(reason) => reason,
            None => return,
        },
    };
    if reason != CloseReason::Done {
        limited!(info, %client, peer = %label, port, reason = reason.label(), "inbound connection closed");
    }
}

/// The mTLS handshake, and the peer's ID from the leaf the verifier accepted. None: refused
/// (our own SVID revoked, a failed or slow handshake), logged and counted here.
async fn accept(
    p: &Proxy,
    tcp: TcpStream,
    client: SocketAddr,
    port: u16,
    local: &Arc<str>,
) -> Option<(TlsStream<TcpStream>, Peer)> {
    let tls = p.tls.get();
    if let Some(r) = tls.self_revoked() {
        limited!(info, %client, port, revocation = %r.metadata.name, reason = "self_revoked", "inbound refused: our own SVID is revoked");
        let peer = UNAUTHENTICATED_PEER.into();
        p.ledger.refused(DIR, local, peer, Refusal::SelfRevoked);
        return None;
    }
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let bundle_version = tls.bundle_version;
    drop(tls);
    let timeout = p.cfg.spec.timeouts.handshake;
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            limited!(info, %client, port, reason = "handshake_timeout", "inbound refused: no handshake within {timeout:?}");
            p.ledger.handshake_failed(DIR, local, "handshake_timeout");
            return None;
        }
        Ok(Err(e)) => {
            let (reason, detail) = handshake_failure(&e);
            limited!(info, %client, port, reason, "inbound refused: {detail}");
            p.ledger.handshake_failed(DIR, local, reason);
            return None;
        }
        Ok(Ok(s)) => s,
    };
    // The verifier accepted the chain; take the identity from the same leaf, once.
    let session = Session::of(stream.get_ref().0, stream.get_ref().1, bundle_version);
    let Some(id) = session
        .chain
        .first()
        .and_then(|leaf| leaf_spiffe_id(leaf, None).ok())
    else {
        limited!(warn, %client, "inbound: verified handshake without a readable peer SVID");
        p.ledger.handshake_failed(DIR, local, "invalid_svid");
        return None;
    };
    let peer = Peer {
        label: p.ledger.metrics.peer_label(id.as_str()),
        carries: Carries::from_alpn(stream.get_ref().1.alpn_protocol()),
        id,
        session,
    };
    Some((stream, peer))
}

/// The port's connection-level rule for `peer` (a connection whose requests are not each
/// checked): the label of the rule that allows it and of a dry-run rule that would deny it
/// (counted here), or None if refused (logged and counted here).
fn allowed(
    p: &Proxy,
    (index, policy_version): (&PolicyIndex, u64),
    client: SocketAddr,
    port: u16,
    local: &Arc<str>,
    peer: &Peer,
) -> Option<(Arc<str>, Option<Arc<str>>)> {
    let verdict = index.decide_tcp(&peer.id, port, now_unix());
    let would_deny = verdict.would_deny.map(|w| index.label(&w));
    if let Some(w) = verdict.would_deny {
        limited!(info, %client, peer = %peer.id, port, rule = %w, "dry-run: would deny connection");
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
        limited!(info, %client, peer = %peer.id, port, rule = %verdict.rule, reason = "not_allowed", "inbound refused");
        let label = peer.label.clone();
        let rule = index.label(&verdict.rule);
        let by = Some(RefusedBy {
            rule: &rule,
            policy_version,
            bundle_version: peer.session.bundle_version,
        });
        p.ledger
            .refused_by(DIR, local, label, Refusal::NotAllowed, by);
        return None;
    }
    debug!(%client, peer = %peer.id, port, rule = %verdict.rule, "inbound allowed");
    Some((index.label(&verdict.rule), would_deny))
}

/// Relays an admitted connection's bytes to 127.0.0.1:<port>. None: the workload could not
/// be reached (refused, logged and counted here).
async fn relay_to_workload<S>(p: &Proxy, stream: S, a: Admitted) -> Option<CloseReason>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, a.port));
    let connect = tokio::time::timeout(p.cfg.spec.timeouts.connect, TcpStream::connect(upstream));
    let workload = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            limited!(info, peer = %a.peer, %upstream, "inbound refused: workload unreachable: {e}");
            p.ledger
                .refused(DIR, &a.local, a.peer_label, Refusal::UpstreamUnavailable);
            return None;
        }
        Err(_) => {
            limited!(info, peer = %a.peer, %upstream, "inbound refused: workload connect timed out");
            p.ledger
                .refused(DIR, &a.local, a.peer_label, Refusal::UpstreamUnavailable);
            return None;
        }
    };
    let _ = workload.set_nodelay(true);
    let idle = p.cfg.spec.timeouts.idle;
    Some(p.ledger.carry(a, stream, workload, idle).await)
}
