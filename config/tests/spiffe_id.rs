use sigil_config::{IdPattern, SpiffeId, SpiffeIdError, TrustDomain};

fn td_byte_ok(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn path_byte_ok(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

#[test]
fn every_byte_as_trust_domain_character() {
    for b in 0u8..=255 {
        let mut id = b"spiffe://a".to_vec();
        id.push(b);
        id.extend_from_slice(b"b/x");
        let got = SpiffeId::from_bytes(&id);
        if b == b'/' {
            // '/' ends the trust domain: "spiffe://a/b/x" is a valid ID in domain "a".
            assert_eq!(got.unwrap().trust_domain_name(), "a");
            continue;
        }
        assert_eq!(got.is_ok(), td_byte_ok(b), "byte 0x{b:02x}: {got:?}");
        let td = TrustDomain::parse(&String::from_utf8_lossy(&id[9..12]));
        if b.is_ascii() {
            assert_eq!(
                td.is_ok(),
                td_byte_ok(b),
                "trust domain byte 0x{b:02x}: {td:?}"
            );
        }
        if let Err(e) = got {
            let want = match b {
                b'A'..=b'Z' => SpiffeIdError::TrustDomainUppercase { at: 10 },
                b':' => SpiffeIdError::Port,
                b'@' => SpiffeIdError::UserInfo,
                b'%' => SpiffeIdError::PercentEncoded { at: 10 },
                b'?' => SpiffeIdError::Query,
                b'#' => SpiffeIdError::Fragment,
                _ => SpiffeIdError::TrustDomainChar { byte: b, at: 10 },
            };
            assert_eq!(e, want, "byte 0x{b:02x}");
        }
    }
}

#[test]
fn every_byte_as_path_character() {
    for b in 0u8..=255 {
        let mut id = b"spiffe://example.org/a".to_vec();
        id.push(b);
        id.extend_from_slice(b"b");
        let got = SpiffeId::from_bytes(&id);
        if b == b'/' {
            assert_eq!(got.unwrap().path(), "/a/b");
            continue;
        }
        assert_eq!(got.is_ok(), path_byte_ok(b), "byte 0x{b:02x}: {got:?}");
        if let Err(e) = got {
            let want = match b {
                b'%' => SpiffeIdError::PercentEncoded { at: 22 },
                b'?' => SpiffeIdError::Query,
                b'#' => SpiffeIdError::Fragment,
                _ => SpiffeIdError::PathChar { byte: b, at: 22 },
            };
            assert_eq!(e, want, "byte 0x{b:02x}");
        }
    }
}

#[test]
fn spec_cases() {
    use SpiffeIdError::*;
    let cases: &[(&str, Result<(), SpiffeIdError>)] = &[
        ("spiffe://example.org/ns/prod/sa/web", Ok(())),
        ("spiffe://example.org", Ok(())),
        ("spiffe://a-b_c.d9/x.y-z_/A9", Ok(())),
        ("spiffe://example.org/...", Ok(())),
        ("", Err(Empty)),
        ("http://example.org/x", Err(WrongScheme)),
        ("SPIFFE://example.org/x", Err(WrongScheme)),
        ("spiffe:/example.org/x", Err(WrongScheme)),
        ("spiffe://", Err(EmptyTrustDomain)),
        ("spiffe:///x", Err(EmptyTrustDomain)),
        (
            "spiffe://Example.org/x",
            Err(TrustDomainUppercase { at: 9 }),
        ),
        ("spiffe://example.org:8080/x", Err(Port)),
        ("spiffe://user@example.org/x", Err(UserInfo)),
        ("spiffe://exa%6dple.org/x", Err(PercentEncoded { at: 12 })),
        ("spiffe://example.org/a%2fb", Err(PercentEncoded { at: 22 })),
        ("spiffe://example.org/x?q=1", Err(Query)),
        ("spiffe://example.org?q", Err(Query)),
        ("spiffe://example.org/x#f", Err(Fragment)),
        ("spiffe://example.org/", Err(TrailingSlash)),
        ("spiffe://example.org/a/", Err(TrailingSlash)),
        ("spiffe://example.org//a", Err(EmptySegment)),
        ("spiffe://example.org/a//b", Err(EmptySegment)),
        ("spiffe://example.org/./a", Err(DotSegment)),
        ("spiffe://example.org/a/..", Err(DotSegment)),
        ("spiffe://example.org/a/../b", Err(DotSegment)),
    ];
    for (input, want) in cases {
        let got = SpiffeId::parse(input).map(|_| ());
        assert_eq!(&got, want, "{input:?}");
    }
}

#[test]
fn length_limits() {
    let td255 = "a".repeat(255);
    assert!(SpiffeId::parse(&format!("spiffe://{td255}/x")).is_ok());
    let td256 = "a".repeat(256);
    assert_eq!(
        SpiffeId::parse(&format!("spiffe://{td256}/x")),
        Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
    );
    assert_eq!(
        TrustDomain::parse(&td256),
        Err(SpiffeIdError::TrustDomainTooLong { len: 256 })
    );
    let prefix = "spiffe://example.org/";
    let exact = format!("{prefix}{}", "p".repeat(2048 - prefix.len()));
    assert_eq!(exact.len(), 2048);
    assert!(SpiffeId::parse(&exact).is_ok());
    let over = format!("{exact}p");
    assert_eq!(
        SpiffeId::parse(&over),
        Err(SpiffeIdError::TooLong { len: 2049 })
    );
}

#[test]
fn parts() {
    let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    assert_eq!(id.trust_domain_name(), "example.org");
    assert_eq!(
        id.trust_domain(),
        TrustDomain::parse("example.org").unwrap()
    );
    assert_eq!(id.path(), "/ns/prod/sa/web");
    assert!(!id.is_trust_domain_id());
    assert!(SpiffeId::parse("spiffe://example.org")
        .unwrap()
        .is_trust_domain_id());
    assert_eq!(
        TrustDomain::parse("spiffe://example.org").unwrap().as_str(),
        "example.org"
    );
}

#[test]
fn patterns_match_whole_segments() {
    let p = IdPattern::parse("spiffe://example.org/ns/prod/*").unwrap();
    let id = |s| SpiffeId::parse(s).unwrap();
    assert!(p.matches(&id("spiffe://example.org/ns/prod/sa/web")));
    assert!(p.matches(&id("spiffe://example.org/ns/prod/x")));
    assert!(!p.matches(&id("spiffe://example.org/ns/production/x")));
    assert!(!p.matches(&id("spiffe://example.org/ns/prod")));
    assert!(!p.matches(&id("spiffe://other.org/ns/prod/x")));
    let td = IdPattern::parse("spiffe://example.org/*").unwrap();
    assert!(td.matches(&id("spiffe://example.org/a")));
    assert!(!td.matches(&id("spiffe://example.org.evil/a")));
    let exact = IdPattern::parse("spiffe://example.org/a").unwrap();
    assert!(exact.matches(&id("spiffe://example.org/a")));
    assert!(!exact.matches(&id("spiffe://example.org/a/b")));
    assert_eq!(
        IdPattern::parse("spiffe://example.org"),
        Err(SpiffeIdError::TrustDomainOnly)
    );
    assert!(IdPattern::parse("spiffe://example.org/a*").is_err());
    assert!(IdPattern::parse("spiffe://Example.org/*").is_err());
    assert_eq!(p.to_string(), "spiffe://example.org/ns/prod/*");
}
