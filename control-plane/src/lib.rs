//! Sigil's control plane (`sigil-control`) and operator CLI (`sigil`): the embedded store,
//! the operator API, resource files as an operator applies them, and "may this identity call
//! that route?" answered with the decision code the sidecars run (`policy_test`). Pushing
//! `sidecars` serves each sidecar the snapshot of its own identity (`snapshot`), whose
//! registry the same decision code cuts per caller.

pub mod audit_sql;
pub mod audit_store;
pub mod ca;
pub mod client;
pub mod demo;
pub mod etcd;
pub mod files;
pub mod identity;
pub mod issuer;
pub mod metrics;
pub mod operator;
pub mod own_audit;
pub mod policy_test;
pub mod records;
pub mod revoke;
pub mod rotation;
pub mod sidecars;
pub mod snapshot;
pub mod sqlite;
pub mod store;
pub mod stored;
