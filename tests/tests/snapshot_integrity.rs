//! A sidecar that takes its policies from a control plane never fails open. Restarted while
//! the control plane is down, it serves the snapshot it kept on disk only if that copy is
//! whole and unchanged (sealed with its length and SHA-256). A copy that is truncated, random
//! bytes, empty, a bare protobuf, or gone leaves it not ready and denying every inbound
//! request (`awaiting_snapshot`) until the control plane answers: the policies it will
//! receive may deny what nothing else on the host knows to.

use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

const CONTROL: &str = "spiffe://example.org/sigil/control";
const ALICE: &str = "spiffe://example.org/ops/alice";
const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";

fn ready(s: &Sidecar) -> (u16, String) {
    http_get(([127, 0, 0, 1], s.admin).into(), "/ready").expect("admin answers")
}

#[test]
fn an_unusable_persisted_snapshot_leaves_the_sidecar_unready_and_denying() {
    let dir = TempDir::new("snapshot-integrity");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let (_web, web_port) = start_workload("b", false);
    let cp = ControlPlane::start(
        CONTROL,
        write_identity(d, "control", &ca, CONTROL, &[&ca]),
        d.join("control-data"),
        free_port(),
        free_port(),
    );
    let b_web = free_port();
    // A may GET /orders on B's web port; nothing else is allowed.
    cp.apply(
        &alice,
        &d.join("resources.yaml"),
        &web_resources(&[A], B, b_web, web_port, false),
    );
    let state = d.join("state-b");
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), state.clone()));
    let pb = b.start(d, &fb);
    let a_web = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into())];
    let _pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/orders/1"), Some(200), "{}", pb.log());
    assert_eq!(get_once(a_web, "/nope"), Some(403));

    // The control plane goes away; B keeps its sealed copy.
    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    drop(pb);
    let file = state.join("snapshot.pb");
    let good = std::fs::read(&file).expect("B persisted its snapshot");
    let payload = sigil_filters::snapshot::unseal(&good)
        .expect("sealed")
        .to_vec();
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
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
        ("last byte changed", Some(flip_last(&good)), "SHA-256"),
        ("deleted", None, "no snapshot kept from an earlier run"),
    ];
    for (case, content, says) in cases {
        match &content {
            Some(bytes) => std::fs::write(&file, bytes).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let pb = b.spawn(d, &fb);
        wait_for_port(([127, 0, 0, 1], b_web).into(), Duration::from_secs(10));
        let (code, body) = ready(&b);
        assert_eq!(code, 503, "{case}: {body}\n{}", pb.log());
        assert!(
            body.contains("no snapshot from the control plane"),
            "{case}: {body}"
        );
        // What pushed policy would govern is denied, the route A may use included.
        assert_eq!(
            get_once(a_web, "/orders/1"),
            Some(403),
            "{case}\n{}",
            pb.log()
        );
        assert_eq!(get_once(a_web, "/nope"), Some(403), "{case}");
        let denied = count(
            &b,
            "sigil_requests_total{",
            &["direction=\"inbound\"", "route=\"awaiting_snapshot\""],
        );
        assert_eq!(denied, 2.0, "{case}: {}", b.metrics());
        let rejected = count(
            &b,
            "sigil_snapshot_rejections_total{",
            &["reason=\"persisted_unusable\""],
        );
        let want = if content.is_some() { 1.0 } else { 0.0 };
        assert_eq!(rejected, want, "{case}: {}", b.metrics());
        let log = pb.log();
        assert!(log.contains(says), "{case}: no {says:?} in the log:\n{log}");
        assert!(!log.contains("serving the last snapshot"), "{case}:\n{log}");
        drop(pb);
    }

    // An intact copy: served with the control plane still down.
    std::fs::write(&file, &good).unwrap();
    let pb = b.start(d, &fb);
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
    let pb = b.spawn(d, &fb);
    wait_for_port(([127, 0, 0, 1], b_web).into(), Duration::from_secs(10));
    assert_eq!(ready(&b).0, 503);
    assert_eq!(get_once(a_web, "/orders/3"), Some(403));
    let cp = cp.start_again();
    wait_until(
        "B ready on the control plane's snapshot",
        Duration::from_secs(15),
        || ready(&b).0 == 200,
    );
    assert_eq!(get_once(a_web, "/orders/4"), Some(200), "{}", pb.log());
    assert_eq!(get_once(a_web, "/nope"), Some(403));
    // And it kept a sealed copy again.
    let kept = std::fs::read(&file).unwrap();
    assert!(sigil_filters::snapshot::unseal(&kept).is_ok());
    drop((pb, cp));
}

fn flip_last(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    *v.last_mut().expect("not empty") ^= 0x01;
    v
}
