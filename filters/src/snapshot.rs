//! Control-plane snapshots as the sidecar judges them: whether one may replace the snapshot
//! in force (`freshness`), and the integrity envelope of the copy kept on disk (`seal`,
//! `unseal`), so that a truncated, emptied or scribbled-over file is told from a snapshot.
//!
//! Versions count the changes of one store; the epoch names the store. Within an epoch a
//! snapshot older than the one in force is refused: it can only come from a control plane
//! replica that is behind its store, and applying it would undo what came since, a
//! revocation included. A different epoch is a rebuilt store, whose versions start again.

use std::fmt;

use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};

/// How an offered snapshot relates to the one in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Nothing is in force yet.
    First,
    /// Same epoch, a later version.
    Newer,
    /// Same epoch and version.
    Same,
    /// Another epoch: a rebuilt store (accepted, and said so).
    NewEpoch,
    /// Same epoch, an earlier version: refused.
    Older,
    /// No epoch, while one is in force: a control plane too old to name its store, whose
    /// versions cannot be compared. Refused (a lagging replica of an older release must not
    /// roll a revocation back during an upgrade).
    NoEpoch,
}

/// `in_force` and the offer as (epoch, version).
pub fn freshness(in_force: Option<(&str, u64)>, offered: (&str, u64)) -> Freshness {
    match in_force {
        None => Freshness::First,
        Some((epoch, _)) if offered.0.is_empty() && !epoch.is_empty() => Freshness::NoEpoch,
        Some((epoch, _)) if epoch != offered.0 => Freshness::NewEpoch,
        Some((_, version)) if offered.1 > version => Freshness::Newer,
        Some((_, version)) if offered.1 == version => Freshness::Same,
        Some(_) => Freshness::Older,
    }
}

/// The first bytes of a sealed snapshot file.
pub const MAGIC: &[u8] = b"sigil-snapshot v1\n";
const HEADER: usize = MAGIC.len() + 8 + SHA256_OUTPUT_LEN;

/// Why a persisted snapshot file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealError {
    Empty,
    /// Not a sealed snapshot (another format, or overwritten from its first byte).
    NotSealed,
    /// Cut inside its header.
    ShortHeader {
        got: u64,
    },
    /// Shorter than its header says: a write cut short.
    Truncated {
        expected: u64,
        got: u64,
    },
    /// Longer than its header says.
    TrailingBytes {
        expected: u64,
        got: u64,
    },
    /// The content does not match its SHA-256: changed after it was written.
    DigestMismatch,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "the file is empty"),
            Self::NotSealed => write!(
                f,
                "not a sealed snapshot (no {:?} header)",
                String::from_utf8_lossy(&MAGIC[..MAGIC.len() - 1])
            ),
            Self::ShortHeader { got } => write!(
                f,
                "truncated: {got} bytes, shorter than the {HEADER}-byte header"
            ),
            Self::Truncated { expected, got } => write!(
                f,
                "truncated: {got} bytes of content where the header says {expected}"
            ),
            Self::TrailingBytes { expected, got } => {
                write!(f, "{got} bytes of content where the header says {expected}")
            }
            Self::DigestMismatch => write!(
                f,
                "the content does not match its SHA-256 digest (changed after it was written)"
            ),
        }
    }
}

impl std::error::Error for SealError {}

/// `payload` with its header: magic, length (u64, big-endian), SHA-256.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(digest(&SHA256, payload).as_ref());
    out.extend_from_slice(payload);
    out
}

/// The payload of a sealed file, if the file is whole and unchanged.
pub fn unseal(file: &[u8]) -> Result<&[u8], SealError> {
    if file.is_empty() {
        return Err(SealError::Empty);
    }
    let Some(rest) = file.strip_prefix(MAGIC) else {
        return Err(SealError::NotSealed);
    };
    if file.len() < HEADER {
        return Err(SealError::ShortHeader {
            got: file.len() as u64,
        });
    }
    let (len, rest) = rest.split_at(8);
    let (sum, payload) = rest.split_at(SHA256_OUTPUT_LEN);
    let expected = u64::from_be_bytes(len.try_into().expect("8 bytes"));
    let got = payload.len() as u64;
    if got < expected {
        return Err(SealError::Truncated { expected, got });
    }
    if got > expected {
        return Err(SealError::TrailingBytes { expected, got });
    }
    if digest(&SHA256, payload).as_ref() != sum {
        return Err(SealError::DigestMismatch);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_older_version_of_the_same_epoch_is_refused() {
        use Freshness::*;
        assert_eq!(freshness(None, ("e", 0)), First);
        assert_eq!(freshness(None, ("e", 5)), First);
        assert_eq!(freshness(Some(("e", 5)), ("e", 6)), Newer);
        assert_eq!(freshness(Some(("e", 5)), ("e", 5)), Same);
        assert_eq!(freshness(Some(("e", 5)), ("e", 4)), Older);
        assert_eq!(freshness(Some(("e", 5)), ("f", 1)), NewEpoch);
        assert_eq!(freshness(Some(("", 5)), ("e", 1)), NewEpoch);
        // Neither names its store: versions are all there is to compare.
        assert_eq!(freshness(Some(("", 5)), ("", 4)), Older);
        assert_eq!(freshness(Some(("", 5)), ("", 6)), Newer);
        // An epoch in force and an offer without one: refused whatever its version.
        assert_eq!(freshness(Some(("e", 5)), ("", 9)), NoEpoch);
        assert_eq!(freshness(Some(("e", 5)), ("", 1)), NoEpoch);
    }

    #[test]
    fn a_sealed_file_opens_only_whole_and_unchanged() {
        let payload = b"a snapshot's protobuf bytes".as_slice();
        let file = seal(payload);
        assert_eq!(unseal(&file), Ok(payload));
        assert_eq!(unseal(&seal(b"")), Ok(b"".as_slice()));
        assert_eq!(unseal(b""), Err(SealError::Empty));
        assert_eq!(unseal(b"\x08\x05"), Err(SealError::NotSealed));
        // Cut anywhere: never accepted.
        for cut in 1..file.len() {
            let err = unseal(&file[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    SealError::ShortHeader { .. }
                        | SealError::Truncated { .. }
                        | SealError::NotSealed
                ),
                "cut at {cut}: {err:?}"
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            unseal(&longer),
            Err(SealError::TrailingBytes { .. })
        ));
        // Any one byte flipped in the length, digest or content: never accepted.
        for at in MAGIC.len()..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            assert!(unseal(&bad).is_err(), "flip at {at} accepted");
        }
        let e = unseal(&file[..file.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
