//! The markdown report: the machine and the set-up, one table per test, the proxy processes,
//! the targets of the issues, and what went wrong.

use std::fmt::Write as _;
use std::time::Duration;

use sigil_perf::policies::{BENCH_PATH, BENCH_ROUTE};
use sigil_perf::stats::median;

use crate::bench::{Bench, Run, Test};
use crate::identity::SERVER_ID;
use crate::opts::{cores, Opts};
use crate::paths::Via;
use crate::stand::{Setup, Stand};
use crate::tools::tool_version;

/// The whole report. Per proxy group of `stand.groups`: `idle` is (VmRSS, RssAnon) in KiB
/// before any traffic, `after` VmRSS in KiB after the last run; `elapsed` is the time
/// measuring took.
pub fn report(
    o: &Opts,
    b: &Bench,
    stand: &Stand,
    idle: &[(u64, u64)],
    after: &[u64],
    elapsed: Duration,
) -> String {
    let mut s = String::new();
    machine(&mut s, o, b, elapsed);
    set_up(&mut s, &stand.setup);
    bulk_table(&mut s, o, b);
    request_sections(&mut s, o, b);
    process_table(&mut s, b, stand, idle, after);
    let _ = writeln!(s, "\n### Against the targets\n");
    let _ = writeln!(s, "| target | measured | status |");
    let _ = writeln!(s, "|---|---|---|");
    throughput_targets(&mut s, b);
    latency_targets(&mut s, o, b);
    memory_targets(&mut s, stand, idle);
    problems(&mut s, b);
    s
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn fmt(v: f64, prec: usize) -> String {
    if v.is_nan() {
        "—".into()
    } else {
        format!("{v:.prec$}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// The title and the first lines: machine, tool versions, how the runs went, and how much
/// other processes and the hypervisor disturbed them.
fn machine(s: &mut String, o: &Opts, b: &Bench, elapsed: Duration) {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(s, "## sigil-perf-harness report\n");
    let _ = writeln!(
        s,
        "- machine: {} cores ({cpu_model}), Linux {}",
        cores(),
        kernel.trim()
    );
    let _ = writeln!(
        s,
        "- {}; {}; {}; {}",
        tool_version(
            &o.bin_dir.join("sigil-proxy").display().to_string(),
            &["--version"]
        ),
        tool_version(&o.nginx, &["-v"]),
        tool_version(&o.wrk, &["-v"]),
        tool_version(&o.h2load, &["--version"])
    );
    let _ = writeln!(
        s,
        "- {} runs per test and path (median shown), interleaved path by path; nginx \
         worker_processes {}; sigil-proxy SIGIL_LOG=warn; measuring took {:.0} s",
        o.runs,
        o.nginx_workers,
        elapsed.as_secs_f64()
    );
    let foreign: Vec<f64> = b.runs.values().flatten().map(|r| r.foreign).collect();
    let worst = foreign.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        s,
        "- CPU used by processes outside the harness during measured runs: median {:.1}%, worst \
         run {:.1}% of the machine{}",
        median(&foreign) * 100.0,
        worst * 100.0,
        if worst > 0.05 {
            " — **some runs were disturbed; figures are not clean**"
        } else {
            ""
        }
    );
    let steal: Vec<f64> = b.runs.values().flatten().map(|r| r.steal).collect();
    let _ = writeln!(
        s,
        "- CPU stolen by the hypervisor during measured runs: median {:.1}%, worst run {:.1}%",
        median(&steal) * 100.0,
        steal.iter().copied().fold(0.0, f64::max) * 100.0
    );
}

/// The backends, the sigil L7 pair's policy set, start-up times and sanity findings.
fn set_up(s: &mut String, setup: &Setup) {
    let _ = writeln!(
        s,
        "- backends: echo = `sigil-toy-workload --echo` (thread per connection); HTTP = nginx \
         (1 worker) returning a 13-byte body from memory, keep-alive, HTTP/1.1 on one port and \
         h2c (prior knowledge) on another. The direct HTTP/2 path uses the h2c port; every proxy \
         forwards HTTP/1.1 to the HTTP/1.1 port. Every load requests `GET {BENCH_PATH}`."
    );
    if let Some((docs, files, own)) = setup.policies {
        let _ = writeln!(
            s,
            "- sigil L7 pair: the server side has `policyDir` with {docs} Policy documents in \
             {files} files, {own} of them targeting its own ID `{SERVER_ID}`; the backend port is \
             declared `protocol: http` there (not in `inbound.ports`). Each request is normalized, \
             decided (route `{BENCH_ROUTE}` allows the client) and forwarded as HTTP/1.1 with \
             `x-sigil-peer-id`. Its client side serves the load tool's HTTP/1.1 or h2c and \
             sends every request over one pooled HTTP/2 mTLS connection to the server side."
        );
    }
    for (name, d) in &setup.ready {
        let _ = writeln!(
            s,
            "- {name}: ready {:.0} ms after start",
            d.as_secs_f64() * 1000.0
        );
    }
    if !setup.sanity.is_empty() {
        let _ = writeln!(s, "\nSanity checks before measuring:\n");
        for l in &setup.sanity {
            let _ = writeln!(s, "- {l}");
        }
    }
}

fn bulk_table(s: &mut String, o: &Opts, b: &Bench) {
    let _ = writeln!(
        s,
        "\n### L4 bulk throughput — {} MiB through an echo backend, 1 connection\n",
        o.bulk_mib
    );
    let _ = writeln!(
        s,
        "| path | MiB/s echoed (median) | runs | vs nginx L4 | proxy CPU s per GiB (both sides) |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|");
    let nginx_bulk = b.median_of(Test::Bulk, Via::NginxL4, |r| r.value);
    for p in Via::ALL {
        let Some(runs) = b.runs.get(&(Test::Bulk, p)) else {
            continue;
        };
        let m = b.median_of(Test::Bulk, p, |r| r.value);
        let all: Vec<String> = runs.iter().map(|r| fmt(r.value, 0)).collect();
        let cpu_per_gib = b.median_of(Test::Bulk, p, |r| {
            r.proxy_cpu / (r.units / (1024.0 * 1024.0 * 1024.0))
        });
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            p.label(),
            fmt(m, 0),
            all.join(", "),
            ratio(m, nginx_bulk),
            if p == Via::Direct {
                "—".into()
            } else {
                fmt(cpu_per_gib, 2)
            }
        );
    }
}

/// One section per request test that ran: title with the load tool's command line, notes,
/// and its table.
fn request_sections(s: &mut String, o: &Opts, b: &Bench) {
    let h2max = b.h2_args(Test::H2Max, Duration::from_secs(o.duration));
    let rate_h1 = b.h2_args(Test::RateH1, Duration::from_secs(o.duration));
    let rate_h2 = b.h2_args(Test::RateH2, Duration::from_secs(o.duration));
    let sections = [
        (
            Test::KeepAlive,
            format!(
                "HTTP/1.1 keep-alive, max throughput — `wrk -t{} -c{} -d{}s --latency`",
                o.wrk_threads, o.wrk_conns, o.duration
            ),
            vec![Via::NginxL7, Via::NginxL4],
            false,
        ),
        (
            Test::NewConns,
            format!(
                "New mTLS connections — `wrk -t{} -c{} -d{}s --latency -H 'Connection: close'` \
                 (one TCP + mTLS handshake per request)",
                o.wrk_threads, o.close_conns, o.duration
            ),
            vec![Via::NginxL4],
            false,
        ),
        (
            Test::H2Max,
            format!(
                "HTTP/2 (h2c, prior knowledge), max throughput — `{}` (p50/p99 from its per-request log)",
                h2max.display()
            ),
            vec![Via::NginxL7],
            false,
        ),
        (
            Test::RateH1,
            format!(
                "HTTP/1.1 at a fixed {} req/s — `{}` (p50/p99 from its per-request log)",
                o.rate,
                rate_h1.display()
            ),
            vec![],
            true,
        ),
        (
            Test::RateH2,
            format!(
                "HTTP/2 at a fixed {} req/s — `{}` (p50/p99 from its per-request log)",
                o.rate,
                rate_h2.display()
            ),
            vec![],
            true,
        ),
    ];
    for (t, title, baselines, added) in &sections {
        if !b.runs.keys().any(|(tt, _)| tt == t) {
            continue;
        }
        let _ = writeln!(s, "\n### {title}\n");
        if *t == Test::H2Max && b.runs.contains_key(&(Test::H2Max, Via::NginxL7)) {
            let _ = writeln!(
                s,
                "nginx L7 pair: h2c on its client side, HTTP/1.1 over pooled mTLS to its server \
                 side. sigil L7 pair: h2c served by the client side, each request over its \
                 pooled HTTP/2 mTLS connection to the server side, HTTP/1.1 to the backend.\n"
            );
        }
        if *added {
            let _ = writeln!(
                s,
                "\"added\" = this path's median minus the direct path's median.\n"
            );
        }
        request_table(s, b, *t, baselines, *added);
        counted_notes(s, b, *t);
    }
}

/// Column title of a ratio against a baseline path.
fn vs(p: Via) -> &'static str {
    match p {
        Via::NginxL7 => "vs nginx L7",
        Via::NginxL4 => "vs nginx L4",
        _ => "vs direct",
    }
}

/// One markdown table of a request test: rate, latency, errors, ratios against `baselines`,
/// optionally the latency added over the direct path, and the proxies' CPU per 1,000 requests
/// (per connection for the new-connection test).
fn request_table(s: &mut String, b: &Bench, t: Test, baselines: &[Via], added: bool) {
    let (unit, cpu_title) = if t == Test::NewConns {
        ("conn/s", "proxy CPU µs per connection")
    } else {
        ("req/s", "proxy CPU s per 1,000 requests")
    };
    let mut head = format!("| path | {unit} (median) | p50 ms | p99 ms |");
    let mut rule = String::from("|---|---:|---:|---:|");
    if added {
        head += " p50 added ms | p99 added ms |";
        rule += "---:|---:|";
    }
    head += " errors |";
    rule += "---:|";
    for v in baselines {
        head += &format!(" {} |", vs(*v));
        rule += "---:|";
    }
    head += &format!(" {cpu_title} |");
    rule += "---:|";
    let _ = writeln!(s, "{head}\n{rule}");
    for p in Via::ALL {
        if let Some(runs) = b.runs.get(&(t, p)) {
            let row = request_row(b, t, p, runs, baselines, added);
            let _ = writeln!(s, "{row}");
        }
    }
}

/// The row of path `p` in [`request_table`].
fn request_row(b: &Bench, t: Test, p: Via, runs: &[Run], baselines: &[Via], added: bool) -> String {
    let m = b.median_of(t, p, |r| r.value);
    let p50 = b.median_of(t, p, |r| r.p50_ms);
    let p99 = b.median_of(t, p, |r| r.p99_ms);
    let mut row = format!(
        "| {} | {} | {} | {} |",
        p.label(),
        fmt(m, 0),
        fmt(p50, 3),
        fmt(p99, 3)
    );
    if added {
        if p == Via::Direct {
            row += " — | — |";
        } else {
            let d50 = b.median_of(t, Via::Direct, |r| r.p50_ms);
            let d99 = b.median_of(t, Via::Direct, |r| r.p99_ms);
            row += &format!(" {} | {} |", fmt(p50 - d50, 3), fmt(p99 - d99, 3));
        }
    }
    row += &format!(" {} |", runs.iter().map(|r| r.errors).sum::<u64>());
    for v in baselines {
        row += &format!(" {} |", ratio(m, b.median_of(t, *v, |r| r.value)));
    }
    let cpu = if p == Via::Direct {
        "—".to_string()
    } else if t == Test::NewConns {
        fmt(b.median_of(t, p, |r| r.proxy_cpu / r.units * 1e6), 1)
    } else {
        fmt(b.median_of(t, p, |r| r.proxy_cpu / r.units * 1e3), 4)
    };
    row += &format!(" {cpu} |");
    row
}

/// What the sigil server sides counted during test `t`, against what the load tool counted:
/// proof that the load went through them.
fn counted_notes(s: &mut String, b: &Bench, t: Test) {
    if let Some((server, client)) = b.counted(t, Via::SigilL7) {
        let _ = writeln!(
            s,
            "\nsigil L7 server side: `sigil_requests_total{{direction=\"inbound\",decision=\"allow\"}}` \
             grew by {server:.0} during these runs, for {client:.0} requests the load tool counted \
             (the difference is requests in flight when a run stopped)."
        );
    }
    if let Some((opened, requests)) = b.counted(t, Via::Sigil) {
        let _ = writeln!(
            s,
            "\nsigil server-side `sigil_connections_opened_total` (inbound) grew by {opened:.0} \
             during these runs, for {requests:.0} requests counted by wrk: one mTLS \
             connection per request."
        );
    }
}

/// Memory and CPU of each proxy, and the backends' memory.
fn process_table(s: &mut String, b: &Bench, stand: &Stand, idle: &[(u64, u64)], after: &[u64]) {
    let _ = writeln!(s, "\n### Proxy processes\n");
    let _ = writeln!(
        s,
        "RSS = VmRSS (nginx: master + workers summed; RssAnon in brackets). CPU = utime+stime \
         per run (median) while that path was under load.\n"
    );
    let mut head =
        String::from("| process | idle RSS MiB | peak RSS under load MiB | RSS after load MiB |");
    let mut rule = String::from("|---|---:|---:|---:|");
    for t in Test::ALL {
        head += &format!(" CPU s {} |", t.short());
        rule += "---:|";
    }
    let _ = writeln!(s, "{head}\n{rule}");
    let cpu = |g: &str, t: Test| {
        b.group_cpu
            .get(&(g.to_string(), t))
            .map_or(f64::NAN, |v| median(v))
    };
    for (i, g) in stand.groups.iter().enumerate() {
        let mut row = format!(
            "| {} (pids {}) | {} ({}) | {} | {} |",
            g.name,
            g.pids().len(),
            fmt(mib(idle[i].0), 1),
            fmt(mib(idle[i].1), 1),
            b.group_peak
                .get(&g.name)
                .map_or("—".into(), |k| fmt(mib(*k), 1)),
            fmt(mib(after[i]), 1),
        );
        for t in Test::ALL {
            row += &format!(" {} |", fmt(cpu(&g.name, t), 2));
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(
        s,
        "\nBackends (shared by all paths): {}.",
        stand
            .backend_groups
            .iter()
            .map(|g| format!("{} {:.1} MiB", g.name, mib(g.rss_kib())))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

fn have(b: &Bench, t: Test, p: Via) -> bool {
    b.runs.contains_key(&(t, p))
}

/// The verdict `c` of comparing `p` with `q` in test `t`, or None when either did not run.
fn ok(b: &Bench, c: bool, t: Test, p: Via, q: Via) -> Option<bool> {
    (have(b, t, p) && have(b, t, q)).then_some(c)
}

/// Bulk MiB/s and max req/s of the sigil pairs against the nginx pairs.
fn throughput_targets(s: &mut String, b: &Bench) {
    let sb = b.median_of(Test::Bulk, Via::Sigil, |r| r.value);
    let nginx_bulk = b.median_of(Test::Bulk, Via::NginxL4, |r| r.value);
    let _ = writeln!(
        s,
        "| L4 bulk >= 1.2x nginx L4 pair | {} | {} |",
        ratio(sb, nginx_bulk),
        verdict(ok(
            b,
            sb >= 1.2 * nginx_bulk,
            Test::Bulk,
            Via::Sigil,
            Via::NginxL4
        ))
    );
    for (t, proto) in [(Test::KeepAlive, "HTTP/1.1"), (Test::H2Max, "HTTP/2")] {
        for (p, q, name) in [
            (Via::SigilL7, Via::NginxL7, "sigil L7 pair vs nginx L7 pair"),
            (Via::Sigil, Via::NginxL7, "sigil L4 pair vs nginx L7 pair"),
            (Via::Sigil, Via::NginxL4, "sigil L4 pair vs nginx L4 pair"),
        ] {
            if !have(b, t, p) {
                continue;
            }
            let a = b.median_of(t, p, |r| r.value);
            let n = b.median_of(t, q, |r| r.value);
            let _ = writeln!(
                s,
                "| {proto} req/s >= 1.3x: {name} | {} | {} |",
                ratio(a, n),
                verdict(ok(b, a >= 1.3 * n, t, p, q))
            );
        }
    }
}

/// p99 added at the fixed rate, and p99 under keep-alive and new-connection load against
/// the nginx pairs.
fn latency_targets(s: &mut String, o: &Opts, b: &Bench) {
    for (t, proto) in [(Test::RateH1, "HTTP/1.1"), (Test::RateH2, "HTTP/2")] {
        for (p, name) in [
            (Via::SigilL7, "sigil L7 pair"),
            (Via::Sigil, "sigil L4 pair"),
            (Via::NginxL7, "nginx L7 pair (reference)"),
            (Via::NginxL4, "nginx L4 pair (reference)"),
        ] {
            if !have(b, t, p) {
                continue;
            }
            let added = b.median_of(t, p, |r| r.p99_ms) - b.median_of(t, Via::Direct, |r| r.p99_ms);
            let _ = writeln!(
                s,
                "| p99 added <= 0.2 ms at {} req/s, {proto}: {name} | {} ms | {} |",
                o.rate,
                fmt(added, 3),
                verdict(ok(b, added <= 0.2, t, p, Via::Direct))
            );
        }
    }
    let kp = |p: Via| b.median_of(Test::KeepAlive, p, |r| r.p99_ms);
    for (p, q) in [
        (Via::SigilL7, Via::NginxL7),
        (Via::Sigil, Via::NginxL7),
        (Via::Sigil, Via::NginxL4),
    ] {
        if !have(b, Test::KeepAlive, p) {
            continue;
        }
        let _ = writeln!(
            s,
            "| keep-alive p99: {} <= {} | {} ms vs {} ms | {} |",
            p.label(),
            q.label(),
            fmt(kp(p), 3),
            fmt(kp(q), 3),
            verdict(ok(b, kp(p) <= kp(q), Test::KeepAlive, p, q))
        );
    }
    let scp = b.median_of(Test::NewConns, Via::Sigil, |r| r.p99_ms);
    let ncp = b.median_of(Test::NewConns, Via::NginxL4, |r| r.p99_ms);
    let _ = writeln!(
        s,
        "| new-connection p99 <= nginx L4 pair | {} ms vs {} ms | {} |",
        fmt(scp, 3),
        fmt(ncp, 3),
        verdict(ok(b, scp <= ncp, Test::NewConns, Via::Sigil, Via::NginxL4))
    );
}

/// Idle RSS of each sigil sidecar.
fn memory_targets(s: &mut String, stand: &Stand, idle: &[(u64, u64)]) {
    for (i, g) in stand.groups.iter().enumerate() {
        if g.name.starts_with("sigil") {
            let m = mib(idle[i].0);
            let _ = writeln!(
                s,
                "| idle RSS <= 12 MiB ({}) | {:.1} MiB | {} |",
                g.name,
                m,
                verdict(Some(m <= 12.0))
            );
        }
    }
}

/// Runs that failed, were incomplete or lost a proxy process.
fn problems(s: &mut String, b: &Bench) {
    let failed: Vec<String> = b
        .runs
        .iter()
        .flat_map(|((t, p), v)| {
            v.iter().filter_map(move |r| {
                r.note
                    .as_ref()
                    .map(|n| format!("{} / {}: {n}", t.label(), p.label()))
            })
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\nProblems during the run:\n");
        for f in failed {
            let _ = writeln!(s, "- {f}");
        }
    }
}
