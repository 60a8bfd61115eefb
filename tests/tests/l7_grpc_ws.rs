//! gRPC and WebSocket through a real sidecar pair (A explicit outbound -> B explicit inbound ->
//! workload on 127.0.0.1), with B's Policy deciding per route and per identity.
//!
//! The workloads run in the test process: a gRPC server built from tonic's server pieces
//! (`tonic::server::Grpc` with the prost codec, served by hyper's HTTP/2 server) and a
//! tokio-tungstenite echo server. The clients are tonic's `client::Grpc` over hyper-util's
//! HTTP/2 client, and tokio-tungstenite's `connect_async`. A second caller, C, has its own
//! sidecar, so the same route is checked for an allowed and a refused identity.

use std::convert::Infallible;
use std::future::Future;
use std::future::{ready, IntoFuture, Ready};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, BoxStream};
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_e2e::*;
use sigil_testkit::Ca;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status, Streaming};
use tonic_prost::ProstCodec;

const PEER: &str = "x-sigil-peer-id";
/// Upper bound for every single await in these tests.
const STEP: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test if it takes longer than `STEP`.
async fn within<F: IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {STEP:?}"))
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// What the workload saw: (path, x-sigil-peer-id) per request or upgrade.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn seen_paths(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect()
}

/// Serves `workload` on a free loopback port on `rt`: the port, and what the workload saw.
fn serve<W, Fut>(rt: &Runtime, workload: W) -> (u16, Seen)
where
    W: FnOnce(TcpListener, Seen) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let seen: Seen = Arc::default();
    let listener = rt
        .block_on(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(workload(listener, seen.clone()));
    (port, seen)
}

/// The sidecars of one test: B in front of the workload port with `policy`, A and C calling
/// B. C is dropped first: its files are in the pair's directory.
struct Mesh {
    c: Caller,
    p: Pair,
}

impl Mesh {
    fn start(tag: &str, workload_port: u16, policy: &str) -> Self {
        let mut s = PairSetup::new(tag);
        s.serve(workload_port);
        let policies = resource_dir(s.path(), "policies");
        write_resource(&policies, "api.yaml", policy);
        s.b.policy_dir = Some(policies);
        let p = s.start();
        let c = p.caller("c", C, |_| {});
        Self { c, p }
    }

    /// A's outbound listener to the workload.
    fn a_port(&self) -> u16 {
        self.p.a.outbound[0].0
    }

    /// C's outbound listener to the workload.
    fn c_port(&self) -> u16 {
        self.c.ports[0]
    }

    fn log(&self) -> String {
        self.p.pb.log()
    }

    fn requests(&self, labels: &[&str]) -> f64 {
        count(&self.p.b, "sigil_requests_total{", labels)
    }

    fn inbound_opened(&self, peer_id: &str) -> f64 {
        count(
            &self.p.b,
            "sigil_connections_opened_total{",
            &["direction=\"inbound\"", &peer(peer_id)],
        )
    }
}

// ---------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------

/// Hand-written prost messages (no protoc): `pkg.EchoRequest` / `pkg.EchoReply`.
#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(bytes = "vec", tag = "2")]
    blob: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    /// `<method path> <request text>`.
    #[prost(string, tag = "1")]
    text: String,
    /// The `x-sigil-peer-id` metadata the workload received.
    #[prost(string, tag = "2")]
    peer: String,
    /// Position of this reply in its stream (1-based).
    #[prost(uint32, tag = "3")]
    seq: u32,
    /// Length of the request's blob.
    #[prost(uint64, tag = "4")]
    blob_len: u64,
}

fn peer_of(md: &tonic::metadata::MetadataMap) -> String {
    md.get(PEER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Unary `<path>`: answers with the request text, the caller the sidecar vouched for, and
/// response metadata `x-served-by: workload`.
struct Unary(String);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = Ready<Result<tonic::Response<EchoReply>, Status>>;

    fn call(&mut self, req: tonic::Request<EchoRequest>) -> Self::Future {
        let peer = peer_of(req.metadata());
        let m = req.into_inner();
        let mut resp = tonic::Response::new(EchoReply {
            text: format!("{} {}", self.0, m.text),
            peer,
            seq: 1,
            blob_len: m.blob.len() as u64,
        });
        resp.metadata_mut()
            .insert("x-served-by", MetadataValue::from_static("workload"));
        ready(Ok(resp))
    }
}

/// Bidirectional `/pkg.Svc/Chat`: one reply per request, as each arrives. A request whose
/// text is `fail` ends the call with RESOURCE_EXHAUSTED carrying `x-chat-count` in the
/// trailers; otherwise the call ends OK when the client half-closes.
struct Chat;

type ChatStream = BoxStream<'static, Result<EchoReply, Status>>;

impl tonic::server::StreamingService<EchoRequest> for Chat {
    type Response = EchoReply;
    type ResponseStream = ChatStream;
    type Future = Ready<Result<tonic::Response<ChatStream>, Status>>;

    fn call(&mut self, req: tonic::Request<Streaming<EchoRequest>>) -> Self::Future {
        let peer = peer_of(req.metadata());
        let inbound = req.into_inner();
        let replies = stream::unfold((inbound, 0u32, false), move |(mut inbound, n, done)| {
            let peer = peer.clone();
            async move {
                if done {
                    return None;
                }
                match inbound.message().await {
                    Ok(Some(m)) if m.text == "fail" => {
                        let mut md = tonic::metadata::MetadataMap::new();
                        md.insert("x-chat-count", n.to_string().parse().unwrap());
                        let st = Status::with_metadata(
                            Code::ResourceExhausted,
                            "chat quota used up",
                            md,
                        );
                        Some((Err(st), (inbound, n, true)))
                    }
                    Ok(Some(m)) => {
                        let reply = EchoReply {
                            text: format!("/pkg.Svc/Chat {}", m.text),
                            peer,
                            seq: n + 1,
                            blob_len: m.blob.len() as u64,
                        };
                        Some((Ok(reply), (inbound, n + 1, false)))
                    }
                    Ok(None) => None,
                    Err(st) => Some((Err(st), (inbound, n, true))),
                }
            }
        });
        ready(Ok(tonic::Response::new(Box::pin(replies) as ChatStream)))
    }
}

fn server_codec() -> ProstCodec<EchoReply, EchoRequest> {
    ProstCodec::new()
}

async fn grpc_route(req: Request<Incoming>, seen: Seen) -> Response<tonic::body::Body> {
    let path = req.uri().path().to_string();
    let peer = req
        .headers()
        .get(PEER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    seen.lock().unwrap().push((path.clone(), peer));
    let mut grpc = tonic::server::Grpc::new(server_codec());
    match path.as_str() {
        "/pkg.Svc/Unary" | "/pkg.Svc/Secret" | "/pkg.Admin/Reset" => {
            grpc.unary(Unary(path.clone()), req).await
        }
        "/pkg.Svc/Chat" => grpc.streaming(Chat, req).await,
        _ => Status::unimplemented(format!("no method {path}")).into_http(),
    }
}

/// gRPC workload: hyper's HTTP/2 server (prior knowledge, as gRPC is) on a loopback port.
async fn grpc_workload(listener: TcpListener, seen: Seen) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let seen = seen.clone();
                async move { Ok::<_, Infallible>(grpc_route(req, seen).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
    }
}

type GrpcClient = tonic::client::Grpc<Client<HttpConnector, tonic::body::Body>>;

/// A tonic client speaking HTTP/2 (prior knowledge) to a sidecar's outbound listener.
fn grpc_client(port: u16) -> GrpcClient {
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let origin: Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
    tonic::client::Grpc::with_origin(http, origin)
}

fn client_codec() -> ProstCodec<EchoRequest, EchoReply> {
    ProstCodec::new()
}

fn msg(text: &str) -> EchoRequest {
    EchoRequest {
        text: text.into(),
        blob: Vec::new(),
    }
}

async fn unary(
    client: &mut GrpcClient,
    path: &'static str,
    req: tonic::Request<EchoRequest>,
) -> Result<tonic::Response<EchoReply>, Status> {
    within("client ready", client.ready())
        .await
        .expect("client ready");
    within(
        path,
        client.unary(req, PathAndQuery::from_static(path), client_codec()),
    )
    .await
}

/// Asserts a refusal by B's sidecar: PERMISSION_DENIED naming what denied it.
fn assert_denied(r: Result<tonic::Response<EchoReply>, Status>, what: &str, rule: &str) {
    match r {
        Err(st) => {
            assert_eq!(
                st.code(),
                Code::PermissionDenied,
                "{what}: wrong code: {st:?}"
            );
            assert!(
                st.message().contains("denied by") && st.message().contains(rule),
                "{what}: message should name {rule:?}: {:?}",
                st.message()
            );
        }
        Ok(r) => panic!("{what}: allowed, answered {:?}", r.get_ref()),
    }
}

fn grpc_policy(port: u16) -> String {
    policy(
        "grpc",
        "gRPC end-to-end test",
        B,
        &format!(
            "    - port: {port}
      routes:
        - name: svc
          match: {{path: {{prefix: /pkg.Svc}}}}
          allow: [{A}]
        - name: secret
          match: {{path: {{exact: /pkg.Svc/Secret}}}}
          allow: [{C}]
          deny: [{A}]
        - name: admin
          match: {{path: {{prefix: /pkg.Admin}}}}
          allow: [{C}]
"
        ),
    )
}

#[test]
fn grpc_unary_and_streaming_allowed_and_denied_per_route_and_identity() {
    let rt = runtime();
    let (port, seen) = serve(&rt, grpc_workload);
    let mesh = Mesh::start("grpc", port, &grpc_policy(port));

    rt.block_on(async {
        let mut a = grpc_client(mesh.a_port());
        let mut c = grpc_client(mesh.c_port());
        unary_on_an_allowed_route(&mesh, &mut a).await;
        bidirectional_streaming_ends_ok(&mesh, &mut a).await;
        a_streaming_error_arrives_in_trailers(&mut a).await;
        refusals_leave_the_connection_usable(&mesh, &mut a).await;
        c_may_call_exactly_what_a_may_not(&mut c).await;
    });

    // The workload saw exactly the allowed calls, each with the caller's verified ID.
    let got = seen.lock().unwrap().clone();
    let want: Vec<(String, String)> = [
        ("/pkg.Svc/Unary", A),
        ("/pkg.Svc/Chat", A),
        ("/pkg.Svc/Chat", A),
        ("/pkg.Svc/Unary", A),
        ("/pkg.Admin/Reset", C),
        ("/pkg.Svc/Secret", C),
    ]
    .iter()
    .map(|(p, id)| (p.to_string(), id.to_string()))
    .collect();
    assert_eq!(got, want, "what reached the workload");

    // Metrics: by route and decision.
    let a_label = peer(A);
    assert!(
        mesh.requests(&[
            "route=\"grpc/svc\"",
            "decision=\"allow\"",
            "status_class=\"2xx\"",
            &a_label
        ]) >= 4.0
    );
    assert!(mesh.requests(&["route=\"grpc/secret\"", "decision=\"deny\"", &a_label]) >= 1.0);
    assert!(mesh.requests(&["route=\"default_deny\"", "decision=\"deny\""]) >= 2.0);
    mesh.p.pb.wait_log("request denied", Duration::from_secs(2));
}

/// Unary on an allowed route: the reply, response metadata, and the verified caller (a
/// forged x-sigil-peer-id from the client is replaced by the sidecar).
async fn unary_on_an_allowed_route(mesh: &Mesh, a: &mut GrpcClient) {
    let mut req = tonic::Request::new(msg("hello"));
    req.metadata_mut()
        .insert(PEER, MetadataValue::from_static("spiffe://evil.org/x"));
    let r = unary(a, "/pkg.Svc/Unary", req)
        .await
        .unwrap_or_else(|st| panic!("unary: {st:?}\n{}", mesh.log()));
    assert_eq!(r.get_ref().text, "/pkg.Svc/Unary hello");
    assert_eq!(r.get_ref().peer, A, "workload saw the wrong caller");
    assert_eq!(
        r.metadata()
            .get("x-served-by")
            .and_then(|v| v.to_str().ok()),
        Some("workload")
    );
}

/// A `/pkg.Svc/Chat` call whose requests the test sends one by one: the sender, and the
/// replies; `what` names the call if it does not start in time.
async fn chat(
    a: &mut GrpcClient,
    what: &str,
) -> Result<
    (
        tokio::sync::mpsc::Sender<EchoRequest>,
        tonic::Response<Streaming<EchoReply>>,
    ),
    Status,
> {
    within("client ready", a.ready()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(4);
    let outbound = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let resp = within(
        what,
        a.streaming(
            tonic::Request::new(outbound),
            PathAndQuery::from_static("/pkg.Svc/Chat"),
            client_codec(),
        ),
    )
    .await?;
    Ok((tx, resp))
}

/// Bidirectional streaming: each request is answered before the next is sent (so neither
/// side is buffered whole), one message is 256 KiB, and the call ends OK with the
/// workload's trailers once the client half-closes.
async fn bidirectional_streaming_ends_ok(mesh: &Mesh, a: &mut GrpcClient) {
    let (tx, mut resp) = chat(a, "chat call")
        .await
        .unwrap_or_else(|st| panic!("chat: {st:?}\n{}", mesh.log()));
    let inbound = resp.get_mut();
    for i in 1..=5u32 {
        let mut m = msg(&format!("ping {i}"));
        if i == 3 {
            m.blob = vec![0xa5; 256 * 1024];
        }
        let blob_len = m.blob.len() as u64;
        within("chat send", tx.send(m)).await.unwrap();
        let reply = within("chat reply", inbound.message())
            .await
            .unwrap_or_else(|st| panic!("chat reply {i}: {st:?}"))
            .unwrap_or_else(|| panic!("chat ended before reply {i}"));
        assert_eq!(reply.text, format!("/pkg.Svc/Chat ping {i}"));
        assert_eq!((reply.seq, reply.blob_len), (i, blob_len));
        assert_eq!(reply.peer, A);
    }
    drop(tx);
    let end = within("chat end", inbound.message()).await;
    assert!(matches!(end, Ok(None)), "chat did not end OK: {end:?}");
    let trailers = within("chat trailers", inbound.trailers())
        .await
        .expect("trailers")
        .expect("the OK status comes in trailers");
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "{trailers:?}"
    );
}

/// A streaming call that the workload ends with an error: status, message and custom
/// metadata all arrive in the trailers, after data.
async fn a_streaming_error_arrives_in_trailers(a: &mut GrpcClient) {
    let (tx, mut resp) = chat(a, "failing chat call")
        .await
        .expect("failing chat call");
    let inbound = resp.get_mut();
    for text in ["one", "two"] {
        within("send", tx.send(msg(text))).await.unwrap();
        let r = within("reply", inbound.message()).await;
        assert!(matches!(r, Ok(Some(_))), "{r:?}");
    }
    within("send", tx.send(msg("fail"))).await.unwrap();
    let st = within("error status", inbound.message())
        .await
        .expect_err("the workload ends the call with an error");
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(st.message(), "chat quota used up");
    assert_eq!(
        st.metadata()
            .get("x-chat-count")
            .and_then(|v| v.to_str().ok()),
        Some("2"),
        "custom trailer lost: {st:?}"
    );
}

/// Refusals: a route that allows only C (default deny for A), and a route with an explicit
/// deny for A. Neither reaches the workload, and A's connection stays usable.
async fn refusals_leave_the_connection_usable(mesh: &Mesh, a: &mut GrpcClient) {
    let opened = mesh.inbound_opened(A);
    let r = unary(a, "/pkg.Admin/Reset", tonic::Request::new(msg("x"))).await;
    assert_denied(r, "A -> /pkg.Admin/Reset", "default deny");
    let r = unary(a, "/pkg.Svc/Secret", tonic::Request::new(msg("x"))).await;
    assert_denied(r, "A -> /pkg.Svc/Secret", "rule secret (deny)");
    let r = unary(a, "/pkg.Svc/Unary", tonic::Request::new(msg("again")))
        .await
        .expect("allowed call after refusals");
    assert_eq!(r.get_ref().text, "/pkg.Svc/Unary again");
    assert_eq!(
        mesh.inbound_opened(A),
        opened,
        "a refusal cost A its HTTP/2 connection"
    );
}

/// Per identity: C may call exactly what A may not, and not what A may.
async fn c_may_call_exactly_what_a_may_not(c: &mut GrpcClient) {
    let r = unary(c, "/pkg.Admin/Reset", tonic::Request::new(msg("c")))
        .await
        .unwrap_or_else(|st| panic!("C -> /pkg.Admin/Reset: {st:?}"));
    assert_eq!(
        (r.get_ref().text.as_str(), r.get_ref().peer.as_str()),
        ("/pkg.Admin/Reset c", C)
    );
    let r = unary(c, "/pkg.Svc/Secret", tonic::Request::new(msg("c")))
        .await
        .unwrap_or_else(|st| panic!("C -> /pkg.Svc/Secret: {st:?}"));
    assert_eq!(r.get_ref().peer, C);
    let r = unary(c, "/pkg.Svc/Unary", tonic::Request::new(msg("c"))).await;
    assert_denied(r, "C -> /pkg.Svc/Unary", "default deny");
}

// ---------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------

/// WebSocket echo workload: records the upgrade's path and peer header, greets with
/// `peer=<x-sigil-peer-id>`, then echoes text and binary messages until closed.
async fn ws_workload(listener: TcpListener, seen: Seen) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut peer = String::new();
            // The callback's signature (and its large error type) is tungstenite's.
            #[allow(clippy::result_large_err)]
            let record = |req: &tungstenite::handshake::server::Request,
                          resp: tungstenite::handshake::server::Response| {
                peer = req
                    .headers()
                    .get(PEER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                seen.lock()
                    .unwrap()
                    .push((req.uri().path().to_string(), peer.clone()));
                Ok(resp)
            };
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, record).await else {
                return;
            };
            if ws
                .send(Message::text(format!("peer={peer}")))
                .await
                .is_err()
            {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Next data message, skipping control frames.
async fn next_data<S>(ws: &mut S) -> Message
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    loop {
        match within("websocket message", ws.next()).await {
            Some(Ok(m)) if m.is_text() || m.is_binary() => return m,
            Some(Ok(_)) => continue,
            other => panic!("websocket ended: {other:?}"),
        }
    }
}

/// Connects through a sidecar and expects the upgrade to be refused with `status`.
async fn connect_refused(port: u16, path: &str, status: u16) {
    let url = format!("ws://127.0.0.1:{port}{path}");
    match within(path, tokio_tungstenite::connect_async(url.as_str())).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), status, "{path}: {resp:?}");
        }
        Err(e) => panic!("{path}: want HTTP {status}, got error {e}"),
        Ok((_, resp)) => panic!("{path}: upgrade allowed: {resp:?}"),
    }
}

fn ws_policy(port: u16) -> String {
    policy(
        "ws",
        "WebSocket end-to-end test",
        B,
        &format!(
            "    - port: {port}
      routes:
        - name: echo
          match: {{methods: [GET], path: {{exact: /ws/echo}}}}
          allow: [{A}]
        - name: admin
          match: {{path: {{prefix: /ws/admin}}}}
          allow: [{C}]
"
        ),
    )
}

#[test]
fn websocket_upgrade_authorized_per_route_and_identity_then_bytes_flow() {
    let rt = runtime();
    let (port, seen) = serve(&rt, ws_workload);
    let mesh = Mesh::start("ws", port, &ws_policy(port));

    rt.block_on(async {
        an_allowed_upgrade_carries_every_kind_of_message(&mesh).await;
        upgrades_are_refused_per_route_and_identity(&mesh).await;
    });

    // Only the allowed upgrades reached the workload.
    assert_eq!(
        seen_paths(&seen),
        ["/ws/echo", "/ws/admin/x"],
        "what reached the workload"
    );

    rt.block_on(a_bundle_change_cuts_a_live_tunnel(&mesh));
    mesh.p
        .pb
        .wait_log("no longer verifies", std::time::Duration::from_secs(5));
    assert!(
        mesh.requests(&[
            "route=\"ws/admin\"",
            "decision=\"allow\"",
            "status_class=\"1xx\"",
            &peer(C)
        ]) >= 1.0,
        "{}",
        mesh.p.b.metrics()
    );
    assert!(mesh.requests(&["decision=\"deny\"", "status_class=\"4xx\"", &peer(A)]) >= 2.0);
}

/// Allowed: the upgrade succeeds, the workload learns the verified caller (a forged header
/// is replaced), and text and binary messages flow both ways; a ping is answered.
async fn an_allowed_upgrade_carries_every_kind_of_message(mesh: &Mesh) {
    let mut req = format!("ws://127.0.0.1:{}/ws/echo", mesh.a_port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert(PEER, HeaderValue::from_static("spiffe://evil.org/x"));
    let (mut ws, resp) = within("upgrade /ws/echo", tokio_tungstenite::connect_async(req))
        .await
        .unwrap_or_else(|e| panic!("upgrade /ws/echo: {e}\n{}", mesh.log()));
    assert_eq!(resp.status().as_u16(), 101);
    assert_eq!(
        next_data(&mut ws).await,
        Message::text(format!("peer={A}")),
        "greeting pushed by the workload"
    );
    let msgs = [
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 0xff]),
        Message::text("ünïcödé ✓"),
        Message::binary((0..300_000u32).map(|i| i as u8).collect::<Vec<u8>>()),
        Message::text("bye"),
    ];
    for m in msgs {
        within("websocket send", ws.send(m.clone())).await.unwrap();
        assert_eq!(next_data(&mut ws).await, m);
    }
    // A ping is answered by the workload's library through the relayed bytes.
    within("ping", ws.send(Message::Ping(b"p".to_vec().into())))
        .await
        .unwrap();
    loop {
        match within("pong", ws.next()).await {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"p");
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("no pong: {other:?}"),
        }
    }
    within("close", ws.close(None)).await.unwrap();
    while let Some(m) = within("close handshake", ws.next()).await {
        if m.is_err() {
            break;
        }
    }
}

/// Refused upgrades: a route only C may use, and a path no route matches. Per identity: C
/// may upgrade on /ws/admin but not on /ws/echo.
async fn upgrades_are_refused_per_route_and_identity(mesh: &Mesh) {
    let (a_port, c_port) = (mesh.a_port(), mesh.c_port());
    connect_refused(a_port, "/ws/admin", 403).await;
    connect_refused(a_port, "/ws/other", 403).await;
    connect_refused(c_port, "/ws/echo", 403).await;
    let (mut ws, _) = within(
        "C upgrade /ws/admin",
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{c_port}/ws/admin/x")),
    )
    .await
    .unwrap_or_else(|e| panic!("C upgrade /ws/admin/x: {e}\n{}", mesh.log()));
    assert_eq!(next_data(&mut ws).await, Message::text(format!("peer={C}")));
    within("send", ws.send(Message::text("from c")))
        .await
        .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("from c"));
    within("close", ws.close(None)).await.unwrap();
}

/// A live tunnel outlives its HTTP request: when B stops trusting A's CA, B must still find
/// the tunnel and cut it.
async fn a_bundle_change_cuts_a_live_tunnel(mesh: &Mesh) {
    let (mut ws, _) = within(
        "upgrade for the bundle change",
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws/echo", mesh.a_port())),
    )
    .await
    .unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text(format!("peer={A}")));
    mesh.p.fb.trust(&Ca::new("example.org"));
    loop {
        match within("the tunnel to be cut after the bundle change", ws.next()).await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
            Some(Ok(_)) => continue,
        }
    }
}
