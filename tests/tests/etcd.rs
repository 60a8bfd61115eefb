//! Two `sigil-control` replicas sharing a real etcd server (Debian etcd-server, started and
//! stopped by the test): a change applied through one replica reaches sidecars connected to
//! the other; both report the same versions; concurrent applies through both lose nothing; a
//! revocation applied at one replica cuts a sidecar subscribed to the other.

use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

const CONTROL: &str = "spiffe://example.org/sigil/control";
const ALICE: &str = "spiffe://example.org/ops/alice";
const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";

fn version_of(cp: &ControlPlane, alice: &IdentityFiles) -> String {
    let (code, out, err) = cp.sigil(alice, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn two_replicas_share_an_etcd_store_and_push_each_others_changes() {
    if !require_tool("etcd", "etcd") {
        return;
    }
    let dir = TempDir::new("etcd");
    let d = dir.path();
    let etcd = EtcdServer::start(d);
    let ca = Ca::new("example.org");
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let replica = |name: &str| {
        ControlPlane::start_with(
            CONTROL,
            write_identity(d, name, &ca, CONTROL, &[&ca]),
            etcd.store_at(etcd.client_port),
            free_port(),
            free_port(),
        )
    };
    let (cp1, cp2) = (replica("control-1"), replica("control-2"));

    let (_web, web_port) = start_workload("b", false);
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.control_plane = Some((cp2.sidecar_port, CONTROL.into(), d.join("state-b")));
    let pb = b.start(d, &fb);
    let a_web = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, String::new())];
    a.control_plane = Some((cp1.sidecar_port, CONTROL.into(), d.join("state-a")));
    let pa = a.start(d, &fa);

    // Applied through replica 1; B, subscribed to replica 2, enforces it, and A (replica 1)
    // learns B's address.
    let file = d.join("resources.yaml");
    let out = cp1.apply(
        &alice,
        &file,
        &web_resources(&[A], B, b_web, web_port, false),
    );
    assert!(out.contains("created Policy/b-web"), "{out}");
    wait_until(
        "the policy on both replicas' sidecars",
        Duration::from_secs(15),
        || get_once(a_web, "/orders/1") == Some(200),
    );
    assert_eq!(get_once(a_web, "/admin"), Some(403), "{}", pb.log());
    let (code, got, err) = cp2.sigil(&alice, &["get", "Policy", "b-web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(got.contains("name: orders"), "{got}");
    assert_eq!(version_of(&cp1, &alice), version_of(&cp2, &alice));
    // `sigil status` at either replica lists the sidecars of both, each with its replica.
    for cp in [&cp1, &cp2] {
        wait_until(
            "both sidecars in sigil status",
            Duration::from_secs(10),
            || {
                let (_, out, _) = cp.sigil(&alice, &["status"]);
                let line = |node: &str, replica: &Proc| {
                    out.lines().any(|l| {
                        l.starts_with(&format!("{node} "))
                            && l.contains("acknowledged")
                            && l.ends_with(&format!("-{}", replica.pid()))
                    })
                };
                line("sidecar-a", &cp1.proc) && line("sidecar-b", &cp2.proc)
            },
        );
    }

    // Changed through replica 2: A's calls see it, through B.
    cp2.apply(
        &alice,
        &file,
        &web_resources(&[A], B, b_web, web_port, true),
    );
    wait_until(
        "/admin opened through replica 2",
        Duration::from_secs(15),
        || get_once(a_web, "/admin") == Some(200),
    );

    // Concurrent applies through both replicas: every resource lands, none is lost.
    let apply_many = |cp: &ControlPlane, tag: &str| {
        (0..5)
            .map(|i| {
                format!(
                    "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: w-{tag}-{i}, owner: team-{tag}, purpose: concurrency}}
spec: {{spiffeId: spiffe://example.org/ns/load/sa/{tag}-{i}, environment: test}}
"
                )
            })
            .enumerate()
            .for_each(|(i, yaml)| {
                cp.apply(&alice, &d.join(format!("w-{tag}-{i}.yaml")), &yaml);
            })
    };
    std::thread::scope(|s| {
        s.spawn(|| apply_many(&cp1, "one"));
        s.spawn(|| apply_many(&cp2, "two"));
    });
    for cp in [&cp1, &cp2] {
        let (_, out, _) = cp.sigil(&alice, &["get", "Workload"]);
        assert_eq!(out.matches("# Workload/w-").count(), 10, "{out}");
    }
    assert_eq!(version_of(&cp1, &alice), version_of(&cp2, &alice));

    // Revoked through replica 2: A, subscribed to replica 1, stops presenting its SVID.
    let (code, out, err) = cp2.sigil(&alice, &["revoke", A, "--reason", "incident 9"]);
    assert_eq!(code, Some(0), "{out}{err}");
    pa.wait_log("our own SVID is revoked", Duration::from_secs(10));
    assert_ne!(get_once(a_web, "/orders/2"), Some(200));
    let (code, out, err) = cp1.sigil(&alice, &["unrevoke", A]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_until("A readmitted", Duration::from_secs(15), || {
        get_once(a_web, "/orders/3") == Some(200)
    });
    drop((pa, pb, cp1, cp2, etcd));
}

/// A replica held behind its store (its path to etcd stalled, as in a partition) must not
/// roll a revocation back: a sidecar that reconnects to it says which snapshot it runs, the
/// replica reloads from the store before it answers and sends nothing older meanwhile, and
/// the sidecar would refuse anything older of the same epoch anyway. Not one request of the
/// revoked identity gets through.
#[test]
fn a_replica_behind_its_store_never_rolls_a_revocation_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    if !require_tool("etcd", "etcd-rollback") {
        return;
    }
    let dir = TempDir::new("etcd-rollback");
    let d = dir.path();
    let etcd = EtcdServer::start(d);
    let ca = Ca::new("example.org");
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    // Replica 2 reaches etcd through a path the test can stall.
    let to_etcd = Relay::start(etcd.client_port);
    let replica = |name: &str, etcd_port: u16| {
        ControlPlane::start_with(
            CONTROL,
            write_identity(d, name, &ca, CONTROL, &[&ca]),
            etcd.store_at(etcd_port),
            free_port(),
            free_port(),
        )
    };
    let cp1 = replica("control-1", etcd.client_port);
    let cp2 = replica("control-2", to_etcd.port);
    // B reaches the control plane through a balancer: replica 1 first.
    let balancer = Relay::start(cp1.sidecar_port);

    let (_web, web_port) = start_workload("b", false);
    let b_web = free_port();
    cp1.apply(
        &alice,
        &d.join("resources.yaml"),
        &web_resources(&[A], B, b_web, web_port, false),
    );
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.control_plane = Some((balancer.port, CONTROL.into(), d.join("state-b")));
    let pb = b.start(d, &fb);
    let a_web = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into())];
    let pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/orders/1"), Some(200), "{}", pb.log());

    // A's calls, one connection each, for the rest of the test (bounded in count and time).
    // After `revoked` is set, every one must fail.
    let (stop, revoked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let calls = {
        let (stop, revoked) = (stop.clone(), revoked.clone());
        std::thread::spawn(move || {
            let (mut after, mut let_through) = (0u32, 0u32);
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed)
                && std::time::Instant::now() < deadline
                && after < 5_000
            {
                let was_revoked = revoked.load(Ordering::Relaxed);
                let got = get_once(a_web, "/orders/steady");
                if was_revoked {
                    after += 1;
                    if got == Some(200) {
                        let_through += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (after, let_through)
        })
    };

    // Replica 2 falls behind; the revocation goes in through replica 1 and reaches B.
    to_etcd.pause(true);
    let (code, out, err) = cp1.sigil(&alice, &["revoke", A, "--reason", "incident 11"]);
    assert_eq!(code, Some(0), "{out}{err}");
    pb.wait_log("incident 11", Duration::from_secs(10));
    revoked.store(true, Ordering::Relaxed);
    let rejected_older = || {
        count(
            &b,
            "sigil_snapshot_rejections_total{",
            &["reason=\"older_version\""],
        )
    };
    assert_eq!(rejected_older(), 0.0);

    // B's stream moves to replica 2, which has not seen the revocation.
    balancer.set_target(cp2.sidecar_port);
    balancer.cut();
    cp2.proc
        .wait_log("newer than this replica's", Duration::from_secs(20));
    // Held behind for a while: it sends B nothing older, and B keeps the revocation.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rejected_older(), 0.0, "replica 2 sent an older snapshot");
    assert!(!pb.log().contains("snapshot rejected"), "{}", pb.log());

    // Its path to etcd back: it catches up and B acknowledges it.
    to_etcd.pause(false);
    wait_until(
        "replica 2 to serve B the revocation",
        Duration::from_secs(30),
        || {
            let (_, out, _) = cp2.sigil(&alice, &["status"]);
            out.lines()
                .any(|l| l.starts_with("sidecar-b ") && l.contains("acknowledged"))
                && cp2
                    .proc
                    .log()
                    .contains("sidecar spiffe://example.org/ns/demo/sa/b connected")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (after, let_through) = calls.join().unwrap();
    assert!(after > 20, "too few calls after the revocation: {after}");
    assert_eq!(
        let_through,
        0,
        "{let_through} of {after} calls of the revoked identity got through\n{}\n{}",
        pb.log(),
        cp2.proc.log()
    );
    assert_eq!(rejected_older(), 0.0);
    drop((pa, pb, cp1, cp2, balancer, to_etcd, etcd));
}
