//! Trust bundles: the CA certificates trusted for each trust domain (federation = several).

use std::collections::HashMap;
use std::fmt;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor};
use sigil_config::TrustDomain;

/// The anchors of one trust domain. An empty bundle distrusts the domain.
#[derive(Clone)]
pub struct Bundle {
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
    certs: Vec<CertificateDer<'static>>,
}

impl Bundle {
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

/// Every loaded trust domain's bundle, looked up by the peer's own trust domain name.
#[derive(Default, Clone)]
pub struct TrustBundles {
    domains: HashMap<Box<str>, Bundle>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleError {
    /// The PEM text could not be read.
    Pem { domain: String, detail: String },
    /// A certificate in the bundle is not usable as a trust anchor.
    Anchor {
        domain: String,
        index: usize,
        detail: String,
    },
    /// The file had bytes but no certificate: most likely a partial write.
    NoCertificates { domain: String },
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pem { domain, detail } => write!(f, "bundle for {domain}: bad PEM: {detail}"),
            Self::Anchor {
                domain,
                index,
                detail,
            } => write!(
                f,
                "bundle for {domain}: certificate #{index} is not a usable CA: {detail}"
            ),
            Self::NoCertificates { domain } => write!(
                f,
                "bundle for {domain}: has content but no CERTIFICATE block (partial write?)"
            ),
        }
    }
}

impl std::error::Error for BundleError {}

/// DER certificates one after another (as the SPIFFE Workload API carries chains and
/// bundles), split at each one's SEQUENCE header. None: the bytes do not split into whole
/// DER SEQUENCEs.
pub fn split_der(mut der: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let mut certs = Vec::new();
    while !der.is_empty() {
        // A SEQUENCE (0x30) with a short-form or 1..=4-byte long-form length.
        if der.len() < 2 || der[0] != 0x30 {
            return None;
        }
        let (header, len) = match der[1] {
            n if n < 0x80 => (2, n as usize),
            n @ 0x81..=0x84 => {
                let bytes = (n - 0x80) as usize;
                let len = der
                    .get(2..2 + bytes)?
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | *b as usize);
                (2 + bytes, len)
            }
            _ => return None,
        };
        let end = header.checked_add(len)?;
        certs.push(CertificateDer::from(der.get(..end)?.to_vec()));
        der = &der[end..];
    }
    Some(certs)
}

impl TrustBundles {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the bundle of `domain` from PEM text. A file that is empty or only
    /// whitespace is an explicit, empty bundle: the domain is known but trusted for nothing.
    pub fn insert_pem(&mut self, domain: &TrustDomain, pem: &[u8]) -> Result<(), BundleError> {
        let name = domain.as_str();
        let mut certs = Vec::new();
        for item in CertificateDer::pem_slice_iter(pem) {
            certs.push(item.map_err(|e| BundleError::Pem {
                domain: name.to_string(),
                detail: e.to_string(),
            })?);
        }
        if certs.is_empty() && !pem.iter().all(u8::is_ascii_whitespace) {
            return Err(BundleError::NoCertificates {
                domain: name.to_string(),
            });
        }
        self.insert_der(domain, certs)
    }

    pub fn insert_der(
        &mut self,
        domain: &TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<(), BundleError> {
        let mut anchors = Vec::with_capacity(certs.len());
        for (index, cert) in certs.iter().enumerate() {
            let anchor =
                webpki::anchor_from_trusted_cert(cert).map_err(|e| BundleError::Anchor {
                    domain: domain.to_string(),
                    index,
                    detail: format!("{e:?}"),
                })?;
            anchors.push(anchor.to_owned());
        }
        self.domains
            .insert(domain.as_str().into(), Bundle { anchors, certs });
        Ok(())
    }

    /// These bundles with each domain of `over` replaced by (or added from) `over`'s.
    pub fn overlay(&self, over: &TrustBundles) -> TrustBundles {
        let mut out = self.clone();
        for (domain, bundle) in &over.domains {
            out.domains.insert(domain.clone(), bundle.clone());
        }
        out
    }

    pub fn get(&self, trust_domain: &str) -> Option<&Bundle> {
        self.domains.get(trust_domain)
    }

    /// Loaded domain names, sorted (for config dumps and logs).
    pub fn domains(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.domains.keys().map(|k| &**k).collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.domains.len()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_testkit::Ca;

    #[test]
    fn overlay_replaces_and_adds_domains_and_keeps_the_rest() {
        let (a1, a2, b) = (Ca::new("a.org"), Ca::new("a.org"), Ca::new("b.org"));
        let td = |s: &str| TrustDomain::parse(s).unwrap();
        let mut base = TrustBundles::new();
        base.insert_pem(&td("a.org"), a1.bundle_pem().as_bytes())
            .unwrap();
        let mut over = TrustBundles::new();
        over.insert_pem(&td("a.org"), a2.bundle_pem().as_bytes())
            .unwrap();
        over.insert_pem(&td("b.org"), b.bundle_pem().as_bytes())
            .unwrap();
        let merged = base.overlay(&over);
        assert_eq!(merged.domains(), ["a.org", "b.org"]);
        assert_eq!(
            merged.get("a.org").unwrap().certs(),
            [a2.cert_der().clone()]
        );
        // The base is untouched.
        assert_eq!(base.get("a.org").unwrap().certs(), [a1.cert_der().clone()]);
        assert!(base.get("b.org").is_none());
    }

    #[test]
    fn concatenated_der_splits_back_into_its_certificates() {
        let a = vec![0x30, 0x03, 1, 2, 3];
        let mut b = vec![0x30, 0x81, 0x80];
        b.extend(std::iter::repeat_n(7u8, 0x80));
        let mut c = vec![0x30, 0x82, 0x01, 0x00];
        c.extend(std::iter::repeat_n(9u8, 0x100));
        let joined = [a.clone(), b.clone(), c.clone()].concat();
        let split = split_der(&joined).unwrap();
        assert_eq!(split, [a.into(), b.into(), c.into()]);
        assert_eq!(split_der(&[]), Some(vec![]));
        assert_eq!(split_der(&[0x30, 0x05, 1, 2]), None, "cut short");
        assert_eq!(split_der(&[0x04, 0x01, 0]), None, "not a SEQUENCE");
    }
}
