use std::path::Path;
use std::time::Duration;

use sigil_config::proxy_config::{Destination, Mode, UnknownDestination};
use sigil_config::ProxyConfig;

const GOOD: &str = "\
apiVersion: sigil.dev/v1
kind: ProxyConfig
metadata:
  name: sidecar-b
  owner: team-payments
spec:
  identity:
    certFile: b.crt
    keyFile: /abs/b.key
    bundleDir: bundles
    spiffeId: spiffe://example.org/ns/demo/sa/b
  inbound:
    ports:
      - port: 8080
        allow: [spiffe://example.org/ns/demo/sa/a, \"spiffe://example.org/ns/prod/*\"]
  outbound:
    unknownDestination: deny
    registry:
      - address: 10.0.0.2:8080
        spiffeId: spiffe://example.org/ns/demo/sa/c
      - address: 10.0.0.3
        spiffeId: spiffe://example.org/ns/demo/sa/d
  timeouts:
    handshake: 750ms
";

fn parse(text: &str) -> Result<ProxyConfig, String> {
    ProxyConfig::parse(Path::new("/etc/sigil/proxy.yaml"), text).map_err(|e| e.to_string())
}

#[test]
fn good_config_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.metadata.name, "sidecar-b");
    assert_eq!(c.spec.mode, Mode::Transparent);
    assert_eq!(c.spec.inbound.listen.to_string(), "0.0.0.0:15006");
    assert_eq!(c.spec.outbound.listen.to_string(), "127.0.0.1:15001");
    assert_eq!(c.spec.admin.listen.to_string(), "0.0.0.0:15000");
    assert_eq!(
        c.spec.outbound.unknown_destination,
        UnknownDestination::Deny
    );
    assert_eq!(c.spec.timeouts.handshake, Duration::from_millis(750));
    assert_eq!(c.spec.timeouts.drain, Duration::from_secs(10));
    assert_eq!(c.spec.timeouts.pool_idle, Duration::from_secs(90));
    assert_eq!(c.spec.workers, None);
    assert_eq!(c.spec.inbound.ports[0].value.allow.len(), 2);
    assert_eq!(
        c.spec.outbound.registry[1].value.address,
        Destination::Host("10.0.0.3".parse().unwrap())
    );
    assert_eq!(c.resolve(Path::new("b.crt")), Path::new("/etc/sigil/b.crt"));
    assert_eq!(c.resolve(Path::new("/abs/b.key")), Path::new("/abs/b.key"));
}

/// Each bad input must name the file, the line of the mistake, and what is wrong.
#[test]
fn errors_name_file_line_and_reason() {
    let cases: &[(&str, &str, u64, &str)] = &[
        (
            "spiffeId: spiffe://example.org/ns/demo/sa/b",
            "spiffeId: spiffe://Example.org/b",
            11,
            "uppercase",
        ),
        ("sa/a, ", "sa//a, ", 15, "empty segment"),
        (
            "    handshake: 750ms",
            "    handshake: 750 parsecs",
            24,
            "invalid duration",
        ),
        (
            "    unknownDestination: deny",
            "    unknownDestination: maybe",
            17,
            "maybe",
        ),
        ("  timeouts:", "  timeout:", 23, "timeout"),
        (
            "      - address: 10.0.0.3\n",
            "      - address: 10.0.0.2:8080\n",
            21,
            "already registered at line 19",
        ),
        (
            "      - address: 10.0.0.3\n",
            "      - address: 10.0.0.300\n",
            21,
            "invalid address",
        ),
        (
            "kind: ProxyConfig",
            "kind: Policy",
            2,
            "expected \"ProxyConfig\"",
        ),
        (
            "apiVersion: sigil.dev/v1",
            "apiVersion: sigil.dev/v2",
            1,
            "sigil.dev/v2",
        ),
    ];
    for (from, to, line, needle) in cases {
        let text = GOOD.replacen(from, to, 1);
        assert_ne!(text, GOOD, "case {from:?} did not change the input");
        let err = parse(&text).expect_err(to);
        assert!(
            err.starts_with(&format!("/etc/sigil/proxy.yaml:{line}:")),
            "{to:?}: want line {line}, got {err}"
        );
        assert!(err.contains(needle), "{to:?}: want {needle:?} in {err}");
    }
}

#[test]
fn duplicate_port_and_duplicate_key() {
    let dup = GOOD.replace(
        "  outbound:\n",
        "      - port: 8080\n        allow: []\n  outbound:\n",
    );
    let err = parse(&dup).unwrap_err();
    assert!(
        err.contains(":16:") && err.contains("port 8080 is already listed at line 14"),
        "{err}"
    );
    let dup_key = GOOD.replace("  owner: team-payments\n", "  owner: a\n  owner: b\n");
    let err = parse(&dup_key).unwrap_err();
    assert!(
        err.contains(":6:") && err.to_lowercase().contains("duplicate"),
        "{err}"
    );
}

#[test]
fn explicit_mode_needs_listeners_and_syntax_errors_have_lines() {
    let text = GOOD.replace("  inbound:\n", "  mode: explicit\n  inbound:\n");
    let err = parse(&text).unwrap_err();
    assert!(err.contains("mode is explicit"), "{err}");
    let text = GOOD.replace("    bundleDir: bundles", "    bundleDir: [bundles");
    let err = parse(&text).unwrap_err();
    assert!(err.starts_with("/etc/sigil/proxy.yaml:"), "{err}");
    let line: u64 = err.split(':').nth(1).unwrap().parse().unwrap();
    assert!((10..=12).contains(&line), "{err}");
    let no_version = "kind: ProxyConfig\nmetadata: {name: x}\n\
                      spec: {identity: {certFile: a, keyFile: b, bundleDir: c}}\n";
    let err = parse(no_version).unwrap_err();
    assert!(err.contains("apiVersion"), "{err}");
}

#[test]
fn workers_and_pool_idle_are_read_and_zeros_refused() {
    let c = parse(&format!("{GOOD}    poolIdle: 2m\n  workers: 3\n")).unwrap();
    assert_eq!(c.spec.timeouts.pool_idle, Duration::from_secs(120));
    assert_eq!(c.spec.workers, Some(3));
    let e = parse(&format!("{GOOD}  workers: 0\n")).unwrap_err();
    assert!(
        e.contains("/etc/sigil/proxy.yaml") && e.contains("workers must be at least 1"),
        "{e}"
    );
    let e = parse(&format!("{GOOD}    poolIdle: 0s\n")).unwrap_err();
    assert!(e.contains("timeouts.poolIdle must be longer than 0"), "{e}");
}

#[test]
fn identity_changes_are_off_by_default_and_cannot_be_allowed_with_a_pinned_id() {
    assert!(!parse(GOOD).unwrap().spec.identity.allow_identity_change);
    let without_id = GOOD.replace("    spiffeId: spiffe://example.org/ns/demo/sa/b\n", "");
    let allowed = without_id.replace(
        "    bundleDir: bundles\n",
        "    bundleDir: bundles\n    allowIdentityChange: true\n",
    );
    assert!(parse(&allowed).unwrap().spec.identity.allow_identity_change);
    let both = GOOD.replace(
        "    bundleDir: bundles\n",
        "    bundleDir: bundles\n    allowIdentityChange: true\n",
    );
    let e = parse(&both).unwrap_err();
    assert!(
        e.contains("/etc/sigil/proxy.yaml")
            && e.contains("allowIdentityChange")
            && e.contains("spiffe://example.org/ns/demo/sa/b"),
        "{e}"
    );
}

#[test]
fn limits_and_the_new_timeouts_are_read_and_zeros_refused_at_their_line() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.spec.timeouts.request, Duration::from_secs(30));
    assert_eq!(c.spec.timeouts.idle, Duration::from_secs(3600));
    assert_eq!(c.spec.limits.max_connections, None);
    assert_eq!(c.spec.limits.max_connections_per_source, 1024);
    assert_eq!(c.spec.limits.max_pending_handshakes, 1024);
    assert_eq!(c.spec.limits.max_pending_handshakes_per_source, 64);
    assert_eq!(c.spec.limits.fd_reserve, 256);
    let text = format!(
        "{GOOD}    request: 2s\n    idle: 5m\n  limits:\n    maxConnections: 500\n    \
         maxConnectionsPerSource: 20\n    maxPendingHandshakes: 30\n    \
         maxPendingHandshakesPerSource: 4\n    fdReserve: 100\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.spec.timeouts.request, Duration::from_secs(2));
    assert_eq!(c.spec.timeouts.idle, Duration::from_secs(300));
    let l = &c.spec.limits;
    assert_eq!(
        (
            l.max_connections,
            l.max_connections_per_source,
            l.max_pending_handshakes,
            l.max_pending_handshakes_per_source,
            l.fd_reserve
        ),
        (Some(500), 20, 30, 4, 100)
    );
    let lines = GOOD.lines().count() + 1;
    for (add, line, says) in [
        (
            "    request: 0s\n",
            lines,
            "timeouts.request must be longer than 0",
        ),
        (
            "    idle: 0ms\n",
            lines,
            "timeouts.idle must be longer than 0",
        ),
        (
            "  limits:\n    maxPendingHandshakesPerSource: 0\n",
            lines + 1,
            "limits.maxPendingHandshakesPerSource must be at least 1",
        ),
        (
            "  limits: {maxConnections: 0}\n",
            lines,
            "limits.maxConnections must be at least 1",
        ),
    ] {
        let e = parse(&format!("{GOOD}{add}")).unwrap_err();
        assert!(
            e.starts_with(&format!("/etc/sigil/proxy.yaml:{line}:")) && e.contains(says),
            "{add:?}: {e}"
        );
    }
    let e = parse(&format!("{GOOD}  limits: {{maxConections: 5}}\n")).unwrap_err();
    assert!(e.contains("maxConections"), "{e}");
}
