use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use std::path::Path;

use sigil_config::{Policy, ProxyConfig, SpiffeId, TrustDomain};
use sigil_filters::policy::Rule;
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::tls::provider;
use sigil_filters::{
    verify_svid, IdentityError, LocalIdentity, PolicyIndex, SvidError, TrustBundles, Usage,
};
use sigil_testkit::rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
use sigil_testkit::{Ca, Svid, SvidSpec};

const A: &str = "spiffe://example.org/ns/demo/sa/a";

fn bundles(cas: &[&Ca]) -> TrustBundles {
    let mut b = TrustBundles::new();
    for ca in cas {
        let td = TrustDomain::parse(ca.trust_domain()).unwrap();
        b.insert_pem(&td, ca.bundle_pem().as_bytes()).unwrap();
    }
    b
}

fn verify(b: &TrustBundles, svid: &Svid, usage: Usage) -> Result<SpiffeId, SvidError> {
    let p = provider();
    verify_svid(
        b,
        &p.signature_verification_algorithms,
        &svid.chain[0],
        &svid.chain[1..],
        UnixTime::now(),
        usage,
    )
}

#[test]
fn good_svids_verify_for_both_uses_and_through_intermediates() {
    let ca = Ca::new("example.org");
    let b = bundles(&[&ca]);
    for usage in [Usage::Client, Usage::Server] {
        assert_eq!(verify(&b, &ca.svid(A), usage).unwrap().as_str(), A);
    }
    let inter = ca.intermediate();
    assert_eq!(
        verify(&b, &inter.svid(A), Usage::Client).unwrap().as_str(),
        A
    );
    // An EKU that names only the needed use is fine; no EKU at all is fine.
    let only_client = SvidSpec::new(A).ext_key_usages(vec![Eku::ClientAuth]);
    assert!(verify(&b, &ca.issue(&only_client), Usage::Client).is_ok());
    let no_eku = SvidSpec::new(A).ext_key_usages(vec![]);
    assert!(verify(&b, &ca.issue(&no_eku), Usage::Server).is_ok());
}

#[test]
fn every_bad_svid_is_refused_with_its_reason() {
    let ca = Ca::new("example.org");
    let other = Ca::new("other.org");
    let stranger = Ca::new("stranger.org");
    let b = bundles(&[&ca, &other]);
    let id_b = "spiffe://other.org/ns/x/sa/b";
    let cases: Vec<(&str, Svid, Usage, &str)> = vec![
        (
            "untrusted trust domain",
            stranger.svid("spiffe://stranger.org/w"),
            Usage::Client,
            "untrusted_domain",
        ),
        (
            "CA of example.org issuing an other.org ID",
            ca.svid(id_b),
            Usage::Client,
            "untrusted_issuer",
        ),
        (
            "expired",
            ca.issue(&SvidSpec::new(A).expired()),
            Usage::Client,
            "expired",
        ),
        (
            "not yet valid",
            ca.issue(&SvidSpec::new(A).validity(3600, Duration::from_secs(3600))),
            Usage::Client,
            "not_yet_valid",
        ),
        (
            "two URI SANs",
            ca.issue(&SvidSpec::new(A).uris(&[A, "spiffe://example.org/b"])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "no URI SAN",
            ca.issue(&SvidSpec::new(A).uris(&[])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "non-SPIFFE URI",
            ca.issue(&SvidSpec::new(A).uris(&["https://example.org/a"])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "trust domain ID as SVID",
            ca.issue(&SvidSpec::new("spiffe://example.org")),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "CA certificate as leaf",
            ca.issue(&SvidSpec::new(A).ca()),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "no digitalSignature",
            ca.issue(&SvidSpec::new(A).key_usages(vec![Ku::KeyEncipherment])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "keyCertSign on leaf",
            ca.issue(&SvidSpec::new(A).key_usages(vec![Ku::DigitalSignature, Ku::KeyCertSign])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "no keyUsage",
            ca.issue(&SvidSpec::new(A).key_usages(vec![])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "EKU serverAuth only, used as client",
            ca.issue(&SvidSpec::new(A).ext_key_usages(vec![Eku::ServerAuth])),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "empty Subject, SAN not critical",
            ca.issue(&SvidSpec::new(A).empty_subject().san_critical(false)),
            Usage::Client,
            "invalid_svid",
        ),
        (
            "EKU clientAuth only, used as server",
            ca.issue(&SvidSpec::new(A).ext_key_usages(vec![Eku::ClientAuth])),
            Usage::Server,
            "invalid_svid",
        ),
    ];
    for (name, svid, usage, reason) in cases {
        let err = verify(&b, &svid, usage).expect_err(name);
        assert_eq!(err.reason(), reason, "{name}: {err}");
        assert!(!err.to_string().is_empty());
    }
    let garbage = CertificateDer::from(b"\x30\x03garbage".to_vec());
    let p = provider();
    let err = verify_svid(
        &b,
        &p.signature_verification_algorithms,
        &garbage,
        &[],
        UnixTime::now(),
        Usage::Client,
    )
    .unwrap_err();
    assert!(matches!(err, SvidError::Malformed(_)), "{err:?}");
    assert_eq!(
        leaf_spiffe_id(&ca.issue(&SvidSpec::new(A).uris(&[A, A])).chain[0], None),
        Err(SvidError::UriSanCount(2))
    );
}

#[test]
fn an_empty_subject_needs_a_critical_san() {
    let ca = Ca::new("example.org");
    let b = bundles(&[&ca]);
    let leaf = |spec: SvidSpec| leaf_spiffe_id(&ca.issue(&spec).chain[0], None);
    // The shapes RFC 5280 allows: a Subject (SAN critical or not), or none and a critical SAN.
    assert_eq!(leaf(SvidSpec::new(A)).unwrap().as_str(), A);
    assert_eq!(
        leaf(SvidSpec::new(A).san_critical(true)).unwrap().as_str(),
        A
    );
    assert_eq!(
        leaf(SvidSpec::new(A).san_critical(false)).unwrap().as_str(),
        A
    );
    assert_eq!(leaf(SvidSpec::new(A).empty_subject()).unwrap().as_str(), A);
    let both = SvidSpec::new(A).empty_subject().san_critical(true);
    assert_eq!(
        verify(&b, &ca.issue(&both), Usage::Server)
            .unwrap()
            .as_str(),
        A
    );
    // No Subject and a SAN that a relying party may ignore: refused, and it says why.
    let bad = SvidSpec::new(A).empty_subject().san_critical(false);
    let err = leaf(bad.clone()).unwrap_err();
    assert_eq!(err, SvidError::SanNotCritical);
    let text = err.to_string();
    assert!(
        text.contains("empty Subject") && text.contains("critical") && text.contains("5280"),
        "{text}"
    );
    assert_eq!(
        verify(&b, &ca.issue(&bad), Usage::Client).unwrap_err(),
        SvidError::SanNotCritical
    );
    // As a local SVID too: the proxy refuses to present one.
    let svid = ca.issue(&bad);
    let p = provider();
    let refused = LocalIdentity::from_pem(
        svid.chain_pem().as_bytes(),
        svid.key_pem().as_bytes(),
        UnixTime::now(),
        None,
        &p,
    );
    let Err(err) = refused else {
        panic!("a local SVID with no Subject and a non-critical SAN was accepted");
    };
    assert_eq!(err, IdentityError::Svid(SvidError::SanNotCritical));
}

#[test]
fn bundles_federate_and_empty_bundle_distrusts() {
    let ca = Ca::new("example.org");
    let other = Ca::new("other.org");
    let mut b = bundles(&[&ca, &other]);
    assert!(verify(&b, &other.svid("spiffe://other.org/w"), Usage::Client).is_ok());
    assert_eq!(b.domains(), vec!["example.org", "other.org"]);
    b.insert_pem(&TrustDomain::parse("other.org").unwrap(), b"\n")
        .unwrap();
    let err = verify(&b, &other.svid("spiffe://other.org/w"), Usage::Client).unwrap_err();
    assert_eq!(err, SvidError::EmptyBundle("other.org".into()));
    assert_eq!(err.reason(), "untrusted_domain");
    // A half-written bundle file is refused, not read as "empty".
    let pem = ca.bundle_pem();
    let td = TrustDomain::parse("example.org").unwrap();
    assert!(b.insert_pem(&td, &pem.as_bytes()[..pem.len() / 2]).is_err());
    assert!(b.insert_pem(&td, b"not a pem at all").is_err());
    // The failed updates left the good example.org bundle in place.
    assert!(verify(&b, &ca.svid(A), Usage::Client).is_ok());
}

#[test]
fn local_identity_refuses_mismatched_expired_partial_and_wrong_id() {
    let ca = Ca::new("example.org");
    let p = provider();
    let now = UnixTime::now();
    let good = ca.svid(A);
    let other = ca.svid(A);
    let cert = good.chain_pem();
    let key = good.key_pem();
    let id = LocalIdentity::from_pem(cert.as_bytes(), key.as_bytes(), now, None, &p).unwrap();
    assert_eq!(id.id().as_str(), A);
    assert!(!format!("{id:?}").contains("PRIVATE"));
    let mismatched =
        LocalIdentity::from_pem(cert.as_bytes(), other.key_pem().as_bytes(), now, None, &p);
    assert_eq!(mismatched.unwrap_err(), IdentityError::KeyMismatch);
    let expired = ca.issue(&SvidSpec::new(A).expired());
    let e = LocalIdentity::from_pem(
        expired.chain_pem().as_bytes(),
        expired.key_pem().as_bytes(),
        now,
        None,
        &p,
    );
    assert!(matches!(e, Err(IdentityError::Expired { .. })), "{e:?}");
    let partial = &cert.as_bytes()[..cert.len() - 40];
    assert!(LocalIdentity::from_pem(partial, key.as_bytes(), now, None, &p).is_err());
    assert!(
        LocalIdentity::from_pem(cert.as_bytes(), &key.as_bytes()[..30], now, None, &p).is_err()
    );
    let want = SpiffeId::parse("spiffe://example.org/other").unwrap();
    let e = LocalIdentity::from_pem(cert.as_bytes(), key.as_bytes(), now, Some(&want), &p);
    assert!(matches!(e, Err(IdentityError::WrongId { .. })), "{e:?}");
}

/// The sidecar's own `inbound.ports`, compiled as the proxy does (a TCP policy targeting the
/// local ID), decided per connection.
fn inbound_ports(ports: &str) -> PolicyIndex {
    let yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {{name: b, owner: t}}\nspec:\n  \
         identity: {{certFile: a, keyFile: b, bundleDir: c}}\n  inbound:\n    ports: {ports}\n"
    );
    let cfg = ProxyConfig::parse(Path::new("b.yaml"), &yaml).unwrap();
    let local = SpiffeId::parse("spiffe://example.org/ns/demo/sa/b").unwrap();
    let policies: Vec<Policy> = Policy::from_inbound_ports(&cfg, &local)
        .into_iter()
        .collect();
    PolicyIndex::compile(&policies, &local)
}

#[test]
fn l4_authorization_by_inbound_ports() {
    let id = |s| SpiffeId::parse(s).unwrap();
    let open = inbound_ports("[]");
    let v = open.decide_tcp(&id(A), 8080, 0);
    assert!(v.allowed);
    assert_eq!(v.rule, Rule::NoPolicy);

    let authz = inbound_ports(&format!(
        "[{{port: 8080, allow: [\"spiffe://example.org/ns/prod/*\", {A}]}}, {{port: 9090, allow: []}}]"
    ));
    let v = authz.decide_tcp(&id(A), 8080, 0);
    assert!(v.allowed);
    assert!(
        matches!(
            v.rule,
            Rule::Matched {
                rule: "port-8080",
                ..
            }
        ),
        "{:?}",
        v.rule
    );
    assert!(
        authz
            .decide_tcp(&id("spiffe://example.org/ns/prod/sa/x"), 8080, 0)
            .allowed
    );
    // A prefix pattern matches whole segments only.
    assert!(
        !authz
            .decide_tcp(&id("spiffe://example.org/ns/production/sa/x"), 8080, 0)
            .allowed
    );
    let v = authz.decide_tcp(&id("spiffe://example.org/ns/dev/sa/x"), 8080, 0);
    assert_eq!(
        (v.allowed, v.rule),
        (false, Rule::DefaultDeny { port: 8080 })
    );
    // Listed with nobody allowed, and not listed at all: both denied.
    assert!(!authz.decide_tcp(&id(A), 9090, 0).allowed);
    let v = authz.decide_tcp(&id(A), 7070, 0);
    assert!(!v.allowed);
    assert!(v.rule.to_string().contains("default deny"), "{}", v.rule);
}

#[test]
fn revocations_cover_by_id_and_by_issuance() {
    use sigil_config::policy::Timestamp;
    use sigil_config::Revocation;
    use sigil_filters::Revocations;
    let ca = Ca::new("example.org");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let cutoff = now - 600;
    let yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {{name: r, owner: sec}}\n\
         spec:\n  spiffeId: {A}\n  reason: rebuilt\n  issuedBefore: {}\n",
        Timestamp(cutoff)
    );
    let list = Revocation::parse_all(Path::new("r.yaml"), &yaml).unwrap();
    let revs = Revocations::new(&list);
    let old = ca.issue(&SvidSpec::new(A).validity(-3600, Duration::from_secs(7200)));
    let fresh = ca.issue(&SvidSpec::new(A).validity(-60, Duration::from_secs(3600)));
    let other = ca.svid("spiffe://example.org/ns/demo/sa/other");
    let a = SpiffeId::parse(A).unwrap();
    let e = revs.check(&a, &old.chain[0]).unwrap_err();
    assert_eq!(e.reason(), "revoked");
    assert!(e.to_string().contains("revoked by r: rebuilt"), "{e}");
    assert!(revs.check(&a, &fresh.chain[0]).is_ok());
    let o = SpiffeId::parse("spiffe://example.org/ns/demo/sa/other").unwrap();
    assert!(revs.check(&o, &other.chain[0]).is_ok());
    // Without issuedBefore every SVID of the ID is revoked.
    let all = Revocation::parse_all(
        Path::new("r.yaml"),
        &yaml.replace(&format!("  issuedBefore: {}\n", Timestamp(cutoff)), ""),
    )
    .unwrap();
    assert!(Revocations::new(&all).check(&a, &fresh.chain[0]).is_err());
}

/// The bytes a sidecar's outbound side sends first: its ClientHello, from the real client
/// configuration.
fn client_hello(carries: sigil_filters::tls::Carries) -> Vec<u8> {
    let ca = Ca::new("example.org");
    let svid = ca.svid(A);
    let p = provider();
    let id = LocalIdentity::from_pem(
        svid.chain_pem().as_bytes(),
        svid.key_pem().as_bytes(),
        UnixTime::now(),
        None,
        &p,
    )
    .unwrap();
    let config = sigil_filters::tls::client_config(
        &id,
        std::sync::Arc::new(bundles(&[&ca])),
        std::sync::Arc::new(sigil_filters::Revocations::new(&[])),
        p,
        SpiffeId::parse(A).unwrap(),
        carries,
    );
    let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

#[test]
fn a_client_hello_tells_what_the_connection_will_carry() {
    use sigil_filters::tls::{offered, Carries};
    for carries in [Carries::Tcp, Carries::Http2, Carries::Http1] {
        let hello = client_hello(carries);
        assert_eq!(offered(&hello), Some(carries), "{carries:?}");
        // A ClientHello cut short (the rest not arrived yet) tells nothing.
        assert_eq!(offered(&hello[..hello.len() / 2]), None, "{carries:?} cut");
    }
    assert_eq!(offered(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None);
    assert_eq!(offered(b""), None);
}
