//! sigil-audit-ab: what the audit stream costs a sidecar pair. The same pair (A calls B, both
//! subscribed to one `sigil-control`) runs with `audit` off and on, interleaved, under:
//!
//! - new connections: `wrk -H "Connection: close"` through the L4 path (A relays bytes to B
//!   over a new mTLS connection per request; four audit records each, two per side);
//! - L7 requests: `wrk` keep-alive through the L7 path (B decides each request; allowed ones
//!   are counted per connection);
//! - a burst of `--burst` connections through the L4 path (default 100,000, as many as wrk
//!   makes in `--burst-secs`, bounded by both): the peak RSS of each side and what the
//!   control plane stored.
//!
//! `--control-nice N` runs the control plane at that nice value: in service it has machines
//! of its own, here it shares the pair's two cores.
//!
//! Prints each run and the medians, and the ratio on/off. Build first:
//! `cargo build --release -p sigil-proxy -p sigil-control -p sigil-e2e -p sigil-perf`.
//! Traffic stays on 127.0.0.1; every process started is ended by its PID.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::{free_port, policy, poll, write_identity, ControlPlane, Proc, TempDir};
use sigil_perf::procfs::{clk_tck, cpu_ticks, status_kib};
use sigil_perf::stats::median;
use sigil_perf::wrk::{self, WrkArgs};
use sigil_testkit::Ca;

const A: &str = "spiffe://example.org/ns/perf/sa/a";
const B: &str = "spiffe://example.org/ns/perf/sa/b";
const CONTROL: &str = "spiffe://example.org/sigil/control";
const OPS: &str = "spiffe://example.org/ops/perf";

struct Opts {
    runs: usize,
    secs: u64,
    burst: u64,
    burst_secs: u64,
    /// The control plane's nice value: in service it runs on machines of its own; niced
    /// here, it takes what the pair leaves of these cores instead of competing for them.
    control_nice: u64,
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        runs: 3,
        secs: 5,
        burst: 100_000,
        burst_secs: 60,
        control_nice: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| format!("{flag}: a value is missing"))?;
        let n: u64 = value
            .parse()
            .map_err(|_| format!("{flag} {value:?}: not a number"))?;
        match flag.as_str() {
            "--runs" => o.runs = n.clamp(1, 20) as usize,
            "--secs" => o.secs = n.clamp(1, 60),
            "--burst" => o.burst = n.clamp(1_000, 1_000_000),
            "--burst-secs" => o.burst_secs = n.clamp(5, 300),
            "--control-nice" => o.control_nice = n.clamp(0, 19),
            _ => {
                return Err(format!(
                    "unknown {flag}; usage: sigil-audit-ab [--runs N] [--secs S] [--burst N] [--burst-secs S] [--control-nice 0-19]"
                ))
            }
        }
    }
    Ok(o)
}

/// One measured run of one mode.
#[derive(Default, Clone)]
struct Figures {
    conns_per_sec: f64,
    /// CPU µs per new connection of A and B together, and of the control plane (which
    /// shares this machine's cores here; in service it runs elsewhere), during the wrk run
    /// (shipping and storing that finish after it are not counted).
    sidecar_us_per_conn: f64,
    control_us_per_conn: f64,
    l7_req_per_sec: f64,
    burst_conns: u64,
    /// Peak RSS (VmHWM) in MiB after the burst: A, B.
    peak_mib: (f64, f64),
    /// Records the control plane holds from A and B after the burst (audit on).
    stored: u64,
}

fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sigil-audit-ab: {e}");
            std::process::exit(2);
        }
    };
    let mut off = Vec::new();
    let mut on = Vec::new();
    for run in 0..o.runs {
        // Alternate which goes first, so that drift on the machine falls on both.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for audit in order {
            match measure(&o, audit) {
                Ok(f) => {
                    println!(
                        "run {} audit {}: {:.0} new conns/s ({:.0} µs CPU each in the sidecars, {:.0} in the control plane), {:.0} L7 req/s, burst {} conns, peak RSS A {:.1} MiB B {:.1} MiB, {} records stored",
                        run + 1,
                        if audit { "on " } else { "off" },
                        f.conns_per_sec,
                        f.sidecar_us_per_conn,
                        f.control_us_per_conn,
                        f.l7_req_per_sec,
                        f.burst_conns,
                        f.peak_mib.0,
                        f.peak_mib.1,
                        f.stored
                    );
                    if audit { &mut on } else { &mut off }.push(f);
                }
                Err(e) => {
                    eprintln!("sigil-audit-ab: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    report(&off, &on);
}

/// One figure of a run.
type Field = fn(&Figures) -> f64;

fn report(off: &[Figures], on: &[Figures]) {
    let m = |v: &[Figures], f: Field| median(&v.iter().map(f).collect::<Vec<_>>());
    let all = |v: &[Figures], f: Field| {
        v.iter()
            .map(|x| format!("{:.0}", f(x)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\n| figure | audit off (median; runs) | audit on (median; runs) | on/off |");
    println!("| --- | --- | --- | --- |");
    let rows: [(&str, Field); 6] = [
        ("new connections/s (L4, Connection: close)", |f| {
            f.conns_per_sec
        }),
        ("sidecars' CPU µs per new connection (A + B)", |f| {
            f.sidecar_us_per_conn
        }),
        ("control plane's CPU µs per new connection", |f| {
            f.control_us_per_conn
        }),
        ("L7 req/s (keep-alive)", |f| f.l7_req_per_sec),
        ("peak RSS A after the burst, MiB", |f| f.peak_mib.0),
        ("peak RSS B after the burst, MiB", |f| f.peak_mib.1),
    ];
    for (name, f) in rows {
        let (a, b) = (m(off, f), m(on, f));
        println!(
            "| {name} | {a:.1} ({}) | {b:.1} ({}) | {:.3} |",
            all(off, f),
            all(on, f),
            b / a
        );
    }
}

/// A's and B's configs: both subscribed to the control plane; `audit` adds the spools.
fn configs(d: &Path, cp_port: u16, audit: bool, p: &Ports) -> (String, String) {
    let common = |name: &str, id: &str, admin: u16| {
        let spool = if audit {
            format!(
                "  audit: {{spoolDir: {}}}\n",
                d.join(format!("spool-{name}")).display()
            )
        } else {
            String::new()
        };
        format!(
            "apiVersion: sigil.dev/v1
kind: ProxyConfig
metadata: {{name: {name}, purpose: audit A/B}}
spec:
  mode: explicit
  identity: {{certFile: {d}/{name}.crt, keyFile: {d}/{name}.key, bundleDir: {d}/{name}-bundles, spiffeId: \"{id}\"}}
  admin: {{listen: \"127.0.0.1:{admin}\"}}
  controlPlane: {{address: \"127.0.0.1:{cp_port}\", spiffeId: \"{CONTROL}\", stateDir: {d}/state-{name}}}
{spool}",
            d = d.display()
        )
    };
    let a = common("a", A, p.a_admin)
        + &format!(
            "  outbound:
    opaquePorts: [{b_l4}]
    explicit:
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{b_l4}\", expectedId: \"{B}\"}}
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\", expectedId: \"{B}\"}}
",
            p.a_l4,
            p.a_l7,
            p.b_l7,
            b_l4 = p.b_l4
        );
    let b = common("b", B, p.b_admin)
        + &format!(
            "  inbound:
    ports:
      - {{port: {tcp}, allow: [\"{A}\"]}}
    explicit:
      - {{listen: \"127.0.0.1:{}\", port: {tcp}}}
      - {{listen: \"127.0.0.1:{}\", port: {}}}
",
            p.b_l4,
            p.b_l7,
            p.backend_http,
            tcp = p.backend_tcp
        );
    (a, b)
}

struct Ports {
    backend_tcp: u16,
    backend_http: u16,
    a_l4: u16,
    a_l7: u16,
    b_l4: u16,
    b_l7: u16,
    a_admin: u16,
    b_admin: u16,
}

/// One nginx worker answering every request with a fixed body, on two ports: one B declares
/// tcp, one a policy declares http.
fn backend(d: &Path, p: &Ports) -> Result<Proc, String> {
    let conf = d.join("backend.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;
daemon off;
pid {d}/backend.pid;
error_log {d}/backend.err;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{};
        listen 127.0.0.1:{};
        location / {{ return 200 \"hello, sigil\\n\"; }}
    }}
}}
",
            p.backend_tcp,
            p.backend_http,
            d = d.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let proc = Proc::spawn("nginx-backend", Command::new("nginx").arg("-c").arg(&conf));
    sigil_e2e::wait_for_port(
        ([127, 0, 0, 1], p.backend_http).into(),
        Duration::from_secs(10),
    );
    Ok(proc)
}

fn sidecar(d: &Path, name: &str, yaml: &str, admin: u16) -> Result<Proc, String> {
    let path = d.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(sigil_e2e::bin("sigil-proxy"));
    cmd.arg("--config").arg(&path).env("SIGIL_LOG", "warn");
    let p = Proc::spawn(name, &mut cmd);
    poll(
        Duration::from_secs(15),
        Duration::from_millis(50),
        || match sigil_e2e::http_get(([127, 0, 0, 1], admin).into(), "/ready") {
            Some((200, _)) => Ok(()),
            _ => Err(format!("{name} not ready after 15 s:\n{}", p.log())),
        },
    );
    Ok(p)
}

fn measure(o: &Opts, audit: bool) -> Result<Figures, String> {
    let dir = TempDir::new("audit-ab");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let cp = ControlPlane::start_in(d, &ca, CONTROL);
    if o.control_nice > 0 {
        // Each thread has its nice value (those it starts later inherit it).
        let tasks = std::fs::read_dir(format!("/proc/{}/task", cp.proc.pid()))
            .map_err(|e| format!("the control plane's threads: {e}"))?;
        let tids: Vec<String> = tasks
            .flatten()
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect();
        let niced = Command::new("renice")
            .args(["-n", &o.control_nice.to_string(), "-p"])
            .args(&tids)
            .output()
            .map_err(|e| format!("renice: {e}"))?;
        if !niced.status.success() {
            return Err(format!(
                "renice: {}",
                String::from_utf8_lossy(&niced.stderr)
            ));
        }
    }
    let ops = write_identity(d, "ops", &ca, OPS, &[&ca]);
    write_identity(d, "a", &ca, A, &[&ca]);
    write_identity(d, "b", &ca, B, &[&ca]);
    let p = Ports {
        backend_tcp: free_port(),
        backend_http: free_port(),
        a_l4: free_port(),
        a_l7: free_port(),
        b_l4: free_port(),
        b_l7: free_port(),
        a_admin: free_port(),
        b_admin: free_port(),
    };
    std::fs::create_dir_all(d.join("tmp")).map_err(|e| e.to_string())?;
    let _backend = backend(d, &p)?;
    let ports = format!(
        "    - port: {}\n      protocol: http\n      routes: [{{name: all, allow: [\"{A}\"]}}]\n",
        p.backend_http
    );
    cp.apply(
        &ops,
        &d.join("policy.yaml"),
        &policy("b-http", "audit A/B", B, &ports),
    );
    let (a_yaml, b_yaml) = configs(d, cp.sidecar_port, audit, &p);
    let b = sidecar(d, "b", &b_yaml, p.b_admin)?;
    let a = sidecar(d, "a", &a_yaml, p.a_admin)?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    // Both paths answer before anything is measured (B has the policy).
    poll(Duration::from_secs(15), Duration::from_millis(100), || {
        let ok = |port| {
            sigil_testkit::http::get_close(([127, 0, 0, 1], port).into(), "/")
                .is_some_and(|r| r.0 == 200)
        };
        (ok(p.a_l4) && ok(p.a_l7))
            .then_some(())
            .ok_or_else(|| format!("A's paths do not answer 200:\n{}\n{}", a.log(), b.log()))
    });
    let load = |close: bool, conns: u32, secs: u64, port: u16| {
        let args = WrkArgs {
            threads: 2,
            connections: conns,
            duration: Duration::from_secs(secs),
            close,
        };
        let r = wrk::run("wrk", &args, &url(port))?;
        if r.errors() > 0 {
            return Err(format!("wrk saw {} errors on port {port}", r.errors()));
        }
        Ok::<_, String>(r)
    };
    let ticks = |pids: &[u32]| pids.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>();
    let (sidecars, control) = ([a.pid(), b.pid()], [cp.proc.pid()]);
    let before = (ticks(&sidecars), ticks(&control));
    let conns = load(true, 16, o.secs, p.a_l4)?;
    // The control plane's share includes storing what the sidecars shipped meanwhile.
    let us = |t: u64| t as f64 / clk_tck() * 1e6 / conns.requests.max(1) as f64;
    let (sidecar_us_per_conn, control_us_per_conn) = (
        us(ticks(&sidecars) - before.0),
        us(ticks(&control) - before.1),
    );
    let l7 = load(false, 64, o.secs, p.a_l7)?;
    // The burst: as many new connections as wrk makes, up to `burst`, in `burst_secs`.
    let mut burst_conns = 0;
    let started = std::time::Instant::now();
    while burst_conns < o.burst && started.elapsed().as_secs() < o.burst_secs {
        let left = o.burst_secs - started.elapsed().as_secs();
        let r = load(true, 32, left.clamp(1, 10), p.a_l4)?;
        burst_conns += r.requests;
        if r.requests == 0 {
            break;
        }
    }
    let hwm = |proc: &Proc| status_kib(proc.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let peak_mib = (hwm(&a), hwm(&b));
    let stored = if audit { stored_records(&cp, &ops) } else { 0 };
    Ok(Figures {
        conns_per_sec: conns.req_per_sec,
        sidecar_us_per_conn,
        control_us_per_conn,
        l7_req_per_sec: l7.req_per_sec,
        burst_conns,
        peak_mib,
        stored,
    })
}

/// Waits (at most 60 s) until the control plane's store stops growing; the records it holds
/// from the sidecars.
fn stored_records(cp: &ControlPlane, ops: &sigil_e2e::IdentityFiles) -> u64 {
    let count = || {
        let (_, out, _) = cp.sigil(ops, &["audit", "verify"]);
        out.lines()
            .filter(|l| l.starts_with(A) || l.starts_with(B))
            .filter_map(|l| {
                l.split(' ')
                    .find_map(|f| f.strip_prefix("records="))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum::<u64>()
    };
    let mut last = count();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_secs(1));
        let now = count();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}
