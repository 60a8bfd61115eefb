//! L4 authorization: may this peer identity open a connection to this workload port?
//! Compiled once per config; `decide` only reads, never allocates or locks.

use std::collections::HashMap;
use std::fmt;

use sigil_config::{IdPattern, SpiffeId};

/// Per-port allow lists. With no ports listed, no policy targets the workload and any peer
/// with a verified SVID is allowed; once a port is listed, everything unlisted is denied.
#[derive(Debug, Default, Clone)]
pub struct L4Authorizer {
    ports: HashMap<u16, Vec<IdPattern>>,
}

/// The rule that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Rule<'a> {
    /// No policy targets this workload: mTLS alone admits the peer.
    NoPolicy,
    /// Allowed by the allow list of `port`, entry `index`.
    Allow {
        port: u16,
        index: usize,
        pattern: &'a IdPattern,
    },
    /// `port` has rules and none matches the peer.
    NotInAllowList { port: u16 },
    /// Policies target this workload but none lists `port`.
    PortNotListed { port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Verdict<'a> {
    pub allowed: bool,
    pub rule: L4Rule<'a>,
}

impl fmt::Display for L4Rule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPolicy => write!(f, "no policy targets this workload (mTLS only)"),
            Self::Allow {
                port,
                index,
                pattern,
            } => write!(f, "port {port} allow[{index}] {pattern}"),
            Self::NotInAllowList { port } => {
                write!(f, "port {port}: peer matches no allow entry (default deny)")
            }
            Self::PortNotListed { port } => {
                write!(
                    f,
                    "port {port} has no rule and policies target this workload (default deny)"
                )
            }
        }
    }
}

impl L4Authorizer {
    pub fn new(rules: impl IntoIterator<Item = (u16, Vec<IdPattern>)>) -> Self {
        let mut ports: HashMap<u16, Vec<IdPattern>> = HashMap::new();
        for (port, allow) in rules {
            ports.entry(port).or_default().extend(allow);
        }
        Self { ports }
    }

    pub fn decide(&self, peer: &SpiffeId, port: u16) -> L4Verdict<'_> {
        if self.ports.is_empty() {
            return L4Verdict {
                allowed: true,
                rule: L4Rule::NoPolicy,
            };
        }
        let Some(allow) = self.ports.get(&port) else {
            return L4Verdict {
                allowed: false,
                rule: L4Rule::PortNotListed { port },
            };
        };
        match allow.iter().position(|p| p.matches(peer)) {
            Some(index) => L4Verdict {
                allowed: true,
                rule: L4Rule::Allow {
                    port,
                    index,
                    pattern: &allow[index],
                },
            },
            None => L4Verdict {
                allowed: false,
                rule: L4Rule::NotInAllowList { port },
            },
        }
    }
}
