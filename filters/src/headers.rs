//! The header fields through which the sidecar tells its workload who called, and the rule
//! that keeps anyone else from setting them.
//!
//! A backend may read a field under another spelling than the one the sidecar sets: HTTP
//! field names are case-insensitive, and CGI, WSGI, Rack and PHP map `-` to `_` when they
//! turn fields into variables, so `X_Sigil_Peer_Id` reaches such a backend as the same
//! variable as `x-sigil-peer-id`. Every spelling is therefore the sidecar's alone: removed
//! from what a client sends, in the header section and in trailers, before the verified
//! value is set. A field the project adds later joins `IDENTITY_HEADERS` and gets the same
//! treatment everywhere.

/// The fields only the sidecar may set, in their canonical spelling.
pub const IDENTITY_HEADERS: &[&str] = &[PEER_ID_HEADER];

/// The verified SPIFFE ID of the peer, as the inbound sidecar hands it to the workload.
pub const PEER_ID_HEADER: &str = "x-sigil-peer-id";

/// Whether a backend could read `name` as one of `IDENTITY_HEADERS`: equal in ASCII letters
/// whatever their case, with `_` and `-` counted as the same character.
pub fn is_identity_header(name: &str) -> bool {
    IDENTITY_HEADERS
        .iter()
        .any(|canonical| same_field(name, canonical))
}

fn same_field(name: &str, canonical: &str) -> bool {
    let (a, b) = (name.as_bytes(), canonical.as_bytes());
    a.len() == b.len()
        && a.iter().zip(b).all(|(&x, &y)| {
            let fold = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            fold(x) == fold(y)
        })
}

/// A `Trailer` field's value without the identity fields it announces: None when nothing
/// needs to change, Some("") when nothing is left (drop the field).
pub fn trailer_without_identity(value: &str) -> Option<String> {
    let names = value.split(',').map(str::trim).filter(|n| !n.is_empty());
    if !names.clone().any(is_identity_header) {
        return None;
    }
    Some(
        names
            .filter(|n| !is_identity_header(n))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_a_backend_could_read_as_the_peer_id_is_an_identity_header() {
        for name in [
            "x-sigil-peer-id",
            "X-Sigil-Peer-Id",
            "X-SIGIL-PEER-ID",
            "x_sigil_peer_id",
            "X_Sigil_Peer_Id",
            "x-sigil_peer-id",
            "x_SIGIL-peer_ID",
        ] {
            assert!(is_identity_header(name), "{name}");
        }
        for name in [
            "x-sigil-peer-ids",
            "x-sigil-peer-i",
            "x-sigil-peer.id",
            "x-sigil-peer id",
            "xsigil-peer-id-",
            "x-forwarded-for",
            "",
            // Only ASCII letters fold: a dotted capital I is not an `i`.
            "x-sigil-peer-\u{0130}d",
        ] {
            assert!(!is_identity_header(name), "{name}");
        }
    }

    #[test]
    fn trailer_loses_only_the_identity_names() {
        assert_eq!(trailer_without_identity("grpc-status, grpc-message"), None);
        assert_eq!(trailer_without_identity(""), None);
        assert_eq!(
            trailer_without_identity("X-Sigil-Peer-Id").as_deref(),
            Some("")
        );
        assert_eq!(
            trailer_without_identity("checksum,x_sigil_peer_id , expires").as_deref(),
            Some("checksum, expires")
        );
        assert_eq!(
            trailer_without_identity(" ,x-sigil-peer-id,, ").as_deref(),
            Some("")
        );
    }
}
