//! The order of the measurements: one test after another, each test's runs interleaved path
//! by path so that a slow drift of the machine touches every path alike.

use std::time::{Duration, Instant};

use crate::bench::{Bench, Test};
use crate::opts::Opts;
use crate::paths::{PathPorts, Via};
use crate::progress::log;

/// Unrecorded load on each path before a throughput test (connections, pools, caches).
const WARM: Duration = Duration::from_secs(2);

/// A pause between runs, so that one run's tail does not meet the next.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Every test on every path that has what it needs; returns the time measuring took.
pub fn all(o: &Opts, b: &mut Bench, paths: &[PathPorts]) -> Duration {
    let started = Instant::now();
    bulk(o, b, paths);
    keep_alive(o, b, paths);
    new_connections(o, b, paths);
    let h2_paths: Vec<(Via, u16)> = paths.iter().filter_map(|p| Some((p.via, p.h2?))).collect();
    h2_max(o, b, &h2_paths);
    let h1_paths: Vec<(Via, u16)> = paths.iter().map(|p| (p.via, p.http)).collect();
    fixed_rate(o, b, Test::RateH1, &h1_paths);
    fixed_rate(o, b, Test::RateH2, &h2_paths);
    started.elapsed()
}

fn bulk(o: &Opts, b: &mut Bench, paths: &[PathPorts]) {
    log(format!(
        "L4 bulk: {} MiB echoed per run, 1 connection, {} runs",
        o.bulk_mib, o.runs
    ));
    for _ in 0..o.runs {
        for p in paths {
            if let Some(e) = p.echo {
                b.bulk(p.via, e);
                settle();
            }
        }
    }
}

fn keep_alive(o: &Opts, b: &mut Bench, paths: &[PathPorts]) {
    log(format!(
        "HTTP/1.1 keep-alive: wrk -t{} -c{} -d{}s, {} runs (after a 2 s warm-up per path)",
        o.wrk_threads, o.wrk_conns, o.duration, o.runs
    ));
    for p in paths {
        b.wrk(Test::KeepAlive, p.via, p.http, WARM, false);
    }
    let dur = Duration::from_secs(o.duration);
    for _ in 0..o.runs {
        for p in paths {
            b.wrk(Test::KeepAlive, p.via, p.http, dur, true);
            settle();
        }
    }
}

fn new_connections(o: &Opts, b: &mut Bench, paths: &[PathPorts]) {
    log(format!(
        "new connections: wrk -t{} -c{} -d{}s -H 'Connection: close', {} runs",
        o.wrk_threads, o.close_conns, o.duration, o.runs
    ));
    let dur = Duration::from_secs(o.duration);
    for _ in 0..o.runs {
        for p in paths {
            // The L7 pairs are left out: both client sides keep pooled upstream connections,
            // so `Connection: close` causes no handshake between the proxies.
            if matches!(p.via, Via::NginxL7 | Via::SigilL7) {
                continue;
            }
            b.wrk(Test::NewConns, p.via, p.http, dur, true);
            // Let the TIME_WAIT churn of this run settle before the next.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn h2_max(o: &Opts, b: &mut Bench, h2_paths: &[(Via, u16)]) {
    let dur = Duration::from_secs(o.duration);
    log(format!(
        "HTTP/2 throughput: {}, {} runs (after a 2 s warm-up per path)",
        b.h2_args(Test::H2Max, dur).display(),
        o.runs
    ));
    for &(via, port) in h2_paths {
        b.h2load(Test::H2Max, via, port, WARM, false);
    }
    for _ in 0..o.runs {
        for &(via, port) in h2_paths {
            b.h2load(Test::H2Max, via, port, dur, true);
            settle();
        }
    }
}

/// `test` is RateH1 or RateH2: latency at `--rate` req/s, where throughput is not the limit.
fn fixed_rate(o: &Opts, b: &mut Bench, test: Test, targets: &[(Via, u16)]) {
    let dur = Duration::from_secs(o.duration);
    log(format!(
        "{}: {} req/s in all, {}, {} runs",
        test.label(),
        o.rate,
        b.h2_args(test, dur).display(),
        o.runs
    ));
    for _ in 0..o.runs {
        for &(via, port) in targets {
            b.h2load(test, via, port, dur, true);
            settle();
        }
    }
}
