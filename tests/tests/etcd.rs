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
            StoreAt::Etcd(etcd.client_port),
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
