//! Why a connection ended and why one was refused. Behaviour hangs on these variants, never on
//! text; `label()` is the value of the metrics' `reason` label and of the log lines' `reason`
//! field, unchanged from the strings they replaced, so dashboards keep working.

use std::fmt;

use sigil_filters::limits;

/// Why an established connection ended (`sigil_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides finished (or, HTTP, the client was done).
    Done,
    /// TCP closed without TLS close_notify: a truncation, worth telling apart.
    PeerClosed,
    Reset,
    IoError,
    /// Nothing moved either way for `timeouts.idle`.
    IdleTimeout,
    /// The trust bundles changed and the peer no longer verifies.
    BundleChange,
    /// Policy no longer allows the connection.
    PolicyChange,
    /// The peer's identity (or our own) was revoked.
    Revoked,
    /// The drain deadline passed at shutdown.
    Shutdown,
    /// A peer ID that is not a valid header value; cannot happen with a verified SVID.
    InvalidPeerId,
}

impl CloseReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::PeerClosed => "peer_closed",
            Self::Reset => "reset",
            Self::IoError => "io_error",
            Self::IdleTimeout => "idle_timeout",
            Self::BundleChange => "bundle_change",
            Self::PolicyChange => "policy_change",
            Self::Revoked => "revoked",
            Self::Shutdown => "shutdown",
            Self::InvalidPeerId => "invalid_peer_id",
        }
    }

    /// Whether HTTP connections closed for this reason may finish their in-flight requests
    /// first (GOAWAY, `Connection: close`). A bundle change is routine CA rotation: cutting
    /// mid-request would fail calls that were authorized when they started, while the peer
    /// can no longer start new ones. A revocation, a policy change or the drain deadline cuts
    /// at once; so does any reason on a connection carrying raw bytes, which have no request
    /// boundary to wait for.
    pub fn is_graceful(self) -> bool {
        self == Self::BundleChange
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why a connection was refused before it carried anything
/// (`sigil_connections_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Our own SVID is revoked: we present it to nobody.
    SelfRevoked,
    /// The workload (inbound) or the destination (outbound) could not be reached.
    UpstreamUnavailable,
    /// An outbound destination outside the registry, with `unknownDestination: deny`.
    UnknownDestination,
    /// A connection that iptables did not redirect (no original destination).
    NotRedirected,
    /// The port's policy does not allow the peer.
    NotAllowed,
    /// The admin listener's own bounds.
    AdminLimit,
    /// `spec.limits`.
    OverLimit(limits::Refusal),
    /// The mTLS handshake failed; the label is `sigil_filters::tls::handshake_failure`'s (an
    /// SVID check's reason, `no_client_cert`, `handshake_timeout`, ...).
    Handshake(&'static str),
    /// The audit spool is full and `audit.whenFull` is `fail-closed`.
    AuditSpoolFull,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Self::SelfRevoked => "self_revoked",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UnknownDestination => "unknown_destination",
            Self::NotRedirected => "not_redirected",
            Self::NotAllowed => "not_allowed",
            Self::AdminLimit => "admin_limit",
            Self::OverLimit(why) => why.label(),
            Self::Handshake(reason) => reason,
            Self::AuditSpoolFull => "audit_spool_full",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OverLimit(why) => write!(f, "{why}"),
            other => f.write_str(other.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The labels are what dashboards and alerts already match on.
    #[test]
    fn labels_are_the_published_ones() {
        assert_eq!(CloseReason::BundleChange.label(), "bundle_change");
        assert_eq!(CloseReason::IdleTimeout.label(), "idle_timeout");
        assert_eq!(Refusal::NotRedirected.label(), "not_redirected");
        assert_eq!(
            Refusal::OverLimit(limits::Refusal::TooManyFromSource).label(),
            "too_many_from_source"
        );
        assert_eq!(
            Refusal::Handshake("no_client_cert").label(),
            "no_client_cert"
        );
    }

    #[test]
    fn only_a_bundle_change_closes_gracefully() {
        use CloseReason::*;
        let graceful: Vec<_> = [
            Done,
            PeerClosed,
            Reset,
            IoError,
            IdleTimeout,
            BundleChange,
            PolicyChange,
            Revoked,
            Shutdown,
            InvalidPeerId,
        ]
        .into_iter()
        .filter(|r| r.is_graceful())
        .collect();
        assert_eq!(graceful, [BundleChange]);
    }
}
