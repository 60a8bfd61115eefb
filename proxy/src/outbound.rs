//! Outbound: the workload dials a destination; a mesh destination (in the registry) gets
//! mTLS with our SVID and must present exactly the expected SPIFFE ID; any other is passed
//! through or denied per config. HTTP from the workload is detected and sent request by
//! request over pooled connections (`outbound_http`); anything else is relayed as bytes over
//! a connection of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use sigil_config::proxy_config::UnknownDestination;
use sigil_config::SpiffeId;
use sigil_filters::detect::Detected;
use sigil_filters::tls::{handshake_failure, Carries};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::admission::Slot;
use crate::conns::{Direction, Kind};
use crate::l7::Speaks;
use crate::logs::limited;
use crate::metrics::ConnLabels;
use crate::outbound_http;
use crate::proxy::{peer_chain, Admitted, Proxy};
use crate::relay::{relay, sniff, Rewind};
use crate::workers::Load;

const DIR: Direction = Direction::Outbound;
const PASSTHROUGH_PEER: &str = "passthrough";
const UNKNOWN_PEER: &str = "unknown";

/// `expected`: the peer ID for explicit listeners; None means look `dest` up in the registry.
pub async fn handle(
    p: Arc<Proxy>,
    workload: TcpStream,
    mut load: Load,
    dest: SocketAddr,
    expected: Option<SpiffeId>,
    // Held for as long as the workload's connection lasts (`admission`).
    _room: Slot,
) {
    let expected = match expected.or_else(|| p.expected_id(dest)) {
        Some(id) => id,
        None => return unknown_destination(p, workload, dest).await,
    };
    let mut workload = workload;
    let (detected, prefix) = if p.cfg.spec.outbound.opaque_ports.contains(&dest.port()) {
        (Detected::Opaque, Vec::new())
    } else {
        sniff(&mut workload, p.cfg.spec.timeouts.detect).await
    };
    let workload = Rewind::new(prefix, workload);
    load.multiplexed(detected == Detected::Http2);
    if let Some(speaks) = Speaks::detected(detected) {
        return outbound_http::serve(p, workload, speaks, dest, expected).await;
    }
    let Some((stream, chain)) = dial(&p, dest, &expected, Carries::Tcp).await else {
        return;
    };
    let local = p.tls.get().local_label.clone();
    let peer_label = p.metrics.peer_label(expected.as_str());
    let a = Admitted {
        direction: DIR,
        kind: Kind::Tcp,
        local,
        peer_label: peer_label.clone(),
        peer: expected,
        chain,
        port: dest.port(),
    };
    let reason = p.carry(a, stream, workload).await;
    if reason != "done" {
        limited!(info, %dest, peer = %peer_label, reason, "outbound connection closed");
    }
}

/// TCP and mTLS to a mesh destination, which must present `expected`. Failures are logged
/// and counted here; None means the caller has nothing to send on.
pub async fn dial(
    p: &Proxy,
    dest: SocketAddr,
    expected: &SpiffeId,
    carries: Carries,
) -> Option<(TlsStream<TcpStream>, Vec<CertificateDer<'static>>)> {
    let tls = p.tls.get();
    let local = &tls.local_label;
    if let Some(r) = tls.self_revoked() {
        limited!(info, %dest, peer = %expected, revocation = %r.metadata.name, reason = "self_revoked", "outbound refused: our own SVID is revoked");
        let peer_label = p.metrics.peer_label(expected.as_str());
        p.refused(DIR, local, peer_label, "self_revoked");
        return None;
    }
    let timeouts = &p.cfg.spec.timeouts;
    let tcp = match tokio::time::timeout(timeouts.connect, TcpStream::connect(dest)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            limited!(info, %dest, peer = %expected, "outbound refused: connect failed: {e}");
            let peer_label = p.metrics.peer_label(expected.as_str());
            p.refused(DIR, local, peer_label, "upstream_unavailable");
            return None;
        }
        Err(_) => {
            limited!(info, %dest, peer = %expected, "outbound refused: connect timed out");
            let peer_label = p.metrics.peer_label(expected.as_str());
            p.refused(DIR, local, peer_label, "upstream_unavailable");
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    let connector = TlsConnector::from(tls.client_config(expected, carries));
    let name = ServerName::IpAddress(dest.ip().into());
    let stream = match tokio::time::timeout(timeouts.handshake, connector.connect(name, tcp)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let (reason, detail) = handshake_failure(&e);
            limited!(info, %dest, expected = %expected, reason, "outbound refused: {detail}");
            p.handshake_failed(DIR, local, reason);
            return None;
        }
        Err(_) => {
            limited!(info, %dest, expected = %expected, "outbound refused: handshake timed out");
            p.handshake_failed(DIR, local, "handshake_timeout");
            return None;
        }
    };
    debug!(%dest, peer = %expected, ?carries, "outbound mTLS established");
    let chain = peer_chain(stream.get_ref().1);
    Some((stream, chain))
}

async fn unknown_destination(p: Arc<Proxy>, workload: TcpStream, dest: SocketAddr) {
    let local = p.tls.get().local_label.clone();
    if p.cfg.spec.outbound.unknown_destination == UnknownDestination::Deny {
        limited!(info, %dest, reason = "unknown_destination", "outbound refused: not in the mesh registry");
        p.refused(DIR, &local, UNKNOWN_PEER.into(), "unknown_destination");
        return;
    }
    let upstream =
        match tokio::time::timeout(p.cfg.spec.timeouts.connect, TcpStream::connect(dest)).await {
            Ok(Ok(s)) => s,
            _ => {
                limited!(info, %dest, "outbound passthrough: connect failed");
                p.refused(DIR, &local, PASSTHROUGH_PEER.into(), "upstream_unavailable");
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    let labels = ConnLabels {
        direction: DIR.label(),
        local_id: local,
        peer_id: PASSTHROUGH_PEER.into(),
    };
    let counters = p.opened(&labels);
    // Passthrough has no peer identity; it is not registered for identity-based closing.
    let (_tx, mut rx) = tokio::sync::watch::channel(None);
    let idle = p.cfg.spec.timeouts.idle;
    let reason = relay(upstream, workload, &counters, &mut rx, idle).await;
    p.closed(&labels, reason);
}
