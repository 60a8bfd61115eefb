//! The sidecar's SPIFFE Workload API, read by the public `spiffe` crate (an independent
//! client) as a workload on the sidecar's machine would: this test process is the workload,
//! told apart by its uid and its binary. The real `sigil-control` (with a CA from `sigil ca
//! init`) and `sigil-proxy` binaries.

use std::time::Duration;

use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_config::TrustDomain;
use sigil_e2e::*;
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::TrustBundles;
use sigil_testkit::pem;
use spiffe::{WorkloadApiClient, WorkloadApiError};

const BATCH: &str = "spiffe://example.org/ns/demo/sa/batch";

/// Applies `yaml` and waits until sidecar `node` has acknowledged the version it made.
fn apply_and_wait(
    cp: &ControlPlane,
    ops: &IdentityFiles,
    file: &std::path::Path,
    yaml: &str,
    node: &str,
) {
    let out = cp.apply(ops, file, yaml);
    let version = out
        .lines()
        .find_map(|l| l.strip_prefix("version "))
        .unwrap_or_else(|| panic!("no version in {out}"))
        .trim()
        .to_string();
    poll(Duration::from_secs(15), Duration::from_millis(100), || {
        let (_, status, _) = cp.sigil(ops, &["status"]);
        status
            .lines()
            .any(|l| {
                l.starts_with(&format!("{node} "))
                    && l.contains(&format!("sent={version} acknowledged"))
            })
            .then_some(())
            .ok_or_else(|| format!("{node} has not acknowledged version {version}:\n{status}"))
    });
}

/// The Workload `batch`, served by B's Workload API to uid `uid` running `path`.
fn batch(uid: u32, path: &str) -> String {
    workload_yaml(
        "batch",
        BATCH,
        &format!(
            "  svidTtl: 1m\n  workloadApi: {{sidecar: \"{B}\", uid: {uid}, path: \"{path}\"}}\n"
        ),
    )
}

/// Checks `svid` (chain and key, PKCS#8) as the sidecar checks its own, and against the bundle
/// of the Workload API; returns the leaf.
fn check_svid(svid: &spiffe::X509Svid, bundle: &[u8]) -> CertificateDer<'static> {
    assert_eq!(svid.spiffe_id().to_string(), BATCH);
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    let key_pem = pem("PRIVATE KEY", svid.private_key().as_bytes());
    let provider = sigil_filters::tls::provider();
    sigil_filters::LocalIdentity::from_pem(
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        UnixTime::now(),
        Some(&sigil_config::SpiffeId::parse(BATCH).unwrap()),
        &provider,
    )
    .expect("the chain and key make an SVID");
    let mut bundles = TrustBundles::new();
    let certs = sigil_filters::bundle::split_der(bundle).expect("DER certificates");
    bundles
        .insert_der(&TrustDomain::parse("example.org").unwrap(), certs)
        .unwrap();
    let (leaf, rest) = chain.split_first().unwrap();
    verify_svid(
        &bundles,
        &provider.signature_verification_algorithms,
        leaf,
        rest,
        UnixTime::now(),
        Usage::Client,
    )
    .expect("the SVID verifies against the Workload API's bundle");
    leaf.clone()
}

/// A gRPC call on the socket without `workload.spiffe.io: true`: its grpc-status.
async fn call_without_header(socket: &std::path::Path) -> Option<String> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::post("http://localhost/SpiffeWorkloadAPI/FetchX509SVID")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(String::from("\0\0\0\0\0"))
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[test]
fn the_workload_api_hands_a_matching_caller_its_svid_and_refuses_others() {
    if !require_tool("openssl", "workload API") {
        return;
    }
    let dir = TempDir::new("workload-api");
    let d = dir.path();
    let setup = Setup::new(d);
    let ops = &setup.ops;
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    let (_, fb, token_file) = b_with_token(d, &setup, &cp);

    let (_web, web_port) = start_workload("b", false);
    let socket = d.join("agent.sock");
    let mut b = Sidecar::new("sidecar-b", B);
    b.join_token_file = Some(token_file);
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.inbound = vec![(free_port(), web_port)];
    b.workload_api = Some(socket.clone());
    let pb = b.start(d, &fb);
    let logs = || format!("{}\n{}", cp.proc.log(), pb.log());

    let me = std::env::current_exe().unwrap().display().to_string();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let endpoint = format!("unix:{}", socket.display());

    // A Workload served by B, but for another binary: this caller gets nothing.
    apply_and_wait(
        &cp,
        ops,
        &d.join("batch.yaml"),
        &batch(uid, "/usr/bin/not-this-test"),
        "sidecar-b",
    );
    let refused = rt.block_on(async {
        let client = WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        client.fetch_x509_svid().await
    });
    assert!(
        matches!(refused, Err(WorkloadApiError::NoIdentityIssued)),
        "{refused:?}\n{}",
        logs()
    );

    // Without the security header, the call is refused before anything else.
    let status = rt.block_on(call_without_header(&socket));
    assert_eq!(status.as_deref(), Some("3"), "InvalidArgument expected");

    // The selectors match this test: its SVID, with a key made on this machine, and its
    // bundle; then a renewed one on the same stream (one-minute SVIDs renew at ~30 s).
    apply_and_wait(
        &cp,
        ops,
        &d.join("batch.yaml"),
        &batch(uid, &me),
        "sidecar-b",
    );
    let (first, renewed) = rt.block_on(async {
        let client = WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        let bundles = client.fetch_x509_bundles().await.expect("bundles");
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let bundle: Vec<u8> = bundles
            .get(&td)
            .expect("the bundle of example.org")
            .authorities()
            .iter()
            .flat_map(|c| c.as_bytes().to_vec())
            .collect();
        let svid = client.fetch_x509_svid().await.expect("an SVID");
        let first = check_svid(&svid, &bundle);
        let mut stream = client.stream_x509_svids().await.expect("a stream");
        let same = stream
            .next()
            .await
            .expect("a first message")
            .expect("an SVID");
        assert_eq!(
            check_svid(&same, &bundle),
            first,
            "the SVID held is handed out again"
        );
        let renewed = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a renewed SVID on the stream within 60 s")
            .expect("the stream goes on")
            .expect("an SVID");
        (first, check_svid(&renewed, &bundle))
    });
    assert_ne!(first, renewed, "{}", logs());

    // A trust bundle pushed to B reaches the bundle stream at once.
    let partner = sigil_testkit::Ca::new("partner.org");
    let indented: String = partner
        .bundle_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let mut bundles = rt.block_on(async {
        let client = WorkloadApiClient::connect_to(&endpoint)
            .await
            .expect("connect");
        let mut stream = client.stream_x509_bundles().await.expect("a bundle stream");
        let now = stream
            .next()
            .await
            .expect("a first message")
            .expect("bundles");
        (client, stream, now)
    });
    let partner_td = spiffe::TrustDomain::new("partner.org").unwrap();
    assert!(bundles.2.get(&partner_td).is_none());
    cp.apply(
        ops,
        &d.join("partner.yaml"),
        &format!(
            "apiVersion: sigil.dev/v1\nkind: TrustBundle\nmetadata: {{name: partner, owner: sec, purpose: federation}}\nspec:\n  trustDomain: partner.org\n  pem: |\n{indented}"
        ),
    );
    let pushed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(15), bundles.1.next())
            .await
            .expect("a bundle update within 15 s")
            .expect("the stream goes on")
            .expect("bundles")
    });
    let got: Vec<Vec<u8>> = pushed
        .get(&partner_td)
        .expect("partner.org's bundle pushed")
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(got, [partner.cert_der().to_vec()]);
    drop(bundles);

    let (_, metrics, _) = cp.sigil(ops, &["metrics"]);
    assert!(
        metric(
            &metrics,
            "sigil_control_svid_issuance_total{",
            &["result=\"workload_api\""]
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
    // The Workload leaves B: the stream ends, and nothing more is handed out.
    cp.sigil(ops, &["delete", "Workload", "batch"]);
    poll(Duration::from_secs(15), Duration::from_millis(200), || {
        let again = rt.block_on(async {
            let client = WorkloadApiClient::connect_to(&endpoint)
                .await
                .expect("connect");
            client.fetch_x509_svid().await
        });
        matches!(again, Err(WorkloadApiError::NoIdentityIssued))
            .then_some(())
            .ok_or_else(|| format!("still served after its Workload was deleted: {again:?}"))
    });
}

/// A sidecar that takes its SVID and bundles from another sidecar's Workload API
/// (`identity.workloadApi`, as it would from a SPIRE agent), with an empty bundle directory:
/// it serves mTLS with them, and puts the renewed SVID the stream brings in force.
#[test]
fn a_sidecar_takes_its_svid_and_bundles_from_a_workload_api_and_follows_rotation() {
    if !require_tool("openssl", "workload API") {
        return;
    }
    let dir = TempDir::new("workload-api-client");
    let d = dir.path();
    let setup = Setup::new(d);
    let ops = &setup.ops;
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    let (_, fb, token_file) = b_with_token(d, &setup, &cp);
    // C is served by B's Workload API to the sigil-proxy binary run by this uid.
    let proxy_bin = std::fs::canonicalize(bin("sigil-proxy")).unwrap();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    cp.apply(
        ops,
        &d.join("c.yaml"),
        &workload_yaml(
            "c",
            C,
            &format!(
                "  svidTtl: 1m\n  workloadApi: {{sidecar: \"{B}\", uid: {uid}, path: \"{}\"}}\n",
                proxy_bin.display()
            ),
        ),
    );

    let (_web, web_port) = start_workload("b", false);
    let socket = d.join("agent.sock");
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.join_token_file = Some(token_file);
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.inbound = vec![(b_web, web_port)];
    b.allow = vec![(web_port, vec![C.into()])];
    b.workload_api = Some(socket.clone());
    let pb = b.start(d, &fb);

    // C's bundle directory is empty: its trust comes from the Workload API alone.
    let fc = write_identity(d, "c", &setup.boot, C, &[&setup.boot]);
    std::fs::remove_file(fc.bundle_dir.join("example.org.pem")).unwrap();
    let c_web = free_port();
    let mut c = Sidecar::new("sidecar-c", C);
    c.svid_from_api = Some(socket);
    c.outbound = vec![(c_web, b_web, B.into())];
    let pc = c.start(d, &fc);
    let logs = || format!("{}\n{}\n{}", cp.proc.log(), pb.log(), pc.log());
    poll(Duration::from_secs(20), Duration::from_millis(250), || {
        (get_once(c_web, "/") == Some(200))
            .then_some(())
            .ok_or_else(|| format!("C does not reach B with the SVID from the API:\n{}", logs()))
    });
    assert!(
        pc.log().contains("SVID from the Workload API"),
        "{}",
        logs()
    );
    let expiry = |s: &Sidecar| metric(&s.metrics(), "sigil_svid_expiry_timestamp_seconds{", &[]);
    let first = expiry(&c).expect("C reports its SVID's expiry");
    assert!(
        first - (now_unix() as f64) <= 60.0,
        "a one-minute SVID from B"
    );

    // B renews C's SVID at about half its lifetime and the stream brings it: C rotates in
    // place and goes on serving.
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        (expiry(&c).unwrap_or(0.0) > first)
            .then_some(())
            .ok_or_else(|| format!("C has no renewed SVID within 60 s:\n{}", logs()))
    });
    assert_eq!(get_once(c_web, "/"), Some(200), "{}", logs());
}
