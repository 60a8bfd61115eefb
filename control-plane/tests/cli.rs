//! The `sigil` binary as an operator runs it: validating resource files and asking what a
//! sidecar would decide.

use std::path::Path;
use std::process::Command;

const WEB: &str = "spiffe://example.org/ns/prod/sa/web";
const PAY: &str = "spiffe://example.org/ns/prod/sa/payments";

/// Runs `cmd` to its end: (exit code, stdout, stderr).
fn output(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("run the command");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sigil(args: &[&str]) -> (Option<i32>, String, String) {
    output(Command::new(env!("CARGO_BIN_EXE_sigil")).args(args))
}

fn resources() -> String {
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
      routes:
        - {{name: pay, match: {{methods: [POST], path: {{prefix: /pay}}}}, allow: [{WEB}]}}
        - {{name: audit, match: {{path: {{prefix: /pay}}}}, deny: [{WEB}], mode: dry-run}}
        - {{name: promo, match: {{path: {{exact: /promo}}}}, allow: [{WEB}], expiresAt: 2026-01-01T00:00:00Z}}
    - port: 5432
      protocol: tcp
      rules: [{{name: db, allow: [\"spiffe://example.org/ns/batch/*\"]}}]
"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sigil-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn validate_reports_every_resource_or_every_problem_with_file_and_line() {
    let d = tempdir("validate");
    let good = write(&d, "payments.yaml", &resources());
    let (code, out, err) = sigil(&["validate", "-f", &good]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("Workload/payments: valid") && out.contains("Policy/payments-api: valid"),
        "{out}"
    );
    // Two broken files in a directory: both reported, nothing accepted.
    let bad = d.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    write(
        &bad,
        "a.yaml",
        &resources().replace("environment: prod", "env: prod"),
    );
    write(
        &bad,
        "b.yaml",
        &resources().replace("sa/web]}", "sa//web]}"),
    );
    write(&bad, ".hidden.yaml", "not: yaml: at: all");
    let (code, out, err) = sigil(&["validate", "-f", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains("a.yaml:4:") && err.contains("env"), "{err}");
    assert!(
        err.contains("b.yaml:14:") && err.contains("empty segment"),
        "{err}"
    );
    assert!(err.contains("2 problem(s)"), "{err}");
    let (code, _, err) = sigil(&["validate"]);
    assert_eq!(code, Some(2), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn policy_test_gives_the_sidecars_verdict_and_rule() {
    let d = tempdir("policy-test");
    let f = write(&d, "payments.yaml", &resources());
    let ask = |extra: &[&str]| {
        let mut args = vec!["policy", "test", "-f", &f, "--to", PAY];
        args.extend_from_slice(extra);
        sigil(&args)
    };
    // Allowed route, with the dry-run rule that would deny it.
    let (code, out, err) = ask(&[
        "--from", WEB, "--port", "8080", "--method", "POST", "--path", "/pay/7",
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("ALLOW: policy payments-api rule pay (allow)"),
        "{out}"
    );
    assert!(
        out.contains("dry-run: would be denied by policy payments-api rule audit"),
        "{out}"
    );
    // Wrong method: default deny, exit 1.
    let (code, out, _) = ask(&["--from", WEB, "--port", "8080", "--path", "/pay/7"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("DENY: port 8080: no rule allows this peer (default deny)"),
        "{out}"
    );
    // Normalized as a sidecar normalizes: a dot-segment escape is judged on /admin.
    let (code, out, _) = ask(&[
        "--from",
        WEB,
        "--port",
        "8080",
        "--method",
        "POST",
        "--path",
        "/pay/%2e%2e/admin",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("normalized: /admin"), "{out}");
    // A target the sidecar refuses outright.
    let (code, _, err) = ask(&["--from", WEB, "--port", "8080", "--path", "/pay%2Fx"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("400"), "{err}");
    // Expiry judged at --at.
    for (at, want) in [("2025-12-31T23:59:59Z", 0), ("2026-01-01T00:00:01Z", 1)] {
        let promo = [
            "--from", WEB, "--port", "8080", "--path", "/promo", "--at", at,
        ];
        let (code, out, _) = ask(&promo);
        assert_eq!(code, Some(want), "at {at}: {out}");
    }
    // A tcp port is decided per connection, by prefix pattern.
    let (code, out, _) = ask(&[
        "--from",
        "spiffe://example.org/ns/batch/sa/etl",
        "--port",
        "5432",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("per connection") && out.contains("rule db (allow)"),
        "{out}"
    );
    let (code, _, _) = ask(&["--from", WEB, "--port", "5432"]);
    assert_eq!(code, Some(1));
    // A workload no policy targets: mTLS alone admits.
    let (code, out, _) = sigil(&[
        "policy", "test", "-f", &f, "--to", WEB, "--from", PAY, "--port", "80",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no policy targets this workload"), "{out}");
    // Bad arguments name themselves.
    let (code, _, err) = ask(&["--from", "http://x", "--port", "8080"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--from"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn validate_checks_trust_bundle_certificates() {
    let dir = tempdir("bundles");
    let ca = sigil_testkit::Ca::new("partner.org");
    let indent = |pem: &str| -> String { pem.lines().map(|l| format!("    {l}\n")).collect() };
    let bundle = |name: &str, pem: &str| {
        format!(
            "apiVersion: sigil.dev/v1\nkind: TrustBundle\nmetadata: {{name: {name}, owner: sec, purpose: federation}}\nspec:\n  trustDomain: partner.org\n  pem: |\n{}",
            indent(pem)
        )
    };
    let good = write(&dir, "good.yaml", &bundle("partner", &ca.bundle_pem()));
    let (code, out, err) = sigil(&["validate", "-f", &good]);
    assert_eq!(code, Some(0), "{out}{err}");
    // A CERTIFICATE block that is not a certificate: named by file and resource.
    let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let bad = write(&dir, "bad.yaml", &bundle("broken", broken));
    let (code, _, err) = sigil(&["validate", "-f", &bad]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("bad.yaml: TrustBundle/broken: bundle for partner.org"),
        "{err}"
    );
    // No certificate at all: refused by the loader, with the line.
    let none = write(&dir, "none.yaml", &bundle("none", "just text"));
    let (code, _, err) = sigil(&["validate", "-f", &none]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("none.yaml:") && err.contains("no CERTIFICATE block"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn every_command_has_its_own_help_and_usage_errors_are_short() {
    // apply's help shows apply's flags, the connection's, and their environment variables.
    let (code, out, err) = sigil(&["apply", "--help"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("Usage: sigil apply"), "{out}");
    for flag in [
        "-f, --file <PATH>",
        "--dry-run",
        "--server <ADDR>",
        "--control-id <ID>",
        "--cert <FILE>",
        "--key <FILE>",
        "--bundle-dir <DIR>",
        "SIGIL_CONTROL_ID",
    ] {
        assert!(out.contains(flag), "no {flag} in:\n{out}");
    }
    // Every command answers --help with its own usage.
    for command in [
        &["demo"][..],
        &["validate"],
        &["policy", "test"],
        &["get"],
        &["delete"],
        &["status"],
        &["metrics"],
        &["revoke"],
        &["unrevoke"],
        &["version"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let (code, out, err) = sigil(&args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        let usage = format!("Usage: sigil {}", command.join(" "));
        assert!(out.contains(&usage), "{args:?}:\n{out}");
    }
    // An unknown flag: one line saying so, the command's usage, the hint; exit 2.
    let (code, out, err) = sigil(&["apply", "--no-such-flag", "-f", "x.yaml"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("error: unexpected argument '--no-such-flag'"),
        "{err}"
    );
    assert!(
        err.contains("Usage: sigil apply") && err.contains("--help"),
        "{err}"
    );
    assert!(err.lines().count() <= 6, "not short:\n{err}");
    // A missing connection setting is a usage error of the command too.
    let (code, _, err) = output(
        Command::new(env!("CARGO_BIN_EXE_sigil"))
            .arg("status")
            .env_remove("SIGIL_CONTROL_ID"),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--control-id (or SIGIL_CONTROL_ID) is required")
            && err.contains("Usage: sigil status"),
        "{err}"
    );
    // Versions, and bare `sigil` (help, exit 0).
    let version = format!("sigil {}", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-V"], &["version"]] {
        let (code, out, _) = sigil(args);
        assert_eq!((code, out.trim()), (Some(0), version.as_str()), "{args:?}");
    }
    let (code, out, _) = sigil(&[]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("Usage: sigil") && out.contains("apply"),
        "{out}"
    );
}

#[test]
fn sigil_control_help_and_usage_errors() {
    let control =
        |args: &[&str]| output(Command::new(env!("CARGO_BIN_EXE_sigil-control")).args(args));
    let (code, out, _) = control(&["--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--data-dir",
        "--store",
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
        "--etcd-insecure",
        "--cert",
        "--key",
        "--bundle-dir",
        "--operator <PATTERN>",
        "--operator-listen",
        "--sidecar-listen",
        "SIGIL_LOG",
    ] {
        assert!(out.contains(flag), "no {flag} in:\n{out}");
    }
    let (code, out, _) = control(&["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out.trim(),
        format!("sigil-control {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, _, err) = control(&["--no-such-flag"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("error: unexpected argument '--no-such-flag'") && err.lines().count() <= 10,
        "{err}"
    );
    // etcd without a way to reach it: the message names both ways.
    let (code, _, err) = control(&["--store", "etcd://127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--etcd-ca, --etcd-cert and --etcd-key") && err.contains("--etcd-insecure"),
        "{err}"
    );
    let (code, _, err) = control(&["--data-dir", "d", "--store", "etcd://127.0.0.1:1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn ca_init_makes_a_private_key_and_a_bundle_and_never_overwrites_them() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempdir("ca-init");
    let dir = base.join("ca");
    let d = dir.to_string_lossy().into_owned();
    let (code, out, err) = sigil(&["ca", "init", "--dir", &d, "--trust-domain", "example.org"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(
        !out.contains("PRIVATE KEY") && !err.contains("PRIVATE KEY"),
        "the key is never printed: {out}{err}"
    );
    assert!(
        out.contains(&dir.join("ca.crt").display().to_string()),
        "{out}"
    );
    // The certificate is a trust bundle `sigil validate` accepts.
    let bundle = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let indented: String = bundle.lines().map(|l| format!("    {l}\n")).collect();
    let tb = write(
        &base,
        "tb.yaml",
        &format!(
            "apiVersion: sigil.dev/v1\nkind: TrustBundle\nmetadata: {{name: example, owner: sec, purpose: test}}\nspec:\n  trustDomain: example.org\n  pem: |\n{indented}"
        ),
    );
    let (code, out, err) = sigil(&["validate", "-f", &tb]);
    assert_eq!(code, Some(0), "{out}{err}");

    let (code, _, err) = sigil(&["ca", "init", "--dir", &d, "--trust-domain", "example.org"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), key);

    let (code, _, err) = sigil(&["ca", "init", "--dir", &d, "--trust-domain", "Not A Domain"]);
    assert_eq!(code, Some(2), "{err}");

    // The next CA beside it, its key as private; one rotation at a time.
    let (code, out, err) = sigil(&["ca", "rotate", "--dir", &d]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(mode(&dir.join("next.key")), 0o600);
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), key);
    let (code, _, err) = sigil(&["ca", "rotate", "--dir", &d]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("next.crt") && err.contains("a rotation is under way"),
        "{err}"
    );
    let missing = base.join("nothing").display().to_string();
    let (code, _, err) = sigil(&["ca", "rotate", "--dir", &missing]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nothing/ca.key"), "{err}");
    std::fs::remove_dir_all(&base).unwrap();
}
