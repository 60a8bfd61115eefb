//! HTTP plumbing both directions share: keeping the identity fields the sidecar's alone
//! (`sigil_filters::headers` says which names a backend could read as them) in the header
//! section, in the `Trailer` field that announces trailers, and in the trailers themselves.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue, TRAILER};
use hyper::HeaderMap;
use sigil_filters::headers::{is_identity_header, trailer_without_identity};

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
