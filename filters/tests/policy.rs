use std::path::Path;

use sigil_config::{Policy, SpiffeId};
use sigil_filters::policy::{Effect, Rule};
use sigil_filters::{Decision, HttpRequest, PolicyIndex};

const ME: &str = "spiffe://example.org/ns/prod/sa/orders";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/nightly";
const PARTNER: &str = "spiffe://partner.org/ns/x/sa/api";
const EVIL: &str = "spiffe://partner.org/ns/sandbox/sa/x";
const T0: i64 = 1_790_000_000; // 2026-09-21, before every expiry below

const POLICIES: &str = "\
apiVersion: sigil.dev/v1
kind: Policy
metadata: {name: orders-api, owner: team-orders, purpose: orders API callers}
spec:
  target: spiffe://example.org/ns/prod/sa/orders
  ports:
    - port: 8080
      routes:
        - name: read-orders
          match: {methods: [GET, HEAD], path: {prefix: /v1/orders}}
          allow: [spiffe://example.org/ns/prod/sa/web, \"spiffe://partner.org/*\"]
          deny: [spiffe://partner.org/ns/sandbox/sa/x]
        - name: account
          match: {path: {template: \"/v1/accounts/{id}\"}, headers: [{name: x-tenant, value: acme}]}
          allow: [\"spiffe://example.org/ns/batch/*\"]
        - name: admin-host
          match: {hosts: [admin.orders.internal], path: {exact: /admin}}
          allow: [spiffe://example.org/ns/prod/sa/web]
        - name: audit-batch
          match: {path: {prefix: /v1}}
          deny: [\"spiffe://example.org/ns/batch/*\"]
          mode: dry-run
        - name: temporary
          match: {path: {exact: /v1/promo}}
          allow: [\"spiffe://example.org/ns/batch/*\"]
          expiresAt: 2026-10-01T00:00:00Z
    - port: 5432
      protocol: tcp
      rules:
        - {name: db, allow: [\"spiffe://example.org/ns/batch/*\"]}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {name: other-workload, owner: o, purpose: p}
spec:
  target: spiffe://example.org/ns/prod/sa/someone-else
  ports: [{port: 8080, routes: [{name: all, match: {path: {prefix: /}}, allow: [\"spiffe://example.org/*\"]}]}]
";

fn index(text: &str) -> PolicyIndex {
    let ps = Policy::parse_all(Path::new("p.yaml"), text).unwrap();
    PolicyIndex::compile(&ps, &SpiffeId::parse(ME).unwrap())
}

fn http<'a>(
    idx: &'a PolicyIndex,
    peer: &str,
    method: &str,
    host: &str,
    path: &str,
    tenant: Option<&'static str>,
    now: i64,
) -> Decision<'a> {
    let peer = SpiffeId::parse(peer).unwrap();
    let req = HttpRequest {
        peer: &peer,
        port: 8080,
        method,
        host,
        path,
        header: |name: &str| if name == "x-tenant" { tenant } else { None },
        now,
    };
    // Decisions borrow only the index, so the request may go.
    idx.decide_http(&req)
}

fn matched(d: &Decision, rule: &str, effect: Effect) -> bool {
    matches!(d.rule, Rule::Matched { rule: r, effect: e, .. } if r == rule && e == effect)
}

#[test]
fn routes_allow_deny_and_default_deny() {
    let idx = index(POLICIES);
    let d = http(&idx, WEB, "GET", "orders", "/v1/orders/7", None, T0);
    assert!(
        d.allowed && matched(&d, "read-orders", Effect::Allow),
        "{d:?}"
    );
    assert_eq!(d.would_deny, None);
    // Whole trust domain, and deny wins over that allow.
    assert!(http(&idx, PARTNER, "HEAD", "orders", "/v1/orders", None, T0).allowed);
    let d = http(&idx, EVIL, "GET", "orders", "/v1/orders", None, T0);
    assert!(
        !d.allowed && matched(&d, "read-orders", Effect::Deny),
        "{d:?}"
    );
    // Method, segment-aware prefix, unlisted path.
    let d = http(&idx, WEB, "POST", "orders", "/v1/orders", None, T0);
    assert_eq!(
        (d.allowed, d.rule),
        (false, Rule::DefaultDeny { port: 8080 })
    );
    assert!(!http(&idx, WEB, "GET", "orders", "/v1/ordersx", None, T0).allowed);
    assert!(!http(&idx, WEB, "GET", "orders", "/", None, T0).allowed);
    // Template with a header condition: one segment, header required.
    assert!(http(&idx, BATCH, "GET", "h", "/v1/accounts/42", Some("acme"), T0).allowed);
    assert!(
        !http(
            &idx,
            BATCH,
            "GET",
            "h",
            "/v1/accounts/42",
            Some("other"),
            T0
        )
        .allowed
    );
    assert!(!http(&idx, BATCH, "GET", "h", "/v1/accounts/42", None, T0).allowed);
    assert!(
        !http(
            &idx,
            BATCH,
            "GET",
            "h",
            "/v1/accounts/42/x",
            Some("acme"),
            T0
        )
        .allowed
    );
    assert!(!http(&idx, BATCH, "GET", "h", "/v1/accounts/", Some("acme"), T0).allowed);
    // Host, case-insensitive; exact path only.
    assert!(
        http(
            &idx,
            WEB,
            "GET",
            "ADMIN.orders.internal",
            "/admin",
            None,
            T0
        )
        .allowed
    );
    assert!(!http(&idx, WEB, "GET", "orders", "/admin", None, T0).allowed);
    assert!(
        !http(
            &idx,
            WEB,
            "GET",
            "admin.orders.internal",
            "/admin/x",
            None,
            T0
        )
        .allowed
    );
    // Another port with no rule at all.
    let peer = SpiffeId::parse(WEB).unwrap();
    assert_eq!(
        idx.decide_tcp(&peer, 9999, T0).rule,
        Rule::DefaultDeny { port: 9999 }
    );
}

#[test]
fn dry_run_reports_would_deny_without_enforcing() {
    let idx = index(POLICIES);
    // The dry-run route denies batch under /v1: enforced allows, shadow would deny.
    let d = http(&idx, BATCH, "GET", "h", "/v1/accounts/1", Some("acme"), T0);
    assert!(d.allowed && matched(&d, "account", Effect::Allow), "{d:?}");
    assert!(
        matches!(
            d.would_deny,
            Some(Rule::Matched {
                rule: "audit-batch",
                effect: Effect::Deny,
                ..
            })
        ),
        "{d:?}"
    );
    // A workload targeted only by dry-run policies is not enforced at all.
    let only_dry = POLICIES.replacen(
        "  target: spiffe://example.org/ns/prod/sa/orders\n",
        "  target: spiffe://example.org/ns/prod/sa/orders\n  mode: dry-run\n",
        1,
    );
    let idx = index(&only_dry);
    let d = http(&idx, WEB, "DELETE", "h", "/v2/anything", None, T0);
    assert_eq!(d.rule, Rule::NoPolicy);
    assert!(d.allowed);
    assert_eq!(d.would_deny, Some(Rule::DefaultDeny { port: 8080 }));
}

#[test]
fn expiry_by_the_sidecars_clock_never_widens_access() {
    let idx = index(POLICIES);
    let expiry = 1_790_812_800; // 2026-10-01T00:00:00Z
    assert!(http(&idx, BATCH, "GET", "h", "/v1/promo", None, expiry - 1).allowed);
    let d = http(&idx, BATCH, "GET", "h", "/v1/promo", None, expiry);
    assert_eq!(
        (d.allowed, d.rule),
        (false, Rule::DefaultDeny { port: 8080 })
    );
    // A whole policy expiring: its grants stop, the workload stays default-deny.
    let idx = index(&POLICIES.replacen(
        "  ports:\n",
        "  expiresAt: 2026-10-01T00:00:00Z\n  ports:\n",
        1,
    ));
    assert!(http(&idx, WEB, "GET", "h", "/v1/orders", None, expiry - 1).allowed);
    let d = http(&idx, WEB, "GET", "h", "/v1/orders", None, expiry);
    assert_eq!(
        (d.allowed, d.rule),
        (false, Rule::DefaultDeny { port: 8080 })
    );
}

#[test]
fn tcp_rules_and_untargeted_workloads() {
    let idx = index(POLICIES);
    let batch = SpiffeId::parse(BATCH).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let d = idx.decide_tcp(&batch, 5432, T0);
    assert!(d.allowed && matched(&d, "db", Effect::Allow), "{d:?}");
    assert_eq!(
        idx.decide_tcp(&web, 5432, T0).rule,
        Rule::DefaultDeny { port: 5432 }
    );
    assert!(idx.is_http(8080) && !idx.is_http(5432));
    // Policies for other workloads are not ours: no policy, mTLS alone admits.
    let ps = Policy::parse_all(Path::new("p.yaml"), POLICIES).unwrap();
    let other = PolicyIndex::compile(
        &ps,
        &SpiffeId::parse("spiffe://example.org/ns/x/sa/y").unwrap(),
    );
    let d = other.decide_tcp(&web, 8080, T0);
    assert_eq!((d.allowed, d.rule), (true, Rule::NoPolicy));
    assert_eq!(d.rule.to_string(), "no policy targets this workload");
}
