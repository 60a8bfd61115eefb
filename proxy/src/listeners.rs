//! The listeners: admin, transparent inbound and outbound (iptables REDIRECT), and the
//! explicit ones. Each accepted connection is admitted against `spec.limits` here, then dealt
//! to a worker (`workers`) that runs its handler.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sigil_config::proxy_config::Mode;
use sigil_config::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::warn;

use crate::admission::{Admission, Handshake, Slot};
use crate::conns::Direction;
use crate::logs::limited;
use crate::metrics::UNAUTHENTICATED_PEER;
use crate::proxy::Proxy;
use crate::reasons::Refusal;
use crate::{admin, inbound, outbound, workers};

/// A listener that could not be bound.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub what: &'static str,
    pub error: std::io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {} ({}): {}",
            self.addr, self.what, self.error
        )
    }
}

/// Where an inbound connection goes: the port it was sent to before iptables redirected it,
/// or an explicit listener's port.
#[derive(Clone, Copy)]
enum InboundPort {
    Redirected,
    Fixed(u16),
}

/// Where an outbound connection goes: the destination before iptables redirected it (looked
/// up in the registry), or an explicit listener's upstream and expected ID.
#[derive(Clone)]
enum OutboundTarget {
    Redirected,
    Fixed(SocketAddr, Option<SpiffeId>),
}

/// Binds every listener the config names and starts accepting on each until `shutdown`.
pub async fn start(p: &Arc<Proxy>, shutdown: &watch::Receiver<bool>) -> Result<(), BindError> {
    let spec = &p.cfg.spec;
    let admin = bind(spec.admin.listen, "admin").await?;
    let admin_room = Admission::new(admin::LIMITS);
    spawn_accept(
        admin,
        shutdown.clone(),
        p.clone(),
        move |p, tcp, peer, _| admin::serve_conn(p, &admin_room, tcp, peer),
    );
    if spec.mode == Mode::Transparent {
        let l = bind(spec.inbound.listen, "inbound").await?;
        spawn_inbound(l, shutdown, p, InboundPort::Redirected);
        let l = bind(spec.outbound.listen, "outbound").await?;
        spawn_outbound(l, shutdown, p, OutboundTarget::Redirected);
    }
    for l in &spec.inbound.explicit {
        let listener = bind(l.value.listen, "inbound.explicit").await?;
        spawn_inbound(listener, shutdown, p, InboundPort::Fixed(l.value.port));
    }
    for l in &spec.outbound.explicit {
        let listener = bind(l.value.listen, "outbound.explicit").await?;
        let target = OutboundTarget::Fixed(l.value.upstream, l.value.expected_id.clone());
        spawn_outbound(listener, shutdown, p, target);
    }
    Ok(())
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| BindError { addr, what, error })
}

fn spawn_inbound(
    listener: TcpListener,
    shutdown: &watch::Receiver<bool>,
    p: &Arc<Proxy>,
    port: InboundPort,
) {
    spawn_accept(
        listener,
        shutdown.clone(),
        p.clone(),
        move |p, tcp, peer, local| {
            let port = match port {
                InboundPort::Fixed(port) => port,
                InboundPort::Redirected => match original_dst(&tcp) {
                    Some(dst) if dst != local => dst.port(),
                    _ => return not_redirected(&p, Direction::Inbound, peer),
                },
            };
            let Some(room) = admit_inbound(&p, peer) else {
                return;
            };
            tokio::spawn(async move {
                let multiplexed = workers::offers_multiplexed(&tcp).await;
                let workers = p.workers.clone();
                workers.serve(tcp, multiplexed, move |tcp, load| {
                    inbound::handle(p, tcp, load, peer, port, room)
                });
            });
        },
    );
}

fn spawn_outbound(
    listener: TcpListener,
    shutdown: &watch::Receiver<bool>,
    p: &Arc<Proxy>,
    target: OutboundTarget,
) {
    spawn_accept(
        listener,
        shutdown.clone(),
        p.clone(),
        move |p, tcp, peer, local| {
            let (dest, expected) = match &target {
                OutboundTarget::Fixed(upstream, expected) => (*upstream, expected.clone()),
                OutboundTarget::Redirected => match original_dst(&tcp) {
                    Some(dst) if dst != local => (dst, None),
                    _ => return not_redirected(&p, Direction::Outbound, peer),
                },
            };
            let Some(room) = admit_outbound(&p, peer) else {
                return;
            };
            let workers = p.workers.clone();
            workers.serve(tcp, false, move |tcp, load| {
                outbound::handle(p, tcp, load, dest, expected, room)
            });
        },
    );
}

/// A connection to a transparent listener that iptables did not redirect: refused.
fn not_redirected(p: &Proxy, direction: Direction, peer: SocketAddr) {
    let tls = p.tls.get();
    let peer_id = match direction {
        Direction::Inbound => {
            limited!(info, %peer, "inbound refused: not redirected (no original destination)");
            UNAUTHENTICATED_PEER
        }
        Direction::Outbound => {
            limited!(info, %peer, "outbound refused: not redirected (no original destination)");
            "unknown"
        }
    };
    p.ledger.refused(
        direction,
        &tls.local_label,
        peer_id.into(),
        Refusal::NotRedirected,
    );
}

/// Accepts until shutdown; `on_conn(proxy, stream, peer addr, listener addr)`.
fn spawn_accept<F>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    p: Arc<Proxy>,
    on_conn: F,
) where
    F: Fn(Arc<Proxy>, TcpStream, SocketAddr, SocketAddr) + Send + 'static,
{
    let local = listener
        .local_addr()
        .expect("bound listener has an address");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        on_conn(p.clone(), tcp, peer, local);
                    }
                    // EMFILE and friends: back off instead of spinning.
                    Err(e) => {
                        warn!(%local, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    });
}

/// Room for an inbound connection from `peer` (`admission`), or None: refused, counted and
/// logged (rate-limited), and the socket closed by the caller dropping it.
fn admit_inbound(p: &Proxy, peer: SocketAddr) -> Option<(Slot, Handshake)> {
    if audit_refusing(p, Direction::Inbound) {
        return None;
    }
    match p.admission.inbound(peer.ip()) {
        Ok(room) => Some(room),
        Err(why) => {
            refuse_over_limit(p, Direction::Inbound, peer, why);
            None
        }
    }
}

/// Room for an outbound connection from our workload, or None (see `admit_inbound`).
fn admit_outbound(p: &Proxy, peer: SocketAddr) -> Option<Slot> {
    if audit_refusing(p, Direction::Outbound) {
        return None;
    }
    match p.admission.total_only() {
        Ok(slot) => Some(slot),
        Err(why) => {
            refuse_over_limit(p, Direction::Outbound, peer, why);
            None
        }
    }
}

/// A fail-closed audit spool that is full refuses new connections (counted, not audited: the
/// spool has no room).
fn audit_refusing(p: &Proxy, direction: Direction) -> bool {
    if !p.ledger.audit.as_ref().is_some_and(|a| a.refusing()) {
        return false;
    }
    let tls = p.tls.get();
    p.ledger
        .metrics
        .refused
        .get_or_create(&crate::metrics::ReasonLabels {
            direction: direction.label(),
            local_id: tls.local_label.clone(),
            peer_id: UNAUTHENTICATED_PEER.into(),
            reason: Refusal::AuditSpoolFull.label(),
        })
        .inc();
    true
}

fn refuse_over_limit(
    p: &Proxy,
    direction: Direction,
    peer: SocketAddr,
    why: sigil_filters::limits::Refusal,
) {
    let tls = p.tls.get();
    let why = Refusal::OverLimit(why);
    p.ledger.refused(
        direction,
        &tls.local_label,
        UNAUTHENTICATED_PEER.into(),
        why,
    );
    limited!(warn, %peer, direction = direction.label(), reason = why.label(), "connection refused: {why}");
}

/// The destination before iptables REDIRECT rewrote it.
fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    let addr = if tcp.local_addr().ok()?.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    addr.ok()?.as_socket()
}
