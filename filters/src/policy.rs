//! Per-port and per-route authorization from `Policy` resources, compiled for one workload.
//!
//! Among the rules that match, an enforced `deny` wins, then an enforced `allow`; anything else
//! is denied once an enforce-mode policy targets the workload. Dry-run rules take part in a
//! second, shadow verdict (as if they were enforced) that is only reported: when it denies
//! what the enforced verdict allows, the decision carries `would_deny`.
//!
//! Expiry is checked against the caller's clock on every decision. An expired rule neither
//! allows nor denies, but the workload stays default-deny: expiry never widens access.
//!
//! Paths live in a segment trie per port (exact, prefix and `{placeholder}` templates), so a
//! decision costs a hash lookup per path segment whatever the number of policies, and it
//! allocates nothing.

use std::collections::HashMap;
use std::fmt;

use sigil_config::policy::{PathMatch, Protocol, RuleMode, Timestamp};
use sigil_config::{IdPattern, Policy, SpiffeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// What decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule<'a> {
    /// No enforce-mode policy targets this workload: mTLS alone admits the peer.
    NoPolicy,
    Matched {
        /// Index of the rule, for `PolicyIndex::label`.
        id: u32,
        policy: &'a str,
        rule: &'a str,
        effect: Effect,
    },
    /// Policies target the workload and no unexpired rule allows this peer here.
    DefaultDeny { port: u16 },
    /// The sidecar takes its policies from a control plane and has no snapshot from it in
    /// force yet: what those policies would govern is denied until one is.
    AwaitingSnapshot,
}

impl fmt::Display for Rule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPolicy => write!(f, "no policy targets this workload"),
            Self::Matched {
                policy,
                rule,
                effect,
                ..
            } => {
                let e = if *effect == Effect::Allow {
                    "allow"
                } else {
                    "deny"
                };
                write!(f, "policy {policy} rule {rule} ({e})")
            }
            Self::DefaultDeny { port } => {
                write!(f, "port {port}: no rule allows this peer (default deny)")
            }
            Self::AwaitingSnapshot => write!(
                f,
                "no snapshot from the control plane is in force yet (default deny)"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    pub allowed: bool,
    pub rule: Rule<'a>,
    /// Set when dry-run rules, if enforced, would deny what is allowed now.
    pub would_deny: Option<Rule<'a>>,
}

/// One HTTP request, as the decision sees it. `path` must already be normalized.
pub struct HttpRequest<'a, H> {
    pub peer: &'a SpiffeId,
    pub port: u16,
    pub method: &'a str,
    /// As `normalize::effective_host` returns it; any port is ignored, case too.
    pub host: &'a str,
    pub path: &'a str,
    /// Header value by lowercase name.
    pub header: H,
    /// Unix seconds, the sidecar's own clock.
    pub now: i64,
}

struct CompiledRule {
    /// `policy/rule`, the metrics label.
    label: std::sync::Arc<str>,
    policy: Box<str>,
    name: Box<str>,
    mode: RuleMode,
    expires_at: Option<i64>,
    allow: Vec<IdPattern>,
    deny: Vec<IdPattern>,
    methods: Vec<Box<str>>,
    hosts: Vec<Box<str>>,
    headers: Vec<(Box<str>, Box<str>)>,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    wildcard: Option<Box<Node>>,
    prefix: Vec<u32>,
    exact: Vec<u32>,
}

enum PortIndex {
    Tcp(Vec<u32>),
    Http(Node),
}

const AWAITING: Decision<'static> = Decision {
    allowed: false,
    rule: Rule::AwaitingSnapshot,
    would_deny: None,
};

/// The compiled policies of one workload.
pub struct PolicyIndex {
    rules: Vec<CompiledRule>,
    ports: HashMap<u16, PortIndex>,
    enforced_target: bool,
    any_target: bool,
    /// Built by `awaiting_snapshot`: every decision denies.
    awaiting: bool,
}

/// Accumulates the first deny and the first allow among matching rules, for one verdict.
#[derive(Default, Clone, Copy)]
struct Hits {
    deny: Option<u32>,
    allow: Option<u32>,
}

impl PolicyIndex {
    /// Keeps the policies that target `local`. Policies are assumed validated by
    /// `sigil_config::Policy` loading.
    pub fn compile<'p>(policies: impl IntoIterator<Item = &'p Policy>, local: &SpiffeId) -> Self {
        let mut idx = PolicyIndex {
            rules: Vec::new(),
            ports: HashMap::new(),
            enforced_target: false,
            any_target: false,
            awaiting: false,
        };
        for p in policies {
            if p.spec.target != *local {
                continue;
            }
            idx.any_target = true;
            idx.enforced_target |= p.spec.mode == RuleMode::Enforce;
            let pexp = p.spec.expires_at.map(|t| t.0);
            for port in &p.spec.ports {
                let port = &port.value;
                // What a rule shares whether it guards a connection or a route.
                let base = |name: &str,
                            mode: Option<RuleMode>,
                            expires: Option<Timestamp>,
                            allow: &[IdPattern],
                            deny: &[IdPattern]| CompiledRule {
                    label: format!("{}/{name}", p.metadata.name).into(),
                    policy: p.metadata.name.as_str().into(),
                    name: name.into(),
                    mode: mode.unwrap_or(p.spec.mode),
                    expires_at: match (pexp, expires.map(|t| t.0)) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    },
                    allow: allow.to_vec(),
                    deny: deny.to_vec(),
                    methods: Vec::new(),
                    hosts: Vec::new(),
                    headers: Vec::new(),
                };
                match port.protocol {
                    Protocol::Tcp => {
                        for r in &port.rules {
                            let r = &r.value;
                            let id =
                                idx.push(base(&r.name, r.mode, r.expires_at, &r.allow, &r.deny));
                            match idx
                                .ports
                                .entry(port.port)
                                .or_insert(PortIndex::Tcp(Vec::new()))
                            {
                                PortIndex::Tcp(v) => v.push(id),
                                // Another policy declared this port http: its rules cannot
                                // apply per connection; keep the port http (stricter).
                                PortIndex::Http(_) => {}
                            }
                        }
                        idx.ports
                            .entry(port.port)
                            .or_insert(PortIndex::Tcp(Vec::new()));
                    }
                    Protocol::Http => {
                        let entry = idx
                            .ports
                            .entry(port.port)
                            .or_insert(PortIndex::Http(Node::default()));
                        if let PortIndex::Tcp(_) = entry {
                            *entry = PortIndex::Http(Node::default());
                        }
                        for r in &port.routes {
                            let r = &r.value;
                            let m = &r.matches;
                            let rule = CompiledRule {
                                methods: m
                                    .methods
                                    .iter()
                                    .map(|s| s.to_ascii_uppercase().into())
                                    .collect(),
                                hosts: m
                                    .hosts
                                    .iter()
                                    .map(|s| s.to_ascii_lowercase().into())
                                    .collect(),
                                headers: m
                                    .headers
                                    .iter()
                                    .map(|h| {
                                        (
                                            h.name.to_ascii_lowercase().into(),
                                            h.value.as_str().into(),
                                        )
                                    })
                                    .collect(),
                                ..base(&r.name, r.mode, r.expires_at, &r.allow, &r.deny)
                            };
                            let id = idx.rules.len() as u32;
                            idx.rules.push(rule);
                            let Some(PortIndex::Http(root)) = idx.ports.get_mut(&port.port) else {
                                continue;
                            };
                            insert(root, m.path.as_ref(), id);
                        }
                    }
                }
            }
        }
        idx
    }

    fn push(&mut self, r: CompiledRule) -> u32 {
        self.rules.push(r);
        (self.rules.len() - 1) as u32
    }

    /// The index of a sidecar whose policies come from a control plane that has not sent
    /// a snapshot yet (nor left an intact copy on disk): it denies everything, since the
    /// policies it will receive may deny what nothing here could know to.
    pub fn awaiting_snapshot() -> Self {
        PolicyIndex {
            rules: Vec::new(),
            ports: HashMap::new(),
            enforced_target: true,
            any_target: true,
            awaiting: true,
        }
    }

    /// A stable label for metrics: `policy/rule`, or `no_policy` / `default_deny` /
    /// `awaiting_snapshot`.
    pub fn label(&self, rule: &Rule<'_>) -> std::sync::Arc<str> {
        match rule {
            Rule::Matched { id, .. } => self.rules[*id as usize].label.clone(),
            Rule::NoPolicy => "no_policy".into(),
            Rule::DefaultDeny { .. } => "default_deny".into(),
            Rule::AwaitingSnapshot => "awaiting_snapshot".into(),
        }
    }

    /// Whether some policy declares `port` as `tcp` (no protocol detection there).
    pub fn is_tcp(&self, port: u16) -> bool {
        matches!(self.ports.get(&port), Some(PortIndex::Tcp(_)))
    }

    /// Whether `port` is declared HTTP by some policy (requests are then checked one by one).
    pub fn is_http(&self, port: u16) -> bool {
        matches!(self.ports.get(&port), Some(PortIndex::Http(_)))
    }

    /// Connection-level decision for a TCP port (or a port no policy lists).
    pub fn decide_tcp(&self, peer: &SpiffeId, port: u16, now: i64) -> Decision<'_> {
        if self.awaiting {
            return AWAITING;
        }
        let mut enforced = Hits::default();
        let mut shadow = Hits::default();
        if let Some(PortIndex::Tcp(ids)) = self.ports.get(&port) {
            for &id in ids {
                self.judge(id, peer, now, &mut enforced, &mut shadow);
            }
        }
        self.verdict(port, enforced, shadow)
    }

    pub fn decide_http<'h, H>(&self, req: &HttpRequest<'_, H>) -> Decision<'_>
    where
        H: Fn(&str) -> Option<&'h str>,
    {
        if self.awaiting {
            return AWAITING;
        }
        let mut enforced = Hits::default();
        let mut shadow = Hits::default();
        if let Some(PortIndex::Http(root)) = self.ports.get(&req.port) {
            let rest = req.path.strip_prefix('/');
            visit(root, rest, &mut |id| {
                if self.request_matches(id, req) {
                    self.judge(id, req.peer, req.now, &mut enforced, &mut shadow);
                }
            });
        }
        self.verdict(req.port, enforced, shadow)
    }

    fn request_matches<'h, H>(&self, id: u32, req: &HttpRequest<'_, H>) -> bool
    where
        H: Fn(&str) -> Option<&'h str>,
    {
        let r = &self.rules[id as usize];
        let host = strip_port(req.host);
        (r.methods.is_empty() || r.methods.iter().any(|m| **m == *req.method))
            && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
            && r.headers
                .iter()
                .all(|(name, value)| (req.header)(name) == Some(&**value))
    }

    fn judge(&self, id: u32, peer: &SpiffeId, now: i64, enforced: &mut Hits, shadow: &mut Hits) {
        let r = &self.rules[id as usize];
        if r.expires_at.is_some_and(|t| now >= t) {
            return;
        }
        let hit = if r.deny.iter().any(|p| p.matches(peer)) {
            Effect::Deny
        } else if r.allow.iter().any(|p| p.matches(peer)) {
            Effect::Allow
        } else {
            return;
        };
        let record = |h: &mut Hits| match hit {
            Effect::Deny => {
                h.deny.get_or_insert(id);
            }
            Effect::Allow => {
                h.allow.get_or_insert(id);
            }
        };
        if r.mode == RuleMode::Enforce {
            record(enforced);
        }
        record(shadow);
    }

    fn rule(&self, id: u32, effect: Effect) -> Rule<'_> {
        let r = &self.rules[id as usize];
        Rule::Matched {
            id,
            policy: &r.policy,
            rule: &r.name,
            effect,
        }
    }

    fn outcome(&self, targeted: bool, port: u16, h: Hits) -> (bool, Rule<'_>) {
        if !targeted {
            (true, Rule::NoPolicy)
        } else if let Some(id) = h.deny {
            (false, self.rule(id, Effect::Deny))
        } else if let Some(id) = h.allow {
            (true, self.rule(id, Effect::Allow))
        } else {
            (false, Rule::DefaultDeny { port })
        }
    }

    fn verdict(&self, port: u16, enforced: Hits, shadow: Hits) -> Decision<'_> {
        let (allowed, rule) = self.outcome(self.enforced_target, port, enforced);
        let (shadow_allowed, shadow_rule) = self.outcome(self.any_target, port, shadow);
        Decision {
            allowed,
            rule,
            would_deny: (allowed && !shadow_allowed).then_some(shadow_rule),
        }
    }
}

/// `host:port` -> `host`, `[v6]:port` -> `[v6]`; routes name hosts, not ports.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']') && (host.starts_with('[') || !host[..i].contains(':')) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

fn insert(root: &mut Node, path: Option<&PathMatch>, id: u32) {
    let Some(path) = path else {
        root.prefix.push(id);
        return;
    };
    match path {
        PathMatch::Prefix(p) => {
            let p = p.trim_end_matches('/');
            let mut node = root;
            if !p.is_empty() {
                for seg in segments(p) {
                    node = node.children.entry(seg.into()).or_default();
                }
            }
            node.prefix.push(id);
        }
        PathMatch::Exact(p) | PathMatch::Template(p) => {
            let template = matches!(path, PathMatch::Template(_));
            let mut node = root;
            for seg in segments(p) {
                node = if template && seg.starts_with('{') && seg.ends_with('}') {
                    node.wildcard.get_or_insert_with(Box::default)
                } else {
                    node.children.entry(seg.into()).or_default()
                };
            }
            node.exact.push(id);
        }
    }
}

/// Calls `f` for every rule whose path matches: prefixes along the way, exact and template
/// rules where the path ends. `rest` is the path after the leading '/', or None when consumed.
fn visit(node: &Node, rest: Option<&str>, f: &mut impl FnMut(u32)) {
    for &id in &node.prefix {
        f(id);
    }
    let Some(rest) = rest else {
        for &id in &node.exact {
            f(id);
        }
        return;
    };
    let (seg, next) = match rest.split_once('/') {
        Some((s, n)) => (s, Some(n)),
        None => (rest, None),
    };
    if let Some(child) = node.children.get(seg) {
        visit(child, next, f);
    }
    if !seg.is_empty() {
        if let Some(w) = &node.wildcard {
            visit(w, next, f);
        }
    }
}
