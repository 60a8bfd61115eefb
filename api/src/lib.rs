//! The gRPC API between `sigil-control` and the sidecars (port 15012, TLS 1.3, HTTP/2 with
//! ALPN `sigil/h2`):
//!
//! ```proto
//! package sigil.v1;
//! service Mesh {
//!   // The sidecar opens it and keeps it open. The control plane sends a snapshot at once and
//!   // again whenever what concerns the sidecar's identity changes; the sidecar answers each
//!   // with an acknowledgement (accepted, or rejected with the reason). Mutual TLS: the
//!   // caller presents its SVID.
//!   rpc Subscribe(stream Ack) returns (stream Snapshot);
//! }
//! service Identity {
//!   // An X.509-SVID for the key of a CSR the caller made. Authenticated by the SVID the
//!   // caller presents (a renewal), or, on first contact, without one, by a one-time join
//!   // token bound to one Workload. Refusals are gRPC errors whose message names the reason.
//!   rpc Issue(IssueRequest) returns (IssueResponse);
//! }
//! ```
//!
//! The messages are written by hand with prost's derive (no protoc at build time); the
//! `.proto` text in each doc comment is the wire contract for other implementations.
//! Policies and revocations travel as the YAML documents operators applied: the sidecar
//! parses them with the same loader as its policy files, so a document it rejects is named
//! with its line, and the control plane never needs a second encoding of the policy model.

use tonic_prost::ProstCodec;

pub mod audit;
pub mod client;
pub mod workload;

/// The gRPC path of `sigil.v1.Mesh/Subscribe`.
pub const SUBSCRIBE_PATH: &str = "/sigil.v1.Mesh/Subscribe";

/// ```proto
/// message Ack {
///   string node = 1;
///   uint64 version = 2;
///   bool accepted = 3;
///   string error = 4;
///   string epoch = 5;
/// }
/// ```
///
/// The first one on a stream says hello: `epoch` and `version` are those of the snapshot the
/// sidecar runs (empty and 0 if none), `accepted` true. A control plane whose catalog of that
/// epoch is older reloads from its store before it answers, and never sends an older
/// snapshot. Every later one answers the snapshot of that `version`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// The sidecar's name (its ProxyConfig `metadata.name`), for `sigil status`.
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(bool, tag = "3")]
    pub accepted: bool,
    /// Why the snapshot was rejected (file:line style); when accepted, empty or a note on what
    /// went wrong around it (e.g. it could not be persisted).
    #[prost(string, tag = "4")]
    pub error: String,
    #[prost(string, tag = "5")]
    pub epoch: String,
}

/// ```proto
/// message Snapshot {
///   uint64 version = 1;
///   repeated Document policies = 2;      // Policy resources that target the sidecar's ID
///   repeated Document revocations = 3;   // every Revocation in force
///   repeated RegistryEntry registry = 4; // destinations the sidecar may call
///   repeated Bundle bundles = 5;         // TrustBundle resources
///   string epoch = 6;                    // the store the versions count in
///   repeated Child children = 7;         // workloads this sidecar's Workload API serves
/// }
/// ```
/// Always the whole state for one identity, never a delta: a sidecar that applies it has
/// exactly what the control plane holds at `version`.
///
/// Versions grow with every change of one store; `epoch` names that store (a random ID made
/// with it; for etcd, also its cluster ID), so that versions are compared only within one
/// epoch. A sidecar refuses a snapshot older than the one it runs in the same epoch (a
/// replica behind its store must not roll a revocation back) and accepts any version of a
/// new epoch (a rebuilt store counts from 1 again).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(message, repeated, tag = "2")]
    pub policies: Vec<Document>,
    #[prost(message, repeated, tag = "3")]
    pub revocations: Vec<Document>,
    #[prost(message, repeated, tag = "4")]
    pub registry: Vec<RegistryEntry>,
    #[prost(message, repeated, tag = "5")]
    pub bundles: Vec<Bundle>,
    #[prost(string, tag = "6")]
    pub epoch: String,
    #[prost(message, repeated, tag = "7")]
    pub children: Vec<Child>,
}

/// ```proto
/// message Child {
///   string workload = 1;    // the Workload's metadata.name
///   string spiffe_id = 2;
///   optional uint32 uid = 3; // selectors: the caller's Unix user and group IDs and the
///   optional uint32 gid = 4; // binary it runs; every one given must match
///   string path = 5;         // empty: not a selector
/// }
/// ```
/// A Workload whose `workloadApi.sidecar` is the sidecar's identity: the sidecar's Workload
/// API hands its SVID to a local caller its selectors match.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Child {
    #[prost(string, tag = "1")]
    pub workload: String,
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    #[prost(uint32, optional, tag = "3")]
    pub uid: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pub gid: Option<u32>,
    #[prost(string, tag = "5")]
    pub path: String,
}

/// `message Document { string name = 1; string yaml = 2; }`: one resource as applied.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Document {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub yaml: String,
}

/// `message RegistryEntry { string address = 1; string spiffe_id = 2; string workload = 3; }`
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RegistryEntry {
    /// `ip:port`, or a bare `ip` for every port.
    #[prost(string, tag = "1")]
    pub address: String,
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    /// The Workload resource it comes from.
    #[prost(string, tag = "3")]
    pub workload: String,
}

/// `message Bundle { string trust_domain = 1; string pem = 2; }`
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Bundle {
    #[prost(string, tag = "1")]
    pub trust_domain: String,
    #[prost(string, tag = "2")]
    pub pem: String,
}

/// The gRPC path of `sigil.v1.Identity/Issue`.
pub const ISSUE_PATH: &str = "/sigil.v1.Identity/Issue";

/// ```proto
/// message IssueRequest {
///   bytes csr = 1;          // PKCS#10, DER; an ECDSA P-256 key
///   string join_token = 2;  // first contact only; empty when renewing
///   string node = 3;        // the sidecar's name, for logs and `sigil status`
///   string for_workload = 4; // a Workload (metadata.name) the caller's Workload API serves,
///                            // whose workloadApi.sidecar is the caller; empty: the caller
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct IssueRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub csr: Vec<u8>,
    #[prost(string, tag = "2")]
    pub join_token: String,
    #[prost(string, tag = "3")]
    pub node: String,
    #[prost(string, tag = "4")]
    pub for_workload: String,
}

/// ```proto
/// message IssueResponse {
///   repeated bytes chain = 1;    // DER, leaf first
///   repeated Bundle bundles = 2; // the trust bundle of the SVID's own domain
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct IssueResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub chain: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    pub bundles: Vec<Bundle>,
}

/// The control plane's codec for `Issue`.
pub fn issue_server_codec() -> ProstCodec<IssueResponse, IssueRequest> {
    ProstCodec::default()
}

/// The sidecar's codec for `Issue`.
pub fn issue_client_codec() -> ProstCodec<IssueRequest, IssueResponse> {
    ProstCodec::default()
}

/// The control plane's codec: sends snapshots, reads acknowledgements.
pub fn server_codec() -> ProstCodec<Snapshot, Ack> {
    ProstCodec::default()
}

/// The sidecar's codec: sends acknowledgements, reads snapshots.
pub fn client_codec() -> ProstCodec<Ack, Snapshot> {
    ProstCodec::default()
}

pub use prost::{DecodeError, Message};
pub use tonic;

#[cfg(test)]
mod tests {
    use super::*;

    /// The field numbers are the wire contract: a snapshot encodes to the bytes the
    /// documented `.proto` gives, field by field.
    #[test]
    fn wire_format_matches_the_documented_field_numbers() {
        let s = Snapshot {
            version: 7,
            policies: vec![Document {
                name: "p".into(),
                yaml: "y".into(),
            }],
            revocations: vec![],
            registry: vec![RegistryEntry {
                address: "a".into(),
                spiffe_id: "s".into(),
                workload: "w".into(),
            }],
            bundles: vec![Bundle {
                trust_domain: "t".into(),
                pem: "x".into(),
            }],
            epoch: "e".into(),
            children: vec![],
        };
        let bytes = s.encode_to_vec();
        // 1:varint 7; 2:len [1:"p", 2:"y"]; 4:len [1:"a", 2:"s", 3:"w"]; 5:len [1:"t", 2:"x"];
        // 6:"e"
        let want: &[u8] = &[
            0x08, 7, 0x12, 6, 0x0a, 1, b'p', 0x12, 1, b'y', 0x22, 9, 0x0a, 1, b'a', 0x12, 1, b's',
            0x1a, 1, b'w', 0x2a, 6, 0x0a, 1, b't', 0x12, 1, b'x', 0x32, 1, b'e',
        ];
        assert_eq!(bytes, want);
        assert_eq!(Snapshot::decode(&bytes[..]).unwrap(), s);
        let ack = Ack {
            node: "n".into(),
            version: 3,
            accepted: true,
            error: "e".into(),
            epoch: "f".into(),
        };
        assert_eq!(
            ack.encode_to_vec(),
            [0x0a, 1, b'n', 0x10, 3, 0x18, 1, 0x22, 1, b'e', 0x2a, 1, b'f']
        );
    }
}
