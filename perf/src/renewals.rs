//! Many sidecars renewing their SVIDs at once (`sigil-control-load --renewals N`):
//!
//! ```text
//! N simulated sidecars ══ each: a new P-256 key and CSR, mTLS with its current SVID, Issue ══► sigil-control (a CA from `sigil ca init`)
//! ```
//!
//! Each simulated sidecar holds an SVID of a bootstrap CA, as a sidecar holds the SVID it
//! renews; its Workload is stored. All start at the same instant; each makes its key and CSR,
//! connects (its own TLS connection and handshake, as a real sidecar does), asks, and checks
//! the SVID it got with its key. Measured: from the start to the last sidecar holding its new
//! SVID, and each one's time. Loopback only; the control plane is ended by PID.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{ServerName, UnixTime};
use sigil_api::IssueRequest;
use sigil_config::{SpiffeId, TrustDomain};
use sigil_e2e::{bin, free_port, run_status, write_identity, ControlPlane, StoreAt, TempDir};
use sigil_filters::tls::{self, Carries};
use sigil_filters::{LocalIdentity, TrustBundles};
use sigil_testkit::{key_and_csr, pem, rcgen, Ca};

use crate::stats::percentile;

const TD: &str = "example.org";
const CONTROL: &str = "spiffe://example.org/sigil/control";
const OPERATOR: &str = "spiffe://example.org/ops/load";

/// What one storm measured.
pub struct Storm {
    pub sidecars: usize,
    /// From the common start to the last new SVID held.
    pub all_ms: f64,
    /// Each sidecar's time, sorted.
    pub each_ms: Vec<f64>,
    /// sigil-control's CPU seconds over the storm.
    pub control_cpu: f64,
}

/// Runs one storm of `n` renewals against a fresh control plane.
pub fn run(n: usize) -> Result<Storm, String> {
    let dir = TempDir::new("renewals");
    let d = dir.path();
    let boot = Ca::new(TD);
    let ca_dir = d.join("ca");
    let (code, out) = run_status(
        std::process::Command::new(bin("sigil"))
            .args(["ca", "init", "--trust-domain", TD, "--dir"])
            .arg(&ca_dir),
        Duration::from_secs(30),
    );
    if code != Some(0) {
        return Err(format!("sigil ca init: {out}"));
    }
    let issuing = std::fs::read_to_string(ca_dir.join("ca.crt")).map_err(|e| e.to_string())?;
    let files = write_identity(d, "control", &boot, CONTROL, &[&boot]);
    std::fs::write(
        files.bundle_dir.join(format!("{TD}.pem")),
        boot.bundle_pem() + &issuing,
    )
    .map_err(|e| e.to_string())?;
    let operator = write_identity(d, "operator", &boot, OPERATOR, &[&boot]);
    let store = StoreAt::Dir(d.join("control-data"));
    let extra = vec!["--ca-dir".to_string(), ca_dir.display().to_string()];
    let cp = ControlPlane::start_with_args(CONTROL, files, store, free_port(), free_port(), extra);
    cp.apply(&operator, &d.join("workloads.yaml"), &workloads(n));
    let sims = sims(&boot, n, &issuing)?;
    let control = crate::procfs::Group::new("sigil-control", cp.proc.pid(), false);
    let cpu_before = control.cpu_secs();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let port = cp.sidecar_port;
    let start = Instant::now();
    let results = rt.block_on(async move {
        let tasks: Vec<_> = sims
            .into_iter()
            .map(|sim| tokio::spawn(renew(sim, port, start)))
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(out)
    })?;
    let all_ms = start.elapsed().as_secs_f64() * 1000.0;
    let control_cpu = control.cpu_secs() - cpu_before;
    let mut each_ms = Vec::with_capacity(n);
    for r in results {
        each_ms.push(r?);
    }
    each_ms.sort_by(f64::total_cmp);
    Ok(Storm {
        sidecars: n,
        all_ms,
        each_ms,
        control_cpu,
    })
}

/// The markdown lines of a storm's figures.
pub fn report(s: &Storm) -> String {
    format!(
        "{} sidecars renewing at once: all held new SVIDs {:.0} ms after the start; per sidecar p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; sigil-control {:.2} CPU s\n",
        s.sidecars,
        s.all_ms,
        percentile(&s.each_ms, 50.0),
        percentile(&s.each_ms, 99.0),
        s.each_ms.last().copied().unwrap_or(0.0),
        s.control_cpu
    )
}

fn workloads(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: sigil.dev/v1\nkind: Workload\nmetadata: {{name: sim-{i}, owner: perf, purpose: renewal load}}\n\
                 spec: {{spiffeId: spiffe://{TD}/load/sim-{i}, environment: perf}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// One simulated sidecar: its current SVID's TLS config, and its ID.
struct Sim {
    id: SpiffeId,
    config: Arc<rustls::ClientConfig>,
}

fn sims(boot: &Ca, n: usize, issuing: &str) -> Result<Vec<Sim>, String> {
    let mut bundles = TrustBundles::new();
    let td = TrustDomain::parse(TD).map_err(|e| e.to_string())?;
    bundles
        .insert_pem(&td, (boot.bundle_pem() + issuing).as_bytes())
        .map_err(|e| e.to_string())?;
    let bundles = Arc::new(bundles);
    let control = SpiffeId::parse(CONTROL).map_err(|e| e.to_string())?;
    (0..n)
        .map(|i| {
            let id = format!("spiffe://{TD}/load/sim-{i}");
            let config = sim_tls(boot, &id, &bundles, &control)?;
            Ok(Sim {
                id: SpiffeId::parse(&id).map_err(|e| e.to_string())?,
                config,
            })
        })
        .collect()
}

/// The TLS config of a simulated sidecar `id` towards the control plane `control`: an SVID of
/// `ca` made here, trusting `bundles`, as a sidecar's control-plane client is set up.
pub fn sim_tls(
    ca: &Ca,
    id: &str,
    bundles: &Arc<TrustBundles>,
    control: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = tls::provider();
    let svid = ca.svid(id);
    let identity = LocalIdentity::from_pem(
        svid.chain_pem().as_bytes(),
        svid.key_pem().as_bytes(),
        UnixTime::now(),
        None,
        &provider,
    )
    .map_err(|e| e.to_string())?;
    Ok(tls::client_config(
        &identity,
        bundles.clone(),
        Arc::default(),
        provider,
        control.clone(),
        Carries::Http2,
    ))
}

/// A simulated sidecar's own connection to the control plane's sidecar API on loopback
/// `port`: TCP, TLS with `config`, HTTP/2; the sender, the connection's task, and the origin.
pub async fn connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<sigil_api::tonic::body::Body>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
        hyper::http::Uri,
    ),
    String,
> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    let origin = format!("https://127.0.0.1:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    Ok((sender, tokio::spawn(conn), origin))
}

/// One renewal as a sidecar makes it; ms from `start` to its new SVID checked with its key.
async fn renew(sim: Sim, port: u16, start: Instant) -> Result<f64, String> {
    let (key, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[sim.id.as_str()]);
    let (sender, conn, origin) = connect(port, sim.config).await?;
    let request = IssueRequest {
        csr,
        join_token: String::new(),
        node: sim.id.to_string(),
        for_workload: String::new(),
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        sigil_api::client::issue(sender, origin, request),
    )
    .await
    .map_err(|_| format!("{}: no answer within 30 s", sim.id))?
    .map_err(|s| format!("{}: {}", sim.id, s.message()))?;
    conn.abort();
    let chain: String = answer.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
    LocalIdentity::from_pem(
        chain.as_bytes(),
        key.as_bytes(),
        UnixTime::now(),
        Some(&sim.id),
        &tls::provider(),
    )
    .map_err(|e| format!("{}: the new SVID: {e}", sim.id))?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}
