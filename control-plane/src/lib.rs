//! Sigil's control plane (`sigil-control`) and operator CLI (`sigil`): the embedded store,
//! the operator API, resource files as an operator applies them, and "may this identity call
//! that route?" answered with the decision code the sidecars run (`policy_test`). Pushing
//! snapshots to sidecars comes next (issue 4).

pub mod client;
pub mod files;
pub mod identity;
pub mod operator;
pub mod policy_test;
pub mod store;
