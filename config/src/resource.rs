//! Files that mix resource kinds (what an operator applies): each `---`-separated document is
//! parsed by its own `kind`, and errors keep the line numbers of the whole file.

use std::path::Path;

use serde::Deserialize;

use crate::policy::Policy;
use crate::revocation::Revocation;
use crate::trust_bundle::TrustBundle;
use crate::workload::Workload;
use crate::yaml::{self, ConfigError};

#[derive(Debug, Clone)]
pub enum Resource {
    Workload(Workload),
    Policy(Policy),
    Revocation(Revocation),
    TrustBundle(TrustBundle),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Workload(_) => "Workload",
            Self::Policy(_) => "Policy",
            Self::Revocation(_) => "Revocation",
            Self::TrustBundle(_) => "TrustBundle",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Workload(w) => &w.metadata.name,
            Self::Policy(p) => &p.metadata.name,
            Self::Revocation(r) => &r.metadata.name,
            Self::TrustBundle(b) => &b.metadata.name,
        }
    }

    pub fn load_all(path: &Path) -> Result<Vec<Resource>, ConfigError> {
        let text = yaml::read_file(path)?;
        Self::parse_all(path, &text)
    }

    /// Parses every document of `text`, whatever its kind.
    pub fn parse_all(path: &Path, text: &str) -> Result<Vec<Resource>, ConfigError> {
        Ok(Self::parse_docs(path, text)?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// Like `parse_all`, with each resource's own document text (what the control plane
    /// stores and serves back).
    pub fn parse_docs(path: &Path, text: &str) -> Result<Vec<(Resource, String)>, ConfigError> {
        let mut out = Vec::new();
        for (first_line, doc) in documents(text) {
            if doc.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with('#')
            }) {
                continue;
            }
            // Line numbers count from the top of the file, not of the document.
            let shift = |mut e: ConfigError| {
                if let Some(l) = e.line.as_mut() {
                    *l += first_line - 1;
                }
                e
            };
            let head: KindOnly = yaml::parse(path, doc).map_err(shift)?;
            let parsed = match head.kind.as_deref() {
                Some("Workload") => {
                    Workload::parse_all(path, doc).map(|v| v.into_iter().map(Resource::Workload).collect())
                }
                Some("Policy") => {
                    Policy::parse_all(path, doc).map(|v| v.into_iter().map(Resource::Policy).collect())
                }
                Some("Revocation") => Revocation::parse_all(path, doc)
                    .map(|v| v.into_iter().map(Resource::Revocation).collect::<Vec<_>>()),
                Some("TrustBundle") => TrustBundle::parse_all(path, doc)
                    .map(|v| v.into_iter().map(Resource::TrustBundle).collect::<Vec<_>>()),
                other => Err(ConfigError {
                    file: path.to_path_buf(),
                    line: Some(
                        doc.lines()
                            .position(|l| l.starts_with("kind:"))
                            .map_or(1, |i| i as u64 + 1),
                    ),
                    column: None,
                    message: match other {
                        Some(k) => format!(
                            "kind {k:?} is not a resource the control plane keeps (Workload, Policy, Revocation, TrustBundle)"
                        ),
                        None => "document has no kind".into(),
                    },
                }),
            };
            let parsed: Vec<Resource> = parsed.map_err(shift)?;
            out.extend(parsed.into_iter().map(|r| (r, doc.trim().to_string())));
        }
        Ok(out)
    }
}

/// Only the `kind` of a document; every other field is looked at by the kind's own parser.
#[derive(Deserialize)]
struct KindOnly {
    kind: Option<String>,
}

/// The documents of a YAML stream with the 1-based line each starts on.
fn documents(text: &str) -> Vec<(u64, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0usize, 1u64);
    let mut offset = 0usize;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i as u64 + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &str = "# resources of the payments team
apiVersion: sigil.dev/v1
kind: Workload
metadata: {name: payments, owner: team-payments, purpose: card payments API}
spec: {spiffeId: spiffe://example.org/ns/prod/sa/payments, environment: prod}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {name: payments-api, owner: team-payments, purpose: who calls payments}
spec:
  target: spiffe://example.org/ns/prod/sa/payments
  ports:
    - port: 8080
      routes: [{name: pay, match: {path: {prefix: /pay}}, allow: [spiffe://example.org/ns/prod/sa/web]}]
---
apiVersion: sigil.dev/v1
kind: Revocation
metadata: {name: old-web, owner: secops}
spec: {spiffeId: spiffe://example.org/ns/prod/sa/web, reason: rebuilt}
";

    #[test]
    fn mixed_kinds_in_one_file() {
        let rs = Resource::parse_all(Path::new("r.yaml"), MIXED).unwrap();
        let kinds: Vec<_> = rs.iter().map(|r| (r.kind(), r.name())).collect();
        assert_eq!(
            kinds,
            [
                ("Workload", "payments"),
                ("Policy", "payments-api"),
                ("Revocation", "old-web")
            ]
        );
    }

    #[test]
    fn errors_carry_the_line_in_the_whole_file() {
        // Line 14 holds the route; break its allowed ID.
        let bad = MIXED.replace("sa/web]}]", "sa//web]}]");
        let e = Resource::parse_all(Path::new("r.yaml"), &bad).unwrap_err();
        assert_eq!(e.line, Some(14), "{e}");
        assert!(e.to_string().contains("empty segment"), "{e}");
        let bad = MIXED.replace("kind: Revocation", "kind: Gateway");
        let e = Resource::parse_all(Path::new("r.yaml"), &bad).unwrap_err();
        assert_eq!(e.line, Some(17), "{e}");
        assert!(e.to_string().contains("\"Gateway\""), "{e}");
        let bad = MIXED.replace("reason: rebuilt", "reason: rebuilt, extra: 1");
        let e = Resource::parse_all(Path::new("r.yaml"), &bad).unwrap_err();
        assert_eq!(e.line, Some(19), "{e}");
    }
}
