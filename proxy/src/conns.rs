//! The registry of live, established connections and the identity behind each, so that a
//! bundle change, a revocation or a policy change can find and close them (a verifier runs
//! only at handshake time), and the drain at shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_config::SpiffeId;
use tokio::sync::watch;

use crate::reasons::CloseReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// What a registered connection carries, which decides how changes apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Relayed bytes: the port's TCP policy is re-checked whenever policy changes.
    Tcp,
    /// HTTP served from a peer sidecar: every request is checked, so only identity changes
    /// (bundle, revocation) cut it.
    Http,
    /// An upgraded HTTP/1.1 connection (WebSocket), authorized on its upgrade request; only
    /// identity changes cut it.
    Tunnel,
    /// A pooled HTTP/2 connection from us to a peer sidecar. It lives as long as the
    /// workload connections using it, so the drain does not wait for it.
    Pooled,
    /// Our own workload's HTTP connection, its requests sent over pooled connections. It has
    /// no peer certificate; `peer` is the destination's expected ID.
    Workload,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Tunnel => "tunnel",
            Self::Pooled => "pooled",
            Self::Workload => "workload",
        }
    }
}

/// How long an HTTP connection closed gracefully may finish the requests it has in flight
/// (it takes no new ones) before it is cut.
pub const GRACE: Duration = Duration::from_secs(1);

/// What the registry knows of one connection.
pub struct ConnInfo {
    pub direction: Direction,
    pub kind: Kind,
    pub peer: SpiffeId,
    /// The peer's certificate chain as presented (leaf first), for re-verification.
    pub chain: Vec<CertificateDer<'static>>,
    /// When the chain was verified (the handshake): a bundle change asks whether the chain
    /// still chains to a trusted CA, not whether it has expired since.
    pub verified_at: UnixTime,
    /// Workload port (inbound) or destination port (outbound).
    pub port: u16,
    close: watch::Sender<Option<CloseReason>>,
}

#[derive(Default)]
pub struct Conns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, ConnInfo>>,
    /// Wakes `wait_empty` whenever a connection ends.
    changed: tokio::sync::Notify,
    draining: AtomicBool,
    /// Wakes connections that can end gracefully (HTTP) when draining starts.
    drain_started: tokio::sync::Notify,
}

/// Held by the connection task; removes the entry when dropped.
/// Bytes moved on one connection, for its audit record.
#[derive(Debug, Default)]
pub struct ConnBytes {
    pub from_peer: AtomicU64,
    pub to_peer: AtomicU64,
}

pub struct ConnGuard {
    id: u64,
    conns: Arc<Conns>,
    /// What the connection moved, counted as it goes.
    pub bytes: Arc<ConnBytes>,
    /// When it was admitted, for the audit record of its close.
    pub opened_at: std::time::Instant,
    /// Becomes `Some(reason)` when something asks the connection to close.
    pub close_rx: watch::Receiver<Option<CloseReason>>,
}

impl ConnGuard {
    /// The connection's number in this sidecar's registry (audit records carry it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The peer's SPIFFE ID as registered.
    pub fn peer(&self) -> Option<SpiffeId> {
        let live = self.conns.live.lock().expect("conns lock");
        live.get(&self.id).map(|c| c.peer.clone())
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conns.live.lock().expect("conns lock").remove(&self.id);
        self.conns.changed.notify_waiters();
    }
}

impl Conns {
    pub fn register(
        self: &Arc<Self>,
        direction: Direction,
        kind: Kind,
        peer: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        port: u16,
    ) -> ConnGuard {
        // From 1: 0 means "no connection" in audit records.
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (close, close_rx) = watch::channel(None);
        self.live.lock().expect("conns lock").insert(
            id,
            ConnInfo {
                direction,
                kind,
                peer,
                chain,
                verified_at: UnixTime::now(),
                port,
                close,
            },
        );
        ConnGuard {
            id,
            conns: self.clone(),
            bytes: Arc::default(),
            opened_at: std::time::Instant::now(),
            close_rx,
        }
    }

    /// (direction, kind, peer ID) of every live connection, for the config dump.
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, String)> {
        let live = self.live.lock().expect("conns lock");
        live.values()
            .map(|c| (c.direction.label(), c.kind.label(), c.peer.to_string()))
            .collect()
    }

    /// Connections the drain waits for: all but pooled ones, which end with their users.
    pub fn waited_for(&self) -> usize {
        let live = self.live.lock().expect("conns lock");
        live.values().filter(|c| c.kind != Kind::Pooled).count()
    }

    /// Asks every connection for which `doomed` is true to close with `reason`; returns how
    /// many were asked. The connection tasks do the closing and the counting. A connection
    /// already closing gracefully is asked again by a reason that cuts at once.
    pub fn close_where(
        &self,
        reason: CloseReason,
        mut doomed: impl FnMut(&ConnInfo) -> bool,
    ) -> usize {
        let live = self.live.lock().expect("conns lock");
        let mut n = 0;
        for info in live.values() {
            let open = match *info.close.borrow() {
                None => true,
                Some(current) => current.is_graceful() && !reason.is_graceful(),
            };
            if open && doomed(info) {
                let _ = info.close.send(Some(reason));
                n += 1;
            }
        }
        n
    }

    /// Resolves once no connection but pooled ones is left.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            if self.waited_for() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Starts draining: readiness fails, HTTP connections finish their requests and close.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain_started.notify_waiters();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once draining has started.
    pub async fn drained(&self) {
        loop {
            let notified = self.drain_started.notified();
            if self.is_draining() {
                return;
            }
            notified.await;
        }
    }
}
