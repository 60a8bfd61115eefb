//! Bounded under abuse: each limit of `spec.limits` and `timeouts` met by a real client
//! sending the abuse (idle TCP floods from several source addresses on loopback, TLS
//! connections from an authenticated but greedy peer, a request head cut off halfway, a hung
//! workload), while a well-behaved caller's requests keep succeeding. Each test prints the
//! sidecar's RSS and open descriptors before and after.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sigil_e2e::*;
use sigil_testkit::Ca;

/// Raises this process's descriptor limit to at least `n` (the tests open thousands of
/// sockets).
fn raise_own_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "descriptor limit {} below {n}",
        lim.rlim_cur
    );
}

/// The toy workload behind sidecar B, and sidecar A calling it through its outbound
/// listener: the pair most tests here share, checked with one call. `tune_b` and `tune_a`
/// adjust each sidecar before it starts.
fn pair(
    tag: &str,
    tune_b: impl FnOnce(&mut Sidecar),
    tune_a: impl FnOnce(&mut Sidecar),
) -> (Pair, Ports) {
    let (mut s, web) = PairSetup::web(tag);
    tune_b(&mut s.b);
    tune_a(&mut s.a);
    let p = s.start();
    p.assert_reaches(web, "/orders/1");
    (p, web)
}

/// (RSS in KiB, open descriptors) of a process.
fn resources(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

fn show(what: &str, pid: u32) -> (u64, usize) {
    let (rss, fds) = resources(pid);
    eprintln!(
        "{what}: RSS {:.1} MiB, {fds} descriptors",
        rss as f64 / 1024.0
    );
    (rss, fds)
}

/// The sidecar's `open` counts from its config dump: (connections, pending handshakes).
fn open(s: &Sidecar) -> (u64, u64) {
    let (_, dump) = s.admin_get("/config_dump").expect("dump");
    let field = |name: &str| {
        let at = dump.find(&format!("\"{name}\": ")).expect(name) + name.len() + 4;
        dump[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("a count")
    };
    (field("connections"), field("pending_handshakes"))
}

fn refused(s: &Sidecar, reason: &str) -> f64 {
    count(
        s,
        "sigil_connections_refused_total{",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// How many calls the well-behaved caller makes at the least.
const STEADY_CALLS: u32 = 20;

/// A caller that behaves: one request a connection through A every 20 ms until stopped and
/// `STEADY_CALLS` made (at most 60 s, 3,000 calls).
fn steady(a_web: u16) -> Load {
    Steady {
        min_calls: STEADY_CALLS as usize,
        max_calls: 3_000,
        ..Steady::fresh(a_web, "/orders/steady")
    }
    .start()
}

/// Stops the well-behaved caller: it made at least `STEADY_CALLS` calls, and every one
/// succeeded; else panics saying `what` happened, with `log`.
fn assert_served(load: Load, what: &str, log: &str) {
    let (ok, failed) = load.stop().tally();
    assert!(
        failed.is_empty() && ok >= STEADY_CALLS,
        "{what}: {failed:?} ({ok} ok)\n{log}"
    );
}

/// `n` TCP connections to `port` from source address `from` that never say a word.
fn idle_from(from: [u8; 4], port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from((from, 0))).unwrap();
            v.push(s.connect(([127, 0, 0, 1], port).into()).await.unwrap());
        }
        v
    })
}

/// `n` mTLS connections to B's inbound `port` from source `from`, presenting C's SVID and
/// offering raw TCP: an authenticated peer that opens many and sends nothing. Returns the
/// ones whose handshake completed, kept open, and how many did not complete.
fn tls_from(
    rt: &tokio::runtime::Runtime,
    ca: &Ca,
    from: [u8; 4],
    port: u16,
    n: usize,
) -> (
    Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    usize,
) {
    tls_carrying(rt, ca, from, port, n, sigil_filters::tls::Carries::Tcp)
}

/// `tls_from`, offering `carries` (ALPN) instead of raw TCP.
fn tls_carrying(
    rt: &tokio::runtime::Runtime,
    ca: &Ca,
    from: [u8; 4],
    port: u16,
    n: usize,
    carries: sigil_filters::tls::Carries,
) -> (
    Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    usize,
) {
    use rustls::pki_types::ServerName;

    let config = SidecarTls::new(ca, C).client(B, carries);
    let connector = tokio_rustls::TlsConnector::from(config);
    rt.block_on(async {
        let (mut open, mut failed) = (Vec::new(), 0);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::from((from, 0))).unwrap();
            let tcp = s.connect(([127, 0, 0, 1], port).into()).await.unwrap();
            let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            match tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => {
                    // TLS 1.3: the client finishes before the server has read its
                    // Finished; a refused connection shows as closed right after.
                    open.push(tls);
                }
                _ => failed += 1,
            }
        }
        (open, failed)
    })
}

#[test]
fn connection_and_handshake_limits_refuse_floods_while_others_are_served() {
    // Bound whole: a field left to `..` would be dropped, and its process ended.
    let (s, web) = pair(
        "abuse-limits",
        |b| {
            // Longer than the test: the flood's handshakes must not time out under a busy
            // machine and change the counts.
            b.handshake_timeout = "60s";
            b.limits = Some(
                "{maxConnections: 200, maxConnectionsPerSource: 80, maxPendingHandshakes: 100, \
                 maxPendingHandshakesPerSource: 40}"
                    .into(),
            );
        },
        |a| a.workers = Some(1),
    );
    let (ca, b, pb, b_web, a_web) = (&s.ca, &s.b, &s.pb, web.b_in, web.a_out);
    let before = show("sidecar B before", pb.pid());
    let calls = steady(a_web);

    // Idle TCP from 127.0.0.2: 40 handshakes may wait, the rest are refused at once.
    let flood2 = idle_from([127, 0, 0, 2], b_web, 100);
    wait_until(
        "60 refused for one source's handshakes",
        Duration::from_secs(10),
        || refused(b, "too_many_handshakes_from_source") == 60.0,
    );
    // From two more addresses: 100 handshakes in all may wait.
    let flood3 = idle_from([127, 0, 0, 3], b_web, 40);
    let flood4 = idle_from([127, 0, 0, 4], b_web, 40);
    wait_until(
        "20 refused for all handshakes",
        Duration::from_secs(10),
        || refused(b, "too_many_handshakes") == 20.0,
    );
    assert_eq!(open(b).1, 100, "pending handshakes");
    show("sidecar B with 100 handshakes pending", pb.pid());
    // Its admin port, which listens on every address for scrapes: 16 per source.
    let admin_flood = idle_from([127, 0, 0, 9], b.admin, 40);
    wait_until(
        "24 admin connections refused",
        Duration::from_secs(10),
        || refused(b, "admin_limit") == 24.0,
    );
    let (code, body) = b.admin_get("/ready").expect("admin");
    assert_eq!(code, 200, "the probe must still be answered: {body}");
    drop(admin_flood);
    drop((flood2, flood3, flood4));
    wait_until(
        "the flood's handshakes gone",
        Duration::from_secs(10),
        || open(b).1 == 0,
    );

    // An authenticated peer (C) that completes handshakes and holds the connections.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (held5, _) = tls_from(&rt, ca, [127, 0, 0, 5], b_web, 100);
    wait_until(
        "20 refused for one source's connections",
        Duration::from_secs(10),
        || refused(b, "too_many_from_source") == 20.0,
    );
    let (open_now, _) = open(b);
    let (held6, _) = tls_from(&rt, ca, [127, 0, 0, 6], b_web, 80);
    let (held7, _) = tls_from(&rt, ca, [127, 0, 0, 7], b_web, 80);
    let over = (open_now + 160).saturating_sub(200) as f64;
    wait_until(
        "the total bound refuses the rest",
        Duration::from_secs(10),
        || refused(b, "too_many_connections") == over,
    );
    assert_eq!(open(b).0, 200, "open connections at the bound");
    let during = show("sidecar B at 200 connections", pb.pid());
    // The caller that behaves was served throughout.
    assert_served(
        calls,
        "the well-behaved caller failed during the floods",
        &pb.log(),
    );
    // One more refusal, a second later: its line says how many were held back.
    std::thread::sleep(Duration::from_millis(1_100));
    let late = idle_from([127, 0, 0, 8], b_web, 1);
    pb.wait_log("suppressed=", Duration::from_secs(10));
    drop((held5, held6, held7, late));
    wait_until("the held connections gone", Duration::from_secs(10), || {
        open(b).0 <= 1
    });
    let after = show("sidecar B after", pb.pid());
    assert!(during.1 > before.1 + 100, "{before:?} {during:?}");
    assert!(
        after.1 <= before.1 + 10,
        "descriptors left open: {before:?} {after:?}"
    );
    // Every refusal is counted; the log says only some of them, and how many it held back.
    let log = pb.log();
    let lines = log.matches("connection refused: ").count();
    let refusals = 60 + 20 + 20 + over as usize + 1;
    assert!(
        lines < refusals,
        "{lines} log lines for {refusals} refusals"
    );
    drop(rt);
}

#[test]
fn a_hung_workload_gets_504_and_a_silent_relayed_connection_is_closed() {
    let (mut s, web) = PairSetup::web("abuse-timeouts");
    // A second pair of listeners to the same workload, for raw bytes.
    let raw = s.serve(web.workload);
    s.b.timeouts = vec![("request", "1s"), ("idle", "2s")];
    // A waits longer: B's relay is the one that must notice.
    s.a.timeouts = vec![("idle", "60s")];
    let p = s.start();
    let (b, pa, pb, a_web, a_raw) = (&p.b, &p.pa, &p.pb, web.a_out, raw.a_out);
    let before = show("sidecar B before", pb.pid());

    // The workload takes 30 s to answer; the sidecar answers 504 after 1 s and lets go.
    let calls = steady(a_web);
    let started = Instant::now();
    let (status, body) = sigil_testkit::http::get_once(a_web, "/slow/30000").expect("an answer");
    assert_eq!(status, 504, "{body}\n{}", pb.log());
    assert!(body.contains("workload did not answer within 1s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(25), "not cut short");
    let timed_out = count(
        b,
        "sigil_requests_total{",
        &["direction=\"inbound\"", "status_class=\"5xx\""],
    );
    assert_eq!(timed_out, 1.0, "{}", b.metrics());

    // A request head cut off halfway, then silence: A cannot tell HTTP from bytes and relays
    // them; B relays them to the workload, which waits for the rest. B's relay closes it
    // after 2 s without a byte, and A's follows.
    let mut silent = TcpStream::connect(("127.0.0.1", a_raw)).unwrap();
    std::io::Write::write_all(&mut silent, b"GE").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(closed(&mut silent), "the silent connection was not closed");
    wait_until(
        "B's relay closed for idleness",
        Duration::from_secs(10),
        || {
            count(
                b,
                "sigil_connections_closed_total{",
                &["direction=\"inbound\"", "reason=\"idle_timeout\""],
            ) == 1.0
        },
    );
    assert_served(calls, "the well-behaved caller failed", &pa.log());
    let after = show("sidecar B after", pb.pid());
    assert!(
        after.1 <= before.1 + 10,
        "descriptors left open: {before:?} {after:?}"
    );
}

/// 2,000 idle relayed connections from 20 source addresses, then closed: the memory they
/// took goes back to the system (it stayed resident before workers returned it).
#[test]
fn memory_returns_near_its_baseline_after_a_flood() {
    let dir = TempDir::new("abuse-memory");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let (_web, web_port) = start_workload("b", false);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let b_web = free_port();
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_web, web_port)];
    // Room for 2,000 connections whatever the machine's defaults, in the sidecar and here.
    b.fd_limit = Some(8_192);
    raise_own_fd_limit(8_192);
    let pb = b.start(d, &fb);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Warm up: one connection through the whole path.
    drop(tls_from(&rt, &ca, [127, 0, 1, 1], b_web, 1));
    std::thread::sleep(Duration::from_millis(500));
    let baseline = show("sidecar B at rest", pb.pid());
    let mut held = Vec::new();
    for i in 0..20u8 {
        let (open, failed) = tls_from(&rt, &ca, [127, 0, 2, i + 1], b_web, 100);
        assert_eq!(failed, 0);
        held.extend(open);
    }
    wait_until("2,000 connections open", Duration::from_secs(20), || {
        open(&b).0 == 2_000
    });
    let peak = show("sidecar B with 2,000 idle connections", pb.pid());
    drop(held);
    wait_until("the connections gone", Duration::from_secs(20), || {
        open(&b).0 == 0
    });
    std::thread::sleep(Duration::from_secs(3));
    // Each worker gives its free memory back within a tick (5 s) of its load falling.
    const SLACK_KIB: u64 = 10 * 1024;
    assert!(
        peak.0 > baseline.0 + 4 * SLACK_KIB,
        "the flood cost little: {peak:?}"
    );
    poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let rss = resources(pb.pid()).0;
        (rss <= baseline.0 + SLACK_KIB)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "RSS {rss} KiB, not back within 10 MiB of the baseline ({} KiB)",
                    baseline.0
                )
            })
    });
    show("sidecar B after they closed", pb.pid());
    drop(rt);
}

/// A destination removed from the registry (its Workload deleted at the control plane): the
/// pooled connection to it is let go and closes, and its slot leaves the pool.
#[test]
fn pooled_connections_to_a_destination_that_left_the_registry_are_closed() {
    let (mut s, web) = PairSetup::web("abuse-pool-prune");
    let d = s.path().to_path_buf();
    let alice = write_identity(&d, "alice", &s.ca, ALICE, &[&s.ca]);
    let cp = ControlPlane::start_in(&d, &s.ca, CONTROL);
    cp.apply(
        &alice,
        &d.join("b.yaml"),
        &workload("b", "the b service", B, &[web.b_in]),
    );
    // A knows where B is only from the pushed registry.
    s.a.outbound[0].2 = String::new();
    s.a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
    s.a.workers = Some(1);
    let p = s.start();
    let (a, b, pa, pb, a_web) = (&p.a, &p.b, &p.pa, &p.pb, web.a_out);
    let pooled = |s: &Sidecar, direction: &str| {
        count(
            s,
            "sigil_connections_active{",
            &[&format!("direction=\"{direction}\"")],
        )
    };
    wait_until(
        "A calls B through the registry",
        Duration::from_secs(10),
        || get_once(a_web, "/orders/1") == Some(200),
    );
    assert_eq!(pooled(a, "outbound"), 1.0, "{}", a.metrics());
    assert_eq!(pooled(b, "inbound"), 1.0, "{}", b.metrics());

    let (code, out, err) = cp.sigil(&alice, &["delete", "Workload", "b"]);
    assert_eq!(code, Some(0), "{out}{err}");
    pa.wait_log("let go of pooled connections", Duration::from_secs(10));
    wait_until(
        "A's pooled connection to B closed",
        Duration::from_secs(10),
        || pooled(a, "outbound") == 0.0 && pooled(b, "inbound") == 0.0,
    );
    let (_, dump) = a.admin_get("/config_dump").unwrap();
    assert!(dump.contains("\"pooled_destinations\": 0"), "{dump}");
    assert_ne!(get_once(a_web, "/orders/2"), Some(200), "{}", pb.log());
    // The control plane first: its store is in the pair's directory.
    drop(cp);
}

/// At a low descriptor limit (600), the default bound on connections leaves `fdReserve`
/// descriptors for the sidecar's own use: a flood of 600 connections from twelve addresses
/// (each under the per-source bounds) is cut at (600 - 256) / 2 = 172, the reserve stays
/// free, and the caller that behaves still reaches the workload. Without the bound the
/// flood took every descriptor, and healthy requests got 502 because the sidecar could not
/// open a connection to its own workload.
#[test]
fn the_descriptor_reserve_keeps_the_workload_reachable_during_a_flood() {
    let (s, web) = pair(
        "abuse-fds",
        |b| {
            b.fd_limit = Some(600);
            b.handshake_timeout = "20s";
        },
        |a| a.workers = Some(1),
    );
    let (b, pb, b_web, a_web) = (&s.b, &s.pb, web.b_in, web.a_out);
    assert!(
        pb.log().contains("fd_limit=600 max_connections=172"),
        "{}",
        pb.log()
    );
    let before = show("sidecar B before", pb.pid());
    let calls = steady(a_web);
    let flood: Vec<_> = (0..12u8)
        .map(|i| idle_from([127, 0, 3, i + 1], b_web, 50))
        .collect();
    // 172 in all: A's pooled connection and 171 of the flood.
    wait_until("the total bound reached", Duration::from_secs(10), || {
        refused(b, "too_many_connections") == 429.0
    });
    let during = show("sidecar B at its bound", pb.pid());
    // Requests that need a new connection to the workload still get one.
    std::thread::sleep(Duration::from_millis(500));
    assert_served(calls, "the well-behaved caller failed", &pb.log());
    assert!(
        during.1 <= 600 - 256,
        "the reserve was not kept free: {during:?}"
    );
    drop(flood);
    wait_until("the flood gone", Duration::from_secs(10), || open(b).0 <= 1);
    let after = show("sidecar B after", pb.pid());
    assert!(after.1 <= before.1 + 10, "{before:?} {after:?}");
}

/// One HTTP/2 frame: length, type, flags, stream, payload (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HPACK: :method GET, :scheme http, :path /, :authority b (literal, not indexed).
const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'b'];

/// Writes `frames` to an HTTP/2 (sigil/h2) mTLS connection, reads until the sidecar closes
/// it (or 15 s), and returns the GOAWAY error code it sent, if any, and whether every frame
/// could be written.
async fn send_frames(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    frames: Vec<Vec<u8>>,
) -> (Option<u32>, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tokio::io::split(&mut tls);
    let reader = async {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(15), r.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    };
    let writer = async {
        let mut all = PREFACE.to_vec();
        all.extend(frame(SETTINGS, 0, 0, &[]));
        all.extend(frame(SETTINGS, 0x1, 0, &[]));
        if w.write_all(&all).await.is_err() {
            return false;
        }
        for f in frames {
            if w.write_all(&f).await.is_err() {
                return false;
            }
        }
        w.flush().await.is_ok()
    };
    let (got, wrote) = futures_util::future::join(reader, writer).await;
    // Walk the frames the sidecar sent for a GOAWAY.
    let (mut at, mut goaway) = (0, None);
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        if got[at + 3] == GOAWAY && at + 9 + 8 <= got.len() {
            let p = &got[at + 9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    (goaway, wrote)
}

/// HTTP/2 abuse from an authenticated peer at the inbound listener: rapid reset (streams
/// opened and cancelled at once, CVE-2023-44487) and a CONTINUATION flood (a header block
/// that never ends, CVE-2024-27316). hyper and h2 cut both with GOAWAY; the sidecar stays
/// small and serves everyone else.
#[test]
fn http2_rapid_reset_and_continuation_floods_are_cut() {
    use sigil_filters::tls::Carries;
    let (s, web) = pair("abuse-h2", |_| {}, |_| {});
    let (ca, b, pb, b_web, a_web) = (&s.ca, &s.b, &s.pb, web.b_in, web.a_out);
    let before = show("sidecar B before", pb.pid());
    let calls = steady(a_web);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Rapid reset: 20,000 streams, each cancelled right after its HEADERS.
    let (mut conns, failed) = tls_carrying(&rt, ca, [127, 0, 4, 1], b_web, 1, Carries::Http2);
    assert_eq!(failed, 0);
    let frames: Vec<Vec<u8>> = (0..20_000u32)
        .flat_map(|i| {
            let stream = 2 * i + 1;
            [
                frame(HEADERS, END_HEADERS | END_STREAM, stream, GET_ROOT),
                frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()),
            ]
        })
        .collect();
    let (goaway, _) = rt.block_on(send_frames(conns.remove(0), frames));
    // ENHANCE_YOUR_CALM (0xb): too many resets.
    assert_eq!(goaway, Some(0xb), "no GOAWAY for rapid reset\n{}", pb.log());
    let served = count(b, "sigil_requests_total{", &["direction=\"inbound\""]);
    assert!(
        served < 1_000.0,
        "{served} of 20,000 cancelled streams were served"
    );

    // CONTINUATION flood: one header block, 4,096 frames of 16 KiB that never end it.
    let (mut conns, failed) = tls_carrying(&rt, ca, [127, 0, 4, 2], b_web, 1, Carries::Http2);
    assert_eq!(failed, 0);
    let mut frames = vec![frame(HEADERS, END_STREAM, 1, GET_ROOT)];
    // Each fragment: a literal header (not indexed, new name) with a 16,000-byte value.
    let mut fragment = vec![0x00, 0x01, b'x', 0x7f, 0x81, 0x7c];
    fragment.resize(6 + 16_000, b'a');
    frames.extend((0..4_096).map(|_| frame(CONTINUATION, 0, 1, &fragment)));
    let (goaway, wrote_all) = rt.block_on(send_frames(conns.remove(0), frames));
    assert!(
        goaway.is_some() || !wrote_all,
        "a header block of 64 MiB was read to its end\n{}",
        pb.log()
    );
    let during = show("sidecar B after both floods", pb.pid());
    assert!(
        during.0 < before.0 + 64 * 1024,
        "the floods cost {} MiB: {before:?} {during:?}",
        (during.0 - before.0) / 1024
    );
    assert_served(calls, "the well-behaved caller failed", &pb.log());
    drop(rt);
}

/// Slowloris: a request head trickled one byte at a time is cut by the header-read timeout
/// (10 s) while other callers are served.
#[test]
fn a_trickled_request_head_is_cut() {
    let (s, web) = pair("abuse-slowloris", |_| {}, |_| {});
    let (pb, a_web, pa) = (&s.pb, web.a_out, &s.pa);
    let calls = steady(a_web);
    let mut s = TcpStream::connect(("127.0.0.1", a_web)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /orders/slow HTTP/1.1\r\nHost: b\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    // One byte every 250 ms, for at most 30 s.
    while started.elapsed() < Duration::from_secs(30) {
        if std::io::Write::write_all(&mut s, b"X").is_err() {
            cut = true;
            break;
        }
        s.set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    assert!(
        cut,
        "a request head trickled for 30 s was not cut\n{}",
        pa.log()
    );
    assert_served(calls, "the well-behaved caller failed", &pb.log());
}

/// A 50 MB resource document, through both doors: a sidecar's policy directory and
/// `sigil apply`. Each is refused whole with the line and the limit, before it is parsed;
/// the policies in force stay, and so does the sidecar's memory.
#[test]
fn an_oversized_resource_document_is_refused_before_it_is_parsed() {
    let (mut s, web) = PairSetup::web("abuse-document");
    let d = s.path().to_path_buf();
    let alice = write_identity(&d, "alice", &s.ca, ALICE, &[&s.ca]);
    let policies = resource_dir(&d, "policies");
    let policy = |purpose: &str| web_policy(purpose, &[A], B, web.workload, false);
    write_resource(&policies, "b.yaml", &policy("who may call b"));
    s.b.policy_dir = Some(policies.clone());
    let p = s.start();
    let (ca, pb, a_web) = (&p.ca, &p.pb, web.a_out);
    assert_eq!(get_once(a_web, "/orders/1"), Some(200));
    let before = show("sidecar B before", pb.pid());
    let calls = steady(a_web);

    // 3 MB: under the 4 MiB file cap, so the document cap is what refuses it.
    let huge = policy(&"x".repeat(3_000_000));
    write_atomic(&policies.join("b.yaml"), huge.as_bytes());
    pb.wait_log(
        "the limit is 1048576 (1 MiB) per resource",
        Duration::from_secs(10),
    );
    assert!(pb.log().contains("b.yaml:1:"), "{}", pb.log());
    // 50 MB: over the file cap, not even read.
    let file = std::fs::File::create(policies.join("huge.yaml")).unwrap();
    file.set_len(50_000_000).unwrap();
    pb.wait_log(
        "file is 50000000 bytes; the limit is 4194304",
        Duration::from_secs(10),
    );
    let after = show("sidecar B after both", pb.pid());
    assert!(
        after.0 < before.0 + 16 * 1024,
        "refusing them cost {} MiB",
        (after.0 - before.0) / 1024
    );
    // The policy in force still applies: /orders for A, nothing else.
    assert_eq!(get_once(a_web, "/orders/2"), Some(200));
    assert_eq!(get_once(a_web, "/admin"), Some(403));
    assert_served(calls, "the well-behaved caller failed", "");

    // The control plane refuses the same document from `sigil apply`.
    let cp = ControlPlane::start_in(&d, ca, CONTROL);
    let file = d.join("huge-apply.yaml");
    std::fs::write(&file, &huge).unwrap();
    let (code, out, err) = cp.sigil(&alice, &["apply", "-f", file.to_str().unwrap()]);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        err.contains("huge-apply.yaml:1:") && err.contains("the limit is 1048576 (1 MiB)"),
        "{out}{err}"
    );
    let (_, listed, _) = cp.sigil(&alice, &["get", "Policy"]);
    assert!(!listed.contains("b-web"), "{listed}");
}
