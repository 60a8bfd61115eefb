//! Resource documents (Policy, Workload, Revocation, TrustBundle) as the tests write them into
//! a sidecar's watched directories or hand to `sigil apply`.

use std::path::{Path, PathBuf};

use crate::{rfc3339, write_atomic};

/// Creates `parent/name` (a policy or revocation directory) and returns its path.
pub fn resource_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("create a resource directory");
    dir
}

/// Writes `yaml` to `dir/name` whole (renamed over), as a config manager would: a watching
/// sidecar never reads half a file.
pub fn write_resource(dir: &Path, name: &str, yaml: &str) {
    write_atomic(&dir.join(name), yaml.as_bytes());
}

/// A Policy `name` (owned by `team-<name>`) for `target`; `ports` is the YAML list under
/// `spec.ports`, each entry starting `    - port: `.
pub fn policy(name: &str, purpose: &str, target: &str, ports: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: {name}, owner: team-{name}, purpose: {purpose}}}
spec:
  target: {target}
  ports:
{ports}"
    )
}

/// A Workload `name` (owned by `team-<name>`) with `id`, reachable at these loopback ports
/// (none: it is not in the registry).
pub fn workload(name: &str, purpose: &str, id: &str, ports: &[u16]) -> String {
    let addresses: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let addresses = if ports.is_empty() {
        String::new()
    } else {
        format!(", addresses: [{}]", addresses.join(", "))
    };
    format!(
        "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: {name}, owner: team-{name}, purpose: {purpose}}}
spec: {{spiffeId: {id}, environment: test{addresses}}}
"
    )
}

/// The Policy `b-web` letting `callers` use `/orders` on `web_port`, and the first caller
/// `/admin` too if `admin`.
pub fn web_policy(
    purpose: &str,
    callers: &[&str],
    target: &str,
    web_port: u16,
    admin: bool,
) -> String {
    let first = callers[0];
    let callers = callers.join(", ");
    let admin = if admin {
        format!(
            "\n        - {{name: admin, match: {{path: {{prefix: /admin}}}}, allow: [{first}]}}"
        )
    } else {
        String::new()
    };
    policy(
        "b-web",
        purpose,
        target,
        &format!(
            "    - port: {web_port}
      routes:
        - {{name: orders, match: {{path: {{prefix: /orders}}}}, allow: [{callers}]}}{admin}
"
        ),
    )
}

/// A Workload `b` (`target`, reachable at 127.0.0.1:`b_port`) and its Policy `b-web`
/// (`web_policy`): the control-plane tests' resources.
pub fn web_resources(
    callers: &[&str],
    target: &str,
    b_port: u16,
    web_port: u16,
    admin: bool,
) -> String {
    format!(
        "{}---\n{}",
        workload("b", "the b service", target, &[b_port]),
        web_policy("who may call b", callers, target, web_port, admin)
    )
}

/// A Revocation `name` of `id` for `reason`; with `issued_before` (Unix seconds), only of
/// the SVIDs issued before that instant.
pub fn revocation(name: &str, id: &str, reason: &str, issued_before: Option<i64>) -> String {
    let mut y = format!(
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {{name: {name}, owner: security}}\n\
         spec:\n  spiffeId: {id}\n  reason: \"{reason}\"\n"
    );
    if let Some(t) = issued_before {
        y += &format!("  issuedBefore: {}\n", rfc3339(t));
    }
    y
}

/// A TrustBundle `name`: `pem` trusted for `domain`.
pub fn trust_bundle(name: &str, domain: &str, pem: &str) -> String {
    let pem: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: sigil.dev/v1
kind: TrustBundle
metadata: {{name: {name}, owner: security, purpose: federation}}
spec:
  trustDomain: {domain}
  pem: |
{pem}"
    )
}
