//! Helpers for the end-to-end tests: locate the built binaries, run them as children that are
//! always ended by PID, and lay out identities and configs generated at test time.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigil_testkit::Ca;

/// Directory holding the workspace's built binaries (`target/<profile>`), found from the
/// running executable (a test in `target/<profile>/deps/`, or a binary beside the others),
/// so CARGO_TARGET_DIR is honoured.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary; panics with the command to run if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// True when `tool` is on PATH. In CI a missing tool fails the test loudly; elsewhere the
/// caller skips, and this prints why.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !in_ci(),
            "{test}: `{tool}` is required in CI; scripts/setup.sh installs it"
        );
        eprintln!("SKIP {test}: `{tool}` not installed (run scripts/setup.sh)");
    }
    found
}

/// True when running as root (network namespaces, iptables). Same CI rule as `require_tool`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(!in_ci(), "{test}: must run as root in CI");
        eprintln!("SKIP {test}: needs root for network namespaces and iptables");
    }
    root
}

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind ephemeral port")
        .port()
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sigil-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process ended by its PID when dropped (SIGTERM, then SIGKILL after 5 s). Its
/// stderr is collected so tests can assert on log lines.
pub struct Proc {
    child: std::process::Child,
    pub name: String,
    log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("SIGIL_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    let mut l = log.lock().expect("log lock");
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Self {
            child,
            name: name.to_string(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{}: no {needle:?} in log after {timeout:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.code();
            }
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate(Duration::from_secs(5));
        }
    }
}

/// Files of one workload identity: `<name>.crt`, `<name>.key` and a bundle directory with
/// one `<trust domain>.pem` per CA.
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle_dir: PathBuf,
}

pub fn write_identity(dir: &Path, name: &str, ca: &Ca, id: &str, trusted: &[&Ca]) -> IdentityFiles {
    let svid = ca.svid(id);
    let (cert, key) = svid.write(dir, name);
    let bundle_dir = dir.join(format!("{name}-bundles"));
    std::fs::create_dir_all(&bundle_dir).expect("bundle dir");
    for t in trusted {
        std::fs::write(
            bundle_dir.join(format!("{}.pem", t.trust_domain())),
            t.bundle_pem(),
        )
        .expect("write bundle");
    }
    IdentityFiles {
        cert,
        key,
        bundle_dir,
    }
}

/// Runs a command to completion with a timeout; returns (success, stdout and stderr).
pub fn run(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let (code, out) = run_status(cmd, timeout);
    (code == Some(0), out)
}

/// Runs `cmd` to its end (panics after `timeout`): its exit code and output.
pub fn run_status(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String) {
    let mut p = Proc::spawn("cmd", cmd);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = p.try_wait() {
            // Give the reader threads a moment to drain the pipes.
            std::thread::sleep(Duration::from_millis(20));
            return (st.code(), p.log());
        }
        assert!(Instant::now() < deadline, "command timed out: {cmd:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fetches a Prometheus text page and returns the value of the first sample whose line
/// starts with `series` (name plus label set as printed), or None.
pub fn metric(page: &str, series_prefix: &str, must_contain: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(series_prefix) && must_contain.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// An explicit-mode sidecar on loopback, for tests and the quickstart.
pub struct Sidecar {
    pub name: String,
    pub id: String,
    pub admin: u16,
    /// (listen port, workload port): inbound listeners standing for a workload port.
    pub inbound: Vec<(u16, u16)>,
    /// Per workload port, the allowed peer ID patterns. Empty: no policy (mTLS only).
    pub allow: Vec<(u16, Vec<String>)>,
    /// (listen port, upstream port, expected peer ID).
    pub outbound: Vec<(u16, u16, String)>,
    pub handshake_timeout: &'static str,
    pub drain: &'static str,
    /// `timeouts.poolIdle`: how long a pooled connection may go unused.
    pub pool_idle: &'static str,
    /// `workers`: threads serving connections, each with its own pooled connections. None:
    /// the proxy's default (the cores available).
    pub workers: Option<usize>,
    /// Directory of Policy files (`spec.policyDir`).
    pub policy_dir: Option<PathBuf>,
    /// Directory of Revocation files (`spec.revocationDir`).
    pub revocation_dir: Option<PathBuf>,
    /// `spec.controlPlane`: (sidecar API port, control plane ID, state dir).
    pub control_plane: Option<(u16, String, PathBuf)>,
    /// `identity.allowIdentityChange`: a rotation may switch the sidecar to another ID.
    pub allow_identity_change: bool,
    /// More `timeouts` entries, e.g. `[("request", "1s")]`.
    pub timeouts: Vec<(&'static str, &'static str)>,
    /// `spec.limits` as a YAML flow map, e.g. `{maxConnectionsPerSource: 10}`.
    pub limits: Option<String>,
    /// RLIMIT_NOFILE (soft and hard) to start the process with.
    pub fd_limit: Option<u64>,
}

impl Sidecar {
    pub fn new(name: &str, id: &str) -> Self {
        Self {
            name: name.into(),
            id: id.into(),
            admin: free_port(),
            inbound: Vec::new(),
            allow: Vec::new(),
            outbound: Vec::new(),
            handshake_timeout: "2s",
            drain: "5s",
            pool_idle: "90s",
            workers: None,
            policy_dir: None,
            revocation_dir: None,
            control_plane: None,
            allow_identity_change: false,
            timeouts: Vec::new(),
            limits: None,
            fd_limit: None,
        }
    }

    pub fn config_yaml(&self, files: &IdentityFiles) -> String {
        let mut y = format!(
            "apiVersion: sigil.dev/v1\nkind: ProxyConfig\nmetadata:\n  name: {}\n  owner: sigil-tests\n\
             spec:\n  mode: explicit\n  identity:\n    certFile: {}\n    keyFile: {}\n    bundleDir: {}\n\
             \x20 admin:\n    listen: 127.0.0.1:{}\n  timeouts:\n    handshake: {}\n    drain: {}\n    poolIdle: {}\n",
            self.name,
            files.cert.display(),
            files.key.display(),
            files.bundle_dir.display(),
            self.admin,
            self.handshake_timeout,
            self.drain,
            self.pool_idle,
        );
        let ports: Vec<String> = self
            .allow
            .iter()
            .map(|(port, ids)| format!("{{port: {port}, allow: [{}]}}", ids.join(", ")))
            .collect();
        let inbound: Vec<String> = self
            .inbound
            .iter()
            .map(|(listen, port)| format!("{{listen: \"127.0.0.1:{listen}\", port: {port}}}"))
            .collect();
        let outbound: Vec<String> = self
            .outbound
            .iter()
            .map(|(listen, upstream, id)| {
                // An empty ID: leave it to the registry.
                let expected = if id.is_empty() {
                    String::new()
                } else {
                    format!(", expectedId: \"{id}\"")
                };
                format!("{{listen: \"127.0.0.1:{listen}\", upstream: \"127.0.0.1:{upstream}\"{expected}}}")
            })
            .collect();
        for (name, value) in &self.timeouts {
            y = y.replace(
                "    poolIdle: ",
                &format!("    {name}: {value}\n    poolIdle: "),
            );
        }
        if let Some(limits) = &self.limits {
            y += &format!("  limits: {limits}\n");
        }
        if self.allow_identity_change {
            y = y.replace(
                "    bundleDir: ",
                "    allowIdentityChange: true\n    bundleDir: ",
            );
        }
        if let Some(n) = self.workers {
            y += &format!("  workers: {n}\n");
        }
        if let Some(dir) = &self.policy_dir {
            y += &format!("  policyDir: {}\n", dir.display());
        }
        if let Some(dir) = &self.revocation_dir {
            y += &format!("  revocationDir: {}\n", dir.display());
        }
        if let Some((port, id, state)) = &self.control_plane {
            y += &format!(
                "  controlPlane: {{address: \"127.0.0.1:{port}\", spiffeId: \"{id}\", stateDir: {}}}\n",
                state.display()
            );
        }
        y += &format!(
            "  inbound:\n    ports: [{}]\n    explicit: [{}]\n  outbound:\n    explicit: [{}]\n",
            ports.join(", "),
            inbound.join(", "),
            outbound.join(", ")
        );
        y
    }

    /// Writes the config next to the identity files and starts `sigil-proxy`; waits for its
    /// admin listener, not for /ready.
    pub fn spawn(&self, dir: &Path, files: &IdentityFiles) -> Proc {
        let cfg = dir.join(format!("{}.yaml", self.name));
        std::fs::write(&cfg, self.config_yaml(files)).expect("write config");
        let mut cmd = Command::new(bin("sigil-proxy"));
        cmd.arg("--config").arg(&cfg).env("SIGIL_LOG", "info");
        if let Some(n) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child's limits.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let p = Proc::spawn(&self.name, &mut cmd);
        let admin: SocketAddr = ([127, 0, 0, 1], self.admin).into();
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{}: no admin listener after 15 s:\n{}",
                self.name,
                p.log()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        p
    }

    /// `spawn`, then waits for /ready.
    pub fn start(&self, dir: &Path, files: &IdentityFiles) -> Proc {
        let p = self.spawn(dir, files);
        let admin: SocketAddr = ([127, 0, 0, 1], self.admin).into();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if http_get(admin, "/ready").is_some_and(|(s, _)| s == 200) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready after 15 s:\n{}",
                self.name,
                p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        http_get(([127, 0, 0, 1], self.admin).into(), "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// Minimal HTTP/1.1 GET (Connection: close) for admin endpoints; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    sigil_testkit::http::get_close(addr, path)
}

/// Starts the toy workload on a free loopback port.
pub fn start_workload(name: &str, echo: bool) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new(bin("sigil-toy-workload"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--name", name]);
    if echo {
        cmd.arg("--echo");
    }
    let p = Proc::spawn(name, &mut cmd);
    wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
    (p, port)
}

/// `curl` through a local port; returns (success, output).
pub fn curl(port: u16, path: &str) -> (bool, String) {
    run(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}{path}"),
        ]),
        Duration::from_secs(10),
    )
}

/// Unix seconds as RFC 3339 UTC (`2026-12-31T00:00:00Z`), for policy expiry in tests.
pub fn rfc3339(unix: i64) -> String {
    sigil_config::policy::Timestamp(unix).to_string()
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replaces `path` whole (write a temporary file, rename over), as a config manager would.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename over");
}

/// A metric's value on a sidecar's /metrics (summed over matching series; 0 if none).
pub fn count(s: &Sidecar, series: &str, labels: &[&str]) -> f64 {
    metric(&s.metrics(), series, labels).unwrap_or(0.0)
}

/// Whether the peer closed `s` (EOF or reset) before its read timeout.
pub fn closed(s: &mut TcpStream) -> bool {
    use std::io::Read;
    match s.read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A single-member etcd server (Debian's etcd-server) on loopback, stopped by PID on drop.
pub struct EtcdServer {
    pub proc: Proc,
    pub client_port: u16,
    /// What a client needs to reach it over TLS (None: plaintext).
    pub client: Option<EtcdClientFiles>,
    /// The CA of its server certificate and of the client certificates it accepts.
    pub ca: Option<Ca>,
}

/// `--etcd-ca`, `--etcd-cert`, `--etcd-key` for `sigil-control`.
#[derive(Clone)]
pub struct EtcdClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdServer {
    /// TLS for clients, and a client certificate from its own CA required of each
    /// (`--client-cert-auth`), as a production etcd runs. Certificates are made here.
    pub fn start(dir: &Path) -> Self {
        let ca = Ca::new("etcd.test");
        let tls = dir.join("etcd-tls");
        std::fs::create_dir_all(&tls).expect("create etcd-tls");
        let ca_file = tls.join("ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem()).expect("write etcd CA");
        let server = ca.issue(
            &sigil_testkit::SvidSpec::new("spiffe://etcd.test/server")
                .uris(&[])
                .ips(&[[127, 0, 0, 1].into()]),
        );
        let (server_cert, server_key) = server.write(&tls, "server");
        let (cert, key) = ca
            .svid("spiffe://etcd.test/sigil-control")
            .write(&tls, "client");
        let mut e = Self::spawn(
            dir,
            "https",
            &[
                "--client-cert-auth".into(),
                format!("--trusted-ca-file={}", ca_file.display()),
                format!("--cert-file={}", server_cert.display()),
                format!("--key-file={}", server_key.display()),
            ],
        );
        e.client = Some(EtcdClientFiles {
            ca: ca_file,
            cert,
            key,
        });
        e.ca = Some(ca);
        e
    }

    /// Plaintext, no client authentication: for `--etcd-insecure`.
    pub fn start_plaintext(dir: &Path) -> Self {
        Self::spawn(dir, "http", &[])
    }

    fn spawn(dir: &Path, scheme: &str, extra: &[String]) -> Self {
        let (client_port, peer_port) = (free_port(), free_port());
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let proc = Proc::spawn(
            "etcd",
            Command::new("etcd")
                .args(["--name", "sigil-test"])
                .arg("--data-dir")
                .arg(dir.join("etcd-data"))
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &format!("sigil-test={peer}")])
                .args(["--log-level", "warn"])
                .args(extra),
        );
        wait_for_port(
            ([127, 0, 0, 1], client_port).into(),
            Duration::from_secs(20),
        );
        Self {
            proc,
            client_port,
            client: None,
            ca: None,
        }
    }

    /// How `sigil-control` reaches this server on `port` (its own, or a relay's).
    pub fn store_at(&self, port: u16) -> StoreAt {
        StoreAt::Etcd(port, self.client.clone())
    }
}

/// Where `sigil-control` keeps its resources.
#[derive(Clone)]
pub enum StoreAt {
    /// `--data-dir`
    Dir(PathBuf),
    /// `--store etcd://127.0.0.1:PORT`, over TLS with these files, or `--etcd-insecure`.
    Etcd(u16, Option<EtcdClientFiles>),
}

impl StoreAt {
    /// The `sigil-control` arguments that select this store.
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        match self {
            Self::Dir(d) => {
                a.push("--data-dir".into());
                a.push(d.into());
            }
            Self::Etcd(port, tls) => {
                a.push("--store".into());
                a.push(format!("etcd://127.0.0.1:{port}").into());
                match tls {
                    Some(f) => {
                        for (flag, path) in [
                            ("--etcd-ca", &f.ca),
                            ("--etcd-cert", &f.cert),
                            ("--etcd-key", &f.key),
                        ] {
                            a.push(flag.into());
                            a.push(path.into());
                        }
                    }
                    None => a.push("--etcd-insecure".into()),
                }
            }
        }
        a
    }
}

/// A `sigil-control` process on loopback with its own store, and the `sigil` CLI pointed at it.
pub struct ControlPlane {
    pub proc: Proc,
    pub id: String,
    pub operator_port: u16,
    pub sidecar_port: u16,
    pub store: StoreAt,
    pub files: IdentityFiles,
}

impl ControlPlane {
    /// Starts it with `files` as its SVID; operators are `spiffe://<td>/ops/*`.
    pub fn start(
        id: &str,
        files: IdentityFiles,
        data_dir: PathBuf,
        operator_port: u16,
        sidecar_port: u16,
    ) -> Self {
        Self::start_with(
            id,
            files,
            StoreAt::Dir(data_dir),
            operator_port,
            sidecar_port,
        )
    }

    /// Starts `id` with an SVID from `ca` (files `control.*` in `dir`) and the embedded store
    /// in `dir/control-data`: the single control plane most tests need.
    pub fn start_in(dir: &Path, ca: &Ca, id: &str) -> Self {
        Self::start(
            id,
            write_identity(dir, "control", ca, id, &[ca]),
            dir.join("control-data"),
            free_port(),
            free_port(),
        )
    }

    pub fn start_with(
        id: &str,
        files: IdentityFiles,
        store: StoreAt,
        operator_port: u16,
        sidecar_port: u16,
    ) -> Self {
        let td = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .expect("a SPIFFE ID");
        let mut cmd = Command::new(bin("sigil-control"));
        cmd.args(store.args());
        let proc = Proc::spawn(
            "sigil-control",
            cmd.arg("--cert")
                .arg(&files.cert)
                .arg("--key")
                .arg(&files.key)
                .arg("--bundle-dir")
                .arg(&files.bundle_dir)
                .args(["--operator", &format!("spiffe://{td}/ops/*")])
                .args(["--operator-listen", &format!("127.0.0.1:{operator_port}")])
                .args(["--sidecar-listen", &format!("127.0.0.1:{sidecar_port}")]),
        );
        for port in [operator_port, sidecar_port] {
            wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(10));
        }
        Self {
            proc,
            id: id.to_string(),
            operator_port,
            sidecar_port,
            store,
            files,
        }
    }

    /// Stops it (SIGTERM; it must exit 0) and starts it again on the same ports and data.
    pub fn restart(self) -> Self {
        self.respawn(|proc| {
            let code = proc.terminate(Duration::from_secs(10));
            assert_eq!(code, Some(0), "sigil-control exit:\n{}", proc.log());
        })
    }

    /// Kills it (SIGKILL: no chance to say goodbye to its streams), then starts it again on
    /// the same ports and data.
    pub fn kill_and_restart(self) -> Self {
        self.respawn(|proc| {
            proc.signal(libc::SIGKILL);
            let _ = proc.terminate(Duration::from_secs(10));
        })
    }

    /// Starts it again on the same ports and store after its process was ended.
    pub fn start_again(self) -> Self {
        self.respawn(|_| {})
    }

    /// Ends the process with `stop`, then starts it again on the same ports and store.
    fn respawn(self, stop: impl FnOnce(&mut Proc)) -> Self {
        let Self {
            mut proc,
            id,
            operator_port,
            sidecar_port,
            store,
            files,
        } = self;
        stop(&mut proc);
        Self::start_with(&id, files, store, operator_port, sidecar_port)
    }

    /// Runs `sigil ARGS` as the operator `who`: (exit code, stdout, stderr).
    pub fn sigil(&self, who: &IdentityFiles, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(bin("sigil"))
            .args(args)
            .env("SIGIL_SERVER", format!("127.0.0.1:{}", self.operator_port))
            .env("SIGIL_CONTROL_ID", &self.id)
            .env("SIGIL_CERT", &who.cert)
            .env("SIGIL_KEY", &who.key)
            .env("SIGIL_BUNDLE_DIR", &who.bundle_dir)
            .output()
            .expect("run sigil");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `sigil apply -f` of `yaml` written to `file`; panics with the output unless it exits 0.
    pub fn apply(&self, who: &IdentityFiles, file: &Path, yaml: &str) -> String {
        std::fs::write(file, yaml).expect("write resource file");
        let (code, out, err) = self.sigil(who, &["apply", "-f", file.to_str().expect("utf-8")]);
        assert_eq!(
            code,
            Some(0),
            "sigil apply failed: {out}{err}\n{}",
            self.proc.log()
        );
        out
    }
}

/// One keep-alive HTTP/1.1 GET on `s`; the status, or None if the connection failed.
pub fn get(s: &mut TcpStream, path: &str) -> Option<u16> {
    sigil_testkit::http::get(s, path).map(|(status, _)| status)
}

/// A fresh connection to a loopback port, one request: the status, or None.
pub fn get_once(port: u16, path: &str) -> Option<u16> {
    sigil_testkit::http::get_once(port, path).map(|(status, _)| status)
}

/// A Workload `b` (`target`, reachable at 127.0.0.1:`b_port`) and a Policy `b-web` letting
/// `callers` GET `/orders` on `web_port`, and the first caller `/admin` too if `admin`: the
/// control-plane tests' resources.
pub fn web_resources(
    callers: &[&str],
    target: &str,
    b_port: u16,
    web_port: u16,
    admin: bool,
) -> String {
    let first = callers[0];
    let callers = callers.join(", ");
    let admin = if admin {
        format!(
            "\n        - {{name: admin, match: {{path: {{prefix: /admin}}}}, allow: [{first}]}}"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: b, owner: team-b, purpose: the b service}}
spec: {{spiffeId: {target}, environment: test, addresses: [\"127.0.0.1:{b_port}\"]}}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: b-web, owner: team-b, purpose: who may call b}}
spec:
  target: {target}
  ports:
    - port: {web_port}
      routes:
        - {{name: orders, match: {{path: {{prefix: /orders}}}}, allow: [{callers}]}}{admin}
"
    )
}

/// A TCP relay on loopback standing for a network path the test controls: where it leads
/// can change, it can hold every byte back (a partition that keeps connections open), and
/// it can cut every connection it carries. Ended on drop.
pub struct Relay {
    pub port: u16,
    state: Arc<RelayState>,
}

struct RelayState {
    target: Mutex<u16>,
    paused: std::sync::atomic::AtomicBool,
    stopping: std::sync::atomic::AtomicBool,
    /// Both ends of every connection carried, for `cut`.
    conns: Mutex<Vec<TcpStream>>,
}

impl Relay {
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let state = Arc::new(RelayState {
            target: Mutex::new(target),
            paused: Default::default(),
            stopping: Default::default(),
            conns: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(down) = conn else { continue };
                let target = *s.target.lock().expect("relay lock");
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let pair = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                );
                let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = pair else {
                    continue;
                };
                s.conns.lock().expect("relay lock").extend([d3, u3]);
                let (s1, s2) = (s.clone(), s.clone());
                std::thread::spawn(move || pipe(down, u2, &s1));
                std::thread::spawn(move || pipe(up, d2, &s2));
            }
        });
        Self { port, state }
    }

    /// New connections go to `target` from now on.
    pub fn set_target(&self, target: u16) {
        *self.state.target.lock().expect("relay lock") = target;
    }

    /// Holds back (true) or lets through (false) the bytes of every connection.
    pub fn pause(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::Relaxed);
    }

    /// Closes every connection carried so far.
    pub fn cut(&self) {
        for c in self.state.conns.lock().expect("relay lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, state: &RelayState) {
    use std::io::Write;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.paused.load(Ordering::Relaxed) && !state.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        self.cut();
        // Wakes the accept loop so that it sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The TLS configs a sidecar with `id`'s SVID from `ca` would use (the sidecar's own code,
/// `sigil_filters::tls`), trusting `ca` alone: for in-test stand-ins of sidecars and control
/// planes, and for clients that must speak to a sidecar as a peer sidecar does.
pub struct SidecarTls {
    identity: sigil_filters::LocalIdentity,
    bundles: Arc<sigil_filters::TrustBundles>,
}

impl SidecarTls {
    pub fn new(ca: &Ca, id: &str) -> Self {
        let svid = ca.svid(id);
        let identity = sigil_filters::LocalIdentity::from_pem(
            svid.chain_pem().as_bytes(),
            svid.key_pem().as_bytes(),
            rustls::pki_types::UnixTime::now(),
            None,
            &sigil_filters::tls::provider(),
        )
        .expect("a fresh SVID is valid");
        let mut bundles = sigil_filters::TrustBundles::new();
        let td = sigil_config::TrustDomain::parse(ca.trust_domain()).expect("a trust domain");
        bundles
            .insert_pem(&td, ca.bundle_pem().as_bytes())
            .expect("the CA's bundle");
        Self {
            identity,
            bundles: Arc::new(bundles),
        }
    }

    /// The inbound side: presents the SVID, verifies the client's.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        sigil_filters::tls::server_config(
            &self.identity,
            self.bundles.clone(),
            Arc::default(),
            sigil_filters::tls::provider(),
        )
    }

    /// The outbound side towards `expected`, offering `carries` by ALPN.
    pub fn client(
        &self,
        expected: &str,
        carries: sigil_filters::tls::Carries,
    ) -> Arc<rustls::ClientConfig> {
        sigil_filters::tls::client_config(
            &self.identity,
            self.bundles.clone(),
            Arc::default(),
            sigil_filters::tls::provider(),
            sigil_config::SpiffeId::parse(expected).expect("a SPIFFE ID"),
            carries,
        )
    }
}

/// Serves HTTP/2 over TLS with `config` on a free loopback port, each request answered by
/// `handler`, on `rt` until it is dropped: the server of the in-test stand-ins for a peer
/// sidecar or a control plane. Returns the port.
pub fn serve_http2_tls<H, Fut, B>(
    rt: &tokio::runtime::Runtime,
    config: Arc<rustls::ServerConfig>,
    handler: H,
) -> u16
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a loopback port");
    let port = listener.local_addr().expect("bound").port();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    port
}
