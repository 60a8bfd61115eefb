//! The control plane's store is authenticated and encrypted, and never shared by accident:
//! `sigil-control` speaks TLS with a client certificate to a real etcd started with
//! `--client-cert-auth`, refuses to start on any certificate that does not fit, speaks
//! plaintext only with `--etcd-insecure` (and says so), and refuses a second process on one
//! SQLite `--data-dir`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::*;
use sigil_testkit::Ca;

/// `sigil-control` with `store` and the control plane's own files, expected to exit: its
/// exit code and output.
fn control_exits(d: &Path, ca: &Ca, store: &StoreAt) -> (Option<i32>, String) {
    let files = write_identity(d, "control-x", ca, CONTROL, &[ca]);
    run_status(
        &mut ControlPlane::command(CONTROL, &files, store, free_port(), free_port()),
        Duration::from_secs(30),
    )
}

/// Whether `log` has the WARN line `--etcd-insecure` must write.
fn warns_of_plaintext(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains(" WARN ") && l.contains("plaintext to etcd (--etcd-insecure)"))
}

#[test]
fn etcd_is_reached_over_tls_with_a_client_certificate_and_plaintext_only_when_asked() {
    if !require_tool("etcd", "store-etcd-tls") {
        return;
    }
    let dir = TempDir::new("store-etcd-tls");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let alice = write_identity(d, "alice", &ca, ALICE, &[&ca]);
    let etcd = EtcdServer::start(d);
    let good = etcd.client.clone().expect("a TLS etcd");

    // The right CA, a client certificate etcd's CA signed: it works.
    let cp = ControlPlane::start_named(d, &ca, CONTROL, "control", etcd.store_at(etcd.client_port));
    let out = cp.apply(
        &alice,
        &d.join("w.yaml"),
        &workload("w", "store test", "spiffe://example.org/ns/demo/sa/w", &[]),
    );
    assert!(out.contains("created Workload/w"), "{out}");
    assert!(
        cp.proc.log().contains("store etcd https://127.0.0.1:"),
        "{}",
        cp.proc.log()
    );
    drop(cp);

    // A client certificate from a CA etcd does not trust: etcd refuses it, and sigil-control
    // does not start.
    let stranger = Ca::new("stranger.test");
    let tls = d.join("stranger");
    std::fs::create_dir_all(&tls).unwrap();
    let (cert, key) = stranger
        .svid("spiffe://stranger.test/sigil-control")
        .write(&tls, "client");
    let wrong_client = EtcdClientFiles {
        cert,
        key,
        ..good.clone()
    };
    let (code, out) = control_exits(d, &ca, &StoreAt::Etcd(etcd.client_port, Some(wrong_client)));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("etcd"), "{out}");
    // etcd's certificate checked against a CA that did not sign it: refused too.
    let other_ca = tls.join("other-ca.pem");
    std::fs::write(&other_ca, stranger.bundle_pem()).unwrap();
    let wrong_server = EtcdClientFiles {
        ca: other_ca,
        ..good.clone()
    };
    let (code, out) = control_exits(d, &ca, &StoreAt::Etcd(etcd.client_port, Some(wrong_server)));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("etcd"), "{out}");
    // Plaintext to a TLS etcd: refused by etcd.
    let (code, out) = control_exits(d, &ca, &StoreAt::Etcd(etcd.client_port, None));
    assert_eq!(code, Some(1), "{out}");
    assert!(warns_of_plaintext(&out), "{out}");
    // A key file that is not a key: named, before any connection.
    let not_key = tls.join("not-a-key.pem");
    std::fs::write(&not_key, "hello").unwrap();
    let bad_key = EtcdClientFiles {
        key: not_key.clone(),
        ..good.clone()
    };
    let (code, out) = control_exits(d, &ca, &StoreAt::Etcd(etcd.client_port, Some(bad_key)));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "--etcd-key {}: no PEM PRIVATE KEY block",
            not_key.display()
        )),
        "{out}"
    );

    // Neither TLS files nor --etcd-insecure: a usage error that names both ways.
    let (code, out) = run_status(
        Command::new(bin("sigil-control"))
            .args(["--store", &format!("etcd://127.0.0.1:{}", etcd.client_port)]),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("--etcd-ca, --etcd-cert and --etcd-key") && out.contains("--etcd-insecure"),
        "{out}"
    );
    drop(etcd);

    // A plaintext etcd, with --etcd-insecure: it runs, and warns.
    let plain_dir = d.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = EtcdServer::start_plaintext(&plain_dir);
    let cp = ControlPlane::start_named(
        d,
        &ca,
        CONTROL,
        "control-plain",
        plain.store_at(plain.client_port),
    );
    cp.apply(
        &alice,
        &d.join("w2.yaml"),
        &workload(
            "w2",
            "store test",
            "spiffe://example.org/ns/demo/sa/w2",
            &[],
        ),
    );
    assert!(warns_of_plaintext(&cp.proc.log()), "{}", cp.proc.log());
    drop((cp, plain));
}

#[test]
fn a_second_control_plane_on_one_data_dir_is_refused() {
    let dir = TempDir::new("store-lock");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let data = d.join("control-data");
    let cp = ControlPlane::start_in(d, &ca, CONTROL);
    let (code, out) = control_exits(d, &ca, &StoreAt::Dir(data.clone()));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "{} is in use by process {}",
            data.display(),
            cp.proc.pid()
        )) && out.contains("--store etcd://"),
        "{out}"
    );
    // The first one is unharmed, and once it is gone the directory is free again.
    assert!(cp.proc.log().contains("ready"));
    let cp = cp.restart();
    drop(cp);
}
