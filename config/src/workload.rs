//! `kind: Workload`: one workload identity of the mesh, who owns it and why it exists, and
//! the addresses it serves on. The control plane builds each sidecar's registry (address →
//! expected SPIFFE ID) from these.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::proxy_config::{check_envelope, Destination, Envelope, Metadata};
use crate::spiffe::SpiffeId;
use crate::yaml::{self, ConfigError};

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub metadata: Metadata,
    pub spec: WorkloadSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub spiffe_id: SpiffeId,
    /// `prod`, `staging`, … (free text, for inventory and reports).
    pub environment: String,
    /// `ip:port`, or a bare `ip` for every port.
    #[serde(default)]
    pub addresses: Vec<Destination>,
    /// The lifetime of the SVIDs the control plane issues this workload (`1m` at least);
    /// `1h` when unset.
    #[serde(
        default,
        with = "optional_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub svid_ttl: Option<std::time::Duration>,
}

/// The shortest `svidTtl`: renewal, at half the lifetime, must not outpace the network.
pub const MIN_SVID_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// `svidTtl`: a duration as `proxy_config::duration` reads it, or absent.
mod optional_duration {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        crate::proxy_config::duration::deserialize(d).map(Some)
    }

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => crate::proxy_config::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

impl Workload {
    pub fn parse_all(path: &Path, text: &str) -> Result<Vec<Workload>, ConfigError> {
        Self::parse_part(path, text, 1)
    }

    /// The documents of `text`, which starts on line `first_line` of `path`.
    pub(crate) fn parse_part(
        path: &Path,
        text: &str,
        first_line: u64,
    ) -> Result<Vec<Workload>, ConfigError> {
        Self::parse_documents(path, text).map_err(|e| e.shifted(first_line - 1))
    }

    fn parse_documents(path: &Path, text: &str) -> Result<Vec<Workload>, ConfigError> {
        let docs: Vec<Spanned<Envelope<WorkloadSpec>>> =
            yaml::parse_multiple(path, text, "a Workload")?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let env = doc.value;
            check_envelope(path, &env, "Workload")?;
            let meta_at = Some(env.metadata.referenced);
            let w = Workload {
                metadata: env.metadata.value,
                spec: env.spec,
            };
            if let Some(field) = w.metadata.missing_owner_or_purpose() {
                return Err(ConfigError::new(
                    path,
                    meta_at,
                    format!(
                        "workload {:?}: metadata.{field} is required: every identity has an owner and a purpose",
                        w.metadata.name
                    ),
                ));
            }
            if w.spec.svid_ttl.is_some_and(|t| t < MIN_SVID_TTL) {
                return Err(ConfigError::new(
                    path,
                    Some(doc.referenced),
                    format!(
                        "workload {:?}: spec.svidTtl must be at least 1m (SVIDs are renewed at half their lifetime)",
                        w.metadata.name
                    ),
                ));
            }
            if w.spec.spiffe_id.is_trust_domain_id() {
                return Err(ConfigError::new(
                    path,
                    Some(doc.referenced),
                    "spec.spiffeId must be a workload's SPIFFE ID, not a trust domain",
                ));
            }
            out.push(w);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Workload>, ConfigError> {
        Workload::parse_all(Path::new("w.yaml"), text)
    }

    const GOOD: &str = "apiVersion: sigil.dev/v1\nkind: Workload\n\
        metadata: {name: payments, owner: team-payments, purpose: card payments API}\n\
        spec:\n  spiffeId: spiffe://example.org/ns/prod/sa/payments\n  environment: prod\n\
        \x20 addresses: [\"10.1.2.3:8080\", \"10.1.2.4\"]\n";

    #[test]
    fn a_workload_with_addresses() {
        let w = &parse(GOOD).unwrap()[0];
        assert_eq!(
            w.spec.spiffe_id.as_str(),
            "spiffe://example.org/ns/prod/sa/payments"
        );
        assert_eq!(w.spec.addresses.len(), 2);
        assert!(matches!(w.spec.addresses[1], Destination::Host(_)));
        assert_eq!(w.spec.svid_ttl, None);
        let short = GOOD.replace(
            "  environment: prod\n",
            "  environment: prod\n  svidTtl: 5m\n",
        );
        let w = &parse(&short).unwrap()[0];
        assert_eq!(w.spec.svid_ttl, Some(std::time::Duration::from_secs(300)));
    }

    #[test]
    fn bad_workloads_name_file_line_and_reason() {
        let cases = [
            (
                GOOD.replace("owner: team-payments, ", ""),
                "metadata.owner is required",
            ),
            (GOOD.replace("/ns/prod/sa/payments", ""), "trust domain"),
            (GOOD.replace("10.1.2.4", "10.1.2"), "invalid address"),
            (GOOD.replace("  environment: prod\n", ""), "environment"),
            (GOOD.replace("environment:", "env:"), "env"),
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  svidTtl: 30s\n",
                ),
                "spec.svidTtl must be at least 1m",
            ),
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  svidTtl: soon\n",
                ),
                "invalid duration \"soon\"",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.line.is_some(), "no line for {want}: {e}");
            assert!(e.to_string().contains(want), "want {want:?}: {e}");
        }
    }
}
