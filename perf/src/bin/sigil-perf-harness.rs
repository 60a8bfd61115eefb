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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sigil_config::ProxyConfig;
use sigil_e2e::{free_port, wait_for_port, write_identity, Proc, TempDir};
use sigil_perf::policies::{self, BENCH_PATH, BENCH_ROUTE, DENIED_PATH, WHOAMI_PATH};
use sigil_perf::procfs::{self, Group, Sampler};
use sigil_perf::render::render;
use sigil_perf::stats::median;
use sigil_perf::{bulk, h2load, wrk};
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

struct Opts {
    runs: usize,
    duration: u64,
    bulk_mib: u64,
    bulk_limit: u64,
    wrk_threads: u32,
    wrk_conns: u32,
    close_conns: u32,
    h2_conns: u32,
    h2_streams: u32,
    h2_threads: u32,
    rate: u32,
    rate_conns: u32,
    policies: usize,
    nginx_workers: usize,
    bin_dir: PathBuf,
    nginx: String,
    stream_module: String,
    wrk: String,
    h2load: String,
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
    http_get_with(a, path, "")
}

/// As [`http_get`], with extra header lines (each ending in `\r\n`).
fn http_get_with(a: SocketAddr, path: &str, extra: &str) -> Result<String, String> {
    let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("connect {a}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|_| c.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: perf.local\r\nConnection: close\r\n{extra}\r\n"
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

/// The body of a raw HTTP/1.1 response (after the blank line).
fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

// ---------------------------------------------------------------------------------------
// The set-up: certificates, backends, proxies.

struct Ports {
    echo_backend: u16,
    http_backend: u16,
    http_backend_h2: u16,
    sigil_admin_client: u16,
    sigil_admin_server: u16,
    sigil_client_echo: u16,
    sigil_client_http: u16,
    sigil_server_echo: u16,
    sigil_server_http: u16,
    sigil_l7_admin_client: u16,
    sigil_l7_admin_server: u16,
    sigil_l7_client_http: u16,
    sigil_l7_server_http: u16,
    l4_client_echo: u16,
    l4_client_http: u16,
    l4_server_echo: u16,
    l4_server_http: u16,
    l7_client_http: u16,
    l7_client_h2: u16,
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
            http_backend_h2: next(),
            sigil_admin_client: next(),
            sigil_admin_server: next(),
            sigil_client_echo: next(),
            sigil_client_http: next(),
            sigil_server_echo: next(),
            sigil_server_http: next(),
            sigil_l7_admin_client: next(),
            sigil_l7_admin_server: next(),
            sigil_l7_client_http: next(),
            sigil_l7_server_http: next(),
            l4_client_echo: next(),
            l4_client_http: next(),
            l4_server_echo: next(),
            l4_server_http: next(),
            l7_client_http: next(),
            l7_client_h2: next(),
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

/// A sidecar's ProxyConfig: `side` names its certificate files (`client` or `server`) and its
/// SPIFFE ID; `body` holds its listeners (and `policyDir`), indented under `spec:`.
fn sigil_yaml(name: &str, side: &str, admin: u16, body: &str) -> String {
    let id = if side == "client" {
        CLIENT_ID
    } else {
        SERVER_ID
    };
    format!(
        "apiVersion: sigil.dev/v1
kind: ProxyConfig
metadata: {{name: {name}, purpose: perf harness}}
spec:
  mode: explicit
  identity: {{certFile: {side}.crt, keyFile: {side}.key, bundleDir: {side}-bundles, spiffeId: \"{id}\"}}
  admin: {{listen: \"127.0.0.1:{admin}\"}}
{body}"
    )
}

/// The L4 pair: both sides relay bytes. The client side lists both destinations in
/// `outbound.opaquePorts` (no sniffing, one mTLS connection per workload connection); the
/// server side admits the client per port (`inbound.ports`, which declares both ports tcp).
fn sigil_l4_bodies(ports: &Ports) -> (String, String) {
    let client = format!(
        "  outbound:
    opaquePorts: [{se}, {sh}]
    explicit:
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{se}\", expectedId: \"{SERVER_ID}\"}}
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{sh}\", expectedId: \"{SERVER_ID}\"}}
",
        ports.sigil_client_echo,
        ports.sigil_client_http,
        se = ports.sigil_server_echo,
        sh = ports.sigil_server_http,
    );
    let server = format!(
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
    (client, server)
}

/// The L7 pair: the client side detects HTTP and sends each request over its pooled HTTP/2
/// connection to the server side; the server side stands for the HTTP backend port, which the
/// policies declare `protocol: http`. That port is deliberately not in `inbound.ports` (that
/// would declare it tcp).
fn sigil_l7_bodies(ports: &Ports) -> (String, String) {
    let client = format!(
        "  outbound:
    explicit:
      - {{listen: \"127.0.0.1:{}\", upstream: \"127.0.0.1:{}\", expectedId: \"{SERVER_ID}\"}}
",
        ports.sigil_l7_client_http, ports.sigil_l7_server_http,
    );
    let server = format!(
        "  inbound:
    explicit:
      - {{listen: \"127.0.0.1:{}\", port: {}}}
  policyDir: policies
",
        ports.sigil_l7_server_http, ports.http_backend,
    );
    (client, server)
}

/// The policy set of the L7 server side, written to `dir/policies/` and loaded back with
/// sigil-config as the proxy will. Returns (documents, files, documents targeting the server).
fn write_policies(dir: &Path, total: usize, port: u16) -> Result<(usize, usize, usize), String> {
    let pdir = dir.join("policies");
    std::fs::create_dir_all(&pdir).map_err(|e| e.to_string())?;
    let files = policies::generate(
        SERVER_ID,
        CLIENT_ID,
        port,
        total,
        total / 4,
        policies::MAX_PER_FILE,
    );
    let server = sigil_config::SpiffeId::parse(SERVER_ID).map_err(|e| e.to_string())?;
    let (mut docs, mut own) = (0, 0);
    for (name, text) in &files {
        let path = pdir.join(name);
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let ps = sigil_config::Policy::load_all(&path)
            .map_err(|e| format!("generated policy file is invalid: {e}"))?;
        docs += ps.len();
        own += ps.iter().filter(|p| p.spec.target == server).count();
    }
    Ok((docs, files.len(), own))
}

/// Writes, validates (with sigil-config, as sigil-proxy will) and starts one sidecar, then
/// waits for its admin `/ready`. Returns it and the time from spawn to ready.
/// Starts a sidecar pair, server side first so the client's upstream is up. Returns
/// (server, client, the server's start-to-ready time).
fn start_sigil_pair(
    o: &Opts,
    dir: &Path,
    prefix: &str,
    (admin_server, admin_client): (u16, u16),
    (client_body, server_body): (String, String),
) -> Result<(Proc, Proc, Duration), String> {
    let server_name = format!("{prefix}-server");
    let (server, ready) = start_sigil(o, dir, &server_name, "server", admin_server, &server_body)?;
    let client_name = format!("{prefix}-client");
    let (client, _) = start_sigil(o, dir, &client_name, "client", admin_client, &client_body)?;
    Ok((server, client, ready))
}

fn start_sigil(
    o: &Opts,
    dir: &Path,
    name: &str,
    side: &str,
    admin: u16,
    body: &str,
) -> Result<(Proc, Duration), String> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, sigil_yaml(name, side, admin, body)).map_err(|e| e.to_string())?;
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
    let started = Instant::now();
    let mut p = Proc::spawn(name, &mut cmd);
    let admin = addr(admin);
    let deadline = started + Duration::from_secs(15);
    loop {
        if let Some(st) = p.try_wait() {
            return Err(format!("{name} exited ({st}):\n{}", p.log()));
        }
        if http_get(admin, "/ready").is_ok_and(|r| is_ok_200(&r)) {
            return Ok((p, started.elapsed()));
        }
        if Instant::now() >= deadline {
            return Err(format!("{name}: /ready not 200 after 15 s:\n{}", p.log()));
        }
        std::thread::sleep(Duration::from_millis(10));
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
    SigilL7,
    NginxL4,
    NginxL7,
}

impl Via {
    const ALL: [Via; 5] = [
        Via::Direct,
        Via::Sigil,
        Via::SigilL7,
        Via::NginxL4,
        Via::NginxL7,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Sigil => "sigil-proxy pair (L4 mTLS)",
            Self::SigilL7 => "sigil-proxy pair (L7 server side, policies)",
            Self::NginxL4 => "nginx stream pair (L4 mTLS)",
            Self::NginxL7 => "nginx http pair (L7 mTLS, keep-alive upstreams)",
        }
    }

    /// Names of the process groups that make up this path's proxies.
    fn groups(self) -> &'static [&'static str] {
        match self {
            Self::Direct => &[],
            Self::Sigil => &["sigil client-side", "sigil server-side"],
            Self::SigilL7 => &["sigil-l7 client-side", "sigil-l7 server-side"],
            Self::NginxL4 => &["nginx-l4 client-side", "nginx-l4 server-side"],
            Self::NginxL7 => &["nginx-l7 client-side", "nginx-l7 server-side"],
        }
    }
}

/// One path under test and its entry ports: echo (bulk), HTTP/1.1, HTTP/2 with prior knowledge.
#[derive(Clone, Copy)]
struct PathPorts {
    via: Via,
    echo: Option<u16>,
    http: u16,
    h2: Option<u16>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Test {
    Bulk,
    KeepAlive,
    NewConns,
    H2Max,
    RateH1,
    RateH2,
}

impl Test {
    const ALL: [Test; 6] = [
        Test::Bulk,
        Test::KeepAlive,
        Test::NewConns,
        Test::H2Max,
        Test::RateH1,
        Test::RateH2,
    ];

    fn label(self) -> &'static str {
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
    fn short(self) -> &'static str {
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
struct Run {
    value: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Units of work done (bytes for bulk, requests for wrk and h2load).
    units: f64,
    proxy_cpu: f64,
    /// Share of the machine's CPU (0..1) used by processes this harness did not start during
    /// the run (a build, another benchmark): a contamination indicator.
    foreign: f64,
    /// Share of the machine's CPU time stolen by the hypervisor during the run.
    steal: f64,
    /// Growth of a sigil server-side counter during the run (NaN when not probed): inbound
    /// connections opened (sigil L4, new connections) or allowed requests (sigil L7).
    server_counted: f64,
    note: Option<String>,
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

const L7_ALLOWED: &[&str] = &["direction=\"inbound\"", "decision=\"allow\""];

struct Bench<'a> {
    o: &'a Opts,
    dir: PathBuf,
    sampler: &'a Sampler,
    runs: BTreeMap<(Test, Via), Vec<Run>>,
    /// Per group name and test: CPU seconds per run.
    group_cpu: BTreeMap<(String, Test), Vec<f64>>,
    /// Per group name: peak RSS (KiB) while its path was under load.
    group_peak: BTreeMap<String, u64>,
    /// sigil L4 server-side admin address, to count its inbound connections.
    sigil_admin: Option<SocketAddr>,
    /// sigil L7 server-side admin address, to count the requests it decided.
    sigil_l7_admin: Option<SocketAddr>,
}

impl Bench<'_> {
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

    fn bulk(&mut self, path: Via, port: u16) {
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
    fn h2_args(&self, test: Test, duration: Duration) -> h2load::H2Args {
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

    fn h2load(&mut self, test: Test, path: Via, port: u16, duration: Duration, record: bool) {
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

    fn median_of(&self, test: Test, path: Via, f: impl Fn(&Run) -> f64) -> f64 {
        self.runs
            .get(&(test, path))
            .map_or(f64::NAN, |v| median(&v.iter().map(f).collect::<Vec<_>>()))
    }

    /// (server-side count, requests counted by the load tool) summed over the runs of a test.
    fn counted(&self, test: Test, path: Via) -> Option<(f64, f64)> {
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

/// What the report says about the set-up, besides the measurements.
#[derive(Default)]
struct Setup {
    /// (documents, files, documents targeting the server) in the L7 server's policyDir.
    policies: Option<(usize, usize, usize)>,
    /// Time from spawn to `/ready` of the L4 and of the L7 server-side sidecars.
    ready: Vec<(&'static str, Duration)>,
    /// Findings of the sanity checks, one line each.
    sanity: Vec<String>,
    /// nginx could serve h2c on its L7 client side.
    nginx_h2: bool,
}

/// A count-based h2load run for the sanity checks; all requests must succeed with 2xx.
fn h2_sanity(o: &Opts, dir: &Path, port: u16, h1: bool, n: u64) -> Result<(), String> {
    let args = h2load::H2Args {
        threads: 1,
        connections: 4,
        streams: if h1 { 1 } else { 4 },
        duration: Duration::from_secs(10),
        requests: Some(n),
        rps: None,
        stagger_ms: None,
        h1,
        log_file: dir.join("h2load-sanity.log"),
    };
    let r = h2load::run(
        &o.h2load,
        &args,
        &format!("http://127.0.0.1:{port}{BENCH_PATH}"),
    )?;
    if r.ok != n || r.errors != 0 {
        return Err(format!(
            "{}: {} of {n} requests got 2xx, {} errors",
            args.display(),
            r.ok,
            r.errors
        ));
    }
    Ok(())
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
    if tool_version(&o.h2load, &["--version"]).starts_with("unavailable") {
        return Err(format!(
            "{} not found (apt-get install nghttp2-client)",
            o.h2load
        ));
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
    let mut setup = Setup::default();

    // Backends: the toy workload echoes (thread per connection); one nginx worker serves the
    // HTTP page (HTTP/1.1 on one port, h2c on another). Both are shared by every path, so
    // their cost is the same for all.
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
        &[
            ("HTTP_LISTEN", ports.http_backend.to_string()),
            ("H2_LISTEN", ports.http_backend_h2.to_string()),
        ],
        &[ports.http_backend, ports.http_backend_h2],
    )?;
    let backend_groups = vec![
        Group::new("backend: echo (toy workload)", echo.pid(), false),
        Group::new("backend: http (nginx, 1 worker)", http_backend.pid(), true),
    ];
    procs.push(echo);
    procs.push(http_backend);

    let mut paths = vec![PathPorts {
        via: Via::Direct,
        echo: Some(ports.echo_backend),
        http: ports.http_backend,
        h2: Some(ports.http_backend_h2),
    }];

    if !o.skip_sigil {
        log("starting the sigil-proxy L4 pair");
        let (server, client, ready) = start_sigil_pair(
            o,
            &dir,
            "sigil",
            (ports.sigil_admin_server, ports.sigil_admin_client),
            sigil_l4_bodies(&ports),
        )?;
        setup
            .ready
            .push(("sigil server-side (L4, no policies)", ready));
        groups.push(Group::new("sigil client-side", client.pid(), false));
        groups.push(Group::new("sigil server-side", server.pid(), false));
        procs.push(server);
        procs.push(client);
        paths.push(PathPorts {
            via: Via::Sigil,
            echo: Some(ports.sigil_client_echo),
            http: ports.sigil_client_http,
            h2: None,
        });

        let (docs, files, own) = write_policies(&dir, o.policies, ports.http_backend)?;
        setup.policies = Some((docs, files, own));
        log(format!(
            "starting the sigil-proxy L7 pair: {docs} policies in {files} files, {own} targeting {SERVER_ID}"
        ));
        let (server, client, ready) = start_sigil_pair(
            o,
            &dir,
            "sigil-l7",
            (ports.sigil_l7_admin_server, ports.sigil_l7_admin_client),
            sigil_l7_bodies(&ports),
        )?;
        setup
            .ready
            .push(("sigil-l7 server-side (policyDir loaded)", ready));
        groups.push(Group::new("sigil-l7 client-side", client.pid(), false));
        groups.push(Group::new("sigil-l7 server-side", server.pid(), false));
        procs.push(server);
        procs.push(client);
        // h2c goes through the client side's L4 relay; the server side serves HTTP/2 itself
        // and forwards to the workload's HTTP/1.1 port.
        paths.push(PathPorts {
            via: Via::SigilL7,
            echo: None,
            http: ports.sigil_l7_client_http,
            h2: Some(ports.sigil_l7_client_http),
        });
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
                ("H2_LISTEN", ports.l7_client_h2.to_string()),
                ("HTTP_UPSTREAM", ports.l7_server_http.to_string()),
            ],
            &[ports.l7_client_http, ports.l7_client_h2],
        )?;
        groups.push(Group::new("nginx-l4 client-side", l4c.pid(), true));
        groups.push(Group::new("nginx-l4 server-side", l4s.pid(), true));
        groups.push(Group::new("nginx-l7 client-side", l7c.pid(), true));
        groups.push(Group::new("nginx-l7 server-side", l7s.pid(), true));
        procs.extend([l4s, l4c, l7s, l7c]);
        paths.push(PathPorts {
            via: Via::NginxL4,
            echo: Some(ports.l4_client_echo),
            http: ports.l4_client_http,
            h2: None,
        });
        paths.push(PathPorts {
            via: Via::NginxL7,
            echo: None,
            http: ports.l7_client_http,
            h2: Some(ports.l7_client_h2),
        });
    }

    // Idle: started and ready, no traffic yet.
    std::thread::sleep(Duration::from_secs(1));
    let idle: Vec<(u64, u64)> = groups.iter().map(|g| (g.rss_kib(), g.anon_kib())).collect();

    log("sanity checks");
    for p in &mut paths {
        let r = http_get(addr(p.http), BENCH_PATH)?;
        if !is_ok_200(&r) || !r.contains(BACKEND_BODY.trim_end()) {
            return Err(format!(
                "{}: GET {BENCH_PATH} did not reach the backend:\n{r}",
                p.via.label()
            ));
        }
        if let Some(e) = p.echo {
            let r = bulk::echo(addr(e), 256 * 1024, Duration::from_secs(10));
            if !r.complete {
                return Err(format!("{}: echo failed: {:?}", p.via.label(), r.error));
            }
        }
        if let Some(h2) = p.h2 {
            match h2_sanity(o, &dir, h2, false, 200) {
                Ok(()) => setup.nginx_h2 |= p.via == Via::NginxL7,
                // nginx's h2c listener is the one part here that depends on the nginx build;
                // without it, HTTP/2 is compared with the direct path only.
                Err(e) if p.via == Via::NginxL7 => {
                    log(format!("nginx L7 client side cannot serve h2c: {e}"));
                    setup.sanity.push(format!(
                        "nginx's L7 client side did not serve HTTP/2 with prior knowledge \
                         ({e}); HTTP/2 is compared with the direct path only"
                    ));
                    p.h2 = None;
                }
                Err(e) => return Err(format!("{}: HTTP/2: {e}", p.via.label())),
            }
        }
    }
    // The server-side listeners must refuse plaintext (mTLS is really on).
    let mut server_side = Vec::new();
    if !o.skip_sigil {
        server_side.push(("sigil server-side", ports.sigil_server_http));
        server_side.push(("sigil-l7 server-side", ports.sigil_l7_server_http));
    }
    if !o.skip_nginx {
        server_side.push(("nginx-l4 server-side", ports.l4_server_http));
        server_side.push(("nginx-l7 server-side", ports.l7_server_http));
    }
    for (name, port) in server_side {
        if let Ok(r) = http_get(addr(port), BENCH_PATH) {
            if is_ok_200(&r) {
                return Err(format!(
                    "{name} answered plaintext HTTP: mTLS is not enforced"
                ));
            }
        }
    }
    if !o.skip_sigil {
        setup
            .sanity
            .extend(l7_sanity(o, &dir, &ports).map_err(|e| format!("sigil L7 pair: {e}"))?);
    }

    let all_groups: Vec<Group> = groups.iter().chain(&backend_groups).cloned().collect();
    let sampler = Sampler::start(all_groups, Duration::from_millis(100));
    let mut b = Bench {
        o,
        dir: dir.clone(),
        sampler: &sampler,
        runs: BTreeMap::new(),
        group_cpu: BTreeMap::new(),
        group_peak: BTreeMap::new(),
        sigil_admin: (!o.skip_sigil).then(|| addr(ports.sigil_admin_server)),
        sigil_l7_admin: (!o.skip_sigil).then(|| addr(ports.sigil_l7_admin_server)),
    };
    let started = Instant::now();
    let dur = Duration::from_secs(o.duration);
    let warm = Duration::from_secs(2);
    let settle = || std::thread::sleep(Duration::from_millis(500));

    log(format!(
        "L4 bulk: {} MiB echoed per run, 1 connection, {} runs",
        o.bulk_mib, o.runs
    ));
    for _ in 0..o.runs {
        for p in &paths {
            if let Some(e) = p.echo {
                b.bulk(p.via, e);
                settle();
            }
        }
    }

    log(format!(
        "HTTP/1.1 keep-alive: wrk -t{} -c{} -d{}s, {} runs (after a 2 s warm-up per path)",
        o.wrk_threads, o.wrk_conns, o.duration, o.runs
    ));
    for p in &paths {
        b.wrk(Test::KeepAlive, p.via, p.http, warm, false);
    }
    for _ in 0..o.runs {
        for p in &paths {
            b.wrk(Test::KeepAlive, p.via, p.http, dur, true);
            settle();
        }
    }

    log(format!(
        "new connections: wrk -t{} -c{} -d{}s -H 'Connection: close', {} runs",
        o.wrk_threads, o.close_conns, o.duration, o.runs
    ));
    for _ in 0..o.runs {
        for p in &paths {
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

    let h2_paths: Vec<(Via, u16)> = paths.iter().filter_map(|p| Some((p.via, p.h2?))).collect();
    log(format!(
        "HTTP/2 throughput: {}, {} runs (after a 2 s warm-up per path)",
        b.h2_args(Test::H2Max, dur).display(),
        o.runs
    ));
    for &(via, port) in &h2_paths {
        b.h2load(Test::H2Max, via, port, warm, false);
    }
    for _ in 0..o.runs {
        for &(via, port) in &h2_paths {
            b.h2load(Test::H2Max, via, port, dur, true);
            settle();
        }
    }

    for (test, targets) in [
        (
            Test::RateH1,
            paths.iter().map(|p| (p.via, p.http)).collect::<Vec<_>>(),
        ),
        (Test::RateH2, h2_paths.clone()),
    ] {
        log(format!(
            "{}: {} req/s in all, {}, {} runs",
            test.label(),
            o.rate,
            b.h2_args(test, dur).display(),
            o.runs
        ));
        for _ in 0..o.runs {
            for &(via, port) in &targets {
                b.h2load(test, via, port, dur, true);
                settle();
            }
        }
    }
    let elapsed = started.elapsed();

    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<u64> = groups.iter().map(Group::rss_kib).collect();

    let report = report(
        o,
        &b,
        &setup,
        &groups,
        &backend_groups,
        &idle,
        &after,
        elapsed,
    );
    print!("{report}");
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

/// Proves that the sigil L7 pair really decides and forwards every request at L7:
/// - the server side counts exactly the requests sent (HTTP/1.1 and HTTP/2) as allowed by the
///   benchmark route;
/// - a path no route allows gets 403 from the sidecar (the backend itself would answer 200);
/// - the backend receives the verified client ID in `x-sigil-peer-id`, even when the client
///   sent a forged one.
fn l7_sanity(o: &Opts, dir: &Path, ports: &Ports) -> Result<Vec<String>, String> {
    let entry = addr(ports.sigil_l7_client_http);
    let route = format!("route=\"{BENCH_ROUTE}\"");
    let labels = [L7_ALLOWED[0], L7_ALLOWED[1], route.as_str()];
    let count = || -> Result<f64, String> {
        let page = http_get(addr(ports.sigil_l7_admin_server), "/metrics")?;
        Ok(sigil_e2e::metric(&page, "sigil_requests_total", &labels).unwrap_or(0.0))
    };
    let mut out = Vec::new();

    let (n1, n2) = (500, 500);
    let before = count()?;
    h2_sanity(o, dir, ports.sigil_l7_client_http, true, n1)?;
    h2_sanity(o, dir, ports.sigil_l7_client_http, false, n2)?;
    let grown = count()? - before;
    if grown != (n1 + n2) as f64 {
        return Err(format!(
            "sigil_requests_total{{decision=\"allow\",{route}}} grew by {grown}, but {} requests were sent",
            n1 + n2
        ));
    }
    out.push(format!(
        "sigil L7 pair: {n1} HTTP/1.1 + {n2} HTTP/2 requests sent; the server side's \
         `sigil_requests_total{{direction=\"inbound\",decision=\"allow\",{route}}}` grew by \
         {grown:.0}: every request went through the route decision"
    ));

    let denied = http_get(entry, DENIED_PATH)?;
    let direct = http_get(addr(ports.http_backend), DENIED_PATH)?;
    if !denied.starts_with("HTTP/1.1 403") || !is_ok_200(&direct) {
        return Err(format!(
            "GET {DENIED_PATH}: expected 403 from the sidecar (and 200 direct), got:\n{denied}"
        ));
    }
    out.push(format!(
        "GET {DENIED_PATH} (no route allows it): 403 `{}` through the sigil L7 pair, 200 direct",
        body(&denied).trim()
    ));

    let forged = "x-sigil-peer-id: spiffe://example.org/ns/evil/sa/forged\r\n";
    let whoami = http_get_with(entry, WHOAMI_PATH, forged)?;
    if !is_ok_200(&whoami) || body(&whoami).trim() != CLIENT_ID {
        return Err(format!(
            "GET {WHOAMI_PATH}: the backend should see x-sigil-peer-id {CLIENT_ID}, got:\n{whoami}"
        ));
    }
    out.push(format!(
        "the backend received `x-sigil-peer-id: {CLIENT_ID}` (the client sent a forged value; \
         the sidecar replaced it)"
    ));
    Ok(out)
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
    let d50 = b.median_of(t, Via::Direct, |r| r.p50_ms);
    let d99 = b.median_of(t, Via::Direct, |r| r.p99_ms);
    for p in Via::ALL {
        let Some(runs) = b.runs.get(&(t, p)) else {
            continue;
        };
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
        let _ = writeln!(s, "{row}");
    }
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

#[allow(clippy::too_many_arguments)]
fn report(
    o: &Opts,
    b: &Bench,
    setup: &Setup,
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

    // Bulk.
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
        request_table(&mut s, b, *t, baselines, *added);
    }

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
    for (i, g) in groups.iter().enumerate() {
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
        backend_groups
            .iter()
            .map(|g| format!("{} {:.1} MiB", g.name, mib(g.rss_kib())))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // Targets of the issues.
    let _ = writeln!(s, "\n### Against the targets\n");
    let _ = writeln!(s, "| target | measured | status |");
    let _ = writeln!(s, "|---|---|---|");
    let have = |t: Test, p: Via| b.runs.contains_key(&(t, p));
    let ok = |c: bool, t: Test, p: Via, q: Via| (have(t, p) && have(t, q)).then_some(c);
    let sb = b.median_of(Test::Bulk, Via::Sigil, |r| r.value);
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
    for (t, proto) in [(Test::KeepAlive, "HTTP/1.1"), (Test::H2Max, "HTTP/2")] {
        for (p, q, name) in [
            (Via::SigilL7, Via::NginxL7, "sigil L7 pair vs nginx L7 pair"),
            (Via::Sigil, Via::NginxL7, "sigil L4 pair vs nginx L7 pair"),
            (Via::Sigil, Via::NginxL4, "sigil L4 pair vs nginx L4 pair"),
        ] {
            if !have(t, p) {
                continue;
            }
            let a = b.median_of(t, p, |r| r.value);
            let n = b.median_of(t, q, |r| r.value);
            let _ = writeln!(
                s,
                "| {proto} req/s >= 1.3x: {name} | {} | {} |",
                ratio(a, n),
                verdict(ok(a >= 1.3 * n, t, p, q))
            );
        }
    }
    for (t, proto) in [(Test::RateH1, "HTTP/1.1"), (Test::RateH2, "HTTP/2")] {
        for (p, name) in [
            (Via::SigilL7, "sigil L7 pair"),
            (Via::Sigil, "sigil L4 pair"),
            (Via::NginxL7, "nginx L7 pair (reference)"),
            (Via::NginxL4, "nginx L4 pair (reference)"),
        ] {
            if !have(t, p) {
                continue;
            }
            let added = b.median_of(t, p, |r| r.p99_ms) - b.median_of(t, Via::Direct, |r| r.p99_ms);
            let _ = writeln!(
                s,
                "| p99 added <= 0.2 ms at {} req/s, {proto}: {name} | {} ms | {} |",
                o.rate,
                fmt(added, 3),
                verdict(ok(added <= 0.2, t, p, Via::Direct))
            );
        }
    }
    let kp = |p: Via| b.median_of(Test::KeepAlive, p, |r| r.p99_ms);
    for (p, q) in [
        (Via::SigilL7, Via::NginxL7),
        (Via::Sigil, Via::NginxL7),
        (Via::Sigil, Via::NginxL4),
    ] {
        if !have(Test::KeepAlive, p) {
            continue;
        }
        let _ = writeln!(
            s,
            "| keep-alive p99: {} <= {} | {} ms vs {} ms | {} |",
            p.label(),
            q.label(),
            fmt(kp(p), 3),
            fmt(kp(q), 3),
            verdict(ok(kp(p) <= kp(q), Test::KeepAlive, p, q))
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
