//! The SPIFFE Workload API's X.509 part (github.com/spiffe/spiffe, `standards/SPIFFE_Workload_API.md`
//! and its `workload.proto`), served by the sidecar on a Unix socket and read by a sidecar
//! that takes its SVID from another server (a SPIRE agent, say):
//!
//! ```proto
//! service SpiffeWorkloadAPI {
//!   rpc FetchX509SVID(X509SVIDRequest) returns (stream X509SVIDResponse);
//!   rpc FetchX509Bundles(X509BundlesRequest) returns (stream X509BundlesResponse);
//!   // FetchJWTSVID, FetchJWTBundles, ValidateJWTSVID: not served (Unimplemented)
//! }
//! ```
//!
//! Every request carries the metadata `workload.spiffe.io: true`; a server refuses one without
//! it (InvalidArgument), so that a browser or a proxied request cannot reach the API.

use std::collections::HashMap;

use tonic_prost::ProstCodec;

/// The header every Workload API request must carry, with the value `true`.
pub const HEADER: &str = "workload.spiffe.io";
pub const FETCH_X509_SVID_PATH: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
pub const FETCH_X509_BUNDLES_PATH: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";

/// `message X509SVIDRequest {}`
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct X509SvidRequest {}

/// ```proto
/// message X509SVIDResponse {
///   repeated X509SVID svids = 1;
///   repeated bytes crl = 2;
///   map<string, bytes> federated_bundles = 3; // trust domain ID -> DER certificates
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: HashMap<String, Vec<u8>>,
}

/// ```proto
/// message X509SVID {
///   string spiffe_id = 1;
///   bytes x509_svid = 2;     // the chain, DER certificates one after another, leaf first
///   bytes x509_svid_key = 3; // the private key, PKCS#8 DER
///   bytes bundle = 4;        // the SVID's trust domain's CA certificates, DER concatenated
///   string hint = 5;
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// `message X509BundlesRequest {}`
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct X509BundlesRequest {}

/// ```proto
/// message X509BundlesResponse {
///   repeated bytes crl = 1;
///   map<string, bytes> bundles = 2; // trust domain ID -> DER certificates
/// }
/// ```
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct X509BundlesResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub crl: Vec<Vec<u8>>,
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: HashMap<String, Vec<u8>>,
}

/// The server's codec for `FetchX509SVID`.
pub fn svid_server_codec() -> ProstCodec<X509SvidResponse, X509SvidRequest> {
    ProstCodec::default()
}

/// The server's codec for `FetchX509Bundles`.
pub fn bundles_server_codec() -> ProstCodec<X509BundlesResponse, X509BundlesRequest> {
    ProstCodec::default()
}

/// The client's codec for `FetchX509SVID`.
pub fn svid_client_codec() -> ProstCodec<X509SvidRequest, X509SvidResponse> {
    ProstCodec::default()
}

/// The client's codec for `FetchX509Bundles`.
pub fn bundles_client_codec() -> ProstCodec<X509BundlesRequest, X509BundlesResponse> {
    ProstCodec::default()
}
