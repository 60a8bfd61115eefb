//! Per-route scope at L7 through a real sidecar pair: policies from a policy directory,
//! curl (HTTP/1.1 and h2c) and raw requests for each bypass attempt.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

fn api_policy(web: u16, echo: u16, promo_expiry: i64, stream_allow: &str) -> String {
    policy(
        "api",
        "L7 end-to-end test",
        B,
        &format!(
            "    - port: {web}
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
        ),
    )
}

fn curl_args(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("curl");
    // Generous: this file's tests run side by side on two cores with debug builds, and the
    // 12 MiB body test can hold a request up for seconds (5 s was seen to run out).
    cmd.args(["-sS", "--max-time", "20"]).args(args);
    run(&mut cmd, Duration::from_secs(30))
}

/// `sigil_connections_opened_total` of `s` in `direction` with `peer`.
fn opened(s: &Sidecar, direction: &str, peer_id: &str) -> f64 {
    count(
        s,
        "sigil_connections_opened_total{",
        &[&format!("direction=\"{direction}\""), &peer(peer_id)],
    )
}

/// `sigil_connections_closed_total` of `s` in `direction` for `reason`.
fn closed_for(s: &Sidecar, direction: &str, reason: &str) -> f64 {
    count(
        s,
        "sigil_connections_closed_total{",
        &[
            &format!("direction=\"{direction}\""),
            &format!("reason=\"{reason}\""),
        ],
    )
}

/// The routes test's pair: B in front of a web and an echo workload, with the `api` policy in
/// its policy directory; A with one worker, so that one pooled connection carries every
/// request (counted below).
struct Routes {
    p: Pair,
    web: Ports,
    echo: Ports,
    policies: PathBuf,
    promo_expiry: i64,
}

impl Routes {
    fn start() -> Self {
        let (mut s, web, echo) = PairSetup::web_and_echo("l7");
        let policies = resource_dir(s.path(), "policies");
        let promo_expiry = now_unix() + 6;
        write_resource(
            &policies,
            "api.yaml",
            &api_policy(web.workload, echo.workload, promo_expiry, A),
        );
        s.b.policy_dir = Some(policies.clone());
        s.a.workers = Some(1);
        Self {
            p: s.start(),
            web,
            echo,
            policies,
            promo_expiry,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web.a_out)
    }
}

#[test]
fn routes_by_identity_with_dry_run_expiry_normalization_and_live_policy_changes() {
    if !require_tool("curl", "l7") {
        return;
    }
    let r = Routes::start();
    allowed_then_denied_on_one_pooled_connection(&r);
    h2c_and_the_route_metrics(&r);
    every_bypass_attempt_is_refused(&r);
    a_route_expires_by_the_sidecars_clock(&r);
    a_policy_change_closes_a_live_tcp_stream(&r);
    an_invalid_policy_leaves_the_last_good_one_in_force(&r);
}

/// Allowed route; the workload learns the verified caller, and a forged header is dropped.
/// Denied route: 403 naming the rule; the same connection then serves an allowed request.
fn allowed_then_denied_on_one_pooled_connection(r: &Routes) {
    let (ok, out) = curl_args(&[
        "-H",
        "x-sigil-peer-id: spiffe://evil.org/x",
        &r.url("/v1/orders/7"),
    ]);
    assert!(
        ok && out.contains("hello from b (GET /v1/orders/7"),
        "{out}\n{}",
        r.p.pb.log()
    );
    assert!(
        out.contains(&format!("peer-id={A} ")),
        "forged or missing peer header: {out}"
    );

    let before = opened(&r.p.b, "inbound", A);
    let (_, out) = curl_args(&[
        "-w",
        "[%{http_code}]\n",
        &r.url("/admin"),
        &r.url("/v1/orders/8"),
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
        opened(&r.p.b, "inbound", A),
        before,
        "the pooled connection was not reused after a denial"
    );
}

/// HTTP/2 prior knowledge, forwarded to an HTTP/1.1 workload; then the metrics: requests by
/// route and decision, and dry-run "would deny" for the audit rule.
fn h2c_and_the_route_metrics(r: &Routes) {
    let (ok, out) = curl_args(&[
        "--http2-prior-knowledge",
        "-w",
        "[h%{http_version}]",
        &r.url("/v1/orders/9"),
    ]);
    assert!(
        ok && out.contains("hello from b (GET /v1/orders/9") && out.contains("[h2]"),
        "{out}"
    );

    let mb = r.p.b.metrics();
    let requests = |labels: &[&str]| metric(&mb, "sigil_requests_total{", labels).unwrap_or(0.0);
    assert!(
        requests(&[
            "route=\"api/orders\"",
            "decision=\"allow\"",
            "status_class=\"2xx\"",
            &peer(A)
        ]) >= 3.0,
        "{mb}"
    );
    assert!(
        requests(&[
            "route=\"default_deny\"",
            "decision=\"deny\"",
            "status_class=\"4xx\""
        ]) >= 1.0,
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
    assert!(r.p.pb.log().contains("dry-run: would deny"));
}

/// A request for `target` through A with `extra` header lines, closing the connection.
fn req(target: &str, extra: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: b\r\n{extra}Connection: close\r\n\r\n")
}

/// Each attempt to slip past a route check, as raw bytes through A's sidecar.
fn every_bypass_attempt_is_refused(r: &Routes) {
    let a_web = r.web.a_out;
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
}

/// Expiry by the sidecar's own clock: /promo is allowed until its expiresAt.
fn a_route_expires_by_the_sidecars_clock(r: &Routes) {
    let promo = || curl_args(&["-w", "[%{http_code}]", &r.url("/promo")]).1;
    if now_unix() < r.promo_expiry - 1 {
        assert!(promo().contains("[200]"), "promo before expiry");
    }
    wait_until("promo expiry", Duration::from_secs(15), || {
        now_unix() > r.promo_expiry
    });
    let out = promo();
    assert!(
        out.contains("[403]") && out.contains("default deny"),
        "after expiry: {out}"
    );
}

/// A live TCP connection on the tcp port; a policy change that drops A closes it.
fn a_policy_change_closes_a_live_tcp_stream(r: &Routes) {
    let mut s = echo_stream(r.echo.a_out, b"ping\n");
    write_resource(
        &r.policies,
        "api.yaml",
        &api_policy(r.web.workload, r.echo.workload, r.promo_expiry, C),
    );
    assert!(closed(&mut s), "connection survived the policy change");
    wait_until(
        "policy_change close counted",
        Duration::from_secs(5),
        || {
            count(
                &r.p.b,
                "sigil_connections_closed_total{",
                &["reason=\"policy_change\""],
            ) >= 1.0
        },
    );
    assert!(reloads(&r.p.b, "policy", "success") >= 2.0);
}

/// An invalid policy file is refused with file:line; the last good policies stay in force.
fn an_invalid_policy_leaves_the_last_good_one_in_force(r: &Routes) {
    let fails = reloads(&r.p.b, "policy", "failure");
    write_resource(
        &r.policies,
        "broken.yaml",
        "apiVersion: sigil.dev/v1\nkind: Policy\nmetadata: {name: x}\nspec: {target: nope}\n",
    );
    wait_until("the refused policy update", Duration::from_secs(5), || {
        reloads(&r.p.b, "policy", "failure") > fails
    });
    r.p.pb.wait_log("broken.yaml:", Duration::from_secs(2));
    let (ok, out) = curl_args(&[&r.url("/v1/orders/11")]);
    assert!(
        ok && out.contains("hello from b"),
        "last good policy lost: {out}"
    );
}

#[test]
fn undeclared_ports_are_sniffed_http_gets_l7_and_opaque_bytes_are_relayed() {
    if !require_tool("curl", "l7-detect") {
        return;
    }
    // No policy targets B: mTLS alone admits A, and nothing declares a protocol.
    let (mut s, web, echo) = PairSetup::web_and_echo("l7-detect");
    let policies = resource_dir(s.path(), "policies");
    s.b.policy_dir = Some(policies.clone());
    let mut p = s.start();

    http_is_detected_and_gets_l7(&p, web);
    opaque_bytes_are_relayed_untouched(&p, echo);
    declaring_a_port_http_closes_its_byte_streams(&p, web, echo, &policies);
    sigterm_ends_a_pooled_connection_gracefully(&mut p, web);
}

/// HTTP/1.1 and h2c are detected: the workload gets the verified caller's ID.
fn http_is_detected_and_gets_l7(p: &Pair, web: Ports) {
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{}/x", web.a_out)]);
    assert!(ok && out.contains(&format!("peer-id={A} ")), "{out}");
    let (ok, out) = curl_args(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/y", web.a_out),
    ]);
    assert!(ok && out.contains(&format!("peer-id={A} ")), "{out}");
    let mb = p.b.metrics();
    let n = metric(
        &mb,
        "sigil_requests_total{",
        &["route=\"no_policy\"", "decision=\"allow\""],
    );
    assert_eq!(n, Some(2.0), "{mb}");
}

/// Opaque bytes (here: binary, not a request line) are relayed untouched, both ways; and
/// connections served at L7 count their bytes too.
fn opaque_bytes_are_relayed_untouched(p: &Pair, echo: Ports) {
    let mut s = TcpStream::connect(("127.0.0.1", echo.a_out)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    assert!(back == payload, "opaque stream corrupted");
    let mb = p.b.metrics();
    let n = metric(&mb, "sigil_requests_total{", &["route=\"no_policy\""]);
    assert_eq!(n, Some(2.0), "the opaque stream was treated as HTTP: {mb}");
    drop(s);

    let rx = metric(&mb, "sigil_bytes_received_total{", &[&peer(A)]).unwrap_or(0.0);
    assert!(rx > 100_000.0 + 100.0, "L7 bytes not counted: {rx}\n{mb}");
}

/// A policy now declares the echo port `http`: a byte stream opened before would bypass
/// every route check, so it is closed (policy_change).
fn declaring_a_port_http_closes_its_byte_streams(
    p: &Pair,
    web: Ports,
    echo: Ports,
    policies: &Path,
) {
    let mut s = echo_stream(echo.a_out, b"\x00ping");
    let all = format!("routes: [{{name: all, match: {{path: {{prefix: /}}}}, allow: [{A}]}}]");
    let http_ports = policy(
        "now-http",
        "declare both ports http",
        B,
        &format!(
            "    - port: {}\n      {all}\n    - port: {}\n      {all}\n",
            web.workload, echo.workload
        ),
    );
    write_resource(policies, "http.yaml", &http_ports);
    assert!(closed(&mut s), "byte stream survived its port turning http");
    wait_until(
        "policy_change close counted",
        Duration::from_secs(5),
        || {
            count(
                &p.b,
                "sigil_connections_closed_total{",
                &["reason=\"policy_change\""],
            ) == 1.0
        },
    );
    let (ok, out) = curl_args(&[&format!("http://127.0.0.1:{}/still", web.a_out)]);
    assert!(ok && out.contains("hello from b (GET /still"), "{out}");
}

/// SIGTERM with an idle pooled connection from A open: B closes it gracefully (GOAWAY)
/// and exits without waiting for the drain deadline; A sees a clean end, and its
/// workload's keep-alive connection stays usable, answering 502 while B is gone.
fn sigterm_ends_a_pooled_connection_gracefully(p: &mut Pair, web: Ports) {
    let mut ka = TcpStream::connect(("127.0.0.1", web.a_out)).unwrap();
    ka.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ka.write_all(b"GET /keep HTTP/1.1\r\nHost: b\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut ka);
    assert!(resp.contains("hello from b"), "{resp}");
    let done_before = closed_for(&p.a, "outbound", "done");
    let code = p.pb.terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", p.pb.log());
    assert!(
        !p.pb.log().contains("drain deadline passed"),
        "HTTP connection was cut, not drained:\n{}",
        p.pb.log()
    );
    wait_until(
        "A's pooled connection to end cleanly",
        Duration::from_secs(5),
        || closed_for(&p.a, "outbound", "done") > done_before,
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
    let (mut s, web) = PairSetup::web("l7-pool");
    s.a.workers = Some(1);
    let t = PoolTest {
        p: s.start(),
        web,
        url: format!("http://127.0.0.1:{}/p", web.a_out),
        impostor: Ca::new("example.org"),
    };

    one_pooled_connection_carries_every_request(&t.p, &t.url);
    a_bundle_change_at_a_cuts_the_pool_after_the_request_in_flight(&t);
    // Trust restored: a new pooled connection, and requests flow again.
    t.p.fa.trust(&t.p.ca);
    wait_until("requests flow again", Duration::from_secs(5), || {
        curl_args(&[&t.url]).1.contains("hello from b")
    });
    assert_eq!(opened(&t.p.a, "outbound", B), 2.0, "{}", t.p.a.metrics());
    a_bundle_change_at_b_cuts_the_pool_after_the_request_in_flight(&t);
}

/// The pooled-connection test's pair (one worker in A), its URL through A, and a CA of the
/// same trust domain that signed neither SVID.
struct PoolTest {
    p: Pair,
    web: Ports,
    url: String,
    impostor: Ca,
}

/// Twenty workload connections, HTTP/1.1 and h2c, sequential and concurrent: one
/// connection between the sidecars carries all of them.
fn one_pooled_connection_carries_every_request(p: &Pair, url: &str) {
    for i in 0..10 {
        let (ok, out) = curl_args(&[&format!("{url}/{i}")]);
        assert!(ok && out.contains(&format!("GET /p/{i} ")), "{out}");
    }
    let (ok, out) = curl_args(&["--http2-prior-knowledge", url]);
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
    let (a, b) = (&p.a, &p.b);
    let allowed = count(
        b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "decision=\"allow\""],
    );
    assert_eq!(allowed, 20.0, "{}", b.metrics());
    assert_eq!(opened(b, "inbound", A), 1.0, "{}", b.metrics());
    assert_eq!(opened(a, "outbound", B), 1.0, "{}", a.metrics());
    let forwarded = count(
        a,
        "sigil_requests_total{",
        &[
            "direction=\"outbound\"",
            "decision=\"forward\"",
            "status_class=\"2xx\"",
        ],
    );
    assert_eq!(forwarded, 20.0, "{}", a.metrics());
    let (_, dump) = a.admin_get("/config_dump").unwrap();
    assert!(dump.contains("\"kind\": \"pooled\""), "{dump}");
}

/// A request that takes 900 ms, started through A; then sidecar `who` (`s`, with `files`)
/// trusts the impostor in place of the pair's CA, and has reloaded its bundle. Returns the
/// request, and the instant the change was in force.
fn slow_request_across_a_trust_change(
    t: &PoolTest,
    s: &Sidecar,
    files: &IdentityFiles,
    who: &str,
) -> (InFlight, std::time::Instant) {
    let slow = in_flight(&format!("http://127.0.0.1:{}/slow/900", t.web.a_out));
    let reloaded = reloads(s, "bundle", "success");
    files.trust(&t.impostor);
    wait_until(
        &format!("{who}'s bundle reload"),
        Duration::from_secs(5),
        || reloads(s, "bundle", "success") > reloaded,
    );
    (slow, std::time::Instant::now())
}

/// A stops trusting the CA that issued B's SVID while a request is in flight. The pooled
/// connection takes no new requests: the next one dials afresh and is refused at the
/// handshake (502). The request in flight, authorized when it started, still completes;
/// then the connection is cut.
fn a_bundle_change_at_a_cuts_the_pool_after_the_request_in_flight(t: &PoolTest) {
    let (p, url, a) = (&t.p, t.url.as_str(), &t.p.a);
    let (slow, changed_at) = slow_request_across_a_trust_change(t, a, &p.fa, "A");
    let (ok, out) = curl_args(&["-w", "[%{http_code}]", url]);
    assert!(
        ok && out.contains("[502]") && !out.contains("hello from b"),
        "{out}\n{}",
        p.pa.log()
    );
    let ((ok, out), answered_at) = slow.join().unwrap();
    assert!(
        answered_at > changed_at,
        "the slow request was not in flight at the bundle change"
    );
    assert!(ok && out.contains("GET /slow/900"), "{out}\n{}", p.pa.log());
    wait_until("the pooled connection cut", Duration::from_secs(5), || {
        closed_for(a, "outbound", "bundle_change") == 1.0
    });
    let untrusted = count(
        a,
        "sigil_handshake_failures_total{",
        &["direction=\"outbound\""],
    );
    assert!(untrusted >= 1.0, "{}", a.metrics());
}

/// The same from B's side: B stops trusting A's CA mid-request. B answers the request in
/// flight, sends GOAWAY, and refuses A's next handshake.
fn a_bundle_change_at_b_cuts_the_pool_after_the_request_in_flight(t: &PoolTest) {
    let (p, url, b) = (&t.p, t.url.as_str(), &t.p.b);
    let (slow, changed_at) = slow_request_across_a_trust_change(t, b, &p.fb, "B");
    let ((ok, out), answered_at) = slow.join().unwrap();
    assert!(
        answered_at > changed_at,
        "the slow request was not in flight at the bundle change"
    );
    assert!(ok && out.contains("GET /slow/900"), "{out}\n{}", p.pb.log());
    let (ok, out) = curl_args(&["-w", "[%{http_code}]", url]);
    assert!(ok && out.contains("[502]"), "{out}\n{}", p.pa.log());
    wait_until(
        "B's inbound connection closed",
        Duration::from_secs(5),
        || closed_for(b, "inbound", "bundle_change") == 1.0,
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
    let (mut s, web) = PairSetup::web("l7-bodies");
    s.a.workers = Some(2);
    let p = s.start();
    let (d, a, pa, pb, a_web) = (p.path(), &p.a, &p.pa, &p.pb, web.a_out);

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
        a,
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
    let (mut s, web) = PairSetup::web("l7-pool-idle");
    s.a.pool_idle = "1s";
    s.a.workers = Some(1);
    let p = s.start();
    let (a, pa, a_web) = (&p.a, &p.pa, web.a_out);
    let peer = peer(B);
    let outbound =
        |series: &str, extra: &str| count(a, series, &["direction=\"outbound\"", &peer, extra]);

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
    let (mut s, web) = PairSetup::web("l7-workload-pool");
    s.a.workers = Some(1);
    let mut p = s.start();
    let (web_port, a_web) = (web.workload, web.a_out);
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
    p.workloads[0].terminate(Duration::from_secs(5));
    let mut cmd = Command::new(bin("sigil-toy-workload"));
    cmd.args(["--listen", &format!("127.0.0.1:{web_port}"), "--name", "b"]);
    let _web2 = Proc::spawn("b2", &mut cmd);
    wait_for_port(([127, 0, 0, 1], web_port).into(), Duration::from_secs(10));
    let after = get("/after-restart");
    assert_ne!(after, first);
    assert_eq!(get("/again"), after, "the new connection is pooled in turn");
    let failed = count(
        &p.b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "status_class=\"5xx\""],
    );
    assert_eq!(failed, 0.0, "{}", p.b.metrics());
}

/// A policy for `target` on `port`: `caller` may GET under `prefix`, nothing else.
fn one_route(name: &str, target: &str, port: u16, prefix: &str, caller: &str) -> String {
    policy(
        name,
        "ID change test",
        target,
        &format!(
            "    - port: {port}
      routes:
        - {{name: only, match: {{methods: [GET], path: {{prefix: {prefix}}}}}, allow: [{caller}]}}
"
        ),
    )
}

const B2: &str = "spiffe://example.org/ns/demo/sa/b2";

/// A pair over B's toy workload whose B reads a policy directory in which A may GET under
/// `/v1/orders` (`one_route`); not started.
fn one_route_setup(tag: &str) -> (PairSetup, Ports, PathBuf) {
    let (mut s, web) = PairSetup::web(tag);
    let policies = resource_dir(s.path(), "policies");
    write_resource(
        &policies,
        "b.yaml",
        &one_route("for-b", B, web.workload, "/v1/orders", A),
    );
    s.b.policy_dir = Some(policies.clone());
    (s, web, policies)
}

/// `one_route_setup`, and a policy in the same directory letting A under `/admin` at B2. One
/// directory for both IDs, as a directory shared by several workloads would be: the sidecar
/// keeps only its own ID's policies parsed, so a change of ID must re-read B2's. A reaches
/// B's listener expecting B on `web.a_out` and B2 on the port returned.
fn two_ids_setup(tag: &str) -> (PairSetup, Ports, u16) {
    let (mut s, web, policies) = one_route_setup(tag);
    write_resource(
        &policies,
        "b2.yaml",
        &one_route("for-b2", B2, web.workload, "/admin", A),
    );
    let to_b2 = free_port();
    s.a.outbound.push((to_b2, web.b_in, B2.into()));
    (s, web, to_b2)
}

/// `curl -i` through a local port: the whole response.
fn get_i(port: u16, path: &str) -> String {
    curl_args(&["-i", &format!("http://127.0.0.1:{port}{path}")]).1
}

#[test]
fn policies_follow_the_sidecars_own_id_when_its_svid_changes_to_another() {
    if !require_tool("curl", "l7") {
        return;
    }
    let (mut s, web, to_b2) = two_ids_setup("l7-id-change");
    s.b.allow_identity_change = true;
    let p = s.start();
    let (pb, to_b) = (&p.pb, web.a_out);

    let out = get_i(to_b, "/v1/orders/1");
    assert!(
        out.contains("hello from b (GET /v1/orders/1"),
        "{out}\n{}",
        pb.log()
    );
    let out = get_i(to_b, "/admin/x");
    assert_eq!(status(&out), 403, "{out}");
    assert!(out.contains("default deny"), "{out}");

    // The SVID's files now hold B2's SVID.
    p.fb.install_svid(&p.ca.svid(B2));
    let out = poll(Duration::from_secs(15), Duration::from_millis(200), || {
        let out = get_i(to_b2, "/admin/x");
        if status(&out) == 200 {
            return Ok(out);
        }
        Err(format!("B2's route: {out}\n{}", pb.log()))
    });
    assert!(
        out.contains("hello from b (GET /admin/x"),
        "B2's route: {out}\n{}",
        pb.log()
    );
    // Compiled from B2's policy alone: B's route is gone, and B2 stays default-deny.
    let out = get_i(to_b2, "/v1/orders/1");
    assert_eq!(status(&out), 403, "B's route must not apply to B2: {out}");
    assert!(out.contains("default deny"), "{out}");
    // A still expecting B is refused by its own sidecar's identity check.
    let out = get_i(to_b, "/v1/orders/1");
    assert_ne!(status(&out), 200, "{out}");
}

#[test]
fn an_svid_for_another_identity_is_refused_unless_identity_changes_are_allowed() {
    if !require_tool("curl", "l7") {
        return;
    }
    let (mut s, web, to_b2) = two_ids_setup("l7-id-pinned");
    // One worker on each side: one pooled connection carries every request below.
    s.b.workers = Some(1);
    s.a.workers = Some(1);
    let p = s.start();
    let (b, pa, pb, to_b) = (&p.b, &p.pa, &p.pb, web.a_out);
    let out = get_i(to_b, "/v1/orders/1");
    assert!(out.contains("hello from b (GET /v1/orders/1"), "{out}");
    assert_eq!(status(&get_i(to_b, "/admin/x")), 403);

    // B's SVID files now hold a valid SVID for B2 (signed by the same CA).
    p.fb.install_svid(&p.ca.svid(B2));
    pb.wait_log("pinned to", Duration::from_secs(10));
    wait_until("the refusal counted", Duration::from_secs(5), || {
        reloads(b, "svid", "failure") >= 1.0
    });
    // A few more polls: the refusal must hold, not just delay the change.
    std::thread::sleep(Duration::from_millis(800));
    // Still B, with B's policy, on the pooled connection and on new ones.
    let out = get_i(to_b, "/v1/orders/2");
    assert!(
        out.contains("hello from b (GET /v1/orders/2"),
        "{out}\n{}",
        pb.log()
    );
    let out = get_i(to_b, "/admin/x");
    assert_eq!(status(&out), 403, "B2's route must not apply: {out}");
    assert!(out.contains("default deny"), "{out}");
    // A caller expecting B2 finds B, and its own sidecar refuses that.
    let out = get_i(to_b2, "/admin/x");
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
    // when the client sends no ALPN at all. No sidecar A: curl is the client.
    let (s, web, _) = one_route_setup("l7-not-a-sidecar");
    let (d, fa, fb) = (s.path(), &s.fa, &s.fb);
    let declared = web.b_in;
    let pb = s.b.start(d, fb);
    // The same workload behind a sidecar with no policy: its port is undeclared, so sniffed.
    let sniffed = free_port();
    let mut b2 = Sidecar::new("sidecar-b2", B);
    b2.inbound = vec![(sniffed, web.workload)];
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
        &s.b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", &peer(A)],
    );
    assert_eq!(served, 4.0, "{}", s.b.metrics());
}

/// A curl on a thread: its result and the instant it returned.
type InFlight = std::thread::JoinHandle<((bool, String), std::time::Instant)>;

/// Starts `curl URL` on a thread; joins to its result and the instant it returned.
fn in_flight(url: &str) -> InFlight {
    let url = url.to_string();
    let t = std::thread::spawn(move || {
        let out = curl_args(&[&url]);
        (out, std::time::Instant::now())
    });
    // Long enough for the request to reach the workload, well short of its 900 ms.
    std::thread::sleep(Duration::from_millis(200));
    t
}
