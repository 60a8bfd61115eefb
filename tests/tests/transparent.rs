//! Transparent mode end to end: three hosts in network namespaces, each with the toy workload,
//! its sidecar running as a dedicated UID, and `examples/iptables/sigil-iptables.sh` installed.
//!
//! ```text
//!            hub namespace: bridge br0
//!          /          |            \
//!   A 10.77.0.11   B 10.77.0.12   C 10.77.0.13 (intruder: valid SVID, not allowed on B)
//! ```
//!
//! Checks (a) A's plain `curl B:8080` reaches B's workload through both sidecars over mTLS;
//! (b) the same request from C is refused by B's policy; (c) plaintext that bypasses C's
//! sidecar (sent as the proxy UID, which iptables leaves alone) is refused by B at the handshake.
//! Needs root, iptables, curl and setpriv; skips with a reason otherwise (fails in CI).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_e2e::{
    bin, metric, poll, require_root, require_tool, run, write_identity, Proc, TempDir,
};
use sigil_e2e::{A as ID_A, B as ID_B, C as ID_C};
use sigil_testkit::Ca;

const TEST: &str = "transparent";
const PROXY_UID: u32 = 1337;
const SUBNET_PREFIX: u8 = 24;
const WORKLOAD_PORT: u16 = 8080;
const OUTSIDE_IP: &str = "10.77.0.1";
const ADMIN: &str = "http://127.0.0.1:15000";
const STEP: Duration = Duration::from_secs(20);

/// The network namespaces of one test run; all deleted on drop, also when the test panics.
/// Deleting a namespace also deletes the veth ends and the bridge inside it.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new() -> Self {
        Self { names: Vec::new() }
    }

    /// Creates `sigil-t<pid>-<tag>` with loopback up and returns its name.
    fn add(&mut self, tag: &str) -> String {
        let name = format!("sigil-t{}-{tag}", std::process::id());
        // A namespace with this name can only be left over from a killed run with the same PID.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        self.names.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            match Command::new("ip").args(["netns", "del", n]).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "{TEST}: ip netns del {n}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("{TEST}: ip netns del {n}: {e}"),
            }
        }
    }
}

/// Runs a set-up command; panics with its output if it fails.
fn sh(args: &[&str]) -> String {
    let (ok, out) = run(Command::new(args[0]).args(&args[1..]), STEP);
    assert!(ok, "`{}` failed:\n{out}", args.join(" "));
    out
}

/// `ip netns exec NS args...` as a Command.
fn in_ns<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// `ip netns exec NS setpriv ... args...`: runs as the proxy UID/GID, which the iptables rules
/// never redirect. `ip netns exec` and `setpriv` both exec, so the PID is the program's own.
fn in_ns_as_proxy<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let uid = format!("--reuid={PROXY_UID}");
    let gid = format!("--regid={PROXY_UID}");
    let mut c = in_ns(ns, &["setpriv", &uid, &gid, "--clear-groups"]);
    c.args(args);
    c
}

/// Bound on every curl: long enough for a debug-build handshake, short enough to tell a
/// refusal (the connection is closed or reset at once) from a hang.
const CURL_MAX_TIME: Duration = Duration::from_secs(5);

fn curl_args(url: &str) -> Vec<String> {
    [
        "curl",
        "-sS",
        "--max-time",
        &CURL_MAX_TIME.as_secs().to_string(),
        url,
    ]
    .map(String::from)
    .to_vec()
}

/// Runs a command and panics unless it failed, without reaching B's workload, and promptly:
/// a refused connection must be closed or reset, not left hanging until curl gives up.
fn assert_refused(what: &str, cmd: &mut Command) -> String {
    let start = Instant::now();
    let (ok, out) = run(cmd, STEP);
    let took = start.elapsed();
    assert!(
        !ok && !out.contains("hello from"),
        "{what}: should have been refused, got: {out}"
    );
    assert!(
        took < CURL_MAX_TIME - Duration::from_millis(500) && !out.contains("timed out"),
        "{what}: the connection was neither closed nor reset; the client waited {took:?} \
         for its own timeout: {}",
        out.trim()
    );
    out
}

struct Host {
    name: &'static str,
    ns: String,
    ip: String,
    id: &'static str,
    workload: Option<Proc>,
    proxy: Option<Proc>,
}

impl Host {
    fn proxy(&mut self) -> &mut Proc {
        self.proxy.as_mut().expect("proxy started")
    }

    fn proxy_log(&self) -> String {
        self.proxy.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// GET on this host's admin listener (from inside its namespace, over loopback).
    fn admin_get(&self, path: &str) -> (bool, String) {
        run(
            &mut in_ns(&self.ns, &curl_args(&format!("{ADMIN}{path}"))),
            STEP,
        )
    }

    fn metrics(&self) -> String {
        let (ok, page) = self.admin_get("/metrics");
        assert!(ok, "{}: GET /metrics failed: {page}", self.name);
        page
    }

    /// Sum of the samples of `series` carrying every label in `labels` (0 if none).
    fn metric(&self, series: &str, labels: &[&str]) -> f64 {
        metric(&self.metrics(), series, labels).unwrap_or(0.0)
    }

    /// Waits until `series{labels}` exceeds `above`; panics with the page and the proxy log.
    fn wait_metric_above(&self, series: &str, labels: &[&str], above: f64) -> f64 {
        poll(Duration::from_secs(10), Duration::from_millis(100), || {
            let page = self.metrics();
            let v = metric(&page, series, labels).unwrap_or(0.0);
            if v > above {
                return Ok(v);
            }
            Err(format!(
                "{}: {series} with {labels:?} stayed at {v} (expected > {above}).\n\
                 --- /metrics ---\n{page}\n--- proxy log ---\n{}",
                self.name,
                self.proxy_log()
            ))
        })
    }
}

/// Everything that runs during the test. On a panic it prints every process's log first, then
/// ends the processes by PID (Proc's drop).
struct Mesh {
    hosts: Vec<Host>,
}

impl Mesh {
    fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .expect("known host")
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for h in &self.hosts {
            for (what, p) in [("workload", &h.workload), ("sigil-proxy", &h.proxy)] {
                if let Some(p) = p {
                    s.push_str(&format!("--- {} {what} ---\n{}", h.name, p.log()));
                }
            }
        }
        s
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{TEST}: logs of every process:\n{}", self.logs());
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/iptables/sigil-iptables.sh")
}

fn write_config(dir: &Path, me: &Host, hosts: &[Host], ca: &Ca) -> PathBuf {
    let files = write_identity(dir, me.name, ca, me.id, &[ca]);
    // The sidecar runs as PROXY_UID: the key is written 0600 for root, hand it over.
    std::os::unix::fs::chown(&files.key, Some(PROXY_UID), Some(PROXY_UID)).expect("chown key");
    let inbound = if me.name == "b" {
        format!("  inbound:\n    ports:\n      - {{port: {WORKLOAD_PORT}, allow: [\"{ID_A}\"]}}\n")
    } else {
        String::new()
    };
    let mut registry = String::new();
    for h in hosts.iter().filter(|h| h.name != me.name) {
        registry.push_str(&format!(
            "      - {{address: \"{}:{WORKLOAD_PORT}\", spiffeId: \"{}\"}}\n",
            h.ip, h.id
        ));
    }
    let yaml = format!(
        "apiVersion: sigil.dev/v1\n\
         kind: ProxyConfig\n\
         metadata: {{name: {name}}}\n\
         spec:\n  \
           mode: transparent\n  \
           identity:\n    \
             certFile: \"{cert}\"\n    \
             keyFile: \"{key}\"\n    \
             bundleDir: \"{bundles}\"\n    \
             spiffeId: \"{id}\"\n\
         {inbound}  \
           outbound:\n    \
             unknownDestination: {unknown}\n    \
             registry:\n\
         {registry}",
        name = me.name,
        cert = files.cert.display(),
        key = files.key.display(),
        bundles = files.bundle_dir.display(),
        id = me.id,
        // C refuses destinations outside the mesh; A and B pass them through.
        unknown = if me.name == "c" {
            "deny"
        } else {
            "passthrough"
        },
    );
    let path = dir.join(format!("{}.yaml", me.name));
    std::fs::write(&path, &yaml).expect("write config");
    // Catch a malformed config here, with the model's own error, rather than as a dead proxy.
    if let Err(e) = sigil_config::ProxyConfig::parse(&path, &yaml) {
        panic!(
            "generated config {} is invalid: {e}\n{yaml}",
            path.display()
        );
    }
    path
}

fn wait_ready(h: &mut Host) {
    poll(STEP, Duration::from_millis(100), || {
        if let Some(st) = h.proxy().try_wait() {
            panic!(
                "{}: sigil-proxy exited ({st}) before it was ready:\n{}",
                h.name,
                h.proxy_log()
            );
        }
        let (ok, body) = run(
            &mut in_ns(
                &h.ns,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "1",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("{ADMIN}/ready"),
                ],
            ),
            STEP,
        );
        if ok && body.trim() == "200" {
            return Ok(());
        }
        Err(format!(
            "{}: {ADMIN}/ready not 200 after {STEP:?} (last: {body:?}):\n{}",
            h.name,
            h.proxy_log()
        ))
    })
}

#[test]
fn transparent_mode_mtls_between_namespaces() {
    if !require_root(TEST) {
        return;
    }
    for tool in ["ip", "iptables", "iptables-save", "curl", "setpriv"] {
        if !require_tool(tool, TEST) {
            return;
        }
    }
    let script = script();
    assert!(script.exists(), "{} missing", script.display());
    let script = script.to_str().expect("utf-8 path").to_string();

    // Declared first so it is dropped last: processes end before their namespaces go.
    let mut netns = Namespaces::new();
    let dir = TempDir::new(TEST);
    let (hub, hosts) = topology(&mut netns);
    let mut mesh = start_mesh(dir.path(), hosts, &script);

    a_calls_b_over_mtls(&mesh);
    c_is_denied_by_bs_policy(&mesh);
    plaintext_bypassing_cs_sidecar_is_refused(&mesh);
    destinations_outside_the_mesh(&mesh, &hub);

    // Undo: the init script's uninstall leaves no Sigil rule behind.
    for h in &mesh.hosts {
        sh(&["ip", "netns", "exec", &h.ns, "bash", &script, "uninstall"]);
        let save = sh(&["ip", "netns", "exec", &h.ns, "iptables-save", "-t", "nat"]);
        assert!(
            !save.contains("SIGIL"),
            "{}: rules left after uninstall:\n{save}",
            h.name
        );
    }

    // Every process still alive at the end: nothing crashed along the way.
    for h in mesh.hosts.iter_mut() {
        assert!(
            h.proxy().try_wait().is_none(),
            "{}: sigil-proxy exited during the test:\n{}",
            h.name,
            h.proxy_log()
        );
    }
    drop(mesh);
    drop(dir);
    drop(netns);
}

/// A hub namespace holding a bridge, one veth pair per host. Both veth ends are created
/// inside namespaces, so nothing is added to the root namespace. Returns the hub's name and
/// the hosts A, B and C, nothing started on them yet.
fn topology(netns: &mut Namespaces) -> (String, Vec<Host>) {
    let hub = netns.add("hub");
    sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"]);
    sh(&["ip", "-n", &hub, "link", "set", "br0", "up"]);
    // The hub itself is a host outside the mesh (no sidecar, not in any registry).
    sh(&[
        "ip",
        "-n",
        &hub,
        "addr",
        "add",
        &format!("{OUTSIDE_IP}/{SUBNET_PREFIX}"),
        "dev",
        "br0",
    ]);
    let mut hosts = Vec::new();
    for (i, (name, id)) in [("a", ID_A), ("b", ID_B), ("c", ID_C)]
        .into_iter()
        .enumerate()
    {
        let ns = netns.add(name);
        let ip = format!("10.77.0.{}", 11 + i);
        let port = format!("v{name}");
        sh(&[
            "ip", "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &hub, "link", "set", &port, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/{SUBNET_PREFIX}"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        hosts.push(Host {
            name,
            ns,
            ip,
            id,
            workload: None,
            proxy: None,
        });
    }
    (hub, hosts)
}

/// The toy workload `name` listening on `listen` inside namespace `ns`.
fn workload_in(ns: &str, name: &str, listen: &str) -> Proc {
    let workload_bin = bin("sigil-toy-workload");
    let workload = Proc::spawn(
        &format!("workload-{name}"),
        &mut in_ns(
            ns,
            &[
                workload_bin.to_str().expect("utf-8 path"),
                "--listen",
                listen,
                "--name",
                name,
            ],
        ),
    );
    workload.wait_log("listening on", STEP);
    workload
}

/// On each host: identities from one CA (C's SVID is perfectly valid, it is just not allowed
/// on B), the iptables rules installed before any process starts (as an init container
/// would), the workload, and the sidecar as the proxy UID; then waits for every sidecar.
fn start_mesh(dir: &Path, hosts: Vec<Host>, script: &str) -> Mesh {
    let proxy_bin = bin("sigil-proxy");
    let ca = Ca::new("example.org");
    let configs: Vec<PathBuf> = hosts
        .iter()
        .map(|h| write_config(dir, h, &hosts, &ca))
        .collect();
    let mut mesh = Mesh { hosts };
    let uid_s = PROXY_UID.to_string();
    for (h, config) in mesh.hosts.iter_mut().zip(&configs) {
        let out = sh(&[
            "ip",
            "netns",
            "exec",
            &h.ns,
            "bash",
            script,
            "install",
            "--proxy-uid",
            &uid_s,
            "--proxy-gid",
            &uid_s,
        ]);
        assert!(
            out.contains("installed"),
            "{}: install said:\n{out}",
            h.name
        );
        h.workload = Some(workload_in(
            &h.ns,
            h.name,
            &format!("0.0.0.0:{WORKLOAD_PORT}"),
        ));
        h.proxy = Some(Proc::spawn(
            &format!("sigil-proxy-{}", h.name),
            &mut in_ns_as_proxy(
                &h.ns,
                &[
                    proxy_bin.to_str().expect("utf-8 path"),
                    "--config",
                    config.to_str().expect("utf-8 path"),
                ],
            ),
        ));
    }
    for h in mesh.hosts.iter_mut() {
        wait_ready(h);
    }
    mesh
}

fn b_url(mesh: &Mesh) -> String {
    format!("http://{}:{WORKLOAD_PORT}/", mesh.host("b").ip)
}

/// (a) A's workload calls B in plaintext; both sidecars carry it over mTLS.
fn a_calls_b_over_mtls(mesh: &Mesh) {
    let (a, b) = (mesh.host("a"), mesh.host("b"));
    let (ok, out) = run(&mut in_ns(&a.ns, &curl_args(&b_url(mesh))), STEP);
    assert!(ok && out.contains("hello from b"), "A -> B failed: {out}");
    // B's workload saw the connection come from its own sidecar over loopback.
    assert!(
        out.contains("from 127.0.0.1:"),
        "B's workload was not reached through its sidecar: {out}"
    );
    let opened = b.wait_metric_above(
        "sigil_connections_opened_total",
        &["direction=\"inbound\"", &format!("peer_id=\"{ID_A}\"")],
        0.0,
    );
    eprintln!("{TEST}: (a) A -> B ok; B counted {opened} inbound connection(s) from A");
    a.wait_metric_above(
        "sigil_connections_opened_total",
        &["direction=\"outbound\"", &format!("peer_id=\"{ID_B}\"")],
        0.0,
    );
}

/// (b) C has a valid SVID from the same CA, but B's policy allows only A on 8080. C's
/// sidecar detects HTTP and pools it; B answers each request with 403 naming the rule, and
/// nothing reaches B's workload.
fn c_is_denied_by_bs_policy(mesh: &Mesh) {
    let (b, c) = (mesh.host("b"), mesh.host("c"));
    let peer_c = format!("peer_id=\"{ID_C}\"");
    let denied_labels = ["direction=\"inbound\"", &peer_c, "decision=\"deny\""];
    let denied_before = b.metric("sigil_requests_total", &denied_labels);
    let (ok, out) = run(&mut in_ns(&c.ns, &curl_args(&b_url(mesh))), STEP);
    assert!(
        ok && out.contains("sigil: denied by port 8080") && !out.contains("hello from"),
        "C -> B should get 403 from B's sidecar, got: {out}"
    );
    b.wait_metric_above("sigil_requests_total", &denied_labels, denied_before);
    eprintln!("{TEST}: (b) C -> B denied ({})", out.trim());
}

/// (c) Plaintext from C straight to B:8080, bypassing C's sidecar: curl runs as the proxy
/// UID, which C's OUTPUT rules leave alone. B's PREROUTING still sends it to B's inbound
/// listener, which wants a TLS handshake.
fn plaintext_bypassing_cs_sidecar_is_refused(mesh: &Mesh) {
    let (b, c) = (mesh.host("b"), mesh.host("c"));
    let hs_labels = ["direction=\"inbound\""];
    let hs_before = b.metric("sigil_handshake_failures_total", &hs_labels);
    let out = assert_refused(
        "plaintext C -> B",
        &mut in_ns_as_proxy(&c.ns, &curl_args(&b_url(mesh))),
    );
    b.wait_metric_above("sigil_handshake_failures_total", &hs_labels, hs_before);
    eprintln!(
        "{TEST}: (c) plaintext C -> B refused (curl: {})",
        out.trim()
    );
}

/// (d) A destination outside the mesh registry: A's sidecar passes it through in plaintext;
/// C's is configured to deny it.
fn destinations_outside_the_mesh(mesh: &Mesh, hub: &str) {
    let (a, c) = (mesh.host("a"), mesh.host("c"));
    let outside_listen = format!("{OUTSIDE_IP}:{WORKLOAD_PORT}");
    let _outside = workload_in(hub, "outside", &outside_listen);
    let outside_url = format!("http://{outside_listen}/");
    let (ok, out) = run(&mut in_ns(&a.ns, &curl_args(&outside_url)), STEP);
    assert!(
        ok && out.contains("hello from outside"),
        "A -> outside (passthrough) failed: {out}"
    );
    a.wait_metric_above(
        "sigil_connections_opened_total",
        &["direction=\"outbound\"", "peer_id=\"passthrough\""],
        0.0,
    );
    let out = assert_refused(
        "C -> outside (deny)",
        &mut in_ns(&c.ns, &curl_args(&outside_url)),
    );
    c.wait_metric_above(
        "sigil_connections_refused_total",
        &["direction=\"outbound\"", "reason=\"unknown_destination\""],
        0.0,
    );
    eprintln!(
        "{TEST}: (d) passthrough from A ok; C denied the unknown destination ({})",
        out.trim()
    );
}
