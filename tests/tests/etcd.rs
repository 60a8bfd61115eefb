//! Two `sigil-control` replicas sharing a real etcd server (Debian etcd-server, started and
//! stopped by the test): a change applied through one replica reaches sidecars connected to
//! the other; both report the same versions; concurrent applies through both lose nothing; a
//! revocation applied at one replica cuts a sidecar subscribed to the other.

use std::time::{Duration, Instant};

use sigil_e2e::*;

fn version_of(cp: &ControlPlane, alice: &IdentityFiles) -> String {
    let (code, out, err) = cp.sigil(alice, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out.lines().next().unwrap_or_default().to_string()
}

/// An etcd server in the pair's directory, and alice's SVID from the pair's CA.
fn etcd_and_alice(s: &PairSetup) -> (EtcdServer, IdentityFiles) {
    let etcd = EtcdServer::start(s.path());
    let alice = write_identity(s.path(), "alice", &s.ca, ALICE, &[&s.ca]);
    (etcd, alice)
}

/// A replica `name` (its SVID from the pair's CA) on `etcd`, reached on `etcd_port` (its own,
/// or a relay's).
fn replica(s: &PairSetup, etcd: &EtcdServer, name: &str, etcd_port: u16) -> ControlPlane {
    ControlPlane::start_named(s.path(), &s.ca, CONTROL, name, etcd.store_at(etcd_port))
}

/// Two replicas on one etcd; B subscribed to replica 2, A to replica 1 (which tells A where
/// B is). Fields drop in order: the replicas, etcd, then the pair, whose directory holds
/// etcd's data.
struct Replicas {
    cp1: ControlPlane,
    cp2: ControlPlane,
    _etcd: EtcdServer,
    alice: IdentityFiles,
    web: Ports,
    p: Pair,
}

#[test]
fn two_replicas_share_an_etcd_store_and_push_each_others_changes() {
    if !require_tool("etcd", "etcd") {
        return;
    }
    let (mut s, web) = PairSetup::web("etcd");
    let (etcd, alice) = etcd_and_alice(&s);
    let cp1 = replica(&s, &etcd, "control-1", etcd.client_port);
    let cp2 = replica(&s, &etcd, "control-2", etcd.client_port);
    let d = s.path().to_path_buf();
    s.b.control_plane = Some((cp2.sidecar_port, CONTROL.into(), d.join("state-b")));
    s.a.outbound[0].2 = String::new();
    s.a.control_plane = Some((cp1.sidecar_port, CONTROL.into(), d.join("state-a")));
    let r = Replicas {
        cp1,
        cp2,
        _etcd: etcd,
        alice,
        web,
        p: s.start(),
    };

    applied_through_one_replica_enforced_through_both(&r);
    // Changed through replica 2: A's calls see it, through B.
    r.cp2.apply(
        &r.alice,
        &d.join("resources.yaml"),
        &web_resources(&[A], B, web.b_in, web.workload, true),
    );
    wait_until(
        "/admin opened through replica 2",
        Duration::from_secs(15),
        || get_once(web.a_out, "/admin") == Some(200),
    );
    concurrent_applies_through_both_lose_nothing(&r);

    // Revoked through replica 2: A, subscribed to replica 1, stops presenting its SVID.
    let (code, out, err) = r
        .cp2
        .sigil(&r.alice, &["revoke", A, "--reason", "incident 9"]);
    assert_eq!(code, Some(0), "{out}{err}");
    r.p.pa
        .wait_log("our own SVID is revoked", Duration::from_secs(10));
    assert_ne!(get_once(web.a_out, "/orders/2"), Some(200));
    let (code, out, err) = r.cp1.sigil(&r.alice, &["unrevoke", A]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_until("A readmitted", Duration::from_secs(15), || {
        get_once(web.a_out, "/orders/3") == Some(200)
    });
}

/// Applied through replica 1; B, subscribed to replica 2, enforces it, and A (replica 1)
/// learns B's address. `sigil status` at either replica lists the sidecars of both, each
/// with its replica.
fn applied_through_one_replica_enforced_through_both(r: &Replicas) {
    let (cp1, cp2, alice, a_web) = (&r.cp1, &r.cp2, &r.alice, r.web.a_out);
    let out = cp1.apply(
        alice,
        &r.p.path().join("resources.yaml"),
        &web_resources(&[A], B, r.web.b_in, r.web.workload, false),
    );
    assert!(out.contains("created Policy/b-web"), "{out}");
    wait_until(
        "the policy on both replicas' sidecars",
        Duration::from_secs(15),
        || get_once(a_web, "/orders/1") == Some(200),
    );
    assert_eq!(get_once(a_web, "/admin"), Some(403), "{}", r.p.pb.log());
    let (code, got, err) = cp2.sigil(alice, &["get", "Policy", "b-web"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(got.contains("name: orders"), "{got}");
    assert_eq!(version_of(cp1, alice), version_of(cp2, alice));
    for cp in [cp1, cp2] {
        wait_until(
            "both sidecars in sigil status",
            Duration::from_secs(10),
            || {
                let (_, out, _) = cp.sigil(alice, &["status"]);
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
}

/// Concurrent applies through both replicas: every resource lands, none is lost.
fn concurrent_applies_through_both_lose_nothing(r: &Replicas) {
    let apply_many = |cp: &ControlPlane, tag: &str| {
        for i in 0..5 {
            let yaml = workload(
                &format!("w-{tag}-{i}"),
                "concurrency",
                &format!("spiffe://example.org/ns/load/sa/{tag}-{i}"),
                &[],
            );
            cp.apply(
                &r.alice,
                &r.p.path().join(format!("w-{tag}-{i}.yaml")),
                &yaml,
            );
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| apply_many(&r.cp1, "one"));
        s.spawn(|| apply_many(&r.cp2, "two"));
    });
    for cp in [&r.cp1, &r.cp2] {
        let (_, out, _) = cp.sigil(&r.alice, &["get", "Workload"]);
        assert_eq!(out.matches("# Workload/w-").count(), 10, "{out}");
    }
    assert_eq!(version_of(&r.cp1, &r.alice), version_of(&r.cp2, &r.alice));
}

/// A replica held behind its store (its path to etcd stalled, as in a partition) must not
/// roll a revocation back: a sidecar that reconnects to it says which snapshot it runs, the
/// replica reloads from the store before it answers and sends nothing older meanwhile, and
/// the sidecar would refuse anything older of the same epoch anyway. Not one request of the
/// revoked identity gets through.
#[test]
fn a_replica_behind_its_store_never_rolls_a_revocation_back() {
    if !require_tool("etcd", "etcd-rollback") {
        return;
    }
    let (mut s, web) = PairSetup::web("etcd-rollback");
    let (etcd, alice) = etcd_and_alice(&s);
    // Replica 2 reaches etcd through a path the test can stall.
    let to_etcd = Relay::start(etcd.client_port);
    let cp1 = replica(&s, &etcd, "control-1", etcd.client_port);
    let cp2 = replica(&s, &etcd, "control-2", to_etcd.port);
    // B reaches the control plane through a balancer: replica 1 first.
    let balancer = Relay::start(cp1.sidecar_port);
    cp1.apply(
        &alice,
        &s.path().join("resources.yaml"),
        &web_resources(&[A], B, web.b_in, web.workload, false),
    );
    s.b.control_plane = Some((balancer.port, CONTROL.into(), s.path().join("state-b")));
    let p = s.start();
    p.assert_reaches(web, "/orders/1");

    // A's calls, one connection each, for the rest of the test (bounded in count and time).
    // After the revocation is in force at B, every one must fail.
    let calls = Steady {
        limit: Duration::from_secs(90),
        max_calls: 5_000,
        ..Steady::fresh(web.a_out, "/orders/steady")
    }
    .start();

    // Replica 2 falls behind; the revocation goes in through replica 1 and reaches B.
    to_etcd.pause(true);
    let (code, out, err) = cp1.sigil(&alice, &["revoke", A, "--reason", "incident 11"]);
    assert_eq!(code, Some(0), "{out}{err}");
    p.pb.wait_log("incident 11", Duration::from_secs(10));
    let revoked_at = Instant::now();
    let rejected_older = || {
        count(
            &p.b,
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
    assert!(!p.pb.log().contains("snapshot rejected"), "{}", p.pb.log());

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
    let after = calls.stop().after(revoked_at);
    let let_through = after.0.iter().filter(|c| c.status == Some(200)).count();
    let after = after.0.len();
    assert!(after > 20, "too few calls after the revocation: {after}");
    assert_eq!(
        let_through,
        0,
        "{let_through} of {after} calls of the revoked identity got through\n{}\n{}",
        p.pb.log(),
        cp2.proc.log()
    );
    assert_eq!(rejected_older(), 0.0);
    // The pair last: its directory holds etcd's data.
    drop((cp1, cp2, balancer, to_etcd, etcd, p));
}
