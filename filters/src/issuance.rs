//! What the control plane's CA accepts and what it sets, decided without I/O: a certificate
//! signing request is checked (size, signature, key type, the SPIFFE ID it may name), and the
//! validity of the SVID to issue is computed (exactly the configured lifetime, never past the
//! CA's own). Only the CSR's public key is taken; every field of the SVID is the CA's.
//! Also when a holder renews: at half its SVID's lifetime, with jitter.

use std::fmt;
use std::time::Duration;

use sigil_config::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// The largest CSR read. A P-256 CSR with one URI SAN is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 4096;
/// The shortest SVID lifetime: below it, renewal (at half) would outpace the network.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// The SVID lifetime when a Workload sets none (SPIRE's too).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Why a CSR is refused; `label()` is the metric's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsrRefusal {
    TooLarge(usize),
    /// Not a PKCS#10 request (the parser's words).
    Unparsable(String),
    TrailingBytes,
    /// Not signed by the key it carries: the sender does not hold that key.
    BadSignature,
    /// A key other than ECDSA P-256 (named).
    KeyType(String),
    /// A URI SAN naming another SPIFFE ID than the one this caller may hold.
    ForeignId {
        requested: String,
        expected: SpiffeId,
    },
}

impl CsrRefusal {
    pub fn label(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "csr_too_large",
            Self::Unparsable(_) | Self::TrailingBytes => "csr_unparsable",
            Self::BadSignature => "csr_bad_signature",
            Self::KeyType(_) => "csr_key_type",
            Self::ForeignId { .. } => "csr_foreign_id",
        }
    }
}

impl fmt::Display for CsrRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(n) => {
                write!(f, "the CSR is {n} bytes; at most {MAX_CSR_BYTES} are read")
            }
            Self::Unparsable(e) => write!(f, "not a PKCS#10 certificate signing request: {e}"),
            Self::TrailingBytes => f.write_str("bytes after the certificate signing request"),
            Self::BadSignature => {
                f.write_str("the CSR's signature does not verify with the public key it carries")
            }
            Self::KeyType(k) => write!(
                f,
                "the CSR's key is {k}; the CA signs ECDSA P-256 keys only"
            ),
            Self::ForeignId {
                requested,
                expected,
            } => write!(
                f,
                "the CSR names {requested}, but this caller may hold only {expected}"
            ),
        }
    }
}

impl std::error::Error for CsrRefusal {}

/// A CSR the CA may sign: the DER SubjectPublicKeyInfo of its key, and nothing else from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedCsr {
    pub public_key_der: Vec<u8>,
}

/// Checks a CSR from a caller that may hold `expected`. URI SANs in it, if any, must all be
/// `expected`; other requested extensions are ignored, never copied (the CA sets every field).
pub fn check_csr(der: &[u8], expected: &SpiffeId) -> Result<CheckedCsr, CsrRefusal> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrRefusal::TooLarge(der.len()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrRefusal::Unparsable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrRefusal::TrailingBytes);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(CsrRefusal::KeyType(key_name(spki)));
    }
    csr.verify_signature()
        .map_err(|_| CsrRefusal::BadSignature)?;
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            let requested = match name {
                GeneralName::URI(uri) => *uri,
                // DNS names, IPs and the rest are not SPIFFE IDs: the CA does not set them.
                _ => continue,
            };
            if requested != expected.as_str() {
                return Err(CsrRefusal::ForeignId {
                    requested: requested.to_string(),
                    expected: expected.clone(),
                });
            }
        }
    }
    Ok(CheckedCsr {
        public_key_der: spki.raw.to_vec(),
    })
}

/// The key type of a SubjectPublicKeyInfo, for the refusal message.
fn key_name(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> String {
    use x509_parser::oid_registry::{
        OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519, OID_SIG_ED448,
    };
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return "RSA".into();
    }
    if *alg == OID_SIG_ED25519 {
        return "Ed25519".into();
    }
    if *alg == OID_SIG_ED448 {
        return "Ed448".into();
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".into(),
            Some(c) => format!("ECDSA (curve {c})"),
            None => "ECDSA (no named curve)".into(),
        };
    }
    format!("key of algorithm {alg}")
}

/// The validity of an SVID, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Why no SVID of the asked lifetime can be issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifetimeRefusal {
    /// Shorter than `MIN_TTL`.
    TooShort(Duration),
    /// The CA's certificate expires first (Unix seconds): rotate the CA.
    CaExpiresFirst { ca_not_after: i64, wanted: i64 },
}

impl fmt::Display for LifetimeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(ttl) => write!(
                f,
                "an SVID lifetime of {}s is below the minimum of {}s",
                ttl.as_secs(),
                MIN_TTL.as_secs()
            ),
            Self::CaExpiresFirst {
                ca_not_after,
                wanted,
            } => write!(
                f,
                "the CA's certificate expires at {} (Unix time), before the SVID would ({wanted}); make a new CA (sigil ca init) and put it in the trust bundles",
                ca_not_after
            ),
        }
    }
}

impl std::error::Error for LifetimeRefusal {}

/// The validity of an SVID issued at `now` for `ttl`: exactly `ttl` long, starting now (no
/// backdating: the lifetime an operator sets is the one the SVID has), and not past the CA's
/// own expiry.
pub fn validity(now: i64, ttl: Duration, ca_not_after: i64) -> Result<Validity, LifetimeRefusal> {
    if ttl < MIN_TTL {
        return Err(LifetimeRefusal::TooShort(ttl));
    }
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let not_after = now.saturating_add(secs);
    if not_after > ca_not_after {
        return Err(LifetimeRefusal::CaExpiresFirst {
            ca_not_after,
            wanted: not_after,
        });
    }
    Ok(Validity {
        not_before: now,
        not_after,
    })
}

/// When the holder of an SVID valid over `v` renews it: at half its lifetime, moved by up to
/// ±10 % of the lifetime by `jitter` (in [-1, 1]), so that sidecars issued together do not all
/// renew together. The time left at renewal (at least 40 % of the lifetime) is the outage
/// budget: a control plane down for longer lets SVIDs expire.
pub fn renew_at(v: Validity, jitter: f64) -> i64 {
    let lifetime = (v.not_after - v.not_before) as f64;
    let offset = lifetime * (0.5 + 0.1 * jitter.clamp(-1.0, 1.0));
    v.not_before + offset.round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn csr(alg: &'static rcgen::SignatureAlgorithm, uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    const API: &str = "spiffe://example.org/api";

    #[test]
    fn a_p256_csr_for_the_callers_own_id_or_none_gives_its_key() {
        let der = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
        let checked = check_csr(&der, &id(API)).unwrap();
        assert!(
            checked.public_key_der.len() > 60,
            "a P-256 SubjectPublicKeyInfo"
        );
        let bare = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        assert!(check_csr(&bare, &id(API)).is_ok());
    }

    #[test]
    fn a_csr_naming_another_id_is_refused() {
        let der = csr(
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &[API, "spiffe://example.org/db"],
        );
        let e = check_csr(&der, &id(API)).unwrap_err();
        assert_eq!(e.label(), "csr_foreign_id");
        assert_eq!(
            e.to_string(),
            "the CSR names spiffe://example.org/db, but this caller may hold only spiffe://example.org/api"
        );
    }

    #[test]
    fn other_key_types_are_refused_by_name() {
        let ed = csr(&rcgen::PKCS_ED25519, &[API]);
        assert_eq!(
            check_csr(&ed, &id(API)),
            Err(CsrRefusal::KeyType("Ed25519".into()))
        );
        let p384 = csr(&rcgen::PKCS_ECDSA_P384_SHA384, &[API]);
        let e = check_csr(&p384, &id(API)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the CSR's key is ECDSA P-384; the CA signs ECDSA P-256 keys only"
        );
    }

    #[test]
    fn a_changed_byte_breaks_the_signature_and_garbage_is_not_a_csr() {
        let mut der = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
        // The signature is the last bytes of the request.
        let last = der.len() - 3;
        der[last] ^= 0x01;
        assert_eq!(check_csr(&der, &id(API)), Err(CsrRefusal::BadSignature));
        let e = check_csr(b"hello", &id(API)).unwrap_err();
        assert_eq!(e.label(), "csr_unparsable");
        let huge = vec![0u8; MAX_CSR_BYTES + 1];
        assert_eq!(
            check_csr(&huge, &id(API)),
            Err(CsrRefusal::TooLarge(MAX_CSR_BYTES + 1))
        );
        let mut trailing = csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]);
        trailing.push(0);
        assert_eq!(
            check_csr(&trailing, &id(API)),
            Err(CsrRefusal::TrailingBytes)
        );
    }

    #[test]
    fn the_validity_is_exactly_the_lifetime_and_never_past_the_ca() {
        let v = validity(1_000, Duration::from_secs(3600), 10_000).unwrap();
        assert_eq!(
            v,
            Validity {
                not_before: 1_000,
                not_after: 4_600
            }
        );
        let one_minute = validity(1_000, MIN_TTL, 10_000).unwrap();
        assert_eq!(one_minute.not_after - one_minute.not_before, 60);
        assert_eq!(
            validity(1_000, Duration::from_secs(59), 10_000),
            Err(LifetimeRefusal::TooShort(Duration::from_secs(59)))
        );
        assert_eq!(
            validity(9_000, Duration::from_secs(3600), 10_000),
            Err(LifetimeRefusal::CaExpiresFirst {
                ca_not_after: 10_000,
                wanted: 12_600
            })
        );
    }

    #[test]
    fn renewal_is_at_half_the_lifetime_within_ten_percent() {
        let v = Validity {
            not_before: 0,
            not_after: 3600,
        };
        assert_eq!(renew_at(v, 0.0), 1800);
        assert_eq!(renew_at(v, 1.0), 2160);
        assert_eq!(renew_at(v, -1.0), 1440);
        assert_eq!(renew_at(v, 7.0), 2160, "jitter is clamped");
    }
}
