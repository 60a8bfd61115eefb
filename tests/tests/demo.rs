//! `sigil demo`, the README's first command, end to end: it must narrate every step, exit 0
//! and leave nothing behind.

use std::process::Command;
use std::time::Duration;

use sigil_e2e::{bin, run};

#[test]
fn sigil_demo_narrates_every_step_and_cleans_up() {
    let (ok, out) = run(
        Command::new(bin("sigil")).arg("demo"),
        Duration::from_secs(120),
    );
    assert!(ok, "sigil demo failed:\n{out}");
    for expected in [
        "sent=1 acknowledged",
        "GET /orders/42  → 200",
        "GET /admin/users → 403 sigil: denied by policy api-access rule admin (deny)",
        "GET /admin/users → 200",
        "web's live connection was cut",
        "GET /orders/43  → 502",
        "0 failed",
        "reason=\"revoked\"}",
        "sigil_control_sidecars_connected 3",
        "== done",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    let dir = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("(working directory "))
        .and_then(|d| d.strip_suffix(')'))
        .expect("the demo names its directory");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
