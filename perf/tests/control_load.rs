//! The control-plane load tool (revocation latency, and the renewal storm) at a small scale, so that it cannot rot between the runs that
//! produce perf/README.md's figures. No timing is asserted: it must connect every simulated
//! sidecar, cut every live connection and reach every stream, or exit non-zero.

use std::process::Command;
use std::time::Duration;

use sigil_e2e::run;

#[test]
fn control_load_cuts_live_connections_and_reaches_every_stream() {
    let (ok, out) = run(
        Command::new(env!("CARGO_BIN_EXE_sigil-control-load")).args([
            "--streams",
            "40",
            "--rounds",
            "2",
            "--live",
            "3",
        ]),
        Duration::from_secs(120),
    );
    assert!(ok, "sigil-control-load failed:\n{out}");
    assert!(
        out.contains("40 streams connected")
            && out.contains("| last live connection cut")
            && out.contains("| snapshot with the revocation at each simulated sidecar |")
            && out.contains("| 80 |"),
        "{out}"
    );
}

/// The renewal storm at a small scale: every simulated sidecar must get a new SVID it can
/// use with its own key, or the tool exits non-zero.
#[test]
fn control_load_renews_every_simulated_sidecar() {
    let (ok, out) = run(
        Command::new(env!("CARGO_BIN_EXE_sigil-control-load")).args(["--renewals", "30"]),
        Duration::from_secs(120),
    );
    assert!(ok, "sigil-control-load --renewals failed:\n{out}");
    assert!(
        out.contains("30 sidecars renewing at once: all held new SVIDs"),
        "{out}"
    );
}
