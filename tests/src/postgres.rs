//! A real PostgreSQL server (Debian's postgresql) on loopback, for the audit store that
//! several control-plane replicas share: TLS only (no `host` line in pg_hba.conf takes
//! plaintext), clients authenticated by a certificate from its own CA, as a production
//! database would be set up. Run as the `postgres` user, since it refuses to run as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sigil_testkit::{Ca, SvidSpec};

use crate::{free_port, in_ci, run, wait_for_port, Proc};

/// The directory holding `initdb` and `postgres` (the newest version installed), if any.
fn server_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

pub struct PgServer {
    pub proc: Proc,
    pub port: u16,
    /// The CA of the server's certificate (`--audit-pg-ca`).
    pub ca_file: PathBuf,
    /// A client certificate and key it accepts (`--audit-pg-cert`, `--audit-pg-key`).
    pub client: (PathBuf, PathBuf),
    /// Its binaries (psql among them).
    bin: PathBuf,
}

impl PgServer {
    /// Starts a fresh server with its data under `dir`. Outside CI, None when PostgreSQL's
    /// server is not installed (after saying why); in CI that fails the test.
    pub fn start(dir: &Path, test: &str) -> Option<Self> {
        let Some(bin) = server_bin_dir() else {
            assert!(
                !in_ci(),
                "{test}: PostgreSQL's server is required in CI; scripts/setup.sh installs it"
            );
            eprintln!("SKIP {test}: PostgreSQL's server not installed (run scripts/setup.sh)");
            return None;
        };
        let data = dir.join("pgdata");
        let tls = dir.join("pg-tls");
        std::fs::create_dir_all(&tls).expect("create pg-tls");
        let ca = Ca::new("pg.test");
        let ca_file = tls.join("ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem()).expect("write the PostgreSQL CA");
        let client = ca
            .svid("spiffe://pg.test/sigil-control")
            .write(&tls, "client");

        std::fs::create_dir_all(&data).expect("create pgdata");
        chown_postgres(&data);
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .expect("chmod pgdata");
        let (ok, out) = run(
            as_postgres(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-U",
                "sigil",
                "-E",
                "UTF8",
                "--locale=C",
                "--auth=trust",
            ]),
            Duration::from_secs(120),
        );
        assert!(ok, "initdb: {out}");
        let server = ca.issue(
            &SvidSpec::new("spiffe://pg.test/server")
                .uris(&[])
                .ips(&[[127, 0, 0, 1].into()]),
        );
        let (cert, key) = server.write(&data, "server");
        std::fs::copy(&ca_file, data.join("ca.pem")).expect("copy the CA");
        // Any certificate of its own CA is user sigil; the socket in pgdata is for nobody.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 cert clientname=DN map=sigil\n",
        )
        .expect("write pg_hba.conf");
        std::fs::write(data.join("pg_ident.conf"), "sigil /^.*$ sigil\n")
            .expect("write pg_ident.conf");
        for f in [&cert, &key, &data.join("ca.pem")] {
            chown_postgres(f);
        }
        chown_postgres(&data.join("pg_hba.conf"));
        chown_postgres(&data.join("pg_ident.conf"));

        let port = free_port();
        let mut cmd = as_postgres(&bin.join("postgres"));
        cmd.arg("-D").arg(&data).args(["-p", &port.to_string()]);
        for (k, v) in [
            ("listen_addresses", "127.0.0.1".into()),
            ("unix_socket_directories", data.display().to_string()),
            ("ssl", "on".into()),
            ("ssl_cert_file", cert.display().to_string()),
            ("ssl_key_file", key.display().to_string()),
            ("ssl_ca_file", data.join("ca.pem").display().to_string()),
            ("fsync", "on".into()),
        ] {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let proc = Proc::spawn("postgres", &mut cmd);
        wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30));
        // Listening comes before accepting: "the database system is starting up" meanwhile.
        crate::poll(Duration::from_secs(30), Duration::from_millis(100), || {
            let (ok, out) = run(
                Command::new(bin.join("pg_isready")).args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ]),
                Duration::from_secs(10),
            );
            ok.then_some(()).ok_or(out)
        });
        Some(Self {
            proc,
            port,
            ca_file,
            client,
            bin,
        })
    }

    /// Runs `sql` with psql over TLS as the audit store's user; panics unless it succeeds.
    /// Its output.
    pub fn psql(&self, sql: &str) -> String {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=sigil dbname=postgres sslmode=verify-full \
             sslrootcert={} sslcert={} sslkey={}",
            self.port,
            self.ca_file.display(),
            self.client.0.display(),
            self.client.1.display()
        );
        let (ok, out) = run(
            Command::new(self.bin.join("psql"))
                .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-At", "-c", sql])
                .arg(conninfo),
            Duration::from_secs(30),
        );
        assert!(ok, "psql {sql}: {out}");
        out
    }

    /// Its database as `--audit-db` takes it.
    pub fn url(&self) -> String {
        format!("postgresql://sigil@127.0.0.1:{}/postgres", self.port)
    }

    /// The `sigil-control` arguments that keep audit records here.
    pub fn audit_args(&self) -> Vec<String> {
        let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
        vec![
            "--audit-db".into(),
            self.url(),
            "--audit-pg-ca".into(),
            path(&self.ca_file),
            "--audit-pg-cert".into(),
            path(&self.client.0),
            "--audit-pg-key".into(),
            path(&self.client.1),
        ]
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT): SIGTERM would wait for every client to leave.
        self.proc.signal(libc::SIGINT);
        self.proc.terminate(Duration::from_secs(10));
    }
}

/// `program` run as the `postgres` user (setpriv execs it: the PID is the server's).
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ])
    .arg(program)
    .env("LC_ALL", "C");
    c
}

fn chown_postgres(path: &Path) {
    let (ok, out) = run(
        Command::new("chown").arg("postgres:postgres").arg(path),
        Duration::from_secs(10),
    );
    assert!(ok, "chown postgres {}: {out}", path.display());
}
