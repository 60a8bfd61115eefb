//! Sigil's control plane and operator CLI. So far: reading resource files as an operator
//! applies them, and answering "may this identity call that route?" with the decision code
//! the sidecars run (`policy_test`). The control-plane server comes next (issue 4).

pub mod files;
pub mod policy_test;
