//! Request-target normalization for L7 route matching (issue 3).
//!
//! A route check is only as good as the agreement between the path it looks at and the path the
//! workload serves. These functions turn a request target into the one spelling routes are
//! matched on, and refuse the spellings that servers disagree about instead of guessing. They run
//! on every HTTP request, so they are pure and return borrowed data when the input is already
//! normal (the common case), allocating only to rewrite.
//!
//! [`normalize_path`] (the proxy passes the path-and-query of the target; for absolute-form and
//! HTTP/2 that is the part after the authority):
//! - the path must start with `/` ([`TargetError::NotOriginForm`]); `*` (the asterisk-form of
//!   `OPTIONS *`) gets its own error, [`TargetError::AsteriskForm`], so the proxy can tell it
//!   apart, and is never handed to route matching because it names no route;
//! - `%XX` escapes of unreserved characters (`ALPHA DIGIT - . _ ~`, hex in either case) are
//!   decoded (RFC 3986 §6.2.2.2); every other escape is kept, with its hex uppercased so two
//!   spellings compare equal (§6.2.2.1); encoded non-ASCII (UTF-8 paths) is therefore allowed;
//! - duplicate slashes are merged, then `.` and `..` segments (including `%2e` spellings) are
//!   removed as in RFC 3986 §5.2.4; `..` above the root stays at the root; a trailing slash, and
//!   the slash that a final `.` or `..` leaves, are kept;
//! - refused, never decoded: `%2F`, `%5C`, raw `\`, NUL (raw or `%00`), other encoded control
//!   characters, malformed escapes, raw control bytes, space, non-ASCII bytes and `#`;
//! - refused beyond the original design, because each is a known route-check bypass:
//!   a dot segment carrying `;` parameters (`/public/..;/admin`: Tomcat and Jetty strip the
//!   parameters and then resolve the `..`), and a `..` that follows a `//` (`/a//../b`:
//!   servers that merge slashes first resolve it to `/b`, servers that do not to `/a/b`);
//! - the query (after the first `?`) is returned separately and untouched, but checked for bytes
//!   no request target may contain (control, space, non-ASCII, NUL, `#`).
//!
//! The proxy should forward the normalized path rather than the original, so that the workload
//! serves exactly what was authorized.
//!
//! [`effective_host`]: the authority routes are matched on. It takes one argument more than the
//! first design: the default port of the request's scheme, because whether `:443` is "no port"
//! depends on the scheme, which an authority alone does not carry. Hosts are lowercased, a
//! single trailing dot is dropped (`api.example.` and `api.example` are the same DNS name and
//! must not escape each other's rules), IPv6 literals are written in RFC 5952 form, a default
//! port is dropped and other ports lose leading zeros. Refused: userinfo (`user@host`), percent
//! escapes and characters outside `A-Z a-z 0-9 . - _`, empty labels, IPv6 zone IDs and IPvFuture,
//! and numeric hosts that are not a plain dotted quad (`127.1`, `0x7f.0.0.1`, `2130706433`),
//! which resolvers read as IPv4 addresses that no route spells that way.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Why a request target is refused. `Display` gives a short reason fit for a 400 response body
/// and a log line; it echoes request data only in [`TargetError::HostMismatch`], and only after
/// both values have passed host validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// The path is empty or does not start with `/`.
    NotOriginForm,
    /// The target is `*` (asterisk-form, `OPTIONS *`).
    AsteriskForm,
    /// A `#` in the target.
    Fragment,
    /// `%2F` in the path.
    EncodedSlash,
    /// `%5C` in the path.
    EncodedBackslash,
    /// A raw `\` in the path.
    Backslash,
    /// A raw NUL byte, or `%00` in the path.
    NulByte,
    /// `%` not followed by two hex digits.
    BadPercentEncoding,
    /// A raw control byte, space or non-ASCII byte.
    ControlOrNonAscii,
    /// `%01`–`%1F` or `%7F` in the path.
    EncodedControl,
    /// A `.` or `..` segment followed by `;` parameters.
    DotSegmentWithParams,
    /// A `..` segment somewhere after an empty segment (`//`).
    DotSegmentAfterEmpty,
    /// Neither an absolute-form authority nor a Host header.
    MissingHost,
    /// More than one Host header.
    RepeatedHost,
    /// A Host header with bytes other than visible ASCII.
    HostNotAscii,
    InvalidHost {
        field: HostField,
        problem: HostProblem,
    },
    /// The absolute-form (or `:authority`) host differs from the Host header.
    HostMismatch { target: String, host: String },
}

/// Where an invalid host came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostField {
    /// The authority of an absolute-form target, or HTTP/2 `:authority`.
    TargetAuthority,
    HostHeader,
}

/// What is wrong with a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostProblem {
    Empty,
    UserInfo,
    /// A character outside `A-Z a-z 0-9 . - _`, including `%`.
    BadChar,
    EmptyLabel,
    /// Not 1–65535 in decimal digits.
    BadPort,
    /// A bracketed literal that is not a plain IPv6 address.
    BadIpLiteral,
    /// A numeric host that is not a dotted quad.
    BadIpv4,
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOriginForm => write!(f, "request target must be a path starting with '/'"),
            Self::AsteriskForm => write!(f, "asterisk-form request target '*' is not accepted"),
            Self::Fragment => write!(f, "request target contains a fragment ('#')"),
            Self::EncodedSlash => write!(f, "path contains an encoded slash (%2F)"),
            Self::EncodedBackslash => write!(f, "path contains an encoded backslash (%5C)"),
            Self::Backslash => write!(f, "path contains a backslash"),
            Self::NulByte => write!(f, "request target contains a NUL byte"),
            Self::BadPercentEncoding => write!(f, "path contains a malformed %-escape"),
            Self::ControlOrNonAscii => write!(
                f,
                "request target contains a control character, space or non-ASCII byte"
            ),
            Self::EncodedControl => write!(f, "path contains an encoded control character"),
            Self::DotSegmentWithParams => {
                write!(f, "path contains a dot segment with parameters ('..;')")
            }
            Self::DotSegmentAfterEmpty => {
                write!(
                    f,
                    "path contains '..' after '//', which servers resolve differently"
                )
            }
            Self::MissingHost => write!(f, "request has no Host header"),
            Self::RepeatedHost => write!(f, "more than one Host header"),
            Self::HostNotAscii => write!(f, "Host header is not ASCII"),
            Self::InvalidHost { field, problem } => write!(f, "invalid {field}: {problem}"),
            Self::HostMismatch { target, host } => write!(
                f,
                "request target authority '{target}' does not match Host header '{host}'"
            ),
        }
    }
}

impl std::error::Error for TargetError {}

impl fmt::Display for HostField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TargetAuthority => "request target authority",
            Self::HostHeader => "Host header",
        })
    }
}

impl fmt::Display for HostProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty host",
            Self::UserInfo => "userinfo ('@') is not allowed",
            Self::BadChar => "character not allowed in a host name",
            Self::EmptyLabel => "empty label in host name",
            Self::BadPort => "port is not a number from 1 to 65535",
            Self::BadIpLiteral => "not a plain IPv6 address literal",
            Self::BadIpv4 => "numeric host is not a dotted-quad IPv4 address",
        })
    }
}

/// Splits `path_and_query` at the first `?` and returns the path to match routes on, and the
/// query, untouched. See the module documentation for the rules. The path is
/// `Cow::Borrowed` from the input when it was already normal.
pub fn normalize_path(path_and_query: &str) -> Result<(Cow<'_, str>, Option<&str>), TargetError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if path == "*" {
        return Err(TargetError::AsteriskForm);
    }
    if !path.starts_with('/') {
        return Err(TargetError::NotOriginForm);
    }
    // Every byte is checked before any segment is dropped, so that a refused spelling cannot
    // hide inside a segment that `..` would remove.
    let decoded = decode_unreserved(path)?;
    if let Some(query) = query {
        check_query(query)?;
    }
    let path = match remove_dot_segments(&decoded)? {
        Some(resolved) => Cow::Owned(resolved),
        None => decoded,
    };
    Ok((path, query))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The escape starting at `bytes[i] == b'%'`: its value, and whether its hex was lowercase.
fn escape_at(bytes: &[u8], i: usize) -> Result<(u8, bool), TargetError> {
    let hi = bytes.get(i + 1).copied().and_then(hex_value);
    let lo = bytes.get(i + 2).copied().and_then(hex_value);
    match (hi, lo) {
        (Some(hi), Some(lo)) => {
            let lower = bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase);
            Ok((hi << 4 | lo, lower))
        }
        _ => Err(TargetError::BadPercentEncoding),
    }
}

fn check_raw(b: u8) -> Result<(), TargetError> {
    match b {
        0 => Err(TargetError::NulByte),
        b'\\' => Err(TargetError::Backslash),
        b'#' => Err(TargetError::Fragment),
        0x21..=0x7e => Ok(()),
        _ => Err(TargetError::ControlOrNonAscii),
    }
}

fn check_escaped(v: u8) -> Result<(), TargetError> {
    match v {
        0 => Err(TargetError::NulByte),
        b'/' => Err(TargetError::EncodedSlash),
        b'\\' => Err(TargetError::EncodedBackslash),
        // Decoded control characters are how `%0a`-style tricks defeat regex-based route rules.
        0x01..=0x1f | 0x7f => Err(TargetError::EncodedControl),
        _ => Ok(()),
    }
}

/// Validates every byte of `path` and applies RFC 3986 §6.2.2.1–2. Borrowed when nothing needs
/// rewriting; the first pass only decides, so the normal case never allocates.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, TargetError> {
    let bytes = path.as_bytes();
    let mut rewrite = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (v, lower) = escape_at(bytes, i)?;
            check_escaped(v)?;
            rewrite |= lower || is_unreserved(v);
            i += 3;
        } else {
            check_raw(bytes[i])?;
            i += 1;
        }
    }
    if !rewrite {
        return Ok(Cow::Borrowed(path));
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Already validated by the first pass.
            let (v, _) = escape_at(bytes, i)?;
            if is_unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(v >> 4)]));
                out.push(char::from(HEX[usize::from(v & 0xf)]));
            }
            i += 3;
        } else {
            // ASCII only, checked by the first pass.
            out.push(char::from(bytes[i]));
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

fn check_query(query: &str) -> Result<(), TargetError> {
    query.bytes().try_for_each(|b| match b {
        // A query may contain `\` and any escape; only what no request target may hold is refused.
        b'\\' => Ok(()),
        _ => check_raw(b),
    })
}

/// Merges duplicate slashes and removes dot segments of a validated, decoded path that starts
/// with `/`. `None` when the path is already normal.
fn remove_dot_segments(path: &str) -> Result<Option<String>, TargetError> {
    let rest = &path[1..];
    let mut after_empty = false;
    let mut change = false;
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "" if !last => {
                after_empty = true;
                change = true;
            }
            "" => {}
            "." => change = true,
            ".." if after_empty => return Err(TargetError::DotSegmentAfterEmpty),
            ".." => change = true,
            s if s.starts_with(".;") || s.starts_with("..;") => {
                return Err(TargetError::DotSegmentWithParams)
            }
            _ => {}
        }
    }
    if !change {
        return Ok(None);
    }
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" | "." => {}
            ".." => {
                // `out` holds no empty segments, so the last `/` starts the segment to drop.
                let cut = out.rfind('/').unwrap_or(0);
                out.truncate(cut);
            }
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
        if segments.peek().is_none() {
            trailing_slash = matches!(segment, "" | "." | "..");
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(Some(out))
}

/// The one Host header of a request, from every value it carries (`values`, as bytes):
/// `None` when there is none. More than one is refused, as is one with bytes other than
/// visible ASCII and tab, which hosts and proxies read differently.
pub fn single_host<'a, I>(values: I) -> Result<Option<&'a str>, TargetError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut values = values.into_iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(TargetError::RepeatedHost);
    }
    if !first
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    {
        return Err(TargetError::HostNotAscii);
    }
    // Visible ASCII is UTF-8.
    std::str::from_utf8(first)
        .map(Some)
        .map_err(|_| TargetError::HostNotAscii)
}

/// The authority an outbound request is sent with over HTTP/2, where it replaces the Host
/// header: the target's (absolute form, or HTTP/2 `:authority`), else the Host header, as
/// spelled. They must pass the same checks the destination's sidecar makes
/// ([`effective_host`]), which it cannot make once Host is gone.
pub fn forwarded_authority<'a>(
    target_authority: Option<&'a str>,
    host_header: Option<&'a str>,
) -> Result<&'a str, TargetError> {
    effective_host(target_authority, host_header, 80)?;
    // `effective_host` refuses a request with neither.
    target_authority
        .or(host_header)
        .ok_or(TargetError::MissingHost)
}

/// The host (with port, if not the default) to match routes on.
///
/// `target_authority` is the authority of an absolute-form target (`http://h:p/x` gives `h:p`)
/// or the HTTP/2 `:authority`; `None` for origin-form. `host_header` is the Host header, `None`
/// when absent; a request with more than one Host header must be refused by the caller.
/// `default_port` is that of the request's scheme (80 for `http`, 443 for `https`); an explicit
/// port equal to it is the same as no port.
///
/// With a target authority, it is the result, and a Host header, if present, must name the same
/// host and port. RFC 9112 §3.2.2 tells servers to ignore Host in that case, but a proxy that
/// authorizes by one while the workload routes by the other is a bypass, so they must agree
/// (as RFC 9113 §8.3.1 already asks of `:authority` and Host). Without a target authority, the
/// Host header is required.
///
/// Borrowed from the input when its spelling is already canonical.
pub fn effective_host<'a>(
    target_authority: Option<&'a str>,
    host_header: Option<&'a str>,
    default_port: u16,
) -> Result<Cow<'a, str>, TargetError> {
    let canonical = |field, authority| {
        canonical_authority(authority, default_port)
            .map_err(|problem| TargetError::InvalidHost { field, problem })
    };
    match (target_authority, host_header) {
        (None, None) => Err(TargetError::MissingHost),
        (None, Some(host)) => canonical(HostField::HostHeader, host),
        (Some(target), None) => canonical(HostField::TargetAuthority, target),
        (Some(target), Some(host)) => {
            let canonical_target = canonical(HostField::TargetAuthority, target)?;
            let canonical_host = canonical(HostField::HostHeader, host)?;
            if canonical_target == canonical_host {
                Ok(canonical_target)
            } else {
                Err(TargetError::HostMismatch {
                    target: target.to_owned(),
                    host: host.to_owned(),
                })
            }
        }
    }
}

fn canonical_authority(authority: &str, default_port: u16) -> Result<Cow<'_, str>, HostProblem> {
    if authority.is_empty() {
        return Err(HostProblem::Empty);
    }
    if authority.contains('@') {
        return Err(HostProblem::UserInfo);
    }
    let (host, port) = split_host_port(authority)?;
    let port = match port {
        // RFC 3986 §6.2.3: an empty port is the same as none.
        None | Some("") => None,
        Some(digits) => Some((parse_port(digits)?, digits)),
    };
    let canonical_host = if host.starts_with('[') {
        canonical_ipv6(host)?
    } else {
        canonical_reg_name(host)?
    };
    match port {
        Some((number, digits)) if number != default_port => {
            let unchanged = matches!(canonical_host, Cow::Borrowed(h) if h.len() == host.len());
            if unchanged && !digits.starts_with('0') {
                Ok(Cow::Borrowed(authority))
            } else {
                Ok(Cow::Owned(format!("{canonical_host}:{number}")))
            }
        }
        _ => Ok(canonical_host),
    }
}

/// Splits off the port; an IPv6 literal keeps its brackets.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), HostProblem> {
    if authority.starts_with('[') {
        let close = authority.find(']').ok_or(HostProblem::BadIpLiteral)?;
        let (host, rest) = authority.split_at(close + 1);
        match rest.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if rest.is_empty() => Ok((host, None)),
            None => Err(HostProblem::BadIpLiteral),
        }
    } else {
        Ok(match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        })
    }
}

fn parse_port(digits: &str) -> Result<u16, HostProblem> {
    // `u16::from_str` alone would accept a leading `+`.
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostProblem::BadPort);
    }
    match digits.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostProblem::BadPort),
        Ok(port) => Ok(port),
    }
}

fn canonical_reg_name(host: &str) -> Result<Cow<'_, str>, HostProblem> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err(HostProblem::Empty);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(HostProblem::BadChar);
    }
    if name.split('.').any(str::is_empty) {
        return Err(HostProblem::EmptyLabel);
    }
    // URL parsers (WHATWG) and inet_aton read a name whose last label is numeric as an IPv4
    // address in any of several spellings; only the one spelling routes can name is let through.
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last.starts_with("0x")
        || last.starts_with("0X");
    if numeric && name.parse::<Ipv4Addr>().is_err() {
        return Err(HostProblem::BadIpv4);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(name))
    }
}

/// A bracketed IPv6 literal in RFC 5952 form (what `Ipv6Addr`'s `Display` writes).
fn canonical_ipv6(literal: &str) -> Result<Cow<'_, str>, HostProblem> {
    let inner = literal
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .ok_or(HostProblem::BadIpLiteral)?;
    // `Ipv6Addr` refuses zone IDs (`%25eth0`) and IPvFuture (`v1.x`), which is what we want.
    let addr: Ipv6Addr = inner.parse().map_err(|_| HostProblem::BadIpLiteral)?;
    let mut buf = StackBuf::default();
    if write!(buf, "[{addr}]").is_ok() && buf.as_bytes() == literal.as_bytes() {
        Ok(Cow::Borrowed(literal))
    } else {
        Ok(Cow::Owned(format!("[{addr}]")))
    }
}

/// Room for any bracketed literal `Ipv6Addr` writes (at most 41 bytes), so that checking
/// whether a literal is canonical does not allocate.
struct StackBuf {
    bytes: [u8; 48],
    len: usize,
}

impl Default for StackBuf {
    fn default() -> Self {
        Self {
            bytes: [0; 48],
            len: 0,
        }
    }
}

impl StackBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let dest = self.bytes.get_mut(self.len..end).ok_or(fmt::Error)?;
        dest.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_visible_ascii_host_header_is_taken() {
        assert_eq!(single_host([]), Ok(None));
        assert_eq!(single_host([&b"api:8080"[..]]), Ok(Some("api:8080")));
        assert_eq!(
            single_host([&b"a"[..], &b"a"[..]]),
            Err(TargetError::RepeatedHost)
        );
        assert_eq!(
            single_host([&b"caf\xc3\xa9"[..]]),
            Err(TargetError::HostNotAscii)
        );
        assert_eq!(
            single_host([&b"a\x01b"[..]]),
            Err(TargetError::HostNotAscii)
        );
        assert_eq!(
            TargetError::RepeatedHost.to_string(),
            "more than one Host header"
        );
    }

    #[test]
    fn the_forwarded_authority_is_the_target_or_host_as_spelled_once_they_agree() {
        assert_eq!(
            forwarded_authority(Some("api:80"), Some("API")),
            Ok("api:80")
        );
        assert_eq!(forwarded_authority(None, Some("Api:8080")), Ok("Api:8080"));
        assert_eq!(forwarded_authority(Some("api"), None), Ok("api"));
        assert_eq!(
            forwarded_authority(None, None),
            Err(TargetError::MissingHost)
        );
        assert!(matches!(
            forwarded_authority(Some("api"), Some("other")),
            Err(TargetError::HostMismatch { .. })
        ));
        assert!(matches!(
            forwarded_authority(None, Some("a@b")),
            Err(TargetError::InvalidHost {
                field: HostField::HostHeader,
                problem: HostProblem::UserInfo
            })
        ));
    }
}
