//! An explicit-mode `sigil-proxy` on loopback, configured from the fields of `Sidecar`, and
//! the toy workload it stands in front of.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{bin, free_port, http_get, poll, wait_for_port, IdentityFiles, Proc};

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
    /// `identity.joinTokenFile`: the control plane issues the SVID (the files' cert and key
    /// are then not in the config; their bundle directory is).
    pub join_token_file: Option<PathBuf>,
    /// Serve the SPIFFE Workload API on this socket (`workloadApi.socket`).
    pub workload_api: Option<PathBuf>,
    /// Take the SVID from the Workload API on this socket (`identity.workloadApi`).
    pub svid_from_api: Option<PathBuf>,
    /// The audit stream: spool directory, `whenFull` and `maxBytes` (0: the default).
    pub audit: Option<(PathBuf, &'static str, u64)>,
    /// `audit.requests: all`: a record per allowed HTTP request too.
    pub audit_every_request: bool,
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
            join_token_file: None,
            workload_api: None,
            svid_from_api: None,
            audit: None,
            audit_every_request: false,
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
        // The SVID from the control plane or a Workload API instead of the files.
        let files_lines = format!(
            "    certFile: {}\n    keyFile: {}\n",
            files.cert.display(),
            files.key.display()
        );
        if let Some(token) = &self.join_token_file {
            y = y.replace(
                &files_lines,
                &format!("    joinTokenFile: {}\n", token.display()),
            );
        }
        if let Some(socket) = &self.svid_from_api {
            y = y.replace(
                &files_lines,
                &format!("    workloadApi: \"unix://{}\"\n", socket.display()),
            );
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
        if let Some((spool, when_full, max_bytes)) = &self.audit {
            let max = match max_bytes {
                0 => String::new(),
                n => format!(", maxBytes: {n}"),
            };
            let requests = if self.audit_every_request {
                ", requests: all"
            } else {
                ""
            };
            y += &format!(
                "  audit: {{spoolDir: {}, whenFull: {when_full}{max}{requests}}}\n",
                spool.display()
            );
        }
        if let Some(socket) = &self.workload_api {
            y += &format!("  workloadApi: {{socket: {}}}\n", socket.display());
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
        let admin = self.admin_addr();
        poll(Duration::from_secs(15), Duration::from_millis(25), || {
            TcpStream::connect_timeout(&admin, Duration::from_millis(200))
                .map(drop)
                .map_err(|_| format!("{}: no admin listener after 15 s:\n{}", self.name, p.log()))
        });
        p
    }

    /// `spawn`, then waits for /ready.
    pub fn start(&self, dir: &Path, files: &IdentityFiles) -> Proc {
        let p = self.spawn(dir, files);
        poll(
            Duration::from_secs(15),
            Duration::from_millis(50),
            || match self.admin_get("/ready") {
                Some((200, _)) => Ok(()),
                _ => Err(format!("{} not ready after 15 s:\n{}", self.name, p.log())),
            },
        );
        p
    }

    /// 127.0.0.1:`admin`.
    pub fn admin_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.admin).into()
    }

    /// GET `path` on the admin listener: (status, body), or None if it did not answer.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin_addr(), path)
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
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
