//! Criterion micro-benchmarks of Sigil's per-handshake and per-connection decisions.
//!
//! - `svid/*`: what a sidecar's rustls verifier does once per mTLS handshake —
//!   `verify_svid` (leaf shape + SPIFFE ID extraction + webpki chain validation against the
//!   bundle of the leaf's own trust domain), for a leaf signed directly by the root and for a
//!   leaf issued by an intermediate; and `leaf_spiffe_id` alone (X.509 parse + SAN/KU/EKU
//!   checks, no signature verification).
//! - `l4_authz/*`: `L4Authorizer::decide`, the once-per-connection port policy check, over a
//!   table of 100 ports x 10 patterns (half exact IDs, half `/*` prefixes), allowed and denied.
//!
//! Certificates are minted at bench start by `sigil_testkit::Ca` (ECDSA P-256, like every
//! SVID the testkit issues). Run: `cargo bench -p sigil-perf --bench hot_path`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls_pki_types::UnixTime;
use sigil_config::{IdPattern, SpiffeId, TrustDomain};
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::tls::provider;
use sigil_filters::{verify_svid, L4Authorizer, TrustBundles, Usage};
use sigil_testkit::Ca;

const PEER: &str = "spiffe://example.org/ns/perf/sa/client";

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

/// 100 ports (8000..8100), each with 10 allow entries: even entries exact IDs, odd entries
/// namespace prefixes.
fn table() -> L4Authorizer {
    L4Authorizer::new((8000u16..8100).map(|port| {
        let allow = (0..10)
            .map(|i| {
                let s = if i % 2 == 0 {
                    format!("spiffe://example.org/ns/app{i}/sa/client-{port}")
                } else {
                    format!("spiffe://example.org/ns/team{i}/*")
                };
                IdPattern::parse(&s).expect("pattern")
            })
            .collect();
        (port, allow)
    }))
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
        assert_eq!(authz.decide(peer, *port).allowed, *allowed, "{name}");
        g.bench_function(*name, |bench| {
            bench.iter(|| black_box(&authz).decide(black_box(peer), black_box(*port)))
        });
    }
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
    targets = svid, l4_authz
}
criterion_main!(benches);
