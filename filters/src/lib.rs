//! Every hot-path decision of Sigil, synchronous and I/O-free: SVID verification (as rustls
//! verifiers), L4 authorization of a peer identity, per-route policy decisions. Callers pass plain values and get a
//! verdict that names the reason or rule.

pub mod authz;
pub mod bundle;
pub mod detect;
pub mod identity;
pub mod normalize;
pub mod policy;
pub mod svid;
pub mod tls;

pub use authz::{L4Authorizer, L4Rule, L4Verdict};
pub use bundle::{BundleError, TrustBundles};
pub use identity::{IdentityError, LocalIdentity};
pub use policy::{Decision, HttpRequest, PolicyIndex};
pub use svid::{verify_svid, SvidError, Usage};
