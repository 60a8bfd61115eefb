//! Whether the sidecar takes one more connection: bounds on what anyone, and what one source
//! address, may hold open, so that a flood from one place cannot take the descriptors,
//! memory and handshake CPU everyone else needs.

use std::fmt;

/// The bounds (`spec.limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, inbound and outbound together.
    pub connections: u32,
    /// Inbound connections open at once from one source address.
    pub connections_per_source: u32,
    /// Inbound connections whose TLS handshake has not finished.
    pub handshakes: u32,
    /// The same, from one source address.
    pub handshakes_per_source: u32,
}

/// What is open now, the connection being judged not included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Open {
    pub connections: u32,
    pub from_source: u32,
    pub handshakes: u32,
    pub handshakes_from_source: u32,
}

/// Why a connection was refused; `label()` is the metric's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromSource,
    TooManyHandshakes,
    TooManyHandshakesFromSource,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyFromSource => "too_many_from_source",
            Self::TooManyHandshakes => "too_many_handshakes",
            Self::TooManyHandshakesFromSource => "too_many_handshakes_from_source",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TooManyConnections => "the sidecar holds limits.maxConnections connections",
            Self::TooManyFromSource => {
                "this source address holds limits.maxConnectionsPerSource connections"
            }
            Self::TooManyHandshakes => {
                "limits.maxPendingHandshakes TLS handshakes are under way"
            }
            Self::TooManyHandshakesFromSource => {
                "this source address has limits.maxPendingHandshakesPerSource TLS handshakes under way"
            }
        })
    }
}

/// An inbound connection (TLS handshake ahead) from a source with `open` counts.
pub fn admit_inbound(l: &ConnLimits, open: Open) -> Result<(), Refusal> {
    if open.connections >= l.connections {
        return Err(Refusal::TooManyConnections);
    }
    if open.from_source >= l.connections_per_source {
        return Err(Refusal::TooManyFromSource);
    }
    if open.handshakes >= l.handshakes {
        return Err(Refusal::TooManyHandshakes);
    }
    if open.handshakes_from_source >= l.handshakes_per_source {
        return Err(Refusal::TooManyHandshakesFromSource);
    }
    Ok(())
}

/// A connection only the total bounds: one from our own workload, or a tunnel that outlives
/// the connection it was upgraded from.
pub fn admit_within_total(l: &ConnLimits, open_connections: u32) -> Result<(), Refusal> {
    if open_connections >= l.connections {
        return Err(Refusal::TooManyConnections);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: ConnLimits = ConnLimits {
        connections: 10,
        connections_per_source: 4,
        handshakes: 6,
        handshakes_per_source: 2,
    };

    #[test]
    fn each_bound_refuses_at_its_limit_and_not_before() {
        let ok = Open {
            connections: 9,
            from_source: 3,
            handshakes: 5,
            handshakes_from_source: 1,
        };
        assert_eq!(admit_inbound(&L, ok), Ok(()));
        assert_eq!(admit_inbound(&L, Open::default()), Ok(()));
        let cases = [
            (
                Open {
                    connections: 10,
                    ..ok
                },
                Refusal::TooManyConnections,
            ),
            (
                Open {
                    from_source: 4,
                    ..ok
                },
                Refusal::TooManyFromSource,
            ),
            (
                Open {
                    handshakes: 6,
                    ..ok
                },
                Refusal::TooManyHandshakes,
            ),
            (
                Open {
                    handshakes_from_source: 2,
                    ..ok
                },
                Refusal::TooManyHandshakesFromSource,
            ),
        ];
        for (open, want) in cases {
            assert_eq!(admit_inbound(&L, open), Err(want), "{open:?}");
            assert!(!want.to_string().is_empty() && want.label().starts_with("too_many"));
        }
        // The total is checked first: it is what protects everyone.
        let all_over = Open {
            connections: 10,
            from_source: 4,
            handshakes: 6,
            handshakes_from_source: 2,
        };
        assert_eq!(
            admit_inbound(&L, all_over),
            Err(Refusal::TooManyConnections)
        );
        assert_eq!(admit_within_total(&L, 9), Ok(()));
        assert_eq!(admit_within_total(&L, 10), Err(Refusal::TooManyConnections));
    }
}
