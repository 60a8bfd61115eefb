//! The Revocation resource `sigil revoke` stores (and `sigil demo` uses).

use std::path::Path;

use sigil_config::policy::Timestamp;
use sigil_config::{ConfigError, Resource, SpiffeId};

/// The resource name for `id`: the ID without its scheme, every character a resource name
/// cannot hold turned into `-`, then a hash of the whole ID, so that IDs differing only in
/// those characters (`…/a-b`, `…/a/b`) never share a name.
pub fn name_for(id: &SpiffeId) -> String {
    let bare = id.as_str().trim_start_matches("spiffe://");
    let name: String = bare
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("revoke-{name}-{:08x}", hash as u32)
}

/// The document revoking `id`, validated as `apply` validates. `owner` is who revokes.
pub fn document(
    name: &str,
    id: &SpiffeId,
    reason: &str,
    issued_before: Option<Timestamp>,
    owner: &str,
) -> Result<String, ConfigError> {
    // Quoted as JSON strings, which YAML reads as they are.
    let q = |s: &str| format!("{s:?}");
    let mut yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata:\n  name: {}\n  owner: {}\n  purpose: {}\nspec:\n  spiffeId: {}\n  reason: {}\n",
        q(name),
        q(owner),
        q(&format!("revoke {id}")),
        q(id.as_str()),
        q(reason)
    );
    if let Some(t) = issued_before {
        yaml += &format!("  issuedBefore: \"{t}\"\n");
    }
    Resource::parse_all(Path::new("revocation"), &yaml)?;
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_document_parses_back_to_what_was_asked() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert!(
            name_for(&id).starts_with("revoke-example.org-ns-prod-sa-web-"),
            "{}",
            name_for(&id)
        );
        let (x, y) = (
            SpiffeId::parse("spiffe://td/ns/a-b").unwrap(),
            SpiffeId::parse("spiffe://td/ns/a/b").unwrap(),
        );
        assert_ne!(name_for(&x), name_for(&y));
        assert_eq!(name_for(&x), name_for(&x.clone()));
        let yaml = document(
            "r",
            &id,
            "incident \"42\": key: leaked",
            Some(Timestamp(1_800_000_000)),
            "spiffe://example.org/ops/alice",
        )
        .unwrap();
        let parsed = Resource::parse_all(Path::new("t"), &yaml).unwrap();
        let Resource::Revocation(r) = &parsed[0] else {
            panic!("not a revocation: {yaml}")
        };
        assert_eq!(r.spec.spiffe_id, id);
        assert_eq!(r.spec.reason, "incident \"42\": key: leaked");
        assert_eq!(r.spec.issued_before, Some(Timestamp(1_800_000_000)));
        assert!(document("r", &id, "", None, "o").is_err(), "empty reason");
    }
}
