//! sigil-control-load: revocation latency with many sidecar streams connected.
//!
//! ```text
//! N simulated sidecars (real gRPC clients, mTLS, one SVID each) ══► sigil-control ◄══ sidecar A, sidecar B
//!                                                                                     A ══ K live L4 connections ══► B
//! ```
//!
//! Each round: K live connections from A's workload through A and B to an echo workload;
//! `sigil revoke A` (the CLI, timed until it returns); the time until the last of the K
//! connections is cut, and until each simulated sidecar holds the snapshot with the
//! revocation; then `sigil unrevoke A` and a fresh round. Prints markdown: p50/p99/max per
//! measure, and the control plane's RSS and CPU. Loopback only; every process it starts is
//! ended by PID; every wait is bounded. See perf/README.md.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigil_api::Ack;
use sigil_config::{SpiffeId, TrustDomain};
use sigil_e2e::{
    free_port, start_workload, write_identity, ControlPlane, IdentityFiles, Proc, Sidecar, TempDir,
};
use sigil_filters::TrustBundles;
use sigil_perf::procfs;
use sigil_perf::stats::percentile;
use sigil_testkit::Ca;

const TD: &str = "example.org";
const CONTROL: &str = "spiffe://example.org/sigil/control";
const OPERATOR: &str = "spiffe://example.org/ops/load";
const A: &str = "spiffe://example.org/ns/load/sa/a";
const B: &str = "spiffe://example.org/ns/load/sa/b";

const USAGE: &str = "\
sigil-control-load — revocation latency with many sidecar streams connected, or many
sidecars renewing their SVIDs at once

USAGE:
    sigil-control-load [--streams N] [--rounds R] [--live K]
    sigil-control-load --renewals N

    --streams N   simulated sidecars, each a gRPC stream with its own SVID   [1000]
    --rounds R    revoke/unrevoke rounds                                     [30]
    --live K      live connections through the real sidecar pair per round   [10]
    --renewals N  instead: N simulated sidecars renew their SVIDs at once, each with
                  its own key, CSR and mTLS connection; the time until all hold new ones

Build first: cargo build --release -p sigil-proxy -p sigil-control -p sigil-e2e -p sigil-perf";

struct Opts {
    streams: usize,
    rounds: usize,
    live: usize,
    renewals: Option<usize>,
}

/// When each simulated sidecar last received a snapshot, and whether it revoked A.
struct Sims {
    /// Per sim: (received at, revokes A) of every snapshot, in order.
    seen: Vec<Mutex<Vec<(Instant, bool)>>>,
    connected: AtomicUsize,
}

fn main() -> ExitCode {
    let mut o = Opts {
        streams: 1000,
        rounds: 30,
        live: 10,
        renewals: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> usize {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number\n\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--streams" => o.streams = num("--streams"),
            "--rounds" => o.rounds = num("--rounds"),
            "--live" => o.live = num("--live"),
            "--renewals" => o.renewals = Some(num("--renewals")),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(n) = o.renewals {
        return match sigil_perf::renewals::run(n) {
            Ok(storm) => {
                println!("## SVID renewals at once\n\n`sigil-control-load --renewals {n}`\n");
                print!("{}", sigil_perf::renewals::report(&storm));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sigil-control-load: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sigil-control-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn resources(b_echo: u16, echo_port: u16) -> String {
    format!(
        "apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: b, owner: perf, purpose: echo server}}
spec: {{spiffeId: {B}, environment: perf, addresses: [\"127.0.0.1:{b_echo}\"]}}
---
apiVersion: sigil.dev/v1
kind: Workload
metadata: {{name: a, owner: perf, purpose: echo client}}
spec: {{spiffeId: {A}, environment: perf}}
---
apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: b-echo, owner: perf, purpose: A may call B}}
spec:
  target: {B}
  ports:
    - port: {echo_port}
      protocol: tcp
      rules: [{{name: a, allow: [{A}]}}]
"
    )
}

/// The control plane, sidecar B in front of an echo workload, and sidecar A, whose outbound
/// listener `a_echo` reaches B's echo. The fields are in the order their processes end.
struct Stand {
    _a: Proc,
    _b: Proc,
    _echo: Proc,
    cp: ControlPlane,
    operator: IdentityFiles,
    ca: Ca,
    a_echo: u16,
}

/// Starts the stand in `d`, and waits until A reaches B through the registry the control
/// plane pushed.
fn start_stand(d: &Path) -> Result<Stand, String> {
    let ca = Ca::new(TD);
    let operator = write_identity(d, "operator", &ca, OPERATOR, &[&ca]);
    let fa = write_identity(d, "a", &ca, A, &[&ca]);
    let fb = write_identity(d, "b", &ca, B, &[&ca]);
    let cp = ControlPlane::start(
        CONTROL,
        write_identity(d, "control", &ca, CONTROL, &[&ca]),
        d.join("control-data"),
        free_port(),
        free_port(),
    );
    let (echo, echo_port) = start_workload("b-echo", true);
    let b_echo = free_port();
    cp.apply(
        &operator,
        &d.join("load.yaml"),
        &resources(b_echo, echo_port),
    );
    let mut b = Sidecar::new("sidecar-b", B);
    b.inbound = vec![(b_echo, echo_port)];
    b.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-b")));
    let pb = b.start(d, &fb);
    let a_echo = free_port();
    let mut a = Sidecar::new("sidecar-a", A);
    a.outbound = vec![(a_echo, b_echo, String::new())];
    a.control_plane = Some((cp.sidecar_port, CONTROL.into(), d.join("state-a")));
    let pa = a.start(d, &fa);
    wait("A to reach B through the pushed registry", || {
        echo_once(a_echo).is_ok()
    })?;
    Ok(Stand {
        _a: pa,
        _b: pb,
        _echo: echo,
        cp,
        operator,
        ca,
        a_echo,
    })
}

/// The figures of all rounds.
#[derive(Default)]
struct Measures {
    /// Per round: the last live connection cut, ms after `sigil revoke` returned.
    cut_ms: Vec<f64>,
    /// The same, ms after `sigil revoke` started.
    cut_from_start_ms: Vec<f64>,
    /// Per round and simulated sidecar: the snapshot with the revocation, ms after `sigil
    /// revoke` returned.
    push_ms: Vec<f64>,
    /// Simulated sidecars that did not get the revocation within 10 s, over all rounds.
    unreached: usize,
}

fn run(o: &Opts) -> Result<(), String> {
    let dir = TempDir::new("control-load");
    let stand = start_stand(dir.path())?;
    let sims = Arc::new(Sims {
        seen: (0..o.streams).map(|_| Mutex::new(Vec::new())).collect(),
        connected: AtomicUsize::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    start_sims(
        &rt,
        &stand.ca,
        o.streams,
        stand.cp.sidecar_port,
        sims.clone(),
    )?;
    let connect_secs = started.elapsed().as_secs_f64();
    let control = procfs::Group::new("sigil-control", stand.cp.proc.pid(), false);
    let cpu_before = control.cpu_secs();

    let mut m = Measures::default();
    for round in 0..o.rounds {
        revoke_round(&stand, &sims, o.live, round, &mut m)?;
    }
    let cpu = control.cpu_secs() - cpu_before;
    let rss_mib = control.rss_kib() as f64 / 1024.0;
    let (_, metrics, _) = stand.cp.sigil(&stand.operator, &["metrics"]);

    println!("## Revocation latency with {} sidecar streams\n", o.streams);
    println!(
        "`sigil-control-load --streams {} --rounds {} --live {}`; {} streams connected in {connect_secs:.1} s; \
         sigil-control RSS {rss_mib:.1} MiB with them, {cpu:.2} CPU s over the rounds.\n",
        o.streams, o.rounds, o.live, sims.connected.load(Ordering::Relaxed)
    );
    print_figures(&m, &metrics);
    if m.unreached > 0 {
        return Err(format!(
            "{} simulated sidecar(s) never received a revocation within 10 s",
            m.unreached
        ));
    }
    Ok(())
}

/// One round: `live` connections from A to B, `sigil revoke A`, the time until the last of
/// them is cut and until each simulated sidecar has the revocation, then `sigil unrevoke A`
/// and a wait until A reaches B again.
fn revoke_round(
    stand: &Stand,
    sims: &Sims,
    live: usize,
    round: usize,
    m: &mut Measures,
) -> Result<(), String> {
    let (cp, operator) = (&stand.cp, &stand.operator);
    let conns = open_live(stand.a_echo, live)?;
    let cuts: Vec<_> = conns
        .into_iter()
        .map(|mut s| std::thread::spawn(move || wait_closed(&mut s)))
        .collect();
    let marks: Vec<usize> = sims
        .seen
        .iter()
        .map(|s| s.lock().expect("sims lock").len())
        .collect();
    let t0 = Instant::now();
    let (code, out, err) = cp.sigil(
        operator,
        &["revoke", A, "--reason", &format!("load round {round}")],
    );
    let t1 = Instant::now();
    if code != Some(0) {
        return Err(format!("sigil revoke: {out}{err}"));
    }
    let mut last = t0;
    for c in cuts {
        let at = c
            .join()
            .map_err(|_| "a live-connection reader panicked")?
            .ok_or(format!("round {round}: a live connection survived 10 s"))?;
        last = last.max(at);
    }
    m.cut_ms.push(signed_ms(last, t1));
    m.cut_from_start_ms.push(signed_ms(last, t0));
    wait_pushes(sims, &marks, t1, m);
    let (code, out, err) = cp.sigil(operator, &["unrevoke", A]);
    if code != Some(0) {
        return Err(format!("sigil unrevoke: {out}{err}"));
    }
    wait("A readmitted", || echo_once(stand.a_echo).is_ok())?;
    eprintln!(
        "round {round}: last of {live} live connections cut {:.1} ms after sigil revoke returned ({:.1} ms after it started)",
        m.cut_ms[round],
        m.cut_from_start_ms[round]
    );
    Ok(())
}

/// Every simulated sidecar must get the revocation: records when each did (the first
/// revoking snapshot after its mark in `marks`), from `returned`, the CLI's return; counts
/// those that did not within 10 s.
fn wait_pushes(sims: &Sims, marks: &[usize], returned: Instant, m: &mut Measures) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, s) in sims.seen.iter().enumerate() {
        loop {
            let got = s.lock().expect("sims lock")[marks[i]..]
                .iter()
                .find(|(_, revokes)| *revokes)
                .map(|(at, _)| *at);
            if let Some(at) = got {
                m.push_ms.push(signed_ms(at, returned));
                break;
            }
            if Instant::now() > deadline {
                m.unreached += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The latency table, the control plane's own push latency (from its `metrics`, in the
/// Prometheus text format) and the verdict on the target.
fn print_figures(m: &Measures, metrics: &str) {
    let metric = |name: &str| sigil_e2e::metric(metrics, name, &[]).unwrap_or(f64::NAN);
    let latency_count = metric("sigil_control_push_latency_seconds_count");
    let latency_sum = metric("sigil_control_push_latency_seconds_sum");
    println!("| from `sigil revoke` returning (ms) | p50 | p99 | max | n |");
    println!("| --- | --- | --- | --- | --- |");
    for (what, v) in [
        ("last live connection cut (A→B, both sidecars)", &m.cut_ms),
        ("same, from `sigil revoke` starting", &m.cut_from_start_ms),
        (
            "snapshot with the revocation at each simulated sidecar",
            &m.push_ms,
        ),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {} |",
            percentile(v, 50.0),
            percentile(v, 99.0),
            percentile(v, 100.0),
            v.len()
        );
    }
    println!(
        "\nControl-plane push latency (store change to ACK, all streams, all changes): mean {:.2} ms over {latency_count} acknowledgements.",
        1000.0 * latency_sum / latency_count
    );
    let p99 = percentile(&m.cut_ms, 99.0);
    println!(
        "Target p99 ≤ 1000 ms for the last live connection cut: {} ({p99:.1} ms).",
        if p99 <= 1000.0 { "met" } else { "NOT met" }
    );
}

/// Milliseconds from `from` to `at`, negative if `at` came first.
fn signed_ms(at: Instant, from: Instant) -> f64 {
    if at >= from {
        (at - from).as_secs_f64() * 1000.0
    } else {
        -((from - at).as_secs_f64() * 1000.0)
    }
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"ping\n")?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf)?;
    if &buf != b"ping\n" {
        return Err(std::io::Error::other("echo corrupted"));
    }
    Ok(())
}

fn echo_once(port: u16) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    echo(&mut s)
}

/// `k` connections through the sidecar pair, each proven with one echo.
fn open_live(port: u16, k: usize) -> Result<Vec<TcpStream>, String> {
    (0..k)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            echo(&mut s).map_err(|e| format!("live connection: {e}"))?;
            Ok(s)
        })
        .collect()
}

/// Blocks until the peer closes `s` (EOF or reset); when, or None after the 10 s read timeout.
fn wait_closed(s: &mut TcpStream) -> Option<Instant> {
    match s.read(&mut [0u8; 64]) {
        Ok(_) => Some(Instant::now()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(Instant::now()),
    }
}

/// Connects `n` simulated sidecars, 50 handshakes at a time, and waits for each one's first
/// snapshot.
fn start_sims(
    rt: &tokio::runtime::Runtime,
    ca: &Ca,
    n: usize,
    port: u16,
    sims: Arc<Sims>,
) -> Result<(), String> {
    let mut bundles = TrustBundles::new();
    let td = TrustDomain::parse(TD).map_err(|e| e.to_string())?;
    bundles
        .insert_pem(&td, ca.bundle_pem().as_bytes())
        .map_err(|e| e.to_string())?;
    let bundles = Arc::new(bundles);
    let control = SpiffeId::parse(CONTROL).map_err(|e| e.to_string())?;
    let a = SpiffeId::parse(A).map_err(|e| e.to_string())?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let mut handles = Vec::new();
        for &i in chunk {
            let id = format!("spiffe://{TD}/load/sim-{i}");
            let config = sigil_perf::renewals::sim_tls(ca, &id, &bundles, &control)?;
            let (sims, a) = (sims.clone(), a.clone());
            handles.push(rt.spawn(async move {
                let r = sim(i, port, config, &sims, &a).await;
                if let Err(e) = &r {
                    eprintln!("sim-{i}: {e}");
                }
            }));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for &i in chunk {
            while sims.seen[i].lock().expect("sims lock").is_empty() {
                if Instant::now() > deadline {
                    return Err(format!("sim-{i} got no first snapshot within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // The tasks run on until the runtime is dropped.
        drop(handles);
    }
    Ok(())
}

/// One simulated sidecar: a real mTLS gRPC stream that acknowledges every snapshot.
async fn sim(
    i: usize,
    port: u16,
    config: Arc<rustls::ClientConfig>,
    sims: &Sims,
    a: &SpiffeId,
) -> Result<(), String> {
    // The connection's task runs until the stream ends.
    let (sender, _conn, origin) = sigil_perf::renewals::connect(port, config).await?;
    let hello = Ack {
        node: format!("sim-{i}"),
        version: 0,
        accepted: true,
        error: String::new(),
        epoch: String::new(),
    };
    let (tx, mut snapshots) = sigil_api::client::subscribe(sender, origin, hello)
        .await
        .map_err(|s| format!("subscribe: {s}"))?;
    sims.connected.fetch_add(1, Ordering::Relaxed);
    while let Some(s) = snapshots.message().await.map_err(|e| e.to_string())? {
        let at = Instant::now();
        let revokes = s.revocations.iter().any(|d| d.yaml.contains(a.as_str()));
        sims.seen[i].lock().expect("sims lock").push((at, revokes));
        let ack = Ack {
            node: String::new(),
            version: s.version,
            accepted: true,
            error: String::new(),
            epoch: s.epoch.clone(),
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}
