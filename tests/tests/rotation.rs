//! Rotation under traffic, and graceful shutdown, through a real sidecar pair.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::{Ca, Svid};

/// Writes in place, in two halves with a pause: a reader can see a truncated file.
fn write_in_place(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    f.flush().unwrap();
    thread::sleep(Duration::from_millis(300));
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
}

/// The leaf certificate B's inbound listener presents now, via openssl s_client.
fn served_leaf(dir: &Path, port: u16, client: &Svid) -> String {
    let (crt, key) = client.write(dir, "probe");
    // stdout alone: s_client's stderr chatter would interleave with the PEM text. With stdin
    // closed it exits right after the handshake (bounded by B's handshake timeout).
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-showcerts",
        ])
        .arg("-cert")
        .arg(crt)
        .arg("-key")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let out = String::from_utf8_lossy(&output.stdout);
    let start = out
        .find("-----BEGIN CERTIFICATE-----")
        .expect("server cert in output");
    let end = out[start..].find("-----END CERTIFICATE-----").unwrap() + start;
    out[start..end].replace(['\n', '\r'], "")
}

fn leaf_pem(svid: &Svid) -> String {
    let pem = svid.chain_pem();
    let end = pem.find("-----END CERTIFICATE-----").unwrap();
    pem[..end].replace(['\n', '\r'], "")
}

/// A long-lived connection through `port` to an echo workload, echoing a line every 50 ms
/// (counted in `echoes`) until `stop`; its error, if it was cut or corrupted.
fn long_lived_echo(
    port: u16,
    stop: Arc<AtomicBool>,
    echoes: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<(), String>> {
    thread::spawn(move || -> Result<(), String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        for i in 0..20_000u32 {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let msg = format!("ping {i:08}\n");
            s.write_all(msg.as_bytes())
                .map_err(|e| format!("write {i}: {e}"))?;
            s.read_exact(&mut buf[..msg.len()])
                .map_err(|e| format!("read {i}: {e}"))?;
            if &buf[..msg.len()] != msg.as_bytes() {
                return Err(format!("echo {i} corrupted"));
            }
            echoes.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
}

/// Waits until `load` has made `more` successful calls beyond what it had.
fn wait_for_more_calls(what: &str, load: &Load, more: u64) {
    let before = load.ok();
    wait_until(what, Duration::from_secs(5), || load.ok() > before + more);
}

#[test]
fn rotation_under_traffic_loses_nothing_and_bundle_removal_cuts_the_old_peer() {
    if !require_tool("openssl", "rotation") {
        return;
    }
    let (mut s, web, echo) = PairSetup::web_and_echo("rotation");
    s.b.allow = vec![
        (echo.workload, vec![A.into()]),
        (web.workload, vec![A.into()]),
    ];
    let p = s.start();

    // A long-lived connection, and a request loop: every request on a new connection, so
    // each one is a new handshake.
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let long_lived = long_lived_echo(echo.a_out, stop.clone(), echoes.clone());
    let requests = Steady {
        body: "hello from b",
        limit: Duration::from_secs(120),
        max_calls: 5_000,
        ..Steady::fresh(web.a_out, "/")
    }
    .start();
    wait_until("traffic to start", Duration::from_secs(10), || {
        requests.ok() > 5 && echoes.load(Ordering::Relaxed) > 5
    });

    let (new_a, new_b) = new_svids_from_the_same_ca(&p, web);
    a_corrupt_svid_is_refused_and_the_good_one_served(&p, web, &new_a, &new_b);
    let ca2 = bundle_rotation_to_a_new_ca(&p, web, &requests);

    // Nothing failed so far, and the long-lived connection is still echoing.
    assert_eq!(
        requests.failed(),
        0,
        "requests failed during rotation:\n{}",
        p.pb.log()
    );
    let echoed = echoes.load(Ordering::Relaxed);
    wait_until("more echoes", Duration::from_secs(5), || {
        echoes.load(Ordering::Relaxed) > echoed + 3
    });

    // Step 4. Drop CA1 from the bundles: the long-lived connection was made with CA1 SVIDs, so
    // its peers no longer verify and it is closed; new connections are unaffected.
    p.fb.trust(&ca2);
    p.fa.trust(&ca2);
    let res = long_lived.join().unwrap();
    assert!(res.is_err(), "the CA1 connection survived CA1's removal");
    // Both sidecars re-verify; whichever polls its bundle first closes the connection and the
    // other sees it end normally.
    let cut = |s: &Sidecar| {
        count(
            s,
            "sigil_connections_closed_total{",
            &["reason=\"bundle_change\""],
        )
    };
    wait_until(
        "bundle_change close counted",
        Duration::from_secs(5),
        || cut(&p.a) + cut(&p.b) >= 1.0,
    );
    assert!(
        p.pa.log().contains("no longer verifies") || p.pb.log().contains("no longer verifies"),
        "no sidecar logged the closure"
    );
    wait_for_more_calls("requests after CA1 removal", &requests, 3);
    stop.store(true, Ordering::Relaxed);
    let (_, failed) = requests.stop().tally();
    assert_eq!(failed.len(), 0, "requests failed:\n{}", p.pb.log());
}

/// Step 1. New SVIDs from the same CA: B's by rename, A's in place (cert, then key).
/// Returns them (A's, B's).
fn new_svids_from_the_same_ca(p: &Pair, web: Ports) -> (Svid, Svid) {
    let (a, b) = (&p.a, &p.b);
    let (b_ok, a_ok) = (reloads(b, "svid", "success"), reloads(a, "svid", "success"));
    let new_b = p.ca.svid(B);
    p.fb.install_svid(&new_b);
    let new_a = p.ca.svid(A);
    write_in_place(&p.fa.cert, new_a.chain_pem().as_bytes());
    write_in_place(&p.fa.key, new_a.key_pem().as_bytes());
    wait_until("both SVID reloads", Duration::from_secs(5), || {
        reloads(b, "svid", "success") > b_ok && reloads(a, "svid", "success") > a_ok
    });
    assert_eq!(
        served_leaf(p.path(), web.b_in, &new_a),
        leaf_pem(&new_b),
        "B still serves its old SVID"
    );
    (new_a, new_b)
}

/// Step 2. A corrupt SVID file is refused and counted; B keeps serving the good one.
fn a_corrupt_svid_is_refused_and_the_good_one_served(
    p: &Pair,
    web: Ports,
    new_a: &Svid,
    new_b: &Svid,
) {
    let b_fail = reloads(&p.b, "svid", "failure");
    write_atomic(
        &p.fb.cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    wait_until("the refused reload", Duration::from_secs(5), || {
        reloads(&p.b, "svid", "failure") > b_fail
    });
    p.pb.wait_log("SVID update refused", Duration::from_secs(2));
    assert_eq!(served_leaf(p.path(), web.b_in, new_a), leaf_pem(new_b));
    write_atomic(&p.fb.cert, new_b.chain_pem().as_bytes());
}

/// Step 3. Bundle rotation to a new CA: trust both, move the SVIDs to CA2. Returns CA2.
fn bundle_rotation_to_a_new_ca(p: &Pair, web: Ports, requests: &Load) -> Ca {
    let (a, b) = (&p.a, &p.b);
    let ca2 = Ca::new("example.org");
    let both = format!("{}{}", p.ca.bundle_pem(), ca2.bundle_pem());
    let (bb, ab) = (
        reloads(b, "bundle", "success"),
        reloads(a, "bundle", "success"),
    );
    write_in_place(&p.fb.bundle("example.org"), both.as_bytes());
    write_atomic(&p.fa.bundle("example.org"), both.as_bytes());
    wait_until("bundle reloads", Duration::from_secs(5), || {
        reloads(b, "bundle", "success") > bb && reloads(a, "bundle", "success") > ab
    });
    let (b2, a2) = (ca2.svid(B), ca2.svid(A));
    let (b_ok, a_ok) = (reloads(b, "svid", "success"), reloads(a, "svid", "success"));
    p.fb.install_svid(&b2);
    p.fa.install_svid(&a2);
    wait_until("CA2 SVIDs", Duration::from_secs(5), || {
        reloads(b, "svid", "success") > b_ok && reloads(a, "svid", "success") > a_ok
    });
    assert_eq!(served_leaf(p.path(), web.b_in, &a2), leaf_pem(&b2));
    wait_for_more_calls("requests on CA2 SVIDs", requests, 5);
    ca2
}

#[test]
fn sigterm_stops_accepting_drains_then_exits_zero() {
    let mut setup = PairSetup::new("drain");
    let echo = setup.workload("echo", true);
    setup.b.drain = "2s";
    let mut p = setup.start();
    let (b, b_in, a_out) = (&p.b, echo.b_in, echo.a_out);

    let mut s = TcpStream::connect(("127.0.0.1", a_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"one\n\n").unwrap();
    s.read_exact(&mut buf).unwrap();

    p.pb.signal(libc::SIGTERM);
    p.pb.wait_log("draining", Duration::from_secs(5));
    // No new connections: the listener is closed.
    wait_until("listener closed", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", b_in)).is_err()
    });
    assert_ne!(b.admin_get("/ready").map(|r| r.0), Some(200));
    // The live connection still works during the drain window.
    s.write_all(b"two\n\n").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two\n\n");
    // It outlives the 2 s deadline, so B cuts it and exits 0.
    let code = p.pb.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", p.pb.log());
    assert!(
        p.pb.log().contains("drain deadline passed"),
        "{}",
        p.pb.log()
    );
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection still open after B exited");
}

#[test]
fn ready_turns_503_when_the_svid_expires_and_200_after_rotation() {
    let dir = TempDir::new("expiry");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_w, port) = start_workload("w", false);
    let files = write_identity(d, "b", &ca, B, &[&ca]);
    // An SVID that expires a few seconds from now.
    let short = ca.issue(&sigil_testkit::SvidSpec::new(B).validity(-60, Duration::from_secs(64)));
    std::fs::write(&files.cert, short.chain_pem()).unwrap();
    std::fs::write(&files.key, short.key_pem()).unwrap();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(free_port(), port)];
    let pb = b.start(d, &files);
    let ready = || b.admin_get("/ready");
    wait_until(
        "/ready to fail after expiry",
        Duration::from_secs(15),
        || ready().is_some_and(|(s, body)| s == 503 && body.contains("no valid SVID")),
    );
    files.install_svid(&ca.svid(B));
    wait_until("/ready after rotation", Duration::from_secs(5), || {
        ready().is_some_and(|(s, _)| s == 200)
    });
    drop(pb);
}
