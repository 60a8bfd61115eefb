//! What each sidecar identity is sent: built from the stored documents once per store
//! version (`Catalog`), then cut per identity (`Catalog::snapshot_for`).
//!
//! - Policies: those whose `spec.target` is the sidecar's ID.
//! - Revocations: all of them (a sidecar refuses revoked peers in both directions).
//! - Trust bundles: all TrustBundle resources.
//! - Registry: the addresses of every Workload the sidecar may call: those no policy targets
//!   (open to all) and those whose policies name the sidecar's ID in some `allow` (enforced or
//!   dry-run). A sidecar never learns the addresses of workloads it may not reach.

use std::path::Path;

use sigil_api::{Bundle, Document, RegistryEntry, Snapshot};
use sigil_config::{ConfigError, Policy, Resource, SpiffeId, Workload};

use crate::store::Store;
use crate::stored::StoreError;

/// Every stored resource, parsed, at one store version.
#[derive(Default)]
pub struct Catalog {
    /// The store's epoch and version (see `sigil_api::Snapshot`).
    pub epoch: String,
    pub version: u64,
    policies: Vec<(Policy, Document)>,
    revocations: Vec<Document>,
    workloads: Vec<Workload>,
    bundles: Vec<Bundle>,
    /// Stored documents that no longer parse (written by another version of sigil-control):
    /// sent to nobody, reported in the log.
    pub unreadable: Vec<ConfigError>,
    /// When it was read from the store, for push latency.
    pub loaded_at: Option<std::time::Instant>,
}

impl Catalog {
    pub async fn load(store: &Store) -> Result<Self, StoreError> {
        // Read the version first: a change landing between the two reads only makes the
        // catalog newer than its version says, and the next publish catches up.
        let version = store.version().await?.max(0) as u64;
        let mut c = Catalog {
            epoch: store.epoch().to_string(),
            version,
            loaded_at: Some(std::time::Instant::now()),
            ..Catalog::default()
        };
        for s in store.list(None).await? {
            let origin = format!("store:{}/{}", s.kind, s.name);
            let parsed = match Resource::parse_docs(Path::new(&origin), &s.yaml) {
                Ok(docs) => docs,
                Err(e) => {
                    c.unreadable.push(e);
                    continue;
                }
            };
            for (r, yaml) in parsed {
                let doc = Document {
                    name: r.name().to_string(),
                    yaml,
                };
                match r {
                    Resource::Policy(p) => c.policies.push((p, doc)),
                    Resource::Revocation(_) => c.revocations.push(doc),
                    Resource::Workload(w) => c.workloads.push(w),
                    Resource::TrustBundle(b) => c.bundles.push(Bundle {
                        trust_domain: b.spec.trust_domain.to_string(),
                        pem: b.spec.pem,
                    }),
                }
            }
        }
        Ok(c)
    }

    pub fn revocation_count(&self) -> usize {
        self.revocations.len()
    }

    pub fn snapshot_for(&self, id: &SpiffeId) -> Snapshot {
        let policies = self
            .policies
            .iter()
            .filter(|(p, _)| p.spec.target == *id)
            .map(|(_, d)| d.clone())
            .collect();
        let mut registry = Vec::new();
        for w in &self.workloads {
            if !self.may_call(id, &w.spec.spiffe_id) {
                continue;
            }
            for a in &w.spec.addresses {
                registry.push(RegistryEntry {
                    address: a.to_string(),
                    spiffe_id: w.spec.spiffe_id.to_string(),
                    workload: w.metadata.name.clone(),
                });
            }
        }
        Snapshot {
            version: self.version,
            policies,
            revocations: self.revocations.clone(),
            registry,
            bundles: self.bundles.clone(),
            epoch: self.epoch.clone(),
        }
    }

    /// Whether `caller` may reach `target` under some rule: no policy targets it, or one of
    /// its policies allows `caller` somewhere.
    fn may_call(&self, caller: &SpiffeId, target: &SpiffeId) -> bool {
        let mut targeted = false;
        for (p, _) in self
            .policies
            .iter()
            .filter(|(p, _)| p.spec.target == *target)
        {
            targeted = true;
            for port in &p.spec.ports {
                let port = &port.value;
                let allows = port
                    .routes
                    .iter()
                    .flat_map(|r| r.value.allow.iter())
                    .chain(port.rules.iter().flat_map(|r| r.value.allow.iter()));
                if allows.into_iter().any(|a| a.matches(caller)) {
                    return true;
                }
            }
        }
        !targeted || caller == target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = "apiVersion: sigil.dev/v1
kind: Workload
metadata: {name: api, owner: team-api, purpose: test}
spec: {spiffeId: spiffe://example.org/api, environment: prod, addresses: [10.0.0.1:8080]}
---
apiVersion: sigil.dev/v1
kind: Workload
metadata: {name: db, owner: team-db, purpose: test}
spec: {spiffeId: spiffe://example.org/db, environment: prod, addresses: [10.0.0.2]}
---
apiVersion: sigil.dev/v1
kind: Workload
metadata: {name: open, owner: team-open, purpose: test}
spec: {spiffeId: spiffe://example.org/open, environment: prod, addresses: [10.0.0.3:80]}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {name: db-access, owner: team-db, purpose: test}
spec:
  target: spiffe://example.org/db
  ports:
    - port: 5432
      protocol: tcp
      rules: [{name: api-only, allow: [spiffe://example.org/api]}]
---
apiVersion: sigil.dev/v1
kind: Revocation
metadata: {name: stolen, owner: sec, purpose: incident 1}
spec: {spiffeId: spiffe://example.org/old, reason: key leaked}
";

    fn catalog() -> (Catalog, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sigil-snapshot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::Sqlite(crate::sqlite::Sqlite::open(&dir).unwrap());
        let docs = Resource::parse_docs(Path::new("t.yaml"), DOCS).unwrap();
        let rows: Vec<_> = docs
            .iter()
            .map(|(r, d)| (r.kind(), r.name(), d.as_str()))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.apply(&rows, false)).unwrap();
        (rt.block_on(Catalog::load(&store)).unwrap(), dir)
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn each_identity_gets_its_policies_and_only_reachable_destinations() {
        let (c, dir) = catalog();
        assert_eq!(c.version, 1);
        let api = c.snapshot_for(&id("spiffe://example.org/api"));
        assert!(api.policies.is_empty());
        let mut dests: Vec<_> = api.registry.iter().map(|e| e.address.as_str()).collect();
        dests.sort();
        // The db allows api; api and open are targeted by no policy.
        assert_eq!(dests, ["10.0.0.1:8080", "10.0.0.2", "10.0.0.3:80"]);
        assert_eq!(api.revocations.len(), 1);
        assert!(api.revocations[0].yaml.contains("key leaked"));

        let db = c.snapshot_for(&id("spiffe://example.org/db"));
        assert_eq!(db.policies.len(), 1);
        assert_eq!(db.policies[0].name, "db-access");
        assert!(db.policies[0].yaml.contains("api-only"));

        // Another workload may not reach the db: its address is not sent.
        let other = c.snapshot_for(&id("spiffe://example.org/other"));
        let dests: Vec<_> = other.registry.iter().map(|e| e.address.as_str()).collect();
        assert!(!dests.contains(&"10.0.0.2"), "{dests:?}");
        assert_eq!(dests.len(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
