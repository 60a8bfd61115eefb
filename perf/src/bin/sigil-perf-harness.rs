//! sigil-perf-harness: one run, loopback only, comparing a direct connection, a sigil-proxy
//! sidecar pair and nginx mTLS pairs (L4 stream and L7 http) on the same certificates.
//!
//! ```text
//! wrk / bulk client ─► client-side proxy ══mTLS══► server-side proxy ─► backend (127.0.0.1)
//! ```
//!
//! Measures L4 bulk throughput through an echo backend, HTTP/1.1 keep-alive req/s with p50 and
//! p99 (wrk), new mTLS connections per second (wrk with `Connection: close`), and for each
//! proxy process its RSS (idle, peak under load, after load) and CPU seconds. Prints markdown.
//! Every process it starts is ended by PID (`sigil_e2e::Proc`); every load is bounded in time
//! and size; all traffic goes to 127.0.0.1. See perf/README.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sigil_config::ProxyConfig;
use sigil_e2e::{free_port, wait_for_port, write_identity, Proc, TempDir};
use sigil_perf::procfs::{self, Group, Sampler};
use sigil_perf::render::render;
use sigil_perf::stats::median;
use sigil_perf::{bulk, wrk};
use sigil_testkit::{Ca, SvidSpec};

const TRUST_DOMAIN: &str = "example.org";
const CLIENT_ID: &str = "spiffe://example.org/ns/perf/sa/client";
const SERVER_ID: &str = "spiffe://example.org/ns/perf/sa/server";
/// nginx cannot pin a SPIFFE URI SAN; the server SVID also carries this DNS SAN so that the
/// nginx client side can pin *something* (`proxy_ssl_name`). Sigil ignores DNS SANs.
const SERVER_DNS: &str = "server.perf.sigil.test";
const BACKEND_BODY: &str = "hello, sigil\n";
/// A measured run is repeated when other processes disturbed it, at most this often in all.
const ATTEMPTS: u32 = 3;
/// Longest wait for the machine to become quiet before a run.
const QUIET_WAIT_SECS: u64 = 120;

const T_COMMON: &str = include_str!("../../nginx/common.conf.in");
const T_L4_CLIENT: &str = include_str!("../../nginx/l4-client.conf.in");
const T_L4_SERVER: &str = include_str!("../../nginx/l4-server.conf.in");
const T_L7_CLIENT: &str = include_str!("../../nginx/l7-client.conf.in");
const T_L7_SERVER: &str = include_str!("../../nginx/l7-server.conf.in");
const T_BACKEND: &str = include_str!("../../nginx/backend.conf.in");

const USAGE: &str = "\
sigil-perf-harness — sigil-proxy pair vs nginx mTLS pairs vs direct, on loopback

USAGE:
    sigil-perf-harness [OPTIONS]

Build first: cargo build --release -p sigil-proxy -p sigil-e2e -p sigil-perf

OPTIONS:
    --runs N            measured runs per test and path, median reported   [3]
    --duration SECS     wrk duration per run                               [10]
    --bulk-mib N        MiB pushed through the echo backend per bulk run   [1024]
    --bulk-limit SECS   time limit of one bulk run                         [60]
    --wrk-threads N     wrk threads                                        [2]
    --wrk-conns N       wrk connections, keep-alive test                   [64]
    --close-conns N     wrk connections, Connection: close test            [16]
    --nginx-workers N   worker_processes of each nginx proxy    [available cores]
    --bin-dir DIR       where sigil-proxy and sigil-toy-workload are
                                                  [directory of this executable]
    --nginx PATH        nginx binary                                       [nginx]
    --stream-module P   ngx_stream_module.so to load, or 'builtin'
                                    [/usr/lib/nginx/modules/ngx_stream_module.so]
    --wrk PATH          wrk binary                                         [wrk]
    --skip-sigil        leave out the sigil pair (harness development only)
    --skip-nginx        leave out the nginx pairs
    --out FILE          also write the markdown report to FILE
    --keep              keep the work directory (configs, certs, nginx logs)
    -h, --help          this text";

struct Opts {
    runs: usize,
    duration: u64,
    bulk_mib: u64,
    bulk_limit: u64,
    wrk_threads: u32,
    wrk_conns: u32,
    close_conns: u32,
    nginx_workers: usize,
    bin_dir: PathBuf,
    nginx: String,
    stream_module: String,
    wrk: String,
    skip_sigil: bool,
    skip_nginx: bool,
    out: Option<PathBuf>,
    keep: bool,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_opts() -> Result<Opts, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if bin_dir.ends_with("deps") {
        bin_dir.pop();
    }
    let mut o = Opts {
        runs: 3,
        duration: 10,
        bulk_mib: 1024,
        bulk_limit: 60,
        wrk_threads: 2,
        wrk_conns: 64,
        close_conns: 16,
        nginx_workers: cores(),
        bin_dir,
        nginx: "nginx".into(),
        stream_module: "/usr/lib/nginx/modules/ngx_stream_module.so".into(),
        wrk: "wrk".into(),
        skip_sigil: false,
        skip_nginx: false,
        out: None,
        keep: false,
    };
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
            "--nginx-workers" => o.nginx_workers = num(&a, args.next())?,
            "--bin-dir" => o.bin_dir = args.next().ok_or("--bin-dir needs DIR")?.into(),
            "--nginx" => o.nginx = args.next().ok_or("--nginx needs PATH")?,
            "--stream-module" => o.stream_module = args.next().ok_or("--stream-module needs P")?,
            "--wrk" => o.wrk = args.next().ok_or("--wrk needs PATH")?,
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
    let bounded = (1..=20).contains(&o.runs)
        && (1..=120).contains(&o.duration)
        && (1..=16 * 1024).contains(&o.bulk_mib)
        && (1..=600).contains(&o.bulk_limit)
        && (1..=64).contains(&o.wrk_threads)
        && (1..=4096).contains(&o.wrk_conns)
        && (1..=4096).contains(&o.close_conns)
        && (1..=64).contains(&o.nginx_workers);
    if !bounded {
        return Err(
            "out of range: runs 1-20, duration 1-120 s, bulk-mib 1-16384, bulk-limit 1-600 s, \
             wrk-threads 1-64, connections 1-4096, nginx-workers 1-64"
                .into(),
        );
    }
    if o.wrk_conns < o.wrk_threads || o.close_conns < o.wrk_threads {
        return Err("wrk needs at least as many connections as threads".into());
    }
    Ok(o)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[perf] {}", msg.as_ref());
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn tool_version(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unavailable ({e})"),
    }
}

/// One HTTP/1.1 request with `Connection: close`, bounded by 5 s; returns the raw response.
fn http_get(a: SocketAddr, path: &str) -> Result<String, String> {
    let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("connect {a}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|_| c.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: perf.local\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write {a}: {e}"))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && out.len() < 1 << 20 {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() => return Err(format!("read {a}: {e}")),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn is_ok_200(resp: &str) -> bool {
    resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
}

// ---------------------------------------------------------------------------------------
// The set-up: certificates, backends, proxies.

struct Ports {
    echo_backend: u16,
    http_backend: u16,
    sigil_admin_client: u16,
    sigil_admin_server: u16,
    sigil_client_echo: u16,
    sigil_client_http: u16,
    sigil_server_echo: u16,
    sigil_server_http: u16,
    l4_client_echo: u16,
    l4_client_http: u16,
    l4_server_echo: u16,
    l4_server_http: u16,
    l7_client_http: u16,
    l7_server_http: u16,
}

impl Ports {
    fn allocate() -> Self {
        let mut used = std::collections::HashSet::new();
        let mut next = || loop {
            let p = free_port();
            if used.insert(p) {
                return p;
            }
        };
        Self {
            echo_backend: next(),
            http_backend: next(),
            sigil_admin_client: next(),
            sigil_admin_server: next(),
            sigil_client_echo: next(),
            sigil_client_http: next(),
            sigil_server_echo: next(),
            sigil_server_http: next(),
            l4_client_echo: next(),
            l4_client_http: next(),
            l4_server_echo: next(),
            l4_server_http: next(),
            l7_client_http: next(),
            l7_server_http: next(),
        }
    }
}

/// client.crt/key + client-bundles/, server.crt/key + server-bundles/ in `dir`.
fn write_certs(dir: &Path) {
    let ca = Ca::new(TRUST_DOMAIN);
    write_identity(dir, "client", &ca, CLIENT_ID, &[&ca]);
    let mut spec = SvidSpec::new(SERVER_ID);
    spec.dns = vec![SERVER_DNS.to_string()];
    ca.issue(&spec).write(dir, "server");
    let bundles = dir.join("server-bundles");
    std::fs::create_dir_all(&bundles).expect("bundle dir");
    std::fs::write(bundles.join(format!("{TRUST_DOMAIN}.pem")), ca.bundle_pem())
        .expect("write bundle");
}

fn sigil_yaml(name: &str, side: &str, ports: &Ports) -> String {
    let (id, admin) = if side == "client" {
        (CLIENT_ID, ports.sigil_admin_client)
    } else {
        (SERVER_ID, ports.sigil_admin_server)
    };
    let mut y = format!(
        "apiVersion: sigil.dev/v1
kind: ProxyConfig
metadata: {{name: {name}, purpose: perf harness}}
spec:
  mode: explicit
  identity: {{certFile: {side}.crt, keyFile: {side}.key, bundleDir: {side}-bundles, spiffeId: \"{id}\"}}
  admin: {{listen: \"127.0.0.1:{admin}\"}}
"
    );
    if side == "client" {
        let _ = write!(
            y,
            "  outbound:
    explicit:
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\", expectedId: \"{SERVER_ID}\"}}
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\", expectedId: \"{SERVER_ID}\"}}
",
            ports.sigil_client_echo,
            ports.sigil_server_echo,
            ports.sigil_client_http,
            ports.sigil_server_http
        );
    } else {
        let _ = write!(
            y,
            "  inbound:
    ports:
      - {{port: {e}, allow: [\"{CLIENT_ID}\"]}}
      - {{port: {h}, allow: [\"{CLIENT_ID}\"]}}
    explicit:
      - {{listen: \"127.0.0.1:{}\", port: {e}}}
      - {{listen: \"127.0.0.1:{}\", port: {h}}}
",
            ports.sigil_server_echo,
            ports.sigil_server_http,
            e = ports.echo_backend,
            h = ports.http_backend,
        );
    }
    y
}

/// Writes, validates (with sigil-config, as sigil-proxy will) and starts one sidecar, then
/// waits for its admin `/ready`.
fn start_sigil(
    o: &Opts,
    dir: &Path,
    name: &str,
    side: &str,
    ports: &Ports,
) -> Result<Proc, String> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, sigil_yaml(name, side, ports)).map_err(|e| e.to_string())?;
    ProxyConfig::load(&path).map_err(|e| format!("generated config is invalid: {e}"))?;
    let bin = o.bin_dir.join("sigil-proxy");
    if !bin.exists() {
        return Err(format!(
            "{} not built: cargo build --release -p sigil-proxy -p sigil-e2e -p sigil-perf",
            bin.display()
        ));
    }
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path).env("SIGIL_LOG", "warn");
    let mut p = Proc::spawn(name, &mut cmd);
    let admin = addr(if side == "client" {
        ports.sigil_admin_client
    } else {
        ports.sigil_admin_server
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = p.try_wait() {
            return Err(format!("{name} exited ({st}):\n{}", p.log()));
        }
        if http_get(admin, "/ready").is_ok_and(|r| is_ok_200(&r)) {
            return Ok(p);
        }
        if Instant::now() >= deadline {
            return Err(format!("{name}: /ready not 200 after 15 s:\n{}", p.log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn nginx_config(
    o: &Opts,
    dir: &Path,
    name: &str,
    template: &str,
    workers: usize,
    vars: &[(&str, String)],
) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut all: Vec<(&str, String)> = vec![
        ("DIR", dir.display().to_string()),
        ("NAME", name.to_string()),
        ("WORKERS", workers.to_string()),
        ("SERVER_DNS", SERVER_DNS.to_string()),
        // As root, nginx would switch its workers to `nobody`; keep them as the same user
        // as sigil-proxy (both read the same key files).
        ("USER", if root { "user root;" } else { "" }.to_string()),
        (
            "LOAD_STREAM",
            if o.stream_module == "builtin" || !template.contains("stream {") {
                String::new()
            } else {
                format!("load_module {};", o.stream_module)
            },
        ),
    ];
    all.extend(vars.iter().cloned());
    render(&format!("{T_COMMON}\n{template}"), &all)
}

/// Renders, checks (`nginx -t`) and starts one nginx instance in the foreground; waits for
/// its listeners and its workers.
fn start_nginx(
    o: &Opts,
    dir: &Path,
    name: &str,
    template: &str,
    workers: usize,
    vars: &[(&str, String)],
    listens: &[u16],
) -> Result<Proc, String> {
    let conf_text = nginx_config(o, dir, name, template, workers, vars)?;
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, conf_text).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!("{name}-tmp"));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let err_log = dir.join(format!("{name}.error.log"));
    let base = |cmd: &mut Command| {
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&err_log)
            .arg("-c")
            .arg(&conf);
    };
    let mut test = Command::new(&o.nginx);
    test.arg("-t").arg("-q");
    base(&mut test);
    let out = test
        .output()
        .map_err(|e| format!("run {} -t: {e}", o.nginx))?;
    if !out.status.success() {
        return Err(format!(
            "nginx -t refused {}:\n{}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut cmd = Command::new(&o.nginx);
    base(&mut cmd);
    let mut p = Proc::spawn(name, &mut cmd);
    for &port in listens {
        wait_for_port(addr(port), Duration::from_secs(10));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::children(p.pid()).len() < workers {
        if let Some(st) = p.try_wait() {
            let errors = std::fs::read_to_string(&err_log).unwrap_or_default();
            return Err(format!("{name} exited ({st}):\n{}{errors}", p.log()));
        }
        if Instant::now() >= deadline {
            return Err(format!("{name}: fewer than {workers} workers after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Paths under test and their results.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Via {
    Direct,
    Sigil,
    NginxL4,
    NginxL7,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Sigil => "sigil-proxy pair (L4 mTLS)",
            Self::NginxL4 => "nginx stream pair (L4 mTLS)",
            Self::NginxL7 => "nginx http pair (L7 mTLS, keep-alive upstreams)",
        }
    }

    /// Names of the process groups that make up this path's proxies.
    fn groups(self) -> &'static [&'static str] {
        match self {
            Self::Direct => &[],
            Self::Sigil => &["sigil client-side", "sigil server-side"],
            Self::NginxL4 => &["nginx-l4 client-side", "nginx-l4 server-side"],
            Self::NginxL7 => &["nginx-l7 client-side", "nginx-l7 server-side"],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Test {
    Bulk,
    KeepAlive,
    NewConns,
}

impl Test {
    fn label(self) -> &'static str {
        match self {
            Self::Bulk => "L4 bulk",
            Self::KeepAlive => "HTTP keep-alive",
            Self::NewConns => "new connections",
        }
    }
}

/// One measured run: the figure (MiB/s, req/s), latencies, errors, and the CPU seconds of the
/// path's proxies during it.
#[derive(Debug, Clone)]
struct Run {
    value: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Units of work done (bytes for bulk, requests for wrk).
    units: f64,
    proxy_cpu: f64,
    /// Share of the machine's CPU (0..1) used by processes this harness did not start during
    /// the run (a build, another benchmark): a contamination indicator.
    foreign: f64,
    /// Share of the machine's CPU time stolen by the hypervisor during the run.
    steal: f64,
    note: Option<String>,
}

struct Bench<'a> {
    o: &'a Opts,
    sampler: &'a Sampler,
    runs: BTreeMap<(Test, Via), Vec<Run>>,
    /// Per group name and test: CPU seconds per run.
    group_cpu: BTreeMap<(String, Test), Vec<f64>>,
    /// Per group name: peak RSS (KiB) while its path was under load.
    group_peak: BTreeMap<String, u64>,
    /// sigil server-side admin address, to count its inbound connections.
    sigil_admin: Option<SocketAddr>,
    /// During the new-connection runs of the sigil pair: (inbound connections opened by the
    /// server side, requests counted by wrk).
    sigil_handshakes: Option<(f64, f64)>,
}

impl Bench<'_> {
    /// CPU of the harness, its children (wrk) and every process it started, in seconds.
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

    /// Runs `f` once the machine is quiet; repeats it (at most `ATTEMPTS` times in all) when
    /// other processes took more than 5% of the machine during the run, keeping the last.
    fn measure(&mut self, test: Test, path: Via, f: impl Fn() -> Run) {
        let groups = self.sampler.groups();
        let mut attempt = 0;
        let (mut run, before, after, peaks) = loop {
            attempt += 1;
            self.wait_quiet();
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
            "  {:<16} {:<48} {:>12.1}  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}  proxy CPU {:.2} s  other CPU {:.0}%  steal {:.0}%{}",
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

    fn bulk(&mut self, path: Via, port: u16) {
        let bytes = self.o.bulk_mib * 1024 * 1024;
        let limit = Duration::from_secs(self.o.bulk_limit);
        self.measure(Test::Bulk, path, || {
            let r = bulk::echo(addr(port), bytes, limit);
            Run {
                value: if r.complete {
                    r.mib_per_sec()
                } else {
                    f64::NAN
                },
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                errors: u64::from(!r.complete),
                units: r.bytes as f64,
                proxy_cpu: 0.0,
                foreign: 0.0,
                steal: 0.0,
                note: r.error.map(|e| format!("incomplete: {e}")),
            }
        });
    }

    fn wrk(&mut self, test: Test, path: Via, port: u16, duration: Duration, record: bool) {
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
        let url = format!("http://127.0.0.1:{port}/");
        let o = self.o;
        let run = || match wrk::run(&o.wrk, &args, &url) {
            Ok(r) => Run {
                value: r.req_per_sec,
                p50_ms: r.p50_ms,
                p99_ms: r.p99_ms,
                errors: r.errors(),
                units: r.requests as f64,
                proxy_cpu: 0.0,
                foreign: 0.0,
                steal: 0.0,
                note: None,
            },
            Err(e) => Run {
                value: f64::NAN,
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                errors: 1,
                units: 0.0,
                proxy_cpu: 0.0,
                foreign: 0.0,
                steal: 0.0,
                note: Some(e.lines().next().unwrap_or("wrk failed").to_string()),
            },
        };
        if record {
            let count = test == Test::NewConns && path == Via::Sigil;
            let before = if count { self.sigil_opened() } else { None };
            self.measure(test, path, run);
            if let (Some(b), Some(a)) = (before, self.sigil_opened().filter(|_| count)) {
                let requests = self.runs[&(test, path)].last().map_or(0.0, |r| r.units);
                let h = self.sigil_handshakes.get_or_insert((0.0, 0.0));
                h.0 += a - b;
                h.1 += requests;
            }
        } else {
            let _ = run();
        }
    }

    fn sigil_opened(&self) -> Option<f64> {
        let page = http_get(self.sigil_admin?, "/metrics").ok()?;
        sigil_e2e::metric(
            &page,
            "sigil_connections_opened_total",
            &["direction=\"inbound\""],
        )
    }

    fn median_of(&self, test: Test, path: Via, f: impl Fn(&Run) -> f64) -> f64 {
        self.runs
            .get(&(test, path))
            .map_or(f64::NAN, |v| median(&v.iter().map(f).collect::<Vec<_>>()))
    }
}

// ---------------------------------------------------------------------------------------

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

fn main() -> ExitCode {
    let o = match parse_opts() {
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
    let toy = o.bin_dir.join("sigil-toy-workload");
    if !toy.exists() {
        return Err(format!(
            "{} not built: cargo build --release -p sigil-proxy -p sigil-e2e -p sigil-perf",
            toy.display()
        ));
    }
    if !o.skip_nginx {
        if tool_version(&o.nginx, &["-v"]).starts_with("unavailable") {
            return Err(format!(
                "{} not found (apt-get install nginx libnginx-mod-stream)",
                o.nginx
            ));
        }
        if o.stream_module != "builtin" && !Path::new(&o.stream_module).exists() {
            return Err(format!(
                "{} missing (apt-get install libnginx-mod-stream, or --stream-module builtin)",
                o.stream_module
            ));
        }
    }
    if tool_version(&o.wrk, &["-v"]).starts_with("unavailable") {
        return Err(format!("{} not found (apt-get install wrk)", o.wrk));
    }

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
    write_certs(&dir);
    let ports = Ports::allocate();
    let mut procs: Vec<Proc> = Vec::new();
    let mut groups: Vec<Group> = Vec::new();

    // Backends: the toy workload echoes (thread per connection); one nginx worker serves the
    // HTTP page. Both are shared by every path, so their cost is the same for all.
    let echo = Proc::spawn(
        "echo-backend",
        Command::new(&toy).args([
            "--listen",
            &format!("127.0.0.1:{}", ports.echo_backend),
            "--name",
            "echo",
            "--echo",
        ]),
    );
    wait_for_port(addr(ports.echo_backend), Duration::from_secs(10));
    let http_backend = start_nginx(
        o,
        &dir,
        "backend",
        T_BACKEND,
        1,
        &[("HTTP_LISTEN", ports.http_backend.to_string())],
        &[ports.http_backend],
    )?;
    let backend_groups = vec![
        Group::new("backend: echo (toy workload)", echo.pid(), false),
        Group::new("backend: http (nginx, 1 worker)", http_backend.pid(), true),
    ];
    procs.push(echo);
    procs.push(http_backend);

    let mut paths: Vec<(Via, Option<u16>, u16)> =
        vec![(Via::Direct, Some(ports.echo_backend), ports.http_backend)];

    if !o.skip_sigil {
        log("starting the sigil-proxy pair");
        let server = start_sigil(o, &dir, "sigil-server", "server", &ports)?;
        let client = start_sigil(o, &dir, "sigil-client", "client", &ports)?;
        groups.push(Group::new("sigil client-side", client.pid(), false));
        groups.push(Group::new("sigil server-side", server.pid(), false));
        procs.push(server);
        procs.push(client);
        paths.push((
            Via::Sigil,
            Some(ports.sigil_client_echo),
            ports.sigil_client_http,
        ));
    }
    if !o.skip_nginx {
        log("starting the nginx pairs");
        let w = o.nginx_workers;
        let l4s = start_nginx(
            o,
            &dir,
            "nginx-l4-server",
            T_L4_SERVER,
            w,
            &[
                ("ECHO_LISTEN", ports.l4_server_echo.to_string()),
                ("ECHO_UPSTREAM", ports.echo_backend.to_string()),
                ("HTTP_LISTEN", ports.l4_server_http.to_string()),
                ("HTTP_UPSTREAM", ports.http_backend.to_string()),
            ],
            &[ports.l4_server_echo, ports.l4_server_http],
        )?;
        let l4c = start_nginx(
            o,
            &dir,
            "nginx-l4-client",
            T_L4_CLIENT,
            w,
            &[
                ("ECHO_LISTEN", ports.l4_client_echo.to_string()),
                ("ECHO_UPSTREAM", ports.l4_server_echo.to_string()),
                ("HTTP_LISTEN", ports.l4_client_http.to_string()),
                ("HTTP_UPSTREAM", ports.l4_server_http.to_string()),
            ],
            &[ports.l4_client_echo, ports.l4_client_http],
        )?;
        let l7s = start_nginx(
            o,
            &dir,
            "nginx-l7-server",
            T_L7_SERVER,
            w,
            &[
                ("HTTP_LISTEN", ports.l7_server_http.to_string()),
                ("HTTP_UPSTREAM", ports.http_backend.to_string()),
            ],
            &[ports.l7_server_http],
        )?;
        let l7c = start_nginx(
            o,
            &dir,
            "nginx-l7-client",
            T_L7_CLIENT,
            w,
            &[
                ("HTTP_LISTEN", ports.l7_client_http.to_string()),
                ("HTTP_UPSTREAM", ports.l7_server_http.to_string()),
            ],
            &[ports.l7_client_http],
        )?;
        groups.push(Group::new("nginx-l4 client-side", l4c.pid(), true));
        groups.push(Group::new("nginx-l4 server-side", l4s.pid(), true));
        groups.push(Group::new("nginx-l7 client-side", l7c.pid(), true));
        groups.push(Group::new("nginx-l7 server-side", l7s.pid(), true));
        procs.extend([l4s, l4c, l7s, l7c]);
        paths.push((
            Via::NginxL4,
            Some(ports.l4_client_echo),
            ports.l4_client_http,
        ));
        paths.push((Via::NginxL7, None, ports.l7_client_http));
    }

    // Idle: started and ready, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let idle: Vec<(u64, u64)> = groups.iter().map(|g| (g.rss_kib(), g.anon_kib())).collect();

    log("sanity checks");
    for &(path, echo_port, http_port) in &paths {
        let r = http_get(addr(http_port), "/")?;
        if !is_ok_200(&r) || !r.contains(BACKEND_BODY.trim_end()) {
            return Err(format!(
                "{}: GET / did not reach the backend:\n{r}",
                path.label()
            ));
        }
        if let Some(p) = echo_port {
            let r = bulk::echo(addr(p), 256 * 1024, Duration::from_secs(10));
            if !r.complete {
                return Err(format!("{}: echo failed: {:?}", path.label(), r.error));
            }
        }
    }
    // The server-side listeners must refuse plaintext (mTLS is really on).
    let mut server_side = Vec::new();
    if !o.skip_sigil {
        server_side.push(("sigil server-side", ports.sigil_server_http));
    }
    if !o.skip_nginx {
        server_side.push(("nginx-l4 server-side", ports.l4_server_http));
        server_side.push(("nginx-l7 server-side", ports.l7_server_http));
    }
    for (name, port) in server_side {
        if let Ok(r) = http_get(addr(port), "/") {
            if is_ok_200(&r) {
                return Err(format!(
                    "{name} answered plaintext HTTP: mTLS is not enforced"
                ));
            }
        }
    }

    let all_groups: Vec<Group> = groups.iter().chain(&backend_groups).cloned().collect();
    let sampler = Sampler::start(all_groups, Duration::from_millis(100));
    let mut b = Bench {
        o,
        sampler: &sampler,
        runs: BTreeMap::new(),
        group_cpu: BTreeMap::new(),
        group_peak: BTreeMap::new(),
        sigil_admin: (!o.skip_sigil).then(|| addr(ports.sigil_admin_server)),
        sigil_handshakes: None,
    };
    let started = Instant::now();
    let dur = Duration::from_secs(o.duration);
    let settle = || std::thread::sleep(Duration::from_millis(500));

    log(format!(
        "L4 bulk: {} MiB echoed per run, 1 connection, {} runs",
        o.bulk_mib, o.runs
    ));
    for _ in 0..o.runs {
        for &(path, echo_port, _) in &paths {
            if let Some(p) = echo_port {
                b.bulk(path, p);
                settle();
            }
        }
    }

    log(format!(
        "HTTP keep-alive: wrk -t{} -c{} -d{}s, {} runs (after a 2 s warm-up per path)",
        o.wrk_threads, o.wrk_conns, o.duration, o.runs
    ));
    for &(path, _, http_port) in &paths {
        b.wrk(
            Test::KeepAlive,
            path,
            http_port,
            Duration::from_secs(2),
            false,
        );
    }
    for _ in 0..o.runs {
        for &(path, _, http_port) in &paths {
            b.wrk(Test::KeepAlive, path, http_port, dur, true);
            settle();
        }
    }

    log(format!(
        "new connections: wrk -t{} -c{} -d{}s -H 'Connection: close', {} runs",
        o.wrk_threads, o.close_conns, o.duration, o.runs
    ));
    for _ in 0..o.runs {
        for &(path, _, http_port) in &paths {
            if path == Via::NginxL7 {
                // Its client side keeps pooled upstream connections: no new handshake per
                // request, so it does not measure what this test is for.
                continue;
            }
            b.wrk(Test::NewConns, path, http_port, dur, true);
            // Let the TIME_WAIT churn of this run settle before the next.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let elapsed = started.elapsed();

    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = groups.iter().map(Group::rss_kib).collect();
    let mut sigil_metrics = None;
    if !o.skip_sigil {
        sigil_metrics = http_get(addr(ports.sigil_admin_server), "/metrics").ok();
    }

    let report = report(o, &b, &groups, &backend_groups, &idle, &after, elapsed);
    print!("{report}");
    if let Some(m) = sigil_metrics {
        let interesting: Vec<&str> = m
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("_total"))
            .take(12)
            .collect();
        if !interesting.is_empty() {
            log("sigil server-side counters after the run (first lines):");
            for l in interesting {
                log(format!("  {l}"));
            }
        }
    }
    if let Some(out) = &o.out {
        std::fs::write(out, &report).map_err(|e| format!("write {}: {e}", out.display()))?;
        log(format!("report written to {}", out.display()));
    }
    drop(sampler);
    log("stopping processes");
    for mut p in procs.into_iter().rev() {
        p.terminate(Duration::from_secs(5));
    }
    if o.keep {
        log(format!("kept {}", dir.display()));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn report(
    o: &Opts,
    b: &Bench,
    groups: &[Group],
    backend_groups: &[Group],
    idle: &[(u64, u64)],
    after: &[u64],
    elapsed: Duration,
) -> String {
    let mut s = String::new();
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
        "- {}; {}; {}",
        tool_version(
            &o.bin_dir.join("sigil-proxy").display().to_string(),
            &["--version"]
        ),
        tool_version(&o.nginx, &["-v"]),
        tool_version(&o.wrk, &["-v"])
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
    let _ = writeln!(
        s,
        "- backends: echo = `sigil-toy-workload --echo` (thread per connection); HTTP = nginx \
         (1 worker) returning a 13-byte body from memory, keep-alive\n"
    );

    let paths = [Via::Direct, Via::Sigil, Via::NginxL4, Via::NginxL7];
    let present = |t: Test| -> Vec<Via> {
        paths
            .iter()
            .copied()
            .filter(|p| b.runs.contains_key(&(t, *p)))
            .collect()
    };
    let errors = |t: Test, p: Via| -> u64 {
        b.runs
            .get(&(t, p))
            .map_or(0, |v| v.iter().map(|r| r.errors).sum())
    };

    // Bulk.
    let _ = writeln!(
        s,
        "### L4 bulk throughput — {} MiB through an echo backend, 1 connection\n",
        o.bulk_mib
    );
    let _ = writeln!(
        s,
        "| path | MiB/s echoed (median) | runs | vs nginx L4 | proxy CPU s per GiB (both sides) |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|");
    let nginx_bulk = b.median_of(Test::Bulk, Via::NginxL4, |r| r.value);
    for p in present(Test::Bulk) {
        let m = b.median_of(Test::Bulk, p, |r| r.value);
        let all: Vec<String> = b.runs[&(Test::Bulk, p)]
            .iter()
            .map(|r| fmt(r.value, 0))
            .collect();
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

    for (t, title, baseline) in [
        (
            Test::KeepAlive,
            format!(
                "HTTP/1.1 keep-alive — `wrk -t{} -c{} -d{}s --latency`",
                o.wrk_threads, o.wrk_conns, o.duration
            ),
            Via::NginxL7,
        ),
        (
            Test::NewConns,
            format!(
                "New mTLS connections — `wrk -t{} -c{} -d{}s --latency -H 'Connection: close'` \
                 (one TCP + mTLS handshake per request)",
                o.wrk_threads, o.close_conns, o.duration
            ),
            Via::NginxL4,
        ),
    ] {
        let _ = writeln!(s, "\n### {title}\n");
        let (unit, per) = if t == Test::KeepAlive {
            ("req/s", "request")
        } else {
            ("conn/s", "connection")
        };
        // Keep-alive is compared with both nginx pairs; new connections only with the L4 pair
        // (the L7 pair reuses its upstream TLS connections, so it does no handshake per request).
        let mut cols = vec![baseline];
        if baseline != Via::NginxL4 {
            cols.push(Via::NginxL4);
        }
        let col_names: String = cols
            .iter()
            .map(|c| {
                if *c == Via::NginxL7 {
                    " vs nginx L7 |"
                } else {
                    " vs nginx L4 |"
                }
            })
            .collect();
        let _ = writeln!(
            s,
            "| path | {unit} (median) | p50 ms | p99 ms | errors |{col_names} proxy CPU µs per {per} |"
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|{}---:|",
            "---:|".repeat(cols.len())
        );
        for p in present(t) {
            let m = b.median_of(t, p, |r| r.value);
            let cpu_per_req = b.median_of(t, p, |r| r.proxy_cpu / r.units * 1e6);
            let ratios: String = cols
                .iter()
                .map(|c| format!(" {} |", ratio(m, b.median_of(t, *c, |r| r.value))))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |{ratios} {} |",
                p.label(),
                fmt(m, 0),
                fmt(b.median_of(t, p, |r| r.p50_ms), 3),
                fmt(b.median_of(t, p, |r| r.p99_ms), 3),
                errors(t, p),
                if p == Via::Direct {
                    "—".into()
                } else {
                    fmt(cpu_per_req, 1)
                }
            );
        }
        if t == Test::NewConns {
            if let Some((opened, requests)) = b.sigil_handshakes {
                let _ = writeln!(
                    s,
                    "\nsigil server-side `sigil_connections_opened_total` (inbound) grew by {opened:.0} \
                     during these runs, for {requests:.0} requests counted by wrk: one mTLS \
                     connection per request."
                );
            }
        }
    }

    let _ = writeln!(s, "\n### Proxy processes\n");
    let _ = writeln!(
        s,
        "RSS = VmRSS (nginx: master + workers summed; RssAnon in brackets). CPU = utime+stime \
         per run (median) while that path was under load.\n"
    );
    let _ = writeln!(
        s,
        "| process | idle RSS MiB | peak RSS under load MiB | RSS after load MiB | CPU s bulk | CPU s keep-alive | CPU s new conns |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    let cpu = |g: &str, t: Test| {
        b.group_cpu
            .get(&(g.to_string(), t))
            .map_or(f64::NAN, |v| median(v))
    };
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} (pids {}) | {} ({}) | {} | {} | {} | {} | {} |",
            g.name,
            g.pids().len(),
            fmt(mib(idle[i].0), 1),
            fmt(mib(idle[i].1), 1),
            b.group_peak
                .get(&g.name)
                .map_or("—".into(), |k| fmt(mib(*k), 1)),
            fmt(mib(after[i]), 1),
            fmt(cpu(&g.name, Test::Bulk), 2),
            fmt(cpu(&g.name, Test::KeepAlive), 2),
            fmt(cpu(&g.name, Test::NewConns), 2),
        );
    }
    let _ = writeln!(
        s,
        "\nBackends (shared by all paths): {}.",
        backend_groups
            .iter()
            .map(|g| format!("{} {:.1} MiB", g.name, mib(g.rss_kib())))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // Targets of the issue.
    let _ = writeln!(s, "\n### Against the targets\n");
    let _ = writeln!(s, "| target | measured | status |");
    let _ = writeln!(s, "|---|---|---|");
    let have = |t: Test, p: Via| b.runs.contains_key(&(t, p));
    let sb = b.median_of(Test::Bulk, Via::Sigil, |r| r.value);
    let ok = |c: bool, t: Test, p: Via, q: Via| (have(t, p) && have(t, q)).then_some(c);
    let _ = writeln!(
        s,
        "| L4 bulk >= 1.2x nginx L4 pair | {} | {} |",
        ratio(sb, nginx_bulk),
        verdict(ok(
            sb >= 1.2 * nginx_bulk,
            Test::Bulk,
            Via::Sigil,
            Via::NginxL4
        ))
    );
    let sk = b.median_of(Test::KeepAlive, Via::Sigil, |r| r.value);
    for (q, name) in [
        (Via::NginxL7, "nginx L7 pair"),
        (Via::NginxL4, "nginx L4 pair"),
    ] {
        let n = b.median_of(Test::KeepAlive, q, |r| r.value);
        let _ = writeln!(
            s,
            "| HTTP req/s >= 1.3x {name} | {} | {} |",
            ratio(sk, n),
            verdict(ok(sk >= 1.3 * n, Test::KeepAlive, Via::Sigil, q))
        );
    }
    let sp = b.median_of(Test::KeepAlive, Via::Sigil, |r| r.p99_ms);
    for (q, name) in [
        (Via::NginxL7, "nginx L7 pair"),
        (Via::NginxL4, "nginx L4 pair"),
    ] {
        let n = b.median_of(Test::KeepAlive, q, |r| r.p99_ms);
        let _ = writeln!(
            s,
            "| keep-alive p99 <= {name} | {} ms vs {} ms | {} |",
            fmt(sp, 3),
            fmt(n, 3),
            verdict(ok(sp <= n, Test::KeepAlive, Via::Sigil, q))
        );
    }
    let scp = b.median_of(Test::NewConns, Via::Sigil, |r| r.p99_ms);
    let ncp = b.median_of(Test::NewConns, Via::NginxL4, |r| r.p99_ms);
    let _ = writeln!(
        s,
        "| new-connection p99 <= nginx L4 pair | {} ms vs {} ms | {} |",
        fmt(scp, 3),
        fmt(ncp, 3),
        verdict(ok(scp <= ncp, Test::NewConns, Via::Sigil, Via::NginxL4))
    );
    for (i, g) in groups.iter().enumerate() {
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
    s
}
