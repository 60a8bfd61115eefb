//! `kind: Revocation`: one workload identity taken off the mesh. Every sidecar that holds it
//! refuses handshakes from and to that ID and closes the live connections carrying it; the
//! revoked workload's own sidecar stops presenting its SVID. With `issuedBefore`, only SVIDs
//! issued (notBefore) before that instant are revoked, so a rebuilt workload on a fresh SVID
//! is accepted again.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::policy::Timestamp;
use crate::proxy_config::{check_envelope, Envelope, Metadata};
use crate::spiffe::SpiffeId;
use crate::yaml::{self, ConfigError};

#[derive(Debug, Clone, Serialize)]
pub struct Revocation {
    pub metadata: Metadata,
    pub spec: RevocationSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RevocationSpec {
    pub spiffe_id: SpiffeId,
    /// Why, for the logs of every sidecar that acts on it (incident number, suspicion).
    pub reason: String,
    /// Revoke only SVIDs whose notBefore is earlier than this (RFC 3339, UTC).
    #[serde(default)]
    pub issued_before: Option<Timestamp>,
}

impl Revocation {
    /// Whether an SVID for `id` issued (notBefore) at `not_before`, Unix seconds, is revoked.
    pub fn covers(&self, id: &SpiffeId, not_before: i64) -> bool {
        self.spec.spiffe_id == *id
            && self
                .spec
                .issued_before
                .is_none_or(|before| not_before < before.0)
    }

    /// Loads every `---`-separated Revocation document of a file.
    pub fn load_all(path: &Path) -> Result<Vec<Revocation>, ConfigError> {
        let text = yaml::read_file(path)?;
        Self::parse_all(path, &text)
    }

    pub fn parse_all(path: &Path, text: &str) -> Result<Vec<Revocation>, ConfigError> {
        Self::parse_part(path, text, 1)
    }

    /// The documents of `text`, which starts on line `first_line` of `path`.
    pub(crate) fn parse_part(
        path: &Path,
        text: &str,
        first_line: u64,
    ) -> Result<Vec<Revocation>, ConfigError> {
        Self::parse_documents(path, text).map_err(|e| e.shifted(first_line - 1))
    }

    fn parse_documents(path: &Path, text: &str) -> Result<Vec<Revocation>, ConfigError> {
        let docs: Vec<Spanned<Envelope<RevocationSpec>>> =
            yaml::parse_multiple(path, text, "a Revocation")?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let at = Some(doc.referenced);
            let env = doc.value;
            check_envelope(path, &env, "Revocation")?;
            let r = Revocation {
                metadata: env.metadata.value,
                spec: env.spec,
            };
            if r.spec.spiffe_id.is_trust_domain_id() {
                return Err(ConfigError::new(
                    path,
                    at,
                    "spec.spiffeId must be a workload's SPIFFE ID: a whole trust domain is \
                     removed from the trust bundles instead",
                ));
            }
            if r.spec.reason.trim().is_empty() {
                return Err(ConfigError::new(
                    path,
                    at,
                    format!(
                        "revocation {:?}: spec.reason is required: every sidecar logs it",
                        r.metadata.name
                    ),
                ));
            }
            out.push(r);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://example.org/ns/prod/sa/x";

    fn parse(text: &str) -> Result<Vec<Revocation>, ConfigError> {
        Revocation::parse_all(Path::new("rev.yaml"), text)
    }

    fn doc(spec: &str) -> String {
        format!("apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {{name: r, owner: sec}}\nspec:\n{spec}")
    }

    #[test]
    fn covers_every_svid_or_only_those_issued_before() {
        let all = &parse(&doc(&format!("  spiffeId: {ID}\n  reason: key leaked\n"))).unwrap()[0];
        let id = SpiffeId::parse(ID).unwrap();
        let other = SpiffeId::parse("spiffe://example.org/ns/prod/sa/y").unwrap();
        assert!(all.covers(&id, 0) && all.covers(&id, i64::MAX));
        assert!(!all.covers(&other, 0));
        let before = &parse(&doc(&format!(
            "  spiffeId: {ID}\n  reason: rebuilt\n  issuedBefore: 2026-11-22T10:00:00Z\n"
        )))
        .unwrap()[0];
        let t = Timestamp::parse("2026-11-22T10:00:00Z").unwrap().0;
        assert!(before.covers(&id, t - 1));
        assert!(
            !before.covers(&id, t),
            "issued at the instant: not before it"
        );
        assert!(!before.covers(&id, t + 3600));
    }

    #[test]
    fn timestamps_print_as_they_parse() {
        for t in [
            "2026-11-22T10:00:00Z",
            "2024-02-29T23:59:59Z",
            "1970-01-01T00:00:00Z",
        ] {
            assert_eq!(Timestamp::parse(t).unwrap().to_string(), t);
        }
        assert_eq!(Timestamp(86_400 * 365).to_string(), "1971-01-01T00:00:00Z");
    }

    #[test]
    fn bad_revocations_name_file_line_and_reason() {
        let cases = [
            (
                doc("  spiffeId: spiffe://example.org\n  reason: x\n"),
                "trust domain",
            ),
            (
                doc(&format!("  spiffeId: {ID}\n  reason: \" \"\n")),
                "reason is required",
            ),
            (doc(&format!("  spiffeId: {ID}\n")), "reason"),
            (
                doc("  spiffeId: spiffe://example.org/a//b\n  reason: x\n"),
                "empty segment",
            ),
            (
                doc(&format!(
                    "  spiffeId: {ID}\n  reason: x\n  issuedBefore: yesterday\n"
                )),
                "RFC 3339",
            ),
            (
                doc(&format!("  spiffeId: {ID}\n  reason: x\n  scope: all\n")),
                "scope",
            ),
            (
                doc(&format!("  spiffeId: {ID}\n  reason: x\n")).replace("Revocation", "Policy"),
                "Revocation",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.line.is_some(), "no line for {want}: {e}");
            assert!(e.to_string().starts_with("rev.yaml:"), "{e}");
            assert!(e.to_string().contains(want), "want {want:?}: {e}");
        }
    }
}
