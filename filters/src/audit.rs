//! The tamper evidence of a sidecar's audit records (issue 16): each record is linked to the
//! one before it by a SHA-256 hash chain, and the sidecar signs checkpoints (its sequence
//! number and chain head) with its SVID key. `verify` walks a stored range and names every
//! break: an edited, deleted, inserted or reordered record, a tail cut off behind a
//! checkpoint, a checkpoint that does not match, or one not signed by the sidecar.
//!
//! The chain works on each record's encoded bytes, whatever their schema: a link is
//! `SHA-256("sigil-audit-chain-v1\0" || seq || prev || len || record)` (integers big-endian, 8
//! bytes), and the first record of a sidecar links to 32 zero bytes. A checkpoint signs
//! `"sigil-audit-checkpoint-v1\0" || len || SPIFFE ID || seq || head` with ECDSA P-256 (the
//! SVID key's scheme).
//!
//! What a chain cannot show on its own: an edit of the records after the last checkpoint, and
//! a tail cut off together with the checkpoints that vouch for it. Checkpoints every few
//! seconds bound the first; the second needs the latest checkpoint from somewhere the records'
//! store does not reach (the control plane keeps it apart).

use std::fmt;

use ring::digest;
use rustls::pki_types::CertificateDer;
use rustls::SignatureScheme;
use sigil_config::SpiffeId;

use crate::LocalIdentity;

pub type Hash = [u8; 32];

/// What the first record of a sidecar links to.
pub const GENESIS: Hash = [0; 32];

const CHAIN_DOMAIN: &[u8] = b"sigil-audit-chain-v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"sigil-audit-checkpoint-v1\0";

/// The link of record `seq` (its encoded bytes) that follows the record whose link is `prev`.
pub fn link(seq: u64, prev: &Hash, record: &[u8]) -> Hash {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CHAIN_DOMAIN);
    ctx.update(&seq.to_be_bytes());
    ctx.update(prev);
    ctx.update(&(record.len() as u64).to_be_bytes());
    ctx.update(record);
    let mut out = GENESIS;
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A new chain's ID: 128 random bits, 32 hex digits (a spool's, a control-plane run's).
pub fn new_chain_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(id: &SpiffeId, seq: u64, head: &Hash) -> Vec<u8> {
    let id = id.as_str().as_bytes();
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + id.len() + 8 + 32);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&(id.len() as u64).to_be_bytes());
    m.extend_from_slice(id);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m
}

/// Signs a checkpoint with the SVID's key (which never leaves its signer). None: the key
/// offers no ECDSA P-256 SHA-256 (an SVID of another key type) or signing failed.
pub fn sign_checkpoint(identity: &LocalIdentity, seq: u64, head: &Hash) -> Option<Vec<u8>> {
    let certified = identity.certified_key();
    let signer = certified
        .key
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])?;
    signer
        .sign(&checkpoint_message(identity.id(), seq, head))
        .ok()
}

/// One stored record of a sidecar's chain.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub seq: u64,
    /// The link of the record before it, as stored with this one.
    pub prev: Hash,
    pub record: &'a [u8],
}

/// A signed statement by a sidecar: after record `seq`, its chain's head was `head`.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint<'a> {
    pub seq: u64,
    pub head: Hash,
    pub signature: &'a [u8],
    /// The SVID it was signed with (the leaf).
    pub signer: &'a CertificateDer<'a>,
}

/// A break in a chain, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// The record found is not the next one expected: a record deleted, inserted, repeated or
    /// moved.
    OutOfSequence { expected: u64, found: u64 },
    /// Record `seq` does not link to the record stored before it: that one was edited (or
    /// this link), or records between them are gone.
    Unlinked { seq: u64 },
    /// The chain's head after `seq` is not what the signed checkpoint says: a record up to
    /// `seq` was edited.
    HeadMismatch { seq: u64 },
    /// A checkpoint not signed by the sidecar's SVID key.
    BadSignature { seq: u64, why: String },
    /// A checkpoint vouches for records up to `checkpoint`, but the range ends at `last`: the
    /// tail was cut off.
    Truncated { last: u64, checkpoint: u64 },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfSequence { expected, found } => write!(
                f,
                "record {found} where {expected} was due: records deleted, inserted or moved"
            ),
            Self::Unlinked { seq } => write!(
                f,
                "record {seq} does not link to the record before it: that record was edited, or records are missing"
            ),
            Self::HeadMismatch { seq } => write!(
                f,
                "the chain up to record {seq} differs from the signed checkpoint: a record was edited"
            ),
            Self::BadSignature { seq, why } => {
                write!(f, "the checkpoint at record {seq} is not the sidecar's: {why}")
            }
            Self::Truncated { last, checkpoint } => write!(
                f,
                "the records end at {last}, but a checkpoint vouches for records up to {checkpoint}: the tail was cut off"
            ),
        }
    }
}

/// Walks `entries` (a sidecar's records, as stored, in stored order) from the record after
/// `start` (the sequence number and link of the record before the range; None: from the
/// first record), and checks `checkpoints` against them: each must be signed by an SVID of
/// `id` and match the chain's head at its sequence number. Returns every break found; an empty
/// list means the range is whole. (Whether the signer's SVID chains to the trust bundle is the
/// caller's check, with the bundles it trusts.)
///
/// `lost`: the ranges of sequence numbers the sidecar's own `Dropped` records say it lost (a
/// full fail-open spool). A gap inside one of them is accounted for, not damage: the record
/// after it cannot be linked to the record before it, and the `Dropped` record vouches for
/// the gap instead. The caller passes only ranges of `Dropped` records that come after the
/// range they name and that a checkpoint covers (so that the chain walk proves they are the
/// sidecar's, unedited); any other would let a deletion pass as a loss.
pub fn verify(
    id: &SpiffeId,
    entries: &[Entry<'_>],
    checkpoints: &[Checkpoint<'_>],
    start: Option<(u64, Hash)>,
    lost: &[std::ops::RangeInclusive<u64>],
) -> Vec<Damage> {
    let mut damage = Vec::new();
    let (first, mut head) = start.map_or((1, GENESIS), |(seq, head)| (seq.saturating_add(1), head));
    let mut expected = first;
    let mut heads = std::collections::BTreeMap::new();
    for e in entries {
        let accounted = e.seq > expected
            && lost
                .iter()
                .any(|r| r.contains(&expected) && r.contains(&(e.seq - 1)));
        if e.seq != expected && !accounted {
            damage.push(Damage::OutOfSequence {
                expected,
                found: e.seq,
            });
        }
        if e.prev != head && !accounted {
            damage.push(Damage::Unlinked { seq: e.seq });
        }
        head = link(e.seq, &e.prev, e.record);
        heads.insert(e.seq, head);
        expected = e.seq.saturating_add(1);
    }
    let last = entries.last().map_or(first.saturating_sub(1), |e| e.seq);
    for c in checkpoints {
        if let Err(why) = check_signature(id, c) {
            damage.push(Damage::BadSignature { seq: c.seq, why });
            continue;
        }
        match heads.get(&c.seq) {
            Some(h) if *h != c.head => damage.push(Damage::HeadMismatch { seq: c.seq }),
            Some(_) => {}
            None if c.seq > last => damage.push(Damage::Truncated {
                last,
                checkpoint: c.seq,
            }),
            // Before the range, or a record missing inside it (already named).
            None => {}
        }
    }
    damage
}

/// The checkpoint is signed by the key of an SVID of `id`.
fn check_signature(id: &SpiffeId, c: &Checkpoint<'_>) -> Result<(), String> {
    let signer =
        crate::svid::leaf_spiffe_id(c.signer, None).map_err(|e| format!("its certificate: {e}"))?;
    if signer != *id {
        return Err(format!("signed by {signer}, not {id}"));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(c.signer)
        .map_err(|e| format!("its certificate: {e}"))?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    key.verify(&checkpoint_message(id, c.seq, &c.head), c.signature)
        .map_err(|_| "the signature does not verify with its SVID's key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use sigil_testkit::Ca;

    const SIDECAR: &str = "spiffe://example.org/ns/demo/sa/web";

    fn identity(ca: &Ca, id: &str) -> LocalIdentity {
        let svid = ca.svid(id);
        LocalIdentity::from_pem(
            svid.chain_pem().as_bytes(),
            svid.key_pem().as_bytes(),
            UnixTime::now(),
            None,
            &crate::tls::provider(),
        )
        .unwrap()
    }

    /// A stored record: (seq, prev, bytes).
    type Stored = (u64, Hash, Vec<u8>);

    /// `n` records as a sidecar writes them, and the heads.
    fn chain(n: u64) -> (Vec<Stored>, Vec<Hash>) {
        let mut head = GENESIS;
        let mut records = Vec::new();
        let mut heads = Vec::new();
        for seq in 1..=n {
            let bytes = format!("connection {seq} from 10.0.0.{seq}:4000").into_bytes();
            records.push((seq, head, bytes));
            head = link(seq, &head, &records.last().unwrap().2);
            heads.push(head);
        }
        (records, heads)
    }

    fn entries(records: &[Stored]) -> Vec<Entry<'_>> {
        records
            .iter()
            .map(|(seq, prev, record)| Entry {
                seq: *seq,
                prev: *prev,
                record,
            })
            .collect()
    }

    struct Signed {
        seq: u64,
        head: Hash,
        signature: Vec<u8>,
        signer: CertificateDer<'static>,
    }

    fn checkpoint(identity: &LocalIdentity, seq: u64, head: Hash) -> Signed {
        Signed {
            seq,
            head,
            signature: sign_checkpoint(identity, seq, &head).expect("a P-256 SVID signs"),
            signer: identity.chain()[0].clone(),
        }
    }

    fn view(c: &[Signed]) -> Vec<Checkpoint<'_>> {
        c.iter()
            .map(|c| Checkpoint {
                seq: c.seq,
                head: c.head,
                signature: &c.signature,
                signer: &c.signer,
            })
            .collect()
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let ca = Ca::new("example.org");
        let me = identity(&ca, SIDECAR);
        let id = SpiffeId::parse(SIDECAR).unwrap();
        let (records, heads) = chain(10);
        let checkpoints = [checkpoint(&me, 5, heads[4]), checkpoint(&me, 10, heads[9])];
        let check = |records: &[Stored], cps: &[Signed]| {
            verify(&id, &entries(records), &view(cps), None, &[])
        };
        assert_eq!(check(&records, &checkpoints), [], "a whole chain");

        // An edited record: the next one no longer links to it.
        let mut edited = records.clone();
        edited[3].2 = b"connection 4 from 10.9.9.9:4000".to_vec();
        assert_eq!(check(&edited, &checkpoints), [Damage::Unlinked { seq: 5 }]);
        // The last record edited: only the checkpoint shows it.
        let mut last = records.clone();
        last[9].2.push(b'!');
        assert_eq!(
            check(&last, &checkpoints),
            [Damage::HeadMismatch { seq: 10 }]
        );
        // A deleted record.
        let mut deleted = records.clone();
        deleted.remove(6);
        assert_eq!(
            check(&deleted, &checkpoints),
            [
                Damage::OutOfSequence {
                    expected: 7,
                    found: 8
                },
                Damage::Unlinked { seq: 8 },
            ]
        );
        // Deleted and renumbered to hide the gap: the links still show it.
        let renumbered: Vec<_> = deleted
            .iter()
            .enumerate()
            .map(|(i, (_, prev, r))| (i as u64 + 1, *prev, r.clone()))
            .collect();
        assert!(check(&renumbered, &checkpoints).contains(&Damage::Unlinked { seq: 7 }));
        // Two records swapped.
        let mut swapped = records.clone();
        swapped.swap(2, 3);
        assert_eq!(
            check(&swapped, &checkpoints),
            [
                Damage::OutOfSequence {
                    expected: 3,
                    found: 4
                },
                Damage::Unlinked { seq: 4 },
                Damage::OutOfSequence {
                    expected: 5,
                    found: 3
                },
                Damage::Unlinked { seq: 3 },
                Damage::OutOfSequence {
                    expected: 4,
                    found: 5
                },
                Damage::Unlinked { seq: 5 },
            ]
        );
        // The tail cut off behind a checkpoint.
        assert_eq!(
            check(&records[..8], &checkpoints),
            [Damage::Truncated {
                last: 8,
                checkpoint: 10
            }]
        );
        // A checkpoint with a forged head, or signed by another identity's key.
        let mut forged = checkpoint(&me, 10, heads[9]);
        forged.head[0] ^= 1;
        let damage = check(&records, &[forged]);
        assert!(
            matches!(&damage[..], [Damage::BadSignature { seq: 10, why }] if why.contains("does not verify")),
            "{damage:?}"
        );
        let other = identity(&ca, "spiffe://example.org/ns/demo/sa/other");
        let damage = check(&records, &[checkpoint(&other, 10, heads[9])]);
        assert!(
            matches!(&damage[..], [Damage::BadSignature { why, .. }] if why.contains("not spiffe://example.org/ns/demo/sa/web")),
            "{damage:?}"
        );
        // A range that starts after a verified record.
        assert_eq!(
            verify(
                &id,
                &entries(&records[5..]),
                &view(&checkpoints),
                Some((5, heads[4])),
                &[]
            ),
            []
        );
        // Records 4 to 6 lost: damage, unless a `Dropped` record accounts for exactly them.
        let gap: Vec<Stored> = records[..3].iter().chain(&records[6..]).cloned().collect();
        let damage = verify(&id, &entries(&gap), &view(&checkpoints), None, &[]);
        assert_eq!(
            damage,
            [
                Damage::OutOfSequence {
                    expected: 4,
                    found: 7
                },
                Damage::Unlinked { seq: 7 }
            ]
        );
        assert_eq!(
            verify(&id, &entries(&gap), &view(&checkpoints), None, &[4..=6]),
            []
        );
        assert_eq!(
            verify(&id, &entries(&gap), &view(&checkpoints), None, &[5..=6]).len(),
            2,
            "a range that does not cover the whole gap accounts for none of it"
        );
    }

    #[test]
    fn a_link_covers_the_sequence_number_the_previous_link_and_every_byte() {
        let base = link(7, &GENESIS, b"record");
        assert_ne!(base, link(8, &GENESIS, b"record"));
        assert_ne!(base, link(7, &[1; 32], b"record"));
        assert_ne!(base, link(7, &GENESIS, b"recorD"));
        assert_eq!(base, link(7, &GENESIS, b"record"));
    }
}
