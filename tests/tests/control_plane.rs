//! `sigil-control` pushing to real sidecars: policies and the registry arrive over the gRPC
//! stream and are enforced; a live policy change applies without a restart; a snapshot a
//! sidecar cannot run is rejected (NACK, shown by `sigil status`) while the one in force keeps
//! serving; traffic flows on while the control plane is killed and restarted; `sigil revoke`
//! cuts a live connection and `unrevoke` readmits; a sidecar restarted while the control
//! plane is down serves its persisted snapshot.

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

const PARTNER_C: &str = "spiffe://partner.org/ns/demo/sa/c";
const D: &str = "spiffe://example.org/ns/demo/sa/d";

/// The snapshot version a sidecar runs, from its config dump (None: no snapshot).
fn snapshot_version(s: &Sidecar) -> Option<u64> {
    let (_, dump) = s.admin_get("/config_dump")?;
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
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        let out = status(cp, alice);
        if out
            .lines()
            .any(|l| l.starts_with(&format!("{node} ")) && l.contains(state))
        {
            return Ok(());
        }
        Err(format!(
            "{node} not {state:?} in sigil status:\n{out}\n{}",
            cp.proc.log()
        ))
    })
}

/// `sigil ARGS` must exit `want`: its stdout.
fn sigil_exits(cp: &ControlPlane, alice: &IdentityFiles, want: i32, args: &[&str]) -> String {
    let (code, out, err) = cp.sigil(alice, args);
    assert_eq!(code, Some(want), "{out}{err}");
    out
}

/// The control plane, and A and B subscribed to it: B in front of a web and an echo workload,
/// its echo port pinned to TCP for A in its own config; its web port's routes come only from
/// the control plane. A knows B's web address only from the pushed registry.
struct World {
    /// Replaced by each restart; None only while one runs.
    cp: Option<ControlPlane>,
    p: Pair,
    web: Ports,
    echo: Ports,
    alice: IdentityFiles,
    /// The file `sigil apply` reads the web resources from.
    file: PathBuf,
}

impl World {
    fn start() -> Self {
        let (mut s, web, echo) = PairSetup::web_and_echo("control-plane");
        let d = s.path().to_path_buf();
        let alice = write_identity(&d, "alice", &s.ca, ALICE, &[&s.ca]);
        let cp = ControlPlane::start_in(&d, &s.ca, CONTROL);
        let file = d.join("resources.yaml");
        let out = cp.apply(
            &alice,
            &file,
            &web_resources(&[A, D], B, web.b_in, web.workload, false),
        );
        assert!(out.contains("created Policy/b-web"), "{out}");
        s.b.allow = vec![(echo.workload, vec![A.into()])];
        s.b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
        s.a.outbound[0].2 = String::new();
        s.a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
        let p = s.start();
        poll(Duration::from_secs(10), Duration::from_millis(50), || {
            if snapshot_version(&p.a) == Some(1) && snapshot_version(&p.b) == Some(1) {
                return Ok(());
            }
            Err(format!(
                "no snapshot 1 on both sidecars:\n{}\n{}\n{}",
                p.pa.log(),
                p.pb.log(),
                cp.proc.log()
            ))
        });
        Self {
            cp: Some(cp),
            p,
            web,
            echo,
            alice,
            file,
        }
    }

    fn cp(&self) -> &ControlPlane {
        self.cp.as_ref().expect("a control plane")
    }

    /// Replaces the control plane with what `how` makes of it (a restart).
    fn restart(&mut self, how: impl FnOnce(ControlPlane) -> ControlPlane) {
        let cp = self.cp.take().expect("a control plane");
        self.cp = Some(how(cp));
    }

    fn wait_status(&self, node: &str, state: &str) {
        wait_status(self.cp(), &self.alice, node, state);
    }

    fn sigil(&self, want: i32, args: &[&str]) -> String {
        sigil_exits(self.cp(), &self.alice, want, args)
    }

    fn a_web(&self) -> u16 {
        self.web.a_out
    }
}

#[test]
fn control_plane_pushes_policies_registry_and_revocations_to_sidecars() {
    let mut w = World::start();
    w.wait_status("sidecar-a", "sent=1 acknowledged");
    w.wait_status("sidecar-b", "sent=1 acknowledged");
    let out = status(w.cp(), &w.alice);
    assert!(out.contains(A) && out.contains(B), "{out}");
    // Pushed policy and registry in force.
    w.p.assert_reaches(w.web, "/orders/1");
    assert_eq!(get_once(w.a_web(), "/admin"), Some(403), "{}", w.p.pb.log());

    // Steady traffic on one keep-alive connection from here on (bounded in count and time).
    let load = Steady {
        pause: Duration::from_millis(10),
        limit: Duration::from_secs(90),
        ..Steady::keep_alive(w.a_web(), "/orders/steady")
    }
    .start();
    a_live_policy_change_applies_without_a_restart(&w);
    an_invalid_policy_is_refused_before_it_is_stored(&w);
    let echo = a_policy_b_cannot_run_is_rejected_and_the_last_one_serves(&w);
    sidecars_serve_on_while_the_control_plane_restarts(&mut w);
    let (ok, failed) = load.stop().tally();
    assert!(
        failed.is_empty() && ok > 20,
        "steady calls failed: {failed:?} ({ok} ok)\n{}",
        w.p.pa.log()
    );

    let fd = revocation_through_the_cli_cuts_a_and_spares_d(&mut w, echo);
    trust_bundles_are_pushed_and_a_wrong_one_is_rejected(&w);
    persisted_snapshots_serve_while_the_control_plane_is_down(w, &fd);
}

/// A live policy change: /admin opens for A without a restart. `sigil policy test` without
/// files asks the control plane, and agrees with the sidecar.
fn a_live_policy_change_applies_without_a_restart(w: &World) {
    w.cp().apply(
        &w.alice,
        &w.file,
        &web_resources(&[A, D], B, w.web.b_in, w.web.workload, true),
    );
    wait_until("/admin allowed", Duration::from_secs(10), || {
        get_once(w.a_web(), "/admin") == Some(200)
    });
    assert_eq!(snapshot_version(&w.p.b), Some(2));
    let port = w.web.workload.to_string();
    let ask = |from: &str| {
        w.cp().sigil(
            &w.alice,
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
}

/// An invalid policy is refused before anything is stored or pushed.
fn an_invalid_policy_is_refused_before_it_is_stored(w: &World) {
    let invalid = w.p.path().join("invalid.yaml");
    let ports = format!(
        "    - port: {}\n      routes: [{{name: r, allow: [not-a-spiffe-id]}}]\n",
        w.web.workload
    );
    std::fs::write(&invalid, policy("x", "p", B, &ports)).unwrap();
    let (code, out, err) = w
        .cp()
        .sigil(&w.alice, &["apply", "-f", invalid.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("invalid.yaml:8"), "{err}");
    assert_eq!(snapshot_version(&w.p.b), Some(2));
}

/// A policy the control plane accepts but B cannot run (routes on the port B's config
/// declares tcp): B rejects the version, says why, and keeps serving version 2. Returns a
/// live byte stream from A through B, for the revocation to cut.
fn a_policy_b_cannot_run_is_rejected_and_the_last_one_serves(w: &World) -> TcpStream {
    let ports = format!(
        "    - port: {}\n      routes: [{{name: all, allow: [{A}]}}]\n",
        w.echo.workload
    );
    let out = w.cp().apply(
        &w.alice,
        &w.p.path().join("bad.yaml"),
        &policy("b-echo-http", "a mistake", B, &ports),
    );
    assert!(out.contains("version 3"), "{out}");
    w.wait_status("sidecar-b", "REJECTED 3");
    let out = status(w.cp(), &w.alice);
    assert!(
        out.contains("declares it tcp (inbound.ports)")
            && out.contains("control-plane:Policy/b-echo-http:"),
        "{out}"
    );
    w.p.pb.wait_log("snapshot rejected", Duration::from_secs(2));
    assert_eq!(snapshot_version(&w.p.b), Some(2));
    assert_eq!(get_once(w.a_web(), "/admin"), Some(200));
    let mut echo = connect(w.echo.a_out);
    assert!(echoes(&mut echo, b"ping\n"), "echo through A and B failed");

    let metrics = w.sigil(0, &["metrics"]);
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
    w.sigil(0, &["delete", "Policy", "b-echo-http"]);
    w.wait_status("sidecar-b", "sent=4 acknowledged");
    echo
}

/// The control plane is killed and comes back: the sidecars serve on, then reconnect. Then a
/// clean restart (SIGTERM, exit 0). A revocation of the control plane's own ID (a mistake)
/// must not cut the sidecars off from the party that can undo it: they reach it with their
/// bootstrap trust.
fn sidecars_serve_on_while_the_control_plane_restarts(w: &mut World) {
    w.sigil(0, &["revoke", CONTROL, "--reason", "mistake"]);
    w.wait_status("sidecar-b", "sent=5 acknowledged");
    resubscribed_after(w, ControlPlane::kill_and_restart, "sent=5 acknowledged");
    w.sigil(0, &["unrevoke", CONTROL]);
    w.wait_status("sidecar-b", "sent=6 acknowledged");
    resubscribed_after(w, ControlPlane::restart, "sent=6 acknowledged");
}

/// Restarts the control plane `how`; A notices, then both sidecars are back, B in `b_state`.
fn resubscribed_after(w: &mut World, how: fn(ControlPlane) -> ControlPlane, b_state: &str) {
    w.restart(how);
    w.p.pa
        .wait_log("control plane stream lost", Duration::from_secs(5));
    w.wait_status("sidecar-a", "acknowledged");
    w.wait_status("sidecar-b", b_state);
}

/// Revocation through the CLI: A's live connection is cut, its calls refused, while D's
/// steady calls to B, through its own sidecar subscribed to the same control plane, all
/// succeed; unrevoke readmits A. Returns D's identity files.
fn revocation_through_the_cli_cuts_a_and_spares_d(
    w: &mut World,
    mut echo: TcpStream,
) -> IdentityFiles {
    let d = w.p.path().to_path_buf();
    let fd = write_identity(&d, "d", &w.p.ca, D, &[&w.p.ca]);
    let d_web = free_port();
    let mut dd = Sidecar::new("sidecar-d", D);
    dd.outbound = vec![(d_web, w.web.b_in, String::new())];
    dd.control_plane = Some((w.cp().sidecar_port, CONTROL.into(), d.join("state-d")));
    let pd = dd.start(&d, &fd);
    wait_until("D on B's registry entry", Duration::from_secs(10), || {
        get_once(d_web, "/orders/d") == Some(200)
    });
    let steady = Steady {
        pause: Duration::from_millis(5),
        ..Steady::keep_alive(d_web, "/orders/steady-d")
    }
    .start();
    std::thread::sleep(Duration::from_millis(200));
    let out = w.sigil(0, &["revoke", A, "--reason", "incident 7"]);
    assert!(
        out.contains("created Revocation/revoke-example.org-ns-demo-sa-a-"),
        "{out}"
    );
    assert!(
        closed(&mut echo),
        "A's live connection survived its revocation"
    );
    w.p.pb.wait_log("incident 7", Duration::from_secs(5));
    let (_, metrics, _) = w.cp().sigil(&w.alice, &["metrics"]);
    assert_eq!(
        metric(&metrics, "sigil_control_revocations ", &[]),
        Some(1.0),
        "{metrics}"
    );
    assert_ne!(get_once(w.a_web(), "/orders/2"), Some(200));
    // A's sidecar, revoked, reconnects to a restarted control plane: the one party that can
    // lift its revocation.
    w.restart(ControlPlane::restart);
    w.wait_status("sidecar-a", "acknowledged");
    let (code, out, err) = w.cp().sigil(&w.alice, &["revoke", A]);
    assert_eq!(code, Some(2), "a revocation needs a reason: {out}{err}");
    // Revoking only SVIDs issued before an instant an hour ago: A's current SVID (issued
    // now) is accepted again.
    let hour_ago = rfc3339(now_unix() - 3600);
    let out = w.sigil(
        0,
        &[
            "revoke",
            A,
            "--reason",
            "rebuilt",
            "--issued-before",
            &hour_ago,
        ],
    );
    assert!(out.contains("updated Revocation/"), "{out}");
    wait_until("A's fresh SVID readmitted", Duration::from_secs(10), || {
        get_once(w.a_web(), "/orders/fresh") == Some(200)
    });
    w.sigil(0, &["unrevoke", A]);
    wait_until("A readmitted", Duration::from_secs(10), || {
        get_once(w.a_web(), "/orders/3") == Some(200)
    });
    let (ok, failed) = steady.stop().tally();
    assert!(
        failed.is_empty() && ok > 20,
        "D's calls failed during A's revocation: {failed:?} ({ok} ok)\n{}",
        pd.log()
    );
    fd
}

/// Trust pushed as a TrustBundle: B learns a partner domain's CA. C (partner.org) is refused
/// at the handshake before, and reaches B's policy after (403: the policy does not allow it).
/// A bundle for our own domain that would not verify the sidecars' own SVIDs is rejected by
/// each of them, and changes nothing.
fn trust_bundles_are_pushed_and_a_wrong_one_is_rejected(w: &World) {
    let d = w.p.path();
    let partner = Ca::new("partner.org");
    let fc = write_identity(d, "c", &partner, PARTNER_C, &[&partner, &w.p.ca]);
    let c_web = free_port();
    let mut c = Sidecar::new("sidecar-c", PARTNER_C);
    c.outbound = vec![(c_web, w.web.b_in, B.into())];
    let pc = c.start(d, &fc);
    assert_eq!(get_once(c_web, "/orders/1"), Some(502), "{}", pc.log());
    w.cp().apply(
        &w.alice,
        &d.join("partner.yaml"),
        &trust_bundle("partner-org", "partner.org", &partner.bundle_pem()),
    );
    wait_until("B to trust partner.org", Duration::from_secs(10), || {
        get_once(c_web, "/orders/1") == Some(403)
    });
    let out = w.cp().apply(
        &w.alice,
        &d.join("wrong-ca.yaml"),
        &trust_bundle("example-org", "example.org", &partner.bundle_pem()),
    );
    let bad_version = out.lines().last().unwrap_or_default().to_string();
    for node in ["sidecar-a", "sidecar-b"] {
        w.wait_status(node, "would not verify this sidecar's own SVID");
    }
    assert!(status(w.cp(), &w.alice).contains(&bad_version.replace("version ", "REJECTED ")));
    assert_eq!(get_once(w.a_web(), "/orders/5"), Some(200));
    assert_eq!(get_once(c_web, "/orders/1"), Some(403));
    w.sigil(0, &["delete", "TrustBundle", "example-org"]);
    w.wait_status("sidecar-b", "acknowledged");
}

/// Control plane down, both sidecars restarted: each serves its persisted snapshot (B's web
/// routes, A's registry entry for B and D's revocation exist nowhere else).
fn persisted_snapshots_serve_while_the_control_plane_is_down(mut w: World, fd: &IdentityFiles) {
    w.sigil(0, &["revoke", D, "--reason", "incident 8"]);
    w.p.pb.wait_log("incident 8", Duration::from_secs(5));
    w.wait_status("sidecar-a", "acknowledged");
    let version = snapshot_version(&w.p.b).expect("B has a snapshot");
    wait_until("A on B's version", Duration::from_secs(10), || {
        snapshot_version(&w.p.a) == Some(version)
    });
    let mut cp = w.cp.take().expect("a control plane");
    cp.proc.terminate(Duration::from_secs(10));
    let p = &mut w.p;
    p.pa.terminate(Duration::from_secs(10));
    p.pb.terminate(Duration::from_secs(10));
    p.pb = p.b.start(p.dir.path(), &p.fb);
    p.pa = p.a.start(p.dir.path(), &p.fa);
    let a_web = w.web.a_out;
    assert_eq!(snapshot_version(&p.a), Some(version));
    assert_eq!(
        get_once(a_web, "/admin"),
        Some(200),
        "{}\n{}",
        p.pa.log(),
        p.pb.log()
    );
    assert_eq!(get_once(a_web, "/orders/4"), Some(200));
    assert!(
        p.pa.log().contains("serving the last snapshot"),
        "{}",
        p.pa.log()
    );
    // D, on a sidecar of its own with no control plane, is still refused by B.
    let d_web = free_port();
    let mut d2 = Sidecar::new("sidecar-d2", D);
    d2.outbound = vec![(d_web, w.web.b_in, B.into())];
    let pd2 = d2.start(p.dir.path(), fd);
    assert_eq!(get_once(d_web, "/orders/d"), Some(502), "{}", pd2.log());
    let refused = count(
        &p.b,
        "sigil_handshake_failures_total{",
        &["direction=\"inbound\"", "reason=\"revoked\""],
    );
    assert!(refused >= 1.0, "{}", p.b.metrics());
}
