//! Helpers for the end-to-end tests: locate the built binaries, run them as children that are
//! always ended by PID, and lay out identities and configs generated at test time. Each
//! concern has its module; everything is re-exported here, so a test says
//! `use sigil_e2e::*`.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod control;
mod http;
mod identity;
mod issuing;
mod metrics;
mod pair;
mod postgres;
mod relay;
mod resources;
mod sidecar;
mod steady;
mod tls;
mod wait;

pub use control::*;
pub use http::*;
pub use identity::*;
pub use issuing::*;
pub use metrics::*;
pub use pair::*;
pub use postgres::*;
pub use relay::*;
pub use resources::*;
pub use sidecar::*;
pub use steady::*;
pub use tls::*;
pub use wait::*;

/// The workload identities most tests use: A calls B; C is a third party, allowed or not.
pub const A: &str = "spiffe://example.org/ns/demo/sa/a";
pub const B: &str = "spiffe://example.org/ns/demo/sa/b";
pub const C: &str = "spiffe://example.org/ns/demo/sa/c";
/// The control plane's own ID, and the operator the tests run `sigil` as.
pub const CONTROL: &str = "spiffe://example.org/sigil/control";
pub const ALICE: &str = "spiffe://example.org/ops/alice";

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

/// A free loopback port, for a listener a test starts next. Taken below the kernel's
/// ephemeral range (32768 and up by default, `ip_local_port_range`): a port bound and released
/// there could be taken meanwhile as the source port of any outgoing connection of a test
/// running alongside (seen: an issuance test's flood of connections took a sidecar's port).
/// Each process walks its own slice of 20000–31999, and a port is handed out only if it binds.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 60) * 200;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
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
        poll(timeout, Duration::from_millis(25), || {
            if self.log().contains(needle) {
                return Ok(());
            }
            Err(format!(
                "{}: no {needle:?} in log after {timeout:?}:\n{}",
                self.name,
                self.log()
            ))
        })
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

/// Runs a command to completion with a timeout; returns (success, stdout and stderr).
pub fn run(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let (code, out) = run_status(cmd, timeout);
    (code == Some(0), out)
}

/// Runs `cmd` to its end (panics after `timeout`): its exit code and output.
pub fn run_status(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String) {
    let mut p = Proc::spawn("cmd", cmd);
    let st = poll(timeout, Duration::from_millis(10), || {
        p.try_wait()
            .ok_or_else(|| format!("command timed out: {cmd:?}"))
    });
    // Give the reader threads a moment to drain the pipes.
    std::thread::sleep(Duration::from_millis(20));
    (st.code(), p.log())
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

/// Replaces `path` whole (write a temporary file, rename over), as a config manager would.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename over");
}
