//! `sigil-control` and the `sigil` CLI as real processes: apply (dry run, unchanged, invalid),
//! get, delete, operator authentication, and state kept across a control-plane restart.

use std::process::Command;
use std::time::Duration;

use sigil_e2e::{free_port, run_status, write_identity, ControlPlane, StoreAt, TempDir};
use sigil_e2e::{ALICE, CONTROL};
use sigil_testkit::Ca;

const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const PAY: &str = "spiffe://example.org/ns/prod/sa/payments";

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
    let cp = ControlPlane::start(CONTROL, control, d.join("data"), free_port(), free_port());
    let port = cp.operator_port;
    let file = d.join("payments.yaml");
    std::fs::write(&file, resources("/pay")).unwrap();
    let f = file.to_str().unwrap();

    let (code, out, err) = cp.sigil(&alice, &["apply", "-f", f]);
    assert_eq!(code, Some(0), "{out}{err}\n{}", cp.proc.log());
    assert!(
        out.contains("created Workload/payments")
            && out.contains("created Policy/payments-api")
            && out.contains("version 1"),
        "{out}"
    );
    let (_, out, _) = cp.sigil(&alice, &["apply", "-f", f]);
    assert!(
        out.contains("unchanged Policy/payments-api") && out.contains("version 1"),
        "{out}"
    );

    // Dry run: the change is shown, nothing is written.
    std::fs::write(&file, resources("/pay/v2")).unwrap();
    let (code, out, _) = cp.sigil(&alice, &["apply", "-f", f, "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("updated Policy/payments-api")
            && out.contains("unchanged Workload/payments")
            && out.contains("dry run: nothing written"),
        "{out}"
    );
    let (_, out, _) = cp.sigil(&alice, &["get", "Policy", "payments-api"]);
    assert!(
        out.contains("prefix: /pay}") && !out.contains("/pay/v2"),
        "{out}"
    );

    // An invalid file is refused before anything is sent, with file:line.
    std::fs::write(&file, resources("/pay").replace("sa/web]", "sa//web]")).unwrap();
    let (code, _, err) = cp.sigil(&alice, &["apply", "-f", f]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("{f}:13:")) && err.contains("empty segment"),
        "{err}"
    );

    // get: everything, one kind, one resource, a missing one.
    let (code, out, _) = cp.sigil(&alice, &["get"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("# Policy/payments-api (version 1)") && out.contains("# Workload/payments"),
        "{out}"
    );
    let (code, _, err) = cp.sigil(&alice, &["get", "Policy", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Policy/nope: not found"), "{err}");

    let (code, out, _) = cp.sigil(&alice, &["delete", "Workload", "payments"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("deleted Workload/payments") && out.contains("version 2"),
        "{out}"
    );

    // A valid SVID that is not an operator's, and a server that is not the expected one.
    let (code, _, err) = cp.sigil(&web, &["get"]);
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
    let cp = cp.restart();
    let (code, out, _) = cp.sigil(&alice, &["get"]);
    assert_eq!(code, Some(0), "{}", cp.proc.log());
    assert!(
        out.contains("# Policy/payments-api (version 1)") && !out.contains("Workload/payments"),
        "{out}"
    );
    assert!(cp.proc.log().contains("at version 2"), "{}", cp.proc.log());
}

/// sigil-control logs as the sidecar does: tracing lines with a timestamp and a level on
/// stderr, filtered by SIGIL_LOG. An etcd that is not there gives a WARN line (plaintext)
/// and then the ERROR it exits 1 with.
#[test]
fn sigil_control_logs_timestamped_levelled_lines_filtered_by_sigil_log() {
    let dir = TempDir::new("control-log");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let control = write_identity(d, "control", &ca, CONTROL, &[&ca]);
    let run = |level: Option<&str>| {
        // No etcd listens on the port: it exits 1 after saying why.
        let store = StoreAt::Etcd(free_port(), None);
        let mut cmd = ControlPlane::command(CONTROL, &control, &store, free_port(), free_port());
        if let Some(level) = level {
            cmd.env("SIGIL_LOG", level);
        }
        run_status(&mut cmd, Duration::from_secs(30))
    };
    // `2026-05-01T10:00:00.123456Z  WARN sigil_control: …`
    let line_at = |out: &str, level: &str, text: &str| {
        out.lines().any(|l| {
            let (time, rest) = l.split_once(' ').unwrap_or_default();
            time.len() > 20
                && time.as_bytes()[4] == b'-'
                && time.contains('T')
                && time.ends_with('Z')
                && rest.trim_start().starts_with(level)
                && l.contains(text)
        })
    };
    let (code, out) = run(None);
    assert_eq!(code, Some(1), "{out}");
    assert!(line_at(&out, "WARN", "plaintext to etcd"), "{out}");
    assert!(line_at(&out, "ERROR", "store: etcd"), "{out}");
    let (code, out) = run(Some("error"));
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains("plaintext to etcd"), "{out}");
    assert!(line_at(&out, "ERROR", "store: etcd"), "{out}");
}
