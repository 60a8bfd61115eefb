//! In-process tests of the connection paths over in-memory streams: the relay (bytes both
//! ways, half-closes, close requests, the idle timeout) and HTTP serving as both directions
//! use it (`http::serve_until_closed`), including the order of a graceful close (GOAWAY,
//! in-flight requests finish) followed by a revocation, which cuts at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_config::SpiffeId;
use sigil_filters::detect::Speaks;
use sigil_proxy::conns::{Conns, Direction, Kind};
use sigil_proxy::http::{serve_until_closed, ResponseBody};
use sigil_proxy::reasons::CloseReason;
use sigil_proxy::relay::{relay, Counters};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Bounds every wait, so that a broken path fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {PATIENCE:?}"))
}

fn uncounted() -> Counters {
    Counters::default()
}

async fn read_exactly(s: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    within("read", s.read_exact(&mut buf)).await.expect("read");
    buf
}

#[tokio::test]
async fn the_relay_copies_both_ways_counts_and_keeps_a_half_closed_side_open() {
    let (mut peer, peer_side) = duplex(64 * 1024);
    let (local_side, mut workload) = duplex(64 * 1024);
    let counters = Arc::new(uncounted());
    let (_close, mut close_rx) = watch::channel(None);
    let c = counters.clone();
    let relayed =
        tokio::spawn(
            async move { relay(peer_side, local_side, &c, &mut close_rx, PATIENCE).await },
        );
    peer.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut workload, 5).await, b"hello");
    workload.write_all(b"world!").await.unwrap();
    assert_eq!(read_exactly(&mut peer, 6).await, b"world!");
    // The peer is done sending; the workload may still answer.
    peer.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF passed on", workload.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    workload.write_all(b"late").await.unwrap();
    assert_eq!(read_exactly(&mut peer, 4).await, b"late");
    workload.shutdown().await.unwrap();
    assert_eq!(
        within("relay end", relayed).await.unwrap(),
        CloseReason::Done
    );
    assert_eq!(counters.from_peer.get(), 5);
    assert_eq!(counters.to_peer.get(), 10);
}

#[tokio::test]
async fn the_relay_ends_with_the_reason_it_is_asked_to_close_for() {
    let (mut peer, peer_side) = duplex(1024);
    let (local_side, mut workload) = duplex(1024);
    let (close, mut close_rx) = watch::channel(None);
    let relayed = tokio::spawn(async move {
        relay(peer_side, local_side, &uncounted(), &mut close_rx, PATIENCE).await
    });
    peer.write_all(b"x").await.unwrap();
    assert_eq!(read_exactly(&mut workload, 1).await, b"x");
    close.send(Some(CloseReason::Revoked)).unwrap();
    assert_eq!(
        within("relay end", relayed).await.unwrap(),
        CloseReason::Revoked
    );
    // Both sides see the end.
    let mut rest = Vec::new();
    within("peer EOF", peer.read_to_end(&mut rest))
        .await
        .unwrap();
    within("workload EOF", workload.read_to_end(&mut rest))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_relay_closes_a_connection_on_which_nothing_moved_for_the_idle_time() {
    let idle = Duration::from_secs(30);
    let (mut peer, peer_side) = duplex(1024);
    let (local_side, mut workload) = duplex(1024);
    let (_close, mut close_rx) = watch::channel(None);
    let relayed = tokio::spawn(async move {
        relay(peer_side, local_side, &uncounted(), &mut close_rx, idle).await
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    // A byte 20 s in: the idle time starts again.
    peer.write_all(b"x").await.unwrap();
    assert_eq!(read_exactly(&mut workload, 1).await, b"x");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!relayed.is_finished(), "closed 20 s after the last byte");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(relayed.await.unwrap(), CloseReason::IdleTimeout);
}

/// An HTTP/2 connection served in-process as both directions serve theirs, registered in
/// `conns`. `/slow` answers once `release` is notified, saying `arrived` when it is in.
struct Served {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    server: JoinHandle<CloseReason>,
    arrived: Arc<Notify>,
    release: Arc<Notify>,
}

async fn serve_h2(conns: &Arc<Conns>) -> Served {
    let (client_io, server_io) = duplex(64 * 1024);
    let peer = SpiffeId::parse("spiffe://test.example/caller").unwrap();
    let mut guard = conns.register(Direction::Inbound, Kind::Http, peer, Vec::new(), 8080);
    let (arrived, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (a, r) = (arrived.clone(), release.clone());
    let service = move |req: Request<Incoming>| {
        let (arrived, release) = (a.clone(), r.clone());
        async move {
            if req.uri().path() == "/slow" {
                arrived.notify_one();
                release.notified().await;
            }
            let body: ResponseBody = Full::new(Bytes::from_static(b"ok"))
                .map_err(|e| match e {})
                .boxed();
            Ok::<_, Infallible>(Response::new(body))
        }
    };
    let conns2 = conns.clone();
    let server = tokio::spawn(async move {
        serve_until_closed(
            &conns2,
            server_io,
            Speaks::Http2,
            service,
            &mut guard.close_rx,
        )
        .await
    });
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    Served {
        sender,
        server,
        arrived,
        release,
    }
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("http://test.example{path}"))
        .body(Empty::new())
        .unwrap()
}

/// Sends `/fast` until one is refused (the GOAWAY arrived); panics if none is in 200 tries.
async fn until_refused(sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>) {
    for _ in 0..200 {
        match sender.send_request(get("/fast")).await {
            Err(_) => return,
            Ok(r) => assert_eq!(r.status(), StatusCode::OK),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("new requests still taken after the graceful close");
}

type Answer = Result<Response<Incoming>, hyper::Error>;

/// Sends `/slow` and returns once the server holds it.
async fn slow_in_flight(s: &mut Served) -> JoinHandle<Answer> {
    let slow = tokio::spawn(s.sender.send_request(get("/slow")));
    within("slow request in", s.arrived.notified()).await;
    slow
}

/// Lets `/slow` answer; it must be answered 200, and the server end with `reason`.
async fn finishes(s: Served, slow: JoinHandle<Answer>, reason: CloseReason) {
    s.release.notify_one();
    let slow = within("slow answer", slow).await.unwrap();
    assert_eq!(
        slow.expect("in-flight request finished").status(),
        StatusCode::OK
    );
    assert_eq!(within("server end", s.server).await.unwrap(), reason);
}

#[tokio::test]
async fn a_graceful_close_lets_in_flight_requests_finish_and_takes_no_new_ones() {
    let conns = Arc::new(Conns::default());
    let mut s = serve_h2(&conns).await;
    let ok = within("first request", s.sender.send_request(get("/fast"))).await;
    assert_eq!(ok.unwrap().status(), StatusCode::OK);
    let slow = slow_in_flight(&mut s).await;
    assert_eq!(conns.close_where(CloseReason::BundleChange, |_| true), 1);
    until_refused(&mut s.sender).await;
    finishes(s, slow, CloseReason::BundleChange).await;
}

#[tokio::test]
async fn a_revocation_cuts_a_connection_that_is_closing_gracefully() {
    let conns = Arc::new(Conns::default());
    let mut s = serve_h2(&conns).await;
    let slow = slow_in_flight(&mut s).await;
    assert_eq!(conns.close_where(CloseReason::BundleChange, |_| true), 1);
    // Already closing gracefully: another graceful reason does not ask again.
    assert_eq!(conns.close_where(CloseReason::BundleChange, |_| true), 0);
    until_refused(&mut s.sender).await;
    // A revocation does, and does not wait for the in-flight request.
    assert_eq!(conns.close_where(CloseReason::Revoked, |_| true), 1);
    assert_eq!(
        within("server end", s.server).await.unwrap(),
        CloseReason::Revoked
    );
    let slow = within("slow request end", slow).await.unwrap();
    assert!(
        slow.is_err(),
        "the in-flight request was answered after the revocation"
    );
    assert_eq!(conns.close_where(CloseReason::Revoked, |_| true), 0);
}

#[tokio::test]
async fn draining_closes_served_connections_gracefully() {
    let conns = Arc::new(Conns::default());
    let mut s = serve_h2(&conns).await;
    let slow = slow_in_flight(&mut s).await;
    conns.start_drain();
    until_refused(&mut s.sender).await;
    finishes(s, slow, CloseReason::Done).await;
}
