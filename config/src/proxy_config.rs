//! `kind: ProxyConfig`: everything one `sigil-proxy` needs to start.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::spiffe::{IdPattern, SpiffeId};
use crate::yaml::{self, ConfigError};

pub const API_VERSION: &str = "sigil.dev/v1";

/// `metadata` of every resource. Policies (later) require owner and purpose; a proxy's
/// config may omit them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
}

impl Metadata {
    /// `owner` or `purpose` when that field is missing or blank: resources that grant access
    /// or stand for an identity must say who answers for them and why they exist.
    pub fn missing_owner_or_purpose(&self) -> Option<&'static str> {
        [("owner", &self.owner), ("purpose", &self.purpose)]
            .into_iter()
            .find(|(_, v)| !matches!(v.as_deref(), Some(s) if !s.trim().is_empty()))
            .map(|(field, _)| field)
    }
}

/// The Kubernetes-shaped wrapper of every resource.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Envelope<S> {
    pub(crate) api_version: Spanned<String>,
    pub(crate) kind: Spanned<String>,
    pub(crate) metadata: Spanned<Metadata>,
    pub(crate) spec: S,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyConfig {
    pub metadata: Metadata,
    pub spec: ProxySpec,
    /// Directory of the config file; relative paths in it are resolved against this.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxySpec {
    pub identity: IdentitySpec,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub inbound: InboundSpec,
    #[serde(default)]
    pub outbound: OutboundSpec,
    #[serde(default)]
    pub admin: AdminSpec,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Threads that serve connections, each with its own pooled connections (like Envoy's
    /// `--concurrency`). Default: the CPU cores available to the process.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Directory of `Policy` YAML files (`*.yaml`, several documents each). Re-read when it
    /// changes; an invalid file never replaces the last good set.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Directory of `Revocation` YAML files, re-read like `policyDir`. (The control plane
    /// pushes revocations too; this is the static source.)
    #[serde(default)]
    pub revocation_dir: Option<PathBuf>,
    /// Where pushed policies, registry entries and revocations come from. They add to the
    /// static sources above, which keep working.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneSpec>,
    /// Serve the SPIFFE Workload API to local processes (needs `controlPlane`, which issues
    /// their SVIDs and names them: Workloads with `workloadApi.sidecar` set to this sidecar).
    #[serde(default)]
    pub workload_api: Option<WorkloadApiServe>,
    /// The connection-level audit stream to the control plane (needs `controlPlane`).
    #[serde(default)]
    pub audit: Option<AuditSpec>,
}

/// `audit`: records of every connection and refusal, spooled on disk until the control plane
/// holds them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditSpec {
    /// Where records wait for the control plane.
    pub spool_dir: PathBuf,
    /// The spool's size at most, in bytes (256 MiB by default).
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
    /// When the spool is full: `fail-open` (serve on, drop the oldest records, counted) or
    /// `fail-closed` (refuse new connections until records can be kept).
    #[serde(default)]
    pub when_full: WhenFull,
    /// Which HTTP requests get a record of their own: `denied` (the default; allowed ones
    /// are counted by route in their connection's close record) or `all`.
    #[serde(default)]
    pub requests: AuditRequests,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditRequests {
    #[default]
    Denied,
    All,
}

fn default_spool_bytes() -> u64 {
    256 << 20
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    #[default]
    FailOpen,
    FailClosed,
}

/// `workloadApi`: where the sidecar serves the SPIFFE Workload API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadApiServe {
    /// The Unix socket (made by the sidecar, mode 0666: callers are told apart by their peer
    /// credentials, not by who may open it).
    pub socket: PathBuf,
}

/// The control plane's sidecar API (gRPC over mutual TLS).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlPlaneSpec {
    /// `ip:port` of `sigil-control`'s sidecar API (15012).
    pub address: SocketAddr,
    /// The control plane's SPIFFE ID: its certificate must carry exactly this ID.
    pub spiffe_id: SpiffeId,
    /// Where the last accepted snapshot is kept, so that the sidecar serves it after a
    /// restart while the control plane is unreachable.
    pub state_dir: PathBuf,
}

/// Where the SVID and trust bundles live on disk. Files are re-read when they change.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentitySpec {
    /// The SVID chain and its key, from files someone else keeps fresh. Both, or neither
    /// and `joinTokenFile`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The control plane issues the SVID: the sidecar makes its own key, sends a CSR with
    /// the one-time join token this file holds (`sigil token create`), renews with its SVID,
    /// and keeps both in `controlPlane.stateDir` (the key mode 0600).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The SVID and bundles come from a SPIFFE Workload API (a SPIRE agent, another Sigil
    /// sidecar's `workloadApi`): `unix:///path/to/socket`. Its bundles replace, per trust
    /// domain, those of `bundleDir`, which may then be empty.
    #[serde(default)]
    pub workload_api: Option<String>,
    /// One PEM file per trust domain, named `<trust domain>.pem`.
    pub bundle_dir: PathBuf,
    /// If set, the SVID must carry exactly this ID; a file with another is refused.
    /// Unset, the sidecar's identity is pinned to the ID of the first SVID it loads.
    #[serde(default)]
    pub spiffe_id: Option<SpiffeId>,
    /// Lets a rotation switch the sidecar to another SPIFFE ID (the policies targeting the
    /// new ID then apply). Off by default: replacing the SVID files with another identity's
    /// valid SVID must not move the sidecar's workload out from under its policies.
    #[serde(default)]
    pub allow_identity_change: bool,
}

/// Where a sidecar's SVID comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSource {
    /// Files, re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
    /// The control plane, first with the join token of this file.
    Issued { join_token_file: PathBuf },
    /// A SPIFFE Workload API on this Unix socket.
    WorkloadApi { socket: PathBuf },
}

/// The socket of a Workload API address (`unix:///path` or `unix:/path`), or why not.
pub fn workload_api_socket(address: &str) -> Result<PathBuf, &'static str> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .ok_or("a Workload API address is unix:///path/to/socket")?;
    if !path.starts_with('/') {
        return Err("a Workload API address is unix:///path/to/socket, with an absolute path");
    }
    Ok(PathBuf::from(path))
}

impl IdentitySpec {
    /// Where the SVID comes from (the config was validated: exactly one source is set).
    pub fn source(&self) -> SvidSource {
        if let Some(Ok(socket)) = self.workload_api.as_deref().map(workload_api_socket) {
            return SvidSource::WorkloadApi { socket };
        }
        match (&self.cert_file, &self.key_file, &self.join_token_file) {
            (Some(cert), Some(key), None) => SvidSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (_, _, Some(token)) => SvidSource::Issued {
                join_token_file: token.clone(),
            },
            // `validate` refuses every other combination.
            _ => SvidSource::Files {
                cert: self.cert_file.clone().unwrap_or_default(),
                key: self.key_file.clone().unwrap_or_default(),
            },
        }
    }
}

/// `transparent`: the 15001/15006 listeners take iptables-redirected traffic and read the
/// original destination. `explicit`: only the `explicit` listeners run (no iptables, no root).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Transparent,
    Explicit,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InboundSpec {
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    /// Authorization per workload port. Once any port is listed, unlisted ports are denied.
    #[serde(default)]
    pub ports: Vec<Spanned<PortRule>>,
    #[serde(default)]
    pub explicit: Vec<Spanned<ExplicitInbound>>,
    /// Ports never sniffed for HTTP (server-first protocols such as MySQL or SMTP would
    /// otherwise wait out the detection timeout). Ports a policy declares skip detection too.
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
}

impl Default for InboundSpec {
    fn default() -> Self {
        Self {
            listen: default_inbound_listen(),
            ports: Vec::new(),
            explicit: Vec::new(),
            opaque_ports: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortRule {
    pub port: u16,
    /// Exact SPIFFE IDs or prefix patterns (`spiffe://td/ns/prod/*`). Empty: nobody.
    pub allow: Vec<IdPattern>,
}

/// A listener that stands for one workload port without iptables: connections to `listen`
/// are treated as if they were redirected from `port`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExplicitInbound {
    pub listen: SocketAddr,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestination {
    /// Plain TCP to destinations outside the mesh registry (the workload's own choice).
    #[default]
    Passthrough,
    Deny,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboundSpec {
    #[serde(default = "default_outbound_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub unknown_destination: UnknownDestination,
    #[serde(default)]
    pub registry: Vec<Spanned<RegistryEntry>>,
    #[serde(default)]
    pub explicit: Vec<Spanned<ExplicitOutbound>>,
    /// Destination ports never sniffed for HTTP: their bytes go over a connection of their
    /// own. Server-first protocols (MySQL, SMTP) belong here, or they wait out the
    /// detection timeout before the first byte is relayed.
    #[serde(default)]
    pub opaque_ports: Vec<u16>,
}

impl Default for OutboundSpec {
    fn default() -> Self {
        Self {
            listen: default_outbound_listen(),
            unknown_destination: UnknownDestination::default(),
            registry: Vec::new(),
            explicit: Vec::new(),
            opaque_ports: Vec::new(),
        }
    }
}

/// A mesh destination: `address` is `ip:port` or a bare `ip` (every port).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegistryEntry {
    pub address: Destination,
    pub spiffe_id: SpiffeId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Socket(SocketAddr),
    Host(IpAddr),
}

impl std::str::FromStr for Destination {
    type Err = String;

    /// `ip:port`, or a bare `ip` for every port.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self::Socket(sa));
        }
        s.parse::<IpAddr>().map(Self::Host).map_err(|_| {
            format!("invalid address {s:?}: expected ip:port or ip ([v6]:port for IPv6)")
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(a) => a.fmt(f),
            Self::Host(a) => a.fmt(f),
        }
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Connections to `listen` go over mTLS to `upstream`, which must present `expectedId`;
/// without one, the ID the registry (static or pushed) holds for `upstream`, looked up per
/// connection, so a pushed registry change applies to the next connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExplicitOutbound {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    #[serde(default)]
    pub expected_id: Option<SpiffeId>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AdminSpec {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Longest a peer may take to complete the TLS handshake.
    #[serde(default = "default_handshake", with = "duration")]
    pub handshake: Duration,
    #[serde(default = "default_connect", with = "duration")]
    pub connect: Duration,
    /// On SIGTERM, how long live connections may take to finish before they are cut.
    #[serde(default = "default_drain", with = "duration")]
    pub drain: Duration,
    /// How long to wait for a client's first bytes to tell HTTP from opaque TCP.
    #[serde(default = "default_detect", with = "duration")]
    pub detect: Duration,
    /// A pooled connection to a peer sidecar that no request has used for this long is let
    /// go: it closes once the streams still on it end.
    #[serde(default = "default_pool_idle", with = "duration")]
    pub pool_idle: Duration,
    /// How long an HTTP request may wait for the workload's response head; then the sidecar
    /// answers 504 (gRPC: DEADLINE_EXCEEDED) and lets go of the request. The calling side
    /// waits this long plus 5 s for its peer sidecar.
    #[serde(default = "default_request", with = "duration")]
    pub request: Duration,
    /// A relayed (L4) connection on which no byte moves either way for this long is closed.
    #[serde(default = "default_idle", with = "duration")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: default_handshake(),
            connect: default_connect(),
            drain: default_drain(),
            detect: default_detect(),
            pool_idle: default_pool_idle(),
            request: default_request(),
            idle: default_idle(),
        }
    }
}

/// Bounds that keep one client from taking what every other one needs. Each refusal is
/// counted in `sigil_connections_refused_total` with its reason.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Connections open at once, inbound and outbound. Default: two descriptors each within
    /// the descriptor limit (raised to its hard maximum at start), after `fdReserve`.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Inbound connections open at once from one source address.
    #[serde(default = "default_per_source")]
    pub max_connections_per_source: u32,
    /// Inbound TLS handshakes under way at once.
    #[serde(default = "default_handshakes")]
    pub max_pending_handshakes: u32,
    /// Inbound TLS handshakes under way at once from one source address.
    #[serde(default = "default_handshakes_per_source")]
    pub max_pending_handshakes_per_source: u32,
    /// Descriptors kept free of client connections, for the sidecar's own: its workload, its
    /// pools, the control plane, files.
    #[serde(default = "default_fd_reserve")]
    pub fd_reserve: u32,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_connections: None,
            max_connections_per_source: default_per_source(),
            max_pending_handshakes: default_handshakes(),
            max_pending_handshakes_per_source: default_handshakes_per_source(),
            fd_reserve: default_fd_reserve(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Distinct peer_id label values kept; further peers are counted as `overflow`.
    #[serde(default = "default_peer_id_cap")]
    pub peer_id_cap: usize,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            peer_id_cap: default_peer_id_cap(),
        }
    }
}

fn default_inbound_listen() -> SocketAddr {
    "0.0.0.0:15006".parse().expect("literal")
}
fn default_outbound_listen() -> SocketAddr {
    // Never on a routable address: anyone reaching it could speak with this workload's identity.
    "127.0.0.1:15001".parse().expect("literal")
}
fn default_admin_listen() -> SocketAddr {
    "0.0.0.0:15000".parse().expect("literal")
}
fn default_handshake() -> Duration {
    Duration::from_secs(5)
}
fn default_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_detect() -> Duration {
    Duration::from_secs(1)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_request() -> Duration {
    Duration::from_secs(30)
}
fn default_idle() -> Duration {
    Duration::from_secs(3600)
}
fn default_per_source() -> u32 {
    1024
}
fn default_handshakes() -> u32 {
    1024
}
fn default_handshakes_per_source() -> u32 {
    64
}
fn default_fd_reserve() -> u32 {
    256
}
fn default_peer_id_cap() -> usize {
    200
}

/// Durations as `250ms`, `5s`, `2m`, `1h`, `90d`.
pub mod duration {
    use std::time::Duration;

    /// A whole number of milliseconds, seconds, minutes, hours or days. A value past what
    /// `Duration` holds in whole seconds (u64) is refused, never wrapped.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        if num.is_empty() {
            return Err(format!(
                "invalid duration {s:?}: expected a number and a unit, e.g. 500ms, 5s, 2m, 1h, 7d"
            ));
        }
        if !matches!(unit, "ms" | "s" | "m" | "h" | "d") {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m, h or d"
            ));
        }
        let too_large = || format!("invalid duration {s:?}: too large");
        // `num` is all ASCII digits, so parsing fails only past u64.
        let n: u64 = num.parse().map_err(|_| too_large())?;
        Ok(match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_large)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_large)?),
            _ => Duration::from_secs(n.checked_mul(86_400).ok_or_else(too_large)?),
        })
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }
}

impl ProxyConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = yaml::read_file(path)?;
        Self::parse(path, &text)
    }

    /// `path` names the source in errors and anchors relative file paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let doc: Spanned<Option<Envelope<ProxySpec>>> = yaml::parse(path, text)?;
        let Some(env) = doc.value else {
            return Err(ConfigError::new(
                path,
                Some(doc.referenced),
                "document is empty or null; expected a ProxyConfig (apiVersion, kind, metadata, spec)",
            ));
        };
        check_envelope(path, &env, "ProxyConfig")?;
        let cfg = ProxyConfig {
            metadata: env.metadata.value,
            spec: env.spec,
            base_dir: path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        cfg.validate(path, text)?;
        Ok(cfg)
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// `text` is only read again, for the line of a key, when a check of the whole spec fails.
    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        self.check_ports(path)?;
        self.check_listeners(path, text)?;
        self.check_registry(path)?;
        self.check_whole_spec(path, text)
    }

    /// Each inbound port listed once, and a port.
    fn check_ports(&self, path: &Path) -> Result<(), ConfigError> {
        let mut ports = HashMap::new();
        for rule in &self.spec.inbound.ports {
            if rule.value.port == 0 {
                return Err(at(path, rule, "port 0 is not a port"));
            }
            if let Some(first) = ports.insert(rule.value.port, rule.referenced.line()) {
                return Err(at(
                    path,
                    rule,
                    format!(
                        "port {} is already listed at line {first}; merge the allow lists",
                        rule.value.port
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One listener per address: the fixed ones first (admin; inbound and outbound in
    /// transparent mode), then the explicit ones.
    fn check_listeners(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let spec = &self.spec;
        let mut fixed = vec![(Key::AdminListen, spec.admin.listen)];
        if spec.mode == Mode::Transparent {
            fixed.push((Key::InboundListen, spec.inbound.listen));
            fixed.push((Key::OutboundListen, spec.outbound.listen));
        }
        for (i, &(key, addr)) in fixed.iter().enumerate() {
            if let Some(&(first, _)) = fixed[..i].iter().find(|(_, a)| *a == addr) {
                let lines = KeyLines::read(path, text);
                // Report it at a key the file sets: they cannot both be defaults.
                let (this, other) = match lines.at(key) {
                    Some(_) => (key, first),
                    None => (first, key),
                };
                return Err(ConfigError::new(
                    path,
                    lines.at(this),
                    format!(
                        "{} {addr} is also {}; each listener needs an address of its own",
                        this.name(),
                        lines.describe(other)
                    ),
                ));
            }
        }
        let mut claimed: HashMap<SocketAddr, Claim> = fixed
            .iter()
            .map(|&(key, addr)| (addr, Claim::Fixed(key)))
            .collect();
        let inbound = spec.inbound.explicit.iter();
        let outbound = spec.outbound.explicit.iter();
        let explicit = inbound
            .map(|l| (l.value.listen, "an inbound.explicit listener", l.referenced))
            .chain(outbound.map(|l| {
                (
                    l.value.listen,
                    "an outbound.explicit listener",
                    l.referenced,
                )
            }));
        for (addr, what, loc) in explicit {
            if let Some(other) = claimed.insert(addr, Claim::Explicit(what, loc.line())) {
                let other = match other {
                    Claim::Fixed(key) => KeyLines::read(path, text).describe(key),
                    Claim::Explicit(what, line) => format!("{what} (line {line})"),
                };
                return Err(ConfigError::new(
                    path,
                    Some(loc),
                    format!(
                        "listen {addr} is also {other}; each listener needs an address of its own"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Each registry address registered once.
    fn check_registry(&self, path: &Path) -> Result<(), ConfigError> {
        let mut dests = HashMap::new();
        for e in &self.spec.outbound.registry {
            if let Some(first) = dests.insert(e.value.address, e.referenced.line()) {
                return Err(at(
                    path,
                    e,
                    format!("this address is already registered at line {first}"),
                ));
            }
        }
        Ok(())
    }

    /// Where the SVID comes from: one source, and what that source needs.
    fn check_identity(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let spec = &self.spec;
        let refuse = |key: Key, message: &str| refusal(path, text, key, message);
        if spec.identity.allow_identity_change {
            if let Some(id) = &spec.identity.spiffe_id {
                let lines = KeyLines::read(path, text);
                let id_line = lines
                    .at(Key::SpiffeId)
                    .map(|at| format!(" (line {})", at.line()))
                    .unwrap_or_default();
                return Err(ConfigError::new(
                    path,
                    lines.at(Key::AllowIdentityChange),
                    format!(
                        "identity.allowIdentityChange: true contradicts identity.spiffeId \
                         {id}{id_line}, which pins the identity; remove one of them"
                    ),
                ));
            }
        }
        let id = &spec.identity;
        if let Some(address) = &id.workload_api {
            if id.cert_file.is_some() || id.key_file.is_some() || id.join_token_file.is_some() {
                return refuse(
                    Key::WorkloadApiClient,
                    "identity.workloadApi excludes certFile, keyFile and joinTokenFile: the SVID comes from one source",
                );
            }
            if let Err(why) = workload_api_socket(address) {
                return refuse(
                    Key::WorkloadApiClient,
                    &format!("identity.workloadApi {address:?}: {why}"),
                );
            }
        }
        let svid_files = (&id.cert_file, &id.key_file, &id.join_token_file);
        match svid_files {
            _ if id.workload_api.is_some() => {}
            (Some(_), Some(_), None) => {}
            (None, None, Some(_)) if spec.control_plane.is_none() => {
                return refuse(
                    Key::JoinTokenFile,
                    "identity.joinTokenFile needs controlPlane: the control plane issues the SVID",
                );
            }
            (None, None, Some(_)) => {}
            (_, _, Some(_)) => {
                return refuse(
                    Key::JoinTokenFile,
                    "identity.joinTokenFile and identity.certFile/keyFile exclude each other: the SVID comes from the control plane or from files",
                );
            }
            _ => {
                return refuse(
                    Key::Identity,
                    "identity needs certFile and keyFile (an SVID kept by someone else), joinTokenFile (the control plane issues it), or workloadApi (a SPIFFE Workload API hands it out)",
                );
            }
        }
        Ok(())
    }

    /// The checks of the whole spec: each names the key it is about, found in the text.
    fn check_whole_spec(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let spec = &self.spec;
        let refuse = |key: Key, message: &str| refusal(path, text, key, message);
        if spec.mode == Mode::Explicit
            && spec.inbound.explicit.is_empty()
            && spec.outbound.explicit.is_empty()
        {
            return refuse(
                Key::Mode,
                "mode is explicit but no inbound.explicit or outbound.explicit listener is set",
            );
        }
        self.check_identity(path, text)?;
        if spec.audit.is_some() && spec.control_plane.is_none() {
            return refuse(
                Key::Audit,
                "audit needs controlPlane: the records are shipped to it",
            );
        }
        if spec.audit.as_ref().is_some_and(|a| a.max_bytes < 1 << 20) {
            return refuse(
                Key::Audit,
                "audit.maxBytes must be 1 MiB (1048576) at least",
            );
        }
        if spec.workload_api.is_some() && spec.control_plane.is_none() {
            return refuse(
                Key::WorkloadApi,
                "workloadApi needs controlPlane: it names the workloads served and issues their SVIDs",
            );
        }
        if spec.workers == Some(0) {
            return refuse(Key::Workers, "workers must be at least 1");
        }
        if spec.timeouts.pool_idle.is_zero() {
            return refuse(
                Key::PoolIdle,
                "timeouts.poolIdle must be longer than 0 (every burst would dial afresh)",
            );
        }
        if spec.metrics.peer_id_cap == 0 {
            return refuse(Key::PeerIdCap, "metrics.peerIdCap must be at least 1");
        }
        for (key, d) in [
            (Key::Request, spec.timeouts.request),
            (Key::Idle, spec.timeouts.idle),
        ] {
            if d.is_zero() {
                return refuse(key, &format!("{} must be longer than 0", key.name()));
            }
        }
        let l = &spec.limits;
        for (key, v) in [
            (Key::MaxConnections, l.max_connections.unwrap_or(1)),
            (Key::MaxConnectionsPerSource, l.max_connections_per_source),
            (Key::MaxPendingHandshakes, l.max_pending_handshakes),
            (
                Key::MaxPendingHandshakesPerSource,
                l.max_pending_handshakes_per_source,
            ),
        ] {
            if v == 0 {
                return refuse(
                    key,
                    &format!(
                        "{} must be at least 1 (0 would refuse every connection)",
                        key.name()
                    ),
                );
            }
        }
        Ok(())
    }
}

/// A whole-spec check's refusal, at the line of `key` in the text.
fn refusal(path: &Path, text: &str, key: Key, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::new(
        path,
        KeyLines::read(path, text).at(key),
        message,
    ))
}

/// Who holds an address, for the message when another listener wants it too.
enum Claim {
    Fixed(Key),
    /// What the listener is, and its line.
    Explicit(&'static str, u64),
}

/// A key of the spec that a check of the whole spec can refuse.
#[derive(Clone, Copy)]
enum Key {
    Mode,
    Identity,
    JoinTokenFile,
    Workers,
    PoolIdle,
    PeerIdCap,
    AllowIdentityChange,
    SpiffeId,
    AdminListen,
    InboundListen,
    OutboundListen,
    Request,
    Idle,
    MaxConnections,
    MaxConnectionsPerSource,
    MaxPendingHandshakes,
    MaxPendingHandshakesPerSource,
    WorkloadApi,
    WorkloadApiClient,
    Audit,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Mode => "mode",
            Key::Identity => "identity",
            Key::JoinTokenFile => "identity.joinTokenFile",
            Key::WorkloadApi => "workloadApi",
            Key::Audit => "audit",
            Key::WorkloadApiClient => "identity.workloadApi",
            Key::Workers => "workers",
            Key::PoolIdle => "timeouts.poolIdle",
            Key::PeerIdCap => "metrics.peerIdCap",
            Key::AllowIdentityChange => "identity.allowIdentityChange",
            Key::SpiffeId => "identity.spiffeId",
            Key::AdminListen => "admin.listen",
            Key::InboundListen => "inbound.listen",
            Key::OutboundListen => "outbound.listen",
            Key::Request => "timeouts.request",
            Key::Idle => "timeouts.idle",
            Key::MaxConnections => "limits.maxConnections",
            Key::MaxConnectionsPerSource => "limits.maxConnectionsPerSource",
            Key::MaxPendingHandshakes => "limits.maxPendingHandshakes",
            Key::MaxPendingHandshakesPerSource => "limits.maxPendingHandshakesPerSource",
        }
    }
}

/// Where the keys that `Key` names sit in a ProxyConfig file. The public types hold plain
/// values (sigil-proxy and sigil-control read them), and serde-saphyr gives a position only
/// to `Spanned` fields; so a failed check of the whole spec reads the text once more, for
/// these keys alone, ignoring everything else (it parsed before, so this parses too).
#[derive(Default, Deserialize)]
#[serde(default)]
struct KeyLines {
    spec: SpecLines,
}

type Line = Option<Spanned<IgnoredAny>>;

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct SpecLines {
    mode: Line,
    workload_api: Line,
    audit: Line,
    workers: Line,
    identity: Option<Spanned<IdentityLines>>,
    inbound: ListenLine,
    outbound: ListenLine,
    admin: ListenLine,
    timeouts: TimeoutLines,
    metrics: MetricsLines,
    limits: LimitLines,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct LimitLines {
    max_connections: Line,
    max_connections_per_source: Line,
    max_pending_handshakes: Line,
    max_pending_handshakes_per_source: Line,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct IdentityLines {
    spiffe_id: Line,
    allow_identity_change: Line,
    join_token_file: Line,
    workload_api: Line,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct ListenLine {
    listen: Line,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct TimeoutLines {
    pool_idle: Line,
    request: Line,
    idle: Line,
}

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct MetricsLines {
    peer_id_cap: Line,
}

impl KeyLines {
    fn read(path: &Path, text: &str) -> Self {
        yaml::parse::<Option<KeyLines>>(path, text)
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Where the file sets `key`; None when it leaves it to its default.
    fn at(&self, key: Key) -> Option<serde_saphyr::Location> {
        let s = &self.spec;
        let no_identity = IdentityLines::default();
        let identity = s.identity.as_ref().map_or(&no_identity, |i| &i.value);
        let line = match key {
            Key::Mode => &s.mode,
            Key::Identity => return s.identity.as_ref().map(|i| i.referenced),
            Key::JoinTokenFile => &identity.join_token_file,
            Key::WorkloadApi => &s.workload_api,
            Key::Audit => &s.audit,
            Key::WorkloadApiClient => &identity.workload_api,
            Key::Workers => &s.workers,
            Key::PoolIdle => &s.timeouts.pool_idle,
            Key::PeerIdCap => &s.metrics.peer_id_cap,
            Key::AllowIdentityChange => &identity.allow_identity_change,
            Key::SpiffeId => &identity.spiffe_id,
            Key::AdminListen => &s.admin.listen,
            Key::InboundListen => &s.inbound.listen,
            Key::OutboundListen => &s.outbound.listen,
            Key::Request => &s.timeouts.request,
            Key::Idle => &s.timeouts.idle,
            Key::MaxConnections => &s.limits.max_connections,
            Key::MaxConnectionsPerSource => &s.limits.max_connections_per_source,
            Key::MaxPendingHandshakes => &s.limits.max_pending_handshakes,
            Key::MaxPendingHandshakesPerSource => &s.limits.max_pending_handshakes_per_source,
        };
        line.as_ref().map(|l| l.referenced)
    }

    /// `key` with its line, or as a default.
    fn describe(&self, key: Key) -> String {
        match self.at(key) {
            Some(at) => format!("{} (line {})", key.name(), at.line()),
            None => format!("{} (its default)", key.name()),
        }
    }
}

fn at<T>(path: &Path, s: &Spanned<T>, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(path, Some(s.referenced), msg)
}

pub(crate) fn check_envelope<S>(
    path: &Path,
    env: &Envelope<S>,
    kind: &str,
) -> Result<(), ConfigError> {
    if env.api_version.value != API_VERSION {
        return Err(at(
            path,
            &env.api_version,
            format!(
                "apiVersion is {:?}; expected {API_VERSION:?}",
                env.api_version.value
            ),
        ));
    }
    if env.kind.value != kind {
        return Err(at(
            path,
            &env.kind,
            format!("kind is {:?}; expected {kind:?}", env.kind.value),
        ));
    }
    Ok(())
}
