//! sigil-perf-harness: one run, loopback only, comparing a direct connection, sigil-proxy
//! sidecar pairs and nginx mTLS pairs (L4 stream and L7 http) on the same certificates.
//!
//! ```text
//! wrk / h2load / bulk client ─► client-side proxy ══mTLS══► server-side proxy ─► backend (127.0.0.1)
//! ```
//!
//! Two sigil pairs run: an L4 pair (both sides relay bytes) and an L7 pair whose server side
//! enforces HTTP routes from a generated policyDir (>= 1,000 policies) and whose client side
//! sends requests over its pooled HTTP/2 connection. Measures L4 bulk throughput through an echo backend, HTTP/1.1
//! keep-alive req/s with p50 and p99 (wrk), new mTLS connections per second (wrk with
//! `Connection: close`), HTTP/2 (h2c) req/s (h2load), p50/p99 at a fixed request rate for
//! HTTP/1.1 and HTTP/2 (h2load --rps, percentiles from its per-request log), and for each proxy
//! process its RSS (idle, peak under load, after load) and CPU seconds. Prints markdown.
//! Every process it starts is ended by PID (`sigil_e2e::Proc`); every load is bounded in time
//! and size; all traffic goes to 127.0.0.1. See perf/README.md.
//!
//! The modules follow the run: `opts` (command line), `tools` (the programs it needs),
//! `identity`, `paths`, `sigil` and `nginx` (what is under test), `stand` (starting it all),
//! `sanity` (checks before measuring), `bench` (one measured run), `runs` (the order of the
//! tests), `report` (the markdown); `net` and `progress` are small helpers of all of them.

mod bench;
mod identity;
mod net;
mod nginx;
mod opts;
mod paths;
mod progress;
mod report;
mod runs;
mod sanity;
mod sigil;
mod stand;
mod tools;

use std::process::ExitCode;
use std::time::Duration;

use sigil_e2e::TempDir;
use sigil_perf::procfs::{Group, Sampler};

use crate::bench::Bench;
use crate::net::addr;
use crate::opts::Opts;
use crate::progress::log;
use crate::stand::Stand;

fn main() -> ExitCode {
    let o = match opts::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sigil-perf-harness: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigil-perf-harness: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(o: &Opts) -> Result<(), String> {
    let toy = tools::check(o)?;
    let work = TempDir::new("perf");
    let dir = work.path().to_path_buf();
    log(format!("work directory {}", dir.display()));
    let _work = if o.keep {
        // Kept for inspection, also when the run fails.
        std::mem::forget(work);
        None
    } else {
        Some(work)
    };
    identity::write_certs(&dir);
    let mut stand = Stand::start(o, &dir, &toy)?;

    // Idle: started and ready, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let idle: Vec<(u64, u64)> = stand
        .groups
        .iter()
        .map(|g| (g.rss_kib(), g.anon_kib()))
        .collect();

    sanity::check(o, &dir, &mut stand)?;

    let all_groups: Vec<Group> = stand
        .groups
        .iter()
        .chain(&stand.backend_groups)
        .cloned()
        .collect();
    let sampler = Sampler::start(all_groups, Duration::from_millis(100));
    let mut b = Bench::new(
        o,
        dir.clone(),
        &sampler,
        (!o.skip_sigil).then(|| addr(stand.ports.sigil_admin_server)),
        (!o.skip_sigil).then(|| addr(stand.ports.sigil_l7_admin_server)),
    );
    let elapsed = runs::all(o, &mut b, &stand.paths);

    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = stand.groups.iter().map(Group::rss_kib).collect();

    let report = report::report(o, &b, &stand, &idle, &after, elapsed);
    print!("{report}");
    if let Some(out) = &o.out {
        std::fs::write(out, &report).map_err(|e| format!("write {}: {e}", out.display()))?;
        log(format!("report written to {}", out.display()));
    }
    drop(sampler);
    log("stopping processes");
    stand.stop();
    if o.keep {
        log(format!("kept {}", dir.display()));
    }
    Ok(())
}
