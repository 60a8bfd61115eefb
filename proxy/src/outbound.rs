//! Outbound: the workload dials a destination; a mesh destination (in the registry) gets
//! mTLS with our SVID and must present exactly the expected SPIFFE ID; any other is passed
//! through or denied per config. HTTP from the workload is detected and sent request by
//! request over pooled connections (`outbound_http`); anything else is relayed as bytes over
//! a connection of its own.

use std::net::SocketAddr;
use std::sync::Arc;

use sigil_config::proxy_config::UnknownDestination;
use sigil_config::SpiffeId;
use sigil_filters::detect::{Detected, Speaks};
use sigil_filters::tls::Carries;
use tokio::net::TcpStream;

use crate::admission::Slot;
use crate::conns::{Direction, Kind};
use crate::ledger::Admitted;
use crate::logs::limited;
use crate::metrics::ConnLabels;
use crate::outbound_http;
use crate::proxy::Proxy;
use crate::reasons::{CloseReason, Refusal};
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
    let Some((stream, session)) = p.dialer.dial(dest, &expected, Carries::Tcp).await else {
        return;
    };
    let local = p.tls.get().local_label.clone();
    let peer_label = p.ledger.metrics.peer_label(expected.as_str());
    let a = Admitted {
        direction: DIR,
        kind: Kind::Tcp,
        local,
        peer_label: peer_label.clone(),
        peer: expected,
        session,
        port: dest.port(),
        protocol: "tcp",
        rule: None,
        would_deny: None,
        policy_version: None,
    };
    let idle = p.cfg.spec.timeouts.idle;
    let reason = p.ledger.carry(a, stream, workload, idle).await;
    if reason != CloseReason::Done {
        limited!(info, %dest, peer = %peer_label, reason = reason.label(), "outbound connection closed");
    }
}

async fn unknown_destination(p: Arc<Proxy>, workload: TcpStream, dest: SocketAddr) {
    let local = p.tls.get().local_label.clone();
    if p.cfg.spec.outbound.unknown_destination == UnknownDestination::Deny {
        limited!(info, %dest, reason = "unknown_destination", "outbound refused: not in the mesh registry");
        p.ledger.refused(
            DIR,
            &local,
            UNKNOWN_PEER.into(),
            Refusal::UnknownDestination,
        );
        return;
    }
    let upstream =
        match tokio::time::timeout(p.cfg.spec.timeouts.connect, TcpStream::connect(dest)).await {
            Ok(Ok(s)) => s,
            _ => {
                limited!(info, %dest, "outbound passthrough: connect failed");
                let peer = PASSTHROUGH_PEER.into();
                p.ledger
                    .refused(DIR, &local, peer, Refusal::UpstreamUnavailable);
                return;
            }
        };
    let _ = upstream.set_nodelay(true);
    let labels = ConnLabels {
        direction: DIR.label(),
        local_id: local,
        peer_id: PASSTHROUGH_PEER.into(),
    };
    let counters = p.ledger.opened(&labels);
    // Passthrough has no peer identity; it is not registered for identity-based closing.
    let (_tx, mut rx) = tokio::sync::watch::channel(None);
    let idle = p.cfg.spec.timeouts.idle;
    let reason = relay(upstream, workload, &counters, &mut rx, idle).await;
    p.ledger.closed(&labels, None, reason);
}
