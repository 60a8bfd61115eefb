//! X.509-SVID verification (SPIFFE X509-SVID.md): the leaf's shape first (exactly one
//! `spiffe://` URI SAN with a workload path, marked critical if the Subject is empty; not a
//! CA, digitalSignature set, no keyCertSign/cRLSign, EKU allowing the use if present), then
//! webpki chain validation against the bundle of the leaf's *own* trust domain only.

use std::fmt;

use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_config::{SpiffeId, SpiffeIdError};
use x509_parser::extensions::GeneralName;

use crate::bundle::TrustBundles;

/// Which side of TLS the certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A client SVID (verified by our inbound listener).
    Client,
    /// A server SVID (verified by our outbound connections).
    Server,
}

impl Usage {
    fn eku_name(self) -> &'static str {
        match self {
            Usage::Client => "clientAuth",
            Usage::Server => "serverAuth",
        }
    }
}

/// Why a peer's certificate is not an acceptable SVID. `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidError {
    NoCertificate,
    Malformed(String),
    UriSanCount(usize),
    /// The Subject is empty and the subjectAltName extension, which then alone names the
    /// certificate's subject, is not marked critical (RFC 5280 §4.1.2.6).
    SanNotCritical,
    InvalidId(SpiffeIdError),
    /// The URI SAN is the trust domain's own ID, which an SVID must not carry.
    TrustDomainId(String),
    LeafIsCa,
    NoKeyUsage,
    NoDigitalSignature,
    /// keyCertSign or cRLSign set on a leaf.
    CaKeyUsage,
    /// An EKU extension is present and does not allow this use.
    ExtKeyUsage(Usage),
    UntrustedDomain(String),
    EmptyBundle(String),
    Expired,
    NotYetValid,
    /// The chain does not lead to a CA in the bundle of the ID's own trust domain.
    UntrustedIssuer(String),
    Chain(String),
    WrongIdentity {
        expected: String,
        got: String,
    },
    /// A Revocation covers this SVID.
    Revoked {
        id: String,
        revocation: String,
        reason: String,
    },
}

impl SvidError {
    /// Stable, low-cardinality name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_client_cert",
            Self::UntrustedDomain(_) | Self::EmptyBundle(_) => "untrusted_domain",
            Self::UntrustedIssuer(_) => "untrusted_issuer",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIdentity { .. } => "wrong_identity",
            Self::Revoked { .. } => "revoked",
            Self::Malformed(_)
            | Self::UriSanCount(_)
            | Self::SanNotCritical
            | Self::InvalidId(_)
            | Self::TrustDomainId(_)
            | Self::LeafIsCa
            | Self::NoKeyUsage
            | Self::NoDigitalSignature
            | Self::CaKeyUsage
            | Self::ExtKeyUsage(_)
            | Self::Chain(_) => "invalid_svid",
        }
    }
}

impl fmt::Display for SvidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCertificate => write!(f, "peer presented no certificate"),
            Self::Malformed(e) => write!(f, "certificate is not valid X.509: {e}"),
            Self::UriSanCount(n) => {
                write!(f, "SVID must have exactly one URI SAN, this one has {n}")
            }
            Self::SanNotCritical => write!(
                f,
                "leaf has an empty Subject, so its subjectAltName extension must be marked \
                 critical (RFC 5280 section 4.1.2.6), and it is not"
            ),
            Self::InvalidId(e) => write!(f, "URI SAN is not a valid SPIFFE ID: {e}"),
            Self::TrustDomainId(id) => write!(
                f,
                "URI SAN {id} is a trust domain's ID; an SVID needs a workload path"
            ),
            Self::LeafIsCa => write!(f, "leaf certificate is a CA (basicConstraints CA=true)"),
            Self::NoKeyUsage => write!(f, "leaf has no keyUsage extension"),
            Self::NoDigitalSignature => write!(f, "leaf keyUsage lacks digitalSignature"),
            Self::CaKeyUsage => write!(f, "leaf keyUsage has keyCertSign or cRLSign"),
            Self::ExtKeyUsage(u) => {
                write!(f, "leaf extendedKeyUsage does not include {}", u.eku_name())
            }
            Self::UntrustedDomain(td) => write!(f, "no trust bundle for trust domain {td}"),
            Self::EmptyBundle(td) => write!(f, "trust bundle for {td} is empty: domain distrusted"),
            Self::Expired => write!(f, "certificate chain has expired"),
            Self::NotYetValid => write!(f, "certificate chain is not valid yet"),
            Self::UntrustedIssuer(td) => write!(
                f,
                "chain does not lead to a CA of trust domain {td}'s bundle"
            ),
            Self::Chain(e) => write!(f, "chain validation failed: {e}"),
            Self::WrongIdentity { expected, got } => {
                write!(f, "peer is {got}, expected {expected}")
            }
            Self::Revoked {
                id,
                revocation,
                reason,
            } => write!(f, "{id} is revoked by {revocation}: {reason}"),
        }
    }
}

impl std::error::Error for SvidError {}

/// The certificate's serial number in lowercase hex (as `openssl x509 -serial` prints it,
/// but lowercase), for audit records; None if the DER does not hold one where X.509 puts it.
/// A walk of the first few DER headers (Certificate, TBSCertificate, the optional version,
/// serialNumber), not a parse of the whole certificate: it runs for every connection a
/// sidecar records, and the certificate was verified at the handshake already.
pub fn serial_hex(cert: &[u8]) -> Option<String> {
    let (_, certificate) = der_element(cert, 0x30)?;
    let (_, mut tbs) = der_element(certificate, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        let (after_version, _) = der_element(tbs, 0xa0)?;
        tbs = after_version;
    }
    let (_, serial) = der_element(tbs, 0x02)?;
    Some(serial.iter().map(|b| format!("{b:02x}")).collect())
}

/// The DER element of tag `tag` at the start of `der`: (what follows it, its contents).
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *der.first()? != tag {
        return None;
    }
    let first = *der.get(1)?;
    let (len, at) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let len = der
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    let contents = der.get(at..at.checked_add(len)?)?;
    Some((&der[at + len..], contents))
}

/// Checks the leaf's shape and returns its SPIFFE ID. No chain validation.
pub fn leaf_spiffe_id(end_entity: &[u8], usage: Option<Usage>) -> Result<SpiffeId, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let bad_ext = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());

    let mut uris = 0usize;
    let mut uri: &str = "";
    let san = cert.subject_alternative_name().map_err(bad_ext)?;
    if let Some(san) = &san {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris += 1;
                uri = u;
            }
        }
    }
    if uris != 1 {
        return Err(SvidError::UriSanCount(uris));
    }
    // With no Subject, the SAN is the only name the certificate has; a relying party that
    // does not process it must not accept the certificate at all.
    if cert.subject().iter().next().is_none() && !san.is_some_and(|s| s.critical) {
        return Err(SvidError::SanNotCritical);
    }
    let id = SpiffeId::parse(uri).map_err(SvidError::InvalidId)?;
    if id.is_trust_domain_id() {
        return Err(SvidError::TrustDomainId(uri.to_string()));
    }

    if let Some(bc) = cert.basic_constraints().map_err(bad_ext)? {
        if bc.value.ca {
            return Err(SvidError::LeafIsCa);
        }
    }
    match cert.key_usage().map_err(bad_ext)? {
        None => return Err(SvidError::NoKeyUsage),
        Some(ku) => {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::CaKeyUsage);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::NoDigitalSignature);
            }
        }
    }
    if let (Some(usage), Some(eku)) = (usage, cert.extended_key_usage().map_err(bad_ext)?) {
        let e = eku.value;
        let ok = e.any
            || match usage {
                Usage::Client => e.client_auth,
                Usage::Server => e.server_auth,
            };
        if !ok {
            return Err(SvidError::ExtKeyUsage(usage));
        }
    }
    Ok(id)
}

/// Full verification of a peer's SVID chain at `now`.
pub fn verify_svid(
    bundles: &TrustBundles,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: Usage,
) -> Result<SpiffeId, SvidError> {
    let id = leaf_spiffe_id(end_entity, Some(usage))?;
    let td = id.trust_domain_name();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| SvidError::UntrustedDomain(td.to_string()))?;
    if bundle.anchors.is_empty() {
        return Err(SvidError::EmptyBundle(td.to_string()));
    }
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| SvidError::Malformed(format!("{e:?}")))?;
    let eku = match usage {
        Usage::Client => webpki::KeyUsage::client_auth(),
        Usage::Server => webpki::KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        algs.all,
        &bundle.anchors,
        intermediates,
        now,
        eku,
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        webpki::Error::UnknownIssuer => SvidError::UntrustedIssuer(td.to_string()),
        other => SvidError::Chain(format!("{other:?}")),
    })?;
    Ok(id)
}

#[cfg(test)]
mod serial_tests {
    use super::serial_hex;

    #[test]
    fn the_serial_is_the_one_a_full_parse_reads_and_junk_has_none() {
        let ca = sigil_testkit::Ca::new("example.org");
        for n in 0..20 {
            let svid = ca.svid(&format!("spiffe://example.org/ns/t/sa/w{n}"));
            let der = svid.chain[0].to_vec();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let want: String = cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(serial_hex(&der).as_deref(), Some(want.as_str()));
            assert_eq!(serial_hex(&der[..40]), None, "cut short");
        }
        assert_eq!(serial_hex(b""), None);
        assert_eq!(serial_hex(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(serial_hex(&[0x02, 0x01, 0x05]), None, "not a certificate");
    }
}
