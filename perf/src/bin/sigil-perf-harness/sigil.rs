//! The sigil-proxy sidecars under test: their ProxyConfigs, the L7 server side's policy set,
//! and starting a pair.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_config::ProxyConfig;
use sigil_e2e::Proc;
use sigil_perf::policies;

use crate::identity::{CLIENT_ID, SERVER_ID};
use crate::net::{addr, http_get, is_ok_200};
use crate::opts::Opts;
use crate::paths::Ports;

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
pub fn l4_bodies(ports: &Ports) -> (String, String) {
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
pub fn l7_bodies(ports: &Ports) -> (String, String) {
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
pub fn write_policies(
    dir: &Path,
    total: usize,
    port: u16,
) -> Result<(usize, usize, usize), String> {
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

/// Starts a sidecar pair, server side first so the client's upstream is up. Returns
/// (server, client, the server's start-to-ready time).
pub fn start_pair(
    o: &Opts,
    dir: &Path,
    prefix: &str,
    (admin_server, admin_client): (u16, u16),
    (client_body, server_body): (String, String),
) -> Result<(Proc, Proc, Duration), String> {
    let server_name = format!("{prefix}-server");
    let (server, ready) = start(o, dir, &server_name, "server", admin_server, &server_body)?;
    let client_name = format!("{prefix}-client");
    let (client, _) = start(o, dir, &client_name, "client", admin_client, &client_body)?;
    Ok((server, client, ready))
}

/// Writes, validates (with sigil-config, as sigil-proxy will) and starts one sidecar, then
/// waits for its admin `/ready`. Returns it and the time from spawn to ready.
fn start(
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
