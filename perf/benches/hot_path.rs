//! Criterion micro-benchmarks of Sigil's per-handshake and per-connection decisions.
//!
//! - `svid/*`: what a sidecar's rustls verifier does once per mTLS handshake —
//!   `verify_svid` (leaf shape + SPIFFE ID extraction + webpki chain validation against the
//!   bundle of the leaf's own trust domain), for a leaf signed directly by the root and for a
//!   leaf issued by an intermediate; and `leaf_spiffe_id` alone (X.509 parse + SAN/KU/EKU
//!   checks, no signature verification).
//! - `l4_authz/*`: `PolicyIndex::decide_tcp`, the once-per-connection port policy check, over
//!   a sidecar's `inbound.ports` of 100 ports x 10 patterns (half exact IDs, half `/*`
//!   prefixes), compiled as the proxy compiles it; allowed and denied.
//!
//! - `policy/*`: `PolicyIndex::decide_http` / `decide_tcp`, the per-request route-scope
//!   decision, with 10,000 policies all targeting the local workload (the worst case: a
//!   sidecar compiles only the policies that target it), each with a prefix, a template and
//!   an exact route.
//!
//! Certificates are minted at bench start by `sigil_testkit::Ca` (ECDSA P-256, like every
//! SVID the testkit issues). Run: `cargo bench -p sigil-perf --bench hot_path`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls_pki_types::UnixTime;
use sigil_config::{Policy, ProxyConfig, SpiffeId, TrustDomain};
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::tls::provider;
use sigil_filters::{verify_svid, HttpRequest, PolicyIndex, TrustBundles, Usage};
use sigil_testkit::Ca;

const PEER: &str = "spiffe://example.org/ns/perf/sa/client";
const PEER_SERVER: &str = "spiffe://example.org/ns/perf/sa/server";

/// Bundles for the peer's domain plus two federated ones, as a sidecar in a small federation
/// would hold; the lookup is by the leaf's own trust domain.
fn bundles(cas: &[&Ca]) -> TrustBundles {
    let mut b = TrustBundles::new();
    for ca in cas {
        let td = TrustDomain::parse(ca.trust_domain()).expect("trust domain");
        b.insert_pem(&td, ca.bundle_pem().as_bytes())
            .expect("bundle");
    }
    b
}

fn svid(c: &mut Criterion) {
    let root = Ca::new("example.org");
    let inter = root.intermediate();
    let fed_a = Ca::new("partner-a.example");
    let fed_b = Ca::new("partner-b.example");
    let b = bundles(&[&root, &fed_a, &fed_b]);
    let p = provider();
    let algs = &p.signature_verification_algorithms;
    let direct = root.svid(PEER);
    let via_inter = inter.svid(PEER);
    assert_eq!(direct.chain.len(), 1);
    assert_eq!(via_inter.chain.len(), 2);
    let now = UnixTime::now();
    // Both must verify, or the figures would be those of an error path.
    for s in [&direct, &via_inter] {
        let id = verify_svid(&b, algs, &s.chain[0], &s.chain[1..], now, Usage::Client)
            .expect("bench SVID verifies");
        assert_eq!(id.as_str(), PEER);
    }

    let mut g = c.benchmark_group("svid");
    g.bench_function("verify_svid/root_signed", |bench| {
        bench.iter(|| {
            verify_svid(
                black_box(&b),
                algs,
                black_box(&direct.chain[0]),
                black_box(&direct.chain[1..]),
                now,
                Usage::Client,
            )
        })
    });
    g.bench_function("verify_svid/via_intermediate", |bench| {
        bench.iter(|| {
            verify_svid(
                black_box(&b),
                algs,
                black_box(&via_inter.chain[0]),
                black_box(&via_inter.chain[1..]),
                now,
                Usage::Client,
            )
        })
    });
    g.bench_function("leaf_spiffe_id", |bench| {
        bench.iter(|| leaf_spiffe_id(black_box(&direct.chain[0]), Some(Usage::Client)))
    });
    g.finish();
}

/// The sidecar's `inbound.ports` with 100 ports (8000..8100), each with 10 allow entries
/// (even entries exact IDs, odd entries namespace prefixes), compiled as the proxy does.
fn table() -> PolicyIndex {
    let ports: Vec<String> = (8000u16..8100)
        .map(|port| {
            let allow: Vec<String> = (0..10)
                .map(|i| {
                    if i % 2 == 0 {
                        format!("\"spiffe://example.org/ns/app{i}/sa/client-{port}\"")
                    } else {
                        format!("\"spiffe://example.org/ns/team{i}/*\"")
                    }
                })
                .collect();
            format!("{{port: {port}, allow: [{}]}}", allow.join(", "))
        })
        .collect();
    let yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {{name: bench, owner: perf}}\n\
         spec:\n  identity: {{certFile: a, keyFile: b, bundleDir: c}}\n  inbound:\n    ports: [{}]\n",
        ports.join(", ")
    );
    let cfg = ProxyConfig::parse(Path::new("bench.yaml"), &yaml).expect("config");
    let local = SpiffeId::parse(PEER_SERVER).expect("id");
    let policy = Policy::from_inbound_ports(&cfg, &local).expect("ports listed");
    PolicyIndex::compile([&policy], &local)
}

fn l4_authz(c: &mut Criterion) {
    let authz = table();
    let id = |s: &str| SpiffeId::parse(s).expect("id");
    let cases = [
        // (name, peer, port, expected verdict)
        (
            "allow_first_exact",
            id("spiffe://example.org/ns/app0/sa/client-8050"),
            8050,
            true,
        ),
        (
            "allow_last_prefix",
            id("spiffe://example.org/ns/team9/sa/worker"),
            8050,
            true,
        ),
        (
            "deny_not_in_allow_list",
            id("spiffe://example.org/ns/other/sa/intruder"),
            8050,
            false,
        ),
        (
            "deny_port_not_listed",
            id("spiffe://example.org/ns/app0/sa/client-8050"),
            9999,
            false,
        ),
    ];
    let mut g = c.benchmark_group("l4_authz");
    for (name, peer, port, allowed) in &cases {
        assert_eq!(authz.decide_tcp(peer, *port, 0).allowed, *allowed, "{name}");
        g.bench_function(*name, |bench| {
            bench.iter(|| black_box(&authz).decide_tcp(black_box(peer), black_box(*port), 0))
        });
    }
    g.finish();
}

fn policy_index(n: usize) -> PolicyIndex {
    // One YAML stream holds at most 1,024 documents (the parser's budget), so generate files
    // of 500 policies each, as an operator would split them.
    let mut policies = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        policies.extend(parse_chunk(chunk));
    }
    PolicyIndex::compile(&policies, &SpiffeId::parse(PEER_SERVER).expect("id"))
}

fn parse_chunk(ids: &[usize]) -> Vec<Policy> {
    let mut yaml = String::with_capacity(ids.len() * 700);
    for &i in ids {
        yaml += &format!(
            "---\napiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: p{i}, owner: team{t}, purpose: bench}}\n\
             spec:\n  target: spiffe://example.org/ns/perf/sa/server\n  ports:\n    - port: 8080\n      routes:\n\
             \x20       - {{name: list{i}, match: {{methods: [GET], path: {{prefix: /svc{i}/v1}}}}, allow: [spiffe://example.org/ns/team{t}/sa/c{i}, \"spiffe://example.org/ns/ops/*\"], deny: [spiffe://example.org/ns/ops/sa/intern]}}\n\
             \x20       - {{name: item{i}, match: {{path: {{template: \"/svc{i}/v1/items/{{id}}\"}}, headers: [{{name: x-tenant, value: t{t}}}]}}, allow: [spiffe://example.org/ns/team{t}/sa/c{i}]}}\n\
             \x20       - {{name: health{i}, match: {{path: {{exact: /svc{i}/health}}}}, allow: [\"spiffe://example.org/*\"], mode: dry-run}}\n\
             \x20   - port: {port}\n      protocol: tcp\n      rules: [{{name: db{i}, allow: [spiffe://example.org/ns/team{t}/sa/c{i}]}}]\n",
            t = i % 50,
            port = 10_000 + i % 5_000,
        );
    }
    Policy::parse_all(Path::new("bench.yaml"), &yaml).expect("generated policies")
}

fn policy(c: &mut Criterion) {
    let idx = policy_index(10_000);
    let id = |s: &str| SpiffeId::parse(s).expect("id");
    let owner = id("spiffe://example.org/ns/team7/sa/c7007");
    let ops = id("spiffe://example.org/ns/ops/sa/oncall");
    let intern = id("spiffe://example.org/ns/ops/sa/intern");
    let stranger = id("spiffe://example.org/ns/elsewhere/sa/x");
    let header = |name: &str| (name == "x-tenant").then_some("t7");
    let req = |peer, method, path| HttpRequest {
        peer,
        port: 8080,
        method,
        host: "svc.example.org",
        path,
        header,
        now: 1_790_000_000,
    };
    let cases = [
        (
            "allow_prefix_exact_id",
            req(&owner, "GET", "/svc7007/v1/orders"),
        ),
        (
            "allow_prefix_pattern",
            req(&ops, "GET", "/svc7007/v1/orders"),
        ),
        (
            "allow_template_header",
            req(&owner, "PUT", "/svc7007/v1/items/42"),
        ),
        ("deny_wins", req(&intern, "GET", "/svc7007/v1/orders")),
        (
            "default_deny_no_route",
            req(&owner, "GET", "/nothing/here/at/all"),
        ),
        (
            "default_deny_peer",
            req(&stranger, "GET", "/svc7007/v1/orders"),
        ),
    ];
    for (name, r) in &cases {
        assert!(
            idx.decide_http(r).allowed == name.starts_with("allow"),
            "{name}"
        );
    }
    let mut g = c.benchmark_group("policy");
    for (name, r) in &cases {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(idx.decide_http(black_box(r))))
        });
    }
    g.bench_function("tcp_allow", |b| {
        b.iter(|| black_box(idx.decide_tcp(black_box(&owner), black_box(12_007), 0)))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = svid, l4_authz, policy
}
criterion_main!(benches);
