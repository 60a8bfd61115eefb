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
    /// Served by a sidecar's SPIFFE Workload API rather than a sidecar of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_api: Option<WorkloadApiSelectors>,
}

/// `spec.workloadApi`: which sidecar's Workload API hands this workload its SVID, and how
/// that sidecar tells the workload's processes from others on its machine (the caller's Unix
/// peer credentials). Every selector given must match; at least one is required.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadApiSelectors {
    /// The sidecar's SPIFFE ID: the control plane issues this workload's SVIDs to it alone.
    pub sidecar: SpiffeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The caller's binary (`/proc/<pid>/exe`), an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
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
            if let Some(problem) = w.spec.workload_api.as_ref().and_then(|s| s.problem(&w)) {
                return Err(ConfigError::new(
                    path,
                    Some(doc.referenced),
                    format!(
                        "workload {:?}: spec.workloadApi: {problem}",
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

impl WorkloadApiSelectors {
    fn problem(&self, w: &Workload) -> Option<&'static str> {
        if self.uid.is_none() && self.gid.is_none() && self.path.is_none() {
            return Some("give at least one selector (uid, gid, path): without one, any local process would get this identity");
        }
        if self.path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Some(
                "path must be absolute (the caller's binary, as /proc/<pid>/exe names it)",
            );
        }
        if self.sidecar.trust_domain_name() != w.spec.spiffe_id.trust_domain_name() {
            return Some("sidecar must be of the workload's own trust domain");
        }
        if self.sidecar == w.spec.spiffe_id {
            return Some("sidecar is the workload's own identity");
        }
        None
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
        let served = GOOD.replace(
            "  environment: prod\n",
            "  environment: prod\n  workloadApi: {sidecar: \"spiffe://example.org/node\", uid: 1000, path: /usr/bin/pay}\n",
        );
        let w = &parse(&served).unwrap()[0];
        let s = w.spec.workload_api.as_ref().expect("selectors");
        assert_eq!(
            (s.sidecar.as_str(), s.uid, s.gid, s.path.as_deref()),
            (
                "spiffe://example.org/node",
                Some(1000),
                None,
                Some(Path::new("/usr/bin/pay"))
            )
        );
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
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  workloadApi: {sidecar: \"spiffe://example.org/node\"}\n",
                ),
                "spec.workloadApi: give at least one selector",
            ),
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  workloadApi: {sidecar: \"spiffe://example.org/node\", path: bin/pay}\n",
                ),
                "path must be absolute",
            ),
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  workloadApi: {sidecar: \"spiffe://other.org/node\", uid: 0}\n",
                ),
                "of the workload's own trust domain",
            ),
            (
                GOOD.replace(
                    "  environment: prod\n",
                    "  environment: prod\n  workloadApi: {sidecar: \"spiffe://example.org/node\", user: 0}\n",
                ),
                "user",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.line.is_some(), "no line for {want}: {e}");
            assert!(e.to_string().contains(want), "want {want:?}: {e}");
        }
    }
}
