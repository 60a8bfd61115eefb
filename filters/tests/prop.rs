//! Property tests ("fuzzed parsers") for the parts of sigil-filters that see untrusted bytes:
//! request-target normalization, the effective host, route matching over compiled policies,
//! and the SVID leaf checks.
//!
//! Each property is checked against a small oracle written here from the module docs, not from
//! the code under test. CI runs the case counts given to `config(..)`; the `PROPTEST_CASES`
//! environment variable overrides them all (`scripts/fuzz-long.sh` uses it). Failing cases are
//! persisted in `filters/proptest-regressions/prop.txt` and replayed first on every run:
//! commit that file when a run adds to it.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sigil_config::{Policy, SpiffeId};
use sigil_filters::normalize::{
    effective_host, normalize_path, HostField, HostProblem, TargetError,
};
use sigil_filters::policy::{Effect, Rule};
use sigil_filters::svid::leaf_spiffe_id;
use sigil_filters::{HttpRequest, PolicyIndex, SvidError, Usage};
use sigil_testkit::rcgen::{ExtendedKeyUsagePurpose as Eku, KeyUsagePurpose as Ku};
use sigil_testkit::{Ca, SvidSpec};

const REGRESSIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/prop.txt");

/// `ci_cases` cases unless `PROPTEST_CASES` says otherwise. (`ProptestConfig::with_cases`
/// would ignore the variable: proptest reads it only into its own default.)
fn config(ci_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..ProptestConfig::default()
    }
}

fn lit(s: &'static str) -> Just<String> {
    Just(s.to_string())
}

// ---------------------------------------------------------------------------------------------
// normalize_path: the oracle follows the module documentation rule by rule.

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What `normalize_path` must return, or None when it must refuse.
fn oracle_normalize(input: &str) -> Option<(String, Option<&str>)> {
    let (path, query) = match input.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (input, None),
    };
    if path == "*" || !path.starts_with('/') {
        return None;
    }
    // Escapes: unreserved decoded, the rest kept with uppercase hex; refused: malformed, NUL,
    // `/`, `\`, control characters. Raw bytes: printable ASCII except `\` and `#`.
    let b = path.as_bytes();
    let mut decoded = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).and_then(|&c| (c as char).to_digit(16));
            let v = (hex(i + 1)? * 16 + hex(i + 2)?) as u8;
            if v < 0x20 || v == 0x7f || v == b'/' || v == b'\\' {
                return None;
            }
            if unreserved(v) {
                decoded.push(v as char);
            } else {
                write!(decoded, "%{v:02X}").unwrap();
            }
            i += 3;
        } else {
            if !(0x21..=0x7e).contains(&b[i]) || b[i] == b'\\' || b[i] == b'#' {
                return None;
            }
            decoded.push(b[i] as char);
            i += 1;
        }
    }
    // The query is untouched, but may not hold what no request target may hold.
    if query.is_some_and(|q| q.bytes().any(|c| !(0x21..=0x7e).contains(&c) || c == b'#')) {
        return None;
    }
    let segs: Vec<&str> = decoded[1..].split('/').collect();
    // `.;x` / `..;x`: a dot segment with parameters.
    if segs.iter().any(|s| {
        let head = s.split(';').next().unwrap_or("");
        s.contains(';') && (head == "." || head == "..")
    }) {
        return None;
    }
    // A `..` anywhere after a `//`.
    if let Some(dd) = decoded.find("//") {
        if decoded[dd..].split('/').any(|s| s == "..") {
            return None;
        }
    }
    // RFC 3986 §5.2.4 with empty segments dropped; `..` at the root stays at the root.
    let mut stack: Vec<&str> = Vec::new();
    for s in &segs {
        match *s {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    let mut out = format!("/{}", stack.join("/"));
    if !stack.is_empty() && matches!(*segs.last().unwrap(), "" | "." | "..") {
        out.push('/');
    }
    Some((out, query))
}

/// Pieces of request targets, valid and invalid, that normalization treats specially.
fn target_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        30 => "[a-z]{1,3}",
        8 => lit("/"),
        6 => lit("."),
        6 => lit(".."),
        3 => lit("%2e"),
        1 => lit("%2E%2e"),
        1 => lit(";"),
        1 => lit(".;"),
        1 => lit("..;p"),
        1 => lit("%41"),
        1 => lit("%7e"),
        1 => lit("%7E"),
        1 => lit("%2F"),
        1 => lit("%2f"),
        1 => lit("%5c"),
        1 => lit("\\"),
        1 => lit("%00"),
        1 => lit("\0"),
        1 => lit("%0a"),
        1 => lit("%7f"),
        1 => lit("%zz"),
        1 => lit("%"),
        1 => lit("%4"),
        1 => lit(" "),
        1 => lit("\t"),
        1 => lit("é"),
        1 => lit("#"),
        1 => lit("?"),
        1 => lit("?q=1&a=%2F\\"),
        1 => lit("~"),
        1 => lit("%C3%A9"),
        1 => lit("%c3%a9"),
        1 => lit("%25"),
        1 => lit("%252e"),
        1 => lit("%3B"),
        1 => lit("%3b"),
        1 => lit("*"),
        1 => lit("%20"),
        1 => lit("+"),
        1 => lit("%2B"),
        1 => lit("{}"),
    ]
}

fn target() -> impl Strategy<Value = String> {
    (
        prop_oneof![20 => lit("/"), 1 => lit(""), 1 => lit("*"), 1 => lit("//"), 1 => lit("http://h/")],
        prop::collection::vec(target_piece(), 0..12),
    )
        .prop_map(|(head, pieces)| head + &pieces.concat())
}

/// Paths built only from pieces that are never refused (no `//` either), so that dot
/// segments and escapes can be exercised on accepted input.
fn clean_path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            6 => "[a-zA-Z0-9_~-]{1,4}",
            2 => lit("."),
            2 => lit(".."),
            1 => lit("%C3%A9"),
            1 => lit("%3B"),
            1 => lit("a;b"),
            1 => lit("%25"),
        ],
        0..8,
    )
    .prop_flat_map(|segs| (Just(segs), any::<bool>()))
    .prop_map(|(segs, trailing)| {
        let mut p = format!("/{}", segs.join("/"));
        if trailing && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

/// The same path with some unreserved characters percent-encoded and some escapes' hex
/// lowercased: all of it must normalize the same.
fn respell(path: &str, picks: &[bool]) -> String {
    let mut picks = picks.iter().copied().cycle();
    let mut pick = || picks.next().unwrap_or(false);
    let b = path.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < path.len() {
        let c = path[i..].chars().next().unwrap();
        let escape = c == '%'
            && b.len() > i + 2
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit();
        if escape {
            let esc = &path[i..i + 3];
            out.push_str(&if pick() {
                esc.to_ascii_lowercase()
            } else {
                esc.to_string()
            });
            i += 3;
            continue;
        }
        if c.is_ascii() && unreserved(c as u8) && pick() {
            if pick() {
                write!(out, "%{:02x}", c as u32).unwrap();
            } else {
                write!(out, "%{:02X}", c as u32).unwrap();
            }
        } else {
            out.push(c);
        }
        i += c.len_utf8();
    }
    out
}

type Normalized = Result<(String, Option<String>), TargetError>;

fn normalized(input: &str) -> Normalized {
    normalize_path(input).map(|(p, q)| (p.into_owned(), q.map(String::from)))
}

fn assert_normal_form(p: &str) {
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    assert!(
        !p.split('/').any(|s| s == "." || s == ".."),
        "dot segment left in {p:?}"
    );
    let b = p.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        assert!(
            (0x21..=0x7e).contains(&c) && c != b'#' && c != b'\\',
            "{p:?}"
        );
        if c == b'%' {
            let hex = &b[i + 1..i + 3];
            assert!(
                hex.iter()
                    .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                "escape not uppercase in {p:?}"
            );
            let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
            assert!(!unreserved(v), "unreserved char left encoded in {p:?}");
        }
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn normalize_path_agrees_with_the_documented_rules(
        input in prop_oneof![4 => target(), 2 => clean_path(), 1 => any::<String>()],
    ) {
        let got = normalize_path(&input);
        let want = oracle_normalize(&input);
        match (&got, &want) {
            (Ok((p, q)), Some((wp, wq))) => {
                prop_assert_eq!(&**p, wp.as_str(), "{:?}", input);
                prop_assert_eq!(q, wq);
                assert_normal_form(p);
            }
            (Err(_), None) => {}
            _ => prop_assert!(false, "{:?}: got {:?}, want {:?}", input, got, want),
        }
    }

    #[test]
    fn normalize_path_is_idempotent_and_borrows_normal_input(input in prop_oneof![target(), clean_path()]) {
        if let Ok((p, _)) = normalize_path(&input) {
            let again = normalize_path(&p);
            prop_assert_eq!(&again, &Ok((Cow::Borrowed(&*p), None)), "{:?} -> {:?}", input, p);
            prop_assert!(matches!(again, Ok((Cow::Borrowed(_), None))));
            if *p == input {
                prop_assert!(matches!(normalize_path(&input), Ok((Cow::Borrowed(_), None))));
            }
        }
    }

    #[test]
    fn percent_encoding_unreserved_characters_changes_nothing(
        path in prop_oneof![clean_path(), target()],
        picks in prop::collection::vec(any::<bool>(), 1..16),
        query in prop::option::of("[a-z=&%0-9]{0,8}"),
    ) {
        let path = match &query {
            Some(q) if !path.contains('?') => format!("{path}?{q}"),
            _ => path,
        };
        let (p, q) = path.split_once('?').map_or((path.as_str(), None), |(p, q)| (p, Some(q)));
        let mut respelled = respell(p, &picks);
        if let Some(q) = q {
            respelled.push('?');
            respelled.push_str(q);
        }
        prop_assert_eq!(normalized(&respelled), normalized(&path), "{:?} vs {:?}", respelled, path);
    }

    #[test]
    fn dot_dot_above_the_root_is_clamped_to_the_root(
        ups in prop::collection::vec(prop_oneof![lit(".."), lit("%2e%2e"), lit("%2E."), lit(".")], 1..6),
        rest in clean_path(),
    ) {
        let climbing = format!("/{}{rest}", ups.iter().map(|u| format!("{u}/")).collect::<String>()).replace("//", "/");
        let want = normalized(&rest);
        prop_assert!(want.is_ok(), "{:?}", rest);
        prop_assert_eq!(normalized(&climbing), want, "{:?}", climbing);
        // Never above the root: no result has a `..` left to climb with.
        let (p, _) = normalized(&climbing).unwrap();
        prop_assert!(!p.split('/').any(|s| s == ".."));
    }

    #[test]
    fn dot_segments_next_to_double_slashes_or_with_params_are_refused(
        a in "[a-z]{1,4}", b in "[a-z]{1,4}",
        dots in prop_oneof![lit(".."), lit("%2e%2e"), lit(".%2E")],
        params in prop_oneof![lit(";"), lit(";x"), lit(";a=b")],
    ) {
        prop_assert_eq!(normalized(&format!("/{a}//{b}/{dots}/x")), Err(TargetError::DotSegmentAfterEmpty));
        prop_assert_eq!(normalized(&format!("/{a}//{dots}")), Err(TargetError::DotSegmentAfterEmpty));
        prop_assert_eq!(normalized(&format!("/{a}/{dots}{params}/{b}")), Err(TargetError::DotSegmentWithParams));
        // Before the `//`, a `..` is fine.
        prop_assert_eq!(normalized(&format!("/{a}/{dots}//{b}")), Ok((format!("/{b}"), None)));
    }
}

// ---------------------------------------------------------------------------------------------
// effective_host: valid authorities are generated with their canonical form.

#[derive(Debug, Clone)]
struct Authority {
    spelled: String,
    canonical: String,
}

fn reg_name() -> impl Strategy<Value = (String, String)> {
    // Labels start with a letter, so the last one is never numeric.
    (
        prop::collection::vec("[a-zA-Z][a-zA-Z0-9_-]{0,7}", 1..4),
        any::<bool>(),
    )
        .prop_map(|(labels, dot)| {
            let name = labels.join(".");
            let canonical = name.to_ascii_lowercase();
            (if dot { format!("{name}.") } else { name }, canonical)
        })
}

fn ipv4() -> impl Strategy<Value = (String, String)> {
    any::<Ipv4Addr>().prop_map(|a| (a.to_string(), a.to_string()))
}

fn ipv6() -> impl Strategy<Value = (String, String)> {
    (any::<Ipv6Addr>(), 0u8..3).prop_map(|(a, how)| {
        let g = a.segments();
        let spelled = match how {
            0 => a.to_string(),
            1 => g
                .iter()
                .map(|x| format!("{x:04x}"))
                .collect::<Vec<_>>()
                .join(":"),
            _ => g
                .iter()
                .map(|x| format!("{x:X}"))
                .collect::<Vec<_>>()
                .join(":"),
        };
        (format!("[{spelled}]"), format!("[{a}]"))
    })
}

/// A valid authority, its canonical form for `default_port`.
fn authority(default_port: u16) -> impl Strategy<Value = Authority> {
    (
        prop_oneof![3 => reg_name(), 1 => ipv4(), 1 => ipv6()],
        prop_oneof![
            Just(None),
            Just(Some((String::new(), None))),
            Just(Some((default_port.to_string(), None))),
            (1u16.., 0usize..3)
                .prop_map(|(n, zeros)| Some((format!("{}{n}", "0".repeat(zeros)), Some(n)))),
        ],
    )
        .prop_map(move |((host, canon), port)| {
            let canonical = match &port {
                Some((_, Some(n))) if *n != default_port => format!("{canon}:{n}"),
                _ => canon,
            };
            let spelled = match port {
                Some((digits, _)) => format!("{host}:{digits}"),
                None => host,
            };
            Authority { spelled, canonical }
        })
}

/// An invalid authority and the problem it must be refused for.
fn bad_authority() -> impl Strategy<Value = (String, HostProblem)> {
    let name = || reg_name().prop_map(|(s, _)| s);
    prop_oneof![
        name().prop_map(|n| (format!("user@{n}"), HostProblem::UserInfo)),
        name().prop_map(|n| (format!("u:p@{n}:80"), HostProblem::UserInfo)),
        name().prop_map(|n| (format!("{n}%2e"), HostProblem::BadChar)),
        (
            name(),
            prop::sample::select(vec!["%41", " ", "/", "\\", "!", "*", "é", "\0", "[", "]"])
        )
            .prop_map(|(n, c)| (format!("a{c}{n}"), HostProblem::BadChar)),
        (name(), name()).prop_map(|(a, b)| (
            format!("{}..{b}", a.trim_end_matches('.')),
            HostProblem::EmptyLabel
        )),
        name().prop_map(|n| (format!(".{n}"), HostProblem::EmptyLabel)),
        (
            name(),
            prop::sample::select(vec![
                "0", "65536", "99999", "+80", "8a", "-1", " 80", "80 ", "0x50"
            ])
        )
            .prop_map(|(n, p)| (format!("{n}:{p}"), HostProblem::BadPort)),
        prop::sample::select(vec![
            "[::1",
            "[::1%25eth0]",
            "[v1.x]",
            "[::1]x",
            "[1.2.3.4]",
            "[::1]]",
            "[]",
            "[:::]"
        ])
        .prop_map(|s| (s.to_string(), HostProblem::BadIpLiteral)),
        prop::sample::select(vec![
            "127.1",
            "0x7f.0.0.1",
            "2130706433",
            "1.2.3.04",
            "a.123",
            "1.2.3.4.5",
            "256.1.1.1",
            "api.0x1f",
            "10.0.0.0X1"
        ])
        .prop_map(|s| (s.to_string(), HostProblem::BadIpv4)),
        prop::sample::select(vec!["", ".", ":80", ":"])
            .prop_map(|s| (s.to_string(), HostProblem::Empty)),
    ]
}

fn any_authority() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => authority(443).prop_map(|a| a.spelled),
        1 => bad_authority().prop_map(|b| b.0),
        1 => "[a-zA-Z0-9.:\\[\\]%@_-]{0,24}",
        1 => any::<String>(),
    ]
}

fn host_error(field: HostField, problem: HostProblem) -> TargetError {
    TargetError::InvalidHost { field, problem }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn effective_host_canonicalizes_valid_authorities(
        (dp, a) in prop_oneof![Just(80u16), Just(443u16), 1u16..].prop_flat_map(|dp| (Just(dp), authority(dp))),
    ) {
        let got = effective_host(None, Some(&a.spelled), dp);
        prop_assert_eq!(got.as_deref(), Ok(a.canonical.as_str()), "{:?}", a.spelled);
        let from_target = effective_host(Some(&a.spelled), None, dp);
        prop_assert_eq!(from_target.as_deref(), Ok(a.canonical.as_str()));
        // Borrowed when already canonical; the canonical form is a fixed point.
        if a.spelled == a.canonical {
            prop_assert!(matches!(got, Ok(Cow::Borrowed(_))));
        }
        prop_assert!(matches!(effective_host(None, Some(&a.canonical), dp), Ok(Cow::Borrowed(c)) if c == a.canonical));
    }

    #[test]
    fn target_authority_and_host_header_must_agree(
        (dp, a, b) in prop_oneof![Just(80u16), Just(443u16)].prop_flat_map(|dp| (Just(dp), authority(dp), authority(dp))),
        respell in any::<bool>(),
    ) {
        // Two spellings of one authority agree; two different authorities do not.
        let b = if respell {
            let mut s = a.spelled.to_ascii_uppercase();
            if let Some(n) = s.strip_suffix(&format!(":{dp}")) {
                s = n.to_string();
            }
            Authority { spelled: s, canonical: a.canonical.clone() }
        } else {
            b
        };
        let got = effective_host(Some(&a.spelled), Some(&b.spelled), dp);
        if a.canonical == b.canonical {
            prop_assert_eq!(got.as_deref(), Ok(a.canonical.as_str()));
        } else {
            prop_assert_eq!(got, Err(TargetError::HostMismatch { target: a.spelled.clone(), host: b.spelled.clone() }));
        }
    }

    #[test]
    fn invalid_authorities_are_refused_for_their_reason(
        (bad, problem) in bad_authority(),
        good in authority(443),
        dp in prop_oneof![Just(80u16), Just(443u16)],
    ) {
        prop_assert_eq!(effective_host(None, Some(&bad), dp), Err(host_error(HostField::HostHeader, problem)), "{:?}", bad);
        prop_assert_eq!(effective_host(Some(&bad), None, dp), Err(host_error(HostField::TargetAuthority, problem)));
        // With both present, an invalid one is named whichever it is, never a mismatch.
        prop_assert_eq!(effective_host(Some(&bad), Some(&good.spelled), dp), Err(host_error(HostField::TargetAuthority, problem)));
        prop_assert_eq!(effective_host(Some(&good.spelled), Some(&bad), dp), Err(host_error(HostField::HostHeader, problem)));
        prop_assert_eq!(effective_host(None, None, dp), Err(TargetError::MissingHost));
    }

    #[test]
    fn effective_host_never_panics_and_its_output_is_canonical(
        t in prop::option::of(any_authority()),
        h in prop::option::of(any_authority()),
        dp in any::<u16>(),
    ) {
        if let Ok(out) = effective_host(t.as_deref(), h.as_deref(), dp) {
            prop_assert!(matches!(effective_host(None, Some(&out), dp), Ok(Cow::Borrowed(o)) if o == out));
            prop_assert!(!out.bytes().any(|b| b.is_ascii_uppercase()), "{:?}", out);
            prop_assert!(!out.contains('@') && !out.contains('%'), "{:?}", out);
            prop_assert!(!out.ends_with('.') && !out.contains(".:"), "{:?}", out);
            prop_assert!(!out.ends_with(&format!(":{dp}")), "default port kept: {:?}", out);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Route matching: random policies against an oracle of the documented semantics.

const LOCAL: &str = "spiffe://a.org/ns/x/sa/me";
const OTHER_WORKLOAD: &str = "spiffe://a.org/ns/x/sa/other";
const PEERS: [&str; 6] = [
    "spiffe://a.org/ns/x/sa/web",
    "spiffe://a.org/ns/x/sa/api",
    "spiffe://a.org/ns/y/sa/web",
    "spiffe://a.org/ns/xy/sa/web",
    "spiffe://b.org/ns/x/sa/web",
    "spiffe://a.org/web",
];
const PATTERNS: [&str; 10] = [
    "spiffe://a.org/ns/x/sa/web",
    "spiffe://a.org/ns/x/sa/api",
    "spiffe://a.org/ns/y/sa/web",
    "spiffe://b.org/ns/x/sa/web",
    "spiffe://a.org/web",
    "spiffe://a.org/*",
    "spiffe://a.org/ns/x/*",
    "spiffe://a.org/ns/*",
    "spiffe://b.org/*",
    "spiffe://a.org/ns/x/sa/*",
];
const SEGS: [&str; 3] = ["a", "b", "ab"];
const NOW: i64 = 1_800_000_000;

#[derive(Debug, Clone, PartialEq)]
enum PathRule {
    Exact(String),
    Prefix(String),
    Template(String),
}

#[derive(Debug, Clone)]
struct GenRoute {
    path: Option<PathRule>,
    methods: Vec<&'static str>,
    hosts: Vec<&'static str>,
    tenant: Option<&'static str>,
    allow: Vec<&'static str>,
    deny: Vec<&'static str>,
    mode: Option<bool>, // Some(true): enforce, Some(false): dry-run
    expires: Option<i64>,
}

#[derive(Debug, Clone)]
struct GenPort {
    port: u16,
    tcp: bool,
    routes: Vec<GenRoute>,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    local: bool,
    enforce: bool,
    expires: Option<i64>,
    ports: Vec<GenPort>,
}

fn seg_path(min: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(SEGS.to_vec()), min..3)
        .prop_map(|s| format!("/{}", s.join("/")))
}

fn path_rule() -> impl Strategy<Value = Option<PathRule>> {
    prop_oneof![
        2 => Just(None),
        2 => (seg_path(0), any::<bool>()).prop_map(|(p, slash)| {
            Some(PathRule::Exact(if slash && p != "/" { format!("{p}/") } else { p }))
        }),
        4 => (seg_path(0), any::<bool>()).prop_map(|(p, slash)| {
            Some(PathRule::Prefix(if slash && p != "/" { format!("{p}/") } else { p }))
        }),
        2 => (seg_path(1), prop::collection::vec(any::<bool>(), 4)).prop_map(|(p, holes)| {
            let t: Vec<String> = p[1..]
                .split('/')
                .zip(holes)
                .map(|(s, h)| if h { "{v}".to_string() } else { s.to_string() })
                .collect();
            Some(PathRule::Template(format!("/{}", t.join("/"))))
        }),
    ]
}

fn expiry() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![8 => Just(None), 1 => Just(Some(NOW - 100)), 1 => Just(Some(NOW)), 1 => Just(Some(NOW + 100))]
}

fn gen_route() -> impl Strategy<Value = GenRoute> {
    (
        path_rule(),
        prop_oneof![
            3 => Just(vec![]),
            1 => prop::sample::subsequence(vec!["GET", "POST", "get"], 1..=2),
        ],
        prop_oneof![
            3 => Just(vec![]),
            1 => prop::sample::subsequence(vec!["api.example", "Other.example"], 1..=2),
        ],
        prop_oneof![4 => Just(None), 1 => Just(Some("acme"))],
        prop::sample::subsequence(PATTERNS.to_vec(), 1..=5),
        prop_oneof![
            2 => Just(vec![]),
            1 => prop::sample::subsequence(PATTERNS.to_vec(), 1..=2),
        ],
        prop_oneof![2 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))],
        expiry(),
    )
        .prop_map(
            |(path, methods, hosts, tenant, allow, deny, mode, expires)| GenRoute {
                path,
                methods,
                hosts,
                tenant,
                allow,
                deny,
                mode,
                expires,
            },
        )
}

fn gen_policies() -> impl Strategy<Value = Vec<GenPolicy>> {
    let port = (
        prop_oneof![3 => Just(8080u16), 1 => Just(9090)],
        prop_oneof![5 => Just(false), 1 => Just(true)],
        prop::collection::vec(gen_route(), 0..5),
    )
        .prop_map(|(port, tcp, routes)| GenPort { port, tcp, routes });
    let policy = (
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop_oneof![4 => Just(true), 1 => Just(false)],
        expiry(),
        prop::collection::vec(port, 1..3),
    )
        .prop_map(|(local, enforce, expires, mut ports)| {
            ports.sort_by_key(|p| p.port);
            ports.dedup_by_key(|p| p.port);
            GenPolicy {
                local,
                enforce,
                expires,
                ports,
            }
        });
    prop::collection::vec(policy, 0..4)
}

fn ts(t: i64) -> String {
    sigil_config::policy::Timestamp(t).to_string()
}

fn yaml_list(items: &[&str]) -> String {
    let q: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", q.join(", "))
}

fn render(policies: &[GenPolicy]) -> String {
    let mut y = String::new();
    for (i, p) in policies.iter().enumerate() {
        y.push_str("---\napiVersion: sigil.dev/v1\nkind: Policy\n");
        writeln!(y, "metadata: {{name: p{i}, owner: o, purpose: p}}").unwrap();
        y.push_str("spec:\n");
        writeln!(
            y,
            "  target: {}",
            if p.local { LOCAL } else { OTHER_WORKLOAD }
        )
        .unwrap();
        writeln!(
            y,
            "  mode: {}",
            if p.enforce { "enforce" } else { "dry-run" }
        )
        .unwrap();
        if let Some(t) = p.expires {
            writeln!(y, "  expiresAt: {}", ts(t)).unwrap();
        }
        y.push_str("  ports:\n");
        for port in &p.ports {
            writeln!(y, "    - port: {}", port.port).unwrap();
            writeln!(
                y,
                "      protocol: {}",
                if port.tcp { "tcp" } else { "http" }
            )
            .unwrap();
            writeln!(
                y,
                "      {}:{}",
                if port.tcp { "rules" } else { "routes" },
                if port.routes.is_empty() { " []" } else { "" }
            )
            .unwrap();
            for (j, r) in port.routes.iter().enumerate() {
                writeln!(y, "        - name: r{j}").unwrap();
                if !port.tcp {
                    y.push_str("          match:\n");
                    writeln!(y, "            methods: {}", yaml_list(&r.methods)).unwrap();
                    writeln!(y, "            hosts: {}", yaml_list(&r.hosts)).unwrap();
                    if let Some(t) = r.tenant {
                        writeln!(y, "            headers: [{{name: X-Tenant, value: {t}}}]")
                            .unwrap();
                    }
                    match &r.path {
                        Some(PathRule::Exact(p)) => {
                            writeln!(y, "            path: {{exact: {p:?}}}").unwrap()
                        }
                        Some(PathRule::Prefix(p)) => {
                            writeln!(y, "            path: {{prefix: {p:?}}}").unwrap()
                        }
                        Some(PathRule::Template(p)) => {
                            writeln!(y, "            path: {{template: {p:?}}}").unwrap()
                        }
                        None => {}
                    }
                }
                writeln!(y, "          allow: {}", yaml_list(&r.allow)).unwrap();
                writeln!(y, "          deny: {}", yaml_list(&r.deny)).unwrap();
                if let Some(m) = r.mode {
                    writeln!(
                        y,
                        "          mode: {}",
                        if m { "enforce" } else { "dry-run" }
                    )
                    .unwrap();
                }
                if let Some(t) = r.expires {
                    writeln!(y, "          expiresAt: {}", ts(t)).unwrap();
                }
            }
        }
    }
    y
}

/// Whole segments, written out: the pattern's segments are a proper prefix of the ID's.
fn oracle_pattern(pattern: &str, peer: &str) -> bool {
    match pattern.strip_suffix("/*") {
        None => pattern == peer,
        Some(base) => {
            let b: Vec<&str> = base.split('/').collect();
            let p: Vec<&str> = peer.split('/').collect();
            p.len() > b.len() && p[..b.len()] == b[..]
        }
    }
}

fn oracle_path(rule: &Option<PathRule>, path: &str) -> bool {
    match rule {
        None => true,
        Some(PathRule::Exact(p)) => p == path,
        Some(PathRule::Prefix(p)) => {
            // Whole segments; a trailing slash on the prefix is the same prefix.
            let p = p.trim_end_matches('/');
            p.is_empty() || path == p || path.starts_with(&format!("{p}/"))
        }
        Some(PathRule::Template(t)) => {
            let ts: Vec<&str> = t.split('/').collect();
            let ps: Vec<&str> = path.split('/').collect();
            ts.len() == ps.len()
                && ts.iter().zip(&ps).all(|(t, p)| {
                    if t.starts_with('{') {
                        !p.is_empty()
                    } else {
                        t == p
                    }
                })
        }
    }
}

#[derive(Debug, Clone)]
struct Req {
    peer: &'static str,
    port: u16,
    method: &'static str,
    host: &'static str,
    path: String,
    tenant: Option<&'static str>,
}

fn gen_req() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(PEERS.to_vec()),
        prop_oneof![6 => Just(8080u16), 1 => Just(9090), 1 => Just(7070)],
        prop_oneof![6 => Just("GET"), 1 => Just("POST"), 1 => Just("PUT"), 1 => Just("get")],
        prop_oneof![
            6 => Just("api.example"),
            1 => Just("API.example:8080"),
            1 => Just("other.example"),
            1 => Just("api.example.evil"),
            1 => Just("[::1]:80"),
            1 => Just("[::1]"),
        ],
        (seg_path(0), any::<bool>()).prop_map(|(p, slash)| {
            if slash && p != "/" {
                format!("{p}/")
            } else {
                p
            }
        }),
        prop::sample::select(vec![None, Some("acme"), Some("ACME")]),
    )
        .prop_map(|(peer, port, method, host, path, tenant)| Req {
            peer,
            port,
            method,
            host,
            path,
            tenant,
        })
}

/// (policy, rule, deny?, enforced?) of every unexpired rule that matches and names the peer.
fn oracle_hits(policies: &[GenPolicy], req: &Req) -> Vec<(String, String, bool, bool)> {
    let host = match req.host.rfind(':') {
        Some(i) if !req.host[i..].contains(']') => &req.host[..i],
        _ => req.host,
    };
    let mut hits = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        if !p.local {
            continue;
        }
        for port in p
            .ports
            .iter()
            .filter(|port| port.port == req.port && !port.tcp)
        {
            for (j, r) in port.routes.iter().enumerate() {
                let expires = [p.expires, r.expires].into_iter().flatten().min();
                if expires.is_some_and(|t| NOW >= t) {
                    continue;
                }
                let matches = oracle_path(&r.path, &req.path)
                    && (r.methods.is_empty()
                        || r.methods
                            .iter()
                            .any(|m| m.to_ascii_uppercase() == req.method))
                    && (r.hosts.is_empty() || r.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
                    && r.tenant.is_none_or(|t| req.tenant == Some(t));
                if !matches {
                    continue;
                }
                let deny = r.deny.iter().any(|d| oracle_pattern(d, req.peer));
                let allow = r.allow.iter().any(|a| oracle_pattern(a, req.peer));
                if deny || allow {
                    hits.push((
                        format!("p{i}"),
                        format!("r{j}"),
                        deny,
                        r.mode.unwrap_or(p.enforce),
                    ));
                }
            }
        }
    }
    hits
}

fn check_rule(rule: &Rule<'_>, hits: &[&(String, String, bool, bool)], deny: bool) {
    match rule {
        Rule::Matched {
            policy,
            rule,
            effect,
            ..
        } => {
            assert_eq!(*effect == Effect::Deny, deny);
            assert!(
                hits.iter()
                    .any(|h| h.0 == *policy && h.1 == *rule && h.2 == deny),
                "{policy}/{rule} is not among {hits:?}"
            );
        }
        other => panic!("expected a matched rule, got {other:?}"),
    }
}

fn decide(idx: &PolicyIndex, req: &Req) -> (bool, String, Option<String>) {
    let peer = SpiffeId::parse(req.peer).unwrap();
    let tenant = req.tenant;
    let r = HttpRequest {
        peer: &peer,
        port: req.port,
        method: req.method,
        host: req.host,
        path: &req.path,
        header: move |name: &str| if name == "x-tenant" { tenant } else { None },
        now: NOW,
    };
    let d = idx.decide_http(&r);
    (
        d.allowed,
        d.rule.to_string(),
        d.would_deny.map(|w| w.to_string()),
    )
}

fn index_of(yaml: &str) -> Result<PolicyIndex, String> {
    let ps = Policy::parse_all(Path::new("gen.yaml"), yaml).map_err(|e| e.to_string())?;
    Ok(PolicyIndex::compile(&ps, &SpiffeId::parse(LOCAL).unwrap()))
}

/// One enforce-mode policy on port 8080 with the given routes (YAML flow lines).
fn one_policy(routes: &[String]) -> PolicyIndex {
    let y = format!(
        "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: p, owner: o, purpose: p}}\n\
         spec:\n  target: {LOCAL}\n  ports:\n    - port: 8080\n      routes:\n{}",
        routes
            .iter()
            .map(|r| format!("        - {r}\n"))
            .collect::<String>()
    );
    index_of(&y).unwrap_or_else(|e| panic!("{e}\n{y}"))
}

fn get(idx: &PolicyIndex, peer: &'static str, path: &str) -> bool {
    decide(
        idx,
        &Req {
            peer,
            port: 8080,
            method: "GET",
            host: "h",
            path: path.to_string(),
            tenant: None,
        },
    )
    .0
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn decisions_agree_with_the_oracle(policies in gen_policies(), reqs in prop::collection::vec(gen_req(), 1..8)) {
        let yaml = render(&policies);
        let idx = match index_of(&yaml) {
            Ok(idx) => idx,
            // Random routes may overlap or shadow one another; loading refuses those.
            Err(e) => {
                prop_assert!(e.contains("overlaps") || e.contains("shadowed"), "{}\n{}", e, yaml);
                return Ok(());
            }
        };
        let targeted = policies.iter().any(|p| p.local);
        let enforced = policies.iter().any(|p| p.local && p.enforce);
        for req in &reqs {
            let hits = oracle_hits(&policies, req);
            let enf: Vec<_> = hits.iter().filter(|h| h.3).collect();
            let all: Vec<_> = hits.iter().collect();
            let allowed = !enforced || (!enf.iter().any(|h| h.2) && enf.iter().any(|h| !h.2));
            let shadow_allowed = !targeted || (!all.iter().any(|h| h.2) && all.iter().any(|h| !h.2));

            let peer = SpiffeId::parse(req.peer).unwrap();
            let tenant = req.tenant;
            let r = HttpRequest {
                peer: &peer,
                port: req.port,
                method: req.method,
                host: req.host,
                path: &req.path,
                header: move |name: &str| if name == "x-tenant" { tenant } else { None },
                now: NOW,
            };
            let d = idx.decide_http(&r);
            prop_assert_eq!(d.allowed, allowed, "{:?}\nhits {:?}\n{}", req, hits, yaml);
            // The rule named is one that really decided.
            if !enforced {
                prop_assert_eq!(d.rule, Rule::NoPolicy);
            } else if enf.iter().any(|h| h.2) {
                check_rule(&d.rule, &enf, true);
            } else if !enf.is_empty() {
                check_rule(&d.rule, &enf, false);
            } else {
                prop_assert_eq!(d.rule, Rule::DefaultDeny { port: req.port });
            }
            prop_assert_eq!(d.would_deny.is_some(), allowed && !shadow_allowed, "{:?}\n{}", req, yaml);
            if let Some(w) = d.would_deny {
                if all.iter().any(|h| h.2) {
                    check_rule(&w, &all, true);
                } else {
                    prop_assert_eq!(w, Rule::DefaultDeny { port: req.port });
                }
            }
        }
    }

    /// `/a/b` matches `/a/b` and `/a/b/...`, never `/a/bx`; an exact path only itself.
    #[test]
    fn prefixes_match_whole_segments_and_exact_paths_only_themselves(
        prefix in prop::collection::vec("[a-z]{1,4}", 1..4).prop_map(|s| format!("/{}", s.join("/"))),
        tail in "[a-z0-9]{1,4}",
        deeper in prop::collection::vec("[a-z]{1,3}", 1..3),
        slash in any::<bool>(),
    ) {
        let peer = PEERS[0];
        let written = if slash { format!("{prefix}/") } else { prefix.clone() };
        let idx = one_policy(&[format!("{{name: r, match: {{path: {{prefix: {written:?}}}}}, allow: [{peer}]}}")]);
        assert!(get(&idx, peer, &prefix));
        assert!(get(&idx, peer, &format!("{prefix}/")));
        assert!(get(&idx, peer, &format!("{prefix}/{}", deeper.join("/"))));
        assert!(!get(&idx, peer, &format!("{prefix}{tail}")), "{}{} matched prefix {}", prefix, tail, written);
        assert!(!get(&idx, PEERS[1], &prefix), "another peer allowed");
        let parent = &prefix[..prefix.rfind('/').unwrap()];
        assert!(!get(&idx, peer, if parent.is_empty() { "/" } else { parent }));

        let idx = one_policy(&[format!("{{name: r, match: {{path: {{exact: {prefix:?}}}}}, allow: [{peer}]}}")]);
        assert!(get(&idx, peer, &prefix));
        assert!(!get(&idx, peer, &format!("{prefix}/")));
        assert!(!get(&idx, peer, &format!("{prefix}/{tail}")));
        assert!(!get(&idx, peer, &format!("{prefix}{tail}")));
    }

    /// A deny on any matching route beats an allow on another; the rule named is the deny.
    #[test]
    fn deny_wins_over_allow(
        path in seg_path(1),
        peer in prop::sample::select(PEERS.to_vec()),
        broad in any::<bool>(),
    ) {
        let deny = if broad { format!("{}/*", &peer[..peer.rfind('/').unwrap()]) } else { peer.to_string() };
        let idx = one_policy(&[
            format!("{{name: deny-all, match: {{path: {{prefix: /}}}}, allow: [spiffe://c.org/x], deny: [{deny:?}]}}"),
            format!("{{name: allow-one, match: {{path: {{exact: {path:?}}}}}, allow: [{peer}, spiffe://c.org/y]}}"),
        ]);
        let (allowed, rule, _) = decide(&idx, &Req { peer, port: 8080, method: "GET", host: "h", path: path.clone(), tenant: None });
        prop_assert!(!allowed);
        prop_assert_eq!(rule, "policy p rule deny-all (deny)");
    }

    /// Once an enforce-mode policy targets the workload, whatever no rule allows is denied,
    /// on every port; policies for other workloads, or only in dry-run, deny nothing.
    #[test]
    fn default_deny_once_a_policy_targets_the_workload(
        path in seg_path(0),
        port in prop::sample::select(vec![8080u16, 9090, 1]),
        peer in prop::sample::select(PEERS.to_vec()),
        target_local in any::<bool>(),
        enforce in any::<bool>(),
    ) {
        let y = format!(
            "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: p, owner: o, purpose: p}}\n\
             spec:\n  target: {}\n  mode: {}\n  ports: [{{port: 8080, routes: [{{name: r, match: {{path: {{exact: /only}}}}, allow: [{peer}]}}]}}]\n",
            if target_local { LOCAL } else { OTHER_WORKLOAD },
            if enforce { "enforce" } else { "dry-run" },
        );
        let idx = index_of(&y).unwrap();
        let (allowed, rule, would_deny) = decide(&idx, &Req { peer, port, method: "GET", host: "h", path: path.clone(), tenant: None });
        if target_local && enforce {
            prop_assert!(!allowed);
            prop_assert_eq!(rule, format!("port {port}: no rule allows this peer (default deny)"));
        } else {
            prop_assert!(allowed);
            prop_assert_eq!(rule, "no policy targets this workload");
            // A dry-run policy for this workload reports what it would deny.
            prop_assert_eq!(would_deny.is_some(), target_local);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SVID leaf checks.

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::new("example.org"))
}

const GOOD_ID: &str = "spiffe://example.org/ns/prod/sa/payments";

/// Valid SVID leaves of several shapes, each with its ID and the byte range of the ID's text.
struct Leaf {
    der: Vec<u8>,
    id: String,
    uri: std::ops::Range<usize>,
}

fn leaves() -> &'static [Leaf] {
    static LEAVES: OnceLock<Vec<Leaf>> = OnceLock::new();
    LEAVES.get_or_init(|| {
        let long = format!("spiffe://example.org/{}", vec!["segment"; 150].join("/"));
        let mut dns = SvidSpec::new("spiffe://example.org/ns/a/sa/dns");
        dns.dns = vec!["a.test".into(), "b.test".into()];
        let specs = [
            SvidSpec::new(GOOD_ID),
            SvidSpec::new(&long),
            dns,
            SvidSpec::new("spiffe://example.org/ns/a/sa/no-subject").empty_subject(),
            SvidSpec::new("spiffe://example.org/no-eku").ext_key_usages(vec![]),
        ];
        let mut out: Vec<Leaf> = specs
            .iter()
            .map(|spec| (ca().issue(spec).chain[0].to_vec(), spec.uris[0].clone()))
            .collect::<Vec<_>>()
            .into_iter()
            .chain(std::iter::once((
                ca().intermediate()
                    .svid("spiffe://example.org/via/intermediate")
                    .chain[0]
                    .to_vec(),
                "spiffe://example.org/via/intermediate".to_string(),
            )))
            .map(|(der, id)| {
                let at = find(&der, id.as_bytes()).expect("URI in the DER");
                Leaf {
                    uri: at..at + id.len(),
                    der,
                    id,
                }
            })
            .collect();
        out.shrink_to_fit();
        out
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whatever ID the leaf check returns must be spelled out in the certificate's bytes (an
/// IA5String is not decoded), be valid, and name a workload.
fn assert_id_from(der: &[u8], got: &Result<SpiffeId, SvidError>) {
    if let Ok(id) = got {
        assert!(
            find(der, id.as_str().as_bytes()).is_some(),
            "{id} is not in the certificate"
        );
        assert!(!id.is_trust_domain_id());
        assert_eq!(SpiffeId::parse(id.as_str()).as_ref(), Ok(id));
    }
}

fn check_mutant(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let got = leaf_spiffe_id(der, None);
    assert_id_from(der, &got);
    for usage in [Usage::Client, Usage::Server] {
        let with_usage = leaf_spiffe_id(der, Some(usage));
        assert_id_from(der, &with_usage);
        // A usage can only add a refusal (the EKU check), never accept what None refuses.
        if got.is_err() {
            assert_eq!(with_usage, got);
        }
    }
    got
}

/// Flipping one bit outside the URI's text yields the same ID or a refusal; inside it, the
/// ID as flipped or a refusal.
fn check_bit_flip(der: &[u8], uri: &std::ops::Range<usize>, id: &str, bit: usize) {
    let mut m = der.to_vec();
    m[bit / 8] ^= 1 << (bit % 8);
    let got = check_mutant(&m);
    if let Ok(got) = got {
        if uri.contains(&(bit / 8)) {
            assert_eq!(got.as_str().as_bytes(), &m[uri.clone()], "bit {bit}");
        } else {
            assert_eq!(got.as_str(), id, "bit {bit} outside the URI changed the ID");
        }
    }
}

fn key_usage() -> impl Strategy<Value = Vec<Ku>> {
    prop::sample::subsequence(
        vec![
            Ku::DigitalSignature,
            Ku::KeyEncipherment,
            Ku::KeyAgreement,
            Ku::ContentCommitment,
            Ku::KeyCertSign,
            Ku::CrlSign,
        ],
        0..=3,
    )
}

fn ext_key_usage() -> impl Strategy<Value = Vec<Eku>> {
    prop::sample::subsequence(
        vec![Eku::ServerAuth, Eku::ClientAuth, Eku::Any, Eku::CodeSigning],
        0..=2,
    )
}

/// URI SANs: valid workload IDs, a trust domain's ID, and broken ones (ASCII: IA5).
fn uri() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => ("[a-z0-9.-]{1,10}", prop::collection::vec("[A-Za-z0-9._-]{1,6}", 1..4)).prop_filter_map(
            "dot segment",
            |(td, segs)| {
                (!segs.iter().any(|s| s == "." || s == "..")).then(|| format!("spiffe://{td}/{}", segs.join("/")))
            }
        ),
        1 => lit("spiffe://example.org"),
        1 => lit("spiffe://Example.org/x"),
        1 => lit("spiffe://example.org/a//b"),
        1 => lit("spiffe://example.org:443/x"),
        1 => lit("spiffe://example.org/x/"),
        1 => lit("https://example.org/x"),
        1 => lit("spiffe://example.org/%41"),
        1 => lit(""),
    ]
}

/// The leaf rules of X509-SVID.md as svid.rs documents them; each violated rule's error.
fn violations(spec: &SvidSpec, usage: Option<Usage>) -> Vec<fn(&SvidError) -> bool> {
    let mut v: Vec<fn(&SvidError) -> bool> = Vec::new();
    if spec.uris.len() != 1 {
        v.push(|e| matches!(e, SvidError::UriSanCount(_)));
    } else {
        match SpiffeId::parse(&spec.uris[0]) {
            Err(_) => v.push(|e| matches!(e, SvidError::InvalidId(_))),
            Ok(id) if id.is_trust_domain_id() => {
                v.push(|e| matches!(e, SvidError::TrustDomainId(_)))
            }
            Ok(_) => {}
        }
    }
    if spec.empty_subject && !spec.san_critical.unwrap_or(true) {
        v.push(|e| matches!(e, SvidError::SanNotCritical));
    }
    if spec.is_ca {
        v.push(|e| matches!(e, SvidError::LeafIsCa));
    }
    if spec.key_usages.is_empty() {
        v.push(|e| matches!(e, SvidError::NoKeyUsage));
    } else {
        if spec
            .key_usages
            .iter()
            .any(|k| matches!(k, Ku::KeyCertSign | Ku::CrlSign))
        {
            v.push(|e| matches!(e, SvidError::CaKeyUsage));
        }
        if !spec.key_usages.contains(&Ku::DigitalSignature) {
            v.push(|e| matches!(e, SvidError::NoDigitalSignature));
        }
    }
    if let Some(u) = usage {
        let e = &spec.ext_key_usages;
        let want = if u == Usage::Client {
            Eku::ClientAuth
        } else {
            Eku::ServerAuth
        };
        if !e.is_empty() && !e.contains(&Eku::Any) && !e.contains(&want) {
            v.push(|e| matches!(e, SvidError::ExtKeyUsage(_)));
        }
    }
    v
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn a_valid_svid_always_yields_its_id(
        td in "[a-z0-9][a-z0-9._-]{0,20}",
        segs in prop::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,12}", 1..6),
        intermediate in any::<bool>(),
    ) {
        let id = format!("spiffe://{td}/{}", segs.join("/"));
        let svid = if intermediate { ca().intermediate().svid(&id) } else { ca().svid(&id) };
        for usage in [None, Some(Usage::Client), Some(Usage::Server)] {
            let got = leaf_spiffe_id(&svid.chain[0], usage);
            prop_assert_eq!(got.as_ref().map(SpiffeId::as_str), Ok(id.as_str()));
        }
    }

    #[test]
    fn leaf_checks_refuse_exactly_the_leaves_that_break_a_rule(
        uris in prop_oneof![3 => uri().prop_map(|u| vec![u]), 1 => prop::collection::vec(uri(), 0..3)],
        dns in prop::collection::vec("[a-z]{1,8}\\.test", 0..2),
        is_ca in prop_oneof![6 => Just(false), 1 => Just(true)],
        key_usages in prop_oneof![2 => Just(vec![Ku::DigitalSignature, Ku::KeyEncipherment]), 1 => key_usage()],
        ext_key_usages in ext_key_usage(),
        empty_subject in prop_oneof![4 => Just(false), 1 => Just(true)],
        san_critical in prop_oneof![2 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))],
    ) {
        let mut spec = SvidSpec::new(GOOD_ID);
        spec.uris = uris;
        spec.dns = dns;
        spec.is_ca = is_ca;
        spec.key_usages = key_usages;
        spec.ext_key_usages = ext_key_usages;
        spec.empty_subject = empty_subject;
        // A hand-made SAN needs at least one name (an empty SEQUENCE is not a SAN).
        spec.san_critical = if spec.uris.is_empty() && spec.dns.is_empty() { None } else { san_critical };
        let der = ca().issue(&spec).chain[0].to_vec();
        for usage in [None, Some(Usage::Client), Some(Usage::Server)] {
            let got = leaf_spiffe_id(&der, usage);
            let broken = violations(&spec, usage);
            match &got {
                Ok(id) => {
                    prop_assert!(broken.is_empty(), "accepted a leaf that breaks a rule: {:?} {:?}", spec, usage);
                    prop_assert_eq!(id.as_str(), spec.uris[0].as_str());
                }
                Err(e) => prop_assert!(
                    broken.iter().any(|rule| rule(e)),
                    "refused with {:?}, which names no broken rule: {:?} {:?}", e, spec, usage
                ),
            }
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn leaf_check_never_panics_on_arbitrary_bytes(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            // DER-shaped: a SEQUENCE header, then anything.
            (any::<u16>(), prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(len, rest)| {
                let mut v = vec![0x30, 0x82, (len >> 8) as u8, len as u8];
                v.extend(rest);
                v
            }),
        ],
    ) {
        let got = check_mutant(&bytes);
        prop_assert!(got.is_err(), "random bytes accepted as an SVID: {:?}", got);
    }

    #[test]
    fn truncated_svids_are_malformed(leaf in any::<prop::sample::Index>(), cut in any::<prop::sample::Index>()) {
        let der = &leaves()[leaf.index(leaves().len())].der;
        let t = &der[..cut.index(der.len())];
        let got = check_mutant(t);
        prop_assert!(matches!(got, Err(SvidError::Malformed(_))), "{} bytes: {:?}", t.len(), got);
    }

    #[test]
    fn single_bit_flips_yield_the_id_the_bytes_spell_or_a_refusal(leaf in any::<prop::sample::Index>(), bit in any::<prop::sample::Index>()) {
        let l = &leaves()[leaf.index(leaves().len())];
        let unflipped = leaf_spiffe_id(&l.der, None).unwrap();
        prop_assert_eq!(unflipped.as_str(), l.id.as_str());
        check_bit_flip(&l.der, &l.uri, &l.id, bit.index(l.der.len() * 8));
    }

    #[test]
    fn byte_edits_never_panic_and_any_id_is_spelled_in_the_bytes(
        leaf in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut m = leaves()[leaf.index(leaves().len())].der.clone();
        for (at, byte, op) in edits {
            let i = at.index(m.len());
            match op {
                0 => m[i] = byte,
                1 => m.insert(i, byte),
                2 => { m.remove(i); }
                _ => m[i] = m[i].wrapping_add(1),
            }
            if m.is_empty() {
                break;
            }
        }
        let _ = check_mutant(&m);
    }
}

/// Every truncation and every single-bit flip of one valid SVID, exhaustively.
#[test]
fn every_truncation_and_every_bit_flip_of_a_valid_svid() {
    let l = &leaves()[0];
    assert_eq!(leaf_spiffe_id(&l.der, None).unwrap().as_str(), GOOD_ID);
    for len in 0..l.der.len() {
        assert!(
            matches!(check_mutant(&l.der[..len]), Err(SvidError::Malformed(_))),
            "{len} bytes"
        );
    }
    for bit in 0..l.der.len() * 8 {
        check_bit_flip(&l.der, &l.uri, &l.id, bit);
    }
}
