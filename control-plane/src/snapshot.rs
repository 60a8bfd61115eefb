//! What each sidecar identity is sent: built from the stored documents once per store
//! version (`Catalog`), then cut per identity (`Catalog::snapshot_for`).
//!
//! - Policies: those whose `spec.target` is the sidecar's ID.
//! - Revocations: all of them (a sidecar refuses revoked peers in both directions).
//! - Trust bundles: all TrustBundle resources.
//! - Registry: the addresses of every Workload the sidecar may call, as its destination's
//!   sidecar would decide it: `sigil_filters::PolicyIndex`, compiled from the policies that
//!   target the workload, allows some request or connection of the caller's ID (`Reach`). A
//!   sidecar never learns the addresses of workloads it may not reach.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use sigil_api::{Bundle, Child, Document, RegistryEntry, Snapshot};
use sigil_config::policy::{PathMatch, RouteMatch};
use sigil_config::{ConfigError, Policy, Resource, SpiffeId, Workload};
use sigil_filters::{HttpRequest, PolicyIndex};

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
    /// The PEM of each TrustBundle, by resource name.
    bundle_pems: HashMap<String, String>,
    /// Stored documents that no longer parse (written by another version of sigil-control):
    /// sent to nobody, reported in the log.
    pub unreadable: Vec<ConfigError>,
    /// When it was read from the store, for push latency.
    pub loaded_at: Option<std::time::Instant>,
    /// Who may reach each Workload's SPIFFE ID, compiled once per catalog.
    reach: HashMap<SpiffeId, Reach>,
    /// The revocations in force, for the CA: no SVID for a revoked identity.
    revoked: sigil_filters::Revocations,
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
        let mut revoked = Vec::new();
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
                    Resource::Revocation(r) => {
                        revoked.push(r);
                        c.revocations.push(doc)
                    }
                    Resource::Workload(w) => c.workloads.push(w),
                    Resource::TrustBundle(b) => {
                        c.bundle_pems
                            .insert(b.metadata.name.clone(), b.spec.pem.clone());
                        c.bundles.push(Bundle {
                            trust_domain: b.spec.trust_domain.to_string(),
                            pem: b.spec.pem,
                        })
                    }
                }
            }
        }
        c.revoked = sigil_filters::Revocations::new(&revoked);
        for w in &c.workloads {
            let target = &w.spec.spiffe_id;
            if !c.reach.contains_key(target) {
                let policies = c.policies.iter().map(|(p, _)| p);
                c.reach
                    .insert(target.clone(), Reach::compile(target, policies));
            }
        }
        Ok(c)
    }

    pub fn revocation_count(&self) -> usize {
        self.revocations.len()
    }

    /// The Workload named `name`.
    pub fn workload_named(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.metadata.name == name)
    }

    /// The Workload whose identity is `id`.
    pub fn workload_for(&self, id: &SpiffeId) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.spec.spiffe_id == *id)
    }

    /// The PEM of the TrustBundle resource `name`.
    pub fn trust_bundle_pem(&self, name: &str) -> Option<&str> {
        self.bundle_pems.get(name).map(String::as_str)
    }

    /// The longest SVID lifetime of any Workload (`DEFAULT_TTL` if there is none).
    pub fn max_svid_ttl(&self) -> std::time::Duration {
        let default = sigil_filters::issuance::DEFAULT_TTL;
        self.workloads
            .iter()
            .map(|w| w.spec.svid_ttl.unwrap_or(default))
            .max()
            .unwrap_or(default)
    }

    /// The revocations in force.
    pub fn revoked(&self) -> &sigil_filters::Revocations {
        &self.revoked
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
            let target = &w.spec.spiffe_id;
            if !self.reach.get(target).is_some_and(|r| r.admits(id)) {
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
        let children = self
            .workloads
            .iter()
            .filter_map(|w| {
                let s = w.spec.workload_api.as_ref()?;
                (s.sidecar == *id).then(|| Child {
                    workload: w.metadata.name.clone(),
                    spiffe_id: w.spec.spiffe_id.to_string(),
                    uid: s.uid,
                    gid: s.gid,
                    path: s
                        .path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                })
            })
            .collect();
        Snapshot {
            children,
            version: self.version,
            policies,
            revocations: self.revocations.clone(),
            registry,
            bundles: self.bundles.clone(),
            epoch: self.epoch.clone(),
        }
    }
}

/// What the sidecar of one workload would admit, asked the way the registry needs it: does
/// `PolicyIndex` allow the caller some request or connection, at some instant? A yes means
/// the caller gets the workload's addresses.
///
/// `PolicyIndex` decides one request at one instant, so this asks it about one
/// representative of each rule (`Probe`), at every instant where a decision can change:
/// before any expiry, and at each `expiresAt` of the policies. The registry then depends on
/// the stored resources alone, not on the clock of the replica that built it: one store
/// version is one content on every replica. An allow that has expired still counts (its
/// workload's sidecar refuses the call anyway; the registry only says where to dial), and a
/// deny stops hiding the address once it has expired.
struct Reach {
    index: PolicyIndex,
    probes: Vec<Probe>,
    /// Unix seconds, sorted: `i64::MIN` (nothing expired) and every expiry.
    instants: Vec<i64>,
}

/// One representative request or connection, chosen to match its rule and as few others as
/// possible, so that only a rule that covers it too (a deny of the same caller) can refuse
/// it.
enum Probe {
    /// A connection to a TCP port, or to a port no policy declares (open unless an
    /// enforce-mode policy targets the workload).
    Tcp(u16),
    Http {
        port: u16,
        method: String,
        host: String,
        path: String,
        /// (lowercase name, value)
        headers: Vec<(String, String)>,
    },
}

/// A method no route lists: a route that names methods does not match it, one that names
/// none does.
const ANY_METHOD: &str = "SIGIL-PROBE";
/// A path segment no route spells out, for a path below a prefix and a template placeholder.
const ANY_SEGMENT: &str = "sigil-probe";

impl Reach {
    /// From the policies that target `target` (others are skipped, as the sidecar does).
    fn compile<'p>(target: &SpiffeId, policies: impl Iterator<Item = &'p Policy> + Clone) -> Self {
        let ours = policies.filter(|p| p.spec.target == *target);
        let index = PolicyIndex::compile(ours.clone(), target);
        let mut tcp = BTreeSet::new();
        let mut probes = Vec::new();
        let mut instants = BTreeSet::from([i64::MIN]);
        for p in ours {
            instants.extend(p.spec.expires_at.map(|t| t.0));
            for port in &p.spec.ports {
                let port = &port.value;
                let routes = port
                    .routes
                    .iter()
                    .map(|r| (&r.value.matches, r.value.expires_at));
                let rules = port.rules.iter().map(|r| r.value.expires_at);
                instants.extend(routes.clone().filter_map(|(_, e)| e.map(|t| t.0)));
                instants.extend(rules.filter_map(|e| e.map(|t| t.0)));
                // A port some policy declares http is http for every policy (the index's
                // rule): TCP rules on it decide nothing.
                if index.is_http(port.port) {
                    for (m, _) in routes {
                        http_probes(port.port, m, &mut probes);
                    }
                } else {
                    tcp.insert(port.port);
                }
            }
        }
        // A port no policy declares: what the index says there is its default, open when no
        // enforce-mode policy targets the workload (none, or only dry-run ones).
        if let Some(free) = (1..=u16::MAX).find(|p| !tcp.contains(p) && !index.is_http(*p)) {
            tcp.insert(free);
        }
        probes.extend(tcp.into_iter().map(Probe::Tcp));
        Self {
            index,
            probes,
            instants: instants.into_iter().collect(),
        }
    }

    fn admits(&self, caller: &SpiffeId) -> bool {
        self.instants.iter().any(|&now| {
            self.probes.iter().any(|probe| match probe {
                Probe::Tcp(port) => self.index.decide_tcp(caller, *port, now).allowed,
                Probe::Http {
                    port,
                    method,
                    host,
                    path,
                    headers,
                } => {
                    self.index
                        .decide_http(&HttpRequest {
                            peer: caller,
                            port: *port,
                            method,
                            host,
                            path,
                            header: |name: &str| {
                                headers
                                    .iter()
                                    .find(|(n, _)| n == name)
                                    .map(|(_, v)| v.as_str())
                            },
                            now,
                        })
                        .allowed
                }
            })
        })
    }
}

/// The requests that represent route match `m` on `port`: each of its methods (or one no
/// route names), each of its hosts (or none), its path (a prefix also with a segment below
/// it, where an exact deny of the prefix itself does not reach; a template with its
/// placeholders filled), and exactly its headers.
fn http_probes(port: u16, m: &RouteMatch, out: &mut Vec<Probe>) {
    let fill = |t: &str| {
        t.split('/')
            .map(|seg| {
                if seg.starts_with('{') && seg.ends_with('}') {
                    ANY_SEGMENT
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let below = |p: &str| format!("{}/{ANY_SEGMENT}", p.trim_end_matches('/'));
    let paths = match &m.path {
        None => vec!["/".to_string(), below("/")],
        Some(PathMatch::Exact(p)) => vec![p.clone()],
        Some(PathMatch::Prefix(p)) => vec![p.clone(), below(p)],
        Some(PathMatch::Template(t)) => vec![fill(t)],
    };
    let methods: Vec<String> = if m.methods.is_empty() {
        vec![ANY_METHOD.into()]
    } else {
        m.methods.iter().map(|x| x.to_ascii_uppercase()).collect()
    };
    let hosts = if m.hosts.is_empty() {
        vec![String::new()]
    } else {
        m.hosts.clone()
    };
    let headers: Vec<(String, String)> = m
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
        .collect();
    for method in &methods {
        for host in &hosts {
            for path in &paths {
                out.push(Probe::Http {
                    port,
                    method: method.clone(),
                    host: host.clone(),
                    path: path.clone(),
                    headers: headers.clone(),
                });
            }
        }
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

    /// The catalog of `docs`, stored in a fresh SQLite store in a directory named by `tag`.
    fn catalog_of(tag: &str, docs: &str) -> (Catalog, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sigil-snapshot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::Sqlite(crate::sqlite::Sqlite::open(&dir).unwrap());
        let docs = Resource::parse_docs(Path::new("t.yaml"), docs).unwrap();
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
        let (c, dir) = catalog_of("basic", DOCS);
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

    const WEB: &str = "spiffe://example.org/web";
    const BATCH: &str = "spiffe://example.org/batch/etl";
    const OTHER: &str = "spiffe://example.org/other";
    const SELF: &str = "spiffe://example.org/self";

    /// One workload per case where "a policy names the caller in an allow" and
    /// `PolicyIndex` part ways, or where a representative request is easy to get wrong.
    fn cases() -> String {
        let workload = |name: &str, ip: u8| {
            format!(
                "apiVersion: sigil.dev/v1\nkind: Workload\nmetadata: {{name: {name}, owner: o, purpose: test}}\n\
                 spec: {{spiffeId: spiffe://example.org/{name}, environment: prod, addresses: [10.0.0.{ip}]}}\n---\n"
            )
        };
        let policy = |name: &str, target: &str, spec: &str| {
            format!(
                "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: {name}, owner: o, purpose: test}}\n\
                 spec:\n  target: spiffe://example.org/{target}\n{spec}---\n"
            )
        };
        let mut docs = String::new();
        for (i, name) in [
            "open",
            "db",
            "orders",
            "denied",
            "dry",
            "dryrule",
            "self",
            "expired",
            "unblocked",
            "narrow",
            "mixed",
        ]
        .iter()
        .enumerate()
        {
            docs += &workload(name, i as u8 + 1);
        }
        docs += &policy("db", "db", "  ports: [{port: 5432, protocol: tcp, rules: [{name: etl, allow: [\"spiffe://example.org/batch/*\"]}]}]\n");
        docs += &policy("orders", "orders", &format!("  ports: [{{port: 8080, routes: [{{name: read, match: {{methods: [get], hosts: [orders.internal], path: {{prefix: /orders}}, headers: [{{name: X-Tenant, value: acme}}]}}, allow: [{WEB}]}}]}}]\n"));
        // Deny wins over an allow of the same rule.
        docs += &policy("denied", "denied", &format!("  ports: [{{port: 80, routes: [{{name: all, allow: [{WEB}, {BATCH}], deny: [{WEB}]}}]}}]\n"));
        // Only dry-run policies: nothing is enforced, everyone is admitted.
        docs += &policy("dry", "dry", &format!("  mode: dry-run\n  ports: [{{port: 80, routes: [{{name: all, allow: [{WEB}]}}]}}]\n"));
        // A dry-run rule allows nobody.
        docs += &policy("dryrule", "dryrule", &format!("  ports: [{{port: 80, routes: [{{name: all, allow: [{WEB}]}}, {{name: beta, match: {{path: {{prefix: /beta}}}}, allow: [{OTHER}], mode: dry-run}}]}}]\n"));
        // A workload is not its own caller unless a policy says so.
        docs += &policy(
            "self",
            "self",
            &format!("  ports: [{{port: 80, routes: [{{name: all, allow: [{WEB}]}}]}}]\n"),
        );
        // An expired allow, and a deny that expires: each admits at some instant.
        docs += &policy("expired", "expired", &format!("  ports: [{{port: 80, routes: [{{name: promo, allow: [{OTHER}], expiresAt: 2020-01-01T00:00:00Z}}]}}]\n"));
        docs += &policy("unblocked", "unblocked", &format!("  ports: [{{port: 80, routes: [{{name: all, allow: [{BATCH}]}}, {{name: block, match: {{path: {{prefix: /x}}}}, deny: [{BATCH}], expiresAt: 2020-01-01T00:00:00Z}}]}}]\n"));
        // An exact deny of the prefix itself leaves the paths below it open.
        docs += &policy("narrow", "narrow", &format!("  ports: [{{port: 80, routes: [{{name: api, match: {{path: {{prefix: /api}}}}, allow: [{OTHER}]}}, {{name: root, match: {{path: {{exact: /api}}}}, deny: [{OTHER}]}}]}}]\n"));
        // A port one policy declares http and another tcp is http: the TCP rule decides nothing.
        docs += &policy(
            "mixed-http",
            "mixed",
            &format!("  ports: [{{port: 9000, routes: [{{name: web, allow: [{WEB}]}}]}}]\n"),
        );
        docs += &policy("mixed-tcp", "mixed", &format!("  ports: [{{port: 9000, protocol: tcp, rules: [{{name: other, allow: [{OTHER}]}}]}}]\n"));
        docs
    }

    /// A call a client of each case's workload could make: port, and for HTTP (method, host,
    /// path, header).
    type Call = (
        u16,
        Option<(
            &'static str,
            &'static str,
            &'static str,
            Option<(&'static str, &'static str)>,
        )>,
    );

    fn calls(workload: &str) -> Vec<Call> {
        let get = |path| Some(("GET", "", path, None));
        match workload {
            "open" => vec![(80, None)],
            "db" => vec![(5432, None)],
            "orders" => vec![(
                8080,
                Some((
                    "GET",
                    "orders.internal",
                    "/orders/7",
                    Some(("x-tenant", "acme")),
                )),
            )],
            "dryrule" => vec![(80, get("/")), (80, get("/beta/1"))],
            "unblocked" => vec![(80, get("/x"))],
            "narrow" => vec![(80, get("/api")), (80, get("/api/v1"))],
            "mixed" => vec![(9000, None), (9000, get("/"))],
            _ => vec![(80, None), (80, get("/")), (80, get("/promo"))],
        }
    }

    /// Whether `PolicyIndex`, asked directly with `calls`, in 1970 or in 2096, lets `caller`
    /// reach `workload`: the answer the registry must agree with.
    fn index_admits(policies: &[Policy], workload: &str, caller: &SpiffeId) -> bool {
        let target = id(&format!("spiffe://example.org/{workload}"));
        let index = PolicyIndex::compile(policies, &target);
        [0, 4_000_000_000].into_iter().any(|now| {
            calls(workload).into_iter().any(|(port, http)| match http {
                Some((method, host, path, header)) if index.is_http(port) => {
                    index
                        .decide_http(&HttpRequest {
                            peer: caller,
                            port,
                            method,
                            host,
                            path,
                            header: |name: &str| header.filter(|(n, _)| *n == name).map(|(_, v)| v),
                            now,
                        })
                        .allowed
                }
                Some(_) => false,
                None => index.decide_tcp(caller, port, now).allowed,
            })
        })
    }

    #[test]
    fn the_registry_lists_what_the_policy_index_allows_each_caller() {
        let docs = cases();
        let (c, dir) = catalog_of("reach", &docs);
        let policies: Vec<Policy> = Resource::parse_all(Path::new("t.yaml"), &docs)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r {
                Resource::Policy(p) => Some(p),
                _ => None,
            })
            .collect();
        let listed = |caller: &str| -> Vec<String> {
            let mut names: Vec<String> = c
                .snapshot_for(&id(caller))
                .registry
                .into_iter()
                .map(|e| e.workload)
                .collect();
            names.sort();
            names
        };
        for caller in [WEB, BATCH, OTHER, SELF] {
            let mut want: Vec<String> = c
                .workloads
                .iter()
                .map(|w| w.metadata.name.clone())
                .filter(|w| index_admits(&policies, w, &id(caller)))
                .collect();
            want.sort();
            assert_eq!(listed(caller), want, "registry of {caller}");
        }
        // The cases above do exercise where "named in an allow" was the wrong question.
        assert!(!listed(WEB).contains(&"denied".to_string()));
        assert!(listed(OTHER).contains(&"dry".to_string()));
        assert!(!listed(OTHER).contains(&"dryrule".to_string()));
        assert!(!listed(SELF).contains(&"self".to_string()));
        assert!(!listed(OTHER).contains(&"mixed".to_string()));
        // ... and where a representative request is easy to get wrong.
        assert!(listed(WEB).contains(&"orders".to_string()));
        assert!(listed(OTHER).contains(&"narrow".to_string()));
        assert!(listed(OTHER).contains(&"expired".to_string()));
        assert!(listed(BATCH).contains(&"unblocked".to_string()));
        assert!(
            listed(BATCH).contains(&"db".to_string()) && !listed(WEB).contains(&"db".to_string())
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
