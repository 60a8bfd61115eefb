//! What the issuance tests share: a CA made by `sigil ca init`, a control plane issuing from
//! it, join tokens and Workload documents.

use std::time::Duration;

use sigil_testkit::Ca;

use crate::*;

/// A CA made by `sigil ca init` in `d/ca`, a bootstrap CA for the control plane's and the
/// operator's own SVIDs, and the operator's SVID files; the root the issued SVIDs chain to
/// (PEM): the CA's own certificate, or its upstream root.
pub struct Setup {
    pub boot: Ca,
    pub ca_dir: std::path::PathBuf,
    pub issuing_ca: String,
    pub ops: IdentityFiles,
}

impl Setup {
    pub fn new(d: &std::path::Path) -> Self {
        Self::made_with(d, &[])
    }

    /// The issuing CA an intermediate signed by an operator's root that openssl makes
    /// (`up.crt`, `up.key`); `issuing_ca` is then that root.
    pub fn with_upstream(d: &std::path::Path) -> Self {
        let (cert, key) = (d.join("up.crt"), d.join("up.key"));
        let (code, out) = run_status(
            std::process::Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-384",
                ])
                .args([
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/O=Example Corp/CN=Example Corp Root",
                ])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            Duration::from_secs(30),
        );
        assert_eq!(code, Some(0), "openssl: {out}");
        let mut setup = Self::made_with(
            d,
            &[
                "--lifetime".as_ref(),
                "24h".as_ref(),
                "--upstream-cert".as_ref(),
                cert.as_os_str(),
                "--upstream-key".as_ref(),
                key.as_os_str(),
            ],
        );
        setup.issuing_ca = std::fs::read_to_string(&cert).unwrap();
        setup
    }

    fn made_with(d: &std::path::Path, init_args: &[&std::ffi::OsStr]) -> Self {
        let boot = Ca::new("example.org");
        let ca_dir = d.join("ca");
        let (code, out) = run_status(
            std::process::Command::new(bin("sigil"))
                .args(["ca", "init", "--trust-domain", "example.org", "--dir"])
                .arg(&ca_dir)
                .args(init_args),
            Duration::from_secs(30),
        );
        assert_eq!(code, Some(0), "{out}");
        let issuing_ca = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
        let ops = write_identity(d, "ops", &boot, "spiffe://example.org/ops/alice", &[&boot]);
        Self {
            boot,
            ca_dir,
            issuing_ca,
            ops,
        }
    }

    /// A control plane `name` on `store` issuing with the CA, trusting SVIDs of both CAs.
    pub fn control_plane(&self, d: &std::path::Path, name: &str, store: StoreAt) -> ControlPlane {
        // Its bundle file holds the bootstrap CA only: the issuing CAs come from the CA
        // directory, and leave the bundle with a rotation.
        let files = write_identity(d, name, &self.boot, CONTROL, &[&self.boot]);
        let ca_arg = vec!["--ca-dir".to_string(), self.ca_dir.display().to_string()];
        ControlPlane::start_with_args(CONTROL, files, store, free_port(), free_port(), ca_arg)
    }
}

/// `sigil token create` for `workload`; the token (the first line printed).
pub fn token(cp: &ControlPlane, ops: &IdentityFiles, workload: &str, ttl: &str) -> String {
    let (code, out, err) = cp.sigil(
        ops,
        &["token", "create", "--workload", workload, "--ttl", ttl],
    );
    assert_eq!(code, Some(0), "sigil token create: {out}{err}");
    out.lines().next().expect("the token").to_string()
}

/// A Workload document: `name`, owned by team-`name`, with `extra` spec lines.
pub fn workload_yaml(name: &str, id: &str, extra: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1\nkind: Workload\nmetadata: {{name: {name}, owner: team-{name}, purpose: test}}\n\
         spec:\n  spiffeId: {id}\n  environment: test\n{extra}"
    )
}

/// Workload B (one-minute SVIDs) applied; A's file SVID of the bootstrap CA and B's bundle
/// directory, both trusting both CAs; a join token for B in `d/b.token`. Returns A's and B's
/// identity files (B uses only its bundle directory) and the token file.
pub fn b_with_token(
    d: &std::path::Path,
    setup: &Setup,
    cp: &ControlPlane,
) -> (IdentityFiles, IdentityFiles, std::path::PathBuf) {
    cp.apply(
        &setup.ops,
        &d.join("b.yaml"),
        &workload_yaml("b", B, "  svidTtl: 1m\n"),
    );
    let both = setup.boot.bundle_pem() + &setup.issuing_ca;
    let fa = write_identity(d, "a", &setup.boot, A, &[&setup.boot]);
    let fb = write_identity(d, "b", &setup.boot, B, &[&setup.boot]);
    for f in [&fa, &fb] {
        std::fs::write(f.bundle_dir.join("example.org.pem"), &both).unwrap();
    }
    let token_file = d.join("b.token");
    std::fs::write(&token_file, token(cp, &setup.ops, "b", "10m")).unwrap();
    (fa, fb, token_file)
}
