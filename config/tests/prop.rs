//! Property tests ("fuzzed parsers") for every parser of sigil-config that reads untrusted
//! text: SPIFFE IDs, trust domains and ID patterns, RFC 3339 timestamps and durations, and the
//! YAML resources (Policy, Revocation, Workload, TrustBundle, mixed-kind files, ProxyConfig).
//!
//! Each property is checked against a small oracle written here from the documented rules,
//! not from the code under test. CI runs the case counts given to `config(..)`; the
//! `PROPTEST_CASES` environment variable overrides them all (`scripts/fuzz-long.sh` uses it).
//! Failing cases are persisted in `config/proptest-regressions/prop.txt` and replayed first
//! on every run: commit that file when a run adds to it.
//!
//! Bugs in src/ that these properties found are kept as regression tests at the end, each on
//! the input that showed it; the properties check those inputs too.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sigil_config::policy::{PathMatch, Protocol, RuleMode, Timestamp};
use sigil_config::proxy_config::{duration, Destination, Mode, UnknownDestination};
use sigil_config::{
    ConfigError, IdPattern, Policy, ProxyConfig, Resource, Revocation, SpiffeId, SpiffeIdError,
    TrustBundle, TrustDomain, Workload,
};

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

// ---------------------------------------------------------------------------------------------
// Oracles: the SPIFFE-ID standard (SPIFFE-ID.md §2), written out plainly.

const SCHEME: &str = "spiffe://";

fn td_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn path_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// §2.1 and §2.3: non-empty, lowercase `[a-z0-9.-_]`, at most 255 bytes.
fn oracle_td(td: &[u8]) -> bool {
    !td.is_empty() && td.len() <= 255 && td.iter().all(|&b| td_char(b))
}

/// A trust domain and path split at the first `/` after the scheme, if `id` has the scheme.
fn split_id(id: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = id.strip_prefix(SCHEME.as_bytes())?;
    let at = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
    Some(rest.split_at(at))
}

/// §2.2: segments of `[A-Za-z0-9.-_]`, none empty, `.` or `..`; so no trailing slash either.
fn oracle_path(path: &[u8]) -> bool {
    path.is_empty()
        || path[1..].split(|&b| b == b'/').all(|seg| {
            !seg.is_empty() && seg != b"." && seg != b".." && seg.iter().all(|&b| path_char(b))
        })
}

/// A whole SPIFFE ID, the trust domain's own ID included (path empty). §2.3: at most 2048 bytes.
fn oracle_id(id: &[u8]) -> bool {
    id.len() <= 2048 && split_id(id).is_some_and(|(td, path)| oracle_td(td) && oracle_path(path))
}

fn has_workload_path(id: &str) -> bool {
    split_id(id.as_bytes()).is_some_and(|(_, path)| !path.is_empty())
}

/// Every error must point at something that is really in the input.
fn error_points_into(input: &[u8], e: &SpiffeIdError) {
    let at_byte = |at: usize| input.get(at).copied();
    match *e {
        SpiffeIdError::Empty => assert!(input.is_empty()),
        SpiffeIdError::WrongScheme => assert!(!input.starts_with(SCHEME.as_bytes())),
        SpiffeIdError::TooLong { len } => assert!(len == input.len() && len > 2048),
        SpiffeIdError::EmptyTrustDomain => {}
        SpiffeIdError::TrustDomainTooLong { len } => assert!(len > 255 && len <= input.len()),
        SpiffeIdError::TrustDomainChar { byte, at } => {
            assert_eq!(at_byte(at), Some(byte), "{e}");
            assert!(!td_char(byte), "{e}");
        }
        SpiffeIdError::TrustDomainUppercase { at } => {
            assert!(at_byte(at).is_some_and(|b| b.is_ascii_uppercase()), "{e}")
        }
        SpiffeIdError::PercentEncoded { at } => {
            assert_eq!(at_byte(at), Some(b'%'), "{e}")
        }
        SpiffeIdError::PathChar { byte, at } => {
            assert_eq!(at_byte(at), Some(byte), "{e}");
            assert!(!path_char(byte) && byte != b'/', "{e}");
        }
        SpiffeIdError::Port => assert!(input.contains(&b':')),
        SpiffeIdError::UserInfo => assert!(input.contains(&b'@')),
        SpiffeIdError::Query => assert!(input.contains(&b'?')),
        SpiffeIdError::Fragment => assert!(input.contains(&b'#')),
        SpiffeIdError::EmptySegment => assert!(input.windows(2).any(|w| w == b"//")),
        SpiffeIdError::TrailingSlash => assert!(input.ends_with(b"/")),
        SpiffeIdError::DotSegment => {
            assert!(input.split(|&b| b == b'/').any(|s| s == b"." || s == b".."))
        }
        SpiffeIdError::TrustDomainOnly => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

fn lit(s: &'static str) -> Just<String> {
    Just(s.to_string())
}

fn valid_td() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,15}"
}

fn valid_segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,10}".prop_filter("dot segment", |s| s != "." && s != "..")
}

/// A valid workload SPIFFE ID (with a path).
fn valid_id() -> impl Strategy<Value = String> {
    (valid_td(), prop::collection::vec(valid_segment(), 1..5))
        .prop_map(|(td, segs)| format!("spiffe://{td}/{}", segs.join("/")))
}

/// Strings from a grammar that mixes valid and invalid pieces of a SPIFFE ID.
fn id_candidate() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        40 => lit("spiffe://"),
        1 => lit("SPIFFE://"),
        1 => lit("Spiffe://"),
        1 => lit("spiffe:/"),
        1 => lit("spiffe:"),
        1 => lit("spiffe:///"),
        1 => lit("https://"),
        1 => lit(""),
        1 => lit(" spiffe://"),
    ];
    let td_piece = prop_oneof![
        12 => "[a-z0-9]{1,8}",
        3 => lit("."),
        1 => lit("-"),
        1 => lit("_"),
        1 => "[A-Z]",
        1 => lit(":8443"),
        1 => lit(":"),
        1 => lit("user@"),
        1 => lit("%2e"),
        1 => lit("?q"),
        1 => lit("#f"),
        1 => lit(" "),
        1 => lit("é"),
        1 => lit("\u{0}"),
        1 => lit("*"),
        1 => "[a-z]{120,140}",
    ];
    let segment = prop_oneof![
        12 => "[A-Za-z0-9._-]{1,10}",
        2 => lit(""),
        2 => lit("."),
        2 => lit(".."),
        1 => lit("..."),
        1 => lit("%41"),
        1 => lit("?x=1"),
        1 => lit("#frag"),
        1 => lit("*"),
        1 => lit("é"),
        1 => lit("a b"),
        1 => lit("\\"),
        1 => lit(":"),
        1 => lit("@"),
        1 => lit("~"),
        1 => "[A-Za-z0-9._-]{400,700}",
    ];
    let tail = prop_oneof![
        12 => lit(""),
        1 => lit("/"),
        1 => lit("?a=b"),
        1 => lit("#x"),
        1 => lit(":80"),
    ];
    (
        scheme,
        prop_oneof![1 => Just(vec![]), 7 => prop::collection::vec(td_piece, 1..4)],
        prop::collection::vec(segment, 0..5),
        tail,
    )
        .prop_map(|(scheme, td, segs, tail)| {
            let mut s = scheme;
            s.extend(td);
            for seg in segs {
                s.push('/');
                s.push_str(&seg);
            }
            s + &tail
        })
}

/// IDs of every length around the 2048-byte limit.
fn id_near_limit() -> impl Strategy<Value = String> {
    (0usize..48, valid_td(), 1usize..6).prop_map(|(k, td, every)| {
        let head = format!("spiffe://{td}/");
        let want = 2048 - 24 + k;
        let mut s = head;
        let mut n = 0;
        while s.len() < want {
            n += 1;
            s.push(if n % (every * 7) == 0 { '/' } else { 'a' });
        }
        if s.ends_with('/') {
            s.pop();
            s.push('b');
        }
        s
    })
}

/// A valid workload ID broken by exactly one rule, and which rule.
fn broken_id() -> impl Strategy<Value = String> {
    (valid_id(), 0usize..10).prop_map(|(id, how)| {
        let (td_end, _) = {
            let rest = &id[SCHEME.len()..];
            let td = rest.find('/').unwrap();
            (SCHEME.len() + td, ())
        };
        match how {
            0 => id.replacen("spiffe://", "spiffe:/", 1),
            1 => format!("{id}/"),
            2 => format!("{}/{}", &id[..td_end], &id[td_end..]),
            3 => format!("{}:8080{}", &id[..td_end], &id[td_end..]),
            4 => format!("{}/../x", id),
            5 => format!("{}%41", id),
            6 => format!("{}?q=1", id),
            7 => format!("{}X{}", &id[..td_end], &id[td_end..]),
            8 => format!("{id}/{}", "a".repeat(2100)),
            _ => format!("{}/ä", id),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs, trust domains, patterns.

fn check_id(s: &str) {
    let got = SpiffeId::parse(s);
    assert_eq!(
        got.is_ok(),
        oracle_id(s.as_bytes()),
        "SpiffeId::parse({s:?}) = {got:?}"
    );
    match got {
        Ok(id) => {
            assert_eq!(id.to_string(), s);
            assert_eq!(id.as_str(), s);
            assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
            let (td, path) = split_id(s.as_bytes()).unwrap();
            assert_eq!(id.trust_domain_name().as_bytes(), td);
            assert_eq!(id.path().as_bytes(), path);
            assert_eq!(id.is_trust_domain_id(), path.is_empty());
            assert_eq!(
                TrustDomain::parse(id.trust_domain_name()),
                Ok(id.trust_domain())
            );
            assert_eq!(s.parse::<SpiffeId>().as_ref(), Ok(&id));
        }
        Err(e) => error_points_into(s.as_bytes(), &e),
    }
}

fn check_td(s: &str) {
    let got = TrustDomain::parse(s);
    let name = s.strip_prefix(SCHEME).unwrap_or(s);
    assert_eq!(
        got.is_ok(),
        oracle_td(name.as_bytes()),
        "TrustDomain::parse({s:?}) = {got:?}"
    );
    match got {
        Ok(td) => {
            assert_eq!(td.to_string(), name);
            assert_eq!(TrustDomain::parse(&td.to_string()).as_ref(), Ok(&td));
            assert_eq!(
                TrustDomain::parse(&format!("spiffe://{td}")).as_ref(),
                Ok(&td)
            );
            let id = SpiffeId::parse(&format!("spiffe://{td}/w")).unwrap();
            assert_eq!(id.trust_domain(), td);
        }
        // Offsets count from the start of the input as given, scheme included.
        Err(e) => error_points_into(s.as_bytes(), &e),
    }
}

/// Segment-aware prefix matching, computed from the parts rather than with `starts_with`.
fn oracle_pattern_matches(pattern: &str, id: &SpiffeId) -> bool {
    match pattern.strip_suffix("/*") {
        Some(base) => {
            let (btd, bpath) = split_id(base.as_bytes()).unwrap();
            let bsegs: Vec<&[u8]> = if bpath.is_empty() {
                vec![]
            } else {
                bpath[1..].split(|&b| b == b'/').collect()
            };
            let isegs: Vec<&[u8]> = id.path()[1..].split('/').map(str::as_bytes).collect();
            id.trust_domain_name().as_bytes() == btd
                && isegs.len() > bsegs.len()
                && isegs[..bsegs.len()] == bsegs[..]
        }
        None => pattern == id.as_str(),
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn spiffe_id_agrees_with_the_spec_on_grammar_strings(s in id_candidate()) {
        check_id(&s);
    }

    #[test]
    fn spiffe_id_agrees_with_the_spec_around_the_length_limit(s in id_near_limit()) {
        check_id(&s);
        prop_assert_eq!(SpiffeId::parse(&s).is_ok(), s.len() <= 2048);
    }

    #[test]
    fn spiffe_id_never_panics_and_agrees_on_any_string(s in any::<String>()) {
        check_id(&s);
    }

    #[test]
    fn spiffe_id_from_bytes_agrees_on_any_bytes(
        b in prop::collection::vec(any::<u8>(), 0..64),
        prefixed in any::<bool>(),
    ) {
        let mut input = if prefixed { SCHEME.as_bytes().to_vec() } else { Vec::new() };
        input.extend(b);
        let got = SpiffeId::from_bytes(&input);
        prop_assert_eq!(got.is_ok(), oracle_id(&input), "{:?}: {:?}", String::from_utf8_lossy(&input), got);
        match got {
            Ok(id) => prop_assert_eq!(id.as_str().as_bytes(), &input[..]),
            Err(e) => error_points_into(&input, &e),
        }
    }

    #[test]
    fn broken_ids_are_refused(s in broken_id()) {
        prop_assert!(SpiffeId::parse(&s).is_err(), "accepted {:?}", s);
        check_id(&s);
    }

    #[test]
    fn trust_domain_agrees_with_the_spec(
        s in prop_oneof![
            id_candidate().prop_map(|s| s.split('/').nth(2).unwrap_or("").to_string()),
            id_candidate().prop_map(|s| s.split('/').take(3).collect::<Vec<_>>().join("/")),
            valid_td(),
            any::<String>(),
        ],
    ) {
        check_td(&s);
    }

    #[test]
    fn id_patterns_parse_by_the_rules_and_match_whole_segments(
        base in prop_oneof![valid_id(), valid_td().prop_map(|td| format!("spiffe://{td}")), id_candidate()],
        star in any::<bool>(),
        ids in prop::collection::vec(valid_id(), 1..6),
        extra in prop::collection::vec(valid_segment(), 0..3),
        glue in prop_oneof![lit("/"), lit(""), lit("x"), lit("-")],
    ) {
        let pattern = if star { format!("{base}/*") } else { base.clone() };
        let got = IdPattern::parse(&pattern);
        let want = match pattern.strip_suffix("/*") {
            Some(b) => oracle_id(b.as_bytes()),
            None => oracle_id(pattern.as_bytes()) && has_workload_path(&pattern),
        };
        prop_assert_eq!(got.is_ok(), want, "IdPattern::parse({:?}) = {:?}", pattern, got);
        let Ok(p) = got else { return Ok(()) };
        prop_assert_eq!(p.to_string(), pattern.clone());
        let again = IdPattern::parse(&p.to_string());
        prop_assert_eq!(again.as_ref(), Ok(&p));
        // Candidates: random IDs, and IDs built on the pattern's base to hit the boundaries.
        let mut candidates: Vec<String> = ids;
        if !extra.is_empty() {
            candidates.push(format!("{base}{glue}{}", extra.join("/")));
        }
        candidates.push(base.clone());
        for c in candidates {
            let Ok(id) = SpiffeId::parse(&c) else { continue };
            if id.is_trust_domain_id() {
                continue;
            }
            prop_assert_eq!(p.matches(&id), oracle_pattern_matches(&pattern, &id), "{} vs {}", pattern, c);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Timestamps and durations.

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Seconds since 1970 by counting days, for years 0000-9999.
fn oracle_secs(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> i64 {
    let mut days = 0i64;
    if y >= 1970 {
        for yy in 1970..y {
            days += if is_leap(yy) { 366 } else { 365 };
        }
    } else {
        for yy in y..1970 {
            days -= if is_leap(yy) { 366 } else { 365 };
        }
    }
    for mm in 1..mo {
        days += days_in_month(y, mm);
    }
    days += d - 1;
    days * 86_400 + h * 3600 + mi * 60 + s
}

/// RFC 3339 `YYYY-MM-DDTHH:MM:SSZ`, digits only, as `Timestamp::parse` documents.
fn oracle_timestamp(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let shape = b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, se) = (n(0..4), n(5..7), n(8..10), n(11..13), n(14..16), n(17..19));
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 59
    {
        return None;
    }
    Some(oracle_secs(y, mo, d, h, mi, se))
}

fn timestamp_candidate() -> impl Strategy<Value = String> {
    let field = |w: usize| {
        prop_oneof![
            8 => proptest::string::string_regex(&format!("[0-9]{{{w}}}")).unwrap(),
            1 => proptest::string::string_regex(&format!("[0-9+ -]{{{w}}}")).unwrap(),
            1 => proptest::string::string_regex(&format!("[0-9a-z]{{{}}}", w.saturating_sub(1))).unwrap(),
        ]
    };
    let sep =
        |c: &'static str| prop_oneof![10 => lit(c), 1 => lit(""), 1 => lit("/"), 1 => lit(" ")];
    (
        (field(4), sep("-"), field(2), sep("-"), field(2), sep("T")),
        (
            field(2),
            sep(":"),
            field(2),
            sep(":"),
            field(2),
            prop_oneof![10 => lit("Z"), 1 => lit("+00:00"), 1 => lit("z"), 1 => lit("")],
        ),
    )
        .prop_map(|((y, a, mo, b, d, c), (h, e, mi, f, s, z))| {
            format!("{y}{a}{mo}{b}{d}{c}{h}{e}{mi}{f}{s}{z}")
        })
}

/// A valid timestamp and its seconds, from calendar fields.
fn valid_timestamp() -> impl Strategy<Value = (String, i64)> {
    (1970i64..=9999, 1i64..=12)
        .prop_flat_map(|(y, mo)| {
            (
                Just(y),
                Just(mo),
                1..=days_in_month(y, mo),
                0i64..24,
                0i64..60,
                0i64..60,
            )
        })
        .prop_map(|(y, mo, d, h, mi, s)| {
            (
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
                oracle_secs(y, mo, d, h, mi, s),
            )
        })
}

const UNITS: [(&str, u64); 5] = [("ms", 0), ("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)];

fn oracle_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let (_, mult) = UNITS.iter().find(|(u, _)| *u == unit)?;
    Some(if *mult == 0 {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n.checked_mul(*mult)?)
    })
}

fn huge_number() -> impl Strategy<Value = String> {
    prop_oneof![
        lit("18446744073709551615"),
        lit("18446744073709551616"),
        lit("99999999999999999999999999999999"),
        lit("9223372036854775807"),
        lit("65535"),
        lit("65536"),
        lit("4294967296"),
        lit("0"),
        lit("-1"),
        lit("1e400"),
        lit("0x7fffffff"),
        lit(".inf"),
        "[0-9]{15,25}",
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn timestamps_agree_with_rfc3339(s in prop_oneof![timestamp_candidate(), any::<String>()]) {
        let got = Timestamp::parse(&s);
        prop_assert_eq!(got.as_ref().ok().map(|t| t.0), oracle_timestamp(&s), "{:?}: {:?}", s, got);
        match got {
            Ok(t) => prop_assert_eq!(t.to_string(), s),
            // Refusals name the value and the form expected.
            Err(e) => prop_assert!(e.contains(&format!("{s:?}")) && e.contains("RFC 3339"), "{}", e),
        }
    }

    #[test]
    fn valid_timestamps_parse_to_their_instant((s, secs) in valid_timestamp()) {
        let t = Timestamp::parse(&s).unwrap();
        prop_assert_eq!(t.0, secs);
        prop_assert_eq!(t.to_string(), s);
    }

    #[test]
    fn durations_agree_with_their_grammar(
        s in prop_oneof![
            (prop_oneof![huge_number(), "[0-9]{1,6}"], prop_oneof![lit("ms"), lit("s"), lit("m"), lit("h"), lit("d"), lit(""), lit(" s"), lit("S")])
                .prop_map(|(n, u)| format!("{n}{u}")),
            any::<String>(),
        ]
    ) {
        let got = duration::parse(&s);
        prop_assert_eq!(got.clone().ok(), oracle_duration(&s), "{:?}", s);
        if let Err(e) = got {
            // Refusals name the value (trimmed, as it is read).
            prop_assert!(e.starts_with(&format!("invalid duration {:?}: ", s.trim())), "{}", e);
        }
    }

    #[test]
    fn destinations_parse_as_socket_or_ip_and_print_back(
        a in prop_oneof![
            socket_addr().prop_map(|a| a.to_string()),
            any::<IpAddr>().prop_map(|a| a.to_string()),
            "[0-9.:\\[\\]a-f]{0,20}",
        ],
    ) {
        let got = a.parse::<Destination>();
        let want = a.parse::<SocketAddr>().map(Destination::Socket)
            .or_else(|_| a.parse::<IpAddr>().map(Destination::Host)).ok();
        prop_assert_eq!(got.clone().ok(), want);
        if let Ok(d) = got {
            prop_assert_eq!(d.to_string().parse::<Destination>(), Ok(d));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// YAML documents: generated from random valid values, rendered block-style one value a line so
// that the line of each SPIFFE ID is known.

/// A double-quoted YAML scalar for any string (YAML 1.2 §5.1 printable set raw, the rest
/// escaped).
fn yq(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        let raw = matches!(c, ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
            && !matches!(c, '"' | '\\' | '\u{feff}' | '\u{2028}' | '\u{2029}');
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if raw => out.push(c),
            c if (c as u32) <= 0xffff => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => write!(out, "\\U{:08x}", c as u32).unwrap(),
        }
    }
    out.push('"');
    out
}

/// Text for names and free-text fields: mostly ordinary, sometimes anything at all.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z][a-z0-9-]{0,12}",
        1 => "\\PC{0,16}",
        1 => any::<String>(),
    ]
}

/// Non-blank: owners, purposes and reasons must say something.
fn non_blank() -> impl Strategy<Value = String> {
    text().prop_filter("blank", |s| !s.trim().is_empty())
}

/// An ID or pattern slot in a rendered document: its 1-based line.
#[derive(Debug, Clone)]
struct Slot {
    line: usize,
}

#[derive(Debug, Default)]
struct Doc {
    lines: Vec<String>,
    slots: Vec<Slot>,
}

impl Doc {
    fn line(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }

    /// A line holding one SPIFFE ID or pattern as its only double-quoted scalar.
    fn slot(&mut self, prefix: &str, value: &str) {
        self.lines.push(format!("{prefix}{}", yq(value)));
        self.slots.push(Slot {
            line: self.lines.len(),
        });
    }

    fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }

    /// The document with the value on slot `i`'s line replaced by `value`.
    fn with_slot(&self, i: usize, value: &str) -> String {
        let mut lines = self.lines.clone();
        let l = &mut lines[self.slots[i].line - 1];
        let q = l.find('"').unwrap();
        l.truncate(q);
        l.push_str(&yq(value));
        lines.join("\n") + "\n"
    }
}

fn header(d: &mut Doc, kind: &str, name: &str, owner: Option<&str>, purpose: Option<&str>) {
    d.line("apiVersion: sigil.dev/v1");
    d.line(format!("kind: {kind}"));
    d.line("metadata:");
    d.line(format!("  name: {}", yq(name)));
    if let Some(o) = owner {
        d.line(format!("  owner: {}", yq(o)));
    }
    if let Some(p) = purpose {
        d.line(format!("  purpose: {}", yq(p)));
    }
}

#[derive(Debug, Clone)]
enum GenPath {
    Exact(String),
    Prefix(String),
    Template(String),
}

#[derive(Debug, Clone)]
struct GenRule {
    name: String,
    path: GenPath,
    methods: Vec<String>,
    hosts: Vec<String>,
    headers: Vec<(String, String)>,
    allow: Vec<String>,
    deny: Vec<String>,
    mode: Option<RuleMode>,
    expires: Option<(String, i64)>,
}

#[derive(Debug, Clone)]
struct GenPort {
    port: u16,
    tcp: bool,
    rules: Vec<GenRule>,
}

#[derive(Debug, Clone)]
struct GenPolicy {
    name: String,
    owner: String,
    purpose: String,
    target: String,
    mode: Option<RuleMode>,
    expires: Option<(String, i64)>,
    ports: Vec<GenPort>,
}

fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => valid_id(),
        1 => valid_id().prop_map(|id| {
            let cut = id.rfind('/').unwrap();
            format!("{}/*", &id[..cut])
        }),
        1 => valid_td().prop_map(|td| format!("spiffe://{td}/*")),
    ]
}

fn mode() -> impl Strategy<Value = Option<RuleMode>> {
    prop_oneof![
        Just(None),
        Just(Some(RuleMode::Enforce)),
        Just(Some(RuleMode::DryRun))
    ]
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    (
        text(),
        (0u8..3, prop::collection::vec(valid_segment(), 0..3)),
        prop::collection::vec("[A-Z]{1,7}", 0..3),
        prop::collection::vec("[a-z0-9][a-z0-9.-]{0,12}", 0..2),
        prop::collection::vec(("[a-z][a-z0-9-]{0,8}", text()), 0..2),
        prop::collection::vec(pattern(), 0..3),
        prop::collection::vec(pattern(), 0..3),
        mode(),
        prop::option::of(valid_timestamp()),
    )
        .prop_map(
            |(name, (kind, segs), methods, hosts, headers, allow, deny, mode, expires)| {
                // Each rule gets its own first segment later, so no two rules overlap.
                let rest: String = segs.iter().map(|s| format!("/{s}")).collect();
                let path = match kind {
                    0 => GenPath::Exact(rest),
                    1 => GenPath::Prefix(rest),
                    _ => GenPath::Template(format!("/{{id}}{rest}")),
                };
                GenRule {
                    name,
                    path,
                    methods,
                    hosts,
                    headers,
                    allow,
                    deny,
                    mode,
                    expires,
                }
            },
        )
}

fn gen_policy() -> impl Strategy<Value = GenPolicy> {
    let ports = prop::collection::btree_set(any::<u16>(), 1..4).prop_flat_map(|set| {
        let n = set.len();
        (
            Just(set.into_iter().collect::<Vec<_>>()),
            prop::collection::vec((any::<bool>(), prop::collection::vec(gen_rule(), 0..4)), n),
        )
    });
    (
        text(),
        non_blank(),
        non_blank(),
        valid_id(),
        mode(),
        prop::option::of(valid_timestamp()),
        ports,
    )
        .prop_map(
            |(name, owner, purpose, target, mode, expires, (nums, bodies))| GenPolicy {
                name,
                owner,
                purpose,
                target,
                mode,
                expires,
                ports: nums
                    .into_iter()
                    .zip(bodies)
                    .map(|(port, (tcp, rules))| GenPort {
                        port,
                        tcp,
                        rules: rules
                            .into_iter()
                            .enumerate()
                            .map(|(i, mut r)| {
                                // Unique names and non-overlapping paths: prefix the index.
                                r.name = format!("{i}-{}", r.name);
                                r.path = match r.path {
                                    GenPath::Exact(p) => GenPath::Exact(format!("/e{i}{p}")),
                                    GenPath::Prefix(p) => GenPath::Prefix(format!("/p{i}{p}")),
                                    GenPath::Template(p) => GenPath::Template(format!("/t{i}{p}")),
                                };
                                r
                            })
                            .collect(),
                    })
                    .collect(),
            },
        )
}

fn mode_name(m: RuleMode) -> &'static str {
    match m {
        RuleMode::Enforce => "enforce",
        RuleMode::DryRun => "dry-run",
    }
}

fn id_list(d: &mut Doc, indent: &str, key: &str, ids: &[String]) {
    if ids.is_empty() {
        d.line(format!("{indent}{key}: []"));
    } else {
        d.line(format!("{indent}{key}:"));
        for id in ids {
            d.slot(&format!("{indent}  - "), id);
        }
    }
}

fn render_policy(p: &GenPolicy, d: &mut Doc) {
    header(d, "Policy", &p.name, Some(&p.owner), Some(&p.purpose));
    d.line("spec:");
    d.slot("  target: ", &p.target);
    if let Some(m) = p.mode {
        d.line(format!("  mode: {}", mode_name(m)));
    }
    if let Some((ts, _)) = &p.expires {
        d.line(format!("  expiresAt: {}", yq(ts)));
    }
    d.line("  ports:");
    for port in &p.ports {
        d.line(format!("    - port: {}", port.port));
        d.line(format!(
            "      protocol: {}",
            if port.tcp { "tcp" } else { "http" }
        ));
        d.line(format!(
            "      {}:{}",
            if port.tcp { "rules" } else { "routes" },
            if port.rules.is_empty() { " []" } else { "" }
        ));
        for r in &port.rules {
            let i = "          ";
            d.line(format!("        - name: {}", yq(&r.name)));
            if !port.tcp {
                d.line(format!("{i}match:"));
                if !r.methods.is_empty() {
                    d.line(format!("{i}  methods: [{}]", r.methods.join(", ")));
                }
                if !r.hosts.is_empty() {
                    let hs: Vec<String> = r.hosts.iter().map(|h| yq(h)).collect();
                    d.line(format!("{i}  hosts: [{}]", hs.join(", ")));
                }
                if !r.headers.is_empty() {
                    d.line(format!("{i}  headers:"));
                    for (n, v) in &r.headers {
                        d.line(format!("{i}    - name: {}", yq(n)));
                        d.line(format!("{i}      value: {}", yq(v)));
                    }
                }
                let (k, v) = match &r.path {
                    GenPath::Exact(p) => ("exact", p),
                    GenPath::Prefix(p) => ("prefix", p),
                    GenPath::Template(p) => ("template", p),
                };
                d.line(format!("{i}  path:"));
                d.line(format!("{i}    {k}: {}", yq(v)));
            }
            id_list(d, i, "allow", &r.allow);
            id_list(d, i, "deny", &r.deny);
            if let Some(m) = r.mode {
                d.line(format!("{i}mode: {}", mode_name(m)));
            }
            if let Some((ts, _)) = &r.expires {
                d.line(format!("{i}expiresAt: {ts}"));
            }
        }
    }
}

fn patterns(ps: &[IdPattern]) -> Vec<String> {
    ps.iter().map(ToString::to_string).collect()
}

fn assert_policy_is(got: &Policy, want: &GenPolicy) {
    assert_eq!(got.metadata.name, want.name);
    assert_eq!(got.metadata.owner.as_deref(), Some(&*want.owner));
    assert_eq!(got.metadata.purpose.as_deref(), Some(&*want.purpose));
    assert_eq!(got.spec.target.as_str(), want.target);
    assert_eq!(got.spec.mode, want.mode.unwrap_or(RuleMode::Enforce));
    assert_eq!(
        got.spec.expires_at.map(|t| t.0),
        want.expires.as_ref().map(|e| e.1)
    );
    assert_eq!(got.spec.ports.len(), want.ports.len());
    for (gp, wp) in got.spec.ports.iter().zip(&want.ports) {
        let gp = &gp.value;
        assert_eq!(gp.port, wp.port);
        assert_eq!(
            gp.protocol,
            if wp.tcp {
                Protocol::Tcp
            } else {
                Protocol::Http
            }
        );
        let n = if wp.tcp {
            gp.rules.len()
        } else {
            gp.routes.len()
        };
        assert_eq!(n, wp.rules.len());
        for (k, w) in wp.rules.iter().enumerate() {
            let (name, allow, deny, mode, expires) = if wp.tcp {
                let r = &gp.rules[k].value;
                (&r.name, &r.allow, &r.deny, r.mode, r.expires_at)
            } else {
                let r = &gp.routes[k].value;
                let m = &r.matches;
                assert_eq!(m.methods, w.methods);
                assert_eq!(m.hosts, w.hosts);
                let hs: Vec<(String, String)> = m
                    .headers
                    .iter()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect();
                assert_eq!(hs, w.headers);
                let want_path = match &w.path {
                    GenPath::Exact(p) => PathMatch::Exact(p.clone()),
                    GenPath::Prefix(p) => PathMatch::Prefix(p.clone()),
                    GenPath::Template(p) => PathMatch::Template(p.clone()),
                };
                assert_eq!(m.path.as_ref(), Some(&want_path));
                (&r.name, &r.allow, &r.deny, r.mode, r.expires_at)
            };
            assert_eq!(name, &w.name);
            assert_eq!(patterns(allow), w.allow);
            assert_eq!(patterns(deny), w.deny);
            assert_eq!(mode, w.mode);
            assert_eq!(expires.map(|t| t.0), w.expires.as_ref().map(|e| e.1));
        }
    }
}

#[derive(Debug, Clone)]
struct GenRevocation {
    name: String,
    owner: Option<String>,
    id: String,
    reason: String,
    before: Option<(String, i64)>,
}

fn gen_revocation() -> impl Strategy<Value = GenRevocation> {
    (
        text(),
        prop::option::of(non_blank()),
        valid_id(),
        non_blank(),
        prop::option::of(valid_timestamp()),
    )
        .prop_map(|(name, owner, id, reason, before)| GenRevocation {
            name,
            owner,
            id,
            reason,
            before,
        })
}

fn render_revocation(r: &GenRevocation, d: &mut Doc) {
    header(d, "Revocation", &r.name, r.owner.as_deref(), None);
    d.line("spec:");
    d.slot("  spiffeId: ", &r.id);
    d.line(format!("  reason: {}", yq(&r.reason)));
    if let Some((ts, _)) = &r.before {
        d.line(format!("  issuedBefore: {}", yq(ts)));
    }
}

fn assert_revocation_is(got: &Revocation, want: &GenRevocation) {
    assert_eq!(got.metadata.name, want.name);
    assert_eq!(got.metadata.owner, want.owner);
    assert_eq!(got.spec.spiffe_id.as_str(), want.id);
    assert_eq!(got.spec.reason, want.reason);
    assert_eq!(
        got.spec.issued_before.map(|t| t.0),
        want.before.as_ref().map(|b| b.1)
    );
}

#[derive(Debug, Clone)]
struct GenWorkload {
    name: String,
    owner: String,
    purpose: String,
    id: String,
    environment: String,
    addresses: Vec<Destination>,
}

/// Without IPv6 flow info and scope, which `Display` does not round-trip.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn destination() -> impl Strategy<Value = Destination> {
    prop_oneof![
        socket_addr().prop_map(Destination::Socket),
        any::<IpAddr>().prop_map(Destination::Host),
    ]
}

fn gen_workload() -> impl Strategy<Value = GenWorkload> {
    (
        text(),
        non_blank(),
        non_blank(),
        valid_id(),
        text(),
        prop::collection::vec(destination(), 0..4),
    )
        .prop_map(
            |(name, owner, purpose, id, environment, addresses)| GenWorkload {
                name,
                owner,
                purpose,
                id,
                environment,
                addresses,
            },
        )
}

fn render_workload(w: &GenWorkload, d: &mut Doc) {
    header(d, "Workload", &w.name, Some(&w.owner), Some(&w.purpose));
    d.line("spec:");
    d.slot("  spiffeId: ", &w.id);
    d.line(format!("  environment: {}", yq(&w.environment)));
    d.line("  addresses:");
    for a in &w.addresses {
        d.line(format!("    - {}", yq(&a.to_string())));
    }
    if w.addresses.is_empty() {
        d.lines.pop();
        d.line("  addresses: []");
    }
}

fn assert_workload_is(got: &Workload, want: &GenWorkload) {
    assert_eq!(got.metadata.name, want.name);
    assert_eq!(got.metadata.owner.as_deref(), Some(&*want.owner));
    assert_eq!(got.metadata.purpose.as_deref(), Some(&*want.purpose));
    assert_eq!(got.spec.spiffe_id.as_str(), want.id);
    assert_eq!(got.spec.environment, want.environment);
    assert_eq!(got.spec.addresses, want.addresses);
}

#[derive(Debug, Clone)]
struct GenProxy {
    name: String,
    cert: String,
    key: String,
    bundles: String,
    id: Option<String>,
    ports: Vec<(u16, Vec<String>)>,
    opaque: Vec<u16>,
    deny_unknown: bool,
    registry: Vec<(Destination, String)>,
    admin_port: u16,
    timeouts: Vec<(&'static str, String, Duration)>,
    workers: Option<usize>,
    peer_id_cap: Option<usize>,
    policy_dir: Option<String>,
}

fn valid_duration() -> impl Strategy<Value = (String, Duration)> {
    (1u64..100_000, 0usize..4).prop_map(|(n, u)| {
        let (unit, mult) = UNITS[u];
        let d = if mult == 0 {
            Duration::from_millis(n)
        } else {
            Duration::from_secs(n * mult)
        };
        (format!("{n}{unit}"), d)
    })
}

fn gen_proxy() -> impl Strategy<Value = GenProxy> {
    let file = || "[A-Za-z0-9_./-]{1,20}";
    let ports = prop::collection::btree_map(1u16.., prop::collection::vec(pattern(), 0..3), 0..4);
    let registry = prop::collection::hash_map(destination(), valid_id(), 0..4)
        .prop_map(|m| m.into_iter().collect::<Vec<_>>());
    let timeouts = prop::collection::vec(valid_duration(), 5).prop_map(|ds| {
        ["handshake", "connect", "drain", "detect", "poolIdle"]
            .into_iter()
            .zip(ds)
            .map(|(k, (s, d))| (k, s, d))
            .collect::<Vec<_>>()
    });
    (
        (text(), file(), file(), file(), prop::option::of(valid_id())),
        (
            ports,
            prop::collection::vec(any::<u16>(), 0..3),
            any::<bool>(),
            registry,
        ),
        (
            1u16..15000,
            timeouts,
            prop::option::of(1usize..64),
            prop::option::of(1usize..100_000),
            prop::option::of(file()),
        ),
    )
        .prop_map(
            |(
                (name, cert, key, bundles, id),
                (ports, opaque, deny_unknown, registry),
                (admin_port, timeouts, workers, peer_id_cap, policy_dir),
            )| GenProxy {
                name,
                cert,
                key,
                bundles,
                id,
                ports: ports.into_iter().collect(),
                opaque,
                deny_unknown,
                registry,
                admin_port,
                timeouts,
                workers,
                peer_id_cap,
                policy_dir,
            },
        )
}

fn render_proxy(p: &GenProxy, d: &mut Doc) {
    header(d, "ProxyConfig", &p.name, None, None);
    d.line("spec:");
    d.line("  mode: transparent");
    d.line("  identity:");
    d.line(format!("    certFile: {}", yq(&p.cert)));
    d.line(format!("    keyFile: {}", yq(&p.key)));
    d.line(format!("    bundleDir: {}", yq(&p.bundles)));
    if let Some(id) = &p.id {
        d.slot("    spiffeId: ", id);
    }
    d.line("  inbound:");
    d.line(format!("    opaquePorts: {:?}", p.opaque));
    d.line("    ports:");
    for (port, allow) in &p.ports {
        d.line(format!("      - port: {port}"));
        id_list(d, "        ", "allow", allow);
    }
    if p.ports.is_empty() {
        d.lines.pop();
        d.line("    ports: []");
    }
    d.line("  outbound:");
    d.line(format!(
        "    unknownDestination: {}",
        if p.deny_unknown {
            "deny"
        } else {
            "passthrough"
        }
    ));
    d.line("    registry:");
    for (addr, id) in &p.registry {
        d.line(format!("      - address: {}", yq(&addr.to_string())));
        d.slot("        spiffeId: ", id);
    }
    if p.registry.is_empty() {
        d.lines.pop();
        d.line("    registry: []");
    }
    d.line("  admin:");
    d.line(format!("    listen: \"0.0.0.0:{}\"", p.admin_port));
    d.line("  timeouts:");
    for (k, s, _) in &p.timeouts {
        d.line(format!("    {k}: {s}"));
    }
    if let Some(w) = p.workers {
        d.line(format!("  workers: {w}"));
    }
    if let Some(c) = p.peer_id_cap {
        d.line("  metrics:");
        d.line(format!("    peerIdCap: {c}"));
    }
    if let Some(dir) = &p.policy_dir {
        d.line(format!("  policyDir: {}", yq(dir)));
    }
}

fn assert_proxy_is(got: &ProxyConfig, want: &GenProxy, file: &Path) {
    let s = &got.spec;
    assert_eq!(got.metadata.name, want.name);
    assert_eq!(got.base_dir, file.parent().unwrap());
    assert_eq!(s.mode, Mode::Transparent);
    assert_eq!(s.identity.cert_file.as_deref(), Some(Path::new(&want.cert)));
    assert_eq!(s.identity.key_file.as_deref(), Some(Path::new(&want.key)));
    assert_eq!(s.identity.bundle_dir, Path::new(&want.bundles));
    assert_eq!(
        s.identity.spiffe_id.as_ref().map(SpiffeId::as_str),
        want.id.as_deref()
    );
    let ports: Vec<(u16, Vec<String>)> = s
        .inbound
        .ports
        .iter()
        .map(|r| (r.value.port, patterns(&r.value.allow)))
        .collect();
    assert_eq!(ports, want.ports);
    assert_eq!(s.inbound.opaque_ports, want.opaque);
    assert_eq!(
        s.outbound.unknown_destination,
        if want.deny_unknown {
            UnknownDestination::Deny
        } else {
            UnknownDestination::Passthrough
        }
    );
    let reg: Vec<(Destination, String)> = s
        .outbound
        .registry
        .iter()
        .map(|e| (e.value.address, e.value.spiffe_id.to_string()))
        .collect();
    assert_eq!(reg, want.registry);
    assert_eq!(
        s.admin.listen,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, want.admin_port))
    );
    let t = &s.timeouts;
    let got_t = [t.handshake, t.connect, t.drain, t.detect, t.pool_idle];
    let want_t: Vec<Duration> = want.timeouts.iter().map(|x| x.2).collect();
    assert_eq!(got_t.to_vec(), want_t);
    assert_eq!(s.workers, want.workers);
    assert_eq!(s.metrics.peer_id_cap, want.peer_id_cap.unwrap_or(200));
    assert_eq!(
        s.policy_dir.as_deref(),
        want.policy_dir.as_deref().map(Path::new)
    );
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the YAML properties.

/// `file:line:` at the front of the message, with a line inside the text.
fn assert_error_names_file_and_line(e: &ConfigError, file: &Path, text: &str) {
    let shown = e.to_string();
    // YAML breaks lines at \n, \r\n and a lone \r.
    let lines = text.replace("\r\n", "\n").matches(['\n', '\r']).count() as u64 + 1;
    assert_eq!(e.file, file, "{shown}");
    let Some(line) = e.line else {
        panic!("error without a line: {shown}\n--- input:\n{text}");
    };
    assert!(
        // An error at the end of the input may sit on the line after the last one.
        (1..=lines + 1).contains(&line),
        "line {line} outside the {lines}-line input: {shown}"
    );
    let want = format!("{}:{line}:", file.display());
    assert!(
        shown.starts_with(&want),
        "{shown:?} should start with {want:?}"
    );
}

/// What every successfully loaded resource must satisfy, whatever text it came from.
fn assert_policy_invariants(p: &Policy) {
    assert!(p.metadata.missing_owner_or_purpose().is_none());
    assert!(!p.spec.target.is_trust_domain_id());
    let mut ports = std::collections::HashSet::new();
    for port in &p.spec.ports {
        assert!(ports.insert(port.value.port), "duplicate port");
        let mut names = std::collections::HashSet::new();
        for r in &port.value.routes {
            assert_eq!(port.value.protocol, Protocol::Http);
            assert!(names.insert(r.value.name.clone()), "duplicate route name");
            if let Some(path) = &r.value.matches.path {
                let (PathMatch::Exact(p) | PathMatch::Prefix(p) | PathMatch::Template(p)) = path;
                assert!(p.starts_with('/') && !p.contains("//"), "{p:?}");
                assert!(!p.split('/').any(|s| s == "." || s == ".."), "{p:?}");
            }
        }
        for r in &port.value.rules {
            assert_eq!(port.value.protocol, Protocol::Tcp);
            assert!(names.insert(r.value.name.clone()), "duplicate rule name");
        }
    }
}

fn assert_resource_invariants(r: &Resource) {
    match r {
        Resource::Policy(p) => assert_policy_invariants(p),
        Resource::Revocation(r) => {
            assert!(!r.spec.spiffe_id.is_trust_domain_id());
            assert!(!r.spec.reason.trim().is_empty());
        }
        Resource::Workload(w) => {
            assert!(w.metadata.missing_owner_or_purpose().is_none());
            assert!(!w.spec.spiffe_id.is_trust_domain_id());
        }
        Resource::TrustBundle(b) => {
            let pem = b.spec.pem.trim();
            assert!(pem.is_empty() || pem.contains("-----BEGIN CERTIFICATE-----"));
        }
    }
}

fn assert_proxy_invariants(c: &ProxyConfig) {
    let s = &c.spec;
    assert_ne!(s.workers, Some(0));
    assert!(s.metrics.peer_id_cap >= 1);
    assert!(!s.timeouts.pool_idle.is_zero());
    let mut ports = std::collections::HashSet::new();
    for p in &s.inbound.ports {
        assert!(p.value.port != 0 && ports.insert(p.value.port));
    }
    let mut dests = std::collections::HashSet::new();
    for e in &s.outbound.registry {
        assert!(dests.insert(e.value.address));
    }
}

/// Every parser of the crate on one text: none may panic; errors name the file and a line;
/// whatever loads satisfies the invariants.
fn parse_everything(text: &str) {
    let file = Path::new("fuzz/input.yaml");
    let check = |e: ConfigError| assert_error_names_file_and_line(&e, file, text);
    match Policy::parse_all(file, text) {
        Ok(ps) => ps.iter().for_each(assert_policy_invariants),
        Err(e) => check(e),
    }
    match Revocation::parse_all(file, text) {
        Ok(rs) => rs
            .into_iter()
            .for_each(|r| assert_resource_invariants(&Resource::Revocation(r))),
        Err(e) => check(e),
    }
    match Workload::parse_all(file, text) {
        Ok(ws) => ws
            .into_iter()
            .for_each(|w| assert_resource_invariants(&Resource::Workload(w))),
        Err(e) => check(e),
    }
    match TrustBundle::parse_all(file, text) {
        Ok(bs) => bs
            .into_iter()
            .for_each(|b| assert_resource_invariants(&Resource::TrustBundle(b))),
        Err(e) => check(e),
    }
    match Resource::parse_all(file, text) {
        Ok(rs) => rs.iter().for_each(assert_resource_invariants),
        Err(e) => check(e),
    }
    match ProxyConfig::parse(file, text) {
        Ok(c) => assert_proxy_invariants(&c),
        Err(e) => check(e),
    }
}

/// YAML punctuation and other troublemakers to splice into valid documents.
const TOKENS: &[&str] = &[
    ":",
    ": ",
    "- ",
    "-",
    "{",
    "}",
    "[",
    "]",
    ",",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "!tag ",
    "? ",
    "|",
    ">",
    "#",
    "'",
    "\"",
    "\n",
    "  ",
    "\t",
    "---\n",
    "...\n",
    "%YAML 1.2\n",
    "<<: *a",
    "\\",
    "\u{0}",
    "\u{feff}",
    "é",
    "~",
    "null",
    "true",
    "0x10",
    "1e309",
    ".nan",
    "@",
    "`",
    "\r",
    "\r\n",
    "    ",
    "\n  - ",
    "\n    ",
    "spiffe://",
    "/*",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
    Indent { line: usize, by: i8 },
    HugeNumber { at: usize, n: String },
    ReplaceChar { at: usize, c: char },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Insert { at, token }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
        (any::<usize>(), -4i8..4).prop_map(|(line, by)| Mutation::Indent { line, by }),
        (any::<usize>(), huge_number()).prop_map(|(at, n)| Mutation::HugeNumber { at, n }),
        (any::<usize>(), any::<char>()).prop_map(|(at, c)| Mutation::ReplaceChar { at, c }),
    ]
}

fn boundary(s: &str, at: usize) -> usize {
    let mut at = at % (s.len() + 1);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn mutate(text: &str, muts: &[Mutation]) -> String {
    let mut s = text.to_string();
    for m in muts {
        match m {
            Mutation::Delete { at, len } => {
                let a = boundary(&s, *at);
                let b = boundary(&s, (a + len).min(s.len()));
                s.replace_range(a..b.max(a), "");
            }
            Mutation::Insert { at, token } => {
                let a = boundary(&s, *at);
                s.insert_str(a, TOKENS[*token]);
            }
            Mutation::DuplicateLine { line } => {
                let mut lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let i = line % lines.len();
                    lines.insert(i, lines[i]);
                    s = lines.join("\n") + "\n";
                }
            }
            Mutation::SwapLines { a, b } => {
                let mut lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines.swap(a % n, b % n);
                    s = lines.join("\n") + "\n";
                }
            }
            Mutation::Indent { line, by } => {
                let mut lines: Vec<String> = s.lines().map(String::from).collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    let l = &mut lines[line % n];
                    if *by >= 0 {
                        l.insert_str(0, &" ".repeat(*by as usize));
                    } else {
                        let strip = l
                            .bytes()
                            .take(by.unsigned_abs() as usize)
                            .take_while(|&b| b == b' ')
                            .count();
                        l.replace_range(..strip, "");
                    }
                    s = lines.join("\n") + "\n";
                }
            }
            Mutation::HugeNumber { at, n } => {
                // Replace the run of digits at or after `at`, if any.
                let a = boundary(&s, *at);
                if let Some(off) = s[a..].find(|c: char| c.is_ascii_digit()) {
                    let start = a + off;
                    let len = s[start..]
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(s.len() - start);
                    s.replace_range(start..start + len, n);
                }
            }
            Mutation::ReplaceChar { at, c } => {
                let a = boundary(&s, *at);
                if let Some(old) = s[a..].chars().next() {
                    s.replace_range(a..a + old.len_utf8(), &c.to_string());
                }
            }
        }
    }
    s
}

fn any_document() -> impl Strategy<Value = Doc> {
    prop_oneof![
        gen_policy().prop_map(|p| {
            let mut d = Doc::default();
            render_policy(&p, &mut d);
            d
        }),
        gen_revocation().prop_map(|r| {
            let mut d = Doc::default();
            render_revocation(&r, &mut d);
            d
        }),
        gen_workload().prop_map(|w| {
            let mut d = Doc::default();
            render_workload(&w, &mut d);
            d
        }),
        gen_proxy().prop_map(|p| {
            let mut d = Doc::default();
            render_proxy(&p, &mut d);
            d
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// YAML properties.

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn generated_policies_parse_to_their_values(ps in prop::collection::vec(gen_policy(), 1..4)) {
        let file = Path::new("gen/policies.yaml");
        let mut text = String::new();
        for p in &ps {
            let mut d = Doc::default();
            render_policy(p, &mut d);
            text.push_str("---\n");
            text.push_str(&d.text());
        }
        let got = Policy::parse_all(file, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(got.len(), ps.len());
        for (g, w) in got.iter().zip(&ps) {
            assert_policy_is(g, w);
            assert_policy_invariants(g);
        }
    }

    #[test]
    fn generated_revocations_parse_to_their_values(rs in prop::collection::vec(gen_revocation(), 1..4)) {
        let file = Path::new("gen/revocations.yaml");
        let text: String = rs.iter().map(|r| {
            let mut d = Doc::default();
            render_revocation(r, &mut d);
            format!("---\n{}", d.text())
        }).collect();
        let got = Revocation::parse_all(file, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(got.len(), rs.len());
        for (g, w) in got.iter().zip(&rs) {
            assert_revocation_is(g, w);
        }
    }

    #[test]
    fn generated_workloads_parse_to_their_values(ws in prop::collection::vec(gen_workload(), 1..4)) {
        let file = Path::new("gen/workloads.yaml");
        let text: String = ws.iter().map(|w| {
            let mut d = Doc::default();
            render_workload(w, &mut d);
            format!("---\n{}", d.text())
        }).collect();
        let got = Workload::parse_all(file, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(got.len(), ws.len());
        for (g, w) in got.iter().zip(&ws) {
            assert_workload_is(g, w);
        }
    }

    #[test]
    fn generated_proxy_configs_parse_to_their_values(p in gen_proxy(), dir in "[a-z]{1,8}(/[a-z]{1,8}){0,2}") {
        let file = Path::new(&dir).join("proxy.yaml");
        let mut d = Doc::default();
        render_proxy(&p, &mut d);
        let text = d.text();
        let got = ProxyConfig::parse(&file, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_proxy_is(&got, &p, &file);
        assert_proxy_invariants(&got);
    }

    /// Mixed kinds in one file (what `sigil apply` reads): each resource comes back in order,
    /// and an invalid ID anywhere is reported at its line in the whole file.
    #[test]
    fn mixed_files_parse_in_order_and_report_the_broken_line(
        docs in prop::collection::vec(
            prop_oneof![
                gen_policy().prop_map(|p| { let mut d = Doc::default(); render_policy(&p, &mut d); ("Policy", p.name, d) }),
                gen_revocation().prop_map(|r| { let mut d = Doc::default(); render_revocation(&r, &mut d); ("Revocation", r.name, d) }),
                gen_workload().prop_map(|w| { let mut d = Doc::default(); render_workload(&w, &mut d); ("Workload", w.name, d) }),
            ],
            1..5,
        ),
        comments in prop::collection::vec(0usize..3, 5),
        pick in any::<prop::sample::Index>(),
        bad in broken_id(),
    ) {
        let file = Path::new("ops/apply.yaml");
        let mut text = String::new();
        let mut starts = Vec::new();
        for (i, (_, _, d)) in docs.iter().enumerate() {
            for _ in 0..comments[i] {
                text.push_str("# a comment line\n");
            }
            if i > 0 || comments[i] % 2 == 1 {
                text.push_str("---\n");
            }
            starts.push(text.lines().count());
            text.push_str(&d.text());
        }
        let got = Resource::parse_all(file, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let got: Vec<(&str, &str)> = got.iter().map(|r| (r.kind(), r.name())).collect();
        let want: Vec<(&str, &str)> = docs.iter().map(|(k, n, _)| (*k, n.as_str())).collect();
        prop_assert_eq!(got, want);

        // Break one ID slot of one document.
        let k = pick.index(docs.len());
        let d = &docs[k].2;
        let slot = pick.index(d.slots.len());
        let mut broken = String::new();
        for (i, (_, _, doc)) in docs.iter().enumerate() {
            for _ in 0..comments[i] {
                broken.push_str("# a comment line\n");
            }
            if i > 0 || comments[i] % 2 == 1 {
                broken.push_str("---\n");
            }
            broken.push_str(&if i == k { doc.with_slot(slot, &bad) } else { doc.text() });
        }
        let e = Resource::parse_all(file, &broken).expect_err(&bad);
        assert_error_names_file_and_line(&e, file, &broken);
        prop_assert_eq!(e.line, Some((starts[k] + d.slots[slot].line) as u64), "{}\n{}", e, broken);
    }

    /// The same, per kind: the kind's own parser reports the line of the broken ID.
    #[test]
    fn a_broken_id_is_reported_at_its_line(doc in any_document(), pick in any::<prop::sample::Index>(), bad in broken_id()) {
        prop_assume!(!doc.slots.is_empty());
        let slot = pick.index(doc.slots.len());
        let text = doc.with_slot(slot, &bad);
        let file = Path::new("conf/broken.yaml");
        let kind = doc.lines[1].trim_start_matches("kind: ").to_string();
        let e = match kind.as_str() {
            "Policy" => Policy::parse_all(file, &text).map(drop),
            "Revocation" => Revocation::parse_all(file, &text).map(drop),
            "Workload" => Workload::parse_all(file, &text).map(drop),
            _ => ProxyConfig::parse(file, &text).map(drop),
        }.expect_err(&bad);
        assert_error_names_file_and_line(&e, file, &text);
        prop_assert_eq!(e.line, Some(doc.slots[slot].line as u64), "{}\n{}", e, text);
        prop_assert!(e.message.contains("SPIFFE ID"), "{}", e);
    }

}

proptest! {
    #![proptest_config(config(1200))]

    #[test]
    fn mutated_documents_never_panic_and_errors_name_file_and_line(
        doc in any_document(),
        muts in prop::collection::vec(mutation(), 1..5),
    ) {
        parse_everything(&mutate(&doc.text(), &muts));
    }

    #[test]
    fn arbitrary_text_never_panics_and_errors_name_file_and_line(
        text in prop_oneof![
            any::<String>(),
            prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|t| t.concat()),
            prop::collection::vec(
                prop_oneof![prop::sample::select(TOKENS).prop_map(String::from), "[a-zA-Z]{1,10}", lit("apiVersion: sigil.dev/v1\n"), lit("kind: Policy\n"), lit("spec:\n"), lit("metadata: {name: x}\n")],
                0..30,
            ).prop_map(|t| t.concat()),
        ],
    ) {
        parse_everything(&text);
    }
}

// ---------------------------------------------------------------------------------------------
// Regression tests: bugs in src/ that the properties above found, each on the input that showed
// it, asserting what must hold.

/// config/src/spiffe.rs, `TrustDomain::parse`: with a `spiffe://` prefix, the byte offsets in
/// errors counted from the bare name (`spiffe://Example.org`: "uppercase letter at byte 0").
/// They count from the start of the input as given, as `SpiffeId::parse` counts them.
#[test]
fn trust_domain_error_offsets_count_from_the_start_of_the_input() {
    assert_eq!(
        TrustDomain::parse("spiffe://Example.org"),
        Err(SpiffeIdError::TrustDomainUppercase { at: 9 })
    );
    assert_eq!(
        TrustDomain::parse("spiffe://ex!mple.org"),
        Err(SpiffeIdError::TrustDomainChar { byte: b'!', at: 11 })
    );
    assert_eq!(
        TrustDomain::parse("spiffe://ex%41.org"),
        Err(SpiffeIdError::PercentEncoded { at: 11 })
    );
    assert_eq!(
        TrustDomain::parse("spiffe://Example.org").unwrap_err(),
        SpiffeId::parse("spiffe://Example.org/w").unwrap_err()
    );
    // Without the scheme the name is the input.
    assert_eq!(
        TrustDomain::parse("Example.org"),
        Err(SpiffeIdError::TrustDomainUppercase { at: 0 })
    );
}

/// config/src/policy.rs, `Timestamp::parse`: the numeric fields were read with `i64::from_str`,
/// which takes a sign, so `+026-+1-+1T+1:+1:+1Z` was read as 0026-01-01T01:01:01Z and
/// `-001-01-01T00:00:00Z` as the year -1. RFC 3339 has digits only, each field its width.
#[test]
fn timestamps_refuse_signs_in_numeric_fields() {
    for s in [
        "+026-+1-+1T+1:+1:+1Z",
        "-001-01-01T00:00:00Z",
        "2026-+1-01T00:00:00Z",
        "2026-01--1T00:00:00Z",
        "2026-01-01T-1:00:00Z",
        "2026-01-01T00:+0:00Z",
        "2026-01-01T00:00: 1Z",
    ] {
        assert_eq!(
            Timestamp::parse(s),
            Err(format!(
                "invalid time {s:?}: expected RFC 3339 UTC like 2026-12-31T00:00:00Z \
                 (YYYY-MM-DDTHH:MM:SSZ, digits only)"
            ))
        );
    }
    // In a Policy: refused at its line.
    let text = "apiVersion: sigil.dev/v1\nkind: Policy\n\
                metadata: {name: p, owner: o, purpose: x}\nspec:\n  \
                target: spiffe://example.org/w\n  expiresAt: 2026-+1-01T00:00:00Z\n  ports: []\n";
    let e = Policy::parse_all(Path::new("p.yaml"), text).unwrap_err();
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("\"2026-+1-01T00:00:00Z\""), "{e}");
}

/// config/src/proxy_config.rs, `duration::parse`: `n * 60` and `n * 3600` were unchecked, so
/// a duration in minutes or hours past u64 seconds panicked ("attempt to multiply with
/// overflow") in debug builds and wrapped to a short timeout in release builds; a
/// `timeouts:` value of a ProxyConfig reached it. Such a value is refused, naming it.
#[test]
fn durations_past_u64_seconds_are_refused() {
    for s in [
        "307445734561825861m",
        "5124095576030432h",
        "18446744073709551616s",
        "18446744073709551616ms",
        "99999999999999999999999999h",
    ] {
        let got = std::panic::catch_unwind(|| duration::parse(s)).expect("no panic");
        assert_eq!(got, Err(format!("invalid duration {s:?}: too large")));
    }
    // The largest that fit.
    assert_eq!(
        duration::parse("307445734561825860m"),
        Ok(Duration::from_secs(307_445_734_561_825_860 * 60))
    );
    assert_eq!(
        duration::parse("5124095576030431h"),
        Ok(Duration::from_secs(5_124_095_576_030_431 * 3600))
    );
    assert_eq!(
        duration::parse("18446744073709551615s"),
        Ok(Duration::from_secs(u64::MAX))
    );
    let text = format!("{PROXY}  timeouts:\n    drain: 5124095576030432h\n");
    let e = ProxyConfig::parse(Path::new("p.yaml"), &text).unwrap_err();
    assert_eq!(
        e.to_string(),
        "p.yaml:7:12: invalid duration \"5124095576030432h\": too large"
    );
}

/// The head of a ProxyConfig; a test appends to `spec:` from line 6 on.
const PROXY: &str = "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {name: p}\nspec:\n  \
                     identity: {certFile: c, keyFile: k, bundleDir: b}\n";

/// config/src/proxy_config.rs, `ProxyConfig::validate`: the checks of the whole spec
/// (`workers: 0`, `metrics.peerIdCap: 0`, `timeouts.poolIdle: 0s`, explicit mode without
/// listeners, two listeners on one address, `allowIdentityChange` with `spiffeId`) reported
/// `file: message` with no line. Each names the line of the key it refuses.
#[test]
fn proxy_config_spec_errors_name_the_line_of_their_key() {
    let cases: &[(&str, &str)] = &[
        ("  workers: 0\n", "6:12: workers must be at least 1"),
        (
            "  metrics: {peerIdCap: 0}\n",
            "6:24: metrics.peerIdCap must be at least 1",
        ),
        (
            "  metrics:\n    peerIdCap: 0\n",
            "7:16: metrics.peerIdCap must be at least 1",
        ),
        (
            "  timeouts: {poolIdle: 0s}\n",
            "6:24: timeouts.poolIdle must be longer than 0 (every burst would dial afresh)",
        ),
        (
            "  mode: explicit\n",
            "6:9: mode is explicit but no inbound.explicit or outbound.explicit listener is set",
        ),
        (
            "  admin: {listen: \"0.0.0.0:15006\"}\n",
            "6:19: admin.listen 0.0.0.0:15006 is also inbound.listen (its default); \
             each listener needs an address of its own",
        ),
        (
            "  inbound: {listen: \"0.0.0.0:15000\"}\n",
            "6:21: inbound.listen 0.0.0.0:15000 is also admin.listen (its default); \
             each listener needs an address of its own",
        ),
        (
            "  admin: {listen: \"127.0.0.1:9\"}\n  outbound: {listen: \"127.0.0.1:9\"}\n",
            "7:22: outbound.listen 127.0.0.1:9 is also admin.listen (line 6); \
             each listener needs an address of its own",
        ),
        (
            "  mode: explicit\n  inbound:\n    explicit: [{listen: \"0.0.0.0:15000\", port: 80}]\n",
            "8:16: listen 0.0.0.0:15000 is also admin.listen (its default); \
             each listener needs an address of its own",
        ),
    ];
    for (extra, want) in cases {
        let e = ProxyConfig::parse(Path::new("p.yaml"), &format!("{PROXY}{extra}")).unwrap_err();
        assert_eq!(e.to_string(), format!("p.yaml:{want}"), "{extra:?}");
    }
    let pinned = "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {name: p}\nspec:\n  \
                  identity:\n    certFile: c\n    keyFile: k\n    bundleDir: b\n    \
                  spiffeId: spiffe://example.org/w\n    allowIdentityChange: true\n";
    let e = ProxyConfig::parse(Path::new("p.yaml"), pinned).unwrap_err();
    assert_eq!(
        e.to_string(),
        "p.yaml:10:26: identity.allowIdentityChange: true contradicts identity.spiffeId \
         spiffe://example.org/w (line 9), which pins the identity; remove one of them"
    );
}

/// The SVID comes from files or from the control plane (a join token), never both or none;
/// a join token needs a control plane to present it to.
#[test]
fn the_svid_comes_from_files_or_from_the_control_plane() {
    let head = "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {name: p}\nspec:\n";
    let cp = "  controlPlane: {address: \"127.0.0.1:15012\", spiffeId: spiffe://example.org/c, stateDir: s}\n";
    let issued = format!("{head}  identity:\n    joinTokenFile: t\n    bundleDir: b\n{cp}");
    let cfg = ProxyConfig::parse(Path::new("p.yaml"), &issued).unwrap();
    assert_eq!(
        cfg.spec.identity.source(),
        sigil_config::proxy_config::SvidSource::Issued {
            join_token_file: "t".into()
        }
    );
    let spire = format!(
        "{head}  identity:\n    workloadApi: unix:///run/spire/agent.sock\n    bundleDir: b\n"
    );
    let cfg = ProxyConfig::parse(Path::new("p.yaml"), &spire).unwrap();
    assert_eq!(
        cfg.spec.identity.source(),
        sigil_config::proxy_config::SvidSource::WorkloadApi {
            socket: "/run/spire/agent.sock".into()
        }
    );
    let cases = [
        (
            format!("{head}  identity:\n    joinTokenFile: t\n    bundleDir: b\n"),
            "p.yaml:6:20: identity.joinTokenFile needs controlPlane: the control plane issues the SVID",
        ),
        (
            format!("{head}  identity:\n    certFile: c\n    keyFile: k\n    joinTokenFile: t\n    bundleDir: b\n{cp}"),
            "p.yaml:8:20: identity.joinTokenFile and identity.certFile/keyFile exclude each other: the SVID comes from the control plane or from files",
        ),
        (
            format!("{head}  identity:\n    certFile: c\n    bundleDir: b\n"),
            "p.yaml:6:5: identity needs certFile and keyFile (an SVID kept by someone else), joinTokenFile (the control plane issues it), or workloadApi (a SPIFFE Workload API hands it out)",
        ),
        (
            format!("{head}  identity:\n    workloadApi: unix:///run/spire/agent.sock\n    joinTokenFile: t\n    bundleDir: b\n{cp}"),
            "p.yaml:6:18: identity.workloadApi excludes certFile, keyFile and joinTokenFile: the SVID comes from one source",
        ),
        (
            format!("{head}  identity:\n    workloadApi: /run/spire/agent.sock\n    bundleDir: b\n"),
            "p.yaml:6:18: identity.workloadApi \"/run/spire/agent.sock\": a Workload API address is unix:///path/to/socket",
        ),
        (
            format!("{head}  identity:\n    workloadApi: unix:agent.sock\n    bundleDir: b\n"),
            "p.yaml:6:18: identity.workloadApi \"unix:agent.sock\": a Workload API address is unix:///path/to/socket, with an absolute path",
        ),
        (
            format!("{head}  identity:\n    certFile: c\n    keyFile: k\n    bundleDir: b\n  workloadApi: {{socket: /run/w.sock}}\n"),
            "p.yaml:9:16: workloadApi needs controlPlane: it names the workloads served and issues their SVIDs",
        ),
    ];
    for (text, want) in cases {
        let e = ProxyConfig::parse(Path::new("p.yaml"), &text).unwrap_err();
        assert_eq!(e.to_string(), want, "{text}");
    }
}

/// config/src/proxy_config.rs + yaml.rs: a ProxyConfig file whose document is empty or null
/// (`---` alone, `~`, `null`, a bare tag like `!A`) was refused as "p.yaml: missing field
/// `apiVersion`", with no line. It is refused at the document's line, saying it is empty.
#[test]
fn an_empty_or_null_proxy_config_is_refused_at_its_line() {
    for (text, line) in [
        ("---\n", 1),
        ("~\n", 1),
        ("null\n", 1),
        ("!A\n", 1),
        ("", 1),
        ("# nothing yet\n\n---\n~\n", 4),
    ] {
        let e = ProxyConfig::parse(Path::new("p.yaml"), text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text:?}: {e}");
        assert_eq!(
            e.message,
            "document is empty or null; expected a ProxyConfig (apiVersion, kind, metadata, spec)",
            "{text:?}"
        );
    }
}

/// config/src/yaml.rs, with serde-saphyr: a top-level key repeated behind a tag
/// (`apiVersion: ...` then `!x apiVersion: ...`) slips past `DuplicateKeyPolicy::Error`, which
/// compares tagged nodes, and serde's derive refused it as "duplicate field" with no line, in
/// every parser. It is refused at the line of the repeated key, in the whole file.
#[test]
fn a_top_level_key_repeated_behind_a_tag_is_refused_at_its_line() {
    let f = Path::new("p.yaml");
    let text = "apiVersion: sigil.dev/v1\n!x apiVersion: sigil.dev/v1\nkind: Policy\n";
    let want = "p.yaml:2:4: duplicate field `apiVersion`";
    assert_eq!(Policy::parse_all(f, text).unwrap_err().to_string(), want);
    assert_eq!(
        Revocation::parse_all(f, text).unwrap_err().to_string(),
        want
    );
    assert_eq!(Workload::parse_all(f, text).unwrap_err().to_string(), want);
    assert_eq!(
        TrustBundle::parse_all(f, text).unwrap_err().to_string(),
        want
    );
    assert_eq!(Resource::parse_all(f, text).unwrap_err().to_string(), want);
    assert_eq!(ProxyConfig::parse(f, text).unwrap_err().to_string(), want);
    // Found whatever follows the repeat (serde stops there), and whatever keys precede it.
    let text = "kind: Policy\n!x kind: Policy\nkind: Policy\nspec: [\n";
    let want = "p.yaml:2:4: duplicate field `kind`";
    assert_eq!(Policy::parse_all(f, text).unwrap_err().to_string(), want);
    assert_eq!(Resource::parse_all(f, text).unwrap_err().to_string(), want);
    let text = "2: 3\nkind: Policy\n!x kind: Policy\nspec: [\n";
    let want = "p.yaml:3:4: duplicate field `kind`";
    assert_eq!(Resource::parse_all(f, text).unwrap_err().to_string(), want);
    // In a later document, the line counts from the top of the file.
    let rev = "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {name: r}\n\
               spec: {spiffeId: spiffe://example.org/w, reason: leaked}\n";
    let two = format!(
        "{rev}---\n{}",
        rev.replace(
            "kind: Revocation\n",
            "kind: Revocation\n!x kind: Revocation\n"
        )
    );
    let want = "p.yaml:8:4: duplicate field `kind`";
    assert_eq!(
        Revocation::parse_all(f, &two).unwrap_err().to_string(),
        want
    );
    assert_eq!(Resource::parse_all(f, &two).unwrap_err().to_string(), want);
}

/// Policy/Revocation/Workload/TrustBundle::parse_all skipped a null document (`~`, `null`, a
/// bare tag) without a word, while Resource::parse_all (what `sigil apply` reads) refused it.
/// Now every multi-document parser reads a file the same way: a document with nothing but
/// blank lines and comments is skipped (a leading or trailing `---`, a resource commented
/// out); a null one is refused at its line, being content that is not a resource.
#[test]
fn blank_documents_are_skipped_and_null_documents_refused_by_every_parser() {
    let f = Path::new("p.yaml");
    type Parse = fn(&Path, &str) -> Result<usize, ConfigError>;
    let parsers: [(&str, Parse); 5] = [
        ("a Policy", |f, t| Policy::parse_all(f, t).map(|v| v.len())),
        ("a Revocation", |f, t| {
            Revocation::parse_all(f, t).map(|v| v.len())
        }),
        ("a Workload", |f, t| {
            Workload::parse_all(f, t).map(|v| v.len())
        }),
        ("a TrustBundle", |f, t| {
            TrustBundle::parse_all(f, t).map(|v| v.len())
        }),
        (
            "a resource (Workload, Policy, Revocation or TrustBundle)",
            |f, t| Resource::parse_all(f, t).map(|v| v.len()),
        ),
    ];
    let rev = "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {name: r}\n\
               spec: {spiffeId: spiffe://example.org/w, reason: leaked}\n";
    for text in [
        "",
        "\n",
        "---\n",
        "--- # nothing\n",
        "# only a comment\n",
        "---\n# commented out\n---\n",
        "%YAML 1.2\n---\n",
        "...\n",
    ] {
        for (_, parse) in parsers {
            assert_eq!(parse(f, text).unwrap(), 0, "{text:?}");
        }
    }
    for (text, line) in [
        ("~\n", 1),
        ("null\n", 1),
        ("!A\n", 1),
        ("--- ~\n", 1),
        ("# c\n---\n\n!A\n", 4),
        ("\r\n---\r~\r---\r", 3),
    ] {
        for (what, parse) in parsers {
            let e = parse(f, text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert_eq!(
                e.message,
                format!("document is null (~, null or a lone tag); expected {what}"),
                "{text:?}"
            );
        }
    }
    // Among resources: skipped when blank, refused when null, at the line in the whole file.
    let blank = format!("---\n{rev}---\n# gone\n---\n{rev}---\n");
    assert_eq!(Revocation::parse_all(f, &blank).unwrap().len(), 2);
    assert_eq!(Resource::parse_all(f, &blank).unwrap().len(), 2);
    for (text, line) in [
        (format!("{rev}---\nnull\n"), 6),
        (format!("{rev}---\n{rev}--- !A\n"), 10),
        (format!("{rev}...\n~\n---\n{rev}"), 6),
    ] {
        let e = Revocation::parse_all(f, &text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text:?}: {e}");
        assert!(e.message.starts_with("document is null"), "{e}");
        let e = Resource::parse_all(f, &text).unwrap_err();
        assert_eq!(e.line, Some(line), "{text:?}: {e}");
        assert!(e.message.starts_with("document is null"), "{e}");
    }
}
