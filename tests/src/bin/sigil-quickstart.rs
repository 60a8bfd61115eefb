//! The loopback quickstart: two workloads with their sidecars (configs from
//! examples/quickstart), one allowed and one refused call with curl, and the metrics that
//! show both. Needs no root. Exits non-zero if the mesh did not behave as narrated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use sigil_e2e::{bin, http_get, run, wait_for_port, write_identity, Proc, TempDir};
use sigil_testkit::Ca;

const WEB: &str = "spiffe://example.org/ns/demo/sa/web";
const API: &str = "spiffe://example.org/ns/demo/sa/api";

fn main() -> ExitCode {
    let mut examples = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/quickstart"
    ));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--examples" => examples = args.next().map(PathBuf::from).unwrap_or(examples),
            "-h" | "--help" => {
                println!("usage: sigil-quickstart [--examples DIR]\n\nRuns two workloads with sigil-proxy sidecars on loopback (ports 15100-15101,\n18081-18082, 18181-18182, 18280-18281), makes one allowed and one refused call,\nprints the metrics, and stops everything it started.");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}; see --help");
                return ExitCode::from(2);
            }
        }
    }
    match quickstart(&examples) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nquickstart FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/5] {text}");
}

fn quickstart(examples: &std::path::Path) -> Result<(), String> {
    println!("== Sigil quickstart: workload identity with SPIFFE mTLS, on loopback ==");
    let dir = TempDir::new("quickstart");
    let d = dir.path();
    for f in ["web-sidecar.yaml", "api-sidecar.yaml"] {
        std::fs::copy(examples.join(f), d.join(f))
            .map_err(|e| format!("{}: {e}", examples.join(f).display()))?;
    }

    step(
        1,
        "A throwaway CA for trust domain example.org mints an X.509-SVID per workload",
    );
    let certs = d.join("certs");
    std::fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
    let ca = Ca::new("example.org");
    let web = write_identity(&certs, "web", &ca, WEB, &[&ca]);
    let api = write_identity(&certs, "api", &ca, API, &[&ca]);
    // Both configs read bundles from certs/bundles.
    std::fs::rename(&web.bundle_dir, certs.join("bundles")).map_err(|e| e.to_string())?;
    std::fs::remove_dir_all(&api.bundle_dir).map_err(|e| e.to_string())?;
    println!(
        "      web = {WEB}\n      api = {API}\n      (in {})",
        certs.display()
    );

    step(2, "Workloads: plain HTTP servers that know nothing of TLS");
    let _web_wl = workload("web", 18081)?;
    let _api_wl = workload("api", 18082)?;
    println!("      web on 127.0.0.1:18081, api on 127.0.0.1:18082");

    step(
        3,
        "Sidecars: sigil-proxy in explicit mode (the configs in examples/quickstart/)",
    );
    let web_sc = sidecar(d, "web-sidecar", 15101)?;
    let api_sc = sidecar(d, "api-sidecar", 15100)?;
    println!("      web-sidecar: outbound 127.0.0.1:18280 -> api over mTLS, admin :15101");
    println!("      api-sidecar: inbound 127.0.0.1:18182 -> 127.0.0.1:18082, admin :15100");
    println!("      api allows only {WEB}; web allows only spiffe://example.org/ns/frontend/*");

    step(4, "Allowed call: web -> api");
    println!("      $ curl -sS http://127.0.0.1:18280/orders");
    let (ok, out) = curl("http://127.0.0.1:18280/orders");
    println!("      {}", out.trim());
    if !ok || !out.contains("hello from api") {
        return Err(format!("the allowed call failed:\n{}", api_sc.log()));
    }
    let admitted = wait_line(&api_sc, "request allowed")?;
    println!(
        "      api-sidecar: {}",
        tail_from(&admitted, "request allowed")
    );

    step(
        5,
        "Refused call: api -> web (valid SVID, but web's policy does not name api)",
    );
    println!("      $ curl -sS http://127.0.0.1:18281/");
    let (ok, out) = curl("http://127.0.0.1:18281/");
    println!("      {}", out.trim());
    if !ok || out.contains("hello from web") || !out.contains("sigil: denied by") {
        return Err(format!(
            "the call that policy forbids was not refused with 403: {out}"
        ));
    }
    let refused = wait_line(&web_sc, "request denied")?;
    println!(
        "      web-sidecar: {}",
        tail_from(&refused, "request denied")
    );

    println!("\n== Metrics (Prometheus/OpenMetrics at each sidecar's admin /metrics) ==");
    for (name, port) in [("api-sidecar", 15100), ("web-sidecar", 15101)] {
        println!("$ curl -s http://127.0.0.1:{port}/metrics   # {name}");
        let page = http_get(([127, 0, 0, 1], port).into(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        for line in page.lines().filter(|l| {
            l.starts_with("sigil_connections_opened_total")
                || l.starts_with("sigil_requests_total")
                || l.starts_with("sigil_connections_refused_total")
                || l.starts_with("sigil_handshake_failures_total")
                || l.starts_with("sigil_svid_expiry_timestamp_seconds")
        }) {
            println!("  {line}");
        }
    }
    let api_page = http_get(([127, 0, 0, 1], 15100).into(), "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    let web_page = http_get(([127, 0, 0, 1], 15101).into(), "/metrics")
        .map(|r| r.1)
        .unwrap_or_default();
    if !api_page.contains(&format!("peer_id=\"{WEB}\"")) || !web_page.contains("decision=\"deny\"")
    {
        return Err("metrics do not show the allowed and the refused request".into());
    }
    println!("\nStopping sidecars (SIGTERM: drain, exit 0) and workloads.");
    for mut p in [web_sc, api_sc] {
        let code = p.terminate(Duration::from_secs(15));
        if code != Some(0) {
            return Err(format!("{} exited with {code:?}", p.name));
        }
    }
    println!("Done. Next: README.md (transparent mode with iptables), examples/iptables/.");
    Ok(())
}

fn workload(name: &str, port: u16) -> Result<Proc, String> {
    let p = Proc::spawn(
        name,
        Command::new(bin("sigil-toy-workload")).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            name,
        ]),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for_port(addr, Duration::from_secs(10));
    Ok(p)
}

fn sidecar(dir: &std::path::Path, name: &str, admin: u16) -> Result<Proc, String> {
    let p = Proc::spawn(
        name,
        Command::new(bin("sigil-proxy"))
            .arg("--config")
            .arg(dir.join(format!("{name}.yaml")))
            .env("SIGIL_LOG", "debug"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while http_get(([127, 0, 0, 1], admin).into(), "/ready").map(|r| r.0) != Some(200) {
        if Instant::now() > deadline {
            return Err(format!("{name} did not become ready:\n{}", p.log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

fn curl(url: &str) -> (bool, String) {
    run(
        Command::new("curl").args(["-sS", "--max-time", "5", url]),
        Duration::from_secs(10),
    )
}

fn wait_line(p: &Proc, needle: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(l) = p.log().lines().find(|l| l.contains(needle)) {
            return Ok(l.to_string());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: no {needle:?} in its log:\n{}",
                p.name,
                p.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail_from<'a>(line: &'a str, from: &str) -> &'a str {
    line.find(from).map(|i| &line[i..]).unwrap_or(line)
}
