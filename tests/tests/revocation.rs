//! Revocation through real sidecars on loopback: one identity taken off the mesh cuts its
//! live connections (a byte stream and a pooled HTTP/2 connection) and refuses its new
//! handshakes, while another caller's steady traffic loses nothing; `issuedBefore` lets a
//! fresh SVID back in; revoking the destination stops callers from dialling it; a sidecar
//! whose own SVID is revoked stops presenting it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_e2e::*;
use sigil_testkit::{Ca, SvidSpec};

const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";
const C: &str = "spiffe://example.org/ns/demo/sa/c";

fn revocation(name: &str, id: &str, issued_before: Option<i64>) -> String {
    let mut y = format!(
        "apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {{name: {name}, owner: secops}}\n\
         spec:\n  spiffeId: {id}\n  reason: \"incident 42: key exfiltrated\"\n"
    );
    if let Some(t) = issued_before {
        y += &format!("  issuedBefore: {}\n", rfc3339(t));
    }
    y
}

#[test]
fn revoking_one_identity_cuts_it_everywhere_and_disturbs_nothing_else() {
    let dir = TempDir::new("revocation");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_web, web_port) = start_workload("b", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let fc = write_identity(d, "c", &ca, C, &[&ca]);
    let (rev_a, rev_b) = (d.join("revocations-a"), d.join("revocations-b"));
    std::fs::create_dir_all(&rev_a).unwrap();
    std::fs::create_dir_all(&rev_b).unwrap();

    let (b_web, b_echo) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port), (b_echo, echo_port)];
    b.revocation_dir = Some(rev_b.clone());
    let pb = b.start(d, &fb);
    let (a_web, a_echo) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into()), (a_echo, b_echo, B.into())];
    a.revocation_dir = Some(rev_a.clone());
    let pa = a.start(d, &fa);
    let c_web = free_port();
    let mut c = Sidecar::new("sidecar-c", C);
    c.outbound = vec![(c_web, b_web, B.into())];
    let _pc = c.start(d, &fc);

    // A holds a byte stream and a pooled HTTP/2 connection to B.
    let mut stream = TcpStream::connect(("127.0.0.1", a_echo)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"\x00ping").unwrap();
    stream.read_exact(&mut [0u8; 5]).unwrap();
    assert_eq!(get_once(a_web, "/before"), Some(200), "{}", pa.log());

    // C calls B steadily throughout, on one keep-alive connection (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", c_web)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok < 200_000 {
                match get(&mut s, "/steady") {
                    Some(200) => ok += 1,
                    other => failed.push(other),
                }
            }
            (ok, failed)
        })
    };
    wait_until("C's load to start", Duration::from_secs(5), || {
        count(&b, "sigil_requests_total{", &[&format!("peer_id=\"{C}\"")]) > 10.0
    });

    // Revoke A at B: both of A's connections are cut, with reason `revoked`.
    write_atomic(
        &rev_b.join("a.yaml"),
        revocation("revoke-a", A, None).as_bytes(),
    );
    assert!(
        closed(&mut stream),
        "A's byte stream survived its revocation"
    );
    let revoked_a = |s: &Sidecar| {
        count(
            s,
            "sigil_connections_closed_total{",
            &[&format!("peer_id=\"{A}\""), "reason=\"revoked\""],
        )
    };
    wait_until(
        "both of A's connections cut",
        Duration::from_secs(5),
        || revoked_a(&b) == 2.0,
    );
    pb.wait_log("incident 42: key exfiltrated", Duration::from_secs(2));
    // New handshakes from A are refused: its workload gets 502 from its own sidecar.
    assert_eq!(get_once(a_web, "/after"), Some(502), "{}", pb.log());
    let refused = count(
        &b,
        "sigil_handshake_failures_total{",
        &["direction=\"inbound\"", "reason=\"revoked\""],
    );
    assert!(refused >= 1.0, "{}", b.metrics());

    // Meanwhile C lost nothing.
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(
        failed.is_empty() && ok > 10,
        "C's calls failed during the revocation: {failed:?} ({ok} ok)"
    );

    // The workload is rebuilt on a fresh SVID; the revocation now covers only SVIDs issued
    // before the cut-off, so the new one is accepted and the old one stays out.
    let cutoff = now_unix() - 30;
    write_atomic(
        &rev_b.join("a.yaml"),
        revocation("revoke-a", A, Some(cutoff)).as_bytes(),
    );
    let fresh = ca.issue(&SvidSpec::new(A).validity(-5, Duration::from_secs(3600)));
    write_atomic(&fa.key, fresh.key_pem().as_bytes());
    write_atomic(&fa.cert, fresh.chain_pem().as_bytes());
    wait_until("A's fresh SVID accepted", Duration::from_secs(10), || {
        get_once(a_web, "/rebuilt") == Some(200)
    });

    // Revoking the destination: A refuses to dial B, and cuts its pooled connection to it,
    // a request in flight included.
    let slow = std::thread::spawn(move || get_once(a_web, "/slow/4000"));
    std::thread::sleep(Duration::from_millis(300));
    write_atomic(
        &rev_a.join("b.yaml"),
        revocation("revoke-b", B, None).as_bytes(),
    );
    wait_until(
        "A's pooled connection to B cut",
        Duration::from_secs(5),
        || {
            count(
                &a,
                "sigil_connections_closed_total{",
                &["direction=\"outbound\"", "reason=\"revoked\""],
            ) >= 1.0
        },
    );
    assert_eq!(get_once(a_web, "/to-revoked"), Some(502));
    assert_ne!(
        slow.join().unwrap(),
        Some(200),
        "a request in flight on the cut pooled connection completed:\n{}",
        pa.log()
    );
    let refused = count(
        &a,
        "sigil_handshake_failures_total{",
        &["direction=\"outbound\"", "reason=\"revoked\""],
    );
    assert!(refused >= 1.0, "{}", a.metrics());

    // B's own SVID revoked at B: it turns not-ready and presents its SVID to nobody.
    write_atomic(
        &rev_b.join("b.yaml"),
        revocation("revoke-b", B, None).as_bytes(),
    );
    let admin = ([127, 0, 0, 1], b.admin).into();
    wait_until("B not ready", Duration::from_secs(5), || {
        http_get(admin, "/ready").is_some_and(|(s, _)| s == 503)
    });
    assert_eq!(get_once(c_web, "/self-revoked"), Some(502));
    let refused = count(
        &b,
        "sigil_connections_refused_total{",
        &["reason=\"self_revoked\""],
    );
    assert!(refused >= 1.0, "{}", b.metrics());

    // An invalid revocation file is refused with file:line and changes nothing.
    std::fs::remove_file(rev_b.join("b.yaml")).unwrap();
    wait_until("B ready again", Duration::from_secs(5), || {
        http_get(admin, "/ready").is_some_and(|(s, _)| s == 200)
    });
    write_atomic(
        &rev_b.join("bad.yaml"),
        b"apiVersion: sigil.dev/v1\nkind: Revocation\nmetadata: {name: x}\nspec:\n  spiffeId: spiffe://example.org\n  reason: r\n",
    );
    pb.wait_log("bad.yaml:", Duration::from_secs(5));
    assert_eq!(get_once(c_web, "/still"), Some(200), "{}", pb.log());
    drop(pa);
}

/// A peer draining (SIGTERM) sends GOAWAY on the pooled connection; the request in flight runs
/// on. A revocation of that peer meanwhile must still cut it, even once hyper has noticed the
/// GOAWAY (forced here by one more request, which h2 refuses on that connection).
#[test]
fn a_revocation_cuts_a_stream_still_running_after_the_peers_goaway() {
    let dir = TempDir::new("revocation-goaway");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_web, web_port) = start_workload("b", false);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let rev_a = d.join("revocations-a");
    std::fs::create_dir_all(&rev_a).unwrap();
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.drain = "20s";
    let pb = b.start(d, &fb);
    let a_web = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into())];
    a.revocation_dir = Some(rev_a.clone());
    let pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/warm"), Some(200), "{}", pa.log());

    let slow = std::thread::spawn(move || get_once(a_web, "/slow/6000"));
    std::thread::sleep(Duration::from_millis(300));
    pb.signal(libc::SIGTERM);
    pb.wait_log("shutting down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    // B takes no new connections while draining: this one gets 502, after hyper has seen the
    // GOAWAY on the pooled connection.
    assert_ne!(get_once(a_web, "/poke"), Some(200));
    write_atomic(
        &rev_a.join("b.yaml"),
        revocation("revoke-b", B, None).as_bytes(),
    );
    assert_ne!(
        slow.join().unwrap(),
        Some(200),
        "the stream ran on after the revocation:\n{}",
        pa.log()
    );
    wait_until("the cut counted", Duration::from_secs(5), || {
        count(
            &a,
            "sigil_connections_closed_total{",
            &["direction=\"outbound\"", "reason=\"revoked\""],
        ) == 1.0
    });
    drop(pb);
}
