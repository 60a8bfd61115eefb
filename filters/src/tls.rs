//! rustls configurations for sidecar-to-sidecar mTLS: TLS 1.3 only, no resumption or tickets
//! on either side (a resumed session skips the verifier, so a rotated-out or revoked peer
//! would get back in), client certificates mandatory, and SPIFFE verification of the peer.

use std::io;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::sign::SingleCertAndKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use sigil_config::SpiffeId;

use crate::bundle::TrustBundles;
use crate::identity::LocalIdentity;
use crate::revocation::Revocations;
use crate::svid::{verify_svid, SvidError, Usage};

/// What a sidecar-to-sidecar connection carries, told to the inbound side by ALPN so that it
/// neither sniffs again nor guesses. Non-sidecar clients (openssl s_client, curl) offer no
/// ALPN or `http/1.1` and are sniffed as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Carries {
    /// Opaque bytes; the outbound side already found them not to be HTTP.
    Tcp,
    /// Pooled HTTP/2 carrying requests from many workload connections.
    Http2,
    /// One HTTP/1.1 connection (upgrades such as WebSocket, which HTTP/2 cannot carry).
    Http1,
}

impl Carries {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Self::Tcp => b"sigil/tcp",
            Self::Http2 => b"sigil/h2",
            Self::Http1 => b"http/1.1",
        }
    }

    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Self> {
        [Self::Tcp, Self::Http2, Self::Http1]
            .into_iter()
            .find(|c| Some(c.alpn()) == alpn)
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General(
        "TLS 1.2 is never negotiated between sidecars".into(),
    ))
}

fn reject(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Verifies client SVIDs on the inbound side.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
    /// Whether a client must present an SVID. Only the control plane's sidecar API lets one
    /// in without (first contact with a join token); a certificate presented is verified
    /// all the same.
    mandatory: bool,
}

impl std::fmt::Debug for TrustBundles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.domains()).finish()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        let id = verify_svid(
            &self.bundles,
            algs,
            end_entity,
            intermediates,
            now,
            Usage::Client,
        )
        .map_err(reject)?;
        self.revocations.check(&id, end_entity).map_err(reject)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies a server SVID on the outbound side and pins it to the expected ID. SNI and the
/// server name are irrelevant: identity is the SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        let id = verify_svid(
            &self.bundles,
            algs,
            end_entity,
            intermediates,
            now,
            Usage::Server,
        )
        .map_err(reject)?;
        if id != self.expected {
            return Err(reject(SvidError::WrongIdentity {
                expected: self.expected.to_string(),
                got: id.to_string(),
            }));
        }
        self.revocations.check(&id, end_entity).map_err(reject)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The inbound (server) side: presents our SVID, demands and verifies the client's.
pub fn server_config(
    identity: &LocalIdentity,
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
) -> Arc<ServerConfig> {
    build_server_config(identity, bundles, revocations, provider, true)
}

/// `server_config`, but a client may present no certificate: the control plane's sidecar API,
/// where a sidecar without an SVID asks for its first one with a join token. Whether a
/// request needs a verified caller is then the handler's to enforce.
pub fn server_config_client_optional(
    identity: &LocalIdentity,
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
) -> Arc<ServerConfig> {
    build_server_config(identity, bundles, revocations, provider, false)
}

fn build_server_config(
    identity: &LocalIdentity,
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
) -> Arc<ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundles,
        revocations,
        provider: provider.clone(),
        mandatory,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(identity.certified_key())));
    // A client offering only other protocols (say `h2` alone) is refused with
    // no_application_protocol; one offering none is sniffed.
    config.alpn_protocols = [Carries::Http2, Carries::Tcp, Carries::Http1]
        .iter()
        .map(|c| c.alpn().to_vec())
        .collect();
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Arc::new(config)
}

/// The outbound (client) side towards one expected peer identity, for one kind of traffic.
pub fn client_config(
    identity: &LocalIdentity,
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
    carries: Carries,
) -> Arc<ClientConfig> {
    build_client_config(
        Some(identity),
        bundles,
        revocations,
        provider,
        expected,
        carries,
    )
}

/// A client without an SVID of its own (a sidecar before its first one), towards a server
/// that must present `expected`: the control plane, for `Issue` with a join token.
pub fn client_config_anonymous(
    bundles: Arc<TrustBundles>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
    carries: Carries,
) -> Arc<ClientConfig> {
    build_client_config(None, bundles, Arc::default(), provider, expected, carries)
}

fn build_client_config(
    identity: Option<&LocalIdentity>,
    bundles: Arc<TrustBundles>,
    revocations: Arc<Revocations>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
    carries: Carries,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundles,
        revocations,
        provider: provider.clone(),
        expected,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(id.certified_key())))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![carries.alpn().to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Arc::new(config)
}

/// What a sidecar's ClientHello offers to carry (its one ALPN protocol), from the first bytes
/// a connection received, peeked before the handshake reads them. None: not a whole
/// ClientHello (not yet, or not TLS), or not exactly one protocol of ours. Workers use it to
/// weigh the connection before dealing it.
pub fn offered(mut first_bytes: &[u8]) -> Option<Carries> {
    let mut acceptor = rustls::server::Acceptor::default();
    while !first_bytes.is_empty() {
        if acceptor.read_tls(&mut first_bytes).ok()? == 0 {
            break;
        }
    }
    let accepted = acceptor.accept().ok()??;
    let mut alpn = accepted.client_hello().alpn()?;
    let (Some(one), None) = (alpn.next(), alpn.next()) else {
        return None;
    };
    Carries::from_alpn(Some(one))
}

/// Classifies a failed handshake for metrics (`reason`) and logs (`detail`).
pub fn handshake_failure(err: &io::Error) -> (&'static str, String) {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            io::ErrorKind::UnexpectedEof => ("peer_closed", err.to_string()),
            io::ErrorKind::TimedOut => ("handshake_timeout", err.to_string()),
            _ => ("io_error", err.to_string()),
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => {
            ("no_client_cert", SvidError::NoCertificate.to_string())
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            match inner.downcast_ref::<SvidError>() {
                Some(e) => (e.reason(), e.to_string()),
                None => ("invalid_svid", inner.to_string()),
            }
        }
        rustls::Error::InvalidCertificate(_) => ("invalid_svid", tls.to_string()),
        rustls::Error::AlertReceived(_) => ("peer_rejected", tls.to_string()),
        _ => ("tls_error", tls.to_string()),
    }
}
