//! `kind: TrustBundle`: the CA certificates trusted for one trust domain, pushed by the
//! control plane to every sidecar. A pushed bundle replaces, for its trust domain, the one in
//! the sidecar's bundle directory; an empty `pem` distrusts the domain. The certificates
//! themselves are checked where they are used (sigil-control on apply, each sidecar on
//! receipt): this crate has no X.509 code.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::proxy_config::{check_envelope, Envelope, Metadata};
use crate::spiffe::TrustDomain;
use crate::yaml::{self, ConfigError};

#[derive(Debug, Clone, Serialize)]
pub struct TrustBundle {
    pub metadata: Metadata,
    pub spec: TrustBundleSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrustBundleSpec {
    pub trust_domain: TrustDomain,
    /// The CA certificates, PEM (`-----BEGIN CERTIFICATE-----` blocks); empty distrusts.
    pub pem: String,
}

impl TrustBundle {
    pub fn parse_all(path: &Path, text: &str) -> Result<Vec<TrustBundle>, ConfigError> {
        Self::parse_part(path, text, 1)
    }

    /// The documents of `text`, which starts on line `first_line` of `path`.
    pub(crate) fn parse_part(
        path: &Path,
        text: &str,
        first_line: u64,
    ) -> Result<Vec<TrustBundle>, ConfigError> {
        Self::parse_documents(path, text).map_err(|e| e.shifted(first_line - 1))
    }

    fn parse_documents(path: &Path, text: &str) -> Result<Vec<TrustBundle>, ConfigError> {
        let docs: Vec<Spanned<Envelope<TrustBundleSpec>>> =
            yaml::parse_multiple(path, text, "a TrustBundle")?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let at = Some(doc.referenced);
            let env = doc.value;
            check_envelope(path, &env, "TrustBundle")?;
            let b = TrustBundle {
                metadata: env.metadata.value,
                spec: env.spec,
            };
            let pem = b.spec.pem.trim();
            if !pem.is_empty() && !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError::new(
                    path,
                    at,
                    format!(
                        "trust bundle {:?}: spec.pem has no CERTIFICATE block (an empty pem distrusts the domain)",
                        b.metadata.name
                    ),
                ));
            }
            out.push(b);
        }
        Ok(out)
    }
}
