//! Two sidecars built in this process (`start::load`, as `sigil-proxy` builds itself), the
//! caller's workload connection an in-memory stream: a request goes through A's outbound HTTP
//! path, A's pool and dial, B's inbound and inbound HTTP path, to B's workload (a loopback
//! server), which sees A's verified ID. A revocation of A put in force at B then cuts the
//! pooled connection, and A's next request is refused at the handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sigil_config::{ProxyConfig, Revocation, SpiffeId};
use sigil_filters::detect::Speaks;
use sigil_proxy::proxy::Proxy;
use sigil_proxy::{inbound, outbound_http, start};
use sigil_testkit::Ca;
use tokio::net::TcpListener;

const A: &str = "spiffe://test.example/a";
const B: &str = "spiffe://test.example/b";
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing after {PATIENCE:?}"))
}

/// A directory of this test's own, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("sigil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("test dir");
        Self(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sidecar for `id`, allowing `allow` on `port` (connection-level rule), built in-process.
/// (The explicit listener the config must name is never bound: the test accepts itself.)
fn sidecar(dir: &Path, ca: &Ca, name: &str, id: &str, port: u16, allow: &str) -> Arc<Proxy> {
    let (cert, key) = ca.svid(id).write(dir, name);
    let bundles = dir.join(format!("{name}-bundles"));
    std::fs::create_dir_all(&bundles).unwrap();
    std::fs::write(bundles.join("test.example.pem"), ca.bundle_pem()).unwrap();
    let yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata:\n  name: {name}\n  owner: sigil-tests\n\
         spec:\n  mode: explicit\n  workers: 1\n  identity:\n    certFile: {}\n    keyFile: {}\n    bundleDir: {}\n\
         \x20 admin:\n    listen: 127.0.0.1:0\n  inbound:\n    ports: [{{port: {port}, allow: [\"{allow}\"]}}]\n\
         \x20   explicit: [{{listen: \"127.0.0.2:0\", port: {port}}}]\n",
        cert.display(),
        key.display(),
        bundles.display(),
    );
    let path = dir.join(format!("{name}.yaml"));
    let cfg = ProxyConfig::parse(&path, &yaml).expect("config");
    let (p, _watched) = start::load(cfg, None, None).expect("sidecar loads");
    p
}

/// B's workload: answers with the peer ID header it received.
async fn workload() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let peer = req
                    .headers()
                    .get("x-sigil-peer-id")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(peer))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    port
}

/// B's inbound listener, every connection served for the workload's `port`.
async fn inbound_listener(b: Arc<Proxy>, port: u16) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, client)) = l.accept().await else {
                return;
            };
            let room = b.admission.inbound(client.ip()).expect("room");
            let p = b.clone();
            b.workers.serve(tcp, true, move |tcp, load| {
                inbound::handle(p, tcp, load, client, port, room)
            });
        }
    });
    addr
}

async fn call(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> (StatusCode, String) {
    let req = Request::get("/who")
        .header("host", "b.test.example")
        // A forged identity: B must replace it with the verified one.
        .header("x-sigil-peer-id", "spiffe://test.example/admin")
        .body(Empty::new())
        .unwrap();
    // HTTP/1.1: one request at a time, once the previous exchange is done.
    within("ready", sender.ready())
        .await
        .expect("connection usable");
    let resp = within("response", sender.send_request(req))
        .await
        .expect("answered");
    let status = resp.status();
    let body = within("body", resp.into_body().collect()).await.unwrap();
    (
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_crosses_both_sidecars_and_a_revocation_cuts_the_pool() {
    let dir = Dir::new("inproc-sidecars");
    let ca = Ca::new("test.example");
    let port = workload().await;
    let a = sidecar(&dir.0, &ca, "a", A, 1, B);
    let b = sidecar(&dir.0, &ca, "b", B, port, A);
    let dest = inbound_listener(b.clone(), port).await;

    // A's workload connection, in memory, served by A's outbound HTTP path.
    let (client_io, workload_side) = tokio::io::duplex(64 * 1024);
    let expected = SpiffeId::parse(B).unwrap();
    tokio::spawn(outbound_http::serve(
        a.clone(),
        workload_side,
        Speaks::Http1,
        dest,
        expected,
    ));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
        .await
        .unwrap();
    tokio::spawn(conn);

    let (status, peer) = call(&mut sender).await;
    assert_eq!((status, peer.as_str()), (StatusCode::OK, A));
    assert_eq!(a.pool.destinations(), 1, "one pooled destination");
    let (status, _) = call(&mut sender).await;
    assert_eq!(status, StatusCode::OK);

    // B revokes A: the pooled connection is cut, and redialling fails the handshake.
    let yaml = format!(
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {{name: a-out, owner: secops}}\n\
         spec:\n  spiffeId: {A}\n  reason: \"incident\"\n"
    );
    let revocation = Revocation::parse_all(Path::new("a-out.yaml"), &yaml).unwrap();
    b.sources.lock().unwrap().file_revocations = revocation;
    b.install_revocations();
    // The cut pooled connection fails what was on it; the next dial fails the handshake,
    // which B counts in its own task.
    let handshake_refused =
        |m: &str| m.contains("sigil_handshake_failures_total{direction=\"inbound\"");
    let mut refused = false;
    for _ in 0..200 {
        let (status, _) = call(&mut sender).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_GATEWAY,
            "neither answered nor refused: {status}"
        );
        if status == StatusCode::BAD_GATEWAY && handshake_refused(&b.ledger.metrics.encode()) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = b.ledger.metrics.encode();
    assert!(refused, "A still reaches B after the revocation\n{metrics}");
    assert!(
        metrics.contains("sigil_connections_closed_total{direction=\"inbound\",local_id=\"spiffe://test.example/b\",peer_id=\"spiffe://test.example/a\",reason=\"revoked\"}"),
        "B counts A's connection closed as revoked\n{metrics}"
    );
}
