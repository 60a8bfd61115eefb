//! The README's first command runs this binary; it must keep working as narrated.

use std::process::Command;
use std::time::Duration;

use sigil_e2e::{bin, require_tool, run};

#[test]
fn quickstart_shows_an_allowed_and_a_refused_call_and_exits_zero() {
    if !require_tool("curl", "quickstart") {
        return;
    }
    let (ok, out) = run(
        &mut Command::new(bin("sigil-quickstart")),
        Duration::from_secs(120),
    );
    assert!(ok, "quickstart failed:\n{out}");
    for needle in [
        "hello from api",
        "request allowed",
        "request denied",
        "sigil: denied by port 18081",
        "decision=\"deny\"",
        "sigil_requests_total{direction=\"inbound\"",
        "Done.",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}
