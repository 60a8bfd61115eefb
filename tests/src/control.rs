//! The control plane and its store: `sigil-control` as a child process, the `sigil` CLI
//! pointed at it, and a real etcd server for the replicated store.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sigil_testkit::Ca;

use crate::{bin, free_port, wait_for_port, write_identity, IdentityFiles, Proc};

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
    /// More `sigil-control` arguments (`--ca-dir DIR`), kept across restarts.
    pub extra: Vec<String>,
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
        Self::start_named(
            dir,
            ca,
            id,
            "control",
            StoreAt::Dir(dir.join("control-data")),
        )
    }

    /// Starts `id` with an SVID from `ca` (files `<name>.*` in `dir`) on `store`: one of
    /// several replicas, or a control plane on etcd.
    pub fn start_named(dir: &Path, ca: &Ca, id: &str, name: &str, store: StoreAt) -> Self {
        Self::start_with(
            id,
            write_identity(dir, name, ca, id, &[ca]),
            store,
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
        Self::start_with_args(id, files, store, operator_port, sidecar_port, Vec::new())
    }

    /// `start_with`, with more arguments (`--ca-dir DIR`).
    pub fn start_with_args(
        id: &str,
        files: IdentityFiles,
        store: StoreAt,
        operator_port: u16,
        sidecar_port: u16,
        extra: Vec<String>,
    ) -> Self {
        let mut cmd = Self::command(id, &files, &store, operator_port, sidecar_port);
        cmd.args(&extra);
        let proc = Proc::spawn("sigil-control", &mut cmd);
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
            extra,
        }
    }

    /// The `sigil-control` command line for `id` with `files` as its SVID and `store`, on
    /// these loopback ports; operators are `spiffe://<td>/ops/*`.
    pub fn command(
        id: &str,
        files: &IdentityFiles,
        store: &StoreAt,
        operator_port: u16,
        sidecar_port: u16,
    ) -> Command {
        let td = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .expect("a SPIFFE ID");
        let mut cmd = Command::new(bin("sigil-control"));
        cmd.args(store.args())
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg("--bundle-dir")
            .arg(&files.bundle_dir)
            .args(["--operator", &format!("spiffe://{td}/ops/*")])
            .args(["--operator-listen", &format!("127.0.0.1:{operator_port}")])
            .args(["--sidecar-listen", &format!("127.0.0.1:{sidecar_port}")]);
        cmd
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
            extra,
        } = self;
        stop(&mut proc);
        Self::start_with_args(&id, files, store, operator_port, sidecar_port, extra)
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
