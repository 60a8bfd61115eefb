//! The audit stream's control-plane end (issue 16), with the real `sigil-control`: this test
//! plays a sidecar shipping chained, checkpointed records over `Ship` with its SVID. Every
//! acknowledged record survives the control plane being SIGKILLed; a batch sent again is
//! stored once; a tampered record is named.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::UnixTime;
use sigil_api::audit::{Ack, Batch, Checkpoint, Kind, Record, SCHEMA};
use sigil_api::Message;
use sigil_e2e::*;
use sigil_filters::audit::{link, sign_checkpoint, Hash, GENESIS};
use sigil_filters::tls::Carries;
use sigil_filters::{LocalIdentity, TrustBundles};
use sigil_testkit::Ca;

/// A sidecar's chain of records, made here.
struct Chain {
    identity: LocalIdentity,
    seq: u64,
    head: Hash,
}

impl Chain {
    /// The next `n` records and a checkpoint after them.
    fn batch(&mut self, n: u64) -> Batch {
        let mut records = Vec::new();
        for _ in 0..n {
            self.seq += 1;
            let r = Record {
                schema: SCHEMA,
                seq: self.seq,
                prev: self.head.to_vec(),
                time_unix_nanos: now_unix() as i64 * 1_000_000_000,
                kind: Kind::ConnectionClose as i32,
                direction: "inbound".into(),
                peer_id: B.into(),
                bytes_in: self.seq,
                close_reason: "normal".into(),
                ..Record::default()
            }
            .encode_to_vec();
            self.head = link(self.seq, &self.head, &r);
            records.push(r);
        }
        Batch {
            chain: "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e".into(),
            records,
            checkpoints: vec![Checkpoint {
                seq: self.seq,
                head: self.head.to_vec(),
                signature: sign_checkpoint(&self.identity, self.seq, &self.head).unwrap(),
                signer: self.identity.chain()[0].to_vec(),
            }],
        }
    }
}

/// A stand-in sidecar A shipping records by hand: its SVID (files `web.*` in `d`), the
/// bundle it trusts the control plane with, and its chain from the first record.
fn stand_in(d: &std::path::Path, ca: &Ca) -> (LocalIdentity, Arc<TrustBundles>, Chain) {
    let files = write_identity(d, "web", ca, A, &[ca]);
    let identity = LocalIdentity::from_pem(
        &std::fs::read(&files.cert).unwrap(),
        &std::fs::read(&files.key).unwrap(),
        UnixTime::now(),
        None,
        &sigil_filters::tls::provider(),
    )
    .unwrap();
    let mut bundles = TrustBundles::new();
    bundles
        .insert_pem(
            &sigil_config::TrustDomain::parse("example.org").unwrap(),
            ca.bundle_pem().as_bytes(),
        )
        .unwrap();
    let chain = Chain {
        identity: identity.clone(),
        seq: 0,
        head: GENESIS,
    };
    (identity, Arc::new(bundles), chain)
}

/// Ships `batches` on one new `Ship` stream with `identity`; the acknowledgements.
async fn ship(
    port: u16,
    identity: &LocalIdentity,
    bundles: Arc<TrustBundles>,
    batches: Vec<Batch>,
) -> Vec<Ack> {
    let config = sigil_filters::tls::client_config(
        identity,
        bundles,
        Arc::default(),
        sigil_filters::tls::provider(),
        sigil_config::SpiffeId::parse(CONTROL).unwrap(),
        Carries::Http2,
    );
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name =
        rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let origin = format!("https://127.0.0.1:{port}").parse().unwrap();
    let (tx, mut acks) = sigil_api::client::ship(sender, origin).await.unwrap();
    let mut out = Vec::new();
    for b in batches {
        tx.send(b).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("an acknowledgement within 10 s")
            .expect("the stream goes on")
            .expect("an acknowledgement");
        out.push(ack);
    }
    out
}

#[test]
fn shipped_records_are_stored_once_and_survive_a_sigkill_of_the_control_plane() {
    let dir = TempDir::new("audit-ship");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let cp = ControlPlane::start_in(d, &ca, CONTROL);
    let ops = write_identity(d, "ops", &ca, ALICE, &[&ca]);
    let (identity, bundles, mut chain) = stand_in(d, &ca);
    let (first, second) = (chain.batch(100), chain.batch(50));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acks = rt.block_on(ship(
        cp.sidecar_port,
        &identity,
        bundles.clone(),
        vec![first.clone(), first.clone(), second.clone()],
    ));
    let through: Vec<u64> = acks.iter().map(|a| a.durable_through).collect();
    assert_eq!(through, [100, 100, 150], "{}", cp.proc.log());

    // Killed outright: what was acknowledged is there after the restart (sent again, it is a
    // duplicate), and the chain goes on.
    let cp = cp.kill_and_restart();
    let third = chain.batch(25);
    let acks = rt.block_on(ship(
        cp.sidecar_port,
        &identity,
        bundles.clone(),
        vec![second.clone(), third],
    ));
    let through: Vec<u64> = acks.iter().map(|a| a.durable_through).collect();
    assert_eq!(through, [150, 175], "{}", cp.proc.log());
    let (_, metrics, _) = cp.sigil(&ops, &["metrics"]);
    let count = |result: &str| {
        metric(
            &metrics,
            "sigil_control_audit_records_total{",
            &[&format!("result=\"{result}\"")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("duplicate"), count("stored")),
        (50.0, 25.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "sigil_control_audit_chain_breaks_total{", &[]).is_none(),
        "{metrics}"
    );

    // A record edited on the way (its bytes no longer what the chain covers): named.
    let mut tampered = chain.batch(5);
    let mut record = Record::decode(&tampered.records[2][..]).unwrap();
    record.peer_id = "spiffe://example.org/ns/demo/sa/someone-else".into();
    tampered.records[2] = record.encode_to_vec();
    rt.block_on(ship(cp.sidecar_port, &identity, bundles, vec![tampered]));
    let (_, metrics, _) = cp.sigil(&ops, &["metrics"]);
    assert!(
        metric(
            &metrics,
            "sigil_control_audit_chain_breaks_total{",
            &["result=\"unlinked\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}\n{}",
        cp.proc.log()
    );
    assert!(
        cp.proc
            .log()
            .contains("audit chain: record 179 does not link"),
        "{}",
        cp.proc.log()
    );
    // And a record of the control plane's own says so.
    let breaks = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let args = ["audit", "query", "--kind", "chain_break", "--json"];
        let (code, out, err) = cp.sigil(&ops, &args);
        assert_eq!(code, Some(0), "{err}");
        (!out.is_empty())
            .then_some(out)
            .ok_or_else(|| "no chain_break record".to_string())
    });
    let r: serde_json::Value = serde_json::from_str(breaks.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&r["sidecar"], &r["rule"]),
        (&CONTROL.into(), &"unlinked".into()),
        "{r}"
    );
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .starts_with("record 179 does not link"),
        "{r}"
    );
}

/// One connection through A's outbound port to B's echo workload; None if it failed.
fn echo_call(a_out: u16) -> Option<()> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a_out)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    echoes(&mut s, b"call\n").then_some(())
}

/// `name` (a gauge of the audit spool) on `s`'s /metrics.
fn audit_seq(s: &Sidecar, name: &str) -> f64 {
    metric(&s.metrics(), &format!("{name} "), &[]).unwrap_or(0.0)
}

/// Waits until the control plane has acknowledged every record `s` spooled; how many.
fn all_acknowledged(s: &Sidecar) -> f64 {
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        let (spooled, acked) = (
            audit_seq(s, "sigil_audit_spooled_seq"),
            audit_seq(s, "sigil_audit_acknowledged_seq"),
        );
        (spooled > 0.0 && spooled == acked)
            .then_some(spooled)
            .ok_or_else(|| format!("spooled {spooled}, acknowledged {acked}"))
    })
}

/// The `sigil audit verify` line of a whole chain of `spooled` records from the spool in
/// `d/spool`.
fn whole_chain(d: &std::path::Path, spool: &str, id: &str, spooled: f64) -> String {
    let chain = std::fs::read_to_string(d.join(spool).join("chain")).unwrap();
    format!(
        "{id} chain={} records={spooled} last={spooled} ok",
        chain.trim()
    )
}

/// B's own stored records of `kind` (`sigil audit query --json`), oldest first.
fn b_records(cp: &ControlPlane, ops: &IdentityFiles, kind: &str) -> Vec<serde_json::Value> {
    let args = [
        "audit",
        "query",
        "--identity",
        B,
        "--kind",
        kind,
        "--json",
        "--limit",
        "100000",
    ];
    let (code, out, err) = cp.sigil(ops, &args);
    assert_eq!(code, Some(0), "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["local_id"] == B)
        .collect()
}

/// A control plane in `d` with an SVID of a new CA, and the files of the operator ALICE, of
/// A and of B, from the same CA.
fn control_and_identities(
    d: &std::path::Path,
) -> (ControlPlane, IdentityFiles, IdentityFiles, IdentityFiles) {
    let ca = Ca::new("example.org");
    let cp = ControlPlane::start_in(d, &ca, CONTROL);
    let ops = write_identity(d, "ops", &ca, ALICE, &[&ca]);
    let (fa, fb) = (
        write_identity(d, "a", &ca, A, &[&ca]),
        write_identity(d, "b", &ca, B, &[&ca]),
    );
    (cp, ops, fa, fb)
}

/// A control plane, and A calling an echo workload behind B: A's audit spool with `when_full`
/// and `max_bytes` (0: the default); B audited too (fail-open) if `b_audited`. A is not
/// started (a test may kill and restart it).
struct Mesh {
    cp: ControlPlane,
    ops: IdentityFiles,
    a: Sidecar,
    fa: IdentityFiles,
    b: Sidecar,
    fb: IdentityFiles,
    a_out: u16,
    _echo: Proc,
    _pb: Proc,
}

impl Mesh {
    fn start(
        d: &std::path::Path,
        (when_full, max_bytes): (&'static str, u64),
        b_audited: bool,
    ) -> Self {
        let (cp, ops, fa, fb) = control_and_identities(d);
        let (echo, echo_port) = start_workload("b-echo", true);
        let (b_in, a_out) = (free_port(), free_port());
        let mut b = Sidecar::new("sidecar-b", B);
        b.inbound = vec![(b_in, echo_port)];
        b.allow = vec![(echo_port, vec![A.into()])];
        if b_audited {
            b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
            b.audit = Some((d.join("spool-b"), "fail-open", 0));
        }
        let mut a = Sidecar::new("sidecar-a", A);
        a.outbound = vec![(a_out, b_in, B.into())];
        a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
        a.audit = Some((d.join("spool-a"), when_full, max_bytes));
        let pb = b.start(d, &fb);
        Self {
            cp,
            ops,
            a,
            fa,
            b,
            fb,
            a_out,
            _echo: echo,
            _pb: pb,
        }
    }
}

/// The sidecars' audit stream end to end: A calls B through both sidecars, each spooling a
/// record per connection open and close; the control plane goes away for a while (records
/// wait in the spools), A is SIGKILLed and restarted meanwhile, the control plane comes back;
/// every record reaches it, in one unbroken chain per sidecar, none lost.
#[test]
fn every_connection_record_reaches_the_control_plane_across_an_outage() {
    let dir = TempDir::new("audit-sidecars");
    let d = dir.path();
    let Mesh {
        cp,
        ops,
        a,
        fa,
        b,
        fb,
        a_out,
        _echo,
        _pb,
    } = Mesh::start(d, ("fail-open", 0), true);
    let mut pa = a.start(d, &fa);
    let calls = |n: usize| {
        for i in 0..n {
            let mut s = echo_stream(a_out, format!("call {i}\n").as_bytes());
            assert!(
                echoes(&mut s, b"again\n"),
                "call {i} through A and B failed"
            );
        }
    };
    calls(20);
    // The last closes are recorded as the connections wind down.
    std::thread::sleep(Duration::from_secs(1));
    all_acknowledged(&a);
    all_acknowledged(&b);

    // The control plane away: the sidecars serve on, their records wait in the spools.
    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    calls(30);
    std::thread::sleep(Duration::from_secs(1));
    let waiting =
        audit_seq(&a, "sigil_audit_spooled_seq") - audit_seq(&a, "sigil_audit_acknowledged_seq");
    assert!(waiting >= 60.0, "A's records wait in its spool: {waiting}");
    // A killed outright with its spool full of unshipped records, and started again: they
    // are still there, and its chain goes on.
    let before_kill = audit_seq(&a, "sigil_audit_spooled_seq");
    pa.signal(libc::SIGKILL);
    poll(Duration::from_secs(10), Duration::from_millis(50), || {
        pa.try_wait()
            .map(|_| ())
            .ok_or_else(|| "still running".to_string())
    });
    let pa = a.start(d, &fa);
    assert_eq!(
        audit_seq(&a, "sigil_audit_spooled_seq"),
        before_kill,
        "{}",
        pa.log()
    );
    calls(5);
    std::thread::sleep(Duration::from_secs(1));
    let cp = cp.start_again();
    let spooled_a = all_acknowledged(&a);
    let spooled_b = all_acknowledged(&b);
    assert_eq!(
        metric(&a.metrics(), "sigil_audit_records_lost_total ", &[]),
        Some(0.0)
    );

    // Every record is stored, each sidecar's chain whole.
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    for (id, spool, spooled) in [(A, "spool-a", spooled_a), (B, "spool-b", spooled_b)] {
        let want = whole_chain(d, spool, id, spooled);
        assert!(out.lines().any(|l| l == want), "{want:?} in:\n{out}");
    }

    // Queried: A's own connection opens (55 calls), as text and as JSON lines.
    let query = |extra: &[&str]| {
        let mut args = vec![
            "audit",
            "query",
            "--identity",
            A,
            "--kind",
            "connection_open",
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = cp.sigil(&ops, &args);
        assert_eq!(code, Some(0), "{out}{err}");
        out
    };
    let text = query(&[]);
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&format!(" {A} #")))
        .collect();
    assert_eq!(mine.len(), 55, "{text}");
    assert!(
        mine.iter().all(|l| l.contains(&format!("peer={B}"))),
        "{text}"
    );
    // Each of A's closes names its peer exactly and the connection its open named.
    let conn_of = |l: &str| {
        l.split(' ')
            .find_map(|f| f.strip_prefix("conn="))
            .map(str::to_string)
    };
    let opened: Vec<String> = mine.iter().filter_map(|l| conn_of(l)).collect();
    assert_eq!(opened.len(), 55, "{text}");
    let (code, closes, err) = cp.sigil(
        &ops,
        &[
            "audit",
            "query",
            "--identity",
            A,
            "--kind",
            "connection_close",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let closes: Vec<&str> = closes
        .lines()
        .filter(|l| l.contains(&format!(" {A} #")))
        .collect();
    assert_eq!(closes.len(), 55, "{closes:?}");
    for l in &closes {
        assert!(l.contains(&format!("peer={B}")), "{l}");
        let conn = conn_of(l).unwrap_or_else(|| panic!("no conn in {l}"));
        assert!(opened.contains(&conn), "{l}: no open with conn={conn}");
    }
    let json = query(&["--json", "--limit", "3"]);
    let rows: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 3, "{json}");
    assert_eq!(rows[0]["kind"], "connection_open");
    assert!(rows[0]["time"].as_str().unwrap().ends_with('Z'), "{json}");
    // An open carries the TLS session, both addresses and the serial of the SVID B presented.
    let pem = std::fs::read(&fb.cert).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let serial: String = pem
        .parse_x509()
        .unwrap()
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let opens: Vec<serde_json::Value> = query(&["--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["local_id"] == A)
        .collect();
    assert_eq!(opens.len(), 55);
    // B admitted each connection by its TCP rule (here from its config: nothing is applied
    // to the control plane, whose snapshot is version 0), which its open names; A's outbound
    // opens have no rule of their own (B decides).
    let b_opens: Vec<serde_json::Value> = query(&["--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["local_id"] == B)
        .collect();
    assert_eq!(b_opens.len(), 55);
    for r in &b_opens {
        assert!(!r["rule"].as_str().unwrap().is_empty(), "{r}");
        assert_eq!(r["mode"], "enforce", "{r}");
    }
    for r in &opens {
        assert_eq!((&r["rule"], &r["mode"]), (&"".into(), &"".into()), "{r}");
        assert_eq!(r["peer_serial"], serial.as_str(), "{r}");
        assert_eq!(r["tls_version"], "TLSv1_3", "{r}");
        assert!(r["cipher"].as_str().unwrap().starts_with("TLS13_"), "{r}");
        assert_eq!(r["protocol"], "tcp", "{r}");
        let peer_addr = r["peer_addr"].as_str().unwrap();
        assert!(peer_addr.starts_with("127.0.0.1:"), "{r}");
        assert!(
            r["local_addr"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{r}"
        );
    }
    // A close, the bytes each way: "call i\n" out and back, then "again\n" out and back.
    let (code, json, err) = cp.sigil(
        &ops,
        &[
            "audit",
            "query",
            "--identity",
            A,
            "--kind",
            "connection_close",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let mut sizes: Vec<(u64, u64)> = json
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["local_id"] == A)
        .map(|r| {
            (
                r["bytes_out"].as_u64().unwrap(),
                r["bytes_in"].as_u64().unwrap(),
            )
        })
        .collect();
    sizes.sort();
    let mut want: Vec<(u64, u64)> = (0..20)
        .chain(0..30)
        .chain(0..5)
        .map(|i| {
            let n = (format!("call {i}\n").len() + "again\n".len()) as u64;
            (n, n)
        })
        .collect();
    want.sort();
    assert_eq!(sizes, want, "{json}");
    // Exported: every open with A on either side, as JSON lines, page after page.
    let (code, out, err) = cp.sigil(
        &ops,
        &[
            "audit",
            "export",
            "--identity",
            A,
            "--kind",
            "connection_open",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines().count(),
        110,
        "A's 55 and B's 55 with peer A:\n{out}"
    );
    assert!(out
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));

    // Followed: a tail started now prints the records of connections made after it.
    let mut tail = Proc::spawn(
        "sigil audit tail",
        std::process::Command::new(bin("sigil"))
            .args([
                "audit",
                "tail",
                "--identity",
                A,
                "--kind",
                "connection_close",
                "--since",
                "1s",
            ])
            .env("SIGIL_SERVER", format!("127.0.0.1:{}", cp.operator_port))
            .env("SIGIL_CONTROL_ID", CONTROL)
            .env("SIGIL_CERT", &ops.cert)
            .env("SIGIL_KEY", &ops.key)
            .env("SIGIL_BUNDLE_DIR", &ops.bundle_dir),
    );
    std::thread::sleep(Duration::from_secs(2));
    calls(3);
    poll(Duration::from_secs(15), Duration::from_millis(200), || {
        let closes = tail
            .log()
            .lines()
            .filter(|l| l.contains(&format!(" {A} #")) && l.contains("connection_close"))
            .count();
        (closes >= 3)
            .then_some(())
            .ok_or_else(|| format!("{closes} closes followed:\n{}", tail.log()))
    });
    tail.terminate(Duration::from_secs(5));

    // A filter that is not one is refused, naming it.
    let (code, _, err) = cp.sigil(&ops, &["audit", "query", "--kind", "connection_lost"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a record kind"), "{err}");
}

/// `whenFull: fail-closed`: with the control plane away, A's spool fills up, and from 90 %
/// on A refuses new connections rather than lose their records; once the control plane is
/// back and acknowledges, A serves again, and not one record was lost.
#[test]
fn a_full_fail_closed_spool_refuses_connections_and_loses_no_record() {
    let dir = TempDir::new("audit-full");
    let d = dir.path();
    let Mesh {
        cp,
        ops,
        a,
        fa,
        a_out,
        _echo,
        _pb,
        ..
    } = Mesh::start(d, ("fail-closed", 1 << 20), false);
    let pa = a.start(d, &fa);
    let call = || echo_call(a_out);
    assert_eq!(call(), Some(()), "{}", pa.log());

    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    // Bounded: a 1 MiB spool holds a few thousand records.
    let mut served = 0;
    let refused_at = (0..20_000).find(|_| {
        let ok = call().is_some();
        served += usize::from(ok);
        !ok
    });
    assert!(
        refused_at.is_some(),
        "never refused after {served} calls:\n{}",
        pa.log()
    );
    let refused = metric(
        &a.metrics(),
        "sigil_connections_refused_total{",
        &["reason=\"audit_spool_full\""],
    )
    .unwrap_or(0.0);
    assert!(refused >= 1.0, "{}", a.metrics());
    assert_eq!(
        call(),
        None,
        "still refused while the control plane is away"
    );

    let cp = cp.start_again();
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        call().ok_or_else(|| format!("A does not serve again:\n{}", pa.log()))
    });
    assert_eq!(
        metric(&a.metrics(), "sigil_audit_records_lost_total ", &[]),
        Some(0.0),
        "{}",
        a.metrics()
    );
    std::thread::sleep(Duration::from_secs(1));
    let spooled = all_acknowledged(&a);
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let want = whole_chain(d, "spool-a", A, spooled);
    assert!(out.lines().any(|l| l == want), "{want:?} in:\n{out}");
}

/// Fail-open: with the control plane away, A's 1 MiB spool fills and A keeps serving; it drops
/// its oldest records and a `Dropped` record says which. Once the control plane is back, the
/// chain it holds is whole but for exactly those records, and `sigil audit verify` accounts
/// for them instead of calling them a break.
#[test]
fn a_full_fail_open_spool_keeps_serving_and_accounts_for_every_record_it_drops() {
    let dir = TempDir::new("audit-open");
    let d = dir.path();
    let Mesh {
        cp,
        ops,
        a,
        fa,
        a_out,
        _echo,
        _pb,
        ..
    } = Mesh::start(d, ("fail-open", 1 << 20), false);
    let pa = a.start(d, &fa);
    let call = || echo_call(a_out);
    assert_eq!(call(), Some(()), "{}", pa.log());

    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    // Bounded: a 1 MiB spool holds a few thousand records; a call spools two.
    let lost = || metric(&a.metrics(), "sigil_audit_records_lost_total ", &[]).unwrap_or(0.0);
    let mut calls = 0;
    while lost() == 0.0 && calls < 20_000 {
        for _ in 0..200 {
            assert_eq!(call(), Some(()), "fail-open refused a call:\n{}", pa.log());
            calls += 1;
        }
    }
    let dropped = lost();
    assert!(dropped > 0.0, "nothing dropped after {calls} calls");

    let cp = cp.start_again();
    let spooled = all_acknowledged(&a);
    assert_eq!(lost(), dropped, "no more lost once shipping");
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let chain = std::fs::read_to_string(d.join("spool-a").join("chain")).unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{A} chain={} ", chain.trim())))
        .unwrap_or_else(|| panic!("no line for A's chain in:\n{out}"));
    assert!(
        line.ends_with(&format!(" last={spooled} lost_by_sidecar={dropped} ok")),
        "{line}"
    );
    // Every record is stored but for those lost; a lost one may have reached the control
    // plane before it went away (sent, not yet acknowledged).
    let records: f64 = line
        .split(' ')
        .find_map(|f| f.strip_prefix("records="))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        records >= spooled - dropped && records < spooled,
        "{records} stored of {spooled}, {dropped} lost: {line}"
    );
    let (code, out, err) = cp.sigil(&ops, &["audit", "query", "--kind", "dropped", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let said: f64 = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["dropped"].as_f64().unwrap()
        })
        .sum();
    assert_eq!(said, dropped, "the Dropped records say how many:\n{out}");
}

/// HTTP: B records each request it denies (the route that decided, the method and the path)
/// and counts those it allows by route in the close record of the connection they came on.
#[test]
fn denied_requests_are_recorded_one_by_one_and_allowed_ones_counted_by_route() {
    let dir = TempDir::new("audit-http");
    let d = dir.path();
    let (cp, ops, fa, fb) = control_and_identities(d);
    let (_web, web_port) = start_workload("b-web", false);
    let (_echo, echo_port) = start_workload("b-echo", true);
    let (_closed, closed_port) = start_workload("b-closed", true);
    // A dry-run rule would deny A's GET /orders/4 and its TCP connections to the echo port;
    // a rule denies A the closed port.
    let ports = format!(
        "    - port: {web_port}\n      protocol: http\n      routes:\n\
         \x20       - {{name: orders, match: {{methods: [GET], path: {{prefix: /orders}}}}, allow: [{A}]}}\n\
         \x20       - {{name: watch, match: {{path: {{prefix: /orders/4}}}}, deny: [{A}], mode: dry-run}}\n\
         \x20   - port: {echo_port}\n      protocol: tcp\n      rules:\n\
         \x20       - {{name: stream, allow: [{A}]}}\n\
         \x20       - {{name: watch-stream, deny: [{A}], mode: dry-run}}\n\
         \x20   - port: {closed_port}\n      protocol: tcp\n      rules:\n\
         \x20       - {{name: block, deny: [{A}]}}\n"
    );
    cp.apply(
        &ops,
        &d.join("policy.yaml"),
        &policy("b-web", "a reads orders", B, &ports),
    );
    let (b_in, a_out) = (free_port(), free_port());
    let (b_echo_in, a_echo_out) = (free_port(), free_port());
    let (b_closed_in, a_closed_out) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![
        (b_in, web_port),
        (b_echo_in, echo_port),
        (b_closed_in, closed_port),
    ];
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.audit = Some((d.join("spool-b"), "fail-open", 0));
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![
        (a_out, b_in, B.into()),
        (a_echo_out, b_echo_in, B.into()),
        (a_closed_out, b_closed_in, B.into()),
    ];
    // The pooled connection to B closes soon after the last request: its close record comes.
    // One worker: one pooled connection carries every request.
    a.pool_idle = "1s";
    a.workers = Some(1);
    let mut pb = b.start(d, &fb);
    let pa = a.start(d, &fa);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], a_out));
    let mut allowed = 0u64;
    poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let got = sigil_testkit::http::get_close(addr, "/orders/0").map(|r| r.0);
        allowed += u64::from(got == Some(200));
        (got == Some(200))
            .then_some(())
            .ok_or_else(|| format!("GET /orders/0: {got:?}\n{}", pa.log()))
    });
    for i in 1..=4 {
        let got = sigil_testkit::http::get_close(addr, &format!("/orders/{i}")).map(|r| r.0);
        assert_eq!(got, Some(200));
        allowed += 1;
    }
    for _ in 0..3 {
        let got = sigil_testkit::http::get_close(addr, "/admin/users").map(|r| r.0);
        assert_eq!(got, Some(403));
    }
    assert!(echo_call(a_echo_out).is_some(), "A's TCP call to B's echo");
    assert!(
        echo_call(a_closed_out).is_none(),
        "A's TCP call to the closed port"
    );
    let query = |kind: &str| b_records(&cp, &ops, kind);
    let counted = poll(Duration::from_secs(30), Duration::from_millis(300), || {
        let counted: u64 = query("connection_close")
            .iter()
            .flat_map(|r| r["allowed"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["route"] == "b-web/orders" && c["method"] == "GET")
            .map(|c| c["count"].as_u64().unwrap())
            .sum();
        (counted == allowed)
            .then_some(counted)
            .ok_or_else(|| format!("{counted} of {allowed} allowed requests counted"))
    });
    assert_eq!(counted, allowed);
    let denied: Vec<serde_json::Value> = query("request_denied")
        .into_iter()
        .filter(|r| r["detail"] == "path /admin/users")
        .collect();
    assert_eq!(denied.len(), 3, "{denied:?}");
    for r in &denied {
        assert_eq!(r["peer_id"], A, "{r}");
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["route"], "default_deny", "{r}");
        assert_eq!(r["method"], "GET", "{r}");
        assert_eq!(r["port"], web_port, "{r}");
        assert!(r["policy_version"].as_u64().unwrap() > 0, "{r}");
        assert!(r["conn"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(
        query("request_allowed").is_empty(),
        "allowed requests get no record of their own by default"
    );
    // What the dry-run rules would have denied: GET /orders/4 (allowed, served), and the TCP
    // connection, joined to its open record by `conn`.
    let would = query("would_deny");
    let http: Vec<_> = would.iter().filter(|r| r["port"] == web_port).collect();
    assert_eq!(http.len(), 1, "{would:?}");
    let w = http[0];
    assert_eq!(
        (&w["policy"], &w["rule"], &w["mode"], &w["decision"]),
        (
            &"b-web".into(),
            &"watch".into(),
            &"dry-run".into(),
            &"deny".into()
        ),
        "{w}"
    );
    assert_eq!(
        (&w["method"], &w["detail"]),
        (&"GET".into(), &"path /orders/4".into()),
        "{w}"
    );
    let tcp: Vec<_> = would.iter().filter(|r| r["port"] == echo_port).collect();
    assert_eq!(tcp.len(), 1, "{would:?}");
    let opens: Vec<_> = query("connection_open")
        .into_iter()
        .filter(|r| r["port"] == echo_port)
        .collect();
    assert_eq!(opens.len(), 1, "{opens:?}");
    assert_eq!(
        (
            &opens[0]["rule"],
            &opens[0]["mode"],
            &tcp[0]["rule"],
            &tcp[0]["mode"]
        ),
        (
            &"stream".into(),
            &"enforce".into(),
            &"watch-stream".into(),
            &"dry-run".into()
        ),
    );
    assert_eq!(tcp[0]["conn"], opens[0]["conn"]);
    // The refusal names the rule that refused, its policy and the version that decided.
    let refused = query("connection_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    let r = &refused[0];
    assert_eq!(
        (
            &r["peer_id"],
            &r["policy"],
            &r["rule"],
            &r["mode"],
            &r["detail"]
        ),
        (
            &A.into(),
            &"b-web".into(),
            &"block".into(),
            &"enforce".into(),
            &"not_allowed".into()
        ),
        "{r}"
    );
    for version in ["policy_version", "bundle_version"] {
        assert_eq!(r[version], opens[0][version], "{r}");
    }
    // The policies came with a snapshot; the bundles are B's files alone.
    assert!(r["policy_version"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["bundle_version"], 0, "{r}");
    // The policy applied is a record of the control plane's, with the operator who did it.
    let (code, out, err) = cp.sigil(&ops, &["audit", "query", "--kind", "change", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let change: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&change["actor"], &change["subject"], &change["decision"]),
        (&ALICE.into(), &"Policy/b-web".into(), &"created".into()),
        "{change}"
    );

    // A peer cannot fill the spool with requests it knows are denied: past 1,000 records on
    // one connection, denied requests are counted in its close record instead.
    for _ in 0..1_100 {
        let got = sigil_testkit::http::get_close(addr, "/admin/users").map(|r| r.0);
        assert_eq!(got, Some(403));
    }
    let (recorded, counted) = poll(Duration::from_secs(30), Duration::from_millis(300), || {
        let recorded = query("request_denied")
            .iter()
            .filter(|r| r["detail"] == "path /admin/users")
            .count() as u64;
        let counted: u64 = query("connection_close")
            .iter()
            .flat_map(|r| r["denied"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["route"] == "default_deny" && c["method"] == "GET")
            .map(|c| c["count"].as_u64().unwrap())
            .sum();
        (recorded + counted == 1_103)
            .then_some((recorded, counted))
            .ok_or_else(|| format!("{recorded} recorded and {counted} counted of 1103"))
    });
    assert!(counted > 0, "{recorded} recorded one by one, none counted");

    // With `requests: all`, each allowed request gets its record too.
    assert_eq!(pb.terminate(Duration::from_secs(10)), Some(0));
    b.audit_every_request = true;
    let _pb = b.start(d, &fb);
    poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let got = sigil_testkit::http::get_close(addr, "/orders/77").map(|r| r.0);
        (got == Some(200))
            .then_some(())
            .ok_or_else(|| format!("GET /orders/77 after B's restart: {got:?}"))
    });
    let records = poll(Duration::from_secs(30), Duration::from_millis(300), || {
        let records = query("request_allowed");
        (!records.is_empty())
            .then_some(records)
            .ok_or_else(|| "no request_allowed record".to_string())
    });
    assert!(
        records.iter().all(|r| r["detail"] == "path /orders/77"
            && r["route"] == "b-web/orders"
            && r["policy"] == "b-web"
            && r["rule"] == "orders"
            && r["decision"] == "allow"
            && r["mode"] == "enforce"),
        "{records:?}"
    );
}

/// Every kind of tampering with the stored records, each on its own copy of a store that
/// verifies, is named by `sigil audit verify` (exit 1): an edited record, a deleted one, two
/// swapped, a tail cut off (with or without its checkpoints), an edit of the last
/// checkpointed record, a forged checkpoint.
#[test]
fn every_kind_of_tampering_with_the_stored_records_is_named_by_sigil_audit_verify() {
    let dir = TempDir::new("audit-tamper");
    let d = dir.path();
    let Mesh {
        cp,
        ops,
        a,
        fa,
        a_out,
        _echo,
        _pb,
        ..
    } = Mesh::start(d, ("fail-open", 0), false);
    let _pa = a.start(d, &fa);
    for _ in 0..20 {
        assert_eq!(echo_call(a_out), Some(()));
    }
    std::thread::sleep(Duration::from_secs(1));
    all_acknowledged(&a);
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    let db = d.join("control-data").join("audit.db");
    // The last record of A's chain as stored (a close may have come after the count above).
    let last: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT MAX(seq) FROM audit_records WHERE sidecar = ?1",
            [A],
            |r| r.get(0),
        )
        .unwrap();
    assert!(last >= 40, "{last}");
    let pristine = d.join("audit.db.pristine");
    std::fs::copy(&db, &pristine).unwrap();
    let a_rows = format!("sidecar = '{A}'");
    let cases: Vec<(String, String)> = vec![
        (
            format!("UPDATE audit_records SET record = CAST(record || X'00' AS BLOB) WHERE {a_rows} AND seq = 10"),
            "record 11 does not link to the record before it".into(),
        ),
        (
            format!("DELETE FROM audit_records WHERE {a_rows} AND seq = 20"),
            "record 21 where 20 was due".into(),
        ),
        (
            format!(
                "UPDATE audit_records SET seq = -1 WHERE {a_rows} AND seq = 30;
                 UPDATE audit_records SET seq = 30 WHERE {a_rows} AND seq = 31;
                 UPDATE audit_records SET seq = 31 WHERE {a_rows} AND seq = -1;"
            ),
            "record 30 does not link to the record before it".into(),
        ),
        (
            format!("DELETE FROM audit_records WHERE {a_rows} AND seq > {}", last - 3),
            format!("the records end at {}, but a checkpoint vouches for records up to {last}", last - 3),
        ),
        (
            // The tail cut off with the checkpoints vouching for it: the latest checkpoint
            // kept in the control plane's own store (sigil.db, not copied) still does.
            format!(
                "DELETE FROM audit_records WHERE {a_rows} AND seq > {cut};
                 DELETE FROM audit_checkpoints WHERE {a_rows} AND seq > {cut};",
                cut = last - 3
            ),
            format!(
                "the records end at {}, but the checkpoint kept in the control plane's store vouches for records up to {last}",
                last - 3
            ),
        ),
        (
            // Made text on the way: still read as the bytes it holds.
            format!("UPDATE audit_records SET record = record || X'00' WHERE {a_rows} AND seq = {last}"),
            format!("the chain up to record {last} differs from the signed checkpoint"),
        ),
        (
            format!("UPDATE audit_checkpoints SET head = zeroblob(32) WHERE {a_rows} AND seq = {last}"),
            format!("the checkpoint at record {last} is not the sidecar's"),
        ),
    ];
    for (sql, named) in cases {
        // A clean stop leaves no write-ahead log; none from a run before may pass for this copy's.
        for ext in ["audit.db-wal", "audit.db-shm"] {
            assert!(!db.with_file_name(ext).exists(), "{ext} left behind");
        }
        std::fs::copy(&pristine, &db).unwrap();
        let tamper = rusqlite::Connection::open(&db).unwrap();
        tamper.execute_batch(&sql).unwrap();
        assert!(tamper.changes() >= 1, "{sql}");
        drop(tamper);
        cp = cp.start_again();
        let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
        assert_eq!(code, Some(1), "{sql}\n{out}{err}");
        assert!(
            out.contains(&named) || err.contains(&named),
            "{sql}: {named:?} not in\n{out}{err}"
        );
        assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    }
    // History re-signed: the last checkpoint signed again, validly, by an SVID with A's ID
    // from a CA of the tamperer's own. Its signature verifies; its signer does not chain.
    std::fs::copy(&pristine, &db).unwrap();
    let tamper = rusqlite::Connection::open(&db).unwrap();
    let head: Vec<u8> = tamper
        .query_row(
            "SELECT head FROM audit_checkpoints WHERE sidecar = ?1 AND seq = ?2",
            rusqlite::params![A, last],
            |r| r.get(0),
        )
        .unwrap();
    let forged = Ca::new("example.org").svid(A);
    let forger = LocalIdentity::from_pem(
        forged.chain_pem().as_bytes(),
        forged.key_pem().as_bytes(),
        UnixTime::now(),
        None,
        &sigil_filters::tls::provider(),
    )
    .unwrap();
    let head: Hash = head.try_into().unwrap();
    let signature = sign_checkpoint(&forger, last as u64, &head).unwrap();
    tamper
        .execute(
            "UPDATE audit_checkpoints SET signature = ?1, signer = ?2 WHERE sidecar = ?3 AND seq = ?4",
            rusqlite::params![signature, forger.chain()[0].to_vec(), A, last],
        )
        .unwrap();
    drop(tamper);
    let cp = cp.start_again();
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let named = format!(
        "the checkpoint at record {last} is not the sidecar's: its SVID does not chain to a root this control plane trusts or trusted"
    );
    assert!(
        out.contains(&named) || err.contains(&named),
        "{named:?} not in\n{out}{err}"
    );
}

/// A 60-second control-plane outage under steady load: A and B serve on, their records wait
/// in the spools, and once the control plane is back every record reaches it. Counted at the
/// source (two records per call on each side) and in the store: none lost, none twice.
#[test]
fn a_sixty_second_control_plane_outage_under_load_loses_no_record() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = TempDir::new("audit-outage-60");
    let d = dir.path();
    let Mesh {
        cp,
        ops,
        a,
        fa,
        b,
        a_out,
        _echo,
        _pb,
        ..
    } = Mesh::start(d, ("fail-open", 0), true);
    let _pa = a.start(d, &fa);
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, calls, failed) = (stop.clone(), calls.clone(), failed.clone());
        // Bounded: by the flag, and by 100,000 calls at most.
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && calls.load(Ordering::Relaxed) < 100_000 {
                match echo_call(a_out) {
                    Some(()) => calls.fetch_add(1, Ordering::Relaxed),
                    None => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let mut cp = cp;
    assert_eq!(cp.proc.terminate(Duration::from_secs(10)), Some(0));
    std::thread::sleep(Duration::from_secs(60));
    let waiting =
        audit_seq(&a, "sigil_audit_spooled_seq") - audit_seq(&a, "sigil_audit_acknowledged_seq");
    let cp = cp.start_again();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (calls, failed) = (
        calls.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert_eq!(failed, 0, "calls failed during the outage");
    assert!(
        waiting > 1_000.0,
        "A's records waited in its spool: {waiting}"
    );
    // The last closes are recorded as the connections wind down.
    std::thread::sleep(Duration::from_secs(1));
    let (spooled_a, spooled_b) = (all_acknowledged(&a), all_acknowledged(&b));
    assert_eq!(
        spooled_a,
        2.0 * calls as f64,
        "A: an open and a close per call"
    );
    assert_eq!(
        spooled_b,
        2.0 * calls as f64,
        "B: an open and a close per call"
    );
    for s in [&a, &b] {
        assert_eq!(
            metric(&s.metrics(), "sigil_audit_records_lost_total ", &[]),
            Some(0.0)
        );
    }
    let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    for (id, spool, spooled) in [(A, "spool-a", spooled_a), (B, "spool-b", spooled_b)] {
        let want = whole_chain(d, spool, id, spooled);
        assert!(out.lines().any(|l| l == want), "{want:?} in:\n{out}");
    }
}

/// `--audit-retention`: records older than it leave from the start of their chain, and the
/// records kept still verify from where the chain was cut.
#[test]
fn retention_removes_old_records_and_what_is_kept_verifies() {
    let dir = TempDir::new("audit-retention");
    let d = dir.path();
    let ca = Ca::new("example.org");
    let cp = ControlPlane::start_with_args(
        CONTROL,
        write_identity(d, "control", &ca, CONTROL, &[&ca]),
        StoreAt::Dir(d.join("control-data")),
        free_port(),
        free_port(),
        vec!["--audit-retention".into(), "2s".into()],
    );
    let ops = write_identity(d, "ops", &ca, ALICE, &[&ca]);
    let (identity, bundles, mut chain) = stand_in(d, &ca);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let old = chain.batch(50);
    rt.block_on(ship(cp.sidecar_port, &identity, bundles.clone(), vec![old]));
    std::thread::sleep(Duration::from_secs(3));
    let new = chain.batch(10);
    rt.block_on(ship(cp.sidecar_port, &identity, bundles, vec![new]));
    // Records 51 to 60 grow old too while this runs: the cut is at 50 at least, and every
    // record after it is kept and verifies.
    let field = |l: &str, name: &str| {
        l.split(' ')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let line = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
        assert_eq!(code, Some(0), "{out}{err}");
        out.lines()
            .find(|l| l.starts_with(A) && field(l, "pruned_through=").is_some_and(|p| p >= 50))
            .map(str::to_string)
            .ok_or_else(|| format!("records 1 to 50 not removed yet:\n{out}"))
    });
    let (records, pruned) = (field(&line, "records="), field(&line, "pruned_through="));
    assert_eq!(records.zip(pruned).map(|(r, p)| r + p), Some(60), "{line}");
    assert!(
        line.contains(" last=60 ") && line.ends_with(" ok"),
        "{line}"
    );
}

/// Two `sigil-control` replicas on one etcd, their audit records in one PostgreSQL (Debian's
/// server, TLS only, a client certificate required): B's records, shipped to replica 2, then
/// (after B restarts pointed at replica 1) to replica 1, form one unbroken chain that either
/// replica verifies and serves; A's records, shipped to replica 1, are queried at replica 2.
/// B's tail cut off in the database with its checkpoints is named through the latest
/// checkpoint kept in etcd. A replica given another CA for the database's certificate does
/// not start, and says why; nor does one given a file of its own.
#[test]
fn replicas_sharing_one_postgresql_ingest_and_serve_the_same_records() {
    let dir = TempDir::new("audit-pg");
    let d = dir.path();
    if !require_tool("etcd", "audit on PostgreSQL") {
        return;
    }
    let Some(pg) = PgServer::start(d, "audit on PostgreSQL") else {
        return;
    };
    let etcd = EtcdServer::start(d);
    let ca = Ca::new("example.org");
    let replica = |name: &str, extra: Vec<String>| {
        ControlPlane::start_with_args(
            CONTROL,
            write_identity(d, name, &ca, CONTROL, &[&ca]),
            etcd.store_at(etcd.client_port),
            free_port(),
            free_port(),
            extra,
        )
    };
    let cp1 = replica("control-1", pg.audit_args());
    let cp2 = replica("control-2", pg.audit_args());
    let ops = write_identity(d, "ops", &ca, ALICE, &[&ca]);
    let (fa, fb) = (
        write_identity(d, "a", &ca, A, &[&ca]),
        write_identity(d, "b", &ca, B, &[&ca]),
    );
    let (_echo, echo_port) = start_workload("b-echo", true);
    let (b_in, a_out) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_in, echo_port)];
    b.allow = vec![(echo_port, vec![A.into()])];
    b.control_plane = Some((cp2.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.audit = Some((d.join("spool-b"), "fail-closed", 0));
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_out, b_in, B.into())];
    a.control_plane = Some((cp1.sidecar_port, CONTROL.into(), d.join("state-a")));
    a.audit = Some((d.join("spool-a"), "fail-closed", 0));
    let mut pb = b.start(d, &fb);
    let _pa = a.start(d, &fa);
    let calls = |n: usize| {
        for i in 0..n {
            assert!(
                echo_call(a_out).is_some(),
                "call {i} through A and B failed"
            );
        }
        // The last closes are recorded as the connections wind down.
        std::thread::sleep(Duration::from_secs(1));
    };
    calls(10);
    let b_first = all_acknowledged(&b);
    // B again, shipping to the other replica: its chain goes on from the head stored there.
    assert_eq!(
        pb.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        pb.log()
    );
    b.control_plane = Some((cp1.sidecar_port, CONTROL.into(), d.join("state-b")));
    let _pb = b.start(d, &fb);
    calls(10);
    let spooled_a = all_acknowledged(&a);
    let spooled_b = all_acknowledged(&b);
    assert!(spooled_b > b_first, "B recorded more after its restart");

    // A change through each replica, kept in each replica's own chain.
    for (i, cp) in [&cp1, &cp2].into_iter().enumerate() {
        let name = format!("w{i}");
        let yaml = workload_yaml(
            &name,
            &format!("spiffe://example.org/ns/demo/sa/{name}"),
            "",
        );
        cp.apply(&ops, &d.join(format!("{name}.yaml")), &yaml);
    }
    // Either replica verifies every chain, the sidecars' and each replica's own.
    for cp in [&cp1, &cp2] {
        let (code, out, err) = cp.sigil(&ops, &["audit", "verify"]);
        assert_eq!(code, Some(0), "{out}{err}");
        for (id, spool, spooled) in [(A, "spool-a", spooled_a), (B, "spool-b", spooled_b)] {
            let want = whole_chain(d, spool, id, spooled);
            assert!(out.lines().any(|l| l == want), "{want:?} in:\n{out}");
        }
        let own = out
            .lines()
            .filter(|l| l.starts_with(&format!("{CONTROL} ")) && l.ends_with(" ok"))
            .count();
        assert_eq!(own, 2, "each replica's own chain: {out}");
    }
    // A's connection opens (20 calls), shipped to replica 1, queried at replica 2.
    let (code, out, err) = cp2.sigil(
        &ops,
        &[
            "audit",
            "query",
            "--identity",
            A,
            "--kind",
            "connection_open",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let mine = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|r| r["sidecar"] == A)
        .count();
    assert_eq!(mine, 20, "{out}");

    // B's tail cut off in the database together with its checkpoints, as the database's own
    // administrator could: the latest checkpoint kept in etcd names it (once a replica has
    // kept it there, within 5 s of its arrival).
    let cut = spooled_b as u64 - 3;
    pg.psql(&format!(
        "DELETE FROM audit_records WHERE sidecar = '{B}' AND seq > {cut};
         DELETE FROM audit_checkpoints WHERE sidecar = '{B}' AND seq > {cut};"
    ));
    let named = format!(
        "the records end at {cut}, but the checkpoint kept in the control plane's store vouches for records up to {spooled_b}"
    );
    poll(Duration::from_secs(20), Duration::from_millis(500), || {
        let (code, out, err) = cp2.sigil(&ops, &["audit", "verify"]);
        (code == Some(1) && (out.contains(&named) || err.contains(&named)))
            .then_some(())
            .ok_or_else(|| format!("{named:?} not in\n{out}{err}"))
    });

    // The database's certificate from another CA: refused at start, named.
    let other = Ca::new("elsewhere.test");
    let other_ca = d.join("other-ca.pem");
    std::fs::write(&other_ca, other.bundle_pem()).unwrap();
    let mut args = pg.audit_args();
    args[3] = other_ca.to_str().unwrap().to_string();
    let files = write_identity(d, "control-3", &ca, CONTROL, &[&ca]);
    let mut cmd = ControlPlane::command(
        CONTROL,
        &files,
        &etcd.store_at(etcd.client_port),
        free_port(),
        free_port(),
    );
    let (code, out) = run_status(cmd.args(&args), Duration::from_secs(30));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("certificate"), "{out}");
    // A file of its own beside replicas on etcd would split the records: refused.
    let mut cmd = ControlPlane::command(
        CONTROL,
        &files,
        &etcd.store_at(etcd.client_port),
        free_port(),
        free_port(),
    );
    let own_file = d.join("audit-3.db");
    let (code, out) = run_status(
        cmd.arg("--audit-db").arg(&own_file),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--audit-db must be postgresql://"), "{out}");
    // The replicas stop cleanly, their database connections closed on the way.
    for mut cp in [cp1, cp2] {
        assert_eq!(
            cp.proc.terminate(Duration::from_secs(10)),
            Some(0),
            "{}",
            cp.proc.log()
        );
    }
}

/// A WebSocket upgraded through the sidecars: on B, the tunnel gets an open record of its own
/// (protocol `tunnel`, the route that allowed the upgrade, the connection it was upgraded on)
/// and a close record with the bytes it carried after the upgrade.
#[test]
fn a_websocket_tunnel_gets_its_own_open_and_close_records_with_its_bytes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = TempDir::new("audit-ws");
    let d = dir.path();
    let (cp, ops, fa, fb) = control_and_identities(d);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The workload: echoes each text and binary message.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let ws_port = listener.local_addr().unwrap().port();
    rt.spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let ports = format!(
        "    - port: {ws_port}\n      protocol: http\n      routes: [{{name: echo, match: {{methods: [GET], path: {{exact: /ws}}}}, allow: [{A}]}}]\n"
    );
    cp.apply(
        &ops,
        &d.join("policy.yaml"),
        &policy("ws", "a echoes", B, &ports),
    );
    let (b_in, a_out) = (free_port(), free_port());
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_in, ws_port)];
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    b.audit = Some((d.join("spool-b"), "fail-open", 0));
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_out, b_in, B.into())];
    let _pb = b.start(d, &fb);
    let pa = a.start(d, &fa);
    let message = Message::binary(vec![7u8; 10_000]);
    rt.block_on(async {
        // Until B has the policy (default deny before).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut ws = loop {
            match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{a_out}/ws")).await {
                Ok((ws, _)) => break ws,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("upgrade through A: {e}\n{}", pa.log()),
            }
        };
        ws.send(message.clone()).await.unwrap();
        let echoed = loop {
            match ws.next().await {
                Some(Ok(m)) if m.is_binary() => break m,
                Some(Ok(_)) => continue,
                other => panic!("no echo: {other:?}"),
            }
        };
        assert_eq!(echoed, message);
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    });
    let query = |kind: &str| b_records(&cp, &ops, kind);
    let (open, close) = poll(Duration::from_secs(30), Duration::from_millis(300), || {
        let opens: Vec<_> = query("connection_open")
            .into_iter()
            .filter(|r| r["protocol"] == "tunnel")
            .collect();
        let [open] = &opens[..] else {
            return Err(format!("tunnel opens: {opens:?}"));
        };
        let close = query("connection_close")
            .into_iter()
            .find(|r| r["conn"] == open["conn"])
            .ok_or_else(|| format!("no close for {open}"))?;
        Ok((open.clone(), close))
    });
    assert_eq!(
        (
            &open["peer_id"],
            &open["policy"],
            &open["rule"],
            &open["route"]
        ),
        (&A.into(), &"ws".into(), &"echo".into(), &"ws/echo".into()),
        "{open}"
    );
    assert!(
        open["detail"]
            .as_str()
            .unwrap()
            .starts_with("upgraded on connection "),
        "{open}"
    );
    // The message (with its frame) each way, and the closing handshake.
    for way in ["bytes_in", "bytes_out"] {
        let n = close[way].as_u64().unwrap();
        assert!((10_000..11_000).contains(&n), "{way} {n}: {close}");
    }
    assert_eq!(close["protocol"], "tunnel", "{close}");
}
