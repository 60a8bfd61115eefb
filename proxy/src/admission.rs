//! Counting what is open, so that `sigil_filters::limits` can say whether one more
//! connection is taken. A connection holds a `Slot` from accept to close, and an inbound one a
//! `Handshake` too until its TLS handshake ends; dropping them gives the room back.
//!
//! The descriptor limit is raised to its hard maximum at start, and the default bound on
//! connections leaves `limits.fdReserve` descriptors free beyond two per connection (peer
//! and workload sockets), so a flood never leaves the sidecar unable to reach its own
//! workload for the connections it did admit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sigil_filters::limits::{admit_inbound, admit_within_total, ConnLimits, Open, Refusal};

pub struct Admission {
    limits: ConnLimits,
    connections: AtomicU32,
    handshakes: AtomicU32,
    /// Per source address: (connections, handshakes). Entries go when both reach 0.
    sources: Mutex<HashMap<IpAddr, (u32, u32)>>,
}

/// One admitted connection's room.
pub struct Slot {
    admission: Arc<Admission>,
    source: Option<IpAddr>,
}

/// One inbound connection's handshake under way.
pub struct Handshake {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            connections: AtomicU32::new(0),
            handshakes: AtomicU32::new(0),
            sources: Mutex::new(HashMap::new()),
        })
    }

    /// An inbound connection from `source`, handshake ahead. IPv6 sources count by /64:
    /// one host is routinely given a whole /64, and would otherwise have 2^64 addresses'
    /// worth of per-source bounds.
    pub fn inbound(self: &Arc<Self>, source: IpAddr) -> Result<(Slot, Handshake), Refusal> {
        let source = source_key(source);
        let mut sources = self.sources.lock().expect("admission lock");
        let (from_source, handshakes_from_source) =
            sources.get(&source).copied().unwrap_or_default();
        let open = Open {
            connections: self.connections.load(Ordering::Relaxed),
            from_source,
            handshakes: self.handshakes.load(Ordering::Relaxed),
            handshakes_from_source,
        };
        admit_inbound(&self.limits, open)?;
        let entry = sources.entry(source).or_default();
        entry.0 += 1;
        entry.1 += 1;
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok((
            Slot {
                admission: self.clone(),
                source: Some(source),
            },
            Handshake {
                admission: self.clone(),
                source,
            },
        ))
    }

    /// A connection bounded by the total alone: one from our own workload, or a tunnel
    /// that outlives the HTTP connection it was upgraded from.
    pub fn total_only(self: &Arc<Self>) -> Result<Slot, Refusal> {
        // Under the lock, so that concurrent admissions cannot both take the last room.
        let _sources = self.sources.lock().expect("admission lock");
        admit_within_total(&self.limits, self.connections.load(Ordering::Relaxed))?;
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            admission: self.clone(),
            source: None,
        })
    }

    /// The bound on connections in all, which also budgets the connections to the workload.
    pub fn max_connections(&self) -> u32 {
        self.limits.connections
    }

    /// Connections and handshakes open now.
    pub fn open(&self) -> (u32, u32) {
        (
            self.connections.load(Ordering::Relaxed),
            self.handshakes.load(Ordering::Relaxed),
        )
    }

    fn release(&self, source: IpAddr, connections: u32, handshakes: u32) {
        let mut sources = self.sources.lock().expect("admission lock");
        if let Some(entry) = sources.get_mut(&source) {
            entry.0 -= connections;
            entry.1 -= handshakes;
            if *entry == (0, 0) {
                sources.remove(&source);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(source) = self.source {
            self.admission.release(source, 1, 0);
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.admission.handshakes.fetch_sub(1, Ordering::Relaxed);
        self.admission.release(self.source, 0, 1);
    }
}

/// The address a source is counted under: itself for IPv4, its /64 for IPv6.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// `spec.limits`, the default bound on connections taken from the descriptor limit (raised
/// to its hard maximum here).
pub fn limits(cfg: &sigil_config::ProxyConfig) -> ConnLimits {
    let l = &cfg.spec.limits;
    let fds = raise_fd_limit();
    let fits = default_max_connections(fds, l.fd_reserve);
    let connections = l.max_connections.unwrap_or(fits);
    if connections > fits {
        tracing::warn!(
            fd_limit = fds,
            max_connections = connections,
            "limits.maxConnections is above what the descriptor limit holds at two descriptors a connection after limits.fdReserve ({fits}): a flood can take the descriptors the sidecar needs for its own workload"
        );
    }
    tracing::info!(
        fd_limit = fds,
        max_connections = connections,
        per_source = l.max_connections_per_source,
        pending_handshakes = l.max_pending_handshakes,
        "connection limits"
    );
    ConnLimits {
        connections,
        connections_per_source: l.max_connections_per_source,
        handshakes: l.max_pending_handshakes,
        handshakes_per_source: l.max_pending_handshakes_per_source,
    }
}

/// Raises the soft descriptor limit to the hard one (as Envoy and ztunnel do) and returns
/// the limit in force.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass and nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// The bound on connections when the config sets none: two descriptors each, after the
/// reserve.
pub fn default_max_connections(fd_limit: u64, reserve: u32) -> u32 {
    let usable = fd_limit.saturating_sub(u64::from(reserve)) / 2;
    usable.clamp(1, u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_given_back_when_slots_and_handshakes_drop() {
        let a = Admission::new(ConnLimits {
            connections: 3,
            connections_per_source: 2,
            handshakes: 2,
            handshakes_per_source: 1,
        });
        let (x, y): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let (slot1, hs1) = a.inbound(x).unwrap();
        // One handshake per source under way.
        assert_eq!(
            a.inbound(x).err(),
            Some(Refusal::TooManyHandshakesFromSource)
        );
        drop(hs1);
        let (slot2, hs2) = a.inbound(x).unwrap();
        drop(hs2);
        assert_eq!(a.inbound(x).err(), Some(Refusal::TooManyFromSource));
        // Another source still gets in; then the total is reached, outbound too.
        let (slot3, hs3) = a.inbound(y).unwrap();
        assert_eq!(a.open(), (3, 1));
        assert_eq!(a.total_only().err(), Some(Refusal::TooManyConnections));
        assert_eq!(a.inbound(y).err(), Some(Refusal::TooManyConnections));
        drop((slot1, slot2, slot3, hs3));
        assert_eq!(a.open(), (0, 0));
        assert!(a.sources.lock().unwrap().is_empty(), "sources forgotten");
        let out = a.total_only().unwrap();
        assert_eq!(a.open(), (1, 0));
        drop(out);
        assert_eq!(a.open(), (0, 0));
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a = Admission::new(ConnLimits {
            connections: 10,
            connections_per_source: 2,
            handshakes: 10,
            handshakes_per_source: 10,
        });
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::7".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = a.inbound(one).unwrap();
        let _y = a.inbound(same_64).unwrap();
        assert_eq!(a.inbound(one).err(), Some(Refusal::TooManyFromSource));
        let _z = a.inbound(other_64).unwrap();
        // An IPv4-mapped address counts as its IPv4 address.
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _p = a.inbound(v4).unwrap();
        let _q = a.inbound(mapped).unwrap();
        assert_eq!(a.inbound(v4).err(), Some(Refusal::TooManyFromSource));
    }

    #[test]
    fn the_default_bound_leaves_the_reserve() {
        assert_eq!(default_max_connections(20_000, 256), 9_872);
        assert_eq!(default_max_connections(100, 256), 1);
        assert!(raise_fd_limit() >= 64);
    }
}
