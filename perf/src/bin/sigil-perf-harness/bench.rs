//! The measurements: what one run of a test records, and how it is taken (on a quiet
//! machine, repeated when disturbed, with the CPU and peak RSS of the path's proxies).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sigil_perf::policies::BENCH_PATH;
use sigil_perf::procfs::{self, Sampler};
use sigil_perf::stats::median;
use sigil_perf::{bulk, h2load, wrk};

use crate::net::{addr, http_get};
use crate::opts::{cores, Opts};
use crate::paths::Via;
use crate::progress::log;

/// A measured run is repeated when other processes disturbed it, at most this often in all.
const ATTEMPTS: u32 = 3;
/// Longest wait for the machine to become quiet before a run.
const QUIET_WAIT_SECS: u64 = 120;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Test {
    Bulk,
    KeepAlive,
    NewConns,
    H2Max,
    RateH1,
    RateH2,
}

impl Test {
    pub const ALL: [Test; 6] = [
        Test::Bulk,
        Test::KeepAlive,
        Test::NewConns,
        Test::H2Max,
        Test::RateH1,
        Test::RateH2,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Bulk => "L4 bulk",
            Self::KeepAlive => "HTTP/1.1 keep-alive",
            Self::NewConns => "new connections",
            Self::H2Max => "HTTP/2 max",
            Self::RateH1 => "HTTP/1.1 fixed rate",
            Self::RateH2 => "HTTP/2 fixed rate",
        }
    }

    /// Column title in the process table.
    pub fn short(self) -> &'static str {
        match self {
            Self::Bulk => "bulk",
            Self::KeepAlive => "h1 max",
            Self::NewConns => "new conns",
            Self::H2Max => "h2 max",
            Self::RateH1 => "h1 rate",
            Self::RateH2 => "h2 rate",
        }
    }
}

/// One measured run: the figure (MiB/s, req/s), latencies, errors, and the CPU seconds of the
/// path's proxies during it.
#[derive(Debug, Clone)]
pub struct Run {
    pub value: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Units of work done (bytes for bulk, requests for wrk and h2load).
    pub units: f64,
    pub proxy_cpu: f64,
    /// Share of the machine's CPU (0..1) used by processes this harness did not start during
    /// the run (a build, another benchmark): a contamination indicator.
    pub foreign: f64,
    /// Share of the machine's CPU time stolen by the hypervisor during the run.
    pub steal: f64,
    /// Growth of a sigil server-side counter during the run (NaN when not probed): inbound
    /// connections opened (sigil L4, new connections) or allowed requests (sigil L7).
    pub server_counted: f64,
    pub note: Option<String>,
}

impl Run {
    fn new(value: f64, p50_ms: f64, p99_ms: f64, errors: u64, units: f64) -> Self {
        Self {
            value,
            p50_ms,
            p99_ms,
            errors,
            units,
            proxy_cpu: 0.0,
            foreign: 0.0,
            steal: 0.0,
            server_counted: f64::NAN,
            note: None,
        }
    }

    fn failed(note: String) -> Self {
        let mut r = Self::new(f64::NAN, f64::NAN, f64::NAN, 1, 0.0);
        r.note = Some(note);
        r
    }
}

/// A counter on a sigil sidecar's `/metrics`: admin address, series, label filters.
#[derive(Clone, Copy)]
struct Probe {
    admin: SocketAddr,
    series: &'static str,
    labels: &'static [&'static str],
}

impl Probe {
    fn read(&self) -> Option<f64> {
        let page = http_get(self.admin, "/metrics").ok()?;
        sigil_e2e::metric(&page, self.series, self.labels)
    }
}

pub const L7_ALLOWED: &[&str] = &["direction=\"inbound\"", "decision=\"allow\""];

pub struct Bench<'a> {
    o: &'a Opts,
    dir: PathBuf,
    sampler: &'a Sampler,
    pub runs: BTreeMap<(Test, Via), Vec<Run>>,
    /// Per group name and test: CPU seconds per run.
    pub group_cpu: BTreeMap<(String, Test), Vec<f64>>,
    /// Per group name: peak RSS (KiB) while its path was under load.
    pub group_peak: BTreeMap<String, u64>,
    /// sigil L4 server-side admin address, to count its inbound connections.
    sigil_admin: Option<SocketAddr>,
    /// sigil L7 server-side admin address, to count the requests it decided.
    sigil_l7_admin: Option<SocketAddr>,
}

impl<'a> Bench<'a> {
    /// `sigil_admin` and `sigil_l7_admin` are the sigil server sides' admin addresses (when
    /// the sigil pairs run), whose counters prove what a run did.
    pub fn new(
        o: &'a Opts,
        dir: PathBuf,
        sampler: &'a Sampler,
        sigil_admin: Option<SocketAddr>,
        sigil_l7_admin: Option<SocketAddr>,
    ) -> Self {
        Self {
            o,
            dir,
            sampler,
            runs: BTreeMap::new(),
            group_cpu: BTreeMap::new(),
            group_peak: BTreeMap::new(),
            sigil_admin,
            sigil_l7_admin,
        }
    }

    /// CPU of the harness, its children (wrk, h2load) and every process it started, in seconds.
    fn ours(&self) -> f64 {
        procfs::self_and_children_secs().unwrap_or(f64::NAN)
            + self.sampler.cpu().iter().sum::<f64>()
    }

    /// Share of the machine used by other processes over `d` (our proxies idle meanwhile).
    fn foreign_load(&self, d: Duration) -> f64 {
        let (busy0, ours0) = (procfs::machine_busy_secs(), self.ours());
        std::thread::sleep(d);
        let busy = procfs::machine_busy_secs().zip(busy0).map(|(a, b)| a - b);
        busy.map_or(f64::NAN, |b| {
            ((b - (self.ours() - ours0)) / (d.as_secs_f64() * cores() as f64)).max(0.0)
        })
    }

    /// Waits (bounded) until other processes use under 3% of the machine for a second.
    fn wait_quiet(&self) {
        let deadline = Instant::now() + Duration::from_secs(QUIET_WAIT_SECS);
        loop {
            let f = self.foreign_load(Duration::from_secs(1));
            if f < 0.03 || f.is_nan() {
                return;
            }
            if Instant::now() >= deadline {
                log(format!(
                    "  machine still busy ({:.0}% used by others) after {QUIET_WAIT_SECS} s; measuring anyway",
                    f * 100.0
                ));
                return;
            }
        }
    }

    /// The server-side counter that proves what a run of `path` did, if any.
    fn probe(&self, test: Test, path: Via) -> Option<Probe> {
        match (test, path) {
            (Test::NewConns, Via::Sigil) => Some(Probe {
                admin: self.sigil_admin?,
                series: "sigil_connections_opened_total",
                labels: &["direction=\"inbound\""],
            }),
            (Test::Bulk, _) => None,
            (_, Via::SigilL7) => Some(Probe {
                admin: self.sigil_l7_admin?,
                series: "sigil_requests_total",
                labels: L7_ALLOWED,
            }),
            _ => None,
        }
    }

    /// Runs `f` once the machine is quiet; repeats it (at most `ATTEMPTS` times in all) when
    /// other processes took more than 5% of the machine during the run, keeping the last.
    fn measure(&mut self, test: Test, path: Via, f: impl Fn() -> Run) {
        let groups = self.sampler.groups();
        let probe = self.probe(test, path);
        let mut attempt = 0;
        let (mut run, before, after, peaks) = loop {
            attempt += 1;
            self.wait_quiet();
            let counted0 = probe.and_then(|p| p.read());
            let (busy0, ours0, steal0, t0) = (
                procfs::machine_busy_secs().unwrap_or(f64::NAN),
                self.ours(),
                procfs::machine_steal_secs().unwrap_or(f64::NAN),
                Instant::now(),
            );
            let before = self.sampler.cpu();
            self.sampler.reset();
            let mut run = f();
            let after = self.sampler.cpu();
            let peaks = self.sampler.peaks();
            let wall = t0.elapsed().as_secs_f64();
            let busy = procfs::machine_busy_secs().unwrap_or(f64::NAN) - busy0;
            run.foreign = ((busy - (self.ours() - ours0)) / (wall * cores() as f64)).max(0.0);
            let steal = procfs::machine_steal_secs().unwrap_or(f64::NAN) - steal0;
            run.steal = (steal / (wall * cores() as f64)).max(0.0);
            if let (Some(a), Some(b)) = (probe.and_then(|p| p.read()), counted0) {
                run.server_counted = a - b;
            }
            if run.foreign <= 0.05 || attempt >= ATTEMPTS {
                break (run, before, after, peaks);
            }
            log(format!(
                "  {} / {}: other processes took {:.0}% of the machine; repeating",
                test.label(),
                path.label(),
                run.foreign * 100.0
            ));
        };
        let mut cpu = 0.0;
        for (i, g) in groups.iter().enumerate() {
            if path.groups().contains(&g.name.as_str()) {
                let d = after[i] - before[i];
                cpu += d;
                self.group_cpu
                    .entry((g.name.clone(), test))
                    .or_default()
                    .push(d);
                let peak = self.group_peak.entry(g.name.clone()).or_default();
                *peak = (*peak).max(peaks[i]);
                if !g.intact() {
                    run.note = Some(format!("{} lost a process", g.name));
                }
            }
        }
        run.proxy_cpu = cpu;
        log(format!(
            "  {:<19} {:<48} {:>10.1}  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}  proxy CPU {:.2} s  other CPU {:.0}%  steal {:.0}%{}",
            test.label(),
            path.label(),
            run.value,
            run.p50_ms,
            run.p99_ms,
            run.errors,
            cpu,
            run.foreign * 100.0,
            run.steal * 100.0,
            run.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default()
        ));
        self.runs.entry((test, path)).or_default().push(run);
    }

    pub fn bulk(&mut self, path: Via, port: u16) {
        let bytes = self.o.bulk_mib * 1024 * 1024;
        let limit = Duration::from_secs(self.o.bulk_limit);
        self.measure(Test::Bulk, path, || {
            let r = bulk::echo(addr(port), bytes, limit);
            let mut run = Run::new(
                if r.complete {
                    r.mib_per_sec()
                } else {
                    f64::NAN
                },
                f64::NAN,
                f64::NAN,
                u64::from(!r.complete),
                r.bytes as f64,
            );
            run.note = r.error.map(|e| format!("incomplete: {e}"));
            run
        });
    }

    pub fn wrk(&mut self, test: Test, path: Via, port: u16, duration: Duration, record: bool) {
        let args = wrk::WrkArgs {
            threads: self.o.wrk_threads,
            connections: if test == Test::NewConns {
                self.o.close_conns
            } else {
                self.o.wrk_conns
            },
            duration,
            close: test == Test::NewConns,
        };
        let url = format!("http://127.0.0.1:{port}{BENCH_PATH}");
        let o = self.o;
        let run = || match wrk::run(&o.wrk, &args, &url) {
            Ok(r) => Run::new(
                r.req_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.errors(),
                r.requests as f64,
            ),
            Err(e) => Run::failed(e.lines().next().unwrap_or("wrk failed").to_string()),
        };
        if record {
            self.measure(test, path, run);
        } else {
            let _ = run();
        }
    }

    /// The h2load arguments of an HTTP/2 throughput or fixed-rate test.
    pub fn h2_args(&self, test: Test, duration: Duration) -> h2load::H2Args {
        let o = self.o;
        let rate = matches!(test, Test::RateH1 | Test::RateH2);
        h2load::H2Args {
            threads: if rate { 1 } else { o.h2_threads },
            connections: if rate { o.rate_conns } else { o.h2_conns },
            streams: if rate { 1 } else { o.h2_streams },
            duration,
            // A fixed rate means evenly spaced requests: the connections open 1/rate apart,
            // each sending every rate-conns/rate. Opened together, h2load's timers would fire
            // together and every request would queue behind a burst of rate-conns others.
            requests: rate.then(|| u64::from(o.rate) * duration.as_secs().max(1)),
            rps: rate.then(|| o.rate / o.rate_conns),
            stagger_ms: rate.then(|| 1000 / o.rate),
            h1: test == Test::RateH1,
            log_file: self.dir.join("h2load.log"),
        }
    }

    pub fn h2load(&mut self, test: Test, path: Via, port: u16, duration: Duration, record: bool) {
        let args = self.h2_args(test, duration);
        let url = format!("http://127.0.0.1:{port}{BENCH_PATH}");
        let o = self.o;
        let run = || match h2load::run(&o.h2load, &args, &url) {
            Ok(r) => Run::new(
                r.summary.req_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.errors,
                r.ok as f64,
            ),
            Err(e) => Run::failed(e.lines().next().unwrap_or("h2load failed").to_string()),
        };
        if record {
            self.measure(test, path, run);
        } else {
            let _ = run();
        }
    }

    pub fn median_of(&self, test: Test, path: Via, f: impl Fn(&Run) -> f64) -> f64 {
        self.runs
            .get(&(test, path))
            .map_or(f64::NAN, |v| median(&v.iter().map(f).collect::<Vec<_>>()))
    }

    /// (server-side count, requests counted by the load tool) summed over the runs of a test.
    pub fn counted(&self, test: Test, path: Via) -> Option<(f64, f64)> {
        let runs = self.runs.get(&(test, path))?;
        let counted: Vec<&Run> = runs.iter().filter(|r| !r.server_counted.is_nan()).collect();
        (!counted.is_empty()).then(|| {
            (
                counted.iter().map(|r| r.server_counted).sum(),
                counted.iter().map(|r| r.units).sum(),
            )
        })
    }
}
