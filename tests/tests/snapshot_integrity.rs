//! A sidecar that takes its policies from a control plane never fails open. Restarted while
//! the control plane is down, it serves the snapshot it kept on disk only if that copy is
//! whole and unchanged (sealed with its length and SHA-256). A copy that is truncated, random
//! bytes, empty, a bare protobuf, or gone leaves it not ready and denying every inbound
//! request (`awaiting_snapshot`) until the control plane answers: the policies it will
//! receive may deny what nothing else on the host knows to. And whoever sends a snapshot
//! older than the one in force, or one without an epoch, is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_api::{Ack, Document, Snapshot};
use sigil_e2e::*;
use sigil_testkit::Ca;

fn ready(s: &Sidecar) -> (u16, String) {
    s.admin_get("/ready").expect("admin answers")
}

#[test]
fn an_unusable_persisted_snapshot_leaves_the_sidecar_unready_and_denying() {
    let (mut s, web) = PairSetup::web("snapshot-integrity");
    let d = s.path().to_path_buf();
    let alice = write_identity(&d, "alice", &s.ca, ALICE, &[&s.ca]);
    let mut cp = ControlPlane::start_in(&d, &s.ca, CONTROL);
    // A may GET /orders on B's web port; nothing else is allowed.
    cp.apply(
        &alice,
        &d.join("resources.yaml"),
        &web_resources(&[A], B, web.b_in, web.workload, false),
    );
    let state = d.join("state-b");
    s.b.control_plane = Some((cp.sidecar_port, CONTROL.into(), state.clone()));
    let mut p = s.start();
    let a_web = web.a_out;
    p.assert_reaches(web, "/orders/1");
    assert_eq!(get_once(a_web, "/nope"), Some(403));

    // The control plane goes away; B keeps its sealed copy.
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    p.pb.terminate(Duration::from_secs(5));
    let file = state.join("snapshot.pb");
    let good = std::fs::read(&file).expect("B persisted its snapshot");
    for (case, content, says) in unusable_copies(&good) {
        match &content {
            Some(bytes) => std::fs::write(&file, bytes).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let rejected = if content.is_some() { 1.0 } else { 0.0 };
        unready_and_denying(&p, web, case, says, rejected);
    }

    // An intact copy: served with the control plane still down.
    std::fs::write(&file, &good).unwrap();
    let pb = p.b.start(&d, &p.fb);
    assert!(
        pb.log().contains("serving the last snapshot"),
        "{}",
        pb.log()
    );
    assert_eq!(get_once(a_web, "/orders/2"), Some(200), "{}", pb.log());
    assert_eq!(get_once(a_web, "/nope"), Some(403));
    drop(pb);

    // A damaged copy, then the control plane returns: its snapshot puts B in service.
    std::fs::write(&file, &good[..10]).unwrap();
    let pb = spawn_b(&p, web);
    assert_eq!(ready(&p.b).0, 503);
    assert_eq!(get_once(a_web, "/orders/3"), Some(403));
    let cp = cp.start_again();
    wait_until(
        "B ready on the control plane's snapshot",
        Duration::from_secs(15),
        || ready(&p.b).0 == 200,
    );
    assert_eq!(get_once(a_web, "/orders/4"), Some(200), "{}", pb.log());
    assert_eq!(get_once(a_web, "/nope"), Some(403));
    // And it kept a sealed copy again.
    let kept = std::fs::read(&file).unwrap();
    assert!(sigil_filters::snapshot::unseal(&kept).is_ok());
    drop((pb, cp));
}

/// What the persisted copy is replaced with (None: deleted), named, with what the log must
/// say about it.
fn unusable_copies(good: &[u8]) -> Vec<(&'static str, Option<Vec<u8>>, &'static str)> {
    let payload = sigil_filters::snapshot::unseal(good)
        .expect("sealed")
        .to_vec();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    vec![
        (
            "truncated",
            Some(good[..good.len() / 2].to_vec()),
            "truncated",
        ),
        ("random bytes", Some(random), "not a sealed snapshot"),
        ("empty", Some(Vec::new()), "the file is empty"),
        // Once read as "version 5, 0 policies".
        (
            "two bytes",
            Some(b"\x08\x05".to_vec()),
            "not a sealed snapshot",
        ),
        // A valid snapshot without its seal: length and digest unknown, so not trusted.
        ("bare protobuf", Some(payload), "not a sealed snapshot"),
        ("last byte changed", Some(flip_last(good)), "SHA-256"),
        ("deleted", None, "no snapshot kept from an earlier run"),
    ]
}

/// Starts B (not waiting for /ready: it must not become ready) and waits for its inbound
/// listener.
fn spawn_b(p: &Pair, web: Ports) -> Proc {
    let pb = p.b.spawn(p.path(), &p.fb);
    wait_for_port(([127, 0, 0, 1], web.b_in).into(), Duration::from_secs(10));
    pb
}

/// B started on an unusable copy (`case`) with the control plane down: not ready, denying
/// what pushed policy would govern, the route A may use included; the copy counted as
/// rejected `rejected` times and the log saying `says`.
fn unready_and_denying(p: &Pair, web: Ports, case: &str, says: &str, rejected: f64) {
    let (b, a_web) = (&p.b, web.a_out);
    let pb = spawn_b(p, web);
    let (code, body) = ready(b);
    assert_eq!(code, 503, "{case}: {body}\n{}", pb.log());
    assert!(
        body.contains("no snapshot from the control plane"),
        "{case}: {body}"
    );
    assert_eq!(
        get_once(a_web, "/orders/1"),
        Some(403),
        "{case}\n{}",
        pb.log()
    );
    assert_eq!(get_once(a_web, "/nope"), Some(403), "{case}");
    let denied = count(
        b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "route=\"awaiting_snapshot\""],
    );
    assert_eq!(denied, 2.0, "{case}: {}", b.metrics());
    let got = count(
        b,
        "sigil_snapshot_rejections_total{",
        &["reason=\"persisted_unusable\""],
    );
    assert_eq!(got, rejected, "{case}: {}", b.metrics());
    let log = pb.log();
    assert!(log.contains(says), "{case}: no {says:?} in the log:\n{log}");
    assert!(!log.contains("serving the last snapshot"), "{case}:\n{log}");
}

fn flip_last(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    *v.last_mut().expect("not empty") ^= 0x01;
    v
}

/// What a stand-in control plane does on a sidecar's stream: the snapshots it sends, one
/// after each acknowledgement, and the acknowledgements it got (hello first).
type Script = Arc<Mutex<(Vec<Snapshot>, Vec<Ack>)>>;

/// A stand-in control plane that sends `script`'s snapshots in turn, as an older release or
/// a broken replica might: the sidecar's own rule is all that stands between them and a
/// rollback. Returns its port.
fn stand_in_control_plane(rt: &tokio::runtime::Runtime, ca: &Ca, script: Script) -> u16 {
    serve_http2_tls(
        rt,
        SidecarTls::new(ca, CONTROL).server(),
        move |req: hyper::Request<hyper::body::Incoming>| {
            let script = script.clone();
            async move {
                let mut grpc = tonic::server::Grpc::new(sigil_api::server_codec());
                grpc.streaming(Scripted(script), req).await
            }
        },
    )
}

struct Scripted(Script);

type Snapshots = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Snapshot, tonic::Status>> + Send + 'static>,
>;

impl tonic::server::StreamingService<Ack> for Scripted {
    type Response = Snapshot;
    type ResponseStream = Snapshots;
    type Future = std::future::Ready<Result<tonic::Response<Snapshots>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Ack>>) -> Self::Future {
        let script = self.0.clone();
        let acks = req.into_inner();
        // Each acknowledgement (the hello first) is recorded and answered with the next
        // snapshot of the script, until it runs out.
        let stream =
            futures_util::stream::unfold((acks, script), |(mut acks, script)| async move {
                let ack = acks.message().await.ok()??;
                let next = {
                    let mut s = script.lock().unwrap();
                    s.1.push(ack);
                    if s.0.is_empty() {
                        None
                    } else {
                        Some(s.0.remove(0))
                    }
                };
                match next {
                    Some(snapshot) => Some((Ok(snapshot), (acks, script))),
                    None => {
                        // Nothing more to send: keep reading so the stream stays open.
                        while let Ok(Some(ack)) = acks.message().await {
                            script.lock().unwrap().1.push(ack);
                        }
                        None
                    }
                }
            });
        std::future::ready(Ok(tonic::Response::new(Box::pin(stream) as Snapshots)))
    }
}

#[test]
fn a_sidecar_refuses_older_and_epochless_snapshots_whoever_sends_them() {
    let dir = TempDir::new("snapshot-rollback");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let fc = write_identity(d, "c", &ca, C, &[&ca]);
    let (_web, web_port) = start_workload("b", false);
    let revocation = Document {
        name: "revoke-c".into(),
        yaml: revocation("revoke-c", C, "incident 12", None),
    };
    let snapshot = |epoch: &str, version: u64, revoked: bool| Snapshot {
        version,
        epoch: epoch.into(),
        revocations: if revoked {
            vec![revocation.clone()]
        } else {
            vec![]
        },
        ..Snapshot::default()
    };
    let script: Script = Arc::new(Mutex::new((
        vec![
            snapshot("epoch-1", 5, true),
            // A replica behind its store: older, without the revocation.
            snapshot("epoch-1", 3, false),
            // A control plane of an older release: no epoch, a higher version.
            snapshot("", 9, false),
            // The store's next change: newer, still revoking C.
            snapshot("epoch-1", 6, true),
        ],
        Vec::new(),
    )));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cp_port = stand_in_control_plane(&rt, &ca, script.clone());

    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.control_plane = Some((cp_port, CONTROL.into(), d.join("state-b")));
    let pb = b.spawn(d, &fb);
    wait_until("B's five acknowledgements", Duration::from_secs(15), || {
        script.lock().unwrap().1.len() == 5
    });
    let acks = script.lock().unwrap().1.clone();
    let said: Vec<(u64, bool)> = acks.iter().map(|a| (a.version, a.accepted)).collect();
    assert_eq!(
        said,
        [(0, true), (5, true), (3, false), (9, false), (6, true)],
        "{acks:?}\n{}",
        pb.log()
    );
    assert!(
        acks[2].error.contains("older than version 5 in force"),
        "{:?}",
        acks[2].error
    );
    assert!(
        acks[3].error.contains("names no epoch"),
        "{:?}",
        acks[3].error
    );
    let rejected = count(
        &b,
        "sigil_snapshot_rejections_total{",
        &["reason=\"older_version\""],
    );
    assert_eq!(rejected, 2.0, "{}", b.metrics());
    // C stays revoked throughout: its SVID is refused at B's handshake.
    let c_web = free_port();
    let mut c = Sidecar::new("sidecar-c", C);
    c.outbound = vec![(c_web, b_web, B.into())];
    let _pc = c.start(d, &fc);
    assert_eq!(get_once(c_web, "/orders/1"), Some(502));
    let refused = count(
        &b,
        "sigil_handshake_failures_total{",
        &["reason=\"revoked\""],
    );
    assert!(refused >= 1.0, "{}", b.metrics());
    assert!(pb.log().contains("snapshot rejected"), "{}", pb.log());

    // Restarted, B reads version 6 from disk and says so in its hello; the stand-in, whose
    // script is done, sends nothing, and B serves 6 meanwhile.
    drop(pb);
    script.lock().unwrap().1.clear();
    let pb = b.start(d, &fb);
    wait_until("B's hello", Duration::from_secs(10), || {
        !script.lock().unwrap().1.is_empty()
    });
    let hello = script.lock().unwrap().1[0].clone();
    assert_eq!(
        (hello.epoch.as_str(), hello.version),
        ("epoch-1", 6),
        "{}",
        pb.log()
    );
    drop(rt);
}
