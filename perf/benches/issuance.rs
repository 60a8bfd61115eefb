//! Criterion benchmark of the control plane's CA: one SVID issued, as `sigil-control` does it
//! for each `Issue` call, in three parts and whole.
//!
//! - `issuance/check_csr`: parse the CSR and verify its ECDSA P-256 signature, check the key
//!   type and the URI SAN (`sigil_filters::issuance::check_csr`).
//! - `issuance/sign`: the SVID signed over the CSR's key (`sigil_control::ca::Authority::issue`:
//!   the certificate built and signed with the CA's P-256 key).
//! - `issuance/whole`: both, plus the validity; what one core can issue per second is
//!   1 / this time (issue 15's goal: at least 2,000 per second on one core).
//!
//! The CA is made at bench start in a temporary directory by `sigil_control::ca::init`, the
//! CSR by `sigil_testkit::key_and_csr`. Run: `cargo bench -p sigil-perf --bench issuance`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sigil_config::{SpiffeId, TrustDomain};
use sigil_control::ca::{init, Authority};
use sigil_filters::issuance::{check_csr, validity};
use sigil_testkit::{key_and_csr, rcgen};

const ID: &str = "spiffe://example.org/ns/perf/sa/api";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

fn issuance(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("sigil-bench-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let td = TrustDomain::parse("example.org").expect("trust domain");
    init(&dir, &td, now(), Duration::from_secs(86_400), None).expect("make a CA");
    let ca = Authority::load(&dir).expect("load the CA");
    let id = SpiffeId::parse(ID).expect("SPIFFE ID");
    let (_key, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[ID]);
    let checked = check_csr(&csr, &id).expect("a good CSR");
    let v = validity(now(), Duration::from_secs(3600), ca.not_after()).expect("a validity");

    let mut g = c.benchmark_group("issuance");
    g.bench_function("check_csr", |b| {
        b.iter(|| check_csr(black_box(&csr), &id).expect("a good CSR"))
    });
    g.bench_function("sign", |b| {
        b.iter(|| ca.issue(black_box(&checked), &id, v).expect("signed"))
    });
    g.bench_function("whole", |b| {
        b.iter(|| {
            let checked = check_csr(black_box(&csr), &id).expect("a good CSR");
            let v = validity(now(), Duration::from_secs(3600), ca.not_after()).expect("validity");
            ca.issue(&checked, &id, v).expect("signed")
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = issuance
}
criterion_main!(benches);
