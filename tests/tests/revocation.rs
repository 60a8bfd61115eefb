//! Revocation through real sidecars on loopback: one identity taken off the mesh cuts its
//! live connections (a byte stream and a pooled HTTP/2 connection) and refuses its new
//! handshakes, while another caller's steady traffic loses nothing; `issuedBefore` lets a
//! fresh SVID back in; revoking the destination stops callers from dialling it; a sidecar
//! whose own SVID is revoked stops presenting it.

use std::path::PathBuf;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::SvidSpec;

const REASON: &str = "incident 42: key exfiltrated";

/// The revocation test's mesh: A calls B's web and echo workloads; each of A and B reads a
/// revocation directory; C calls B too, through a sidecar of its own.
struct Mesh {
    c: Caller,
    p: Pair,
    web: Ports,
    rev_a: PathBuf,
    rev_b: PathBuf,
}

impl Mesh {
    fn start() -> Self {
        let (mut s, web, _) = PairSetup::web_and_echo("revocation");
        let (rev_a, rev_b) = (
            resource_dir(s.path(), "revocations-a"),
            resource_dir(s.path(), "revocations-b"),
        );
        s.b.revocation_dir = Some(rev_b.clone());
        s.a.revocation_dir = Some(rev_a.clone());
        let p = s.start();
        let c = p.caller("c", C, |_| {});
        Self {
            c,
            p,
            web,
            rev_a,
            rev_b,
        }
    }
}

#[test]
fn revoking_one_identity_cuts_it_everywhere_and_disturbs_nothing_else() {
    let m = Mesh::start();
    let (p, b) = (&m.p, &m.p.b);
    // A holds a byte stream and a pooled HTTP/2 connection to B.
    let stream = echo_stream(p.a.outbound[1].0, b"\x00ping");
    p.assert_reaches(m.web, "/before");

    // C calls B steadily throughout, on one keep-alive connection (bounded in count and time).
    let load = Steady {
        pause: Duration::ZERO,
        max_calls: 200_000,
        ..Steady::keep_alive(m.c.ports[0], "/steady")
    }
    .start();
    wait_until("C's load to start", Duration::from_secs(5), || {
        count(b, "sigil_requests_total{", &[&peer(C)]) > 10.0
    });

    revoking_a_at_b_cuts_both_of_its_connections(&m, stream);
    // Meanwhile C lost nothing.
    let (ok, failed) = load.stop().tally();
    assert!(
        failed.is_empty() && ok > 10,
        "C's calls failed during the revocation: {failed:?} ({ok} ok)"
    );

    // The workload is rebuilt on a fresh SVID; the revocation now covers only SVIDs issued
    // before the cut-off, so the new one is accepted and the old one stays out.
    let cutoff = now_unix() - 30;
    write_resource(
        &m.rev_b,
        "a.yaml",
        &revocation("revoke-a", A, REASON, Some(cutoff)),
    );
    p.fa.install_svid(
        &p.ca
            .issue(&SvidSpec::new(A).validity(-5, Duration::from_secs(3600))),
    );
    wait_until("A's fresh SVID accepted", Duration::from_secs(10), || {
        get_once(m.web.a_out, "/rebuilt") == Some(200)
    });

    revoking_the_destination_cuts_the_pool_and_a_request_in_flight(&m);
    a_sidecar_whose_own_svid_is_revoked_presents_it_to_nobody(&m);

    // An invalid revocation file is refused with file:line and changes nothing.
    std::fs::remove_file(m.rev_b.join("b.yaml")).unwrap();
    wait_until("B ready again", Duration::from_secs(5), || {
        b.admin_get("/ready").is_some_and(|(s, _)| s == 200)
    });
    write_resource(
        &m.rev_b,
        "bad.yaml",
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {name: x}\nspec:\n  spiffeId: spiffe://example.org\n  reason: r\n",
    );
    p.pb.wait_log("bad.yaml:", Duration::from_secs(5));
    assert_eq!(
        get_once(m.c.ports[0], "/still"),
        Some(200),
        "{}",
        p.pb.log()
    );
}

/// Revoke A at B: both of A's connections are cut, with reason `revoked`, and new handshakes
/// from A are refused: its workload gets 502 from its own sidecar.
fn revoking_a_at_b_cuts_both_of_its_connections(m: &Mesh, mut stream: std::net::TcpStream) {
    let (b, pb) = (&m.p.b, &m.p.pb);
    write_resource(&m.rev_b, "a.yaml", &revocation("revoke-a", A, REASON, None));
    assert!(
        closed(&mut stream),
        "A's byte stream survived its revocation"
    );
    wait_until(
        "both of A's connections cut",
        Duration::from_secs(5),
        || {
            count(
                b,
                "sigil_connections_closed_total{",
                &[&peer(A), "reason=\"revoked\""],
            ) == 2.0
        },
    );
    pb.wait_log(REASON, Duration::from_secs(2));
    assert_eq!(get_once(m.web.a_out, "/after"), Some(502), "{}", pb.log());
    assert!(handshakes_refused(b, "inbound") >= 1.0, "{}", b.metrics());
}

/// `sigil_handshake_failures_total` of `s` in `direction` for reason `revoked`.
fn handshakes_refused(s: &Sidecar, direction: &str) -> f64 {
    count(
        s,
        "sigil_handshake_failures_total{",
        &[&format!("direction=\"{direction}\""), "reason=\"revoked\""],
    )
}

/// `sigil_connections_closed_total` of `s` outbound for reason `revoked`.
fn outbound_cut(s: &Sidecar) -> f64 {
    count(
        s,
        "sigil_connections_closed_total{",
        &["direction=\"outbound\"", "reason=\"revoked\""],
    )
}

/// Revoking the destination: A refuses to dial B, and cuts its pooled connection to it, a
/// request in flight included.
fn revoking_the_destination_cuts_the_pool_and_a_request_in_flight(m: &Mesh) {
    let (a, a_web) = (&m.p.a, m.web.a_out);
    let slow = std::thread::spawn(move || get_once(a_web, "/slow/4000"));
    std::thread::sleep(Duration::from_millis(300));
    write_resource(&m.rev_a, "b.yaml", &revocation("revoke-b", B, REASON, None));
    wait_until(
        "A's pooled connection to B cut",
        Duration::from_secs(5),
        || outbound_cut(a) >= 1.0,
    );
    assert_eq!(get_once(a_web, "/to-revoked"), Some(502));
    assert_ne!(
        slow.join().unwrap(),
        Some(200),
        "a request in flight on the cut pooled connection completed:\n{}",
        m.p.pa.log()
    );
    assert!(handshakes_refused(a, "outbound") >= 1.0, "{}", a.metrics());
}

/// B's own SVID revoked at B: it turns not-ready and presents its SVID to nobody.
fn a_sidecar_whose_own_svid_is_revoked_presents_it_to_nobody(m: &Mesh) {
    let b = &m.p.b;
    write_resource(&m.rev_b, "b.yaml", &revocation("revoke-b", B, REASON, None));
    wait_until("B not ready", Duration::from_secs(5), || {
        b.admin_get("/ready").is_some_and(|(s, _)| s == 503)
    });
    assert_eq!(get_once(m.c.ports[0], "/self-revoked"), Some(502));
    let refused = count(
        b,
        "sigil_connections_refused_total{",
        &["reason=\"self_revoked\""],
    );
    assert!(refused >= 1.0, "{}", b.metrics());
}

/// A peer draining (SIGTERM) sends GOAWAY on the pooled connection; the request in flight runs
/// on. A revocation of that peer meanwhile must still cut it, even once hyper has noticed the
/// GOAWAY (forced here by one more request, which h2 refuses on that connection).
#[test]
fn a_revocation_cuts_a_stream_still_running_after_the_peers_goaway() {
    let (mut s, web) = PairSetup::web("revocation-goaway");
    let rev_a = resource_dir(s.path(), "revocations-a");
    s.b.drain = "20s";
    s.a.revocation_dir = Some(rev_a.clone());
    let p = s.start();
    let (pa, pb, a_web) = (&p.pa, &p.pb, web.a_out);
    p.assert_reaches(web, "/warm");

    let slow = std::thread::spawn(move || get_once(a_web, "/slow/6000"));
    std::thread::sleep(Duration::from_millis(300));
    pb.signal(libc::SIGTERM);
    pb.wait_log("shutting down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    // B takes no new connections while draining: this one gets 502, after hyper has seen the
    // GOAWAY on the pooled connection.
    assert_ne!(get_once(a_web, "/poke"), Some(200));
    write_resource(&rev_a, "b.yaml", &revocation("revoke-b", B, REASON, None));
    assert_ne!(
        slow.join().unwrap(),
        Some(200),
        "the stream ran on after the revocation:\n{}",
        pa.log()
    );
    wait_until("the cut counted", Duration::from_secs(5), || {
        outbound_cut(&p.a) == 1.0
    });
}
