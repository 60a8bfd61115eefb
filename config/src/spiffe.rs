//! SPIFFE IDs and trust domains, validated by the rules of the SPIFFE-ID standard
//! (SPIFFE-ID.md §2): `spiffe://<trust domain><path>`, lowercase trust domain of
//! `[a-z0-9.-_]`, path segments of `[a-zA-Z0-9.-_]`, no empty, `.` or `..` segments, no
//! trailing slash, no percent-encoding, no port, userinfo, query or fragment.

use std::fmt;

const SCHEME: &str = "spiffe://";
/// SPIFFE-ID.md §2.3: implementations must support IDs of up to 2048 bytes and may refuse longer.
pub const MAX_ID_LEN: usize = 2048;
/// SPIFFE-ID.md §2.1: a trust domain name is a DNS-like label sequence of at most 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a SPIFFE ID (or trust domain). Each variant names the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeIdError {
    Empty,
    WrongScheme,
    TooLong {
        len: usize,
    },
    EmptyTrustDomain,
    TrustDomainTooLong {
        len: usize,
    },
    /// A character outside `[a-z0-9.-_]` in the trust domain; `:`/`@`/`%`/uppercase get their own.
    TrustDomainChar {
        byte: u8,
        at: usize,
    },
    TrustDomainUppercase {
        at: usize,
    },
    Port,
    UserInfo,
    PercentEncoded {
        at: usize,
    },
    Query,
    Fragment,
    EmptySegment,
    DotSegment,
    TrailingSlash,
    PathChar {
        byte: u8,
        at: usize,
    },
    /// A pattern naming a bare trust domain, which no workload SVID can carry.
    TrustDomainOnly,
}

impl fmt::Display for SpiffeIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "SPIFFE ID is empty"),
            Self::WrongScheme => write!(f, "SPIFFE ID must start with \"spiffe://\""),
            Self::TooLong { len } => {
                write!(f, "SPIFFE ID is {len} bytes, longer than {MAX_ID_LEN}")
            }
            Self::EmptyTrustDomain => write!(f, "trust domain is empty"),
            Self::TrustDomainTooLong { len } => write!(
                f,
                "trust domain is {len} bytes, longer than {MAX_TRUST_DOMAIN_LEN}"
            ),
            Self::TrustDomainChar { byte, at } => write!(
                f,
                "trust domain has character {} at byte {at}; only a-z 0-9 . - _ are allowed",
                show_byte(*byte)
            ),
            Self::TrustDomainUppercase { at } => {
                write!(
                    f,
                    "trust domain has an uppercase letter at byte {at}; it must be lowercase"
                )
            }
            Self::Port => write!(f, "trust domain must not contain a port"),
            Self::UserInfo => write!(f, "trust domain must not contain userinfo (user@)"),
            Self::PercentEncoded { at } => {
                write!(f, "percent-encoding is not allowed (byte {at})")
            }
            Self::Query => write!(f, "a query (?...) is not allowed"),
            Self::Fragment => write!(f, "a fragment (#...) is not allowed"),
            Self::EmptySegment => write!(f, "path has an empty segment (\"//\")"),
            Self::DotSegment => write!(f, "path has a \".\" or \"..\" segment"),
            Self::TrailingSlash => write!(f, "path must not end with \"/\""),
            Self::PathChar { byte, at } => write!(
                f,
                "path has character {} at byte {at}; only a-z A-Z 0-9 . - _ are allowed",
                show_byte(*byte)
            ),
            Self::TrustDomainOnly => write!(
                f,
                "names only a trust domain, which no workload carries; write spiffe://<domain>/* \
                 to match every workload in it"
            ),
        }
    }
}

impl std::error::Error for SpiffeIdError {}

fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}' (0x{b:02x})", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

/// A validated trust domain name such as `example.org`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    /// Accepts a bare name (`example.org`) or the trust domain's SPIFFE ID (`spiffe://example.org`).
    /// Byte offsets in errors count from the start of `s` as given, scheme included.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let (name, offset) = match s.strip_prefix(SCHEME) {
            Some(name) => (name, SCHEME.len()),
            None => (s, 0),
        };
        check_trust_domain(name.as_bytes(), offset)?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A validated SPIFFE ID. Kept as one string so that comparing, hashing and printing it
/// (all on the connection path) never rebuilds it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: Box<str>,
    /// Byte offset where the path starts (== id.len() for a trust-domain-only ID).
    path_at: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        Self::from_bytes(s.as_bytes())
    }

    /// Validates raw bytes (a certificate's URI SAN arrives as bytes, not UTF-8).
    pub fn from_bytes(b: &[u8]) -> Result<Self, SpiffeIdError> {
        if b.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if !b.starts_with(SCHEME.as_bytes()) {
            return Err(SpiffeIdError::WrongScheme);
        }
        if b.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: b.len() });
        }
        let rest = &b[SCHEME.len()..];
        let td_len = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
        check_trust_domain(&rest[..td_len], SCHEME.len())?;
        let path_at = SCHEME.len() + td_len;
        check_path(&b[path_at..], path_at)?;
        // Every byte was checked to be ASCII above, so this conversion cannot fail.
        let s = std::str::from_utf8(b).map_err(|e| SpiffeIdError::PathChar {
            byte: b[e.valid_up_to()],
            at: e.valid_up_to(),
        })?;
        Ok(Self {
            id: s.into(),
            path_at,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain_name(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_name().into())
    }

    /// The path, empty for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// X.509-SVIDs must not carry the trust domain's own ID (SPIFFE X509-SVID.md §2).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path_at == self.id.len()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `offset` is where `td` starts in the whole input, so errors point at the right byte.
fn check_trust_domain(td: &[u8], offset: usize) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    // Query and fragment can only appear here when there is no path at all.
    for (i, &c) in td.iter().enumerate() {
        match c {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b'A'..=b'Z' => return Err(SpiffeIdError::TrustDomainUppercase { at: offset + i }),
            b':' => return Err(SpiffeIdError::Port),
            b'@' => return Err(SpiffeIdError::UserInfo),
            b'%' => return Err(SpiffeIdError::PercentEncoded { at: offset + i }),
            b'?' => return Err(SpiffeIdError::Query),
            b'#' => return Err(SpiffeIdError::Fragment),
            _ => {
                return Err(SpiffeIdError::TrustDomainChar {
                    byte: c,
                    at: offset + i,
                })
            }
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { len: td.len() });
    }
    Ok(())
}

fn check_path(path: &[u8], offset: usize) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // path starts with '/' by construction (the trust domain ends at the first '/').
    let mut seg_start = 1;
    for i in 1..=path.len() {
        if i == path.len() || path[i] == b'/' {
            let seg = &path[seg_start..i];
            if seg.is_empty() {
                return Err(if i == path.len() {
                    SpiffeIdError::TrailingSlash
                } else {
                    SpiffeIdError::EmptySegment
                });
            }
            if seg == b"." || seg == b".." {
                return Err(SpiffeIdError::DotSegment);
            }
            seg_start = i + 1;
            continue;
        }
        match path[i] {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => {}
            b'%' => return Err(SpiffeIdError::PercentEncoded { at: offset + i }),
            b'?' => return Err(SpiffeIdError::Query),
            b'#' => return Err(SpiffeIdError::Fragment),
            c => {
                return Err(SpiffeIdError::PathChar {
                    byte: c,
                    at: offset + i,
                })
            }
        }
    }
    Ok(())
}

/// Who a rule names: one exact ID, every ID under a path prefix (`spiffe://td/ns/prod/*`), or
/// a whole trust domain (`spiffe://td/*`). Prefixes match whole segments only: `/ns/prod/*`
/// matches `/ns/prod/x` but not `/ns/production`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    Exact(SpiffeId),
    /// `prefix` is the ID text up to and including the `/` before `*`.
    Prefix {
        prefix: Box<str>,
    },
}

impl IdPattern {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        match s.strip_suffix("/*") {
            Some(base) => {
                // Validate the part before "/*" as an ID (it may be a bare trust domain).
                SpiffeId::parse(base)?;
                Ok(Self::Prefix {
                    prefix: format!("{base}/").into(),
                })
            }
            None => {
                let id = SpiffeId::parse(s)?;
                if id.is_trust_domain_id() {
                    // A trust domain's own ID is never a workload's SVID, so this would match
                    // nothing; say what was probably meant instead.
                    return Err(SpiffeIdError::TrustDomainOnly);
                }
                Ok(Self::Exact(id))
            }
        }
    }

    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Prefix { prefix } => id.as_str().starts_with(&**prefix),
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => f.write_str(id.as_str()),
            Self::Prefix { prefix } => write!(f, "{prefix}*"),
        }
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPattern({self})")
    }
}

macro_rules! deserialize_via_parse {
    ($t:ty, $what:literal) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                <$t>::parse(&s)
                    .map_err(|e| serde::de::Error::custom(format!("invalid {} {s:?}: {e}", $what)))
            }
        }
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}
deserialize_via_parse!(SpiffeId, "SPIFFE ID");
deserialize_via_parse!(TrustDomain, "trust domain");
deserialize_via_parse!(IdPattern, "SPIFFE ID pattern");
