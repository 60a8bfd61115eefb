//! The revocations a sidecar enforces, looked up by SPIFFE ID in the handshake verifiers and
//! when re-checking live connections. A listed ID costs one parse of the leaf's notBefore
//! (for `issuedBefore`); an unlisted one, a hash lookup.

use std::collections::HashMap;

use rustls::pki_types::CertificateDer;
use sigil_config::{Revocation, SpiffeId};

use crate::svid::SvidError;

#[derive(Debug, Default)]
pub struct Revocations {
    by_id: HashMap<SpiffeId, Vec<Revocation>>,
}

impl Revocations {
    pub fn new(list: &[Revocation]) -> Self {
        let mut by_id: HashMap<SpiffeId, Vec<Revocation>> = HashMap::new();
        for r in list {
            by_id
                .entry(r.spec.spiffe_id.clone())
                .or_default()
                .push(r.clone());
        }
        Self { by_id }
    }

    pub fn len(&self) -> usize {
        self.by_id.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether the same revocation (name, ID and cut-off) is in this set: what changed
    /// between two sets is said once, not at every snapshot.
    pub fn contains(&self, r: &Revocation) -> bool {
        let cut_off = |r: &Revocation| r.spec.issued_before.map(|t| t.0);
        self.by_id.get(&r.spec.spiffe_id).is_some_and(|list| {
            list.iter()
                .any(|o| o.metadata.name == r.metadata.name && cut_off(o) == cut_off(r))
        })
    }

    /// The revocation covering an SVID for `id` issued at `not_before` (Unix seconds).
    pub fn covering(&self, id: &SpiffeId, not_before: i64) -> Option<&Revocation> {
        self.by_id
            .get(id)?
            .iter()
            .find(|r| r.covers(id, not_before))
    }

    /// Refuses `leaf`, whose verified ID is `id`, if a revocation covers it.
    pub fn check(&self, id: &SpiffeId, leaf: &CertificateDer<'_>) -> Result<(), SvidError> {
        let Some(candidates) = self.by_id.get(id) else {
            return Ok(());
        };
        // An unreadable notBefore cannot prove the SVID was issued after the cut-off.
        let not_before = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| c.validity().not_before.timestamp())
            .unwrap_or(i64::MIN);
        match candidates.iter().find(|r| r.covers(id, not_before)) {
            None => Ok(()),
            Some(r) => Err(revoked(id, r)),
        }
    }
}

pub fn revoked(id: &SpiffeId, r: &Revocation) -> SvidError {
    SvidError::Revoked {
        id: id.to_string(),
        revocation: r.metadata.name.clone(),
        reason: r.spec.reason.clone(),
    }
}
