//! `sigil-control` and the `sigil` CLI as real processes: apply (dry run, unchanged, invalid),
//! get, delete, operator authentication, and state kept across a control-plane restart.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::{free_port, wait_for_port, write_identity, IdentityFiles, Proc, TempDir};
use sigil_testkit::Ca;

const CONTROL: &str = "spiffe://example.org/sigil/control";
const ALICE: &str = "spiffe://example.org/ops/alice";
const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const PAY: &str = "spiffe://example.org/ns/prod/sa/payments";

fn start_control(d: &Path, id: &IdentityFiles, port: u16) -> Proc {
    let p = Proc::spawn(
        "sigil-control",
        Command::new(env!("CARGO_BIN_EXE_sigil-control"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .arg("--cert")
            .arg(&id.cert)
            .arg("--key")
            .arg(&id.key)
            .arg("--bundle-dir")
            .arg(&id.bundle_dir)
            .args(["--operator", "spiffe://example.org/ops/*"])
            .args(["--operator-listen", &format!("127.0.0.1:{port}")]),
    );
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    );
    p
}

/// Runs `sigil` as `who`; (exit code, stdout, stderr).
fn sigil(who: &IdentityFiles, port: u16, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(args)
        .env("SIGIL_SERVER", format!("127.0.0.1:{port}"))
        .env("SIGIL_CONTROL_ID", CONTROL)
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

fn resources(route_prefix: &str) -> String {
    format!(
        "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: payments, owner: team-payments, purpose: card payments API}}
spec: {{spiffeId: {PAY}, environment: prod, addresses: [\"10.1.2.3:8080\"]}}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: payments-api, owner: team-payments, purpose: who may call payments}}
spec:
  target: {PAY}
  ports:
    - port: 8080
      routes: [{{name: pay, match: {{path: {{prefix: {route_prefix}}}}}, allow: [{WEB}]}}]
"
    )
}

#[test]
fn operators_apply_get_and_delete_resources_that_survive_a_restart() {
    let dir = TempDir::new("control");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let control = write_identity(d, "control", &ca, CONTROL, &[&ca]);
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let web = write_identity(d, "web", &ca, WEB, &[&ca]);
    let port = free_port();
    let mut cp = start_control(d, &control, port);
    let file = d.join("payments.yaml");
    std::fs::write(&file, resources("/pay")).unwrap();
    let f = file.to_str().unwrap();

    let (code, out, err) = sigil(&alice, port, &["apply", "-f", f]);
    assert_eq!(code, Some(0), "{out}{err}\n{}", cp.log());
    assert!(
        out.contains("created Workload/payments")
            && out.contains("created Policy/payments-api")
            && out.contains("version 1"),
        "{out}"
    );
    let (_, out, _) = sigil(&alice, port, &["apply", "-f", f]);
    assert!(
        out.contains("unchanged Policy/payments-api") && out.contains("version 1"),
        "{out}"
    );

    // Dry run: the change is shown, nothing is written.
    std::fs::write(&file, resources("/pay/v2")).unwrap();
    let (code, out, _) = sigil(&alice, port, &["apply", "-f", f, "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("updated Policy/payments-api")
            && out.contains("unchanged Workload/payments")
            && out.contains("dry run: nothing written"),
        "{out}"
    );
    let (_, out, _) = sigil(&alice, port, &["get", "Policy", "payments-api"]);
    assert!(
        out.contains("prefix: /pay}") && !out.contains("/pay/v2"),
        "{out}"
    );

    // An invalid file is refused before anything is sent, with file:line.
    std::fs::write(&file, resources("/pay").replace("sa/web]", "sa//web]")).unwrap();
    let (code, _, err) = sigil(&alice, port, &["apply", "-f", f]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("{f}:13:")) && err.contains("empty segment"),
        "{err}"
    );

    // get: everything, one kind, one resource, a missing one.
    let (code, out, _) = sigil(&alice, port, &["get"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("# Policy/payments-api (version 1)") && out.contains("# Workload/payments"),
        "{out}"
    );
    let (code, _, err) = sigil(&alice, port, &["get", "Policy", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Policy/nope: not found"), "{err}");

    let (code, out, _) = sigil(&alice, port, &["delete", "Workload", "payments"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("deleted Workload/payments") && out.contains("version 2"),
        "{out}"
    );

    // A valid SVID that is not an operator's, and a server that is not the expected one.
    let (code, _, err) = sigil(&web, port, &["get"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("403") && err.contains("is not an operator"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args([
            "get",
            "--server",
            &format!("127.0.0.1:{port}"),
            "--control-id",
            WEB,
        ])
        .args([
            "--cert",
            alice.cert.to_str().unwrap(),
            "--key",
            alice.key.to_str().unwrap(),
        ])
        .args(["--bundle-dir", alice.bundle_dir.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("TLS with the control plane failed") && err.contains(CONTROL),
        "{err}"
    );

    // Restart: the store keeps what was applied.
    assert_eq!(
        cp.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        cp.log()
    );
    let cp = start_control(d, &control, port);
    let (code, out, _) = sigil(&alice, port, &["get"]);
    assert_eq!(code, Some(0), "{}", cp.log());
    assert!(
        out.contains("# Policy/payments-api (version 1)") && !out.contains("Workload/payments"),
        "{out}"
    );
    assert!(cp.log().contains("at version 2"), "{}", cp.log());
}
