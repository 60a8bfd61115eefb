//! Per-route scope at L7 through a real sidecar pair: policies from a policy directory,
//! curl (HTTP/1.1 and h2c) and raw requests for each bypass attempt.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

const A: &str = "spiffe://example.org/ns/demo/sa/a";
const B: &str = "spiffe://example.org/ns/demo/sa/b";
const C: &str = "spiffe://example.org/ns/demo/sa/c";

fn policy(web: u16, echo: u16, promo_expiry: i64, stream_allow: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: api, owner: team-api, purpose: L7 end-to-end test}}
spec:
  target: {B}
  ports:
    - port: {web}
      routes:
        - name: orders
          match: {{methods: [GET], path: {{prefix: /v1/orders}}}}
          allow: [{A}]
        - name: admin
          match: {{path: {{prefix: /admin}}}}
          allow: [{C}]
        - name: audit
          match: {{path: {{prefix: /v1}}}}
          deny: [{A}]
          mode: dry-run
        - name: promo
          match: {{path: {{exact: /promo}}}}
          allow: [{A}]
          expiresAt: {expiry}
    - port: {echo}
      protocol: tcp
      rules:
        - {{name: stream, allow: [{stream_allow}]}}
",
        expiry = rfc3339(promo_expiry)
    )
}

/// Sends raw bytes through a local port and returns what came back (until close or 5 s).
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    read_response(&mut s)
}

/// Reads one whole response from a keep-alive connection (headers and body may arrive in
/// separate segments).
fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !response_complete(&String::from_utf8_lossy(&out)) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `text` holds a whole HTTP/1.1 response: headers, then the body its framing
/// announces.
fn response_complete(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => body.len() >= n,
        None if head.contains("transfer-encoding: chunked") => body.ends_with("0\r\n\r\n"),
        None => true,
    }
}

fn status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn curl_args(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("curl");
    // Generous: this file's tests run side by side on two cores with debug builds, and the
    // 12 MiB body test can hold a request up for seconds (5 s was seen to run out).
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    run(&mut cmd, Duration::from_secs(30))
}

/// Sidecar A calls B's toy workload through sidecar B: A's explicit outbound listener
/// `a_web` forwards to B's inbound listener for it. `tune_a` adjusts A before it starts.
/// Dropping a `Proc` ends its process and dropping `dir` removes the files, so callers
/// bind `dir`, `web`, `pa` and `pb`.
struct Pair {
    dir: TempDir,
    /// The CA of both SVIDs and of both sidecars' bundles.
    ca: Ca,
    web: Proc,
    web_port: u16,
    a: Sidecar,
    pa: Proc,
    fa: IdentityFiles,
    a_web: u16,
    b: Sidecar,
    pb: Proc,
    fb: IdentityFiles,
}

fn start_pair(tag: &str, tune_a: impl FnOnce(&mut Sidecar)) -> Pair {
    let dir = TempDir::new(tag);
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (web, web_port) = start_workload("b", false);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    let pb = b.start(d, &fb);
    let a_web = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into())];
    tune_a(&mut a);
    let pa = a.start(d, &fa);
    Pair {
        dir,
        ca,
        web,
        web_port,
        a,
        pa,
        fa,
        a_web,
        b,
        pb,
        fb,
    }
}

fn write_policy(dir: &Path, name: &str, text: &str) {
    write_atomic(&dir.join(name), text.as_bytes());
}

#[test]
fn routes_by_identity_with_dry_run_expiry_normalization_and_live_policy_changes() {
    if !require_tool("curl", "l7") {
        return;
    }
    let dir = TempDir::new("l7");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_web, web_port) = start_workload("b", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let policies = d.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let promo_expiry = now_unix() + 6;
    write_policy(
        &policies,
        "api.yaml",
        &policy(web_port, echo_port, promo_expiry, A),
    );

    let (b_web, b_echo) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port), (b_echo, echo_port)];
    b.policy_dir = Some(policies.clone());
    let pb = b.start(d, &fb);
    let (a_web, a_echo) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into()), (a_echo, b_echo, B.into())];
    // One worker, so that one pooled connection carries every request (counted below).
    a.workers = Some(1);
    let _pa = a.start(d, &fa);
    let url = |path: &str| format!("http://127.0.0.1:{a_web}{path}");

    // Allowed route; the workload learns the verified caller, and a forged header is dropped.
    let (ok, out) = curl_args(&[
        "-H",
        "x-sigil-peer-id: spiffe://evil.org/x",
        &url("/v1/orders/7"),
    ]);
    assert!(
        ok && out.contains("hello from b (GET /v1/orders/7"),
        "{out}\n{}",
        pb.log()
    );
    assert!(
        out.contains(&format!("peer-id={A} ")),
        "forged or missing peer header: {out}"
    );

    // Denied route: 403 naming the rule; the same connection then serves an allowed request.
    let opened = |s: &Sidecar| {
        count(
            s,
            "sigil_connections_opened_total{",
            &["direction=\"inbound\"", &format!("peer_id=\"{A}\"")],
        )
    };
    let before = opened(&b);
    let (_, out) = curl_args(&[
        "-w",
        "[%{http_code}]\n",
        &url("/admin"),
        &url("/v1/orders/8"),
    ]);
    assert!(
        out.contains("[403]")
            && out.contains("sigil: denied by port")
            && out.contains("default deny"),
        "{out}"
    );
    assert!(
        out.contains("hello from b (GET /v1/orders/8") && out.contains("[200]"),
        "{out}"
    );
    // A new workload connection, yet no new connection between the sidecars: A pools it,
    // and the denial left it usable.
    assert_eq!(
        opened(&b),
        before,
        "the pooled connection was not reused after a denial"
    );

    // HTTP/2 prior knowledge, forwarded to an HTTP/1.1 workload.
    let (ok, out) = curl_args(&[
        "--http2-prior-knowledge",
        "-w",
        "[h%{http_version}]",
        &url("/v1/orders/9"),
    ]);
    assert!(
        ok && out.contains("hello from b (GET /v1/orders/9") && out.contains("[h2]"),
        "{out}"
    );

    // Metrics: requests by route and decision; dry-run "would deny" for the audit rule.
    let mb = b.metrics();
    assert!(
        metric(
            &mb,
            "sigil_requests_total{",
            &[
                "route=\"api/orders\"",
                "decision=\"allow\"",
                "status_class=\"2xx\"",
                &format!("peer_id=\"{A}\"")
            ]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{mb}"
    );
    assert!(
        metric(
            &mb,
            "sigil_requests_total{",
            &[
                "route=\"default_deny\"",
                "decision=\"deny\"",
                "status_class=\"4xx\""
            ]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{mb}"
    );
    assert!(
        metric(
            &mb,
            "sigil_policy_would_deny_total{",
            &["rule=\"api/audit\""]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{mb}"
    );
    assert!(
        mb.contains("sigil_request_duration_seconds_bucket{"),
        "{mb}"
    );
    assert!(pb.log().contains("dry-run: would deny"));

    // Each attempt to slip past a route check, as raw bytes through A's sidecar.
    let req = |target: &str, extra: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: b\r\n{extra}Connection: close\r\n\r\n")
    };
    let cases: Vec<(&str, String, u16)> = vec![
        ("dot segments", req("/v1/orders/../../admin", ""), 403),
        (
            "encoded dot segments",
            req("/v1/orders/%2e%2e/%2E%2e/admin", ""),
            403,
        ),
        ("encoded slash", req("/v1/orders%2F..%2Fadmin", ""), 400),
        ("backslash", req("/v1/orders\\..\\admin", ""), 400),
        (
            "absolute form, other host",
            req("http://evil.example/v1/orders/1", ""),
            400,
        ),
        (
            "two Host headers",
            req("/v1/orders/1", "Host: evil\r\n"),
            400,
        ),
        (
            "too many headers",
            req("/v1/orders/1", &"X-Pad: 1\r\n".repeat(150)),
            431,
        ),
        (
            "oversized header",
            req(
                "/v1/orders/1",
                &format!("X-Big: {}\r\n", "a".repeat(80 * 1024)),
            ),
            431,
        ),
    ];
    for (name, request, want) in &cases {
        let resp = raw(a_web, request.as_bytes());
        let got = status(&resp);
        // hyper answers header overflows with 431 or closes; either way nothing reaches B's workload.
        let ok = got == *want || (*want == 431 && (got == 0 || got == 400));
        assert!(ok, "{name}: want {want}, got {got}: {resp:?}");
        assert!(
            !resp.contains("hello from b"),
            "{name} reached the workload: {resp}"
        );
    }
    // Content-Length with Transfer-Encoding: read as chunked, forwarded with one framing only.
    let resp = raw(
        a_web,
        req(
            "/v1/orders/1",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        )
        .replace("\r\n\r\n", "\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .as_bytes(),
    );
    assert!(
        resp.contains("framing=chunked"),
        "smuggling-prone framing forwarded: {resp}"
    );
    // Two different Content-Length values are refused.
    let resp = raw(
        a_web,
        req("/v1/orders/1", "Content-Length: 1\r\nContent-Length: 2\r\n").as_bytes(),
    );
    assert_eq!(status(&resp), 400, "{resp}");
    // Duplicate slashes are normalized, and the workload receives the normalized path.
    let resp = raw(a_web, req("/v1//orders//10", "").as_bytes());
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains("GET /v1/orders/10 "), "{resp}");

    // Expiry by the sidecar's own clock: /promo is allowed until its expiresAt.
    let promo = || curl_args(&["-w", "[%{http_code}]", &url("/promo")]).1;
    if now_unix() < promo_expiry - 1 {
        assert!(promo().contains("[200]"), "promo before expiry");
    }
    wait_until("promo expiry", Duration::from_secs(15), || {
        now_unix() > promo_expiry
    });
    let out = promo();
    assert!(
        out.contains("[403]") && out.contains("default deny"),
        "after expiry: {out}"
    );

    // A live TCP connection on the tcp port; a policy change that drops A closes it.
    let mut s = TcpStream::connect(("127.0.0.1", a_echo)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"ping\n").unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    write_policy(
        &policies,
        "api.yaml",
        &policy(web_port, echo_port, promo_expiry, C),
    );
    assert!(closed(&mut s), "connection survived the policy change");
    wait_until(
        "policy_change close counted",
        Duration::from_secs(5),
        || {
            count(
                &b,
                "sigil_connections_closed_total{",
                &["reason=\"policy_change\""],
            ) >= 1.0
        },
    );
    assert!(
        count(
            &b,
            "sigil_reloads_total{",
            &["resource=\"policy\"", "result=\"success\""]
        ) >= 2.0
    );

    // An invalid policy file is refused with file:line; the last good policies stay in force.
    let fails = count(
        &b,
        "sigil_reloads_total{",
        &["resource=\"policy\"", "result=\"failure\""],
    );
    write_policy(
        &policies,
        "broken.yaml",
        "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {name: x}\nspec: {target: nope}\n",
    );
    wait_until("the refused policy update", Duration::from_secs(5), || {
        count(
            &b,
            "sigil_reloads_total{",
            &["resource=\"policy\"", "result=\"failure\""],
        ) > fails
    });
    pb.wait_log("broken.yaml:", Duration::from_secs(2));
    let (ok, out) = curl_args(&[&url("/v1/orders/11")]);
    assert!(
        ok && out.contains("hello from b"),
        "last good policy lost: {out}"
    );
    drop(pb);
}

#[test]
fn undeclared_ports_are_sniffed_http_gets_l7_and_opaque_bytes_are_relayed() {
    if !require_tool("curl", "l7-detect") {
        return;
    }
    let dir = TempDir::new("l7-detect");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_web, web_port) = start_workload("b", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    // No policy targets B: mTLS alone admits A, and nothing declares a protocol.
    let policies = d.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let (b_web, b_echo) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port), (b_echo, echo_port)];
    b.policy_dir = Some(policies.clone());
    let mut pb = b.start(d, &fb);
    let (a_web, a_echo) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into()), (a_echo, b_echo, B.into())];
    let _pa = a.start(d, &fa);

    // HTTP/1.1 and h2c are detected: the workload gets the verified caller's ID.
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/x")]);
    assert!(ok && out.contains(&format!("peer-id={A} ")), "{out}");
    let (ok, out) = curl_args(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{a_web}/y"),
    ]);
    assert!(ok && out.contains(&format!("peer-id={A} ")), "{out}");
    let mb = b.metrics();
    let n = metric(
        &mb,
        "sigil_requests_total{",
        &["route=\"no_policy\"", "decision=\"allow\""],
    );
    assert_eq!(n, Some(2.0), "{mb}");

    // Opaque bytes (here: binary, not a request line) are relayed untouched, both ways.
    let mut s = TcpStream::connect(("127.0.0.1", a_echo)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == payload, "opaque stream corrupted");
    let mb = b.metrics();
    let n = metric(&mb, "sigil_requests_total{", &["route=\"no_policy\""]);
    assert_eq!(n, Some(2.0), "the opaque stream was treated as HTTP: {mb}");
    drop(s);

    // Connections served at L7 count their bytes too.
    let rx = metric(
        &mb,
        "sigil_bytes_received_total{",
        &[&format!("peer_id=\"{A}\"")],
    )
    .unwrap_or(0.0);
    assert!(rx > 100_000.0 + 100.0, "L7 bytes not counted: {rx}\n{mb}");

    // A policy now declares the echo port `http`: a byte stream opened before would bypass
    // every route check, so it is closed (policy_change).
    let mut s = TcpStream::connect(("127.0.0.1", a_echo)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00ping").unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    let http_ports = format!(
        "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: now-http, owner: team-b, purpose: declare both ports http}}
spec:
  target: {B}
  ports:
    - port: {web_port}
      routes: [{{name: all, match: {{path: {{prefix: /}}}}, allow: [{A}]}}]
    - port: {echo_port}
      routes: [{{name: all, match: {{path: {{prefix: /}}}}, allow: [{A}]}}]
"
    );
    write_policy(&policies, "http.yaml", &http_ports);
    assert!(closed(&mut s), "byte stream survived its port turning http");
    wait_until(
        "policy_change close counted",
        Duration::from_secs(5),
        || {
            count(
                &b,
                "sigil_connections_closed_total{",
                &["reason=\"policy_change\""],
            ) == 1.0
        },
    );
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/still")]);
    assert!(ok && out.contains("hello from b (GET /still"), "{out}");

    // SIGTERM with an idle pooled connection from A open: B closes it gracefully (GOAWAY)
    // and exits without waiting for the drain deadline; A sees a clean end, and its
    // workload's keep-alive connection stays usable, answering 502 while B is gone.
    let mut ka = TcpStream::connect(("127.0.0.1", a_web)).unwrap();
    ka.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ka.write_all(b"GET /keep HTTP/1.1\r\nHost: b\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut ka);
    assert!(resp.contains("hello from b"), "{resp}");
    let done = || {
        count(
            &a,
            "sigil_connections_closed_total{",
            &["direction=\"outbound\"", "reason=\"done\""],
        )
    };
    let done_before = done();
    let code = pb.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", pb.log());
    assert!(
        !pb.log().contains("drain deadline passed"),
        "HTTP connection was cut, not drained:\n{}",
        pb.log()
    );
    wait_until(
        "A's pooled connection to end cleanly",
        Duration::from_secs(5),
        || done() > done_before,
    );
    ka.write_all(b"GET /keep HTTP/1.1\r\nHost: b\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut ka);
    assert_eq!(status(&resp), 502, "{resp}");
}

#[test]
fn outbound_http_shares_one_pooled_connection_that_a_bundle_change_cuts() {
    if !require_tool("curl", "l7-pool") {
        return;
    }
    let impostor = Ca::new("example.org");
    // Every process is bound: a field left to `..` would be dropped, and its process ended.
    let Pair {
        dir: _dir,
        ca,
        web: _web,
        a,
        pa,
        fa,
        a_web,
        b,
        pb,
        fb,
        ..
    } = start_pair("l7-pool", |a| a.workers = Some(1));
    let url = format!("http://127.0.0.1:{a_web}/p");
    let opened = |s: &Sidecar, direction: &str, peer: &str| {
        count(
            s,
            "sigil_connections_opened_total{",
            &[
                &format!("direction=\"{direction}\""),
                &format!("peer_id=\"{peer}\""),
            ],
        )
    };

    // Twenty workload connections, HTTP/1.1 and h2c, sequential and concurrent: one
    // connection between the sidecars carries all of them.
    for i in 0..10 {
        let (ok, out) = curl_args(&[&format!("{url}/{i}")]);
        assert!(ok && out.contains(&format!("GET /p/{i} ")), "{out}");
    }
    let (ok, out) = curl_args(&["--http2-prior-knowledge", &url]);
    assert!(ok && out.contains("hello from b"), "{out}");
    let parallel: Vec<_> = (0..9)
        .map(|i| {
            let u = format!("{url}/par{i}");
            std::thread::spawn(move || curl_args(&[&u]))
        })
        .collect();
    for t in parallel {
        let (ok, out) = t.join().unwrap();
        assert!(ok && out.contains("hello from b"), "{out}");
    }
    let allowed = count(
        &b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "decision=\"allow\""],
    );
    assert_eq!(allowed, 20.0, "{}", b.metrics());
    assert_eq!(opened(&b, "inbound", A), 1.0, "{}", b.metrics());
    assert_eq!(opened(&a, "outbound", B), 1.0, "{}", a.metrics());
    let forwarded = count(
        &a,
        "sigil_requests_total{",
        &[
            "direction=\"outbound\"",
            "decision=\"forward\"",
            "status_class=\"2xx\"",
        ],
    );
    assert_eq!(forwarded, 20.0, "{}", a.metrics());
    let (_, dump) = http_get(([127, 0, 0, 1], a.admin).into(), "/config_dump").unwrap();
    assert!(dump.contains("\"kind\": \"pooled\""), "{dump}");

    // A stops trusting the CA that issued B's SVID while a request is in flight. The pooled
    // connection takes no new requests: the next one dials afresh and is refused at the
    // handshake (502). The request in flight, authorized when it started, still completes;
    // then the connection is cut.
    let slow = in_flight(&format!("http://127.0.0.1:{a_web}/slow/900"));
    let bundle_a = fa.bundle_dir.join("example.org.pem");
    let reloaded = reloads(&a);
    write_policy(&fa.bundle_dir, "example.org.pem", &impostor.bundle_pem());
    wait_until("A's bundle reload", Duration::from_secs(5), || {
        reloads(&a) > reloaded
    });
    let changed_at = std::time::Instant::now();
    let (ok, out) = curl_args(&["-w", "[%{http_code}]", &url]);
    assert!(
        ok && out.contains("[502]") && !out.contains("hello from b"),
        "{out}\n{}",
        pa.log()
    );
    let ((ok, out), answered_at) = slow.join().unwrap();
    assert!(
        answered_at > changed_at,
        "the slow request was not in flight at the bundle change"
    );
    assert!(ok && out.contains("GET /slow/900"), "{out}\n{}", pa.log());
    wait_until("the pooled connection cut", Duration::from_secs(5), || {
        count(
            &a,
            "sigil_connections_closed_total{",
            &["direction=\"outbound\"", "reason=\"bundle_change\""],
        ) == 1.0
    });
    let untrusted = count(
        &a,
        "sigil_handshake_failures_total{",
        &["direction=\"outbound\""],
    );
    assert!(untrusted >= 1.0, "{}", a.metrics());

    // Trust restored: a new pooled connection, and requests flow again.
    std::fs::write(&bundle_a, ca.bundle_pem()).unwrap();
    wait_until("requests flow again", Duration::from_secs(5), || {
        curl_args(&[&url]).1.contains("hello from b")
    });
    assert_eq!(opened(&a, "outbound", B), 2.0, "{}", a.metrics());

    // The same from B's side: B stops trusting A's CA mid-request. B answers the request in
    // flight, sends GOAWAY, and refuses A's next handshake.
    let slow = in_flight(&format!("http://127.0.0.1:{a_web}/slow/900"));
    let bundle_b = fb.bundle_dir.join("example.org.pem");
    let reloaded = reloads(&b);
    std::fs::write(&bundle_b, impostor.bundle_pem()).unwrap();
    wait_until("B's bundle reload", Duration::from_secs(5), || {
        reloads(&b) > reloaded
    });
    let changed_at = std::time::Instant::now();
    let ((ok, out), answered_at) = slow.join().unwrap();
    assert!(
        answered_at > changed_at,
        "the slow request was not in flight at the bundle change"
    );
    assert!(ok && out.contains("GET /slow/900"), "{out}\n{}", pb.log());
    let (ok, out) = curl_args(&["-w", "[%{http_code}]", &url]);
    assert!(ok && out.contains("[502]"), "{out}\n{}", pa.log());
    wait_until(
        "B's inbound connection closed",
        Duration::from_secs(5),
        || {
            count(
                &b,
                "sigil_connections_closed_total{",
                &["direction=\"inbound\"", "reason=\"bundle_change\""],
            ) == 1.0
        },
    );
}

/// Bodies larger than the pooled connection's flow-control windows (2 MiB per stream, 5 MiB
/// per connection) cross the pair whole in both directions, from HTTP/1.1 and h2c clients,
/// one at a time and several at once on each worker's one pooled connection.
#[test]
fn large_bodies_cross_the_pooled_connection_whole_in_both_directions() {
    if !require_tool("curl", "l7-bodies") {
        return;
    }
    let Pair {
        dir,
        web: _web,
        a,
        pa,
        a_web,
        pb,
        ..
    } = start_pair("l7-bodies", |a| a.workers = Some(2));
    let d = dir.path();

    const LEN: usize = 12 * 1024 * 1024 + 7;
    let upload: Vec<u8> = (0..LEN).map(|i| (i * 7 % 256) as u8).collect();
    let upload_file = d.join("upload.bin");
    std::fs::write(&upload_file, &upload).unwrap();
    let upload_arg = format!("@{}", upload_file.display());
    // The toy workload names the body it received: length and FNV-1a hash.
    let fnv = upload.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let received = format!("body={LEN}:{fnv:016x}");
    let check_download = |path: &Path| {
        let got = std::fs::read(path).unwrap();
        assert_eq!(got.len(), LEN, "downloaded length");
        let bad = got
            .iter()
            .enumerate()
            .position(|(i, &b)| b != (i % 251) as u8);
        assert_eq!(bad, None, "first wrong byte of the download");
    };
    let post = |extra: &[&str], tag: &str| {
        let url = format!("http://127.0.0.1:{a_web}/up/{tag}");
        let mut args = extra.to_vec();
        args.extend(["--data-binary", &upload_arg, &url]);
        curl_args(&args)
    };
    let download = |extra: &[&str], file: &Path| {
        let url = format!("http://127.0.0.1:{a_web}/bytes/{LEN}");
        let file = file.display().to_string();
        let mut args = extra.to_vec();
        args.extend(["-o", &file, "-w", "[%{http_code}]", &url]);
        curl_args(&args)
    };

    for (extra, tag) in [(&[][..], "h1"), (&["--http2-prior-knowledge"][..], "h2")] {
        let (ok, out) = post(extra, tag);
        assert!(ok && out.contains(&received), "{tag}: {out}\n{}", pa.log());
        let file = d.join(format!("down-{tag}.bin"));
        let (ok, out) = download(extra, &file);
        assert!(ok && out.contains("[200]"), "{tag}: {out}\n{}", pb.log());
        check_download(&file);
    }

    // Three uploads and three downloads at once share the connection's window.
    std::thread::scope(|s| {
        let ups: Vec<_> = (0..3)
            .map(|i| s.spawn(move || post(&[], &format!("par{i}"))))
            .collect();
        let downs: Vec<_> = (0..3)
            .map(|i| {
                let file = d.join(format!("down-par{i}.bin"));
                s.spawn(move || (download(&["--http2-prior-knowledge"], &file), file))
            })
            .collect();
        for u in ups {
            let (ok, out) = u.join().unwrap();
            assert!(ok && out.contains(&received), "{out}");
        }
        for t in downs {
            let ((ok, out), file) = t.join().unwrap();
            assert!(ok && out.contains("[200]"), "{out}");
            check_download(&file);
        }
    });
    let opened = count(
        &a,
        "sigil_connections_opened_total{",
        &["direction=\"outbound\""],
    );
    // Workload connections are dealt to A's two workers in turn; each pools its own.
    assert_eq!(
        opened,
        2.0,
        "one pooled connection per worker carried it all\n{}",
        a.metrics()
    );
}

/// A pooled connection that no request used for `timeouts.poolIdle` is let go: a request
/// still running on it finishes first, then the connection closes (`reason="done"`), and the
/// next request dials a new one.
#[test]
fn an_unused_pooled_connection_closes_after_its_last_request() {
    if !require_tool("curl", "l7-pool-idle") {
        return;
    }
    let Pair {
        dir: _dir,
        web: _web,
        a,
        pa,
        a_web,
        pb: _pb,
        ..
    } = start_pair("l7-pool-idle", |a| {
        a.pool_idle = "1s";
        a.workers = Some(1);
    });
    let peer = format!("peer_id=\"{B}\"");
    let outbound =
        |series: &str, extra: &str| count(&a, series, &["direction=\"outbound\"", &peer, extra]);

    // One request opens the connection; a slow one (3 s) outlasts a whole idle period in
    // which no request starts: the connection is let go but carries the slow one to its end.
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/first")]);
    assert!(ok && out.contains("hello from b"), "{out}");
    let started = std::time::Instant::now();
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/slow/3000")]);
    assert!(ok && out.contains("GET /slow/3000"), "{out}\n{}", pa.log());
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(
        outbound("sigil_connections_opened_total{", ""),
        1.0,
        "{}",
        a.metrics()
    );
    wait_until(
        "the unused connection closed",
        Duration::from_secs(5),
        || outbound("sigil_connections_closed_total{", "reason=\"done\"") == 1.0,
    );
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/next")]);
    assert!(ok && out.contains("hello from b"), "{out}");
    assert_eq!(
        outbound("sigil_connections_opened_total{", ""),
        2.0,
        "{}",
        a.metrics()
    );
    // A connection in use is kept: a request every 200 ms or so for 2 s, all on the new one.
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(200));
        let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{a_web}/busy/{i}")]);
        assert!(ok && out.contains("hello from b"), "{out}");
    }
    assert_eq!(
        outbound("sigil_connections_opened_total{", ""),
        2.0,
        "{}",
        a.metrics()
    );
}

/// The workload sees requests arrive from the receiving sidecar's pooled connections: one
/// connection serves sequential requests, a busy one is not shared, and a connection the
/// workload closed (here: the workload restarted) is replaced without failing a request.
#[test]
fn inbound_requests_reuse_workload_connections_and_survive_a_workload_restart() {
    if !require_tool("curl", "l7-workload-pool") {
        return;
    }
    let Pair {
        dir: _dir,
        mut web,
        web_port,
        a_web,
        pa: _pa,
        b,
        pb: _pb,
        ..
    } = start_pair("l7-workload-pool", |a| a.workers = Some(1));
    let url = format!("http://127.0.0.1:{a_web}/p");
    // The toy workload answers "... from <the sidecar's address>) ...".
    let from = |out: &str| -> String {
        let start = out.rfind(" from ").expect("workload reply") + 6;
        out[start..].split(')').next().unwrap().to_string()
    };
    let get = |path: &str| {
        let (ok, out) = curl_args(&[&format!("{url}{path}")]);
        assert!(ok && out.contains("hello from b"), "{out}");
        from(&out)
    };

    let first = get("/1");
    for i in 2..6 {
        assert_eq!(
            get(&format!("/{i}")),
            first,
            "sequential requests share a connection"
        );
    }

    // While one request holds a connection, another request takes a second one.
    let slow = in_flight(&format!("http://127.0.0.1:{a_web}/slow/900"));
    let other = get("/during");
    let ((ok, out), _) = slow.join().unwrap();
    assert!(ok && out.contains("GET /slow/900 "), "{out}");
    assert_ne!(other, from(&out), "a busy connection is not shared");

    // The workload restarts on the same port: its pooled connections are closed. The next
    // requests reach the new process, none of them failing.
    web.terminate(Duration::from_secs(5));
    let mut cmd = Command::new(bin("sigil-toy-workload"));
    cmd.args(["--listen", &format!("127.0.0.1:{web_port}"), "--name", "b"]);
    let _web2 = Proc::spawn("b2", &mut cmd);
    wait_for_port(([127, 0, 0, 1], web_port).into(), Duration::from_secs(10));
    let after = get("/after-restart");
    assert_ne!(after, first);
    assert_eq!(get("/again"), after, "the new connection is pooled in turn");
    let failed = count(
        &b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "status_class=\"5xx\""],
    );
    assert_eq!(failed, 0.0, "{}", b.metrics());
}

/// A policy for `target` on `port`: `caller` may GET under `prefix`, nothing else.
fn one_route(name: &str, target: &str, port: u16, prefix: &str, caller: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: {name}, owner: team-{name}, purpose: ID change test}}
spec:
  target: {target}
  ports:
    - port: {port}
      routes:
        - {{name: only, match: {{methods: [GET], path: {{prefix: {prefix}}}}}, allow: [{caller}]}}
"
    )
}

/// B's toy workload, SVIDs for A and B, and a policy directory in which A may GET under
/// `/v1/orders` on that workload (`one_route`). Dropping it ends the workload and removes the
/// files, so callers bind it whole.
struct OneRoute {
    dir: TempDir,
    ca: Ca,
    _web: Proc,
    web_port: u16,
    fa: IdentityFiles,
    fb: IdentityFiles,
    policies: std::path::PathBuf,
}

fn one_route_setup(tag: &str) -> OneRoute {
    let dir = TempDir::new(tag);
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (web, web_port) = start_workload("b", false);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let policies = d.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    write_policy(
        &policies,
        "b.yaml",
        &one_route("for-b", B, web_port, "/v1/orders", A),
    );
    OneRoute {
        dir,
        ca,
        _web: web,
        web_port,
        fa,
        fb,
        policies,
    }
}

#[test]
fn policies_follow_the_sidecars_own_id_when_its_svid_changes_to_another() {
    if !require_tool("curl", "l7") {
        return;
    }
    const B2: &str = "spiffe://example.org/ns/demo/sa/b2";
    let s = one_route_setup("l7-id-change");
    let (d, ca, web_port, fa, fb, policies) =
        (s.dir.path(), &s.ca, s.web_port, &s.fa, &s.fb, &s.policies);
    // One directory for both IDs, as a directory shared by several workloads would be. The
    // sidecar keeps only its own ID's policies parsed, so the change must re-read B2's.
    write_policy(
        policies,
        "b2.yaml",
        &one_route("for-b2", B2, web_port, "/admin", A),
    );
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.policy_dir = Some(policies.clone());
    b.allow_identity_change = true;
    let pb = b.start(d, fb);
    // A reaches B's listener expecting B on one port and B2 on the other.
    let (to_b, to_b2) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(to_b, b_web, B.into()), (to_b2, b_web, B2.into())];
    let _pa = a.start(d, fa);
    let get =
        |port: u16, path: &str| curl_args(&["-i", &format!("http://127.0.0.1:{port}{path}")]).1;

    let out = get(to_b, "/v1/orders/1");
    assert!(
        out.contains("hello from b (GET /v1/orders/1"),
        "{out}\n{}",
        pb.log()
    );
    let out = get(to_b, "/admin/x");
    assert_eq!(status(&out), 403, "{out}");
    assert!(out.contains("default deny"), "{out}");

    // The SVID's files now hold B2's SVID: the key first, so that the watcher never pairs
    // B2's certificate with B's key for long (such a pair is refused and read again).
    let b2 = ca.svid(B2);
    write_atomic(&fb.key, b2.key_pem().as_bytes());
    write_atomic(&fb.cert, b2.chain_pem().as_bytes());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut out = String::new();
    while std::time::Instant::now() < deadline {
        out = get(to_b2, "/admin/x");
        if status(&out) == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        out.contains("hello from b (GET /admin/x"),
        "B2's route: {out}\n{}",
        pb.log()
    );
    // Compiled from B2's policy alone: B's route is gone, and B2 stays default-deny.
    let out = get(to_b2, "/v1/orders/1");
    assert_eq!(status(&out), 403, "B's route must not apply to B2: {out}");
    assert!(out.contains("default deny"), "{out}");
    // A still expecting B is refused by its own sidecar's identity check.
    let out = get(to_b, "/v1/orders/1");
    assert_ne!(status(&out), 200, "{out}");
}

#[test]
fn an_svid_for_another_identity_is_refused_unless_identity_changes_are_allowed() {
    if !require_tool("curl", "l7") {
        return;
    }
    const B2: &str = "spiffe://example.org/ns/demo/sa/b2";
    let s = one_route_setup("l7-id-pinned");
    let (d, ca, web_port, fa, fb, policies) =
        (s.dir.path(), &s.ca, s.web_port, &s.fa, &s.fb, &s.policies);
    write_policy(
        policies,
        "b2.yaml",
        &one_route("for-b2", B2, web_port, "/admin", A),
    );
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    b.policy_dir = Some(policies.clone());
    // One worker on each side: one pooled connection carries every request below.
    b.workers = Some(1);
    let pb = b.start(d, fb);
    let (to_b, to_b2) = (free_port(), free_port());
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(to_b, b_web, B.into()), (to_b2, b_web, B2.into())];
    a.workers = Some(1);
    let pa = a.start(d, fa);
    let get =
        |port: u16, path: &str| curl_args(&["-i", &format!("http://127.0.0.1:{port}{path}")]).1;
    let out = get(to_b, "/v1/orders/1");
    assert!(out.contains("hello from b (GET /v1/orders/1"), "{out}");
    assert_eq!(status(&get(to_b, "/admin/x")), 403);

    // B's SVID files now hold a valid SVID for B2 (signed by the same CA).
    let b2 = ca.svid(B2);
    write_atomic(&fb.key, b2.key_pem().as_bytes());
    write_atomic(&fb.cert, b2.chain_pem().as_bytes());
    pb.wait_log("pinned to", Duration::from_secs(10));
    let failures = || {
        count(
            &b,
            "sigil_reloads_total{",
            &["resource=\"svid\"", "result=\"failure\""],
        )
    };
    wait_until("the refusal counted", Duration::from_secs(5), || {
        failures() >= 1.0
    });
    // A few more polls: the refusal must hold, not just delay the change.
    std::thread::sleep(Duration::from_millis(800));
    // Still B, with B's policy, on the pooled connection and on new ones.
    let out = get(to_b, "/v1/orders/2");
    assert!(
        out.contains("hello from b (GET /v1/orders/2"),
        "{out}\n{}",
        pb.log()
    );
    let out = get(to_b, "/admin/x");
    assert_eq!(status(&out), 403, "B2's route must not apply: {out}");
    assert!(out.contains("default deny"), "{out}");
    // A caller expecting B2 finds B, and its own sidecar refuses that.
    let out = get(to_b2, "/admin/x");
    assert_ne!(status(&out), 200, "{out}\n{}", pa.log());
    assert!(!out.contains("hello from b"), "{out}");
    let metrics = b.metrics();
    assert!(
        metrics.contains(&format!("local_id=\"{B}\"")) && !metrics.contains(B2),
        "{metrics}"
    );
    let log = pb.log();
    assert!(
        log.contains(&format!("the SVID is for {B2}")) && log.contains("allowIdentityChange"),
        "{log}"
    );
    assert!(!log.contains("SVID rotated"), "{log}");
}

#[test]
fn clients_that_are_not_sidecars_get_l7_with_or_without_alpn() {
    if !require_tool("curl", "l7") {
        return;
    }
    // What tells the sidecar the HTTP version: ALPN `http/1.1` from curl, protocol detection
    // on a port no policy declares, or hyper-util's auto builder on a declared `http` port
    // when the client sends no ALPN at all.
    let s = one_route_setup("l7-not-a-sidecar");
    let (d, web_port, fa, fb) = (s.dir.path(), s.web_port, &s.fa, &s.fb);
    let declared = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(declared, web_port)];
    b.policy_dir = Some(s.policies.clone());
    let pb = b.start(d, fb);
    // The same workload behind a sidecar with no policy: its port is undeclared, so sniffed.
    let sniffed = free_port();
    let mut b2 = Sidecar::new("sidecar-b2", B);
    b2.inbound = vec![(sniffed, web_port)];
    let _pb2 = b2.start(d, fb);
    // The sidecars' certificates name no host, so curl cannot check them (-k); it still
    // presents A's SVID, which the sidecars check.
    let cert = fa.cert.to_string_lossy().into_owned();
    let key = fa.key.to_string_lossy().into_owned();
    let get = |port: u16, path: &str, alpn: bool| {
        let url = format!("https://127.0.0.1:{port}{path}");
        let mut args = vec!["-i", "-k", "--cert", &cert, "--key", &key];
        if !alpn {
            args.push("--no-alpn");
        }
        args.push(&url);
        curl_args(&args).1
    };
    for alpn in [true, false] {
        let out = get(declared, "/v1/orders/1", alpn);
        assert!(
            out.contains("hello from b (GET /v1/orders/1")
                && out.contains(&format!("peer-id={A} ")),
            "alpn {alpn}: {out}\n{}",
            pb.log()
        );
        let out = get(declared, "/admin", alpn);
        assert_eq!(status(&out), 403, "alpn {alpn}: {out}");
        assert!(out.contains("default deny"), "alpn {alpn}: {out}");
        let out = get(sniffed, "/anything", alpn);
        assert!(
            out.contains("hello from b (GET /anything") && out.contains(&format!("peer-id={A} ")),
            "alpn {alpn}, sniffed: {out}"
        );
    }
    let served = count(
        &b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", &format!("peer_id=\"{A}\"")],
    );
    assert_eq!(served, 4.0, "{}", b.metrics());
}

/// Starts `curl URL` on a thread; joins to its result and the instant it returned.
fn in_flight(url: &str) -> std::thread::JoinHandle<((bool, String), std::time::Instant)> {
    let url = url.to_string();
    let t = std::thread::spawn(move || {
        let out = curl_args(&[&url]);
        (out, std::time::Instant::now())
    });
    // Long enough for the request to reach the workload, well short of its 900 ms.
    std::thread::sleep(Duration::from_millis(200));
    t
}

fn reloads(s: &Sidecar) -> f64 {
    count(
        s,
        "sigil_reloads_total{",
        &["resource=\"bundle\"", "result=\"success\""],
    )
}
