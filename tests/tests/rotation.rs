//! Rotation under traffic, and graceful shutdown, through a real sidecar pair.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sigil_e2e::*;
use sigil_testkit::{Ca, Svid};

const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";

/// Writes in place, in two halves with a pause: a reader can see a truncated file.
fn write_in_place(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    f.flush().unwrap();
    thread::sleep(Duration::from_millis(300));
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
}

fn reloads(s: &Sidecar, resource: &str, result: &str) -> f64 {
    metric(
        &s.metrics(),
        "sigil_reloads_total{",
        &[
            &format!("resource=\"{resource}\""),
            &format!("result=\"{result}\""),
        ],
    )
    .unwrap_or(0.0)
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

#[test]
fn rotation_under_traffic_loses_nothing_and_bundle_removal_cuts_the_old_peer() {
    if !require_tool("openssl", "rotation") {
        return;
    }
    let dir = TempDir::new("rotation");
    let d = dir.path();
    let ca1 = Ca::new("example.org");
    let (_echo, echo_port) = start_workload("b-echo", true);
    let (_web, web_port) = start_workload("b", false);
    let fa = write_identity(d, "a", &ca1, A, &[&ca1]);
    let fb = write_identity(d, "b", &ca1, B, &[&ca1]);

    let (b_echo, b_web) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_echo, echo_port), (b_web, web_port)];
    b.allow = vec![(echo_port, vec![A.into()]), (web_port, vec![A.into()])];
    let pb = b.start(d, &fb);
    let (a_echo, a_web) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_echo, b_echo, B.into()), (a_web, b_web, B.into())];
    let pa = a.start(d, &fa);

    // A long-lived connection, echoing a line every 50 ms until it is closed.
    let stop = Arc::new(AtomicBool::new(false));
    let echoes = Arc::new(AtomicU64::new(0));
    let long_lived = {
        let (stop, echoes) = (stop.clone(), echoes.clone());
        thread::spawn(move || -> Result<(), String> {
            let mut s = TcpStream::connect(("127.0.0.1", a_echo)).map_err(|e| e.to_string())?;
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
    };
    // A request loop: every request on a new connection, so each one is a new handshake.
    let (ok_reqs, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loop_stop = Arc::new(AtomicBool::new(false));
    let requests = {
        let (stop, ok_reqs, failed) = (loop_stop.clone(), ok_reqs.clone(), failed.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                match http_get(([127, 0, 0, 1], a_web).into(), "/") {
                    Some((200, body)) if body.contains("hello from b") => {
                        ok_reqs.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    wait_until("traffic to start", Duration::from_secs(10), || {
        ok_reqs.load(Ordering::Relaxed) > 5 && echoes.load(Ordering::Relaxed) > 5
    });

    // 1. New SVIDs from the same CA: B's by rename, A's in place (cert, then key).
    let (b_ok, a_ok) = (
        reloads(&b, "svid", "success"),
        reloads(&a, "svid", "success"),
    );
    let new_b = ca1.svid(B);
    write_atomic(&fb.key, new_b.key_pem().as_bytes());
    write_atomic(&fb.cert, new_b.chain_pem().as_bytes());
    let new_a = ca1.svid(A);
    write_in_place(&fa.cert, new_a.chain_pem().as_bytes());
    write_in_place(&fa.key, new_a.key_pem().as_bytes());
    wait_until("both SVID reloads", Duration::from_secs(5), || {
        reloads(&b, "svid", "success") > b_ok && reloads(&a, "svid", "success") > a_ok
    });
    assert_eq!(
        served_leaf(d, b_web, &new_a),
        leaf_pem(&new_b),
        "B still serves its old SVID"
    );

    // 2. A corrupt SVID file is refused and counted; B keeps serving the good one.
    let b_fail = reloads(&b, "svid", "failure");
    write_atomic(
        &fb.cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    wait_until("the refused reload", Duration::from_secs(5), || {
        reloads(&b, "svid", "failure") > b_fail
    });
    pb.wait_log("SVID update refused", Duration::from_secs(2));
    assert_eq!(served_leaf(d, b_web, &new_a), leaf_pem(&new_b));
    write_atomic(&fb.cert, new_b.chain_pem().as_bytes());

    // 3. Bundle rotation to a new CA: trust both, move the SVIDs to CA2.
    let ca2 = Ca::new("example.org");
    let both = format!("{}{}", ca1.bundle_pem(), ca2.bundle_pem());
    let bundle_b = fb.bundle_dir.join("example.org.pem");
    let bundle_a = fa.bundle_dir.join("example.org.pem");
    let (bb, ab) = (
        reloads(&b, "bundle", "success"),
        reloads(&a, "bundle", "success"),
    );
    write_in_place(&bundle_b, both.as_bytes());
    write_atomic(&bundle_a, both.as_bytes());
    wait_until("bundle reloads", Duration::from_secs(5), || {
        reloads(&b, "bundle", "success") > bb && reloads(&a, "bundle", "success") > ab
    });
    let (b2, a2) = (ca2.svid(B), ca2.svid(A));
    let (b_ok, a_ok) = (
        reloads(&b, "svid", "success"),
        reloads(&a, "svid", "success"),
    );
    write_atomic(&fb.key, b2.key_pem().as_bytes());
    write_atomic(&fb.cert, b2.chain_pem().as_bytes());
    write_atomic(&fa.key, a2.key_pem().as_bytes());
    write_atomic(&fa.cert, a2.chain_pem().as_bytes());
    wait_until("CA2 SVIDs", Duration::from_secs(5), || {
        reloads(&b, "svid", "success") > b_ok && reloads(&a, "svid", "success") > a_ok
    });
    assert_eq!(served_leaf(d, b_web, &a2), leaf_pem(&b2));
    let ok_before = ok_reqs.load(Ordering::Relaxed);
    wait_until("requests on CA2 SVIDs", Duration::from_secs(5), || {
        ok_reqs.load(Ordering::Relaxed) > ok_before + 5
    });

    // Nothing failed so far, and the long-lived connection is still echoing.
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation:\n{}",
        pb.log()
    );
    let echoed = echoes.load(Ordering::Relaxed);
    wait_until("more echoes", Duration::from_secs(5), || {
        echoes.load(Ordering::Relaxed) > echoed + 3
    });

    // 4. Drop CA1 from the bundles: the long-lived connection was made with CA1 SVIDs, so
    // its peers no longer verify and it is closed; new connections are unaffected.
    write_atomic(&bundle_b, ca2.bundle_pem().as_bytes());
    write_atomic(&bundle_a, ca2.bundle_pem().as_bytes());
    let res = long_lived.join().unwrap();
    assert!(res.is_err(), "the CA1 connection survived CA1's removal");
    // Both sidecars re-verify; whichever polls its bundle first closes the connection and the
    // other sees it end normally.
    let cut = |s: &Sidecar| {
        metric(
            &s.metrics(),
            "sigil_connections_closed_total{",
            &["reason=\"bundle_change\""],
        )
        .unwrap_or(0.0)
    };
    wait_until(
        "bundle_change close counted",
        Duration::from_secs(5),
        || cut(&a) + cut(&b) >= 1.0,
    );
    assert!(
        pa.log().contains("no longer verifies") || pb.log().contains("no longer verifies"),
        "no sidecar logged the closure"
    );
    let ok_before = ok_reqs.load(Ordering::Relaxed);
    wait_until("requests after CA1 removal", Duration::from_secs(5), || {
        ok_reqs.load(Ordering::Relaxed) > ok_before + 3
    });
    loop_stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    requests.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed:\n{}",
        pb.log()
    );
    drop((pa, pb));
}

#[test]
fn sigterm_stops_accepting_drains_then_exits_zero() {
    let dir = TempDir::new("drain");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_echo, echo_port) = start_workload("echo", true);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let b_in = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_in, echo_port)];
    b.drain = "2s";
    let mut pb = b.start(d, &fb);
    let a_out = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_out, b_in, B.into())];
    let _pa = a.start(d, &fa);

    let mut s = TcpStream::connect(("127.0.0.1", a_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"one\n\n").unwrap();
    s.read_exact(&mut buf).unwrap();

    pb.signal(libc::SIGTERM);
    pb.wait_log("draining", Duration::from_secs(5));
    // No new connections: the listener is closed.
    wait_until("listener closed", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", b_in)).is_err()
    });
    assert_ne!(
        http_get(([127, 0, 0, 1], b.admin).into(), "/ready").map(|r| r.0),
        Some(200)
    );
    // The live connection still works during the drain window.
    s.write_all(b"two\n\n").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"two\n\n");
    // It outlives the 2 s deadline, so B cuts it and exits 0.
    let code = pb.terminate(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", pb.log());
    assert!(pb.log().contains("drain deadline passed"), "{}", pb.log());
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
    let ready = || http_get(([127, 0, 0, 1], b.admin).into(), "/ready");
    wait_until(
        "/ready to fail after expiry",
        Duration::from_secs(15),
        || ready().is_some_and(|(s, body)| s == 503 && body.contains("no valid SVID")),
    );
    let fresh = ca.svid(B);
    write_atomic(&files.key, fresh.key_pem().as_bytes());
    write_atomic(&files.cert, fresh.chain_pem().as_bytes());
    wait_until("/ready after rotation", Duration::from_secs(5), || {
        ready().is_some_and(|(s, _)| s == 200)
    });
    drop(pb);
}
