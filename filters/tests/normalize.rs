//! Request-target normalization: every spelling that could slip past a route check is either
//! normalized to the one routes are written in, or refused with a reason.

use std::borrow::Cow;

use sigil_filters::normalize::{
    effective_host, normalize_path, HostField, HostProblem, TargetError,
};

/// Runs a table of (input, expected path, expected query) and reports every failing row at once.
fn check_normalized(cases: &[(&str, &str, Option<&str>)]) {
    let mut failures = Vec::new();
    for &(input, path, query) in cases {
        match normalize_path(input) {
            Ok((got, got_query)) if got == path && got_query == query => {}
            other => failures.push(format!(
                "{input:?}: want Ok(({path:?}, {query:?})), got {other:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn check_refused(cases: &[(&str, TargetError)]) {
    let mut failures = Vec::new();
    for (input, want) in cases {
        match normalize_path(input) {
            Err(got) if got == *want => {}
            other => failures.push(format!("{input:?}: want Err({want:?}), got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn already_normal_paths_are_unchanged() {
    check_normalized(&[
        ("/", "/", None),
        ("/a/b", "/a/b", None),
        ("/a/b/", "/a/b/", None),
        ("/.well-known/spiffe", "/.well-known/spiffe", None),
        ("/a/...", "/a/...", None),
        ("/a/..b/.c", "/a/..b/.c", None),
        ("/a;b=1/c", "/a;b=1/c", None),
        ("/a%3Fb%23c%25", "/a%3Fb%23c%25", None),
        ("/json/{\"k\"}|x", "/json/{\"k\"}|x", None),
    ]);
}

#[test]
fn already_normal_path_is_borrowed_from_the_input() {
    let input = "/api/v1/users/%C3%A9?id=7&x=%2f";
    let (path, query) = normalize_path(input).unwrap();
    match path {
        Cow::Borrowed(p) => assert!(std::ptr::eq(p.as_ptr(), input.as_ptr())),
        Cow::Owned(p) => panic!("allocated for an already normal path: {p:?}"),
    }
    assert_eq!(path, "/api/v1/users/%C3%A9");
    assert_eq!(query, Some("id=7&x=%2f"));
}

#[test]
fn duplicate_slashes_are_merged() {
    check_normalized(&[
        ("//a///b", "/a/b", None),
        ("/a//b//", "/a/b/", None),
        ("//", "/", None),
        ("///", "/", None),
    ]);
}

#[test]
fn dot_segments_are_removed() {
    check_normalized(&[
        ("/a/./b", "/a/b", None),
        ("/a/../b", "/b", None),
        ("/a/b/../../c", "/c", None),
        ("/./a", "/a", None),
        ("/.", "/", None),
        // A final dot segment leaves its slash, as in RFC 3986 §5.2.4.
        ("/a/b/..", "/a/", None),
        ("/a/.", "/a/", None),
        ("/a/b/./", "/a/b/", None),
    ]);
}

#[test]
fn dot_dot_above_the_root_stays_at_the_root() {
    check_normalized(&[
        ("/..", "/", None),
        ("/../", "/", None),
        ("/../../etc/passwd", "/etc/passwd", None),
        ("/a/../../admin", "/admin", None),
        ("/%2e%2e/%2e%2e/admin", "/admin", None),
    ]);
}

#[test]
fn encoded_dots_count_as_dot_segments() {
    check_normalized(&[
        ("/a/%2e%2e/b", "/b", None),
        ("/a/%2E%2E/b", "/b", None),
        ("/a/%2E./b", "/b", None),
        ("/a/.%2e/b", "/b", None),
        ("/a/%2e/b", "/a/b", None),
        ("/a/%2E%2e/%2e/b/", "/b/", None),
        ("/public/%2e%2e/admin", "/admin", None),
        ("/a/b/%2e", "/a/b/", None),
        ("/a%2ejson", "/a.json", None),
    ]);
}

#[test]
fn unreserved_escapes_are_decoded_in_either_case() {
    check_normalized(&[
        ("/%61dmin", "/admin", None),
        ("/%41DMIN", "/ADMIN", None),
        ("/adm%69n/", "/admin/", None),
        ("/%7Euser/%7e", "/~user/~", None),
        ("/%2D%5F%2d%5f", "/-_-_", None),
        ("/%30%39", "/09", None),
    ]);
}

#[test]
fn other_escapes_stay_encoded_with_uppercase_hex() {
    check_normalized(&[
        ("/a%3fb", "/a%3Fb", None),
        ("/a%23b", "/a%23b", None),
        ("/100%25", "/100%25", None),
        ("/caf%c3%a9", "/caf%C3%A9", None),
        ("/a%20b", "/a%20b", None),
        ("/%2525", "/%2525", None),
        ("/x%3b/%40", "/x%3B/%40", None),
    ]);
}

#[test]
fn query_is_separate_and_untouched() {
    check_normalized(&[
        ("/a?x=1", "/a", Some("x=1")),
        ("/a?", "/a", Some("")),
        ("/a?b?c", "/a", Some("b?c")),
        ("/a/../b?q=/../%2f%zz%00\\", "/b", Some("q=/../%2f%zz%00\\")),
        ("//%61//?%61", "/a/", Some("%61")),
        ("/?x=%2e%2e", "/", Some("x=%2e%2e")),
    ]);
}

#[test]
fn targets_that_are_not_a_path_are_refused() {
    check_refused(&[
        ("", TargetError::NotOriginForm),
        ("a/b", TargetError::NotOriginForm),
        ("?x=1", TargetError::NotOriginForm),
        ("http://evil.example/admin", TargetError::NotOriginForm),
        ("%2fadmin", TargetError::NotOriginForm),
        ("*", TargetError::AsteriskForm),
        ("*?x", TargetError::AsteriskForm),
    ]);
}

#[test]
fn encoded_slashes_and_backslashes_are_refused() {
    check_refused(&[
        ("/a%2fb", TargetError::EncodedSlash),
        ("/a%2Fb", TargetError::EncodedSlash),
        ("/admin/..%2f", TargetError::EncodedSlash),
        ("/public/..%2Fadmin", TargetError::EncodedSlash),
        // Refused even inside a segment that `..` would drop.
        ("/a/%2f/../b", TargetError::EncodedSlash),
        ("/a%5cb", TargetError::EncodedBackslash),
        ("/a/..%5C..%5Cadmin", TargetError::EncodedBackslash),
        ("/a\\b", TargetError::Backslash),
        ("/public\\..\\admin", TargetError::Backslash),
    ]);
}

#[test]
fn nul_and_control_bytes_are_refused() {
    check_refused(&[
        ("/a%00", TargetError::NulByte),
        ("/a%00.html", TargetError::NulByte),
        ("/a\0", TargetError::NulByte),
        ("/a?x\0", TargetError::NulByte),
        ("/a%0a", TargetError::EncodedControl),
        ("/admin%0D%0A", TargetError::EncodedControl),
        ("/a%09", TargetError::EncodedControl),
        ("/a%7f", TargetError::EncodedControl),
        ("/a\nb", TargetError::ControlOrNonAscii),
        ("/a\tb", TargetError::ControlOrNonAscii),
        ("/a\x7f", TargetError::ControlOrNonAscii),
        ("/a b", TargetError::ControlOrNonAscii),
        ("/a?x y", TargetError::ControlOrNonAscii),
        ("/a?x\r\n", TargetError::ControlOrNonAscii),
    ]);
}

#[test]
fn non_ascii_bytes_are_refused() {
    check_refused(&[
        ("/café", TargetError::ControlOrNonAscii),
        ("/\u{FF0F}admin", TargetError::ControlOrNonAscii),
        ("/a?q=é", TargetError::ControlOrNonAscii),
    ]);
}

#[test]
fn malformed_escapes_are_refused() {
    check_refused(&[
        ("/a%zz", TargetError::BadPercentEncoding),
        ("/a%2", TargetError::BadPercentEncoding),
        ("/a%", TargetError::BadPercentEncoding),
        ("/a%g1", TargetError::BadPercentEncoding),
        ("/a%%41", TargetError::BadPercentEncoding),
        ("/a%2?x", TargetError::BadPercentEncoding),
        ("/%2%65", TargetError::BadPercentEncoding),
    ]);
}

#[test]
fn fragments_are_refused() {
    check_refused(&[
        ("/a#frag", TargetError::Fragment),
        ("/a?x#y", TargetError::Fragment),
        ("/#/../admin", TargetError::Fragment),
    ]);
}

#[test]
fn dot_segments_with_parameters_are_refused() {
    check_refused(&[
        ("/public/..;/admin", TargetError::DotSegmentWithParams),
        (
            "/public/..;jsessionid=1/admin",
            TargetError::DotSegmentWithParams,
        ),
        ("/a/.;x/b", TargetError::DotSegmentWithParams),
        ("/a/%2e%2e;/b", TargetError::DotSegmentWithParams),
        ("/a/%2E;/b", TargetError::DotSegmentWithParams),
    ]);
}

#[test]
fn dot_dot_after_a_double_slash_is_refused() {
    check_refused(&[
        ("/public//../admin", TargetError::DotSegmentAfterEmpty),
        ("//../admin", TargetError::DotSegmentAfterEmpty),
        ("/a//b/../..", TargetError::DotSegmentAfterEmpty),
        // Same result either way, but the rule stays simple: no `..` after a `//`.
        ("//a/..", TargetError::DotSegmentAfterEmpty),
        ("/a//%2e%2e/b", TargetError::DotSegmentAfterEmpty),
    ]);
    // A `..` before the `//` means the same to every server.
    check_normalized(&[("/a/../b//c", "/b/c", None)]);
}

#[test]
fn every_error_has_a_distinct_one_line_reason() {
    let errors = [
        TargetError::NotOriginForm,
        TargetError::AsteriskForm,
        TargetError::Fragment,
        TargetError::EncodedSlash,
        TargetError::EncodedBackslash,
        TargetError::Backslash,
        TargetError::NulByte,
        TargetError::BadPercentEncoding,
        TargetError::ControlOrNonAscii,
        TargetError::EncodedControl,
        TargetError::DotSegmentWithParams,
        TargetError::DotSegmentAfterEmpty,
        TargetError::MissingHost,
        TargetError::InvalidHost {
            field: HostField::HostHeader,
            problem: HostProblem::BadPort,
        },
        TargetError::HostMismatch {
            target: "a.example".into(),
            host: "b.example".into(),
        },
    ];
    let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for reason in &reasons {
        assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
    }
    let mut unique = reasons.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), reasons.len(), "{reasons:#?}");
    assert_eq!(
        reasons[13],
        "invalid Host header: port is not a number from 1 to 65535"
    );
    assert!(reasons[14].contains("a.example") && reasons[14].contains("b.example"));
}

type HostCase<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    u16,
    Result<&'a str, TargetError>,
);

fn check_hosts(cases: &[HostCase<'_>]) {
    let mut failures = Vec::new();
    for (target, host, default_port, want) in cases {
        let got = effective_host(*target, *host, *default_port);
        if got.as_deref().map_err(Clone::clone) != *want {
            failures.push(format!(
                "target {target:?}, Host {host:?}, default port {default_port}: \
                 want {want:?}, got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn invalid(field: HostField, problem: HostProblem) -> TargetError {
    TargetError::InvalidHost { field, problem }
}

#[test]
fn origin_form_uses_the_host_header() {
    check_hosts(&[
        (None, Some("api.example"), 80, Ok("api.example")),
        (None, Some("api.example:8080"), 80, Ok("api.example:8080")),
        (None, Some("API.Example"), 80, Ok("api.example")),
        (
            None,
            Some("a_b.svc.cluster.local"),
            80,
            Ok("a_b.svc.cluster.local"),
        ),
        (None, Some("10.1.2.3:8080"), 80, Ok("10.1.2.3:8080")),
        (None, None, 80, Err(TargetError::MissingHost)),
    ]);
}

#[test]
fn default_port_is_the_same_as_no_port() {
    check_hosts(&[
        (None, Some("api.example:80"), 80, Ok("api.example")),
        (None, Some("api.example:443"), 443, Ok("api.example")),
        (None, Some("api.example:443"), 80, Ok("api.example:443")),
        (None, Some("api.example:80"), 443, Ok("api.example:80")),
        (None, Some("api.example:"), 80, Ok("api.example")),
        (None, Some("api.example:0080"), 80, Ok("api.example")),
        (None, Some("api.example:08080"), 80, Ok("api.example:8080")),
        (
            Some("api.example"),
            Some("api.example:80"),
            80,
            Ok("api.example"),
        ),
        (
            Some("api.example:443"),
            Some("api.example"),
            443,
            Ok("api.example"),
        ),
    ]);
}

#[test]
fn trailing_dot_is_dropped() {
    check_hosts(&[
        (None, Some("api.example."), 80, Ok("api.example")),
        (None, Some("api.example.:8080"), 80, Ok("api.example:8080")),
        (
            Some("api.example."),
            Some("api.example"),
            80,
            Ok("api.example"),
        ),
    ]);
}

#[test]
fn absolute_form_must_agree_with_host() {
    check_hosts(&[
        (Some("api.example"), None, 80, Ok("api.example")),
        (Some("api.example:8080"), None, 80, Ok("api.example:8080")),
        (
            Some("api.example:8080"),
            Some("api.example:8080"),
            80,
            Ok("api.example:8080"),
        ),
        (
            Some("api.example"),
            Some("API.EXAMPLE:80"),
            80,
            Ok("api.example"),
        ),
        (
            Some("evil.example"),
            Some("api.example"),
            80,
            Err(TargetError::HostMismatch {
                target: "evil.example".into(),
                host: "api.example".into(),
            }),
        ),
        (
            Some("api.example:8080"),
            Some("api.example"),
            80,
            Err(TargetError::HostMismatch {
                target: "api.example:8080".into(),
                host: "api.example".into(),
            }),
        ),
        (
            Some("api.example:443"),
            Some("api.example:80"),
            80,
            Err(TargetError::HostMismatch {
                target: "api.example:443".into(),
                host: "api.example:80".into(),
            }),
        ),
        // A valid target does not excuse a Host header that is not a host.
        (
            Some("api.example"),
            Some("api.example/admin"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadChar)),
        ),
    ]);
}

#[test]
fn ipv6_literals_are_compared_in_canonical_form() {
    check_hosts(&[
        (None, Some("[::1]:8080"), 80, Ok("[::1]:8080")),
        (Some("[::1]:8080"), None, 80, Ok("[::1]:8080")),
        (None, Some("[::1]"), 80, Ok("[::1]")),
        (None, Some("[::1]:80"), 80, Ok("[::1]")),
        (None, Some("[0:0:0:0:0:0:0:1]"), 80, Ok("[::1]")),
        (None, Some("[2001:DB8::1]"), 80, Ok("[2001:db8::1]")),
        (
            Some("[::1]:8080"),
            Some("[0::1]:8080"),
            80,
            Ok("[::1]:8080"),
        ),
        (
            Some("[::1]:8080"),
            Some("[::2]:8080"),
            80,
            Err(TargetError::HostMismatch {
                target: "[::1]:8080".into(),
                host: "[::2]:8080".into(),
            }),
        ),
        (
            None,
            Some("[fe80::1%25eth0]"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadIpLiteral)),
        ),
        (
            None,
            Some("[v1.x]"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadIpLiteral)),
        ),
        (
            None,
            Some("[::1"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadIpLiteral)),
        ),
        (
            None,
            Some("[::1]x"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadIpLiteral)),
        ),
        (
            None,
            Some("[1.2.3.4]"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadIpLiteral)),
        ),
        (
            None,
            Some("::1"),
            80,
            Err(invalid(HostField::HostHeader, HostProblem::BadChar)),
        ),
    ]);
}

#[test]
fn invalid_hosts_are_refused() {
    use HostField::{HostHeader, TargetAuthority};
    check_hosts(&[
        (
            None,
            Some(""),
            80,
            Err(invalid(HostHeader, HostProblem::Empty)),
        ),
        (
            None,
            Some("."),
            80,
            Err(invalid(HostHeader, HostProblem::Empty)),
        ),
        (
            None,
            Some(":80"),
            80,
            Err(invalid(HostHeader, HostProblem::Empty)),
        ),
        (
            Some("user@api.example"),
            None,
            80,
            Err(invalid(TargetAuthority, HostProblem::UserInfo)),
        ),
        (
            None,
            Some("api.example@evil.example"),
            80,
            Err(invalid(HostHeader, HostProblem::UserInfo)),
        ),
        (
            None,
            Some("a b"),
            80,
            Err(invalid(HostHeader, HostProblem::BadChar)),
        ),
        (
            None,
            Some("api%2eexample"),
            80,
            Err(invalid(HostHeader, HostProblem::BadChar)),
        ),
        (
            None,
            Some("api.example/x"),
            80,
            Err(invalid(HostHeader, HostProblem::BadChar)),
        ),
        (
            None,
            Some("api.exämple"),
            80,
            Err(invalid(HostHeader, HostProblem::BadChar)),
        ),
        (
            None,
            Some("a..b"),
            80,
            Err(invalid(HostHeader, HostProblem::EmptyLabel)),
        ),
        (
            None,
            Some(".a"),
            80,
            Err(invalid(HostHeader, HostProblem::EmptyLabel)),
        ),
        (
            None,
            Some("a.."),
            80,
            Err(invalid(HostHeader, HostProblem::EmptyLabel)),
        ),
        (
            None,
            Some("api.example:0"),
            80,
            Err(invalid(HostHeader, HostProblem::BadPort)),
        ),
        (
            None,
            Some("api.example:65536"),
            80,
            Err(invalid(HostHeader, HostProblem::BadPort)),
        ),
        (
            None,
            Some("api.example:+80"),
            80,
            Err(invalid(HostHeader, HostProblem::BadPort)),
        ),
        (
            None,
            Some("api.example:8o"),
            80,
            Err(invalid(HostHeader, HostProblem::BadPort)),
        ),
        (
            None,
            Some("api.example:80:80"),
            80,
            Err(invalid(HostHeader, HostProblem::BadChar)),
        ),
        (
            Some("bad host"),
            Some("api.example"),
            80,
            Err(invalid(TargetAuthority, HostProblem::BadChar)),
        ),
    ]);
}

#[test]
fn numeric_hosts_must_be_dotted_quads() {
    use HostField::HostHeader;
    check_hosts(&[
        (None, Some("127.0.0.1"), 80, Ok("127.0.0.1")),
        (None, Some("127.0.0.1."), 80, Ok("127.0.0.1")),
        (
            None,
            Some("127.1"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("2130706433"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("0x7f.0.0.1"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("127.0.0.0x1"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("010.0.0.1"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("256.0.0.1"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        (
            None,
            Some("1.2.3.4.5"),
            80,
            Err(invalid(HostHeader, HostProblem::BadIpv4)),
        ),
        // Digits elsewhere in a name are ordinary DNS.
        (None, Some("1e100.net"), 80, Ok("1e100.net")),
        (None, Some("10.svc.example"), 80, Ok("10.svc.example")),
    ]);
}

#[test]
fn canonical_hosts_are_borrowed_from_the_input() {
    for (target, host) in [
        (None, Some("api.example:8080")),
        (None, Some("api.example:80")),
        (None, Some("[::1]:8080")),
        (Some("api.example"), Some("api.example:80")),
    ] {
        match effective_host(target, host, 80).unwrap() {
            Cow::Borrowed(_) => {}
            Cow::Owned(h) => panic!("allocated for {target:?} / {host:?}: {h:?}"),
        }
    }
}
