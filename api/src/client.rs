//! The sidecar's end of `Subscribe` over an HTTP/2 connection the caller has set up (mutual
//! TLS and all): what a generated tonic client would be, on hyper's sender.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::client::conn::http2::SendRequest;
use hyper::http;
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::{Ack, IssueRequest, IssueResponse, Snapshot, ISSUE_PATH, SUBSCRIBE_PATH};

/// Opens the stream on `sender` (whose connection reaches `origin`, e.g. `https://10.0.0.5:15012`)
/// and sends `hello` first. Returns where to send acknowledgements and the snapshots.
pub async fn subscribe(
    sender: SendRequest<tonic::body::Body>,
    origin: http::Uri,
    hello: Ack,
) -> Result<(mpsc::Sender<Ack>, Streaming<Snapshot>), tonic::Status> {
    let mut grpc = tonic::client::Grpc::with_origin(H2(sender), origin);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello)
        .await
        .map_err(|_| tonic::Status::cancelled("stream closed"))?;
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH),
            crate::client_codec(),
        )
        .await?;
    Ok((tx, response.into_inner()))
}

/// Asks for an SVID (`sigil.v1.Identity/Issue`) on `sender`, whose connection reaches
/// `origin`. A refusal is the control plane's status, its message naming the reason.
pub async fn issue(
    sender: SendRequest<tonic::body::Body>,
    origin: http::Uri,
    request: IssueRequest,
) -> Result<IssueResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::with_origin(H2(sender), origin);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = grpc
        .unary(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static(ISSUE_PATH),
            crate::issue_client_codec(),
        )
        .await?;
    Ok(response.into_inner())
}

/// Opens `FetchX509SVID` of a SPIFFE Workload API on `sender` (an HTTP/2 connection over its
/// Unix socket), with the `workload.spiffe.io: true` header the standard requires.
pub async fn fetch_x509_svid(
    sender: SendRequest<tonic::body::Body>,
) -> Result<Streaming<crate::workload::X509SvidResponse>, tonic::Status> {
    let origin = http::Uri::from_static("http://localhost");
    let mut grpc = tonic::client::Grpc::with_origin(H2(sender), origin);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(crate::workload::X509SvidRequest {});
    request.metadata_mut().insert(
        crate::workload::HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let response = grpc
        .server_streaming(
            request,
            http::uri::PathAndQuery::from_static(crate::workload::FETCH_X509_SVID_PATH),
            crate::workload::svid_client_codec(),
        )
        .await?;
    Ok(response.into_inner())
}

/// Opens `sigil.audit.v1.Audit/Ship` on `sender` (whose connection reaches `origin`): where to
/// send batches, and the acknowledgements.
pub async fn ship(
    sender: SendRequest<tonic::body::Body>,
    origin: http::Uri,
) -> Result<
    (
        mpsc::Sender<crate::audit::Batch>,
        Streaming<crate::audit::Ack>,
    ),
    tonic::Status,
> {
    let mut grpc = tonic::client::Grpc::with_origin(H2(sender), origin);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::channel(4);
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static(crate::audit::SHIP_PATH),
            crate::audit::client_codec(),
        )
        .await?;
    Ok((tx, response.into_inner()))
}

/// hyper's HTTP/2 sender as the tower service tonic's client drives.
#[derive(Clone)]
struct H2(SendRequest<tonic::body::Body>);

impl tower_service::Service<http::Request<tonic::body::Body>> for H2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}
