//! The identity a workload sees is only ever the verified one. A client sends the sidecar's
//! `x-sigil-peer-id` under every spelling a CGI, WSGI, Rack or PHP backend reads as the same
//! variable (any case, `_` for `-`), in the header section, announced in `Trailer` and in
//! trailers (HTTP/1.1 chunked and HTTP/2 trailing HEADERS), over each hop on its own: client
//! to the outbound sidecar (checked at a stand-in for the peer sidecar that records what it
//! received), and client to the inbound sidecar to the workload (openssl s_client with a
//! client SVID); then both hops together. What counts is what the receiver actually got.

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sigil_e2e::*;
use sigil_testkit::Ca;

const EVIL: &str = "spiffe://evil.org/";

/// A chunked HTTP/1.1 POST carrying forged identity fields in three spellings in its header
/// section, and in two more in its trailers, announced by `Trailer`.
fn forged_http1(path: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: b\r\n\
         X-Sigil-Peer-Id: {EVIL}header-1\r\n\
         x_sigil_peer_id: {EVIL}header-2\r\n\
         X_SIGIL-PEER_ID: {EVIL}header-3\r\n\
         Trailer: X-Sigil-Peer-Id, x_sigil_peer_id, checksum\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\n\
         x-sigil-peer-id: {EVIL}trailer-1\r\n\
         X_Sigil_Peer_Id: {EVIL}trailer-2\r\n\
         checksum: 1\r\n\r\n"
    )
}

/// What the toy workload said it received as the peer ID (every spelling, trailers
/// included), from its reply line.
fn workload_saw(reply: &str) -> &str {
    reply
        .split("peer-id=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no reply from the workload: {reply}"))
}

/// The workload's `reply` to the POST of `path`: it was answered, the workload saw A alone
/// as the caller (no forged field), and the body arrived whole. `logs` explain a failure.
fn workload_saw_only_a(reply: &str, path: &str, logs: &str) {
    assert!(
        reply.contains(&format!("hello from b (POST {path}")),
        "{reply}\n{logs}"
    );
    assert_eq!(
        workload_saw(reply),
        A,
        "the workload got a forged field: {reply}"
    );
    assert!(
        reply.contains("body=5:"),
        "the body must arrive whole: {reply}"
    );
}

/// `request` through `openssl s_client`, presenting A's SVID straight to an inbound
/// listener (no ALPN: the sidecar sniffs HTTP/1.1).
fn s_client(files: &IdentityFiles, port: u16, request: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-ign_eof", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&files.cert)
        .arg("-key")
        .arg(&files.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let pid = child.id();
    // The sidecar closes after the response (Connection: close); s_client then exits.
    let waiter = std::thread::spawn(move || child.wait_with_output());
    for _ in 0..200 {
        if waiter.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !waiter.is_finished() {
        // SAFETY: kill has no memory preconditions; pid is our own child's.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let out = waiter.join().unwrap().expect("openssl output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a stand-in peer sidecar received: each request's header section and trailers, as
/// `name: value` lines.
type Seen = Arc<Mutex<Vec<String>>>;

/// A stand-in for B's sidecar: B's SVID, the sidecar's own TLS server config (client SVIDs
/// verified, ALPN `sigil/h2`), HTTP/2, answering 200 to everything. Returns its port.
fn stand_in_peer(rt: &tokio::runtime::Runtime, ca: &Ca, seen: Seen) -> u16 {
    serve_http2_tls(
        rt,
        SidecarTls::new(ca, B).server(),
        move |req: Request<Incoming>| {
            let seen = seen.clone();
            async move {
                let (parts, mut body) = req.into_parts();
                let mut lines = fields(&parts.headers);
                while let Some(Ok(frame)) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    if let Some(t) = frame.trailers_ref() {
                        lines.extend(fields(t).into_iter().map(|l| format!("trailer {l}")));
                    }
                }
                seen.lock().unwrap().extend(lines);
                Response::new(Frames::new(vec![Frame::data(Bytes::from_static(
                    b"stand-in\n",
                ))]))
            }
        },
    )
}

fn fields(h: &HeaderMap) -> Vec<String> {
    h.iter()
        .map(|(k, v)| format!("{}: {}", k, v.to_str().unwrap_or("?")))
        .collect()
}

/// A body of the given frames (data, then trailers).
struct Frames(std::collections::VecDeque<Frame<Bytes>>);

impl Frames {
    fn new(frames: Vec<Frame<Bytes>>) -> Self {
        Self(frames.into())
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// One HTTP/2 request (prior knowledge, as a workload speaking h2c would) to a local port,
/// carrying forged identity fields in its headers and trailers; returns the reply's body.
async fn forged_http2(port: u16, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    forged_http2_on(tcp, path).await
}

/// `forged_http2` straight at an inbound listener, as a peer sidecar's pool would call it:
/// mTLS with A's SVID, ALPN `sigil/h2`, B's ID expected.
async fn forged_http2_mtls(ca: &Ca, port: u16, path: &str) -> String {
    let config = SidecarTls::new(ca, A).client(B, sigil_filters::tls::Carries::Http2);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    forged_http2_on(tls, path).await
}

async fn forged_http2_on<S>(io: S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "x-sigil-peer-id",
        format!("{EVIL}h2-trailer-1").parse().unwrap(),
    );
    trailers.insert(
        "x_sigil_peer_id",
        format!("{EVIL}h2-trailer-2").parse().unwrap(),
    );
    trailers.insert("checksum", "1".parse().unwrap());
    let req = Request::post(format!("http://b{path}"))
        .header("x-sigil-peer-id", format!("{EVIL}h2-header-1"))
        .header("x_sigil_peer_id", format!("{EVIL}h2-header-2"))
        .header("trailer", "x-sigil-peer-id, x_sigil_peer_id, checksum")
        .body(Frames::new(vec![
            Frame::data(Bytes::from_static(b"hello")),
            Frame::trailers(trailers),
        ]))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Some(d) = frame.data_ref() {
            out.extend_from_slice(d);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn forged_identity_fields_in_headers_and_trailers_never_reach_the_next_hop() {
    if !require_tool("openssl", "identity-headers") {
        return;
    }
    let (mut s, web) = PairSetup::web("identity-headers");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let seen = Seen::default();
    let stand_in = stand_in_peer(&rt, &s.ca, seen.clone());
    // A calls the real B on one port and the stand-in on another.
    let a_stand_in = free_port();
    s.a.outbound.push((a_stand_in, stand_in, B.into()));
    let p = s.start();
    let (ca, fa, pa, pb, b_web, a_web) = (&p.ca, &p.fa, &p.pa, &p.pb, web.b_in, web.a_out);

    // The inbound hop alone: straight at B's inbound listener, with A's SVID.
    let reply = s_client(fa, b_web, &forged_http1("/inbound-hop"));
    workload_saw_only_a(&reply, "/inbound-hop", &pb.log());
    // Both hops, HTTP/1.1 from the client.
    let reply = raw(a_web, forged_http1("/both-hops").as_bytes());
    workload_saw_only_a(&reply, "/both-hops", &format!("{}\n{}", pa.log(), pb.log()));
    // The inbound hop alone over HTTP/2, as a peer sidecar's pool speaks it: B must strip
    // what a calling sidecar that did not would have let through.
    let reply = rt.block_on(forged_http2_mtls(ca, b_web, "/inbound-hop-h2"));
    workload_saw_only_a(&reply, "/inbound-hop-h2", &pb.log());
    // Both hops, HTTP/2 from the client (trailing HEADERS frame).
    let reply = rt.block_on(forged_http2(a_web, "/both-hops-h2"));
    workload_saw_only_a(&reply, "/both-hops-h2", &pb.log());

    // The outbound hop alone: what reached the (stand-in) peer sidecar from A.
    let reply = raw(a_stand_in, forged_http1("/outbound-hop").as_bytes());
    assert!(reply.contains("stand-in"), "{reply}\n{}", pa.log());
    let reply = rt.block_on(forged_http2(a_stand_in, "/outbound-hop-h2"));
    assert!(reply.contains("stand-in"), "{reply}\n{}", pa.log());
    let got = seen.lock().unwrap().clone();
    // The checksum trailer of each request arrived, so trailers did travel.
    let checksums = got.iter().filter(|l| *l == "trailer checksum: 1").count();
    assert_eq!(checksums, 2, "trailers must still be forwarded: {got:#?}");
    let forged: Vec<&String> = got
        .iter()
        .filter(|l| {
            l.contains(EVIL)
                || l.replace('_', "-")
                    .to_lowercase()
                    .contains("x-sigil-peer-id")
        })
        .collect();
    assert!(
        forged.is_empty(),
        "A forwarded forged identity fields: {forged:#?}"
    );
    drop(rt);
}
