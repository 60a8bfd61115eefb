//! A sidecar pair on loopback, driven with curl and openssl s_client: allowed and refused
//! identities, and every kind of bad input a peer can send, each visible in metrics and log.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::rcgen::KeyUsagePurpose as Ku;
use sigil_testkit::{Ca, Svid, SvidSpec};

/// Runs `openssl s_client` against `port` presenting `svid` (or no certificate).
fn s_client(dir: &Path, port: u16, svid: Option<(&Svid, &str)>, extra: &[&str]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-brief",
    ]);
    if let Some((svid, name)) = svid {
        let (crt, key) = svid.write(dir, name);
        cmd.arg("-cert").arg(crt).arg("-key").arg(key);
    }
    cmd.args(extra);
    run(&mut cmd, Duration::from_secs(20)).1
}

/// The loopback pair: B allows only A on its workload port, trusts other.org too, and cuts
/// idle handshakes after 1 s. A has a second listener that leads to C's sidecar while
/// expecting B: a server with the wrong identity. C, with a valid SVID, is not allowed on B.
struct Loopback {
    c: Caller,
    p: Pair,
    web: Ports,
    /// A's listener leading to C's sidecar.
    a_wrong: u16,
}

#[test]
fn sidecar_pair_allows_refuses_and_names_every_bad_input() {
    if !require_tool("curl", "loopback") || !require_tool("openssl", "loopback") {
        return;
    }
    let (mut s, web) = PairSetup::web("loopback");
    s.fb.trust(&Ca::new("other.org"));
    s.b.allow = vec![(web.workload, vec![A.into()])];
    s.b.handshake_timeout = "1s";
    let (a_wrong, c_in) = (free_port(), free_port());
    s.a.outbound.push((a_wrong, c_in, B.into()));
    let p = s.start();
    let c = p.caller("c", C, |c| c.inbound = vec![(c_in, web.workload)]);
    let l = Loopback { c, p, web, a_wrong };

    allowed_and_counted(&l);
    c_is_refused_per_request_and_per_connection(&l);
    a_server_with_the_wrong_identity_is_refused(&l);
    bad_client_certificates_are_refused_and_named(&l);
    tls_1_2_and_resumption_are_refused(&l);
    garbage_truncated_and_silent_handshakes_are_cut(&l);
    admin_endpoints_answer_and_never_show_key_material(&l);

    // Everything refused above left the allowed path working.
    let (ok, out) = curl(l.web.a_out, "/again");
    assert!(ok && out.contains("hello from b"), "{out}");
}

/// Allowed: A's workload calls B through both sidecars, counted on both sides.
fn allowed_and_counted(l: &Loopback) {
    let (a, b) = (&l.p.a, &l.p.b);
    let (ok, out) = curl(l.web.a_out, "/hello");
    assert!(
        ok,
        "curl through the pair failed: {out}\nA:\n{}\nB:\n{}",
        l.p.pa.log(),
        l.p.pb.log()
    );
    assert!(out.contains("hello from b (GET /hello"), "{out}");
    let mb = b.metrics();
    let ma = a.metrics();
    let opened_in = metric(
        &mb,
        "sigil_connections_opened_total{",
        &[
            "direction=\"inbound\"",
            &peer(A),
            &format!("local_id=\"{B}\""),
        ],
    );
    assert_eq!(opened_in, Some(1.0), "{mb}");
    let opened_out = metric(
        &ma,
        "sigil_connections_opened_total{",
        &["direction=\"outbound\"", &peer(B)],
    );
    assert_eq!(opened_out, Some(1.0), "{ma}");
    let rx = metric(&mb, "sigil_bytes_received_total{", &[&peer(A)]).unwrap_or(0.0);
    let tx = metric(&mb, "sigil_bytes_sent_total{", &[&peer(A)]).unwrap_or(0.0);
    assert!(
        rx > 50.0 && tx > 50.0,
        "bytes not counted: rx={rx} tx={tx}\n{mb}"
    );
    assert!(mb.contains("sigil_svid_expiry_timestamp_seconds{"), "{mb}");
}

/// C has a valid SVID but is not allowed on B's port. Its HTTP requests, pooled by C's
/// sidecar, get 403 naming the rule, and a connection that is not HTTP is refused outright.
/// The refusal reaches C's workload as a closed connection, not as a hang.
fn c_is_refused_per_request_and_per_connection(l: &Loopback) {
    let (b, pb, c_out) = (&l.p.b, &l.p.pb, l.c.ports[0]);
    let (ok, out) = curl(c_out, "/");
    assert!(
        ok && out.contains("sigil: denied by port") && !out.contains("hello from b"),
        "C reached B: {out}"
    );
    let denied = metric(
        &b.metrics(),
        "sigil_requests_total{",
        &[&peer(C), "decision=\"deny\""],
    );
    assert_eq!(denied, Some(1.0), "{}", b.metrics());
    let mut s = connect(c_out);
    s.write_all(b"\x00\x01 not http\r\n").unwrap();
    // A reset closes too; a read timeout is the hang this guards against.
    assert!(closed(&mut s), "refused connection left open");
    pb.wait_log("not_allowed", Duration::from_secs(5));
    let refused = metric(
        &b.metrics(),
        "sigil_connections_refused_total{",
        &[&peer(C), "reason=\"not_allowed\""],
    );
    assert_eq!(refused, Some(1.0));
    assert!(
        pb.log().contains(&format!("peer=\"{C}\"")) || pb.log().contains(C),
        "{}",
        pb.log()
    );
}

/// Wrong identity: A expects B but C's sidecar answers.
fn a_server_with_the_wrong_identity_is_refused(l: &Loopback) {
    let a = &l.p.a;
    let (ok, out) = curl(l.a_wrong, "/");
    assert!(!ok || !out.contains("hello"), "{out}");
    l.p.pa.wait_log("wrong_identity", Duration::from_secs(5));
    let wrong = metric(
        &a.metrics(),
        "sigil_handshake_failures_total{",
        &["direction=\"outbound\"", "reason=\"wrong_identity\""],
    );
    assert_eq!(wrong, Some(1.0), "{}", a.metrics());
}

/// `sigil_handshake_failures_total` of `b`'s inbound side for `reason`.
fn inbound_failures(b: &Sidecar, reason: &str) -> f64 {
    count(
        b,
        "sigil_handshake_failures_total{",
        &["direction=\"inbound\"", &format!("reason=\"{reason}\"")],
    )
}

/// Bad client certificates straight at B's inbound listener, with openssl s_client: each
/// counted and logged with its reason.
fn bad_client_certificates_are_refused_and_named(l: &Loopback) {
    let (ca, b, pb) = (&l.p.ca, &l.p.b, &l.p.pb);
    let stranger = Ca::new("stranger.org");
    let cases: Vec<(&str, Option<Svid>, &str)> = vec![
        ("no client cert", None, "no_client_cert"),
        (
            "untrusted trust domain",
            Some(stranger.svid("spiffe://stranger.org/w")),
            "untrusted_domain",
        ),
        (
            "trusted CA issuing another domain's ID",
            Some(ca.svid("spiffe://other.org/w")),
            "untrusted_issuer",
        ),
        (
            "expired",
            Some(ca.issue(&SvidSpec::new(A).expired())),
            "expired",
        ),
        (
            "two URI SANs",
            Some(ca.issue(&SvidSpec::new(A).uris(&[A, C]))),
            "invalid_svid",
        ),
        (
            "CA certificate as leaf",
            Some(ca.issue(&SvidSpec::new(A).ca())),
            "invalid_svid",
        ),
        (
            "missing digitalSignature",
            Some(ca.issue(&SvidSpec::new(A).key_usages(vec![Ku::KeyEncipherment]))),
            "invalid_svid",
        ),
    ];
    for (i, (name, svid, reason)) in cases.iter().enumerate() {
        let before = inbound_failures(b, reason);
        let file = format!("bad{i}");
        let svid = svid.as_ref().map(|s| (s, file.as_str()));
        let out = s_client(l.p.path(), l.web.b_in, svid, &[]);
        let after = inbound_failures(b, reason);
        assert_eq!(
            after,
            before + 1.0,
            "{name}: want one more {reason} failure\ns_client: {out}\nB log:\n{}",
            pb.log()
        );
        assert!(
            pb.log().contains(&format!("reason=\"{reason}\"")),
            "{name}: reason missing from log"
        );
    }
}

/// TLS 1.2 is refused outright. No resumption: B issues no session ticket, so s_client has
/// no session to save (it writes -sess_out only when it got one).
fn tls_1_2_and_resumption_are_refused(l: &Loopback) {
    let (d, ca, b, b_in) = (l.p.path(), &l.p.ca, &l.p.b, l.web.b_in);
    let tls_errors = || {
        count(
            b,
            "sigil_handshake_failures_total{",
            &["reason=\"tls_error\""],
        )
    };
    let before = tls_errors();
    let out = s_client(d, b_in, Some((&ca.svid(A), "tls12")), &["-tls1_2"]);
    assert!(!out.contains("Protocol version: TLSv1.2"), "{out}");
    assert_eq!(tls_errors(), before + 1.0, "{out}");

    let sess = d.join("sess.pem");
    let good = ca.svid(A);
    let first = s_client(
        d,
        b_in,
        Some((&good, "resume")),
        &["-sess_out", sess.to_str().unwrap()],
    );
    assert!(first.contains("TLSv1.3"), "{first}");
    assert!(
        !sess.exists(),
        "B issued a session ticket; resumption would skip the verifier"
    );
}

/// Garbage bytes, a truncated ClientHello, and a client that says nothing.
fn garbage_truncated_and_silent_handshakes_are_cut(l: &Loopback) {
    let (b, b_in) = (&l.p.b, l.web.b_in);
    let fails = |reason: &str| inbound_failures(b, reason);
    let tls_err = fails("tls_error");
    let mut s = TcpStream::connect(("127.0.0.1", b_in)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n\x00\xff garbage")
        .unwrap();
    drop(s);
    let timeouts = fails("handshake_timeout") + fails("peer_closed");
    // A ClientHello record header promising 512 bytes, then only a few of them.
    let mut s = TcpStream::connect(("127.0.0.1", b_in)).unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    let silent = TcpStream::connect(("127.0.0.1", b_in)).unwrap();
    // Both are cut by the 1 s handshake timeout, not left open.
    poll(Duration::from_secs(10), Duration::from_millis(100), || {
        if fails("handshake_timeout") + fails("peer_closed") >= timeouts + 2.0 {
            return Ok(());
        }
        Err(format!("idle handshakes not cut:\n{}", b.metrics()))
    });
    assert!(
        fails("tls_error") > tls_err,
        "garbage not counted:\n{}",
        b.metrics()
    );
    assert!(fails("handshake_timeout") >= 2.0, "{}", b.metrics());
    drop((s, silent));
}

/// /live and a 404; the config dump shows identity and trust state, never key material.
fn admin_endpoints_answer_and_never_show_key_material(l: &Loopback) {
    let b = &l.p.b;
    assert_eq!(b.admin_get("/live").map(|r| r.0), Some(200));
    assert_eq!(b.admin_get("/nope").map(|r| r.0), Some(404));
    let (status, dump) = b.admin_get("/config_dump").unwrap();
    assert_eq!(status, 200);
    assert!(dump.contains(B) && dump.contains("\"other.org\""), "{dump}");
    let key_pem = std::fs::read_to_string(&l.p.fb.key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(
        !dump.contains("PRIVATE KEY") && !dump.contains(key_body),
        "key material in dump"
    );
    assert!(!l.p.pb.log().contains(key_body), "key material in log");
}

#[test]
fn invalid_config_exits_2_naming_file_and_line() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata: {name: x}\nspec:\n  identity: {certFile: a, keyFile: b, bundleDir: c}\n  inbound:\n    ports:\n      - {port: 80, allow: [spiffe://example.org/a//b]}\n",
    )
    .unwrap();
    let out = Command::new(bin("sigil-proxy"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:8:", cfg.display())), "{err}");
    assert!(err.contains("empty segment"), "{err}");
    let out = Command::new(bin("sigil-proxy")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin("sigil-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("--config"));
}
