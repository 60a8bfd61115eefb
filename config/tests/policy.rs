use std::path::Path;

use sigil_config::policy::{PathMatch, Protocol, RuleMode, Timestamp};
use sigil_config::Policy;

const GOOD: &str = "\
apiVersion: sigil.dev/v1
kind: Policy
metadata:
  name: orders-api
  owner: team-orders
  purpose: who may call the orders API
spec:
  target: spiffe://example.org/ns/prod/sa/orders
  expiresAt: 2027-01-01T00:00:00Z
  ports:
    - port: 8080
      routes:
        - name: read-orders
          match:
            methods: [GET, HEAD]
            path: {prefix: /v1/orders}
          allow: [spiffe://example.org/ns/prod/sa/web, \"spiffe://partner.org/*\"]
          deny: [spiffe://partner.org/ns/sandbox/sa/x]
        - name: one-account
          match:
            path: {template: \"/v1/accounts/{id}\"}
            headers: [{name: x-tenant, value: acme}]
          allow: [\"spiffe://example.org/ns/prod/*\"]
          mode: dry-run
          expiresAt: 2026-12-01T12:30:00Z
    - port: 5432
      protocol: tcp
      rules:
        - name: db-clients
          allow: [spiffe://example.org/ns/prod/sa/orders-worker]
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {name: health, owner: sre, purpose: probes}
spec:
  target: spiffe://example.org/ns/prod/sa/orders
  mode: dry-run
  ports:
    - port: 9090
      routes:
        - {name: healthz, match: {path: {exact: /healthz}}, allow: [\"spiffe://example.org/*\"]}
";

fn parse(text: &str) -> Result<Vec<Policy>, String> {
    Policy::parse_all(Path::new("policies.yaml"), text).map_err(|e| e.to_string())
}

#[test]
fn good_policies_parse() {
    let ps = parse(GOOD).unwrap();
    assert_eq!(ps.len(), 2);
    let p = &ps[0];
    assert_eq!(
        p.spec.target.as_str(),
        "spiffe://example.org/ns/prod/sa/orders"
    );
    assert_eq!(p.spec.mode, RuleMode::Enforce);
    assert_eq!(p.spec.expires_at, Some(Timestamp(1798761600)));
    let http = &p.spec.ports[0].value;
    assert_eq!(http.protocol, Protocol::Http);
    assert_eq!(http.routes.len(), 2);
    assert_eq!(
        http.routes[0].value.matches.path,
        Some(PathMatch::Prefix("/v1/orders".into()))
    );
    assert_eq!(http.routes[1].value.mode, Some(RuleMode::DryRun));
    assert_eq!(p.spec.ports[1].value.protocol, Protocol::Tcp);
    assert_eq!(ps[1].spec.mode, RuleMode::DryRun);
}

/// Every rejection names the file, the line of the mistake and the reason.
#[test]
fn bad_policies_name_file_line_and_reason() {
    let cases: &[(&str, &str, u64, &str)] = &[
        (
            "          match:\n            methods",
            "          matches:\n            methods",
            14,
            "matches",
        ),
        (
            "spiffe://example.org/ns/prod/sa/web",
            "spiffe://example.org/ns/prod/sa/web/",
            17,
            "must not end with",
        ),
        (
            "  owner: team-orders\n",
            "",
            4,
            "metadata.owner is required",
        ),
        (
            "      protocol: tcp\n      rules:",
            "      protocol: tcp\n      routes:",
            29,
            "protocol tcp",
        ),
        (
            "            path: {template: \"/v1/accounts/{id}\"}",
            "            path: {template: \"/v1/accounts/x{id}\"}",
            19,
            "whole segment",
        ),
        (
            "            path: {prefix: /v1/orders}",
            "            path: {prefix: /v1/../orders}",
            13,
            "not normalized",
        ),
        (
            "  expiresAt: 2027-01-01T00:00:00Z",
            "  expiresAt: 2027-02-30T00:00:00Z",
            9,
            "invalid time",
        ),
        (
            "        - name: one-account",
            "        - name: read-orders",
            19,
            "already used at line 13",
        ),
        (
            "    - port: 5432",
            "    - port: 8080",
            26,
            "already listed at line 11",
        ),
    ];
    for (from, to, line, needle) in cases {
        let text = GOOD.replacen(from, to, 1);
        assert_ne!(text, GOOD, "case {from:?} did not apply");
        let err = parse(&text).expect_err(to);
        assert!(
            err.starts_with(&format!("policies.yaml:{line}:")),
            "{to:?}: want line {line}: {err}"
        );
        assert!(err.contains(needle), "{to:?}: want {needle:?} in {err}");
    }
}

#[test]
fn overlapping_and_shadowed_routes_are_refused() {
    let route = |name: &str, m: &str, allow: &str, deny: &str| {
        format!("        - {{name: {name}, match: {m}, allow: [{allow}], deny: [{deny}]}}\n")
    };
    let doc = |routes: String| {
        format!(
            "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: p, owner: o, purpose: x}}\nspec:\n  target: spiffe://td/w\n  ports:\n    - port: 80\n      routes:\n{routes}"
        )
    };
    // Same match twice.
    let same = route("a", "{path: {prefix: /v1}}", "spiffe://td/x", "")
        + &route("b", "{path: {prefix: /v1}}", "spiffe://td/y", "");
    let err = parse(&doc(same)).unwrap_err();
    assert!(
        err.contains(":10:") && err.contains("overlaps route \"a\" (line 9)"),
        "{err}"
    );
    // A broader route that denies everything the narrower one allows.
    let shadow = route("all", "{path: {prefix: /}}", "", "\"spiffe://td/ns/dev/*\"")
        + &route(
            "dev-orders",
            "{methods: [GET], path: {exact: /v1/orders}}",
            "spiffe://td/ns/dev/a",
            "",
        );
    let err = parse(&doc(shadow)).unwrap_err();
    assert!(
        err.contains("route \"dev-orders\" is shadowed by route \"all\""),
        "{err}"
    );
    // Overlap without shadowing is fine: deny wins only for what it names.
    let ok = route("all", "{path: {prefix: /}}", "", "spiffe://td/ns/dev/a")
        + &route(
            "orders",
            "{path: {prefix: /v1/orders}}",
            "\"spiffe://td/*\"",
            "",
        );
    assert!(parse(&doc(ok)).is_ok());
    // A template route under a prefix that denies its only caller.
    let tpl = route("v1", "{path: {prefix: /v1}}", "", "spiffe://td/a")
        + &route(
            "acct",
            "{path: {template: \"/v1/accounts/{id}\"}}",
            "spiffe://td/a",
            "",
        );
    assert!(parse(&doc(tpl)).unwrap_err().contains("shadowed"));
    // A prefix does not cover a sibling that merely shares characters.
    let sib = route("v1", "{path: {prefix: /v1}}", "", "spiffe://td/a")
        + &route("v10", "{path: {prefix: /v10}}", "spiffe://td/a", "");
    assert!(parse(&doc(sib)).is_ok());
}

#[test]
fn timestamps() {
    assert_eq!(Timestamp::parse("1970-01-01T00:00:00Z"), Ok(Timestamp(0)));
    assert_eq!(
        Timestamp::parse("2000-02-29T23:59:59Z"),
        Ok(Timestamp(951_868_799))
    );
    for bad in [
        "2001-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:00:00+01:00",
        "2026-01-01",
        "tomorrow",
    ] {
        assert!(Timestamp::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_document_over_the_byte_cap_is_refused_at_its_line_before_parsing() {
    use sigil_config::{Resource, MAX_DOCUMENT_BYTES};
    let huge = GOOD.replace(
        "purpose: who may call the orders API",
        &format!("purpose: {}", "x".repeat(MAX_DOCUMENT_BYTES)),
    );
    let path = Path::new("/p/huge.yaml");
    let e = Policy::parse_all(path, &huge).unwrap_err().to_string();
    assert!(
        e.starts_with("/p/huge.yaml:1:") && e.contains("the limit is 1048576 (1 MiB)"),
        "{e}"
    );
    // The second document of a file: refused at its own first line; the file as a whole
    // may be larger than one document's cap.
    let two = format!("{GOOD}---\n{huge}");
    let line = GOOD.lines().count() + 2;
    for e in [
        Policy::parse_all(path, &two).unwrap_err().to_string(),
        Resource::parse_all(path, &two).unwrap_err().to_string(),
    ] {
        assert!(e.starts_with(&format!("/p/huge.yaml:{line}:")), "{e}");
    }
    // Just under the cap is fine.
    let padding = MAX_DOCUMENT_BYTES - GOOD.len() - 64;
    let big = GOOD.replace(
        "purpose: who may call the orders API",
        &format!("purpose: {}", "x".repeat(padding)),
    );
    assert!(big.len() < MAX_DOCUMENT_BYTES);
    assert_eq!(
        Policy::parse_all(path, &big).unwrap().len(),
        Policy::parse_all(path, GOOD).unwrap().len()
    );
}
