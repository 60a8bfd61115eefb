//! Pooled connections to peer sidecars for outbound HTTP: one multiplexed HTTP/2 connection
//! (ALPN `sigil/h2`) per destination and expected ID, shared by every workload connection
//! that calls it, as linkerd2-proxy does. hyper-util's pool is not used because its
//! connections cannot be registered: each of ours is in the connection registry like any
//! other, so a bundle change or a revocation cuts it, and the next request dials (and
//! verifies) afresh.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_config::SpiffeId;
use sigil_filters::tls::Carries;
use tracing::{debug, info};

use crate::conns::{Direction, Kind};
use crate::outbound::dial;
use crate::proxy::{Admitted, Proxy};
use crate::relay::{closed, Counted};

/// A dead peer (no PING answer) is noticed within interval + timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<SocketAddr, Vec<Arc<Slot>>>>,
}

struct Slot {
    expected: SpiffeId,
    /// Async, so that concurrent first requests wait for one dial instead of racing.
    sender: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
}

impl Pool {
    fn slot(&self, dest: SocketAddr, expected: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("pool lock");
        let list = slots.entry(dest).or_default();
        if let Some(s) = list.iter().find(|s| s.expected == *expected) {
            return s.clone();
        }
        let s = Arc::new(Slot {
            expected: expected.clone(),
            sender: tokio::sync::Mutex::new(None),
        });
        list.push(s.clone());
        s
    }

    /// A sender on a live pooled connection to `dest`, dialling one if there is none. None:
    /// the dial failed (logged and counted by `dial`).
    pub async fn sender(
        &self,
        p: &Arc<Proxy>,
        dest: SocketAddr,
        expected: &SpiffeId,
    ) -> Option<SendRequest<Incoming>> {
        let slot = self.slot(dest, expected);
        let mut sender = slot.sender.lock().await;
        if let Some(s) = sender.as_ref().filter(|s| !s.is_closed()) {
            return Some(s.clone());
        }
        let s = connect(p, dest, expected).await?;
        *sender = Some(s.clone());
        Some(s)
    }
}

async fn connect(
    p: &Arc<Proxy>,
    dest: SocketAddr,
    expected: &SpiffeId,
) -> Option<SendRequest<Incoming>> {
    let (stream, chain) = dial(p, dest, expected, Carries::Http2).await?;
    let a = Admitted {
        direction: Direction::Outbound,
        kind: Kind::Pooled,
        local: p.tls.get().local_label.clone(),
        peer_label: p.metrics.peer_label(expected.as_str()),
        peer: expected.clone(),
        chain,
        port: dest.port(),
    };
    let (labels, counters, mut guard) = p.admit(a);
    let io = TokioIo::new(Counted::new(stream, counters));
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .adaptive_window(true)
        .max_header_list_size(64 * 1024);
    let (sender, conn) = match builder.handshake(io).await {
        Ok(c) => c,
        Err(e) => {
            info!(%dest, peer = %expected, "pooled connection failed at the HTTP/2 handshake: {e}");
            p.closed(&labels, "io_error");
            return None;
        }
    };
    debug!(%dest, peer = %expected, "pooled connection open");
    let p = p.clone();
    tokio::spawn(async move {
        // Dropping `conn` drops the socket: every request on it fails and the senders
        // report closed, so the pool dials again on next use.
        let reason = tokio::select! {
            r = conn => if r.is_ok() { "done" } else { "io_error" },
            reason = closed(&mut guard.close_rx) => reason,
        };
        if reason != "done" {
            info!(%dest, peer = %labels.peer_id, reason, "pooled connection closed");
        }
        p.closed(&labels, reason);
    });
    Some(sender)
}
