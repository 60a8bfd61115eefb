//! The dial to a peer sidecar: TCP, then mTLS with our SVID, and the peer must present
//! exactly the SPIFFE ID expected at that destination. Outbound TCP, the pool and outbound
//! upgrades all dial through here, so every failure is logged and counted the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sigil_config::SpiffeId;
use sigil_filters::tls::{handshake_failure, Carries};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::conns::Direction;
use crate::identity::Current;
use crate::ledger::{Ledger, Session};
use crate::logs::limited;
use crate::reasons::Refusal;

const DIR: Direction = Direction::Outbound;

/// An mTLS connection to a peer sidecar and what its handshake established.
pub type Dialed = (TlsStream<TcpStream>, Session);

pub struct Dialer {
    pub tls: Arc<Current>,
    pub ledger: Arc<Ledger>,
    /// `timeouts.connect` and `timeouts.handshake`.
    pub connect: Duration,
    pub handshake: Duration,
}

impl Dialer {
    /// TCP and mTLS to a mesh destination, which must present `expected`. Failures are
    /// logged and counted here; None means the caller has nothing to send on.
    pub async fn dial(
        &self,
        dest: SocketAddr,
        expected: &SpiffeId,
        carries: Carries,
    ) -> Option<Dialed> {
        let tls = self.tls.get();
        let local = &tls.local_label;
        let refused = |why| {
            let peer_label = self.ledger.metrics.peer_label(expected.as_str());
            self.ledger.refused(DIR, local, peer_label, why);
        };
        if let Some(r) = tls.self_revoked() {
            limited!(info, %dest, peer = %expected, revocation = %r.metadata.name, reason = "self_revoked", "outbound refused: our own SVID is revoked");
            refused(Refusal::SelfRevoked);
            return None;
        }
        let tcp = match tokio::time::timeout(self.connect, TcpStream::connect(dest)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                limited!(info, %dest, peer = %expected, "outbound refused: connect failed: {e}");
                refused(Refusal::UpstreamUnavailable);
                return None;
            }
            Err(_) => {
                limited!(info, %dest, peer = %expected, "outbound refused: connect timed out");
                refused(Refusal::UpstreamUnavailable);
                return None;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connector = TlsConnector::from(tls.client_config(expected, carries));
        let name = ServerName::IpAddress(dest.ip().into());
        let stream = match tokio::time::timeout(self.handshake, connector.connect(name, tcp)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let (reason, detail) = handshake_failure(&e);
                limited!(info, %dest, expected = %expected, reason, "outbound refused: {detail}");
                self.ledger.handshake_failed(DIR, local, reason);
                return None;
            }
            Err(_) => {
                limited!(info, %dest, expected = %expected, "outbound refused: handshake timed out");
                self.ledger
                    .handshake_failed(DIR, local, "handshake_timeout");
                return None;
            }
        };
        debug!(%dest, peer = %expected, ?carries, "outbound mTLS established");
        let session = Session::of(stream.get_ref().0, stream.get_ref().1, tls.bundle_version);
        Some((stream, session))
    }
}
