//! Every hot-path decision of Sigil, synchronous and I/O-free: SVID verification (as rustls
//! verifiers, revocations included), per-port and per-route policy decisions, protocol
//! detection and request normalization. Callers pass plain values and get a verdict that
//! names the reason or rule.

pub mod attest;
pub mod audit;
pub mod bundle;
pub mod detect;
pub mod headers;
pub mod identity;
pub mod issuance;
pub mod limits;
pub mod normalize;
pub mod policy;
pub mod revocation;
pub mod snapshot;
pub mod svid;
pub mod tls;

pub use bundle::{BundleError, TrustBundles};
pub use identity::{IdentityError, LocalIdentity};
pub use policy::{Decision, HttpRequest, PolicyIndex};
pub use revocation::Revocations;
pub use svid::{verify_svid, SvidError, Usage};
