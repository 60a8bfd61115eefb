//! The command line: options, their defaults and their bounds.

use std::path::{Path, PathBuf};

const USAGE: &str = "\
sigil-perf-harness — sigil-proxy pairs vs nginx mTLS pairs vs direct, on loopback

USAGE:
    sigil-perf-harness [OPTIONS]

Build first: cargo build --release -p sigil-proxy -p sigil-e2e -p sigil-perf

OPTIONS:
    --runs N            measured runs per test and path, median reported   [3]
    --duration SECS     duration of each wrk / h2load run                  [10]
    --bulk-mib N        MiB pushed through the echo backend per bulk run   [1024]
    --bulk-limit SECS   time limit of one bulk run                         [60]
    --wrk-threads N     wrk threads                                        [2]
    --wrk-conns N       wrk connections, keep-alive test                   [64]
    --close-conns N     wrk connections, Connection: close test            [16]
    --h2-conns N        h2load connections, HTTP/2 throughput test         [16]
    --h2-streams N      h2load concurrent streams per connection (-m)      [10]
    --h2-threads N      h2load threads, HTTP/2 throughput test             [1]
    --rate N            total req/s of the fixed-rate latency tests; must
                        divide 1000                                        [1000]
    --rate-conns N      h2load connections of the fixed-rate tests; each
                        sends N/rate-conns req/s (--rps), and they open
                        1000/N ms apart so that requests arrive evenly     [10]
    --policies N        Policy documents in the L7 server sidecar's
                        policyDir (a quarter target the server itself)    [1200]
    --nginx-workers N   worker_processes of each nginx proxy    [available cores]
    --bin-dir DIR       where sigil-proxy and sigil-toy-workload are
                                                  [directory of this executable]
    --nginx PATH        nginx binary                                       [nginx]
    --stream-module P   ngx_stream_module.so to load, or 'builtin'
                                    [/usr/lib/nginx/modules/ngx_stream_module.so]
    --wrk PATH          wrk binary                                         [wrk]
    --h2load PATH       h2load binary (nghttp2-client)                     [h2load]
    --skip-sigil        leave out the sigil pairs (harness development only)
    --skip-nginx        leave out the nginx pairs
    --out FILE          also write the markdown report to FILE
    --keep              keep the work directory (configs, policies, certs, nginx logs)
    -h, --help          this text";

pub struct Opts {
    pub runs: usize,
    pub duration: u64,
    pub bulk_mib: u64,
    pub bulk_limit: u64,
    pub wrk_threads: u32,
    pub wrk_conns: u32,
    pub close_conns: u32,
    pub h2_conns: u32,
    pub h2_streams: u32,
    pub h2_threads: u32,
    pub rate: u32,
    pub rate_conns: u32,
    pub policies: usize,
    pub nginx_workers: usize,
    pub bin_dir: PathBuf,
    pub nginx: String,
    pub stream_module: String,
    pub wrk: String,
    pub h2load: String,
    pub skip_sigil: bool,
    pub skip_nginx: bool,
    pub out: Option<PathBuf>,
    pub keep: bool,
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The options of this process's command line, checked; `--help` prints USAGE and exits.
pub fn parse() -> Result<Opts, String> {
    let mut o = defaults()?;
    let mut args = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        v.as_deref()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{flag} needs a positive number"))
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => o.runs = num(&a, args.next())?,
            "--duration" => o.duration = num(&a, args.next())?,
            "--bulk-mib" => o.bulk_mib = num(&a, args.next())?,
            "--bulk-limit" => o.bulk_limit = num(&a, args.next())?,
            "--wrk-threads" => o.wrk_threads = num(&a, args.next())?,
            "--wrk-conns" => o.wrk_conns = num(&a, args.next())?,
            "--close-conns" => o.close_conns = num(&a, args.next())?,
            "--h2-conns" => o.h2_conns = num(&a, args.next())?,
            "--h2-streams" => o.h2_streams = num(&a, args.next())?,
            "--h2-threads" => o.h2_threads = num(&a, args.next())?,
            "--rate" => o.rate = num(&a, args.next())?,
            "--rate-conns" => o.rate_conns = num(&a, args.next())?,
            "--policies" => o.policies = num(&a, args.next())?,
            "--nginx-workers" => o.nginx_workers = num(&a, args.next())?,
            "--bin-dir" => o.bin_dir = args.next().ok_or("--bin-dir needs DIR")?.into(),
            "--nginx" => o.nginx = args.next().ok_or("--nginx needs PATH")?,
            "--stream-module" => o.stream_module = args.next().ok_or("--stream-module needs P")?,
            "--wrk" => o.wrk = args.next().ok_or("--wrk needs PATH")?,
            "--h2load" => o.h2load = args.next().ok_or("--h2load needs PATH")?,
            "--skip-sigil" => o.skip_sigil = true,
            "--skip-nginx" => o.skip_nginx = true,
            "--out" => o.out = Some(args.next().ok_or("--out needs FILE")?.into()),
            "--keep" => o.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    check(&o)?;
    Ok(o)
}

/// The defaults shown in USAGE; the binaries are looked for next to this executable (out of
/// `deps/` when it runs as a test).
fn defaults() -> Result<Opts, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if bin_dir.ends_with("deps") {
        bin_dir.pop();
    }
    Ok(Opts {
        runs: 3,
        duration: 10,
        bulk_mib: 1024,
        bulk_limit: 60,
        wrk_threads: 2,
        wrk_conns: 64,
        close_conns: 16,
        h2_conns: 16,
        h2_streams: 10,
        h2_threads: 1,
        rate: 1000,
        rate_conns: 10,
        policies: 1200,
        nginx_workers: cores(),
        bin_dir,
        nginx: "nginx".into(),
        stream_module: "/usr/lib/nginx/modules/ngx_stream_module.so".into(),
        wrk: "wrk".into(),
        h2load: "h2load".into(),
        skip_sigil: false,
        skip_nginx: false,
        out: None,
        keep: false,
    })
}

/// Every load stays bounded in time and size, and the load tools get arguments they accept.
fn check(o: &Opts) -> Result<(), String> {
    let bounded = (1..=20).contains(&o.runs)
        && (1..=120).contains(&o.duration)
        && (1..=16 * 1024).contains(&o.bulk_mib)
        && (1..=600).contains(&o.bulk_limit)
        && (1..=64).contains(&o.wrk_threads)
        && (1..=4096).contains(&o.wrk_conns)
        && (1..=4096).contains(&o.close_conns)
        && (1..=1024).contains(&o.h2_conns)
        && (1..=256).contains(&o.h2_streams)
        && (1..=64).contains(&o.h2_threads)
        && (1..=1000).contains(&o.rate)
        && (1..=1024).contains(&o.rate_conns)
        && (4..=20_000).contains(&o.policies)
        && (1..=64).contains(&o.nginx_workers);
    if !bounded {
        return Err(
            "out of range: runs 1-20, duration 1-120 s, bulk-mib 1-16384, bulk-limit 1-600 s, \
             wrk-threads 1-64, wrk connections 1-4096, h2-conns 1-1024, h2-streams 1-256, \
             h2-threads 1-64, rate 1-1000, rate-conns 1-1024, policies 4-20000, \
             nginx-workers 1-64"
                .into(),
        );
    }
    if o.wrk_conns < o.wrk_threads || o.close_conns < o.wrk_threads {
        return Err("wrk needs at least as many connections as threads".into());
    }
    if o.h2_conns < o.h2_threads {
        return Err("h2load needs at least as many connections as threads".into());
    }
    if !o.rate.is_multiple_of(o.rate_conns) {
        return Err(
            "--rate must be a multiple of --rate-conns (h2load's --rps is per connection)".into(),
        );
    }
    if !1000u32.is_multiple_of(o.rate) {
        return Err(
            "--rate must divide 1000: the fixed-rate connections open 1000/rate ms apart \
             (h2load's --rate-period takes whole milliseconds)"
                .into(),
        );
    }
    Ok(())
}
