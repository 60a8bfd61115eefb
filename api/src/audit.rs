//! The audit stream's wire schema, version 1 (issue 16): what a sidecar records per connection
//! and refusal, how records travel to the control plane, and how it acknowledges them.
//!
//! ```proto
//! package sigil.audit.v1;
//! service Audit {
//!   // The sidecar opens it with its SVID and keeps it open; it sends batches in sequence
//!   // order, the control plane acknowledges each once it is durable. A batch sent twice
//!   // (after a reconnection) is stored once: records are keyed by (sidecar, seq).
//!   rpc Ship(stream Batch) returns (stream Ack);
//! }
//! ```
//!
//! Fields are only ever added, under new numbers; `schema` says which version wrote a record.
//! Exported as JSON lines, a record keeps these field names.

/// `/sigil.audit.v1.Audit/Ship`.
pub const SHIP_PATH: &str = "/sigil.audit.v1.Audit/Ship";

/// The schema version this crate writes.
pub const SCHEMA: u32 = 1;

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Kind {
    Unspecified = 0,
    /// A connection admitted (after the handshake and the connection-level decision).
    ConnectionOpen = 1,
    /// A connection ended: bytes, duration, close reason, allowed requests by route.
    ConnectionClose = 2,
    /// A connection refused (handshake, identity, policy, limits).
    ConnectionRefused = 3,
    /// An HTTP request denied.
    RequestDenied = 4,
    /// An HTTP request allowed (only with the per-request mode on).
    RequestAllowed = 5,
    /// Records the sidecar had to drop (a full spool in fail-open mode): how many.
    Dropped = 6,
    /// A dry-run rule that would have denied a connection or HTTP request which was allowed
    /// (`mode` dry-run, `decision` deny, the dry-run rule's `policy` and `rule`).
    WouldDeny = 7,
    /// Control plane: an SVID issued, renewed or refused.
    Issuance = 10,
    /// Control plane: a resource applied or deleted (policies, bundles, revocations).
    Change = 11,
    /// Control plane: a break found in a sidecar's chain on ingest.
    ChainBreak = 12,
}

impl Kind {
    /// The name in exports and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::ConnectionOpen => "connection_open",
            Self::ConnectionClose => "connection_close",
            Self::ConnectionRefused => "connection_refused",
            Self::RequestDenied => "request_denied",
            Self::RequestAllowed => "request_allowed",
            Self::Dropped => "dropped",
            Self::WouldDeny => "would_deny",
            Self::Issuance => "issuance",
            Self::Change => "change",
            Self::ChainBreak => "chain_break",
        }
    }

    /// The kind named `label`.
    pub fn from_label(label: &str) -> Option<Self> {
        (0..=12)
            .filter_map(|n| Self::try_from(n).ok())
            .find(|k| k.label() == label)
    }
}

/// ```proto
/// message Record {
///   uint32 schema = 1;             // 1
///   uint64 seq = 2;                // per sidecar, from 1, no gaps
///   bytes prev = 3;                // the chain link of record seq-1 (32 zero bytes for 1)
///   int64 time_unix_nanos = 4;
///   Kind kind = 5;
///   string direction = 6;          // inbound | outbound
///   string local_addr = 7;
///   string peer_addr = 8;
///   string local_id = 9;           // SPIFFE IDs
///   string peer_id = 10;
///   string peer_serial = 11;       // hex
///   string tls_version = 12;       // TLSv1_3
///   string cipher = 13;
///   string protocol = 14;          // tcp | http1 | http2 | http (either, per request) | tunnel
///   string decision = 15;          // allow | deny
///   string policy = 16;            // the Policy that decided, and its rule
///   string rule = 17;
///   string mode = 18;              // enforce | dry-run
///   uint64 policy_version = 19;    // the snapshot version of the policies in force
///   uint64 bundle_version = 20;    // and of the trust bundles
///   uint64 bytes_in = 21;          // ConnectionClose: from the peer (decrypted)
///   uint64 bytes_out = 22;         // and to it
///   uint64 duration_ms = 23;
///   string close_reason = 24;      // normal | io_error | idle_timeout | policy_change | revoked | shutdown | ...
///   string route = 25;             // HTTP: the route that decided (Policy/route, default_deny)
///   string method = 26;
///   repeated RouteCount allowed = 27; // ConnectionClose: allowed requests by route
///   uint64 dropped = 28;           // Dropped: how many records (seq dropped_from on)
///   string actor = 29;             // control plane: the operator's or caller's SPIFFE ID
///   string subject = 30;           // control plane: what it was about (Policy/web, an identity)
///   string detail = 31;            // a reason or message, one line
///   uint32 port = 32;              // the workload port (inbound) or destination port (outbound)
///   uint64 conn = 33;              // the connection's number in the sidecar: joins open and close
///   uint64 dropped_from = 34;      // Dropped: the first sequence number lost
///   repeated RouteCount denied = 35; // ConnectionClose: denied requests past those recorded one by one
///   repeated RouteCount would_deny = 36; // ConnectionClose: the same for dry-run denials
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Record {
    #[prost(uint32, tag = "1")]
    pub schema: u32,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub prev: Vec<u8>,
    #[prost(int64, tag = "4")]
    pub time_unix_nanos: i64,
    #[prost(enumeration = "Kind", tag = "5")]
    pub kind: i32,
    #[prost(string, tag = "6")]
    pub direction: String,
    #[prost(string, tag = "7")]
    pub local_addr: String,
    #[prost(string, tag = "8")]
    pub peer_addr: String,
    #[prost(string, tag = "9")]
    pub local_id: String,
    #[prost(string, tag = "10")]
    pub peer_id: String,
    #[prost(string, tag = "11")]
    pub peer_serial: String,
    #[prost(string, tag = "12")]
    pub tls_version: String,
    #[prost(string, tag = "13")]
    pub cipher: String,
    #[prost(string, tag = "14")]
    pub protocol: String,
    #[prost(string, tag = "15")]
    pub decision: String,
    #[prost(string, tag = "16")]
    pub policy: String,
    #[prost(string, tag = "17")]
    pub rule: String,
    #[prost(string, tag = "18")]
    pub mode: String,
    #[prost(uint64, tag = "19")]
    pub policy_version: u64,
    #[prost(uint64, tag = "20")]
    pub bundle_version: u64,
    #[prost(uint64, tag = "21")]
    pub bytes_in: u64,
    #[prost(uint64, tag = "22")]
    pub bytes_out: u64,
    #[prost(uint64, tag = "23")]
    pub duration_ms: u64,
    #[prost(string, tag = "24")]
    pub close_reason: String,
    #[prost(string, tag = "25")]
    pub route: String,
    #[prost(string, tag = "26")]
    pub method: String,
    #[prost(message, repeated, tag = "27")]
    pub allowed: Vec<RouteCount>,
    #[prost(uint64, tag = "28")]
    pub dropped: u64,
    #[prost(string, tag = "29")]
    pub actor: String,
    #[prost(string, tag = "30")]
    pub subject: String,
    #[prost(string, tag = "31")]
    pub detail: String,
    #[prost(uint32, tag = "32")]
    pub port: u32,
    #[prost(uint64, tag = "33")]
    pub conn: u64,
    #[prost(uint64, tag = "34")]
    pub dropped_from: u64,
    #[prost(message, repeated, tag = "35")]
    pub denied: Vec<RouteCount>,
    #[prost(message, repeated, tag = "36")]
    pub would_deny: Vec<RouteCount>,
}

/// `message RouteCount { string route = 1; string method = 2; uint64 count = 3; }`
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RouteCount {
    #[prost(string, tag = "1")]
    pub route: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(uint64, tag = "3")]
    pub count: u64,
}

/// ```proto
/// message Checkpoint {
///   uint64 seq = 1;        // the last record it covers
///   bytes head = 2;        // the chain link of that record
///   bytes signature = 3;   // ECDSA P-256 over sigil_filters::audit::checkpoint_message
///   bytes signer = 4;      // the SVID (leaf, DER) whose key signed
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Checkpoint {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub head: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub signer: Vec<u8>,
}

/// ```proto
/// message Batch {
///   repeated bytes records = 1;         // encoded Records, in sequence order, as chained
///   repeated Checkpoint checkpoints = 2;
///   string chain = 3;                   // the spool's ID (32 hex digits, made with it)
/// }
/// ```
/// Records travel encoded, so that the bytes the chain covers are the bytes stored. They are
/// kept under (the sidecar's SPIFFE ID, `chain`, seq): replicas that share one identity, or a
/// spool made anew, have chains of their own.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Batch {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub records: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    pub checkpoints: Vec<Checkpoint>,
    #[prost(string, tag = "3")]
    pub chain: String,
}

/// `message Ack { uint64 durable_through = 1; string error = 2; }`: every record of the batch
/// up to `durable_through` is stored and may leave the sidecar's spool; a record the control
/// plane could not store (a fork, one that does not decode) stops it short, and `error` says
/// why.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Ack {
    #[prost(uint64, tag = "1")]
    pub durable_through: u64,
    #[prost(string, tag = "2")]
    pub error: String,
}

/// The control plane's codec for `Ship`: sends acknowledgements, reads batches.
pub fn server_codec() -> tonic_prost::ProstCodec<Ack, Batch> {
    tonic_prost::ProstCodec::default()
}

/// The sidecar's codec for `Ship`.
pub fn client_codec() -> tonic_prost::ProstCodec<Batch, Ack> {
    tonic_prost::ProstCodec::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_record_travels_as_encoded_and_decodes_to_itself() {
        let r = Record {
            schema: SCHEMA,
            seq: 42,
            prev: vec![7; 32],
            time_unix_nanos: 1_800_000_000_000_000_000,
            kind: Kind::ConnectionClose as i32,
            direction: "inbound".into(),
            peer_id: "spiffe://example.org/ns/demo/sa/a".into(),
            bytes_in: 10,
            bytes_out: 20,
            close_reason: "normal".into(),
            allowed: vec![RouteCount {
                route: "/orders".into(),
                method: "GET".into(),
                count: 3,
            }],
            ..Record::default()
        };
        let bytes = r.encode_to_vec();
        // schema (1), seq (2) and prev (3) lead, as the documented numbers say.
        assert_eq!(&bytes[..4], [0x08, 1, 0x10, 42]);
        assert_eq!(&bytes[4..6], [0x1a, 32]);
        assert_eq!(Record::decode(&bytes[..]).unwrap(), r);
        assert_eq!(Kind::try_from(r.kind), Ok(Kind::ConnectionClose));
    }
}
