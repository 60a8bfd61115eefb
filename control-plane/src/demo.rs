//! `sigil demo`: a whole mesh on loopback, narrated. A control plane, three workloads (web and
//! reports call api) with their sidecars, a throwaway CA; then an allowed call, a denied call
//! and the rule that denied it, a policy pushed live, a revocation cutting a live connection
//! while other calls go on, and where the metrics are. Everything it starts is stopped by PID
//! and its directory removed; it exits non-zero if the mesh did not behave as narrated.

use std::fmt;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use sigil_config::{ConfigError, SpiffeId};
use sigil_testkit::http::{get, get_close, get_once};
use sigil_testkit::Ca;

use crate::client::{Client, ClientError};
use crate::identity::{self, LoadError};
use crate::revoke;

const TD: &str = "example.org";
const CONTROL: &str = "spiffe://example.org/sigil/control";
const OPERATOR: &str = "spiffe://example.org/ops/demo";
const API: &str = "spiffe://example.org/ns/demo/sa/api";
const WEB: &str = "spiffe://example.org/ns/demo/sa/web";
const REPORTS: &str = "spiffe://example.org/ns/demo/sa/reports";

/// Why the demo stopped: it could not set the mesh up, or the mesh did not behave as narrated.
#[derive(Debug)]
pub enum DemoError {
    /// sigil-control, sigil-proxy or sigil-toy-workload is not next to sigil.
    MissingBinary(PathBuf),
    File {
        path: PathBuf,
        source: io::Error,
    },
    Spawn {
        name: String,
        source: io::Error,
    },
    /// No free loopback port, or a connection to one failed.
    Network(io::Error),
    /// What was awaited, and the last lines of the log of the process it waited for (empty
    /// when there is none to show).
    Timeout {
        what: String,
        log_tail: String,
    },
    Identity(LoadError),
    Client(ClientError),
    Revocation(ConfigError),
    /// The control plane refused what the operator applied.
    Refused {
        what: String,
        status: StatusCode,
        body: String,
    },
    /// A call got no answer at all.
    NoAnswer(String),
    /// The mesh answered, but not as the narration says it must.
    Misbehaved(String),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingBinary(path) => write!(
                f,
                "{} not found next to sigil: build the workspace first (cargo build --workspace --bins, or ./scripts/demo.sh)",
                path.display()
            ),
            Self::File { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Spawn { name, source } => write!(f, "cannot start {name}: {source}"),
            Self::Network(e) => write!(f, "{e}"),
            Self::Timeout { what, log_tail } if log_tail.is_empty() => {
                write!(f, "timed out waiting for {what}")
            }
            Self::Timeout { what, log_tail } => {
                write!(f, "timed out waiting for {what}\n{log_tail}")
            }
            Self::Identity(e) => write!(f, "{e}"),
            Self::Client(e) => write!(f, "{e}"),
            Self::Revocation(e) => write!(f, "{e}"),
            Self::Refused { what, status, body } => write!(f, "{what}: {status}: {body}"),
            Self::NoAnswer(what) => write!(f, "{what}: no answer"),
            Self::Misbehaved(what) => write!(f, "{what}"),
        }
    }
}

impl std::error::Error for DemoError {}

impl From<ClientError> for DemoError {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

impl From<LoadError> for DemoError {
    fn from(e: LoadError) -> Self {
        Self::Identity(e)
    }
}

impl From<ConfigError> for DemoError {
    fn from(e: ConfigError) -> Self {
        Self::Revocation(e)
    }
}

/// An I/O error on `path`, as a `DemoError` that names it.
fn file_error(path: &Path) -> impl FnOnce(io::Error) -> DemoError + '_ {
    move |source| DemoError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// A process of the demo, stopped (by PID) when dropped; its output goes to a log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Result<Self, DemoError> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(file_error(&log))?;
        let err = out.try_clone().map_err(file_error(&log))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| DemoError::Spawn {
                name: name.to_string(),
                source,
            })?;
        Ok(Self { child, log })
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The demo's directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16, DemoError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(DemoError::Network)?;
    Ok(l.local_addr().map_err(DemoError::Network)?.port())
}

/// Waits until `ok`; on timeout, the error carries the last lines of `log` (if any), the
/// process whose readiness was awaited.
fn wait_for(
    what: &str,
    timeout: Duration,
    log: Option<&Proc>,
    mut ok: impl FnMut() -> bool,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            return Err(DemoError::Timeout {
                what: what.to_string(),
                log_tail: log.map(Proc::log_tail).unwrap_or_default(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    get_close(([127, 0, 0, 1], port).into(), path)
}

struct Sidecar {
    admin: u16,
    /// Held so that the sidecar runs until the demo ends.
    _proc: Proc,
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/7] {text}");
}

/// Runs the demo with the binaries of `bin_dir` (sigil-control, sigil-proxy,
/// sigil-toy-workload).
pub fn run(bin_dir: &Path) -> Result<(), DemoError> {
    let bins = ["sigil-control", "sigil-proxy", "sigil-toy-workload"];
    for b in bins {
        if !bin_dir.join(b).exists() {
            return Err(DemoError::MissingBinary(bin_dir.join(b)));
        }
    }
    let dir = std::env::temp_dir().join(format!("sigil-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(file_error(&dir))?;
    let scratch = Scratch(dir.clone());
    let result = narrate(bin_dir, &scratch.0);
    if let Err(e) = &result {
        eprintln!("\nsigil demo FAILED: {e}");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&scratch.0)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for log in logs {
            eprintln!("--- last lines of {}:\n{}", log.display(), log_tail(&log));
        }
    }
    result
}

/// The seven steps, in order; each prints what it shows and fails if the mesh does not
/// behave as it says.
fn narrate(bin_dir: &Path, d: &Path) -> Result<(), DemoError> {
    println!("== sigil demo: a control plane, three workloads and their sidecars, on loopback ==");
    println!("   (working directory {})", d.display());
    let bundles = mint_identities(d)?;
    let ports = Ports::pick()?;
    let (_control, operator) = start_control_plane(bin_dir, d, &bundles, &ports)?;
    let mesh = start_mesh(bin_dir, d, &ports, &operator)?;
    allowed_and_denied(&ports)?;
    push_policy(&operator, &ports)?;
    revoke_web(&operator, &ports)?;
    show_metrics(&operator, &mesh)?;
    println!(
        "\n== done: stopping every process the demo started and removing {} ==",
        d.display()
    );
    Ok(())
}

/// The loopback ports of the demo's mesh.
struct Ports {
    /// sigil-control's operator API and sidecar API.
    operator: u16,
    sidecar: u16,
    /// The api workload (plain HTTP) and its sidecar's inbound listener in front of it.
    api: u16,
    api_in: u16,
    /// The outbound listeners through which web and reports call api.
    web_out: u16,
    reports_out: u16,
}

impl Ports {
    fn pick() -> Result<Self, DemoError> {
        Ok(Self {
            operator: free_port()?,
            sidecar: free_port()?,
            api: free_port()?,
            api_in: free_port()?,
            web_out: free_port()?,
            reports_out: free_port()?,
        })
    }
}

/// The processes that make the mesh after step 3, held until the demo ends.
struct Mesh {
    _api_workload: Proc,
    api: Sidecar,
    web: Sidecar,
    _reports: Sidecar,
}

/// Step 1: a CA and an SVID per identity, written to `d`; returns the bundle directory.
fn mint_identities(d: &Path) -> Result<PathBuf, DemoError> {
    step(
        1,
        "A throwaway CA for trust domain example.org mints an X.509-SVID per identity",
    );
    let ca = Ca::new(TD);
    let bundles = d.join("bundles");
    std::fs::create_dir_all(&bundles).map_err(file_error(&bundles))?;
    let bundle = bundles.join(format!("{TD}.pem"));
    std::fs::write(&bundle, ca.bundle_pem()).map_err(file_error(&bundle))?;
    for (name, id) in [
        ("control", CONTROL),
        ("operator", OPERATOR),
        ("api", API),
        ("web", WEB),
        ("reports", REPORTS),
    ] {
        ca.svid(id).write(d, name);
        println!("      {name:<8} {id}");
    }
    Ok(bundles)
}

/// Step 2: sigil-control, and the resources the operator applies to it. Returns the
/// process and the operator's client.
fn start_control_plane(
    bin_dir: &Path,
    d: &Path,
    bundles: &Path,
    ports: &Ports,
) -> Result<(Proc, Client), DemoError> {
    step(
        2,
        "The control plane, and the resources an operator applies to it",
    );
    let (operator_port, sidecar_port) = (ports.operator, ports.sidecar);
    let control = Proc::spawn(
        d,
        "sigil-control",
        Command::new(bin_dir.join("sigil-control"))
            .arg("--data-dir")
            .arg(d.join("control-data"))
            .arg("--cert")
            .arg(d.join("control.crt"))
            .arg("--key")
            .arg(d.join("control.key"))
            .arg("--bundle-dir")
            .arg(bundles)
            .args(["--operator", "spiffe://example.org/ops/*"])
            .args(["--operator-listen", &format!("127.0.0.1:{operator_port}")])
            .args(["--sidecar-listen", &format!("127.0.0.1:{sidecar_port}")]),
    )?;
    wait_for(
        "the control plane",
        Duration::from_secs(10),
        Some(&control),
        || {
            TcpStream::connect(("127.0.0.1", operator_port)).is_ok()
                && TcpStream::connect(("127.0.0.1", sidecar_port)).is_ok()
        },
    )?;
    println!("      sigil-control: operator API 127.0.0.1:{operator_port}, sidecar API 127.0.0.1:{sidecar_port}");
    let operator = Client {
        server: ([127, 0, 0, 1], operator_port).into(),
        control_id: SpiffeId::parse(CONTROL).expect("CONTROL is a SPIFFE ID"),
        identity: identity::load(&d.join("operator.crt"), &d.join("operator.key"), bundles)?,
    };
    let out = apply(&operator, "demo.yaml", resources(ports, false))?;
    for line in out.lines() {
        println!("      sigil apply: {line}");
    }
    println!(
        "      api-access: GET /orders/* for web and reports; /admin for ops only, web denied"
    );
    Ok((control, operator))
}

/// `sigil apply` of `yaml` (named `name` in errors): the control plane's answer.
fn apply(operator: &Client, name: &str, yaml: String) -> Result<String, DemoError> {
    match operator.send(Method::POST, "/v1/apply", &[("x-sigil-file", name)], yaml)? {
        (s, body) if s.is_success() => Ok(body),
        (status, body) => Err(DemoError::Refused {
            what: format!("apply {name}"),
            status,
            body,
        }),
    }
}

/// The demo's Workloads and the api-access Policy. `admin_web`: whether /admin is open to
/// web; until then an explicit deny names the rule.
fn resources(ports: &Ports, admin_web: bool) -> String {
    let (api_port, api_in) = (ports.api, ports.api_in);
    let admin = if admin_web {
        format!("allow: [\"spiffe://example.org/ops/*\", {WEB}]")
    } else {
        format!("allow: [\"spiffe://example.org/ops/*\"], deny: [{WEB}]")
    };
    format!(
        "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: api, owner: team-api, purpose: orders API}}
spec: {{spiffeId: {API}, environment: demo, addresses: [\"127.0.0.1:{api_in}\"]}}
---
apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: web, owner: team-web, purpose: storefront}}
spec: {{spiffeId: {WEB}, environment: demo}}
---
apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: reports, owner: team-bi, purpose: nightly reports}}
spec: {{spiffeId: {REPORTS}, environment: demo}}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: api-access, owner: team-api, purpose: who may call the orders API}}
spec:
  target: {API}
  ports:
    - port: {api_port}
      routes:
        - {{name: orders, match: {{methods: [GET], path: {{prefix: /orders}}}}, allow: [{WEB}, {REPORTS}]}}
        - {{name: admin, match: {{path: {{prefix: /admin}}}}, {admin}}}
"
    )
}

/// Step 3: the api workload and the three sidecars, each in force with a snapshot from the
/// control plane.
fn start_mesh(
    bin_dir: &Path,
    d: &Path,
    ports: &Ports,
    operator: &Client,
) -> Result<Mesh, DemoError> {
    step(
        3,
        "Workloads (plain HTTP, no TLS) and their sidecars, which subscribe to the control plane",
    );
    let api_workload = Proc::spawn(
        d,
        "api",
        Command::new(bin_dir.join("sigil-toy-workload")).args([
            "--listen",
            &format!("127.0.0.1:{}", ports.api),
            "--name",
            "api",
        ]),
    )?;
    let (api_port, api_in) = (ports.api, ports.api_in);
    let inbound = format!(
        "  inbound:\n    explicit: [{{listen: \"127.0.0.1:{api_in}\", port: {api_port}}}]\n"
    );
    let api = spawn_sidecar(bin_dir, d, ports, "api", inbound)?;
    // No expectedId: the registry the control plane pushes says who answers at api_in.
    let outbound = |port: u16| {
        format!("  outbound:\n    explicit: [{{listen: \"127.0.0.1:{port}\", upstream: \"127.0.0.1:{api_in}\"}}]\n")
    };
    let web = spawn_sidecar(bin_dir, d, ports, "web", outbound(ports.web_out))?;
    let reports = spawn_sidecar(bin_dir, d, ports, "reports", outbound(ports.reports_out))?;
    let snapshot_in_force = |s: &Sidecar| {
        admin_get(s.admin, "/config_dump")
            .is_some_and(|(_, dump)| dump.contains("\"control_plane_snapshot\": {"))
    };
    wait_for(
        "every sidecar's snapshot",
        Duration::from_secs(10),
        None,
        || [&api, &web, &reports].iter().all(|s| snapshot_in_force(s)),
    )?;
    println!("      api     127.0.0.1:{api_port}, its sidecar on 127.0.0.1:{api_in}");
    println!(
        "      web     calls api through its sidecar at 127.0.0.1:{}",
        ports.web_out
    );
    println!(
        "      reports calls api through its sidecar at 127.0.0.1:{}",
        ports.reports_out
    );
    let (_, status) = operator.send(Method::GET, "/v1/status", &[], String::new())?;
    for line in status.lines() {
        println!("      sigil status: {line}");
    }
    Ok(Mesh {
        _api_workload: api_workload,
        api,
        web,
        _reports: reports,
    })
}

/// A sidecar for `name`'s SVID with `listeners`, subscribed to the control plane; returns
/// once it is ready.
fn spawn_sidecar(
    bin_dir: &Path,
    d: &Path,
    ports: &Ports,
    name: &str,
    listeners: String,
) -> Result<Sidecar, DemoError> {
    let admin = free_port()?;
    let cfg = d.join(format!("{name}-sidecar.yaml"));
    let sidecar_port = ports.sidecar;
    let yaml = format!(
        "apiVersion: sigil.dev/v1
kind: ProxyConfig
metadata: {{name: {name}-sidecar, owner: demo}}
spec:
  mode: explicit
  identity: {{certFile: {name}.crt, keyFile: {name}.key, bundleDir: bundles}}
  admin: {{listen: \"127.0.0.1:{admin}\"}}
  controlPlane: {{address: \"127.0.0.1:{sidecar_port}\", spiffeId: \"{CONTROL}\", stateDir: state-{name}}}
{listeners}"
    );
    std::fs::write(&cfg, yaml).map_err(file_error(&cfg))?;
    let proc = Proc::spawn(
        d,
        &format!("{name}-sidecar"),
        Command::new(bin_dir.join("sigil-proxy"))
            .arg("--config")
            .arg(&cfg)
            .env("SIGIL_LOG", "info"),
    )?;
    wait_for(
        &format!("{name}'s sidecar"),
        Duration::from_secs(15),
        Some(&proc),
        || admin_get(admin, "/ready").is_some_and(|(s, _)| s == 200),
    )?;
    Ok(Sidecar { admin, _proc: proc })
}

/// One GET through a sidecar's outbound listener: status and body.
fn call(port: u16, path: &str) -> Result<(u16, String), DemoError> {
    get_once(port, path).ok_or_else(|| DemoError::NoAnswer(format!("GET {path}")))
}

/// Step 4: web calls an allowed route, then a denied one, whose 403 names the rule.
fn allowed_and_denied(ports: &Ports) -> Result<(), DemoError> {
    step(
        4,
        "web calls api: an allowed route, and a denied one with the rule that denied it",
    );
    let (s, body) = call(ports.web_out, "/orders/42")?;
    println!("      web → api GET /orders/42  → {s} {body}");
    if s != 200 {
        return Err(DemoError::Misbehaved(format!(
            "expected 200 for /orders/42, got {s}: {body}"
        )));
    }
    let (s, body) = call(ports.web_out, "/admin/users")?;
    println!("      web → api GET /admin/users → {s} {body}");
    if s != 403 || !body.contains("policy api-access rule admin") {
        return Err(DemoError::Misbehaved(format!(
            "expected 403 naming policy api-access rule admin, got {s}: {body}"
        )));
    }
    Ok(())
}

/// Step 5: the operator opens /admin to web; the sidecars apply it without a restart.
fn push_policy(operator: &Client, ports: &Ports) -> Result<(), DemoError> {
    step(
        5,
        "A policy pushed live: the operator opens /admin to web; no restart",
    );
    let started = Instant::now();
    apply(operator, "demo.yaml", resources(ports, true))?;
    wait_for("/admin to open", Duration::from_secs(10), None, || {
        get_once(ports.web_out, "/admin/users").is_some_and(|(s, _)| s == 200)
    })?;
    println!(
        "      web → api GET /admin/users → 200, {} ms after sigil apply",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Step 6: web is revoked while it holds a live connection and reports keeps calling: the
/// live connection is cut, web is refused, reports is not disturbed.
fn revoke_web(operator: &Client, ports: &Ports) -> Result<(), DemoError> {
    step(
        6,
        "Revocation: web's key is stolen; revoke it while reports keeps calling api",
    );
    let mut live = TcpStream::connect(("127.0.0.1", ports.web_out)).map_err(DemoError::Network)?;
    live.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(DemoError::Network)?;
    match get(&mut live, "/orders/live") {
        Some((200, _)) => {
            println!("      web holds a live keep-alive connection to api (GET /orders/live → 200)")
        }
        Some((status, body)) => {
            return Err(DemoError::Misbehaved(format!(
                "live connection: GET /orders/live got {status}: {body}"
            )))
        }
        None => return Err(DemoError::NoAnswer("GET /orders/live".into())),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_caller(ports.reports_out, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let web_id = SpiffeId::parse(WEB).expect("WEB is a SPIFFE ID");
    let yaml = revoke::document(
        &revoke::name_for(&web_id),
        &web_id,
        "demo: web's key was stolen",
        None,
        OPERATOR,
    )?;
    let revoked_at = Instant::now();
    apply(operator, "sigil revoke", yaml)?;
    println!("      sigil revoke {WEB} --reason \"demo: web's key was stolen\"");
    // The live connection is cut: web's own sidecar closes it (EOF or reset).
    let cut = match live.read(&mut [0u8; 256]) {
        Ok(n) => n == 0,
        // The 5 s read timeout: still open.
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    };
    let cut_ms = revoked_at.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = steady
        .join()
        .map_err(|_| DemoError::Misbehaved("the reports caller panicked".into()))?;
    if !cut {
        return Err(DemoError::Misbehaved(
            "web's live connection survived the revocation".into(),
        ));
    }
    println!("      web's live connection was cut, {cut_ms} ms after sigil revoke");
    let (s, body) = call(ports.web_out, "/orders/43")?;
    println!("      web → api GET /orders/43  → {s} {body}");
    if s == 200 {
        return Err(DemoError::Misbehaved(
            "web was still admitted after its revocation".into(),
        ));
    }
    println!("      reports → api meanwhile: {ok} calls, {failed} failed");
    if failed > 0 || ok == 0 {
        return Err(DemoError::Misbehaved(format!(
            "reports' calls were disturbed: {failed} failed, {ok} ok"
        )));
    }
    Ok(())
}

/// reports calling api on one keep-alive connection every 10 ms until `stop` (at most 30 s):
/// (calls answered 200, calls that were not).
fn steady_caller(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, u32)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, 0u32);
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let r = s.as_mut().and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                get(s, "/orders/report")
            });
            match r {
                Some((200, _)) => ok += 1,
                _ => failed += 1,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, failed)
    })
}

/// Step 7: the sidecars' and the control plane's metrics of what happened.
fn show_metrics(operator: &Client, mesh: &Mesh) -> Result<(), DemoError> {
    step(7, "Metrics: every sidecar and the control plane");
    // Whichever side acts first cuts the connection: web's sidecar (its own SVID revoked) or
    // api's (a revoked peer).
    let mut revoked_closes = 0;
    for (name, s) in [("api", &mesh.api), ("web", &mesh.web)] {
        let (_, metrics) = admin_get(s.admin, "/metrics")
            .ok_or_else(|| DemoError::NoAnswer(format!("{name} sidecar /metrics")))?;
        for line in metrics.lines().filter(|l| {
            (name == "api"
                && l.starts_with("sigil_requests_total{")
                && l.contains("direction=\"inbound\""))
                || (l.starts_with("sigil_connections_closed_total{")
                    && l.contains("reason=\"revoked\""))
        }) {
            revoked_closes += usize::from(line.contains("reason=\"revoked\""));
            println!("      {line}");
        }
    }
    if revoked_closes == 0 {
        return Err(DemoError::Misbehaved(
            "no sidecar counted a connection closed for the revocation".into(),
        ));
    }
    let (_, metrics) = operator.send(Method::GET, "/metrics", &[], String::new())?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("sigil_control_sidecars_connected")
            || l.starts_with("sigil_control_push_latency_seconds_count")
            || l.starts_with("sigil_control_push_latency_seconds_sum")
            || l.starts_with("sigil_control_revocations")
    }) {
        println!("      {line}");
    }
    println!(
        "      read them yourself: curl http://127.0.0.1:{}/metrics (api's sidecar; also /config_dump),\n      \
         sigil metrics and sigil status (the control plane, mutual TLS)",
        mesh.api.admin
    );
    Ok(())
}

pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}
