//! Where the policies, revocations, registry and trust bundles in force come from: the
//! watched files (`resources`, `identity`) and the snapshot the control plane pushed
//! (`Pushed`, checked here against this sidecar's own config and SVID).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::UnixTime;
use sigil_api::Snapshot;
use sigil_config::policy::Protocol;
use sigil_config::proxy_config::Destination;
use sigil_config::{ConfigError, Policy, ProxyConfig, Revocation, SpiffeId, TrustDomain};
use sigil_filters::attest::Served;
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::tls;
use sigil_filters::{LocalIdentity, SvidError, TrustBundles};

use crate::resources::FilePolicies;

pub struct Sources {
    /// The bundles of the bundle directory (the last good set).
    pub file_bundles: Arc<TrustBundles>,
    /// The bundles of the Workload API the SVID comes from (`identity.workloadApi`), each
    /// replacing its domain's bundle file.
    pub api_bundles: Option<Arc<TrustBundles>>,
    pub file_policies: FilePolicies,
    pub file_revocations: Vec<Revocation>,
    /// The snapshot from the control plane in force (received, or persisted).
    pub pushed: Option<Arc<Pushed>>,
}

/// A snapshot accepted from the control plane, parsed.
pub struct Pushed {
    /// The store whose changes `version` counts.
    pub epoch: String,
    pub version: u64,
    pub policies: Vec<Policy>,
    pub revocations: Vec<Revocation>,
    pub registry: Vec<(Destination, SpiffeId)>,
    /// TrustBundles, each replacing its domain's bundle file; None when none was pushed.
    pub bundles: Option<Arc<TrustBundles>>,
    /// The workloads this sidecar's Workload API serves.
    pub served: Vec<Served>,
    pub raw: Snapshot,
}

/// Why a pushed snapshot cannot be put in force; the text goes into the NACK.
#[derive(Debug)]
pub enum InvalidSnapshot {
    /// A policy or revocation document that does not parse, or does not fit this sidecar.
    Document(ConfigError),
    /// A registry entry with a bad address or SPIFFE ID.
    Registry { workload: String, problem: String },
    /// A trust bundle that does not parse.
    Bundle {
        trust_domain: String,
        problem: String,
    },
    /// A bundle for our own trust domain that would not verify our own SVID.
    OwnSvid {
        trust_domain: String,
        id: SpiffeId,
        why: SvidError,
    },
    /// Our SVID has no certificate (cannot happen with a loaded identity).
    NoOwnCertificate,
}

impl fmt::Display for InvalidSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Document(e) => write!(f, "{e}"),
            Self::Registry { workload, problem } => {
                write!(f, "control-plane:Workload/{workload}: {problem}")
            }
            Self::Bundle {
                trust_domain,
                problem,
            } => write!(f, "control-plane:TrustBundle for {trust_domain}: {problem}"),
            Self::OwnSvid {
                trust_domain,
                id,
                why,
            } => write!(
                f,
                "control-plane:TrustBundle for {trust_domain}: would not verify this sidecar's own SVID ({id}): {why}"
            ),
            Self::NoOwnCertificate => f.write_str("our SVID has no certificate"),
        }
    }
}

impl Pushed {
    /// Parses `s` and checks it against this sidecar's own config and SVID: what the control
    /// plane cannot know (it never sees sidecar configs) is checked here.
    pub fn parse(
        cfg: &ProxyConfig,
        s: &Snapshot,
        own: &LocalIdentity,
    ) -> Result<Self, InvalidSnapshot> {
        let mut policies = Vec::new();
        for d in &s.policies {
            let origin = PathBuf::from(format!("control-plane:Policy/{}", d.name));
            let parsed = Policy::parse_all(&origin, &d.yaml).map_err(InvalidSnapshot::Document)?;
            for p in &parsed {
                check_ports(cfg, &origin, p)?;
            }
            policies.extend(parsed);
        }
        let mut revocations = Vec::new();
        for d in &s.revocations {
            let origin = PathBuf::from(format!("control-plane:Revocation/{}", d.name));
            let parsed =
                Revocation::parse_all(&origin, &d.yaml).map_err(InvalidSnapshot::Document)?;
            revocations.extend(parsed);
        }
        let mut registry = Vec::new();
        for e in &s.registry {
            let bad = |problem: String| InvalidSnapshot::Registry {
                workload: e.workload.clone(),
                problem,
            };
            let dest = e.address.parse::<Destination>();
            let dest = dest.map_err(|err| bad(err.to_string()))?;
            let id = SpiffeId::parse(&e.spiffe_id)
                .map_err(|err| bad(format!("spiffeId {:?}: {err}", e.spiffe_id)))?;
            registry.push((dest, id));
        }
        let mut served = Vec::new();
        for c in &s.children {
            let id = SpiffeId::parse(&c.spiffe_id).map_err(|err| InvalidSnapshot::Registry {
                workload: c.workload.clone(),
                problem: format!("spiffeId {:?}: {err}", c.spiffe_id),
            })?;
            served.push(Served {
                workload: c.workload.clone(),
                id,
                uid: c.uid,
                gid: c.gid,
                path: (!c.path.is_empty()).then(|| PathBuf::from(&c.path)),
            });
        }
        let bundles = if s.bundles.is_empty() {
            None
        } else {
            Some(Arc::new(parse_bundles(s, own)?))
        };
        Ok(Self {
            epoch: s.epoch.clone(),
            version: s.version,
            policies,
            revocations,
            registry,
            bundles,
            served,
            raw: s.clone(),
        })
    }
}

/// A port this sidecar's config pins to TCP (`inbound.ports`) cannot take HTTP routes from a
/// pushed policy: the sidecar would silently start checking per request what its owner
/// declared a connection-level port.
fn check_ports(cfg: &ProxyConfig, origin: &Path, p: &Policy) -> Result<(), InvalidSnapshot> {
    for port in &p.spec.ports {
        let declared_tcp = cfg
            .spec
            .inbound
            .ports
            .iter()
            .any(|r| r.value.port == port.value.port);
        if declared_tcp && port.value.protocol == Protocol::Http {
            return Err(InvalidSnapshot::Document(ConfigError::new(
                origin,
                Some(port.referenced),
                format!(
                    "policy {:?} declares port {} http, but this sidecar's ProxyConfig declares it tcp (inbound.ports)",
                    p.metadata.name, port.value.port
                ),
            )));
        }
    }
    Ok(())
}

/// The pushed bundles. A bundle for our own trust domain that would no longer verify our own
/// SVID is refused: applying it would cut this sidecar off from its whole domain (push the new
/// CA next to the old one first, rotate the SVIDs, then drop the old CA).
fn parse_bundles(s: &Snapshot, own: &LocalIdentity) -> Result<TrustBundles, InvalidSnapshot> {
    // Several TrustBundles of one domain (the control plane's CA set and an operator's own)
    // add up.
    let mut pems: std::collections::BTreeMap<&str, String> = Default::default();
    for b in &s.bundles {
        let pem = pems.entry(b.trust_domain.as_str()).or_default();
        pem.push_str(&b.pem);
        pem.push('\n');
    }
    let mut bundles = TrustBundles::new();
    for (domain, pem) in pems {
        let bad = |problem: String| InvalidSnapshot::Bundle {
            trust_domain: domain.to_string(),
            problem,
        };
        let td = TrustDomain::parse(domain).map_err(|e| bad(e.to_string()))?;
        bundles
            .insert_pem(&td, pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
    }
    let own_td = own.id().trust_domain_name();
    if bundles.get(own_td).is_some() {
        let provider = tls::provider();
        let (leaf, rest) = own
            .chain()
            .split_first()
            .ok_or(InvalidSnapshot::NoOwnCertificate)?;
        verify_svid(
            &bundles,
            &provider.signature_verification_algorithms,
            leaf,
            rest,
            UnixTime::now(),
            Usage::Client,
        )
        .map_err(|why| InvalidSnapshot::OwnSvid {
            trust_domain: own_td.to_string(),
            id: own.id().clone(),
            why,
        })?;
    }
    Ok(bundles)
}
