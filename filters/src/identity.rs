//! Our own SVID: the certificate chain and private key we present. Validated before use so
//! that a corrupt, partial, expired or mismatched pair never replaces a good one.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use sigil_config::SpiffeId;

use crate::svid::{leaf_spiffe_id, SvidError};

/// A validated local SVID. The private key stays inside `CertifiedKey`'s signer; it has no
/// Debug or Display that could print it.
#[derive(Clone)]
pub struct LocalIdentity {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    not_before: u64,
    not_after: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    CertPem(String),
    NoCertificate,
    KeyPem(String),
    /// The key cannot be used by the TLS provider (unsupported type or bad encoding).
    Key(String),
    KeyMismatch,
    Svid(SvidError),
    Expired {
        not_after: u64,
    },
    NotYetValid {
        not_before: u64,
    },
    WrongId {
        expected: String,
        got: String,
    },
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CertPem(e) => write!(f, "certificate file: bad PEM: {e}"),
            Self::NoCertificate => write!(f, "certificate file has no CERTIFICATE block"),
            Self::KeyPem(e) => write!(f, "key file: no usable PRIVATE KEY block: {e}"),
            Self::Key(e) => write!(f, "key file: key not usable: {e}"),
            Self::KeyMismatch => write!(f, "private key does not match the certificate"),
            Self::Svid(e) => write!(f, "certificate is not a valid SVID: {e}"),
            Self::Expired { not_after } => {
                write!(f, "certificate expired (notAfter {not_after} Unix time)")
            }
            Self::NotYetValid { not_before } => {
                write!(
                    f,
                    "certificate not valid yet (notBefore {not_before} Unix time)"
                )
            }
            Self::WrongId { expected, got } => {
                write!(f, "certificate is for {got}, config requires {expected}")
            }
        }
    }
}

impl std::error::Error for IdentityError {}

impl LocalIdentity {
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        now: UnixTime,
        expected: Option<&SpiffeId>,
        provider: &CryptoProvider,
    ) -> Result<Self, IdentityError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::CertPem(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| IdentityError::KeyPem(e.to_string()))?;
        Self::from_der(chain, key, now, expected, provider)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        now: UnixTime,
        expected: Option<&SpiffeId>,
        provider: &CryptoProvider,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
        let id = leaf_spiffe_id(leaf, None).map_err(IdentityError::Svid)?;
        if let Some(want) = expected {
            if *want != id {
                return Err(IdentityError::WrongId {
                    expected: want.to_string(),
                    got: id.to_string(),
                });
            }
        }
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| IdentityError::Svid(SvidError::Malformed(e.to_string())))?;
        let not_before = cert.validity().not_before.timestamp().max(0) as u64;
        let not_after = cert.validity().not_after.timestamp().max(0) as u64;
        if now.as_secs() >= not_after {
            return Err(IdentityError::Expired { not_after });
        }
        if now.as_secs() < not_before {
            return Err(IdentityError::NotYetValid { not_before });
        }
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signer);
        certified
            .keys_match()
            .map_err(|_| IdentityError::KeyMismatch)?;
        Ok(Self {
            id,
            certified: Arc::new(certified),
            not_before,
            not_after,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Issuance (notBefore) of the leaf, in Unix seconds.
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Expiry of the leaf, in Unix seconds.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }
}

impl fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIdentity")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}
