//! HTTP plumbing both directions share: serving a connection until it ends, is closed or
//! drains; the sidecar's own answers; WebSocket tunnels; and keeping the identity fields the
//! sidecar's alone (`sigil_filters::headers` says which names a backend could read as them)
//! in the header section, in the `Trailer` field that announces trailers, and in the
//! trailers themselves.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, TRAILER};
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sigil_filters::detect::Speaks;
use sigil_filters::headers::{is_identity_header, trailer_without_identity};
use sigil_filters::normalize::{single_host, TargetError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::conns::{Conns, GRACE};
use crate::reasons::CloseReason;
use crate::relay::{close_request, relay, Counters};

/// How long a client may take to send a request's header section (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Response bodies come from hyper (the workload) or from h2 (a peer sidecar, `pool`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// Serves HTTP/1.1 and HTTP/2 on `stream` until the client is done, the registry closes the
/// connection (`close_rx`), or draining ends it gracefully (`conns`). Returns the reason.
pub async fn serve_until_closed<S, F, Fut>(
    conns: &Conns,
    stream: S,
    speaks: Speaks,
    service: F,
    close_rx: &mut watch::Receiver<Option<CloseReason>>,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + 'static,
{
    const MAX_H1_BUF: usize = 64 * 1024;
    const MAX_H2_HEADERS: u32 = 64 * 1024;
    let service = hyper::service::service_fn(service);
    let io = TokioIo::new(stream);
    match speaks {
        Speaks::Http1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.max_buf_size(MAX_H1_BUF)
                // A client that trickles headers (slowloris) is cut.
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let served = b.serve_connection(io, service).with_upgrades();
            drive(conns, served, |c| c.graceful_shutdown(), close_rx).await
        }
        Speaks::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.max_header_list_size(MAX_H2_HEADERS);
            let served = b.serve_connection(io, service);
            drive(conns, served, |c| c.graceful_shutdown(), close_rx).await
        }
        Speaks::Either => {
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .max_buf_size(MAX_H1_BUF)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            b.http2().max_header_list_size(MAX_H2_HEADERS);
            let served = b.serve_connection_with_upgrades(io, service);
            drive(conns, served, |c| c.graceful_shutdown(), close_rx).await
        }
    }
}

/// Drives a served connection: see `serve_until_closed`.
async fn drive<C, E>(
    conns: &Conns,
    served: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    close_rx: &mut watch::Receiver<Option<CloseReason>>,
) -> CloseReason
where
    C: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(served);
    let mut draining = false;
    // Set once a graceful close (see `CloseReason::is_graceful`) began: in-flight requests
    // have until `grace` to finish.
    let mut closing: Option<CloseReason> = None;
    let grace = tokio::time::sleep(GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            r = served.as_mut() => {
                return closing.unwrap_or(if r.is_ok() { CloseReason::Done } else { CloseReason::IoError });
            }
            reason = close_request(close_rx, closing.is_none()) => {
                if closing.is_some() || !reason.is_graceful() {
                    return reason;
                }
                closing = Some(reason);
                grace.as_mut().reset(tokio::time::Instant::now() + GRACE);
                if !draining {
                    draining = true;
                    graceful_shutdown(served.as_mut());
                }
            }
            _ = grace.as_mut(), if closing.is_some() => return closing.unwrap_or(CloseReason::Done),
            // On SIGTERM, finish in-flight requests and close (Connection: close / GOAWAY)
            // rather than wait to be cut at the drain deadline.
            _ = conns.drained(), if !draining => {
                draining = true;
                graceful_shutdown(served.as_mut());
            }
        }
    }
}

/// The `status_class` label of a response.
pub fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The request's one Host header, if any (`sigil_filters::normalize::single_host`).
pub fn host_header(headers: &HeaderMap) -> Result<Option<&str>, TargetError> {
    single_host(headers.get_all(HOST).iter().map(HeaderValue::as_bytes))
}

/// A response made by the sidecar itself; for gRPC clients, a trailers-only response
/// with the matching status code.
pub fn local_response(status: StatusCode, grpc: bool, reason: &str) -> Response<ResponseBody> {
    let mut b = Response::builder();
    if grpc {
        // gRPC carries errors in trailers-only responses with HTTP 200.
        let code = match status {
            StatusCode::FORBIDDEN => "7",       // PERMISSION_DENIED
            StatusCode::BAD_REQUEST => "3",     // INVALID_ARGUMENT
            StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
            _ => "14",                          // UNAVAILABLE
        };
        b = b
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code)
            .header("grpc-message", reason.replace(['\r', '\n'], " "));
        return b
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .expect("static response parts");
    }
    b.status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(format!("sigil: {reason}\n")))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("static response parts")
}

/// Relays the two halves of an upgraded HTTP/1.1 connection (WebSocket) until either ends,
/// the registry closes it, or nothing moves for `idle` (`timeouts.idle`). (Its bytes are
/// counted on the connection it came from.)
pub async fn tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    close_rx: &mut watch::Receiver<Option<CloseReason>>,
    idle: Duration,
) -> CloseReason {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return CloseReason::IoError;
    };
    let uncounted = Counters::default();
    relay(
        TokioIo::new(down),
        TokioIo::new(up),
        &uncounted,
        close_rx,
        idle,
    )
    .await
}

/// Removes every field a backend could read as an identity field, and their names from
/// `Trailer`. Allocates only when there is something to remove.
pub fn strip_identity(headers: &mut HeaderMap) {
    if headers.keys().any(|k| is_identity_header(k.as_str())) {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| is_identity_header(k.as_str()))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
    }
    if headers.contains_key(TRAILER) {
        strip_announced(headers);
    }
}

/// `Trailer` without the identity names; a value that is not text is dropped whole, since
/// what it announces cannot be checked.
fn strip_announced(headers: &mut HeaderMap) {
    let values: Vec<Option<String>> = headers
        .get_all(TRAILER)
        .iter()
        .map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    let changes = values.iter().any(|v| {
        v.as_deref()
            .is_none_or(|v| trailer_without_identity(v).is_some())
    });
    if !changes {
        return;
    }
    headers.remove(TRAILER);
    for value in values.into_iter().flatten() {
        let kept = trailer_without_identity(&value).unwrap_or(value);
        if kept.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&kept) {
            headers.append(TRAILER, v);
        }
    }
}

/// A request body whose trailers lose their identity fields on the way through.
pub struct ScrubTrailers<B>(pub B);

impl<B> Body for ScrubTrailers<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut r = Pin::new(&mut self.0).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut r {
            if let Some(trailers) = frame.trailers_mut() {
                strip_identity(trailers);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn map(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn every_spelling_goes_and_everything_else_stays() {
        let mut h = map(&[
            ("x-sigil-peer-id", "spiffe://evil.org/a"),
            ("X_Sigil_Peer_Id", "spiffe://evil.org/b"),
            ("x-sigil_peer-id", "spiffe://evil.org/c"),
            ("x-sigil-peer-id", "spiffe://evil.org/d"),
            ("accept", "*/*"),
            ("x-sigil-peer-ids", "kept"),
            ("trailer", "checksum, X_SIGIL_PEER_ID"),
            ("trailer", "x-sigil-peer-id"),
            ("trailer", "expires"),
        ]);
        strip_identity(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "x-sigil-peer-ids", "trailer"]);
        let trailer: Vec<&str> = h
            .get_all(TRAILER)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(trailer, ["checksum", "expires"]);
    }

    #[test]
    fn a_trailer_field_announcing_only_identity_is_removed_and_an_innocent_one_kept() {
        let mut h = map(&[("trailer", "x_sigil_peer_id")]);
        strip_identity(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = map(&[("trailer", "grpc-status")]);
        strip_identity(&mut h);
        assert_eq!(h.get(TRAILER).unwrap(), "grpc-status");
        // Not text: what it announces cannot be read, so it goes.
        let mut h = HeaderMap::new();
        h.insert(
            TRAILER,
            HeaderValue::from_bytes(b"x-sigil-peer-id\xff").unwrap(),
        );
        strip_identity(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    /// A body made of the given frames.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn trailers_lose_their_identity_fields_and_data_passes_unchanged() {
        let frames = Frames(
            [
                Frame::data(Bytes::from_static(b"x-sigil-peer-id: in the body")),
                Frame::trailers(map(&[
                    ("X-Sigil-Peer-Id", "spiffe://evil.org/t"),
                    ("x_sigil_peer_id", "spiffe://evil.org/u"),
                    ("grpc-status", "0"),
                ])),
            ]
            .into(),
        );
        let collected = ScrubTrailers(frames).collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(
            collected.to_bytes(),
            Bytes::from_static(b"x-sigil-peer-id: in the body")
        );
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    }
}
