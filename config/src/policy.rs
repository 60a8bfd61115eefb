//! `kind: Policy`: who may call which port or HTTP route of one workload.
//!
//! Semantics (the decision core in `sigil-filters` implements them): among the rules that
//! match a connection or request, an unexpired enforced `deny` wins, then any `allow`;
//! anything else is denied once a policy targets the workload. Because evaluation does not
//! depend on order, a route can only be *shadowed* by another route that matches everything
//! it matches and denies every identity it allows; that, and two routes with the same match,
//! are load-time errors.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::proxy_config::{check_envelope, Envelope, Metadata};
use crate::spiffe::{IdPattern, SpiffeId};
use crate::yaml::{self, ConfigError};

#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub metadata: Metadata,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// The workload this policy governs.
    pub target: SpiffeId,
    #[serde(default)]
    pub mode: RuleMode,
    /// After this instant (RFC 3339, UTC) the sidecar stops honouring the whole policy.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    pub ports: Vec<Spanned<PortPolicy>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleMode {
    #[default]
    Enforce,
    /// Evaluated, logged and counted as "would deny", never enforced.
    DryRun,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortPolicy {
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// HTTP ports only.
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
    /// TCP ports only: connection-level rules.
    #[serde(default)]
    pub rules: Vec<Spanned<TcpRule>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    #[serde(default)]
    pub allow: Vec<IdPattern>,
    #[serde(default)]
    pub deny: Vec<IdPattern>,
    #[serde(default)]
    pub mode: Option<RuleMode>,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TcpRule {
    pub name: String,
    #[serde(default)]
    pub allow: Vec<IdPattern>,
    #[serde(default)]
    pub deny: Vec<IdPattern>,
    #[serde(default)]
    pub mode: Option<RuleMode>,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

/// What a route matches. Empty lists mean "any".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Exact, case-sensitive value matches; header names are case-insensitive.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

/// Paths are matched after normalization (dot segments resolved, duplicate slashes merged).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/v1/orders` matches `/v1/orders` and `/v1/orders/7`, not `/v1/ordersx`.
    Prefix(String),
    /// `{name}` stands for exactly one segment: `/v1/accounts/{id}`.
    Template(String),
}

/// An instant as Unix seconds, written in YAML as RFC 3339 UTC (`2026-12-31T00:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Parses `YYYY-MM-DDTHH:MM:SSZ` (UTC only: a policy's expiry must not depend on a zone).
    /// Every numeric field is exactly its RFC 3339 width of ASCII digits: no sign, no space.
    pub fn parse(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected RFC 3339 UTC like 2026-12-31T00:00:00Z";
        let b = s.as_bytes();
        let shape = b.len() == 20
            && b.iter().enumerate().all(|(i, &c)| match i {
                4 | 7 => c == b'-',
                10 => c == b'T',
                13 | 16 => c == b':',
                19 => c == b'Z',
                _ => c.is_ascii_digit(),
            });
        if !shape {
            return Err(format!(
                "invalid time {s:?}: {EXPECTED} (YYYY-MM-DDTHH:MM:SSZ, digits only)"
            ));
        }
        let num = |r: std::ops::Range<usize>| {
            b[r].iter()
                .fold(0i64, |n, &digit| n * 10 + i64::from(digit - b'0'))
        };
        let (y, mo, d) = (num(0..4), num(5..7), num(8..10));
        let (h, mi, se) = (num(11..13), num(14..16), num(17..19));
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let days_in = [
            31,
            if leap { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        let out_of_range = if !(1..=12).contains(&mo) {
            Some(format!("month {mo:02} does not exist"))
        } else if d < 1 || d > days_in[(mo - 1) as usize] {
            Some(format!("day {d:02} does not exist in {y:04}-{mo:02}"))
        } else if h > 23 {
            Some(format!("hour {h:02} is past 23"))
        } else if mi > 59 {
            Some(format!("minute {mi:02} is past 59"))
        } else if se > 59 {
            Some(format!("second {se:02} is past 59"))
        } else {
            None
        };
        if let Some(why) = out_of_range {
            return Err(format!("invalid time {s:?}: {why}; {EXPECTED}"));
        }
        Ok(Self(
            days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se,
        ))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// RFC 3339 UTC, the form `parse` reads.
impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Howard Hinnant's civil_from_days.
        let (days, secs) = (self.0.div_euclid(86_400), self.0.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    }
}

impl PathMatch {
    fn text(&self) -> &str {
        match self {
            Self::Exact(p) | Self::Prefix(p) | Self::Template(p) => p,
        }
    }

    fn check(&self) -> Result<(), String> {
        let p = self.text();
        if !p.starts_with('/') {
            return Err(format!("path {p:?} must start with '/'"));
        }
        if p.contains("//") || p.split('/').any(|s| s == "." || s == "..") {
            return Err(format!(
                "path {p:?} is not normalized (no '//', '.' or '..'); requests are matched after normalization"
            ));
        }
        if let Self::Template(t) = self {
            for seg in t.split('/') {
                let braces = seg.contains('{') || seg.contains('}');
                let whole = seg.len() > 2 && seg.starts_with('{') && seg.ends_with('}');
                if braces && (!whole || seg[1..seg.len() - 1].contains(['{', '}'])) {
                    return Err(format!(
                        "template {t:?}: a placeholder must be a whole segment like {{id}}, got {seg:?}"
                    ));
                }
            }
        } else if p.contains(['{', '}']) {
            return Err(format!(
                "path {p:?} has braces; use template: for placeholders"
            ));
        }
        Ok(())
    }

    /// True when every path this matches is also matched by `self` (used for shadowing).
    pub fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (Self::Prefix(p), o) => {
                let p = p.trim_end_matches('/');
                let t = o.text();
                // A template's placeholders are only under the prefix if the literal part is.
                let lit = match o {
                    Self::Template(t) => t.split('{').next().unwrap_or(""),
                    _ => t,
                };
                let within = |s: &str| p.is_empty() || s == p || s.starts_with(&format!("{p}/"));
                match o {
                    Self::Template(_) => within(lit.trim_end_matches('/')) && lit.len() > p.len(),
                    _ => within(t.trim_end_matches('/')),
                }
            }
            (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Template(a), Self::Template(b)) => a == b,
            (Self::Template(a), Self::Exact(b)) => template_matches(a, b),
            _ => false,
        }
    }
}

/// Whether `path` fits `template` segment by segment.
pub fn template_matches(template: &str, path: &str) -> bool {
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) => {
                let placeholder = ts.starts_with('{') && ts.ends_with('}');
                if !(placeholder && !ps.is_empty() || ts == ps) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

impl RouteMatch {
    /// True when every request this matches is also matched by `self`.
    pub fn covers(&self, other: &RouteMatch) -> bool {
        let list_covers = |a: &[String], b: &[String]| {
            a.is_empty()
                || (!b.is_empty()
                    && b.iter()
                        .all(|x| a.iter().any(|y| y.eq_ignore_ascii_case(x))))
        };
        list_covers(&self.hosts, &other.hosts)
            && list_covers(&self.methods, &other.methods)
            && self.headers.iter().all(|h| {
                other
                    .headers
                    .iter()
                    .any(|o| o.name.eq_ignore_ascii_case(&h.name) && o.value == h.value)
            })
            && match (&self.path, &other.path) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(a), Some(b)) => a.covers(b),
            }
    }
}

fn pattern_covers(p: &IdPattern, q: &IdPattern) -> bool {
    match (p, q) {
        (IdPattern::Exact(a), IdPattern::Exact(b)) => a == b,
        (IdPattern::Prefix { prefix }, IdPattern::Exact(b)) => b.as_str().starts_with(&**prefix),
        (IdPattern::Prefix { prefix: a }, IdPattern::Prefix { prefix: b }) => b.starts_with(&**a),
        _ => false,
    }
}

fn loc<T>(s: &Spanned<T>) -> Option<serde_saphyr::Location> {
    Some(s.referenced)
}

impl Policy {
    /// The `inbound.ports` of a ProxyConfig as an enforce-mode policy of TCP rules, so that
    /// the proxy has one decision path. None when no port is listed.
    pub fn from_inbound_ports(cfg: &crate::ProxyConfig, target: &SpiffeId) -> Option<Policy> {
        let ports = &cfg.spec.inbound.ports;
        if ports.is_empty() {
            return None;
        }
        fn span<T>(v: T) -> Spanned<T> {
            let unknown = serde_saphyr::Location::UNKNOWN;
            Spanned::new(v, unknown, unknown)
        }
        Some(Policy {
            metadata: Metadata {
                name: format!("proxyconfig:{}", cfg.metadata.name),
                owner: cfg.metadata.owner.clone(),
                purpose: Some("inbound.ports of the sidecar's ProxyConfig".into()),
            },
            spec: PolicySpec {
                target: target.clone(),
                mode: RuleMode::Enforce,
                expires_at: None,
                ports: ports
                    .iter()
                    .map(|r| {
                        span(PortPolicy {
                            port: r.value.port,
                            protocol: Protocol::Tcp,
                            routes: Vec::new(),
                            rules: vec![span(TcpRule {
                                name: format!("port-{}", r.value.port),
                                allow: r.value.allow.clone(),
                                deny: Vec::new(),
                                mode: None,
                                expires_at: None,
                            })],
                        })
                    })
                    .collect(),
            },
        })
    }

    /// Loads every `---`-separated Policy document of a file.
    pub fn load_all(path: &Path) -> Result<Vec<Policy>, ConfigError> {
        let text = yaml::read_file(path)?;
        Self::parse_all(path, &text)
    }

    pub fn parse_all(path: &Path, text: &str) -> Result<Vec<Policy>, ConfigError> {
        Self::parse_part(path, text, 1)
    }

    /// The documents of `text`, which starts on line `first_line` of `path`: every line in
    /// errors, those that messages name included, counts from the top of the file.
    pub(crate) fn parse_part(
        path: &Path,
        text: &str,
        first_line: u64,
    ) -> Result<Vec<Policy>, ConfigError> {
        let shift = first_line - 1;
        Self::parse_documents(path, text, shift).map_err(|e| e.shifted(shift))
    }

    fn parse_documents(path: &Path, text: &str, shift: u64) -> Result<Vec<Policy>, ConfigError> {
        let docs: Vec<Spanned<Envelope<PolicySpec>>> =
            yaml::parse_multiple(path, text, "a Policy")?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let at = doc.referenced;
            let env = doc.value;
            check_envelope(path, &env, "Policy")?;
            let meta_at = env.metadata.referenced;
            let p = Policy {
                metadata: env.metadata.value,
                spec: env.spec,
            };
            p.validate(path, at, meta_at, shift)?;
            out.push(p);
        }
        Ok(out)
    }

    /// `shift`: how many lines down the file the parsed text starts, for the lines that
    /// messages name (the caller shifts the error's own line).
    fn validate(
        &self,
        path: &Path,
        doc_at: serde_saphyr::Location,
        meta_at: serde_saphyr::Location,
        shift: u64,
    ) -> Result<(), ConfigError> {
        let err = |at: Option<serde_saphyr::Location>, msg: String| {
            Err(ConfigError::new(path, at.or(Some(doc_at)), msg))
        };
        let line = |at: serde_saphyr::Location| at.line() + shift;
        let m = &self.metadata;
        if let Some(field) = m.missing_owner_or_purpose() {
            return err(
                Some(meta_at),
                format!("policy {:?}: metadata.{field} is required: every grant has an owner and a purpose", m.name),
            );
        }
        if self.spec.target.is_trust_domain_id() {
            return err(
                None,
                "spec.target must be a workload's SPIFFE ID, not a trust domain".into(),
            );
        }
        let mut ports: HashMap<u16, u64> = HashMap::new();
        for port in &self.spec.ports {
            let pp = &port.value;
            if let Some(first) = ports.insert(pp.port, line(port.referenced)) {
                return err(
                    loc(port),
                    format!("port {} is already listed at line {first}", pp.port),
                );
            }
            match pp.protocol {
                Protocol::Tcp if !pp.routes.is_empty() => {
                    return err(
                        loc(&pp.routes[0]),
                        format!(
                            "port {} is protocol tcp: HTTP routes cannot apply to it (use rules:)",
                            pp.port
                        ),
                    )
                }
                Protocol::Http if !pp.rules.is_empty() => {
                    return err(
                        loc(&pp.rules[0]),
                        format!("port {} is protocol http: use routes:, not rules:", pp.port),
                    )
                }
                _ => {}
            }
            let mut names: HashMap<&str, u64> = HashMap::new();
            for r in &pp.rules {
                if let Some(first) = names.insert(&r.value.name, line(r.referenced)) {
                    return err(
                        loc(r),
                        format!(
                            "rule name {:?} is already used at line {first}",
                            r.value.name
                        ),
                    );
                }
            }
            for (i, r) in pp.routes.iter().enumerate() {
                let route = &r.value;
                if let Some(first) = names.insert(&route.name, line(r.referenced)) {
                    return err(
                        loc(r),
                        format!(
                            "route name {:?} is already used at line {first}",
                            route.name
                        ),
                    );
                }
                if let Some(p) = &route.matches.path {
                    if let Err(e) = p.check() {
                        return err(loc(r), format!("route {:?}: {e}", route.name));
                    }
                }
                for other in &pp.routes[..i] {
                    let o = &other.value;
                    if o.matches == route.matches {
                        return err(
                            loc(r),
                            format!(
                                "route {:?} overlaps route {:?} (line {}): same match; merge their allow/deny lists",
                                route.name, o.name, line(other.referenced)
                            ),
                        );
                    }
                    for (a, b, b_at) in [(o, route, r), (route, o, other)] {
                        let all_denied = !b.allow.is_empty()
                            && b.allow
                                .iter()
                                .all(|q| a.deny.iter().any(|p| pattern_covers(p, q)));
                        if a.matches.covers(&b.matches) && all_denied && a.mode == b.mode {
                            return err(
                                loc(b_at),
                                format!(
                                    "route {:?} is shadowed by route {:?}: that route matches every request this one does and denies every identity this one allows",
                                    b.name, a.name
                                ),
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
