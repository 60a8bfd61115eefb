//! Files that mix resource kinds (what an operator applies): each `---`-separated document is
//! parsed by its own `kind`, and errors keep the line numbers of the whole file.

use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

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
    ///
    /// Documents with nothing but blank lines and comments are skipped; a null one (`~`,
    /// `null`, a lone tag) is refused, as the per-kind parsers refuse it.
    pub fn parse_docs(path: &Path, text: &str) -> Result<Vec<(Resource, String)>, ConfigError> {
        let mut out = Vec::new();
        for doc in yaml::documents(text) {
            let Some(content_line) = doc.content_line else {
                continue;
            };
            let (text, first_line) = (doc.text, doc.first_line);
            // Line numbers count from the top of the file, not of the document.
            let shift = first_line - 1;
            let head: Spanned<Option<KindOnly>> =
                yaml::parse(path, text).map_err(|e| e.shifted(shift))?;
            let Some(KindOnly { kind }) = head.value else {
                return Err(yaml::null_document(path, content_line, KINDS));
            };
            let Some(kind) = kind else {
                let e = ConfigError::new(
                    path,
                    Some(head.referenced),
                    format!("document has no kind; expected {KINDS}"),
                );
                return Err(e.shifted(shift));
            };
            let parsed: Vec<Resource> = match kind.value.as_str() {
                "Workload" => Workload::parse_part(path, text, first_line)?
                    .into_iter()
                    .map(Resource::Workload)
                    .collect(),
                "Policy" => Policy::parse_part(path, text, first_line)?
                    .into_iter()
                    .map(Resource::Policy)
                    .collect(),
                "Revocation" => Revocation::parse_part(path, text, first_line)?
                    .into_iter()
                    .map(Resource::Revocation)
                    .collect(),
                "TrustBundle" => TrustBundle::parse_part(path, text, first_line)?
                    .into_iter()
                    .map(Resource::TrustBundle)
                    .collect(),
                other => {
                    let e = ConfigError::new(
                        path,
                        Some(kind.referenced),
                        format!(
                            "kind {other:?} is not a resource the control plane keeps (Workload, Policy, Revocation, TrustBundle)"
                        ),
                    );
                    return Err(e.shifted(shift));
                }
            };
            out.extend(parsed.into_iter().map(|r| (r, text.trim().to_string())));
        }
        Ok(out)
    }
}

const KINDS: &str = "a resource (Workload, Policy, Revocation or TrustBundle)";

/// Only the `kind` of a document; every other field is looked at by the kind's own parser.
#[derive(Deserialize)]
struct KindOnly {
    kind: Option<Spanned<String>>,
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
        // Lines that a message names count from the top of the file too.
        let dup = MIXED.replace(
            "allow: [spiffe://example.org/ns/prod/sa/web]}]\n",
            "allow: [spiffe://example.org/ns/prod/sa/web]}]\n    - port: 8080\n",
        );
        let e = Resource::parse_all(Path::new("r.yaml"), &dup).unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.yaml:15:7: port 8080 is already listed at line 13"
        );
    }

    /// A document may start on its `---` line (`--- {apiVersion: ...}`); it used to be
    /// dropped without a word. Documents after a `...` line, and after directives, are read
    /// as YAML reads them.
    #[test]
    fn every_document_yaml_sees_is_read() {
        let w = "{apiVersion: sigil.dev/v1, kind: Workload, metadata: {name: w, owner: o, \
                 purpose: p}, spec: {spiffeId: spiffe://example.org/w, environment: prod}}";
        for text in [
            format!("{w}\n--- {w}\n"),
            format!("--- {w}\n--- {w}\n---\n"),
            format!("{w}\n...\n{w}\n"),
            format!("{w}\n...\n%YAML 1.2\n---\n{w}\n"),
            format!("%YAML 1.2\n---\n{w}\n---\n{w}"),
        ] {
            let f = Path::new("r.yaml");
            assert_eq!(Resource::parse_all(f, &text).unwrap().len(), 2, "{text}");
            assert_eq!(Workload::parse_all(f, &text).unwrap().len(), 2, "{text}");
        }
        let docs = Resource::parse_docs(Path::new("r.yaml"), &format!("{w}\n--- {w}\n")).unwrap();
        assert_eq!(docs[1].1, format!("--- {w}"));
        let e = Resource::parse_all(
            Path::new("r.yaml"),
            &format!("{w}\n--- {}\n", w.replace("prod}", "prod, x: 1}")),
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }
}
