//! The shared model of Sigil: SPIFFE identities and the YAML resources, validated with
//! file:line errors. No networking here.

pub mod policy;
pub mod proxy_config;
pub mod resource;
pub mod revocation;
pub mod spiffe;
pub mod trust_bundle;
pub mod workload;
mod yaml;

pub use policy::Policy;
pub use proxy_config::ProxyConfig;
pub use resource::Resource;
pub use revocation::Revocation;
pub use spiffe::{IdPattern, SpiffeId, SpiffeIdError, TrustDomain};
pub use trust_bundle::TrustBundle;
pub use workload::Workload;
pub use yaml::{ConfigError, MAX_DOCUMENT_BYTES, MAX_FILE_BYTES};
