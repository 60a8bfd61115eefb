//! Protocol detection from the first bytes a client sends: HTTP/2 prior knowledge (the
//! connection preface), HTTP/1.x (a request line), or anything else (opaque TCP); and the
//! choice, per inbound connection, between serving HTTP and relaying bytes.

use crate::tls::Carries;

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

/// The HTTP version a connection speaks, when it is known before serving: the peer
/// sidecar's ALPN or protocol detection said. `Either`: a server that reads the start of the
/// connection to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http1,
    Http2,
    Either,
}

impl Speaks {
    /// What protocol detection found; None for opaque bytes.
    pub fn detected(d: Detected) -> Option<Self> {
        match d {
            Detected::Http1 => Some(Self::Http1),
            Detected::Http2 => Some(Self::Http2),
            Detected::Opaque | Detected::NeedMore => None,
        }
    }
}

/// How an inbound connection is served once its handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Request by request, each authorized on its own.
    Http(Speaks),
    /// No ALPN said: read the client's first bytes, then serve HTTP or relay bytes.
    Sniff,
    /// Relayed as bytes, authorized once for the connection.
    Bytes,
}

/// Whether each request on an inbound connection is authorized rather than the connection
/// once: the port is declared `http`, or the peer's pool carries it (ALPN `sigil/h2`),
/// whatever the port. A peer denied on a TCP port then gets 403s rather than a connection
/// its pool cannot tell from a network failure.
pub fn per_request(alpn: Option<Carries>, declared_http: bool) -> bool {
    declared_http || alpn == Some(Carries::Http2)
}

/// How to serve an inbound connection. `alpn`: what the peer's ALPN said it carries (None:
/// not a sidecar, or no ALPN). `per_request`: see [`per_request`]. `may_be_http`: no policy
/// declares the port `tcp` and the config does not list it opaque; a port that is either is
/// only ever bytes, unless a peer's pool sends requests to it.
pub fn inbound_serve(alpn: Option<Carries>, per_request: bool, may_be_http: bool) -> Serve {
    match alpn {
        Some(Carries::Http2) => Serve::Http(Speaks::Http2),
        Some(Carries::Http1) if per_request || may_be_http => Serve::Http(Speaks::Http1),
        // A client that is not a sidecar (curl with a client certificate) on a port declared
        // `http`: the server tells the version.
        _ if per_request => Serve::Http(Speaks::Either),
        Some(Carries::Tcp) | Some(Carries::Http1) => Serve::Bytes,
        // Not a sidecar (openssl s_client, curl with a client certificate): look.
        None if may_be_http => Serve::Sniff,
        None => Serve::Bytes,
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

    #[test]
    fn a_pool_is_checked_per_request_on_any_port() {
        assert!(per_request(Some(Carries::Http2), false));
        assert!(per_request(None, true));
        assert!(!per_request(Some(Carries::Http1), false));
        assert!(!per_request(Some(Carries::Tcp), false));
        assert!(!per_request(None, false));
    }

    #[test]
    fn inbound_connections_are_served_as_their_alpn_and_port_say() {
        use Serve::*;
        let h2 = Some(Carries::Http2);
        let h1 = Some(Carries::Http1);
        let tcp = Some(Carries::Tcp);
        // (alpn, per_request, may_be_http) -> serve
        let cases = [
            // A peer's pool: HTTP/2, whatever the port says.
            (h2, true, false, Http(Speaks::Http2)),
            (h2, true, true, Http(Speaks::Http2)),
            // A peer's own HTTP/1.1 connection (an upgrade): HTTP/1.1 unless the port is
            // bytes only.
            (h1, true, false, Http(Speaks::Http1)),
            (h1, false, true, Http(Speaks::Http1)),
            (h1, false, false, Bytes),
            // A peer relaying bytes: bytes, unless the port is declared http.
            (tcp, false, true, Bytes),
            (tcp, true, true, Http(Speaks::Either)),
            // No ALPN (openssl s_client, curl): declared http is served, else looked at.
            (None, true, false, Http(Speaks::Either)),
            (None, false, true, Sniff),
            (None, false, false, Bytes),
        ];
        for (alpn, per_request, may_be_http, want) in cases {
            assert_eq!(
                inbound_serve(alpn, per_request, may_be_http),
                want,
                "alpn {alpn:?}, per_request {per_request}, may_be_http {may_be_http}"
            );
        }
    }

    #[test]
    fn only_http_detections_are_served_as_http() {
        assert_eq!(Speaks::detected(Detected::Http1), Some(Speaks::Http1));
        assert_eq!(Speaks::detected(Detected::Http2), Some(Speaks::Http2));
        assert_eq!(Speaks::detected(Detected::Opaque), None);
        assert_eq!(Speaks::detected(Detected::NeedMore), None);
    }
}
