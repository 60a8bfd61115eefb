//! The control plane issues SVIDs (`sigil.v1.Identity/Issue`), with the real `sigil-control`
//! and `sigil` binaries and a CA made by `sigil ca init`. This test plays the sidecar: it makes
//! its key and CSR, asks with a join token first, then renews with the SVID it got; every
//! refusal the issue names is provoked and must be said to the caller, in the metrics and in
//! `sigil status`; a used token stays used across a restart.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, UnixTime};
use sigil_api::{IssueRequest, IssueResponse};
use sigil_config::{SpiffeId, TrustDomain};
use sigil_e2e::*;
use sigil_filters::svid::{verify_svid, Usage};
use sigil_filters::tls::Carries;
use sigil_filters::{LocalIdentity, TrustBundles};
use sigil_testkit::{key_and_csr, pem, rcgen};

const API: &str = "spiffe://example.org/api";

/// The test's sidecar end: TLS to the control plane's sidecar API, anonymously or with an SVID.
struct Asker {
    rt: tokio::runtime::Runtime,
    port: u16,
    control: SpiffeId,
    bundles: Arc<TrustBundles>,
}

impl Asker {
    fn new(port: u16, control: &str, bundle_pems: &[String]) -> Self {
        let mut bundles = TrustBundles::new();
        let td = TrustDomain::parse("example.org").unwrap();
        bundles
            .insert_pem(&td, bundle_pems.concat().as_bytes())
            .unwrap();
        Self {
            rt: tokio::runtime::Runtime::new().unwrap(),
            port,
            control: SpiffeId::parse(control).unwrap(),
            bundles: Arc::new(bundles),
        }
    }

    /// `Issue` as a caller without an SVID (first contact) or with `svid` (chain PEM, key
    /// PEM): the response, or the refusal's code and message.
    fn issue(
        &self,
        svid: Option<(&str, &str)>,
        csr: Vec<u8>,
        token: &str,
    ) -> Result<IssueResponse, (tonic::Code, String)> {
        self.issue_for(svid, csr, token, "")
    }

    /// `issue` for the Workload `for_workload` (as a Workload API serving it asks).
    fn issue_for(
        &self,
        svid: Option<(&str, &str)>,
        csr: Vec<u8>,
        token: &str,
        for_workload: &str,
    ) -> Result<IssueResponse, (tonic::Code, String)> {
        let provider = sigil_filters::tls::provider();
        let config = match svid {
            None => sigil_filters::tls::client_config_anonymous(
                self.bundles.clone(),
                provider,
                self.control.clone(),
                Carries::Http2,
            ),
            Some((chain, key)) => {
                let identity = LocalIdentity::from_pem(
                    chain.as_bytes(),
                    key.as_bytes(),
                    UnixTime::now(),
                    None,
                    &provider,
                )
                .expect("the SVID the control plane issued");
                sigil_filters::tls::client_config(
                    &identity,
                    self.bundles.clone(),
                    Arc::default(),
                    provider,
                    self.control.clone(),
                    Carries::Http2,
                )
            }
        };
        let request = IssueRequest {
            csr,
            join_token: token.to_string(),
            node: "test-sidecar".into(),
            for_workload: for_workload.to_string(),
        };
        self.rt.block_on(call(self.port, config, request))
    }

    /// `n` first-contact calls at once with `token`: the refusal messages (or "issued").
    fn flood(&self, n: usize, token: &str) -> Vec<String> {
        let config = sigil_filters::tls::client_config_anonymous(
            self.bundles.clone(),
            sigil_filters::tls::provider(),
            self.control.clone(),
            Carries::Http2,
        );
        let port = self.port;
        self.rt.block_on(async move {
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let request = IssueRequest {
                        csr: key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]).1,
                        join_token: token.to_string(),
                        node: "flood".into(),
                        for_workload: String::new(),
                    };
                    tokio::spawn(call(port, config.clone(), request))
                })
                .collect();
            let mut out = Vec::new();
            for c in calls {
                out.push(match c.await.unwrap() {
                    Ok(_) => "issued".to_string(),
                    Err((_, m)) => m,
                });
            }
            out
        })
    }
}

/// One `Issue` call on a connection of its own.
async fn call(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    request: IssueRequest,
) -> Result<IssueResponse, (tonic::Code, String)> {
    // A connection the control plane closes (past its bounds) is an Unavailable answer.
    let cut = |e: String| (tonic::Code::Unavailable, format!("connection: {e}"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| cut(e.to_string()))?;
    let name =
        rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| cut(e.to_string()))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| cut(e.to_string()))?;
    tokio::spawn(conn);
    let origin = format!("https://127.0.0.1:{port}").parse().unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        sigil_api::client::issue(sender, origin, request),
    )
    .await
    .expect("an answer within 10 s")
    .map_err(|s| (s.code(), s.message().to_string()))
}

/// The test's sidecar end towards `cp`, trusting both CAs.
fn asker(setup: &Setup, cp: &ControlPlane) -> Asker {
    Asker::new(
        cp.sidecar_port,
        CONTROL,
        &[setup.boot.bundle_pem(), setup.issuing_ca.clone()],
    )
}

fn chain_pem(r: &IssueResponse) -> String {
    r.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
}

fn refused(
    result: Result<IssueResponse, (tonic::Code, String)>,
    code: tonic::Code,
    reason: &str,
) -> String {
    match result {
        Ok(_) => panic!("issued, but {reason} was expected"),
        Err((got, message)) => {
            assert_eq!(got, code, "{message}");
            assert!(message.starts_with(&format!("{reason}: ")), "{message}");
            message
        }
    }
}

/// The issued chain verifies for `id` both ways with the returned bundle, and lives `secs`.
fn check_svid(r: &IssueResponse, id: &str, secs: i64) {
    let leaf = CertificateDer::from(r.chain[0].clone());
    let mut bundles = TrustBundles::new();
    let td = TrustDomain::parse(&r.bundles[0].trust_domain).unwrap();
    bundles
        .insert_pem(&td, r.bundles[0].pem.as_bytes())
        .unwrap();
    let provider = sigil_filters::tls::provider();
    for usage in [Usage::Client, Usage::Server] {
        let got = verify_svid(
            &bundles,
            &provider.signature_verification_algorithms,
            &leaf,
            &[],
            UnixTime::now(),
            usage,
        )
        .expect("the issued SVID verifies");
        assert_eq!(got.as_str(), id);
    }
    let (_, cert) = x509_lifetime(&leaf);
    assert_eq!(cert, secs, "the lifetime is exactly svidTtl");
}

/// (notBefore, lifetime in seconds) of a certificate, read with openssl as a user would.
fn x509_lifetime(leaf: &CertificateDer<'_>) -> (String, i64) {
    let dir = std::env::temp_dir().join(format!("sigil-issued-{}.pem", std::process::id()));
    std::fs::write(&dir, pem("CERTIFICATE", leaf)).unwrap();
    let out = std::process::Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-startdate",
            "-enddate",
            "-dateopt",
            "iso_8601",
            "-in",
        ])
        .arg(&dir)
        .output()
        .expect("openssl");
    let _ = std::fs::remove_file(&dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_string()
    };
    let (start, end) = (field("notBefore="), field("notAfter="));
    let secs = |t: &str| {
        sigil_config::policy::Timestamp::parse(&t.replace(' ', "T"))
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .0
    };
    (start.clone(), secs(&end) - secs(&start))
}

#[test]
fn the_control_plane_issues_svids_to_token_holders_and_renews_them() {
    if !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance");
    let d = dir.path();
    let setup = Setup::new(d);
    let ops = &setup.ops;
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    cp.apply(
        ops,
        &d.join("workloads.yaml"),
        &format!(
            "{}---\n{}---\n{}---\n{}",
            workload_yaml("api", API, "  svidTtl: 2m\n"),
            workload_yaml("gone", "spiffe://example.org/gone", ""),
            workload_yaml("ops", "spiffe://example.org/ops/mallory", ""),
            workload_yaml("control", CONTROL, ""),
        ),
    );
    let asker = asker(&setup, &cp);

    // First contact: a token, a CSR for the Workload's own ID; an SVID of exactly svidTtl.
    let t = token(&cp, ops, "api", "10m");
    let (key, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
    let first = asker.issue(None, csr.clone(), &t).expect("first SVID");
    check_svid(&first, API, 120);
    // The token is spent, whatever the CSR.
    let m = refused(
        asker.issue(None, csr, &t),
        tonic::Code::PermissionDenied,
        "token_reused",
    );
    assert!(m.contains("already used, at 20"), "{m}");

    // Renewal: authenticated by the SVID alone, same identity, a new serial.
    let chain = chain_pem(&first);
    let (_, csr2) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
    let renewed = asker
        .issue(Some((&chain, &key)), csr2, "")
        .expect("renewal");
    check_svid(&renewed, API, 120);
    assert_ne!(renewed.chain[0], first.chain[0]);

    a_greedy_csr_gets_a_plain_svid(&cp, ops, &asker);
    a_serving_sidecar_gets_svids_for_its_workloads_which_never_renew_alone(d, &cp, ops, &asker);
    refusals(&cp, ops, &asker, (&chain, &key));
    revocation_stops_issuance(&cp, ops, &asker, (&chain, &key));

    // The CA's state survives a restart: the spent token is still spent.
    let cp = cp.restart();
    let (_, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
    refused(
        asker.issue(None, csr, &t),
        tonic::Code::PermissionDenied,
        "token_reused",
    );
    let metrics = cp.sigil(ops, &["metrics"]).1;
    assert!(
        metric(
            &metrics,
            "sigil_control_svid_issuance_total{",
            &["result=\"refused\"", "reason=\"token_reused\""]
        )
        .is_some(),
        "{metrics}"
    );
    // Every decision is in the store, with who, which serial and why, across the restart.
    let serial = |r: &IssueResponse| {
        x509_parser::parse_x509_certificate(&r.chain[0])
            .unwrap()
            .1
            .raw_serial_as_string()
    };
    let lines = issuance_lines(&cp, ops);
    let line = |result: &str, serial: &str| {
        lines
            .iter()
            .find(|l| {
                l.contains(&format!(" {result} ")) && l.contains(&format!("serial={serial} "))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {result} record with serial {serial}:\n{}",
                    lines.join("\n")
                )
            })
            .clone()
    };
    let l = line("first", &serial(&first));
    assert!(
        l.contains(&format!("id={API} workload=api"))
            && l.contains("caller=anonymous node=test-sidecar"),
        "{l}"
    );
    let l = line("renewal", &serial(&renewed));
    assert!(l.contains(&format!("caller={API}")), "{l}");
    for reason in [
        "token_unknown",
        "csr_foreign_id",
        "token_expired",
        "revoked",
        "not_served_by_caller",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!(" refused reason={reason} ")) && l.contains(" -- ")),
            "no refusal {reason} recorded:\n{}",
            lines.join("\n")
        );
    }
    // A record is one line, whatever the CSR carried.
    assert!(
        !lines.iter().any(|l| l.starts_with("sidecar-x forged")),
        "{}",
        lines.join("\n")
    );
    // The same decisions are audit records of the control plane's own chains (one per run),
    // which verify end to end like a sidecar's.
    let audit = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let args = [
            "audit", "query", "--kind", "issuance", "--json", "--limit", "10000",
        ];
        let (code, out, err) = cp.sigil(ops, &args);
        assert_eq!(code, Some(0), "{err}");
        let records: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records.len() + 1 >= lines.len())
            .then_some(records)
            .ok_or_else(|| {
                format!(
                    "{} issuance audit records, {} lines",
                    out.lines().count(),
                    lines.len()
                )
            })
    });
    let plain = |r: &IssueResponse| serial(r).replace(':', "");
    let of = |serial: &str| {
        audit
            .iter()
            .find(|r| r["peer_serial"] == serial)
            .unwrap_or_else(|| panic!("no audit record with serial {serial}: {audit:?}"))
    };
    let r = of(&plain(&first));
    assert_eq!(
        (&r["actor"], &r["peer_id"], &r["decision"], &r["sidecar"]),
        (
            &"anonymous".into(),
            &API.into(),
            &"allow".into(),
            &CONTROL.into()
        ),
        "{r}"
    );
    assert_eq!(of(&plain(&renewed))["actor"], API);
    for reason in [
        "token_unknown",
        "csr_foreign_id",
        "token_expired",
        "revoked",
    ] {
        assert!(
            audit.iter().any(|r| r["decision"] == "deny"
                && r["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{reason}: "))),
            "no refusal {reason} in {audit:?}"
        );
    }
    let (code, out, err) = cp.sigil(ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.lines()
            .filter(|l| l.starts_with(&format!("{CONTROL} chain=")))
            .count()
            >= 2,
        "a chain per run of the control plane:\n{out}"
    );
}

/// `sigil issuances --since 1h`: the recorded decisions, one line each (polled: the writer
/// keeps them a moment after the answer).
fn issuance_lines(cp: &ControlPlane, ops: &IdentityFiles) -> Vec<String> {
    let (code, out, err) = cp.sigil(ops, &["issuances", "--since", "1h"]);
    assert_eq!(code, Some(0), "{out}{err}");
    out.lines().map(str::to_string).collect()
}

/// Each refusal the issue lists, by a caller that could otherwise get an SVID.
fn refusals(cp: &ControlPlane, ops: &IdentityFiles, asker: &Asker, svid: (&str, &str)) {
    let p256 = || key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]).1;
    refused(
        asker.issue(None, p256(), "0123456789abcdef"),
        tonic::Code::PermissionDenied,
        "token_unknown",
    );
    refused(
        asker.issue(None, p256(), ""),
        tonic::Code::Unauthenticated,
        "no_credential",
    );
    // A CSR naming another identity, a key the CA does not sign, a forged signature.
    let t = token(cp, ops, "api", "10m");
    let other = key_and_csr(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["spiffe://example.org/admin"],
    )
    .1;
    let m = refused(
        asker.issue(None, other, &t),
        tonic::Code::InvalidArgument,
        "csr_foreign_id",
    );
    assert!(m.contains("spiffe://example.org/admin"), "{m}");
    // A CSR carrying a line break: said on one line, in the log and in `sigil status`.
    let forged = key_and_csr(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &["spiffe://example.org/x\nsidecar-x forged acknowledged"],
    )
    .1;
    refused(
        asker.issue(None, forged, &t),
        tonic::Code::InvalidArgument,
        "csr_foreign_id",
    );
    // Refused CSRs did not spend the token: it still gets an SVID, once.
    let fixed = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]).1;
    asker
        .issue(None, fixed, &t)
        .expect("a token survives a refused CSR");
    refused(
        asker.issue(None, p256(), &t),
        tonic::Code::PermissionDenied,
        "token_reused",
    );
    let status = cp.sigil(ops, &["status"]).1;
    assert!(
        !status.lines().any(|l| l.starts_with("sidecar-x")),
        "a forged line in sigil status:\n{status}"
    );
    let ed = key_and_csr(&rcgen::PKCS_ED25519, &[API]).1;
    refused(
        asker.issue(Some(svid), ed, ""),
        tonic::Code::InvalidArgument,
        "csr_key_type",
    );
    let mut forged = p256();
    let n = forged.len();
    forged[n - 2] ^= 1;
    refused(
        asker.issue(Some(svid), forged, ""),
        tonic::Code::InvalidArgument,
        "csr_bad_signature",
    );
    refused(
        asker.issue(Some(svid), vec![0u8; 5000], ""),
        tonic::Code::InvalidArgument,
        "csr_too_large",
    );
    // A Workload API asking for a Workload that does not name it (or for none stored); a
    // caller without an SVID serves no Workload API.
    for name in ["api", "ghost"] {
        let m = refused(
            asker.issue_for(Some(svid), p256(), "", name),
            tonic::Code::PermissionDenied,
            "not_served_by_caller",
        );
        assert!(m.contains("spec.workloadApi.sidecar"), "{m}");
    }
    let t = token(cp, ops, "api", "10m");
    refused(
        asker.issue_for(None, p256(), &t, "api"),
        tonic::Code::Unauthenticated,
        "no_credential",
    );
    // An expired token.
    let t = token(cp, ops, "api", "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let m = refused(
        asker.issue(None, p256(), &t),
        tonic::Code::PermissionDenied,
        "token_expired",
    );
    assert!(m.contains("expired at 20"), "{m}");
    // A token for a Workload deleted since.
    let t = token(cp, ops, "gone", "10m");
    let (code, out, err) = cp.sigil(ops, &["delete", "Workload", "gone"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let gone = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[]).1;
    refused(
        asker.issue(None, gone, &t),
        tonic::Code::PermissionDenied,
        "unknown_workload",
    );
    // Identities of the control plane and of its operators are never issued, whatever a
    // Workload says.
    for (workload, id) in [
        ("ops", "spiffe://example.org/ops/mallory"),
        ("control", CONTROL),
    ] {
        let t = token(cp, ops, workload, "10m");
        let csr = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[id]).1;
        refused(
            asker.issue(None, csr, &t),
            tonic::Code::PermissionDenied,
            "reserved_identity",
        );
    }
    // And a token for a Workload that does not exist is not made at all.
    let (code, _, err) = cp.sigil(ops, &["token", "create", "--workload", "nobody"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("\"nobody\""), "{err}");
    // The operator sees each refusal, with its reason.
    let status = cp.sigil(ops, &["status"]).1;
    for reason in [
        "token_unknown",
        "csr_foreign_id",
        "csr_key_type",
        "token_expired",
        "unknown_workload",
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("issuance REFUSED") && l.contains(reason)),
            "{reason} not in sigil status:\n{status}"
        );
    }
    // A flood of guesses from one address is held to a few connections at once and a budget
    // of attempts per second: the rest are cut or refused before the store is asked (and
    // without a log or status line each).
    let answers = asker.flood(40, "ffffffffffffffff");
    let count = |prefix: &str| answers.iter().filter(|m| m.starts_with(prefix)).count();
    let (limited, guessed) = (count("too_many_attempts: "), count("token_unknown: "));
    let cut = answers
        .iter()
        .filter(|m| !m.starts_with("too_many_attempts: ") && !m.starts_with("token_unknown: "))
        .count();
    assert!(guessed >= 1 && limited + cut >= 1, "{answers:?}");
    let metrics = cp.sigil(ops, &["metrics"]).1;
    let held = metric(
        &metrics,
        "sigil_control_svid_issuance_total{",
        &["reason=\"too_many_connections\""],
    );
    assert!(
        held.unwrap_or(0.0) >= 1.0 && cut >= 1,
        "no connection past the per-address bound was cut ({cut} cut):\n{metrics}"
    );
    assert!(
        answers.iter().all(|m| m.starts_with("too_many_attempts: ")
            || m.starts_with("token_unknown: ")
            || m.starts_with("connection: ")
            || m.contains("connection")),
        "{answers:?}"
    );
    // The budget is per second: the next second has room again.
    std::thread::sleep(Duration::from_millis(1100));
}

/// A revoked identity gets no SVID, by renewal or by token; an `issuedBefore` revocation
/// refuses the old SVID's renewal but lets a new SVID be issued with a token.
fn revocation_stops_issuance(
    cp: &ControlPlane,
    ops: &IdentityFiles,
    asker: &Asker,
    svid: (&str, &str),
) {
    let p256 = || key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]).1;
    let t = token(cp, ops, "api", "10m");
    let (code, out, err) = cp.sigil(
        ops,
        &[
            "revoke",
            API,
            "--reason",
            "key leaked",
            "--issued-before",
            "now",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    wait_until(
        "the revocation reaches the CA",
        Duration::from_secs(10),
        || asker.issue(Some(svid), p256(), "").is_err(),
    );
    let m = refused(
        asker.issue(Some(svid), p256(), ""),
        tonic::Code::PermissionDenied,
        "revoked",
    );
    assert!(m.contains("key leaked"), "{m}");
    // Issued now is after the cut-off: the replacement SVID is allowed.
    std::thread::sleep(Duration::from_millis(1100));
    let fresh = asker
        .issue(None, p256(), &t)
        .expect("a replacement SVID after issuedBefore");
    check_svid(&fresh, API, 120);
    // Without a cut-off, nothing at all.
    let (code, out, err) = cp.sigil(ops, &["unrevoke", API]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = cp.sigil(ops, &["revoke", API, "--reason", "decommissioned"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let t = token(cp, ops, "api", "10m");
    wait_until(
        "the second revocation reaches the CA",
        Duration::from_secs(10),
        || matches!(asker.issue(None, p256(), &t), Err((_, m)) if m.starts_with("revoked")),
    );
    let (code, out, err) = cp.sigil(ops, &["unrevoke", API]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[test]
fn replicas_on_one_etcd_share_the_tokens_a_token_is_taken_once_across_them() {
    if !require_tool("etcd", "issuance") || !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance-etcd");
    let d = dir.path();
    let setup = Setup::new(d);
    let etcd = EtcdServer::start(d);
    let cp1 = setup.control_plane(d, "control-1", etcd.store_at(etcd.client_port));
    let cp2 = setup.control_plane(d, "control-2", etcd.store_at(etcd.client_port));
    cp1.apply(
        &setup.ops,
        &d.join("workloads.yaml"),
        &workload_yaml("api", API, ""),
    );
    let (asker1, asker2) = (asker(&setup, &cp1), asker(&setup, &cp2));
    // Made at replica 1 right after the Workload was applied there, taken at replica 2 at
    // once (which waits for its catalog to learn of the Workload rather than burn the
    // token), refused again at replica 1.
    let t = token(&cp1, &setup.ops, "api", "10m");
    let p256 = || key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]).1;
    let first = asker2
        .issue(None, p256(), &t)
        .unwrap_or_else(|(_, m)| panic!("replica 2 did not issue: {m}"));
    check_svid(&first, API, 3600);
    refused(
        asker1.issue(None, p256(), &t),
        tonic::Code::PermissionDenied,
        "token_reused",
    );
    // Both replicas' records are in etcd, read at either.
    poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let lines = issuance_lines(&cp1, &setup.ops);
        let first = lines
            .iter()
            .any(|l| l.contains(" first ") && l.contains(&format!("id={API}")));
        let reused = lines
            .iter()
            .any(|l| l.contains(" refused reason=token_reused "));
        (first && reused)
            .then_some(())
            .ok_or_else(|| format!("both replicas' records expected:\n{}", lines.join("\n")))
    });
    drop((cp1, cp2));
}

/// A sidecar whose SVID the control plane issues (`identity.joinTokenFile`): it starts with
/// a join token, serves mTLS with the issued SVID, renews it at half its one-minute lifetime
/// without closing a live connection, and after a restart uses the SVID it kept instead of
/// the spent token.
#[test]
fn a_sidecar_gets_its_svid_from_the_control_plane_and_renews_it_in_place() {
    if !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance-sidecar");
    let d = dir.path();
    let setup = Setup::new(d);
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    let (fa, fb, token_file) = b_with_token(d, &setup, &cp);

    let (_web, web_port) = start_workload("b", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let (b_web, b_echo, a_web, a_echo) = (free_port(), free_port(), free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.join_token_file = Some(token_file.clone());
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.inbound = vec![(b_web, web_port), (b_echo, echo_port)];
    b.allow = vec![(web_port, vec![A.into()]), (echo_port, vec![A.into()])];
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into()), (a_echo, b_echo, B.into())];
    let mut pb = b.start(d, &fb);
    let _pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pb.log());
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d.join("state-b/svid.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(key_mode, 0o600, "the kept key is the sidecar's alone");
    let expiry = |s: &Sidecar| metric(&s.metrics(), "sigil_svid_expiry_timestamp_seconds{", &[]);
    let first_expiry = expiry(&b).expect("B reports its SVID's expiry");
    assert!(
        first_expiry - (now_unix() as f64) <= 60.0,
        "a one-minute SVID"
    );

    // A relayed connection opened now lives across the renewal (due at 30 s ± 6 s).
    let mut live = echo_stream(a_echo, b"before\n");
    let renewed = |s: &Sidecar| {
        metric(
            &s.metrics(),
            "sigil_reloads_total{",
            &["resource=\"svid_issuance\"", "result=\"success\""],
        )
        .unwrap_or(0.0)
    };
    // Renewed, then put in force 5 s later (for peers whose clocks are behind).
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        (renewed(&b) >= 1.0 && expiry(&b).unwrap_or(0.0) > first_expiry)
            .then_some(())
            .ok_or_else(|| format!("no renewed SVID in force within 60 s:\n{}", pb.log()))
    });
    assert!(
        echoes(&mut live, b"after\n"),
        "the live connection was cut by the renewal"
    );
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pb.log());
    let issued = cp.sigil(&setup.ops, &["metrics"]).1;
    assert!(
        metric(
            &issued,
            "sigil_control_svid_issuance_total{",
            &["result=\"renewal\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{issued}"
    );

    // Restarted, B renews from the SVID it kept; the token in the file is spent.
    assert_eq!(
        pb.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        pb.log()
    );
    let pb = b.start(d, &fb);
    assert!(pb.log().contains("using the SVID kept"), "{}", pb.log());
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pb.log());
}

/// The outage budget: with the control plane gone, a sidecar keeps serving on its SVID and
/// retries; it goes not ready only when the SVID expires. A new join token in its file then
/// brings it back once the control plane is.
#[test]
fn a_sidecar_serves_through_a_control_plane_outage_until_its_svid_expires() {
    if !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance-outage");
    let d = dir.path();
    let setup = Setup::new(d);
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    let (fa, fb, token_file) = b_with_token(d, &setup, &cp);
    let (_web, web_port) = start_workload("b", false);
    let (b_web, a_web) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.join_token_file = Some(token_file.clone());
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.inbound = vec![(b_web, web_port)];
    b.allow = vec![(web_port, vec![A.into()])];
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_web, b_web, B.into())];
    let pb = b.start(d, &fb);
    let _pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pb.log());
    let expires = metric(&b.metrics(), "sigil_svid_expiry_timestamp_seconds{", &[]).unwrap() as i64;

    // The control plane goes away; renewal (due at 30 s +- 6 s) fails and is retried.
    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    let failed = |s: &Sidecar| {
        metric(
            &s.metrics(),
            "sigil_reloads_total{",
            &["resource=\"svid_issuance\"", "result=\"failure\""],
        )
        .unwrap_or(0.0)
    };
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        (failed(&b) >= 1.0)
            .then_some(())
            .ok_or_else(|| format!("no failed renewal within 60 s:\n{}", pb.log()))
    });
    assert!(
        now_unix() < expires,
        "the renewal is due before the SVID expires"
    );
    assert_eq!(
        b.admin_get("/ready").map(|r| r.0),
        Some(200),
        "still ready: {}",
        pb.log()
    );
    assert_eq!(
        get_once(a_web, "/"),
        Some(200),
        "still serving: {}",
        pb.log()
    );

    // Expired: not ready (a peer's new handshakes meet the expired SVID and fail; a
    // connection already open runs on, as with any certificate's expiry).
    poll(
        Duration::from_secs(75),
        Duration::from_millis(500),
        || match b.admin_get("/ready") {
            Some((503, body)) if body.contains("no valid SVID") => Ok(()),
            other => Err(format!(
                "still {other:?} at {}, SVID until {expires}",
                now_unix()
            )),
        },
    );
    assert!(now_unix() >= expires, "not ready before the SVID expired");

    // Back: the control plane, and a new token in the file.
    let cp = cp.start_again();
    std::fs::write(&token_file, token(&cp, &setup.ops, "b", "10m")).unwrap();
    poll(
        Duration::from_secs(90),
        Duration::from_millis(500),
        || match b.admin_get("/ready") {
            Some((200, _)) => Ok(()),
            other => Err(format!("not back: {other:?}\n{}", pb.log())),
        },
    );
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pb.log());
}

/// The certificates of a PEM text (indented too, as in a YAML block).
fn certs_of(pem_text: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    let text: String = pem_text
        .lines()
        .map(|l| l.trim_start().to_string() + "\n")
        .collect();
    CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.expect("a PEM certificate"))
        .collect()
}

/// Whether the SVID kept in `state/svid.pem` chains to the CA of `ca_pem` (and to it alone).
fn kept_svid_signed_by(state: &std::path::Path, ca_pem: &str) -> bool {
    let Ok(kept) = std::fs::read_to_string(state.join("svid.pem")) else {
        return false;
    };
    let chain = certs_of(&kept);
    let mut only = TrustBundles::new();
    only.insert_pem(
        &TrustDomain::parse("example.org").unwrap(),
        ca_pem.as_bytes(),
    )
    .unwrap();
    let provider = sigil_filters::tls::provider();
    chain.split_first().is_some_and(|(leaf, rest)| {
        verify_svid(
            &only,
            &provider.signature_verification_algorithms,
            leaf,
            rest,
            UnixTime::now(),
            Usage::Client,
        )
        .is_ok()
    })
}

/// `sigil ca rotate` under steady traffic between two sidecars with issued one-minute SVIDs,
/// one call a new connection (new handshakes all along) and one on a kept-alive connection:
/// the next CA enters the pushed bundle, becomes active once both sidecars acknowledged it,
/// both renew onto it, and the old CA leaves the bundle after the last SVID it signed
/// expired. Not one call fails.
#[test]
fn a_ca_rotation_under_steady_traffic_fails_no_request() {
    if !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance-rotation");
    let d = dir.path();
    let setup = Setup::new(d);
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    let (_, fb, token_b) = b_with_token(d, &setup, &cp);
    cp.apply(
        &setup.ops,
        &d.join("a.yaml"),
        &workload_yaml("a", A, "  svidTtl: 1m\n"),
    );
    let token_a = d.join("a.token");
    std::fs::write(&token_a, token(&cp, &setup.ops, "a", "10m")).unwrap();
    // A's bundle files as B's: the bootstrap CA and the issuing CA of `sigil ca init`.
    let fa = write_identity(d, "a-issued", &setup.boot, A, &[&setup.boot]);
    std::fs::copy(
        fb.bundle_dir.join("example.org.pem"),
        fa.bundle_dir.join("example.org.pem"),
    )
    .unwrap();

    let (_web, web_port) = start_workload("b", false);
    let (b_web, a_web) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.join_token_file = Some(token_b);
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.inbound = vec![(b_web, web_port)];
    b.allow = vec![(web_port, vec![A.into()])];
    let mut a = Sidecar::new("sidecar-a", A);
    a.join_token_file = Some(token_a);
    a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
    a.outbound = vec![(a_web, b_web, B.into())];
    let pb = b.start(d, &fb);
    let pa = a.start(d, &fa);
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", pa.log());
    let logs = || format!("{}\n{}\n{}", cp.proc.log(), pa.log(), pb.log());
    let old_ca = setup.issuing_ca.clone();
    for state in ["state-a", "state-b"] {
        assert!(kept_svid_signed_by(&d.join(state), &old_ca), "{}", logs());
    }

    let limit = Duration::from_secs(240);
    let fresh = Steady {
        pause: Duration::from_millis(50),
        limit,
        ..Steady::fresh(a_web, "/steady-fresh")
    }
    .start();
    let kept = Steady {
        pause: Duration::from_millis(50),
        limit,
        ..Steady::keep_alive(a_web, "/steady-kept")
    }
    .start();

    let (code, out) = run_status(
        std::process::Command::new(bin("sigil"))
            .args(["ca", "rotate", "--dir"])
            .arg(&setup.ca_dir),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(0), "{out}");
    let new_ca = std::fs::read_to_string(setup.ca_dir.join("next.crt")).unwrap();
    let bundle = || {
        let (_, out, _) = cp.sigil(&setup.ops, &["get", "TrustBundle", "ca-example.org"]);
        certs_of(&out)
    };
    // The next CA in the bundle, then active once both sidecars have that bundle (and 30 s
    // have passed for sidecars that could be reconnecting).
    poll(Duration::from_secs(60), Duration::from_millis(250), || {
        cp.proc
            .log()
            .contains("the next CA signs from now on")
            .then_some(())
            .ok_or_else(|| format!("the next CA is not active within 60 s:\n{}", logs()))
    });
    let during = bundle();
    for ca in [&old_ca, &new_ca] {
        assert!(during.contains(&certs_of(ca)[0]), "{during:?}");
    }
    assert_eq!(
        std::fs::read_to_string(setup.ca_dir.join("ca.crt")).unwrap(),
        new_ca
    );
    assert!(
        !setup.ca_dir.join("next.key").exists(),
        "the old key is gone"
    );

    // Both sidecars renew onto the new CA (renewal due at 30 s +- 6 s, in force 5 s later).
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        ["state-a", "state-b"]
            .iter()
            .all(|s| kept_svid_signed_by(&d.join(s), &new_ca))
            .then_some(())
            .ok_or_else(|| format!("not both renewed onto the new CA in 60 s:\n{}", logs()))
    });

    // The old CA leaves the bundle once the last SVID it signed has expired (activation +
    // one minute + a margin).
    poll(Duration::from_secs(90), Duration::from_millis(500), || {
        let now = bundle();
        (!now.contains(&certs_of(&old_ca)[0]) && now.contains(&certs_of(&new_ca)[0]))
            .then_some(())
            .ok_or_else(|| format!("the old CA is still in the bundle after 90 s:\n{}", logs()))
    });
    assert!(!setup.ca_dir.join("retired.crt").exists());
    // Each change to the bundle is a record of the control plane's own audit chain, with
    // the control plane as the actor: made at start, the next CA in, the old one out.
    poll(Duration::from_secs(10), Duration::from_millis(300), || {
        let (code, out, err) = cp.sigil(
            &setup.ops,
            &["audit", "query", "--kind", "change", "--json"],
        );
        assert_eq!(code, Some(0), "{err}");
        let bundle_changes = out
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["actor"] == CONTROL && r["subject"] == "TrustBundle/ca-example.org")
            .count();
        (bundle_changes >= 3)
            .then_some(())
            .ok_or_else(|| format!("{bundle_changes} bundle changes recorded:\n{out}"))
    });
    // Calls go on after the last bundle change.
    let after = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (fresh_calls, kept_calls) = (fresh.stop(), kept.stop());
    for (what, calls) in [
        ("new connections", &fresh_calls),
        ("kept alive", &kept_calls),
    ] {
        let (ok, failed) = calls.tally();
        assert!(
            failed.is_empty() && ok > 100,
            "{what}: failed calls {failed:?} ({ok} ok)\n{}",
            logs()
        );
        assert!(
            calls.after(after).tally().0 > 0,
            "{what}: no call after the rotation"
        );
    }
    assert_eq!(get_once(a_web, "/"), Some(200), "{}", logs());
}

/// `sigil ca init --upstream-cert --upstream-key`: the control plane's CA is an intermediate
/// signed by an operator's root (made by openssl); SVIDs carry the intermediate and verify
/// for peers that trust the operator's root alone.
#[test]
fn an_intermediate_ca_signed_by_an_upstream_root_issues_svids_chaining_to_it() {
    if !require_tool("openssl", "issuance") {
        return;
    }
    let dir = TempDir::new("issuance-upstream");
    let d = dir.path();
    let setup = Setup::with_upstream(d);
    let cp = setup.control_plane(d, "control", StoreAt::Dir(d.join("control-data")));
    cp.apply(
        &setup.ops,
        &d.join("api.yaml"),
        &workload_yaml("api", API, ""),
    );
    let t = token(&cp, &setup.ops, "api", "10m");
    let (key, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
    let issued = asker(&setup, &cp)
        .issue(None, csr, &t)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cp.proc.log()));
    assert_eq!(issued.chain.len(), 2, "the SVID and the intermediate");
    let root = certs_of(&setup.issuing_ca);
    assert_eq!(root.len(), 1);
    let mut only_root = TrustBundles::new();
    only_root
        .insert_der(&TrustDomain::parse("example.org").unwrap(), root.clone())
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = issued
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let provider = sigil_filters::tls::provider();
    let verified = verify_svid(
        &only_root,
        &provider.signature_verification_algorithms,
        &chain[0],
        &chain[1..],
        UnixTime::now(),
        Usage::Server,
    );
    assert_eq!(verified.unwrap().as_str(), API);
    // The sidecar's own check of its chain and key; the bundle handed back is the root.
    LocalIdentity::from_pem(
        chain_pem(&issued).as_bytes(),
        key.as_bytes(),
        UnixTime::now(),
        None,
        &provider,
    )
    .expect("a usable SVID");
    assert!(
        issued.bundles[0].pem.contains(setup.issuing_ca.trim()),
        "{:?}",
        issued.bundles
    );
    // The operator's key never went near the control plane's CA directory.
    let up_key = std::fs::read_to_string(d.join("up.key")).unwrap();
    for f in std::fs::read_dir(&setup.ca_dir).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
        assert!(!text.contains(up_key.trim()), "the upstream key was copied");
    }
}

/// A CSR asking for more than an SVID (CA:true, a DNS name, keyCertSign, codeSigning) gets a
/// plain SVID: the CA copies nothing it was asked for but the key.
fn a_greedy_csr_gets_a_plain_svid(cp: &ControlPlane, ops: &IdentityFiles, asker: &Asker) {
    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509CertificationRequest};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI(API.try_into().unwrap()),
        rcgen::SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    // The CSR does ask for them.
    let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
    let asked: Vec<String> = parsed
        .requested_extensions()
        .into_iter()
        .flatten()
        .map(|e| match e {
            ParsedExtension::SubjectAlternativeName(_) => "san".to_string(),
            ParsedExtension::BasicConstraints(b) if b.ca => "ca".to_string(),
            ParsedExtension::KeyUsage(k) if k.key_cert_sign() => "keyCertSign".to_string(),
            ParsedExtension::ExtendedKeyUsage(e) if e.code_signing => "codeSigning".to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    for want in ["san", "ca", "keyCertSign", "codeSigning"] {
        assert!(
            asked.iter().any(|a| a == want),
            "the CSR asks for {want}: {asked:?}"
        );
    }
    let t = token(cp, ops, "api", "10m");
    let issued = asker
        .issue(None, csr, &t)
        .expect("an SVID for the greedy CSR");
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
    assert!(!cert.is_ca(), "not a CA");
    let san = cert.subject_alternative_name().unwrap().expect("a SAN");
    assert_eq!(
        san.value.general_names,
        [GeneralName::URI(API)],
        "one URI SAN, no DNS name"
    );
    let ku = cert.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign(), "{ku:?}");
    let eku = cert.extended_key_usage().unwrap().expect("EKU").value;
    assert!(
        eku.server_auth && eku.client_auth && !eku.code_signing,
        "{eku:?}"
    );
}

/// A sidecar (B, with its own SVID) asks for the Workload its Workload API serves and gets its
/// SVID; that SVID cannot renew itself (only B may ask), and B cannot ask for another one.
fn a_serving_sidecar_gets_svids_for_its_workloads_which_never_renew_alone(
    d: &std::path::Path,
    cp: &ControlPlane,
    ops: &IdentityFiles,
    asker: &Asker,
) {
    const SERVED: &str = "spiffe://example.org/ns/demo/sa/batch";
    cp.apply(
        ops,
        &d.join("served.yaml"),
        &format!(
            "{}---\n{}",
            workload_yaml("b", B, ""),
            workload_yaml(
                "batch",
                SERVED,
                &format!("  workloadApi: {{sidecar: \"{B}\", uid: 1000}}\n")
            )
        ),
    );
    let t = token(cp, ops, "b", "10m");
    let (b_key, b_csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[B]);
    let b = asker.issue(None, b_csr, &t).expect("B's SVID");
    let b_chain = chain_pem(&b);
    let (served_key, served_csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[SERVED]);
    let served = asker
        .issue_for(Some((&b_chain, &b_key)), served_csr, "", "batch")
        .expect("the served Workload's SVID, asked by B");
    check_svid(&served, SERVED, 3600);
    let (_, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[SERVED]);
    let m = refused(
        asker.issue(Some((&chain_pem(&served), &served_key)), csr, ""),
        tonic::Code::PermissionDenied,
        "served_by_workload_api",
    );
    assert!(m.contains(B), "{m}");
    let (_, csr) = key_and_csr(&rcgen::PKCS_ECDSA_P256_SHA256, &[API]);
    refused(
        asker.issue_for(Some((&b_chain, &b_key)), csr, "", "api"),
        tonic::Code::PermissionDenied,
        "not_served_by_caller",
    );
}
