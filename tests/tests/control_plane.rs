//! `sigil-control` pushing to real sidecars: policies and the registry arrive over the gRPC
//! stream and are enforced; a live policy change applies without a restart; a snapshot a
//! sidecar cannot run is rejected (NACK, shown by `sigil status`) while the one in force keeps
//! serving; traffic flows on while the control plane is killed and restarted; `sigil revoke`
//! cuts a live connection and `unrevoke` readmits; a sidecar restarted while the control
//! plane is down serves its persisted snapshot.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_e2e::*;
use sigil_testkit::Ca;

const CONTROL: &str = "spiffe://example.org/sigil/control";
const ALICE: &str = "spiffe://example.org/ops/alice";
const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";
const C: &str = "spiffe://partner.org/ns/demo/sa/c";
const D: &str = "spiffe://example.org/ns/demo/sa/d";

fn trust_bundle(name: &str, domain: &str, pem: &str) -> String {
    let pem: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: sigil.dev/v1
kind: TrustBundle
metadata: {{name: {name}, owner: security, purpose: federation}}
spec:
  trustDomain: {domain}
  pem: |
{pem}"
    )
}

/// The snapshot version a sidecar runs, from its config dump (None: no snapshot).
fn snapshot_version(s: &Sidecar) -> Option<u64> {
    let (_, dump) = http_get(([127, 0, 0, 1], s.admin).into(), "/config_dump")?;
    let at = dump.find("\"control_plane_snapshot\": {")?;
    let rest = &dump[at..];
    let v = rest.find("\"version\": ")? + "\"version\": ".len();
    let digits: String = rest[v..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn status(cp: &ControlPlane, alice: &IdentityFiles) -> String {
    let (code, out, err) = cp.sigil(alice, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out
}

/// `sigil status` shows `node` with `state` (e.g. "acknowledged").
fn wait_status(cp: &ControlPlane, alice: &IdentityFiles, node: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = status(cp, alice);
        if out
            .lines()
            .any(|l| l.starts_with(&format!("{node} ")) && l.contains(state))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} not {state:?} in sigil status:\n{out}\n{}",
            cp.proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn control_plane_pushes_policies_registry_and_revocations_to_sidecars() {
    let dir = TempDir::new("control-plane");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let (_web, web_port) = start_workload("b", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let mut cp = ControlPlane::start(
        CONTROL,
        write_identity(d, "control", &ca, CONTROL, &[&ca]),
        d.join("control-data"),
        free_port(),
        free_port(),
    );
    let (b_web, b_echo) = (free_port(), free_port());
    let file = d.join("resources.yaml");
    let out = cp.apply(
        &alice,
        &file,
        &web_resources(&[A, D], B, b_web, web_port, false),
    );
    assert!(out.contains("created Policy/b-web"), "{out}");

    // B pins its echo port to TCP for A in its own config; its web port's routes come only
    // from the control plane. A knows B's address only from the pushed registry.
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port), (b_echo, echo_port)];
    b.allow = vec![(echo_port, vec![A.into()])];
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    let mut pb = b.start(d, &fb);
    let (a_web, a_echo) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, String::new()), (a_echo, b_echo, B.into())];
    a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
    let mut pa = a.start(d, &fa);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(snapshot_version(&a) == Some(1) && snapshot_version(&b) == Some(1)) {
        assert!(
            Instant::now() < deadline,
            "no snapshot 1 on both sidecars:\n{}\n{}\n{}",
            pa.log(),
            pb.log(),
            cp.proc.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_status(&cp, &alice, "sidecar-a", "sent=1 acknowledged");
    wait_status(&cp, &alice, "sidecar-b", "sent=1 acknowledged");
    let out = status(&cp, &alice);
    assert!(out.contains(A) && out.contains(B), "{out}");

    // Pushed policy and registry in force.
    assert_eq!(get_once(a_web, "/orders/1"), Some(200), "{}", pa.log());
    assert_eq!(get_once(a_web, "/admin"), Some(403), "{}", pb.log());

    // Steady traffic on one keep-alive connection from here on (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", a_web)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 20_000 {
                match get(&mut s, "/orders/steady") {
                    Some(200) => ok += 1,
                    other => failed.push(other),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };

    // A live policy change: /admin opens for A without a restart.
    cp.apply(
        &alice,
        &file,
        &web_resources(&[A, D], B, b_web, web_port, true),
    );
    wait_until("/admin allowed", Duration::from_secs(10), || {
        get_once(a_web, "/admin") == Some(200)
    });
    assert_eq!(snapshot_version(&b), Some(2));
    // `sigil policy test` without files asks the control plane, and agrees with the sidecar.
    let port = web_port.to_string();
    let ask = |from: &str| {
        cp.sigil(
            &alice,
            &[
                "policy", "test", "--from", from, "--to", B, "--port", &port, "--path", "/admin/x",
            ],
        )
    };
    let (code, out, err) = ask(A);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("policies from the control plane")
            && out.contains("ALLOW: policy b-web rule admin"),
        "{out}"
    );
    let (code, out, err) = ask(D);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("DENY"), "{out}");

    // An invalid policy is refused before anything is stored or pushed.
    let invalid = d.join("invalid.yaml");
    std::fs::write(
        &invalid,
        format!(
            "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {{name: x, owner: o, purpose: p}}\nspec:\n  target: {B}\n  ports:\n    - port: {web_port}\n      routes: [{{name: r, allow: [not-a-spiffe-id]}}]\n"
        ),
    )
    .unwrap();
    let (code, out, err) = cp.sigil(&alice, &["apply", "-f", invalid.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("invalid.yaml:8"), "{err}");
    assert_eq!(snapshot_version(&b), Some(2));

    // A policy the control plane accepts but B cannot run (routes on the port B's config
    // declares tcp): B rejects the version, says why, and keeps serving version 2.
    let bad = d.join("bad.yaml");
    let out = cp.apply(
        &alice,
        &bad,
        &format!(
            "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: b-echo-http, owner: team-b, purpose: a mistake}}
spec:
  target: {B}
  ports:
    - port: {echo_port}
      routes: [{{name: all, allow: [{A}]}}]
"
        ),
    );
    assert!(out.contains("version 3"), "{out}");
    wait_status(&cp, &alice, "sidecar-b", "REJECTED 3");
    let out = status(&cp, &alice);
    assert!(
        out.contains("declares it tcp (inbound.ports)")
            && out.contains("control-plane:Policy/b-echo-http:"),
        "{out}"
    );
    pb.wait_log("snapshot rejected", Duration::from_secs(2));
    assert_eq!(snapshot_version(&b), Some(2));
    assert_eq!(get_once(a_web, "/admin"), Some(200));
    let mut echo = TcpStream::connect(("127.0.0.1", a_echo)).unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ping = |s: &mut TcpStream| {
        use std::io::{Read, Write};
        s.write_all(b"ping\n").is_ok() && {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
        }
    };
    assert!(ping(&mut echo), "echo through A and B failed");
    let (code, metrics, err) = cp.sigil(&alice, &["metrics"]);
    assert_eq!(code, Some(0), "{err}");
    let m = |series: &str, labels: &[&str]| metric(&metrics, series, labels).unwrap_or(-1.0);
    assert_eq!(
        m("sigil_control_sidecars_connected ", &[]),
        2.0,
        "{metrics}"
    );
    assert_eq!(m("sigil_control_snapshot_version ", &[]), 3.0, "{metrics}");
    assert_eq!(
        m(
            "sigil_control_snapshots_rejected_total{",
            &[&format!("spiffe_id=\"{B}\"")]
        ),
        1.0,
        "{metrics}"
    );
    // Both first snapshots and the /admin change were acknowledged and timed.
    assert!(
        m("sigil_control_push_latency_seconds_count", &[]) >= 3.0,
        "{metrics}"
    );
    let (code, out, err) = cp.sigil(&alice, &["delete", "Policy", "b-echo-http"]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_status(&cp, &alice, "sidecar-b", "sent=4 acknowledged");

    // The control plane is killed and comes back: the sidecars serve on, then reconnect. Then
    // a clean restart (SIGTERM, exit 0).
    // A revocation of the control plane's own ID (a mistake) must not cut the sidecars off
    // from the party that can undo it: they reach it with their bootstrap trust.
    let (code, out, err) = cp.sigil(&alice, &["revoke", CONTROL, "--reason", "mistake"]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_status(&cp, &alice, "sidecar-b", "sent=5 acknowledged");
    cp = cp.kill_and_restart();
    pa.wait_log("control plane stream lost", Duration::from_secs(5));
    wait_status(&cp, &alice, "sidecar-a", "acknowledged");
    wait_status(&cp, &alice, "sidecar-b", "sent=5 acknowledged");
    let (code, out, err) = cp.sigil(&alice, &["unrevoke", CONTROL]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_status(&cp, &alice, "sidecar-b", "sent=6 acknowledged");
    cp = cp.restart();
    pa.wait_log("control plane stream lost", Duration::from_secs(5));
    wait_status(&cp, &alice, "sidecar-a", "acknowledged");
    wait_status(&cp, &alice, "sidecar-b", "sent=6 acknowledged");
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(
        failed.is_empty() && ok > 20,
        "steady calls failed: {failed:?} ({ok} ok)\n{}",
        pa.log()
    );

    // Revocation through the CLI: A's live connection is cut, its calls refused, while D's
    // steady calls to B, through its own sidecar subscribed to the same control plane, all
    // succeed; unrevoke readmits A.
    let fd = write_identity(d, "d", &ca, D, &[&ca]);
    let d_web = free_port();
    let mut dd = Sidecar::new("sidecar-d", D);
    dd.outbound = vec![(d_web, b_web, String::new())];
    dd.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-d")));
    let pd = dd.start(d, &fd);
    wait_until("D on B's registry entry", Duration::from_secs(10), || {
        get_once(d_web, "/orders/d") == Some(200)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", d_web)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 20_000 {
                match get(&mut s, "/orders/steady-d") {
                    Some(200) => ok += 1,
                    other => failed.push(other),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let (code, out, err) = cp.sigil(&alice, &["revoke", A, "--reason", "incident 7"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("created Revocation/revoke-example.org-ns-demo-sa-a-"),
        "{out}"
    );
    assert!(
        closed(&mut echo),
        "A's live connection survived its revocation"
    );
    pb.wait_log("incident 7", Duration::from_secs(5));
    let (_, metrics, _) = cp.sigil(&alice, &["metrics"]);
    assert_eq!(
        metric(&metrics, "sigil_control_revocations ", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert_ne!(get_once(a_web, "/orders/2"), Some(200));
    // A's sidecar, revoked, reconnects to a restarted control plane: the one party that can
    // lift its revocation.
    cp = cp.restart();
    wait_status(&cp, &alice, "sidecar-a", "acknowledged");
    let (code, out, err) = cp.sigil(&alice, &["revoke", A]);
    assert_eq!(code, Some(2), "a revocation needs a reason: {out}{err}");
    // Revoking only SVIDs issued before an instant an hour ago: A's current SVID (issued
    // now) is accepted again.
    let hour_ago = rfc3339(now_unix() - 3600);
    let (code, out, err) = cp.sigil(
        &alice,
        &[
            "revoke",
            A,
            "--reason",
            "rebuilt",
            "--issued-before",
            &hour_ago,
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("updated Revocation/"), "{out}");
    wait_until("A's fresh SVID readmitted", Duration::from_secs(10), || {
        get_once(a_web, "/orders/fresh") == Some(200)
    });
    let (code, out, err) = cp.sigil(&alice, &["unrevoke", A]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_until("A readmitted", Duration::from_secs(10), || {
        get_once(a_web, "/orders/3") == Some(200)
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = steady.join().unwrap();
    assert!(
        failed.is_empty() && ok > 20,
        "D's calls failed during A's revocation: {failed:?} ({ok} ok)\n{}",
        pd.log()
    );
    drop(pd);

    // Trust pushed as a TrustBundle: B learns a partner domain's CA. C (partner.org) is refused
    // at the handshake before, and reaches B's policy after (403: the policy does not allow it).
    let partner = Ca::new("partner.org");
    let fc = write_identity(d, "c", &partner, C, &[&partner, &ca]);
    let c_web = free_port();
    let mut c = Sidecar::new("sidecar-c", C);
    c.outbound = vec![(c_web, b_web, B.into())];
    let pc = c.start(d, &fc);
    assert_eq!(get_once(c_web, "/orders/1"), Some(502), "{}", pc.log());
    cp.apply(
        &alice,
        &d.join("partner.yaml"),
        &trust_bundle("partner-org", "partner.org", &partner.bundle_pem()),
    );
    wait_until("B to trust partner.org", Duration::from_secs(10), || {
        get_once(c_web, "/orders/1") == Some(403)
    });
    // A bundle for our own domain that would not verify the sidecars' own SVIDs is rejected
    // by each of them, and changes nothing.
    let out = cp.apply(
        &alice,
        &d.join("wrong-ca.yaml"),
        &trust_bundle("example-org", "example.org", &partner.bundle_pem()),
    );
    let bad_version = out.lines().last().unwrap_or_default().to_string();
    for node in ["sidecar-a", "sidecar-b"] {
        wait_status(
            &cp,
            &alice,
            node,
            "would not verify this sidecar's own SVID",
        );
    }
    assert!(status(&cp, &alice).contains(&bad_version.replace("version ", "REJECTED ")));
    assert_eq!(get_once(a_web, "/orders/5"), Some(200));
    assert_eq!(get_once(c_web, "/orders/1"), Some(403));
    let (code, out, err) = cp.sigil(&alice, &["delete", "TrustBundle", "example-org"]);
    assert_eq!(code, Some(0), "{out}{err}");
    wait_status(&cp, &alice, "sidecar-b", "acknowledged");
    drop(pc);

    // Control plane down, both sidecars restarted: each serves its persisted snapshot (B's
    // web routes, A's registry entry for B and D's revocation exist nowhere else).
    let (code, out, err) = cp.sigil(&alice, &["revoke", D, "--reason", "incident 8"]);
    assert_eq!(code, Some(0), "{out}{err}");
    pb.wait_log("incident 8", Duration::from_secs(5));
    wait_status(&cp, &alice, "sidecar-a", "acknowledged");
    let version = snapshot_version(&b).expect("B has a snapshot");
    wait_until("A on B's version", Duration::from_secs(10), || {
        snapshot_version(&a) == Some(version)
    });
    cp.proc.terminate(Duration::from_secs(10));
    pa.terminate(Duration::from_secs(10));
    pb.terminate(Duration::from_secs(10));
    let pb = b.start(d, &fb);
    let pa = a.start(d, &fa);
    assert_eq!(snapshot_version(&a), Some(version));
    assert_eq!(
        get_once(a_web, "/admin"),
        Some(200),
        "{}\n{}",
        pa.log(),
        pb.log()
    );
    assert_eq!(get_once(a_web, "/orders/4"), Some(200));
    assert!(
        pa.log().contains("serving the last snapshot"),
        "{}",
        pa.log()
    );
    // D, on a sidecar of its own with no control plane, is still refused by B.
    let d_web = free_port();
    let mut d2 = Sidecar::new("sidecar-d2", D);
    d2.outbound = vec![(d_web, b_web, B.into())];
    let pd2 = d2.start(d, &fd);
    assert_eq!(get_once(d_web, "/orders/d"), Some(502), "{}", pd2.log());
    let refused = count(
        &b,
        "sigil_handshake_failures_total{",
        &["direction=\"inbound\"", "reason=\"revoked\""],
    );
    assert!(refused >= 1.0, "{}", b.metrics());
    drop((pa, pb, pd2));
}
