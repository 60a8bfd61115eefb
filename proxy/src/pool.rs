//! Pooled connections to peer sidecars for outbound HTTP: one multiplexed HTTP/2 connection
//! (ALPN `sigil/h2`) per destination and expected ID, shared by every workload connection
//! that calls it, as linkerd2-proxy does. hyper-util's pool is not used because its
//! connections cannot be registered: each of ours is in the connection registry like any
//! other, so a bundle change or a revocation cuts it, and the next request dials (and
//! verifies) afresh.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use sigil_config::SpiffeId;
use sigil_filters::tls::Carries;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::conns::{is_graceful, Direction, Kind, GRACE};
use crate::outbound::dial;
use crate::proxy::{Admitted, Proxy};
use crate::relay::{closed, cut, Counted};

/// A dead peer (no PING answer) is noticed within interval + timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<SocketAddr, Vec<Arc<Slot>>>>,
    /// Numbers pooled connections, so that one retiring removes itself and no successor.
    next: AtomicU64,
}

pub struct Slot {
    dest: SocketAddr,
    expected: SpiffeId,
    /// The connection's number and sender. Async, so that concurrent first requests wait
    /// for one dial instead of racing.
    sender: tokio::sync::Mutex<Option<(u64, SendRequest<Incoming>)>>,
}

impl Slot {
    /// Takes connection `id` out of use: the next request dials afresh.
    async fn retire(&self, id: u64) {
        let mut sender = self.sender.lock().await;
        if sender.as_ref().is_some_and(|(current, _)| *current == id) {
            *sender = None;
        }
    }
}

/// Spawns hyper's futures for one pooled connection, each ending early once `kill` turns true.
/// Each holds a clone of `alive` while it runs, so the connection's task knows when hyper's
/// work on the socket is over.
#[derive(Clone)]
struct Killable {
    kill: watch::Receiver<bool>,
    alive: Arc<()>,
}

impl<F> hyper::rt::Executor<F> for Killable
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let (mut kill, alive) = (self.kill.clone(), self.alive.clone());
        tokio::spawn(async move {
            let _alive = alive;
            tokio::select! {
                _ = fut => {}
                // A dropped sender is no kill: the connection then ends on its own.
                Ok(_) = kill.wait_for(|k| *k) => {}
            }
        });
    }
}

impl Pool {
    /// The slot of `dest` and `expected`, which a workload connection looks up once.
    pub fn slot(&self, dest: SocketAddr, expected: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("pool lock");
        let list = slots.entry(dest).or_default();
        if let Some(s) = list.iter().find(|s| s.expected == *expected) {
            return s.clone();
        }
        let s = Arc::new(Slot {
            dest,
            expected: expected.clone(),
            sender: tokio::sync::Mutex::new(None),
        });
        list.push(s.clone());
        s
    }

    /// A sender on a live pooled connection of `slot`, dialling one if there is none. None:
    /// the dial failed (logged and counted by `dial`).
    pub async fn sender(&self, p: &Arc<Proxy>, slot: &Arc<Slot>) -> Option<SendRequest<Incoming>> {
        let mut sender = slot.sender.lock().await;
        if let Some((_, s)) = sender.as_ref().filter(|(_, s)| !s.is_closed()) {
            return Some(s.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Boxed: the dial and handshakes are rare and would otherwise make every request's
        // future (which holds this one) several KiB larger to create and move.
        let s = Box::pin(connect(p, slot.dest, &slot.expected, slot.clone(), id)).await?;
        *sender = Some((id, s.clone()));
        Some(s)
    }
}

async fn connect(
    p: &Arc<Proxy>,
    dest: SocketAddr,
    expected: &SpiffeId,
    slot: Arc<Slot>,
    id: u64,
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
    let (kill, kill_rx) = watch::channel(false);
    let alive = Arc::new(());
    let mut builder = hyper::client::conn::http2::Builder::new(Killable {
        kill: kill_rx,
        alive: alive.clone(),
    });
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
        // Boxed rather than pinned in place, so that it can be dropped (with the executor
        // clone it holds) before waiting on `alive`.
        let mut conn = Box::pin(conn);
        let mut reason = tokio::select! {
            // The peer sent GOAWAY (h2 then refuses new streams, which ends hyper's dispatch)
            // or the socket failed. Streams still in flight run on in hyper's spawned tasks.
            r = conn.as_mut() => if r.is_ok() { "done" } else { "io_error" },
            reason = closed(&mut guard.close_rx) => reason,
        };
        if is_graceful(reason) {
            slot.retire(id).await;
            let grace = tokio::time::sleep(GRACE);
            tokio::pin!(grace);
            let mut dispatching = true;
            loop {
                tokio::select! {
                    // Requests already handed this connection's sender still go out.
                    _ = conn.as_mut(), if dispatching => dispatching = false,
                    _ = grace.as_mut() => break,
                    r = cut(&mut guard.close_rx) => {
                        reason = r;
                        break;
                    }
                }
            }
        }
        drop(conn);
        if reason == "done" {
            // Stay in the registry until those streams end, so that a revocation meanwhile
            // still cuts them. Bounded: a stream the peer never finishes is cut after the
            // keep-alive window.
            let deadline = tokio::time::Instant::now() + KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while Arc::strong_count(&alive) > 1 {
                if tokio::time::Instant::now() > deadline {
                    let _ = kill.send(true);
                    break;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    r = cut(&mut guard.close_rx) => {
                        reason = r;
                        break;
                    }
                }
            }
        }
        if reason != "done" {
            let _ = kill.send(true);
            info!(%dest, peer = %labels.peer_id, reason, "pooled connection closed");
        }
        p.closed(&labels, reason);
    });
    Some(sender)
}
