//! Protocol detection from the first bytes a client sends: HTTP/2 prior knowledge (the
//! connection preface), HTTP/1.x (a request line), or anything else (opaque TCP).

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we wait for before calling a stream opaque.
const MAX_METHOD: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
    /// Every byte so far fits a protocol: read more (or give up at the detection timeout).
    NeedMore,
}

/// More empty lines than this before a request line: not HTTP.
const MAX_LEADING_CRLF: usize = 16;

pub fn classify(prefix: &[u8]) -> Detected {
    if prefix.is_empty() {
        return Detected::NeedMore;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return if prefix.len() >= H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    // Empty lines before the request line, which servers skip (RFC 9112 §2.2): a request
    // that starts with them is still HTTP.
    let skipped = prefix
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    if skipped > 0 {
        return if skipped >= MAX_LEADING_CRLF {
            Detected::Opaque
        } else {
            classify(&prefix[skipped..])
        };
    }
    // HTTP/1 request line: an uppercase method token, a space, then the target.
    let token = prefix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match prefix.get(token) {
        None if token < MAX_METHOD => Detected::NeedMore,
        Some(b' ') if token > 0 => match prefix.get(token + 1) {
            None => Detected::NeedMore,
            // origin-form, absolute-form, asterisk-form (OPTIONS *), authority-form (CONNECT)
            Some(c) if *c == b'/' || *c == b'*' || c.is_ascii_alphanumeric() => Detected::Http1,
            Some(_) => Detected::Opaque,
        },
        _ => Detected::Opaque,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_versions_and_opaque_streams() {
        use Detected::*;
        let cases: &[(&[u8], Detected)] = &[
            (b"GET / HTTP/1.1\r\n", Http1),
            (b"POST /v1/x HTTP/1.1", Http1),
            (b"OPTIONS * HTTP/1.1", Http1),
            (b"GET http://h/ HTTP/1.1", Http1),
            (b"CONNECT h:443 HTTP/1.1", Http1),
            (H2_PREFACE, Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Http2),
            (b"", NeedMore),
            (b"G", NeedMore),
            (b"GET", NeedMore),
            (b"GET ", NeedMore),
            (b"PRI * HTTP/2", NeedMore),
            (b"\x16\x03\x01\x02\x00", Opaque), // TLS ClientHello
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Opaque), // PostgreSQL SSLRequest
            (b"get / HTTP/1.1", Opaque),
            (b"GET\t/", Opaque),
            (b" GET /", Opaque),
            (b"GET \r\n", Opaque),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Opaque),
            (b"PRIX", NeedMore), // could still be a method token
            (b"PRI*", Opaque),
            // Empty lines before the request line are skipped, as servers do.
            (b"\r\nGET / HTTP/1.1", Http1),
            (b"\r\n\r\n\nPOST /x HTTP/1.1", Http1),
            (b"\r\n", NeedMore),
            (b"\r\n\x16\x03", Opaque),
            (&[b'\n'; 16], Opaque),
        ];
        for (input, want) in cases {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
